"""The reproducible mode's per-sample path: its canonical order, exactness and ports (#21).

:mod:`cupysyncbn.backends.exact_samples` sums within a sample in a fixed
order (16 lanes for channel-first rows, tiles of rows for channel-last) and
folds the per-sample partials exactly. Checked here against independent
definitions: the orders written out as plain Python loops, the statistics
against ``fractions.Fraction``; the numba backend against the NumPy
reference, byte for byte (the CUDA kernels:
``test_exact_kernels_emulated.py``).
"""

from fractions import Fraction

import numpy as np
import pytest

from cupysyncbn.backends import exact_samples as xs
from cupysyncbn.backends import exact_sums as es
from cupysyncbn.backends.numba import exact as nx


def _lane_loop(row):
    """The channel-first order of the module docstring, one float at a time."""
    s = len(row)
    full = s - s % 16
    rest = full + (8 if s - full >= 8 else 0)
    lanes = [0.0] * 16
    for t in range(rest):
        lanes[t % 16] = float(np.float64(lanes[t % 16]) + np.float64(row[t]))
    tail = 0.0
    for t in range(rest, s):
        tail = float(np.float64(tail) + np.float64(row[t]))
    v = [lanes[i] + lanes[i + 8] for i in range(8)]
    w = [v[i] + v[i + 4] for i in range(4)]
    u = [w[i] + w[i + 2] for i in range(2)]
    return (u[0] + u[1]) + tail


def _tile_loop(col):
    total = 0.0
    for t0 in range(0, len(col), xs.TILE_ROWS):
        part = 0.0
        for v in col[t0 : t0 + xs.TILE_ROWS]:
            part += float(v)
        total += part
    return total


@pytest.mark.parametrize("s", [1, 7, 8, 9, 15, 16, 17, 23, 24, 25, 40, 49, 130])
def test_within_sample_orders_are_the_documented_loops(rng, s):
    t = rng.standard_normal((3, 2, s)) * 10.0 ** rng.integers(-8, 9, (3, 2, s))
    got = xs.lane_sums(t)
    for i in range(3):
        for j in range(2):
            assert got[i, j] == _lane_loop(list(t[i, j]))
    cl = np.ascontiguousarray(t.transpose(0, 2, 1))  # (n, S, C)
    got = xs.tile_sums(cl)
    for i in range(3):
        for j in range(2):
            assert got[i, j] == _tile_loop(list(cl[i, :, j]))


def _stats_exact(x):
    vals = [Fraction(float(v)) for v in x.ravel()]
    m = sum(vals) / len(vals)
    return m, sum((v - m) ** 2 for v in vals) / len(vals)


@pytest.mark.parametrize("offset", [0.0, 1e4, -3e7])
@pytest.mark.parametrize("dt", [np.float32, np.float64])
def test_identity_gives_the_statistics_to_the_last_place(rng, offset, dt):
    # per-sample shifts far apart and far from the mean: the exact identity
    # (not a merge of rounded means) keeps the variance exact to rounding
    x = (rng.standard_normal((9, 1, 37)) + offset
         + rng.integers(-3, 4, (9, 1, 1)) * 1e3).astype(dt)
    s, a, b = xs.sample_moments(x, False, 9)
    g = xs.grids(*xs.local_bounds((s, a, b), 1))
    k = es.folds_for(dt)
    mean, var = xs.finalize_sample_moments(xs.fold_moments(s, a, b, g, k), g, 37, 9 * 37)
    m, v = _stats_exact(x)
    assert abs(Fraction(mean[0]) - m) <= abs(m) * Fraction(2.0**-52) + Fraction(1, 10**300)
    assert abs(Fraction(var[0]) - v) <= v * Fraction(2.0**-44)


def _same(a, b):
    a, b = np.asarray(a), np.asarray(b)
    assert a.shape == b.shape and a.dtype == b.dtype
    assert a.tobytes() == b.tobytes()


@pytest.mark.parametrize("dt", [np.float32, np.float64])
@pytest.mark.parametrize("channel_last", [False, True], ids=["cf", "cl"])
@pytest.mark.parametrize("s", [1, 8, 17, 49, 130])
def test_numba_gives_the_reference_bits(rng, dt, channel_last, s):
    n, c = 3, 21  # 21 channels: a register block of 16 and 5 one by one
    x = rng.standard_normal((n, c, s)) * 10.0 ** rng.integers(-3, 4, (n, c, s)) + 50
    x[:, 1] = 0.0  # a zero channel
    x[0, 2, :] = 7.0  # a constant sample
    x = x.astype(dt)
    dy = rng.standard_normal(x.shape).astype(dt)
    if channel_last:
        x = np.ascontiguousarray(x.transpose(0, 2, 1)).reshape(n * s, c)
        dy = np.ascontiguousarray(dy.transpose(0, 2, 1)).reshape(n * s, c)
    cdt = np.dtype(dt)
    mean = (rng.standard_normal(c) * 5 + 50).astype(cdt)
    ref = xs.sample_moments(x, channel_last, n)
    for a, b in zip(ref, nx.sample_moments(x, channel_last, n)):
        _same(a, b)
    for a, b in zip(xs.sample_backward(dy, x, channel_last, mean, n),
                    nx.sample_backward(dy, x, channel_last, mean, n)):
        _same(a, b)
    eb = xs.local_bounds(ref, c)
    for a, b in zip(eb, nx.local_bounds(ref, c)):
        _same(a, b)
    g = xs.grids(*eb)
    k = es.folds_for(cdt)
    p = xs.fold_moments(*ref, g, k)
    _same(p, nx.fold_moments(*ref, g, k))
    for a, b in zip(xs.finalize_sample_moments(p, g, s, n * s),
                    nx.finalize_sample_moments(p, g, s, n * s)):
        _same(a, b)
    parts = xs.sample_backward(dy, x, channel_last, mean, n)
    e = xs.local_bounds(parts, c)
    _same(xs.fold_sums(parts, e, k), nx.fold_sums(parts, e, k))


def test_folds_of_partials_do_not_depend_on_how_samples_are_grouped(rng):
    x = (rng.standard_normal((11, 3, 20)) * 100 + 1e5).astype(np.float32)
    s, a, b = xs.sample_moments(x, False, 11)
    g = xs.grids(*xs.local_bounds((s, a, b), 3))
    whole = xs.fold_moments(s, a, b, g, 3)
    for cut in (1, 4, 10):
        parts = [xs.fold_moments(s[sl], a[sl], b[sl], g, 3)
                 for sl in (slice(0, cut), slice(cut, 11))]
        _same(whole, parts[1] + parts[0])


def test_safe_range_and_sentinels():
    e = np.array([0.0, 10.0])
    assert xs.safe(e, e, e)
    empty = np.full(2, es.EMPTY_EXP)
    assert xs.safe(empty, empty, empty)  # all-zero channels
    assert xs.safe(e, e, empty)  # every sample starts with 0 (ReLU outputs, padding)
    assert not xs.safe(empty, np.array([-600.0, 0.0]), empty)  # squares underflowed
    assert not xs.safe(empty, empty, np.array([-500.0, 3.0]))  # tiny shifts
    assert not xs.safe(e, e, np.array([471.0, 3.0]))  # a square could overflow
    assert not xs.safe(np.array([es.NONFINITE_EXP, 0.0]), e, e)
    assert xs.backward_safe(e, empty) and not xs.backward_safe(e + 961, e)
    g = xs.grids(e, empty, e)
    assert list(g[:, 1]) == [10.0, es.EMPTY_EXP, 10.0, 20.0, es.EMPTY_EXP]
