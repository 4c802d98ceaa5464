"""The GAN training loop on HuggingFace Accelerate (SN-GAN's schedule, Miyato et al. 2018, Alg. 1).

One iteration = ``n_critic`` discriminator steps, then one generator step. Each step runs its
micro-batches itself (no ``accelerator.accumulate``: D and G would share its step counter), so
that k micro-batches are exactly one batch k times as large:

- the loss of each micro-batch is divided by k and gradients are all-reduced on the last one only
  (``no_sync`` before);
- regularizer state (power iteration) is updated by the first micro-batch of a step only
  (:func:`core.layers.frozen_state` for the others);
- real and fake images go through D in one forward pass.

After each optimizer step the network's regularizer gets ``after_step`` (SR's projection, SPEC
§2.3). Training callbacks (:class:`core.interfaces.Callback`: the spectral monitor, a user's own)
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
import time
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn

from core import checkpoint as ckpt
from core.data import (BatchPlan, GlobalBatchSampler, dequantization_noise, dequantized,
                       micro_batch_places)
from core.errors import SpecregError
from core.interfaces import Architecture, Callback, Dataset, Loss, Regularizer
from core.tracking import RunLog
from core.recipe import CheckpointSection, LogSection, Recipe, TrainSection
from core.layers import frozen_state


class NonFiniteLossError(SpecregError):
    """A loss became NaN or infinite; the message names the iteration and the last checkpoint."""

    exit_code = 1


#: the training-callback plugin kind under its earlier name (callbacks subclass either).
TrainingCallback = Callback


def build_models(recipe: Recipe) -> tuple[Architecture, nn.Module, nn.Module,
                                          Regularizer | None, Regularizer | None]:
    """The architecture, G and D with the recipe's regularizers applied."""
    architecture = recipe.architecture.create()
    generator = architecture.build_generator()
    discriminator = architecture.build_discriminator()
    d_reg = recipe.discriminator.regularizer.create() if recipe.discriminator.regularizer else None
    g_reg = recipe.generator.regularizer.create() if recipe.generator.regularizer else None
    if d_reg is not None:
        discriminator = d_reg.apply(discriminator)
    if g_reg is not None:
        generator = g_reg.apply(generator)
    return architecture, generator, discriminator, d_reg, g_reg


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
    if callbacks is None:
        callbacks = [spec.create() for spec in recipe.callbacks.values()]
    torch.manual_seed(recipe.seed)  # model initialization is identical on every process
    architecture, G, D, d_reg, g_reg = build_models(recipe)
    loss = recipe.loss.create()
    dataset_plugin = recipe.dataset.create()
    with acc.main_process_first():  # one process downloads, the others then read
        dataset = dataset_plugin.build(Path(recipe.data_root), "train")
    return Trainer(architecture=architecture, generator=G, discriminator=D, loss=loss,
                   dataset=dataset, dataset_plugin=dataset_plugin, d_regularizer=d_reg,
                   g_regularizer=g_reg, train=recipe.train, log=recipe.log,
                   checkpoint=recipe.checkpoint, eval_every=recipe.eval.every, seed=recipe.seed,
                   run_dir=run_dir, accelerator=acc, callbacks=callbacks)


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
        d_regularizer: the regularizer applied to D, or None: its ``loss_term`` joins D's loss,
            its ``after_step`` follows D's optimizer steps.
        g_regularizer: likewise for G.
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
                 dataset_plugin: Dataset, d_regularizer: Regularizer | None = None,
                 g_regularizer: Regularizer | None = None, train: TrainSection,
                 log: LogSection, checkpoint: CheckpointSection, eval_every: int = 0,
                 seed: int = 0, run_dir: Path, accelerator=None,
                 callbacks: list[Callback] | tuple[Callback, ...] = ()) -> None:
        self.run_dir = Path(run_dir)
        self.train_section, self.log_section = train, log
        self.checkpoint_section, self.eval_every, self.seed = checkpoint, eval_every, seed
        self.acc = accelerator or _accelerator(train)
        self.callbacks = list(callbacks)
        self.plan = BatchPlan.derive(train.batch_size, self.acc.num_processes,
                                     train.micro_batch_size, train.g_batch_multiplier)
        self.architecture, self.loss = architecture, loss
        self.dataset, self.dataset_plugin = dataset, dataset_plugin
        self.d_reg, self.g_reg = d_regularizer, g_regularizer
        opt_g = self.build_optimizer(generator, train.lr_g)
        opt_d = self.build_optimizer(discriminator, train.lr_d)
        self.G, self.D, self.opt_g, self.opt_d = self.acc.prepare(generator, discriminator,
                                                                  opt_g, opt_d)
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

    def build_optimizer(self, model: nn.Module, lr: float) -> torch.optim.Optimizer:
        """Adam over ``model``'s parameters (in ``parameters()`` order) with ``train.betas``."""
        return torch.optim.Adam(model.parameters(), lr=lr, betas=tuple(self.train_section.betas))

    def replace_discriminator(self, discriminator: nn.Module,
                              regularizer: Regularizer | None) -> None:
        """Train ``discriminator`` (with ``regularizer`` applied) from here on, with a fresh
        optimizer, both prepared by the accelerator (under DDP: a new wrapper). Every process
        calls it at the same point; the caller loads any state into them
        (:mod:`core.spectral.switch`)."""
        old = (self.D, self.opt_d)
        opt_d = self.build_optimizer(discriminator, self.train_section.lr_d)
        self.D, self.opt_d = self.acc.prepare(discriminator, opt_d)
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
        return self.acc.unwrap_model(model)

    def save_checkpoint(self, name: str | None = None, update_latest: bool = True) -> Path:
        name = name or ckpt.checkpoint_name(self.iteration)
        state = {"iteration": self.iteration, "data_position": self.data_position,
                 "best": self.best, "seed": self.seed,
                 "callbacks": {key: c.state_dict() for key, c in self._callback_keys()}}
        path = self.writer.save(name, self.models, self.optimizers, state,
                                self.generators, update_latest=update_latest)
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
        if not ckpt.load_rng(checkpoint, self.acc.process_index, self.generators) \
                or not same_world:
            notes.append("random states re-seeded (the number of processes changed)")
        self.iteration = int(state["iteration"])
        self.data_position = int(state["data_position"])
        self.best = state.get("best", {})
        saved = state.get("callbacks", {})
        for key, cb in self._callback_keys():  # older checkpoints: under the class's name
            cb.load_state_dict(saved.get(key, saved.get(type(cb).__name__, {})))
        self.last_checkpoint = Path(checkpoint)
        self.log.truncate_after(self.iteration)
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
        return next(self._data_iter)

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

    # the two places a network's regularizer acts in a step (apart from its parametrization)

    def _penalty(self, reg: Regularizer | None, model: nn.Module) -> torch.Tensor | None:
        """The regularizer's term of this micro-batch's loss, or None."""
        if reg is None:
            return None
        return reg.loss_term(self.unwrapped(model), self.iteration)

    def _after_step(self, reg: Regularizer | None, model: nn.Module) -> None:
        """The regularizer's action after the network's optimizer step (SR's projection)."""
        if reg is not None:
            with torch.no_grad():
                reg.after_step(self.unwrapped(model), self.iteration)

    def discriminator_step(self) -> torch.Tensor:
        """One D update over the global batch; returns this process's mean D loss (detached)."""
        acc, k, b = self.acc, self.plan.accumulation, self.plan.micro_batch
        self.opt_d.zero_grad(set_to_none=True)
        total = torch.zeros((), device=acc.device)
        for m in range(k):
            real, labels = self.next_micro_batch()
            z, y_fake = self.latents(b)
            with torch.no_grad():
                fake = self.G(z, y_fake)
            y = torch.cat([labels, y_fake]) if y_fake is not None else None
            with self._micro_contexts(acc, self.D, m, k):
                logits = self.D(torch.cat([real, fake.to(real.dtype)]), y)
                loss = self.loss.discriminator_loss(logits[:b].float(), logits[b:].float())
                penalty = self._penalty(self.d_reg, self.D)
                if penalty is not None:
                    loss = loss + penalty
                acc.backward(loss / k)
            total += loss.detach() / k
        self.opt_d.step()
        self.data_position += 1
        self._after_step(self.d_reg, self.D)
        return total

    def generator_step(self) -> torch.Tensor:
        acc, k = self.acc, self.plan.accumulation
        n = self.plan.micro_batch * self.plan.g_multiplier
        self.opt_g.zero_grad(set_to_none=True)
        total = torch.zeros((), device=acc.device)
        for m in range(k):
            z, y = self.latents(n)
            with self._micro_contexts(acc, self.G, m, k), acc.no_sync(self.D):
                logits = self.D(self.G(z, y), y)
                loss = self.loss.generator_loss(logits.float())
                penalty = self._penalty(self.g_reg, self.G)
                if penalty is not None:
                    loss = loss + penalty
                acc.backward(loss / k)
            total += loss.detach() / k
        self.opt_g.step()
        self._after_step(self.g_reg, self.G)
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
            last = self.last_checkpoint or "none (no checkpoint was written yet)"
            raise NonFiniteLossError(
                f"non-finite loss at iteration {self.iteration} (loss_d = {d_value}, "
                f"loss_g = {g_value}); the run stopped. Last good checkpoint: {last}")
        return {"loss_d": d_value, "loss_g": g_value}

    # -- samples ---------------------------------------------------------------------------

    def fixed_latents(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        g = torch.Generator().manual_seed(self.seed + 2**20)
        return self.architecture.sample_latents(self.log_section.grid_size, g, self.acc.device)

    @torch.no_grad()
    def save_samples(self) -> Path | None:
        """A PNG grid from fixed noise (same latents all run long), main process only."""
        if not self.acc.is_main_process:
            return None
        from torchvision.utils import make_grid, save_image

        G = self.unwrapped(self.G)
        was_training = G.training
        G.eval()
        try:
            z, y = self.fixed_latents()
            images = G(z, y).float().clamp(-1, 1).cpu()
        finally:
            G.train(was_training)
        grid = make_grid((images + 1) / 2, nrow=int(math.sqrt(len(images))) or 1, padding=1)
        path = self.run_dir / "samples" / f"{ckpt.checkpoint_name(self.iteration)}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        save_image(grid, path)
        self.log.add_image("samples", grid, self.iteration)
        return path

    # -- the loop --------------------------------------------------------------------------

    def fit(self, evaluate=None) -> None:
        """Train to ``train.iterations``. ``evaluate(trainer) -> dict | None`` runs at eval steps
        on every process (metrics are computed on the main one)."""
        acc, log, every_checkpoint = self.acc, self.log_section, self.checkpoint_section.every
        total = self.train_section.iterations
        for cb in self.callbacks:
            cb.on_start(self)
        bar = None
        if acc.is_main_process and log.progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=total, initial=self.iteration, desc="train", unit="it",
                       dynamic_ncols=True)
        started, start_iter = time.perf_counter(), self.iteration
        try:
            while self.iteration < total:
                losses = self.train_iteration()
                it = self.iteration
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss_d=f"{losses['loss_d']:.3f}", loss_g=f"{losses['loss_g']:.3f}")
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
                if (every_checkpoint and it % every_checkpoint == 0) or it == total:
                    self.save_checkpoint()
        finally:
            if bar is not None:
                bar.close()
        for cb in self.callbacks:
            cb.on_end(self)
        self.log.close()
