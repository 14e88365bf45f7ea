r"""The linearised twin: the network linearised at step 0, trained like the network.

.. math::  f_{lin}(x; \theta) = f(x; \theta_0) + J(x; \theta_0)(\theta - \theta_0)

:class:`LinearisedTwin` holds :func:`ntk_torch.linearize` of the model at step 0 and trains
its parameters with a *clone of the user's optimizer*: the same class, the same parameter
groups (each real parameter mapped to the twin's of the same name) and hyperparameters,
and a copy of the optimizer's state at step 0. Before each of its steps it reads every
group's hyperparameters -- the learning rate above all -- from the real optimizer, so a
learning-rate scheduler (or anything else that changes them) is followed exactly; it clips
its gradients as the user does when told how (``clip_grad_norm`` / ``clip_grad_value``);
and it trains on the minibatches the tracker was shown (``NTKTracker.observe``), or on the
full batch of the forecast's training points.

This is the forecast for every optimizer in ``torch.optim`` that steps without a closure
(SGD, Adam, AdamW with or without amsgrad, RMSprop, Adagrad, ...), where the kernel forecast
(:mod:`ntk_torch.forecast`) covers full-batch SGD only. Its cost is that of training the
linearised network: one forward-mode product (``torch.func.jvp``) and its backward pass
per step, about two to three training steps of the network itself, and memory for the
twin's parameters, their initial values and its optimizer state (a few copies of the
model's parameters), whatever the number of steps.

The twin never touches the real model's parameters, buffers, ``.grad`` or optimizer state:
it owns copies of all of them, runs the model's forward in eval mode (as the kernels do:
BatchNorm on its running statistics at step 0, no Dropout) on its own tensors, and draws
from a fork of the RNG.
"""

from __future__ import annotations

import copy
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import nn

from . import records
from .functional import Inputs, map_inputs
from .linearize import LinearizedModel
from .losses import Loss
from .probe import EVAL_BATCH, LabelledSet, call_model, evaluate
from .steps import log_steps

__all__ = ["Batch", "LinearisedTwin", "twin_problems"]

Batch = Tuple[Inputs, torch.Tensor]
"""One ``(inputs, targets)`` minibatch."""

_NEEDS_CLOSURE = ("LBFGS",)
_SPARSE = ("SparseAdam",)


def twin_problems(optimizer: torch.optim.Optimizer, model: nn.Module) -> List[str]:
    """What keeps the twin from mirroring ``optimizer`` (empty when nothing does)."""
    name = type(optimizer).__name__
    if name in _NEEDS_CLOSURE:
        return [f"{name} re-evaluates the loss through a closure, which the twin does not have"]
    if name in _SPARSE:
        return [f"{name} needs sparse gradients; the twin's are dense"]
    owned = {id(p) for p in model.parameters()}
    foreign = sum(1 for group in optimizer.param_groups for p in group["params"] if id(p) not in owned)
    if foreign:
        return [f"the optimizer trains {foreign} tensors that are not parameters of the model"]
    return []


def _copy(value: Any) -> Any:
    """A hyperparameter's value, tensors copied (so the twin never shares one)."""
    return value.detach().clone() if isinstance(value, torch.Tensor) else copy.deepcopy(value)


