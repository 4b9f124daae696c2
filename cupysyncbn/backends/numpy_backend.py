"""NumPy backend: the CPU implementation of the batch-norm primitives.

Speed: batch norm is memory-bound, and NumPy has no fused kernels, so every
primitive walks the data in cache-sized chunks (:data:`CHUNK_BYTES`): the few
NumPy passes a formula needs run on a chunk that is still in the L2 cache, and
main memory sees close to the minimum traffic (forward: read x twice, write y;
backward: read x and dy twice, write dx). Scratch buffers are reused between
calls (one set per thread) and results are written with ``out=``.

Accuracy choices (why the code looks the way it does):

* Statistics are computed per chunk with the corrected two-pass algorithm:
  ``c = mean rounded to the compute dtype``, ``d = x - c``,
  ``mean = c + sum(d)/n``, ``M2 = sum(d*d) - sum(d)**2/n``; the pieces are
  merged in float64 with Chan's formula. So M2 is always a centered sum,
  never ``E[x²] - E[x]²``, and the rounding of ``c`` costs nothing.
* Sums over the contiguous spatial axis (channel-first) use NumPy's pairwise
  summation; channel-last sums add at most :data:`ROW_BLOCK` rows in the
  compute dtype and accumulate those partial sums in float64.
* ``(x - mean) * scale + bias`` subtracts first, so a large mean never
  cancels after scaling.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import numpy as np

__all__ = ["NumpyBackend", "BACKEND", "CHUNK_BYTES", "ROW_BLOCK"]

_F64 = np.dtype(np.float64)

#: Bytes of compute dtype per chunk. The elementwise passes touch up to four
#: chunk-sized arrays (x, dy, the output, one scratch): 4 x 128 KiB fits the
#: 512 KiB - 2 MiB L2 caches of current CPUs with room to spare.
CHUNK_BYTES = 1 << 17

#: Channel-last layout: rows added in the compute dtype before float64.
ROW_BLOCK = 32


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


_SCRATCH = _Scratch()


def _rows(x: np.ndarray, channel_last: bool) -> np.ndarray:
    """2-D view walked by rows: ``(N*C, S)`` channel-first, ``(M, C)`` channel-last."""
    if channel_last:
        return x
    n, c, s = x.shape
    return x.reshape(n * c, s)


def _per_row(v: np.ndarray, n: int, channel_last: bool) -> np.ndarray:
    """Per-channel vector laid out to broadcast against chunks of :func:`_rows`."""
    if channel_last:
        return v
    return np.tile(v, n)[:, None]


def _chunks(rows: int, row_len: int, itemsize: int) -> Iterator[tuple[int, int]]:
    step = max(1, CHUNK_BYTES // max(1, row_len * itemsize))
    for r0 in range(0, rows, step):
        yield r0, min(rows, r0 + step)


def _rowsum(a: np.ndarray, dtype: Any = None) -> np.ndarray:
    """Sums along the contiguous axis (pairwise), one per row."""
    return np.add.reduce(a, axis=1, dtype=dtype)


def _colsum(a: np.ndarray, dtype: Any = None) -> np.ndarray:
    """Per-column float64 sums of a ``(k, C)`` chunk, in blocks of ROW_BLOCK rows."""
    k, c = a.shape
    b = k // ROW_BLOCK
    if b == 0:
        return np.add.reduce(a, axis=0, dtype=_F64)
    part = np.add.reduce(a[: b * ROW_BLOCK].reshape(b, ROW_BLOCK, c), axis=1, dtype=dtype)
    tot = np.add.reduce(part, axis=0, dtype=_F64)
    if k > b * ROW_BLOCK:
        tot += np.add.reduce(a[b * ROW_BLOCK:], axis=0, dtype=_F64)
    return tot


def _vec(v: np.ndarray, r0: int, r1: int, channel_last: bool) -> np.ndarray:
    return v if channel_last else v[r0:r1]


class NumpyBackend:
    """Batch-norm primitives on NumPy arrays (see :mod:`.base`)."""

    name = "numpy"
    xp = np

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
        sum_dt = cdt if x.dtype != cdt else None
        cnt, means, m2s = [], [], []
        for r0, r1 in _chunks(rows, width, cdt.itemsize):
            xc = x2[r0:r1]
            t = _SCRATCH.get(0, cdt, xc.size).reshape(xc.shape)
            if channel_last:
                n = r1 - r0
                c0 = (_colsum(xc, sum_dt) / n).astype(cdt)
                np.subtract(xc, c0, out=t, dtype=cdt)
                s1 = _colsum(t)
                np.multiply(t, t, out=t)
                q = _colsum(t)
            else:
                n = width
                c0 = (_rowsum(xc, sum_dt) / n).astype(cdt)
                np.subtract(xc, c0[:, None], out=t, dtype=cdt)
                s1 = _rowsum(t).astype(_F64)
                np.multiply(t, t, out=t)
                q = _rowsum(t).astype(_F64)
            cnt.append(n)
            means.append(c0 + s1 / n)
            m2s.append(q - s1 * s1 / n)
        if channel_last:
            # pieces: one (C,) row per chunk, chunk k holding cnt[k] rows
            w = np.asarray(cnt, dtype=_F64)[:, None]
            m = np.stack(means)
            q = np.stack(m2s)
        else:
            # pieces: one per (n, c) row, S values each
            n_, c_ = x.shape[0], x.shape[1]
            w = np.float64(x.shape[2])
            m = np.concatenate(means).reshape(n_, c_)
            q = np.concatenate(m2s).reshape(n_, c_)
        total = float(x.size // x.shape[1])
        mean = (m * w).sum(axis=0) / total
        dm = m - mean
        m2 = q.sum(axis=0) + (dm * dm * w).sum(axis=0)
        return mean, np.maximum(m2, 0.0)

    def normalize(
        self,
        x: np.ndarray,
        channel_last: bool,
        mean: np.ndarray,
        scale: np.ndarray,
        bias: np.ndarray,
        out_dtype: Any,
    ) -> np.ndarray:
        """``(x - mean) * scale + bias``; subtracting first avoids cancellation."""
        cdt = mean.dtype
        out_dtype = np.dtype(out_dtype)
        y = np.empty(x.shape, dtype=out_dtype)
        x2, y2 = _rows(x, channel_last), _rows(y, channel_last)
        n = x.shape[0]
        m, s, b = (_per_row(v, n, channel_last) for v in (mean, scale, bias))
        direct = out_dtype == cdt
        for r0, r1 in _chunks(*x2.shape, cdt.itemsize):
            xc, yc = x2[r0:r1], y2[r0:r1]
            t = yc if direct else _SCRATCH.get(0, cdt, xc.size).reshape(xc.shape)
            np.subtract(xc, _vec(m, r0, r1, channel_last), out=t, dtype=cdt)
            np.multiply(t, _vec(s, r0, r1, channel_last), out=t)
            np.add(t, _vec(b, r0, r1, channel_last), out=yc)
        return y

    def backward_reduce(
        self,
        dy: np.ndarray,
        x: np.ndarray,
        channel_last: bool,
        mean: np.ndarray,
        invstd: np.ndarray,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Local ``sum(dy)`` and ``sum(dy * (x - mean)) * invstd`` (float64)."""
        cdt = mean.dtype
        x2, d2 = _rows(x, channel_last), _rows(dy, channel_last)
        n = x.shape[0]
        m = _per_row(mean, n, channel_last)
        sum_dt = cdt if dy.dtype != cdt else None
        s_dy, s_dxm = [], []
        for r0, r1 in _chunks(*x2.shape, cdt.itemsize):
            xc, dc = x2[r0:r1], d2[r0:r1]
            t = _SCRATCH.get(0, cdt, xc.size).reshape(xc.shape)
            np.subtract(xc, _vec(m, r0, r1, channel_last), out=t, dtype=cdt)
            np.multiply(t, dc, out=t, dtype=cdt)
            if channel_last:
                s_dy.append(_colsum(dc, sum_dt))
                s_dxm.append(_colsum(t))
            else:
                s_dy.append(_rowsum(dc, sum_dt))
                s_dxm.append(_rowsum(t))
        if channel_last:
            sum_dy = np.add.reduce(np.stack(s_dy), axis=0)
            sum_dxm = np.add.reduce(np.stack(s_dxm), axis=0)
        else:
            shape = (n, x.shape[1])
            sum_dy = np.add.reduce(np.concatenate(s_dy).reshape(shape), axis=0, dtype=_F64)
            sum_dxm = np.add.reduce(np.concatenate(s_dxm).reshape(shape), axis=0, dtype=_F64)
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
    ) -> np.ndarray:
        """``a * (dy - mean_dy) - b * (x - mean)``."""
        cdt = mean.dtype
        out_dtype = np.dtype(out_dtype)
        dx = np.empty(x.shape, dtype=out_dtype)
        x2, d2, o2 = _rows(x, channel_last), _rows(dy, channel_last), _rows(dx, channel_last)
        n = x.shape[0]
        m, av, mdy, bv = (_per_row(v, n, channel_last) for v in (mean, a, mean_dy, b))
        direct = out_dtype == cdt
        cl = channel_last
        for r0, r1 in _chunks(*x2.shape, cdt.itemsize):
            xc, dc, oc = x2[r0:r1], d2[r0:r1], o2[r0:r1]
            t = oc if direct else _SCRATCH.get(1, cdt, xc.size).reshape(xc.shape)
            u = _SCRATCH.get(0, cdt, xc.size).reshape(xc.shape)
            np.subtract(dc, _vec(mdy, r0, r1, cl), out=t, dtype=cdt)
            np.multiply(t, _vec(av, r0, r1, cl), out=t)
            np.subtract(xc, _vec(m, r0, r1, cl), out=u, dtype=cdt)
            np.multiply(u, _vec(bv, r0, r1, cl), out=u)
            np.subtract(t, u, out=oc)
        return dx


BACKEND = NumpyBackend()
