"""CIFAR-10 (SR paper groups A-D, SPEC §4): 50,000 training images, 32x32, through torchvision.

Files: ``<root>/cifar10/cifar-10-batches-py/{data_batch_1..5, test_batch, batches.meta}``, the
python version of the data set, downloaded by :class:`torchvision.datasets.CIFAR10` from
https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz when ``download`` is true (the default)
and checked against torchvision's md5 sums. Missing data that cannot be downloaded raises
:class:`core.errors.DataMissingError` saying which files, from where, to which folder.

Pixels are scaled to [-1, 1] (SR paper; Lin et al. 2021, App. H.1); ``dequantize = true`` feeds D
``x/128 - 1 + U(0, 1/128)`` as the SR authors' ``datasets/cifar10.py``. The SR paper trains
unconditionally, so ``num_classes`` is 0 unless ``conditional = true``; items always carry the
true class (0..9) as their label.

    [dataset]
    name = "cifar10"
    download = true
"""

from __future__ import annotations

from pathlib import Path

import attrs

from core.hookspecs import hookimpl
from plugins.datasets.archives import open_archive_dataset
from plugins.datasets.base import (ImageDataset, ResizedSource, resize_filter_check,
                                   resolution_check)


class Cifar10(ImageDataset):
    """CIFAR-10 through torchvision: ``train`` (50,000 images) and ``test`` (10,000)."""

    folder = "cifar10"
    splits = ("train", "test")

    @attrs.define
    class Config:
        #: download with torchvision when the files are missing.
        download: bool = True
        #: 32 is the native size; any other value resizes (with ``resize_filter``).
        resolution: int = attrs.field(default=32, validator=resolution_check)
        #: report 10 classes (class-conditional training) instead of 0.
        conditional: bool = False
        #: how images are resized: "bicubic" (PIL, our default), "bilinear" (PIL; SN-GAN/SR
        #: ImageNet code) or "cv2-linear" (cv2.resize; BSSN code). See plugins.datasets.pixels.
        resize_filter: str = attrs.field(default="bicubic", validator=resize_filter_check)
        #: feed D x/128 - 1 + U(0, 1/128) (the SN-GAN/SR Chainer loaders) instead of x/127.5 - 1.
        dequantize: bool = False
        #: read ``prepared_<split>_<R>.npy`` when ``python -m core.prepare`` has written it.
        prepared: bool = True

    @property
    def num_classes(self) -> int:
        return 10 if self.config.conditional else 0

    def source(self, root: Path, split: str) -> ResizedSource:
        train = split == "train"
        from torchvision.datasets import CIFAR10 as cls  # here: registering stays cheap

        data = open_archive_dataset(
            cls, self.data_folder(root), download=self.config.download,
            load=lambda folder: cls(str(folder), train=train, download=False),
            fetch=lambda tmp: cls(str(tmp), train=False, download=True),
            name=self.display_name, title="CIFAR-10", prepare=self.prepare_command(root, split))
        return ResizedSource(data, self.resolution, classes=list(data.classes),
                             resize_filter=self.resize_filter)


@hookimpl
def register_datasets(register) -> None:
    register("cifar10", Cifar10)
