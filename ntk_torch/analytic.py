r"""The infinite-width kernels of :class:`ntk_torch.models.MLP` in NTK parametrisation.

:func:`mlp_kernels` gives the NNGP :math:`\Sigma` (the covariance of each output at
initialisation) and the NTK :math:`\Theta` that the empirical kernels of an MLP with
``depth`` hidden layers converge to as the width grows (Jacot et al. 2018, "Neural Tangent
Kernel"; Lee et al. 2019, "Wide neural networks of any depth evolve as linear models";
Arora et al. 2019, "On exact computation with an infinitely wide neural net"). With
:math:`d` input features, weight scale :math:`\sigma_w` and bias scale :math:`\sigma_b`
(the layer :math:`\frac{\sigma_w}{\sqrt n} W h + \sigma_b b` of
:class:`~ntk_torch.models.NTKLinear`):

.. math::
    \Sigma^1(x, x') = \Theta^1(x, x') = \frac{\sigma_w^2}{d}\, x^\top x' + \sigma_b^2,

    \Sigma^{l+1} = \sigma_w^2\, \mathbb E[\phi(u)\phi(v)] + \sigma_b^2,\qquad
    \Theta^{l+1} = \Sigma^{l+1} + \sigma_w^2\, \mathbb E[\phi'(u)\phi'(v)]\; \Theta^l,

with :math:`(u, v) \sim \mathcal N(0, [[\Sigma^l(x,x), \Sigma^l(x,x')], [\Sigma^l(x,x'),
\Sigma^l(x',x')]])`, applied once per hidden layer (``depth`` times; ``depth=0`` is the
linear model). The expectations have closed forms:

* ``"relu"`` (the arc-cosine kernels of Cho & Saul 2009), with
  :math:`\cos\theta = \Sigma(x,x') / \sqrt{\Sigma(x,x)\Sigma(x',x')}`:
  :math:`\mathbb E[\phi(u)\phi(v)] = \frac{\sqrt{\Sigma(x,x)\Sigma(x',x')}}{2\pi}
  (\sin\theta + (\pi - \theta)\cos\theta)` and
  :math:`\mathbb E[\phi'(u)\phi'(v)] = \frac{\pi - \theta}{2\pi}`;
* ``"erf"`` (Williams 1997):
  :math:`\mathbb E[\phi(u)\phi(v)] = \frac 2\pi \arcsin\frac{2\Sigma(x,x')}
  {\sqrt{(1 + 2\Sigma(x,x))(1 + 2\Sigma(x',x'))}}` and
  :math:`\mathbb E[\phi'(u)\phi'(v)] = \frac 4\pi \left((1 + 2\Sigma(x,x))(1 + 2\Sigma(x',x'))
  - 4\Sigma(x,x')^2\right)^{-1/2}`;
* ``"identity"``: :math:`\Sigma(x,x')` and 1.

Conventions of :func:`~ntk_torch.empirical_ntk`: the kernels are **per output**. The
limit of the ``full`` kernel ``K[i, j, o, o']`` (``(N1, N2, O, O)``) is
``ntk[i, j] * (o == o')``; of ``diagonal`` (``(N1, N2, O)``) it is ``ntk[i, j]`` for each
output; of ``trace`` (``(N1, N2)``, summed over the outputs) it is ``O * ntk[i, j]``. The
bias of a network built with ``bias=False`` is the case ``bias_std=0``.
"""

from __future__ import annotations

import math
from typing import Callable, Dict, Optional, Tuple

import torch
from torch import Tensor

from ._options import check_choice, check_int, check_real
from .layout import Layout

__all__ = ["ACTIVATIONS", "mlp_kernels", "reference_kernel"]

_Expectations = Callable[[Tensor, Tensor, Tensor], Tuple[Tensor, Tensor]]


def _relu(cross: Tensor, var1: Tensor, var2: Tensor) -> Tuple[Tensor, Tensor]:
    """``(E[relu(u) relu(v)], E[step(u) step(v)])`` for the covariance ``cross`` and the
    variances ``var1``, ``var2`` of ``u`` and ``v`` (element-wise, broadcast). Where a
    variance is 0 the pre-activation is 0 and both expectations are 0 (``relu'(0) = 0`` in
    torch)."""
    norms = (var1 * var2).sqrt()
    positive = norms > 0
    cos = torch.where(positive, cross / torch.where(positive, norms, torch.ones_like(norms)), torch.zeros_like(norms))
    angle = torch.arccos(cos.clamp(-1.0, 1.0))
    value = norms * (torch.sin(angle) + (math.pi - angle) * cos) / (2 * math.pi)
    derivative = torch.where(positive, (math.pi - angle) / (2 * math.pi), torch.zeros_like(norms))
    return value, derivative


def _erf(cross: Tensor, var1: Tensor, var2: Tensor) -> Tuple[Tensor, Tensor]:
    """``(E[erf(u) erf(v)], E[erf'(u) erf'(v)])`` (Williams 1997), element-wise as :func:`_relu`."""
    scale = (1 + 2 * var1) * (1 + 2 * var2)
    value = 2 / math.pi * torch.arcsin((2 * cross / scale.sqrt()).clamp(-1.0, 1.0))
    determinant = (scale - 4 * cross**2).clamp_min(torch.finfo(cross.dtype).tiny)
    return value, 4 / math.pi * determinant.rsqrt()


def _identity(cross: Tensor, var1: Tensor, var2: Tensor) -> Tuple[Tensor, Tensor]:
    return cross, torch.ones_like(cross)


ACTIVATIONS: Dict[str, _Expectations] = {"relu": _relu, "erf": _erf, "identity": _identity}
"""The activations with closed-form infinite-width kernels."""


