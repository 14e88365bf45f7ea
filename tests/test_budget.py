"""NTKTracker(budget=...): measurements chosen so that tracking stays within the budget."""

import time

import pytest
import torch
from torch import nn

from ntk_torch.budget import TimeBudget
from ntk_torch.data import digits
from ntk_torch.schedule import Schedule
from ntk_torch.tracker import NTKTracker


def _digits_mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))


def _train(model, optimizer, x, y, steps, tracker=None, batch=256):
    for step in range(steps):
        start = (step * batch) % (len(x) - batch)
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x[start:start + batch]), y[start:start + batch]).backward()
        optimizer.step()


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::ntk_torch.errors.ForecastWarning")
def test_tracking_stays_within_the_budget_on_the_digits_mlp():
    split = digits()
    x, y = split.x_train, split.y_train
    model = _digits_mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    tracker = NTKTracker(model, (x, y), probe_size=16, every=1, budget=0.1, forecast=None, progress=False)
    with tracker.attach(optimizer):
        _train(model, optimizer, x, y, steps=64)
    budget = tracker.budget
    assert budget.skipped > 0 and budget.measured < 64
    steps = [r["step"] for r in tracker.records]
    floor = [0, 1, 2, 3, 4, 6, 8, 11, 16, 23, 32, 45, 64]
    assert set(floor) <= set(steps)  # the log schedule is the floor
    # Loose: the optional measurements stay within the budget; the floor's are extra.
    allowance = (budget.forced + 2) * budget.cost * 2
    assert budget.tracking <= 0.1 * budget.training + allowance


def test_time_budget_decides_from_both_clocks():
    budget = TimeBudget(0.5, Schedule(every=1))
    now = time.perf_counter()
    calls = []
    for step in range(1, 40):
        budget.run(step, lambda: calls.append(step) or step, now)
        now = time.perf_counter()
    # No training time passes between the calls: only the floor (and the first) are measured.
    assert calls == [1, 2, 3, 4, 6, 8, 11, 16, 23, 32]
    assert budget.forced == len(calls) and budget.skipped == 39 - len(calls)


def test_budget_errors():
    with pytest.raises(ValueError, match=r"budget must be a fraction of the training time in \(0, 1\]"):
        TimeBudget(0.0, Schedule())
    with pytest.raises(TypeError, match="budget must be a number"):
        TimeBudget("10%", Schedule())


@pytest.mark.slow
def test_training_with_a_budget_is_bit_identical():
    split = digits()
    x, y = split.x_train[:512], split.y_train[:512]
    results = []
    for tracked in (False, True):
        model = _digits_mlp(1)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        torch.manual_seed(7)
        if tracked:
            tracker = NTKTracker(model, (x, y), probe_size=8, every=1, budget=0.2, forecast=None, progress=False)
            with tracker.attach(optimizer):
                _train(model, optimizer, x, y, steps=12, batch=64)
        else:
            _train(model, optimizer, x, y, steps=12, batch=64)
        results.append(([p.detach().clone() for p in model.parameters()], torch.rand(3)))
    (p0, r0), (p1, r1) = results
    assert all(torch.equal(a, b) for a, b in zip(p0, p1)) and torch.equal(r0, r1)
