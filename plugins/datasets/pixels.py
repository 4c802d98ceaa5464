"""Pixel operations shared by the image datasets: center-square crop + resize, uint8 -> [-1, 1].

Every image dataset turns a decoded PIL image into a ``uint8 [R, R, 3]`` array with
:func:`square_crop_resize`, and that array into the network's input with :func:`to_float`. The
prepared arrays of :mod:`plugins.datasets.prepared` store exactly the ``uint8`` arrays, so the
prepared path and the decode-on-the-fly path give bit-identical tensors.

    arr = square_crop_resize(pil_image, 128)          # uint8 [128, 128, 3]
    x = to_float(torch.from_numpy(arr))               # float32 [3, 128, 128] in [-1, 1]
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

#: the resampling filter of every resize (PIL's bicubic is antialiased when it shrinks).
RESAMPLE = Image.Resampling.BICUBIC
#: how the protocol files and error messages name the resize.
RESIZE_METHOD = "PIL bicubic (antialiased) of the centered square crop"


def center_box(width: int, height: int, side: float) -> tuple[float, float, float, float]:
    """The ``side x side`` box centered in a ``width x height`` image (float corners, no rounding)."""
    if side > min(width, height):
        raise ValueError(f"a {side}x{side} center crop does not fit in a {width}x{height} image")
    left = (width - side) / 2.0
    top = (height - side) / 2.0
    return (left, top, left + side, top + side)


def square_crop_resize(image: Image.Image, resolution: int, crop: int | None = None) -> np.ndarray:
    """``uint8 [R, R, 3]``: the centered ``crop x crop`` square (default: the shorter side),
    resized to ``R x R`` with :data:`RESAMPLE` in one resampling step.

    With the default crop this is "resize the shorter side to R, then center-crop R x R" (the
    SN-GAN / BigGAN ImageNet protocol), without rounding the longer side to whole pixels first.
    An image that is already ``R x R`` and not cropped is returned as it is.
    """
    image = image.convert("RGB")
    width, height = image.size
    side = min(width, height) if crop is None else crop
    if side == width == height == resolution:
        return np.array(image, dtype=np.uint8)
    box = center_box(width, height, side)
    resized = image.resize((resolution, resolution), RESAMPLE, box=box)
    return np.array(resized, dtype=np.uint8)  # a writable copy


def to_float(pixels: torch.Tensor) -> torch.Tensor:
    """``uint8 [..., H, W, 3]`` -> ``float32 [..., 3, H, W]`` with 0 -> -1 and 255 -> 1.

    The result is a channels-first *view* of a channels-last buffer: the arithmetic runs on the
    contiguous pixels (fast), and batching with ``torch.stack`` (the DataLoader's collate) makes
    the one copy that lays it out contiguously. Call ``.contiguous()`` before ``.view``.
    """
    return pixels.float().div_(127.5).sub_(1.0).movedim(-1, -3)
