"""Runs metric plugins on a generator and formats their scores, each with its protocol.

    from core.eval.runner import evaluate, format_table
    from core.registry import get_registry

    metrics = [get_registry().create("metrics", "fid"), get_registry().create("metrics", "is")]
    records = evaluate(metrics, context)      # context: core.interfaces.EvaluationContext
    print(format_table(records))

A *record* is a JSON-ready dict, one per metric::

    {"metric": "fid", "iteration": 5000, "values": {"fid": 23.1},
     "primary": "fid", "higher_is_better": False,
     "protocol": {"metric": "fid", "samples": 50000, "reference": {...}, "resize_mode": "clean",
                  "feature_network_sha256": "...", "seed": 0, "iteration": 5000,
                  "libraries": {"torch": "...", "clean-fid": "...", ...}, ...}}

The protocol merges what every metric shares (metric, seed, iteration, dataset, library versions)
with what the metric itself reports (samples, reference data, resolution, resize mode, feature
network and its file hash). Metrics also get two helpers from here: :func:`progress` (the tqdm
bars for generation and feature extraction) and :func:`shared_cache` (a dict that lives for one
:func:`evaluate` call, so that FID and IS on the same samples generate and embed them once).
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
from tqdm.auto import tqdm

from core.interfaces import EvaluationContext, Metric

__all__ = ["evaluate", "format_table", "progress", "shared_cache", "library_versions",
           "metric_name", "plain", "require_samples"]

#: distributions whose versions every protocol records.
LIBRARIES = ("specreg", "torch", "numpy", "scipy", "clean-fid", "scikit-learn", "pillow",
             "safetensors")

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
def _evaluation_scope() -> Iterator[dict]:
    cache: dict = {}
    token = _SHARED.set(cache)
    try:
        yield cache
    finally:
        _SHARED.reset(token)
        cache.clear()


def progress(total: int, desc: str, enabled: bool = True, unit: str = "img") -> tqdm:
    """A tqdm bar on stderr (update it with the number of images done); silent when disabled."""
    return tqdm(total=total, desc=desc, unit=unit, disable=not enabled, leave=False,
                file=sys.stderr, dynamic_ncols=True)


def metric_name(metric: Metric) -> str:
    """The name a metric was registered under (its class name, lower-cased, if unregistered)."""
    return type(metric).name or type(metric).__name__.lower()


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
        "dataset": type(dataset).name or type(dataset).__name__,
        "dataset_config": plain(dataset.config),
        "device": str(context.device),
        "libraries": library_versions(),
    }


def evaluate(metrics: Sequence[Metric], context: EvaluationContext) -> list[dict[str, Any]]:
    """Compute every metric on ``context`` in order; one record (see module docstring) each.

    Generated samples are deterministic in ``context.seed``; metrics that embed the same samples
    with the same network share the work through :func:`shared_cache`.
    """
    records = []
    with _evaluation_scope():
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


def format_table(records: Sequence[dict[str, Any]]) -> str:
    """A plain-text table, one row per score: iteration, metric, key, value, samples, reference
    and feature network (with the start of its file hash)."""
    header = ("iteration", "metric", "score", "value", "samples", "reference", "network")
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
                         network))
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    right = {0, 3, 4}  # numeric columns
    lines = []
    for n, row in enumerate(rows):
        cells = [cell.rjust(w) if i in right else cell.ljust(w)
                 for i, (cell, w) in enumerate(zip(row, widths))]
        lines.append("  ".join(cells).rstrip())
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    lines.append("(* = the score 'best checkpoint' selection uses)")
    return "\n".join(lines)
