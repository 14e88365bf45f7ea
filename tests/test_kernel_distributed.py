"""Distributed kernels: two and three CPU processes on gloo, spawned by the test.

Each spawn runs every case in one go (spawning costs a torch import per process):

* every mode, ``x2=None`` and ``x1 != x2``, each ``gather`` choice, tiled by the ranks'
  default and by ``batch_size``; per-layer kernels;
* ``out=`` with every rank writing its own tiles, an interruption on one rank followed by
  ``resume=True`` on all;
* ranks that disagree (other inputs), a rank that raises, a non-finite kernel, and (two
  processes) a rank that dies without a word.

Every rank builds its model from its own seed: the kernel must be rank 0's model's. The
parent compares what the ranks return with the single-process kernel in float64 (to
1e-12), and checks that each failure made every rank fail with a clear error, quickly.
"""

from __future__ import annotations

import datetime
import os
import pickle
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import ntk_torch as ntk
from ntk_torch import DistributedKernelError, NonFiniteKernelError
from ntk_torch.kernel import execution

MODES = ("full", "trace", "diagonal")
GATHERS = ("all", "rank0", "none")
TIMEOUT_S = 8  # the process group's: a lost rank is noticed within it
JOIN_S = 240

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")


def _model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()


def _inputs():
    generator = torch.Generator().manual_seed(7)
    return torch.randn(10, 4, dtype=torch.float64, generator=generator), \
        torch.randn(7, 4, dtype=torch.float64, generator=generator)


class _FailOn:
    """Replaces the block loop on one rank: ``action()`` runs instead of its second block."""

    def __init__(self, action):
        self.action, self.original = action, execution.compute_blocks
        execution.compute_blocks = self

    def __call__(self, engine, x1, x2, pairs):
        for count, item in enumerate(self.original(engine, x1, x2, pairs)):
            if count == 1:
                execution.compute_blocks = self.original
                self.action()
            yield item


def _error(call) -> str:
    try:
        call()
    except Exception as error:
        return f"{type(error).__name__}: {error}"
    return "no error"


def _kernels(rank: int, model: nn.Module, x1, x2) -> dict:
    results = {}
    for mode in MODES:
        for gather in GATHERS:
            tiled = ntk.NTK(model, mode=mode, distributed=True, gather=gather, batch_size=3)  # several tiles a rank
            by_ranks = ntk.NTK(model, mode=mode, distributed=True, gather=gather)  # as few tiles as there are ranks
            for symmetric, kernel in ((True, tiled), (False, by_ranks)):
                result = kernel(x1, None if symmetric else x2)
                key = f"{mode}/{symmetric}/{gather}"
                if gather == "none":
                    assert result.rank == rank and result.symmetric == symmetric
                    results[key] = [(t.rows, t.cols, t.block) for t in result.tiles]
                else:
                    results[key] = result
    parts = ntk.empirical_ntk(model, x1, mode="trace", per_layer=True, distributed=True, batch_size=3)
    results["per_layer"] = {**dict(parts), "total": parts.total}
    return results


def _files(rank: int, world: int, model: nn.Module, x1, x2, out_dir: str) -> dict:
    """out=: every rank writes its tiles; then one rank is interrupted and all resume."""
    results = {}
    whole = os.path.join(out_dir, "whole.npy")
    results["file"] = ntk.empirical_ntk(model, x1, x2, mode="full", out=whole, gather="rank0", batch_size=3,
                                        distributed=True)
    path = os.path.join(out_dir, "kernel.npy")

    def interrupt():
        raise KeyboardInterrupt

    if rank == world - 1:
        _FailOn(interrupt)
    try:
        ntk.empirical_ntk(model, x1, mode="trace", out=path, batch_size=2, distributed=True)
        results["interrupted"] = "no error"
    except (KeyboardInterrupt, DistributedKernelError) as error:
        results["interrupted"] = f"{type(error).__name__}: {error}"
    results["partial_left"] = os.path.exists(path + ".partial") and not os.path.exists(path)
    resumed = ntk.empirical_ntk(model, x1, mode="trace", out=path, resume=True, distributed=True)  # all receive it
    uninterrupted = ntk.empirical_ntk(model, x1, mode="trace", out=os.path.join(out_dir, "again.npy"),
                                      batch_size=2, distributed=True)
    results["resumed"], results["resumed_identical"] = resumed.clone(), bool(torch.equal(resumed, uninterrupted))
    return results


