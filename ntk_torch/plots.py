"""Figures of a run directory: kernel drift, spectrum, layer shares, predicted vs actual.

Every function reads a ``Run`` (or a run directory's path) and draws with matplotlib's
object-oriented API, never pyplot's global state: pass an ``Axes`` to draw into a figure
of your own, or leave ``ax=None`` and a new ``matplotlib.figure.Figure`` is created (it
needs no GUI backend and is freed like any Python object)::

    run = ntk.load_run("runs/exp")
    ax = plots.drift(run)                      # a new figure: ax.figure
    plots.drift([run_a, run_b], ax=my_ax)      # overlay two runs
    plots.save_all(run, "runs/exp/figures")    # every figure the run's data supports

Conventions shared by the time-series figures:

* x is the optimizer step, on a ``symlog`` axis by default (``xscale="symlog"``): linear
  on [0, 1] and logarithmic beyond, so step 0 (the reference kernel) sits at the left
  edge and the early steps, where the kernel moves most, are not crushed together. Pass
  ``xscale="linear"``, or ``"log"`` (which leaves step 0 out: log 0 is undefined).
* A measurement whose value is missing (an older run, a non-finite kernel, a metric
  undefined at that step) is skipped and the line joins its neighbours; a panel whose
  data is missing altogether says so in its title instead of raising.
* Several runs are told apart by colour (``C0``, ``C1``, ...); several quantities of one
  run by line style.
"""

from __future__ import annotations

import math
import os
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Iterable, List, NamedTuple, Optional, Sequence, Tuple, Union

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, NullLocator, SymmetricalLogLocator

from .runs import Run, load_run

__all__ = [
    "FIGURES",
    "FigureSpec",
    "PowerLawFit",
    "class_order",
    "compare",
    "describe_prediction",
    "display_kernel",
    "drift",
    "eigenvalues",
    "figures",
    "fit_loglog_slope",
    "forecast_figure",
    "kernel_cosine",
    "kernel_heatmaps",
    "layer_share",
    "linearisation_gap",
    "overview",
    "predicted_vs_actual",
    "save_all",
    "save_figure",
    "target_alignment",
    "velocity",
    "width_sweep",
]

PathLike = Union[str, "os.PathLike[str]"]
RunLike = Union[Run, PathLike]
RunsLike = Union[RunLike, Sequence[RunLike]]
Labels = Union[None, str, Sequence[str]]

XSCALES = ("symlog", "linear", "log")
PANEL_SIZE = (6.4, 4.2)
"""Width and height in inches of a single-panel figure (and of each overview panel)."""
PNG_DPI = 120

_DRIFT_LABELS = {
    "relative_change": r"relative change $\|K - K_0\|_F\, /\, \|K_0\|_F$",
    "kernel_distance": r"kernel distance $1 - \langle K, K_0 \rangle_F\, /\, (\|K\|_F \|K_0\|_F)$",
}
_LINESTYLES = ("-", "--", ":", "-.")


# --------------------------------------------------------------------------- inputs


def _as_run(run: RunLike) -> Run:
    if isinstance(run, Run):
        return run
    if isinstance(run, (str, os.PathLike)):
        return load_run(run)
    raise TypeError(f"run must be a Run or a run directory's path, got {type(run).__name__}")


def _as_runs(runs: RunsLike) -> List[Run]:
    """One run or a sequence of runs (or paths) as a non-empty list of ``Run``."""
    if isinstance(runs, (Run, str, os.PathLike)):
        return [_as_run(runs)]
    try:
        items = list(runs)
    except TypeError:
        raise TypeError(
            f"runs must be a Run, a path or a sequence of them, got {type(runs).__name__}"
        ) from None
    if not items:
        raise ValueError("runs is empty; give at least one Run")
    return [_as_run(item) for item in items]


def _labels(runs: List[Run], label: Labels) -> List[str]:
    """One legend label per run: the given ones, else the run directories' names (with
    their parent's name where two runs share a name)."""
    if label is None:
        names = [run.path.name or str(run.path) for run in runs]
        if len(set(names)) < len(names):
            names = [f"{run.path.parent.name}/{run.path.name}" for run in runs]
        return names
    if isinstance(label, str):
        label = [label]
    label = [str(item) for item in label]
    if len(label) != len(runs):
        raise ValueError(f"label has {len(label)} entries for {len(runs)} runs; give one per run")
    return label


def _check_xscale(xscale: str) -> None:
    if xscale not in XSCALES:
        raise ValueError(f"xscale must be one of {', '.join(map(repr, XSCALES))}, got {xscale!r}")


def _new_axes(ax: Optional[Axes]) -> Axes:
    if ax is None:
        return Figure(figsize=PANEL_SIZE, layout="constrained").add_subplot()
    if not isinstance(ax, Axes):
        raise TypeError(f"ax must be a matplotlib Axes or None, got {type(ax).__name__}")
    return ax


def _series(run: Run, name: str) -> Optional[np.ndarray]:
    """The numeric column ``name`` (float64 (R,)), or None if the run has no finite value."""
    values = run.metrics.get(name)
    if values is None or values.dtype == object or values.ndim != 1:
        return None
    return values if np.isfinite(values).any() else None


def _has(run: Run, *names: str) -> bool:
    return any(_series(run, name) is not None for name in names)


