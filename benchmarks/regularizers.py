"""Cost of the spectral regularizers: the fast exact SVD, and the D step under each regularizer.

    python benchmarks/regularizers.py [--repeats 5] [--svd-repeats 3] [--threads 2] [--quick]

1. SVD: one full SR application (every conv of the ``resnet128`` discriminator, ch = 64: 17
   kernels up to 1024 x 9216) with :mod:`core.svd`, static (fraction 0.5) and
   dynamic, against a plain ``torch.linalg.svd`` of the same kernels (what the authors' code
   does; the thin SVD of the transposed kernels is shown too); the accuracy column is the
   largest relative Frobenius error of the projected kernels against the SPEC §2.3 formula
   from a float64 LAPACK SVD.
2. D step on ``resnet32`` (ch = 128, batch 64: real and fake concatenated, 128 images): forward,
   hinge loss, backward, Adam step, ``after_step`` (the SR projection every 5 iterations, so a
   block of 5 steps holds one). Every repeat runs one block of every variant, round robin one
   D step at a time (the order reverses every other repeat); the ratio to ``sn`` is taken
   within each repeat and the median over repeats is printed, so that load from other
   processes on the machine cancels out.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from core.layers import weight_layers, weight_matrix
from core.registry import get_registry
from core.svd import thin_svd
from plugins.regularizers.sr import static_rank

#: (regularizer, Config keyword arguments, mode label) of the D-step table; sn first.
VARIANTS: list[tuple[str, dict, str]] = [
    ("sn", {}, "-"),
    ("sr_static", {"mode": "projection"}, "projection"),
    ("sr_static", {"mode": "parametrization"}, "parametrization"),
    ("sr_dynamic", {"mode": "projection"}, "projection"),
    ("sr_dynamic", {"mode": "parametrization"}, "parametrization"),
    ("bsn", {}, "-"),
    ("ssn", {"scale": 1.2}, "-"),
    ("bssn", {"scale": 1.2}, "-"),
]


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


# -- 1. SVD of the resnet128 kernels ---------------------------------------------------------


def resnet128_kernels(ch: int) -> list[torch.Tensor]:
    arch_cls = get_registry().architectures["resnet128"]
    d = arch_cls(arch_cls.Config(ch=ch)).build_discriminator()
    return [layer.weight.detach().clone() for _, layer in weight_layers(d, (nn.Conv2d,))]


def static_projection(kernel: torch.Tensor, fraction: float = 0.5) -> torch.Tensor:
    dec = thin_svd(weight_matrix(kernel))
    new = dec.S / dec.S[0]
    new[: static_rank(fraction, len(new))] = 1.0
    return dec.respectrum(new, alpha=1.0 / float(dec.S[0])).reshape(kernel.shape)


def dynamic_projection(kernel: torch.Tensor, gamma: torch.Tensor) -> torch.Tensor:
    dec = thin_svd(weight_matrix(kernel))
    ratio = dec.S / dec.S[0]
    gamma = torch.maximum(gamma, ratio)
    return dec.respectrum(gamma * dec.S[0], alpha=1.0).reshape(kernel.shape)


def svd_table(ch: int, repeats: int) -> list[tuple[str, float, float, float]]:
    kernels = resnet128_kernels(ch)
    # a dynamic record that raises about half of every spectrum
    gammas = []
    for k in kernels:
        s = torch.linalg.svdvals(weight_matrix(k).double())
        gammas.append(torch.maximum(s / s[0], torch.linspace(1.0, 0.0, len(s),
                                                             dtype=torch.float64)))
    runs = {
        "plain torch.linalg.svd": lambda: [torch.linalg.svd(weight_matrix(k)) for k in kernels],
        "thin svd of the transpose": lambda: [torch.linalg.svd(weight_matrix(k).mT,
                                                               full_matrices=False)
                                              for k in kernels],
        "sr_static application": lambda: [static_projection(k) for k in kernels],
        "sr_dynamic application": lambda: [dynamic_projection(k, g)
                                           for k, g in zip(kernels, gammas)],
    }
    for name, fn in runs.items():  # warm-up
        if name != "plain torch.linalg.svd":
            fn()
    times: dict[str, list[float]] = {name: [] for name in runs}
    for rep in range(repeats):
        order = list(runs) if rep % 2 == 0 else list(reversed(runs))
        for name in order:
            times[name].append(timed(runs[name]))
    # accuracy against the float64 LAPACK formula
    errors = {name: 0.0 for name in runs}
    for k, g in zip(kernels, gammas):
        m = weight_matrix(k).double()
        u, s, vh = torch.linalg.svd(m.mT, full_matrices=False)  # thin, tall orientation
        u, vh = vh.mT, u.mT
        target = s.clone()
        target[: static_rank(0.5, len(s))] = s[0]
        for name, out, ref in (
                ("sr_static application", static_projection(k), (u * (target / s[0])) @ vh),
                ("sr_dynamic application", dynamic_projection(k, g),
                 (u * (torch.maximum(g, s / s[0]) * s[0])) @ vh)):
            err = float((weight_matrix(out).double() - ref).norm() / ref.norm())
            errors[name] = max(errors[name], err)
    base = statistics.median(times["plain torch.linalg.svd"])
    return [(name, statistics.median(t), base / statistics.median(t), errors[name])
            for name, t in times.items()]


# -- 2. D steps ------------------------------------------------------------------------------


class DStep:
    """One variant's discriminator, optimizer and regularizer, and its D step."""

    def __init__(self, name: str, config: dict, ch: int, batch: int, seed: int = 0) -> None:
        reg_cls = get_registry().regularizers[name]
        arch_cls = get_registry().architectures["resnet32"]
        torch.manual_seed(seed)
        self.d = arch_cls(arch_cls.Config(ch=ch)).build_discriminator()
        self.reg = reg_cls(reg_cls.Config(**config))
        self.reg.apply(self.d)
        self.d.train()
        self.opt = torch.optim.Adam(self.d.parameters(), lr=2e-4, betas=(0.0, 0.9))
        gen = torch.Generator().manual_seed(seed)
        self.x = torch.rand(2 * batch, 3, 32, 32, generator=gen) * 2 - 1  # real + fake
        self.batch = batch
        self.iteration = 0

    def step(self) -> None:
        self.opt.zero_grad(set_to_none=True)
        logits = self.d(self.x)
        loss = F.relu(1 - logits[: self.batch]).mean() + F.relu(1 + logits[self.batch:]).mean()
        loss.backward()
        self.opt.step()
        with torch.no_grad():
            self.reg.after_step(self.d, self.iteration)
        self.iteration += 1


