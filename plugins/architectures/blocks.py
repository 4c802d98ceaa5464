"""Residual blocks of the SN-GAN ResNets (Miyato et al. 2018, appendix B; SPEC §3).

The architectures in :mod:`plugins.architectures.resnet` are stacks of these blocks::

    g = GBlock(256, 256)                    # BN-ReLU-up-conv3x3-BN-ReLU-conv3x3 + conv1x1-up
    d1 = OptimizedDBlock(3, 128)            # first block of every discriminator
    d2 = DBlock(128, 128, down=True)

Submodules are defined in forward order (``c1``, ``c2``, then the shortcut ``sc``), so that
``named_modules()`` lists a network's convolutions in the order of the paper's layer numbering
(layer_0, layer_1, ...), which is the order :func:`core.layers.weight_layers` and the spectral
monitor use.

No activation is applied in place: every block's shortcut sees the block's input unchanged
(SPEC §3). Initialization follows the authors' code: Xavier-uniform (Glorot & Bengio 2010) with
gain sqrt(2) for the convolutions of the residual path, gain 1 for shortcuts, linear layers and
output convolutions; biases start at zero.

Two variants of the discriminator block exist in the authors' code and both are offered:
SN-GAN's ``DBlock(in, out)`` (hidden channels = ``in``, identity shortcut when ``in == out`` and
no downsampling; pfnet-research/sngan_projection ``dis_models/resblocks.py``, also the SR
authors') and the BSSN authors' (hidden channels = ``out``, a learnable 1x1 shortcut in every
block; fjxmlzn/BSN ``no_gamma-ResNet/gan/op.py`` ``down_resnet``)::

    DBlock(128, 256, down=True, hidden_channels=256, learnable_shortcut=True)   # BSN's

Batch normalization's epsilon is a parameter (``bn_eps``): the Chainer code of SN-GAN and SR
uses Chainer's default 2e-5, the BSSN authors' TensorFlow code 1e-5 (torch's default).

The generator block's shortcut is written upsample-conv1x1 in the paper and the authors' code;
``GBlock`` runs the 1x1 convolution first. A 1x1 convolution acts on each pixel alone and nearest
upsampling copies pixels, so the two orders give the same output (up to float rounding) with a
quarter of the shortcut's work; parameters are the same. :func:`upsample_before_shortcut_conv`
restores the paper's order, for benchmarks and tests only.

The discriminator blocks' downsampling, conv3x3 (padding 1) then 2x2 average pooling, runs as one
convolution: average pooling is itself a convolution (a 2x2 box of 1/4, stride 2), so the two
compose into a 4x4 convolution of stride 2 and padding 1 whose kernel is the 3x3 kernel summed
over the box's four shifts, divided by 4 (:func:`pooled_kernel`); the bias passes through the
pooling unchanged. Same output up to float rounding, from the same parameters (the regularizers'
parametrizations compute the 3x3 weight as before), with 16/36 of the convolution's
multiply-adds at a quarter of the positions and no pooling pass; a learnable shortcut that
convolves then pools pools first (a 1x1 convolution commutes with average pooling). A convolution
carrying module hooks runs unfolded, so the hooks still fire. :func:`pool_after_conv` restores
the paper's order, for benchmarks and tests only.
"""

from __future__ import annotations

import contextlib
import math
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "RESIDUAL_GAIN",
    "CHAINER_BN_EPS",
    "xavier_init",
    "ConditionalBatchNorm2d",
    "GBlock",
    "DBlock",
    "OptimizedDBlock",
    "upsample_before_shortcut_conv",
    "pooled_kernel",
    "conv_then_pool",
    "pool_after_conv",
]

#: Xavier-uniform gain of the convolutions on a block's residual path (the authors' code).
RESIDUAL_GAIN = math.sqrt(2.0)
#: batch normalization's epsilon in the SN-GAN / SR Chainer code (``L.BatchNormalization`` and
#: ``CategoricalConditionalBatchNormalization`` default ``eps=2e-5``).
CHAINER_BN_EPS = 2e-5


def xavier_init(layer: nn.Module, gain: float = 1.0) -> nn.Module:
    """Xavier-uniform ``weight`` with ``gain`` (bound ``gain * sqrt(6 / (fan_in + fan_out))``),
    zero ``bias``; returns ``layer``."""
    nn.init.xavier_uniform_(layer.weight, gain=gain)
    if getattr(layer, "bias", None) is not None:
        nn.init.zeros_(layer.bias)
    return layer


def _upsample(x: torch.Tensor) -> torch.Tensor:
    """Nearest-neighbour upsampling by 2."""
    return F.interpolate(x, scale_factor=2, mode="nearest")


