"""The forecast against the network: predicted (dashed) and actual (solid) loss and
accuracy per split, and the forecast made before training.

The network is known at the measurements only; its curve has a marker at each, so that
what lies between is visibly drawn, not measured. The forecast is drawn from the run's
dense forecast when it has one (``Run.dense_forecast``: the kernel forecast at every step
up to 1000 and on the log schedule beyond, the twin's at log-spaced steps and the
measurements), with markers at the measurements, so that its early steps are not
interpolated either."""

from __future__ import annotations

import math
import textwrap
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from .. import records
from ..runs import Run
from ._axes import (
    PANEL_SIZE,
    RunLike,
    as_run,
    check_xscale,
    finish_steps_axis,
    finite_points,
    has_any,
    legend,
    log_scale_if_wide,
    new_axes,
    plot_line,
    run_name,
    say_missing,
    series,
)

__all__ = [
    "ACTUAL_STYLE",
    "PREDICTED_STYLE",
    "compared_splits",
    "describe_prediction",
    "forecast_figure",
    "predicted_vs_actual",
]

ACTUAL_STYLE = "-"
"""The line style of the network's own curves."""
PREDICTED_STYLE = "--"
"""The line style of the forecast's curves."""
MARKER = "o"
"""The marker at each measurement, on the network's and the forecast's curves."""
MARKER_SIZE = 3.5


def predicted_vs_actual(
    run: RunLike, ax: Optional[Axes] = None, *, metric: str = "loss", xscale: str = "symlog"
) -> Axes:
    """The forecast's training curve against the network's real one.

    For each split (train, test; one colour each) the actual ``metric`` of the network
    (solid, a marker at each measurement) and the prediction of the network linearised
    at step 0 (dashed; the kernel forecast or the linearised twin, see
    ``ntk_torch.forecasting``), drawn from the run's dense forecast when it has one, with
    markers at the measurements. Where the two agree, the network trained in the kernel
    regime. A run without predictions shows the actual curves only, and the title says so;
    a run without a ``train_*`` column shows the probe set's (a subset of the training
    data) instead. Loss is drawn on a log y axis when all values are positive and span
    more than a factor of 20, accuracy on [0, 1].

    Args:
        run: a ``Run`` or path.
        ax: the Axes to draw into; None creates a figure.
        metric: ``"loss"`` or ``"accuracy"``.
        xscale: ``"symlog"`` (default), ``"linear"`` or ``"log"``.
    """
    if metric not in records.METRICS:
        raise ValueError(f"metric must be 'loss' or 'accuracy', got {metric!r}")
    check_xscale(xscale)
    run = as_run(run)
    ax = new_axes(ax)
    drawn, predicted_any = _draw_splits(ax, run, metric, xscale)
    if not drawn:
        say_missing(ax, f"no {metric} recorded")
    elif metric == "loss":
        log_scale_if_wide(ax, drawn)
    else:
        ax.set_ylim(-0.02, 1.02)
    finish_steps_axis(ax, xscale)
    ax.set_ylabel(metric if metric == "accuracy" else "loss (as trained: mean over examples)")
    if predicted_any:
        title = f"Predicted (dashed) vs actual (solid) {metric}"
        detail = describe_prediction(run.meta.get("prediction"))
    else:
        title = f"Actual {metric} only"
        detail = "no kernel prediction recorded in this run"
    detail = "\n".join(textwrap.wrap(detail, width=70))
    ax.set_title(f"{title} — {run_name(run)}\n{detail}", fontsize=10)
    legend(ax)
    return ax


def compared_splits(run: Run, metric: str) -> List[Tuple[str, str, str]]:
    """``(legend name, actual column, predicted column)`` per forecast split: train and
    test, the probe's actual column standing in for a run without a train one (it is a
    subset of the training data)."""
    splits = [(split, records.actual(split, metric), records.predicted(split, metric))
              for split in records.FORECAST_SPLITS]
    probe = records.actual(records.PROBE, metric)
    if not has_any(run, splits[0][1]) and has_any(run, probe):
        splits[0] = (records.PROBE, probe, splits[0][2])
    return splits


