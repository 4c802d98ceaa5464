"""Reference statistics (feature mean and covariance of real data) for the FID-style metrics.

Two sources:

- :func:`dataset_statistics`: from our own dataset plugin, computed once per (dataset and its
  config, split, resolution, feature path, network file hash, number of samples) and cached under
  ``<data_root>/.cache/reference_stats/`` as ``NAME.npz`` (``mu``, ``sigma``, float64) beside
  ``NAME.json`` (its protocol). Files are written to a temporary name and renamed, so a crash
  never leaves a half-written cache entry, and loaded with ``allow_pickle=False``.
- :func:`published_statistics`: clean-fid's published statistics, by name (``"cifar10"``...),
  through clean-fid's ``get_reference_statistics``; offline, a DataMissingError says which file
  from which URL goes where.

    stats = dataset_statistics(context, split="train", kind="inception-clean",
                               network_sha256=extractor.sha256, features=extractor.features)
    stats.mu, stats.sigma, stats.protocol
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Callable

import attrs
import numpy as np
import torch

from core.errors import DataMissingError
from core.eval.runner import library_versions, plain, progress
from core.interfaces import EvaluationContext

__all__ = ["Statistics", "feature_statistics", "dataset_statistics", "published_statistics",
           "real_images"]

#: bump when the way statistics are computed changes: old cache entries are then ignored.
_CACHE_VERSION = 1


@attrs.define
class Statistics:
    """Mean and covariance of a set of features, with where they came from."""

    mu: np.ndarray
    sigma: np.ndarray
    protocol: dict[str, Any]


def feature_statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(mean, covariance)`` in float64 over rows, as clean-fid computes them (``np.cov``,
    unbiased)."""
    features = np.asarray(features, dtype=np.float64)
    return np.mean(features, axis=0), np.cov(features, rowvar=False)


def real_images(context: EvaluationContext, split: str, num_samples: int = 0,
                ) -> tuple[torch.utils.data.Dataset, int]:
    """The dataset plugin's ``split`` (all of it, or ``num_samples`` items picked by a fixed
    permutation) and its size."""
    data = context.dataset.build(Path(context.data_root), split)
    if num_samples and num_samples < len(data):
        order = np.random.default_rng(0).permutation(len(data))[:num_samples]
        data = torch.utils.data.Subset(data, sorted(order.tolist()))
    return data, len(data)


def _batches(data: torch.utils.data.Dataset, batch_size: int):
    loader = torch.utils.data.DataLoader(data, batch_size=batch_size, shuffle=False,
                                         num_workers=0)
    for batch in loader:
        yield batch[0] if isinstance(batch, (list, tuple)) else batch


def dataset_statistics(context: EvaluationContext, *, split: str, kind: str,
                       network_sha256: str, features: Callable[[torch.Tensor], np.ndarray],
                       num_samples: int = 0, extra: dict[str, Any] | None = None) -> Statistics:
    """Statistics of ``features(images)`` over the dataset plugin's ``split``, cached.

    ``kind`` names the feature path (e.g. ``"inception-clean"``); together with the network's
    file hash, the dataset's name and config, the split, the resolution and ``num_samples`` it
    makes the cache key. ``extra`` is added to the protocol.
    """
    dataset = context.dataset
    name = dataset.name
    key = {"version": _CACHE_VERSION, "dataset": name, "dataset_config": plain(dataset.config),
           "split": split, "resolution": dataset.resolution, "kind": kind,
           "network_sha256": network_sha256, "num_samples": int(num_samples)}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    folder = Path(context.data_root) / ".cache" / "reference_stats"
    stem = f"{name}_{split}_{dataset.resolution}_{kind}_{digest}"
    npz, meta = folder / f"{stem}.npz", folder / f"{stem}.json"

    if npz.is_file() and meta.is_file():
        try:
            protocol = json.loads(meta.read_text())
            with np.load(npz, allow_pickle=False) as stored:
                mu, sigma = stored["mu"], stored["sigma"]
            if protocol.get("key") == key:
                protocol.setdefault("whole_split",  # entries written before the field existed
                                    not num_samples or protocol["samples"] < num_samples)
                protocol["cache_file"] = str(npz)
                protocol["cached"] = True
                return Statistics(mu, sigma, protocol)
        except (OSError, ValueError, KeyError):
            pass  # unreadable entry: recompute and overwrite

    data, n = real_images(context, split, num_samples)
    bar = progress(n, f"reference {name}:{split} features ({kind})", context.show_progress)
    chunks = []
    for images in _batches(data, context.batch_size):
        chunks.append(features(images))
        bar.update(len(images))
    bar.close()
    mu, sigma = feature_statistics(np.concatenate(chunks))
    protocol = {"source": "dataset plugin", "dataset": name, "split": split, "samples": n,
                "whole_split": not isinstance(data, torch.utils.data.Subset),
                "resolution": dataset.resolution, "kind": kind, "key": key,
                "libraries": library_versions(), **(extra or {})}
    if callable(getattr(dataset, "protocol", None)):  # the dataset's own account of its files
        protocol["dataset_protocol"] = plain(dataset.protocol(split))
    try:
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / f".{stem}.{os.getpid()}.tmp.npz"
        np.savez(tmp, mu=mu, sigma=sigma)
        os.replace(tmp, npz)
        tmp_meta = folder / f".{stem}.{os.getpid()}.tmp.json"
        tmp_meta.write_text(json.dumps(protocol, indent=1, sort_keys=True))
        os.replace(tmp_meta, meta)
        protocol["cache_file"] = str(npz)
    except OSError as exc:  # read-only data root: the statistics are still right, just not kept
        print(f"warning: could not cache reference statistics under {folder}: {exc}")
    protocol["cached"] = False
    return Statistics(mu, sigma, protocol)


def published_statistics(name: str, split: str, resolution: int, mode: str) -> Statistics:
    """clean-fid's published FID statistics for dataset ``name`` (downloaded by clean-fid into
    its package folder on first use)."""
    import cleanfid  # here: loading this module (registering ``fid``) stays cheap
    from cleanfid.features import get_reference_statistics

    rel = f"{name}_{mode}_{split}_{resolution}.npz".lower()  # clean-fid's naming
    folder = Path(cleanfid.__file__).parent / "stats"
    target = folder / rel
    url = f"https://www.cs.cmu.edu/~clean-fid/stats/{rel}"
    existed = target.exists()
    try:
        mu, sigma = get_reference_statistics(name, resolution, mode=mode, split=split)
    except Exception as exc:
        if not existed:  # clean-fid writes straight to the target: drop a partial download
            target.unlink(missing_ok=True)
        raise DataMissingError(
            f"clean-fid's published statistics '{rel}' (reference_stats = {name!r}, split "
            f"{split!r}, resolution {resolution}, mode {mode!r}) are not available: "
            f"{type(exc).__name__}: {exc}\n"
            f"Download {url}\nand put it at {target}\n"
            f"or leave `reference_stats` empty to compute statistics from the dataset plugin."
        ) from exc
    protocol = {"source": "clean-fid published", "name": name, "split": split,
                "whole_split": True, "resolution": resolution, "url": url,
                "cache_file": str(target)}
    return Statistics(np.asarray(mu, np.float64), np.asarray(sigma, np.float64), protocol)
