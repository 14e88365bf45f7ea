"""Tests for ntk_torch.drift: each record field of a formed kernel against the metrics
function it stands for, in every layout, both spectra, and the fused paths' edge cases
(explicit centring on cancellation or round-off asymmetry, chunked differences, tiled
symmetry checks)."""

import pytest
import torch

from ntk_torch import drift, metrics, records
from ntk_torch.drift import KernelDrift, Spectrum
from ntk_torch.layout import DIAGONAL, FULL, TRACE

N, O, P = 24, 3, 90


def _full_kernels(seed=0):
    """Two symmetric PSD full kernels (N, N, O, O) in float64, the second moved from the first."""
    g = torch.Generator().manual_seed(seed)
    J = torch.randn(N, O, P, generator=g, dtype=torch.float64)
    moved = J + 0.2 * torch.randn(N, O, P, generator=g, dtype=torch.float64)
    return (torch.einsum("iap,jbp->ijab", J, J), torch.einsum("iap,jbp->ijab", moved, moved))


def _in(layout, K):
    """The full kernel ``K`` in ``layout`` (contiguous)."""
    if layout is FULL:
        return K.contiguous()
    if layout is TRACE:
        return FULL.to_trace(K).contiguous()
    return K.diagonal(dim1=2, dim2=3).contiguous()


LAYOUTS = [FULL, TRACE, DIAGONAL]
LABELS = torch.arange(N) % O


@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda layout: layout.name)
@pytest.mark.parametrize("spectrum", ["full", "top"])
def test_fields_are_the_metrics_functions_values(layout, spectrum):
    K0, K1 = (_in(layout, K) for K in _full_kernels())
    tracked = KernelDrift(layout, LABELS, spectrum=spectrum)
    assert tracked.fields(0, K0)[records.RELATIVE_CHANGE] == 0.0
    fields = tracked.fields(4, K1)

    assert fields[records.TARGET_ALIGNMENT] == pytest.approx(metrics.target_alignment(K1, LABELS), rel=1e-12)
    assert fields[records.RELATIVE_CHANGE] == pytest.approx(metrics.relative_change(K1, K0), rel=1e-12)
    assert fields[records.KERNEL_DISTANCE] == pytest.approx(metrics.kernel_distance(K1, K0), rel=1e-10)
    assert fields[records.VELOCITY] == pytest.approx(metrics.kernel_velocity(K0, K1, 4), rel=1e-10)
    assert fields[records.FROBENIUS] == pytest.approx(float(K1.norm()), rel=1e-14)
    assert fields[records.TRACE] == pytest.approx(float(layout.to_trace(K1).diagonal().sum()), rel=1e-14)
    top = metrics.spectrum(K1, drift.TOP_EIGENVALUES)
    torch.testing.assert_close(torch.tensor(fields[records.TOP_EIGENVALUES], dtype=torch.float64), top,
                               rtol=1e-10, atol=0)
    if spectrum == "full":
        assert fields[records.EFFECTIVE_RANK] == pytest.approx(metrics.effective_rank(K1), rel=1e-12)
        assert records.error(records.TOP_EIGENVALUES) not in fields
    else:
        assert fields[records.EFFECTIVE_RANK] is None
        residuals = fields[records.error(records.TOP_EIGENVALUES)]
        assert len(residuals) == drift.TOP_EIGENVALUES
        # each Ritz value lies within its residual of an eigenvalue; these are converged
        assert all(0 <= r <= drift.TOP_TOL * float(top[0]) for r in residuals)
        gaps = (torch.tensor(fields[records.TOP_EIGENVALUES], dtype=torch.float64) - top).abs()
        assert bool((gaps <= torch.tensor(residuals, dtype=torch.float64) + 1e-9 * top[0]).all())


def test_float32_kernels_give_the_metrics_values_of_the_same_float32_tensors():
    K0, K1 = (FULL.to_trace(K).float() for K in _full_kernels(seed=3))
    tracked = KernelDrift(TRACE, LABELS)
    tracked.fields(0, K0)
    fields = tracked.fields(1, K1)
    assert fields[records.TARGET_ALIGNMENT] == pytest.approx(metrics.target_alignment(K1, LABELS), rel=1e-12)
    assert fields[records.RELATIVE_CHANGE] == pytest.approx(metrics.relative_change(K1, K0), rel=1e-12)
    assert fields[records.EFFECTIVE_RANK] == pytest.approx(metrics.effective_rank(K1), rel=1e-12)


