"""Built-in models: shapes, parametrisations against the infinite-width kernels, seeding,
registry, custom factories and summaries."""

from __future__ import annotations

import json
import math
import sys
import textwrap

import numpy as np
import pytest
import torch
from torch import nn

import ntk_torch
from ntk_torch import models
from ntk_torch.data import DataSplit, digits
from ntk_torch.models import CNN, MLP, NTKLinear


def relu_kernels(x: torch.Tensor, depth: int, sigma_w: float, sigma_b: float):
    r"""The infinite-width NNGP :math:`\Sigma` and NTK :math:`\Theta` of a ReLU MLP in NTK
    parametrisation with ``depth`` hidden layers, per output (Jacot et al. 2018):

    :math:`\Sigma^1 = \sigma_w^2 x^\top x' / d + \sigma_b^2 = \Theta^1`,
    :math:`\Sigma^{l+1} = \sigma_w^2 E[\phi(u)\phi(v)] + \sigma_b^2`,
    :math:`\Theta^{l+1} = \Sigma^{l+1} + \sigma_w^2 E[\phi'(u)\phi'(v)]\,\Theta^l`,
    with the arc-cosine expectations of Cho & Saul 2009.
    """
    sigma = sigma_w**2 * x @ x.T / x.shape[1] + sigma_b**2
    theta = sigma.clone()
    for _ in range(depth):
        scale = sigma.diagonal().sqrt()
        norms = scale[:, None] * scale[None, :]
        cos = (sigma / norms).clamp(-1.0, 1.0)
        angle = torch.arccos(cos)
        sigma = sigma_w**2 * norms * (torch.sin(angle) + (math.pi - angle) * cos) / (2 * math.pi) + sigma_b**2
        theta = sigma + sigma_w**2 * (math.pi - angle) / (2 * math.pi) * theta
    return sigma, theta


def inputs(n: int, d: int, seed: int = 0, dtype=torch.float64) -> torch.Tensor:
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


# --------------------------------------------------------------------------- NTK parametrisation


def test_ntk_linear_computes_the_ntk_parametrised_layer():
    layer = NTKLinear(5, 3, sigma_w=1.5, sigma_b=0.2)
    x = torch.randn(4, 5)
    expected = 1.5 / math.sqrt(5) * x @ layer.weight.T + 0.2 * layer.bias
    assert torch.allclose(layer(x), expected, atol=1e-6)
    assert [name for name, _ in layer.named_parameters()] == ["weight", "bias"]
    big = NTKLinear(400, 500)
    weight = big.weight.detach()
    assert abs(float(weight.std()) - 1.0) < 0.01 and abs(float(weight.mean())) < 0.01
    assert NTKLinear(2, 2, bias=False).bias is None


def test_standard_parametrisation_initialisation():
    mlp = MLP(50, 2, width=400, depth=1, parametrization="standard", sigma_w=2.0, sigma_b=0.5, seed=0)
    first, readout = (layer.weight.detach() for layer in mlp.layers)
    assert type(mlp.layers[0]) is nn.Linear  # so the structured kernel engine's Linear rule applies
    assert abs(float(first.std()) - 2.0 / math.sqrt(50)) < 0.01
    assert abs(float(readout.std()) - 2.0 / math.sqrt(400)) < 0.01
    assert abs(float(mlp.layers[0].bias.detach().std()) - 0.5) < 0.06


def test_output_variance_at_init_matches_the_nngp_at_every_width():
    # f(x) at init is centred with variance Sigma(x, x), independent of the width: average
    # f^2 / Sigma over 64 outputs and 8 initialisations at each width
    x = inputs(16, 8, dtype=torch.float32)
    sigma, _ = relu_kernels(x.double(), depth=2, sigma_w=1.0, sigma_b=0.1)
    for width in (32, 256, 1024):
        with torch.no_grad():
            f = torch.stack([MLP(8, 64, width, 2, seed=s)(x) for s in range(8)]).double()
        ratio = float((f**2 / sigma.diagonal()[None, :, None]).mean())
        assert 0.75 < ratio < 1.25, f"width {width}: E[f^2] / Sigma = {ratio:.3f}"


