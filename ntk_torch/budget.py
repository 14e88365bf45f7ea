r"""Tracking within a time budget: measure only when the tracker can afford it.

:class:`TimeBudget` keeps two clocks for :meth:`NTKTracker.step <ntk_torch.NTKTracker.step>`:
*training* time, the wall time between the tracker handing control back and the next step
call (the user's forward, backward and update), and *tracking* time, the wall time spent
inside the step calls (the measurements and the forecast's per-step work). A step of the
tracker's schedule (``every``, a list, ``"log"``) is measured when

    tracking so far + expected cost of one measurement <= budget * training so far,

the expected cost being the running mean of the measurements made under the budget (the
first candidate step is measured whatever its cost, to learn it). The log schedule (two
steps per doubling, :func:`ntk_torch.steps.log_schedule`) is the floor: its steps are
measured whatever the clocks say, so a run too short or a model too cheap to afford more
still gets a record at every doubling. Measurements forced by the floor count as tracking
time too, so later optional steps are skipped until training has paid for them; over a
long run the tracking fraction approaches ``budget`` from below (plus the floor's share,
which shrinks as ``log(steps) / steps``). Step 0 (measured by ``attach``) is not counted.
"""

from __future__ import annotations

import time
from typing import Any, Callable, Optional, Tuple

from ._options import check_real
from .schedule import Schedule

__all__ = ["TimeBudget", "scheduled"]


class TimeBudget:
    """Decide per step whether to measure, so that tracking costs at most ``fraction`` of
    the training time (the log schedule as the floor; module docstring).

    Args:
        fraction: the budget, ``0 < fraction <= 1`` (e.g. ``0.1``: at most 10 %).
        schedule: the candidate steps (the tracker's own schedule).

    Attributes:
        training, tracking: seconds on each clock so far.
        measured, skipped: how many candidate steps were measured and skipped.
        forced: how many of the measurements the floor forced.
    """

    def __init__(self, fraction: float, schedule: Schedule) -> None:
        self.fraction = _check_fraction(fraction)
        self.schedule = schedule
        self.floor = Schedule(schedule="log")
        self.training = 0.0
        self.tracking = 0.0
        self.measured = 0
        self.skipped = 0
        self.forced = 0
        self._left: Optional[float] = None
        self._cost: Optional[float] = None
        self._costs = 0

    @property
    def cost(self) -> float:
        """The mean seconds of one measurement so far (0 before the first)."""
        return 0.0 if self._cost is None else self._cost

    @property
    def overhead(self) -> float:
        """``tracking / training`` so far (0 before any training time)."""
        return self.tracking / self.training if self.training > 0 else 0.0

    def run(self, step: int, measure: Callable[[], Any], entered: float) -> Any:
        """Measure at ``step`` if it is due and affordable: ``measure()``'s result, or None.

        Args:
            step: the optimizer step just counted (increasing from call to call).
            measure: makes the measurement.
            entered: ``time.perf_counter()`` when the tracker's step call began.
        """
        if self._left is not None:
            self.training += max(0.0, entered - self._left)
        forced = step in self.floor
        candidate = forced or step in self.schedule
        result = None
        if forced or (candidate and self._affordable()):
            start = time.perf_counter()
            result = measure()
            self._learn(time.perf_counter() - start)
            self.measured += 1
            self.forced += int(forced)
        elif candidate:
            self.skipped += 1
        self._left = time.perf_counter()
        self.tracking += self._left - entered
        return result

    def _affordable(self) -> bool:
        if self._cost is None:
            return True
        return self.tracking + self._cost <= self.fraction * self.training

    def _learn(self, seconds: float) -> None:
        self._costs += 1
        previous = 0.0 if self._cost is None else self._cost
        self._cost = previous + (seconds - previous) / self._costs

    def __repr__(self) -> str:
        return (f"TimeBudget({self.fraction}, measured={self.measured}, skipped={self.skipped}, "
                f"overhead={self.overhead:.3f})")


def scheduled(every: int, schedule: Any, budget: Optional[float]) -> Tuple[Schedule, Optional[TimeBudget]]:
    """The tracker's :class:`~ntk_torch.schedule.Schedule` and its :class:`TimeBudget`
    (None without ``budget``)."""
    steps = Schedule(every, schedule)
    return steps, None if budget is None else TimeBudget(budget, steps)


def _check_fraction(fraction: Any) -> float:
    value = check_real("budget", fraction)
    if not 0 < value <= 1:
        raise ValueError(f"budget must be a fraction of the training time in (0, 1], got {fraction!r}")
    return float(value)
