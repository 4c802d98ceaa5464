"""The R1 gradient penalty on real data (Mescheder, Geiger & Nowozin 2018, "Which Training Methods
for GANs do actually Converge?", eq. 9):

    R1(psi) = gamma / 2 * E_{x ~ p_data} ||grad_x D_psi(x)||^2

It reparametrizes nothing: it is a penalty on D's loss (:meth:`R1.penalty`), computed from the
logits of the loop's main D forward on the reals (``needs = {"real_grad"}`` makes the loop hand D
reals that require grad), with no forward pass of its own; ``create_graph=True`` lets D's step
differentiate the penalty with respect to D's parameters.

Lazy regularization (Karras et al. 2020, StyleGAN2, Sec. 4 "Lazy regularization"): with
``every = N`` (16 by default, StyleGAN2's ``reg_interval``) the penalty runs on every N-th D step,
multiplied by N. specreg adds it in the main pass (no separate optimizer step), so Adam's learning
rate and betas need no correction. In a recipe::

    [discriminator.regularizer]
    name = "r1"
    gamma = 10.0
    every = 16
"""

from __future__ import annotations

import attrs
import torch
from torch import nn

from core.errors import SpecregError
from core.hookspecs import hookimpl
from core.interfaces import Regularizer, StepContext
from plugins.regularizers.base import check_positive_int, check_positive_number

__all__ = ["R1", "gradient_square_norms"]


def gradient_square_norms(logits: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
    """``||grad_x D(x)||^2`` per sample, differentiable (``create_graph=True``): the gradient of
    ``logits.sum()`` with respect to ``inputs`` (each logit depends on its own sample only)."""
    (grad,) = torch.autograd.grad(logits.sum(), inputs, create_graph=True)
    return grad.square().flatten(1).sum(1)


class R1(Regularizer):
    """R1 penalty ``gamma/2 * E||grad_x D(x)||^2`` on reals (Mescheder et al. 2018, eq. 9), lazy
    every ``every`` D steps (StyleGAN2)."""

    @attrs.define
    class Config:
        #: the penalty's weight gamma (Mescheder et al. use 10 on CelebA/LSUN; StyleGAN2 scales
        #: it with the resolution).
        gamma: float = attrs.field(default=10.0, validator=check_positive_number("r1"))
        #: lazy regularization interval in D steps (StyleGAN2's reg_interval); 1 = every step.
        every: int = attrs.field(default=16, validator=check_positive_int("r1"))

    needs = frozenset({"real_grad"})

    def apply(self, module: nn.Module) -> nn.Module:
        """Nothing to reparametrize: the module, unchanged."""
        return module

    @property
    def penalty_every(self) -> int:
        return self.config.every

    def penalty(self, context: StepContext) -> torch.Tensor | None:
        """``gamma / 2`` times the micro-batch mean of ``||grad_x D(x)||^2`` over its reals
        (D's step only; None in G's)."""
        if context.phase != "D":
            return None
        real, logits = context.real, context.real_logits
        if real is None or logits is None or not real.requires_grad:
            raise SpecregError(
                "regularizer 'r1': the D step's context has no reals that require grad (the "
                "training loop must prepare them for a regularizer whose needs include "
                "'real_grad')")
        return 0.5 * self.config.gamma * gradient_square_norms(logits, real).mean()


@hookimpl
def register_regularizers(register) -> None:
    register("r1", R1)
