"""Loader throughput: the prepared uint8 array vs decoding JPEGs from an ImageFolder.

    OMP_NUM_THREADS=1 python benchmarks/loader.py [--images 2000] [--size 128] [--workers 0 2]

Writes ``--images`` random ``--size`` x ``--size`` JPEGs in ImageFolder layout (10 classes) into
a temporary data root, prepares them with :func:`core.prepare.prepare` (``imagenet`` at
``--resolution``), then reads every image once per pass, shuffled, in batches, through
``torch.utils.data.DataLoader`` from (a) the decoded path (PIL decode + crop/resize + scaling)
and (b) the prepared array (memory map + scaling), each with every ``--workers`` setting.
Throughput is the best of ``--passes`` passes (the files are in the page cache after the first),
per core = images/s divided by the processes that decode (``max(1, workers)``; one thread each).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from core.registry import get_registry  # noqa: E402
from core.prepare import prepare  # noqa: E402


def write_jpegs(folder: Path, count: int, size: int, classes: int = 10, seed: int = 0) -> None:
    """``count`` smooth random ``size x size`` JPEGs (quality 90) in ``folder/c<k>/``."""
    rng = np.random.default_rng(seed)
    for k in range(classes):
        (folder / f"c{k:03d}").mkdir(parents=True, exist_ok=True)
    for i in range(count):
        coarse = Image.fromarray(rng.integers(0, 256, (size // 8, size // 8, 3), dtype=np.uint8))
        image = coarse.resize((size, size), Image.Resampling.BILINEAR)
        image.save(folder / f"c{i % classes:03d}" / f"{i:06d}.JPEG", quality=90)


def throughput(data: torch.utils.data.Dataset, batch: int, workers: int, passes: int) -> float:
    """Best images/s over ``passes`` shuffled passes over ``data``."""
    loader = torch.utils.data.DataLoader(data, batch_size=batch, shuffle=True,
                                         num_workers=workers, persistent_workers=workers > 0,
                                         generator=torch.Generator().manual_seed(0))
    best = 0.0
    for _ in range(passes):
        start = time.perf_counter()
        seen = 0
        for images, _ in loader:
            seen += len(images)
        best = max(best, seen / (time.perf_counter() - start))
    return best


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--size", type=int, default=128, help="side of the generated JPEGs")
    parser.add_argument("--resolution", type=int, default=128, help="the dataset's resolution")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--workers", type=int, nargs="+", default=[0],
                        help="DataLoader num_workers settings to measure (0: in-process)")
    parser.add_argument("--passes", type=int, default=3)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)

    with tempfile.TemporaryDirectory(prefix="specreg-loader-") as tmp:
        root = Path(tmp)
        start = time.perf_counter()
        write_jpegs(root / "imagenet" / "train", args.images, args.size)
        made = time.perf_counter() - start
        start = time.perf_counter()
        prepare("imagenet", args.resolution, root, workers=max(args.workers),
                settings=["num_classes=10"], progress=False)
        prepared_s = time.perf_counter() - start

        cls = get_registry().datasets["imagenet"]
        paths = {
            "decode JPEG (ImageFolder)": cls(cls.Config(resolution=args.resolution, num_classes=10,
                                                        prepared=False)).build(root),
            "prepared uint8 array": cls(cls.Config(resolution=args.resolution,
                                                   num_classes=10)).build(root),
        }
        print(f"{args.images} JPEGs {args.size}x{args.size} -> {args.resolution}x"
              f"{args.resolution}, batch {args.batch}, best of {args.passes} shuffled passes, "
              f"1 thread per process; torch {torch.__version__}, {os.cpu_count()} CPUs")
        print(f"(writing the JPEGs took {made:.1f} s; preparing them with "
              f"{max(args.workers)} worker(s) {prepared_s:.1f} s)")
        header = f"{'path':<28}{'workers':>8}{'images/s':>11}{'per core':>10}{'ratio':>8}"
        print(header)
        print("-" * len(header))
        for workers in args.workers:
            rates = {name: throughput(data, args.batch, workers, args.passes)
                     for name, data in paths.items()}
            base = rates["decode JPEG (ImageFolder)"]
            for name, rate in rates.items():
                print(f"{name:<28}{workers:>8}{rate:>11.0f}{rate / max(1, workers):>10.0f}"
                      f"{rate / base:>7.1f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
