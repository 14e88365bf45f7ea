"""How a tracker shares its work under ``torch.distributed``: which process records, and
whether the ranks compute each probe kernel together (on rank 0's probe)."""

from __future__ import annotations

from typing import Optional

import torch

from .probe import LabelledSet

__all__ = ["is_main_process", "rank0_probe", "shares_kernel"]


def is_main_process() -> bool:
    """Rank 0 of the default process group, or True outside torch.distributed."""
    distributed = torch.distributed
    return not (distributed.is_available() and distributed.is_initialized()) or distributed.get_rank() == 0


def shares_kernel(distributed: Optional[bool]) -> bool:
    """Whether the ranks compute the probe kernel together: ``distributed``, by default
    whether torch.distributed runs more than one process."""
    if distributed is not None and not isinstance(distributed, bool):
        raise TypeError(f"distributed must be None or a bool, got {type(distributed).__name__}")
    dist = torch.distributed
    running = dist.is_available() and dist.is_initialized()
    if distributed and not running:
        raise ValueError("distributed=True needs torch.distributed initialised (init_process_group) first")
    return running and dist.get_world_size() > 1 if distributed is None else distributed


def rank0_probe(probe: LabelledSet) -> LabelledSet:
    """Rank 0's probe on every rank (ranks may hold different shards of the data)."""
    shared = [probe.to(torch.device("cpu")) if is_main_process() else None]
    torch.distributed.broadcast_object_list(shared, src=0)
    return shared[0]
