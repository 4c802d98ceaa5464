"""Evaluation during training: metrics on the main process, the best checkpoint by a chosen score.

Every ``eval.every`` iterations (and at the end) the recipe's metrics run on the main process;
the full records (scores + protocol) are appended to ``RUN/evaluations.jsonl`` and a flat
``eval`` line (``{"modes.modes": 987, ...}``) goes to ``metrics.jsonl`` and TensorBoard. If
``eval.best = "metric.key"`` improved, every process joins in saving ``checkpoints/best``.
On resume, :func:`trim_evaluations` drops the records past the checkpoint's iteration (a crashed
run's tail, which the resumed run evaluates again), as ``metrics.jsonl`` is trimmed.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

from core.errors import SpecregError
from core.interfaces import EvaluationContext

#: the evaluation records of a run, one JSON object a line
EVALUATIONS_FILE = "evaluations.jsonl"


def trim_evaluations(run_dir: Path, iteration: int) -> None:
    """Drop ``RUN/evaluations.jsonl``'s records past ``iteration`` and a line that does not
    parse (a crash's partial line), so that a resumed run's records have no duplicates."""
    from core.tracking import truncate_metrics

    truncate_metrics(Path(run_dir) / EVALUATIONS_FILE, iteration)


def flat_scores(records: list[dict[str, Any]]) -> dict[str, float]:
    """``{"modes.modes": 987.0, "modes.kl": 0.1, ...}`` from evaluation records."""
    return {f"{r['metric']}.{k}": v for r in records for k, v in r["values"].items()}


def is_better(value: float, best: float | None, higher_is_better: bool) -> bool:
    if not math.isfinite(value):
        return False
    return best is None or (value > best if higher_is_better else value < best)


def make_evaluator(recipe):
    """A callable ``evaluate(trainer)`` for :meth:`core.train.Trainer.fit`, or None."""
    if not recipe.eval.metrics:
        return None
    metrics = [spec.create() for spec in recipe.eval.metrics]
    best_key = recipe.eval.best
    if best_key and best_key.split(".", 1)[0] not in {spec.name for spec in recipe.eval.metrics}:
        raise SpecregError(f"eval.best = '{best_key}' names no metric of eval.metrics "
                           f"({', '.join(s.name for s in recipe.eval.metrics)}); "
                           f"write it as 'metric.key', e.g. 'modes.modes'")

    def evaluate(trainer) -> dict[str, float] | None:
        from accelerate.utils import broadcast_object_list

        from core.eval.runner import evaluate as run_metrics

        acc = trainer.acc
        decision: list[Any] = [None]
        if acc.is_main_process:
            # the EMA of G when [generator.ema] is on; the record says which one was evaluated
            which, generator = trainer.sampling_generator()
            context = EvaluationContext(
                generator=generator, architecture=trainer.architecture,
                dataset=trainer.dataset_plugin, data_root=Path(recipe.data_root),
                device=acc.device, seed=recipe.seed, iteration=trainer.iteration,
                batch_size=recipe.eval.batch_size, discriminator=trainer.unwrapped(trainer.D),
                # a bar in a log file is one huge \r-joined line
                show_progress=recipe.log.progress and sys.stderr.isatty())
            records = [{**r, "generator": which} for r in run_metrics(metrics, context)]
            with (trainer.run_dir / EVALUATIONS_FILE).open("a") as fh:
                for record in records:
                    fh.write(json.dumps(record) + "\n")
            scores = flat_scores(records)
            trainer.log.write("eval", trainer.iteration, scores, tensorboard_prefix="eval")
            line = ", ".join(f"{k} {v:.4g}" for k, v in scores.items())
            print(f"eval @ {trainer.iteration}: {line}", flush=True)
            if best_key and best_key in scores:
                metric_name = best_key.split(".", 1)[0]
                record = next(r for r in records if r["metric"] == metric_name)
                if recipe.eval.best_mode == "auto":
                    primary = record.get("primary") == best_key.split(".", 1)[1]
                    higher = bool(record.get("higher_is_better", True)) if primary else True
                else:
                    higher = recipe.eval.best_mode == "max"
                if is_better(scores[best_key], trainer.best.get("value"), higher):
                    decision[0] = {"key": best_key, "value": scores[best_key],
                                   "iteration": trainer.iteration}
        if acc.num_processes > 1:
            decision = broadcast_object_list(decision)
        if decision[0] is not None:
            trainer.best = decision[0]
            trainer.save_checkpoint(name="best", update_latest=False)
        return None

    return evaluate
