"""Replace the discriminator's regularizer mid-run: the SR paper's rescue (Liu et al. 2019,
Sec. IV-B: SN-GAN resumed from its 40k-iteration snapshot with SR-d avoids the collapse).

    new = switch_discriminator_regularizer(trainer, "sr_dynamic")

The current parametrizations are removed with ``leave_parametrized=False``, which puts the raw
weight ``Parameter`` object back on the layer, and the new regularizer registers its own on that
same object: the optimizer (and its Adam moments) and DDP keep their references. SN's power-
iteration vectors ``_u``/``_v`` are carried over -- as the very same tensors, so DDP keeps
broadcasting them -- wherever the new parametrization has buffers of that name and shape.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.nn.utils import parametrize

from core.interfaces import Regularizer
from core.regularizer import parametrizations_of, regularized_layers

__all__ = ["switch_discriminator_regularizer", "CARRIED_BUFFERS"]

#: power-iteration state moved from the old parametrization to the new one.
CARRIED_BUFFERS = ("_u", "_v")


def _power_iteration_state(layer: torch.nn.Module) -> dict[str, torch.Tensor]:
    for p in parametrizations_of(layer):
        found = {b: getattr(p, b) for b in CARRIED_BUFFERS if isinstance(getattr(p, b, None), torch.Tensor)}
        if found:
            return found
    return {}


def switch_discriminator_regularizer(trainer, name: str | None = None, config: Any = None,
                                     regularizer: Regularizer | None = None) -> Regularizer:
    """Continue ``trainer`` with a new discriminator regularizer (``regularizer``, or the
    registered ``name`` with ``config``): sets and returns ``trainer.d_reg``. Call it on every
    process, between iterations."""
    if regularizer is None:
        from core.plugins import get_registry

        regularizer = get_registry().create("regularizers", name, config)
    D = trainer.unwrapped(trainer.D)
    params_before = [id(p) for p in D.parameters()]
    carried: dict[str, dict[str, torch.Tensor]] = {}
    for layer_name, layer in regularized_layers(D):
        carried[layer_name] = _power_iteration_state(layer)
        parametrize.remove_parametrizations(layer, "weight", leave_parametrized=False)
    applied = regularizer.apply(D)
    if applied is not D:
        raise RuntimeError(f"{type(regularizer).__name__}.apply returned a new module; a live "
                           "switch needs the regularizer to parametrize the network in place")
    for layer_name, layer in regularized_layers(D):
        old = dict(carried.get(layer_name, {}))
        for p in parametrizations_of(layer):  # the first one with such buffers takes them
            for buffer, tensor in list(old.items()):
                mine = getattr(p, buffer, None)
                if isinstance(mine, torch.Tensor) and mine.shape == tensor.shape \
                        and mine.dtype == tensor.dtype:
                    setattr(p, buffer, tensor)
                    del old[buffer]
    if sorted(id(p) for p in D.parameters()) != sorted(params_before):
        raise RuntimeError(f"switching the discriminator's regularizer to "
                           f"{type(regularizer).__name__} changed its parameter objects; the "
                           f"optimizer would not train them")
    trainer.d_reg = regularizer
    return regularizer
