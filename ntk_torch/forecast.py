"""The forecast: the linearised model's training curve from the kernel at step 0.

At step 0 the tracker (or ``ntk-torch predict``) builds a :class:`LinearisedForecast` over
the training data (all of it up to ``max_points`` examples, else a seeded subset) from the
optimizer's SGD hyperparameters; at each measurement it asks for the record fields at that
step (:meth:`LinearisedForecast.fields`): the network's own loss on the forecast's points,
the predicted train and test loss (and accuracy) computed by one
:class:`ntk_torch.predict.LinearisedDynamics` — exactly what full-batch
``torch.optim.SGD`` on the linearised network gives (Lee et al. 2019) — and the
linearisation gaps.

What cannot be modelled is named in a warning and no forecast is made: optimizers other
than SGD (Adam, ...), parameter groups with different hyperparameters, dampening,
``maximize``, parameters the model does not own. A learning rate that changes later (a
scheduler) is warned about when it is seen; the forecast keeps the initial one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import nn
from torch.func import jvp

from . import records
from .functional import FunctionalModel, evaluation_context
from .kernel import NTK
from .layout import FULL, TRACE
from .losses import CLASSIFICATION, REGRESSION, Loss
from .predict import LinearisedDynamics, Prediction
from .probe import LabelledSet, call_model, evaluate
from .schedule import Schedule

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


class LinearisedForecast:
    """Predicted losses of the linearised network at any step, from the kernel at step 0.

    Args:
        model: the module (unwrapped), at its initial parameters.
        points: the training examples the forecast covers (``N`` of them).
        test: optional test examples.
        loss: the training loss.
        settings: the SGD hyperparameters.
        param_names: the parameters the optimizer trains (the kernel's parameters).
        output_fn, call_kwargs: as for ``empirical_ntk``.
        approximate_points: whether ``points`` is a subset of the training data.
        schedule: the measurement schedule, whose steps a trajectory keeps.

    The kernel over ``points`` is ``full`` (exact) while ``(N O)^2`` stays under
    :data:`MAX_FULL_ENTRIES`, else ``trace`` (the isotropic approximation). The trajectory
    is computed up to a horizon that doubles whenever a later step is asked for, so a run
    of ``T`` steps costs ``O(T)`` kernel products in all, with one eigendecomposition;
    only the scheduled steps' outputs are kept.
    """

    def __init__(
        self,
        *,
        model: nn.Module,
        points: LabelledSet,
        test: Optional[LabelledSet],
        loss: Loss,
        settings: SGDSettings,
        param_names: Sequence[str],
        output_fn: Optional[Callable[[Any], torch.Tensor]],
        approximate_points: bool,
        schedule: Schedule,
        call_kwargs: Optional[Mapping[str, Any]] = None,
    ) -> None:
        self.settings = settings
        self.points = points
        self.test = test
        self.loss = loss
        self.output_fn = output_fn
        self.call_kwargs = call_kwargs
        self.schedule = schedule
        device = next(model.parameters()).device
        with torch.no_grad(), evaluation_context(model, device):
            f0 = call_model(model, points.x, output_fn, call_kwargs)
            f0_test = call_model(model, test.x, output_fn, call_kwargs) if test is not None else None
        if loss.kind == CLASSIFICATION and f0.dim() != 2:
            raise ValueError(
                f"predictions with {loss.name!r} need outputs (N, C); the model's are {tuple(f0.shape)}"
            )
        self.classes = loss.class_labels(points.y, f0) is not None
        n, num_outputs = len(points), f0[0].numel()
        layout = FULL if (n * num_outputs) ** 2 <= MAX_FULL_ENTRIES else TRACE
        self.kernel_mode = layout.name
        kernel = NTK(
            model, mode=layout.name, params=list(param_names), output_fn=output_fn, dtype=torch.float64,
            call_kwargs=call_kwargs,
        )
        jtheta0 = jtheta0_test = None
        if settings.weight_decay > 0:
            fmodel = FunctionalModel(
                model, params=list(param_names), output_fn=output_fn, dtype=torch.float64, call_kwargs=call_kwargs
            )
            jtheta0, jtheta0_test = _jtheta0_of(fmodel, points, test, device)
        self.dynamics = LinearisedDynamics(
            kernel(points.x),
            self._targets(points.y),
            f0.reshape(n, -1).double(),
            loss=loss.for_outputs(tuple(f0.shape[1:])),
            k_test_train=kernel(test.x, points.x) if test is not None else None,
            f0_test=f0_test.reshape(len(test), -1).double() if test is not None else None,
            y_test=self._targets(test.y) if test is not None else None,
            jtheta0=jtheta0,
            jtheta0_test=jtheta0_test,
        )
        self.approximate = approximate_points or layout is TRACE
        self.approximate_points = approximate_points
        self._horizon = -1
        self._trajectory: Optional[Prediction] = None
        self._positions: Dict[int, int] = {}
        self._initial_losses: Dict[str, Optional[float]] = {}

    def _targets(self, y: torch.Tensor) -> torch.Tensor:
        if self.loss.kind == REGRESSION:
            return y.reshape(y.shape[0], -1).double()
        return y

    def describe(self) -> Dict[str, Any]:
        """What the forecast is, for the run's metadata."""
        return {
            "points": len(self.points),
            "indices": list(self.points.indices) if self.approximate_points else None,
            "approximate": self.approximate,
            "approximation": self.dynamics.problem.approximation,
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
        if self.dynamics.loss.closed_form is None:
            return None
        s = self.settings
        return float(self.dynamics.max_learning_rate(
            momentum=s.momentum, nesterov=s.nesterov, weight_decay=s.weight_decay
        ))

    def at(self, step: int) -> Dict[str, Optional[float]]:
        """Predicted ``train``/``test`` loss (and accuracies) at optimizer step ``step``,
        under their record field names."""
        if step > self._horizon:
            self._extend(max(2 * self._horizon, step, MIN_HORIZON))
        trajectory, position = self._trajectory, self._positions.get(step)
        if position is None:  # a step off the schedule (tracker.measure()): one-off
            trajectory, position = self._compute(step, [step]), 0
        fields = {
            records.predicted("train"): float(trajectory.train_loss[position]),
            records.predicted("test"): _item(trajectory.test_loss, position),
        }
        if self.classes:
            fields[records.predicted("train", "accuracy")] = _item(trajectory.train_accuracy, position)
            fields[records.predicted("test", "accuracy")] = _item(trajectory.test_accuracy, position)
        return fields

    def _extend(self, horizon: int) -> None:
        steps = sorted(set(self.schedule.steps_until(horizon)) | {0})
        self._trajectory = self._compute(horizon, steps)
        self._positions = {s: i for i, s in enumerate(steps)}
        self._horizon = horizon

    def _compute(self, horizon: int, steps: List[int]) -> Prediction:
        s = self.settings
        return self.dynamics.gd(
            lr=s.lr, steps=horizon, momentum=s.momentum, nesterov=s.nesterov,
            weight_decay=s.weight_decay, record_steps=steps,
        )

    def fields(self, step: int, model: nn.Module, device: torch.device, measured: Mapping[str, Any]) -> Dict[str, Any]:
        """The record fields of the forecast at ``step``: the network's own loss (and
        accuracy) on the forecast's training points, the predictions (:meth:`at`) and the
        linearisation gaps ``|actual - predicted| / actual at step 0`` on the training
        points and, when ``measured`` holds the test loss, on the test set. The losses at
        the first call are the reference."""
        with torch.no_grad(), evaluation_context(model, device):
            result = evaluate(model, self.points, self.loss, self.output_fn, device, self.call_kwargs)
        fields: Dict[str, Any] = {records.actual("train", key): value for key, value in result.items()}
        fields.update(self.at(step))
        actual = {**measured, **fields}
        if not self._initial_losses:
            self._initial_losses = {split: actual.get(records.actual(split)) for split in records.FORECAST_SPLITS}
        for split in records.FORECAST_SPLITS:
            fields[records.gap(split)] = linearisation_gap(
                actual.get(records.actual(split)), actual.get(records.predicted(split)),
                self._initial_losses.get(split),
            )
        return fields


def _item(values: Optional[torch.Tensor], position: int) -> Optional[float]:
    return None if values is None else float(values[position])


def _jtheta0_of(
    fmodel: FunctionalModel, points: LabelledSet, test: Optional[LabelledSet], device: torch.device
) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """``J theta_0`` on the forecast's points and on the test set (None without one)."""
    with torch.no_grad(), evaluation_context(fmodel.model, device):
        return _jtheta0(fmodel, points.x), (_jtheta0(fmodel, test.x) if test is not None else None)


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
