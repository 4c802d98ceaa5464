"""Checkpoints: atomic, pickle-free, complete enough to resume bit-identically.

A checkpoint is a folder ``RUN/checkpoints/iter_0001000/`` holding

- ``models.safetensors``: generator and discriminator state dicts (regularizer buffers included),
- ``optimizers.pt``: both optimizers' state dicts (tensors and numbers only; loaded with
  ``torch.load(weights_only=True)``),
- ``rng_rank<r>.safetensors`` + ``rng_rank<r>.json``: every process's random states,
- ``state.json``: iteration, data position, best score, extra loop state.

It is written into a hidden temporary folder and renamed into place (an atomic rename on POSIX),
then ``checkpoints/latest`` is replaced atomically: a crash mid-write leaves the previous
checkpoint as the latest. The newest ``keep`` periodic checkpoints are kept; ``best`` is apart.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from core.errors import SpecregError

LATEST = "latest"
BEST = "best"
MODELS = "models.safetensors"
OPTIMIZERS = "optimizers.pt"
STATE = "state.json"


class CheckpointError(SpecregError):
    """A checkpoint is missing or does not fit the recipe."""


def checkpoint_name(iteration: int) -> str:
    return f"iter_{iteration:07d}"


def write_atomic_text(path: Path, text: str) -> None:
    """Write a small file atomically (temporary file + ``os.replace``)."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------
# Random states
# ---------------------------------------------------------------------------------------------


def capture_rng(generators: dict[str, torch.Generator]) -> tuple[dict[str, torch.Tensor], dict]:
    """Every random state of this process: (tensors for safetensors, JSON-able rest)."""
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda{i}"] = state
    for name, gen in generators.items():
        tensors[f"gen.{name}"] = gen.get_state()
    np_state = np.random.get_state()
    info = {
        "python": _jsonable(random.getstate()),
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]),
                  float(np_state[4])],
    }
    return tensors, info


