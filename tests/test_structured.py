"""The structured engine: every rule against the naive float64 reference and the Jacobian
engine, fallback exactness and reporting, tiling and memory-budget behaviour."""

import logging

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import ntk_torch as ntk
from ntk_torch.kernel import MODES, explain
from ntk_torch.kernel.analysis import MAX_ENTRIES, Analysis
from ntk_torch.kernel.planning import TOTAL, make_engine
from ntk_torch.layout import TRACE, layout
from ntk_torch.functional import FunctionalModel, ParamGroup, evaluation_context, slice_inputs
from ntk_torch.kernel.cost import profile_forward
from ntk_torch.kernel.structured import analyse

from helpers import live_tensor_count
from reference import naive_ntk, reduce_mode
from zoo import ZOO_NAMES, make_zoo

RTOL = 1e-10

pytestmark = pytest.mark.filterwarnings("ignore:There is a performance drop:UserWarning")
F64 = torch.float64


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def relative_error(actual, expected):
    assert actual.shape == expected.shape
    return float((actual - expected).abs().max() / expected.abs().max().clamp_min(1e-300))


def assert_close(actual, expected, rtol=RTOL):
    assert actual.dtype == F64
    error = relative_error(actual, expected)
    assert error <= rtol, f"relative error {error:.3e} > {rtol:.1e}"


# ---------------------------------------------------------------------------------------
# Extra models, one per rule feature
# ---------------------------------------------------------------------------------------

class SequenceLinear(nn.Module):
    """Linear layers on (N, T, d) and (N, 2, T, d) inputs: positions are summed exactly."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(4, 6)
        self.fc2 = nn.Linear(6, 3)
        self.head = nn.Linear(3 * 2, 2)

    def forward(self, x):  # x: (N, 2, 5, 4)
        h = self.fc2(torch.tanh(self.fc1(x)))  # (N, 2, 5, 3)
        return self.head(torch.tanh(h).mean(dim=2).flatten(1))


class Convolutions(nn.Module):
    """Grouped, strided, dilated, 'same'-padded and reflect-padded convolutions."""

    def __init__(self):
        super().__init__()
        self.grouped = nn.Conv2d(4, 6, 3, stride=2, padding=2, dilation=2, groups=2)
        self.same = nn.Conv2d(6, 4, (2, 3), padding="same", padding_mode="reflect", bias=False)
        self.depthwise = nn.Conv2d(4, 4, 3, padding=1, padding_mode="circular", groups=4)
        self.head = nn.Linear(4 * 4 * 4, 3)

    def forward(self, x):  # (N, 4, 7, 8)
        h = torch.tanh(self.grouped(x))
        h = torch.tanh(self.same(h))
        return self.head(torch.tanh(self.depthwise(h)).flatten(1))


class Conv1dNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv1d(3, 4, 3, stride=2, padding=1, dilation=2)
        self.conv2 = nn.Conv1d(4, 4, 2, groups=2, padding="valid")
        self.conv3 = nn.Conv3d(1, 2, (1, 2, 2), stride=(1, 1, 2))
        self.head = nn.Linear(4 * 4 + 2 * 1 * 2 * 2, 2)

    def forward(self, x, v):  # x (N, 3, 11), v (N, 1, 1, 3, 5)
        h = torch.tanh(self.conv2(torch.tanh(self.conv1(x))))
        w = torch.tanh(self.conv3(v))
        return self.head(torch.cat([h.flatten(1), w.flatten(1)], dim=1))


class Tokens(nn.Module):
    """Embedding with padding_idx, repeated tokens, and a bias-free projection."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(7, 5, padding_idx=0)
        self.proj = nn.Linear(5, 4, bias=False)
        self.head = nn.Linear(4, 3)

    def forward(self, tokens):  # (N, 6) in [0, 7)
        return self.head(torch.tanh(self.proj(self.embed(tokens))).mean(dim=1))


class CalledTwice(nn.Module):
    """One Linear applied twice in a forward (weight sharing), plus a reused Conv1d."""

    def __init__(self):
        super().__init__()
        self.shared = nn.Linear(5, 5)
        self.conv = nn.Conv1d(1, 1, 3, padding=1)
        self.head = nn.Linear(5, 2)

    def forward(self, x):  # (N, 5)
        h = torch.tanh(self.shared(x))
        h = torch.tanh(self.shared(h)) + x
        h = self.conv(self.conv(h.unsqueeze(1))).squeeze(1)
        return self.head(h)


