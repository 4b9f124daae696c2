"""Fused CPU backend: the batch-norm primitives as numba-compiled loops.

The default for NumPy arrays whenever numba is importable (the ``fast`` extra:
``pip install "cupysyncbn[fast]"``); ``CUPYSYNCBN_CPU_BACKEND=numpy`` opts out
(see :func:`cupysyncbn.backends.cpu_backend`). The NumPy backend stays the
fallback and the reference.

Why: batch norm is memory-bound, and NumPy needs several passes per formula
(:mod:`.numpy_backend` explains the costs). Here every primitive is one loop
over the data: ``normalize`` reads x and writes y once, ``backward_reduce``
reads x and dy once, ``backward_elemt`` reads both and writes dx once, and
``moments`` reads x once (float64 inputs: a second pass over a piece still
in cache). The kernels are single-threaded (one MPI rank is one
process), compiled with ``cache=True`` and without ``fastmath`` (IEEE
semantics, no reassociation), and release the GIL. Compilation happens once
per machine and signature (a few seconds on first use); later processes load
the machine code from ``__pycache__`` next to this file (or numba's user cache
directory, or ``NUMBA_CACHE_DIR``) in well under a second.

Accuracy (same contract as the NumPy backend, never worse):

* ``moments``: shifted sums per piece in float64 (a channel-first row
  piece of at most :data:`PIECE` values, or a channel-last block of rows that
  fits in cache): ``d = x - c``, ``mean = c + sum(d)/k``,
  ``M2 = sum(d*d) - sum(d)**2/k``; pieces merged per channel with Chan's
  formula in float64. Never ``E[x²] - E[x]²``. For float16/float32 inputs
  ``c`` is the piece's first value and the piece is read once: since ``c``
  belongs to the piece, ``k * (mean - c)**2 <= k * M2`` and cancellation
  costs at most a factor ``k + 1`` (below 1e-12 relative in float64). For
  float64 inputs (where ``x - c`` rounds) ``c = sum(x)/k``: a corrected
  two-pass whose second pass hits cache.
* Every reduction accumulates in float64 (the NumPy backend sums up to 4096
  values in the compute dtype first). Channel-first rows are summed in
  :data:`LANES` independent float64 lanes and channel-last rows regrouped
  into long rows (:data:`WIDE`): loops the compiler vectorizes without
  reassociating any sum.
* Elementwise formulas run in the compute dtype in the same order as the
  NumPy backend's channel-last path: ``(x - mean) * scale + bias`` and
  ``a * (dy - mean_dy) - b * (x - mean)``, subtracting first.
* float16 arrays are passed as ``uint16`` views (numba has no CPU float16)
  and converted per element: with F16C by LLVM's ``fpext``/``fptrunc``
  (vectorized, round to nearest even), otherwise through a 65536-entry
  float32 table (exact) and integer round-to-nearest-even (NumPy's rules).
  A float64 result for a float16 output (a float64 layer) is rounded
  through float32 (differs from a direct rounding only on exact ties).

Outputs (``y``, ``dx``) of 1 MiB and more come from :data:`POOL`, which
hands an array out again only once nothing else refers to it (see
:class:`OutputPool`): no page faults on fresh memory in a training loop.

Inputs other than float16/float32/float64 (bfloat16) go to the NumPy backend.
"""

from __future__ import annotations

import sys
import threading
from typing import Any

import llvmlite.binding as llb
import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic, overload

from .numpy_backend import NumpyBackend, chan_merge

__all__ = ["NumbaBackend", "BACKEND", "PIECE", "GROUP", "LANES", "OutputPool", "POOL", "warm_up"]

_F64 = np.dtype(np.float64)
_NATIVE = (np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64))

#: Channel-first moments: longest run of a row handled by one two-pass (its
#: second pass must hit cache: 4096 float64 values = 32 KiB).
PIECE = 4096
#: Channel-last moments: values per row block (about 256 KiB of float32).
BLOCK_VALUES = 1 << 16
#: Channel-last: ``R = WIDE // C`` rows are regrouped into one "wide" row of
#: ``R*C`` values (per-channel vectors tiled R times), so every kernel's inner
#: loop is long and vectorized; rows left over are a second, short call.
WIDE = 256
#: Independent float64 accumulators per channel-first row sum (a runtime-length
#: loop over them is what the compiler vectorizes best).
LANES = 64
#: Channel-first rows shorter than ``2 * LANES`` (late-ResNet 7x7 = 49 values)
#: leave the lanes nearly empty; there a whole row is the lanes (``acc[t] +=
#: x[i, j, t]``, vectorized along the row) and up to GROUP samples of one
#: channel are one piece: GROUP concurrent streams through memory, one merge
#: per piece (float64 inputs: a second pass over at most PIECE values still
#: in cache).
GROUP = 16
#: The backward reduction's GROUP (samples per per-channel total). With the
#: CBLOCK layout (one long loop per sample) 16 is twice as fast as 8 in cache
#: for one rank's (16,2048,7,7) (0.41 ms against 0.85 with 8 and rows one at
#: a time) and as fast with cold caches (1.05 ms), where software prefetch no
#: longer helps.
RGROUP = 16
#: Short rows: channels ahead whose rows are prefetched explicitly.
AHEAD = 4
#: Backward reduction of short rows: neighbouring channels whose rows (contiguous
#: within a sample) one vectorized loop covers.
CBLOCK = 8