def dstep_table(ch: int, batch: int, repeats: int, block: int
                ) -> list[tuple[str, str, float, float]]:
    runners = [DStep(name, config, ch, batch) for name, config, _ in VARIANTS]
    for r in runners:  # warm-up: one block (includes a projection)
        for _ in range(block):
            r.step()
    per_step: list[list[float]] = [[] for _ in runners]
    ratios: list[list[float]] = [[] for _ in runners]
    for rep in range(repeats):
        # round robin, one D step at a time, so that every variant sees the same load
        order = list(range(len(runners)))
        if rep % 2:
            order.reverse()
        totals = [0.0] * len(runners)
        for _ in range(block):
            for i in order:
                totals[i] += timed(runners[i].step)
        for i in range(len(runners)):
            per_step[i].append(totals[i] / block)
            ratios[i].append(totals[i] / totals[0])
    return [(name, mode, statistics.median(per_step[i]), statistics.median(ratios[i]))
            for i, (name, _, mode) in enumerate(VARIANTS)]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=7, help="D-step blocks per variant")
    parser.add_argument("--svd-repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--every", type=int, default=5, help="D steps per block (SR's every)")
    parser.add_argument("--quick", action="store_true",
                        help="tiny widths and one repeat: a smoke test, not a measurement")
    parser.add_argument("--skip-svd", action="store_true")
    parser.add_argument("--skip-dstep", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    ch128, ch32, batch = (8, 8, 4) if args.quick else (64, 128, 64)
    repeats, svd_repeats = (1, 1) if args.quick else (args.repeats, args.svd_repeats)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    if not args.skip_svd:
        print(f"\nOne SR application on the resnet128 (ch={ch128}) discriminator's 17 conv "
              f"kernels, median of {svd_repeats}:")
        print(f"{'method':<26}{'time (s)':>10}{'speed-up':>10}{'max rel. error':>16}")
        for name, seconds, speedup, err in svd_table(ch128, svd_repeats):
            shown = f"{err:.1e}" if name.startswith("sr_") else "-"
            print(f"{name:<26}{seconds:>10.3f}{speedup:>9.1f}x{shown:>16}")
    if not args.skip_dstep:
        model = f"resnet32 ch={ch32} b={batch}"
        print(f"\nD step (forward of {2 * batch} images, hinge loss, backward, Adam, after_step), "
              f"median of {repeats} repeats of {args.every} steps, interleaved:")
        print(f"{'regularizer':<12}{'mode':<17}{'model':<22}{'ms / D step':>12}{'ratio to sn':>13}")
        for name, mode, seconds, ratio in dstep_table(ch32, batch, repeats, args.every):
            print(f"{name:<12}{mode:<17}{model:<22}{seconds * 1e3:>12.1f}{ratio:>13.3f}")


if __name__ == "__main__":
    main()
