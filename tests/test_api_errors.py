"""Audit item 8: errors of the Python API that named the wrong thing, or nothing."""

import math

import pytest
import torch
from torch import nn

import ntk_torch as ntk
from ntk_torch import NonFiniteKernelError
from ntk_torch.predict import max_learning_rate
from ntk_torch.runs import RunWriter


@pytest.fixture
def model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_nonfinite_input_is_blamed_not_the_parameter_groups(model, bad):
    x = torch.randn(5, 3)
    x[2, 1] = bad
    with pytest.raises(NonFiniteKernelError, match=r"the input x1 \(example 2\) holds NaN or inf") as info:
        ntk.empirical_ntk(model, x, mode="trace")
    assert info.value.inputs == "x1 (example 2)"
    with pytest.raises(NonFiniteKernelError, match=r"the input x2 \(example 2\)"):
        ntk.empirical_ntk(model, torch.randn(4, 3), x, mode="trace")


def test_nonfinite_parameters_are_still_blamed_by_group(model):
    with torch.no_grad():
        model[2].weight[0, 0] = math.nan
    with pytest.raises(NonFiniteKernelError, match="contribution of parameter group") as info:
        ntk.empirical_ntk(model, torch.randn(5, 3), mode="trace")
    assert info.value.inputs is None


def test_meta_device_input_names_the_argument(model):
    with pytest.raises(ValueError, match="x1 is on the meta device"):
        ntk.empirical_ntk(model, torch.empty(5, 3, device="meta"))
    with pytest.raises(ValueError, match=r"x2\[0\] is on the meta device"):
        ntk.empirical_ntk(model, (torch.randn(5, 3),), (torch.empty(5, 3, device="meta"),))


@pytest.mark.parametrize("budget", [math.inf, "1e999GB", "inf"])
def test_infinite_memory_budget_is_a_clear_error(model, budget):
    with pytest.raises(ValueError, match="memory_budget"):
        ntk.NTK(model, memory_budget=budget)


def test_params_of_the_wrong_type_names_params(model):
    with pytest.raises(TypeError, match="params must be a name pattern .* got int"):
        ntk.NTK(model, params=5)
    with pytest.raises(TypeError, match="params must be .* got generator"):  # read once: not reusable
        ntk.NTK(model, params=(m for m in [model[0]]))
    assert ntk.NTK(model, params=(model[0],)).view().params.keys() == {"0.weight", "0.bias"}


def test_max_learning_rate_with_no_outputs_names_n_outputs(model):
    K = ntk.empirical_ntk(model, torch.randn(5, 3), mode="trace")
    with pytest.raises(ValueError, match="n_outputs must be at least 1"):
        max_learning_rate(K, loss="mse", n_outputs=0)


def _tracker(**flag):
    return ntk.NTKTracker(nn.Linear(3, 1), (torch.randn(8, 3), torch.randn(8, 1)), loss="mse", probe_size=4,
                          **{"progress": False, **flag})


@pytest.mark.parametrize(
    "call",
    [
        lambda: _tracker(overwrite="no"),
        lambda: _tracker(predict="no"),
        lambda: _tracker(progress="no"),
        lambda: ntk.NTK(nn.Linear(3, 1), per_layer="no"),
        lambda: ntk.metrics.alignment(torch.eye(3), torch.eye(3), centered="no"),
        lambda: ntk.metrics.target_alignment(torch.eye(3), torch.tensor([0, 1, 0]), centered="no"),
        lambda: ntk.predict.max_learning_rate(torch.eye(3), loss="mse", n_outputs=1, momentum=0.5, nesterov="no"),
        lambda: ntk.data.digits(standardize="no"),
        lambda: ntk.models.MLP(3, 1, bias="no"),
        lambda: RunWriter("unused", {}, overwrite="no"),
    ],
)
def test_boolean_options_are_never_taken_for_their_truth_value(call):
    """Item 2: overwrite="no" was truthy and deleted a run; every boolean option is checked."""
    with pytest.raises(TypeError, match="must be (True or False|a bool)"):
        call()
