"""The R2 gradient penalty on generated data (Mescheder, Geiger & Nowozin 2018, "Which Training
Methods for GANs do actually Converge?", eq. 10):

    R2(psi) = gamma / 2 * E_{x ~ p_theta} ||grad_x D_psi(x)||^2

the twin of R1 (eq. 9), on the fakes instead of the reals. A data-dependent penalty written
against specreg's contract v2: :meth:`R2.penalty` receives the D step's
:class:`core.interfaces.StepContext` and runs a D forward pass of its own on the step's fakes
(the loop's fakes do not require grad: R2 needs no preparation, ``needs`` stays empty). The
forward goes through ``context.discriminator``, the DDP-wrapped D, so that under several processes
its gradients are all-reduced with the rest, and runs with state updates frozen
(:func:`core.layers.frozen_state`), so that a power iteration in D still advances once per step.
In a recipe::

    [discriminator.regularizer]
    name = "r2"
    gamma = 1.0
    every = 1              # lazy: every N-th D step, multiplied by N
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import attrs
import torch
from torch import nn

from core.errors import SpecregError
from core.interfaces import Regularizer
from core.layers import frozen_state

if TYPE_CHECKING:
    from core.interfaces import StepContext

__all__ = ["R2", "R2ConfigError"]


class R2ConfigError(SpecregError):
    """The ``r2`` regularizer's recipe table has an invalid value."""


class R2(Regularizer):
    """R2 penalty ``gamma/2 * E||grad_x D(x)||^2`` on generated images (Mescheder et al. 2018,
    eq. 10), from a D forward of its own through the wrapped D."""

    @attrs.define
    class Config:
        #: the penalty's weight gamma.
        gamma: float = 1.0
        #: lazy regularization interval in D steps (Karras et al. 2020); 1 = every step.
        every: int = 1

    def __init__(self, config=None) -> None:
        super().__init__(config)
        problems = []
        if not (isinstance(self.config.gamma, (int, float)) and self.config.gamma > 0):
            problems.append(f"gamma must be a number > 0, got {self.config.gamma!r}")
        every = self.config.every
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            problems.append(f"every must be an integer >= 1, got {every!r}")
        if problems:
            raise R2ConfigError("regularizer 'r2': " + "; ".join(problems))

    def apply(self, module: nn.Module) -> nn.Module:
        """Nothing to reparametrize: the module, unchanged."""
        return module

    @property
    def penalty_every(self) -> int:
        return self.config.every

    def penalty(self, context: "StepContext") -> torch.Tensor | None:
        """``gamma / 2`` times the micro-batch mean of ``||grad_x D(x)||^2`` over its fakes (D's
        step only; None in G's)."""
        if context.phase != "D":
            return None
        if context.fake is None:
            raise R2ConfigError("regularizer 'r2': the D step's context has no fakes")
        fake = context.fake.detach().requires_grad_(True)
        with frozen_state():
            logits = context.discriminator(fake, context.fake_labels)
        (grad,) = torch.autograd.grad(logits.float().sum(), fake, create_graph=True)
        return 0.5 * self.config.gamma * grad.square().flatten(1).sum(1).mean()
