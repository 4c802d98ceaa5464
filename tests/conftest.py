"""Shared fixtures. Tests run on the CPU with one thread per process (2-core CI machine)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(1)


@pytest.fixture
def repo() -> Path:
    return REPO


def write_distribution(root: Path, dist: str, module: str, source: str,
                       entry_point: str | None = None, version: str = "0.1") -> None:
    """An installed-looking distribution on ``root`` (a sys.path entry): its module and a
    ``.dist-info`` with an entry point in group ``specreg``, as pip would leave it."""
    (root / f"{module}.py").write_text(source)
    info = root / f"{dist.replace('-', '_')}-{version}.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n")
    (info / "entry_points.txt").write_text(f"[specreg]\n{entry_point or module} = {module}\n")


@pytest.fixture
def plugin_path(tmp_path, monkeypatch):
    """A fresh sys.path entry for test distributions; removed (with their modules) afterwards."""
    root = tmp_path / "site"
    root.mkdir()
    monkeypatch.syspath_prepend(str(root))
    before = set(sys.modules)
    yield root
    for name in set(sys.modules) - before:
        if getattr(sys.modules[name], "__file__", "") and str(root) in sys.modules[name].__file__:
            del sys.modules[name]


def run_cli(args: list[str], cwd: Path = REPO, env: dict | None = None, timeout: int = 600):
    """Run ``python -m core.run ARGS`` in a subprocess; returns the CompletedProcess."""
    import subprocess

    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", "core.run", *args], cwd=cwd, env=full_env,
                          capture_output=True, text=True, timeout=timeout)
