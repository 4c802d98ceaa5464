"""Tests of specreg-orthogonal: specreg's conformance kit, and the penalty and its gradient
against independent float64 computations of BigGAN's definition (Brock et al. 2019, eq. 3).

    pip install -e ".[test]" && pytest        # from examples/specreg-orthogonal
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from core.errors import SpecregError
from core.interfaces import StepContext
from core.registry import get_registry
from core.recipe import load_recipe
from core.testing import Case, parametrize_with_checks
from specreg_orthogonal import Orthogonal, orthogonality, recipe_path

FULL = Orthogonal(Orthogonal.Config(strength=1e-2, off_diagonal_only=False))


def step_context(net: nn.Module, phase: str = "G") -> StepContext:
    """The context of a step of ``net``'s network (orthogonal regularization reads only
    ``module``)."""
    return StepContext(phase=phase, iteration=0, step=0, micro_batch=0, num_micro_batches=1,
                       discriminator=net, generator=net, module=net)


@parametrize_with_checks([Orthogonal, Case(FULL, id="regularizers/orthogonal-full")])
def test_conformance(plugin, check):
    check(plugin)


def off_diagonal_penalty(w: np.ndarray) -> float:
    """sum_{i != j} <w_i, w_j>^2 over the rows (filters) of w, written out."""
    rows = w.reshape(w.shape[0], -1)
    return sum(float(rows[i] @ rows[j]) ** 2
               for i in range(len(rows)) for j in range(len(rows)) if i != j)


def test_penalty_is_the_sum_of_squared_filter_inner_products():
    w = torch.randn(5, 3, 3, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    assert orthogonality(w).item() == pytest.approx(off_diagonal_penalty(w.numpy()), rel=1e-12)
    rows = w.reshape(5, -1).numpy()
    full = np.sum((rows @ rows.T - np.eye(5)) ** 2)
    assert orthogonality(w, off_diagonal_only=False).item() == pytest.approx(full, rel=1e-12)


@pytest.mark.parametrize("off_diagonal_only", [True, False])
def test_gradient_is_biggans_update(off_diagonal_only):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 6, 3), nn.Flatten(), nn.Linear(24, 4), nn.Embedding(3, 4)).double()
    strength = 0.3
    reg = Orthogonal(Orthogonal.Config(strength=strength, off_diagonal_only=off_diagonal_only))
    reg.penalty(step_context(reg.apply(net))).backward()
    for layer in (net[0], net[2], net[3]):
        w = layer.weight.detach().numpy().reshape(layer.weight.shape[0], -1)
        gram = w @ w.T
        residual = gram * (1 - np.eye(len(w))) if off_diagonal_only else gram - np.eye(len(w))
        expected = strength * 2 * residual @ w  # BigGAN's published update, strength * grad
        np.testing.assert_allclose(layer.weight.grad.numpy().reshape(w.shape), expected,
                                   rtol=1e-10, atol=1e-14)


def test_layers_select_what_is_penalized():
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Linear(4, 4), nn.Embedding(3, 4))
    reg = Orthogonal(Orthogonal.Config(layers=["linear"]))
    reg.penalty(step_context(reg.apply(net))).backward()
    assert net[1].weight.grad is not None
    assert net[0].weight.grad is None and net[2].weight.grad is None
    assert Orthogonal(Orthogonal.Config(strength=0.0)).penalty(step_context(net)) is None


def test_the_penalty_is_the_same_in_d_and_g_steps_and_needs_no_batch():
    torch.manual_seed(1)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Linear(4, 4))
    reg = Orthogonal(Orthogonal.Config(strength=0.5))
    assert Orthogonal.needs == frozenset() and reg.penalty_every == 1
    assert torch.equal(reg.penalty(step_context(net, "G")), reg.penalty(step_context(net, "D")))
    assert reg.penalty(step_context(net)).item() == pytest.approx(
        0.25 * sum(off_diagonal_penalty(layer.weight.detach().numpy()) for layer in net))


def test_invalid_settings_are_user_errors_naming_the_valid_choices():
    with pytest.raises(SpecregError, match="unknown layer type.*'lineer'.*valid: 'conv'"):
        Orthogonal(Orthogonal.Config(layers=["conv", "lineer"]))
    with pytest.raises(SpecregError, match="strength must be >= 0"):
        Orthogonal(Orthogonal.Config(strength=-1.0))
    with pytest.raises(SpecregError, match="has no layer of the types embedding"):
        Orthogonal(Orthogonal.Config(layers=["embedding"])).apply(nn.Linear(2, 2))


def test_installed_entry_point_registers_it_and_the_recipe_uses_it():
    regularizers = get_registry().regularizers
    assert regularizers["orthogonal"] is Orthogonal
    assert regularizers.providers["orthogonal"].distribution == "specreg-orthogonal"
    assert regularizers.providers["r2"].distribution == "specreg-orthogonal"
    recipe = load_recipe(recipe_path())
    assert recipe.generator.regularizer.name == "orthogonal"
    assert recipe.generator.regularizer.config == Orthogonal.Config(strength=1e-4,
                                                                   layers=["conv", "linear"])
