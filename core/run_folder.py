"""A run folder: the names of its shared files, which folders belong to a recipe, and its lock.

``core.run`` writes the resolved recipe; ``core.eval`` and ``--resume`` read it back. A module of
its own so that neither command imports the other (core has no import cycle).

- A run folder of recipe ``X.toml`` (no ``run.name``) is ``X-YYYYMMDD-HHMMSS`` (optionally
  ``-N`` when two start in one second), and its ``run.json`` records the recipe's path:
  ``--resume`` takes only such folders, never ``X_sn-...`` (:func:`runs_of_recipe`).
- ``RUN/.lock`` is locked (``fcntl.flock``) by the main process of the run training into it, for
  as long as that process lives: a second run into the folder refuses, naming the holder's pid and
  host; the kernel drops the lock of a process that died, so a stale lock never blocks a resume
  (:func:`lock_run_folder`).
"""

from __future__ import annotations

import json
import os
import re
import socket
from pathlib import Path

#: the fully resolved recipe of a run (``RUN/recipe.toml``), written by :mod:`core.run`.
RECIPE_FILE = "recipe.toml"
#: ``{"recipe": the recipe file's absolute path}``, written by :mod:`core.run` at a run's start.
RUN_INFO_FILE = "run.json"
#: the lock file of the process training into the folder (``host pid`` inside).
LOCK_FILE = ".lock"
#: the timestamp :mod:`core.run` appends to a recipe's stem
TIMESTAMP = r"\d{8}-\d{6}(?:-\d+)?"


def run_folder_name_matches(folder_name: str, stem: str) -> bool:
    """Whether ``folder_name`` is ``STEM-<timestamp>`` exactly (``imagenet_E512-64-2026...``
    matches stem ``imagenet_E512-64``; ``imagenet_E512-64_sn-2026...`` does not)."""
    return re.fullmatch(re.escape(stem) + "-" + TIMESTAMP, folder_name) is not None


def recorded_recipe(run_dir: Path) -> str | None:
    """The recipe path ``RUN/run.json`` records, or None (no file, or an older run)."""
    try:
        info = json.loads((Path(run_dir) / RUN_INFO_FILE).read_text())
    except (OSError, ValueError):
        return None
    return info.get("recipe") if isinstance(info, dict) else None


def has_checkpoint(run_dir: Path) -> bool:
    """Whether the folder holds a checkpoint to resume from (a folder left by a run stopped
    during start-up holds none)."""
    root = Path(run_dir) / "checkpoints"
    return root.is_dir() and any(p.is_dir() and p.name.startswith("iter_") for p in root.iterdir())


def runs_of_recipe(output_dir: Path, recipe_path: str | Path, name: str | None) -> list[Path]:
    """The run folders of a recipe that can be resumed, oldest first: ``output_dir/NAME`` for a
    recipe with ``run.name``; else the folders ``STEM-<timestamp>`` whose recorded recipe (if
    any) is this recipe file. Only folders with a checkpoint."""
    output_dir = Path(output_dir)
    if name:
        candidates = [output_dir / name]
    else:
        stem = Path(recipe_path).stem
        candidates = [p for p in output_dir.glob(f"{glob_escape(stem)}-*")
                      if run_folder_name_matches(p.name, stem)]
    wanted = os.path.abspath(recipe_path)
    runs = [p for p in candidates if p.is_dir() and (p / RECIPE_FILE).is_file()
            and has_checkpoint(p) and recorded_recipe(p) in (None, wanted)]
    return sorted(runs, key=lambda p: (p.stat().st_mtime, p.name))


def glob_escape(text: str) -> str:
    return re.sub(r"([*?\[])", r"[\1]", text)


def write_run_info(run_dir: Path, recipe_path: str | Path) -> None:
    """Record the recipe file a run was started from (``--resume`` matches by it)."""
    from core.checkpoint import write_atomic_text

    write_atomic_text(Path(run_dir) / RUN_INFO_FILE,
                      json.dumps({"recipe": os.path.abspath(recipe_path)}, indent=1))


class RunFolderLocked(Exception):
    """Another live process trains into the folder (turned into a user error by the caller)."""

    def __init__(self, run_dir: Path, holder: str) -> None:
        super().__init__(f"{run_dir} is in use by another run ({holder}); wait for it to end, or "
                         f"train into another folder (--run-dir)")
        self.run_dir, self.holder = run_dir, holder


_HELD: dict[str, int] = {}  # run folder -> file descriptor of its lock, for the process lifetime


def lock_run_folder(run_dir: Path) -> None:
    """Lock ``RUN/.lock`` for the rest of this process's life (main process only). Raises
    :class:`RunFolderLocked` naming the holder's pid and host when a live process holds it."""
    import fcntl

    run_dir = Path(run_dir)
    key = os.path.abspath(run_dir)
    if key in _HELD:
        return
    fd = os.open(run_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 200, 0).decode(errors="replace").split()
        os.close(fd)
        who = f"pid {holder[1]} on host {holder[0]}" if len(holder) == 2 else "pid unknown"
        raise RunFolderLocked(run_dir, who) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{socket.gethostname()} {os.getpid()}\n".encode(), 0)
    _HELD[key] = fd  # closed (and the lock released) when the process ends


def is_locked(run_dir: Path) -> bool:
    """Whether a live process holds the folder's lock (:func:`lock_run_folder`); the kernel drops
    a dead process's lock, so a stale ``.lock`` file reads as free."""
    import fcntl

    path = Path(run_dir) / LOCK_FILE
    if not path.is_file():
        return False
    fd = os.open(path, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # closing drops the lock this probe may have taken
    return False


def newest_finite_checkpoint(run_dir: Path) -> Path | None:
    """The newest checkpoint of ``run_dir`` that verifies and whose weights are all finite."""
    import torch
    from safetensors.torch import load_file

    from core import checkpoint as ckpt

    candidates, _ = ckpt._candidates(Path(run_dir) / "checkpoints")  # newest first
    for path in candidates:
        try:
            ckpt.verify_checkpoint(path)
            weights = load_file(str(path / ckpt.MODELS))
        except Exception:  # noqa: BLE001 - a damaged one is not good either
            continue
        if all(bool(torch.isfinite(t).all()) for t in weights.values() if t.is_floating_point()):
            return path
    return None
