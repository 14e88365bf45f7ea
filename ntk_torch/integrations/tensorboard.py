"""TensorBoard: a tracker's records as scalars, its figures as images.

``NTKTracker(..., tensorboard=SummaryWriter(...) | "log_dir")`` sends every measurement to
a :class:`TensorBoardSink`: each finite number of the record (drift, distance, velocity,
alignment, effective rank, the top eigenvalues, the per-layer shares, predicted and actual
losses, ...) as the scalar ``ntk/<field>`` at the optimizer step (nested fields
``ntk/layer_share/<layer>``, lists ``ntk/top_eigenvalues/<i>``); when the tracker closes,
the run's figures (those of ``ntk-torch plot``) as images ``ntk/figures/<name>`` at the
last step, when the tracker writes a run directory (the figures are drawn from it).
Needs the optional extra ``tensorboard``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping, Optional

from ..runs import load_run
from ..sinks import scalars

__all__ = ["PREFIX", "TensorBoardSink"]

PREFIX = "ntk/"
MISSING = "TensorBoard logging needs the tensorboard package: pip install 'ntk-torch[tensorboard]'"


def summary_writer(log_dir: Any) -> Any:
    """A ``torch.utils.tensorboard.SummaryWriter`` on ``log_dir``, or the one-line
    ``ImportError`` naming the extra."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise ImportError(MISSING) from None
    return SummaryWriter(log_dir=str(log_dir))


class TensorBoardSink:
    """A record sink (:mod:`ntk_torch.sinks`) writing to TensorBoard.

    Args:
        target: a ``SummaryWriter`` (anything with ``add_scalar``/``add_figure``; left open
            at the end, it is the caller's) or a log directory (a writer of its own, closed
            with the tracker).
    """

    def __init__(self, target: Any) -> None:
        self._owned = isinstance(target, (str, os.PathLike))
        self.writer = summary_writer(target) if self._owned else target
        self._last_step: Optional[int] = None

    def write(self, record: Mapping[str, Any]) -> None:
        step = int(record["step"])
        for name, value in scalars(record).items():
            self.writer.add_scalar(PREFIX + name, value, global_step=step)
        self._last_step = step

    def close(self, run_dir: Optional[Path]) -> None:
        try:
            if run_dir is not None and self._last_step is not None:
                self._add_figures(run_dir)
            self.writer.flush()
        finally:
            if self._owned:
                self.writer.close()

    def _add_figures(self, run_dir: Path) -> None:
        from .. import plots  # matplotlib only when figures are drawn

        for spec, figure in plots.figures(load_run(run_dir)):
            self.writer.add_figure(f"{PREFIX}figures/{spec.name}", figure, global_step=self._last_step, close=True)
