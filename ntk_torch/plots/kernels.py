"""Saved probe kernels as heatmaps: the trace over outputs, its cosine similarity, and the
examples grouped by class."""

from __future__ import annotations

import warnings
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from ..layout import layout_of
from ..runs import Run
from ._axes import RunLike, as_run, run_name

__all__ = ["COSINE_LABEL", "COSINE_LIMITS", "class_order", "display_kernel", "kernel_cosine", "kernel_heatmaps"]

COSINE_LABEL = r"$K_{ij}\, /\, \sqrt{K_{ii} K_{jj}}$"
"""The colour bar label of ``kernel_heatmaps``: what its colours are."""
COSINE_LIMITS = (-1.0, 1.0)
"""The colour scale of ``kernel_heatmaps``, shared by its panels: the cosine's range."""


def display_kernel(K: np.ndarray) -> np.ndarray:
    """A saved kernel as the (N1, N2) matrix to display, a new float64 array: its
    ``trace`` layout (``ntk_torch.layout``), its values if 2-D, otherwise the trace over
    outputs, ``sum_o K[:, :, o]`` (diagonal layout, (N1, N2, O)) or ``sum_o K[:, :, o, o]``
    (full layout, (N1, N2, O, O)).

    Raises:
        ValueError: ``K``'s shape is no kernel layout's.
    """
    K = torch.from_numpy(np.array(K, dtype=np.float64))  # a copy: torch needs a writable array
    return layout_of(K, name="kernel").to_trace(K).numpy()


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
    run = as_run(run)
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
    """Heatmaps of the probe kernel at saved steps (default: the first and the last saved
    kernels that can be drawn; unreadable or non-square ones are passed over with a
    ``RuntimeWarning``).

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
        ValueError: the run has no saved kernel that can be drawn, a requested one is
            unreadable or not square, or ``axes`` does not match ``steps``.
        FileNotFoundError: a requested step has no saved kernel.
    """
    run = as_run(run)
    if not isinstance(sort_by_class, bool):
        raise TypeError(f"sort_by_class must be a bool (True or False), got {sort_by_class!r}")
    if steps is None:
        steps, kernels = _first_and_last_drawable(run)
    else:
        steps = [int(step) for step in steps]
        if not steps:
            raise ValueError("steps is empty; give at least one saved step")
        kernels = [_square(display_kernel(run.kernel(step)), step) for step in steps]
    figure, axes = _one_axes_per_step(steps, axes)
    order, labels = class_order(run, kernels[0].shape[0]) if sort_by_class else (None, None)
    image = None
    for ax, step, K in zip(axes, steps, kernels):
        image = _draw_heatmap(ax, step, K, order, labels)
    figure.colorbar(image, ax=axes, shrink=0.8, label=COSINE_LABEL)
    if labels is not None:
        arrangement = "sorted by class"
    elif sort_by_class:
        arrangement = "in probe order (no class labels in the run)"
    else:
        arrangement = "in probe order"
    figure.suptitle(f"Probe kernel, examples {arrangement} — {run_name(run)}", fontsize=11)
    return figure


def _square(K: np.ndarray, step: int) -> np.ndarray:
    if K.shape[0] != K.shape[1]:
        raise ValueError(f"the kernel saved at step {step} is {K.shape[0]} x {K.shape[1]}, not a square probe kernel")
    return K


def _drawable(run: Run, step: int, skipped: List[str]) -> Optional[np.ndarray]:
    """The (N, N) matrix of the kernel saved at ``step``, or None (noted in ``skipped``)
    when the file cannot be read or holds no square kernel."""
    try:
        return _square(display_kernel(run.kernel(step)), step)
    except (ValueError, OSError) as error:
        skipped.append(f"step {step} ({error})")
        return None


def _first_and_last_drawable(run: Run) -> Tuple[List[int], List[np.ndarray]]:
    """The first and the last saved steps whose kernel can be drawn, and their matrices;
    a ``RuntimeWarning`` names the saved kernels passed over."""
    saved = run.kernel_steps.tolist()
    if not saved:
        raise ValueError(
            f"{run.path} has no saved kernels (keep_kernels={run.keep_kernels!r}); "
            "track with keep_kernels='log', 'first_last' or 'all' to draw heatmaps"
        )
    skipped: List[str] = []
    found: List[Tuple[int, np.ndarray]] = []
    for step in saved:
        K = _drawable(run, step, skipped)
        if K is not None:
            found.append((step, K))
            break
    for step in reversed(saved):
        if found and step <= found[0][0]:
            break
        K = _drawable(run, step, skipped)
        if K is not None:
            found.append((step, K))
            break
    if skipped:
        warnings.warn(f"{run_name(run)}: heatmaps skip the saved kernels of " + "; ".join(skipped), RuntimeWarning)
    if not found:
        raise ValueError(f"{run.path} has no saved kernel that can be drawn")
    return [step for step, _ in found], [K for _, K in found]


def _one_axes_per_step(steps: List[int], axes: Optional[Sequence[Axes]]) -> Tuple[Figure, List[Axes]]:
    """The given Axes (checked: one per step, in one figure) or a new row of panels."""
    if axes is None:
        figure = Figure(figsize=(4.6 * len(steps) + 1.0, 4.6), layout="constrained")
        return figure, list(np.atleast_1d(figure.subplots(1, len(steps))))
    axes = list(axes)
    if len(axes) != len(steps) or not all(isinstance(a, Axes) for a in axes):
        raise ValueError(f"axes must be {len(steps)} matplotlib Axes (one per step), got {len(axes)}")
    return axes[0].figure, axes


def _draw_heatmap(ax: Axes, step: int, K: np.ndarray, order: Optional[np.ndarray], labels: Optional[np.ndarray]):
    """One panel: the cosine of the (N, N) kernel ``K`` on ``COSINE_LIMITS``, its rows and
    columns in class ``order`` when ``labels`` fit; returns the image."""
    scale = float(np.diagonal(K).mean())
    cosine = kernel_cosine(K)
    if labels is not None and cosine.shape[0] == cosine.shape[1] == len(order):
        cosine = cosine[np.ix_(order, order)]
        _class_ticks(ax, labels)
    else:
        ax.set_xlabel("probe example")
        ax.set_ylabel("probe example")
    low, high = COSINE_LIMITS
    image = ax.imshow(cosine, cmap="RdBu_r", vmin=low, vmax=high, interpolation="nearest")
    ax.set_title(f"step {step}  (mean diagonal {scale:.3g})", fontsize=10)
    return image


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
