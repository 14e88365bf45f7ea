"""Jacobian contraction: per-example Jacobians with ``vmap(jacrev)``, then their products.

For a block of examples the engine materialises ``J[i, a, p]`` (``(n, O, P_t)`` for each
parameter tensor ``t``) and contracts parameter tensor by parameter tensor, so the
largest transient is one block's Jacobians (Novak et al. 2022, "Jacobian contraction"):

* ``full``:     ``K = J1 J2^T`` as an ``(n1 O) x (n2 O)`` matmul, viewed as (n1, n2, O, O);
* ``trace``:    ``K = J1' J2'^T`` with ``J'`` the ``(n, O P_t)`` flattening — one matmul
  that sums over outputs and parameters at once, never forming the full block;
* ``diagonal``: a batched matmul over outputs, ``(O, n1, P_t) x (O, P_t, n2)``.

A diagonal block of ``x2 = None`` (one Jacobian, ``K = J J^T``) computes only its upper
block triangle, in example chunks (:meth:`~ntk_torch.layout.Layout.symmetric_chunks`),
and mirrors it: exactly symmetric for about ``(k + 1) / 2k`` of the products (torch has
no ``syrk`` binding on CPU).
"""

from __future__ import annotations

from typing import Dict

import torch
from torch.func import jacrev, vmap

from ..functional import FunctionalModel, Inputs
from .engine import Engine

# Diagonal blocks of x2=None: chunks of at least this many work-matrix rows, at most this many chunks.
SYMMETRIC_CHUNK_ROWS = 128
MAX_SYMMETRIC_CHUNKS = 8


class JacobianEngine(Engine):
    """Kernel blocks by explicit Jacobian contraction."""

    name = "jacobian"

    def prepare_rows(self, x: Inputs) -> Dict[str, torch.Tensor]:
        """``{param name: J}`` with ``J`` of shape ``(n, O, numel)`` for the block ``x``."""
        jac = per_example_jacobians(self.fmodel, x)
        return {name: j.reshape(j.shape[0], j.shape[1], -1) for name, j in jac.items()}

    prepare_cols = prepare_rows

    def cols_from_rows(self, rows: Dict[str, torch.Tensor], x: Inputs) -> Dict[str, torch.Tensor]:
        return rows

    def contract(
        self, rows: Dict[str, torch.Tensor], cols: Dict[str, torch.Tensor]
    ) -> Dict[str, torch.Tensor]:
        """Each group's block; with ``rows is cols`` (a diagonal block of ``x2=None``) the
        upper block triangle only, mirrored: exactly symmetric (:attr:`exact_symmetric`)."""
        layout, fmodel, o = self.layout, self.fmodel, self.num_outputs
        n1, n2 = next(iter(rows.values())).shape[0], next(iter(cols.values())).shape[0]
        shape = layout.work_shape(n1, n2, o)
        same = rows is cols
        bounds = layout.symmetric_chunks(n1, o, SYMMETRIC_CHUNK_ROWS, MAX_SYMMETRIC_CHUNKS) if same else None
        blocks = {}
        for group in self.groups:
            acc = torch.zeros(shape, dtype=fmodel.dtype, device=fmodel.device)
            for name in group.param_names:
                if same:
                    layout.add_symmetric_gradient_products(acc, rows[name], o, bounds)
                else:
                    layout.add_gradient_products(acc, rows[name], cols[name])
            if same:
                layout.mirror_work(acc, o, bounds)
            blocks[group.name] = layout.from_work(acc)
        return blocks

    exact_symmetric = True

    def block_bytes(self, n_rows: int, n_cols: int) -> int:
        profile = self.profile
        o, s = profile.num_outputs, profile.itemsize
        # vmap(jacrev) keeps each example's activations and O cotangents of them.
        jacobians = (n_rows + n_cols) * o * profile.num_params * s
        transient = max(n_rows, n_cols) * o * profile.activation_bytes
        return jacobians + transient + self.kernel_bytes(n_rows, n_cols)


def per_example_jacobians(fmodel: FunctionalModel, x: Inputs) -> Dict[str, torch.Tensor]:
    """``{param name: J}``, ``J[i, a, ...] = d f_a(x_i) / d param`` of shape (n, O, *param).

    A model that draws random numbers in eval mode draws them independently per example,
    as it would in a batch.
    """
    per_example = vmap(jacrev(fmodel.single), in_dims=(None, 0), randomness="different")
    return per_example(fmodel.params, x)

