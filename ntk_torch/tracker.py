"""``NTKTracker``: the empirical NTK of a fixed probe set, measured during training.

The tracker hooks an optimizer's ``step`` and, on a schedule of optimizer steps, computes
the eNTK of the model on a probe (a fixed random subset of the training data), compares it
with the kernel at step 0 and at the previous measurement, and records everything as one
dict per measurement, in memory (``tracker.records``) and, given ``run_dir``, in a run
directory (``load_run``)::

    tracker = NTKTracker(model, train=(x, y), test=(xt, yt), loss="cross_entropy",
                         every=10, run_dir="runs/exp")
    with tracker.attach(optimizer):      # measures step 0 now
        for xb, yb in loader:
            optimizer.zero_grad()
            loss_fn(model(xb), yb).backward()
            optimizer.step()             # measured after steps 10, 20, ...

Do no harm: training with the tracker attached gives bit-identical parameters to training
without it. Measurements run in eval mode under ``torch.no_grad`` on detached parameters,
fork the RNG, and leave every ``.grad``, ``requires_grad`` and ``training`` flag as found.
Only the kernel at step 0 and the previous one stay in memory.
"""

from __future__ import annotations

import math
import os
import platform
import time
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Union

import numpy as np
import torch
from torch import nn

from . import metrics
from ._options import check_int
from ._prediction import LinearisedForecast, current_lr, linearisation_gap, sgd_settings
from ._probe import (
    Data,
    LabelledSet,
    check_targets,
    choose_probe,
    evaluate,
    load_set,
    resolve_loss,
    sample_output,
)
from .errors import NonFiniteKernelError
from .functional import FunctionalModel, ParamSelector, evaluation_context
from .kernel import MODES, METHODS, PerLayerKernels, empirical_ntk
from .runs import KEEP_KERNELS, Run, RunWriter, load_run

__all__ = ["NTKTracker", "Schedule", "log_schedule"]

TOP_EIGENVALUES = 10
"""How many of the largest kernel eigenvalues each record keeps."""


# --------------------------------------------------------------------------- schedules


def _log_step(k: int) -> int:
    """The k-th step of the log schedule, 2**(k/2) rounded to the nearest integer."""
    return math.floor(2.0 ** (k / 2) + 0.5)


def _log_steps() -> Iterator[int]:
    """0, 1, 2, 3, 4, 6, 8, 11, 16, 23, 32, 45, 64, ...: two steps per doubling."""
    yield 0
    last, k = 0, 0
    while True:
        step = _log_step(k)
        if step > last:
            yield step
            last = step
        k += 1


def log_schedule(stop: int) -> List[int]:
    """The steps of ``schedule="log"`` up to and including ``stop``.

    Step 0, then ``round(2 ** (k / 2))`` for k = 0, 1, 2, ... without repeats:
    0, 1, 2, 3, 4, 6, 8, 11, 16, 23, 32, 45, 64, 91, 128, ... Dense early, where the kernel
    moves most, and two measurements per doubling of the step count after that, so
    about ``2 * log2(stop) + 2`` measurements in all.
    """
    steps = []
    for step in _log_steps():
        if step > stop:
            return steps
        steps.append(step)
    raise AssertionError("unreachable: the log schedule is unbounded")  # pragma: no cover