def _finite_points(
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


def _plot_line(ax: Axes, x: np.ndarray, y: np.ndarray, **style) -> None:
    """A line through the points, with markers when there are few enough to see them."""
    marker = "o" if len(x) <= 30 else None
    ax.plot(x, y, marker=marker, markersize=3.5, **style)


def _finish_steps_axis(ax: Axes, xscale: str) -> None:
    if xscale == "symlog":
        ax.set_xscale("symlog", linthresh=1.0, linscale=0.5)
        ax.set_xlim(left=0)
        _, right = ax.get_xlim()
        subs = (1.0, 2.0, 5.0) if right <= 2000 else (1.0,)  # 1, 2, 5, 10, 20, ... on short runs
        ax.xaxis.set_major_locator(SymmetricalLogLocator(linthresh=1.0, base=10, subs=subs))
        ax.xaxis.set_major_formatter(FuncFormatter(_step_label))
        ax.xaxis.set_minor_locator(NullLocator())
    elif xscale == "log":
        ax.set_xscale("log")
    ax.set_xlabel("optimizer step")
    ax.grid(True, which="major", alpha=0.3)


def _step_label(step: float, _position: object = None) -> str:
    """A step tick: plain integers up to 10^4, powers of ten beyond."""
    if step < 1e4:
        return f"{step:.0f}"
    exponent = math.log10(step)
    return f"$10^{{{exponent:.0f}}}$" if exponent.is_integer() else f"{step:.0e}"


def _say_missing(ax: Axes, message: str) -> None:
    ax.text(0.5, 0.5, message, transform=ax.transAxes, ha="center", va="center",
            fontsize=10, color="0.35", wrap=True)


def _legend(ax: Axes, **options) -> None:
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8, **options)


def _mark_nonfinite(ax: Axes, run: Run, xscale: str) -> None:
    """A faint red line at each step whose kernel was not finite."""
    finite = run.metrics.get("finite")
    if finite is None or finite.dtype == object:
        return
    bad = run.steps[finite == 0]
    if xscale == "log":
        bad = bad[bad > 0]
    for index, step in enumerate(bad):
        ax.axvline(step, color="tab:red", alpha=0.35, linewidth=1,
                   label="non-finite kernel" if index == 0 else None)


def _overlay(
    runs: RunsLike,
    ax: Optional[Axes],
    label: Labels,
    columns: Sequence[str],
    column_labels: Dict[str, str],
    *,
    xscale: str,
    log_y: bool,
    ylabel: str,
    title: str,
    empty: str,
) -> Axes:
    """Draw ``columns`` of each run over steps: colour per run, line style per column."""
    _check_xscale(xscale)
    runs = _as_runs(runs)
    names = _labels(runs, label)
    ax = _new_axes(ax)
    drawn = False
    for index, (run, name) in enumerate(zip(runs, names)):
        for style, column in zip(_LINESTYLES, columns):
            values = _series(run, column)
            if values is None:
                continue
            x, y = _finite_points(run.steps, values, xscale, positive=log_y)
            if not len(x):
                continue
            parts = ([name] if len(runs) > 1 else []) + ([column_labels[column]] if len(columns) > 1 else [])
            _plot_line(ax, x, y, color=f"C{index}", linestyle=style, label=": ".join(parts) or None)
            drawn = True
        if len(runs) == 1:
            _mark_nonfinite(ax, run, xscale)
    if drawn and log_y:
        ax.set_yscale("log")
    if not drawn:
        _say_missing(ax, empty)
    _finish_steps_axis(ax, xscale)
    ax.set_ylabel(ylabel)
    ax.set_title(title if len(runs) > 1 else f"{title} — {names[0]}", fontsize=11)
    _legend(ax)
    return ax


# --------------------------------------------------------------------------- kernel drift


def drift(
    runs: RunsLike,
    ax: Optional[Axes] = None,
    *,
    label: Labels = None,
    metrics: Sequence[str] = ("relative_change", "kernel_distance"),
    xscale: str = "symlog",
) -> Axes:
    """How far the probe kernel has moved from its value at step 0, over training.

    Draws, for each run, the relative change ``‖K_t − K₀‖_F / ‖K₀‖_F`` (solid) and the
    kernel distance ``1 − ⟨K_t, K₀⟩_F / (‖K_t‖_F ‖K₀‖_F)`` (Fort et al. 2020; dashed) on a
    log y axis. Both are zero at step 0 by definition, and zero has no place on a log axis,
    so the step-0 point is not drawn: on the default symlog x axis (see the module notes)
    the lines start at the first measurement after step 0. Small drift (the lazy,
    kernel regime) reads as orders of magnitude below 1. Steps with a non-finite kernel
    are marked by a red vertical line (single run).

    Args:
        runs: a ``Run`` (or path), or several to overlay (one colour each).
        ax: the Axes to draw into; None creates a figure.
        label: legend label(s), one per run; default: the run directories' names.
        metrics: which of ``"relative_change"`` and ``"kernel_distance"`` to draw.
        xscale: ``"symlog"`` (default), ``"linear"`` or ``"log"``.

    Returns:
        The Axes (``ax.figure`` is its figure).
    """
    metrics = tuple(metrics)
    unknown = [m for m in metrics if m not in _DRIFT_LABELS]
    if unknown or not metrics:
        raise ValueError(
            f"metrics must be a non-empty selection of {', '.join(map(repr, _DRIFT_LABELS))}, got {list(metrics)}"
        )
    return _overlay(
        runs, ax, label, metrics, _DRIFT_LABELS,
        xscale=xscale, log_y=True,
        ylabel="drift from step 0 (dimensionless)",
        title="Kernel drift",
        empty="no kernel drift measured after step 0",
    )