class Scale(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.gain = nn.Parameter(torch.linspace(0.5, 1.5, d))

    def forward(self, x):
        return x * self.gain


class Mixed(nn.Module):
    """Covered layers beside a bare parameter (covered by the ``add`` function rule), a
    custom module (``mul``), Bilinear (no rule), a Linear whose weight is also used through
    ``F.linear`` (both calls one term), and a Linear applied to a constant table (its call
    is not batched on dim 0; the Linear rule reads leading dimensions as positions)."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 6)
        self.scale = Scale(6)
        self.act = nn.Bilinear(6, 6, 6)
        self.offset = nn.Parameter(torch.linspace(-0.2, 0.3, 6))
        self.out = nn.Linear(6, 6)
        self.table = nn.Parameter(torch.randn(1, 6) * 0.3)
        self.table_proj = nn.Linear(6, 6)
        self.head = nn.Linear(6, 2)

    def forward(self, x):
        h = self.scale(self.fc(x)) + self.offset
        h = torch.tanh(self.act(h, h))
        h = torch.tanh(self.out(h)) + 0.1 * F.linear(h, self.out.weight)  # direct use
        h = h + self.table_proj(self.table)  # not batched on dim 0
        return self.head(torch.tanh(h))


class ExpScale(nn.Module):
    """``y = x exp(g)``: a parameter through a function no rule knows."""

    def __init__(self, d):
        super().__init__()
        self.gain = nn.Parameter(torch.linspace(-0.5, 0.5, d))

    def forward(self, x):
        return x * self.gain.exp()


class Opaque(nn.Module):
    """Uses no rule covers beside covered layers: a parameter through ``exp``, Bilinear, a
    Linear whose weight is also used by ``einsum``, a bare parameter squared, and a Conv1d
    and an ``F.group_norm`` call on a constant (rules that read dim 0 as the batch)."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 6)
        self.scale = ExpScale(6)
        self.act = nn.Bilinear(6, 6, 6)
        self.offset = nn.Parameter(torch.linspace(-0.2, 0.3, 6))
        self.out = nn.Linear(6, 6)
        self.register_buffer("table", torch.randn(1, 2, 6) * 0.3)
        self.gn_weight = nn.Parameter(torch.linspace(0.5, 1.5, 2))
        self.gn_bias = nn.Parameter(torch.linspace(-0.1, 0.1, 2))
        self.table_conv = nn.Conv1d(2, 1, 1)
        self.head = nn.Linear(6, 2)

    def forward(self, x):
        h = self.scale(self.fc(x)) + self.offset.pow(2)
        h = torch.tanh(self.act(h, h))
        h = torch.tanh(self.out(h)) + 0.1 * torch.einsum("bi,oi->bo", h, self.out.weight)  # direct use
        table = F.group_norm(self.table, 2, self.gn_weight, self.gn_bias)  # not batched on dim 0
        h = h + self.table_conv(table).squeeze(1)  # not batched on dim 0
        return self.head(torch.tanh(h))


class Norms(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3)
        self.gn = nn.GroupNorm(2, 4)
        self.bn2 = nn.BatchNorm2d(4)
        self.bn1 = nn.BatchNorm1d(8)
        self.bn_seq = nn.BatchNorm1d(4)
        self.ln = nn.LayerNorm((2, 4))
        self.bn_batch_stats = nn.BatchNorm1d(4, track_running_stats=False)
        self.fc = nn.Linear(16, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, x):  # (N, 2, 5, 5)
        h = self.bn2(self.gn(self.conv(x)))  # (N, 4, 3, 3)
        h = torch.tanh(self.bn_batch_stats(self.bn_seq(h.flatten(2))))  # (N, 4, 9)
        h = self.ln(h[:, :, :8].reshape(h.shape[0], 4, 2, 4))  # over the last two dims
        h = torch.tanh(self.bn1(self.fc(h.flatten(1)[:, :16])))
        return self.head(h)


class TiedEmbedding(nn.Module):
    """A language-model head tied to the embedding (two rule kinds for one tensor)."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(6, 4)
        self.mix = nn.Linear(4, 4)
        self.lm_head = nn.Linear(4, 6, bias=False)
        self.lm_head.weight = self.embed.weight

    def forward(self, tokens):  # (N, 3)
        return self.lm_head(torch.tanh(self.mix(self.embed(tokens))).mean(dim=1))


def _warm(model, x):
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(x)
    model.eval()
    return model


def extra_models():
    torch.manual_seed(7)
    norms = Norms()
    _warm(norms, torch.randn(12, 2, 5, 5, generator=_gen(5)) * 1.5 + 0.3)
    with torch.no_grad():
        for m in norms.modules():
            if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d, nn.GroupNorm, nn.LayerNorm)):
                m.weight.normal_(1.0, 0.3)
                m.bias.normal_(0.0, 0.3)
    return {
        "sequence_linear": (SequenceLinear(), lambda n, s: torch.randn(n, 2, 5, 4, generator=_gen(s))),
        "convolutions": (Convolutions(), lambda n, s: torch.randn(n, 4, 7, 8, generator=_gen(s))),
        "conv1d": (
            Conv1dNet(),
            lambda n, s: (torch.randn(n, 3, 11, generator=_gen(s)), torch.randn(n, 1, 1, 3, 5, generator=_gen(s + 9))),
        ),
        "tokens": (Tokens(), lambda n, s: torch.randint(0, 7, (n, 6), generator=_gen(s))),
        "called_twice": (CalledTwice(), lambda n, s: torch.randn(n, 5, generator=_gen(s))),
        "mixed": (Mixed(), lambda n, s: torch.randn(n, 4, generator=_gen(s))),
        "opaque": (Opaque(), lambda n, s: torch.randn(n, 4, generator=_gen(s))),
        "norms": (norms, lambda n, s: torch.randn(n, 2, 5, 5, generator=_gen(s))),
        "tied_embedding": (TiedEmbedding(), lambda n, s: torch.randint(0, 6, (n, 3), generator=_gen(s))),
    }


EXTRA_NAMES = list(extra_models())


@pytest.fixture(scope="module")
def extras():
    models = extra_models()
    cases = {}
    for name, (model, make) in models.items():
        x1, x2 = make(4, 0), make(3, 1)
        cases[name] = (model, x1, x2, naive_ntk(model, x1), naive_ntk(model, x1, x2))
    return cases


@pytest.fixture(scope="module")
def zoo():
    return make_zoo()


# ---------------------------------------------------------------------------------------
# Exactness
# ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", EXTRA_NAMES)
def test_rules_match_naive_reference(extras, name):
    model, x1, x2, ref_same, ref_cross = extras[name]
    for mode in MODES:
        same = ntk.empirical_ntk(model, x1, mode=mode, method="structured", dtype=F64)
        cross = ntk.empirical_ntk(model, x1, x2, mode=mode, method="structured", dtype=F64)
        assert_close(same, reduce_mode(ref_same, mode))
        assert_close(cross, reduce_mode(ref_cross, mode))
        assert torch.equal(same, same.transpose(0, 1) if mode != "full" else same.permute(1, 0, 3, 2))


def _per_layer_agree(model, x1, x2, output_fn=None):
    for mode in MODES:
        common = dict(mode=mode, per_layer=True, output_fn=output_fn, dtype=F64)
        structured = ntk.empirical_ntk(model, x1, x2, method="structured", **common)
        jacobian = ntk.empirical_ntk(model, x1, x2, method="jacobian", **common)
        assert list(structured) == list(jacobian)
        for group in jacobian:
            assert_close(structured[group], jacobian[group])
        assert_close(structured.total, jacobian.total)


@pytest.mark.parametrize("name", EXTRA_NAMES)
def test_rules_per_layer_match_jacobian_engine(extras, name):
    model, x1, x2, _, _ = extras[name]
    _per_layer_agree(model, x1, x2)


@pytest.mark.parametrize("name", ZOO_NAMES)
def test_zoo_per_layer_matches_jacobian_engine(zoo, name):
    """(The whole zoo against the naive reference, every mode and both x2 forms, runs in
    test_kernel_correctness.py, which parametrises over every method.)"""
    case = zoo[name]
    _per_layer_agree(case.model, case.make_inputs(4, 0), None, case.output_fn)


def test_float32_agrees_with_jacobian_engine(zoo):
    case = zoo["cnn_bn"]
    x1, x2 = case.make_inputs(5, 3), case.make_inputs(4, 4)
    structured = ntk.empirical_ntk(case.model, x1, x2, method="structured")
    jacobian = ntk.empirical_ntk(case.model, x1, x2, method="jacobian")
    assert structured.dtype == torch.float32
    torch.testing.assert_close(structured, jacobian, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------------------
# Coverage, fallback and the report
# ---------------------------------------------------------------------------------------

def test_fallback_is_exact_and_reported(extras):
    model, x1, x2, _, ref_cross = extras["opaque"]
    report = explain(model, x1, x2, method="structured", dtype=F64)
    assert set(report.fallback) == {
        "scale.gain", "act.weight", "act.bias", "offset", "out.weight", "table_conv.weight", "table_conv.bias",
        "gn_weight", "gn_bias",
    }
    assert "no rule for ExpScale" in report.fallback["scale.gain"]
    assert "no rule for Bilinear" in report.fallback["act.weight"]
    assert "used directly by pow" in report.fallback["offset"]
    assert "used directly by einsum" in report.fallback["out.weight"]
    assert "not batched on dim 0" in report.fallback["table_conv.weight"]
    assert "F.group_norm call is not batched on dim 0" in report.fallback["gn_weight"]
    assert set(report.covered) == {"fc.weight", "fc.bias", "out.bias", "head.weight", "head.bias"}
    text = str(report)
    assert "fallback (jacobian)" in text and "no rule for Bilinear" in text
    assert report.method == "structured"
    # out.bias by rule and out.weight by fallback still give group "out" exactly.
    per_layer = ntk.empirical_ntk(model, x1, x2, method="structured", per_layer=True, dtype=F64)
    out_ref = naive_ntk(model, x1, x2, param_names=["out.weight", "out.bias"])
    assert_close(per_layer["out"], out_ref)
    assert_close(per_layer.total, ref_cross)


def test_function_rules_cover_uses_outside_module_rules(extras):
    """A bare parameter added, a custom module's gain multiplied, a weight reused through
    F.linear and a Linear on a constant table: covered, each by the rule that sees it."""
    model, x1, _, _, _ = extras["mixed"]
    report = explain(model, x1, method="structured", dtype=F64)
    assert set(report.fallback) == {"act.weight", "act.bias", "table"}
    assert "used directly by F.linear other than as its weight/bias" in report.fallback["table"]
    by_param = {p: (t.modules, t.rule) for t in report.terms for p in t.params}
    assert by_param["offset"] == ("(root)", "add")
    assert by_param["scale.gain"] == ("scale", "mul")
    assert by_param["out.weight"] == ("out, (root)", "F.linear+linear")
    assert by_param["table_proj.weight"] == ("table_proj", "linear")


def test_tied_weights_across_rule_kinds_are_covered(extras):
    model, x1, _, _, _ = extras["tied_embedding"]
    report = explain(model, x1, method="structured")
    assert report.fallback == {}
    tied = next(t for t in report.terms if t.params == ("embed.weight",))
    assert tied.modules == "embed, lm_head" and tied.strategy == "grads"


def test_batch_statistics_batchnorm_falls_back(extras):
    model, x1, _, _, _ = extras["norms"]
    report = explain(model, x1, method="structured")
    assert set(report.fallback) == {"bn_batch_stats.weight", "bn_batch_stats.bias"}
    assert "batch statistics" in report.fallback["bn_batch_stats.weight"]


def test_strategy_follows_the_cost_model(caplog):
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 10))
    conv = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.Tanh(), nn.Flatten(), nn.Linear(8 * 16 * 16, 4))
    with caplog.at_level(logging.DEBUG, logger="ntk_torch.kernel"):
        report = explain(mlp, torch.randn(32, 64), mode="full")
        ntk.empirical_ntk(mlp, torch.randn(8, 64), method="structured")
    # A layer applied once per example: Gram of inputs times Gram of cotangents.
    assert [t.strategy for t in report.terms] == ["gram", "gram"]
    assert all(t.flops["gram"] < t.flops["grads"] for t in report.terms)
    assert report.method == "structured"
    assert any("structured: 0 -> gram" in r.getMessage() for r in caplog.records)
    # A convolution over 256 positions: per-example weight gradients.
    report = explain(conv, torch.randn(16, 3, 16, 16), mode="trace")
    assert report.terms[0].strategy == "grads" and report.terms[1].strategy == "gram"


def test_auto_keeps_other_engines_without_coverage():
    model = nn.Sequential(ExpScale(3), nn.Tanh(), ExpScale(3))
    x = torch.randn(4, 3)
    report = explain(model, x)
    assert "structured" not in report.costs and report.method != "structured"
    assert_close(
        ntk.empirical_ntk(model, x, method="structured", dtype=F64),
        ntk.empirical_ntk(model, x, method="jacobian", dtype=F64),
    )


# ---------------------------------------------------------------------------------------
# Tiling and memory
# ---------------------------------------------------------------------------------------

def _engine(model, x, mode, budget, x2=None):
    fmodel = FunctionalModel(model, dtype=F64)
    x = fmodel.prepare_inputs(x)
    n = x.shape[0]
    with torch.no_grad(), evaluation_context(model, fmodel.device):
        profile = profile_forward(fmodel, slice_inputs(x, 0, 1), fmodel.output_size(x, n))
        plan = analyse(fmodel, x, profile.num_outputs)
        engine = make_engine(
            "structured", fmodel, layout(mode), [ParamGroup(TOTAL, tuple(fmodel.params))],
            Analysis(profile.num_outputs, profile, plan), budget,
        )
    return engine, x


@pytest.mark.parametrize("mode", MODES)
def test_tiling_invariance_and_budget(extras, mode):
    model, _, _, _, _ = extras["convolutions"]
    x = torch.randn(10, 4, 7, 8, generator=_gen(3))
    whole = ntk.empirical_ntk(model, x, mode=mode, method="structured", dtype=F64)
    engine, _ = _engine(model, x, mode, 10**9)
    small = engine.block_bytes(3, 3)
    report = explain(model, x, mode=mode, method="structured", dtype=F64, memory_budget=small)
    b = report.block_size
    assert 3 <= b < 10  # several blocks
    engine, _ = _engine(model, x, mode, small)  # the capture's chunking follows the budget
    assert engine.block_bytes(b, b) <= small < engine.block_bytes(b + 1, b + 1)
    tiled = ntk.empirical_ntk(model, x, mode=mode, method="structured", dtype=F64, memory_budget=small)
    assert relative_error(tiled, whole) < 1e-13
    cross = ntk.empirical_ntk(model, x, x[:7], mode=mode, method="structured", dtype=F64, batch_size=2)
    assert relative_error(cross, whole[:, :7]) < 1e-13


@pytest.mark.parametrize("mode", MODES)
def test_block_bytes_bound_the_block_state(extras, mode):
    """The estimate covers what a block holds: both sides' captured state and cached
    per-example gradients, plus the block's accumulators."""
    model, _, _, _, _ = extras["convolutions"]
    x = torch.randn(6, 4, 7, 8, generator=_gen(4))
    engine, x = _engine(model, x, mode, 10**9)
    with torch.no_grad(), evaluation_context(model, engine.fmodel.device):
        rows = engine.prepare_rows(x)
        block = engine.contract(rows, engine.prepare_cols(x))
    held = 0
    for term in rows.terms:
        tensors = [getattr(term, "grads", None), getattr(term, "cotangent", None), getattr(term, "_grads", None)]
        features = getattr(term, "features", None)
        if features is not None:
            tensors.append(getattr(features, "values", getattr(features, "indices", None)))
        held += sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))
    assert held <= engine.side_bytes(6)
    assert 2 * held + block[TOTAL].numel() * 8 <= engine.block_bytes(6, 6)


