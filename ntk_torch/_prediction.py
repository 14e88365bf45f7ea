"""The tracker's forecast: the linearised model's training curve from the kernel at step 0.

At step 0 the tracker builds a :class:`LinearisedForecast` over the training data (all of
it up to ``max_points`` examples, else a seeded subset) from the optimizer's SGD
hyperparameters; at each measurement it asks for the predicted train and test loss (and
accuracy) at that step, computed with :func:`ntk_torch.predict.gd` — exactly what
full-batch ``torch.optim.SGD`` on the linearised network gives (Lee et al. 2019).

What cannot be modelled is named in a warning and no forecast is made: optimizers other
than SGD (Adam, ...), parameter groups with different hyperparameters, dampening,
``maximize``, parameters the model does not own. A learning rate that changes later (a
scheduler) is warned about when it is seen; the forecast keeps the initial one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn
from torch.func import jvp

from . import predict
from ._probe import LabelledSet, Loss, call_model, evaluate, has_classes
from .functional import FunctionalModel, evaluation_context
from .kernel import empirical_ntk

MAX_FULL_ENTRIES = 2**24
"""The prediction kernel is ``full`` (exact) while ``(N O)^2`` stays under this many
entries (128 MiB in float64); above, it is ``trace``, used as the isotropic approximation."""

MIN_HORIZON = 32


@dataclass(frozen=True)
class SGDSettings:
    """The hyperparameters of a one-group ``torch.optim.SGD``."""

    lr: float
    momentum: float
    nesterov: bool
    weight_decay: float


def sgd_settings(
    optimizer: torch.optim.Optimizer, model: nn.Module
) -> Tuple[Optional[SGDSettings], List[str], List[str]]:
    """The SGD settings the forecast models, the names of the model's parameters the
    optimizer trains, and what cannot be modelled (empty when everything can)."""
    problems: List[str] = []
    if not isinstance(optimizer, torch.optim.SGD):
        problems.append(f"the optimizer is {type(optimizer).__name__}, and only torch.optim.SGD is modelled")
        return None, [], problems
    groups = optimizer.param_groups
    keys = ("lr", "momentum", "dampening", "nesterov", "weight_decay", "maximize")
    values = {key: {_plain(group.get(key)) for group in groups} for key in keys}
    varying = [key for key in keys if len(values[key]) > 1]
    if varying:
        problems.append(f"parameter groups have different {', '.join(varying)} (per-group hyperparameters)")
    first = groups[0]
    if first.get("dampening", 0):
        problems.append(f"dampening={first['dampening']} (only dampening=0 is modelled)")
    if first.get("maximize", False):
        problems.append("maximize=True")
    owned = {id(p): name for name, p in model.named_parameters()}
    trained = [p for group in groups for p in group["params"] if p.requires_grad]
    foreign = [p for p in trained if id(p) not in owned]
    if foreign:
        problems.append(f"the optimizer trains {len(foreign)} tensors that are not parameters of the model")
    if problems:
        return None, [], problems
    names = sorted({owned[id(p)] for p in trained}, key=list(owned.values()).index)
    settings = SGDSettings(
        lr=float(_plain(first["lr"])),
        momentum=float(first.get("momentum", 0.0)),
        nesterov=bool(first.get("nesterov", False)),
        weight_decay=float(first.get("weight_decay", 0.0)),
    )
    return settings, names, []


def current_lr(optimizer: torch.optim.Optimizer) -> float:
    return float(_plain(optimizer.param_groups[0]["lr"]))


def _plain(value: Any) -> Any:
    return value.item() if isinstance(value, torch.Tensor) else value


def _predict_loss(loss: Loss, output_shape: Sequence[int]) -> Any:
    """The loss argument of ``predict.gd`` matching the tracker's loss."""
    if loss.name in ("cross_entropy", "mse"):
        return loss.name
    if isinstance(loss.fn, nn.CrossEntropyLoss) and _is_plain(loss.fn, "cross_entropy"):
        return "cross_entropy"
    if isinstance(loss.fn, nn.MSELoss) and _is_plain(loss.fn, "mse"):
        return "mse"

    def reshaped(f: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return loss.fn(f.reshape(f.shape[0], *output_shape), y)

    reshaped.__qualname__ = loss.name
    return reshaped


def _is_plain(module: nn.Module, kind: str) -> bool:
    """A loss module with PyTorch's defaults (mean reduction, no weights/smoothing)."""
    if module.reduction != "mean":
        return False
    if kind == "cross_entropy":
        return module.weight is None and module.label_smoothing == 0.0 and module.ignore_index == -100
    return True


class LinearisedForecast:
    """Predicted losses of the linearised network at any step, from the kernel at step 0.

    Args:
        model: the module (unwrapped), at its initial parameters.
        points: the training examples the forecast covers (``N`` of them).
        test: optional test examples.
        loss: the tracker's loss.
        settings: the SGD hyperparameters.
        param_names: the parameters the optimizer trains (the kernel's parameters).
        output_fn: as for ``empirical_ntk``.
        approximate_points: whether ``points`` is a subset of the training data.
        schedule_steps: ``stop -> [scheduled steps <= stop]``, the steps whose outputs a
            trajectory keeps.

    The trajectory is computed up to a horizon that doubles whenever a later step is asked
    for, so a run of ``T`` steps costs ``O(T)`` kernel products in all; only the scheduled
    steps' outputs are kept.
    """

    def __init__(
        self,
        model: nn.Module,
        points: LabelledSet,
        test: Optional[LabelledSet],
        loss: Loss,
        settings: SGDSettings,
        param_names: Sequence[str],
        output_fn: Optional[Callable[[Any], torch.Tensor]],
        approximate_points: bool,
        schedule_steps: Callable[[int], List[int]],
    ) -> None:
        self.settings = settings
        self.points = points
        self.test = test
        self._loss = loss
        self._schedule_steps = schedule_steps
        device = next(model.parameters()).device
        with torch.no_grad(), evaluation_context(model, device):
            f0 = call_model(model, points.x, output_fn)
            f0_test = call_model(model, test.x, output_fn) if test is not None else None
        self.classes = has_classes(f0, points.y)
        num_outputs = f0[0].numel()
        if loss.kind == "classification" and f0.dim() != 2:
            raise ValueError(
                f"predictions with {loss.name!r} need outputs (N, C); the model's are {tuple(f0.shape)}"
            )
        n = len(points)
        self.kernel_mode = "full" if (n * num_outputs) ** 2 <= MAX_FULL_ENTRIES else "trace"
        common = dict(
            mode=self.kernel_mode, params=list(param_names), output_fn=output_fn, dtype=torch.float64
        )
        self._k_train = empirical_ntk(model, points.x, **common)
        self._k_test = empirical_ntk(model, test.x, points.x, **common) if test is not None else None
        self._f0 = f0.reshape(n, -1).double()
        self._f0_test = f0_test.reshape(len(test), -1).double() if test is not None else None
        self._y = self._targets(points.y)
        self._y_test = self._targets(test.y) if test is not None else None
        self._jtheta0 = self._jtheta0_test = None
        if settings.weight_decay > 0:
            fmodel = FunctionalModel(model, params=list(param_names), output_fn=output_fn, dtype=torch.float64)
            with torch.no_grad(), evaluation_context(model, device):
                self._jtheta0 = _jtheta0(fmodel, points.x)
                self._jtheta0_test = _jtheta0(fmodel, test.x) if test is not None else None
        self._predict_loss = _predict_loss(loss, tuple(f0.shape[1:]))
        self.approximate = approximate_points or self.kernel_mode == "trace"
        self.approximate_points = approximate_points
        self._horizon = -1
        self._trajectory: Optional[predict.Prediction] = None
        self._positions: Dict[int, int] = {}
        self.initial_train_loss: Optional[float] = None
        self.initial_test_loss: Optional[float] = None

    def _targets(self, y: torch.Tensor) -> torch.Tensor:
        if self._loss.kind == "regression":
            return y.reshape(y.shape[0], -1).double()
        return y

    def describe(self) -> Dict[str, Any]:
        """What the forecast is, for the run's metadata."""
        return {
            "points": len(self.points),
            "indices": list(self.points.indices) if self.approximate_points else None,
            "approximate": self.approximate,
            "approximation": "isotropic" if self.kernel_mode == "trace" else "exact",
            "kernel_mode": self.kernel_mode,
            "lr": self.settings.lr,
            "momentum": self.settings.momentum,
            "nesterov": self.settings.nesterov,
            "weight_decay": self.settings.weight_decay,
            "assumes": "full-batch SGD on the linearised network (Lee et al. 2019)",
        }

    def max_learning_rate(self) -> Optional[float]:
        """The largest stable lr of the linearised model under this loss and momentum
        (:func:`ntk_torch.predict.max_learning_rate`); None for a custom loss."""
        if not isinstance(self._predict_loss, str):
            return None
        s = self.settings
        return float(
            predict.max_learning_rate(
                self._k_train,
                loss=self._predict_loss,
                momentum=s.momentum,
                nesterov=s.nesterov,
                weight_decay=s.weight_decay,
                n_outputs=self._f0.shape[1],
            )
        )

    def at(self, step: int) -> Dict[str, Optional[float]]:
        """Predicted ``train_loss``/``test_loss`` (and accuracies) at optimizer step ``step``."""
        if step > self._horizon:
            self._extend(max(2 * self._horizon, step, MIN_HORIZON))
        trajectory, position = self._trajectory, self._positions.get(step)
        if position is None:  # a step off the schedule (tracker.measure()): one-off
            trajectory, position = self._compute(step, [step]), 0
        fields = {
            "predicted_train_loss": float(trajectory.train_loss[position]),
            "predicted_test_loss": _item(trajectory.test_loss, position),
        }
        if self.classes:
            fields["predicted_train_accuracy"] = _item(trajectory.train_accuracy, position)
            fields["predicted_test_accuracy"] = _item(trajectory.test_accuracy, position)
        return fields

    def _extend(self, horizon: int) -> None:
        steps = sorted(set(self._schedule_steps(horizon)) | {0})
        self._trajectory = self._compute(horizon, steps)
        self._positions = {s: i for i, s in enumerate(steps)}
        self._horizon = horizon

    def _compute(self, horizon: int, steps: List[int]) -> predict.Prediction:
        s = self.settings
        return predict.gd(
            self._k_train,
            self._y,
            self._f0,
            lr=s.lr,
            steps=horizon,
            loss=self._predict_loss,
            momentum=s.momentum,
            nesterov=s.nesterov,
            weight_decay=s.weight_decay,
            jtheta0=self._jtheta0,
            k_test_train=self._k_test,
            f0_test=self._f0_test,
            y_test=self._y_test,
            jtheta0_test=self._jtheta0_test,
            record_steps=steps,
        )

    def actual(self, model: nn.Module, output_fn, device: torch.device) -> Dict[str, float]:
        """The network's own loss (and accuracy) on the forecast's training points."""
        with torch.no_grad(), evaluation_context(model, device):
            result = evaluate(model, self.points, self._loss, output_fn, device)
        return {f"train_{key}": value for key, value in result.items()}


def _item(values: Optional[torch.Tensor], position: int) -> Optional[float]:
    return None if values is None else float(values[position])


def _jtheta0(fmodel: FunctionalModel, x: Any) -> torch.Tensor:
    """``J(x) theta_0`` ``(N, O)``: one forward-mode product with the tangent ``theta_0``."""
    x = fmodel.prepare_inputs(x)
    return jvp(lambda p: fmodel(p, x), (fmodel.params,), (fmodel.params,))[1]


def linearisation_gap(actual: Optional[float], predicted: Optional[float], initial: Optional[float]) -> Optional[float]:
    """``|L_actual - L_predicted| / L_actual(step 0)``: the gap as a fraction of the
    initial loss (None where undefined)."""
    if actual is None or predicted is None or not initial or not math.isfinite(initial):
        return None
    return abs(actual - predicted) / initial
