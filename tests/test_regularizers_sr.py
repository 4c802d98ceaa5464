"""Spectral regularization (``sr_static``, ``sr_dynamic``; SPEC §2.1-2.3) against float64 SVD
formulas: projections, effective weights, the eq. 11 gradient, iteration schedule, state."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from core.registry import get_registry
from core.layers import raw_weight, regularized_layers
from plugins.regularizers.sr import FRESH_STATE, SpectralRegularizedWeight, static_rank
from test_regularizers import create, small_d
from test_regularizers_support import (SHAPE_IDS, SHAPES, converge, dynamic_reference,
                                       layer_for, make_weight, rel_err, static_reference, svd64)

torch.set_num_threads(1)

MODES = ["projection", "parametrization"]


def sr_param(layer: nn.Module) -> SpectralRegularizedWeight:
    p = layer.parametrizations.weight[0]
    assert isinstance(p, SpectralRegularizedWeight)
    return p


def matrix_of(layer: nn.Module) -> torch.Tensor:
    w = raw_weight(layer).detach()
    return w.reshape(w.shape[0], -1)


def effective(layer: nn.Module) -> torch.Tensor:
    w = layer.weight.detach()
    return w.reshape(w.shape[0], -1)


def rank_of(shape) -> int:
    return min(shape[0], int(torch.tensor(shape[1:]).prod()))


def layers_arg(shape) -> list[str]:
    return ["conv"] if len(shape) == 4 else ["linear"]


def test_static_rank():
    assert [static_rank(0.5, r) for r in (1, 2, 3, 27, 64)] == [1, 1, 1, 13, 32]
    assert static_rank(0.29, 100) == 29 and static_rank(1.0, 7) == 7 and static_rank(1e-3, 9) == 1


# -- projection mode: the raw weight after after_step -----------------------------------------


@pytest.mark.parametrize("shape_name, shape, rank", SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("fraction", [0.5, 1.0])
def test_static_projection_matches_the_formula(shape_name, shape, rank, fraction):
    r = rank_of(shape)
    i = static_rank(fraction, r)
    if rank is not None and i > rank:
        i = rank  # past the rank the singular vectors (so the result) are not unique
        fraction = rank / r
    layer = layer_for(shape, make_weight(shape, rank, seed=r))
    reg = create("sr_static", fraction=fraction, layers=layers_arg(shape))
    reg.apply(layer)
    before = matrix_of(layer).clone()
    reg.after_step(layer, 0)
    assert rel_err(matrix_of(layer), static_reference(before, i)) < 1e-4
    s = svd64(matrix_of(layer))[1]
    assert torch.allclose(s[:i], torch.ones(i, dtype=torch.float64), atol=1e-5)


@pytest.mark.parametrize("shape_name, shape, rank", SHAPES, ids=SHAPE_IDS)
def test_dynamic_projection_records_then_holds_the_running_maximum(shape_name, shape, rank):
    r = rank_of(shape)
    layer = layer_for(shape, make_weight(shape, rank, seed=r + 1))
    reg = create("sr_dynamic", every=1, layers=layers_arg(shape))
    reg.apply(layer)
    p = sr_param(layer)
    first = matrix_of(layer).clone()
    reg.after_step(layer, 0)  # the first application only records gamma
    assert torch.equal(matrix_of(layer), first)
    s = svd64(first)[1]
    assert bool(p._initialized)
    assert torch.allclose(p._gamma, s / s[0], atol=1e-6)
    # the weight moves (as an optimizer step would), its spectrum collapses a little
    with torch.no_grad():
        u, s2, vh = svd64(first)
        shrunk = s2 * torch.linspace(1.0, 0.3, r, dtype=torch.float64)
        drift = make_weight(shape, None, seed=r + 7).reshape(shape[0], -1).double() * 0.02
        raw_weight(layer).copy_(((u * shrunk) @ vh + drift).reshape(shape).float())
    second = matrix_of(layer).clone()
    s_second = svd64(second)[1]
    gamma = torch.maximum(s / s[0], s_second / s_second[0])
    reg.after_step(layer, 1)
    assert torch.allclose(p._gamma, gamma, atol=1e-6)
    assert rel_err(matrix_of(layer), dynamic_reference(second, gamma)) < 1e-4
    # the scale s_1 is kept, the spectrum's shape is the recorded maximum
    s_after = svd64(matrix_of(layer))[1]
    assert torch.allclose(s_after, gamma * s_second[0], atol=1e-4 * float(s_second[0]))


def test_sn_state_is_used_unchanged_after_projection():
    """After a projection the forward pass divides by SN's sigma of the new raw weight."""
    layer = layer_for((8, 3, 3, 3), make_weight((8, 3, 3, 3), None, seed=4))
    reg = create("sr_static")
    reg.apply(layer)
    reg.after_step(layer, 0)
    converge(layer, 300)
    raw = matrix_of(layer).double()
    assert rel_err(effective(layer), raw / svd64(raw)[1][0]) < 1e-4


