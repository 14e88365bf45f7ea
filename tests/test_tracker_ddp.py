"""NTKTracker on a DistributedDataParallel model: two CPU processes on gloo.

Each rank trains the same DDP model twice from the same seed, with and without a tracker
attached, on its own shard of the data. Training must be bit-identical on both ranks (the
tracker measures ``.module`` on rank 0 only and issues no collective, so nothing can
deadlock or desynchronise), and only rank 0 records and writes the run directory.
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

from ntk_torch import load_run
from ntk_torch.tracker import NTKTracker

WORLD_SIZE = 2
STEPS = 6
TIMEOUT_S = 120


def _train(rank: int, run_dir: str, tracked: bool) -> dict:
    torch.manual_seed(0)
    module = nn.Sequential(nn.Linear(5, 12), nn.BatchNorm1d(12), nn.Tanh(), nn.Linear(12, 3))
    model = DistributedDataParallel(module)  # broadcasts rank 0's parameters and buffers
    optimizer = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9)
    generator = torch.Generator().manual_seed(100 + rank)  # each rank its own shard
    x = torch.randn(64, 5, generator=generator)
    y = torch.randint(0, 3, (64,), generator=generator)
    tracker = None
    if tracked:
        tracker = NTKTracker(model, (x, y), probe_size=16, every=2, run_dir=run_dir, progress=False)
        tracker.attach(optimizer)
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
    }


def _worker(rank: int, init_file: str, run_dir: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD_SIZE)
    try:
        tracked = _train(rank, run_dir, tracked=True)
        plain = _train(rank, run_dir, tracked=False)
        identical = all(torch.equal(v, tracked["state"][k]) for k, v in plain["state"].items())
        result = {"identical": identical, "records": tracked["records"], "step_count": tracked["step_count"]}
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as file:
            json.dump(result, file)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow  # spawns two Python processes that import torch: ~4-7 s
@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
def test_ddp_training_is_identical_and_only_rank_zero_writes(tmp_path):
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
    assert results[0]["records"] == [0, 2, 4, 6]
    assert results[1]["records"] == []
    run = load_run(run_dir)
    assert run.steps.tolist() == [0, 2, 4, 6] and run.status == "completed"
    assert set(run.records[0]["layer_share"]) == {"0", "1", "3"}  # .module's paths, no "module."
