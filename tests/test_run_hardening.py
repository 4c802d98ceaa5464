"""Run-level hardening (issue 13): which folder --resume takes and with which recipe, the run
folder's lock, signals, non-finite weights, broken plugins, trimmed logs on resume, --dry-run's
data check, and a kill-and-resume chain that must end bit-identical to an uninterrupted run."""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO, run_cli, write_distribution
from core import checkpoint as ckpt
from core.recipe import load_recipe
from core.run import parse_args, resolve_recipe
from core.run_folder import (LOCK_FILE, RECIPE_FILE, RunFolderLocked, _HELD, has_checkpoint,
                             lock_run_folder, newest_finite_checkpoint, runs_of_recipe,
                             write_run_info)

TINY = """
seed = 1
[run]
output_dir = "{out}"
[dataset]
name = "stacked_digits"
num_samples = 512
[architecture]
name = "resnet32"
ch = 8
g_ch = 8
[discriminator.regularizer]
name = "sn"
[train]
iterations = {iterations}
batch_size = 16
n_critic = 2
lr_g = 1e-3
lr_d = 1e-3
[checkpoint]
every = {every}
keep = 2
[log]
every = 1
sample_every = 0
grid_size = 4
progress = false
[callbacks.spectral]
plots = false
"""


def tiny_recipe(folder: Path, stem: str = "tiny", iterations: int = 6, every: int = 1) -> Path:
    path = folder / f"{stem}.toml"
    path.write_text(TINY.format(out=(folder / "runs").as_posix(), iterations=iterations,
                                every=every))
    return path


def fake_run(runs: Path, name: str, recipe: Path, checkpoint: bool = True,
             recorded: Path | None = None, saved_text: str | None = None) -> Path:
    """A run folder as core.run leaves it (its saved recipe, a checkpoint folder), without
    training: for the tests of which folder --resume takes."""
    folder = runs / name
    (folder / "checkpoints").mkdir(parents=True)
    (folder / RECIPE_FILE).write_text(saved_text if saved_text is not None else recipe.read_text())
    if checkpoint:
        (folder / "checkpoints" / "iter_0000001").mkdir()
    if recorded is not None:
        write_run_info(folder, recorded)
    return folder


# -- 1: --resume takes this recipe's run, never another's ------------------------------------


def test_resume_never_takes_the_run_of_a_recipe_whose_name_extends_this_one(tmp_path):
    plain = tiny_recipe(tmp_path, "imagenet_E512-64")
    sn = tiny_recipe(tmp_path, "imagenet_E512-64_sn")
    runs = tmp_path / "runs"
    mine = fake_run(runs, "imagenet_E512-64-20261201-100000", plain, recorded=plain)
    time.sleep(0.01)
    other = fake_run(runs, "imagenet_E512-64_sn-20261202-100000", sn, recorded=sn)  # newer
    other_text = (other / RECIPE_FILE).read_text()
    assert runs_of_recipe(runs, plain, None) == [mine]
    assert runs_of_recipe(runs, sn, None) == [other]
    recipe, _, resume_dir, _ = resolve_recipe(parse_args([str(plain), "--resume"]))
    assert resume_dir == mine  # the old bare-prefix match took the newer _sn run
    assert (other / RECIPE_FILE).read_text() == other_text


def test_resume_skips_a_folder_without_checkpoint_and_one_of_another_recipe_file(tmp_path):
    recipe = tiny_recipe(tmp_path, "x")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    same_stem = tiny_recipe(elsewhere, "x")
    runs = tmp_path / "runs"
    good = fake_run(runs, "x-20261201-100000", recipe, recorded=recipe)
    time.sleep(0.01)
    fake_run(runs, "x-20261202-100000", recipe, checkpoint=False, recorded=recipe)  # start-up
    time.sleep(0.01)
    fake_run(runs, "x-20261203-100000", recipe, recorded=same_stem)  # elsewhere/x.toml's
    assert runs_of_recipe(runs, recipe, None) == [good]
    assert not has_checkpoint(runs / "x-20261202-100000")
    with pytest.raises(Exception, match="no checkpoint to resume from"):
        resolve_recipe(parse_args(["--resume", str(runs / "x-20261202-100000")]))


