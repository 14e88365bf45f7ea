"""NTKTracker: records, do-no-harm, schedules, step counting, run directories, errors."""

from __future__ import annotations

import contextlib
import gc
import math
import random
import types
import warnings

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

import ntk_torch
from ntk_torch import load_run
from ntk_torch.schedule import log_schedule
from ntk_torch.tracker import NTKTracker

from helpers import is_tensor, live_tensor_count

CUDA = pytest.param("cuda", marks=[
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
])


# --------------------------------------------------------------------------- fixtures


def make_data(n=96, features=6, classes=3, seed=0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, features, generator=generator)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0.5).long()  # learnable labels in [0, 3)
    return x, y % classes


def make_model(seed=0, features=6, classes=3):
    """An MLP with BatchNorm, Dropout and a frozen bias: every hygiene hazard at once."""
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Linear(features, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Dropout(0.2), nn.Linear(16, classes)
    )
    model[0].bias.requires_grad_(False)
    return model


def tracker_for(model, data, **options):
    options = {"probe_size": 16, "every": 2, "progress": False, **options}
    return NTKTracker(model, data, **options)


def train(model, optimizer, data, steps, batch=16):
    """A plain training loop: Dropout and BatchNorm in train mode, SGD-style steps."""
    x, y = data
    model.train()
    for step in range(steps):
        start = (step * batch) % len(x)
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x[start:start + batch]), y[start:start + batch]).backward()
        optimizer.step()


def steps_of(tracker):
    return [record["step"] for record in tracker.records]


# --------------------------------------------------------------------------- records


def test_records_start_at_zero_drift_and_drift_grows_with_training():
    data = make_data()
    model = make_model()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    tracker = tracker_for(model, data, test=make_data(n=40, seed=1), every=3)
    with tracker.attach(optimizer):
        train(model, optimizer, data, steps=9)

    first, last = tracker.records[0], tracker.records[-1]
    assert steps_of(tracker) == [0, 3, 6, 9]
    assert first["relative_change"] == 0.0 and first["kernel_distance"] == 0.0
    assert first["param_distance"] == 0.0 and first["velocity"] is None
    drifts = [r["relative_change"] for r in tracker.records]
    assert drifts[1] > 0 and drifts[-1] > drifts[1]
    distances = [r["param_distance"] for r in tracker.records]
    assert distances == sorted(distances) and distances[-1] > 0
    for record in tracker.records[1:]:
        assert record["velocity"] > 0 and 0 < record["kernel_distance"] < 1
    for record in tracker.records:
        assert record["finite"] is True
        assert sum(record["layer_share"].values()) == pytest.approx(1.0)
        assert set(record["layer_share"]) == {"0", "1", "4"}
        eigenvalues = record["top_eigenvalues"]
        assert len(eigenvalues) == 10 and eigenvalues == sorted(eigenvalues, reverse=True)
        assert sum(eigenvalues) <= record["trace"] * (1 + 1e-6)
        assert 1.0 <= record["effective_rank"] <= 16
        assert -1.0 <= record["target_alignment"] <= 1.0
        assert 0.0 <= record["probe_accuracy"] <= 1.0 and 0.0 <= record["test_accuracy"] <= 1.0
        assert 0 < record["kernel_time"] < record["measure_time"]  # the rest is bookkeeping
    assert last["probe_loss"] < first["probe_loss"]


def test_kernel_time_is_the_probe_kernels_share_of_the_measurement(monkeypatch):
    """A delay inside the probe kernel's computation lands in ``kernel_time``, not in the
    rest of ``measure_time`` (the bookkeeping). The delay (0.3 s) dwarfs what the tiny
    model's kernel and bookkeeping take, so the split is checked, not their speed."""
    import time

    from ntk_torch.kernel import NTK

    delay = 0.3
    tracker = tracker_for(make_model(), make_data(), forecast=None, every=1)
    tracker.attach()
    computed = NTK.__call__
    monkeypatch.setattr(NTK, "__call__", lambda self, *a, **k: (time.sleep(delay), computed(self, *a, **k))[1])
    tracker.step()
    record = tracker.records[-1]
    assert record["kernel_time"] >= delay
    assert record["measure_time"] - record["kernel_time"] < delay
    tracker.close()


