"""The non-saturating GAN loss (Goodfellow et al. 2014, Sec. 3, and its "-log D" generator).

With logits ``r = D(x)`` on reals, ``f = D(G(z))`` on fakes and ``D = sigmoid(logit)``:

    L_D = E[-log sigmoid(r)] + E[-log(1 - sigmoid(f))] = E[softplus(-r)] + E[softplus(f)]
    L_G = E[-log sigmoid(f)] = E[softplus(-f)]

the minimax discriminator objective (eq. 1) and the generator's "maximize log D(G(z))"
instead of "minimize log(1 - D(G(z)))", which saturates early in training (Sec. 3).
"""

from __future__ import annotations

import attrs
import torch
import torch.nn.functional as F

from core.hookspecs import hookimpl
from core.interfaces import Loss


class NonSaturating(Loss):
    """Goodfellow et al. (2014)'s non-saturating loss (Sec. 3); means over the batch."""

    @attrs.define
    class Config:
        pass

    def discriminator_loss(self, real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
        return F.softplus(-real_logits).mean() + F.softplus(fake_logits).mean()

    def generator_loss(self, fake_logits: torch.Tensor,
                       real_logits: torch.Tensor | None = None) -> torch.Tensor:
        """``E[softplus(-f)] = -E[log sigmoid(f)]``; ``real_logits`` is not used."""
        return F.softplus(-fake_logits).mean()


@hookimpl
def register_losses(register) -> None:
    register("ns", NonSaturating)
