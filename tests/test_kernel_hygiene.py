"""empirical_ntk leaves the model, the RNGs and the autograd state as it found them.

Every test runs on each of ``METHODS`` (``auto`` included), so the structured engine, which
registers forward hooks and a ``TorchFunctionMode`` while it analyses and captures, is
held to the same hygiene as the others.
"""

import random

import numpy as np
import pytest
import torch
from torch import nn

import ntk_torch as ntk
from ntk_torch.kernel import METHODS
from torch.nn.modules import module as module_hooks

from helpers import live_tensor_count
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


@pytest.mark.parametrize("method", METHODS)
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


@pytest.mark.parametrize("method", METHODS)
def test_kernel_is_computed_in_eval_mode(conv_case, method):
    model = conv_case.model
    x = conv_case.make_inputs(4, 0)
    model.eval()
    in_eval = ntk.empirical_ntk(model, x, method=method)
    model.train()  # Dropout and batch statistics would change the kernel
    assert torch.equal(ntk.empirical_ntk(model, x, method=method), in_eval)
    assert model.training


@pytest.mark.parametrize("method", METHODS)
def test_no_grad_written_when_there_was_none(conv_case, method):
    model = conv_case.model
    ntk.empirical_ntk(model, conv_case.make_inputs(3, 0), method=method)
    assert all(p.grad is None for p in model.parameters())


class Exploding(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3, 2)
        self.dropout = nn.Dropout(0.5)

    def forward(self, x):
        torch.rand(1)  # draws from the RNG, which must be restored
        raise RuntimeError("boom")


@pytest.mark.parametrize("method", METHODS)
def test_state_restored_after_an_error(method):
    model = Exploding().train()
    x = torch.randn(4, 3)
    before, rng = snapshot(model), rng_states()
    with pytest.raises(RuntimeError, match="boom"):
        ntk.empirical_ntk(model, x, method=method)
    assert_unchanged(model, before)
    assert_same_rng(rng)


@pytest.mark.parametrize("method", METHODS)
def test_state_restored_after_a_bad_output(conv_case, method):
    model = conv_case.model.train()
    before = snapshot(model)
    with pytest.raises(ValueError, match="first dimension"):
        ntk.empirical_ntk(model, conv_case.make_inputs(3, 0), method=method, output_fn=lambda out: out.sum(0))
    assert_unchanged(model, before)


class FailsOnCall(nn.Module):
    """Raises in the middle of forward call number ``fail_at``, counting every forward
    (the analysis passes and the engine's own, inside ``vmap``/``jacrev``), after the
    covered ``fc1`` and ``norm`` have run, i.e. while the structured engine's hooks and use
    watcher are attached. Outside function transforms it also draws from the RNG."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(3, 5)
        self.norm = nn.LayerNorm(5)
        self.act = nn.Tanh()
        self.dropout = nn.Dropout(0.5)
        self.fc2 = nn.Linear(5, 2)
        self.calls = 0
        self.fail_at = None
        self.failed_in_transform = []

    def forward(self, x):
        self.calls += 1
        in_transform = torch._C._functorch.peek_interpreter_stack() is not None
        if not in_transform:
            torch.rand(1)
        h = self.act(self.norm(self.fc1(x)))
        if self.calls == self.fail_at:
            self.failed_in_transform.append(in_transform)
            raise RuntimeError(f"boom on call {self.calls}")
        return self.fc2(self.dropout(h))


def _user_hook(module, args, output):
    return None


def hook_state(model):
    """Every module's forward (pre-)hooks, and the global ones."""
    return {
        "modules": [(dict(m._forward_pre_hooks), dict(m._forward_hooks)) for m in model.modules()],
        "global": (dict(module_hooks._global_forward_pre_hooks), dict(module_hooks._global_forward_hooks)),
    }


def assert_transform_state_clean():
    """No TorchFunctionMode, function transform or no_grad left active."""
    assert torch._C._len_torch_function_stack() == 0
    assert torch._C._functorch.peek_interpreter_stack() is None
    assert torch.is_grad_enabled()
    assert torch.backends.mha.get_fastpath_enabled()


