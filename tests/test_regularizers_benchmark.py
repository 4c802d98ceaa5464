"""benchmarks/regularizers.py keeps working: its pieces run on tiny widths, and the SR
applications it times agree with the float64 formula."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from test_regularizers_support import REPO_ROOT

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_regularizers",
                                                  REPO_ROOT / "benchmarks" / "regularizers.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_svd_table_is_accurate(bench):
    rows = {name: (seconds, speedup, err) for name, seconds, speedup, err
            in bench.svd_table(ch=2, repeats=1)}
    assert set(rows) >= {"plain torch.linalg.svd", "sr_static application",
                         "sr_dynamic application"}
    assert rows["sr_static application"][2] < 1e-4
    assert rows["sr_dynamic application"][2] < 1e-4


def test_dstep_table_has_every_variant(bench):
    rows = bench.dstep_table(ch=4, batch=2, repeats=1, block=5)
    assert [(name, mode) for name, mode, _, _ in rows] == \
        [(name, mode) for name, _, mode in bench.VARIANTS]
    assert rows[0][3] == 1.0 and all(seconds > 0 for _, _, seconds, _ in rows)
