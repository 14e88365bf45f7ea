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
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict

import torch
from torch.func import jvp, vmap

from ..functional import Inputs, batch_size
from .engine import Engine, block_shape
from .jacobian import per_example_jacobians


@dataclass
class _Rows:
    x: Inputs
    n: int


class NTKVPEngine(Engine):
    """Kernel blocks by vjp (column tangents) then batched jvp (over the rows)."""

    name = "ntk_vp"

    def prepare_rows(self, x: Inputs) -> _Rows:
        return _Rows(x, batch_size(x, "x1"))

    def prepare_cols(self, x: Inputs) -> Dict[str, torch.Tensor]:
        """The tangents ``t_jb``: ``{param name: (n2, O, *param)}``."""
        return per_example_jacobians(self.fmodel, x)

    def contract(self, rows: _Rows, cols: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        return {group.name: self._group_block(group.param_names, rows, cols) for group in self.groups}

    def _group_block(self, names, rows: _Rows, cols: Dict[str, torch.Tensor]) -> torch.Tensor:
        params = self.fmodel.params
        primals = {name: params[name] for name in names}
        fixed = {name: p for name, p in params.items() if name not in primals}

        def f_group(group_params):
            return self.fmodel({**fixed, **group_params}, rows.x)

        def column(tangent):
            return jvp(f_group, (primals,), (tangent,))[1]  # (n1, O)

        n2, o = next(iter(cols.values())).shape[:2]
        chunk = self._chunk_size(rows.n, n2)
        # Every tangent differentiates the same function: random draws are shared.
        columns = vmap(column, chunk_size=chunk, randomness="same")
        if self.mode == "full":
            tangents = {name: cols[name].flatten(0, 1) for name in names}  # (n2 O, *param)
            result = columns(tangents).view(n2, o, rows.n, o)  # [j, b, i, a]
            return result.permute(2, 0, 3, 1).contiguous()
        block = torch.zeros(
            block_shape(self.mode, rows.n, n2, o), dtype=self.fmodel.dtype, device=self.fmodel.device
        )
        for a in range(o):
            entries = columns({name: cols[name][:, a] for name in names})[:, :, a]  # (n2, n1)
            if self.mode == "trace":
                block += entries.T
            else:
                block[:, :, a] = entries.T
        return block

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
        kernel = len(self.groups) * 2 * math.prod(block_shape(self.mode, n_rows, n_cols, o)) * s
        return tangents + kernel

    def block_bytes(self, n_rows: int, n_cols: int) -> int:
        profile = self.profile
        one_tangent = 2 * n_rows * profile.activation_bytes
        return self._fixed_bytes(n_rows, n_cols) + one_tangent

