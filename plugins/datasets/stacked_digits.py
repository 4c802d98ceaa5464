"""Stacked digits: the embedded 1000-mode data set of SPEC §5, built from scikit-learn's bundled digits.

Three independent 8x8 digits (scikit-learn's ``load_digits``, values 0..16) are scaled to [-1, 1],
upscaled x4 (nearest) to 32x32 (``resolution = 32``, the default; 16 and the digits' own 8 are
offered for small models) and stacked as the R, G and B channels: 10^3 = 1000 modes, the
Stacked-MNIST protocol of PacGAN/VEEGAN on data that ships with scikit-learn (no download).
The label of an image is ``100 * d_R + 10 * d_G + d_B``.

The 1797 bundled digits are split once, deterministically and stratified by class, into a
``train`` pool (80%) and a held-out ``test`` pool; a split's images only use digits of its pool.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import attrs
import numpy as np
import torch
import torch.nn.functional as F

from core.hookspecs import hookimpl
from core.interfaces import Dataset
from core.validators import int_in, one_of, positive_int

#: upscaling factor from the 8x8 digits to the (default) 32x32 images.
UPSCALE = 4
RESOLUTION = 8 * UPSCALE
#: the image sizes offered: the digits' own 8x8, and nearest upscales x2 and x4.
RESOLUTIONS = (8, 16, 32)
NUM_MODES = 1000
_SPLIT_SEED = 20190829  # fixed: the train/test pools never change between runs
_TEST_SHARE = 0.2


@lru_cache(maxsize=2)
def digit_pool(split: str) -> tuple[np.ndarray, np.ndarray]:
    """``(images float32 [N, 8, 8] in [0, 1], labels int64 [N])`` of one split's digit pool."""
    if split not in {"train", "test"}:
        raise ValueError(f"stacked_digits has splits 'train' and 'test', not {split!r}")
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = (digits.images / 16.0).astype(np.float32)
    labels = digits.target.astype(np.int64)
    rng = np.random.default_rng(_SPLIT_SEED)
    test_mask = np.zeros(len(labels), dtype=bool)
    for c in range(10):
        idx = np.flatnonzero(labels == c)
        rng.shuffle(idx)
        test_mask[idx[: int(round(len(idx) * _TEST_SHARE))]] = True
    mask = test_mask if split == "test" else ~test_mask
    return images[mask], labels[mask]


def render(digits01: torch.Tensor, resolution: int = RESOLUTION) -> torch.Tensor:
    """``[N, 3, 8, 8]`` digits in [0, 1] -> ``[N, 3, R, R]`` images in [-1, 1] (nearest)."""
    scale = resolution // 8
    images = digits01 * 2.0 - 1.0
    return images if scale == 1 else F.interpolate(images, scale_factor=scale, mode="nearest")


def downsample(images: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`render`: ``[N, 3, R, R]`` in [-1, 1] (R a multiple of 8) -> ``[N, 3, 8,
    8]`` in [0, 1], each pixel the mean of its ``R/8 x R/8`` block."""
    factor = images.shape[-1] // 8
    if images.shape[-1] != 8 * factor or images.shape[-2] != images.shape[-1] or factor < 1:
        raise ValueError(f"stacked digits are square with a side a multiple of 8; got "
                         f"{tuple(images.shape[-2:])}")
    pooled = images if factor == 1 else F.avg_pool2d(images, factor)
    return (pooled + 1.0) / 2.0


class StackedDigitsData(torch.utils.data.Dataset):
    """``num_samples`` stacked-digit images, fixed by ``seed``: item ``i`` is the same every time."""

    def __init__(self, split: str, num_samples: int, seed: int,
                 resolution: int = RESOLUTION) -> None:
        images, labels = digit_pool(split)
        rng = np.random.default_rng(seed + (0 if split == "train" else 1))
        picks = rng.integers(0, len(labels), size=(num_samples, 3))
        self.images = render(torch.from_numpy(images[picks]), resolution)  # [N, 3, R, R]
        digits = labels[picks]
        self.labels = torch.from_numpy(100 * digits[:, 0] + 10 * digits[:, 1] + digits[:, 2])

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.images[index], int(self.labels[index])


class StackedDigits(Dataset):
    """SPEC §5 stacked digits: 32x32x3 (or 16x16, 8x8), 1000 modes, built in memory (no files,
    no download)."""

    @attrs.define
    class Config:
        #: images in the training split (the test split has a fifth of this).
        num_samples: int = attrs.field(default=50_000, validator=positive_int)
        #: which digits are stacked into which image.
        seed: int = attrs.field(default=0, validator=int_in(0, 2**32 - 1))
        #: image side: 32 (SPEC §5), 16 or 8 (the digits' own size: for small, fast models).
        resolution: int = attrs.field(default=RESOLUTION, validator=one_of(RESOLUTIONS))

    @property
    def resolution(self) -> int:
        return self.config.resolution

    def build(self, root: Path, split: str = "train") -> StackedDigitsData:
        n = self.config.num_samples if split == "train" else max(1, self.config.num_samples // 5)
        return StackedDigitsData(split, n, self.config.seed, self.config.resolution)


@hookimpl
def register_datasets(register) -> None:
    register("stacked_digits", StackedDigits)
