"""The spectral monitor, callback ``spectral``: the SR paper's spectral distributions, live, with a
collapse alarm (Liu et al. 2019, Sec. II-C, IV; Figures 2-7).

Default-enabled: a recipe without a ``[callbacks.spectral]`` table records every 500 iterations.

    [callbacks.spectral]
    every = 500                 # record every 500 iterations (0 = off)
    mass_drop = 0.5             # alarm: a layer's spectral mass < 0.5 x its running maximum
    action = "switch"           # "warn" | "checkpoint" | "switch"
    switch_to = "sr_dynamic"    # the regularizer "switch" continues with ...
    [callbacks.spectral.switch_config]    # ... and its Config keys (optional)
    every = 5

Every ``every`` iterations (and at iteration 0 and the last one) the main process

1. records the singular values of every discriminator layer's effective weight into
   ``RUN/spectra.npy`` (:mod:`core.spectral.store`), with SN's power-iteration sigma and the exact
   s1 of the raw weight;
2. writes per-layer summaries (s1, spectral mass, stable rank, share above 0.1, sigma ratio) as
   a ``spectral`` event to the run's trackers (``spectral/layer_9.mass``, ...);
3. feeds the masses to the collapse alarm (:mod:`core.spectral.alarm`). A raised alarm prints a
   warning line, writes an ``alarm`` event, and takes ``action``: ``warn``, ``checkpoint`` (saves
   ``checkpoints/alarm_iter_<N>``) or ``switch`` (saves ``checkpoints/switch_iter_<N>`` and
   continues from it with ``switch_to``: :mod:`core.spectral.switch`). The decision is broadcast
   from the main process, so every process takes the same action at the same iteration.

At the end of the run the main process draws ``RUN/plots/`` (:mod:`core.plot`; ``python -m
core.plot RUN_DIR`` redraws them any time).

The alarm rule is the SR paper's definition of spectral collapse (Sec. II-C: "a large number of
singular values drop significantly") made measurable: the *spectral mass* of a layer,
``mean_j s_j / s_1``, falls below ``mass_drop`` times the highest value it had so far. 1x1
shortcut convolutions are ignored by default: the paper reports that they do not collapse
(Appendix, Figures 15-22: every layer but layer_2 and layer_5 collapses).

A switch is part of the run's history: the callback's state (saved in every checkpoint, the
switch's own included) says when and to what, and ``on_start`` replays it after a resume: the
discriminator is rebuilt with the new regularizer and reloaded from the resumed checkpoint. On
resume, records past the checkpoint's iteration (a crashed run's tail) are dropped, so the record
file has neither gaps nor duplicates.
"""

from __future__ import annotations

import fnmatch
import math
import sys
from pathlib import Path
from typing import Any, Literal

import attrs
import cattrs

from core.checkpoint import checkpoint_name
from core.errors import SpecregError
from core.hookspecs import hookimpl
from core.interfaces import Callback
from core.recipe import converter
from core.registry import UnknownPluginError, get_registry
from core.spectral.alarm import CollapseAlarm
from core.spectral.measure import LayerInfo, measure_layer, monitored_layers, reading_weights, \
    summarize
from core.spectral.store import FILENAME, SpectraFile, make_record
from core.spectral.switch import switch_discriminator_regularizer
from core.validators import (ConfigValueError, fail, nonnegative_int, number_in, one_of,
                             positive_int)

__all__ = ["SpectralMonitor", "SpectralSection", "ACTIONS", "watched", "switch_seed"]

ACTIONS = ("warn", "checkpoint", "switch")


def _switch_to_registered(config: Any, attribute: attrs.Attribute, name: Any) -> None:
    """With ``action = "switch"``: ``switch_to`` is an installed regularizer (checked when the
    recipe is loaded, not at the alarm)."""
    if config.action != "switch":
        return
    try:
        get_registry().regularizers[name]
    except UnknownPluginError as exc:
        fail(config, attribute, f"must name an installed regularizer: {exc}")


def _switch_config_fits(config: Any, attribute: attrs.Attribute, table: Any) -> None:
    """With ``action = "switch"``: ``switch_config`` is a valid Config of ``switch_to``."""
    if config.action != "switch" or config.switch_to not in get_registry().regularizers:
        return  # an unknown switch_to is reported at switch_to
    try:
        _regularizer_config(config.switch_to, table)
    except ValueError as exc:
        fail(config, attribute, str(exc).removeprefix("switch_config "))


def watched(info: LayerInfo, config: "SpectralMonitor.Config") -> bool:
    """Whether the alarm watches this layer (all layers are recorded either way)."""
    if config.ignore_1x1 and info.is_1x1:
        return False
    return not any(fnmatch.fnmatchcase(info.key, pattern)
                   or fnmatch.fnmatchcase(info.module, pattern) for pattern in config.ignore)


