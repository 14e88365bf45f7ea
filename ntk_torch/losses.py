r"""One loss model: the training loss as the tracker evaluates it and the predictions use it.

A :class:`Loss` is what ``loss=`` names anywhere in ntk_torch (the tracker, ``predict``,
configs): ``"cross_entropy"`` (:class:`torch.nn.CrossEntropyLoss`, mean over examples),
``"mse"`` (:class:`torch.nn.MSELoss`, mean over every entry), an instance of one of those
two modules, or any callable ``loss(output, y) -> scalar``. It provides

* ``fn(output, y)``: the loss on the model's outputs ``(N, *out)``, as the user trains;
* ``value(f, y)``, ``gradient(f, y)`` and ``curvature(N, O)``: the loss in *function space*,
  on outputs flattened to ``f`` of shape ``(N, O)``, for the linearised dynamics
  (:mod:`ntk_torch.predict`): closed forms for ``"mse"``
  (:math:`\nabla_f L = 2 (f - y) / (N O)`, Hessian :math:`2 I / (N O)`) and
  ``"cross_entropy"`` (:math:`\nabla_{f_i} L = (p_i - y_i) / N`, Hessian eigenvalues at most
  :math:`1 / (2N)`), :func:`torch.func.grad` for the rest;
* :meth:`Loss.check_targets`: labels checked against the outputs, naming the argument;
* :meth:`Loss.class_labels`: the labels an accuracy is scored against, when there are classes.

The two modules are recognised: with PyTorch's defaults (mean reduction, no class weights
or label smoothing) an ``nn.CrossEntropyLoss()`` is ``"cross_entropy"`` and an
``nn.MSELoss()`` is ``"mse"``; with other settings they keep their kind (for label
checks) and are differentiated by autograd.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Callable, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["CLASSIFICATION", "CROSS_ENTROPY", "KNOWN_LOSSES", "Loss", "LossArg", "MSE", "REGRESSION", "resolve"]

LossArg = Union[str, Callable[[Tensor, Tensor], Tensor]]

KNOWN_LOSSES: Tuple[str, ...] = ("mse", "cross_entropy")
"""The losses known by name (a callable ``loss(output, y)`` is accepted too)."""

CLASSIFICATION, REGRESSION = "classification", "regression"
"""The kinds of task a loss is for; a data set's ``task`` is one of them."""


