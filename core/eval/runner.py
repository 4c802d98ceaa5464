"""Runs metric plugins on a generator and formats their scores, each with its protocol.

    from core.eval.runner import evaluate, format_table
    from core.registry import get_registry

    metrics = [get_registry().create("metrics", "fid"), get_registry().create("metrics", "is")]
    records = evaluate(metrics, context)      # context: core.interfaces.EvaluationContext
    print(format_table(records))

A *record* is a JSON-ready dict, one per metric::

    {"metric": "fid", "iteration": 5000, "values": {"fid": 23.1},
     "primary": "fid", "higher_is_better": False, "comparable_with": ["SR Table II"],
     "protocol": {"metric": "fid", "samples": 5000, "reference": {...},
                  "resize_mode": "legacy_tensorflow", "comparable_with": ["SR Table II"],
                  "not_comparable_with": {"BSSN Table 1": "samples 5000 (paper: 10000); ..."},
                  "feature_network_sha256": "...", "seed": 0, "iteration": 5000,
                  "libraries": {"torch": "...", "clean-fid": "...", ...}, ...}}

The protocol merges what every metric shares (metric, seed, iteration, dataset, library versions)
with what the metric itself reports (samples, reference data, resolution, resize mode, feature
network and its file hash). ``comparable_with`` lists the published tables whose protocol the
score was computed with, as the metric derived it from its own settings (its protocol's
``comparable_with``, with ``not_comparable_with`` saying why not for the others; ``fid`` and
``is`` know the SR and BSSN papers' protocols); empty for a score no published table matches.
One evaluation generates its samples once: :func:`evaluate` gives the context a
:class:`SampleCache`, through which ``context.generate``/``generate_with_labels`` return the same
batches to every metric (generated on first use) and ``context.features(name, fn, n)`` computes a
network's per-sample features once (the digit classifier's for ``modes`` and ``digits_fid``, the
Inception's for ``fid`` and ``is``). Batches are keyed by their position in the seeded stream,
so a metric asking for fewer samples reuses the first batches of a larger set. The scores are
those of metrics generating on their own (each batch comes from the same random state).
Images are kept as float32 (the metrics see exactly what the generator made) up to
:data:`IMAGE_CACHE_BYTES`; beyond that only the features are kept, so ``fid`` + ``is`` at 50k
samples hold their 2048-d features, not 50k images, and a metric needing the images themselves
past the budget regenerates them (deterministically).

Metrics also get two helpers from here: :func:`progress` (the tqdm bars for generation and
feature extraction) and :func:`shared_cache` (a dict that lives for one :func:`evaluate` call,
for anything else metrics share).
"""

from __future__ import annotations

import contextlib
import contextvars
import importlib.metadata as metadata
import math
import sys
import time
from pathlib import Path
from typing import Any, Iterator, Sequence

import attrs
import torch
from tqdm.auto import tqdm

from core.interfaces import EvaluationContext, Metric

__all__ = ["evaluate", "format_table", "progress", "shared_cache", "library_versions",
           "metric_name", "plain", "require_samples", "SampleCache", "IMAGE_CACHE_BYTES"]

#: distributions whose versions every protocol records.
LIBRARIES = ("specreg", "torch", "numpy", "scipy", "clean-fid", "scikit-learn", "pillow",
             "safetensors")

#: generated images (float32) one evaluation keeps for its metrics; past it, only features.
IMAGE_CACHE_BYTES = 512 * 2**20

_SHARED: contextvars.ContextVar[dict | None] = contextvars.ContextVar("specreg_eval_cache",
                                                                      default=None)


def library_versions() -> dict[str, str]:
    """Installed versions of the libraries a score depends on (``"missing"`` if not installed)."""
    versions = {}
    for dist in LIBRARIES:
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            versions[dist] = "missing"
    return versions


def require_samples(name: str, num_samples: int, minimum: int, why: str = "") -> None:
    """Refuse a metric Config whose ``num_samples`` is below what the score needs."""
    if num_samples < minimum:
        from core.errors import SpecregError

        reason = f" ({why})" if why else ""
        raise SpecregError(f"{name} needs num_samples >= {minimum}{reason}, got {num_samples}")


def shared_cache() -> dict:
    """A dict shared by the metrics of the current :func:`evaluate` call (a fresh, throw-away
    dict outside one). Keys must include everything the cached value depends on."""
    cache = _SHARED.get()
    return cache if cache is not None else {}


