"""``--dry-run``: validate a recipe, build every plugin, run one tiny forward/backward, print the plan.

No data is read and nothing is written, so a recipe can be checked on a laptop before it goes to
the cluster (SPEC §4's batch arithmetic included). Whether the data is there is checked (its
folder under ``data_root``): missing data that will not be downloaded is an error naming the
prepare command (exit 2), unless ``--ignore-data`` (``check_data=False``).
"""

from __future__ import annotations

import os
from pathlib import Path

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


def data_status(recipe, dataset) -> tuple[str, str | None]:
    """(what the plan says about the data, the error if it is missing and will not be fetched).
    A dataset without a folder under ``data_root`` (``data_folder``) is embedded: always there."""
    folder_of = getattr(dataset, "data_folder", None)
    if folder_of is None:
        return "embedded", None
    folder = Path(folder_of(Path(recipe.data_root)))
    if folder.is_dir() and any(folder.iterdir()):
        return f"present ({folder})", None
    if getattr(getattr(dataset, "config", None), "download", False):
        return f"not yet under {folder}: the run downloads it (download = true)", None
    command = getattr(dataset, "prepare_command", None)
    how = f"; put it there (or prepare it: {command(Path(recipe.data_root))})" if command else ""
    return "missing", (f"dataset '{recipe.dataset.name}': its data is missing: {folder} does not "
                       f"exist or is empty{how}; or point data_root at it. --ignore-data skips "
                       f"this check")


def dry_run(recipe, recipe_path: str, processes: int | None = None,
            check_data: bool = True) -> str:
    """Build everything, run one forward/backward at batch 2, and return the plan as text."""
    from core.train import build_models

    processes = processes or int(os.environ.get("WORLD_SIZE", "1"))
    t = recipe.train
    plan = BatchPlan.derive(t.batch_size, processes, t.micro_batch_size, t.g_batch_multiplier)
    torch.manual_seed(recipe.seed)
    arch, G, D, d_reg, g_reg = build_models(recipe)
    dataset = recipe.dataset.create()
    loss_fn = recipe.loss.create()
    # every value and the rules across keys (the dataset's and the architecture's resolutions,
    # the batch arithmetic, eval.best) were checked when the recipe was loaded, as for a real run
    data, missing = data_status(recipe, dataset)
    if missing and check_data:
        from core.errors import DataMissingError

        raise DataMissingError(f"{recipe_path}: {missing}")
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
        f"under {recipe.data_root}; data {data}",
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
