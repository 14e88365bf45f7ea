"""The capture from a flat ``nn.Linear`` head (:class:`ntk_torch.kernel.structured.plan.FlatHead`):
found only where the model's output is the head's output, exact, and replaced by the
general capture from the first block whose output is not the head's."""

import pytest
import torch
from torch import nn

import ntk_torch as ntk
from ntk_torch.functional import FunctionalModel
from ntk_torch.kernel import MODES
from ntk_torch.kernel.structured import analyse
from ntk_torch.kernel.structured import capture as capture_module
from ntk_torch.kernel.structured import plan as plan_module

from reference import naive_ntk, reduce_mode

F64 = torch.float64


@pytest.fixture(autouse=True)
def any_head_width(monkeypatch):
    """The zoo's heads are narrow: take the head path whatever the head's size."""
    monkeypatch.setattr(plan_module, "MIN_HEAD_WEIGHT", 0)


class Scaled(nn.Module):
    """``head(h) * scale``: the output is not the head's output tensor."""

    def __init__(self):
        super().__init__()
        self.body = nn.Linear(5, 6)
        self.head = nn.Linear(6, 3)
        self.scale = None

    def forward(self, x):
        y = self.head(torch.tanh(self.body(x)))
        return y if self.scale is None else y * self.scale


class TwiceCalled(nn.Module):
    def __init__(self):
        super().__init__()
        self.head = nn.Linear(4, 4)

    def forward(self, x):
        return self.head(torch.tanh(self.head(x)))


class PerPosition(nn.Module):
    """A head applied at every position: per example ``(T, O)``, not ``(O,)``."""

    def __init__(self):
        super().__init__()
        self.body = nn.Linear(3, 5)
        self.head = nn.Linear(5, 2)

    def forward(self, x):  # (N, T, 3)
        return self.head(torch.tanh(self.body(x)))


class ConvHead(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3, padding=1)
        self.head = nn.Linear(3 * 4 * 4, 4)

    def forward(self, x):  # (N, 2, 4, 4)
        return self.head(torch.relu(self.conv(x)).flatten(1))


def _mlp():
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 6), nn.ReLU(), nn.Linear(6, 3), nn.Identity())


def _plan(model, x, output_fn=None):
    fmodel = FunctionalModel(model, dtype=F64, output_fn=output_fn)
    num_outputs = fmodel.output_size(x, x.shape[0])
    return fmodel, analyse(fmodel, x, num_outputs)


def test_flat_head_is_the_last_linear_of_an_mlp():
    torch.manual_seed(0)
    _, plan = _plan(_mlp(), torch.randn(3, 5, dtype=F64))
    assert plan.head is not None
    assert plan.head.key == ("4", 0) and plan.head.weight == "4.weight"


@pytest.mark.parametrize("model, x, output_fn", [
    (Scaled(), torch.randn(3, 5), None),
    (TwiceCalled(), torch.randn(3, 4), None),
    (PerPosition(), torch.randn(3, 2, 3), None),
    (_mlp(), torch.randn(3, 5), lambda out: out * 1.0),
    (nn.Sequential(nn.Linear(5, 3), nn.Tanh()), torch.randn(3, 5), None),
], ids=["scaled", "called_twice", "per_position", "output_fn", "activation_last"])
def test_no_flat_head_unless_the_output_is_the_heads(model, x, output_fn):
    model.scale = 2.0 if isinstance(model, Scaled) else None
    _, plan = _plan(model, x.to(F64), output_fn)
    assert plan.head is None


def test_no_flat_head_when_its_weight_is_not_selected():
    torch.manual_seed(0)
    model = _mlp()
    fmodel = FunctionalModel(model, dtype=F64, params=["0.weight", "0.bias", "2.weight"])
    x = torch.randn(3, 5, dtype=F64)
    assert analyse(fmodel, x, 3).head is None
    kernel = ntk.empirical_ntk(model, x, method="structured", dtype=F64, params=["0.weight", "0.bias", "2.weight"])
    reference = ntk.empirical_ntk(model, x, method="jacobian", dtype=F64, params=["0.weight", "0.bias", "2.weight"])
    torch.testing.assert_close(kernel, reference, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("make, shape", [(_mlp, (5,)), (ConvHead, (2, 4, 4))], ids=["mlp", "conv"])
def test_capture_from_the_head_matches_the_naive_kernel_and_the_general_capture(make, shape, monkeypatch):
    torch.manual_seed(1)
    model = make()
    x1, x2 = torch.randn(4, *shape, dtype=F64), torch.randn(3, *shape, dtype=F64)
    _, plan = _plan(model, x1)
    assert plan.head is not None
    calls = []
    original = capture_module._capture_from_head
    monkeypatch.setattr(capture_module, "_capture_from_head",
                        lambda *a: calls.append(1) or original(*a))
    from_head = {mode: (ntk.NTK(model, mode=mode, method="structured", dtype=F64)(x1),
                        ntk.NTK(model, mode=mode, method="structured", dtype=F64)(x1, x2)) for mode in MODES}
    assert calls
    monkeypatch.setattr(plan_module, "_flat_head", lambda *a: None)
    ref_same, ref_cross = naive_ntk(model, x1), naive_ntk(model, x1, x2)
    for mode in MODES:
        general = ntk.NTK(model, mode=mode, method="structured", dtype=F64)
        torch.testing.assert_close(from_head[mode][0], general(x1), rtol=1e-12, atol=1e-13)
        torch.testing.assert_close(from_head[mode][1], general(x1, x2), rtol=1e-12, atol=1e-13)
        torch.testing.assert_close(from_head[mode][0], reduce_mode(ref_same, mode), rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(from_head[mode][1], reduce_mode(ref_cross, mode), rtol=1e-10, atol=1e-12)


def test_block_whose_output_is_not_the_heads_is_captured_the_general_way():
    """The plan found the head, then the model's output stopped being the head's (an
    attribute changed): the capture notices and captures the block the general way."""
    torch.manual_seed(2)
    model = Scaled()
    x = torch.randn(4, 5, dtype=F64)
    fmodel, plan = _plan(model, x)
    assert plan.head is not None
    model.scale = 3.0
    assert capture_module._capture_from_head(plan, fmodel, x, None) is None
    head = capture_module.key_name(plan.head.key)
    records, cotangents, jacobians = capture_module.capture(plan, fmodel, x, None)
    eye = torch.eye(3, dtype=F64).expand(4, 3, 3)
    torch.testing.assert_close(cotangents[head], 3.0 * eye)  # d(3 y)/dy, not the identity
    assert plan.head is None  # later blocks go the general way at once
    kernel = ntk.empirical_ntk(model, x, method="structured", dtype=F64)
    torch.testing.assert_close(kernel, naive_ntk(model, x), rtol=1e-10, atol=1e-12)


def test_only_a_wide_head_is_worth_the_head_path(monkeypatch):
    monkeypatch.undo()  # the default MIN_HEAD_WEIGHT
    x = torch.randn(2, 5, dtype=F64)
    narrow = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3))
    wide = nn.Sequential(nn.Linear(5, 8192), nn.Tanh(), nn.Linear(8192, 8))
    assert plan_module.MIN_HEAD_WEIGHT == 8192 * 8
    assert _plan(narrow, x)[1].head is None
    assert _plan(wide, x)[1].head is not None
