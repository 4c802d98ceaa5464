"""The dataset checks: missing files reported, items and batches of the right kind, items that
never change, and ``prepare`` where a dataset offers it. The item checks need the files: a
``Case.prepare`` writes a small sample (:func:`core.testing.writers.write_prepared_sample`),
else they are skipped with the reason."""

from __future__ import annotations

import tempfile
from pathlib import Path

import attrs
import torch

from core.errors import DataMissingError
from core.interfaces import Dataset
from core.testing.kit import Case, Skipped, conformance_check, fail


def _offline(case: Case) -> Dataset:
    """The case's dataset with downloading switched off (a Config field ``download``)."""
    plugin = case.create()
    if any(f.name == "download" for f in attrs.fields(type(plugin.config))):
        plugin = type(plugin)(attrs.evolve(plugin.config, download=False))
    return plugin


@conformance_check("datasets", covers=("build",))
def check_dataset_missing_data_is_reported(case: Case) -> None:
    """Built on an empty data root (downloads off), a dataset either has its data built in or
    raises :class:`core.errors.DataMissingError` naming where it looked."""
    plugin = _offline(case)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "empty-root"
        root.mkdir()
        try:
            data = plugin.build(root, "train")
        except DataMissingError as exc:
            if not any(s in str(exc) for s in (str(root), str(root.resolve()))):
                fail(case, f"DataMissingError does not name the data root {root}: {exc}")
            return
        except Exception as exc:  # noqa: BLE001
            fail(case, f"missing files must raise core.errors.DataMissingError (a one-screen "
                       f"message: which files, from where, to which folder), got "
                       f"{type(exc).__name__}: {exc}")
        if len(data) < 1:
            fail(case, "built without files, but empty")


def _built_dataset(case: Case) -> tuple[Dataset, torch.utils.data.Dataset]:
    plugin = _offline(case)
    try:
        return plugin, plugin.build(case.data_root(), "train")
    except DataMissingError as exc:
        if case.prepare is None:
            raise Skipped(f"{case}: needs files; give Case(prepare=...) writing a small sample "
                           f"under the data root ({str(exc).splitlines()[0]})") from None
        fail(case, f"the files written by prepare() were not found: {exc}")


