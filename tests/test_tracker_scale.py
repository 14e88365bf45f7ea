"""NTKTracker for large probe sets: mode="pntk", sketch=d and kernel="estimate"."""

from __future__ import annotations

import gc
import json
import os
import random
import re
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import ntk_torch
from ntk_torch import load_run, records
from ntk_torch.tracker import NTKTracker

from helpers import is_tensor
from test_tracker import make_data, make_model, train

ESTIMATED = ("trace", "frobenius", "relative_change", "kernel_distance", "velocity", "target_alignment")


def _tracker(model, data, **options):
    options = {"probe_size": 16, "every": 2, "progress": False, **options}
    return NTKTracker(model, data, **options)


def _sgd(model, lr=0.5):
    return torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr)


def _probe(tracker, x):
    return x[torch.tensor(tracker.probe_indices)]


# --------------------------------------------------------------------------- pNTK


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::ntk_torch.errors.ForecastWarning")
def test_pntk_tracker_end_to_end(tmp_path):
    """Records of the pNTK, its kernels in the run directory, and the forecast of the
    exact kernel of the training points (the same as a trace tracker's)."""
    x, _ = data = make_data()
    forecasts = {}
    for mode in ("pntk", "trace"):
        model = make_model()
        optimizer = _sgd(model)
        tracker = _tracker(model, data, mode=mode, run_dir=tmp_path / mode, keep_kernels="all")
        with tracker.attach(optimizer):
            K0 = ntk_torch.empirical_ntk(model, _probe(tracker, x), mode=mode)
            train(model, optimizer, data, steps=3)
        forecasts[mode] = [r["predicted_train_loss"] for r in tracker.records]
        run = load_run(tmp_path / mode)
        assert run.meta["config"]["mode"] == mode and run.meta["prediction"]["kernel_mode"] == "full"
        assert [r["step"] for r in run.records] == [0, 2, 3] and list(run.kernel_steps) == [0, 2, 3]
        np.testing.assert_allclose(run.kernel(0), K0.numpy(), rtol=1e-5, atol=1e-6)
        first = run.records[0]
        assert first["trace"] == pytest.approx(float(np.trace(run.kernel(0))), rel=1e-6)
        assert sum(first["layer_share"].values()) == pytest.approx(1.0)
    assert forecasts["pntk"] == forecasts["trace"]  # the forecast does not use the probe kernel


# --------------------------------------------------------------------------- sketch


def test_sketched_tracker_uses_one_projection_for_the_whole_run(tmp_path):
    x, _ = data = make_data()
    model = make_model()
    optimizer = _sgd(model)
    tracker = _tracker(model, data, mode="trace", sketch=64, sketch_seed=5, forecast=None, run_dir=tmp_path / "run")
    with tracker.attach(optimizer):
        probe = _probe(tracker, x)
        sketched = dict(mode="trace", sketch=64, sketch_seed=5)
        torch.testing.assert_close(tracker.initial_kernel, ntk_torch.empirical_ntk(model, probe, **sketched))
        train(model, optimizer, data, steps=3)
    last = tracker.records[-1]
    K = ntk_torch.empirical_ntk(model, probe, **sketched)  # the trained parameters, the same S
    assert last["trace"] == pytest.approx(float(K.trace()), rel=1e-6)
    assert last["relative_change"] == pytest.approx(ntk_torch.metrics.relative_change(K, tracker.initial_kernel), rel=1e-5)
    assert all(r["layer_share"] is None for r in tracker.records)
    config = load_run(tmp_path / "run").meta["config"]
    assert config["sketch"] == 64 and config["sketch_seed"] == 5 and config["kernel"] == "dense"


@pytest.mark.parametrize(
    "options, error, message",
    [
        ({"sketch": 0}, ValueError, "sketch must be a positive int"),
        ({"sketch": True}, ValueError, "sketch must be a positive int"),
        ({"sketch": 8, "sketch_seed": -1}, ValueError, "sketch_seed must be a non-negative int"),
        ({"sketch": 8, "distributed": True}, ValueError, "sketch=8 computes the probe kernel on one process"),
        ({"sketch": 8, "method": "jacobian"}, ValueError, "sketch=8 does not use method"),
        ({"kernel": "sparse"}, ValueError, "kernel must be one of 'dense', 'estimate'"),
        ({"matvecs": 30}, ValueError, "matvecs sets the estimators of kernel='estimate'"),
        ({"kernel": "estimate", "matvecs": 2}, ValueError, "matvecs must be at least 3"),
        ({"kernel": "estimate", "mode": "diagonal"}, ValueError, "kernel='estimate' needs an operator's mode"),
        ({"kernel": "estimate", "keep_kernels": "all"}, ValueError, "kernel='estimate' forms no kernel to keep"),
        ({"kernel": "estimate", "analytic_reference": True}, ValueError, "does not combine with kernel='estimate'"),
        ({"kernel": "estimate", "distributed": True}, ValueError, "kernel='estimate' computes the probe kernel"),
        ({"kernel": "estimate", "distributed": "yes"}, TypeError, "distributed must be a bool"),
        ({"spectrum": "all"}, ValueError, "spectrum must be one of 'auto', 'full', 'top', got 'all'"),
        ({"kernel": "estimate", "spectrum": "full"}, ValueError, "spectrum='full' needs the formed kernel"),
    ],
)
def test_bad_large_probe_options_name_the_argument(options, error, message):
    with pytest.raises(error, match=message):
        _tracker(make_model(), make_data(), **options)