def test_step_zero_record_matches_direct_computation():
    x, y = data = make_data()
    model = make_model()
    tracker = tracker_for(model, data, mode="trace")
    tracker.attach()
    record = tracker.records[0]
    probe = torch.tensor(tracker.probe_indices)

    K = ntk_torch.empirical_ntk(model, x[probe], mode="trace")
    torch.testing.assert_close(tracker.initial_kernel, K)
    assert record["trace"] == pytest.approx(float(K.diagonal().sum()), rel=1e-6)
    assert record["frobenius"] == pytest.approx(float(K.norm()), rel=1e-6)
    assert record["target_alignment"] == pytest.approx(ntk_torch.metrics.target_alignment(K, y[probe]))
    assert record["effective_rank"] == pytest.approx(ntk_torch.metrics.effective_rank(K))
    model.eval()
    with torch.no_grad():
        logits = model(x[probe])
    model.train()
    assert record["probe_loss"] == pytest.approx(float(nn.functional.cross_entropy(logits, y[probe])))
    assert record["probe_accuracy"] == float((logits.argmax(1) == y[probe]).float().mean())
    tracker.close()


@pytest.mark.parametrize("mode", ["diagonal", "full"])
def test_output_layouts_give_consistent_traces(mode):
    data = make_data()
    model = make_model()
    trace_tracker = tracker_for(model, data, mode="trace")
    other = tracker_for(model, data, mode=mode)
    trace_tracker.attach(), other.attach()
    a, b = trace_tracker.records[0], other.records[0]
    assert b["trace"] == pytest.approx(a["trace"], rel=1e-5)
    for group, share in a["layer_share"].items():
        assert b["layer_share"][group] == pytest.approx(share, rel=1e-5)
    assert -1.0 <= b["target_alignment"] <= 1.0


def test_regression_loss_and_custom_callable():
    x, _ = make_data()
    targets = torch.stack([x[:, 0], x[:, 1] - x[:, 2]], dim=1)
    model = make_model(classes=2)
    mse = tracker_for(model, (x, targets), loss="mse")
    custom = tracker_for(model, (x, targets), loss=nn.SmoothL1Loss())
    mse.attach(), custom.attach()
    assert "probe_accuracy" not in mse.records[0]
    assert mse.records[0]["probe_loss"] > 0 and custom.records[0]["probe_loss"] > 0
    assert -1.0 <= mse.records[0]["target_alignment"] <= 1.0


def test_measure_is_idempotent_within_a_step(capsys):
    model = make_model()
    tracker = tracker_for(model, make_data(), progress=True)
    tracker.attach()
    assert tracker.measure() is tracker.records[0]
    tracker.step()  # step 1, not scheduled (every=2)
    assert steps_of(tracker) == [0]
    tracker.measure()  # forced
    assert steps_of(tracker) == [0, 1]
    tracker.close()
    assert "NTK" in capsys.readouterr().err  # the progress line


# --------------------------------------------------------------------------- do no harm


def _rng_states(device):
    states = [torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate()]
    if device == "cuda":
        states.append(torch.cuda.get_rng_state())
    return states


def _train_adam(model, optimizer, scheduler, data, steps, tracker=None, batch=16):
    """Minibatches (shown to the tracker when there is one), clipped gradients, a
    scheduler stepped after each optimizer step."""
    x, y = data
    model.train()
    for step in range(steps):
        start = (step * batch) % len(x)
        xb, yb = x[start:start + batch], y[start:start + batch]
        if tracker is not None:
            tracker.observe(xb, yb)
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(xb), yb).backward()
        nn.utils.clip_grad_norm_(model.parameters(), 0.5)
        optimizer.step()
        scheduler.step()


