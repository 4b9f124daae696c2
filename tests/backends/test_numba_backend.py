"""The fused CPU backend (numba; the default CPU backend when importable).

Primitive by primitive against the NumPy backend and float64 references, on
all 7 data formats and float16/32/64, plus edge channels (one element, NaN,
short rows over several pieces), an empty batch through the functional layer,
the selection rules (default, opt-out, numba missing or broken), the on-disk
kernel cache (a second process compiles nothing), both CPU backends end to
end on every format, and one 3-rank mpiexec training step (uneven split, one
empty rank) on both backends against a float64 reference on the global batch.

Skipped entirely without numba: then every other test of the suite runs on the
NumPy backend anyway.
"""

from __future__ import annotations

import math
import sys
import warnings

import numpy as np
import pytest

pytest.importorskip("numba")

import cupysyncbn.backends as backends  # noqa: E402
from cupysyncbn import functional as F  # noqa: E402
from cupysyncbn.arrays.formats import FORMATS, canonical_view  # noqa: E402
from cupysyncbn.backends.numba.backend import BACKEND as NB  # noqa: E402
from cupysyncbn.backends.numba.backend import NumbaBackend  # noqa: E402
from cupysyncbn.backends.numpy import BACKEND as NP  # noqa: E402
from cupysyncbn.backends.numpy import NumpyBackend  # noqa: E402

F64 = np.float64
DTYPES = ("float16", "float32", "float64")

# One shape per format, chosen to hit the kernels' edges: channel-first rows
# longer than PIECE (NCL) and with scalar tails after the vector steps (NCHW, NCDHW);
# channel-last inputs over several row blocks (NC) and odd channel counts.
SHAPES = {
    "NC": (70000, 2),
    "NCL": (2, 3, 4200),
    "NCHW": (4, 5, 9, 11),
    "NCDHW": (2, 3, 4, 5, 6),
    "NLC": (4, 50, 5),
    "NHWC": (3, 9, 11, 5),
    "NDHWC": (2, 4, 5, 6, 3),
}
# Channel-last rows of WIDE channels or more: one kernel call per primitive, no
# regrouping (the shapes above regroup rows and have rows left over).
WIDE_CL = ("NHWC", (3, 5, 7, 300))


def _cdt(dt: str) -> np.dtype:
    return np.dtype(F64 if dt == "float64" else np.float32)


def _tol(dt: str) -> float:
    """Relative tolerance of a compute-dtype result (a few ulps, float32 for halves)."""
    return 1e-13 if dt == "float64" else 2e-6


def _data(shape, dt, fmt, rng, offset):
    x = (rng.standard_normal(shape) * 2.0 + offset).astype(dt)
    dy = rng.standard_normal(shape).astype(dt)
    f = FORMATS[fmt]
    return canonical_view(x, f), canonical_view(dy, f), f.channel_last


def _per_channel(a, cl):
    """``(C, count)`` contiguous float64 copy: one row per channel, so NumPy's
    reductions along it are pairwise (accurate enough for a reference)."""
    a = a.astype(F64)
    return np.ascontiguousarray(a.T if cl else a.transpose(1, 0, 2).reshape(a.shape[1], -1))


def _fsum_rows(a):
    """``math.fsum`` of each row of a 2-D float64 array: exact sums, the reference."""
    return np.array([math.fsum(r) for r in a])


def _fsum_moments(xc):
    """Exact per-row mean and M2 of a ``(C, count)`` float64 array (``math.fsum``)."""
    mean = _fsum_rows(xc) / xc.shape[1]
    return mean, _fsum_rows((xc - mean[:, None]) ** 2)


def _close_out(got, want, scale, dt, what):
    """Elementwise outputs: within a few ulps of the output dtype of ``scale``."""
    assert got.dtype == want.dtype == np.dtype(dt), what
    ulp = float(np.finfo(dt).eps)
    err = np.abs(got.astype(F64) - want.astype(F64))
    lim = 4 * ulp * (np.abs(want.astype(F64)) + scale) + 4 * _tol(dt) * scale
    assert np.all(err <= lim), f"{what}: worst excess {np.max(err - lim):.3g}"


