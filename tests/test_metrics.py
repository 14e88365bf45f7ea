"""Tests for ntk_torch.metrics: known values, exact identities, layouts and errors."""

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ntk_torch import metrics


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _psd(n, rank=None, seed=0):
    """A random symmetric positive semi-definite (n, n) float64 matrix of the given rank."""
    A = torch.randn(n, rank or n, generator=_gen(seed), dtype=torch.float64)
    return A @ A.T


def _full_from_matrix(M, n, o):
    """The (N, N, O, O) full kernel whose (N*O) x (N*O) reading is M."""
    return M.reshape(n, o, n, o).permute(0, 2, 1, 3).contiguous()


def _hand_matrix(K):
    """(N1*O) x (N2*O) matrix of a full kernel built entry by entry: row i*O + a, col j*O + b."""
    n1, n2, o, _ = K.shape
    M = torch.empty(n1 * o, n2 * o, dtype=torch.float64)
    for i in range(n1):
        for j in range(n2):
            for a in range(o):
                for b in range(o):
                    M[i * o + a, j * o + b] = K[i, j, a, b]
    return M


# --------------------------------------------------------------------------- drift


@pytest.mark.parametrize("shape", [(5, 5), (3, 4, 2), (3, 3, 2, 2)])
def test_equal_kernels_have_zero_distance_and_change(shape):
    K = torch.randn(shape, generator=_gen(1))
    assert metrics.relative_change(K, K) == 0.0
    assert metrics.kernel_distance(K, K) == pytest.approx(0.0, abs=1e-15)
    assert metrics.alignment(K, K) == pytest.approx(1.0, abs=1e-15)


def test_orthogonal_kernels_have_distance_one():
    K1 = torch.tensor([[1.0, 0.0], [0.0, 0.0]])
    K2 = torch.tensor([[0.0, 0.0], [0.0, 3.0]])
    assert metrics.kernel_distance(K1, K2) == 1.0
    assert metrics.alignment(K1, K2) == 0.0
    assert metrics.kernel_distance(K1, -K1) == 2.0


@pytest.mark.parametrize("c", [0.25, 1.0, 3.0])
def test_scaled_kernel(c):
    K = _psd(6, seed=2)
    assert metrics.kernel_distance(c * K, K) == pytest.approx(0.0, abs=1e-14)
    assert metrics.relative_change(c * K, K) == pytest.approx(abs(c - 1), abs=1e-14)


def test_relative_change_value():
    K0 = torch.tensor([[3.0, 0.0], [0.0, 4.0]])  # |K0| = 5
    K = K0 + torch.tensor([[0.0, 1.0], [0.0, 0.0]])
    assert metrics.relative_change(K, K0) == pytest.approx(0.2, abs=1e-15)


_kernel_shapes = st.sampled_from([(4, 4), (3, 5), (2, 3, 2), (3, 3, 2, 2), (2, 4, 3, 3)])


@settings(max_examples=60, deadline=None)
@given(shape=_kernel_shapes, seed=st.integers(0, 2**31 - 1), shift=st.floats(-2.0, 2.0))
def test_relative_change_distance_identity(shape, seed, shift):
    """relative_change^2 = s^2 - 2 s (1 - d) + 1, s = |K|/|K0|, d = kernel_distance(K, K0)."""
    g = _gen(seed)
    K0 = torch.randn(shape, generator=g, dtype=torch.float64)
    K = shift * K0 + torch.randn(shape, generator=g, dtype=torch.float64)
    s = float(K.norm() / K0.norm())
    d = metrics.kernel_distance(K, K0)
    rc = metrics.relative_change(K, K0)
    assert rc**2 == pytest.approx(s**2 - 2 * s * (1 - d) + 1, rel=1e-9, abs=1e-12)
    assert -1e-12 <= d <= 2 + 1e-12


def test_kernel_velocity_is_distance_per_step():
    K1, K2 = _psd(5, seed=3), _psd(5, seed=4)
    d = metrics.kernel_distance(K1, K2)
    assert d > 0
    assert metrics.kernel_velocity(K1, K2, 4) == pytest.approx(d / 4, rel=1e-15)
    assert metrics.kernel_velocity(K1, K2, 0.5) == pytest.approx(2 * d, rel=1e-15)


