"""The published evaluation protocols a score can be compared with (SPEC §5; issue 11 point 5).

A number is comparable with a paper's table only when it was computed the way the paper's
numbers were: the TensorFlow Inception path (bilinear resizing inside the network: clean-fid's
``mode = "legacy_tensorflow"``), the same number of generated samples (and IS splits), FID
against the same reference (the training set, whole or a random subset of the paper's size), on
the paper's dataset at the paper's resolution. Each :class:`PaperProtocol` below states one
paper's protocol for one metric and dataset, and where each of its numbers comes from (the rule
of SPEC: the paper where it says, the authors' code where it is silent).

:func:`comparisons` derives, from the settings a score was really computed with, the papers it
is comparable with and, for the other papers on the same dataset, why not::

    settings = ScoreSettings(metric="fid", dataset="cifar10", resolution=32, mode="clean",
                             samples=5000, reference_split="train", reference_samples=50000,
                             reference_whole_split=True)
    comparisons(settings)
    # {"comparable_with": ["SR Table II"],          (if mode were "legacy_tensorflow")
    #  "not_comparable_with": {"BSSN Table 1": "mode 'clean' (paper: 'legacy_tensorflow'); ..."}}

``fid`` and ``is`` put these two fields into their protocol; :mod:`core.eval.runner` copies
``comparable_with`` into every record and shows it in its table.
"""

from __future__ import annotations

from typing import Any, Mapping

import attrs

__all__ = ["PaperProtocol", "ScoreSettings", "PROTOCOLS", "comparisons", "differences",
           "score_settings", "LEGACY_TENSORFLOW"]

#: clean-fid's mode that reproduces the TensorFlow Inception pipeline of the papers' code.
LEGACY_TENSORFLOW = "legacy_tensorflow"

_SR = "SR Table II"
_BSSN = "BSSN Table 1"
_SR_TITLE = "Liu et al. 2019, Spectral Regularization for Combating Mode Collapse in GANs"
_BSSN_TITLE = "Lin et al. 2021, Why Spectral Normalization Stabilizes GANs"

_SR_INCEPTION = ("the paper is silent ('we follow the practices in the literature', §IV-A); "
                 "the authors' code (max-liu-112/SRGANs-Spectral-Regularization-GANs- and "
                 "max-liu-112/SRGANs, evaluation.py) feeds the TF-Inception port images resized "
                 "bilinearly to 299 (F.resize_images): legacy_tensorflow")
_SR_IS = (_SR_INCEPTION + "; IS from evaluations/calc_inception_score.py: 5000 x splits images, "
          "splits = 10 (the mean ± std Table II prints)")
_SR_FID = (_SR_INCEPTION + "; FID from evaluation.py calc_FID: n_ims = 5000 generated images "
           "against the training set's statistics (datasets/inception_model/"
           "fid_stats_<dataset>_train.npz)")
_BSSN_INCEPTION = ("the authors' code (fjxmlzn/BSN no_gamma-CNN and no_gamma-ResNet, "
                   "gan/metric.py) runs TF-GAN's Inception after tf.image.resize_bilinear to "
                   "299: legacy_tensorflow")
_BSSN_IS = ("paper App. H.2 (\"... into 10 sets\"; the rest of its text is lost in our copy) and "
            "the authors' code: InceptionScore(num_images=50000, num_splits=10); "
            + _BSSN_INCEPTION)
_BSSN_FID = ("the authors' code: FrechetInceptionDistance(num_gen_images=10000, "
             "num_real_images=5000), the real images a random subset of the training data "
             "(gan_task.py); " + _BSSN_INCEPTION)


@attrs.frozen
class PaperProtocol:
    """How one paper computed one metric on one dataset."""

    #: short name shown in tables ("SR Table II").
    table: str
    #: the paper.
    title: str
    #: our metric's registered name: "fid" or "is".
    metric: str
    #: our dataset plugin's name and the image size the paper evaluates at.
    dataset: str
    resolution: int
    samples: int
    mode: str = LEGACY_TENSORFLOW
    #: IS only.
    splits: int | None = None
    #: FID only: the split the real statistics come from.
    reference_split: str | None = None
    #: FID only: real images in the reference; 0 = the whole split; None = not published.
    reference_samples: int | None = None
    #: dataset Config values the paper's data had (e.g. STL-10's unlabeled images).
    dataset_config: Mapping[str, Any] = attrs.field(factory=dict)
    #: where these settings come from.
    source: str = ""


@attrs.frozen
class ScoreSettings:
    """The settings one score was computed with (what :func:`comparisons` compares)."""

    metric: str
    dataset: str
    resolution: int
    mode: str
    samples: int
    splits: int | None = None
    reference_split: str | None = None
    #: real images the reference statistics were computed from.
    reference_samples: int | None = None
    #: whether those were the whole split.
    reference_whole_split: bool = False
    dataset_config: Mapping[str, Any] = attrs.field(factory=dict)


