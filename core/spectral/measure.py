"""Measuring a discriminator's spectra: effective weights, their singular values, summaries.

The SR paper (Liu et al. 2019, Sec. II-C) monitors "all singular values of W_SN(W) in the
discriminator": the *effective* weight each layer's forward pass uses (W / sigma for SN), as a
matrix ``W.reshape(out, -1)`` (SPEC §1), layers numbered ``layer_0, layer_1, ...`` in forward
order. Reading a parametrized ``layer.weight`` in training mode would run a power-iteration step,
so :func:`reading_weights` freezes regularizer state while we look.

    layers = monitored_layers(D)
    with reading_weights(D):
        spectra = [measure_layer(layer) for _, layer in layers]
    summary = summarize(spectra[0].singular_values)   # s1, mass, stable_rank, frac_above_0.1
"""

from __future__ import annotations

import contextlib
import math
from typing import Iterator

import attrs
import numpy as np
import torch
from torch import nn
from torch.nn.utils import parametrize

from core import svd
from core.layers import (LAYER_TYPES, frozen_state, parametrizations_of, raw_weight,
                         weight_layers, weight_matrix)
from core.spectral.summary import ABOVE, SUMMARY_KEYS, LayerInfo, summarize

__all__ = ["LayerInfo", "LayerSpectrum", "monitored_layers", "reading_weights",
           "effective_weight", "singular_values", "measure_layer", "power_iteration_sigma",
           "summarize", "SUMMARY_KEYS", "ABOVE"]


def monitored_layers(model: nn.Module) -> list[tuple[LayerInfo, nn.Module]]:
    """Every Conv2d, Linear and Embedding of ``model`` in registration order (= forward order for
    our architectures: resnet32's ten convolutions are layer_0..layer_9, its Linear layer_10)."""
    out = []
    for i, (name, layer) in enumerate(weight_layers(model)):
        shape = tuple(raw_weight(layer).shape)
        out.append((LayerInfo(i, name, _kind(layer), shape), layer))
    return out


def _kind(layer: nn.Module) -> str:
    """``Conv2d``/``Linear``/``Embedding`` (parametrize renames the class ``ParametrizedConv2d``
    and so on)."""
    return next((t.__name__ for t in LAYER_TYPES.values() if isinstance(layer, t)),
                type(layer).__name__)


def _native(module: nn.Module) -> bool:
    """A parametrization from torch itself: it ignores :func:`frozen_state` (torch's
    ``spectral_norm`` runs its power iteration in every training-mode evaluation)."""
    return type(module).__module__.startswith("torch.")


@contextlib.contextmanager
def reading_weights(model: nn.Module) -> Iterator[None]:
    """Read effective weights without touching anything: no gradient, regularizer state frozen
    (:func:`core.layers.frozen_state`); torch's own parametrizations, which do not know that
    switch, are put in eval mode for the duration. Nothing else changes mode."""
    switched = [p for _, layer in weight_layers(model) for p in parametrizations_of(layer)
                if _native(p) and p.training]
    for p in switched:
        p.training = False
    try:
        with torch.no_grad(), frozen_state():
            yield
    finally:
        for p in switched:
            p.training = True


def effective_weight(layer: nn.Module) -> torch.Tensor:
    """The weight the forward pass uses, as the SPEC §1 matrix (call inside
    :func:`reading_weights`)."""
    return weight_matrix(layer.weight)


def power_iteration_sigma(layer: nn.Module) -> float:
    """The power-iteration estimate ``u^T W v`` of the raw weight's spectral norm (Miyato et al.
    2018, Alg. 1) from a parametrization's persistent ``_u``/``_v``; NaN if the layer has none."""
    if not parametrize.is_parametrized(layer, "weight"):
        return math.nan
    W = weight_matrix(raw_weight(layer)).detach().double()
    for p in parametrizations_of(layer):
        u, v = getattr(p, "_u", None), getattr(p, "_v", None)
        if isinstance(u, torch.Tensor) and isinstance(v, torch.Tensor) \
                and u.shape == W.shape[:1] and v.shape == W.shape[1:]:
            return float(torch.dot(u.double(), W @ v.double()))
    return math.nan


@attrs.frozen
class LayerSpectrum:
    """Singular values of a layer's effective weight (descending, float64) and, to judge the
    power iteration, its sigma estimate next to the exact s1 of the raw weight."""

    singular_values: np.ndarray
    sigma_pi: float
    s1_raw: float


def singular_values(matrix: torch.Tensor) -> np.ndarray:
    """All singular values of a 2-D matrix, descending, exact in float64 (NaN if it holds a
    non-finite value): :func:`core.svd.singular_values`, the Gram route with LAPACK below its
    trust threshold :data:`core.svd.TRUSTED`, as a numpy array."""
    return svd.singular_values(matrix).numpy()


def measure_layer(layer: nn.Module) -> LayerSpectrum:
    """Exact float64 spectra (call inside :func:`reading_weights`)."""
    effective = effective_weight(layer).detach().to(torch.float64)
    s = singular_values(effective)
    if not parametrize.is_parametrized(layer, "weight"):
        return LayerSpectrum(s, math.nan, float(s[0]))
    raw = weight_matrix(raw_weight(layer)).detach().to(torch.float64)
    # SN and its kin use W / c: then s1(W) = c * s1(W / c), no second decomposition needed
    c = float((raw * effective).sum() / (effective * effective).sum().clamp_min(1e-300))
    if math.isfinite(c) and float((raw - c * effective).norm()) <= 1e-5 * float(raw.norm()):
        s1_raw = c * float(s[0])
    else:
        s1_raw = float(singular_values(raw)[0])
    return LayerSpectrum(s, power_iteration_sigma(layer), s1_raw)
