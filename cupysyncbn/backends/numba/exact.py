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

from typing import Any

import numpy as np
from numba import njit

from .. import exact_sums as _ref
from ..exact_sums import (  # noqa: F401 - the namespace the engine calls (backend.exact)
    EMPTY_EXP,
    FOLD_BITS,
    MAX_COUNT,
    NONFINITE_EXP,
    absmax,
    bound_exponent,
    check_count,
    finalize_moments,
    finalize_sum,
    folds_for,
    moments_z,
    scale_exponent,
    scaled_stats,
)

__all__ = [
    "moment_folds", "backward_bounds", "backward_folds", "normalize", "backward_elemt",
    "absmax", "bound_exponent", "check_count", "finalize_moments", "finalize_sum",
    "folds_for", "scale_exponent", "moments_z", "scaled_stats",
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
def _square_buf(z, r, m, split, sig, acc, base):  # noqa: ANN001, ANN202 - numba
    """Deposit the exact parts of ``z[:m]**2`` (see exact_sums.square_parts)."""
    if not split:
        for lane in range(m):
            r[lane] = z[lane] * z[lane]
        _fold_buf(r, m, sig, acc, base)
        return
    for part in range(3):
        for lane in range(m):
            v = z[lane]
            p = v * _SPLITTER
            hi = p - (p - v)
            lo = v - hi
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
