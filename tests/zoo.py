"""The shared model zoo: every kernel engine is tested on each of these models.

Each case is a small model (float32, as users have them), a seeded input batch, and the
``output_fn`` it needs. Models with BatchNorm have non-trivial running statistics and
models with Dropout keep it, so eval-mode evaluation is exercised.

:func:`make_zoo` holds the models every function transform runs; :func:`make_any_module_zoo`
the ones it does not (RNNs, checkpointing, masks with data-dependent control flow,
parametrizations, sparse and padded embeddings, nested inputs with arguments that are not
batched); :func:`make_hf_zoo` tiny Hugging Face models built from configs (never
downloaded), when ``transformers`` is installed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional

import torch
from torch import nn


@dataclass
class ZooCase:
    name: str
    model: nn.Module
    make_inputs: Callable[[int, int], Any]  # (n, seed) -> inputs
    output_fn: Optional[Callable[[Any], torch.Tensor]] = None
    call_kwargs: Optional[Dict[str, Any]] = None  # arguments that are not batched
    vmap: bool = True  # torch.func.vmap runs the model in float64


class MLP(nn.Module):
    def __init__(self, d_in=6, width=12, d_out=3):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(d_in, width), nn.Tanh(), nn.Linear(width, width), nn.Tanh(), nn.Linear(width, d_out)
        )

    def forward(self, x):
        return self.net(x)


class ConvBN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(2, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 4, 3, stride=2)
        self.dropout = nn.Dropout(0.5)
        self.head = nn.Linear(4 * 2 * 2, 3)

    def forward(self, x):
        h = torch.relu(self.bn(self.conv1(x)))
        h = torch.tanh(self.conv2(h))
        return self.head(self.dropout(h.flatten(1)))


class Residual(nn.Module):
    def __init__(self, d=8):
        super().__init__()
        self.inp = nn.Linear(5, d)
        self.norm = nn.LayerNorm(d)
        self.fc1 = nn.Linear(d, 16)
        self.fc2 = nn.Linear(16, d)
        self.out = nn.Linear(d, 2)

    def forward(self, x):
        h = self.inp(x)
        h = h + self.fc2(torch.tanh(self.fc1(self.norm(h))))
        return self.out(torch.tanh(h))


class TinyTransformer(nn.Module):
    def __init__(self, vocab=20, d=16):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.encoder = nn.TransformerEncoderLayer(
            d_model=d, nhead=2, dim_feedforward=24, dropout=0.1, batch_first=True
        )
        self.head = nn.Linear(d, 3)

    def forward(self, tokens):
        return self.head(self.encoder(self.embed(tokens)).mean(dim=1))


class TwoInput(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 8)
        self.b = nn.Linear(3, 8)
        self.out = nn.Linear(8, 2)

    def forward(self, a, b):
        return self.out(torch.tanh(self.a(a)) * torch.sigmoid(self.b(b)))


class DictInOut(nn.Module):
    """Takes keyword inputs and returns a dict; the kernel is of ``logits`` (N, 2, 2)."""

    def __init__(self):
        super().__init__()
        self.image = nn.Linear(5, 8)
        self.meta = nn.Linear(2, 8)
        self.logits = nn.Linear(8, 4)
        self.aux = nn.Linear(8, 1)

    def forward(self, image, meta):
        h = torch.tanh(self.image(image) + self.meta(meta))
        return {"logits": self.logits(h).view(-1, 2, 2), "aux": self.aux(h)}


class Tied(nn.Module):
    """An autoencoder-style model whose decoder shares the encoder's weight."""

    def __init__(self):
        super().__init__()
        self.enc = nn.Linear(6, 6)
        self.dec = nn.Linear(6, 6)
        self.dec.weight = self.enc.weight
        self.head = nn.Linear(6, 2)

    def forward(self, x):
        return self.head(torch.tanh(self.dec(torch.tanh(self.enc(x)))))


