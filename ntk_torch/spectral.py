r"""Matrix-free spectra: the top (or bottom) eigenpairs of a kernel operator by Lanczos.

:func:`eigsh` runs the Lanczos iteration on a symmetric operator ``A`` (an
:class:`~ntk_torch.NTKOperator` with ``x2=None``, or a symmetric 2-D Tensor) in float64,
with full reorthogonalisation (every new vector is orthogonalised twice against the whole
basis, "twice is enough"), so the Ritz values do not repeat. After ``m`` steps
``A Q_m = Q_m T_m + beta_m q_{m+1} e_m^T``; the Ritz pair ``(theta_i, Q_m s_i)`` of
``T_m`` has the residual norm ``|beta_m s_{m,i}|``, and the iteration stops once the ``k``
wanted pairs all have residuals below ``tol * |theta_1|`` (their eigenvalue errors are then
at most about the residual squared over the spectral gap). An invariant subspace
(``beta = 0``, e.g. a rank-deficient kernel) is continued with a fresh random vector
orthogonal to the basis. Memory: ``m`` vectors of length ``N`` in float64.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Optional

import torch

from .kernel.operator import as_matvec

__all__ = ["Eigh", "eigsh"]


class Eigh(NamedTuple):
    """``eigenvalues`` ``(k,)`` descending and ``eigenvectors`` ``(N, k)`` (float64),
    ``iterations`` (matrix-vector products used) and ``residuals`` ``(k,)``
    (``||A v - lambda v||``)."""

    eigenvalues: torch.Tensor
    eigenvectors: torch.Tensor
    iterations: int
    residuals: torch.Tensor


def eigsh(
    op: Any, k: int = 10, which: str = "largest", *, tol: float = 1e-10, max_iter: Optional[int] = None,
    seed: int = 0,
) -> Eigh:
    """The ``k`` largest (or smallest) eigenpairs of a symmetric operator.

    Args:
        op: an :class:`~ntk_torch.NTKOperator` built with ``x2=None`` or a symmetric 2-D
            Tensor ``(N, N)``.
        k: how many eigenpairs, ``1 <= k < N``.
        which: ``"largest"`` or ``"smallest"`` (algebraic).
        tol: relative residual ``|beta s_m| / |theta_1|`` at which a Ritz pair is accepted.
        max_iter: at most this many products (default ``N``).
        seed: seeds the random start vector.

    Returns:
        :class:`Eigh`, eigenvalues in descending order.

    Raises:
        TypeError: ``op`` is not an operator or Tensor.
        ValueError: ``op`` is not square or symmetric (``x2`` given), ``k`` or ``which``
            out of range.
    """
    shape, matmul, _, _, device = as_matvec(op)
    if shape[0] != shape[1] or getattr(op, "symmetric", True) is False:
        raise ValueError(f"op must be a symmetric operator (NTKOperator with x2=None), got shape {shape}")
    n = shape[0]
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k < n:
        raise ValueError(f"k must be an int with 1 <= k < N = {n}, got {k!r}")
    if which not in ("largest", "smallest"):
        raise ValueError(f"which must be 'largest' or 'smallest', got {which!r}")
    if not tol > 0:
        raise ValueError(f"tol must be positive, got {tol!r}")
    limit = n if max_iter is None else max(k + 1, min(int(max_iter), n))
    generator = torch.Generator().manual_seed(seed)

    def product(v: torch.Tensor) -> torch.Tensor:
        return matmul(v.unsqueeze(1)).to(device="cpu", dtype=torch.float64)[:, 0]

    Q = torch.zeros(n, limit + 1, dtype=torch.float64)
    alpha = torch.zeros(limit, dtype=torch.float64)
    beta = torch.zeros(limit, dtype=torch.float64)
    Q[:, 0] = _fresh(Q[:, :0], generator, n)
    m = 0
    while m < limit:
        w = product(Q[:, m])
        alpha[m] = Q[:, m] @ w
        w = _orthogonalise(w, Q[:, : m + 1])
        beta[m] = w.norm()
        m += 1
        if m >= k and (m == limit or m % 4 == 0 or beta[m - 1] == 0):
            values, vectors = _ritz(alpha[:m], beta[: m - 1])
            chosen = _chosen(values, k, which)
            residual = (beta[m - 1] * vectors[-1, chosen]).abs()
            scale = values.abs().max().clamp_min(torch.finfo(torch.float64).tiny)
            if bool((residual <= tol * scale).all()) or m == limit:
                break
        if beta[m - 1] <= 1e-14 * alpha[: m].abs().max().clamp_min(1e-300):
            beta[m - 1] = 0.0
            Q[:, m] = _fresh(Q[:, :m], generator, n)
        else:
            Q[:, m] = w / beta[m - 1]
    values, vectors = _ritz(alpha[:m], beta[: m - 1])
    chosen = _chosen(values, k, which)
    eigenvalues = values[chosen]
    order = torch.argsort(eigenvalues, descending=True)
    eigenvalues = eigenvalues[order]
    eigenvectors = Q[:, :m] @ vectors[:, chosen[order]]
    residuals = (beta[m - 1] * vectors[-1, chosen[order]]).abs()
    return Eigh(eigenvalues, eigenvectors.to(device), m, residuals)


def _ritz(alpha: torch.Tensor, beta: torch.Tensor):
    T = torch.diag(alpha) + torch.diag(beta, 1) + torch.diag(beta, -1)
    return torch.linalg.eigh(T)


def _chosen(values: torch.Tensor, k: int, which: str) -> torch.Tensor:
    m = values.shape[0]
    return torch.arange(m - k, m) if which == "largest" else torch.arange(0, k)


def _orthogonalise(w: torch.Tensor, Q: torch.Tensor) -> torch.Tensor:
    for _ in range(2):
        w = w - Q @ (Q.T @ w)
    return w


def _fresh(Q: torch.Tensor, generator: torch.Generator, n: int) -> torch.Tensor:
    """A random unit vector orthogonal to the columns of ``Q``."""
    v = _orthogonalise(torch.randn(n, dtype=torch.float64, generator=generator), Q)
    return v / v.norm()
