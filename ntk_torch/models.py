r"""Built-in models: an MLP in NTK or standard parametrisation, a small CNN, and the keyword
spotters of :mod:`ntk_torch.spotters` (``conv_spotter``, ``gru_spotter``).

``build(name, data=None, **options)`` is what configs use; with ``data`` (a
:class:`~ntk_torch.data.DataSplit`) the input and output sizes are read from the data. A
name of the form ``"package.module:factory"`` calls that factory instead (see
:func:`custom`). :func:`summary` describes any model for run metadata.

Parametrisations of a dense layer with fan-in :math:`n` (Jacot et al. 2018; Lee et al.
2019; Sohl-Dickstein et al. 2020, "On the infinite width limit of neural networks with a
standard parameterization"):

==============  ===========================================================  ==================
name            layer                                                        initialisation
==============  ===========================================================  ==================
``"ntk"``       :math:`\frac{\sigma_w}{\sqrt n} W x + \sigma_b b`           :math:`W, b \sim \mathcal N(0, 1)`
``"standard"``  :math:`W x + b`                                              :math:`W \sim \mathcal N(0, \sigma_w^2/n)`, :math:`b \sim \mathcal N(0, \sigma_b^2)`
==============  ===========================================================  ==================

Both give the same function at initialisation (in distribution), but not the same
training dynamics: in NTK parametrisation the empirical NTK converges to a deterministic
limit as the width grows (and changes less and less during training, by
:math:`O(1/\sqrt{n})`), while in standard parametrisation it grows linearly with the width.
"""

from __future__ import annotations

import inspect
import math
from types import MappingProxyType
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn import init

from ._options import (
    check_choice,
    check_int,
    check_options,
    check_real,
    import_object,
    initialisation_rng,
    is_import_path,
    lookup,
)
from .functional import group_of
from .spotters import ConvSpotter, GRUSpotter
from .kernel.rules import DenseFeatures, KroneckerTerm, Term, register_rule

__all__ = [
    "ACTIVATIONS",
    "CNN",
    "MLP",
    "MODELS",
    "PARAMETRIZATIONS",
    "Erf",
    "NTKLinear",
    "build",
    "custom",
    "summary",
]


MAX_PARAMETERS = 2**30
"""The most parameters a built-in model is built with: 2**30 (about 1.07e9) is 4 GiB of
float32 weights before gradients and optimizer state (which triple it) and far beyond
what the empirical NTK of a probe set can be tracked for; the count is checked from the
options before anything is allocated, so a typo (``width: 1e9``) fails at once instead of
exhausting the machine's memory."""


def _check_parameter_count(model: str, count: int, options: Mapping[str, Any]) -> None:
    if count > MAX_PARAMETERS:
        given = ", ".join(f"{key}={value}" for key, value in options.items())
        raise ValueError(
            f"{model} with {given} would have {count:,} parameters, more than the {MAX_PARAMETERS:,} "
            "(2**30, 4 GiB of float32 weights) a built-in model is built with"
        )


class Erf(nn.Module):
    r""":math:`\operatorname{erf}(x)`, the sigmoid-like activation whose infinite-width
    kernels have a closed form (Williams 1997)."""

    def forward(self, x: Tensor) -> Tensor:
        return torch.erf(x)


ACTIVATIONS: Mapping[str, Callable[[], nn.Module]] = MappingProxyType(
    {
        "relu": nn.ReLU,
        "tanh": nn.Tanh,
        "gelu": nn.GELU,
        "erf": Erf,
        "silu": nn.SiLU,
        "softplus": nn.Softplus,
        "sigmoid": nn.Sigmoid,
        "identity": nn.Identity,
    }
)
"""Activation names accepted by the built-in models."""

PARAMETRIZATIONS = ("ntk", "standard")


def _activation(name: Any) -> nn.Module:
    return ACTIVATIONS[check_choice("activation", name, ACTIVATIONS)]()


# --------------------------------------------------------------------------- NTKLinear


