"""The reproducible mode's reference primitives (backends/exact_sums) against exact arithmetic.

References are Python ``fractions.Fraction`` sums of the same float64 values:
exact rationals, so "equal" means equal, and the truncation bounds are the
documented ones.
"""

from fractions import Fraction

import ml_dtypes
import numpy as np
import pytest

from cupysyncbn.backends import exact_sums as xs

B = xs.FOLD_BITS


def _exact(values):
    return sum((Fraction(float(v)) for v in np.ravel(values)), Fraction(0))


def _e(v, channel_last=False):
    return xs.scale_exponent(xs.bound_exponent(xs.absmax(v, channel_last), v.shape[1]))


@pytest.mark.parametrize("k", [3, 5])
def test_folds_are_an_exact_split_of_the_scaled_values_down_to_the_last_grid(rng, k):
    x = rng.standard_normal((7, 2, 9)) * np.array([1e3, 1e-5])[None, :, None] + 5.0
    e = _e(x)
    p1, p2 = xs.moment_folds(x, False, e, k)
    for c in range(2):
        z = [Fraction(float(v)) * Fraction(2) ** int(-e[c]) for v in x[:, c].ravel()]
        total = sum((Fraction(float(p)) for p in p1[:, c]), Fraction(0))
        err = abs(total - sum(z))
        assert err <= len(z) * Fraction(1, 2 ** (k * B + 1))  # documented truncation
        # each fold is a multiple of its grid u_k = 2^(-k*B)
        for j in range(k):
            assert (Fraction(float(p1[j, c])) / Fraction(1, 2 ** ((j + 1) * B))).denominator == 1
        sq = sum((Fraction(float(p)) for p in p2[:, c]), Fraction(0))
        assert abs(sq - sum(v * v for v in z)) <= 3 * len(z) * Fraction(1, 2 ** (k * B + 1))


def test_every_partial_sum_is_exact_so_any_split_gives_the_same_bits(rng):
    x = rng.standard_normal((40, 3, 5)) * 1e4 + 1e6
    e = _e(x)
    whole = xs.moment_folds(x, False, e, 3)
    order = rng.permutation(40)
    for cuts in ([13, 27], [1, 2, 39], [20]):
        parts = np.split(x[order], cuts)
        acc = [np.zeros_like(w) for w in whole]
        for part in parts:
            for a, p in zip(acc, xs.moment_folds(part, False, e, 3)):
                a += p
        for a, w in zip(acc, whole):
            assert a.tobytes() == w.tobytes()


def test_channel_last_and_channel_first_deposit_the_same_folds(rng):
    x = rng.standard_normal((6, 4, 7)).astype(np.float32)
    cl = np.ascontiguousarray(x.transpose(0, 2, 1)).reshape(-1, 4)
    e = _e(x)
    assert np.array_equal(e, _e(cl, True))
    for a, b in zip(xs.moment_folds(x, False, e, 3), xs.moment_folds(cl, True, e, 3)):
        assert a.tobytes() == b.tobytes()


def test_square_split_is_exact_and_agrees_with_the_plain_square_on_narrow_data(rng):
    z = rng.uniform(-1, 1, 200)
    parts = xs.square_parts(z, True)
    for i, v in enumerate(z):
        assert sum(Fraction(float(p[i])) for p in parts) == Fraction(float(v)) ** 2
    z32 = rng.uniform(-1, 1, 200).astype(np.float32).astype(np.float64)
    hh, mid, lo = xs.square_parts(z32, True)
    assert np.array_equal(hh, xs.square_parts(z32, False)[0])
    assert not mid.any() and not lo.any()


def test_error_free_transformations_are_exact(rng):
    a = rng.standard_normal(100) * 10.0 ** rng.integers(-30, 30, 100)
    b = rng.standard_normal(100) * 10.0 ** rng.integers(-30, 30, 100)
    s, e = xs.two_sum(a, b)
    p, f = xs.two_prod(a, b)
    big = np.maximum(np.abs(a), np.abs(b))
    hs, hl = xs.fast_two_sum(big, np.minimum(np.abs(a), np.abs(b)))
    for i in range(100):
        fa, fb = Fraction(float(a[i])), Fraction(float(b[i]))
        assert Fraction(float(s[i])) + Fraction(float(e[i])) == fa + fb
        assert Fraction(float(p[i])) + Fraction(float(f[i])) == fa * fb
        assert Fraction(float(hs[i])) + Fraction(float(hl[i])) == abs(fa) + abs(fb)


