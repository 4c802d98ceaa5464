"""The prepared-array image format: a dataset decoded and resized once into a ``uint8`` array.

A core contract: ``python -m core.prepare`` asks a dataset plugin to write it
(:meth:`core.interfaces.Dataset.prepare`), the image dataset plugins read it back, and the
conformance kit writes small samples of it. Three files per (dataset, split, resolution ``R``),
in the dataset's folder of the data root::

    <root>/<dataset>/prepared_<split>_<R>.npy         uint8 [N, R, R, 3] (NHWC, RGB), np.save
    <root>/<dataset>/prepared_<split>_<R>_labels.npy  int64 [N], np.save
    <root>/<dataset>/prepared_<split>_<R>.json        the protocol (a JSON object)

The protocol holds what the dataset plugin says makes the array fit its Config (its
``protocol(split)``: dataset, split, resolution, resize method, crop, ...; checked on every load
by :func:`check_protocol`) and what :func:`write_prepared` adds: ``count`` (N), ``resolution``
(R), ``layout`` (``"NHWC uint8"``), ``format`` (:data:`FORMAT_VERSION`), the two array file
names, ``seconds`` and ``created``.

Each file is written under a temporary name and then ``os.replace``-d into place, the JSON last:
the JSON marks a complete set (an interrupted run leaves no JSON, so nothing half-written is
ever read). :class:`PreparedImages` memory-maps the array and gives ``(float32 [3, R, R],
label)`` items scaled by :func:`to_float` (pixel ``p`` -> ``p / 127.5 - 1``), the same function
the decode-on-the-fly path uses: both paths give bit-identical tensors.

    from core.prepared import PreparedFiles, PreparedImages, write_prepared
    files = PreparedFiles.at(root / "imagenet", "train", 128)
    write_prepared(source, files, protocol, 128, workers=8)  # source: items (uint8 [R,R,3], label)
    data = PreparedImages(files)
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any, Mapping

import attrs
import numpy as np
import torch

from core.errors import SpecregError

__all__ = ["FORMAT_VERSION", "PreparedFiles", "PreparedImages", "PreparedMismatchError",
           "check_protocol", "to_float", "write_prepared"]

#: written into every protocol file; bump if the layout ever changes.
FORMAT_VERSION = 1
#: images decoded per worker task.
CHUNK = 64


def to_float(pixels: torch.Tensor) -> torch.Tensor:
    """``uint8 [..., H, W, 3]`` -> ``float32 [..., 3, H, W]``: ``p / 127.5 - 1`` (0 -> -1, 255 -> 1).

    The result is a channels-first *view* of a channels-last buffer: the arithmetic runs on the
    contiguous pixels (fast), and batching with ``torch.stack`` (the DataLoader's collate) makes
    the one copy that lays it out contiguously. Call ``.contiguous()`` before ``.view``.
    """
    return pixels.float().div_(127.5).sub_(1.0).movedim(-1, -3)


class PreparedMismatchError(SpecregError):
    """A prepared array exists but was made with other settings than the recipe asks for."""


@attrs.frozen
class PreparedFiles:
    """The paths of one prepared (dataset, split, resolution)."""

    images: Path
    labels: Path
    meta: Path

    @classmethod
    def at(cls, folder: Path, split: str, resolution: int) -> "PreparedFiles":
        stem = f"prepared_{split}_{resolution}"
        folder = Path(folder)
        return cls(folder / f"{stem}.npy", folder / f"{stem}_labels.npy", folder / f"{stem}.json")

    def complete(self) -> bool:
        """All three files are there (the JSON is written last, so it marks a finished run)."""
        return self.meta.is_file() and self.images.is_file() and self.labels.is_file()

    def read_meta(self) -> dict[str, Any]:
        with open(self.meta, encoding="utf-8") as f:
            return json.load(f)


def check_protocol(files: PreparedFiles, expected: Mapping[str, Any], dataset: str) -> dict[str, Any]:
    """The protocol file's content, after checking it agrees with ``expected`` on every key."""
    meta = files.read_meta()
    wrong = [f"  {key}: prepared with {meta.get(key)!r}, the recipe asks for {value!r}"
             for key, value in expected.items() if meta.get(key) != value]
    if wrong:
        raise PreparedMismatchError(
            f"the prepared array {files.images} does not match the recipe's dataset settings:\n"
            + "\n".join(wrong)
            + f"\nRe-run `python -m core.prepare {dataset} --resolution {expected.get('resolution')}"
            f" --root {files.meta.parent.parent}` with the recipe's settings (--set KEY=VALUE),"
            " or set `prepared = false` in the recipe's dataset table to decode the source images.")
    return meta


class PreparedImages(torch.utils.data.Dataset):
    """``(float32 [3, R, R] in [-1, 1], label)`` items read from a prepared array.

    The array is memory-mapped lazily, in each process that reads it (DataLoader workers open
    their own map; nothing large is pickled). ``__getitems__`` reads a whole batch at once.
    """

    def __init__(self, files: PreparedFiles) -> None:
        self.files = files
        meta = files.read_meta()
        self.meta = meta
        self.labels = torch.from_numpy(np.load(files.labels).astype(np.int64))
        images = np.load(files.images, mmap_mode="r")
        r = int(meta["resolution"])
        if images.dtype != np.uint8 or images.shape != (int(meta["count"]), r, r, 3) \
                or len(self.labels) != images.shape[0]:
            raise SpecregError(
                f"the prepared files {files.images} ({images.dtype} {list(images.shape)}) and "
                f"{files.labels} ({len(self.labels)} labels) do not match {files.meta} "
                f"(count {meta['count']}, resolution {r}); delete the three files and re-run "
                f"`python -m core.prepare`.")
        self._images: np.ndarray | None = None

    @property
    def images(self) -> np.ndarray:
        """The memory-mapped ``uint8 [N, R, R, 3]`` array."""
        if self._images is None:
            self._images = np.load(self.files.images, mmap_mode="r")
        return self._images

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_images"] = None  # re-opened by each worker
        return state

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        pixels = torch.from_numpy(np.array(self.images[index]))
        return to_float(pixels).contiguous(), int(self.labels[index])

    def __getitems__(self, indices: list[int]) -> list[tuple[torch.Tensor, int]]:
        idx = np.asarray(indices, dtype=np.int64)
        order = np.argsort(idx, kind="stable")
        block = np.empty((len(idx),) + self.images.shape[1:], dtype=np.uint8)
        block[order] = self.images[idx[order]]  # ascending reads from the map
        images = to_float(torch.from_numpy(block))  # views, laid out by the collate's stack
        return [(images[i], int(self.labels[j])) for i, j in enumerate(idx)]


def _stack(batch: list[tuple[np.ndarray, int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """A worker's chunk as tensors (they travel to the main process through shared memory)."""
    return (torch.from_numpy(np.stack([np.asarray(img, dtype=np.uint8) for img, _ in batch])),
            torch.tensor([label for _, label in batch], dtype=torch.int64))


def _check_space(folder: Path, needed: int) -> None:
    free = shutil.disk_usage(folder).free
    if free < needed * 1.02 + (64 << 20):
        raise SpecregError(f"not enough disk space in {folder} for the prepared array: it needs "
                           f"{needed / 2**30:.2f} GiB, {free / 2**30:.2f} GiB are free")


def write_prepared(source: torch.utils.data.Dataset, files: PreparedFiles,
                   protocol: Mapping[str, Any], resolution: int, workers: int = 0,
                   progress: bool = True, description: str = "prepare") -> dict[str, Any]:
    """Decode every item ``(uint8 [R, R, 3], label)`` of ``source`` into ``files``; return the meta.

    ``workers`` processes decode in parallel (0: in this process). Files are written under
    temporary names and moved into place at the end, the JSON last; an old set of the same
    name stays in use until then, and a failed run removes its temporary files.
    """
    from tqdm.auto import tqdm

    n = len(source)
    if n == 0:
        raise SpecregError(f"nothing to prepare: the source of {files.images} has no images")
    shape = (n, resolution, resolution, 3)
    folder = files.images.parent
    folder.mkdir(parents=True, exist_ok=True)
    _check_space(folder, int(np.prod(shape)) + 8 * n)

    tag = f".partial-{os.getpid()}"
    tmp_images = files.images.with_name(files.images.name + tag)
    tmp_labels = files.labels.with_name(files.labels.name + tag)
    tmp_meta = files.meta.with_name(files.meta.name + tag)
    start = time.perf_counter()
    try:
        images = np.lib.format.open_memmap(tmp_images, mode="w+", dtype=np.uint8, shape=shape)
        labels = np.empty(n, dtype=np.int64)
        loader = torch.utils.data.DataLoader(source, batch_size=CHUNK, shuffle=False,
                                             num_workers=workers, collate_fn=_stack)
        done = 0
        with tqdm(total=n, unit="img", desc=description, disable=not progress,
                  dynamic_ncols=True) as bar:
            for block, block_labels in loader:
                if block.shape[1:] != shape[1:]:
                    raise ValueError(f"source gave images of shape {block.shape[1:]}, "
                                     f"expected {shape[1:]}")
                images[done:done + len(block)] = block.numpy()
                labels[done:done + len(block)] = block_labels.numpy()
                done += len(block)
                bar.update(len(block))
        images.flush()
        del images
        with open(tmp_labels, "wb") as f:  # np.save(path) would append '.npy'
            np.save(f, labels)
        meta = dict(protocol)
        meta.update(count=n, resolution=resolution, layout="NHWC uint8", format=FORMAT_VERSION,
                    images=files.images.name, labels=files.labels.name,
                    seconds=round(time.perf_counter() - start, 1),
                    created=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
        with open(tmp_meta, "w", encoding="utf-8") as f:
            json.dump(meta, f, indent=1, sort_keys=True)
            f.write("\n")
        files.meta.unlink(missing_ok=True)  # an old set stays usable until this point
        os.replace(tmp_images, files.images)
        os.replace(tmp_labels, files.labels)
        os.replace(tmp_meta, files.meta)  # last: marks the set complete
    finally:
        for tmp in (tmp_images, tmp_labels, tmp_meta):
            tmp.unlink(missing_ok=True)
    return meta
