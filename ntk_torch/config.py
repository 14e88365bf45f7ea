"""Run configurations: YAML files validated into typed dataclasses.

A config has five sections (all optional but ``train.steps`` has a default too)::

    name: digits_mlp
    seed: 0
    data:  {name: digits, options: {test_size: 0.2}}
    model: {name: mlp, options: {width: 256, depth: 2}}
    train: {optimizer: sgd, lr: 0.1, momentum: 0.0, batch_size: 64, steps: 600, loss: cross_entropy,
            scheduler: {name: cosine}, clip_grad_norm: 1.0}
    track: {every: 10, probe_size: 256, mode: trace, forecast: auto}
    sweep: {parameter: model.options.width, values: [64, 256, 1024], seeds: 2}

Every key is checked: an unknown key or a value of the wrong type is a
:class:`ConfigError` that names the file and the dotted key
(``configs/x.yaml: train.lr must be a number, got 'fast'``). ``data.options`` and
``model.options`` are free-form here; the data and model registries check them.
Overrides (``--set train.lr=0.05``) are parsed as YAML scalars and validated the same way.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Union

import yaml

from .kernel import METHODS, MODES
from .losses import KNOWN_LOSSES


class ConfigError(ValueError):
    """A configuration file or override is invalid; the message names the file and key."""


@dataclass
class DataConfig:
    name: str = "digits"
    options: Dict[str, Any] = field(default_factory=dict)


@dataclass
class ModelConfig:
    name: str = "mlp"
    options: Dict[str, Any] = field(default_factory=dict)


@dataclass
class SchedulerConfig:
    """A learning-rate scheduler, stepped after every optimizer step (options in steps)."""

    name: str = "step"  # step | cosine | one-cycle
    step_size: Optional[int] = None  # step: steps between decays (default train.steps // 3)
    gamma: Optional[float] = None  # step: the decay factor (default 0.1)
    eta_min: Optional[float] = None  # cosine: the final learning rate (default 0)
    max_lr: Optional[float] = None  # one-cycle: the peak learning rate (default train.lr)
    pct_start: Optional[float] = None  # one-cycle: the fraction of steps rising (default 0.3)


@dataclass
class TrainConfig:
    optimizer: str = "sgd"  # sgd | adam | adamw | rmsprop | adagrad
    lr: float = 0.1
    momentum: float = 0.0  # sgd, rmsprop
    nesterov: bool = False  # sgd
    weight_decay: float = 0.0
    batch_size: Optional[int] = None  # None: full batch
    steps: int = 500
    loss: str = "cross_entropy"
    device: str = "cpu"
    dtype: str = "float32"
    scheduler: Optional[SchedulerConfig] = None
    clip_grad_norm: Optional[float] = None  # clip_grad_norm_ before each step


@dataclass
class TrackConfig:
    every: int = 10
    schedule: Optional[Union[str, List[int]]] = None
    probe_size: int = 256
    mode: str = "trace"
    method: str = "auto"
    keep_kernels: str = "log"
    forecast: Optional[str] = "auto"  # auto | kernel | twin | null (see NTKTracker)


@dataclass
class SweepConfig:
    parameter: str = "model.options.width"
    values: List[Any] = field(default_factory=list)
    seeds: int = 1  # runs per value, with seeds seed, seed + 1, ...; results averaged


@dataclass
class RunConfig:
    name: str = "run"
    seed: int = 0
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    track: TrackConfig = field(default_factory=TrackConfig)
    sweep: Optional[SweepConfig] = None

    def to_dict(self) -> Dict[str, Any]:
        """A plain nested dict (for run metadata and YAML dumps)."""
        return dataclasses.asdict(self)


OPTIMIZERS = ("sgd", "adam", "adamw", "rmsprop", "adagrad")
SCHEDULERS = {"step": ("step_size", "gamma"), "cosine": ("eta_min",), "one-cycle": ("max_lr", "pct_start")}
"""The schedulers a config names, and the options each takes."""
FORECASTS = ("auto", "kernel", "twin")
MOMENTUM_OPTIMIZERS = ("sgd", "rmsprop")

CHOICES = {
    "train.optimizer": OPTIMIZERS,
    "train.loss": KNOWN_LOSSES,
    "train.dtype": ("float32", "float64"),
    "track.mode": MODES,
    "track.method": METHODS,
    "track.keep_kernels": ("all", "log", "first_last", "none"),
}
POSITIVE = {"train.steps", "train.batch_size", "track.every", "track.probe_size", "sweep.seeds"}
NON_NEGATIVE = {"train.lr", "train.momentum", "train.weight_decay"}


def load_config(path: Union[str, Path], overrides: Sequence[str] = ()) -> RunConfig:
    """Read, override and validate a YAML config file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such config file")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: not valid YAML: {error}") from None
    return parse_config(raw, source=str(path), overrides=overrides)


