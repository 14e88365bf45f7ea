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

What is checked beyond types: a key given twice in one mapping is an error naming both
lines (YAML itself would keep the last silently); the document holds at most 100,000
values with its aliases expanded, 64 levels deep, and no alias that contains itself;
every number is finite and in range
(``lr`` and ``weight_decay`` >= 0, ``momentum`` in [0, 1), steps, ``every`` and schedule
steps below 2**53, the seed in [0, 2**32), a non-empty schedule of steps >= 0); the device
is one torch knows and not ``meta``; ``name`` is a plain name (it becomes a directory under
the output directory: no separators, no ``..``, not absolute).

A config can run code: ``data.name`` and ``model.name`` may be import paths
(``"package.module:function"``), and the function is called. :func:`check_imports` allows
them only for modules the user trusts (``--allow-import`` / ``NTK_TORCH_ALLOW_IMPORT``);
the module is not imported before that.
"""

from __future__ import annotations

import dataclasses
import math
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import torch
import yaml

from .drift import SPECTRA
from .kernel import KERNEL_MODES, METHODS
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
    analytic_reference: bool = False  # distance from the infinite-width NTK (an NTK-parametrised mlp)
    spectrum: str = "auto"  # auto | full | top: every eigenvalue, or the top ten (see NTKTracker)


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
    "track.mode": KERNEL_MODES,
    "track.method": METHODS,
    "track.keep_kernels": ("all", "log", "first_last", "none"),
    "track.spectrum": SPECTRA,
}
POSITIVE = {"train.steps", "train.batch_size", "track.every", "track.probe_size", "sweep.seeds"}
NON_NEGATIVE = {"train.lr", "train.momentum", "train.weight_decay"}
BELOW = {
    "train.momentum": (1, "1 (momentum 1 or more never forgets a gradient: SGD diverges)"),
    "train.steps": (2**53, "2**53 (steps are recorded exactly as float64)"),
    "track.every": (2**53, "2**53 (steps are recorded exactly as float64)"),
    "seed": (2**32, "2**32 (the seed of numpy, scikit-learn and torch generators)"),
}
"""Exclusive upper bounds of numeric keys, and why."""
MAX_VALUES = 100_000
"""The most values a config may hold with its YAML aliases expanded (a config has about
fifty): an alias "bomb" (a list of ten references to a list of ten references ...) would
otherwise take minutes and gigabytes to copy."""
MAX_DEPTH = 64
"""The deepest nesting of mappings and lists in a config."""
IMPORT_ENV = "NTK_TORCH_ALLOW_IMPORT"
"""The environment variable naming trusted modules, comma-separated (as ``--allow-import``)."""
IMPORTABLE = ("data.name", "model.name")
"""The config keys that may hold an import path ``"package.module:function"``."""


class DuplicateKeyError(yaml.constructor.ConstructorError):
    """A key given twice in one YAML mapping."""


class _UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a key given twice in one mapping (naming both lines)
    instead of keeping the last one silently."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> Dict[Any, Any]:
        seen: Dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            try:
                if key in seen:
                    raise DuplicateKeyError(
                        problem=f"duplicate key {key!r} at line {line} (first given at line {seen[key]})"
                    )
                seen[key] = line
            except TypeError:  # an unhashable key: the base class reports it
                continue
        return super().construct_mapping(node, deep=deep)


def _load_yaml(text: str) -> Any:
    return yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass


def _one_line(error: Exception) -> str:
    return " ".join(str(error).split())


def _expanded_size(value: Any, source: str, memo: Dict[int, Optional[int]], depth: int = 1) -> int:
    """The number of values in ``value`` with shared (aliased) parts counted each time they
    appear, computed once per part; a :class:`ConfigError` beyond :data:`MAX_VALUES`
    values or :data:`MAX_DEPTH` levels, or for a part that contains itself."""
    if not isinstance(value, (dict, list)):
        return 1
    if depth > MAX_DEPTH:
        raise ConfigError(f"{source}: nested deeper than {MAX_DEPTH} levels")
    known = memo.get(id(value), -1)
    if known is None:
        raise ConfigError(f"{source}: a YAML alias refers to a mapping or list that contains it")
    if known >= 0:
        return known
    memo[id(value)] = None
    total = 1
    for child in value.values() if isinstance(value, dict) else value:
        total += _expanded_size(child, source, memo, depth + 1)
        if total > MAX_VALUES:
            raise ConfigError(f"{source}: more than {MAX_VALUES:,} values with its YAML aliases expanded")
    memo[id(value)] = total
    return total


def load_config(path: Union[str, Path], overrides: Sequence[str] = ()) -> RunConfig:
    """Read, override and validate a YAML config file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such config file")
    try:
        raw = _load_yaml(path.read_text()) or {}
    except DuplicateKeyError as error:
        raise ConfigError(f"{path}: {_one_line(error)}") from None
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: not valid YAML: {_one_line(error)}") from None
    except RecursionError:
        raise ConfigError(f"{path}: nested too deeply to read") from None
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigError(f"{path}: cannot be read: {_one_line(error)}") from None
    return parse_config(raw, source=str(path), overrides=overrides)


