"""Small models exercising each structured rule added for real models: attention, function
rules (F.linear, addmm, matmul, element-wise), norms, transposed convolutions, bags of
embeddings, position embeddings. Each is a ``(model, make_inputs)`` pair, seeded."""

from __future__ import annotations

from typing import Callable, Dict, Tuple

import torch
import torch.nn.functional as F
from torch import nn


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


class Attention(nn.Module):
    """Self-attention (packed in-projection, F.linear inside F.multi_head_attention_forward)
    in a batch-first encoder layer and a sequence-first MultiheadAttention, plus a
    cross-attention whose packed weight is split into views (that weight falls back)."""

    def __init__(self, d=8):
        super().__init__()
        self.encoder = nn.TransformerEncoderLayer(d, 2, 12, dropout=0.1, batch_first=True)
        self.seq_first = nn.MultiheadAttention(d, 2)
        self.cross = nn.MultiheadAttention(d, 2, batch_first=True, bias=False)
        self.memory = nn.Linear(3, d)
        self.head = nn.Linear(d, 3)

    def forward(self, x):  # (N, 5, 3)
        h = self.memory(x)
        h = self.encoder(h)
        s = h.transpose(0, 1)
        h = h + self.seq_first(s, s, s, need_weights=False)[0].transpose(0, 1)
        h = h + self.cross(h, torch.tanh(self.memory(x)), torch.tanh(self.memory(x)), need_weights=False)[0]
        return self.head(h.mean(dim=1))


class Conv1DLike(nn.Module):
    """Hugging Face ``Conv1D``'s computation written out: ``torch.addmm(b, x, W)``."""

    def __init__(self, nf, nx):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(nx, nf) * 0.3)
        self.bias = nn.Parameter(torch.randn(nf) * 0.1)

    def forward(self, x):
        out = torch.addmm(self.bias, x.view(-1, x.size(-1)), self.weight, beta=0.5, alpha=2.0)
        return out.view(x.size()[:-1] + (self.weight.shape[1],))


class Functional(nn.Module):
    """Parameters used through torch functions: F.linear on a module's weight and a bare
    weight, ``x @ W`` (a matrix and a vector), addmm, element-wise add/sub/mul with
    broadcasting, ``1 - p``, ``torch.add(..., alpha=)``, ``2 * p``, a layer scale."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 6)
        self.proj = nn.Parameter(torch.randn(6, 6) * 0.4)
        self.right = nn.Parameter(torch.randn(6, 5) * 0.4)
        self.vector = nn.Parameter(torch.randn(5) * 0.4)
        self.mm = Conv1DLike(5, 5)
        self.scale = nn.Parameter(torch.linspace(0.5, 1.5, 5))
        self.shift = nn.Parameter(torch.linspace(-0.3, 0.3, 5))
        self.gate = nn.Parameter(torch.tensor(0.3))
        self.offset = nn.Parameter(torch.linspace(-0.2, 0.2, 5))
        self.temperature = nn.Parameter(torch.tensor(0.7))
        self.head = nn.Linear(5, 2)

    def forward(self, x):  # (N, 3, 4)
        h = torch.tanh(self.fc(x)) + 0.5 * F.linear(x, self.fc.weight)  # a weight reused
        h = torch.tanh(F.linear(h, self.proj))
        h = torch.tanh(h @ self.right)
        h = self.mm(h) * self.scale - self.shift
        h = torch.tanh(h) * (1 - self.gate) + (h @ self.vector).unsqueeze(-1) * 0.1
        h = torch.add(h, self.offset, alpha=-0.5) * (2.0 * self.temperature)
        return self.head(h.mean(dim=1))


class T5Norm(nn.Module):
    """T5's RMS norm without mean subtraction: ``w * x / rms(x)`` (an element-wise rule)."""

    def __init__(self, d, eps=1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.linspace(0.5, 1.5, d))
        self.eps = eps

    def forward(self, x):
        variance = x.pow(2).mean(-1, keepdim=True)
        return self.weight * (x * torch.rsqrt(variance + self.eps))


class LayerNorm2d(nn.LayerNorm):
    """timm's channels-first LayerNorm: permute, F.layer_norm, permute back."""

    def forward(self, x):
        x = x.permute(0, 2, 3, 1)
        x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2).contiguous()  # (vmap cannot query channels-last layouts)


class GroupNormAct(nn.GroupNorm):
    """timm's GroupNormAct: F.group_norm then an activation."""

    def forward(self, x):
        return torch.tanh(F.group_norm(x, self.num_groups, self.weight, self.bias, self.eps))


class NormVariants(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3, padding=1)
        self.ln2d = LayerNorm2d(4)
        self.gn_act = GroupNormAct(2, 4)
        self.ln_no_bias = nn.LayerNorm(16, bias=False)
        self.ln_plain = nn.LayerNorm(16, elementwise_affine=False)
        self.rms = nn.RMSNorm(16)
        self.rms_eps = nn.RMSNorm([4, 4], eps=1e-3)
        self.t5 = T5Norm(16)
        self.head = nn.Linear(16, 3)

    def forward(self, x):  # (N, 2, 4, 4)
        h = self.gn_act(self.ln2d(self.conv(x)))  # (N, 4, 4, 4)
        h = self.rms_eps(h)
        h = h.flatten(2)  # (N, 4, 16)
        h = torch.tanh(self.ln_no_bias(h)) + self.ln_plain(h)
        h = self.t5(self.rms(h))
        return self.head(h.mean(dim=1))


