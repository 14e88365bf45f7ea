"""NTKOperator products, eigsh against dense spectra, Hutch++ estimators within their error."""

import pytest
import torch
from torch import nn

import ntk_torch as ntk
from ntk_torch import estimate

from reference import naive_ntk, reduce_mode
from zoo import ZOO_NAMES, make_zoo

N1, N2 = 5, 3
FAST = ("mlp",)  # the rest of the zoo runs in the slow lane


@pytest.fixture(scope="module")
def zoo():
    return make_zoo()


def _matrix(full: torch.Tensor, mode: str) -> torch.Tensor:
    """The naive kernel ``(N1, N2, O, O)`` as the operator's matrix."""
    if mode == "full":
        n1, n2, o, _ = full.shape
        return full.permute(0, 2, 1, 3).reshape(n1 * o, n2 * o)
    if mode == "pntk":
        return full.sum(dim=(2, 3)) / full.shape[2]
    return reduce_mode(full, mode)


def _check_products(case, mode):
    x1, x2 = case.make_inputs(N1, 0), case.make_inputs(N2, 1)
    common = dict(mode=mode, output_fn=case.output_fn, dtype=torch.float64, call_kwargs=case.call_kwargs)
    kw = dict(output_fn=case.output_fn, call_kwargs=case.call_kwargs)
    for second in (None, x2):
        op = ntk.NTKOperator(case.model, x1, second, **common)
        K = _matrix(naive_ntk(case.model, x1, second, **kw), mode)
        assert op.shape == tuple(K.shape)
        V = torch.randn(op.shape[1], 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
        scale = (K @ V).abs().max()
        assert ((op @ V) - K @ V).abs().max() <= 1e-10 * scale
        assert ((op @ V[:, 0]) - K @ V[:, 0]).abs().max() <= 1e-10 * scale
        U = torch.randn(op.shape[0], 2, dtype=torch.float64)
        assert ((op.T @ U) - K.T @ U).abs().max() <= 1e-10 * (K.T @ U).abs().max()


@pytest.mark.parametrize("mode", ["trace", "full", "pntk"])
@pytest.mark.parametrize("name", FAST)
def test_products_match_the_dense_kernel(zoo, name, mode):
    _check_products(zoo[name], mode)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["trace", "full", "pntk"])
@pytest.mark.parametrize("name", [n for n in ZOO_NAMES if n not in FAST])
def test_products_match_the_dense_kernel_on_the_whole_zoo(zoo, name, mode):
    _check_products(zoo[name], mode)


def test_pntk_against_an_autograd_loop():
    """(1/O) grad(sum_o f_o(x)) . grad(sum_o f_o(x')), one backward per example."""
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(4, 7), nn.Tanh(), nn.Linear(7, 3)).double()
    x = torch.randn(6, 4, dtype=torch.float64)
    grads = []
    for i in range(6):
        g = torch.autograd.grad(model(x[i : i + 1]).sum(), list(model.parameters()))
        grads.append(torch.cat([t.reshape(-1) for t in g]))
    G = torch.stack(grads)
    expected = G @ G.T / 3
    op = ntk.NTKOperator(model, x, mode="pntk")
    assert (op.to_dense() - expected).abs().max() <= 1e-12 * expected.abs().max()
    assert (op @ torch.eye(6, dtype=torch.float64) - expected).abs().max() <= 1e-12 * expected.abs().max()


def test_to_dense_matches_empirical_ntk_and_uses_the_snapshot(zoo):
    case = zoo["mlp"]
    x1, x2 = case.make_inputs(4, 0), case.make_inputs(3, 1)
    op = ntk.NTKOperator(case.model, x1, x2, mode="full", dtype=torch.float64)
    expected = ntk.empirical_ntk(case.model, x1, x2, mode="full", dtype=torch.float64)
    assert torch.allclose(op.to_dense(), expected.permute(0, 2, 1, 3).reshape(12, 9), rtol=1e-12, atol=0)
    assert torch.allclose(op.T.to_dense(), op.to_dense().T, rtol=1e-12, atol=1e-14)
    before = {n: p.detach().clone() for n, p in case.model.named_parameters()}
    with torch.no_grad():
        for p in case.model.parameters():
            p.add_(0.1)
    try:
        V = torch.randn(9, 2, dtype=torch.float64)
        assert torch.allclose(op @ V, op.to_dense() @ V, rtol=1e-10, atol=1e-12)
        assert torch.allclose(op.to_dense(), expected.permute(0, 2, 1, 3).reshape(12, 9), rtol=1e-12, atol=0)
        moved = ntk.empirical_ntk(case.model, x1, x2, mode="full", dtype=torch.float64)
        assert not torch.allclose(moved, expected)
    finally:
        with torch.no_grad():
            for n, p in case.model.named_parameters():
                p.copy_(before[n])


