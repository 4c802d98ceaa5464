"""The architecture checks: shapes and range, conditional labels, weight layers the regularizers
and the spectral monitor can find, gradients, determinism and the ``state_dict`` round trip."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils import parametrize

from core.interfaces import Architecture
from core.layers import weight_layers
from core.testing.kit import SEED, Case, conformance_check, differences, fail, state_of


def _built(case: Case, seed: int = SEED) -> tuple[Architecture, nn.Module, nn.Module]:
    torch.manual_seed(seed)
    arch = case.create()
    return arch, arch.build_generator(), arch.build_discriminator()


def _latents(arch: Architecture, n: int, seed: int = SEED):
    return arch.sample_latents(n, torch.Generator().manual_seed(seed))


@conformance_check("architectures", covers=("resolution", "z_dim", "build_generator",
                                 "build_discriminator", "sample_latents"))
def check_architecture_shapes_and_range(case: Case) -> None:
    """G(z, y) gives ``[n, 3, R, R]`` in [-1, 1] (R = ``resolution``) from ``[n, z_dim]``
    latents; D(x, y) gives finite logits ``[n]``; in train and eval mode."""
    arch, G, D = _built(case)
    R = arch.resolution
    if not isinstance(R, int) or R < 1:
        fail(case, f"resolution must be a positive int, got {R!r}")
    z, y = _latents(arch, 3)
    if z.shape != (3, arch.z_dim):
        fail(case, f"sample_latents(3) gave z of shape {tuple(z.shape)}, expected (3, {arch.z_dim})")
    for mode in ("train", "eval"):
        G.train(mode == "train"), D.train(mode == "train")
        with torch.no_grad():
            images = G(z, y)
            logits = D(images, y)
        if images.shape != (3, 3, R, R) or images.dtype != torch.float32:
            fail(case, f"{mode} mode: G gave {images.dtype} {tuple(images.shape)}, "
                       f"expected float32 (3, 3, {R}, {R})")
        if not torch.isfinite(images).all() or images.abs().max() > 1 + 1e-6:
            fail(case, f"{mode} mode: G's images must be finite and in [-1, 1] "
                       f"(max |x| = {images.abs().max().item():.4g})")
        if logits.shape != (3,) or not torch.isfinite(logits).all():
            fail(case, f"{mode} mode: D gave {tuple(logits.shape)} (expected (3,)) or "
                       f"non-finite logits")


@conformance_check("architectures", covers=("num_classes", "conditional", "sample_latents"))
def check_architecture_conditional_labels(case: Case) -> None:
    """Conditional: labels ``[n]`` int64 in [0, num_classes) that change G's and D's outputs
    (once the weights are not at their label-blind initialization), and refusing no labels.
    Unconditional: ``y`` is None and both networks run without labels."""
    arch, G, D = _built(case)
    z, y = _latents(arch, 6)
    x = torch.rand(6, 3, arch.resolution, arch.resolution,
                   generator=torch.Generator().manual_seed(SEED)) * 2 - 1
    if arch.conditional != (arch.num_classes > 0):
        fail(case, f"conditional = {arch.conditional} but num_classes = {arch.num_classes}")
    G.eval(), D.eval()
    if not arch.conditional:
        if y is not None:
            fail(case, "an unconditional architecture's sample_latents must give y = None")
        with torch.no_grad():
            G(z), D(x)
        return
    if y is None or y.shape != (6,) or y.dtype != torch.int64 or \
            not bool(((y >= 0) & (y < arch.num_classes)).all()):
        fail(case, f"sample_latents must give int64 labels [6] in [0, {arch.num_classes}), "
                    f"got {y!r:.100}")
    with torch.no_grad():  # randomize: some inits (conditional BN = 1, 0) ignore labels at first
        for p in [*G.parameters(), *D.parameters()]:
            p.add_(torch.randn_like(p) * 0.1)
        other = (y + 1) % arch.num_classes
        if torch.equal(G(z, y), G(z, other)):
            fail(case, "G's images do not depend on the labels")
        if torch.equal(D(x, y), D(x, other)):
            fail(case, "D's logits do not depend on the labels")
    for net, args in (("G", (z,)), ("D", (x,))):
        try:
            with torch.no_grad():
                (G if net == "G" else D)(*args)
        except Exception:  # noqa: BLE001 - any clear error is fine
            continue
        fail(case, f"the conditional {net} ran without labels: it must raise instead of "
                   f"silently ignoring the condition")


class _Scale(nn.Module):
    def __init__(self, factor: float) -> None:
        super().__init__()
        self.factor = factor

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight * self.factor


@conformance_check("architectures", covers=("build_generator", "build_discriminator"))
def check_architecture_layers_reported(case: Case) -> None:
    """D (and G) expose their weight layers as Conv2d/Linear/Embedding modules with unique names
    (what regularizers, the dry-run plan and the spectral monitor count), and the forward pass
    reads each weight through ``torch.nn.utils.parametrize`` (identity on all: same output;
    one layer's weight halved: another output)."""
    from core.dry_run import describe_regularized

    arch, G, D = _built(case)
    z, y = _latents(arch, 3)
    x = torch.rand(3, 3, arch.resolution, arch.resolution,
                   generator=torch.Generator().manual_seed(SEED)) * 2 - 1
    for label, net, inputs in (("D", D, (x, y)), ("G", G, (z, y))):
        net.eval()
        layers = list(weight_layers(net))
        if label == "D" and not layers:
            fail(case, "D has no Conv2d/Linear/Embedding layer a regularizer could act on")
        with torch.no_grad():
            reference = net(*inputs)
        for _, layer in layers:
            parametrize.register_parametrization(layer, "weight", _Scale(1.0))
        report = describe_regularized(net)
        if layers and not report.startswith(f"{len(layers)} layers"):
            fail(case, f"{label}: {len(layers)} weight layers, but the plan reports '{report}'")
        with torch.no_grad():
            if not torch.allclose(net(*inputs), reference, rtol=1e-5, atol=1e-6):
                fail(case, f"{label}: an identity parametrization of every weight changed the "
                           f"output")
            ignored = []
            for name, layer in layers:
                layer.parametrizations.weight[0].factor = 0.5
                if torch.equal(net(*inputs), reference):
                    ignored.append(name)
                layer.parametrizations.weight[0].factor = 1.0
        if ignored:
            fail(case, f"{label}: halving the parametrized weight of {', '.join(ignored)} did not "
                       f"change the output: the forward pass does not read it through the layer")


@conformance_check("architectures", covers=("build_generator", "build_discriminator", "sample_latents"))
def check_architecture_gradients(case: Case) -> None:
    """Every parameter of G and D gets a finite gradient from ``D(G(z, y), y).mean()``."""
    arch, G, D = _built(case)
    z, y = _latents(arch, 4)
    D(G(z, y), y).mean().backward()
    bad = [f"{label}.{n}" for label, net in (("G", G), ("D", D))
           for n, p in net.named_parameters()
           if p.requires_grad and (p.grad is None or not torch.isfinite(p.grad).all())]
    if bad:
        fail(case, f"parameters without a finite gradient: {bad[:8]}")


@conformance_check("architectures", covers=("build_generator", "build_discriminator"))
def check_architecture_deterministic_and_state_dict(case: Case) -> None:
    """The same seed builds identical networks; a network's ``state_dict`` loads strictly into
    one built from another seed and reproduces its eval-mode outputs."""
    _, G1, D1 = _built(case, SEED)
    arch, G2, D2 = _built(case, SEED)
    for label, a, b in (("G", G1, G2), ("D", D1, D2)):
        diff = differences(state_of(a), state_of(b))
        if diff:
            fail(case, f"{label} built twice with the same seed differs: {diff[:5]}")
    _, G3, D3 = _built(case, SEED + 1)
    z, y = _latents(arch, 3)
    for label, a, b in (("G", G1, G3), ("D", D1, D3)):
        b.load_state_dict(a.state_dict(), strict=True)
        a.eval(), b.eval()
    with torch.no_grad():
        images = G1(z, y)
        if not torch.equal(images, G3(z, y)) or not torch.equal(D1(images, y), D3(images, y)):
            fail(case, "networks loaded from a state_dict give other eval-mode outputs")
