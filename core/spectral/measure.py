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

from core.regularizer import frozen_state, parametrizations_of, raw_weight, weight_layers, \
    weight_matrix

__all__ = ["LayerInfo", "LayerSpectrum", "monitored_layers", "reading_weights",
           "effective_weight", "measure_layer", "power_iteration_sigma", "summarize",
           "SUMMARY_KEYS", "ABOVE"]

#: ``frac_above`` counts normalized singular values above this (a "large" singular value).
ABOVE = 0.1
#: the per-layer summaries, in the order they are logged.
SUMMARY_KEYS = ("s1", "mass", "stable_rank", "frac_above_0.1", "sigma_ratio")


@attrs.frozen
class LayerInfo:
    """One monitored layer: ``key`` is the paper's name (``layer_3``), ``module`` its path."""

    index: int
    module: str
    kind: str  # "Conv2d", "Linear", "Embedding"
    shape: tuple[int, ...]  # of the weight tensor

    @property
    def key(self) -> str:
        return f"layer_{self.index}"

    @property
    def rank(self) -> int:
        """Number of singular values of the weight matrix (SPEC §1: ``min(out, in*kh*kw)``)."""
        return min(self.shape[0], math.prod(self.shape[1:]))

    @property
    def is_1x1(self) -> bool:
        """A 1x1 convolution: the ResNets' shortcuts (layer_2, layer_5 of resnet32)."""
        return self.kind == "Conv2d" and tuple(self.shape[2:]) == (1, 1)

    @property
    def title(self) -> str:
        """``"b1.c1 Conv2d 128x3x3x3"``: how the record file names the layer."""
        return f"{self.module or '<root>'} {self.kind} {'x'.join(map(str, self.shape))}"

    @classmethod
    def from_title(cls, index: int, title: str) -> "LayerInfo":
        module, kind, shape = title.split(" ")
        return cls(index, "" if module == "<root>" else module, kind,
                   tuple(int(n) for n in shape.split("x")))


def monitored_layers(model: nn.Module) -> list[tuple[LayerInfo, nn.Module]]:
    """Every Conv2d, Linear and Embedding of ``model`` in registration order (= forward order for
    our architectures: resnet32's ten convolutions are layer_0..layer_9, its Linear layer_10)."""
    out = []
    for i, (name, layer) in enumerate(weight_layers(model)):
        shape = tuple(raw_weight(layer).shape)
        out.append((LayerInfo(i, name, type(layer).__name__, shape), layer))
    return out


def _native(module: nn.Module) -> bool:
    """A parametrization from torch itself: it ignores :func:`frozen_state` (torch's
    ``spectral_norm`` runs its power iteration in every training-mode evaluation)."""
    return type(module).__module__.startswith("torch.")


@contextlib.contextmanager
def reading_weights(model: nn.Module) -> Iterator[None]:
    """Read effective weights without touching anything: no gradient, regularizer state frozen
    (:func:`core.regularizer.frozen_state`); torch's own parametrizations, which do not know that
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


def measure_layer(layer: nn.Module) -> LayerSpectrum:
    """Exact float64 SVDs on the CPU (call inside :func:`reading_weights`)."""
    effective = effective_weight(layer).detach().to("cpu", torch.float64)
    s = torch.linalg.svdvals(effective).numpy()
    raw = weight_matrix(raw_weight(layer)).detach().to("cpu", torch.float64)
    s1_raw = float(torch.linalg.matrix_norm(raw, ord=2)) \
        if parametrize.is_parametrized(layer, "weight") else float(s[0])
    return LayerSpectrum(s, power_iteration_sigma(layer), s1_raw)


def summarize(singular_values: np.ndarray, sigma_pi: float = math.nan,
              s1_raw: float = math.nan) -> dict[str, float]:
    """Per-layer summaries of a spectrum ``s`` (descending):

    - ``s1``: the largest singular value (1 under exact SN);
    - ``mass``: the *spectral mass* ``mean_j s_j / s1`` -- the area under the paper's curves
      (Figures 2-3); it falls when "a large number of singular values drop" (spectral collapse);
    - ``stable_rank``: ``sum_j s_j^2 / s1^2``;
    - ``frac_above_0.1``: the share of ``s_j / s1`` above 0.1;
    - ``sigma_ratio``: power-iteration sigma / exact s1 of the raw weight (<= 1; how far SN's
      estimate lags behind), NaN without a power iteration.
    """
    s = np.asarray(singular_values, dtype=np.float64)
    s1 = float(s[0]) if s.size else math.nan
    if not (s1 > 0 and math.isfinite(s1)):
        return {"s1": s1, "mass": math.nan, "stable_rank": math.nan, "frac_above_0.1": math.nan,
                "sigma_ratio": math.nan}
    ratio = s / s1
    return {
        "s1": s1,
        "mass": float(ratio.mean()),
        "stable_rank": float((ratio ** 2).sum()),
        "frac_above_0.1": float((ratio > ABOVE).mean()),
        "sigma_ratio": sigma_pi / s1_raw if s1_raw > 0 else math.nan,
    }
