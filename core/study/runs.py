"""A study's runs: one run folder per (arm, seed) under the study folder, the ``core.run`` command
that trains it, and its state, which decides what re-running the study does:

- ``finished``: its checkpoint at the recipe's last iteration exists: skipped;
- ``interrupted``: it holds a checkpoint: ``--resume`` continues it (exactly, see ``core.run``);
- ``started``: it was stopped before its first checkpoint: started again from scratch;
- ``new``: no folder yet;
- ``running``: another live process trains into it (its ``.lock`` is held): left alone.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import attrs

from core.run_folder import RECIPE_FILE, has_checkpoint, is_locked
from core.study.spec import LoadedStudy

__all__ = ["StudyRun", "plan_runs", "run_state"]

STATES = ("new", "started", "interrupted", "finished", "running")


@attrs.frozen
class StudyRun:
    """One (arm, seed) of a study."""

    arm: str
    seed: int
    recipe: Path
    overrides: tuple[str, ...]
    folder: Path
    iterations: int
    processes: int = 1

    @property
    def name(self) -> str:
        return f"{self.arm}-seed{self.seed}"

    @property
    def log_file(self) -> Path:
        return self.folder.parent / "logs" / f"{self.name}.log"

    def command(self, state: str | None = None) -> list[str]:
        """The command that trains (or resumes) this run: an ordinary ``core.run``."""
        state = state or run_state(self)
        where = ["--resume", str(self.folder)] if state == "interrupted" else \
            ["--run-dir", str(self.folder)]
        sets = [a for o in self.overrides for a in ("--set", o)]
        launcher = [sys.executable, "-m", "core.run"] if self.processes == 1 else \
            [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu",
             "--num_processes", str(self.processes), "-m", "core.run"]
        return [*launcher, str(self.recipe), *sets, *where]


def plan_runs(loaded: LoadedStudy) -> list[StudyRun]:
    """Every (arm, seed) of the study: seed by seed, arms in file order."""
    from core.recipe import load_recipe

    study, runs = loaded.study, []
    for seed in study.seeds:  # seed by seed: a study stopped early has whole seeds of every arm
        for arm, spec in study.arms.items():
            recipe_path = loaded.recipe_of(arm)
            overrides = (f"seed={seed}", *study.set, *spec.set)
            recipe = load_recipe(recipe_path, list(overrides))
            runs.append(StudyRun(arm=arm, seed=seed, recipe=recipe_path, overrides=overrides,
                                 folder=loaded.folder / f"{arm}-seed{seed}",
                                 iterations=recipe.train.iterations,
                                 processes=study.processes))
    return runs


def finished(run: StudyRun) -> bool:
    from core.checkpoint import checkpoint_name

    return (run.folder / "checkpoints" / checkpoint_name(run.iterations)).is_dir()


def run_state(run: StudyRun) -> str:
    """One of :data:`STATES` (see the module docstring)."""
    if not run.folder.is_dir():
        return "new"
    if is_locked(run.folder):
        return "running"
    if finished(run):
        return "finished"
    if has_checkpoint(run.folder) and (run.folder / RECIPE_FILE).is_file():
        return "interrupted"
    return "started"


def clear_unstarted(run: StudyRun) -> None:
    """A folder left by a run stopped before its first checkpoint holds nothing to keep."""
    if run.folder.is_dir() and not has_checkpoint(run.folder):
        shutil.rmtree(run.folder)
