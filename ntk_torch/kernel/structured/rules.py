"""The built-in rules: ``nn.Linear``, ``nn.Conv1d/2d/3d``, ``nn.Embedding`` and the affine
parameters of ``nn.LayerNorm``, ``nn.GroupNorm`` and eval-mode ``nn.BatchNorm*d``.

Each is registered with :func:`.registry.register_rule` exactly as a user's rule is (see
:mod:`ntk_torch.kernel.rules` for the contract a rule fulfils).
"""

from __future__ import annotations

import math
from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .registry import register_rule
from .terms import DenseFeatures, GradientTerm, IndexFeatures, KroneckerTerm, Term


def _bias_of(cotangent_term: torch.Tensor, features: DenseFeatures) -> KroneckerTerm:
    """A bias is the weight of the constant feature 1 at every position."""
    n, g, t, _ = features.values.shape
    ones = features.values.new_ones(()).expand(n, g, t, 1)
    return KroneckerTerm(DenseFeatures(ones), cotangent_term)


# ---------------------------------------------------------------------------------------
# nn.Linear: y = x W^T + b over any leading dimensions
# ---------------------------------------------------------------------------------------

@register_rule([nn.Linear])
def linear(module: nn.Linear, x: torch.Tensor, cotangent: torch.Tensor) -> Dict[str, Term]:
    """``J_W[i, a] = sum_t G[i, a, t] x[i, t]^T`` and ``J_b[i, a] = sum_t G[i, a, t]`` with
    ``t`` the leading positions of ``x`` (n, *lead, d_in) and ``G`` (n, O, *lead, d_out)."""
    n, o = cotangent.shape[:2]
    features = DenseFeatures(x.reshape(n, 1, -1, module.in_features))
    u = cotangent.reshape(n, o, 1, -1, module.out_features)
    return {"weight": KroneckerTerm(features, u), "bias": _bias_of(u, features)}


# ---------------------------------------------------------------------------------------
# nn.Conv1d / Conv2d / Conv3d: a Linear over patches (im2col)
# ---------------------------------------------------------------------------------------

def _conv_padding(module: nn.modules.conv._ConvNd) -> Tuple[int, ...]:
    """``F.pad`` amounts (last dimension first) equivalent to the module's padding."""
    pads = []
    for dim in reversed(range(len(module.kernel_size))):
        if module.padding == "valid":
            left = right = 0
        elif module.padding == "same":
            total = module.dilation[dim] * (module.kernel_size[dim] - 1)
            left, right = total // 2, total - total // 2
        else:
            left = right = module.padding[dim]
        pads += [left, right]
    return tuple(pads)