def velocity(
    runs: RunsLike, ax: Optional[Axes] = None, *, label: Labels = None, xscale: str = "symlog"
) -> Axes:
    """Kernel velocity: the kernel distance between consecutive measurements divided by
    the optimizer steps between them (Fort et al. 2020), on a log y axis.

    Fast early motion that slows by orders of magnitude is the usual picture of a network
    leaving its initial kernel and settling. Step 0 has no previous kernel, hence no
    velocity. Args and return value as for ``drift``.
    """
    return _overlay(
        runs, ax, label, ("velocity",), {"velocity": "velocity"},
        xscale=xscale, log_y=True,
        ylabel="kernel distance per optimizer step",
        title="Kernel velocity",
        empty="no kernel velocity recorded",
    )


def target_alignment(
    runs: RunsLike, ax: Optional[Axes] = None, *, label: Labels = None, xscale: str = "symlog"
) -> Axes:
    """Centred kernel-target alignment of the probe kernel with the probe labels
    (Cristianini et al. 2002): ``⟨K_c, Y Yᵀ⟩_F / (‖K_c‖_F ‖Y Yᵀ‖_F)``, in [−1, 1] on a
    linear y axis. Rising alignment means the kernel is learning the task's similarity
    structure (feature learning). Args and return value as for ``drift``.
    """
    return _overlay(
        runs, ax, label, ("target_alignment",), {"target_alignment": "target alignment"},
        xscale=xscale, log_y=False,
        ylabel="centred kernel-target alignment",
        title="Kernel-target alignment",
        empty="no target alignment recorded",
    )


def linearisation_gap(
    runs: RunsLike, ax: Optional[Axes] = None, *, label: Labels = None, xscale: str = "symlog"
) -> Axes:
    """How far the kernel (linearised) model's predicted training loss is from the real
    one: ``|train_loss − predicted_train_loss| / train_loss at step 0`` (solid), and the
    same on the test set when recorded (``test_linearisation_gap``, dashed); linear y.

    Near zero throughout in the lazy regime; growing when the network learns features the
    step-0 kernel does not have. Args and return value as for ``drift``.
    """
    return _overlay(
        runs, ax, label, ("linearisation_gap", "test_linearisation_gap"),
        {"linearisation_gap": "train", "test_linearisation_gap": "test"},
        xscale=xscale, log_y=False,
        ylabel="|actual − predicted| loss / initial loss",
        title="Linearisation gap",
        empty="no kernel prediction recorded in this run",
    )


# --------------------------------------------------------------------------- spectrum, layers


def eigenvalues(
    run: RunLike, ax: Optional[Axes] = None, *, k: Optional[int] = None, xscale: str = "symlog"
) -> Axes:
    """The largest eigenvalues of the probe kernel over training, one line each, log y.

    The kernel here is the (N, N) matrix the record was computed from (in ``full`` and
    ``diagonal`` mode the spectrum of the flattened (N·O, N·O) kernel); its eigenvalues
    set the speeds of the linearised dynamics: the residual along eigenvector i decays as
    ``(1 − 2 lr λᵢ / (N O))^t`` under MSE. Colour runs from dark (largest, λ₁) to light.

    Args:
        run: a ``Run`` or path.
        ax: the Axes to draw into; None creates a figure.
        k: draw the top ``k`` (default: all recorded, up to 10).
        xscale: ``"symlog"`` (default), ``"linear"`` or ``"log"``.
    """
    _check_xscale(xscale)
    run = _as_run(run)
    ax = _new_axes(ax)
    table = run.metrics.get("top_eigenvalues")
    if table is None or table.ndim != 2 or not np.isfinite(table).any():
        _say_missing(ax, "no eigenvalues recorded")
        table = np.empty((len(run.steps), 0))
    count = table.shape[1] if k is None else min(int(k), table.shape[1])
    colours = _colormap("viridis")(np.linspace(0.0, 0.85, max(count, 1)))
    for i in range(count):
        x, y = _finite_points(run.steps, table[:, i], xscale, positive=True)
        if len(x):
            _plot_line(ax, x, y, color=colours[i], label=f"λ{_subscript(i + 1)}")
    if ax.get_lines():
        ax.set_yscale("log")
    _finish_steps_axis(ax, xscale)
    ax.set_ylabel("eigenvalue of the probe kernel")
    ax.set_title(f"Top kernel eigenvalues — {_name(run)}", fontsize=11)
    _legend(ax, ncol=2 if count > 5 else 1)
    return ax


