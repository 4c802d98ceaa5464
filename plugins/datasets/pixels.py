"""Pixel operations shared by the image datasets: center-square crop + resize with a named filter.

Every image dataset turns a decoded PIL image into a ``uint8 [R, R, 3]`` array with
:func:`square_crop_resize`, and that array into the network's input with
:func:`core.prepared.to_float` (``p / 127.5 - 1``). The prepared arrays of :mod:`core.prepared`
store exactly the ``uint8`` arrays, so the prepared path and the decode-on-the-fly path give
bit-identical tensors.

The resize filters (a dataset's ``resize_filter``), named for the code they reproduce:

- ``"bicubic"`` (the default): PIL's bicubic over the centered square (antialiased when it
  shrinks: the kernel widens with the scale factor). Our choice where no paper's code decides.
- ``"bilinear"``: PIL's bilinear, antialiased the same way. What ``scipy.misc.imresize(x, size,
  "bilinear")`` does (it calls PIL's ``resize``): the SN-GAN and SR ImageNet loaders
  (pfnet-research/sngan_projection and max-liu-112/SRGANs, ``datasets/imagenet.py``).
- ``"cv2-linear"``: bilinear *sampling* without antialiasing, as ``cv2.resize(x, (R, R))`` with
  its default ``INTER_LINEAR`` (half-pixel centres, edge pixels repeated, rounded half up): the
  BSSN authors' preprocessing (fjxmlzn/BSN ``dataset_preprocess/*/preprocess.py``). Like their
  NumPy slicing, its square crop starts at whole pixels (``(h - side) // 2``); the PIL filters
  crop the exact centre (fractional corners). Computed here in float64 without OpenCV; OpenCV
  rounds its fixed-point weights, so single pixels may differ from it by one level.

    arr = square_crop_resize(pil_image, 128)                      # uint8 [128, 128, 3], bicubic
    arr = square_crop_resize(pil_image, 48, resize_filter="cv2-linear")
"""

from __future__ import annotations

import numpy as np
from PIL import Image

#: resize filter name -> how the protocol files and error messages name the resize. The
#: default's text is the one prepared arrays have always recorded (they stay valid).
RESIZE_FILTERS: dict[str, str] = {
    "bicubic": "PIL bicubic (antialiased) of the centered square crop",
    "bilinear": "PIL bilinear (antialiased) of the centered square crop",
    "cv2-linear": "bilinear sampling without antialiasing (cv2.resize INTER_LINEAR) of the "
                  "centered square crop at whole pixels",
}
DEFAULT_FILTER = "bicubic"
_PIL_FILTERS = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR}


def center_box(width: int, height: int, side: float) -> tuple[float, float, float, float]:
    """The ``side x side`` box centered in a ``width x height`` image (float corners, no rounding)."""
    if side > min(width, height):
        raise ValueError(f"a {side}x{side} center crop does not fit in a {width}x{height} image")
    left = (width - side) / 2.0
    top = (height - side) / 2.0
    return (left, top, left + side, top + side)


def square_crop_resize(image: Image.Image, resolution: int, crop: int | None = None,
                       resize_filter: str = DEFAULT_FILTER) -> np.ndarray:
    """``uint8 [R, R, 3]``: the centered ``crop x crop`` square (default: the shorter side),
    resized to ``R x R`` with ``resize_filter`` (a key of :data:`RESIZE_FILTERS`) in one step.

    With the default crop this is "resize the shorter side to R, then center-crop R x R" (the
    SN-GAN / BigGAN ImageNet protocol), without rounding the longer side to whole pixels first.
    An image that is already ``R x R`` and not cropped is returned as it is, whatever the filter.
    """
    if resize_filter not in RESIZE_FILTERS:
        raise ValueError(f"unknown resize filter {resize_filter!r}; valid: "
                         f"{', '.join(RESIZE_FILTERS)}")
    image = image.convert("RGB")
    width, height = image.size
    side = min(width, height) if crop is None else crop
    if side == width == height == resolution:
        return np.array(image, dtype=np.uint8)
    box = center_box(width, height, side)
    if resize_filter == "cv2-linear":
        top, left = (height - side) // 2, (width - side) // 2
        square = np.asarray(image, dtype=np.uint8)[top:top + side, left:left + side]
        return linear_resize(square, resolution)
    resized = image.resize((resolution, resolution), _PIL_FILTERS[resize_filter], box=box)
    return np.array(resized, dtype=np.uint8)  # a writable copy


def _taps(size_in: int, size_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For each output index: the two input indices and the weight of the second (cv2's rule:
    source coordinate ``(i + 0.5) * in / out - 0.5``, clamped to the edge pixels)."""
    scale = size_in / size_out
    x = (np.arange(size_out, dtype=np.float64) + 0.5) * scale - 0.5
    low = np.floor(x)
    frac = x - low
    low = low.astype(np.int64)
    frac[low < 0] = 0.0
    low = np.clip(low, 0, size_in - 1)
    high = np.minimum(low + 1, size_in - 1)
    frac[low >= size_in - 1] = 0.0
    return low, high, frac


def linear_resize(pixels: np.ndarray, resolution: int) -> np.ndarray:
    """``uint8 [h, w, 3]`` -> ``uint8 [R, R, 3]`` by bilinear sampling at half-pixel centres, no
    antialiasing, rounded half up: ``cv2.resize(pixels, (R, R))`` (``INTER_LINEAR``)."""
    h, w = pixels.shape[:2]
    y0, y1, fy = _taps(h, resolution)
    x0, x1, fx = _taps(w, resolution)
    p = pixels.astype(np.float64)
    rows = p[y0] * (1.0 - fy)[:, None, None] + p[y1] * fy[:, None, None]  # [R, w, 3]
    out = rows[:, x0] * (1.0 - fx)[None, :, None] + rows[:, x1] * fx[None, :, None]
    return np.clip(np.floor(out + 0.5), 0, 255).astype(np.uint8)
