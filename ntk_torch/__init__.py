"""ntk_torch: training dynamics of PyTorch models through the empirical Neural Tangent Kernel."""

from . import data, metrics, models, predict
from .errors import NonFiniteKernelError
from .kernel import PerLayerKernels, empirical_ntk
from .linearize import LinearizedModel, linearize
from .predict import Prediction
from .runs import Run, RunWriter, load_run
from .tracker import NTKTracker

__version__ = "0.1.0"

_LAZY_MODULES = ("plots", "report")  # matplotlib is imported only when figures are asked for


def __getattr__(name: str):
    if name in _LAZY_MODULES:
        import importlib

        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

__all__ = [
    "LinearizedModel",
    "NTKTracker",
    "NonFiniteKernelError",
    "PerLayerKernels",
    "Prediction",
    "Run",
    "RunWriter",
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
