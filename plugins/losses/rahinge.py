"""The relativistic average hinge loss, RaHingeGAN (Jolicoeur-Martineau 2019, "The relativistic
discriminator: a key element missing from standard GAN", ICLR 2019, arXiv:1807.00734 (2018)):
the relativistic average discriminator (RaD, Sec. 4.3) with the hinge's ``max(0, 1 - y)``.

D judges whether a real is more realistic than the average fake, and G whether a fake is more
realistic than the average real. With logits ``r`` (reals) and ``f`` (fakes):

    L_D = E_r[max(0, 1 - (r - E[f]))] + E_f[max(0, 1 + (f - E[r]))]
    L_G = E_r[max(0, 1 + (r - E[f]))] + E_f[max(0, 1 - (f - E[r]))]

so the generator's loss uses real logits: ``needs_real_logits = True`` makes the training loop run
D on a real micro-batch in the G step too.

The averages ``E[f]`` and ``E[r]`` are over the micro-batch the loss is given (as BatchNorm's
statistics are): with gradient accumulation, k micro-batches approximate one batch k times as
large, they do not equal it.
"""

from __future__ import annotations

import attrs
import torch
import torch.nn.functional as F

from core.errors import SpecregError
from core.hookspecs import hookimpl
from core.interfaces import Loss


class RelativisticAverageHinge(Loss):
    """Relativistic average hinge loss (RaHingeGAN, Jolicoeur-Martineau 2019, Sec. 4.3); needs
    real logits in the generator's step."""

    @attrs.define
    class Config:
        pass

    needs_real_logits = True

    def discriminator_loss(self, real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
        return (F.relu(1.0 - (real_logits - fake_logits.mean())).mean()
                + F.relu(1.0 + (fake_logits - real_logits.mean())).mean())

    def generator_loss(self, fake_logits: torch.Tensor,
                       real_logits: torch.Tensor | None = None) -> torch.Tensor:
        if real_logits is None:
            raise SpecregError("loss 'rahinge': generator_loss needs real_logits (the relativistic "
                               "average compares fakes with the average real); the training loop "
                               "passes them because needs_real_logits is True")
        return (F.relu(1.0 + (real_logits - fake_logits.mean())).mean()
                + F.relu(1.0 - (fake_logits - real_logits.mean())).mean())


@hookimpl
def register_losses(register) -> None:
    register("rahinge", RelativisticAverageHinge)
