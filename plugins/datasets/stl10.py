"""STL-10 (SR paper group E; Lin et al. 2021): the 100,000 unlabeled 96x96 images, resized.

Files: ``<root>/stl10/stl10_binary/{train_X.bin, train_y.bin, unlabeled_X.bin, test_X.bin,
test_y.bin}``, read by :class:`torchvision.datasets.STL10` and downloaded by it from
http://ai.stanford.edu/~acoates/stl10/stl10_binary.tar.gz (2.6 GB) when ``download`` is true.
torchvision reads all 2.7 GB of ``unlabeled_X.bin`` into memory; ``python -m core.prepare stl10
--resolution 32`` writes a 300 MB prepared array that training memory-maps instead.

The ``train`` split is torchvision's ``source_split`` (default ``unlabeled``, as both papers),
``test`` is the 8,000 labeled test images. Images are resized from 96x96 to ``resolution`` with
``resize_filter`` (default PIL's antialiased bicubic; the BSSN authors' cv2.resize is
``"cv2-linear"``): 32 in the SR paper (App., "compressed to 32x32"), 48 in Lin et al. 2021
(App. H.1). Used unconditionally: every label is 0.

    [dataset]
    name = "stl10"
    resolution = 48
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import attrs

from core.errors import SpecregError
from core.hookspecs import hookimpl
from plugins.datasets.archives import open_archive_dataset
from core.validators import one_of
from plugins.datasets.base import (ImageDataset, ResizedSource, resize_filter_check,
                                   resolution_check, unconditional)

_SOURCE_SPLITS = ("unlabeled", "train+unlabeled", "train")


class Stl10(ImageDataset):
    """STL-10 through torchvision, resized to ``resolution``; unconditional."""

    folder = "stl10"
    splits = ("train", "test")

    @attrs.define
    class Config:
        #: download with torchvision when the files are missing.
        download: bool = True
        #: 32 (SR paper) or 48 (Lin et al. 2021).
        resolution: int = attrs.field(default=32, validator=resolution_check)
        #: which of torchvision's splits is our ``train``: unlabeled, train+unlabeled, train.
        source_split: str = attrs.field(default="unlabeled", validator=one_of(_SOURCE_SPLITS))
        #: how images are resized: "bicubic" (PIL, our default), "bilinear" (PIL; SN-GAN/SR
        #: ImageNet code) or "cv2-linear" (cv2.resize; BSSN code). See plugins.datasets.pixels.
        resize_filter: str = attrs.field(default="bicubic", validator=resize_filter_check)
        #: feed D x/128 - 1 + U(0, 1/128) (the SN-GAN/SR Chainer loaders) instead of x/127.5 - 1.
        dequantize: bool = False
        #: read ``prepared_<split>_<R>.npy`` when ``python -m core.prepare`` has written it.
        prepared: bool = True

    def protocol(self, split: str) -> dict[str, Any]:
        protocol = super().protocol(split)
        protocol["source_split"] = self._torchvision_split(split)
        return protocol

    def _torchvision_split(self, split: str) -> str:
        if split == "test":
            return "test"
        if self.config.source_split not in _SOURCE_SPLITS:
            raise SpecregError(f"stl10: source_split must be one of {', '.join(_SOURCE_SPLITS)}, "
                               f"not {self.config.source_split!r}")
        return self.config.source_split

    def source(self, root: Path, split: str) -> ResizedSource:
        tv_split = self._torchvision_split(split)
        from torchvision.datasets import STL10 as cls  # here: registering stays cheap

        data = open_archive_dataset(
            cls, self.data_folder(root), download=self.config.download,
            load=lambda folder: cls(str(folder), split=tv_split, download=False),
            fetch=lambda tmp: cls(str(tmp), split="test", download=True),
            name=self.display_name, title="STL-10", prepare=self.prepare_command(root, split))
        return ResizedSource(data, self.resolution, label=unconditional,
                             resize_filter=self.resize_filter)


@hookimpl
def register_datasets(register) -> None:
    register("stl10", Stl10)
