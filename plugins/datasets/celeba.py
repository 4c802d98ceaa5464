"""CelebA at 64x64 (Lin et al. 2021, App. H.1): the center 128x128 of each aligned face, resized.

Files: the 202,599 aligned and cropped 178x218 JPEGs of ``img_align_celeba.zip``, unzipped to::

    <root>/celeba/img_align_celeba/000001.jpg ... 202599.jpg

This is the image folder :class:`torchvision.datasets.CelebA` uses too (``root=<root>``), so a copy
set up for torchvision works as it is; the annotation files are not needed. We read the folder
directly (torchvision's ImageFolder scanner, the folder as one class) rather than through
``torchvision.datasets.CelebA``, because that class refuses to load without all five annotation
text files and can only download through Google Drive, which rate-limits; there is no download.

The one split, ``train``, is every image (the GAN protocol of Lin et al.: "This dataset contains
202599 images"). Each image's center ``crop x crop`` square (default 128) is resized to
``resolution`` with ``resize_filter`` (default PIL bicubic; the BSSN authors' cv2.resize:
``"cv2-linear"``). Used unconditionally: every label is 0.

    [dataset]
    name = "celeba"
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import attrs
import torch

from core.errors import DataMissingError, SpecregError
from core.hookspecs import hookimpl
from core.validators import positive_int
from plugins.datasets.base import (ImageDataset, ResizedSource, resize_filter_check,
                                   resolution_check, unconditional)

URL = "https://mmlab.ie.cuhk.edu.hk/projects/CelebA.html"
IMAGES = "img_align_celeba"


class _OneFolder(torch.utils.data.Dataset):
    """``(PIL image, 0)`` for each image of a single folder ``root/<name>/*``: what torchvision's
    ImageFolder gives with that folder as its one class (its scanner and loader, imported here so
    that registering the dataset stays cheap). No images: FileNotFoundError, as ImageFolder."""

    def __init__(self, root: str, name: str) -> None:
        from torchvision.datasets.folder import IMG_EXTENSIONS, default_loader, make_dataset

        self.samples = make_dataset(root, {name: 0}, extensions=IMG_EXTENSIONS)
        self.loader = default_loader

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        path, target = self.samples[index]
        return self.loader(path), target


class CelebA(ImageDataset):
    """CelebA aligned faces: center ``crop`` squares resized to ``resolution``; unconditional."""

    folder = "celeba"
    splits = ("train",)

    @attrs.define
    class Config:
        resolution: int = attrs.field(default=64, validator=resolution_check)
        #: side of the center square cut from each 178x218 image before resizing.
        crop: int = attrs.field(default=128, validator=positive_int)
        #: how images are resized: "bicubic" (PIL, our default), "bilinear" (PIL; SN-GAN/SR
        #: ImageNet code) or "cv2-linear" (cv2.resize; BSSN code). See plugins.datasets.pixels.
        resize_filter: str = attrs.field(default="bicubic", validator=resize_filter_check)
        #: feed D x/128 - 1 + U(0, 1/128) (the SN-GAN/SR Chainer loaders) instead of x/127.5 - 1.
        dequantize: bool = False
        #: read ``prepared_<split>_<R>.npy`` when ``python -m core.prepare`` has written it.
        prepared: bool = True

    def protocol(self, split: str) -> dict[str, Any]:
        protocol = super().protocol(split)
        protocol["crop"] = int(self.config.crop)
        return protocol

    def check_config(self, split: str) -> None:
        super().check_config(split)
        if not isinstance(self.config.crop, int) or self.config.crop < 1:
            raise SpecregError(f"celeba: crop must be a positive integer (128 in Lin et al. "
                               f"2021), not {self.config.crop!r}")

    def missing(self, root: Path, problem: str) -> DataMissingError:
        where = self.data_folder(root) / IMAGES
        return DataMissingError(
            f"CelebA ('{self.display_name}'): {problem}\n"
            f"Expected the aligned and cropped JPEGs directly in one folder:\n"
            f"  {where}/000001.jpg ... 202599.jpg\n"
            f"Get img_align_celeba.zip from {URL} (\"Align&Cropped Images\", Google Drive) and\n"
            f"  unzip -q img_align_celeba.zip -d {self.data_folder(root)}\n"
            f"Then (optional, faster training) `{self.prepare_command(root)}`.")

    def source(self, root: Path, split: str) -> ResizedSource:
        where = self.data_folder(root) / IMAGES
        if not where.is_dir():
            raise self.missing(root, f"the folder {where} does not exist.")
        try:
            data = _OneFolder(str(where.parent), IMAGES)
        except FileNotFoundError as exc:  # the folder holds no images
            raise self.missing(root, f"no images in {where}.") from exc
        return ResizedSource(data, self.resolution, crop=int(self.config.crop),
                             label=unconditional, resize_filter=self.resize_filter)


@hookimpl
def register_datasets(register) -> None:
    register("celeba", CelebA)
