"""The spectral-collapse alarm: a layer's spectral mass falls below a fraction of its running max.

Liu et al. (2019, Sec. II-C) call it spectral collapse when "a large number of singular values
drop significantly" while s1 stays 1 under SN. The spectral mass ``mean_j s_j / s1`` (the area
under the paper's curves) measures exactly that, so the rule is: a watched layer collapses when

    mass(t) < mass_drop * max_{t' <= t, t' >= warmup} mass(t')

and the alarm is raised when at least ``min_layers`` watched layers are collapsed and one of them
just collapsed. A collapsed layer re-arms once its mass is back above the threshold, so one
episode raises one alarm. The state is small and JSON-able (it travels in checkpoints).

    alarm = CollapseAlarm(mass_drop=0.5)
    fired = alarm.update(iteration, {"layer_0": 0.41, ...})   # [] or the newly collapsed layers
"""

from __future__ import annotations

import math
from typing import Any

import attrs

__all__ = ["Collapse", "CollapseAlarm"]


@attrs.frozen
class Collapse:
    """One collapsed layer at an alarm: its mass now and the running maximum it fell from."""

    layer: str
    mass: float
    peak: float
    new: bool  # collapsed at this record (else: still collapsed since an earlier one)


@attrs.define
class CollapseAlarm:
    mass_drop: float = 0.5
    min_layers: int = 1
    warmup: int = 0
    running_max: dict[str, float] = attrs.Factory(dict)
    collapsed: set[str] = attrs.Factory(set)
    #: iterations at which the alarm was raised.
    raised: list[int] = attrs.Factory(list)

    def update(self, iteration: int, masses: dict[str, float]) -> list[Collapse]:
        """Feed one record's spectral masses of the watched layers; returns the collapsed layers
        if the alarm is raised at this record, else ``[]``."""
        if iteration < self.warmup:
            return []
        now: list[Collapse] = []
        for layer, mass in masses.items():
            if not math.isfinite(mass):
                continue
            peak = self.running_max.get(layer)
            if peak is not None and mass < self.mass_drop * peak:
                now.append(Collapse(layer, mass, peak, layer not in self.collapsed))
                self.collapsed.add(layer)
            else:
                self.collapsed.discard(layer)
                self.running_max[layer] = mass if peak is None else max(peak, mass)
        if len(now) >= self.min_layers and any(c.new for c in now):
            self.raised.append(iteration)
            return now
        return []

    def state_dict(self) -> dict[str, Any]:
        return {"running_max": dict(self.running_max), "collapsed": sorted(self.collapsed),
                "raised": list(self.raised)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.running_max = {k: float(v) for k, v in state.get("running_max", {}).items()}
        self.collapsed = set(state.get("collapsed", []))
        self.raised = [int(i) for i in state.get("raised", [])]