class LinearisedTwin:
    """The network linearised at step 0, trained with a clone of the user's optimizer.

    Args:
        model: the module (unwrapped), at its step-0 parameters and buffers.
        optimizer: the user's optimizer, over parameters of ``model``.
        points: the training examples the forecast's train loss is measured on, and the
            full batch when no minibatches are given.
        test: optional test examples.
        loss: the training loss (the twin minimises it).
        output_fn: as for ``empirical_ntk``; applied to the twin's outputs.
        approximate_points: whether ``points`` is a subset of the training data.
        clip_grad_norm: clip the twin's gradients to this global 2-norm
            (``torch.nn.utils.clip_grad_norm_``), as the user clips the network's.
        clip_grad_value: clip each gradient entry to ``[-v, v]``
            (``torch.nn.utils.clip_grad_value_``); applied before ``clip_grad_norm``.

    Raises:
        ValueError: the optimizer cannot be mirrored (:func:`twin_problems`), or its class
            cannot be built from its parameter groups alone.
    """

    kind = "twin"

    def __init__(
        self,
        *,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        points: LabelledSet,
        test: Optional[LabelledSet],
        loss: Loss,
        output_fn: Optional[Callable[[Any], torch.Tensor]],
        approximate_points: bool,
        clip_grad_norm: Optional[float] = None,
        clip_grad_value: Optional[float] = None,
        call_kwargs: Optional[Mapping[str, Any]] = None,
    ) -> None:
        problems = twin_problems(optimizer, model)
        if problems:
            raise ValueError("; ".join(problems))
        self.points, self.test, self.loss, self.output_fn = points, test, loss, output_fn
        self.call_kwargs = call_kwargs
        self.approximate_points = approximate_points
        self.clip_grad_norm, self.clip_grad_value = clip_grad_norm, clip_grad_value
        self.network = LinearizedModel(model, forward_ad=True)
        self.device = next(self.network.parameters()).device
        self.optimizer = _clone(optimizer, model, self.network)
        self._trained = [p for group in self.optimizer.param_groups for p in group["params"]]
        self.batches = "full"
        """``"full"`` (the forecast's training points at every step) or ``"minibatch"``
        (the batches given to :meth:`step`), for the run's metadata."""
        self.step_count = 0
        self._initial = {"optimizer": type(optimizer).__name__, "lr": [float(g["lr"]) for g in optimizer.param_groups]}
        self._cached: Optional[Tuple[int, Dict[str, Optional[float]]]] = None
        self._log_steps = log_steps()
        self._log_next = next(self._log_steps)
        self._dense: Dict[int, Dict[str, Optional[float]]] = {}

    # ------------------------------------------------------------------ training

    def step(self, batches: Optional[Sequence[Batch]] = None, follow: Optional[torch.optim.Optimizer] = None) -> None:
        """One optimizer step of the twin.

        Args:
            batches: the minibatches of this step; their losses are averaged (one batch,
                or the micro-batches of gradient accumulation). None: the full batch of
                the forecast's points.
            follow: the real optimizer, whose groups' hyperparameters (learning rate,
                momentum, betas, weight decay, ...) the twin takes before stepping.
        """
        if follow is not None:
            self._follow(follow)
        self.optimizer.zero_grad(set_to_none=True)
        with torch.enable_grad():
            if batches:
                for x, y in batches:
                    self._backward(x, y, 1.0 / len(batches))
            else:
                for x, y in self.points.batches(EVAL_BATCH):
                    self._backward(x, y, y.shape[0] / len(self.points))
        if self.clip_grad_value is not None:
            nn.utils.clip_grad_value_(self._trained, self.clip_grad_value)
        if self.clip_grad_norm is not None:
            nn.utils.clip_grad_norm_(self._trained, self.clip_grad_norm)
        self.optimizer.step()
        self.step_count += 1
        while self._log_next < self.step_count:
            self._log_next = next(self._log_steps)
        if self.step_count == self._log_next:
            self.at(self.step_count)

    def _backward(self, x: Inputs, y: torch.Tensor, weight: float) -> None:
        """Accumulate ``weight * d loss(f_lin(x), y) / d theta`` into the twin's ``.grad``."""
        x = map_inputs(x, lambda t: t.to(self.device))
        value = self.loss.fn(call_model(self.network, x, self.output_fn, self.call_kwargs), y.to(self.device))
        (value * weight).backward()

    def _follow(self, optimizer: torch.optim.Optimizer) -> None:
        """Take every group's hyperparameters from the real optimizer (schedulers)."""
        for real, twin in zip(optimizer.param_groups, self.optimizer.param_groups):
            for key, value in real.items():
                if key == "params":
                    continue
                mine = twin.get(key)
                if isinstance(value, torch.Tensor):
                    if isinstance(mine, torch.Tensor) and mine.shape == value.shape:
                        mine.copy_(value)
                    else:
                        twin[key] = _copy(value)
                elif mine != value:
                    twin[key] = _copy(value)

    # ------------------------------------------------------------------ predictions

    def at(self, step: int) -> Dict[str, Optional[float]]:
        """The twin's ``train``/``test`` loss (and accuracies) now, under their predicted
        record field names; ``step`` is the step they belong to (the twin's own count)."""
        if self._cached is not None and self._cached[0] == step:
            return self._cached[1]
        with torch.no_grad():
            train = evaluate(self.network, self.points, self.loss, self.output_fn, self.device, self.call_kwargs)
            test = {} if self.test is None else evaluate(self.network, self.test, self.loss, self.output_fn, self.device,
                                                             self.call_kwargs)
        fields: Dict[str, Optional[float]] = {}
        for split, result in ((records.TRAIN, train), (records.TEST, test)):
            for metric in records.METRICS:
                if metric in train:
                    fields[records.predicted(split, metric)] = result.get(metric)
        self._cached = (step, fields)
        self._dense[step] = fields
        return fields

    def dense(self) -> Tuple[List[int], Dict[str, List[Optional[float]]]]:
        """The predictions recorded so far (at the log schedule's steps and wherever
        :meth:`at` was asked): the steps, and each field's values at them."""
        return records.columns(self._dense)

    def describe(self) -> Dict[str, Any]:
        """What the forecast is, for the run's metadata."""
        return {
            "kind": self.kind,
            "optimizer": self._initial["optimizer"],
            "lr": self._initial["lr"][0],
            "groups": len(self._initial["lr"]),
            "batches": self.batches,
            "points": len(self.points),
            "indices": list(self.points.indices) if self.approximate_points else None,
            "approximate": self.approximate_points,
            "clip_grad_norm": self.clip_grad_norm,
            "clip_grad_value": self.clip_grad_value,
            "assumes": "the network linearised at step 0, trained with a clone of the optimizer "
                       "(its class, groups and hyperparameters, the learning rate at every step)",
        }

    def max_learning_rate(self) -> Optional[float]:
        """Not known for the twin (it needs the kernel's spectrum): None."""
        return None


def _clone(
    optimizer: torch.optim.Optimizer, model: nn.Module, network: LinearizedModel
) -> torch.optim.Optimizer:
    """An optimizer of ``optimizer``'s class over the twin's parameters: the same groups
    and hyperparameters, and a copy of its state. Twin parameters the optimizer does not
    train stop requiring gradients."""
    names = {}
    for name, p in model.named_parameters():
        names.setdefault(id(p), name)
    twin = dict(network.named_parameters())
    groups, pairs = [], []
    for group in optimizer.param_groups:
        params = []
        for p in group["params"]:
            mine = twin.get(names[id(p)])
            if mine is not None:  # a frozen parameter has no twin: it stays at theta_0
                params.append(mine)
                pairs.append((p, mine))
        groups.append({**{key: _copy(v) for key, v in group.items() if key != "params"}, "params": params})
    trained = {id(mine) for _, mine in pairs}
    for p in twin.values():
        p.requires_grad_(id(p) in trained)
    try:
        clone = type(optimizer)(groups)
    except Exception as error:  # any constructor that needs more than the groups
        raise ValueError(
            f"cannot build a {type(optimizer).__name__} from its parameter groups alone ({error})"
        ) from None
    for real, mine in pairs:
        state = optimizer.state.get(real)
        if state:
            clone.state[mine] = {key: _copy(value) for key, value in state.items()}
    return clone