def layer_share(
    run: RunLike, ax: Optional[Axes] = None, *, max_groups: int = 10, xscale: str = "symlog"
) -> Axes:
    """Each parameter group's share of the kernel's trace, as stacked areas summing to 1.

    ``trace(K_group) / trace(K)``: which layers' parameters the kernel (and so gradient
    descent in function space) is made of, and how that moves in training. Groups are
    stacked in network order; beyond ``max_groups``, the groups with the smallest mean
    share are merged into one grey "other" band. Measurements without shares (a
    non-finite kernel) are left out.

    Args:
        run: a ``Run`` or path.
        ax: the Axes to draw into; None creates a figure.
        max_groups: the most bands drawn, "other" included (>= 2).
        xscale: ``"symlog"`` (default), ``"linear"`` or ``"log"``.
    """
    _check_xscale(xscale)
    if isinstance(max_groups, bool) or not isinstance(max_groups, int) or max_groups < 2:
        raise ValueError(f"max_groups must be an int >= 2, got {max_groups!r}")
    run = _as_run(run)
    own_figure = ax is None
    ax = _new_axes(ax)
    groups = _layer_groups(run)
    if not groups:
        _say_missing(ax, "no per-layer shares recorded")
    else:
        table = np.column_stack(list(groups.values()))  # (R, G)
        keep = np.isfinite(table).any(axis=1)
        if xscale == "log":
            keep &= run.steps > 0
        steps, table = run.steps[keep], np.nan_to_num(table[keep])
        names = list(groups)
        if len(names) > max_groups:
            ranked = np.argsort(-table.mean(axis=0), kind="stable")
            kept = np.sort(ranked[: max_groups - 1])
            other = table[:, np.sort(ranked[max_groups - 1:])].sum(axis=1)
            table = np.column_stack([table[:, kept], other])
            names = [names[i] for i in kept] + [f"other ({len(groups) - len(kept)} groups)"]
        colours = [f"C{i % 10}" for i in range(len(names))]
        if names[-1].startswith("other ("):
            colours[-1] = "0.7"
        ax.stackplot(steps, table.T, labels=names, colors=colours, alpha=0.85)
        ax.set_ylim(0, max(1.0, float(table.sum(axis=1).max())))
        if len(steps) > 1:
            ax.set_xlim(steps.min(), steps.max())
    _finish_steps_axis(ax, xscale)
    ax.set_ylabel("share of trace(K)")
    ax.set_title(f"Per-layer share of the kernel — {_name(run)}", fontsize=11)
    if own_figure:  # room to spare beside the axes
        _legend(ax, loc="center left", bbox_to_anchor=(1.01, 0.5), title="parameter group")
    else:  # inside, so that a grid of panels keeps equal widths
        _legend(ax, loc="lower right", framealpha=0.85, title="parameter group")
    return ax


def _layer_groups(run: Run) -> Dict[str, np.ndarray]:
    """Parameter group -> its share column, in the order the records list them."""
    prefix = "layer_share."
    groups = {}
    for name, values in run.metrics.items():
        if name.startswith(prefix) and values.dtype != object and values.ndim == 1 and np.isfinite(values).any():
            groups[name[len(prefix):]] = values
    return groups


# --------------------------------------------------------------------------- predictions

_SPLITS = (
    # (legend name, actual column, predicted column); probe only when train is absent
    ("train", "train_{}", "predicted_train_{}"),
    ("test", "test_{}", "predicted_test_{}"),
)


def predicted_vs_actual(
    run: RunLike, ax: Optional[Axes] = None, *, metric: str = "loss", xscale: str = "symlog"
) -> Axes:
    """The kernel model's predicted training curve against the network's real one.

    For each split (train, test; one colour each) the actual ``metric`` of the network
    (solid) and the prediction of the linearised model, computed from the kernel at
    step 0 (dashed; see ``ntk_torch.predict``). Where the two agree, the network trained
    in the kernel regime. A run without predictions shows the actual curves only, and the
    title says so; a run without a ``train_*`` column shows the probe set's (a subset of
    the training data) instead. Loss is drawn on a log y axis when all values are positive
    and span more than a factor of 20, accuracy on [0, 1].

    Args:
        run: a ``Run`` or path.
        ax: the Axes to draw into; None creates a figure.
        metric: ``"loss"`` or ``"accuracy"``.
        xscale: ``"symlog"`` (default), ``"linear"`` or ``"log"``.
    """
    if metric not in ("loss", "accuracy"):
        raise ValueError(f"metric must be 'loss' or 'accuracy', got {metric!r}")
    _check_xscale(xscale)
    run = _as_run(run)
    ax = _new_axes(ax)
    splits = [(name, actual.format(metric), predicted.format(metric)) for name, actual, predicted in _SPLITS]
    if not _has(run, splits[0][1]) and _has(run, f"probe_{metric}"):
        splits[0] = ("probe", f"probe_{metric}", splits[0][2])
    drawn: List[np.ndarray] = []
    predicted_any = False
    for index, (split, actual, predicted) in enumerate(splits):
        for column, style, kind in ((actual, "-", "actual"), (predicted, "--", "predicted")):
            values = _series(run, column)
            if values is None:
                continue
            x, y = _finite_points(run.steps, values, xscale)
            if len(x):
                _plot_line(ax, x, y, color=f"C{index}", linestyle=style, label=f"{split} ({kind})")
                drawn.append(y)
                predicted_any |= kind == "predicted"
    if not drawn:
        _say_missing(ax, f"no {metric} recorded")
    elif metric == "loss":
        values = np.concatenate(drawn)
        if values.min() > 0 and values.max() / values.min() > 20:
            ax.set_yscale("log")
    else:
        ax.set_ylim(-0.02, 1.02)
    _finish_steps_axis(ax, xscale)
    ax.set_ylabel(metric if metric == "accuracy" else "loss (as trained: mean over examples)")
    if predicted_any:
        title = f"Predicted (dashed) vs actual (solid) {metric}"
        detail = describe_prediction(run.meta.get("prediction"))
    else:
        title = f"Actual {metric} only"
        detail = "no kernel prediction recorded in this run"
    detail = "\n".join(textwrap.wrap(detail, width=70))
    ax.set_title(f"{title} — {_name(run)}\n{detail}", fontsize=10)
    _legend(ax)
    return ax


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
    metrics = ["loss"] + (["accuracy"] if any(r.get("predicted_train_accuracy") is not None for r in rows) else [])
    figure = Figure(figsize=(PANEL_SIZE[0] * len(metrics), PANEL_SIZE[1]), layout="constrained")
    axes = figure.subplots(1, len(metrics), squeeze=False).ravel()
    x = np.asarray(steps, dtype=float)
    for ax, metric in zip(axes, metrics):
        drawn = []
        for index, split in enumerate(("train", "test")):
            values = np.array([_or_nan(r.get(f"predicted_{split}_{metric}")) for r in rows])
            keep = np.isfinite(values)
            if keep.any():
                _plot_line(ax, x[keep], values[keep], color=f"C{index}", linestyle="--", label=f"{split} (predicted)")
                drawn.append(values[keep])
        if metric == "loss" and drawn:
            values = np.concatenate(drawn)
            if (values > 0).all() and values.max() > 20 * values.min():
                ax.set_yscale("log")
        ax.set_ylabel(metric)
        _finish_steps_axis(ax, "symlog")
        _legend(ax)
    figure.suptitle(title, fontsize=13)
    return figure


