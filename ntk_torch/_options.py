"""Shared plumbing for the built-in data sets and models: import paths, registries and
checked options, each failure a clear error naming the argument and the valid values.

Used by :mod:`ntk_torch.data` and :mod:`ntk_torch.models`; nothing here is public.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import math
import numbers
from typing import Any, Callable, Iterable, Iterator, Mapping, Optional, Sequence

import torch

__all__ = [
    "check_bool",
    "check_choice",
    "check_dtype",
    "check_int",
    "check_options",
    "check_real",
    "check_seed",
    "import_object",
    "is_import_path",
    "lookup",
    "option_names",
]


# --------------------------------------------------------------------------- import paths


def is_import_path(name: Any) -> bool:
    """Whether ``name`` asks for an object by import path (``"package.module:attr"``)."""
    return isinstance(name, str) and ":" in name


def import_object(path: Any, what: str) -> Callable[..., Any]:
    """The callable named by ``path``, ``"package.module:attribute"`` (``attribute`` may be
    dotted, e.g. ``"pkg.mod:Class.create"``).

    Raises:
        ValueError: ``path`` is not of that form.
        ImportError: the module cannot be imported (the original error is chained).
        AttributeError: the module has no such attribute.
        TypeError: the attribute is not callable.
    """
    example = f'"package.module:{what}"'
    if not isinstance(path, str):
        raise TypeError(f"path must be a string like {example}, got {type(path).__name__}")
    module_name, sep, attribute = path.partition(":")
    parts = module_name.split(".") + attribute.split(".")
    if not sep or ":" in attribute or not all(part.isidentifier() for part in parts):
        raise ValueError(
            f"path must look like {example} (a dotted module, a colon, then the {what} "
            f"name), got {path!r}"
        )
    try:
        target: Any = importlib.import_module(module_name)
    except ImportError as error:
        raise ImportError(
            f"cannot import module {module_name!r} named in path {path!r}: {error}; "
            "is the package installed or its folder on sys.path (PYTHONPATH)?"
        ) from error
    for depth, name in enumerate(attribute.split(".")):
        try:
            target = getattr(target, name)
        except AttributeError:
            owner = ".".join([module_name] + attribute.split(".")[:depth])
            raise AttributeError(
                f"{owner!r} has no attribute {name!r} (path {path!r})"
            ) from None
    if not callable(target):
        raise TypeError(
            f"path {path!r} names a {type(target).__name__}, not a callable {what}"
        )
    return target


# --------------------------------------------------------------------------- registries


def lookup(registry: Mapping[str, Callable[..., Any]], name: Any, kind: str) -> Callable[..., Any]:
    """``registry[name]``, or a ``ValueError`` naming ``name`` and listing the valid ones."""
    if not isinstance(name, str):
        raise TypeError(f"name must be a string (a {kind} name), got {type(name).__name__}")
    try:
        return registry[name]
    except KeyError:
        valid = ", ".join(sorted(registry))
        raise ValueError(
            f"unknown {kind} {name!r}; valid names: {valid}, or an import path "
            f'"package.module:function"'
        ) from None


def option_names(fn: Callable[..., Any]) -> Optional[Sequence[str]]:
    """The keyword options ``fn`` accepts, or ``None`` if it takes ``**kwargs``."""
    names = []
    for parameter in inspect.signature(fn).parameters.values():
        if parameter.kind is inspect.Parameter.VAR_KEYWORD:
            return None
        if parameter.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY):
            names.append(parameter.name)
    return names


def check_options(fn: Callable[..., Any], options: Mapping[str, Any], where: str) -> None:
    """A ``TypeError`` naming the first option ``fn`` does not accept and listing the valid
    ones, as in ``unknown option 'widht' for model 'mlp'; valid options: depth, ...``."""
    valid = option_names(fn)
    if valid is None:
        return
    for key in options:
        if key not in valid:
            raise TypeError(
                f"unknown option {key!r} for {where}; valid options: {', '.join(valid)}"
            )


# --------------------------------------------------------------------------- values


def check_bool(name: str, value: Any) -> bool:
    """``value`` if it is True or False; anything else (``"no"``, 0, None) is a TypeError,
    never taken for its truth value."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool (True or False), got {value!r}")
    return value


def check_int(name: str, value: Any, minimum: Optional[int] = None) -> int:
    """``value`` as an ``int`` (bools refused), at least ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an integer, got {value!r}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be at least {minimum}, got {value}")
    return int(value)


def check_real(
    name: str,
    value: Any,
    minimum: Optional[float] = None,
    *,
    positive: bool = False,
) -> float:
    """``value`` as a finite ``float`` (bools refused), ``>= minimum`` or ``> 0`` if
    ``positive``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number, got {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    if positive and value <= 0:
        raise ValueError(f"{name} must be positive, got {value}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be at least {minimum}, got {value}")
    return value


SEED_LIMIT = 2**32


def check_seed(name: str, value: Any) -> int:
    """A seed for numpy, scikit-learn's ``random_state`` and ``torch.manual_seed``: an int
    in ``[0, 2**32)``."""
    value = check_int(name, value, minimum=0)
    if value >= SEED_LIMIT:
        raise ValueError(f"{name} must be less than 2**32, got {value}")
    return value


def check_choice(name: str, value: Any, choices: Iterable[str]) -> str:
    """``value`` if it is one of ``choices``, else a ``ValueError`` listing them."""
    choices = list(choices)
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}, got {value!r}")
    return value


_FLOAT_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32, "float64": torch.float64}


def check_dtype(name: str, value: Any) -> torch.dtype:
    """A floating ``torch.dtype``, given as one or by name (``"float64"``, as in configs)."""
    if isinstance(value, str):
        dtype = _FLOAT_DTYPES.get(value.removeprefix("torch."))
        if dtype is None:
            raise ValueError(f"{name} must be one of {', '.join(_FLOAT_DTYPES)}, got {value!r}")
        return dtype
    if not isinstance(value, torch.dtype) or not value.is_floating_point:
        raise TypeError(f"{name} must be a floating torch.dtype such as torch.float32, got {value!r}")
    return value


@contextlib.contextmanager
def initialisation_rng(seed: Optional[int]) -> Iterator[None]:
    """Draw a built-in model's initial parameters from ``torch.manual_seed(seed)`` without
    touching the global CPU generator's state; with ``seed=None``, from the global generator."""
    if seed is None:
        yield
        return
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(check_seed("seed", seed))
        yield
