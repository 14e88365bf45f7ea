"""What every eNTK engine provides.

An engine computes one block of the kernel, ``K[I, J]`` for a block of rows ``x1[I]`` and
a block of columns ``x2[J]``, separately for each requested parameter group. The tiling
layer (:mod:`ntk_torch.kernel.tiling`) decides the blocks and assembles the result; the
engine only knows how to prepare the per-block state of one side (e.g. its Jacobians) and
how to contract a row state with a column state.

The kernel's layout (``full``, ``trace`` or ``diagonal``) is a
:class:`~ntk_torch.layout.Layout`, which owns the shapes and the matrix views.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import Any, Dict, Sequence

import torch

from ..functional import FunctionalModel, Inputs, ParamGroup
from ..layout import Layout
from .cost import ForwardProfile


class Engine(ABC):
    """One way of computing kernel blocks.

    Args:
        fmodel: the functional view of the model.
        layout: the kernel's layout.
        groups: the parameter groups to compute separately; each block result maps a
            group's name to its contribution, and the contributions sum to the kernel of
            all the groups' parameters.
        profile: the measured cost of one forward pass (FLOPs, activation memory, P, O).
        memory_budget: bytes an engine may use for transient work inside one block
            (vmap chunking); the block sizes themselves are chosen by the tiling layer
            from :meth:`block_bytes`.
    """

    name: str = ""
    #: ``contract(rows, cols_from_rows(rows, x))`` is exactly symmetric already, so the
    #: tiling need not symmetrise diagonal blocks of ``x2=None``.
    exact_symmetric: bool = False

    def __init__(
        self,
        fmodel: FunctionalModel,
        layout: Layout,
        groups: Sequence[ParamGroup],
        profile: ForwardProfile,
        memory_budget: int,
    ):
        self.fmodel = fmodel
        self.layout = layout
        self.groups = list(groups)
        self.profile = profile
        self.num_outputs = profile.num_outputs
        self.memory_budget = memory_budget

    @abstractmethod
    def prepare_rows(self, x: Inputs) -> Any:
        """Per-block state for a block of rows (examples of x1)."""

    @abstractmethod
    def prepare_cols(self, x: Inputs) -> Any:
        """Per-block state for a block of columns (examples of x2)."""

    def cols_from_rows(self, rows: Any, x: Inputs) -> Any:
        """Column state for the same examples as ``rows`` (diagonal blocks of ``x2=None``);
        engines whose two states coincide override this to reuse the work."""
        return self.prepare_cols(x)

    @abstractmethod
    def contract(self, rows: Any, cols: Any) -> Dict[str, torch.Tensor]:
        """The kernel block of each group: ``{group name: block}`` (may be a view; the
        tiling copies it into the kernel)."""

    @abstractmethod
    def block_bytes(self, n_rows: int, n_cols: int) -> int:
        """Estimated peak extra memory of one block of ``n_rows`` x ``n_cols`` examples."""

    def kernel_bytes(self, n_rows: int, n_cols: int) -> int:
        """Bytes of one block's kernels, twice over (the block and its copy into the
        kernel), for every group."""
        entries = math.prod(self.layout.shape(n_rows, n_cols, self.num_outputs))
        return len(self.groups) * 2 * entries * self.profile.itemsize