@dataclass(frozen=True)
class Loss:
    """A training loss (see the module docstring).

    Attributes:
        name: ``"cross_entropy"``, ``"mse"``, or a description of the user's callable.
        fn: the loss on model outputs ``(N, *out)`` and targets, a scalar tensor.
        kind: ``"classification"`` (class labels), ``"regression"`` (float targets of the
            outputs' shape), or None (a custom loss: targets are not checked).
        closed_form: ``"mse"`` or ``"cross_entropy"`` when the closed-form gradient and
            curvature apply, else None.
        output_shape: the per-example output shape ``out`` that flat ``(N, O)`` outputs are
            reshaped to before a custom ``fn`` sees them (None: passed as they are).
    """

    name: str
    fn: Callable[[Tensor, Tensor], Tensor]
    kind: Optional[str] = None
    closed_form: Optional[str] = None
    output_shape: Optional[Tuple[int, ...]] = None

    # ------------------------------------------------------------------ function space

    def for_outputs(self, output_shape: Tuple[int, ...]) -> "Loss":
        """The loss for flat outputs ``(N, O)`` of a model whose outputs are ``(N, *output_shape)``."""
        return replace(self, output_shape=tuple(output_shape))

    def value(self, f: Tensor, y: Tensor) -> Tensor:
        """The loss of function-space outputs ``f`` ``(N, O)``."""
        if self.closed_form is None and self.output_shape is not None:
            f = f.reshape(f.shape[0], *self.output_shape)
        return self.fn(f, y)

    def gradient(self, f: Tensor, y: Tensor) -> Tensor:
        """``d value(f, y) / d f``, ``(N, O)``."""
        if self.closed_form == "mse":
            return 2.0 * (f - y) / f.numel()  # d/df mean((f - y)^2)
        if self.closed_form == "cross_entropy":
            # d/df_i of -sum_c y_ic log softmax(f_i)_c, averaged over N: (sum_c y_ic p_i - y_i) / N.
            p = torch.softmax(f, dim=-1)
            if y.is_floating_point():
                return (p * y.sum(dim=-1, keepdim=True) - y) / f.shape[0]
            return (p - F.one_hot(y, f.shape[-1]).to(p.dtype)) / f.shape[0]
        return torch.func.grad(self.value)(f, y)

    def curvature(self, n: int, n_outputs: int) -> Optional[float]:
        """An upper bound on the largest eigenvalue of the Hessian of ``value`` in ``f``
        for ``N`` examples of ``O`` outputs; None when unknown (custom losses).

        * mse: the Hessian of ``mean((f - y)^2)`` over ``N O`` entries is ``2 I / (N O)``.
        * cross_entropy: block diagonal with blocks ``(diag(p_i) - p_i p_i^T) / N``; for a
          unit ``u``, ``u^T (diag(p) - p p^T) u`` is the variance of ``u`` under ``p``, at
          most ``(max u - min u)^2 / 4 <= 1/2`` (Popoviciu), attained at
          ``p = (1/2, 1/2, 0, ...)``, ``u = (1, -1, 0, ...) / sqrt 2``. Probability
          targets scale the blocks by ``sum_c y_ic = 1``.
        """
        if self.closed_form == "mse":
            return 2.0 / (n * n_outputs)
        if self.closed_form == "cross_entropy":
            return 1.0 / (2.0 * n)
        return None

    # ------------------------------------------------------------------ targets

    def check_targets(self, y: Tensor, output: Tensor, name: str, *, probabilities: bool = True) -> Tensor:
        """``y`` checked against the outputs ``output`` ``(N, *out)`` of the same examples
        (or of some of them: only per-example shapes are compared), and cast for the loss.

        * classification: integer class labels ``(N, *out[1:])`` in ``[0, C)`` for
          ``C = out[0]`` classes, or (with ``probabilities``) class probabilities of the
          outputs' shape;
        * regression: float targets of the outputs' per-example shape;
        * custom losses: not checked (floating targets take the outputs' dtype).

        Raises:
            ValueError: naming ``name``, what it holds and what the loss needs.
        """
        if self.kind == CLASSIFICATION:
            return self._check_labels(y, output, name, probabilities)
        if self.kind == REGRESSION:
            return self._check_regression(y, output, name)
        return y.to(output.dtype) if y.is_floating_point() else y

    def _check_labels(self, y: Tensor, output: Tensor, name: str, probabilities: bool) -> Tensor:
        if output.dim() < 2:
            raise ValueError(
                f"loss={self.name!r} needs class scores of shape (N, C), but the outputs have "
                f"shape {tuple(output.shape)}"
            )
        classes, rest = output.shape[1], tuple(output.shape[2:])
        label_shape = "(N" + "".join(f", {d}" for d in rest) + ")"
        if y.is_floating_point() and probabilities and tuple(y.shape[1:]) == tuple(output.shape[1:]):
            return y.to(output.dtype)
        if y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
            also = f" or class probabilities of the outputs' shape (N, {classes}{''.join(f', {d}' for d in rest)})" \
                if probabilities else "; for float targets use loss='mse'"
            raise ValueError(
                f"{name} has labels of dtype {y.dtype} and shape {tuple(y.shape)} but loss="
                f"{self.name!r} needs integer class labels {label_shape} in [0, {classes}){also}"
            )
        if tuple(y.shape[1:]) != rest:
            raise ValueError(
                f"{name} has labels of shape {tuple(y.shape)} but loss={self.name!r} with outputs "
                f"(N, {classes}{''.join(f', {d}' for d in rest)}) needs labels of shape {label_shape}"
            )
        if y.numel():
            low, high = int(y.min()), int(y.max())
            if low < 0 or high >= classes:
                raise ValueError(
                    f"{name} has class label {low if low < 0 else high} but there are {classes} "
                    f"outputs (classes); loss={self.name!r} needs labels in [0, {classes})"
                )
        return y.long()

    def _check_regression(self, y: Tensor, output: Tensor, name: str) -> Tensor:
        expected = "(N" + "".join(f", {d}" for d in output.shape[1:]) + ")"
        if not y.is_floating_point():
            raise ValueError(
                f"{name} has labels of dtype {y.dtype} but loss={self.name!r} needs float targets "
                f"of the outputs' shape {expected}; for class labels use loss='cross_entropy' or "
                "one-hot encode them"
            )
        if tuple(y.shape[1:]) != tuple(output.shape[1:]):
            raise ValueError(
                f"{name} has targets of shape {tuple(y.shape)} but the outputs have shape "
                f"{tuple(output.shape)}; loss={self.name!r} compares them entry by entry, so the "
                f"targets must have the outputs' shape {expected}"
            )
        return y.to(output.dtype)

    def class_labels(self, y: Tensor, output: Tensor) -> Optional[Tensor]:
        """The class labels that an accuracy (argmax over dim 1 of ``output``) is scored
        against: integer labels ``(N, *out[1:])`` for ``C > 1`` class scores, or the argmax
        of class probabilities for a classification loss; None when ``y`` are no classes."""
        if output.dim() < 2 or output.shape[1] < 2:
            return None
        if y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
            if self.kind == CLASSIFICATION and y.shape == output.shape:
                return y.argmax(dim=1)
            return None
        return y if tuple(y.shape[1:]) == tuple(output.shape[2:]) else None


