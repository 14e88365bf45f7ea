"""A config made real: data, model, optimizer, a training loop with the tracker, forecasts.

This is what the ``ntk-torch`` command runs:

* :func:`run` trains a config's model with :class:`~ntk_torch.NTKTracker` attached and
  writes the run directory (``meta.json``, ``metrics.jsonl``, ``kernels/``, and the
  config as ``config.yaml``);
* :func:`forecast` computes, before any training, the training curve of the network
  linearised at initialisation: from the kernel (full-batch SGD at a constant learning
  rate: also the largest stable learning rate) or, where that does not apply (another
  optimizer, a scheduler, clipping, minibatches), by training the linearised twin alone
  for the configured steps, on the minibatches the real run would draw;

Sweeps over a config's values are in :mod:`ntk_torch.sweeps`, a config's kernel written to
a file in :mod:`ntk_torch.kernel_files`.

Training is plain PyTorch: minibatches drawn each epoch from a permutation of a private
generator seeded with ``config.seed`` (the model and data are seeded from it too), so a
config reproduces its run exactly; each minibatch is shown to the tracker
(``NTKTracker.observe``), gradients are clipped when ``train.clip_grad_norm`` says so, and
the scheduler steps after every optimizer step.
"""

from __future__ import annotations

import dataclasses
import inspect
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import torch
import yaml
from torch import nn
from tqdm import tqdm

from . import data as data_module
from . import models as models_module
from . import records
from ._options import check_bool
from .config import ConfigError, RunConfig, check_imports, trusted_modules
from .forecast import LinearisedForecast, sgd_settings
from .forecasting import choose
from .losses import KNOWN_LOSSES, resolve
from .probe import LabelledSet
from .progress import is_terminal, phase
from .runs import Run, load_run
from .schedule import Schedule
from .tracker import NTKTracker, ending
from .twin import LinearisedTwin

CONFIG_FILE = "config.yaml"
DTYPES = {"float32": torch.float32, "float64": torch.float64}


@dataclass
class Setup:
    """What a config builds: the data (on the device, in the dtype), model, optimizer and
    scheduler; ``tracker`` is set while :func:`run` trains with one."""

    config: RunConfig
    split: data_module.DataSplit
    model: nn.Module
    optimizer: torch.optim.Optimizer
    device: torch.device
    scheduler: Optional[Any] = None
    tracker: Optional[NTKTracker] = None


def build(config: RunConfig, *, allow_imports: Sequence[str] = ()) -> Setup:
    """Data, model and optimizer for ``config``, all seeded from ``config.seed``.

    A config can run code: an import path in ``data.name`` or ``model.name`` is imported
    and called only when its module is trusted, named in ``allow_imports`` or in the
    ``NTK_TORCH_ALLOW_IMPORT`` environment variable (:func:`ntk_torch.config.check_imports`);
    otherwise nothing is imported.

    Raises:
        ConfigError: an import path of an untrusted module, the data or model registry
            refused the config's names or options, the loss does not suit the data, or the
            device is not available.
    """
    check_imports(config, trusted_modules(allow_imports))
    try:
        device = torch.device(config.train.device)
    except RuntimeError as error:
        raise ConfigError(f"train.device: {error}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"train.device is {config.train.device!r} but CUDA is not available")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"train.device is {config.train.device!r} but MPS is not available")
    dtype = DTYPES[config.train.dtype]
    try:
        data_options = _with_seed(data_module.DATASETS.get(config.data.name), config.data.options, config.seed)
        split = data_module.load(config.data.name, **data_options)
    except (ValueError, TypeError, ImportError, AttributeError) as error:
        raise ConfigError(f"data ({config.data.name}): {error}") from None
    split = split.to(device=device, dtype=dtype)
    try:
        model_options = _with_seed(models_module.MODELS.get(config.model.name), config.model.options, config.seed)
        model = models_module.build(config.model.name, data=split, **model_options)
    except (ValueError, TypeError, ImportError, AttributeError) as error:
        raise ConfigError(f"model ({config.model.name}): {error}") from None
    model = model.to(device=device, dtype=dtype)
    _check_loss_suits(config, split)
    optimizer = make_optimizer(config, model)
    return Setup(config, split, model, optimizer, device, make_scheduler(config, optimizer))


def _check_loss_suits(config: RunConfig, split: data_module.DataSplit) -> None:
    """Raise :class:`ConfigError`, naming the losses that would suit, when the config's
    loss is not for the data's task (``cross_entropy`` on regression targets, ...)."""
    if resolve(config.train.loss).kind == split.task:
        return
    suited = " or ".join(repr(name) for name in KNOWN_LOSSES if resolve(name).kind == split.task)
    data = "has class labels" if split.task == "classification" else "is a regression task"
    raise ConfigError(f"train.loss is {config.train.loss!r} but data {config.data.name!r} {data}; use {suited}")


def _with_seed(builder: Optional[Callable[..., Any]], options: Dict[str, Any], seed: int) -> Dict[str, Any]:
    """``options`` plus ``seed`` when the builder takes one and the config did not set it."""
    if builder is None or "seed" in options:
        return dict(options)
    if "seed" in inspect.signature(builder).parameters:
        return {**options, "seed": seed}
    return dict(options)


def make_optimizer(config: RunConfig, model: nn.Module) -> torch.optim.Optimizer:
    """The config's ``torch.optim`` optimizer (``train.optimizer``: SGD, Adam, AdamW,
    RMSprop or Adagrad) with its lr and weight decay, and momentum (SGD, RMSprop) and
    Nesterov (SGD)."""
    train = config.train
    params = [p for p in model.parameters() if p.requires_grad]
    options: Dict[str, Any] = {"lr": train.lr, "weight_decay": train.weight_decay}
    if train.optimizer == "sgd":
        return torch.optim.SGD(params, momentum=train.momentum, nesterov=train.nesterov, **options)
    if train.optimizer == "rmsprop":
        return torch.optim.RMSprop(params, momentum=train.momentum, **options)
    classes = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW, "adagrad": torch.optim.Adagrad}
    return classes[train.optimizer](params, **options)


