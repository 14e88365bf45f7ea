"""A layer's share of the kernel from what flows through it, and the two ways to contract it.

Every parameter a rule covers has a per-example Jacobian of one of two forms
(Novak, Sohl-Dickstein & Schoenholz 2022, "structured derivatives"). With ``n`` examples,
``O`` outputs, ``g`` weight groups (convolution ``groups``, else 1), ``T`` positions at
which the weight is applied (sequence positions, convolution patches, calls of a shared
module) and the cotangent ``u[i, a] = d f_a(x_i) / d y`` of the layer's output ``y``:

* :class:`KroneckerTerm` -- a sum of outer products over positions,
  ``J[i, a] = sum_t u[i, a, g, t, :] (x) v[i, g, t, :]``, for weights applied to features
  ``v`` (inputs of ``nn.Linear``, patches of a convolution, one-hot tokens of
  ``nn.Embedding``; a bias is the weight of a constant feature 1). Its kernel is

      K[i, j, a, b] = sum_g sum_{t, s} <v_igt, v'_jgs> <u_iagt, u'_jbgs>

  and is contracted by one of two strategies, chosen per block by FLOP count:

  - ``"gram"``: the Gram matrix of the features times the Gram matrix of the cotangents,
    never forming ``J``: about ``2 n1 n2 T^2 (d_in + O^k d_out)`` FLOPs (``k = 2`` in
    ``full`` mode, 1 otherwise). Cheap when ``T`` is small: for an MLP layer the weight
    kernel is ``(X1 X2^T)[i, j] (G1 G2^T)[ia, jb]``.
  - ``"grads"``: the per-example weight gradients ``J`` (``n O p`` values, ``p = g d_out
    d_in``), then their Gram matrix: about ``2 O p (n1 T + n2 T) + 2 n1 n2 O^k p``. Cheap
    when ``T^2`` is large compared with ``p`` (convolutions over many positions).

* :class:`GradientTerm` -- explicit per-example gradients ``J`` of shape ``(n, O, p)``,
  for element-wise affine parameters (the ``weight``/``bias`` of normalisation layers,
  whose Jacobian has no Kronecker structure) and for parameters no rule covers (computed
  by ``vmap(jacrev)``, the Jacobian-contraction fallback).

Contractions accumulate into the layout's *work layout* (:mod:`ntk_torch.layout`), where
every update is one BLAS call or one fused element-wise pass.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple, Union

import torch

from ...layout import Layout

STRATEGIES = ("gram", "grads")


# ---------------------------------------------------------------------------------------
# Features: the input side of a Kronecker term
# ---------------------------------------------------------------------------------------

class DenseFeatures:
    """Feature vectors ``v`` of shape ``(n, g, T, d_in)``."""

    def __init__(self, values: torch.Tensor):
        if values.dim() != 4:
            raise ValueError(f"dense features must be (n, g, T, d), got {tuple(values.shape)}")
        self.values = values

    @property
    def groups(self) -> int:
        return self.values.shape[1]

    @property
    def positions(self) -> int:
        return self.values.shape[2]

    @property
    def width(self) -> int:
        """``d_in``: parameters per output feature and group."""
        return self.values.shape[3]

    def gram_flops(self) -> int:
        """FLOPs per entry of :meth:`gram`."""
        return 2 * self.width

    def gram(self, other: "DenseFeatures") -> torch.Tensor:
        """``<v_igt, v'_jgs>`` as ``(g, n1 T1, n2 T2)``."""
        a, b = self.values, other.values
        g, d = a.shape[1], a.shape[3]
        left = a.transpose(0, 1).reshape(g, -1, d)
        right = b.transpose(0, 1).reshape(g, -1, d)
        return torch.matmul(left, right.transpose(1, 2))

    def take(self, start: int, stop: int) -> "DenseFeatures":
        """The features of examples ``start:stop`` (a view)."""
        return DenseFeatures(self.values[start:stop])

    def expand(self, cotangent: torch.Tensor, transposed: bool = False) -> torch.Tensor:
        """Per-example gradients ``sum_t u_iagt (x) v_igt`` as ``(n, O, g d_out d_in)``,
        laid out like a weight ``(g d_out, d_in)`` (a fused bias is its last column), or
        ``(g, d_in, d_out)`` when ``transposed`` (a weight applied as ``x @ W``)."""
        n, o, g, t, d_out = cotangent.shape
        if t == 1:  # one position: an outer product
            equation = "iagtd,igte->iaged" if transposed else "iagtd,igte->iagde"
            return torch.einsum(equation, cotangent, self.values).reshape(n, o, -1)
        return self._expand_over_positions(cotangent, transposed)

    def _expand_over_positions(self, cotangent: torch.Tensor, transposed: bool) -> torch.Tensor:
        """:meth:`expand` over ``T > 1`` positions: one ``bmm`` over (example, group) with
        the outputs stacked as rows, ``[u_i0; ...; u_i(O-1)]^T v_i``: ``(O d_out, T) @ (T,
        d_in)``. Batching over outputs instead would need the features ``O`` times (a batched
        matmul materialises a broadcast operand) and many small products. The stacked
        cotangent is a view for a convolution (channels before positions); the result is
        copied only to reorder groups or transpose."""
        n, o, g, t, d_out = cotangent.shape
        d_in = self.values.shape[3]
        rows = cotangent.permute(0, 2, 1, 4, 3).reshape(n * g, o * d_out, t)
        products = torch.bmm(rows, self.values.reshape(n * g, t, d_in)).view(n, g, o, d_out, d_in)
        if transposed:
            products = products.transpose(3, 4)
        return products.transpose(1, 2).reshape(n, o, -1)

    @staticmethod
    def along_positions(parts: List["DenseFeatures"]) -> "DenseFeatures":
        return DenseFeatures(torch.cat([p.values for p in parts], dim=2))

    @staticmethod
    def along_width(parts: List["DenseFeatures"]) -> "DenseFeatures":
        """The features side by side (a weight's and a bias's constant), joined in the
        first part's memory order: positions fastest for im2col's patches (a transposed
        view, see :func:`.layers.patches`), else the width."""
        n, g, t = parts[0].values.shape[:3]
        widths = [p.values.expand(n, g, t, -1) for p in parts]
        if t > 1 and parts[0].values.stride(2) == 1:
            return DenseFeatures(torch.cat([w.transpose(2, 3) for w in widths], dim=2).transpose(2, 3))
        return DenseFeatures(torch.cat(widths, dim=3))