def switch_seed(seed: int, iteration: int) -> int:
    """The seed of the random state a switch at ``iteration`` creates (fresh power-iteration
    vectors): the same on every process and when a resumed run replays the switch."""
    return (seed * 1_000_003 + iteration) % 2**63


def _say(message: str) -> None:
    """A line on stderr that does not break the progress bar."""
    try:
        from tqdm.auto import tqdm

        tqdm.write(message, file=sys.stderr)
    except ImportError:  # pragma: no cover - tqdm is a dependency
        print(message, file=sys.stderr, flush=True)


class SpectralMonitor(Callback):
    """Records the discriminator's spectra and raises the spectral-collapse alarm."""

    @attrs.define
    class Config:
        """Settings of the spectral monitor: the ``[callbacks.spectral]`` table."""

        #: record the discriminator's spectra every this many iterations (and at iteration 0);
        #: 0 = off (a regularizer switch made earlier in the run is still replayed on resume).
        every: int = attrs.field(default=500, validator=nonnegative_int)
        #: collapse: a layer's spectral mass (mean of s_j/s1) falls below this fraction of its
        #: running maximum; in (0, 1).
        mass_drop: float = attrs.field(default=0.5, validator=number_in(0, 1, low_open=True,
                                                                         high_open=True))
        #: raise the alarm when at least this many (non-ignored) layers are collapsed at once.
        min_layers: int = attrs.field(default=1, validator=positive_int)
        #: records before this iteration neither raise the alarm nor enter the running maximum
        #: (the spectrum of the random initialization is not a trained level to fall from).
        warmup: int = attrs.field(default=0, validator=nonnegative_int)
        #: what a raised alarm does besides the warning line and the ``alarm`` log entry:
        #: "warn" nothing more; "checkpoint" saves ``checkpoints/alarm_<iteration>``; "switch"
        #: continues training with the ``switch_to`` regularizer from this iteration on (once).
        action: Literal["warn", "checkpoint", "switch"] = attrs.field(default="warn",
                                                                      validator=one_of(ACTIONS))
        #: the discriminator regularizer that ``action = "switch"`` continues with (SR-d: the
        #: paper's rescue, Sec. IV-B, resuming SN-GAN from 40k iterations with SR-d).
        switch_to: str = attrs.field(default="sr_dynamic", validator=_switch_to_registered)
        #: that regularizer's Config keys, as in a ``[discriminator.regularizer]`` table.
        switch_config: dict[str, Any] = attrs.field(factory=dict, validator=_switch_config_fits)
        #: leave 1x1 convolutions (the ResNets' shortcuts) out of the alarm; they are still
        #: recorded.
        ignore_1x1: bool = True
        #: more layers to leave out of the alarm: names ("layer_9"), module paths ("b4.c2") or
        #: shell-style patterns of either ("b1.*").
        ignore: list[str] = attrs.Factory(list)
        #: draw the figures into ``RUN/plots/`` at the end of the run (when recording).
        plots: bool = True

        def switch_regularizer_config(self) -> Any:
            """The ``switch_to`` regularizer's structured Config; ValueError naming what is
            wrong."""
            return _regularizer_config(self.switch_to, self.switch_config)

        def create_switch_regularizer(self):
            """A fresh instance of the ``switch_to`` regularizer."""
            return get_registry().create("regularizers", self.switch_to,
                                         self.switch_regularizer_config())

    default_enabled = True

    def __init__(self, config: Config | None = None, run_dir: Path | None = None,
                 filename: str = FILENAME, name: str | None = None) -> None:
        super().__init__(config, name=name)
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.filename = filename
        c = self.config
        self.alarm = CollapseAlarm(c.mass_drop, c.min_layers, c.warmup)
        #: ``{"iteration": N, "to": name, "config": {...}, "from": name}`` once it switched.
        self.switched: dict[str, Any] | None = None
        self.file: SpectraFile | None = None
        self.total = 0

    # -- checkpoint state ------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {"alarm": self.alarm.state_dict(), "switched": self.switched}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.alarm.load_state_dict(state.get("alarm", {}))
        self.switched = state.get("switched")

    # -- hooks -----------------------------------------------------------------------------

    def on_start(self, trainer) -> None:
        self.total = trainer.train_section.iterations
        if self.run_dir is None:
            self.run_dir = Path(trainer.run_dir)
        if self.config.action == "switch" and trainer.d_reg is None:
            raise SpecregError(
                "callbacks.spectral: action = \"switch\" needs a discriminator regularizer to "
                "switch from (a switch reloads the discriminator from a checkpoint, which cannot "
                "turn plain weights into parametrized ones); set [discriminator.regularizer], "
                "e.g. name = \"sn\", or use action = \"checkpoint\"")
        if self.switched is not None:
            self._replay_switch(trainer)
        if not self.config.every:
            return
        if trainer.acc.is_main_process:
            D = trainer.unwrapped(trainer.D)
            self.file = SpectraFile(self.run_dir / self.filename,
                                    [info for info, _ in monitored_layers(D)])
            if self.file.moved_aside is not None:
                _say(f"specreg: spectral: {self.file.path} held another network's records; "
                     f"moved to {self.file.moved_aside.name}")
            # a fresh run starts a fresh record; a resumed one keeps what its checkpoint had seen
            keep_through = trainer.iteration if trainer.iteration > 0 else -1
            dropped = self.file.truncate(keep_through)
            if dropped and trainer.iteration > 0:
                _say(f"specreg: spectral: dropped {dropped} records past iteration "
                     f"{trainer.iteration} (written after the checkpoint)")
        if trainer.iteration == 0:
            self.record(trainer, 0)

    def on_iteration_end(self, trainer, iteration: int) -> None:
        every = self.config.every
        if every and (iteration % every == 0 or iteration == self.total):
            self.record(trainer, iteration)

    def on_end(self, trainer) -> None:
        """The figures of the run into ``RUN/plots/`` (main process)."""
        if not (self.config.every and self.config.plots and trainer.acc.is_main_process):
            return
        from core.plot import plot_run
        from core.spectral.history import RunHistory

        try:
            written = plot_run(RunHistory.load(self.run_dir), self.run_dir / "plots")
        except SpecregError as exc:  # e.g. no record: the run still succeeded
            _say(f"specreg: no spectral plots: {exc}")
            return
        print(f"spectral plots: {len(written)} PNGs in {self.run_dir / 'plots'} "
              f"(redraw any time: python -m core.plot {self.run_dir})", flush=True)

    # -- recording -------------------------------------------------------------------------

    def measure(self, trainer) -> tuple[list[LayerInfo], list]:
        """(layers, spectra) of the discriminator as it is now."""
        D = trainer.unwrapped(trainer.D)
        layers = monitored_layers(D)
        with reading_weights(D):
            spectra = [measure_layer(layer) for _, layer in layers]
        return [info for info, _ in layers], spectra

    def record(self, trainer, iteration: int) -> list[dict[str, Any]]:
        """Record, log, and check the alarm at ``iteration`` (every process must call it).
        Returns the collapsed layers if the alarm was raised (``layer``, ``module``, ``mass``,
        ``peak``, ``new``), else ``[]``."""
        collapses: list[dict[str, Any]] | None = None
        if trainer.acc.is_main_process:
            layers, spectra = self.measure(trainer)
            if self.file is None:
                self.file = SpectraFile(self.run_dir / self.filename, layers)
            self.file.append(make_record(self.file.dtype, iteration, spectra))
            summaries = {info.key: summarize(s.singular_values, s.sigma_pi, s.s1_raw)
                         for info, s in zip(layers, spectra)}
            values = {f"{key}.{name}": value for key, summary in summaries.items()
                      for name, value in summary.items() if math.isfinite(value)}
            trainer.log.write("spectral", iteration, values, tensorboard_prefix="spectral")
            fired = self.alarm.update(iteration, {
                info.key: summaries[info.key]["mass"] for info in layers
                if watched(info, self.config)})
            modules = {info.key: info.module for info in layers}
            collapses = [{"layer": c.layer, "module": modules[c.layer], "mass": c.mass,
                          "peak": c.peak, "new": c.new} for c in fired]
        if trainer.acc.num_processes > 1:
            from accelerate.utils import broadcast_object_list

            collapses = broadcast_object_list([collapses])[0]
        if collapses:
            self.raise_alarm(trainer, iteration, collapses)
        return collapses or []

    # -- the alarm -------------------------------------------------------------------------

    def raise_alarm(self, trainer, iteration: int, collapses: list[dict[str, Any]]) -> None:
        """Warn, log and act (every process; the main one writes)."""
        c = self.config
        action, note = c.action, ""
        current = trainer.d_reg.name if trainer.d_reg is not None else "none"
        if action == "switch" and self.switched is not None:
            action, note = "warn", f" (already switched to {self.switched['to']} at iteration " \
                                   f"{self.switched['iteration']})"
        elif action == "switch" and current == c.switch_to:
            action, note = "warn", f" (the discriminator already uses {c.switch_to})"
        detail = ", ".join(f"{x['layer']} ({x['module']}) mass {x['mass']:.3f} < {c.mass_drop:g} x "
                           f"{x['peak']:.3f}" for x in collapses)
        values: dict[str, Any] = {
            "kind": "spectral_collapse", "action": action,
            "layers_collapsed": len(collapses),  # a number, so TensorBoard marks the alarm too
            "layers": [x["layer"] for x in collapses],
            "mass": {x["layer"]: x["mass"] for x in collapses},
            "peak": {x["layer"]: x["peak"] for x in collapses}}
        outcome = ""
        if action == "checkpoint":
            path = trainer.save_checkpoint(name=f"alarm_{checkpoint_name(iteration)}",
                                           update_latest=False)
            values["checkpoint"] = str(path)
            outcome = f"; saved {path}"
        elif action == "switch":
            # recorded first, so that the switch's checkpoint says it switched: resuming from
            # it replays the switch, which is exactly what continuing in this process does
            self.switched = {"iteration": iteration, "to": c.switch_to,
                             "config": dict(c.switch_config), "from": current}
            path = trainer.save_checkpoint(name=f"switch_{checkpoint_name(iteration)}",
                                           update_latest=False)
            switch_discriminator_regularizer(trainer, regularizer=c.create_switch_regularizer(),
                                             seed=switch_seed(trainer.seed, iteration),
                                             checkpoint=path)
            values["switched"] = {"from": current, "to": c.switch_to}
            values["checkpoint"] = str(path)
            outcome = f"; the discriminator continues with {c.switch_to} (was {current}) " \
                      f"from {path}"
        if trainer.acc.is_main_process:
            _say(f"specreg: warning: spectral collapse at iteration {iteration}: {detail}; "
                 f"action: {action}{note}{outcome}")
            trainer.log.write("alarm", iteration, values, tensorboard_prefix="alarm")

    def _replay_switch(self, trainer) -> None:
        """After a resume: the run had switched regularizers; rebuild the discriminator with the
        new one and reload it from the checkpoint resumed from (the recipe's regularizer could
        not hold the new one's state)."""
        s = self.switched
        if trainer.d_reg is not None and trainer.d_reg.name == s["to"]:
            return  # the recipe itself now names the regularizer switched to
        if trainer.last_checkpoint is None:
            raise SpecregError(f"{self.name}: the run switched the discriminator to {s['to']}, "
                               f"but the trainer was not resumed from a checkpoint")
        try:
            config = _regularizer_config(s["to"], s.get("config") or {})
        except ValueError as exc:
            raise SpecregError(f"{trainer.last_checkpoint}: the run switched the discriminator "
                               f"to {s['to']}, which cannot be rebuilt here: {exc}") from None
        regularizer = get_registry().create("regularizers", s["to"], config)
        switch_discriminator_regularizer(trainer, regularizer=regularizer,
                                         seed=switch_seed(trainer.seed, s["iteration"]),
                                         checkpoint=trainer.last_checkpoint)
        if trainer.acc.is_main_process:
            _say(f"specreg: spectral: this run switched the discriminator to {s['to']} at "
                 f"iteration {s['iteration']} (spectral-collapse alarm); continuing with "
                 f"{s['to']}, reloaded from {Path(trainer.last_checkpoint).name}")


