"""Small regularized models, step contexts and one optimizer step as the Trainer takes it: what
the regularizer checks and the DDP child process share."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from core.interfaces import Regularizer, StepContext
from core.layers import frozen_state
from core.testing.kit import (SEED, Case, config_table, fail, small_architecture,
                              small_discriminator, state_of)


def random_images(n: int, rng: torch.Generator, resolution: int = 32, num_classes: int = 4
                        ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``n`` uniform images in [-1, 1] and labels in [0, num_classes) (None when 0)."""
    x = torch.rand(n, 3, resolution, resolution, generator=rng) * 2 - 1
    y = torch.randint(0, num_classes, (n,), generator=rng) if num_classes else None
    return x, y


def objective(logits: torch.Tensor) -> torch.Tensor:
    """A smooth D objective (logistic, first half "real", second half "fake"): every logit gets
    a gradient, unlike a saturated hinge."""
    sign = torch.ones_like(logits)
    sign[len(sign) // 2:] = -1
    return F.softplus(-sign * logits).mean()


_GENERATORS: dict[int, nn.Module] = {}


def small_generator(num_classes: int = 4) -> nn.Module:
    """The generator of :func:`core.testing.kit.small_architecture` (made once per process from
    its own seed, without touching the global random stream): ``context.generator`` of the D-step
    contexts the checks build."""
    if num_classes not in _GENERATORS:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(SEED + 7)
            _GENERATORS[num_classes] = small_architecture(num_classes).build_generator()
    return _GENERATORS[num_classes]


def kit_optimizer(model: nn.Module) -> torch.optim.Optimizer:
    """The checks' optimizer: Adam with SN-GAN's betas (0, 0.9) and lr 1e-3, whose steps stay
    about lr per parameter however large a penalty's gradient is (an SGD step after a gradient
    penalty on an unnormalized D diverges)."""
    return torch.optim.Adam(model.parameters(), lr=1e-3, betas=(0.0, 0.9))


def checked_penalty(case: Case, reg: Regularizer, context: StepContext) -> torch.Tensor | None:
    """``reg.penalty(context)``, checked: None or a finite scalar tensor."""
    term = reg.penalty(context)
    if term is None:
        return None
    if not isinstance(term, torch.Tensor) or term.ndim != 0:
        fail(case, f"penalty must return None or a scalar tensor, got {term!r:.80}")
    if not torch.isfinite(term):
        fail(case, f"penalty returned a non-finite value {term.item()}")
    return term


def checked_every(case: Case, reg: Regularizer) -> int:
    """``reg.penalty_every``, checked: an integer >= 1."""
    every = reg.penalty_every
    if isinstance(every, bool) or not isinstance(every, int) or every < 1:
        fail(case, f"penalty_every must be an integer >= 1, got {every!r}")
    return every


def discriminator_context(reg: Regularizer, module: nn.Module, x: torch.Tensor,
                          y: torch.Tensor | None, *, wrapped: nn.Module | None = None,
                          generator: nn.Module | None = None, iteration: int = 0, step: int = 0,
                          micro_batch: int = 0, num_micro_batches: int = 1
                          ) -> tuple[StepContext, torch.Tensor]:
    """The D step's context of micro-batch ``(x, y)`` (first half "real", second half the
    detached "fakes") as the training loop builds it, and the logits of its one main forward
    through ``wrapped`` (default ``module``): the reals require grad iff ``reg.needs`` has
    ``"real_grad"``."""
    half = len(x) // 2
    real, fake = x[:half], x[half:].detach()
    if "real_grad" in reg.needs:
        real = real.detach().requires_grad_(True)
    forward = wrapped if wrapped is not None else module
    logits = forward(torch.cat([real, fake]), y)
    labels = (None, None) if y is None else (y[:half], y[half:])
    context = StepContext(
        phase="D", iteration=iteration, step=step, micro_batch=micro_batch,
        num_micro_batches=num_micro_batches, discriminator=forward,
        generator=generator if generator is not None else small_generator(),
        module=module, real=real, real_labels=labels[0], fake=fake, fake_labels=labels[1],
        real_logits=logits[:half].float(), fake_logits=logits[half:].float())
    return context, logits


def generator_context(G: nn.Module, D: nn.Module, z: torch.Tensor, y: torch.Tensor | None,
                      iteration: int = 0, step: int = 0) -> StepContext:
    """The G step's context of one micro-batch: fakes ``G(z, y)`` with G's graph and their
    logits (no reals: the kit's loss does not need real logits)."""
    fake = G(z, y)
    return StepContext(phase="G", iteration=iteration, step=step, micro_batch=0,
                       num_micro_batches=1, discriminator=D, generator=G, module=G, fake=fake,
                       fake_labels=y, fake_logits=D(fake, y).float())


def optimizer_step(case: Case, reg: Regularizer, model: nn.Module, opt: torch.optim.Optimizer,
                   batches: list[tuple[torch.Tensor, torch.Tensor | None]], iteration: int,
                   wrapped: nn.Module | None = None, step: int | None = None) -> None:
    """One D optimizer step over micro-batches, as :class:`core.train.Trainer` does it: state
    updates in the first micro-batch only; each micro-batch's loss plus ``penalty_every`` times
    its penalty (on the steps ``step % penalty_every == 0``; ``step`` defaults to
    ``iteration``) divided by k; gradients all-reduced on the last one (``wrapped`` = the DDP
    module); then ``after_step``."""
    k = len(batches)
    step = iteration if step is None else step
    every = checked_every(case, reg)
    lazy_due = step % every == 0
    opt.zero_grad(set_to_none=True)
    for m, (x, y) in enumerate(batches):
        with contextlib.ExitStack() as stack:
            if m > 0:
                stack.enter_context(frozen_state())
            if wrapped is not None and m < k - 1:
                stack.enter_context(wrapped.no_sync())
            context, logits = discriminator_context(
                reg, model, x, y, wrapped=wrapped, iteration=iteration, step=step,
                micro_batch=m, num_micro_batches=k)
            loss = objective(logits)
            if lazy_due:
                term = checked_penalty(case, reg, context)
                if term is not None:
                    loss = loss + every * term
            (loss / k).backward()
    opt.step()
    with torch.no_grad():
        reg.after_step(model, iteration)


def regularized(case: Case, num_classes: int = 4, seed: int = SEED
                ) -> tuple[Regularizer, nn.Module]:
    """The case's regularizer applied to :func:`core.testing.kit.small_discriminator`."""
    torch.manual_seed(seed)
    module = small_discriminator(num_classes)
    reg = case.create()
    out = reg.apply(module)
    if not isinstance(out, nn.Module):
        fail(case, f"apply must return the module, got {type(out).__name__}")
    return reg, out


# -- the real Trainer on a tiny recipe -------------------------------------------------------


def trainer_recipe(name: str, config: Any, **train: Any):
    """A tiny recipe (stacked digits, resnet32 with ch = 8, hinge) with regularizer ``name``
    (``config``) on D; ``train`` overrides ``[train]`` keys."""
    from core.recipe import structure_recipe

    table = {
        "seed": 3,
        "dataset": {"name": "stacked_digits", "num_samples": 64},
        "architecture": {"name": "resnet32", "ch": 8, "g_ch": 8},
        "discriminator": {"regularizer": {"name": name, **config_table(config)}},
        "train": {"iterations": 4, "batch_size": 8, "n_critic": 1, "lr_d": 1e-3, "lr_g": 1e-3,
                  "cpu": True, **train},
        "checkpoint": {"every": 2, "keep": 5},
        "log": {"every": 1, "sample_every": 0, "grid_size": 4, "progress": False},
    }
    return structure_recipe(table)


def small_trainer(recipe, run_dir: Path, callbacks=()):
    """``core.train.build_trainer`` of ``recipe`` with its own Accelerator and ``callbacks``."""
    from core.train import build_trainer, make_accelerator

    return build_trainer(recipe, run_dir, make_accelerator(recipe), callbacks=list(callbacks))


def trainer_state(trainer) -> dict[str, torch.Tensor]:
    """Every model's state, keyed ``"generator.<key>"`` / ``"discriminator.<key>"``."""
    return {f"{key}.{k}": v for key, model in trainer.models.items()
            for k, v in state_of(trainer.unwrapped(model)).items()}


def d_regularizers(trainer) -> list[Regularizer]:
    """The regularizers the Trainer applies to D, in order (``d_regs`` of contract v2, or the
    one ``d_reg`` of v1)."""
    for attribute in ("d_regs", "d_regularizers"):
        regs = getattr(trainer, attribute, None)
        if isinstance(regs, (list, tuple)):
            return list(regs)
    reg = getattr(trainer, "d_reg", None)
    return [] if reg is None else [reg]