def _run(device, tracked, recipe="sgd"):
    """Train for 9 steps (SGD with momentum and weight decay, or Adam with a scheduler,
    clipping and observed minibatches; BatchNorm, Dropout) from fixed seeds; return
    everything the tracker must not change."""
    x, y = make_data()
    data = (x.to(device), y.to(device))
    model = make_model().to(device)
    trained = [p for p in model.parameters() if p.requires_grad]
    scheduler = None
    if recipe == "sgd":
        optimizer = torch.optim.SGD(trained, lr=0.1, momentum=0.9, weight_decay=1e-3)
    else:
        optimizer = torch.optim.Adam(trained, lr=0.05, weight_decay=1e-3)
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=3, gamma=0.5)
    torch.manual_seed(1), np.random.seed(1), random.seed(1)
    if device == "cuda":
        torch.cuda.manual_seed(1)
    tracker = None
    if tracked:
        options = {"clip_grad_norm": 0.5} if recipe == "adam" else {}
        tracker = tracker_for(model, data, test=make_data(n=30, seed=2), every=2, **options)
    with tracker.attach(optimizer) if tracked else contextlib.nullcontext():
        if recipe == "sgd":
            train(model, optimizer, data, steps=9)
        else:
            _train_adam(model, optimizer, scheduler, data, steps=9, tracker=tracker)
    if tracked:
        assert steps_of(tracker) == [0, 2, 4, 6, 8, 9]  # the last step, measured at close
        assert tracker.forecast.kind == ("kernel" if recipe == "sgd" else "twin")
    return {
        "state": {k: v.cpu().clone() for k, v in model.state_dict().items()},
        "grads": [None if p.grad is None else p.grad.cpu().clone() for p in model.parameters()],
        "requires_grad": [p.requires_grad for p in model.parameters()],
        "training": [m.training for m in model.modules()],
        "rng": _rng_states(device),
        "optimizer": optimizer.state_dict(),
        "scheduler": None if scheduler is None else scheduler.state_dict(),
    }


@pytest.mark.parametrize("recipe", ["sgd", "adam"], ids=["sgd", "adam+scheduler+clipping+observed"])
@pytest.mark.parametrize("device", ["cpu", CUDA])
def test_training_with_tracker_is_bit_identical(device, recipe):
    plain, tracked = _run(device, tracked=False, recipe=recipe), _run(device, tracked=True, recipe=recipe)
    for name, value in plain["state"].items():
        assert torch.equal(value, tracked["state"][name]), name
    for a, b in zip(plain["grads"], tracked["grads"]):
        assert (a is None and b is None) or torch.equal(a, b)
    assert plain["requires_grad"] == tracked["requires_grad"] == [True, False, True, True, True, True]
    assert plain["training"] == tracked["training"]
    assert torch.equal(plain["rng"][0], tracked["rng"][0])
    assert np.array_equal(plain["rng"][1], tracked["rng"][1])
    assert plain["rng"][2] == tracked["rng"][2]
    if device == "cuda":
        assert torch.equal(plain["rng"][3], tracked["rng"][3])
    states = plain["optimizer"]["state"], tracked["optimizer"]["state"]
    assert states[0].keys() == states[1].keys()
    for index, entry in states[0].items():
        assert entry.keys() == states[1][index].keys()
        for key, value in entry.items():  # momentum buffers; Adam's moments and step counts
            assert torch.equal(value, states[1][index][key]), (index, key)
    assert plain["optimizer"]["param_groups"] == tracked["optimizer"]["param_groups"]
    assert plain["scheduler"] == tracked["scheduler"]


def test_measurement_leaves_grads_modes_and_graph_alone():
    x, y = data = make_data()
    model = make_model()
    model[4].eval()  # a model mixing modes keeps each module's own
    tracker = tracker_for(model, data)
    tracker.attach()
    loss = nn.functional.cross_entropy(model(x[:8]), y[:8])
    loss.backward(retain_graph=True)
    grads = [None if p.grad is None else p.grad.clone() for p in model.parameters()]
    modes = [m.training for m in model.modules()]
    tracker.measure(), tracker.step(), tracker.step()
    assert [m.training for m in model.modules()] == modes
    for p, g in zip(model.parameters(), grads):
        assert (p.grad is None and g is None) or torch.equal(p.grad, g)
    loss.backward()  # the retained graph is intact
    tracker.close()


def _tensors_held_by(tracker):
    """(count, bytes) of the tensors reachable from the tracker, not through the model."""
    seen, stack, count, size = {id(tracker.model)}, [tracker.__dict__], 0, 0
    while stack:
        obj = stack.pop()
        # type(obj), not isinstance: no attribute of obj is read (see helpers.is_tensor)
        if id(obj) in seen or issubclass(type(obj), (type, types.ModuleType, nn.Module)):
            continue
        seen.add(id(obj))
        if is_tensor(obj):
            count, size = count + 1, size + obj.numel() * obj.element_size()
        stack.extend(gc.get_referents(obj))
    return count, size


def _contains_tensor(value):
    if isinstance(value, dict):
        return any(_contains_tensor(v) for v in value.values())
    if isinstance(value, list):
        return any(_contains_tensor(v) for v in value)
    return isinstance(value, (torch.Tensor, np.ndarray))