def _failures(rank: int, world: int, model: nn.Module, x1, x2) -> dict:
    results = {}
    mine = x1 + rank if rank == world - 1 else x1  # one rank's inputs differ
    results["other_inputs"] = _error(lambda: ntk.empirical_ntk(model, mine, mode="trace", distributed=True))
    unusable = x1[:, :3] if rank == world - 1 else x1  # the model cannot take them: planning fails there
    started = time.monotonic()
    results["unusable_inputs"] = _error(lambda: ntk.empirical_ntk(model, unusable, mode="trace", distributed=True))
    results["unusable_inputs_s"] = time.monotonic() - started

    def fail():
        raise ValueError("a bug on the last rank")

    if rank == world - 1:
        _FailOn(fail)
    started = time.monotonic()
    results["failing_rank"] = _error(lambda: ntk.empirical_ntk(model, x1, mode="trace", distributed=True,
                                                               batch_size=2))
    results["failing_rank_s"] = time.monotonic() - started
    try:  # rank 0's model is the one used
        ntk.empirical_ntk(_broken_model() if rank == 0 else model, x1, mode="trace", distributed=True, batch_size=2)
        results["nonfinite"] = "no error"
    except NonFiniteKernelError as error:
        results["nonfinite"] = list(error.groups)
    return results


def _broken_model() -> nn.Module:
    broken = _model(0)
    with torch.no_grad():
        broken[2].weight[0, 0] = float("nan")
    return broken


def _worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=TIMEOUT_S))
    model, (x1, x2) = _model(seed=rank), _inputs()
    results = {}
    try:
        results.update(_kernels(rank, model, x1, x2))
        results.update(_files(rank, world, model, x1, x2, out_dir))
        results.update(_failures(rank, world, model, x1, x2))
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
        if world == 2:  # last: rank 1 dies without a word inside the computation
            if rank == 1:
                _FailOn(lambda: os._exit(7))
            started = time.monotonic()
            died = _error(lambda: ntk.empirical_ntk(model, x1, mode="trace", distributed=True, batch_size=2))
            torch.save({"died": died, "died_s": time.monotonic() - started}, os.path.join(out_dir, "death.pt"))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _tracebacks(context) -> str:
    """What the ranks that raised wrote (torch.multiprocessing keeps it in error files)."""
    found = []
    for path in context.error_files:
        if path and os.path.exists(path) and os.path.getsize(path):
            with open(path, "rb") as file:
                found.append("\n".join(pickle.load(file).strip().splitlines()[-4:]))
    return "\n".join(found)


def _spawn(world: int, tmp_path) -> list:
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    context = mp.start_processes(_worker, args=(world, str(tmp_path / "init"), str(out_dir)), nprocs=world,
                                 join=False, start_method="spawn")
    deadline = time.monotonic() + JOIN_S
    for process in context.processes:
        process.join(timeout=max(deadline - time.monotonic(), 1))
        if process.is_alive():
            for other in context.processes:
                other.kill()
            pytest.fail(f"the {world} ranks did not finish in {JOIN_S} s (a hang?)")
    codes = [process.exitcode for process in context.processes]
    assert codes == ([0, 7] if world == 2 else [0] * world), (codes, _tracebacks(context))
    results = [torch.load(out_dir / f"rank{rank}.pt", weights_only=True) for rank in range(world)]
    return results


