"""Tests of the architecture plugins (SPEC §3): structure, forward contract, shortcut semantics,
conditioning and initialization, with small widths so that every test runs in about a second."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from core.errors import SpecregError
from core.interfaces import Architecture
from core.registry import get_registry
from core.layers import weight_layers
from plugins.architectures.blocks import (CHAINER_BN_EPS, RESIDUAL_GAIN, ConditionalBatchNorm2d,
                                          DBlock, GBlock, OptimizedDBlock)
from plugins.architectures.cnn import StandardCNN
from plugins.architectures.resnet import ResNet32, ResNet128
from plugins.architectures.validation import ArchitectureConfigError

torch.set_num_threads(1)

#: small instances of every registered architecture: (registry name, Config keyword arguments).
SMALL = [
    ("resnet32", dict(ch=8, g_ch=8)),
    ("resnet32", dict(ch=8, g_ch=8, num_classes=5)),
    ("resnet32", dict(ch=8, g_ch=8, resolution=16)),
    ("resnet32", dict(ch=8, g_ch=8, resolution=8)),
    ("resnet128", dict(ch=2, g_ch=2, num_classes=7)),
    ("resnet128", dict(ch=2, g_ch=2, num_classes=0)),
    ("resnet128", dict(ch=2, g_ch=2, num_classes=0, block="bsn")),
    ("cnn", dict(resolution=32, ch=4, g_ch=16)),
    ("cnn", dict(resolution=48, ch=4, g_ch=16)),
    ("cnn", dict(resolution=64, ch=4, g_ch=16)),
]
IDS = [f"{name}-" + "-".join(f"{k}{v}" for k, v in kw.items()) for name, kw in SMALL]

RESNET32_D_CONVS = ["b1.c1", "b1.c2", "b1.sc", "b2.c1", "b2.c2", "b2.sc",
                    "b3.c1", "b3.c2", "b4.c1", "b4.c2"]
RESNET128_D_CONVS = ["b1.c1", "b1.c2", "b1.sc",
                     "b2.c1", "b2.c2", "b2.sc", "b3.c1", "b3.c2", "b3.sc",
                     "b4.c1", "b4.c2", "b4.sc", "b5.c1", "b5.c2", "b5.sc",
                     "b6.c1", "b6.c2"]
#: the BSSN authors' ResNet D (fjxmlzn/BSN no_gamma-ResNet): every block has its 1x1 shortcut.
RESNET128_BSN_D_CONVS = [f"b{i}.{c}" for i in range(1, 7) for c in ("c1", "c2", "sc")]


def make(name: str, **kwargs) -> Architecture:
    cls = get_registry().architectures[name]
    return cls(cls.Config(**kwargs))


def inputs(arch: Architecture, n: int = 3, seed: int = 0):
    rng = torch.Generator().manual_seed(seed)
    z, y = arch.sample_latents(n, rng)
    x = torch.rand(n, 3, arch.resolution, arch.resolution, generator=rng) * 2 - 1
    return z, y, x


def conv_names(module: nn.Module) -> list[str]:
    return [name for name, _ in weight_layers(module, (nn.Conv2d,))]


# ---------------------------------------------------------------------------------------------
# Registry and interface
# ---------------------------------------------------------------------------------------------


def test_registered_under_their_names():
    archs = get_registry().architectures
    assert archs["resnet32"] is ResNet32
    assert archs["resnet128"] is ResNet128
    assert archs["cnn"] is StandardCNN


def test_defaults_are_the_papers():
    r32, r128, cnn = ResNet32(), ResNet128(), StandardCNN()
    assert (r32.config.ch, r32.config.g_ch, r32.z_dim, r32.num_classes) == (128, 256, 128, 0)
    assert (r32.resolution, r32.conditional) == (32, False)
    assert (r128.config.ch, r128.config.g_ch, r128.z_dim, r128.num_classes) == (64, 64, 128, 1000)
    assert (r128.resolution, r128.conditional) == (128, True)
    assert r128.config.block == "sngan"
    assert r32.config.bn_eps == r128.config.bn_eps == CHAINER_BN_EPS == 2e-5
    assert (cnn.resolution, cnn.z_dim, cnn.config.ch, cnn.config.g_ch) == (32, 128, 64, 512)
    assert not cnn.conditional


@pytest.mark.parametrize("name,kwargs", SMALL, ids=IDS)
def test_forward_shapes_and_range(name, kwargs):
    arch = make(name, **kwargs)
    G, D = arch.build_generator(), arch.build_discriminator()
    z, y, x = inputs(arch)
    assert z.shape == (3, arch.z_dim)
    assert (y is None) == (not arch.conditional)
    if arch.conditional:
        assert y.dtype == torch.int64 and 0 <= int(y.min()) and int(y.max()) < arch.num_classes
    images = G(z, y)
    R = arch.resolution
    assert images.shape == (3, 3, R, R)
    assert torch.isfinite(images).all() and images.abs().max() <= 1
    assert images.std() > 0  # not a constant image
    for batch in (x, images):
        logits = D(batch, y)
        assert logits.shape == (3,)
        assert torch.isfinite(logits).all()


@pytest.mark.parametrize("name,kwargs", SMALL, ids=IDS)
def test_every_parameter_gets_a_gradient(name, kwargs):
    arch = make(name, **kwargs)
    G, D = arch.build_generator(), arch.build_discriminator()
    # Eval mode: batch norm is then a fixed affine map, so even biases right before a BN (which a
    # training-mode BN cancels exactly) must receive a non-zero gradient.
    G.eval()
    z, y, _ = inputs(arch, n=4)
    D(G(z, y), y).sum().backward()
    for net in (G, D):
        for pname, p in net.named_parameters():
            assert p.grad is not None, pname
            assert torch.isfinite(p.grad).all(), pname
            assert p.grad.abs().sum() > 0, pname


@pytest.mark.parametrize("name,kwargs", SMALL, ids=IDS)
def test_training_mode_gradients_exist(name, kwargs):
    arch = make(name, **kwargs)
    G, D = arch.build_generator(), arch.build_discriminator()
    z, y, _ = inputs(arch, n=4)
    D(G(z, y), y).mean().backward()
    for net in (G, D):
        for pname, p in net.named_parameters():
            assert p.grad is not None and torch.isfinite(p.grad).all(), pname


@pytest.mark.parametrize("name,kwargs", SMALL, ids=IDS)
def test_named_modules_order_is_forward_order(name, kwargs):
    """The spectral monitor numbers layers by ``named_modules()`` order: it must be the order in
    which the forward pass uses them (checked with forward hooks)."""
    arch = make(name, **kwargs)
    G, D = arch.build_generator(), arch.build_discriminator()
    z, y, x = inputs(arch)
    for net, args in ((G, (z, y)), (D, (x, y))):
        calls: list[str] = []
        handles = [m.register_forward_hook(lambda mod, inp, out, n=n: calls.append(n))
                   for n, m in weight_layers(net)]
        net(*args)
        for h in handles:
            h.remove()
        assert calls == [n for n, _ in weight_layers(net)]


# ---------------------------------------------------------------------------------------------
# Discriminator structure: the paper's layer numbering
# ---------------------------------------------------------------------------------------------


def test_resnet32_discriminator_has_the_ten_documented_convs():
    D = ResNet32(ResNet32.Config(ch=8)).build_discriminator()
    assert conv_names(D) == RESNET32_D_CONVS
    convs = dict(weight_layers(D, (nn.Conv2d,)))
    assert [n for n in RESNET32_D_CONVS if convs[n].kernel_size == (1, 1)] == ["b1.sc", "b2.sc"]
    assert convs["b1.c1"].in_channels == 3 and convs["b1.sc"].in_channels == 3
    assert all(c.out_channels == 8 for c in convs.values())
    assert D.b3.sc is None and D.b4.sc is None  # identity shortcuts
    assert [n for n, _ in weight_layers(D)] == RESNET32_D_CONVS + ["linear"]
    assert D.linear.in_features == 8 and D.linear.out_features == 1


@pytest.mark.parametrize("num_classes", [0, 10])
def test_resnet32_final_linear_has_no_bias_resnet128_has_one(num_classes):
    """Issue 11 point 4: SN-GAN's snresnet_32 and the SR authors' dis.py build the 32x32 D's
    last layer with ``SNLinear(ch, 1, nobias=True)``; the 128x128 ones (snresnet.py, Dis.py)
    keep the bias."""
    D32 = ResNet32(ResNet32.Config(ch=8, num_classes=num_classes)).build_discriminator()
    assert D32.linear.bias is None
    assert "linear.bias" not in dict(D32.named_parameters())
    D128 = ResNet128(ResNet128.Config(ch=2, g_ch=2, num_classes=num_classes)).build_discriminator()
    assert D128.linear.bias is not None and D128.linear.bias.shape == (1,)
    for block in ("sngan", "bsn"):
        D = ResNet128(ResNet128.Config(ch=2, g_ch=2, block=block)).build_discriminator()
        assert D.linear.bias is not None


def test_layer_order_survives_spectral_norm_parametrization():
    """Regularizers parametrize each weight (torch.nn.utils.parametrize); the layer names and
    their order must stay the paper's numbering, and the forward pass must still work."""
    D = ResNet32(ResNet32.Config(ch=8, num_classes=3)).build_discriminator()
    for _, layer in list(weight_layers(D)):
        torch.nn.utils.parametrizations.spectral_norm(layer)
    assert [n for n, _ in weight_layers(D)] == RESNET32_D_CONVS + ["linear", "embed"]
    assert D(torch.randn(2, 3, 32, 32), torch.tensor([0, 2])).shape == (2,)