@pytest.mark.parametrize("dt", DTYPES)
@pytest.mark.parametrize("fmt,shape", [*SHAPES.items(), WIDE_CL], ids=[*SHAPES, "NHWC-wide"])
def test_primitives_match_numpy_backend(fmt, shape, dt, rng):
    offset = 50.0 if dt == "float16" else 1e3  # a large mean: subtract-first matters
    x, dy, cl = _data(shape, dt, fmt, rng, offset)
    cdt, tol = _cdt(dt), _tol(dt)
    xc = _per_channel(x, cl)
    c, cnt = xc.shape

    # moments: both backends against the float64 two-pass reference
    mean_n, m2_n = NB.moments(x, cl, cdt)
    mean_p, m2_p = NP.moments(x, cl, cdt)
    ref_mean = _fsum_rows(xc) / cnt
    ref_m2 = ((xc - ref_mean[:, None]) ** 2).sum(axis=1)
    std = np.sqrt(ref_m2 / cnt)
    assert mean_n.dtype == m2_n.dtype == F64 and mean_n.shape == (c,)
    assert np.all(np.abs(mean_n - ref_mean) <= 1e-15 * np.abs(ref_mean) + 1e-13 * std)
    assert np.all(np.abs(m2_n - ref_m2) <= 1e-12 * ref_m2)  # float64 all the way
    assert np.all(np.abs(mean_n - mean_p) <= tol * (np.abs(ref_mean) + std))
    assert np.all(np.abs(m2_n - m2_p) <= 5 * tol * ref_m2)

    mean = mean_p.astype(cdt)
    scale = rng.uniform(0.5, 2.0, c).astype(cdt)
    bias = rng.standard_normal(c).astype(cdt)
    dev = np.abs(xc - mean.astype(F64)[:, None]).max(axis=1)

    # normalize
    y_n = NB.normalize(x, cl, mean, scale, bias, x.dtype)
    y_p = NP.normalize(x, cl, mean, scale, bias, x.dtype)
    mag = float((dev * np.abs(scale) + np.abs(bias)).max())
    _close_out(y_n, y_p, mag, dt, "normalize")
    if cl:  # same operation order as the NumPy channel-last path: bitwise equal
        assert np.array_equal(y_n, y_p)

    # backward_reduce: float64 sums, vs NumPy and a float64 reference
    invstd = (1.0 / std).astype(cdt)
    s_n, p_n = NB.backward_reduce(dy, x, cl, mean, invstd)
    s_p, p_p = NP.backward_reduce(dy, x, cl, mean, invstd)
    dyc = _per_channel(dy, cl)
    xm = (xc.astype(cdt) - mean[:, None]).astype(F64)  # x - mean in the compute dtype
    ref_s = _fsum_rows(dyc)
    ref_p = _fsum_rows(dyc * xm) * invstd.astype(F64)
    abs_s = np.abs(dyc).sum(axis=1)
    abs_p = (np.abs(dyc * xm)).sum(axis=1) * invstd.astype(F64)
    assert s_n.dtype == p_n.dtype == F64
    assert np.all(np.abs(s_n - ref_s) <= 1e-14 * abs_s)
    assert np.all(np.abs(p_n - ref_p) <= 1e-14 * abs_p)
    assert np.all(np.abs(s_n - s_p) <= tol * abs_s)
    assert np.all(np.abs(p_n - p_p) <= tol * abs_p)

    # backward_elemt
    a = (scale * invstd).astype(cdt)
    mdy = (s_p / cnt).astype(cdt)
    b = (a * (p_p / cnt) * invstd).astype(cdt)
    dx_n = NB.backward_elemt(dy, x, cl, mean, a, mdy, b, x.dtype)
    dx_p = NP.backward_elemt(dy, x, cl, mean, a, mdy, b, x.dtype)
    dymax = np.abs(dyc - mdy.astype(F64)[:, None]).max(axis=1)
    mag = float((np.abs(a) * dymax + np.abs(b) * dev).max())
    _close_out(dx_n, dx_p, mag, dt, "backward_elemt")
    if cl:
        assert np.array_equal(dx_n, dx_p)


@pytest.mark.parametrize("dt", DTYPES)
@pytest.mark.parametrize("fmt", ["NCHW", "NHWC"])
def test_one_element_and_nan_channels(fmt, dt):
    cl = FORMATS[fmt].channel_last
    cdt = _cdt(dt)
    # one element per channel: mean is that element, M2 exactly 0
    x1 = np.array([3.5, -1.25, 7.0], dtype=dt).reshape((1, 1, 1, 3) if cl else (1, 3, 1, 1))
    v1 = canonical_view(x1, FORMATS[fmt])
    mean, m2 = NB.moments(v1, cl, cdt)
    assert np.array_equal(mean, [3.5, -1.25, 7.0]) and np.array_equal(m2, [0.0, 0.0, 0.0])
    ones = np.ones(3, cdt)
    y = NB.normalize(v1, cl, mean.astype(cdt), ones, ones, x1.dtype)
    assert np.array_equal(y.ravel(), [1.0, 1.0, 1.0])

    # a NaN in channel 1 poisons that channel only, as in the NumPy backend
    rng = np.random.default_rng(7)
    shape = (2, 5, 6, 3) if cl else (2, 3, 5, 6)
    x = rng.standard_normal(shape).astype(dt)
    if cl:
        x[1, 2, 3, 1] = np.nan
    else:
        x[1, 1, 2, 3] = np.nan
    v = canonical_view(x, FORMATS[fmt])
    mean_n, m2_n = NB.moments(v, cl, cdt)
    mean_p, m2_p = NP.moments(v, cl, cdt)
    for got, want in ((mean_n, mean_p), (m2_n, m2_p)):
        assert np.isnan(got[1]) and np.isnan(want[1])
        assert np.all(np.isfinite(got[[0, 2]]))
        np.testing.assert_allclose(got[[0, 2]], want[[0, 2]], rtol=_tol(dt) * 5)
    m = np.nan_to_num(mean_p).astype(cdt)
    y = NB.normalize(v, cl, m, ones, ones * 0, x.dtype)
    yc = _per_channel(y, cl)
    assert np.isnan(yc[1]).sum() == 1 and np.all(np.isfinite(yc[[0, 2]]))
    s, p = NB.backward_reduce(v, v, cl, m, ones)
    assert np.isnan(s[1]) and np.isnan(p[1]) and np.all(np.isfinite(s[[0, 2]]))


def test_float16_rounding_matches_numpy():
    # every float16 pattern through the table, and float32 values around every
    # rounding boundary (ties, subnormals, overflow, inf, nan) back to float16
    h = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16).view(np.float16)
    one = np.ones(1, np.float32)
    zero = np.zeros(1, np.float32)
    y = NB.normalize(h.reshape(-1, 1), True, zero, one, zero, np.float16)
    assert np.array_equal(y.view(np.uint16), h.view(np.uint16)) or np.array_equal(
        y.ravel(), h, equal_nan=True
    )
    f = h[np.isfinite(h)].astype(np.float32)
    with np.errstate(over="ignore"):
        nxt = np.nextafter(f.astype(np.float16), np.float16(np.inf)).astype(np.float32)
    mids = (f.astype(F64) + nxt.astype(F64)) / 2  # exact ties (float32 holds them)
    probe = np.concatenate([
        mids.astype(np.float32), np.nextafter(mids.astype(np.float32), np.float32(np.inf)),
        np.nextafter(mids.astype(np.float32), np.float32(-np.inf)),
        np.array([65504, 65519.99, 65520, 1e6, -1e6, 2.0**-25, 2.0**-24, 3e-8, np.inf,
                  -np.inf, np.nan], np.float32),
    ])
    probe = probe[~np.isnan(probe) | (np.arange(probe.size) == probe.size - 1)]
    x = probe.reshape(-1, 1)
    with np.errstate(over="ignore"):
        want = x.astype(np.float16)
    # float32 input, float16 output: only reachable through the kernels' store
    from cupysyncbn.backends.numba import backend as nbm

    got = np.empty(x.shape, np.float16)
    nbm._normalize_cl(x, nbm._NO_TABLE, zero, one, zero, got.view(np.uint16), None)
    assert np.array_equal(got, want, equal_nan=True)

    # the portable integer rounding (used on CPUs without F16C) on the same probes
    import numba

    @numba.njit
    def portable(a, o):
        for i in range(a.size):
            o[i] = nbm._half_bits(a[i])

    got = np.empty(probe.size, np.float16)
    portable(probe, got.view(np.uint16))
    assert np.array_equal(got, want.ravel(), equal_nan=True)
    assert np.array_equal(nbm._F16_TABLE[h.view(np.uint16)], h.astype(np.float32),
                          equal_nan=True)


