"""The fast exact SVD of core/svd.py against LAPACK's float64 SVD: singular values (also through
:func:`core.svd.singular_values`, the path the spectral monitor takes), vectors, and spectrum
re-weighting on tall, wide, square, rank-deficient, r = 1 and collapsed-spectrum matrices, on
both sides of the one trust threshold :data:`core.svd.TRUSTED`."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from core.spectral import measure
from core.svd import TRUSTED, singular_values, svd, thin_svd
from test_regularizers_support import gapped_spectrum, rel_err, svd64, with_spectrum

torch.set_num_threads(1)


def collapsed(m: int, n: int, smallest: float, seed: int = 0) -> torch.Tensor:
    """A 'spectrally collapsed' matrix: singular values falling log-uniformly to ``smallest``."""
    r = min(m, n)
    return with_spectrum(m, n, torch.logspace(0, torch.log10(torch.tensor(smallest)), r,
                                              dtype=torch.float64) * 2.0, seed)


MATRICES = {
    "wide": lambda: torch.randn(12, 70, generator=torch.Generator().manual_seed(0)),
    "tall": lambda: torch.randn(70, 12, generator=torch.Generator().manual_seed(1)),
    "square": lambda: torch.randn(25, 25, generator=torch.Generator().manual_seed(2)),
    # more than 128 rows (columns): the Gram matrix is formed block by block
    "wide-blocked": lambda: torch.randn(300, 650, generator=torch.Generator().manual_seed(10)),
    "tall-blocked": lambda: torch.randn(650, 520, generator=torch.Generator().manual_seed(11)),
    "rank-deficient": lambda: with_spectrum(15, 40, gapped_spectrum(15, 3, rank=6), 3),
    "rank-deficient-tall": lambda: with_spectrum(40, 15, gapped_spectrum(15, 4, rank=6), 4),
    "r1-row": lambda: torch.randn(1, 30, generator=torch.Generator().manual_seed(5)),
    "r1-column": lambda: torch.randn(30, 1, generator=torch.Generator().manual_seed(6)),
    "collapsed-1e-3": lambda: collapsed(30, 90, 1e-3, 7),
    "collapsed-1e-6": lambda: collapsed(90, 30, 1e-6, 8),
    # just above the trust threshold: Gram route, and the final product must run in float64
    "collapsed-2e-3": lambda: collapsed(128, 300, 2 * TRUSTED, 9),
    # just below it: LAPACK for any request that reaches the smallest values
    "collapsed-5e-4": lambda: collapsed(300, 128, TRUSTED / 2, 12),
}


@pytest.mark.parametrize("name", list(MATRICES))
def test_svd_matches_lapack(name):
    a = MATRICES[name]()
    u, s, vh = svd(a)
    u_ref, s_ref, vh_ref = svd64(a)
    assert s.dtype == torch.float64
    assert torch.allclose(s, s_ref, rtol=0, atol=1e-9 * float(s_ref[0]))
    r = len(s)
    eye = torch.eye(r, dtype=torch.float64)
    assert torch.allclose(u.T @ u, eye, atol=1e-8) and torch.allclose(vh @ vh.T, eye, atol=1e-8)
    assert rel_err((u * s) @ vh, a) < 1e-10
    # singular vectors of distinct, non-negligible singular values agree up to sign
    keep = (s_ref > 1e-3 * s_ref[0]).nonzero().flatten()
    for k in keep.tolist():
        if k + 1 < r and s_ref[k] - s_ref[k + 1] < 1e-3 * s_ref[0]:
            continue
        if k > 0 and s_ref[k - 1] - s_ref[k] < 1e-3 * s_ref[0]:
            continue
        sign = torch.sign(u[:, k] @ u_ref[:, k])
        assert torch.allclose(u[:, k] * sign, u_ref[:, k], atol=1e-6)
        assert torch.allclose(vh[k] * sign, vh_ref[k], atol=1e-6)


@pytest.mark.parametrize("name", list(MATRICES))
@pytest.mark.parametrize("flavour", ["static-half", "static-all", "dynamic"])
def test_respectrum_matches_the_float64_formula(name, flavour):
    a = MATRICES[name]()
    u_ref, s_ref, vh_ref = svd64(a)
    r = len(s_ref)
    rank = int((s_ref > 1e-5 * s_ref[0]).sum())
    dec = thin_svd(a)
    s1 = dec.S[0]
    if flavour == "dynamic":
        # gamma >= s/s1, some entries raised (SPEC §2.2); the result is U diag(gamma s1) V^T
        gen = torch.Generator().manual_seed(r)
        gamma = torch.maximum(s_ref / s_ref[0],
                              torch.rand(r, generator=gen, dtype=torch.float64) * 0.5)
        gamma[rank:] = 0  # a record of a rank-deficient layer has zeros there
        new, alpha = gamma * s1, 1.0
        expected = (u_ref * (gamma * s_ref[0])) @ vh_ref
    else:
        i = max(1, r // 2) if flavour == "static-half" else r
        i = min(i, rank)  # past the rank the singular vectors are not unique
        new = dec.S / s1
        new[:i] = 1.0
        alpha = 1.0 / float(s1)
        target = s_ref.clone()
        target[:i] = s_ref[0]
        expected = (u_ref * (target / s_ref[0])) @ vh_ref
    out = dec.respectrum(new, alpha=alpha)
    assert out.dtype == a.dtype and out.shape == a.shape
    # SPEC accuracy is 1e-4; the fast path keeps to float32 rounding level, whatever the spectrum
    assert rel_err(out, expected) < 1e-5


def test_gram_route_is_used_for_well_conditioned_matrices():
    """The fast path must not silently fall back to LAPACK on ordinary weights."""
    a = torch.randn(64, 576, generator=torch.Generator().manual_seed(0))
    dec = thin_svd(a)
    new = dec.S / dec.S[0]
    new[:32] = 1.0
    dec.respectrum(new, alpha=1 / float(dec.S[0]))
    assert not dec.is_exact


def test_tiny_compensated_singular_values_fall_back_to_lapack():
    a = collapsed(20, 50, TRUSTED / 100, seed=1)
    dec = thin_svd(a)
    new = torch.ones_like(dec.S)  # raise every singular value, the tiny ones included
    dec.respectrum(new, alpha=1 / float(dec.S[0]))
    assert dec.is_exact


def test_rank_deficient_static_past_the_rank_gives_orthonormal_completion():
    """i > rank: the SVD is not unique, but the result must still have i singular values 1."""
    a = with_spectrum(8, 20, gapped_spectrum(8, 2, rank=3), 2)
    dec = thin_svd(a)
    new = dec.S / dec.S[0]
    new[:6] = 1.0
    out = dec.respectrum(new, alpha=1 / float(dec.S[0]))
    s = torch.linalg.svdvals(out.double())
    assert torch.allclose(s[:6], torch.ones(6, dtype=torch.float64), atol=1e-6)
    assert torch.allclose(s[6:], torch.zeros(2, dtype=torch.float64), atol=1e-6)


@pytest.mark.parametrize("name", list(MATRICES))
def test_singular_values_match_lapack(name):
    """The monitor's path: every singular value, float64, exact to 1e-9 relative even where the
    spectrum collapses below the trust threshold (the Gram route alone would be ~1e-4 off at
    1e-6 s_1)."""
    a = MATRICES[name]()
    s_ref = torch.linalg.svdvals(a.double())
    s = singular_values(a)
    assert s.dtype == torch.float64 and s.device.type == "cpu" and s.shape == s_ref.shape
    assert torch.allclose(s, s_ref, rtol=1e-9, atol=1e-13 * float(s_ref[0]))
    assert torch.all(s[:-1] >= s[1:])
    # the monitor records exactly these values
    np.testing.assert_array_equal(measure.singular_values(a), s.numpy())
    # and ThinSVD, SR's decomposition, agrees on them
    assert torch.allclose(thin_svd(a).exact().S, s_ref, rtol=1e-9, atol=1e-13 * float(s_ref[0]))


def test_singular_values_of_a_layer_the_monitor_measures_match_lapack():
    """measure_layer (effective weight of an SN-parametrized conv) goes through core.svd."""
    from torch import nn

    from core.layers import weight_matrix
    from core.registry import get_registry

    torch.manual_seed(0)
    layer = get_registry().create("regularizers", "sn").apply(nn.Conv2d(24, 40, 3))
    with measure.reading_weights(layer):
        spectrum = measure.measure_layer(layer)
        effective = weight_matrix(layer.weight).double()
    np.testing.assert_allclose(spectrum.singular_values, torch.linalg.svdvals(effective).numpy(),
                               rtol=1e-9, atol=1e-15)


@pytest.mark.parametrize("ratio, gram_route", [(2 * TRUSTED, True), (TRUSTED / 2, False)])
def test_one_trust_threshold_decides_the_route_for_both_users(ratio, gram_route):
    """A spectrum reaching ``ratio * s_1``: above TRUSTED both the monitor's values and SR's
    decomposition stay on the Gram route; below it both use LAPACK's values."""
    a = collapsed(40, 100, ratio, seed=3)
    a64 = a.double()
    s_ref = torch.linalg.svdvals(a64)
    gram = torch.linalg.eigvalsh(a64 @ a64.T, UPLO="U").flip(0).clamp_min(0).sqrt()
    assert torch.equal(singular_values(a), gram if gram_route else s_ref)
    dec = thin_svd(a)
    dec.triplets(slice(None))  # every direction asked for, as the monitor asks
    assert dec.is_exact is (not gram_route)
    assert torch.allclose(dec.S, s_ref, rtol=1e-9, atol=1e-13 * float(s_ref[0]))


def test_singular_values_of_a_non_finite_or_empty_matrix():
    assert torch.isnan(singular_values(torch.full((3, 4), math.nan))).all()
    assert len(singular_values(torch.full((3, 4), math.nan))) == 3
    assert singular_values(torch.zeros(0, 5)).shape == (0,)
    assert torch.equal(singular_values(torch.zeros(3, 2)), torch.zeros(2, dtype=torch.float64))