def test_resnet32_conditional_discriminator_keeps_the_conv_order():
    D = ResNet32(ResNet32.Config(ch=8, num_classes=10)).build_discriminator()
    assert [n for n, _ in weight_layers(D)] == RESNET32_D_CONVS + ["linear", "embed"]
    assert D.embed.weight.shape == (10, 8)


def test_resnet128_discriminator_has_the_seventeen_documented_convs():
    ch = 2
    D = ResNet128(ResNet128.Config(ch=ch, g_ch=2, num_classes=7)).build_discriminator()
    assert conv_names(D) == RESNET128_D_CONVS
    convs = dict(weight_layers(D, (nn.Conv2d,)))
    assert conv_names(D)[2] == "b1.sc" and convs["b1.sc"].kernel_size == (1, 1)
    widths = {"b1": (3, ch), "b2": (ch, 2 * ch), "b3": (2 * ch, 4 * ch), "b4": (4 * ch, 8 * ch),
              "b5": (8 * ch, 16 * ch), "b6": (16 * ch, 16 * ch)}
    for block, (cin, cout) in widths.items():
        assert convs[f"{block}.c1"].in_channels == cin
        assert convs[f"{block}.c2"].out_channels == cout
    assert [getattr(D, f"b{i}").down for i in range(2, 7)] == [True] * 4 + [False]
    assert [n for n, _ in weight_layers(D)] == RESNET128_D_CONVS + ["linear", "embed"]
    assert D.embed.weight.shape == (7, 16 * ch)


