"""Metrics on empirical NTKs: drift, alignment and spectrum.

Pure functions of kernel tensors (``torch.Tensor`` or ``numpy.ndarray``, any real dtype).
They compute in float64, return Python floats for scalars and float64 tensors (on the
kernel's device) for vectors, and never build an autograd graph.

How a kernel tensor is read as a matrix is its layout's business (:mod:`ntk_torch.layout`):
``full`` (N1, N2, O, O) as the (N1*O) x (N2*O) matrix with row (i, a) at ``i * O + a``;
``trace`` (N1, N2) as is; ``diagonal`` (N1, N2, O) as the block-diagonal full kernel
K[i, j, a, b] = D[i, j, a] * delta_ab (the cross-output blocks taken to be zero), so that
every metric of a diagonal kernel is the metric of that matrix: spectra are the union of
the O spectra of the N x N blocks, and centring and target alignment materialise the
(N*O) x (N*O) matrix.

The Frobenius inner product <A, B>_F = sum_ij A_ij B_ij and norm |A|_F do not depend on
this reading (it only moves entries around, and the zero blocks add nothing), so drift and
uncentred alignment work on kernels of any layout and any N1, N2; spectra and centring need
a square kernel (N1 == N2) of a set of inputs with itself.

Inputs must be finite: a kernel or target with a NaN or infinity raises ``ValueError``, as
does any quantity that would divide by a zero norm.
"""

from __future__ import annotations

import math
import numbers
from typing import NamedTuple, Optional, Tuple, Union

import numpy as np
import torch
from torch import Tensor

from ._options import check_bool
from .layout import layout_of

__all__ = [
    "relative_change",
    "kernel_distance",
    "alignment",
    "target_alignment",
    "spectrum",
    "effective_rank",
    "effective_rank_of_spectrum",
    "condition_number",
    "kernel_velocity",
    "target_factor",
    "symmetrised",
    "CentredTargets",
    "centred_targets",
    "centred_alignment_terms",
]

KernelLike = Union[Tensor, np.ndarray]

# A kernel whose antisymmetric part exceeds this fraction of its Frobenius norm is taken
# to be K(x1, x2) of two different sets rather than a round-off-perturbed symmetric kernel.
_SYMMETRY_RTOL = 1e-5


# --------------------------------------------------------------------------- inputs


def _tensor(x: KernelLike, name: str) -> Tensor:
    """``x`` as a detached real tensor, numpy arrays converted (copied) on the CPU."""
    if isinstance(x, np.ndarray):
        if x.dtype.kind not in "iuf":
            raise TypeError(f"{name} must hold real numbers, got numpy dtype {x.dtype}")
        return torch.tensor(x)
    if isinstance(x, Tensor):
        if x.is_complex() or x.dtype == torch.bool:
            raise TypeError(f"{name} must hold real numbers, got dtype {x.dtype}")
        return x.detach()
    raise TypeError(f"{name} must be a torch.Tensor or a numpy array, got {type(x).__name__}")


def _check_finite(x: Tensor, name: str) -> None:
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"{name} contains non-finite values (nan or inf)")


def _kernel(K: KernelLike, name: str) -> Tensor:
    """Validate a kernel of any layout and return it in float64."""
    K = _tensor(K, name).to(torch.float64)
    layout_of(K, name)
    if K.numel() == 0:
        raise ValueError(f"{name} has shape {tuple(K.shape)} and is empty")
    _check_finite(K, name)
    return K


def _kernel_pair(K1: KernelLike, K2: KernelLike, name1: str, name2: str) -> tuple[Tensor, Tensor]:
    A, B = _kernel(K1, name1), _kernel(K2, name2)
    if A.shape != B.shape:
        raise ValueError(f"{name1} has shape {tuple(A.shape)} but {name2} has {tuple(B.shape)}")
    return A, B.to(A.device)


def _require_square(K: Tensor, name: str, purpose: str) -> None:
    if K.shape[0] != K.shape[1]:
        raise ValueError(
            f"{name} has shape {tuple(K.shape)} but {purpose} needs a square kernel "
            "(N1 == N2), the kernel of a set of inputs with itself"
        )


# --------------------------------------------------------------------------- matrices


def _matrix(K: Tensor) -> Tensor:
    """The 2-D matrix a kernel stands for: (N1*O, N2*O) for full/diagonal, (N1, N2) for trace."""
    return layout_of(K).matrix(K)