# ---------------------------------------------------------------------------------------
# Diagonal blocks of x2=None: upper block triangle in chunks, mirrored
# ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", EXTRA_NAMES)
def test_symmetric_chunks_match_naive_reference(extras, name, monkeypatch):
    """With one example per chunk (every chunk pair and the mirror exercised), every
    strategy still matches the reference and the kernel is exactly symmetric."""
    from ntk_torch.kernel.structured import terms

    monkeypatch.setattr(terms, "SYMMETRIC_CHUNK_ROWS", 1)
    model, x1, _, ref_same, _ = extras[name]
    assert len(terms.symmetric_chunks(x1.shape[0] if isinstance(x1, torch.Tensor) else 4, TRACE, 1)) > 1
    for mode in MODES:
        same = ntk.empirical_ntk(model, x1, mode=mode, method="structured", dtype=F64)
        assert_close(same, reduce_mode(ref_same, mode))
        assert torch.equal(same, same.transpose(0, 1) if mode != "full" else same.permute(1, 0, 3, 2))


@pytest.mark.parametrize("name", ["sequence_linear", "convolutions", "conv1d", "called_twice"])
def test_every_layer_by_per_example_gradients(extras, name, monkeypatch):
    """Every covered layer contracted by the ``grads`` strategy (positions, groups, calls
    of a shared module: ``DenseFeatures.expand``) gives the naive kernel."""
    from ntk_torch.kernel.structured import engine as engine_module

    monkeypatch.setattr(engine_module, "choose_strategy", lambda *args: ("grads", {"grads": 0.0}))
    model, x1, x2, ref_same, ref_cross = extras[name]
    for mode in MODES:
        kernel = ntk.NTK(model, mode=mode, method="structured", dtype=F64)
        assert_close(kernel(x1), reduce_mode(ref_same, mode))
        assert_close(kernel(x1, x2), reduce_mode(ref_cross, mode))


