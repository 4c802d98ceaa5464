"""The public contract of specreg: the six kinds of plugin.

Every plugin is a class with a nested, default-constructible attrs ``Config``. A recipe table
selects the plugin with ``name`` (a callback: by its table's key, ``[callbacks.NAME]``) and its
remaining keys are structured into that ``Config`` (see :mod:`core.recipe`). The registry
(:mod:`core.registry`) maps names to these classes.

    class MyRegularizer(Regularizer):
        '''One line saying what it does, citing the paper and equation.'''

        @attrs.define
        class Config:
            strength: float = 1.0

        def apply(self, module): ...
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, ClassVar, Iterator

import attrs
import torch
from torch import nn

__all__ = [
    "Plugin",
    "Regularizer",
    "StepContext",
    "Architecture",
    "Loss",
    "Metric",
    "MetricResult",
    "EvaluationContext",
    "Dataset",
    "Callback",
    "PLUGIN_KINDS",
]


#: plugin class -> the first name it was registered under in this process. Kept by
#: :mod:`core.registry`, which never writes onto a plugin class; read by :class:`Plugin` only.
REGISTERED_NAMES: dict[type, str] = {}


class Plugin:
    """Base of every plugin kind: holds its structured ``config`` and its ``name``.

    ``name`` lives on the instance: :meth:`core.registry.Registry.create` gives each plugin the
    name the recipe selected it by (so an alias reports the alias). A plugin instantiated
    directly is called by the first name its own class was registered under, or by its class's
    ``__name__`` if that class was never registered (a subclass never inherits its base's name).
    """

    @attrs.define
    class Config:
        pass

    def __init__(self, config: Any | None = None, name: str | None = None) -> None:
        self.config = config if config is not None else self.Config()
        cls = type(self)
        self.name: str = name if name is not None else REGISTERED_NAMES.get(cls, cls.__name__)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.config!r})"


# ---------------------------------------------------------------------------------------------
# Regularizers
# ---------------------------------------------------------------------------------------------


class Regularizer(Plugin):
    """Keeps a network's layers in check: reparametrizes weights and/or acts after optimizer steps.

    ``apply`` registers a :mod:`torch.nn.utils.parametrize` parametrization on the ``weight`` of
    ``module`` itself (if it is a Conv2d/Linear/Embedding) and of every such submodule, and returns
    the module. All state (power-iteration vectors, running statistics) lives in buffers of the
    parametrization modules, so it travels in ``state_dict()``.

    Parametrizations that update state in a training-mode forward pass (power iteration) must do
    so only while :func:`core.layers.state_updates_enabled` is true: the training loop turns
    updates off for every micro-batch but the first of an optimizer step, so that k accumulated
    micro-batches are exactly one large batch.
    """

    def apply(self, module: nn.Module) -> nn.Module:
        raise NotImplementedError

    def after_step(self, module: nn.Module, iteration: int) -> None:
        """Called after each optimizer step of ``module``'s network (``iteration`` = G iteration).

        No-op by default; projection-style regularizers (SR, SPEC §2.3) act here under
        ``torch.no_grad()``.
        """

    #: what :meth:`penalty` needs the loop to prepare beyond what it computes anyway:
    #: ``"real_grad"``: the D phase's reals require grad before the main D forward (R1). The loop
    #: computes nothing a penalty does not ask for.
    needs: ClassVar[frozenset[str]] = frozenset()

    def penalty(self, context: "StepContext") -> torch.Tensor | None:
        """A scalar added to the loss of this regularizer's network for one micro-batch, or None.

        Called once per micro-batch of every optimizer step of the network the regularizer is
        attached to (``context.phase`` says which), on the optimizer steps selected by
        :attr:`penalty_every`; the loop divides it by the number of micro-batches like the main
        loss and multiplies it by ``penalty_every``. Forward passes of its own go through
        ``context.discriminator`` / ``context.generator`` (the DDP-wrapped networks).

        The default calls the v1 method :meth:`loss_term`, so v1 plugins keep working.
        """
        return self.loss_term(context.module, context.iteration)

    def loss_term(self, module: nn.Module, iteration: int) -> torch.Tensor | None:
        """v1 penalty (no batch, no logits): kept for plugins written against contract v1;
        new plugins implement :meth:`penalty`."""
        return None

    @property
    def penalty_every(self) -> int:
        """Lazy regularization (Karras et al. 2020, stylegan2 ``reg_interval``): the penalty runs
        on the optimizer steps ``s`` of its network with ``s % penalty_every == 0``, multiplied by
        ``penalty_every``. It is added in the main pass (no separate optimizer step), so Adam's
        learning rate and betas need no correction. 1 = every step."""
        return 1

    def state_dict(self) -> dict[str, torch.Tensor]:
        """State of the regularizer itself that is not a buffer of a parametrization (those travel
        with the network's ``state_dict``); saved in checkpoints beside the models."""
        return {}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Restore :meth:`state_dict`'s output (``{}`` for a checkpoint written without it)."""


@attrs.define(eq=False)
class StepContext:
    """What a penalty sees, once per micro-batch (cf. stylegan2-ada's ``accumulate_gradients``
    phases and EDM's loss callables). Built by the training loop; tensors not computed for this
    step are None."""

    #: "D": the discriminator's step; "G": the generator's.
    phase: str
    #: generator iterations completed so far.
    iteration: int
    #: optimizer steps of this phase's network completed so far (lazy ``every`` counts these).
    step: int
    #: this micro-batch's index ``m`` of ``num_micro_batches``.
    micro_batch: int
    num_micro_batches: int
    #: the wrapped (DDP) networks: a penalty's own forward passes go through these.
    discriminator: nn.Module
    generator: nn.Module
    #: the unwrapped network the regularizer is attached to.
    module: nn.Module
    #: D phase: this micro-batch's reals (``requires_grad`` iff a penalty needs "real_grad");
    #: G phase: only when the loss needs real logits.
    real: torch.Tensor | None = None
    real_labels: torch.Tensor | None = None
    #: D phase: the fakes, detached; G phase: the fakes with G's graph.
    fake: torch.Tensor | None = None
    fake_labels: torch.Tensor | None = None
    #: the logits the loop computed for ``real`` and ``fake`` (float32).
    real_logits: torch.Tensor | None = None
    fake_logits: torch.Tensor | None = None


# ---------------------------------------------------------------------------------------------
# Architectures
# ---------------------------------------------------------------------------------------------


class Architecture(Plugin):
    """Builds a generator ``G(z, y=None) -> images in [-1, 1]`` and a discriminator
    ``D(x, y=None) -> logits of shape [batch]``.

    Subclasses' Configs carry ``num_classes`` (0 = unconditional) where they can be conditional.
    """

    @property
    def resolution(self) -> int:
        raise NotImplementedError

    @property
    def z_dim(self) -> int:
        return 128

    @property
    def num_classes(self) -> int:
        """0 for unconditional architectures."""
        return int(getattr(self.config, "num_classes", 0) or 0)

    @property
    def conditional(self) -> bool:
        return self.num_classes > 0

    def build_generator(self) -> nn.Module:
        raise NotImplementedError

    def build_discriminator(self) -> nn.Module:
        raise NotImplementedError

    def sample_latents(self, n: int, generator: torch.Generator | None = None,
                       device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor | None]:
        """Latents and (for conditional architectures) uniformly drawn labels."""
        z = torch.randn(n, self.z_dim, generator=generator).to(device)
        y = None
        if self.conditional:
            y = torch.randint(0, self.num_classes, (n,), generator=generator).to(device)
        return z, y


# ---------------------------------------------------------------------------------------------
# Losses
# ---------------------------------------------------------------------------------------------


class Loss(Plugin):
    """Adversarial losses from discriminator logits (each already a mean over the batch)."""

    def discriminator_loss(self, real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    #: the generator loss wants real logits too (relativistic losses): the loop then runs D on a
    #: real micro-batch in the G step and passes ``real_logits``.
    needs_real_logits: ClassVar[bool] = False

    def generator_loss(self, fake_logits: torch.Tensor,
                       real_logits: torch.Tensor | None = None) -> torch.Tensor:
        raise NotImplementedError


# ---------------------------------------------------------------------------------------------
# Metrics
# ---------------------------------------------------------------------------------------------


@attrs.define
class MetricResult:
    """Scores and the protocol that produced them (samples, reference, network, versions...)."""

    values: dict[str, float]
    protocol: dict[str, Any] = attrs.field(factory=dict)


@attrs.define
class EvaluationContext:
    """What a metric may use: the generator (eval mode), optionally the discriminator, the data.

    Generated samples come in batches of ``batch_size`` from one CPU random stream seeded with
    ``seed``: batch ``i`` always holds the same samples, whatever the total asked for.
    :func:`core.eval.runner.evaluate` sets ``sample_cache`` for one evaluation, so that its
    metrics share one generation and the per-sample features they compute with the same network
    (:meth:`features`); without it every call generates afresh, with the same result.
    Yielded tensors and features are shared between metrics: read them, never modify in place.
    """

    generator: nn.Module
    architecture: Architecture
    dataset: "Dataset"
    data_root: Path
    device: torch.device
    seed: int = 0
    iteration: int = 0
    batch_size: int = 100
    discriminator: nn.Module | None = None
    show_progress: bool = True
    #: a ``core.eval.runner.SampleCache`` while :func:`core.eval.runner.evaluate` runs; None:
    #: nothing is shared.
    sample_cache: Any = None

    def batch_sizes(self, num_samples: int) -> list[int]:
        """Sizes of the batches ``num_samples`` samples come in: full batches, then the rest."""
        full, rest = divmod(num_samples, self.batch_size)
        return [self.batch_size] * full + ([rest] if rest else [])

    @torch.no_grad()
    def draw(self, rng: torch.Generator, n: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One batch from the random stream ``rng``: ``(images in [-1, 1] float32 CPU, labels
        the generator was given or None)``, the generator in eval mode."""
        was_training = self.generator.training
        self.generator.eval()
        try:
            z, y = self.architecture.sample_latents(n, rng, self.device)
            return self.generator(z, y).float().clamp(-1, 1).cpu(), y
        finally:
            self.generator.train(was_training)

    def generate_with_labels(self, num_samples: int
                             ) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
        """Yield ``(images, labels)`` batches of :meth:`generate`'s samples, with the labels
        (on ``device``) a conditional generator was given (None for an unconditional one)."""
        if self.sample_cache is not None:
            yield from self.sample_cache.samples(self, num_samples)
            return
        rng = torch.Generator().manual_seed(self.seed)
        for n in self.batch_sizes(num_samples):
            yield self.draw(rng, n)

    def generate(self, num_samples: int) -> Iterator[torch.Tensor]:
        """Yield batches of generated images in [-1, 1] (float32, CPU), deterministic in ``seed``."""
        for images, _ in self.generate_with_labels(num_samples):
            yield images

    def features(self, name: str, fn: Callable[[torch.Tensor], Any],
                 num_samples: int) -> Iterator[Any]:
        """Yield ``fn(images)`` for each batch of :meth:`generate`'s samples, computed once per
        evaluation for each ``name``: ``name`` must identify everything ``fn`` depends on (the
        network, its weights' hash, its preprocessing)."""
        if self.sample_cache is not None:
            yield from self.sample_cache.features(self, name, fn, num_samples)
            return
        for images in self.generate(num_samples):
            yield fn(images)


class Metric(Plugin):
    """A score of a generator. ``higher_is_better`` names the direction of ``primary`` key."""

    higher_is_better: ClassVar[bool] = True
    #: the key of ``MetricResult.values`` that "best checkpoint" selection uses.
    primary: ClassVar[str] = ""

    def compute(self, context: EvaluationContext) -> MetricResult:
        raise NotImplementedError


# ---------------------------------------------------------------------------------------------
# Datasets
# ---------------------------------------------------------------------------------------------


class Dataset(Plugin):
    """Builds a torch dataset of ``(image float[3,H,W] in [-1, 1], label int)`` items."""

    @property
    def resolution(self) -> int:
        raise NotImplementedError

    @property
    def num_classes(self) -> int:
        """0 when the data is used unconditionally."""
        return 0

    def build(self, root: Path, split: str = "train") -> torch.utils.data.Dataset:
        raise NotImplementedError

    #: whether :meth:`prepare` writes a prepared array (``python -m core.prepare`` offers only
    #: the datasets that set it).
    supports_prepare: ClassVar[bool] = False

    def prepare(self, root: Path, split: str = "train", workers: int = 0, force: bool = False,
                progress: bool = True) -> dict[str, Any]:
        """Decode and resize ``split`` once into the prepared array of :mod:`core.prepared` under
        ``root`` (an up-to-date one is kept unless ``force``); return its protocol record.
        Missing source files raise :class:`core.errors.DataMissingError`."""
        raise NotImplementedError(f"{type(self).__name__} has no prepared array")

    @property
    def dequantize(self) -> bool:
        """True: the items are ``p / 127.5 - 1`` of 8-bit pixels ``p`` and the training loop feeds
        D ``p / 128 - 1 + U(0, 1/128)`` instead (the dequantization of the SN-GAN and SR Chainer
        loaders; noise by :func:`core.data.dequantization_noise`). False (default): the items."""
        return False


# ---------------------------------------------------------------------------------------------
# Training callbacks
# ---------------------------------------------------------------------------------------------


class Callback(Plugin):
    """Hooks into the training loop (:class:`core.train.Trainer`); every method is a no-op here.

    A recipe selects a callback with a ``[callbacks.NAME]`` table whose keys are its ``Config``;
    one whose class says ``default_enabled = True`` is used also by a recipe that does not mention
    it (with its default Config). Every process runs every hook, in the recipe's order (default-
    enabled ones not in the recipe last); a hook that writes files does so on the main process
    (``trainer.acc.is_main_process``), and one that decides something for all processes broadcasts
    the decision. ``state_dict`` is saved in every checkpoint (JSON: plain values only) under the
    callback's name and handed back to ``load_state_dict`` on resume, before ``on_start``::

        class LossPrinter(Callback):
            @attrs.define
            class Config:
                every: int = 100

            def on_iteration_end(self, trainer, iteration):
                if iteration % self.config.every == 0 and trainer.acc.is_main_process:
                    print(iteration, trainer.iteration)
    """

    @attrs.define
    class Config:
        pass

    #: used by a recipe that does not mention it (the spectral monitor is).
    default_enabled: ClassVar[bool] = False

    def on_start(self, trainer: Any) -> None:
        """Before the first iteration of :meth:`core.train.Trainer.fit` (after a resume)."""

    def on_iteration_end(self, trainer: Any, iteration: int) -> None:
        """After iteration ``iteration`` (= ``trainer.iteration``), before its samples,
        evaluation and checkpoint."""

    def on_end(self, trainer: Any) -> None:
        """After the last iteration and its checkpoint (not when the run stops on an error)."""

    def state_dict(self) -> dict[str, Any]:
        """What a resumed run needs to continue as if uninterrupted (JSON-serializable)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`'s output (``{}`` for a checkpoint without this callback)."""


#: the plugin kinds in registry order: (attribute of the registry, base class).
PLUGIN_KINDS: dict[str, type[Plugin]] = {
    "regularizers": Regularizer,
    "architectures": Architecture,
    "losses": Loss,
    "metrics": Metric,
    "datasets": Dataset,
    "callbacks": Callback,
}
