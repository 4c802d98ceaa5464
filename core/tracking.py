"""What a run writes besides checkpoints: a JSON-lines metrics log, TensorBoard events, sample grids.

Only the main process writes. ``metrics.jsonl`` has one JSON object per line with an ``event``
key (``train``, ``eval``, ``alarm``, ...) and the ``iteration``; it is appended to on resume.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import torch


class RunLog:
    """Append-only metrics log + TensorBoard writer of one run folder (main process only)."""

    def __init__(self, run_dir: Path, enabled: bool = True, tensorboard: bool = True) -> None:
        self.run_dir = Path(run_dir)
        self.enabled = enabled
        self.path = self.run_dir / "metrics.jsonl"
        self._tb = None
        if enabled:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        if enabled and tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(log_dir=str(self.run_dir / "tensorboard"))

    def truncate_after(self, iteration: int) -> None:
        """On resume: drop lines past the checkpoint's iteration (a crashed run's tail), so the
        log has neither gaps nor duplicates."""
        if not (self.enabled and self.path.is_file()):
            return
        kept = [line for line in self.path.read_text().splitlines()
                if line.strip() and json.loads(line).get("iteration", 0) <= iteration]
        self.path.write_text("".join(line + "\n" for line in kept))

    def write(self, event: str, iteration: int, values: dict[str, Any],
              tensorboard_prefix: str | None = None) -> None:
        if not self.enabled:
            return
        record = {"event": event, "iteration": iteration, "time": round(time.time(), 3), **values}
        with self.path.open("a") as fh:
            fh.write(json.dumps(record, default=_json_default) + "\n")
        if self._tb is not None:
            prefix = tensorboard_prefix if tensorboard_prefix is not None else event
            for key, value in values.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool) \
                        and math.isfinite(value):
                    self._tb.add_scalar(f"{prefix}/{key}", value, iteration)

    def add_image(self, tag: str, grid: torch.Tensor, iteration: int) -> None:
        if self.enabled and self._tb is not None:
            self._tb.add_image(tag, grid, iteration)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.flush()
            self._tb.close()
            self._tb = None


def _json_default(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if hasattr(value, "item"):
        return value.item()
    return str(value)


def read_log(run_dir: Path, event: str | None = None) -> list[dict[str, Any]]:
    """The records of a run's metrics log (optionally one event kind)."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return []
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in records if event is None or r.get("event") == event]