def _or_nan(value: Optional[float]) -> float:
    return math.nan if value is None else float(value)


def describe_prediction(prediction: object) -> str:
    """One line on how a run's kernel prediction was made, from ``meta["prediction"]``
    (``{"points", "kernel_mode", "lr", "momentum", "approximate", ...}``; any missing)."""
    parts = ["linearised model from the step-0 kernel"]
    if isinstance(prediction, dict):
        if prediction.get("points") is not None:
            parts.append(f"{prediction['points']} training points")
        if prediction.get("kernel_mode"):
            parts.append(f"{prediction['kernel_mode']} kernel")
        for key in ("lr", "momentum"):
            value = prediction.get(key)
            if isinstance(value, (int, float)) and (key == "lr" or value):
                parts.append(f"{key} {value:g}")
        if prediction.get("approximate"):
            parts.append("approximate")
    return ", ".join(parts)


# --------------------------------------------------------------------------- heatmaps


def display_kernel(K: np.ndarray) -> np.ndarray:
    """A saved kernel as the (N1, N2) matrix to display: unchanged if 2-D, otherwise the
    trace over outputs, ``sum_o K[:, :, o]`` (diagonal layout, (N1, N2, O)) or
    ``sum_o K[:, :, o, o]`` (full layout, (N1, N2, O, O)) — the trace-mode kernel."""
    K = np.asarray(K, dtype=np.float64)
    if K.ndim == 2:
        return K
    if K.ndim == 3:
        return K.sum(axis=2)
    if K.ndim == 4 and K.shape[2] == K.shape[3]:
        return np.trace(K, axis1=2, axis2=3)
    raise ValueError(
        f"a kernel must be (N1, N2), (N1, N2, O) or (N1, N2, O, O); got shape {K.shape}"
    )


def kernel_cosine(K: np.ndarray) -> np.ndarray:
    """``K_ij / sqrt(K_ii K_jj)`` for a square (N, N) kernel: the cosine of the angle
    between the examples' gradient features, in [-1, 1] for a PSD kernel. Rows and
    columns of examples with a zero diagonal stay 0."""
    K = np.asarray(K, dtype=np.float64)
    if K.ndim != 2 or K.shape[0] != K.shape[1]:
        raise ValueError(f"kernel_cosine needs a square (N, N) kernel, got shape {K.shape}")
    norms = np.sqrt(np.clip(np.diagonal(K), 0.0, None))
    scale = np.outer(norms, norms)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(scale > 0, K / np.where(scale > 0, scale, 1.0), 0.0)


def class_order(run: RunLike, n: Optional[int] = None) -> Tuple[np.ndarray, Optional[np.ndarray]]:
    """The order that groups the probe's examples by class, and their labels in it.

    Reads ``meta["probe"]["labels"]`` (integer class labels of the probe examples, in
    probe order) and sorts stably, so examples of one class keep their probe order.

    Args:
        run: a ``Run`` or path.
        n: the number of probe examples expected (the kernel's size); labels of another
            length are ignored.

    Returns:
        ``(order, sorted_labels)``, ``order`` an int array (n,); ``(arange(n), None)``
        when the run has no usable labels (a regression task, an older run).
    """
    run = _as_run(run)
    probe = run.meta.get("probe")
    labels = probe.get("labels") if isinstance(probe, dict) else None
    usable = (
        isinstance(labels, list)
        and labels
        and all(isinstance(v, int) and not isinstance(v, bool) for v in labels)
        and (n is None or len(labels) == n)
    )
    if not usable:
        size = n if n is not None else (len(labels) if isinstance(labels, list) else 0)
        return np.arange(size), None
    labels = np.asarray(labels, dtype=np.int64)
    order = np.argsort(labels, kind="stable")
    return order, labels[order]


