"""NumPy backend: the CPU implementation of the batch-norm primitives.

Accuracy choices (why the code looks the way it does):

* Sums over the contiguous spatial axis use NumPy's pairwise summation in the
  compute dtype, and the remaining axis is accumulated in float64, so float32
  sums keep ~1e-7 relative error for any batch size.
* M2 is a second, centered pass (``sum((x - mean)**2)``), never
  ``E[x²] - E[x]²``.
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["NumpyBackend", "BACKEND"]

_F64 = np.dtype(np.float64)


def _bcast(v: np.ndarray, channel_last: bool) -> np.ndarray:
    # Per-channel vector shaped to broadcast against (N, C, S) or (M, C).
    return v if channel_last else v[:, None]


def _channel_sum(t: np.ndarray, channel_last: bool) -> np.ndarray:
    """Per-channel sum in float64 of a canonical-layout array."""
    if channel_last:
        # Rows are accumulated sequentially, so accumulate in float64.
        return np.add.reduce(t, axis=0, dtype=_F64)
    # Pairwise over the contiguous axis S, float64 over N.
    return np.add.reduce(np.add.reduce(t, axis=2), axis=0, dtype=_F64)


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
        """Local per-channel mean and M2, float64 (two-pass, centered)."""
        c = x.shape[1]
        n = x.size // c
        xc = x if x.dtype == cdt else x.astype(cdt)
        mean = _channel_sum(xc, channel_last) / n
        d = np.subtract(xc, _bcast(mean.astype(cdt), channel_last), dtype=cdt)
        np.multiply(d, d, out=d)
        # Centering on the mean rounded to cdt adds n*(rounding)^2 to M2:
        # (eps*mean/std)^2 relative, 4e-7 for float32 data at mean/std = 1e4.
        return mean, _channel_sum(d, channel_last)

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
        t = np.subtract(x, _bcast(mean, channel_last), dtype=cdt)
        np.multiply(t, _bcast(scale, channel_last), out=t)
        np.add(t, _bcast(bias, channel_last), out=t)
        return t if t.dtype == out_dtype else t.astype(out_dtype)

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
        dyc = dy if dy.dtype == cdt else dy.astype(cdt)
        sum_dy = _channel_sum(dyc, channel_last)
        t = np.subtract(x, _bcast(mean, channel_last), dtype=cdt)
        np.multiply(t, dyc, out=t)
        sum_dy_xmu = _channel_sum(t, channel_last)
        return sum_dy, sum_dy_xmu * invstd.astype(_F64)

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
        t = np.subtract(dy, _bcast(mean_dy, channel_last), dtype=cdt)
        np.multiply(t, _bcast(a, channel_last), out=t)
        u = np.subtract(x, _bcast(mean, channel_last), dtype=cdt)
        np.multiply(u, _bcast(b, channel_last), out=u)
        np.subtract(t, u, out=t)
        return t if t.dtype == out_dtype else t.astype(out_dtype)


BACKEND = NumpyBackend()
