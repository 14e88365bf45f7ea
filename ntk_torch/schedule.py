"""When the tracker measures: a :class:`Schedule` of optimizer steps.

Step 0 (the reference kernel) is always measured. The rest follow ``every`` (steps 0,
``every``, ``2 every``, ...), an explicit list of steps, or ``"log"`` (two steps per
doubling, :func:`ntk_torch.steps.log_schedule`). The forecast and the experiment runner
take a ``Schedule`` too, so that what is predicted and what is measured line up.
"""

from __future__ import annotations

from typing import Any, Iterable, Iterator, List, Optional, Union

import numpy as np

from ._options import check_int
from .steps import log_schedule, log_steps

__all__ = ["Schedule", "log_schedule"]


class Schedule:
    """The optimizer steps at which the kernel is measured; step 0 always is.

    Built from ``every`` (steps 0, every, 2 * every, ...), an explicit collection of steps,
    or ``"log"`` (see ``log_schedule``; unbounded). Steps are queried in increasing order
    as training advances, so the log schedule is generated lazily.
    """

    def __init__(self, every: int = 10, schedule: Union[None, str, Iterable[int]] = None) -> None:
        every = check_int("every", every, minimum=1)
        self._every: Optional[int] = None
        self._steps: Optional[frozenset] = None
        self._log: Optional[Iterator[int]] = None
        self._log_next = 0
        if schedule is None:
            self._every = every
            self.description: Union[str, List[int]] = f"every {every}"
        elif isinstance(schedule, str):
            if schedule != "log":
                raise ValueError(
                    f"schedule must be None (use every), 'log' or a list of steps, got {schedule!r}"
                )
            self._log = log_steps()
            self._log_next = next(self._log)
            self.description = "log"
        else:
            steps = _explicit_steps(schedule)
            self._steps = frozenset(steps) | {0}
            self.description = sorted(self._steps)

    def steps_until(self, stop: int) -> List[int]:
        """Every scheduled step ``<= stop``, in order (without advancing the lazy log
        schedule that ``in`` walks)."""
        if self._every is not None:
            return list(range(0, stop + 1, self._every))
        if self._steps is not None:
            return sorted(step for step in self._steps if step <= stop)
        return log_schedule(stop)

    def __contains__(self, step: int) -> bool:
        if self._every is not None:
            return step % self._every == 0
        if self._steps is not None:
            return step in self._steps
        while self._log_next < step:
            self._log_next = next(self._log)
        return self._log_next == step

    def __repr__(self) -> str:
        return f"Schedule({self.description!r})"


def _explicit_steps(schedule: Any) -> List[int]:
    try:
        steps = list(schedule)
    except TypeError:
        raise TypeError(
            f"schedule must be None, 'log' or a list of steps, got {type(schedule).__name__}"
        ) from None
    if not steps:
        raise ValueError("schedule is an empty list; give the steps to measure, or None")
    for step in steps:
        if isinstance(step, bool) or not isinstance(step, (int, np.integer)):
            raise TypeError(f"schedule must hold int steps, got {step!r}")
        if step < 0:
            raise ValueError(f"schedule must hold steps >= 0, got {step}")
    return [int(step) for step in steps]