MSE = Loss("mse", F.mse_loss, REGRESSION, "mse")
CROSS_ENTROPY = Loss("cross_entropy", F.cross_entropy, CLASSIFICATION, "cross_entropy")
_BY_NAME = {MSE.name: MSE, CROSS_ENTROPY.name: CROSS_ENTROPY}


def _has_defaults(module: nn.Module) -> bool:
    """A loss module with PyTorch's defaults (mean reduction, no weights or smoothing)."""
    if getattr(module, "reduction", "mean") != "mean":
        return False
    if isinstance(module, nn.CrossEntropyLoss):
        return module.weight is None and module.label_smoothing == 0.0 and module.ignore_index == -100
    return True


def resolve(loss: Any) -> Loss:
    """The :class:`Loss` that ``loss`` names: a :class:`Loss`, ``"cross_entropy"``,
    ``"mse"``, an ``nn.CrossEntropyLoss`` / ``nn.MSELoss`` instance, or a callable
    ``loss(output, y)`` returning a scalar tensor.

    Raises:
        ValueError: an unknown name.
        TypeError: neither a name nor a callable.
    """
    if isinstance(loss, Loss):
        return loss
    if isinstance(loss, str):
        if loss in _BY_NAME:
            return _BY_NAME[loss]
        known = ", ".join(repr(k) for k in KNOWN_LOSSES)
        raise ValueError(f"loss must be one of {known} or a callable loss(f, y); got {loss!r}")
    if not callable(loss):
        raise TypeError(f"loss must be a string or a callable loss(f, y), got {type(loss).__name__}")
    for module_type, builtin in ((nn.CrossEntropyLoss, CROSS_ENTROPY), (nn.MSELoss, MSE)):
        if isinstance(loss, module_type):
            closed_form = builtin.closed_form if _has_defaults(loss) else None
            return Loss(repr(loss), loss, builtin.kind, closed_form)
    name = repr(loss) if isinstance(loss, nn.Module) else getattr(loss, "__name__", repr(loss))
    return Loss(name, loss)