class IndexFeatures:
    """One-hot features given by indices ``(n, T)`` into a table of ``width`` rows, each
    optionally scaled by ``weights`` ``(n, T)`` (the per-sample weights or ``1 / bag size``
    of ``nn.EmbeddingBag``).

    Positions holding ``padding_idx`` have no gradient (``nn.Embedding``'s convention).
    """

    groups = 1

    def __init__(
        self,
        indices: torch.Tensor,
        width: int,
        padding_idx: Optional[int],
        dtype: torch.dtype,
        weights: Optional[torch.Tensor] = None,
    ):
        self.indices = indices
        self._width = width
        self.padding_idx = padding_idx
        self.dtype = dtype
        self.weights = weights

    @property
    def positions(self) -> int:
        return self.indices.shape[1]

    @property
    def width(self) -> int:
        return self._width

    def gram_flops(self) -> int:
        return 1

    def take(self, start: int, stop: int) -> "IndexFeatures":
        """The features of examples ``start:stop`` (a view)."""
        weights = None if self.weights is None else self.weights[start:stop]
        return IndexFeatures(self.indices[start:stop], self._width, self.padding_idx, self.dtype, weights)

    def _scale(self) -> Optional[torch.Tensor]:
        """Each position's factor ``(n, T)``: its weight, 0 at padding; None if all are 1."""
        scale = self.weights
        if self.padding_idx is not None:
            live = (self.indices != self.padding_idx).to(self.dtype)
            scale = live if scale is None else scale * live
        return scale

    def gram(self, other: "IndexFeatures") -> torch.Tensor:
        """``w_it w'_js [idx_it == idx'_js]`` (0 at padding) as ``(1, n1 T1, n2 T2)``."""
        same = (self.indices.reshape(-1, 1) == other.indices.reshape(1, -1)).to(self.dtype)
        left, right = self._scale(), other._scale()
        if left is not None:
            same = same * left.reshape(-1, 1)
        if right is not None:
            same = same * right.reshape(1, -1)
        return same.unsqueeze(0)

    def expand(self, cotangent: torch.Tensor, transposed: bool = False) -> torch.Tensor:
        """Per-example gradients of the table, ``(n, O, width d_out)``, by scatter-add."""
        if transposed:
            raise ValueError("index features have no transposed layout")
        n, o, _, t, d = cotangent.shape
        source = cotangent[:, :, 0]
        scale = self._scale()
        if scale is not None:
            source = source * scale[:, None, :, None].to(source.dtype)
        grads = source.new_zeros(n, o, self._width, d)
        grads.scatter_add_(2, self.indices[:, None, :, None].expand(n, o, t, d), source)
        return grads.reshape(n, o, -1)

    @staticmethod
    def along_positions(parts: List["IndexFeatures"]) -> "IndexFeatures":
        first = parts[0]
        indices = torch.cat([p.indices for p in parts], dim=1)
        weights = None
        if any(p.weights is not None for p in parts):
            weights = torch.cat([
                p.weights if p.weights is not None else p.indices.new_ones(p.indices.shape, dtype=p.dtype)
                for p in parts
            ], dim=1)
        return IndexFeatures(indices, first.width, first.padding_idx, first.dtype, weights)