def _features(name: str, x: Tensor) -> Tensor:
    """``x`` as ``(N, d)`` float64 (``(N, *shape)`` flattened, as ``MLP`` does)."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of inputs (N, d), got {type(x).__name__}")
    if x.dim() < 2 or x.shape[0] == 0 or x[0].numel() == 0:
        raise ValueError(f"{name} must have shape (N, d) or (N, *shape) with N, d >= 1, got {tuple(x.shape)}")
    if not (x.is_floating_point() or x.dtype in (torch.int32, torch.int64)):
        raise TypeError(f"{name} must hold real numbers, got dtype {x.dtype}")
    flat = x.detach().flatten(1).to(torch.float64)
    if not bool(torch.isfinite(flat).all()):
        raise ValueError(f"{name} holds non-finite values")
    return flat


def mlp_kernels(
    x1: Tensor,
    x2: Optional[Tensor] = None,
    *,
    depth: int,
    activation: str = "relu",
    weight_std: float = 1.0,
    bias_std: float = 0.0,
) -> Dict[str, Tensor]:
    r"""The infinite-width NNGP and NTK of ``MLP(d, O, width, depth, activation=activation,
    sigma_w=weight_std, sigma_b=bias_std)`` in NTK parametrisation (see the module
    docstring for the recursion and its closed forms).

    Args:
        x1: inputs ``(N1, d)`` or ``(N1, *shape)`` (flattened to ``d = prod(shape)``).
        x2: inputs ``(N2, d)``; ``None`` for ``x1`` itself.
        depth: hidden layers, ``>= 0``.
        activation: ``"relu"``, ``"erf"`` or ``"identity"``.
        weight_std: :math:`\sigma_w > 0`.
        bias_std: :math:`\sigma_b \ge 0` (0 for a network without biases).

    Returns:
        ``{"nngp": Sigma, "ntk": Theta}``, each ``(N1, N2)``, per output: the ``full``
        empirical kernel tends to ``Theta[i, j] * delta(o, o')`` and the ``trace`` one to
        ``O * Theta``. Computed in float64 and returned in ``x1``'s floating dtype
        (float32 for integer inputs), on its device.
    """
    depth = check_int("depth", depth, minimum=0)
    expectations = ACTIVATIONS[check_choice("activation", activation, ACTIVATIONS)]
    sw2 = check_real("weight_std", weight_std, positive=True) ** 2
    sb2 = check_real("bias_std", bias_std, minimum=0.0) ** 2
    a = _features("x1", x1)
    b = a if x2 is None else _features("x2", x2)
    if b.shape[1] != a.shape[1]:
        raise ValueError(f"x2 must have the {a.shape[1]} features of x1, got {b.shape[1]} (shape {tuple(x2.shape)})")
    if x2 is not None and x2.device != x1.device:
        raise ValueError(f"x2 must be on x1's device {x1.device}, got {x2.device}")
    d = a.shape[1]
    sigma = sw2 * (a @ b.T) / d + sb2
    var1 = sw2 * (a * a).sum(1) / d + sb2
    var2 = var1 if x2 is None else sw2 * (b * b).sum(1) / d + sb2
    theta = sigma.clone()
    for _ in range(depth):
        value, derivative = expectations(sigma, var1[:, None], var2[None, :])
        var1 = sw2 * expectations(var1, var1, var1)[0] + sb2
        var2 = var1 if x2 is None else sw2 * expectations(var2, var2, var2)[0] + sb2
        sigma = sw2 * value + sb2
        theta = sigma + sw2 * derivative * theta
    dtype = x1.dtype if x1.is_floating_point() else torch.get_default_dtype()
    return {"nngp": sigma.to(dtype), "ntk": theta.to(dtype)}



def reference_kernel(model: torch.nn.Module, x: Tensor, layout: Layout, tracked: Dict[str, Tensor]) -> Tensor:
    """The infinite-width NTK of ``model`` on ``x`` in ``layout``: ``(N, N, O, O)``
    ``Theta delta_oo'`` (full), ``(N, N)`` ``O Theta`` (trace) or ``(N, N, O)`` (diagonal),
    in ``x``'s dtype, for the tracker's ``analytic_reference``.

    Raises:
        ValueError: ``model`` is not an ``ntk_torch.models.MLP`` in NTK parametrisation with
            an activation of :data:`ACTIVATIONS`, or ``tracked`` (the kernel's parameters)
            is not all of its parameters.
    """
    config = getattr(model, "config", None)
    is_mlp = type(model).__name__ == "MLP" and type(model).__module__ == "ntk_torch.models"
    if not (is_mlp and isinstance(config, dict) and config.get("parametrization") == "ntk"
            and config.get("activation") in ACTIVATIONS):
        raise ValueError("analytic_reference needs an ntk_torch.models.MLP in NTK parametrisation with activation "
                         f"{' / '.join(ACTIVATIONS)}, got {type(model).__name__}")
    if len(tracked) != len(list(model.parameters())):
        raise ValueError("analytic_reference needs the kernel of all the MLP's parameters (params=None)")
    bias_std = config["sigma_b"] if config["bias"] else 0.0
    theta = mlp_kernels(x, depth=config["depth"], activation=config["activation"], weight_std=config["sigma_w"],
                        bias_std=bias_std)["ntk"]
    o = config["output_dim"]
    eye = torch.eye(o, dtype=theta.dtype, device=theta.device)
    return layout.choose(full=theta[:, :, None, None] * eye, trace=o * theta,
                         diagonal=theta[:, :, None].expand(-1, -1, o).contiguous())
