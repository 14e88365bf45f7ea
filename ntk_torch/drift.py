"""How the probe kernel moves: the record fields of each measured kernel.

A :class:`KernelDrift` keeps the kernel at step 0 and the previous finite one, and turns
each newly measured kernel (per parameter group, :class:`~ntk_torch.kernel.PerLayerKernels`)
into the fields of its record (:mod:`ntk_torch.records`): trace, Frobenius norm, top
eigenvalues and effective rank (one eigendecomposition), centred target alignment with the
probe labels, relative change and kernel distance from step 0, velocity since the
previous measurement, and each group's share of the trace. Only those two kernels stay in
memory, so it does not grow with the number of measurements.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Optional, Tuple

import torch

from . import metrics, records
from .kernel import PerLayerKernels
from .layout import Layout

TOP_EIGENVALUES = 10
"""How many of the largest kernel eigenvalues each record keeps."""


def _or_none(metric: Callable[..., float], *args: Any) -> Optional[float]:
    """``metric(*args)``, or None where it is undefined (a zero-norm kernel, constant
    targets): the metrics raise ``ValueError`` for those."""
    try:
        return metric(*args)
    except ValueError:
        return None


class KernelDrift:
    """The record fields of probe kernels measured in order (see the module docstring).

    Args:
        layout: the kernels' layout.
        labels: the probe's targets, for the kernel-target alignment.
        reference: the infinite-width kernel in ``layout``
            (:func:`ntk_torch.analytic.reference_kernel`): each record then has
            ``analytic_distance``, the relative Frobenius distance from it.
    """

    def __init__(self, layout: Layout, labels: torch.Tensor, reference: Optional[torch.Tensor] = None) -> None:
        self.layout = layout
        self.labels = labels
        self.reference = reference  # the infinite-width kernel in this layout, or None
        self.initial: Optional[torch.Tensor] = None
        self.previous: Optional[Tuple[int, torch.Tensor]] = None

    def nonfinite(self) -> Dict[str, Any]:
        """The kernel fields of a step whose kernel was not finite: all None."""
        names = records.KERNEL_STATISTICS + records.DRIFT + (records.LAYER_SHARE,)
        return dict.fromkeys(names)

    def fields(self, step: int, kernels: PerLayerKernels) -> Dict[str, Any]:
        """The fields of the finite kernels measured at ``step``; the total kernel becomes
        the reference (at step 0) and the previous kernel."""
        K = kernels.total
        fields = {**self._statistics(K), **self._drift(step, K), **self._shares(kernels)}
        if self.reference is not None:
            fields[records.ANALYTIC_DISTANCE] = _or_none(metrics.relative_change, K, self.reference)
        if step == 0:
            self.initial = K
        self.previous = (step, K)
        return fields

    def _statistics(self, K: torch.Tensor) -> Dict[str, Any]:
        eigenvalues = metrics.spectrum(K)  # one eigendecomposition serves both
        return {
            records.TRACE: self.layout.matrix_trace(K),
            records.FROBENIUS: float(torch.linalg.vector_norm(K, dtype=torch.float64)),
            records.TOP_EIGENVALUES: eigenvalues[:TOP_EIGENVALUES].tolist(),
            records.EFFECTIVE_RANK: _or_none(metrics.effective_rank_of_spectrum, eigenvalues),
            records.TARGET_ALIGNMENT: _or_none(metrics.target_alignment, K, self.labels),
        }

    def _drift(self, step: int, K: torch.Tensor) -> Dict[str, Any]:
        """Relative change and kernel distance from step 0; velocity since the previous
        finite measurement (kernel distance per optimizer step)."""
        fields: Dict[str, Any] = dict.fromkeys(records.DRIFT)
        if step == 0:
            fields[records.RELATIVE_CHANGE] = fields[records.KERNEL_DISTANCE] = 0.0
        elif self.initial is not None:
            fields[records.RELATIVE_CHANGE] = _or_none(metrics.relative_change, K, self.initial)
            fields[records.KERNEL_DISTANCE] = _or_none(metrics.kernel_distance, K, self.initial)
        if self.previous is not None:
            previous_step, previous = self.previous
            fields[records.VELOCITY] = _or_none(metrics.kernel_velocity, previous, K, step - previous_step)
        return fields

    def _shares(self, kernels: PerLayerKernels) -> Dict[str, Any]:
        """Each parameter group's share of the kernel's trace."""
        total = self.layout.matrix_trace(kernels.total)
        trace = self.layout.matrix_trace
        return {records.LAYER_SHARE: {g: trace(K) / total if total else None for g, K in kernels.items()}}
