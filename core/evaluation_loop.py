"""Evaluation during training: metrics on the main process, best checkpoint by a chosen score."""

from __future__ import annotations


def make_evaluator(recipe):
    """A callable ``evaluate(trainer)`` for :meth:`core.train.Trainer.fit`, or None."""
    if not recipe.eval.metrics:
        return None
    raise NotImplementedError("evaluation during training is wired up with the metrics plugins")