@pytest.mark.parametrize("mode", MODES)
def test_symmetric_chunks_both_strategies(mode, monkeypatch):
    """A convolution under each forced strategy, chunked, against the naive reference."""
    from ntk_torch.kernel.structured import engine as engine_module, terms

    monkeypatch.setattr(terms, "SYMMETRIC_CHUNK_ROWS", 2)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.Tanh(), nn.Flatten(), nn.Linear(3 * 16, 2))
    x = torch.randn(7, 2, 4, 4)
    ref = reduce_mode(naive_ntk(model, x), mode)
    for forced in ("gram", "grads"):
        def choose(shape, mode_, o, n1, n2, same, forced=forced):
            flops = terms.strategy_flops(shape, mode_, o, n1, n2, same)
            return (forced if forced in flops else "grads"), flops

        monkeypatch.setattr(engine_module, "choose_strategy", choose)
        same = ntk.empirical_ntk(model, x, mode=mode, method="structured", dtype=F64)
        assert_close(same, ref)
        assert torch.equal(same, same.transpose(0, 1) if mode != "full" else same.permute(1, 0, 3, 2))


# ---------------------------------------------------------------------------------------
# The analysis memo of an NTK
# ---------------------------------------------------------------------------------------

def _analyses(monkeypatch):
    """Count the coverage analyses and forward profiles an NTK runs."""
    from ntk_torch.kernel import analysis

    counts = {"analyse": 0, "profile": 0}
    real_analyse, real_profile = analysis.analyse, analysis.profile_forward

    def analyse_(*args, **kwargs):
        counts["analyse"] += 1
        return real_analyse(*args, **kwargs)

    def profile_(*args, **kwargs):
        counts["profile"] += 1
        return real_profile(*args, **kwargs)

    monkeypatch.setattr(analysis, "analyse", analyse_)
    monkeypatch.setattr(analysis, "profile_forward", profile_)
    return counts


