"""Where one kernel computation's tiles run and where they go: processes, files, gathering.

:class:`~.api.NTK` computes a kernel in one process and in memory with
:func:`.tiling.compute_kernel`. With ``distributed``/``process_group``, ``out`` or a
``gather`` other than ``"all"``, :func:`compute` runs instead, in the same steps on every
rank (a single process is a group of one), each step in lockstep
(:meth:`.distributed.Ranks.in_lockstep`, so a rank that fails makes the others fail too):

1. every rank takes rank 0's parameters and buffers (:meth:`~.distributed.Ranks.adopt_rank0`);
2. the memory budget: the smallest of the ranks' budgets, or the progress record's when
   ``out=`` continues a computation (rank 0 reads the record);
3. the plan (:func:`.planning.plan_kernel`, which checks the inputs) under that budget;
   unless a record fixes the tiling, its block size is lowered until there are at least
   :data:`~.distributed.PAIRS_PER_RANK` block pairs per rank; the ranks' fingerprints
   (:mod:`.fingerprint`) must agree;
4. with ``out=``, rank 0 checks the record against the fingerprint, or creates the files;
5. the pairs not done yet are shared out (:func:`.distributed.assign`) and each rank
   computes its own, writing them to the file, into its kernel, or keeping them;
6. the kernel is finished: the file renamed into place (:mod:`.store`), the blocks
   gathered (:mod:`.gathering`), or kept as a :class:`~.gathering.KernelShard`.
"""

from __future__ import annotations

import dataclasses
import os
import socket
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Union

import torch
from tqdm import tqdm

from ..errors import DistributedKernelError, NonFiniteKernelError
from ..functional import Inputs, evaluation_context, nonfinite_input, slice_inputs
from .analysis import AnalysisMemo
from .cost import default_memory_budget
from .distributed import Ranks, assign, resolve_ranks, shared_block_size
from .fingerprint import differences, fingerprint
from .gathering import Blocks, KernelShard, gather_kernels, make_tile
from .jacobian import JacobianEngine
from .loop import LoopEngine
from .planning import GATHERS, TOTAL, KernelOptions, KernelPlan, ScaleOptions, functional_view, plan_kernel
from .store import NUMPY_DTYPES, KernelStore
from .tiling import BlockPair, NonFiniteBlock, block_pairs, compute_blocks, place_block

SOLO = Ranks(None, 0, 1, torch.device("cpu"))
"""A computation in one process: a group of one, which needs no collectives."""


def scale_options(
    distributed: Any, process_group: Any, gather: Any, out: Any, resume: Any, per_layer: bool
) -> ScaleOptions:
    """The checked :class:`~.planning.ScaleOptions` (see :class:`~.api.NTK`).

    Raises:
        TypeError / ValueError: naming the argument at fault.
    """
    for name, flag in (("distributed", distributed), ("resume", resume)):
        if not isinstance(flag, bool):
            raise TypeError(f"{name} must be a bool, got {type(flag).__name__}")
    if gather not in GATHERS:
        raise ValueError(f"gather must be one of {', '.join(map(repr, GATHERS))}, got {gather!r}")
    if process_group is not None:
        import torch.distributed as dist

        if not (dist.is_available() and isinstance(process_group, dist.ProcessGroup)):
            raise TypeError(f"process_group must be a torch.distributed.ProcessGroup or None, got "
                            f"{type(process_group).__name__}")
    path = None
    if out is not None:
        if not isinstance(out, (str, os.PathLike)):
            raise TypeError(f"out must be a path (str or os.PathLike) or None, got {type(out).__name__}")
        path = Path(out)
        if path.suffix != ".npy":
            raise ValueError(f"out must be a .npy file name, got {str(out)!r}")
        if per_layer:
            raise ValueError("out= writes one kernel; per_layer=True kernels cannot be written to it "
                             "(compute each group's kernel with params=... instead)")
    elif resume:
        raise ValueError("resume=True continues a kernel written to out=...; pass out as well")
    return ScaleOptions(distributed, process_group, gather, path, resume)


def nonfinite_error(plan: KernelPlan, failure: NonFiniteBlock) -> NonFiniteKernelError:
    """The error for a block that is not finite: it names the input at fault when ``x1``
    or ``x2`` holds NaN/inf (checked first), and the parameter groups in any case."""
    inputs = nonfinite_input(plan.x1, "x1")
    if inputs is None and not plan.symmetric:
        inputs = nonfinite_input(plan.x2, "x2")
    return NonFiniteKernelError(nonfinite_groups(plan, failure), inputs)


