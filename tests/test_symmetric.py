"""Kernels of ``x2=None`` at half cost: every engine computes the upper block triangle of a
diagonal block only (in example chunks) and mirrors it. The result must be exactly
symmetric and equal (float64) to the general path ``x2 = x1`` -- in every mode, per
layer, and whatever the tiling.
"""

import pytest
import torch

import ntk_torch as ntk
from ntk_torch.kernel import jacobian, ntk_vp
from ntk_torch.kernel.structured import terms
from ntk_torch.layout import FULL, LAYOUTS, MODES, TRACE

from zoo import make_zoo

F64 = torch.float64
ENGINES = ["jacobian", "ntk_vp", "loop", "structured"]


@pytest.fixture(scope="module")
def zoo():
    return make_zoo()


@pytest.fixture
def one_example_chunks(monkeypatch):
    """Every engine splits diagonal blocks into one-example chunks: every chunk pair
    above the diagonal is computed and every one below is mirrored."""
    for module in (jacobian, ntk_vp, terms):
        monkeypatch.setattr(module, "SYMMETRIC_CHUNK_ROWS", 1)
        monkeypatch.setattr(module, "MAX_SYMMETRIC_CHUNKS", 64)


def _transposed(kernel, mode):
    return LAYOUTS[mode].transpose(kernel)


def test_symmetric_chunks_cover_the_block():
    bounds = TRACE.symmetric_chunks(10, 1, 3, 8)
    assert bounds == [(0, 4), (4, 8), (8, 10)]  # ceil(10 / 3) = 4 examples a chunk
    assert FULL.symmetric_chunks(10, 3, 3, 8)[0] == (0, 2)  # 3 work rows an example: 8 chunks cap
    assert TRACE.symmetric_chunks(5, 1, 128, 8) == [(0, 5)]  # too small to split


@pytest.mark.parametrize("method", ENGINES)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(
    "name", ["mlp", pytest.param("cnn_bn", marks=pytest.mark.slow), pytest.param("dict_in_out", marks=pytest.mark.slow)]
)
def test_half_cost_path_equals_general_path(zoo, name, mode, method, one_example_chunks):
    """``x2=None`` (upper triangle, mirrored) equals ``x2=x`` (every entry) to 1e-10,
    is exactly symmetric, in one block and in several, for the total and per layer."""
    case = zoo[name]
    n = 4 if method == "loop" else 5
    x = case.make_inputs(n, 0)
    common = dict(mode=mode, method=method, output_fn=case.output_fn, dtype=F64, per_layer=True)
    general = ntk.empirical_ntk(case.model, x, x, **common)
    for batch in (None, 2):
        same = ntk.empirical_ntk(case.model, x, batch_size=batch, **common)
        assert list(same) == list(general)
        for group in list(same) + [None]:
            kernel = same.total if group is None else same[group]
            reference = general.total if group is None else general[group]
            torch.testing.assert_close(kernel, reference, rtol=1e-10, atol=1e-10)
            assert torch.equal(kernel, _transposed(kernel, mode)), group


@pytest.mark.slow
@pytest.mark.parametrize("method", ["jacobian", "ntk_vp"])
def test_tiling_invariance_of_the_half_cost_path(zoo, method, one_example_chunks):
    """Block size and chunking change only the order of summation."""
    case = zoo["transformer"]
    x = case.make_inputs(6, 1)
    kernels = [
        ntk.empirical_ntk(case.model, x, mode="full", method=method, dtype=F64, batch_size=batch)
        for batch in (None, 4, 1)
    ]
    for kernel in kernels[1:]:
        torch.testing.assert_close(kernel, kernels[0], rtol=1e-10, atol=1e-10)
    assert all(torch.equal(k, _transposed(k, "full")) for k in kernels)
