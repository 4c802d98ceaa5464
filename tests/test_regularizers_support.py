"""Helpers shared by the regularizer tests (matrices with a chosen spectrum, converged power
iteration, independent float64 references of the SPEC §2 formulas), and tests of the helpers.

The other ``test_regularizers*`` modules import them: ``from test_regularizers_support import ...``.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from torch.nn.utils import parametrize


REPO_ROOT = Path(__file__).resolve().parents[1]


def orthonormal(n: int, k: int, gen: torch.Generator) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(n, k, generator=gen, dtype=torch.float64))
    return q


def with_spectrum(m: int, n: int, values: list[float] | torch.Tensor, seed: int = 0
                  ) -> torch.Tensor:
    """A float32 ``[m, n]`` matrix with singular values ``values`` (length min(m, n)) and random
    singular vectors."""
    gen = torch.Generator().manual_seed(seed)
    s = torch.as_tensor(values, dtype=torch.float64)
    r = min(m, n)
    assert len(s) == r
    return ((orthonormal(m, r, gen) * s) @ orthonormal(n, r, gen).T).float()


def gapped_spectrum(r: int, seed: int = 0, rank: int | None = None, top: float = 3.0
                    ) -> torch.Tensor:
    """Descending random singular values with ``s_2 <= 0.8 s_1`` (fast power iteration); zeros
    past ``rank``."""
    gen = torch.Generator().manual_seed(seed + 1000)
    s = torch.sort(torch.rand(r, generator=gen, dtype=torch.float64) * 0.7 + 0.1,
                   descending=True).values * top
    if r > 0:
        s[0] = top * 1.25
    if rank is not None:
        s[rank:] = 0
    return s


#: (name, weight shape, rank or None): tall, wide, square, rank-deficient, 1x1 convs, r = 1.
SHAPES = [
    ("conv3x3-wide", (6, 4, 3, 3), None),        # 6 x 36
    ("conv3x3-tall", (40, 2, 3, 3), None),       # 40 x 18
    ("conv3x3-square", (18, 2, 3, 3), None),     # 18 x 18
    ("conv1x1-wide", (5, 12, 1, 1), None),       # 5 x 12
    ("conv1x1-tall", (12, 5, 1, 1), None),       # 12 x 5
    ("conv-rankdef", (10, 3, 2, 2), 4),          # 10 x 12, rank 4
    ("conv-r1", (1, 3, 3, 3), None),             # 1 x 27
    ("linear-tall", (30, 7), None),
    ("linear-wide", (7, 30), None),
    ("linear-r1", (1, 16), None),
]
SHAPE_IDS = [s[0] for s in SHAPES]


def layer_for(shape: tuple[int, ...], weight: torch.Tensor) -> nn.Module:
    """A Conv2d (4-D shape) or Linear layer holding ``weight``."""
    if len(shape) == 4:
        layer = nn.Conv2d(shape[1], shape[0], shape[2:], bias=True)
    else:
        layer = nn.Linear(shape[1], shape[0], bias=True)
    with torch.no_grad():
        layer.weight.copy_(weight.reshape(shape))
    return layer


def make_weight(shape: tuple[int, ...], rank: int | None, seed: int = 0) -> torch.Tensor:
    m = shape[0]
    n = int(torch.tensor(shape[1:]).prod())
    return with_spectrum(m, n, gapped_spectrum(min(m, n), seed, rank), seed).reshape(shape)


@torch.no_grad()
def converge(module: nn.Module, steps: int = 300) -> None:
    """Run ``steps`` training-mode evaluations of every parametrized weight (one power-iteration
    step each), then put ``module`` in eval mode."""
    module.train()
    layers = [m for m in module.modules() if parametrize.is_parametrized(m, "weight")]
    for _ in range(steps):
        for layer in layers:
            layer.weight
    module.eval()


def svd64(matrix: torch.Tensor):
    return torch.linalg.svd(matrix.detach().double(), full_matrices=False)


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    expected = expected.detach().double()
    return float((actual.detach().double() - expected).norm() / expected.norm())


def static_reference(matrix: torch.Tensor, i: int) -> torch.Tensor:
    """SPEC §2.1/2.3 static: ``U diag(s'/s_1) V^T``, ``s'_k = s_1`` for k <= i (float64)."""
    u, s, vh = svd64(matrix)
    new = s.clone()
    new[:i] = s[0]
    return (u * (new / s[0])) @ vh


def dynamic_reference(matrix: torch.Tensor, gamma: torch.Tensor) -> torch.Tensor:
    """SPEC §2.2/2.3 dynamic projection: ``U diag(gamma s_1) V^T`` (float64)."""
    u, s, vh = svd64(matrix)
    return (u * (gamma.double() * s[0])) @ vh


# -- the helpers themselves ---------------------------------------------------------------------


def test_with_spectrum_has_the_requested_singular_values():
    s = gapped_spectrum(5, seed=3, rank=3)
    a = with_spectrum(5, 9, s, seed=3)
    assert torch.allclose(torch.linalg.svdvals(a.double()), s, atol=1e-6)
    assert s[1] <= 0.8 * s[0] and torch.all(s[3:] == 0)


def test_converge_reaches_the_top_singular_value():
    layer = nn.Linear(9, 5)
    with torch.no_grad():
        layer.weight.copy_(with_spectrum(5, 9, gapped_spectrum(5, seed=1), seed=1))
    parametrize.register_parametrization(layer, "weight", _Normalize(layer.weight))
    converge(layer, 100)
    sigma = float(layer.parametrizations.weight[0].sigma)
    assert abs(sigma - float(gapped_spectrum(5, 1)[0])) < 1e-5


class _Normalize(nn.Module):
    """A minimal power iteration, independent of the plugins, to check :func:`converge`."""

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("v", torch.ones(weight.shape[1]) / weight.shape[1] ** 0.5)
        self.sigma = torch.tensor(0.0)

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        if self.training:
            with torch.no_grad():
                u = w @ self.v
                self.sigma = u.norm()
                self.v.copy_(torch.nn.functional.normalize(w.T @ u, dim=0))
        return w