def test_auto_spectrum_is_whole_up_to_the_work_bound_then_the_top(monkeypatch):
    K = _in(DIAGONAL, _full_kernels()[0])
    blocks = DIAGONAL.blocks(K)  # (O, N, N): work O N^3
    assert Spectrum("auto").whole(blocks)
    monkeypatch.setattr(drift, "WHOLE_SPECTRUM_WORK", O * N ** 3 - 1)
    assert not Spectrum("auto").whole(blocks)
    assert Spectrum("full").whole(blocks) and not Spectrum("top").whole(blocks)
    fields = KernelDrift(DIAGONAL, LABELS).fields(0, K)
    assert fields[records.EFFECTIVE_RANK] is None and records.error(records.TOP_EIGENVALUES) in fields
    torch.testing.assert_close(torch.tensor(fields[records.TOP_EIGENVALUES], dtype=torch.float64),
                               metrics.spectrum(K, drift.TOP_EIGENVALUES), rtol=1e-10, atol=0)


def test_top_spectrum_of_blocks_smaller_than_ten_is_exact():
    """Diagonal blocks of 4 rows: each is decomposed whole (residual 0), the union's top ten kept."""
    g = torch.Generator().manual_seed(1)
    A = torch.randn(4, 6, 5, generator=g, dtype=torch.float64)  # (N, P, O)
    K = torch.einsum("ipa,jpa->ija", A, A)
    fields = Spectrum("top").fields(DIAGONAL.blocks(K).contiguous(), symmetric=True)
    torch.testing.assert_close(torch.tensor(fields[records.TOP_EIGENVALUES], dtype=torch.float64),
                               metrics.spectrum(K, 10), rtol=1e-12, atol=1e-12)
    assert fields[records.error(records.TOP_EIGENVALUES)] == [0.0] * 10


def test_bad_spectrum_names_the_option():
    with pytest.raises(ValueError, match="spectrum must be one of 'auto', 'full', 'top', got 'some'"):
        KernelDrift(TRACE, LABELS, spectrum="some")


def test_nearly_constant_kernel_is_centred_explicitly():
    """``|H K H|^2 = |K|^2 - 2 |K 1|^2 / n + (1^T K 1)^2 / n^2`` cancels for a kernel that
    is a constant plus a tiny part; the field is still the metric's value."""
    base = FULL.to_trace(_full_kernels()[0])
    K = 1e3 + 1e-2 * base / base.norm()
    centred = metrics.centred_targets(LABELS, N)
    product = K @ centred.columns()
    _, cancelled = metrics.centred_alignment_terms(product, centred, float(K.norm()))
    exact = float(metrics.center(K).norm()) ** 2
    assert abs(cancelled - exact) > 1e-6 * exact  # the rearranged formula alone loses six digits here
    fields = KernelDrift(TRACE, LABELS).fields(0, K)
    assert fields[records.TARGET_ALIGNMENT] == pytest.approx(metrics.target_alignment(K, LABELS), rel=1e-8)


def test_round_off_asymmetric_kernel_is_symmetrised_and_centred_explicitly():
    K = FULL.to_trace(_full_kernels()[0])
    K = K + 1e-9 * float(K.norm()) * torch.triu(torch.ones(N, N, dtype=torch.float64), 1)
    fields = KernelDrift(TRACE, LABELS).fields(0, K)
    assert fields[records.TARGET_ALIGNMENT] == pytest.approx(metrics.target_alignment(K, LABELS), rel=1e-12)
    assert fields[records.EFFECTIVE_RANK] == pytest.approx(metrics.effective_rank(K), rel=1e-9)


