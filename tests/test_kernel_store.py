"""Out-of-core kernels (``out="kernel.npy"``): equal to in memory, resumable to the
identical result, refusing records of other requests or corrupt ones, and within the
memory budget when the kernel is larger than it. One process; the distributed case is in
``test_kernel_distributed.py``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import ntk_torch as ntk
from ntk_torch import KernelStoreError
from ntk_torch.kernel import execution

from reference import naive_ntk, reduce_mode

REPO = Path(__file__).resolve().parents[1]
MODES = ("full", "trace", "diagonal")


def _model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()


def _inputs(n: int, seed: int) -> torch.Tensor:
    return torch.randn(n, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


class _Interrupt(Exception):
    pass


class _Blocks:
    """Wraps the block loop: counts the blocks computed, and raises after ``stop`` of them."""

    def __init__(self, monkeypatch, stop=None):
        self.count, self.stop, self.original = 0, stop, execution.compute_blocks
        monkeypatch.setattr(execution, "compute_blocks", self)

    def __call__(self, engine, x1, x2, pairs):
        for item in self.original(engine, x1, x2, pairs):
            if self.stop is not None and self.count == self.stop:
                raise _Interrupt("stopped inside the computation")
            self.count += 1
            yield item


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("symmetric", [True, False], ids=["x2=None", "x1!=x2"])
def test_out_of_core_equals_in_memory_and_the_reference(tmp_path, mode, symmetric):
    model, x1 = _model(), _inputs(9, 1)
    x2 = None if symmetric else _inputs(7, 2)
    out = tmp_path / "kernel.npy"
    on_disk = ntk.empirical_ntk(model, x1, x2, mode=mode, out=out, batch_size=4)
    in_memory = ntk.empirical_ntk(model, x1, x2, mode=mode, batch_size=4)
    assert torch.equal(on_disk, in_memory)  # the same tiles, the same bits
    np.testing.assert_array_equal(np.load(out), in_memory.numpy())
    reference = reduce_mode(naive_ntk(model, x1, x2), mode)
    torch.testing.assert_close(on_disk, reference, rtol=1e-10, atol=1e-12)
    record = json.loads((tmp_path / "kernel.npy.progress.json").read_text())
    assert record["status"] == "complete" and record["fingerprint"]["mode"] == mode
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kernel.npy", "kernel.npy.progress.json"]


def test_an_interrupted_kernel_resumes_to_the_identical_result(tmp_path, monkeypatch):
    model, x = _model(), _inputs(11, 3)
    uninterrupted = ntk.empirical_ntk(model, x, mode="full", out=tmp_path / "whole.npy", batch_size=3)
    out = tmp_path / "kernel.npy"
    blocks = _Blocks(monkeypatch, stop=4)
    with pytest.raises(_Interrupt):
        ntk.empirical_ntk(model, x, mode="full", out=out, batch_size=3)
    assert not out.exists()  # the file never looks complete when it is not
    record = json.loads((tmp_path / "kernel.npy.progress.json").read_text())
    assert record["status"] == "partial" and record["tiling"]["pairs"] == 10
    assert (tmp_path / "kernel.npy.tiles").read_bytes() == bytes([1] * 4 + [0] * 6)  # kept though interrupted

    blocks.count, blocks.stop = 0, None
    # The recorded tiling is used whatever batch_size and memory_budget say now.
    resumed = ntk.empirical_ntk(model, x, mode="full", out=out, resume=True, memory_budget="1GB")
    assert blocks.count == 6  # only the pairs not done
    assert torch.equal(resumed, uninterrupted)
    assert json.loads((tmp_path / "kernel.npy.progress.json").read_text())["status"] == "complete"
    assert not (tmp_path / "kernel.npy.tiles").exists()

    blocks.count = 0
    again = ntk.empirical_ntk(model, x, mode="full", out=out, resume=True)  # complete: nothing to compute
    assert blocks.count == 0 and torch.equal(again, uninterrupted)


def _interrupted(tmp_path, monkeypatch, model, x, **options) -> Path:
    out = tmp_path / "kernel.npy"
    blocks = _Blocks(monkeypatch, stop=2)
    with pytest.raises(_Interrupt):
        ntk.empirical_ntk(model, x, out=out, batch_size=3, **options)
    blocks.stop = None
    return out


def test_a_record_made_for_another_request_is_refused(tmp_path, monkeypatch):
    model, x = _model(), _inputs(8, 4)
    out = _interrupted(tmp_path, monkeypatch, model, x, mode="trace")
    before = (tmp_path / "kernel.npy.partial").read_bytes()
    changes = {
        "weights": dict(model=_model(seed=1), x1=x, mode="trace"),
        "inputs": dict(model=model, x1=_inputs(8, 5), mode="trace"),
        "mode": dict(model=model, x1=x, mode="diagonal"),
        "dtype": dict(model=model, x1=x, mode="trace", dtype=torch.float32),
        "shape": dict(model=model, x1=x[:7], mode="trace"),
        "symmetric": dict(model=model, x1=x, x2=x, mode="trace"),
    }
    for field, call in changes.items():
        with pytest.raises(KernelStoreError, match=rf"another request \(.*{field}: "):
            ntk.empirical_ntk(out=out, resume=True, **call)
    assert (tmp_path / "kernel.npy.partial").read_bytes() == before  # nothing was mixed in
    # A complete kernel is refused for another request as well.
    complete = ntk.empirical_ntk(model, x, mode="trace", out=out, resume=True)
    with pytest.raises(KernelStoreError, match="weights"):
        ntk.empirical_ntk(_model(seed=1), x, mode="trace", out=out, resume=True)
    assert torch.equal(complete, ntk.empirical_ntk(model, x, mode="trace", batch_size=3))


@pytest.mark.parametrize("damage", ["not json", "other format", "tiles truncated", "tiles garbage",
                                    "partial missing", "partial reshaped", "no record"])
def test_a_corrupt_record_is_refused(tmp_path, monkeypatch, damage):
    model, x = _model(), _inputs(8, 4)
    out = _interrupted(tmp_path, monkeypatch, model, x, mode="trace")
    record, tiles, partial = (tmp_path / f"kernel.npy{suffix}" for suffix in (".progress.json", ".tiles", ".partial"))
    if damage == "not json":
        record.write_text('{"format": "ntk_torch kernel progress", "vers')
    elif damage == "other format":
        record.write_text(json.dumps({"format": "something else"}))
    elif damage == "tiles truncated":
        tiles.write_bytes(tiles.read_bytes()[:-1])
    elif damage == "tiles garbage":
        tiles.write_bytes(b"\x07" * len(tiles.read_bytes()))
    elif damage == "partial missing":
        partial.unlink()
    elif damage == "partial reshaped":
        with open(partial, "wb") as file:
            np.save(file, np.zeros((8, 7)))
    else:
        record.unlink()
    match = "without its progress record" if damage == "no record" else "corrupt"
    with pytest.raises(KernelStoreError, match=match):
        ntk.empirical_ntk(model, x, mode="trace", out=out, resume=True)
    assert not out.exists()


def test_an_existing_kernel_is_not_overwritten_without_resume(tmp_path, monkeypatch):
    model, x = _model(), _inputs(6, 4)
    out = tmp_path / "kernel.npy"
    np.save(out, np.ones((6, 6)))
    with pytest.raises(FileExistsError, match="resume=True"):
        ntk.empirical_ntk(model, x, mode="trace", out=out)
    with pytest.raises(KernelStoreError, match="without its progress record"):
        ntk.empirical_ntk(model, x, mode="trace", out=out, resume=True)
    np.testing.assert_array_equal(np.load(out), np.ones((6, 6)))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    interrupted = _interrupted(elsewhere, monkeypatch, model, x, mode="trace")
    with pytest.raises(FileExistsError, match="partial"):
        ntk.empirical_ntk(model, x, mode="trace", out=interrupted)


def test_resume_starts_afresh_when_there_is_nothing_to_continue(tmp_path):
    model, x = _model(), _inputs(6, 4)
    kernel = ntk.empirical_ntk(model, x, mode="diagonal", out=tmp_path / "new" / "kernel.npy", resume=True)
    assert torch.equal(kernel, ntk.empirical_ntk(model, x, mode="diagonal"))


@pytest.mark.parametrize("options, error, match", [
    (dict(out="kernel.txt"), ValueError, r"out must be a \.npy file"),
    (dict(out=3), TypeError, "out must be a path"),
    (dict(out="k.npy", per_layer=True), ValueError, "per_layer"),
    (dict(resume=True), ValueError, "resume=True .* pass out"),
    (dict(gather="some"), ValueError, "gather must be one of 'all', 'rank0', 'none'"),
    (dict(distributed="yes"), TypeError, "distributed must be a bool"),
    (dict(resume=1, out="k.npy"), TypeError, "resume must be a bool"),
    (dict(process_group="default"), TypeError, "process_group must be a torch.distributed.ProcessGroup"),
])
def test_scale_options_are_checked(options, error, match):
    with pytest.raises(error, match=match):
        ntk.NTK(_model(), **options)


def test_distributed_needs_an_initialised_process_group():
    with pytest.raises(RuntimeError, match="init_process_group"):
        ntk.empirical_ntk(_model(), _inputs(4, 0), distributed=True)


def test_out_cannot_hold_bfloat16(tmp_path):
    with pytest.raises(TypeError, match="bfloat16"):
        ntk.empirical_ntk(_model(), _inputs(4, 0), mode="trace", dtype=torch.bfloat16, out=tmp_path / "k.npy")


@pytest.mark.parametrize("symmetric", [True, False], ids=["x2=None", "x1!=x2"])
def test_one_process_keeps_every_tile_with_gather_none(symmetric):
    model, x1 = _model(), _inputs(7, 1)
    x2 = None if symmetric else _inputs(5, 2)
    kernel = ntk.empirical_ntk(model, x1, x2, mode="full", batch_size=3)
    shard = ntk.empirical_ntk(model, x1, x2, mode="full", batch_size=3, gather="none")
    assert (shard.rank, shard.world_size, shard.symmetric, shard.shape) == (0, 1, symmetric, tuple(kernel.shape))
    covered = torch.zeros(kernel.shape[:2], dtype=torch.int64)
    for tile in shard:
        (r0, r1), (c0, c1) = tile.rows, tile.cols
        assert torch.equal(tile.block, kernel[r0:r1, c0:c1]) and tile.parts is None
        covered[r0:r1, c0:c1] += 1
    expected = torch.ones_like(covered)
    if symmetric:  # the upper block triangle only
        expected = torch.tensor([[int(j // 3 >= i // 3) for j in range(7)] for i in range(7)])
    assert torch.equal(covered, expected)
    assert torch.equal(ntk.empirical_ntk(model, x1, x2, mode="full", batch_size=3, gather="rank0"), kernel)


PEAK_SCRIPT = r"""
import json, sys, torch
torch.set_num_threads(1)
import ntk_torch as ntk
from torch import nn