def conv_patches(module: nn.modules.conv._ConvNd, x: torch.Tensor) -> torch.Tensor:
    """im2col: ``(n, g, L, C_in/g * prod(kernel))`` with ``L`` output positions, each
    patch ordered like a weight slice ``(C_in/g, *kernel)``."""
    mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
    pads = _conv_padding(module)
    if any(pads):
        x = F.pad(x, pads, mode=mode)
    spatial = len(module.kernel_size)
    for dim, (k, s, d) in enumerate(zip(module.kernel_size, module.stride, module.dilation)):
        x = x.unfold(2 + dim, d * (k - 1) + 1, s)  # appends a window axis
        if d > 1:
            x = x[..., ::d]
    n, c = x.shape[:2]
    out = x.shape[2 : 2 + spatial]
    g = module.groups
    # (n, C, *out, *kernel) -> (n, g, *out, C/g, *kernel) -> (n, g, L, C/g prod k)
    x = x.reshape(n, g, c // g, *x.shape[2:])
    order = [0, 1] + [3 + i for i in range(spatial)] + [2] + [3 + spatial + i for i in range(spatial)]
    return x.permute(order).reshape(n, g, math.prod(out), -1)


@register_rule([nn.Conv1d, nn.Conv2d, nn.Conv3d])
def conv(module: nn.modules.conv._ConvNd, x: torch.Tensor, cotangent: torch.Tensor) -> Dict[str, Term]:
    """Convolution as a Linear layer over patches: ``J_W[i, a, g] = sum_l G[i, a, g, l]
    P[i, g, l]^T`` with patches ``P`` and ``G`` the cotangent at output position ``l``;
    stride, padding (any mode), dilation and groups are in the patches."""
    n, o = cotangent.shape[:2]
    g = module.groups
    features = DenseFeatures(conv_patches(module, x))
    u = cotangent.reshape(n, o, g, module.out_channels // g, -1).transpose(3, 4)
    return {"weight": KroneckerTerm(features, u), "bias": _bias_of(u, features)}


# ---------------------------------------------------------------------------------------
# nn.Embedding: a Linear on one-hot tokens
# ---------------------------------------------------------------------------------------

def _embedding_applies(module: nn.Embedding) -> Optional[str]:
    if module.max_norm is not None:
        return "max_norm renormalises the table in place during the forward"
    if module.scale_grad_by_freq:
        return "scale_grad_by_freq rescales gradients by batch frequencies"
    return None


@register_rule([nn.Embedding], roles=("weight",), applies=_embedding_applies)
def embedding(module: nn.Embedding, tokens: torch.Tensor, cotangent: torch.Tensor) -> Dict[str, Term]:
    """``J_E[i, a] = sum_t e_{tok[i, t]} G[i, a, t]^T``: the feature Gram is token
    equality, ``[tok_it == tok'_js]`` (0 at ``padding_idx``)."""
    n, o = cotangent.shape[:2]
    features = IndexFeatures(
        tokens.reshape(n, -1), module.num_embeddings, module.padding_idx, cotangent.dtype
    )
    u = cotangent.reshape(n, o, 1, -1, module.embedding_dim)
    return {"weight": KroneckerTerm(features, u)}


# ---------------------------------------------------------------------------------------
# Normalisation layers: element-wise affine y = x_hat * w + b
# ---------------------------------------------------------------------------------------

def _affine(x_hat: torch.Tensor, cotangent: torch.Tensor) -> Dict[str, Term]:
    """``J_w[i, a] = sum_l G[i, a, :, l] x_hat[i, :, l]`` and ``J_b[i, a] = sum_l G[i, a, :, l]``
    for ``x_hat`` (n, C, L) and ``G`` (n, O, C, L): explicit per-example gradients, since
    an element-wise product has no Kronecker structure to exploit (``n O C`` values)."""
    return {
        "weight": GradientTerm(torch.einsum("iacl,icl->iac", cotangent, x_hat)),
        "bias": GradientTerm(cotangent.sum(dim=-1)),
    }


def _record_layer_norm(module: nn.LayerNorm, args, output) -> torch.Tensor:
    return F.layer_norm(args[0], module.normalized_shape, None, None, module.eps)


@register_rule([nn.LayerNorm], record=_record_layer_norm)
def layer_norm(module: nn.LayerNorm, x_hat: torch.Tensor, cotangent: torch.Tensor) -> Dict[str, Term]:
    """LayerNorm over the last dims ``D``: channels ``D``, summed over leading positions."""
    n, o = cotangent.shape[:2]
    d = math.prod(module.normalized_shape)
    x_hat = x_hat.reshape(n, -1, d).transpose(1, 2)
    return _affine(x_hat, cotangent.reshape(n, o, -1, d).transpose(2, 3))


def _record_group_norm(module: nn.GroupNorm, args, output) -> torch.Tensor:
    return F.group_norm(args[0], module.num_groups, None, None, module.eps)


@register_rule([nn.GroupNorm], record=_record_group_norm)
def group_norm(module: nn.GroupNorm, x_hat: torch.Tensor, cotangent: torch.Tensor) -> Dict[str, Term]:
    """GroupNorm: per-channel affine over ``(n, C, *spatial)``."""
    n, o = cotangent.shape[:2]
    c = module.num_channels
    return _affine(x_hat.reshape(n, c, -1), cotangent.reshape(n, o, c, -1))


def _batch_norm_applies(module: nn.modules.batchnorm._BatchNorm) -> Optional[str]:
    if module.running_mean is None or module.running_var is None:
        return "it normalises with batch statistics (track_running_stats=False), coupling examples"
    return None


def _record_batch_norm(module, args, output) -> torch.Tensor:
    return F.batch_norm(
        args[0], module.running_mean, module.running_var, None, None, False, 0.0, module.eps
    )


@register_rule(
    [nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d],
    record=_record_batch_norm,
    applies=_batch_norm_applies,
)
def batch_norm(module, x_hat: torch.Tensor, cotangent: torch.Tensor) -> Dict[str, Term]:
    """BatchNorm in eval mode: ``x_hat = (x - running_mean) / sqrt(running_var + eps)``."""
    n, o = cotangent.shape[:2]
    c = module.num_features
    return _affine(x_hat.reshape(n, c, -1), cotangent.reshape(n, o, c, -1))
