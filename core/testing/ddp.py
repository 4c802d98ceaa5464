"""The 2-process DDP run of the regularizer checks: each gloo rank's child process, and the run
that starts them.

:func:`ddp_run` starts 2 ranks (``fork`` where available, else ``spawn``: then this module is what
the children import), each training the case's regularized D (float64) for :data:`STEPS` steps of
2 micro-batches on its own data; its result, kept on the case for the checks that compare it
(:func:`core.testing.regularizers.check_regularizer_consistent_across_processes`,
:func:`core.testing.penalties.check_regularizer_penalty_matches_one_process`), is the state
differences between the ranks and rank 0's final state. The children report through files, never
by raising: ``out`` gets the differences (rank 0), ``out.state.safetensors`` rank 0's state,
``out.rank<r>.error`` a traceback.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import tempfile
import traceback
from pathlib import Path
from typing import Any

import torch

from core.testing.kit import SEED, Case, differences, fail, state_of
from core.testing.steps import kit_optimizer, optimizer_step, random_images, regularized

#: optimizer steps of the DDP run; micro-batches per step and rank; images per micro-batch.
STEPS, MICRO_BATCHES, MICRO_BATCH = 3, 2, 4
WORLD = 2


def free_port() -> int:
    """A TCP port free on 127.0.0.1 (for the process group's rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rank_batches(rank: int) -> list[list[tuple[torch.Tensor, torch.Tensor | None]]]:
    """Rank ``rank``'s data: per step, its micro-batches (float64 images)."""
    rng = torch.Generator().manual_seed(1000 + rank)  # each rank its own data
    steps = []
    for _ in range(STEPS):
        batches = [random_images(MICRO_BATCH, rng) for _ in range(MICRO_BATCHES)]
        steps.append([(x.double(), y) for x, y in batches])
    return steps


def ddp_child(rank: int, world: int, port: int, case: Case, out: str) -> None:
    """Rank ``rank`` of ``world``: :data:`STEPS` DDP steps on its own data, then rank 0 writes the
    state differences between the ranks to ``out`` and its state beside it; exits without
    returning."""
    import torch.distributed as dist
    from safetensors.torch import save_file
    from torch.nn.parallel import DistributedDataParallel

    code = 1
    try:
        torch.set_num_threads(1)
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                world_size=world)
        reg, D = regularized(case, seed=SEED)  # identical initialization on every rank
        D = D.double()
        ddp = DistributedDataParallel(D)  # buffers synced from rank 0 at every forward
        opt = kit_optimizer(ddp)
        torch.manual_seed(SEED + rank)  # each rank its own global random stream, as under torchrun
        for it, batches in enumerate(rank_batches(rank)):
            optimizer_step(case, reg, D, opt, batches, it, wrapped=ddp)
        states: list[Any] = [None] * world
        dist.all_gather_object(states, state_of(D))
        if rank == 0:
            save_file({k: v.contiguous() for k, v in states[0].items()}, f"{out}.state.safetensors")
            Path(out).write_text(json.dumps(differences(states[0], states[1])))
        dist.barrier()
        dist.destroy_process_group()
        code = 0
    except BaseException:  # noqa: BLE001 - reported through the file, then exit
        Path(f"{out}.rank{rank}.error").write_text(traceback.format_exc())
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def ddp_run(case: Case) -> tuple[list[str], dict[str, torch.Tensor]]:
    """Run (once per case) the 2-process DDP training: (state differences between the ranks,
    rank 0's final state). A failed or hung process fails the calling check."""
    if case._ddp is None:
        case._ddp = _run(case)
    return case._ddp


def _run(case: Case) -> tuple[list[str], dict[str, torch.Tensor]]:
    import multiprocessing

    from safetensors.torch import load_file

    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    ctx = multiprocessing.get_context(method)
    with tempfile.TemporaryDirectory() as tmp:
        out = str(Path(tmp) / "differences.json")
        port = free_port()
        procs = [ctx.Process(target=ddp_child, args=(r, WORLD, port, case, out))
                 for r in range(WORLD)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(timeout=180)
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join()
        errors = [f.read_text() for f in Path(tmp).glob("*.error")]
        if errors:
            fail(case, "a DDP process failed:\n" + errors[0][-3000:])
        if not Path(out).is_file():
            fail(case, f"the DDP processes ended without a result (exit codes "
                       f"{[p.exitcode for p in procs]})")
        return json.loads(Path(out).read_text()), load_file(f"{out}.state.safetensors")
