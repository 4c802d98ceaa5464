"""``python -m core.study STUDY.toml`` (also ``specreg study STUDY.toml``): train a study's missing
runs, then write its report. See :mod:`core.study`."""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

from core.errors import SpecregError, print_error, quiet_broken_pipe


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="specreg study", description="Run a study (arms x seeds of core.run) and report it.",
        epilog="Re-running skips finished runs and resumes interrupted ones.")
    parser.add_argument("study", help="study file (TOML)")
    parser.add_argument("--jobs", type=int, default=None,
                        help="local executor: runs at a time (default: the study's 'jobs')")
    parser.add_argument("--executor", choices=("local", "slurm"), default=None,
                        help="override the study's executor")
    parser.add_argument("--report", action="store_true",
                        help="only (re)draw the report from what the runs have written so far")
    parser.add_argument("--plan", action="store_true",
                        help="print each run, its state and its command; train nothing")
    parser.add_argument("--report-dir", default=None,
                        help="write the report here (default: the study's report_dir, else "
                             "STUDY_FOLDER/report)")
    return parser.parse_args(argv)


def _report(loaded, runs) -> None:
    from core.study.report import write_report
    from core.study.results import read_results

    path = write_report(loaded, [read_results(r) for r in runs])
    print(f"report: {path} (redraw any time: python -m core.study {loaded.path} --report)")


def study_main(args: argparse.Namespace) -> int:
    import attrs

    from core.study.executors import run_local, run_slurm
    from core.study.runs import plan_runs, run_state
    from core.study.spec import load_study

    loaded = load_study(args.study)
    if args.report_dir:
        loaded = attrs.evolve(loaded, study=attrs.evolve(loaded.study, report_dir=args.report_dir))
    if args.jobs is not None and args.jobs < 1:
        raise SpecregError(f"--jobs {args.jobs}: must be >= 1")
    runs = plan_runs(loaded)
    if args.plan:
        for run in runs:
            state = run_state(run)
            print(f"{run.name}: {state}: {' '.join(run.command(state))}")
        return 0
    if args.report:
        _report(loaded, runs)
        return 0
    executor = args.executor or loaded.study.executor
    if executor == "local":
        code = run_local(loaded, runs, args.jobs or loaded.study.jobs)
    else:
        code = run_slurm(loaded, runs)
    _report(loaded, runs)
    return code


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        code = study_main(args)
        sys.stdout.flush()  # a closed pipe shows here, not in the interpreter's exit
        return code
    except SpecregError as exc:
        print_error(exc, "study")
        return exc.exit_code
    except BrokenPipeError:  # the reader of --plan's lines went away
        return quiet_broken_pipe()


if __name__ == "__main__":
    sys.exit(main())
