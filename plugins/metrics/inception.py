"""The one Inception network and preprocessing path behind ``fid`` and ``is`` (SPEC §5).

The network is the TorchScript Inception-v3 that clean-fid uses (a direct translation of the
2015-12-05 TensorFlow graph, published with StyleGAN2-ADA), run through clean-fid's own pieces:

- ``mode = "clean"``: each image, in [0, 255], is resized to 299x299 by clean-fid's resizer (PIL
  bicubic on float channels, no quantization), then clean-fid's ``InceptionV3W`` normalizes it and
  runs the network's ``layers`` to the 2048-d pool features.
- ``mode = "legacy_tensorflow"``: the image goes into the network at its own size and the
  network's built-in bilinear resize (the one the original TensorFlow code had) does the rest:
  the numbers old papers report.

FID uses the pool features; IS uses the network's logits, ``features @ output.weight.T`` without
the output bias, as the original IS code and StyleGAN2-ADA (``no_output_bias=True``) do.

Where the weights come from (first that is set): the metric's ``inception_weights`` recipe key,
the ``SPECREG_INCEPTION_WEIGHTS`` environment variable, ``<data_root>/.cache/inception/
inception-2015-12-05.pt``. A missing file is downloaded from clean-fid's URL (the metric's
``inception_url``, so a local mirror works too) into a temporary file that is renamed only when
complete; if that fails, :class:`core.errors.WeightsMissingError` says which file, from where,
and where to put it.

    extractor = inception_extractor(InceptionSettings(), data_root, device)
    features = extractor.features(images)        # images [N, 3, H, W] in [-1, 1] -> [N, 2048]
    logits = extractor.logits(features)          # -> [N, 1008]
    features = generated_features(context, extractor, 50_000, "fid")   # the generator's samples
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import os
import shutil
import urllib.request
from pathlib import Path
from typing import Any

import attrs
import numpy as np
import torch
from torch import nn

from core.errors import SpecregError, WeightsMissingError
from core.eval.runner import progress
from core.interfaces import EvaluationContext
from core.validators import one_of

__all__ = ["InceptionSettings", "InceptionExtractor", "inception_extractor", "resolve_weights",
           "ensure_weights", "file_sha256", "generated_features", "MODES", "WEIGHTS_ENV",
           "WEIGHTS_FILENAME", "CLEANFID_INCEPTION_URL"]

# clean-fid is imported where it is used (loading this module, e.g. to register ``fid``, must stay
# cheap and must not fail when clean-fid is broken).

#: clean-fid's URL of the weights (``cleanfid.downloads_helper.inception_url``; a test checks that
#: the two agree).
CLEANFID_INCEPTION_URL = ("https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/"
                          "metrics/inception-2015-12-05.pt")
#: environment variable naming the Inception weights file.
WEIGHTS_ENV = "SPECREG_INCEPTION_WEIGHTS"
#: the file name clean-fid downloads the network to.
WEIGHTS_FILENAME = "inception-2015-12-05.pt"
#: clean-fid's resize modes that use the TorchScript Inception.
MODES = ("clean", "legacy_tensorflow")
#: feature-network name recorded in protocols.
NETWORK_NAME = "inception-v3-torchscript"
_DOWNLOAD_TIMEOUT_S = 60


@attrs.define
class InceptionSettings:
    """Recipe keys shared by the Inception metrics (``fid``, ``is``)."""

    #: clean-fid resize mode: "clean" (default) or "legacy_tensorflow" (to compare with old papers).
    mode: str = attrs.field(default="clean", validator=one_of(MODES))
    #: the TorchScript weights file; empty = $SPECREG_INCEPTION_WEIGHTS, then
    #: <data_root>/.cache/inception/inception-2015-12-05.pt.
    inception_weights: str = ""
    #: where a missing weights file is downloaded from (clean-fid's URL; a mirror works too).
    inception_url: str = CLEANFID_INCEPTION_URL
    #: try to download a missing weights file (off: fail at once with instructions).
    download: bool = True


def check_mode(mode: str) -> None:
    if mode not in MODES:
        raise SpecregError(f"unknown resize mode {mode!r} for the Inception metrics; valid: "
                           + ", ".join(repr(m) for m in MODES))


def resolve_weights(configured: str, data_root: Path) -> Path:
    """The weights path: the recipe key, else $SPECREG_INCEPTION_WEIGHTS, else under data_root."""
    if configured:
        return Path(configured).expanduser()
    env = os.environ.get(WEIGHTS_ENV, "").strip()
    if env:
        return Path(env).expanduser()
    return Path(data_root) / ".cache" / "inception" / WEIGHTS_FILENAME


def _missing_message(path: Path, url: str, reason: str) -> str:
    return (f"the Inception network weights file is missing: {path}\n"
            f"{reason}\n"
            f"Download it on a machine with internet access from\n    {url}\n"
            f"and put it at {path}\n"
            f"or point to a copy with the recipe key `inception_weights = \"/path/to/"
            f"{WEIGHTS_FILENAME}\"` of the metric, or the environment variable {WEIGHTS_ENV}.")


def _download(url: str, dest: Path) -> None:
    """Fetch ``url`` to ``dest`` through a temporary file renamed only when complete."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    partial = dest.with_name(f".{dest.name}.{os.getpid()}.part")
    try:
        with urllib.request.urlopen(url, timeout=_DOWNLOAD_TIMEOUT_S) as response, \
                open(partial, "wb") as out:
            shutil.copyfileobj(response, out)
        os.replace(partial, dest)
    finally:
        partial.unlink(missing_ok=True)


