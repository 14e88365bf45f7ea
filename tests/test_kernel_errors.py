"""Bad input gets a clear error naming the argument."""

import math

import pytest
import torch
from torch import nn

import ntk_torch as ntk

from zoo import make_zoo


@pytest.fixture(scope="module")
def zoo():
    return make_zoo()


@pytest.fixture
def mlp(zoo):
    return zoo["mlp"].model


def test_model_without_trainable_parameters(mlp):
    frozen = nn.Linear(3, 2).requires_grad_(False)
    with pytest.raises(ValueError, match="model .*no trainable parameters"):
        ntk.empirical_ntk(frozen, torch.randn(2, 3))
    with pytest.raises(ValueError, match="no trainable parameters"):
        ntk.empirical_ntk(nn.ReLU(), torch.randn(2, 3))


def test_model_that_is_not_a_module():
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        ntk.empirical_ntk(lambda x: x, torch.randn(2, 3))


def test_different_feature_shapes(mlp):
    with pytest.raises(ValueError, match=r"x2 has feature shape \(5,\) but x1 has \(6,\)"):
        ntk.empirical_ntk(mlp, torch.randn(3, 6), torch.randn(3, 5))


def test_different_input_types(zoo, mlp):
    with pytest.raises(TypeError, match="x2 is a tuple but x1 is a Tensor"):
        ntk.empirical_ntk(mlp, torch.randn(3, 6), (torch.randn(3, 6),))
    with pytest.raises(TypeError, match="x2 has dtype torch.float64 but x1 has torch.float32"):
        ntk.empirical_ntk(mlp, torch.randn(3, 6), torch.randn(3, 6, dtype=torch.float64))
    case = zoo["dict_in_out"]
    x = case.make_inputs(3, 0)
    with pytest.raises(ValueError, match="x2 has keys"):
        ntk.empirical_ntk(case.model, x, {"image": x["image"]}, output_fn=case.output_fn)


def test_unsupported_input_type(mlp):
    with pytest.raises(TypeError, match="x1 must be a Tensor, a tuple of Tensors or a dict of Tensors"):
        ntk.empirical_ntk(mlp, "not a tensor")
    with pytest.raises(TypeError, match=r"x1\[1\] must be a Tensor"):
        ntk.empirical_ntk(mlp, (torch.randn(2, 6), 3))


def test_tuple_and_dict_batch_sizes_differ(zoo):
    two = zoo["two_input"].model
    with pytest.raises(ValueError, match=r"x1 have different batch sizes \(x1\[0\]: 4, x1\[1\]: 3\)"):
        ntk.empirical_ntk(two, (torch.randn(4, 4), torch.randn(3, 3)))
    case = zoo["dict_in_out"]
    with pytest.raises(ValueError, match="x2 have different batch sizes"):
        ntk.empirical_ntk(
            case.model,
            case.make_inputs(2, 0),
            {"image": torch.randn(3, 5), "meta": torch.randn(2, 2)},
            output_fn=case.output_fn,
        )


def test_empty_batch(mlp):
    with pytest.raises(ValueError, match="x1 is an empty batch"):
        ntk.empirical_ntk(mlp, torch.randn(0, 6))
    with pytest.raises(ValueError, match="x2 is an empty batch"):
        ntk.empirical_ntk(mlp, torch.randn(2, 6), torch.randn(0, 6))
    with pytest.raises(ValueError, match="x1 is a scalar"):
        ntk.empirical_ntk(mlp, torch.tensor(1.0))


def test_non_tensor_output_without_output_fn(zoo):
    case = zoo["dict_in_out"]
    with pytest.raises(TypeError, match="the model returned a dict, not a Tensor; pass output_fn"):
        ntk.empirical_ntk(case.model, case.make_inputs(2, 0))


