"""Two gloo processes against one single-threaded process on the CPU (issue 15), in one run.

    python benchmarks/ddp.py [--repeats 3] [--iterations 8] [--batch 64] [--variant NAME ...]

Each repeat runs, alternately, one process and two DDP processes (``torch.distributed.run``,
gloo, ``OMP_NUM_THREADS=1`` each) on the same global batch (the quickstart model, n_critic 5): the
speed-up is one process's seconds per iteration over two processes'; ideal is 2.0. A variant
changes how DDP is set up (``--variant``, through :data:`VARIANTS`), so that the options that
might close the gap are measured side by side. The worker times iterations after a warm-up one,
between barriers.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from core.testing.ddp import free_port  # noqa: E402

QUICKSTART = REPO / "zoo" / "quickstart.toml"

#: name -> keyword arguments of ``DistributedDataParallel`` (Accelerate's kwargs handler).
VARIANTS: dict[str, dict] = {
    "default": {},
    "bucket_view": {"gradient_as_bucket_view": True},
    "no_buffer_broadcast": {"broadcast_buffers": False},
    "both": {"gradient_as_bucket_view": True, "broadcast_buffers": False},
}


def worker(out: Path, iterations: int, batch: int, variant: str) -> None:
    """Run under torchrun (or alone): time ``iterations`` iterations, rank 0 writes JSON."""
    import torch

    torch.set_num_threads(1)
    import core.train as train
    from core.recipe import load_recipe

    options = VARIANTS[variant]
    if options:
        from accelerate import Accelerator
        from accelerate.utils import DistributedDataParallelKwargs

        def accelerator(section):
            return Accelerator(cpu=True, mixed_precision=section.mixed_precision,
                               kwargs_handlers=[DistributedDataParallelKwargs(**options)])

        train._accelerator = accelerator
    from benchmarks.model import SPEED_MODEL

    recipe = load_recipe(QUICKSTART, [
        *SPEED_MODEL, "dataset.num_samples=2048", f"train.batch_size={batch}", "train.n_critic=5",
        "train.cpu=true", "log.progress=false", "log.sample_every=0", "checkpoint.every=0",
        "eval.every=0"])
    with tempfile.TemporaryDirectory() as folder:
        trainer = train.build_trainer(recipe, Path(folder) / "run", callbacks=[])
        trainer.G.train()
        trainer.D.train()
        trainer.train_iteration()  # warm-up
        trainer.acc.wait_for_everyone()
        start = time.perf_counter()
        for _ in range(iterations):
            trainer.train_iteration()
        trainer.acc.wait_for_everyone()
        seconds = (time.perf_counter() - start) / iterations
        if trainer.acc.is_main_process:
            out.write_text(json.dumps({"seconds": seconds,
                                       "processes": trainer.acc.num_processes}))
        trainer.log.close()
    from core.run import shutdown

    shutdown(0)


def launch(processes: int, iterations: int, batch: int, variant: str) -> float:
    """Seconds per iteration with ``processes`` processes."""
    with tempfile.TemporaryDirectory() as folder:
        out = Path(folder) / "time.json"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes),
               "--master_addr", "127.0.0.1", "--master_port", str(free_port()), __file__,
               "--worker", str(out), "--iterations", str(iterations), "--batch", str(batch),
               "--variant", variant]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "1"}
        done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
        if not out.is_file():
            raise SystemExit(f"the {processes}-process run failed:\n{done.stderr[-3000:]}")
        record = json.loads(out.read_text())
        assert record["processes"] == processes
        return record["seconds"]


def compare(repeats: int, iterations: int, batch: int, variant: str
            ) -> tuple[list[float], list[float], list[float]]:
    """Per repeat: (speed-up, one process's seconds per iteration, two processes'), the two
    launched alternately, the order swapping every other repeat."""
    speedups, ones, twos = [], [], []
    for repeat in range(repeats):
        order = (1, 2) if repeat % 2 == 0 else (2, 1)
        seconds = {n: launch(n, iterations, batch, variant) for n in order}
        speedups.append(seconds[1] / seconds[2])
        ones.append(seconds[1])
        twos.append(seconds[2])
    return speedups, ones, twos


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--iterations", type=int, default=8)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--variant", nargs="*", default=["default"], choices=list(VARIANTS))
    parser.add_argument("--worker", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker is not None:
        worker(args.worker, args.iterations, args.batch, args.variant[0])
        return 0
    print(f"2 gloo processes vs 1 single-threaded process; quickstart model, global batch "
          f"{args.batch}, n_critic 5, {args.iterations} timed iterations, median of "
          f"{args.repeats}", flush=True)
    for variant in args.variant:
        speedups, ones, twos = compare(args.repeats, args.iterations, args.batch, variant)
        print(f"{variant:20s} speed-up {statistics.median(speedups):.3f}x "
              f"({statistics.median(ones):.2f} s vs {statistics.median(twos):.2f} s per "
              f"iteration; repeats {', '.join(f'{s:.3f}' for s in speedups)})", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