Features = Union[DenseFeatures, IndexFeatures]


def can_join(parts: List[Features]) -> bool:
    """Whether features of several calls can be concatenated along positions."""
    first = parts[0]
    if isinstance(first, IndexFeatures):
        return all(
            isinstance(p, IndexFeatures) and p.width == first.width and p.padding_idx == first.padding_idx
            for p in parts
        )
    return all(
        isinstance(p, DenseFeatures) and p.groups == first.groups and p.width == first.width
        for p in parts
    )


# ---------------------------------------------------------------------------------------
# Terms
# ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class TermShape:
    """What a term costs per example: ``kind`` ``"kronecker"`` or ``"gradient"``; for a
    Kronecker term ``groups``, ``positions`` (T), ``width`` (d_in), ``d_out`` and
    ``gram_flops`` (per feature-Gram entry); ``num_params`` (p) for both."""

    kind: str
    num_params: int
    groups: int = 1
    positions: int = 1
    width: int = 1
    d_out: int = 1
    gram_flops: int = 0


@dataclass
class KroneckerTerm:
    """``J[i, a] = sum_t u[i, a, g, t] (x) v[i, g, t]``; ``cotangent`` ``(n, O, g, T, d_out)``.

    The parameter is laid out ``(g d_out, d_in)`` (``nn.Linear``'s weight), or
    ``(g, d_in, d_out)`` when ``transposed`` (a weight applied as ``x @ W``: Hugging Face's
    ``Conv1D``, ``torch.addmm``, a transposed convolution); the layout matters only where
    per-example gradients of several calls are summed.
    """

    features: Features
    cotangent: torch.Tensor
    _grads: Optional[torch.Tensor] = field(default=None, repr=False)
    transposed: bool = False

    @property
    def shape(self) -> TermShape:
        f = self.features
        d_out = self.cotangent.shape[-1]
        return TermShape(
            "kronecker", f.groups * d_out * f.width, f.groups, f.positions, f.width, d_out, f.gram_flops()
        )

    def grads(self) -> torch.Tensor:
        """Per-example gradients ``(n, O, p)``, computed once and kept."""
        if self._grads is None:
            self._grads = self.features.expand(self.cotangent, self.transposed)
        return self._grads


