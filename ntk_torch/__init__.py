"""ntk_torch: training dynamics of PyTorch models through the empirical Neural Tangent Kernel.

The public names are imported on first use (PEP 562), so that ``import ntk_torch`` (and
the ``ntk-torch`` command starting up) does not import torch until something needs it:
``ntk_torch.NTKTracker`` or ``from ntk_torch import NTKTracker`` works as usual.
"""

import importlib
import sys
import types
from typing import Any, List

from ._version import __version__
from .errors import NonFiniteKernelError, UnsupportedModelError

_DEFINED_IN = {
    "DistributedKernelError": "errors",
    "KernelStoreError": "errors",
    "KernelShard": "kernel",
    "KernelTile": "kernel",
    "NTK": "kernel",
    "NTKOperator": "kernel",
    "PerLayerKernels": "kernel",
    "empirical_ntk": "kernel",
    "eigsh": "spectral",
    "LinearizedModel": "linearize",
    "linearize": "linearize",
    "Prediction": "predict",
    "Run": "runs",
    "RunWriter": "runs",
    "load_run": "runs",
    "NTKTracker": "tracker",
    "select": "selection",
    "mlp_kernels": "analytic",
    "keep_freed_memory": "allocator",
}
"""Public names -> the module defining them."""
_MODULES = ("analytic", "data", "estimate", "metrics", "models", "predict", "plots", "report")
"""Public submodules (matplotlib, for plots and report, only when figures are asked for)."""


def __getattr__(name: str) -> Any:
    if name in _MODULES:
        return importlib.import_module(f".{name}", __name__)
    if name in _DEFINED_IN:
        value = getattr(importlib.import_module(f".{_DEFINED_IN[name]}", __name__), name)
        setattr(sys.modules[__name__], name, value)
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> List[str]:
    return sorted(__all__)


class _Package(types.ModuleType):
    """The package module: ``ntk_torch.linearize`` stays the function when the submodule
    of the same name is imported (the import system would bind the submodule there)."""

    def __setattr__(self, name: str, value: Any) -> None:
        if isinstance(value, types.ModuleType) and _DEFINED_IN.get(name) == name:
            value = getattr(value, name)
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package

__all__ = [
    "DistributedKernelError",
    "KernelShard",
    "KernelStoreError",
    "KernelTile",
    "LinearizedModel",
    "NTK",
    "NTKOperator",
    "NTKTracker",
    "NonFiniteKernelError",
    "PerLayerKernels",
    "Prediction",
    "Run",
    "RunWriter",
    "UnsupportedModelError",
    "eigsh",
    "empirical_ntk",
    "estimate",
    "keep_freed_memory",
    "linearize",
    "load_run",
    "mlp_kernels",
    "analytic",
    "metrics",
    "select",
    "predict",
    "data",
    "models",
    "plots",
    "report",
    "__version__",
]
