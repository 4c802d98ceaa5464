"""What a run writes besides checkpoints, through Accelerate's experiment trackers.

``log.trackers`` in the recipe picks them (default ``["jsonl", "tensorboard"]``):

- ``jsonl``: :class:`JsonlTracker`, our :class:`accelerate.tracking.GeneralTracker`, writes
  ``RUN/metrics.jsonl``: one JSON object per line with an ``event`` key (``train``, ``eval``,
  ``spectral``, ``alarm``, ...), the ``iteration``, the wall-clock ``time`` and the values, appended
  to on resume (and trimmed to the checkpoint first). :mod:`core.spectral.history` and
  :mod:`core.plot` read it back.
- ``tensorboard``: Accelerate's ``TensorBoardTracker`` writing ``RUN/tensorboard/``: every finite
  numeric value as the scalar ``PREFIX/KEY`` (``train/loss_d``, ``eval/modes.modes``, ...) and the
  sample grids as images.
- any other tracker Accelerate has (``wandb``, ``mlflow``, ``comet_ml``, ``aim``, ``clearml``,
  ``dvclive``, ``swanlab``, ``trackio``): the same scalars, and the sample grids where the tracker
  logs images. Services log into project ``specreg``, the run named after the run folder; their
  other settings come from their own environment variables (``WANDB_MODE``, ``MLFLOW_TRACKING_URI``,
  ...). A directory-based one writes into the run folder (aim: ``RUN/.aim``, dvclive:
  ``RUN/dvclive``).

Why :class:`RunLog` builds the tracker objects itself instead of ``Accelerator(log_with=...,
project_dir=...)`` + ``accelerator.init_trackers``: the accelerator is created before the run folder
is known (``core.run`` needs it to agree on the folder across processes), while Accelerate fixes
``project_dir`` and the tracker list when the accelerator is constructed; ``end_training()``, the
accelerator's way of closing its trackers, also destroys the process group, which the run and the
tests manage themselves; and ``accelerator.log`` sends one dict to every tracker, while the JSONL
record carries its event kind and the non-scalar values that the others do not take. So the
trackers are Accelerate's classes (constructed as ``init_trackers`` would, with the run folder as
logging directory), started, fed and finished by :class:`RunLog`, one per run folder, on the main
process only. They are finished by :meth:`RunLog.close` at the end of a run and, should the run
die on an error, when the ``RunLog`` is collected or the interpreter exits.

Which tracker names exist is checked by the recipe (``core.recipe.TrackerName``, a one-line error
listing the valid names); whether a tracker's package is installed is checked here, on every
process, before anything is written (:class:`TrackerUnavailableError`, naming the pip package): a
recipe stays loadable (``python -m core.eval``, ``--dry-run`` elsewhere) on a machine without the
package. TensorBoard, wandb and the rest are imported by the trackers when they start, never at
``import core.tracking``.
"""

from __future__ import annotations

import json
import math
import os
import time
import weakref
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from accelerate.tracking import LOGGER_TYPE_TO_CLASS, GeneralTracker, get_available_trackers, \
    on_main_process
from accelerate.utils import LoggerType

from core.checkpoint import storage_failure, write_atomic_text
from core.errors import SpecregError
from core.records import parsed_lines, read_records

__all__ = ["DEFAULT_TRACKERS", "JsonlTracker", "RunLog", "TrackerUnavailableError",
           "check_trackers", "read_log"]

METRICS_FILE = "metrics.jsonl"
DEFAULT_TRACKERS = ("jsonl", "tensorboard")
#: the project the service trackers log into (the run is named after its folder).
PROJECT = "specreg"
#: the pip package of each of Accelerate's trackers (where it differs from the tracker's name).
PIP_PACKAGE = {"comet_ml": "comet-ml"}


class TrackerUnavailableError(SpecregError):
    """A tracker named in ``log.trackers`` cannot run here (its package is not installed)."""


