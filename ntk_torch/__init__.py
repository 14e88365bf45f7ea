"""ntk_torch: training dynamics of PyTorch models through the empirical Neural Tangent Kernel."""

__version__ = "0.1.0"