# -- parametrization mode: the forward pass -----------------------------------------------------


@pytest.mark.parametrize("shape_name, shape, rank", SHAPES, ids=SHAPE_IDS)
def test_static_parametrization_matches_eq_10(shape_name, shape, rank):
    r = rank_of(shape)
    fraction = 0.5 if rank is None else min(0.5, rank / r)
    i = static_rank(fraction, r)
    layer = layer_for(shape, make_weight(shape, rank, seed=r + 2))
    create("sr_static", fraction=fraction, mode="parametrization",
           layers=layers_arg(shape)).apply(layer)
    layer.eval()
    assert rel_err(effective(layer), static_reference(matrix_of(layer), i)) < 1e-4


@pytest.mark.parametrize("shape_name, shape, rank", SHAPES, ids=SHAPE_IDS)
def test_dynamic_parametrization_uses_the_recorded_gamma(shape_name, shape, rank):
    r = rank_of(shape)
    layer = layer_for(shape, make_weight(shape, rank, seed=r + 3))
    create("sr_dynamic", mode="parametrization", layers=layers_arg(shape)).apply(layer)
    p = sr_param(layer)
    layer.eval()
    w0 = matrix_of(layer).clone()
    # nothing recorded yet: SN
    assert not bool(p._initialized)
    layer.train()
    first = effective(layer)  # records gamma = s/s1 and changes nothing
    s0 = svd64(w0)[1]
    assert torch.allclose(p._gamma, s0 / s0[0], atol=1e-6)
    assert rel_err(first, w0.double() / s0[0]) < 1e-4
    with torch.no_grad():  # a collapsing update
        u, s, vh = svd64(w0)
        raw_weight(layer).copy_(((u * (s * torch.linspace(1, 0.2, r, dtype=torch.float64)))
                                 @ vh).reshape(shape).float())
    layer.eval()  # eval: no new record, uses gamma: U diag(gamma) V^T of the new weight
    assert rel_err(effective(layer), dynamic_reference(matrix_of(layer), p._gamma)
                   / svd64(matrix_of(layer))[1][0]) < 1e-4
    assert torch.allclose(p._gamma, s0 / s0[0], atol=1e-6)


def _explicit_eq10(w: torch.Tensor, i: int) -> torch.Tensor:
    """Eq. 10 in float64: W/s1 + sum_{k<=i} (1 - s_k/s1) u_k v_k^T, u_k v_k constants."""
    u, _, vh = torch.linalg.svd(w.detach(), full_matrices=False)
    u, v = u[:, :i], vh[:i].T
    s = torch.einsum("mk,mn,nk->k", u, w, v)
    return w / s[0] + (u * (1 - s / s[0])) @ v.T