def _checker(model, **kwargs):
    """An NTK of ``model`` whose calls are checked against the naive reference."""
    kernel = ntk.NTK(model, method="structured", dtype=F64, **kwargs)

    def check(x):
        got = kernel(x)
        assert_close(got, reduce_mode(naive_ntk(model, x), kwargs.get("mode", "full")))
        return got

    return check


def test_memo_reuses_analysis_and_survives_in_place_updates(monkeypatch):
    counts = _analyses(monkeypatch)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3))
    x = torch.randn(6, 5)
    check = _checker(model)
    check(x)
    check(x[:4])  # another N: same analysis
    assert counts == {"analyse": 1, "profile": 1}
    with torch.no_grad():  # an optimizer step: values change, tensors stay
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    check(x)
    assert counts == {"analyse": 1, "profile": 1}
    check_trace = _checker(model, mode="trace")  # another NTK has a memo of its own
    check_trace(x)
    check_trace(x)
    assert counts == {"analyse": 2, "profile": 2}


def test_memo_is_invalidated_by_changes(monkeypatch):
    counts = _analyses(monkeypatch)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3))
    x = torch.randn(6, 5)
    check = _checker(model)
    check(x)
    expected = 1

    def changed():
        nonlocal expected
        expected += 1
        assert counts["analyse"] == expected and counts["profile"] == expected

    model[2] = nn.Linear(7, 4)  # a module replaced (O changes)
    check(x)
    changed()
    model[0].weight = nn.Parameter(torch.randn(7, 5))  # a parameter tensor swapped
    check(x)
    changed()
    model[0].bias.requires_grad_(False)  # a frozen parameter
    got = check(x)
    changed()
    assert got.shape == (6, 6, 4, 4)
    model[0].bias.requires_grad_(True)
    model[0] = nn.Linear(6, 7)  # the input feature shape changes
    check(torch.randn(6, 6))
    changed()
    model[1] = nn.Sigmoid()  # a parameter-free module replaced
    check(torch.randn(6, 6))
    changed()
    handle = model[2].register_forward_hook(lambda m, a, out: out * 2)  # a hook added
    check(torch.randn(6, 6))
    changed()
    handle.remove()
    check(torch.randn(6, 6))  # back to an analysed structure: still remembered
    assert counts["analyse"] == expected
    check(torch.randn(1, 6))  # one example: analysed on a duplicated example
    changed()