def _check_kernels(results: list, world: int) -> None:
    model, (x1, x2) = _model(seed=0), _inputs()
    for mode in MODES:
        for symmetric in (True, False):
            alone = ntk.empirical_ntk(model, x1, None if symmetric else x2, mode=mode)
            for gather in GATHERS:
                key = f"{mode}/{symmetric}/{gather}"
                if gather == "none":
                    covered = torch.zeros(alone.shape[:2], dtype=torch.int64)
                    for rank, result in enumerate(results):
                        assert result[key], f"rank {rank} computed no tile of {key}"
                        for (r0, r1), (c0, c1), block in result[key]:
                            torch.testing.assert_close(block, alone[r0:r1, c0:c1], rtol=0, atol=1e-12)
                            covered[r0:r1, c0:c1] += 1
                            if symmetric and (r0, r1) != (c0, c1):  # the tile also stands for its transpose
                                covered[c0:c1, r0:r1] += 1
                    assert torch.equal(covered, torch.ones_like(covered)), key  # every entry exactly once
                    continue
                for rank, result in enumerate(results):
                    if gather == "rank0" and rank > 0:
                        assert result[key] is None, key
                    else:
                        torch.testing.assert_close(result[key], alone, rtol=0, atol=1e-12, msg=key)
    parts = ntk.empirical_ntk(model, x1, mode="trace", per_layer=True)
    for result in results:
        assert list(result["per_layer"]) == [*parts, "total"]
        for name, part in {**dict(parts), "total": parts.total}.items():
            torch.testing.assert_close(result["per_layer"][name], part, rtol=0, atol=1e-12)


def _check_files_and_failures(results: list, world: int) -> None:
    model, (x1, x2) = _model(seed=0), _inputs()
    alone = ntk.empirical_ntk(model, x1, x2, mode="full")
    torch.testing.assert_close(results[0]["file"], alone, rtol=0, atol=1e-12)
    assert all(result["file"] is None for result in results[1:])
    last = world - 1
    assert results[last]["interrupted"].startswith("KeyboardInterrupt")
    for result in results[:last]:
        assert f"rank {last} failed computing its kernel tiles: KeyboardInterrupt" in result["interrupted"]
    trace = ntk.empirical_ntk(model, x1, mode="trace")
    with pytest.raises(NonFiniteKernelError) as alone_nonfinite:
        ntk.empirical_ntk(_broken_model(), x1, mode="trace", batch_size=2)
    for result in results:
        assert result["partial_left"] and result["resumed_identical"]
        torch.testing.assert_close(result["resumed"], trace, rtol=0, atol=1e-12)
        assert "DistributedKernelError" in result["other_inputs"] and "inputs" in result["other_inputs"]
        assert result["failing_rank_s"] < TIMEOUT_S  # told at once, not at the timeout
        assert result["nonfinite"] == list(alone_nonfinite.value.groups)
    for result in results[:last]:
        assert result["unusable_inputs"].startswith(f"DistributedKernelError: rank {last} failed planning the kernel")
        assert result["unusable_inputs_s"] < TIMEOUT_S
    assert results[last]["failing_rank"] == "ValueError: a bug on the last rank"
    for result in results[:last]:
        assert result["failing_rank"] == (
            f"DistributedKernelError: rank {last} failed computing its kernel tiles: ValueError: a bug on the last rank"
        )


@pytest.mark.slow
def test_two_processes_give_the_single_process_kernel_and_fail_together(tmp_path):
    results = _spawn(2, tmp_path)
    _check_kernels(results, 2)
    _check_files_and_failures(results, 2)
    death = torch.load(tmp_path / "out" / "death.pt", weights_only=True)
    assert death["died"].startswith("DistributedKernelError: rank 0:") and "another rank failed" in death["died"]
    assert death["died_s"] < TIMEOUT_S + 10


@pytest.mark.slow
def test_three_processes_give_the_single_process_kernel_and_fail_together(tmp_path):
    results = _spawn(3, tmp_path)
    _check_kernels(results, 3)
    _check_files_and_failures(results, 3)
