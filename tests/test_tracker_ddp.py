"""NTKTracker on a DistributedDataParallel model: two CPU processes on gloo.

Each rank trains the same DDP model from the same seed, with and without a tracker
attached, on its own shard of the data. Training must be bit-identical on both ranks, and
only rank 0 records and writes the run directory. By default every rank computes a share
of each probe kernel (rank 0's probe, parameters and buffers: BatchNorm's running
statistics differ between the ranks after a step), so rank 1 computes tiles and rank 0's
kernel is the one a single process computes; with ``distributed=False`` rank 0 measures
alone and no collective is issued.
"""

from __future__ import annotations

import json
import os
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import ntk_torch
from ntk_torch import load_run
from ntk_torch.kernel import execution
from ntk_torch.tracker import NTKTracker

WORLD_SIZE = 2
STEPS = 6
TIMEOUT_S = 120


class _CountTiles:
    """Counts the block pairs this process computes through the distributed path."""

    def __init__(self) -> None:
        self.count = 0
        self.compute_blocks = execution.compute_blocks
        execution.compute_blocks = self

    def __call__(self, engine, x1, x2, pairs):
        for item in self.compute_blocks(engine, x1, x2, pairs):
            self.count += 1
            yield item


def _train(rank: int, run_dir: str, tracked: bool, distributed=None) -> dict:
    torch.manual_seed(0)
    module = nn.Sequential(nn.Linear(5, 12), nn.BatchNorm1d(12), nn.Tanh(), nn.Linear(12, 3))
    model = DistributedDataParallel(module)  # broadcasts rank 0's parameters and buffers
    optimizer = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9)
    generator = torch.Generator().manual_seed(100 + rank)  # each rank its own shard
    x = torch.randn(64, 5, generator=generator)
    y = torch.randint(0, 3, (64,), generator=generator)
    tracker = initial_error = None
    if tracked:
        tracker = NTKTracker(model, (x, y), probe_size=16, every=2, run_dir=run_dir, progress=False,
                             distributed=distributed)
        tracker.attach(optimizer)
        if rank == 0:  # the shared kernel at step 0 is the one a single process computes
            alone = ntk_torch.empirical_ntk(module, tracker.probe.x, mode="trace")
            initial_error = float((tracker.initial_kernel - alone).abs().max() / alone.abs().max())
    for step in range(STEPS):
        batch = slice(step * 8, step * 8 + 8)
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x[batch]), y[batch]).backward()
        optimizer.step()
    if tracker is not None:
        tracker.close()
    return {
        "state": {k: v.clone() for k, v in module.state_dict().items()},
        "records": None if tracker is None else [r["step"] for r in tracker.records],
        "step_count": None if tracker is None else tracker.step_count,
        "initial_error": initial_error,
    }


def _worker(rank: int, init_file: str, run_dir: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD_SIZE)
    try:
        counter = _CountTiles()
        tracked = _train(rank, run_dir, tracked=True)
        shared_tiles, counter.count = counter.count, 0
        alone = _train(rank, run_dir + "-alone", tracked=True, distributed=False)
        plain = _train(rank, run_dir, tracked=False)
        identical = all(
            torch.equal(v, tracked["state"][k]) and torch.equal(v, alone["state"][k]) for k, v in plain["state"].items()
        )
        result = {"identical": identical, "records": tracked["records"], "step_count": tracked["step_count"],
                  "alone_records": alone["records"], "shared_tiles": shared_tiles, "alone_tiles": counter.count,
                  "initial_error": tracked["initial_error"]}
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as file:
            json.dump(result, file)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow  # spawns two Python processes that import torch: ~4-7 s
@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
def test_ddp_training_is_identical_ranks_share_the_kernel_and_only_rank_zero_writes(tmp_path):
    run_dir, out_dir = tmp_path / "run", tmp_path / "out"
    out_dir.mkdir()
    context = mp.start_processes(
        _worker,
        args=(str(tmp_path / "init"), str(run_dir), str(out_dir)),
        nprocs=WORLD_SIZE,
        join=False,
        start_method="spawn",
    )
    deadline = time.monotonic() + TIMEOUT_S
    while not context.join(timeout=1):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f"DDP training with a tracker did not finish in {TIMEOUT_S} s (deadlock?)")

    results = [json.loads((out_dir / f"rank{rank}.json").read_text()) for rank in range(WORLD_SIZE)]
    assert all(result["identical"] for result in results)
    assert [result["step_count"] for result in results] == [STEPS] * WORLD_SIZE
    assert results[0]["records"] == [0, 2, 4, 6] == results[0]["alone_records"]
    assert results[1]["records"] == [] == results[1]["alone_records"]
    assert results[1]["shared_tiles"] >= 4  # at least one tile of each of the 4 measurements
    assert results[0]["alone_tiles"] == results[1]["alone_tiles"] == 0  # distributed=False: no shared path
    assert results[0]["initial_error"] < 1e-5
    run = load_run(run_dir)
    assert run.steps.tolist() == [0, 2, 4, 6] and run.status == "completed"
    assert set(run.records[0]["layer_share"]) == {"0", "1", "3"}  # .module's paths, no "module."