def test_memo_sees_forward_override_and_attribute_changes(monkeypatch):
    """Covered parameters used outside their module after a change go to the fallback."""
    counts = _analyses(monkeypatch)
    torch.manual_seed(0)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)
            self.out = nn.Linear(4, 2)

        def forward(self, x):
            return self.out(torch.tanh(self.fc(x)))

    model = Net()
    x = torch.randn(5, 4)
    check = _checker(model)
    check(x)
    import types

    def direct(self, x):
        return torch.einsum("bi,oi->bo", torch.tanh(self.fc(x)), self.out.weight) + self.out.bias

    model.forward = types.MethodType(direct, model)
    check(x)
    assert counts["analyse"] == 2
    report = explain(model, x, method="structured", dtype=F64)
    assert "out.weight" in report.fallback
    conv = nn.Sequential(nn.Conv2d(2, 3, 3), nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(3 * 4, 2))
    xc = torch.randn(3, 2, 7, 7)
    check_conv = _checker(conv)
    check_conv(xc)
    conv[0].stride = (2, 2)  # configuration shown by extra_repr; the call's output shape changes
    check_conv(xc)
    assert counts["analyse"] == 5


@pytest.mark.slow
def test_memo_holds_no_tensors_and_is_bounded():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    kernel = ntk.NTK(model, method="structured")
    before = live_tensor_count()
    for width in range(3, 3 + 2 * MAX_ENTRIES):  # a new input shape each time
        model[0] = nn.Linear(width, 4)
        kernel(torch.randn(4, width))
    del width
    # only the parameters of the current model remain: 2 tensors per Linear
    assert live_tensor_count() - before <= 2
    assert len(kernel._memo) == MAX_ENTRIES


def test_finiteness_check_is_exact_when_the_sum_overflows():
    from ntk_torch.kernel.tiling import all_finite

    big = torch.full((3, 3), 3e38)  # every entry finite, the float32 sum is inf
    assert not torch.isfinite(big.sum()) and all_finite(big)
    big[1, 2] = float("nan")
    assert not all_finite(big)
    assert not all_finite(torch.tensor([1.0, float("inf"), -float("inf")]))
    assert all_finite(torch.zeros(4, 4, 2, 2).permute(1, 0, 3, 2))