def test_the_snapshot_holds_the_buffers_too():
    """BatchNorm's running statistics change in place during training; an operator built
    before still stands for the kernel at its own parameters and buffers."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, 2))
    x = torch.randn(6, 3)
    op = ntk.NTKOperator(model, x, mode="trace", dtype=torch.float64)
    V = torch.randn(6, 2, dtype=torch.float64)
    before, dense = op @ V, op.to_dense()
    statistics = model[1].running_mean.clone(), model[1].running_var.clone()
    with torch.no_grad():
        model[1].running_mean.add_(0.5), model[1].running_var.mul_(2.0)
    assert torch.equal(op @ V, before)
    assert torch.allclose(op.to_dense(), dense, rtol=1e-12, atol=0)
    assert torch.equal(model[1].running_mean, statistics[0] + 0.5)  # the model's own, restored
    assert not torch.allclose(ntk.NTKOperator(model, x, mode="trace", dtype=torch.float64) @ V, before)


def test_distance_within_reported_error_on_20_seeds():
    """||A - B||_F of two operators resolves a small difference (coverage: 18 of 20 seeds
    within 3 reported standard errors), with an error much below ||A||'s own."""
    op, K = _kernel_pair()
    g = torch.Generator().manual_seed(3)
    B = torch.randn(40, 40, dtype=torch.float64, generator=g)
    B = K + 1e-3 * float(K.norm()) * (B @ B.T) / float((B @ B.T).norm())
    exact = float((B - K).norm())
    distances = [estimate.distance(B, op, matvecs=15, seed=s) for s in range(20)]
    assert _covered(distances, exact) >= 18
    assert all(d.error < 0.1 * exact for d in distances)
    assert estimate.distance(K, K, matvecs=15) == estimate.Estimate(0.0, 0.0)
    with pytest.raises(ValueError, match="op_a and op_b must have the same shape"):
        estimate.distance(torch.ones(3, 3), torch.ones(2, 2))


def test_small_batches_give_the_same_products(zoo):
    case = zoo["residual"]
    x = case.make_inputs(7, 0)
    whole = ntk.NTKOperator(case.model, x, mode="trace", dtype=torch.float64)
    batched = ntk.NTKOperator(case.model, x, mode="trace", dtype=torch.float64, batch_size=2)
    V = torch.randn(7, 2, dtype=torch.float64)
    assert torch.allclose(whole @ V, batched @ V, rtol=1e-12, atol=1e-14)


def test_operator_errors(zoo):
    model = zoo["mlp"].model
    x = torch.randn(4, 6)
    with pytest.raises(ValueError, match="mode must be one of"):
        ntk.NTKOperator(model, x, mode="diag")
    with pytest.raises(ValueError, match="batch_size"):
        ntk.NTKOperator(model, x, batch_size=0)
    op = ntk.NTKOperator(model, x)
    with pytest.raises(ValueError, match=r"V must have shape \(4, k\)"):
        op @ torch.randn(5, 2)
    with pytest.raises(TypeError, match="V must be a torch.Tensor"):
        op @ [1.0, 2.0]


def _small_model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 24), nn.Tanh(), nn.Linear(24, 1))


@pytest.mark.slow
def test_eigsh_top10_against_eigvalsh_on_512():
    model = _small_model()
    x = torch.randn(512, 3, generator=torch.Generator().manual_seed(1))
    op = ntk.NTKOperator(model, x, mode="trace", dtype=torch.float64)
    K = op.to_dense()
    expected = torch.linalg.eigvalsh(K).flip(0)[:10]
    result = ntk.eigsh(op, k=10)
    assert result.eigenvalues.shape == (10,) and result.eigenvectors.shape == (512, 10)
    assert bool((result.eigenvalues[:-1] >= result.eigenvalues[1:]).all())
    assert ((result.eigenvalues - expected).abs() / expected).max() < 1e-8
    residual = K @ result.eigenvectors - result.eigenvectors * result.eigenvalues
    assert residual.norm(dim=0).max() < 1e-6 * expected[0]


def test_eigsh_on_a_dense_matrix_largest_and_smallest():
    g = torch.Generator().manual_seed(0)
    A = torch.randn(60, 60, dtype=torch.float64, generator=g)
    A = A @ A.T
    exact = torch.linalg.eigvalsh(A)
    top = ntk.eigsh(A, k=4)
    assert torch.allclose(top.eigenvalues, exact.flip(0)[:4], rtol=1e-9)
    bottom = ntk.eigsh(A, k=3, which="smallest")
    assert torch.allclose(bottom.eigenvalues, exact[:3].flip(0), rtol=1e-6, atol=1e-8)


