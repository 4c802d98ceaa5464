"""Checkpoints: atomic, pickle-free, checksummed, complete enough to resume bit-identically.

A checkpoint is a folder ``RUN/checkpoints/iter_0001000/`` holding

- ``models.safetensors``: generator and discriminator state dicts (regularizer buffers included;
  ``generator_ema.*`` too when the recipe has ``[generator.ema]``),
- ``regularizers.safetensors``: the regularizers' own state (``Regularizer.state_dict``, keyed
  ``discriminator.<position>.<key>``), when any regularizer has some,
- ``optimizers.pt``: both optimizers' state dicts (tensors and numbers only; loaded with
  ``torch.load(weights_only=True)``),
- ``rng_rank<r>.safetensors`` + ``rng_rank<r>.json``: every process's random states,
- ``state.json``: iteration, data position, best score, extra loop state,
- ``manifest.json``, written last: every other file's size and sha256.

It is written into a hidden temporary folder and renamed into place (an atomic rename on POSIX),
then ``checkpoints/latest`` is replaced atomically: a crash mid-write leaves the previous
checkpoint as the latest. The newest ``keep`` periodic checkpoints are kept; ``best`` is apart.
A write that fails (a full disk, a read-only folder) removes its temporary folder and stops the
run with one line; temporary files of writes that were killed are removed at the next start.

Every file is checked against the manifest as it is read: flipped bytes, a truncated or missing
file give one line naming the file and the checkpoint to fall back to. Resuming from ``latest``
takes the newest checkpoint that verifies and says which were skipped and why. Checkpoints
written before manifests existed still load (their contents cannot be checksummed: a note says
so; their structure is checked).
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import random
import re
import shutil
import socket
import sys
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import save as safetensors_bytes

from core.errors import SpecregError

LATEST = "latest"
BEST = "best"
MODELS = "models.safetensors"
OPTIMIZERS = "optimizers.pt"
REGULARIZERS = "regularizers.safetensors"
STATE = "state.json"
MANIFEST = "manifest.json"
MANIFEST_FORMAT = 1
REQUIRED = (STATE, MODELS, OPTIMIZERS)
_WRITER = ".writer"  # inside a temporary checkpoint folder while it is written: "host pid"
_TMP_PREFIX = ".tmp-"
_OLD_PREFIX = ".old-"
_ATOMIC_TMP = re.compile(r"^\..+\.tmp(\d+)$")  # write_atomic_text's temporary files
# what a full disk, a quota or a read-only or forbidden folder raise
STORAGE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM})


class CheckpointError(SpecregError):
    """A checkpoint is missing, damaged, or does not fit the recipe."""


class DamagedCheckpointError(CheckpointError):
    """A file of a checkpoint is missing, truncated, garbled or differs from its checksum."""

    def __init__(self, file: Path, reason: str, checkpoint: Path, fallback: Path | None) -> None:
        self.file, self.reason, self.checkpoint, self.fallback = \
            Path(file), reason, Path(checkpoint), fallback
        if fallback is not None:
            hint = f"the newest checkpoint of this run that verifies is {fallback}"
        else:
            hint = "no other checkpoint of this run verifies"
        super().__init__(f"{file}: {reason}; checkpoint {Path(checkpoint).name} cannot be "
                         f"loaded ({hint})")


class StorageError(SpecregError):
    """A write failed for want of space or permission (the run stops; nothing half-written
    is left behind)."""


class _Damage(Exception):
    """Internal: what is wrong with one file (turned into DamagedCheckpointError with a
    fallback by the public functions)."""

    def __init__(self, file: Path, reason: str) -> None:
        super().__init__(f"{file}: {reason}")
        self.file, self.reason = Path(file), reason


def checkpoint_name(iteration: int) -> str:
    return f"iter_{iteration:07d}"


def storage_failure(exc: BaseException, what: str) -> StorageError | None:
    """The one-line error for a write that failed for want of space or permission, else None."""
    if not isinstance(exc, OSError) or exc.errno not in STORAGE_ERRNOS:
        return None
    where = f" ({os.fsdecode(exc.filename)})" if exc.filename else ""
    return StorageError(f"cannot write {what}: {os.strerror(exc.errno)}{where}")


def ensure_writable(folder: Path) -> None:
    """Create ``folder`` if needed and check that files can be written there (a probe file,
    removed again): a read-only or forbidden run folder raises :class:`StorageError` before
    anything starts writing into it (TensorBoard's writer thread would die with a traceback)."""
    folder = Path(folder)
    probe = folder / f".write-probe.tmp{os.getpid()}"  # removed at the next start if killed
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        if exc.errno not in STORAGE_ERRNOS:
            raise
        _remove(probe)
        raise StorageError(f"cannot write into the run folder {folder}: "
                           f"{os.strerror(exc.errno)}") from None


def write_atomic_text(path: Path, text: str) -> None:
    """Write a small file atomically (temporary file + ``os.replace``); on failure the temporary
    file is removed, and a full disk or a read-only folder raise :class:`StorageError`."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    except BaseException as exc:
        _remove(tmp)
        failure = storage_failure(exc, str(path))
        if failure is not None:
            raise failure from None
        raise


def _remove(path: Path) -> None:
    try:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    except OSError:
        pass  # e.g. a read-only folder: nothing was written there either


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


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_manifest(folder: Path) -> dict:
    """``manifest.json`` for every other file of ``folder``: its size and sha256."""
    files = {p.name: {"bytes": p.stat().st_size, "sha256": sha256_of(p)}
             for p in sorted(folder.iterdir()) if p.is_file() and p.name != MANIFEST}
    manifest = {"format": MANIFEST_FORMAT, "files": files}
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=1))
    return manifest


class CheckpointWriter:
    """Writes checkpoints of one run; every process calls ``save`` (each writes its RNG file).

    Made at the start of a run: the main process then removes the temporary files of writes that
    were killed (``cleaned`` lists them).
    """

    def __init__(self, run_dir: Path, accelerator, keep: int = 3) -> None:
        self.root = Path(run_dir) / "checkpoints"
        self.accelerator = accelerator
        self.keep = keep
        self.cleaned: list[Path] = []
        if accelerator.is_main_process:
            self.cleaned = clean_stale_temporaries(Path(run_dir))
            if self.cleaned:
                print(f"specreg: removed {len(self.cleaned)} temporary file(s) of an interrupted "
                      f"write: {', '.join(str(p) for p in self.cleaned)}", file=sys.stderr)

    def save(self, name: str, models: dict[str, torch.nn.Module],
             optimizers: dict[str, torch.optim.Optimizer], state: dict[str, Any],
             generators: dict[str, torch.Generator], update_latest: bool = True,
             regularizers: dict[str, torch.Tensor] | None = None) -> Path:
        """Write checkpoint ``name``; ``regularizers``: the regularizers' own state
        (``{"discriminator.0.key": tensor}``), written to ``regularizers.safetensors`` if any."""
        acc = self.accelerator
        final = self.root / name
        tmp = self.root / f"{_TMP_PREFIX}{name}"
        try:
            if acc.is_main_process:
                self.root.mkdir(parents=True, exist_ok=True)
                if tmp.exists():
                    shutil.rmtree(tmp)
                tmp.mkdir()
                (tmp / _WRITER).write_text(f"{socket.gethostname()} {os.getpid()}\n")
            acc.wait_for_everyone()
            tensors, info = capture_rng(generators)
            _write_bytes(tmp / f"rng_rank{acc.process_index}.safetensors",
                         safetensors_bytes({k: v.contiguous() for k, v in tensors.items()}))
            (tmp / f"rng_rank{acc.process_index}.json").write_text(json.dumps(info))
            if acc.is_main_process:
                weights: dict[str, torch.Tensor] = {}
                for key, model in models.items():
                    weights.update(_tensors_for_saving(acc.unwrap_model(model).state_dict(), key))
                _write_bytes(tmp / MODELS, safetensors_bytes(weights))
                if regularizers:
                    _write_bytes(tmp / REGULARIZERS, safetensors_bytes(
                        _tensors_for_saving(regularizers, "regularizers")))
                _torch_save({k: opt.state_dict() for k, opt in optimizers.items()},
                            tmp / OPTIMIZERS)
                (tmp / STATE).write_text(json.dumps({**state, "processes": acc.num_processes},
                                                    indent=1))
            acc.wait_for_everyone()
            if acc.is_main_process:
                (tmp / _WRITER).unlink()
                write_manifest(tmp)  # last: a folder with a manifest is complete
                _fsync_folder(tmp)
                self._move_into_place(tmp, final)
                _fsync_folder(self.root, files=False)
                if update_latest:
                    write_atomic_text(self.root / LATEST, name + "\n")
                    self._prune()
        except BaseException as exc:
            if acc.is_main_process:
                _remove(tmp)
            failure = storage_failure(exc, f"checkpoint {name} into {self.root}")
            if failure is not None:
                last = _pointed(self.root)
                raise StorageError(
                    f"{failure}; the half-written checkpoint was removed; the last complete "
                    f"checkpoint is {last if last is not None else 'none'}. Free space or make "
                    f"the folder writable, then resume with --resume") from None
            raise
        acc.wait_for_everyone()
        return final

    def _move_into_place(self, tmp: Path, final: Path) -> None:
        if not final.exists():
            os.replace(tmp, final)
            return
        old = self.root / f"{_OLD_PREFIX}{final.name}"  # e.g. "best" replaced: the old one aside
        if old.exists():
            shutil.rmtree(old)
        os.replace(final, old)
        try:
            os.replace(tmp, final)
        except BaseException:
            os.replace(old, final)  # the previous one back
            raise
        shutil.rmtree(old)

    def _prune(self) -> None:
        periodic = sorted((p for p in self.root.glob("iter_*") if p.is_dir()), key=_iteration_of)
        latest = _pointed(self.root)
        for path in periodic[: max(0, len(periodic) - self.keep)]:
            if path != latest:
                shutil.rmtree(path, ignore_errors=True)


def _write_bytes(path: Path, data: bytes) -> None:
    """Through Python's I/O, so that a full disk or a read-only folder raise an OSError with its
    errno (safetensors' and torch's own writers raise errors without one)."""
    with open(path, "wb") as fh:
        fh.write(data)


def _torch_save(obj: Any, path: Path) -> None:
    try:
        torch.save(obj, path)
    except RuntimeError:
        # torch's writer reports a full disk or a read-only folder as a RuntimeError without an
        # errno: the same bytes written through Python's I/O raise the OSError that says which
        # (or succeed, if the failure has passed); another failure raises again from torch.save
        buffer = io.BytesIO()
        torch.save(obj, buffer)
        _write_bytes(path, buffer.getvalue())


def _fsync_folder(path: Path, files: bool = True) -> None:
    if files:
        for file in path.iterdir():
            with open(file, "rb") as fh:
                os.fsync(fh.fileno())
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)  # the folder's entries (the files' names, a rename)
    finally:
        os.close(fd)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process
    return True


def _written_by_a_live_process(folder: Path) -> bool:
    """Whether a temporary checkpoint folder is being written right now by another process on
    this machine (its ``.writer`` file names it)."""
    try:
        host, pid = (folder / _WRITER).read_text().split()
        pid = int(pid)
    except (OSError, ValueError):
        return False  # complete but not renamed, or from before the .writer file
    if host != socket.gethostname():
        return True  # cannot tell: leave it
    return pid != os.getpid() and _process_alive(pid)


def clean_stale_temporaries(run_dir: Path) -> list[Path]:
    """Remove what killed writes left in a run folder: ``write_atomic_text``'s temporary files
    (``.NAME.tmp<pid>`` of a process that is gone) in the run folder and its checkpoints folder,
    temporary checkpoint folders (``checkpoints/.tmp-*``), and ``.old-NAME`` folders (put back
    as NAME when the replacement had not arrived). Returns what was removed or put back."""
    run_dir, cleaned = Path(run_dir), []
    root = run_dir / "checkpoints"
    for folder in (run_dir, root):
        if not folder.is_dir():
            continue
        for path in folder.iterdir():
            match = _ATOMIC_TMP.match(path.name)
            if match and path.is_file() and not _process_alive(int(match.group(1))):
                _remove(path)
                cleaned.append(path)
    if not root.is_dir():
        return cleaned
    for path in root.iterdir():
        if path.name.startswith(_TMP_PREFIX) and path.is_dir() \
                and not _written_by_a_live_process(path):
            _remove(path)
            cleaned.append(path)
        elif path.name.startswith(_OLD_PREFIX) and path.is_dir():
            original = root / path.name[len(_OLD_PREFIX):]
            if original.exists():
                _remove(path)
            else:
                os.replace(path, original)
            cleaned.append(path)
    return cleaned


# ---------------------------------------------------------------------------------------------
# Verifying
# ---------------------------------------------------------------------------------------------


def _plain_name(name: str) -> bool:
    return bool(name) and name == Path(name).name and name not in (".", "..") \
        and not name.startswith(".") and "\\" not in name


def _iteration_of(path: Path) -> int:
    digits = path.name[len("iter_"):]
    return int(digits) if digits.isdigit() else -1


def _read_manifest(checkpoint: Path) -> dict | None:
    """The manifest's ``files`` table, or None for a checkpoint written before manifests."""
    path = checkpoint / MANIFEST
    if not path.exists():
        return None
    try:
        manifest = json.loads(path.read_bytes())
        files = manifest["files"]
        if manifest.get("format") != MANIFEST_FORMAT or not isinstance(files, dict) or not all(
                _plain_name(name) and isinstance(entry.get("bytes"), int)
                and isinstance(entry.get("sha256"), str) for name, entry in files.items()):
            raise ValueError("unexpected layout")
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise _Damage(path, f"unreadable manifest ({type(exc).__name__}: {exc})") from None
    return files


def _read_bytes(checkpoint: Path, name: str, manifest: dict | None) -> bytes:
    """A file's bytes, checked against the manifest (size and sha256) when there is one."""
    path = checkpoint / name
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise _Damage(path, "missing") from None
    except OSError as exc:
        raise _Damage(path, f"unreadable ({exc.strerror})") from None
    if manifest is not None:
        entry = manifest.get(name)
        if entry is None:
            raise _Damage(path, f"not listed in {MANIFEST}")
        if len(data) != entry["bytes"]:
            raise _Damage(path, f"{len(data)} bytes, the manifest says {entry['bytes']} "
                                f"(truncated or overwritten)")
        if hashlib.sha256(data).hexdigest() != entry["sha256"]:
            raise _Damage(path, "contents differ from the manifest's sha256 (damaged)")
    return data


def _parse_state(path: Path, data: bytes) -> dict[str, Any]:
    try:
        state = json.loads(data)
    except (UnicodeDecodeError, ValueError) as exc:
        raise _Damage(path, f"not valid JSON ({exc})") from None
    if not isinstance(state, dict):
        raise _Damage(path, "not a JSON object")
    for key in ("iteration", "data_position"):
        value = state.get(key)
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise _Damage(path, f"'{key}' is {value!r}, not an integer >= 0")
    return state


def _check_structure(checkpoint: Path, name: str) -> None:
    """Without a manifest: what can be checked of a file without its checksum."""
    path = checkpoint / name
    if name.endswith(".safetensors"):
        try:
            with safe_open(str(path), framework="pt") as fh:
                fh.keys()
        except (SafetensorError, OSError) as exc:
            raise _Damage(path, f"not a readable safetensors file ({exc})") from None
    elif name.endswith(".pt"):
        try:
            with zipfile.ZipFile(path) as archive:
                bad = archive.testzip()  # every member's CRC-32
        except (zipfile.BadZipFile, OSError, EOFError) as exc:
            raise _Damage(path, f"not a readable torch file ({exc})") from None
        if bad is not None:
            raise _Damage(path, f"damaged (CRC mismatch in {bad})")
    elif name.endswith(".json"):
        try:
            json.loads(path.read_bytes())
        except (UnicodeDecodeError, ValueError) as exc:
            raise _Damage(path, f"not valid JSON ({exc})") from None


def _verify(checkpoint: Path) -> list[str]:
    """Raise _Damage for the first damaged file of ``checkpoint``; returns notes."""
    if not checkpoint.is_dir():
        raise _Damage(checkpoint, "no such checkpoint folder")
    manifest = _read_manifest(checkpoint)
    if manifest is None:
        for name in REQUIRED:
            if not (checkpoint / name).is_file():
                raise _Damage(checkpoint / name, "missing")
        _parse_state(checkpoint / STATE, _read_bytes(checkpoint, STATE, None))
        for path in sorted(checkpoint.iterdir()):
            if path.is_file():
                _check_structure(checkpoint, path.name)
        return [f"{checkpoint.name} has no {MANIFEST} (written by an older specreg): its files' "
                f"structure was checked, their contents cannot be checksummed"]
    for name in REQUIRED:
        if name not in manifest:
            raise _Damage(checkpoint / name, f"not listed in {MANIFEST}")
    for name in manifest:
        data = _read_bytes(checkpoint, name, manifest)
        if name == STATE:
            _parse_state(checkpoint / STATE, data)
    return []


def _candidates(root: Path) -> tuple[list[Path], list[str]]:
    """Checkpoints ``latest`` may mean, newest first: the one ``checkpoints/latest`` names, then
    the periodic ones by iteration; plus notes on a pointer that names nothing usable."""
    notes, ordered = [], []
    pointer = root / LATEST
    if pointer.is_file():
        try:
            name = pointer.read_text().strip()
        except (OSError, UnicodeDecodeError):
            name = None
        target = root / name if name and _plain_name(name) else None
        if target is not None and target.is_dir() and target.resolve().parent == root.resolve():
            ordered.append(target)
        else:
            notes.append(f"{pointer} names {name!r}, not a checkpoint folder in {root}: ignored")
    periodic = sorted((p for p in root.glob("iter_*") if p.is_dir() and _iteration_of(p) >= 0
                       and p.resolve().parent == root.resolve()), key=_iteration_of, reverse=True)
    ordered += [p for p in periodic if p not in ordered]
    return ordered, notes


def newest_verified(root: Path, exclude: Path | None = None) -> tuple[Path | None, list[str]]:
    """The newest checkpoint under ``root`` that verifies (None if none does), and notes: each
    one skipped and why, and the chosen one's own notes."""
    candidates, notes = _candidates(root)
    for path in candidates:
        if exclude is not None and path.resolve() == exclude.resolve():
            continue
        try:
            return path, notes + _verify(path)
        except _Damage as damage:
            notes.append(f"skipped {path.name}: {damage.file.name}: {damage.reason}")
    return None, notes


def verify_checkpoint(checkpoint: Path) -> list[str]:
    """Check every file of a checkpoint (against its manifest); raises
    :class:`DamagedCheckpointError` naming the first damaged file and the checkpoint to fall back
    to; returns notes (an old checkpoint without a manifest)."""
    checkpoint = Path(checkpoint)
    try:
        return _verify(checkpoint)
    except _Damage as damage:
        raise _damaged(damage, checkpoint) from None


def _damaged(damage: _Damage, checkpoint: Path) -> DamagedCheckpointError:
    fallback, _ = newest_verified(Path(checkpoint).parent, exclude=Path(checkpoint))
    return DamagedCheckpointError(damage.file, damage.reason, checkpoint, fallback)


def _pointed(root: Path) -> Path | None:
    """The folder ``checkpoints/latest`` names (unverified; None if it names nothing)."""
    candidates, notes = _candidates(root)
    return candidates[0] if candidates and not notes and (root / LATEST).is_file() else None


# ---------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------


def resolve_checkpoint(run_dir: Path, which: str = LATEST, notes: list[str] | None = None) -> Path:
    """``latest``, ``best``, a checkpoint name, or a path -> the checkpoint folder, verified.

    ``latest`` is the newest checkpoint that verifies: the one ``checkpoints/latest`` names, else
    the periodic ones from the newest. Each one skipped, and why, is appended to ``notes`` (printed
    to stderr as ``specreg: note: ...`` lines by the main process when ``notes`` is None). A
    named checkpoint that does not verify raises :class:`DamagedCheckpointError`.
    """
    run_dir = Path(run_dir)
    root = run_dir / "checkpoints"
    found: list[str] = []
    if which == LATEST:
        path, found = newest_verified(root)
        if path is None:
            if not found:
                raise CheckpointError(f"{run_dir}: no checkpoint found under {root}")
            raise CheckpointError(f"{run_dir}: no checkpoint under {root} verifies: "
                                  + "; ".join(found))
    else:
        path = root / which if (root / which).exists() else Path(which)
        if not path.is_dir() or not ((path / STATE).exists() or (path / MANIFEST).exists()):
            raise CheckpointError(f"{path}: not a checkpoint folder (no {STATE}); "
                                  f"use 'latest', 'best' or a folder under {root}")
        found = verify_checkpoint(path)
    if notes is not None:
        notes.extend(found)
    elif os.environ.get("RANK", "0") == "0":
        for note in found:
            print(f"specreg: note: {note}", file=sys.stderr)
    return path


def _loading(checkpoint: Path, name: str) -> bytes:
    """A file of a checkpoint, verified against its manifest, for loading."""
    checkpoint = Path(checkpoint)
    try:
        return _read_bytes(checkpoint, name, _read_manifest(checkpoint))
    except _Damage as damage:
        raise _damaged(damage, checkpoint) from None


def read_state(checkpoint: Path) -> dict[str, Any]:
    data = _loading(checkpoint, STATE)
    try:
        return _parse_state(Path(checkpoint) / STATE, data)
    except _Damage as damage:
        raise _damaged(damage, Path(checkpoint)) from None


def load_models(checkpoint: Path, models: dict[str, torch.nn.Module],
                allow_regularizer_change: bool = False) -> list[str]:
    """Load model weights; returns notes on regularizer state that started fresh or was dropped.

    With ``allow_regularizer_change``, parametrization buffers present on only one side (a run
    trained with ``sn`` resumed with ``sr_dynamic``) are tolerated: the shared ones (SN's ``_u``)
    carry over, the new regularizer's state starts fresh.
    """
    checkpoint = Path(checkpoint)
    try:
        weights = load_safetensors_bytes(_loading(checkpoint, MODELS))
    except SafetensorError as exc:
        raise _damaged(_Damage(checkpoint / MODELS, f"not a readable safetensors file ({exc})"),
                       checkpoint) from None
    notes = []
    for key, model in models.items():
        prefix = key + "."
        state = {k[len(prefix):]: v for k, v in weights.items() if k.startswith(prefix)}
        _check_shapes(checkpoint, key, state, model)
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


def _check_shapes(checkpoint: Path, key: str, state: dict[str, torch.Tensor],
                  model: torch.nn.Module) -> None:
    expected = model.state_dict()
    # in the network's own order (the first layer first): a loaded file's key order is not fixed
    wrong = [(k, tuple(state[k].shape), tuple(v.shape)) for k, v in expected.items()
             if k in state and state[k].shape != v.shape]
    if wrong:
        name, saved, wanted = wrong[0]
        raise CheckpointError(
            f"{checkpoint / MODELS}: the {key}'s {name} is {list(saved)} there, {list(wanted)} in "
            f"the recipe's network ({len(wrong)} tensor(s) differ in size). Was the architecture "
            f"or a width changed?")


def _is_regularizer_state(key: str) -> bool:
    return ".parametrizations." in f".{key}" and not key.endswith(".original") \
        and not key.endswith(".original0") and not key.endswith(".original1")


def saved_networks(checkpoint: Path) -> set[str]:
    """The networks whose weights ``models.safetensors`` holds (``generator``,
    ``discriminator``, ``generator_ema``...)."""
    checkpoint = Path(checkpoint)
    try:
        weights = load_safetensors_bytes(_loading(checkpoint, MODELS))
    except SafetensorError as exc:
        raise _damaged(_Damage(checkpoint / MODELS, f"not a readable safetensors file ({exc})"),
                       checkpoint) from None
    return {key.split(".", 1)[0] for key in weights}


def load_regularizer_state(checkpoint: Path) -> dict[str, torch.Tensor]:
    """The regularizers' own state saved with ``checkpoint`` (``{"discriminator.0.key":
    tensor}``); ``{}`` for a checkpoint without any."""
    checkpoint = Path(checkpoint)
    manifest = None
    try:
        manifest = _read_manifest(checkpoint)
        listed = manifest is not None and REGULARIZERS in manifest
        if not listed and not (checkpoint / REGULARIZERS).is_file():
            return {}
        tensors = load_safetensors_bytes(_read_bytes(checkpoint, REGULARIZERS, manifest))
    except _Damage as damage:
        raise _damaged(damage, checkpoint) from None
    except SafetensorError as exc:
        raise _damaged(_Damage(checkpoint / REGULARIZERS, f"not a readable safetensors file "
                                                          f"({exc})"), checkpoint) from None
    prefix = "regularizers."
    return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}


