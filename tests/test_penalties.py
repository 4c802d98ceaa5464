"""The gradient penalties against independent computations, on a tiny D whose input gradient has
a closed form (``D(x) = w2 . tanh(W1 x + b1) + b2``: ``grad_x D = W1^T (w2 * (1 - tanh^2))``),
evaluated in float64:

- ``r1`` (Mescheder et al. 2018, eq. 9): ``gamma/2 E||grad_x D(x)||^2`` on reals, and its gradient
  with respect to D's parameters (the plugin: float32 double backward through the loop's logits;
  the reference: float64 autograd of the closed form);
- ``wgan_gp`` (Gulrajani et al. 2017, eq. 3): the interpolates ``eps x + (1 - eps) x_fake``, the
  gradient norms at them, the penalty and its parameter gradient; its D forward goes through
  ``context.discriminator`` with state frozen, and its ``eps`` depend on each sample's place in
  the global batch (the loop's layout, :func:`core.data.micro_batch_places`), not on the split;
- lazy regularization: ``penalty_every``, and in the real Trainer the penalty runs on every
  ``every``-th D step, multiplied by ``every``.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from torch import nn

from core.data import BatchPlan, micro_batch_places
from core.errors import SpecregError
from core.interfaces import StepContext
from core.layers import state_updates_enabled
from core.recipe import structure_recipe
from core.train import build_trainer, make_accelerator
from plugins.regularizers.r1 import R1
from plugins.regularizers.wgan_gp import WGANGP, interpolation_weights, sample_places

SHAPE = (2, 3, 3)  # tiny "images"


class TinyD(nn.Module):
    """``D(x, y) = w2 . tanh(W1 flat(x) + b1) + b2`` (labels ignored)."""

    def __init__(self, hidden: int = 5) -> None:
        super().__init__()
        self.fc1 = nn.Linear(18, hidden)
        self.fc2 = nn.Linear(hidden, 1)

    def forward(self, x, y=None):
        return self.fc2(torch.tanh(self.fc1(x.flatten(1)))).squeeze(1)


def closed_form_input_gradient(params: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """``grad_x D(x)`` per sample, written out (differentiable in the parameters)."""
    W1, b1, w2 = params["fc1.weight"], params["fc1.bias"], params["fc2.weight"][0]
    h = torch.tanh(x.flatten(1) @ W1.T + b1)
    return ((w2 * (1 - h ** 2)) @ W1).view_as(x)


def float64_params(D: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().double().requires_grad_() for n, p in D.named_parameters()}


def d_context(D: nn.Module, real: torch.Tensor, fake: torch.Tensor, *, discriminator=None,
              step: int = 0, micro_batch: int = 0, num_micro_batches: int = 1,
              labels: torch.Tensor | None = None, real_grad: bool = False) -> StepContext:
    """A D step's context built by hand, as the loop builds it (one forward of reals and fakes)."""
    if real_grad:
        real = real.detach().requires_grad_()
    logits = D(torch.cat([real, fake]))
    n = len(real)
    return StepContext(phase="D", iteration=0, step=step, micro_batch=micro_batch,
                       num_micro_batches=num_micro_batches,
                       discriminator=discriminator if discriminator is not None else D,
                       generator=nn.Identity(), module=D, real=real, real_labels=labels,
                       fake=fake, fake_labels=labels, real_logits=logits[:n],
                       fake_logits=logits[n:])


def tiny_batch(seed: int, n: int = 6) -> tuple[TinyD, torch.Tensor, torch.Tensor]:
    torch.manual_seed(seed)
    D = TinyD()
    g = torch.Generator().manual_seed(seed + 1)
    return D, torch.randn(n, *SHAPE, generator=g), torch.randn(n, *SHAPE, generator=g)


# ---------------------------------------------------------------------------------------------
# R1
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("gamma", [10.0, 0.3])
def test_r1_penalty_and_its_parameter_gradient_match_a_float64_closed_form(gamma):
    D, real, fake = tiny_batch(0)
    reg = R1(R1.Config(gamma=gamma))
    penalty = reg.penalty(d_context(D, real, fake, real_grad=True))
    grads = torch.autograd.grad(penalty, list(D.parameters()), allow_unused=True)

    params = float64_params(D)
    g = closed_form_input_gradient(params, real.double())
    expected = gamma / 2 * g.square().flatten(1).sum(1).mean()  # eq. 9, E over the batch
    expected_grads = torch.autograd.grad(expected, list(params.values()), allow_unused=True)
    assert penalty.item() == pytest.approx(expected.item(), rel=1e-5)
    for name, got, want in zip(params, grads, expected_grads):
        if want is None:  # D's output bias: R1 does not depend on it
            assert name == "fc2.bias" and (got is None or not got.any()), name
            continue
        torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-7, msg=name)


