"""Spectral regularization, static (``sr_static``) and dynamic (``sr_dynamic``): Liu et al. 2019,
eq. 9-11, as SPEC §2.1-2.3 fixes it.

Both are SN (every Conv2d/Linear/Embedding, :mod:`plugins.regularizers.sn`) plus a compensation
of the spectrum of the layers named by ``layers`` (convolutions by default, as the authors'
code). With ``mode = "projection"`` (default) the compensation rewrites the raw weights after the
optimizer step every ``every`` iterations from ``start`` on; with ``mode = "parametrization"``
the forward pass itself uses the compensated weight of eq. 10 (gradient: eq. 11)::

    sr = StaticSpectralRegularization(StaticSpectralRegularization.Config(fraction=0.5))
    D = sr.apply(D)
    for it in range(iterations):
        ...; d_optimizer.step(); sr.after_step(D, it)

State (in the parametrization module at ``parametrizations.weight.0`` of each layer, so in the
model's ``state_dict``): SN's ``_u``/``_v`` (same names as ``sn``: a run trained with ``sn`` can be
resumed with SR, whose extra buffers then start fresh, see :data:`FRESH_STATE`), ``_active``
(the compensation has started: ``iteration >= start`` was reached) and, for ``sr_dynamic``,
``_gamma`` (float64, length r: the running maximum of ``s_j / s_1``) and ``_initialized``.
"""

from __future__ import annotations

import math
from typing import ClassVar, Iterator, Literal

import attrs
import torch
from torch import nn

from core.hookspecs import hookimpl
from core.interfaces import Regularizer
from core.layers import (LAYER_TYPES, no_autocast, parametrizations_of, raw_weight,
                              regularized_layers, weight_matrix)
from plugins.regularizers.base import (check_choice, check_fraction, check_layer_names,
                                       check_nonnegative_int, check_positive_int,
                                       parametrize_layers, power_step)
from plugins.regularizers.sn import EPS, SpectralNormWeight
from core.svd import ThinSVD, thin_svd

__all__ = ["SpectralRegularizedWeight", "StaticSpectralRegularization",
           "DynamicSpectralRegularization", "static_rank", "FRESH_STATE", "MODES"]

MODES = ("projection", "parametrization")
Mode = Literal["projection", "parametrization"]

#: buffer names SR adds to SN's state; a checkpoint of another regularizer may lack them, and
#: they then keep their fresh values (checkpoint loaders may ignore them as missing keys).
FRESH_STATE = ("_active", "_gamma", "_initialized")


def static_rank(fraction: float, r: int) -> int:
    """SPEC §2.1: ``i = max(1, floor(fraction * r))`` (with a hair of tolerance for float error,
    so that ``0.29 * 100`` gives 29)."""
    return max(1, min(r, math.floor(fraction * r + 1e-9)))