def test_numpy_and_float32_inputs_compute_in_float64():
    K0 = np.eye(3, dtype=np.float32)
    K = torch.eye(3, dtype=torch.float32) * (1 + 1e-9)  # rounds to 1 in float32
    assert metrics.relative_change(K, K0) == 0.0
    K64 = np.eye(3) * (1 + 1e-9)
    assert metrics.relative_change(K64, K0) == pytest.approx(1e-9, rel=1e-6)
    assert isinstance(metrics.kernel_distance(K64, K0), float)


# --------------------------------------------------------------------------- alignment


def test_alignment_value():
    K1 = torch.tensor([[1.0, 1.0], [1.0, 1.0]])
    K2 = torch.eye(2)
    assert metrics.alignment(K1, K2) == pytest.approx(2 / (2 * math.sqrt(2)), rel=1e-15)


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), c=st.floats(1e-3, 1e3))
def test_cka_is_invariant_to_isotropic_scaling_and_constant_shift(seed, c):
    K1, K2 = _psd(6, rank=3, seed=seed), _psd(6, rank=3, seed=seed + 1)
    cka = metrics.alignment(K1, K2, centered=True)
    assert metrics.alignment(c * K1, K2, centered=True) == pytest.approx(cka, rel=1e-10)
    assert metrics.alignment(K1, K2 / c, centered=True) == pytest.approx(cka, rel=1e-10)
    # Centring removes a constant added to every entry.
    assert metrics.alignment(K1 + 5.0, K2, centered=True) == pytest.approx(cka, rel=1e-9)
    assert metrics.alignment(K1, K1, centered=True) == pytest.approx(1.0, rel=1e-12)


def test_cka_of_full_kernel_centres_the_flat_matrix():
    n, o = 3, 2
    K1, K2 = _psd(n * o, seed=5), _psd(n * o, seed=6)
    H = torch.eye(n * o, dtype=torch.float64) - 1.0 / (n * o)
    A, B = H @ K1 @ H, H @ K2 @ H
    expected = float((A * B).sum() / (A.norm() * B.norm()))
    got = metrics.alignment(_full_from_matrix(K1, n, o), _full_from_matrix(K2, n, o), centered=True)
    assert got == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("outputs", [None, 3])
def test_centred_alignment_terms_give_the_centred_target_alignment(outputs):
    """``<K, Yc Yc^T> / (|H K H| |Yc^T Yc|)`` from one product ``K [Yc, 1]`` and ``|K|_F``."""
    n = 6
    labels = torch.tensor([0, 2, 1, 2, 0, 1])
    size = n if outputs is None else n * outputs
    K = _psd(size, seed=5) + 4.0  # a constant offset, which centring removes
    targets = metrics.centred_targets(labels, n, outputs)
    assert torch.allclose(targets.centred.sum(0), torch.zeros(targets.centred.shape[1], dtype=torch.float64))
    product = K @ targets.columns()
    assert product.shape == (size, targets.centred.shape[1] + 1)
    inner, centred = metrics.centred_alignment_terms(product, targets, float(K.norm()))
    assert centred == pytest.approx(float(metrics.center(K).norm()) ** 2, rel=1e-10)
    kernel = K if outputs is None else _full_from_matrix(K, n, outputs)
    assert inner / (centred ** 0.5 * targets.norm) == pytest.approx(metrics.target_alignment(kernel, labels), rel=1e-10)


def test_symmetrised_checks_round_off_and_averages():
    M = _psd(4, seed=6)
    M[0, 1] += 1e-12
    torch.testing.assert_close(metrics.symmetrised(M), (M + M.T) / 2, rtol=0, atol=0)
    with pytest.raises(ValueError, match="M is not symmetric"):
        metrics.symmetrised(torch.triu(_psd(4, seed=7)), "M")


def test_target_alignment_of_label_gram_is_one():
    labels = torch.tensor([0, 2, 1, 2, 0])
    Y = torch.nn.functional.one_hot(labels, 3).double()
    assert metrics.target_alignment(Y @ Y.T, labels) == pytest.approx(1.0, rel=1e-12)
    assert metrics.target_alignment(3 * Y @ Y.T, labels, centered=False) == pytest.approx(1.0)
    # Full kernel: target over (i, a), (j, b) is y_flat y_flat^T.
    y_flat = Y.reshape(-1)
    K_full = _full_from_matrix(torch.outer(y_flat, y_flat), 5, 3)
    assert metrics.target_alignment(K_full, labels) == pytest.approx(1.0, rel=1e-12)
    assert metrics.target_alignment(K_full, Y.numpy()) == pytest.approx(1.0, rel=1e-12)
    assert metrics.target_alignment(K_full, Y.long()) == pytest.approx(1.0, rel=1e-12)