class TransposedConvs(nn.Module):
    """Transposed convolutions (1-, 2- and 3-D): strides, padding, output_padding,
    dilation, groups, an ``output_size`` and the functional form."""

    def __init__(self):
        super().__init__()
        self.up1 = nn.ConvTranspose1d(4, 6, 3, stride=2, padding=1, output_padding=1, groups=2, dilation=2)
        self.up2 = nn.ConvTranspose2d(2, 4, (3, 2), stride=(2, 1), padding=(1, 0), output_padding=(1, 0),
                                      dilation=(1, 2))
        self.sized = nn.ConvTranspose2d(4, 2, 2, stride=2, bias=False)
        self.kernel = nn.Parameter(torch.randn(2, 2, 2, 2) * 0.3)
        self.up3 = nn.ConvTranspose3d(1, 2, 2, stride=(1, 2, 1), padding=(0, 1, 0))
        self.head = nn.Linear(6 * 12 + 2 * 15 * 11 + 2 * 2 * 2 * 3, 3)

    def forward(self, x, image):  # (N, 4, 5), (N, 2, 3, 4)
        a = torch.tanh(self.up1(x))  # (N, 6, 12)
        b = torch.tanh(self.up2(image))  # (N, 4, 6, 6)
        b = torch.tanh(self.sized(b, output_size=(13, 12)))  # (N, 2, 13, 12)
        b = F.conv_transpose2d(b, self.kernel, stride=1, padding=(0, 1), groups=1)  # (N, 2, 14, 11)
        b = F.pad(b, (0, 0, 0, 1))
        c = torch.tanh(self.up3(image[:, :1, :2, :2].unsqueeze(1)))  # (N, 2, 2, 2, 3)
        return self.head(torch.cat([a.flatten(1), b.flatten(1), c.flatten(1)], dim=1))


class Bags(nn.Module):
    """EmbeddingBag in every mode and input form, an Embedding(sparse=True) and one with a
    negative padding_idx."""

    def __init__(self):
        super().__init__()
        self.sum = nn.EmbeddingBag(9, 4, mode="sum")
        self.mean = nn.EmbeddingBag(9, 4, mode="mean", padding_idx=0)
        self.max = nn.EmbeddingBag(9, 4, mode="max")
        self.last = nn.EmbeddingBag(9, 4, mode="sum", include_last_offset=True, padding_idx=1)
        self.sparse = nn.Embedding(9, 4, sparse=True)
        self.negative = nn.Embedding(9, 4, padding_idx=-1)
        self.head = nn.Linear(4, 2)

    def forward(self, tokens, weights):  # (N, 6) ints in [0, 9), (N, 6)
        n = tokens.shape[0]
        flat = tokens.reshape(-1)
        offsets = torch.arange(0, 6 * n, 6)
        a = self.sum(flat, offsets, per_sample_weights=weights.reshape(-1))
        b = self.mean(tokens)  # 2-D: one bag per row
        c = self.max(tokens[:, :4])
        cuts = torch.stack([torch.arange(0, 6 * n, 6), torch.arange(2, 6 * n, 6)], dim=1).reshape(-1)
        d = self.last(flat, torch.cat([cuts, cuts.new_full((1,), 6 * n)])).reshape(n, 2, 4).sum(dim=1)
        e = self.sparse(tokens).mean(dim=1) + self.negative(tokens).mean(dim=1)
        return self.head(torch.tanh(a + b + c + d + e))


class Positions(nn.Module):
    """Position embeddings: a table added to every example (``x + pos``: covered), a sliced
    table (``pos[:T]``: a view, so it falls back, exactly) and Hugging Face's position
    ``nn.Embedding`` looked up with ids shared by every example (covered)."""

    def __init__(self, vocab=7, d=6, positions=8):
        super().__init__()
        self.tokens = nn.Embedding(vocab, d)
        self.table = nn.Parameter(torch.randn(5, d) * 0.3)
        self.sliced = nn.Parameter(torch.randn(positions, d) * 0.3)
        self.position = nn.Embedding(positions, d)
        self.register_buffer("position_ids", torch.arange(positions).unsqueeze(0))
        self.mix = nn.Linear(d, d)
        self.head = nn.Linear(d, 2)

    def forward(self, tokens):  # (N, 5)
        t = tokens.shape[1]
        h = self.tokens(tokens) + self.table
        h = h + self.sliced[:t] + self.position(self.position_ids[:, :t])
        return self.head(torch.tanh(self.mix(h)).mean(dim=1))


def layer_models() -> Dict[str, Tuple[nn.Module, Callable[[int, int], object]]]:
    """Fresh, seeded instances of every model above with their input makers."""
    torch.manual_seed(11)
    return {
        "attention": (Attention(), lambda n, s: torch.randn(n, 5, 3, generator=_gen(s))),
        "functional": (Functional(), lambda n, s: torch.randn(n, 3, 4, generator=_gen(s))),
        "norm_variants": (NormVariants(), lambda n, s: torch.randn(n, 2, 4, 4, generator=_gen(s)) * 2 + 0.5),
        "transposed_convs": (
            TransposedConvs(),
            lambda n, s: (torch.randn(n, 4, 5, generator=_gen(s)), torch.randn(n, 2, 3, 4, generator=_gen(s + 7))),
        ),
        "bags": (
            Bags(),
            lambda n, s: (torch.randint(0, 9, (n, 6), generator=_gen(s)), torch.rand(n, 6, generator=_gen(s + 3))),
        ),
        "positions": (Positions(), lambda n, s: torch.randint(0, 7, (n, 5), generator=_gen(s))),
    }


def without_sparse_gradients(model: nn.Module) -> nn.Module:
    """A copy whose embeddings make dense gradients (the naive reference reshapes
    gradients; the kernel does not depend on the gradient's layout)."""
    import copy

    dense = copy.deepcopy(model)
    for module in dense.modules():
        if isinstance(module, (nn.Embedding, nn.EmbeddingBag)):
            module.sparse = False
    return dense