def bsn_reference_conv_shapes(ch: int) -> list[tuple[int, ...]]:
    """The conv kernels of fjxmlzn/BSN ``no_gamma-ResNet/gan/network.py`` in the order its
    ``down_resnet`` creates them (block1, block2, shortcut), as torch shapes [out, in, k, k]:
    layer0 is ``down_resnet(images, 64, 64, first=True)``, layers 1-4 ``down_resnet(h, c, c)``
    with c = 128, 256, 512, 1024 (hidden = output channels), layer5 ``down_resnet(h, 1024, 1024,
    down=False)``; every non-first block convolves its shortcut. Widths are ch times 1..16."""
    shapes = [(ch, 3, 3, 3), (ch, ch, 3, 3), (ch, 3, 1, 1)]
    widths = [(ch, 2 * ch), (2 * ch, 4 * ch), (4 * ch, 8 * ch), (8 * ch, 16 * ch),
              (16 * ch, 16 * ch)]
    for cin, cout in widths:
        shapes += [(cout, cin, 3, 3), (cout, cout, 3, 3), (cout, cin, 1, 1)]
    return shapes


def forward_order(net: nn.Module, *args) -> list[tuple[str, tuple[int, ...]]]:
    """``(name, weight shape)`` of every weight layer in the order the forward pass calls it."""
    calls: list[tuple[str, tuple[int, ...]]] = []
    handles = [m.register_forward_hook(
        lambda mod, inp, out, n=n: calls.append((n, tuple(mod.weight.shape))))
        for n, m in weight_layers(net)]
    try:
        net(*args)
    finally:
        for h in handles:
            h.remove()
    return calls


def test_resnet128_bsn_block_is_the_bssn_authors_discriminator():
    """Issue 11 point 3: ``block = "bsn"`` is the BSSN authors' D: 18 convs (each block's c1 as
    wide as its output, a learnable 1x1 shortcut in all six blocks, the last one too), then the
    Linear; names and shapes in forward order, checked by running it."""
    ch = 3
    D = ResNet128(ResNet128.Config(ch=ch, g_ch=2, num_classes=0, block="bsn")).build_discriminator()
    calls = forward_order(D, torch.randn(2, 3, 128, 128))
    expected = list(zip(RESNET128_BSN_D_CONVS, bsn_reference_conv_shapes(ch)))
    assert calls == expected + [("linear", (1, 16 * ch))]
    assert len(RESNET128_BSN_D_CONVS) == 18
    assert [getattr(D, f"b{i}").down for i in range(2, 7)] == [True] * 4 + [False]
    assert D.linear.bias is not None  # the authors' linear() has a bias


def test_resnet128_bsn_block_at_the_papers_width():
    """At ch = 64 (widths 64..1024) the shapes are the authors' exactly; SN-GAN's block has 17."""
    D = ResNet128(ResNet128.Config(num_classes=0, block="bsn")).build_discriminator()
    layers = [(n, tuple(m.weight.shape)) for n, m in weight_layers(D, (nn.Conv2d,))]
    assert layers == list(zip(RESNET128_BSN_D_CONVS, bsn_reference_conv_shapes(64)))
    assert D.b6.c1.weight.shape == (1024, 1024, 3, 3) and D.b2.c1.weight.shape == (128, 64, 3, 3)
    sngan = ResNet128(ResNet128.Config(ch=2, g_ch=2)).build_discriminator()
    assert conv_names(sngan) == RESNET128_D_CONVS and sngan.b6.sc is None
    assert sngan.b2.c1.weight.shape == (2, 2, 3, 3)  # SN-GAN: hidden = in channels


def test_resnet128_sngan_block_forward_order_and_shapes():
    ch = 2
    D = ResNet128(ResNet128.Config(ch=ch, g_ch=2, num_classes=5)).build_discriminator()
    calls = forward_order(D, torch.randn(2, 3, 128, 128), torch.tensor([0, 4]))
    shapes = [(ch, 3, 3, 3), (ch, ch, 3, 3), (ch, 3, 1, 1)]
    for cin, cout in [(ch, 2 * ch), (2 * ch, 4 * ch), (4 * ch, 8 * ch), (8 * ch, 16 * ch)]:
        shapes += [(cin, cin, 3, 3), (cout, cin, 3, 3), (cout, cin, 1, 1)]
    shapes += [(16 * ch, 16 * ch, 3, 3)] * 2
    assert calls == list(zip(RESNET128_D_CONVS, shapes)) + [("linear", (1, 16 * ch)),
                                                             ("embed", (5, 16 * ch))]


@pytest.mark.parametrize("resolution", [32, 48, 64])
def test_standard_cnn_discriminator_is_the_bssn_authors(resolution):
    """The BSSN zoo's CIFAR-10/STL-10/CelebA D is the authors' CNN (fjxmlzn/BSN
    ``no_gamma-CNN/gan/network.py``: layer0..layer6 conv2d 64, 64, 128, 128, 256, 256, 512
    with kernels 3, 4, 3, 4, 3, 4, 3, then ``linear`` to 1 on the flattened M/8 x M/8 x 512
    map); they use no ResNet there. Names and shapes in forward order, at the paper's width."""
    D = StandardCNN(StandardCNN.Config(resolution=resolution)).build_discriminator()
    widths = [64, 64, 128, 128, 256, 256, 512]
    kernels = [3, 4, 3, 4, 3, 4, 3]
    ins = [3] + widths[:-1]
    expected = [(f"c{i + 1}", (w, cin, k, k)) for i, (w, cin, k) in enumerate(zip(widths, ins,
                                                                                  kernels))]
    m = resolution // 8
    calls = forward_order(D, torch.randn(1, 3, resolution, resolution))
    assert calls == expected + [("linear", (1, m * m * 512))]
    assert D.linear.bias is not None  # the authors' linear() adds a bias


def test_unknown_resnet128_block_is_a_user_error():
    with pytest.raises(ArchitectureConfigError, match="block must be one of 'sngan', 'bsn'"):
        ResNet128(ResNet128.Config(block="bssn"))


