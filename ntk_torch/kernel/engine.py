"""What every eNTK engine provides, and the kernel modes they all share.

An engine computes one block of the kernel, ``K[I, J]`` for a block of rows ``x1[I]`` and
a block of columns ``x2[J]``, separately for each requested parameter group. The tiling
layer (:mod:`ntk_torch.kernel.tiling`) decides the blocks and assembles the result; the
engine only knows how to prepare the per-block state of one side (e.g. its Jacobians) and
how to contract a row state with a column state.

Kernel modes, for outputs flattened to ``O`` values per example and the Jacobian
``J[i, a, p] = d f_a(x_i) / d theta_p``:

* ``full``      ``K[i, j, a, b] = sum_p J1[i, a, p] J2[j, b, p]``    shape (N1, N2, O, O)
* ``trace``     ``K[i, j]       = sum_a sum_p J1[i, a, p] J2[j, a, p]`` shape (N1, N2)
* ``diagonal``  ``K[i, j, a]    = sum_p J1[i, a, p] J2[j, a, p]``    shape (N1, N2, O)
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, Dict, Sequence, Tuple

import torch

from ..functional import FunctionalModel, Inputs, ParamGroup
from .cost import ForwardProfile

MODES = ("full", "trace", "diagonal")


def block_shape(mode: str, n1: int, n2: int, num_outputs: int) -> Tuple[int, ...]:
    """The shape of a kernel (block) of ``n1`` rows and ``n2`` columns in ``mode``."""
    if mode == "full":
        return (n1, n2, num_outputs, num_outputs)
    if mode == "trace":
        return (n1, n2)
    return (n1, n2, num_outputs)


def transpose_block(block: torch.Tensor, mode: str) -> torch.Tensor:
    """``K(x2, x1)`` from ``K(x1, x2)``: swap examples (and outputs in ``full`` mode)."""
    if mode == "full":
        return block.permute(1, 0, 3, 2)
    return block.transpose(0, 1)


class Engine(ABC):
    """One way of computing kernel blocks.

    Args:
        fmodel: the functional view of the model.
        mode: one of :data:`MODES`.
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
        mode: str,
        groups: Sequence[ParamGroup],
        profile: ForwardProfile,
        memory_budget: int,
    ):
        self.fmodel = fmodel
        self.mode = mode
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