def _draw_splits(ax: Axes, run: Run, metric: str, xscale: str) -> Tuple[List[np.ndarray], bool]:
    """The actual and predicted curves of each split, one colour per split; the values
    drawn and whether any prediction was among them."""
    drawn: List[np.ndarray] = []
    predicted_any = False
    dense = run.dense_forecast
    for index, (split, actual, predicted) in enumerate(compared_splits(run, metric)):
        for column, style, kind in ((actual, ACTUAL_STYLE, "actual"), (predicted, PREDICTED_STYLE, "predicted")):
            values = series(run, column)
            if values is None:
                continue
            measured_x, measured_y = finite_points(run.steps, values, xscale)
            x, y = measured_x, measured_y
            if kind == "predicted" and dense is not None and column in dense.columns:
                x, y = finite_points(dense.steps, dense.columns[column], xscale)
            if not len(x):
                continue
            ax.plot(x, y, color=f"C{index}", linestyle=style, label=f"{split} ({kind})", marker=MARKER,
                    markersize=MARKER_SIZE, markevery=np.flatnonzero(np.isin(x, measured_x)).tolist())
            drawn.append(y)
            predicted_any |= kind == "predicted"
    return drawn, predicted_any


def forecast_figure(
    steps: Sequence[int], rows: Sequence[Dict[str, Optional[float]]], *, title: str = "Predicted before training"
) -> Figure:
    """The curves the kernel at initialisation predicts, before any training
    (``ntk-torch predict``): predicted train and test loss (dashed, as in
    ``predicted_vs_actual``) and, when the rows have them, accuracies in a second panel.

    Args:
        steps: the optimizer steps.
        rows: one dict per step with ``predicted_train_loss``, ``predicted_test_loss`` and
            optionally ``predicted_train_accuracy`` / ``predicted_test_accuracy``.
        title: the figure's title.
    """
    has_accuracy = any(r.get(records.predicted(records.TRAIN, "accuracy")) is not None for r in rows)
    metrics = ["loss"] + (["accuracy"] if has_accuracy else [])
    figure = Figure(figsize=(PANEL_SIZE[0] * len(metrics), PANEL_SIZE[1]), layout="constrained")
    axes = figure.subplots(1, len(metrics), squeeze=False).ravel()
    x = np.asarray(steps, dtype=float)
    for ax, metric in zip(axes, metrics):
        drawn = []
        for index, split in enumerate(records.FORECAST_SPLITS):
            values = np.array([_or_nan(r.get(records.predicted(split, metric))) for r in rows])
            keep = np.isfinite(values)
            if keep.any():
                plot_line(ax, x[keep], values[keep], color=f"C{index}", linestyle=PREDICTED_STYLE,
                          label=f"{split} (predicted)")
                drawn.append(values[keep])
        if metric == "loss":
            log_scale_if_wide(ax, drawn)
        ax.set_ylabel(metric)
        finish_steps_axis(ax, "symlog")
        legend(ax)
    figure.suptitle(title, fontsize=13)
    return figure


def _or_nan(value: Optional[float]) -> float:
    return math.nan if value is None else float(value)


def describe_prediction(prediction: object) -> str:
    """One line on how a run's prediction was made, from ``meta["prediction"]``
    (``{"kind", "points", "kernel_mode", "optimizer", "batches", "lr", "momentum",
    "approximate", ...}``; any missing)."""
    parts = ["linearised model from the step-0 kernel"]
    if isinstance(prediction, dict):
        if prediction.get("kind") == "twin":
            batches = "observed minibatches" if prediction.get("batches") == "minibatch" else "full batch"
            parts = [f"linearised twin trained with {prediction.get('optimizer', 'the optimizer')} on {batches}"]
        if prediction.get("points") is not None:
            parts.append(f"{prediction['points']} training points")
        if prediction.get("kernel_mode"):
            parts.append(f"{prediction['kernel_mode']} kernel")
        twin = prediction.get("kind") == "twin"
        for key in ("lr", "momentum", "clip_grad_norm", "clip_grad_value"):
            value = prediction.get(key)
            if isinstance(value, (int, float)) and (key == "lr" or value):
                parts.append(f"{'initial lr' if twin and key == 'lr' else key} {value:g}")
        if prediction.get("approximate"):
            parts.append("approximate")
    return ", ".join(parts)