def test_target_alignment_float_targets():
    y = torch.tensor([1.0, -2.0, 0.5, 3.0])
    assert metrics.target_alignment(torch.outer(y, y), y) == pytest.approx(1.0, rel=1e-12)
    K = torch.eye(4)
    # Uncentred: <I, yy^T> / (|I| |yy^T|) = |y|^2 / (2 |y|^2).
    assert metrics.target_alignment(K, y, centered=False) == pytest.approx(0.5, rel=1e-12)


def test_target_alignment_trace_kernel_against_hand_formula():
    labels = np.array([0, 1, 1, 0, 1])
    K = _psd(5, seed=7)
    T = torch.tensor((labels[:, None] == labels[None, :]).astype(np.float64))
    expected = float((K * T).sum() / (K.norm() * T.norm()))
    assert metrics.target_alignment(K, labels, centered=False) == pytest.approx(expected, rel=1e-12)


def test_diagonal_kernel_is_block_diagonal_full_kernel():
    D1 = torch.rand(4, 4, 3, generator=_gen(8)) + 0.1
    D1 = D1 + D1.transpose(0, 1)
    D2 = torch.rand(4, 4, 3, generator=_gen(9))
    F1, F2 = torch.diag_embed(D1), torch.diag_embed(D2)
    labels = torch.tensor([0, 1, 2, 1])
    assert metrics.kernel_distance(D1, D2) == pytest.approx(metrics.kernel_distance(F1, F2))
    assert metrics.alignment(D1, D2, centered=True) == pytest.approx(
        metrics.alignment(F1, F2, centered=True), rel=1e-12
    )
    assert metrics.target_alignment(D1, labels) == pytest.approx(
        metrics.target_alignment(F1, labels), rel=1e-12
    )
    torch.testing.assert_close(metrics.spectrum(D1), metrics.spectrum(F1))


# --------------------------------------------------------------------------- spectrum


def test_spectrum_of_diagonal_matrix():
    K = torch.diag(torch.tensor([2.0, 5.0, -1.0, 3.0]))
    lam = metrics.spectrum(K)
    assert lam.dtype == torch.float64
    assert lam.tolist() == [5.0, 3.0, 2.0, -1.0]
    assert metrics.spectrum(K, k=2).tolist() == [5.0, 3.0]


def test_full_kernel_spectrum_is_that_of_the_flat_matrix():
    n, o = 4, 3
    K = _full_from_matrix(_psd(n * o, seed=10), n, o)
    M = _hand_matrix(K)
    expected = torch.linalg.eigvalsh(M).flip(0)
    torch.testing.assert_close(metrics.spectrum(K), expected)
    assert metrics.effective_rank(K) == pytest.approx(metrics.effective_rank(M), rel=1e-12)


def test_effective_rank_known_values():
    assert metrics.effective_rank(torch.eye(7)) == pytest.approx(7.0, rel=1e-12)
    assert metrics.effective_rank(_psd(6, rank=1, seed=11)) == pytest.approx(1.0, rel=1e-9)
    # Two equal eigenvalues and zeros: exp(log 2) = 2.
    assert metrics.effective_rank(torch.diag(torch.tensor([3.0, 3.0, 0.0]))) == pytest.approx(2.0)


def test_effective_rank_clamps_negative_eigenvalues():
    K = torch.diag(torch.tensor([1.0, 1.0, -1e-12], dtype=torch.float64))
    assert metrics.effective_rank(K) == pytest.approx(2.0, rel=1e-12)


def test_condition_number():
    assert metrics.condition_number(torch.diag(torch.tensor([1.0, 2.0, 4.0]))) == pytest.approx(4.0)
    assert metrics.condition_number(_psd(5, rank=2, seed=12)) == math.inf
    K = torch.diag(torch.tensor([1.0, 1e-9], dtype=torch.float64))
    assert metrics.condition_number(K) == pytest.approx(1e9)
    assert metrics.condition_number(K, rtol=1e-6) == math.inf


