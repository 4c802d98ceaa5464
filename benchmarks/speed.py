"""Speed-ups that change no mathematics (issue 15), each as a ratio measured in one run.

    python benchmarks/speed.py [--repeats 7] [--threads N] [--only NAME ...] [--cpu]

Every measurement runs the new and the old way alternately (the order swapping every other
repeat), takes the ratio new / old within each repeat and prints the median over repeats on one
line, so that load from other processes on the machine cancels out:

- ``eval_sharing``: one evaluation of the quickstart's two metrics (``modes`` and ``digits_fid``
  at the recipe's ``num_samples``, its eval batch size) through :func:`core.eval.runner.evaluate`,
  which generates the samples once for both, against each metric generating its own (``compute``
  on a context without a sample cache, what every evaluation did before); also checks that the
  scores are identical.
- ``g_shortcut``: the quickstart model's G forward and G step (G forward, D forward, hinge G
  loss, backward, Adam step on G; batch ``--batch``) with GBlock's shortcut as conv1x1-upsample
  against upsample-conv1x1 (:func:`plugins.architectures.blocks.upsample_before_shortcut_conv`).

- ``iteration``: one training iteration of the quickstart model through :class:`core.train.Trainer`
  (global batch ``--batch``, n_critic 5: five D steps and a G step) with every exact speed-up,
  against the issue's three switched off (D's parameters frozen in the G step, GBlock's shortcut
  conv before the upsample: :func:`core.train.d_weight_gradients_in_g_step`,
  :func:`~plugins.architectures.blocks.upsample_before_shortcut_conv`; the third, one set of
  samples per evaluation, is not in an iteration) and against all of them off (the D blocks'
  pooling folded into their convolutions too,
  :func:`~plugins.architectures.blocks.pool_after_conv`),
  the three ways rotating per repeat; and the G step alone with D frozen against D's weight
  gradients computed.

- ``d_pooling``: the quickstart D's forward and backward on a D step's real and fake images with
  the blocks' conv3x3-avgpool as one stride-2 convolution against conv then pool.

- ``overhead``: the framework's overhead (issue 15's target: <= 1.01x): the same iteration of the
  quickstart model through the Trainer against :class:`benchmarks.gpu.BareLoop`, the bare loop
  ``benchmarks/gpu.py`` measures the Trainer against, here driving the Trainer's own networks and
  optimizers (so that the two differ in their code only: two instances of one network can differ
  by a few percent in speed on a CPU), on the same data, loss, batch, n_critic, G batch and
  precision. The recipe does not dequantize and runs one micro-batch, so neither loop does
  either; what the bare loop leaves out, the ratio holds: the Trainer's learning-rate schedule,
  its latents drawn from seeded CPU generators, its global-batch sampler, its ``train()`` calls
  and its read-back of the two losses every iteration. In the same repeats it measures a
  control, the bare loop against a second bare loop on the same networks: its ratio is 1 but
  for the machine's noise, which it shows (``--overhead-repeats``, default 3 x ``--repeats``,
  one iteration of each loop per repeat, their order rotating). The overhead being a fixed cost
  per iteration that the convolutions' noise hides at batch 64, the same three loops at batch 2
  measure it in milliseconds (median difference per iteration, with the control's), also given
  as a share of the batch-64 bare iteration.

- ``formats``: the same iteration with ``train.channels_last`` and with ``train.compile``
  (``--backend``, inductor by default), each against eager NCHW in the same run; the first
  compiled iterations (the compile itself) are timed apart.

- ``ema``: one update of the generator EMA (``[generator.ema]``, :mod:`core.ema`) against one G
  step of the quickstart model (issue 12's target: <= 1%).

- ``ddp``: 2 gloo processes against one single-threaded process, :mod:`benchmarks.ddp` with
  DDP's default settings (``benchmarks/ddp.py --variant ...`` measures the alternatives).

Measurements are the entries of :data:`MEASUREMENTS`; each prints one line.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Callable, ContextManager

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.gpu import BareLoop  # noqa: E402
from benchmarks.timing import alternating_ratio, quartiles, rotating_times, timed  # noqa: E402
from core.eval.runner import evaluate  # noqa: E402
from core.interfaces import EvaluationContext  # noqa: E402
from core.recipe import load_recipe  # noqa: E402
from core.train import build_models, build_trainer, d_weight_gradients_in_g_step  # noqa: E402
from plugins.architectures.blocks import (pool_after_conv,  # noqa: E402
                                          upsample_before_shortcut_conv)

from benchmarks.model import SPEED_MODEL, SPEED_RECIPE  # noqa: E402


def quickstart(device: torch.device):
    """The benchmark model (:mod:`benchmarks.model`: the issue's quickstart model, 32x32)."""
    recipe = load_recipe(SPEED_RECIPE, SPEED_MODEL)
    torch.manual_seed(recipe.seed)
    architecture, G, D, _, _ = build_models(recipe)
    return recipe, architecture, G.to(device), D.to(device)


def repeated_under(way: Callable[[], ContextManager], fn: Callable[[], object],
                   times: int) -> Callable[[], None]:
    """A callable that runs ``fn`` ``times`` times within ``way()`` (a speed-up switch, or
    :func:`contextlib.nullcontext`)."""
    def run() -> None:
        with way():
            for _ in range(times):
                fn()
    return run


# -- measurements ---------------------------------------------------------------------------


def eval_sharing(args: argparse.Namespace, device: torch.device) -> str:
    recipe, architecture, G, D = quickstart(device)
    metrics = [spec.create() for spec in recipe.eval.metrics]
    samples = ", ".join(f"{m.name} {m.config.num_samples}" for m in metrics)
    with tempfile.TemporaryDirectory() as root:
        context = EvaluationContext(
            generator=G, architecture=architecture, dataset=recipe.dataset.create(),
            data_root=Path(root), device=device, seed=recipe.seed, iteration=0,
            batch_size=recipe.eval.batch_size, discriminator=D, show_progress=False)
        scores: dict[str, list] = {"shared": [], "alone": []}

        def shared() -> None:
            scores["shared"].append([r["values"] for r in evaluate(metrics, context)])

        def alone() -> None:
            scores["alone"].append([m.compute(context).values for m in metrics])

        alone()  # warm-up: trains the digit classifier, computes the reference statistics
        shared()
        ratio, t_new, t_old = alternating_ratio(shared, alone, args.repeats)
    values = scores["shared"] + scores["alone"]
    same = all(v == values[0] for v in values)  # NaN-free here: modes, kl, digits_fid...
    first = values[0]
    shown = ", ".join(f"{k} {v:.6g}" for result in first for k, v in result.items()
                      if k in ("modes", "digits_fid"))
    return (f"eval_sharing: one evaluation of the quickstart's metrics ({samples} samples, "
            f"batch {recipe.eval.batch_size}): shared / alone = {ratio:.3f}x "
            f"({t_new:.2f} s vs {t_old:.2f} s, median of {args.repeats}); "
            f"scores {'identical' if same else 'DIFFER'} ({shown})")


def g_shortcut(args: argparse.Namespace, device: torch.device) -> str:
    recipe, architecture, G, D = quickstart(device)
    loss = recipe.loss.create()
    G.train()
    D.train()
    optimizer = torch.optim.Adam(G.parameters(), lr=recipe.train.lr_g,
                                 betas=tuple(recipe.train.betas))
    rng = torch.Generator().manual_seed(0)
    z, y = architecture.sample_latents(args.batch, rng, device)
    steps = args.steps

    def forward() -> None:
        with torch.no_grad():
            for _ in range(steps):
                G(z, y)

    def g_step() -> None:
        for _ in range(steps):
            optimizer.zero_grad(set_to_none=True)
            fake = G(z, y)
            loss.generator_loss(D(fake, y)).backward()
            optimizer.step()

    lines = []
    for label, fn in (("G forward", forward), ("G step", g_step)):
        fn()  # warm-up
        with upsample_before_shortcut_conv():
            fn()
        ratio, t_new, t_old = alternating_ratio(
            repeated_under(contextlib.nullcontext, fn, 1),
            repeated_under(upsample_before_shortcut_conv, fn, 1), args.repeats)
        lines.append(f"{label} {ratio:.3f}x ({1e3 * t_new / steps:.1f} vs "
                     f"{1e3 * t_old / steps:.1f} ms)")
    return (f"g_shortcut: quickstart G (resnet32, g_ch {recipe.architecture.config.g_ch}, batch "
            f"{args.batch}), shortcut conv1x1-upsample / upsample-conv1x1: " + "; ".join(lines)
            + f" (median of {args.repeats})")


def loop_trainer(args: argparse.Namespace, device: torch.device, folder: str,
                 extra: list[str] = (), name: str = "run"):
    """(recipe, Trainer) of the quickstart model at global batch ``--batch``, n_critic 5, nothing
    written but the run folder under ``folder``, in training mode."""
    from core.train import make_accelerator

    recipe = load_recipe(SPEED_RECIPE, [
        *SPEED_MODEL, "dataset.num_samples=2048", f"train.batch_size={args.batch}",
        "train.n_critic=5",
        "log.progress=false", "log.sample_every=0", "checkpoint.every=0", "eval.every=0",
        f"train.cpu={'true' if device.type == 'cpu' else 'false'}", *extra])
    trainer = build_trainer(recipe, Path(folder) / name, make_accelerator(recipe), callbacks=[])
    trainer.G.train()
    trainer.D.train()
    return recipe, trainer


def iteration(args: argparse.Namespace, device: torch.device) -> str:
    """The Trainer's iteration with every exact speed-up, against the issue's three switched
    off (D's weight gradients in the G step, GBlock's shortcut upsampling first; the third,
    the shared evaluation samples, is not in an iteration) and against all of them off (the
    D blocks' folded pooling too), the three ways rotating per repeat; then the G step alone
    with D frozen against D's weight gradients."""

    def issues_three() -> ContextManager:
        stack = contextlib.ExitStack()
        stack.enter_context(d_weight_gradients_in_g_step())
        stack.enter_context(upsample_before_shortcut_conv())
        return stack

    def all_off() -> ContextManager:
        stack = issues_three()
        stack.enter_context(pool_after_conv())
        return stack

    ways = {"on": contextlib.nullcontext, "three_off": issues_three, "all_off": all_off}
    with tempfile.TemporaryDirectory() as folder:
        recipe, trainer = loop_trainer(args, device, folder)
        loops = {name: repeated_under(way, trainer.train_iteration, args.steps)
                 for name, way in ways.items()}
        for loop in loops.values():
            loop()  # warm-up, every way
        seconds = rotating_times(loops, args.repeats)
        g_on = repeated_under(contextlib.nullcontext, trainer.generator_step, args.steps)
        g_off = repeated_under(d_weight_gradients_in_g_step, trainer.generator_step, args.steps)
        g_on(), g_off()
        g_ratio, g_new, g_old = alternating_ratio(g_on, g_off, args.repeats)
        trainer.log.close()
    ms = lambda name: 1e3 * statistics.median(seconds[name]) / args.steps  # noqa: E731
    speedup = lambda old: statistics.median(  # noqa: E731
        o / n for o, n in zip(seconds[old], seconds["on"]))
    return (f"iteration: quickstart model (resnet32 ch {recipe.architecture.config.ch}), batch "
            f"{args.batch}, n_critic 5, {ms('on'):.0f} ms with every exact speed-up, "
            f"{ms('three_off'):.0f} ms without the issue's three, {ms('all_off'):.0f} ms without "
            f"any (D's folded pooling off too): speed-up of the issue's three "
            f"{speedup('three_off'):.3f}x, of all {speedup('all_off'):.3f}x; G step, D frozen / "
            f"D's weight gradients {g_ratio:.3f}x ({1e3 * g_new / args.steps:.0f} vs "
            f"{1e3 * g_old / args.steps:.0f} ms) (median of {args.repeats})")


def d_pooling(args: argparse.Namespace, device: torch.device) -> str:
    """The quickstart D's forward and backward (real and fake batches together, as a D step)
    with the blocks' pooling folded into their convolutions against conv-then-pool
    (:func:`plugins.architectures.blocks.pool_after_conv`)."""
    recipe, architecture, G, D = quickstart(device)
    size = architecture.resolution
    images = torch.randn(2 * args.batch, 3, size, size, device=device)

    def step() -> None:
        D.zero_grad(set_to_none=True)
        x = images.clone().requires_grad_(True)
        D(x).sum().backward()

    folded = repeated_under(contextlib.nullcontext, step, args.steps)
    paper = repeated_under(pool_after_conv, step, args.steps)
    folded(), paper()  # warm-up, both ways
    ratio, t_new, t_old = alternating_ratio(folded, paper, args.repeats)
    return (f"d_pooling: quickstart D (resnet32 ch {recipe.architecture.config.ch}, "
            f"{2 * args.batch} images), forward + backward, conv3x3-avgpool folded into one "
            f"stride-2 conv / conv then pool: {ratio:.3f}x ({1e3 * t_new / args.steps:.1f} vs "
            f"{1e3 * t_old / args.steps:.1f} ms) (median of {args.repeats})")


def loop_seconds(args: argparse.Namespace, device: torch.device, repeats: int,
                 iterations: int = 1) -> tuple[object, dict[str, list[float]]]:
    """(recipe, seconds per repeat of ``iterations`` iterations of the Trainer, the bare loop on
    its networks and optimizers, and a second such bare loop), the three rotating
    (:func:`benchmarks.timing.rotating_times`) after one warm-up iteration each."""
    with tempfile.TemporaryDirectory() as folder:
        recipe, trainer = loop_trainer(args, device, folder)
        bare = BareLoop(recipe, trainer.dataset, trainer.acc.device, trainer)
        control = BareLoop(recipe, trainer.dataset, trainer.acc.device, trainer)
        loops = {"trainer": trainer.train_iteration, "bare": bare.iteration,
                 "control": control.iteration}
        for step in loops.values():
            step()  # warm-up, every loop
        seconds = rotating_times(
            {name: repeated_under(contextlib.nullcontext, step, iterations)
             for name, step in loops.items()}, repeats)
        trainer.log.close()
    return recipe, {name: [t / iterations for t in times] for name, times in seconds.items()}


def overhead(args: argparse.Namespace, device: torch.device) -> str:
    """Trainer / bare loop on the same networks and optimizers (:class:`BareLoop` with the
    Trainer's), one iteration of each per repeat (many short alternations hold a slow spell of
    the machine inside one repeat); in the same repeats, a control: the bare loop against a
    second bare loop on the same networks, whose ratio is 1 up to the measurement's noise.

    The overhead is a fixed cost per iteration (Python, Accelerate's wrappers), which the
    convolutions' noise at batch ``--batch`` hides; the same loops at batch 2 (blocks of
    ``--steps`` x 2 iterations) measure it in milliseconds, given as a share of the bare
    iteration at ``--batch`` too."""
    repeats = args.overhead_repeats or 3 * args.repeats
    recipe, seconds = loop_seconds(args, device, repeats)
    small = argparse.Namespace(**{**vars(args), "batch": 2})
    _, fixed = loop_seconds(small, device, repeats, iterations=2 * args.steps)
    ratios = [t / b for t, b in zip(seconds["trainer"], seconds["bare"])]
    noise = [c / b for c, b in zip(seconds["control"], seconds["bare"])]
    (q1, q3), (n1, n3) = quartiles(ratios), quartiles(noise)
    ms = lambda times: 1e3 * statistics.median(times)  # noqa: E731
    extra = ms([t - b for t, b in zip(fixed["trainer"], fixed["bare"])])
    extra_control = ms([c - b for c, b in zip(fixed["control"], fixed["bare"])])
    a = recipe.architecture
    size = a.config.resolution
    return (f"overhead: quickstart model ({a.name} ch {a.config.ch} at {size}x{size}), batch "
            f"{args.batch}, n_critic 5, Trainer / bare loop: {statistics.median(ratios):.3f}x "
            f"(quartiles {q1:.3f}-{q3:.3f}; {ms(seconds['trainer']):.0f} vs "
            f"{ms(seconds['bare']):.0f} ms per iteration, median of {repeats}); control, bare "
            f"loop / a second bare loop: {statistics.median(noise):.3f}x (quartiles "
            f"{n1:.3f}-{n3:.3f}); fixed cost at batch 2, Trainer - bare loop: {extra:.2f} ms "
            f"per iteration ({ms(fixed['trainer']):.1f} vs {ms(fixed['bare']):.1f} ms; control "
            f"{extra_control:+.2f} ms), i.e. {1 + extra / ms(seconds['bare']):.4f}x of the "
            f"batch-{args.batch} iteration; both loops drive the same networks and optimizers; "
            f"the Trainer's lr schedule, seeded CPU latents, sampler and loss read-back are in "
            f"the ratio")


def formats(args: argparse.Namespace, device: torch.device) -> str:
    variants = {"eager": [], "channels_last": ["train.channels_last=true"],
                "compiled": ["train.compile=true", f"train.compile_backend={args.backend}"]}
    with tempfile.TemporaryDirectory() as folder:
        trainers, warm = {}, {}
        for name, extra in variants.items():
            _, trainer = loop_trainer(args, device, folder, extra, name)
            warm[name] = timed(lambda: [trainer.train_iteration() for _ in range(2)])
            trainers[name] = trainer

        def run(trainer):
            return repeated_under(contextlib.nullcontext, trainer.train_iteration, args.steps)

        lines = []
        for name in ("channels_last", "compiled"):
            ratio, t_new, t_old = alternating_ratio(run(trainers[name]), run(trainers["eager"]),
                                                    args.repeats)
            lines.append(f"{name} / eager {ratio:.3f}x ({1e3 * t_new / args.steps:.0f} vs "
                         f"{1e3 * t_old / args.steps:.0f} ms per iteration)")
        for trainer in trainers.values():
            trainer.log.close()
    return (f"formats: quickstart model, batch {args.batch}, n_critic 5: " + "; ".join(lines)
            + f"; first 2 iterations (compile included): compiled {warm['compiled']:.1f} s, "
            f"eager {warm['eager']:.1f} s (median of {args.repeats})")


def ema(args: argparse.Namespace, device: torch.device) -> str:
    with tempfile.TemporaryDirectory() as folder:
        _, trainer = loop_trainer(args, device, folder, ["generator.ema.decay=0.999"])
        average, generator = trainer.ema, trainer.unwrapped(trainer.G)
        update = lambda: [average.update(generator, 10) for _ in range(args.steps)]  # noqa: E731
        step = lambda: [trainer.generator_step() for _ in range(args.steps)]  # noqa: E731
        update(), step()  # warm-up
        ratio, t_update, t_step = alternating_ratio(update, step, args.repeats)
        trainer.log.close()
    return (f"ema: one EMA update / one G step (quickstart G, batch {args.batch}): {100 * ratio:.2f}% "
            f"({1e3 * t_update / args.steps:.2f} vs {1e3 * t_step / args.steps:.0f} ms, median of "
            f"{args.repeats})")


def ddp(args: argparse.Namespace, device: torch.device) -> str:
    """:mod:`benchmarks.ddp`'s comparison, default DDP settings: 2 gloo processes against one
    single-threaded process on the same global batch, alternating, ``--ddp-repeats`` times after
    one uncounted launch of each."""
    from benchmarks.ddp import compare, launch

    if device.type != "cpu":
        return "ddp: skipped (gloo on the CPU; on GPUs use accelerate launch --multi_gpu)"
    for n in (1, 2):  # warm-up launches (imports and files cold on the first), not counted
        launch(n, 1, args.batch, "default")
    speedups, ones, twos = compare(args.ddp_repeats, args.ddp_iterations, args.batch, "default")
    return (f"ddp: 2 gloo processes vs 1 single-threaded process (quickstart model, global batch "
            f"{args.batch}, n_critic 5): speed-up {statistics.median(speedups):.3f}x "
            f"({statistics.median(ones):.2f} s vs {statistics.median(twos):.2f} s per iteration, "
            f"median of {args.ddp_repeats}; repeats {', '.join(f'{x:.3f}' for x in speedups)})")


#: (name, measurement): each returns its one line.
MEASUREMENTS: list[tuple[str, Callable[[argparse.Namespace, torch.device], str]]] = [
    ("eval_sharing", eval_sharing),
    ("g_shortcut", g_shortcut),
    ("iteration", iteration),
    ("d_pooling", d_pooling),
    ("overhead", overhead),
    ("formats", formats),
    ("ema", ema),
    ("ddp", ddp),
]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=7, help="alternating repeats (>= 5)")
    parser.add_argument("--overhead-repeats", type=int, default=None,
                        help="alternating repeats of overhead (default 3 x --repeats)")
    parser.add_argument("--ddp-repeats", type=int, default=5, help="ddp: alternating repeats")
    parser.add_argument("--ddp-iterations", type=int, default=8,
                        help="ddp: timed iterations per launch")
    parser.add_argument("--batch", type=int, default=64, help="G batch size")
    parser.add_argument("--steps", type=int, default=5, help="G forwards / steps per repeat")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--only", nargs="*", default=None, choices=[n for n, _ in MEASUREMENTS])
    parser.add_argument("--cpu", action="store_true", help="stay on the CPU even with a GPU")
    parser.add_argument("--backend", default="inductor", help="torch.compile backend (formats)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() and not args.cpu else "cpu")
    print(f"device {device}, torch {torch.__version__}, {torch.get_num_threads()} threads",
          flush=True)
    for name, measure in MEASUREMENTS:
        if args.only is None or name in args.only:
            print(measure(args, device), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
