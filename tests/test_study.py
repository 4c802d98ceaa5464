"""``python -m core.study``: a small study (2 arms x 2 seeds) through the local executor and
through submitit's debug executor, killed and resumed; its report against a direct computation
from the runs' ``evaluations.jsonl``; malformed study files."""

from __future__ import annotations

import csv
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

from conftest import REPO

TINY_RECIPE = """
seed = 0
[dataset]
name = "stacked_digits"
num_samples = 500
resolution = 8
[architecture]
name = "cnn"
resolution = 8
ch = 4
g_ch = 16
[train]
iterations = {iterations}
batch_size = 8
n_critic = 1
[checkpoint]
every = {every}
[log]
every = {every}
sample_every = 0
[callbacks.spectral]
every = {every}
plots = false
[eval]
every = {every}
best = ""
[[eval.metrics]]
name = "modes"
num_samples = 100
"""

STUDY = """
description = "a tiny study"
recipe = "tiny.toml"
seeds = [0, 1]
output_dir = "{out}"
{extra}
[arms.sn]
set = ['discriminator.regularizer.name="sn"']
[arms.plain]
set = ['train.lr_d=1e-3']
[compare]
metrics = ["modes.modes", "modes.rejected"]
iterations = {iterations}
[collapse]
metric = "modes.rejected"
below = 2.0
"""


def write_study(tmp_path: Path, iterations: int = 6, every: int = 3, extra: str = "",
                compare: str = "[]") -> Path:
    (tmp_path / "tiny.toml").write_text(TINY_RECIPE.format(iterations=iterations, every=every))
    path = tmp_path / "study.toml"
    path.write_text(STUDY.format(out=tmp_path / "out", extra=extra, iterations=compare))
    return path


def study_cli(args: list[str], top_set: list[str] = (), **kwargs) -> subprocess.CompletedProcess:
    """``python -m core.study ARGS``; ``top_set``: a top-level ``set`` added to the study file."""
    if top_set:
        path = Path(args[0])
        path.write_text(f"set = {list(top_set)!r}\n" + path.read_text())
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, "-m", "core.study", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600, **kwargs)


RUNS = ["sn-seed0", "sn-seed1", "plain-seed0", "plain-seed1"]


def evaluations(run_dir: Path) -> dict[tuple[str, int], float]:
    """``(metric.value, iteration) -> value`` straight from the run's evaluations.jsonl."""
    out = {}
    for line in (run_dir / "evaluations.jsonl").read_text().splitlines():
        r = json.loads(line)
        for k, v in r["values"].items():
            out[(f"{r['metric']}.{k}", r["iteration"])] = float(v)
    return out


def check_report(folder: Path, iterations: list[int | None]) -> None:
    """The report's summary.csv equals mean, std, t interval and Welch's p computed here."""
    rows = list(csv.DictReader(open(folder / "report" / "summary.csv")))
    evals = {run: evaluations(folder / run) for run in RUNS}
    last = {run: max(i for _, i in e) for run, e in evals.items()}
    assert len(rows) == 2 * len(iterations) * 2
    for row in rows:
        it = None if row["iteration"] == "last" else int(row["iteration"])
        values = [evals[f"{row['arm']}-seed{s}"][(row["metric"], last[f"{row['arm']}-seed{s}"]
                                                   if it is None else it)] for s in (0, 1)]
        base = [evals[f"sn-seed{s}"][(row["metric"], last[f"sn-seed{s}"] if it is None else it)]
                for s in (0, 1)]
        assert int(row["n"]) == 2
        assert float(row["mean"]) == pytest.approx(np.mean(values), abs=1e-12)
        assert float(row["std"]) == pytest.approx(np.std(values, ddof=1), abs=1e-12)
        half = stats.t.ppf(0.975, 1) * np.std(values, ddof=1) / math.sqrt(2)
        assert float(row["ci_low"]) == pytest.approx(np.mean(values) - half, abs=1e-9)
        p = float(row["p_vs_sn"])
        if row["arm"] == "sn":
            assert math.isnan(p)
        elif np.std(values) > 0 or np.std(base) > 0:
            assert p == pytest.approx(stats.ttest_ind(values, base, equal_var=False).pvalue)
    report = (folder / "report" / "report.md").read_text()
    assert "Welch's t-test" in report and "| sn | 2 of 2 |" in report  # rejected < 2: always
    for png in ("modes_modes.png", "modes_rejected.png", "spectral_mass.png"):
        assert (folder / "report" / png).stat().st_size > 1000


