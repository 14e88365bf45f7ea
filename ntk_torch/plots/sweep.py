"""Width sweeps: kernel change and linearisation gap against width, with power-law fits."""

from __future__ import annotations

import math
from typing import Iterable, NamedTuple, Optional, Sequence, Tuple

import numpy as np
from matplotlib.axes import Axes

from ._axes import legend, new_axes, say_missing

__all__ = ["FIT_STYLE", "PowerLawFit", "REFERENCE_STYLE", "fit_loglog_slope", "width_sweep"]

FIT_STYLE = ":"
"""The line style of a fitted power law."""
REFERENCE_STYLE = "--"
"""The line style of the grey reference slope."""

_CURVES = (
    # (column of a result, legend name, colour, marker)
    (1, "relative change ‖K − K₀‖/‖K₀‖", "C0", "o"),
    (2, "linearisation gap", "C3", "s"),
    (3, "distance of K₀ from the infinite-width NTK", "C2", "^"),
)


class PowerLawFit(NamedTuple):
    """``y ≈ coefficient * x ** slope``, fitted by least squares on log y against log x."""

    slope: float
    coefficient: float


def fit_loglog_slope(x: Iterable[float], y: Iterable[float]) -> PowerLawFit:
    """Fit a power law ``y = c x^s`` by a straight line through (log x, log y).

    Args:
        x, y: positive finite numbers, the same count (>= 2), with at least two distinct
            ``x``.

    Returns:
        ``PowerLawFit(slope=s, coefficient=c)``; exact for an exact power law.

    Raises:
        ValueError: mismatched lengths, fewer than two points, non-positive or
            non-finite values, or all ``x`` equal.
    """
    x = np.asarray(list(x), dtype=np.float64)
    y = np.asarray(list(y), dtype=np.float64)
    if x.ndim != 1 or y.ndim != 1 or len(x) != len(y):
        raise ValueError(f"x and y must be 1-D and of the same length, got shapes {x.shape} and {y.shape}")
    if len(x) < 2:
        raise ValueError(f"a slope needs at least 2 points, got {len(x)}")
    for name, values in (("x", x), ("y", y)):
        if not (np.isfinite(values).all() and (values > 0).all()):
            raise ValueError(f"{name} must be positive and finite for a log-log fit, got {values.tolist()}")
    if np.all(x == x[0]):
        raise ValueError(f"x must hold at least two distinct values, got {x.tolist()}")
    slope, intercept = np.polyfit(np.log(x), np.log(y), 1)
    return PowerLawFit(float(slope), float(math.exp(intercept)))


def width_sweep(
    results: Iterable[Sequence[Optional[float]]],
    ax: Optional[Axes] = None,
    *,
    reference_slope: Optional[float] = -0.5,
) -> Axes:
    """The lazy-regime picture: kernel change and linearisation gap against width.

    Both are drawn against width on log-log axes with a fitted power law (dotted, the
    slope in the legend; ``fit_loglog_slope``). Lee et al. 2019 predict the kernel's
    relative change to shrink as ``width^(−1/2)``; a grey dashed guide of
    ``reference_slope`` through the first point is drawn for comparison.

    Args:
        results: ``(width, relative_change, linearisation_gap)`` per trained width (e.g.
            the final record of each run), optionally with a fourth value, the distance
            of the kernel at step 0 from the infinite-width NTK (``analytic_distance``);
            a ``None``/NaN or non-positive value leaves that point out of its curve (a run
            without predictions has no gap).
        ax: the Axes to draw into; None creates a figure.
        reference_slope: slope of the guide line; None for no guide.

    Returns:
        The Axes.
    """
    table = _sweep_table(results)
    ax = new_axes(ax)
    first_point = None
    for column, name, colour, marker in _CURVES:
        keep = np.isfinite(table[:, 0]) & np.isfinite(table[:, column]) & (table[:, 0] > 0) & (table[:, column] > 0)
        widths, values = table[keep, 0], table[keep, column]
        if len(widths):
            _draw_with_fit(ax, widths, values, name, colour, marker)
            if first_point is None:
                first_point = (widths[0], values[0])
    if first_point is None:
        say_missing(ax, "no positive results to draw")
    else:
        ax.set_xscale("log")
        ax.set_yscale("log")
        if reference_slope is not None:
            x0, y0 = first_point
            grid = np.geomspace(np.nanmin(table[:, 0]), np.nanmax(table[:, 0]), 50)
            ax.plot(grid, y0 * (grid / x0) ** reference_slope, color="0.55", linestyle=REFERENCE_STYLE,
                    linewidth=1, label=f"∝ width$^{{{reference_slope:g}}}$ (Lee et al. 2019)")
    ax.set_xlabel("width (hidden units per layer)")
    with_k0 = bool(np.isfinite(table[:, 3]).any())
    ax.set_ylabel("at the end of training" + ("; K₀ at initialisation" if with_k0 else "") + " (dimensionless)")
    ax.set_title("Lazy regime: kernel change vs width", fontsize=11)
    ax.grid(True, which="both", alpha=0.3)
    legend(ax)
    return ax


def _sweep_table(results: Iterable[Sequence[Optional[float]]]) -> np.ndarray:
    """The results as float64 (W, 3), None as NaN, sorted by width (stable)."""
    rows: Tuple[tuple, ...] = tuple(tuple(row) for row in results)
    if not rows:
        raise ValueError("results is empty; give (width, relative_change, linearisation_gap) per width")
    for row in rows:
        if len(row) not in (3, 4):
            raise ValueError("each result must be (width, relative_change, linearisation_gap[, analytic_distance]), "
                             f"got {row!r}")
    table = np.array([[math.nan if v is None else float(v) for v in (*row, None)[:4]] for row in rows])
    return table[np.argsort(table[:, 0], kind="stable")]


def _draw_with_fit(ax: Axes, widths: np.ndarray, values: np.ndarray, name: str, colour: str, marker: str) -> None:
    """One curve against width and, given two distinct widths, its fitted power law
    (dotted), the slope in its legend label."""
    label = name
    if len(np.unique(widths)) >= 2:
        fit = fit_loglog_slope(widths, values)
        label = f"{name} (slope {fit.slope:+.2f})"
        grid = np.geomspace(widths.min(), widths.max(), 50)
        ax.plot(grid, fit.coefficient * grid ** fit.slope, color=colour, linestyle=FIT_STYLE, linewidth=1)
    ax.plot(widths, values, color=colour, marker=marker, linestyle="-", label=label)
