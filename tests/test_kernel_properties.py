"""Properties every kernel must have, whatever the engine and tiling.

Every test that is about engines runs on each of ``METHODS`` (``auto`` included, which
resolves to one of the others), so the structured engine has the same property coverage
as the Jacobian and NTK-vector-product engines.
"""

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import ntk_torch as ntk
from ntk_torch.kernel import METHODS, MODES
from ntk_torch.layout import layout

from helpers import kernel_plan
from reference import reduce_mode
from zoo import make_zoo

ENGINES = list(METHODS)
F64 = torch.float64
# The Transformer, and `auto` (which runs one of the other engines), in the slow lane only:
# the fast lane keeps every property on the other models and engines.
SLOW_LANE_VALUES = {"transformer", "auto"}


def lane(*values):
    """Parameter values with those of ``SLOW_LANE_VALUES`` marked slow."""
    return [pytest.param(v, marks=pytest.mark.slow) if v in SLOW_LANE_VALUES else v for v in values]


SETTINGS = settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
def zoo():
    return make_zoo()


@pytest.fixture(scope="module")
def mlp(zoo):
    return zoo["mlp"]


def _transposed(kernel, mode):
    return kernel.permute(1, 0, 3, 2) if mode == "full" else kernel.transpose(0, 1)


@pytest.mark.parametrize("method", lane(*ENGINES))
@pytest.mark.parametrize("mode", ["full", "trace", "diagonal"])
@pytest.mark.parametrize("name", lane("mlp", "cnn_bn", "transformer"))
def test_x2_none_is_exactly_symmetric(zoo, name, mode, method):
    case = zoo[name]
    x = case.make_inputs(7, 0)
    kernel = ntk.empirical_ntk(case.model, x, mode=mode, method=method, batch_size=3)
    transposed = kernel.permute(1, 0, 3, 2) if mode == "full" else kernel.transpose(0, 1)
    assert torch.equal(kernel, transposed)


# The memory budget sets the block size for every engine (the batch_size test above covers
# several blocks for each); only these two also size their own work inside a block by it
# (the structured capture's backward chunks, the NTK-vector products' tangent chunks).
# "jacobian" uses none of it, and "auto" resolves to "structured" on these models.
BUDGETED_ENGINES = ["structured", "ntk_vp"]


@pytest.mark.parametrize("method", BUDGETED_ENGINES)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", lane("mlp", "cnn_bn", "dict_in_out"))
def test_x2_none_is_exactly_symmetric_under_a_small_memory_budget(zoo, name, mode, method):
    """A budget that fits only 3x3 blocks: off-diagonal blocks are mirrored, diagonal
    blocks are symmetric by construction, and the whole kernel is exactly symmetric."""
    case = zoo[name]
    x = case.make_inputs(8, 0)
    common = dict(mode=mode, method=method, output_fn=case.output_fn)
    budget = kernel_plan(case.model, x, **common).engine.block_bytes(3, 3)
    assert 1 < kernel_plan(case.model, x, memory_budget=budget, **common).block_size < 8  # several blocks
    kernel = ntk.empirical_ntk(case.model, x, memory_budget=budget, **common)
    assert torch.equal(kernel, _transposed(kernel, mode))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", lane("mlp", "cnn_bn", "tied", "dict_in_out"))
def test_structured_diagonal_blocks_in_chunks_are_exactly_symmetric(zoo, name, mode, monkeypatch):
    """The structured engine computes the upper chunk triangle of a diagonal block and
    mirrors it; with one example per chunk every chunk pair is mirrored, in one block and
    in several."""
    from ntk_torch.kernel.structured import terms

    monkeypatch.setattr(terms, "SYMMETRIC_CHUNK_ROWS", 1)
    case = zoo[name]
    x = case.make_inputs(7, 0)
    assert len(terms.symmetric_chunks(3, layout(mode), 1)) == 3  # a 3x3 diagonal block: 3 chunks
    for batch in (3, None):
        kernel = ntk.empirical_ntk(case.model, x, mode=mode, method="structured", batch_size=batch,
                                   output_fn=case.output_fn)
        assert torch.equal(kernel, _transposed(kernel, mode))


@pytest.mark.parametrize("method", lane(*ENGINES))
@pytest.mark.parametrize("name", lane("mlp", "cnn_bn", "residual", "dict_in_out", "tied", "transformer"))
def test_positive_semi_definite(zoo, name, method):
    case = zoo[name]
    full = ntk.empirical_ntk(case.model, case.make_inputs(6, 0), method=method,
                             output_fn=case.output_fn, dtype=torch.float64)
    assert full.dtype == torch.float64
    n, _, o, _ = full.shape
    matrix = full.permute(0, 2, 1, 3).reshape(n * o, n * o)
    eigenvalues = torch.linalg.eigvalsh(matrix)
    assert eigenvalues.min() >= -1e-10 * eigenvalues.max()
    trace_kernel = ntk.empirical_ntk(case.model, case.make_inputs(6, 0), mode="trace", method=method,
                                     output_fn=case.output_fn, dtype=torch.float64)
    assert torch.linalg.eigvalsh(trace_kernel).min() >= -1e-10 * trace_kernel.diagonal().sum()


