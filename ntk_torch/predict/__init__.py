r"""Linearised training dynamics in function space (Lee et al. 2019).

A network linearised around its initial parameters :math:`\theta_0`,

.. math::  f_{lin}(x; \theta) = f(x; \theta_0) + J(x) (\theta - \theta_0),
           \qquad J(x) = \partial f(x; \theta) / \partial \theta \,|_{\theta_0},

has parameter gradients :math:`\nabla_\theta L = J^\top \nabla_f L` that all lie in the row
space of the training Jacobian :math:`J`. Gradient descent therefore stays in
:math:`\theta_0 + J^\top \mathbb{R}^{N O}`, and its whole trajectory in *function space* is
determined by the empirical NTK at initialisation :math:`K = J J^\top`:

.. math::  f_{t+1} = f_t - \eta K \nabla_f L(f_t),
           \qquad f^{test}_{t+1} = f^{test}_t - \eta K_{test,train} \nabla_f L(f_t)

(Lee et al. 2019, "Wide neural networks of any depth evolve as linear models under gradient
descent", eqs. 8-11). This package computes these trajectories, without parameters, from
the kernels alone: :class:`LinearisedDynamics` checks a problem once and answers every
question about it; :func:`gd`, :func:`gradient_flow`, :func:`kernel_regression` and
:func:`max_learning_rate` are its one-shot forms.

Conventions
-----------
* Kernels. ``full``: ``(N1, N2, O, O)`` with ``K[i, j, a, b] = <d f_a(x_i), d f_b(x_j)>``; it
  acts on function-space vectors ``v`` of shape ``(N2, O)`` as
  ``(K v)[i, a] = sum_{j, b} K[i, j, a, b] v[j, b]``, i.e. as its layout's matrix
  (:mod:`ntk_torch.layout`). ``trace``: ``(N1, N2)``, the sum over ``o`` of
  ``K[i, j, o, o]``; it is used as ``(K_trace / O) (x) I_O`` — the *isotropic
  approximation*, exact when the outputs are uncoupled and identically distributed, as for
  wide networks — and every result then carries ``approximation="isotropic"``.
* Outputs ``f`` are ``(N, O)``; ``f0_train``/``f0_test`` are the model's outputs at
  initialisation, evaluated in eval mode like the kernel.
* Losses follow PyTorch's mean reductions (:mod:`ntk_torch.losses`), so predictions are for
  the loss users train with: ``"mse"`` is ``nn.MSELoss()`` (mean over the ``N O`` entries,
  targets ``(N, O)``), ``"cross_entropy"`` is ``nn.CrossEntropyLoss()`` (mean over ``N``;
  integer labels ``(N,)`` or class probabilities ``(N, C)``), and a callable
  ``loss(f, y) -> scalar`` is differentiated in ``f`` with :func:`torch.func.grad`.
* ``lr``, ``momentum``, ``nesterov`` and ``weight_decay`` mean exactly what they mean in
  :class:`torch.optim.SGD` (dampening 0), and one step is one full-batch optimizer step.

Computation happens in the floating dtype of the kernel promoted with that of ``f0_train``;
pass float64 kernels for the most accurate long trajectories.
"""

from ..losses import KNOWN_LOSSES
from .dynamics import GDTrajectory, LinearisedDynamics, gd, gradient_flow, kernel_regression, max_learning_rate
from .problem import Prediction

__all__ = [
    "GDTrajectory",
    "KNOWN_LOSSES",
    "LinearisedDynamics",
    "Prediction",
    "gd",
    "gradient_flow",
    "kernel_regression",
    "max_learning_rate",
]
