"""ntk_torch: training dynamics of PyTorch models through the empirical Neural Tangent Kernel."""

from .errors import NonFiniteKernelError
from .kernel import PerLayerKernels, empirical_ntk

__version__ = "0.1.0"

__all__ = ["NonFiniteKernelError", "PerLayerKernels", "empirical_ntk", "__version__"]