@pytest.mark.parametrize("method", lane(*ENGINES))
@pytest.mark.parametrize("name", lane("mlp", "two_input", "dict_in_out", "cnn_bn", "tied", "transformer"))
def test_trace_and_diagonal_modes_reduce_the_full_kernel(zoo, name, method):
    case = zoo[name]
    x1, x2 = case.make_inputs(5, 0), case.make_inputs(4, 1)
    common = dict(method=method, output_fn=case.output_fn, dtype=torch.float64)
    for second in (x2, None):  # None: the symmetric path (upper blocks, mirrored)
        full = ntk.empirical_ntk(case.model, x1, second, mode="full", **common)
        for mode in ("trace", "diagonal"):
            reduced = ntk.empirical_ntk(case.model, x1, second, mode=mode, **common)
            torch.testing.assert_close(reduced, reduce_mode(full, mode), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("method", lane(*ENGINES))
@pytest.mark.parametrize("mode", ["full", "trace", "diagonal"])
def test_swapping_inputs_transposes_the_kernel(mlp, mode, method):
    x1, x2 = mlp.make_inputs(5, 0), mlp.make_inputs(3, 1)
    common = dict(mode=mode, method=method, dtype=torch.float64)
    k12 = ntk.empirical_ntk(mlp.model, x1, x2, **common)
    k21 = ntk.empirical_ntk(mlp.model, x2, x1, **common)
    transposed = k21.permute(1, 0, 3, 2) if mode == "full" else k21.transpose(0, 1)
    torch.testing.assert_close(k12, transposed, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("method", lane(*ENGINES))
@SETTINGS
@given(
    n1=st.integers(1, 9),
    n2=st.integers(1, 6),
    block=st.integers(1, 10),
    symmetric=st.booleans(),
    mode=st.sampled_from(["full", "trace", "diagonal"]),
)
def test_any_tiling_gives_the_same_kernel(mlp, n1, n2, block, symmetric, mode, method):
    x1 = mlp.make_inputs(n1, 0)
    x2 = None if symmetric else mlp.make_inputs(n2, 1)
    common = dict(mode=mode, method=method, dtype=torch.float64)
    whole = ntk.empirical_ntk(mlp.model, x1, x2, **common)
    tiled = ntk.empirical_ntk(mlp.model, x1, x2, batch_size=block, **common)
    torch.testing.assert_close(tiled, whole, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("method", lane(*ENGINES))
def test_memory_budget_forces_tiling_without_changing_the_result(mlp, method):
    x = mlp.make_inputs(12, 0)
    whole = ntk.empirical_ntk(mlp.model, x, method=method, dtype=torch.float64)
    # A few kilobytes fit only a couple of examples per block.
    assert 1 < kernel_plan(mlp.model, x, method=method, dtype=torch.float64, memory_budget="40kB").block_size < 12
    tiled = ntk.empirical_ntk(mlp.model, x, method=method, dtype=torch.float64, memory_budget="40kB")
    torch.testing.assert_close(tiled, whole, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("method", lane(*ENGINES))
@pytest.mark.parametrize("mode", ["full", "trace", "diagonal"])
@pytest.mark.parametrize("name", lane("mlp", "cnn_bn", "tied", "transformer"))
def test_per_layer_parts_sum_to_the_total(zoo, name, mode, method):
    case = zoo[name]
    x1, x2 = case.make_inputs(4, 0), case.make_inputs(3, 1)
    common = dict(mode=mode, method=method, output_fn=case.output_fn, dtype=torch.float64)
    parts = ntk.empirical_ntk(case.model, x1, x2, per_layer=True, **common)
    total = ntk.empirical_ntk(case.model, x1, x2, **common)
    assert isinstance(parts, ntk.PerLayerKernels)
    expected_groups = list(dict.fromkeys(n.rpartition(".")[0] for n, p in case.model.named_parameters()
                                         if p.requires_grad))
    assert list(parts) == expected_groups
    torch.testing.assert_close(sum(parts.values()), total, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(parts.total, total, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("method", lane(*[m for m in ENGINES if m != "jacobian"]))
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", lane("mlp", "cnn_bn", "tied", "transformer", "dict_in_out", "frozen"))
def test_per_layer_parts_match_the_jacobian_engine(zoo, name, mode, method):
    """Each group's kernel, not only their sum, is the same whichever engine computes it
    (the structured engine splits some groups between rules and the fallback)."""
    case = zoo[name]
    x1, x2 = case.make_inputs(4, 0), case.make_inputs(3, 1)
    common = dict(mode=mode, output_fn=case.output_fn, dtype=torch.float64, per_layer=True)
    for second in (x2, None):
        parts = ntk.empirical_ntk(case.model, x1, second, method=method, **common)
        reference = ntk.empirical_ntk(case.model, x1, second, method="jacobian", **common)
        assert list(parts) == list(reference)
        scale = reference.total.abs().max()
        for group in reference:
            torch.testing.assert_close(parts[group], reference[group], rtol=1e-10, atol=1e-12 * scale)
        torch.testing.assert_close(parts.total, reference.total, rtol=1e-10, atol=1e-12 * scale)


def test_per_layer_names_root_parameters():
    class Scaled(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.scale = torch.nn.Parameter(torch.tensor(1.5))
            self.fc = torch.nn.Linear(3, 2)

        def forward(self, x):
            return self.scale * self.fc(x)

    parts = ntk.empirical_ntk(Scaled(), torch.randn(4, 3), per_layer=True)
    assert list(parts) == ["(root)", "fc"]


def test_progress_bar_shows_blocks(mlp, capsys):
    ntk.empirical_ntk(mlp.model, mlp.make_inputs(6, 0), batch_size=2, progress=True)
    err = capsys.readouterr().err
    assert "eNTK blocks" in err and "6/6" in err  # 3 row tiles -> 6 upper-triangle blocks
