"""The structured rules for the layers real models use (attention projections through
F.linear, addmm / matmul / element-wise uses of parameters, norm variants, transposed
convolutions, bags of embeddings, position embeddings, Hugging Face models): each against
the naive float64 reference and the Jacobian engine, every mode, x2=None and x1 != x2;
what ``explain`` reports; symmetry and per-layer sums."""

import os
import subprocess
import sys

import pytest
import torch

import ntk_torch as ntk
from ntk_torch.kernel import MODES, explain

from reference import naive_ntk, reduce_mode
from structured_models import layer_models, without_sparse_gradients

pytestmark = pytest.mark.filterwarnings("ignore:There is a performance drop:UserWarning")
F64 = torch.float64
NAMES = list(layer_models())

# What falls back in each model (a weight split into views, a sliced table), and the rule
# that covers a few telling parameters.
FALLBACK = {"attention": {"cross.in_proj_weight"}, "positions": {"sliced"}}
RULES = {
    "attention": {
        "encoder.self_attn.in_proj_weight": ("encoder.self_attn", "F.linear"),
        "encoder.self_attn.out_proj.weight": ("encoder.self_attn", "F.linear"),
        "seq_first.in_proj_bias": ("seq_first", "F.linear"),
        "cross.out_proj.weight": ("cross", "F.linear"),
    },
    "functional": {
        "fc.weight": ("fc, (root)", "F.linear+linear"),
        "proj": ("(root)", "F.linear"),
        "right": ("(root)", "matmul"),
        "vector": ("(root)", "matmul"),
        "mm.weight": ("mm", "torch.addmm"),
        "mm.bias": ("mm", "torch.addmm"),
        "scale": ("(root)", "mul"),
        "shift": ("(root)", "sub"),
        "gate": ("(root)", "rsub"),
        "offset": ("(root)", "add"),
        "temperature": ("(root)", "mul"),
    },
    "norm_variants": {
        "ln2d.weight": ("ln2d", "F.layer_norm"),
        "gn_act.bias": ("gn_act", "F.group_norm"),
        "ln_no_bias.weight": ("ln_no_bias", "layer_norm"),
        "rms.weight": ("rms", "rms_norm"),
        "t5.weight": ("t5", "mul"),
    },
    "transposed_convs": {
        "up1.weight": ("up1", "conv_transpose"),
        "sized.weight": ("sized", "conv_transpose"),
        "kernel": ("(root)", "F.conv_transpose"),
    },
    "bags": {
        "sum.weight": ("sum", "F.embedding_bag"),
        "mean.weight": ("mean", "F.embedding_bag"),
        "max.weight": ("max", "F.embedding_bag"),
        "last.weight": ("last", "F.embedding_bag"),
        "sparse.weight": ("sparse", "embedding"),
    },
    "positions": {
        "table": ("(root)", "add"),
        "position.weight": ("position", "embedding"),
    },
}


@pytest.fixture(scope="module")
def cases():
    built = {}
    for name, (model, make) in layer_models().items():
        x1, x2 = make(4, 0), make(3, 1)
        dense = without_sparse_gradients(model)
        built[name] = (model, dense, x1, x2, naive_ntk(dense, x1), naive_ntk(dense, x1, x2))
    return built


def relative_error(actual, expected):
    assert actual.shape == expected.shape and actual.dtype == F64
    return float((actual - expected).abs().max() / expected.abs().max())


def _transposed(kernel, mode):
    return kernel.permute(1, 0, 3, 2) if mode == "full" else kernel.transpose(0, 1)


@pytest.mark.parametrize("name", NAMES)
def test_layer_rules_match_naive_reference(cases, name):
    model, _, x1, x2, ref_same, ref_cross = cases[name]
    for mode in MODES:
        kernel = ntk.NTK(model, mode=mode, method="structured", dtype=F64)
        same, cross = kernel(x1), kernel(x1, x2)
        assert relative_error(same, reduce_mode(ref_same, mode)) < 1e-10
        assert relative_error(cross, reduce_mode(ref_cross, mode)) < 1e-10
        assert torch.equal(same, _transposed(same, mode))


@pytest.mark.parametrize("name", NAMES)
def test_layer_rules_are_reported_as_covered(cases, name):
    model, _, x1, _, _, _ = cases[name]
    report = explain(model, x1, method="structured", dtype=F64)
    assert set(report.fallback) == FALLBACK.get(name, set())
    by_param = {p: (t.modules, t.rule) for t in report.terms for p in t.params}
    for param, expected in RULES[name].items():
        assert by_param[param] == expected, param
    text = str(report)
    for _, rule in RULES[name].values():
        assert rule in text


