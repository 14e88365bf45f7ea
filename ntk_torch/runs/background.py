"""One file write at a time on a background thread, its error kept for whoever waits.

A run directory's kernels are written off the training thread (``RunWriter(...,
background=True)``) with the same durability as in the foreground: the write itself is the
same atomic replace (a temporary file, fsynced, renamed, the directory fsynced), so a crash
mid-write never leaves a half file; at most one write is in flight (memory stays bounded),
and the writer waits for it before the next one, before closing and before the directory is
read. The thread is not a daemon: a process that exits normally finishes the write first.
"""

from __future__ import annotations

import threading
from typing import Callable, Optional


class BackgroundWrite:
    """``work()`` started on its own thread; :meth:`wait` joins it and re-raises its error."""

    def __init__(self, work: Callable[[], None], name: str = "ntk_torch kernel writer"):
        self._error: Optional[BaseException] = None
        self._thread = threading.Thread(target=self._run, args=(work,), name=name, daemon=False)
        self._thread.start()

    def _run(self, work: Callable[[], None]) -> None:
        try:
            work()
        except BaseException as error:  # handed to the waiting thread, which raises it
            self._error = error

    def wait(self) -> None:
        """Block until the write is done; raise what it raised, if anything."""
        self._thread.join()
        error, self._error = self._error, None
        if error is not None:
            raise error