def center(M: Tensor) -> Tensor:
    """``H M H`` with ``H = I - 1 1^T / n`` for a square matrix ``M`` (n x n)."""
    return _center(M)


def _center(M: Tensor) -> Tensor:
    """H M H with H = I - 11^T / n: subtract row and column means, add back the grand mean."""
    return M - M.mean(dim=0, keepdim=True) - M.mean(dim=1, keepdim=True) + M.mean()


def _symmetric(M: Tensor, name: str) -> Tensor:
    """Symmetrise a (batch of) square matrices after checking they are symmetric up to round-off."""
    asymmetry = torch.linalg.vector_norm(M - M.mT)
    scale = torch.linalg.vector_norm(M)
    if asymmetry > _SYMMETRY_RTOL * scale:
        raise ValueError(
            f"{name} is not symmetric (|K - K^T|_F / |K|_F = {float(asymmetry / scale):.2e}); "
            "spectra need the kernel of a set of inputs with itself, e.g. "
            "empirical_ntk(model, x) with x2=None"
        )
    return (M + M.mT) / 2


def symmetrised(M: Tensor, name: str = "K") -> Tensor:
    """``(M + M^T) / 2`` of a (batch of) square matrices ``M``, after checking that their
    asymmetry is round-off (``|M - M^T|_F <= 1e-5 |M|_F``).

    Raises:
        ValueError: ``M`` (called ``name``) is not symmetric, e.g. the kernel of two sets.
    """
    return _symmetric(M, name)


def _eigenvalues(K: Tensor, name: str) -> Tensor:
    """All eigenvalues of the symmetric matrix K stands for, ascending, float64, shape (N*O,):
    the union of the spectra of its diagonal blocks (one, or one per output)."""
    _require_square(K, name, "a spectrum")
    blocks = _symmetric(layout_of(K).blocks(K), name)
    return torch.linalg.eigvalsh(blocks).flatten().sort().values


def _cosine(A: Tensor, B: Tensor, name_a: str, name_b: str, centered: bool) -> float:
    """<A, B>_F / (|A|_F |B|_F), after centring both (as square matrices) if ``centered``."""
    if centered:
        A, B = _center(A), _center(B)
    norm_a, norm_b = torch.linalg.vector_norm(A), torch.linalg.vector_norm(B)
    for norm, name in ((norm_a, name_a), (norm_b, name_b)):
        if norm == 0:
            where = " after centring" if centered else ""
            raise ValueError(f"{name} has zero Frobenius norm{where}; the alignment is undefined")
    return float((A * B).sum() / (norm_a * norm_b))


# --------------------------------------------------------------------------- drift


def relative_change(K: KernelLike, K0: KernelLike) -> float:
    """Relative Frobenius change of a kernel from a reference, ``|K - K0|_F / |K0|_F``.

    The standard measure of kernel drift during training (Lee et al. 2019 show it shrinks
    like 1/sqrt(width)).

    Args:
        K: kernel of any layout, e.g. (N1, N2, O, O) full or (N1, N2) trace.
        K0: reference kernel (typically at initialisation), same shape as ``K``.

    Returns:
        A float >= 0; 0 when K == K0 and |c - 1| for K = c * K0.

    Raises:
        ValueError: shapes differ, or ``K0`` is zero.
    """
    K, K0 = _kernel_pair(K, K0, "K", "K0")
    reference = torch.linalg.vector_norm(K0)
    if reference == 0:
        raise ValueError("K0 has zero Frobenius norm; the relative change is undefined")
    return float(torch.linalg.vector_norm(K - K0) / reference)


def kernel_distance(K1: KernelLike, K2: KernelLike) -> float:
    """Kernel distance of Fort et al. 2020, ``1 - <K1, K2>_F / (|K1|_F |K2|_F)``.

    One minus the cosine of the angle between the kernels: 0 for kernels that are positive
    multiples of each other, 1 for orthogonal ones; insensitive to the kernels' scale.
    Together with s = |K|_F / |K0|_F it determines the relative change exactly:
    ``relative_change(K, K0)**2 == s**2 - 2 * s * (1 - kernel_distance(K, K0)) + 1``.

    Args:
        K1, K2: kernels of any layout and the same shape.

    Returns:
        A float in [0, 2] (up to round-off).

    Raises:
        ValueError: shapes differ, or either kernel is zero.
    """
    A, B = _kernel_pair(K1, K2, "K1", "K2")
    return 1.0 - _cosine(A, B, "K1", "K2", centered=False)


