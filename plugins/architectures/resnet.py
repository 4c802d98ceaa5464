"""The SN-GAN ResNets (Miyato et al. 2018, appendix B; Miyato & Koyama 2018 for projection):
``resnet32`` (CIFAR-10/STL-10 at 32x32) and ``resnet128`` (ImageNet at 128x128), SPEC §3.

Registered as architectures ``resnet32`` and ``resnet128``; a recipe picks one with
``[generator.architecture]``/``[architecture]`` ``name = "resnet32"`` and sets the Config keys::

    arch = ResNet32(ResNet32.Config(ch=128, g_ch=256))
    G, D = arch.build_generator(), arch.build_discriminator()
    z, y = arch.sample_latents(64)
    logits = D(G(z, y), y)                       # shape [64]

Module names are the paper's layer numbering: the discriminator's convolutions, in
``named_modules()`` order, are ``b1.c1, b1.c2, b1.sc, b2.c1, ...`` (layer_0, layer_1, ...), then
``linear`` and (conditional) the projection ``embed``. The generator's spectral normalization
for ImageNet is not part of the architecture: recipes apply the ``sn`` regularizer to G.

Where the reference code differs by model, so do these (SPEC §3): the 32x32 discriminator's
final Linear has no bias (``nobias=True`` in SN-GAN's ``snresnet_32.py`` and the SR authors'
``dis.py``), the 128x128 one has one (SN-GAN's ``snresnet.py``, the SR authors' ``Dis.py``);
``resnet128``'s ``block = "bsn"`` builds the BSSN authors' discriminator (fjxmlzn/BSN
``no_gamma-ResNet``: hidden channels = out and a learnable shortcut in every block, 18 convs);
``bn_eps`` defaults to the Chainer code's 2e-5 (the BSSN authors' TensorFlow code: 1e-5).
"""

from __future__ import annotations

from typing import Sequence

import attrs
import torch
import torch.nn.functional as F
from torch import nn

from core.hookspecs import hookimpl
from core.interfaces import Architecture
from plugins.architectures.blocks import (CHAINER_BN_EPS, DBlock, GBlock, OptimizedDBlock,
                                          xavier_init)
from core.validators import nonnegative_int, number_in, one_of, positive_int

__all__ = ["ResNetGenerator", "ResNetDiscriminator", "ResNet32", "ResNet128"]

#: spatial size of the generator's first feature map.
BOTTOM_WIDTH = 4
#: ``resnet32``'s image sizes: the paper's 32, and 16 / 8 for the small stacked digits.
RESNET32_RESOLUTIONS = (8, 16, 32)
#: ``resnet128``'s discriminator block variants: SN-GAN's (also the SR authors') and the BSSN
#: authors'.
D_BLOCKS = ("sngan", "bsn")


def _check_labels(y: torch.Tensor | None, batch: int, num_classes: int, who: str) -> torch.Tensor:
    if y is None:
        raise ValueError(f"the {who} is class-conditional ({num_classes} classes): "
                         "pass labels y of shape [batch]")
    if y.shape != (batch,):
        raise ValueError(f"{who}: labels y must have shape [{batch}], got {tuple(y.shape)}")
    return y