# -- resume from the run's saved recipe --------------------------------------------------------


def test_resume_uses_the_saved_recipe_and_lists_what_the_recipe_file_now_says(tmp_path):
    recipe = tiny_recipe(tmp_path, "r", iterations=300)
    saved = TINY.format(out=(tmp_path / "runs").as_posix(), iterations=80, every=1)  # --set 80
    run = fake_run(tmp_path / "runs", "r-20261201-100000", recipe, recorded=recipe,
                   saved_text=saved)
    resumed, _, resume_dir, notes = resolve_recipe(parse_args([str(recipe), "--resume"]))
    assert resume_dir == run and resumed.train.iterations == 80  # not the file's 300
    text = "\n".join(notes)
    assert "train.iterations: run 80" in text and "300" in text and "--set" in text
    # a --set changes it on purpose, and says so; a changed batch size is reported
    resumed, _, _, notes = resolve_recipe(parse_args(
        [str(recipe), "--resume", "--set", "train.iterations=120", "--set", "train.batch_size=8"]))
    assert resumed.train.iterations == 120 and resumed.train.batch_size == 8
    text = "\n".join(notes)
    assert "--set changes train.iterations: 80 -> 120" in text
    assert "--set changes train.batch_size: 16 -> 8" in text and "data order" in text
    # an explicit folder without a recipe: the saved one, no notes
    resumed, _, _, notes = resolve_recipe(parse_args(["--resume", str(run)]))
    assert resumed.train.iterations == 80 and notes == []


# -- 4: the lock on a run folder ---------------------------------------------------------------

HOLD = """
import sys, time
from pathlib import Path
from core.run_folder import lock_run_folder
lock_run_folder(Path(sys.argv[1]))
print("locked", flush=True)
time.sleep(120)
"""


def hold_lock(folder: Path) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(folder)], cwd=REPO,
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    return proc


@pytest.mark.slow  # real command-line runs
def test_a_second_run_into_a_folder_in_use_refuses_naming_the_holder(tmp_path):
    recipe = tiny_recipe(tmp_path)
    run = tmp_path / "run"
    run.mkdir()
    holder = hold_lock(run)
    try:
        with pytest.raises(RunFolderLocked, match=f"pid {holder.pid} on host "):
            lock_run_folder(run)
        result = run_cli([str(recipe), "--run-dir", str(run)])
        assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
        line = result.stderr.strip().splitlines()[-1]
        assert str(run) in line and f"pid {holder.pid}" in line and "in use" in line
        assert not (run / "checkpoints").exists()
    finally:
        holder.kill()
        holder.wait()
    # the holder died (SIGKILL): its lock went with it; the file and its stale pid stay
    assert (run / LOCK_FILE).read_text().split()[1] == str(holder.pid)
    lock_run_folder(run)
    os.close(_HELD.pop(os.path.abspath(run)))


# -- 6: broken third-party plugins -------------------------------------------------------------

DUPLICATE = '''
from core.hookspecs import hookimpl
from core.interfaces import Loss


class Hinge(Loss):
    def discriminator_loss(self, real, fake):
        return (real - fake).mean()

    def generator_loss(self, fake):
        return -fake.mean()


@hookimpl
def register_losses(register):
    register("hinge", Hinge)
'''


def plugin_env(root: Path, strict: bool = False) -> dict:
    env = {"PYTHONPATH": os.pathsep.join([str(root), str(REPO)])}
    env["SPECREG_STRICT_PLUGINS"] = "1" if strict else ""
    return env


