"""empirical_ntk leaves the model, the RNGs and the autograd state as it found them."""

import random

import numpy as np
import pytest
import torch
from torch import nn

import ntk_torch as ntk

from zoo import make_zoo


@pytest.fixture
def conv_case():
    return make_zoo()["cnn_bn"]


def snapshot(model):
    return {
        "state": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "modes": [m.training for m in model.modules()],
        "requires_grad": [p.requires_grad for p in model.parameters()],
        "grads": [None if p.grad is None else p.grad.clone() for p in model.parameters()],
    }


def assert_unchanged(model, before):
    after = snapshot(model)
    assert after["modes"] == before["modes"]
    assert after["requires_grad"] == before["requires_grad"]
    for key, value in before["state"].items():
        assert torch.equal(after["state"][key], value), key
    for g_after, g_before in zip(after["grads"], before["grads"]):
        assert (g_after is None) == (g_before is None)
        if g_before is not None:
            assert torch.equal(g_after, g_before)


def rng_states():
    return torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate()


def assert_same_rng(before):
    torch_state, numpy_state, python_state = before
    assert torch.equal(torch.get_rng_state(), torch_state)
    assert np.array_equal(np.random.get_state()[1], numpy_state)
    assert random.getstate() == python_state


@pytest.mark.parametrize("method", ["jacobian", "ntk_vp"])
def test_call_leaves_everything_as_it_was(conv_case, method):
    model = conv_case.model
    model.train()
    model.head.eval()  # a mixed-mode model: each module's flag is restored
    x = conv_case.make_inputs(4, 0)
    model(x).sum().backward()  # existing .grad must survive untouched
    before, rng = snapshot(model), rng_states()
    kernel = ntk.empirical_ntk(model, x, method=method)
    assert_unchanged(model, before)  # BatchNorm running statistics did not move
    assert_same_rng(rng)
    assert kernel.grad_fn is None and not kernel.requires_grad


def test_kernel_is_computed_in_eval_mode(conv_case):
    model = conv_case.model
    x = conv_case.make_inputs(4, 0)
    model.eval()
    in_eval = ntk.empirical_ntk(model, x)
    model.train()  # Dropout and batch statistics would change the kernel
    assert torch.equal(ntk.empirical_ntk(model, x), in_eval)
    assert model.training


def test_no_grad_written_when_there_was_none(conv_case):
    model = conv_case.model
    ntk.empirical_ntk(model, conv_case.make_inputs(3, 0))
    assert all(p.grad is None for p in model.parameters())


class Exploding(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3, 2)
        self.dropout = nn.Dropout(0.5)

    def forward(self, x):
        torch.rand(1)  # draws from the RNG, which must be restored
        raise RuntimeError("boom")


def test_state_restored_after_an_error():
    model = Exploding().train()
    x = torch.randn(4, 3)
    before, rng = snapshot(model), rng_states()
    with pytest.raises(RuntimeError, match="boom"):
        ntk.empirical_ntk(model, x)
    assert_unchanged(model, before)
    assert_same_rng(rng)


def test_state_restored_after_a_bad_output(conv_case):
    model = conv_case.model.train()
    before = snapshot(model)
    with pytest.raises(ValueError, match="first dimension"):
        ntk.empirical_ntk(model, conv_case.make_inputs(3, 0), output_fn=lambda out: out.sum(0))
    assert_unchanged(model, before)


def test_model_drawing_random_numbers_in_eval_mode_leaves_no_trace():
    class Noisy(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 2)

        def forward(self, x):
            return self.fc(x) + 0 * torch.randn(())

    model, x = Noisy(), torch.randn(4, 3)
    rng = rng_states()
    for method in ("jacobian", "ntk_vp"):
        ntk.empirical_ntk(model, x, method=method)
    assert_same_rng(rng)


def test_transformer_fast_path_setting_is_restored():
    mha = torch.backends.mha
    assert mha.get_fastpath_enabled()
    case = make_zoo()["transformer"]
    ntk.empirical_ntk(case.model, case.make_inputs(3, 0), mode="trace")
    assert mha.get_fastpath_enabled()


def _live_tensor_count():
    import gc

    gc.collect()
    return sum(1 for obj in gc.get_objects() if isinstance(obj, torch.Tensor))


@pytest.mark.parametrize("method", ["jacobian", "ntk_vp", "auto"])
def test_repeated_calls_keep_no_tensors_alive(method):
    case = make_zoo()["cnn_bn"]
    x = case.make_inputs(3, 0)
    ntk.empirical_ntk(case.model, x, method=method)  # first call: lazy initialisation in torch
    before = _live_tensor_count()
    for _ in range(3):
        ntk.empirical_ntk(case.model, x, method=method, per_layer=True)
    assert _live_tensor_count() == before
