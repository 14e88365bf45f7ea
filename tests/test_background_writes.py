"""Kernel files written on a background thread: the same files, the same policies, the
same atomic replace, errors surfacing at the next wait, nothing pending after close."""

import numpy as np
import pytest

from ntk_torch.runs import RunWriter, load_run
from ntk_torch.runs.background import BackgroundWrite

META = {"model": "test"}


@pytest.mark.parametrize("policy", ["all", "log", "first_last"])
def test_background_kernels_match_foreground(tmp_path, policy):
    kernels = {}
    for background in (False, True):
        path = tmp_path / f"run_{background}"
        with RunWriter(path, META, keep_kernels=policy, background=background) as writer:
            for step in range(0, 60, 10):
                K = np.eye(3) * step
                writer.save_kernel(step, K)
                K[:] = -1  # the caller reuses its buffer: the saved kernel is unaffected
                writer.append({"step": step})
        run = load_run(path)
        assert run.problems == []
        kernels[background] = {int(s): run.kernel(int(s)) for s in run.kernel_steps}
    assert kernels[True].keys() == kernels[False].keys()
    for step, K in kernels[True].items():
        np.testing.assert_array_equal(K, np.eye(3) * step)


def test_flush_completes_the_pending_file_and_no_temporary_is_left(tmp_path):
    with RunWriter(tmp_path / "run", META, keep_kernels="all", background=True) as writer:
        writer.save_kernel(0, np.ones((2, 2)))
        writer.flush()
        files = sorted(p.name for p in (tmp_path / "run" / "kernels").iterdir())
        assert files == ["step_00000000.npy"]
        np.testing.assert_array_equal(np.load(tmp_path / "run" / "kernels" / files[0]), np.ones((2, 2)))


def test_an_error_of_the_background_write_is_raised_at_the_next_wait():
    def fail():
        raise OSError("disk full")

    write = BackgroundWrite(fail)
    with pytest.raises(OSError, match="disk full"):
        write.wait()
    write.wait()  # raised once


def test_close_raises_a_pending_error_and_still_closes(tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise OSError("no space left on device")

    writer = RunWriter(tmp_path / "run", META, keep_kernels="all", background=True)
    writer.append({"step": 0})
    monkeypatch.setattr(np, "save", broken)  # the kernel file fails; meta.json does not
    writer.save_kernel(0, np.ones(2))
    with pytest.raises(OSError, match="no space left"):
        writer.close(status="completed")
    assert writer.closed
    run = load_run(tmp_path / "run")
    assert run.status == "completed" and [r["step"] for r in run.records] == [0]
    assert not list((tmp_path / "run" / "kernels").iterdir())  # no half file, no temporary


def test_background_must_be_a_bool(tmp_path):
    with pytest.raises(TypeError, match="background"):
        RunWriter(tmp_path / "run", META, background="yes")


@pytest.mark.slow
def test_the_tracker_writes_kernels_in_the_background_and_its_run_sees_them(tmp_path):
    import torch
    from torch import nn

    from ntk_torch import NTKTracker

    torch.manual_seed(0)
    x = torch.randn(16, 3)
    y = x[:, :1]
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    tracker = NTKTracker(model, (x, y), loss="mse", probe_size=8, every=2, run_dir=tmp_path / "run",
                         keep_kernels="all", forecast=None, progress=False)
    assert tracker._writer._background
    with tracker.attach(optimizer):
        for _ in range(4):
            optimizer.zero_grad()
            nn.functional.mse_loss(model(x), y).backward()
            optimizer.step()
        open_run = tracker.run  # waits for the kernel being written
        assert open_run.kernel_steps.tolist() == [0, 2, 4]
    run = load_run(tmp_path / "run")
    assert run.problems == [] and run.kernel_steps.tolist() == [0, 2, 4]
    from ntk_torch import empirical_ntk

    expected = empirical_ntk(model, x[tracker.probe_indices], mode=tracker.mode).numpy()  # the weights after step 4
    np.testing.assert_allclose(run.kernel(4), expected, rtol=1e-5, atol=1e-6)
