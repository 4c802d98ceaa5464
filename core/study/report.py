"""A study's report: per compared metric and iteration, each arm's mean ± std over seeds with a
confidence interval (Student's t) and a test of its difference to the baseline arm (Welch's
t-test or the Mann-Whitney U test, from scipy); collapsed runs by the study's rule, with when the
spectral alarm fired. Written as ``report.md``, ``summary.csv``, ``runs.csv`` (every evaluation of
every run, long form) and the PNGs of :mod:`core.study.plots`."""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Any

import attrs
import numpy as np

from core.study.results import RunResults
from core.study.spec import LoadedStudy

__all__ = ["ArmSummary", "summarize", "collapse_of", "write_report"]


@attrs.frozen
class ArmSummary:
    """One arm's values of one metric at one iteration (``None``: each run's last evaluation)."""

    arm: str
    metric: str
    iteration: int | None
    values: tuple[float, ...]
    mean: float
    std: float
    ci_low: float
    ci_high: float
    #: the test's p-value against the baseline arm (NaN for the baseline itself or too few runs)
    p_value: float


def _stats(values: list[float], confidence: float) -> tuple[float, float, float, float]:
    """mean, sample std (ddof 1), and the t confidence interval of the mean."""
    from scipy import stats

    a = np.asarray(values, dtype=np.float64)
    a = a[np.isfinite(a)]
    if len(a) == 0:
        return (math.nan,) * 4
    mean = float(a.mean())
    if len(a) < 2:
        return mean, math.nan, math.nan, math.nan
    std = float(a.std(ddof=1))
    half = float(stats.t.ppf((1 + confidence) / 2, len(a) - 1)) * std / math.sqrt(len(a))
    return mean, std, mean - half, mean + half


def _p_value(a: list[float], b: list[float], test: str) -> float:
    from scipy import stats

    a = [v for v in a if math.isfinite(v)]
    b = [v for v in b if math.isfinite(v)]
    if len(a) < 2 or len(b) < 2:
        return math.nan
    if test == "mannwhitney":
        return float(stats.mannwhitneyu(a, b, alternative="two-sided").pvalue)
    if np.std(a) == 0 and np.std(b) == 0:  # t is undefined; the samples are equal or not
        return 1.0 if np.mean(a) == np.mean(b) else 0.0
    return float(stats.ttest_ind(a, b, equal_var=False).pvalue)


def summarize(loaded: LoadedStudy, results: list[RunResults]) -> list[ArmSummary]:
    """Every (metric, iteration, arm) cell of the report's tables."""
    study = loaded.study
    by_arm: dict[str, list[RunResults]] = {arm: [] for arm in study.arms}
    for r in results:
        by_arm[r.run.arm].append(r)
    cells = []
    for metric in study.compare.metrics:
        for iteration in study.compare.iterations or [None]:
            values = {arm: [v for r in rs if (v := r.value_at(metric, iteration)) is not None]
                      for arm, rs in by_arm.items()}
            for arm, vs in values.items():
                mean, std, low, high = _stats(vs, study.compare.confidence)
                p = math.nan if arm == study.baseline else \
                    _p_value(vs, values[study.baseline], study.compare.test)
                cells.append(ArmSummary(arm, metric, iteration, tuple(vs), mean, std, low, high, p))
    return cells


def collapse_of(loaded: LoadedStudy, r: RunResults) -> dict[str, Any]:
    """Whether the run collapsed by the study's rule, and since which evaluation: the first one
    at which the rule held and kept holding to the end (None when it did not collapse)."""
    rule = loaded.study.collapse
    series = r.series(rule.metric) if rule.metric else []
    if not series or (rule.below is None and rule.drop is None):
        return {"collapsed": False, "since": None, "last": None, "best": None}
    holds, best = [], -math.inf
    for _, value in series:
        best = max(best, value) if math.isfinite(value) else best
        below = rule.below is not None and not value >= rule.below
        dropped = rule.drop is not None and math.isfinite(best) and not value >= rule.drop * best
        holds.append(below or dropped)
    since = None
    for (iteration, _), h in zip(reversed(series), reversed(holds)):
        if not h:
            break
        since = iteration
    return {"collapsed": holds[-1], "since": since, "last": series[-1][1],
            "best": best if math.isfinite(best) else None}


def _fmt(value: float | None, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.{digits}g}"


def _when(iteration: int | None) -> str:
    return "last" if iteration is None else str(iteration)


