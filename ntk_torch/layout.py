r"""Kernel layouts: the one place that knows how an empirical NTK is laid out.

For ``N1 x N2`` examples, ``O`` outputs per example and the Jacobian
``J[i, a, p] = d f_a(x_i) / d theta_p``, the kernel ``Theta(x_i, x'_j)_ab = sum_p
J1[i, a, p] J2[j, b, p]`` is returned in one of three layouts (``empirical_ntk``'s
``mode``):

==========  ==================  ===============================================
layout      tensor shape        entries
==========  ==================  ===============================================
``full``    ``(N1, N2, O, O)``  ``K[i, j, a, b]``
``trace``   ``(N1, N2)``        ``sum_a K[i, j, a, a]``
``diagonal`` ``(N1, N2, O)``    ``K[i, j, a, a]``
==========  ==================  ===============================================

``mode="pntk"`` (:data:`PNTK`) is the sum-of-logits kernel of Mohamadi, Bae & Sutherland
(2023), ``(1/O) grad(sum_a f_a(x_i)) . grad(sum_b f_b(x'_j)) = (1/O) sum_{a,b} K[i, j, a, b]``:
an ``(N1, N2)`` tensor read like ``trace`` (the engines compute it as the ``trace`` kernel
of the one-output function ``sum_a f_a / sqrt(O)``, :attr:`Layout.computed_as`), one
backward pass per example instead of ``O``.

Every layout is also read as a matrix (:meth:`Layout.matrix`):

* ``full``: the ``(N1 O) x (N2 O)`` matrix with rows indexed by ``(i, a)`` and columns by
  ``(j, b)`` (row ``i * O + a``), i.e. ``K.permute(0, 2, 1, 3).reshape(N1 O, N2 O)``;
* ``trace``: the ``N1 x N2`` matrix as it is;
* ``diagonal``: the block-diagonal full kernel ``K[i, j, a, b] = D[i, j, a] delta_ab``, the
  cross-output blocks taken to be zero: ``O`` independent ``N1 x N2`` blocks
  (:meth:`Layout.blocks`), so that spectra are computed per output.

The Frobenius inner product of two kernels does not depend on the reading (it only moves
entries around and the zero blocks add nothing), so drift and alignment work on the tensor
itself.

Engines accumulate blocks in a *work layout* chosen so that every update is one BLAS call
or one fused element-wise pass (``full`` ``(n1, O, n2, O)``, ``trace`` ``(n1, n2)``,
``diagonal`` ``(O, n1, n2)``); :meth:`Layout.from_work` turns it into the tensor layout,
and :meth:`Layout.mirror_work` completes the symmetric kernel of ``x2 = None`` from its
upper block triangle. Code elsewhere never compares mode strings: it asks the layout, or
passes per-layout alternatives to :meth:`Layout.choose`.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Tuple, TypeVar

import torch
from torch import Tensor

__all__ = ["DIAGONAL", "FULL", "KERNEL_MODES", "LAYOUTS", "Layout", "MODES", "PNTK", "TRACE", "layout", "layout_of"]

T = TypeVar("T")

_SHAPES = "(N1, N2) trace, (N1, N2, O) diagonal or (N1, N2, O, O) full"
_SQUARE_SHAPES = {"full": "(N, N, O, O)", "trace": "(N, N)", "diagonal": "(N, N, O)"}


class Layout:
    """One kernel layout; the three instances are :data:`FULL`, :data:`TRACE`, :data:`DIAGONAL`."""

    name: str = ""
    ndim: int = 0
    #: Whether the layout sums over outputs (``trace``), so that ``O`` is not in its shape.
    sums_outputs: bool = False
    #: Whether the kernel is that of the summed logits ``sum_a f_a / sqrt(O)`` (``pntk``).
    sums_logits: bool = False

    @property
    def computed_as(self) -> "Layout":
        """The layout the engines compute: ``trace`` (of the summed logits) for ``pntk``,
        the layout itself otherwise."""
        return self

    # ------------------------------------------------------------------ shapes

    def shape(self, n1: int, n2: int, o: int) -> Tuple[int, ...]:
        """The shape of a kernel (block) of ``n1`` rows, ``n2`` columns and ``O`` outputs."""
        raise NotImplementedError

    def num_outputs(self, K: Tensor) -> Optional[int]:
        """``O`` of a kernel in this layout, or None where it is summed away (``trace``)."""
        return None if self.sums_outputs else int(K.shape[2])

    def choose(self, *, full: T, trace: T, diagonal: T) -> T:
        """The alternative for this layout: ``FULL.choose(full=a, trace=b, diagonal=c)``
        is ``a``. Engines keep their per-layout arithmetic in such tables."""
        raise NotImplementedError

    # ------------------------------------------------------------------ matrix views

    def blocks(self, K: Tensor) -> Tensor:
        """``(B, M1, M2)``: the matrix ``K`` stands for is block-diagonal with these blocks
        (one block for ``full`` and ``trace``, one per output for ``diagonal``)."""
        raise NotImplementedError

    def contiguous_blocks(self, K: Tensor, dtype: torch.dtype, out: Optional[Tensor] = None) -> Tensor:
        """:meth:`blocks` as one contiguous tensor of ``dtype``, arranged and converted by a
        single copy: into ``out`` when it has the blocks' shape, ``dtype`` and device (a
        buffer reused across calls, so that no fresh memory is faulted in), else into new
        memory; ``K``'s own blocks, uncopied, when they already are contiguous ``dtype``
        (whatever ``out``)."""
        return _copied(self.blocks(K), dtype, out)

    def matrix(self, K: Tensor) -> Tensor:
        """The 2-D matrix ``K`` stands for (see the module docstring)."""
        raise NotImplementedError

    def in_block_order(self, V: Tensor, count: int) -> Tensor:
        """The rows of ``V`` (``(M, c)``, indexed like the rows of :meth:`matrix`) in the
        order of the rows of the ``count`` :meth:`blocks` stacked: unchanged for ``full`` and
        ``trace``; for ``diagonal`` row ``i * O + a`` moves to ``a * N + i``."""
        return V

    def matrix_trace(self, K: Tensor) -> float:
        """The trace of that matrix, summed in float64: ``sum_i K[i, i]`` (trace),
        ``sum_{i,a} K[i, i, a]`` (diagonal), ``sum_{i,a} K[i, i, a, a]`` (full)."""
        return float(self.to_trace(K).diagonal().sum(dtype=torch.float64))

    def to_trace(self, K: Tensor) -> Tensor:
        """The ``trace`` layout of ``K``: ``(N1, N2)``, summed over the outputs."""
        raise NotImplementedError

    def transpose(self, K: Tensor) -> Tensor:
        """``K(x2, x1)`` from ``K(x1, x2)``: examples swapped (and outputs, in ``full``)."""
        return K.transpose(0, 1)

    def symmetrize(self, K: Tensor) -> Tensor:
        """``(K + K^T) / 2``: exactly symmetric in floating point, since addition commutes."""
        return (K + self.transpose(K)) / 2

    # ------------------------------------------------------------------ contractions

    def output_pairs(self, o: int) -> int:
        """Products of output components per example pair and parameter that a kernel
        entry sums: ``O^2`` (full), ``O`` (trace, diagonal)."""
        return o

    def entries_per_pair(self, o: int) -> int:
        """Kernel entries per example pair: ``O^2`` (full), 1 (trace), ``O`` (diagonal)."""
        raise NotImplementedError

    def add_output_entries(self, block: Tensor, a: int, entries: Tensor) -> None:
        """Add ``K[:, :, a, a]`` (``(N1, N2)``) to a ``trace`` or ``diagonal`` block."""
        raise NotImplementedError(f"{self.name} blocks are not built one output at a time")

    # ------------------------------------------------------------------ work layout

    def work_shape(self, n1: int, n2: int, o: int) -> Tuple[int, ...]:
        """The accumulator layout of a block (see the module docstring)."""
        raise NotImplementedError

    def work_rows(self, o: int) -> int:
        """Rows per example of the work layout's matrix: ``O`` (full), 1 otherwise."""
        return 1

    def from_work(self, acc: Tensor) -> Tensor:
        """The kernel block from its work layout, as a view."""
        raise NotImplementedError

    def work_matrix(self, acc: Tensor, o: int) -> Tensor:
        """The work accumulator as (a batch of) square-able matrices whose rows are
        ``work_rows(o)`` per example."""
        return acc

    def add_gradient_products(self, acc: Tensor, g1: Tensor, g2: Tensor) -> None:
        """``acc += J1 J2^T`` in the work layout, for ``J`` ``(n, O, p)``: one BLAS call."""
        raise NotImplementedError

    def work_upper(self, acc: Tensor, a: int, b: int) -> Tensor:
        """The work-layout view of rows ``a:b`` against columns ``a:``."""
        raise NotImplementedError

    def symmetric_chunks(self, n: int, o: int, min_rows: int, max_chunks: int) -> List[Tuple[int, int]]:
        """Example ranges splitting a square ``n x n`` work block of ``x2 = None`` into
        ``k`` chunks whose upper block triangle (chunk pairs ``r <= c``) costs ``(k + 1) /
        2k`` of the whole block's products. ``k <= max_chunks`` and each chunk keeps at
        least ``min_rows`` work-matrix rows (``n work_rows(o) / k``) for efficient matmuls."""
        k = max(1, min(max_chunks, n * self.work_rows(o) // max(min_rows, 1), n))
        size = -(-n // k)
        return [(a, min(a + size, n)) for a in range(0, n, size)]

    def add_symmetric_gradient_products(
        self, acc: Tensor, g: Tensor, o: int, bounds: Sequence[Tuple[int, int]]
    ) -> None:
        """``acc += J J^T`` for a square work block, only its upper block triangle over
        ``bounds`` (rows ``a:b`` against columns ``a:``); :meth:`mirror_work` completes it."""
        n = g.shape[0]
        for a, b in bounds:
            self.add_gradient_products(self.work_upper(acc, a, b), g[a:b], g[a:n])

    def mirror_work(self, acc: Tensor, o: int, bounds: Sequence[Tuple[int, int]]) -> None:
        """Fill the lower block triangle of a square work block from its upper one (rows
        ``bounds`` computed against the columns from their start on) and make each diagonal
        chunk ``(D + D^T) / 2``, so that the block is exactly symmetric."""
        m = self.work_matrix(acc, o)
        scale = self.work_rows(o)
        for a, b in bounds:
            r0, r1 = a * scale, b * scale
            d = m[..., r0:r1, r0:r1]
            d.copy_((d + d.transpose(-1, -2)) / 2)
            if r0 > 0:
                m[..., r0:r1, :r0].copy_(m[..., :r0, r0:r1].transpose(-1, -2))

    def __repr__(self) -> str:
        return f"<{self.name} kernel layout>"

    def __reduce__(self) -> Any:
        return (layout, (self.name,))


class _Full(Layout):
    name, ndim = "full", 4

    def shape(self, n1: int, n2: int, o: int) -> Tuple[int, ...]:
        return (n1, n2, o, o)

    def choose(self, *, full: T, trace: T, diagonal: T) -> T:
        return full

    def blocks(self, K: Tensor) -> Tensor:
        return self.matrix(K).unsqueeze(0)

    def contiguous_blocks(self, K: Tensor, dtype: torch.dtype, out: Optional[Tensor] = None) -> Tensor:
        n1, n2, o, _ = K.shape
        # The matrix's entries as the view (1, N1, O, N2, O), copied once: reshaping the
        # view first would copy it in K's dtype, then again to convert.
        fits = out is not None and out.shape == (1, n1 * o, n2 * o) and out.is_contiguous()
        copied = _copied(K.permute(0, 2, 1, 3).unsqueeze(0), dtype, out.view(1, n1, o, n2, o) if fits else None)
        return copied.view(1, n1 * o, n2 * o)

    def matrix(self, K: Tensor) -> Tensor:
        n1, n2, o, _ = K.shape
        return K.permute(0, 2, 1, 3).reshape(n1 * o, n2 * o)

    def to_trace(self, K: Tensor) -> Tensor:
        return K.diagonal(dim1=2, dim2=3).sum(-1)

    def transpose(self, K: Tensor) -> Tensor:
        return K.permute(1, 0, 3, 2)

    def output_pairs(self, o: int) -> int:
        return o * o

    def entries_per_pair(self, o: int) -> int:
        return o * o

    def work_shape(self, n1: int, n2: int, o: int) -> Tuple[int, ...]:
        return (n1, o, n2, o)

    def work_rows(self, o: int) -> int:
        return o

    def from_work(self, acc: Tensor) -> Tensor:
        return acc.permute(0, 2, 1, 3)

    def work_matrix(self, acc: Tensor, o: int) -> Tensor:
        return acc.view(acc.shape[0] * o, acc.shape[2] * o)

    def add_gradient_products(self, acc: Tensor, g1: Tensor, g2: Tensor) -> None:
        n1, o, p = g1.shape
        n2 = g2.shape[0]
        acc.view(n1 * o, n2 * o).addmm_(g1.reshape(n1 * o, p), g2.reshape(n2 * o, p).T)

    def work_upper(self, acc: Tensor, a: int, b: int) -> Tensor:
        return acc[a:b, :, a:, :]


class _Trace(Layout):
    name, ndim, sums_outputs = "trace", 2, True

    def shape(self, n1: int, n2: int, o: int) -> Tuple[int, ...]:
        return (n1, n2)

    def choose(self, *, full: T, trace: T, diagonal: T) -> T:
        return trace

    def blocks(self, K: Tensor) -> Tensor:
        return K.unsqueeze(0)

    def matrix(self, K: Tensor) -> Tensor:
        return K

    def to_trace(self, K: Tensor) -> Tensor:
        return K

    def entries_per_pair(self, o: int) -> int:
        return 1

    def add_output_entries(self, block: Tensor, a: int, entries: Tensor) -> None:
        block += entries

    def work_shape(self, n1: int, n2: int, o: int) -> Tuple[int, ...]:
        return (n1, n2)

    def from_work(self, acc: Tensor) -> Tensor:
        return acc

    def add_gradient_products(self, acc: Tensor, g1: Tensor, g2: Tensor) -> None:
        n1, o, p = g1.shape
        acc.addmm_(g1.reshape(n1, o * p), g2.reshape(g2.shape[0], o * p).T)

    def work_upper(self, acc: Tensor, a: int, b: int) -> Tensor:
        return acc[a:b, a:]


class _PNTK(_Trace):
    """The pNTK: the ``trace`` kernel of ``sum_a f_a / sqrt(O)`` (one output)."""

    name, sums_logits = "pntk", True

    @property
    def computed_as(self) -> Layout:
        return TRACE


class _Diagonal(Layout):
    name, ndim = "diagonal", 3

    def shape(self, n1: int, n2: int, o: int) -> Tuple[int, ...]:
        return (n1, n2, o)

    def choose(self, *, full: T, trace: T, diagonal: T) -> T:
        return diagonal

    def blocks(self, K: Tensor) -> Tensor:
        return K.permute(2, 0, 1)

    def matrix(self, K: Tensor) -> Tensor:
        return FULL.matrix(torch.diag_embed(K))

    def in_block_order(self, V: Tensor, count: int) -> Tensor:
        return V.reshape(-1, count, V.shape[-1]).transpose(0, 1).reshape(-1, V.shape[-1])

    def to_trace(self, K: Tensor) -> Tensor:
        return K.sum(-1)

    def entries_per_pair(self, o: int) -> int:
        return o

    def add_output_entries(self, block: Tensor, a: int, entries: Tensor) -> None:
        block[:, :, a] += entries

    def work_shape(self, n1: int, n2: int, o: int) -> Tuple[int, ...]:
        return (o, n1, n2)

    def from_work(self, acc: Tensor) -> Tensor:
        return acc.permute(1, 2, 0)

    def add_gradient_products(self, acc: Tensor, g1: Tensor, g2: Tensor) -> None:
        acc.baddbmm_(g1.transpose(0, 1), g2.permute(1, 2, 0))

    def work_upper(self, acc: Tensor, a: int, b: int) -> Tensor:
        return acc[:, a:b, a:]


FULL: Layout = _Full()
TRACE: Layout = _Trace()
DIAGONAL: Layout = _Diagonal()
LAYOUTS: Dict[str, Layout] = {FULL.name: FULL, TRACE.name: TRACE, DIAGONAL.name: DIAGONAL}
MODES: Tuple[str, ...] = tuple(LAYOUTS)
"""The tensor layout names (a kernel's shape tells which)."""
PNTK: Layout = _PNTK()
KERNEL_MODES: Tuple[str, ...] = MODES + (PNTK.name,)
"""Every ``mode`` ``empirical_ntk`` takes: the layouts and ``pntk`` (stored as ``trace``)."""


def _copied(entries: Tensor, dtype: torch.dtype, out: Optional[Tensor]) -> Tensor:
    """``entries`` as contiguous ``dtype`` (:meth:`Layout.contiguous_blocks`)."""
    if entries.dtype == dtype and entries.is_contiguous():
        return entries
    fits = (out is not None and out.shape == entries.shape and out.dtype == dtype
            and out.device == entries.device and out.is_contiguous())
    target = out if fits else torch.empty(entries.shape, dtype=dtype, device=entries.device)
    return target.copy_(entries)


def layout(mode: Any, name: str = "mode") -> Layout:
    """The layout called ``mode`` (a :class:`Layout` is returned as it is).

    Raises:
        ValueError: ``mode`` is none of :data:`MODES`, naming the argument ``name``.
    """
    if isinstance(mode, Layout):
        return mode
    if isinstance(mode, str) and mode in LAYOUTS:
        return LAYOUTS[mode]
    if mode == PNTK.name:
        return PNTK
    raise ValueError(f"{name} must be one of {', '.join(map(repr, KERNEL_MODES))}, got {mode!r}")


def layout_of(K: Any, name: str = "K", allowed: Optional[Sequence[Layout]] = None) -> Layout:
    """The layout of a kernel tensor (or array), read from its shape.

    Args:
        K: a kernel; only ``K.shape`` is read.
        name: the argument's name for error messages.
        allowed: the layouts the caller accepts (default all three).

    Raises:
        ValueError: the shape is no kernel layout's (a ``full`` kernel needs equal output
            dimensions), or its layout is not ``allowed``.
    """
    shape = tuple(K.shape)
    found = {2: TRACE, 3: DIAGONAL, 4: FULL}.get(len(shape))
    if found is None:
        raise ValueError(f"{name} has shape {shape} but a kernel is {_SHAPES}")
    if found is FULL and shape[2] != shape[3]:
        raise ValueError(
            f"{name} has shape {shape} but a full kernel is (N1, N2, O, O) with equal output dimensions"
        )
    if allowed is not None and found not in allowed:
        kinds = " or ".join(f"a {option.name} kernel {_SQUARE_SHAPES[option.name]}" for option in allowed)
        raise ValueError(f"{name} must be {kinds}; got shape {shape}")
    return found


