"""The infinite-width kernels of ntk_torch.analytic: hand-computed values, the layouts of
empirical_ntk, the empirical NTK of wide MLPs converging to them, and argument errors."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import ntk_torch
from ntk_torch.analytic import mlp_kernels
from ntk_torch.models import MLP


def _inputs(n: int, d: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_linear_model_is_the_scaled_gram_matrix():
    x = torch.tensor([[1.0, 2.0], [3.0, -1.0]], dtype=torch.float64)
    out = mlp_kernels(x, depth=0, weight_std=2.0, bias_std=0.5)
    expected = 4.0 * (x @ x.T) / 2 + 0.25  # sigma_w^2 x.x' / d + sigma_b^2
    assert torch.equal(out["nngp"], expected) and torch.equal(out["ntk"], expected)
    assert set(out) == {"nngp", "ntk"}


def test_relu_one_hidden_layer_by_hand():
    # x = e1, x' = e2 (d = 2): Sigma^1 = diag(1/2), so the angle between them is pi/2;
    # E[relu relu] = (1/2) / (2 pi) * (sin + (pi - theta) cos) = 1/(4 pi) off the diagonal,
    # 1/4 on it; E[step step] = 1/4 off, 1/2 on; Theta^2 = Sigma^2 + E[step step] Theta^1
    x = torch.eye(2, dtype=torch.float64)
    out = mlp_kernels(x, depth=1, activation="relu")
    off = 1 / (4 * math.pi)
    assert torch.allclose(out["nngp"], torch.tensor([[0.25, off], [off, 0.25]], dtype=torch.float64))
    assert torch.allclose(out["ntk"], torch.tensor([[0.25 + 0.25, off], [off, 0.5]], dtype=torch.float64))


def test_erf_one_hidden_layer_by_hand():
    # one input x = 1 (d = 1): Sigma^1 = 1; E[erf(u)^2] = 2/pi arcsin(2/3);
    # E[erf'(u)^2] = 4/pi / sqrt(3 * 3 - 4) = 4 / (pi sqrt 5)
    out = mlp_kernels(torch.ones(1, 1, dtype=torch.float64), depth=1, activation="erf")
    nngp = 2 / math.pi * math.asin(2 / 3)
    assert math.isclose(float(out["nngp"]), nngp, rel_tol=1e-12)
    assert math.isclose(float(out["ntk"]), nngp + 4 / (math.pi * math.sqrt(5)), rel_tol=1e-12)


def test_identity_network_is_the_linear_recursion():
    x = torch.tensor([[1.0, 0.0, 2.0]], dtype=torch.float64)
    sw2, sb2 = 1.5**2, 0.3**2
    sigma = theta = sw2 * 5.0 / 3 + sb2
    for _ in range(3):
        sigma = sw2 * sigma + sb2
        theta = sigma + sw2 * theta
    out = mlp_kernels(x, depth=3, activation="identity", weight_std=1.5, bias_std=0.3)
    assert math.isclose(float(out["nngp"]), sigma, rel_tol=1e-12)
    assert math.isclose(float(out["ntk"]), theta, rel_tol=1e-12)


@pytest.mark.parametrize("activation", ["relu", "erf", "identity"])
def test_cross_kernel_is_the_block_of_the_joint_one(activation):
    a, b = _inputs(3, 4, 1), _inputs(2, 4, 2)
    joint = mlp_kernels(torch.cat([a, b]), depth=2, activation=activation, bias_std=0.1)
    cross = mlp_kernels(a, b, depth=2, activation=activation, bias_std=0.1)
    for key in ("nngp", "ntk"):
        assert cross[key].shape == (3, 2)
        assert torch.allclose(cross[key], joint[key][:3, 3:], rtol=1e-12, atol=1e-14)
        assert torch.allclose(joint[key], joint[key].T, rtol=1e-12, atol=1e-14)


def test_zero_input_and_dtype():
    x = torch.tensor([[0.0, 0.0], [1.0, 1.0]])
    out = mlp_kernels(x, depth=2)  # relu, no bias: the zero input has a zero kernel, no NaN
    assert out["ntk"].dtype == torch.float32
    assert torch.isfinite(out["ntk"]).all() and float(out["ntk"][0].abs().sum()) == 0.0
    images = torch.randn(3, 1, 2, 2, dtype=torch.float64)  # flattened like MLP does
    assert torch.equal(mlp_kernels(images, depth=1)["ntk"], mlp_kernels(images.flatten(1), depth=1)["ntk"])


@pytest.mark.slow
def test_full_layout_limit_is_theta_times_identity_over_outputs():
    # the per-output convention: full K[i, j, o, o'] -> Theta delta(o, o'), trace -> O Theta
    x = _inputs(3, 5)
    theta = mlp_kernels(x, depth=1, bias_std=0.1)["ntk"]
    model = MLP(5, 2, width=1024, depth=1, sigma_b=0.1, seed=0).double()
    full = ntk_torch.empirical_ntk(model, x, mode="full")
    trace = ntk_torch.empirical_ntk(model, x, mode="trace")
    expected = theta[:, :, None, None] * torch.eye(2, dtype=torch.float64)
    assert float((full - expected).norm() / expected.norm()) < 0.15
    assert float((trace - 2 * theta).norm() / (2 * theta).norm()) < 0.15


SEEDS = {256: 6, 1024: 4, 4096: 2}
"""Initialisations averaged at each width (fewer where the kernel fluctuates less and costs more)."""


def _relative_error(width: int, activation: str, bias_std: float, seeds: int) -> float:
    x = _inputs(4, 3, seed=7)
    theta = mlp_kernels(x, depth=2, activation=activation, bias_std=bias_std)["ntk"]
    errors = []
    for seed in range(seeds):
        model = MLP(3, 1, width=width, depth=2, activation=activation, bias=bias_std > 0,
                    sigma_b=bias_std if bias_std > 0 else 0.1, seed=seed).double()
        kernel = ntk_torch.empirical_ntk(model, x, mode="trace")
        errors.append(float((kernel - theta).norm() / theta.norm()))
    return float(np.mean(errors))


@pytest.mark.slow
@pytest.mark.parametrize("activation", ["relu", "erf"])
@pytest.mark.parametrize("bias_std", [0.0, 0.2])
def test_empirical_ntk_approaches_the_analytic_one_as_the_width_grows(activation, bias_std):
    widths = [256, 1024, 4096]
    errors = [_relative_error(width, activation, bias_std, SEEDS[width]) for width in widths]
    slope = np.polyfit(np.log(widths), np.log(errors), 1)[0]  # about -1/2 (fluctuations ~ 1/sqrt(n))
    assert slope < -0.25 and errors[-1] < 0.1, (errors, slope)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(depth=-1), "depth must be at least 0"),
        (dict(depth=1, activation="tanh"), "activation"),
        (dict(depth=1, weight_std=0.0), "weight_std must be positive"),
        (dict(depth=1, bias_std=-0.1), "bias_std must be at least 0"),
    ],
)
def test_bad_arguments_name_themselves(kwargs, message):
    with pytest.raises((TypeError, ValueError), match=message):
        mlp_kernels(torch.ones(2, 2), **kwargs)


def test_bad_inputs_name_themselves():
    with pytest.raises(ValueError, match="x2 must have the 2 features of x1"):
        mlp_kernels(torch.ones(2, 2), torch.ones(2, 3), depth=1)
    with pytest.raises(ValueError, match=r"x1 must have shape \(N, d\)"):
        mlp_kernels(torch.ones(3), depth=1)
    with pytest.raises(TypeError, match="x1 must be a torch.Tensor"):
        mlp_kernels([[1.0]], depth=1)
    with pytest.raises(ValueError, match="x1 holds non-finite"):
        mlp_kernels(torch.tensor([[float("nan")]]), depth=1)


def test_public_through_the_package_root():
    assert ntk_torch.mlp_kernels is mlp_kernels
    assert ntk_torch.analytic.mlp_kernels is mlp_kernels


@pytest.mark.parametrize("mode", ["trace", "full", "diagonal"])
def test_reference_kernel_in_each_layout(mode):
    from ntk_torch.analytic import reference_kernel
    from ntk_torch.layout import layout

    x = _inputs(3, 4)
    model = MLP(4, 2, width=8, depth=2, sigma_b=0.2, seed=0).double()
    theta = mlp_kernels(x, depth=2, bias_std=0.2)["ntk"]
    K = reference_kernel(model, x, layout(mode), dict(model.named_parameters()))
    expected = {"trace": 2 * theta, "full": theta[:, :, None, None] * torch.eye(2, dtype=torch.float64),
                "diagonal": torch.stack([theta, theta], dim=-1)}[mode]
    assert torch.equal(K, expected)


@pytest.mark.slow
def test_tracker_records_the_distance_from_the_infinite_width_kernel():
    from ntk_torch.tracker import NTKTracker

    x, y = _inputs(8, 3).float(), _inputs(8, 1, seed=5).float()
    model = MLP(3, 1, width=512, depth=1, sigma_b=0.1, seed=0)
    tracker = NTKTracker(model, (x, y), loss="mse", probe_size=8, progress=False, forecast=None,
                         analytic_reference=True)
    tracker.attach()
    record = tracker.records[0]
    theta = mlp_kernels(tracker.probe.x.double(), depth=1, bias_std=0.1)["ntk"]
    K = ntk_torch.empirical_ntk(model.double(), tracker.probe.x.double(), mode="trace")
    assert record["analytic_distance"] == pytest.approx(float((K - theta).norm() / theta.norm()), rel=1e-3)
    assert 0 < record["analytic_distance"] < 0.2
    tracker.close()


@pytest.mark.slow
def test_analytic_reference_refuses_other_models():
    from ntk_torch.tracker import NTKTracker

    x, y = torch.randn(8, 3), torch.randn(8, 1)
    with pytest.raises(ValueError, match="analytic_reference needs an ntk_torch.models.MLP in NTK parametrisation"):
        NTKTracker(torch.nn.Linear(3, 1), (x, y), loss="mse", probe_size=8, progress=False, analytic_reference=True)
    with pytest.raises(ValueError, match="NTK parametrisation"):
        NTKTracker(MLP(3, 1, 8, 1, parametrization="standard"), (x, y), loss="mse", probe_size=8, progress=False,
                   analytic_reference=True)
    with pytest.raises(TypeError, match="analytic_reference must be"):
        NTKTracker(MLP(3, 1, 8, 1), (x, y), loss="mse", probe_size=8, progress=False, analytic_reference="yes")
