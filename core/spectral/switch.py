"""Replace the discriminator's regularizer mid-run: the SR paper's rescue (Liu et al. 2019,
Sec. IV-B: SN-GAN resumed from its 40k-iteration snapshot with SR-d avoids the collapse).

    new = switch_discriminator_regularizer(trainer, "sr_dynamic")

The raw weight ``Parameter`` objects must survive untouched: the optimizer (and its Adam moments)
holds them, and DDP has its gradient hooks on their gradient accumulators. Registering a
parametrization calls ``original.set_(...)``, which gives a parameter a *new* gradient accumulator
(DDP then stops all-reducing it), so the new regularizer is not applied to the network itself:

1. it is applied to a copy of the network, stripped of its parametrizations;
2. each layer's new parametrization modules are moved into the layer's existing
   ``parametrizations.weight`` list in place of the old ones (``original`` stays where it is);
   layers the new regularizer leaves alone lose theirs (``remove_parametrizations`` with
   ``leave_parametrized=False`` puts the same parameter back);
3. SN's power-iteration vectors ``_u``/``_v`` are carried over -- as the very same tensors, so
   DDP keeps broadcasting them -- wherever the new parametrization has buffers of that name and
   shape.

Only a layer that had no parametrization and gets one (switching from an unregularized
discriminator) needs a fresh registration; under DDP that is refused with a clear error.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize

from core.interfaces import Regularizer
from core.layers import frozen_state, parametrizations_of, regularized_layers, weight_layers

__all__ = ["switch_discriminator_regularizer", "CARRIED_BUFFERS"]

#: power-iteration state moved from the old parametrization to the new one.
CARRIED_BUFFERS = ("_u", "_v")


def _power_iteration_state(layer: nn.Module) -> dict[str, torch.Tensor]:
    for p in parametrizations_of(layer):
        found = {b: getattr(p, b) for b in CARRIED_BUFFERS
                 if isinstance(getattr(p, b, None), torch.Tensor)}
        if found:
            return found
    return {}


def _grad_accumulators(module: nn.Module) -> dict[int, Any]:
    """``id(parameter) -> its AccumulateGrad node`` (where DDP hooks in)."""
    with torch.enable_grad():
        return {id(p): p.view_as(p).grad_fn.next_functions[0][0]
                for p in module.parameters() if p.requires_grad}


def _regularized_copy(model: nn.Module, regularizer: Regularizer, seed: int) -> nn.Module:
    """A copy of ``model`` without its parametrizations, with ``regularizer`` applied.

    Random state the regularizer creates (power-iteration vectors) comes from ``seed``; the
    global random state is left as it was."""
    twin = copy.deepcopy(model)
    for _, layer in regularized_layers(twin):
        # a deep copy shares the class parametrize made for the original layer (it holds the
        # ``weight`` property); give the copy its own before removing its parametrizations
        cls = type(layer)
        layer.__class__ = type(cls.__name__, cls.__bases__, dict(cls.__dict__))
        parametrize.remove_parametrizations(layer, "weight", leave_parametrized=False)
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        applied = regularizer.apply(twin)
    if applied is not twin:
        raise RuntimeError(f"{type(regularizer).__name__}.apply returned a new module; a live "
                           "switch needs the regularizer to parametrize the network in place")
    return twin


def _transplant(layer: nn.Module, source: nn.Module) -> None:
    """Give ``layer`` the parametrization modules of ``source`` (same layer, other copy),
    keeping ``layer``'s ``original`` parameter object."""
    mine, theirs = layer.parametrizations.weight, source.parametrizations.weight
    if not theirs.is_tensor:
        raise RuntimeError("a live switch cannot move a parametrization whose right_inverse "
                           "splits the weight into several tensors")
    with torch.no_grad():
        if not torch.equal(mine.original, theirs.original):  # a right_inverse that is not 1
            mine.original.copy_(theirs.original)
    while len(mine):
        del mine[len(mine) - 1]
    for module in list(theirs):
        mine.append(module)


def switch_discriminator_regularizer(trainer, name: str | None = None, config: Any = None,
                                     regularizer: Regularizer | None = None,
                                     seed: int = 0) -> Regularizer:
    """Continue ``trainer`` with a new discriminator regularizer (``regularizer``, or the
    registered ``name`` with ``config``): sets and returns ``trainer.d_reg``. Call it on every
    process, between iterations.

    New random state the regularizer creates (power-iteration vectors it does not take over) is
    drawn from ``seed``, not from the global random state, which is left as it was: every
    process gets the same vectors, and a resumed run replays the switch without drawing numbers
    the uninterrupted run did not draw.
    """
    if regularizer is None:
        from core.registry import get_registry

        regularizer = get_registry().create("regularizers", name, config)
    D = trainer.unwrapped(trainer.D)
    params_before = sorted(id(p) for p in D.parameters())
    accumulators = _grad_accumulators(D)  # held, so that a replaced one would show
    twin_layers = dict(weight_layers(_regularized_copy(D, regularizer, seed)))
    for layer_name, layer in weight_layers(D):
        source = twin_layers[layer_name]
        carried = _power_iteration_state(layer)
        had = parametrize.is_parametrized(layer, "weight")
        gets = parametrize.is_parametrized(source, "weight")
        if had and gets:
            _transplant(layer, source)
        elif had:
            parametrize.remove_parametrizations(layer, "weight", leave_parametrized=False)
        elif gets:
            with frozen_state():
                for module in list(source.parametrizations.weight):
                    parametrize.register_parametrization(layer, "weight", module)
        for p in parametrizations_of(layer):  # the first one with such buffers takes them
            for buffer, tensor in list(carried.items()):
                current = getattr(p, buffer, None)
                if isinstance(current, torch.Tensor) and current.shape == tensor.shape \
                        and current.dtype == tensor.dtype and current.device == tensor.device:
                    setattr(p, buffer, tensor)
                    del carried[buffer]
    if sorted(id(p) for p in D.parameters()) != params_before:
        raise RuntimeError(f"switching the discriminator's regularizer to "
                           f"{type(regularizer).__name__} changed its parameter objects; the "
                           f"optimizer would not train them")
    replaced = [i for i, acc in _grad_accumulators(D).items() if accumulators.get(i) is not acc]
    if replaced and trainer.acc.num_processes > 1:
        from core.errors import SpecregError

        raise SpecregError(
            f"switching the discriminator's regularizer to '{regularizer.name}' needs a fresh "
            f"parametrization on {len(replaced)} unregularized weights, which DDP cannot follow "
            f"in a running process; give the discriminator a regularizer from the start (e.g. "
            f"'sn') or use spectral.action = \"checkpoint\" and resume with the new regularizer")
    trainer.d_reg = regularizer
    return regularizer