def test_output_whose_first_dimension_is_not_the_batch(mlp):
    with pytest.raises(ValueError, match=r"output has shape \(3,\) but its first dimension must be the batch size 2"):
        ntk.empirical_ntk(mlp, torch.randn(4, 6), output_fn=lambda out: out.mean(0))


def test_unknown_mode_and_method(mlp):
    x = torch.randn(2, 6)
    with pytest.raises(ValueError, match="mode must be one of 'full', 'trace', 'diagonal', 'pntk', got 'diag'"):
        ntk.empirical_ntk(mlp, x, mode="diag")
    with pytest.raises(ValueError, match="method must be one of .*'jacobian'.*got 'fast'"):
        ntk.empirical_ntk(mlp, x, method="fast")


def test_params_pattern_that_matches_nothing(mlp):
    with pytest.raises(ValueError, match=r"params pattern 'encoder\.\*' matches no trainable parameter; trainable parameters are: net.0.weight"):
        ntk.empirical_ntk(mlp, torch.randn(2, 6), params="encoder.*")
    with pytest.raises(ValueError, match="params module Linear has no trainable parameter of the model"):
        ntk.empirical_ntk(mlp, torch.randn(2, 6), params=nn.Linear(2, 2))
    with pytest.raises(TypeError, match="params entries must be"):
        ntk.empirical_ntk(mlp, torch.randn(2, 6), params=[3])


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        (dict(batch_size=0), ValueError, "batch_size must be a positive int"),
        (dict(batch_size=2.5), TypeError, "batch_size must be a positive int"),
        (dict(memory_budget="lots"), ValueError, "memory_budget='lots' is not a memory size"),
        (dict(memory_budget=-5), ValueError, "memory_budget must be positive"),
        (dict(memory_budget=[1]), TypeError, "memory_budget must be a number of bytes"),
        (dict(dtype=torch.int32), TypeError, "dtype must be a floating torch.dtype"),
        (dict(per_layer="yes"), TypeError, "per_layer must be a bool"),
        (dict(output_fn=3), TypeError, "output_fn must be callable"),
    ],
)
def test_bad_options(mlp, kwargs, error, message):
    with pytest.raises(error, match=message):
        ntk.empirical_ntk(mlp, torch.randn(2, 6), **kwargs)


def test_memory_budget_strings_are_parsed():
    from ntk_torch.kernel.cost import parse_memory

    assert parse_memory("2GB") == 2 * 10**9
    assert parse_memory("1.5 GiB") == int(1.5 * 2**30)
    assert parse_memory("512mb") == 512 * 10**6
    assert parse_memory(4096) == 4096


def test_budget_smaller_than_one_example_warns_and_still_computes(mlp):
    x = torch.randn(3, 6)
    with pytest.warns(RuntimeWarning, match="smaller than the estimated"):
        tiny = ntk.empirical_ntk(mlp, x, memory_budget=16, dtype=torch.float64)
    torch.testing.assert_close(tiny, ntk.empirical_ntk(mlp, x, dtype=torch.float64))


class TwoLayer(nn.Module):
    def __init__(self):
        super().__init__()
        self.hidden = nn.Linear(3, 4)
        self.out = nn.Linear(4, 2)

    def forward(self, x):
        return self.out(torch.tanh(self.hidden(x)))


@pytest.mark.parametrize("method", ["jacobian", "ntk_vp"])
@pytest.mark.parametrize("per_layer", [False, True])
def test_non_finite_kernel_names_the_parameter_group(method, per_layer):
    model = TwoLayer()
    with torch.no_grad():
        model.out.weight[0, 0] = math.inf  # d out / d hidden becomes inf; d out / d out.* stays finite
    with pytest.raises(ntk.NonFiniteKernelError, match="parameter group 'hidden'") as info:
        ntk.empirical_ntk(model, torch.randn(3, 3), method=method, per_layer=per_layer)
    assert info.value.groups == ("hidden",)
    assert isinstance(info.value, FloatingPointError)
