"""Training iterations per second of the paper-scale ResNets: the Trainer against a bare loop
(issue 15), in fp32, bf16 autocast and compiled, as a Markdown table for the README.

    python benchmarks/gpu.py                     # on a GPU: both settings, all three modes
    python benchmarks/gpu.py --settings resnet32 --modes fp32,bf16 --iterations 50 --repeats 7
    python benchmarks/gpu.py --tiny              # CPU smoke run: tiny widths, batch 4, < 1 min

Settings, each a base recipe of ``zoo/base/`` with overrides (as speed.py builds the
quickstart's), on synthetic in-memory 8-bit images at the architecture's resolution (no
download; the recipe's ``dequantize`` applies):

- ``resnet128``: ``zoo/base/sr_imagenet.toml``, the conditional projection ResNet at 128x128,
  ch = g_ch = 64, SN on D and G, n_critic 1, hinge, two D forwards per D step; batch 64 in one
  micro-batch (the base's per-process micro-batch);
- ``resnet32``: ``zoo/base/sr_cifar10.toml``, the 32x32 ResNet, ch 128, g_ch 256, SN on D,
  n_critic 5, batch 64, G batch 128.

Modes: ``fp32`` (``train.mixed_precision = "no"``), ``bf16`` (``"bf16"``: Accelerate's autocast;
the bare loop ``torch.autocast(device, torch.bfloat16)``), ``compiled`` (``train.compile =
true``, ``--compile-backend``; the bare loop compiles its networks with the same
:func:`core.compiled.compile_in_place`).

Each (setting, mode) runs in a fresh process (Accelerate fixes the precision once per process,
and the memory is the row's own): it builds the Trainer (:class:`core.train.Trainer`, the
recipe's components, no callbacks) and a :class:`BareLoop` on networks built alike (same
seed, same weights), runs ``--warmup`` untimed iterations of each (the compile included), then
``--repeats`` blocks of ``--iterations`` iterations, Trainer and bare alternately, the order
swapping every repeat (:func:`benchmarks.timing.alternating_ratio`). it/s are from the median
block of each; the overhead is the median over repeats of the Trainer's seconds over the bare
loop's (1.00: none). What the bare loop leaves out, the overhead holds: the Trainer's
learning-rate schedule, its latents drawn on the CPU from seeded generators, its per-place
dequantization noise, its global-batch sampler and its read-back of the two losses (a device
sync) every iteration.

Peak memory: on CUDA ``torch.cuda.max_memory_allocated`` during one block of each loop, less
what was allocated before that loop was built (Trainer / bare); on the CPU the row's process
peak RSS (``resource.getrusage``: both loops and the imports together).

On the CPU (no GPU, or ``--cpu``) ``compiled`` is skipped unless ``--modes`` names it: the first
compile with inductor takes minutes on a small CPU (``--compile-backend aot_eager`` checks the
mode in tens of seconds, but its speed says nothing about inductor's). The output says what was
skipped and why.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.timing import alternating_ratio, timed  # noqa: E402
from core.compiled import compile_in_place  # noqa: E402
from core.data import DEQUANTIZATION_STEP, dequantized  # noqa: E402
from core.interfaces import Regularizer  # noqa: E402
from core.recipe import Recipe, load_recipe  # noqa: E402
from core.train import Trainer, build_networks, make_accelerator, parameters_frozen  # noqa: E402


@dataclass(frozen=True)
class Setting:
    """A base recipe and the overrides that make it one benchmark setting."""

    #: the base recipe, relative to the repository.
    recipe: str
    #: the widths (``--set`` overrides).
    overrides: tuple[str, ...]
    #: the widths with ``--tiny``, in ``overrides``' place.
    tiny: tuple[str, ...]
    #: D's batch, in one micro-batch (``--batch`` replaces it).
    batch: int


SETTINGS: dict[str, Setting] = {
    "resnet128": Setting("zoo/base/sr_imagenet.toml",
                         ("architecture.ch=64", "architecture.g_ch=64"),
                         ("architecture.ch=4", "architecture.g_ch=4"), batch=64),
    "resnet32": Setting("zoo/base/sr_cifar10.toml",
                        ("architecture.ch=128", "architecture.g_ch=256"),
                        ("architecture.ch=8", "architecture.g_ch=8"), batch=64),
}

#: mode -> its recipe overrides.
MODES: dict[str, tuple[str, ...]] = {
    "fp32": ("train.mixed_precision=no",),
    "bf16": ("train.mixed_precision=bf16",),
    "compiled": ("train.mixed_precision=no", "train.compile=true"),
}

#: nothing written but the run folder's log; no samples, checkpoints or evaluations.
QUIET = ("log.progress=false", "log.sample_every=0", 'log.trackers=["jsonl"]', "checkpoint.every=0",
         "eval.every=0")

#: --tiny's defaults (a CPU smoke run); a flag given explicitly wins.
TINY = {"batch": 4, "iterations": 2, "warmup": 1, "repeats": 3}
FULL = {"iterations": 20, "warmup": 5, "repeats": 5}

COMPILE_ON_CPU = ("CPU: inductor's first compile of G and D takes minutes here; name it in "
                  "--modes to measure it (--compile-backend aot_eager checks the mode in tens of "
                  "seconds; its speed is not inductor's)")


# -- the recipe, the data and the two loops -------------------------------------------------


def bench_recipe(name: str, mode: str, args: argparse.Namespace, device: torch.device) -> Recipe:
    """The recipe of setting ``name`` in ``mode``."""
    setting = SETTINGS[name]
    overrides = [*QUIET, *(setting.tiny if args.tiny else setting.overrides), *MODES[mode],
                 f"train.batch_size={args.batch or setting.batch}", "train.micro_batch_size=0",
                 f"train.num_workers={args.workers}",
                 f"train.compile_backend={args.compile_backend}",
                 f"train.cpu={'true' if device.type == 'cpu' else 'false'}"]
    return load_recipe(REPO / setting.recipe, overrides)


class SyntheticImages(torch.utils.data.Dataset):
    """``num_samples`` random 8-bit images as ``(p / 127.5 - 1, label)`` items (the form of every
    image dataset's items), fixed by ``seed``, held in memory as ``uint8``."""

    def __init__(self, num_samples: int, resolution: int, num_classes: int, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.pixels = torch.randint(0, 256, (num_samples, 3, resolution, resolution),
                                    dtype=torch.uint8, generator=g)
        self.labels = torch.randint(0, max(1, num_classes), (num_samples,), generator=g)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.pixels[index].float() / 127.5 - 1.0, int(self.labels[index])


def synthetic_data(recipe: Recipe) -> SyntheticImages:
    """Eight global batches of images at the recipe's architecture's resolution and classes."""
    architecture = recipe.architecture.create()
    return SyntheticImages(8 * recipe.train.batch_size, architecture.resolution,
                           architecture.num_classes, recipe.seed)


def synthetic_trainer(recipe: Recipe, run_dir: Path, dataset: torch.utils.data.Dataset) -> Trainer:
    """:func:`core.train.build_trainer`'s Trainer with ``dataset`` in the recipe's data's place
    (its plugin still decides ``dequantize``), no callbacks, in training mode."""
    accelerator = make_accelerator(recipe)
    torch.manual_seed(recipe.seed)
    architecture, G, D, d_regs, g_regs = build_networks(recipe)
    trainer = Trainer(architecture=architecture, generator=G, discriminator=D,
                      loss=recipe.loss.create(), dataset=dataset,
                      dataset_plugin=recipe.dataset.create(), d_regularizer=d_regs,
                      g_regularizer=g_regs, ema=recipe.generator.ema, train=recipe.train,
                      log=recipe.log, checkpoint=recipe.checkpoint, seed=recipe.seed,
                      run_dir=run_dir, accelerator=accelerator, callbacks=[])
    trainer.G.train()
    trainer.D.train()
    return trainer


def _parametrization_only(regularizer: Regularizer) -> bool:
    """Whether ``regularizer`` acts through its parametrization alone (no penalty, nothing after
    the optimizer step): what the bare loop runs of it."""
    cls = type(regularizer)
    return all(getattr(cls, hook) is getattr(Regularizer, hook)
               for hook in ("penalty", "loss_term", "after_step"))


class BareLoop:
    """The hand-written loop the Trainer is measured against: the recipe's networks (built as
    the Trainer builds them), Adam, loss, batch, n_critic, G batch, D forwards (joint or
    separate), precision and compile, in plain PyTorch: a shuffling DataLoader, latents drawn on
    the device, ``x / 128 - 1 + U(0, 1/128)`` where the recipe dequantizes, D's parameters frozen
    in the G step, no read-back of the losses.

    With ``trainer``, the loop drives that Trainer's own networks and (unwrapped) optimizers
    instead of building its own: the two loops then differ in their code only, not in where
    their tensors lie in memory (two instances of the same network can differ by a few percent
    in speed on a CPU, which would pass for overhead)."""

    def __init__(self, recipe: Recipe, dataset: torch.utils.data.Dataset,
                 device: torch.device, trainer: Trainer | None = None) -> None:
        t = recipe.train
        if trainer is None:
            torch.manual_seed(recipe.seed)
            self.architecture, G, D, d_regs, g_regs = build_networks(recipe)
        else:
            self.architecture, d_regs, g_regs = trainer.architecture, trainer.d_regs, trainer.g_regs
            G, D = trainer.unwrapped(trainer.G), trainer.unwrapped(trainer.D)
        if not all(_parametrization_only(r) for r in (*d_regs, *g_regs)):
            raise SystemExit("the bare loop runs regularizers' parametrizations only; this "
                             "recipe's regularizers also add penalties or act after steps")
        self.loss = recipe.loss.create()
        if getattr(self.loss, "needs_real_logits", False):
            raise SystemExit(f"the bare loop has no G step for loss {self.loss.name!r}")
        self.G, self.D = G.to(device).train(), D.to(device).train()
        if trainer is not None:  # the torch optimizers inside Accelerate's wrappers
            self.opt_g, self.opt_d = trainer.opt_g.optimizer, trainer.opt_d.optimizer
        else:
            self.opt_g = torch.optim.Adam(self.G.parameters(), lr=t.lr_g, betas=tuple(t.betas))
            self.opt_d = torch.optim.Adam(self.D.parameters(), lr=t.lr_d, betas=tuple(t.betas))
            if t.compile:
                compile_in_place(self.G, t.compile_backend)
                compile_in_place(self.D, t.compile_backend)
        self.device, self.n_critic, self.batch = device, t.n_critic, t.batch_size
        self.g_batch = t.batch_size * t.g_batch_multiplier
        self.separate = t.d_forward == "separate"
        self.dequantize = recipe.dataset.create().dequantize
        self.bf16 = t.mixed_precision == "bf16"
        self.loader = torch.utils.data.DataLoader(
            dataset, batch_size=self.batch, shuffle=True, drop_last=True,
            num_workers=t.num_workers, pin_memory=device.type == "cuda",
            persistent_workers=t.num_workers > 0)
        self.batches = self._forever()

    def _forever(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        while True:
            for images, labels in self.loader:
                images = images.to(self.device, non_blocking=True)
                if self.dequantize:
                    images = dequantized(images, torch.rand_like(images) * DEQUANTIZATION_STEP)
                yield images, labels.to(self.device, non_blocking=True)

    def autocast(self) -> torch.autocast:
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16)

    def latents(self, n: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        z = torch.randn(n, self.architecture.z_dim, device=self.device)
        y = None
        if self.architecture.conditional:
            y = torch.randint(0, self.architecture.num_classes, (n,), device=self.device)
        return z, y

    def d_logits(self, real, labels, fake, y_fake) -> tuple[torch.Tensor, torch.Tensor]:
        if self.separate:
            return self.D(real, labels).float(), self.D(fake, y_fake).float()
        y = torch.cat([labels, y_fake]) if y_fake is not None else None
        logits = self.D(torch.cat([real, fake]), y).float()
        return logits[:len(real)], logits[len(real):]

    def d_step(self) -> None:
        real, labels = next(self.batches)
        z, y_fake = self.latents(self.batch)
        with torch.no_grad(), self.autocast():
            fake = self.G(z, y_fake).to(real.dtype)
        with self.autocast():
            real_logits, fake_logits = self.d_logits(real, labels, fake, y_fake)
        loss = self.loss.discriminator_loss(real_logits, fake_logits)
        self.opt_d.zero_grad(set_to_none=True)
        loss.backward()
        self.opt_d.step()

    def g_step(self) -> None:
        z, y = self.latents(self.g_batch)
        with parameters_frozen(self.D), self.autocast():
            fake_logits = self.D(self.G(z, y), y).float()
        loss = self.loss.generator_loss(fake_logits)
        self.opt_g.zero_grad(set_to_none=True)
        loss.backward()
        self.opt_g.step()

    def iteration(self) -> None:
        for _ in range(self.n_critic):
            self.d_step()
        self.g_step()


# -- one row, in its own process ------------------------------------------------------------


def block(step: Callable[[], object], iterations: int) -> Callable[[], None]:
    def run() -> None:
        for _ in range(iterations):
            step()
    return run


def allocated(device: torch.device) -> int:
    return torch.cuda.memory_allocated(device) if device.type == "cuda" else 0


def cuda_peak(run: Callable[[], None], device: torch.device, before: int) -> int:
    """Bytes allocated at the peak of ``run()`` beyond ``before``."""
    torch.cuda.reset_peak_memory_stats(device)
    timed(run)
    return torch.cuda.max_memory_allocated(device) - before


def peak_rss_mib() -> float:
    """This process's peak resident set so far, MiB (``ru_maxrss``: KiB on Linux, bytes on
    macOS)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / (2**20 if sys.platform == "darwin" else 2**10)


def prepared(build: Callable[[], object], step_of: Callable[[object], Callable[[], object]],
             args: argparse.Namespace, device: torch.device) -> tuple[object, Callable[[], None],
                                                                     float, int]:
    """(the loop, its timed block, warm-up seconds, peak bytes on CUDA) of a loop ``build()``
    makes, warmed up."""
    before = allocated(device)
    loop = build()
    run = block(step_of(loop), args.iterations)
    warm = timed(block(step_of(loop), args.warmup))
    peak = cuda_peak(run, device, before) if device.type == "cuda" else 0
    return loop, run, warm, peak


def measure_row(name: str, mode: str, args: argparse.Namespace, device: torch.device) -> dict:
    """it/s of the Trainer and the bare loop, their overhead ratio, memory and warm-up."""
    recipe = bench_recipe(name, mode, args, device)
    dataset = synthetic_data(recipe)
    with tempfile.TemporaryDirectory() as folder:
        trainer, run_trainer, warm_trainer, peak_trainer = prepared(
            lambda: synthetic_trainer(recipe, Path(folder) / "run", dataset),
            lambda t: t.train_iteration, args, device)
        bare, run_bare, warm_bare, peak_bare = prepared(
            lambda: BareLoop(recipe, dataset, device), lambda b: b.iteration, args, device)
        ratio, t_trainer, t_bare = alternating_ratio(run_trainer, run_bare, args.repeats)
        trainer.log.close()
    if device.type == "cuda":
        memory = f"{peak_trainer / 2**20:.0f} / {peak_bare / 2**20:.0f} MiB"
    else:
        memory = f"{peak_rss_mib():.0f} MiB peak RSS (process, both loops)"
    return {"trainer": args.iterations / t_trainer, "bare": args.iterations / t_bare,
            "overhead": ratio, "memory": memory,
            "warmup": {"trainer": warm_trainer, "bare": warm_bare}}


def worker(out: Path, args: argparse.Namespace) -> None:
    device = pick_device(args)
    name, mode = args.settings[0], args.modes[0]
    out.write_text(json.dumps(measure_row(name, mode, args, device)))


# -- the driver -----------------------------------------------------------------------------


def pick_device(args: argparse.Namespace) -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() and not args.cpu else "cpu")


def skip_reason(mode: str, args: argparse.Namespace, device: torch.device) -> str | None:
    """Why ``mode`` is not measured here (None: it is)."""
    if mode == "compiled" and device.type == "cpu" and not args.modes_given:
        return COMPILE_ON_CPU
    if mode == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        return f"{torch.cuda.get_device_name(device)} has no bf16"
    return None


def worker_argv(args: argparse.Namespace, name: str, mode: str, out: Path) -> list[str]:
    argv = [sys.executable, str(Path(__file__).resolve()), "--worker", str(out),
            "--settings", name, "--modes", mode, "--iterations", str(args.iterations),
            "--warmup", str(args.warmup), "--repeats", str(args.repeats),
            "--workers", str(args.workers), "--compile-backend", args.compile_backend]
    for flag, on in (("--tiny", args.tiny), ("--cpu", args.cpu)):
        if on:
            argv.append(flag)
    if args.batch:
        argv += ["--batch", str(args.batch)]
    if args.threads:
        argv += ["--threads", str(args.threads)]
    return argv


def run_row(args: argparse.Namespace, name: str, mode: str) -> dict | str:
    """The row's measurements from a fresh process, or why it failed."""
    with tempfile.TemporaryDirectory() as folder:
        out = Path(folder) / "row.json"
        done = subprocess.run(worker_argv(args, name, mode, out), cwd=REPO, capture_output=True,
                              text=True)
        if done.returncode != 0 or not out.is_file():
            return f"exit {done.returncode}: {done.stderr.strip()[-2000:]}"
        return json.loads(out.read_text())


def describe(name: str, args: argparse.Namespace, device: torch.device) -> str:
    """One line: what setting ``name`` trains."""
    recipe = bench_recipe(name, "fp32", args, device)
    a, t = recipe.architecture, recipe.train
    arch = recipe.architecture.create()
    regs = {net: ", ".join(s.name for s in getattr(recipe, net).regularizer_specs) or "none"
            for net in ("discriminator", "generator")}
    return (f"- {name}: {SETTINGS[name].recipe}, {a.name} ch {a.config.ch}, g_ch {a.config.g_ch}, "
            f"{arch.resolution}x{arch.resolution}, {arch.num_classes} classes, batch "
            f"{t.batch_size} (G {t.batch_size * t.g_batch_multiplier}), n_critic {t.n_critic}, "
            f"{recipe.loss.name}, D: {regs['discriminator']}, G: {regs['generator']}, d_forward "
            f"{t.d_forward}, dequantize {str(recipe.dataset.create().dequantize).lower()}")


def label(name: str, args: argparse.Namespace) -> str:
    setting = SETTINGS[name]
    ch = dict(o.split("=") for o in (setting.tiny if args.tiny else setting.overrides))
    return f"{name} ch {ch['architecture.ch']}" + (" (tiny)" if args.tiny else "")


HEADER = ("| setting | mode | it/s Trainer | it/s bare | overhead (Trainer / bare time) | "
          "peak memory (Trainer / bare) |\n|---|---|---:|---:|---:|---|")


def table_row(setting: str, mode: str, result: dict | str | None) -> str:
    if isinstance(result, dict):
        return (f"| {setting} | {mode} | {result['trainer']:.2f} | {result['bare']:.2f} | "
                f"{result['overhead']:.3f} | {result['memory']} |")
    why = "skipped (see below)" if result is None else "FAILED (see above)"
    return f"| {setting} | {mode} | – | – | – | {why} |"


def notes(args: argparse.Namespace, skipped: dict[str, list[str]]) -> list[str]:
    """The lines under the table: what was skipped and why, the backend, what overhead means."""
    lines = [f"- skipped: {', '.join(rows)}: {reason}" for reason, rows in skipped.items()]
    if "compiled" in args.modes and not any("compiled" in r for rows in skipped.values()
                                            for r in rows):
        lines.append(f"- compiled: torch.compile backend {args.compile_backend}")
    return lines + ["- overhead: the Trainer's seconds per iteration over the bare loop's, "
                    "median of per-repeat ratios (1.00: none)"]


def comma_list(choices: list[str]) -> Callable[[str], list[str]]:
    def parse(text: str) -> list[str]:
        items = [s.strip() for s in text.split(",") if s.strip()]
        unknown = [s for s in items if s not in choices]
        if unknown or not items:
            raise argparse.ArgumentTypeError(f"{text!r}: choose from {', '.join(choices)}")
        return items
    return parse


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--settings", type=comma_list(list(SETTINGS)), default=list(SETTINGS),
                        help=f"comma-separated, of {', '.join(SETTINGS)} (default: all)")
    parser.add_argument("--modes", type=comma_list(list(MODES)), default=None,
                        help="comma-separated, of fp32,bf16,compiled (default: all; on the CPU "
                             "compiled only when named)")
    parser.add_argument("--tiny", action="store_true",
                        help=f"tiny widths and defaults {TINY} (a CPU smoke run)")
    parser.add_argument("--iterations", type=int, default=None,
                        help=f"timed iterations per block (default {FULL['iterations']})")
    parser.add_argument("--warmup", type=int, default=None,
                        help=f"untimed iterations first, compile included "
                             f"(default {FULL['warmup']})")
    parser.add_argument("--repeats", type=int, default=None,
                        help=f"alternating Trainer/bare repeats (default {FULL['repeats']})")
    parser.add_argument("--batch", type=int, default=None,
                        help="D's batch (default: 64; --tiny 4); G's is the recipe's multiple")
    parser.add_argument("--workers", type=int, default=0, help="DataLoader workers (both loops)")
    parser.add_argument("--compile-backend", default="inductor", help="torch.compile backend")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--cpu", action="store_true", help="stay on the CPU even with a GPU")
    parser.add_argument("--worker", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    for key, least in (("iterations", 1), ("warmup", 0), ("repeats", 1), ("batch", 1)):
        value = getattr(args, key)
        if value is not None and value < least:
            parser.error(f"--{key} must be at least {least}, got {value}")
    args.modes_given = args.modes is not None
    args.modes = args.modes or list(MODES)
    defaults = {**FULL, "batch": None, **(TINY if args.tiny else {})}
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def measure_all(args: argparse.Namespace,
                device: torch.device) -> tuple[list[str], dict[str, list[str]], bool]:
    """(the table's rows, reason -> the rows skipped for it, whether a row failed)."""
    rows, skipped, failed = [], {}, False
    for setting in args.settings:
        for mode in args.modes:
            reason = skip_reason(mode, args, device)
            result = None if reason else run_row(args, setting, mode)
            if reason:
                skipped.setdefault(reason, []).append(f"{setting} {mode}")
            elif isinstance(result, str):
                failed = True
                print(f"{setting} {mode} FAILED: {result}", flush=True)
            else:
                print(f"{setting} {mode}: warm-up {result['warmup']['trainer']:.1f} s Trainer, "
                      f"{result['warmup']['bare']:.1f} s bare", flush=True)
            rows.append(table_row(label(setting, args), mode, result))
    return rows, skipped, failed


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.worker is not None:
        worker(args.worker, args)
        return 0
    device = pick_device(args)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"device {name}, torch {torch.__version__}, {torch.get_num_threads()} CPU threads; "
          f"{args.iterations} timed iterations per block after {args.warmup} warm-up, median of "
          f"{args.repeats} alternating repeats, each row in a fresh process", flush=True)
    for setting in args.settings:
        print(describe(setting, args, device), flush=True)
    rows, skipped, failed = measure_all(args, device)
    print("\n" + HEADER + "\n" + "\n".join(rows) + "\n")
    print("\n".join(notes(args, skipped)), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
