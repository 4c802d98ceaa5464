"""The GAN training loop on HuggingFace Accelerate (SN-GAN's schedule, Miyato et al. 2018, Alg. 1).

One iteration = ``n_critic`` discriminator steps, then one generator step. Each step runs its
micro-batches itself (no ``accelerator.accumulate``: D and G would share its step counter), so
that k micro-batches are exactly k processes with one micro-batch each (and, for networks without
batch statistics, one batch k times as large):

- the loss of each micro-batch is divided by k and gradients are all-reduced on the last one only
  (``no_sync`` before);
- network state (power iteration, G's BatchNorm running statistics) is updated by the first
  micro-batch of a step only (:func:`core.layers.frozen_state` for the others), also in the G
  forward that makes a D step's fakes (issue 11.1);
- real and fake images go through D in one forward pass (``train.d_forward = "joint"``: one
  power-iteration step per D step) or in two (``"separate"``: two steps, as the SN-GAN and SR
  Chainer updaters); D's forward in the G step advances D's state unless
  ``train.d_state_in_g_step = "frozen"`` (BSN's TF code).

Each micro-batch, every regularizer whose lazy interval (``penalty_every``) selects the network's
current optimizer step gets a :class:`core.interfaces.StepContext` and returns its ``penalty``,
which is multiplied by ``penalty_every`` and joins the loss before the division by k. Reals
``requires_grad`` only in D steps where an active D regularizer ``needs`` ``"real_grad"``. A loss
that ``needs_real_logits`` gets D's logits of a real micro-batch in the G step too. In the G step
D's parameters do not require grad (:func:`parameters_frozen`): G's gradient flows through D's
activations, D's weight gradients are not computed (issue 15; they were discarded anyway).

After each optimizer step the network's regularizers get ``after_step`` (SR's projection, SPEC
§2.3), in order; after G's, the EMA of G (``[generator.ema]``, :mod:`core.ema`) is updated.
Sample grids and evaluation use the EMA when there is one. Training callbacks (:class:`core.interfaces.Callback`: the spectral monitor, a user's own)
hook into the loop at its start, after each iteration and at its end.

:class:`Trainer` takes its components and settings as explicit arguments (as NVlabs/edm's
``training_loop``); :func:`build_trainer` builds them from a recipe, the way :mod:`core.run` and
the tests make a trainer::

    trainer = build_trainer(load_recipe("zoo/quickstart.toml"), Path("runs/x"))
    trainer.fit()
"""

from __future__ import annotations

import contextlib
import math
import signal
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn

from core import checkpoint as ckpt
from core.data import (BatchPlan, GlobalBatchSampler, dequantization_noise, dequantized,
                       micro_batch_places)
from core.errors import SpecregError
from core.ema import GeneratorEMA
from core.interfaces import Architecture, Callback, Dataset, Loss, Regularizer, StepContext
from core.tracking import RunLog
from core.recipe import CheckpointSection, EMASection, LogSection, Recipe, RecipeError, TrainSection
from core.layers import frozen_state


class NonFiniteLossError(SpecregError):
    """A loss became NaN or infinite; the message names the iteration and the last checkpoint."""

    exit_code = 1


#: D's parameters do not require grad during the G step (True, the default: the gradient still
#: flows to G through D's activations; D's weight gradients would be computed and thrown away).
_FREEZE_D_IN_G_STEP = True


@contextlib.contextmanager
def d_weight_gradients_in_g_step() -> Iterator[None]:
    """Within the block, the G step also computes D's weight gradients (discarded at the next D
    step), as before they were skipped: for benchmarks and tests only, not a recipe setting."""
    global _FREEZE_D_IN_G_STEP
    previous, _FREEZE_D_IN_G_STEP = _FREEZE_D_IN_G_STEP, False
    try:
        yield
    finally:
        _FREEZE_D_IN_G_STEP = previous


