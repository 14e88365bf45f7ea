"""How the probe kernel moves: the record fields of each measured kernel.

A :class:`KernelDrift` keeps the kernel at step 0 and the previous finite one, and turns
each newly measured kernel (per parameter group, :class:`~ntk_torch.kernel.PerLayerKernels`)
into the fields of its record (:mod:`ntk_torch.records`): trace, Frobenius norm, top
eigenvalues and effective rank (one eigendecomposition), centred target alignment with the
probe labels, relative change and kernel distance from step 0, velocity since the
previous measurement, and each group's share of the trace. Only those two kernels stay in
memory (with one retired copy kept for reuse), so it does not grow with the number of
measurements.

The fields are computed fused (:class:`_Fused`): the kernel's diagonal blocks are copied
to contiguous float64 in one pass (into the memory of a retired measurement's copy, so
that none is faulted in afresh) and their Frobenius norm taken once, the reference and previous
kernels keep their copies and norms, differences are taken in chunks (no full-size
temporary), the centred target alignment is read from one product of the kernel with the
centred probe targets (never an n x n target kernel or a centred copy of the kernel,
n = N*O for ``full`` and ``diagonal``), and the spectrum (:class:`Spectrum`: the whole, or
the top by block Lanczos for a large matrix) skips the symmetrisation of a kernel that is
exactly symmetric (every engine's ``x2=None`` kernel is). The values are those of the
:mod:`ntk_torch.metrics` functions (the same formulas, the alignment's rearranged, on the
same float64 tensors).
"""

from __future__ import annotations

import math
from typing import Any, Callable, Dict, Optional, Tuple, Union

import torch

from . import metrics, records
from ._options import check_choice
from .kernel import PerLayerKernels
from .layout import Layout
from .spectral import eigsh

TOP_EIGENVALUES = 10
"""How many of the largest kernel eigenvalues each record keeps."""
SPECTRA = ("auto", "full", "top")
"""How each kernel's spectrum is recorded (``NTKTracker(spectrum=...)``, :class:`Spectrum`)."""
WHOLE_SPECTRUM_WORK = 1024 ** 3
"""With ``spectrum="auto"``, the whole spectrum while its work ``B m^3`` (``B`` blocks of
``m`` rows) is at most this: one 1024 x 1024 kernel, 0.1-0.2 s at one thread here."""
TOP_TOL = 1e-8
"""Relative residual at which ``spectrum="top"`` accepts a Ritz value (:func:`~ntk_torch.eigsh`)."""


def _or_none(metric: Callable[..., float], *args: Any) -> Optional[float]:
    """``metric(*args)``, or None where it is undefined (a zero-norm kernel, constant
    targets): the metrics raise ``ValueError`` for those."""
    try:
        return metric(*args)
    except ValueError:
        return None


CHUNK = 2 ** 17
"""Float64 entries per chunk of :func:`_difference_norm` (1 MB)."""