def test_empirical_ntk_converges_to_the_infinite_width_ntk():
    x = inputs(6, 8)
    _, theta = relu_kernels(x, depth=1, sigma_w=1.0, sigma_b=0.1)

    kernel = {
        (width, seed): ntk_torch.empirical_ntk(MLP(8, 1, width, 1, seed=seed).double(), x, mode="trace")
        for width, seed in [(64, 0), (64, 1), (1024, 0), (16384, 0), (16384, 1)]
    }
    errors = [relative(kernel[width, 0], theta) for width in (64, 1024, 16384)]
    assert errors[0] > errors[1] > errors[2] and errors[2] < 0.03, errors
    # two initialisations at a large width agree, much better than at a small one
    wide = relative(kernel[16384, 1], kernel[16384, 0])
    narrow = relative(kernel[64, 1], kernel[64, 0])
    assert wide < 0.05 and wide < narrow / 4, (wide, narrow)


def test_standard_parametrisation_kernel_grows_with_width():
    x = inputs(6, 8)

    def scale(width: int, parametrization: str) -> float:
        mlp = MLP(8, 1, width, 1, parametrization=parametrization, seed=0).double()
        return float(ntk_torch.empirical_ntk(mlp, x, mode="trace").diagonal().mean())

    assert scale(1024, "standard") / scale(64, "standard") > 8  # ~ width
    assert 0.8 < scale(1024, "ntk") / scale(64, "ntk") < 1.25  # ~ 1


def test_per_layer_kernels_are_keyed_by_layer_paths():
    x = torch.randn(3, 1, 8, 8)
    mlp = ntk_torch.empirical_ntk(MLP(64, 2, 8, 1, seed=0), x, mode="trace", per_layer=True)
    assert list(mlp) == ["layers.0", "layers.1"]
    cnn = ntk_torch.empirical_ntk(CNN(channels=(2, 3), seed=0), x, mode="trace", per_layer=True)
    assert list(cnn) == ["convs.0", "convs.1", "head"]


# --------------------------------------------------------------------------- MLP / CNN


def test_mlp_shapes_names_and_flattening():
    mlp = MLP(64, 10, width=32, depth=3, activation="tanh", seed=0)
    assert [name for name, _ in mlp.named_parameters()] == [
        f"layers.{i}.{p}" for i in range(4) for p in ("weight", "bias")
    ]
    x = torch.randn(5, 1, 8, 8)
    assert mlp(x).shape == (5, 10)
    assert torch.equal(mlp(x), mlp(x.flatten(1)))
    linear = MLP(3, 2, depth=0, bias=False, seed=0)
    assert len(linear.layers) == 1 and linear(torch.eye(3)).shape == (3, 2)
    with pytest.raises(ValueError, match=r"MLP expects inputs \(N, 64\).*got shape \(5, 63\)"):
        mlp(torch.randn(5, 63))


@pytest.mark.parametrize("activation", sorted(models.ACTIVATIONS))
def test_every_activation_builds_and_runs(activation):
    out = MLP(4, 2, width=8, depth=1, activation=activation, seed=0)(torch.randn(3, 4))
    assert out.shape == (3, 2) and torch.isfinite(out).all()


def test_cnn_on_digits_images_and_flat_inputs():
    cnn = CNN(seed=0)
    assert cnn.feature_shape == (32, 4, 4)
    images = torch.randn(3, 1, 8, 8)
    assert cnn(images).shape == (3, 10)
    assert torch.equal(cnn(images), cnn(images.flatten(1)))
    with pytest.raises(ValueError, match=r"CNN expects inputs \(N, 1, 8, 8\) or flattened \(N, 64\)"):
        cnn(torch.randn(3, 3, 8, 8))
    wide = CNN(in_channels=3, num_classes=4, image_size=(9, 5), channels=[4, 6, 8], batch_norm=True, seed=0)
    assert wide(torch.randn(2, 3, 9, 5)).shape == (2, 4) and wide.feature_shape == (8, 3, 2)
    assert [name for name, _ in wide.named_modules() if name.startswith("norms.")] == ["norms.0", "norms.1", "norms.2"]