def _markdown_tables(loaded: LoadedStudy, cells: list[ArmSummary]) -> list[str]:
    study = loaded.study
    test = {"welch": "Welch's t-test (scipy.stats.ttest_ind, equal_var=False)",
            "mannwhitney": "Mann-Whitney U test (scipy.stats.mannwhitneyu, two-sided)"}[
        study.compare.test]
    lines = [f"Mean ± std over seeds, [{study.compare.confidence:.0%} confidence interval of the "
             f"mean, Student's t], and the p-value of {test} against the baseline arm "
             f"`{study.baseline}`.", ""]
    for metric in study.compare.metrics:
        lines += [f"### {metric}", "", "| arm | iteration | n | mean ± std | CI | p vs "
                  f"{study.baseline} |", "|---|---|---|---|---|---|"]
        for c in (c for c in cells if c.metric == metric):
            lines.append(f"| {c.arm} | {_when(c.iteration)} | {len(c.values)} | "
                         f"{_fmt(c.mean)} ± {_fmt(c.std, 2)} | [{_fmt(c.ci_low)}, "
                         f"{_fmt(c.ci_high)}] | {_fmt(c.p_value, 2)} |")
        lines.append("")
    return lines


def _run_rows(loaded: LoadedStudy, results: list[RunResults]) -> list[dict[str, Any]]:
    rows = []
    for r in results:
        c = collapse_of(loaded, r)
        first_alarm = r.alarms[0] if r.alarms else None
        lead = c["since"] - first_alarm if c["collapsed"] and first_alarm is not None \
            and c["since"] is not None else None
        last_iteration = max((it for s in r.evaluations.values() for it in s), default=None)
        rows.append({"arm": r.run.arm, "seed": r.run.seed, "last_evaluation": last_iteration,
                     "last": c["last"], "best": c["best"], "collapsed": c["collapsed"],
                     "collapsed_since": c["since"], "first_alarm": first_alarm,
                     "alarm_lead": lead, "switched_at": r.switched_at})
    return rows


def write_report(loaded: LoadedStudy, results: list[RunResults], plots: bool = True
                 ) -> Path:
    """Write the report into ``loaded.report_dir``; the path of ``report.md``."""
    from core.checkpoint import write_atomic_text

    study, out = loaded.study, loaded.report_dir
    out.mkdir(parents=True, exist_ok=True)
    cells = summarize(loaded, results)
    rows = _run_rows(loaded, results)
    with open(out / "summary.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["metric", "iteration", "arm", "n", "mean", "std", "ci_low", "ci_high",
                    f"p_vs_{study.baseline}", "values"])
        for c in cells:
            w.writerow([c.metric, _when(c.iteration), c.arm, len(c.values), repr(c.mean),
                        repr(c.std), repr(c.ci_low), repr(c.ci_high), repr(c.p_value),
                        " ".join(repr(v) for v in c.values)])
    with open(out / "runs.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["arm", "seed", "metric", "iteration", "value"])
        for r in results:
            for key in sorted(r.evaluations):
                for iteration, value in r.series(key):
                    w.writerow([r.run.arm, r.run.seed, key, iteration, repr(value)])
    figures = []
    if plots:
        from core.study.plots import draw_plots

        figures = draw_plots(loaded, results, out)
    total = {arm: sum(1 for r in rows if r["arm"] == arm) for arm in study.arms}
    collapsed = {arm: sum(1 for r in rows if r["arm"] == arm and r["collapsed"])
                 for arm in study.arms}
    lines = [f"# Study `{loaded.name}`", ""]
    if study.description:
        lines += [study.description, ""]
    lines += [f"Study file `{loaded.path}`; {len(study.arms)} arms x {len(study.seeds)} seeds "
              f"({', '.join(map(str, study.seeds))}); runs in `{loaded.folder}`. Regenerate: "
              f"`python -m core.study {loaded.path} --report`.", "", "| arm | overrides |",
              "|---|---|"]
    for arm, spec in study.arms.items():
        lines.append(f"| {arm} | {'; '.join(f'`{s}`' for s in spec.set) or '-'} |")
    lines += ["", "## Results", ""] + _markdown_tables(loaded, cells)
    lines += ["## Collapse", "", f"Rule: {study.collapse.describe()}. Alarm lead = the first "
              f"evaluation of the final collapsed stretch minus the first spectral alarm "
              f"(iterations; > 0: the alarm came first).", "",
              "| arm | collapsed |", "|---|---|"]
    lines += [f"| {arm} | {collapsed[arm]} of {total[arm]} |" for arm in study.arms]
    lines += ["", "| arm | seed | last eval | last | best | collapsed (since) | first alarm | "
              "alarm lead | switched at |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        since = f"yes ({r['collapsed_since']})" if r["collapsed"] else "no"
        lines.append(f"| {r['arm']} | {r['seed']} | {r['last_evaluation'] or '-'} | "
                     f"{_fmt(r['last'])} | {_fmt(r['best'])} | {since} | "
                     f"{r['first_alarm'] if r['first_alarm'] is not None else '-'} | "
                     f"{r['alarm_lead'] if r['alarm_lead'] is not None else '-'} | "
                     f"{r['switched_at'] if r['switched_at'] is not None else '-'} |")
    if figures:
        lines += ["", "## Plots", ""] + [f"![{p.stem}]({p.name})" for p in figures]
    write_atomic_text(out / "report.md", "\n".join(lines) + "\n")
    return out / "report.md"
