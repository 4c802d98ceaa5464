"""``fid``: Fréchet Inception Distance (Heusel et al. 2017) the clean-fid way (SPEC §5).

``FID = |mu_g - mu_r|^2 + Tr(S_g + S_r - 2 (S_g S_r)^(1/2))`` between Gaussians fitted to the
Inception pool features of generated and real images, computed by clean-fid's
``frechet_distance``. Features come from :mod:`plugins.metrics.inception` (clean-fid's
network and resizing); the real statistics from the dataset plugin's split, cached under the data
root (:mod:`plugins.metrics.reference`), or clean-fid's published ones by name.

Recipe::

    [[eval.metrics]]
    name = "fid"
    num_samples = 50000          # 50k for final numbers, fewer during training
    reference_split = "train"    # FID against training-set statistics (SPEC §5)
    # reference_stats = "cifar10" # clean-fid's published statistics instead of our own
    # mode = "legacy_tensorflow"  # to compare with old papers (the protocol's
    #                             # comparable_with lists the tables it matches, see protocols.py)
    # inception_weights = "/models/inception-2015-12-05.pt"
"""

from __future__ import annotations

import attrs
import numpy as np

from core.eval.runner import plain
from core.hookspecs import hookimpl
from core.interfaces import EvaluationContext, Metric, MetricResult
from core.validators import int_at_least, nonnegative_int
from plugins.metrics.inception import InceptionSettings, generated_features, inception_extractor
from plugins.metrics.protocols import comparisons, score_settings
from plugins.metrics.reference import (Statistics, dataset_statistics, feature_statistics,
                                       published_statistics)

__all__ = ["Fid", "fid_from_features", "fid_from_statistics"]


def fid_from_statistics(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray,
                        sigma2: np.ndarray) -> float:
    """clean-fid's ``frechet_distance`` of two Gaussians, as a float."""
    from cleanfid.fid import frechet_distance  # here: registering ``fid`` stays cheap

    return float(frechet_distance(mu1, sigma1, mu2, sigma2))


def fid_from_features(features1: np.ndarray, features2: np.ndarray) -> float:
    """FID between two feature sets (rows = samples)."""
    return fid_from_statistics(*feature_statistics(features1), *feature_statistics(features2))


class Fid(Metric):
    """Fréchet Inception Distance of generated samples to the real data (lower is better)."""

    higher_is_better = False
    primary = "fid"
    value_keys = ("fid",)

    @attrs.define
    class Config(InceptionSettings):
        #: generated samples (50k for final numbers, SPEC §5).
        num_samples: int = attrs.field(default=50_000, validator=int_at_least(2, "a covariance"))
        #: the dataset split the reference statistics come from.
        reference_split: str = "train"
        #: real images in the reference statistics (0 = the whole split).
        reference_samples: int = attrs.field(default=0, validator=nonnegative_int)
        #: clean-fid published statistics by name (e.g. "cifar10"); empty = our dataset plugin.
        reference_stats: str = ""
        #: resolution of the published statistics (0 = the dataset's resolution).
        reference_resolution: int = attrs.field(default=0, validator=nonnegative_int)

    def reference(self, context: EvaluationContext, extractor) -> Statistics:
        cfg = self.config
        if cfg.reference_stats:
            resolution = cfg.reference_resolution or context.dataset.resolution
            return published_statistics(cfg.reference_stats, cfg.reference_split, resolution,
                                        cfg.mode)
        return dataset_statistics(context, split=cfg.reference_split,
                                  kind=f"inception-{cfg.mode}", network_sha256=extractor.sha256,
                                  features=extractor.features,
                                  num_samples=cfg.reference_samples, extra=extractor.protocol())

    def compute(self, context: EvaluationContext) -> MetricResult:
        cfg = self.config
        extractor = inception_extractor(cfg, context.data_root, context.device)
        reference = self.reference(context, extractor)
        features = generated_features(context, extractor, cfg.num_samples, "fid")
        mu, sigma = feature_statistics(features)
        value = fid_from_statistics(mu, sigma, reference.mu, reference.sigma)
        protocol = {"samples": len(features), "resolution": context.dataset.resolution,
                    "reference": reference.protocol, **extractor.protocol()}
        dataset = context.dataset
        protocol.update(comparisons(score_settings(  # which papers' tables it compares with
            "fid", cfg, dataset.name, dataset.resolution, plain(dataset.config),
            reference.protocol)))
        return MetricResult({"fid": value}, protocol)


@hookimpl
def register_metrics(register) -> None:
    register("fid", Fid)
