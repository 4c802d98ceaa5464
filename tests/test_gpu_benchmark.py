"""benchmarks/gpu.py runs on the CPU with --tiny: a Markdown row per requested setting and mode,
positive finite it/s and overhead ratios."""

from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest

from conftest import REPO

#: the 128x128 setting: the GPU benchmark's main one (class-conditional, SN on G and D); the
#: 32x32 setting shares every code path (one setting keeps the test at one process).
SETTINGS = ("resnet128",)
#: one measured mode (each row runs in a process of its own); bf16 takes the autocast path on top
#: of everything fp32 does.
MEASURED = ("bf16",)


def table_rows(out: str) -> dict[tuple[str, str], list[str]]:
    """``(setting, mode) -> the row's cells`` of the printed Markdown table."""
    rows = {}
    for line in out.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("| ") and cells[0].split()[0] in SETTINGS:
            rows[(cells[0].split()[0], cells[1])] = cells
    return rows


@pytest.mark.slow
def test_tiny_cpu_run_prints_a_row_per_setting_and_mode():
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run(
        [sys.executable, "benchmarks/gpu.py", "--tiny", "--cpu", "--settings", ",".join(SETTINGS),
         "--iterations", "1", "--repeats", "2", "--modes", ",".join(MEASURED)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stdout + done.stderr
    out = done.stdout
    assert "| setting | mode | it/s Trainer | it/s bare |" in out
    rows = table_rows(out)
    assert set(rows) == {(s, m) for s in SETTINGS for m in MEASURED}, out
    for setting in SETTINGS:
        for mode in MEASURED:
            cells = rows[(setting, mode)]
            trainer, bare, overhead = (float(c) for c in cells[2:5])
            for value in (trainer, bare, overhead):
                assert math.isfinite(value) and value > 0, cells
            assert "MiB peak RSS" in cells[5], cells
