"""Tests of the R2 penalty (Mescheder et al. 2018, eq. 10): specreg's conformance kit (the
penalty checks of contract v2 included: its gradient reaches D, lazy scaling and micro-batches in
the real Trainer, 2 DDP processes), and the penalty and its gradient against a float64 closed
form on a tiny D.

    pip install -e ".[test]" && pytest        # from examples/specreg-orthogonal
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from core.errors import SpecregError
from core.interfaces import StepContext
from core.layers import state_updates_enabled
from core.registry import get_registry
from core.testing import Case, parametrize_with_checks
from specreg_orthogonal import R2

#: checked lazy (every 2nd D step), so that the kit sees steps with and without the penalty
LAZY = R2(R2.Config(gamma=0.5, every=2))


@parametrize_with_checks([Case(LAZY, id="regularizers/r2-every-2")])
def test_conformance(plugin, check):
    check(plugin)


class TinyD(nn.Module):
    """``D(x) = w2 . tanh(W1 flat(x) + b1) + b2``, whose input gradient is
    ``W1^T (w2 * (1 - tanh^2(W1 x + b1)))``; records each call's labels and whether state
    updates were enabled."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(12, 4), nn.Linear(4, 1)
        self.calls: list = []

    def forward(self, x, y=None):
        self.calls.append((y, state_updates_enabled()))
        return self.fc2(torch.tanh(self.fc1(x.flatten(1)))).squeeze(1)


def d_context(D: nn.Module, fake: torch.Tensor, labels: torch.Tensor) -> StepContext:
    return StepContext(phase="D", iteration=0, step=0, micro_batch=0, num_micro_batches=1,
                       discriminator=D, generator=nn.Identity(), module=D, fake=fake,
                       fake_labels=labels)


@pytest.mark.parametrize("gamma", [1.0, 10.0])
def test_penalty_and_its_gradient_match_the_float64_closed_form(gamma):
    torch.manual_seed(0)
    D = TinyD()
    fake = torch.randn(5, 3, 2, 2)
    labels = torch.arange(5)
    value = R2(R2.Config(gamma=gamma)).penalty(d_context(D, fake, labels))
    grads = torch.autograd.grad(value, [D.fc1.weight, D.fc1.bias, D.fc2.weight])
    assert D.calls == [(labels, False)]  # its own forward: the fakes' labels, state frozen

    W1, b1, w2 = (p.detach().double().requires_grad_()
                  for p in (D.fc1.weight, D.fc1.bias, D.fc2.weight))
    h = torch.tanh(fake.double().flatten(1) @ W1.T + b1)
    grad_x = (w2[0] * (1 - h ** 2)) @ W1
    expected = gamma / 2 * grad_x.square().sum(1).mean()  # eq. 10
    assert value.item() == pytest.approx(expected.item(), rel=1e-5)
    for got, want in zip(grads, torch.autograd.grad(expected, [W1, b1, w2])):
        torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-8)


def test_contract_details():
    assert R2.needs == frozenset() and R2().penalty_every == 1 and LAZY.penalty_every == 2
    net = TinyD()
    assert R2().apply(net) is net and R2().state_dict() == {}
    g_step = StepContext(phase="G", iteration=0, step=0, micro_batch=0, num_micro_batches=1,
                         discriminator=net, generator=net, module=net)
    assert R2().penalty(g_step) is None
    assert get_registry().regularizers["r2"] is R2
    with pytest.raises(SpecregError, match="regularizer 'r2': gamma must be a number > 0.*"
                                           "every must be an integer >= 1"):
        R2(R2.Config(gamma=0.0, every=0))
