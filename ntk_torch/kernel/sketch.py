r"""Sketched kernels: ``K ~ (J1 S)(J2 S)^T`` with a seeded Gaussian projection ``S``.

``S`` is ``P x d`` with independent ``N(0, 1/d)`` entries, so ``E[S S^T] = I`` and the
sketch is unbiased, ``E[(J1 S)(J2 S)^T] = J1 J2^T = K``, with a relative error falling as
``1/sqrt(d)`` (each entry is a mean of ``d`` independent products). Column ``c`` of ``S``
is a tangent in parameter space, drawn from a generator seeded by ``(sketch_seed, c)``
(:func:`projection_columns`: the same ``S`` for ``x1`` and ``x2``, whatever the chunking);
``J S[:, :, c]`` is one forward-mode product ``jvp(f, theta, s_c)``. The columns run in
chunks batched with ``vmap`` and each chunk's products are added to the kernel at once
(:meth:`~ntk_torch.layout.Layout.add_gradient_products` with ``d`` in place of ``P``):
neither ``J`` nor ``S`` is ever formed, and memory is the kernel plus one chunk.
"""

from __future__ import annotations

from typing import Dict, Optional

import torch
from torch.func import jvp, vmap

from ..functional import FunctionalModel, Inputs, batch_size, slice_inputs
from ..layout import Layout
from .cost import profile_forward

__all__ = ["check_sketch", "sketch_features", "sketched_kernel"]

_SEED_STRIDE = 1_000_003
_MAX_CHUNK = 128


def check_sketch(sketch: Optional[int], sketch_seed: int) -> None:
    """Raise a one-line error for a bad ``sketch`` (None or a positive int) or seed."""
    if sketch is not None and (isinstance(sketch, bool) or not isinstance(sketch, int) or sketch < 1):
        raise ValueError(f"sketch must be a positive int (the projection dimension d) or None, got {sketch!r}")
    if isinstance(sketch_seed, bool) or not isinstance(sketch_seed, int) or sketch_seed < 0:
        raise ValueError(f"sketch_seed must be a non-negative int, got {sketch_seed!r}")


def projection_columns(params: Dict[str, torch.Tensor], start: int, stop: int, d: int, seed: int) -> Dict[str, torch.Tensor]:
    """Columns ``start:stop`` of ``S`` as tangents ``{name: (stop - start, *param)}``.

    Column ``c`` is one draw of ``P`` standard normals in float32 from a generator seeded by
    ``(seed, c)``, split over the parameters in order and scaled by ``1/sqrt(d)``, then cast
    to each parameter's dtype: the same ``S`` for float32 and float64 models, drawn four
    times faster than in float64 (drawing, not the products, dominated small sketches)."""
    sizes = [p.numel() for p in params.values()]
    block = torch.empty(stop - start, sum(sizes), dtype=torch.float32)
    for row, c in enumerate(range(start, stop)):
        block[row].normal_(generator=torch.Generator().manual_seed(seed * _SEED_STRIDE + c))
    block.mul_(d ** -0.5)
    return {
        name: part.reshape(stop - start, *p.shape).to(device=p.device, dtype=p.dtype)
        for (name, p), part in zip(params.items(), block.split(sizes, dim=1))
    }


def _chunk_size(fmodel: FunctionalModel, x: Inputs, o: int, examples: int, d: int, memory_budget: int) -> int:
    """Projection columns per vmapped chunk: per column the forward-mode activations of
    ``examples`` inputs and the tangent (drawn in float32, then cast); at most _MAX_CHUNK."""
    activation = profile_forward(fmodel, slice_inputs(x, 0, 1), o).activation_bytes
    per_column = 3 * examples * activation + (4 + 2 * fmodel.dtype.itemsize) * fmodel.num_params
    return int(max(1, min(d, _MAX_CHUNK, memory_budget // per_column)))


def _products(fmodel: FunctionalModel, x: Inputs, tangents: Dict[str, torch.Tensor], params=None) -> torch.Tensor:
    """``J S_chunk`` as ``(n, O, chunk)`` at ``params`` (default the model's): one vmapped
    jvp per projection column."""
    params = fmodel.params if params is None else params

    def column(tangent):
        return jvp(lambda p: fmodel(p, x), (params,), (tangent,))[1]

    return vmap(column, randomness="same")(tangents).permute(1, 2, 0)


def sketch_features(
    fmodel: FunctionalModel, x: Inputs, d: int, seed: int, memory_budget: int, params: Optional[Dict[str, torch.Tensor]] = None
) -> torch.Tensor:
    """``Z = J S`` of prepared inputs ``x`` at ``params`` (default the model's): ``(N, O,
    d)``, the same ``S`` (seed) as :func:`sketched_kernel`, so ``Z1 Z2^T`` (per output
    pair) is that sketched kernel; the caller provides eval mode, a forked RNG and
    ``torch.no_grad``. Memory: ``Z``."""
    params = fmodel.params if params is None else params
    n = batch_size(x, "x")
    o = fmodel.output_size(x, n)
    chunk = _chunk_size(fmodel, x, o, n, d, memory_budget)
    parts = [
        _products(fmodel, x, projection_columns(params, start, min(start + chunk, d), d, seed), params)
        for start in range(0, d, chunk)
    ]
    return torch.cat(parts, dim=2)


def sketched_kernel(
    fmodel: FunctionalModel, layout: Layout, x1: Inputs, x2: Optional[Inputs], d: int, seed: int, memory_budget: int
) -> torch.Tensor:
    """The sketched kernel in ``layout`` (``(N1, N2, O, O)``, ``(N1, N2)`` or
    ``(N1, N2, O)``), ``x2=None`` for ``x1`` against itself; the caller provides eval
    mode, a forked RNG and ``torch.no_grad``."""
    x1 = fmodel.prepare_inputs(x1)
    x2 = None if x2 is None else fmodel.prepare_inputs(x2)
    n1 = batch_size(x1, "x1")
    n2 = n1 if x2 is None else batch_size(x2, "x2")
    o = fmodel.output_size(x1, n1)
    chunk = _chunk_size(fmodel, x1, o, n1 + n2, d, memory_budget)
    acc = torch.zeros(layout.work_shape(n1, n2, o), dtype=fmodel.dtype, device=fmodel.device)
    for start in range(0, d, chunk):
        tangents = projection_columns(fmodel.params, start, min(start + chunk, d), d, seed)
        g1 = _products(fmodel, x1, tangents)
        g2 = g1 if x2 is None else _products(fmodel, x2, tangents)
        layout.add_gradient_products(acc, g1, g2)
    return layout.from_work(acc).contiguous()
