"""The reproducible mode's data passes as numba loops, bitwise those of :mod:`..exact_sums`.

The NumPy module is the reference and states every operation; these loops
do the same IEEE float64 (and compute-dtype) operations per element, in the
same order, compiled without ``fastmath`` (so ``(r + sigma) - sigma`` is
never simplified and nothing is contracted into a fused multiply-add). The
fold sums are exact, so the order in which a loop adds them is free; the
results are the reference's bits, which ``tests/backends/test_exact_sums.py``
asserts. Inputs numba cannot load (float16, bfloat16) and every C-sized step
use the NumPy functions themselves. Single-threaded, like the rest of the
numba backend (one MPI rank is one process).
"""

from __future__ import annotations

import math
import sys
from typing import Any

import numpy as np
from numba import njit

from .. import exact_samples as _smp
from .. import exact_sums as _ref
from ..exact_samples import (  # noqa: F401 - the per-sample path's C-sized steps
    QUANTITIES,
    backward_safe,
    grids,
    safe,
)
from ..exact_sums import (  # noqa: F401 - the namespace the engine calls (backend.exact)
    EMPTY_EXP,
    FOLD_BITS,
    MAX_COUNT,
    NONFINITE_EXP,
    absmax,
    bound_exponent,
    check_count,
    finalize_moments,
    folds_for,
    moments_z,
    scale_exponent,
    scaled_stats,
)
from .simd import col_dev_sums_rn, col_dot_sums_rn, dev_sums_rn, dot_sums_rn

__all__ = [
    "NumbaExactOps", "sample_moments", "sample_backward", "fold_moments", "fold_sums",
    "local_bounds", "grids", "safe", "backward_safe", "finalize_sample_moments",
    "moment_folds", "backward_bounds", "backward_folds", "normalize", "backward_elemt",
    "absmax", "bound_exponent", "check_count", "finalize_moments", "finalize_sum", "folds_for",
    "scale_exponent", "moments_z", "scaled_stats",
]

_JIT: dict[str, Any] = {"cache": True, "fastmath": False, "nogil": True}
_F64 = np.dtype(np.float64)
_LOADS = (np.dtype(np.float32), np.dtype(np.float64))
_SPLITTER = _ref.SPLITTER


#: Values per block of a channel-first row: the per-lane loops below run over a
#: block, elementwise (each lane its own accumulator), which the compiler
#: vectorizes without reassociating anything; a scalar loop with one
#: accumulator per fold ran at a fifth of the speed.
LANES = 64


@njit(inline="always", **_JIT)
def _fold_buf(r, m, sig, acc, base):  # noqa: ANN001, ANN202 - numba
    """Deposit ``r[:m]`` into rows ``base..base+K-1`` of ``acc`` (lane ``l`` of row k gets t)."""
    for k in range(sig.shape[0]):
        s = sig[k]
        a = acc[base + k]
        for lane in range(m):
            t = (r[lane] + s) - s
            r[lane] = r[lane] - t
            a[lane] += t


@njit(inline="always", **_JIT)
def _split(v):  # noqa: ANN001, ANN202 - numba: Veltkamp's split of exact_sums (no FMA)
    p = v * _SPLITTER
    hi = p - (p - v)
    return hi, v - hi


@njit(inline="always", **_JIT)
def _square_buf(z, r, m, split, sig, acc, base):  # noqa: ANN001, ANN202 - numba
    """Deposit the exact parts of ``z[:m]**2`` (see exact_sums.square_parts)."""
    if not split:
        for lane in range(m):
            r[lane] = z[lane] * z[lane]
        _fold_buf(r, m, sig, acc, base)
        return
    for part in range(3):
        for lane in range(m):
            hi, lo = _split(z[lane])
            if part == 0:
                r[lane] = hi * hi
            elif part == 1:
                mm = hi * lo
                r[lane] = mm + mm
            else:
                r[lane] = lo * lo
        _fold_buf(r, m, sig, acc, base)