class JsonlTracker(GeneralTracker):
    """``RUN/metrics.jsonl`` as an Accelerate tracker: ``log(values, step, event=...)`` appends
    ``{"event": ..., "iteration": step, "time": ..., **values}`` as one line (tensors as lists).

    Each line is appended and the file closed again, so a crash loses at most the line being
    written (readers skip a partial last line). Constructed as Accelerate's ``init_trackers``
    constructs a tracker that needs a directory: ``JsonlTracker(project_name, logging_dir)``.
    """

    name = "jsonl"
    requires_logging_directory = True

    def __init__(self, run_name: str, logging_dir: str | os.PathLike) -> None:
        super().__init__()
        self.run_name = run_name
        self.path = Path(logging_dir) / METRICS_FILE

    @property
    def tracker(self) -> Path:
        return self.path

    @on_main_process
    def start(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)

    @on_main_process
    def log(self, values: dict[str, Any], step: int | None = None, event: str = "log",
            **kwargs: Any) -> None:
        record = {"event": event, "iteration": step, "time": round(time.time(), 3), **values}
        line = json.dumps(record, default=_json_default) + "\n"
        try:
            with self.path.open("a") as fh:
                fh.write(line)
        except OSError as exc:
            failure = storage_failure(exc, str(self.path))
            if failure is not None:
                raise failure from None
            raise

    @on_main_process
    def truncate_after(self, iteration: int) -> None:
        truncate_metrics(self.path, iteration)


def truncate_metrics(path: Path, iteration: int) -> None:
    """Drop the records past ``iteration`` (a crashed run's tail) and a line that does not parse
    (the partial last line of a crash), so that a resumed log has neither gaps nor duplicates."""
    path = Path(path)
    if not path.is_file():
        return
    kept = [line for line, record in parsed_lines(path) if record.get("iteration", 0) <= iteration]
    write_atomic_text(path, "".join(line + "\n" for line in kept))


def check_trackers(names: Sequence[str]) -> None:
    """Raise :class:`TrackerUnavailableError` (one line) for the first tracker that cannot run
    here: unknown to the installed Accelerate, or its package missing (Accelerate's own
    ``is_*_available`` decide, through ``get_available_trackers``; not ``filter_trackers``, which
    logs through Accelerate's logger and so needs an initialized accelerate state)."""
    available = {str(t) for t in get_available_trackers()}
    for name in names:
        if name == JsonlTracker.name:
            continue
        if name not in LOGGER_TYPE_TO_CLASS:
            import accelerate

            raise TrackerUnavailableError(
                f"log.trackers: accelerate {accelerate.__version__} has no tracker '{name}' "
                f"(it has {', '.join(sorted(LOGGER_TYPE_TO_CLASS))}); pip install -U accelerate")
        if name not in available and name in {t.value for t in LoggerType}:
            package = PIP_PACKAGE.get(name, name)
            raise TrackerUnavailableError(
                f"log.trackers: tracker '{name}' needs the Python package {package}, which is not "
                f"installed: pip install {package}")


def make_tracker(name: str, run_dir: Path) -> GeneralTracker:
    """The (not yet started) tracker ``name`` of the run folder ``run_dir``."""
    if name == JsonlTracker.name:
        return JsonlTracker(run_dir.name, run_dir)
    cls = LOGGER_TYPE_TO_CLASS[name]
    if name == "tensorboard":  # logging_dir/run_name = RUN/tensorboard
        return cls("tensorboard", run_dir)
    if name == "aim":
        return cls(run_dir.name, run_dir)
    if name == "dvclive":
        return cls(dir=str(run_dir / "dvclive"))
    if name == "wandb":
        return cls(PROJECT, name=run_dir.name, dir=str(run_dir))
    if name == "mlflow":
        return cls(experiment_name=PROJECT, run_name=run_dir.name)
    if name == "clearml":
        return cls(PROJECT, task_name=run_dir.name)
    if name == "swanlab":
        return cls(PROJECT, experiment_name=run_dir.name)
    if name == "trackio":
        return cls(PROJECT, name=run_dir.name)
    # one Accelerate added later: as its init_trackers would construct it
    return cls(PROJECT, run_dir) if cls.requires_logging_directory else cls(PROJECT)


