"""Start-up cost of the command line: ``python -m core.run --help``, ``--list-plugins`` (the
registry of every installed plugin) and ``--dry-run``.

    python benchmarks/startup.py [--repeats 5] [--recipe zoo/quickstart.toml] [--repo PATH]

Each command is run ``--repeats`` times as a fresh process (after one unmeasured warm-up run,
which fills the file cache); the median whole-process wall-clock time is printed with the min
and max. Then each is run once more inside a subprocess that lists the heavy optional
dependencies (:data:`HEAVY`) left in ``sys.modules`` when the command has finished: start-up must
import none of them (each plugin imports its own where it uses them; tests/test_layout.py holds
the same rule). ``--repo`` runs the commands in another checkout (e.g. a ``git worktree`` of an
older commit) to compare.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import textwrap
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
#: optional dependencies that registering the plugins must not import.
HEAVY = ("cleanfid", "scipy", "sklearn", "matplotlib", "tensorboard", "torchvision")

_LIST_MODULES = textwrap.dedent('''
    import json, runpy, sys
    args, heavy = json.loads(sys.argv[1]), set(json.loads(sys.argv[2]))
    sys.argv = ["core.run", *args]
    try:
        runpy.run_module("core.run", run_name="__main__", alter_sys=True)
    except SystemExit:
        pass
    print(json.dumps(sorted({m.split(".")[0] for m in sys.modules} & heavy)))
''')


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONDONTWRITEBYTECODE": "1"}


def wall_times(args: list[str], repo: Path, repeats: int) -> list[float]:
    """Whole-process wall-clock seconds of ``python -m core.run ARGS``, one warm-up first."""
    times = []
    for i in range(repeats + 1):
        start = time.perf_counter()
        done = subprocess.run([sys.executable, "-m", "core.run", *args], cwd=repo, env=_env(),
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        elapsed = time.perf_counter() - start
        if done.returncode != 0:
            raise SystemExit(f"python -m core.run {' '.join(args)} failed in {repo}:\n"
                             f"{done.stderr[-2000:]}")
        if i:
            times.append(elapsed)
    return times


def heavy_modules(args: list[str], repo: Path) -> list[str]:
    """The :data:`HEAVY` packages in ``sys.modules`` after ``python -m core.run ARGS``."""
    done = subprocess.run([sys.executable, "-c", _LIST_MODULES, json.dumps(args),
                           json.dumps(HEAVY)], cwd=repo, env=_env(), capture_output=True,
                          text=True)
    if done.returncode != 0:
        raise SystemExit(f"listing the modules of {' '.join(args)} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5, help="measured runs per command")
    parser.add_argument("--recipe", default="zoo/quickstart.toml", help="recipe of the dry run")
    parser.add_argument("--repo", type=Path, default=REPO, help="checkout to run the commands in")
    args = parser.parse_args(argv)
    commands = {"--help": ["--help"], "--list-plugins": ["--list-plugins"],
                "--dry-run": [args.recipe, "--dry-run"]}
    print(f"python -m core.run in {args.repo}, median of {args.repeats} runs (min..max), wall s")
    for label, command in commands.items():
        times = wall_times(command, args.repo, args.repeats)
        heavy = heavy_modules(command, args.repo)
        print(f"  {label:14s} {statistics.median(times):6.2f}  ({min(times):.2f}..{max(times):.2f})"
              f"   heavy modules imported: {', '.join(heavy) or 'none'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