class Frozen(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Linear(6, 10)
        self.classifier = nn.Linear(10, 3)
        for p in self.features.parameters():
            p.requires_grad_(False)

    def forward(self, x):
        return self.classifier(torch.relu(self.features(x)))


class WithBuffer(nn.Module):
    def __init__(self):
        super().__init__()
        self.register_buffer("mean", torch.linspace(-1.0, 1.0, 6))
        self.register_buffer("scale", torch.linspace(0.5, 2.0, 6))
        self.fc = nn.Linear(6, 7)
        self.out = nn.Linear(7, 3)

    def forward(self, x):
        return self.out(torch.tanh(self.fc((x - self.mean) / self.scale)))


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _warm_batchnorm(model: nn.Module, x: torch.Tensor) -> None:
    """Give BatchNorm layers non-trivial running statistics."""
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(x)
    model.eval()


def make_zoo() -> Dict[str, ZooCase]:
    """Fresh, seeded instances of every zoo model."""
    torch.manual_seed(1234)
    conv = ConvBN()
    _warm_batchnorm(conv, torch.randn(16, 2, 5, 5, generator=_gen(99)) * 2 + 0.5)
    cases = [
        ZooCase("mlp", MLP(), lambda n, s: torch.randn(n, 6, generator=_gen(s))),
        ZooCase("cnn_bn", conv, lambda n, s: torch.randn(n, 2, 5, 5, generator=_gen(s))),
        ZooCase("residual", Residual(), lambda n, s: torch.randn(n, 5, generator=_gen(s))),
        ZooCase(
            "transformer",
            TinyTransformer(),
            lambda n, s: torch.randint(0, 20, (n, 5), generator=_gen(s)),
        ),
        ZooCase(
            "two_input",
            TwoInput(),
            lambda n, s: (torch.randn(n, 4, generator=_gen(s)), torch.randn(n, 3, generator=_gen(s + 1))),
        ),
        ZooCase(
            "dict_in_out",
            DictInOut(),
            lambda n, s: {
                "image": torch.randn(n, 5, generator=_gen(s)),
                "meta": torch.randn(n, 2, generator=_gen(s + 1)),
            },
            output_fn=lambda out: out["logits"],
        ),
        ZooCase("tied", Tied(), lambda n, s: torch.randn(n, 6, generator=_gen(s))),
        ZooCase("frozen", Frozen(), lambda n, s: torch.randn(n, 6, generator=_gen(s))),
        ZooCase("buffer", WithBuffer(), lambda n, s: torch.randn(n, 6, generator=_gen(s))),
    ]
    return {case.name: case for case in cases}


ZOO_NAMES = list(make_zoo())


# ---------------------------------------------------------------------------------------
# Models torch.func.vmap (or forward mode) cannot run as they are: every engine must give
# the exact kernel or refuse with a clear error (tests/test_any_module.py).
# ---------------------------------------------------------------------------------------

class Recurrent(nn.Module):
    """Two stacked recurrent layers of one kind, the first ``batch_first``, the second
    not (its input transposed to time first), then a head on the last step."""

    def __init__(self, cell: type):
        super().__init__()
        self.first = cell(3, 4, batch_first=True)
        self.second = cell(4, 4)
        self.head = nn.Linear(4, 2)

    def forward(self, x):  # (N, T, 3)
        h, _ = self.first(x)
        h, _ = self.second(h.transpose(0, 1))  # (T, N, 4)
        return self.head(h[-1])


class Checkpointed(nn.Module):
    """A residual block recomputed in the backward (``torch.utils.checkpoint``)."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(5, 6)
        self.block = nn.Sequential(nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, 6))
        self.out = nn.Linear(6, 2)

    def forward(self, x):
        h = torch.tanh(self.inp(x))
        h = h + torch.utils.checkpoint.checkpoint(self.block, h, use_reentrant=False)
        return self.out(torch.tanh(h))


class Parametrized(nn.Module):
    """``weight_norm`` (no forward-mode derivative) and ``spectral_norm`` parametrizations."""

    def __init__(self):
        super().__init__()
        parametrizations = nn.utils.parametrizations
        self.fc = parametrizations.weight_norm(nn.Linear(5, 6))
        self.mid = parametrizations.spectral_norm(nn.Linear(6, 6))
        self.out = nn.Linear(6, 2)

    def forward(self, x):
        return self.out(torch.tanh(self.mid(torch.tanh(self.fc(x)))))


class SparseEmbedding(nn.Module):
    """``nn.Embedding(sparse=True)``: sparse gradients, which ``vmap`` cannot batch."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(9, 4, sparse=True)
        self.head = nn.Linear(4, 2)

    def forward(self, tokens):
        return self.head(torch.tanh(self.embed(tokens)).mean(dim=1))


class PaddedTied(nn.Module):
    """An ``Embedding`` with ``padding_idx`` tied to the output layer (as BERT's masked-LM
    head): forward mode's derivative of the padding row is not reverse mode's."""

    def __init__(self, vocab=7, d=4):
        super().__init__()
        self.embed = nn.Embedding(vocab, d, padding_idx=0)
        self.mix = nn.Linear(d, d)
        self.head = nn.Linear(d, vocab, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, tokens):
        return self.head(torch.tanh(self.mix(self.embed(tokens))).mean(dim=1))


class MaskedMean(nn.Module):
    """Data-dependent control flow on a mask (``if mask.all()``, as Hugging Face's masking
    utilities do): a plain mean when nothing is masked, a masked mean otherwise."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(3, 5)
        self.out = nn.Linear(5, 2)

    def forward(self, x, mask):  # (N, T, 3), (N, T) bool
        h = torch.tanh(self.inp(x))
        if mask.all():
            pooled = h.mean(dim=1)
        else:
            weights = mask.to(h.dtype).unsqueeze(-1)
            pooled = (h * weights).sum(dim=1) / weights.sum(dim=1).clamp_min(1.0)
        return self.out(pooled)


class NestedInputs(nn.Module):
    """Called as ``model(batch, scale=..., reduce=...)``: ``batch`` a dict holding a
    Tensor and a tuple of a Tensor and a list of integer ids, ``scale`` a Tensor that is not
    batched and ``reduce`` a string."""

    def __init__(self):
        super().__init__()
        self.image = nn.Linear(4, 6)
        self.meta = nn.Linear(2, 6)
        self.embed = nn.Embedding(5, 6)
        self.out = nn.Linear(6, 2)

    def forward(self, batch, scale, reduce="mean"):
        meta, (ids,) = batch["extra"]
        tokens = self.embed(ids)
        pooled = tokens.mean(dim=1) if reduce == "mean" else tokens.sum(dim=1)
        h = torch.tanh(self.image(batch["image"]) * scale + self.meta(meta) + pooled)
        return self.out(h)


def _with_padding(tokens: torch.Tensor) -> torch.Tensor:
    """Token ids with every other example's tail set to the padding id 0."""
    tokens = tokens.clone()
    tokens[::2, -2:] = 0
    return tokens


def _mask(n: int, t: int, seed: int) -> torch.Tensor:
    """A bool mask with some examples fully on and some padded."""
    mask = torch.ones(n, t, dtype=torch.bool)
    lengths = torch.randint(1, t + 1, (n,), generator=_gen(seed))
    lengths[0] = t  # the first example (the dry runs' one) has no padding
    for i, length in enumerate(lengths.tolist()):
        mask[i, length:] = False
    return mask


def _nested(n: int, s: int) -> Any:
    return ({
        "image": torch.randn(n, 4, generator=_gen(s)),
        "extra": (torch.randn(n, 2, generator=_gen(s + 1)), [torch.randint(0, 5, (n, 3), generator=_gen(s + 2))]),
    },)


def make_any_module_zoo() -> Dict[str, ZooCase]:
    """Fresh, seeded instances of the models ``vmap`` or forward mode cannot run as they
    are (``case.vmap`` says whether ``vmap`` runs it in float64)."""
    torch.manual_seed(4321)
    cases = [
        ZooCase("lstm", Recurrent(nn.LSTM), lambda n, s: torch.randn(n, 4, 3, generator=_gen(s)), vmap=False),
        ZooCase("gru", Recurrent(nn.GRU), lambda n, s: torch.randn(n, 4, 3, generator=_gen(s)), vmap=False),
        ZooCase("rnn", Recurrent(nn.RNN), lambda n, s: torch.randn(n, 4, 3, generator=_gen(s)), vmap=False),
        ZooCase("checkpoint", Checkpointed(), lambda n, s: torch.randn(n, 5, generator=_gen(s)), vmap=False),
        ZooCase("parametrized", Parametrized(), lambda n, s: torch.randn(n, 5, generator=_gen(s))),
        ZooCase(
            "sparse_embedding", SparseEmbedding(), lambda n, s: torch.randint(0, 9, (n, 5), generator=_gen(s)),
            vmap=False,
        ),
        ZooCase(
            "padded_tied", PaddedTied(), lambda n, s: _with_padding(torch.randint(1, 7, (n, 5), generator=_gen(s))),
        ),
        ZooCase(
            "masked", MaskedMean(), lambda n, s: (torch.randn(n, 4, 3, generator=_gen(s)), _mask(n, 4, s)),
            vmap=False,
        ),
        ZooCase(
            "nested", NestedInputs(), _nested, call_kwargs={"scale": torch.tensor(0.5), "reduce": "sum"},
        ),
    ]
    return {case.name: case for case in cases}


ANY_MODULE_NAMES = list(make_any_module_zoo())


# ---------------------------------------------------------------------------------------
# Tiny Hugging Face models from configs (random weights, nothing downloaded), called with
# attention masks as they always are.
# ---------------------------------------------------------------------------------------

HF_VOCAB = 11
HF_LENGTH = 5
HF_NAMES = ["hf_gpt2", "hf_bert", "hf_distilbert", "hf_t5"]


def _hf_inputs(n: int, seed: int, decoder: bool = False) -> Dict[str, torch.Tensor]:
    """Token ids (0 is the padding id) with a right-padded attention mask."""
    ids = torch.randint(1, HF_VOCAB, (n, HF_LENGTH), generator=_gen(seed))
    mask = _mask(n, HF_LENGTH, seed).long()
    ids = ids * mask  # padded positions hold the padding id
    inputs = {"input_ids": ids, "attention_mask": mask}
    if decoder:
        inputs["decoder_input_ids"] = torch.randint(1, HF_VOCAB, (n, 2), generator=_gen(seed + 1))
    return inputs


def _last_logits(out: Any) -> torch.Tensor:
    """The first four logits (the padding id's among them) at the last position."""
    return out.logits[:, -1, :4]


def _first_logits(out: Any) -> torch.Tensor:
    return out.logits[:, 0, :4]


def _logits(out: Any) -> torch.Tensor:
    return out.logits


def make_hf_zoo() -> Dict[str, ZooCase]:
    """GPT-2 (causal LM), BERT (masked LM, its word embeddings with a padding id tied to
    the output layer), DistilBERT (sequence classification) and T5 (encoder-decoder), one
    layer each; empty when ``transformers`` is not installed."""
    try:
        import transformers
    except ImportError:
        return {}
    transformers.logging.set_verbosity_error()
    torch.manual_seed(2024)
    common = dict(vocab_size=HF_VOCAB, pad_token_id=0)
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        n_layer=1, n_head=2, n_embd=8, n_positions=8, bos_token_id=1, eos_token_id=1, **common))
    bert = transformers.BertForMaskedLM(transformers.BertConfig(
        num_hidden_layers=1, num_attention_heads=2, hidden_size=8, intermediate_size=12,
        max_position_embeddings=8, **common))
    distilbert = transformers.DistilBertForSequenceClassification(transformers.DistilBertConfig(
        n_layers=1, n_heads=2, dim=8, hidden_dim=12, max_position_embeddings=8, num_labels=3, **common))
    t5 = transformers.T5ForConditionalGeneration(transformers.T5Config(
        num_layers=1, num_decoder_layers=1, num_heads=2, d_model=8, d_kv=4, d_ff=12,
        decoder_start_token_id=0, **common))
    cases = [
        ZooCase("hf_gpt2", gpt2, _hf_inputs, _last_logits, vmap=False),
        ZooCase("hf_bert", bert, _hf_inputs, _first_logits, vmap=False),
        ZooCase("hf_distilbert", distilbert, _hf_inputs, _logits, vmap=False),
        ZooCase("hf_t5", t5, lambda n, s: _hf_inputs(n, s, decoder=True), _last_logits, vmap=False),
    ]
    assert [case.name for case in cases] == HF_NAMES
    return {case.name: case for case in cases}
