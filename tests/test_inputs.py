"""Inputs: nested tuples, lists and dicts of batched Tensors, arguments that are not
batched (``call_kwargs``), integer and bool tensors passed as they are, and errors that
name the argument and what the model expects."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import ntk_torch as ntk
from ntk_torch.functional import check_compatible, input_tensors, map_inputs, structure
from ntk_torch.kernel import METHODS

from reference import naive_ntk
from zoo import make_any_module_zoo, make_zoo

F64 = torch.float64


@pytest.fixture(scope="module")
def zoo():
    return make_zoo()


@pytest.fixture(scope="module")
def nested():
    return make_any_module_zoo()["nested"]


def test_nested_inputs_are_labelled_and_keep_their_structure(nested):
    x = nested.make_inputs(3, 0)
    labels = [label for label, _ in input_tensors(x, "x1")]
    assert labels == ["x1[0]['image']", "x1[0]['extra'][0]", "x1[0]['extra'][1][0]"]
    halves = map_inputs(x, lambda t: t[:1])
    assert structure(halves) == structure(x)
    assert isinstance(halves[0]["extra"][1], list)


def test_x2_must_have_the_nested_structure_of_x1(nested):
    x1 = nested.make_inputs(3, 0)
    wrong_key = ({"image": x1[0]["image"], "other": x1[0]["extra"]},)
    with pytest.raises(ValueError, match=r"x2\[0\] has keys \['image', 'other'\] but x1\[0\] has \['extra', 'image'\]"):
        check_compatible(x1, wrong_key)
    shorter = ({"image": x1[0]["image"], "extra": (x1[0]["extra"][0],)},)
    with pytest.raises(ValueError, match=r"x2\[0\]\['extra'\] has 1 entries but x1\[0\]\['extra'\] has 2"):
        check_compatible(x1, shorter)
    wider = ({"image": x1[0]["image"], "extra": (torch.randn(2, 3), x1[0]["extra"][1])},)
    with pytest.raises(ValueError, match=r"x2\[0\]\['extra'\]\[0\] has feature shape \(3,\) but x1\[0\]\['extra'\]\[0\] has \(2,\)"):
        ntk.empirical_ntk(nested.model, x1, wider, call_kwargs=nested.call_kwargs)


def test_a_tuple_holding_a_dict_calls_the_model_with_the_dict(nested):
    """``(batch,)`` calls ``model(batch, **call_kwargs)``; the arguments that are not
    batched reach every call unchanged (a string) or in the compute dtype (a Tensor)."""
    x1, x2 = nested.make_inputs(3, 0), nested.make_inputs(2, 1)
    for reduce in ("mean", "sum"):
        call_kwargs = {"scale": torch.tensor(0.5), "reduce": reduce}
        expected = naive_ntk(nested.model, x1, x2, call_kwargs=call_kwargs)
        kernel = ntk.empirical_ntk(nested.model, x1, x2, dtype=F64, call_kwargs=call_kwargs)
        torch.testing.assert_close(kernel, expected, rtol=1e-10, atol=1e-12)
    assert not torch.allclose(kernel, ntk.empirical_ntk(nested.model, x1, x2, dtype=F64,
                                                      call_kwargs={"scale": torch.tensor(0.5)}))


def test_call_kwargs_are_checked(zoo, nested):
    case = zoo["dict_in_out"]
    x = case.make_inputs(2, 0)
    with pytest.raises(ValueError, match="x1 and call_kwargs both give 'meta'"):
        ntk.empirical_ntk(case.model, x, output_fn=case.output_fn, call_kwargs={"meta": x["meta"]})
    with pytest.raises(TypeError, match="call_kwargs must be a dict of keyword arguments, got list"):
        ntk.NTK(case.model, call_kwargs=[1])
    with pytest.raises(TypeError, match="call_kwargs keys must be argument names"):
        ntk.NTK(case.model, call_kwargs={1: 2})
    with pytest.raises(TypeError, match=r"x1\[1\] must be a Tensor batched on dim 0, got str; pass arguments that are not batched with call_kwargs"):
        ntk.empirical_ntk(zoo["two_input"].model, (torch.randn(2, 4), "sum"))


class _TypedInputs(nn.Module):
    """Fails unless its token ids stay int64 and its mask bool."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(6, 4)
        self.out = nn.Linear(4, 2)

    def forward(self, ids, mask, weights):
        assert ids.dtype == torch.int64 and mask.dtype == torch.bool, (ids.dtype, mask.dtype)
        h = torch.tanh(self.embed(ids)) * (mask.unsqueeze(-1) * weights.unsqueeze(-1))
        return self.out(h.sum(dim=1))


