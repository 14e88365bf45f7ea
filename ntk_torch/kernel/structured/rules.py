"""The built-in module rules: ``nn.Linear``, ``nn.Conv1d/2d/3d``, ``nn.ConvTranspose1d/2d/3d``,
``nn.Embedding``, Hugging Face's ``Conv1D`` (registered by import path: transformers is
never imported for it) and the affine parameters of ``nn.LayerNorm``, ``nn.RMSNorm``,
``nn.GroupNorm`` and eval-mode ``nn.BatchNorm*d``.

Each is registered with :func:`.registry.register_rule` exactly as a user's rule is (see
:mod:`ntk_torch.kernel.rules` for the contract a rule fulfils). What these modules do
through torch functions is covered again, wherever else it happens, by the function
rules of :mod:`.functions`.
"""

from __future__ import annotations

import math
from typing import Dict, Optional

import torch
import torch.nn.functional as F
from torch import nn

from . import layers
from .registry import register_rule
from .terms import Term


@register_rule([nn.Linear], batched=False)
def linear(module: nn.Linear, x: torch.Tensor, cotangent: torch.Tensor) -> Dict[str, Term]:
    """``y = x W^T + b`` over any leading dimensions (:func:`.layers.linear_terms`)."""
    return layers.linear_terms(x, cotangent, module.in_features, module.out_features)


@register_rule(["transformers.pytorch_utils.Conv1D"], batched=False)
def hf_conv1d(module: nn.Module, x: torch.Tensor, cotangent: torch.Tensor) -> Dict[str, Term]:
    """Hugging Face's ``Conv1D`` (GPT-2, GPT): ``y = x W + b`` with ``W`` of shape
    ``(nx, nf)``, a Linear layer with its weight transposed."""
    return layers.linear_terms(x, cotangent, module.nx, module.nf, transposed=True)


# ---------------------------------------------------------------------------------------
# Convolutions
# ---------------------------------------------------------------------------------------

def conv_patches(module: nn.modules.conv._ConvNd, x: torch.Tensor) -> torch.Tensor:
    """im2col of a convolution module's input: ``(n, g, L, C_in/g * prod(kernel))``."""
    mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
    pads = layers.conv_pads(module.kernel_size, module.dilation, module.padding)
    return layers.patches(x, module.kernel_size, module.stride, module.dilation, pads, module.groups, mode)


@register_rule([nn.Conv1d, nn.Conv2d, nn.Conv3d])
def conv(module: nn.modules.conv._ConvNd, x: torch.Tensor, cotangent: torch.Tensor) -> Dict[str, Term]:
    """Convolution as a Linear layer over patches; stride, padding (any mode), dilation
    and groups are in the patches (:func:`.layers.conv_terms`)."""
    return layers.conv_terms(conv_patches(module, x), cotangent, module.out_channels, module.groups)


def _conv_transpose_applies(module: nn.modules.conv._ConvTransposeNd) -> Optional[str]:
    if module.padding_mode != "zeros":
        return f"padding_mode {module.padding_mode!r} is not supported by transposed convolutions"
    return None


@register_rule([nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d], applies=_conv_transpose_applies)
def conv_transpose(module: nn.modules.conv._ConvTransposeNd, x: torch.Tensor, cotangent: torch.Tensor) -> Dict[str, Term]:
    """A transposed convolution (any stride, padding, output_padding or ``output_size``,
    dilation and groups): :func:`.layers.conv_transpose_terms`."""
    return layers.conv_transpose_terms(
        x, cotangent, module.weight.shape, module.stride, module.padding, module.dilation, module.groups
    )


# ---------------------------------------------------------------------------------------
# nn.Embedding: a Linear on one-hot tokens
# ---------------------------------------------------------------------------------------

def _embedding_applies(module: nn.Embedding) -> Optional[str]:
    if module.max_norm is not None:
        return "max_norm renormalises the table in place during the forward"
    if module.scale_grad_by_freq:
        return "scale_grad_by_freq rescales gradients by batch frequencies"
    return None


@register_rule([nn.Embedding], roles=("weight",), applies=_embedding_applies, batched=False)
def embedding(module: nn.Embedding, tokens: torch.Tensor, cotangent: torch.Tensor) -> Dict[str, Term]:
    """A Linear on one-hot tokens (:func:`.layers.embedding_terms`), ``padding_idx`` and
    ``sparse=True`` included (the rule never forms the table's gradient through autograd)."""
    return layers.embedding_terms(tokens, cotangent, module.num_embeddings, module.embedding_dim, module.padding_idx)


# ---------------------------------------------------------------------------------------
# Normalisation layers: element-wise affine y = x_hat * w + b
# ---------------------------------------------------------------------------------------

def _record_layer_norm(module: nn.LayerNorm, args, output) -> torch.Tensor:
    return F.layer_norm(args[0], module.normalized_shape, None, None, module.eps)


@register_rule([nn.LayerNorm], record=_record_layer_norm, batched=False)
def layer_norm(module: nn.LayerNorm, x_hat: torch.Tensor, cotangent: torch.Tensor) -> Dict[str, Term]:
    """LayerNorm over the last dims ``D`` (with or without a bias): channels ``D``, summed
    over leading positions."""
    return layers.last_dims_affine_terms(x_hat, cotangent, math.prod(module.normalized_shape))


def _record_rms_norm(module: nn.Module, args, output) -> torch.Tensor:
    return F.rms_norm(args[0], module.normalized_shape, None, module.eps)


if hasattr(nn, "RMSNorm"):  # torch >= 2.4

    @register_rule([nn.RMSNorm], roles=("weight",), record=_record_rms_norm, batched=False)
    def rms_norm(module: nn.Module, x_hat: torch.Tensor, cotangent: torch.Tensor) -> Dict[str, Term]:
        """RMSNorm, ``y = x / rms(x) * w`` over the last dims: like LayerNorm's weight."""
        return layers.last_dims_affine_terms(x_hat, cotangent, math.prod(module.normalized_shape))


def _record_group_norm(module: nn.GroupNorm, args, output) -> torch.Tensor:
    return F.group_norm(args[0], module.num_groups, None, None, module.eps)


@register_rule([nn.GroupNorm], record=_record_group_norm)
def group_norm(module: nn.GroupNorm, x_hat: torch.Tensor, cotangent: torch.Tensor) -> Dict[str, Term]:
    """GroupNorm: per-channel affine over ``(n, C, *spatial)``."""
    return layers.channel_affine_terms(x_hat, cotangent, module.num_channels)


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
    return layers.channel_affine_terms(x_hat, cotangent, module.num_features)
