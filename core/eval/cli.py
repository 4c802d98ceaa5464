"""Score a run's generator: ``python -m core.eval RUN_DIR``.

    python -m core.eval runs/quickstart-20261124-101500
    python -m core.eval RUN_DIR --checkpoint best --metrics modes,digits_fid --num-samples 10000
    python -m core.eval RUN_DIR --metrics fid,is --inception-weights /data/inception-2015-12-05.pt

Metrics default to the run recipe's ``eval.metrics`` (with their Configs); ``--metrics`` picks
others by name (the recipe's Config for a metric it lists, the default Config otherwise).
Every score is appended with its protocol to ``RUN_DIR/evaluations.jsonl`` and printed as a
table. Class-conditional generators are sampled with uniformly drawn labels. A run with
``[generator.ema]`` is scored with its EMA generator; each record's ``generator`` says which
(``"generator"`` or ``"generator_ema"``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Sequence

import attrs
import torch

from core.errors import SpecregError


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m core.eval",
                                     description="Score a run's generator, with the protocol.")
    parser.add_argument("run_dir", help="a run folder (holds recipe.toml and checkpoints/)")
    parser.add_argument("--checkpoint", default="latest",
                        help="latest (default), best, a checkpoint name, or a checkpoint folder")
    parser.add_argument("--metrics", default=None,
                        help="comma-separated metric names (default: the recipe's eval.metrics)")
    parser.add_argument("--num-samples", type=int, default=None,
                        help="generated samples per metric (overrides the metrics' num_samples)")
    parser.add_argument("--batch-size", type=int, default=None, help="generator batch size")
    parser.add_argument("--seed", type=int, default=None, help="sampling seed (default: recipe)")
    parser.add_argument("--inception-weights", default=None,
                        help="path of the Inception TorchScript file (sets SPECREG_INCEPTION_WEIGHTS)")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    return parser.parse_args(argv)


def select_metrics(recipe, names: str | None, num_samples: int | None):
    """Metric plugin instances: the recipe's, or the named ones; ``num_samples`` overrides."""
    from core.registry import get_registry

    registry = get_registry()
    configured = {spec.name: spec.config for spec in recipe.eval.metrics}
    chosen = [n.strip() for n in names.split(",") if n.strip()] if names else list(configured)
    if not chosen:
        raise SpecregError("no metrics to compute: the recipe has no eval.metrics; "
                           f"name some with --metrics (installed: {', '.join(sorted(registry.metrics))})")
    metrics = []
    for name in chosen:
        cls = registry.metrics[name]  # unknown names raise with the installed list
        config = configured.get(name) or cls.Config()
        if num_samples is not None and hasattr(config, "num_samples"):
            config = attrs.evolve(config, num_samples=num_samples)
        metrics.append(cls(config))
    return metrics


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        return evaluate_run(args)
    except SpecregError as exc:
        print(f"specreg: error: {exc}", file=sys.stderr)
        return exc.exit_code


def evaluate_run(args: argparse.Namespace) -> int:
    from core import checkpoint as ckpt
    from core.eval.runner import evaluate, format_table
    from core.interfaces import EvaluationContext
    from core.recipe import load_recipe
    from core.run_folder import RECIPE_FILE
    from core.train import build_models

    run_dir = Path(args.run_dir)
    if not (run_dir / RECIPE_FILE).is_file():
        raise SpecregError(f"{run_dir}: not a run folder (no {RECIPE_FILE})")
    if args.inception_weights:
        os.environ["SPECREG_INCEPTION_WEIGHTS"] = args.inception_weights
    recipe = load_recipe(run_dir / RECIPE_FILE)
    checkpoint = ckpt.resolve_checkpoint(run_dir, args.checkpoint)
    metrics = select_metrics(recipe, args.metrics, args.num_samples)
    architecture, G, D, _, _ = build_models(recipe)
    ckpt.load_models(checkpoint, {"generator": G, "discriminator": D})
    which = "generator"
    if recipe.generator.ema is not None and "generator_ema" in ckpt.saved_networks(checkpoint):
        from core.ema import GeneratorEMA

        ema = GeneratorEMA(G, recipe.generator.ema.decay_per_step(1), recipe.generator.ema.start)
        ckpt.load_models(checkpoint, {"generator_ema": ema})
        G, which = ema.module, "generator_ema"  # the EMA is what the run samples and scores
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    G.to(device).eval()
    D.to(device).eval()
    iteration = int(ckpt.read_state(checkpoint)["iteration"])
    print(f"evaluating {run_dir} at {checkpoint.name} (iteration {iteration}) on {device}")
    context = EvaluationContext(
        generator=G, architecture=architecture, dataset=recipe.dataset.create(),
        data_root=Path(recipe.data_root), device=device,
        seed=recipe.seed if args.seed is None else args.seed, iteration=iteration,
        batch_size=args.batch_size or recipe.eval.batch_size, discriminator=D,
        show_progress=not args.no_progress)
    records = evaluate(metrics, context)
    with (run_dir / "evaluations.jsonl").open("a") as fh:
        for record in records:
            fh.write(json.dumps({**record, "checkpoint": checkpoint.name, "generator": which,
                                 "source": "core.eval"}) + "\n")
    print(format_table(records))
    return 0


if __name__ == "__main__":
    sys.exit(main())
