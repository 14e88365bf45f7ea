"""Progress on the terminal: phase lines with their elapsed time, and the tracker's bar.

Everything here goes to standard error, so that standard output stays the program's own
(and ``ntk-torch ... --json``'s result alone):

* :func:`phase` — one line per phase of work, ``ntk-torch: figures ... 7 written, 3.2 s``.
  On a terminal the label appears when the phase starts and the time is added to the same
  line when it ends; elsewhere (a CI log, a file) the whole line is written once at the
  end, so that logs hold complete lines only.
* :func:`write` — a message line that never lands inside an open phase line or a bar.
* :class:`StepBar` — the tracker's bar: optimizer steps out of ``total`` when it is known,
  the step-0 set-up shown as a phase (the bar does not sit at 0 in silence), the number of
  measurements and the latest relative kernel change. It is drawn only when standard
  error is a terminal; while it is drawn, what the program writes to standard error
  (warnings too) and, when it is a terminal, to standard output (the user's own
  ``print`` lines) is written above it (the bar is cleared before each write and redrawn
  after a line ends), so those lines stay whole, on lines of their own. Off a
  terminal it writes the step-0 phase line and one summary line at the end.

Nothing here imports torch: the command line shows its first phase before torch loads.
"""

from __future__ import annotations

import contextlib
import numbers
import sys
import time
from typing import Any, Iterator, List, Optional, Tuple

__all__ = ["Phase", "StepBar", "phase", "write"]

PREFIX = "ntk-torch"
REFRESH_SECONDS = 0.1
"""The bar is redrawn at most this often (a step may take microseconds)."""

_open_line = [False]
"""Whether a phase line on a terminal waits for its end (then a message starts a new line)."""


def is_terminal(stream: Any) -> bool:
    """Whether ``stream`` is an interactive terminal (False for files, pipes, captures)."""
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError, OSError):  # closed or not a file
        return False


def write(message: str) -> None:
    """``message`` as a line on standard error, after ending an open phase line, with any
    tqdm bar on the terminal cleared first and redrawn after (``tqdm.write``)."""
    from tqdm import tqdm

    stream = sys.stderr
    if _open_line[0]:
        stream.write("\n")
        _open_line[0] = False
    tqdm.write(message, file=stream)


class Phase:
    """What a :func:`phase` block may say about itself: set ``detail`` (e.g. ``"7 written"``)
    to have it printed before the elapsed time."""

    def __init__(self, label: str) -> None:
        self.label = label
        self.detail: Optional[str] = None
        self.started = time.perf_counter()

    @property
    def elapsed(self) -> float:
        """Seconds since the phase began."""
        return time.perf_counter() - self.started

    def ending(self, outcome: Optional[str] = None) -> str:
        """The end of the phase's line: ``"7 written, 3.2 s"`` or ``"failed after 3.2 s"``."""
        if outcome is not None:
            return f"{outcome} after {self.elapsed:.1f} s"
        return ", ".join(filter(None, [self.detail, f"{self.elapsed:.1f} s"]))


@contextlib.contextmanager
def phase(label: str, *, enabled: bool = True, prefix: str = PREFIX) -> Iterator[Phase]:
    """Report one phase of work on standard error: ``{prefix}: {label} ... {elapsed} s``.

    Args:
        label: what is being done, e.g. ``"building model and data"``.
        enabled: False reports nothing (``--no-progress``, ``progress=False``).
        prefix: the line's first word.

    Yields:
        The :class:`Phase`; set its ``detail`` to add a result to the line. On a terminal
        a phase left by an exception ends its line with ``failed after ...``
        (``interrupted`` for Ctrl-C); elsewhere it writes no line (the error's own message
        follows). The exception goes on.
    """
    current = Phase(label)
    if not enabled:
        yield current
        return
    stream = sys.stderr
    terminal = is_terminal(stream)
    head = f"{prefix}: {label} ..."
    if terminal:
        stream.write(head)
        stream.flush()
        _open_line[0] = True
    outcome = None
    try:
        yield current
    except KeyboardInterrupt:
        outcome = "interrupted"
        raise
    except BaseException:
        outcome = "failed"
        raise
    finally:
        still_open = terminal and _open_line[0]
        _open_line[0] = False
        if still_open:
            stream.write(f" {current.ending(outcome)}\n")
        elif terminal or outcome is None:  # off a terminal the error's own line says it
            stream.write(f"{head} {current.ending(outcome)}\n")
        stream.flush()