@contextlib.contextmanager
def parameters_frozen(module: nn.Module) -> Iterator[None]:
    """``module``'s parameters that require grad do not, within the block (restored after it,
    also on an error)."""
    frozen = [p for p in module.parameters() if p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in frozen:
            p.requires_grad_(True)


class RunInterrupted(SpecregError):
    """SIGINT or SIGTERM stopped the run after an iteration (a checkpoint of it saved)."""

    def __init__(self, message: str, signum: int) -> None:
        super().__init__(message)
        self.exit_code = 128 + signum  # 130 for SIGINT, 143 for SIGTERM (the shell's codes)


#: the signals :meth:`Trainer.fit` turns into "finish the iteration, save, stop"
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def weights_finite(*models: nn.Module) -> bool:
    """Whether every parameter and buffer of ``models`` is finite (no NaN, no inf)."""
    return all(bool(torch.isfinite(t).all()) for m in models
               for t in (*m.parameters(), *m.buffers()) if t.is_floating_point())


#: the training-callback plugin kind under its earlier name (callbacks subclass either).
TrainingCallback = Callback


def _parametrized_weights(module: nn.Module) -> dict[str, int]:
    """``{"layer.weight": number of parametrizations}`` of every parametrized tensor."""
    from torch.nn.utils import parametrize

    out = {}
    for name, sub in module.named_modules():
        if parametrize.is_parametrized(sub):
            for tensor_name, plist in sub.parametrizations.items():
                out[f"{name}.{tensor_name}" if name else tensor_name] = len(plist)
    return out


def apply_regularizers(module: nn.Module, regularizers: list[Regularizer],
                       where: str) -> nn.Module:
    """``module`` with each regularizer applied in order. Two that parametrize the same weight
    are a :class:`~core.recipe.RecipeError` naming both (``where``: the recipe table)."""
    owner: dict[str, str] = {}
    for reg in regularizers:
        before = _parametrized_weights(module)
        try:
            module = reg.apply(module)
        except (SpecregError, ValueError) as exc:  # a built-in refuses parametrized weights
            earlier = sorted({owner[w] for w in before if w in owner})
            if not earlier:
                raise
            raise RecipeError([
                f"{where}: regularizers '{earlier[0]}' and '{reg.name}' both parametrize the "
                f"same weight; keep one of them ({str(exc).splitlines()[0]})"]) from None
        after = _parametrized_weights(module)
        grown = [w for w, n in after.items() if n > before.get(w, 0)]
        clash = [w for w in grown if w in owner]
        if clash:
            raise RecipeError([
                f"{where}: regularizers '{owner[clash[0]]}' and '{reg.name}' both parametrize "
                f"the same weight ({clash[0]}{' and %d more' % (len(clash) - 1) if len(clash) > 1 else ''}); "
                f"keep one of them"])
        owner.update({w: reg.name for w in grown})
    return module


def build_networks(recipe: Recipe) -> tuple[Architecture, nn.Module, nn.Module,
                                            list[Regularizer], list[Regularizer]]:
    """The architecture, G and D with the recipe's regularizers applied (in order), and the
    regularizer lists of D and G."""
    architecture = recipe.architecture.create()
    generator = architecture.build_generator()
    discriminator = architecture.build_discriminator()
    d_regs = [spec.create() for spec in recipe.discriminator.regularizer_specs]
    g_regs = [spec.create() for spec in recipe.generator.regularizer_specs]
    discriminator = apply_regularizers(discriminator, d_regs, "discriminator.regularizers")
    generator = apply_regularizers(generator, g_regs, "generator.regularizers")
    return architecture, generator, discriminator, d_regs, g_regs


def build_models(recipe: Recipe) -> tuple[Architecture, nn.Module, nn.Module,
                                          Regularizer | None, Regularizer | None]:
    """The architecture, G and D with the recipe's regularizers applied; each network's first
    regularizer (or None): the v1 form of :func:`build_networks`."""
    architecture, G, D, d_regs, g_regs = build_networks(recipe)
    return architecture, G, D, (d_regs[0] if d_regs else None), (g_regs[0] if g_regs else None)


def make_accelerator(recipe: Recipe):
    """The Accelerator of ``recipe``'s ``[train]`` section (``cpu``, ``mixed_precision``)."""
    return _accelerator(recipe.train)


def _accelerator(train: TrainSection):
    from accelerate import Accelerator

    # DDP's defaults broadcast buffers (power-iteration vectors, BatchNorm statistics) from
    # process 0 at every forward pass
    return Accelerator(cpu=train.cpu or not torch.cuda.is_available(),
                       mixed_precision=train.mixed_precision)


def build_trainer(recipe: Recipe, run_dir: Path, accelerator=None,
                  callbacks: list[Callback] | None = None) -> "Trainer":
    """The :class:`Trainer` for ``recipe``: builds its components and hands the loop the sections
    it uses. ``callbacks=None`` gives the recipe's ``[callbacks.NAME]`` (default-enabled ones
    included) from the registry; a list is used as it is (``[]``: none)."""
    acc = accelerator or make_accelerator(recipe)
    t = recipe.train
    # the batch arithmetic and the data are checked before anything is written (exit 2, no
    # run folder)
    BatchPlan.derive(t.batch_size, acc.num_processes, t.micro_batch_size, t.g_batch_multiplier)
    if t.compile:
        from core.compiled import check_backend

        check_backend(t.compile_backend)
    if callbacks is None:
        callbacks = [spec.create() for spec in recipe.callbacks.values()]
    torch.manual_seed(recipe.seed)  # model initialization is identical on every process
    architecture, G, D, d_regs, g_regs = build_networks(recipe)
    loss = recipe.loss.create()
    dataset_plugin = recipe.dataset.create()
    with acc.main_process_first():  # one process downloads, the others then read
        dataset = dataset_plugin.build(Path(recipe.data_root), "train")
    return Trainer(architecture=architecture, generator=G, discriminator=D, loss=loss,
                   dataset=dataset, dataset_plugin=dataset_plugin, d_regularizer=d_regs,
                   g_regularizer=g_regs, ema=recipe.generator.ema, train=recipe.train,
                   log=recipe.log,
                   checkpoint=recipe.checkpoint, eval_every=recipe.eval.every, seed=recipe.seed,
                   run_dir=run_dir, accelerator=acc, callbacks=callbacks)


def _as_list(regularizer: Regularizer | list[Regularizer] | None) -> list[Regularizer]:
    if regularizer is None:
        return []
    return list(regularizer) if isinstance(regularizer, (list, tuple)) else [regularizer]


class Trainer:
    """Trains G and D into one run folder (every process builds one).

    Args:
        architecture: the :class:`core.interfaces.Architecture` the networks come from (latent
            size, classes; a regularizer switch rebuilds D from it).
        generator: G, its regularizer (if any) already applied.
        discriminator: D, likewise.
        loss: the adversarial :class:`core.interfaces.Loss`.
        dataset: the built torch dataset of ``(image in [-1, 1], label)`` items.
        dataset_plugin: the :class:`core.interfaces.Dataset` that built it (its ``dequantize``;
            evaluation uses it).
        d_regularizer: the regularizer applied to D, a list of them (applied in that order), or
            None: each one's ``penalty`` joins D's loss, its ``after_step`` follows D's
            optimizer steps.
        g_regularizer: likewise for G.
        ema: ``[generator.ema]``, or None: an EMA of G (:mod:`core.ema`), sampled and evaluated
            in G's place.
        train: ``[train]``: iterations, batch, n_critic, learning rates, betas, decay, workers.
        log: ``[log]``: loss-logging and sample-grid intervals, grid size, progress bar,
            trackers.
        checkpoint: ``[checkpoint]``: interval (iterations) and how many to keep.
        eval_every: evaluate every this many iterations (0 = only at the end), when
            :meth:`fit` is given an ``evaluate``.
        seed: latents, fake labels, data order and sample grid derive from it.
        run_dir: the run folder (metrics, samples, checkpoints).
        accelerator: an ``accelerate.Accelerator`` (default: one from ``train``); G, D and their
            optimizers are prepared by it here.
        callbacks: :class:`core.interfaces.Callback` instances, run in this order.
    """

    def __init__(self, *, architecture: Architecture, generator: nn.Module,
                 discriminator: nn.Module, loss: Loss, dataset: torch.utils.data.Dataset,
                 dataset_plugin: Dataset,
                 d_regularizer: Regularizer | list[Regularizer] | None = None,
                 g_regularizer: Regularizer | list[Regularizer] | None = None,
                 ema: EMASection | None = None, train: TrainSection,
                 log: LogSection, checkpoint: CheckpointSection, eval_every: int = 0,
                 seed: int = 0, run_dir: Path, accelerator=None,
                 callbacks: list[Callback] | tuple[Callback, ...] = ()) -> None:
        self.run_dir = Path(run_dir)
        self.train_section, self.log_section = train, log
        self.checkpoint_section, self.eval_every, self.seed = checkpoint, eval_every, seed
        self.acc = accelerator or _accelerator(train)
        self._unwrapped: dict[str, tuple[nn.Module, nn.Module]] = {}  # see unwrapped()
        self.callbacks = list(callbacks)
        self.plan = BatchPlan.derive(train.batch_size, self.acc.num_processes,
                                     train.micro_batch_size, train.g_batch_multiplier)
        self.architecture, self.loss = architecture, loss
        self.dataset, self.dataset_plugin = dataset, dataset_plugin
        self.d_regs, self.g_regs = _as_list(d_regularizer), _as_list(g_regularizer)
        generator, discriminator = self._in_memory_format(generator, discriminator)
        opt_g = self.build_optimizer(generator, train.lr_g)
        opt_d = self.build_optimizer(discriminator, train.lr_d)
        self.G, self.D, self.opt_g, self.opt_d = self.acc.prepare(generator, discriminator,
                                                                  opt_g, opt_d)
        self._compile(generator, discriminator)
        # optimizer steps of each network so far (StepContext.step; lazy ``penalty_every``)
        self.d_steps = self.g_steps = 0
        self.ema: GeneratorEMA | None = None
        if ema is not None:
            images = self.plan.micro_batch * self.plan.g_multiplier * self.plan.accumulation \
                * self.acc.num_processes  # G's global batch per step
            self.ema = GeneratorEMA(self.unwrapped(self.G), ema.decay_per_step(images), ema.start)
        # latents and fake labels come from their own generators (saved in checkpoints), seeded
        # alike on every process: each draw is the block of all processes, of which this process
        # takes its share, so the set of latents of a step does not depend on how the global
        # batch is split over processes and micro-batches
        self.noise = torch.Generator().manual_seed(seed * 7919 + 1)
        self.label_rng = torch.Generator().manual_seed(seed * 7919 + 104_729)
        self.iteration = 0
        self.data_position = 0  # global batches consumed
        self.best: dict[str, Any] = {}
        self.log = RunLog(self.run_dir, self.acc.is_main_process, log.trackers)
        self.writer = ckpt.CheckpointWriter(self.run_dir, self.acc, checkpoint.keep)
        self.last_checkpoint: Path | None = None
        self._data_iter: Iterator | None = None

    def _in_memory_format(self, *networks: nn.Module) -> tuple[nn.Module, ...]:
        """``train.channels_last``: the networks in the channels-last format (:mod:`core.compiled`),
        else as they are."""
        if not self.train_section.channels_last:
            return networks
        from core.compiled import to_channels_last

        return tuple(to_channels_last(network) for network in networks)

    def _compile(self, *networks: nn.Module) -> None:
        """``train.compile``: each network compiled in place (:mod:`core.compiled`)."""
        if self.train_section.compile:
            from core.compiled import compile_in_place

            for network in networks:
                compile_in_place(network, self.train_section.compile_backend)

    def build_optimizer(self, model: nn.Module, lr: float) -> torch.optim.Optimizer:
        """Adam over ``model``'s parameters (in ``parameters()`` order) with ``train.betas``."""
        return torch.optim.Adam(model.parameters(), lr=lr, betas=tuple(self.train_section.betas))

    # the first regularizer of each network: code written for one regularizer per network reads
    # and sets these (setting replaces the whole list)

    @property
    def d_reg(self) -> Regularizer | None:
        return self.d_regs[0] if self.d_regs else None

    @d_reg.setter
    def d_reg(self, regularizer: Regularizer | list[Regularizer] | None) -> None:
        self.d_regs = _as_list(regularizer)

    @property
    def g_reg(self) -> Regularizer | None:
        return self.g_regs[0] if self.g_regs else None

    @g_reg.setter
    def g_reg(self, regularizer: Regularizer | list[Regularizer] | None) -> None:
        self.g_regs = _as_list(regularizer)

    def replace_discriminator(self, discriminator: nn.Module,
                              regularizer: Regularizer | list[Regularizer] | None) -> None:
        """Train ``discriminator`` (with ``regularizer`` applied) from here on, with a fresh
        optimizer, both prepared by the accelerator (under DDP: a new wrapper). Every process
        calls it at the same point; the caller loads any state into them
        (:mod:`plugins.callbacks.spectral_monitor`'s switch)."""
        old = (self.D, self.opt_d)
        (discriminator,) = self._in_memory_format(discriminator)
        opt_d = self.build_optimizer(discriminator, self.train_section.lr_d)
        self.D, self.opt_d = self.acc.prepare(discriminator, opt_d)
        self._compile(discriminator)
        self.d_reg = regularizer
        for held, gone in zip((getattr(self.acc, "_models", None),
                               getattr(self.acc, "_optimizers", None)), old):
            if isinstance(held, list):  # the accelerator lets go of the old ones
                held[:] = [x for x in held if x is not gone]

    # -- state -----------------------------------------------------------------------------

    @property
    def models(self) -> dict[str, nn.Module]:
        return {"generator": self.G, "discriminator": self.D}

    @property
    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        return {"generator": self.opt_g, "discriminator": self.opt_d}

    def unwrapped(self, model: nn.Module) -> nn.Module:
        """``model`` without Accelerate's wrappers (DDP), remembered for the Trainer's own G and
        D: ``Accelerator.unwrap_model`` looks DeepSpeed up with an uncached importlib search
        (~0.25 ms) on every call, and an iteration asks about ten times."""
        for key in ("G", "D"):
            if model is getattr(self, key, None):
                held = self._unwrapped.get(key)
                if held is None or held[0] is not model:  # a new D since (the switch)
                    held = self._unwrapped[key] = (model, self.acc.unwrap_model(model))
                return held[1]
        return self.acc.unwrap_model(model)

    def save_checkpoint(self, name: str | None = None, update_latest: bool = True) -> Path:
        name = name or ckpt.checkpoint_name(self.iteration)
        state = {"iteration": self.iteration, "data_position": self.data_position,
                 "best": self.best, "seed": self.seed,
                 "steps": {"discriminator": self.d_steps, "generator": self.g_steps},
                 "callbacks": {key: c.state_dict() for key, c in self._callback_keys()}}
        models = dict(self.models)
        if self.ema is not None:
            models["generator_ema"] = self.ema
        path = self.writer.save(name, models, self.optimizers, state,
                                self.generators, update_latest=update_latest,
                                regularizers=self.regularizer_state())
        if update_latest:
            self.last_checkpoint = path
        return path

    def resume(self, checkpoint: Path, allow_regularizer_change: bool = True) -> list[str]:
        """Continue from a checkpoint: weights, optimizers, random states, data position."""
        state = ckpt.read_state(checkpoint)
        notes = ckpt.load_models(checkpoint, {k: self.unwrapped(m) for k, m in self.models.items()},
                                 allow_regularizer_change=allow_regularizer_change)
        ckpt.load_optimizers(checkpoint, self.optimizers)
        same_world = state.get("processes") == self.acc.num_processes
        restored = ckpt.load_rng(checkpoint, self.acc.process_index, self.generators)
        if not same_world:
            notes.append(f"random states re-seeded (the number of processes changed: "
                         f"{state.get('processes')} -> {self.acc.num_processes})")
        elif not restored:
            notes.append(f"random states re-seeded ({checkpoint.name} holds none for process "
                         f"{self.acc.process_index}: rng_rank{self.acc.process_index}.* missing)")
        notes += self._load_regularizer_state(ckpt.load_regularizer_state(checkpoint))
        if self.ema is not None:
            if "generator_ema" in ckpt.saved_networks(checkpoint):
                ckpt.load_models(checkpoint, {"generator_ema": self.ema})
            else:
                self.ema.update(self.unwrapped(self.G), -1)  # a copy of G (n_averaged stays 0)
                notes.append("generator_ema: not in the checkpoint; starts as a copy of G")
        self.iteration = int(state["iteration"])
        self.data_position = int(state["data_position"])
        steps = state.get("steps", {})  # older checkpoints: every step ran n_critic / 1 times
        self.d_steps = int(steps.get("discriminator", self.iteration * self.train_section.n_critic))
        self.g_steps = int(steps.get("generator", self.iteration))
        self.best = state.get("best", {})
        saved = state.get("callbacks", {})
        for key, cb in self._callback_keys():  # older checkpoints: under the class's name
            cb.load_state_dict(saved.get(key, saved.get(type(cb).__name__, {})))
        self.last_checkpoint = Path(checkpoint)
        self.log.truncate_after(self.iteration)
        return notes

    def _regularizer_lists(self) -> dict[str, list[Regularizer]]:
        return {"discriminator": self.d_regs, "generator": self.g_regs}

    def regularizer_state(self) -> dict[str, torch.Tensor]:
        """Every regularizer's own state (``state_dict``), keyed ``network.position.key``."""
        out = {}
        for network, regs in self._regularizer_lists().items():
            for i, reg in enumerate(regs):
                out.update({f"{network}.{i}.{k}": v for k, v in reg.state_dict().items()})
        return out

    def _load_regularizer_state(self, saved: dict[str, torch.Tensor]) -> list[str]:
        notes = []
        for network, regs in self._regularizer_lists().items():
            for i, reg in enumerate(regs):
                prefix = f"{network}.{i}."
                own = {k[len(prefix):]: v for k, v in saved.items() if k.startswith(prefix)}
                if not own and reg.state_dict():
                    notes.append(f"{network} regularizer '{reg.name}': no saved state; starts "
                                 f"fresh")
                reg.load_state_dict(own)
        return notes

    def _callback_keys(self) -> list[tuple[str, Callback]]:
        """(key of its state in a checkpoint, callback): its name, made unique by position."""
        keys, seen = [], {}
        for cb in self.callbacks:
            name = getattr(cb, "name", None) or type(cb).__name__
            seen[name] = seen.get(name, 0) + 1
            keys.append((name if seen[name] == 1 else f"{name}#{seen[name]}", cb))
        return keys

    # -- data ------------------------------------------------------------------------------

    def _batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        dataset = self.dataset
        sampler = GlobalBatchSampler(len(dataset), self.plan, self.acc.process_index,
                                     self.seed, start=self.data_position)
        loader = torch.utils.data.DataLoader(
            dataset, batch_sampler=sampler, num_workers=self.train_section.num_workers,
            pin_memory=self.acc.device.type == "cuda",
            persistent_workers=self.train_section.num_workers > 0)
        dequantize = self.dataset_plugin.dequantize  # the dataset's option (issue 11.6)
        micro = self.data_position * self.plan.accumulation  # micro-batches drawn before
        for images, labels in loader:
            images = images.to(self.acc.device, non_blocking=True)
            if dequantize:  # x/128 - 1 + U(0, 1/128), the noise fixed by the item's place
                position, m = divmod(micro, self.plan.accumulation)
                places = micro_batch_places(self.plan, self.acc.process_index, m)
                noise = dequantization_noise(self.seed, position, places,
                                             tuple(images.shape[1:]))
                images = dequantized(images, noise)
            micro += 1
            yield images, labels.to(self.acc.device, non_blocking=True)

    def next_micro_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._data_iter is None:
            self._data_iter = self._batches()
        real, labels = next(self._data_iter)
        if self.train_section.channels_last:
            real = real.contiguous(memory_format=torch.channels_last)
        return real, labels

    @property
    def generators(self) -> dict[str, torch.Generator]:
        return {"noise": self.noise, "labels": self.label_rng}

    def latents(self, n: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``n`` latents (and uniformly drawn labels for a conditional architecture)."""
        arch, processes = self.architecture, self.acc.num_processes
        mine = slice(self.acc.process_index * n, (self.acc.process_index + 1) * n)
        z = torch.randn(processes * n, arch.z_dim, generator=self.noise)[mine]
        y = None
        if arch.conditional:
            y = torch.randint(0, arch.num_classes, (processes * n,), generator=self.label_rng)[mine]
            y = y.to(self.acc.device)
        return z.to(self.acc.device), y

    # -- steps -----------------------------------------------------------------------------

    def _set_lr(self) -> None:
        t = self.train_section
        factor = 1.0
        if t.lr_decay == "linear":
            factor = max(0.0, 1.0 - self.iteration / max(1, t.iterations))
        for opt, lr in ((self.opt_d, t.lr_d), (self.opt_g, t.lr_g)):
            for group in opt.param_groups:
                group["lr"] = lr * factor

    @staticmethod
    def _micro_contexts(acc, model: nn.Module, m: int, k: int):
        """Micro-batch ``m`` of ``k``: regularizer state frozen after the first, gradients
        all-reduced on the last only."""
        stack = contextlib.ExitStack()
        if m > 0:
            stack.enter_context(frozen_state())
        if m < k - 1:
            stack.enter_context(acc.no_sync(model))
        return stack

    # where a network's regularizers act in a step (apart from their parametrizations)

    @staticmethod
    def _active(regs: list[Regularizer], step: int) -> list[Regularizer]:
        """The regularizers whose penalty runs at optimizer step ``step`` of their network (lazy
        regularization: ``step % penalty_every == 0``)."""
        return [r for r in regs if step % max(1, int(r.penalty_every)) == 0]

    @staticmethod
    def _penalties(regs: list[Regularizer], context: StepContext) -> torch.Tensor | None:
        """The sum of the active regularizers' penalties for this micro-batch, each multiplied by
        its ``penalty_every`` (it runs on every ``penalty_every``-th step only; the step is the
        main one, so Adam's lr and betas need no correction: stylegan2-ada's correction is for a
        penalty minimized in an optimizer step of its own), or None."""
        total = None
        for reg in regs:
            term = reg.penalty(context)
            if term is None:
                continue
            term = term.float() * max(1, int(reg.penalty_every))
            total = term if total is None else total + term
        return total

    def _after_step(self, regs: list[Regularizer], model: nn.Module) -> None:
        """The regularizers' action after the network's optimizer step (SR's projection)."""
        for reg in regs:
            with torch.no_grad():
                reg.after_step(self.unwrapped(model), self.iteration)

    @contextlib.contextmanager
    def _first_micro_batch_state(self, model: nn.Module, m: int):
        """G's forward of micro-batch ``m`` outside the step's gradient contexts: its state
        (power iteration, BatchNorm running statistics) is updated by the first micro-batch of a
        step only, as by DDP's broadcast of process 0's buffers (see :meth:`discriminator_step`)."""
        if m == 0:
            yield
            return
        module = self.unwrapped(model)
        norms = [b for b in module.modules() if isinstance(b, nn.modules.batchnorm._NormBase)
                 and b.track_running_stats]
        saved = [{k: v.clone() for k, v in b.named_buffers(recurse=False)} for b in norms]
        with frozen_state():
            yield
        with torch.no_grad():  # .data: the forward's graph does not use running statistics
            for b, state in zip(norms, saved):
                for k, v in state.items():
                    getattr(b, k).data.copy_(v)

    def _d_logits(self, real: torch.Tensor, labels: torch.Tensor | None, fake: torch.Tensor,
                  y_fake: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """D's logits of reals and fakes (float32): one forward of both (``d_forward =
        "joint"``: one power-iteration step) or two (``"separate"``: two steps, as the SN-GAN
        and SR Chainer updaters, ``dis(x_real)`` then ``dis(x_fake)``)."""
        fake = fake.to(real.dtype)
        if self.train_section.d_forward == "separate":
            return self.D(real, labels).float(), self.D(fake, y_fake).float()
        y = torch.cat([labels, y_fake]) if y_fake is not None else None
        logits = self.D(torch.cat([real, fake]), y).float()
        return logits[:real.shape[0]], logits[real.shape[0]:]

    def discriminator_step(self) -> torch.Tensor:
        """One D update over the global batch; returns this process's mean D loss (detached).

        Exactness of accumulation (issue 11.1): G's forward that makes the fakes runs once per
        micro-batch, its state updated by the first only (:meth:`_first_micro_batch_state`), so
        G's power iteration steps once per D step whatever the split. BatchNorm in G normalizes
        each micro-batch by its own statistics (as per-GPU BatchNorm in the authors' multi-GPU
        code), so what holds exactly is: P processes x k micro-batches of b = one process x P*k
        micro-batches of b; a different b changes G's batch statistics. Without batch
        statistics in G, k micro-batches equal one batch k times as large.
        """
        acc, k, b = self.acc, self.plan.accumulation, self.plan.micro_batch
        self.opt_d.zero_grad(set_to_none=True)
        active = self._active(self.d_regs, self.d_steps)
        real_grad = any("real_grad" in r.needs for r in active)
        total = torch.zeros((), device=acc.device)
        for m in range(k):
            real, labels = self.next_micro_batch()
            z, y_fake = self.latents(b)
            with torch.no_grad(), self._first_micro_batch_state(self.G, m):
                fake = self.G(z, y_fake)
            if real_grad:  # R1-style penalties differentiate D(real) with respect to real
                real = real.detach().requires_grad_(True)
            with self._micro_contexts(acc, self.D, m, k):
                real_logits, fake_logits = self._d_logits(real, labels, fake, y_fake)
                loss = self.loss.discriminator_loss(real_logits, fake_logits)
                if active:
                    context = StepContext(
                        phase="D", iteration=self.iteration, step=self.d_steps, micro_batch=m,
                        num_micro_batches=k, discriminator=self.D, generator=self.G,
                        module=self.unwrapped(self.D), real=real, real_labels=labels,
                        fake=fake, fake_labels=y_fake, real_logits=real_logits,
                        fake_logits=fake_logits)
                    penalty = self._penalties(active, context)
                    if penalty is not None:
                        loss = loss + penalty
                acc.backward(loss / k)
            total += loss.detach() / k
        self.opt_d.step()
        self.d_steps += 1
        self.data_position += 1
        self._after_step(self.d_regs, self.D)
        return total

    def _g_step_d_state(self):
        """D's regularizer state in the G step: advanced by D's forward (``d_state_in_g_step =
        "update"``) or left alone (``"frozen"``: BSN's TF code builds the G loss on a D graph
        with ``sn_op=NO_OPS``)."""
        if self.train_section.d_state_in_g_step == "frozen":
            return frozen_state()
        return contextlib.nullcontext()

    def _g_step_d_parameters(self):
        """D's parameters in the G step: frozen (:func:`parameters_frozen`; G's gradient flows
        through D's activations), unless a benchmark switched that off
        (:func:`d_weight_gradients_in_g_step`)."""
        if _FREEZE_D_IN_G_STEP:
            return parameters_frozen(self.unwrapped(self.D))
        return contextlib.nullcontext()

    def generator_step(self) -> torch.Tensor:
        """One G update. A loss that ``needs_real_logits`` (relativistic) gets D's logits of a
        real micro-batch per micro-batch, drawn from the data stream: the G step then consumes
        one more global batch of reals (``data_position`` counts it, so a resume stays exact;
        the reals a D step sees differ from a run with a loss that does not need them)."""
        acc, k = self.acc, self.plan.accumulation
        n = self.plan.micro_batch * self.plan.g_multiplier
        self.opt_g.zero_grad(set_to_none=True)
        active = self._active(self.g_regs, self.g_steps)
        needs_real = bool(getattr(self.loss, "needs_real_logits", False))
        total = torch.zeros((), device=acc.device)
        for m in range(k):
            z, y = self.latents(n)
            real = labels = real_logits = None
            if needs_real:
                real, labels = self.next_micro_batch()
            with self._micro_contexts(acc, self.G, m, k), acc.no_sync(self.D), \
                    self._g_step_d_state(), self._g_step_d_parameters():
                with self._first_micro_batch_state(self.G, m):
                    fake = self.G(z, y)
                if needs_real:
                    real_logits, fake_logits = self._d_logits(real, labels, fake, y)
                    loss = self.loss.generator_loss(fake_logits, real_logits)
                else:
                    fake_logits = self.D(fake, y).float()
                    loss = self.loss.generator_loss(fake_logits)
                if active:
                    context = StepContext(
                        phase="G", iteration=self.iteration, step=self.g_steps, micro_batch=m,
                        num_micro_batches=k, discriminator=self.D, generator=self.G,
                        module=self.unwrapped(self.G), real=real, real_labels=labels,
                        fake=fake, fake_labels=y, real_logits=real_logits,
                        fake_logits=fake_logits)
                    penalty = self._penalties(active, context)
                    if penalty is not None:
                        loss = loss + penalty
                acc.backward(loss / k)
            total += loss.detach() / k
        self.opt_g.step()
        self.g_steps += 1
        if needs_real:
            self.data_position += 1
        self._after_step(self.g_regs, self.G)
        if self.ema is not None:
            self.ema.update(self.unwrapped(self.G), self.iteration)
        return total

    def train_iteration(self) -> dict[str, float]:
        """One generator iteration; returns the losses averaged over processes."""
        self._set_lr()
        self.G.train()
        self.D.train()
        d_losses = [self.discriminator_step() for _ in range(self.train_section.n_critic)]
        g_loss = self.generator_step()
        self.iteration += 1
        stats = torch.stack([torch.stack(d_losses).mean(), g_loss])
        stats = self.acc.reduce(stats, reduction="mean") if self.acc.num_processes > 1 else stats
        d_value, g_value = (float(v) for v in stats.cpu())
        if not (math.isfinite(d_value) and math.isfinite(g_value)):
            if self.plan.micro_batch * self.plan.g_multiplier == 0:  # a mean over no samples
                multiplier = self.train_section.g_batch_multiplier
                raise SpecregError(f"train.g_batch_multiplier = {multiplier} gives the generator "
                                   f"step no samples (loss_g = {g_value}); set it to 1 or more")
            # every checkpoint this run writes is finite (fit checks before saving); one resumed
            # from may not be
            last = self.last_checkpoint
            if last is not None and not getattr(self, "_last_checkpoint_finite", False):
                from core.run_folder import newest_finite_checkpoint

                last = newest_finite_checkpoint(self.run_dir)
            last = last or "none (no checkpoint with finite weights was written yet)"
            raise NonFiniteLossError(
                f"non-finite loss at iteration {self.iteration} (loss_d = {d_value}, "
                f"loss_g = {g_value}); the run stopped. Last good checkpoint: {last}")
        return {"loss_d": d_value, "loss_g": g_value}

    # -- samples ---------------------------------------------------------------------------

    def fixed_latents(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        g = torch.Generator().manual_seed(self.seed + 2**20)
        return self.architecture.sample_latents(self.log_section.grid_size, g, self.acc.device)

    @torch.no_grad()
    def sampling_generator(self) -> tuple[str, nn.Module]:
        """The generator that is sampled and evaluated, and its name: the EMA of G
        (``"generator_ema"``) when ``[generator.ema]`` is on, else G (``"generator"``),
        unwrapped."""
        if self.ema is not None:
            return "generator_ema", self.ema.module
        return "generator", self.unwrapped(self.G)

    def save_samples(self) -> Path | None:
        """A PNG grid from fixed noise (same latents all run long) of :meth:`sampling_generator`,
        main process only."""
        if not self.acc.is_main_process:
            return None
        from torchvision.utils import make_grid, save_image

        _, G = self.sampling_generator()
        was_training = G.training
        G.eval()
        try:
            z, y = self.fixed_latents()
            images = G(z, y).float().clamp(-1, 1).cpu()
        finally:
            G.train(was_training)
        nrow = int(math.sqrt(len(images))) or 1
        scale = max(1, math.ceil(512 / (nrow * (images.shape[-1] + 1))))  # 32 px: 4x for 8x8
        if scale > 1:  # nearest: the pixels stay pixels
            images = images.repeat_interleave(scale, dim=-2).repeat_interleave(scale, dim=-1)
        grid = make_grid((images + 1) / 2, nrow=nrow, padding=1)
        path = self.run_dir / "samples" / f"{ckpt.checkpoint_name(self.iteration)}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        save_image(grid, path)
        self.log.add_image("samples", grid, self.iteration)
        return path

    # -- the loop --------------------------------------------------------------------------

    def fit(self, evaluate=None) -> None:
        """Train to ``train.iterations``. ``evaluate(trainer) -> dict | None`` runs at eval steps
        on every process (metrics are computed on the main one).

        SIGINT (Ctrl-C) and SIGTERM (a cluster's pre-emption) finish the current iteration, save
        a checkpoint of it and raise :class:`RunInterrupted` (exit 130 / 143); under DDP the
        processes agree on the iteration to stop at (one all-reduce of a flag per iteration). A
        second signal stops at once. A checkpoint is never written from non-finite weights."""
        acc, log, every_checkpoint = self.acc, self.log_section, self.checkpoint_section.every
        total = self.train_section.iterations
        for cb in self.callbacks:
            cb.on_start(self)
        bar, plain_progress = None, False
        if acc.is_main_process and log.progress:
            if sys.stderr.isatty():
                from tqdm.auto import tqdm

                bar = tqdm(total=total, initial=self.iteration, desc="train", unit="it",
                           dynamic_ncols=True)
            else:  # a log file: a plain line now and then, not one huge \r-joined line
                plain_progress = True
        started, start_iter = time.perf_counter(), self.iteration
        last_line = started
        received: list[int] = []
        previous = self._catch_stop_signals(received)
        try:
            while self.iteration < total:
                losses = self.train_iteration()
                it = self.iteration
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss_d=f"{losses['loss_d']:.3f}", loss_g=f"{losses['loss_g']:.3f}")
                elif plain_progress and (time.perf_counter() - last_line >= 30 or it == total):
                    last_line = time.perf_counter()
                    rate = (it - start_iter) / max(1e-9, last_line - started)
                    print(f"train {it}/{total} ({100 * it / max(1, total):.0f}%): loss_d "
                          f"{losses['loss_d']:.3f}, loss_g {losses['loss_g']:.3f}, "
                          f"{rate:.2f} it/s", file=sys.stderr, flush=True)
                if it % max(1, log.every) == 0 or it == total:
                    rate = (it - start_iter) / max(1e-9, time.perf_counter() - started)
                    self.log.write("train", it, {**losses, "lr_d": self.opt_d.param_groups[0]["lr"],
                                                 "lr_g": self.opt_g.param_groups[0]["lr"],
                                                 "it_per_s": rate}, tensorboard_prefix="train")
                for cb in self.callbacks:
                    cb.on_iteration_end(self, it)
                if (log.sample_every and it % log.sample_every == 0) or it == total:
                    self.save_samples()
                if evaluate is not None and \
                        ((self.eval_every and it % self.eval_every == 0) or it == total):
                    evaluate(self)
                stop = self._stop_requested(received)
                if (every_checkpoint and it % every_checkpoint == 0) or it == total or stop:
                    self._save_finite_checkpoint()
                if stop and it < total:  # at the last iteration: the run is done anyway
                    name = signal.Signals(stop).name
                    raise RunInterrupted(
                        f"{name} received: stopped after iteration {it} of {total}; checkpoint "
                        f"{self.last_checkpoint.name} saved; resume with --resume {self.run_dir}",
                        stop)
        finally:
            self._restore_signals(previous)
            if bar is not None:
                bar.close()
        for cb in self.callbacks:
            cb.on_end(self)
        self.log.close()

    def _save_finite_checkpoint(self) -> Path:
        """Save a checkpoint of this iteration, unless the weights are not finite (then stop,
        naming the newest finite checkpoint)."""
        if not weights_finite(self.unwrapped(self.G), self.unwrapped(self.D)):
            from core.run_folder import newest_finite_checkpoint

            last = newest_finite_checkpoint(self.run_dir) \
                or "none (no checkpoint with finite weights was written yet)"
            raise NonFiniteLossError(
                f"non-finite weights after iteration {self.iteration} (the losses were still "
                f"finite); no checkpoint written. Last good checkpoint: {last}")
        path = self.save_checkpoint()
        self._last_checkpoint_finite = True
        return path

    @staticmethod
    def _catch_stop_signals(received: list[int]) -> dict:
        """Record SIGINT/SIGTERM in ``received`` instead of dying (a second one: KeyboardInterrupt
        at once). Only the main thread can set handlers; elsewhere nothing changes."""
        import threading

        if threading.current_thread() is not threading.main_thread():
            return {}

        def handler(signum, frame):
            if received:
                raise KeyboardInterrupt
            received.append(signum)
            print(f"specreg: {signal.Signals(signum).name} received: finishing this iteration "
                  f"and saving a checkpoint (again to stop at once)", file=sys.stderr, flush=True)

        previous = {}
        for sig in STOP_SIGNALS:
            previous[sig] = signal.signal(sig, handler)
        return previous

    @staticmethod
    def _restore_signals(previous: dict) -> None:
        for sig, old in previous.items():
            signal.signal(sig, old)

    def _stop_requested(self, received: list[int]) -> int:
        """The signal to stop on (0: none), the same on every process: under DDP the largest
        signal number any process received (one all-reduce per iteration)."""
        mine = received[0] if received else 0
        if self.acc.num_processes == 1:
            return mine
        import torch.distributed as dist

        flag = torch.tensor([mine], device=self.acc.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return int(flag.item())