class Schedule:
    """The optimizer steps at which the kernel is measured; step 0 always is.

    Built from ``every`` (steps 0, every, 2 * every, ...), an explicit collection of steps,
    or ``"log"`` (see ``log_schedule``; unbounded). Steps are queried in increasing order
    as training advances, so the log schedule is generated lazily.
    """

    def __init__(self, every: int, schedule: Union[None, str, Iterable[int]]) -> None:
        self._every: Optional[int] = None
        self._steps: Optional[frozenset] = None
        self._log: Optional[Iterator[int]] = None
        self._log_next = 0
        if schedule is None:
            self._every = every
            self.description: Union[str, List[int]] = f"every {every}"
        elif isinstance(schedule, str):
            if schedule != "log":
                raise ValueError(
                    f"schedule must be None (use every), 'log' or a list of steps, got {schedule!r}"
                )
            self._log = _log_steps()
            self._log_next = next(self._log)
            self.description = "log"
        else:
            steps = _explicit_steps(schedule)
            self._steps = frozenset(steps) | {0}
            self.description = sorted(self._steps)

    def steps_until(self, stop: int) -> List[int]:
        """Every scheduled step ``<= stop``, in order (without advancing the lazy log
        schedule that ``in`` walks)."""
        if self._every is not None:
            return list(range(0, stop + 1, self._every))
        if self._steps is not None:
            return sorted(step for step in self._steps if step <= stop)
        return log_schedule(stop)

    def __contains__(self, step: int) -> bool:
        if self._every is not None:
            return step % self._every == 0
        if self._steps is not None:
            return step in self._steps
        while self._log_next < step:
            self._log_next = next(self._log)
        return self._log_next == step

    def __repr__(self) -> str:
        return f"Schedule({self.description!r})"


def _explicit_steps(schedule: Any) -> List[int]:
    try:
        steps = list(schedule)
    except TypeError:
        raise TypeError(
            f"schedule must be None, 'log' or a list of steps, got {type(schedule).__name__}"
        ) from None
    if not steps:
        raise ValueError("schedule is an empty list; give the steps to measure, or None")
    for step in steps:
        if isinstance(step, bool) or not isinstance(step, (int, np.integer)):
            raise TypeError(f"schedule must hold int steps, got {step!r}")
        if step < 0:
            raise ValueError(f"schedule must hold steps >= 0, got {step}")
    return [int(step) for step in steps]


# --------------------------------------------------------------------------- helpers