def make_scheduler(config: RunConfig, optimizer: torch.optim.Optimizer) -> Optional[Any]:
    """The config's learning-rate scheduler on ``optimizer`` (None without one), in
    optimizer steps: ``step`` (``StepLR``: every ``step_size``, default a third of the
    steps, times ``gamma``, default 0.1), ``cosine`` (``CosineAnnealingLR`` over
    ``train.steps`` down to ``eta_min``) or ``one-cycle`` (``OneCycleLR`` over
    ``train.steps`` up to ``max_lr``, default ``train.lr``, rising for ``pct_start``; the
    learning rate only, momentum stays as configured)."""
    scheduler, steps = config.train.scheduler, config.train.steps
    if scheduler is None:
        return None
    schedulers = torch.optim.lr_scheduler

    def given(option: str, default: Any) -> Any:
        value = getattr(scheduler, option)
        return default if value is None else value

    if scheduler.name == "step":
        return schedulers.StepLR(optimizer, step_size=given("step_size", max(1, steps // 3)), gamma=given("gamma", 0.1))
    if scheduler.name == "cosine":
        return schedulers.CosineAnnealingLR(optimizer, T_max=steps, eta_min=given("eta_min", 0.0))
    return schedulers.OneCycleLR(optimizer, max_lr=given("max_lr", config.train.lr), total_steps=steps,
                                 pct_start=given("pct_start", 0.3), cycle_momentum=False)


def make_tracker(setup: Setup, run_dir: Optional[Path], *, force: bool = False, tensorboard: Any = None) -> NTKTracker:
    """The tracker a config asks for, writing to ``run_dir``. ``track.forecast: auto`` is
    resolved here by :func:`ntk_torch.forecasting.choose`, which knows from the config
    whether :func:`train_loop` will show the tracker minibatches (so the tracker need not
    prepare the kernel forecast for a minibatch run)."""
    config, split = setup.config, setup.split
    track = config.track
    forecast = track.forecast
    if forecast == "auto":
        chosen, _ = choose("auto", setup.optimizer, setup.model, clipping=config.train.clip_grad_norm is not None,
                           minibatches=_is_minibatch(setup))
        forecast = chosen or forecast  # none possible: the tracker says why
    return NTKTracker(
        setup.model,
        split.train,
        test=split.test,
        loss=config.train.loss,
        probe_size=track.probe_size,
        every=track.every,
        schedule=track.schedule,
        mode=track.mode,
        method=track.method,
        run_dir=run_dir,
        keep_kernels=track.keep_kernels,
        progress=False,
        seed=config.seed,
        overwrite=force,
        forecast=forecast,
        clip_grad_norm=config.train.clip_grad_norm,
        tensorboard=tensorboard,
        analytic_reference=track.analytic_reference,
        spectrum=track.spectrum,
    )


def _check_flags(**flags: Any) -> None:
    for name, flag in flags.items():
        check_bool(name, flag)


def fit_probe(config: RunConfig, n_train: int) -> RunConfig:
    """``config`` with ``track.probe_size`` cut to ``n_train`` when it asks for more (with a
    warning), so that the saved config says what ran."""
    if config.track.probe_size <= n_train:
        return config
    warnings.warn(
        f"track.probe_size={config.track.probe_size} is more than the {n_train} training examples; "
        f"the probe is all {n_train} of them",
        UserWarning,
        stacklevel=3,
    )
    return dataclasses.replace(config, track=dataclasses.replace(config.track, probe_size=n_train))


def _is_minibatch(setup: Setup) -> bool:
    """Whether the config's steps use fewer examples than the training set."""
    batch = setup.config.train.batch_size
    return batch is not None and batch < setup.split.x_train.shape[0]


def run(
    config: RunConfig,
    out_dir: Union[str, Path],
    *,
    force: bool = False,
    progress: bool = True,
    allow_imports: Sequence[str] = (),
    tensorboard: Any = None,
) -> Run:
    """Train ``config``'s model with the tracker attached; the run directory is ``out_dir``
    (and, with ``tensorboard`` a log directory or ``SummaryWriter``, TensorBoard's scalars
    and figures; see :mod:`ntk_torch.integrations.tensorboard`).

    An existing run in ``out_dir`` is replaced only with ``force``; any other non-empty
    directory is never touched. Ctrl-C stops training and leaves a loadable run with
    status ``interrupted`` (the command line turns SIGTERM into the same; otherwise the
    tracker closes the run as interrupted before the process ends); an exception leaves
    status ``failed`` and the reason in ``meta.json``. ``allow_imports``: as for
    :func:`build`. The config saved beside the run (``config.yaml``) is the one that ran
    (``track.probe_size`` cut to the data, :func:`fit_probe`). With ``progress``, each
    phase (set-up, the step-0 kernel and forecast, closing the run) is a line on stderr
    with its time (:func:`ntk_torch.progress.phase`) and training a bar of its steps.
    """
    _check_flags(force=force, progress=progress)
    out_dir = Path(out_dir)
    with phase("building data, model and tracker", enabled=progress):
        setup = build(config, allow_imports=allow_imports)
        config = setup.config = fit_probe(config, setup.split.x_train.shape[0])
        tracker = make_tracker(setup, out_dir, force=force, tensorboard=tensorboard)
    try:
        (out_dir / CONFIG_FILE).write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
    except BaseException as error:
        tracker.close(*ending(error))
        raise
    setup.tracker = tracker
    with phase("step 0: kernel" + " and forecast" * (config.track.forecast is not None), enabled=progress):
        attachment = tracker.attach(setup.optimizer)  # closes the run itself if this fails
    with attachment:
        train_loop(setup, progress=progress)
        with phase("last measurement and the run's files", enabled=progress):
            tracker.close()
    return load_run(out_dir)


def minibatches(setup: Setup) -> Iterator[Tuple[Any, torch.Tensor, bool]]:
    """``(x, y, is_minibatch)`` for each of ``config.train.steps`` optimizer steps: the
    training set, or minibatches drawn each epoch from a permutation of a generator
    seeded with ``config.seed`` (so a config draws the same batches every time)."""
    config, split = setup.config, setup.split
    n = split.x_train.shape[0]
    batch = n if config.train.batch_size is None else min(config.train.batch_size, n)
    generator = torch.Generator().manual_seed(config.seed)
    order = torch.arange(n)
    position = n  # start with a fresh permutation
    for _ in range(config.train.steps):
        if batch < n:
            if position + batch > n:
                order, position = torch.randperm(n, generator=generator), 0
            index = order[position:position + batch].to(setup.device)
            position += batch
            yield split.x_train[index], split.y_train[index], True
        else:
            yield split.x_train, split.y_train, False


def train_loop(setup: Setup, *, progress: bool = True) -> None:
    """``config.train.steps`` optimizer steps of minibatch (or full-batch) training, each
    minibatch shown to ``setup.tracker`` when there is one, gradients clipped to
    ``train.clip_grad_norm`` when set, the scheduler stepped after each step. ``progress``:
    a bar on a terminal, one line with the time elsewhere."""
    config, model = setup.config, setup.model
    model.train()
    terminal = progress and is_terminal(sys.stderr)  # elsewhere (a CI log) one line, not a redrawn bar
    bar = tqdm(minibatches(setup), total=config.train.steps, desc=config.name, unit="step", disable=not terminal)
    with phase(f"training {config.train.steps} steps", enabled=progress and not terminal):
        _train_steps(setup, bar)


def _train_steps(setup: Setup, bar: Any) -> None:
    """The optimizer steps of :func:`train_loop`, one per item of ``bar``."""
    config, model, optimizer = setup.config, setup.model, setup.optimizer
    loss_fn = resolve(config.train.loss).fn
    clip = config.train.clip_grad_norm
    for x, y, is_minibatch in bar:
        if is_minibatch and setup.tracker is not None:
            setup.tracker.observe(x, y)
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(model(x), y)
        loss.backward()
        if clip is not None:
            nn.utils.clip_grad_norm_(model.parameters(), clip)
        optimizer.step()
        if setup.scheduler is not None:
            setup.scheduler.step()
        bar.set_postfix(loss=f"{loss.item():.4f}", refresh=False)


@dataclass
class Forecast:
    """What the kernel at initialisation predicts for a config, before training.

    Attributes:
        steps: the optimizer steps of the predicted curve.
        rows: one dict per step: ``predicted_train_loss``, ``predicted_test_loss`` and,
            for classes, ``predicted_train_accuracy`` / ``predicted_test_accuracy``.
        max_learning_rate: the largest stable lr of the linearised model under the
            config's loss and momentum (``predict.max_learning_rate``); None for the twin.
        description: the forecast's settings (``kind``: ``"kernel"`` or ``"twin"``,
            points, kernel mode or optimizer, lr, ...).
    """

    steps: List[int]
    rows: List[Dict[str, Optional[float]]]
    max_learning_rate: Optional[float]
    description: Dict[str, Any]

    @property
    def columns(self) -> List[Tuple[str, str]]:
        """``(split, metric)`` of each predicted field (``records.predicted``) with a value
        at some step: losses first, train before test; no accuracies without classes."""
        return [
            (split, metric)
            for metric in records.METRICS
            for split in records.FORECAST_SPLITS
            if any(row.get(records.predicted(split, metric)) is not None for row in self.rows)
        ]


def forecast(
    config: RunConfig, steps: Optional[List[int]] = None, *, allow_imports: Sequence[str] = ()
) -> Forecast:
    """The training curve of ``config``'s network linearised at step 0, before training.

    The same computation as the tracker's forecast (:func:`ntk_torch.forecasting.choose`
    decides, with ``track.forecast``): from the kernel at step 0 for full-batch SGD at a
    constant learning rate (Lee et al. 2019); otherwise the linearised twin trained alone,
    on the minibatches the real run would draw, with the config's optimizer, scheduler and
    clipping. ``steps`` defaults to the log schedule up to ``train.steps``, and
    ``train.steps`` itself.

    Raises:
        ConfigError: ``track.forecast`` is null, the optimizer cannot be modelled, or what
            :func:`build` raises (``allow_imports`` is passed on to it).
    """
    setup = build(config, allow_imports=allow_imports)
    requested = config.track.forecast
    if requested is None:
        raise ConfigError("track.forecast is null: there is no forecast to make")
    n = setup.split.x_train.shape[0]
    kind, problems = choose(requested, setup.optimizer, setup.model,
                            clipping=config.train.clip_grad_norm is not None, minibatches=_is_minibatch(setup))
    if kind is None:
        raise ConfigError("cannot forecast this config: " + "; ".join(problems))
    split = setup.split
    points = LabelledSet(split.x_train, split.y_train, tuple(range(n)))
    test = LabelledSet(split.x_test, split.y_test)
    if steps is None:
        steps = Schedule(schedule="log").steps_until(config.train.steps) + [config.train.steps]
    steps = sorted(set(steps))
    common = dict(model=setup.model, points=points, test=test, loss=resolve(config.train.loss), output_fn=None,
                  approximate_points=False)
    if kind == "twin":
        return _twin_forecast(setup, steps, common)
    settings, names, _ = sgd_settings(setup.optimizer, setup.model)
    result = LinearisedForecast(settings=settings, param_names=names, **common)
    rows = [result.at(step) for step in steps]
    return Forecast(steps, rows, result.max_learning_rate(), result.describe())


def _twin_forecast(setup: Setup, steps: List[int], common: Dict[str, Any]) -> Forecast:
    """Train the linearised twin alone for ``max(steps)`` steps, on the batches
    :func:`minibatches` draws, with its own copy of the scheduler; its rows at ``steps``."""
    twin = LinearisedTwin(optimizer=setup.optimizer, clip_grad_norm=setup.config.train.clip_grad_norm, **common)
    scheduler = make_scheduler(setup.config, twin.optimizer)
    wanted = set(steps)
    rows = {0: twin.at(0)} if 0 in wanted else {}
    for step, (x, y, is_minibatch) in enumerate(minibatches(setup), start=1):
        if step > steps[-1]:
            break
        twin.batches = "minibatch" if is_minibatch else "full"
        twin.step([(x, y)] if is_minibatch else None)
        if scheduler is not None:
            scheduler.step()
        if step in wanted:
            rows[step] = twin.at(step)
    kept = [step for step in steps if step in rows]  # steps beyond train.steps are not trained
    return Forecast(kept, [rows[step] for step in kept], None, twin.describe())