def test_models_are_seeded_without_touching_the_global_rng():
    state = torch.get_rng_state()
    for build in (lambda s: MLP(6, 2, 16, 2, seed=s), lambda s: CNN(seed=s)):
        first, again, other = build(0), build(0), build(1)
        for (name, a), b, c in zip(first.named_parameters(), again.parameters(), other.parameters()):
            assert torch.equal(a, b), name
        assert not all(torch.equal(a, c) for a, c in zip(first.parameters(), other.parameters()))
    assert torch.equal(torch.get_rng_state(), state)
    torch.manual_seed(3)  # without a seed, the global RNG decides, as for any nn.Module
    a = MLP(6, 2, 16, 2)
    torch.manual_seed(3)
    assert torch.equal(a.layers[0].weight, MLP(6, 2, 16, 2).layers[0].weight)


@pytest.mark.parametrize(
    "make, error, match",
    [
        (lambda: MLP(8, 1, width=0), ValueError, "width must be at least 1, got 0"),
        (lambda: MLP(8, 1, depth=-1), ValueError, "depth must be at least 0"),
        (lambda: MLP(0, 1), ValueError, "input_dim must be at least 1"),
        (lambda: MLP(8, 1, width=2.5), TypeError, "width must be an integer"),
        (lambda: MLP(8, 1, activation="relux"), ValueError, "activation must be one of 'relu', 'tanh', 'gelu'"),
        (lambda: MLP(8, 1, parametrization="mup"), ValueError, "parametrization must be one of 'ntk', 'standard'"),
        (lambda: MLP(8, 1, sigma_w=0.0), ValueError, "sigma_w must be positive"),
        (lambda: MLP(8, 1, sigma_b=-1.0), ValueError, "sigma_b must be at least 0"),
        (lambda: MLP(8, 1, bias="yes"), TypeError, "bias must be True or False"),
        (lambda: MLP(8, 1, seed=-3), ValueError, "seed must be at least 0"),
        (lambda: CNN(kernel_size=0), ValueError, "kernel_size must be at least 1"),
        (lambda: CNN(channels=()), ValueError, "channels must list at least one"),
        (lambda: CNN(channels=(4, 0)), ValueError, r"channels\[1\] must be at least 1"),
        (lambda: CNN(image_size=(8, 8, 8)), ValueError, r"image_size must be an int or an \(H, W\) pair"),
    ],
)
def test_bad_values_name_the_argument(make, error, match):
    with pytest.raises(error, match=match):
        make()


# --------------------------------------------------------------------------- registry


@pytest.fixture(scope="module")
def split() -> DataSplit:
    return digits(test_size=100)


def test_build_fills_sizes_from_the_data(split):
    mlp = models.build("mlp", data=split, width=16, depth=1, seed=0)
    assert (mlp.input_dim, mlp.output_dim) == (64, 10) and mlp(split.x_test).shape == (100, 10)
    cnn = models.build("cnn", data=split, channels=[4])
    assert (cnn.in_channels, cnn.image_size, cnn.num_classes) == (1, (8, 8), 10)
    images = digits(test_size=100, images=True)
    assert models.build("cnn", data=images)(images.x_test).shape == (100, 10)
    assert models.build("mlp", data=split, output_dim=3).output_dim == 3  # options win
    assert models.build("mlp", input_dim=5, output_dim=2, seed=0)(torch.randn(1, 5)).shape == (1, 2)


def test_build_unknown_model_and_option(split):
    with pytest.raises(ValueError, match=r"unknown model 'resnet'; valid names: cnn, conv_spotter, gru_spotter, mlp"):
        models.build("resnet", data=split)
    with pytest.raises(TypeError, match=r"unknown option 'widht' for model 'mlp'; valid options: input_dim, output_dim, width"):
        models.build("mlp", data=split, widht=10)


USER_MODULE = """
import torch
from torch import nn


def two_layer(input_dim, output_dim, hidden=7):
    return nn.Sequential(nn.Linear(input_dim, hidden), nn.Tanh(), nn.Linear(hidden, output_dim))


class Tied(nn.Module):
    def __init__(self, size=4):
        super().__init__()
        self.encode = nn.Linear(size, size, bias=False)
        self.decode = nn.Linear(size, size, bias=False)
        self.decode.weight = self.encode.weight
        self.scale = nn.Parameter(torch.ones(()))

    def forward(self, x):
        return self.scale * self.decode(self.encode(x))


def not_a_module():
    return "mlp"
"""


