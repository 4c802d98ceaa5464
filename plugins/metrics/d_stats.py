"""``d_stats``: the discriminator statistics of the SR paper's Section IV-C (Figures 9-11).

Mean and variance of the discriminator's output ``D(x)`` (eq. 2, the logit) on real training
data, real held-out data (the dataset's ``"test"`` split) and generated data, and of the hinge
discriminator objective (eq. 6) per sample pair, ``L_D = relu(1 - D(x_real)) + relu(1 + D(G(z)))``
with the i-th training image paired with the i-th generated one. A discriminator that rates
training images well above held-out ones overfits (the paper's Figure 10, ``i = r``); ``d_gap``
= |mean D(train) - mean D(test)| is that gap, the metric's primary score (lower is better).

Variances are population variances (ddof = 0). The discriminator runs in eval mode with its
regularizers' state frozen (:func:`core.layers.frozen_state`); a conditional one gets the
dataset labels for real images and the sampled labels for generated ones.

Recipe::

    [[eval.metrics]]
    name = "d_stats"
    num_samples = 10000
"""

from __future__ import annotations

from typing import Iterator

import attrs
import numpy as np
import torch

from core.errors import SpecregError
from core.eval.runner import progress
from core.hookspecs import hookimpl
from core.interfaces import EvaluationContext, Metric, MetricResult
from core.layers import frozen_state
from core.validators import positive_int
from plugins.metrics.reference import real_images

__all__ = ["DStats", "generate_with_labels"]


def generate_with_labels(context: EvaluationContext, num_samples: int
                         ) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
    """``(images on context.device, labels)`` batches: ``context.generate_with_labels`` (the
    samples of ``context.generate``, shared within one evaluation)."""
    for images, y in context.generate_with_labels(num_samples):
        yield images.to(context.device), y


def _stats(values: np.ndarray) -> tuple[float, float]:
    return float(np.mean(values)), float(np.var(values))


class DStats(Metric):
    """Mean/variance of D(x) on train, test and generated data, and of the hinge L_D."""

    higher_is_better = False
    primary = "d_gap"
    #: the scores it reports: mean and variance of each set's outputs and of the loss, the gap.
    value_keys = tuple(f"{n}_{s}" for n in ("d_train", "d_test", "d_gen", "loss_d")
                       for s in ("mean", "var")) + ("d_gap",)

    @attrs.define
    class Config:
        #: images per set (train, test, generated); real splits are capped at their size.
        num_samples: int = attrs.field(default=10_000, validator=positive_int)

    @torch.no_grad()
    def _outputs_real(self, context: EvaluationContext, discriminator: torch.nn.Module,
                      split: str) -> tuple[np.ndarray, int]:
        data, n = real_images(context, split, self.config.num_samples)
        conditional = context.architecture.conditional
        loader = torch.utils.data.DataLoader(data, batch_size=context.batch_size, shuffle=False)
        out = []
        bar = progress(n, f"d_stats: D on {split}", context.show_progress)
        for images, labels in loader:
            y = labels.to(context.device) if conditional else None
            out.append(discriminator(images.to(context.device), y).float().reshape(-1).cpu())
            bar.update(len(images))
        bar.close()
        return torch.cat(out).double().numpy(), n

    @torch.no_grad()
    def _outputs_generated(self, context: EvaluationContext,
                           discriminator: torch.nn.Module) -> np.ndarray:
        out = []
        bar = progress(self.config.num_samples, "d_stats: generating + D",
                       context.show_progress)
        for images, y in generate_with_labels(context, self.config.num_samples):
            out.append(discriminator(images, y).float().reshape(-1).cpu())
            bar.update(len(images))
        bar.close()
        return torch.cat(out).double().numpy()

    def compute(self, context: EvaluationContext) -> MetricResult:
        discriminator = context.discriminator
        if discriminator is None:
            raise SpecregError("d_stats needs the discriminator: the evaluation context has "
                               "none (evaluate a checkpoint that holds one)")
        was_training = discriminator.training
        discriminator.eval()
        try:
            with frozen_state():
                d_train, n_train = self._outputs_real(context, discriminator, "train")
                d_test, n_test = self._outputs_real(context, discriminator, "test")
                d_gen = self._outputs_generated(context, discriminator)
        finally:
            discriminator.train(was_training)
        pairs = min(len(d_train), len(d_gen))
        loss = np.maximum(0.0, 1.0 - d_train[:pairs]) + np.maximum(0.0, 1.0 + d_gen[:pairs])
        values = {}
        for name, v in (("d_train", d_train), ("d_test", d_test), ("d_gen", d_gen),
                        ("loss_d", loss)):
            values[f"{name}_mean"], values[f"{name}_var"] = _stats(v)
        values["d_gap"] = abs(values["d_train_mean"] - values["d_test_mean"])
        protocol = {"samples": len(d_gen), "train_samples": n_train, "test_samples": n_test,
                    "loss_pairs": pairs, "resolution": context.dataset.resolution,
                    "loss": "hinge, per pair: relu(1 - D(x_train)) + relu(1 + D(G(z)))",
                    "reference": {"dataset": context.dataset.name, "split": "train+test",
                                  "samples": n_train + n_test}}
        return MetricResult(values, protocol)


@hookimpl
def register_metrics(register) -> None:
    register("d_stats", DStats)

