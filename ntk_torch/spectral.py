r"""Matrix-free spectra: the top (or bottom) eigenpairs of a kernel operator by block Lanczos.

:func:`eigsh` runs a block Lanczos (block Krylov) iteration on a symmetric operator ``A``
(an :class:`~ntk_torch.NTKOperator` with ``x2=None``, or a symmetric 2-D Tensor) in
float64: each iteration does ONE product ``A Q_j`` with a block of ``b`` columns (so an
operator's columns share its forward passes), orthogonalises it twice against the whole
basis (full reorthogonalisation, "twice is enough") and takes its QR factor as the next
block. The products ``A Q`` are kept beside the basis ``Q`` (``N x m`` each), so the
Rayleigh-Ritz step uses ``T = Q^T (A Q)`` and the residual ``||A Q s - theta Q s||`` of
each wanted Ritz pair ``(theta, Q s)`` is computed exactly, not from a recurrence. The iteration
stops once the ``k`` wanted pairs all have residuals below ``tol * |theta_1|`` (their
eigenvalue errors are then at most about the residual squared over the spectral gap). A
block that loses rank (e.g. a rank-deficient kernel) is completed with fresh random
vectors orthogonal to the basis. Memory: ``2 m`` vectors of length ``N`` in float64, the
basis size ``m`` bounded by ``max_iter``.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Optional

import torch

from .kernel.operator import as_matvec

__all__ = ["Eigh", "eigsh"]


class Eigh(NamedTuple):
    """``eigenvalues`` ``(k,)`` descending and ``eigenvectors`` ``(N, k)`` (float64),
    ``iterations`` (matrix-vector products used: columns, over all blocks) and
    ``residuals`` ``(k,)`` (``||A v - lambda v||``)."""

    eigenvalues: torch.Tensor
    eigenvectors: torch.Tensor
    iterations: int
    residuals: torch.Tensor


def eigsh(
    op: Any, k: int = 10, which: str = "largest", *, tol: float = 1e-10, max_iter: Optional[int] = None,
    seed: int = 0, block_size: Optional[int] = None,
) -> Eigh:
    """The ``k`` largest (or smallest) eigenpairs of a symmetric operator.

    Args:
        op: an :class:`~ntk_torch.NTKOperator` built with ``x2=None`` or a symmetric 2-D
            Tensor ``(N, N)``.
        k: how many eigenpairs, ``1 <= k < N``.
        which: ``"largest"`` or ``"smallest"`` (algebraic).
        tol: relative residual ``||A v - theta v|| / |theta_1|`` at which a Ritz pair is
            accepted.
        max_iter: at most this many products, i.e. basis vectors (default
            ``min(N, max(40 k, 400))``: the memory bound ``2 N max_iter`` float64).
        seed: seeds the random start block.
        block_size: columns per product (default ``k``).

    Returns:
        :class:`Eigh`, eigenvalues in descending order.

    Raises:
        TypeError: ``op`` is not an operator or Tensor.
        ValueError: ``op`` is not square or symmetric (``x2`` given), ``k``, ``which``,
            ``tol`` or ``block_size`` out of range.
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
    b = k if block_size is None else block_size
    if isinstance(b, bool) or not isinstance(b, int) or not 1 <= b < n:
        raise ValueError(f"block_size must be an int with 1 <= block_size < N = {n}, got {block_size!r}")
    limit = min(n, max(40 * k, 400)) if max_iter is None else max(k + 1, min(int(max_iter), n))
    generator = torch.Generator().manual_seed(seed)

    def product(block: torch.Tensor) -> torch.Tensor:
        return matmul(block.to(device)).to(device="cpu", dtype=torch.float64)

    Q = torch.zeros(n, limit, dtype=torch.float64)
    AQ = torch.zeros(n, limit, dtype=torch.float64)
    m = 0
    block = _fresh(Q[:, :0], generator, n, min(b, limit))
    while True:
        width = block.shape[1]
        Q[:, m:m + width] = block
        AQ[:, m:m + width] = product(block)
        m += width
        values, vectors, residual = _ritz(Q[:, :m], AQ[:, :m], k, which)
        scale = values.abs().max().clamp_min(torch.finfo(torch.float64).tiny)
        if m >= k and bool((residual <= tol * scale).all()) or m == limit:
            break
        block = _next_block(AQ[:, m - width:m], Q[:, :m], generator, min(b, limit - m))
    order = torch.argsort(values, descending=True)
    eigenvectors = Q[:, :m] @ vectors[:, order]
    return Eigh(values[order], eigenvectors.to(device), m, residual[order])


def _ritz(Q: torch.Tensor, AQ: torch.Tensor, k: int, which: str):
    """The ``k`` wanted Ritz values (ascending; fewer while the basis is smaller), their
    coordinates in ``Q`` and their residual norms (only theirs: the others' would cost
    ``N m^2`` more per iteration)."""
    T = Q.T @ AQ
    values, vectors = torch.linalg.eigh((T + T.T) / 2)
    m = values.shape[0]
    chosen = slice(max(m - k, 0), m) if which == "largest" else slice(0, min(k, m))
    values, vectors = values[chosen], vectors[:, chosen]
    residual = (AQ @ vectors - (Q @ vectors) * values).norm(dim=0)
    return values, vectors, residual


def _orthogonalise(W: torch.Tensor, Q: torch.Tensor) -> torch.Tensor:
    for _ in range(2):
        W = W - Q @ (Q.T @ W)
    return W


def _next_block(W: torch.Tensor, Q: torch.Tensor, generator: torch.Generator, width: int) -> torch.Tensor:
    """The next orthonormal block from the last products ``W``: orthogonalised against
    ``Q``, its directions of norm below ``1e-10`` of the products' replaced by fresh ones."""
    scale = W.norm(dim=0).max().clamp_min(1e-300)
    W = _orthogonalise(W[:, :width], Q)
    basis, r = torch.linalg.qr(W)
    keep = r.diagonal().abs() > 1e-10 * scale
    basis = basis[:, keep]
    if basis.shape[1] < width:
        extra = _fresh(torch.cat([Q, basis], dim=1), generator, Q.shape[0], width - basis.shape[1])
        basis = torch.cat([basis, extra], dim=1)
    return _orthogonalise(basis, Q)


def _fresh(Q: torch.Tensor, generator: torch.Generator, n: int, width: int) -> torch.Tensor:
    """``width`` random orthonormal vectors orthogonal to the columns of ``Q``."""
    W = _orthogonalise(torch.randn(n, width, dtype=torch.float64, generator=generator), Q)
    return torch.linalg.qr(W)[0]
