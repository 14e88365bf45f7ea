"""The linearised twin: the network linearised at step 0 trained with a clone of the
optimizer, against a linearised network trained by hand (float64, ``torch.func.jvp``), and
against the kernel forecast where both apply."""

import copy
import math

import pytest
import torch
from torch import nn

from ntk_torch.forecast import LinearisedForecast
from ntk_torch.losses import resolve
from ntk_torch.probe import load_set
from ntk_torch.tracker import NTKTracker
from ntk_torch.twin import LinearisedTwin

STEPS, EVERY, BATCH = 100, 10, 16


pytestmark = pytest.mark.usefixtures("one_thread")


def class_data(n=48, features=5, seed=0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, features, generator=generator, dtype=torch.float64)
    return x, (x[:, 0] > 0).long() + (x[:, 1] > 0.3).long()


def mlp(seed=0, features=5, classes=3, width=24):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(features, width), nn.Tanh(), nn.Linear(width, width), nn.Tanh(),
                         nn.Linear(width, classes)).double()


def minibatches(n, steps=STEPS, size=BATCH, seed=1):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randperm(n, generator=generator)[:size] for _ in range(steps)]


# Each recipe: an optimizer over named tensors, an optional scheduler, how gradients are
# clipped, and whether the steps use minibatches (observed) or the full batch.
RECIPES = {
    "adam+steplr+clip_grad_norm": dict(
        optimizer=lambda named: torch.optim.Adam(named.values(), lr=0.02),
        scheduler=lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=30, gamma=0.5),
        clip=("norm", 0.05), minibatch=True),
    "adamw param groups, amsgrad, cosine": dict(
        optimizer=lambda named: torch.optim.AdamW(
            [{"params": [named["0.weight"], named["0.bias"]], "lr": 0.02, "weight_decay": 0.1},
             {"params": [v for k, v in named.items() if not k.startswith("0.")], "lr": 0.005,
              "weight_decay": 0.01}], amsgrad=True),
        scheduler=lambda opt: torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=STEPS),
        clip=None, minibatch=True),
    "rmsprop centred, momentum, one-cycle, clip_grad_value": dict(
        optimizer=lambda named: torch.optim.RMSprop(named.values(), lr=0.003, momentum=0.9, centered=True,
                                                    weight_decay=1e-3),
        scheduler=lambda opt: torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.005, total_steps=STEPS),
        clip=("value", 0.02), minibatch=True),
    "adagrad, full batch": dict(
        optimizer=lambda named: torch.optim.Adagrad(named.values(), lr=0.05, lr_decay=1e-3),
        scheduler=None, clip=None, minibatch=False),
    "sgd per-group, dampening": dict(
        optimizer=lambda named: torch.optim.SGD(
            [{"params": [named["4.weight"], named["4.bias"]], "lr": 0.2},
             {"params": [v for k, v in named.items() if not k.startswith("4.")]}],
            lr=0.05, momentum=0.9, dampening=0.3),
        scheduler=None, clip=None, minibatch=True),
}


def clip(parameters, how):
    if how is not None:
        kind, value = how
        if kind == "norm":
            nn.utils.clip_grad_norm_(parameters, value)
        else:
            nn.utils.clip_grad_value_(parameters, value)


def tracked_run(recipe, data, test, batches):
    """The real network trained under the recipe, tracked with the twin forecast."""
    x, y = data
    model = mlp()
    optimizer = recipe["optimizer"](dict(model.named_parameters()))
    scheduler = recipe["scheduler"](optimizer) if recipe["scheduler"] else None
    how = recipe["clip"]
    options = {} if how is None else {f"clip_grad_{how[0]}": how[1]}
    tracker = NTKTracker(model, data, test=test, probe_size=8, every=EVERY, progress=False, **options)
    with tracker.attach(optimizer):
        for index in batches:
            xb, yb = (x[index], y[index]) if recipe["minibatch"] else (x, y)
            if recipe["minibatch"]:
                tracker.observe(xb, yb)
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(xb), yb).backward()
            clip(model.parameters(), how)
            optimizer.step()
            if scheduler is not None:
                scheduler.step()
    return tracker


