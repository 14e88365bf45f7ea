"""What every figure shares: reading runs, the optimizer-step axis, lines, legends and the
notes a panel shows in place of missing data."""

from __future__ import annotations

import math
import os
from typing import List, Optional, Sequence, Tuple, Union

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, NullLocator, SymmetricalLogLocator

from .. import records
from ..runs import Run, load_run

PathLike = Union[str, "os.PathLike[str]"]
RunLike = Union[Run, PathLike]
RunsLike = Union[RunLike, Sequence[RunLike]]
Labels = Union[None, str, Sequence[str]]

XSCALES = ("symlog", "linear", "log")
PANEL_SIZE = (6.4, 4.2)
"""Width and height in inches of a single-panel figure (and of each overview panel)."""
LINESTYLES = ("-", "--", ":", "-.")
"""Line styles telling apart several quantities of one run, in this order."""


# --------------------------------------------------------------------------- inputs


def as_run(run: RunLike) -> Run:
    """A ``Run``, or the run loaded from a run directory's path."""
    if isinstance(run, Run):
        return run
    if isinstance(run, (str, os.PathLike)):
        return load_run(run)
    raise TypeError(f"run must be a Run or a run directory's path, got {type(run).__name__}")


def as_runs(runs: RunsLike) -> List[Run]:
    """One run or a sequence of runs (or paths) as a non-empty list of ``Run``."""
    if isinstance(runs, (Run, str, os.PathLike)):
        return [as_run(runs)]
    try:
        items = list(runs)
    except TypeError:
        raise TypeError(
            f"runs must be a Run, a path or a sequence of them, got {type(runs).__name__}"
        ) from None
    if not items:
        raise ValueError("runs is empty; give at least one Run")
    return [as_run(item) for item in items]


def run_labels(runs: List[Run], label: Labels) -> List[str]:
    """One legend label per run: the given ones, else the run directories' names (with
    their parent's name where two runs share a name)."""
    if label is None:
        names = [run_name(run) for run in runs]
        if len(set(names)) < len(names):
            names = [f"{run.path.parent.name}/{run.path.name}" for run in runs]
        return names
    if isinstance(label, str):
        label = [label]
    label = [str(item) for item in label]
    if len(label) != len(runs):
        raise ValueError(f"label has {len(label)} entries for {len(runs)} runs; give one per run")
    return label


def run_name(run: Run) -> str:
    """The run directory's name, as figure titles show it."""
    return run.path.name or str(run.path)


def check_xscale(xscale: str) -> None:
    if xscale not in XSCALES:
        raise ValueError(f"xscale must be one of {', '.join(map(repr, XSCALES))}, got {xscale!r}")


def new_axes(ax: Optional[Axes]) -> Axes:
    """``ax`` itself, or the Axes of a new single-panel figure when it is None."""
    if ax is None:
        return Figure(figsize=PANEL_SIZE, layout="constrained").add_subplot()
    if not isinstance(ax, Axes):
        raise TypeError(f"ax must be a matplotlib Axes or None, got {type(ax).__name__}")
    return ax


# --------------------------------------------------------------------------- columns


def series(run: Run, name: str) -> Optional[np.ndarray]:
    """The numeric column ``name`` (float64 (R,)), or None if the run has no finite value."""
    values = run.metrics.get(name)
    if values is None or values.dtype == object or values.ndim != 1:
        return None
    return values if np.isfinite(values).any() else None


def has_any(run: Run, *names: str) -> bool:
    """Whether any of the columns ``names`` has a finite value."""
    return any(series(run, name) is not None for name in names)


def finite_points(
    steps: np.ndarray, values: np.ndarray, xscale: str, positive: bool = False
) -> Tuple[np.ndarray, np.ndarray]:
    """(steps, values) where the value is finite (and > 0 for a log y axis, and the step
    > 0 for a log x axis)."""
    keep = np.isfinite(values)
    if positive:
        keep &= values > 0
    if xscale == "log":
        keep &= steps > 0
    return steps[keep], values[keep]


# --------------------------------------------------------------------------- drawing


def plot_line(ax: Axes, x: np.ndarray, y: np.ndarray, **style) -> None:
    """A line through the points, with markers when there are few enough to see them."""
    marker = "o" if len(x) <= 30 else None
    ax.plot(x, y, marker=marker, markersize=3.5, **style)


def log_scale_if_wide(ax: Axes, drawn: Sequence[np.ndarray]) -> None:
    """A log y axis when the values drawn are all positive and span more than a factor
    of 20 (a loss falling by orders of magnitude); the linear one otherwise."""
    if not drawn:
        return
    values = np.concatenate(drawn)
    if values.min() > 0 and values.max() > 20 * values.min():
        ax.set_yscale("log")


def finish_steps_axis(ax: Axes, xscale: str) -> None:
    """The optimizer-step x axis: ``symlog`` (linear on [0, 1], 1-2-5 ticks on short
    runs), ``log`` or ``linear``, with its label and a faint grid."""
    if xscale == "symlog":
        ax.set_xscale("symlog", linthresh=1.0, linscale=0.5)
        ax.set_xlim(left=0)
        _, right = ax.get_xlim()
        subs = (1.0, 2.0, 5.0) if right <= 2000 else (1.0,)  # 1, 2, 5, 10, 20, ... on short runs
        ax.xaxis.set_major_locator(SymmetricalLogLocator(linthresh=1.0, base=10, subs=subs))
        ax.xaxis.set_major_formatter(FuncFormatter(step_label))
        ax.xaxis.set_minor_locator(NullLocator())
    elif xscale == "log":
        ax.set_xscale("log")
    ax.set_xlabel("optimizer step")
    ax.grid(True, which="major", alpha=0.3)


def step_label(step: float, _position: object = None) -> str:
    """A step tick: plain integers up to 10^4, powers of ten beyond."""
    if step < 1e4:
        return f"{step:.0f}"
    exponent = math.log10(step)
    return f"$10^{{{exponent:.0f}}}$" if exponent.is_integer() else f"{step:.0e}"


def say_missing(ax: Axes, message: str) -> None:
    """Write ``message`` in the middle of a panel that has nothing to draw."""
    ax.text(0.5, 0.5, message, transform=ax.transAxes, ha="center", va="center",
            fontsize=10, color="0.35", wrap=True)


def legend(ax: Axes, **options) -> None:
    """A small legend, when anything drawn has a label."""
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8, **options)


def mark_nonfinite(ax: Axes, run: Run, xscale: str) -> None:
    """A faint red line at each step whose kernel was not finite."""
    finite = run.metrics.get(records.FINITE)
    if finite is None or finite.dtype == object:
        return
    bad = run.steps[finite == 0]
    if xscale == "log":
        bad = bad[bad > 0]
    for index, step in enumerate(bad):
        ax.axvline(step, color="tab:red", alpha=0.35, linewidth=1,
                   label="non-finite kernel" if index == 0 else None)


def subscript(number: int) -> str:
    """``12`` as ``"₁₂"``."""
    return str(number).translate(str.maketrans("0123456789", "₀₁₂₃₄₅₆₇₈₉"))