@pytest.mark.slow
def test_tracker_holds_a_bounded_set_of_tensors(tmp_path):
    """Only the kernel at step 0, the previous kernel, theta_0 and the data stay; records
    hold plain numbers; kernels kept by keep_kernels go to disk."""
    model = make_model()
    tracker = tracker_for(model, make_data(), every=1, run_dir=tmp_path / "run", keep_kernels="all")
    tracker.attach()
    for _ in range(3):
        tracker.step()
    held = _tensors_held_by(tracker)
    for _ in range(8):
        tracker.step()
    assert _tensors_held_by(tracker) == held
    assert len(tracker.records) == 12
    assert not any(_contains_tensor(record) for record in tracker.records)
    tracker.close()
    assert len(load_run(tmp_path / "run").kernel_steps) == 12  # "all": on disk, not in memory


@pytest.mark.slow
def test_live_tensors_do_not_grow_with_the_number_of_measurements():
    """No tensor anywhere in the process accumulates with measurements."""
    tracker = tracker_for(make_model(), make_data(), every=1)
    tracker.attach()
    for _ in range(3):
        tracker.step()
    before = live_tensor_count()
    for _ in range(8):
        tracker.step()
    assert live_tensor_count() == before
    tracker.close()


# --------------------------------------------------------------------------- schedules


def _stepped(schedule_options, steps):
    tracker = tracker_for(make_model(), make_data(), **schedule_options)
    tracker.attach()
    for _ in range(steps):
        tracker.step()
    return steps_of(tracker)


def test_schedule_every():
    assert _stepped({"every": 4}, 10) == [0, 4, 8]


def test_schedule_explicit_list_always_includes_step_zero():
    assert _stepped({"schedule": [7, 2, 5, 5, 100]}, 8) == [0, 2, 5, 7]
    assert _stepped({"schedule": np.array([0, 3])}, 8) == [0, 3]


def test_schedule_log():
    assert log_schedule(100) == [0, 1, 2, 3, 4, 6, 8, 11, 16, 23, 32, 45, 64, 91]
    assert _stepped({"schedule": "log"}, 17) == [0, 1, 2, 3, 4, 6, 8, 11, 16]
    steps = log_schedule(10**6)
    ratios = [b / a for a, b in zip(steps[10:], steps[11:])]
    assert all(1.3 < r < 1.5 for r in ratios)  # two measurements per doubling


def test_step_counting_with_gradient_accumulation():
    x, y = data = make_data()
    model = make_model()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    tracker = tracker_for(model, data, every=1)
    with tracker.attach(optimizer):
        for update in range(3):
            optimizer.zero_grad()
            for micro in range(4):  # four backward passes per optimizer step
                i = (update * 4 + micro) * 4
                (nn.functional.cross_entropy(model(x[i:i + 4]), y[i:i + 4]) / 4).backward()
            optimizer.step()
    assert tracker.step_count == 3
    assert steps_of(tracker) == [0, 1, 2, 3]


@pytest.mark.parametrize("fused", [False, True], ids=["foreach", "fused"])
def test_step_skipped_by_grad_scaler_is_not_counted(fused):
    """GradScaler skips the update after inf gradients: not calling ``step`` (usual
    optimizers) or calling it with ``found_inf`` set (fused ones)."""
    x, y = data = make_data()
    model = make_model()
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=0.01, fused=fused)
    scaler = torch.amp.GradScaler("cpu")
    tracker = tracker_for(model, data, every=1)
    with tracker.attach(optimizer):
        for iteration in range(4):
            optimizer.zero_grad()
            scaler.scale(nn.functional.cross_entropy(model(x[:16]), y[:16])).backward()
            if iteration == 1:
                model[4].weight.grad[0, 0] = math.inf
            before = model[4].weight.detach().clone()
            scaler.step(optimizer)
            scaler.update()
            assert torch.equal(before, model[4].weight) == (iteration == 1)
    assert tracker.step_count == 3
    assert steps_of(tracker) == [0, 1, 2, 3]


# --------------------------------------------------------------------------- run directories