#: GBlock's shortcut order: True = conv1x1 then upsample (the fast, equal order; the default).
_SHORTCUT_CONV_FIRST = True


@contextlib.contextmanager
def upsample_before_shortcut_conv() -> Iterator[None]:
    """Within the block, every :class:`GBlock` shortcut runs the paper's order, upsample then
    conv1x1 (4x the work, same result): for benchmarks and tests only, not a recipe setting."""
    global _SHORTCUT_CONV_FIRST
    previous, _SHORTCUT_CONV_FIRST = _SHORTCUT_CONV_FIRST, False
    try:
        yield
    finally:
        _SHORTCUT_CONV_FIRST = previous


#: DBlock/OptimizedDBlock downsampling: True = conv3x3 and pooling as one 4x4 stride-2
#: convolution, 1x1 shortcuts pooled first (the fast, equal form; the default).
_POOL_FOLDED = True


@contextlib.contextmanager
def pool_after_conv() -> Iterator[None]:
    """Within the block, the discriminator blocks pool after their convolutions, as written in
    the paper (2.25x the work of the folded form, same result): for benchmarks and tests only,
    not a recipe setting."""
    global _POOL_FOLDED
    previous, _POOL_FOLDED = _POOL_FOLDED, False
    try:
        yield
    finally:
        _POOL_FOLDED = previous


def pooled_kernel(weight: torch.Tensor) -> torch.Tensor:
    """The 4x4 kernel of ``avg_pool2d(conv2d(x, weight, padding=1), 2)`` as one convolution of
    stride 2 and padding 1: ``weight`` ``[out, in, 3, 3]`` summed over the four shifts of the
    2x2 pooling box, divided by 4 (differentiable in ``weight``)."""
    return (F.pad(weight, (0, 1, 0, 1)) + F.pad(weight, (1, 0, 0, 1))
            + F.pad(weight, (0, 1, 1, 0)) + F.pad(weight, (1, 0, 1, 0))) / 4


