"""Overhead of the spectral monitor on resnet32 at CH = 128 (the SR paper's group A).

    python benchmarks/monitor.py [--ch 128] [--batch 64] [--n-critic 5] [--every 500]
                                 [--iterations 3] [--records 5] [--threads N] [--cpu]

Builds the real training loop (:class:`core.train.Trainer`, ``sn`` discriminator, stacked-digits
data at 32x32) and measures (a) the time of one training iteration (``n_critic`` D steps + one G
step; the median of ``--iterations`` after one warm-up) and (b) the time of one monitor record
(effective weights, float64 SVDs, the record file, the metrics log and TensorBoard, the alarm;
the median of ``--records``). Between records the monitor costs one modulo per iteration, so
the overhead at ``--every`` is ``record / (every * iteration)``; the script also prints the
iteration time below which that would exceed 1 %.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.model import SPEED_MODEL, SPEED_RECIPE  # noqa: E402
from core.recipe import load_recipe  # noqa: E402
from plugins.callbacks.spectral_monitor import SpectralMonitor, SpectralSection  # noqa: E402
from core.train import build_trainer, make_accelerator  # noqa: E402


def median_time(fn, repeats: int) -> tuple[float, list[float]]:
    times = []
    for _ in range(repeats):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times), times


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ch", type=int, default=128, help="discriminator width (CH)")
    parser.add_argument("--g-ch", type=int, default=256, help="generator width")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--n-critic", type=int, default=5)
    parser.add_argument("--every", type=int, default=SpectralSection().every)
    parser.add_argument("--iterations", type=int, default=3, help="timed training iterations")
    parser.add_argument("--records", type=int, default=5, help="timed monitor records")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--cpu", action="store_true", help="stay on the CPU even with a GPU")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as tmp:
        run_dir = Path(tmp) / "run"
        recipe = load_recipe(SPEED_RECIPE, [
            *SPEED_MODEL, f"architecture.ch={args.ch}", f"architecture.g_ch={args.g_ch}",
            f"train.batch_size={args.batch}", f"train.n_critic={args.n_critic}",
            f"train.iterations={10**6}", f"train.cpu={'true' if args.cpu else 'false'}",
            "dataset.num_samples=2000", "log.progress=false", "discriminator.regularizer.name=sn"])
        monitor = SpectralMonitor(SpectralSection(every=args.every), run_dir)
        trainer = build_trainer(recipe, run_dir, make_accelerator(recipe), callbacks=[monitor])
        monitor.on_start(trainer)  # records iteration 0 (also warms the SVD code up)
        trainer.train_iteration()  # warm-up
        t_iter, iters = median_time(trainer.train_iteration, args.iterations)
        counter = iter(range(1, 10**6))
        t_rec, recs = median_time(lambda: monitor.record(trainer, next(counter) * args.every),
                                  args.records)
        trainer.log.close()
        overhead = t_rec / (args.every * t_iter)
        layers = len(monitor.measure(trainer)[0])
        device = trainer.acc.device
    print(f"device {device}, torch threads {torch.get_num_threads()}, "
          f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '-')}")
    print(f"resnet32 ch={args.ch} g_ch={args.g_ch}, batch {args.batch}, n_critic {args.n_critic}; "
          f"{layers} discriminator layers recorded")
    print(f"training iteration: median {t_iter:.3f} s  ({', '.join(f'{t:.3f}' for t in iters)})")
    shown = ", ".join(f"{t * 1000:.1f}" for t in recs)
    print(f"monitor record:     median {t_rec * 1000:.1f} ms ({shown})")
    print(f"overhead at every={args.every}: {100 * overhead:.4f} % of training time")
    limit = t_rec / (0.01 * args.every)
    print(f"1 % would be reached only below {limit * 1000:.2f} ms per iteration")
    return 0


if __name__ == "__main__":
    sys.exit(main())