class SpectralRegularizedWeight(SpectralNormWeight):
    """Parametrization of one layer: SN plus the static or dynamic compensation of its spectrum
    (Liu et al. 2019, eq. 9-10; SPEC §2.1-2.3).

    ``projection`` mode: the forward pass is SN's ``W / sigma(W)``; :meth:`project` rewrites the
    raw weight ``W = U diag(s) V^T`` in place as ``U diag(s'/s_1) V^T`` (static) or
    ``U diag(s') V^T`` (dynamic): ``s'_k = s_1`` for ``k <= i`` (static, SPEC §2.1) or
    ``s'_k = gamma_k s_1`` after updating ``gamma`` (dynamic, SPEC §2.2).

    ``parametrization`` mode (once ``_active``): the forward pass is eq. 10,
    ``W/s_1 + sum_k (c_k - s_k/s_1) u_k v_k^T`` with ``c_k = 1`` for ``k <= i`` (static) or
    ``c_k = gamma_k`` for every k (dynamic); ``u_k, v_k`` from an exact SVD of the current
    weight are constants for autograd, ``s_k = u_k^T W v_k`` is differentiable, so the gradient
    is eq. 11. Dynamic mode records ``gamma`` in every training-mode forward pass (while state
    updates are enabled); the first record changes nothing. SN's power iteration keeps running.
    """

    def __init__(self, weight: torch.Tensor, dynamic: bool, fraction: float = 0.5,
                 mode: Mode = "projection", active: bool = True) -> None:
        super().__init__(weight)
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        self.dynamic = dynamic
        self.fraction = fraction
        self.mode = mode
        r = min(weight_matrix(weight).shape)
        #: the number of compensated singular values (static: SPEC §2.1's i; dynamic: all).
        self.rank = r if dynamic else static_rank(fraction, r)
        self.register_buffer("_active", torch.tensor(bool(active), device=weight.device))
        if dynamic:
            self.register_buffer("_gamma", torch.zeros(r, dtype=torch.float64,
                                                       device=weight.device))
            self.register_buffer("_initialized", torch.tensor(False, device=weight.device))
        self._cache: tuple[tuple, ThinSVD] | None = None

    def extra_repr(self) -> str:
        kind = "dynamic" if self.dynamic else f"static, i={self.rank}"
        return f"{kind}, mode={self.mode}"

    # -- state -------------------------------------------------------------------------------

    @property
    def active(self) -> bool:
        return bool(self._active)

    def activate(self) -> None:
        self._active.fill_(True)

    @property
    def initialized(self) -> bool:
        """Dynamic: whether ``gamma`` holds a record; static: always."""
        return bool(self._initialized) if self.dynamic else True

    @torch.no_grad()
    def record(self, ratios: torch.Tensor) -> bool:
        """Dynamic: ``gamma <- max(gamma, s/s_1)`` (the first time ``gamma <- s/s_1``, SPEC §2.2);
        returns whether this was the first record."""
        ratios = ratios.to(self._gamma)
        if not bool(self._initialized):
            self._gamma.copy_(ratios)
            self._initialized.fill_(True)
            return True
        torch.maximum(self._gamma, ratios, out=self._gamma)
        return False

    def targets(self, s1: torch.Tensor) -> torch.Tensor:
        """The compensated singular values ``s'_1..s'_rank`` divided by ``s_1``: ``c_k`` of
        SPEC §2.3 (static: ones; dynamic: ``gamma``), float64."""
        if self.dynamic:
            return self._gamma.clone()
        return torch.ones(self.rank, dtype=torch.float64, device=s1.device)

    # -- projection (SPEC §2.3, mode "projection") -------------------------------------------

    @torch.no_grad()
    def project(self, weight: torch.Tensor) -> bool:
        """Rewrite the raw ``weight`` in place with its compensated spectrum; returns whether
        it changed (a dynamic layer's first application only records ``gamma``)."""
        with no_autocast(weight.device.type):
            dec = thin_svd(weight_matrix(weight))
            s1 = dec.S[0]
            if s1 <= 0:  # an all-zero weight has no spectrum to compensate
                return False
            if self.dynamic:
                if self.record(dec.S / s1):
                    return False
                # U diag(gamma s_1) V^T, the scale s_1 kept
                new = self._gamma.to(dec.S) * s1
                out = dec.respectrum(new, alpha=1.0)
            else:
                # U diag(s'/s_1) V^T with s'_k = s_1 for k <= i: spectral norm 1
                new = dec.S / s1
                new[: self.rank] = 1.0
                out = dec.respectrum(new, alpha=1.0 / float(s1))
            weight.copy_(out.reshape(weight.shape))
            return True

    # -- forward -----------------------------------------------------------------------------

    def _decomposition(self, matrix: torch.Tensor) -> ThinSVD:
        """The SVD of the current weight, reused while the weight is unchanged (e.g. the D
        forward passes of a G step)."""
        key = (matrix.data_ptr(), matrix._version, matrix.shape, matrix.dtype, matrix.device)
        if self._cache is None or self._cache[0] != key:
            self._cache = (key, thin_svd(matrix.detach()))
        return self._cache[1]

    def compensated(self, weight: torch.Tensor, update: bool) -> torch.Tensor | None:
        """Eq. 10 for this weight, or None where SN applies (dynamic, nothing recorded yet)."""
        matrix = weight_matrix(weight)
        if update:
            power_step(matrix, self._u, self._v, EPS)
        dec = self._decomposition(matrix)
        s1 = dec.S[0]
        if s1 <= 0:
            return None
        if self.dynamic:
            if update:
                self.record(dec.S / s1)
            if not self.initialized:
                return None
        c = self.targets(s1).to(matrix.dtype)
        u, _, v = dec.triplets(slice(0, self.rank))
        u, v = u.to(matrix.dtype), v.to(matrix.dtype)  # constants for autograd
        s = ((u.mT @ matrix) * v.mT).sum(dim=1)       # s_k = u_k^T W v_k, differentiable
        out = matrix / s[0] + (u * (c - s / s[0])) @ v.mT
        return out.reshape(weight.shape)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        with no_autocast(weight.device.type):
            update = self.updating()
            if self.mode == "parametrization" and self.active:
                out = self.compensated(weight, update)
                if out is not None:
                    return out
                update = False  # the power-iteration step has been taken
            return weight / self.sigma(weight_matrix(weight), update)


def sr_layers(module: nn.Module) -> Iterator[tuple[nn.Module, SpectralRegularizedWeight]]:
    """``(layer, parametrization)`` for every layer of ``module`` that carries SR."""
    for _, layer in regularized_layers(module):
        for p in parametrizations_of(layer):
            if isinstance(p, SpectralRegularizedWeight):
                yield layer, p


