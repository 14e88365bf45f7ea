"""``summary.json``: a run's final values, configuration and versions, for scripts.

Written by :meth:`RunWriter.close` (atomically, beside ``meta.json``)::

    {"format": "ntk_torch.summary", "version": 1,
     "run": "/abs/path/of/the/run", "status": "completed", "reason": null,
     "records": 12, "first_step": 0, "last_step": 100,
     "final": {"kernel_distance": 0.031, "layer_share.layers.0": 0.4, ...},
     "final_step": {"kernel_distance": 100, ...},
     "config": {...the tracker's options...}, "model": {"class": "MLP", "num_params": ...},
     "versions": {"ntk_torch": "...", "torch": "...", "python": "..."}}

``final`` holds, for every numeric field of the records (nested dicts flattened to dotted
names as in ``Run.metrics``), its last finite value (for a list of numbers such as
``top_eigenvalues``, the last list with a finite entry), and ``final_step`` the step it was
measured at; a field that was never finite is absent. The file is strict JSON: no
``NaN`` tokens (non-finite values become ``null``), so any JSON parser reads it.
"""

from __future__ import annotations

import json
import math
import platform
from pathlib import Path
from typing import Any, Dict, Iterator, Mapping, Optional, Tuple

from .._version import __version__
from .. import records
from .files import atomic_write
from .reading import read_json_object

__all__ = ["SUMMARY_FILE", "FinalValues", "read_summary", "strict_json", "write_summary"]

SUMMARY_FILE = "summary.json"
SUMMARY_FORMAT = "ntk_torch.summary"
SUMMARY_VERSION = 1


def _flatten(record: Mapping[str, Any], prefix: str = "") -> Iterator[Tuple[str, Any]]:
    for key, value in record.items():
        if isinstance(value, Mapping):
            yield from _flatten(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _finite_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


class FinalValues:
    """The last finite value of each numeric record field and its step, kept as records
    are appended (memory bounded by the number of fields, not of records)."""

    def __init__(self) -> None:
        self.count = 0
        self.first_step: Optional[int] = None
        self.last_step: Optional[int] = None
        self.values: Dict[str, Any] = {}
        self.steps: Dict[str, int] = {}

    def add(self, record: Mapping[str, Any]) -> None:
        step = int(record[records.STEP])
        self.count += 1
        self.first_step = step if self.first_step is None else self.first_step
        self.last_step = step
        for name, value in _flatten(record):
            numbers = isinstance(value, list) and value and all(map(_is_number, value))
            if name != records.STEP and (_finite_number(value) or (numbers and any(map(_finite_number, value)))):
                self.values[name] = value
                self.steps[name] = step


def _strict(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Mapping):
        return {str(k): _strict(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_strict(v) for v in value]
    return value


def strict_json(value: Any, **options: Any) -> str:
    """``value`` as strict JSON (non-finite floats as ``null``; numpy and torch values as
    numbers and lists via ``default``, if given)."""
    return json.dumps(_strict(json.loads(json.dumps(value, allow_nan=True, default=options.pop("default", None)))),
                      allow_nan=False, **options)


def versions() -> Dict[str, str]:
    """The versions of ntk_torch, torch and Python this process runs."""
    import torch

    return {"ntk_torch": __version__, "torch": torch.__version__, "python": platform.python_version()}


def write_summary(
    path: Path,
    meta: Mapping[str, Any],
    final: FinalValues,
    status: Optional[str],
    reason: Optional[str],
    default: Any = None,
) -> Path:
    """Write ``path/summary.json`` atomically (see the module docstring); the file."""
    model = meta.get("model")
    summary = {
        "format": SUMMARY_FORMAT,
        "version": SUMMARY_VERSION,
        "run": str(path),
        "status": status,
        "reason": reason,
        "records": final.count,
        "first_step": final.first_step,
        "last_step": final.last_step,
        "final": dict(final.values),
        "final_step": dict(final.steps),
        "config": meta.get("config"),
        "model": {k: v for k, v in model.items() if k != "summary"} if isinstance(model, Mapping) else model,
        "versions": versions(),
    }
    encoded = strict_json(summary, default=default, indent=2).encode() + b"\n"
    target = path / SUMMARY_FILE
    atomic_write(target, lambda file: file.write(encoded))
    return target


def read_summary(path: Path) -> Optional[Dict[str, Any]]:
    """The parsed ``summary.json`` of the run in ``path``, or None where there is none.

    Raises:
        ValueError: it exists but is not valid JSON (or absurdly large or deep) or not a
            summary written by ntk_torch.
    """
    file = path / SUMMARY_FILE
    if not file.is_file():
        return None
    return read_json_object(file, SUMMARY_FORMAT)
