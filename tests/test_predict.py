"""Tests for ntk_torch.predict: linearised dynamics in function space.

The reference throughout is the linearised network itself (ntk_torch.linearize) trained with
torch.optim, and kernels built from a plain float64 torch.func Jacobian:
K[i, j, a, b] = sum_p J[i, a, p] J[j, b, p].
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, jacrev

from ntk_torch import predict
from ntk_torch.losses import CROSS_ENTROPY
from ntk_torch.predict import solvers
from ntk_torch.linearize import linearize
from ntk_torch.predict import gd, gradient_flow, kernel_regression, max_learning_rate

DTYPE = torch.float64
N, M, O = 12, 7, 3


@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    # Tiny tensors: intra-op threads only add contention on a shared machine.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# --------------------------------------------------------------------------------------
# References
# --------------------------------------------------------------------------------------
def jacobian(model: nn.Module, x: Tensor) -> Tensor:
    """(N, O, P) Jacobian of the model's outputs in its parameters, by torch.func.jacrev."""
    params = {name: p.detach() for name, p in model.named_parameters()}
    blocks = jacrev(lambda p: functional_call(model, p, (x,)))(params)
    return torch.cat([b.reshape(x.shape[0], -1, b[0, 0].numel()) for b in blocks.values()], -1)


def full_kernel(j1: Tensor, j2: Tensor) -> Tensor:
    return torch.einsum("iap,jbp->ijab", j1, j2)


@dataclass
class Network:
    model: nn.Module
    x: Tensor
    x_test: Tensor
    k: Tensor  # (N, N, O, O)
    k_test: Tensor  # (M, N, O, O)
    f0: Tensor
    f0_test: Tensor
    jtheta0: Tensor
    jtheta0_test: Tensor


@pytest.fixture(scope="module")
def net() -> Network:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, O)).to(DTYPE)
    x, x_test = torch.randn(N, 4, dtype=DTYPE), torch.randn(M, 4, dtype=DTYPE)
    j, j_test = jacobian(model, x), jacobian(model, x_test)
    theta0 = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    with torch.no_grad():
        f0, f0_test = model(x), model(x_test)
    return Network(model, x, x_test, full_kernel(j, j), full_kernel(j_test, j), f0, f0_test,
                   j @ theta0, j_test @ theta0)


@dataclass
class Gaussian:
    """Kernels from a random Jacobian: full rank when P > N O, singular when P < N O."""

    j: Tensor
    j_test: Tensor
    k: Tensor
    k_test: Tensor
    f0: Tensor
    f0_test: Tensor
    y: Tensor


def gaussian(p: int, seed: int = 1) -> Gaussian:
    g = torch.Generator().manual_seed(seed)
    j = torch.randn(N, O, p, generator=g, dtype=DTYPE) / p**0.5
    j_test = torch.randn(M, O, p, generator=g, dtype=DTYPE) / p**0.5
    f0 = torch.randn(N, O, generator=g, dtype=DTYPE)
    f0_test = torch.randn(M, O, generator=g, dtype=DTYPE)
    y = torch.randn(N, O, generator=g, dtype=DTYPE)
    return Gaussian(j, j_test, full_kernel(j, j), full_kernel(j_test, j), f0, f0_test, y)


def random_psd(n: int, seed: int = 2) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(n, 2 * n, generator=g, dtype=DTYPE)
    return a @ a.T / (2 * n)


def labels(n: int, seed: int = 3) -> Tensor:
    return torch.randint(0, O, (n,), generator=torch.Generator().manual_seed(seed))


def regression_targets(n: int, seed: int = 4) -> Tensor:
    return torch.randn(n, O, generator=torch.Generator().manual_seed(seed), dtype=DTYPE)


# --------------------------------------------------------------------------------------
# Exactness against the linearised network trained with torch.optim.SGD
# --------------------------------------------------------------------------------------
SGD_CONFIGS = [
    {},
    {"momentum": 0.9},
    {"momentum": 0.9, "nesterov": True},
    {"weight_decay": 0.05},
    {"momentum": 0.5, "nesterov": True, "weight_decay": 0.05},
]
RECORD = [0, 1, 2, 17, 50]


