"""The digit classifier behind ``modes`` and ``digits_fid`` (SPEC §5), which can say "not a digit".

A small MLP (64 -> 128 -> 64 -> 11) on scikit-learn's bundled 8x8 digits: classes 0-9 and an
eleventh *reject* class trained on synthetic non-digits (outlier exposure, Hendrycks et al. 2019):
uniform and Gaussian pixel noise, blank images, smooth blobs, binary speckle, overlays of two
different digits and inverted digits. A channel is *accepted* as a digit only if both

- its softmax probability of the predicted digit (over the 11 classes) is at least
  ``min_probability``, and
- its squared Mahalanobis distance in the 64-d feature space to the nearest digit class mean
  (shared covariance of the training digits; Lee et al. 2018, "A simple unified framework for
  detecting out-of-distribution samples") is at most ``max_distance``,

because a softmax classifier alone is often confidently wrong far from its training data (noise
reads as a digit). Both thresholds are calibrated together on the held-out ``digit_pool("test")``
so that about 1% of real held-out digits are rejected.

Training is deterministic (fixed seeds) and takes seconds on a CPU. The result is cached under
``<data_root>/.cache/digit_classifier/`` as ``classifier.safetensors`` (tensors only) and
``classifier.json`` (settings, accuracy, thresholds, the weights' SHA-256); a cache entry whose
version, settings or hash do not match is retrained.

    clf = load_digit_classifier(data_root)           # prints its held-out accuracy
    digits, accepted = clf.classify_images(images)   # images [N, 3, 32, 32] in [-1, 1]
    feats = clf.image_features(images)               # [N, 3 * 64] for digits_fid
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any

import attrs
import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save
from torch import nn

from core.errors import SpecregError
from plugins.datasets.stacked_digits import RESOLUTIONS, digit_pool, downsample

__all__ = ["DigitClassifier", "DigitNet", "TrainingSettings", "load_digit_classifier",
           "train_digit_classifier", "non_digits", "NUM_DIGITS", "REJECT_CLASS"]

#: bump when training or the file format changes: cached classifiers are then retrained.
CLASSIFIER_VERSION = 1
NUM_DIGITS = 10
#: index of the "not a digit" class.
REJECT_CLASS = 10
CACHE_DIR = Path(".cache") / "digit_classifier"


@attrs.frozen
class TrainingSettings:
    """Everything training depends on (part of the cache key)."""

    hidden: int = 128
    features: int = 64
    epochs: int = 400
    lr: float = 3e-3
    weight_decay: float = 1e-3
    #: synthetic non-digits per training digit.
    non_digits_per_digit: int = 2
    #: share of held-out real digits the thresholds reject.
    reject_share: float = 0.01
    #: covariance ridge, relative to its mean eigenvalue.
    ridge: float = 1e-3
    seed: int = 0


class DigitNet(nn.Module):
    """``[N, 8, 8]`` digits in [0, 1] -> (logits over 10 digits + reject ``[N, 11]``,
    features ``[N, features]``)."""

    def __init__(self, hidden: int = 128, features: int = 64) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(64, hidden), nn.ReLU(),
                                  nn.Linear(hidden, features), nn.ReLU())
        self.head = nn.Linear(features, NUM_DIGITS + 1)

    def forward(self, digits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.body(digits.reshape(len(digits), 64))
        return self.head(features), features


def non_digits(n: int, rng: np.random.Generator, images: np.ndarray,
               labels: np.ndarray) -> np.ndarray:
    """About ``n`` synthetic 8x8 non-digits in [0, 1] (the reject class), in eight equal kinds."""
    k = max(1, n // 8)
    kinds = [
        rng.uniform(0, 1, (k, 8, 8)),  # uniform pixel noise
        np.clip(rng.uniform(0, 1, (k, 1, 1))  # grey level + Gaussian noise (downsampled noise)
                + rng.uniform(0.02, 0.3, (k, 1, 1)) * rng.standard_normal((k, 8, 8)), 0, 1),
        np.broadcast_to(rng.uniform(0, 1, (k, 1, 1)), (k, 8, 8)),  # blank
        F.interpolate(torch.from_numpy(rng.uniform(0, 1, (k, 1, 3, 3))), size=8,  # smooth blobs
                      mode="bilinear", align_corners=False)[:, 0].numpy(),
        (rng.uniform(0, 1, (k, 8, 8)) < rng.uniform(0.1, 0.6, (k, 1, 1))).astype(float),  # speckle
    ]
    i, j = rng.integers(0, len(labels), k), rng.integers(0, len(labels), k)
    differ = labels[i] != labels[j]  # overlays of two different digits
    kinds.append((images[i[differ]] + images[j[differ]]) / 2)
    kinds.append(np.maximum(images[i[differ]], images[j[differ]]))
    kinds.append(1.0 - images[rng.integers(0, len(labels), k)])  # inverted digits
    return np.concatenate(kinds).astype(np.float32)


class DigitClassifier:
    """A trained :class:`DigitNet` with its rejection rule (see the module docstring)."""

    def __init__(self, net: DigitNet, class_means: torch.Tensor, precision: torch.Tensor,
                 min_probability: float, max_distance: float, info: dict[str, Any],
                 sha256: str = "") -> None:
        self.net = net.eval()
        self.class_means = class_means.double()
        self.precision = precision.double()
        self.min_probability = float(min_probability)
        self.max_distance = float(max_distance)
        self.info = info
        self.sha256 = sha256

    @torch.no_grad()
    def scores(self, digits: torch.Tensor) -> dict[str, torch.Tensor]:
        """For ``[N, 8, 8]`` digits in [0, 1]: ``digit`` (argmax over the 10 digits),
        ``probability`` (its softmax probability among all 11 classes), ``distance`` (squared
        Mahalanobis distance to the nearest digit class mean) and ``features``."""
        logits, features = self.net(digits.float())
        prob = F.softmax(logits, dim=1)[:, :NUM_DIGITS]
        probability, digit = prob.max(dim=1)
        diff = features.double()[:, None, :] - self.class_means[None]
        distance = torch.einsum("ncf,fg,ncg->nc", diff, self.precision, diff).min(dim=1).values
        return {"digit": digit, "probability": probability, "distance": distance,
                "features": features}

    def classify(self, digits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(digit [N], accepted [N] bool)`` for ``[N, 8, 8]`` digits in [0, 1]."""
        s = self.scores(digits)
        accepted = (s["probability"] >= self.min_probability) & \
                   (s["distance"] <= self.max_distance)
        return s["digit"], accepted

    @staticmethod
    def channels(images: torch.Tensor) -> torch.Tensor:
        """``[N, 3, R, R]`` images in [-1, 1] (R = 32, 16 or 8) -> ``[N * 3, 8, 8]`` digits in
        [0, 1]."""
        if images.ndim != 4 or images.shape[1] != 3 or images.shape[2] != images.shape[3] \
                or images.shape[-1] not in RESOLUTIONS:
            raise SpecregError(f"the digit metrics (modes, digits_fid) need stacked-digit "
                               f"images [N, 3, R, R] with R in {', '.join(map(str, RESOLUTIONS))}, "
                               f"got shape {tuple(images.shape)}")
        return downsample(images.detach().float().cpu()).reshape(-1, 8, 8)

    def classify_images(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per channel (R, G, B): ``(digits [N, 3], accepted [N, 3])``."""
        digit, accepted = self.classify(self.channels(images))
        return digit.reshape(-1, 3), accepted.reshape(-1, 3)

    def image_features(self, images: torch.Tensor) -> np.ndarray:
        """The three channels' features side by side: ``[N, 3 * features]`` float64."""
        feats = self.scores(self.channels(images))["features"]
        return feats.reshape(len(images), -1).double().numpy()

    def image_scores(self, images: torch.Tensor) -> dict[str, np.ndarray]:
        """:meth:`classify_images` and :meth:`image_features` from one pass of the network:
        ``digits [N, 3]``, ``accepted [N, 3]`` and ``features [N, 3 * features]``."""
        s = self.scores(self.channels(images))
        accepted = (s["probability"] >= self.min_probability) & \
                   (s["distance"] <= self.max_distance)
        return {"digits": s["digit"].reshape(-1, 3).numpy(),
                "accepted": accepted.reshape(-1, 3).numpy(),
                "features": s["features"].reshape(len(images), -1).double().numpy()}

    @property
    def features_name(self) -> str:
        """What :meth:`image_scores` depends on, as a name for ``EvaluationContext.features``."""
        return (f"digit-classifier:{self.sha256}:{self.min_probability!r}:"
                f"{self.max_distance!r}")

    def protocol(self) -> dict[str, Any]:
        return {"feature_network_name": "digit-mlp", "feature_network_sha256": self.sha256,
                "classifier_heldout_accuracy": self.info["heldout_accuracy"],
                "classifier_heldout_rejected": self.info["heldout_rejected"],
                "classifier_min_probability": self.min_probability,
                "classifier_max_distance": self.max_distance}


# ---------------------------------------------------------------------------------------------
# Training and calibration
# ---------------------------------------------------------------------------------------------


def _calibrate(probability: np.ndarray, distance: np.ndarray, share: float
               ) -> tuple[float, float, float]:
    """Thresholds at matching tail quantiles ``q`` of both scores, ``q`` chosen so that the
    share of held-out digits failing either is closest to ``share``: (min_p, max_d, rejected)."""
    best = None
    for q in np.linspace(0.0, 4 * share, 401):
        min_p = float(np.quantile(probability, q))
        max_d = float(np.quantile(distance, 1.0 - q))
        rejected = float(np.mean((probability < min_p) | (distance > max_d)))
        if best is None or abs(rejected - share) < abs(best[2] - share) - 1e-12:
            best = (min_p, max_d, rejected)
    return best


def train_digit_classifier(settings: TrainingSettings = TrainingSettings()) -> DigitClassifier:
    """Train, fit the feature-space class model, calibrate the rejection (seconds, CPU)."""
    start = time.perf_counter()
    x_train, y_train = digit_pool("train")
    x_test, y_test = digit_pool("test")
    rng = np.random.default_rng(settings.seed)
    outliers = non_digits(settings.non_digits_per_digit * len(y_train), rng, x_train, y_train)
    inputs = torch.from_numpy(np.concatenate([x_train, outliers]))
    targets = torch.from_numpy(np.concatenate(
        [y_train, np.full(len(outliers), REJECT_CLASS, dtype=np.int64)]))

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(settings.seed)
        net = DigitNet(settings.hidden, settings.features)
    optimizer = torch.optim.Adam(net.parameters(), lr=settings.lr,
                                 weight_decay=settings.weight_decay)
    for _ in range(settings.epochs):  # full batch: a few thousand 8x8 images
        logits, _ = net(inputs)
        loss = F.cross_entropy(logits, targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    net.eval()

    with torch.no_grad():  # class-conditional Gaussians, shared covariance (Lee et al. 2018)
        _, feats = net(torch.from_numpy(x_train))
        feats = feats.double()
        labels = torch.from_numpy(y_train)
        means = torch.stack([feats[labels == c].mean(0) for c in range(NUM_DIGITS)])
        centred = feats - means[labels]
        cov = centred.T @ centred / len(centred)
        cov += settings.ridge * torch.trace(cov) / len(cov) * torch.eye(len(cov),
                                                                         dtype=cov.dtype)
        precision = torch.linalg.inv(cov)

    classifier = DigitClassifier(net, means, precision, 0.0, float("inf"), {})
    s = classifier.scores(torch.from_numpy(x_test))
    accuracy = float((s["digit"].numpy() == y_test).mean())
    min_p, max_d, rejected = _calibrate(s["probability"].numpy(), s["distance"].numpy(),
                                        settings.reject_share)
    classifier.min_probability, classifier.max_distance = min_p, max_d
    _, accepted = classifier.classify(torch.from_numpy(x_test))
    accepted_np = accepted.numpy()
    classifier.info = {
        "version": CLASSIFIER_VERSION,
        "settings": attrs.asdict(settings),
        "heldout_digits": int(len(y_test)),
        "heldout_accuracy": accuracy,
        "heldout_rejected": rejected,
        "heldout_accuracy_accepted": float((s["digit"].numpy() == y_test)[accepted_np].mean()),
        "min_probability": min_p,
        "max_distance": max_d,
        "train_seconds": round(time.perf_counter() - start, 2),
        "torch": torch.__version__,
    }
    if accuracy < 0.95:
        raise RuntimeError(f"the digit classifier reached only {accuracy:.1%} held-out accuracy "
                           f"(needs >= 95%): a bug in its training")
    return classifier


# ---------------------------------------------------------------------------------------------
# Cache
# ---------------------------------------------------------------------------------------------


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _serialize(classifier: DigitClassifier) -> bytes:
    """The classifier's tensors as safetensors bytes (what is cached and hashed)."""
    tensors = {f"net.{k}": v.detach().contiguous() for k, v in classifier.net.state_dict().items()}
    tensors["class_means"] = classifier.class_means.contiguous()
    tensors["precision"] = classifier.precision.contiguous()
    return save(tensors)


def _save(data: bytes, info: dict[str, Any], folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    weights, meta = folder / "classifier.safetensors", folder / "classifier.json"
    tmp = folder / f".classifier.{os.getpid()}.safetensors.tmp"
    tmp.write_bytes(data)
    os.replace(tmp, weights)
    tmp_meta = folder / f".classifier.{os.getpid()}.json.tmp"
    tmp_meta.write_text(json.dumps(info, indent=1))
    os.replace(tmp_meta, meta)  # written last, with the weights' hash: never describes a torn file


def _load(folder: Path, settings: TrainingSettings) -> DigitClassifier | None:
    weights, meta = folder / "classifier.safetensors", folder / "classifier.json"
    try:
        info = json.loads(meta.read_text())
        if info.get("version") != CLASSIFIER_VERSION or \
                info.get("settings") != attrs.asdict(settings):
            return None
        sha = _sha256(weights)
        if sha != info.get("weights_sha256"):
            return None
        tensors = load_file(str(weights))
    except (OSError, ValueError, KeyError):
        return None
    net = DigitNet(settings.hidden, settings.features)
    net.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("net.")})
    return DigitClassifier(net, tensors["class_means"], tensors["precision"],
                           info["min_probability"], info["max_distance"], info, sha)


_LOADED: dict[str, DigitClassifier] = {}


def describe(classifier: DigitClassifier) -> str:
    info = classifier.info
    return (f"digit classifier: held-out accuracy {info['heldout_accuracy']:.2%} on "
            f"{info['heldout_digits']} digits; rejects {info['heldout_rejected']:.2%} of them "
            f"(accepted when p >= {classifier.min_probability:.4g} and Mahalanobis d^2 <= "
            f"{classifier.max_distance:.4g})")


def load_digit_classifier(data_root: Path, settings: TrainingSettings = TrainingSettings(),
                          verbose: bool = True) -> DigitClassifier:
    """The cached classifier under ``data_root`` (trained and cached on first use)."""
    folder = Path(data_root) / CACHE_DIR
    key = str(folder.resolve())
    if key in _LOADED and _LOADED[key].info.get("settings") == attrs.asdict(settings):
        return _LOADED[key]
    classifier = _load(folder, settings)
    if classifier is None:
        classifier = train_digit_classifier(settings)
        data = _serialize(classifier)
        classifier.sha256 = hashlib.sha256(data).hexdigest()
        classifier.info["weights_sha256"] = classifier.sha256
        try:
            _save(data, classifier.info, folder)
            where = f"cached in {folder}"
        except OSError as exc:  # read-only data root: use it without caching
            where = f"not cached ({exc})"
        if verbose:
            print(f"trained the {describe(classifier)}; "
                  f"{classifier.info['train_seconds']} s, {where}", flush=True)
    elif verbose:
        print(describe(classifier), flush=True)
    _LOADED[key] = classifier
    return classifier