def kernel_velocity(K_prev: KernelLike, K_next: KernelLike, steps: float) -> float:
    """Kernel velocity of Fort et al. 2020: kernel distance travelled per optimizer step.

    ``kernel_distance(K_prev, K_next) / steps``, for kernels measured ``steps`` optimizer
    steps apart.

    Args:
        K_prev, K_next: kernels of any layout and the same shape.
        steps: number of optimizer steps between the two measurements, > 0.

    Raises:
        ValueError: ``steps`` is not a positive finite number, or as ``kernel_distance``.
    """
    if isinstance(steps, bool) or not isinstance(steps, numbers.Real):
        raise TypeError(f"steps must be a number of optimizer steps, got {type(steps).__name__}")
    if not (math.isfinite(steps) and steps > 0):
        raise ValueError(f"steps must be a positive number of optimizer steps, got {steps}")
    A, B = _kernel_pair(K_prev, K_next, "K_prev", "K_next")
    return (1.0 - _cosine(A, B, "K_prev", "K_next", centered=False)) / float(steps)


# --------------------------------------------------------------------------- alignment


def alignment(K1: KernelLike, K2: KernelLike, centered: bool = False) -> float:
    """Kernel alignment ``<K1, K2>_F / (|K1|_F |K2|_F)``, or CKA when ``centered``.

    With ``centered=True`` this is centred kernel alignment (Kornblith et al. 2019, the
    kernel form of CKA; Cortes et al. 2012): both matrices are first centred as
    ``H K H`` with ``H = I - 1 1^T / n`` (n = N*O for full and diagonal kernels, N for
    trace), which makes it invariant to adding a constant to every entry.
    Both forms are invariant to isotropic scaling of either kernel.

    Args:
        K1, K2: kernels of any layout and the same shape; square (N1 == N2) if ``centered``.
        centered: centre both kernels first (CKA).

    Returns:
        A float in [-1, 1]; 1 when K2 is a positive multiple of K1.

    Raises:
        ValueError: shapes differ, a kernel is not square when centring, or a kernel is
            zero (after centring).
    """
    A, B = _kernel_pair(K1, K2, "K1", "K2")
    if check_bool("centered", centered):
        _require_square(A, "K1", "centred alignment")
        A, B = _matrix(A), _matrix(B)
    return _cosine(A, B, "K1", "K2", centered)


def _targets(y: KernelLike, n: int, outputs: Optional[int]) -> Tensor:
    """The (N, C) float64 target matrix: integer labels (N,) one-hot encoded, others as given.

    ``outputs`` is O for full and diagonal kernels (C must equal it) and None for trace
    kernels (any C; labels get max(y) + 1 classes).
    """
    y = _tensor(y, "y")
    if not y.is_floating_point() and y.ndim == 1:
        if y.shape[0] != n:
            raise ValueError(
                f"y holds integer class labels of shape {tuple(y.shape)} but K needs ({n},)"
            )
        if int(y.min()) < 0:
            raise ValueError(f"y holds a negative class label {int(y.min())}")
        top = int(y.max())
        classes = top + 1 if outputs is None else outputs
        if top >= classes:
            raise ValueError(
                f"y holds class label {top} but K has O={outputs} outputs; "
                f"labels must lie in [0, {outputs})"
            )
        return torch.nn.functional.one_hot(y.long(), classes).to(torch.float64)

    Y = y.to(torch.float64)
    _check_finite(Y, "y")
    if Y.ndim == 1:
        Y = Y[:, None]
    expected = f"({n},) or ({n}, {outputs})" if outputs else f"({n},) or ({n}, C)"
    if Y.ndim != 2 or Y.shape[0] != n or (outputs is not None and Y.shape[1] != outputs):
        raise ValueError(f"y has shape {tuple(y.shape)} but K needs targets of shape {expected}")
    return Y


