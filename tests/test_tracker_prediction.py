"""The tracker's predicted training curve (from the kernel at step 0) against the real one."""

import math
import warnings

import numpy as np
import pytest
import torch
from torch import nn

import ntk_torch as ntk
from ntk_torch import forecast as forecast_module
from ntk_torch.tracker import NTKTracker


def regression_data(n=24, features=4, outputs=2, seed=0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, features, generator=generator, dtype=torch.float64)
    y = torch.stack([torch.sin(x[:, 0]), torch.cos(x[:, 1]) * x[:, 2]], dim=1)[:, :outputs]
    return x, y


def class_data(n=30, features=4, seed=0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, features, generator=generator, dtype=torch.float64)
    return x, (x[:, 0] > 0).long() + (x[:, 1] > 0).long()


def mlp(features=4, outputs=2, width=16, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(features, width), nn.Tanh(), nn.Linear(width, outputs)).double()


def train_full_batch(model, optimizer, x, y, loss_fn, steps):
    for _ in range(steps):
        optimizer.zero_grad()
        loss_fn(model(x), y).backward()
        optimizer.step()


@pytest.mark.parametrize(
    "loss, options",
    [
        ("mse", dict(lr=0.3)),
        ("mse", dict(lr=0.2, momentum=0.9, nesterov=True)),
        ("mse", dict(lr=0.2, momentum=0.5, weight_decay=0.05)),
        ("cross_entropy", dict(lr=0.5, momentum=0.8)),
        ("cross_entropy", dict(lr=0.5, weight_decay=0.1)),
    ],
)
def test_prediction_is_exact_for_the_linearised_network(loss, options):
    """Training ``linearize(model)`` full batch with SGD is what the forecast predicts."""
    if loss == "mse":
        (x, y), (xt, yt), outputs = regression_data(), regression_data(n=10, seed=1), 2
    else:
        (x, y), (xt, yt), outputs = class_data(), class_data(n=12, seed=1), 3
    lin = ntk.linearize(mlp(outputs=outputs))
    optimizer = torch.optim.SGD(lin.parameters(), **options)
    tracker = NTKTracker(lin, (x, y), test=(xt, yt), loss=loss, probe_size=8, every=10, progress=False)
    loss_fn = getattr(nn.functional, "mse_loss" if loss == "mse" else "cross_entropy")
    with tracker.attach(optimizer):
        train_full_batch(lin, optimizer, x, y, loss_fn, steps=40)
    assert [r["step"] for r in tracker.records] == [0, 10, 20, 30, 40]
    assert tracker.records[-1]["train_loss"] < 0.8 * tracker.records[0]["train_loss"]
    for record in tracker.records:
        assert record["predicted_train_loss"] == pytest.approx(record["train_loss"], rel=1e-8)
        assert record["predicted_test_loss"] == pytest.approx(record["test_loss"], rel=1e-8)
        assert record["linearisation_gap"] < 1e-8
        if loss == "cross_entropy":
            assert record["predicted_train_accuracy"] == record["train_accuracy"]
            assert record["predicted_test_accuracy"] == record["test_accuracy"]
    assert tracker.forecast.describe()["approximation"] == "exact"


def test_wide_network_follows_the_prediction_and_the_run_exposes_both_curves(tmp_path):
    x, y = regression_data(n=32)
    xt, yt = regression_data(n=16, seed=1)
    model = ntk.models.MLP(4, 2, width=1024, depth=1, parametrization="ntk", seed=0).double()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    tracker = NTKTracker(model, (x, y), test=(xt, yt), loss="mse", probe_size=16, every=25,
                         progress=False, run_dir=tmp_path / "run")
    with tracker.attach(optimizer):
        train_full_batch(model, optimizer, x, y, nn.functional.mse_loss, steps=100)
    last = tracker.records[-1]
    assert last["train_loss"] < 0.5 * tracker.records[0]["train_loss"]
    assert last["predicted_train_loss"] == pytest.approx(last["train_loss"], rel=0.1)
    assert last["linearisation_gap"] < 0.05

    run = ntk.load_run(tmp_path / "run")
    curves = run.predicted_vs_actual()
    steps, actual, predicted = curves["train"]
    assert list(steps) == [0, 25, 50, 75, 100]
    np.testing.assert_allclose(actual, [r["train_loss"] for r in tracker.records])
    np.testing.assert_allclose(predicted, [r["predicted_train_loss"] for r in tracker.records])
    assert set(curves) == {"train", "test"}
    assert "linearisation_gap" in run.metrics
    meta = run.meta["prediction"]
    assert meta["points"] == 32 and meta["kernel_mode"] == "full" and not meta["approximate"]
    assert meta["lr"] == 0.5


