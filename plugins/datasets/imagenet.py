"""ImageNet (ILSVRC2012) at 128x128, class-conditional (SR paper settings E512-64, E2048-64).

Files, in :class:`torchvision.datasets.ImageFolder` layout (one folder per WordNet id)::

    <root>/imagenet/train/n01440764/n01440764_10026.JPEG   (1000 folders, 1,281,167 images)
    <root>/imagenet/val/n01440764/ILSVRC2012_val_00000293.JPEG   (optional, same layout)

There is no download (https://image-net.org requires an account); datasets/README.md says how to
unpack ``ILSVRC2012_img_train.tar`` into this layout. Each image is center-cropped to a square of
its shorter side and resized to ``resolution`` (= resize the shorter side, center crop) with
``resize_filter`` (default PIL bicubic; the SN-GAN/SR loaders' ``"bilinear"``, the BSSN authors'
``"cv2-linear"``). Labels are ImageFolder's class indices (the sorted WordNet ids: the standard 0..999).

Decoding 1.28 M JPEGs every epoch is slow; ``python -m core.prepare imagenet --resolution 128``
writes a 63 GB uint8 array once, which training then memory-maps.

    [dataset]
    name = "imagenet"
    resolution = 128
"""

from __future__ import annotations

from pathlib import Path

import attrs

from core.errors import DataMissingError, SpecregError
from core.hookspecs import hookimpl
from core.validators import nonnegative_int
from plugins.datasets.base import (ImageDataset, ResizedSource, resize_filter_check,
                                   resolution_check)

URL = "https://image-net.org/download-images.php"


class ImageNet(ImageDataset):
    """ILSVRC2012 in ImageFolder layout, center crops resized to ``resolution``."""

    folder = "imagenet"
    splits = ("train", "val")

    @attrs.define
    class Config:
        resolution: int = attrs.field(default=128, validator=resolution_check)
        #: the number of class folders expected (0: train unconditionally, any number of classes).
        num_classes: int = attrs.field(default=1000, validator=nonnegative_int)
        #: how images are resized: "bicubic" (PIL, our default), "bilinear" (PIL; SN-GAN/SR
        #: ImageNet code) or "cv2-linear" (cv2.resize; BSSN code). See plugins.datasets.pixels.
        resize_filter: str = attrs.field(default="bicubic", validator=resize_filter_check)
        #: feed D x/128 - 1 + U(0, 1/128) (the SN-GAN/SR Chainer loaders) instead of x/127.5 - 1.
        dequantize: bool = False
        #: read ``prepared_<split>_<R>.npy`` when ``python -m core.prepare`` has written it.
        prepared: bool = True

    @property
    def num_classes(self) -> int:
        return int(self.config.num_classes)

    def check_classes(self, classes: list[str], where: Path) -> None:
        if self.num_classes and len(classes) != self.num_classes:
            raise SpecregError(
                f"imagenet: found {len(classes)} class folders in {where}, but num_classes = "
                f"{self.num_classes}. A partly extracted ImageNet? Otherwise set num_classes = "
                f"{len(classes)} (or 0 for unconditional training) in the recipe's [dataset] table.")

    def missing(self, root: Path, split: str, problem: str) -> DataMissingError:
        where = self.data_folder(root) / split
        return DataMissingError(
            f"ImageNet ('{self.display_name}', split {split!r}): {problem}\n"
            f"Expected ImageFolder layout: one folder per class (WordNet id) holding its JPEGs:\n"
            f"  {where}/n01440764/n01440764_10026.JPEG\n"
            f"  {where}/n01443537/...            (1000 class folders)\n"
            f"ILSVRC2012 cannot be downloaded automatically: get ILSVRC2012_img_{split}.tar from "
            f"{URL} (free account) and unpack it as datasets/README.md describes.\n"
            f"Then (optional, much faster training) `{self.prepare_command(root, split)}`.")

    def source(self, root: Path, split: str) -> ResizedSource:
        where = self.data_folder(root) / split
        if not where.is_dir():
            raise self.missing(root, split, f"the folder {where} does not exist.")
        from torchvision.datasets import ImageFolder  # here: registering stays cheap

        try:
            data = ImageFolder(str(where))
        except FileNotFoundError as exc:  # no class folders, or a class folder without images
            raise self.missing(root, split, f"{where} is not in ImageFolder layout: {exc}") \
                from exc
        self.check_classes(list(data.classes), where)
        return ResizedSource(data, self.resolution, classes=list(data.classes),
                             resize_filter=self.resize_filter)


@hookimpl
def register_datasets(register) -> None:
    register("imagenet", ImageNet)