def test_selection_by_environment(monkeypatch):
    x = np.zeros((2, 3), np.float32)
    monkeypatch.setattr(backends, "_CPU", {})
    monkeypatch.delenv(backends.CPU_BACKEND_ENV, raising=False)
    assert type(backends.get_backend(x)) is NumbaBackend  # default: numba when importable
    for value, cls in (("auto", NumbaBackend), ("numba", NumbaBackend), (" NumPy ", NumpyBackend)):
        monkeypatch.setenv(backends.CPU_BACKEND_ENV, value)
        assert type(backends.get_backend(x)) is cls, value
    # same arrays, name and module whichever CPU backend runs
    monkeypatch.setenv(backends.CPU_BACKEND_ENV, "numba")
    assert backends.get_backend(x).name == "numpy" and backends.get_backend(x).xp is np
    # an unknown value warns once and means 'auto'
    monkeypatch.setenv(backends.CPU_BACKEND_ENV, "fortran")
    _warns_once(x, NumbaBackend, "'fortran' is not one of auto, numba, numpy")


def _warns_once(x, cls, match):
    """``get_backend(x)`` is ``cls``: one RuntimeWarning matching ``match`` the
    first time, none after."""
    with pytest.warns(RuntimeWarning, match=match):
        assert type(backends.get_backend(x)) is cls
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert type(backends.get_backend(x)) is cls  # warned once only


