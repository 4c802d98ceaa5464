"""Train a recipe: ``python -m core.run RECIPE`` (also ``specreg RECIPE`` and under ``accelerate launch``).

    python -m core.run zoo/quickstart.toml
    python -m core.run zoo/quickstart.toml --set train.iterations=200 --set train.lr_d=1e-4
    python -m core.run zoo/quickstart.toml --dry-run        # validate, build, print the plan
    python -m core.run zoo/quickstart.toml --resume         # newest run of this recipe
    python -m core.run --resume runs/quickstart-20261124-101500
    accelerate launch --multi_gpu --num_processes 2 -m core.run zoo/quickstart.toml

A bad recipe prints one line per problem and exits 2, without a traceback.

``--resume`` continues from the run folder's saved ``recipe.toml`` (the values the run started
with, its ``--set`` values included); where the recipe file now says something else, the
difference is listed and the saved value kept; ``--set`` changes a value on purpose (the change is
listed, the previous ``recipe.toml`` kept as ``recipe.before-*.toml``). Without a folder it takes
the newest folder of this very recipe that holds a checkpoint
(:func:`core.run_folder.runs_of_recipe`).
A second run into a folder in use exits 2 (:func:`core.run_folder.lock_run_folder`). SIGINT and
SIGTERM finish the iteration, save a checkpoint and exit 130 / 143.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Sequence

from core.errors import SpecregError, print_error, quiet_broken_pipe
from core.run_folder import (RECIPE_FILE, RunFolderLocked, has_checkpoint, lock_run_folder,
                             runs_of_recipe, write_run_info)


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
    parser.add_argument("--ignore-data", action="store_true",
                        help="with --dry-run: do not fail when the recipe's data is missing")
    parser.add_argument("--run-dir", default=None,
                        help="write the run into this folder (default: run.output_dir/NAME)")
    parser.add_argument("--list-plugins", action="store_true",
                        help="list installed plugins and exit (same as 'specreg plugins')")
    return parser.parse_args(argv)


def _is_main_process() -> bool:
    return os.environ.get("RANK", "0") == "0"


def _world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def _newest_run(recipe, recipe_path: str) -> Path:
    output_dir = Path(recipe.run.output_dir)
    runs = runs_of_recipe(output_dir, recipe_path, recipe.run.name)
    if not runs:
        what = f"'{recipe.run.name}'" if recipe.run.name else \
            f"'{Path(recipe_path).stem}-YYYYMMDD-HHMMSS'"
        raise SpecregError(f"--resume: no run folder {what} of {recipe_path} with a checkpoint "
                           f"under {output_dir}; name one: --resume RUN_DIR")
    return runs[-1]


def _flat(table: dict, prefix: str = "") -> dict[str, object]:
    """``{"train.iterations": 80, ...}`` from a nested recipe table (lists as values)."""
    flat: dict[str, object] = {}
    for key, value in table.items():
        if isinstance(value, dict) and value:
            flat.update(_flat(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _differences(a: dict, b: dict) -> list[tuple[str, object, object]]:
    """(key, value in a, value in b) where two recipe tables differ (None: absent)."""
    fa, fb = _flat(a), _flat(b)
    return [(k, fa.get(k), fb.get(k)) for k in sorted(set(fa) | set(fb)) if fa.get(k) != fb.get(k)]


#: keys whose change on resume alters what the rest of the run computes (said in the notes)
_CONSEQUENTIAL = {"train.batch_size": "the global batch, the data order and the random draws "
                                      "from here on",
                  "seed": "the seeds of the data order, latents and sample grid from here on"}


def resume_notes(run_dir: Path, saved: dict, resumed: dict, recipe_path: str | None,
                 command_line: dict | None, problem: str | None = None) -> list[str]:
    """What differs between the run's saved recipe, the recipe it resumes with (saved + --set)
    and the recipe file on the command line."""
    notes = []
    for key, old, new in _differences(saved, resumed):
        effect = f" (changes {_CONSEQUENTIAL[key]})" if key in _CONSEQUENTIAL else ""
        notes.append(f"--set changes {key}: {old!r} -> {new!r}{effect}")
    if problem is not None:
        notes.append(f"{recipe_path} no longer loads ({problem}); resuming with the saved recipe")
    elif command_line is not None:
        ignored = [(k, a, b) for k, a, b in _differences(resumed, command_line)
                   if not k.startswith("run.")]
        if ignored:
            notes.append(f"{recipe_path} differs from the run's saved recipe "
                         f"{run_dir / RECIPE_FILE} at {len(ignored)} key(s); the saved values are "
                         f"kept (change one with --set KEY=VALUE, or edit the saved recipe):")
            notes += [f"  {k}: run {a!r}, {recipe_path} {b!r}" for k, a, b in ignored]
    return notes


def resolve_recipe(args: argparse.Namespace):
    """(recipe, recipe path, run folder to resume or None, notes on the resumed recipe).

    A resumed run's recipe is its folder's saved ``recipe.toml`` with the ``--set`` values."""
    from core.recipe import load_recipe, recipe_to_table

    resume_dir = None
    recipe_path = args.recipe
    if args.resume:  # an explicit run folder
        resume_dir = Path(args.resume)
        if not resume_dir.is_dir():
            raise SpecregError(f"--resume {args.resume}: no such run folder")
        if not (resume_dir / RECIPE_FILE).is_file():
            raise SpecregError(f"--resume {args.resume}: not a run folder (no {RECIPE_FILE})")
    elif recipe_path is None:
        raise SpecregError("no recipe given: python -m core.run RECIPE (e.g. zoo/quickstart.toml)")
    if resume_dir is None:
        recipe = load_recipe(recipe_path, args.overrides)
        if args.resume is None:
            return recipe, recipe_path, None, []
        resume_dir = _newest_run(recipe, recipe_path)
    if not has_checkpoint(resume_dir):
        raise SpecregError(f"--resume {resume_dir}: no checkpoint to resume from (the run stopped "
                           f"before its first checkpoint); start the run again instead")
    saved_path = resume_dir / RECIPE_FILE
    recipe = load_recipe(saved_path, args.overrides)
    saved = recipe_to_table(load_recipe(saved_path)) if args.overrides else None
    command_line, problem = None, None
    if recipe_path is not None:
        try:
            command_line = recipe_to_table(load_recipe(recipe_path, args.overrides))
        except SpecregError as exc:
            problem = str(exc).splitlines()[0]
    resumed = recipe_to_table(recipe)
    notes = resume_notes(resume_dir, saved or resumed, resumed, recipe_path, command_line, problem)
    return recipe, recipe_path or str(saved_path), resume_dir, notes


def new_run_dir(recipe, recipe_path: str) -> Path:
    name = recipe.run.name or f"{Path(recipe_path).stem}-{time.strftime('%Y%m%d-%H%M%S')}"
    return Path(recipe.run.output_dir) / name


def write_run_files(run_dir: Path, recipe, registry, recipe_path: str | None = None) -> None:
    """The resolved recipe and the versions of the plugins it uses (main process); for a new run
    also the recipe file it came from (``run.json``)."""
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
    if recipe_path is not None:
        write_run_info(run_dir, recipe_path)


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


def _claim_run_folder(run_dir: Path, accelerator, create: bool = True) -> None:
    """Main process: the folder is writable and not in use by another run (then locked for this
    process's life); every process raises the same error if not. ``create=False`` for a folder
    that does not exist yet: only check that its nearest existing parent is writable (a run that
    cannot start leaves no folder)."""
    from accelerate.utils import broadcast_object_list

    from core import checkpoint as ckpt

    problem: list = [None]
    error: SpecregError | None = None
    if accelerator.is_main_process:
        try:
            if create:
                ckpt.ensure_writable(run_dir)
                lock_run_folder(run_dir)
            else:
                parent = next(p for p in Path(os.path.abspath(run_dir)).parents if p.is_dir())
                ckpt.ensure_writable(parent)
        except SpecregError as exc:
            error = exc
        except RunFolderLocked as exc:
            error = SpecregError(str(exc))
        problem[0] = None if error is None else str(error)
    if accelerator.num_processes > 1:
        problem = broadcast_object_list(problem)
    if error is not None:
        raise error
    if problem[0] is not None:
        raise SpecregError(problem[0])


def train(args: argparse.Namespace) -> int:
    from accelerate.utils import broadcast_object_list

    from core import checkpoint as ckpt
    from core.registry import get_registry
    from core.train import build_trainer, make_accelerator

    recipe, recipe_path, resume_dir, recipe_notes = resolve_recipe(args)
    if args.dry_run:
        from core.dry_run import dry_run

        print(dry_run(recipe, recipe_path, check_data=not args.ignore_data))
        return 0
    accelerator = make_accelerator(recipe)
    run_dir = resume_dir or (Path(args.run_dir) if args.run_dir else new_run_dir(recipe, recipe_path))
    run_dir = Path(broadcast_object_list([str(run_dir)])[0]) if accelerator.num_processes > 1 \
        else run_dir
    args.run_dir_used = run_dir  # for the interrupt message of main()
    exists = run_dir.is_dir()
    _claim_run_folder(run_dir, accelerator, create=exists)  # a new folder: after the checks
    skipped: list[str] = []
    checkpoint = ckpt.resolve_checkpoint(run_dir, notes=skipped) if resume_dir is not None \
        else None
    from core.eval.during_training import make_evaluator, trim_evaluations

    evaluator = make_evaluator(recipe)
    trainer = build_trainer(recipe, run_dir, accelerator)  # with the recipe's callbacks
    if not exists:
        _claim_run_folder(run_dir, accelerator)
    if accelerator.is_main_process:
        write_run_files(run_dir, recipe, get_registry(),
                        recipe_path=recipe_path if resume_dir is None else None)
    accelerator.wait_for_everyone()
    if checkpoint is not None:
        notes = trainer.resume(checkpoint)
        if accelerator.is_main_process:
            trim_evaluations(run_dir, trainer.iteration)
            print(f"resuming {run_dir} from {checkpoint.name} (iteration {trainer.iteration}) "
                  f"with its saved recipe {run_dir / RECIPE_FILE}")
            for note in skipped:  # a damaged checkpoint passed over: said where warnings go
                print(f"specreg: note: {note}", file=sys.stderr)
            for note in [*recipe_notes, *notes]:
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
    if argv[:1] == ["study"]:  # `specreg study STUDY.toml`
        from core.study.__main__ import main as study

        return study(argv[1:])
    if argv[:1] == ["plugins"]:  # `specreg plugins`
        argv = ["--list-plugins", *argv[1:]]
    args = parse_args(argv)
    try:
        if args.list_plugins:
            from core.listing import print_plugins

            code = print_plugins()
        else:
            code = train(args)
        sys.stdout.flush()  # a closed pipe shows here, not in the interpreter's exit
    except SpecregError as exc:
        train_module = sys.modules.get("core.train")
        interrupted = train_module is not None and isinstance(exc, train_module.RunInterrupted)
        if _is_main_process() and interrupted:
            print(f"specreg: {exc}", file=sys.stderr)
        elif _is_main_process():
            print_error(exc, "recipe")
        code = exc.exit_code
    except KeyboardInterrupt:
        if _is_main_process():
            run_dir = getattr(args, "run_dir_used", None)
            if run_dir is not None and has_checkpoint(run_dir):
                print(f"specreg: interrupted; resume with --resume {run_dir}", file=sys.stderr)
            else:
                print("specreg: interrupted (no checkpoint was written: nothing to resume)",
                      file=sys.stderr)
        code = 130
    except BrokenPipeError:  # `specreg plugins | head`: the reader went away
        code = quiet_broken_pipe()
    except OSError as exc:  # a full disk or a read-only folder anywhere in the run: one line
        from core.checkpoint import storage_failure

        failure = storage_failure(exc, "the run's files")
        if failure is None:
            raise
        if _is_main_process():
            print(f"specreg: error: {failure}", file=sys.stderr)
        code = failure.exit_code
    shutdown(code)
    return code


if __name__ == "__main__":
    sys.exit(main())
