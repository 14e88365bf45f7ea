"""The tracker's forecast over a run: the last step measured, memory flat over 10,000
steps, the dense forecast on disk, named curves, the deprecated ``predict`` alias."""

import gc
import warnings

import numpy as np
import pytest
import torch
from torch import nn

from ntk_torch import load_run
from ntk_torch.report import summary_table
from ntk_torch.runs import Curve
from ntk_torch.tracker import NTKTracker


pytestmark = pytest.mark.usefixtures("one_thread")


def data(n=16, seed=0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, generator=generator)
    return x, torch.stack([x[:, 0].sin(), x[:, 1] * x[:, 2]], dim=1)


def tiny(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 2))


def full_batch(model, optimizer, x, y, steps):
    for _ in range(steps):
        optimizer.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        optimizer.step()


def sgd_run(path, steps, every, **options):
    """A tiny network trained full batch with SGD under a tracker writing ``path``."""
    x, y = data()
    model = tiny()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.5)
    tracker = NTKTracker(model, (x, y), loss="mse", probe_size=4, every=every, progress=False, run_dir=path,
                         **options)
    with tracker.attach(optimizer):
        full_batch(model, optimizer, x, y, steps)
    return tracker, load_run(path)


# --------------------------------------------------------------------------- the last step


@pytest.mark.parametrize("steps, every, expected", [(5, 20, [0, 5]), (23, 10, [0, 10, 20, 23]), (20, 10, [0, 10, 20])])
def test_the_last_step_is_measured_and_marked_final(tmp_path, steps, every, expected):
    _, run = sgd_run(tmp_path / "run", steps, every)
    assert run.steps.tolist() == expected
    finals = [r.get("final") for r in run.records]
    assert finals == [None] * (len(expected) - 1) + ([True] if steps % every else [None])
    last = run.records[-1]
    assert last["predicted_train_loss"] is not None and last["train_loss"] is not None
    rows = dict(summary_table(run))
    assert rows["final train loss"] == f"{last['train_loss']:.4g}"  # the summary's final is the last step
    assert rows["measurements"].startswith(f"{len(expected)} (steps 0–{steps}")
    if steps % every:
        assert "measured at the end" in rows["measurements"]


def test_an_interrupted_run_is_not_measured_again(tmp_path):
    x, y = data()
    model = tiny()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    tracker = NTKTracker(model, (x, y), loss="mse", probe_size=4, every=10, progress=False, run_dir=tmp_path / "run")
    with pytest.raises(KeyboardInterrupt):
        with tracker.attach(optimizer):
            full_batch(model, optimizer, x, y, 7)
            raise KeyboardInterrupt
    assert load_run(tmp_path / "run").steps.tolist() == [0]


# --------------------------------------------------------------------------- memory


def live_tensor_bytes():
    gc.collect()
    with warnings.catch_warnings():  # isinstance on torch.distributed's deprecated proxies
        warnings.simplefilter("ignore", FutureWarning)
        return sum(obj.numel() * obj.element_size() for obj in gc.get_objects() if torch.is_tensor(obj))


def bytes_after(make_optimizer, checkpoints):
    x, y = data()
    model = tiny()
    optimizer = make_optimizer(model)
    tracker = NTKTracker(model, (x, y), loss="mse", probe_size=4, schedule="log", progress=False)
    found, done = [], 0
    with tracker.attach(optimizer):
        for checkpoint in checkpoints:
            full_batch(model, optimizer, x, y, checkpoint - done)
            done = checkpoint
            found.append(live_tensor_bytes())
    return tracker, found


@pytest.mark.slow
def test_live_tensor_bytes_stay_flat_past_the_dense_forecast_with_the_kernel_forecast():
    """The quick version: from step 200 to 1200, past the every-step part of the dense record."""
    tracker, found = bytes_after(lambda m: torch.optim.SGD(m.parameters(), lr=0.2, momentum=0.5), [200, 1200])
    assert tracker.forecast.kind == "kernel"
    assert found[1] == found[0]


