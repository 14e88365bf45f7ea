"""The built-in function rules: a parameter passed to one of these torch functions is
covered at that call, wherever it happens (see :mod:`.calls`).

* ``F.linear`` (``nn.MultiheadAttention``'s packed ``in_proj_weight`` -- one Kronecker
  term over its ``3 d`` rows -- and ``out_proj``, Swin's qkv, weights reused directly);
* ``torch.addmm`` (``y = beta b + alpha x W``, Hugging Face's ``Conv1D``) and ``x @ W``
  (``torch.matmul`` / ``Tensor.matmul``) with ``W`` of shape ``(d_in, d_out)``;
* ``F.layer_norm``, ``F.rms_norm``, ``F.group_norm`` (timm's ``LayerNorm2d`` and
  ``GroupNormAct``), ``F.embedding``, ``F.embedding_bag`` (modes sum and mean with
  per-sample weights, max through its argmax rows; offsets or 2-D input; this is how
  ``nn.EmbeddingBag`` is covered), ``F.conv_transpose1d/2d/3d``;
* element-wise ``add``, ``sub`` and ``mul`` with a parameter operand (position embeddings
  added to every example, T5's and Llama's RMS norms ``w * x_hat``, layer scales): the
  parameter's gradient is the cotangent (times the other operand) summed over the
  dimensions it is broadcast along. In-place variants (``add_``, ``+=``) are not covered:
  their result replaces a tensor the probe could not follow.
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Dict, Mapping, Optional

import torch
import torch.nn.functional as F

from . import layers
from .registry import CallSpec, register_function_rule
from .terms import Term


def _number(value: Any, default: float = 1.0) -> float:
    return default if value is None else float(value)


def _ntuple(value: Any, count: int):
    return tuple(value) if isinstance(value, (tuple, list)) else (value,) * count


# ---------------------------------------------------------------------------------------
# Dense weights: F.linear, torch.addmm, x @ W
# ---------------------------------------------------------------------------------------

def _linear_applies(call: Mapping[str, Any]) -> Optional[str]:
    weight, bias = call.get("weight"), call.get("bias")
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        return "its weight is not a matrix"
    if isinstance(bias, torch.Tensor) and bias.dim() != 1:
        return "its bias is not a vector"
    return None


@register_function_rule(
    [F.linear], arguments=("input", "weight", "bias"), roles=("weight", "bias"),
    applies=_linear_applies, batched=False, name="F.linear",
)
def linear(spec: CallSpec, x: torch.Tensor, cotangent: torch.Tensor) -> Dict[str, Term]:
    """``y = x W^T + b`` over any leading dimensions."""
    d_out, d_in = spec.shape("weight")
    return layers.linear_terms(x, cotangent, d_in, d_out)


def _record_mat1(call: Mapping[str, Any]) -> torch.Tensor:
    return call["mat1"]


def _addmm_applies(call: Mapping[str, Any]) -> Optional[str]:
    if not isinstance(call.get("mat2"), torch.Tensor) or call["mat2"].dim() != 2:
        return "its mat2 is not a matrix"
    if any(isinstance(call.get(k), torch.Tensor) for k in ("alpha", "beta")):
        return "alpha or beta is a tensor"
    return None


@register_function_rule(
    [torch.addmm, torch.Tensor.addmm], arguments=("input", "mat1", "mat2"), roles=("input", "mat2"),
    record=_record_mat1, applies=_addmm_applies, batched=False, name="torch.addmm",
)
def addmm(spec: CallSpec, x: torch.Tensor, cotangent: torch.Tensor) -> Dict[str, Term]:
    """``y = beta b + alpha x W`` with ``W`` ``(d_in, d_out)`` and rows as positions; a
    ``b`` that is not a vector gets its broadcast gradient."""
    d_in, d_out = spec.shape("mat2")
    beta, alpha = _number(spec.get("beta")), _number(spec.get("alpha"))
    terms = layers.linear_terms(x, cotangent, d_in, d_out, transposed=True, scale=alpha, bias_value=beta)
    bias_shape = spec.shape("input")
    if bias_shape is not None and len(bias_shape) != 1:
        terms["bias"] = layers.broadcast_gradient(beta * cotangent, bias_shape)
    return {"mat2": terms["weight"], "input": terms["bias"]}


def _matmul_applies(call: Mapping[str, Any]) -> Optional[str]:
    other, x = call.get("other"), call.get("input")
    if not isinstance(other, torch.Tensor) or other.dim() not in (1, 2):
        return "its right operand is not a matrix or a vector"
    if not isinstance(x, torch.Tensor) or x.dim() < 1:
        return "its left operand is not a tensor"
    return None


@register_function_rule(
    [torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__], arguments=("input", "other"),
    roles=("other",), applies=_matmul_applies, batched=False, name="matmul",
)
def matmul(spec: CallSpec, x: torch.Tensor, cotangent: torch.Tensor) -> Dict[str, Term]:
    """``y = x @ W`` with ``W`` ``(d_in, d_out)`` (or a vector, ``d_out = 1``), every
    leading dimension of ``x`` a position."""
    shape = spec.shape("other")
    d_in, d_out = shape[0], (shape[1] if len(shape) == 2 else 1)
    return {"other": layers.linear_terms(x, cotangent, d_in, d_out, transposed=True)["weight"]}


# ---------------------------------------------------------------------------------------
# Normalisation layers
# ---------------------------------------------------------------------------------------

def _record_layer_norm(call: Mapping[str, Any]) -> torch.Tensor:
    return F.layer_norm(call["input"], call["normalized_shape"], None, None, _number(call.get("eps"), 1e-5))


@register_function_rule(
    [F.layer_norm], arguments=("input", "normalized_shape", "weight", "bias", "eps"),
    roles=("weight", "bias"), record=_record_layer_norm, batched=False, name="F.layer_norm",
)
def layer_norm(spec: CallSpec, x_hat: torch.Tensor, cotangent: torch.Tensor) -> Dict[str, Term]:
    """The affine parameters of a LayerNorm over the last dims (every other dim a position)."""
    return layers.last_dims_affine_terms(x_hat, cotangent, math.prod(_ntuple(spec.get("normalized_shape"), 1)))


def _record_rms_norm(call: Mapping[str, Any]) -> torch.Tensor:
    return F.rms_norm(call["input"], call["normalized_shape"], None, call.get("eps"))


if hasattr(F, "rms_norm"):  # torch >= 2.4

    @register_function_rule(
        [F.rms_norm], arguments=("input", "normalized_shape", "weight", "eps"), roles=("weight",),
        record=_record_rms_norm, batched=False, name="F.rms_norm",
    )
    def rms_norm(spec: CallSpec, x_hat: torch.Tensor, cotangent: torch.Tensor) -> Dict[str, Term]:
        """RMSNorm's weight, like LayerNorm's."""
        return layers.last_dims_affine_terms(x_hat, cotangent, math.prod(_ntuple(spec.get("normalized_shape"), 1)))


def _record_group_norm(call: Mapping[str, Any]) -> torch.Tensor:
    return F.group_norm(call["input"], call["num_groups"], None, None, _number(call.get("eps"), 1e-5))


@register_function_rule(
    [F.group_norm], arguments=("input", "num_groups", "weight", "bias", "eps"),
    roles=("weight", "bias"), record=_record_group_norm, name="F.group_norm",
)
def group_norm(spec: CallSpec, x_hat: torch.Tensor, cotangent: torch.Tensor) -> Dict[str, Term]:
    """GroupNorm's per-channel affine over ``(n, C, *spatial)``."""
    return layers.channel_affine_terms(x_hat, cotangent, spec.shape("input")[1])