def _sr(metric: str, dataset: str, resolution: int, **kw: Any) -> PaperProtocol:
    if metric == "is":
        return PaperProtocol(_SR, _SR_TITLE, "is", dataset, resolution, 50_000, splits=10,
                             source=_SR_IS, **kw)
    return PaperProtocol(_SR, _SR_TITLE, "fid", dataset, resolution, 5_000,
                         reference_split="train", source=_SR_FID, **kw)


def _bssn(metric: str, dataset: str, resolution: int, **kw: Any) -> PaperProtocol:
    if metric == "is":
        return PaperProtocol(_BSSN, _BSSN_TITLE, "is", dataset, resolution, 50_000, splits=10,
                             source=_BSSN_IS, **kw)
    return PaperProtocol(_BSSN, _BSSN_TITLE, "fid", dataset, resolution, 10_000,
                         reference_split="train", reference_samples=5_000, source=_BSSN_FID,
                         **kw)


_STL_UNLABELED = {"source_split": "unlabeled"}

#: every protocol we know of. SR: CIFAR-10's statistics file is the whole training set (TTUR's
#: fid_stats_cifar10_train.npz); the authors published none for STL-10 (the whole 100k unlabeled
#: images: ours) and do not say how many images their ImageNet file holds (not constrained).
#: BSSN: IS is not reported on CelebA (Table 1).
PROTOCOLS: tuple[PaperProtocol, ...] = (
    _sr("is", "cifar10", 32), _sr("fid", "cifar10", 32, reference_samples=0),
    _sr("is", "stl10", 32, dataset_config=_STL_UNLABELED),
    _sr("fid", "stl10", 32, reference_samples=0, dataset_config=_STL_UNLABELED),
    _sr("is", "imagenet", 128), _sr("fid", "imagenet", 128),
    _bssn("is", "cifar10", 32), _bssn("fid", "cifar10", 32),
    _bssn("is", "stl10", 48, dataset_config=_STL_UNLABELED),
    _bssn("fid", "stl10", 48, dataset_config=_STL_UNLABELED),
    _bssn("fid", "celeba", 64, dataset_config={"crop": 128}),
    _bssn("is", "imagenet", 128), _bssn("fid", "imagenet", 128),
)


def differences(settings: ScoreSettings, protocol: PaperProtocol) -> list[str]:
    """What in ``settings`` differs from ``protocol`` (empty: comparable)."""
    problems = []

    def differ(what: str, ours: Any, theirs: Any) -> None:
        if ours != theirs:
            problems.append(f"{what} {ours!r} (paper: {theirs!r})")

    differ("resolution", settings.resolution, protocol.resolution)
    differ("mode", settings.mode, protocol.mode)
    differ("samples", settings.samples, protocol.samples)
    if protocol.splits is not None:
        differ("splits", settings.splits, protocol.splits)
    if protocol.reference_split is not None:
        differ("reference split", settings.reference_split, protocol.reference_split)
    if protocol.reference_samples == 0 and not settings.reference_whole_split:
        problems.append(f"reference of {settings.reference_samples} real images (paper: the "
                        "whole split)")
    elif protocol.reference_samples:
        differ("reference images", settings.reference_samples, protocol.reference_samples)
    for key, value in protocol.dataset_config.items():
        differ(f"dataset {key}", settings.dataset_config.get(key), value)
    return problems


def comparisons(settings: ScoreSettings) -> dict[str, Any]:
    """``{"comparable_with": [tables], "not_comparable_with": {table: why}}`` over the known
    protocols for this metric and dataset."""
    comparable: list[str] = []
    not_comparable: dict[str, str] = {}
    for protocol in PROTOCOLS:
        if (protocol.metric, protocol.dataset) != (settings.metric, settings.dataset):
            continue
        problems = differences(settings, protocol)
        if problems:
            not_comparable[protocol.table] = "; ".join(problems)
        else:
            comparable.append(protocol.table)
    return {"comparable_with": comparable, "not_comparable_with": not_comparable}


def score_settings(metric: str, config: Any, dataset: str, resolution: int,
                   dataset_config: Mapping[str, Any] | None = None,
                   reference: Mapping[str, Any] | None = None) -> ScoreSettings:
    """The :class:`ScoreSettings` of metric ``metric`` ("fid" or "is") with Config ``config`` on
    ``dataset`` at ``resolution``. ``reference``: the protocol of the reference statistics the
    FID was computed against; without it (a recipe not yet run) the Config stands for it
    (``reference_samples = 0``: the whole split)."""
    common = dict(metric=metric, dataset=dataset, resolution=int(resolution), mode=config.mode,
                  samples=int(config.num_samples), dataset_config=dict(dataset_config or {}))
    if metric == "is":
        return ScoreSettings(splits=int(config.splits), **common)
    split = config.reference_split
    if config.reference_stats and config.reference_stats != dataset:
        split = f"{config.reference_stats}:{split}"  # another dataset's statistics
    if reference is not None:
        whole = bool(reference.get("whole_split", False))
        count = reference.get("samples")
    else:
        whole = config.reference_samples == 0 or bool(config.reference_stats)
        count = config.reference_samples or None
    return ScoreSettings(reference_split=split, reference_samples=count,
                         reference_whole_split=whole, **common)
