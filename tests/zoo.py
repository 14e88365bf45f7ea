"""The shared model zoo: every kernel engine is tested on each of these models.

Each case is a small model (float32, as users have them), a seeded input batch, and the
``output_fn`` it needs. Models with BatchNorm have non-trivial running statistics and
models with Dropout keep it, so eval-mode evaluation is exercised.
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
