"""``predict.LinearisedDynamics``: checked once, one eigendecomposition, bounded records."""

import time

import pytest
import torch

from ntk_torch import predict
from ntk_torch.steps import DENSE_STEPS, dense_then_log, log_schedule

F64 = torch.float64


def problem(n=12, o=3, p=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    j = torch.randn(n * o, p, generator=g, dtype=F64)
    k = (j @ j.T).reshape(n, o, n, o).permute(0, 2, 1, 3)
    return k, torch.randn(n, o, generator=g, dtype=F64), torch.randn(n, o, generator=g, dtype=F64)


@pytest.fixture
def eigh_calls(monkeypatch):
    calls = []
    real = torch.linalg.eigh

    def counting(matrix, *args, **kwargs):
        calls.append(matrix.shape)
        return real(matrix, *args, **kwargs)

    monkeypatch.setattr(torch.linalg, "eigh", counting)
    return calls


def test_one_eigendecomposition_serves_every_question(eigh_calls):
    k, y, f0 = problem()
    dynamics = predict.LinearisedDynamics(k, y, f0, k_test_train=k[:5], f0_test=f0[:5])
    lr = 0.5 * dynamics.max_learning_rate()
    horizons = [dynamics.gd(lr=lr, steps=steps) for steps in (32, 64, 128, 400)]
    dynamics.gradient_flow(lr=lr, times=[1.0, 10.0])
    dynamics.kernel_regression()
    assert len(eigh_calls) == 1
    reference = predict.gd(k, y, f0, lr=lr, steps=400, k_test_train=k[:5], f0_test=f0[:5])
    torch.testing.assert_close(horizons[-1].train_outputs, reference.train_outputs, rtol=0, atol=0)
    torch.testing.assert_close(horizons[-1].test_outputs, reference.test_outputs, rtol=0, atol=0)


def test_a_long_run_keeps_only_a_bounded_record(eigh_calls):
    k, y, f0 = problem()
    lr = 0.5 * predict.max_learning_rate(k)
    started = time.perf_counter()
    pred = predict.gd(k, y, f0, lr=lr, steps=10**7)
    assert time.perf_counter() - started < 30  # it took 0.2 s here; keeping every step never finished
    assert pred.steps.tolist() == dense_then_log(10**7)
    assert len(pred.steps) < DENSE_STEPS + 2 * 24 + 2
    torch.testing.assert_close(pred.train_outputs[-1], y, rtol=0, atol=1e-10)  # converged


def test_dense_then_log_is_dense_early_then_log_spaced():
    assert dense_then_log(5) == [0, 1, 2, 3, 4, 5]
    steps = dense_then_log(5000, dense=100)
    assert steps[:101] == list(range(101))
    assert steps[101:-1] == [s for s in log_schedule(5000) if s > 100] and steps[-1] == 5000


def test_configured_and_one_shot_errors_agree():
    k, y, f0 = problem()
    with pytest.raises(ValueError, match="k_train_train has 12 examples but y_train has 11"):
        predict.LinearisedDynamics(k, y[:-1], f0)
    dynamics = predict.LinearisedDynamics(k, y, f0)
    with pytest.raises(ValueError, match="lr must be a non-negative finite number"):
        dynamics.gd(lr=float("nan"), steps=3)
    with pytest.raises(ValueError, match="n_outputs must be at least 1"):
        predict.max_learning_rate(k.diagonal(dim1=2, dim2=3).sum(-1), n_outputs=0)
    labels = torch.arange(12) % 3
    with pytest.raises(ValueError, match="kernel_regression is the long-time limit of MSE training"):
        predict.LinearisedDynamics(k, labels, f0, loss="cross_entropy").kernel_regression()