@pytest.mark.parametrize("name", NAMES)
def test_layer_rules_per_layer_match_jacobian_engine(cases, name):
    """Per-layer kernels against the Jacobian engine (on the dense-gradient copy, whose
    kernel is the same: the Jacobian engine cannot differentiate sparse embeddings)."""
    model, dense, x1, x2, _, _ = cases[name]
    for mode in MODES:
        structured = ntk.empirical_ntk(model, x1, x2, mode=mode, method="structured", per_layer=True, dtype=F64)
        jacobian = ntk.empirical_ntk(dense, x1, x2, mode=mode, method="jacobian", per_layer=True, dtype=F64)
        assert list(structured) == list(jacobian)
        for group in jacobian:
            scale = float(jacobian.total.abs().max())
            assert float((structured[group] - jacobian[group]).abs().max()) <= 1e-10 * scale, group
        total = sum(structured[group] for group in structured)
        assert float((total - structured.total).abs().max()) <= 1e-12 * float(structured.total.abs().max())


@pytest.mark.parametrize("name", ["attention", "bags"])
def test_layer_rules_are_exactly_symmetric_in_chunks_and_blocks(cases, name, monkeypatch):
    """x2=None in several blocks, each diagonal block in one-example chunks."""
    from ntk_torch.kernel.structured import terms

    monkeypatch.setattr(terms, "SYMMETRIC_CHUNK_ROWS", 1)
    model, _, _, _, _, _ = cases[name]
    make = layer_models()[name][1]
    x = make(7, 5)
    reference = naive_ntk(without_sparse_gradients(model), x)
    for mode in MODES:
        kernel = ntk.empirical_ntk(model, x, mode=mode, method="structured", batch_size=3, dtype=F64)
        assert torch.equal(kernel, _transposed(kernel, mode))
        assert relative_error(kernel, reduce_mode(reference, mode)) < 1e-10


def test_embedding_bag_max_follows_the_first_maximum():
    """Equal rows in a bag: the gradient goes to the first position's row, as torch's."""
    bag = torch.nn.EmbeddingBag(4, 2, mode="max")
    with torch.no_grad():
        bag.weight.copy_(torch.tensor([[1.0, 2.0], [1.0, 2.0], [0.0, 5.0], [3.0, -1.0]]))
    model = torch.nn.Sequential(bag, torch.nn.Linear(2, 2))
    x = torch.tensor([[1, 0, 2], [0, 1, 1], [2, 3, 0]])
    structured = ntk.empirical_ntk(model, x, method="structured", dtype=F64)
    assert relative_error(structured, naive_ntk(model, x)) < 1e-12


def test_function_sites_survive_the_analysis_memo_and_in_place_updates(cases, monkeypatch):
    """The memo keeps function sites by parameter name (no tensors): a second call and an
    optimizer-like in-place update reuse one analysis and stay exact."""
    from ntk_torch.kernel import analysis

    calls = []
    real = analysis.analyse
    monkeypatch.setattr(analysis, "analyse", lambda *a, **k: calls.append(1) or real(*a, **k))
    model, _, x1, _, ref_same, _ = cases["attention"]
    kernel = ntk.NTK(model, mode="trace", method="structured", dtype=F64)
    assert relative_error(kernel(x1), reduce_mode(ref_same, "trace")) < 1e-10
    saved = {name: p.detach().clone() for name, p in model.named_parameters()}
    try:
        with torch.no_grad():
            for p in model.parameters():
                p.mul_(1.1)
        assert relative_error(kernel(x1), reduce_mode(naive_ntk(model, x1), "trace")) < 1e-10
    finally:
        with torch.no_grad():
            for name, p in model.named_parameters():
                p.copy_(saved[name])
    assert len(calls) == 1


def test_float32_attention_agrees_with_the_jacobian_engine(cases):
    model, _, x1, x2, _, _ = cases["attention"]
    structured = ntk.empirical_ntk(model, x1, x2, method="structured")
    jacobian = ntk.empirical_ntk(model, x1, x2, method="jacobian")
    assert structured.dtype == torch.float32
    torch.testing.assert_close(structured, jacobian, rtol=1e-4, atol=1e-5)


