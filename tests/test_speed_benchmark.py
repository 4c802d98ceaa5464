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

    assert speed.main(["--only", "iteration", "g_shortcut", "d_pooling", "ema", "--repeats",
                       "1", "--steps", "1", "--batch", "4", "--cpu"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith("device cpu") and len(lines) == 5
    assert lines[4].startswith("ema: one EMA update / one G step") and "%" in lines[4]
    assert lines[1].startswith("g_shortcut:") and lines[2].startswith("iteration:")
    assert "speed-up of the issue's three " in lines[2] and ", of all " in lines[2]
    ratios = [float(r) for r in re.findall(r"(\d+\.\d+)x", lines[2])]
    assert len(ratios) == 3 and all(r > 0 for r in ratios)
    assert lines[3].startswith("d_pooling: quickstart D") and re.search(r"\d\.\d+x", lines[3])
    assert core.train._FREEZE_D_IN_G_STEP and blocks._SHORTCUT_CONV_FIRST and blocks._POOL_FOLDED



def test_overhead_prints_the_trainer_over_the_bare_loop(speed, capsys):
    assert speed.main(["--only", "overhead", "--repeats", "1", "--steps", "1", "--batch", "4",
                       "--cpu"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith("device cpu") and len(lines) == 2
    assert lines[1].startswith("overhead: quickstart model (resnet32 ch ")
    assert "), batch 4, n_critic 5, Trainer / bare loop: " in lines[1]
    ratios = [float(r) for r in re.findall(r"(\d+\.\d+)x", lines[1])]
    # Trainer / bare, control, and the fixed cost at batch 2 as a share of the iteration
    assert len(ratios) == 3 and all(r > 0 for r in ratios)
    assert re.search(r"fixed cost at batch 2, Trainer - bare loop: -?\d+\.\d+ ms", lines[1])
    assert "control, bare loop / a second bare loop: " in lines[1]
    assert "median of 3)" in lines[1]  # 3 x --repeats alternations by default
    assert "both loops drive the same networks and optimizers" in lines[1]


def test_rotating_times_runs_each_once_per_repeat_in_every_place():
    from benchmarks.timing import rotating_times

    calls: list[str] = []
    fns = {name: (lambda name=name: calls.append(name)) for name in "abc"}
    seconds = rotating_times(fns, 6)
    assert {name: len(times) for name, times in seconds.items()} == {"a": 6, "b": 6, "c": 6}
    orders = ["".join(calls[i:i + 3]) for i in range(0, 18, 3)]
    assert orders == ["abc", "bca", "cab", "cba", "acb", "bac"]
    for name in "abc":  # each name runs first, second and third equally often
        assert sorted(order.index(name) for order in orders) == [0, 0, 1, 1, 2, 2]


def test_bare_loop_can_drive_the_trainers_networks(speed, tmp_path):
    import argparse

    import torch

    from benchmarks.gpu import BareLoop

    args = argparse.Namespace(batch=4)
    recipe, trainer = speed.loop_trainer(args, torch.device("cpu"), str(tmp_path))
    bare = BareLoop(recipe, trainer.dataset, trainer.acc.device, trainer)
    assert bare.G is trainer.unwrapped(trainer.G) and bare.D is trainer.unwrapped(trainer.D)
    assert bare.opt_d is trainer.opt_d.optimizer and bare.opt_g is trainer.opt_g.optimizer
    before = {k: v.clone() for k, v in trainer.unwrapped(trainer.G).state_dict().items()}
    bare.iteration()  # trains the Trainer's G
    after = trainer.unwrapped(trainer.G).state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)
    trainer.log.close()