class ResNetGenerator(nn.Module):
    """``z -> Linear(4*4*widths[0]) -> GBlock(widths[i], widths[i+1])... -> BN-ReLU-conv3x3(->3)
    -> tanh``; each GBlock doubles the resolution. With ``num_classes > 0`` the GBlocks' BNs are
    class-conditional and ``forward`` needs labels ``y``; otherwise ``y`` is ignored. ``bn_eps``
    is every batch normalization's epsilon.
    """

    def __init__(self, z_dim: int, widths: Sequence[int], num_classes: int = 0,
                 bn_eps: float = 1e-5) -> None:
        super().__init__()
        self.z_dim, self.num_classes = z_dim, num_classes
        self.bottom_channels = widths[0]
        self.linear = xavier_init(nn.Linear(z_dim, BOTTOM_WIDTH * BOTTOM_WIDTH * widths[0]))
        for i, (cin, cout) in enumerate(zip(widths[:-1], widths[1:]), start=1):
            self.add_module(f"b{i}", GBlock(cin, cout, num_classes, bn_eps))
        self.num_blocks = len(widths) - 1
        self.bn = nn.BatchNorm2d(widths[-1], eps=bn_eps)
        self.conv_out = xavier_init(nn.Conv2d(widths[-1], 3, 3, padding=1))

    @property
    def resolution(self) -> int:
        return BOTTOM_WIDTH * 2 ** self.num_blocks

    def forward(self, z: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        if self.num_classes > 0:
            y = _check_labels(y, z.shape[0], self.num_classes, "generator")
        h = self.linear(z).view(z.shape[0], self.bottom_channels, BOTTOM_WIDTH, BOTTOM_WIDTH)
        for i in range(1, self.num_blocks + 1):
            h = getattr(self, f"b{i}")(h, y)
        h = F.relu(self.bn(h))
        return torch.tanh(self.conv_out(h))


class ResNetDiscriminator(nn.Module):
    """``blocks -> ReLU -> global sum pooling -> Linear(->1)``, plus the projection
    ``<embed(y), h>`` of Miyato & Koyama (2018, eq. 3) when ``num_classes > 0``.

    ``forward(x, y=None)`` returns logits of shape ``[batch]``; ``y`` is required when
    conditional and ignored otherwise. ``linear_bias``: whether the final Linear has a bias.
    """

    def __init__(self, blocks: Sequence[nn.Module], num_classes: int = 0,
                 linear_bias: bool = True) -> None:
        super().__init__()
        self.num_classes = num_classes
        for i, block in enumerate(blocks, start=1):
            self.add_module(f"b{i}", block)
        self.num_blocks = len(blocks)
        features = blocks[-1].out_channels
        self.linear = xavier_init(nn.Linear(features, 1, bias=linear_bias))
        self.embed = xavier_init(nn.Embedding(num_classes, features)) if num_classes > 0 else None

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """``h``: the blocks' output after ReLU, summed over space, ``[batch, features]``."""
        h = x
        for i in range(1, self.num_blocks + 1):
            h = getattr(self, f"b{i}")(h)
        return F.relu(h).sum(dim=(2, 3))

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        h = self.features(x)
        out = self.linear(h).squeeze(1)
        if self.embed is not None:
            y = _check_labels(y, x.shape[0], self.num_classes, "discriminator")
            out = out + (self.embed(y) * h).sum(dim=1)
        return out


#: the check of ``bn_eps``: a batch-normalization epsilon in (0, 1).
bn_eps_check = number_in(0, 1, low_open=True, high_open=True)


class _ResNet(Architecture):
    """Shared by the two ResNets: the interface properties (their Configs check themselves)."""

    @property
    def z_dim(self) -> int:
        return self.config.z_dim


class ResNet32(_ResNet):
    """SN-GAN ResNet for 32x32 images (SPEC §3 ``resnet32``; Miyato et al. 2018, Table 4).

    G: z -> Linear(4*4*g_ch) -> 3 x GBlock(g_ch, g_ch) -> BN-ReLU-conv3x3-tanh.
    D: OptimizedDBlock(3, ch), DBlock(ch, ch, down), DBlock(ch, ch), DBlock(ch, ch) -> ReLU,
    sum, Linear(ch -> 1) without bias (SN-GAN ``snresnet_32.py``, SR ``dis.py``: ``nobias=True``):
    exactly 10 convolutions (layer_0..layer_9). With ``num_classes > 0`` G uses conditional BN
    and D adds the projection term.

    ``resolution = 16`` or ``8`` (ours, for the small stacked digits; not a paper setting): G has
    2 or 1 GBlocks after the same 4x4 start, D is unchanged (its global sum pooling takes any
    size).
    """

    @attrs.define
    class Config:
        #: discriminator width, the SR paper's CH (Table I: 32, 64, 128, 256).
        ch: int = attrs.field(default=128, validator=positive_int)
        #: generator width.
        g_ch: int = attrs.field(default=256, validator=positive_int)
        z_dim: int = attrs.field(default=128, validator=positive_int)
        #: 0 = unconditional.
        num_classes: int = attrs.field(default=0, validator=nonnegative_int)
        #: the generator's batch-normalization epsilon (the Chainer code's default, 2e-5).
        bn_eps: float = attrs.field(default=CHAINER_BN_EPS, validator=bn_eps_check)
        #: image size: 32 (the paper's); 16 or 8 for the small stacked digits (fewer GBlocks).
        resolution: int = attrs.field(default=32, validator=one_of(RESNET32_RESOLUTIONS))

    @property
    def resolution(self) -> int:
        return self.config.resolution

    def build_generator(self) -> ResNetGenerator:
        c = self.config
        blocks = RESNET32_RESOLUTIONS.index(c.resolution) + 1  # 8: 1, 16: 2, 32: 3
        return ResNetGenerator(c.z_dim, [c.g_ch] * (blocks + 1), c.num_classes, c.bn_eps)

    def build_discriminator(self) -> ResNetDiscriminator:
        ch = self.config.ch
        blocks = [OptimizedDBlock(3, ch), DBlock(ch, ch, down=True), DBlock(ch, ch), DBlock(ch, ch)]
        return ResNetDiscriminator(blocks, self.config.num_classes, linear_bias=False)


class ResNet128(_ResNet):
    """SN-GAN projection ResNet for 128x128 ImageNet (SPEC §3 ``resnet128``; Miyato & Koyama 2018).

    G: z -> Linear(4*4*16g) -> GBlocks 16g->16g->8g->4g->2g->g with class-conditional BN ->
    BN-ReLU-conv3x3-tanh (g = ``g_ch``). D: OptimizedDBlock(3, ch), DBlock(ch, 2ch, down),
    (2ch, 4ch, down), (4ch, 8ch, down), (8ch, 16ch, down), (16ch, 16ch) -> ReLU, sum,
    Linear(16ch -> 1, with bias) + projection. ``num_classes = 0`` makes both networks
    unconditional.

    ``block = "sngan"`` (default; SN-GAN's ``snresnet.py``, the SR authors' ``Dis.py``): DBlocks
    with hidden channels = in and an identity shortcut in the last block, exactly 17
    convolutions (layer_2 is b1's shortcut). ``block = "bsn"`` (the BSSN authors'
    ``no_gamma-ResNet``): hidden channels = out and a learnable 1x1 shortcut in every DBlock,
    the last one too, 18 convolutions, each block's c1 as wide as its output.
    """

    @attrs.define
    class Config:
        #: discriminator width (the paper's ch = 64).
        ch: int = attrs.field(default=64, validator=positive_int)
        #: generator width.
        g_ch: int = attrs.field(default=64, validator=positive_int)
        z_dim: int = attrs.field(default=128, validator=positive_int)
        #: ImageNet's 1000 classes; 0 = unconditional.
        num_classes: int = attrs.field(default=1000, validator=nonnegative_int)
        #: discriminator blocks: "sngan" (SN-GAN / SR, 17 convs) or "bsn" (BSSN authors', 18).
        block: str = attrs.field(default="sngan", validator=one_of(D_BLOCKS))
        #: the generator's batch-normalization epsilon (the Chainer code's default, 2e-5; the
        #: BSSN authors' TensorFlow code uses 1e-5).
        bn_eps: float = attrs.field(default=CHAINER_BN_EPS, validator=bn_eps_check)

    @property
    def resolution(self) -> int:
        return 128

    def build_generator(self) -> ResNetGenerator:
        c = self.config
        g = c.g_ch
        return ResNetGenerator(c.z_dim, [16 * g, 16 * g, 8 * g, 4 * g, 2 * g, g], c.num_classes,
                               c.bn_eps)

    def build_discriminator(self) -> ResNetDiscriminator:
        ch = self.config.ch
        bsn = self.config.block == "bsn"
        widths = [(ch, 2 * ch, True), (2 * ch, 4 * ch, True), (4 * ch, 8 * ch, True),
                  (8 * ch, 16 * ch, True), (16 * ch, 16 * ch, False)]
        blocks = [OptimizedDBlock(3, ch)] + [
            DBlock(cin, cout, down=down, hidden_channels=cout if bsn else None,
                   learnable_shortcut=True if bsn else None)
            for cin, cout, down in widths]
        return ResNetDiscriminator(blocks, self.config.num_classes)


@hookimpl
def register_architectures(register) -> None:
    register("resnet32", ResNet32)
    register("resnet128", ResNet128)
