"""The base of the real-data datasets: decode on the fly, or read the prepared array when there is one.

A subclass names its folder under the data root and its splits, and implements :meth:`source`:
a torch dataset of ``(uint8 [R, R, 3], label)`` items, decoded and resized from the files
(see :mod:`plugins.datasets.pixels`). :meth:`ImageDataset.build` then returns

- :class:`plugins.datasets.prepared.PreparedImages` when ``Config.prepared`` is true and
  ``python -m core.prepare`` has written ``<root>/<folder>/prepared_<split>_<R>.*`` (its protocol
  must match the Config, else an error says what differs), or
- :class:`DecodedImages` over :meth:`source`, decoding every item when it is read.

Both give the same ``(float32 [3, R, R] in [-1, 1], label)`` items, bit for bit.

    class MyFaces(ImageDataset):
        folder = "myfaces"
        @attrs.define
        class Config:
            resolution: int = 64
            prepared: bool = True
        def source(self, root, split): ...
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, ClassVar

import attrs
import numpy as np
import torch

from core.errors import SpecregError
from core.interfaces import Dataset
from plugins.datasets.pixels import RESIZE_METHOD, square_crop_resize, to_float
from plugins.datasets.prepared import PreparedFiles, PreparedImages, check_protocol


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

    Each image is center-cropped (``crop``, default the shorter side) and resized to ``R x R``;
    ``label`` maps the dataset's target to an int (default: the target itself).
    """

    def __init__(self, images: torch.utils.data.Dataset, resolution: int, crop: int | None = None,
                 label: Callable[[Any], int] | None = None, classes: list[str] | None = None) -> None:
        self.images = images
        self.resolution = resolution
        self.crop = crop
        self.label = label
        #: class names when the labels index classes (ImageFolder's sorted folders), else [].
        self.classes = list(classes or [])

    def __len__(self) -> int:
        return len(self.images)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> tuple[np.ndarray, int]:
        image, target = self.images[index]
        label = self.label(target) if self.label is not None else int(target)
        try:
            return square_crop_resize(image, self.resolution, self.crop), label
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

    @attrs.define
    class Config:
        resolution: int = 32
        #: read ``prepared_<split>_<R>.npy`` when ``python -m core.prepare`` has written it.
        prepared: bool = True

    # -- what a subclass provides --------------------------------------------------------------

    def source(self, root: Path, split: str) -> ResizedSource:
        """The decoded, resized images of ``split``: items ``(uint8 [R, R, 3], label)``.

        Raises :class:`core.errors.DataMissingError` when the files are not there.
        """
        raise NotImplementedError

    def protocol(self, split: str) -> dict[str, Any]:
        """What makes a prepared array fit this Config (JSON values; checked on load)."""
        return {"dataset": self.display_name, "split": split, "resolution": self.resolution,
                "resize": RESIZE_METHOD}

    def check_classes(self, classes: list[str], where: Path) -> None:
        """Refuse data whose classes do not fit the Config (no check by default)."""

    # -- shared ----------------------------------------------------------------------------------

    @property
    def display_name(self) -> str:
        return type(self).name or self.folder

    @property
    def resolution(self) -> int:
        return int(self.config.resolution)

    def data_folder(self, root: Path) -> Path:
        """``<root>/<folder>`` (absolute, for messages)."""
        return Path(root).expanduser().absolute() / self.folder

    def prepare_command(self, root: Path, split: str = "train") -> str:
        cmd = f"python -m core.prepare {self.display_name} --resolution {self.resolution}"
        cmd += f" --root {Path(root)}"
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

    def build(self, root: Path, split: str = "train") -> torch.utils.data.Dataset:
        """The prepared array when there is one (and ``Config.prepared``), else decoded files."""
        self.check_config(split)
        files = self.prepared_files(root, split)
        if self.config.prepared and files.complete():
            meta = check_protocol(files, self.protocol(split), self.display_name)
            self.check_classes(list(meta.get("classes", [])), files.meta)
            return PreparedImages(files)
        return DecodedImages(self.source(Path(root), split))
