"""The figures of a run, named and captioned for reports, and the figures that gather
several panels: one run's overview, several runs' comparison."""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Callable, Collection, List, Optional, Sequence, Tuple, Union

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from .. import records
from ..runs import Run
from ._axes import PANEL_SIZE, Labels, RunLike, as_run, as_runs, has_any, run_labels, run_name, series
from .kernels import kernel_heatmaps
from .predictions import compared_splits, predicted_vs_actual
from .series import (
    DRIFT_LABELS,
    GAP_COLUMNS,
    drift,
    eigenvalue_table,
    eigenvalues,
    layer_groups,
    layer_share,
    linearisation_gap,
    target_alignment,
    velocity,
)

__all__ = ["FIGURES", "FigureSpec", "compare", "figures", "overview"]


@dataclass(frozen=True)
class FigureSpec:
    """One figure ``figures``/``save_all`` can draw: its file stem, a title and a caption
    for reports, whether a run has the data for it, and how to draw it."""

    name: str
    title: str
    caption: str
    available: Callable[[Run], bool]
    draw: Callable[[Run, Optional[Axes]], Union[Axes, Figure]]
    single_axes: bool = True  # drawable into one Axes (so part of ``overview``)


def _has_metric(metric: str) -> Callable[[Run], bool]:
    """Whether a run has any curve ``predicted_vs_actual`` draws for ``metric``."""
    def available(run: Run) -> bool:
        return any(has_any(run, actual, predicted) for _, actual, predicted in compared_splits(run, metric))
    return available


def _has_drift_after_step_zero(run: Run) -> bool:
    later = run.steps > 0
    return any(
        values is not None and np.isfinite(values[later]).any()
        for values in (series(run, column) for column in DRIFT_LABELS)
    )


FIGURES: Tuple[FigureSpec, ...] = (
    FigureSpec(
        "predicted_vs_actual_loss", "Predicted vs actual loss",
        "The network's loss (solid) and the prediction of the network linearised at step 0 "
        "(dashed), one colour per split: train (the probe set when the run has no train "
        "loss) and test. The prediction is drawn at every step up to 1000 and on the log "
        "schedule beyond (the kernel forecast) or at log-spaced steps and the measurements "
        "(the linearised twin); both curves have a marker at each measurement. The x axis "
        "is symmetric-log, linear below step 1. The y axis is logarithmic when the loss "
        "spans more than a factor of 20. Agreement means training stayed in the kernel regime.",
        _has_metric("loss"),
        lambda run, ax: predicted_vs_actual(run, ax, metric="loss"),
    ),
    FigureSpec(
        "predicted_vs_actual_accuracy", "Predicted vs actual accuracy",
        "Accuracy of the network (solid) and of the linearised model (dashed, drawn as in the "
        "loss figure), one colour per split, a marker at each measurement, on a y axis from "
        "0 to 1.",
        _has_metric("accuracy"),
        lambda run, ax: predicted_vs_actual(run, ax, metric="accuracy"),
    ),
    FigureSpec(
        "linearisation_gap", "Linearisation gap",
        "|actual − predicted| loss relative to the initial loss, on the training set "
        "(solid) and the test set (dashed), on a linear y axis.",
        lambda run: has_any(run, *GAP_COLUMNS),
        lambda run, ax: linearisation_gap(run, ax),
    ),
    FigureSpec(
        "drift", "Kernel drift",
        "Relative change (solid) and kernel distance (dashed) of the probe kernel from its "
        "value at step 0, on a log y axis; step 0 itself is zero and not drawn.",
        _has_drift_after_step_zero,
        lambda run, ax: drift(run, ax),
    ),
    FigureSpec(
        "velocity", "Kernel velocity",
        "Kernel distance between consecutive measurements per optimizer step, on a log "
        "y axis.",
        lambda run: has_any(run, records.VELOCITY),
        lambda run, ax: velocity(run, ax),
    ),
    FigureSpec(
        "eigenvalues", "Top kernel eigenvalues",
        "The largest eigenvalues of the probe kernel, λ₁ darkest, on a log y axis; they "
        "set the speeds of the linearised dynamics.",
        lambda run: eigenvalue_table(run) is not None,
        lambda run, ax: eigenvalues(run, ax),
    ),
    FigureSpec(
        "layer_share", "Per-layer share of the kernel",
        "Each parameter group's share of the kernel's trace, stacked so that the bands "
        "sum to 1; beyond 10 groups the smallest are merged into a grey \"other\" band.",
        lambda run: bool(layer_groups(run)),
        lambda run, ax: layer_share(run, ax),
    ),
    FigureSpec(
        "target_alignment", "Kernel-target alignment",
        "Centred alignment of the probe kernel with the probe labels, on a linear y axis; "
        "rising alignment means the kernel is learning the task.",
        lambda run: has_any(run, records.TARGET_ALIGNMENT),
        lambda run, ax: target_alignment(run, ax),
    ),
    FigureSpec(
        "kernel_heatmaps", "Kernel heatmaps",
        "The probe kernel (summed over outputs) at the first and the last saved step, as "
        "the cosine similarity K_ij / √(K_ii K_jj) on one colour scale from −1 to 1; each "
        "panel's title gives the kernel's mean diagonal. Examples are sorted by class when "
        "labels are known.",
        lambda run: len(run.kernel_steps) > 0,
        lambda run, ax: kernel_heatmaps(run),
        single_axes=False,
    ),
)
"""Every per-run figure, in the order reports show them."""


