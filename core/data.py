"""Deterministic, resumable batches for every process, and the batch arithmetic.

The recipe states the global batch of one discriminator step (the paper's batch). It is split
evenly over the processes and, on each process, into micro-batches no larger than the recipe's
cap: ``global = per_process_micro x processes x accumulation``. Data order is a seeded
permutation per epoch; the position (global batches consumed) is all a checkpoint needs to
continue exactly where a run stopped.
"""

from __future__ import annotations

import hashlib
from typing import Iterator

import attrs
import torch

from core.errors import SpecregError


class BatchError(SpecregError):
    """The batch settings do not divide."""


@attrs.frozen
class BatchPlan:
    """How one D step's global batch is split; G steps use ``g_multiplier`` times each figure."""

    global_batch: int
    processes: int
    micro_batch: int
    accumulation: int
    g_multiplier: int = 2

    @classmethod
    def derive(cls, global_batch: int, processes: int, micro_cap: int = 0,
               g_multiplier: int = 2) -> "BatchPlan":
        if global_batch < 1 or processes < 1:
            raise BatchError(f"train.batch_size must be >= 1 (got {global_batch})")
        if global_batch % processes:
            raise BatchError(
                f"train.batch_size = {global_batch} does not divide over {processes} processes; "
                f"use a multiple of {processes}")
        per_process = global_batch // processes
        if micro_cap <= 0 or micro_cap >= per_process:
            return cls(global_batch, processes, per_process, 1, g_multiplier)
        if per_process % micro_cap:
            divisors = [d for d in range(1, per_process + 1) if per_process % d == 0 and d <= micro_cap]
            raise BatchError(
                f"train.micro_batch_size = {micro_cap} does not divide the per-process batch "
                f"{per_process} (= batch_size {global_batch} / {processes} processes); "
                f"valid caps: {', '.join(map(str, divisors))}")
        return cls(global_batch, processes, micro_cap, per_process // micro_cap, g_multiplier)

    @property
    def per_process(self) -> int:
        return self.micro_batch * self.accumulation

    def describe(self) -> str:
        g = self.g_multiplier
        return (f"global batch {self.global_batch} = micro-batch {self.micro_batch} x "
                f"{self.processes} process(es) x {self.accumulation} accumulation step(s); "
                f"generator batch {g * self.global_batch} = {g * self.micro_batch} x "
                f"{self.processes} x {self.accumulation}")


class GlobalBatchSampler(torch.utils.data.Sampler[list[int]]):
    """Yields this process's micro-batches of indices, forever, from a global position.

    Global batch ``p`` is ``perm_e[k*B:(k+1)*B]`` with ``e, k = divmod(p, N // B)`` and
    ``perm_e`` a permutation seeded by ``(seed, e)``; process ``r`` takes its contiguous share
    and cuts it into ``accumulation`` micro-batches. The same global batches are seen whatever
    the number of processes or micro-batches.
    """

    def __init__(self, dataset_size: int, plan: BatchPlan, rank: int, seed: int,
                 start: int = 0) -> None:
        if dataset_size < plan.global_batch:
            raise BatchError(f"the dataset has {dataset_size} images, fewer than one global batch "
                             f"({plan.global_batch})")
        self.size, self.plan, self.rank, self.seed, self.start = dataset_size, plan, rank, seed, start
        self.batches_per_epoch = dataset_size // plan.global_batch

    def _permutation(self, epoch: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(self.size, generator=g)

    def __iter__(self) -> Iterator[list[int]]:
        plan = self.plan
        position = self.start
        epoch, perm = -1, None
        while True:
            e, k = divmod(position, self.batches_per_epoch)
            if e != epoch:
                epoch, perm = e, self._permutation(e)
            batch = perm[k * plan.global_batch:(k + 1) * plan.global_batch]
            mine = batch[self.rank * plan.per_process:(self.rank + 1) * plan.per_process]
            for m in range(plan.accumulation):
                yield mine[m * plan.micro_batch:(m + 1) * plan.micro_batch].tolist()
            position += 1

    def __len__(self) -> int:  # DataLoader asks; the sampler is endless
        return 2**62


# ---------------------------------------------------------------------------------------------
# Dequantized real images (a dataset's ``dequantize``, :attr:`core.interfaces.Dataset.dequantize`)
# ---------------------------------------------------------------------------------------------

#: the width of the dequantization noise: one step of ``p / 128``.
DEQUANTIZATION_STEP = 1.0 / 128


def micro_batch_places(plan: BatchPlan, rank: int, micro: int) -> range:
    """The places, within their global batch, of the items :class:`GlobalBatchSampler` hands
    process ``rank`` as its micro-batch ``micro`` (0 .. accumulation - 1)."""
    start = rank * plan.per_process + micro * plan.micro_batch
    return range(start, start + plan.micro_batch)


def _place_seed(seed: int, position: int, place: int) -> int:
    digest = hashlib.blake2b(f"dequantize:{seed}:{position}:{place}".encode(), digest_size=8)
    return int.from_bytes(digest.digest(), "little")


def dequantization_noise(seed: int, position: int, places: range,
                         shape: tuple[int, ...]) -> torch.Tensor:
    """``float32 [len(places), *shape]`` of ``U(0, 1/128)``: the item at place ``j`` of global
    batch ``position`` gets the noise of a generator seeded by ``(seed, position, j)``.

    Drawn per place rather than in the dataset, because a place of a global batch is one
    (epoch, image) pair the items do not know: every image gets new noise in every epoch (as
    ``np.random.uniform`` in the Chainer loaders), yet the noise of an item does not depend on
    the number of processes, micro-batches or DataLoader workers, and a run resumed at
    ``position`` draws exactly what the straight run drew.
    """
    noise = torch.empty((len(places), *shape))
    for i, place in enumerate(places):
        generator = torch.Generator().manual_seed(_place_seed(seed, position, place))
        noise[i] = torch.rand(shape, generator=generator)
    return noise.mul_(DEQUANTIZATION_STEP)


def dequantized(images: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """Items ``p / 127.5 - 1`` of 8-bit pixels ``p`` -> ``p / 128 - 1 + noise`` (the SN-GAN and SR
    Chainer loaders: ``x / 128. - 1. + np.random.uniform(0, 1. / 128)``; ``p`` is recovered
    exactly, so ``p / 128 - 1`` is too)."""
    pixels = torch.round((images + 1.0) * 127.5)
    return pixels / 128.0 - 1.0 + noise.to(device=images.device, dtype=images.dtype)