@pytest.mark.parametrize("cls,eps", [(ResNet32, 2e-5), (ResNet128, 2e-5), (ResNet128, 1e-5)])
def test_generator_batch_norms_use_bn_eps(cls, eps):
    G = cls(cls.Config(g_ch=2, num_classes=3, bn_eps=eps)).build_generator()
    norms = [m for m in G.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(norms) == 2 * G.num_blocks + 1 and all(m.eps == eps for m in norms)
    with pytest.raises(ArchitectureConfigError, match="bn_eps"):
        cls(cls.Config(bn_eps=0.0))


def test_resnet128_generator_widths_and_upsamplings():
    G = ResNet128(ResNet128.Config(g_ch=3, num_classes=4)).build_generator()
    g = 3
    widths = [(G.get_submodule(f"b{i}").in_channels, G.get_submodule(f"b{i}").out_channels)
              for i in range(1, 6)]
    assert widths == [(16 * g, 16 * g), (16 * g, 8 * g), (8 * g, 4 * g), (4 * g, 2 * g), (2 * g, g)]
    assert G.linear.out_features == 4 * 4 * 16 * g
    assert G.resolution == 128
    # every GBlock's batch norms are class-conditional, the final one is not
    cbns = [n for n, m in G.named_modules() if isinstance(m, ConditionalBatchNorm2d)]
    assert cbns == [f"b{i}.bn{j}" for i in range(1, 6) for j in (1, 2)]
    assert type(G.bn) is nn.BatchNorm2d


def test_standard_cnn_layout():
    arch = StandardCNN(StandardCNN.Config(resolution=48, ch=4, g_ch=16))
    D, G = arch.build_discriminator(), arch.build_generator()
    convs = list(weight_layers(D, (nn.Conv2d,)))
    assert [n for n, _ in convs] == [f"c{i}" for i in range(1, 8)]
    assert [c.out_channels for _, c in convs] == [4, 4, 8, 8, 16, 16, 32]
    assert [c.kernel_size[0] for _, c in convs] == [3, 4, 3, 4, 3, 4, 3]
    assert [c.stride[0] for _, c in convs] == [1, 2, 1, 2, 1, 2, 1]
    assert D.linear.in_features == 6 * 6 * 32
    assert G.linear.out_features == 6 * 6 * 16
    assert [G.get_submodule(f"dc{i}").out_channels for i in (1, 2, 3)] == [8, 4, 2]


def rescale_weights(net: nn.Module) -> None:
    """Unit-gain weights, so that each layer's effect shows in the output (N(0, 0.02) would
    shrink the signal below assert_close's tolerance after a few layers)."""
    torch.manual_seed(0)
    with torch.no_grad():
        for _, layer in weight_layers(net):
            w = layer.weight
            fan_in = w[0].numel() if not isinstance(layer, nn.ConvTranspose2d) else w.shape[0]
            w.normal_(0.0, 1.0 / math.sqrt(fan_in))


def test_standard_cnn_generator_matches_a_functional_recomputation():
    arch = StandardCNN(StandardCNN.Config(resolution=48, g_ch=16))
    G = arch.build_generator()
    rescale_weights(G)
    z = torch.randn(3, 128)

    def bn(t, mod):
        return F.batch_norm(t, None, None, mod.weight, mod.bias, training=True, eps=mod.eps)

    h = F.relu(bn(z @ G.linear.weight.t() + G.linear.bias, G.bn0)).view(3, 16, 6, 6)
    for i in (1, 2, 3):
        dc = G.get_submodule(f"dc{i}")
        h = F.relu(bn(F.conv_transpose2d(h, dc.weight, dc.bias, stride=2, padding=1),
                      G.get_submodule(f"bn{i}")))
    ref = torch.tanh(F.conv2d(h, G.conv_out.weight, G.conv_out.bias, padding=1))
    out = G(z)
    assert out.shape == (3, 3, 48, 48)
    torch.testing.assert_close(out, ref)


def test_standard_cnn_discriminator_matches_a_functional_recomputation():
    arch = StandardCNN(StandardCNN.Config(resolution=32, ch=2))
    D = arch.build_discriminator()
    rescale_weights(D)
    x = torch.randn(2, 3, 32, 32)
    h = x
    for k, s, name in zip((3, 4, 3, 4, 3, 4, 3), (1, 2, 1, 2, 1, 2, 1), [f"c{i}" for i in range(1, 8)]):
        conv = getattr(D, name)
        h = F.leaky_relu(F.conv2d(h, conv.weight, conv.bias, stride=s, padding=1), 0.1)
    ref = h.flatten(1) @ D.linear.weight.t() + D.linear.bias
    torch.testing.assert_close(D(x), ref.squeeze(1))


# ---------------------------------------------------------------------------------------------
# Blocks: the shortcut sees the block's input unchanged
# ---------------------------------------------------------------------------------------------


def _conv(x, conv):
    return F.conv2d(x, conv.weight, conv.bias, padding=conv.padding)


def reference_dblock(x: torch.Tensor, block: DBlock) -> torch.Tensor:
    """SPEC §3 DBlock, written independently with torch.nn.functional."""
    h = _conv(F.relu(x), block.c1)
    h = _conv(F.relu(h), block.c2)
    s = x
    if block.sc is not None:
        s = _conv(x, block.sc)
    if block.down:
        h, s = F.avg_pool2d(h, 2), F.avg_pool2d(s, 2)
    return h + s


def reference_optimized_dblock(x: torch.Tensor, block: OptimizedDBlock) -> torch.Tensor:
    h = F.avg_pool2d(_conv(F.relu(_conv(x, block.c1)), block.c2), 2)
    return h + _conv(F.avg_pool2d(x, 2), block.sc)


def reference_gblock(x: torch.Tensor, block: GBlock) -> torch.Tensor:
    """Unconditional GBlock in training mode (batch statistics), with nn.functional."""
    def bn(t, mod):
        return F.batch_norm(t, None, None, mod.weight, mod.bias, training=True, eps=mod.eps)

    up = lambda t: t.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)  # noqa: E731
    h = _conv(up(F.relu(bn(x, block.bn1))), block.c1)
    h = _conv(F.relu(bn(h, block.bn2)), block.c2)
    return h + _conv(up(x), block.sc)