class _BatchDependent(torch.nn.Module):
    """An F.linear call made only for a single example (einsum for a batch): the analysis
    sees the call for one example but not for two, so the parameter falls back."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(3, 3) * 0.5)
        self.head = torch.nn.Linear(3, 2)

    def forward(self, x):
        if x.shape[0] == 1:
            x = torch.tanh(torch.nn.functional.linear(x, self.weight))
        else:
            x = torch.tanh(torch.einsum("bi,oi->bo", x, self.weight))
        return self.head(x)


def test_function_calls_that_depend_on_the_batch_fall_back_exactly():
    torch.manual_seed(0)
    model = _BatchDependent()
    x = torch.randn(4, 3)
    report = explain(model, x, method="structured", dtype=F64)
    assert "F.linear calls depend on the batch" in report.fallback["weight"]
    assert relative_error(ntk.empirical_ntk(model, x, method="structured", dtype=F64), naive_ntk(model, x)) < 1e-10


class _ModifiedLater(torch.nn.Module):
    """Inputs of covered calls modified in place after the calls: a rule would read the
    modified tensor, so those parameters fall back (only biases train, so autograd does
    not need the inputs and the Jacobian engine runs)."""

    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(3, 3)
        self.fc.weight.requires_grad_(False)
        self.register_buffer("frozen", torch.randn(3, 3))
        self.bias = torch.nn.Parameter(torch.randn(3))

    def forward(self, x):
        x = x * 1.0
        h = self.fc(x) + torch.nn.functional.linear(x, self.frozen, self.bias)
        x.mul_(2.0)
        return torch.tanh(h) + x


def test_inputs_modified_in_place_after_a_call_fall_back_exactly():
    torch.manual_seed(0)
    model = _ModifiedLater()
    x = torch.randn(4, 3)
    report = explain(model, x, method="structured", dtype=F64)
    assert report.fallback["fc.bias"] == "its input is modified in place after the call"
    assert report.fallback["bias"].endswith("an argument of its F.linear call is modified in place later")
    assert relative_error(ntk.empirical_ntk(model, x, method="structured", dtype=F64), naive_ntk(model, x)) < 1e-10


def test_no_function_mode_is_left_behind_by_an_error():
    class Failing(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.randn(3, 3))

        def forward(self, x):
            h = torch.nn.functional.linear(x, self.weight)
            if getattr(self, "fail", False):
                raise ValueError("boom")
            return h

    model = Failing()
    x = torch.randn(3, 3)
    kernel = ntk.NTK(model, method="structured")
    kernel(x)  # analysed with the F.linear site
    model.fail = True
    # the re-analysis's dry runs report the model's own error, naming the line
    with pytest.raises((ValueError, ntk.UnsupportedModelError), match="boom"):
        kernel(x)
    assert torch._C._len_torch_function_stack() == 0
    assert not torch.overrides.has_torch_function((x,))


def test_importing_ntk_torch_does_not_import_transformers():
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    done = subprocess.run(
        [sys.executable, "-c", "import sys, ntk_torch; print('transformers' in sys.modules)"],
        capture_output=True, text=True, env=env, check=True,
    )
    assert done.stdout.strip() == "False"


# ---------------------------------------------------------------------------------------
# Tiny Hugging Face models built from configs (no weights downloaded)
# ---------------------------------------------------------------------------------------

def _hf_models():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    eager = dict(attn_implementation="eager")
    return {
        "gpt2": transformers.GPT2Model(transformers.GPT2Config(
            vocab_size=40, n_positions=12, n_embd=8, n_layer=1, n_head=2, bos_token_id=0, eos_token_id=0, **eager)),
        "bert": transformers.BertModel(transformers.BertConfig(
            vocab_size=40, hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=12,
            max_position_embeddings=12, **eager)),
        "t5": transformers.T5EncoderModel(transformers.T5Config(
            vocab_size=40, d_model=8, d_kv=4, d_ff=12, num_layers=1, num_heads=2, **eager)),
    }


@pytest.mark.slow
@pytest.mark.parametrize("name", ["gpt2", "bert", "t5"])
def test_hugging_face_models_are_covered_and_exact(name):
    """GPT-2's Conv1D (a rule registered by import path), BERT's and GPT-2's position
    embeddings looked up with ids shared by every example, T5's RMS norm (``w * x_hat``)
    and relative attention bias: nothing falls back, and the kernel is exact."""
    model = _hf_models()[name].eval()
    x1 = torch.randint(0, 40, (3, 5), generator=torch.Generator().manual_seed(1))
    x2 = torch.randint(0, 40, (2, 5), generator=torch.Generator().manual_seed(2))

    def output_fn(out):
        return out.last_hidden_state[:, 0, :3]

    report = explain(model, x1, method="structured", output_fn=output_fn, dtype=F64)
    assert report.fallback == {}
    if name == "gpt2":
        assert {t.rule for t in report.terms if "c_attn" in t.modules} == {"hf_conv1d"}
    ref_same = naive_ntk(model, x1, output_fn=output_fn)
    ref_cross = naive_ntk(model, x1, x2, output_fn=output_fn)
    for mode in MODES:
        kernel = ntk.NTK(model, mode=mode, method="structured", output_fn=output_fn, dtype=F64)
        assert relative_error(kernel(x1), reduce_mode(ref_same, mode)) < 1e-10
        assert relative_error(kernel(x1, x2), reduce_mode(ref_cross, mode)) < 1e-10


@pytest.mark.parametrize("name", ["attention", "functional", "transposed_convs"])
def test_per_example_gradients_over_positions_stack_outputs(cases, name, monkeypatch):
    """Per-example gradients over positions (``DenseFeatures.expand`` with ``T > 1``: the
    outputs stacked as the rows of one ``bmm`` per example and group), forced for every
    layer here, give the naive kernel, plain and transposed weights alike."""
    from ntk_torch.kernel.structured import engine, terms

    model, _, x1, x2, ref_same, ref_cross = cases[name]
    calls = []
    original = terms.DenseFeatures._expand_over_positions

    def spy(self, cotangent, transposed):
        calls.append(transposed)
        return original(self, cotangent, transposed)

    monkeypatch.setattr(terms.DenseFeatures, "_expand_over_positions", spy)
    monkeypatch.setattr(engine, "choose_strategy", lambda *args: ("grads", {"grads": 0.0}))
    for mode in MODES:
        kernel = ntk.NTK(model, mode=mode, method="structured", dtype=F64)
        assert relative_error(kernel(x1), reduce_mode(ref_same, mode)) < 1e-10
        assert relative_error(kernel(x1, x2), reduce_mode(ref_cross, mode)) < 1e-10
    # conv_transpose and x @ W (addmm, matmul) hold (d_in, d_out) weights: the transposed layout
    expected = {"attention": {False}, "functional": {False, True}, "transposed_convs": {True}}
    assert set(calls) == expected[name]


# --------------------------------------------------------------------------- im2col patches

def _windows_by_unfold(x, kernel, stride, dilation, pads, groups):
    """The generic window gather of ``layers.patches`` (``Tensor.unfold`` per dimension),
    which every spatial rank but two uses, as the reference for the 2-D ``F.unfold`` path."""
    from ntk_torch.kernel.structured import layers

    return layers.patches(x.unsqueeze(2), (1, *kernel), (1, *stride), (1, *dilation), (*pads, 0, 0), groups)


@pytest.mark.parametrize("kernel, stride, dilation, pads, groups", [
    ((3, 3), (1, 1), (1, 1), (1, 1, 1, 1), 1),
    ((2, 3), (2, 1), (1, 2), (1, 0, 2, 1), 2),  # asymmetric pads ("same" with an even kernel)
    ((3, 2), (1, 3), (2, 1), (0, 0, 0, 0), 4),
])
def test_2d_patches_by_im2col_match_the_window_gather(kernel, stride, dilation, pads, groups):
    """``F.unfold``'s patches (a transposed view) equal the windows gathered one axis at a
    time, laid out ``(m, g, L, C/g prod(kernel))`` like a weight slice."""
    from ntk_torch.kernel.structured import layers

    x = torch.randn(3, 4, 7, 6, dtype=F64)
    patches = layers.patches(x, kernel, stride, dilation, pads, groups)
    assert patches.stride(2) == 1  # positions fastest: im2col's layout, not copied
    torch.testing.assert_close(patches, _windows_by_unfold(x, kernel, stride, dilation, pads, groups),
                               rtol=0, atol=0)


def test_a_bias_joins_patches_in_their_layout():
    """The bias's constant feature is appended as one more im2col row (a cheap copy of whole
    rows), and the joined features equal the plain concatenation."""
    from ntk_torch.kernel.structured import layers
    from ntk_torch.kernel.structured.terms import DenseFeatures

    x = torch.randn(2, 3, 5, 5, dtype=F64)
    weight = DenseFeatures(layers.patches(x, (3, 3), (1, 1), (1, 1), (1, 1, 1, 1), 1))
    bias = layers.bias_term(torch.zeros(2, 1, 1, 25, 4, dtype=F64), weight).features
    joined = DenseFeatures.along_width([weight, bias]).values
    assert joined.shape == (2, 1, 25, 28) and joined.stride(2) == 1
    expected = torch.cat([weight.values, torch.ones(2, 1, 25, 1, dtype=F64)], dim=3)
    torch.testing.assert_close(joined, expected, rtol=0, atol=0)