def ensure_weights(path: Path, url: str = CLEANFID_INCEPTION_URL, download: bool = True) -> Path:
    """``path`` if it is a file; otherwise download it from ``url`` or raise WeightsMissingError."""
    if path.is_file():
        return path
    if not download:
        raise WeightsMissingError(_missing_message(path, url, "Downloading is switched off "
                                                               "(download = false)."))
    print(f"downloading the Inception weights from {url} to {path}", flush=True)
    try:
        _download(url, path)
    except Exception as exc:  # no network, HTTP error, disk full, ... : say what to do instead
        raise WeightsMissingError(_missing_message(
            path, url, f"Downloading it failed: {type(exc).__name__}: {exc}")) from exc
    return path


_SHA_CACHE: dict[tuple[str, int, int], str] = {}


def file_sha256(path: Path) -> str:
    """SHA-256 of a file's bytes (memoized on path, size and modification time)."""
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _SHA_CACHE:
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
        _SHA_CACHE[key] = digest.hexdigest()
    return _SHA_CACHE[key]


def _inception_from_file(path: Path, resize_inside: bool) -> nn.Module:
    """clean-fid's ``InceptionV3W`` (its ``forward`` unchanged), loaded from any file path.

    ``InceptionV3W.__init__`` only accepts a folder holding ``inception-2015-12-05.pt`` and may
    download into it; instead the instance gets the same attributes from the file we resolved.
    """
    from cleanfid.inception_torchscript import InceptionV3W

    network = InceptionV3W.__new__(InceptionV3W)
    nn.Module.__init__(network)
    network.base = torch.jit.load(str(path), map_location="cpu").eval()
    network.layers = network.base.layers
    network.resize_inside = resize_inside
    return network