def test_run_directory_round_trip(tmp_path):
    x, y = data = make_data()
    model = make_model()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    tracker = tracker_for(model, data, every=1, run_dir=tmp_path / "run", test=(x[:20], y[:20]))
    with tracker.attach(optimizer):
        train(model, optimizer, data, steps=6)

    run = load_run(tmp_path / "run")
    assert tracker.run.records == run.records == tracker.records
    assert run.status == "completed"
    assert run.kernel_steps.tolist() == [0, 1, 2, 4, 6]  # "log": m = 0 or 2**k, and the latest
    np.testing.assert_array_equal(run.kernel(0), tracker.initial_kernel.numpy())
    assert run.metrics["relative_change"][0] == 0.0
    assert run.steps.tolist() == list(range(7))
    meta = run.meta
    assert meta["probe"]["indices"] == tracker.probe_indices
    assert meta["probe"]["train_size"] == 96
    assert meta["model"]["num_params"] == sum(p.numel() for p in model.parameters())
    assert meta["model"]["num_tracked"] == meta["model"]["num_trainable"] < meta["model"]["num_params"]
    assert set(meta["versions"]) >= {"torch", "ntk_torch", "python"}
    assert meta["config"]["schedule"] == "every 1" and meta["config"]["loss"] == "cross_entropy"


def test_keyboard_interrupt_leaves_a_loadable_run(tmp_path):
    data = make_data()
    model = make_model()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    tracker = tracker_for(model, data, every=2, run_dir=tmp_path / "run")
    with pytest.raises(KeyboardInterrupt):
        with tracker.attach(optimizer):
            train(model, optimizer, data, steps=5)
            raise KeyboardInterrupt
    assert tracker.closed and not optimizer._optimizer_step_post_hooks
    train(model, optimizer, data, steps=2)  # detached: no more measurements
    run = load_run(tmp_path / "run")
    assert run.status == "interrupted"
    assert run.steps.tolist() == [0, 2, 4] == steps_of(tracker)
    with pytest.raises(RuntimeError, match="closed"):
        tracker.attach(optimizer)


def test_existing_run_needs_overwrite(tmp_path):
    data = make_data()
    tracker_for(make_model(), data, run_dir=tmp_path / "run").close()
    with pytest.raises(FileExistsError, match="overwrite"):
        tracker_for(make_model(), data, run_dir=tmp_path / "run")
    tracker_for(make_model(), data, run_dir=tmp_path / "run", overwrite=True).close()


# --------------------------------------------------------------------------- non-finite