def train_linearized(net: Network, criterion, y: Tensor, lr: float, config: dict):
    """Full-batch SGD on linearize(model): outputs at the RECORD steps."""
    lin = linearize(net.model)
    optimizer = torch.optim.SGD(lin.parameters(), lr=lr, **config)
    train, test = [], []
    for step in range(RECORD[-1] + 1):
        outputs = lin(net.x)
        if step in RECORD:
            train.append(outputs.detach())
            with torch.no_grad():
                test.append(lin(net.x_test))
        optimizer.zero_grad()
        criterion(outputs, y).backward()
        optimizer.step()
    return torch.stack(train), torch.stack(test)


def predict_gd(net: Network, y: Tensor, lr: float, loss, config: dict) -> predict.Prediction:
    return gd(net.k, y, net.f0, lr=lr, steps=RECORD[-1], loss=loss, record_steps=RECORD,
              k_test_train=net.k_test, f0_test=net.f0_test, jtheta0=net.jtheta0,
              jtheta0_test=net.jtheta0_test, **config)


@pytest.mark.parametrize("config", SGD_CONFIGS, ids=lambda c: "-".join(c) or "plain")
@pytest.mark.parametrize("loss", ["mse", "cross_entropy"])
def test_gd_equals_sgd_on_linearized_network(net, loss, config):
    y = regression_targets(N) if loss == "mse" else labels(N)
    criterion = nn.MSELoss() if loss == "mse" else nn.CrossEntropyLoss()
    momentum, nesterov = config.get("momentum", 0.0), config.get("nesterov", False)
    lr = 0.5 * max_learning_rate(net.k, loss, momentum, nesterov=nesterov)

    train, test = train_linearized(net, criterion, y, lr, config)
    pred = predict_gd(net, y, lr, loss, config)

    assert pred.steps.tolist() == RECORD
    assert pred.method == ("closed_form" if loss == "mse" and not config else "iteration")
    assert pred.exact and pred.approximation == "exact"
    torch.testing.assert_close(pred.train_outputs, train, atol=1e-8, rtol=0)
    torch.testing.assert_close(pred.test_outputs, test, atol=1e-8, rtol=0)
    assert (train[-1] - train[0]).abs().max() > 0.1  # the dynamics did something
    expected_loss = torch.stack([criterion(f, y) for f in train])
    torch.testing.assert_close(pred.train_loss, expected_loss, atol=1e-10, rtol=0)
    if loss == "cross_entropy":
        accuracy = (train.argmax(-1) == y).to(DTYPE).mean(-1)
        torch.testing.assert_close(pred.train_accuracy, accuracy)
    else:
        assert pred.train_accuracy is None


def test_gd_with_a_callable_loss_equals_sgd(net):
    y = regression_targets(N)

    def huber(f, target):
        return F.smooth_l1_loss(f, target, beta=0.5)

    config = {"momentum": 0.8, "weight_decay": 0.01}
    train, test = train_linearized(net, huber, y, 2.0, config)
    pred = predict_gd(net, y, 2.0, huber, config)
    assert pred.loss == "huber" and pred.method == "iteration"
    torch.testing.assert_close(pred.train_outputs, train, atol=1e-8, rtol=0)
    torch.testing.assert_close(pred.test_outputs, test, atol=1e-8, rtol=0)


def test_gd_scores_test_set_and_records_every_step_by_default(net):
    y, y_test = labels(N), labels(M, seed=5)
    pred = gd(net.k, y, net.f0, lr=1.0, steps=4, loss="cross_entropy",
              k_test_train=net.k_test, f0_test=net.f0_test, y_test=y_test)
    assert pred.steps.tolist() == [0, 1, 2, 3, 4]
    assert pred.train_outputs.shape == (5, N, O) and pred.test_outputs.shape == (5, M, O)
    expected = torch.stack([F.cross_entropy(f, y_test) for f in pred.test_outputs])
    torch.testing.assert_close(pred.test_loss, expected)
    expected = (pred.test_outputs.argmax(-1) == y_test).to(DTYPE).mean(-1)
    torch.testing.assert_close(pred.test_accuracy, expected)
    torch.testing.assert_close(pred.test_outputs[0], net.f0_test)


