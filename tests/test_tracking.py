"""Logging through Accelerate's trackers (core/tracking.py): metrics.jsonl as a GeneralTracker,
Accelerate's TensorBoard tracker, ``log.trackers`` in the recipe.

- In a short real run (train, spectral and eval events, sample grids) the JSONL tracker and
  TensorBoard receive the same scalars: every finite number of metrics.jsonl is a TensorBoard
  scalar ``EVENT/KEY`` at its iteration (read back with TensorBoard's EventAccumulator), and
  nothing else is.
- metrics.jsonl is byte for byte what the RunLog before the trackers wrote for the same calls (the
  expected lines are spelled out here), appended to by a resumed run, trimmed by
  ``truncate_after``.
- An unknown tracker name is a one-line recipe error listing the valid ones; a tracker whose
  package is missing is a one-line error naming the pip package, raised before anything is
  written; no tracker package is imported by ``import core.tracking``; the trackers are finished
  (their files complete) when a run dies on an error.
"""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import torch
from accelerate.tracking import LOGGER_TYPE_TO_CLASS, TensorBoardTracker, get_available_trackers

from core.recipe import RecipeError, TrackerName, load_recipe
from core.tracking import JsonlTracker, RunLog, TrackerUnavailableError
from core.train import build_trainer, make_accelerator
from conftest import REPO, run_cli

RECIPE = """
seed = 3
[dataset]
name = "stacked_digits"
num_samples = 256
[architecture]
name = "resnet32"
ch = 8
g_ch = 8
[discriminator.regularizer]
name = "sn"
[train]
iterations = 4
batch_size = 8
n_critic = 1
[checkpoint]
every = 0
[log]
every = 1
sample_every = 2
grid_size = 4
progress = false
[callbacks.spectral]
every = 1
[eval]
every = 2
[[eval.metrics]]
name = "d_stats"
num_samples = 16
"""


def event_scalars(tensorboard_dir) -> dict[tuple[str, int], float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tensorboard_dir), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    return {(tag, e.step): e.value for tag in acc.Tags()["scalars"] for e in acc.Scalars(tag)}


def event_images(tensorboard_dir, tag: str):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tensorboard_dir), size_guidance={"images": 0})
    acc.Reload()
    return acc.Images(tag) if tag in acc.Tags()["images"] else []


def jsonl_scalars(run_dir) -> dict[tuple[str, int], float]:
    """What TensorBoard must hold: every finite number of every record, as EVENT/KEY."""
    out = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        for key, value in record.items():
            if key in ("event", "iteration", "time") or isinstance(value, bool) or \
                    not isinstance(value, (int, float)) or not math.isfinite(value):
                continue
            out[(f"{record['event']}/{key}", record["iteration"])] = value
    return out


def test_jsonl_and_tensorboard_receive_the_same_scalars_in_a_short_run(tmp_path):
    from PIL import Image

    from core.eval.during_training import make_evaluator

    path = tmp_path / "recipe.toml"
    path.write_text(RECIPE)
    recipe = load_recipe(path)
    assert recipe.log.trackers == ["jsonl", "tensorboard"]  # the default
    run = tmp_path / "run"
    trainer = build_trainer(recipe, run, make_accelerator(recipe))  # the recipe's callbacks
    assert isinstance(trainer.log.get_tracker("tensorboard"), TensorBoardTracker)
    assert isinstance(trainer.log.get_tracker("jsonl"), JsonlTracker)
    trainer.fit(evaluate=make_evaluator(recipe))

    expected = jsonl_scalars(run)
    events = {tag.split("/")[0] for tag, _ in expected}
    assert events >= {"train", "spectral", "eval"}, events
    assert {it for tag, it in expected if tag == "train/loss_d"} == {1, 2, 3, 4}
    got = event_scalars(run / "tensorboard")
    assert sorted(got) == sorted(expected)
    # TensorBoard stores float32: the same number, rounded once
    mismatched = {k: (expected[k], got[k]) for k in expected
                  if got[k] != float(np.float32(expected[k]))}
    assert not mismatched, mismatched
    # the sample grids: one image per saved PNG, the same size
    images = event_images(run / "tensorboard", "samples")
    assert [im.step for im in images] == [2, 4]
    png = Image.open(run / "samples" / sorted(p.name for p in (run / "samples").glob("*.png"))[-1])
    assert (images[-1].width, images[-1].height) == png.size


