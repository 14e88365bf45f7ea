"""Warnings that explain a gap between the forecast and the network: each raised once in
its situation, pointing at the user's own line, and not otherwise."""

import inspect
import warnings

import pytest
import torch
from torch import nn

from ntk_torch.errors import ForecastWarning
from ntk_torch.predict import max_learning_rate
from ntk_torch import empirical_ntk
from ntk_torch.tracker import NTKTracker

KEYS = {
    "batchnorm": "BatchNorm is in train mode",
    "dropout": "Dropout is active",
    "lr": "largest stable learning rate",
    "minibatch": "minibatches forecast as full batch",
    "clipping": "gradients look clipped",
    "unobserved": "had no observed batch",
}


pytestmark = pytest.mark.usefixtures("one_thread")


def data(n=64, features=5, seed=0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, features, generator=generator)
    return x, (x[:, 0] > 0).long() + (x[:, 1] > 0.3).long()


def mlp(*extra, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 16), *extra, nn.Tanh(), nn.Linear(16, 3))


STEP_LINE = None  # set by train(): the line of its optimizer.step()


def train(model, optimizer, tracker, *, steps=20, batch=None, observe=False, clip=None, mode="train"):
    """A plain loop; returns the ForecastWarnings raised, by kind (see KEYS)."""
    global STEP_LINE
    x, y = data()
    getattr(model, mode)()
    caught_all = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with tracker.attach(optimizer):
            for step in range(steps):
                index = slice(None) if batch is None else slice((step * batch) % len(x), (step * batch) % len(x) + batch)
                xb, yb = x[index], y[index]
                if observe:
                    tracker.observe(xb, yb)
                optimizer.zero_grad()
                nn.functional.cross_entropy(model(xb), yb).backward()
                if clip is not None:
                    getattr(nn.utils, f"clip_grad_{clip[0]}_")(model.parameters(), clip[1])
                STEP_LINE = inspect.currentframe().f_lineno + 1
                optimizer.step()
        caught_all = [w for w in caught if issubclass(w.category, ForecastWarning)]
    found = {}
    for w in caught_all:
        kinds = [kind for kind, text in KEYS.items() if text in str(w.message)]
        assert len(kinds) == 1, str(w.message)
        assert kinds[0] not in found, f"{kinds[0]} warned twice"
        found[kinds[0]] = w
    return found


def tracker_for(model, **options):
    return NTKTracker(model, data(), probe_size=8, every=5, progress=False, **options)


def test_warnings_point_at_the_users_optimizer_step():
    model = mlp(nn.BatchNorm1d(16))
    found = train(model, torch.optim.SGD(model.parameters(), lr=0.1), tracker_for(model))
    warning = found["batchnorm"]
    assert warning.filename == __file__ and warning.lineno == STEP_LINE


def test_batchnorm_in_train_mode():
    model = mlp(nn.BatchNorm1d(16))
    found = train(model, torch.optim.SGD(model.parameters(), lr=0.1), tracker_for(model))
    assert set(found) == {"batchnorm"}
    assert "'1'" in str(found["batchnorm"].message) and "eval mode" in str(found["batchnorm"].message)
    model = mlp(nn.BatchNorm1d(16))
    assert train(model, torch.optim.SGD(model.parameters(), lr=0.1), tracker_for(model), mode="eval") == {}
    model = mlp(nn.BatchNorm1d(16))  # nothing to explain without a forecast
    assert train(model, torch.optim.SGD(model.parameters(), lr=0.1), tracker_for(model, forecast=None)) == {}


def test_dropout_active_in_training():
    model = mlp(nn.Dropout(0.3))
    found = train(model, torch.optim.Adam(model.parameters(), lr=1e-2), tracker_for(model))
    assert set(found) == {"dropout"}
    model = mlp(nn.Dropout(0.0))  # p = 0 changes nothing
    assert train(model, torch.optim.Adam(model.parameters(), lr=1e-2), tracker_for(model)) == {}
    model = mlp(nn.Dropout(0.3))
    assert train(model, torch.optim.Adam(model.parameters(), lr=1e-2), tracker_for(model), mode="eval") == {}