def parse_config(raw: Any, source: str = "<config>", overrides: Sequence[str] = ()) -> RunConfig:
    """Validate a nested mapping (e.g. parsed YAML) into a :class:`RunConfig`."""
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{source}: the top level must be a mapping, got {type(raw).__name__}")
    _expanded_size(dict(raw), source, {})
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
        value = _load_yaml(text) if text.strip() else None
    except DuplicateKeyError as error:
        raise ConfigError(f"{source} (--set {override}): {_one_line(error)}") from None
    except RecursionError:
        raise ConfigError(f"{source} (--set {override}): nested too deeply to read") from None
    except yaml.YAMLError:
        value = text
    _expanded_size(value, f"{source} (--set {override})", {})
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
        try:
            number = float(value)
        except OverflowError:
            number = math.inf
        if not math.isfinite(number):
            raise ConfigError(f"{source}: {key} must be a finite number, got {value!r}")
        return number
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
    for key in NON_NEGATIVE | {"seed"}:
        if flat[key] < 0:
            raise ConfigError(f"{source}: {key} must be non-negative, got {flat[key]!r}")
    for key, (limit, why) in BELOW.items():
        if flat[key] >= limit:
            raise ConfigError(f"{source}: {key} must be below {why}, got {flat[key]!r}")
    check_run_name(config.name, f"{source}: name")
    _check_schedule(config.track.schedule, source)
    _check_device(config.train.device, source)
    _check_training(config.train, source)
    if config.track.forecast is not None and config.track.forecast not in FORECASTS:
        raise ConfigError(
            f"{source}: track.forecast must be one of {', '.join(FORECASTS)} or null, got {config.track.forecast!r}"
        )
    if config.sweep is not None:
        if not config.sweep.values:
            raise ConfigError(f"{source}: sweep.values must list at least one value")
        head = config.sweep.parameter.split(".")[0]
        if head not in ("data", "model", "train", "track", "seed"):
            raise ConfigError(
                f"{source}: sweep.parameter must be a dotted key such as model.options.width, "
                f"got {config.sweep.parameter!r}"
            )


def check_run_name(name: str, where: str) -> str:
    """``name`` if it is a plain name, usable as one directory under an output directory:
    not empty, not ``.`` or ``..``, no path separator or drive colon, not absolute, no
    control characters; else a :class:`ConfigError` starting with ``where``."""
    unsafe = [c for c in ("/", "\\", ":") if c in name]
    if (
        not name.strip() or name in (".", "..") or unsafe or os.path.isabs(name)
        or any(ord(c) < 32 for c in name)
    ):
        raise ConfigError(
            f"{where} must be a plain name (it becomes a directory under the output directory: "
            f"no '/', '\\', ':', '..' or control characters, not absolute), got {name!r}"
        )
    return name


def _check_schedule(schedule: Union[None, str, List[int]], source: str) -> None:
    if isinstance(schedule, str) and schedule != "log":
        raise ConfigError(f"{source}: track.schedule must be 'log', a list of steps or null, got {schedule!r}")
    if isinstance(schedule, list):
        if not schedule:
            raise ConfigError(f"{source}: track.schedule must list at least one step (or be 'log' or null)")
        for index, step in enumerate(schedule):
            if not 0 <= step < 2**53:
                raise ConfigError(f"{source}: track.schedule[{index}] must be a step in [0, 2**53), got {step!r}")


def _check_device(device: str, source: str) -> None:
    try:
        parsed = torch.device(device)
    except (RuntimeError, ValueError) as error:
        raise ConfigError(f"{source}: train.device {device!r} is not a device: {_one_line(error)}") from None
    if parsed.type == "meta":
        raise ConfigError(f"{source}: train.device 'meta' holds no data; use cpu or cuda")


# --------------------------------------------------------------------------- imports


def import_paths(config: RunConfig) -> List[Tuple[str, str]]:
    """``(key, path)`` of each import path in the config (``data.name``, ``model.name``)."""
    names = {"data.name": config.data.name, "model.name": config.model.name}
    return [(key, names[key]) for key in IMPORTABLE if ":" in names[key]]


def trusted_modules(allowed: Iterable[str] = (), environ: Mapping[str, str] = os.environ) -> Tuple[str, ...]:
    """The trusted module names: ``allowed`` (``--allow-import``) and those listed in the
    ``NTK_TORCH_ALLOW_IMPORT`` environment variable (comma-separated), each a dotted
    module name (a package trusts its submodules)."""
    names = list(allowed) + [part.strip() for part in environ.get(IMPORT_ENV, "").split(",") if part.strip()]
    for name in names:
        if not isinstance(name, str) or not all(part.isidentifier() for part in name.split(".")):
            raise ConfigError(f"--allow-import / {IMPORT_ENV}: {name!r} is not a dotted module name")
    return tuple(dict.fromkeys(names))


def check_imports(config: RunConfig, trusted: Sequence[str], source: str = "<config>") -> List[Tuple[str, str]]:
    """The config's import paths (:func:`import_paths`), after checking that each names a
    trusted module (one of ``trusted`` or a submodule of one); nothing is imported.

    Raises:
        ConfigError: an import path of a module not trusted, naming the key and how to
            trust it.
    """
    found = import_paths(config)
    for key, path in found:
        module = path.partition(":")[0]
        if not any(module == name or module.startswith(name + ".") for name in trusted):
            raise ConfigError(
                f"{source}: {key} {path!r} would import and run code from module {module!r}, which is not "
                f"trusted; a config can run code, so only modules you name are imported: pass "
                f"--allow-import {module} (or set {IMPORT_ENV}={module}) if you trust it"
            )
    return found


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