@contextlib.contextmanager
def _evaluation_scope(context: EvaluationContext) -> Iterator[dict]:
    """One evaluation: a fresh :func:`shared_cache` and a fresh :class:`SampleCache` on
    ``context`` (its previous one restored after)."""
    cache: dict = {}
    token = _SHARED.set(cache)
    previous, context.sample_cache = context.sample_cache, SampleCache()
    try:
        yield cache
    finally:
        context.sample_cache = previous
        _SHARED.reset(token)
        cache.clear()


@attrs.define
class _Batch:
    """One cached batch of the seeded stream: its labels, images (None past the image budget)
    and features by name."""

    labels: torch.Tensor | None
    images: torch.Tensor | None = None
    features: dict[str, Any] = attrs.field(factory=dict)


class SampleCache:
    """The generated samples and their features that the metrics of one evaluation share.

    Batch ``(start, size)`` of a context is drawn from the random state the seeded stream has
    after ``start // batch_size`` full batches (states are kept per full batch), so it is the
    batch ``context.generate`` alone would yield there, and the cache serves any number of
    samples: ``generate(n)`` after ``generate(m > n)`` reuses the first batches. A context whose
    generator, architecture, seed, batch size, device or iteration differ starts it afresh.
    """

    def __init__(self, image_bytes: int = IMAGE_CACHE_BYTES) -> None:
        self.image_bytes = image_bytes
        self.kept_bytes = 0
        self._owner: tuple | None = None
        self._batches: dict[tuple[int, int], _Batch] = {}
        self._states: dict[int, torch.Tensor] = {}

    def _positions(self, context: EvaluationContext, num_samples: int) -> list[tuple[int, int]]:
        """``(start, size)`` of the batches of ``num_samples`` (the cache emptied first if it
        belongs to another context)."""
        owner = (id(context.generator), id(context.architecture), context.seed,
                 context.batch_size, str(context.device), context.iteration)
        if owner != self._owner:
            self._owner, self.kept_bytes = owner, 0
            self._batches.clear()
            self._states = {0: torch.Generator().manual_seed(context.seed).get_state()}
        starts = range(0, num_samples, context.batch_size)
        return list(zip(starts, context.batch_sizes(num_samples)))

    def _batch(self, context: EvaluationContext, start: int,
               size: int) -> tuple[_Batch, torch.Tensor]:
        """The batch at ``start`` and a copy of its images for the caller (drawn if the cache
        holds no images for it)."""
        entry = self._batches.get((start, size))
        if entry is not None and entry.images is not None:
            return entry, entry.images.clone()
        rng = torch.Generator()
        rng.set_state(self._states[start])
        images, labels = context.draw(rng, size)
        if size == context.batch_size:
            self._states.setdefault(start + size, rng.get_state())
        if entry is None:
            entry = self._batches[(start, size)] = _Batch(labels)
        if self.kept_bytes + images.nbytes <= self.image_bytes:
            entry.images = images
            self.kept_bytes += images.nbytes
            return entry, images.clone()
        return entry, images

    def samples(self, context: EvaluationContext, num_samples: int
                ) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
        """``context.generate_with_labels(num_samples)``, from the cache."""
        for start, size in self._positions(context, num_samples):
            entry, images = self._batch(context, start, size)
            yield images, entry.labels

    def features(self, context: EvaluationContext, name: str, fn: Any,
                 num_samples: int) -> Iterator[Any]:
        """``context.features(name, fn, num_samples)``: ``fn`` of each batch, once per name."""
        for start, size in self._positions(context, num_samples):
            entry = self._batches.get((start, size))
            if entry is None or name not in entry.features:
                entry, images = self._batch(context, start, size)
                entry.features[name] = fn(images)
            yield entry.features[name]


def progress(total: int, desc: str, enabled: bool = True, unit: str = "img") -> tqdm:
    """A tqdm bar on stderr (update it with the number of images done); silent when disabled."""
    return tqdm(total=total, desc=desc, unit=unit, disable=not enabled, leave=False,
                file=sys.stderr, dynamic_ncols=True)


def metric_name(metric: Metric) -> str:
    """The name the metric was created under (:attr:`core.interfaces.Plugin.name`)."""
    return metric.name


