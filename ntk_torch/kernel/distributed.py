"""The ranks of a distributed kernel computation: who computes which tiles, and lockstep.

Only ``torch.distributed`` collectives are used (``all_gather``, ``gather``,
``broadcast``), on the process group the user initialised (gloo on CPU, NCCL on CUDA):

* :func:`resolve_ranks` finds the group, this process's rank and the device collectives
  run on -- the model's CUDA device for NCCL (the model must be on it; call
  ``torch.cuda.set_device(local_rank)`` as torchrun scripts do), the CPU otherwise;
* :func:`assign` shares the block pairs out: contiguous runs of the row-major list, of
  equal count to within one (also for ``x2=None``, whose list holds only the upper block
  triangle). A rank prepares rows once per run of pairs in the same row block, so all
  ranks together prepare at most ``world_size - 1`` row blocks more than one process;
* :meth:`Ranks.in_lockstep` runs one local step on every rank and exchanges its outcome,
  so that a rank that fails (an exception, a non-finite kernel, Ctrl-C) makes every
  other rank raise at the same point with an error naming it, instead of leaving them
  waiting in the next collective;
* :meth:`Ranks.adopt_rank0` gives every rank rank 0's parameters and buffers (copies:
  no rank's model is touched), as ``DistributedDataParallel`` does at construction -- the
  distributed kernel is rank 0's model's.

A rank that dies without reporting (killed, out of memory) leaves the others in a
collective until the process group's ``timeout`` (``init_process_group(timeout=...)``);
gloo then raises, and :class:`DistributedKernelError` says which exchange failed. Under
NCCL, torch's watchdog ends the waiting processes itself after that timeout.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch

from ..errors import DistributedKernelError, NonFiniteKernelError
from ..functional import FunctionalModel
from .tiling import BlockPair, largest_size, pair_count

PAIRS_PER_RANK = 2
"""The fewest block pairs per rank a distributed computation is tiled into (unless a
progress record fixes the tiling); ``batch_size`` and the memory budget may make more."""


@dataclass(frozen=True)
class Ranks:
    """The process group of one distributed computation.

    Attributes:
        group: the ``ProcessGroup`` (None: the default group).
        rank, world_size: this process's rank in ``group`` and the group's size.
        device: where the tensors of collectives live (the model's CUDA device for NCCL,
            else the CPU).
    """

    group: Any
    rank: int
    world_size: int
    device: torch.device

    @property
    def main(self) -> bool:
        return self.rank == 0

    def _collective(self, what: str, action: Callable[[], Any]) -> Any:
        try:
            return action()
        except Exception as error:  # gloo raises RuntimeError subclasses on timeouts and lost peers
            raise DistributedKernelError(
                f"rank {self.rank}: {what} with the other ranks failed ({type(error).__name__}: "
                f"{error}); another rank failed, stopped or is stuck (the process group's timeout "
                "bounds the wait)"
            ) from error

    def all_gather_bytes(self, data: bytes, what: str) -> List[bytes]:
        """Every rank's ``data``, in rank order."""
        if self.world_size == 1:
            return [data]
        import torch.distributed as dist

        def action() -> List[bytes]:
            size = torch.tensor([len(data)], dtype=torch.int64, device=self.device)
            sizes = [torch.empty_like(size) for _ in range(self.world_size)]
            dist.all_gather(sizes, size, group=self.group)
            longest = max(int(s.item()) for s in sizes)
            mine = torch.zeros(longest, dtype=torch.uint8)
            if data:
                mine[:len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
            mine = mine.to(self.device)
            parts = [torch.empty_like(mine) for _ in range(self.world_size)]
            dist.all_gather(parts, mine, group=self.group)
            return [bytes(p[:int(s.item())].cpu().numpy()) for p, s in zip(parts, sizes)]

        return self._collective(what, action)

    def in_lockstep(self, what: str, step: Callable[[], Any]) -> List[Any]:
        """Run ``step()`` here and return every rank's result (JSON-able), in rank order.

        When ``step`` raises on some rank, every rank raises once the outcomes are
        exchanged: that rank its own exception; the others a
        :class:`DistributedKernelError` naming it (a :class:`NonFiniteKernelError` for a
        non-finite kernel, with the groups at fault).
        """
        failure: Optional[BaseException] = None
        try:
            outcome: Dict[str, Any] = {"ok": True, "result": step()}
        except BaseException as error:  # reported to the other ranks, then re-raised
            failure = error
            outcome = {"ok": False, "type": type(error).__name__, "message": str(error)}
            if isinstance(error, NonFiniteKernelError):
                outcome["groups"] = list(error.groups)
        try:
            exchanged = self.all_gather_bytes(json.dumps(outcome).encode(), what)
        except DistributedKernelError:
            if failure is not None:
                raise failure from None  # this rank's own error says more
            raise
        if failure is not None:
            raise failure
        outcomes = [json.loads(raw) for raw in exchanged]
        for rank, other in enumerate(outcomes):
            if not other["ok"]:
                if "groups" in other:
                    raise NonFiniteKernelError(other["groups"])
                raise DistributedKernelError(
                    f"rank {rank} failed {what}: {other['type']}: {other['message']}"
                )
        return [other["result"] for other in outcomes]

    def adopt_rank0(self, fmodel: FunctionalModel) -> None:
        """Replace ``fmodel``'s parameters and constants by rank 0's (copies, on this
        rank's device); the ranks must hold tensors of the same names, shapes and dtypes."""
        if self.world_size == 1:
            return
        tensors = {**{f"param:{k}": v for k, v in fmodel.params.items()},
                   **{f"const:{k}": v for k, v in fmodel.constants.items()}}
        layout = [[name, str(t.dtype), list(t.shape)] for name, t in tensors.items()]
        layouts = self.in_lockstep("comparing the models", lambda: layout)
        if any(other != layouts[0] for other in layouts):
            wrong = [rank for rank, other in enumerate(layouts) if other != layouts[0]]
            raise DistributedKernelError(
                f"rank {self.rank}: the model's parameters and buffers differ in names, shapes or dtypes "
                f"between rank 0 and rank(s) {wrong}; every rank must build the same model"
            )
        import torch.distributed as dist

        received = {}
        for name, tensor in tensors.items():
            buffer = tensor.detach().to(self.device, copy=not self.main).contiguous()
            self._collective("broadcasting rank 0's parameters",
                             lambda: dist.broadcast(buffer, src=self._global(0), group=self.group))
            received[name] = buffer.to(tensor.device)
        if not self.main:
            fmodel.params.update({k: received[f"param:{k}"] for k in fmodel.params})
            fmodel.constants.update({k: received[f"const:{k}"] for k in fmodel.constants})

    def _global(self, group_rank: int) -> int:
        """The global rank of ``group_rank`` in this group (what ``src``/``dst`` take)."""
        if self.group is None:
            return group_rank
        import torch.distributed as dist

        return dist.get_global_rank(self.group, group_rank)

    def gather_to_main(self, tensor: torch.Tensor, what: str) -> Optional[List[torch.Tensor]]:
        """Every rank's ``tensor`` (of one shape) on rank 0, in rank order; None elsewhere."""
        import torch.distributed as dist

        parts = [torch.empty_like(tensor) for _ in range(self.world_size)] if self.main else None
        self._collective(what, lambda: dist.gather(tensor, parts, dst=self._global(0), group=self.group))
        return parts

    def all_gather(self, tensor: torch.Tensor, what: str) -> List[torch.Tensor]:
        """Every rank's ``tensor`` (of one shape), in rank order."""
        import torch.distributed as dist

        parts = [torch.empty_like(tensor) for _ in range(self.world_size)]
        self._collective(what, lambda: dist.all_gather(parts, tensor, group=self.group))
        return parts


def resolve_ranks(distributed: bool, process_group: Any, device: torch.device) -> Optional[Ranks]:
    """The :class:`Ranks` of a computation on the model's ``device``, or None when it is
    not distributed.

    Raises:
        RuntimeError: ``torch.distributed`` is not initialised.
        ValueError: the group's backend cannot carry tensors of ``device`` (NCCL needs a
            CUDA model).
    """
    if not distributed and process_group is None:
        return None
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(
            "distributed=True needs torch.distributed initialised: call "
            "torch.distributed.init_process_group(...) first (torchrun sets up its environment)"
        )
    backend = str(dist.get_backend(process_group)).lower()
    if "nccl" in backend and device.type != "cuda" and "gloo" not in backend:
        raise ValueError(
            f"the process group's backend is {backend} but the model is on {device}; NCCL carries CUDA "
            "tensors only: move the model to its GPU (cuda:LOCAL_RANK) or use a gloo group"
        )
    comm = device if ("nccl" in backend and device.type == "cuda") else torch.device("cpu")
    return Ranks(process_group, dist.get_rank(process_group), dist.get_world_size(process_group), comm)


def assign(pairs: Sequence[BlockPair], world_size: int) -> List[List[BlockPair]]:
    """Each rank's pairs: rank ``r`` takes ``pairs[floor(r P / R) : floor((r + 1) P / R)]``."""
    count = len(pairs)
    bounds = [rank * count // world_size for rank in range(world_size + 1)]
    return [list(pairs[bounds[rank]:bounds[rank + 1]]) for rank in range(world_size)]


def shared_block_size(block_size: int, n1: int, n2: int, symmetric: bool, world_size: int) -> int:
    """The block size for ``world_size`` ranks: at most ``block_size``, giving at least
    :data:`PAIRS_PER_RANK` block pairs per rank (as many as the kernel's example pairs
    allow) so that every rank has work, and then the smallest size that keeps the longer
    side's number of blocks, so that its last block is as large as that number allows (a
    last block of a few examples would leave the ranks of its pairs nearly idle)."""
    wanted = PAIRS_PER_RANK * world_size

    def enough(size: int) -> bool:
        return pair_count(n1, n2, size, symmetric) >= wanted

    if world_size == 1:
        return block_size
    if not enough(1):  # fewer example pairs than wanted: one example per block
        return 1
    size = block_size if enough(block_size) else largest_size(enough, block_size)
    longer = max(n1, n2)
    return -(-longer // -(-longer // size))  # ceil(longer / T) for T = ceil(longer / size) blocks
