"""mode="pntk": the sum-of-logits kernel in empirical_ntk, NTK, NTKOperator and the tracker."""

import pytest
import torch
from torch import nn

import ntk_torch as ntk
from ntk_torch.tracker import NTKTracker

from reference import naive_ntk
from zoo import make_zoo


def _pntk_reference(model, x1, x2=None, output_fn=None):
    """(1/O) sum_{a,b} K[i, j, a, b] of the naive float64 full kernel."""
    full = naive_ntk(model, x1, x2, output_fn)
    return full.sum(dim=(2, 3)) / full.shape[2]


@pytest.mark.parametrize("method", ["jacobian", "ntk_vp", "structured", "loop", "auto"])
def test_empirical_ntk_pntk_matches_its_definition(method):
    case = make_zoo()["residual"]
    x1, x2 = case.make_inputs(4, 0), case.make_inputs(3, 1)
    for second in (None, x2):
        K = ntk.empirical_ntk(case.model, x1, second, mode="pntk", method=method, dtype=torch.float64)
        expected = _pntk_reference(case.model, x1, second)
        assert K.shape == expected.shape
        assert (K - expected).abs().max() <= 1e-10 * expected.abs().max()


def test_pntk_with_output_fn_and_per_layer():
    case = make_zoo()["dict_in_out"]
    x = case.make_inputs(4, 0)
    kernel = ntk.NTK(case.model, mode="pntk", output_fn=case.output_fn, per_layer=True, dtype=torch.float64)
    assert kernel.mode == "pntk" and "pntk" in repr(kernel)
    parts = kernel(x)
    expected = _pntk_reference(case.model, x, None, case.output_fn)
    assert (parts.total - expected).abs().max() <= 1e-10 * expected.abs().max()


def test_pntk_is_one_output_trace_and_bad_modes_name_it():
    torch.manual_seed(0)
    model = nn.Linear(3, 1)
    x = torch.randn(5, 3)
    assert torch.allclose(ntk.empirical_ntk(model, x, mode="pntk"), ntk.empirical_ntk(model, x, mode="trace"))
    with pytest.raises(ValueError, match="'pntk'"):
        ntk.empirical_ntk(model, x, mode="pntk2")
    with pytest.raises(TypeError, match="output_fn must be callable"):
        ntk.NTK(model, mode="pntk", output_fn=3)


@pytest.mark.filterwarnings("ignore::ntk_torch.errors.ForecastWarning")
def test_tracker_with_pntk_records_like_trace():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3))
    x = torch.randn(64, 6)
    y = (x[:, 0] > 0).long()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.3)
    tracker = NTKTracker(model, (x, y), probe_size=12, every=2, mode="pntk", progress=False)
    with tracker.attach(optimizer):
        for step in range(4):
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(x[:16]), y[:16]).backward()
            optimizer.step()
    assert tracker.mode == "pntk"
    first, last = tracker.records[0], tracker.records[-1]
    assert first["relative_change"] == 0.0 and last["relative_change"] > 0
    probe = tracker.probe.x
    K = ntk.empirical_ntk(model, probe, mode="pntk")
    assert last["trace"] == pytest.approx(float(K.trace()), rel=1e-4)
