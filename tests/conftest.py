"""Shared pytest configuration."""

import matplotlib
import pytest
import torch

matplotlib.use("Agg")


@pytest.fixture
def one_thread():
    """One intra-op thread for the test: tiny networks run faster on one, and steadily on
    a machine that other work keeps busy."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
