"""Cost of a lazy gradient penalty: the D step with ``r1`` at ``every = 16`` against a plain D step.

    python benchmarks/penalties.py [--repeats 5] [--every 16] [--threads 2] [--quick]

Target (issue 12): ``r1`` (Mescheder et al. 2018, eq. 9) with StyleGAN2's lazy interval 16 costs at
most 1.10x a plain D step on ``resnet32`` (ch = 128, batch 64), amortized over 16 steps. Two
measurements, each of two variants that differ only in the regularizer (none, or ``r1``):

1. ``trainer``: the real training loop's D step, :meth:`core.train.Trainer.discriminator_step`
   of a Trainer built by :func:`core.train.build_trainer` (data, G's forward making the fakes, D's
   forward of reals and fakes, hinge loss, the penalty on the steps it runs, backward, Adam);
2. ``d only``: the same D step without data loading and G (fixed images), written out in the
   loop's order: the reals require grad before the one forward when the penalty runs, the
   :class:`core.interfaces.StepContext` of the micro-batch, ``every * penalty`` added to the loss.

Every repeat runs one block of ``every`` D steps of both variants, alternating one D step at a time
(the order reverses every other repeat), so each block holds exactly one penalty step; the ratio is
taken within each repeat and the median over repeats is printed, so that load from other
processes on the machine cancels out. The penalty step's own cost (its ratio to a plain step) is
printed too.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from core.interfaces import StepContext
from core.registry import get_registry


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def trainer_step(ch: int, batch: int, every: int | None, run_dir: Path) -> Callable[[], object]:
    """The real Trainer's D step (``every=None``: no regularizer)."""
    from core.recipe import structure_recipe
    from core.train import build_trainer, make_accelerator

    table = {"seed": 0, "dataset": {"name": "stacked_digits", "num_samples": 4096},
             "architecture": {"name": "resnet32", "ch": ch},
             "train": {"iterations": 1, "batch_size": batch, "n_critic": 1, "cpu": True},
             "checkpoint": {"every": 0}, "log": {"sample_every": 0, "progress": False}}
    if every is not None:
        table["discriminator"] = {"regularizer": {"name": "r1", "gamma": 10.0, "every": every}}
    recipe = structure_recipe(table)
    trainer = build_trainer(recipe, run_dir, make_accelerator(recipe), callbacks=[])
    trainer.G.train(), trainer.D.train()
    return trainer.discriminator_step


class DOnlyStep:
    """D's step on fixed reals and fakes, in the training loop's order, with an optional lazy R1."""

    def __init__(self, ch: int, batch: int, every: int | None, seed: int = 0) -> None:
        registry = get_registry()
        arch = registry.architectures["resnet32"]
        torch.manual_seed(seed)
        self.d = arch(arch.Config(ch=ch)).build_discriminator().train()
        r1 = registry.regularizers["r1"]
        self.reg = None if every is None else r1(r1.Config(gamma=10.0, every=every))
        self.opt = torch.optim.Adam(self.d.parameters(), lr=2e-4, betas=(0.0, 0.9))
        gen = torch.Generator().manual_seed(seed)
        self.real = torch.rand(batch, 3, 32, 32, generator=gen) * 2 - 1
        self.fake = torch.rand(batch, 3, 32, 32, generator=gen) * 2 - 1
        self.steps = 0

    def __call__(self) -> None:
        self.opt.zero_grad(set_to_none=True)
        due = self.reg is not None and self.steps % self.reg.penalty_every == 0
        real = self.real.detach().requires_grad_(True) if due else self.real
        logits = self.d(torch.cat([real, self.fake]))
        n = len(real)
        real_logits, fake_logits = logits[:n], logits[n:]
        loss = F.relu(1 - real_logits).mean() + F.relu(1 + fake_logits).mean()
        if due:
            context = StepContext(phase="D", iteration=0, step=self.steps, micro_batch=0,
                                  num_micro_batches=1, discriminator=self.d, generator=self.d,
                                  module=self.d, real=real, fake=self.fake,
                                  real_logits=real_logits, fake_logits=fake_logits)
            loss = loss + self.reg.penalty_every * self.reg.penalty(context)
        loss.backward()
        self.opt.step()
        self.steps += 1


def measure(steps: list[Callable[[], object]], repeats: int, block: int
            ) -> tuple[float, float, float, float]:
    """(ms per plain step, ms per lazy step amortized, median amortized ratio, median ratio of
    the penalty step alone) for ``steps = [plain, lazy]``, whose counters start aligned."""
    for step in steps:  # warm-up: one full block each (the lazy one's penalty step included)
        for _ in range(block):
            step()
    per_step: list[list[float]] = [[], []]
    ratios, penalty_ratios = [], []
    for rep in range(repeats):
        order = [0, 1] if rep % 2 == 0 else [1, 0]
        times: list[list[float]] = [[], []]
        for _ in range(block):
            for i in order:
                times[i].append(timed(steps[i]))
        totals = [sum(t) for t in times]
        per_step[0].append(totals[0] / block)
        per_step[1].append(totals[1] / block)
        ratios.append(totals[1] / totals[0])
        penalty_ratios.append(times[1][0] / statistics.median(times[0]))  # step 0 of a block
    return (statistics.median(per_step[0]) * 1e3, statistics.median(per_step[1]) * 1e3,
            statistics.median(ratios), statistics.median(penalty_ratios))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5, help="blocks of `every` D steps")
    parser.add_argument("--every", type=int, default=16, help="r1's lazy interval")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true",
                        help="ch = 8, batch 4, one repeat: a smoke test, not a measurement")
    parser.add_argument("--skip-trainer", action="store_true")
    parser.add_argument("--skip-d-only", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    ch, batch = (8, 4) if args.quick else (128, 64)
    repeats = 1 if args.quick else args.repeats
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; resnet32 ch={ch}, "
          f"batch {batch}, r1 gamma=10 every={args.every}; median of {repeats} repeats of "
          f"{args.every} D steps, interleaved")
    print(f"{'D step':<10}{'plain (ms)':>12}{'r1 lazy (ms, amortized)':>26}{'ratio':>8}"
          f"{'penalty step / plain':>22}", flush=True)

    def row(name: str, plain: float, lazy: float, ratio: float, penalty: float) -> None:
        print(f"{name:<10}{plain:>12.1f}{lazy:>26.1f}{ratio:>7.3f}x{penalty:>21.2f}x", flush=True)

    if not args.skip_trainer:
        with tempfile.TemporaryDirectory() as tmp:
            steps = [trainer_step(ch, batch, None, Path(tmp) / "plain"),
                     trainer_step(ch, batch, args.every, Path(tmp) / "r1")]
            row("trainer", *measure(steps, repeats, args.every))
    if not args.skip_d_only:
        steps = [DOnlyStep(ch, batch, None), DOnlyStep(ch, batch, args.every)]
        row("d only", *measure(steps, repeats, args.every))
    print("target: ratio <= 1.10")


if __name__ == "__main__":
    main()
