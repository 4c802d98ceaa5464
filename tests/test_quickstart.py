"""End to end through the command line: the quickstart's run folder, resume, evaluate, failures."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import REPO, run_cli

pytestmark = pytest.mark.slow

FAST = ["--set", "train.iterations=4", "--set", "eval.every=2", "--set", "log.sample_every=2",
        "--set", "checkpoint.every=2", "--set", "log.every=1", "--set", "dataset.num_samples=2000",
        "--set", "eval.metrics.0.num_samples=200", "--set", "eval.metrics.1.num_samples=200",
        "--set", "eval.metrics.1.reference_samples=500", "--set", "spectral.every=2"]


def test_dry_run_prints_the_plan():
    result = run_cli(["zoo/quickstart.toml", "--dry-run"])
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "resnet32" in out and "stacked_digits (8x8, unconditional)" in out
    assert "D: none; G: none" in out and "loss          ns" in out
    assert "global batch 64 = micro-batch 64 x 1 process(es) x 1 accumulation step(s)" in out
    assert "OK" in out


def test_quickstart_run_folder_resume_and_evaluate(tmp_path):
    run_dir = tmp_path / "run"
    result = run_cli(["zoo/quickstart.toml", "--run-dir", str(run_dir), *FAST,
                      "--set", "discriminator.regularizer.name=sn"])  # switched to sr below
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(p.name for p in (run_dir / "samples").glob("*.png")) == \
        ["iter_0000002.png", "iter_0000004.png"]
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if r["event"] == "eval"]
    assert [r["iteration"] for r in evals] == [2, 4]
    assert 0 <= evals[-1]["modes.modes"] <= 1000 and "digits_fid.digits_fid" in evals[-1]
    assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    assert (run_dir / "recipe.toml").is_file() and (run_dir / "plugins.json").is_file()
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "iter_0000004"
    assert (run_dir / "checkpoints" / "best" / "state.json").is_file()
    protocols = [json.loads(line) for line in (run_dir / "evaluations.jsonl").read_text().splitlines()]
    assert {p["metric"] for p in protocols} == {"modes", "digits_fid"}

    import numpy as np
    spectra = np.load(run_dir / "spectra.npy")
    assert len(spectra) == 3  # iterations 0, 2, 4
    assert (run_dir / "plots" / "mass_and_quality.png").is_file()  # drawn at the end of the run
    plots = subprocess.run([sys.executable, "-m", "core.plot", str(run_dir), "--out",
                            str(tmp_path / "plots")], cwd=REPO, capture_output=True, text=True,
                           timeout=300)
    assert plots.returncode == 0, plots.stderr[-2000:]
    assert len(list((tmp_path / "plots").glob("*.png"))) >= 3

    # resume with more iterations and a switched regularizer (SN state carries over)
    result = run_cli(["--resume", str(run_dir), "--set", "train.iterations=6",
                      "--set", "discriminator.regularizer.name=sr_dynamic"])
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resuming" in result.stdout and "iteration 4" in result.stdout
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "iter_0000006"
    assert "sr_dynamic" in (run_dir / "recipe.toml").read_text()
    assert list(run_dir.glob("recipe.before-*.toml"))

    evaluate = subprocess.run(
        [sys.executable, "-m", "core.eval", str(run_dir), "--metrics", "modes",
         "--num-samples", "100", "--no-progress"], cwd=REPO, capture_output=True, text=True,
        timeout=300)
    assert evaluate.returncode == 0, evaluate.stderr[-3000:]
    assert "modes" in evaluate.stdout and "iter_0000006" in evaluate.stdout


def test_nan_learning_rate_stops_with_exit_1_and_a_message(tmp_path):
    result = run_cli(["zoo/quickstart.toml", "--run-dir", str(tmp_path / "run"), *FAST,
                      "--set", "train.lr_d=1e38", "--set", "train.lr_g=1e38"])
    assert result.returncode == 1
    assert "non-finite loss at iteration" in result.stderr and "Traceback" not in result.stderr


def test_missing_dataset_exits_2_with_where_to_put_it(tmp_path):
    result = run_cli(["zoo/quickstart.toml", "--run-dir", str(tmp_path / "run"),
                      "--set", "dataset.name=cifar10", "--set", "dataset.download=false",
                      "--set", f"data_root={tmp_path / 'data'}"])
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr and "cifar10" in result.stderr


def test_imagenet_recipe_without_imagenet_exits_2_naming_folder_layout_and_prepare(tmp_path):
    result = run_cli(["zoo/imagenet_E2048-64.toml", "--run-dir", str(tmp_path / "run"),
                      "--set", "architecture.ch=4", "--set", "architecture.g_ch=4",
                      "--set", f"data_root={tmp_path / 'data'}"])
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    assert str(tmp_path / "data" / "imagenet" / "train") in result.stderr
    assert "n01440764" in result.stderr and "python -m core.prepare imagenet" in result.stderr
    assert not (tmp_path / "run").exists()  # nothing written for a run that cannot start
