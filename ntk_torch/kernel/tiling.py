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
from typing import Dict, List, Optional, Tuple

import torch
from tqdm import tqdm

from ..functional import Inputs, slice_inputs
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
    low, high = 1, limit  # fits(low) holds; find the largest b that fits
    while low < high:
        mid = (low + high + 1) // 2
        if fits(mid):
            low = mid
        else:
            high = mid - 1
    return low


def tiles(n: int, size: int) -> List[Tile]:
    """``[(0, size), (size, 2 size), ..., (., n)]``."""
    return [(start, min(start + size, n)) for start in range(0, n, size)]


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
    shape = layout.shape(n1, n2, engine.num_outputs)
    row_tiles, col_tiles = tiles(n1, block_size), tiles(n2, block_size)
    single = len(row_tiles) == 1 and len(col_tiles) == 1
    kernels: Dict[str, torch.Tensor] = {}
    if not single:
        kernels = {
            group.name: torch.empty(shape, dtype=fmodel.dtype, device=fmodel.device)
            for group in engine.groups
        }
    num_pairs = (
        len(row_tiles) * (len(row_tiles) + 1) // 2 if symmetric else len(row_tiles) * len(col_tiles)
    )
    with tqdm(total=num_pairs, disable=not progress, desc="eNTK blocks", unit="block") as bar:
        for i, (r0, r1) in enumerate(row_tiles):
            x_rows = slice_inputs(x1, r0, r1)
            rows = engine.prepare_rows(x_rows)
            for j, (c0, c1) in enumerate(col_tiles):
                if symmetric and j < i:
                    continue
                if symmetric and j == i:
                    cols = engine.cols_from_rows(rows, x_rows)
                else:
                    cols = engine.prepare_cols(slice_inputs(x2, c0, c1))
                blocks = engine.contract(rows, cols)
                del cols
                bad = [name for name, block in blocks.items() if not all_finite(block)]
                if bad:
                    raise NonFiniteBlock(bad, (r0, r1), (c0, c1))
                for name in list(blocks):
                    block = blocks.pop(name)
                    if symmetric and i == j and not engine.exact_symmetric:
                        block = layout.symmetrize(block)
                    if single:
                        # The whole kernel is this block: no assembly copy.
                        kernels[name] = block.contiguous()
                        continue
                    kernels[name][r0:r1, c0:c1] = block
                    if symmetric and i != j:
                        kernels[name][c0:c1, r0:r1] = layout.transpose(block)
                    del block
                bar.update()
            del rows
    return kernels


def all_finite(block: torch.Tensor) -> bool:
    """Whether every entry is finite: one reduction (a NaN or inf entry makes the sum
    non-finite), and the element-wise test only when the sum is not finite (it may
    overflow although every entry is finite)."""
    if block.is_floating_point() and bool(torch.isfinite(block.sum())):
        return True
    return bool(torch.isfinite(block).all())