@pytest.mark.parametrize("cin,cout,down", [(4, 4, False), (4, 4, True), (4, 6, False), (4, 6, True)])
def test_dblock_matches_reference_and_leaves_input_alone(cin, cout, down):
    torch.manual_seed(0)
    block = DBlock(cin, cout, down)
    x = torch.randn(2, cin, 8, 8)  # about half of it negative: an in-place ReLU would show
    x_before = x.clone()
    out = block(x)
    torch.testing.assert_close(x, x_before, rtol=0, atol=0)
    torch.testing.assert_close(out, reference_dblock(x_before, block))
    assert (block.sc is None) == (cin == cout and not down)


@pytest.mark.parametrize("cin,cout,down", [(4, 4, False), (4, 6, True)])
def test_bsn_dblock_matches_reference(cin, cout, down):
    torch.manual_seed(0)
    block = DBlock(cin, cout, down, hidden_channels=cout, learnable_shortcut=True)
    assert block.c1.weight.shape == (cout, cin, 3, 3) and block.sc is not None
    x = torch.randn(2, cin, 8, 8)
    torch.testing.assert_close(block(x), reference_dblock(x, block))


def test_identity_shortcut_passes_negative_inputs_through():
    """With an identity shortcut, out - residual == x, negative entries included."""
    torch.manual_seed(0)
    block = DBlock(3, 3, down=False)
    x = torch.randn(2, 3, 4, 4)
    diff = block(x) - block.residual(x.clone())
    torch.testing.assert_close(diff, x)
    assert (diff < 0).any()


def test_optimized_dblock_matches_reference():
    torch.manual_seed(0)
    block = OptimizedDBlock(3, 5)
    x = torch.randn(2, 3, 8, 8)
    x_before = x.clone()
    out = block(x)
    torch.testing.assert_close(x, x_before, rtol=0, atol=0)
    torch.testing.assert_close(out, reference_optimized_dblock(x_before, block))
    assert out.shape == (2, 5, 4, 4)


def test_gblock_matches_reference():
    torch.manual_seed(0)
    block = GBlock(4, 6)
    with torch.no_grad():  # non-trivial BN affine parameters
        for bn in (block.bn1, block.bn2):
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.normal_()
    x = torch.randn(3, 4, 5, 5)
    x_before = x.clone()
    out = block(x)
    torch.testing.assert_close(x, x_before, rtol=0, atol=0)
    torch.testing.assert_close(out, reference_gblock(x_before, block))
    assert out.shape == (3, 6, 10, 10)


def test_whole_resnet32_discriminator_matches_reference_blocks():
    arch = ResNet32(ResNet32.Config(ch=6))
    D = arch.build_discriminator()
    x = torch.randn(2, 3, 32, 32)
    h = reference_optimized_dblock(x, D.b1)
    for b in (D.b2, D.b3, D.b4):
        h = reference_dblock(h, b)
    h = F.relu(h).sum(dim=(2, 3))  # global sum pooling, not mean
    torch.testing.assert_close(D(x), (h @ D.linear.weight.t()).squeeze(1))  # no bias


def test_whole_resnet32_generator_matches_reference_blocks():
    arch = ResNet32(ResNet32.Config(g_ch=6))
    G = arch.build_generator()
    z = torch.randn(3, 128)
    h = (z @ G.linear.weight.t() + G.linear.bias).view(3, 6, 4, 4)
    for b in (G.b1, G.b2, G.b3):
        h = reference_gblock(h, b)
    h = F.relu(F.batch_norm(h, None, None, G.bn.weight, G.bn.bias, training=True, eps=G.bn.eps))
    ref = torch.tanh(F.conv2d(h, G.conv_out.weight, G.conv_out.bias, padding=1))
    torch.testing.assert_close(G(z), ref)


# ---------------------------------------------------------------------------------------------
# Conditioning
# ---------------------------------------------------------------------------------------------


def test_conditional_batch_norm_matches_functional():
    torch.manual_seed(0)
    cbn = ConditionalBatchNorm2d(4, num_classes=3)
    with torch.no_grad():
        cbn.gain.normal_()
        cbn.bias.normal_()
    x, y = torch.randn(5, 4, 3, 3), torch.tensor([0, 2, 1, 2, 0])
    ref = F.batch_norm(x, None, None, training=True, eps=cbn.bn.eps)
    ref = ref * cbn.gain[y].view(5, 4, 1, 1) + cbn.bias[y].view(5, 4, 1, 1)
    torch.testing.assert_close(cbn(x, y), ref)


def test_conditional_bn_tables_are_not_embedding_modules():
    """Regularizers act on every Embedding (SPEC §2); the CBN gains must not be normalized."""
    G = ResNet128(ResNet128.Config(g_ch=2, num_classes=7)).build_generator()
    assert not any(isinstance(m, nn.Embedding) for m in G.modules())
    assert G.b1.bn1.gain.shape == (7, 32)
    torch.testing.assert_close(G.b1.bn1.gain, torch.ones(7, 32))
    torch.testing.assert_close(G.b1.bn1.bias, torch.zeros(7, 32))


@pytest.mark.parametrize("name,kwargs", [("resnet128", dict(ch=2, g_ch=2, num_classes=7)),
                                         ("resnet32", dict(ch=4, g_ch=4, num_classes=5))])