# ---------------------------------------------------------------------------------------
# Embeddings
# ---------------------------------------------------------------------------------------

def _padding_idx(spec: CallSpec, rows: int) -> Optional[int]:
    padding_idx = spec.get("padding_idx")
    return None if padding_idx is None else (padding_idx + rows if padding_idx < 0 else padding_idx)


def _embedding_applies(call: Mapping[str, Any]) -> Optional[str]:
    if call.get("max_norm") is not None:
        return "max_norm renormalises the table in place during the forward"
    if call.get("scale_grad_by_freq"):
        return "scale_grad_by_freq rescales gradients by batch frequencies"
    return None


@register_function_rule(
    [F.embedding],
    arguments=("input", "weight", "padding_idx", "max_norm", "norm_type", "scale_grad_by_freq", "sparse"),
    roles=("weight",), applies=_embedding_applies, batched=False, name="F.embedding",
)
def embedding(spec: CallSpec, tokens: torch.Tensor, cotangent: torch.Tensor) -> Dict[str, Term]:
    """A Linear on one-hot tokens; ``padding_idx`` rows get no gradient."""
    rows, dim = spec.shape("weight")
    return layers.embedding_terms(tokens, cotangent, rows, dim, _padding_idx(spec, rows))


BAG_ARGUMENTS = (
    "input", "weight", "offsets", "max_norm", "norm_type", "scale_grad_by_freq", "mode", "sparse",
    "per_sample_weights", "include_last_offset", "padding_idx",
)


