"""Numerical stability: float32 data with per-channel mean 1e4 and std 1.

The bounds come from the compute dtype (float32 here) and the problem's
conditioning (:func:`var_tol`, :func:`y_tol`), on one rank and across ranks
(``mpi_cases._stability``, both CPU backends): the variance of ``n`` values
to a few float32 roundings per summation level (about 3e-6 relative, where
the naive ``E[x^2] - E[x]^2`` in float32 is off by more than 1e-3, checked
below), ``y`` to the rounding of a mean of 1e4 in float32 over a std of 1.
"""

import numpy as np
import pytest
from support.bn_ref import check_group, eps

import cupysyncbn as sbn
from cupysyncbn.comm.base import NoCommunicator


def _data(rng, shape, offset=1e4):
    c = shape[1]
    center = offset + 10.0 * np.arange(c).reshape(1, c, *([1] * (len(shape) - 2)))
    return (center + rng.standard_normal(shape)).astype(np.float32)


def var_tol(n, cdt=np.float32):
    """Relative bound of a variance of ``n`` values computed in ``cdt``.

    Shifted (or two-pass) sums of squares: positive terms, so the condition
    number is 1 and a blocked/pairwise sum costs about ``log2(n)`` roundings;
    2 per level covers the rounding of the squares and of the stored result.
    """
    return 2 * eps(cdt) * np.log2(n)


def y_tol(mean, std, y_max, cdt=np.float32):
    """Absolute bound of ``y = (x - mean) / std`` with the statistics in ``cdt``.

    The mean is rounded to ``cdt`` (``eps/2 * |mean|``), which centering
    divides by ``std``: the condition number is ``|mean| / std`` (1e4 here);
    plus the rounding of ``y`` itself.
    """
    return eps(cdt) * (np.max(np.abs(mean) / std) + y_max)


def test_naive_formula_fails_on_this_data(rng):
    x = _data(rng, (16, 3, 16, 16))
    truth = x.astype(np.float64).var(axis=(0, 2, 3))
    naive = (x * x).mean(axis=(0, 2, 3), dtype=np.float32) - x.mean(
        axis=(0, 2, 3), dtype=np.float32) ** 2
    assert (np.abs(naive - truth) / truth).max() > 1e-3


@pytest.mark.parametrize("fmt", ["NCHW", "NHWC"])
def test_single_rank_variance(rng, fmt):
    layer = sbn.SyncBatchNorm(3, momentum=0.0, data_format=fmt, comm=NoCommunicator())
    for _ in range(3):
        x = _data(rng, (16, 3, 16, 16))
        n = x.size // 3
        truth = x.astype(np.float64).var(axis=(0, 2, 3))
        mean_truth = x.astype(np.float64).mean(axis=(0, 2, 3))
        xin = np.ascontiguousarray(np.moveaxis(x, 1, -1)) if fmt == "NHWC" else x
        y = layer(xin)
        # momentum=0: the running variance is the batch variance (float32).
        rel = np.abs(layer._variance.astype(np.float64) - truth) / truth
        assert rel.max() <= var_tol(n), rel
        # the running mean: one rounding of a sum of positive values per level
        assert np.abs(layer._mean - mean_truth).max() <= eps(np.float32) * np.log2(n) * np.abs(
            mean_truth).max()
        yc = np.moveaxis(y, -1, 1) if fmt == "NHWC" else y
        yr = (x.astype(np.float64) - mean_truth[:, None, None]) / np.sqrt(
            truth[:, None, None] + 1e-5)
        assert np.abs(yc - yr).max() <= y_tol(mean_truth, np.sqrt(truth), np.abs(yr).max())


def test_functional_batch_var_float64_result(rng):
    x = _data(rng, (8, 4, 32))
    res = sbn.functional.batch_norm_forward(x, data_format="NCL", comm=NoCommunicator())
    truth = x.astype(np.float64).var(axis=(0, 2))
    assert (np.abs(res.batch_var - truth) / truth).max() <= var_tol(x.size // 4)


def test_larger_offset_still_accurate(rng):
    # Mean 1e5, std 1: float32 spacing at 1e5 is ~8e-3, so the data itself
    # is quantized; the variance of the quantized data is still computed to
    # float32 rounding (the shift removes the offset before squaring).
    x = _data(rng, (8, 2, 64), offset=1e5)
    layer = sbn.BatchNorm1D(2, momentum=0.0)
    layer(x)
    truth = x.astype(np.float64).var(axis=(0, 2))
    assert (np.abs(layer._variance - truth) / truth).max() <= var_tol(x.size // 2)


@pytest.mark.mpi
@pytest.mark.parametrize("backend", ["numba", "numpy"])
@pytest.mark.parametrize("k", [1, 2, 3, 4])  # 1: forced collectives
def test_multi_rank_variance(mpi_job, k, backend):
    # Uneven splits with an empty rank, three steps (first pass and steady
    # state); the same bounds (mpi_cases._stability) for both CPU backends.
    check_group(mpi_job("oracle", k, backend), "stability", min_count=3)