@njit(**_JIT)
def _moments_cf(x, f1, f2, sig, split, out):  # noqa: ANN001, ANN202 - numba
    n, c, s = x.shape
    k = sig.shape[0]
    z = np.empty(LANES)
    r = np.empty(LANES)
    acc = np.zeros((2 * k, LANES))
    for ch in range(c):
        acc[:] = 0.0
        g1, g2 = f1[ch], f2[ch]
        for i in range(n):
            for j0 in range(0, s, LANES):
                m = min(LANES, s - j0)
                for lane in range(m):
                    v = (np.float64(x[i, ch, j0 + lane]) * g1) * g2
                    z[lane] = v
                    r[lane] = v
                _fold_buf(r, m, sig, acc, 0)
                _square_buf(z, r, m, split, sig, acc, k)
        for q in range(2 * k):
            out[q, ch] = acc[q].sum()  # exact: any order


@njit(**_JIT)
def _moments_cl(x, f1, f2, sig, split, out):  # noqa: ANN001, ANN202 - numba
    m, c = x.shape
    k = sig.shape[0]
    z = np.empty(c)
    r = np.empty(c)
    for i in range(m):  # the channels are the lanes; out's columns accumulate
        for ch in range(c):
            v = (np.float64(x[i, ch]) * f1[ch]) * f2[ch]
            z[ch] = v
            r[ch] = v
        _fold_buf(r, c, sig, out, 0)
        _square_buf(z, r, c, split, sig, out, k)


def moment_folds(
    v: np.ndarray, channel_last: bool, e: np.ndarray, k_folds: int
) -> tuple[np.ndarray, np.ndarray]:
    """:func:`..exact_sums.moment_folds`, the same bits."""
    if np.dtype(v.dtype) not in _LOADS:
        return _ref.moment_folds(v, channel_last, e, k_folds)
    f1, f2 = _ref.scale_factors(e)
    sig = np.array(_ref.sigmas(k_folds))
    out = np.zeros((2 * k_folds, v.shape[1]), _F64)
    split = np.dtype(v.dtype).itemsize >= 8
    with np.errstate(all="ignore"):
        (_moments_cl if channel_last else _moments_cf)(v, f1, f2, sig, split, out)
    return out[:k_folds].copy(), out[k_folds:].copy()


@njit(**_JIT)
def _bounds_cf(dy, x, mean, bounds):  # noqa: ANN001, ANN202 - numba
    n, c, s = x.shape
    for ch in range(c):
        mu = mean[ch]
        ag = 0.0
        ah = 0.0
        nan = False
        for i in range(n):
            for j in range(s):  # max is exact: any order
                gv = np.float64(dy[i, ch, j])
                hv = (np.float64(x[i, ch, j]) - mu) * gv
                if gv != gv or hv != hv:
                    nan = True
                ag = max(ag, abs(gv))
                ah = max(ah, abs(hv))
        bounds[0, ch] = np.nan if nan else ag
        bounds[1, ch] = np.nan if nan else ah


@njit(**_JIT)
def _backward_cf(dy, x, mean, fg1, fg2, fh1, fh2, sig, out, bounds, fold):  # noqa: ANN001, ANN202
    if not fold:
        _bounds_cf(dy, x, mean, bounds)
        return
    n, c, s = x.shape
    k = sig.shape[0]
    g = np.empty(LANES)
    h = np.empty(LANES)
    acc = np.zeros((2 * k, LANES))
    for ch in range(c):
        acc[:] = 0.0
        mu = mean[ch]
        a1, a2, b1, b2 = fg1[ch], fg2[ch], fh1[ch], fh2[ch]
        for i in range(n):
            for j0 in range(0, s, LANES):
                m = min(LANES, s - j0)
                for lane in range(m):
                    gv = np.float64(dy[i, ch, j0 + lane])
                    hv = (np.float64(x[i, ch, j0 + lane]) - mu) * gv
                    g[lane] = (gv * a1) * a2
                    h[lane] = (hv * b1) * b2
                _fold_buf(g, m, sig, acc, 0)
                _fold_buf(h, m, sig, acc, k)
        for q in range(2 * k):
            out[q, ch] = acc[q].sum()  # exact: any order


