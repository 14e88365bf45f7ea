"""Compile and distribution wrappers: kernels and the tracker see the module inside.

``torch.compile`` runs here with a counting backend (the graph that dynamo captured, run
as it is): it counts every compilation, so a kernel or a tracker that called the compiled
module would show up as one more. The slow lane repeats the training comparison with
torch's default (inductor) backend, which needs a C++ compiler.
"""

from __future__ import annotations

import copy
import shutil

import pytest
import torch
from torch import nn

import ntk_torch as ntk
from ntk_torch.functional import unwrap_model

from zoo import MLP


class CountingBackend:
    """A ``torch.compile`` backend that counts the graphs it is given."""

    def __init__(self):
        self.graphs = 0

    def __call__(self, graph_module, example_inputs):
        self.graphs += 1
        return graph_module.forward


def _data(n=8):
    g = torch.Generator().manual_seed(3)
    return torch.randn(n, 6, generator=g), torch.randn(n, 3, generator=g)


@pytest.mark.slow
def test_unwrap_finds_the_module_inside_any_nesting_of_wrappers():
    model = MLP()
    compiled = torch.compile(model, backend=CountingBackend())
    assert unwrap_model(compiled) is model
    assert unwrap_model(nn.DataParallel(compiled)) is model
    assert unwrap_model(torch.compile(nn.DataParallel(model), backend=CountingBackend())) is model
    assert unwrap_model(model) is model
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        unwrap_model(lambda x: x)


def test_kernel_of_a_compiled_model_is_that_of_the_model_and_compiles_nothing():
    torch.manual_seed(0)
    model = MLP()
    backend = CountingBackend()
    compiled = torch.compile(model, backend=backend)
    x, _ = _data()
    kernel = ntk.NTK(compiled, mode="trace")
    assert kernel.model is model
    assert torch.equal(kernel(x), ntk.empirical_ntk(model, x, mode="trace"))
    assert backend.graphs == 0


def _train(model, compiled, steps, with_tracker):
    x, y = _data()
    optimizer = torch.optim.SGD(compiled.parameters(), lr=0.1, momentum=0.9)
    tracker = ntk.NTKTracker(compiled, train=(x, y), probe_size=4, every=1, loss="mse", progress=False) if with_tracker else None
    torch.manual_seed(11)
    context = tracker.attach(optimizer) if tracker is not None else _nothing()
    with context:
        for step in range(steps):
            optimizer.zero_grad()
            nn.functional.mse_loss(compiled(x), y).backward()
            optimizer.step()
    return {name: p.detach().clone() for name, p in model.named_parameters()}, tracker


class _nothing:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def _compare_training(make_backend):
    """Three SGD steps of a compiled MLP without and with a tracker (its own backend from
    ``make_backend()`` each time): bit-identical parameters."""
    torch.manual_seed(0)
    reference = MLP()
    runs = []
    for with_tracker in (False, True):
        model = copy.deepcopy(reference)
        compiled = torch.compile(model, backend=make_backend())
        params, tracker = _train(model, compiled, steps=3, with_tracker=with_tracker)
        runs.append((params, compiled, tracker))
    (plain, _, _), (tracked, _, tracker) = runs
    for name in plain:
        assert torch.equal(plain[name], tracked[name]), name
    assert len(tracker.records) == 4  # steps 0 to 3 measured
    return runs


@pytest.mark.slow
def test_tracker_on_a_compiled_model_is_bit_identical_and_compiles_nothing_more():
    backends = []

    def make():
        backends.append(CountingBackend())
        return backends[-1]

    _compare_training(make)
    without, with_tracker = backends
    assert without.graphs > 0
    assert with_tracker.graphs == without.graphs


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("g++") is None and shutil.which("cc") is None, reason="inductor needs a C++ compiler")
def test_tracker_on_an_inductor_compiled_model_is_bit_identical():
    _compare_training(lambda: "inductor")
