"""How a tracked run ends: its status and reason, the attachment's ``with`` block, SIGTERM.

Every way a run can end leaves its status in ``meta.json``: ``"completed"``,
``"interrupted"`` (Ctrl-C, or SIGTERM while attached) or ``"failed"`` with the reason in
one line (:func:`ending`). :class:`Attachment` is what ``NTKTracker.attach`` returns;
:class:`SigtermGuard` turns a SIGTERM, which would end the process without any clean-up,
into closing the run first.
"""

from __future__ import annotations

import signal
import threading
from typing import Any, Callable, Optional, Tuple

__all__ = ["Attachment", "SigtermGuard", "ending"]


def ending(error: BaseException) -> Tuple[str, str]:
    """``(status, reason)`` of a run ended by ``error``: ``"interrupted"`` for Ctrl-C (any
    ``KeyboardInterrupt``), ``"failed"`` otherwise, the reason in one line."""
    text = " ".join(str(error).split())
    if isinstance(error, KeyboardInterrupt):
        return "interrupted", text or type(error).__name__
    return "failed", f"{type(error).__name__}: {text}" if text else type(error).__name__


class Attachment:
    """What ``NTKTracker.attach`` returns: leaving the ``with`` block closes the tracker
    with the status (and reason) of how the block ended, and re-raises any exception."""

    def __init__(self, tracker: Any) -> None:
        self.tracker = tracker

    def __enter__(self) -> Any:
        return self.tracker

    def __exit__(self, exc_type: Any, exc: Any, traceback: Any) -> bool:
        self.tracker.close(*(ending(exc) if exc is not None else ("completed", None)))
        return False  # re-raise


class SigtermGuard:
    """While installed, a SIGTERM calls ``close(status="interrupted", reason="SIGTERM")``
    and then ends the process as SIGTERM does.

    Installed only from the main thread and only when SIGTERM has its default action (a
    program's own handler is left alone). A handler runs between Python bytecodes, so it
    waits for a running torch operation to finish.
    """

    def __init__(self, close: Callable[..., None]) -> None:
        self._close = close
        self._installed = False

    def install(self) -> None:
        self._installed = False
        if threading.current_thread() is not threading.main_thread():
            return
        try:
            if signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
                return
            signal.signal(signal.SIGTERM, self._on_sigterm)
        except (ValueError, OSError, AttributeError):  # no signals here (an embedded interpreter)
            return
        self._installed = True

    def restore(self) -> None:
        if self._installed:
            self._installed = False
            if signal.getsignal(signal.SIGTERM) == self._on_sigterm:
                signal.signal(signal.SIGTERM, signal.SIG_DFL)

    def _on_sigterm(self, signum: int, frame: Optional[Any]) -> None:
        self._close(status="interrupted", reason="SIGTERM")
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.raise_signal(signal.SIGTERM)