def test_cross_entropy_with_probability_targets_matches_one_hot_labels(net):
    y = labels(N)
    by_label = gd(net.k, y, net.f0, lr=1.0, steps=20, loss="cross_entropy")
    by_probability = gd(net.k, F.one_hot(y, O).to(DTYPE), net.f0, lr=1.0, steps=20,
                        loss="cross_entropy")
    torch.testing.assert_close(by_probability.train_outputs, by_label.train_outputs)
    torch.testing.assert_close(by_probability.train_accuracy, by_label.train_accuracy)


def test_recipe_from_the_engine_kernel_at_step_0_for_a_batchnorm_model():
    """The tracker's recipe: kernels from ntk_torch.empirical_ntk, outputs in eval mode."""
    import ntk_torch

    torch.manual_seed(6)
    model = nn.Sequential(nn.Linear(4, 12), nn.BatchNorm1d(12), nn.Tanh(), nn.Linear(12, O))
    model = model.to(DTYPE)
    x, x_test, y = torch.randn(N, 4, dtype=DTYPE), torch.randn(M, 4, dtype=DTYPE), labels(N)
    model(torch.randn(32, 4, dtype=DTYPE))  # non-trivial running statistics
    model.train()
    lin = linearize(model)
    k = ntk_torch.empirical_ntk(model, x)
    k_test = ntk_torch.empirical_ntk(model, x_test, x)
    with torch.no_grad():
        f0, f0_test = lin(x), lin(x_test)  # = model.eval()(x), leaving model in train mode
    config = {"momentum": 0.9, "weight_decay": 0.01}
    lr = 0.5 * max_learning_rate(k, "cross_entropy", 0.9)
    pred = gd(k, y, f0, lr=lr, steps=RECORD[-1], loss="cross_entropy", record_steps=RECORD,
              k_test_train=k_test, f0_test=f0_test, jtheta0=lin.jacobian_theta0(x),
              jtheta0_test=lin.jacobian_theta0(x_test), **config)
    reference = Network(model, x, x_test, k, k_test, f0, f0_test, None, None)
    train, test = train_linearized(reference, nn.CrossEntropyLoss(), y, lr, config)
    torch.testing.assert_close(pred.train_outputs, train, atol=1e-8, rtol=0)
    torch.testing.assert_close(pred.test_outputs, test, atol=1e-8, rtol=0)
    assert model.training


# --------------------------------------------------------------------------------------
# Closed forms, limits and the isotropic approximation
# --------------------------------------------------------------------------------------
def callable_mse(f, y):
    return F.mse_loss(f, y)


@pytest.mark.parametrize("p", [200, 10], ids=["full-rank", "singular"])
def test_mse_closed_form_equals_iteration(p):
    g = gaussian(p)
    lr = 0.9 * max_learning_rate(g.k)
    kwargs = dict(lr=lr, steps=300, k_test_train=g.k_test, f0_test=g.f0_test,
                  record_steps=[0, 1, 5, 300])
    closed = gd(g.k, g.y, g.f0, **kwargs)
    iterated = gd(g.k, g.y, g.f0, loss=callable_mse, **kwargs)
    assert (closed.method, iterated.method) == ("closed_form", "iteration")
    torch.testing.assert_close(closed.train_outputs, iterated.train_outputs, atol=1e-10, rtol=0)
    torch.testing.assert_close(closed.test_outputs, iterated.test_outputs, atol=1e-10, rtol=0)
    torch.testing.assert_close(closed.train_loss, iterated.train_loss, atol=1e-12, rtol=0)


def test_geometric_sum_is_accurate_for_small_and_zero_eigenvalues():
    x = torch.tensor([0.0, 1e-300, 1e-17, 1e-9, 1e-3, 0.3, 0.7, 1.0, 1.5, 1.99], dtype=DTYPE)
    for t in (0, 1, 7, 100):
        direct = sum((1 - x) ** s for s in range(t)) if t else torch.zeros_like(x)
        torch.testing.assert_close(solvers.geometric_sum(x, t), direct, rtol=1e-13, atol=0)
    z = torch.tensor([0.0, 1e-300, 1e-12, 1e-3, 2.0, 50.0], dtype=DTYPE)
    expected = torch.tensor([1.0, 1.0, 1.0 - 5e-13, (1 - torch.exp(torch.tensor(-1e-3,
                             dtype=DTYPE))) / 1e-3, (1 - torch.exp(torch.tensor(-2.0,
                             dtype=DTYPE))) / 2, 1 / 50], dtype=DTYPE)
    torch.testing.assert_close(solvers.phi(z), expected, rtol=1e-13, atol=0)


