"""The WGAN-GP gradient penalty (Gulrajani et al. 2017, "Improved Training of Wasserstein GANs",
eq. 3 and Algorithm 1):

    lambda * E_{x_hat} (||grad_{x_hat} D(x_hat)||_2 - 1)^2,    x_hat = eps x + (1 - eps) x_fake,

``eps ~ U[0, 1]`` per sample, on interpolates between each real and the fake beside it in the
micro-batch. It reparametrizes nothing: it is a penalty on D's loss (:meth:`WGANGP.penalty`) that
runs a D forward pass of its own on the interpolates, through ``context.discriminator`` (the
DDP-wrapped D, so that the gradients it adds are all-reduced with the rest) and with state updates
frozen (:func:`core.layers.frozen_state`: a power iteration in D advances once per step, in the
main forward). A conditional D gets the reals' labels (the interpolate's real end), as
StudioGAN's gradient penalty does.

``eps`` of the sample at place ``j`` of D step ``s``'s global batch comes from a generator seeded by
``(seed, s, j)``, ``j = process * k * b + micro_batch * b + i`` (the places of
:func:`core.data.micro_batch_places`): every process draws for its own samples, the draws do not
depend on how the global batch is split over processes and micro-batches, and a resumed run draws
what the straight run drew. In a recipe (usually with ``loss = "wasserstein"`` and ``n_critic =
5``)::

    [discriminator.regularizer]
    name = "wgan_gp"
    weight = 10.0
"""

from __future__ import annotations

import hashlib

import attrs
import torch
import torch.distributed as dist
from torch import nn

from core.errors import SpecregError
from core.hookspecs import hookimpl
from core.interfaces import Regularizer, StepContext
from core.layers import frozen_state
from plugins.regularizers.base import (check_nonnegative_int, check_positive_int,
                                       check_positive_number)

__all__ = ["WGANGP", "interpolation_weights", "sample_places"]


def _process() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def sample_places(micro_batch: int, num_micro_batches: int, size: int,
                  process: int | None = None) -> range:
    """The places in the global batch of the ``size`` samples of micro-batch ``micro_batch`` (of
    ``num_micro_batches``) on ``process`` (default: this one), as the training loop lays them out
    (process-major, then micro-batch: :func:`core.data.micro_batch_places`)."""
    process = _process() if process is None else process
    start = (process * num_micro_batches + micro_batch) * size
    return range(start, start + size)


def _seed(seed: int, step: int, place: int) -> int:
    digest = hashlib.blake2b(f"wgan_gp:{seed}:{step}:{place}".encode(), digest_size=8)
    return int.from_bytes(digest.digest(), "little")


def interpolation_weights(seed: int, step: int, places: range) -> torch.Tensor:
    """``float32 [len(places)]`` of ``U[0, 1)``: place ``j`` gets the draw of a generator seeded by
    ``(seed, step, j)``."""
    return torch.stack([torch.rand((), generator=torch.Generator().manual_seed(_seed(seed, step, j)))
                        for j in places])


class WGANGP(Regularizer):
    """WGAN-GP's gradient penalty ``weight * E(||grad D(x_hat)||_2 - 1)^2`` on real-fake
    interpolates (Gulrajani et al. 2017, eq. 3)."""

    @attrs.define
    class Config:
        #: the penalty's weight, the paper's lambda (10 in all its experiments).
        weight: float = attrs.field(default=10.0, validator=check_positive_number("wgan_gp"))
        #: lazy regularization interval in D steps; 1 = every step (the paper's).
        every: int = attrs.field(default=1, validator=check_positive_int("wgan_gp"))
        #: mixed into the interpolation weights' seeds (the same for every run by default).
        seed: int = attrs.field(default=0, validator=check_nonnegative_int("wgan_gp"))

    def apply(self, module: nn.Module) -> nn.Module:
        """Nothing to reparametrize: the module, unchanged."""
        return module

    @property
    def penalty_every(self) -> int:
        return self.config.every

    def interpolates(self, context: StepContext) -> torch.Tensor:
        """``eps x + (1 - eps) x_fake`` for this micro-batch's reals and fakes (detached)."""
        real, fake = context.real, context.fake
        if real is None or fake is None or len(real) != len(fake):
            raise SpecregError("regularizer 'wgan_gp': the D step's context needs as many fakes "
                               "as reals to interpolate between them")
        places = sample_places(context.micro_batch, context.num_micro_batches, len(real))
        eps = interpolation_weights(self.config.seed, context.step, places)
        eps = eps.to(device=real.device, dtype=real.dtype).view(-1, *([1] * (real.ndim - 1)))
        return torch.lerp(fake.detach().to(real.dtype), real.detach(), eps)

    def penalty(self, context: StepContext) -> torch.Tensor | None:
        """``weight`` times the micro-batch mean of ``(||grad D(x_hat)||_2 - 1)^2`` (D's step
        only; None in G's)."""
        if context.phase != "D":
            return None
        x_hat = self.interpolates(context).requires_grad_(True)
        with frozen_state():
            logits = context.discriminator(x_hat, context.real_labels)
        (grad,) = torch.autograd.grad(logits.float().sum(), x_hat, create_graph=True)
        norms = grad.flatten(1).norm(2, dim=1)
        return self.config.weight * (norms - 1).square().mean()


@hookimpl
def register_regularizers(register) -> None:
    register("wgan_gp", WGANGP)
