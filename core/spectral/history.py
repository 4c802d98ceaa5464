"""A run's spectral history as the plots need it: spectra, summaries, quality metrics, alarms.

Reads ``RUN/spectra.npy`` and ``RUN/metrics.jsonl`` without any training code, also while the run
is being written (an incomplete last log line is skipped)::

    h = RunHistory.load("runs/quickstart-20261124-101500")
    h.iterations                     # [n] recorded iterations
    h.normalized("layer_9")          # [n, r] s_j / s1 per record (the paper's curves)
    h.summary("layer_9", "mass")     # [n] spectral mass over training
    h.quality                        # {"modes.modes": (iterations, values), ...} from "eval" events
    h.alarms                         # [{"iteration": 1500, "layers": [...], "action": ...}, ...]
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import attrs
import numpy as np

from core.errors import SpecregError
from core.records import read_records
from core.spectral.summary import LayerInfo, summarize
from core.spectral.store import FILENAME, layers_of, read_spectra

__all__ = ["RunHistory", "read_metrics", "quality_series"]


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    """The records of ``RUN/metrics.jsonl``; a line that does not parse (one being written) is
    skipped."""
    return read_records(Path(run_dir) / "metrics.jsonl")


def quality_series(records: list[dict[str, Any]]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Every numeric key of the ``eval`` events: ``{key: (iterations, values)}``."""
    series: dict[str, list[tuple[int, float]]] = {}
    for r in records:
        if r.get("event") != "eval":
            continue
        for key, value in r.items():
            if key in ("event", "iteration", "time") or isinstance(value, bool) \
                    or not isinstance(value, (int, float)) or not math.isfinite(value):
                continue
            series.setdefault(key, []).append((int(r["iteration"]), float(value)))
    return {key: (np.array([i for i, _ in points]), np.array([x for _, x in points]))
            for key, points in series.items()}


@attrs.define
class RunHistory:
    run_dir: Path
    spectra: np.ndarray  # the structured records of spectra.npy
    layers: list[LayerInfo]
    quality: dict[str, tuple[np.ndarray, np.ndarray]]
    alarms: list[dict[str, Any]]

    @classmethod
    def load(cls, run_dir: str | Path) -> "RunHistory":
        run_dir = Path(run_dir)
        path = run_dir / FILENAME
        if not run_dir.is_dir():
            raise SpecregError(f"{run_dir}: no such run folder")
        if not path.is_file():
            raise SpecregError(f"{run_dir}: no {FILENAME} (spectral records); was the run trained "
                               f"with the spectral monitor on ([callbacks.spectral] every > 0)?")
        spectra = read_spectra(path)
        records = read_metrics(run_dir)
        alarms = [r for r in records if r.get("event") == "alarm"]
        return cls(run_dir, spectra, layers_of(spectra.dtype), quality_series(records), alarms)

    @property
    def name(self) -> str:
        return self.run_dir.resolve().name

    @property
    def iterations(self) -> np.ndarray:
        return self.spectra["iteration"]

    def layer(self, key: str) -> LayerInfo:
        for info in self.layers:
            if info.key == key:
                return info
        raise SpecregError(f"{self.run_dir}: no layer '{key}'; recorded layers: "
                           f"{', '.join(i.key for i in self.layers)}")

    def singular_values(self, key: str) -> np.ndarray:
        """``[n, r]`` singular values of the layer's effective weight, one row per record."""
        return np.asarray(self.spectra[key], dtype=np.float64).reshape(len(self.spectra), -1)

    def normalized(self, key: str) -> np.ndarray:
        """``[n, r]`` ``s_j / s1`` (NaN rows where s1 is not positive)."""
        s = self.singular_values(key)
        s1 = s[:, :1]
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(s1 > 0, s / np.where(s1 > 0, s1, 1.0), np.nan)

    def summary(self, key: str, name: str) -> np.ndarray:
        """``[n]`` one summary of :func:`core.spectral.measure.summarize` over the records."""
        s = self.singular_values(key)
        sigma = np.asarray(self.spectra[f"{key}.sigma_pi"], dtype=np.float64)
        raw = np.asarray(self.spectra[f"{key}.s1_raw"], dtype=np.float64)
        return np.array([summarize(row, float(p), float(q))[name]
                         for row, p, q in zip(s, sigma, raw)])

    def index_at(self, iteration: int | None) -> int:
        """The record at ``iteration`` (None: the last one)."""
        if len(self.spectra) == 0:
            raise SpecregError(f"{self.run_dir}: {FILENAME} holds no records yet")
        if iteration is None:
            return len(self.spectra) - 1
        hits = np.flatnonzero(self.iterations == iteration)
        if not len(hits):
            shown = ", ".join(map(str, self.iterations[:12]))
            shown += ", ..." if len(self.spectra) > 12 else ""
            raise SpecregError(f"{self.run_dir}: no record at iteration {iteration}; recorded: "
                               f"{shown}")
        return int(hits[-1])

    def switches(self) -> list[tuple[int, str]]:
        """(iteration, new regularizer) of every switch the alarm made."""
        return [(int(a["iteration"]), a["switched"]["to"]) for a in self.alarms
                if isinstance(a.get("switched"), dict)]