def _eq11_vjp(w: torch.Tensor, g: torch.Tensor, i: int) -> torch.Tensor:
    """The gradient of <G, W_SR(W)> written out from eq. 11 of Liu et al. 2019 (float64)."""
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    s1, e1 = s[0], torch.outer(u[:, 0], vh[0])
    w_sn = w / s1
    dw = sum(((s1 - s[k]) * torch.outer(u[:, k], vh[k]) for k in range(1, i)),
             torch.zeros_like(w))
    grad = g - (g * w_sn).sum() * e1 - (g * dw / s1).sum() * e1
    for k in range(1, i):
        ek = torch.outer(u[:, k], vh[k])
        grad = grad + (e1 - ek) * (g * ek).sum()
    return grad / s1


@pytest.mark.parametrize("shape_name, shape, rank", [s for s in SHAPES if s[2] is None],
                         ids=[s[0] for s in SHAPES if s[2] is None])
def test_parametrization_gradient_is_eq_11(shape_name, shape, rank):
    r = rank_of(shape)
    i = static_rank(0.5, r)
    layer = layer_for(shape, make_weight(shape, rank, seed=r + 4))
    create("sr_static", mode="parametrization", layers=layers_arg(shape)).apply(layer)
    layer.eval()
    g = torch.randn(layer.weight.shape, generator=torch.Generator().manual_seed(r))
    (layer.weight * g).sum().backward()
    ours = raw_weight(layer).grad.reshape(shape[0], -1).double()
    w = matrix_of(layer).double().requires_grad_(True)
    g64 = g.reshape(shape[0], -1).double()
    (_explicit_eq10(w, i) * g64).sum().backward()
    assert rel_err(ours, w.grad) < 1e-4
    assert rel_err(ours, _eq11_vjp(w.detach(), g64, i)) < 1e-4


def test_dynamic_parametrization_gradient_matches_autograd_in_float64():
    shape = (6, 4, 3, 3)
    layer = layer_for(shape, make_weight(shape, None, seed=9))
    create("sr_dynamic", mode="parametrization").apply(layer)
    p = sr_param(layer)
    with torch.no_grad():
        p._gamma.copy_(torch.linspace(1, 0.6, 6, dtype=torch.float64))
        p._initialized.fill_(True)
    layer.eval()
    g = torch.randn(layer.weight.shape, generator=torch.Generator().manual_seed(1))
    (layer.weight * g).sum().backward()
    w = matrix_of(layer).double().requires_grad_(True)
    u, _, vh = torch.linalg.svd(w.detach(), full_matrices=False)
    s = torch.einsum("mk,mn,kn->k", u, w, vh)
    expected = w / s[0] + (u * (p._gamma - s / s[0])) @ vh
    (expected * g.reshape(6, -1).double()).sum().backward()
    assert rel_err(raw_weight(layer).grad.reshape(6, -1), w.grad) < 1e-4


# -- SN as a special case, and i = r --------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_static_with_i_equal_1_is_sn(mode):
    shape = (8, 4, 3, 3)
    weight = make_weight(shape, None, seed=11)
    sn_layer, sr_layer = layer_for(shape, weight), layer_for(shape, weight)
    create("sn").apply(sn_layer)
    reg = create("sr_static", fraction=1 / 8, mode=mode)
    reg.apply(sr_layer)
    assert sr_param(sr_layer).rank == 1
    reg.after_step(sr_layer, 0)
    converge(sn_layer, 300)
    converge(sr_layer, 300)
    assert rel_err(sr_layer.weight, sn_layer.weight) < 1e-4


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("shape", [(8, 4, 3, 3), (12, 2, 1, 1), (20, 3, 2, 2)])
def test_static_with_i_equal_r_has_all_singular_values_1(mode, shape):
    layer = layer_for(shape, make_weight(shape, None, seed=12))
    reg = create("sr_static", fraction=1.0, mode=mode)
    reg.apply(layer)
    reg.after_step(layer, 0)
    converge(layer, 300)
    s = svd64(effective(layer))[1]
    assert torch.allclose(s, torch.ones_like(s), atol=1e-4)


