r"""Randomised estimators of kernel traces and inner products (Hutch++), with error bars.

For kernels too large to hold, these read an :class:`~ntk_torch.NTKOperator` (or a 2-D
Tensor) only through products ``A V``:

* :func:`trace` ``tr(A)``;
* :func:`frobenius` ``||A||_F = sqrt(tr(A^T A))``;
* :func:`distance` ``||A - B||_F`` of two operators of the same shape, by Hutch++ on
  ``(A - B)^T (A - B)``: its error scales with ``||A - B||``, not with ``||A||`` as that of
  ``sqrt(||A||^2 + ||B||^2 - 2 <A, B>)`` from three estimates does, so a small drift of
  a kernel from its step-0 value is resolved (the tracker's ``kernel="estimate"``);
* :func:`inner` ``<A, B> = tr(A^T B)`` for two operators of the same shape (the kernel now
  and at step 0 on the same probe inputs), from which the metrics of
  :mod:`ntk_torch.metrics` follow: alignment ``<A, B> / (||A||_F ||B||_F)``, kernel
  distance ``1 - alignment``, relative change
  ``||A - B||_F / ||B||_F = sqrt(||A||^2 - 2 <A, B> + ||B||^2) / ||B||``.

Hutch++ (Meyer, Musco, Musco & Woodruff 2021) for ``tr(M)`` with ``m`` products of ``M``:
with ``s = m // 3`` Rademacher vectors ``S`` and ``Q`` an orthonormal basis of ``M S``,
``tr(M) = tr(Q^T M Q) + tr((I - Q Q^T) M (I - Q Q^T))``; the first term is exact, the
second is Hutchinson's estimate ``(1/s) sum_l g_l'^T M g_l'`` on the ``s`` deflated
Rademacher vectors ``g_l' = (I - Q Q^T) g_l``. This identity holds for any square ``M``
(by cyclicity), so it serves ``A^T B`` as well. The reported ``error`` is the standard
error of that Hutchinson mean (sample standard deviation of its ``s`` terms over
``sqrt(s)``): an estimate of one standard deviation of ``value``. The tests check that
``|value - exact| <= 3 error`` on at least 18 of 20 seeds.

Everything is accumulated in float64; ``matvecs`` counts products with ``M`` (for
``frobenius`` and ``inner`` one product with ``M = A^T B`` is two operator products, for
``distance`` four).
"""

from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple

import torch

from .kernel.operator import as_matvec

__all__ = ["Estimate", "distance", "frobenius", "inner", "trace"]


class Estimate(NamedTuple):
    """``value`` and ``error`` (its estimated standard deviation), floats."""

    value: float
    error: float


def trace(op: Any, matvecs: int = 60, *, seed: int = 0) -> Estimate:
    """``tr(A)`` of a square operator by Hutch++ with ``matvecs`` products (at least 3).

    Raises:
        TypeError / ValueError: ``op`` not an operator or not square, ``matvecs`` < 3.
    """
    shape, matmul, _, _, _ = as_matvec(op)
    _square(shape, "op")
    return _hutchpp(_float64(matmul), shape[0], matvecs, seed)


def frobenius(op: Any, matvecs: int = 60, *, seed: int = 0) -> Estimate:
    """``||A||_F`` by Hutch++ on ``tr(A^T A)`` (``error`` by the delta method,
    ``error(tr) / (2 ||A||_F)``)."""
    shape, matmul, rmatmul, _, _ = as_matvec(op)
    squared = _hutchpp(_float64(lambda V: rmatmul(matmul(V))), shape[1], matvecs, seed)
    return _root(squared)


def distance(op_a: Any, op_b: Any, matvecs: int = 60, *, seed: int = 0) -> Estimate:
    """``||A - B||_F`` by Hutch++ on ``tr((A - B)^T (A - B))`` (``A`` and ``B`` of the same
    shape; ``error`` by the delta method, as :func:`frobenius`). Each product with
    ``(A - B)^T (A - B)`` is four operator products.

    Raises:
        ValueError: the shapes differ.
    """
    shape, matmul_a, rmatmul_a, _, _ = as_matvec(op_a, "op_a")
    shape_b, matmul_b, rmatmul_b, _, _ = as_matvec(op_b, "op_b")
    _same_shape(shape, shape_b)
    forward, backward = _float64(matmul_a), _float64(matmul_b)
    transposed_a, transposed_b = _float64(rmatmul_a), _float64(rmatmul_b)

    def squared_difference(V: torch.Tensor) -> torch.Tensor:
        W = forward(V) - backward(V)
        return transposed_a(W) - transposed_b(W)

    return _root(_hutchpp(squared_difference, shape[1], matvecs, seed))


def inner(op_a: Any, op_b: Any, matvecs: int = 60, *, seed: int = 0) -> Estimate:
    """``<A, B> = tr(A^T B)`` by Hutch++ on ``M = A^T B`` (``A`` and ``B`` of the same
    shape, e.g. two :class:`~ntk_torch.NTKOperator` on the same inputs).

    Raises:
        ValueError: the shapes differ.
    """
    shape_a, _, rmatmul_a, _, _ = as_matvec(op_a, "op_a")
    shape_b, matmul_b, _, _, _ = as_matvec(op_b, "op_b")
    _same_shape(shape_a, shape_b)
    return _hutchpp(_float64(lambda V: rmatmul_a(matmul_b(V))), shape_b[1], matvecs, seed)


def _float64(matmul: Callable) -> Callable[[torch.Tensor], torch.Tensor]:
    return lambda V: matmul(V).to(device="cpu", dtype=torch.float64)


def _root(squared: Estimate) -> Estimate:
    """``sqrt`` of an estimate of a square, its error by the delta method."""
    value = math.sqrt(max(squared.value, 0.0))
    return Estimate(value, squared.error / (2 * value) if value > 0 else squared.error ** 0.5)


def _same_shape(shape_a, shape_b) -> None:
    if tuple(shape_a) != tuple(shape_b):
        raise ValueError(f"op_a and op_b must have the same shape, got {tuple(shape_a)} and {tuple(shape_b)}")


def _square(shape, name: str) -> None:
    if shape[0] != shape[1]:
        raise ValueError(f"{name} must be square for a trace, got shape {tuple(shape)}")


def _hutchpp(matmul: Callable[[torch.Tensor], torch.Tensor], n: int, matvecs: int, seed: int) -> Estimate:
    if isinstance(matvecs, bool) or not isinstance(matvecs, int) or matvecs < 3:
        raise ValueError(f"matvecs must be an int >= 3, got {matvecs!r}")
    generator = torch.Generator().manual_seed(seed)
    s = matvecs // 3
    if 2 * s >= n:  # the sketch would span the space: the trace is computed exactly
        exact = float(torch.diagonal(matmul(torch.eye(n, dtype=torch.float64))).sum())
        return Estimate(exact, 0.0)
    S = _rademacher(n, s, generator)
    G = _rademacher(n, s, generator)
    Q, _ = torch.linalg.qr(matmul(S))
    top = float(torch.sum(Q * matmul(Q)))
    G = G - Q @ (Q.T @ G)
    terms = torch.sum(G * matmul(G), dim=0)  # g_l'^T M g_l'
    rest = float(terms.mean())
    error = float(terms.std(unbiased=True)) / math.sqrt(s) if s > 1 else abs(rest)
    return Estimate(top + rest, error)


def _rademacher(n: int, s: int, generator: torch.Generator) -> torch.Tensor:
    return torch.randint(0, 2, (n, s), generator=generator).to(torch.float64) * 2 - 1