#: float16 bit pattern -> float32 value, exact for all 65536 patterns (NaNs too).
_F16_TABLE = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16).view(np.float16).astype(
    np.float32
)
_NO_TABLE = np.zeros(1, dtype=np.float32)

_JIT = {"cache": True, "fastmath": False, "nogil": True}

#: float16 <-> float32 as LLVM ``fpext``/``fptrunc`` (vectorized F16C
#: instructions) when the CPU has F16C; otherwise the portable table and
#: integer rounding below (no runtime library call needed).
_HW_F16 = bool(llb.get_host_cpu_features().get("f16c", False))


# ------------------------------------------------------------ element load/store
def _ld(a: Any, i: Any, tab: Any) -> Any:  # pragma: no cover - replaced by the overload
    """Element ``i`` of a 1-D array as a float (float16 bits through ``tab``)."""
    raise NotImplementedError


@intrinsic
def _h2f(typingctx, h):  # noqa: ANN001, ANN202 - numba typing hook
    """float16 bits (uint16) -> float32, exact (LLVM ``fpext``)."""
    sig = types.float32(types.uint16)

    def codegen(context, builder, signature, args):  # noqa: ANN001, ANN202
        return builder.fpext(builder.bitcast(args[0], ir.HalfType()), ir.FloatType())

    return sig, codegen


@intrinsic
def _f2h(typingctx, v):  # noqa: ANN001, ANN202 - numba typing hook
    """float32 -> float16 bits, round to nearest even (LLVM ``fptrunc``)."""
    sig = types.uint16(types.float32)

    def codegen(context, builder, signature, args):  # noqa: ANN001, ANN202
        return builder.bitcast(builder.fptrunc(args[0], ir.HalfType()), ir.IntType(16))

    return sig, codegen


@overload(_ld, inline="always")
def _ld_impl(a, i, tab):  # noqa: ANN001, ANN202 - numba typing hook
    if a.dtype == types.uint16:
        if _HW_F16:
            return lambda a, i, tab: _h2f(a[i])
        return lambda a, i, tab: tab[a[i]]
    return lambda a, i, tab: a[i]


def _ld3(a: Any, i: Any, j: Any, t: Any, tab: Any) -> Any:  # pragma: no cover - overloaded
    """Element ``a[i, j, t]`` of a 3-D array as a float (float16 bits through ``tab``).

    The short-row loops index ``x[i, j, t]`` directly instead of taking a row
    view per ``(i, j)``: with rows of a few dozen values, per-row overhead
    matters as much as the row's work.
    """
    raise NotImplementedError


@overload(_ld3, inline="always")
def _ld3_impl(a, i, j, t, tab):  # noqa: ANN001, ANN202 - numba typing hook
    if a.dtype == types.uint16:
        if _HW_F16:
            return lambda a, i, j, t, tab: _h2f(a[i, j, t])
        return lambda a, i, j, t, tab: tab[a[i, j, t]]
    return lambda a, i, j, t, tab: a[i, j, t]


def _shifted(a: Any) -> Any:  # pragma: no cover - replaced by the overload
    """Whether ``moments`` runs one pass (shift by a value of the piece) on ``a``.

    A compile-time constant: True for float16 (as uint16 bits) and float32,
    whose differences ``x - c`` are exact or nearly so in float64; False for
    float64, which keeps the corrected two-pass.
    """
    raise NotImplementedError


@overload(_shifted, inline="always")
def _shifted_impl(a):  # noqa: ANN001, ANN202 - numba typing hook
    if a.dtype == types.float64:
        return lambda a: False
    return lambda a: True


@intrinsic
def _prefetch3(typingctx, a, i, j, t):  # noqa: ANN001, ANN202 - numba typing hook
    """Hint the cache line of ``a[i, j, t]`` into cache (LLVM ``llvm.prefetch``).

    No effect on results; the address is computed without bounds checks, so
    callers pass valid indices.
    """
    sig = types.void(a, i, j, t)

    def codegen(context, builder, signature, args):  # noqa: ANN001, ANN202
        aryty = signature.args[0]
        ary = context.make_array(aryty)(context, builder, args[0])
        idx = [context.cast(builder, v, ty, types.intp)
               for v, ty in zip(args[1:], signature.args[1:])]
        ptr = cgutils.get_item_pointer(context, builder, aryty, ary, idx,
                                       wraparound=False, boundscheck=False)
        i8p = ir.IntType(8).as_pointer()
        i32 = ir.IntType(32)
        fnty = ir.FunctionType(ir.VoidType(), [i8p, i32, i32, i32])
        fn = cgutils.get_or_insert_function(builder.module, fnty, "llvm.prefetch.p0")
        # read, high locality, data cache
        builder.call(fn, [builder.bitcast(ptr, i8p), i32(0), i32(3), i32(1)])
        return context.get_dummy_value()

    return sig, codegen