def test_dd_from_folds_and_division_are_double_double_accurate(rng):
    p = np.stack([rng.integers(-2**50, 2**50, 20) * 2.0 ** (-(k + 1) * B) for k in range(5)])
    hi, lo = xs.dd_from_folds(p)
    qh, ql = xs.dd_div(hi, lo, 7.0)
    for c in range(20):
        exact = sum(Fraction(float(v)) for v in p[:, c])
        got = Fraction(float(hi[c])) + Fraction(float(lo[c]))
        assert abs(got - exact) <= abs(exact) * Fraction(1, 2**104)
        assert float(hi[c]) == float(exact)  # hi is the sum rounded to float64
        q = Fraction(float(qh[c])) + Fraction(float(ql[c]))
        assert abs(q - exact / 7) <= abs(exact / 7) * Fraction(1, 2**102)


@pytest.mark.parametrize("dt,offset", [
    (np.float32, 0.0), (np.float32, 1e4), (np.float64, 1e4), (np.float64, 1e8),
    (ml_dtypes.bfloat16, 3.0), (np.float16, 100.0),
])
def test_finalized_mean_and_var_are_correctly_rounded_or_close(rng, dt, offset):
    """Against the exact mean/var of the (float64-widened) data: mean within 1 ulp,
    var relative error below what the folds and double-double guarantee."""
    x = (rng.standard_normal((50, 3, 4)) + offset).astype(dt)
    v = x.astype(np.float64)
    k = xs.folds_for(np.float64 if dt == np.float64 else np.float32)
    e_glob = xs.bound_exponent(xs.absmax(x, False), 3)
    p1, p2 = xs.moment_folds(x, False, xs.scale_exponent(e_glob), k)
    mean, var = xs.finalize_moments(p1, p2, 200, e_glob)
    for c in range(3):
        vals = [Fraction(float(t)) for t in v[:, c].ravel()]
        m = sum(vals) / len(vals)
        var_ref = sum((t - m) ** 2 for t in vals) / len(vals)
        assert abs(Fraction(float(mean[c])) - m) <= abs(m) * Fraction(1, 2**52)
        scale = Fraction(2) ** int(2 * e_glob[c])
        bound = var_ref * Fraction(1, 2**50) + scale * Fraction(1, 2 ** (k * B - 4))
        assert abs(Fraction(float(var[c])) - var_ref) <= bound


def test_sentinels_empty_zero_and_non_finite_channels():
    x = np.array([[0.0, np.nan, np.inf, 3.0], [0.0, 1.0, 2.0, -5.0]])
    a = xs.absmax(x, True)
    e = xs.bound_exponent(a, 4)
    assert e[0] == xs.EMPTY_EXP and e[1] == xs.NONFINITE_EXP and e[2] == xs.NONFINITE_EXP
    assert e[3] == 3.0  # 5 < 2**3
    assert np.array_equal(xs.bound_exponent(None, 2), [xs.EMPTY_EXP] * 2)
    p1, p2 = xs.moment_folds(x, True, xs.scale_exponent(e), 3)
    mean, var = xs.finalize_moments(p1, p2, 2, e)
    assert mean[0] == 0 and var[0] == 0
    assert np.isnan(mean[1:3]).all() and np.isnan(var[1:3]).all()
    assert mean[3] == -1.0 and var[3] == 16.0
    assert xs.finalize_sum(p1, e)[3] == -2.0


def test_subnormal_data_scale_exactly(rng):
    x = (rng.standard_normal((8, 2)) * 2.0**-1060).astype(np.float64)
    e = _e(x, True)
    assert e.min() < -1022
    z = xs.scaled(x, e, None)
    for v, w, c in zip(x.ravel(), z.ravel(), [0, 1] * 8):
        assert Fraction(float(w)) == Fraction(float(v)) * Fraction(2) ** int(-e[c])
    p1, p2 = xs.moment_folds(x, True, e, 5)
    mean, _ = xs.finalize_moments(p1, p2, 8, xs.bound_exponent(xs.absmax(x, True), 2))
    np.testing.assert_allclose(mean, x.mean(axis=0), rtol=1e-12, atol=0)


