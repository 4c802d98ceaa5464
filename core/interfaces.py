"""The public contract of specreg: the five kinds of plugin.

Every plugin is a class with a nested, default-constructible attrs ``Config``. A recipe table
selects the plugin with ``name`` and its remaining keys are structured into that ``Config``
(see :mod:`core.recipe`). The registry (:mod:`core.registry`) maps names to these classes.

    class MyRegularizer(Regularizer):
        '''One line saying what it does, citing the paper and equation.'''

        @attrs.define
        class Config:
            strength: float = 1.0

        def apply(self, module): ...
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar, Iterator

import attrs
import torch
from torch import nn

__all__ = [
    "Plugin",
    "Regularizer",
    "Architecture",
    "Loss",
    "Metric",
    "MetricResult",
    "EvaluationContext",
    "Dataset",
    "PLUGIN_KINDS",
]


class Plugin:
    """Base of every plugin kind: holds its structured ``config``."""

    @attrs.define
    class Config:
        pass

    #: the name it was registered under (set by the registry).
    name: ClassVar[str] = ""

    def __init__(self, config: Any | None = None) -> None:
        self.config = config if config is not None else self.Config()

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

    def loss_term(self, module: nn.Module, iteration: int) -> torch.Tensor | None:
        """A penalty added to the loss of ``module``'s network at each optimizer step, or None.

        Called once per micro-batch; the returned term is scaled like the main loss.
        """
        return None


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

    def generator_loss(self, fake_logits: torch.Tensor) -> torch.Tensor:
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
    """What a metric may use: the generator (eval mode), optionally the discriminator, the data."""

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

    @torch.no_grad()
    def generate(self, num_samples: int) -> Iterator[torch.Tensor]:
        """Yield batches of generated images in [-1, 1] (float32, CPU), deterministic in ``seed``."""
        rng = torch.Generator().manual_seed(self.seed)
        was_training = self.generator.training
        self.generator.eval()
        try:
            done = 0
            while done < num_samples:
                n = min(self.batch_size, num_samples - done)
                z, y = self.architecture.sample_latents(n, rng, self.device)
                yield self.generator(z, y).float().clamp(-1, 1).cpu()
                done += n
        finally:
            self.generator.train(was_training)


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


#: the plugin kinds in registry order: (attribute of the registry, base class).
PLUGIN_KINDS: dict[str, type[Plugin]] = {
    "regularizers": Regularizer,
    "architectures": Architecture,
    "losses": Loss,
    "metrics": Metric,
    "datasets": Dataset,
}
