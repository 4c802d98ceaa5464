"""The base of the real-data datasets: decode on the fly, or read the prepared array when there is one.

A subclass names its folder under the data root and its splits, and implements :meth:`source`:
a torch dataset of ``(uint8 [R, R, 3], label)`` items, decoded and resized from the files
(see :mod:`plugins.datasets.pixels`). :meth:`ImageDataset.build` then returns

- :class:`core.prepared.PreparedImages` when ``Config.prepared`` is true and
  ``python -m core.prepare`` (:meth:`ImageDataset.prepare`) has written
  ``<root>/<folder>/prepared_<split>_<R>.*`` (its protocol must match the Config, else an error
  says what differs), or
- :class:`DecodedImages` over :meth:`source`, decoding every item when it is read.

Both give the same ``(float32 [3, R, R] in [-1, 1], label)`` items, ``p / 127.5 - 1`` of the
8-bit pixels ``p``, bit for bit. Two Config fields every image dataset offers (issue 11.6):

- ``resize_filter``: ``"bicubic"`` (default), ``"bilinear"`` or ``"cv2-linear"``, see
  :mod:`plugins.datasets.pixels`; recorded in the prepared array's protocol.
- ``dequantize``: false (default) feeds D the items; true makes the training loop feed D
  ``p / 128 - 1 + U(0, 1/128)`` instead, as the SN-GAN / SR Chainer loaders do
  (:attr:`core.interfaces.Dataset.dequantize`, noise from :func:`core.data.dequantization_noise`).
  The items themselves (and so metrics' reference statistics and prepared arrays) do not change.

    class MyFaces(ImageDataset):
        folder = "myfaces"
        @attrs.define
        class Config:
            resolution: int = 64
            resize_filter: str = "bicubic"
            dequantize: bool = False
            prepared: bool = True
        def source(self, root, split): ...
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Callable, ClassVar

import attrs
import numpy as np
import torch

from core.errors import SpecregError
from core.interfaces import Dataset
from core.prepared import (PreparedFiles, PreparedImages, PreparedMismatchError, check_protocol,
                           to_float, write_prepared)
from core.validators import one_of, positive_int
from plugins.datasets.pixels import DEFAULT_FILTER, RESIZE_FILTERS, square_crop_resize

#: the checks of the image datasets' shared Config keys (core.validators): a recipe names the
#: file and the key of a bad value (``dataset.resolution``, ``dataset.resize_filter``).
resolution_check = positive_int
resize_filter_check = one_of(RESIZE_FILTERS)


def unconditional(target: Any) -> int:
    """The label of every item of a dataset used unconditionally."""
    return 0


class DecodedImages(torch.utils.data.Dataset):
    """``(float32 [3, R, R] in [-1, 1], label)`` items of a source of ``(uint8 [R, R, 3], label)``."""

    def __init__(self, source: torch.utils.data.Dataset) -> None:
        self.source = source

    def __len__(self) -> int:
        return len(self.source)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        pixels, label = self.source[index]
        return to_float(torch.from_numpy(pixels)).contiguous(), int(label)


class ResizedSource(torch.utils.data.Dataset):
    """``(uint8 [R, R, 3], label)`` items of a torchvision dataset of ``(PIL image, target)`` items.

    Each image is center-cropped (``crop``, default the shorter side) and resized to ``R x R``
    with ``resize_filter`` (:data:`plugins.datasets.pixels.RESIZE_FILTERS`); ``label`` maps the
    dataset's target to an int (default: the target itself).
    """

    def __init__(self, images: torch.utils.data.Dataset, resolution: int, crop: int | None = None,
                 label: Callable[[Any], int] | None = None, classes: list[str] | None = None,
                 resize_filter: str = DEFAULT_FILTER) -> None:
        self.images = images
        self.resolution = resolution
        self.crop = crop
        self.resize_filter = resize_filter
        self.label = label
        #: class names when the labels index classes (ImageFolder's sorted folders), else [].
        self.classes = list(classes or [])

    def __len__(self) -> int:
        return len(self.images)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> tuple[np.ndarray, int]:
        image, target = self.images[index]
        label = self.label(target) if self.label is not None else int(target)
        try:
            return square_crop_resize(image, self.resolution, self.crop,
                                      self.resize_filter), label
        except ValueError as exc:  # a crop larger than the image
            samples = getattr(self.images, "samples", None)
            where = f" ({samples[index][0]})" if samples else ""
            raise SpecregError(f"image {index}{where}: {exc}") from exc


class ImageDataset(Dataset):
    """A dataset of image files under ``<root>/<folder>/``, with an optional prepared array."""

    #: the dataset's folder under the data root.
    folder: ClassVar[str] = ""
    #: the split names ``build`` accepts.
    splits: ClassVar[tuple[str, ...]] = ("train",)
    #: ``python -m core.prepare`` can write this dataset's prepared array (:meth:`prepare`).
    supports_prepare: ClassVar[bool] = True

    @attrs.define
    class Config:
        resolution: int = attrs.field(default=32, validator=resolution_check)
        #: how images are resized: "bicubic", "bilinear" or "cv2-linear" (plugins.datasets.pixels).
        resize_filter: str = attrs.field(default="bicubic", validator=resize_filter_check)
        #: feed D x/128 - 1 + U(0, 1/128) instead of x/127.5 - 1 (the SN-GAN/SR Chainer loaders).
        dequantize: bool = False
        #: read ``prepared_<split>_<R>.npy`` when ``python -m core.prepare`` has written it.
        prepared: bool = True

    # -- what a subclass provides --------------------------------------------------------------

    def source(self, root: Path, split: str) -> ResizedSource:
        """The decoded, resized images of ``split``: items ``(uint8 [R, R, 3], label)``.

        Build it as ``ResizedSource(images, self.resolution, resize_filter=self.resize_filter)``.
        Raises :class:`core.errors.DataMissingError` when the files are not there.
        """
        raise NotImplementedError

    def protocol(self, split: str) -> dict[str, Any]:
        """What makes a prepared array fit this Config (JSON values; checked on load)."""
        return {"dataset": self.display_name, "split": split, "resolution": self.resolution,
                "resize": RESIZE_FILTERS.get(self.resize_filter, self.resize_filter)}

    def check_classes(self, classes: list[str], where: Path) -> None:
        """Refuse data whose classes do not fit the Config (no check by default)."""

    # -- shared ----------------------------------------------------------------------------------

    @property
    def display_name(self) -> str:
        return self.name

    @property
    def resolution(self) -> int:
        return int(self.config.resolution)

    @property
    def resize_filter(self) -> str:
        """The Config's ``resize_filter`` (``"bicubic"`` for a Config without the field)."""
        return str(getattr(self.config, "resize_filter", DEFAULT_FILTER))

    @property
    def dequantize(self) -> bool:
        """The Config's ``dequantize`` (false for a Config without the field): the training loop
        then feeds D ``p / 128 - 1 + U(0, 1/128)`` for the items' ``p / 127.5 - 1``."""
        return bool(getattr(self.config, "dequantize", False))

    def data_folder(self, root: Path) -> Path:
        """``<root>/<folder>`` (absolute, for messages)."""
        return Path(root).expanduser().absolute() / self.folder

    def prepare_command(self, root: Path, split: str = "train") -> str:
        cmd = f"python -m core.prepare {self.display_name} --resolution {self.resolution}"
        cmd += f" --root {Path(root)}"
        if self.resize_filter != DEFAULT_FILTER:
            cmd += f" --set resize_filter={self.resize_filter}"
        return cmd + (f" --split {split}" if split != "train" else "")

    def prepared_files(self, root: Path, split: str) -> PreparedFiles:
        return PreparedFiles.at(self.data_folder(root), split, self.resolution)

    def check_config(self, split: str) -> None:
        if split not in self.splits:
            raise SpecregError(f"dataset '{self.display_name}' has no split {split!r}; "
                               f"valid: {', '.join(self.splits)}")
        if not isinstance(self.config.resolution, int) or self.config.resolution < 1:
            raise SpecregError(f"dataset '{self.display_name}': resolution must be a positive "
                               f"integer, not {self.config.resolution!r}")
        if self.resize_filter not in RESIZE_FILTERS:
            raise SpecregError(f"dataset '{self.display_name}': resize_filter must be one of "
                               f"{', '.join(repr(f) for f in RESIZE_FILTERS)}, not "
                               f"{self.resize_filter!r}")

    def build(self, root: Path, split: str = "train") -> torch.utils.data.Dataset:
        """The prepared array when there is one (and ``Config.prepared``), else decoded files."""
        self.check_config(split)
        files = self.prepared_files(root, split)
        if self.config.prepared and files.complete():
            meta = check_protocol(files, self.protocol(split), self.display_name)
            self.check_classes(list(meta.get("classes", [])), files.meta)
            return PreparedImages(files)
        return DecodedImages(self.source(Path(root), split))

    def prepare(self, root: Path, split: str = "train", workers: int = 0, force: bool = False,
                progress: bool = True) -> dict[str, Any]:
        """Decode and resize ``split`` once into its prepared array (:mod:`core.prepared`) under
        ``root``; an up-to-date one is kept (``force``: written again). Returns its protocol."""
        self.check_config(split)
        root = Path(root)
        files = self.prepared_files(root, split)
        protocol = self.protocol(split)
        if files.complete() and not force:
            try:
                meta = check_protocol(files, protocol, self.display_name)
                print(f"{files.images} is already prepared ({meta['count']} images); "
                      f"--force writes it again", file=sys.stderr)
                return meta
            except PreparedMismatchError as exc:
                print(f"replacing {files.images}: {str(exc).splitlines()[1].strip()}",
                      file=sys.stderr)
        import torchvision  # recorded in the protocol: its readers decoded the files

        source = self.source(root, split)
        extra = {"source": str(self.data_folder(root)),
                 "reader": f"{type(source.images).__module__}.{type(source.images).__qualname__}",
                 "classes": list(source.classes), "torchvision": torchvision.__version__}
        return write_prepared(source, files, {**protocol, **extra}, self.resolution,
                              workers=workers, progress=progress,
                              description=f"{self.display_name} {split} {self.resolution}px")
