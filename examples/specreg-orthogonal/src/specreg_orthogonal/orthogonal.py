"""Orthogonal regularization as a penalty: BigGAN (Brock, Donahue & Simonyan 2019, Sec. 3.1, eq. 3).

For every penalized layer, with ``W = weight.reshape(out, -1)`` (one filter per row, specreg's
SPEC §1 reshape), BigGAN's variant penalizes the filters' pairwise inner products and leaves
their norms free::

    R(W) = ||W W^T ⊙ (1 - I)||_F^2                 (off_diagonal_only = true, BigGAN eq. 3)
    R(W) = ||W W^T - I||_F^2                       (off_diagonal_only = false, Brock et al. 2017)

and the network's loss gets ``strength / 2 * sum over layers of R(W)``. The factor 1/2 makes the
gradient ``strength * 2 (W W^T ⊙ (1 - I)) W``, the update BigGAN's published code adds to the
weights' gradients with ``strength = 1e-4`` (the paper's ``beta``); the paper's ``beta * R(W)``
is this with ``strength = 2 * beta``.

It reparametrizes nothing: :meth:`Orthogonal.apply` only checks that the network has layers of
the chosen types, and :meth:`Orthogonal.penalty` returns the penalty of the network it is applied
to (``context.module``; it needs no batch), which specreg's training loop adds to that network's
loss in every micro-batch, divided by their number like the loss, so that it counts once per
optimizer step. In a recipe::

    [generator.regularizer]
    name = "orthogonal"
    strength = 1e-4
    layers = ["conv", "linear"]     # BigGAN leaves G's shared class embedding out
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import attrs
import torch
from torch import nn

from core.errors import SpecregError
from core.interfaces import Regularizer
from core.layers import LAYER_TYPES, raw_weight, weight_layers, weight_matrix

if TYPE_CHECKING:
    from core.interfaces import StepContext

__all__ = ["Orthogonal", "OrthogonalConfigError", "orthogonality"]


class OrthogonalConfigError(SpecregError):
    """The ``orthogonal`` regularizer's recipe table has an invalid value."""


def orthogonality(weight: torch.Tensor, off_diagonal_only: bool = True) -> torch.Tensor:
    """``R(W)``: ``||W W^T ⊙ (1 - I)||_F^2`` (BigGAN eq. 3), or ``||W W^T - I||_F^2``."""
    w = weight_matrix(weight)
    gram = w @ w.transpose(0, 1)
    eye = torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
    residual = gram * (1 - eye) if off_diagonal_only else gram - eye
    return residual.square().sum()


class Orthogonal(Regularizer):
    """BigGAN's orthogonal regularization (Brock et al. 2019, eq. 3) as a penalty on the weights."""

    @attrs.define
    class Config:
        #: the penalty's weight: BigGAN's code uses 1e-4 (the loss is strength/2 * sum R(W)).
        strength: float = 1e-4
        #: layer types penalized: any of "conv", "linear", "embedding".
        layers: list[str] = attrs.Factory(lambda: list(LAYER_TYPES))
        #: true: BigGAN's variant (filter norms free); false: ||W W^T - I||^2 (Brock et al. 2017).
        off_diagonal_only: bool = True

    def __init__(self, config=None) -> None:
        super().__init__(config)
        problems = []
        if not self.config.strength >= 0:
            problems.append(f"strength must be >= 0, got {self.config.strength!r}")
        unknown = [name for name in self.config.layers if name not in LAYER_TYPES]
        if unknown:
            problems.append(f"unknown layer type(s) {', '.join(map(repr, unknown))} in layers; "
                            f"valid: {', '.join(map(repr, LAYER_TYPES))}")
        elif not self.config.layers:
            problems.append(f"layers is empty; choose from {', '.join(map(repr, LAYER_TYPES))}")
        if problems:
            raise OrthogonalConfigError("regularizer 'orthogonal': " + "; ".join(problems))
        self.types = tuple(LAYER_TYPES[name] for name in self.config.layers)

    def apply(self, module: nn.Module) -> nn.Module:
        """Nothing to reparametrize; refuses a network without any layer to penalize."""
        if next(weight_layers(module, self.types), None) is None:
            raise OrthogonalConfigError(
                f"regularizer 'orthogonal': {type(module).__name__} has no layer of the types "
                f"{', '.join(self.config.layers)} to penalize")
        return module

    def penalty(self, context: "StepContext") -> torch.Tensor | None:
        """``strength / 2 * sum_l R(W_l)`` over the trainable weights of the penalized layers of
        the network the regularizer is applied to (the same in every micro-batch and phase of
        that network's steps)."""
        return self.weight_penalty(context.module)

    def weight_penalty(self, module: nn.Module) -> torch.Tensor | None:
        """``strength / 2 * sum_l R(W_l)`` for ``module``'s layers (None when strength = 0)."""
        if self.config.strength == 0:
            return None
        terms = [orthogonality(raw_weight(layer), self.config.off_diagonal_only)
                 for _, layer in weight_layers(module, self.types)]
        return 0.5 * self.config.strength * torch.stack(terms).sum()