@pytest.mark.parametrize("with_user_hook", [False, True], ids=["no_user_hooks", "user_hook"])
@pytest.mark.parametrize("method", METHODS)
def test_state_restored_after_an_error_in_any_forward_pass(method, with_user_hook):
    """An error raised in each forward pass of a call in turn -- the analysis, then the
    engine's capture or Jacobians block by block -- leaves the modes, parameters, buffers,
    ``.grad``, RNG and hooks as they were, and a configured NTK that saw those errors
    computes the same kernel afterwards."""
    torch.manual_seed(0)
    model = FailsOnCall()
    x = torch.randn(4, 3)
    options = dict(method=method, batch_size=2)  # 2x2 blocks: several engine passes
    expected = ntk.empirical_ntk(model, x, **options)
    total = model.calls
    model.train()
    model.norm.eval()  # a mixed-mode model
    if with_user_hook:
        model.act.register_forward_hook(_user_hook)  # a parameter-free module: no rule
    model(x).sum().backward()  # existing .grad must survive untouched
    before, hooks = snapshot(model), hook_state(model)
    if not with_user_hook:  # the structured engine's own hooks are all removed
        assert all(not pre and not post for pre, post in hooks["modules"])
    kernel = ntk.NTK(model, **options)
    in_transform = []  # whether the k-th pass ran inside a function transform
    for k in range(1, total + 1):
        model.calls, model.fail_at = 0, k
        rng = rng_states()
        with pytest.raises(RuntimeError, match=f"boom on call {k}$"):
            ntk.empirical_ntk(model, x, **options)
        in_transform.append(model.failed_in_transform[-1])
        assert_unchanged(model, before)
        assert_same_rng(rng)
        assert hook_state(model) == hooks
        assert_transform_state_clean()
        model.calls = 0  # the same failure through one configured NTK, call after call
        try:
            kernel(x)
        except RuntimeError:
            pass
        assert_unchanged(model, before)
        assert hook_state(model) == hooks
        assert_transform_state_clean()
    # the analysis passes run outside function transforms, the engine's inside (the loop
    # engine's outside too: it uses none)
    assert in_transform[0] is False and in_transform[-1] is (method != "loop")
    model.fail_at = None
    assert torch.equal(kernel(x), expected)
    assert torch.equal(ntk.empirical_ntk(model, x, **options), expected)
    assert_unchanged(model, before)


@pytest.mark.parametrize("method", METHODS)
def test_model_drawing_random_numbers_in_eval_mode_leaves_no_trace(method):
    class Noisy(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 2)

        def forward(self, x):
            return self.fc(x) + 0 * torch.randn(())

    model, x = Noisy(), torch.randn(4, 3)
    rng = rng_states()
    ntk.empirical_ntk(model, x, method=method)
    assert_same_rng(rng)


@pytest.mark.parametrize("method", METHODS)
def test_transformer_fast_path_setting_is_restored(method):
    mha = torch.backends.mha
    assert mha.get_fastpath_enabled()
    case = make_zoo()["transformer"]
    ntk.empirical_ntk(case.model, case.make_inputs(3, 0), mode="trace", method=method)
    assert mha.get_fastpath_enabled()


@pytest.mark.slow
@pytest.mark.parametrize("method", METHODS)
def test_repeated_calls_keep_no_tensors_alive(method):
    case = make_zoo()["cnn_bn"]
    x = case.make_inputs(3, 0)
    ntk.empirical_ntk(case.model, x, method=method)  # first call: lazy initialisation in torch
    before = live_tensor_count()
    for _ in range(3):
        ntk.empirical_ntk(case.model, x, method=method, per_layer=True)
    assert live_tensor_count() == before


def _fail(model, x, method, k):
    model.calls, model.fail_at = 0, k
    try:
        ntk.empirical_ntk(model, x, method=method, batch_size=2)
    except RuntimeError:
        return
    raise AssertionError(f"call {k} did not fail")


@pytest.mark.slow
@pytest.mark.parametrize("method", METHODS)
def test_errors_keep_no_tensors_alive(method):
    """A call that fails inside the engine's passes (the structured capture, the
    Jacobians) leaves nothing behind: no captured records, cotangents, probes or blocks."""
    torch.manual_seed(0)
    model = FailsOnCall()
    x = torch.randn(4, 3)
    ntk.empirical_ntk(model, x, method=method, batch_size=2)
    last, middle = model.calls, model.calls - 1
    _fail(model, x, method, last)  # first failure: lazy initialisation in torch
    before = live_tensor_count()
    for _ in range(2):
        _fail(model, x, method, middle)  # a later block fails after earlier blocks ran
        _fail(model, x, method, last)
    assert live_tensor_count() == before
    uses_transforms = method != "loop"
    assert all(failed is uses_transforms for failed in model.failed_in_transform)