@pytest.fixture(scope="module")
def user_module(tmp_path_factory):
    folder = tmp_path_factory.mktemp("user_models")
    (folder / "ntk_user_models.py").write_text(textwrap.dedent(USER_MODULE))
    sys.path.insert(0, str(folder))
    yield "ntk_user_models"
    sys.path.remove(str(folder))
    sys.modules.pop("ntk_user_models", None)


def test_custom_factory_by_import_path(user_module, split):
    model = models.build(f"{user_module}:two_layer", data=split, hidden=5)
    assert model(split.x_test).shape == (100, 10) and model[0].out_features == 5
    assert isinstance(models.custom(f"{user_module}:Tied", size=3), nn.Module)


@pytest.mark.parametrize(
    "path, error, match",
    [
        ("ntk_user_models.two_layer", ValueError, "path must look like \"package.module:factory\""),
        ("ntk_no_such_module_xyz:mlp", ImportError, "cannot import module 'ntk_no_such_module_xyz'"),
        ("{m}:missing", AttributeError, "'{m}' has no attribute 'missing'"),
        ("{m}:not_a_module", TypeError, "returned a str, not a torch.nn.Module"),
    ],
)
def test_custom_factory_errors(user_module, path, error, match):
    with pytest.raises(error, match=match.format(m=user_module)):
        models.custom(path.format(m=user_module))


def test_custom_factory_unknown_option(user_module):
    with pytest.raises(TypeError, match="unknown option 'depth' for model factory .*valid options: input_dim, output_dim, hidden"):
        models.build(f"{user_module}:two_layer", input_dim=2, output_dim=1, depth=3)


# --------------------------------------------------------------------------- summary


def test_summary_counts_parameters_per_module():
    mlp = MLP(64, 10, width=32, depth=1, seed=0)
    mlp.layers[0].bias.requires_grad_(False)
    info = models.summary(mlp)
    assert info["class"] == "MLP" and info["class_path"] == "ntk_torch.models.MLP"
    assert info["modules"] == {"layers.0": 64 * 32 + 32, "layers.1": 32 * 10 + 10}
    assert info["parameters"] == 64 * 32 + 32 + 32 * 10 + 10 == sum(p.numel() for p in mlp.parameters())
    assert info["trainable"] == info["parameters"] - 32
    assert info["config"]["width"] == 32 and info["config"]["parametrization"] == "ntk"
    json.dumps(info)
    # BatchNorm2d: running_mean and running_var (C each) and num_batches_tracked
    assert models.summary(CNN(batch_norm=True, seed=0))["buffers"] == (16 + 16 + 1) + (32 + 32 + 1)


def test_summary_counts_tied_weights_once(user_module):
    tied = models.custom(f"{user_module}:Tied", size=4)
    info = models.summary(tied)
    assert info["parameters"] == 16 + 1
    assert info["modules"] == {"(root)": 1, "encode": 16}
    assert "config" not in info
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        models.summary(np.zeros(3))


@pytest.mark.parametrize("mode", ["full", "trace", "diagonal"])
@pytest.mark.parametrize("bias", [True, False])
def test_structured_rule_for_ntk_linear_is_exact(mode, bias):
    """NTKLinear has its own structured rule: no parameter falls back, and the kernel
    equals the Jacobian engine's in float64."""
    from ntk_torch.kernel import explain

    model = MLP(5, 3, width=16, depth=2, parametrization="ntk", bias=bias, sigma_b=0.3, seed=0).double()
    x = torch.randn(6, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    x2 = torch.randn(4, 5, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    assert "fall back" not in str(explain(model, x, mode=mode, method="structured"))
    for second in (None, x2):
        structured = ntk_torch.empirical_ntk(model, x, second, mode=mode, method="structured", per_layer=True)
        jacobian = ntk_torch.empirical_ntk(model, x, second, mode=mode, method="jacobian", per_layer=True)
        for group in jacobian:
            torch.testing.assert_close(structured[group], jacobian[group], rtol=1e-10, atol=1e-12)