def test_conditional_generator_depends_on_labels(name, kwargs):
    arch = make(name, **kwargs)
    G = arch.build_generator().eval()
    torch.manual_seed(0)
    with torch.no_grad():  # after training the per-class gains differ; at init they are all 1
        for m in G.modules():
            if isinstance(m, ConditionalBatchNorm2d):
                m.gain.normal_(1.0, 0.5)
                m.bias.normal_(0.0, 0.5)
    z = torch.randn(2, arch.z_dim)
    a, b = G(z, torch.tensor([0, 1])), G(z, torch.tensor([3, 1]))
    assert (a[0] - b[0]).abs().max() > 1e-3
    torch.testing.assert_close(a[1], b[1])  # same label, same latent, eval mode: same image
    with pytest.raises(ValueError, match="labels"):
        G(z)


def test_resnet128_projection_term_depends_on_y():
    arch = ResNet128(ResNet128.Config(ch=2, g_ch=2, num_classes=7))
    D = arch.build_discriminator()
    x = torch.randn(2, 3, 128, 128)
    y1, y2 = torch.tensor([0, 4]), torch.tensor([5, 4])
    h = D.features(x)
    # Miyato & Koyama (2018) eq. 3: D(x, y) = psi(h) + <embed(y), h>
    torch.testing.assert_close(D(x, y1) - D(x, y2), ((D.embed.weight[y1] - D.embed.weight[y2]) * h).sum(1))
    assert (D(x, y1) - D(x, y2))[0].abs() > 1e-4
    psi = (h @ D.linear.weight.t() + D.linear.bias).squeeze(1)
    torch.testing.assert_close(D(x, y1), psi + (D.embed.weight[y1] * h).sum(1))
    with pytest.raises(ValueError, match="labels"):
        D(x)


def test_unconditional_networks_ignore_labels():
    for arch in (ResNet32(ResNet32.Config(ch=4, g_ch=4)),
                 StandardCNN(StandardCNN.Config(ch=2, g_ch=8))):
        G, D = arch.build_generator().eval(), arch.build_discriminator()
        z, x, y = torch.randn(2, 128), torch.randn(2, 3, 32, 32), torch.tensor([1, 2])
        torch.testing.assert_close(G(z, y), G(z))
        torch.testing.assert_close(D(x, y), D(x))


# ---------------------------------------------------------------------------------------------
# Initialization (Xavier-uniform with the reference's gains; N(0, 0.02) for the CNN)
# ---------------------------------------------------------------------------------------------


def xavier_bound(weight: torch.Tensor, gain: float) -> float:
    receptive = weight[0, 0].numel() if weight.dim() > 2 else 1
    fan_in, fan_out = weight.shape[1] * receptive, weight.shape[0] * receptive
    return gain * math.sqrt(6.0 / (fan_in + fan_out))


def assert_uniform(weight: torch.Tensor, bound: float) -> None:
    w = weight.detach().double().flatten()
    assert w.abs().max() <= bound
    assert w.abs().max() > 0.98 * bound  # fills the whole interval
    # variance of U(-b, b) is b^2 / 3; relative sampling error ~ sqrt(0.8 / n)
    tol = 5 * math.sqrt(0.8 / w.numel())
    assert abs(w.var().item() / (bound ** 2 / 3) - 1) < tol
    assert abs(w.mean().item()) < 5 * bound / math.sqrt(3 * w.numel())


def test_resnet_init_gains():
    D = ResNet32(ResNet32.Config(ch=128, num_classes=10)).build_discriminator()
    residual, shortcut = D.b2.c1.weight, D.b2.sc.weight  # 128x128x3x3 and 128x128x1x1
    assert_uniform(residual, xavier_bound(residual, RESIDUAL_GAIN))
    assert residual.abs().max() > xavier_bound(residual, 1.0)  # really gain sqrt(2), not 1
    assert_uniform(shortcut, xavier_bound(shortcut, 1.0))
    assert_uniform(D.embed.weight, xavier_bound(D.embed.weight, 1.0))
    for conv in (D.b1.c1, D.b1.c2, D.b3.c2):
        assert conv.weight.abs().max() <= xavier_bound(conv.weight, RESIDUAL_GAIN)
        assert conv.weight.abs().max() > xavier_bound(conv.weight, 1.0)
    assert D.b1.sc.weight.abs().max() <= xavier_bound(D.b1.sc.weight, 1.0)
    assert D.linear.weight.abs().max() <= xavier_bound(D.linear.weight, 1.0)
    for name, p in D.named_parameters():
        if name.endswith("bias"):
            assert torch.count_nonzero(p) == 0, name


def test_resnet_generator_init_gains():
    G = ResNet32(ResNet32.Config(g_ch=64)).build_generator()
    assert_uniform(G.b1.c2.weight, xavier_bound(G.b1.c2.weight, RESIDUAL_GAIN))
    assert_uniform(G.b1.sc.weight, xavier_bound(G.b1.sc.weight, 1.0))
    assert_uniform(G.linear.weight, xavier_bound(G.linear.weight, 1.0))
    assert G.conv_out.weight.abs().max() <= xavier_bound(G.conv_out.weight, 1.0)
    assert torch.count_nonzero(G.conv_out.bias) == 0


def test_standard_cnn_init():
    arch = StandardCNN()
    D, G = arch.build_discriminator(), arch.build_generator()
    w = D.c7.weight.detach()  # 512x256x3x3, N(0, 0.02) truncated at 2 std
    assert w.abs().max() <= 0.04
    # std of a standard normal truncated to [-2, 2]: 0.8796
    assert abs(w.std().item() / (0.02 * 0.8796) - 1) < 0.01
    g = G.dc1.weight.detach()  # 512x256x4x4, plain N(0, 0.02)
    assert abs(g.std().item() / 0.02 - 1) < 0.01 and g.abs().max() > 0.08
    assert torch.count_nonzero(D.c1.bias) == 0 and torch.count_nonzero(G.linear.bias) == 0


