"""What a study's runs recorded, read back from their run folders: the evaluations
(``evaluations.jsonl``), the spectral mass (``spectral`` events of ``metrics.jsonl``) and the
collapse alarms and regularizer switches (``alarm`` events)."""

from __future__ import annotations

import math
from typing import Any

import attrs

from core.records import read_records
from core.study.runs import StudyRun

__all__ = ["RunResults", "read_results"]


@attrs.define
class RunResults:
    """One run's records, keyed for the report."""

    run: StudyRun
    #: ``"metric.value"`` -> {iteration: value}
    evaluations: dict[str, dict[int, float]] = attrs.field(factory=dict)
    #: iteration -> mean spectral mass over the recorded discriminator layers
    spectral_mass: dict[int, float] = attrs.field(factory=dict)
    #: iterations at which the collapse alarm fired
    alarms: list[int] = attrs.field(factory=list)
    #: iteration of a ``switch`` to another regularizer, if any
    switched_at: int | None = None

    def series(self, key: str) -> list[tuple[int, float]]:
        return sorted(self.evaluations.get(key, {}).items())

    def value_at(self, key: str, iteration: int | None) -> float | None:
        """The value at ``iteration`` (None: the last evaluation); None when not evaluated."""
        series = self.series(key)
        if not series:
            return None
        if iteration is None:
            return series[-1][1]
        return self.evaluations[key].get(iteration)


def _finite(value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def read_results(run: StudyRun) -> RunResults:
    """The records of one run's folder (empty when it has not started)."""
    results = RunResults(run)
    for record in read_records(run.folder / "evaluations.jsonl"):
        metric, iteration = record.get("metric"), record.get("iteration")
        if not isinstance(iteration, int):
            continue
        for name, value in (record.get("values") or {}).items():
            results.evaluations.setdefault(f"{metric}.{name}", {})[iteration] = _finite(value)
    for record in read_records(run.folder / "metrics.jsonl"):
        iteration = record.get("iteration")
        if record.get("event") == "spectral" and isinstance(iteration, int):
            masses = [_finite(v) for k, v in record.items() if k.endswith(".mass")]
            masses = [m for m in masses if math.isfinite(m)]
            if masses:
                results.spectral_mass[iteration] = sum(masses) / len(masses)
        elif record.get("event") == "alarm" and isinstance(iteration, int):
            if iteration not in results.alarms:
                results.alarms.append(iteration)
            if record.get("switched") and results.switched_at is None:
                results.switched_at = iteration
    results.alarms.sort()
    return results