def nonfinite_groups(plan: KernelPlan, failure: NonFiniteBlock) -> List[str]:
    """The parameter groups whose contribution to the failing block is not finite.

    Diagnosed per group with reverse mode (Jacobian contraction) whatever the engine:
    forward mode turns zero tangents through infinite weights into NaN, which would
    blame groups whose own contribution is finite.
    """
    engine = plan.engine
    if isinstance(engine, JacobianEngine) and failure.groups != [TOTAL]:
        return failure.groups
    reverse = LoopEngine if plan.analysis.fails("vmap") is not None else JacobianEngine
    diagnosis = reverse(
        engine.fmodel, engine.layout, engine.fmodel.groups, engine.profile, engine.memory_budget
    )
    rows = diagnosis.prepare_rows(slice_inputs(plan.x1, *failure.rows))
    cols = diagnosis.prepare_cols(slice_inputs(plan.x2, *failure.cols))
    blocks = diagnosis.contract(rows, cols)
    bad = [name for name, block in blocks.items() if not torch.isfinite(block).all()]
    return bad or [TOTAL]


def compute(
    options: KernelOptions, memo: AnalysisMemo, x1: Inputs, x2: Optional[Inputs]
) -> Union[Dict[str, torch.Tensor], KernelShard, None]:
    """The kernel of ``options`` (with non-plain :class:`~.planning.ScaleOptions`).

    Returns:
        ``{group: kernel}`` where this rank receives the kernel (with ``out=``, ``{"total":
        the file-backed kernel}``), None where it receives nothing, or this rank's
        :class:`~.gathering.KernelShard` with ``gather="none"`` in memory.
    """
    scale = options.scale
    fmodel = functional_view(options)
    ranks = resolve_ranks(scale.distributed, scale.process_group, fmodel.device) or SOLO
    store = None if scale.out is None else KernelStore(scale.out)
    with torch.no_grad(), evaluation_context(options.model, fmodel.device):
        ranks.adopt_rank0(fmodel)
        record, budget = _agree_budget(ranks, options, fmodel.device, store)
        plan, request = _agree_plan(ranks, options, memo, fmodel, x1, x2, budget, record, store is not None)
        pairs = block_pairs(plan.n1, plan.n2, plan.block_size, plan.symmetric)
        if store is not None:
            return _compute_to_file(ranks, store, plan, pairs, record, request, options)
        return _compute_in_memory(ranks, plan, pairs, options)


def _agree_budget(ranks: Ranks, options: KernelOptions, device: torch.device, store: Optional[KernelStore]):
    """``(record, budget)``: rank 0's reading of the progress record (None without one),
    and the memory budget every rank plans with."""
    def step() -> Dict[str, Any]:
        budget = options.memory_budget if options.memory_budget is not None else default_memory_budget(device)
        record = store.inspect(options.scale.resume) if store is not None and ranks.main else None
        return {"budget": budget, "record": record, "host": socket.gethostname()}

    results = ranks.in_lockstep("opening the output file" if store is not None else "agreeing on a memory budget",
                                step)
    hosts = sorted({result["host"] for result in results})
    if store is not None and len(hosts) > 1:
        raise ValueError(
            f"out= needs every rank on one machine (they write into one memory-mapped file); the ranks run on "
            f"{', '.join(hosts)}: gather to rank 0 (gather='rank0') and save it there instead"
        )
    record = results[0]["record"]
    budget = record["tiling"]["memory_budget"] if record is not None else min(r["budget"] for r in results)
    return record, budget


def _plan(options: KernelOptions, memo: AnalysisMemo, fmodel, x1: Inputs, x2: Optional[Inputs], ranks: Ranks,
          budget: int, record: Optional[Dict[str, Any]]) -> KernelPlan:
    """The plan under ``budget``, tiled as ``record`` says, or with a pair for every rank."""
    block = record["tiling"]["block_size"] if record is not None else options.batch_size
    plan = plan_kernel(dataclasses.replace(options, memory_budget=budget, batch_size=block), memo, fmodel, x1, x2)
    if record is None:
        block = shared_block_size(plan.block_size, plan.n1, plan.n2, plan.symmetric, ranks.world_size)
    return dataclasses.replace(plan, block_size=block)


def _agree_plan(ranks: Ranks, options: KernelOptions, memo: AnalysisMemo, fmodel, x1: Inputs,
                x2: Optional[Inputs], budget: int, record: Optional[Dict[str, Any]], weights: bool):
    """``(plan, fingerprint)``: every rank's plan (:func:`_plan`), and its request's
    fingerprint (with the weights' digest if ``weights``: every rank holds rank 0's weights
    already) and tiling, checked to be the same on every rank."""
    planned: Dict[str, KernelPlan] = {}

    def step() -> Dict[str, Any]:
        plan = planned["plan"] = _plan(options, memo, fmodel, x1, x2, ranks, budget, record)
        return {**fingerprint(plan, options.output_fn, weights), "block_size": plan.block_size}

    requests = ranks.in_lockstep("planning the kernel", step)
    for rank, other in enumerate(requests[1:], start=1):
        differ = differences(other, requests[0])
        if differ:
            hint = " (every rank must pass the same x1 and x2)" if "inputs" in differ else ""
            raise DistributedKernelError(
                f"rank {rank}'s kernel request differs from rank 0's in {', '.join(differ)}{hint}; every rank "
                "must make the same call"
            )
    request = dict(requests[0])
    del request["block_size"]
    return planned["plan"], request


