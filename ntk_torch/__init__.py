"""ntk_torch: training dynamics of PyTorch models through the empirical Neural Tangent Kernel."""

from . import data, metrics, models, predict
from .errors import NonFiniteKernelError, UnsupportedModelError
from ._version import __version__
from .kernel import NTK, PerLayerKernels, empirical_ntk
from .linearize import LinearizedModel, linearize
from .predict import Prediction
from .runs import Run, RunWriter, load_run
from .tracker import NTKTracker

_LAZY_MODULES = ("plots", "report")  # matplotlib is imported only when figures are asked for


def __getattr__(name: str):
    if name in _LAZY_MODULES:
        import importlib

        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

__all__ = [
    "LinearizedModel",
    "NTK",
    "NTKTracker",
    "NonFiniteKernelError",
    "PerLayerKernels",
    "Prediction",
    "Run",
    "RunWriter",
    "UnsupportedModelError",
    "empirical_ntk",
    "linearize",
    "load_run",
    "metrics",
    "predict",
    "data",
    "models",
    "plots",
    "report",
    "__version__",
]