def figures(run: RunLike, skip: Collection[str] = ()) -> List[Tuple[FigureSpec, Figure]]:
    """Draw every figure in ``FIGURES`` that the run's data supports (but those named in
    ``skip``, e.g. figures already drawn elsewhere).

    Returns:
        ``(spec, figure)`` pairs in ``FIGURES`` order; figures without data are left out
        (e.g. no heatmaps when no kernel was kept, no accuracy for a regression task), and
        so is a figure whose data turns out unreadable (a damaged kernel file), with a
        ``RuntimeWarning`` naming it.
    """
    run = as_run(run)
    drawn = []
    for spec in FIGURES:
        if spec.name not in skip and spec.available(run):
            try:
                result = spec.draw(run, None)
            except (ValueError, OSError) as error:  # damaged data: draw the others
                _warn_skipped(run, spec.name, error)
                continue
            drawn.append((spec, result if isinstance(result, Figure) else result.figure))
    return drawn


def _warn_skipped(run: Run, what: str, error: Exception) -> None:
    warnings.warn(f"{run_name(run)}: {what} skipped: {error}", RuntimeWarning, stacklevel=3)


def _panel_grid(count: int, columns: int, width: float) -> Tuple[Figure, List[Axes]]:
    """A figure of ``count`` panels in rows of ``columns``; spare panels are hidden."""
    rows = math.ceil(count / columns)
    figure = Figure(figsize=(width, PANEL_SIZE[1] * rows), layout="constrained")
    axes = list(figure.subplots(rows, columns, squeeze=False).ravel())
    for ax in axes[count:]:
        ax.set_visible(False)
    return figure, axes[:count]


def overview(run: RunLike) -> Figure:
    """One figure with a panel for every single-axes figure the run supports (all of
    ``FIGURES`` but the heatmaps), two per row.

    Raises:
        ValueError: the run has no data for any panel (e.g. no records).
    """
    run = as_run(run)
    specs = [spec for spec in FIGURES if spec.single_axes and spec.available(run)]
    if not specs:
        raise ValueError(f"{run.path} has nothing to plot ({len(run)} records)")
    columns = 2 if len(specs) > 1 else 1
    figure, axes = _panel_grid(len(specs), columns, PANEL_SIZE[0] * columns + 1.5)
    for spec, ax in zip(specs, axes):
        spec.draw(run, ax)
    status = f", {run.status}" if run.status else ""
    figure.suptitle(f"{run_name(run)}: {len(run)} measurements{status}", fontsize=13)
    return figure


def compare(runs: Sequence[RunLike], labels: Labels = None, *, xscale: str = "symlog") -> Figure:
    """Several runs overlaid (one colour each) in one figure: kernel drift, velocity,
    target alignment and, when any run has predictions, the linearisation gap.

    Args:
        runs: the runs (or paths) to compare, at least one.
        labels: one legend label per run; default: the run directories' names.
        xscale: as for ``drift``.
    """
    runs = as_runs(runs)
    names = run_labels(runs, labels)
    panels: List[Callable[..., Axes]] = [drift, velocity, target_alignment]
    if any(has_any(run, *GAP_COLUMNS) for run in runs):
        panels.append(linearisation_gap)
    figure, axes = _panel_grid(len(panels), 2, PANEL_SIZE[0] * 2)
    for panel, ax in zip(panels, axes):
        panel(runs, ax, label=names, xscale=xscale)
    figure.suptitle(f"Comparison of {len(runs)} runs", fontsize=13)
    return figure
