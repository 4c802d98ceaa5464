"""``is``: Inception Score (Salimans et al. 2016) from the same network and path as ``fid``.

``IS = exp(E_x KL(p(y|x) || p(y)))``, computed in float64 on each of ``splits`` consecutive
slices of the samples (50k samples, 10 splits by default, as the original code); the score is
the mean over slices and ``is_std`` their standard deviation. ``p(y|x)`` is the softmax of the
TorchScript Inception's logits without the output bias (:mod:`plugins.metrics.inception`), so
FID and IS come from one network and one preprocessing path.

Recipe::

    [[eval.metrics]]
    name = "is"
    num_samples = 50000
    splits = 10
"""

from __future__ import annotations

import attrs
import numpy as np

from core.eval.runner import plain
from core.hookspecs import hookimpl
from core.interfaces import EvaluationContext, Metric, MetricResult
from core.validators import fail, positive_int
from plugins.metrics.inception import InceptionSettings, generated_features, inception_extractor
from plugins.metrics.protocols import comparisons, score_settings

__all__ = ["InceptionScore", "inception_score"]


def inception_score(logits: np.ndarray, splits: int = 10) -> tuple[float, float]:
    """``(mean, std)`` over ``splits`` consecutive slices of ``exp(mean KL(p(y|x) || p(y)))``,
    slice ``i`` being rows ``[i*n//splits, (i+1)*n//splits)`` as in the original code."""
    from scipy.special import log_softmax  # here: registering ``is`` stays cheap

    log_p = log_softmax(np.asarray(logits, dtype=np.float64), axis=1)
    n = len(log_p)
    if not 1 <= splits <= n:
        raise ValueError(f"need 1 <= splits <= samples, got {splits} splits of {n} samples")
    scores = []
    for i in range(splits):
        part = log_p[i * n // splits:(i + 1) * n // splits]
        p = np.exp(part)
        log_marginal = np.log(p.mean(axis=0))
        kl = np.sum(p * (part - log_marginal), axis=1).mean()
        scores.append(np.exp(kl))
    return float(np.mean(scores)), float(np.std(scores))


def _at_most_num_samples(config, attribute, splits: int) -> None:
    samples = config.num_samples
    if isinstance(samples, int) and samples >= 1 and splits > samples:
        fail(config, attribute, f"must be <= num_samples ({samples}), got {splits}",
             related=[("num_samples",)])


class InceptionScore(Metric):
    """Inception Score of generated samples (higher is better)."""

    higher_is_better = True
    primary = "is"
    value_keys = ("is", "is_std")

    @attrs.define
    class Config(InceptionSettings):
        #: generated samples (SPEC §5: 50k).
        num_samples: int = attrs.field(default=50_000, validator=positive_int)
        #: slices the score is averaged over (SPEC §5: 10); at most ``num_samples``.
        splits: int = attrs.field(default=10, validator=[positive_int, _at_most_num_samples])

    def compute(self, context: EvaluationContext) -> MetricResult:
        cfg = self.config
        extractor = inception_extractor(cfg, context.data_root, context.device)
        features = generated_features(context, extractor, cfg.num_samples, "is")
        mean, std = inception_score(extractor.logits(features), cfg.splits)
        protocol = {"samples": len(features), "splits": cfg.splits,
                    "resolution": context.dataset.resolution,
                    "logits": "pool features @ output.weight.T (no output bias)",
                    **extractor.protocol()}
        dataset = context.dataset
        protocol.update(comparisons(score_settings(  # which papers' tables it compares with
            "is", cfg, dataset.name, dataset.resolution, plain(dataset.config))))
        return MetricResult({"is": mean, "is_std": std}, protocol)


@hookimpl
def register_metrics(register) -> None:
    register("is", InceptionScore)