class StepBar:
    """The tracker's progress over optimizer steps (see the module docstring).

    Args:
        total: the optimizer steps the training will take, when known (the bar then shows
            a fraction and an estimate of the time left); None counts without a total.
        enabled: False draws and writes nothing.
        desc: the bar's label.

    Raises:
        TypeError / ValueError: ``total`` is not a positive integer (named ``total_steps``,
            the tracker's option).
    """

    def __init__(self, total: Optional[int] = None, *, enabled: bool = True, desc: str = "NTK") -> None:
        if total is not None and (isinstance(total, bool) or not isinstance(total, numbers.Integral)):
            raise TypeError(f"total_steps must be an integer or None, got {total!r}")
        if total is not None and total < 1:
            raise ValueError(f"total_steps must be at least 1, got {total}")
        self.total, self.enabled, self.desc = total, enabled, desc
        self.steps, self.measurements, self.drift = 0, 0, None
        self._bar: Any = None
        self._streams: List[Tuple[str, "_AboveTheBar"]] = []  # (name in sys, the stream put there)
        self._drawn_at = 0.0
        self._closed = False

    @property
    def drawing(self) -> bool:
        """Whether the bar is drawn on a terminal now."""
        return self._bar is not None

    def _start(self) -> None:
        """Draw the bar, on first use, when standard error is a terminal; and route standard
        output through :class:`_AboveTheBar` when it is a terminal too."""
        if self._bar is not None or self._closed or not (self.enabled and is_terminal(sys.stderr)):
            return
        from tqdm import tqdm

        # miniters=1: tqdm's monitor thread never redraws the bar behind our back
        self._bar = tqdm(total=self.total, desc=self.desc, unit="step", file=sys.stderr, miniters=1,
                         mininterval=REFRESH_SECONDS, dynamic_ncols=True, leave=True)
        sys.stderr = _AboveTheBar(sys.stderr, self)  # warnings, the user's own messages
        self._streams.append(("stderr", sys.stderr))
        if is_terminal(sys.stdout):
            sys.stdout = _AboveTheBar(sys.stdout, self)
            self._streams.append(("stdout", sys.stdout))

    @contextlib.contextmanager
    def phase(self, label: str) -> Iterator[None]:
        """Show ``label`` while the block runs: in the bar's label on a terminal (``NTK
        (step 0: kernel and forecast)``), else as a :func:`phase` line."""
        if not self.enabled:
            yield
            return
        self._start()
        if self._bar is None:
            with phase(label, prefix=self.desc):
                yield
            return
        self._bar.set_description_str(f"{self.desc} ({label})", refresh=True)
        try:
            yield
        finally:
            if self._bar is not None:
                self._bar.set_description_str(self.desc, refresh=True)

    def step(self, step: int) -> None:
        """The optimizer step just taken."""
        self.steps = step
        if self._bar is not None and time.perf_counter() - self._drawn_at >= REFRESH_SECONDS:
            self._show()

    def measured(self, step: int, drift: Optional[float]) -> None:
        """A measurement was recorded at ``step`` with relative kernel change ``drift``."""
        self.steps, self.measurements, self.drift = step, self.measurements + 1, drift
        if self._bar is not None:
            self._bar.set_postfix_str(self._postfix(), refresh=False)
            self._show()

    def _postfix(self) -> str:
        drift = "" if self.drift is None else f", relative change {self.drift:.3g}"
        return f"{self.measurements} measurement{'s' * (self.measurements != 1)}{drift}"

    def _show(self) -> None:
        if self._bar is None or any(stream.pending for _, stream in self._streams):
            return  # a partial line of the user's own waits for its end
        self._bar.n = self.steps
        self._bar.refresh()
        self._drawn_at = time.perf_counter()

    def hide(self) -> None:
        """Clear the bar from the terminal (until the next :meth:`_show`)."""
        if self._bar is not None:
            self._bar.clear()

    def close(self) -> None:
        """Leave the bar's last state on the terminal (off a terminal, write a summary
        line) and give standard output back; idempotent."""
        if self._closed or not self.enabled:
            self._closed = True
            return
        self._closed = True
        for name, stream in reversed(self._streams):
            if getattr(sys, name) is stream:  # unless the program has put another one there since
                setattr(sys, name, stream.wrapped)
        self._streams = []
        if self._bar is not None:
            self._show()
            self._bar.close()
            self._bar = None
        elif self.measurements:
            write(f"{self.desc}: {self.steps} steps, {self._postfix()}")


class _AboveTheBar:
    """Standard output while the bar is drawn: each write clears the bar first, and a write
    that ends a line redraws it, so the user's lines scroll above the bar whole. Every
    other attribute is the wrapped stream's."""

    def __init__(self, wrapped: Any, bar: StepBar) -> None:
        self.wrapped, self._owner, self.pending = wrapped, bar, False

    def write(self, text: str) -> int:
        if not self.pending:
            self._owner.hide()
        written = self.wrapped.write(text)
        if text:
            self.pending = not text.endswith("\n")
        if not self.pending:
            self.wrapped.flush()
            self._owner._show()
        return written

    def __getattr__(self, name: str) -> Any:
        return getattr(self.wrapped, name)
