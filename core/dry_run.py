"""``--dry-run``: validate a recipe, build every plugin, run one tiny forward/backward, print the plan.

No data is read and nothing is written, so a recipe can be checked on a laptop before it goes to
the cluster (SPEC §4's batch arithmetic included).
"""

from __future__ import annotations

import os

import torch
from torch import nn

from core.data import BatchPlan
from core.layers import LAYER_TYPES, regularized_layers


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def describe_regularized(model: nn.Module) -> str:
    layers = regularized_layers(model)
    if not layers:
        return "none"
    by_type = {}
    for _, layer in layers:
        kind = next((k for k, t in LAYER_TYPES.items() if isinstance(layer, t)), type(layer).__name__)
        by_type[kind] = by_type.get(kind, 0) + 1
    return f"{len(layers)} layers (" + ", ".join(f"{n} {k}" for k, n in by_type.items()) + ")"


def _settings(config) -> str:
    """`` (fraction=0.5, every=5)`` for a Config with fields, empty otherwise."""
    import attrs

    if not attrs.has(type(config)) or not attrs.fields(type(config)):
        return ""
    return " (" + ", ".join(f"{k}={v!r}" for k, v in attrs.asdict(config).items()) + ")"


def dry_run(recipe, recipe_path: str, processes: int | None = None) -> str:
    """Build everything, run one forward/backward at batch 2, and return the plan as text."""
    from core.train import build_models

    processes = processes or int(os.environ.get("WORLD_SIZE", "1"))
    t = recipe.train
    plan = BatchPlan.derive(t.batch_size, processes, t.micro_batch_size, t.g_batch_multiplier)
    torch.manual_seed(recipe.seed)
    arch, G, D, d_reg, g_reg = build_models(recipe)
    dataset = recipe.dataset.create()
    loss_fn = recipe.loss.create()
    if dataset.resolution != arch.resolution:
        from core.errors import SpecregError

        raise SpecregError(f"{recipe_path}: dataset '{recipe.dataset.name}' is "
                           f"{dataset.resolution}x{dataset.resolution} but architecture "
                           f"'{recipe.architecture.name}' is {arch.resolution}x{arch.resolution}")
    # one forward/backward at a tiny batch, on random "real" images
    G.train(), D.train()
    z, y = arch.sample_latents(2)
    real = torch.rand(2, 3, arch.resolution, arch.resolution) * 2 - 1
    fake = G(z, y)
    logits = D(torch.cat([real, fake.detach()]), torch.cat([y, y]) if y is not None else None)
    loss_d = loss_fn.discriminator_loss(logits[:2], logits[2:])
    loss_d.backward()
    loss_g = loss_fn.generator_loss(D(G(z, y), y))
    loss_g.backward()
    reg_d = f"{recipe.discriminator.regularizer.name} on {describe_regularized(D)}" \
        f"{_settings(d_reg.config)}" if d_reg else "none"
    reg_g = f"{recipe.generator.regularizer.name} on {describe_regularized(G)}" \
        f"{_settings(g_reg.config)}" if g_reg else "none"
    metrics = ", ".join(m.name for m in recipe.eval.metrics) or "none"
    lines = [
        f"recipe        {recipe_path}",
        f"dataset       {recipe.dataset.name} ({dataset.resolution}x{dataset.resolution}, "
        f"{'%d classes' % dataset.num_classes if dataset.num_classes else 'unconditional'}) "
        f"under {recipe.data_root}",
        f"architecture  {recipe.architecture.name}: G {count_parameters(G):,} parameters, "
        f"D {count_parameters(D):,} parameters, z_dim {arch.z_dim}, "
        f"{'%d classes' % arch.num_classes if arch.conditional else 'unconditional'}",
        f"regularizers  D: {reg_d}; G: {reg_g}",
        f"loss          {recipe.loss.name}",
        f"batch         {plan.describe()}",
        f"optimizers    Adam lr_g {t.lr_g:g}, lr_d {t.lr_d:g}, betas {tuple(t.betas)}; "
        f"lr decay {t.lr_decay}",
        f"schedule      {t.iterations:,} iterations x {t.n_critic} D steps; "
        f"mixed precision {t.mixed_precision}",
        f"checkpoints   every {recipe.checkpoint.every} iterations, keep {recipe.checkpoint.keep}",
        f"evaluation    every {recipe.eval.every} iterations: {metrics}"
        + (f"; best by {recipe.eval.best}" if recipe.eval.best else ""),
        "callbacks     " + ("; ".join(f"{name}{_settings(spec.config)}"
                                       for name, spec in recipe.callbacks.items()) or "none"),
        f"dry run       one forward/backward at batch 2: loss_d {loss_d.item():.4f}, "
        f"loss_g {loss_g.item():.4f} - OK",
    ]
    return "\n".join(lines)