@njit(inline="always", **_JIT)
def _prefetch_row(a, i, j, s):  # noqa: ANN001, ANN202
    """Prefetch the row ``a[i, j, :s]`` (every 64-byte line of it)."""
    step = max(1, 64 // a.itemsize)
    for t in range(0, s, step):
        _prefetch3(a, i, j, t)
    _prefetch3(a, i, j, s - 1)


@intrinsic
def _f32_bits(typingctx, v):  # noqa: ANN001, ANN202 - numba typing hook
    """Bit pattern of a float32 as uint32 (an LLVM bitcast)."""
    sig = types.uint32(types.float32)

    def codegen(context, builder, signature, args):  # noqa: ANN001, ANN202
        return builder.bitcast(args[0], ir.IntType(32))

    return sig, codegen


@njit(inline="always", **_JIT)
def _half_bits(v):  # noqa: ANN001, ANN202
    """float32 -> float16 bit pattern, round to nearest even (NumPy's rules)."""
    u = _f32_bits(np.float32(v))
    sign = np.uint32((u >> np.uint32(16)) & np.uint32(0x8000))
    a = u & np.uint32(0x7FFFFFFF)
    if a >= np.uint32(0x7F800000):  # inf or nan
        sig = a & np.uint32(0x7FFFFF)
        if sig == 0:
            return np.uint16(sign | np.uint32(0x7C00))
        r = np.uint32(0x7C00) + (sig >> np.uint32(13))
        if r == np.uint32(0x7C00):
            r += np.uint32(1)  # keep it a NaN
        return np.uint16(sign | r)
    if a >= np.uint32(0x477FF000):  # rounds to a value above 65504: inf
        return np.uint16(sign | np.uint32(0x7C00))
    if a >= np.uint32(0x38800000):  # normal half
        a = a + np.uint32(0xC8000FFF) + ((a >> np.uint32(13)) & np.uint32(1))
        return np.uint16(sign | ((a >> np.uint32(13)) & np.uint32(0x7FFF)))
    e = a >> np.uint32(23)
    if e < np.uint32(102):  # below half the smallest subnormal (or exactly 0)
        return np.uint16(sign)
    mant = (a & np.uint32(0x7FFFFF)) | np.uint32(0x800000)
    shift = np.uint32(126) - e  # 14..24
    q = mant >> shift
    rem = mant & ((np.uint32(1) << shift) - np.uint32(1))
    half = np.uint32(1) << (shift - np.uint32(1))
    if rem > half or (rem == half and (q & np.uint32(1)) != 0):
        q += np.uint32(1)
    return np.uint16(sign | q)


def _st(o: Any, i: Any, v: Any) -> None:  # pragma: no cover - replaced by the overload
    """Store ``v`` into element ``i`` of a 1-D output (float16 as bits)."""
    raise NotImplementedError


@overload(_st, inline="always")
def _st_impl(o, i, v):  # noqa: ANN001, ANN202 - numba typing hook
    if o.dtype == types.uint16:
        if _HW_F16:

            def st16(o, i, v):  # noqa: ANN001, ANN202
                o[i] = _f2h(np.float32(v))

            return st16

        def st16_portable(o, i, v):  # noqa: ANN001, ANN202
            o[i] = _half_bits(v)

        return st16_portable

    def st(o, i, v):  # noqa: ANN001, ANN202
        o[i] = v

    return st


# ----------------------------------------------------------------- reductions
@njit(inline="always", **_JIT)
def _lane_sum(a, lo, hi, tab, acc):  # noqa: ANN001, ANN202
    """float64 sum of ``a[lo:hi]`` in :data:`LANES` independent lanes.

    The lanes run down a ``(k, LANES)`` view, an elementwise loop the
    compiler vectorizes without reassociating any sum.
    """
    lanes = acc.shape[0]
    k = (hi - lo) // lanes
    a2 = a[lo : lo + k * lanes].reshape(k, lanes)
    acc[:] = 0.0
    for r in range(k):
        ar = a2[r]
        for j in range(lanes):
            acc[j] += np.float64(_ld(ar, j, tab))
    s = 0.0
    for i in range(lo + k * lanes, hi):
        s += np.float64(_ld(a, i, tab))
    for j in range(lanes):
        s += acc[j]
    return s


@njit(inline="always", **_JIT)
def _lane_dev(a, lo, hi, c, tab, acc, acc2):  # noqa: ANN001, ANN202
    """``(sum(d), sum(d*d))`` of ``d = a[lo:hi] - c`` in float64 lanes."""
    lanes = acc.shape[0]
    k = (hi - lo) // lanes
    a2 = a[lo : lo + k * lanes].reshape(k, lanes)
    acc[:] = 0.0
    acc2[:] = 0.0
    for r in range(0, k - 1, 2):  # two rows per accumulator update: half the stores
        ar = a2[r]
        br = a2[r + 1]
        for j in range(lanes):
            d = np.float64(_ld(ar, j, tab)) - c
            e = np.float64(_ld(br, j, tab)) - c
            acc[j] += d + e
            acc2[j] += d * d + e * e
    if k % 2:
        ar = a2[k - 1]
        for j in range(lanes):
            d = np.float64(_ld(ar, j, tab)) - c
            acc[j] += d
            acc2[j] += d * d
    s = 0.0
    q = 0.0
    for i in range(lo + k * lanes, hi):
        d = np.float64(_ld(a, i, tab)) - c
        s += d
        q += d * d
    for j in range(lanes):
        s += acc[j]
        q += acc2[j]
    return s, q


@njit(inline="always", **_JIT)
def _lane_moments(a, lo, hi, tab, acc, acc2):  # noqa: ANN001, ANN202
    """``(mean, M2)`` of ``a[lo:hi]``, one pass: ``d = a - c`` with ``c = a[lo]``.

    ``M2 = sum(d*d) - sum(d)**2/k`` loses at most a factor ``k + 1`` to
    cancellation, whatever the data: ``c`` is a value of the piece, so
    ``k * (mean - c)**2 <= k * M2``. With float64 sums of at most PIECE
    values that stays below 1e-12 relative.
    """
    k = np.float64(hi - lo)
    c = np.float64(_ld(a, lo, tab))
    sd, q = _lane_dev(a, lo, hi, c, tab, acc, acc2)
    return c + sd / k, q - sd * sd / k


@njit(inline="always", **_JIT)
def _lane_dot(x, dy, m, tab, acc, acc2):  # noqa: ANN001, ANN202
    """``(sum(dy), sum(dy * (x - m)))`` of two rows in float64 lanes.

    ``x - m`` is rounded to the compute dtype (the type of ``m``) first, as in
    the NumPy backend.
    """
    n = x.shape[0]
    lanes = acc.shape[0]
    k = n // lanes
    x2 = x[: k * lanes].reshape(k, lanes)
    d2 = dy[: k * lanes].reshape(k, lanes)
    acc[:] = 0.0
    acc2[:] = 0.0
    for r in range(k):
        xr = x2[r]
        dr = d2[r]
        for j in range(lanes):
            g = np.float64(_ld(dr, j, tab))
            acc[j] += g
            acc2[j] += g * np.float64(_ld(xr, j, tab) - m)
    s = 0.0
    p = 0.0
    for i in range(k * lanes, n):
        g = np.float64(_ld(dy, i, tab))
        s += g
        p += g * np.float64(_ld(x, i, tab) - m)
    for j in range(lanes):
        s += acc[j]
        p += acc2[j]
    return s, p


@njit(inline="always", **_JIT)
def _total(acc):  # noqa: ANN001, ANN202
    """Sum of a short float64 row in 4 interleaved partial sums.

    One running sum would be a chain of dependent adds (4 cycles each): for
    the 49-value rows of a 7x7 map, done twice per channel and group, that
    chain cost as much as the data pass. Four partials are four independent
    chains (and no less accurate: each adds a quarter of the values).
    """
    n = acc.shape[0]
    s0 = s1 = s2 = s3 = 0.0
    for t in range(0, n - 3, 4):
        s0 += acc[t]
        s1 += acc[t + 1]
        s2 += acc[t + 2]
        s3 += acc[t + 3]
    for t in range(n - n % 4, n):
        s0 += acc[t]
    return (s0 + s1) + (s2 + s3)


@njit(inline="always", **_JIT)
def _total2(acc, acc2):  # noqa: ANN001, ANN202
    """``(_total(acc), _total(acc2))`` in one loop: eight independent chains."""
    n = acc.shape[0]
    s0 = s1 = s2 = s3 = 0.0
    q0 = q1 = q2 = q3 = 0.0
    for t in range(0, n - 3, 4):
        s0 += acc[t]
        s1 += acc[t + 1]
        s2 += acc[t + 2]
        s3 += acc[t + 3]
        q0 += acc2[t]
        q1 += acc2[t + 1]
        q2 += acc2[t + 2]
        q3 += acc2[t + 3]
    for t in range(n - n % 4, n):
        s0 += acc[t]
        q0 += acc2[t]
    return (s0 + s1) + (s2 + s3), (q0 + q1) + (q2 + q3)


@njit(inline="always", **_JIT)
def _chan(cnt, mean, m2, c, k, mb, m2b):  # noqa: ANN001, ANN202
    """Merge a piece (``k`` values, mean ``mb``, M2 ``m2b``) into channel ``c``."""
    na = cnt[c]
    n = na + k
    delta = mb - mean[c]
    mean[c] += delta * (k / n)
    m2[c] += m2b + delta * delta * (na * k / n)
    cnt[c] = n


# -------------------------------------------------------------------- kernels
@njit(**_JIT)
def _moments_cf(x, tab, mean, m2):  # noqa: ANN001, ANN202
    n, c, s = x.shape
    cnt = np.zeros(c, dtype=np.float64)
    if s < 2 * LANES:  # short rows: GROUP samples of a channel per piece
        g = max(1, min(GROUP, PIECE // s))
        acc = np.empty(s, dtype=np.float64)
        acc2 = np.empty(s, dtype=np.float64)
        for i0 in range(0, n, g):
            i1 = min(n, i0 + g)
            k = np.float64((i1 - i0) * s)
            for j in range(c):
                if j + AHEAD < c:  # GROUP rows at once: the prefetcher cannot follow
                    for i in range(i0, i1):
                        _prefetch_row(x, i, j + AHEAD, s)
                if _shifted(x):  # one pass, shifted by a value of the piece
                    cp = np.float64(_ld3(x, i0, j, 0, tab))
                else:
                    acc[:] = 0.0
                    for i in range(i0, i1):
                        for t in range(s):
                            acc[t] += np.float64(_ld3(x, i, j, t, tab))
                    cp = _total(acc) / k
                acc[:] = 0.0
                acc2[:] = 0.0
                for i in range(i0, i1 - 1, 2):  # two samples per update: half the stores
                    for t in range(s):
                        d = np.float64(_ld3(x, i, j, t, tab)) - cp
                        e = np.float64(_ld3(x, i + 1, j, t, tab)) - cp
                        acc[t] += d + e
                        acc2[t] += d * d + e * e
                if (i1 - i0) % 2:
                    for t in range(s):
                        d = np.float64(_ld3(x, i1 - 1, j, t, tab)) - cp
                        acc[t] += d
                        acc2[t] += d * d
                sd, sq = _total2(acc, acc2)
                _chan(cnt, mean, m2, j, k, cp + sd / k, sq - sd * sd / k)
        return
    acc = np.empty(LANES, dtype=np.float64)
    acc2 = np.empty(LANES, dtype=np.float64)
    for i in range(n):
        for j in range(c):
            row = x[i, j]
            for lo in range(0, s, PIECE):
                hi = min(s, lo + PIECE)
                k = np.float64(hi - lo)
                if _shifted(x):  # one pass (see _lane_moments)
                    mb, m2b = _lane_moments(row, lo, hi, tab, acc, acc2)
                    _chan(cnt, mean, m2, j, k, mb, m2b)
                    continue
                cp = _lane_sum(row, lo, hi, tab, acc) / k
                sd, q = _lane_dev(row, lo, hi, cp, tab, acc, acc2)
                _chan(cnt, mean, m2, j, k, cp + sd / k, q - sd * sd / k)


@njit(**_JIT)
def _moments_cl(x, tab, mean, m2):  # noqa: ANN001, ANN202
    rows, c = x.shape
    step = max(1, BLOCK_VALUES // max(1, c))
    cnt = np.zeros(c, dtype=np.float64)
    cs = np.empty(c, dtype=np.float64)
    sd = np.empty(c, dtype=np.float64)
    q = np.empty(c, dtype=np.float64)
    for r0 in range(0, rows, step):
        r1 = min(rows, r0 + step)
        k = np.float64(r1 - r0)
        if _shifted(x):  # one pass, shifted by the block's first row
            xr = x[r0]
            for j in range(c):
                cs[j] = np.float64(_ld(xr, j, tab))
        else:
            cs[:] = 0.0
            for r in range(r0, r1):
                xr = x[r]
                for j in range(c):
                    cs[j] += np.float64(_ld(xr, j, tab))
            for j in range(c):
                cs[j] /= k
        sd[:] = 0.0
        q[:] = 0.0
        for r in range(r0, r1):
            xr = x[r]
            for j in range(c):
                d = np.float64(_ld(xr, j, tab)) - cs[j]
                sd[j] += d
                q[j] += d * d
        for j in range(c):
            _chan(cnt, mean, m2, j, k, cs[j] + sd[j] / k, q[j] - sd[j] * sd[j] / k)


@njit(**_JIT)
def _normalize_cf(x, tab, mean, scale, bias, y):  # noqa: ANN001, ANN202
    n, c, s = x.shape
    for i in range(n):
        for j in range(c):
            m, sc, b = mean[j], scale[j], bias[j]
            xr, yr = x[i, j], y[i, j]
            for t in range(s):
                _st(yr, t, (_ld(xr, t, tab) - m) * sc + b)


@njit(**_JIT)
def _normalize_cl(x, tab, mean, scale, bias, y):  # noqa: ANN001, ANN202
    rows, c = x.shape
    for r in range(rows):
        xr, yr = x[r], y[r]
        for j in range(c):
            _st(yr, j, (_ld(xr, j, tab) - mean[j]) * scale[j] + bias[j])


@njit(**_JIT)
def _bwd_reduce_short(dy, x, tab, mean, sum_dy, sum_dxm):  # noqa: ANN001, ANN202
    """Channel-first rows shorter than ``2 * LANES``: the rows are the lanes.

    Within a sample the rows of CBLOCK neighbouring channels are contiguous,
    so ``acc[u] += dy[i, j0*s + u]`` runs over all of them in one long
    vectorized loop (instead of a loop of a few dozen values and its scalar
    remainder per row), four samples per update; ``mean`` is expanded to one
    value per lane. Then one float64 total per channel and group of RGROUP
    samples.
    """
    n, c, s = x.shape
    x2 = x.reshape(n, c * s)
    d2 = dy.reshape(n, c * s)
    w = CBLOCK * s
    acc = np.empty(w, dtype=np.float64)
    acc2 = np.empty(w, dtype=np.float64)
    mv = np.empty(w, dtype=mean.dtype)
    for i0 in range(0, n, RGROUP):
        i1 = min(n, i0 + RGROUP)
        i4 = i0 + (i1 - i0) // 4 * 4
        for j0 in range(0, c, CBLOCK):
            j1 = min(c, j0 + CBLOCK)
            lo = j0 * s
            ln = (j1 - j0) * s
            for jj in range(j1 - j0):
                m = mean[j0 + jj]
                for t in range(s):
                    mv[jj * s + t] = m
            acc[:ln] = 0.0
            acc2[:ln] = 0.0
            for i in range(i0, i4, 4):  # four samples per update: a quarter of the stores
                xa, xb = x2[i, lo : lo + ln], x2[i + 1, lo : lo + ln]
                xc, xd = x2[i + 2, lo : lo + ln], x2[i + 3, lo : lo + ln]
                da, db = d2[i, lo : lo + ln], d2[i + 1, lo : lo + ln]
                dc, dd = d2[i + 2, lo : lo + ln], d2[i + 3, lo : lo + ln]
                for u in range(ln):
                    mu = mv[u]
                    ga = np.float64(_ld(da, u, tab))
                    gb = np.float64(_ld(db, u, tab))
                    gc = np.float64(_ld(dc, u, tab))
                    gd = np.float64(_ld(dd, u, tab))
                    acc[u] += (ga + gb) + (gc + gd)
                    acc2[u] += ((ga * np.float64(_ld(xa, u, tab) - mu)
                                 + gb * np.float64(_ld(xb, u, tab) - mu))
                                + (gc * np.float64(_ld(xc, u, tab) - mu)
                                   + gd * np.float64(_ld(xd, u, tab) - mu)))
            for i in range(i4, i1):
                xr = x2[i, lo : lo + ln]
                dr = d2[i, lo : lo + ln]
                for u in range(ln):
                    g = np.float64(_ld(dr, u, tab))
                    acc[u] += g
                    acc2[u] += g * np.float64(_ld(xr, u, tab) - mv[u])
            for jj in range(j1 - j0):
                ta, tb = _total2(acc[jj * s : jj * s + s], acc2[jj * s : jj * s + s])
                sum_dy[j0 + jj] += ta
                sum_dxm[j0 + jj] += tb


@njit(**_JIT)
def _bwd_reduce_cf(dy, x, tab, mean, sum_dy, sum_dxm):  # noqa: ANN001, ANN202
    n, c, s = x.shape
    acc = np.empty(LANES, dtype=np.float64)
    acc2 = np.empty(LANES, dtype=np.float64)
    for i in range(n):
        for j in range(c):
            a, b = _lane_dot(x[i, j], dy[i, j], mean[j], tab, acc, acc2)
            sum_dy[j] += a
            sum_dxm[j] += b


@njit(**_JIT)
def _bwd_reduce_cl(dy, x, tab, mean, sum_dy, sum_dxm):  # noqa: ANN001, ANN202
    rows, c = x.shape
    for r in range(rows):
        xr, dr = x[r], dy[r]
        for j in range(c):
            g = np.float64(_ld(dr, j, tab))
            sum_dy[j] += g
            sum_dxm[j] += g * np.float64(_ld(xr, j, tab) - mean[j])


@njit(**_JIT)
def _bwd_elemt_cf(dy, x, tab, mean, a, mean_dy, b, dx):  # noqa: ANN001, ANN202
    n, c, s = x.shape
    for i in range(n):
        for j in range(c):
            m, av, md, bv = mean[j], a[j], mean_dy[j], b[j]
            xr, dr, orow = x[i, j], dy[i, j], dx[i, j]
            for t in range(s):
                _st(orow, t, (_ld(dr, t, tab) - md) * av - (_ld(xr, t, tab) - m) * bv)


@njit(**_JIT)
def _bwd_elemt_cl(dy, x, tab, mean, a, mean_dy, b, dx):  # noqa: ANN001, ANN202
    rows, c = x.shape
    for r in range(rows):
        xr, dr, orow = x[r], dy[r], dx[r]
        for j in range(c):
            _st(orow, j, (_ld(dr, j, tab) - mean_dy[j]) * a[j] - (_ld(xr, j, tab) - mean[j]) * b[j])


# ---------------------------------------------------------------- output pool
def _refs(arrays: list, i: int) -> int:
    """Reference count of ``arrays[i]`` as seen from here."""
    return sys.getrefcount(arrays[i])


#: What :func:`_refs` reports for an entry that only its list holds (measured,
#: not assumed: the interpreter's own share differs between CPython versions).
_POOL_ONLY = _refs([np.empty(0)], 0)
class OutputPool:
    """Output arrays (``y``, ``dx``) handed out again once nobody else refers to them.

    Why: a fresh output of a few MiB or more is a fresh ``mmap`` or freshly
    trimmed heap, so its first write page-faults every 4 KiB page and the
    kernel zeroes it: about as long as the kernel's own pass (with ``y`` and
    ``dx`` of a forward+backward alive at once, glibc's dynamic trim threshold
    returns the memory to the OS after every step). Process-global allocator
    settings (``mallopt``, ``MALLOC_TRIM_THRESHOLD_``) would fix it for the
    whole program; this fixes it for our outputs only.

    Safe by construction: an entry is reused only when CPython's reference
    count shows that the pool's own list is its only holder, so no array,
    view (it holds its base), buffer export or PyTorch tensor made from it
    can observe the reuse. Entries are kept most-recently-used first, at most
    :attr:`entries` of them and only outputs of at least :attr:`min_bytes`
    (smaller ones come from the heap without faults); the memory it holds
    beyond what the program holds anyway is at most ``entries`` outputs.
    ``entries = 0`` turns it off; :meth:`clear` drops everything.
    """

    def __init__(self, entries: int = 4, min_bytes: int = 1 << 20) -> None:
        self.entries = entries
        self.min_bytes = min_bytes
        self._arrays: list[np.ndarray] = []
        self._lock = threading.Lock()

    def empty(self, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
        """An uninitialized C-contiguous array of ``shape`` and ``dtype``."""
        dtype = np.dtype(dtype)
        nbytes = dtype.itemsize * int(np.prod(shape))
        if self.entries <= 0 or nbytes < self.min_bytes:
            return np.empty(shape, dtype=dtype)
        with self._lock:
            arrays = self._arrays
            for i in range(len(arrays)):
                # no local name for arrays[i]: it would count as a holder
                if (arrays[i].shape == shape and arrays[i].dtype == dtype
                        and _refs(arrays, i) <= _POOL_ONLY):
                    a = arrays.pop(i)
                    break
            else:
                a = np.empty(shape, dtype=dtype)
            arrays.insert(0, a)
            del arrays[self.entries :]
            return a

    def clear(self) -> None:
        """Forget every entry (their memory goes back once nobody else holds it)."""
        with self._lock:
            self._arrays.clear()


#: The pool of :class:`NumbaBackend`'s ``normalize`` and ``backward_elemt`` outputs.
POOL = OutputPool()


# -------------------------------------------------------------------- backend
def _bits(a: np.ndarray) -> np.ndarray:
    """float16 arrays as their ``uint16`` bits (numba has no CPU float16)."""
    return a.view(np.uint16) if a.dtype == np.float16 else a


def _table(*arrays: np.ndarray) -> np.ndarray:
    return _F16_TABLE if any(a.dtype == np.float16 for a in arrays) else _NO_TABLE


def _regroup(a: np.ndarray, r: int) -> tuple[np.ndarray, np.ndarray]:
    """Channel-last ``(M, C)`` as ``(M // r, r*C)`` wide rows and the ``M % r`` rows left."""
    m, c = a.shape
    mh = m - m % r
    return a[:mh].reshape(mh // r, r * c), a[mh:]


def _rows_per_wide(x: np.ndarray) -> int:
    m, c = x.shape
    return max(1, min(m, WIDE // max(1, c)))


def _native(*arrays: np.ndarray) -> bool:
    """True if the fused kernels handle these arrays (else: NumPy backend)."""
    return all(
        a.dtype in _NATIVE and a.flags.c_contiguous and a.size > 0 for a in arrays
    ) and len({a.dtype for a in arrays}) == 1


class NumbaBackend(NumpyBackend):
    """Batch-norm primitives on NumPy arrays as fused numba loops (see the module docstring).

    Same arrays, ``name`` and ``xp`` as the NumPy backend (results, buffers and
    error messages do not depend on which CPU backend runs); only the four
    data-sized primitives differ.
    """

    def moments(self, x: np.ndarray, channel_last: bool, cdt: Any) -> tuple[np.ndarray, np.ndarray]:
        """Local per-channel mean and M2, float64 (two-pass per cached piece, Chan merge)."""
        if not _native(x):
            return super().moments(x, channel_last, cdt)
        tab = _table(x)
        if not channel_last:
            mean = np.zeros(x.shape[1], dtype=_F64)
            m2 = np.zeros(x.shape[1], dtype=_F64)
            _moments_cf(_bits(x), tab, mean, m2)
            return mean, np.maximum(m2, 0.0)
        c = x.shape[1]
        r = _rows_per_wide(x)
        counts, means, m2s = [], [], []
        for part, k in zip(_regroup(_bits(x), r), (r, 1)):
            if part.shape[0]:
                pm = np.zeros(part.shape[1], dtype=_F64)
                pq = np.zeros(part.shape[1], dtype=_F64)
                _moments_cl(part, tab, pm, pq)
                counts += [float(part.shape[0])] * k
                means.append(pm.reshape(k, c))
                m2s.append(pq.reshape(k, c))
        # Chan's merge of the per-column pieces, in float64
        w = np.array(counts)[:, None]
        return chan_merge(np.concatenate(means), np.concatenate(m2s), w, float(w.sum()))

    def normalize(
        self,
        x: np.ndarray,
        channel_last: bool,
        mean: np.ndarray,
        scale: np.ndarray,
        bias: np.ndarray,
        out_dtype: Any,
    ) -> np.ndarray:
        """``(x - mean) * scale + bias`` in the compute dtype, one pass."""
        out_dtype = np.dtype(out_dtype)
        cdt = mean.dtype
        if not _native(x) or out_dtype != x.dtype or cdt not in _NATIVE[1:]:
            return super().normalize(x, channel_last, mean, scale, bias, out_dtype)
        y = POOL.empty(x.shape, out_dtype)
        vecs = (mean, scale.astype(cdt, copy=False), bias.astype(cdt, copy=False))
        tab = _table(x)
        if not channel_last:
            _normalize_cf(_bits(x), tab, *vecs, _bits(y))
            return y
        r = _rows_per_wide(x)
        for xp_, yp, k in zip(_regroup(_bits(x), r), _regroup(_bits(y), r), (r, 1)):
            if xp_.shape[0]:
                _normalize_cl(xp_, tab, *(np.tile(v, k) for v in vecs), yp)
        return y

    def backward_reduce(
        self,
        dy: np.ndarray,
        x: np.ndarray,
        channel_last: bool,
        mean: np.ndarray,
        invstd: np.ndarray,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Local ``sum(dy)`` and ``sum(dy * (x - mean)) * invstd`` (float64), one pass."""
        if not _native(dy, x) or mean.dtype not in _NATIVE[1:]:
            return super().backward_reduce(dy, x, channel_last, mean, invstd)
        c = mean.shape[0]
        sum_dy = np.zeros(c, dtype=_F64)
        sum_dxm = np.zeros(c, dtype=_F64)
        tab = _table(x)
        if not channel_last:
            short = x.shape[2] < 2 * LANES
            (_bwd_reduce_short if short else _bwd_reduce_cf)(
                _bits(dy), _bits(x), tab, mean, sum_dy, sum_dxm)
            return sum_dy, sum_dxm * invstd.astype(_F64)
        r = _rows_per_wide(x)
        for dp, xp_, k in zip(_regroup(_bits(dy), r), _regroup(_bits(x), r), (r, 1)):
            if xp_.shape[0]:
                s1 = np.zeros(k * c, dtype=_F64)
                s2 = np.zeros(k * c, dtype=_F64)
                _bwd_reduce_cl(dp, xp_, tab, np.tile(mean, k), s1, s2)
                sum_dy += s1.reshape(k, c).sum(axis=0)
                sum_dxm += s2.reshape(k, c).sum(axis=0)
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
        """``a * (dy - mean_dy) - b * (x - mean)`` in the compute dtype, one pass."""
        out_dtype = np.dtype(out_dtype)
        cdt = mean.dtype
        if not _native(dy, x) or out_dtype != x.dtype or cdt not in _NATIVE[1:]:
            return super().backward_elemt(dy, x, channel_last, mean, a, mean_dy, b, out_dtype)
        dx = POOL.empty(x.shape, out_dtype)
        vecs = (mean, a.astype(cdt, copy=False), mean_dy.astype(cdt, copy=False),
                b.astype(cdt, copy=False))
        tab = _table(x)
        if not channel_last:
            _bwd_elemt_cf(_bits(dy), _bits(x), tab, *vecs, _bits(dx))
            return dx
        r = _rows_per_wide(x)
        parts = zip(_regroup(_bits(dy), r), _regroup(_bits(x), r), _regroup(_bits(dx), r), (r, 1))
        for dp, xp_, op, k in parts:
            if xp_.shape[0]:
                _bwd_elemt_cl(dp, xp_, tab, *(np.tile(v, k) for v in vecs), op)
        return dx


BACKEND = NumbaBackend()


def warm_up(dtypes: tuple[str, ...] = ("float16", "float32", "float64")) -> int:
    """Compile (or load from the disk cache) every kernel the layers use for ``dtypes``.

    Every input dtype with each compute dtype it can meet (float32 and float64;
    float64 inputs only float64), channel-first short and long rows and
    channel-last, all four primitives. Run it once where the cache lives, for
    instance when building a container image or before a large ``mpiexec``
    job, so that no rank compiles: ``python -m cupysyncbn.backends.numba_backend``.

    Returns
    -------
    int
        Number of kernel signatures now compiled in this process.
    """
    b = BACKEND
    rng = np.random.default_rng(0)
    for name in dtypes:
        dt = np.dtype(name)
        for cdt in (np.dtype(np.float32), _F64):
            if dt == _F64 and cdt != _F64:
                continue
            for shape, cl in (((2, 3, 5), False), ((2, 3, 2 * LANES + 3), False), ((7, 3), True)):
                x = rng.standard_normal(shape).astype(dt)
                c = shape[-1] if cl else shape[1]
                v = np.ones(c, dtype=cdt)
                b.moments(x, cl, cdt)
                b.normalize(x, cl, v, v, v, dt)
                b.backward_reduce(x, x, cl, v, v)
                b.backward_elemt(x, x, cl, v, v, v, v, dt)
    kernels = (_moments_cf, _moments_cl, _normalize_cf, _normalize_cl, _bwd_reduce_short,
               _bwd_reduce_cf, _bwd_reduce_cl, _bwd_elemt_cf, _bwd_elemt_cl)
    return sum(len(k.signatures) for k in kernels)


if __name__ == "__main__":  # python -m cupysyncbn.backends.numba_backend
    import sys
    import time

    t0 = time.perf_counter()
    n = warm_up()
    print(f"cupysyncbn: {n} numba kernel signatures compiled or loaded from the cache"
          f" in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
