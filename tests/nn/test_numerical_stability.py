"""Numerical stability: float32 data with per-channel mean 1e4 and std 1.

The variance must be within 1e-3 relative of the float64 truth on one rank
and across ranks. The naive ``E[x^2] - E[x]^2`` in float32 fails this bound on
the same data (checked below), so the test can tell the difference.
"""

import numpy as np
import pytest
from support.bn_ref import check_group

import cupysyncbn as sbn
from cupysyncbn.comm.base import NoCommunicator


def _data(rng, shape, offset=1e4):
    c = shape[1]
    center = offset + 10.0 * np.arange(c).reshape(1, c, *([1] * (len(shape) - 2)))
    return (center + rng.standard_normal(shape)).astype(np.float32)


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
        truth = x.astype(np.float64).var(axis=(0, 2, 3))
        mean_truth = x.astype(np.float64).mean(axis=(0, 2, 3))
        xin = np.ascontiguousarray(np.moveaxis(x, 1, -1)) if fmt == "NHWC" else x
        y = layer(xin)
        # momentum=0: the running variance is the batch variance (float32).
        rel = np.abs(layer._variance.astype(np.float64) - truth) / truth
        assert rel.max() < 1e-3, rel
        assert np.abs(layer._mean - mean_truth).max() < 1e-2
        yc = np.moveaxis(y, -1, 1) if fmt == "NHWC" else y
        yr = (x.astype(np.float64) - mean_truth[:, None, None]) / np.sqrt(
            truth[:, None, None] + 1e-5)
        assert np.abs(yc - yr).max() < 1e-2


def test_functional_batch_var_float64_result(rng):
    x = _data(rng, (8, 4, 32))
    res = sbn.functional.batch_norm_forward(x, data_format="NCL", comm=NoCommunicator())
    truth = x.astype(np.float64).var(axis=(0, 2))
    assert (np.abs(res.batch_var - truth) / truth).max() < 1e-3


def test_larger_offset_still_accurate(rng):
    # Mean 1e5, std 1: float32 spacing at 1e5 is ~8e-3, so the data itself
    # is quantized; the variance of the quantized data must still be exact.
    x = _data(rng, (8, 2, 64), offset=1e5)
    layer = sbn.BatchNorm1D(2, momentum=0.0)
    layer(x)
    truth = x.astype(np.float64).var(axis=(0, 2))
    assert (np.abs(layer._variance - truth) / truth).max() < 1e-3


@pytest.mark.mpi
@pytest.mark.parametrize("k", [1, 2, 3, 4])  # 1: forced collectives
def test_multi_rank_variance(mpi_job, k):
    # Uneven splits with an empty rank, three steps (first pass and steady state).
    check_group(mpi_job("oracle", k), "stability", min_count=3)