@pytest.mark.parametrize("loss", ["mse", "cross_entropy"])
def test_gradient_flow_is_the_small_lr_limit_of_gd(net, loss):
    y = regression_targets(N) if loss == "mse" else labels(N)
    total = 20 * max_learning_rate(net.k, loss)  # lr * steps, held fixed
    kwargs = dict(loss=loss, k_test_train=net.k_test, f0_test=net.f0_test)
    flow = gradient_flow(net.k, y, net.f0, lr=1.0, times=[total], **kwargs)
    errors = []
    for steps in (40, 400):
        pred = gd(net.k, y, net.f0, lr=total / steps, steps=steps, record_steps=[steps], **kwargs)
        errors.append(max((pred.train_outputs - flow.train_outputs).abs().max(),
                          (pred.test_outputs - flow.test_outputs).abs().max()))
    assert errors[0] > 1e-4  # the flow is not trivially reached
    assert 7 < errors[0] / errors[1] < 13  # Euler's first-order convergence
    assert errors[1] < 1e-2


@pytest.mark.slow
def test_gradient_flow_ode_matches_the_mse_closed_form(net):
    y = regression_targets(N)
    times = [0.0, 3.0, 40.0, 400.0]
    kwargs = dict(lr=0.5, times=times, k_test_train=net.k_test, f0_test=net.f0_test)
    closed = gradient_flow(net.k, y, net.f0, **kwargs)
    ode = gradient_flow(net.k, y, net.f0, loss=callable_mse, **kwargs)
    assert (closed.method, ode.method) == ("closed_form", "dopri5")
    assert closed.steps.tolist() == times
    torch.testing.assert_close(ode.train_outputs, closed.train_outputs, atol=1e-7, rtol=0)
    torch.testing.assert_close(ode.test_outputs, closed.test_outputs, atol=1e-7, rtol=0)
    assert closed.train_loss[-1] < 0.25 * closed.train_loss[0]


@pytest.mark.parametrize("p", [200, 10], ids=["full-rank", "singular"])
def test_kernel_regression_is_the_long_time_limit(p):
    g = gaussian(p)
    lr = 0.9 * max_learning_rate(g.k)
    kwargs = dict(k_test_train=g.k_test, f0_test=g.f0_test)
    limit = kernel_regression(g.k, g.y, g.f0, **kwargs)
    # Long enough for the non-zero modes (condition number ~10) to vanish, and short enough
    # that rounding-level eigenvalues, which kernel_regression drops, stay negligible.
    late = gd(g.k, g.y, g.f0, lr=lr, steps=10**5, record_steps=[10**5], **kwargs)
    flow = gradient_flow(g.k, g.y, g.f0, lr=lr, times=[1e5], **kwargs)
    assert limit.method == "kernel_regression" and limit.steps.tolist() == [float("inf")]
    for pred in (late, flow):
        torch.testing.assert_close(pred.train_outputs, limit.train_outputs, atol=1e-8, rtol=0)
        torch.testing.assert_close(pred.test_outputs, limit.test_outputs, atol=1e-8, rtol=0)
    residual = (limit.train_outputs[0] - g.y).abs().max()
    if p > N * O:  # invertible kernel: the training targets are fitted
        assert residual < 1e-10
    else:  # f0 - y keeps its component in the kernel's null space
        assert residual > 0.1


def test_kernel_regression_with_ridge_is_parameter_space_ridge_regression():
    g, ridge = gaussian(10), 0.3
    j, j_test = g.j.reshape(N * O, -1), g.j_test.reshape(M * O, -1)
    residual = (g.y - g.f0).reshape(-1)
    delta = torch.linalg.solve(j.T @ j + ridge * torch.eye(j.shape[1], dtype=DTYPE), j.T @ residual)
    pred = kernel_regression(g.k, g.y, g.f0, k_test_train=g.k_test, f0_test=g.f0_test, ridge=ridge)
    torch.testing.assert_close(pred.train_outputs[0], g.f0 + (j @ delta).reshape(N, O))
    torch.testing.assert_close(pred.test_outputs[0], g.f0_test + (j_test @ delta).reshape(M, O))