def parse_config(raw: Any, source: str = "<config>", overrides: Sequence[str] = ()) -> RunConfig:
    """Validate a nested mapping (e.g. parsed YAML) into a :class:`RunConfig`."""
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{source}: the top level must be a mapping, got {type(raw).__name__}")
    raw = _deep_copy(raw)
    config = _validated(raw, source)
    for override in overrides:  # each override validated on its own, so errors name it
        _apply_override(raw, override, source)
        config = _validated(raw, f"{source} (--set {override})")
    return config


def _validated(raw: Dict[str, Any], source: str) -> RunConfig:
    config = _build(RunConfig, raw, "", source)
    _check_values(config, source)
    return config


def set_by_path(config: RunConfig, dotted: str, value: Any, source: str = "<override>") -> RunConfig:
    """A copy of ``config`` with ``dotted`` (e.g. ``model.options.width``) set to ``value``."""
    raw = config.to_dict()
    _assign(raw, dotted, value, source)
    return parse_config(raw, source)


def _deep_copy(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {k: _deep_copy(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_deep_copy(v) for v in value]
    return value


def _apply_override(raw: Dict[str, Any], override: str, source: str) -> None:
    key, sep, text = override.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set {override!r}: expected key=value, e.g. train.lr=0.05")
    try:
        value = yaml.safe_load(text) if text.strip() else None
    except yaml.YAMLError:
        value = text
    _assign(raw, key.strip(), value, f"{source} (--set {override})")


def _assign(raw: Dict[str, Any], dotted: str, value: Any, source: str) -> None:
    parts = dotted.split(".")
    node = raw
    for depth, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"{source}: {'.'.join(parts[: depth + 1])} is not a section")
        node = child
    node[parts[-1]] = value


def _build(cls: type, raw: Any, prefix: str, source: str):
    if raw is None:
        raw = {}
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{source}: {prefix.rstrip('.') or 'the top level'} must be a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = [k for k in raw if k not in names]
    if unknown:
        raise ConfigError(
            f"{source}: unknown key {prefix + str(unknown[0])!r} (known keys: {', '.join(prefix + n for n in names)})"
        )
    values = {name: _convert(hints[name], raw[name], prefix + name, source) for name in raw}
    return cls(**values)


def _convert(hint: Any, value: Any, key: str, source: str) -> Any:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Union:
        if value is None and type(None) in args:
            return None
        errors = []
        for option in (a for a in args if a is not type(None)):
            try:
                return _convert(option, value, key, source)
            except ConfigError as error:
                errors.append(error)
        raise errors[-1]
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, key + ".", source)
    if origin in (dict, Dict):
        if not isinstance(value, Mapping):
            raise ConfigError(f"{source}: {key} must be a mapping, got {value!r}")
        return dict(value)
    if origin in (list, List):
        if not isinstance(value, list):
            raise ConfigError(f"{source}: {key} must be a list, got {value!r}")
        item = args[0] if args else Any
        return [_convert(item, v, f"{key}[{i}]", source) for i, v in enumerate(value)]
    if hint is Any:
        return value
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{source}: {key} must be true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{source}: {key} must be an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{source}: {key} must be a number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{source}: {key} must be a string, got {value!r}")
        return value
    raise TypeError(f"unsupported config type {hint!r} for {key}")  # a bug in the schema