def kernel_heatmaps(
    run: RunLike,
    steps: Optional[Sequence[int]] = None,
    *,
    axes: Optional[Sequence[Axes]] = None,
    sort_by_class: bool = True,
) -> Figure:
    """Heatmaps of the probe kernel at saved steps (default: the first and the last).

    Each kernel is reduced to (N, N) (``display_kernel``) and shown as its cosine
    similarity ``K_ij / sqrt(K_ii K_jj)`` (``kernel_cosine``), in [-1, 1] on one shared
    diverging colour scale: the overall scale of the kernel often changes several-fold
    in training, and a few examples with large gradients would otherwise dominate the
    colours. Each panel's title gives the kernel's mean diagonal, its overall scale.
    Examples are sorted by class (``class_order``) when the run has probe labels, with
    thin lines between classes, so that block structure (the kernel learning the task)
    is visible; otherwise they are in probe order and the figure says so.

    Args:
        run: a ``Run`` or path.
        steps: the saved steps to draw (see ``run.kernel_steps``).
        axes: one Axes per step to draw into (all in one figure); None creates a figure.
        sort_by_class: sort the examples by class when labels are available.

    Returns:
        The Figure.

    Raises:
        ValueError: the run has no saved kernels, or ``axes`` does not match ``steps``.
        FileNotFoundError: a requested step has no saved kernel.
    """
    run = _as_run(run)
    saved = run.kernel_steps
    if steps is None:
        if not len(saved):
            raise ValueError(
                f"{run.path} has no saved kernels (keep_kernels={run.keep_kernels!r}); "
                "track with keep_kernels='log', 'first_last' or 'all' to draw heatmaps"
            )
        steps = sorted({int(saved[0]), int(saved[-1])})
    steps = [int(step) for step in steps]
    if not steps:
        raise ValueError("steps is empty; give at least one saved step")
    if axes is None:
        figure = Figure(figsize=(4.6 * len(steps) + 1.0, 4.6), layout="constrained")
        axes = list(np.atleast_1d(figure.subplots(1, len(steps))))
    else:
        axes = list(axes)
        if len(axes) != len(steps) or not all(isinstance(a, Axes) for a in axes):
            raise ValueError(f"axes must be {len(steps)} matplotlib Axes (one per step), got {len(axes)}")
        figure = axes[0].figure

    kernels = [display_kernel(run.kernel(step)) for step in steps]
    scales = [float(np.diagonal(K).mean()) for K in kernels]
    normalised = [kernel_cosine(K) for K in kernels]
    order, labels = class_order(run, kernels[0].shape[0]) if sort_by_class else (None, None)
    limit = 1.0

    image = None
    for ax, step, K, scale in zip(axes, steps, normalised, scales):
        if labels is not None and K.shape[0] == K.shape[1] == len(order):
            K = K[np.ix_(order, order)]
            _class_ticks(ax, labels)
        else:
            ax.set_xlabel("probe example")
            ax.set_ylabel("probe example")
        image = ax.imshow(K, cmap="RdBu_r", vmin=-limit, vmax=limit, interpolation="nearest")
        ax.set_title(f"step {step}  (mean diagonal {scale:.3g})", fontsize=10)
    figure.colorbar(image, ax=axes, shrink=0.8, label=r"$K_{ij}\, /\, \sqrt{K_{ii} K_{jj}}$")
    arrangement = "sorted by class" if labels is not None else "in probe order (no class labels in the run)"
    figure.suptitle(f"Probe kernel, examples {arrangement} — {_name(run)}", fontsize=11)
    return figure


def _class_ticks(ax: Axes, labels: np.ndarray) -> None:
    """Class names at the centre of each class block, thin lines between blocks."""
    boundaries = np.flatnonzero(np.diff(labels)) + 1
    starts = np.concatenate([[0], boundaries])
    ends = np.concatenate([boundaries, [len(labels)]])
    centres = (starts + ends - 1) / 2
    for edge in boundaries:
        ax.axhline(edge - 0.5, color="k", linewidth=0.8)
        ax.axvline(edge - 0.5, color="k", linewidth=0.8)
    names = [str(labels[s]) for s in starts]
    ax.set_xticks(centres, names, fontsize=7)
    ax.set_yticks(centres, names, fontsize=7)
    ax.set_xlabel("probe example, by class")
    ax.set_ylabel("probe example, by class")


