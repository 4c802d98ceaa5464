"""The SN family (``sn``, ``ssn``, ``bsn``, ``bssn``) and what every regularizer plugin shares:
equality with torch's spectral_norm, effective weights against float64 SVD formulas (SPEC §2),
state updates, Configs."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrizations, parametrize

from core.errors import SpecregError
from core.registry import get_registry
from core.layers import frozen_state, regularized_layers
from plugins.regularizers.bsn import input_matrix
from test_regularizers_support import (SHAPE_IDS, SHAPES, converge, layer_for, make_weight,
                                       rel_err, svd64)

torch.set_num_threads(1)

ALL = ["sn", "ssn", "bsn", "bssn", "sr_static", "sr_dynamic"]


def create(name: str, **config):
    cls = get_registry().regularizers[name]
    return cls(cls.Config(**config))


def small_d(num_classes: int = 0) -> nn.Module:
    """A tiny conditional discriminator: conv, linear and a projection embedding."""

    class D(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.c1 = nn.Conv2d(3, 6, 3, padding=1)
            self.c2 = nn.Conv2d(6, 8, 1)
            self.linear = nn.Linear(8, 1)
            self.embed = nn.Embedding(max(num_classes, 1), 8)

        def forward(self, x, y=None):
            h = torch.relu(self.c2(torch.relu(self.c1(x)))).sum(dim=(2, 3))
            out = self.linear(h).flatten()
            if y is not None:
                out = out + (self.embed(y) * h).sum(1)
            return out

    torch.manual_seed(0)
    return D()


def sigma64(matrix: torch.Tensor) -> float:
    return float(svd64(matrix)[1][0])


# -- registry and Configs ------------------------------------------------------------------------


def test_all_six_are_registered_with_documented_configs():
    reg = get_registry()
    for name in ALL:
        cls = reg.regularizers[name]
        assert "eq." in cls.__doc__ or "§" in cls.__doc__, name  # cites paper and equation
        cls.Config()  # default-constructible


@pytest.mark.parametrize("name, config, words", [
    ("ssn", dict(scale=0.0), ["ssn", "scale", "> 0"]),
    ("bssn", dict(scale=-1.0), ["bssn", "scale"]),
    ("sr_static", dict(fraction=0.0), ["fraction", "(0, 1]"]),
    ("sr_static", dict(fraction=1.5), ["fraction"]),
    ("sr_static", dict(every=0), ["every", ">= 1"]),
    ("sr_dynamic", dict(start=-3), ["start", ">= 0"]),
    ("sr_dynamic", dict(mode="project"), ["mode", "'projection'", "'parametrization'"]),
    ("sr_static", dict(layers=["conv", "bn"]), ["'bn'", "'conv'", "'linear'", "'embedding'"]),
    ("sr_static", dict(layers=[]), ["layers", "non-empty"]),
    ("sr_static", dict(layers="conv"), ["layers", "list"]),
])
def test_bad_config_values_are_user_errors_naming_the_field(name, config, words):
    cls = get_registry().regularizers[name]
    with pytest.raises(SpecregError) as info:
        cls.Config(**config)
    for word in words:
        assert word in str(info.value)


def test_configs_structure_from_recipe_tables():
    from core.recipe import converter

    cls = get_registry().regularizers["sr_static"]
    config = converter.structure({"fraction": 0.25, "mode": "parametrization",
                                  "layers": ["conv", "embedding"], "every": 1}, cls.Config)
    assert config == cls.Config(fraction=0.25, every=1, mode="parametrization",
                                layers=["conv", "embedding"])
    assert converter.unstructure(cls.Config())["layers"] == ["conv"]


def test_applying_twice_is_an_error():
    d = small_d()
    create("sn").apply(d)
    with pytest.raises(SpecregError, match="already parametrized"):
        create("sr_static").apply(d)


@pytest.mark.parametrize("name", ALL)
def test_every_weight_layer_is_parametrized_and_biases_are_not(name):
    d = small_d(num_classes=3)
    create(name).apply(d)
    names = [n for n, _ in regularized_layers(d)]
    assert names == ["c1", "c2", "linear", "embed"]
    for _, layer in regularized_layers(d):
        assert not parametrize.is_parametrized(layer, "bias")
    x, y = torch.randn(2, 3, 5, 5), torch.tensor([0, 2])
    out = d(x, y)
    out.sum().backward()
    assert out.shape == (2,) and all(p.grad is not None for p in d.parameters())


# -- sn is torch's spectral_norm ---------------------------------------------------------------


@pytest.mark.parametrize("make_layer", [
    lambda: nn.Conv2d(3, 5, 3), lambda: nn.Linear(7, 4), lambda: nn.Embedding(6, 4),
    lambda: nn.Conv2d(4, 2, 1)], ids=["conv", "linear", "embedding", "conv1x1"])
def test_sn_equals_torch_spectral_norm(make_layer):
    torch.manual_seed(1)
    ours, theirs = make_layer(), make_layer()
    theirs.load_state_dict(ours.state_dict())
    parametrizations.spectral_norm(theirs)
    create("sn").apply(ours)
    # same buffer names and layout: torch's state (its u, v) loads into ours
    assert set(ours.state_dict()) == set(theirs.state_dict())
    ours.load_state_dict(theirs.state_dict())
    opt_ours = torch.optim.SGD(ours.parameters(), lr=0.1)
    opt_theirs = torch.optim.SGD(theirs.parameters(), lr=0.1)
    gen = torch.Generator().manual_seed(2)
    for _ in range(4):  # several training steps: forward, gradient, update
        if isinstance(ours, nn.Embedding):
            x = torch.randint(0, 6, (5,), generator=gen)
        elif isinstance(ours, nn.Linear):
            x = torch.randn(5, 7, generator=gen)
        else:
            x = torch.randn(2, ours.in_channels, 6, 6, generator=gen)
        outs, target = [], None
        for layer, opt in ((ours, opt_ours), (theirs, opt_theirs)):
            opt.zero_grad()
            out = layer(x)
            if target is None:
                target = torch.randn(out.shape, generator=gen)
            ((out - target) ** 2).sum().backward()
            outs.append(out.detach())
        assert torch.allclose(outs[0], outs[1], rtol=1e-6, atol=1e-7)
        g_ours = ours.parametrizations.weight.original.grad
        g_theirs = theirs.parametrizations.weight.original.grad
        assert torch.allclose(g_ours, g_theirs, rtol=1e-5, atol=1e-7)
        opt_ours.step()
        opt_theirs.step()
        for buf in ("_u", "_v"):
            assert torch.allclose(getattr(ours.parametrizations.weight[0], buf),
                                  getattr(theirs.parametrizations.weight[0], buf), atol=1e-6)


# -- effective weights against float64 SVD formulas ------------------------------------------


@pytest.mark.parametrize("shape_name, shape, rank", SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("name, scale", [("sn", 1.0), ("ssn", 1.7), ("bsn", 1.0),
                                         ("bssn", 0.8)])
def test_effective_weight_matches_the_formula(name, scale, shape_name, shape, rank):
    weight = make_weight(shape, rank, seed=len(shape_name))
    layer = layer_for(shape, weight)
    config = {"scale": scale} if name in ("ssn", "bssn") else {}
    create(name, **config).apply(layer)
    converge(layer, 800 if name in ("bsn", "bssn") else 300)
    w = weight.double()
    if name in ("bsn", "bssn") and len(shape) == 4:
        expected = w / ((sigma64(w.reshape(shape[0], -1)) + sigma64(input_matrix(w))) / 2)
    else:
        expected = w / sigma64(w.reshape(shape[0], -1))
    assert rel_err(layer.weight, scale * expected) < 1e-4


def test_scale_multiplies_weights_never_biases():
    torch.manual_seed(3)
    base = nn.Conv2d(3, 4, 3)
    for name, unscaled in (("ssn", "sn"), ("bssn", "bsn")):
        plain = nn.Conv2d(3, 4, 3)
        scaled = nn.Conv2d(3, 4, 3)
        plain.load_state_dict(base.state_dict())
        scaled.load_state_dict(base.state_dict())
        create(unscaled).apply(plain)
        create(name, scale=2.5).apply(scaled)
        scaled.load_state_dict(plain.state_dict())  # same power-iteration state
        plain.eval()
        scaled.eval()
        assert torch.allclose(scaled.weight, 2.5 * plain.weight)
        x = torch.randn(1, 3, 5, 5)
        # with a bias only the weight part is scaled: out = 2.5 (W*x) + b
        nobias = (plain(x) - plain.bias.view(1, -1, 1, 1))
        assert torch.allclose(scaled(x), 2.5 * nobias + base.bias.view(1, -1, 1, 1), atol=1e-5)


def test_bsn_keeps_two_power_iterations_per_conv_and_plain_sn_elsewhere():
    d = small_d(num_classes=2)
    create("bsn").apply(d)
    state = d.state_dict()
    for conv in ("c1", "c2"):
        assert {f"{conv}.parametrizations.weight.0.{b}" for b in ("_u", "_v", "_u_in", "_v_in")} \
            <= set(state)
        assert state[f"{conv}.parametrizations.weight.0._u_in"].shape == \
            (getattr(d, conv).in_channels,)
    assert not any(k.startswith(("linear.", "embed.")) and k.endswith("_in") for k in state)
    # Linear/Embedding: exactly SN
    converge(d, 300)
    assert rel_err(d.linear.weight, d.linear.parametrizations.weight.original
                   / sigma64(d.linear.parametrizations.weight.original)) < 1e-4


# -- state updates ---------------------------------------------------------------------------


STATE_BUFFERS = ("_u", "_v", "_u_in", "_v_in", "_gamma", "_initialized")


def _state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in module.state_dict().items()
            if k.rsplit(".", 1)[-1] in STATE_BUFFERS}


@pytest.mark.parametrize("name, config", [(n, {}) for n in ALL] + [
    ("sr_static", {"mode": "parametrization"}), ("sr_dynamic", {"mode": "parametrization"})])
def test_state_updates_only_in_training_mode_outside_frozen_state(name, config):
    d = small_d(num_classes=2)
    create(name, **config).apply(d)
    x, y = torch.randn(2, 3, 5, 5), torch.tensor([0, 1])
    before = _state(d)
    d.train()
    with frozen_state():
        d(x, y)
    assert all(torch.equal(before[k], v) for k, v in _state(d).items()), "frozen_state"
    d.eval()
    d(x, y)
    assert all(torch.equal(before[k], v) for k, v in _state(d).items()), "eval mode"
    d.train()
    d(x, y)
    after = _state(d)
    assert not torch.equal(before["c1.parametrizations.weight.0._u"],
                           after["c1.parametrizations.weight.0._u"])


@pytest.mark.parametrize("name", ALL)
def test_autocast_does_not_change_the_parametrization(name):
    d = small_d()
    create(name).apply(d)
    d.eval()
    plain = d.c1.weight
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under = d.c1.weight
    assert under.dtype == torch.float32
    assert torch.equal(plain, under)