def test_kernel_regression_defaults_to_zero_initial_outputs():
    g = gaussian(200)
    pred = kernel_regression(g.k, g.y, k_test_train=g.k_test)
    k, k_test = g.k.permute(0, 2, 1, 3).reshape(N * O, -1), g.k_test.permute(0, 2, 1, 3)
    expected = k_test.reshape(M * O, -1) @ torch.linalg.solve(k, g.y.reshape(-1))
    torch.testing.assert_close(pred.test_outputs[0], expected.reshape(M, O))
    torch.testing.assert_close(pred.train_outputs[0], g.y)


def isotropic_pair(n: int = N):
    """A full kernel that is exactly (K_trace / O) (x) I_O, and its trace kernel."""
    shared = random_psd(n)
    full = shared[:, :, None, None] * torch.eye(O, dtype=DTYPE)
    return full, O * shared


def test_trace_kernels_give_the_full_prediction_when_the_kernel_is_isotropic():
    full, trace = isotropic_pair(N + M)
    train, test = slice(0, N), slice(N, N + M)
    g = torch.Generator().manual_seed(7)
    f0 = torch.randn(N, O, generator=g, dtype=DTYPE)
    f0_test = torch.randn(M, O, generator=g, dtype=DTYPE)
    jtheta0 = torch.randn(N, O, generator=g, dtype=DTYPE)
    jtheta0_test = torch.randn(M, O, generator=g, dtype=DTYPE)
    y, y_labels = regression_targets(N), labels(N)

    def both(fn, *args, **kwargs):
        results = []
        for k in (full, trace):
            results.append(fn(k[train, train], *args, k_test_train=k[test, train],
                              f0_test=f0_test, **kwargs))
        return results

    cases = [
        both(gd, y, f0, lr=1.0, steps=30),
        both(gd, y_labels, f0, lr=3.0, steps=30, loss="cross_entropy", momentum=0.9,
             weight_decay=0.1, jtheta0=jtheta0, jtheta0_test=jtheta0_test),
        both(gradient_flow, y, f0, lr=1.0, times=[0.0, 5.0, 50.0]),
        both(gradient_flow, y_labels, f0, lr=1.0, times=[5.0], loss="cross_entropy"),
        both(kernel_regression, y, f0, ridge=0.01),
    ]
    for exact, isotropic in cases:
        assert exact.approximation == "exact" and isotropic.approximation == "isotropic"
        assert not isotropic.exact and isotropic.method == exact.method
        torch.testing.assert_close(isotropic.train_outputs, exact.train_outputs)
        torch.testing.assert_close(isotropic.test_outputs, exact.test_outputs)
    for loss in ("mse", "cross_entropy"):
        assert max_learning_rate(trace[train, train], loss, 0.9, n_outputs=O) == pytest.approx(
            max_learning_rate(full[train, train], loss, 0.9), rel=1e-12)


# --------------------------------------------------------------------------------------
# max_learning_rate
# --------------------------------------------------------------------------------------
def increments(pred: predict.Prediction) -> Tensor:
    """Per-step change |f_{t+1} - f_t| of the training outputs: 0 at any fixed point."""
    return (pred.train_outputs[1:] - pred.train_outputs[:-1]).flatten(1).norm(dim=1)