def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024

n, budget, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
torch.manual_seed(0)
model = nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 4)).double()
x = torch.randn(n, 16, dtype=torch.float64)
ntk.empirical_ntk(model, x[:200], mode="trace", out=out + ".warm-up.npy", memory_budget=budget)
before = status("VmRSS")
with open("/proc/self/clear_refs", "w") as file:
    file.write("5")  # the peak resident set size starts again from the current one
ntk.empirical_ntk(model, x, mode="trace", out=out, memory_budget=budget)
print(json.dumps({"extra": status("VmHWM") - before}))
"""


@pytest.mark.slow
@pytest.mark.skipif(not os.access("/proc/self/clear_refs", os.W_OK), reason="needs Linux's /proc/self/clear_refs")
def test_a_kernel_larger_than_the_memory_budget_stays_under_it(tmp_path):
    n, budget = 3000, 8 * 10**6
    kernel_bytes = n * n * 8  # 72 MB, nine times the budget
    out = tmp_path / "kernel.npy"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests")])}
    done = subprocess.run([sys.executable, "-c", PEAK_SCRIPT, str(n), str(budget), str(out)], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    extra = json.loads(done.stdout.strip().splitlines()[-1])["extra"]
    assert extra < budget < kernel_bytes
    kernel = np.load(out, mmap_mode="r")
    assert kernel.shape == (n, n) and np.array_equal(kernel[:5, -5:], kernel[-5:, :5].T)


def test_the_model_is_left_as_it_was(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Dropout(0.5), nn.Tanh(), nn.Linear(6, 3)).double().train()
    x = _inputs(6, 1)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    kernel = ntk.empirical_ntk(model, x, mode="trace", out=tmp_path / "k.npy", batch_size=2)
    assert torch.equal(torch.get_rng_state(), rng) and model.training
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert torch.equal(kernel, ntk.empirical_ntk(model.eval(), x, mode="trace", batch_size=2))  # eval mode, no dropout