# ---------------------------------------------------------------------------------------------
# Bad configuration values: user-facing errors
# ---------------------------------------------------------------------------------------------


def test_cnn_rejects_other_resolutions():
    with pytest.raises(ArchitectureConfigError, match="32, 48, 64") as info:
        StandardCNN(StandardCNN.Config(resolution=40))
    assert isinstance(info.value, SpecregError)
    with pytest.raises(ArchitectureConfigError, match="multiple of 8"):
        StandardCNN(StandardCNN.Config(g_ch=12))


@pytest.mark.parametrize("cls,kwargs,field", [
    (ResNet32, dict(ch=0), "ch"),
    (ResNet32, dict(g_ch=-3), "g_ch"),
    (ResNet128, dict(z_dim=0), "z_dim"),
    (ResNet128, dict(num_classes=-1), "num_classes"),
    (StandardCNN, dict(ch=0), "ch"),
])
def test_nonpositive_widths_are_rejected(cls, kwargs, field):
    with pytest.raises(SpecregError, match=field):
        cls(cls.Config(**kwargs))


# ---------------------------------------------------------------------------------------------
# GBlock shortcut order: conv1x1 before the nearest upsample equals the paper's order
# ---------------------------------------------------------------------------------------------

RESNET_G = [(name, kw) for name, kw in SMALL if name.startswith("resnet")]


def _block_output_and_grads(block: GBlock, x: torch.Tensor, y: torch.Tensor | None,
                            upstream: torch.Tensor) -> list[torch.Tensor]:
    block.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_(True)
    out = block(x, y)
    (out * upstream).sum().backward()
    return [out.detach(), x.grad] + [p.grad for p in block.parameters()]


@pytest.mark.parametrize("name,kwargs", RESNET_G, ids=[f"{n}-{kw}" for n, kw in RESNET_G])
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_gblock_shortcut_conv_first_equals_upsample_first(name, kwargs, train):
    """Every GBlock of resnet32/resnet128 G (conditional BN too): output and the gradients with
    respect to its input and every weight equal the paper's order, upsample then conv1x1."""
    from plugins.architectures.blocks import upsample_before_shortcut_conv

    torch.manual_seed(0)
    arch = make(name, **kwargs)
    G = arch.build_generator().train(train)
    blocks = [m for m in G.modules() if isinstance(m, GBlock)]
    assert blocks
    for block in blocks:
        with torch.no_grad():  # non-trivial shortcut bias and BN statistics
            block.sc.bias.normal_()
            for bn in (block.bn1, block.bn2):
                inner = bn.bn if isinstance(bn, ConditionalBatchNorm2d) else bn
                inner.running_mean.normal_()
                inner.running_var.uniform_(0.5, 2.0)
        rng = torch.Generator().manual_seed(1)
        x = torch.randn(3, block.in_channels, 4, 4, generator=rng)
        y = torch.randint(0, arch.num_classes, (3,), generator=rng) if arch.conditional else None
        upstream = torch.randn(3, block.out_channels, 8, 8, generator=rng)
        state = {k: v.clone() for k, v in block.state_dict().items()}
        fast = _block_output_and_grads(block, x, y, upstream)
        block.load_state_dict(state)  # the same running statistics for the second forward
        with upsample_before_shortcut_conv():
            slow = _block_output_and_grads(block, x, y, upstream)
        assert len(fast) == len(slow) == 2 + len(list(block.parameters()))
        for a, b in zip(fast, slow):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    # the switch restores the fast order on exit, and the two orders really differ in work
    block = blocks[0]
    x = torch.randn(2, block.in_channels, 4, 4)
    seen = []
    handle = block.sc.register_forward_hook(lambda m, i, o: seen.append(tuple(i[0].shape)))
    with torch.no_grad():
        block.shortcut(x)
        with upsample_before_shortcut_conv():
            block.shortcut(x)
        block.shortcut(x)
    handle.remove()
    assert seen == [(2, block.in_channels, 4, 4), (2, block.in_channels, 8, 8),
                    (2, block.in_channels, 4, 4)]


def test_generator_with_either_shortcut_order_and_old_checkpoint_names():
    """Whole resnet32 G: the same images either way; parameter names and shapes unchanged."""
    from plugins.architectures.blocks import upsample_before_shortcut_conv

    torch.manual_seed(0)
    arch = make("resnet32", ch=8, g_ch=8)
    G = arch.build_generator().eval()
    z = torch.randn(4, arch.z_dim)
    with torch.no_grad():
        fast = G(z)
        with upsample_before_shortcut_conv():
            slow = G(z)
    torch.testing.assert_close(fast, slow, rtol=1e-5, atol=1e-6)
    shapes = {k: tuple(v.shape) for k, v in G.state_dict().items() if k.endswith("sc.weight")}
    assert shapes == {f"b{i}.sc.weight": (8, 8, 1, 1) for i in (1, 2, 3)}


RESNET_D = [(name, kw) for name, kw in SMALL if name.startswith("resnet")]


def _output_and_grads(module: nn.Module, x: torch.Tensor, upstream_seed: int = 2
                      ) -> list[torch.Tensor]:
    module.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_(True)
    out = module(x)
    upstream = torch.randn(out.shape, generator=torch.Generator().manual_seed(upstream_seed),
                           dtype=out.dtype)
    (out * upstream).sum().backward()
    return [out.detach(), x.grad] + [p.grad for p in module.parameters()]