class RunLog:
    """The trackers of one run folder: every event goes to each of them (main process only).

    ``write("train", 100, {"loss_d": 0.5}, tensorboard_prefix="train")`` appends the record to
    metrics.jsonl and logs ``train/loss_d`` to the other trackers; ``add_image`` logs a sample
    grid; ``truncate_after`` trims metrics.jsonl on resume; ``close`` finishes every tracker.
    ``tensorboard=False`` leaves TensorBoard out of ``trackers``.
    """

    def __init__(self, run_dir: Path, enabled: bool = True,
                 trackers: Sequence[str] = DEFAULT_TRACKERS, tensorboard: bool = True) -> None:
        self.run_dir = Path(run_dir)
        self.enabled = enabled
        self.path = self.run_dir / METRICS_FILE
        self.names = [n for n in dict.fromkeys(trackers) if tensorboard or n != "tensorboard"]
        check_trackers(self.names)  # on every process: all fail alike, before anything is written
        self.trackers: list[GeneralTracker] = []
        self._finalizer = weakref.finalize(self, finish_trackers, self.trackers)
        if not enabled:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        try:
            for name in self.names:
                tracker = make_tracker(name, self.run_dir)
                tracker.start()
                self.trackers.append(tracker)
        except BaseException:
            self.close()
            raise

    def get_tracker(self, name: str) -> GeneralTracker | None:
        """The started tracker ``name`` (e.g. "wandb", for a callback's own logging), if any."""
        return next((t for t in self.trackers if t.name == name), None)

    def truncate_after(self, iteration: int) -> None:
        """On resume: drop metrics.jsonl's lines past the checkpoint's iteration."""
        if self.enabled:
            truncate_metrics(self.path, iteration)

    def write(self, event: str, iteration: int, values: dict[str, Any],
              tensorboard_prefix: str | None = None) -> None:
        """One record: all of ``values`` to metrics.jsonl; the finite numbers among them, as
        ``PREFIX/KEY`` (the prefix defaults to ``event``), to every other tracker."""
        if not self.enabled:
            return
        prefix = tensorboard_prefix if tensorboard_prefix is not None else event
        scalars = {f"{prefix}/{key}": value for key, value in values.items() if _is_scalar(value)}
        for tracker in self.trackers:
            if isinstance(tracker, JsonlTracker):
                tracker.log(values, step=iteration, event=event)
            elif scalars:
                tracker.log(scalars, step=iteration)

    def add_image(self, tag: str, image: torch.Tensor, iteration: int) -> None:
        """A ``[3, H, W]`` image in [0, 1] (the sample grid) to every tracker that logs images."""
        if not self.enabled:
            return
        for tracker in self.trackers:
            log_images = getattr(tracker, "log_images", None)
            if log_images is None:
                continue
            if tracker.name == "tensorboard":
                log_images({tag: image}, step=iteration, dataformats="CHW")
                tracker.writer.flush()
            elif tracker.name in ("wandb", "swanlab"):
                log_images({tag: [_hwc_uint8(image)]}, step=iteration)
            else:  # aim, clearml: one array per key
                log_images({tag: _hwc_uint8(image)}, step=iteration)

    def close(self) -> None:
        """Finish every tracker (flushes and closes their files); idempotent."""
        self._finalizer()

    def __enter__(self) -> "RunLog":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def finish_trackers(trackers: list[GeneralTracker]) -> None:
    """Finish each tracker, the others still when one fails (the first failure is re-raised)."""
    failure = None
    while trackers:
        tracker = trackers.pop(0)
        try:
            tracker.finish()
        except Exception as exc:  # noqa: BLE001 - finish the others, then report
            failure = failure or exc
    if failure is not None:
        raise failure


def _is_scalar(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _hwc_uint8(image: torch.Tensor):
    return (image.detach().float().clamp(0, 1) * 255).round().to(torch.uint8) \
        .permute(1, 2, 0).cpu().numpy()


def _json_default(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if hasattr(value, "item"):
        return value.item()
    return str(value)


def read_log(run_dir: Path, event: str | None = None) -> list[dict[str, Any]]:
    """The records of a run's metrics log (optionally one event kind)."""
    records = read_records(Path(run_dir) / METRICS_FILE)
    return [r for r in records if event is None or r.get("event") == event]