@njit(**_JIT)
def _backward_cl(dy, x, mean, fg1, fg2, fh1, fh2, sig, out, bounds, fold):  # noqa: ANN001, ANN202
    m, c = x.shape
    k = sig.shape[0]
    g = np.empty(c)
    h = np.empty(c)
    for i in range(m):  # the channels are the lanes
        for ch in range(c):
            gv = np.float64(dy[i, ch])
            hv = (np.float64(x[i, ch]) - mean[ch]) * gv
            if fold:
                g[ch] = (gv * fg1[ch]) * fg2[ch]
                h[ch] = (hv * fh1[ch]) * fh2[ch]
            else:
                bounds[0, ch] = max(bounds[0, ch], abs(gv))
                bounds[1, ch] = max(bounds[1, ch], abs(hv))
                bounds[2, ch] += (gv != gv) | (hv != hv)
        if fold:
            _fold_buf(g, c, sig, out, 0)
            _fold_buf(h, c, sig, out, k)


def _backward(dy: np.ndarray, x: np.ndarray, channel_last: bool, mean: np.ndarray,
              fold: bool, eg: Any = None, eh: Any = None, k: int = 1) -> tuple:
    c = x.shape[1]
    mean = mean.astype(_F64)
    fg1, fg2 = _ref.scale_factors(eg) if fold else (mean, mean)
    fh1, fh2 = _ref.scale_factors(eh) if fold else (mean, mean)
    sig = np.array(_ref.sigmas(k))
    out = np.zeros((2 * k, c), _F64)
    bounds = np.zeros((3, c), _F64)
    with np.errstate(all="ignore"):
        (_backward_cl if channel_last else _backward_cf)(
            dy, x, mean, fg1, fg2, fh1, fh2, sig, out, bounds, fold)
    if channel_last and not fold:
        bounds[:2, bounds[2] > 0] = np.nan
    return out, bounds


def _loadable(*arrays: np.ndarray) -> bool:
    return all(np.dtype(a.dtype) in _LOADS for a in arrays)