def test_r1_is_taken_from_the_loops_logits_without_a_forward_of_its_own():
    D, real, fake = tiny_batch(1)
    context = d_context(D, real, fake, real_grad=True)
    calls = []
    D.register_forward_hook(lambda *_: calls.append(1))
    R1().penalty(context)
    assert calls == []


def test_r1_contract_details():
    reg = R1()
    assert (reg.config.gamma, reg.config.every, reg.penalty_every) == (10.0, 16, 16)
    assert R1(R1.Config(every=4)).penalty_every == 4
    assert R1.needs == frozenset({"real_grad"})
    D, real, fake = tiny_batch(2)
    state = copy.deepcopy(D.state_dict())
    assert reg.apply(D) is D and all(torch.equal(v, D.state_dict()[k]) for k, v in state.items())
    assert reg.state_dict() == {}
    g_phase = StepContext(phase="G", iteration=0, step=0, micro_batch=0, num_micro_batches=1,
                          discriminator=D, generator=nn.Identity(), module=D, fake=fake,
                          fake_logits=D(fake))
    assert reg.penalty(g_phase) is None
    with pytest.raises(SpecregError, match="'r1'.*reals that require grad.*'real_grad'"):
        reg.penalty(d_context(D, real, fake, real_grad=False))
    with pytest.raises(SpecregError, match="every must be an integer >= 1, got 0"):
        R1.Config(every=0)
    with pytest.raises(SpecregError, match="gamma must be .*> 0, got -1.0"):
        R1.Config(gamma=-1.0)


# ---------------------------------------------------------------------------------------------
# WGAN-GP
# ---------------------------------------------------------------------------------------------


class Recording(nn.Module):
    """The "wrapped" D of a context: forwards to D, recording inputs, labels and whether state
    updates were enabled."""

    def __init__(self, D: nn.Module) -> None:
        super().__init__()
        self.D = D
        self.calls: list[tuple[torch.Tensor, torch.Tensor | None, bool]] = []

    def forward(self, x, y=None):
        self.calls.append((x.detach().clone(), y, state_updates_enabled()))
        return self.D(x, y)


def test_wgan_gp_interpolates_norms_and_penalty_match_a_direct_float64_computation():
    D, real, fake = tiny_batch(3)
    wrapped = Recording(D)
    labels = torch.arange(6)
    reg = WGANGP(WGANGP.Config(weight=10.0))
    context = d_context(D, real, fake, discriminator=wrapped, step=7, labels=labels)
    penalty = reg.penalty(context)
    grads = torch.autograd.grad(penalty, list(D.parameters()), allow_unused=True)

    # its own forward: through the wrapped D, on the interpolates, with the reals' labels, frozen
    (x_hat, y, updates), = wrapped.calls
    assert y is labels and updates is False
    eps = (x_hat - fake).flatten(1) / (real - fake).flatten(1)
    assert torch.allclose(eps, eps[:, :1].expand_as(eps), atol=1e-5)  # one eps per sample
    expected_eps = interpolation_weights(0, 7, range(6))
    assert torch.allclose(eps[:, 0], expected_eps, atol=1e-5)
    assert ((expected_eps >= 0) & (expected_eps < 1)).all() and expected_eps.std() > 0.1

    params = float64_params(D)
    x_hat64 = expected_eps.double().view(-1, 1, 1, 1) * real.double() + \
        (1 - expected_eps.double().view(-1, 1, 1, 1)) * fake.double()
    torch.testing.assert_close(x_hat.double(), x_hat64, rtol=1e-6, atol=1e-6)
    norms = closed_form_input_gradient(params, x_hat64).flatten(1).norm(dim=1)
    expected = 10.0 * ((norms - 1) ** 2).mean()  # eq. 3's penalty term
    assert penalty.item() == pytest.approx(expected.item(), rel=1e-5)
    expected_grads = torch.autograd.grad(expected, list(params.values()), allow_unused=True)
    for name, got, want in zip(params, grads, expected_grads):
        if want is None:
            assert name == "fc2.bias" and (got is None or not got.any()), name
            continue
        torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-7, msg=name)


def test_wgan_gp_gradient_norm_matches_central_finite_differences():
    """On a convolutional D: the gradient norm the penalty implies (weight 1: penalty =
    (||g|| - 1)^2 for one sample) against directional finite differences in float64."""
    torch.manual_seed(4)
    D = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.Softplus(), nn.Flatten(),
                      nn.Linear(27, 1)).double()
    forward = lambda x, y=None: D(x).squeeze(1)  # noqa: E731
    real = torch.randn(1, *SHAPE, dtype=torch.float64)
    fake = torch.randn(1, *SHAPE, dtype=torch.float64)
    context = StepContext(phase="D", iteration=0, step=0, micro_batch=0, num_micro_batches=1,
                          discriminator=forward, generator=nn.Identity(), module=D, real=real,
                          fake=fake, real_logits=forward(real), fake_logits=forward(fake))
    reg = WGANGP(WGANGP.Config(weight=1.0))
    penalty = reg.penalty(context).item()
    x_hat = reg.interpolates(context).detach()
    h, basis = 1e-6, torch.eye(x_hat.numel(), dtype=torch.float64)
    with torch.no_grad():
        fd = torch.stack([(forward(x_hat + h * e.view_as(x_hat))
                           - forward(x_hat - h * e.view_as(x_hat))) / (2 * h) for e in basis])
    assert penalty == pytest.approx((fd.norm().item() - 1) ** 2, rel=1e-7)