def _unwrap(model: nn.Module) -> nn.Module:
    """The module that computes: ``.module`` of DistributedDataParallel / DataParallel."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    wrappers = (nn.parallel.DistributedDataParallel, nn.DataParallel)
    while isinstance(model, wrappers):
        model = model.module
    return model


def _is_main_process() -> bool:
    """Rank 0 of the default process group, or True outside torch.distributed."""
    distributed = torch.distributed
    return not (distributed.is_available() and distributed.is_initialized()) or distributed.get_rank() == 0


def _matrix_trace(K: torch.Tensor) -> float:
    """The trace of the matrix a kernel of any layout stands for (see ``metrics``):
    sum_i K[i, i] (trace), sum_i,a K[i, i, a] (diagonal), sum_i,a K[i, i, a, a] (full)."""
    diagonal = K.diagonal(dim1=0, dim2=1)  # (..., N)
    if K.ndim == 4:
        diagonal = diagonal.diagonal(dim1=0, dim2=1)
    return float(diagonal.sum(dtype=torch.float64))


def _or_none(metric: Callable[..., float], *args: Any) -> Optional[float]:
    """``metric(*args)``, or None where it is undefined (a zero-norm kernel, constant
    targets): the metrics raise ``ValueError`` for those."""
    try:
        return metric(*args)
    except ValueError:
        return None


def _versions() -> Dict[str, str]:
    from . import __version__

    return {
        "ntk_torch": __version__,
        "torch": torch.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
    }


def _describe(value: Any) -> Any:
    """A JSON-friendly description of a configuration value (callables by name)."""
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    if isinstance(value, (list, tuple)):
        return [_describe(v) for v in value]
    if isinstance(value, nn.Module):
        return type(value).__name__
    return getattr(value, "__qualname__", type(value).__name__)


# --------------------------------------------------------------------------- tracker


class NTKTracker:
    """Measures the empirical NTK of a probe set during training and records its drift.

    Args:
        model: the ``nn.Module`` being trained; a ``DistributedDataParallel`` (or
            ``DataParallel``) wrapper is measured through its ``.module``. Create the
            tracker after moving the model to its device.
        train: the training data, an ``(x, y)`` pair (``x`` a Tensor, tuple or dict of
            Tensors batched on dim 0) or a map-style ``Dataset`` of ``(input, label)``
            pairs. The probe is ``probe_size`` of its examples drawn with ``seed``.
        probe_size: number of probe examples N; kernels are (N, N) in trace mode.
        test: optional held-out data (same forms as ``train``), all of it evaluated for
            ``test_loss``/``test_accuracy``; a ``Dataset`` is read once, into memory.
        loss: ``"cross_entropy"`` (integer class labels), ``"mse"`` (float targets of the
            output's shape), or any callable ``loss(output, y)`` returning the mean loss
            (an ``nn.CrossEntropyLoss``/``nn.MSELoss`` instance is checked like its name).
        every: measure after every ``every``-th optimizer step (and at step 0).
        schedule: replaces ``every`` when given: an explicit list of steps, or ``"log"``
            (steps 0, 1, 2, 3, 4, 6, 8, 11, 16, 23, 32, ...; see ``log_schedule``).
        mode, method, params, output_fn: as for ``empirical_ntk``; ``method="auto"`` picks
            the fastest applicable engine. ``output_fn`` also applies to the outputs the
            loss sees; ``params`` also narrows the parameter distance.
        run_dir: a run directory to write (``meta.json``, ``metrics.jsonl``, kernels); None
            keeps the records in memory only.
        keep_kernels: which measured kernels go to ``run_dir`` (see ``RunWriter``):
            ``"log"`` (the m-th kernel for m = 0 and m a power of two), ``"all"``,
            ``"first_last"`` or ``"none"``.
        progress: show a progress line (tqdm) with the step and drift.
        seed: seed of the private ``torch.Generator`` that draws the probe.
        overwrite: replace an existing run in ``run_dir``.
        predict: forecast the training curve from the kernel at step 0 (see below) when
            attached to a ``torch.optim.SGD`` optimizer.
        max_predict_points: the forecast covers all of ``train`` up to this many
            examples, else a subset of this size drawn with ``seed`` (recorded, and the
            forecast is flagged approximate).

    Each record (a dict; see ``NTKTracker.measure``) holds:

    * ``step``, ``time`` (Unix seconds), ``measure_time`` (seconds spent measuring);
    * ``finite``, and ``nonfinite_groups`` when the kernel had NaN/inf entries (the other
      kernel fields are then None; a ``RuntimeWarning`` is issued once per tracker);
    * ``trace``, ``frobenius``, ``top_eigenvalues`` (up to 10, descending),
      ``effective_rank`` of the probe kernel;
    * ``relative_change`` (|K - K0|_F / |K0|_F) and ``kernel_distance`` from step 0,
      ``velocity`` (kernel distance per step since the previous measurement);
    * ``target_alignment`` (centred) of the kernel with the probe labels;
    * ``layer_share`` {parameter group: trace(K_group) / trace(K)};
    * ``param_distance`` |theta - theta_0| / |theta_0|;
    * ``probe_loss``, ``test_loss`` and, for class labels, ``probe_accuracy``,
      ``test_accuracy``, evaluated in eval mode (BatchNorm on running statistics,
      Dropout off), as the kernel is;
    * with a forecast: ``train_loss`` (and ``train_accuracy``) of the network on the
      forecast's training points, ``predicted_train_loss``, ``predicted_test_loss`` (and
      ``predicted_*_accuracy``), and the linearisation gaps ``linearisation_gap`` =
      |train_loss - predicted_train_loss| / train_loss at step 0 and
      ``test_linearisation_gap`` (the same on the test set).

    The forecast is what full-batch ``torch.optim.SGD`` (the optimizer's lr, momentum,
    Nesterov and weight decay) would do to the network linearised at step 0 (Lee et al.
    2019), computed by ``ntk_torch.predict.gd`` from the kernel at step 0 over the training
    points: the ``full`` kernel (exact) while (N O)^2 <= 2^24, else the ``trace`` kernel
    (the isotropic approximation, flagged in ``meta["prediction"]``). What it cannot
    model — another optimizer such as Adam, per-group hyperparameters, dampening — is
    named in a warning and no forecast is made; a learning rate that changes later (a
    scheduler) is warned about once. Minibatch SGD follows the full-batch forecast only
    on average.

    A metric that is undefined (e.g. alignment with constant targets) is None.

    Under ``torch.distributed`` only rank 0 measures and writes (no collectives are
    issued); the other ranks count steps and keep no records.

    Raises:
        ValueError / TypeError: naming the argument at fault, e.g. ``probe_size`` larger
            than ``train``, empty data, labels that do not suit ``loss``, an unknown
            ``schedule``.
    """

    def __init__(
        self,
        model: nn.Module,
        train: Data,
        *,
        probe_size: int = 256,
        test: Optional[Data] = None,
        loss: Union[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = "cross_entropy",
        every: int = 10,
        schedule: Union[None, str, Iterable[int]] = None,
        mode: str = "trace",
        method: str = "auto",
        params: ParamSelector = None,
        output_fn: Optional[Callable[[Any], torch.Tensor]] = None,
        run_dir: Union[str, "os.PathLike[str]", None] = None,
        keep_kernels: str = "log",
        progress: bool = True,
        seed: int = 0,
        overwrite: bool = False,
        predict: bool = True,
        max_predict_points: int = 4096,
    ) -> None:
        self.model = _unwrap(model)
        probe_size = check_int("probe_size", probe_size, minimum=1)
        max_predict_points = check_int("max_predict_points", max_predict_points, minimum=1)
        if not isinstance(predict, bool):
            raise TypeError(f"predict must be a bool, got {type(predict).__name__}")
        every = check_int("every", every, minimum=1)
        seed = check_int("seed", seed, minimum=0)
        if mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(map(repr, MODES))}, got {mode!r}")
        if method not in METHODS:
            raise ValueError(f"method must be one of {', '.join(map(repr, METHODS))}, got {method!r}")
        if keep_kernels not in KEEP_KERNELS:
            options = ", ".join(map(repr, KEEP_KERNELS))
            raise ValueError(f"keep_kernels must be one of {options}, got {keep_kernels!r}")
        if not isinstance(progress, bool):
            raise TypeError(f"progress must be a bool, got {type(progress).__name__}")

        self.schedule = Schedule(every, schedule)
        self.mode, self.method, self.params, self.output_fn = mode, method, params, output_fn
        self.loss = resolve_loss(loss)
        selected = FunctionalModel(self.model, params=params, output_fn=output_fn).params
        self.device = next(iter(selected.values())).device

        probe, train_size = choose_probe(train, probe_size, seed, "train")
        self.probe: LabelledSet = probe.to(self.device)
        self.test: Optional[LabelledSet] = load_set(test, "test") if test is not None else None
        self._check_labels(train)
        self._predict_points: Optional[LabelledSet] = None
        self._predict_subset = False
        if predict:
            points = min(train_size, max_predict_points)
            chosen, _ = choose_probe(train, points, seed, "train")
            self._predict_points = chosen.to(self.device)
            self._predict_subset = points < train_size
        self.forecast: Optional[LinearisedForecast] = None
        self._initial_losses: Dict[str, float] = {}
        self._warned_lr = False

        self.records: List[Dict[str, Any]] = []
        self._main = _is_main_process()
        self._step = 0
        self._started = False
        self._closed = False
        self._hook = None
        self.optimizer: Optional[torch.optim.Optimizer] = None  # while attached
        self._warned_nonfinite = False
        self._kernel0: Optional[torch.Tensor] = None
        self._previous: Optional[tuple] = None  # (step, kernel) of the last finite measurement
        self._param_names = list(selected)
        self._theta0 = {n: p.detach().clone() for n, p in self._live_params().items()} if self._main else {}

        self.run_dir = run_dir
        self._writer: Optional[RunWriter] = None
        if run_dir is not None and self._main:
            meta = self._meta(train_size, every, probe_size, seed, keep_kernels)
            self._writer = RunWriter(run_dir, meta, keep_kernels=keep_kernels, overwrite=overwrite)
        self._progress = self._progress_bar() if progress and self._main else None

    # ------------------------------------------------------------------ set-up

    def _check_labels(self, train: Data) -> None:
        """Check the probe's, train's (when tensors) and test's labels against the loss."""
        with torch.no_grad(), evaluation_context(self.model, self.device):
            output = sample_output(self.model, self.probe, self.output_fn)
        labels = train[1] if isinstance(train, (tuple, list)) else self.probe.y
        check_targets(self.loss, output, labels, "train")
        if self.test is not None:
            check_targets(self.loss, output, self.test.y, "test")

    def _live_params(self) -> Dict[str, torch.Tensor]:
        """The model's current tracked parameters, by name."""
        named = dict(self.model.named_parameters())
        return {name: named[name] for name in self._param_names}

    def _meta(self, train_size: int, every: int, probe_size: int, seed: int, keep_kernels: str) -> dict:
        all_params = list(self.model.parameters())
        return {
            "model": {
                "class": type(self.model).__name__,
                "summary": str(self.model),
                "num_params": sum(p.numel() for p in all_params),
                "num_trainable": sum(p.numel() for p in all_params if p.requires_grad),
                "num_tracked": sum(p.numel() for p in self._live_params().values()),
                "device": str(self.device),
            },
            "probe": {
                "size": len(self.probe),
                "indices": list(self.probe.indices),
                "train_size": train_size,
                "labels": self._class_labels(),
            },
            "test": {"size": len(self.test)} if self.test is not None else None,
            "config": {
                "probe_size": probe_size,
                "every": every,
                "schedule": self.schedule.description,
                "mode": self.mode,
                "method": self.method,
                "params": _describe(self.params),
                "output_fn": _describe(self.output_fn),
                "loss": self.loss.name,
                "keep_kernels": keep_kernels,
                "seed": seed,
            },
            "versions": _versions(),
            "created": time.time(),
        }

    def _class_labels(self) -> Optional[List[int]]:
        """The probe's class labels (for figures sorted by class), when it has classes."""
        y = self.probe.y
        if self.loss.kind == "classification" and y.dim() == 1:
            return y.tolist()
        return None

    def _progress_bar(self):
        from tqdm import tqdm

        return tqdm(desc="NTK", unit=" measurements", leave=True)

    # ------------------------------------------------------------------ public API

    @property
    def step_count(self) -> int:
        """Optimizer steps taken since the tracker started (step 0 is before training)."""
        return self._step

    @property
    def initial_kernel(self) -> Optional[torch.Tensor]:
        """The probe kernel at step 0 (None before it is measured, off rank 0, or if it
        was not finite)."""
        return self._kernel0

    @property
    def probe_indices(self) -> List[int]:
        """Positions of the probe's examples in ``train``, sorted."""
        return list(self.probe.indices)

    @property
    def run(self) -> Run:
        """The run directory as ``load_run`` reads it."""
        if self.run_dir is None:
            raise ValueError("this tracker has no run_dir; pass run_dir=... or use tracker.records")
        return load_run(self.run_dir)

    def attach(self, optimizer: Optional[torch.optim.Optimizer] = None) -> "_Attachment":
        """Measure step 0 now, then measure after every scheduled optimizer step.

        Hooks ``optimizer.step`` (``register_step_post_hook``): every call that updates
        the parameters counts as one step. A step that ``torch.amp.GradScaler`` skips for
        inf/NaN gradients does not count (the scaler does not call ``step``, or, for fused
        optimizers, calls it with ``found_inf`` set), nor do backward passes of gradient
        accumulation. Without an optimizer, call ``tracker.step()`` after each update.

        Returns:
            A context manager; leaving it (also by an exception such as
            ``KeyboardInterrupt``, which is re-raised) detaches the hook and closes the
            tracker and its run directory.
        """
        self._require_open()
        if self._hook is not None:
            raise RuntimeError("the tracker is already attached to an optimizer; call detach() first")
        if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        if not self._started:
            if optimizer is not None and self._predict_points is not None:
                self._start_forecast(optimizer)
            self._started = True
            self.measure()
        if optimizer is not None:
            self._hook = optimizer.register_step_post_hook(self._after_optimizer_step)
            self.optimizer = optimizer
        return _Attachment(self)

    def detach(self) -> None:
        """Remove the optimizer hook; idempotent. The tracker stays usable."""
        if self._hook is not None:
            hook, self._hook = self._hook, None
            hook.remove()
        self.optimizer = None

    def step(self) -> Optional[Dict[str, Any]]:
        """Count one optimizer step and measure if the schedule says so.

        For training loops without a ``torch.optim.Optimizer``: call ``attach()`` once
        before training (it measures step 0), then ``step()`` after each update.

        Returns:
            The new record, or None if this step is not measured (or off rank 0).
        """
        self._require_open()
        if not self._started:
            raise RuntimeError(
                "call tracker.attach() before the first update, so that step 0 (the reference "
                "kernel) is measured; then call tracker.step() after each update"
            )
        self._step += 1
        return self.measure() if self._step in self.schedule else None

    def measure(self) -> Optional[Dict[str, Any]]:
        """Measure the kernel at the current step now, whatever the schedule.

        Returns:
            The record (the same one if this step was already measured), or None off rank 0.
        """
        self._require_open()
        self._started = True
        if not self._main:
            return None
        if self.records and self.records[-1]["step"] == self._step:
            return self.records[-1]
        record = self._measurement()
        self.records.append(record)
        if self._writer is not None:
            self._writer.append(record)
        if self._progress is not None:
            self._progress.set_postfix(step=record["step"], drift=record["relative_change"], refresh=False)
            self._progress.update()
        return record

    def close(self, status: str = "completed") -> None:
        """Detach, and close the run directory recording ``status``; idempotent."""
        self.detach()
        if self._closed:
            return
        self._closed = True
        if self._writer is not None:
            self._writer.close(status=status)
        if self._progress is not None:
            self._progress.close()

    @property
    def closed(self) -> bool:
        return self._closed

    def __repr__(self) -> str:
        state = "closed" if self._closed else ("attached" if self._hook is not None else "open")
        return (
            f"NTKTracker({type(self.model).__name__}, probe={len(self.probe)}, "
            f"schedule={self.schedule.description!r}, step={self._step}, "
            f"{len(self.records)} records, {state})"
        )

    def _start_forecast(self, optimizer: torch.optim.Optimizer) -> None:
        """Build the forecast from the kernel at step 0, or warn what cannot be modelled."""
        if not self._main:
            return
        settings, names, problems = sgd_settings(optimizer, self.model)
        if problems:
            warnings.warn(
                "NTKTracker: no predicted training curve: " + "; ".join(problems) + ". Kernel "
                "drift is still tracked.",
                RuntimeWarning,
                stacklevel=3,
            )
            return
        self.forecast = LinearisedForecast(
            self.model,
            self._predict_points,
            self.test,
            self.loss,
            settings,
            names,
            self.output_fn,
            self._predict_subset,
            self.schedule.steps_until,
        )
        if self._writer is not None:
            self._writer.update_meta(prediction=self.forecast.describe())

    # ------------------------------------------------------------------ hooks

    def _require_open(self) -> None:
        if self._closed:
            raise RuntimeError("this NTKTracker is closed; create a new one to track again")

    def _after_optimizer_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        """``optimizer.step`` post-hook: count the step unless GradScaler skipped it."""
        found_inf = getattr(optimizer, "found_inf", None)  # set by GradScaler for fused optimizers
        if isinstance(found_inf, torch.Tensor) and bool(found_inf.item()):
            return
        self.step()

    # ------------------------------------------------------------------ measurement

    def _measurement(self) -> Dict[str, Any]:
        """One record: the step, then each group of fields in ``_fields`` order."""
        started = time.perf_counter()
        record: Dict[str, Any] = {"step": self._step, "time": time.time()}
        measured = self._measure_kernel()
        for fields in self._fields():
            record.update(fields(measured))
        record.update(self._linearisation_gaps(record))
        if measured.kernel is not None:
            self._remember(measured.step, measured.kernel)
        record["measure_time"] = time.perf_counter() - started
        return record

    def _fields(self) -> Iterable[Callable[["_Kernels"], Dict[str, Any]]]:
        """The record's fields, group by group: a new measurement is one more entry."""
        return (
            self._finiteness,
            self._kernel_statistics,
            self._drift,
            self._layer_shares,
            self._parameter_distance,
            self._evaluation,
            self._prediction,
        )

    def _measure_kernel(self) -> "_Kernels":
        """The per-layer probe kernels at this step; when they are not finite, the groups
        at fault (and a ``RuntimeWarning``, the first time)."""
        try:
            kernels = empirical_ntk(
                self.model,
                self.probe.x,
                mode=self.mode,
                method=self.method,
                params=self.params,
                output_fn=self.output_fn,
                per_layer=True,
            )
        except NonFiniteKernelError as error:
            if not self._warned_nonfinite:
                self._warned_nonfinite = True
                warnings.warn(
                    f"NTKTracker: the kernel at step {self._step} is not finite ({error}); "
                    "the step is recorded with finite=False and training goes on. Later "
                    "non-finite steps are recorded without a warning.",
                    RuntimeWarning,
                    stacklevel=2,
                )
            return _Kernels(self._step, None, list(error.groups))
        return _Kernels(self._step, kernels, [])

    def _remember(self, step: int, K: torch.Tensor) -> None:
        """Keep K as the reference (at step 0) and as the previous kernel; save it."""
        if step == 0:
            self._kernel0 = K
        self._previous = (step, K)
        if self._writer is not None:
            self._writer.save_kernel(step, K)

    # Each field group below maps the step's kernels to some of the record's fields; the
    # kernel fields are None at a non-finite step.

    def _finiteness(self, measured: "_Kernels") -> Dict[str, Any]:
        if measured.kernel is not None:
            return {"finite": True}
        return {"finite": False, "nonfinite_groups": measured.nonfinite_groups}

    def _kernel_statistics(self, measured: "_Kernels") -> Dict[str, Any]:
        """Trace, Frobenius norm, top eigenvalues, effective rank, target alignment."""
        K = measured.kernel
        if K is None:
            names = ("trace", "frobenius", "top_eigenvalues", "effective_rank", "target_alignment")
            return dict.fromkeys(names)
        eigenvalues = metrics.spectrum(K)  # one eigendecomposition serves both
        return {
            "trace": _matrix_trace(K),
            "frobenius": float(torch.linalg.vector_norm(K, dtype=torch.float64)),
            "top_eigenvalues": eigenvalues[:TOP_EIGENVALUES].tolist(),
            "effective_rank": _or_none(metrics.effective_rank_of_spectrum, eigenvalues),
            "target_alignment": _or_none(metrics.target_alignment, K, self.probe.y),
        }

    def _drift(self, measured: "_Kernels") -> Dict[str, Any]:
        """Relative change and kernel distance from step 0; velocity since the previous
        finite measurement (kernel distance per optimizer step)."""
        fields = dict.fromkeys(("relative_change", "kernel_distance", "velocity"))
        K = measured.kernel
        if K is None:
            return fields
        if measured.step == 0:
            fields["relative_change"] = fields["kernel_distance"] = 0.0
        elif self._kernel0 is not None:
            fields["relative_change"] = _or_none(metrics.relative_change, K, self._kernel0)
            fields["kernel_distance"] = _or_none(metrics.kernel_distance, K, self._kernel0)
        if self._previous is not None:
            previous_step, previous = self._previous
            steps = measured.step - previous_step
            fields["velocity"] = _or_none(metrics.kernel_velocity, previous, K, steps)
        return fields

    def _layer_shares(self, measured: "_Kernels") -> Dict[str, Any]:
        """Each parameter group's share of the kernel's trace."""
        if measured.kernel is None:
            return {"layer_share": None}
        total = _matrix_trace(measured.kernel)
        parts = measured.kernels.items()
        return {"layer_share": {g: _matrix_trace(K) / total if total else None for g, K in parts}}

    def _parameter_distance(self, measured: "_Kernels") -> Dict[str, Any]:
        """|theta - theta_0| / |theta_0| over the tracked parameters, in float64."""
        moved = reference = 0.0
        with torch.no_grad():
            for name, p in self._live_params().items():
                p0 = self._theta0[name]
                moved += float(torch.linalg.vector_norm(p - p0, dtype=torch.float64)) ** 2
                reference += float(torch.linalg.vector_norm(p0, dtype=torch.float64)) ** 2
        return {"param_distance": math.sqrt(moved / reference) if reference > 0 else None}

    def _evaluation(self, measured: "_Kernels") -> Dict[str, Any]:
        """Loss (and accuracy) on the probe and the test set, in eval mode, without grad."""
        fields: Dict[str, Any] = {}
        with torch.no_grad(), evaluation_context(self.model, self.device):
            for prefix, data in (("probe", self.probe), ("test", self.test)):
                if data is not None:
                    result = evaluate(self.model, data, self.loss, self.output_fn, self.device)
                    fields.update({f"{prefix}_{key}": value for key, value in result.items()})
        return fields


    def _prediction(self, measured: "_Kernels") -> Dict[str, Any]:
        """Actual and predicted train/test losses, and the linearisation gaps."""
        forecast = self.forecast
        if forecast is None:
            return {}
        if not self._warned_lr and self.optimizer is not None:
            if current_lr(self.optimizer) != forecast.settings.lr:
                self._warned_lr = True
                warnings.warn(
                    f"NTKTracker: the learning rate changed from {forecast.settings.lr} to "
                    f"{current_lr(self.optimizer)} by step {measured.step} (a scheduler?); the "
                    "predicted curve keeps the initial learning rate",
                    RuntimeWarning,
                    stacklevel=2,
                )
        fields = forecast.actual(self.model, self.output_fn, self.device)
        fields.update(forecast.at(measured.step))
        return fields

    def _linearisation_gaps(self, record: Dict[str, Any]) -> Dict[str, Any]:
        """|actual - predicted| / actual at step 0, on the train points and the test set."""
        if self.forecast is None:
            return {}
        if record["step"] == 0:
            self._initial_losses = {"train": record["train_loss"], "test": record.get("test_loss")}
        return {
            f"{prefix}linearisation_gap": linearisation_gap(
                record.get(f"{split}_loss"),
                record.get(f"predicted_{split}_loss"),
                self._initial_losses.get(split),
            )
            for prefix, split in (("", "train"), ("test_", "test"))
        }


@dataclass(frozen=True)
class _Kernels:
    """The probe kernels measured at ``step``: per layer (None if not finite) and, when
    not finite, the parameter groups at fault."""

    step: int
    kernels: Optional[PerLayerKernels]
    nonfinite_groups: List[str]

    @property
    def kernel(self) -> Optional[torch.Tensor]:
        """The total kernel, or None if not finite."""
        return None if self.kernels is None else self.kernels.total


class _Attachment:
    """What ``NTKTracker.attach`` returns: leaving the ``with`` block closes the tracker."""

    def __init__(self, tracker: NTKTracker) -> None:
        self.tracker = tracker

    def __enter__(self) -> NTKTracker:
        return self.tracker

    def __exit__(self, exc_type: Any, exc: Any, traceback: Any) -> bool:
        if exc_type is None:
            status = "completed"
        elif issubclass(exc_type, KeyboardInterrupt):
            status = "interrupted"
        else:
            status = "failed"
        self.tracker.close(status=status)
        return False  # re-raise