class InceptionExtractor:
    """Pool features and logits of images in [-1, 1], through clean-fid's path for ``mode``."""

    def __init__(self, path: Path, mode: str, device: torch.device | str = "cpu") -> None:
        check_mode(mode)
        self.path = path
        self.mode = mode
        self.device = torch.device(device)
        self.sha256 = file_sha256(path)
        try:
            network = _inception_from_file(path, resize_inside=(mode == "legacy_tensorflow"))
        except Exception as exc:
            raise WeightsMissingError(
                f"the Inception weights file {path} could not be loaded as TorchScript "
                f"({type(exc).__name__}: {exc}); it may be corrupt or not clean-fid's network. "
                f"Replace it with a copy of {CLEANFID_INCEPTION_URL}") from exc
        if not hasattr(network.base, "output"):
            raise WeightsMissingError(f"{path} has no 'output' layer: it is not clean-fid's "
                                      f"TorchScript Inception ({CLEANFID_INCEPTION_URL})")
        self.network = network.to(self.device).eval()
        self._output_weight = network.base.output.weight.detach().float().cpu()
        from cleanfid.resize import build_resizer

        self._resize = build_resizer(mode)
        self._threads = max(1, min(8, torch.get_num_threads()))  # resize threads
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None

    # -- preprocessing: clean-fid's resizer on [0, 255] images ---------------------------------

    def prepare(self, images: torch.Tensor) -> torch.Tensor:
        """``[N, C, H, W]`` in [-1, 1] -> what the network takes: [0, 255], and for ``clean``
        resized to 299x299 by clean-fid's resizer, one image at a time."""
        if images.ndim != 4 or images.shape[1] not in (1, 3):
            raise SpecregError(f"the Inception metrics need images [N, 3, H, W] (or 1 channel), "
                               f"got shape {tuple(images.shape)}")
        if images.shape[1] == 1:
            images = images.repeat(1, 3, 1, 1)
        x = ((images.detach().float().cpu() + 1.0) * 127.5).clamp(0.0, 255.0)
        if self.mode == "legacy_tensorflow":  # the network resizes inside
            return x
        arrays = x.permute(0, 2, 3, 1).numpy()  # HWC, as clean-fid's resizer expects
        if self._threads > 1 and len(arrays) > 1:  # PIL releases the GIL while resizing
            if self._pool is None:
                self._pool = concurrent.futures.ThreadPoolExecutor(self._threads)
            resized = list(self._pool.map(self._resize, arrays))
        else:
            resized = [self._resize(a) for a in arrays]
        return torch.from_numpy(np.stack(resized).transpose(0, 3, 1, 2).copy())

    def features(self, images: torch.Tensor) -> np.ndarray:
        """2048-d pool features (float32) of images in [-1, 1]."""
        from cleanfid.fid import get_batch_features

        return get_batch_features(self.prepare(images), self.network, self.device)

    def logits(self, features: np.ndarray) -> np.ndarray:
        """The network's 1008 class logits from its pool features, without the output bias."""
        with torch.no_grad():
            return (torch.from_numpy(np.ascontiguousarray(features, dtype=np.float32))
                    @ self._output_weight.T).numpy()

    def protocol(self) -> dict[str, Any]:
        resize = ("PIL bicubic to 299x299 on float images (clean-fid 'clean')"
                  if self.mode == "clean" else
                  "bilinear inside the network (clean-fid 'legacy_tensorflow')")
        return {"resize_mode": self.mode, "resize": resize,
                "feature_network_name": NETWORK_NAME, "feature_network_file": str(self.path),
                "feature_network_sha256": self.sha256}


_EXTRACTORS: dict[tuple[str, str, str, str], InceptionExtractor] = {}


def inception_extractor(settings: InceptionSettings, data_root: Path,
                        device: torch.device | str = "cpu") -> InceptionExtractor:
    """The extractor for ``settings`` (weights resolved, downloaded if allowed), memoized."""
    check_mode(settings.mode)
    path = ensure_weights(resolve_weights(settings.inception_weights, data_root),
                          settings.inception_url, settings.download)
    key = (str(path.resolve()), file_sha256(path), settings.mode, str(torch.device(device)))
    if key not in _EXTRACTORS:
        _EXTRACTORS[key] = InceptionExtractor(path, settings.mode, device)
    return _EXTRACTORS[key]


def generated_features(context: EvaluationContext, extractor: InceptionExtractor,
                       num_samples: int, desc: str) -> np.ndarray:
    """Pool features of ``num_samples`` generated images (``context.features``), with a
    progress bar; shared by the metrics of one :func:`core.eval.runner.evaluate` call (FID and IS
    generate and embed the same samples once)."""
    name = f"inception:{extractor.sha256}:{extractor.mode}:{extractor.device}"
    bar = progress(num_samples, f"{desc}: generating + Inception features",
                   context.show_progress)
    chunks = []
    for features in context.features(name, extractor.features, num_samples):
        chunks.append(features)
        bar.update(len(features))
    bar.close()
    return np.concatenate(chunks)
