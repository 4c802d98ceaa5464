"""What the spectral regularizers share: registering a parametrization on every weight layer,
the power-iteration step, and checks of their Configs.

    layers = parametrize_layers(module, lambda layer, w: SpectralNormWeight(w), "sn")

A regularizer's Config checks its values with the shared attrs validators of
:mod:`core.validators` (the ``check_*`` names below return them, for the Configs written against
them); a bad value raises :class:`core.validators.ConfigValueError`, which the recipe loader
reports with the key and the file it came from.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable

import attrs
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from core.errors import SpecregError
from core.layers import LAYER_TYPES, frozen_state, weight_layers
from core.validators import (Validator, fail, fraction, nonnegative_int, one_of, positive_int,
                             positive_number)

__all__ = ["RegularizerConfigError", "parametrize_layers", "power_step", "check_positive_int",
           "check_nonnegative_int", "check_positive_number", "check_fraction", "check_layer_names",
           "check_choice"]


class RegularizerConfigError(SpecregError, ValueError):
    """A regularizer's Config holds a value it cannot work with."""


# Each check_* returns the attrs validator of core.validators for a Config field (``owner``, the
# regularizer's name, is no longer needed: messages name the registered plugin themselves).

def check_positive_int(owner: str = "") -> Validator:
    """:func:`core.validators.positive_int`: an integer >= 1."""
    return positive_int


def check_nonnegative_int(owner: str = "") -> Validator:
    """:func:`core.validators.nonnegative_int`: an integer >= 0."""
    return nonnegative_int


def check_positive_number(owner: str = "") -> Validator:
    """:func:`core.validators.positive_number`: a finite number > 0."""
    return positive_number


def check_fraction(owner: str = "") -> Validator:
    """:data:`core.validators.fraction`: a number in (0, 1]."""
    return fraction


def check_choice(owner: str, choices: Iterable[Any]) -> Validator:
    """:func:`core.validators.one_of`."""
    return one_of(choices)


def check_layer_names(owner: str = "") -> Validator:
    """A non-empty list of distinct names from :data:`core.layers.LAYER_TYPES`."""
    def check(instance: Any, attribute: attrs.Attribute, names: Any) -> None:
        valid = ", ".join(repr(n) for n in LAYER_TYPES)
        if isinstance(names, str) or not isinstance(names, (list, tuple)) or not names:
            fail(instance, attribute, f"must be a non-empty list of layer types from {valid}, "
                 f"got {names!r}")
        unknown = [n for n in names if n not in LAYER_TYPES]
        if unknown:
            fail(instance, attribute, f"has unknown layer type(s) "
                 f"{', '.join(repr(n) for n in unknown)}; valid layer types: {valid}")
        if len(set(names)) != len(names):
            fail(instance, attribute, f"lists a layer type twice: {list(names)!r}")
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