def backward_bounds(
    dy: np.ndarray, x: np.ndarray, channel_last: bool, mean: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """:func:`..exact_sums.backward_bounds`, the same bits."""
    if not _loadable(dy, x):
        return _ref.backward_bounds(dy, x, channel_last, mean)
    _, b = _backward(dy, x, channel_last, mean, False)
    return b[0].copy(), b[1].copy()


def backward_folds(
    dy: np.ndarray, x: np.ndarray, channel_last: bool, mean: np.ndarray,
    e_g: np.ndarray, e_h: np.ndarray, k_folds: int,
) -> tuple[np.ndarray, np.ndarray]:
    """:func:`..exact_sums.backward_folds`, the same bits."""
    if not _loadable(dy, x):
        return _ref.backward_folds(dy, x, channel_last, mean, e_g, e_h, k_folds)
    out, _ = _backward(dy, x, channel_last, mean, True, e_g, e_h, k_folds)
    return out[:k_folds].copy(), out[k_folds:].copy()


@njit(**_JIT)
def _normalize_cf(x, mean, scale, bias, y):  # noqa: ANN001, ANN202 - numba
    n, c, s = x.shape
    for i in range(n):
        for ch in range(c):
            mu, sc, b = mean[ch], scale[ch], bias[ch]
            for j in range(s):
                y[i, ch, j] = ((x[i, ch, j] - mu) * sc) + b


@njit(**_JIT)
def _normalize_cl(x, mean, scale, bias, y):  # noqa: ANN001, ANN202 - numba
    m, c = x.shape
    for i in range(m):
        for ch in range(c):
            y[i, ch] = ((x[i, ch] - mean[ch]) * scale[ch]) + bias[ch]


def normalize(
    v: np.ndarray, channel_last: bool, mean: np.ndarray, scale: np.ndarray, bias: np.ndarray,
    out_dtype: Any,
) -> np.ndarray:
    """:func:`..exact_sums.normalize`, the same bits."""
    cdt = mean.dtype
    if v.dtype != cdt or np.dtype(out_dtype) != cdt:
        return _ref.normalize(v, channel_last, mean, scale, bias, out_dtype)
    y = np.empty(v.shape, cdt)
    fn = _normalize_cl if channel_last else _normalize_cf
    fn(v, mean, scale.astype(cdt, copy=False), bias.astype(cdt, copy=False), y)
    return y


@njit(**_JIT)
def _elemt_cf(dy, x, mean, a, mean_dy, b, dx):  # noqa: ANN001, ANN202 - numba
    n, c, s = x.shape
    for i in range(n):
        for ch in range(c):
            mu, av, md, bv = mean[ch], a[ch], mean_dy[ch], b[ch]
            for j in range(s):
                dx[i, ch, j] = ((dy[i, ch, j] - md) * av) - ((x[i, ch, j] - mu) * bv)


@njit(**_JIT)
def _elemt_cl(dy, x, mean, a, mean_dy, b, dx):  # noqa: ANN001, ANN202 - numba
    m, c = x.shape
    for i in range(m):
        for ch in range(c):
            dx[i, ch] = ((dy[i, ch] - mean_dy[ch]) * a[ch]) - ((x[i, ch] - mean[ch]) * b[ch])


def backward_elemt(
    dy: np.ndarray, x: np.ndarray, channel_last: bool, mean: np.ndarray, a: np.ndarray,
    mean_dy: np.ndarray, b: np.ndarray, out_dtype: Any,
) -> np.ndarray:
    """:func:`..exact_sums.backward_elemt`, the same bits."""
    cdt = mean.dtype
    if x.dtype != cdt or dy.dtype != cdt or np.dtype(out_dtype) != cdt:
        return _ref.backward_elemt(dy, x, channel_last, mean, a, mean_dy, b, out_dtype)
    dx = np.empty(x.shape, cdt)
    fn = _elemt_cl if channel_last else _elemt_cf
    fn(dy, x, mean, a.astype(cdt, copy=False), mean_dy.astype(cdt, copy=False),
       b.astype(cdt, copy=False), dx)
    return dx


# ------------------------------------------------------ the per-sample path
# exact_samples' partials: the within-sample sums in its canonical order
# (the rn loops of simd.py: 16 lanes per channel-first row; tiles of
# TILE_ROWS channel-last rows, in order), then the C-sized folds.
_COLS = 16


@njit(**_JIT)
def _samples_cf(x, dy, mean, p, q, r):  # noqa: ANN001, ANN202 - numba
    n, c, s = x.shape
    for i in range(n):
        for j in range(c):
            if dy is None:
                sh = np.float64(x[i, j, 0])
                p[i, j] = sh
                q[i, j], r[i, j] = dev_sums_rn(x, i, i + 1, j, 0, s, sh)
            else:
                q[i, j], r[i, j] = dot_sums_rn(x, dy, i, i + 1, j, 0, s, mean[j], None)


@njit(**_JIT)
def _samples_cl(x, dy, mean, s, tile, p, q, r):  # noqa: ANN001, ANN202 - numba
    # ``tile`` is an argument, not a global: numba's cache would keep a
    # global of another module at its compile-time value
    m, c = x.shape
    cv = c - c % _COLS
    for i in range(m // s):
        r0 = i * s
        sh, a, b = p[i], q[i], r[i]
        if dy is None:
            for j in range(c):
                sh[j] = np.float64(x[r0, j])
        a[:] = 0.0
        b[:] = 0.0
        for t0 in range(r0, r0 + s, tile):
            t1 = min(r0 + s, t0 + tile)
            for j in range(0, cv, _COLS):
                if dy is None:
                    col_dev_sums_rn(x, t0, t1, j, sh, a, b)
                else:
                    col_dot_sums_rn(x, dy, t0, t1, j, mean, a, b, None)
            for j in range(cv, c):  # the last columns one by one, the same order
                ta = 0.0
                tb = 0.0
                for t in range(t0, t1):
                    if dy is None:
                        d = np.float64(x[t, j]) - sh[j]
                        ta += d
                        tb += d * d
                    else:
                        g = np.float64(dy[t, j])
                        ta += g
                        tb += g * np.float64(x[t, j] - mean[j])
                a[j] += ta
                b[j] += tb


def _contiguous(*arrays: np.ndarray) -> bool:
    return all(np.dtype(a.dtype) in _LOADS and a.flags.c_contiguous for a in arrays)


def sample_moments(
    v: np.ndarray, channel_last: bool, samples: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """:func:`..exact_samples.sample_moments`, the same bits."""
    if not _contiguous(v):
        return _smp.sample_moments(v, channel_last, samples)
    c = v.shape[1]
    out = [np.empty((samples, c), _F64) for _ in range(3)]
    with np.errstate(all="ignore"):
        if channel_last:
            _samples_cl(v, None, None, v.shape[0] // samples, _smp.TILE_ROWS, *out)
        else:
            _samples_cf(v, None, None, *out)
    return out[0], out[1], out[2]


def sample_backward(
    dy: np.ndarray, x: np.ndarray, channel_last: bool, mean: np.ndarray, samples: int
) -> tuple[np.ndarray, np.ndarray]:
    """:func:`..exact_samples.sample_backward`, the same bits."""
    if not _contiguous(dy, x) or dy.dtype != x.dtype or np.dtype(mean.dtype) not in _LOADS:
        return _smp.sample_backward(dy, x, channel_last, mean, samples)
    c = x.shape[1]
    g, h = np.empty((samples, c), _F64), np.empty((samples, c), _F64)
    m = np.ascontiguousarray(mean)
    with np.errstate(all="ignore"):
        if channel_last:
            _samples_cl(x, dy, m, x.shape[0] // samples, _smp.TILE_ROWS, g, g, h)
        else:
            _samples_cf(x, dy, m, g, g, h)
    return g, h


@njit(inline="always", **_JIT)
def _two_prod(a, b):  # noqa: ANN001, ANN202 - numba: exact_sums.two_prod, operation for operation
    p = a * b
    ah, al = _split(a)
    bh, bl = _split(b)
    return p, (((ah * bh - p) + ah * bl) + al * bh) + al * bl


@njit(inline="always", **_JIT)
def _step(r, sg, o, j):  # noqa: ANN001, ANN202 - numba: one fold of fold_into; the remainder
    t = (r + sg) - sg
    o[j] += t
    return r - t


@njit(inline="always", **_JIT)
def _deposit_row(src, f1, f2, sig, out, base):  # noqa: ANN001, ANN202 - numba
    """Scale ``src`` per channel (``(v * f1) * f2``) and fold it into rows ``base..`` of ``out``.

    One loop over the channels with the K folds written out (K = 3 or 5),
    so the remainder stays in a register: the operations and their order
    are :func:`..exact_sums.fold_into`'s per value.
    """
    c = src.shape[0]
    k = sig.shape[0]
    if k == 3:
        s1, s2, s3 = sig[0], sig[1], sig[2]
        o1, o2, o3 = out[base], out[base + 1], out[base + 2]
        for j in range(c):
            r = _step(_step((src[j] * f1[j]) * f2[j], s1, o1, j), s2, o2, j)
            o3[j] += (r + s3) - s3
        return
    if k == 5:
        s1, s2, s3, s4, s5 = sig[0], sig[1], sig[2], sig[3], sig[4]
        o1, o2, o3, o4, o5 = out[base], out[base + 1], out[base + 2], out[base + 3], out[base + 4]
        for j in range(c):
            r = _step(_step((src[j] * f1[j]) * f2[j], s1, o1, j), s2, o2, j)
            r = _step(_step(r, s3, o3, j), s4, o4, j)
            o5[j] += (r + s5) - s5
        return
    r = np.empty(c)
    for j in range(c):
        r[j] = (src[j] * f1[j]) * f2[j]
    _fold_buf(r, c, sig, out, base)


@njit(**_JIT)
def _fold_moments(s, a, b, f1, f2, sig, narrow, out):  # noqa: ANN001, ANN202 - numba
    # the channels are the lanes; out is (5K, C). ``narrow``: the shifts have
    # at most 26 significant bits, so ``s*s`` is exact and its low half is 0
    # (depositing 0 changes no fold: skipped)
    n, c = s.shape
    k = sig.shape[0]
    hi = np.empty(c)
    lo = np.empty(c)
    for i in range(n):
        _deposit_row(b[i], f1[0], f2[0], sig, out, 0)
        _deposit_row(a[i], f1[1], f2[1], sig, out, k)
        _deposit_row(s[i], f1[2], f2[2], sig, out, 2 * k)
        for q in range(3, 5):
            other = s[i] if q == 3 else a[i]
            si = s[i]
            for j in range(c):
                hi[j], lo[j] = _two_prod(si[j], other[j])
            _deposit_row(hi, f1[q], f2[q], sig, out, q * k)
            if not (narrow and q == 3):
                _deposit_row(lo, f1[q], f2[q], sig, out, q * k)


@njit(**_JIT)
def _fold_parts(parts, f1, f2, sig, out):  # noqa: ANN001, ANN202 - numba
    k = sig.shape[0]
    for q in range(parts.shape[0]):
        for i in range(parts.shape[1]):
            _deposit_row(parts[q, i], f1[q], f2[q], sig, out, q * k)


_EMPTY, _NONFINITE = _ref.EMPTY_EXP, _ref.NONFINITE_EXP
#: ``2**n`` for n = -1074..1023: a multiplication by an exact power of two is
#: one correctly rounded operation, as ``ldexp`` (libm's call is the slow part).
_POW2 = np.array([math.ldexp(1.0, n) for n in range(-1074, 1024)])


@njit(inline="always", **_JIT)
def _ldexp(x, n):  # noqa: ANN001, ANN202 - numba: ldexp(x, n), the same bits
    if -1074 <= n <= 1023:
        return x * _POW2[n + 1074]
    return math.ldexp(x, n)


@njit(**_JIT)
def _factors_of(e, f1, f2):  # noqa: ANN001, ANN202 - numba: exact_sums.scale_factors of the grids
    for q in range(e.shape[0]):
        for j in range(e.shape[1]):
            g = e[q, j]
            neg = 0.0 if (g == _EMPTY or g == _NONFINITE) else -g
            if neg > 1023:
                f1[q, j] = _ldexp(1.0, int(neg - 600.0))
                f2[q, j] = 2.0 ** 600
            else:
                f1[q, j] = _ldexp(1.0, int(neg))
                f2[q, j] = 1.0


def _factors(e: Any) -> tuple[np.ndarray, np.ndarray]:
    g = np.ascontiguousarray(np.stack([np.asarray(v, _F64) for v in e]))
    f1, f2 = np.empty_like(g), np.empty_like(g)
    _factors_of(g, f1, f2)
    return f1, f2


@njit(**_JIT)
def _exponents(q, out, row):  # noqa: ANN001, ANN202 - numba: exact_samples._exponent
    n, c = q.shape
    m = np.zeros(c)
    bad = np.zeros(c)  # NaNs seen (a count: branch-free, so the loop vectorizes)
    for i in range(n):
        qi = q[i]
        for j in range(c):
            v = abs(qi[j])
            m[j] = v if v > m[j] else m[j]
            bad[j] += v != v
    for j in range(c):
        if bad[j] > 0 or m[j] == np.inf:
            out[row, j] = _NONFINITE
        elif m[j] == 0.0:
            out[row, j] = _EMPTY
        else:
            out[row, j] = math.frexp(m[j])[1]


def local_bounds(parts: tuple | None, nf: int) -> list[np.ndarray]:
    """:func:`..exact_samples.local_bounds`, the same values."""
    if parts is None or parts[0].shape[0] == 0:
        return _smp.local_bounds(None, nf)
    order = (parts[2], parts[1], parts[0]) if len(parts) == 3 else parts
    out = np.empty((len(order), nf), _F64)
    for row, q in enumerate(order):
        _exponents(np.ascontiguousarray(q), out, row)
    return list(out)


@njit(inline="always", **_JIT)
def _two_sum(a, b):  # noqa: ANN001, ANN202 - numba: exact_sums.two_sum
    s = a + b
    bb = s - a
    return s, (a - (s - bb)) + (b - bb)


@njit(inline="always", **_JIT)
def _fast_two_sum(a, b):  # noqa: ANN001, ANN202 - numba: exact_sums.fast_two_sum
    s = a + b
    return s, b - (s - a)


@njit(inline="always", **_JIT)
def _dd_div(hi, lo, d):  # noqa: ANN001, ANN202 - numba: exact_sums.dd_div
    q = hi / d
    p, e = _two_prod(q, d)
    r = (((hi - p) - e) + lo) / d
    return _fast_two_sum(q, r)


@njit(inline="always", **_JIT)
def _dd_add(ah, al, bh, bl):  # noqa: ANN001, ANN202 - numba: exact_samples._dd_add
    s, t = _two_sum(ah, bh)
    return _fast_two_sum(s, t + (al + bl))


@njit(inline="always", **_JIT)
def _dd_mul(ah, al, bh, bl):  # noqa: ANN001, ANN202 - numba: exact_samples._dd_mul
    p, t = _two_prod(ah, bh)
    return _fast_two_sum(p, t + (ah * bl + al * bh))


@njit(inline="always", **_JIT)
def _dd_of(p, q, j, g):  # noqa: ANN001, ANN202 - numba: exact_samples._dd (dd_from_folds, ldexp)
    k = p.shape[1]
    hi = p[q, k - 1, j]
    lo = 0.0
    for f in range(k - 2, -1, -1):
        s, e = _two_sum(hi, p[q, f, j])
        hi, lo = _fast_two_sum(s, e + lo)
    e = g[q, j]
    n = 0 if (e == _EMPTY or e == _NONFINITE) else int(e)
    return _ldexp(hi, n), _ldexp(lo, n)


@njit(**_JIT)
def _finalize(p, g, sz, n, mean, var):  # noqa: ANN001, ANN202 - numba
    for j in range(p.shape[2]):
        bh, bl = _dd_of(p, 0, j, g)
        ah, al = _dd_of(p, 1, j, g)
        sh, sl = _dd_of(p, 2, j, g)
        qh, ql = _dd_of(p, 3, j, g)
        rh, rl = _dd_of(p, 4, j, g)
        uh, ul = _dd_mul(sh, sl, sz, 0.0)
        th, tl = _dd_add(uh, ul, ah, al)
        mh, ml = _dd_div(th, tl, n)
        m2h, m2l = _dd_add(bh, bl, rh + rh, rl + rl)
        uh, ul = _dd_mul(qh, ql, sz, 0.0)
        m2h, m2l = _dd_add(m2h, m2l, uh, ul)
        uh, ul = _dd_mul(th, tl, mh, ml)
        m2h, m2l = _dd_add(m2h, m2l, -uh, -ul)
        vh, _ = _dd_div(m2h, m2l, n)
        mean[j] = mh + 0.0
        var[j] = max(vh, 0.0) if vh == vh else vh


@njit(**_JIT)
def _finalize_sums(p, e, out):  # noqa: ANN001, ANN202 - numba: exact_sums.finalize_sum
    k = p.shape[0]
    for j in range(p.shape[1]):
        g = e[j]
        if g == _EMPTY:
            out[j] = 0.0
            continue
        if g == _NONFINITE:
            out[j] = np.nan
            continue
        hi = p[k - 1, j]
        lo = 0.0
        for f in range(k - 2, -1, -1):
            t, err = _two_sum(hi, p[f, j])
            hi, lo = _fast_two_sum(t, err + lo)
        out[j] = _ldexp(hi, int(g))


def finalize_sum(p: np.ndarray, e_global: np.ndarray) -> np.ndarray:
    """:func:`..exact_sums.finalize_sum`, the same bits."""
    out = np.empty(p.shape[1], _F64)
    with np.errstate(all="ignore"):
        _finalize_sums(np.ascontiguousarray(p, _F64), np.ascontiguousarray(e_global, _F64), out)
    return out


def finalize_sample_moments(
    p: np.ndarray, g: np.ndarray, spatial: int, count: int
) -> tuple[np.ndarray, np.ndarray]:
    """:func:`..exact_samples.finalize_sample_moments`, the same bits."""
    c = p.shape[2]
    mean, var = np.empty(c, _F64), np.empty(c, _F64)
    with np.errstate(all="ignore"):
        _finalize(np.ascontiguousarray(p, _F64), np.ascontiguousarray(g, _F64),
                  float(spatial), float(count), mean, var)
    return mean, var


def fold_moments(
    s: np.ndarray, a: np.ndarray, b: np.ndarray, g: np.ndarray, k: int
) -> np.ndarray:
    """:func:`..exact_samples.fold_moments`, the same bits."""
    f1, f2 = _factors(g)
    # K = 3 only for float32 compute, i.e. data of float32 or narrower: shifts
    # of at most 24 significant bits, whose squares are exact
    narrow = k == 3
    out = np.zeros((QUANTITIES * k, s.shape[1]), _F64)
    with np.errstate(all="ignore"):
        _fold_moments(s, a, b, f1, f2, np.array(_ref.sigmas(k)), narrow, out)
    return out.reshape(QUANTITIES, k, -1)


def fold_sums(parts: tuple, e: list, k: int) -> np.ndarray:
    """:func:`..exact_samples.fold_sums`, the same bits."""
    f1, f2 = _factors(e)
    out = np.zeros((len(parts) * k, parts[0].shape[1]), _F64)
    with np.errstate(all="ignore"):
        _fold_parts(np.stack(parts), f1, f2, np.array(_ref.sigmas(k)), out)
    return out.reshape(len(parts), k, -1)


class NumbaExactOps:
    """``NumbaBackend.exact``: this module's functions, with the backend's elementwise passes.

    The numba backend's own normalize and backward elementwise kernels
    compute the canonical formulas of :func:`..exact_sums.normalize` and
    :func:`..exact_sums.backward_elemt` operation for operation (no fused
    multiply-add) and stream their stores; where the input, compute and
    output dtypes agree they give the same bits faster than the loops above.
    """

    def __init__(self, backend: Any) -> None:
        self._backend = backend

    def __getattr__(self, name: str) -> Any:  # the module's functions and constants
        return getattr(_this, name)

    def normalize(self, v: np.ndarray, channel_last: bool, mean: np.ndarray, scale: np.ndarray,
                  bias: np.ndarray, out_dtype: Any) -> np.ndarray:
        """:func:`..exact_sums.normalize`, the same bits."""
        cdt = mean.dtype
        if v.dtype == cdt and np.dtype(out_dtype) == cdt and cdt in _LOADS:
            return self._backend.normalize(v, channel_last, mean, scale, bias, out_dtype)
        return normalize(v, channel_last, mean, scale, bias, out_dtype)

    def backward_elemt(self, dy: np.ndarray, x: np.ndarray, channel_last: bool,
                       mean: np.ndarray, a: np.ndarray, mean_dy: np.ndarray, b: np.ndarray,
                       out_dtype: Any) -> np.ndarray:
        """:func:`..exact_sums.backward_elemt`, the same bits."""
        cdt = mean.dtype
        if (x.dtype == cdt and dy.dtype == cdt and np.dtype(out_dtype) == cdt
                and cdt in _LOADS):
            return self._backend.backward_elemt(dy, x, channel_last, mean, a, mean_dy, b,
                                                out_dtype)
        return backward_elemt(dy, x, channel_last, mean, a, mean_dy, b, out_dtype)


_this = sys.modules[__name__]
