"""Replace the discriminator's regularizer mid-run: the SR paper's rescue (Liu et al. 2019,
Sec. IV-B: SN-GAN resumed from its 40k-iteration snapshot with SR-d avoids the collapse).

A switch is what the paper did, in process: checkpoint, rebuild with the new regularizer, resume.

1. a checkpoint of the run as it is (the caller's, or ``checkpoints/switch_iter_<N>``);
2. a fresh discriminator, ``architecture.build_discriminator()`` with the new regularizer applied,
   its random initialization drawn from ``seed`` inside :func:`torch.random.fork_rng` (the global
   random streams are left as they were, so the rest of the run draws what it would have drawn),
   and a fresh optimizer for it, both through ``accelerator.prepare`` (under DDP: a new wrapper
   over the new parameters);
3. its weights and its optimizer's state loaded from that checkpoint by the code a resume uses
   (:func:`core.checkpoint.load_models` with ``allow_regularizer_change``: state both
   regularizers share, like SN's power-iteration vectors, carries over; the new one's own state
   starts fresh; :func:`core.checkpoint.load_optimizers`: Adam's moments carry over).

A resumed run replays a switch the same way, loading from the checkpoint it resumed from::

    switch_discriminator_regularizer(trainer, "sr_dynamic", seed=7)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from core import checkpoint as ckpt
from core.errors import SpecregError
from core.interfaces import Regularizer

__all__ = ["switch_discriminator_regularizer", "build_regularized_discriminator",
           "parameter_names"]


def parameter_names(model: nn.Module) -> list[str]:
    """``model``'s parameters in optimizer order, named as if no weight were parametrized."""
    return [name.replace(".parametrizations.weight.original", ".weight")
            for name, _ in model.named_parameters()]


def build_regularized_discriminator(architecture, regularizer: Regularizer, seed: int) -> nn.Module:
    """A fresh discriminator with ``regularizer`` applied; its random state drawn from ``seed``,
    the global random state (CPU and every GPU) left as it was."""
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        return regularizer.apply(architecture.build_discriminator())


def switch_discriminator_regularizer(trainer, name: str | None = None, config: Any = None,
                                     regularizer: Regularizer | None = None, seed: int = 0,
                                     checkpoint: Path | None = None) -> Regularizer:
    """Continue ``trainer`` with a new discriminator regularizer (``regularizer``, or the
    registered ``name`` with ``config``), reloaded from ``checkpoint`` (default: a new one,
    ``checkpoints/switch_iter_<N>``). Sets ``trainer.D``, ``trainer.opt_d`` and ``trainer.d_reg``
    and returns the regularizer. Call it on every process, between iterations, with the same
    ``seed``.
    """
    if regularizer is None:
        from core.registry import get_registry

        regularizer = get_registry().create("regularizers", name, config)
    if checkpoint is None:
        checkpoint = trainer.save_checkpoint(
            name=f"switch_{ckpt.checkpoint_name(trainer.iteration)}", update_latest=False)
    D = build_regularized_discriminator(trainer.architecture, regularizer, seed)
    before = parameter_names(trainer.unwrapped(trainer.D))
    if parameter_names(D) != before:  # the optimizer state is stored by parameter position
        raise SpecregError(
            f"cannot switch the discriminator's regularizer to '{regularizer.name}': it "
            f"parametrizes other layers than the current one, so the checkpoint's weights and "
            f"optimizer state do not map onto the new network")
    trainer.replace_discriminator(D, regularizer)
    ckpt.load_models(checkpoint, {"discriminator": trainer.unwrapped(trainer.D)},
                     allow_regularizer_change=True)
    ckpt.load_optimizers(checkpoint, {"discriminator": trainer.opt_d})
    return regularizer
