"""The study's plots: each compared metric over iterations per arm (mean over seeds, band: min to
max), and the discriminator's spectral mass over iterations per arm, the spectral alarms marked
(x) on the curves of the runs that raised them."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np

from core.study.results import RunResults
from core.study.spec import LoadedStudy

__all__ = ["draw_plots"]


def _band(series: list[dict[int, float]]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Iterations every run has, and the mean, min and max over runs there."""
    common = sorted(set.intersection(*(set(s) for s in series))) if series else []
    if not common:
        return (np.array([]),) * 4
    values = np.array([[s[i] for i in common] for s in series], dtype=np.float64)
    with warnings.catch_warnings():  # an iteration no run has a finite value at stays NaN
        warnings.simplefilter("ignore", RuntimeWarning)
        return (np.array(common), np.nanmean(values, 0), np.nanmin(values, 0),
                np.nanmax(values, 0))


def _draw(ax, loaded: LoadedStudy, results: list[RunResults], series_of, alarms: bool) -> None:
    colors = {arm: f"C{i}" for i, arm in enumerate(loaded.study.arms)}
    styles = {arm: ("-", "--", ":", "-.")[i % 4] for i, arm in enumerate(loaded.study.arms)}
    for arm in loaded.study.arms:  # line styles differ: arms that trained alike stay visible
        runs = [r for r in results if r.run.arm == arm and series_of(r)]
        x, mean, low, high = _band([series_of(r) for r in runs])
        if len(x):
            ax.plot(x, mean, color=colors[arm], linestyle=styles[arm],
                    label=f"{arm} (n={len(runs)})")
            ax.fill_between(x, low, high, color=colors[arm], alpha=0.2, linewidth=0)
        if alarms:
            for r in runs:
                s = series_of(r)
                marks = [(a, s[max((i for i in s if i <= a), default=min(s))]) for a in r.alarms]
                if marks:
                    ax.plot(*zip(*marks), "x", color=colors[arm], markersize=8, mew=2)
    ax.grid(alpha=0.3)
    ax.set_xlabel("iteration")
    if ax.get_legend_handles_labels()[0]:  # nothing recorded yet: no legend
        ax.legend(fontsize=8)


def draw_plots(loaded: LoadedStudy, results: list[RunResults], out: Path) -> list[Path]:
    """Write the PNGs into ``out``; their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for metric in loaded.study.compare.metrics:
        fig, ax = plt.subplots(figsize=(6, 3.6), dpi=110)
        _draw(ax, loaded, results, lambda r, m=metric: r.evaluations.get(m, {}), alarms=True)
        ax.set_ylabel(metric)
        ax.set_title(f"{metric} (x: spectral alarm)", fontsize=10)
        path = out / f"{metric.replace('.', '_')}.png"
        fig.tight_layout()
        fig.savefig(path)
        plt.close(fig)
        paths.append(path)
    if any(r.spectral_mass for r in results):
        fig, ax = plt.subplots(figsize=(6, 3.6), dpi=110)
        _draw(ax, loaded, results, lambda r: r.spectral_mass, alarms=True)
        ax.set_ylabel("spectral mass (mean over D layers)")
        ax.set_title("spectral mass mean_j s_j / s_1 (x: alarm)", fontsize=10)
        path = out / "spectral_mass.png"
        fig.tight_layout()
        fig.savefig(path)
        plt.close(fig)
        paths.append(path)
    return paths