# -- when and where ------------------------------------------------------------------------


def _projections(reg, layer, iterations) -> list[int]:
    changed = []
    for it in iterations:
        w = raw_weight(layer)
        with torch.no_grad():  # keep the layer away from the fixed point of the projection
            w.mul_(torch.linspace(1.0, 0.5, w.shape[0]).view(-1, 1, 1, 1))
        moved = w.detach().clone()
        reg.after_step(layer, it)
        if not torch.equal(w, moved):
            changed.append(it)
    return changed


@pytest.mark.parametrize("name", ["sr_static", "sr_dynamic"])
def test_projection_happens_exactly_every_iterations_from_start(name):
    layer = layer_for((6, 3, 3, 3), make_weight((6, 3, 3, 3), None, seed=13))
    reg = create(name, every=5, start=7)
    reg.apply(layer)
    changed = _projections(reg, layer, range(23))
    # dynamic: the first application (10) only records gamma
    assert changed == ([10, 15, 20] if name == "sr_static" else [15, 20])
    if name == "sr_dynamic":
        assert bool(sr_param(layer)._initialized)


def test_parametrization_mode_switches_on_at_start():
    layer = layer_for((6, 3, 3, 3), make_weight((6, 3, 3, 3), None, seed=14))
    reg = create("sr_static", mode="parametrization", start=3)
    reg.apply(layer)
    layer.eval()
    sn_like = effective(layer).clone()
    assert not sr_param(layer).active
    reg.after_step(layer, 2)
    assert torch.equal(effective(layer), sn_like)  # still SN, weight unchanged
    reg.after_step(layer, 3)
    assert sr_param(layer).active
    assert rel_err(effective(layer), static_reference(matrix_of(layer), 3)) < 1e-4
    # no projection in parametrization mode
    before = matrix_of(layer).clone()
    reg.after_step(layer, 5)
    assert torch.equal(matrix_of(layer), before)


@pytest.mark.parametrize("name", ["sr_static", "sr_dynamic"])
def test_a_regularizer_only_touches_compensated_layers_of_its_module(name):
    d1, d2 = small_d(num_classes=3), small_d(num_classes=3)
    g = nn.Linear(4, 4)
    reg = create(name, every=1)
    reg.apply(d1)
    create("sn").apply(d2)
    untouched = {n: {k: v.clone() for k, v in m.state_dict().items()}
                 for n, m in (("d2", d2), ("g", g))}
    changed: set[str] = set()
    for it in range(3):
        with torch.no_grad():  # as an optimizer step would: every weight of d1 moves
            for _, layer in regularized_layers(d1):
                w = raw_weight(layer)
                w.mul_(torch.linspace(1.0, 0.5, w.shape[0]).view(-1, *[1] * (w.ndim - 1)))
        before = {k: v.clone() for k, v in d1.state_dict().items()}
        reg.after_step(d1, it)
        changed |= {k for k, v in d1.state_dict().items() if not torch.equal(v, before[k])}
        reg.after_step(d2, it)  # not applied there: no SR layers, nothing happens
        reg.after_step(g, it)
    for n, m in (("d2", d2), ("g", g)):
        assert all(torch.equal(v, untouched[n][k]) for k, v in m.state_dict().items()), n
    weights = {k for k in changed if k.endswith(".original")}
    assert weights == {"c1.parametrizations.weight.original", "c2.parametrizations.weight.original"}


def test_layers_option_extends_the_compensation():
    d = small_d(num_classes=5)
    reg = create("sr_static", layers=["conv", "embedding"], fraction=1.0)
    reg.apply(d)
    assert isinstance(d.embed.parametrizations.weight[0], SpectralRegularizedWeight)
    assert not isinstance(d.linear.parametrizations.weight[0], SpectralRegularizedWeight)
    reg.after_step(d, 0)
    s = svd64(matrix_of(d.embed))[1]
    assert torch.allclose(s, torch.ones_like(s), atol=1e-5)