def test_selection_without_numba(monkeypatch):
    """numba not installed: 'auto' falls back silently, 'numba' warns once."""
    x = np.zeros((2, 3), np.float32)
    monkeypatch.setattr(backends, "_CPU", {})
    monkeypatch.delitem(sys.modules, "cupysyncbn.backends.numba.backend")
    monkeypatch.setitem(sys.modules, "numba", None)  # import numba -> ModuleNotFoundError
    monkeypatch.delenv(backends.CPU_BACKEND_ENV, raising=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert type(backends.get_backend(x)) is NumpyBackend  # auto: no warning
    monkeypatch.setenv(backends.CPU_BACKEND_ENV, "numba")
    _warns_once(x, NumpyBackend, "numba is not importable.*cupysyncbn\\[fast\\]")


def test_selection_with_broken_numba(monkeypatch):
    """numba installed but failing (e.g. no writable cache): warn, use NumPy, never raise."""
    x = np.zeros((2, 3), np.float32)
    monkeypatch.setattr(backends, "_CPU", {})
    monkeypatch.delenv(backends.CPU_BACKEND_ENV, raising=False)

    class Broken:
        def __getattr__(self, name):
            raise RuntimeError("cannot cache function: no locator available")

    monkeypatch.setitem(sys.modules, "cupysyncbn.backends.numba.backend", Broken())
    with pytest.warns(RuntimeWarning, match="could not start.*no locator"):
        assert type(backends.get_backend(x)) is NumpyBackend


def test_functional_empty_batch_and_fallback_dtype(monkeypatch):
    monkeypatch.setattr(backends, "_CPU", {})
    monkeypatch.setenv(backends.CPU_BACKEND_ENV, "numba")
    rm, rv = np.full(3, 0.5, np.float32), np.full(3, 2.0, np.float32)
    x = np.zeros((0, 3, 4, 4), np.float32)
    res = F.batch_norm_forward(x, None, None, rm, rv, training=True)
    assert res.y.shape == x.shape and not res.updated
    assert np.array_equal(res.running_mean, rm) and np.array_equal(res.running_var, rv)
    assert isinstance(res.ctx.backend, NumbaBackend)
    dx, _, _ = F.batch_norm_backward(np.zeros_like(x), res.ctx)
    assert dx.shape == x.shape
    # a non-contiguous input is made contiguous by the functional layer and
    # still matches the float64 reference
    rng = np.random.default_rng(3)
    xs = rng.standard_normal((6, 3, 8, 8))[:, :, ::2, :]
    res = F.batch_norm_forward(xs, None, None, None, None, training=True)
    mean = xs.mean(axis=(0, 2, 3))
    var = xs.var(axis=(0, 2, 3))
    ref = (xs - mean[:, None, None]) / np.sqrt(var[:, None, None] + 1e-5)
    np.testing.assert_allclose(res.y, ref, rtol=1e-12, atol=1e-12)


# Shapes for the end-to-end comparison, one per format, small enough for the
# whole 7 formats x 3 dtypes x 2 backends grid to take a fraction of a second.
E2E = {"NC": (37, 3), "NCL": (5, 3, 41), "NCHW": (19, 4, 7, 7), "NCDHW": (3, 2, 3, 4, 5),
       "NLC": (5, 41, 3), "NHWC": (19, 7, 7, 4), "NDHWC": (3, 3, 4, 5, 2)}


@pytest.mark.parametrize("choice", ["numpy", "numba"])
@pytest.mark.parametrize("fmt", list(E2E))
def test_both_cpu_backends_end_to_end(fmt, choice, monkeypatch):
    """Both CPU backends through the functional layer against the float64 reference.

    The suite's other tests run on the default (numba); this keeps the NumPy
    backend, the fallback and reference, checked end to end on every format.
    """
    from support import bn_ref

    monkeypatch.setattr(backends, "_CPU", {})
    monkeypatch.setenv(backends.CPU_BACKEND_ENV, choice)
    rng = np.random.default_rng(11)
    c = E2E[fmt][bn_ref.channel_axis(fmt, len(E2E[fmt]))]
    w, b = rng.uniform(0.5, 2.0, c), rng.standard_normal(c)
    for dt, tol in (("float64", 1e-11), ("float32", 2e-5), ("float16", 2e-2)):
        x = (rng.standard_normal(E2E[fmt]) * 3 + 20).astype(dt)
        dy = rng.standard_normal(E2E[fmt]).astype(dt)
        res = F.batch_norm_forward(x, w.copy(), b.copy(), np.zeros(c), np.ones(c),
                                   training=True, data_format=fmt)
        want = NumbaBackend if choice == "numba" else NumpyBackend
        assert type(res.ctx.backend) is want
        dx, dw, db = F.batch_norm_backward(dy, res.ctx)
        yr, mean, var, m = bn_ref.ref_forward(x.astype(F64), fmt, w, b)
        dxr, dwr, dbr = bn_ref.ref_backward(x.astype(F64), dy.astype(F64), fmt, w)
        assert res.y.dtype == dx.dtype == np.dtype(dt)
        for got, ref, what in ((res.y, yr, "y"), (dx, dxr, "dx"), (dw, dwr, "dweight"),
                               (db, dbr, "dbias"), (res.running_mean, 0.1 * mean, "mean")):
            err = np.abs(np.asarray(got, F64) - ref).max() / np.abs(ref).max()
            assert err <= tol, (fmt, dt, choice, what, err)


def _check_cf_backward_reduce(x, dy, mf):
    """Channel-first ``backward_reduce`` (invstd 1) against exact sums: ``sum(dy)``
    and ``sum(dy * (x - mf))``, ``x - mf`` in float32 first."""
    c = x.shape[1]
    s_n, p_n = NB.backward_reduce(dy, x, False, mf, np.ones(c, np.float32))
    dyc = dy.astype(F64).transpose(1, 0, 2).reshape(c, -1)
    xm = (x - mf[:, None]).astype(F64).transpose(1, 0, 2).reshape(c, -1)
    np.testing.assert_allclose(s_n, _fsum_rows(dyc), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(p_n, _fsum_rows(dyc * xm), rtol=1e-12, atol=1e-9)


def test_small_rows_many_samples_match_reference(rng):
    """Channel-first rows shorter than SHORT: several groups per piece, several
    pieces per channel merged, a huge offset: moments exact."""
    from cupysyncbn.backends.numba import backend as nbm

    n = 3 * nbm.GROUP + 1
    cases = [(n, s) for s in (1, 7, 49, nbm.SHORT - 1)]
    # several pieces of PIECE values per channel, the last of them partial
    cases += [(2 * (nbm.PIECE // s) + 5, s) for s in (49, nbm.SHORT - 1)]
    for n, s in cases:
        x = (rng.standard_normal((n, 3, s)) + 1e4).astype(np.float32)
        mean, m2 = NB.moments(x, False, np.float32)
        xc = x.astype(F64).transpose(1, 0, 2).reshape(3, -1)
        ref_mean, ref_m2 = _fsum_moments(xc)
        np.testing.assert_allclose(mean, ref_mean, rtol=1e-15, atol=0)
        np.testing.assert_allclose(m2, ref_m2, rtol=1e-12, atol=0)
        dy = rng.standard_normal(x.shape).astype(np.float32)
        mf = ref_mean.astype(np.float32)
        _check_cf_backward_reduce(x, dy, mf)


def test_short_row_backward_reduce_sample_groups(rng):
    """The short-row backward reduction sums GROUP samples of a channel per
    vector loop: full groups and a partial one, row lengths with and without
    a scalar tail, a different mean per channel: sums exact to 1e-12."""
    from cupysyncbn.backends.numba import backend as nbm

    c = 5
    n = 2 * nbm.GROUP + 3
    for s in (1, 7, 16, 49):
        offs = np.arange(c, dtype=np.float32)[None, :, None] * 10.0
        x = (rng.standard_normal((n, c, s)) + offs).astype(np.float32)
        dy = rng.standard_normal(x.shape).astype(np.float32)
        mf = (np.arange(c) * 10.0 + 0.25).astype(np.float32)
        _check_cf_backward_reduce(x, dy, mf)


@pytest.mark.parametrize("dt", DTYPES)
def test_vector_row_sums_match_fsum(dt, rng):
    """The explicit-vector row sums (numba/simd.py) on every tail length (16-value
    steps, one 8-value step, scalars), sub-ranges of rows and several rows,
    against math.fsum in float64: d = x - c and dy * (x - m), m rounded to the
    compute dtype first."""
    from numba import njit

    from cupysyncbn.backends.numba.simd import HW_F16, dev_sums, dot_sums

    if dt == "float16" and not HW_F16:
        pytest.skip("float16 rows are summed by the NumPy backend without F16C")

    @njit
    def dev(x, i0, i1, j, t0, t1, c):
        return dev_sums(x, i0, i1, j, t0, t1, c)

    @njit
    def dot(x, dy, i0, i1, j, t0, t1, m):
        return dot_sums(x, dy, i0, i1, j, t0, t1, m, None)

    def bits(a):
        return a.view(np.uint16) if a.dtype == np.float16 else a

    cdt = _cdt(dt)
    for s in (1, 7, 8, 15, 16, 17, 24, 31, 33, 49, 100):
        x = (rng.standard_normal((3, 4, s)) + 2.0).astype(dt)
        dy = rng.standard_normal((3, 4, s)).astype(dt)
        t0 = 1 if s > 2 else 0
        c = float(x[1, 2, t0])
        a, b = dev(bits(x), 1, 3, 2, t0, s, c)
        d = x[1:3, 2, t0:].astype(F64) - c
        assert abs(a - math.fsum(d.ravel())) <= 1e-14 * (1 + np.abs(d).sum()), (s, a)
        assert abs(b - math.fsum((d * d).ravel())) <= 1e-14 * (1 + (d * d).sum()), (s, b)
        m = cdt.type(1.5)
        a, b = dot(bits(x), bits(dy), 0, 3, 3, t0, s, m)
        g = dy[:, 3, t0:].astype(F64)
        gx = g * (x[:, 3, t0:].astype(cdt) - m).astype(F64)
        assert abs(a - math.fsum(g.ravel())) <= 1e-14 * (1 + np.abs(g).sum()), (s, a)
        assert abs(b - math.fsum(gx.ravel())) <= 1e-14 * (1 + np.abs(gx).sum()), (s, b)


@pytest.mark.parametrize("dt", DTYPES)
def test_streamed_outputs_are_bitwise_the_plain_ones(dt, monkeypatch, rng):
    """y and dx written with streamed (non-temporal) stores are bitwise those
    of the plain loops, for every compute dtype, channel-first row lengths
    and channel-last widths that put channel or row boundaries anywhere in a
    line (plain head, streamed whole lines, plain tail)."""
    from cupysyncbn.backends.numba import backend as nbm

    if not nbm.STREAMS or (dt == "float16" and not nbm.HW_F16):
        pytest.skip("no streamed stores on this CPU")
    for cdt in {np.dtype(np.float64), _cdt(dt)}:
        for s in (1, 9, 32, 49, 100, 1031):
            x = (rng.standard_normal((3, 5, s)) * 3 + 1).astype(dt)
            dy = rng.standard_normal(x.shape).astype(dt)
            v = [rng.standard_normal(5).astype(cdt) for _ in range(4)]
            outs = []
            for limit in (1 << 62, 0):  # never, always (rows of at least a line)
                monkeypatch.setattr(nbm, "STREAM_MIN_BYTES", limit)
                assert nbm._stream(x, x) == (limit == 0 and s * x.itemsize >= 64)
                outs.append((NB.normalize(x, False, v[0], v[1], v[2], x.dtype).copy(),
                             NB.backward_elemt(dy, x, False, *v, x.dtype).copy()))
            for plain, *streamed in zip(*outs):
                for got in streamed:
                    assert plain.view(np.uint8).tobytes() == got.view(np.uint8).tobytes()
        # channel-last: a line holds the ends and starts of rows of any width
        for c in (1, 3, 16, 37, 2048, 2053):  # 2048: whole-line rows, tiled
            x = (rng.standard_normal((7, c)) * 3 + 1).astype(dt)[1:]  # off line boundaries
            dy = rng.standard_normal(x.shape).astype(dt)
            v = [rng.standard_normal(c).astype(cdt) for _ in range(4)]
            outs = []
            for limit in (1 << 62, 0):
                monkeypatch.setattr(nbm, "STREAM_MIN_BYTES", limit)
                assert nbm._stream_cl(x, x) == (limit == 0)
                outs.append((NB.normalize(x, True, v[0], v[1], v[2], x.dtype).copy(),
                             NB.backward_elemt(dy, x, True, *v, x.dtype).copy()))
            for plain, got in zip(*outs):
                assert plain.view(np.uint8).tobytes() == got.view(np.uint8).tobytes()


@pytest.mark.parametrize("dt", DTYPES)
def test_tiled_channel_last_lines_are_bitwise_the_plain_ones(dt, monkeypatch, rng):
    """Long channel-last rows written TILE_ROWS rows per channel offset give
    bitwise the plain loops' y and dx wherever the output starts in a line
    (every row then starts at that place too: the last row's last line would
    run past the end), for row counts below, at and past a tile."""
    from cupysyncbn.backends.numba import backend as nbm

    if not nbm.STREAMS or (dt == "float16" and not nbm.HW_F16):
        pytest.skip("no streamed stores on this CPU")
    monkeypatch.setattr(nbm, "STREAM_MIN_BYTES", 1 << 62)  # the reference: plain loops
    dt = np.dtype(dt)
    vw = 64 // dt.itemsize
    for cdt in {np.dtype(F64), _cdt(dt.name)}:
        c = nbm.TILE_MIN_BYTES // cdt.itemsize  # the shortest rows that are tiled
        for rows in (2, 4, 9):
            x = (rng.standard_normal((rows, c)) * 3 + 1).astype(dt)
            dy = rng.standard_normal(x.shape).astype(dt)
            v = [rng.standard_normal(c).astype(cdt) for _ in range(4)]
            want = (NB.normalize(x, True, v[0], v[1], v[2], dt).copy(),
                    NB.backward_elemt(dy, x, True, *v, dt).copy())
            m, a, md, b = (nbm._lines_ext(u, x) for u in v)
            for head in (0, 1, vw - 1):  # values before the output's first line boundary
                buf = np.full(x.nbytes + 128, 0xAB, np.uint8)  # bytes around out: a canary
                o = (-buf.ctypes.data) % 64 + (64 - head * dt.itemsize) % 64
                out = buf[o : o + x.nbytes].view(dt).reshape(x.shape)
                assert nbm._tiled(out, cdt)
                for bwd, params, ref in ((False, (m, a, m, md), want[0]),
                                         (True, (m, a, md, b), want[1])):
                    out[...] = np.nan
                    nbm._elemt_cl_stream(nbm._bits(dy), nbm._bits(x), nbm._table(x), *params,
                                         nbm._bits(out), bwd, True, None)
                    assert out.tobytes() == ref.tobytes(), (cdt, rows, head, bwd)
                    assert (buf[:o] == 0xAB).all() and (buf[o + x.nbytes :] == 0xAB).all()
        # vectors of less than TILE_MIN_BYTES, or rows that are not whole lines: one row at a time
        assert not nbm._tiled(np.empty((2, c // 2), dt), cdt)
        assert not nbm._tiled(np.empty((2, c + 1), dt), cdt)


def test_streamed_stores_only_for_large_outputs():
    from cupysyncbn.backends.numba import backend as nbm

    small = np.empty((4, 64, 56 * 56), np.float32)  # 3.2 MB
    tiny_rows = np.empty((16, 4096, 9), np.float32)  # 2.4 MB, 36-byte rows
    many_rows = np.empty((64, 4096, 9), np.float32)  # 9.4 MB, 36-byte rows
    short = np.empty((16, 2048, 49), np.float32)  # 6.4 MB, 196-byte rows
    large = np.empty((16, 64, 56 * 56), np.float32)  # 12.8 MB
    assert not nbm._stream(small, small)  # below STREAM_MIN_BYTES: stays in cache
    assert not nbm._stream(tiny_rows, tiny_rows)
    assert not nbm._stream(many_rows, many_rows)  # a line would span 2+ channels
    assert nbm._stream(short, short) == nbm._stream(large, large) == nbm.STREAMS


def test_float16_rows_without_f16c_use_numpy(monkeypatch, rng):
    """Without F16C (no vector half conversion) the float16 reductions of
    both layouts are the NumPy backend's, exactly."""
    from cupysyncbn.backends.numba import backend as nbm

    monkeypatch.setattr(nbm, "HW_F16", False)
    for cl, shape in ((False, (3, 4, 9)), (True, (27, 4)), (True, (5, 1027))):
        x = rng.standard_normal(shape).astype(np.float16)
        dy = rng.standard_normal(x.shape).astype(np.float16)
        c = shape[-1] if cl else shape[1]
        mean = np.full(c, 0.5, np.float32)
        ones = np.ones(c, np.float32)
        for got, want in zip(NB.moments(x, cl, np.float32), NP.moments(x, cl, np.float32)):
            assert np.array_equal(got, want)
        for got, want in zip(NB.backward_reduce(dy, x, cl, mean, ones),
                             NP.backward_reduce(dy, x, cl, mean, ones)):
            assert np.array_equal(got, want)


def test_output_pool_reuses_only_outputs_nobody_holds(rng):
    """y/dx come from a pool that hands an array out again only when nothing
    else refers to it: a kept output, a kept view, a buffer export keep their
    values; a dropped output's memory is reused (no fresh pages)."""
    from cupysyncbn.backends.numba.backend import OutputPool

    pool = OutputPool(entries=4, min_bytes=1024)
    shape, dt = (64, 32), np.dtype(np.float32)
    a = pool.empty(shape, dt)
    pa = a.ctypes.data
    b = pool.empty(shape, dt)
    v = b[3:]  # a view holds its base
    pb = b.ctypes.data
    del b
    m = memoryview(pool.empty(shape, dt))  # a buffer export holds its array
    c = pool.empty(shape, dt)
    assert len({pa, pb, c.ctypes.data, m.obj.ctypes.data}) == 4
    del a
    d = pool.empty(shape, dt)
    assert d.ctypes.data == pa  # reused once dropped
    assert pool.empty((64, 33), dt).ctypes.data not in (pb, c.ctypes.data)  # shape must match
    assert pool.empty(shape, np.dtype(np.float64)).dtype == np.float64
    assert len(pool._arrays) == 4  # bounded
    assert v.base is not None and all(e is not v.base for e in pool._arrays)  # evicted
    small = OutputPool(entries=4, min_bytes=1 << 20)
    small.empty(shape, dt)
    assert not small._arrays  # small outputs bypass the pool
    off = OutputPool(entries=0)
    assert off.empty((1 << 20,), dt).shape == (1 << 20,) and not off._arrays

    # Through the backend: kept outputs never change when later calls run.
    x = rng.standard_normal((8, 64, 1024)).astype(np.float32)  # 2 MiB outputs: pooled
    one = np.ones(64, np.float32)
    y1 = NB.normalize(x, False, one * 0, one, one * 0, np.float32)
    y1_view = NB.normalize(x, False, one, one, one, np.float32)[1:]
    ref1, ref2 = y1.copy(), y1_view.copy()
    for k in range(6):
        NB.normalize(x, False, one * k, one, one, np.float32)
        NB.backward_elemt(x, x, False, one, one, one, one * k, np.float32)
    np.testing.assert_array_equal(y1, ref1)
    np.testing.assert_array_equal(y1_view, ref2)
    np.testing.assert_array_equal(y1, x)



@pytest.mark.parametrize("outlier", [False, True])
@pytest.mark.parametrize("dt", ["float16", "float32"])
@pytest.mark.parametrize("layout", ["long rows", "short rows", "channel-last", "long channel-last"])
def test_one_pass_moments_offset_and_outlier_first_values(layout, dt, outlier, rng):
    """float16/float32 moments are one pass, shifted by each piece's first
    value: a large offset (std 1), or an outlier as that first value, must
    not cost accuracy. Against exact float64 sums (math.fsum) of the values."""
    offset, far = (1e4, 3e6) if dt == "float32" else (1e3, 6e4)
    if layout == "channel-last":
        x = rng.standard_normal((5000, 3)) + offset
        if outlier:
            x[::977] = far  # the first rows of the blocks
    elif layout == "long channel-last":  # register blocks, one piece
        x = rng.standard_normal((300, 1030)) + offset
        if outlier:
            x[0] = far  # the piece's first row: the shift
    else:
        s = 4096 + 100 if layout == "long rows" else 49
        x = rng.standard_normal((40, 3, s)) + offset
        if outlier:
            x[:, :, 0] = far
            if layout == "long rows":
                x[:, :, 4096] = -far  # the second piece's first value
    x = x.astype(dt)
    cl = layout.endswith("channel-last")
    mean, m2 = NB.moments(x, cl, np.float32)
    xc = _per_channel(x, cl)
    ref_mean, ref_m2 = _fsum_moments(xc)
    # One float64 lane per channel sums the long channel-last rows (16 lanes
    # split a channel-first row): with the 300x outlier as the shift, each
    # of the k values adds rounding of |far - mean|, about 1e-14 of the mean.
    rtol = 5e-14 if layout == "long channel-last" else 1e-14
    np.testing.assert_allclose(mean, ref_mean, rtol=rtol, atol=0)
    np.testing.assert_allclose(m2, ref_m2, rtol=1e-12, atol=0)


CACHE_PROBE = r"""
import json, time
t0 = time.perf_counter()
import numpy as np
from cupysyncbn.backends import get_backend
from cupysyncbn.backends.numba import backend as nbm
x = np.random.default_rng(0).standard_normal((4, 3, 25))
# the layer's default backend, its smallest kernel (compiling more only costs test time)
v = np.ones(3)
get_backend(x).normalize(x, False, v, v, v, x.dtype)
kernels = (nbm._normalize_cf,)
print(json.dumps({
    "backend": type(get_backend(x)).__name__,
    "hits": sum(sum(k.stats.cache_hits.values()) for k in kernels),
    "misses": sum(sum(k.stats.cache_misses.values()) for k in kernels),
    "seconds": time.perf_counter() - t0,
}))
"""


def test_compiled_kernels_are_cached_on_disk(tmp_path):
    """Only the first process compiles: a second one loads every kernel from the cache."""
    import json
    import subprocess

    from support.mpi_runner import mpi_env

    env = mpi_env({"NUMBA_CACHE_DIR": str(tmp_path / "cache")})  # a cold cache of our own
    env.pop(backends.CPU_BACKEND_ENV, None)
    runs = []
    for _ in range(2):
        res = subprocess.run([sys.executable, "-c", CACHE_PROBE], env=env, capture_output=True,
                             text=True, timeout=240, cwd=tmp_path)
        assert res.returncode == 0, res.stdout + res.stderr
        runs.append(json.loads(res.stdout.strip().splitlines()[-1]))
    first, second = runs
    assert first["backend"] == second["backend"] == "NumbaBackend"
    assert first["misses"] == 1 and first["hits"] == 0  # compiled (and stored) once
    assert second["misses"] == 0 and second["hits"] == 1  # nothing compiled again
    assert any((tmp_path / "cache").rglob("*.nbc"))


def test_warm_up_compiles_every_kernel_for_a_dtype():
    from cupysyncbn.backends.numba import backend as nbm

    n = nbm.warm_up(("float64",))
    # float64 inputs: short and long channel-first rows and channel-last, all primitives
    assert n >= 8
    for k in (nbm._moments_cf, nbm._moments_cl, nbm._normalize_cf, nbm._normalize_cl,
              nbm._bwd_reduce_cf, nbm._bwd_reduce_cl, nbm._bwd_elemt_cf, nbm._bwd_elemt_cl,
              nbm._elemt_cf_stream, nbm._elemt_cl_stream):
        assert any(str(sig[0].dtype) == "float64" for sig in k.signatures), k


MPI_STEP = r"""
import numpy as np
from cupysyncbn.backends import get_backend
from cupysyncbn.backends.numba.backend import NumbaBackend
import cupysyncbn as sbn
from support import bn_ref

comm = sbn.init("mpi")
rank, size = comm.rank, comm.size
counts = bn_ref.split_counts(11, size, empty=1)  # uneven, rank 1 holds nothing
sl = bn_ref.local_slice(counts, rank)
import os
from cupysyncbn.backends import NUMPY_BACKEND
os.environ.pop("CUPYSYNCBN_CPU_BACKEND", None)  # whatever the test run set: the default
assert type(get_backend(np.zeros(1))) is NumbaBackend  # the default
worst = []
for choice, fmt, shape, dt, tol in [(b, *case) for b in ("numba", "numpy") for case in (
                            ("NCHW", (11, 4, 6, 5), "float32", 2e-5),
                            ("NHWC", (11, 6, 5, 4), "float32", 2e-5),
                            ("NCL", (11, 4, 70), "float64", 1e-11),
                            ("NLC", (11, 70, 4), "float16", 2e-2))]:
    os.environ["CUPYSYNCBN_CPU_BACKEND"] = choice
    assert (get_backend(np.zeros(1)) is NUMPY_BACKEND) == (choice == "numpy")
    rng = np.random.default_rng(42)
    xg = rng.standard_normal(shape) * 3 + 20
    dyg = rng.standard_normal(shape)
    w = rng.uniform(0.5, 2.0, 4)
    bias = rng.standard_normal(4)
    ldt = "float64" if dt == "float64" else "float32"
    bn = sbn.SyncBatchNorm(4, data_format=fmt, comm=comm, dtype=ldt)
    bn.weight.data[...] = w
    bn.bias.data[...] = bias
    xq, dyq = xg.astype(dt), dyg.astype(dt)
    y = bn(xq[sl])
    dx = bn.backward(dyq[sl])
    # reference: float64 on the global batch of the rounded inputs
    yr, mean, var, m = bn_ref.ref_forward(xq.astype(float), fmt, w, bias)
    dxr, _, _ = bn_ref.ref_backward(xq.astype(float), dyq.astype(float), fmt, w)
    rm, rv = bn_ref.ref_running(np.zeros(4), np.ones(4), mean, var, m, 0.9)
    assert y.dtype == np.dtype(dt) and dx.dtype == np.dtype(dt) and y.shape == xq[sl].shape
    e = (np.abs(y - yr[sl]).max(initial=0) / np.abs(yr).max(),
         np.abs(dx - dxr[sl]).max(initial=0) / np.abs(dxr).max(),
         np.abs(bn._mean - rm).max() / np.abs(rm).max(),
         np.abs(bn._variance - rv).max() / np.abs(rv).max())
    worst.append((choice, fmt, dt, max(e), tol))
for choice, fmt, dt, err, tol in worst:
    assert err <= tol, (rank, choice, fmt, dt, err, tol)
print("NUMBA_MPI_OK", rank, worst, flush=True)
"""


@pytest.mark.mpi
def test_mpi_training_step_numba(tmp_path):
    from support.mpi_runner import run_mpi

    res = run_mpi(MPI_STEP, 3, timeout=240, tmp_path=tmp_path)
    assert res.stdout.count("NUMBA_MPI_OK") == 3, res.stdout + res.stderr


def _bitwise(a, b):
    a, b = np.asarray(a), np.asarray(b)
    return a.dtype == b.dtype and a.shape == b.shape and (
        np.array_equal(a.view(np.uint8), b.view(np.uint8)) or np.array_equal(a, b, equal_nan=True))


@pytest.mark.parametrize("cdt", ["float32", "float64"])
def test_compiled_channel_steps_are_bitwise_the_numpy_ones(cdt, rng):
    """numba/channel.py computes every per-channel step with NumPy's operations,
    in NumPy's order and dtypes: the same bits, NaN/Inf and empty batches too."""
    cdt = np.dtype(cdt)
    c = 41

    def vec(dt=F64):
        v = rng.standard_normal(c) * rng.choice([1e-3, 1.0, 1e4], c)
        v[:4] = [np.nan, np.inf, -np.inf, 0.0]
        return v.astype(dt)

    def same(got, want):
        assert len(got) == len(want)
        for g, w in zip(got, want):
            assert _bitwise(g, w), (g, w)

    with np.errstate(all="ignore"):
        for n in (1, 7, 12345):
            args = (n, vec(), np.abs(vec()), vec())
            same(NB.shifted_sums(*args), NP.shifted_sums(*args))
        for total in (0, 1, 3, 10**7):
            s, q, shift = vec(), np.abs(vec()), vec()
            q[5], q[6], s[6] = -1e-30, 0.0, 0.0  # a negative M2 by rounding: clamped to 0
            same(NB.merge_sums(total, s, q, shift, c), NP.merge_sums(total, s, q, shift, c))
        m = vec()
        same([NB.next_shift(m)], [NP.next_shift(m)])
        for count, eps in ((0, 1e-5), (5, 0.0), (5, 1e-5)):
            mean, var = vec(), np.abs(vec())
            var[7] = 0.0  # with eps 0: invstd 0, not inf
            same(NB.forward_coefficients(mean, var, count, eps, cdt),
                 NP.forward_coefficients(mean, var, count, eps, cdt))
        for mom, unbiased, nbt, count in ((0.9, False, 0, 2), (0.0, True, 7, 1000),
                                          (1.0, True, 0, 2), (None, False, 7, 9)):
            args = (vec(cdt), np.abs(vec(cdt)), vec(), np.abs(vec()), count, mom, unbiased, nbt)
            same(NB.running_update(*args), NP.running_update(*args))
        for weight in (None, vec(cdt)):
            for batch_stats, count in ((True, 0), (True, 9), (False, 9)):
                args = (weight, np.abs(vec(cdt)), vec(), vec(), count, batch_stats, cdt)
                same(NB.backward_coefficients(*args), NP.backward_coefficients(*args))
        # not a contiguous float vector: the NumPy code, same results
        s = np.repeat(vec(), 2)[::2]
        same(NB.merge_sums(4, s, np.abs(s), s, c), NP.merge_sums(4, s, np.abs(s), s, c))
    with pytest.raises(ValueError, match="unbiased"):
        NB.running_update(vec(cdt), vec(cdt), vec(), vec(), 1, 0.9, True, 0)


@pytest.mark.parametrize("dt", DTYPES)
def test_long_channel_last_rows_match_fsum(dt, rng):
    """Channel-last rows are summed in register blocks of 16 channels, several
    rows at a time (numba/simd.py col_*_sums), here with many blocks:
    block and tail channels, partial tiles, a channel offset per column and
    (float16) more rows than one PIECE; sums against math.fsum."""
    from cupysyncbn.backends.numba import backend as nbm

    if dt == "float16" and not nbm.HW_F16:
        pytest.skip("float16 reductions go to the NumPy backend without F16C")
    c = 1037  # 64 blocks and a 13-channel tail
    cases = [(2 * nbm.REG_ROWS + 3, 1e3)]
    if dt == "float16":
        cases.append((nbm.PIECE + 5, 20.0))  # two pieces, one Chan merge
    cdt = _cdt(dt)
    for rows, offset in cases:
        offs = (np.arange(c) % 7) * offset / 7
        x = (rng.standard_normal((rows, c)) + offs).astype(dt)
        dy = rng.standard_normal((rows, c)).astype(dt)
        xc = x.astype(F64).T
        ref_mean, ref_m2 = _fsum_moments(xc)
        mean, m2 = NB.moments(x, True, cdt)
        std = np.sqrt(ref_m2 / rows)
        assert np.all(np.abs(mean - ref_mean) <= 1e-15 * np.abs(ref_mean) + 1e-13 * std)
        np.testing.assert_allclose(m2, ref_m2, rtol=1e-11, atol=0)
        mf = ref_mean.astype(cdt)
        s_n, p_n = NB.backward_reduce(dy, x, True, mf, np.ones(c, cdt))
        dyc = dy.astype(F64).T
        xm = (x - mf).astype(F64).T  # x - mean in the compute dtype
        ref_s = _fsum_rows(dyc)
        ref_p = _fsum_rows(dyc * xm)
        assert np.all(np.abs(s_n - ref_s) <= 1e-14 * np.abs(dyc).sum(axis=1))
        assert np.all(np.abs(p_n - ref_p) <= 1e-14 * np.abs(dyc * xm).sum(axis=1))
