"""The ``[spectral]`` recipe section: how often to record, when to raise the alarm, what to do.

    [spectral]
    every = 500                 # record every 500 iterations (0 = off)
    mass_drop = 0.5             # alarm: a layer's spectral mass < 0.5 x its running maximum
    action = "switch"           # "warn" | "checkpoint" | "switch"
    switch_to = "sr_dynamic"    # the regularizer "switch" continues with ...
    [spectral.switch_config]    # ... and its Config keys (optional)
    every = 5

The alarm rule is the SR paper's definition of spectral collapse (Liu et al. 2019, Sec. II-C:
"a large number of singular values drop significantly") made measurable: the *spectral mass* of a
layer, ``mean_j s_j / s_1``, falls below ``mass_drop`` times the highest value it had so far.
1x1 shortcut convolutions are ignored by default: the paper reports that they do not collapse
(Appendix, Figures 15-22: every layer but layer_2 and layer_5 collapses).
"""

from __future__ import annotations

from typing import Any, Literal

import attrs

__all__ = ["SpectralSection", "ACTIONS"]

ACTIONS = ("warn", "checkpoint", "switch")


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


@attrs.define
class SpectralSection:
    """Settings of the spectral monitor (:mod:`core.spectral.monitor`)."""

    #: record the discriminator's spectra every this many iterations (and at iteration 0);
    #: 0 = off (a regularizer switch made earlier in the run is still replayed on resume).
    every: int = 500
    #: collapse: a layer's spectral mass (mean of s_j/s1) falls below this fraction of its
    #: running maximum.
    mass_drop: float = 0.5
    #: raise the alarm when at least this many (non-ignored) layers are collapsed at once.
    min_layers: int = 1
    #: records before this iteration neither raise the alarm nor enter the running maximum
    #: (the spectrum of the random initialization is not a trained level to fall from).
    warmup: int = 0
    #: what a raised alarm does besides the warning line and the ``alarm`` log entry:
    #: "warn" nothing more; "checkpoint" saves ``checkpoints/alarm_<iteration>``; "switch"
    #: continues training with the ``switch_to`` regularizer from this iteration on (once).
    action: Literal["warn", "checkpoint", "switch"] = "warn"
    #: the discriminator regularizer that ``action = "switch"`` continues with (SR-d: the
    #: paper's rescue, Sec. IV-B, resuming SN-GAN from 40k iterations with SR-d).
    switch_to: str = "sr_dynamic"
    #: that regularizer's Config keys, as in a ``[discriminator.regularizer]`` table.
    switch_config: dict[str, Any] = attrs.Factory(dict)
    #: leave 1x1 convolutions (the ResNets' shortcuts) out of the alarm; they are still recorded.
    ignore_1x1: bool = True
    #: more layers to leave out of the alarm: names ("layer_9"), module paths ("b4.c2") or
    #: shell-style patterns of either ("b1.*").
    ignore: list[str] = attrs.Factory(list)

    def __attrs_post_init__(self) -> None:
        _check(self.every >= 0, f"every must be >= 0 (0 = off), got {self.every}")
        _check(0.0 < self.mass_drop < 1.0,
               f"mass_drop must lie strictly between 0 and 1, got {self.mass_drop}")
        _check(self.min_layers >= 1, f"min_layers must be >= 1, got {self.min_layers}")
        _check(self.warmup >= 0, f"warmup must be >= 0, got {self.warmup}")
        _check(self.action in ACTIONS, f"action must be one of "
               f"{', '.join(repr(a) for a in ACTIONS)}, got {self.action!r}")
        if self.action == "switch":
            self.switch_regularizer_config()  # fail at recipe load, not at the alarm

    def switch_regularizer_config(self) -> Any:
        """The ``switch_to`` regularizer's structured Config; ValueError naming what is wrong."""
        import cattrs

        from core.registry import UnknownPluginError, get_registry

        try:
            cls = get_registry().regularizers[self.switch_to]
        except UnknownPluginError as exc:
            raise ValueError(f"switch_to: {exc}") from None
        from core.recipe import converter  # lazy: core.recipe imports this module

        try:
            return converter.structure(dict(self.switch_config), cls.Config)
        except Exception as exc:  # noqa: BLE001 - every problem becomes one line
            lines = cattrs.transform_error(exc, path="switch_config") \
                if isinstance(exc, cattrs.BaseValidationError) else [str(exc)]
            valid = ", ".join(f.name for f in attrs.fields(cls.Config)) or "none"
            raise ValueError(f"switch_config (the Config of regularizer '{self.switch_to}'): "
                             + "; ".join(lines) + f"; valid keys: {valid}") from None

    def create_switch_regularizer(self):
        """A fresh instance of the ``switch_to`` regularizer."""
        from core.registry import get_registry

        return get_registry().create("regularizers", self.switch_to,
                                     self.switch_regularizer_config())