def by_hand(recipe, data, test, batches):
    """``f0(x) + J0(x)(theta - theta0)`` with ``torch.func.jvp``, trained with the recipe's
    optimizer, scheduler and clipping; its train/test losses and accuracies at each
    measured step."""
    x, y = data
    model = mlp()  # the same initial parameters as the tracked network
    theta0 = {name: p.detach().clone() for name, p in model.named_parameters()}
    theta = {name: p.clone().requires_grad_() for name, p in theta0.items()}
    optimizer = recipe["optimizer"](theta)
    scheduler = recipe["scheduler"](optimizer) if recipe["scheduler"] else None

    def f_lin(inputs):
        delta = {name: theta[name] - theta0[name] for name in theta}
        out, change = torch.func.jvp(lambda p: torch.func.functional_call(model, p, (inputs,)), (theta0,), (delta,))
        return out + change

    def scores():
        with torch.no_grad():
            result = {}
            for split, (xs, ys) in (("train", data), ("test", test)):
                out = f_lin(xs)
                result[f"predicted_{split}_loss"] = float(nn.functional.cross_entropy(out, ys))
                result[f"predicted_{split}_accuracy"] = float((out.argmax(1) == ys).double().mean())
            return result

    curve = {0: scores()}
    for step, index in enumerate(batches, start=1):
        xb, yb = (x[index], y[index]) if recipe["minibatch"] else (x, y)
        optimizer.zero_grad()
        nn.functional.cross_entropy(f_lin(xb), yb).backward()
        clip(theta.values(), recipe["clip"])
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        if step % EVERY == 0:
            curve[step] = scores()
    return curve


@pytest.mark.slow
@pytest.mark.parametrize("name", list(RECIPES))
def test_the_twin_is_a_linearised_network_trained_by_hand(name):
    recipe = RECIPES[name]
    data, test = class_data(), class_data(n=20, seed=3)
    batches = minibatches(len(data[0]))
    tracker = tracked_run(recipe, data, test, batches)
    expected = by_hand(recipe, data, test, batches)
    assert isinstance(tracker.forecast, LinearisedTwin)
    assert tracker.forecast.batches == ("minibatch" if recipe["minibatch"] else "full")
    assert [r["step"] for r in tracker.records] == sorted(expected)
    first, last = tracker.records[0], tracker.records[-1]
    assert last["predicted_train_loss"] < 0.9 * first["predicted_train_loss"]  # the twin trained
    for record in tracker.records:
        for field, value in expected[record["step"]].items():
            assert record[field] == pytest.approx(value, rel=1e-6, abs=1e-12), (record["step"], field)


def test_the_twin_reads_the_learning_rate_of_each_group_at_every_step():
    data, test = class_data(), class_data(n=20, seed=3)
    recipe = RECIPES["adamw param groups, amsgrad, cosine"]
    tracker = tracked_run(recipe, data, test, minibatches(len(data[0]), steps=40))
    twin = tracker.forecast.optimizer.param_groups
    # CosineAnnealingLR: step k runs at base (1 + cos(pi (k - 1) / T)) / 2; the twin took
    # step 40's from the real optimizer before its 40th step
    assert [group["lr"] for group in twin] == pytest.approx(
        [base * (1 + math.cos(math.pi * 39 / STEPS)) / 2 for base in (0.02, 0.005)], rel=1e-12)
    assert [group["weight_decay"] for group in twin] == [0.1, 0.01] and all(g["amsgrad"] for g in twin)
    assert type(tracker.forecast.optimizer) is torch.optim.AdamW


@pytest.mark.slow
@pytest.mark.parametrize(
    "loss, options",
    [
        ("mse", dict(lr=0.2, momentum=0.9, weight_decay=0.05)),
        ("mse", dict(lr=0.1, momentum=0.8, nesterov=True, weight_decay=0.1)),
        ("cross_entropy", dict(lr=0.5, momentum=0.9, weight_decay=0.02)),
    ],
)
def test_kernel_and_twin_agree_on_full_batch_sgd(loss, options):
    """Full-batch SGD with momentum and weight decay: the function-space forecast and the
    twin trained in parameter space are the same linearised network, to 1e-8."""
    x, y = class_data(n=30)
    if loss == "mse":
        y = torch.stack([torch.sin(x[:, 0]), x[:, 1] * x[:, 2], torch.cos(x[:, 3])], dim=1)
    xt, yt = x[:10] + 0.1, y[:10]
    loss_fn = nn.functional.mse_loss if loss == "mse" else nn.functional.cross_entropy
    predictions = {}
    for kind in ("kernel", "twin"):
        model = mlp()
        optimizer = torch.optim.SGD(model.parameters(), **options)
        tracker = NTKTracker(model, (x, y), test=(xt, yt), loss=loss, probe_size=8, every=10, progress=False,
                             forecast=kind)
        with tracker.attach(optimizer):
            for _ in range(60):
                optimizer.zero_grad()
                loss_fn(model(x), y).backward()
                optimizer.step()
        predictions[kind] = tracker.records
        assert tracker.forecast.kind == kind
    kernel, twin = predictions["kernel"], predictions["twin"]
    assert kernel[-1]["predicted_train_loss"] < 0.7 * kernel[0]["predicted_train_loss"]
    for a, b in zip(kernel, twin):
        assert a["step"] == b["step"]
        for field in ("predicted_train_loss", "predicted_test_loss"):
            assert b[field] == pytest.approx(a[field], rel=1e-8), (a["step"], field)


