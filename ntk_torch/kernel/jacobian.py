"""Jacobian contraction: per-example Jacobians with ``vmap(jacrev)``, then their products.

For a block of examples the engine materialises ``J[i, a, p]`` (``(n, O, P_t)`` for each
parameter tensor ``t``) and contracts parameter tensor by parameter tensor, so the
largest transient is one block's Jacobians (Novak et al. 2022, "Jacobian contraction"):

* ``full``:     ``K = J1 J2^T`` as an ``(n1 O) x (n2 O)`` matmul, viewed as (n1, n2, O, O);
* ``trace``:    ``K = J1' J2'^T`` with ``J'`` the ``(n, O P_t)`` flattening — one matmul
  that sums over outputs and parameters at once, never forming the full block;
* ``diagonal``: a batched matmul over outputs, ``(O, n1, P_t) x (O, P_t, n2)``.
"""

from __future__ import annotations

import math
from typing import Dict

import torch
from torch.func import jacrev, vmap

from ..functional import FunctionalModel, Inputs
from .engine import Engine, block_shape


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
        blocks = {}
        for group in self.groups:
            block = None
            for name in group.param_names:
                part = _contract_one(rows[name], cols[name], self.mode)
                block = part if block is None else block.add_(part)
            blocks[group.name] = block
        return blocks

    def block_bytes(self, n_rows: int, n_cols: int) -> int:
        profile = self.profile
        o, s = profile.num_outputs, profile.itemsize
        # vmap(jacrev) keeps each example's activations and O cotangents of them.
        jacobians = (n_rows + n_cols) * o * profile.num_params * s
        transient = max(n_rows, n_cols) * o * profile.activation_bytes
        kernel = len(self.groups) * 2 * math.prod(block_shape(self.mode, n_rows, n_cols, o)) * s
        return jacobians + transient + kernel


def per_example_jacobians(fmodel: FunctionalModel, x: Inputs) -> Dict[str, torch.Tensor]:
    """``{param name: J}``, ``J[i, a, ...] = d f_a(x_i) / d param`` of shape (n, O, *param).

    A model that draws random numbers in eval mode draws them independently per example,
    as it would in a batch.
    """
    per_example = vmap(jacrev(fmodel.single), in_dims=(None, 0), randomness="different")
    return per_example(fmodel.params, x)


def _contract_one(j1: torch.Tensor, j2: torch.Tensor, mode: str) -> torch.Tensor:
    """The contribution of one parameter tensor; ``j1`` (n1, O, p), ``j2`` (n2, O, p)."""
    n1, o, p = j1.shape
    n2 = j2.shape[0]
    if mode == "full":
        product = j1.reshape(n1 * o, p) @ j2.reshape(n2 * o, p).T
        return product.view(n1, o, n2, o).permute(0, 2, 1, 3).contiguous()
    if mode == "trace":
        return j1.reshape(n1, o * p) @ j2.reshape(n2, o * p).T
    product = torch.bmm(j1.transpose(0, 1), j2.permute(1, 2, 0))  # (O, n1, n2)
    return product.permute(1, 2, 0).contiguous()