def test_eigsh_errors(zoo):
    model = zoo["mlp"].model
    x = torch.randn(4, 6)
    op = ntk.NTKOperator(model, x)
    with pytest.raises(ValueError, match="k must be an int with 1 <= k < N = 4"):
        ntk.eigsh(op, k=4)
    with pytest.raises(ValueError, match="which must be"):
        ntk.eigsh(op, k=1, which="middle")
    with pytest.raises(ValueError, match="symmetric operator"):
        ntk.eigsh(ntk.NTKOperator(model, x, torch.randn(4, 6)), k=1)
    with pytest.raises(TypeError, match="NTKOperator or a 2-D torch.Tensor"):
        ntk.eigsh([[1.0]], k=1)


def _covered(estimates, exact):
    return sum(abs(e.value - exact) <= 3 * e.error for e in estimates)


def _kernel_pair():
    model = _small_model(2)
    x = torch.randn(40, 3, generator=torch.Generator().manual_seed(5))
    op = ntk.NTKOperator(model, x, mode="trace", dtype=torch.float64)
    return op, op.to_dense()


def test_hutchpp_on_dense_kernels_within_reported_error_on_20_seeds():
    """Coverage: at least 18 of 20 seeds within 3 reported standard errors."""
    _, K = _kernel_pair()
    g = torch.Generator().manual_seed(7)
    B = torch.randn(40, 40, dtype=torch.float64, generator=g)
    B = K + B @ B.T
    traces = [estimate.trace(B, matvecs=15, seed=s) for s in range(20)]
    assert _covered(traces, float(B.trace())) >= 18
    inners = [estimate.inner(B, K, matvecs=15, seed=s) for s in range(20)]
    assert _covered(inners, float((B * K).sum())) >= 18
    norms = [estimate.frobenius(B, matvecs=15, seed=s) for s in range(20)]
    assert _covered(norms, float(B.norm())) >= 18


@pytest.mark.slow
def test_hutchpp_on_operators_within_reported_error_on_20_seeds():
    """Coverage: at least 18 of 20 seeds within 3 reported standard errors."""
    op, K = _kernel_pair()
    g = torch.Generator().manual_seed(7)
    B = torch.randn(40, 40, dtype=torch.float64, generator=g)
    B = B @ B.T  # a full-rank "other kernel", so the residual part is not zero
    traces = [estimate.trace(op, matvecs=15, seed=s) for s in range(20)]
    assert _covered(traces, float(K.trace())) >= 18
    inners = [estimate.inner(K + B, op, matvecs=15, seed=s) for s in range(20)]
    assert _covered(inners, float(((K + B) * K).sum())) >= 18
    assert all(e.error > 0 for e in inners)
    norm = estimate.frobenius(op, matvecs=15, seed=0)
    assert abs(norm.value - float(K.norm())) <= max(3 * norm.error, 1e-9 * float(K.norm()))


def test_estimators_exact_when_the_sketch_spans_the_space_and_errors():
    A = torch.diag(torch.arange(1.0, 6.0, dtype=torch.float64))
    assert estimate.trace(A, matvecs=9) == estimate.Estimate(15.0, 0.0)
    with pytest.raises(ValueError, match="matvecs must be an int >= 3"):
        estimate.trace(A, matvecs=2)
    with pytest.raises(ValueError, match="op must be square"):
        estimate.trace(torch.ones(3, 2))
    with pytest.raises(ValueError, match="op_a and op_b must have the same shape"):
        estimate.inner(torch.ones(3, 3), torch.ones(2, 2))


@pytest.mark.parametrize("mode", ["trace", pytest.param("full", marks=pytest.mark.slow),
                                  pytest.param("pntk", marks=pytest.mark.slow)])
def test_sketched_operator_equals_the_sketched_kernel_times_v(zoo, mode):
    case = zoo["mlp"]
    x1, x2 = case.make_inputs(5, 0), case.make_inputs(3, 1)
    common = dict(mode=mode, dtype=torch.float64, sketch=64, sketch_seed=3)
    for second in (None, x2):
        op = ntk.NTKOperator(case.model, x1, second, **common)
        K = op.to_dense()
        dense = ntk.empirical_ntk(case.model, x1, second, **common)
        if mode == "full":
            n1, n2, o, _ = dense.shape
            dense = dense.permute(0, 2, 1, 3).reshape(n1 * o, n2 * o)
        assert torch.allclose(K, dense, rtol=1e-12, atol=0)
        V = torch.randn(op.shape[1], 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
        assert ((op @ V) - dense @ V).abs().max() <= 1e-10 * (dense @ V).abs().max()
        U = torch.randn(op.shape[0], 2, dtype=torch.float64)
        assert ((op.T @ U) - dense.T @ U).abs().max() <= 1e-10 * (dense.T @ U).abs().max()
    other = ntk.NTKOperator(case.model, x1, mode=mode, dtype=torch.float64, sketch=64, sketch_seed=4)
    assert not torch.allclose(other.to_dense(), ntk.NTKOperator(case.model, x1, **common).to_dense())
    with pytest.raises(ValueError, match="sketch must be a positive int"):
        ntk.NTKOperator(case.model, x1, sketch=0)
