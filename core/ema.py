"""An exponential moving average of the generator's weights (``[generator.ema]``).

Karras et al. 2022 (EDM, ``training_loop.py``: ``ema_beta = 0.5 ** (batch_size /
ema_halflife_nimg)``) and Yazıcı et al. 2019 (ICLR, "The unusual effectiveness of averaging in
GAN training", eq. 2: ``θ_EMA ← β θ_EMA + (1 − β) θ``), built on
:class:`torch.optim.swa_utils.AveragedModel` with :func:`~torch.optim.swa_utils.get_ema_multi_avg_fn`.

- **Parameters** are averaged after each generator optimizer step; before iteration ``start`` (and
  at the first update) the EMA copies G's parameters.
- **Buffers** (BatchNorm running statistics, power-iteration vectors of G's regularizers) are
  *copied* from G after every update, not averaged (``use_buffers=False``), as BigGAN's and
  StudioGAN's EMA do: averaging power-iteration vectors would give a vector that is no
  iterate of the power method, and averaged running statistics would not belong to any one
  generator.

The averaged network is an ordinary module (``ema.module``): sample grids and evaluation use it
when the recipe turns EMA on; its ``state_dict`` (``module.*`` and ``n_averaged``) is saved in
checkpoints as ``generator_ema``.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn


class GeneratorEMA(nn.Module):
    """The EMA of ``generator`` with a fixed per-step ``decay``, averaging from ``start`` on."""

    def __init__(self, generator: nn.Module, decay: float, start: int = 0) -> None:
        super().__init__()
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        self.decay, self.start = float(decay), int(start)
        self.average = AveragedModel(generator, multi_avg_fn=get_ema_multi_avg_fn(self.decay),
                                     use_buffers=False)
        self.average.requires_grad_(False)

    @property
    def module(self) -> nn.Module:
        """The averaged generator (a deep copy of G's structure)."""
        return self.average.module

    @torch.no_grad()
    def update(self, generator: nn.Module, iteration: int) -> None:
        """After a generator step of generator iteration ``iteration`` (0-based, the step's own):
        average (from ``start`` on) or copy (before), then copy the buffers."""
        if iteration < self.start:
            for ema_p, p in zip(self.module.parameters(), generator.parameters()):
                ema_p.copy_(p.detach())
        else:
            self.average.update_parameters(generator)
        for ema_b, b in zip(self.module.buffers(), generator.buffers()):
            ema_b.copy_(b.detach())

    def state_dict(self, *args, **kwargs):  # noqa: D102 - the AveragedModel's
        return self.average.state_dict(*args, **kwargs)

    def load_state_dict(self, state, strict: bool = True, assign: bool = False):  # noqa: D102
        return self.average.load_state_dict(state, strict=strict, assign=assign)