@pytest.mark.parametrize("mode", ["full", "trace"])
def test_top_spectrum_tracker_records_the_top_eigenvalues_with_residuals(tmp_path, mode):
    """``spectrum="top"``: the ten largest eigenvalues of each kernel (those of the whole
    spectrum, within the recorded residuals), no effective rank; the option in meta."""
    data = make_data()
    model = make_model()
    tracker = _tracker(model, data, mode=mode, spectrum="top", forecast=None, run_dir=tmp_path / "run")
    optimizer = _sgd(model)
    with tracker.attach(optimizer):
        train(model, optimizer, data, steps=2)
    assert [r["step"] for r in tracker.records] == [0, 2]
    record = tracker.records[0]
    whole = ntk_torch.metrics.spectrum(tracker.initial_kernel, 10)
    residuals = torch.tensor(record["top_eigenvalues_error"], dtype=torch.float64)
    gaps = (torch.tensor(record["top_eigenvalues"], dtype=torch.float64) - whole).abs()
    assert bool((gaps <= residuals + 1e-6 * whole[0]).all())
    assert record["effective_rank"] is None
    assert all(r["effective_rank"] is None for r in tracker.records)
    assert load_run(tmp_path / "run").meta["config"]["spectrum"] == "top"


# --------------------------------------------------------------------------- estimators


def _estimated_and_dense(mode, steps=4, matvecs=60, **extra):
    """A float64 tracker of each kind on the same model, probe and training (BatchNorm's
    running statistics move, so the step-0 operator must keep its own)."""
    data = tuple(t.double() if t.is_floating_point() else t for t in make_data())
    runs = {}
    for kind in ("estimate", "dense"):
        model = make_model().double()
        optimizer = _sgd(model, lr=0.3)
        options = {"kernel": "estimate", "matvecs": matvecs} if kind == "estimate" else {}
        tracker = _tracker(model, data, probe_size=64, every=2, mode=mode, forecast=None, **options, **extra)
        torch.manual_seed(3)
        with tracker.attach(optimizer):
            train(model, optimizer, data, steps=steps)
        runs[kind] = tracker
    return runs["estimate"], runs["dense"]


def _within_errors(estimated, dense, sigmas=4.0):
    for mine, exact in zip(estimated.records, dense.records):
        assert mine["step"] == exact["step"]
        for field in ESTIMATED:
            if exact[field] is None:
                assert mine[field] is None, field
                continue
            error = mine[records.error(field)]
            slack = sigmas * error + 1e-9 * max(abs(exact[field]), 1e-12)
            assert abs(mine[field] - exact[field]) <= slack, (mine["step"], field, mine[field], exact[field], error)
        bounds = mine[records.error("top_eigenvalues")]
        assert len(mine["top_eigenvalues"]) == len(bounds) == 10
        for value, bound, truth in zip(mine["top_eigenvalues"], bounds, exact["top_eigenvalues"]):
            assert abs(value - truth) <= bound + 1e-9 * truth
        assert mine["effective_rank"] is None and mine["layer_share"] is None


def test_estimated_fields_are_within_their_errors_of_the_dense_ones():
    estimated, dense = _estimated_and_dense("trace", steps=2)
    assert [r["step"] for r in estimated.records] == [0, 2]
    _within_errors(estimated, dense)
    moved = estimated.records[-1]
    assert moved["relative_change"] > 10 * moved[records.error("relative_change")] > 0  # resolved, not noise
    assert estimated.initial_kernel is None


@pytest.mark.slow
@pytest.mark.parametrize("mode, extra", [("pntk", {}), ("full", {}), ("trace", {"sketch": 32, "sketch_seed": 2})],
                         ids=["pntk", "full", "sketched"])
def test_estimated_fields_within_their_errors_in_other_modes(mode, extra):
    """Also of a sketch: the estimates of the sketched operator against the dense sketch."""
    estimated, dense = _estimated_and_dense(mode, steps=2, **extra)
    _within_errors(estimated, dense)


def test_estimated_kernel_that_is_not_finite_is_recorded_with_one_warning():
    model = make_model()
    tracker = _tracker(model, make_data(), every=1, kernel="estimate", matvecs=6, forecast=None)
    tracker.attach()
    with torch.no_grad():
        model[4].weight[0, 0] = float("nan")
    with pytest.warns(RuntimeWarning, match="the kernel at step 1 is not finite"):
        tracker.step()
    record = tracker.records[-1]
    assert record["finite"] is False and record["trace"] is None and record["relative_change"] is None
    assert "kernel_time" not in tracker.records[0]  # an estimated kernel is never formed
    tracker.close()