def target_alignment(K: KernelLike, y: KernelLike, centered: bool = True) -> float:
    """Kernel-target alignment of Cristianini et al. 2002, ``A(K, T) = <K, T>_F / (|K|_F |T|_F)``.

    The target kernel T is the Gram matrix of the targets, built to match K's layout:

    * trace kernel (N, N): ``T = Y Y^T`` over examples, Y of shape (N, C);
    * full kernel (N, N, O, O), read as (N*O) x (N*O): ``T = y_flat y_flat^T`` with
      ``y_flat = Y.reshape(N * O)`` indexed by (i, a) like K's rows, Y of shape (N, O);
    * diagonal kernel (N, N, O): as full, with K block-diagonal over outputs.

    ``y`` is integer class labels of shape (N,) (one-hot encoded: with O classes for full
    and diagonal kernels, max(y) + 1 for trace), or a float target vector (N,), or a target
    matrix (N, C) of any real dtype, e.g. one-hot (C = O for full and diagonal kernels).

    With ``centered=True`` (the default) both K and T are centred as ``H M H`` with
    ``H = I - 1 1^T / n`` first, as in centred alignment (Cortes et al. 2012), so that the
    mean of the targets and a constant offset of the kernel do not count.

    Returns:
        A float in [-1, 1]; 1 when K is a positive multiple of T.

    Raises:
        ValueError: K not square, y of the wrong shape, labels out of range, or K or T zero
            (after centring), e.g. all targets equal with ``centered=True``.
    """
    check_bool("centered", centered)
    K = _kernel(K, "K")
    target = target_kernel(K, y).to(K.device)
    return _cosine(_matrix(K), target, "K", "the target kernel y y^T", centered)


def target_kernel(K: KernelLike, y: KernelLike) -> Tensor:
    """The float64 target kernel of :func:`target_alignment` for a kernel shaped like
    ``K`` (only its shape is read): ``Y Y^T`` (N, N) for a trace kernel, ``y_flat
    y_flat^T`` (N*O, N*O) for full and diagonal kernels.

    Raises:
        ValueError: K not square, y of the wrong shape or labels out of range.
    """
    _require_square(K, "K", "target alignment")
    outputs = layout_of(K).num_outputs(K)
    Y = _targets(y, K.shape[0], outputs)
    if outputs is None:
        return Y @ Y.T
    y_flat = Y.reshape(-1)  # index i * O + a, matching the rows of _matrix(K)
    return torch.outer(y_flat, y_flat)


def target_factor(y: KernelLike, n: int, outputs: Optional[int] = None) -> Tensor:
    """``Y`` with ``Y Y^T`` the target kernel of :func:`target_kernel`, without forming it
    (for kernels known only through products): ``(N, C)`` float64 for a trace-like kernel
    of ``n`` examples (``outputs=None``), ``(N * O, 1)`` (``y_flat``) for a full kernel
    with ``outputs`` O.

    Raises:
        ValueError: y of the wrong shape or labels out of range.
    """
    Y = _targets(y, n, outputs)
    return Y if outputs is None else Y.reshape(-1, 1)


class CentredTargets(NamedTuple):
    """The centred target factor ``Yc = H Y`` (``H = I - 1 1^T / n``) of a target kernel
    ``Y Y^T`` (:func:`target_factor`), and ``norm = |Yc^T Yc|_F = |H Y Y^T H|_F``."""

    centred: Tensor
    norm: float

    def columns(self) -> Tensor:
        """``[Yc, 1]`` (n, C + 1): the columns whose product with a kernel
        :func:`centred_alignment_terms` reads."""
        ones = torch.ones(self.centred.shape[0], 1, dtype=self.centred.dtype, device=self.centred.device)
        return torch.cat([self.centred, ones], dim=1)


def centred_targets(y: KernelLike, n: int, outputs: Optional[int] = None) -> CentredTargets:
    """:class:`CentredTargets` of the targets ``y`` for a kernel of ``n`` examples
    (``outputs`` as in :func:`target_factor`).

    Raises:
        ValueError: y of the wrong shape or labels out of range.
    """
    Y = target_factor(y, n, outputs)
    centred = Y - Y.mean(dim=0, keepdim=True)
    return CentredTargets(centred, float(torch.linalg.matrix_norm(centred.T @ centred)))


def centred_alignment_terms(product: Tensor, targets: CentredTargets, frobenius: float) -> Tuple[float, float]:
    """The two terms of centred target alignment read from one product, without forming
    or centring an n x n matrix (Cortes et al. 2012, with ``H`` idempotent and ``H Yc = Yc``).

    For a symmetric n x n kernel matrix ``K``, ``product = K [Yc, 1]`` (n, C + 1) and
    ``frobenius = |K|_F``, with ``r = K 1`` and ``s = 1^T K 1``:

    * ``inner = <H K H, Yc Yc^T>_F = <K, Yc Yc^T>_F = sum(Yc * (K Yc))``;
    * ``centred = |H K H|_F^2 = |K|_F^2 - 2 |r|^2 / n + s^2 / n^2``.

    The centred alignment is ``inner / (sqrt(centred) * targets.norm)``. ``centred`` is a
    difference, so it loses relative precision when the kernel is nearly constant
    (``centred`` a tiny fraction of ``frobenius^2``); dense callers then centre exactly.

    Returns:
        ``(inner, centred)`` as floats.
    """
    n = product.shape[0]
    rows = product[:, -1]
    inner = float((targets.centred * product[:, :-1]).sum())
    centred = frobenius ** 2 - 2 * float(rows @ rows) / n + float(rows.sum()) ** 2 / n ** 2
    return inner, centred


