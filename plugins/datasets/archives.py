"""Opening torchvision's archive datasets (CIFAR-10, STL-10) with their own download and checks.

:func:`open_archive_dataset` constructs the torchvision dataset with ``download=False``, so
torchvision's own integrity check (md5 of every file) decides whether the files are there. When
they are not and downloading is allowed, torchvision's downloader runs into a temporary folder
next to the data, and only the verified, extracted files are moved into place: a failed or
interrupted download leaves nothing behind. When the data stays missing, the
:class:`core.errors.DataMissingError` names each missing or corrupted file, the URL torchvision
uses, the exact folder to put the files in, and that ``download = true`` retries.

    data = open_archive_dataset(CIFAR10, folder, download=True,
                                load=lambda root: CIFAR10(root, train=True),
                                fetch=lambda tmp: CIFAR10(tmp, train=False, download=True),
                                name="cifar10", title="CIFAR-10",
                                prepare="python -m core.prepare cifar10 --resolution 32")
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable, TypeVar


from core.errors import DataMissingError

T = TypeVar("T")

#: how many problem files a message lists before it summarizes.
_LIST_AT_MOST = 8


def expected_files(tv_class: type) -> list[tuple[str, str | None]]:
    """``(file name, md5)`` of every file torchvision checks for ``tv_class``."""
    files = [(name, md5) for name, md5 in tv_class.train_list + tv_class.test_list]
    meta = getattr(tv_class, "meta", None)
    if isinstance(meta, dict) and "filename" in meta:
        files.append((meta["filename"], meta.get("md5")))
    return files


def file_problems(tv_class: type, folder: Path) -> list[str]:
    """One line per expected file of ``folder/<base_folder>`` that is missing or fails its md5."""
    from torchvision.datasets.utils import check_integrity  # here: registering stays cheap

    base = folder / tv_class.base_folder
    if not base.is_dir():
        return [f"missing: the folder {base}"]
    problems = []
    for name, md5 in expected_files(tv_class):
        path = base / name
        if not path.is_file():
            problems.append(f"missing: {path}")
        elif not check_integrity(str(path), md5):
            problems.append(f"corrupted (md5 is not {md5}): {path}")
    return problems


def _move_tree(source: Path, target: Path) -> None:
    """Move every file under ``source`` to the same place under ``target`` (replacing files)."""
    for dirpath, _, filenames in os.walk(source):
        dest = target / Path(dirpath).relative_to(source)
        dest.mkdir(parents=True, exist_ok=True)
        for filename in filenames:
            os.replace(Path(dirpath) / filename, dest / filename)


def download_into(folder: Path, fetch: Callable[[Path], object], keep: str) -> None:
    """Run ``fetch(tmp)`` in a fresh temporary folder inside ``folder``, then move ``tmp/keep``
    into ``folder/keep``; the temporary folder (archive included) is always removed."""
    created = not folder.exists()
    folder.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".download-", dir=folder))
    try:
        fetch(tmp)
        _move_tree(tmp / keep, folder / keep)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if created and not any(folder.iterdir()):
            folder.rmdir()  # a failed first download leaves not even the folder


def missing_message(tv_class: type, folder: Path, name: str, title: str, prepare: str,
                    cause: BaseException | None = None, download: bool = False) -> str:
    problems = file_problems(tv_class, folder)
    shown = problems[:_LIST_AT_MOST]
    if len(problems) > len(shown):
        shown.append(f"... and {len(problems) - len(shown)} more")
    base = folder / tv_class.base_folder
    names = ", ".join(n for n, _ in expected_files(tv_class))
    lines = [f"{title} ('{name}') is not in {folder}" + (":" if shown else "")]
    lines += [f"  {p}" for p in shown]
    if cause is not None:
        lines.append(f"Downloading it failed: {type(cause).__name__}: {cause}")
    elif not download:
        lines.append("(the recipe sets download = false, so nothing was downloaded)")
    lines += [
        f"torchvision downloads {tv_class.url} (md5 {tv_class.tgz_md5}).",
        "On a machine without internet, fetch that archive elsewhere and extract it here:",
        f"  tar -xzf {tv_class.filename} -C {folder}",
        f"so that {base}/ holds {names}.",
        ("Running it again retries the download (download = true)." if download else
         "Or set download = true in the recipe's [dataset] table to download it."),
        f"Once it is there, `{prepare}` writes the fast prepared array (optional).",
    ]
    return "\n".join(lines)


def open_archive_dataset(tv_class: type, folder: Path, download: bool, load: Callable[[Path], T],
                         fetch: Callable[[Path], object], name: str, title: str,
                         prepare: str) -> T:
    """``load(folder)`` (a torchvision constructor with ``download=False``), downloading first
    with ``fetch(tmp)`` (the same constructor with ``download=True``) when allowed and needed."""
    try:
        return load(folder)
    except RuntimeError as missing:  # torchvision: "Dataset not found or corrupted."
        if not download:
            raise DataMissingError(missing_message(tv_class, folder, name, title, prepare)) \
                from missing
    try:
        download_into(folder, fetch, keep=tv_class.base_folder)
    except Exception as exc:  # no network, bad checksum, full disk...
        raise DataMissingError(missing_message(tv_class, folder, name, title, prepare,
                                               cause=exc, download=True)) from exc
    try:
        return load(folder)
    except RuntimeError as exc:  # downloaded, yet torchvision's check still fails
        raise DataMissingError(missing_message(tv_class, folder, name, title, prepare, cause=exc,
                                               download=True)) from exc
