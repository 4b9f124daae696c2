"""NumPy backend: the CPU implementation of the batch-norm primitives.

Speed: batch norm is memory-bound, and NumPy has no fused kernels, so every
primitive walks the data in cache-sized chunks (:data:`CHUNK_BYTES`): the few
NumPy passes a formula needs run on a chunk that is still in cache, and main
memory sees close to the minimum traffic (forward: read x twice, write y;
backward: read x and dy twice, write dx). Sums and dot products go to BLAS
(``matmul``/``vecdot`` with a vector of ones: several times faster than
``np.add.reduce``), scratch buffers are reused between calls (one set per
thread) and every result is written with ``out=``. Channel-last per-channel
vectors are materialized as a chunk-sized block so all elementwise passes are
contiguous; channel-first ones broadcast along rows (NumPy's slower path, the
main remaining cost there).

Accuracy choices (why the code looks the way it does):

* Statistics are computed per chunk with the corrected two-pass algorithm:
  ``c = mean rounded to the compute dtype``, ``d = x - c``,
  ``mean = c + sum(d)/n``, ``M2 = sum(d*d) - sum(d)**2/n``; the pieces are
  merged in float64 with Chan's formula. So M2 is always a centered sum,
  never ``E[x²] - E[x]²``, and the rounding of ``c`` costs nothing.
* Compute-dtype sums (BLAS, several SIMD lanes) never run over more than
  :data:`MAX_DOT` contiguous values (channel-first rows; longer rows are
  split at a divisor of their length when they have one) or :data:`ROW_BLOCK`
  rows (channel-last); everything above that is accumulated in float64.
  float16 inputs are converted to float32 once per chunk (NumPy's float16
  conversion, not the arithmetic, dominates their cost).
* ``(x - mean) * scale + bias`` subtracts first, so a large mean never
  cancels after scaling. Channel-first passes fold the additive constant into
  the subtracted center (see :func:`_fold`), with the same error bound.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import numpy as np

from . import exact_samples
from .base import Backend

__all__ = ["NumpyBackend", "BACKEND", "CHUNK_BYTES", "ROW_BLOCK"]

_F64 = np.dtype(np.float64)

#: Bytes of compute dtype per chunk. Small enough that a chunk and its scratch
#: stay in L2/L3 between the passes over it, large enough that NumPy's per-call
#: overhead (about a microsecond per ufunc call) stays small: measured best on
#: a 1 MiB-L2 CPU between 256 KiB and 1 MiB.
CHUNK_BYTES = 1 << 19

#: Channel-last layout: most rows summed in the compute dtype (BLAS gemv, whose
#: SIMD lanes keep float32 sums of 1024 rows within ~5e-7 relative) before the
#: chunk sums are accumulated in float64.
ROW_BLOCK = 1024

#: Channel-first layout: longest run of a row summed in the compute dtype.
MAX_DOT = 4096


class _Scratch(threading.local):
    """Reusable flat work buffers, one set per thread."""

    def __init__(self) -> None:
        self.bufs: dict = {}

    def get(self, slot: int, dtype: np.dtype, size: int) -> np.ndarray:
        key = (slot, dtype.str)
        buf = self.bufs.get(key)
        if buf is None or buf.size < size:
            buf = np.empty(size, dtype=dtype)
            self.bufs[key] = buf
        return buf[:size]

    def ones(self, dtype: np.dtype, size: int) -> np.ndarray:
        key = ("ones", dtype.str)
        buf = self.bufs.get(key)
        if buf is None or buf.size < size:
            buf = np.ones(size, dtype=dtype)
            self.bufs[key] = buf
        return buf[:size]


_SCRATCH = _Scratch()


def _rows(x: np.ndarray, channel_last: bool) -> np.ndarray:
    """2-D view walked by rows: ``(N*C, S)`` channel-first, ``(M, C)`` channel-last."""
    if channel_last:
        return x
    n, c, s = x.shape
    return x.reshape(n * c, s)


def _step(rows: int, width: int, itemsize: int, channel_last: bool) -> int:
    step = max(1, CHUNK_BYTES // max(1, width * itemsize))
    # Channel-last sums run down the rows in the compute dtype (BLAS gemv):
    # at most ROW_BLOCK rows per chunk keeps their rounding error small.
    return min(step, ROW_BLOCK) if channel_last else step


def _chunks(rows: int, step: int) -> Iterator[tuple[int, int]]:
    for r0 in range(0, rows, step):
        yield r0, min(rows, r0 + step)


def _split(width: int) -> int:
    """Length of the pieces a row is summed in: a divisor of ``width``, at most MAX_DOT."""
    if width <= MAX_DOT:
        return width
    for b in range(MAX_DOT, MAX_DOT // 8, -1):
        if width % b == 0:
            return b
    return width  # no good divisor: one BLAS sum per row (still float32 lanes)


class _Vecs:
    """Per-channel vectors laid out for the chunks of :func:`_rows`.

    Channel-first: one value per ``(n, c)`` row, as a column. Channel-last:
    the vector repeated down ``step`` rows, so every elementwise pass is
    between contiguous arrays (NumPy's broadcasting loops are several times
    slower than its contiguous ones).
    """

    def __init__(self, n: int, step: int, channel_last: bool, dtype: np.dtype) -> None:
        self.n, self.step, self.cl, self.dtype = n, step, channel_last, dtype
        self.slot = 10

    def __call__(self, v: np.ndarray) -> np.ndarray:
        v = v.astype(self.dtype, copy=False)
        if not self.cl:
            return np.tile(v, self.n)[:, None]
        c = v.shape[0]
        blk = _SCRATCH.get(self.slot, self.dtype, self.step * c).reshape(self.step, c)
        self.slot += 1
        blk[...] = v
        return blk

    def at(self, v: np.ndarray, r0: int, r1: int) -> np.ndarray:
        return v[: r1 - r0] if self.cl else v[r0:r1]


def _sum_rows(a: np.ndarray, ones: np.ndarray, out: np.ndarray) -> np.ndarray:
    """Channel-first: per-row sums of a ``(k, S)`` chunk into ``out`` (compute dtype)."""
    k, width = a.shape
    b = _split(width)
    if b == width:
        return np.matmul(a, ones[:b], out=out)
    part = a.reshape(-1, b) @ ones[:b]
    return np.add.reduce(part.reshape(k, width // b), axis=1, out=out)


def _dot_rows(a: np.ndarray, d: np.ndarray, out: np.ndarray) -> np.ndarray:
    """Channel-first: ``sum(a * d)`` of each row of a ``(k, S)`` chunk, into ``out``."""
    k, width = a.shape
    b = _split(width)
    if b == width:
        return np.vecdot(a, d, out=out)
    part = np.vecdot(a.reshape(-1, b), d.reshape(-1, b))
    return np.add.reduce(part.reshape(k, width // b), axis=1, out=out)


def _sum_cols(a: np.ndarray, ones: np.ndarray) -> np.ndarray:
    """Channel-last: float64 per-column sum of a ``(k, C)`` chunk (k <= ROW_BLOCK)."""
    return (ones[: a.shape[0]] @ a).astype(_F64)


def _fold(center: np.ndarray, num: np.ndarray, den: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``center - num/den`` in the compute dtype, and the channels where it is unusable.

    Channel-first passes broadcast per-row values, NumPy's slow path, so the
    constant term of ``(x - c) * s + k`` is folded into the subtraction:
    ``(x - (c - k/s)) * s``. Still subtract-first, and the rounding of the
    folded center costs ``eps * (|c*s| + |k|)`` absolute, the same order as
    rounding ``c`` and adding ``k`` separately (even for tiny ``s``). Channels
    with ``s == 0`` or a non-finite result are returned separately and redone
    with the plain formula, so each channel's result depends on that channel
    only.
    """
    d = den.astype(_F64)
    with np.errstate(all="ignore"):
        out = (center.astype(_F64) - num.astype(_F64) / d).astype(center.dtype)
    bad = (d == 0) | ~np.isfinite(out)
    out[bad] = center[bad]
    return out, np.flatnonzero(bad)


