"""The Wasserstein GAN loss (Arjovsky, Chintala & Bottou 2017, eq. 3 and Algorithm 1).

The critic maximizes ``E[D(x)] - E[D(G(z))]`` (the Kantorovich-Rubinstein dual of the
Wasserstein-1 distance, for a 1-Lipschitz D), the generator minimizes ``-E[D(G(z))]``:

    L_D = E[f] - E[r],      L_G = -E[f]

It needs D kept Lipschitz: weight clipping in the paper; the gradient penalty ``wgan_gp``
(Gulrajani et al. 2017) or a spectral regularizer here.
"""

from __future__ import annotations

import attrs
import torch

from core.hookspecs import hookimpl
from core.interfaces import Loss


class Wasserstein(Loss):
    """WGAN's critic and generator losses (Arjovsky et al. 2017, eq. 3); means over the batch."""

    @attrs.define
    class Config:
        pass

    def discriminator_loss(self, real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
        return fake_logits.mean() - real_logits.mean()

    def generator_loss(self, fake_logits: torch.Tensor,
                       real_logits: torch.Tensor | None = None) -> torch.Tensor:
        """``-E[f]``; ``real_logits`` is not used."""
        return -fake_logits.mean()


@hookimpl
def register_losses(register) -> None:
    register("wasserstein", Wasserstein)