@dataclass
class GradientTerm:
    """Explicit per-example gradients ``grads`` of shape ``(n, O, p)``."""

    grads: torch.Tensor

    @property
    def shape(self) -> TermShape:
        return TermShape("gradient", self.grads.shape[2])


Term = Union[KroneckerTerm, GradientTerm]


def take_examples(term: Term, start: int, stop: int) -> Term:
    """The term of examples ``start:stop`` (views; cached gradients are sliced too)."""
    if isinstance(term, GradientTerm):
        return GradientTerm(term.grads[start:stop])
    grads = None if term._grads is None else term._grads[start:stop]
    return KroneckerTerm(term.features.take(start, stop), term.cotangent[start:stop], grads, term.transposed)


# ---------------------------------------------------------------------------------------
# Cost model (FLOPs and transient bytes of one block pair)
# ---------------------------------------------------------------------------------------

def strategy_flops(shape: TermShape, layout: Layout, o: int, n1: int, n2: int, same: bool) -> Dict[str, float]:
    """Estimated FLOPs of each applicable strategy for an ``n1 x n2`` block.

    ``same``: rows and columns are the same examples (per-example work done once).
    """
    pairs = layout.output_pairs(o)
    sides = n1 if same else n1 + n2
    contraction = 2.0 * n1 * n2 * pairs * shape.num_params
    if shape.kind == "gradient":
        return {"grads": contraction}
    t, g = shape.positions, shape.groups
    entries = float(n1 * t) * (n2 * t) * g
    gram = entries * (shape.gram_flops + 2 * pairs * shape.d_out + layout.entries_per_pair(o))
    grads = 2.0 * o * t * shape.num_params * sides + contraction
    return {"gram": gram, "grads": grads}


def strategy_bytes(
    shape: TermShape, strategy: str, layout: Layout, o: int, n1: int, n2: int, itemsize: int
) -> int:
    """Transient bytes of contracting one term with ``strategy`` (incl. cached gradients)."""
    if strategy == "grads":
        cached = 0 if shape.kind == "gradient" else (n1 + n2) * o * shape.num_params
        return cached * itemsize
    t, g = shape.positions, shape.groups
    entries = n1 * t * n2 * t * g
    cotangent_gram = entries * layout.entries_per_pair(o)
    products = 0 if t == 1 and g == 1 else 2 * cotangent_gram  # the product and its permuted copy
    return (entries + cotangent_gram + products) * itemsize


def choose_strategy(
    shape: TermShape, layout: Layout, o: int, n1: int, n2: int, same: bool
) -> Tuple[str, Dict[str, float]]:
    """The cheaper strategy by :func:`strategy_flops`, and every strategy's FLOPs."""
    flops = strategy_flops(shape, layout, o, n1, n2, same)
    return min(flops, key=flops.get), flops


# ---------------------------------------------------------------------------------------
# Contractions (into the layout's work layout, see :mod:`ntk_torch.layout`)
# ---------------------------------------------------------------------------------------

# Diagonal blocks of x2=None: the upper block triangle in example chunks, then a mirror.
SYMMETRIC_CHUNK_ROWS = 128  # at least this many matmul rows (examples x outputs) per chunk
MAX_SYMMETRIC_CHUNKS = 8


def symmetric_chunks(n: int, layout: Layout, o: int) -> List[Tuple[int, int]]:
    """Example ranges splitting a diagonal block: ``k`` chunks cost ``(k + 1) / 2k`` of
    the full block's products; chunks are kept large enough for efficient matmuls."""
    return layout.symmetric_chunks(n, o, SYMMETRIC_CHUNK_ROWS, MAX_SYMMETRIC_CHUNKS)