@pytest.mark.parametrize(
    "make_optimizer, message",
    [
        (lambda m: torch.optim.Adam(m.parameters(), lr=0.01), "the optimizer is Adam"),
        (
            lambda m: torch.optim.SGD(
                [{"params": m[0].parameters(), "lr": 0.1}, {"params": m[2].parameters(), "lr": 0.2}]
            ),
            "parameter groups have different lr",
        ),
        (lambda m: torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.5, dampening=0.5), "dampening=0.5"),
    ],
)
def test_what_cannot_be_modelled_is_named_and_nothing_is_predicted(make_optimizer, message):
    """The kernel forecast, asked for, names what it cannot model (``"auto"`` takes the twin)."""
    x, y = regression_data()
    model = mlp()
    tracker = NTKTracker(model, (x, y), loss="mse", probe_size=8, progress=False, forecast="kernel")
    with pytest.warns(RuntimeWarning, match=message):
        tracker.attach(make_optimizer(model))
    assert tracker.forecast is None
    assert "predicted_train_loss" not in tracker.records[0]
    tracker.close()


def test_a_changing_learning_rate_is_warned_about_once():
    x, y = regression_data()
    model = mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.2)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
    tracker = NTKTracker(model, (x, y), loss="mse", probe_size=8, every=1, progress=False, forecast="kernel")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with tracker.attach(optimizer):
            for _ in range(4):
                train_full_batch(model, optimizer, x, y, nn.functional.mse_loss, steps=1)
                scheduler.step()
    lr_warnings = [w for w in caught if "learning rate changed" in str(w.message)]
    assert len(lr_warnings) == 1
    assert len(tracker.records) == 5 and all("predicted_train_loss" in r for r in tracker.records)


def test_large_training_sets_use_a_recorded_seeded_subset(tmp_path):
    x, y = class_data(n=40)
    model = mlp(outputs=3)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    tracker = NTKTracker(model, (x, y), loss="cross_entropy", probe_size=8, max_predict_points=15,
                         progress=False, run_dir=tmp_path / "run")
    with tracker.attach(optimizer):
        train_full_batch(model, optimizer, x, y, nn.functional.cross_entropy, steps=2)
    meta = ntk.load_run(tmp_path / "run").meta["prediction"]
    assert meta["points"] == 15 and meta["approximate"]
    assert len(meta["indices"]) == 15 and meta["indices"] == sorted(set(meta["indices"]))
    again = NTKTracker(mlp(outputs=3), (x, y), loss="cross_entropy", probe_size=8, max_predict_points=15,
                       progress=False)
    again.attach(torch.optim.SGD(again.model.parameters(), lr=0.1))
    assert list(again.forecast.points.indices) == meta["indices"]  # the same seed, the same subset
    again.close()


def test_trace_kernel_when_the_full_one_is_too_large(monkeypatch):
    monkeypatch.setattr(forecast_module, "MAX_FULL_ENTRIES", 10)
    x, y = regression_data()
    model = mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.3)
    tracker = NTKTracker(model, (x, y), loss="mse", probe_size=8, every=5, progress=False)
    with tracker.attach(optimizer):
        train_full_batch(model, optimizer, x, y, nn.functional.mse_loss, steps=10)
    described = tracker.forecast.describe()
    assert described["kernel_mode"] == "trace" and described["approximation"] == "isotropic"
    assert described["approximate"]
    assert all(math.isfinite(r["predicted_train_loss"]) for r in tracker.records)


def test_prediction_only_for_the_parameters_the_optimizer_trains():
    """A frozen first layer: the kernel (and the forecast) cover the trained layer only."""
    x, y = regression_data()
    lin = ntk.linearize(mlp())
    optimizer = torch.optim.SGD([p for n, p in lin.named_parameters() if n.startswith("2.")], lr=0.5)
    tracker = NTKTracker(lin, (x, y), loss="mse", probe_size=8, every=10, progress=False)
    with tracker.attach(optimizer):
        train_full_batch(lin, optimizer, x, y, nn.functional.mse_loss, steps=20)
    for record in tracker.records:
        assert record["predicted_train_loss"] == pytest.approx(record["train_loss"], rel=1e-8)


def test_no_forecast_without_an_optimizer_or_when_disabled():
    x, y = regression_data()
    tracker = NTKTracker(mlp(), (x, y), loss="mse", probe_size=8, progress=False)
    tracker.attach()
    tracker.step()
    assert tracker.forecast is None and "predicted_train_loss" not in tracker.records[0]
    model = mlp()
    disabled = NTKTracker(model, (x, y), loss="mse", probe_size=8, progress=False, predict=False)
    disabled.attach(torch.optim.SGD(model.parameters(), lr=0.1))
    assert disabled.forecast is None
    with pytest.raises(ValueError, match="max_predict_points must be at least 1"):
        NTKTracker(mlp(), (x, y), loss="mse", probe_size=8, progress=False, max_predict_points=0)
    with pytest.raises(TypeError, match="predict must be a bool"):
        NTKTracker(mlp(), (x, y), loss="mse", probe_size=8, progress=False, predict="yes")