def test_metrics_jsonl_is_byte_for_byte_what_the_old_run_log_wrote(tmp_path):
    run = tmp_path / "run"
    start = time.time()
    log = RunLog(run)
    log.write("train", 10, {"loss_d": 1.25, "loss_g": -0.5, "lr_d": 0.0002, "it_per_s": 3.0},
              tensorboard_prefix="train")
    log.write("eval", 20, {"modes.modes": 987, "modes.kl": float("nan"), "ok": True,
                           "v": torch.tensor([1.0, 2.5]), "n": np.int64(7), "s": "abc",
                           "d": {"a": None}})
    log.close()
    resumed = RunLog(run, trackers=["jsonl"])  # a resumed run appends
    resumed.write("alarm", 30, {"layers": ["layer_9"], "action": "warn"})
    resumed.close()
    end = time.time()

    lines = (run / "metrics.jsonl").read_text().split("\n")
    assert lines[-1] == ""
    times = [float(re.search(r'"time": ([0-9.]+),', line).group(1)) for line in lines[:-1]]
    for t in times:
        assert round(start, 3) - 1e-3 <= t <= round(end, 3) + 1e-3
        assert t == round(t, 3)
    t1, t2, t3 = (repr(t) for t in times)
    assert lines[:-1] == [
        '{"event": "train", "iteration": 10, "time": ' + t1 + ', "loss_d": 1.25, '
        '"loss_g": -0.5, "lr_d": 0.0002, "it_per_s": 3.0}',
        '{"event": "eval", "iteration": 20, "time": ' + t2 + ', "modes.modes": 987, '
        '"modes.kl": NaN, "ok": true, "v": [1.0, 2.5], "n": 7, "s": "abc", "d": {"a": null}}',
        '{"event": "alarm", "iteration": 30, "time": ' + t3 + ', "layers": ["layer_9"], '
        '"action": "warn"}',
    ]
    # TensorBoard got the finite numbers only, the event kind (or the prefix) before each key
    assert event_scalars(run / "tensorboard") == {
        ("train/loss_d", 10): 1.25, ("train/loss_g", 10): -0.5,
        ("train/lr_d", 10): float(np.float32(0.0002)), ("train/it_per_s", 10): 3.0,
        ("eval/modes.modes", 20): 987.0}


def test_truncate_after_keeps_the_records_up_to_the_checkpoint(tmp_path):
    run = tmp_path / "run"
    log = RunLog(run, trackers=["jsonl"])
    for it in range(1, 6):
        log.write("train", it, {"loss_d": it / 4})
    log.close()
    path = run / "metrics.jsonl"
    lines = path.read_text().splitlines()
    with path.open("a") as fh:  # the partial last line of a run killed mid-write
        fh.write('{"event": "train", "iter')

    resumed = RunLog(run, trackers=["jsonl"])
    resumed.truncate_after(3)
    assert path.read_text() == "".join(line + "\n" for line in lines[:3])
    resumed.write("train", 4, {"loss_d": 9.0})
    resumed.close()
    assert [json.loads(line)["iteration"] for line in path.read_text().splitlines()] == [1, 2, 3, 4]
    assert [p.name for p in run.iterdir()] == ["metrics.jsonl"]  # no temporary file left


def test_only_the_main_process_writes(tmp_path):
    log = RunLog(tmp_path / "run", enabled=False)
    log.write("train", 1, {"loss_d": 1.0})
    log.add_image("samples", torch.zeros(3, 4, 4), 1)
    log.truncate_after(0)
    log.close()
    assert not (tmp_path / "run").exists()


def test_json_tracker_is_an_accelerate_tracker(tmp_path):
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True, log_with=[JsonlTracker("x", tmp_path)])
    accelerator.init_trackers("x")
    accelerator.log({"a": 1.5}, step=3)
    accelerator.get_tracker("jsonl", unwrap=False).finish()
    (record,) = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert (record["event"], record["iteration"], record["a"]) == ("log", 3, 1.5)


# ---------------------------------------------------------------------------------------------
# Choosing trackers
# ---------------------------------------------------------------------------------------------


def test_an_unknown_tracker_name_is_a_one_line_recipe_error(tmp_path):
    path = tmp_path / "recipe.toml"
    path.write_text(RECIPE.replace("progress = false",
                                   'progress = false\ntrackers = ["jsonl", "tensorbord"]'))
    with pytest.raises(RecipeError) as info:
        load_recipe(path)
    (problem,) = info.value.problems
    assert problem.startswith(f"{path}: invalid value at log.trackers.1: must be one of ")
    for name in ("'jsonl'", "'tensorboard'", "'wandb'", "'mlflow'"):
        assert name in problem

    out = run_cli(["zoo/quickstart.toml", "--set", "log.trackers=['jsonl', 'wandbb']", "--dry-run"])
    assert out.returncode == 2, out.stderr
    assert "Traceback" not in out.stderr
    (line,) = [line for line in out.stderr.splitlines() if "log.trackers" in line]
    assert "--set log.trackers=['jsonl', 'wandbb']: invalid value at log.trackers.1: must be " \
           "one of 'jsonl', 'tensorboard', 'wandb'" in line