def _compute_share(plan: KernelPlan, share: Sequence[BlockPair], sink: Callable[[BlockPair, Blocks], None],
                   progress: bool, ranks: Ranks, description: str) -> None:
    """Compute ``share``'s blocks, each handed to ``sink``; a progress bar on rank 0."""
    with tqdm(total=len(share), disable=not (progress and ranks.main), desc=description, unit="tile") as bar:
        try:
            for pair, blocks in compute_blocks(plan.engine, plan.x1, plan.x2, share):
                sink(pair, blocks)
                bar.update()
        except NonFiniteBlock as failure:
            raise nonfinite_error(plan, failure) from None


def _description(ranks: Ranks, share: Sequence[BlockPair], pending: int, total: int) -> str:
    """The progress bar's label: rank 0's share among the ranks, and what was done before."""
    label = "eNTK tiles"
    if ranks.world_size > 1:
        label += f" (rank 0: {len(share)} of {pending} over {ranks.world_size} ranks)"
    if pending < total:
        label += f" ({total - pending} of {total} done before)"
    return label


def _compute_in_memory(ranks: Ranks, plan: KernelPlan, pairs: List[BlockPair], options: KernelOptions):
    """Each rank's share into the full kernel (where it receives one) or kept; then gathered."""
    gather, layout, fmodel = options.scale.gather, plan.engine.layout, plan.fmodel
    shares = assign(pairs, ranks.world_size)
    share = shares[ranks.rank]
    groups = [group.name for group in plan.groups]
    receives = gather == "all" or (gather == "rank0" and ranks.main)
    shape = layout.shape(plan.n1, plan.n2, plan.engine.num_outputs)
    kernels = {name: torch.empty(shape, dtype=fmodel.dtype, device=fmodel.device) for name in groups} \
        if receives else None
    kept: Dict[int, Blocks] = {}

    def sink(pair: BlockPair, blocks: Blocks) -> None:
        if kernels is None:
            kept[pair.index] = {name: block.contiguous() for name, block in blocks.items()}
        else:
            for name in groups:
                place_block(kernels[name], layout, pair, blocks[name])

    description = _description(ranks, share, len(pairs), len(pairs))
    ranks.in_lockstep("computing its kernel tiles",
                      lambda: _compute_share(plan, share, sink, options.progress, ranks, description))
    if gather == "none":
        tiles = [make_tile(pair, kept[pair.index], options.per_layer) for pair in share]
        return KernelShard(tiles, tuple(shape), plan.symmetric, ranks.rank, ranks.world_size)
    itemsize = torch.empty((), dtype=fmodel.dtype).element_size()
    limit = max(plan.budget // (itemsize * ranks.world_size), 1)
    return gather_kernels(ranks, shares, kernels, kept, layout, plan.engine.num_outputs, groups, fmodel.dtype,
                          everyone=gather == "all", limit=limit)


def _compute_to_file(ranks: Ranks, store: KernelStore, plan: KernelPlan, pairs: List[BlockPair],
                     record: Optional[Dict[str, Any]], request: Dict[str, Any], options: KernelOptions):
    """The pairs not done yet, written into ``store``'s file; the finished file's kernel
    where this rank receives it."""
    tiling = {"block_size": plan.block_size, "memory_budget": plan.budget, "pairs": len(pairs)}
    dtype = plan.fmodel.dtype

    def prepare() -> Optional[List[int]]:
        if not ranks.main:
            return None
        if record is not None:
            store.check(record, request)
            return None if store.complete(record) else store.done()
        if dtype not in NUMPY_DTYPES:
            raise TypeError(f"out= writes a .npy file, which cannot hold {dtype}; pass dtype=torch.float32")
        store.create(request, tiling, dtype)
        return []

    done = ranks.in_lockstep("preparing the output file", prepare)[0]
    if done is not None:  # not finished before
        finished = set(done)
        pending = [pair for pair in pairs if pair.index not in finished]
        share = assign(pending, ranks.world_size)[ranks.rank]
        shape = tuple(request["shape"])
        layout = plan.engine.layout

        def sink(pair: BlockPair, blocks: Blocks) -> None:
            store.write(layout, pair, blocks[TOTAL], shape)

        def step() -> None:
            try:
                _compute_share(plan, share, sink, options.progress, ranks, description)
            finally:  # what is written is kept, also when interrupted
                store.sync()

        description = _description(ranks, share, len(pending), len(pairs))
        ranks.in_lockstep("computing its kernel tiles", step)
        ranks.in_lockstep("finishing the output file", lambda: store.finish() if ranks.main else None)
    gather = options.scale.gather
    if gather == "all" or (gather == "rank0" and ranks.main):
        return {TOTAL: store.result()}
    return None