def load_optimizers(checkpoint: Path, optimizers: dict[str, torch.optim.Optimizer]) -> None:
    checkpoint = Path(checkpoint)
    path = checkpoint / OPTIMIZERS
    data = _loading(checkpoint, OPTIMIZERS)
    try:
        states = torch.load(io.BytesIO(data), weights_only=True, map_location="cpu")
        if not isinstance(states, dict) or not all(key in states for key in optimizers):
            raise ValueError(f"expected the states of {', '.join(optimizers)}")
    except Exception as exc:  # noqa: BLE001 - whatever torch's unpickler raises on bad bytes
        raise _damaged(_Damage(path, f"not a readable optimizer state ({type(exc).__name__}: "
                                     f"{str(exc).splitlines()[0][:200]})"), checkpoint) from None
    for key, opt in optimizers.items():
        try:
            opt.load_state_dict(states[key])
        except (ValueError, KeyError, TypeError, RuntimeError) as exc:
            raise CheckpointError(f"{path}: the {key} optimizer's state does not fit the recipe's "
                                  f"network ({exc}). Was the architecture changed?") from None


def load_rng(checkpoint: Path, rank: int, generators: dict[str, torch.Generator]) -> bool:
    """Restore this process's random states; False if the checkpoint has none for this rank."""
    checkpoint = Path(checkpoint)
    tensor_name, info_name = f"rng_rank{rank}.safetensors", f"rng_rank{rank}.json"
    try:
        manifest = _read_manifest(checkpoint)
        listed = manifest is not None and tensor_name in manifest
        if not listed and not (checkpoint / tensor_name).is_file():
            return False  # no state for this rank (more processes than when it was written)
        tensors = load_safetensors_bytes(_read_bytes(checkpoint, tensor_name, manifest))
        info = json.loads(_read_bytes(checkpoint, info_name, manifest))
        restore_rng(tensors, info, generators)
    except _Damage as damage:
        raise _damaged(damage, checkpoint) from None
    except (SafetensorError, ValueError, KeyError, TypeError, RuntimeError) as exc:
        raise _damaged(_Damage(checkpoint / tensor_name, f"unusable random state "
                                                         f"({type(exc).__name__}: {exc})"),
                       checkpoint) from None
    return True