@pytest.mark.slow  # real command-line runs
def test_a_duplicate_or_exiting_plugin_is_a_warning_and_the_builtins_keep_working(plugin_path):
    write_distribution(plugin_path, "specreg-dup", "specreg_dup", DUPLICATE)
    write_distribution(plugin_path, "specreg-quitter", "specreg_quitter",
                       "import sys\nsys.exit(3)\n")
    listing = run_cli(["plugins"], env=plugin_env(plugin_path))
    assert listing.returncode == 1, listing.stderr[-2000:]  # listed; 1: a plugin failed
    assert "specreg-dup" in listing.stderr and "duplicate loss name 'hinge'" in listing.stderr
    assert "specreg-quitter" in listing.stderr and "sys.exit(3)" in listing.stderr
    assert "hinge" in listing.stdout and "Traceback" not in listing.stderr
    plan = run_cli(["zoo/quickstart.toml", "--dry-run"], env=plugin_env(plugin_path))
    assert plan.returncode == 0 and "OK" in plan.stdout, plan.stderr[-2000:]  # not blamed on it
    from core.registry import Registry

    registry = Registry()
    registry.load_builtins()
    registry.load_entry_points(strict=False)
    assert registry.losses.providers["hinge"].distribution != "specreg-dup"  # the built-in's
    assert {p.distribution for p in registry.providers if p.error} == \
        {"specreg-dup", "specreg-quitter"}
    strict = run_cli(["plugins"], env=plugin_env(plugin_path, strict=True))
    assert strict.returncode == 2 and "specreg-" in strict.stderr, strict.stderr[-2000:]


# -- 2: non-finite weights ---------------------------------------------------------------------


def test_no_checkpoint_is_written_from_non_finite_weights(tmp_path):
    from core.train import NonFiniteLossError, build_trainer, make_accelerator

    recipe = load_recipe(tiny_recipe(tmp_path, iterations=2))
    run = tmp_path / "run"
    trainer = build_trainer(recipe, run, make_accelerator(recipe), callbacks=[])
    trainer.fit()
    finite = trainer.last_checkpoint
    assert finite.name == "iter_0000002"
    with torch.no_grad():  # what a step with an exploding gradient leaves
        next(trainer.unwrapped(trainer.D).parameters()).view(-1)[0] = float("nan")
    trainer.iteration += 1
    with pytest.raises(NonFiniteLossError, match=f"Last good checkpoint: {re.escape(str(finite))}"):
        trainer._save_finite_checkpoint()
    assert not (run / "checkpoints" / "iter_0000003").exists()
    # a poisoned checkpoint written by older code is passed over by the message's search
    trainer.save_checkpoint()
    assert (run / "checkpoints" / "latest").read_text().strip() == "iter_0000003"
    assert newest_finite_checkpoint(run) == finite


def test_a_deleted_random_state_is_not_reported_as_a_changed_number_of_processes(tmp_path):
    from core.train import build_trainer, make_accelerator

    recipe = load_recipe(tiny_recipe(tmp_path, iterations=1))
    run = tmp_path / "run"
    trainer = build_trainer(recipe, run, make_accelerator(recipe), callbacks=[])
    trainer.fit()
    folder = trainer.last_checkpoint
    for name in ("rng_rank0.safetensors", "rng_rank0.json"):
        (folder / name).unlink()
    ckpt.write_manifest(folder)  # as if written without them
    again = build_trainer(recipe, run, make_accelerator(recipe), callbacks=[])
    notes = again.resume(folder)
    assert any("rng_rank0" in n for n in notes), notes
    assert not any("number of processes changed" in n for n in notes), notes


# -- 9 + papercuts: a real run, a crash's partial lines, a real resume --------------------------


