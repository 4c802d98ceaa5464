"""Plot a run's spectral distributions, as in the SR paper (Liu et al. 2019), from its run folder.

    python -m core.plot RUN_DIR                       # -> RUN_DIR/plots/*.png
    python -m core.plot RUN_DIR --out figs --iteration 5000 --curves 8 --log
    python -m core.plot RUN_A RUN_B RUN_C             # compare runs -> RUN_A/plots/compare_*.png

Works on any run folder with a ``spectra.npy`` (the spectral monitor, :mod:`core.spectral`),
also while the run is still writing it. One run gives

- ``spectra_layer_<k>.png``: the layer's spectral distribution (``s_j / s1`` against ``j``), one
  curve per recorded iteration (at most ``--curves``, evenly spaced) -- Figures 2-3;
- ``layers_at_<iteration>.png``: every layer at one iteration (``--iteration``, default the last
  record), the first record in grey for reference -- Appendix, Figures 14-22;
- ``mass_and_quality.png``: each layer's spectral mass over training above the run's quality
  metrics (every numeric key of the ``eval`` events of ``metrics.jsonl``), alarms and a
  regularizer switch marked -- Figure 5;
- ``summaries.png``: s1, stable rank, share of ``s_j / s1 > 0.1`` and the power-iteration sigma
  against the exact s1, per layer over training.

Several runs give ``compare_layer_<k>.png`` and ``compare_layers.png``: the runs' distributions
at one iteration (``--iteration``, default the last iteration they all recorded) -- Figure 4 --
and ``compare_mass.png``, their spectral masses over training.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

import numpy as np

from core.errors import SpecregError
from core.spectral.history import RunHistory
from core.spectral.summary import LayerInfo

__all__ = ["main", "plot_run", "plot_comparison", "choose_records"]

#: curves per distribution plot by default (the paper draws about ten).
DEFAULT_CURVES = 10


def choose_records(n: int, k: int) -> list[int]:
    """At most ``k`` record indices out of ``n``, evenly spaced, first and last included."""
    if n <= k:
        return list(range(n))
    return sorted({int(round(x)) for x in np.linspace(0, n - 1, k)})


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _describe(info: LayerInfo) -> str:
    shape = "x".join(map(str, info.shape))
    note = ", 1x1 shortcut" if info.is_1x1 else ""
    return f"{info.key} ({info.module}, {info.kind} {shape}{note})"


def _grid(n: int) -> tuple[int, int]:
    cols = min(4, n)
    return -(-n // cols), cols


def _distribution_axes(ax, info: LayerInfo, log: bool, title: str | None = None) -> None:
    ax.set_xlabel("index j of singular value")
    ax.set_ylabel("$s_j / s_1$")
    if log:
        ax.set_yscale("log")
    else:
        ax.set_ylim(0, 1.05)
    ax.set_xlim(0, max(1, info.rank - 1))
    ax.set_title(title or _describe(info), fontsize=9)
    ax.grid(True, alpha=0.3)


def _positive(values: np.ndarray, log: bool) -> np.ndarray:
    return np.where(values > 0, values, np.nan) if log else values


def _mark_events(ax, history: RunHistory, label: bool) -> None:
    for i, alarm in enumerate(history.alarms):
        ax.axvline(alarm["iteration"], color="red", linestyle=":", linewidth=1.2,
                   label="collapse alarm" if label and i == 0 else None)
    for i, (iteration, name) in enumerate(history.switches()):
        ax.axvline(iteration, color="black", linestyle="--", linewidth=1.2,
                   label=f"switch to {name}" if label and i == 0 else None)


# ---------------------------------------------------------------------------------------------
# One run
# ---------------------------------------------------------------------------------------------


def plot_layer_over_training(history: RunHistory, info: LayerInfo, path: Path, curves: int,
                             log: bool) -> Path:
    """Figures 2-3: one curve per recorded iteration, coloured from early (dark) to late."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    ratios = history.normalized(info.key)
    chosen = choose_records(len(ratios), curves)
    colors = plt.cm.viridis(np.linspace(0, 0.92, max(1, len(chosen))))
    for color, i in zip(colors, chosen):
        ax.plot(np.arange(info.rank), _positive(ratios[i], log), color=color, linewidth=1.4,
                label=f"iteration {history.iterations[i]:,}")
    _distribution_axes(ax, info, log, f"{history.name}: {_describe(info)}")
    ax.legend(fontsize=7, ncol=2 if len(chosen) > 6 else 1,
              loc="lower left" if log else "upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_layers_at(history: RunHistory, iteration: int | None, path: Path, log: bool) -> Path:
    """Appendix Figures 14-22: every layer at one iteration (the first record in grey)."""
    plt = _pyplot()
    index = history.index_at(iteration)
    at = int(history.iterations[index])
    layers = [info for info in history.layers if info.rank > 1]  # one value: nothing to see
    rows, cols = _grid(len(layers))
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 2.9 * rows), squeeze=False)
    for ax, info in zip(axes.flat, layers):
        ratios = history.normalized(info.key)
        x = np.arange(info.rank)
        if index != 0:
            ax.plot(x, _positive(ratios[0], log), color="0.6", linestyle="--", linewidth=1,
                    label=f"iteration {history.iterations[0]:,}")
        ax.plot(x, _positive(ratios[index], log), color="C0", linewidth=1.6,
                label=f"iteration {at:,}")
        _distribution_axes(ax, info, log)
        ax.xaxis.label.set_size(8)
        ax.yaxis.label.set_size(8)
    for ax in list(axes.flat)[len(layers):]:
        ax.set_visible(False)
    axes.flat[0].legend(fontsize=7)
    fig.suptitle(f"{history.name}: spectral distributions of every layer at iteration {at:,}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_mass_and_quality(history: RunHistory, path: Path) -> Path:
    """Figure 5: spectral mass per layer over training, above the quality metrics."""
    plt = _pyplot()
    keys = sorted(history.quality)
    fig, axes = plt.subplots(1 + len(keys), 1, figsize=(8, 3.2 + 2.2 * len(keys)), sharex=True,
                             squeeze=False)
    axes = axes[:, 0]
    ax = axes[0]
    colors = plt.cm.tab20(np.linspace(0, 1, max(2, len(history.layers))))
    for color, info in zip(colors, history.layers):
        if info.rank < 2:
            continue  # one singular value: the mass is 1 by definition
        ax.plot(history.iterations, history.summary(info.key, "mass"), marker=".",
                linestyle="--" if info.is_1x1 else "-", color=color,
                label=info.key + (" (1x1)" if info.is_1x1 else ""))
    _mark_events(ax, history, label=True)
    ax.set_ylabel("spectral mass\nmean of $s_j / s_1$")
    ax.set_ylim(0, 1.02)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7, ncol=2, loc="center left", bbox_to_anchor=(1.01, 0.5))
    ax.set_title(f"{history.name}: spectral mass and sample quality over training" if keys else
                 f"{history.name}: spectral mass over training\n(no quality metrics: no 'eval' "
                 f"events in metrics.jsonl)", fontsize=11)
    for ax, key in zip(axes[1:], keys):
        iterations, values = history.quality[key]
        ax.plot(iterations, values, marker="o", color="C3")
        _mark_events(ax, history, label=False)
        ax.set_ylabel(key)
        ax.grid(True, alpha=0.3)
    axes[-1].set_xlabel("iteration")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_summaries(history: RunHistory, path: Path) -> Path:
    """s1, stable rank (log), share above 0.1, and power-iteration sigma / exact s1 per layer."""
    plt = _pyplot()
    panels = [("s1", "$s_1$ of the effective weight", False),
              ("stable_rank", "stable rank $\\sum_j s_j^2 / s_1^2$", True),
              ("frac_above_0.1", "share of $s_j / s_1 > 0.1$", False),
              ("sigma_ratio", "power-iteration $\\sigma$ / exact $s_1$", False)]
    fig, axes = plt.subplots(2, 2, figsize=(11, 7), sharex=True)
    colors = plt.cm.tab20(np.linspace(0, 1, max(2, len(history.layers))))
    for ax, (name, label, log) in zip(axes.flat, panels):
        for color, info in zip(colors, history.layers):
            values = history.summary(info.key, name)
            if not np.isfinite(values).any():
                continue
            ax.plot(history.iterations, values, color=color, marker=".",
                    linestyle="--" if info.is_1x1 else "-",
                    label=info.key + (" (1x1)" if info.is_1x1 else ""))
        _mark_events(ax, history, label=False)
        if log:
            ax.set_yscale("log")
        ax.set_ylabel(label)
        ax.grid(True, alpha=0.3)
    for ax in axes[1]:
        ax.set_xlabel("iteration")
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, labels, fontsize=7, loc="center right")
    fig.suptitle(f"{history.name}: per-layer spectral summaries over training")
    fig.tight_layout(rect=(0, 0, 0.9, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_run(history: RunHistory, out: Path, iteration: int | None = None,
             curves: int = DEFAULT_CURVES, log: bool = False) -> list[Path]:
    """Every single-run figure into ``out``; returns the files written."""
    out.mkdir(parents=True, exist_ok=True)
    history.index_at(iteration)  # fail early on an unknown iteration
    written = [plot_layer_over_training(history, info, out / f"spectra_{info.key}.png", curves, log)
               for info in history.layers if info.rank > 1]
    at = int(history.iterations[history.index_at(iteration)])
    written.append(plot_layers_at(history, iteration, out / f"layers_at_{at}.png", log))
    written.append(plot_mass_and_quality(history, out / "mass_and_quality.png"))
    written.append(plot_summaries(history, out / "summaries.png"))
    return written


# ---------------------------------------------------------------------------------------------
# Several runs
# ---------------------------------------------------------------------------------------------


def common_iteration(histories: Sequence[RunHistory]) -> int:
    """The last iteration every run recorded."""
    common = set(histories[0].iterations.tolist())
    for h in histories[1:]:
        common &= set(h.iterations.tolist())
    if not common:
        raise SpecregError("the runs have no recorded iteration in common; pick one with "
                           "--iteration N that each of them recorded")
    return max(common)


def _check_same_layers(histories: Sequence[RunHistory]) -> list[LayerInfo]:
    """The layers present (by key) in every run; differing shapes are fine (Figure 4 compares
    widths)."""
    keys = [info.key for info in histories[0].layers]
    for h in histories[1:]:
        keys = [k for k in keys if k in {i.key for i in h.layers}]
    if not keys:
        raise SpecregError("the runs share no layer names; compare runs of one architecture")
    return [histories[0].layer(k) for k in keys]


def plot_compare_layer(histories: Sequence[RunHistory], key: str, iteration: int, ax,
                       log: bool) -> None:
    for color, h in zip([f"C{i}" for i in range(10)] * 10, histories):
        info = h.layer(key)
        ratios = h.normalized(key)[h.index_at(iteration)]
        ax.plot(np.arange(info.rank), _positive(ratios, log), color=color, linewidth=1.5,
                label=f"{h.name} ({'x'.join(map(str, info.shape))})")
    ref = histories[0].layer(key)
    _distribution_axes(ax, ref, log, f"{key} ({ref.module}) at iteration {iteration:,}")
    ax.set_xlim(0, max(max(h.layer(key).rank for h in histories) - 1, 1))


def plot_comparison(histories: Sequence[RunHistory], out: Path, iteration: int | None = None,
                    log: bool = False) -> list[Path]:
    """Figure 4 for every layer, all layers on one page, and the spectral masses over training."""
    plt = _pyplot()
    out.mkdir(parents=True, exist_ok=True)
    iteration = common_iteration(histories) if iteration is None else iteration
    layers = [info for info in _check_same_layers(histories) if info.rank > 1]
    written = []
    for info in layers:
        fig, ax = plt.subplots(figsize=(6.4, 4.4))
        plot_compare_layer(histories, info.key, iteration, ax, log)
        ax.legend(fontsize=7)
        fig.tight_layout()
        path = out / f"compare_{info.key}.png"
        fig.savefig(path, dpi=120)
        plt.close(fig)
        written.append(path)
    rows, cols = _grid(len(layers))
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 2.9 * rows), squeeze=False)
    for ax, info in zip(axes.flat, layers):
        plot_compare_layer(histories, info.key, iteration, ax, log)
    for ax in list(axes.flat)[len(layers):]:
        ax.set_visible(False)
    axes.flat[0].legend(fontsize=6)
    fig.suptitle(f"spectral distributions at iteration {iteration:,}")
    fig.tight_layout()
    path = out / "compare_layers.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    written.append(path)
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 2.7 * rows), squeeze=False,
                             sharex=True)
    for ax, info in zip(axes.flat, layers):
        for color, h in zip([f"C{i}" for i in range(10)] * 10, histories):
            ax.plot(h.iterations, h.summary(info.key, "mass"), color=color, marker=".",
                    label=h.name)
        ax.set_title(f"{info.key} ({info.module})", fontsize=9)
        ax.set_ylim(0, 1.02)
        ax.set_xlabel("iteration", fontsize=8)
        ax.set_ylabel("spectral mass", fontsize=8)
        ax.grid(True, alpha=0.3)
    for ax in list(axes.flat)[len(layers):]:
        ax.set_visible(False)
    axes.flat[0].legend(fontsize=6)
    fig.suptitle("spectral mass (mean of $s_j / s_1$) over training")
    fig.tight_layout()
    path = out / "compare_mass.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    written.append(path)
    return written


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m core.plot",
        description="Plot the spectral distributions of a run's discriminator (SR paper, "
                    "Figures 2-5 and 14-22); several runs are compared.")
    parser.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run folder(s)")
    parser.add_argument("--out", default=None,
                        help="folder for the PNGs (default: RUN_DIR/plots, with several runs the "
                             "first run's plots folder)")
    parser.add_argument("--iteration", type=int, default=None,
                        help="the iteration of the one-iteration figures (default: the last "
                             "record; with several runs the last one they all recorded)")
    parser.add_argument("--curves", type=int, default=DEFAULT_CURVES,
                        help=f"at most this many iterations per distribution plot "
                             f"(default {DEFAULT_CURVES})")
    parser.add_argument("--log", action="store_true",
                        help="log scale for s_j / s1 (shows how deep a collapse goes)")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        if args.curves < 1:
            raise SpecregError(f"--curves must be >= 1, got {args.curves}")
        histories = [RunHistory.load(run) for run in args.runs]
        for h in histories:
            h.index_at(None)  # every run must hold a record
        out = Path(args.out) if args.out else Path(args.runs[0]) / "plots"
        if len(histories) == 1:
            written = plot_run(histories[0], out, args.iteration, args.curves, args.log)
        else:
            written = plot_comparison(histories, out, args.iteration, args.log)
    except SpecregError as exc:
        print(f"specreg: error: {exc}", file=sys.stderr)
        return exc.exit_code
    for path in written:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