# --------------------------------------------------------------------------- spectrum


def spectrum(K: KernelLike, k: Optional[int] = None) -> Tensor:
    """Eigenvalues of a symmetric kernel matrix, in descending order.

    Computed with ``torch.linalg.eigvalsh`` in float64 on the matrix K stands for
    ((N*O) x (N*O) for full and diagonal kernels, N x N for trace).

    Args:
        K: square symmetric kernel of any layout (N1 == N2).
        k: return only the ``k`` largest eigenvalues; None for all.

    Returns:
        float64 tensor of shape (k,) or (N*O,) (N for trace kernels), descending.

    Raises:
        ValueError: K not square or not symmetric, ``k`` not in [1, N*O].
    """
    eigenvalues = _eigenvalues(_kernel(K, "K"), "K").flip(0)
    if k is None:
        return eigenvalues
    if isinstance(k, bool) or not isinstance(k, numbers.Integral):
        raise TypeError(f"k must be an int or None, got {type(k).__name__}")
    if not 1 <= k <= eigenvalues.numel():
        raise ValueError(f"k must lie in [1, {eigenvalues.numel()}] for this kernel, got {k}")
    return eigenvalues[:k]


def effective_rank(K: KernelLike) -> float:
    """Effective rank of Roy & Vetterli 2007, ``exp(-sum_i p_i log p_i)``.

    ``p_i = lambda_i / sum_j lambda_j`` is the normalised spectrum of the symmetric kernel
    matrix (see ``spectrum``), with ``0 log 0 = 0``. Negative eigenvalues, which a positive
    semi-definite kernel has only through round-off, are set to 0 first.

    Returns:
        A float in [1, N*O]: N*O for a multiple of the identity, 1 for a rank-one kernel.

    Raises:
        ValueError: K not square or not symmetric, or without a positive eigenvalue.
    """
    return effective_rank_of_spectrum(_eigenvalues(_kernel(K, "K"), "K"))


def effective_rank_of_spectrum(eigenvalues: KernelLike) -> float:
    """``effective_rank`` from the eigenvalues of a kernel (any order), e.g. the output of
    ``spectrum``, so that one eigendecomposition serves both.

    Raises:
        ValueError: no positive eigenvalue, or a non-finite one.
    """
    eigenvalues = _tensor(eigenvalues, "eigenvalues").to(torch.float64).flatten()
    _check_finite(eigenvalues, "eigenvalues")
    eigenvalues = eigenvalues.clamp(min=0)
    total = eigenvalues.sum()
    if total <= 0:
        raise ValueError("K has no positive eigenvalue; its effective rank is undefined")
    p = eigenvalues[eigenvalues > 0] / total
    return math.exp(float(-(p * p.log()).sum()))


def condition_number(K: KernelLike, *, rtol: Optional[float] = None) -> float:
    """Condition number ``lambda_max / lambda_min`` of a symmetric kernel matrix.

    Eigenvalues as in ``spectrum``. The kernel counts as singular, and the result is
    ``inf``, when ``lambda_min <= rtol * |lambda_max|``; ``rtol`` defaults to
    ``n * eps`` (n = N*O the matrix size, eps the float64 machine epsilon), the usual
    numerical-rank tolerance. Pass a larger ``rtol`` for kernels computed in float32.

    Returns:
        A float >= 1, or ``inf``.

    Raises:
        ValueError: K not square or not symmetric, ``rtol`` negative.
    """
    eigenvalues = _eigenvalues(_kernel(K, "K"), "K")
    if rtol is None:
        rtol = eigenvalues.numel() * torch.finfo(torch.float64).eps
    elif not rtol >= 0:
        raise ValueError(f"rtol must be >= 0, got {rtol}")
    smallest, largest = float(eigenvalues[0]), float(eigenvalues[-1])
    if smallest <= rtol * abs(largest):
        return math.inf
    return largest / smallest
