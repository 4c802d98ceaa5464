"""Evaluation: scoring a generator with metric plugins.

- :mod:`core.eval.runner` -- runs metrics on an :class:`core.interfaces.EvaluationContext` and
  records each score with its protocol (``evaluate``, ``format_table``);
- :mod:`core.eval.during_training` -- the training hook that evaluates every ``eval.every``
  iterations and keeps the best checkpoint;
- :mod:`core.eval.cli` -- ``python -m core.eval RUN_DIR``: score a finished run's checkpoint.
"""
