"""Any nn.Module: models that torch.func cannot run as they are.

RNNs, ``torch.utils.checkpoint``, masks with data-dependent control flow, sparse
embeddings (no ``vmap``), ``weight_norm`` and tied embeddings with a ``padding_idx`` (no
usable forward mode), nested inputs with arguments that are not batched (Hugging Face
models: ``test_transformers.py``, which runs late: importing ``transformers`` triples
the objects the garbage collector walks in the other files' tensor counts). Every method
and mode gives the exact kernel of
the naive float64 reference (for ``x2=None`` and ``x1 != x2``), or -- for ``jacobian`` and
``ntk_vp`` where ``vmap`` cannot run the model -- an ``UnsupportedModelError`` naming the
layer and the operation; the engines agree in float32; the hygiene of the other engines
holds.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import ntk_torch as ntk
import test_kernel_hygiene as hygiene
from ntk_torch import UnsupportedModelError
from ntk_torch.kernel import METHODS, MODES, explain
from ntk_torch.kernel.planning import FALLBACK_WARNING

from helpers import kernel_plan, live_tensor_count
from reference import naive_ntk, reduce_mode
from zoo import ANY_MODULE_NAMES, PaddedTied, make_any_module_zoo, make_zoo

F64 = torch.float64
N1, N2 = 3, 2
RTOL = 1e-10
REFUSED = ("jacobian", "ntk_vp")  # the engines that need vmap over examples

# What the refusal names for each model vmap cannot run: the layer and the operation.
WHERE = {
    "lstm": "layer 'first' (LSTM), operation torch.lstm",
    "gru": "layer 'first' (GRU), operation torch.gru",
    "rnn": "layer 'first' (RNN), operation torch.rnn_tanh",
    "checkpoint": "the root module (Checkpointed), operation torch.utils.checkpoint.checkpoint",
    "sparse_embedding": "layer 'embed' (Embedding) uses sparse gradients (sparse=True)",
    "masked": "the root module (MaskedMean), operation Tensor.__bool__, at tests/zoo.py",
}


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    assert actual.shape == expected.shape and actual.dtype == F64
    return float((actual - expected).abs().max() / expected.abs().max().clamp_min(1e-300))


@pytest.fixture(scope="module")
def zoo():
    return make_any_module_zoo()


def references_of(cases, n1=N1, n2=N2):
    """``{name: (x1, x2, naive kernel of x1, naive kernel of x1 and x2)}``."""
    refs = {}
    for name, case in cases.items():
        x1, x2 = case.make_inputs(n1, 0), case.make_inputs(n2, 1)
        common = dict(output_fn=case.output_fn, call_kwargs=case.call_kwargs)
        refs[name] = (x1, x2, naive_ntk(case.model, x1, None, **common), naive_ntk(case.model, x1, x2, **common))
    return refs


@pytest.fixture(scope="module")
def references(zoo):
    return references_of(zoo)


def kernel_of(case, method, mode, **options):
    return ntk.NTK(case.model, mode=mode, method=method, output_fn=case.output_fn, call_kwargs=case.call_kwargs,
                   **options)


def assert_exact_or_refused(case, refs, method):
    """Every mode exact against the reference (x2=None and x1 != x2), or refused naming the
    layer and the operation where vmap cannot run the model."""
    x1, x2, same, cross = refs
    if not case.vmap and method in REFUSED:
        with pytest.raises(UnsupportedModelError) as info:
            kernel_of(case, method, "full", dtype=F64)(x1)
        message = str(info.value)
        assert f"method={method!r} cannot run this model: torch.func.vmap fails in" in message
        assert WHERE.get(case.name, "operation ") in message
        assert "use method='loop'" in message
        return
    for mode in MODES:
        kernel = kernel_of(case, method, mode, dtype=F64)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=FALLBACK_WARNING)  # tested below
            got_same, got_cross = kernel(x1), kernel(x1, x2)
        assert relative_error(got_same, reduce_mode(same, mode)) < RTOL, mode
        assert relative_error(got_cross, reduce_mode(cross, mode)) < RTOL, mode


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("name", ANY_MODULE_NAMES)
def test_every_method_and_mode_is_exact_or_refused(zoo, references, name, method):
    assert_exact_or_refused(zoo[name], references[name], method)


# torch's oneDNN recurrent kernels (float32 on CPU) take seconds to set up for each new
# shape: the recurrent models agree in float32 in the slow lane.
RECURRENT = ("lstm", "gru", "rnn")
FLOAT32_NAMES = [
    pytest.param(name, marks=pytest.mark.slow) if name in RECURRENT else name for name in ANY_MODULE_NAMES
]


@pytest.mark.parametrize("name", FLOAT32_NAMES)
def test_engines_agree_in_float32(zoo, name):
    case = zoo[name]
    x1, x2 = case.make_inputs(4, 3), case.make_inputs(3, 4)
    methods = [m for m in METHODS if case.vmap or m not in REFUSED]
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=FALLBACK_WARNING)
        kernels = {m: kernel_of(case, m, "full")(x1, x2) for m in methods}
    for method, kernel in kernels.items():
        assert kernel.dtype == torch.float32
        torch.testing.assert_close(kernel, kernels["loop"], rtol=1e-4, atol=1e-5, msg=method)


# ---------------------------------------------------------------------------------------
# auto, explain and the dry runs
# ---------------------------------------------------------------------------------------

def test_auto_falls_back_once_with_a_warning_naming_the_reason(zoo):
    case = zoo["masked"]
    x1, x2 = case.make_inputs(4, 0), case.make_inputs(3, 1)
    kernel = ntk.NTK(case.model, method="auto")
    with pytest.warns(RuntimeWarning, match=FALLBACK_WARNING) as record:
        kernel(x1)
        kernel(x1, x2)
        kernel(x2)  # another input size: a new analysis, the same reason: no new warning
    messages = [str(w.message) for w in record if FALLBACK_WARNING in str(w.message)]
    assert len(messages) == 1
    assert "operation Tensor.__bool__, at tests/zoo.py" in messages[0] and "`if mask.all():`" in messages[0]
    assert "RuntimeError: vmap: It looks like" in messages[0]  # the exception's first line
    engine = kernel_plan(case.model, x1, method="auto").engine
    assert engine.name in ("loop", "structured")
    assert getattr(engine, "per_example", True)


def test_explain_names_what_falls_back_and_why(zoo):
    case = zoo["masked"]
    x = case.make_inputs(3, 0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # explain reports; it does not warn
        report = explain(case.model, x)
    assert report.method in ("loop", "structured")
    assert any("torch.func.vmap cannot run this model" in n and "Tensor.__bool__" in n for n in report.notes)
    assert "Note: torch.func.vmap cannot run this model" in str(report)
    refused = explain(case.model, x, method="jacobian")
    assert any("method='jacobian' cannot run this model" in n for n in refused.notes)
    padded = zoo["padded_tied"]
    report = explain(padded.model, padded.make_inputs(3, 0), method="ntk_vp")
    assert report.method == "ntk_vp"
    assert any("reverse-over-reverse" in n and "padding_idx" in n for n in report.notes)
    mlp = make_zoo()["mlp"]
    assert explain(mlp.model, mlp.make_inputs(3, 0)).notes == ()


@pytest.mark.parametrize("name, reverse", [("padded_tied", True), ("parametrized", True), ("nested", False)])
def test_ntk_vp_uses_reverse_mode_only_where_forward_mode_fails_or_disagrees(zoo, name, reverse):
    case = zoo[name]
    plan = kernel_plan(case.model, case.make_inputs(3, 0), method="ntk_vp", output_fn=case.output_fn,
                       call_kwargs=case.call_kwargs)
    assert plan.engine.reverse_products is reverse


def test_padding_row_is_caught_even_when_the_first_example_has_no_padding():
    """The dot-product check sees only x1's first example; the padding_idx of a tied table
    is caught on every example by the operation watch."""
    torch.manual_seed(0)
    model = PaddedTied()
    tokens = torch.tensor([[1, 2, 3, 4], [5, 0, 0, 0], [2, 6, 0, 0]])  # no padding in the first
    plan = kernel_plan(model, tokens, method="ntk_vp")
    assert plan.engine.reverse_products
    assert "padding_idx" in plan.analysis.fails("forward_mode")
    kernel = ntk.empirical_ntk(model, tokens, method="ntk_vp", dtype=F64)
    assert relative_error(kernel, naive_ntk(model, tokens)) < RTOL


class _SkewedIdentity(torch.autograd.Function):
    """The identity with a correct backward and a forward-mode derivative twice too large:
    an operation whose two modes disagree, unknown to any list."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x):
        return x.clone()

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def backward(ctx, grad):
        return grad

    @staticmethod
    def jvp(ctx, tangent):
        return 2 * tangent