@pytest.mark.slow
def test_a_killed_study_resumes_only_its_missing_runs_through_either_executor(tmp_path):
    """The local executor trains the first run and is killed during the second; re-running the
    study through submitit's LocalExecutor (the ``slurm`` executor's path, four jobs at a time on
    a cluster) resumes the killed run and starts the two missing ones; the local executor then
    finds nothing to do. The report equals a direct computation from evaluations.jsonl."""
    study = write_study(tmp_path, iterations=20, every=5, compare="[10, 20]",
                        extra='[slurm]\ncluster = "local"\ncpus_per_task = 1\ntimeout_min = 10\n')
    folder = tmp_path / "out" / "study"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "core.study", str(study), "--jobs", "1"],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    deadline = time.time() + 300
    while not list((folder / "plain-seed0" / "checkpoints").glob("iter_*")):  # 2nd run going
        assert proc.poll() is None and time.time() < deadline, proc.stdout.read()
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 143, out
    assert "[1/4] sn-seed0: done" in out and "plain-seed0: stopped" in out
    assert not (folder / "sn-seed1").exists()
    first = (folder / "sn-seed0" / "metrics.jsonl").read_bytes()

    again = study_cli([str(study), "--executor", "slurm"])
    assert again.returncode == 0, again.stdout + again.stderr
    assert "sn-seed0: finished, skipped" in again.stdout
    assert again.stdout.count("submitted as job") == 3 and (folder / "submitit").is_dir()
    assert (folder / "sn-seed0" / "metrics.jsonl").read_bytes() == first  # left alone
    log = (folder / "logs" / "plain-seed0.log").read_text()
    assert "resuming" in log and "--resume" in log and "done: 20 iterations" in log
    for run in RUNS:
        assert (folder / run / "checkpoints" / "iter_0000020").is_dir()
    check_report(folder, [10, 20])

    third = study_cli([str(study)])  # nothing left to do
    assert third.returncode == 0 and third.stdout.count("finished, skipped") == 4
    lengthen = study_cli([str(study), "--plan"], top_set=["train.iterations=60"])
    assert lengthen.stdout.count(": interrupted: ") == 4 and "--resume" in lengthen.stdout
    redraw = study_cli([str(study), "--report", "--report-dir", str(tmp_path / "again")])
    assert redraw.returncode == 0
    assert (tmp_path / "again" / "summary.csv").read_text() == \
        (folder / "report" / "summary.csv").read_text()


