"""The hinge loss of SN-GAN (Miyato et al. 2018, eq. 16-17; Lim & Ye 2017).

L_D = E_x[max(0, 1 - D(x))] + E_z[max(0, 1 + D(G(z)))],   L_G = -E_z[D(G(z))].
"""

from __future__ import annotations

import attrs
import torch
import torch.nn.functional as F

from core.hookspecs import hookimpl
from core.interfaces import Loss


class Hinge(Loss):
    """Hinge adversarial loss; both terms are means over the batch."""

    @attrs.define
    class Config:
        pass

    def discriminator_loss(self, real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
        return F.relu(1.0 - real_logits).mean() + F.relu(1.0 + fake_logits).mean()

    def generator_loss(self, fake_logits: torch.Tensor,
                       real_logits: torch.Tensor | None = None) -> torch.Tensor:
        """``-E[D(G(z))]``; ``real_logits`` is not used (``needs_real_logits`` is False)."""
        return -fake_logits.mean()


@hookimpl
def register_losses(register) -> None:
    register("hinge", Hinge)
