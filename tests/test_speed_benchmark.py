"""benchmarks/speed.py keeps working: its loop measurements run on a small batch, print one line
each, and leave the speed-up switches as they found them."""

from __future__ import annotations

import importlib.util
import re

import pytest

from conftest import REPO


@pytest.fixture(scope="module")
def speed():
    spec = importlib.util.spec_from_file_location("bench_speed", REPO / "benchmarks" / "speed.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_loop_measurements_print_their_ratios(speed, capsys):
    import core.train
    import plugins.architectures.blocks as blocks

    assert speed.main(["--only", "iteration", "g_shortcut", "ema", "--repeats", "1", "--steps",
                       "1", "--batch", "4", "--cpu"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith("device cpu") and len(lines) == 4
    assert lines[3].startswith("ema: one EMA update / one G step") and "%" in lines[3]
    assert lines[1].startswith("g_shortcut:") and lines[2].startswith("iteration:")
    ratios = [float(r) for r in re.findall(r"(\d+\.\d+)x", lines[2])]
    assert len(ratios) == 3 and all(r > 0 for r in ratios)
    assert core.train._FREEZE_D_IN_G_STEP and blocks._SHORTCUT_CONV_FIRST



def test_overhead_prints_the_trainer_over_the_bare_loop(speed, capsys):
    assert speed.main(["--only", "overhead", "--repeats", "1", "--steps", "1", "--batch", "4",
                       "--cpu"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith("device cpu") and len(lines) == 2
    assert lines[1].startswith("overhead: quickstart model (resnet32 ch ")
    assert "), batch 4, n_critic 5, Trainer / bare loop: " in lines[1]
    ratios = [float(r) for r in re.findall(r"(\d+\.\d+)x", lines[1])]
    assert len(ratios) == 2 and all(r > 0 for r in ratios)  # Trainer / bare, control
    assert "control, bare loop / a second bare loop: " in lines[1]
    assert "median of 3)" in lines[1]  # 3 x --repeats alternations by default
    assert "initial weights identical" in lines[1]
