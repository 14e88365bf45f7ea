"""Every engine x mode agrees with the naive autograd reference on every zoo model."""

import pytest
import torch

import ntk_torch as ntk
from ntk_torch.kernel import METHODS, MODES

from reference import naive_ntk, reduce_mode
from zoo import ZOO_NAMES, make_zoo

N1, N2 = 5, 3
RTOL = 1e-10


@pytest.fixture(scope="module")
def zoo():
    return make_zoo()


@pytest.fixture(scope="module")
def references(zoo):
    """Naive float64 full kernels, (x1, x1) and (x1, x2), per zoo model."""
    refs = {}
    for name, case in zoo.items():
        x1, x2 = case.make_inputs(N1, 0), case.make_inputs(N2, 1)
        refs[name] = (
            x1,
            x2,
            naive_ntk(case.model, x1, None, case.output_fn),
            naive_ntk(case.model, x1, x2, case.output_fn),
        )
    return refs


def assert_close(actual, expected, rtol=RTOL):
    assert actual.shape == expected.shape
    assert actual.dtype == torch.float64
    scale = expected.abs().max().clamp_min(1e-300)
    error = (actual - expected).abs().max() / scale
    assert error <= rtol, f"relative error {error:.3e} > {rtol:.1e}"


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", ZOO_NAMES)
def test_matches_naive_reference(zoo, references, name, mode, method):
    case = zoo[name]
    x1, x2, ref_same, ref_cross = references[name]
    common = dict(mode=mode, method=method, output_fn=case.output_fn, dtype=torch.float64)
    same = ntk.empirical_ntk(case.model, x1, **common)
    cross = ntk.empirical_ntk(case.model, x1, x2, **common)
    assert_close(same, reduce_mode(ref_same, mode))
    assert_close(cross, reduce_mode(ref_cross, mode))


@pytest.mark.parametrize("name", ZOO_NAMES)
def test_engines_agree_with_each_other_in_float32(zoo, name):
    case = zoo[name]
    x1, x2 = case.make_inputs(6, 3), case.make_inputs(4, 4)
    kernels = [
        ntk.empirical_ntk(case.model, x1, x2, method=m, output_fn=case.output_fn)
        for m in ("jacobian", "ntk_vp")
    ]
    assert kernels[0].dtype == torch.float32
    torch.testing.assert_close(kernels[0], kernels[1], rtol=1e-4, atol=1e-5)


def test_tied_weights_counted_once(zoo):
    case = zoo["tied"]
    names = [n for n, _ in case.model.named_parameters()]
    assert "dec.weight" not in names  # the shared tensor appears once, as enc.weight
    x = case.make_inputs(4, 0)
    # The reference differentiates the shared tensor once, through both of its uses.
    assert_close(ntk.empirical_ntk(case.model, x, dtype=torch.float64), naive_ntk(case.model, x))


def test_frozen_parameters_are_excluded(zoo):
    case = zoo["frozen"]
    x = case.make_inputs(4, 0)
    per_layer = ntk.empirical_ntk(case.model, x, per_layer=True, dtype=torch.float64)
    assert list(per_layer) == ["classifier"]


@pytest.mark.parametrize("method", METHODS)
def test_params_narrows_by_pattern_and_module(zoo, method):
    case = zoo["mlp"]
    x = case.make_inputs(4, 0)
    names = ["net.4.weight", "net.4.bias"]
    expected = naive_ntk(case.model, x, param_names=names)
    common = dict(method=method, dtype=torch.float64)
    assert_close(ntk.empirical_ntk(case.model, x, params="net.4.*", **common), expected)
    assert_close(ntk.empirical_ntk(case.model, x, params=case.model.net[4], **common), expected)
    assert_close(ntk.empirical_ntk(case.model, x, params=["net.4.weight", "*.4.bias"], **common), expected)
    bias_only = naive_ntk(case.model, x, param_names=["net.0.bias", "net.2.bias", "net.4.bias"])
    assert_close(ntk.empirical_ntk(case.model, x, params="*.bias", **common), bias_only)


def test_dtype_float64_leaves_model_untouched(zoo):
    case = zoo["mlp"]
    before = {n: p.detach().clone() for n, p in case.model.named_parameters()}
    kernel = ntk.empirical_ntk(case.model, case.make_inputs(3, 0), dtype=torch.float64)
    assert kernel.dtype == torch.float64
    for name, p in case.model.named_parameters():
        assert p.dtype == torch.float32
        assert torch.equal(p, before[name])


def test_output_flattening_of_multi_dimensional_outputs(zoo):
    case = zoo["dict_in_out"]
    kernel = ntk.empirical_ntk(case.model, case.make_inputs(3, 0), output_fn=case.output_fn)
    assert kernel.shape == (3, 3, 4, 4)


def test_model_with_integer_inputs_and_float64_dtype(zoo):
    case = zoo["transformer"]
    tokens = case.make_inputs(3, 0)
    kernel = ntk.empirical_ntk(case.model, tokens, mode="trace", dtype=torch.float64)
    assert kernel.shape == (3, 3) and torch.isfinite(kernel).all()
