"""What the spectral regularizers share: registering a parametrization on every weight layer,
the power-iteration step, and checks of their Configs.

    layers = parametrize_layers(module, lambda layer, w: SpectralNormWeight(w), "sn")

A regularizer's Config checks its values with the attrs validators below; a bad value raises
:class:`RegularizerConfigError`, a :class:`core.errors.SpecregError` (and a ``ValueError``, so the
recipe loader reports it next to the key it came from).
"""

from __future__ import annotations

import math
from typing import Any, Callable, Iterable

import attrs
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from core.errors import SpecregError
from core.layers import LAYER_TYPES, frozen_state, weight_layers

__all__ = ["RegularizerConfigError", "parametrize_layers", "power_step", "check_positive_int",
           "check_nonnegative_int", "check_positive_number", "check_fraction", "check_layer_names",
           "check_choice"]


class RegularizerConfigError(SpecregError, ValueError):
    """A regularizer's Config holds a value it cannot work with."""


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _fail(owner: str, message: str) -> None:
    raise RegularizerConfigError(f"regularizer '{owner}': {message}")


# Each check_* returns an attrs validator for a Config field; ``owner`` is the regularizer's name.

def check_positive_int(owner: str) -> Callable[[Any, attrs.Attribute, Any], None]:
    def check(_instance: Any, attribute: attrs.Attribute, value: Any) -> None:
        if not (_is_int(value) and value >= 1):
            _fail(owner, f"{attribute.name} must be an integer >= 1, got {value!r}")
    return check


def check_nonnegative_int(owner: str) -> Callable[[Any, attrs.Attribute, Any], None]:
    def check(_instance: Any, attribute: attrs.Attribute, value: Any) -> None:
        if not (_is_int(value) and value >= 0):
            _fail(owner, f"{attribute.name} must be an integer >= 0, got {value!r}")
    return check


def check_positive_number(owner: str) -> Callable[[Any, attrs.Attribute, Any], None]:
    def check(_instance: Any, attribute: attrs.Attribute, value: Any) -> None:
        if not (_is_number(value) and 0 < value < math.inf):
            _fail(owner, f"{attribute.name} must be a positive number, got {value!r}")
    return check


def check_fraction(owner: str) -> Callable[[Any, attrs.Attribute, Any], None]:
    def check(_instance: Any, attribute: attrs.Attribute, value: Any) -> None:
        if not (_is_number(value) and 0 < value <= 1):
            _fail(owner, f"{attribute.name} must be a number in (0, 1], got {value!r}")
    return check


def check_choice(owner: str, choices: Iterable[Any]) -> Callable[[Any, attrs.Attribute, Any], None]:
    choices = tuple(choices)

    def check(_instance: Any, attribute: attrs.Attribute, value: Any) -> None:
        if value not in choices:
            _fail(owner, f"{attribute.name} = {value!r} is not valid; valid values: "
                  + ", ".join(repr(c) for c in choices))
    return check


def check_layer_names(owner: str) -> Callable[[Any, attrs.Attribute, Any], None]:
    """A non-empty list of distinct names from :data:`core.layers.LAYER_TYPES`."""
    def check(_instance: Any, attribute: attrs.Attribute, names: Any) -> None:
        valid = ", ".join(repr(n) for n in LAYER_TYPES)
        if isinstance(names, str) or not isinstance(names, (list, tuple)) or not names:
            _fail(owner, f"{attribute.name} must be a non-empty list of layer types from {valid}, "
                  f"got {names!r}")
        unknown = [n for n in names if n not in LAYER_TYPES]
        if unknown:
            _fail(owner, f"unknown layer type(s) {', '.join(repr(n) for n in unknown)} in "
                  f"{attribute.name}; valid layer types: {valid}")
        if len(set(names)) != len(names):
            _fail(owner, f"{attribute.name} lists a layer type twice: {list(names)!r}")
    return check


def parametrize_layers(module: nn.Module, make: Callable[[nn.Module, torch.Tensor], nn.Module],
                       owner: str) -> list[tuple[str, nn.Module]]:
    """Register ``make(layer, weight)`` as the parametrization of the ``weight`` of ``module``
    and of every Conv2d/Linear/Embedding in it; returns the ``(name, layer)`` pairs.

    Registration runs inside :func:`core.layers.frozen_state`, so the check forward pass
    that :func:`torch.nn.utils.parametrize.register_parametrization` makes updates no state.
    A layer that is already parametrized is an error (a network is regularized once).
    """
    layers = list(weight_layers(module))
    taken = [name or "(the module itself)" for name, layer in layers
             if parametrize.is_parametrized(layer, "weight")]
    if taken:
        raise RegularizerConfigError(
            f"regularizer '{owner}': these layers' weights are already parametrized (is a "
            f"regularizer or torch's spectral_norm applied twice?): {', '.join(taken)}")
    with frozen_state():
        for _, layer in layers:
            parametrize.register_parametrization(layer, "weight",
                                                 make(layer, layer.weight.detach()))
    return layers


@torch.no_grad()
def power_step(matrix: torch.Tensor, u: torch.Tensor, v: torch.Tensor, eps: float,
               steps: int = 1) -> None:
    """Power iteration for the top singular pair of ``matrix``, in place:
    ``u <- normalize(W v)``, then ``v <- normalize(W^T u)`` (Miyato et al. 2018, Algorithm 1).

    In place, so that module replicas sharing the buffers' storage see the update.
    """
    for _ in range(steps):
        F.normalize(torch.mv(matrix, v), dim=0, eps=eps, out=u)
        F.normalize(torch.mv(matrix.mH, u), dim=0, eps=eps, out=v)
