"""Where a tracker sends each record besides its run directory: a *record sink*.

A sink has two methods, ``write(record)`` (each measurement's record, as the tracker
appends it; the record's ``"step"`` is the optimizer step) and ``close(run_dir)`` (once,
after the run directory, if any, is closed; ``run_dir`` is its path or None). The tracker
sits below the integrations (``ntk_torch.integrations``), which import the figures and
optional libraries; so it never imports them: :func:`open_sink` builds the TensorBoard
sink by name (``importlib``) only when ``tensorboard=`` is given, and anything with the two
methods can be passed as a sink of its own.
"""

from __future__ import annotations

import importlib
import os
from pathlib import Path
from typing import Any, Dict, Mapping, Optional

__all__ = ["NullSink", "open_sink"]


class NullSink:
    """The sink of a tracker without one: does nothing."""

    def write(self, record: Mapping[str, Any]) -> None:
        pass

    def close(self, run_dir: Optional[Path]) -> None:
        pass


def open_sink(tensorboard: Any, main: bool = True) -> Any:
    """The tracker's sink: :class:`NullSink` without ``tensorboard`` (or off rank 0), else
    ``ntk_torch.integrations.tensorboard.TensorBoardSink(tensorboard)`` for a
    ``SummaryWriter`` or a log directory.

    Raises:
        TypeError: ``tensorboard`` is neither a writer nor a path.
        ImportError: tensorboard is not installed (naming the extra to install).
    """
    if tensorboard is None or not main:
        return NullSink()
    if not (isinstance(tensorboard, (str, os.PathLike)) or hasattr(tensorboard, "add_scalar")):
        raise TypeError(
            "tensorboard must be a torch.utils.tensorboard.SummaryWriter or a log directory, "
            f"got {type(tensorboard).__name__}"
        )
    module = importlib.import_module("ntk_torch.integrations.tensorboard")
    return module.TensorBoardSink(tensorboard)


def scalars(record: Mapping[str, Any], prefix: str = "") -> Dict[str, float]:
    """The finite numbers of ``record`` by name, nested dicts as ``a/b`` and lists of
    numbers as ``name/0``, ``name/1``, ... (``step`` and flags such as ``final`` left out)."""
    found: Dict[str, float] = {}
    for key, value in record.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            found.update(scalars(value, name + "/"))
        elif isinstance(value, (list, tuple)):
            found.update(scalars({str(i): v for i, v in enumerate(value)}, name + "/"))
        elif isinstance(value, (int, float)) and not isinstance(value, bool) and name != "step":
            if value == value and abs(value) != float("inf"):
                found[name] = float(value)
    return found
