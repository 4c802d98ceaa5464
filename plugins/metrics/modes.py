"""``modes`` and ``digits_fid``: mode coverage on stacked digits (SPEC §5; Stacked-MNIST protocol
of VEEGAN, Srivastava et al. 2017, and PacGAN, Lin et al. 2018).

Each generated image is downsampled to 8x8 (:func:`plugins.datasets.stacked_digits.downsample`)
and each channel labelled by the digit classifier of :mod:`plugins.metrics.digit_classifier`,
which rejects channels that are not confidently a digit. A sample counts only if all three
channels are accepted; its mode is ``100 * d_R + 10 * d_G + d_B``.

- ``modes``: ``modes`` = distinct modes among accepted samples (of 1000), ``kl`` =
  KL(histogram of accepted samples' modes || uniform over 1000), ``rejected`` = share of samples
  with a rejected channel. When every sample is rejected the histogram is empty and the KL is
  undefined; ``kl`` is then NaN (the metric contract's mark of an undefined score: records stay
  strict JSON, and ``eval.best = "modes.kl"`` never picks a non-finite value).
- ``digits_fid``: the Fréchet distance (clean-fid's ``frechet_distance``) between generated and
  real stacked digits in the classifier's feature space (three channels' 64-d features side by
  side); the real statistics come from the dataset plugin's split, cached like FID's.

Recipe::

    [[eval.metrics]]
    name = "modes"
    num_samples = 10000
"""

from __future__ import annotations

import math

import attrs
import numpy as np

from core.eval.runner import progress
from core.hookspecs import hookimpl
from core.interfaces import EvaluationContext, Metric, MetricResult
from core.validators import int_at_least, nonnegative_int, positive_int
from plugins.datasets.stacked_digits import NUM_MODES
from plugins.metrics.digit_classifier import load_digit_classifier
from plugins.metrics.fid import fid_from_statistics
from plugins.metrics.reference import dataset_statistics, feature_statistics

__all__ = ["Modes", "DigitsFid", "mode_coverage"]


def mode_coverage(digits: np.ndarray, accepted: np.ndarray,
                  num_modes: int = NUM_MODES) -> dict[str, float]:
    """``modes``, ``kl`` and ``rejected`` from per-channel ``digits [N, 3]`` and ``accepted
    [N, 3]`` (see the module docstring)."""
    digits = np.asarray(digits, dtype=np.int64)
    keep = np.asarray(accepted, dtype=bool).all(axis=1)
    modes = 100 * digits[keep, 0] + 10 * digits[keep, 1] + digits[keep, 2]
    counts = np.bincount(modes, minlength=num_modes).astype(np.float64)
    total = counts.sum()
    if total > 0:
        p = counts[counts > 0] / total
        kl = float(np.sum(p * np.log(p * num_modes)))
    else:  # nothing accepted: undefined (see the module docstring)
        kl = math.nan
    return {"modes": float(np.count_nonzero(counts)), "kl": kl,
            "rejected": float(1.0 - keep.mean()) if len(keep) else math.nan}


class Modes(Metric):
    """Modes covered (of 1000), KL to uniform and the rejected share, on stacked digits."""

    higher_is_better = True
    primary = "modes"
    #: the scores it reports (``eval.best = "modes.modes"``).
    value_keys = ("modes", "kl", "rejected")

    @attrs.define
    class Config:
        #: generated samples classified.
        num_samples: int = attrs.field(default=10_000, validator=positive_int)

    def compute(self, context: EvaluationContext) -> MetricResult:
        n = self.config.num_samples
        classifier = load_digit_classifier(context.data_root, verbose=context.show_progress)
        digits, accepted = [], []
        bar = progress(n, "modes: generating + classifying", context.show_progress)
        for scores in context.features(classifier.features_name, classifier.image_scores, n):
            digits.append(scores["digits"])
            accepted.append(scores["accepted"])
            bar.update(len(scores["digits"]))
        bar.close()
        accepted_np = np.concatenate(accepted)
        values = mode_coverage(np.concatenate(digits), accepted_np)
        protocol = {"samples": n, "num_modes": NUM_MODES, "resolution": 32,
                    "channel_rejected": float(1.0 - accepted_np.mean()),
                    "reference": {"dataset": "sklearn digits (classifier)", "split": "train"},
                    **classifier.protocol()}
        return MetricResult(values, protocol)


class DigitsFid(Metric):
    """Fréchet distance to real stacked digits in the digit classifier's feature space."""

    higher_is_better = False
    primary = "digits_fid"
    value_keys = ("digits_fid",)

    @attrs.define
    class Config:
        #: generated samples.
        num_samples: int = attrs.field(default=10_000, validator=int_at_least(2, "a covariance"))
        #: the dataset split the real statistics come from.
        reference_split: str = "train"
        #: real images in the reference statistics (0 = the whole split).
        reference_samples: int = attrs.field(default=0, validator=nonnegative_int)

    def compute(self, context: EvaluationContext) -> MetricResult:
        cfg = self.config
        classifier = load_digit_classifier(context.data_root, verbose=context.show_progress)
        reference = dataset_statistics(context, split=cfg.reference_split, kind="digit-mlp",
                                       network_sha256=classifier.sha256,
                                       features=classifier.image_features,
                                       num_samples=cfg.reference_samples)
        chunks = []
        bar = progress(cfg.num_samples, "digits_fid: generating + digit features",
                       context.show_progress)
        for scores in context.features(classifier.features_name, classifier.image_scores,
                                       cfg.num_samples):  # shared with ``modes``
            chunks.append(scores["features"])
            bar.update(len(scores["features"]))
        bar.close()
        mu, sigma = feature_statistics(np.concatenate(chunks))
        value = fid_from_statistics(mu, sigma, reference.mu, reference.sigma)
        protocol = {"samples": cfg.num_samples, "resolution": 32,
                    "reference": reference.protocol, **classifier.protocol()}
        return MetricResult({"digits_fid": value}, protocol)


@hookimpl
def register_metrics(register) -> None:
    register("modes", Modes)
    register("digits_fid", DigitsFid)

