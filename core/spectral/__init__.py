"""The spectral monitor: the SR paper's spectral distributions, live, with a collapse alarm.

Liu et al. (2019, Sec. II-C, IV; Figures 2-7) observe that mode collapse goes with *spectral
collapse*: most singular values of the discriminator's spectrally normalized weights drop far
below s1. This package records those spectra during training, logs summaries, and raises an
alarm (optionally saving a checkpoint or switching to SR-d) when a layer collapses.

- :mod:`core.spectral.config` -- the ``[spectral]`` recipe section (:class:`SpectralSection`);
- :mod:`core.spectral.measure` -- effective weights and their exact singular values;
- :mod:`core.spectral.summary` -- per-layer summaries (spectral mass, stable rank, ...);
- :mod:`core.spectral.store` -- the appendable ``RUN/spectra.npy`` record file;
- :mod:`core.spectral.alarm` -- the collapse rule;
- :mod:`core.spectral.switch` -- replacing the discriminator's regularizer mid-run;
- :mod:`core.spectral.monitor` -- the training callback tying them together;
- :mod:`core.spectral.history` -- a run's records read back (for :mod:`core.plot`).

Plots: ``python -m core.plot RUN_DIR`` (:mod:`core.plot`).

    from core.spectral import make_spectral_callbacks
    callbacks = make_spectral_callbacks(recipe, run_dir)
    trainer = build_trainer(recipe, run_dir, accelerator, callbacks=callbacks)
"""

from core.spectral.config import SpectralSection

__all__ = ["SpectralSection", "SpectralMonitor", "make_spectral_callbacks",
           "switch_discriminator_regularizer", "read_spectra"]


def __getattr__(name: str):
    # lazy: core.recipe imports SpectralSection from here, and the monitor imports core.train,
    # which imports core.recipe
    if name in ("SpectralMonitor", "make_spectral_callbacks"):
        from core.spectral import monitor

        return getattr(monitor, name)
    if name == "switch_discriminator_regularizer":
        from core.spectral.switch import switch_discriminator_regularizer

        return switch_discriminator_regularizer
    if name == "read_spectra":
        from core.spectral.store import read_spectra

        return read_spectra
    raise AttributeError(f"module 'core.spectral' has no attribute {name!r}")