@conformance_check("datasets", covers=("build", "resolution", "num_classes", "dequantize"))
def check_dataset_items(case: Case) -> None:
    """Items are ``(float32 [3, R, R] in [-1, 1], int label)`` with R = ``resolution`` and labels
    in [0, num_classes) when conditional; batches collate to ``[b, 3, R, R]`` and int64 ``[b]``.
    ``dequantize`` is a bool, and when true the items are ``p / 127.5 - 1`` of 8-bit pixels
    ``p`` (what the training loop's dequantization assumes)."""
    plugin, data = _built_dataset(case)
    R, C = plugin.resolution, plugin.num_classes
    n = len(data)
    if n < 1:
        fail(case, "the dataset is empty")
    if not isinstance(plugin.dequantize, bool):
        fail(case, f"dequantize must be a bool, got {plugin.dequantize!r:.60}")
    for index in sorted({0, n // 2, n - 1}):
        image, label = data[index]
        if not isinstance(image, torch.Tensor) or image.dtype != torch.float32 or \
                image.shape != (3, R, R):
            fail(case, f"item {index}: image must be float32 [3, {R}, {R}], got "
                       f"{getattr(image, 'dtype', type(image))} {tuple(getattr(image, 'shape', ()))}")
        if not torch.isfinite(image).all() or image.min() < -1 or image.max() > 1:
            fail(case, f"item {index}: pixels must be in [-1, 1], got "
                       f"[{image.min().item():.4g}, {image.max().item():.4g}]")
        if plugin.dequantize:
            levels = (image.double() + 1) * 127.5
            off = (levels - levels.round()).abs().max().item()
            if off > 1e-3:
                fail(case, f"item {index}: dequantize is true, but the pixels are not p / 127.5 - 1 "
                           f"of 8-bit values p (up to {off:.3g} of a level off the grid)")
        if isinstance(label, torch.Tensor):
            label = label.item() if label.ndim == 0 and not label.is_floating_point() else label
        if not isinstance(label, int) or isinstance(label, bool):
            fail(case, f"item {index}: label must be an int, got {label!r:.60}")
        if C and not 0 <= label < C:
            fail(case, f"item {index}: label {label} outside [0, num_classes = {C})")
    images, labels = next(iter(torch.utils.data.DataLoader(data, batch_size=min(4, n))))
    if images.shape != (min(4, n), 3, R, R) or labels.dtype != torch.int64:
        fail(case, f"a batch collates to {tuple(images.shape)} / labels {labels.dtype}, expected "
                   f"({min(4, n)}, 3, {R}, {R}) / int64")


@conformance_check("datasets", covers=("build",))
def check_dataset_deterministic(case: Case) -> None:
    """Item ``i`` is the same every time it is read and in every build (resuming a run replays
    the same data position)."""
    _, first = _built_dataset(case)
    _, second = _built_dataset(case)
    n = len(first)
    if len(second) != n:
        fail(case, f"two builds have {n} and {len(second)} items")
    for index in sorted({0, n - 1}):
        a, b, c = first[index], first[index], second[index]
        if not (torch.equal(a[0], b[0]) and torch.equal(a[0], c[0]) and
                int(a[1]) == int(b[1]) == int(c[1])):
            fail(case, f"item {index} differs between reads or builds")


@conformance_check("datasets", covers=("supports_prepare", "prepare"))
def check_dataset_prepare(case: Case) -> None:
    """A dataset that overrides ``prepare`` sets ``supports_prepare`` (else ``python -m
    core.prepare`` never offers it). With ``supports_prepare``: on an empty data root (downloads
    off) ``prepare`` raises :class:`core.errors.DataMissingError` naming the root and writes no
    prepared file (or, for data that is built in, succeeds); on the case's files it returns the protocol record (``count`` = the number of
    items, ``resolution``), and the items read afterwards are the items read before."""
    plugin = _offline(case)
    overrides = type(plugin).prepare is not Dataset.prepare
    if not isinstance(type(plugin).supports_prepare, bool):
        fail(case, f"supports_prepare must be a bool, got {type(plugin).supports_prepare!r:.60}")
    if not plugin.supports_prepare:
        if overrides:
            fail(case, f"{type(plugin).__name__} overrides prepare but supports_prepare is False")
        return
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "empty-root"
        root.mkdir()
        try:
            meta = plugin.prepare(root, "train", workers=0, progress=False)
        except DataMissingError as exc:
            if not any(s in str(exc) for s in (str(root), str(root.resolve()))):
                fail(case, f"prepare's DataMissingError does not name the data root {root}: {exc}")
            written = sorted(str(p.relative_to(root)) for p in root.rglob("prepared_*"))
            if written:
                fail(case, f"a failed prepare left files behind: {written}")
        except Exception as exc:  # noqa: BLE001
            fail(case, f"prepare on an empty root (missing files) must raise "
                       f"core.errors.DataMissingError, got {type(exc).__name__}: {exc}")
        else:  # the data is built in
            if not isinstance(meta, dict) or not meta.get("count"):
                fail(case, f"prepare on an empty root returned {meta!r:.200}, not its protocol "
                           f"record (with count)")
    _, data = _built_dataset(case)
    before = data[0]
    meta = plugin.prepare(case.data_root(), "train", workers=0, progress=False)
    if not isinstance(meta, dict) or meta.get("count") != len(data) or \
            meta.get("resolution") != plugin.resolution:
        fail(case, f"prepare returned {meta!r:.200}, expected its protocol record with count = "
                   f"{len(data)} and resolution = {plugin.resolution}")
    _, after = _built_dataset(case)
    if len(after) != len(data) or not torch.equal(after[0][0], before[0]) or \
            int(after[0][1]) != int(before[1]):
        fail(case, "the items read after prepare differ from the items read before it (the "
                   "prepared array must give the decoded items bit for bit)")
