"""The spectral monitor: a :class:`core.train.TrainingCallback` that records, summarizes and alarms.

Every ``spectral.every`` iterations (and at iteration 0 and the last one) the main process

1. records the singular values of every discriminator layer's effective weight into
   ``RUN/spectra.npy`` (:mod:`core.spectral.store`), with SN's power-iteration sigma and the exact
   s1 of the raw weight;
2. writes per-layer summaries (s1, spectral mass, stable rank, share above 0.1, sigma ratio) as
   a ``spectral`` event to ``metrics.jsonl`` and TensorBoard (``spectral/layer_9.mass``, ...);
3. feeds the masses to the collapse alarm (:mod:`core.spectral.alarm`). A raised alarm prints a
   warning line, writes an ``alarm`` event, and takes ``spectral.action``: ``warn``,
   ``checkpoint`` (saves ``checkpoints/alarm_iter_<N>``) or ``switch`` (continues with
   ``spectral.switch_to``; :mod:`core.spectral.switch`). The decision is broadcast from the main
   process, so every process takes the same action at the same iteration.

A switch is part of the run's history: the callback's state (saved in every checkpoint) says when
and to what, and ``on_start`` replays it after a resume, restoring the new regularizer's state
from the checkpoint. On resume, records past the checkpoint's iteration (a crashed run's tail)
are dropped, so the record file has neither gaps nor duplicates.

    callbacks = make_spectral_callbacks(recipe, run_dir)
    build_trainer(recipe, run_dir, accelerator, callbacks=callbacks).fit()
"""

from __future__ import annotations

import fnmatch
import math
import sys
from pathlib import Path
from typing import Any

from core.spectral.alarm import CollapseAlarm
from core.spectral.config import SpectralSection
from core.spectral.measure import LayerInfo, measure_layer, monitored_layers, reading_weights, \
    summarize
from core.spectral.store import FILENAME, SpectraFile, make_record
from core.spectral.switch import switch_discriminator_regularizer
from core.train import TrainingCallback

__all__ = ["SpectralMonitor", "make_spectral_callbacks", "watched"]


def watched(info: LayerInfo, config: SpectralSection) -> bool:
    """Whether the alarm watches this layer (all layers are recorded either way)."""
    if config.ignore_1x1 and info.is_1x1:
        return False
    return not any(fnmatch.fnmatchcase(info.key, pattern)
                   or fnmatch.fnmatchcase(info.module, pattern) for pattern in config.ignore)


def _say(message: str) -> None:
    """A line on stderr that does not break the progress bar."""
    try:
        from tqdm.auto import tqdm

        tqdm.write(message, file=sys.stderr)
    except ImportError:  # pragma: no cover - tqdm is a dependency
        print(message, file=sys.stderr, flush=True)


class SpectralMonitor(TrainingCallback):
    """Records the discriminator's spectra and raises the spectral-collapse alarm."""

    def __init__(self, config: SpectralSection | None = None, run_dir: Path | None = None,
                 filename: str = FILENAME) -> None:
        self.config = config or SpectralSection()
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.filename = filename
        c = self.config
        self.alarm = CollapseAlarm(c.mass_drop, c.min_layers, c.warmup)
        #: ``{"iteration": N, "to": name, "config": {...}}`` once the action switched.
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
        self.total = trainer.recipe.train.iterations
        if self.run_dir is None:
            self.run_dir = Path(trainer.run_dir)
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
        if action == "switch" and self.switched is not None:
            action, note = "warn", f" (already switched to {self.switched['to']} at iteration " \
                                   f"{self.switched['iteration']})"
        elif action == "switch" and getattr(trainer.d_reg, "name", None) == c.switch_to:
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
            from core.checkpoint import checkpoint_name

            path = trainer.save_checkpoint(name=f"alarm_{checkpoint_name(iteration)}",
                                           update_latest=False)
            values["checkpoint"] = str(path)
            outcome = f"; saved {path}"
        elif action == "switch":
            old = getattr(trainer.d_reg, "name", None) or "none"
            self.switched = {"iteration": iteration, "to": c.switch_to,
                             "config": dict(c.switch_config), "from": old}
            switch_discriminator_regularizer(trainer, regularizer=c.create_switch_regularizer(),
                                             seed=_switch_seed(trainer, iteration))
            values["switched"] = {"from": old, "to": c.switch_to}
            outcome = f"; the discriminator continues with {c.switch_to} (was {old})"
        if trainer.acc.is_main_process:
            _say(f"specreg: warning: spectral collapse at iteration {iteration}: {detail}; "
                 f"action: {action}{note}{outcome}")
            trainer.log.write("alarm", iteration, values, tensorboard_prefix="alarm")

    def _replay_switch(self, trainer) -> None:
        """After a resume: the run had switched regularizers; switch again and restore the new
        regularizer's state from the checkpoint (loading with the recipe's regularizer dropped
        it)."""
        s = self.switched
        if getattr(trainer.d_reg, "name", None) == s["to"]:
            return
        from core import checkpoint as ckpt
        from core.registry import get_registry

        registry = get_registry()
        cls = registry.regularizers[s["to"]]
        from core.recipe import converter

        regularizer = cls(converter.structure(dict(s.get("config") or {}), cls.Config))
        switch_discriminator_regularizer(trainer, regularizer=regularizer,
                                         seed=_switch_seed(trainer, s["iteration"]))
        restored = ""
        if trainer.last_checkpoint is not None:
            ckpt.load_models(trainer.last_checkpoint,
                             {"discriminator": trainer.unwrapped(trainer.D)},
                             allow_regularizer_change=True)
            restored = f", its state restored from {Path(trainer.last_checkpoint).name}"
        if trainer.acc.is_main_process:
            _say(f"specreg: spectral: this run switched the discriminator to {s['to']} at "
                 f"iteration {s['iteration']} (spectral-collapse alarm); continuing with "
                 f"{s['to']}{restored}")


def _switch_seed(trainer, iteration: int) -> int:
    return (trainer.recipe.seed * 1_000_003 + iteration) % 2**63


def make_spectral_callbacks(recipe, run_dir: Path) -> list[TrainingCallback]:
    """The callbacks of ``recipe``'s ``[spectral]`` section for :class:`core.train.Trainer`.

    Always one monitor: with ``every = 0`` it records nothing but still replays a regularizer
    switch made earlier in the run."""
    config = getattr(recipe, "spectral", None) or SpectralSection()
    return [SpectralMonitor(config, Path(run_dir))]