def _bag_applies(call: Mapping[str, Any]) -> Optional[str]:
    reason = _embedding_applies(call)
    if reason is None and call.get("mode", "mean") not in ("sum", "mean", "max"):
        reason = f"mode {call.get('mode')!r} is not sum, mean or max"
    if reason is None and call["input"].dim() == 1 and not isinstance(call.get("offsets"), torch.Tensor):
        reason = "a 1-D input has no offsets"
    return reason


def _record_bag(call: Mapping[str, Any]):
    weight = call["weight"]
    padding_idx = call.get("padding_idx")
    if padding_idx is not None and padding_idx < 0:
        padding_idx += weight.shape[0]
    flat, member = layers.bag_membership(
        call["input"], call.get("offsets"), bool(call.get("include_last_offset", False)), padding_idx
    )
    mode = call.get("mode", "mean")
    if mode == "max":
        return layers.bag_max_rows(weight, flat, member)
    bag, weights = layers.bag_weights(member, mode, call.get("per_sample_weights"), weight.dtype)
    return flat, bag, weights


@register_function_rule(
    [F.embedding_bag], arguments=BAG_ARGUMENTS, roles=("weight",), record=_record_bag,
    applies=_bag_applies, batched=False, name="F.embedding_bag",
)
def embedding_bag(spec: CallSpec, recorded, cotangent: torch.Tensor) -> Dict[str, Term]:
    """Bags of embeddings: sum (with per-sample weights) and mean as a Kronecker term over
    positions with weighted one-hot features, max as explicit gradients (its argmax rows)."""
    rows, dim = spec.shape("weight")
    if spec.get("mode", "mean") == "max":
        return layers.bag_max_terms(*recorded, cotangent, rows, dim)
    return layers.bag_terms(*recorded, cotangent, rows, dim)


# ---------------------------------------------------------------------------------------
# Transposed convolutions
# ---------------------------------------------------------------------------------------

def _conv_transpose_applies(call: Mapping[str, Any]) -> Optional[str]:
    x, weight = call.get("input"), call.get("weight")
    if not isinstance(x, torch.Tensor) or not isinstance(weight, torch.Tensor) or x.dim() != weight.dim():
        return "its input is not batched (N, C, *spatial)"
    return None


@register_function_rule(
    [F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d],
    arguments=("input", "weight", "bias", "stride", "padding", "output_padding", "groups", "dilation"),
    roles=("weight", "bias"), applies=_conv_transpose_applies, name="F.conv_transpose",
)
def conv_transpose(spec: CallSpec, x: torch.Tensor, cotangent: torch.Tensor) -> Dict[str, Term]:
    """A transposed convolution (:func:`.layers.conv_transpose_terms`)."""
    weight_shape = spec.shape("weight")
    spatial = len(weight_shape) - 2
    n = x.shape[0]
    x = x.reshape(n, *spec.shape("input")[1:])
    cotangent = cotangent.reshape(n, cotangent.shape[1], *spec.output_shape[1:])
    return layers.conv_transpose_terms(
        x, cotangent, weight_shape, _ntuple(spec.get("stride", 1), spatial),
        _ntuple(spec.get("padding", 0), spatial), _ntuple(spec.get("dilation", 1), spatial),
        int(spec.get("groups", 1)),
    )


