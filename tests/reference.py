"""The naive reference eNTK: a loop over examples and outputs with ``torch.autograd.grad``.

Deliberately simple and slow: a float64 copy of the model in eval mode, one forward pass
per example, one backward pass per output value, gradients concatenated over the
trainable parameters (``model.parameters()`` yields each tied tensor once). No function
transform, so it runs any model autograd can differentiate (RNNs, masks with
data-dependent control flow, checkpointing); inputs are nested tuples, lists and dicts.
"""

from __future__ import annotations

import copy
from typing import Any, Callable, Optional, Sequence

import torch
from torch import nn


def _map(x: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    """``fn`` on every Tensor of nested tuples, lists and dicts."""
    if isinstance(x, torch.Tensor):
        return fn(x)
    if isinstance(x, dict):
        return {k: _map(v, fn) for k, v in x.items()}
    return type(x)(_map(v, fn) for v in x)


def _example(x: Any, i: int) -> Any:
    return _map(x, lambda t: t[i : i + 1])


def _double(x: Any) -> Any:
    return _map(x, lambda t: t.double() if t.is_floating_point() else t)


def _call(model: nn.Module, x: Any, call_kwargs: Optional[dict]) -> Any:
    kwargs = dict(call_kwargs or {})
    if isinstance(x, torch.Tensor):
        return model(x, **kwargs)
    if isinstance(x, dict):
        return model(**x, **kwargs)
    return model(*x, **kwargs)


def _batch(x: Any) -> int:
    sizes = []
    _map(x, lambda t: sizes.append(t.shape[0]) or t)
    return sizes[0]


def jacobian_rows(
    model: nn.Module,
    x: Any,
    output_fn: Optional[Callable] = None,
    param_names: Optional[Sequence[str]] = None,
    call_kwargs: Optional[dict] = None,
) -> torch.Tensor:
    """``J[i, a, p]`` of shape (N, O, P) in float64, by explicit loops (sparse gradients
    made dense; floating tensors of ``call_kwargs`` in float64 too)."""
    model = copy.deepcopy(model).double().eval()
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if param_names is not None:
        named = [(n, p) for n, p in named if n in param_names]
    params = [p for _, p in named]
    x = _double(x)
    call_kwargs = {k: _double(v) if isinstance(v, torch.Tensor) else v for k, v in (call_kwargs or {}).items()}
    rows = []
    for i in range(_batch(x)):
        out = _call(model, _example(x, i), call_kwargs)
        if output_fn is not None:
            out = output_fn(out)
        out = out.reshape(-1)
        per_output = []
        for a in range(out.numel()):
            grads = torch.autograd.grad(out[a], params, retain_graph=True, allow_unused=True)
            per_output.append(
                torch.cat(
                    [
                        (torch.zeros_like(p) if g is None else g.to_dense() if g.is_sparse else g).reshape(-1)
                        for g, p in zip(grads, params)
                    ]
                )
            )
        rows.append(torch.stack(per_output))
    return torch.stack(rows)


def naive_ntk(
    model: nn.Module,
    x1: Any,
    x2: Any = None,
    output_fn: Optional[Callable] = None,
    param_names: Optional[Sequence[str]] = None,
    call_kwargs: Optional[dict] = None,
) -> torch.Tensor:
    """The full kernel (N1, N2, O, O) in float64."""
    j1 = jacobian_rows(model, x1, output_fn, param_names, call_kwargs)
    j2 = j1 if x2 is None else jacobian_rows(model, x2, output_fn, param_names, call_kwargs)
    return torch.einsum("iap,jbp->ijab", j1, j2)


def reduce_mode(full: torch.Tensor, mode: str) -> torch.Tensor:
    """``trace`` or ``diagonal`` of a full kernel (N1, N2, O, O)."""
    if mode == "full":
        return full
    diagonal = torch.diagonal(full, dim1=2, dim2=3)  # (N1, N2, O)
    return diagonal.sum(-1) if mode == "trace" else diagonal