class _SpectralRegularization(Regularizer):
    """Shared by the static and dynamic flavours: apply, after_step."""

    dynamic: ClassVar[bool] = False

    def _make(self, layer: nn.Module, weight: torch.Tensor) -> SpectralNormWeight:
        c = self.config
        types = tuple(LAYER_TYPES[name] for name in c.layers)
        if not isinstance(layer, types):
            return SpectralNormWeight(weight)
        return SpectralRegularizedWeight(weight, dynamic=self.dynamic,
                                         fraction=getattr(c, "fraction", 1.0), mode=c.mode,
                                         active=c.start <= 0)

    def apply(self, module: nn.Module) -> nn.Module:
        parametrize_layers(module, self._make, self.name)
        return module

    def applies_at(self, iteration: int) -> bool:
        """Whether a projection happens after the optimizer steps of ``iteration``."""
        c = self.config
        return c.mode == "projection" and iteration >= c.start and iteration % c.every == 0

    def after_step(self, module: nn.Module, iteration: int) -> None:
        """Activates the compensation once ``iteration >= start``; in projection mode, projects
        every SR layer of ``module`` on iterations ``iteration % every == 0`` (SPEC §2.3)."""
        if iteration < self.config.start:
            return
        project = self.applies_at(iteration)
        for layer, p in sr_layers(module):
            p.activate()
            if project:
                p.project(raw_weight(layer))


class StaticSpectralRegularization(_SpectralRegularization):
    """Spectral regularization with static compensation, SR-s (Liu et al. 2019, eq. 9-10 with
    ``Delta D = diag(0, s_1 - s_2, ..., s_1 - s_i, 0, ...)``; gradient eq. 11): SN, and the top
    ``i = max(1, floor(fraction * r))`` singular values of each compensated layer raised to
    ``s_1`` (SPEC §2.1, §2.3). ``fraction -> 1/r`` is SN."""

    dynamic = False

    @attrs.define
    class Config:
        #: share of the r singular values raised to s_1: i = max(1, floor(fraction * r)).
        fraction: float = attrs.field(default=0.5, validator=check_fraction("sr_static"))
        #: project after the optimizer steps of every this many iterations (projection mode).
        every: int = attrs.field(default=5, validator=check_positive_int("sr_static"))
        #: first iteration the compensation applies at (earlier iterations are plain SN).
        start: int = attrs.field(default=0, validator=check_nonnegative_int("sr_static"))
        #: "projection": rewrite the raw weights after optimizer steps (the authors' code);
        #: "parametrization": the forward pass uses eq. 10, gradient eq. 11.
        mode: Mode = attrs.field(default="projection", validator=check_choice("sr_static", MODES))
        #: layer types (names in core.layers.LAYER_TYPES) whose spectrum is compensated;
        #: SN applies to every Conv2d/Linear/Embedding regardless. Default: convolutions only.
        layers: list[str] = attrs.field(factory=lambda: ["conv"],
                                        validator=check_layer_names("sr_static"))


class DynamicSpectralRegularization(_SpectralRegularization):
    """Spectral regularization with dynamic compensation, SR-d (Liu et al. 2019, §III-C and
    eq. 9-10 with ``Delta D = diag(0, gamma_2 s_1 - s_2, ..., gamma_r s_1 - s_r)``): SN, and
    each compensated layer's singular values held at ``gamma_j * s_1``, ``gamma_j`` the running
    maximum of ``s_j / s_1`` over past applications (SPEC §2.2, §2.3). ``gamma`` is saved in the
    model's state."""

    dynamic = True

    @attrs.define
    class Config:
        #: project after the optimizer steps of every this many iterations (projection mode).
        every: int = attrs.field(default=5, validator=check_positive_int("sr_dynamic"))
        #: first iteration the compensation applies at (earlier iterations are plain SN); the
        #: paper's E2048-64 runs SN to 40k, then SR-d.
        start: int = attrs.field(default=0, validator=check_nonnegative_int("sr_dynamic"))
        #: "projection": rewrite the raw weights after optimizer steps (the authors' code);
        #: "parametrization": the forward pass uses eq. 10 with gamma recorded every forward.
        mode: Mode = attrs.field(default="projection", validator=check_choice("sr_dynamic", MODES))
        #: layer types (names in core.layers.LAYER_TYPES) whose spectrum is compensated;
        #: SN applies to every Conv2d/Linear/Embedding regardless. Default: convolutions only.
        layers: list[str] = attrs.field(factory=lambda: ["conv"],
                                        validator=check_layer_names("sr_dynamic"))


@hookimpl
def register_regularizers(register) -> None:
    register("sr_static", StaticSpectralRegularization)
    register("sr_dynamic", DynamicSpectralRegularization)
