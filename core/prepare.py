"""One-time preparation: decode and resize a dataset once into a memory-mapped uint8 array.

    python -m core.prepare imagenet --resolution 128 [--root datasets] [--split train] [--workers 8]
    python -m core.prepare celeba --resolution 64 --set crop=128
    python -m core.prepare stl10 --resolution 48

writes ``<root>/<dataset>/prepared_<split>_<R>.npy`` (uint8 [N, R, R, 3]), ``..._labels.npy`` and
``prepared_<split>_<R>.json`` (the protocol: source, resolution, count, resize method, ...): the
format of :mod:`core.prepared`. The dataset is found in the registry and writes its own array
(:meth:`core.interfaces.Dataset.prepare`; the datasets with ``supports_prepare``). Several worker
processes decode; each file is written under a temporary name and moved into place, so an
interrupted run leaves nothing half-written behind.
Training then reads the prepared array automatically (the dataset's ``prepared = true``, the
default), bit-identical to decoding the files on the fly, without decoding a single JPEG.

``--set KEY=VALUE`` sets any other key of the dataset's Config (the same keys as the recipe's
``[dataset]`` table): the prepared array must be made with the recipe's settings, and training
refuses one that is not. Errors (unknown dataset, missing files) print one message, exit 2.
"""

from __future__ import annotations

import argparse
import difflib
import os
import sys
from pathlib import Path
from typing import Any, Sequence

import attrs

from core.errors import SpecregError

#: the default data root: the recipe's default ``data_root`` (relative to the working
#: directory, as in training: run both from the repository to use its ``datasets/`` folder).
DEFAULT_ROOT = Path("datasets")


def preparable_datasets() -> dict[str, type]:
    """Registered datasets that can be prepared (``supports_prepare``): name -> class."""
    from core.registry import get_registry

    datasets = get_registry().datasets
    return {name: cls for name, cls in sorted(datasets.items())
            if getattr(cls, "supports_prepare", False)}


def _unknown_dataset(name: str, choices: dict[str, type]) -> SpecregError:
    from core.registry import get_registry

    valid = ", ".join(choices) or "none"
    if name in get_registry().datasets:
        return SpecregError(f"dataset '{name}' is not read from image files and needs no "
                            f"preparation; datasets that can be prepared: {valid}")
    msg = f"unknown dataset '{name}'"
    close = difflib.get_close_matches(name, list(choices), n=1)
    if close:
        msg += f" (did you mean '{close[0]}'?)"
    return SpecregError(f"{msg}; datasets that can be prepared: {valid}")


def _parse_value(key: str, text: str, default: Any) -> Any:
    if isinstance(default, bool):
        lowered = text.strip().lower()
        if lowered in {"true", "1", "yes"}:
            return True
        if lowered in {"false", "0", "no"}:
            return False
        raise SpecregError(f"--set {key}={text}: {key} is a boolean (true or false)")
    for kind in (int, float):
        if isinstance(default, kind):
            try:
                return kind(text)
            except ValueError:
                raise SpecregError(f"--set {key}={text}: {key} is a number "
                                   f"({kind.__name__})") from None
    return text


def make_config(cls: type, resolution: int | None, settings: Sequence[str]) -> Any:
    """The dataset's Config with ``resolution`` and each ``KEY=VALUE`` of ``settings`` applied."""
    config = cls.Config()
    fields = {f.name for f in attrs.fields(type(config))}
    changes: dict[str, Any] = {}
    for item in settings:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or key not in fields:
            hint = difflib.get_close_matches(key, list(fields), n=1)
            raise SpecregError(
                f"--set {item}: expected KEY=VALUE with KEY one of {', '.join(sorted(fields))}"
                + (f" (did you mean '{hint[0]}'?)" if hint and sep else ""))
        changes[key] = _parse_value(key, text, getattr(config, key))
    if resolution is not None:
        changes["resolution"] = resolution
    return attrs.evolve(config, **changes)


def prepare(dataset: str, resolution: int | None = None, root: Path = DEFAULT_ROOT,
            split: str = "train", workers: int | None = None, settings: Sequence[str] = (),
            force: bool = False, progress: bool = True) -> dict[str, Any]:
    """Write the prepared array of ``dataset`` (unless an up-to-date one exists); return its meta."""
    from core.registry import get_registry

    choices = preparable_datasets()
    if dataset not in choices:
        raise _unknown_dataset(dataset, choices)
    config = make_config(choices[dataset], resolution, settings)
    plugin = get_registry().create("datasets", dataset, config)
    workers = min(8, os.cpu_count() or 1) if workers is None else workers
    return plugin.prepare(Path(root), split, workers=workers, force=force, progress=progress)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m core.prepare",
        description="Decode and resize a dataset once into a memory-mapped uint8 array that "
                    "training reads instead of the image files.")
    parser.add_argument("dataset", help="cifar10, stl10, imagenet, celeba, or a plugin's dataset")
    parser.add_argument("--resolution", type=int, default=None,
                        help="output size R (images are R x R); default: the dataset's default")
    parser.add_argument("--root", type=Path, default=DEFAULT_ROOT,
                        help="the data root holding <dataset>/ (default: %(default)s)")
    parser.add_argument("--split", default="train", help="which split (default: train)")
    parser.add_argument("--workers", type=int, default=None,
                        help="decoding processes (default: min(8, CPU count); 0: in-process)")
    parser.add_argument("--set", dest="settings", action="append", default=[], metavar="KEY=VALUE",
                        help="another key of the dataset's config, e.g. --set crop=128")
    parser.add_argument("--force", action="store_true",
                        help="write it again even if an up-to-date prepared array exists")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        meta = prepare(args.dataset, args.resolution, args.root, args.split, args.workers,
                       args.settings, args.force, progress=not args.quiet)
    except SpecregError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    r = meta["resolution"]
    size = meta["count"] * r * r * 3 / 2**20
    where = Path(meta.get("source", args.root)) / meta.get("images", "")
    print(f"{args.dataset} {args.split}: {meta['count']} images, {r}x{r}, {size:.1f} MiB in "
          f"{where}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
