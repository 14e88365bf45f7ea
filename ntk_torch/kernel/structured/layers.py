"""The Jacobian structure of each layer kind, shared by the module rules (:mod:`.rules`) and
the function rules (:mod:`.functions`).

Every builder takes what a rule recorded, batched on dim 0 over ``n`` examples, and the
cotangent ``(n, O, *output)`` of the call's output, and returns ``{role: term}``
(:mod:`.terms`). Shapes are per example unless they start with ``n``.
"""

from __future__ import annotations

import math
from typing import Dict, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from .terms import DenseFeatures, GradientTerm, IndexFeatures, KroneckerTerm, Term


def bias_term(cotangent_term: torch.Tensor, features: DenseFeatures, value: float = 1.0,
              transposed: bool = False) -> KroneckerTerm:
    """A bias is the weight of a constant feature (``value``, 1 for a plain bias) at every
    position."""
    n, g, t, _ = features.values.shape
    constant = features.values.new_full((), value).expand(n, g, t, 1)
    return KroneckerTerm(DenseFeatures(constant), cotangent_term, transposed=transposed)


def linear_terms(x: torch.Tensor, cotangent: torch.Tensor, d_in: int, d_out: int, *,
                 transposed: bool = False, scale: float = 1.0, bias_value: float = 1.0) -> Dict[str, Term]:
    """``y = scale * x W^T + bias_value * b`` over any leading positions (or ``x W`` with
    ``W`` of shape ``(d_in, d_out)`` when ``transposed``):

    ``J_W[i, a] = sum_t G[i, a, t] (x) scale x[i, t]`` and ``J_b[i, a] = sum_t bias_value G[i, a, t]``.
    """
    n, o = cotangent.shape[:2]
    values = x.reshape(n, 1, -1, d_in)
    features = DenseFeatures(values * scale if scale != 1.0 else values)
    u = cotangent.reshape(n, o, 1, -1, d_out)
    return {
        "weight": KroneckerTerm(features, u, transposed=transposed),
        "bias": bias_term(u, features, bias_value, transposed),
    }


# ---------------------------------------------------------------------------------------
# Convolutions: patches (im2col) of the input, or of the cotangent for a transposed one
# ---------------------------------------------------------------------------------------

def conv_pads(kernel: Sequence[int], dilation: Sequence[int], padding) -> Tuple[int, ...]:
    """``F.pad`` amounts (last dimension first) equivalent to a convolution's padding
    (ints per dimension, ``"valid"`` or ``"same"``)."""
    pads = []
    for dim in reversed(range(len(kernel))):
        if padding == "valid":
            left = right = 0
        elif padding == "same":
            total = dilation[dim] * (kernel[dim] - 1)
            left, right = total // 2, total - total // 2
        else:
            left = right = padding[dim]
        pads += [left, right]
    return tuple(pads)


