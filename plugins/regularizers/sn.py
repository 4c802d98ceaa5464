"""Spectral normalization (``sn``) and scaled spectral normalization (``ssn``), SPEC §2.

``sn`` is numerically :func:`torch.nn.utils.parametrizations.spectral_norm`: the same buffers
(``parametrizations.weight.0._u`` / ``._v``), the same initialization (from the same seed, the
same ``u`` and ``v`` right after registration: torch's 15 initial power steps plus the one of its
registration check in a training-mode layer), the same power-iteration step per training-mode
forward pass, so state dicts move between the two. ``ssn`` multiplies the normalized weight
(never the bias) by a constant ``scale``::

    D = SpectralNorm().apply(D)        # a recipe: [discriminator.regularizer] name = "sn"
    D = ScaledSpectralNorm(ScaledSpectralNorm.Config(scale=1.2)).apply(D)
"""

from __future__ import annotations

import attrs
import torch
import torch.nn.functional as F
from torch import nn

from core.hookspecs import hookimpl
from core.interfaces import Regularizer
from core.layers import no_autocast, state_updates_enabled, weight_matrix
from plugins.regularizers.base import check_positive_number, parametrize_layers, power_step

__all__ = ["SpectralNormWeight", "SpectralNorm", "ScaledSpectralNorm", "INIT_POWER_ITERATIONS",
           "EPS", "random_unit"]

#: power-iteration steps run once when a parametrization is created (as torch's
#: ``_SpectralNorm.__init__`` does).
INIT_POWER_ITERATIONS = 15
#: the step of the check forward pass that torch's ``register_parametrization`` makes with the
#: new parametrization in its host layer's training mode: in training mode one more power step,
#: so a freshly registered torch ``spectral_norm`` has run 16 steps (15 in eval mode).
REGISTRATION_POWER_ITERATIONS = 1
#: the normalization's epsilon (torch's default).
EPS = 1e-12


def random_unit(n: int, like: torch.Tensor) -> torch.Tensor:
    """A random unit vector of length ``n`` (dtype and device of ``like``), from the global RNG."""
    return F.normalize(like.new_empty(n).normal_(0, 1), dim=0, eps=EPS)


class SpectralNormWeight(nn.Module):
    """Parametrization ``W -> scale * W / sigma(W)``, ``sigma(W) = u^T W v`` (Miyato et al. 2018,
    eq. 8 and Algorithm 1; ``scale``: Lin et al. 2021, §5.2).

    ``W`` is the SPEC §1 matrix ``W.reshape(out, -1)``. ``u`` (buffer ``_u``) and ``v``
    (``_v``) persist; each training-mode forward pass while
    :func:`core.layers.state_updates_enabled` runs one power-iteration step; ``u`` and
    ``v`` are constants for autograd. Computed in the weight's dtype with autocast disabled.

    Initialization is torch's: ``u``, then ``v``, drawn from the global RNG and normalized, then
    :data:`INIT_POWER_ITERATIONS` steps, plus :data:`REGISTRATION_POWER_ITERATIONS` when
    ``registered_in_training`` (the step torch's registration check makes in a training-mode
    layer; :func:`plugins.regularizers.base.parametrize_layers` runs that check with state
    frozen, so the step happens here instead). With the same seed, ``_u``, ``_v`` and the
    normalized weight then equal those of a fresh ``torch.nn.utils.parametrizations.spectral_norm``.
    """

    def __init__(self, weight: torch.Tensor, scale: float = 1.0,
                 registered_in_training: bool = True) -> None:
        super().__init__()
        self.scale = float(scale)
        matrix = weight_matrix(weight.detach())
        self.register_buffer("_u", random_unit(matrix.shape[0], matrix))
        self.register_buffer("_v", random_unit(matrix.shape[1], matrix))
        steps = INIT_POWER_ITERATIONS + (REGISTRATION_POWER_ITERATIONS if registered_in_training
                                         else 0)
        power_step(matrix, self._u, self._v, EPS, steps)

    def updating(self) -> bool:
        """Whether this forward pass may update state (training mode, updates enabled)."""
        return self.training and state_updates_enabled()

    def sigma(self, matrix: torch.Tensor, update: bool) -> torch.Tensor:
        """The power-iteration estimate of ``matrix``'s spectral norm (one step first if
        ``update``); differentiable in ``matrix``, with ``u`` and ``v`` constants."""
        if update:
            power_step(matrix, self._u, self._v, EPS)
        # clones: the buffers change in place at the next step, autograd must not see that
        u = self._u.clone(memory_format=torch.contiguous_format)
        v = self._v.clone(memory_format=torch.contiguous_format)
        return torch.vdot(u, torch.mv(matrix, v))

    def normalized(self, weight: torch.Tensor) -> torch.Tensor:
        """``W / sigma(W)``, running the power-iteration step when :meth:`updating`."""
        return weight / self.sigma(weight_matrix(weight), self.updating())

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        with no_autocast(weight.device.type):
            out = self.normalized(weight)
            return out if self.scale == 1.0 else out * self.scale

    def extra_repr(self) -> str:
        return "" if self.scale == 1.0 else f"scale={self.scale}"


class SpectralNorm(Regularizer):
    """Spectral normalization (Miyato et al. 2018, eq. 8): every Conv2d, Linear and Embedding
    weight ``W`` is used as ``W / sigma(W)``, sigma by one power-iteration step per training-mode
    forward pass, exactly as :func:`torch.nn.utils.parametrizations.spectral_norm` (SPEC §2)."""

    @attrs.define
    class Config:
        pass

    def apply(self, module: nn.Module) -> nn.Module:
        parametrize_layers(
            module, lambda layer, w: SpectralNormWeight(w, registered_in_training=layer.training),
            self.name)
        return module


class ScaledSpectralNorm(Regularizer):
    """Scaled spectral normalization, SSN (Lin et al. 2021, §5.2): SN, then every normalized
    weight (not the bias) times a constant ``scale`` (SPEC §2)."""

    @attrs.define
    class Config:
        #: the constant the spectrally normalized weights are multiplied by (the BSSN paper
        #: sweeps SSN's scale over 0.7..10.0 on CIFAR-10, App. P.1, 1.0..1.6 on ImageNet and
        #: 0.7..1.6 elsewhere; 1 = plain SN).
        scale: float = attrs.field(default=1.0, validator=check_positive_number("ssn"))

    def apply(self, module: nn.Module) -> nn.Module:
        scale = self.config.scale
        parametrize_layers(
            module,
            lambda layer, w: SpectralNormWeight(w, scale, registered_in_training=layer.training),
            self.name)
        return module


@hookimpl
def register_regularizers(register) -> None:
    register("sn", SpectralNorm)
    register("ssn", ScaledSpectralNorm)
