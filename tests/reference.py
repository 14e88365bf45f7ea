"""The naive reference eNTK: a loop over examples and outputs with ``torch.autograd.grad``.

Deliberately simple and slow: a float64 copy of the model in eval mode, one forward pass
per example, one backward pass per output value, gradients concatenated over the
trainable parameters (``model.parameters()`` yields each tied tensor once).
"""

from __future__ import annotations

import copy
from typing import Any, Callable, Optional, Sequence

import torch
from torch import nn


def _example(x: Any, i: int) -> Any:
    if isinstance(x, torch.Tensor):
        return x[i : i + 1]
    if isinstance(x, dict):
        return {k: v[i : i + 1] for k, v in x.items()}
    return tuple(t[i : i + 1] for t in x)


def _double(x: Any) -> Any:
    def cast(t):
        return t.double() if t.is_floating_point() else t

    if isinstance(x, torch.Tensor):
        return cast(x)
    if isinstance(x, dict):
        return {k: cast(v) for k, v in x.items()}
    return tuple(cast(t) for t in x)


def _call(model: nn.Module, x: Any) -> Any:
    if isinstance(x, torch.Tensor):
        return model(x)
    if isinstance(x, dict):
        return model(**x)
    return model(*x)


def _batch(x: Any) -> int:
    if isinstance(x, torch.Tensor):
        return x.shape[0]
    return next(iter(x.values() if isinstance(x, dict) else x)).shape[0]


def jacobian_rows(
    model: nn.Module,
    x: Any,
    output_fn: Optional[Callable] = None,
    param_names: Optional[Sequence[str]] = None,
) -> torch.Tensor:
    """``J[i, a, p]`` of shape (N, O, P) in float64, by explicit loops."""
    model = copy.deepcopy(model).double().eval()
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if param_names is not None:
        named = [(n, p) for n, p in named if n in param_names]
    params = [p for _, p in named]
    x = _double(x)
    rows = []
    for i in range(_batch(x)):
        out = _call(model, _example(x, i))
        if output_fn is not None:
            out = output_fn(out)
        out = out.reshape(-1)
        per_output = []
        for a in range(out.numel()):
            grads = torch.autograd.grad(out[a], params, retain_graph=True, allow_unused=True)
            per_output.append(
                torch.cat(
                    [
                        (g if g is not None else torch.zeros_like(p)).reshape(-1)
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
) -> torch.Tensor:
    """The full kernel (N1, N2, O, O) in float64."""
    j1 = jacobian_rows(model, x1, output_fn, param_names)
    j2 = j1 if x2 is None else jacobian_rows(model, x2, output_fn, param_names)
    return torch.einsum("iap,jbp->ijab", j1, j2)


def reduce_mode(full: torch.Tensor, mode: str) -> torch.Tensor:
    """``trace`` or ``diagonal`` of a full kernel (N1, N2, O, O)."""
    if mode == "full":
        return full
    diagonal = torch.diagonal(full, dim1=2, dim2=3)  # (N1, N2, O)
    return diagonal.sum(-1) if mode == "trace" else diagonal