# ---------------------------------------------------------------------------------------
# Element-wise add, sub and mul with a parameter operand
# ---------------------------------------------------------------------------------------

def _elementwise_applies(call: Mapping[str, Any]) -> Optional[str]:
    for name in ("input", "other"):
        value = call.get(name)
        if not isinstance(value, (torch.Tensor, numbers.Real)):
            return f"its {name} is neither a tensor nor a real number"
    if isinstance(call.get("alpha"), torch.Tensor):
        return "alpha is a tensor"
    return None


def _no_record(call: Mapping[str, Any]):
    return ()


def _record_operands(call: Mapping[str, Any]):
    def tensor(value: Any) -> torch.Tensor:
        return value if isinstance(value, torch.Tensor) else torch.tensor(float(value), dtype=torch.float64)

    return tensor(call["input"]), tensor(call["other"])


def _signed(spec: CallSpec, cotangent: torch.Tensor, input_sign: float, other_sign: float) -> Dict[str, Term]:
    n, o = cotangent.shape[:2]
    u = cotangent.reshape(n, o, *spec.output_shape)
    signs = {"input": input_sign, "other": other_sign}
    return {role: layers.broadcast_gradient(signs[role] * u, spec.shape(role)) for role in spec.params}


ELEMENTWISE = dict(arguments=("input", "other"), roles=("input", "other"), applies=_elementwise_applies, batched=False)


@register_function_rule(
    [torch.add, torch.Tensor.add, torch.Tensor.__add__, torch.Tensor.__radd__], record=_no_record,
    name="add", **ELEMENTWISE,
)
def add(spec: CallSpec, recorded, cotangent: torch.Tensor) -> Dict[str, Term]:
    """``y = input + alpha other``: ``J_input = G``, ``J_other = alpha G``, each summed over
    its broadcast dimensions."""
    return _signed(spec, cotangent, 1.0, _number(spec.get("alpha")))


@register_function_rule([torch.sub, torch.Tensor.sub, torch.Tensor.__sub__], record=_no_record, name="sub", **ELEMENTWISE)
def sub(spec: CallSpec, recorded, cotangent: torch.Tensor) -> Dict[str, Term]:
    """``y = input - alpha other``."""
    return _signed(spec, cotangent, 1.0, -_number(spec.get("alpha")))


@register_function_rule([torch.rsub], record=_no_record, name="rsub", **ELEMENTWISE)
def rsub(spec: CallSpec, recorded, cotangent: torch.Tensor) -> Dict[str, Term]:
    """``y = other - alpha input`` (``1 - p``)."""
    return _signed(spec, cotangent, -_number(spec.get("alpha")), 1.0)


@register_function_rule(
    [torch.mul, torch.Tensor.mul, torch.Tensor.__mul__, torch.Tensor.__rmul__], record=_record_operands,
    name="mul", **ELEMENTWISE,
)
def mul(spec: CallSpec, recorded, cotangent: torch.Tensor) -> Dict[str, Term]:
    """``y = input * other``: ``J_input = G * other`` and ``J_other = G * input``, each
    summed over its broadcast dimensions."""
    n, o = cotangent.shape[:2]
    u = cotangent.reshape(n, o, *spec.output_shape)
    operands = dict(zip(("input", "other"), recorded))
    terms = {}
    for role in spec.params:
        partner = "other" if role == "input" else "input"
        shape = spec.shape(partner) or ()  # () for a real number: (n,) after the capture
        padded = (1,) * (len(spec.output_shape) - len(shape)) + tuple(shape)
        value = operands[partner].to(u.dtype).reshape(n, 1, *padded)
        terms[role] = layers.broadcast_gradient(u * value, spec.shape(role))
    return terms
