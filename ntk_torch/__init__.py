"""ntk_torch: training dynamics of PyTorch models through the empirical Neural Tangent Kernel."""

from . import data, metrics, models, predict
from .errors import NonFiniteKernelError
from .kernel import PerLayerKernels, empirical_ntk
from .linearize import LinearizedModel, linearize
from .predict import Prediction
from .runs import Run, RunWriter, load_run
from .tracker import NTKTracker

__version__ = "0.1.0"

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
    "__version__",
]