class _Skewed(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3, 4)
        self.out = nn.Linear(4, 2)

    def forward(self, x):
        return self.out(torch.tanh(_SkewedIdentity.apply(self.fc(x))))


def test_ntk_vp_detects_any_disagreement_of_forward_and_reverse_mode():
    torch.manual_seed(0)
    model, x = _Skewed(), torch.randn(4, 3)
    plan = kernel_plan(model, x, method="ntk_vp")
    assert plan.engine.reverse_products
    assert "forward and reverse mode disagree" in plan.analysis.fails("forward_mode")
    kernel = ntk.empirical_ntk(model, x, method="ntk_vp", dtype=F64)
    assert relative_error(kernel, naive_ntk(model, x)) < RTOL


class _Reentrant(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(3, 4)
        self.block = nn.Linear(4, 4)
        self.out = nn.Linear(4, 2)

    def forward(self, x):
        h = torch.tanh(self.inp(x))
        return self.out(torch.utils.checkpoint.checkpoint(self.block, h, use_reentrant=True))


@pytest.mark.parametrize("method", METHODS)
def test_reentrant_checkpoint_is_a_clear_error_in_every_method(method):
    """``use_reentrant=True`` does not support ``torch.autograd.grad``: no engine can
    differentiate it, and each says so."""
    with pytest.raises(UnsupportedModelError, match="no engine can differentiate this model.*use_reentrant=True"):
        ntk.empirical_ntk(_Reentrant(), torch.randn(3, 3), method=method)


# ---------------------------------------------------------------------------------------
# Hygiene
# ---------------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("name, method", [
    ("lstm", "loop"), ("checkpoint", "structured"), ("masked", "auto"), ("sparse_embedding", "loop"),
    ("sparse_embedding", "structured"), ("nested", "auto"), ("padded_tied", "ntk_vp"),
])
def test_hygiene_holds_without_vmap_or_forward_mode(zoo, name, method):
    """In float64: the recurrent models then run torch's native kernels (see RECURRENT).
    Tensors are counted for the per-example structured capture (the loop engine's are in
    test_kernel_hygiene.py)."""
    case = zoo[name]
    model = case.model.train()
    x = case.make_inputs(3, 0)
    before, rng, hooks = hygiene.snapshot(model), hygiene.rng_states(), hygiene.hook_state(model)
    common = dict(method=method, output_fn=case.output_fn, call_kwargs=case.call_kwargs, dtype=F64)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=FALLBACK_WARNING)
        kernel = ntk.empirical_ntk(model, x, **common)
        count = live_tensor_count() if method == "structured" else None
        ntk.empirical_ntk(model, x, per_layer=True, **common)
        assert count is None or live_tensor_count() == count
    hygiene.assert_unchanged(model, before)
    hygiene.assert_same_rng(rng)
    assert hygiene.hook_state(model) == hooks
    hygiene.assert_transform_state_clean()
    assert all(p.grad is None for p in model.parameters())
    assert kernel.grad_fn is None and not kernel.requires_grad