def patches(x: torch.Tensor, kernel: Sequence[int], stride: Sequence[int], dilation: Sequence[int],
            pads: Sequence[int], groups: int, mode: str = "constant",
            windows: Optional[Sequence[int]] = None) -> torch.Tensor:
    """im2col of ``x`` ``(m, C, *spatial)``: ``(m, g, L, C/g * prod(kernel))`` with ``L``
    window positions (the first ``windows[d]`` along each dimension if given), each patch
    ordered like a weight slice ``(C/g, *kernel)``.

    Over two spatial dimensions the patches are ``F.unfold``'s ``(m, C prod(kernel), L)``,
    returned as a transposed view (positions the fastest-varying axis): im2col copies
    whole rows of positions, 2x faster than gathering windows of ``kernel[-1]`` values."""
    if any(pads):
        x = F.pad(x, tuple(pads), mode=mode)
    if len(kernel) == 2 and windows is None:
        columns = F.unfold(x, tuple(kernel), dilation=tuple(dilation), stride=tuple(stride))
        m, width, positions = columns.shape
        return columns.view(m, groups, width // groups, positions).transpose(2, 3)
    spatial = len(kernel)
    for dim, (k, s, d) in enumerate(zip(kernel, stride, dilation)):
        x = x.unfold(2 + dim, d * (k - 1) + 1, s)  # appends a window axis
        if windows is not None:
            x = x.narrow(2 + dim, 0, windows[dim])
        if d > 1:
            x = x[..., ::d]
    m, c = x.shape[:2]
    out = x.shape[2 : 2 + spatial]
    # (m, C, *out, *kernel) -> (m, g, *out, C/g, *kernel) -> (m, g, L, C/g prod k)
    x = x.reshape(m, groups, c // groups, *x.shape[2:])
    order = [0, 1] + [3 + i for i in range(spatial)] + [2] + [3 + spatial + i for i in range(spatial)]
    return x.permute(order).reshape(m, groups, math.prod(out), -1)


def conv_terms(x_patches: torch.Tensor, cotangent: torch.Tensor, out_channels: int, groups: int) -> Dict[str, Term]:
    """Convolution as a Linear layer over patches: ``J_W[i, a, g] = sum_l G[i, a, g, l]
    P[i, g, l]^T`` with patches ``P`` and ``G`` the cotangent at output position ``l``."""
    n, o = cotangent.shape[:2]
    features = DenseFeatures(x_patches)
    u = cotangent.reshape(n, o, groups, out_channels // groups, -1).transpose(3, 4)
    return {"weight": KroneckerTerm(features, u), "bias": bias_term(u, features)}


def conv_transpose_terms(x: torch.Tensor, cotangent: torch.Tensor, weight_shape: Sequence[int],
                         stride: Sequence[int], padding: Sequence[int], dilation: Sequence[int],
                         groups: int) -> Dict[str, Term]:
    """A transposed convolution, ``y[o, p s - pad + k d] += x[c, p] W[c, o, k]``: its weight
    gradient is a Kronecker term over the *input* positions ``p``, with the input as
    features and patches of the cotangent (kernel ``k``, the same stride, dilation and
    padding) on the other side: ``J_W[i, a, g] = sum_p x[i, g, :, p] (x) U[i, a, g, p]``,
    laid out like ``W`` ``(C_in, C_out/g, *k)``. ``output_padding`` only lengthens the
    output, so only the first ``L_in`` windows of the cotangent are used. The bias is the
    cotangent summed over output positions."""
    n, o = cotangent.shape[:2]
    c_in, c_out = x.shape[1], cotangent.shape[2]
    kernel, spatial_in = tuple(weight_shape[2:]), tuple(x.shape[2:])
    features = x.reshape(n, groups, c_in // groups, -1).transpose(2, 3)
    pads = [amount for dim in reversed(range(len(kernel))) for amount in (padding[dim], padding[dim])]
    u = cotangent.reshape(n * o, c_out, *cotangent.shape[3:])
    u = patches(u, kernel, stride, dilation, pads, groups, windows=spatial_in)
    u = u.reshape(n, o, groups, features.shape[2], -1)
    return {
        "weight": KroneckerTerm(DenseFeatures(features), u, transposed=True),
        "bias": GradientTerm(cotangent.reshape(n, o, c_out, -1).sum(dim=-1)),
    }


# ---------------------------------------------------------------------------------------
# Normalisation layers: element-wise affine y = x_hat * w + b
# ---------------------------------------------------------------------------------------

def affine_terms(x_hat: torch.Tensor, cotangent: torch.Tensor) -> Dict[str, Term]:
    """``J_w[i, a] = sum_l G[i, a, :, l] x_hat[i, :, l]`` and ``J_b[i, a] = sum_l G[i, a, :, l]``
    for ``x_hat`` (n, C, L) and ``G`` (n, O, C, L): explicit per-example gradients, since
    an element-wise product has no Kronecker structure to exploit (``n O C`` values)."""
    return {
        "weight": GradientTerm(torch.einsum("iacl,icl->iac", cotangent, x_hat)),
        "bias": GradientTerm(cotangent.sum(dim=-1)),
    }


def last_dims_affine_terms(x_hat: torch.Tensor, cotangent: torch.Tensor, d: int) -> Dict[str, Term]:
    """A norm over the last dimensions (``d`` values: LayerNorm, RMSNorm), every leading
    dimension a position."""
    n, o = cotangent.shape[:2]
    return affine_terms(x_hat.reshape(n, -1, d).transpose(1, 2), cotangent.reshape(n, o, -1, d).transpose(2, 3))


def channel_affine_terms(x_hat: torch.Tensor, cotangent: torch.Tensor, channels: int) -> Dict[str, Term]:
    """A per-channel affine over ``(n, C, *spatial)`` (GroupNorm, BatchNorm)."""
    n, o = cotangent.shape[:2]
    return affine_terms(x_hat.reshape(n, channels, -1), cotangent.reshape(n, o, channels, -1))


def broadcast_gradient(values: torch.Tensor, param_shape: Sequence[int]) -> GradientTerm:
    """The per-example gradient of a parameter broadcast to an output: ``values``
    ``(n, O, *out)`` summed over the dimensions the parameter was broadcast along."""
    n, o = values.shape[:2]
    target = (1,) * (values.dim() - 2 - len(param_shape)) + tuple(param_shape)
    return GradientTerm(values.sum_to_size(n, o, *target).reshape(n, o, -1))


# ---------------------------------------------------------------------------------------
# Embeddings: a Linear on one-hot tokens
# ---------------------------------------------------------------------------------------

def embedding_terms(tokens: torch.Tensor, cotangent: torch.Tensor, num_embeddings: int, dim: int,
                    padding_idx: Optional[int]) -> Dict[str, Term]:
    """``J_E[i, a] = sum_t e_{tok[i, t]} G[i, a, t]^T``: the feature Gram is token
    equality, ``[tok_it == tok'_js]`` (0 at ``padding_idx``, whose row gets no gradient)."""
    n, o = cotangent.shape[:2]
    features = IndexFeatures(tokens.reshape(n, -1), num_embeddings, padding_idx, cotangent.dtype)
    return {"weight": KroneckerTerm(features, cotangent.reshape(n, o, 1, -1, dim))}


def bag_membership(indices: torch.Tensor, offsets: Optional[torch.Tensor], include_last_offset: bool,
                   padding_idx: Optional[int]) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(flat indices (L,), member (B, L))`` of one call of ``F.embedding_bag``:
    ``member[b, l]`` is whether position ``l`` counts in bag ``b`` (padding never counts).
    A 2-D input is one bag per row; a 1-D input is cut into bags at ``offsets``."""
    if indices.dim() == 2:
        bags, length = indices.shape
        offsets = torch.arange(0, bags * length, length, device=indices.device)
        include_last_offset = False
    flat = indices.reshape(-1)
    positions = torch.arange(flat.shape[0], device=flat.device)
    if include_last_offset:
        starts, ends = offsets[:-1], offsets[1:]
    else:
        ends = torch.cat([offsets[1:], offsets.new_full((1,), flat.shape[0])])
        starts = offsets
    member = (starts[:, None] <= positions[None, :]) & (positions[None, :] < ends[:, None])
    if padding_idx is not None:
        member = member & (flat != padding_idx)[None, :]
    return flat, member


def bag_weights(member: torch.Tensor, mode: str, per_sample_weights: Optional[torch.Tensor],
                dtype: torch.dtype) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(bag of each position (L,), weight of each position (L,))`` for modes ``sum``
    (the per-sample weight, or 1) and ``mean`` (1 / the bag's size); 0 outside every bag."""
    live = member.to(dtype)
    bag_ids = torch.arange(member.shape[0], device=member.device)
    bag = (live * bag_ids[:, None].to(dtype)).sum(dim=0).to(torch.long)
    if mode == "mean":
        share = 1.0 / live.sum(dim=1).clamp_min(1.0)
        weight = (live * share[:, None]).sum(dim=0)
    else:
        weight = live.sum(dim=0)
        if per_sample_weights is not None:
            weight = weight * per_sample_weights.reshape(-1).to(dtype)
    return bag, weight


def bag_max_rows(weight: torch.Tensor, flat: torch.Tensor, member: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Mode ``max``: ``(row (B, d), nonempty (B,))``, the table row each bag's maximum of
    each feature comes from (the first position reaching it, as torch's CPU kernel)."""
    rows = F.embedding(flat, weight)  # (L, d)
    masked = torch.where(member[:, :, None], rows[None], rows.new_full((), -math.inf))
    position = masked.argmax(dim=1)  # (B, d)
    return flat[position], member.any(dim=1)


def bag_terms(flat: torch.Tensor, bag: torch.Tensor, weight: torch.Tensor, cotangent: torch.Tensor,
              num_embeddings: int, dim: int) -> Dict[str, Term]:
    """Modes ``sum``/``mean``: ``J_E[i, a] = sum_l w_il e_{idx[i, l]} G[i, a, bag(l)]^T``,
    a Kronecker term over positions with weighted one-hot features."""
    n, o = cotangent.shape[:2]
    u = cotangent.reshape(n, o, -1, dim)
    bag = bag.reshape(n, 1, -1, 1)
    gathered = u.gather(2, bag.expand(n, o, bag.shape[2], dim))
    features = IndexFeatures(flat.reshape(n, -1), num_embeddings, None, cotangent.dtype, weight.reshape(n, -1))
    return {"weight": KroneckerTerm(features, gathered.unsqueeze(2))}


def bag_max_terms(row: torch.Tensor, nonempty: torch.Tensor, cotangent: torch.Tensor,
                  num_embeddings: int, dim: int) -> Dict[str, Term]:
    """Mode ``max``: each bag's cotangent goes, feature by feature, to the row its maximum
    came from; explicit per-example gradients ``(n, O, V d)``."""
    n, o = cotangent.shape[:2]
    u = cotangent.reshape(n, o, -1, dim) * nonempty.reshape(n, 1, -1, 1).to(cotangent.dtype)
    index = row.reshape(n, 1, -1, dim).expand(n, o, u.shape[2], dim)
    grads = u.new_zeros(n, o, num_embeddings, dim).scatter_add_(2, index, u)
    return {"weight": GradientTerm(grads.reshape(n, o, -1))}
