"""The built-in adversarial losses against their papers' formulas, written out per sample in
float64: ``hinge`` (Lim & Ye 2017), ``ns`` (Goodfellow et al. 2014), ``wasserstein`` (Arjovsky
et al. 2017) and the relativistic average hinge ``rahinge`` (Jolicoeur-Martineau 2019), whose
generator loss uses real logits. Sign conventions: D's loss falls as real logits rise and fake
logits fall, G's loss falls as fake logits rise."""

from __future__ import annotations

import math

import pytest
import torch

from core.errors import SpecregError
from core.registry import get_registry


def softplus(v: float) -> float:
    return math.log1p(math.exp(-abs(v))) + max(v, 0.0)


def relu(v: float) -> float:
    return max(v, 0.0)


def mean(values) -> float:
    values = list(values)
    return sum(values) / len(values)


def reference(name: str, r: list[float], f: list[float]) -> tuple[float, float]:
    """(L_D, L_G) of loss ``name`` for real logits ``r`` and fake logits ``f``."""
    if name == "hinge":
        return mean(relu(1 - v) for v in r) + mean(relu(1 + v) for v in f), -mean(f)
    if name == "ns":  # -log sigmoid(r) - log(1 - sigmoid(f)); G: -log sigmoid(f)
        d = mean(-math.log(1 / (1 + math.exp(-v))) for v in r) + \
            mean(-math.log(1 - 1 / (1 + math.exp(-v))) for v in f)
        return d, mean(-math.log(1 / (1 + math.exp(-v))) for v in f)
    if name == "wasserstein":
        return mean(f) - mean(r), -mean(f)
    if name == "rahinge":
        mr, mf = mean(r), mean(f)
        d = mean(relu(1 - (v - mf)) for v in r) + mean(relu(1 + (v - mr)) for v in f)
        g = mean(relu(1 + (v - mf)) for v in r) + mean(relu(1 - (v - mr)) for v in f)
        return d, g
    raise KeyError(name)


NAMES = ["hinge", "ns", "wasserstein", "rahinge"]


def loss_of(name: str):
    return get_registry().losses[name]()


def g_loss(loss, fake: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    return loss.generator_loss(fake, real_logits=real)


@pytest.mark.parametrize("name", NAMES)
def test_values_match_the_papers_formulas(name):
    rng = torch.Generator().manual_seed(0)
    loss = loss_of(name)
    for _ in range(5):
        r = torch.randn(7, generator=rng, dtype=torch.float64) * 2
        f = torch.randn(7, generator=rng, dtype=torch.float64) * 2 - 0.5
        d_expected, g_expected = reference(name, r.tolist(), f.tolist())
        assert loss.discriminator_loss(r, f).item() == pytest.approx(d_expected, rel=1e-12)
        assert g_loss(loss, f, r).item() == pytest.approx(g_expected, rel=1e-12, abs=1e-15)


def test_ns_is_numerically_stable_at_large_logits():
    loss = loss_of("ns")
    big = torch.tensor([80.0, -80.0])
    assert torch.isfinite(loss.discriminator_loss(big, -big))
    assert loss.generator_loss(torch.tensor([-80.0])).item() == pytest.approx(80.0)


@pytest.mark.parametrize("name", NAMES)
def test_sign_conventions(name):
    """Per coordinate: raising a real logit never raises L_D, raising a fake logit never lowers
    L_D and never raises L_G; over the batch, each moves strictly."""
    loss = loss_of(name)
    rng = torch.Generator().manual_seed(1)
    r = torch.randn(6, generator=rng, dtype=torch.float64) * 0.3
    f = torch.randn(6, generator=rng, dtype=torch.float64) * 0.3
    d0, g0 = loss.discriminator_loss(r, f), g_loss(loss, f, r)
    step = 0.05
    assert loss.discriminator_loss(r + step, f) < d0  # D's loss falls as real logits rise
    assert loss.discriminator_loss(r, f - step) < d0  # ... and as fake logits fall
    assert g_loss(loss, f + step, r) < g0  # G's loss falls as fake logits rise
    for i in range(6):
        e = torch.zeros(6, dtype=torch.float64)
        e[i] = step
        assert loss.discriminator_loss(r + e, f) <= d0 + 1e-15
        assert loss.discriminator_loss(r, f + e) >= d0 - 1e-15
        assert g_loss(loss, f + e, r) <= g0 + 1e-15


def test_only_rahinge_needs_real_logits_and_the_others_ignore_them():
    registry = get_registry().losses
    assert {n: registry[n].needs_real_logits for n in NAMES} == {
        "hinge": False, "ns": False, "wasserstein": False, "rahinge": True}
    f, r = torch.randn(5), torch.randn(5)
    for name in ("hinge", "ns", "wasserstein"):
        loss = loss_of(name)
        assert torch.equal(loss.generator_loss(f), loss.generator_loss(f, real_logits=r))
        assert torch.equal(loss.generator_loss(f), loss.generator_loss(f, r + 5))


def test_rahinge_generator_loss_uses_the_real_logits():
    loss = loss_of("rahinge")
    f = torch.tensor([0.2, -0.1, 0.4], dtype=torch.float64)
    r = torch.tensor([0.5, 0.0, -0.2], dtype=torch.float64, requires_grad=True)
    value = loss.generator_loss(f, real_logits=r)
    (grad,) = torch.autograd.grad(value, r)
    # d/dr_i of mean_i relu(1 + (r_i - mean f)) + mean_j relu(1 - (f_j - mean r)), all active:
    # 1/n + (1/n) * (1/n) * n = 2/n each
    assert torch.allclose(grad, torch.full((3,), 2 / 3, dtype=torch.float64))
    # G's loss rises as the reals look more real (the relativistic generator pulls them down)
    assert loss.generator_loss(f, r.detach() + 0.1) > value
    with pytest.raises(SpecregError, match="loss 'rahinge': generator_loss needs real_logits"):
        loss.generator_loss(f)


def test_rahinge_compares_with_the_averages_of_its_own_batch():
    """Relativistic: the D loss of two batches is not the mean of their losses (the averages are
    per micro-batch), but the batch repeated is the batch (a mean, not a sum)."""
    loss = loss_of("rahinge")
    r = torch.tensor([2.0, 1.0, -1.0, 0.5])
    f = torch.tensor([-3.0, 0.5, 1.5, 0.0])
    whole = loss.discriminator_loss(r, f)
    halves = (loss.discriminator_loss(r[:2], f[:2]) + loss.discriminator_loss(r[2:], f[2:])) / 2
    assert not torch.allclose(whole, halves)
    assert torch.allclose(loss.discriminator_loss(r.repeat(3), f.repeat(3)), whole)
