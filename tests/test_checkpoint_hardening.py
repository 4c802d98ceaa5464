"""Damaged checkpoints, full disks, read-only folders, leftovers of killed writes.

A checkpoint carries a manifest (size + sha256 of every file); a damaged file gives one line naming
it and the checkpoint to fall back to, and resuming from ``latest`` takes the newest checkpoint
that verifies. A write that fails for want of space or permission removes what it half wrote and
says so in one line; what killed writes left behind is removed at the next start. The full-disk and
read-only cases run on a real tmpfs where the tests may mount one (root), and on an OSError
injected at the file-write boundary otherwise.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
import socket
import struct
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import run_cli
from core import checkpoint as ckpt
from core.errors import SpecregError
from core.recipe import load_recipe
from core.run_folder import LOCK_FILE
from core.train import build_trainer, make_accelerator

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
iterations = 6
batch_size = 8
n_critic = 1
cpu = true
[checkpoint]
every = 3
keep = 5
[log]
every = 1
sample_every = 0
grid_size = 4
progress = false
"""

LATEST_NAME, EARLIER_NAME = ckpt.checkpoint_name(6), ckpt.checkpoint_name(3)


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A finished 6-iteration run with checkpoints at 3 and 6 (copied by each test that
    changes it)."""
    root = tmp_path_factory.mktemp("trained")
    recipe_path = root / "recipe.toml"
    recipe_path.write_text(RECIPE)
    recipe = load_recipe(recipe_path)
    trainer = build_trainer(recipe, root / "run", make_accelerator(recipe))
    trainer.fit()
    shutil.copy(recipe_path, root / "run" / "recipe.toml")
    return root / "run"


@pytest.fixture
def run(trained, tmp_path) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(trained, copy)
    return copy


def trainer_for(run_dir: Path, *overrides: str):
    recipe = load_recipe(run_dir / "recipe.toml", list(overrides))
    return build_trainer(recipe, run_dir, make_accelerator(recipe))


def weights_of(trainer) -> dict[str, torch.Tensor]:
    return {f"{key}.{name}": value for key, model in trainer.models.items()
            for name, value in trainer.unwrapped(model).state_dict().items()}


# ---------------------------------------------------------------------------------------------
# The manifest
# ---------------------------------------------------------------------------------------------


def test_every_file_of_a_checkpoint_is_in_its_manifest_with_size_and_sha256(trained):
    folder = trained / "checkpoints" / LATEST_NAME
    manifest = json.loads((folder / ckpt.MANIFEST).read_text())
    assert manifest["format"] == 1
    on_disk = {p.name for p in folder.iterdir()} - {ckpt.MANIFEST}
    assert set(manifest["files"]) == on_disk == {
        "models.safetensors", "optimizers.pt", "state.json", "rng_rank0.safetensors",
        "rng_rank0.json"}
    for name, entry in manifest["files"].items():
        data = (folder / name).read_bytes()
        assert entry == {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    assert ckpt.verify_checkpoint(folder) == []
    assert not any(p.name.startswith(".") for p in (trained / "checkpoints").iterdir())


# ---------------------------------------------------------------------------------------------
# Damaged checkpoints: one line naming the file and the fallback; --resume falls back
# ---------------------------------------------------------------------------------------------


def _flip_last_data_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x01  # in the last tensor's data: the file still parses, a weight changed
    path.write_bytes(bytes(data))


def _flip_in_a_tensor_of_a_torch_file(path: Path) -> None:
    """One bit of the largest member of torch's zip format (a tensor's storage), not of the
    central directory: the file still opens."""
    with zipfile.ZipFile(path) as archive:
        member = max(archive.infolist(), key=lambda info: info.file_size)
    data = bytearray(path.read_bytes())
    name_length, extra_length = struct.unpack("<HH", data[member.header_offset + 26:
                                                          member.header_offset + 30])
    start = member.header_offset + 30 + name_length + extra_length
    data[start + member.file_size // 2] ^= 0x01
    path.write_bytes(bytes(data))


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


DAMAGE = {
    "flipped bit in the weights": ("models.safetensors", _flip_last_data_byte,
                                   "contents differ from the manifest's sha256"),
    "truncated weights": ("models.safetensors", _truncate, "bytes, the manifest says"),
    "garbled weights": ("models.safetensors",
                        lambda p: p.write_bytes(b"\xff" * p.stat().st_size), "sha256"),
    "truncated optimizer state": ("optimizers.pt", _truncate, "bytes, the manifest says"),
    "flipped bit in the optimizer state": ("optimizers.pt", _flip_in_a_tensor_of_a_torch_file,
                                           "sha256"),
    "broken state JSON": ("state.json", lambda p: p.write_bytes(b"(" + p.read_bytes()[1:]),
                          "sha256"),
    "cut state JSON": ("state.json", lambda p: p.write_text('{"iteration": 6,'),
                       "bytes, the manifest says"),
    "missing weights": ("models.safetensors", Path.unlink, "missing"),
    "missing random state": ("rng_rank0.json", Path.unlink, "missing"),
    "garbled manifest": ("manifest.json", lambda p: p.write_text("{[nonsense"),
                         "unreadable manifest"),
}


@pytest.mark.parametrize("case", list(DAMAGE))
def test_a_damaged_latest_checkpoint_is_skipped_and_named_and_the_earlier_one_resumes(
        run, case):
    file, damage, reason = DAMAGE[case]
    damaged = run / "checkpoints" / LATEST_NAME
    damage(damaged / file)

    notes: list[str] = []
    chosen = ckpt.resolve_checkpoint(run, notes=notes)
    assert chosen.name == EARLIER_NAME
    assert len(notes) == 1 and notes[0].startswith(f"skipped {LATEST_NAME}: {file}: ")
    assert reason in notes[0]

    # asked for by name (core.eval --checkpoint, or any direct load): one line, the file and
    # the checkpoint to fall back to
    with pytest.raises(ckpt.DamagedCheckpointError) as info:
        ckpt.resolve_checkpoint(run, LATEST_NAME)
    message = str(info.value)
    assert "\n" not in message and info.value.exit_code == 2
    assert message.startswith(f"{damaged / file}: ")
    assert reason in message
    fallback = run / "checkpoints" / EARLIER_NAME
    assert f"the newest checkpoint of this run that verifies is {fallback}" in message


@pytest.mark.parametrize("case", ["flipped bit in the weights", "truncated optimizer state",
                                  "broken state JSON", "missing random state"])
def test_loading_a_damaged_checkpoint_directly_raises_the_same_one_line_error(run, case):
    """Trainer.resume on a damaged folder (what the loop calls): nothing is loaded silently."""
    file, damage, reason = DAMAGE[case]
    damaged = run / "checkpoints" / LATEST_NAME
    damage(damaged / file)
    trainer = trainer_for(run)
    with pytest.raises(ckpt.DamagedCheckpointError) as info:
        trainer.resume(damaged)
    assert info.value.file == damaged / file and reason in str(info.value)
    assert info.value.fallback == run / "checkpoints" / EARLIER_NAME


def test_resuming_from_the_fallback_reproduces_the_uninterrupted_run(run, trained):
    _flip_last_data_byte(run / "checkpoints" / LATEST_NAME / "models.safetensors")
    trainer = trainer_for(run)
    trainer.resume(ckpt.resolve_checkpoint(run, notes=[]))
    assert trainer.iteration == 3
    trainer.fit()  # iterations 4..6 again: the same weights as the intact iteration 6
    reference = load_file(str(trained / "checkpoints" / LATEST_NAME / "models.safetensors"))
    resumed = weights_of(trainer)
    assert reference.keys() == resumed.keys()
    assert all(torch.equal(reference[k], resumed[k]) for k in reference)
    assert ckpt.verify_checkpoint(run / "checkpoints" / LATEST_NAME) == []  # rewritten whole


def test_when_no_checkpoint_verifies_the_error_lists_each_one_and_why(run):
    _truncate(run / "checkpoints" / LATEST_NAME / "models.safetensors")
    (run / "checkpoints" / EARLIER_NAME / "state.json").unlink()
    with pytest.raises(ckpt.CheckpointError) as info:
        ckpt.resolve_checkpoint(run)
    message = str(info.value)
    assert "\n" not in message and "no checkpoint under" in message and "verifies" in message
    assert f"skipped {LATEST_NAME}: models.safetensors: " in message
    assert f"skipped {EARLIER_NAME}: state.json: missing" in message


@pytest.mark.parametrize("pointer", [b"iter_0009999\n", b"../../outside\n", b"OUTSIDE\n", b"\n",
                                     b"..\n", b"\xff\xfe not UTF-8"])
def test_a_latest_naming_nothing_or_outside_the_folder_is_ignored_with_a_note(
        run, tmp_path, pointer):
    outside = tmp_path / "outside"  # a complete, verifying checkpoint outside the run
    shutil.copytree(run / "checkpoints" / EARLIER_NAME, outside)
    (run / "checkpoints" / "latest").write_bytes(pointer.replace(b"OUTSIDE", bytes(outside)))
    notes: list[str] = []
    chosen = ckpt.resolve_checkpoint(run, notes=notes)
    assert chosen == run / "checkpoints" / LATEST_NAME  # the newest in the folder, never outside
    assert len(notes) == 1 and "not a checkpoint folder in" in notes[0] and "ignored" in notes[0]


def test_a_latest_that_is_a_symlink_out_of_the_folder_is_not_followed(run, tmp_path):
    outside = tmp_path / "elsewhere"
    shutil.copytree(run / "checkpoints" / EARLIER_NAME, outside)
    (run / "checkpoints" / "iter_0000009").symlink_to(outside, target_is_directory=True)
    (run / "checkpoints" / "latest").write_text("iter_0000009\n")
    notes: list[str] = []
    assert ckpt.resolve_checkpoint(run, notes=notes) == run / "checkpoints" / LATEST_NAME
    assert "ignored" in notes[0]


def test_weights_of_another_width_name_the_file_and_the_tensor(run):
    trainer = trainer_for(run, "architecture.ch=16")
    with pytest.raises(ckpt.CheckpointError) as info:
        trainer.resume(run / "checkpoints" / LATEST_NAME)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"{run / 'checkpoints' / LATEST_NAME / 'models.safetensors'}: ")
    assert re.search(r"the discriminator's \S+ is \[8(, 3, 3, 3)?\] there, \[16(, 3, 3, 3)?\] in "
                     r"the recipe's network", message), message


def test_checkpoints_without_a_manifest_still_load_with_a_note_and_their_structure_checked(run):
    for name in (EARLIER_NAME, LATEST_NAME):  # as an older specreg wrote them
        (run / "checkpoints" / name / ckpt.MANIFEST).unlink()
    notes: list[str] = []
    chosen = ckpt.resolve_checkpoint(run, notes=notes)
    assert chosen.name == LATEST_NAME
    assert notes == [f"{LATEST_NAME} has no manifest.json (written by an older specreg): its "
                     f"files' structure was checked, their contents cannot be checksummed"]
    trainer = trainer_for(run)
    trainer.resume(chosen)
    assert trainer.iteration == 6
    # without checksums, what the formats themselves detect is still detected: a truncated
    # safetensors file, a zip member's CRC-32 in torch's optimizer file
    _flip_in_a_tensor_of_a_torch_file(run / "checkpoints" / LATEST_NAME / "optimizers.pt")
    _truncate(run / "checkpoints" / EARLIER_NAME / "models.safetensors")
    with pytest.raises(ckpt.CheckpointError) as info:
        ckpt.resolve_checkpoint(run)
    assert "optimizers.pt: damaged (CRC mismatch" in str(info.value)
    assert "models.safetensors: not a readable safetensors file" in str(info.value)


@pytest.mark.slow
def test_the_command_line_resumes_from_the_newest_checkpoint_that_verifies(run):
    _flip_last_data_byte(run / "checkpoints" / LATEST_NAME / "models.safetensors")
    result = run_cli(["--resume", str(run), "--set", "train.iterations=7"])
    assert result.returncode == 0, result.stderr[-3000:]
    assert (f"specreg: note: skipped {LATEST_NAME}: models.safetensors: contents differ from "
            f"the manifest's sha256 (damaged)") in result.stderr
    assert f"from {EARLIER_NAME} (iteration 3)" in result.stdout
    assert (run / "checkpoints" / "latest").read_text().strip() == ckpt.checkpoint_name(7)

    # nothing verifies: one line, exit 2, no traceback
    for name in (EARLIER_NAME, LATEST_NAME, ckpt.checkpoint_name(7)):
        _truncate(run / "checkpoints" / name / "optimizers.pt")
    result = run_cli(["--resume", str(run)])
    assert result.returncode == 2 and "Traceback" not in result.stderr
    line, = result.stderr.strip().splitlines()
    assert line.startswith(f"specreg: error: {run}: no checkpoint under")
    assert "optimizers.pt" in line


@pytest.mark.slow
def test_evaluating_a_damaged_checkpoint_names_the_file_and_the_fallback(run):
    damaged = run / "checkpoints" / LATEST_NAME
    _flip_last_data_byte(damaged / "models.safetensors")
    result = subprocess.run(
        [sys.executable, "-m", "core.eval", str(run), "--checkpoint", LATEST_NAME],
        capture_output=True, text=True, timeout=600,
        env={**os.environ, "OMP_NUM_THREADS": "1"}, cwd=Path(__file__).resolve().parents[1])
    assert result.returncode == 2 and "Traceback" not in result.stderr
    line, = result.stderr.strip().splitlines()
    assert line == (f"specreg: error: {damaged / 'models.safetensors'}: contents differ from the "
                    f"manifest's sha256 (damaged); checkpoint {LATEST_NAME} cannot be loaded (the "
                    f"newest checkpoint of this run that verifies is "
                    f"{run / 'checkpoints' / EARLIER_NAME})")


# ---------------------------------------------------------------------------------------------
# Full disk, read-only folder: the half-written checkpoint removed, one line
# ---------------------------------------------------------------------------------------------


class Tmpfs:
    """A small tmpfs mounted on a folder (needs root); ``remount`` changes its size or makes it
    read-only."""

    def __init__(self, path: Path, size: str) -> None:
        self.path = path
        path.mkdir(parents=True, exist_ok=True)
        result = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                                capture_output=True, text=True)
        if result.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here ({result.stderr.strip() or 'not root'}); the "
                        f"injected-failure tests cover the same code")

    def remount(self, options: str) -> None:
        subprocess.run(["mount", "-o", f"remount,{options}", str(self.path)], check=True)

    def free(self) -> int:
        return shutil.disk_usage(self.path).free

    def unmount(self) -> None:
        subprocess.run(["umount", "-l", str(self.path)], check=False)


@pytest.fixture
def tmpfs(tmp_path):
    mounted: list[Tmpfs] = []

    def mount(size: str) -> Tmpfs:
        mounted.append(Tmpfs(tmp_path / f"tmpfs{len(mounted)}", size))
        return mounted[-1]

    yield mount
    for fs in mounted:
        fs.unmount()


def _leftovers(run_dir: Path) -> list[str]:
    """Hidden files a failed write left behind (the run's lock file is meant to stay)."""
    return sorted(p.name for folder in (run_dir, run_dir / "checkpoints") if folder.is_dir()
                  for p in folder.iterdir() if p.name.startswith(".") and p.name != LOCK_FILE)


def _assert_one_line_storage_error(info, what: str) -> str:
    message = str(info.value)
    assert isinstance(info.value, SpecregError) and info.value.exit_code == 2
    assert "\n" not in message and what in message
    return message


def test_a_full_disk_removes_the_half_written_checkpoint_and_resume_works(trained, tmpfs):
    fs = tmpfs("16m")
    run_dir = fs.path / "run"
    shutil.copytree(trained, run_dir)
    trainer = trainer_for(run_dir)
    trainer.resume(ckpt.resolve_checkpoint(run_dir, notes=[]))
    filler = fs.path / "filler"  # the disk fills up: 64 KiB left, a checkpoint needs ~0.5 MiB
    with open(filler, "wb") as fh:
        fh.write(b"\0" * (fs.free() - 64 * 1024))
    free_before = fs.free()
    trainer.iteration = 9
    with pytest.raises(ckpt.StorageError) as info:
        trainer.save_checkpoint()
    message = _assert_one_line_storage_error(info, "No space left on device")
    root = run_dir / "checkpoints"
    assert message.startswith(f"cannot write checkpoint iter_0000009 into {root}")
    assert "the half-written checkpoint was removed" in message
    assert f"the last complete checkpoint is {run_dir / 'checkpoints' / LATEST_NAME}" in message
    assert _leftovers(run_dir) == []
    assert fs.free() >= free_before - 8192  # the space is given back (a log line may be added)
    assert ckpt.resolve_checkpoint(run_dir, notes=[]).name == LATEST_NAME
    filler.unlink()
    assert trainer.save_checkpoint().name == "iter_0000009"  # with space again, it works
    assert ckpt.resolve_checkpoint(run_dir, notes=[]).name == "iter_0000009"


def test_a_read_only_run_folder_gives_one_line(trained, tmpfs):
    fs = tmpfs("16m")
    run_dir = fs.path / "run"
    shutil.copytree(trained, run_dir)
    trainer = trainer_for(run_dir)
    trainer.log.close()  # a folder with files open for writing cannot be made read-only
    fs.remount("ro")
    with pytest.raises(ckpt.StorageError) as info:
        trainer.save_checkpoint()
    _assert_one_line_storage_error(info, "Read-only file system")
    with pytest.raises(ckpt.StorageError) as info:
        ckpt.write_atomic_text(run_dir / "recipe.toml", "x = 1\n")
    _assert_one_line_storage_error(info, f"cannot write {run_dir / 'recipe.toml'}: Read-only")
    for folder in (run_dir, run_dir / "new"):  # what a run checks before it writes anything
        with pytest.raises(ckpt.StorageError) as info:
            ckpt.ensure_writable(folder)
        assert str(info.value) == f"cannot write into the run folder {folder}: Read-only file system"
    fs.remount("rw")
    ckpt.ensure_writable(run_dir / "new")
    assert _leftovers(run_dir) == []


@pytest.mark.slow
def test_the_command_line_stops_on_a_full_disk_in_one_line_and_resumes_later(trained, tmpfs):
    used = sum(p.stat().st_size for p in trained.rglob("*") if p.is_file())
    fs = tmpfs(f"{used // 1024 + 256}k")  # the run fits, with room for logs, not a checkpoint
    run_dir = fs.path / "run"
    shutil.copytree(trained, run_dir)
    result = run_cli(["--resume", str(run_dir), "--set", "train.iterations=9"])
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("specreg: error: cannot write checkpoint iter_0000009 into ")
    assert "No space left on device" in last and "resume with --resume" in last
    assert _leftovers(run_dir) == []
    fs.remount("size=64m")
    result = run_cli(["--resume", str(run_dir), "--set", "train.iterations=9"])
    assert result.returncode == 0, result.stderr[-3000:]
    assert ckpt.resolve_checkpoint(run_dir, notes=[]).name == "iter_0000009"


@pytest.mark.slow
def test_the_command_line_in_a_read_only_run_folder_says_so_in_one_line(trained, tmpfs):
    fs = tmpfs("16m")
    run_dir = fs.path / "run"
    shutil.copytree(trained, run_dir)
    fs.remount("ro")
    for args in (["--resume", str(run_dir), "--set", "train.iterations=9"],
                 [str(run_dir / "recipe.toml"), "--run-dir", str(fs.path / "new")]):
        result = run_cli(args)
        assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
        line = result.stderr.strip().splitlines()[-1]
        assert line.startswith("specreg: error: cannot write ") and "Read-only file system" in line


def _disk_full_after(monkeypatch, calls: int) -> None:
    """Checkpoint file writes fail with ENOSPC from the ``calls``-th on, after writing half."""
    real, count = ckpt._write_bytes, [0]

    def write(path, data):
        count[0] += 1
        if count[0] >= calls:
            with open(path, "wb") as fh:
                fh.write(data[: len(data) // 2])
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        real(path, data)

    monkeypatch.setattr(ckpt, "_write_bytes", write)


@pytest.mark.parametrize("calls", [1, 2])  # the random state's file, the weights' file
def test_an_injected_full_disk_removes_the_half_written_checkpoint(run, monkeypatch, calls):
    trainer = trainer_for(run)
    trainer.resume(ckpt.resolve_checkpoint(run, notes=[]))
    _disk_full_after(monkeypatch, calls)
    trainer.iteration = 9
    with pytest.raises(ckpt.StorageError) as info:
        trainer.save_checkpoint()
    _assert_one_line_storage_error(info, "No space left on device")
    assert _leftovers(run) == []
    assert (run / "checkpoints" / "latest").read_text().strip() == LATEST_NAME


def test_a_failed_atomic_text_write_leaves_no_temporary_file(tmp_path, monkeypatch):
    target = tmp_path / "recipe.toml"
    target.write_text("old\n")

    def full(src, dst):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(dst))

    monkeypatch.setattr(ckpt.os, "replace", full)
    with pytest.raises(ckpt.StorageError, match="No space left on device"):
        ckpt.write_atomic_text(target, "new\n")
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["recipe.toml"]
    assert target.read_text() == "old\n"


# ---------------------------------------------------------------------------------------------
# Leftovers of killed writes: removed at the next start
# ---------------------------------------------------------------------------------------------


def _dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_leftovers_of_killed_writes_are_removed_at_the_next_start(run):
    checkpoints = run / "checkpoints"
    dead = _dead_pid()
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        stale = [run / f".recipe.toml.tmp{dead}", run / f".plugins.json.tmp{dead}",
                 checkpoints / f".latest.tmp{dead}"]
        for path in stale:
            path.write_text("half")
        busy = run / f".recipe.toml.tmp{live.pid}"  # another process is writing it right now
        busy.write_text("half")
        killed = checkpoints / ".tmp-iter_0000009"  # a checkpoint write killed half-way
        shutil.copytree(checkpoints / LATEST_NAME, killed)
        (killed / "models.safetensors").unlink()
        (killed / ".writer").write_text(f"{socket.gethostname()} {dead}\n")
        writing = checkpoints / ".tmp-iter_0000012"
        writing.mkdir()
        (writing / ".writer").write_text(f"{socket.gethostname()} {live.pid}\n")
        # killed between moving the old "best" aside and moving the new one in
        os.replace(checkpoints / EARLIER_NAME, checkpoints / f".old-{EARLIER_NAME}")

        trainer = trainer_for(run)
        assert sorted(trainer.writer.cleaned) == sorted(
            [*stale, killed, checkpoints / f".old-{EARLIER_NAME}"])
        assert busy.exists() and writing.exists()
        assert set(_leftovers(run)) == {busy.name, writing.name}
        assert ckpt.verify_checkpoint(checkpoints / EARLIER_NAME) == []  # put back, intact
    finally:
        live.kill()
        live.wait()
