"""Reading the JSON-lines files a run writes (``metrics.jsonl``, ``evaluations.jsonl``) while it
may still be writing them, without importing any training code.

    from core.records import read_records

    evaluations = read_records(run_dir / "evaluations.jsonl")
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterator

__all__ = ["parsed_lines", "read_records"]


def parsed_lines(path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    """``(line, record)`` for each line of a JSON-lines file that parses to a JSON object; a line
    that does not parse (one being written, or cut short by a killed process) or is not an object
    is skipped. Nothing when the file does not exist."""
    path = Path(path)
    if not path.is_file():
        return
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict):
            yield line, record


def read_records(path: Path) -> list[dict[str, Any]]:
    """The records of a JSON-lines file (:func:`parsed_lines`)."""
    return [record for _, record in parsed_lines(path)]