class NTKLinear(nn.Module):
    r"""A dense layer in NTK parametrisation (Jacot et al. 2018):

    .. math::
        y = \frac{\sigma_w}{\sqrt{n_\text{in}}}\, x W^\top + \sigma_b\, b,
        \qquad W_{ij}, b_i \sim \mathcal N(0, 1).

    The scales live in the forward pass, not in the parameters, so every parameter has a
    unit-scale gradient and the empirical NTK has a width-independent limit. The
    parameters are named ``weight`` ``(out_features, in_features)`` and ``bias``
    ``(out_features,)`` as in ``nn.Linear``.

    Shapes: input ``(*, in_features)``, output ``(*, out_features)``.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        sigma_w: float = 1.0,
        sigma_b: float = 0.1,
    ):
        super().__init__()
        self.in_features = check_int("in_features", in_features, minimum=1)
        self.out_features = check_int("out_features", out_features, minimum=1)
        self.sigma_w = check_real("sigma_w", sigma_w, positive=True)
        self.sigma_b = check_real("sigma_b", sigma_b, minimum=0.0)
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        init.normal_(self.weight)
        if self.bias is not None:
            init.normal_(self.bias)

    def forward(self, x: Tensor) -> Tensor:
        y = F.linear(x, self.weight) * (self.sigma_w / math.sqrt(self.in_features))
        if self.bias is not None:
            y = y + self.sigma_b * self.bias
        return y

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, sigma_w={self.sigma_w}, sigma_b={self.sigma_b}"
        )


@register_rule([NTKLinear])
def _ntk_linear_rule(module: NTKLinear, x: Tensor, cotangent: Tensor) -> Dict[str, Term]:
    """The structured-engine rule for :class:`NTKLinear`: ``nn.Linear``'s rule with the
    features scaled, ``J_W = sum_t G_t (c_w x_t)^T`` and ``J_b = sum_t c_b G_t`` with
    ``c_w = sigma_w / sqrt(n_in)``, ``c_b = sigma_b`` (the bias is the weight of the
    constant feature ``c_b``)."""
    n, o = cotangent.shape[:2]
    scale = module.sigma_w / math.sqrt(module.in_features)
    features = DenseFeatures(x.reshape(n, 1, -1, module.in_features) * scale)
    u = cotangent.reshape(n, o, 1, -1, module.out_features)
    constant = features.values.new_full((), module.sigma_b).expand(*features.values.shape[:3], 1)
    return {"weight": KroneckerTerm(features, u), "bias": KroneckerTerm(DenseFeatures(constant), u)}


def _standard_linear(fan_in: int, fan_out: int, bias: bool, sigma_w: float, sigma_b: float) -> nn.Linear:
    """``nn.Linear`` with :math:`W \\sim N(0, \\sigma_w^2 / n_{in})`, :math:`b \\sim N(0, \\sigma_b^2)`."""
    layer = torch.nn.utils.skip_init(nn.Linear, fan_in, fan_out, bias=bias)
    init.normal_(layer.weight, std=sigma_w / math.sqrt(fan_in))
    if layer.bias is not None:
        init.normal_(layer.bias, std=sigma_b)
    return layer


# --------------------------------------------------------------------------- MLP


class MLP(nn.Module):
    r"""A fully connected network with ``depth`` hidden layers of ``width`` units:

    .. math::
        h_0 = x,\quad h_{l} = \phi(\mathrm{layers}_{l-1}(h_{l-1})),\ l = 1..\mathrm{depth},
        \quad f(x) = \mathrm{layers}_{\mathrm{depth}}(h_\mathrm{depth}),

    each layer in the chosen parametrisation (see the module docstring): with
    ``parametrization="ntk"`` an :class:`NTKLinear`, and as the width grows the output at
    initialisation tends to a Gaussian process and the empirical NTK to its deterministic
    infinite-width limit (Jacot et al. 2018; Lee et al. 2019); with ``"standard"`` an
    ``nn.Linear`` initialised :math:`W \sim \mathcal N(0, \sigma_w^2/n_\text{in})`,
    :math:`b \sim \mathcal N(0, \sigma_b^2)` (LeCun-normal at :math:`\sigma_w = 1`).

    The layers are ``layers.0`` (input) to ``layers.{depth}`` (readout), the module paths
    that per-layer kernels are keyed by; ``depth=0`` is a linear model.

    Args:
        input_dim: features per example; inputs ``(N, input_dim)``, or ``(N, *shape)`` with
            ``prod(shape) == input_dim`` (flattened, e.g. ``(N, 1, 8, 8)`` images).
        output_dim: outputs per example: ``(N, output_dim)``.
        width: hidden units per layer, ``>= 1``.
        depth: hidden layers, ``>= 0``.
        activation: a name in :data:`ACTIVATIONS` (``"relu"``, ``"tanh"``, ``"gelu"``,
            ``"erf"``, ...), applied after every hidden layer.
        parametrization: ``"ntk"`` (default) or ``"standard"``.
        bias: whether the layers have biases.
        sigma_w: the weight scale :math:`\sigma_w > 0` (``sqrt(2)`` keeps ReLU
            pre-activations at unit scale through depth).
        sigma_b: the bias scale :math:`\sigma_b \ge 0`; 0.1 is Jacot et al.'s choice. In
            NTK parametrisation ``sigma_b=0`` leaves the biases without gradient.
        seed: draw the initial parameters from ``torch.manual_seed(seed)`` without changing
            the global RNG state; ``None`` uses the global RNG like any PyTorch module.
    """

    def __init__(
        self,
        input_dim: int,
        output_dim: int,
        width: int = 256,
        depth: int = 2,
        *,
        activation: str = "relu",
        parametrization: str = "ntk",
        bias: bool = True,
        sigma_w: float = 1.0,
        sigma_b: float = 0.1,
        seed: Optional[int] = None,
    ):
        super().__init__()
        self.input_dim = check_int("input_dim", input_dim, minimum=1)
        self.output_dim = check_int("output_dim", output_dim, minimum=1)
        width = check_int("width", width, minimum=1)
        depth = check_int("depth", depth, minimum=0)
        check_choice("parametrization", parametrization, PARAMETRIZATIONS)
        if not isinstance(bias, bool):
            raise TypeError(f"bias must be True or False, got {bias!r}")
        sigma_w = check_real("sigma_w", sigma_w, positive=True)
        sigma_b = check_real("sigma_b", sigma_b, minimum=0.0)
        activation_module = _activation(activation)
        self.config: Dict[str, Any] = dict(
            input_dim=input_dim, output_dim=output_dim, width=width, depth=depth,
            activation=activation, parametrization=parametrization, bias=bias,
            sigma_w=sigma_w, sigma_b=sigma_b, seed=seed,
        )

        sizes = [input_dim] + [width] * depth + [output_dim]
        count = sum(n_in * n_out + (n_out if bias else 0) for n_in, n_out in zip(sizes[:-1], sizes[1:]))
        _check_parameter_count("MLP", count, dict(input_dim=input_dim, width=width, depth=depth, output_dim=output_dim))
        with initialisation_rng(seed):
            if parametrization == "ntk":
                layers: List[nn.Module] = [
                    NTKLinear(n_in, n_out, bias, sigma_w=sigma_w, sigma_b=sigma_b)
                    for n_in, n_out in zip(sizes[:-1], sizes[1:])
                ]
            else:
                layers = [
                    _standard_linear(n_in, n_out, bias, sigma_w, sigma_b)
                    for n_in, n_out in zip(sizes[:-1], sizes[1:])
                ]
        self.layers = nn.ModuleList(layers)
        self.activation = activation_module

    @classmethod
    def data_options(cls, data: Any, options: Mapping[str, Any]) -> Dict[str, Any]:
        """``input_dim`` and ``output_dim`` for the :class:`~ntk_torch.data.DataSplit`
        ``data``."""
        return {"input_dim": data.input_dim, "output_dim": data.output_dim}

    def forward(self, x: Tensor) -> Tensor:
        h = x.flatten(1) if x.dim() > 2 else x
        if h.dim() != 2 or h.shape[1] != self.input_dim:
            raise ValueError(
                f"MLP expects inputs (N, {self.input_dim}) (or (N, *shape) with "
                f"{self.input_dim} features), got shape {tuple(x.shape)}"
            )
        *hidden, readout = self.layers
        for layer in hidden:
            h = self.activation(layer(h))
        return readout(h)


# --------------------------------------------------------------------------- CNN


class CNN(nn.Module):
    r"""A small convolutional classifier for little images such as the 8x8 digits.

    ``len(channels)`` blocks ``conv -> [BatchNorm] -> activation``, each a
    ``kernel_size`` convolution with padding ``kernel_size // 2``; the first keeps the
    resolution and each later one halves it (stride 2). A linear ``head`` maps the
    flattened last feature map to ``num_classes`` outputs. For 8x8 digits and the default
    ``channels=(16, 32)``: ``(N, 1, 8, 8) -> (N, 16, 8, 8) -> (N, 32, 4, 4) -> (N, 10)``.

    Layers are ``nn.Conv2d`` / ``nn.Linear`` with PyTorch's default initialisation (standard
    parametrisation), named ``convs.{i}``, ``norms.{i}`` and ``head``.

    Args:
        in_channels: ``C``, channels per image.
        num_classes: outputs per example.
        image_size: ``H = W`` or ``(H, W)``.
        channels: output channels of each convolutional block (at least one).
        kernel_size: the convolutions' kernel size.
        activation: a name in :data:`ACTIVATIONS`.
        batch_norm: a ``BatchNorm2d`` after each convolution.
        seed: as for :class:`MLP`.

    Inputs are ``(N, C, H, W)``, or flattened ``(N, C*H*W)`` (as :func:`ntk_torch.data.digits`
    gives by default), which are reshaped to ``(N, C, H, W)``. Output ``(N, num_classes)``.
    """

    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = 10,
        image_size: Union[int, Sequence[int]] = 8,
        channels: Union[int, Sequence[int]] = (16, 32),
        *,
        kernel_size: int = 3,
        activation: str = "relu",
        batch_norm: bool = False,
        seed: Optional[int] = None,
    ):
        super().__init__()
        self.in_channels = check_int("in_channels", in_channels, minimum=1)
        self.num_classes = check_int("num_classes", num_classes, minimum=1)
        self.image_size = _pair("image_size", image_size)
        channels = _channels(channels)
        kernel_size = check_int("kernel_size", kernel_size, minimum=1)
        if not isinstance(batch_norm, bool):
            raise TypeError(f"batch_norm must be True or False, got {batch_norm!r}")
        activation_module = _activation(activation)
        self.config: Dict[str, Any] = dict(
            in_channels=in_channels, num_classes=num_classes, image_size=list(self.image_size),
            channels=list(channels), kernel_size=kernel_size, activation=activation,
            batch_norm=batch_norm, seed=seed,
        )

        _check_parameter_count("CNN", _cnn_parameters(in_channels, num_classes, self.image_size, channels,
                                                      kernel_size, batch_norm),
                               dict(in_channels=in_channels, image_size=list(self.image_size), channels=list(channels),
                                    kernel_size=kernel_size, num_classes=num_classes))
        height, width = self.image_size
        convs, norms = [], []
        with initialisation_rng(seed):
            for index, (c_in, c_out) in enumerate(zip((in_channels,) + channels[:-1], channels)):
                stride = 1 if index == 0 else 2
                padding = kernel_size // 2
                convs.append(nn.Conv2d(c_in, c_out, kernel_size, stride=stride, padding=padding))
                norms.append(nn.BatchNorm2d(c_out))
                # (s + 2p - k) // stride + 1 >= 1 for p = k // 2: never an empty map
                height = (height + 2 * padding - kernel_size) // stride + 1
                width = (width + 2 * padding - kernel_size) // stride + 1
            self.convs = nn.ModuleList(convs)
            self.norms = nn.ModuleList(norms) if batch_norm else None
            self.head = nn.Linear(channels[-1] * height * width, num_classes)
        self.activation = activation_module
        self.feature_shape = (channels[-1], height, width)

    @classmethod
    def data_options(cls, data: Any, options: Mapping[str, Any]) -> Dict[str, Any]:
        """``in_channels``, ``image_size`` and ``num_classes`` for the
        :class:`~ntk_torch.data.DataSplit` ``data``: from ``(C, H, W)`` inputs, or from flat
        inputs of a square image with ``in_channels`` (default 1) channels."""
        shape = tuple(data.input_shape)
        found: Dict[str, Any] = {"num_classes": data.output_dim}
        if len(shape) == 3:
            found.update(in_channels=shape[0], image_size=list(shape[1:]))
        elif len(shape) == 1:
            c = options.get("in_channels", 1)
            side = math.isqrt(shape[0] // c) if isinstance(c, int) and c >= 1 else 0
            if side and c * side * side == shape[0]:
                found.update(in_channels=c, image_size=side)
        return found

    def forward(self, x: Tensor) -> Tensor:
        c, (h, w) = self.in_channels, self.image_size
        if x.dim() == 2 and x.shape[1] == c * h * w:
            x = x.reshape(x.shape[0], c, h, w)
        elif x.dim() != 4 or tuple(x.shape[1:]) != (c, h, w):
            raise ValueError(
                f"CNN expects inputs (N, {c}, {h}, {w}) or flattened (N, {c * h * w}), got "
                f"shape {tuple(x.shape)}"
            )
        for index, conv in enumerate(self.convs):
            x = conv(x)
            if self.norms is not None:
                x = self.norms[index](x)
            x = self.activation(x)
        return self.head(x.flatten(1))


def _cnn_parameters(
    in_channels: int, num_classes: int, image_size: Tuple[int, int], channels: Tuple[int, ...],
    kernel_size: int, batch_norm: bool,
) -> int:
    """The parameter count of the :class:`CNN` these options build (before building it)."""
    height, width = image_size
    count = 0
    for index, (c_in, c_out) in enumerate(zip((in_channels,) + channels[:-1], channels)):
        stride, padding = (1 if index == 0 else 2), kernel_size // 2
        count += c_in * c_out * kernel_size**2 + c_out + (2 * c_out if batch_norm else 0)
        height = (height + 2 * padding - kernel_size) // stride + 1
        width = (width + 2 * padding - kernel_size) // stride + 1
    return count + channels[-1] * height * width * num_classes + num_classes


def _pair(name: str, value: Any) -> Tuple[int, int]:
    if isinstance(value, (tuple, list)):
        if len(value) != 2:
            raise ValueError(f"{name} must be an int or an (H, W) pair, got {value!r}")
        return check_int(f"{name}[0]", value[0], minimum=1), check_int(f"{name}[1]", value[1], minimum=1)
    size = check_int(name, value, minimum=1)
    return size, size


def _channels(value: Any) -> Tuple[int, ...]:
    if not isinstance(value, (tuple, list)):
        value = (value,)
    if not value:
        raise ValueError("channels must list at least one block's channels, got an empty sequence")
    return tuple(check_int(f"channels[{i}]", c, minimum=1) for i, c in enumerate(value))


# --------------------------------------------------------------------------- custom, registry


def custom(path: str, /, **kwargs: Any) -> nn.Module:
    """The model returned by the factory at import path ``"package.module:factory"`` (a
    function or an ``nn.Module`` class), called with ``**kwargs``.

    Raises:
        ValueError: ``path`` is malformed.
        ImportError / AttributeError: the module cannot be imported / lacks the factory.
        TypeError: an option the factory does not take, or it does not return an
            ``nn.Module``.
    """
    return _call_factory(path, import_object(path, "factory"), kwargs)


def _call_factory(path: str, factory: Callable[..., Any], options: Mapping[str, Any]) -> nn.Module:
    check_options(factory, options, f"model factory {path!r}")
    model = factory(**options)
    if not isinstance(model, nn.Module):
        raise TypeError(f"{path} returned a {type(model).__name__}, not a torch.nn.Module")
    return model


MODELS: Mapping[str, type] = MappingProxyType(
    {"cnn": CNN, "conv_spotter": ConvSpotter, "gru_spotter": GRUSpotter, "mlp": MLP}
)
"""The built-in models by name (read-only)."""

_CUSTOM_SHAPE_OPTIONS = ("input_dim", "input_shape", "output_dim", "num_classes")


def build(name: str, data: Any = None, **options: Any) -> nn.Module:
    """The model ``name`` built with ``options``, as configs ask for it
    (``model: {name: mlp, options: {width: 512}}`` -> ``build("mlp", data=split, width=512)``).

    ``name`` is a key of :data:`MODELS` or an import path ``"package.module:factory"``
    (see :func:`custom`). With ``data`` (a :class:`~ntk_torch.data.DataSplit`), the sizes
    the data determines are filled in unless given in ``options``: ``input_dim`` and
    ``output_dim`` for ``"mlp"``; ``in_channels``, ``image_size`` and ``num_classes`` for
    ``"cnn"``; and for a factory, whichever of ``input_dim``, ``input_shape``,
    ``output_dim`` and ``num_classes`` (classification only) it takes by name.

    Raises:
        ValueError: an unknown name or a bad value (each listing the valid ones).
        TypeError: an unknown option (listing the valid ones) or a value of the wrong type.
    """
    if is_import_path(name):
        factory = import_object(name, "factory")
        if data is not None:
            accepted = inspect.signature(factory).parameters
            found = {
                "input_dim": data.input_dim,
                "input_shape": tuple(data.input_shape),
                "output_dim": data.output_dim,
            }
            if data.num_classes is not None:
                found["num_classes"] = data.num_classes
            options = {**{k: v for k, v in found.items() if k in accepted}, **options}
        return _call_factory(name, factory, options)
    model_class = lookup(MODELS, name, "model")
    check_options(model_class, options, f"model {name!r}")
    if data is not None:
        options = {**model_class.data_options(data, options), **options}
    return model_class(**options)


# --------------------------------------------------------------------------- summary


def summary(model: nn.Module) -> Dict[str, Any]:
    """A JSON-serialisable description of ``model`` for run metadata.

    Returns:
        ``{"class": class name, "class_path": "module.Class", "parameters": count, "trainable": count with
        requires_grad, "buffers": buffer elements, "modules": {module path: parameter
        count}, "config": constructor options}``. Counts are of scalar entries; a tied
        tensor counts once, under the first module that owns it (as the kernel's parameter
        groups); modules without parameters are left out, the root's own are under
        ``"(root)"``. ``"config"`` is present for models with a ``config`` dict (the
        built-in ones).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    modules: Dict[str, int] = {}
    total = trainable = 0
    for name, parameter in model.named_parameters():  # each tied tensor once
        count = parameter.numel()
        total += count
        trainable += count if parameter.requires_grad else 0
        group = group_of(name)
        modules[group] = modules.get(group, 0) + count
    cls = type(model)
    result: Dict[str, Any] = {
        "class": cls.__qualname__,
        "class_path": f"{cls.__module__}.{cls.__qualname__}",
        "parameters": total,
        "trainable": trainable,
        "buffers": sum(buffer.numel() for buffer in model.buffers()),
        "modules": modules,
    }
    config = getattr(model, "config", None)
    if isinstance(config, dict):
        result["config"] = dict(config)
    return result