def plain(value: Any) -> Any:
    """``value`` as JSON-ready Python (numpy scalars/arrays, paths and attrs classes converted)."""
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if attrs.has(type(value)):
        return plain(attrs.asdict(value))
    if hasattr(value, "tolist"):  # numpy and torch scalars/arrays
        return plain(value.tolist())
    if isinstance(value, (bool, int, float, str)) or value is None:
        return value
    return str(value)


def _common_protocol(metric: Metric, context: EvaluationContext) -> dict[str, Any]:
    dataset = context.dataset
    return {
        "metric": metric_name(metric),
        "metric_config": plain(metric.config),
        "seed": context.seed,
        "iteration": context.iteration,
        "dataset": dataset.name,
        "dataset_config": plain(dataset.config),
        "device": str(context.device),
        "libraries": library_versions(),
    }


def evaluate(metrics: Sequence[Metric], context: EvaluationContext) -> list[dict[str, Any]]:
    """Compute every metric on ``context`` in order; one record (see module docstring) each.

    Generated samples are deterministic in ``context.seed``; the metrics share one generation
    and the features they compute with the same network (a :class:`SampleCache` on the context
    for the duration of the call), with the scores they have alone.
    """
    records = []
    with _evaluation_scope(context):
        for metric in metrics:
            name = metric_name(metric)
            if context.show_progress:
                tqdm.write(f"evaluating {name} at iteration {context.iteration}", file=sys.stderr)
            start = time.perf_counter()
            result = metric.compute(context)
            seconds = time.perf_counter() - start
            protocol = {**_common_protocol(metric, context), **plain(result.protocol),
                        "seconds": round(seconds, 3)}
            records.append({
                "metric": name,
                "iteration": context.iteration,
                "values": {k: float(v) for k, v in result.values.items()},
                "primary": metric.primary,
                "higher_is_better": metric.higher_is_better,
                "comparable_with": [str(t) for t in protocol.get("comparable_with", [])],
                "protocol": protocol,
            })
            if context.show_progress:
                scores = ", ".join(f"{k} {_number(v)}" for k, v in records[-1]["values"].items())
                tqdm.write(f"  {name}: {scores} ({seconds:.1f} s)", file=sys.stderr)
    return records


def _number(value: float) -> str:
    if isinstance(value, float) and math.isnan(value):
        return "nan"
    return f"{value:.6g}"


def _reference(protocol: dict[str, Any]) -> str:
    ref = protocol.get("reference")
    if not isinstance(ref, dict):
        return "-"
    where = ref.get("name") or ref.get("dataset") or "?"
    text = f"{where}:{ref.get('split', '?')}"
    if ref.get("samples"):
        text += f" ({ref['samples']})"
    return text


def _comparable(record: dict[str, Any]) -> str:
    tables = record.get("comparable_with")
    if tables is None:  # a record written before the field existed
        tables = record.get("protocol", {}).get("comparable_with", [])
    return ", ".join(tables) if tables else "-"


def format_table(records: Sequence[dict[str, Any]]) -> str:
    """A plain-text table, one row per score: iteration, metric, key, value, samples, reference,
    feature network (with the start of its file hash) and the published tables it is comparable
    with ("-": none)."""
    header = ("iteration", "metric", "score", "value", "samples", "reference", "network",
              "comparable with")
    rows = [header]
    for record in records:
        protocol = record.get("protocol", {})
        network = protocol.get("feature_network_name", "-")
        sha = protocol.get("feature_network_sha256")
        if sha:
            network += f" {sha[:12]}"
        for key, value in record["values"].items():
            marker = "*" if key == record.get("primary") else ""
            rows.append((str(record.get("iteration", "-")), record["metric"], key + marker,
                         _number(value), str(protocol.get("samples", "-")), _reference(protocol),
                         network, _comparable(record)))
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    right = {0, 3, 4}  # numeric columns
    lines = []
    for n, row in enumerate(rows):
        cells = [cell.rjust(w) if i in right else cell.ljust(w)
                 for i, (cell, w) in enumerate(zip(row, widths))]
        lines.append("  ".join(cells).rstrip())
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    lines.append("(* = the score 'best checkpoint' selection uses; comparable with = published "
                 "tables whose evaluation protocol the score followed)")
    return "\n".join(lines)