@pytest.mark.slow
def test_live_tensor_bytes_stay_flat_over_10000_steps_with_the_kernel_forecast():
    tracker, found = bytes_after(lambda m: torch.optim.SGD(m.parameters(), lr=0.2, momentum=0.5), [2000, 10_000])
    assert tracker.forecast.kind == "kernel" and len(tracker.records) > 20
    assert found[1] == found[0]


@pytest.mark.slow
def test_live_tensor_bytes_stay_flat_over_10000_steps_with_the_twin():
    tracker, found = bytes_after(lambda m: torch.optim.Adam(m.parameters(), lr=1e-3), [2000, 10_000])
    assert tracker.forecast.kind == "twin" and tracker.forecast.step_count == 10_000
    assert found[1] == found[0]


# --------------------------------------------------------------------------- the dense forecast


def test_the_kernel_forecast_is_on_disk_at_every_step(tmp_path):
    _, run = sgd_run(tmp_path / "run", 130, 20, test=data(8, seed=1))
    dense = run.dense_forecast
    assert dense.steps.tolist() == list(range(131))
    for record in run.records:  # the dense curve passes through every measured prediction
        for field in ("predicted_train_loss", "predicted_test_loss"):
            assert dense.columns[field][record["step"]] == record[field]
    assert run.meta["forecast"] == {"kind": "kernel", "batches": "full"}


def test_the_twin_is_on_disk_at_log_spaced_steps_and_measurements(tmp_path):
    x, y = data()
    model = tiny()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    tracker = NTKTracker(model, (x, y), loss="mse", probe_size=4, every=20, progress=False, run_dir=tmp_path / "run")
    with tracker.attach(optimizer):
        for step in range(50):
            tracker.observe(x[:8], y[:8])
            optimizer.zero_grad()
            nn.functional.mse_loss(model(x[:8]), y[:8]).backward()
            optimizer.step()
    run = load_run(tmp_path / "run")
    assert run.dense_forecast.steps.tolist() == [0, 1, 2, 3, 4, 6, 8, 11, 16, 20, 23, 32, 40, 45, 50]
    assert run.meta["forecast"] == {"kind": "twin", "batches": "minibatch"}
    assert run.meta["prediction"]["optimizer"] == "Adam"
    at = dict(zip(run.dense_forecast.steps.tolist(), run.dense_forecast.columns["predicted_train_loss"]))
    assert all(at[r["step"]] == r["predicted_train_loss"] for r in run.records)


def test_predicted_vs_actual_has_named_fields(tmp_path):
    tracker, run = sgd_run(tmp_path / "run", 10, 5)
    curve = run.predicted_vs_actual()["train"]
    assert isinstance(curve, Curve)
    assert curve.steps.tolist() == [0, 5, 10]
    np.testing.assert_array_equal(curve.actual, [r["train_loss"] for r in tracker.records])
    np.testing.assert_array_equal(curve.predicted, [r["predicted_train_loss"] for r in tracker.records])


def test_predict_is_a_deprecated_alias_of_forecast():
    x, y = data()
    with pytest.warns(DeprecationWarning, match="forecast=None"):
        tracker = NTKTracker(tiny(), (x, y), loss="mse", probe_size=4, progress=False, predict=False)
    tracker.attach(torch.optim.SGD(tracker.model.parameters(), lr=0.1))
    assert tracker.forecast is None
    tracker.close()
    with pytest.warns(DeprecationWarning):
        tracker = NTKTracker(tiny(), (x, y), loss="mse", probe_size=4, progress=False, predict=True)
    tracker.attach(torch.optim.SGD(tracker.model.parameters(), lr=0.1))
    assert tracker.forecast.kind == "kernel"
    tracker.close()
    with pytest.raises(ValueError, match="forecast must be one of 'auto', 'kernel', 'twin' or None"):
        NTKTracker(tiny(), (x, y), loss="mse", probe_size=4, progress=False, forecast="both")
    with pytest.raises(ValueError, match="clip_grad_norm must be positive"):
        NTKTracker(tiny(), (x, y), loss="mse", probe_size=4, progress=False, clip_grad_norm=0)
