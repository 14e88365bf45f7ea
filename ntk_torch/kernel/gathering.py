"""A distributed kernel assembled: each rank's blocks sent to every rank or to rank 0, or kept.

Every rank knows every rank's share of the block pairs (:func:`.distributed.assign` is
deterministic), hence the shape of every block it will receive: the blocks travel as flat
buffers with no metadata. The exchange runs in rounds so that its buffers stay within the
memory budget: in round ``k`` each rank sends the concatenation of its next blocks (each
group's, in group order) that fit in ``limit`` elements (always at least one block), padded
to the longest contribution of that round, with one ``all_gather`` (``gather="all"``) or
``gather`` to rank 0 (``"rank0"``). Receivers copy each block into its place, and its
transpose into the mirrored place for ``x2=None``. For ``x2=None`` only the upper block
triangle travels: a rank sends about ``1 / (2 R)`` of the kernel's entries (``1 / R`` for
``x1 != x2``), to each of the others with ``all_gather`` or to rank 0 alone with ``gather``.

``gather="none"`` keeps each rank's blocks as a :class:`KernelShard`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from ..layout import Layout
from .distributed import Ranks
from .tiling import BlockPair, Tile, place_block

Blocks = Dict[str, torch.Tensor]


@dataclass(frozen=True)
class KernelTile:
    """One block of a kernel: ``kernel[rows[0]:rows[1], cols[0]:cols[1]] == block``.

    Attributes:
        rows, cols: the example ranges of ``x1`` and ``x2``.
        block: the block, in the kernel's layout (``(r, c)`` trace, ``(r, c, O)``
            diagonal, ``(r, c, O, O)`` full), on the model's device.
        parts: with ``per_layer=True``, each parameter group's block (``block`` is their
            sum); else None.
    """

    rows: Tile
    cols: Tile
    block: torch.Tensor
    parts: Optional[Dict[str, torch.Tensor]] = None


@dataclass(frozen=True)
class KernelShard:
    """What one rank computed of a kernel, with ``gather="none"``.

    Attributes:
        tiles: this rank's blocks, rows then columns in order.
        shape: the whole kernel's shape.
        symmetric: the kernel of ``x2=None``: tiles cover only the upper block triangle
            (``cols[0] >= rows[0]``); block ``(cols, rows)`` is the transpose of
            ``(rows, cols)`` (``K.transpose(0, 1)``, and the output axes swapped in
            ``full``), and diagonal blocks are exactly symmetric.
        rank, world_size: this process in its group.

    The tiles of all ranks together cover the kernel (its upper block triangle) once.
    """

    tiles: List[KernelTile]
    shape: Tuple[int, ...]
    symmetric: bool
    rank: int
    world_size: int

    def __len__(self) -> int:
        return len(self.tiles)

    def __iter__(self):
        return iter(self.tiles)


def make_tile(pair: BlockPair, blocks: Blocks, per_layer: bool) -> KernelTile:
    """The :class:`KernelTile` of one pair's group blocks (summed into ``block`` in group
    order, as the assembled kernel's total is)."""
    if not per_layer:
        return KernelTile(pair.rows, pair.cols, next(iter(blocks.values())))
    parts = iter(blocks.values())
    total = next(parts).clone()
    for part in parts:
        total += part
    return KernelTile(pair.rows, pair.cols, total, dict(blocks))


def _rounds(share: Sequence[BlockPair], size: Callable[[BlockPair], int], limit: int) -> List[List[BlockPair]]:
    """``share`` cut into consecutive runs of at most ``limit`` elements (at least one pair each)."""
    rounds: List[List[BlockPair]] = []
    current: List[BlockPair] = []
    filled = 0
    for pair in share:
        if current and filled + size(pair) > limit:
            rounds.append(current)
            current, filled = [], 0
        current.append(pair)
        filled += size(pair)
    if current:
        rounds.append(current)
    return rounds


def _pack(pairs: Sequence[BlockPair], block_of: Callable[[BlockPair, str], torch.Tensor], groups: Sequence[str],
          length: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    buffer = torch.zeros(length, dtype=dtype, device=device)
    offset = 0
    for pair in pairs:
        for name in groups:
            flat = block_of(pair, name).reshape(-1)
            buffer[offset:offset + flat.numel()] = flat
            offset += flat.numel()
    return buffer


def _unpack(buffer: torch.Tensor, pairs: Sequence[BlockPair], kernels: Blocks, groups: Sequence[str],
            layout: Layout, outputs: int) -> None:
    offset = 0
    for pair in pairs:
        shape = layout.shape(pair.rows[1] - pair.rows[0], pair.cols[1] - pair.cols[0], outputs)
        count = math.prod(shape)
        for name in groups:
            kernel = kernels[name]
            place_block(kernel, layout, pair, buffer[offset:offset + count].view(shape).to(kernel.device))
            offset += count


def gather_kernels(
    ranks: Ranks,
    shares: Sequence[Sequence[BlockPair]],
    kernels: Optional[Blocks],
    kept: Dict[int, Blocks],
    layout: Layout,
    outputs: int,
    groups: Sequence[str],
    dtype: torch.dtype,
    everyone: bool,
    limit: int,
) -> Optional[Blocks]:
    """Complete ``kernels`` (``{group: kernel}`` holding this rank's blocks already; None
    on a rank that receives nothing) with every other rank's blocks.

    Args:
        shares: every rank's pairs (:func:`.distributed.assign`).
        kept: this rank's blocks by pair index, where ``kernels`` is None.
        dtype: the kernel's dtype.
        everyone: every rank receives (``all_gather``), else rank 0 only (``gather``).
        limit: the most elements one rank sends per round (unless one block is larger).

    Returns:
        ``kernels`` on the ranks that receive, None on the others.
    """
    def size(pair: BlockPair) -> int:
        return len(groups) * math.prod(layout.shape(pair.rows[1] - pair.rows[0], pair.cols[1] - pair.cols[0], outputs))

    def block_of(pair: BlockPair, name: str) -> torch.Tensor:
        if kernels is None:
            return kept[pair.index][name]
        (r0, r1), (c0, c1) = pair.rows, pair.cols
        return kernels[name][r0:r1, c0:c1]

    if ranks.world_size == 1:
        return kernels
    rounds = [_rounds(share, size, limit) for share in shares]
    for k in range(max((len(r) for r in rounds), default=0)):
        chunks = [r[k] if k < len(r) else [] for r in rounds]
        length = max(sum(size(pair) for pair in chunk) for chunk in chunks)
        send = _pack(chunks[ranks.rank], block_of, groups, length, dtype, ranks.device)
        what = f"gathering the kernel's blocks (round {k + 1})"
        parts = ranks.all_gather(send, what) if everyone else ranks.gather_to_main(send, what)
        if kernels is None or parts is None:
            continue
        for rank, part in enumerate(parts):
            if rank != ranks.rank:
                _unpack(part, chunks[rank], kernels, groups, layout, outputs)
    return kernels if (everyone or ranks.main) else None