def _masked(
    dc: np.ndarray, xc: np.ndarray, vec: _Vecs, act: tuple, r0: int, r1: int, cdt: np.dtype
) -> np.ndarray:
    """A chunk of ``dy`` in the compute dtype, 0 where the forward's ReLU cut.

    ``act`` holds the laid-out ``(mean, scale, bias)`` of the forward: the
    pre-activation ``(x - mean) * scale + bias`` is recomputed with the
    operations of :meth:`NumpyBackend.normalize` (``relu=True``), so the mask
    is exactly where that forward wrote 0. Scratch slots 2-4.
    """
    m, s, b = (vec.at(v, r0, r1) for v in act)
    pre = _SCRATCH.get(3, cdt, xc.size).reshape(xc.shape)
    np.subtract(xc, m, out=pre, dtype=cdt)
    np.multiply(pre, s, out=pre)
    np.add(pre, b, out=pre)
    cut = _SCRATCH.get(4, np.dtype(np.bool_), xc.size).reshape(xc.shape)
    np.less_equal(pre, 0, out=cut)
    d = _SCRATCH.get(2, cdt, dc.size).reshape(dc.shape)
    if d is not dc:
        np.copyto(d, dc)
    np.copyto(d, 0, where=cut)
    return d


def chan_merge(
    means: np.ndarray, m2s: np.ndarray, counts: Any, total: float
) -> tuple[np.ndarray, np.ndarray]:
    """Chan's merge of per-piece ``(mean, M2)`` rows (float64) into one per channel.

    ``means``/``m2s`` have one row per piece; ``counts`` broadcasts against
    them (elements per piece) and sums to ``total``.
    """
    mean = (means * counts).sum(axis=0) / total
    dm = means - mean
    m2 = m2s.sum(axis=0) + (dm * dm * counts).sum(axis=0)
    return mean, np.maximum(m2, 0.0)