# --------------------------------------------------------------------------- width sweeps


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
    relative change to shrink as ``width^(−1/2)``; a grey guide of ``reference_slope``
    through the first point is drawn for comparison.

    Args:
        results: ``(width, relative_change, linearisation_gap)`` per trained width (e.g.
            the final record of each run); a ``None``/NaN or non-positive value leaves
            that point out of its curve (a run without predictions has no gap).
        ax: the Axes to draw into; None creates a figure.
        reference_slope: slope of the guide line; None for no guide.

    Returns:
        The Axes.
    """
    rows = [tuple(row) for row in results]
    if not rows:
        raise ValueError("results is empty; give (width, relative_change, linearisation_gap) per width")
    for row in rows:
        if len(row) != 3:
            raise ValueError(f"each result must be (width, relative_change, linearisation_gap), got {row!r}")
    table = np.array([[math.nan if v is None else float(v) for v in row] for row in rows])
    table = table[np.argsort(table[:, 0], kind="stable")]
    ax = _new_axes(ax)
    curves = (
        (1, "relative change ‖K − K₀‖/‖K₀‖", "C0", "o"),
        (2, "linearisation gap", "C3", "s"),
    )
    first_point = None
    for column, name, colour, marker in curves:
        keep = np.isfinite(table[:, 0]) & np.isfinite(table[:, column]) & (table[:, 0] > 0) & (table[:, column] > 0)
        widths, values = table[keep, 0], table[keep, column]
        if not len(widths):
            continue
        if first_point is None:
            first_point = (widths[0], values[0])
        label = name
        if len(np.unique(widths)) >= 2:
            fit = fit_loglog_slope(widths, values)
            label = f"{name} (slope {fit.slope:+.2f})"
            grid = np.geomspace(widths.min(), widths.max(), 50)
            ax.plot(grid, fit.coefficient * grid ** fit.slope, color=colour, linestyle=":", linewidth=1)
        ax.plot(widths, values, color=colour, marker=marker, linestyle="-", label=label)
    if first_point is None:
        _say_missing(ax, "no positive results to draw")
    else:
        ax.set_xscale("log")
        ax.set_yscale("log")
        if reference_slope is not None:
            x0, y0 = first_point
            grid = np.geomspace(np.nanmin(table[:, 0]), np.nanmax(table[:, 0]), 50)
            ax.plot(grid, y0 * (grid / x0) ** reference_slope, color="0.55", linestyle="--",
                    linewidth=1, label=f"∝ width$^{{{reference_slope:g}}}$ (Lee et al. 2019)")
    ax.set_xlabel("width (hidden units per layer)")
    ax.set_ylabel("at the end of training (dimensionless)")
    ax.set_title("Lazy regime: kernel change vs width", fontsize=11)
    ax.grid(True, which="both", alpha=0.3)
    _legend(ax)
    return ax


# --------------------------------------------------------------------------- collections


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


def _has_drift_after_step_zero(run: Run) -> bool:
    later = run.steps > 0
    return any(
        values is not None and np.isfinite(values[later]).any()
        for values in (_series(run, "relative_change"), _series(run, "kernel_distance"))
    )


def _has_eigenvalues(run: Run) -> bool:
    table = run.metrics.get("top_eigenvalues")
    return table is not None and table.ndim == 2 and bool(np.isfinite(table).any())


FIGURES: Tuple[FigureSpec, ...] = (
    FigureSpec(
        "predicted_vs_actual_loss", "Predicted vs actual loss",
        "The network's loss (solid) and the linearised model's prediction from the step-0 "
        "kernel (dashed), per split. Agreement means training stayed in the kernel regime.",
        lambda run: _has(run, "train_loss", "probe_loss", "test_loss", "predicted_train_loss"),
        lambda run, ax: predicted_vs_actual(run, ax, metric="loss"),
    ),
    FigureSpec(
        "predicted_vs_actual_accuracy", "Predicted vs actual accuracy",
        "Accuracy of the network (solid) and of the linearised model (dashed), per split.",
        lambda run: _has(run, "train_accuracy", "probe_accuracy", "test_accuracy", "predicted_train_accuracy"),
        lambda run, ax: predicted_vs_actual(run, ax, metric="accuracy"),
    ),
    FigureSpec(
        "linearisation_gap", "Linearisation gap",
        "|actual − predicted| loss relative to the initial loss, on the training set "
        "(solid) and the test set (dashed).",
        lambda run: _has(run, "linearisation_gap", "test_linearisation_gap"),
        lambda run, ax: linearisation_gap(run, ax),
    ),
    FigureSpec(
        "drift", "Kernel drift",
        "Relative change and kernel distance of the probe kernel from its value at step 0 "
        "(log scale; step 0 itself is zero and not drawn).",
        _has_drift_after_step_zero,
        lambda run, ax: drift(run, ax),
    ),
    FigureSpec(
        "velocity", "Kernel velocity",
        "Kernel distance between consecutive measurements per optimizer step.",
        lambda run: _has(run, "velocity"),
        lambda run, ax: velocity(run, ax),
    ),
    FigureSpec(
        "eigenvalues", "Top kernel eigenvalues",
        "The largest eigenvalues of the probe kernel; they set the speeds of the linearised "
        "dynamics.",
        _has_eigenvalues,
        lambda run, ax: eigenvalues(run, ax),
    ),
    FigureSpec(
        "layer_share", "Per-layer share of the kernel",
        "Each parameter group's share of the kernel's trace.",
        lambda run: bool(_layer_groups(run)),
        lambda run, ax: layer_share(run, ax),
    ),
    FigureSpec(
        "target_alignment", "Kernel-target alignment",
        "Centred alignment of the probe kernel with the probe labels; rising alignment "
        "means the kernel is learning the task.",
        lambda run: _has(run, "target_alignment"),
        lambda run, ax: target_alignment(run, ax),
    ),
    FigureSpec(
        "kernel_heatmaps", "Kernel heatmaps",
        "The probe kernel at the first and the last saved step, each divided by its mean "
        "diagonal (shared colour scale), examples sorted by class when labels are known.",
        lambda run: len(run.kernel_steps) > 0,
        lambda run, ax: kernel_heatmaps(run),
        single_axes=False,
    ),
)
"""Every per-run figure, in the order reports show them."""


def figures(run: RunLike) -> List[Tuple[FigureSpec, Figure]]:
    """Draw every figure in ``FIGURES`` that the run's data supports.

    Returns:
        ``(spec, figure)`` pairs in ``FIGURES`` order; figures without data are left out
        (e.g. no heatmaps when no kernel was kept, no accuracy for a regression task).
    """
    run = _as_run(run)
    drawn = []
    for spec in FIGURES:
        if spec.available(run):
            result = spec.draw(run, None)
            drawn.append((spec, result if isinstance(result, Figure) else result.figure))
    return drawn


def overview(run: RunLike) -> Figure:
    """One figure with a panel for every single-axes figure the run supports (all of
    ``FIGURES`` but the heatmaps), two per row.

    Raises:
        ValueError: the run has no data for any panel (e.g. no records).
    """
    run = _as_run(run)
    specs = [spec for spec in FIGURES if spec.single_axes and spec.available(run)]
    if not specs:
        raise ValueError(f"{run.path} has nothing to plot ({len(run)} records)")
    columns = 2 if len(specs) > 1 else 1
    rows = math.ceil(len(specs) / columns)
    figure = Figure(figsize=(PANEL_SIZE[0] * columns + 1.5, PANEL_SIZE[1] * rows), layout="constrained")
    axes = figure.subplots(rows, columns, squeeze=False).ravel()
    for spec, ax in zip(specs, axes):
        spec.draw(run, ax)
    for ax in axes[len(specs):]:
        ax.set_visible(False)
    status = f", {run.status}" if run.status else ""
    figure.suptitle(f"{_name(run)}: {len(run)} measurements{status}", fontsize=13)
    return figure


def compare(runs: Sequence[RunLike], labels: Labels = None, *, xscale: str = "symlog") -> Figure:
    """Several runs overlaid (one colour each) in one figure: kernel drift, velocity,
    target alignment and, when any run has predictions, the linearisation gap.

    Args:
        runs: the runs (or paths) to compare, at least one.
        labels: one legend label per run; default: the run directories' names.
        xscale: as for ``drift``.
    """
    runs = _as_runs(runs)
    names = _labels(runs, labels)
    panels: List[Callable[..., Axes]] = [drift, velocity, target_alignment]
    if any(_has(run, "linearisation_gap", "test_linearisation_gap") for run in runs):
        panels.append(linearisation_gap)
    rows = math.ceil(len(panels) / 2)
    figure = Figure(figsize=(PANEL_SIZE[0] * 2, PANEL_SIZE[1] * rows), layout="constrained")
    axes = figure.subplots(rows, 2, squeeze=False).ravel()
    for panel, ax in zip(panels, axes):
        panel(runs, ax, label=names, xscale=xscale)
    for ax in axes[len(panels):]:
        ax.set_visible(False)
    figure.suptitle(f"Comparison of {len(runs)} runs", fontsize=13)
    return figure


def _check_formats(formats: Union[str, Sequence[str]]) -> Tuple[str, ...]:
    formats = (formats,) if isinstance(formats, str) else tuple(formats)
    supported = Figure().canvas.get_supported_filetypes()
    bad = [f for f in formats if f not in supported]
    if bad or not formats:
        raise ValueError(
            f"formats must be a non-empty selection of {', '.join(sorted(supported))}; got {list(formats)}"
        )
    return formats


def save_figure(figure: Figure, path: PathLike) -> Path:
    """Write ``figure`` to ``path`` in the format its suffix names (PNG at 120 dpi; SVG
    and PDF without a creation date, so reruns give identical files)."""
    path = Path(path)
    fmt = path.suffix.lstrip(".").lower()
    metadata = {"Date": None} if fmt in ("svg", "pdf") else None
    figure.savefig(path, format=fmt, dpi=PNG_DPI, metadata=metadata)
    return path


def save_all(run: RunLike, out_dir: PathLike, formats: Union[str, Sequence[str]] = ("png", "svg")) -> List[Path]:
    """Write the overview and every figure the run's data supports to ``out_dir``.

    Files are ``overview.<fmt>`` and ``<spec.name>.<fmt>`` for each ``FIGURES`` entry
    available for this run (``drift.png``, ``predicted_vs_actual_loss.svg``, ...), in
    each format; ``out_dir`` is created if needed and existing files are replaced.

    Args:
        run: a ``Run`` or path.
        out_dir: the directory to write into.
        formats: file formats matplotlib can write, e.g. ``("png", "svg")``, ``"pdf"``.

    Returns:
        The paths written, overview first.
    """
    formats = _check_formats(formats)
    run = _as_run(run)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    drawn = [("overview", overview(run))] + [(spec.name, figure) for spec, figure in figures(run)]
    return [save_figure(figure, out_dir / f"{name}.{fmt}") for name, figure in drawn for fmt in formats]


# --------------------------------------------------------------------------- small helpers


def _name(run: Run) -> str:
    return run.path.name or str(run.path)


def _subscript(number: int) -> str:
    return str(number).translate(str.maketrans("0123456789", "₀₁₂₃₄₅₆₇₈₉"))


def _colormap(name: str):
    from matplotlib import colormaps

    return colormaps[name]