def test_auto_takes_the_kernel_for_full_batch_sgd_and_the_twin_once_a_minibatch_is_observed():
    x, y = class_data()
    choices = {}
    for observe in (False, True):
        model = mlp()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        tracker = NTKTracker(model, (x, y), probe_size=8, every=5, progress=False)
        with tracker.attach(optimizer):
            for index in minibatches(len(x), steps=5):
                xb, yb = (x[index], y[index]) if observe else (x, y)
                if observe:
                    tracker.observe(xb, yb)
                optimizer.zero_grad()
                nn.functional.cross_entropy(model(xb), yb).backward()
                optimizer.step()
        choices[observe] = tracker.forecast
    assert isinstance(choices[False], LinearisedForecast)
    assert isinstance(choices[True], LinearisedTwin) and choices[True].batches == "minibatch"
    assert choices[True].dense()[0] == [0, 1, 2, 3, 4, 5]  # from step 0, though chosen at step 1


@pytest.mark.parametrize("make", [
    lambda model: torch.optim.Adam(model.parameters(), lr=1e-3),
    lambda model: torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, dampening=0.1),
    lambda model: torch.optim.SGD(model.parameters(), lr=0.1),  # with a scheduler, below
])
def test_auto_takes_the_twin_for_what_the_kernel_cannot_model(make):
    x, y = class_data()
    model = mlp()
    optimizer = make(model)
    torch.optim.lr_scheduler.StepLR(optimizer, step_size=5)  # sets initial_lr, as every scheduler
    tracker = NTKTracker(model, (x, y), probe_size=8, progress=False)
    tracker.attach(optimizer)
    assert isinstance(tracker.forecast, LinearisedTwin)
    tracker.close()


def test_batches_observes_each_pair_and_yields_it():
    x, y = class_data()
    model = mlp()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    loader = [(x[index], y[index]) for index in minibatches(len(x), steps=6)]
    tracker = NTKTracker(model, (x, y), probe_size=8, every=3, progress=False)
    seen = []
    with tracker.attach(optimizer):
        for xb, yb in tracker.batches(loader):
            seen.append(len(yb))
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(xb), yb).backward()
            optimizer.step()
    assert seen == [BATCH] * 6 and tracker.forecast.batches == "minibatch"
    assert tracker.forecast.step_count == 6


def test_observe_and_batches_check_what_they_are_given():
    x, y = class_data()
    tracker = NTKTracker(mlp(), (x, y), probe_size=8, progress=False)
    with pytest.raises(RuntimeError, match="attach"):
        tracker.observe(x[:4], y[:4])
    tracker.attach(torch.optim.Adam(tracker.model.parameters()))
    with pytest.raises(ValueError, match="different lengths"):
        tracker.observe(x[:4], y[:3])
    with pytest.raises(TypeError, match=r"the observed batch\[1\] \(the labels\) must be a Tensor"):
        tracker.observe(x[:4], [0, 1, 2, 0])
    with pytest.raises(TypeError, match="needs \\(inputs, targets\\) pairs"):
        next(tracker.batches([x[:4]]))
    tracker.close()


def test_the_twin_never_touches_the_real_model_or_optimizer():
    x, y = class_data()
    model = mlp()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    nn.functional.cross_entropy(model(x), y).backward()
    optimizer.step()  # the real optimizer has state before the tracker starts
    state = copy.deepcopy(optimizer.state_dict())
    parameters = {name: p.detach().clone() for name, p in model.named_parameters()}
    grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    twin = LinearisedTwin(model=model, optimizer=optimizer, points=load_set((x, y), "train"), test=None,
                          loss=resolve("cross_entropy"), output_fn=None, approximate_points=False)
    for _ in range(3):
        twin.step(follow=optimizer)
    for name, p in model.named_parameters():
        assert torch.equal(p, parameters[name]) and torch.equal(p.grad, grads[name])
    after = optimizer.state_dict()
    for index, entry in state["state"].items():
        for key, value in entry.items():
            assert torch.equal(after["state"][index][key], value)
    # the twin started from the real optimizer's state: its step counters moved on from it
    assert all(float(s["step"]) == 4 for s in twin.optimizer.state.values())


@pytest.mark.parametrize("make, message", [
    (lambda p: torch.optim.LBFGS(p), "closure"),
    (lambda p: torch.optim.SparseAdam(p), "sparse gradients"),
])
def test_optimizers_the_twin_cannot_mirror_are_named(make, message):
    x, y = class_data()
    model = mlp()
    tracker = NTKTracker(model, (x, y), probe_size=8, progress=False, forecast="twin")
    with pytest.warns(RuntimeWarning, match=message):
        tracker.attach(make(model.parameters()))
    assert tracker.forecast is None
    tracker.close()
