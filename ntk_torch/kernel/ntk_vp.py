"""NTK-vector products: columns of the kernel as Jacobian-vector products.

Column ``(j, b)`` of the kernel is ``K[:, j, :, b] = J1 t_jb`` with the tangent
``t_jb = J2^T e_jb`` — the vector-Jacobian product of the basis cotangent ``e_jb``, i.e.
row ``(j, b)`` of the columns' Jacobian (computed per example with ``vmap(jacrev)`` so the
backward never runs over the whole block). Each column then costs one forward-mode
``jvp`` over the block of rows, batched over tangents with ``vmap`` in chunks that fit the
memory budget (Novak et al. 2022, "NTK-vector products"). The rows' Jacobian is never
formed, which pays off when a forward pass is cheap relative to ``O P``.

``trace`` and ``diagonal`` modes run the columns of one output ``a`` at a time and keep
only the entries ``K[i, j, a, a]``, so the full block is never held.

A diagonal block of ``x2 = None`` computes only its upper block triangle: for each chunk
of columns ``a:b`` (:meth:`~ntk_torch.layout.Layout.symmetric_chunks`) the jvps run over
the rows ``0:b`` only, then the block is mirrored -- exactly symmetric for about
``(k + 1) / 2k`` of the forward passes.

Both halves must be derivatives of the same convention. Where forward mode has no
derivative for an operation or disagrees with reverse mode (``weight_norm``; an
``F.embedding`` whose ``padding_idx`` row is also used elsewhere; see
:mod:`.capability`), the engine is built with ``reverse_products=True`` and each column is
a reverse-over-reverse product instead (:func:`.capability.column_by_reverse_mode`):
``J1 t`` as the vector-Jacobian product, with cotangent ``t``, of ``u -> J1^T u``, about
twice the work of a ``jvp``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Sequence

import torch
from torch.func import jvp, vmap

from ..functional import FunctionalModel, Inputs, ParamGroup, batch_size, slice_inputs
from ..layout import Layout
from .capability import column_by_reverse_mode
from .cost import ForwardProfile
from .engine import Engine
from .jacobian import per_example_jacobians


# Diagonal blocks of x2=None: column chunks of at least this many tangents, at most this many chunks.
SYMMETRIC_CHUNK_ROWS = 64
MAX_SYMMETRIC_CHUNKS = 8


@dataclass
class _Rows:
    x: Inputs
    n: int


@dataclass
class _SameCols:
    """The columns of a diagonal block of ``x2=None``: the rows' own tangents."""

    tangents: Dict[str, torch.Tensor]


