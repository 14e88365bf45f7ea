"""Shared pytest configuration."""

import os

import matplotlib
import pytest
import torch

from ntk_torch import allocator

matplotlib.use("Agg")

# The tests call the ntk-torch command in this process: keep glibc's defaults here, so that
# no test's memory figures depend on which command test ran first (tests/test_allocator.py
# exercises the setting itself, in subprocesses and with a fake C library).
os.environ[allocator.KEEP_FREED_MEMORY] = "0"


@pytest.fixture
def one_thread():
    """One intra-op thread for the test: tiny networks run faster on one, and steadily on
    a machine that other work keeps busy."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