def test_optimizer_moments_are_untouched():
    d = small_d()
    reg = create("sr_dynamic", every=1)
    reg.apply(d)
    opt = torch.optim.Adam(d.parameters(), lr=1e-2, betas=(0.0, 0.9))
    x = torch.randn(4, 3, 5, 5)
    for it in range(3):
        opt.zero_grad()
        d(x).sum().backward()
        opt.step()
        moments = {id(p): {k: v.clone() for k, v in opt.state[p].items()} for p in d.parameters()}
        reg.after_step(d, it)
        for p in d.parameters():
            assert all(torch.equal(v, moments[id(p)][k]) for k, v in opt.state[p].items())


# -- state: checkpoints, resume, determinism --------------------------------------------------


def test_gamma_round_trips_through_safetensors(tmp_path):
    d = small_d()
    reg = create("sr_dynamic", every=1)
    reg.apply(d)
    reg.after_step(d, 0)
    with torch.no_grad():
        raw_weight(d.c1).mul_(torch.linspace(1, 0.3, 6).view(-1, 1, 1, 1))
    reg.after_step(d, 1)
    save_file(d.state_dict(), str(tmp_path / "d.safetensors"))
    fresh = small_d()
    torch.manual_seed(99)  # different random power-iteration vectors
    create("sr_dynamic", every=1).apply(fresh)
    assert not bool(fresh.c1.parametrizations.weight[0]._initialized)
    fresh.load_state_dict(load_file(str(tmp_path / "d.safetensors")))
    for key, value in d.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], value), key
    p = fresh.c1.parametrizations.weight[0]
    assert p._gamma.dtype == torch.float64 and bool(p._initialized) and p.active
    # and the restored state acts the same
    reg.after_step(d, 2)
    create("sr_dynamic", every=1).after_step(fresh, 2)
    assert torch.equal(raw_weight(fresh.c1), raw_weight(d.c1))


def test_a_run_trained_with_sn_resumes_with_sr():
    d_sn, d_sr = small_d(num_classes=2), small_d(num_classes=2)
    create("sn").apply(d_sn)
    d_sn.train()
    d_sn(torch.randn(2, 3, 5, 5), torch.tensor([0, 1]))
    create("sr_dynamic").apply(d_sr)
    result = d_sr.load_state_dict(d_sn.state_dict(), strict=False)
    assert result.unexpected_keys == []
    assert {k.rsplit(".", 1)[-1] for k in result.missing_keys} <= set(FRESH_STATE)
    assert {k.split(".")[0] for k in result.missing_keys} == {"c1", "c2"}
    for key, value in d_sn.state_dict().items():
        assert torch.equal(d_sr.state_dict()[key], value)
    assert not bool(d_sr.c1.parametrizations.weight[0]._initialized)


def test_gamma_is_identical_for_identical_weights():
    """Every process of a distributed run computes the same gamma from the same weights."""
    a, b = small_d(), small_d()
    b.load_state_dict(a.state_dict())
    regs = [create("sr_dynamic", every=1) for _ in range(2)]
    regs[0].apply(a)
    regs[1].apply(b)
    b.load_state_dict(a.state_dict())
    for it in range(3):
        for reg, d in zip(regs, (a, b)):
            with torch.no_grad():
                raw_weight(d.c2).mul_(torch.linspace(1, 0.5, 8).view(-1, 1, 1, 1))
            reg.after_step(d, it)
    assert torch.equal(a.c2.parametrizations.weight[0]._gamma,
                       b.c2.parametrizations.weight[0]._gamma)
    assert torch.equal(raw_weight(a.c2), raw_weight(b.c2))


def test_registry_names():
    reg = get_registry().regularizers
    assert reg["sr_static"].Config().fraction == 0.5
    assert not hasattr(reg["sr_dynamic"].Config(), "fraction")