class NTKVPEngine(Engine):
    """Kernel blocks by vjp (column tangents) then batched jvp (over the rows).

    Args:
        reverse_products: compute the columns by reverse over reverse mode instead of
            ``jvp`` (see the module docstring).
        (others as :class:`~ntk_torch.kernel.engine.Engine`.)
    """

    name = "ntk_vp"

    def __init__(
        self,
        fmodel: FunctionalModel,
        layout: Layout,
        groups: Sequence[ParamGroup],
        profile: ForwardProfile,
        memory_budget: int,
        *,
        reverse_products: bool = False,
    ):
        super().__init__(fmodel, layout, groups, profile, memory_budget)
        self.reverse_products = reverse_products

    def prepare_rows(self, x: Inputs) -> _Rows:
        return _Rows(x, batch_size(x, "x1"))

    def prepare_cols(self, x: Inputs) -> Dict[str, torch.Tensor]:
        """The tangents ``t_jb``: ``{param name: (n2, O, *param)}``."""
        return per_example_jacobians(self.fmodel, x)

    def cols_from_rows(self, rows: _Rows, x: Inputs) -> _SameCols:
        return _SameCols(self.prepare_cols(x))

    def contract(self, rows: _Rows, cols) -> Dict[str, torch.Tensor]:
        """Each group's block; for :class:`_SameCols` the upper block triangle, mirrored
        (exactly symmetric, :attr:`exact_symmetric`)."""
        if isinstance(cols, _SameCols):
            return {group.name: self._symmetric_block(group.param_names, rows, cols.tangents)
                    for group in self.groups}
        return {group.name: self._group_block(group.param_names, rows, cols) for group in self.groups}

    exact_symmetric = True

    def _symmetric_block(self, names, rows: _Rows, tangents: Dict[str, torch.Tensor]) -> torch.Tensor:
        """``K[0:b, a:b]`` for each column chunk ``a:b`` into a work block, then mirrored."""
        layout, o, n = self.layout, self.num_outputs, rows.n
        first = next(iter(tangents.values()))
        acc = first.new_zeros(layout.work_shape(n, n, o))
        block = layout.from_work(acc)  # a view: writing it writes the work block
        bounds = layout.symmetric_chunks(n, 1, SYMMETRIC_CHUNK_ROWS, MAX_SYMMETRIC_CHUNKS)
        for a, b in bounds:
            sub_rows = _Rows(slice_inputs(rows.x, 0, b), b)
            part = {name: t[a:b] for name, t in tangents.items()}
            block[0:b, a:b] = self._group_block(names, sub_rows, part)
        layout.mirror_work(acc, o, bounds)
        return block

    def _group_block(self, names, rows: _Rows, cols: Dict[str, torch.Tensor]) -> torch.Tensor:
        params = self.fmodel.params
        primals = {name: params[name] for name in names}
        fixed = {name: p for name, p in params.items() if name not in primals}

        def f_group(group_params):
            return self.fmodel({**fixed, **group_params}, rows.x)

        if self.reverse_products:
            column = column_by_reverse_mode(f_group, primals)
        else:
            def column(tangent):
                return jvp(f_group, (primals,), (tangent,))[1]  # (n1, O)

        n2 = next(iter(cols.values())).shape[0]
        chunk = self._chunk_size(rows.n, n2)
        # Every tangent differentiates the same function: random draws are shared.
        columns = vmap(column, chunk_size=chunk, randomness="same")
        build = self.layout.choose(full=_all_columns, trace=_by_output, diagonal=_by_output)
        return build(self.layout, columns, {name: cols[name] for name in names}, rows.n)

    def _chunk_size(self, n_rows: int, n_cols: int) -> int:
        """Tangents per vmapped jvp so that the transient fits the memory budget."""
        profile = self.profile
        fixed = self._fixed_bytes(n_rows, n_cols)
        per_tangent = 2 * n_rows * profile.activation_bytes + n_rows * profile.num_outputs * profile.itemsize
        return max(1, (self.memory_budget - fixed) // per_tangent)

    def _fixed_bytes(self, n_rows: int, n_cols: int) -> int:
        profile = self.profile
        o, s = profile.num_outputs, profile.itemsize
        tangents = n_cols * o * (profile.num_params * s + profile.activation_bytes)
        return tangents + self.kernel_bytes(n_rows, n_cols)

    def block_bytes(self, n_rows: int, n_cols: int) -> int:
        profile = self.profile
        one_tangent = 2 * n_rows * profile.activation_bytes
        return self._fixed_bytes(n_rows, n_cols) + one_tangent



def _all_columns(layout: Layout, columns, tangents: Dict[str, torch.Tensor], n1: int) -> torch.Tensor:
    """A full block from every column ``(j, b)`` at once: ``(n1, n2, O, O)``."""
    n2, o = next(iter(tangents.values())).shape[:2]
    result = columns({name: t.flatten(0, 1) for name, t in tangents.items()}).view(n2, o, n1, o)  # [j, b, i, a]
    return result.permute(2, 0, 3, 1).contiguous()


def _by_output(layout: Layout, columns, tangents: Dict[str, torch.Tensor], n1: int) -> torch.Tensor:
    """A trace or diagonal block one output ``a`` at a time, keeping only ``K[:, :, a, a]``."""
    first = next(iter(tangents.values()))
    n2, o = first.shape[:2]
    block = first.new_zeros(layout.shape(n1, n2, o))
    for a in range(o):
        entries = columns({name: t[:, a] for name, t in tangents.items()})[:, :, a]  # (n2, n1)
        layout.add_output_entries(block, a, entries.T)
    return block