def restore_rng(tensors: dict[str, torch.Tensor], info: dict,
                generators: dict[str, torch.Generator]) -> None:
    torch.set_rng_state(tensors["torch"])
    if torch.cuda.is_available():
        cuda = [tensors[k] for k in sorted(k for k in tensors if k.startswith("cuda"))]
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)
    for name, gen in generators.items():
        if f"gen.{name}" in tensors:
            gen.set_state(tensors[f"gen.{name}"])
    random.setstate(_tupled(info["python"]))
    kind, keys, pos, has_gauss, gauss = info["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, gauss))


def _jsonable(value: Any) -> Any:
    return [_jsonable(v) for v in value] if isinstance(value, tuple) else value


def _tupled(value: Any) -> Any:
    return tuple(_tupled(v) for v in value) if isinstance(value, list) else value


# ---------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------


def _tensors_for_saving(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {f"{prefix}.{k}": v.detach().to("cpu").clone().contiguous() for k, v in state.items()}


class CheckpointWriter:
    """Writes checkpoints of one run; every process calls ``save`` (each writes its RNG file)."""

    def __init__(self, run_dir: Path, accelerator, keep: int = 3) -> None:
        self.root = Path(run_dir) / "checkpoints"
        self.accelerator = accelerator
        self.keep = keep

    def save(self, name: str, models: dict[str, torch.nn.Module],
             optimizers: dict[str, torch.optim.Optimizer], state: dict[str, Any],
             generators: dict[str, torch.Generator], update_latest: bool = True) -> Path:
        acc = self.accelerator
        final = self.root / name
        tmp = self.root / f".tmp-{name}"
        if acc.is_main_process:
            self.root.mkdir(parents=True, exist_ok=True)
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir()
        acc.wait_for_everyone()
        tensors, info = capture_rng(generators)
        save_file({k: v.contiguous() for k, v in tensors.items()},
                  str(tmp / f"rng_rank{acc.process_index}.safetensors"))
        (tmp / f"rng_rank{acc.process_index}.json").write_text(json.dumps(info))
        if acc.is_main_process:
            weights: dict[str, torch.Tensor] = {}
            for key, model in models.items():
                weights.update(_tensors_for_saving(acc.unwrap_model(model).state_dict(), key))
            save_file(weights, str(tmp / MODELS))
            torch.save({k: opt.state_dict() for k, opt in optimizers.items()}, tmp / OPTIMIZERS)
            (tmp / STATE).write_text(json.dumps({**state, "processes": acc.num_processes},
                                                indent=1))
        acc.wait_for_everyone()
        if acc.is_main_process:
            _fsync_dir(tmp)
            if final.exists():  # e.g. "best" replaced: move the old one aside first
                old = self.root / f".old-{name}"
                if old.exists():
                    shutil.rmtree(old)
                os.replace(final, old)
                os.replace(tmp, final)
                shutil.rmtree(old)
            else:
                os.replace(tmp, final)
            if update_latest:
                write_atomic_text(self.root / LATEST, name + "\n")
                self._prune()
        acc.wait_for_everyone()
        return final

    def _prune(self) -> None:
        periodic = sorted(p for p in self.root.glob("iter_*") if p.is_dir())
        latest = resolve_checkpoint(self.root.parent, LATEST)
        for path in periodic[: max(0, len(periodic) - self.keep)]:
            if path != latest:
                shutil.rmtree(path, ignore_errors=True)


def _fsync_dir(path: Path) -> None:
    for file in path.iterdir():
        with open(file, "rb") as fh:
            os.fsync(fh.fileno())


# ---------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------


def resolve_checkpoint(run_dir: Path, which: str = LATEST) -> Path:
    """``latest``, ``best``, a checkpoint name, or a path -> the checkpoint folder."""
    run_dir = Path(run_dir)
    root = run_dir / "checkpoints"
    if which == LATEST:
        pointer = root / LATEST
        if pointer.is_file():
            candidate = root / pointer.read_text().strip()
            if (candidate / STATE).is_file():
                return candidate
        complete = sorted(p for p in root.glob("iter_*") if (p / STATE).is_file())
        if not complete:
            raise CheckpointError(f"{run_dir}: no checkpoint found under {root}")
        return complete[-1]
    path = root / which if (root / which).exists() else Path(which)
    if not (path / STATE).is_file():
        raise CheckpointError(f"{path}: not a checkpoint folder (no {STATE}); "
                              f"use 'latest', 'best' or a folder under {root}")
    return path


def read_state(checkpoint: Path) -> dict[str, Any]:
    return json.loads((Path(checkpoint) / STATE).read_text())


def load_models(checkpoint: Path, models: dict[str, torch.nn.Module],
                allow_regularizer_change: bool = False) -> list[str]:
    """Load model weights; returns notes on regularizer state that started fresh or was dropped.

    With ``allow_regularizer_change``, parametrization buffers present on only one side (a run
    trained with ``sn`` resumed with ``sr_dynamic``) are tolerated: the shared ones (SN's ``_u``)
    carry over, the new regularizer's state starts fresh.
    """
    weights = load_file(str(Path(checkpoint) / MODELS))
    notes = []
    for key, model in models.items():
        prefix = key + "."
        state = {k[len(prefix):]: v for k, v in weights.items() if k.startswith(prefix)}
        result = model.load_state_dict(state, strict=False)
        bad_missing = [k for k in result.missing_keys
                       if not (allow_regularizer_change and _is_regularizer_state(k))]
        bad_unexpected = [k for k in result.unexpected_keys
                          if not (allow_regularizer_change and _is_regularizer_state(k))]
        if bad_missing or bad_unexpected:
            raise CheckpointError(
                f"{checkpoint}: the {key} weights do not fit the recipe's network "
                f"(missing: {', '.join(bad_missing[:5]) or 'none'}; unexpected: "
                f"{', '.join(bad_unexpected[:5]) or 'none'}). Was the architecture changed, or a "
                f"regularizer added to or removed from a network?")
        notes += [f"{key}.{k}: starts fresh" for k in result.missing_keys]
        notes += [f"{key}.{k}: dropped (the new regularizer does not use it)"
                  for k in result.unexpected_keys]
    return notes


def _is_regularizer_state(key: str) -> bool:
    return ".parametrizations." in f".{key}" and not key.endswith(".original") \
        and not key.endswith(".original0") and not key.endswith(".original1")


def load_optimizers(checkpoint: Path, optimizers: dict[str, torch.optim.Optimizer]) -> None:
    states = torch.load(Path(checkpoint) / OPTIMIZERS, weights_only=True, map_location="cpu")
    for key, opt in optimizers.items():
        opt.load_state_dict(states[key])


def load_rng(checkpoint: Path, rank: int, generators: dict[str, torch.Generator]) -> bool:
    """Restore this process's random states; False if the checkpoint has none for this rank."""
    tensor_file = Path(checkpoint) / f"rng_rank{rank}.safetensors"
    if not tensor_file.is_file():
        return False
    info = json.loads((Path(checkpoint) / f"rng_rank{rank}.json").read_text())
    restore_rng(load_file(str(tensor_file)), info, generators)
    return True