def _check_values(config: RunConfig, source: str) -> None:
    flat = _flatten(config.to_dict())
    for key, allowed in CHOICES.items():
        if flat[key] not in allowed:
            raise ConfigError(
                f"{source}: {key} must be one of {', '.join(allowed)}, got {flat[key]!r}"
            )
    for key in POSITIVE:
        if flat.get(key) is not None and flat[key] < 1:
            raise ConfigError(f"{source}: {key} must be at least 1, got {flat[key]!r}")
    for key in NON_NEGATIVE:
        if flat[key] < 0:
            raise ConfigError(f"{source}: {key} must be non-negative, got {flat[key]!r}")
    _check_training(config.train, source)
    if config.track.forecast is not None and config.track.forecast not in FORECASTS:
        raise ConfigError(
            f"{source}: track.forecast must be one of {', '.join(FORECASTS)} or null, got {config.track.forecast!r}"
        )
    schedule = config.track.schedule
    if isinstance(schedule, str) and schedule != "log":
        raise ConfigError(f"{source}: track.schedule must be 'log', a list of steps or null, got {schedule!r}")
    if config.sweep is not None:
        if not config.sweep.values:
            raise ConfigError(f"{source}: sweep.values must list at least one value")
        head = config.sweep.parameter.split(".")[0]
        if head not in ("data", "model", "train", "track", "seed"):
            raise ConfigError(
                f"{source}: sweep.parameter must be a dotted key such as model.options.width, "
                f"got {config.sweep.parameter!r}"
            )


def _check_training(train: TrainConfig, source: str) -> None:
    """The optimizer's options suit it; the scheduler's and clipping's are in range."""
    if train.momentum and train.optimizer not in MOMENTUM_OPTIMIZERS:
        raise ConfigError(f"{source}: train.momentum applies to sgd and rmsprop, not {train.optimizer}; remove it")
    if train.nesterov and train.optimizer != "sgd":
        raise ConfigError(f"{source}: train.nesterov applies to sgd only, not {train.optimizer}")
    if train.clip_grad_norm is not None and not train.clip_grad_norm > 0:
        raise ConfigError(f"{source}: train.clip_grad_norm must be positive (or null), got {train.clip_grad_norm!r}")
    scheduler = train.scheduler
    if scheduler is None:
        return
    if scheduler.name not in SCHEDULERS:
        raise ConfigError(f"{source}: train.scheduler.name must be one of {', '.join(SCHEDULERS)}, got {scheduler.name!r}")
    for option in (f.name for f in dataclasses.fields(SchedulerConfig) if f.name != "name"):
        if getattr(scheduler, option) is not None and option not in SCHEDULERS[scheduler.name]:
            raise ConfigError(
                f"{source}: train.scheduler.{option} is not an option of the {scheduler.name} scheduler "
                f"(its options: {', '.join(SCHEDULERS[scheduler.name])})"
            )
    checks = {
        "step_size": (lambda v: v >= 1, "at least 1"),
        "gamma": (lambda v: v > 0, "positive"),
        "eta_min": (lambda v: v >= 0, "non-negative"),
        "max_lr": (lambda v: v > 0, "positive"),
        "pct_start": (lambda v: 0 < v < 1, "between 0 and 1"),
    }
    for option, (valid, expected) in checks.items():
        value = getattr(scheduler, option)
        if value is not None and not valid(value):
            raise ConfigError(f"{source}: train.scheduler.{option} must be {expected}, got {value!r}")


def _flatten(tree: Mapping[str, Any], prefix: str = "") -> Dict[str, Any]:
    flat: Dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, Mapping) and key not in ("options",):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[prefix + key] = value
    return flat
