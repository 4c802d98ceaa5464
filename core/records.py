"""Reading the JSON-lines files a run writes (``metrics.jsonl``, ``evaluations.jsonl``) while it
may still be writing them, without importing any training code.

    from core.records import read_records

    evaluations = read_records(run_dir / "evaluations.jsonl")
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

__all__ = ["read_records"]


def read_records(path: Path) -> list[dict[str, Any]]:
    """The records of a JSON-lines file; a line that does not parse (one being written, or cut
    short by a killed process) is skipped, and so is a line that is not a JSON object."""
    path = Path(path)
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict):
            records.append(record)
    return records