class _FunctionSitesVmapCannotRun(nn.Module):
    """Function rules (attention projections through ``F.linear``, a bare ``F.linear``)
    inside a non-reentrant checkpoint and data-dependent control flow: the structured
    engine's per-example capture must add each function probe once, not again when the
    checkpointed segment is recomputed in the backward pass."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(5, 4))
        self.attention = nn.MultiheadAttention(4, 2, batch_first=True)
        self.head = nn.Linear(5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, _ = self.attention(x, x, x)
        h = torch.utils.checkpoint.checkpoint(
            lambda t: torch.tanh(nn.functional.linear(t, self.weight)), h, use_reentrant=False
        )
        if h.sum() > 0:
            h = 2 * h
        return self.head(h).mean(1)


@pytest.mark.parametrize("mode", MODES)
def test_function_rules_in_the_per_example_capture_are_exact(mode):
    torch.manual_seed(0)
    model = _FunctionSitesVmapCannotRun().double()
    x1, x2 = torch.randn(4, 3, 4, dtype=F64), torch.randn(3, 3, 4, dtype=F64)
    report = explain(model, x1)
    assert "F.linear" in {term.rule for term in report.terms} and not report.fallback
    for x2_ in (None, x2):
        expected = reduce_mode(naive_ntk(model, x1, x2_), mode)
        kernel = ntk.empirical_ntk(model, x1, x2_, mode=mode, method="structured")
        torch.testing.assert_close(kernel, expected, rtol=1e-10, atol=1e-12)


def _check_operator(case, refs):
    """NTKOperator products exact against the reference (both modes, x2=None and cross),
    through plain autograd where vmap cannot run the model."""
    x1, x2, same, cross = refs
    for mode in ("trace", "full"):
        for second, full in ((None, same), (x2, cross)):
            op = ntk.NTKOperator(case.model, x1, second, mode=mode, output_fn=case.output_fn,
                                 call_kwargs=case.call_kwargs, dtype=F64)
            if mode == "full":
                n1, n2, o, _ = full.shape
                K = full.permute(0, 2, 1, 3).reshape(n1 * o, n2 * o)
            else:
                K = reduce_mode(full, mode)
            V = torch.randn(op.shape[1], 2, dtype=F64, generator=torch.Generator().manual_seed(0))
            assert relative_error(op @ V, K @ V) < RTOL, (mode, second is None)


def test_operator_without_vmap_on_lstm(zoo, references):
    _check_operator(zoo["lstm"], references["lstm"])


@pytest.mark.slow
@pytest.mark.parametrize("name", [n for n in ANY_MODULE_NAMES if n != "lstm"])
def test_operator_on_the_any_module_zoo(zoo, references, name):
    _check_operator(zoo[name], references[name])


def test_sketched_operator_refuses_without_vmap(zoo):
    case = zoo["lstm"]
    op = ntk.NTKOperator(case.model, case.make_inputs(2, 0), output_fn=case.output_fn, sketch=8)
    with pytest.raises(UnsupportedModelError, match=r"NTKOperator\(sketch=...\) cannot run this model: torch.func.vmap fails"):
        op @ torch.ones(2, 1)