def _difference_norm(A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """``|A - B|_F`` of two tensors of one shape, taken over chunks of rows so that no
    full-size difference is allocated (and faulted in afresh) for each measurement."""
    A, B = A.reshape(-1, A.shape[-1]), B.reshape(-1, B.shape[-1])
    rows = max(1, CHUNK // A.shape[1])
    squares = A.new_zeros(())
    for start in range(0, A.shape[0], rows):
        squares += torch.linalg.vector_norm(A[start:start + rows] - B[start:start + rows]).square()
    return squares.sqrt()


def _exactly_symmetric(blocks: torch.Tensor) -> bool:
    """Whether every block equals its transpose exactly, compared tile by tile (a
    transposed read of a whole large block is slow)."""
    rows, tile = blocks.shape[1], 256
    for a in range(0, rows, tile):
        for b in range(a, rows, tile):
            if not torch.equal(blocks[:, a:a + tile, b:b + tile], blocks[:, b:b + tile, a:a + tile].mT):
                return False
    return True


class _Fused:
    """A kernel's matrix as its diagonal blocks ``(B, m, m)`` (:meth:`Layout.blocks
    <ntk_torch.layout.Layout.blocks>`) in contiguous float64, with its Frobenius norm.

    The Frobenius products of the drift measures do not depend on how the entries are
    arranged (the zero blocks add nothing), so this one copy serves them, the spectrum and
    the alignment. It is written into ``spare`` (a retired measurement's blocks) when that
    fits: a ``full`` probe kernel's 2560 x 2560 float64 copy is 52 MB, whose pages would
    otherwise be faulted in afresh for every measurement."""

    def __init__(self, K: torch.Tensor, layout: Layout, spare: Optional[torch.Tensor] = None) -> None:
        K = K.detach()
        self.blocks = layout.contiguous_blocks(K, torch.float64, spare)
        #: Whether the blocks are a copy (which a later measurement may overwrite), not K's memory.
        self.owned = self.blocks.untyped_storage().data_ptr() != K.untyped_storage().data_ptr()
        self.norm = torch.linalg.vector_norm(self.blocks)

    def relative_change(self, reference: "_Fused") -> Optional[float]:
        """``|K - K0|_F / |K0|_F`` (:func:`~ntk_torch.metrics.relative_change`)."""
        if reference.norm == 0:
            return None
        return float(_difference_norm(self.blocks, reference.blocks) / reference.norm)

    def distance(self, other: "_Fused") -> Optional[float]:
        """``1 - <K1, K2>_F / (|K1|_F |K2|_F)`` (:func:`~ntk_torch.metrics.kernel_distance`)."""
        if self.norm == 0 or other.norm == 0:
            return None
        inner = torch.dot(self.blocks.view(-1), other.blocks.view(-1))
        return 1.0 - float(inner / (self.norm * other.norm))


class _Alignment:
    """Centred kernel-target alignment against fixed probe labels
    (:func:`~ntk_torch.metrics.target_alignment`), read from one product of the kernel's
    blocks with ``[H Y, 1]`` (:func:`~ntk_torch.metrics.centred_alignment_terms`; the
    targets' rows in the blocks' order, which leaves the alignment unchanged): neither the
    n x n target kernel nor a centred copy of the kernel is formed (for a ``full`` or
    ``diagonal`` probe kernel n is N*O). A kernel that is not exactly symmetric, or so
    nearly constant that ``|H K H|_F^2`` would cancel, is centred explicitly instead."""

    #: Below this fraction of ``|K|_F^2``, ``|H K H|_F^2`` is computed by explicit centring.
    CANCELLATION = 1e-6

    def __init__(self, layout: Layout, labels: torch.Tensor) -> None:
        self.layout = layout
        self.labels = labels
        self.targets: Optional[metrics.CentredTargets] = None

    def __call__(self, K: torch.Tensor, fused: _Fused, symmetric: bool) -> Optional[float]:
        blocks = fused.blocks
        count, rows, _ = blocks.shape
        if self.targets is None:
            try:
                targets = metrics.centred_targets(self.labels.cpu(), K.shape[0], self.layout.num_outputs(K))
            except ValueError:
                return None
            centred = self.layout.in_block_order(targets.centred, count).to(blocks.device)
            self.targets = metrics.CentredTargets(centred, targets.norm)
        columns = self.targets.columns()
        product = torch.bmm(blocks, columns.view(count, rows, -1)).reshape(count * rows, -1)
        frobenius = float(fused.norm)
        inner, centred_squared = metrics.centred_alignment_terms(product, self.targets, frobenius)
        if not symmetric or centred_squared <= self.CANCELLATION * frobenius ** 2:
            centred = metrics.center(torch.block_diag(*blocks))  # the matrix, rows in the blocks' order
            Yc = self.targets.centred
            inner, centred_squared = float((Yc * (centred @ Yc)).sum()), float(torch.linalg.vector_norm(centred)) ** 2
        if centred_squared <= 0 or self.targets.norm == 0:
            return None
        return inner / (math.sqrt(centred_squared) * self.targets.norm)


class Spectrum:
    """The spectral fields of a kernel's matrix, given as its diagonal blocks ``(B, m, m)``
    (:meth:`~ntk_torch.layout.Layout.blocks`) in float64.

    * ``"full"``: every eigenvalue (one ``eigvalsh`` per block, ``B m^3`` work): the
      ``TOP_EIGENVALUES`` largest and the effective rank;
    * ``"top"``: only the ``TOP_EIGENVALUES`` largest, by block Lanczos
      (:func:`~ntk_torch.eigsh`, a few dozen products with ``k`` columns; each Ritz value's
      residual in ``top_eigenvalues_error``, an eigenvalue lies within it); the effective
      rank (the whole spectrum) is None;
    * ``"auto"``: ``"full"`` while ``B m^3 <= WHOLE_SPECTRUM_WORK``, else ``"top"`` (a
      ``full``-mode kernel of 256 examples and 10 outputs is one 2560 x 2560 block: its
      whole spectrum takes about 1.3 s at one thread, its top ten about 0.2 s).
    """

    def __init__(self, choice: str = "auto") -> None:
        self.choice = check_choice("spectrum", choice, SPECTRA)

    def whole(self, blocks: torch.Tensor) -> bool:
        """Whether the whole spectrum of these blocks is computed."""
        if self.choice == "auto":
            count, rows, _ = blocks.shape
            return count * rows ** 3 <= WHOLE_SPECTRUM_WORK
        return self.choice == "full"

    def fields(self, blocks: torch.Tensor, symmetric: bool) -> Dict[str, Any]:
        """``top_eigenvalues`` and ``effective_rank`` (and ``top_eigenvalues_error`` for
        ``"top"``) of the blocks; ``symmetric``: whether they are exactly symmetric (else
        their asymmetry is checked to be round-off and they are symmetrised)."""
        if not symmetric:
            blocks = metrics.symmetrised(blocks, "K")
        if self.whole(blocks):
            eigenvalues = torch.linalg.eigvalsh(blocks).flatten().sort().values.flip(0)
            return {records.TOP_EIGENVALUES: eigenvalues[:TOP_EIGENVALUES].tolist(),
                    records.EFFECTIVE_RANK: _or_none(metrics.effective_rank_of_spectrum, eigenvalues)}
        values, residuals = map(torch.cat, zip(*(self._top(block) for block in blocks)))
        order = torch.argsort(values, descending=True)[:TOP_EIGENVALUES]
        return {records.TOP_EIGENVALUES: values[order].tolist(), records.EFFECTIVE_RANK: None,
                records.error(records.TOP_EIGENVALUES): residuals[order].tolist()}

    @staticmethod
    def _top(block: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """The largest eigenvalues of one block and their residuals, on the CPU (residual 0
        where a block of at most ``TOP_EIGENVALUES`` rows is decomposed whole)."""
        if block.shape[0] <= TOP_EIGENVALUES:
            values = torch.linalg.eigvalsh(block).cpu()
            return values, torch.zeros_like(values)
        top = eigsh(block, TOP_EIGENVALUES, tol=TOP_TOL, seed=0)
        return top.eigenvalues.cpu(), top.residuals.cpu()


class KernelDrift:
    """The record fields of probe kernels measured in order (see the module docstring).

    Args:
        layout: the kernels' layout.
        labels: the probe's targets, for the kernel-target alignment.
        reference: the infinite-width kernel in ``layout``
            (:func:`ntk_torch.analytic.reference_kernel`): each record then has
            ``analytic_distance``, the relative Frobenius distance from it.
        spectrum: ``"auto"``, ``"full"`` or ``"top"``: how much of each kernel's spectrum
            is computed (:class:`Spectrum`).
    """

    def __init__(self, layout: Layout, labels: torch.Tensor, reference: Optional[torch.Tensor] = None,
                 spectrum: str = "auto") -> None:
        self.layout = layout
        self.spectrum = Spectrum(spectrum)
        self.labels = labels
        self.reference = reference  # the infinite-width kernel in this layout, or None
        self.initial: Optional[torch.Tensor] = None
        self.previous: Optional[Tuple[int, torch.Tensor]] = None
        self._initial: Optional[_Fused] = None
        self._previous: Optional[_Fused] = None
        self._spare: Optional[torch.Tensor] = None  # a retired copy's memory, for the next one
        self._alignment = _Alignment(layout, labels)

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
        fused, self._spare = _Fused(K, self.layout, self._spare), None
        shares = self._shares(kernels) if split else {records.LAYER_SHARE: None}
        fields = {**self._statistics(K, fused), **self._drift(step, fused), **shares}
        if self.reference is not None:
            fields[records.ANALYTIC_DISTANCE] = _or_none(metrics.relative_change, K, self.reference)
        if step == 0:
            self.initial, self._initial = K, fused
        retired, (self.previous, self._previous) = self._previous, ((step, K), fused)
        if retired is not None and retired is not self._initial and retired.owned:
            self._spare = retired.blocks  # the reference, the previous and this: three copies at most
        return fields

    def _statistics(self, K: torch.Tensor, fused: _Fused) -> Dict[str, Any]:
        symmetric = _exactly_symmetric(fused.blocks)  # else round-off asymmetry: checked, symmetrised
        return {
            records.TRACE: self.layout.matrix_trace(K),
            records.FROBENIUS: float(fused.norm),
            **self.spectrum.fields(fused.blocks, symmetric),
            records.TARGET_ALIGNMENT: self._alignment(K, fused, symmetric),
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