def test_nonfinite_kernel_is_recorded_with_one_warning(tmp_path):
    model = make_model()
    tracker = tracker_for(model, make_data(), every=1, run_dir=tmp_path / "run")
    tracker.attach()
    tracker.step()
    saved = model[4].weight.detach().clone()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with torch.no_grad():
            model[4].weight[0, 0] = math.nan
        tracker.step(), tracker.step()
        with torch.no_grad():
            model[4].weight.copy_(saved)
        tracker.step()
    nonfinite = [w for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(nonfinite) == 1 and "step 2" in str(nonfinite[0].message)
    records = load_run(tmp_path / "run").records
    assert [r["finite"] for r in records] == [True, True, False, False, True]
    # A NaN in the last layer's weights reaches the earlier layers' Jacobians (through the
    # backward pass); the last layer's own Jacobian, its input activations, stays finite.
    assert records[2]["nonfinite_groups"] == records[3]["nonfinite_groups"] == ["0", "1"]
    assert records[2]["trace"] is None and records[2]["relative_change"] is None
    assert math.isnan(records[2]["probe_loss"])
    # Step 4 has step 1's weights back: no drift since step 1, the last finite kernel.
    assert records[4]["relative_change"] == pytest.approx(records[1]["relative_change"])
    assert records[4]["velocity"] == pytest.approx(0.0, abs=1e-12)
    tracker.close()


# --------------------------------------------------------------------------- data


def test_dataset_and_tensors_give_the_same_probe():
    x, y = data = make_data()
    from_tensors = tracker_for(make_model(), data, seed=3)
    from_dataset = tracker_for(make_model(), TensorDataset(x, y), seed=3, test=TensorDataset(x[:9], y[:9]))
    assert from_tensors.probe_indices == from_dataset.probe_indices
    assert from_tensors.probe_indices == sorted(set(from_tensors.probe_indices))
    assert torch.equal(from_dataset.probe.x, x[from_dataset.probe_indices])
    assert tracker_for(make_model(), data, seed=4).probe_indices != from_tensors.probe_indices


def test_probe_choice_leaves_the_global_rng_alone():
    model, data = make_model(), make_data()
    torch.manual_seed(5)
    state = torch.get_rng_state()
    tracker_for(model, data)
    assert torch.equal(torch.get_rng_state(), state)


def test_tuple_inputs_and_output_fn():
    class TwoInputs(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(3, 4), nn.Linear(2, 4)

        def forward(self, u, v):
            return {"logits": self.a(u) + self.b(v)}

    torch.manual_seed(0)
    u, v, y = torch.randn(20, 3), torch.randn(20, 2), torch.randint(0, 4, (20,))
    tracker = tracker_for(TwoInputs(), ((u, v), y), probe_size=8, output_fn=lambda out: out["logits"])
    tracker.attach()
    assert set(tracker.records[0]["layer_share"]) == {"a", "b"}
    assert tracker.records[0]["probe_accuracy"] is not None


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "options, error, message",
    [
        ({"probe_size": 200}, ValueError, r"probe_size=200 is larger than train, which has 96"),
        ({"probe_size": 0}, ValueError, "probe_size must be at least 1"),
        ({"schedule": "linear"}, ValueError, "schedule must be None"),
        ({"schedule": []}, ValueError, "schedule is an empty list"),
        ({"schedule": [1, -2]}, ValueError, "schedule must hold steps >= 0"),
        ({"schedule": [1.5]}, TypeError, "schedule must hold int steps"),
        ({"every": 0}, ValueError, "every must be at least 1"),
        ({"loss": "hinge"}, ValueError, "loss must be one of"),
        ({"mode": "trace_only"}, ValueError, "mode must be one of"),
        ({"keep_kernels": "some"}, ValueError, "keep_kernels must be one of"),
        ({"test": (torch.randn(4, 6), torch.tensor([0, 1, 2, 7]))}, ValueError, "test has class label 7"),
    ],
)
def test_bad_options_name_the_argument(options, error, message):
    with pytest.raises(error, match=message):
        tracker_for(make_model(), make_data(), **options)


def test_empty_data_is_an_error():
    with pytest.raises(ValueError, match="train is empty"):
        tracker_for(make_model(), (torch.empty(0, 6), torch.empty(0, dtype=torch.long)))
    with pytest.raises(ValueError, match="test is empty"):
        tracker_for(make_model(), make_data(), test=TensorDataset(torch.empty(0, 6), torch.empty(0)))
    with pytest.raises(TypeError, match="train must be an"):
        tracker_for(make_model(), torch.randn(10, 6))


def test_labels_that_do_not_match_the_loss():
    x, y = make_data()
    with pytest.raises(ValueError, match=r"train has labels of dtype torch.float32 .*cross_entropy"):
        tracker_for(make_model(), (x, y.float()))
    with pytest.raises(ValueError, match=r"train has class label 3 .* 3 outputs"):
        tracker_for(make_model(), (x, y + 1))
    with pytest.raises(ValueError, match=r"train has class label -1"):
        tracker_for(make_model(), (x, y - 1))
    with pytest.raises(ValueError, match=r"train has labels of dtype torch.int64 .*'mse'"):
        tracker_for(make_model(), (x, y), loss="mse")
    with pytest.raises(ValueError, match=r"train has targets of shape \(96,\) .*\(N, 3\)"):
        tracker_for(make_model(), (x, y.float()), loss=nn.MSELoss())
    with pytest.raises(ValueError, match="inputs and labels of train have different lengths"):
        tracker_for(make_model(), (x, y[:-1]))


def test_misuse_of_the_lifecycle():
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    tracker = tracker_for(model, make_data())
    with pytest.raises(RuntimeError, match="call tracker.attach"):
        tracker.step()
    tracker.attach(optimizer)
    assert tracker.optimizer is optimizer
    with pytest.raises(RuntimeError, match="already attached"):
        tracker.attach(optimizer)
    with pytest.raises(TypeError, match="optimizer must be"):
        tracker_for(model, make_data()).attach(object())
    train(model, optimizer, make_data(), steps=1)
    tracker.detach()  # measures the step it leaves at: 1, off the schedule
    assert tracker.optimizer is None
    train(model, optimizer, make_data(), steps=1)  # not counted
    tracker.attach(optimizer)  # re-attaching continues counting, without a new step 0
    train(model, optimizer, make_data(), steps=1)
    assert tracker.step_count == 2 and steps_of(tracker) == [0, 1, 2]
    assert tracker.records[1]["final"] is True and "final" not in tracker.records[2]
    tracker.close()
    with pytest.raises(ValueError, match="no run_dir"):
        tracker.run
