"""Real 2-process DDP on the CPU (gloo): identical replicas, and launches that exit 0 reliably."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO
from core.testing.ddp import free_port
from test_training import assert_trained_alike, no_batch_stats_arch, sgd_optimizer  # noqa: F401

pytestmark = pytest.mark.slow

SMALL = ["dataset.num_samples=256", "architecture.ch=8", "architecture.g_ch=8",
         "train.batch_size=8", "train.n_critic=2", "train.cpu=true", "log.progress=false",
         "log.sample_every=0", "checkpoint.every=0", "eval.every=0"]


def env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "1", "PYTHONUNBUFFERED": "1"}


def torchrun(args: list[str], timeout: int = 300, sgd: bool = False) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--master_addr", "127.0.0.1", "--master_port", str(free_port()), *args]
    return subprocess.run(cmd, cwd=REPO, env={**env(), "SPECREG_TEST_SGD": "1" if sgd else "0"},
                          capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("regularizer, extra", [
    ("sn", []), ("sr_static", []),
    # issue 15: compiled (dynamo + AOT autograd, no code generation) and channels-last networks
    ("sr_static", ["train.compile=true", "train.compile_backend=aot_eager",
                   "train.channels_last=true", "train.micro_batch_size=2",
                   "train.iterations=2"])],
    ids=["sn", "sr_static", "sr_static-compiled-channels_last-accumulated"])
def test_two_processes_end_with_identical_parameters_and_buffers(tmp_path, regularizer, extra):
    overrides = [*SMALL, "train.iterations=3", f"discriminator.regularizer.name={regularizer}",
                 *extra]
    if regularizer == "sr_static":
        overrides.append("discriminator.regularizer.every=1")
    result = torchrun(["tests/ddp_worker.py", "zoo/quickstart.toml", str(tmp_path), *overrides])
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    rank0 = load_file(str(tmp_path / "rank0.safetensors"))
    rank1 = load_file(str(tmp_path / "rank1.safetensors"))
    assert rank0.keys() == rank1.keys()
    compared = 0
    for name in rank0:
        if "running_" in name or "num_batches_tracked" in name:
            continue  # G's BatchNorm statistics are per process (broadcast from rank 0 each forward)
        assert torch.equal(rank0[name], rank1[name]), name
        compared += 1
    assert any(k.endswith("._u") for k in rank0) and compared > 20


def test_accelerate_launch_multi_gpu_on_cpu_runs_two_processes_and_exits_0(tmp_path):
    for attempt in range(2):  # twice: a flaky exit path would show up
        run_dir = tmp_path / f"run{attempt}"
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes",
               "2", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "--main_process_port", str(free_port()), "-m", "core.run", "zoo/quickstart.toml",
               "--run-dir", str(run_dir),
               *[x for kv in SMALL + ["train.iterations=2", "checkpoint.every=1"]
                 for x in ("--set", kv)]]
        result = subprocess.run(cmd, cwd=REPO, env=env(), capture_output=True, text=True,
                                timeout=300)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        state = (run_dir / "checkpoints" / "iter_0000002" / "state.json").read_text()
        assert '"processes": 2' in state
        assert (run_dir / "checkpoints" / "iter_0000002" / "rng_rank1.safetensors").is_file()


def test_ddp_with_accumulation_equals_one_big_batch_in_one_process(tmp_path, monkeypatch, no_batch_stats_arch):
    """2 processes x 2 micro-batches of 4 == 1 process with the global batch of 16 at once."""
    from core.recipe import load_recipe
    from core.train import Trainer, build_trainer, make_accelerator
    from test_training import state_of

    overrides = [*SMALL, "train.iterations=3", f"architecture.name={no_batch_stats_arch}",
                 "dataset.resolution=32", "train.batch_size=16", "discriminator.regularizer.name=sr_static",
                 "discriminator.regularizer.every=1"]
    recipe = load_recipe(REPO / "zoo" / "quickstart.toml", overrides)
    monkeypatch.setattr(Trainer, "build_optimizer", sgd_optimizer)  # see sgd_optimizer
    start = state_of(build_trainer(recipe, tmp_path / "init", make_accelerator(recipe)))
    single = build_trainer(recipe, tmp_path / "single", make_accelerator(recipe))
    single.fit()
    reference = state_of(single)
    result = torchrun(["tests/ddp_worker.py", "zoo/quickstart.toml", str(tmp_path),
                       *overrides, "train.micro_batch_size=4"], sgd=True)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    for rank in (0, 1):  # float32's summation order: the rule of the one-process golden test
        assert_trained_alike(load_file(str(tmp_path / f"rank{rank}.safetensors")), reference,
                             start)


def test_ddp_with_batchnorm_g_equals_the_same_micro_batches_in_one_process(tmp_path, monkeypatch):
    """Issue 11.1 with BatchNorm: a conditional-BN G with sn, sr_static on D, n_critic = 2.
    2 processes x 2 micro-batches of 4 == 1 process x 4 micro-batches of 4 (the documented
    invariant: BatchNorm normalizes each micro-batch; power iteration and running statistics
    step once per optimizer step, as DDP's broadcast of process 0's buffers)."""
    from core.recipe import load_recipe
    from core.train import Trainer, build_trainer, make_accelerator
    from test_training import state_of

    overrides = [*SMALL, "train.iterations=3", "architecture.num_classes=1000",
                 "train.batch_size=16", "train.micro_batch_size=4",
                 "generator.regularizer.name=sn", "discriminator.regularizer.name=sr_static",
                 "discriminator.regularizer.every=1"]
    recipe = load_recipe(REPO / "zoo" / "quickstart.toml", overrides)
    monkeypatch.setattr(Trainer, "build_optimizer", sgd_optimizer)  # see sgd_optimizer
    start = state_of(build_trainer(recipe, tmp_path / "init", make_accelerator(recipe)))
    single = build_trainer(recipe, tmp_path / "single", make_accelerator(recipe))
    assert single.plan.accumulation == 4
    single.fit()
    reference = state_of(single)
    assert any("running_mean" in k for k in reference) and \
        any(k.startswith("generator.") and k.endswith("._u") for k in reference)
    result = torchrun(["tests/ddp_worker.py", "zoo/quickstart.toml", str(tmp_path), *overrides],
                      sgd=True)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    # BatchNorm's normalizations and zero-gradient biases: assert_trained_alike's two floors
    floors = {"ulps": 16, "zero_gradient_floor": 1e-6}
    assert_trained_alike(load_file(str(tmp_path / "rank0.safetensors")), reference, start,
                         **floors)
    # rank 1's own BatchNorm statistics are overwritten by rank 0's at each forward
    assert_trained_alike(load_file(str(tmp_path / "rank1.safetensors")), reference, start,
                         skip=lambda n: "running_" in n or "num_batches_tracked" in n, **floors)
