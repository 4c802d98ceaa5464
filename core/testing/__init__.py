"""The plugin conformance kit: the contract of every plugin kind, as checks anyone runs on a plugin.

A third-party package checks its plugin against the very checks specreg runs on its built-ins,
with one decorator (the pattern of scikit-learn's ``parametrize_with_checks``)::

    # tests/test_conformance.py of your package
    from core.testing import parametrize_with_checks
    from specreg_orthogonal import Orthogonal

    @parametrize_with_checks([Orthogonal])
    def test_conformance(plugin, check):
        check(plugin)

Each element is a plugin class (checked with its default ``Config``), a configured instance
(``Orthogonal(Orthogonal.Config(strength=1e-3))``), or a :class:`Case` that also says how to make
the files the plugin needs (a dataset's images, a metric's network weights)::

    Case(MyFaces(MyFaces.Config(resolution=16)), prepare=lambda root: write_my_faces(root / "faces"))

Outside pytest, :func:`check_plugin` runs every check and raises one :class:`ConformanceError`
listing all failures. The checks, by kind (:data:`CHECKS`; ``Check.covers`` names the interface
members each one exercises, and specreg's own meta-test fails if a member or a hook has none):

- every kind: the default ``Config`` is constructible and round-trips through the recipe
  converter and TOML; the class has its own docstring.
- regularizers, on a small conditional resnet32 discriminator (ch = 8; convolutions, linear and
  the projection embedding): applies to every layer type; finite outputs and a gradient for every
  parameter; state round-trips through ``state_dict`` and safetensors, and a training run resumed
  from a checkpoint is bit-identical to a straight one; eval mode (and
  :func:`core.layers.frozen_state`) changes no state; k micro-batches of one optimizer step
  equal one batch (state updated once, ``after_step`` once per optimizer step, the penalty
  counted once); deterministic under a seed; identical on 2 gloo processes (slow).
- penalties (contract v2, every regularizer; one without a penalty passes by returning None):
  ``needs`` known; the penalty of a D step (a :class:`core.interfaces.StepContext` built as the
  loop builds it) is a finite scalar whose gradient reaches every weight of D when it depends on
  the batch, calls no backward itself and leaves the loop's graph usable; in the real Trainer,
  lazy ``penalty_every`` runs it on the documented steps, scaled by ``every``, and k
  micro-batches equal one batch; the regularizer's own ``state_dict`` round-trips; 2 DDP
  processes end where one process with all their micro-batches ends (slow).
- architectures: shapes, resolution and range of G and D; conditional labels; every weight
  layer discoverable and reparametrizable (what the plan and the spectral monitor count);
  gradients for every parameter; deterministic under a seed; ``state_dict`` round trip.
- losses: sign conventions, gradient signs, means over the batch (so micro-batches add up;
  a relativistic loss, ``needs_real_logits``, compares with its micro-batch's averages and is
  only checked to be a mean, not a sum); ``generator_loss`` accepts ``real_logits``, ignores them
  unless ``needs_real_logits``, and uses them if it does.
- metrics: a finite score under ``primary``, a JSON-ready protocol record, deterministic in the
  context's seed whatever the global random state (run on a tiny generator and the stacked
  digits; each metric is evaluated twice in all).
- datasets: missing files raise :class:`core.errors.DataMissingError` naming where it looked;
  items are ``float32 [3, R, R]`` in [-1, 1] with integer labels in range (on the 8-bit grid
  when ``dequantize``), batches collate, and item ``i`` is the same every time; ``prepare``
  keeps an up-to-date prepared array and reports missing files (needs the files: a
  ``Case.prepare``, else skipped).
- callbacks, in the real Trainer on a tiny recipe: ``on_start`` once, ``on_iteration_end`` once
  per iteration with that iteration, ``on_end`` once; ``state_dict`` is plain JSON that a fresh
  instance's ``load_state_dict`` takes back (and ``{}``); ``default_enabled`` is a bool and
  decides whether a recipe without the callback's table gets it.

Checks build small things (widths of 8, 64 images, a few steps) and take about a second each;
the multi-process ones are marked ``slow``. A regularizer check that trains runs the real
:class:`core.train.Trainer` (with the built-in ``resnet32``, ``stacked_digits`` and ``hinge``);
a plugin that is not registered yet is registered for the duration of the check
(:func:`registered`). :func:`small_config` shrinks the usual size fields of a Config
(``Case(MyArch(small_config(MyArch)))``); :func:`write_prepared_sample` writes random images as
the prepared array (:mod:`core.prepared`) of a dataset built on the built-in image datasets'
base, ``plugins.datasets.base.ImageDataset``.

The package: :mod:`core.testing.kit` (cases, the check registry, :func:`parametrize_with_checks`,
:func:`check_plugin`, :func:`registered`, small models), one module of checks per plugin kind
(:mod:`~core.testing.common` for every kind, :mod:`~core.testing.regularizers`,
:mod:`~core.testing.penalties` (regularizers too), :mod:`~core.testing.architectures`,
:mod:`~core.testing.losses`, :mod:`~core.testing.metrics`, :mod:`~core.testing.datasets`,
:mod:`~core.testing.callbacks`; a new
kind adds its module to :data:`CHECK_MODULES`), :mod:`core.testing.steps` (the regularizer
checks' step contexts, small training steps and tiny Trainers), :mod:`core.testing.ddp` (the
2-process DDP run) and :mod:`core.testing.writers` (dataset files for ``Case.prepare``).
"""

from __future__ import annotations

from core.testing import (architectures, callbacks, common, datasets, losses,  # noqa: F401
                          metrics, penalties, regularizers)
from core.testing.kit import (CHECKS, COMMON_CHECKS, SEED, SMALL_VALUES, Case, Check,
                              ConformanceError, as_case, check_plugin, checks_for,
                              covered_members, interface_members, kind_of,
                              parametrize_with_checks, registered, small_architecture,
                              small_config, small_discriminator)
from core.testing.writers import write_prepared_sample

#: the modules whose checks the kit registers (importing one registers its checks, each kind's in
#: the order of its module).
CHECK_MODULES = (common, regularizers, penalties, architectures, losses, metrics, datasets,
                 callbacks)

__all__ = ["Case", "Check", "CHECKS", "COMMON_CHECKS", "ConformanceError", "check_plugin",
           "checks_for", "covered_members", "interface_members", "kind_of",
           "parametrize_with_checks", "registered", "small_architecture", "small_config",
           "small_discriminator", "write_prepared_sample", "SMALL_VALUES", "as_case", "SEED"]