def test_kernel_of_two_sets_is_refused_by_the_spectrum():
    K = torch.randn(N, N, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    with pytest.raises(ValueError, match="K is not symmetric"):
        KernelDrift(TRACE, LABELS).fields(0, K)


def test_constant_targets_leave_the_alignment_undefined():
    K = FULL.to_trace(_full_kernels()[0])
    assert KernelDrift(TRACE, torch.zeros(N, dtype=torch.long)).fields(0, K)[records.TARGET_ALIGNMENT] is None


def test_difference_norm_over_chunks(monkeypatch):
    g = torch.Generator().manual_seed(4)
    A, B = (torch.randn(2, 37, 29, generator=g, dtype=torch.float64) for _ in range(2))
    monkeypatch.setattr(drift, "CHUNK", 100)  # 3 rows a chunk: 74 rows in 25 chunks, the last short
    assert float(drift._difference_norm(A, B)) == pytest.approx(float((A - B).norm()), rel=1e-14)


def test_symmetry_is_checked_in_every_tile():
    M = FULL.to_trace(torch.einsum("iap,jbp->ijab", *(2 * [torch.randn(600, 1, 3, dtype=torch.float64)])))
    blocks = M.unsqueeze(0).contiguous()
    assert drift._exactly_symmetric(blocks)
    blocks[0, 10, 590] += 1e-12  # an entry in the last tile of the first tile row
    assert not drift._exactly_symmetric(blocks)


def test_block_order_of_diagonal_rows_matches_its_blocks():
    """``blockdiag(blocks) @ in_block_order(V) == in_block_order(matrix(K) @ V)``."""
    K = _in(DIAGONAL, _full_kernels()[0])
    V = torch.randn(N * O, 2, dtype=torch.float64)
    blocks = DIAGONAL.blocks(K)
    left = torch.block_diag(*blocks) @ DIAGONAL.in_block_order(V, O)
    torch.testing.assert_close(left, DIAGONAL.in_block_order(DIAGONAL.matrix(K) @ V, O))
    for layout in (FULL, TRACE):
        assert layout.in_block_order(V, 1) is V


@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda layout: layout.name)
def test_contiguous_blocks_are_the_blocks_copied_once_into_a_fitting_buffer(layout):
    K = _in(layout, _full_kernels()[0]).float()
    expected = layout.blocks(K).to(torch.float64)
    fresh = layout.contiguous_blocks(K, torch.float64)
    assert fresh.is_contiguous() and fresh.dtype == torch.float64
    assert torch.equal(fresh, expected)
    buffer = torch.full_like(fresh, float("nan"))
    written = layout.contiguous_blocks(K, torch.float64, buffer)
    assert written.data_ptr() == buffer.data_ptr() and torch.equal(buffer, expected)
    for unfit in (buffer.float(), buffer[:, 1:], torch.empty(buffer.shape[::-1], dtype=torch.float64).mT):
        other = layout.contiguous_blocks(K, torch.float64, unfit)
        assert other.data_ptr() != unfit.data_ptr() and torch.equal(other, expected)


def test_contiguous_blocks_already_so_are_the_kernels_own():
    K = _in(TRACE, _full_kernels()[0])
    assert TRACE.contiguous_blocks(K, torch.float64, torch.empty(1, N, N, dtype=torch.float64)).data_ptr() == K.data_ptr()


@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda layout: layout.name)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_retired_copies_are_reused_and_nothing_held_is_overwritten(layout, dtype):
    """From the fourth measurement on a retired copy's memory takes the new one (no fresh
    pages each time); the step-0 copy, the previous one and the caller's kernels stay as
    they were, and the fields are those of a tracker that reuses nothing."""
    g = torch.Generator().manual_seed(7)
    J = torch.randn(N, O, P, generator=g, dtype=torch.float64)
    kernels = []
    for _ in range(6):
        J = J + 0.1 * torch.randn(N, O, P, generator=g, dtype=torch.float64)
        kernels.append(_in(layout, torch.einsum("iap,jbp->ijab", J, J)).to(dtype))
    originals = [K.clone() for K in kernels]
    tracked = KernelDrift(layout, LABELS)
    pointers = []
    for step, K in enumerate(kernels):
        fields = tracked.fields(10 * step, K)
        alone = KernelDrift(layout, LABELS)
        if step:
            alone.fields(0, kernels[0])
            alone.previous, alone._previous = (10 * (step - 1), kernels[step - 1]), drift._Fused(kernels[step - 1], layout)
        assert fields == alone.fields(10 * step, K)
        pointers.append(tracked._previous.blocks.data_ptr())
    for K, original in zip(kernels, originals):
        assert torch.equal(K, original)
    assert torch.equal(tracked._initial.blocks, layout.contiguous_blocks(kernels[0], torch.float64))
    own = not (layout is TRACE and dtype == torch.float64)  # a contiguous float64 kernel is used as it is
    if own:
        assert pointers[3] in pointers[1:3] and pointers[4] in pointers[1:4]
        assert pointers[0] not in pointers[1:]
    else:
        assert tracked._spare is None and pointers == [K.data_ptr() for K in kernels]
