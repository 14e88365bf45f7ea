"""Audit items 4, 7 and 8 (tracker): a non-finite kernel at step 0 is recorded and training
goes on; every way a run ends leaves its status (and why); a test set that cannot fit the
model is refused when the tracker is made."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import textwrap
import time
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

from ntk_torch import NTKTracker, load_run

ROOT = Path(__file__).resolve().parents[1]


def make_problem(n=32, features=4, seed=0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, features, generator=generator)
    return x, x[:, :1] * 2.0


def make_model(features=4, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(features, 8), nn.Tanh(), nn.Linear(8, 1))


def test_nan_at_step_zero_is_recorded_and_training_goes_on(tmp_path):
    """Item 4: with the SGD forecast, attach() raised NonFiniteKernelError and left 0 records."""
    x, y = make_problem()
    model = make_model()
    good = model[2].weight.detach().clone()
    with torch.no_grad():
        model[2].weight[0, 0] = math.nan
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    tracker = NTKTracker(model, (x, y), loss="mse", probe_size=8, every=1, progress=False, run_dir=tmp_path / "run")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with tracker.attach(optimizer):
            for step in range(3):
                optimizer.zero_grad()
                nn.functional.mse_loss(model(x), y).backward()
                optimizer.step()
                if step == 0:  # the network recovers (say, a restored checkpoint)
                    with torch.no_grad():
                        for p in model.parameters():
                            p.nan_to_num_(0.0)
                        model[2].weight.copy_(good)
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len([m for m in messages if m.startswith("NTKTracker: the kernel at step 0 is not finite")]) == 1
    skipped = [m for m in messages if m.startswith("NTKTracker: no predicted training curve")]
    assert len(skipped) == 1 and "not finite" in skipped[0]
    run = load_run(tmp_path / "run")
    assert run.status == "completed"
    assert run.steps.tolist() == [0, 1, 2, 3]
    assert run.records[0]["finite"] is False and run.records[-1]["finite"] is True
    assert "predicted_train_loss" not in run.metrics and tracker.forecast is None
    assert run.meta["prediction"] is None


def test_exception_inside_attach_leaves_status_failed_with_the_reason(tmp_path, monkeypatch):
    """Item 7: an exception in the step-0 set-up left status unset."""
    x, y = make_problem()
    model = make_model()
    tracker = NTKTracker(model, (x, y), loss="mse", probe_size=8, progress=False, run_dir=tmp_path / "run")

    def broken():
        raise RuntimeError("the engine blew up\nin two lines")

    monkeypatch.setattr(tracker, "_measurement", broken)
    with pytest.raises(RuntimeError, match="blew up"):
        tracker.attach(torch.optim.SGD(model.parameters(), lr=0.1))
    run = load_run(tmp_path / "run")
    assert run.status == "failed" and run.reason == "RuntimeError: the engine blew up in two lines"
    assert tracker.closed


def test_ctrl_c_inside_attach_leaves_status_interrupted(tmp_path, monkeypatch):
    x, y = make_problem()
    model = make_model()
    tracker = NTKTracker(model, (x, y), loss="mse", probe_size=8, progress=False, run_dir=tmp_path / "run")

    def interrupted():
        raise KeyboardInterrupt

    monkeypatch.setattr(tracker, "_measurement", interrupted)
    with pytest.raises(KeyboardInterrupt):
        tracker.attach()
    assert load_run(tmp_path / "run").status == "interrupted"


def test_failed_training_records_the_reason(tmp_path):
    x, y = make_problem()
    model = make_model()
    tracker = NTKTracker(model, (x, y), loss="mse", probe_size=8, progress=False, run_dir=tmp_path / "run")
    with pytest.raises(ValueError):
        with tracker.attach():
            raise ValueError("bad batch")
    run = load_run(tmp_path / "run")
    assert (run.status, run.reason) == ("failed", "ValueError: bad batch")


_SIGTERM_SCRIPT = textwrap.dedent("""
    import sys, time, torch
    from torch import nn
    from ntk_torch import NTKTracker
    torch.manual_seed(0)
    x = torch.randn(16, 3); y = x[:, :1]
    model = nn.Linear(3, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    tracker = NTKTracker(model, (x, y), loss="mse", probe_size=4, every=1, progress=False, run_dir=sys.argv[1])
    with tracker.attach(optimizer):
        print("attached", flush=True)
        while True:
            optimizer.zero_grad(); torch.nn.functional.mse_loss(model(x), y).backward(); optimizer.step()
            time.sleep(0.01)
""")


@pytest.mark.slow
@pytest.mark.skipif(os.name != "posix", reason="POSIX signals")
def test_sigterm_while_attached_closes_the_run_as_interrupted(tmp_path):
    """Item 7: SIGTERM killed the process with the run's status unset; the tracker now
    closes the run first, then the process ends by SIGTERM exactly as before."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    child = subprocess.Popen([sys.executable, "-c", _SIGTERM_SCRIPT, str(tmp_path / "run")],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True)
    try:
        assert child.stdout.readline().strip() == "attached"
        time.sleep(0.2)
        child.send_signal(signal.SIGTERM)
        _, err = child.communicate(timeout=60)
    finally:
        child.kill()
    assert child.returncode == -signal.SIGTERM, err
    header = json.loads((tmp_path / "run" / "meta.json").read_text())
    assert header["status"] == "interrupted" and header["reason"] == "SIGTERM"
    assert len(load_run(tmp_path / "run")) >= 1


def test_sigterm_handler_is_restored_after_close():
    x, y = make_problem()
    tracker = NTKTracker(make_model(), (x, y), loss="mse", probe_size=8, progress=False)
    before = signal.signal(signal.SIGTERM, signal.SIG_DFL)
    try:
        with tracker.attach():
            assert signal.getsignal(signal.SIGTERM) == tracker._sigterm._on_sigterm
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    finally:
        signal.signal(signal.SIGTERM, before)


def test_a_programs_own_sigterm_handler_is_left_alone():
    x, y = make_problem()
    tracker = NTKTracker(make_model(), (x, y), loss="mse", probe_size=8, progress=False)

    def own_handler(signum, frame):
        pass

    before = signal.signal(signal.SIGTERM, own_handler)
    try:
        with tracker.attach():
            assert signal.getsignal(signal.SIGTERM) is own_handler
        assert signal.getsignal(signal.SIGTERM) is own_handler
    finally:
        signal.signal(signal.SIGTERM, before)


def test_test_set_of_the_wrong_width_is_refused_at_construction():
    """Item 8: it surfaced at attach() as 'mat1 and mat2 shapes cannot be multiplied'."""
    x, y = make_problem()
    with pytest.raises(ValueError, match=r"test has feature shape \(7,\) but train has \(4,\)"):
        NTKTracker(make_model(), (x, y), test=(torch.randn(5, 7), torch.randn(5, 1)), loss="mse",
                   probe_size=8, progress=False)


def test_nan_in_the_probe_inputs_is_refused_at_construction():
    x, y = make_problem()
    x[3, 1] = math.inf
    with pytest.raises(ValueError, match=r"the input train \(example \d+\) holds NaN or inf"):
        NTKTracker(make_model(), (x, y), loss="mse", probe_size=32, progress=False)