def _reason(exc: BaseException, type_: Any) -> str:
    """A structuring problem of ``switch_config`` as cattrs words it, a validator's as it does."""
    if isinstance(exc, ConfigValueError):
        return exc.reason
    return cattrs.v.format_exception(exc, type_)


def _regularizer_config(name: str, table: dict[str, Any]) -> Any:
    """Regularizer ``name``'s structured Config from ``table``; ValueError naming what is wrong."""
    try:
        cls = get_registry().regularizers[name]
    except UnknownPluginError as exc:
        raise ValueError(f"switch_to: {exc}") from None
    try:
        return converter.structure(dict(table), cls.Config)
    except Exception as exc:  # noqa: BLE001 - every problem becomes one line
        lines = cattrs.transform_error(exc, path="switch_config", format_exception=_reason) \
            if isinstance(exc, cattrs.BaseValidationError) else [str(exc)]
        valid = ", ".join(f.name for f in attrs.fields(cls.Config)) or "none"
        raise ValueError(f"switch_config does not fit regularizer '{name}': "
                         + "; ".join(lines) + f"; valid keys: {valid}") from None


#: the monitor's Config under the name it had as a recipe section (``[spectral]``).
SpectralSection = SpectralMonitor.Config


@hookimpl
def register_callbacks(register) -> None:
    register("spectral", SpectralMonitor)
