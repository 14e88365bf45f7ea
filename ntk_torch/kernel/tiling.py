"""Blocks of the ``N1 x N2`` kernel under a memory budget, and the symmetry of ``x2=None``.

The kernel is built from square-ish blocks of ``b`` rows by ``b`` columns, with ``b`` the
largest block size whose estimated peak extra memory (:meth:`Engine.block_bytes`) fits
the budget. Every entry is computed by the same per-pair arithmetic whatever ``b`` is,
so the result does not depend on the tiling beyond floating-point summation order inside
a block's matmuls (tested to agree to round-off).

With ``x2=None`` only blocks ``J >= I`` are computed; block ``(J, I)`` is the transpose of
``(I, J)``, and diagonal blocks are symmetrised as ``(B + B^T) / 2``, which is exactly
symmetric in floating point because addition commutes -- unless the engine already
returns exactly symmetric diagonal blocks (:attr:`Engine.exact_symmetric`; the structured
engine computes their upper block triangle and mirrors it).

Each block is checked for non-finite entries with one reduction and copied into the
kernel once; when one block covers the whole kernel it is the kernel (no assembly copy).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
from tqdm import tqdm

from ..functional import Inputs, slice_inputs
from ..layout import Layout
from .engine import Engine

Tile = Tuple[int, int]


class NonFiniteBlock(Exception):
    """Internal: a block whose contribution of ``groups`` is not finite."""

    def __init__(self, groups: List[str], rows: Tile, cols: Tile):
        super().__init__(groups)
        self.groups = groups
        self.rows = rows
        self.cols = cols


def plan_block_size(
    engine: Engine, n1: int, n2: int, memory_budget: int, batch_size: Optional[int]
) -> int:
    """The largest block size ``b <= batch_size`` whose block fits ``memory_budget``."""
    limit = max(n1, n2) if batch_size is None else min(max(n1, n2), batch_size)

    def fits(b: int) -> bool:
        return engine.block_bytes(min(b, n1), min(b, n2)) <= memory_budget

    if not fits(1):
        warnings.warn(
            f"memory_budget={memory_budget} bytes is smaller than the estimated "
            f"{engine.block_bytes(1, 1)} bytes of a single 1x1 block for the "
            f"{engine.name} engine; computing one example pair at a time",
            RuntimeWarning,
            stacklevel=4,
        )
        return 1
    return largest_size(fits, limit)


def largest_size(holds: Callable[[int], bool], limit: int) -> int:
    """The largest ``b`` in ``[1, limit]`` for which ``holds(b)``, by bisection, for a
    ``holds`` true at 1 and false from some size on."""
    low, high = 1, limit
    while low < high:
        mid = (low + high + 1) // 2
        if holds(mid):
            low = mid
        else:
            high = mid - 1
    return low


def tiles(n: int, size: int) -> List[Tile]:
    """``[(0, size), (size, 2 size), ..., (., n)]``."""
    return [(start, min(start + size, n)) for start in range(0, n, size)]


@dataclass(frozen=True)
class BlockPair:
    """One block of the kernel: rows ``x1[rows[0]:rows[1]]`` against columns
    ``x2[cols[0]:cols[1]]``.

    Attributes:
        index: its position in :func:`block_pairs`' row-major list (the same on every
            process, so it names the block in progress records and between ranks).
        rows, cols: the example ranges.
        symmetric: part of the kernel of ``x2=None`` (only blocks with ``cols >= rows``
            exist; block ``(cols, rows)`` is this one's transpose).
    """

    index: int
    rows: Tile
    cols: Tile
    symmetric: bool

    @property
    def diagonal(self) -> bool:
        """A diagonal block of ``x2=None``: its columns are its rows."""
        return self.symmetric and self.rows == self.cols

    @property
    def mirrored(self) -> bool:
        """An off-diagonal block of ``x2=None``: it also fills its transpose's place."""
        return self.symmetric and self.rows != self.cols


def block_pairs(n1: int, n2: int, block_size: int, symmetric: bool) -> List[BlockPair]:
    """Every block of the ``n1 x n2`` kernel in row-major order; with ``symmetric`` only
    the upper block triangle (``J >= I``), ``T (T + 1) / 2`` blocks for ``T`` row tiles."""
    row_tiles, col_tiles = tiles(n1, block_size), tiles(n2, block_size)
    pairs: List[BlockPair] = []
    for i, rows in enumerate(row_tiles):
        for cols in col_tiles[i if symmetric else 0:]:
            pairs.append(BlockPair(len(pairs), rows, cols, symmetric))
    return pairs


def pair_count(n1: int, n2: int, block_size: int, symmetric: bool) -> int:
    """``len(block_pairs(n1, n2, block_size, symmetric))``, without listing them."""
    rows, cols = -(-n1 // block_size), -(-n2 // block_size)
    return rows * (rows + 1) // 2 if symmetric else rows * cols


def compute_blocks(
    engine: Engine, x1: Inputs, x2: Inputs, pairs: Sequence[BlockPair]
) -> Iterator[Tuple[BlockPair, Dict[str, torch.Tensor]]]:
    """``(pair, {group name: block})`` for each of ``pairs`` in order, in the engine
    layout's tensor shape; diagonal blocks of ``x2=None`` exactly symmetric.

    A row block's state is prepared once for consecutive pairs that share it. Raises
    :class:`NonFiniteBlock` at the first block with a non-finite contribution.
    """
    layout = engine.layout
    rows_tile, rows = None, None
    for pair in pairs:
        if pair.rows != rows_tile:
            rows = None  # free the previous row state first
            x_rows = slice_inputs(x1, *pair.rows)
            rows, rows_tile = engine.prepare_rows(x_rows), pair.rows
        if pair.diagonal:
            cols = engine.cols_from_rows(rows, x_rows)
        else:
            cols = engine.prepare_cols(slice_inputs(x2, *pair.cols))
        blocks = engine.contract(rows, cols)
        del cols
        bad = [name for name, block in blocks.items() if not all_finite(block)]
        if bad:
            raise NonFiniteBlock(bad, pair.rows, pair.cols)
        if pair.diagonal and not engine.exact_symmetric:
            blocks = {name: layout.symmetrize(block) for name, block in blocks.items()}
        yield pair, blocks


def place_block(kernel: torch.Tensor, layout: Layout, pair: BlockPair, block: torch.Tensor) -> None:
    """Copy ``block`` into its place in ``kernel`` (and its transpose into the mirrored
    place, for an off-diagonal block of ``x2=None``)."""
    (r0, r1), (c0, c1) = pair.rows, pair.cols
    kernel[r0:r1, c0:c1] = block
    if pair.mirrored:
        kernel[c0:c1, r0:r1] = layout.transpose(block)


def compute_kernel(
    engine: Engine,
    x1: Inputs,
    x2: Inputs,
    n1: int,
    n2: int,
    block_size: int,
    symmetric: bool,
    progress: bool = False,
) -> Dict[str, torch.Tensor]:
    """Every group's kernel over ``x1 x x2``, block by block.

    Returns ``{group name: kernel}`` with kernels of the engine layout's shape ``(n1, n2, O)``.
    Raises :class:`NonFiniteBlock` at the first block with a non-finite contribution.
    """
    fmodel, layout = engine.fmodel, engine.layout
    pairs = block_pairs(n1, n2, block_size, symmetric)
    if len(pairs) == 1:  # the whole kernel is this block: no assembly copy
        _, blocks = next(compute_blocks(engine, x1, x2, pairs))
        return {name: block.contiguous() for name, block in blocks.items()}
    shape = layout.shape(n1, n2, engine.num_outputs)
    kernels = {
        group.name: torch.empty(shape, dtype=fmodel.dtype, device=fmodel.device) for group in engine.groups
    }
    with tqdm(total=len(pairs), disable=not progress, desc="eNTK blocks", unit="block") as bar:
        for pair, blocks in compute_blocks(engine, x1, x2, pairs):
            for name in list(blocks):
                place_block(kernels[name], layout, pair, blocks.pop(name))
            bar.update()
    return kernels


def all_finite(block: torch.Tensor) -> bool:
    """Whether every entry is finite: one reduction (a NaN or inf entry makes the sum
    non-finite), and the element-wise test only when the sum is not finite (it may
    overflow although every entry is finite)."""
    if block.is_floating_point() and bool(torch.isfinite(block.sum())):
        return True
    return bool(torch.isfinite(block).all())