def test_learning_rate_above_the_stable_one_says_by_what_factor():
    model = mlp()
    x, y = data()
    kernel = empirical_ntk(model, x, mode="full").double()
    limit = max_learning_rate(kernel, loss="cross_entropy")
    found = train(model, torch.optim.SGD(model.parameters(), lr=3 * limit), tracker_for(model), steps=3)
    assert set(found) == {"lr"}
    assert "is 3x the largest stable learning rate" in str(found["lr"].message)
    model = mlp()
    assert train(model, torch.optim.SGD(model.parameters(), lr=0.5 * limit), tracker_for(model), steps=3) == {}


def test_minibatches_forecast_as_full_batch():
    # the kernel forecast, minibatches not shown: seen in the forward passes
    model = mlp()
    found = train(model, torch.optim.SGD(model.parameters(), lr=0.1), tracker_for(model), batch=16)
    assert set(found) == {"minibatch"}
    assert "16 of the 64" in str(found["minibatch"].message) and "forward passes" in str(found["minibatch"].message)
    # the kernel forecast asked for, minibatches shown
    model = mlp()
    found = train(model, torch.optim.SGD(model.parameters(), lr=0.1), tracker_for(model, forecast="kernel"),
                  batch=16, observe=True)
    assert set(found) == {"minibatch"} and "(observed)" in str(found["minibatch"].message)
    # the twin on the full batch while training uses minibatches
    model = mlp()
    found = train(model, torch.optim.Adam(model.parameters(), lr=1e-2), tracker_for(model), batch=16)
    assert set(found) == {"minibatch"} and "the twin trains on the full batch" in str(found["minibatch"].message)
    # shown, with "auto": the twin on the same minibatches; full batch: nothing to say
    model = mlp()
    assert train(model, torch.optim.SGD(model.parameters(), lr=0.1), tracker_for(model), batch=16, observe=True) == {}
    model = mlp()
    assert train(model, torch.optim.SGD(model.parameters(), lr=0.1), tracker_for(model)) == {}


@pytest.mark.slow
def test_clipping_the_tracker_was_not_told_about():
    model = mlp()
    found = train(model, torch.optim.Adam(model.parameters(), lr=1e-2), tracker_for(model), steps=32,
                  clip=("norm", 0.01))
    assert set(found) == {"clipping"} and "clip_grad_norm=0.01" in str(found["clipping"].message)
    model = mlp()
    found = train(model, torch.optim.SGD(model.parameters(), lr=0.1), tracker_for(model), steps=32,
                  clip=("value", 0.001))
    assert set(found) == {"clipping"} and "clip_grad_value=0.001" in str(found["clipping"].message)
    assert "the kernel forecast cannot clip" in str(found["clipping"].message)
    model = mlp()  # told: the twin clips too, nothing to say
    assert train(model, torch.optim.Adam(model.parameters(), lr=1e-2), tracker_for(model, clip_grad_norm=0.01),
                 steps=32, clip=("norm", 0.01)) == {}
    model = mlp()  # no clipping
    assert train(model, torch.optim.Adam(model.parameters(), lr=1e-2), tracker_for(model), steps=32) == {}


def test_a_step_without_an_observed_batch_in_minibatch_mode():
    x, y = data()
    model = mlp()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    tracker = tracker_for(model)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with tracker.attach(optimizer):
            for step in range(4):
                if step != 2:
                    tracker.observe(x[:16], y[:16])
                optimizer.zero_grad()
                nn.functional.cross_entropy(model(x[:16]), y[:16]).backward()
                optimizer.step()
    messages = [str(w.message) for w in caught if issubclass(w.category, ForecastWarning)]
    assert len(messages) == 1 and "step 3 had no observed batch" in messages[0]
    assert tracker.forecast.step_count == 4