def _moments_f64(
    x: np.ndarray, channel_last: bool, channels: np.ndarray, mean: np.ndarray, m2: np.ndarray
) -> None:
    """Two-pass float64 mean and M2 of ``channels``, written into ``mean``/``m2``."""
    with np.errstate(all="ignore"):
        for c in channels:
            v = (x[:, c] if channel_last else x[:, c, :]).astype(_F64)
            mu = v.mean()
            d = v - mu
            mean[c] = mu + d.mean()
            m2[c] = max(float(np.dot(d.ravel(), d.ravel()) - d.sum() ** 2 / d.size), 0.0)


class NumpyBackend(Backend):
    """Batch-norm primitives on NumPy arrays (see :mod:`.base`)."""

    name = "numpy"
    xp = np
    #: reproducible=True: the NumPy reference primitives (inherited by numba)
    exact = exact_samples

    def owns(self, a: Any) -> bool:
        """True for NumPy arrays."""
        return isinstance(a, np.ndarray)

    def device_of(self, a: Any) -> str:
        """Always ``"cpu"``."""
        return "cpu"

    def ascontiguous(self, a: np.ndarray) -> np.ndarray:
        """``a`` or a C-contiguous copy of it."""
        return np.ascontiguousarray(a)

    def asarray(self, a: Any, dtype: Any = None) -> np.ndarray:
        """``numpy.asarray``."""
        return np.asarray(a, dtype=dtype)

    def to_host(self, a: np.ndarray) -> np.ndarray:
        """The array itself."""
        return a

    def moments(self, x: np.ndarray, channel_last: bool, cdt: Any) -> tuple[np.ndarray, np.ndarray]:
        """Local per-channel mean and M2, float64 (corrected two-pass per chunk, Chan merge)."""
        cdt = np.dtype(cdt)
        x2 = _rows(x, channel_last)
        rows, width = x2.shape
        step = _step(rows, width, cdt.itemsize, channel_last)
        same = x.dtype == cdt
        ones = _SCRATCH.ones(cdt, max(step, width))
        if channel_last:
            nck = -(-rows // step)
            c0, s1, q = (np.empty((nck, width), dtype=_F64) for _ in range(3))
            cnt = np.empty((nck, 1), dtype=_F64)
            for i, (r0, r1) in enumerate(_chunks(rows, step)):
                xc = x2[r0:r1]
                t = _SCRATCH.get(0, cdt, xc.size).reshape(xc.shape)
                if not same:
                    np.copyto(t, xc)  # float16 input: convert once, then work in place
                    xc = t
                n = r1 - r0
                cnt[i] = n
                c = (_sum_cols(xc, ones) / n).astype(cdt)
                c0[i] = c
                np.subtract(xc, c, out=t, dtype=cdt)
                s1[i] = _sum_cols(t, ones)
                np.multiply(t, t, out=t)
                q[i] = _sum_cols(t, ones)
            w: Any = cnt
        else:
            # one piece per (n, c) row of S values; per-row results written in place
            c0, s1, q = (np.empty(rows, dtype=cdt) for _ in range(3))
            for r0, r1 in _chunks(rows, step):
                xc = x2[r0:r1]
                t = _SCRATCH.get(0, cdt, xc.size).reshape(xc.shape)
                if not same:
                    np.copyto(t, xc)  # float16 input: convert once, then work in place
                    xc = t
                c = c0[r0:r1]
                _sum_rows(xc, ones, out=c)
                np.multiply(c, cdt.type(1.0 / width), out=c)
                np.subtract(xc, c[:, None], out=t, dtype=cdt)
                _sum_rows(t, ones, out=s1[r0:r1])
                _dot_rows(t, t, out=q[r0:r1])
            shape = (x.shape[0], x.shape[1])
            c0, s1, q = (v.astype(_F64).reshape(shape) for v in (c0, s1, q))
            w = np.float64(width)
        # float64 from here: each piece's mean and M2, then Chan's merge
        m = c0 + s1 / w
        q = q - s1 * s1 / w
        mean, m2 = chan_merge(m, q, w, float(x.size // x.shape[1]))
        bad = ~(np.isfinite(mean) & np.isfinite(m2))
        if bad.any():
            # A compute-dtype sum overflowed (finite float32 data near its
            # limit: 1024 values of 4e35 sum past 3.4e38), or the channel
            # holds Inf/NaN. Redo those channels in float64, where finite
            # float32/float16 inputs cannot overflow; Inf/NaN stay non-finite.
            _moments_f64(x, channel_last, np.flatnonzero(bad), mean, m2)
        return mean, m2

    def normalize(
        self,
        x: np.ndarray,
        channel_last: bool,
        mean: np.ndarray,
        scale: np.ndarray,
        bias: np.ndarray,
        out_dtype: Any,
        relu: bool = False,
    ) -> np.ndarray:
        """``(x - mean) * scale + bias``; subtracting first avoids cancellation.

        ``relu``: ``max(y, 0)`` on each chunk while it is in cache; the
        channel-first fold is skipped so that the backward's mask
        (:func:`_masked`) recomputes exactly these values.
        """
        cdt = mean.dtype
        out_dtype = np.dtype(out_dtype)
        y = np.empty(x.shape, dtype=out_dtype)
        x2, y2 = _rows(x, channel_last), _rows(y, channel_last)
        step = _step(x2.shape[0], x2.shape[1], cdt.itemsize, channel_last)
        vec = _Vecs(x.shape[0], step, channel_last, cdt)
        if not channel_last and not relu:
            # (x - (mean - bias/scale)) * scale: two broadcast passes instead of three
            folded, redo = _fold(mean, bias, scale)
            m, s = vec(folded), vec(scale)
            for r0, r1 in _chunks(x2.shape[0], step):
                xc, yc = x2[r0:r1], y2[r0:r1]
                t = _SCRATCH.get(0, cdt, xc.size).reshape(xc.shape) if yc.dtype != cdt else yc
                np.subtract(xc, m[r0:r1], out=t, dtype=cdt)
                np.multiply(t, s[r0:r1], out=yc)
            for c in redo:
                t = np.subtract(x[:, c], mean[c], dtype=cdt)
                t *= scale[c]
                t += bias[c]
                y[:, c] = t
            return y
        m, s, b = vec(mean), vec(scale), vec(bias)
        direct = out_dtype == cdt
        for r0, r1 in _chunks(x2.shape[0], step):
            xc, yc = x2[r0:r1], y2[r0:r1]
            t = yc if direct else _SCRATCH.get(0, cdt, xc.size).reshape(xc.shape)
            np.subtract(xc, vec.at(m, r0, r1), out=t, dtype=cdt)
            np.multiply(t, vec.at(s, r0, r1), out=t)
            np.add(t, vec.at(b, r0, r1), out=yc)
            if relu:
                np.maximum(yc, 0, out=yc)  # NaN kept, as the mask's ``pre <= 0``
        return y

    def backward_reduce(
        self,
        dy: np.ndarray,
        x: np.ndarray,
        channel_last: bool,
        mean: np.ndarray,
        invstd: np.ndarray,
        relu: tuple | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Local ``sum(dy)`` and ``sum(dy * (x - mean)) * invstd`` (float64)."""
        cdt = mean.dtype
        x2, d2 = _rows(x, channel_last), _rows(dy, channel_last)
        rows, width = x2.shape
        step = _step(rows, width, cdt.itemsize, channel_last)
        vec = _Vecs(x.shape[0], step, channel_last, cdt)
        m = vec(mean)
        act = None if relu is None else (m, vec(relu[0]), vec(relu[1]))
        same = dy.dtype == cdt
        ones = _SCRATCH.ones(cdt, max(step, width))
        if channel_last:
            nck = -(-rows // step)
            s_dy, s_dxm = np.empty((nck, width), _F64), np.empty((nck, width), _F64)
        else:
            s_dy, s_dxm = np.empty(rows, cdt), np.empty(rows, cdt)
        for i, (r0, r1) in enumerate(_chunks(rows, step)):
            xc, dc = x2[r0:r1], d2[r0:r1]
            t = _SCRATCH.get(0, cdt, xc.size).reshape(xc.shape)
            if not same:
                # float16 dy: convert it once; BLAS sums and dots in the compute dtype
                dcf = _SCRATCH.get(2, cdt, dc.size).reshape(dc.shape)
                np.copyto(dcf, dc)
                dc = dcf
            if act is not None:
                dc = _masked(dc, xc, vec, act, r0, r1, cdt)
            np.subtract(xc, vec.at(m, r0, r1), out=t, dtype=cdt)
            if channel_last:
                s_dy[i] = _sum_cols(dc, ones)
                np.multiply(t, dc, out=t)
                s_dxm[i] = _sum_cols(t, ones)
            else:
                _sum_rows(dc, ones, out=s_dy[r0:r1])
                _dot_rows(t, dc, out=s_dxm[r0:r1])
        if channel_last:
            sum_dy, sum_dxm = s_dy.sum(axis=0), s_dxm.sum(axis=0)
        else:
            shape = (x.shape[0], x.shape[1])
            sum_dy = s_dy.reshape(shape).sum(axis=0, dtype=_F64)
            sum_dxm = s_dxm.reshape(shape).sum(axis=0, dtype=_F64)
        return sum_dy, sum_dxm * invstd.astype(_F64)

    def backward_elemt(
        self,
        dy: np.ndarray,
        x: np.ndarray,
        channel_last: bool,
        mean: np.ndarray,
        a: np.ndarray,
        mean_dy: np.ndarray,
        b: np.ndarray,
        out_dtype: Any,
        relu: tuple | None = None,
    ) -> np.ndarray:
        """``a * (dy - mean_dy) - b * (x - mean)``."""
        cdt = mean.dtype
        out_dtype = np.dtype(out_dtype)
        dx = np.empty(x.shape, dtype=out_dtype)
        x2, d2, o2 = _rows(x, channel_last), _rows(dy, channel_last), _rows(dx, channel_last)
        step = _step(x2.shape[0], x2.shape[1], cdt.itemsize, channel_last)
        vec = _Vecs(x.shape[0], step, channel_last, cdt)
        act = None if relu is None else (vec(mean), vec(relu[0]), vec(relu[1]))
        if not channel_last:
            # a*dy - b*(x - (mean - a*mean_dy/b)): three broadcast passes instead of four
            folded, redo = _fold(mean, a.astype(_F64) * mean_dy, b)
            m, av, bv = vec(folded), vec(a), vec(b)
            for r0, r1 in _chunks(x2.shape[0], step):
                xc, dc, oc = x2[r0:r1], d2[r0:r1], o2[r0:r1]
                if act is not None:
                    dc = _masked(dc, xc, vec, act, r0, r1, cdt)
                t = oc if oc.dtype == cdt else _SCRATCH.get(1, cdt, xc.size).reshape(xc.shape)
                u = _SCRATCH.get(0, cdt, xc.size).reshape(xc.shape)
                np.multiply(dc, av[r0:r1], out=t, dtype=cdt)
                np.subtract(xc, m[r0:r1], out=u, dtype=cdt)
                np.multiply(u, bv[r0:r1], out=u)
                np.subtract(t, u, out=oc)
            for c in redo:
                dyc = dy[:, c]
                if relu is not None:
                    pre = np.subtract(x[:, c], mean[c], dtype=cdt)
                    pre *= relu[0].astype(cdt)[c]
                    pre += relu[1].astype(cdt)[c]
                    dyc = np.where(pre <= 0, dyc.dtype.type(0), dyc)
                t = np.subtract(dyc, mean_dy[c], dtype=cdt)
                t *= a[c]
                t -= np.subtract(x[:, c], mean[c], dtype=cdt) * b[c]
                dx[:, c] = t
            return dx
        m, av, mdy, bv = vec(mean), vec(a), vec(mean_dy), vec(b)
        direct = out_dtype == cdt
        for r0, r1 in _chunks(x2.shape[0], step):
            xc, dc, oc = x2[r0:r1], d2[r0:r1], o2[r0:r1]
            if act is not None:
                dc = _masked(dc, xc, vec, act, r0, r1, cdt)
            t = oc if direct else _SCRATCH.get(1, cdt, xc.size).reshape(xc.shape)
            u = _SCRATCH.get(0, cdt, xc.size).reshape(xc.shape)
            np.subtract(dc, vec.at(mdy, r0, r1), out=t, dtype=cdt)
            np.multiply(t, vec.at(av, r0, r1), out=t)
            np.subtract(xc, vec.at(m, r0, r1), out=u, dtype=cdt)
            np.multiply(u, vec.at(bv, r0, r1), out=u)
            np.subtract(t, u, out=oc)
        return dx


BACKEND = NumpyBackend()