@pytest.mark.slow  # real command-line runs
def test_resume_trims_metrics_and_evaluations_and_plain_progress_in_a_log(tmp_path):
    recipe = tiny_recipe(tmp_path, iterations=4, every=2)
    run = tmp_path / "run"
    result = run_cli([str(recipe), "--run-dir", str(run), "--set", "log.progress=true",
                      "--set", "log.sample_every=4"])
    assert result.returncode == 0, result.stderr[-3000:]
    assert "\r" not in result.stderr and "train 4/4 (100%)" in result.stderr  # not a terminal
    from PIL import Image

    assert Image.open(run / "samples" / "iter_0000004.png").width >= 512  # 4 images of 32 px
    # a crash after iteration 4's checkpoint left records of later iterations and partial lines;
    # resume from iteration 2 (as if iteration 4's checkpoint had not been finished)
    (run / "checkpoints" / "latest").write_text("iter_0000002")
    import shutil

    shutil.rmtree(run / "checkpoints" / "iter_0000004")
    with (run / "metrics.jsonl").open("a") as fh:
        fh.write('{"event": "train", "iteration": 5, "loss_d": 1.0')  # no newline: killed
    with (run / "evaluations.jsonl").open("w") as fh:
        for it in (2, 4):
            fh.write(json.dumps({"metric": "modes", "iteration": it, "values": {"modes": it}}) + "\n")
        fh.write('{"metric": "modes", "iter')
    result = run_cli(["--resume", str(run)])
    assert result.returncode == 0, result.stderr[-3000:]
    assert "from iter_0000002" in result.stdout
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train = [r["iteration"] for r in records if r["event"] == "train"]
    assert train == [1, 2, 3, 4]
    evaluations = [json.loads(line) for line in (run / "evaluations.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in evaluations] == [2]


# -- signals -----------------------------------------------------------------------------------


def _wait_for_iteration(run: Path, proc: subprocess.Popen, at_least: int, timeout: float = 120):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        path = run / "metrics.jsonl"
        if path.is_file() and sum(1 for _ in path.read_text().splitlines()) >= at_least:
            return
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.1)
    raise AssertionError("the run made no progress")


@pytest.mark.slow  # real command-line runs
@pytest.mark.parametrize("signum, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_finishes_the_iteration_saves_and_exits_with_the_shell_code(tmp_path, signum,
                                                                            code):
    recipe = tiny_recipe(tmp_path, iterations=500, every=1000)
    run = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "core.run", str(recipe), "--run-dir", str(run)],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    _wait_for_iteration(run, proc, 2)
    proc.send_signal(signum)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == code, err[-3000:]
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert signal.Signals(signum).name in last and f"resume with --resume {run}" in last
    saved = (run / "checkpoints" / "latest").read_text().strip()
    state = json.loads((run / "checkpoints" / saved / "state.json").read_text())
    assert f"stopped after iteration {state['iteration']} of 500" in last
    logged = [json.loads(line)["iteration"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert max(logged) == state["iteration"]  # the iteration in progress was finished, not lost


# -- --dry-run and missing data ----------------------------------------------------------------


@pytest.mark.slow  # real command-line runs
def test_dry_run_fails_on_missing_data_naming_the_prepare_command(tmp_path):
    args = ["zoo/cifar10_C16-32_sn.toml", "--dry-run", "--set", f"data_root={tmp_path}",
            "--set", "dataset.download=false"]
    result = run_cli(args)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
    line = result.stderr.strip().splitlines()[-1]
    assert "zoo/cifar10_C16-32_sn.toml" in line and str(tmp_path / "cifar10") in line
    assert "python -m core.prepare cifar10" in line and "--ignore-data" in line
    ignored = run_cli([*args, "--ignore-data"])
    assert ignored.returncode == 0 and "data missing" in ignored.stdout, ignored.stderr[-2000:]


# -- the kill-and-resume chain -----------------------------------------------------------------


def _temporaries(run: Path) -> list[Path]:
    pattern = re.compile(r"^\.(tmp-|old-)|^\..+\.tmp\d+$")
    return [p for p in run.rglob("*") if pattern.match(p.name)]


def _latest_name(run: Path) -> str | None:
    try:
        return (run / "checkpoints" / "latest").read_text().strip()
    except OSError:
        return None


def _kill_in_training(run: Path, proc: subprocess.Popen, after: float) -> bool:
    """SIGKILL ``proc`` ``after`` seconds past the first checkpoint it writes (so mid-iteration or
    mid-checkpoint, as it checkpoints every iteration); False if it finished first."""
    before = _latest_name(run)
    while proc.poll() is None and _latest_name(run) == before:
        time.sleep(0.02)
    try:
        proc.wait(timeout=after)
        return False
    except subprocess.TimeoutExpired:
        proc.kill()
        return True


@pytest.mark.slow
def test_killed_at_random_points_and_resumed_ends_bit_identical(tmp_path):
    """SIGKILL a real run 7 times at random moments (start-up, mid-iteration, mid-checkpoint),
    resume each time; the final weights equal an uninterrupted run's, no temporaries are left."""
    iterations = 40
    recipe = tiny_recipe(tmp_path, iterations=iterations, every=1)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    reference = tmp_path / "reference"
    done = run_cli([str(recipe), "--run-dir", str(reference)])
    assert done.returncode == 0, done.stderr[-2000:]
    rng = random.Random(13)
    # start-up kills (random moments of the first seconds) and training kills (a random moment
    # after the attempt's first checkpoint): timed by what the run did, not by this machine's speed
    schedule = ["start-up", "training", "start-up", "training", "training", "start-up", "training"]
    run, kills, resumes = tmp_path / "killed", 0, 0
    for when in [*schedule, "finish"]:
        resume = has_checkpoint(run)
        resumes += resume
        args = ["--resume", str(run)] if resume else [str(recipe), "--run-dir", str(run)]
        proc = subprocess.Popen([sys.executable, "-m", "core.run", *args], cwd=REPO, env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        if when == "start-up":
            try:
                proc.wait(timeout=rng.uniform(0.3, 2.5))
            except subprocess.TimeoutExpired:
                proc.kill()
                kills += 1
        elif when == "training":
            kills += _kill_in_training(run, proc, rng.uniform(0.0, 0.6))
        _, err = proc.communicate(timeout=300)
        if when == "finish":
            assert proc.returncode == 0, err[-3000:]
        else:
            assert proc.returncode == -signal.SIGKILL, (when, err[-3000:])
    assert kills == 7 and resumes >= 5  # every kill landed; all but the first two runs resumed
    final = ckpt.resolve_checkpoint(run, notes=[])
    assert final.name == f"iter_{iterations:07d}"
    want = load_file(str(reference / "checkpoints" / final.name / ckpt.MODELS))
    got = load_file(str(final / ckpt.MODELS))
    assert want.keys() == got.keys()
    for key in want:
        assert torch.equal(want[key], got[key]), key
    assert _temporaries(run) == []


def _workers(launcher: int) -> dict[int, int]:
    """rank -> pid of the training processes under a launcher (read from /proc)."""
    found, todo = {}, [launcher]
    while todo:
        pid = todo.pop()
        try:
            children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        except OSError:
            continue
        for child in map(int, children):
            todo.append(child)
            try:
                environ = Path(f"/proc/{child}/environ").read_bytes().split(b"\0")
                cmdline = Path(f"/proc/{child}/cmdline").read_bytes()
            except OSError:
                continue
            ranks = [e[5:] for e in environ if e.startswith(b"RANK=")]
            if ranks and b"core.run" in cmdline:
                found[int(ranks[0])] = child
    return found


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="reads the process tree in /proc")
def test_under_ddp_a_signal_to_one_process_stops_both_at_the_same_iteration(tmp_path):
    from test_distributed import env as ddp_env
    from test_distributed import free_port

    recipe = tiny_recipe(tmp_path, iterations=500, every=1000)
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes",
           "2", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(free_port()), "-m", "core.run", str(recipe),
           "--run-dir", str(run), "--set", "train.cpu=true", "--set", "train.batch_size=8"]
    proc = subprocess.Popen(cmd, cwd=REPO, env=ddp_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        _wait_for_iteration(run, proc, 3, timeout=240)
        workers = _workers(proc.pid)
        assert sorted(workers) == [0, 1], workers
        os.kill(workers[1], signal.SIGTERM)  # rank 1 only: rank 0 must learn of it
        out, err = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert "SIGTERM received: stopped after iteration" in err, err[-3000:]
    saved = (run / "checkpoints" / "latest").read_text().strip()
    folder = run / "checkpoints" / saved
    state = json.loads((folder / "state.json").read_text())
    assert saved == f"iter_{state['iteration']:07d}" and state["processes"] == 2
    assert (folder / "rng_rank0.safetensors").is_file() and (folder / "rng_rank1.safetensors").is_file()
    assert ckpt.verify_checkpoint(folder) == []
