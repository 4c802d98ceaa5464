"""Bidirectional spectral normalization (``bsn``) and its scaled form (``bssn``), SPEC §2.

A convolution kernel ``W [out, in, kh, kw]`` is divided by the mean of the spectral norms of its
two reshapes, ``W_out = W.reshape(out, -1)`` and ``W_in = W.transpose(0, 1).reshape(in, -1)``,
each tracked by its own persistent power iteration; Linear and Embedding layers get plain SN.
``bssn`` then multiplies the weight (never the bias) by a constant ``scale``::

    D = BidirectionalScaledSpectralNorm(BidirectionalScaledSpectralNorm.Config(scale=1.2)).apply(D)

The ``W_out`` vectors are the buffers ``_u``/``_v`` of SN (so SN state carries over); the
``W_in`` ones are ``_u_in``/``_v_in``.
"""

from __future__ import annotations

import attrs
import torch
from torch import nn

from core.hookspecs import hookimpl
from core.interfaces import Regularizer
from core.layers import weight_matrix
from plugins.regularizers.base import check_positive_number, parametrize_layers, power_step
from plugins.regularizers.sn import EPS, INIT_POWER_ITERATIONS, SpectralNormWeight, random_unit

__all__ = ["BidirectionalSpectralNormWeight", "BidirectionalSpectralNorm",
           "BidirectionalScaledSpectralNorm", "input_matrix"]


def input_matrix(weight: torch.Tensor) -> torch.Tensor:
    """``W_in = W.transpose(0, 1).reshape(in, -1)`` of a conv kernel (Lin et al. 2021, §5.1)."""
    return weight.transpose(0, 1).reshape(weight.shape[1], -1)


class BidirectionalSpectralNormWeight(SpectralNormWeight):
    """Parametrization of a conv kernel ``W -> scale * W / ((sigma(W_out) + sigma(W_in)) / 2)``
    (Lin et al. 2021, §5.1 "Bidirectional Normalization" and §5.2 for ``scale``).

    Both sigmas come from one power-iteration step per training-mode forward pass (while
    :func:`core.layers.state_updates_enabled`), with their vectors constant for autograd.
    """

    def __init__(self, weight: torch.Tensor, scale: float = 1.0) -> None:
        if weight.ndim != 4:
            raise ValueError(f"bidirectional SN needs a conv kernel [out, in, kh, kw], got shape "
                             f"{tuple(weight.shape)}")
        super().__init__(weight, scale)
        matrix = input_matrix(weight.detach())
        self.register_buffer("_u_in", random_unit(matrix.shape[0], matrix))
        self.register_buffer("_v_in", random_unit(matrix.shape[1], matrix))
        power_step(matrix, self._u_in, self._v_in, EPS, INIT_POWER_ITERATIONS)

    def sigma_in(self, matrix: torch.Tensor, update: bool) -> torch.Tensor:
        """The power-iteration spectral norm of ``W_in`` (as :meth:`sigma` for ``W_out``)."""
        if update:
            power_step(matrix, self._u_in, self._v_in, EPS)
        u = self._u_in.clone(memory_format=torch.contiguous_format)
        v = self._v_in.clone(memory_format=torch.contiguous_format)
        return torch.vdot(u, torch.mv(matrix, v))

    def normalized(self, weight: torch.Tensor) -> torch.Tensor:
        update = self.updating()
        sigma_out = self.sigma(weight_matrix(weight), update)
        sigma_in = self.sigma_in(input_matrix(weight), update)
        return weight / ((sigma_out + sigma_in) / 2)


def _bidirectional(layer: nn.Module, weight: torch.Tensor, scale: float) -> SpectralNormWeight:
    if isinstance(layer, nn.Conv2d):
        return BidirectionalSpectralNormWeight(weight, scale)
    return SpectralNormWeight(weight, scale)


class BidirectionalSpectralNorm(Regularizer):
    """Bidirectional spectral normalization, BSN (Lin et al. 2021, §5.1): each conv kernel is
    divided by ``(sigma(W_out) + sigma(W_in)) / 2``; Linear and Embedding layers get plain SN
    (SPEC §2)."""

    @attrs.define
    class Config:
        pass

    def apply(self, module: nn.Module) -> nn.Module:
        parametrize_layers(module, lambda layer, w: _bidirectional(layer, w, 1.0),
                           self.name)
        return module


class BidirectionalScaledSpectralNorm(Regularizer):
    """Bidirectional scaled spectral normalization, BSSN (Lin et al. 2021, §5): BSN, then every
    normalized weight (not the bias) times a constant ``scale`` (SPEC §2)."""

    @attrs.define
    class Config:
        #: the constant the normalized weights are multiplied by (the paper sweeps 0.7..4.0 on
        #: CIFAR-10, 0.7..1.6 elsewhere; 1 = plain BSN).
        scale: float = attrs.field(default=1.0, validator=check_positive_number("bssn"))

    def apply(self, module: nn.Module) -> nn.Module:
        scale = self.config.scale
        parametrize_layers(module, lambda layer, w: _bidirectional(layer, w, scale),
                           self.name)
        return module


@hookimpl
def register_regularizers(register) -> None:
    register("bsn", BidirectionalSpectralNorm)
    register("bssn", BidirectionalScaledSpectralNorm)