def _gram_full(acc: torch.Tensor, gv: torch.Tensor, u1: torch.Tensor, u2: torch.Tensor) -> None:
    n1, o, g, t1, d = u1.shape
    n2, t2 = u2.shape[0], u2.shape[3]
    if t1 == 1 and t2 == 1:
        # (g, n O, d) Gram -> (g, n1 O, n2 O), scaled by the feature Gram per (i, j)
        left = u1[:, :, :, 0].permute(2, 0, 1, 3).reshape(g, n1 * o, d)
        right = u2[:, :, :, 0].permute(2, 0, 1, 3).reshape(g, n2 * o, d)
        gu = torch.matmul(left, right.transpose(1, 2))
        for k in range(g):
            acc.addcmul_(gu[k].view(n1, o, n2, o), gv[k].view(n1, 1, n2, 1))
        return
    left = u1.permute(2, 0, 1, 3, 4).reshape(g, n1 * o * t1, d)
    right = u2.permute(2, 0, 1, 3, 4).reshape(g, n2 * o * t2, d)
    gu = torch.matmul(left, right.transpose(1, 2)).view(g, n1, o, t1, n2, o, t2)
    acc += torch.einsum("kiatjbs,kitjs->iajb", gu, gv.view(g, n1, t1, n2, t2))


def _gram_trace(acc: torch.Tensor, gv: torch.Tensor, u1: torch.Tensor, u2: torch.Tensor) -> None:
    n1, o, g, t1, d = u1.shape
    n2, t2 = u2.shape[0], u2.shape[3]
    left = u1.permute(2, 0, 3, 1, 4).reshape(g, n1 * t1, o * d)
    right = u2.permute(2, 0, 3, 1, 4).reshape(g, n2 * t2, o * d)
    gu = torch.matmul(left, right.transpose(1, 2))  # sum over outputs inside the matmul
    if t1 == 1 and t2 == 1 and g == 1:
        acc.addcmul_(gu[0], gv[0])
    else:
        acc += (gu * gv).view(g, n1, t1, n2, t2).sum(dim=(0, 2, 4))


def _gram_diagonal(acc: torch.Tensor, gv: torch.Tensor, u1: torch.Tensor, u2: torch.Tensor) -> None:
    n1, o, g, t1, d = u1.shape
    n2, t2 = u2.shape[0], u2.shape[3]
    left = u1.permute(1, 2, 0, 3, 4).reshape(o, g, n1 * t1, d)
    right = u2.permute(1, 2, 0, 3, 4).reshape(o, g, n2 * t2, d)
    gu = torch.matmul(left, right.transpose(2, 3))  # (O, g, n1 T1, n2 T2)
    if t1 == 1 and t2 == 1 and g == 1:
        acc.addcmul_(gu[:, 0], gv[0].unsqueeze(0))
    else:
        acc += (gu * gv.unsqueeze(0)).view(o, g, n1, t1, n2, t2).sum(dim=(1, 3, 5))


def add_gram_products(acc: torch.Tensor, rows: KroneckerTerm, cols: KroneckerTerm, layout: Layout) -> None:
    """``acc += sum_g sum_{t,s} <v_igt, v'_jgs> <u_iagt, u'_jbgs>`` in the work layout
    (traced or diagonal over outputs as the layout asks)."""
    gv = rows.features.gram(cols.features)  # (g, n1 T1, n2 T2)
    add = layout.choose(full=_gram_full, trace=_gram_trace, diagonal=_gram_diagonal)
    add(acc, gv, rows.cotangent, cols.cotangent)


def add_term(acc: torch.Tensor, rows: Term, cols: Term, layout: Layout, strategy: str) -> None:
    """Accumulate one term's contribution to a block with ``strategy``."""
    if strategy == "gram":
        add_gram_products(acc, rows, cols, layout)
        return
    g1 = rows.grads if isinstance(rows, GradientTerm) else rows.grads()
    g2 = cols.grads if isinstance(cols, GradientTerm) else cols.grads()
    layout.add_gradient_products(acc, g1, g2)
