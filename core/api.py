"""The public API for plugin authors: everything a third-party plugin needs, from one module.

A plugin is a class of one of the plugin kinds, with a nested attrs ``Config``, registered by a
module-level hook implementation; a distribution makes it installable with one entry point
(``[project.entry-points.specreg] myplugin = "my_module"``)::

    import attrs
    from core.api import Regularizer, hookimpl, weight_layers, weight_matrix

    class Orthogonal(Regularizer):
        '''One line saying what it does, citing the paper and equation.'''

        @attrs.define
        class Config:
            strength: float = 1e-4

        def apply(self, module): ...

    @hookimpl
    def register_regularizers(register):
        register("orthogonal", Orthogonal)

The map (each name is documented where it is defined):

- Registering: :data:`hookimpl` (the ``register_<kind>(register)`` hooks are listed in
  :mod:`core.hookspecs`).
- The plugin kinds (:mod:`core.interfaces`): :class:`Plugin` (``config`` and ``name``),
  :class:`Regularizer` (``apply``, ``after_step``, ``penalty`` of a :class:`StepContext` with
  ``needs`` and ``penalty_every``, ``state_dict``/``load_state_dict``; v1's ``loss_term``),
  :class:`Architecture`,
  :class:`Loss`, :class:`Metric` with :class:`MetricResult` and the
  :class:`EvaluationContext` it is computed in, :class:`Dataset`, :class:`Callback` (training-loop
  hooks ``on_start``, ``on_iteration_end``, ``on_end``, ``state_dict``/``load_state_dict``).
- Weight layers (:mod:`core.layers`): :data:`LAYER_TYPES` (the Conv2d/Linear/Embedding a
  regularizer acts on, by recipe name), :func:`weight_layers`, :func:`weight_matrix` (a weight as
  the ``[out, -1]`` matrix of SPEC §1), :func:`raw_weight` (the weight under any
  parametrization), :func:`parametrizations_of`, and the state switch that makes k accumulated
  micro-batches one big batch: :func:`state_updates_enabled` (a parametrization updates its
  state only while it is true) and :func:`frozen_state`.
- Singular values (:mod:`core.svd`): :func:`singular_values` (every value, exact, float64),
  :func:`thin_svd` / :class:`ThinSVD` (lazily exact thin SVD with spectrum re-weighting),
  :func:`svd`, and the one trust threshold :data:`TRUSTED` of their fast Gram route.
- Config validators (:mod:`core.validators`, attrs validators whose errors name the recipe file
  and key): :func:`positive_int`, :func:`nonnegative_int`, :func:`int_at_least`,
  :func:`int_in`, :func:`positive_number`, :func:`nonnegative_number`, :func:`finite_number`,
  :func:`number_in`, :func:`fraction`, :func:`one_of`, :func:`each`, :func:`non_empty`,
  :func:`satisfies`, and :func:`fail` for a check of your own.
- Errors: :class:`SpecregError` (a user error: one line, exit status 2, no traceback; subclass
  it, e.g. for a Config value your plugin cannot work with), :class:`DataMissingError`,
  :class:`WeightsMissingError`.

Testing a plugin: the conformance kit, ``from core.testing import parametrize_with_checks``
(see the README); looking plugins up: ``core.registry.get_registry()``.
"""

from __future__ import annotations

from core.errors import DataMissingError, SpecregError, WeightsMissingError
from core.hookspecs import hookimpl
from core.interfaces import (Architecture, Callback, Dataset, EvaluationContext, Loss, Metric,
                             MetricResult, Plugin, Regularizer, StepContext)
from core.layers import (LAYER_TYPES, frozen_state, parametrizations_of, raw_weight,
                         state_updates_enabled, weight_layers, weight_matrix)
from core.svd import TRUSTED, ThinSVD, singular_values, svd, thin_svd
from core.validators import (each, fail, finite_number, fraction, int_at_least, int_in,
                             non_empty, nonnegative_int, nonnegative_number, number_in, one_of,
                             positive_int, positive_number, satisfies)

__all__ = [
    # registering
    "hookimpl",
    # the plugin kinds
    "Plugin",
    "Regularizer",
    "StepContext",
    "Architecture",
    "Loss",
    "Metric",
    "MetricResult",
    "EvaluationContext",
    "Dataset",
    "Callback",
    # weight layers
    "LAYER_TYPES",
    "weight_layers",
    "weight_matrix",
    "raw_weight",
    "parametrizations_of",
    "state_updates_enabled",
    "frozen_state",
    # singular values
    "singular_values",
    "thin_svd",
    "ThinSVD",
    "svd",
    "TRUSTED",
    # config validators
    "positive_int",
    "nonnegative_int",
    "int_at_least",
    "int_in",
    "positive_number",
    "nonnegative_number",
    "finite_number",
    "number_in",
    "fraction",
    "one_of",
    "each",
    "non_empty",
    "satisfies",
    "fail",
    # errors
    "SpecregError",
    "DataMissingError",
    "WeightsMissingError",
]