@pytest.mark.parametrize("method", METHODS)
def test_integer_and_bool_tensors_are_never_cast_or_differentiated(method):
    torch.manual_seed(0)
    model = _TypedInputs()
    ids = torch.randint(0, 6, (3, 4))
    mask = torch.rand(3, 4) > 0.3
    weights = torch.rand(3, 4)  # floating: cast to the compute dtype
    kernel = ntk.empirical_ntk(model, (ids, mask, weights), method=method, dtype=F64)
    torch.testing.assert_close(kernel, naive_ntk(model, (ids, mask, weights)), rtol=1e-10, atol=1e-12)


def test_a_wrong_feature_width_names_x1_and_what_the_layer_expects(zoo):
    with pytest.raises(RuntimeError, match=(
        r"^x1: layer 'net.0' \(Linear\) expects 6 features in the last dimension, got shape \(2, 7\) "
        r"\(x1 has feature shape \(7,\) and dtype torch.float32\); the model raised RuntimeError on x1's first "
        r"examples in layer 'net.0' \(Linear\), operation torch._C._nn.linear, at tests/zoo.py:\d+ `return self.net\(x\)`: "
        r"mat1 and mat2 shapes cannot be multiplied \(2x7 and 6x12\)$"
    )) as info:
        ntk.empirical_ntk(zoo["mlp"].model, torch.randn(3, 7))
    assert "mat1 and mat2" in str(info.value.__cause__)  # torch's own error, chained


@pytest.mark.parametrize("name, x, expected", [
    ("mlp", torch.randint(0, 3, (3, 6)), r"x1: layer 'net.0' \(Linear\) expects floating inputs, got torch.int64"),
    ("transformer", torch.randn(3, 5), r"x1: layer 'embed' \(Embedding\) expects integer token ids, got torch.float32"),
    ("cnn_bn", torch.randn(3, 3, 5, 5), r"x1: layer 'conv1' \(Conv2d\) expects 2 input channels, got shape \(2, 3, 5, 5\)"),
])
def test_a_wrong_dtype_or_channel_count_names_x1_and_the_layer(zoo, name, x, expected):
    with pytest.raises(RuntimeError, match=expected):
        ntk.empirical_ntk(zoo[name].model, x)


def test_other_model_errors_name_x1_and_where_they_happened(zoo):
    case = zoo["dict_in_out"]
    x = {"image": torch.randn(3, 5), "meta": torch.randn(3, 3)}
    with pytest.raises(RuntimeError, match=r"x1: layer 'meta' \(Linear\) expects 2 features .* x1\['meta'\] has feature shape \(3,\)"):
        ntk.empirical_ntk(case.model, x, output_fn=case.output_fn)
    with pytest.raises(TypeError, match=r"^x1: the model raised TypeError on x1's first examples in the root module \(TwoInput\): .*missing 1 required positional argument"):
        ntk.empirical_ntk(zoo["two_input"].model, (torch.randn(3, 4),))


class _Scaled(nn.Module):
    """A model with a keyword argument that is not batched and has no default."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))

    def forward(self, x: torch.Tensor, *, scale: torch.Tensor) -> torch.Tensor:
        return self.net(x) * scale


@pytest.mark.parametrize("forecast", ["kernel", "twin"])
def test_the_tracker_and_its_forecasts_pass_call_kwargs_to_every_call(forecast):
    """Probe kernels, evaluations and both forecasts call ``model(x, **call_kwargs)``: at
    step 0 the forecast's predicted training loss is the network's own."""
    from ntk_torch import records

    torch.manual_seed(0)
    model, x, y = _Scaled(), torch.randn(12, 4), torch.randn(12, 2)
    scale = torch.tensor(2.0)
    tracker = ntk.NTKTracker(model, (x, y), loss="mse", probe_size=6, every=1, progress=False,
                             forecast=forecast, call_kwargs={"scale": scale})
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    with tracker.attach(optimizer):
        for _ in range(3):
            optimizer.zero_grad()
            torch.nn.functional.mse_loss(model(x, scale=scale), y).backward()
            optimizer.step()
    first = tracker.records[0]
    actual, predicted = first[records.actual(records.TRAIN)], first[records.predicted(records.TRAIN)]
    assert predicted == pytest.approx(actual, rel=1e-6)
    assert len(tracker.records) == 4


def test_the_probe_kernel_is_that_of_the_model_called_with_call_kwargs():
    torch.manual_seed(0)
    model, x, y = _Scaled(), torch.randn(12, 4), torch.randn(12, 2)
    scale = torch.tensor(3.0)
    tracker = ntk.NTKTracker(model, (x, y), loss="mse", probe_size=5, progress=False, forecast=None,
                             call_kwargs={"scale": scale})
    with tracker.attach(torch.optim.SGD(model.parameters(), lr=0.0)):
        pass
    probe = x[torch.as_tensor(tracker.probe_indices)]
    expected = ntk.empirical_ntk(model, probe, mode="trace", call_kwargs={"scale": scale})
    torch.testing.assert_close(tracker.initial_kernel.to(expected.dtype), expected)