def test_wgan_gp_weights_depend_on_the_place_in_the_global_batch_not_on_the_split():
    # the places are the loop's: process-major, then micro-batch (core.data.micro_batch_places)
    for batch, processes, micro in [(8, 1, 0), (8, 1, 4), (8, 2, 0), (16, 2, 4), (12, 3, 2)]:
        plan = BatchPlan.derive(batch, processes, micro)
        for rank in range(processes):
            for m in range(plan.accumulation):
                assert sample_places(m, plan.accumulation, plan.micro_batch, rank) == \
                    micro_batch_places(plan, rank, m)
    whole = interpolation_weights(0, 3, range(8))
    split = torch.cat([interpolation_weights(0, 3, sample_places(m, 2, 4, process=0))
                       for m in range(2)])
    ranks = torch.cat([interpolation_weights(0, 3, sample_places(0, 1, 4, process=r))
                       for r in range(2)])
    assert torch.equal(whole, split) and torch.equal(whole, ranks)
    assert not torch.equal(whole, interpolation_weights(0, 4, range(8)))  # a new draw per step
    assert not torch.equal(whole, interpolation_weights(1, 3, range(8)))  # and per seed


def test_wgan_gp_contract_details():
    reg = WGANGP()
    assert (reg.config.weight, reg.penalty_every, WGANGP.needs) == (10.0, 1, frozenset())
    D, real, fake = tiny_batch(5)
    assert reg.apply(D) is D
    g_phase = StepContext(phase="G", iteration=0, step=0, micro_batch=0, num_micro_batches=1,
                          discriminator=D, generator=nn.Identity(), module=D, fake=fake,
                          fake_logits=D(fake))
    assert reg.penalty(g_phase) is None
    with pytest.raises(SpecregError, match="as many fakes as reals"):
        reg.penalty(d_context(D, real, fake[:3]))


# ---------------------------------------------------------------------------------------------
# Lazy regularization in the real Trainer
# ---------------------------------------------------------------------------------------------


def _d_gradients(tmp: Path, regularizer: dict | None, n_critic: int = 4) -> tuple[list, list]:
    """D's gradients at each of ``n_critic`` D steps of one iteration, and the steps (by the
    context's ``step``) at which the penalty ran."""
    table = {"seed": 2, "dataset": {"name": "stacked_digits", "num_samples": 64},
             "architecture": {"name": "resnet32", "ch": 8, "g_ch": 8},
             "train": {"iterations": 1, "batch_size": 4, "n_critic": n_critic, "cpu": True},
             "checkpoint": {"every": 0}, "log": {"sample_every": 0, "progress": False}}
    if regularizer is not None:
        table["discriminator"] = {"regularizer": regularizer}
    recipe = structure_recipe(table)
    trainer = build_trainer(recipe, tmp, make_accelerator(recipe), callbacks=[])
    D = trainer.unwrapped(trainer.D)
    seen, ran = [], []
    step = trainer.opt_d.step

    def recording_step(*args, **kwargs):
        seen.append([p.grad.detach().clone() for p in D.parameters()])
        return step(*args, **kwargs)

    trainer.opt_d.step = recording_step
    for reg in trainer.d_regs:
        penalty = reg.penalty

        def recording_penalty(context, _penalty=penalty):
            ran.append(context.step)
            return _penalty(context)

        reg.penalty = recording_penalty
    try:
        trainer.train_iteration()
    finally:
        trainer.log.close()
    return seen, ran


def test_lazy_r1_runs_every_nth_d_step_multiplied_by_n(tmp_path):
    """With ``every = 2`` the penalty runs at D steps 0 and 2 of 4 (with ``every = 1`` at all
    four), and its share of D's gradient at step 0 is twice that with ``every = 1``: the same
    weights, data and latents in the three runs (R1 parametrizes nothing)."""
    base, _ = _d_gradients(tmp_path / "none", None)
    every1, ran1 = _d_gradients(tmp_path / "every1", {"name": "r1", "gamma": 1.0, "every": 1})
    every2, ran2 = _d_gradients(tmp_path / "every2", {"name": "r1", "gamma": 1.0, "every": 2})
    assert ran1 == [0, 1, 2, 3] and ran2 == [0, 2]
    assert any(not torch.allclose(one, b) for b, one in zip(base[0], every1[0]))
    for b, one, two in zip(base[0], every1[0], every2[0]):
        torch.testing.assert_close(two - b, 2 * (one - b), rtol=1e-4, atol=1e-6)
