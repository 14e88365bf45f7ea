"""The probe kernel over training: drift, velocity, target alignment, linearisation gap,
top eigenvalues and per-layer shares, each against the optimizer step."""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
from matplotlib import colormaps
from matplotlib.axes import Axes

from .. import records
from ..runs import Run
from ._axes import (
    LINESTYLES,
    Labels,
    RunLike,
    RunsLike,
    as_run,
    as_runs,
    check_xscale,
    finish_steps_axis,
    finite_points,
    legend,
    mark_nonfinite,
    new_axes,
    plot_line,
    run_labels,
    run_name,
    say_missing,
    series,
    subscript,
)

__all__ = [
    "DRIFT_LABELS",
    "GAP_COLUMNS",
    "drift",
    "eigenvalue_table",
    "eigenvalues",
    "layer_groups",
    "layer_share",
    "linearisation_gap",
    "target_alignment",
    "velocity",
]

DRIFT_LABELS = {
    records.RELATIVE_CHANGE: r"relative change $\|K - K_0\|_F\, /\, \|K_0\|_F$",
    records.KERNEL_DISTANCE: r"kernel distance $1 - \langle K, K_0 \rangle_F\, /\, (\|K\|_F \|K_0\|_F)$",
}
"""The drift columns ``drift`` draws, and their legend labels."""
GAP_COLUMNS: Tuple[str, ...] = tuple(records.gap(split) for split in records.FORECAST_SPLITS)
"""The linearisation gaps, train (drawn solid) then test (dashed)."""


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
    """Draw ``columns`` of each run over steps: colour per run, line style per column
    (``LINESTYLES`` in order: the first column solid, the second dashed)."""
    check_xscale(xscale)
    runs = as_runs(runs)
    names = run_labels(runs, label)
    ax = new_axes(ax)
    drawn = False
    for index, (run, name) in enumerate(zip(runs, names)):
        for style, column in zip(LINESTYLES, columns):
            values = series(run, column)
            if values is None:
                continue
            x, y = finite_points(run.steps, values, xscale, positive=log_y)
            if not len(x):
                continue
            parts = ([name] if len(runs) > 1 else []) + ([column_labels[column]] if len(columns) > 1 else [])
            plot_line(ax, x, y, color=f"C{index}", linestyle=style, label=": ".join(parts) or None)
            drawn = True
        if len(runs) == 1:
            mark_nonfinite(ax, run, xscale)
    if drawn and log_y:
        ax.set_yscale("log")
    if not drawn:
        say_missing(ax, empty)
    finish_steps_axis(ax, xscale)
    ax.set_ylabel(ylabel)
    ax.set_title(title if len(runs) > 1 else f"{title} — {names[0]}", fontsize=11)
    legend(ax)
    return ax


# --------------------------------------------------------------------------- kernel drift


def drift(
    runs: RunsLike,
    ax: Optional[Axes] = None,
    *,
    label: Labels = None,
    metrics: Sequence[str] = (records.RELATIVE_CHANGE, records.KERNEL_DISTANCE),
    xscale: str = "symlog",
) -> Axes:
    """How far the probe kernel has moved from its value at step 0, over training.

    Draws, for each run, the relative change ``‖K_t − K₀‖_F / ‖K₀‖_F`` (solid) and the
    kernel distance ``1 − ⟨K_t, K₀⟩_F / (‖K_t‖_F ‖K₀‖_F)`` (Fort et al. 2020; dashed) on a
    log y axis. Both are zero at step 0 by definition, and zero has no place on a log axis,
    so the step-0 point is not drawn: on the default symlog x axis (see the package notes)
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
    unknown = [m for m in metrics if m not in DRIFT_LABELS]
    if unknown or not metrics:
        raise ValueError(
            f"metrics must be a non-empty selection of {', '.join(map(repr, DRIFT_LABELS))}, got {list(metrics)}"
        )
    return _overlay(
        runs, ax, label, metrics, DRIFT_LABELS,
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
        runs, ax, label, (records.VELOCITY,), {records.VELOCITY: "velocity"},
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
        runs, ax, label, (records.TARGET_ALIGNMENT,), {records.TARGET_ALIGNMENT: "target alignment"},
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
        runs, ax, label, GAP_COLUMNS,
        {records.gap(split): split for split in records.FORECAST_SPLITS},
        xscale=xscale, log_y=False,
        ylabel="|actual − predicted| loss / initial loss",
        title="Linearisation gap",
        empty="no kernel prediction recorded in this run",
    )


# --------------------------------------------------------------------------- spectrum


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
        k: draw the top ``k`` (default: all recorded; the tracker records up to 10).
        xscale: ``"symlog"`` (default), ``"linear"`` or ``"log"``.
    """
    check_xscale(xscale)
    run = as_run(run)
    ax = new_axes(ax)
    table = eigenvalue_table(run)
    if table is None:
        say_missing(ax, "no eigenvalues recorded")
        table = np.empty((len(run.steps), 0))
    count = table.shape[1] if k is None else min(int(k), table.shape[1])
    colours = colormaps["viridis"](np.linspace(0.0, 0.85, max(count, 1)))
    for i in range(count):
        x, y = finite_points(run.steps, table[:, i], xscale, positive=True)
        if len(x):
            plot_line(ax, x, y, color=colours[i], label=f"λ{subscript(i + 1)}")
    if ax.get_lines():
        ax.set_yscale("log")
    finish_steps_axis(ax, xscale)
    ax.set_ylabel("eigenvalue of the probe kernel")
    ax.set_title(f"Top kernel eigenvalues — {run_name(run)}", fontsize=11)
    legend(ax, ncol=2 if count > 5 else 1)
    return ax


