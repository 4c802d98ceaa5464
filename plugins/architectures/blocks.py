"""Residual blocks of the SN-GAN ResNets (Miyato et al. 2018, appendix B; SPEC §3).

The architectures in :mod:`plugins.architectures.resnet` are stacks of these blocks::

    g = GBlock(256, 256)                    # BN-ReLU-up-conv3x3-BN-ReLU-conv3x3 + up-conv1x1
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
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "RESIDUAL_GAIN",
    "xavier_init",
    "ConditionalBatchNorm2d",
    "GBlock",
    "DBlock",
    "OptimizedDBlock",
]

#: Xavier-uniform gain of the convolutions on a block's residual path (the authors' code).
RESIDUAL_GAIN = math.sqrt(2.0)


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


class ConditionalBatchNorm2d(nn.Module):
    """Class-conditional batch normalization (de Vries et al. 2017; Miyato & Koyama 2018):
    ``BN(x) * gain[y] + bias[y]``, with shared batch statistics and per-class gain and bias.

    The per-class tables are plain parameters ``gain`` and ``bias`` of shape
    ``[num_classes, channels]`` (initialized to 1 and 0), deliberately not ``nn.Embedding``
    modules: regularizers apply to every Conv2d/Linear/Embedding of a network (SPEC §2), and
    spectrally normalizing these tables (e.g. with ``sn`` on a generator) would silently change
    the architecture.
    """

    def __init__(self, channels: int, num_classes: int) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(channels, affine=False)
        self.gain = nn.Parameter(torch.ones(num_classes, channels))
        self.bias = nn.Parameter(torch.zeros(num_classes, channels))

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if y is None:
            raise ValueError("ConditionalBatchNorm2d needs class labels y (got None)")
        h = self.bn(x)
        return h * self.gain[y][:, :, None, None] + self.bias[y][:, :, None, None]


def _batch_norm(channels: int, num_classes: int) -> nn.Module:
    return ConditionalBatchNorm2d(channels, num_classes) if num_classes > 0 \
        else nn.BatchNorm2d(channels)


def _normalize(bn: nn.Module, x: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
    return bn(x, y) if isinstance(bn, ConditionalBatchNorm2d) else bn(x)


class GBlock(nn.Module):
    """Generator block ``GBlock(in, out)`` (SPEC §3): residual path
    BN-ReLU-upsample(nearest, x2)-conv3x3(in->out)-BN-ReLU-conv3x3(out->out), shortcut
    upsample-conv1x1(in->out). With ``num_classes > 0`` both BNs are class-conditional.
    """

    def __init__(self, in_channels: int, out_channels: int, num_classes: int = 0) -> None:
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels
        self.bn1 = _batch_norm(in_channels, num_classes)
        self.c1 = xavier_init(nn.Conv2d(in_channels, out_channels, 3, padding=1), RESIDUAL_GAIN)
        self.bn2 = _batch_norm(out_channels, num_classes)
        self.c2 = xavier_init(nn.Conv2d(out_channels, out_channels, 3, padding=1), RESIDUAL_GAIN)
        self.sc = xavier_init(nn.Conv2d(in_channels, out_channels, 1), 1.0)

    def residual(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        h = F.relu(_normalize(self.bn1, x, y))
        h = self.c1(_upsample(h))
        h = F.relu(_normalize(self.bn2, h, y))
        return self.c2(h)

    def shortcut(self, x: torch.Tensor) -> torch.Tensor:
        return self.sc(_upsample(x))

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        return self.residual(x, y) + self.shortcut(x)


class DBlock(nn.Module):
    """Discriminator block ``DBlock(in, out, down)`` (SPEC §3): residual path
    ReLU-conv3x3(in->in)-ReLU-conv3x3(in->out)(-avgpool2 if ``down``); shortcut
    conv1x1(in->out)(-avgpool2) when ``in != out or down``, identity otherwise.
    """

    def __init__(self, in_channels: int, out_channels: int, down: bool = False) -> None:
        super().__init__()
        self.in_channels, self.out_channels, self.down = in_channels, out_channels, down
        hidden = in_channels
        self.c1 = xavier_init(nn.Conv2d(in_channels, hidden, 3, padding=1), RESIDUAL_GAIN)
        self.c2 = xavier_init(nn.Conv2d(hidden, out_channels, 3, padding=1), RESIDUAL_GAIN)
        self.learnable_shortcut = in_channels != out_channels or down
        self.sc = xavier_init(nn.Conv2d(in_channels, out_channels, 1), 1.0) \
            if self.learnable_shortcut else None

    def residual(self, x: torch.Tensor) -> torch.Tensor:
        h = self.c1(F.relu(x))  # not in place: the shortcut below needs x itself
        h = self.c2(F.relu(h))
        return F.avg_pool2d(h, 2) if self.down else h

    def shortcut(self, x: torch.Tensor) -> torch.Tensor:
        if self.sc is None:
            return x
        h = self.sc(x)
        return F.avg_pool2d(h, 2) if self.down else h

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
        h = self.c2(F.relu(self.c1(x)))
        return F.avg_pool2d(h, 2)

    def shortcut(self, x: torch.Tensor) -> torch.Tensor:
        return self.sc(F.avg_pool2d(x, 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.residual(x) + self.shortcut(x)
