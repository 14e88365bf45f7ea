"""Sequences of optimizer steps: log-spaced, and dense-then-log.

The one place that knows the log schedule (two steps per doubling), so that what the
tracker measures on (``schedule="log"``), what the forecast records and what
``predict.gd`` keeps by default are the same steps.
"""

from __future__ import annotations

import math
from typing import Iterator, List

__all__ = ["DENSE_STEPS", "dense_then_log", "dense_then_log_steps", "log_steps", "log_schedule"]

DENSE_STEPS = 1000
"""``dense_then_log`` keeps every step up to this one."""


def _log_step(k: int) -> int:
    """The k-th step of the log schedule, 2**(k/2) rounded to the nearest integer."""
    return math.floor(2.0 ** (k / 2) + 0.5)


def log_steps() -> Iterator[int]:
    """0, 1, 2, 3, 4, 6, 8, 11, 16, 23, 32, 45, 64, ...: two steps per doubling, unbounded."""
    yield 0
    last, k = 0, 0
    while True:
        step = _log_step(k)
        if step > last:
            yield step
            last = step
        k += 1


def log_schedule(stop: int) -> List[int]:
    """The steps of the log schedule up to and including ``stop``.

    Step 0, then ``round(2 ** (k / 2))`` for k = 0, 1, 2, ... without repeats:
    0, 1, 2, 3, 4, 6, 8, 11, 16, 23, 32, 45, 64, 91, 128, ... Dense early, where the kernel
    moves most, and two measurements per doubling of the step count after that, so
    about ``2 * log2(stop) + 2`` measurements in all.
    """
    steps = []
    for step in log_steps():
        if step > stop:
            return steps
        steps.append(step)
    raise AssertionError("unreachable: the log schedule is unbounded")  # pragma: no cover


def dense_then_log(stop: int, dense: int = DENSE_STEPS) -> List[int]:
    """Every step ``0..min(stop, dense)``, then the log schedule's steps beyond ``dense``,
    and ``stop`` itself: ``dense + 2 log2(stop / dense) + 2`` steps at most, so that a
    trajectory over ``stop`` steps is recorded finely where it moves fast and in memory
    that hardly grows with ``stop``."""
    steps = list(range(min(stop, dense) + 1))
    if stop > dense:
        steps += [step for step in log_schedule(stop) if step > dense]
        if steps[-1] != stop:
            steps.append(stop)
    return steps


def dense_then_log_steps(dense: int = DENSE_STEPS) -> Iterator[int]:
    """0, 1, 2, ..., ``dense``, then the log schedule's steps beyond ``dense``, unbounded:
    the steps of :func:`dense_then_log` without an end, for trajectories recorded while
    they are computed."""
    yield from range(dense + 1)
    for step in log_steps():
        if step > dense:
            yield step
