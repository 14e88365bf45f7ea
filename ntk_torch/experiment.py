"""A config made real: data, model, optimizer, a training loop with the tracker, forecasts.

This is what the ``ntk-torch`` command runs:

* :func:`run` trains a config's model with :class:`~ntk_torch.NTKTracker` attached and
  writes the run directory (``meta.json``, ``metrics.jsonl``, ``kernels/``, and the
  config as ``config.yaml``);
* :func:`forecast` computes, before any training, what the kernel at initialisation
  predicts for the config's training curve, and the largest stable learning rate.

Training is plain PyTorch: minibatches drawn each epoch from a permutation of a private
generator seeded with ``config.seed`` (the model and data are seeded from it too), so a
config reproduces its run exactly.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Union

import torch
import yaml
from torch import nn
from tqdm import tqdm

from . import data as data_module
from . import models as models_module
from .config import ConfigError, RunConfig
from .forecast import LinearisedForecast, sgd_settings
from .losses import KNOWN_LOSSES, resolve
from .probe import LabelledSet
from .runs import Run, load_run
from .schedule import Schedule, log_schedule
from .tracker import NTKTracker

CONFIG_FILE = "config.yaml"
DTYPES = {"float32": torch.float32, "float64": torch.float64}


@dataclass
class Setup:
    """What a config builds: the data (on the device, in the dtype), model and optimizer."""

    config: RunConfig
    split: data_module.DataSplit
    model: nn.Module
    optimizer: torch.optim.Optimizer
    device: torch.device


def build(config: RunConfig) -> Setup:
    """Data, model and optimizer for ``config``, all seeded from ``config.seed``.

    Raises:
        ConfigError: the data or model registry refused the config's names or options,
            the loss does not suit the data, or the device is not available.
    """
    try:
        device = torch.device(config.train.device)
    except RuntimeError as error:
        raise ConfigError(f"train.device: {error}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"train.device is {config.train.device!r} but CUDA is not available")
    dtype = DTYPES[config.train.dtype]
    try:
        data_options = _with_seed(data_module.DATASETS.get(config.data.name), config.data.options, config.seed)
        split = data_module.load(config.data.name, **data_options)
    except (ValueError, TypeError) as error:
        raise ConfigError(f"data ({config.data.name}): {error}") from None
    split = split.to(device=device, dtype=dtype)
    try:
        model_options = _with_seed(models_module.MODELS.get(config.model.name), config.model.options, config.seed)
        model = models_module.build(config.model.name, data=split, **model_options)
    except (ValueError, TypeError) as error:
        raise ConfigError(f"model ({config.model.name}): {error}") from None
    model = model.to(device=device, dtype=dtype)
    _check_loss_suits(config, split)
    return Setup(config, split, model, make_optimizer(config, model), device)


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
    """``torch.optim.SGD`` or ``torch.optim.Adam`` with the config's hyperparameters."""
    train = config.train
    params = [p for p in model.parameters() if p.requires_grad]
    if train.optimizer == "sgd":
        return torch.optim.SGD(
            params, lr=train.lr, momentum=train.momentum, nesterov=train.nesterov, weight_decay=train.weight_decay
        )
    return torch.optim.Adam(params, lr=train.lr, weight_decay=train.weight_decay)


def make_tracker(setup: Setup, run_dir: Optional[Path], *, force: bool = False) -> NTKTracker:
    """The tracker a config asks for, writing to ``run_dir``."""
    config, split = setup.config, setup.split
    track = config.track
    return NTKTracker(
        setup.model,
        split.train,
        test=split.test,
        loss=config.train.loss,
        probe_size=min(track.probe_size, split.x_train.shape[0]),
        every=track.every,
        schedule=track.schedule,
        mode=track.mode,
        method=track.method,
        run_dir=run_dir,
        keep_kernels=track.keep_kernels,
        progress=False,
        seed=config.seed,
        overwrite=force,
    )


def run(
    config: RunConfig, out_dir: Union[str, Path], *, force: bool = False, progress: bool = True
) -> Run:
    """Train ``config``'s model with the tracker attached; the run directory is ``out_dir``.

    An existing run in ``out_dir`` is replaced only with ``force``; any other non-empty
    directory is never touched. Ctrl-C stops training and leaves a loadable run.
    """
    out_dir = Path(out_dir)
    setup = build(config)
    tracker = make_tracker(setup, out_dir, force=force)
    (out_dir / CONFIG_FILE).write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
    with tracker.attach(setup.optimizer):
        train_loop(setup, progress=progress)
    return load_run(out_dir)


def train_loop(setup: Setup, *, progress: bool = True) -> None:
    """``config.train.steps`` optimizer steps of minibatch (or full-batch) training."""
    config, split, model, optimizer = setup.config, setup.split, setup.model, setup.optimizer
    loss_fn = resolve(config.train.loss).fn
    n = split.x_train.shape[0]
    batch = n if config.train.batch_size is None else min(config.train.batch_size, n)
    generator = torch.Generator().manual_seed(config.seed)
    order = torch.arange(n)
    position = n  # start with a fresh permutation
    model.train()
    bar = tqdm(range(config.train.steps), desc=config.name, unit="step", disable=not progress)
    for _ in bar:
        if batch < n:
            if position + batch > n:
                order, position = torch.randperm(n, generator=generator), 0
            index = order[position:position + batch].to(setup.device)
            position += batch
            x, y = split.x_train[index], split.y_train[index]
        else:
            x, y = split.x_train, split.y_train
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(model(x), y)
        loss.backward()
        optimizer.step()
        bar.set_postfix(loss=f"{loss.item():.4f}", refresh=False)


@dataclass
class Forecast:
    """What the kernel at initialisation predicts for a config, before training.

    Attributes:
        steps: the optimizer steps of the predicted curve.
        rows: one dict per step: ``predicted_train_loss``, ``predicted_test_loss`` and,
            for classes, ``predicted_train_accuracy`` / ``predicted_test_accuracy``.
        max_learning_rate: the largest stable lr of the linearised model under the
            config's loss and momentum (``predict.max_learning_rate``).
        description: the forecast's settings (points, kernel mode, lr, ...).
    """

    steps: List[int]
    rows: List[Dict[str, Optional[float]]]
    max_learning_rate: Optional[float]
    description: Dict[str, Any]


def forecast(config: RunConfig, steps: Optional[List[int]] = None) -> Forecast:
    """The linearised prediction of ``config``'s training curve, from the kernel at step 0.

    Uses the same computation as the tracker's forecast (full-batch SGD on the network
    linearised at initialisation, Lee et al. 2019). ``steps`` defaults to the log
    schedule up to ``train.steps``, and ``train.steps`` itself.

    Raises:
        ValueError: the optimizer cannot be modelled (only SGD can).
    """
    setup = build(config)
    settings, names, problems = sgd_settings(setup.optimizer, setup.model)
    if problems:
        raise ValueError("cannot forecast this config: " + "; ".join(problems))
    split = setup.split
    n = split.x_train.shape[0]
    points = LabelledSet(split.x_train, split.y_train, tuple(range(n)))
    test = LabelledSet(split.x_test, split.y_test)
    result = LinearisedForecast(
        model=setup.model,
        points=points,
        test=test,
        loss=resolve(config.train.loss),
        settings=settings,
        param_names=names,
        output_fn=None,
        approximate_points=False,
        schedule=Schedule(schedule="log"),
    )
    if steps is None:
        steps = log_schedule(config.train.steps) + [config.train.steps]
    steps = sorted(set(steps))
    rows = [result.at(step) for step in steps]
    return Forecast(steps, rows, result.max_learning_rate(), result.describe())