def test_pooled_kernel_is_conv_then_average_pool_in_float64():
    """conv3x3 (padding 1) then 2x2 average pooling == one 4x4 stride-2 convolution with
    ``pooled_kernel``, for even and odd sizes, bias included."""
    from plugins.architectures.blocks import pooled_kernel

    rng = torch.Generator().manual_seed(0)
    w = torch.randn(5, 3, 3, 3, generator=rng, dtype=torch.float64)
    b = torch.randn(5, generator=rng, dtype=torch.float64)
    for size in (8, 7, 2):
        x = torch.randn(2, 3, size, size, generator=rng, dtype=torch.float64)
        expected = F.avg_pool2d(F.conv2d(x, w, b, padding=1), 2)
        got = F.conv2d(x, pooled_kernel(w), b, stride=2, padding=1)
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name,kwargs", RESNET_D, ids=[f"{n}-{kw}" for n, kw in RESNET_D])
@pytest.mark.parametrize("regularizer", [None, "sn"])
def test_discriminator_with_folded_pooling_equals_pool_after_conv(name, kwargs, regularizer):
    """Whole resnet32/resnet128 D (projection and BSN blocks too), bare or spectrally
    normalized: logits and the gradients with respect to the images and every parameter equal
    the paper's order (conv, then pool), in float64 to 1e-10; the power iteration steps once
    per forward either way."""
    from core.train import apply_regularizers
    from plugins.architectures.blocks import pool_after_conv
    from plugins.regularizers.sn import SpectralNorm

    torch.manual_seed(0)
    arch = make(name, **kwargs)
    D = arch.build_discriminator().double()
    if regularizer:
        D = apply_regularizers(D, [SpectralNorm(SpectralNorm.Config())], "discriminator")
    rng = torch.Generator().manual_seed(1)
    x = torch.randn(3, 3, arch.resolution, arch.resolution, generator=rng, dtype=torch.float64)
    y = torch.randint(0, arch.num_classes, (3,), generator=rng) if arch.conditional else None
    model = (lambda images: D(images, y)) if y is not None else D
    wrapper = _Call(D, model)
    state = {k: v.clone() for k, v in D.state_dict().items()}
    fast = _output_and_grads(wrapper, x)
    fast_state = {k: v.clone() for k, v in D.state_dict().items()}
    D.load_state_dict(state)  # the same power-iteration vectors for the second forward
    with pool_after_conv():
        slow = _output_and_grads(wrapper, x)
    assert len(fast) == len(slow) == 2 + len(list(D.parameters()))
    for a, b in zip(fast, slow):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    for k, v in D.state_dict().items():  # power iteration advanced alike
        torch.testing.assert_close(v, fast_state[k], rtol=1e-10, atol=1e-10)


class _Call(nn.Module):
    """``fn(x)`` as a module whose parameters are ``module``'s."""

    def __init__(self, module: nn.Module, fn) -> None:
        super().__init__()
        self.module, self.fn = module, fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x)


def test_folded_pooling_does_less_work_keeps_hooks_and_switches_back():
    """The folded residual conv runs at a quarter of the positions; a conv with a forward hook
    runs unfolded (the hook fires); pool_after_conv restores the fast form on exit."""
    from plugins.architectures.blocks import pool_after_conv

    torch.manual_seed(0)
    block = DBlock(4, 6, down=True)
    x = torch.randn(2, 4, 8, 8)
    fast = block(x)
    seen = []
    handle = block.c2.register_forward_hook(lambda m, i, o: seen.append(tuple(o.shape)))
    hooked = block(x)
    handle.remove()
    assert seen == [(2, 6, 8, 8)]  # unfolded: the conv's own full-size output, hook called
    torch.testing.assert_close(hooked, fast, rtol=1e-5, atol=1e-6)
    from torch.utils.flop_counter import FlopCounterMode

    def flops() -> int:
        counter = FlopCounterMode(display=False)
        with counter:
            block(x)
        return counter.get_total_flops()

    folded = flops()
    with pool_after_conv():
        paper = flops()
    assert flops() == folded < paper


@pytest.mark.parametrize("resolution", [8, 16])
def test_standard_cnn_at_the_small_stacked_digits_sizes(resolution):
    """cnn at 8 / 16 pixels: the same layers on a 1x1 / 2x2 bottom, G's images at that size."""
    arch = StandardCNN(StandardCNN.Config(resolution=resolution, ch=4, g_ch=16))
    G, D = arch.build_generator(), arch.build_discriminator()
    images = G(torch.randn(3, arch.z_dim))
    assert images.shape == (3, 3, resolution, resolution) and images.abs().max() <= 1
    assert D(images).shape == (3,)
    m = resolution // 8
    assert D.linear.weight.shape == (1, m * m * 32) and G.linear.out_features == m * m * 16


@pytest.mark.parametrize("resolution, blocks", [(8, 1), (16, 2), (32, 3)])
def test_resnet32_at_the_small_stacked_digits_sizes(resolution, blocks):
    """resnet32 at 8 / 16 pixels: G has fewer GBlocks after the same 4x4 start; D is the
    paper's 10 convolutions whatever the size (global sum pooling)."""
    arch = ResNet32(ResNet32.Config(ch=4, g_ch=8, resolution=resolution))
    G, D = arch.build_generator(), arch.build_discriminator()
    assert arch.resolution == G.resolution == resolution and G.num_blocks == blocks
    images = G(torch.randn(3, arch.z_dim))
    assert images.shape == (3, 3, resolution, resolution)
    assert D(images).shape == (3,)
    convs = [n for n, m in D.named_modules() if isinstance(m, torch.nn.Conv2d)]
    assert convs == RESNET32_D_CONVS
    with pytest.raises(ValueError, match="resolution"):
        ResNet32.Config(resolution=64)
