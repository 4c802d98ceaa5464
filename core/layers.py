"""Helpers shared by regularizer plugins: which layers they touch, weight matrices, state updates.

SPEC §1: a layer's weight matrix is ``W.reshape(out, -1)``; SPEC §2: regularizers apply to every
Conv2d, Linear and Embedding of the network they are given.
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import Iterator

import torch
from torch import nn
from torch.nn.utils import parametrize

#: layer types a regularizer applies to by default, by the names recipes use.
LAYER_TYPES: dict[str, type[nn.Module]] = {
    "conv": nn.Conv2d,
    "linear": nn.Linear,
    "embedding": nn.Embedding,
}

_STATE_UPDATES = contextvars.ContextVar("specreg_state_updates", default=True)


def state_updates_enabled() -> bool:
    """Whether a training-mode forward pass may update regularizer state (power iteration)."""
    return _STATE_UPDATES.get()


@contextlib.contextmanager
def frozen_state() -> Iterator[None]:
    """Within this block, parametrizations use their stored state without updating it.

    The training loop wraps every micro-batch but the first of an optimizer step in it, so that
    gradient accumulation over k micro-batches equals one batch k times as large.
    """
    token = _STATE_UPDATES.set(False)
    try:
        yield
    finally:
        _STATE_UPDATES.reset(token)


def weight_layers(module: nn.Module, types: tuple[type[nn.Module], ...] | None = None
                  ) -> Iterator[tuple[str, nn.Module]]:
    """``(qualified name, layer)`` for ``module`` itself and every submodule that is one of
    ``types`` (Conv2d, Linear, Embedding by default), in registration order (= forward order for
    our architectures)."""
    types = types or tuple(LAYER_TYPES.values())
    for name, sub in module.named_modules():
        if isinstance(sub, types):
            yield name, sub


def weight_matrix(weight: torch.Tensor) -> torch.Tensor:
    """SPEC §1: ``[out, in, kh, kw] -> [out, in*kh*kw]``; linear and embedding weights unchanged."""
    return weight.reshape(weight.shape[0], -1)


def raw_weight(layer: nn.Module) -> torch.Tensor:
    """The trainable (unparametrized) weight of a layer."""
    if parametrize.is_parametrized(layer, "weight"):
        return layer.parametrizations.weight.original
    return layer.weight


def parametrizations_of(layer: nn.Module) -> list[nn.Module]:
    """The parametrization modules registered on ``layer.weight`` (empty if none)."""
    if parametrize.is_parametrized(layer, "weight"):
        return list(layer.parametrizations.weight)
    return []


def regularized_layers(module: nn.Module) -> list[tuple[str, nn.Module]]:
    """Layers of ``module`` whose weight carries a parametrization, in registration order."""
    return [(n, m) for n, m in module.named_modules()
            if parametrize.is_parametrized(m, "weight")]


def no_autocast(device_type: str):
    """Parametrizations compute in the weight's own dtype even under mixed precision."""
    return torch.autocast(device_type=device_type, enabled=False)
