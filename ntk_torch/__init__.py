"""ntk_torch: training dynamics of PyTorch models through the empirical Neural Tangent Kernel."""

from . import metrics
from .errors import NonFiniteKernelError
from .kernel import PerLayerKernels, empirical_ntk
from .runs import Run, RunWriter, load_run

__version__ = "0.1.0"

__all__ = [
    "NonFiniteKernelError",
    "PerLayerKernels",
    "Run",
    "RunWriter",
    "empirical_ntk",
    "load_run",
    "metrics",
    "__version__",
]
