"""How the probe kernel moves: the record fields of each measured kernel.

A :class:`KernelDrift` keeps the kernel at step 0 and the previous finite one, and turns
each newly measured kernel (per parameter group, :class:`~ntk_torch.kernel.PerLayerKernels`)
into the fields of its record (:mod:`ntk_torch.records`): trace, Frobenius norm, top
eigenvalues and effective rank (one eigendecomposition), centred target alignment with the
probe labels, relative change and kernel distance from step 0, velocity since the
previous measurement, and each group's share of the trace. Only those two kernels stay in
memory, so it does not grow with the number of measurements.

The fields are computed fused (:class:`_Fused`): the kernel is converted to float64 and
its Frobenius norm taken once, the reference and previous kernels keep their float64
copies and norms, the centred target kernel of the probe labels is built once, and the
eigendecomposition skips the symmetrisation of a kernel that is exactly symmetric (every
engine's ``x2=None`` kernel is). The values are those of the :mod:`ntk_torch.metrics`
functions (the same formulas on the same float64 tensors).
"""

from __future__ import annotations

import math
from typing import Any, Callable, Dict, Optional, Tuple, Union

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


class _Fused:
    """A kernel in float64 with its Frobenius norm, for the drift measures."""

    def __init__(self, K: torch.Tensor) -> None:
        self.values = K.detach().to(torch.float64)
        self.norm = torch.linalg.vector_norm(self.values)

    def relative_change(self, reference: "_Fused") -> Optional[float]:
        """``|K - K0|_F / |K0|_F`` (:func:`~ntk_torch.metrics.relative_change`)."""
        if reference.norm == 0:
            return None
        return float(torch.linalg.vector_norm(self.values - reference.values) / reference.norm)

    def distance(self, other: "_Fused") -> Optional[float]:
        """``1 - <K1, K2>_F / (|K1|_F |K2|_F)`` (:func:`~ntk_torch.metrics.kernel_distance`)."""
        if self.norm == 0 or other.norm == 0:
            return None
        return 1.0 - float((self.values * other.values).sum() / (self.norm * other.norm))


class _Alignment:
    """Centred kernel-target alignment against fixed probe labels, the target kernel
    centred once (:func:`~ntk_torch.metrics.target_alignment`)."""

    def __init__(self, labels: torch.Tensor) -> None:
        self.labels = labels
        self.target: Optional[Tuple[torch.Tensor, torch.Tensor]] = None

    def __call__(self, K: torch.Tensor, matrix: torch.Tensor) -> Optional[float]:
        if self.target is None:
            try:
                target = metrics.target_kernel(K, self.labels).to(matrix.device)
            except ValueError:
                return None
            centred = metrics.center(target)
            self.target = (centred, torch.linalg.vector_norm(centred))
        centred, target_norm = self.target
        M = metrics.center(matrix)
        norm = torch.linalg.vector_norm(M)
        if norm == 0 or target_norm == 0:
            return None
        return float((M * centred).sum() / (norm * target_norm))


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
        self._initial: Optional[_Fused] = None
        self._previous: Optional[_Fused] = None
        self._alignment = _Alignment(labels)

    def nonfinite(self) -> Dict[str, Any]:
        """The kernel fields of a step whose kernel was not finite: all None."""
        names = records.KERNEL_STATISTICS + records.DRIFT + (records.LAYER_SHARE,)
        return dict.fromkeys(names)

    def fields(self, step: int, kernels: Union[PerLayerKernels, torch.Tensor]) -> Dict[str, Any]:
        """The fields of the finite kernels measured at ``step`` (per parameter group, or one
        kernel, e.g. a sketch's, whose ``layer_share`` is then None); the total kernel
        becomes the reference (at step 0) and the previous kernel."""
        split = isinstance(kernels, PerLayerKernels)
        K = kernels.total if split else kernels
        fused = _Fused(K)
        shares = self._shares(kernels) if split else {records.LAYER_SHARE: None}
        fields = {**self._statistics(K, fused), **self._drift(step, fused), **shares}
        if self.reference is not None:
            fields[records.ANALYTIC_DISTANCE] = _or_none(metrics.relative_change, K, self.reference)
        if step == 0:
            self.initial, self._initial = K, fused
        self.previous, self._previous = (step, K), fused
        return fields

    def _statistics(self, K: torch.Tensor, fused: _Fused) -> Dict[str, Any]:
        matrices = self.layout.blocks(fused.values)
        if not torch.equal(matrices, matrices.mT):  # round-off asymmetry: checked, symmetrised
            return self._statistics_by_metrics(K, fused)
        eigenvalues = torch.linalg.eigvalsh(matrices).flatten().sort().values.flip(0)
        return self._statistics_from(K, fused, eigenvalues)

    def _statistics_by_metrics(self, K: torch.Tensor, fused: _Fused) -> Dict[str, Any]:
        return self._statistics_from(K, fused, metrics.spectrum(K))

    def _statistics_from(self, K: torch.Tensor, fused: _Fused, eigenvalues: torch.Tensor) -> Dict[str, Any]:
        return {
            records.TRACE: self.layout.matrix_trace(K),
            records.FROBENIUS: float(fused.norm),
            records.TOP_EIGENVALUES: eigenvalues[:TOP_EIGENVALUES].tolist(),
            records.EFFECTIVE_RANK: _or_none(metrics.effective_rank_of_spectrum, eigenvalues),
            records.TARGET_ALIGNMENT: self._alignment(K, self.layout.matrix(fused.values)),
        }

    def _drift(self, step: int, fused: _Fused) -> Dict[str, Any]:
        """Relative change and kernel distance from step 0; velocity since the previous
        finite measurement (kernel distance per optimizer step)."""
        fields: Dict[str, Any] = dict.fromkeys(records.DRIFT)
        if step == 0:
            fields[records.RELATIVE_CHANGE] = fields[records.KERNEL_DISTANCE] = 0.0
        elif self._initial is not None:
            fields[records.RELATIVE_CHANGE] = fused.relative_change(self._initial)
            fields[records.KERNEL_DISTANCE] = fused.distance(self._initial)
        if self.previous is not None and self._previous is not None:
            distance = self._previous.distance(fused)
            steps = step - self.previous[0]
            fields[records.VELOCITY] = None if distance is None or steps <= 0 else distance / steps
        return fields

    def _shares(self, kernels: PerLayerKernels) -> Dict[str, Any]:
        """Each parameter group's share of the kernel's trace."""
        total = self.layout.matrix_trace(kernels.total)
        trace = self.layout.matrix_trace
        return {records.LAYER_SHARE: {g: trace(K) / total if total else None for g, K in kernels.items()}}


def parameter_distance(params: Dict[str, torch.Tensor], initial: Dict[str, torch.Tensor]) -> Optional[float]:
    """|theta - theta_0| / |theta_0| over the tracked parameters (``params`` and their step-0
    values ``initial``, by name), in float64; None when theta_0 is zero."""
    moved = reference = 0.0
    with torch.no_grad():
        for name, p in params.items():
            p0 = initial[name]
            moved += float(torch.linalg.vector_norm(p - p0, dtype=torch.float64)) ** 2
            reference += float(torch.linalg.vector_norm(p0, dtype=torch.float64)) ** 2
    return math.sqrt(moved / reference) if reference > 0 else None
