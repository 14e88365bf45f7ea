"""Distributed and out-of-core kernels of CUDA models: NCCL (one process per GPU, or one
process on one GPU) and gloo carrying CUDA blocks through the host (skipped without a GPU)."""

from __future__ import annotations

import datetime
import os
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import ntk_torch as ntk

from test_kernel_distributed import MODES, _inputs, _model  # the same tiny model and inputs

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
    pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available"),
]
JOIN_S = 300


def test_a_cuda_kernel_written_out_of_core_equals_the_cpu_kernel(tmp_path):
    x1, x2 = _inputs()
    for mode in MODES:
        on_cpu = ntk.empirical_ntk(_model(0), x1, x2, mode=mode)
        written = ntk.empirical_ntk(_model(0).cuda(), x1, x2, mode=mode, out=tmp_path / f"{mode}.npy", batch_size=3)
        assert written.device.type == "cpu"
        torch.testing.assert_close(written, on_cpu, rtol=1e-10, atol=1e-12)


def _worker(rank: int, world: int, backend: str, init_file: str, out_dir: str) -> None:
    device = torch.device("cuda", rank if backend == "nccl" else 0)
    torch.cuda.set_device(device)
    dist.init_process_group(backend, init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    try:
        model, (x1, x2) = _model(seed=rank).to(device), _inputs()
        results = {}
        for mode in MODES:
            for symmetric in (True, False):
                for gather in ("all", "rank0", "none"):
                    result = ntk.empirical_ntk(model, x1, None if symmetric else x2, mode=mode, distributed=True,
                                               gather=gather, batch_size=3)
                    key = f"{mode}/{symmetric}/{gather}"
                    if gather == "none":
                        assert all(t.block.device == device for t in result.tiles)
                        results[key] = [(t.rows, t.cols, t.block.cpu()) for t in result.tiles]
                    else:
                        assert result is None or result.device == device
                        results[key] = None if result is None else result.cpu()
        path = os.path.join(out_dir, "kernel.npy")
        written = ntk.empirical_ntk(model, x1, mode="trace", out=path, distributed=True, batch_size=2)
        results["file"] = written
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("backend", ["nccl", "gloo"])
def test_ranks_on_cuda_give_the_cpu_kernel(tmp_path, backend):
    world = min(2, torch.cuda.device_count()) if backend == "nccl" else 2  # NCCL: one GPU per rank
    if backend == "nccl" and not dist.is_nccl_available():
        pytest.skip("NCCL is not available")
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    context = mp.start_processes(_worker, args=(world, backend, str(tmp_path / "init"), str(out_dir)),
                                 nprocs=world, join=False, start_method="spawn")
    deadline = time.monotonic() + JOIN_S
    while not context.join(timeout=1):
        assert time.monotonic() < deadline, f"{backend} ranks did not finish in {JOIN_S} s"
    x1, x2 = _inputs()
    results = [torch.load(out_dir / f"rank{rank}.pt", weights_only=True) for rank in range(world)]
    for mode in MODES:
        for symmetric in (True, False):
            alone = ntk.empirical_ntk(_model(0), x1, None if symmetric else x2, mode=mode)
            for rank, result in enumerate(results):
                all_, rank0 = result[f"{mode}/{symmetric}/all"], result[f"{mode}/{symmetric}/rank0"]
                torch.testing.assert_close(all_, alone, rtol=1e-10, atol=1e-12)
                assert (rank0 is None) == (rank > 0)
                for (r0, r1), (c0, c1), block in result[f"{mode}/{symmetric}/none"]:
                    torch.testing.assert_close(block, alone[r0:r1, c0:c1], rtol=1e-10, atol=1e-12)
    trace = ntk.empirical_ntk(_model(0), x1, mode="trace")
    for result in results:
        torch.testing.assert_close(result["file"], trace, rtol=1e-10, atol=1e-12)