def test_the_recipe_accepts_only_trackers_accelerate_has():
    names = set(TrackerName.__args__)
    assert "jsonl" in names and names - {"jsonl"} <= set(LOGGER_TYPE_TO_CLASS), \
        names - {"jsonl"} - set(LOGGER_TYPE_TO_CLASS)


def _missing_tracker() -> str:
    available = {str(t) for t in get_available_trackers()}  # accelerate's is_*_available
    missing = [n for n in TrackerName.__args__ if n != "jsonl" and n not in available]
    if not missing:
        pytest.skip("every tracker's package is installed here")
    return missing[0]


def test_a_tracker_without_its_package_is_a_one_line_error_naming_it(tmp_path):
    name = _missing_tracker()
    package = {"comet_ml": "comet-ml"}.get(name, name)
    for enabled in (True, False):  # every process fails alike
        with pytest.raises(TrackerUnavailableError) as info:
            RunLog(tmp_path / "run", enabled=enabled, trackers=["jsonl", name])
        message = str(info.value)
        assert "\n" not in message and f"'{name}'" in message
        assert f"pip install {package}" in message
        assert info.value.exit_code == 2
    assert not (tmp_path / "run").exists()  # nothing written


def test_importing_core_tracking_imports_no_tracker_package():
    code = ("import sys, core.tracking; "
            "print(sorted({m.split('.')[0] for m in sys.modules} & "
            "{'tensorboard', 'tensorboardX', 'wandb', 'mlflow', 'comet_ml', 'aim', 'clearml', "
            "'dvclive', 'swanlab', 'trackio'}))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_the_trackers_are_finished_when_the_run_dies_on_an_error(tmp_path):
    script = textwrap.dedent(f"""
        import torch
        from core.tracking import RunLog
        log = RunLog({str(tmp_path / "run")!r})
        log.write("train", 1, {{"loss_d": 0.5}})
        log.add_image("samples", torch.rand(3, 8, 8), 1)
        log.write("train", 2, {{"loss_d": 0.25}})
        raise RuntimeError("the run died")
    """)
    out = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 1 and "the run died" in out.stderr
    assert event_scalars(tmp_path / "run" / "tensorboard") == {("train/loss_d", 1): 0.5,
                                                               ("train/loss_d", 2): 0.25}
    assert [im.step for im in event_images(tmp_path / "run" / "tensorboard", "samples")] == [1]


@pytest.mark.slow
def test_a_short_quickstart_run_writes_metrics_and_tensorboard(tmp_path):
    run = tmp_path / "h3run"
    out = run_cli(["zoo/quickstart.toml", "--set", "train.iterations=3", "--set", "eval.every=0",
                   "--run-dir", str(run)])
    assert out.returncode == 0, out.stderr[-3000:]
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert {r["event"] for r in records} >= {"train", "spectral", "eval"}
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))
    assert sorted(event_scalars(run / "tensorboard")) == sorted(jsonl_scalars(run))

    missing = _missing_tracker()
    out = run_cli(["zoo/quickstart.toml", "--set", "train.iterations=1",
                   "--set", f"log.trackers=['jsonl', '{missing}']",
                   "--run-dir", str(tmp_path / "x")])
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr[-3000:]
    (line,) = out.stderr.strip().splitlines()
    assert "pip install" in line and f"'{missing}'" in line
    assert not (tmp_path / "x").exists()


def test_records_cut_short_or_not_objects_are_skipped_by_every_reader(tmp_path):
    """One reader (core.records.read_records) behind the metrics log, the spectral history and
    the study's results: a line cut short by a killed process, or not a JSON object, is
    skipped; the others come back in order."""
    from core.records import read_records
    from core.spectral.history import read_metrics
    from core.tracking import read_log

    lines = ['{"event": "train", "iteration": 1}', '[1, 2]', '',
             '{"event": "eval", "iteration": 2}', '{"event": "train", "itera']
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines))
    expected = [{"event": "train", "iteration": 1}, {"event": "eval", "iteration": 2}]
    assert read_records(tmp_path / "metrics.jsonl") == expected
    assert read_metrics(tmp_path) == expected and read_log(tmp_path) == expected
    assert read_log(tmp_path, "eval") == expected[1:]
    assert read_records(tmp_path / "missing.jsonl") == []
