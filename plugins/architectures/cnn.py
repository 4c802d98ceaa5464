"""SN-GAN's "standard CNN" (Miyato et al. 2018, Table 3), used by the BSSN paper (Lin et al.
2021) for CIFAR-10 at 32x32, STL-10 at 48x48 and CelebA at 64x64. Registered as ``cnn``::

    arch = StandardCNN(StandardCNN.Config(resolution=48))
    G, D = arch.build_generator(), arch.build_discriminator()
    logits = D(G(torch.randn(8, 128)))           # shape [8]

With M = resolution and M_g = M / 8:

- G: z -> Linear(M_g*M_g*g) -> BN-ReLU -> deconv4x4/2 (g -> g/2) -> BN-ReLU -> deconv4x4/2
  (-> g/4) -> BN-ReLU -> deconv4x4/2 (-> g/8) -> BN-ReLU -> conv3x3/1 (-> 3) -> tanh
  (g = ``g_ch`` = 512).
- D: conv3x3/1 (c), conv4x4/2 (c), conv3x3/1 (2c), conv4x4/2 (2c), conv3x3/1 (4c),
  conv4x4/2 (4c), conv3x3/1 (8c), each followed by LeakyReLU(0.1), then Linear(M_g*M_g*8c -> 1)
  (c = ``ch`` = 64): 7 convolutions ``c1..c7`` and ``linear``, in forward order.

Initialization as the BSSN authors' code (a DCGAN lineage): weights drawn from N(0, 0.02^2)
(the discriminator's convolutions from the normal truncated at two standard deviations),
biases zero, batch-norm scale 1 and shift 0. The networks are unconditional: labels are ignored.
"""

from __future__ import annotations

import attrs
import torch
import torch.nn.functional as F
from torch import nn

from core.hookspecs import hookimpl
from core.interfaces import Architecture
from core.validators import one_of, positive_int, satisfies

__all__ = ["CNNGenerator", "CNNDiscriminator", "StandardCNN", "RESOLUTIONS"]

#: image sizes of the BSSN paper's CNN experiments (CIFAR-10, STL-10, CelebA), and ours for the
#: small stacked digits (8, 16: the same layers on a 1x1 / 2x2 bottom).
RESOLUTIONS = (8, 16, 32, 48, 64)
#: standard deviation of the initial weights.
INIT_STD = 0.02
#: negative slope of the discriminator's leaky ReLUs.
LEAK = 0.1


def _normal_init(layer: nn.Module, truncated: bool = False) -> nn.Module:
    if truncated:
        nn.init.trunc_normal_(layer.weight, std=INIT_STD, a=-2 * INIT_STD, b=2 * INIT_STD)
    else:
        nn.init.normal_(layer.weight, std=INIT_STD)
    nn.init.zeros_(layer.bias)
    return layer


class CNNGenerator(nn.Module):
    """The standard-CNN generator; ``forward(z, y=None)`` ignores ``y``."""

    def __init__(self, z_dim: int, resolution: int, g_ch: int) -> None:
        super().__init__()
        self.z_dim, self.g_ch = z_dim, g_ch
        self.bottom = resolution // 8
        self.linear = _normal_init(nn.Linear(z_dim, self.bottom * self.bottom * g_ch))
        self.bn0 = nn.BatchNorm1d(self.bottom * self.bottom * g_ch)
        widths = [g_ch, g_ch // 2, g_ch // 4, g_ch // 8]
        for i, (cin, cout) in enumerate(zip(widths[:-1], widths[1:]), start=1):
            self.add_module(f"dc{i}", _normal_init(nn.ConvTranspose2d(cin, cout, 4, 2, padding=1)))
            self.add_module(f"bn{i}", nn.BatchNorm2d(cout))
        self.conv_out = _normal_init(nn.Conv2d(widths[-1], 3, 3, padding=1))

    def forward(self, z: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        h = F.relu(self.bn0(self.linear(z)))
        h = h.view(z.shape[0], self.g_ch, self.bottom, self.bottom)
        for i in (1, 2, 3):
            h = F.relu(getattr(self, f"bn{i}")(getattr(self, f"dc{i}")(h)))
        return torch.tanh(self.conv_out(h))


class CNNDiscriminator(nn.Module):
    """The standard-CNN discriminator; ``forward(x, y=None)`` -> logits ``[batch]``, ignores ``y``."""

    #: (kernel, stride, width multiplier of ``ch``) of the seven convolutions.
    LAYOUT = ((3, 1, 1), (4, 2, 1), (3, 1, 2), (4, 2, 2), (3, 1, 4), (4, 2, 4), (3, 1, 8))

    def __init__(self, resolution: int, ch: int) -> None:
        super().__init__()
        cin = 3
        for i, (k, s, mult) in enumerate(self.LAYOUT, start=1):
            conv = nn.Conv2d(cin, mult * ch, k, s, padding=1)
            self.add_module(f"c{i}", _normal_init(conv, truncated=True))
            cin = mult * ch
        bottom = resolution // 8
        self.linear = _normal_init(nn.Linear(bottom * bottom * cin, 1))

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        h = x
        for i in range(1, len(self.LAYOUT) + 1):
            h = F.leaky_relu(getattr(self, f"c{i}")(h), LEAK)
        return self.linear(h.flatten(1)).squeeze(1)


class StandardCNN(Architecture):
    """SN-GAN standard CNN (Miyato et al. 2018, Table 3) at 32, 48 or 64 pixels (8 and 16 for the
    small stacked digits); unconditional."""

    @attrs.define
    class Config:
        #: image size: 32 (CIFAR-10), 48 (STL-10), 64 (CelebA); 8 or 16 (small stacked digits).
        resolution: int = attrs.field(default=32, validator=one_of(RESOLUTIONS))
        z_dim: int = attrs.field(default=128, validator=positive_int)
        #: discriminator base width (convolutions ch, ch, 2ch, 2ch, 4ch, 4ch, 8ch).
        ch: int = attrs.field(default=64, validator=positive_int)
        #: generator width after the linear layer (then g/2, g/4, g/8); a multiple of 8.
        g_ch: int = attrs.field(default=512, validator=[positive_int, satisfies(
            lambda g: g % 8 == 0, "must be a multiple of 8 (the generator halves it three "
            "times)")])

    @property
    def resolution(self) -> int:
        return self.config.resolution

    @property
    def z_dim(self) -> int:
        return self.config.z_dim

    def build_generator(self) -> CNNGenerator:
        c = self.config
        return CNNGenerator(c.z_dim, c.resolution, c.g_ch)

    def build_discriminator(self) -> CNNDiscriminator:
        return CNNDiscriminator(self.config.resolution, self.config.ch)


@hookimpl
def register_architectures(register) -> None:
    register("cnn", StandardCNN)