# --------------------------------------------------------------------------- errors


def test_shape_mismatch_names_both_arguments():
    with pytest.raises(ValueError, match=r"K has shape \(3, 4\) but K0 has \(3, 3\)"):
        metrics.relative_change(torch.ones(3, 4), torch.ones(3, 3))
    with pytest.raises(ValueError, match=r"K1 has shape \(2, 2, 1, 1\) but K2 has \(2, 2\)"):
        metrics.kernel_distance(torch.ones(2, 2, 1, 1), torch.ones(2, 2))


def test_zero_norm_errors():
    with pytest.raises(ValueError, match="K0 has zero Frobenius norm"):
        metrics.relative_change(torch.ones(2, 2), torch.zeros(2, 2))
    with pytest.raises(ValueError, match="K2 has zero Frobenius norm"):
        metrics.kernel_distance(torch.ones(2, 2), torch.zeros(2, 2))
    with pytest.raises(ValueError, match="K1 has zero Frobenius norm after centring"):
        metrics.alignment(torch.ones(3, 3), torch.eye(3), centered=True)
    with pytest.raises(ValueError, match="target kernel .* zero Frobenius norm after centring"):
        metrics.target_alignment(torch.eye(3), torch.tensor([1, 1, 1]))
    with pytest.raises(ValueError, match="no positive eigenvalue"):
        metrics.effective_rank(torch.zeros(3, 3))


def test_square_and_symmetric_kernel_required():
    with pytest.raises(ValueError, match=r"K has shape \(3, 4\) but a spectrum needs a square"):
        metrics.spectrum(torch.ones(3, 4))
    with pytest.raises(ValueError, match="K1 .* centred alignment needs a square"):
        metrics.alignment(torch.ones(2, 3, 1, 1), torch.ones(2, 3, 1, 1), centered=True)
    with pytest.raises(ValueError, match="K is not symmetric"):
        metrics.effective_rank(torch.tensor([[1.0, 2.0], [0.0, 1.0]]))


def test_invalid_kernels():
    with pytest.raises(ValueError, match=r"K has shape \(4,\) but a kernel is"):
        metrics.spectrum(torch.ones(4))
    with pytest.raises(ValueError, match="full kernel is \\(N1, N2, O, O\\)"):
        metrics.spectrum(torch.ones(2, 2, 3, 1))
    with pytest.raises(ValueError, match="K0 contains non-finite"):
        metrics.relative_change(torch.ones(2, 2), torch.tensor([[1.0, float("nan")], [0, 1]]))
    with pytest.raises(ValueError, match="empty"):
        metrics.spectrum(torch.ones(0, 0))
    with pytest.raises(TypeError, match="K must be a torch.Tensor or a numpy array"):
        metrics.spectrum([[1.0]])


def test_target_errors():
    K = torch.eye(4)
    with pytest.raises(ValueError, match=r"y holds integer class labels of shape \(3,\) but K needs \(4,\)"):
        metrics.target_alignment(K, torch.tensor([0, 1, 0]))
    with pytest.raises(ValueError, match=r"y has shape \(3,\)"):
        metrics.target_alignment(K, torch.tensor([0.0, 1.0, 0.0]))
    full = torch.ones(4, 4, 2, 2)
    with pytest.raises(ValueError, match="class label 2 but K has O=2 outputs"):
        metrics.target_alignment(full, torch.tensor([0, 1, 2, 0]))
    with pytest.raises(ValueError, match=r"y has shape \(4, 3\) but K needs .*\(4, 2\)"):
        metrics.target_alignment(full, torch.ones(4, 3))
    with pytest.raises(ValueError, match="negative class label"):
        metrics.target_alignment(K, torch.tensor([0, -1, 0, 1]))


def test_argument_errors():
    K = torch.eye(3)
    with pytest.raises(ValueError, match="steps must be a positive number of optimizer steps, got 0"):
        metrics.kernel_velocity(K, K, 0)
    with pytest.raises(ValueError, match="got -2"):
        metrics.kernel_velocity(K, K, -2)
    with pytest.raises(ValueError, match=r"k must lie in \[1, 3\]"):
        metrics.spectrum(K, k=4)
    with pytest.raises(TypeError, match="k must be an int"):
        metrics.spectrum(K, k=1.5)
