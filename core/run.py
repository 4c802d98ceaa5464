"""Train a recipe: ``python -m core.run RECIPE`` (also ``specreg RECIPE`` and under ``accelerate launch``).

    python -m core.run zoo/quickstart.toml
    python -m core.run zoo/quickstart.toml --set train.iterations=200 --set train.lr_d=1e-4
    python -m core.run zoo/quickstart.toml --dry-run        # validate, build, print the plan
    python -m core.run zoo/quickstart.toml --resume         # newest run of this recipe
    python -m core.run --resume runs/quickstart-20261124-101500
    accelerate launch --multi_gpu --num_processes 2 -m core.run zoo/quickstart.toml

A bad recipe prints one line per problem and exits 2, without a traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Sequence

from core.errors import SpecregError
from core.run_folder import RECIPE_FILE


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="specreg", description="Train a GAN from a TOML recipe.",
        epilog="Run folders hold recipe.toml, metrics.jsonl, tensorboard/, samples/, checkpoints/.")
    parser.add_argument("recipe", nargs="?", help="recipe file (optional with --resume RUN_DIR)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a recipe key, e.g. --set train.iterations=100 (repeatable)")
    parser.add_argument("--resume", nargs="?", const="", default=None, metavar="RUN_DIR",
                        help="continue a run from its latest checkpoint (default: the newest run "
                             "folder of this recipe)")
    parser.add_argument("--dry-run", action="store_true",
                        help="validate the recipe, build every plugin, run one forward/backward at "
                             "a tiny batch and print the plan; no data, nothing written")
    parser.add_argument("--run-dir", default=None,
                        help="write the run into this folder (default: run.output_dir/NAME)")
    parser.add_argument("--list-plugins", action="store_true",
                        help="list installed plugins and exit (same as 'specreg plugins')")
    return parser.parse_args(argv)


def _is_main_process() -> bool:
    return os.environ.get("RANK", "0") == "0"


def _world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def _newest_run(output_dir: Path, prefix: str) -> Path:
    runs = sorted((p for p in output_dir.glob(f"{prefix}*") if (p / RECIPE_FILE).is_file()),
                  key=lambda p: p.stat().st_mtime)
    if not runs:
        raise SpecregError(f"--resume: no run folder of '{prefix}' under {output_dir}; "
                           f"name one: --resume RUN_DIR")
    return runs[-1]


def resolve_recipe(args: argparse.Namespace):
    """(recipe, recipe path, run folder to resume or None)."""
    from core.recipe import load_recipe

    resume_dir = None
    recipe_path = args.recipe
    if args.resume:  # an explicit run folder
        resume_dir = Path(args.resume)
        if not resume_dir.is_dir():
            raise SpecregError(f"--resume {args.resume}: no such run folder")
        recipe_path = recipe_path or str(resume_dir / RECIPE_FILE)
    if recipe_path is None:
        raise SpecregError("no recipe given: python -m core.run RECIPE (e.g. zoo/quickstart.toml)")
    recipe = load_recipe(recipe_path, args.overrides)
    if args.resume == "":
        resume_dir = _newest_run(Path(recipe.run.output_dir), recipe.run.name or Path(recipe_path).stem)
    return recipe, recipe_path, resume_dir


def new_run_dir(recipe, recipe_path: str) -> Path:
    name = recipe.run.name or f"{Path(recipe_path).stem}-{time.strftime('%Y%m%d-%H%M%S')}"
    return Path(recipe.run.output_dir) / name


def write_run_files(run_dir: Path, recipe, registry) -> None:
    """The resolved recipe and the versions of the plugins it uses (main process)."""
    import tomli_w

    from core.checkpoint import write_atomic_text
    from core.recipe import recipe_to_table

    run_dir.mkdir(parents=True, exist_ok=True)
    text = tomli_w.dumps(recipe_to_table(recipe))
    path = run_dir / RECIPE_FILE
    if path.is_file() and path.read_text() != text:  # resumed with changes: keep the history
        os.replace(path, run_dir / f"recipe.before-{time.strftime('%Y%m%d-%H%M%S')}.toml")
    write_atomic_text(path, text)
    write_atomic_text(run_dir / "plugins.json", json.dumps(plugin_versions(recipe, registry), indent=1))


def plugin_versions(recipe, registry) -> dict:
    import platform

    import torch

    specs = [("datasets", recipe.dataset), ("architectures", recipe.architecture),
             ("losses", recipe.loss), ("regularizers", recipe.discriminator.regularizer),
             ("regularizers", recipe.generator.regularizer),
             *[("metrics", m) for m in recipe.eval.metrics],
             *[("callbacks", c) for c in recipe.callbacks.values()]]
    used = {}
    for kind, spec in specs:
        if spec is None:
            continue
        provider = registry.kinds[kind].providers[spec.name]
        used[f"{kind}/{spec.name}"] = {"distribution": provider.distribution,
                                       "version": provider.version or _own_version(),
                                       "module": provider.name}
    return {"plugins": used, "specreg": _own_version(), "torch": torch.__version__,
            "python": platform.python_version()}


def _own_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("specreg")
    except PackageNotFoundError:
        return "unknown"


def train(args: argparse.Namespace) -> int:
    from accelerate.utils import broadcast_object_list

    from core import checkpoint as ckpt
    from core.registry import get_registry
    from core.train import build_trainer, make_accelerator

    recipe, recipe_path, resume_dir = resolve_recipe(args)
    if args.dry_run:
        from core.dry_run import dry_run

        print(dry_run(recipe, recipe_path))
        return 0
    accelerator = make_accelerator(recipe)
    run_dir = resume_dir or (Path(args.run_dir) if args.run_dir else new_run_dir(recipe, recipe_path))
    run_dir = Path(broadcast_object_list([str(run_dir)])[0]) if accelerator.num_processes > 1 \
        else run_dir
    checkpoint = ckpt.resolve_checkpoint(run_dir) if resume_dir is not None else None
    from core.eval.during_training import make_evaluator

    evaluator = make_evaluator(recipe)
    trainer = build_trainer(recipe, run_dir, accelerator)  # with the recipe's callbacks
    if accelerator.is_main_process:
        write_run_files(run_dir, recipe, get_registry())
    accelerator.wait_for_everyone()
    if checkpoint is not None:
        notes = trainer.resume(checkpoint)
        if accelerator.is_main_process:
            print(f"resuming {run_dir} from {checkpoint.name} (iteration {trainer.iteration})")
            for note in notes:
                print(f"  {note}")
    elif accelerator.is_main_process:
        print(f"run folder: {run_dir}")
        print(f"batch: {trainer.plan.describe()}")
    trainer.fit(evaluate=evaluator)
    if accelerator.is_main_process:
        print(f"done: {trainer.iteration} iterations; run folder {run_dir} "
              f"(last checkpoint {trainer.last_checkpoint.name if trainer.last_checkpoint else '-'})")
    accelerator.wait_for_everyone()
    return 0


def shutdown(code: int) -> None:
    """Leave without letting gloo abort at interpreter exit (the work is done and flushed)."""
    sys.stdout.flush()
    sys.stderr.flush()
    if _world_size() > 1:
        try:
            import torch.distributed as dist

            if dist.is_available() and dist.is_initialized():
                dist.destroy_process_group()
        except Exception:  # noqa: BLE001 - exiting anyway
            pass
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["plugins"]:  # `specreg plugins`
        argv = ["--list-plugins", *argv[1:]]
    args = parse_args(argv)
    try:
        if args.list_plugins:
            from core.listing import print_plugins

            code = print_plugins()
        else:
            code = train(args)
    except SpecregError as exc:
        if _is_main_process():
            problems = getattr(exc, "problems", None)
            if problems and len(problems) > 1:
                print(f"specreg: error: {len(problems)} problems in the recipe:", file=sys.stderr)
                print("\n".join(problems), file=sys.stderr)
            else:
                print(f"specreg: error: {exc}", file=sys.stderr)
        code = exc.exit_code
    except KeyboardInterrupt:
        if _is_main_process():
            print("specreg: interrupted; resume with --resume", file=sys.stderr)
        code = 130
    shutdown(code)
    return code


if __name__ == "__main__":
    sys.exit(main())