def test_backward_folds_are_exact_sums_of_the_documented_products(rng):
    x = rng.standard_normal((9, 2, 3)).astype(np.float32)
    dy = rng.standard_normal((9, 2, 3)).astype(np.float32)
    mean = np.array([0.25, -1.5], np.float32)
    ag, ah = xs.backward_bounds(dy, x, False, mean)
    eg, eh = (xs.scale_exponent(xs.bound_exponent(a, 2)) for a in (ag, ah))
    pg, ph = xs.backward_folds(dy, x, False, mean, eg, eh, 3)
    sg, sh = xs.finalize_sum(pg, eg), xs.finalize_sum(ph, eh)
    for c in range(2):
        g = dy[:, c].astype(np.float64).ravel()
        h = g * (x[:, c].astype(np.float64).ravel() - np.float64(mean[c]))
        assert ag[c] == np.abs(g).max() and ah[c] == np.abs(h).max()
        assert sg[c] == float(_exact(g)) and sh[c] == float(_exact(h))


def test_count_limit_is_a_clear_error():
    xs.check_count(xs.MAX_COUNT)
    with pytest.raises(ValueError, match="reproducible=True supports at most"):
        xs.check_count(xs.MAX_COUNT + 1)


def test_sigmas_and_folds_for_are_the_documented_constants():
    assert xs.sigmas(2) == [1.5 * 2.0 ** (52 - B), 1.5 * 2.0 ** (52 - 2 * B)]
    assert xs.folds_for(np.float32) * B == 78 and xs.folds_for(np.float64) * B == 130


@pytest.mark.parametrize("dt", [np.float32, np.float64, np.float16])
@pytest.mark.parametrize("channel_last", [False, True])
def test_numba_loops_give_the_reference_bits(rng, dt, channel_last):
    from cupysyncbn.backends.numba import exact as nx

    shape = (5, 7) if channel_last else (4, 3, 6)
    c = shape[1]
    x = (rng.standard_normal(shape) * 10.0 ** rng.integers(-3, 4, shape) + 7).astype(dt)
    dy = rng.standard_normal(shape).astype(dt)
    x.flat[3] = 0.0
    if dt == np.float64:
        x.flat[5] = 2.0**-1070  # a subnormal: the two-step scaling path
    cdt = np.dtype(np.float64 if dt == np.float64 else np.float32)
    k = xs.folds_for(cdt)
    mean = (rng.standard_normal(c) * 3).astype(cdt)
    e = xs.scale_exponent(xs.bound_exponent(xs.absmax(x, channel_last), c))
    e[0] = -1070.0 if dt == np.float64 else e[0]
    for a, b in zip(xs.moment_folds(x, channel_last, e, k), nx.moment_folds(x, channel_last, e, k)):
        assert a.tobytes() == b.tobytes()
    for a, b in zip(xs.backward_bounds(dy, x, channel_last, mean),
                    nx.backward_bounds(dy, x, channel_last, mean)):
        assert a.tobytes() == b.tobytes()
    eg = e + 1
    for a, b in zip(xs.backward_folds(dy, x, channel_last, mean, eg, e, k),
                    nx.backward_folds(dy, x, channel_last, mean, eg, e, k)):
        assert a.tobytes() == b.tobytes()
    sc, bi = (rng.standard_normal(c).astype(cdt) for _ in range(2))
    for out in (dt, cdt):
        assert (xs.normalize(x, channel_last, mean, sc, bi, out).tobytes()
                == nx.normalize(x, channel_last, mean, sc, bi, out).tobytes())
        assert (xs.backward_elemt(dy, x, channel_last, mean, sc, bi, sc, out).tobytes()
                == nx.backward_elemt(dy, x, channel_last, mean, sc, bi, sc, out).tobytes())


def test_numba_bounds_see_nan_and_inf(rng):
    from cupysyncbn.backends.numba import exact as nx

    for channel_last in (False, True):
        x = np.ones((3, 2, 4) if not channel_last else (6, 2))
        dy = np.ones_like(x)
        dy.flat[0] = np.nan
        dy.flat[-1] = np.inf
        got = nx.backward_bounds(dy, x, channel_last, np.zeros(2))
        assert np.isnan(got[0][0]) and got[0][1] == np.inf