@pytest.mark.parametrize(
    "momentum, nesterov, weight_decay",
    [(0.0, False, 0.0), (0.9, False, 0.0), (0.9, True, 0.0), (0.5, True, 0.2), (0.0, False, 0.2)],
)
def test_mse_max_learning_rate_is_the_stability_edge(momentum, nesterov, weight_decay):
    g = gaussian(200)
    critical = max_learning_rate(g.k, "mse", momentum, nesterov=nesterov,
                                 weight_decay=weight_decay)
    top = torch.linalg.eigvalsh(g.k.permute(0, 2, 1, 3).reshape(N * O, -1))[-1]
    factor = 2 * (1 + momentum) / ((1 + 2 * momentum) if nesterov else 1)
    assert critical == pytest.approx(factor / (2 * float(top) / (N * O) + weight_decay))
    jtheta0 = torch.randn(N, O, generator=torch.Generator().manual_seed(9), dtype=DTYPE)
    steps = 400

    def run(scale: float, steps: int = steps) -> Tensor:
        return increments(gd(g.k, g.y, g.f0, lr=scale * critical, steps=steps, momentum=momentum,
                             nesterov=nesterov, weight_decay=weight_decay, jtheta0=jtheta0))

    stable, edge, unstable = run(0.5), run(1.0), run(2.5, steps=60)  # 60: before overflow
    assert stable[-1] < 1e-6 * stable[0]
    assert edge.max() < 100 * steps * edge[0]  # no faster than linear growth ...
    assert edge[-1] < 3 * edge[steps // 2]  # ... and none late in the run
    assert edge[-1] > 1e-3 * edge[0]  # it does not converge either: it is the edge
    assert unstable[-1] > 1e6 * unstable[0]


def test_cross_entropy_curvature_constant_is_the_largest_hessian_eigenvalue():
    # The Hessian of mean cross-entropy in the logits never exceeds 1/(2N) ...
    y = labels(N)
    hessian = torch.func.hessian(lambda f: F.cross_entropy(f, y))
    g = torch.Generator().manual_seed(11)
    for scale in (0.1, 1.0, 5.0):
        logits = scale * torch.randn(N, O, generator=g, dtype=DTYPE)
        top = torch.linalg.eigvalsh(hessian(logits).reshape(N * O, N * O))[-1]
        assert top <= 1 / (2 * N) + 1e-15
    # ... and attains it where the softmax splits its mass equally between two classes.
    logits = torch.tensor([0.0, 0.0, -1e3], dtype=DTYPE).expand(N, O).clone()
    worst = torch.linalg.eigvalsh(hessian(logits).reshape(N * O, N * O))[-1]
    assert float(worst) == pytest.approx(1 / (2 * N), rel=1e-12)


def worst_case_cross_entropy_kernel(n: int = N, classes: int = 2) -> Tensor:
    """A kernel whose top eigenvector is the top curvature direction of CE at zero logits."""
    u = torch.zeros(n, classes, dtype=DTYPE)
    u[:, 0], u[:, 1] = 1.0, -1.0
    u = u.reshape(-1) / u.norm()
    rest = random_psd(n * classes)
    projector = torch.eye(n * classes, dtype=DTYPE) - torch.outer(u, u)
    rest = projector @ rest @ projector  # PSD and orthogonal to u
    rest = 0.5 * rest / torch.linalg.eigvalsh(rest)[-1]
    matrix = 4.0 * torch.outer(u, u) + rest  # top eigenvalue 4, the rest <= 0.5
    return matrix.reshape(n, classes, n, classes).permute(0, 2, 1, 3)


@pytest.mark.parametrize("momentum, nesterov", [(0.0, False), (0.9, False), (0.6, True)])
def test_cross_entropy_max_learning_rate_is_sharp_at_the_worst_case(momentum, nesterov):
    k = worst_case_cross_entropy_kernel()
    matrix = k.permute(0, 2, 1, 3).reshape(2 * N, 2 * N)
    critical = max_learning_rate(k, "cross_entropy", momentum, nesterov=nesterov)
    factor = 2 * (1 + momentum) / ((1 + 2 * momentum) if nesterov else 1)
    assert critical == pytest.approx(factor * 2 * N / 4.0)
    y = labels(N) % 2

    def one_step(lr: float):
        """SGD in function space on the state (f, K b), b the momentum buffer."""
        def step(state: Tensor) -> Tensor:
            f, kb = state[: 2 * N], state[2 * N:]
            kg = matrix @ CROSS_ENTROPY.gradient(f.reshape(N, 2), y).reshape(-1)
            kb = momentum * kb + kg
            update = kg + momentum * kb if nesterov else (kb if momentum else kg)
            return torch.cat([f - lr * update, kb])
        return step

    def spectral_radius(lr: float) -> float:
        jac = torch.func.jacrev(one_step(lr))(torch.zeros(4 * N, dtype=DTYPE))
        return float(torch.linalg.eigvals(jac).abs().max())

    assert spectral_radius(0.99 * critical) <= 1 + 1e-9
    assert spectral_radius(1.01 * critical) > 1 + 1e-4


def test_cross_entropy_max_learning_rate_decreases_the_loss_monotonically(net):
    y = labels(N)
    lr = 0.99 * max_learning_rate(net.k, "cross_entropy")
    pred = gd(net.k, y, net.f0, lr=lr, steps=200, loss="cross_entropy")
    assert (pred.train_loss[1:] <= pred.train_loss[:-1] + 1e-12).all()  # descent lemma
    assert pred.train_loss[-1] < 0.5 * pred.train_loss[0]
    assert pred.train_accuracy[-1] == 1.0


# --------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------
def bad_input_cases() -> dict:
    """Case name -> (call, regex the ValueError's message must match)."""
    g = gaussian(200)
    k, y, f0, kt, f0t = g.k, g.y, g.f0, g.k_test, g.f0_test
    trace = k.diagonal(dim1=2, dim2=3).sum(-1)
    asymmetric = k.clone()
    asymmetric[0, 1, 0, 2] += 0.5
    asymmetric_trace = trace.clone()
    asymmetric_trace[0, 1] += 0.5
    identity = torch.eye(N * O, dtype=DTYPE).reshape(N, O, N, O).permute(0, 2, 1, 3)
    indefinite = k - 2.0 * identity  # smallest eigenvalue about -1.7
    nan_kernel = k.clone()
    nan_kernel[2, 3, 0, 0] = float("nan")
    run = dict(lr=0.1, steps=3)
    test = dict(k_test_train=kt, f0_test=f0t)
    negative = r"not positive semi-definite: its smallest eigenvalue is -1\.\d+e\+00"
    return {
        # shapes
        "y rows": (lambda: gd(k, y[:-1], f0, **run),
                   "k_train_train has 12 examples but y_train has 11"),
        "f0 rows": (lambda: gd(k, y, f0[:-1], **run),
                    "k_train_train has 12 examples but f0_train has 11"),
        "f0 outputs": (lambda: gd(k, y[:, :2], f0[:, :2], **run),
                       "f0_train has 2 outputs per example but k_train_train has 3"),
        "kernel ndim": (lambda: gd(k[..., 0], y, f0, **run),
                        r"k_train_train must be a full kernel \(N, N, O, O\) or a trace kernel"),
        "kernel not square": (lambda: gd(kt, y, f0, **run),
                              "k_train_train must be a full kernel"),
        "mse target shape": (lambda: gd(k, y[:, :1], f0, **run),
                             r"y_train has targets of shape \(12, 1\) but the outputs have shape \(12, 3\)"),
        "class labels": (lambda: gd(k, labels(N) + 1, f0, loss="cross_entropy", **run),
                         r"y_train has class label 3 but there are 3 outputs"),
        "test kernel mode": (lambda: gd(k, y, f0, k_test_train=kt.diagonal(dim1=2, dim2=3).sum(-1),
                                        f0_test=f0t, **run),
                             r"k_test_train is a trace kernel \(M, N\) but k_train_train is "
                             "a full"),
        "test kernel examples": (lambda: gd(k, y, f0, k_test_train=kt[:, :-1], f0_test=f0t, **run),
                                 "k_test_train has 11 training examples .* k_train_train has 12"),
        "missing f0_test": (lambda: gd(k, y, f0, k_test_train=kt, **run),
                            "k_test_train was given without f0_test"),
        "f0_test rows": (lambda: gd(k, y, f0, k_test_train=kt, f0_test=f0t[:-1], **run),
                         "k_test_train has 7 examples but f0_test has 6"),
        # scalars and options
        "negative lr": (lambda: gd(k, y, f0, lr=-0.1, steps=3),
                        "lr must be a non-negative finite number, got -0.1"),
        "negative steps": (lambda: gd(k, y, f0, lr=0.1, steps=-1),
                           "steps must be a non-negative integer, got -1"),
        "fractional steps": (lambda: gd(k, y, f0, lr=0.1, steps=2.5),
                             "steps must be a non-negative integer"),
        "unknown loss": (lambda: gd(k, y, f0, loss="hinge", **run),
                         "loss must be one of 'mse', 'cross_entropy' or a callable "
                         r"loss\(f, y\); got 'hinge'"),
        "nesterov without momentum": (lambda: gd(k, y, f0, nesterov=True, **run),
                                      "nesterov=True requires momentum > 0"),
        "record beyond steps": (lambda: gd(k, y, f0, record_steps=[1, 4], **run),
                                r"record_steps must lie in \[0, steps=3\]; got 4"),
        "missing jtheta0": (lambda: gd(k, y, f0, weight_decay=0.1, **run),
                            "weight_decay > 0 needs jtheta0"),
        "missing jtheta0_test": (lambda: gd(k, y, f0, weight_decay=0.1, jtheta0=f0, **test, **run),
                                 "weight_decay > 0 needs jtheta0_test"),
        "negative time": (lambda: gradient_flow(k, y, f0, lr=0.1, times=[1.0, -2.0]),
                          "times must be non-negative finite numbers, got -2.0"),
        "negative ridge": (lambda: kernel_regression(k, y, f0, ridge=-1.0),
                           "ridge must be a non-negative"),
        "max lr of a callable": (lambda: max_learning_rate(k, callable_mse),
                                 "max_learning_rate needs the loss's curvature"),
        "max lr trace without O": (lambda: max_learning_rate(trace),
                                   r"k_train_train is a trace kernel \(N, N\): pass n_outputs"),
        "max lr momentum >= 1": (lambda: max_learning_rate(k, "mse", 1.0),
                                 r"momentum must be in \[0, 1\)"),
        # kernel values, on every path that reads the kernel
        "asymmetric": (lambda: gd(asymmetric, y, f0, **run),
                       r"k_train_train is not symmetric: "
                       r"max \|K\[i,j,a,b\] - K\[j,i,b,a\]\| = 5\.000e-01"),
        "asymmetric trace": (lambda: gd(asymmetric_trace, y, f0, **run),
                             r"k_train_train is not symmetric: "
                             r"max \|K\[i,j\] - K\[j,i\]\| = 5\.000e-01"),
        "indefinite (closed form)": (lambda: gd(indefinite, y, f0, **run),
                                     "k_train_train is " + negative),
        "indefinite (iteration)": (lambda: gd(indefinite, y, f0, momentum=0.9, **run), negative),
        "indefinite (flow)": (lambda: gradient_flow(indefinite, y, f0, lr=0.1, times=1.0),
                              negative),
        "indefinite (ODE)": (lambda: gradient_flow(indefinite, labels(N), f0, lr=0.1, times=1.0,
                                                   loss="cross_entropy"), negative),
        "indefinite (regression)": (lambda: kernel_regression(indefinite, y, f0), negative),
        "indefinite (max lr)": (lambda: max_learning_rate(indefinite), negative),
        "non-finite kernel": (lambda: gd(nan_kernel, y, f0, **run),
                              "k_train_train contains non-finite values"),
    }


CASES = bad_input_cases()


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_gets_a_clear_error(case):
    call, message = CASES[case]
    with pytest.raises(ValueError, match=message):
        call()


def test_rounding_level_asymmetry_and_negative_eigenvalues_are_accepted():
    g = gaussian(10)  # singular: eigenvalues at rounding level, some slightly negative
    noisy = g.k + 1e-13 * torch.randn(g.k.shape, generator=torch.Generator().manual_seed(5),
                                      dtype=DTYPE)
    assert torch.linalg.eigvalsh(noisy.permute(0, 2, 1, 3).reshape(N * O, -1))[0] < 0
    gd(noisy, g.y, g.f0, lr=0.1, steps=3)
    gd(noisy, g.y, g.f0, lr=0.1, steps=3, momentum=0.5)


def test_float32_kernels_and_float32_kernels_cast_to_float64():
    g = gaussian(10)
    single = full_kernel(g.j.float(), g.j.float())  # float32 rounding, singular
    lr = 0.5 * max_learning_rate(g.k)
    reference = gd(g.k, g.y, g.f0, lr=lr, steps=50, momentum=0.5)
    for k, f0 in ((single, g.f0.float()), (single.double(), g.f0)):
        for momentum in (0.0, 0.5):
            pred = gd(k, g.y, f0, lr=lr, steps=50, momentum=momentum)
            assert pred.train_outputs.dtype == k.dtype
            if momentum:
                torch.testing.assert_close(pred.train_outputs.double(), reference.train_outputs,
                                           atol=1e-4, rtol=0)
