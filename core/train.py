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
§2.3). Used by :mod:`core.run`; tests drive :class:`Trainer` directly.
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
from core.data import BatchPlan, GlobalBatchSampler
from core.errors import SpecregError
from core.interfaces import Architecture, Loss, Regularizer
from core.tracking import RunLog
from core.recipe import Recipe
from core.layers import frozen_state, regularized_layers


class NonFiniteLossError(SpecregError):
    """A loss became NaN or infinite; the message names the iteration and the last checkpoint."""

    exit_code = 1


class TrainingCallback:
    """Hooks into the loop (the spectral monitor is one). Methods are no-ops by default."""

    def on_start(self, trainer: "Trainer") -> None: ...

    def on_iteration_end(self, trainer: "Trainer", iteration: int) -> None: ...

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None: ...

    def on_end(self, trainer: "Trainer") -> None: ...


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
    from accelerate import Accelerator

    # DDP's defaults broadcast buffers (power-iteration vectors, BatchNorm statistics) from
    # process 0 at every forward pass
    return Accelerator(cpu=recipe.train.cpu or not torch.cuda.is_available(),
                       mixed_precision=recipe.train.mixed_precision)


def build_trainer(recipe: Recipe, run_dir: Path, accelerator=None,
                  callbacks: list[TrainingCallback] | None = None) -> "Trainer":
    """The :class:`Trainer` for ``recipe``: builds its components and hands the loop the sections
    it uses."""
    return Trainer(recipe, run_dir, accelerator, callbacks)


class Trainer:
    """Trains one recipe into one run folder (every process builds one)."""

    def __init__(self, recipe: Recipe, run_dir: Path, accelerator=None,
                 callbacks: list[TrainingCallback] | None = None) -> None:
        self.recipe = recipe
        self.run_dir = Path(run_dir)
        self.acc = accelerator or make_accelerator(recipe)
        self.callbacks = list(callbacks or [])
        t = recipe.train
        self.plan = BatchPlan.derive(t.batch_size, self.acc.num_processes, t.micro_batch_size,
                                     t.g_batch_multiplier)
        torch.manual_seed(recipe.seed)  # model initialization is identical on every process
        (self.architecture, G, D, self.d_reg, self.g_reg) = build_models(recipe)
        self.loss: Loss = recipe.loss.create()
        self.dataset_plugin = recipe.dataset.create()
        # the data is checked before anything is written (a missing dataset: exit 2, no run folder)
        with self.acc.main_process_first():  # one process downloads, the others then read
            self.dataset = self.dataset_plugin.build(Path(recipe.data_root), "train")
        opt_g = torch.optim.Adam(G.parameters(), lr=t.lr_g, betas=tuple(t.betas))
        opt_d = torch.optim.Adam(D.parameters(), lr=t.lr_d, betas=tuple(t.betas))
        self.G, self.D, self.opt_g, self.opt_d = self.acc.prepare(G, D, opt_g, opt_d)
        # latents and fake labels come from their own generators (saved in checkpoints), seeded
        # alike on every process: each draw is the block of all processes, of which this process
        # takes its share, so the set of latents of a step does not depend on how the global
        # batch is split over processes and micro-batches
        self.noise = torch.Generator().manual_seed(recipe.seed * 7919 + 1)
        self.label_rng = torch.Generator().manual_seed(recipe.seed * 7919 + 104_729)
        self.iteration = 0
        self.data_position = 0  # global batches consumed
        self.best: dict[str, Any] = {}
        self.log = RunLog(self.run_dir, enabled=self.acc.is_main_process)
        self.writer = ckpt.CheckpointWriter(self.run_dir, self.acc, recipe.checkpoint.keep)
        self.last_checkpoint: Path | None = None
        self._data_iter: Iterator | None = None

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
                 "best": self.best, "seed": self.recipe.seed,
                 "callbacks": {type(c).__name__: c.state_dict() for c in self.callbacks}}
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
        for cb in self.callbacks:
            cb.load_state_dict(state.get("callbacks", {}).get(type(cb).__name__, {}))
        self.last_checkpoint = Path(checkpoint)
        self.log.truncate_after(self.iteration)
        return notes

    # -- data ------------------------------------------------------------------------------

    def _batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        dataset = self.dataset
        sampler = GlobalBatchSampler(len(dataset), self.plan, self.acc.process_index,
                                     self.recipe.seed, start=self.data_position)
        loader = torch.utils.data.DataLoader(
            dataset, batch_sampler=sampler, num_workers=self.recipe.train.num_workers,
            pin_memory=self.acc.device.type == "cuda",
            persistent_workers=self.recipe.train.num_workers > 0)
        for images, labels in loader:
            yield (images.to(self.acc.device, non_blocking=True),
                   labels.to(self.acc.device, non_blocking=True))

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
        t = self.recipe.train
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

    def _penalty(self, reg: Regularizer | None, model: nn.Module) -> torch.Tensor | None:
        if reg is None:
            return None
        return reg.loss_term(self.unwrapped(model), self.iteration)

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
        if self.d_reg is not None:
            with torch.no_grad():
                self.d_reg.after_step(self.unwrapped(self.D), self.iteration)
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
        if self.g_reg is not None:
            with torch.no_grad():
                self.g_reg.after_step(self.unwrapped(self.G), self.iteration)
        return total

    def train_iteration(self) -> dict[str, float]:
        """One generator iteration; returns the losses averaged over processes."""
        self._set_lr()
        self.G.train()
        self.D.train()
        d_losses = [self.discriminator_step() for _ in range(self.recipe.train.n_critic)]
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
        g = torch.Generator().manual_seed(self.recipe.seed + 2**20)
        return self.architecture.sample_latents(self.recipe.log.grid_size, g, self.acc.device)

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
        recipe, acc = self.recipe, self.acc
        total = recipe.train.iterations
        for cb in self.callbacks:
            cb.on_start(self)
        bar = None
        if acc.is_main_process and recipe.log.progress:
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
                if it % max(1, recipe.log.every) == 0 or it == total:
                    rate = (it - start_iter) / max(1e-9, time.perf_counter() - started)
                    self.log.write("train", it, {**losses, "lr_d": self.opt_d.param_groups[0]["lr"],
                                                 "lr_g": self.opt_g.param_groups[0]["lr"],
                                                 "it_per_s": rate}, tensorboard_prefix="train")
                for cb in self.callbacks:
                    cb.on_iteration_end(self, it)
                if (recipe.log.sample_every and it % recipe.log.sample_every == 0) or it == total:
                    self.save_samples()
                if evaluate is not None and recipe.eval.metrics and \
                        ((recipe.eval.every and it % recipe.eval.every == 0) or it == total):
                    evaluate(self)
                if (recipe.checkpoint.every and it % recipe.checkpoint.every == 0) or it == total:
                    self.save_checkpoint()
        finally:
            if bar is not None:
                bar.close()
        for cb in self.callbacks:
            cb.on_end(self)
        self.log.close()