def _plain_conv(conv: nn.Conv2d, kernel: int) -> bool:
    """Whether ``conv`` is the stride-1, same-padded ``kernel`` x ``kernel`` convolution the
    folded forms assume, without module hooks that a functional call would skip."""
    return (conv.kernel_size == (kernel, kernel) and conv.stride == (1, 1)
            and conv.padding == ((kernel - 1) // 2,) * 2 and conv.dilation == (1, 1)
            and conv.groups == 1 and conv.padding_mode == "zeros"
            and not conv._forward_hooks and not conv._forward_pre_hooks)


def conv_then_pool(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """``avg_pool2d(conv(x), 2)``, computed as one convolution of stride 2 when ``conv`` is a
    plain 3x3 (``pooled_kernel``) or 1x1 (pooling first) convolution."""
    if _POOL_FOLDED and _plain_conv(conv, 3):
        return F.conv2d(x, pooled_kernel(conv.weight), conv.bias, stride=2, padding=1)
    if _POOL_FOLDED and _plain_conv(conv, 1):
        return conv(F.avg_pool2d(x, 2))
    return F.avg_pool2d(conv(x), 2)


class ConditionalBatchNorm2d(nn.Module):
    """Class-conditional batch normalization (de Vries et al. 2017; Miyato & Koyama 2018):
    ``BN(x) * gain[y] + bias[y]``, with shared batch statistics and per-class gain and bias.

    The per-class tables are plain parameters ``gain`` and ``bias`` of shape
    ``[num_classes, channels]`` (initialized to 1 and 0), deliberately not ``nn.Embedding``
    modules: regularizers apply to every Conv2d/Linear/Embedding of a network (SPEC §2), and
    spectrally normalizing these tables (e.g. with ``sn`` on a generator) would silently change
    the architecture.
    """

    def __init__(self, channels: int, num_classes: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(channels, affine=False, eps=eps)
        self.gain = nn.Parameter(torch.ones(num_classes, channels))
        self.bias = nn.Parameter(torch.zeros(num_classes, channels))

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if y is None:
            raise ValueError("ConditionalBatchNorm2d needs class labels y (got None)")
        h = self.bn(x)
        return h * self.gain[y][:, :, None, None] + self.bias[y][:, :, None, None]


def _batch_norm(channels: int, num_classes: int, eps: float = 1e-5) -> nn.Module:
    return ConditionalBatchNorm2d(channels, num_classes, eps) if num_classes > 0 \
        else nn.BatchNorm2d(channels, eps=eps)


def _normalize(bn: nn.Module, x: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
    return bn(x, y) if isinstance(bn, ConditionalBatchNorm2d) else bn(x)


class GBlock(nn.Module):
    """Generator block ``GBlock(in, out)`` (SPEC §3): residual path
    BN-ReLU-upsample(nearest, x2)-conv3x3(in->out)-BN-ReLU-conv3x3(out->out), shortcut
    upsample-conv1x1(in->out), computed as conv1x1-upsample (equal, see the module docstring).
    With ``num_classes > 0`` both BNs are class-conditional; ``bn_eps`` is their epsilon.
    """

    def __init__(self, in_channels: int, out_channels: int, num_classes: int = 0,
                 bn_eps: float = 1e-5) -> None:
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels
        self.bn1 = _batch_norm(in_channels, num_classes, bn_eps)
        self.c1 = xavier_init(nn.Conv2d(in_channels, out_channels, 3, padding=1), RESIDUAL_GAIN)
        self.bn2 = _batch_norm(out_channels, num_classes, bn_eps)
        self.c2 = xavier_init(nn.Conv2d(out_channels, out_channels, 3, padding=1), RESIDUAL_GAIN)
        self.sc = xavier_init(nn.Conv2d(in_channels, out_channels, 1), 1.0)

    def residual(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        h = F.relu(_normalize(self.bn1, x, y))
        h = self.c1(_upsample(h))
        h = F.relu(_normalize(self.bn2, h, y))
        return self.c2(h)

    def shortcut(self, x: torch.Tensor) -> torch.Tensor:
        if _SHORTCUT_CONV_FIRST:  # per-pixel conv commutes with nearest upsampling
            return _upsample(self.sc(x))
        return self.sc(_upsample(x))

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        return self.residual(x, y) + self.shortcut(x)


class DBlock(nn.Module):
    """Discriminator block ``DBlock(in, out, down)`` (SPEC §3): residual path
    ReLU-conv3x3(in->hidden)-ReLU-conv3x3(hidden->out)(-avgpool2 if ``down``); shortcut
    conv1x1(in->out)(-avgpool2) when learnable, identity otherwise.

    Defaults are SN-GAN's block: ``hidden_channels = in`` and a learnable shortcut only when
    ``in != out or down``. The BSSN authors' block is ``hidden_channels = out,
    learnable_shortcut = True`` (fjxmlzn/BSN ``no_gamma-ResNet/gan/op.py``, ``down_resnet``).
    """

    def __init__(self, in_channels: int, out_channels: int, down: bool = False,
                 hidden_channels: int | None = None,
                 learnable_shortcut: bool | None = None) -> None:
        super().__init__()
        self.in_channels, self.out_channels, self.down = in_channels, out_channels, down
        hidden = in_channels if hidden_channels is None else hidden_channels
        self.hidden_channels = hidden
        self.c1 = xavier_init(nn.Conv2d(in_channels, hidden, 3, padding=1), RESIDUAL_GAIN)
        self.c2 = xavier_init(nn.Conv2d(hidden, out_channels, 3, padding=1), RESIDUAL_GAIN)
        if learnable_shortcut is None:
            learnable_shortcut = in_channels != out_channels or down
        elif not learnable_shortcut and in_channels != out_channels:
            raise ValueError(f"DBlock({in_channels}, {out_channels}): an identity shortcut needs "
                             "in_channels == out_channels")
        self.learnable_shortcut = learnable_shortcut
        self.sc = xavier_init(nn.Conv2d(in_channels, out_channels, 1), 1.0) \
            if self.learnable_shortcut else None

    def residual(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.c1(F.relu(x)))  # not in place: the shortcut below needs x itself
        return conv_then_pool(self.c2, h) if self.down else self.c2(h)

    def shortcut(self, x: torch.Tensor) -> torch.Tensor:
        if self.sc is None:
            return x
        return conv_then_pool(self.sc, x) if self.down else self.sc(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.residual(x) + self.shortcut(x)


class OptimizedDBlock(nn.Module):
    """First discriminator block ``OptimizedDBlock(in, out)`` (SPEC §3; SN-GAN's "optimized"
    block, no ReLU on the image): residual conv3x3(in->out)-ReLU-conv3x3(out->out)-avgpool2,
    shortcut avgpool2-conv1x1(in->out).
    """

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels
        self.c1 = xavier_init(nn.Conv2d(in_channels, out_channels, 3, padding=1), RESIDUAL_GAIN)
        self.c2 = xavier_init(nn.Conv2d(out_channels, out_channels, 3, padding=1), RESIDUAL_GAIN)
        self.sc = xavier_init(nn.Conv2d(in_channels, out_channels, 1), 1.0)

    def residual(self, x: torch.Tensor) -> torch.Tensor:
        return conv_then_pool(self.c2, F.relu(self.c1(x)))

    def shortcut(self, x: torch.Tensor) -> torch.Tensor:
        return self.sc(F.avg_pool2d(x, 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.residual(x) + self.shortcut(x)