def _held_tensors(tracker):
    """The tensors reachable from the tracker, not through the model."""
    seen, stack, found = {id(tracker.model)}, [tracker.__dict__], []
    while stack:
        obj = stack.pop()
        if id(obj) in seen or issubclass(type(obj), (type, types.ModuleType, nn.Module)):
            continue
        seen.add(id(obj))
        if is_tensor(obj):
            found.append(obj)
        stack.extend(gc.get_referents(obj))
    return found


@pytest.mark.slow
def test_estimated_tracker_holds_no_kernel_and_writes_none(tmp_path):
    data = make_data()
    n = 48
    tracker = _tracker(make_model(), data, probe_size=n, every=1, kernel="estimate", matvecs=9, forecast=None,
                       run_dir=tmp_path / "run")
    tracker.attach()
    tracker.step()
    held = _held_tensors(tracker)
    assert not [tuple(t.shape) for t in held if t.dim() >= 2 and min(t.shape[-2:]) >= n]
    for _ in range(3):
        tracker.step()
    assert len(_held_tensors(tracker)) == len(held)  # the step-0 and the previous operator only
    tracker.close()
    run = load_run(tmp_path / "run")
    assert list(run.kernel_steps) == [] and len(run.records) == 5
    config = run.meta["config"]
    assert config["kernel"] == "estimate" and config["matvecs"] == 9 and config["keep_kernels"] == "none"


PEAK_SCRIPT = """
import json, sys, torch
torch.set_num_threads(1)
import ntk_torch as ntk
from torch import nn

def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024

n = int(sys.argv[1])
torch.manual_seed(0)
model = nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 4)).double()
x, y = torch.randn(n, 16, dtype=torch.float64), torch.randint(0, 4, (n,))
options = dict(kernel="estimate", mode="pntk", matvecs=9, forecast=None, progress=False)
ntk.NTKTracker(model, (x[:200], y[:200]), probe_size=200, **options).attach().tracker.close()  # warm-up
tracker = ntk.NTKTracker(model, (x, y), probe_size=n, every=1, **options)
before = status("VmRSS")
with open("/proc/self/clear_refs", "w") as file:
    file.write("5")  # the peak resident set size starts again from the current one
tracker.attach()
with torch.no_grad():
    model[0].weight.mul_(1.01)
tracker.step()
tracker.close()
print(json.dumps({"extra": status("VmHWM") - before, "change": tracker.records[-1]["relative_change"]}))
"""


@pytest.mark.slow
@pytest.mark.skipif(not os.access("/proc/self/clear_refs", os.W_OK), reason="needs Linux's /proc/self/clear_refs")
def test_estimates_of_a_kernel_far_larger_than_memory_use_a_fraction_of_it():
    """A probe of 16,000 examples, whose float64 kernel would take 2 GB: two measurements
    (step 0 and one after a change) peak at an eighth of that."""
    n = 16_000
    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(repo), str(repo / "tests")])}
    done = subprocess.run([sys.executable, "-c", PEAK_SCRIPT, str(n)], env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["extra"] < n * n * 8 / 8
    assert result["change"] > 0


# --------------------------------------------------------------------------- do no harm


def _trained(options, tracked):
    data = make_data()
    model = make_model()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1, momentum=0.9)
    torch.manual_seed(1), np.random.seed(1), random.seed(1)
    if tracked:
        tracker = _tracker(model, data, every=3, forecast=None, **options)
        with tracker.attach(optimizer):
            train(model, optimizer, data, steps=4)
    else:
        train(model, optimizer, data, steps=4)
    return {k: v.clone() for k, v in model.state_dict().items()}, torch.rand(2), np.random.rand(), random.random()


@pytest.mark.parametrize("options", [{"mode": "pntk"}, {"sketch": 16}, {"kernel": "estimate", "matvecs": 6},
                                     {"mode": "full", "spectrum": "top"}],
                         ids=["pntk", "sketch", "estimate", "top-spectrum"])
def test_training_is_bit_identical_in_every_large_probe_mode(options):
    (plain, *rng_plain), (tracked, *rng_tracked) = _trained(options, False), _trained(options, True)
    for name, value in plain.items():
        assert torch.equal(value, tracked[name]), name
    assert torch.equal(rng_plain[0], rng_tracked[0]) and rng_plain[1:] == rng_tracked[1:]


# --------------------------------------------------------------------------- README


@pytest.mark.slow
def test_the_readme_example_runs(capsys):
    """The first Python block under the README's "Large probe sets" heading, as written."""
    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = text[text.index("### Large probe sets"):]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    exec(compile(code, "README.md large probe sets", "exec"), {})
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 4 and all("relative change at step 23" in line for line in lines)
    assert "±" in lines[-1] and "±" not in lines[0]
