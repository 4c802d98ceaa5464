"""Executors: how a study's runs get trained. Each run is an ordinary ``python -m core.run``
(``accelerate launch ... -m core.run`` with ``processes > 1``), its output in
``STUDY/logs/ARM-seedN.log``; checkpoints, resume and DDP are ``core.run``'s own.

- ``local``: up to ``jobs`` runs at a time as subprocesses of this one, the machine's cores split
  between them (``OMP_NUM_THREADS``). SIGINT/SIGTERM is passed on to the runs, which save a
  checkpoint and stop; the study command then exits 130/143 and re-running it resumes them.
- ``slurm``: one job per run through submitit (``SlurmExecutor``); its ``local`` and ``debug``
  executors (``[slurm] cluster``) run the very same job function on this machine.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Sequence

from core.errors import SpecregError
from core.study.runs import StudyRun, clear_unstarted, run_state
from core.study.spec import LoadedStudy

__all__ = ["run_command", "run_local", "run_slurm", "available_cpus"]

Say = Callable[[str], None]


def available_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def thread_env(threads: int) -> dict[str, str]:
    n = str(max(1, threads))
    return {"OMP_NUM_THREADS": n, "MKL_NUM_THREADS": n}


def _open_log(log_file: Path, command: Sequence[str]):
    log_file.parent.mkdir(parents=True, exist_ok=True)
    log = open(log_file, "a")
    log.write(f"\n# {time.strftime('%Y-%m-%d %H:%M:%S')}: {' '.join(command)}\n")
    log.flush()
    return log


def run_command(command: Sequence[str], env: dict[str, str], log_file: str,
                cwd: str | None = None) -> int:
    """Run one training command to its end, output appended to ``log_file``; its exit status.
    The job function of the slurm executor (module level: submitit pickles it by name)."""
    with _open_log(Path(log_file), command) as log:
        return subprocess.run(list(command), env={**os.environ, **env}, stdout=log,
                              stderr=subprocess.STDOUT, cwd=cwd).returncode


def _pending(runs: list[StudyRun], say: Say) -> list[tuple[StudyRun, str]]:
    """The runs to train and their states; finished and running ones are said and skipped."""
    todo = []
    for run in runs:
        state = run_state(run)
        if state == "finished":
            say(f"{run.name}: finished, skipped")
        elif state == "running":
            say(f"{run.name}: another process trains into {run.folder}; left alone")
        else:
            if state == "started":
                clear_unstarted(run)
                state = "new"
            todo.append((run, state))
    return todo


def _outcome(code: int) -> str:
    return "done" if code == 0 else f"FAILED (exit {code})"


def run_local(loaded: LoadedStudy, runs: list[StudyRun], jobs: int, say: Say = print) -> int:
    """Train the missing runs, ``jobs`` at a time; 0 when every run finished, 1 when one failed,
    130/143 when interrupted (the runs were stopped at a checkpoint)."""
    todo = _pending(runs, say)
    if not todo:
        return 0
    jobs = max(1, min(jobs, len(todo)))
    threads = max(1, available_cpus() // jobs)
    env = thread_env(threads)
    say(f"study {loaded.name}: {len(todo)} run(s) to train, {jobs} at a time, "
        f"{threads} thread(s) each; logs in {loaded.folder / 'logs'}")
    running: dict[subprocess.Popen, tuple[StudyRun, float, object]] = {}
    stop: list[int] = []

    def forward(signum, _frame) -> None:
        if not stop:
            stop.append(signum)
            say(f"study: {signal.Signals(signum).name}: stopping the running runs at a "
                f"checkpoint (re-run the study to resume them)")
        for proc in running:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    failed, done, total = 0, 0, len(todo)
    try:
        while (todo and not stop) or running:
            while todo and not stop and len(running) < jobs:
                run, state = todo.pop(0)
                command = run.command(state)
                log = _open_log(run.log_file, command)
                proc = subprocess.Popen(command, env={**os.environ, **env}, stdout=log,
                                        stderr=subprocess.STDOUT, start_new_session=True)
                running[proc] = (run, time.time(), log)
                verb = "resuming" if state == "interrupted" else "starting"
                say(f"{run.name}: {verb} ({run.iterations} iterations) -> {run.folder}")
            time.sleep(0.2)
            for proc in [p for p in running if p.poll() is not None]:
                run, started, log = running.pop(proc)
                log.close()
                if stop and proc.returncode in (130, 143, -signal.SIGTERM):
                    say(f"{run.name}: stopped after {time.time() - started:.0f} s")
                    continue
                done += 1
                failed += proc.returncode != 0
                say(f"[{done}/{total}] {run.name}: {_outcome(proc.returncode)} in "
                    f"{time.time() - started:.0f} s" +
                    (f"; see {run.log_file}" if proc.returncode else ""))
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    if stop:
        return 128 + stop[0]
    return 1 if failed else 0


def _submitit_executor(submitit, s, folder: Path, name: str):
    """submitit's executor for ``s.cluster`` with the study's job parameters, named in the
    executor's own terms (``time``, ``partition``, ...). (submitit >= 1.5.4: older releases
    import ``pkg_resources``, which setuptools >= 81 no longer has, in every job.)"""
    if s.cluster == "debug":  # runs each job in this process when its result is asked for
        return submitit.DebugExecutor(folder=str(folder))
    if s.cluster == "local":  # one subprocess per job on this machine
        executor = submitit.LocalExecutor(folder=str(folder))
        executor.update_parameters(timeout_min=s.timeout_min)
        return executor
    executor = submitit.SlurmExecutor(folder=str(folder))
    params: dict = {"job_name": f"specreg-{name}", "time": s.timeout_min,
                    "cpus_per_task": s.cpus_per_task}
    if s.gpus_per_node:
        params["gpus_per_node"] = s.gpus_per_node
    if s.mem_gb:
        params["mem"] = f"{s.mem_gb}GB"
    if s.partition:
        params["partition"] = s.partition
    if s.array_parallelism:
        params["array_parallelism"] = s.array_parallelism
    if s.extra:
        params["additional_parameters"] = dict(s.extra)
    executor.update_parameters(**params)
    return executor


def run_slurm(loaded: LoadedStudy, runs: list[StudyRun], say: Say = print) -> int:
    """Submit one submitit job per missing run and wait for them; 0 when all succeeded."""
    try:
        import submitit
    except ImportError:
        raise SpecregError("executor = 'slurm' needs submitit: pip install submitit") from None
    todo = _pending(runs, say)
    if not todo:
        return 0
    s = loaded.study.slurm
    executor = _submitit_executor(submitit, s, loaded.folder / "submitit", loaded.name)
    env = thread_env(s.cpus_per_task)
    submitted = []
    for run, state in todo:
        job = executor.submit(run_command, run.command(state), env, str(run.log_file),
                              os.getcwd())
        submitted.append((run, job))
        say(f"{run.name}: submitted as job {job.job_id} ({s.cluster})")
    failed = 0
    for i, (run, job) in enumerate(submitted, start=1):
        try:
            code = job.result()
        except Exception as exc:  # noqa: BLE001 - a job that died is reported, not raised
            code = 1
            first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            say(f"{run.name}: job {job.job_id} failed: {first}")
        failed += code != 0
        say(f"[{i}/{len(submitted)}] {run.name}: {_outcome(code)}" +
            (f"; see {run.log_file}" if code else ""))
    return 1 if failed else 0
