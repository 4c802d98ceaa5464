"""Timing shared by the benchmarks (issue 15): a wall-clock measurement that waits for the GPU,
and the alternating comparison that cancels the load of other processes on the machine.

    from benchmarks.timing import alternating_ratio, timed

    ratio, t_new, t_old = alternating_ratio(new, old, repeats=7)

:func:`alternating_ratio` runs ``new`` and ``old`` once per repeat, the order swapping every
other repeat, and takes the ratio within each repeat: a slow spell of the machine slows both
sides of a ratio, so the median ratio stays put where two separate medians of seconds would not.
"""

from __future__ import annotations

import statistics
import time
from typing import Callable

import torch

__all__ = ["sync", "timed", "alternating_ratio", "alternating_ratios", "rotating_times",
           "quartiles"]


def sync() -> None:
    """Wait for the GPU's queued work (nothing on a machine without CUDA)."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn: Callable[[], object]) -> float:
    """Seconds ``fn()`` takes, the GPU's queued work before and after it included."""
    sync()
    start = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - start


def alternating_ratios(new: Callable[[], object], old: Callable[[], object], repeats: int
                       ) -> tuple[list[float], list[float], list[float]]:
    """Per repeat: ``(new/old ratios, new seconds, old seconds)``; the order within a repeat
    swaps every other repeat."""
    ratios, t_new, t_old = [], [], []
    for i in range(repeats):
        if i % 2 == 0:
            a, b = timed(new), timed(old)
        else:
            b, a = timed(old), timed(new)
        t_new.append(a)
        t_old.append(b)
        ratios.append(a / b)
    return ratios, t_new, t_old


def alternating_ratio(new: Callable[[], object], old: Callable[[], object],
                      repeats: int) -> tuple[float, float, float]:
    """``(median of new/old per repeat, median new seconds, median old seconds)``; the order
    within a repeat swaps every other repeat."""
    ratios, t_new, t_old = alternating_ratios(new, old, repeats)
    return statistics.median(ratios), statistics.median(t_new), statistics.median(t_old)


def rotating_times(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, list[float]]:
    """Seconds of each of ``fns`` per repeat, all of them once per repeat, their order rotating
    from repeat to repeat (with three: ABC, BCA, CAB, then reversed: CBA, ACB, BAC), so that
    each runs in every place equally often."""
    names = list(fns)
    seconds: dict[str, list[float]] = {name: [] for name in names}
    for i in range(repeats):
        shift = i % len(names)
        order = names[shift:] + names[:shift]
        if (i // len(names)) % 2:
            order.reverse()
        for name in order:
            seconds[name].append(timed(fns[name]))
    return seconds


def quartiles(values: list[float]) -> tuple[float, float]:
    """The first and third quartiles of ``values`` (both the one value when there is one)."""
    if len(values) < 2:
        return values[0], values[0]
    q1, _, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return q1, q3