BAD = {
    "unknown key": ("seedz = [1]\n", "unknown key 'seedz' (did you mean 'seeds'?)"),
    "wrong type": ('seeds = "0,1"\n', "seeds"),
    "no arms": ("", "at least one arm"),
    "bad arm override": ("[arms.a]\nset = ['train.n_critic=0']\n",
                         "arms.a: --set train.n_critic=0"),
    "missing recipe": ('[arms.a]\nrecipe = "nope.toml"\n', "arms.a.recipe: recipe file not found"),
    "bad baseline": ('[arms.a]\n[compare]\nbaseline = "b"\n', "baseline 'b' is not an arm"),
    "bad test": ('[arms.a]\n[compare]\ntest = "ttest"\n', "'welch', 'mannwhitney'"),
    "bad metric key": ('[arms.a]\n[compare]\nmetrics = ["modes"]\n', "METRIC.VALUE"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_a_malformed_study_file_gets_one_line_per_problem(tmp_path, case):
    from core.study.spec import StudyError, load_study

    body, expected = BAD[case]
    (tmp_path / "tiny.toml").write_text(TINY_RECIPE.format(iterations=6, every=3))
    path = tmp_path / "bad.toml"
    path.write_text('recipe = "tiny.toml"\n' + body)
    with pytest.raises(StudyError) as error:
        load_study(path)
    assert all(line.startswith(str(path)) for line in error.value.problems)
    assert any(expected in line for line in error.value.problems), error.value.problems


def test_the_study_command_reports_problems_without_a_traceback(tmp_path):
    (tmp_path / "tiny.toml").write_text(TINY_RECIPE.format(iterations=6, every=3))
    path = tmp_path / "bad.toml"
    path.write_text('recipe = "tiny.toml"\nseedz = [1]\n[arms.a]\n[compare]\ntest = "t"\n')
    result = study_cli([str(path)])
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Traceback" not in result.stderr and "2 problems in the study" in result.stderr
    assert f"{path}: unknown key 'seedz'" in result.stderr and "test" in result.stderr
    assert not (tmp_path / "runs").exists() and not (REPO / "runs" / "studies" / "bad").exists()


def test_a_study_extends_another_and_plans_one_folder_per_arm_and_seed(tmp_path):
    write_study(tmp_path)
    child = tmp_path / "child.toml"
    child.write_text('extends = "study.toml"\nseeds = [3]\n'
                     '[arms.third]\nset = ["train.lr_g=1e-3"]\n')
    result = subprocess.run([sys.executable, "-m", "core.run", "study", str(child), "--plan"],
                            cwd=REPO, capture_output=True, text=True, timeout=300)  # specreg study
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert [line.split(":")[0] for line in lines] == ["sn-seed3", "plain-seed3", "third-seed3"]
    assert all(": new: " in line and "--set seed=3" in line for line in lines)
    assert str(tmp_path / "out" / "child" / "third-seed3") in lines[2]
    from core.study.runs import plan_runs
    from core.study.spec import load_study

    runs = plan_runs(load_study(child))
    assert [r.name for r in runs] == ["sn-seed3", "plain-seed3", "third-seed3"]
    assert runs[2].overrides == ("seed=3", "train.lr_g=1e-3")


@pytest.mark.parametrize("command", [["core.study", "STUDY", "--plan"], ["core.run", "plugins"]])
def test_a_listing_piped_into_a_reader_that_left_ends_quietly(tmp_path, command):
    """``specreg study S.toml --plan | head``, ``specreg plugins | head``: the reader has gone
    before the first line is written; the command stops with the shell's status for SIGPIPE
    (141), no traceback."""
    study = write_study(tmp_path)
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader is gone before the first line
    try:
        result = subprocess.run(
            [sys.executable, "-m", *[str(study) if a == "STUDY" else a for a in command]],
            cwd=REPO, stdout=write_end, stderr=subprocess.PIPE, text=True, timeout=300)
    finally:
        os.close(write_end)
    assert result.returncode == 141, result.stderr
    assert "Traceback" not in result.stderr and "BrokenPipe" not in result.stderr


def test_a_study_that_extends_another_can_rename_it(tmp_path):
    """A top-level ``name`` is the study's name, not a plugin's: renaming the study in the child
    keeps every inherited arm, seed and comparison (a plugin's changed ``name`` drops its table's
    other keys; the study file's top level is no plugin table)."""
    from core.study.runs import plan_runs
    from core.study.spec import load_study

    parent = write_study(tmp_path)
    parent.write_text('name = "parent"\n' + parent.read_text())
    child = tmp_path / "child.toml"
    child.write_text('extends = "study.toml"\nname = "kid"\nset = ["train.lr_g=1e-3"]\n')
    loaded = load_study(child)
    assert loaded.study.name == "kid" and list(loaded.study.arms) == ["sn", "plain"]
    assert loaded.study.seeds == [0, 1] and loaded.study.compare.metrics == ["modes.modes",
                                                                              "modes.rejected"]
    runs = plan_runs(loaded)
    assert [r.name for r in runs] == ["sn-seed0", "plain-seed0", "sn-seed1", "plain-seed1"]
    assert all(r.folder.parent == tmp_path / "out" / "kid" for r in runs)
    assert runs[1].overrides == ("seed=0", "train.lr_g=1e-3", "train.lr_d=1e-3")


@pytest.mark.parametrize("path", sorted((REPO / "zoo" / "studies").glob("*_study.toml")),
                         ids=lambda p: p.name)
def test_every_zoo_study_loads_and_reports_into_docs(path):
    """The published studies' files load with every arm's recipe, and their reports go under
    docs/ (README links them there)."""
    from core.study.runs import plan_runs
    from core.study.spec import load_study

    loaded = load_study(path)
    assert loaded.study.report_dir.startswith("docs/studies/")
    runs = plan_runs(loaded)
    assert len(runs) == len(loaded.study.arms) * len(loaded.study.seeds) >= 4 * 3