def eigenvalue_table(run: Run) -> Optional[np.ndarray]:
    """The recorded top eigenvalues, float64 (R, k) (NaN-padded), or None when the run
    has no finite one."""
    table = run.metrics.get(records.TOP_EIGENVALUES)
    if table is None or table.ndim != 2 or not np.isfinite(table).any():
        return None
    return table


# --------------------------------------------------------------------------- layers


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
    check_xscale(xscale)
    if isinstance(max_groups, bool) or not isinstance(max_groups, int) or max_groups < 2:
        raise ValueError(f"max_groups must be an int >= 2, got {max_groups!r}")
    run = as_run(run)
    own_figure = ax is None
    ax = new_axes(ax)
    groups = layer_groups(run)
    if groups:
        _stack_shares(ax, run, groups, max_groups, xscale)
    else:
        say_missing(ax, "no per-layer shares recorded")
    finish_steps_axis(ax, xscale)
    ax.set_ylabel("share of trace(K)")
    ax.set_title(f"Per-layer share of the kernel — {run_name(run)}", fontsize=11)
    if own_figure:  # room to spare beside the axes
        legend(ax, loc="center left", bbox_to_anchor=(1.01, 0.5), title="parameter group")
    else:  # inside, so that a grid of panels keeps equal widths
        legend(ax, loc="lower right", framealpha=0.85, title="parameter group")
    return ax


def _stack_shares(ax: Axes, run: Run, groups: Dict[str, np.ndarray], max_groups: int, xscale: str) -> None:
    """The stacked share bands of the measurements that have shares."""
    table = np.column_stack(list(groups.values()))  # (R, G)
    keep = np.isfinite(table).any(axis=1)
    if xscale == "log":
        keep &= run.steps > 0
    steps, table = run.steps[keep], np.nan_to_num(table[keep])
    table, names, colours = _merge_small_groups(table, list(groups), max_groups)
    ax.stackplot(steps, table.T, labels=names, colors=colours, alpha=0.85)
    ax.set_ylim(0, max(1.0, float(table.sum(axis=1).max())))
    if len(steps) > 1:
        ax.set_xlim(steps.min(), steps.max())


def _merge_small_groups(
    table: np.ndarray, names: List[str], max_groups: int
) -> Tuple[np.ndarray, List[str], List[str]]:
    """At most ``max_groups`` share columns of ``table`` (R, G): the largest by mean share,
    in network order, and a grey "other" band summing the rest; with their names and
    colours."""
    merged = len(names) > max_groups
    if merged:
        ranked = np.argsort(-table.mean(axis=0), kind="stable")
        kept = np.sort(ranked[: max_groups - 1])
        other = table[:, np.sort(ranked[max_groups - 1:])].sum(axis=1)
        table = np.column_stack([table[:, kept], other])
        names = [names[i] for i in kept] + [f"other ({len(names) - len(kept)} groups)"]
    colours = [f"C{i % 10}" for i in range(len(names))]
    if merged:
        colours[-1] = "0.7"
    return table, names, colours


def layer_groups(run: Run) -> Dict[str, np.ndarray]:
    """Parameter group -> its share column, in the order the records list them."""
    prefix = records.LAYER_SHARE + "."
    groups = {}
    for name, values in run.metrics.items():
        if name.startswith(prefix) and values.dtype != object and values.ndim == 1 and np.isfinite(values).any():
            groups[name[len(prefix):]] = values
    return groups
