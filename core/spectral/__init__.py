"""The spectral machinery: the SR paper's spectral distributions, measured, stored and judged.

Liu et al. (2019, Sec. II-C, IV; Figures 2-7) observe that mode collapse goes with *spectral
collapse*: most singular values of the discriminator's spectrally normalized weights drop far
below s1. The spectral monitor, the built-in training callback ``spectral``
(:mod:`plugins.callbacks.spectral_monitor`, ``[callbacks.spectral]`` in a recipe), records those
spectra during training with the modules here, logs summaries, and raises an alarm (optionally
saving a checkpoint or switching to SR-d) when a layer collapses:

- :mod:`core.spectral.measure` -- effective weights and their exact singular values;
- :mod:`core.spectral.summary` -- per-layer summaries (spectral mass, stable rank, ...);
- :mod:`core.spectral.store` -- the appendable ``RUN/spectra.npy`` record file;
- :mod:`core.spectral.alarm` -- the collapse rule;
- :mod:`core.spectral.switch` -- replacing the discriminator's regularizer mid-run
  (checkpoint, rebuild, resume);
- :mod:`core.spectral.history` -- a run's records read back (for :mod:`core.plot`).

Plots: ``python -m core.plot RUN_DIR`` (:mod:`core.plot`).

    from core.spectral.store import read_spectra
    spectra = read_spectra("runs/quickstart-20261124-101500/spectra.npy")
"""
