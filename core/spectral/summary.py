"""Per-layer spectral summaries and layer descriptions, free of torch (the plots use them).

    summarize(s)   # {"s1", "mass", "stable_rank", "frac_above_0.1", "sigma_ratio"}
"""

from __future__ import annotations

import math

import attrs
import numpy as np

__all__ = ["LayerInfo", "summarize", "SUMMARY_KEYS", "ABOVE"]

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
