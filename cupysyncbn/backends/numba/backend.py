"""Fused CPU backend: the batch-norm primitives as numba-compiled loops.

The default for NumPy arrays whenever numba is importable (the ``fast`` extra:
``pip install "cupysyncbn[fast]"``); ``CUPYSYNCBN_CPU_BACKEND=numpy`` opts out
(see :func:`cupysyncbn.backends.cpu_backend`). The NumPy backend stays the
fallback and the reference.

Why: batch norm is memory-bound, and NumPy needs several passes per formula
(:mod:`..numpy` explains the costs). Here every primitive is one loop
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

* ``moments``: shifted sums per piece in float64 (channel-first: at most
  :data:`PIECE` values of one long row or of a channel's rows shorter than
  :data:`SHORT`, float64: :data:`GROUP` such rows; channel-last: a block of
  rows that fits in cache (float64), or :data:`PIECE` rows for float16/float32):
  ``d = x - c``, ``mean = c + sum(d)/k``, ``M2 = sum(d*d) - sum(d)**2/k``;
  pieces merged per channel with Chan's formula in float64. Never
  ``E[x²] - E[x]²``. For float16/float32 inputs ``c`` is the piece's first
  value and the piece is read once: since ``c`` belongs to the piece,
  ``k * (mean - c)**2 <= k * M2`` and cancellation costs at most a factor
  ``k + 1`` (below 1e-12 relative in float64). For float64 inputs (where
  ``x - c`` rounds) ``c = sum(x)/k``: a corrected two-pass whose second pass
  hits cache.
* Every reduction accumulates in float64 (the NumPy backend sums up to 4096
  values in the compute dtype first). Channel-first rows are summed by the
  explicit ``<8 x double>`` loops of :mod:`.simd` (16 float64
  accumulators in registers, a fixed order of additions, ``d*d`` and
  ``dy*(x-m)`` added with one rounding); channel-last rows narrower than
  :data:`WIDE` are regrouped into long rows; the moments are then summed in
  blocks of 16 channels, :data:`REG_ROWS` rows at a time in registers
  (:func:`.simd.col_dev_sums`), the backward's sums so from :data:`DOT_COLS`
  channels on (:func:`.simd.col_dot_sums`), the rest (the last ``C % 16``
  channels, float64 moments, shorter backward rows) in loops the compiler
  vectorizes without reassociating any sum.
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
Outputs of :data:`STREAM_MIN_BYTES` and more are written with streamed
(non-temporal) whole-line stores, bitwise the same values
(:mod:`.simd`; channel-first rows of at least a line, channel-last of
any width; long channel-last rows a few rows per channel offset,
:data:`TILE_MIN_BYTES`).

Inputs other than float16/float32/float64 (bfloat16) go to the NumPy backend,
and so do the reductions of float16 on CPUs without F16C.
"""

from __future__ import annotations

import functools
import math
import sys
import threading
from typing import Any

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic, overload

from ..channel_math import STEADY_OK
from ..numpy import NumpyBackend
from . import exact as _exact
from .channel import CHANNEL_KERNELS, NumbaChannelMath, _bwd_steady, _fwd_steady, _pack
from .simd import (
    COLS,
    HW_F16,
    LINE,
    STREAMS,
    col_dev_sums,
    col_dot_sums,
    dev_sums,
    dot_sums,
    elemt_line_nt,
    elemt_vline_nt,
    norm_line_nt,
    norm_vline_nt,
    store_fence,
)

__all__ = [
    "NumbaBackend", "BACKEND", "PIECE", "SHORT", "GROUP", "OutputPool", "POOL", "SteadyOps",
    "warm_up",
]

_F64 = np.dtype(np.float64)
_NATIVE = (np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64))

#: Channel-first moments: most values per piece (one shift, one merge); the
#: float64 two-pass's second pass over a piece must hit cache (32 KiB).
PIECE = 4096
#: Channel-last moments: values per row block (about 256 KiB of float32).
BLOCK_VALUES = 1 << 16
#: Channel-last: ``R = WIDE // C`` rows are regrouped into one "wide" row of
#: ``R*C`` values (per-channel vectors tiled R times), so every kernel's inner
#: loop is long and vectorized; rows left over are a second, short call.
WIDE = 256
#: Rows per channel offset of a tiled streamed channel-last output
#: (:data:`TILE_MIN_BYTES`).
TILE_ROWS = 4
#: Rows per register pass of the channel-last moments: up to 16 rows per
#: block of 16 channels before the block's sums are added to the accumulator
#: vectors, about REG_VALUES values per pass over the channels (16 rows of
#: 256 channels, 4 rows of 1024 and more: measured fastest, 1.5-1.7x the
#: accumulator loops for 64-512 channels).
REG_ROWS = 16
REG_VALUES = 4096
#: Channel-last rows of at least this many values have their moments summed
#: in register blocks (every row after the WIDE regrouping; not float64).
REG_COLS = 16
#: The backward's channel-last sums use register blocks (:data:`DOT_ROWS` rows
#: at a time) from this many channels on (late-ResNet C = 1024, 2048); below,
#: the accumulator-array loops are as fast (measured for 64-512 channels).
DOT_COLS = 1024
DOT_ROWS = 4
#: Channel-first rows shorter than this (late-ResNet 7x7 = 49 values) are
#: summed GROUP samples at a time: one call of the vector loop (and one merge)
#: per GROUP rows instead of per row.
SHORT = 128
#: Samples of one channel per piece for short rows. 4 keeps the reads at
#: memory speed for one rank's (16,2048,7,7): GROUP concurrent streams per
#: array, which the hardware prefetcher follows (16 halved the backward
#: reduction's speed, 1 pays a call and a merge per 49-value row).
GROUP = 4

#: Streamed channel-last ``y``/``dx`` whose per-channel vectors (C values of
#: the compute dtype) take at least this many bytes are written TILE_ROWS rows
#: per channel offset (:func:`_tiled`). For (784, 2048) float32 with caches
#: cold that was 12-18% faster for dx and 5-19% for y; with 4 KiB vectors
#: (C = 1024 float32, C = 512 float64) it was slower, so shorter rows keep
#: one row at a time.
TILE_MIN_BYTES = 8192

#: ``y``/``dx`` of at least this many bytes (channel-first: with rows of at
#: least a cache line) are written with streamed (non-temporal) stores, which
#: skip reading each line before writing it and do not evict the inputs from
#: cache: with 2 ranks on 2 cores the elementwise passes of (32,64,56,56) ran
#: 20-30% faster. Below it an output likely stays in cache for its consumer,
#: the next layer (memcpy's rule, a fraction of the last-level cache). 0
#: streams every output.
STREAM_MIN_BYTES = 4 << 20

#: float16 bit pattern -> float32 value, exact for all 65536 patterns (NaNs too).
_F16_TABLE = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16).view(np.float16).astype(
    np.float32
)
_NO_TABLE = np.zeros(1, dtype=np.float32)

_JIT: dict[str, Any] = {"cache": True, "fastmath": False, "nogil": True}


# ------------------------------------------------------------ element load/store
# float16 <-> float32: LLVM ``fpext``/``fptrunc`` (vectorized F16C
# instructions) where the CPU has F16C (``HW_F16``); otherwise the portable
# table and integer rounding below (no runtime library call needed).
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
        if HW_F16:
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
        if HW_F16:
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
        if HW_F16:

            def st16(o, i, v):  # noqa: ANN001, ANN202
                o[i] = _f2h(np.float32(v))

            return st16

        def st16_portable(o, i, v):  # noqa: ANN001, ANN202
            o[i] = _half_bits(v)

        return st16_portable

    def st(o, i, v):  # noqa: ANN001, ANN202
        o[i] = v

    return st


# ------------------------------------------------------------- fused ReLU
# ``act`` arguments of the kernels: None (no activation: these compile to
# nothing) or the forward's ``(scale, bias)`` vectors (compute dtype). The
# choice is the argument's type, so each kernel is specialized for it.
def _relu_out(v: Any, act: Any) -> Any:  # pragma: no cover - replaced by the overload
    """``v``, or ``0 if v <= 0 else v`` (NaN kept) when ``act`` is given."""
    raise NotImplementedError


def _zero_of(t: Any) -> Any:
    return np.float32(0.0) if t == types.float32 else np.float64(0.0)


@overload(_relu_out, inline="always")
def _relu_out_impl(v, act):  # noqa: ANN001, ANN202 - numba typing hook
    if isinstance(act, types.NoneType):
        return lambda v, act: v
    z = _zero_of(v)

    def relu(v, act):  # noqa: ANN001, ANN202
        if v <= 0:
            return z
        return v

    return relu


def _keep(g: Any, xm: Any, act: Any, j: Any) -> Any:  # pragma: no cover - overloaded
    """``g`` (a ``dy`` value), or 0 where the forward's ``xm * scale[j] + bias[j] <= 0``.

    ``xm`` is ``x - mean`` as the forward computed it, so the pre-activation
    is the forward's, bitwise.
    """
    raise NotImplementedError


@overload(_keep, inline="always")
def _keep_impl(g, xm, act, j):  # noqa: ANN001, ANN202 - numba typing hook
    if isinstance(act, types.NoneType):
        return lambda g, xm, act, j: g
    z = _zero_of(g)

    def keep(g, xm, act, j):  # noqa: ANN001, ANN202
        if xm * act[0][j] + act[1][j] <= 0:
            return z
        return g

    return keep


def _act_at(act: Any, j: Any) -> Any:  # pragma: no cover - replaced by the overload
    """None, or ``(scale[j], bias[j])`` of ``act`` (a reduction intrinsic's argument)."""
    raise NotImplementedError


@overload(_act_at, inline="always")
def _act_at_impl(act, j):  # noqa: ANN001, ANN202 - numba typing hook
    if isinstance(act, types.NoneType):
        return lambda act, j: None
    return lambda act, j: (act[0][j], act[1][j])


def _act_pair(act: Any, j: Any, j1: Any) -> Any:  # pragma: no cover - overloaded
    """None, or ``(scale[j], bias[j], scale[j1], bias[j1])`` (a line's two channels)."""
    raise NotImplementedError


@overload(_act_pair, inline="always")
def _act_pair_impl(act, j, j1):  # noqa: ANN001, ANN202 - numba typing hook
    if isinstance(act, types.NoneType):
        return lambda act, j, j1: None
    return lambda act, j, j1: (act[0][j], act[1][j], act[0][j1], act[1][j1])


def _act_flag(act: Any) -> Any:  # pragma: no cover - replaced by the overload
    """None, or True: the forward writers' ``relu``."""
    raise NotImplementedError


@overload(_act_flag, inline="always")
def _act_flag_impl(act):  # noqa: ANN001, ANN202 - numba typing hook
    if isinstance(act, types.NoneType):
        return lambda act: None
    return lambda act: True


# ----------------------------------------------------------------- reductions
@njit(inline="always", **_JIT)
def _chan(cnt, mean, m2, c, k, cp, sd, q):  # noqa: ANN001, ANN202
    """Merge a piece into channel ``c``: ``k`` values, shift ``cp``, shifted sums ``sd``, ``q``.

    The piece's mean is ``cp + sd/k`` and its M2 ``q - sd**2/k``.
    """
    _merge_piece(cnt, mean, m2, c, k, cp + sd / k, q - sd * sd / k)


@njit(inline="always", **_JIT)
def _merge_piece(cnt, mean, m2, c, k, mb, m2b):  # noqa: ANN001, ANN202
    """Merge a piece of ``k`` values, mean ``mb`` and M2 ``m2b`` into channel ``c``.

    Into an empty channel the piece comes in exactly (``delta * k / k``, ``0 * delta``).
    """
    na = cnt[c]
    n = na + k
    delta = mb - mean[c]
    mean[c] += delta * (k / n)
    m2[c] += m2b + delta * delta * (na * k / n)
    cnt[c] = n


# Channel-last rows narrower than WIDE are summed as wide rows of R rows
# (R*C columns, :func:`_regroup`); these fold the R column groups back into
# C channels in one call each (in NumPy they were 6-10 calls per pass: after
# the data passes evict the caches, about 0.1 ms). Float64 only: one
# signature each.
@njit(**_JIT)
def _merge_groups(k, pm, pq, cnt, mean, m2):  # noqa: ANN001, ANN202
    """Merge column groups of ``k`` rows each (``pm``/``pq``: group-major) per channel (Chan)."""
    c = mean.shape[0]
    for g in range(pm.shape[0] // c):
        for j in range(c):
            _merge_piece(cnt, mean, m2, j, k, pm[g * c + j], pq[g * c + j])


@njit(**_JIT)
def _add_groups(s1, s2, sum_dy, sum_dxm):  # noqa: ANN001, ANN202
    """Add group-major sums per channel, groups in order (NumPy's ``reshape(k, C).sum(0)``)."""
    c = sum_dy.shape[0]
    for j in range(c):
        a, b = s1[j], s2[j]
        for g in range(1, s1.shape[0] // c):
            a += s1[g * c + j]
            b += s2[g * c + j]
        sum_dy[j] += a
        sum_dxm[j] += b


# -------------------------------------------------------------------- kernels
@njit(**_JIT)
def _moments_cf(x, tab, mean, m2):  # noqa: ANN001, ANN202
    """Local moments: vector loops over a piece, then a Chan merge.

    A piece is at most PIECE values of a long row, or of a channel's short
    rows (float16/float32: summed GROUP rows per loop; float64: GROUP rows,
    two-pass) (:mod:`.simd` sums them).
    """
    n, c, s = x.shape
    cnt = np.zeros(c, dtype=np.float64)
    g = GROUP if s < SHORT else 1
    if s < SHORT and n > g and _shifted(x):
        # Short rows, one pass: a piece is up to PIECE values of a channel
        # over several groups, shifted by its first value; the groups' sums
        # add up per channel and the piece is merged once (one group: the
        # loop below, which merges as it goes).
        span = max(g, PIECE // s // g * g)
        cs = np.empty(c, dtype=np.float64)
        sd = np.empty(c, dtype=np.float64)
        q = np.empty(c, dtype=np.float64)
        for p0 in range(0, n, span):
            p1 = min(n, p0 + span)
            for i0 in range(p0, p1, g):
                i1 = min(p1, i0 + g)
                for j in range(c):
                    if i0 == p0:  # the piece's first group: its shift, fresh sums
                        cs[j] = np.float64(_ld3(x, p0, j, 0, tab))
                        sd[j] = 0.0
                        q[j] = 0.0
                    a, b = dev_sums(x, i0, i1, j, 0, s, cs[j])
                    sd[j] += a
                    q[j] += b
            k = np.float64((p1 - p0) * s)
            for j in range(c):
                _chan(cnt, mean, m2, j, k, cs[j], sd[j], q[j])
        return
    for i0 in range(0, n, g):
        i1 = min(n, i0 + g)
        for j in range(c):
            for t0 in range(0, s, PIECE):
                t1 = min(s, t0 + PIECE)
                k = np.float64((i1 - i0) * (t1 - t0))
                if _shifted(x):  # one pass, shifted by a value of the piece
                    cp = np.float64(_ld3(x, i0, j, t0, tab))
                else:  # float64: corrected two-pass, the second pass in cache
                    cp = dev_sums(x, i0, i1, j, t0, t1, 0.0)[0] / k
                sd, q = dev_sums(x, i0, i1, j, t0, t1, cp)
                _chan(cnt, mean, m2, j, k, cp, sd, q)


@njit(inline="always", **_JIT)
def _dev_cols(x, tab, r0, r1, cs, sd, q, j0):  # noqa: ANN001, ANN202
    """Add the shifted sums ``d``, ``d*d`` of rows ``r0:r1``, columns ``j0:`` (one by one)."""
    c = x.shape[1]
    for r in range(r0, r1):
        xr = x[r]
        for j in range(j0, c):
            d = np.float64(_ld(xr, j, tab)) - cs[j]
            sd[j] += d
            q[j] += d * d


@njit(inline="always", **_JIT)
def _cl_tile(x, tab, t0, t1, cs, sd, q):  # noqa: ANN001, ANN202
    """Shifted sums of rows ``t0:t1``: register blocks, then the last columns one by one."""
    c = x.shape[1]
    cv = c - c % COLS
    for j in range(0, cv, COLS):
        col_dev_sums(x, t0, t1, j, cs, sd, q)
    _dev_cols(x, tab, t0, t1, cs, sd, q, cv)


@njit(**_JIT)
def _moments_cl(x, tab, mean, m2):  # noqa: ANN001, ANN202
    rows, c = x.shape
    # float16/float32 rows: pieces of PIECE rows (one Chan merge each),
    # summed REG_ROWS rows at a time in register blocks. Otherwise blocks
    # that fit in cache (float64: the second pass hits it).
    long = c >= REG_COLS and _shifted(x)
    step = PIECE if long else max(1, BLOCK_VALUES // max(1, c))
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
        if long:
            tile = max(4, min(REG_ROWS, REG_VALUES // c))
            for t0 in range(r0, r1, tile):
                _cl_tile(x, tab, t0, min(r1, t0 + tile), cs, sd, q)
        else:
            _dev_cols(x, tab, r0, r1, cs, sd, q, 0)
        for j in range(c):
            _chan(cnt, mean, m2, j, k, cs[j], sd[j], q[j])


@njit(**_JIT)
def _normalize_cf(x, tab, mean, scale, bias, y, act):  # noqa: ANN001, ANN202
    n, c, s = x.shape
    for i in range(n):
        for j in range(c):
            m, sc, b = mean[j], scale[j], bias[j]
            xr, yr = x[i, j], y[i, j]
            for t in range(s):
                _st(yr, t, _relu_out((_ld(xr, t, tab) - m) * sc + b, act))


@njit(inline="always", **_JIT)
def _elemt_value(bwd, dr, xr, t, tab, j, mean, a, mean_dy, b, act):  # noqa: ANN001, ANN202
    """``dx`` (``bwd``) or ``y`` (``a`` = scale, ``b`` = bias) at ``t``, channel ``j``."""
    if bwd:
        xm = _ld(xr, t, tab) - mean[j]
        return (_keep(_ld(dr, t, tab), xm, act, j) - mean_dy[j]) * a[j] - xm * b[j]
    return _relu_out((_ld(xr, t, tab) - mean[j]) * a[j] + b[j], act)


@njit(**_JIT)
def _elemt_cf_stream(dy, x, tab, mean, a, mean_dy, b, out, bwd, act):  # noqa: ANN001, ANN202
    """``dx`` (``bwd``) or ``y`` with streamed whole-line stores (STREAM_MIN_BYTES).

    For ``y``: ``a``, ``b`` are scale and bias (``dy``, ``mean_dy`` unused).
    ``act``: None or the fused ReLU's ``(scale, bias)`` (see :func:`_keep`).
    Each sample's ``C*S`` values are one run: plain stores up to a line
    boundary, then one streamed line at a time (a line may end one channel's
    row and start the next: rows of at least a line), plain stores after.
    """
    n, c, s = x.shape
    size = c * s
    d2, x2, o2 = dy.reshape(n, size), x.reshape(n, size), out.reshape(n, size)
    vw = LINE // out.itemsize
    for i in range(n):
        dr, xr, orow = d2[i], x2[i], o2[i]
        head = min(size, (-orow.ctypes.data) % LINE // out.itemsize)
        for t in range(head):
            _st(orow, t, _elemt_value(bwd, dr, xr, t, tab, t // s, mean, a, mean_dy, b, act))
        t = head
        j = t // s
        end = (j + 1) * s
        while t + vw <= size:
            k = end - t
            j1 = j + 1 if k < vw else j
            if bwd:
                elemt_line_nt(d2, x2, o2, i, t, mean[j], a[j], mean_dy[j], b[j],
                              mean[j1], a[j1], mean_dy[j1], b[j1], k, _act_pair(act, j, j1))
            else:
                norm_line_nt(x2, o2, i, t, mean[j], a[j], b[j], mean[j1], a[j1], b[j1], k,
                             _act_flag(act))
            t += vw
            if t >= end:
                j += 1
                end += s
        for u in range(t, size):
            _st(orow, u, _elemt_value(bwd, dr, xr, u, tab, u // s, mean, a, mean_dy, b, act))
    store_fence()


@njit(**_JIT)
def _elemt_cl_stream(dy, x, tab, mean, a, mean_dy, b, out, bwd, tiled, act):  # noqa: ANN001, ANN202
    """Channel-last ``dx`` (``bwd``) or ``y`` with streamed whole-line stores.

    The ``(M, C)`` arrays as one run of values: plain stores up to a line
    boundary, one streamed line at a time, plain stores after. The
    per-channel vectors are repeated past ``C`` (:func:`_lines_ext`), so a
    line at channel ``j`` reads its lanes' parameters at ``j:j+line``.
    ``tiled`` (rows of whole lines, see :func:`_tiled`): the lines of
    TILE_ROWS rows at one channel offset are written one after another, so
    each parameter line is read once per tile from L1 instead of once per
    row from L2.
    """
    rows, c = x.shape
    size = rows * c
    d1, x1, o1 = dy.reshape(size), x.reshape(size), out.reshape(size)
    vw = LINE // out.itemsize
    head = min(size, (-o1.ctypes.data) % LINE // out.itemsize)
    for t in range(head):
        _st(o1, t, _elemt_value(bwd, d1, x1, t, tab, t % c, mean, a, mean_dy, b, act))
    t = head
    j = t % c
    if tiled:
        # every row starts ``head`` values into a line: row r's lines cover
        # [r*C + head, (r+1)*C + head), inside the array for all rows but the last
        full = rows - 1
        for r0 in range(0, full, TILE_ROWS):
            r1 = min(full, r0 + TILE_ROWS)
            for k in range(head, c + head, vw):
                for r in range(r0, r1):
                    if bwd:
                        elemt_vline_nt(d1, x1, o1, mean, a, mean_dy, b, r * c + k, k, act)
                    else:
                        norm_vline_nt(x1, o1, mean, a, b, r * c + k, k, _act_flag(act))
        t = full * c + head
    while t + vw <= size:
        if bwd:
            elemt_vline_nt(d1, x1, o1, mean, a, mean_dy, b, t, j, act)
        else:
            norm_vline_nt(x1, o1, mean, a, b, t, j, _act_flag(act))
        t += vw
        j += vw
        while j >= c:
            j -= c
    for u in range(t, size):
        _st(o1, u, _elemt_value(bwd, d1, x1, u, tab, u % c, mean, a, mean_dy, b, act))
    store_fence()


@njit(**_JIT)
def _normalize_cl(x, tab, mean, scale, bias, y, act):  # noqa: ANN001, ANN202
    rows, c = x.shape
    for r in range(rows):
        xr, yr = x[r], y[r]
        for j in range(c):
            _st(yr, j, _relu_out((_ld(xr, j, tab) - mean[j]) * scale[j] + bias[j], act))


@njit(**_JIT)
def _bwd_reduce_cf(dy, x, tab, mean, sum_dy, sum_dxm, act):  # noqa: ANN001, ANN202
    """One vector loop per row (GROUP rows for short rows) of a channel."""
    n, c, s = x.shape
    g = GROUP if s < SHORT else 1
    for i0 in range(0, n, g):
        i1 = min(n, i0 + g)
        for j in range(c):
            a, b = dot_sums(x, dy, i0, i1, j, 0, s, mean[j], _act_at(act, j))
            sum_dy[j] += a
            sum_dxm[j] += b


@njit(inline="always", **_JIT)
def _dot_cols(dy, x, tab, mean, sum_dy, sum_dxm, j0, act):  # noqa: ANN001, ANN202
    """Add ``sum(dy)``, ``sum(dy * (x - mean))`` of columns ``j0:`` (one by one)."""
    rows, c = x.shape
    for r in range(rows):
        xr, dr = x[r], dy[r]
        for j in range(j0, c):
            xm = _ld(xr, j, tab) - mean[j]
            g = np.float64(_keep(_ld(dr, j, tab), xm, act, j))
            sum_dy[j] += g
            sum_dxm[j] += g * np.float64(xm)


@njit(**_JIT)
def _bwd_reduce_cl(dy, x, tab, mean, sum_dy, sum_dxm, act):  # noqa: ANN001, ANN202
    rows, c = x.shape
    if c < DOT_COLS:
        _dot_cols(dy, x, tab, mean, sum_dy, sum_dxm, 0, act)
        return
    cv = c - c % COLS  # long rows: register blocks, then the last columns
    for t0 in range(0, rows, DOT_ROWS):
        t1 = min(rows, t0 + DOT_ROWS)
        for j in range(0, cv, COLS):
            col_dot_sums(x, dy, t0, t1, j, mean, sum_dy, sum_dxm, act)
    _dot_cols(dy, x, tab, mean, sum_dy, sum_dxm, cv, act)


@njit(**_JIT)
def _bwd_elemt_cf(dy, x, tab, mean, a, mean_dy, b, dx, act):  # noqa: ANN001, ANN202
    n, c, s = x.shape
    for i in range(n):
        for j in range(c):
            m, av, md, bv = mean[j], a[j], mean_dy[j], b[j]
            xr, dr, orow = x[i, j], dy[i, j], dx[i, j]
            for t in range(s):
                xm = _ld(xr, t, tab) - m
                _st(orow, t, (_keep(_ld(dr, t, tab), xm, act, j) - md) * av - xm * bv)


@njit(**_JIT)
def _bwd_elemt_cl(dy, x, tab, mean, a, mean_dy, b, dx, act):  # noqa: ANN001, ANN202
    rows, c = x.shape
    for r in range(rows):
        xr, dr, orow = x[r], dy[r], dx[r]
        for j in range(c):
            xm = _ld(xr, j, tab) - mean[j]
            _st(orow, j, (_keep(_ld(dr, j, tab), xm, act, j) - mean_dy[j]) * a[j] - xm * b[j])


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
        nbytes = dtype.itemsize * math.prod(shape)  # not np.prod: 10x the call cost
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


def _vector_rows(x: np.ndarray) -> bool:
    """True if :mod:`.simd` can sum ``x``'s rows (float16 needs F16C)."""
    return x.dtype != np.float16 or HW_F16


def _stream_cl(x: np.ndarray, out: np.ndarray) -> bool:
    """Whether a channel-last output is written with streamed stores."""
    return STREAMS and out.nbytes >= STREAM_MIN_BYTES and _vector_rows(x)


def _stream(x: np.ndarray, out: np.ndarray) -> bool:
    """Whether a channel-first output is written with streamed stores (rows of a line or more)."""
    return _stream_cl(x, out) and x.shape[2] * x.itemsize >= LINE


def _tiled(out: np.ndarray, cdt: np.dtype) -> bool:
    """Whether a streamed channel-last output is written TILE_ROWS rows at a time.

    Rows of whole lines (every row starts at the same place in a line) and
    per-channel vectors of TILE_MIN_BYTES or more, which no longer stay in
    L1 beside the data streams when read once per row.
    """
    c = out.shape[1]
    return c % (LINE // out.itemsize) == 0 and c * cdt.itemsize >= TILE_MIN_BYTES


def _lines_ext(v: np.ndarray, out: np.ndarray) -> np.ndarray:
    """``v`` followed by its values repeated for one line of ``out`` (see ``_elemt_cl_stream``)."""
    return np.concatenate((v, np.resize(v, LINE // out.itemsize)))


def _native(*arrays: np.ndarray) -> bool:
    """True if the fused kernels handle these arrays (else: NumPy backend)."""
    dt = arrays[0].dtype
    if dt not in _NATIVE:
        return False
    for a in arrays:  # a loop, not all(genexpr): this runs on every pass
        if a.dtype != dt or not a.flags.c_contiguous or a.size == 0:
            return False
    return True


class NumbaBackend(NumbaChannelMath, NumpyBackend):
    """Batch-norm primitives on NumPy arrays as fused numba loops (see the module docstring).

    Same arrays, ``name`` and ``xp`` as the NumPy backend (results, buffers and
    error messages do not depend on which CPU backend runs); the four
    data-sized primitives differ, and the per-channel steps are compiled
    (:mod:`.channel`, bitwise the NumPy results).
    """

    @functools.cached_property
    def exact(self) -> Any:  # type: ignore[override] # the module's namespace, per backend
        """reproducible=True: numba loops, bitwise the NumPy reference's results."""
        return _exact.NumbaExactOps(self)

    def moments(self, x: np.ndarray, channel_last: bool, cdt: Any) -> tuple[np.ndarray, np.ndarray]:
        """Local per-channel mean and M2, float64 (two-pass per cached piece, Chan merge)."""
        # float16 without F16C: the NumPy backend (see simd)
        if not _native(x) or not _vector_rows(x):
            return super().moments(x, channel_last, cdt)
        tab = _table(x)
        if not channel_last:
            mean = np.zeros(x.shape[1], dtype=_F64)
            m2 = np.zeros(x.shape[1], dtype=_F64)
            _moments_cf(_bits(x), tab, mean, m2)
            return mean, np.maximum(m2, 0.0)
        c = x.shape[1]
        mean = np.zeros(c, dtype=_F64)
        m2 = np.zeros(c, dtype=_F64)
        r = _rows_per_wide(x)
        if r == 1:  # rows of WIDE channels or more: one call
            _moments_cl(_bits(x), tab, mean, m2)
            return mean, np.maximum(m2, 0.0)
        cnt = np.zeros(c, dtype=_F64)
        for part in _regroup(_bits(x), r):
            if part.shape[0]:
                pm = np.zeros(part.shape[1], dtype=_F64)
                pq = np.zeros(part.shape[1], dtype=_F64)
                _moments_cl(part, tab, pm, pq)
                _merge_groups(float(part.shape[0]), pm, pq, cnt, mean, m2)
        return mean, np.maximum(m2, 0.0)

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
        """``(x - mean) * scale + bias`` in the compute dtype, one pass (``relu``: max with 0)."""
        out_dtype = np.dtype(out_dtype)
        cdt = mean.dtype
        if not _native(x) or out_dtype != x.dtype or cdt not in _NATIVE[1:]:
            return super().normalize(x, channel_last, mean, scale, bias, out_dtype, relu)
        y = POOL.empty(x.shape, out_dtype)
        vecs = (mean, scale.astype(cdt, copy=False), bias.astype(cdt, copy=False))
        act = vecs[1:] if relu else None
        tab = _table(x)
        if not channel_last:
            if _stream(x, y):
                m, sc, b = vecs
                _elemt_cf_stream(_bits(x), _bits(x), tab, m, sc, m, b, _bits(y), False, act)
            else:
                _normalize_cf(_bits(x), tab, *vecs, _bits(y), act)
            return y
        if _stream_cl(x, y):
            m, sc, b = (_lines_ext(v, y) for v in vecs)
            _elemt_cl_stream(_bits(x), _bits(x), tab, m, sc, m, b, _bits(y), False,
                             _tiled(y, cdt), (sc, b) if relu else None)
            return y
        r = _rows_per_wide(x)
        if r == 1:
            _normalize_cl(_bits(x), tab, *vecs, _bits(y), act)
            return y
        for xp_, yp, k in zip(_regroup(_bits(x), r), _regroup(_bits(y), r), (r, 1)):
            if xp_.shape[0]:
                m, sc, b = (np.tile(v, k) for v in vecs)
                _normalize_cl(xp_, tab, m, sc, b, yp, (sc, b) if relu else None)
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
        """Local ``sum(dy)`` and ``sum(dy * (x - mean)) * invstd`` (float64), one pass."""
        if (not _native(dy, x) or mean.dtype not in _NATIVE[1:]
                or not _vector_rows(x)):
            return super().backward_reduce(dy, x, channel_last, mean, invstd, relu)
        sum_dy, sum_dxm = self._sums(dy, x, channel_last, mean, relu)
        return sum_dy, sum_dxm * invstd.astype(_F64)

    def _sums(
        self, dy: np.ndarray, x: np.ndarray, channel_last: bool, mean: np.ndarray,
        relu: tuple | None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Local ``sum(dy)`` and ``sum(dy * (x - mean))`` (float64; native arrays only)."""
        c = mean.shape[0]
        act = _act_vectors(relu, mean.dtype)
        sum_dy = np.zeros(c, dtype=_F64)
        sum_dxm = np.zeros(c, dtype=_F64)
        tab = _table(x)
        if not channel_last:
            _bwd_reduce_cf(_bits(dy), _bits(x), tab, mean, sum_dy, sum_dxm, act)
            return sum_dy, sum_dxm
        r = _rows_per_wide(x)
        if r == 1:
            _bwd_reduce_cl(_bits(dy), _bits(x), tab, mean, sum_dy, sum_dxm, act)
            return sum_dy, sum_dxm
        for dp, xp_, k in zip(_regroup(_bits(dy), r), _regroup(_bits(x), r), (r, 1)):
            if xp_.shape[0]:
                s1 = np.zeros(k * c, dtype=_F64)
                s2 = np.zeros(k * c, dtype=_F64)
                _bwd_reduce_cl(dp, xp_, tab, np.tile(mean, k), s1, s2, _tiles(act, k))
                _add_groups(s1, s2, sum_dy, sum_dxm)
        return sum_dy, sum_dxm

    def steady_ops(self, shape: tuple, dtype: np.dtype, channel_last: bool) -> SteadyOps | None:
        """The data passes of a layer's steady-state pass on canonical ``shape``, or None.

        float32/float64 inputs (what :class:`SteadyOps` runs); others take the
        general path.
        """
        if np.dtype(dtype) not in _NATIVE[1:]:
            return None
        return SteadyOps(self, shape, np.dtype(dtype), channel_last)

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
        """``a * (dy - mean_dy) - b * (x - mean)`` in the compute dtype, one pass."""
        out_dtype = np.dtype(out_dtype)
        cdt = mean.dtype
        if not _native(dy, x) or out_dtype != x.dtype or cdt not in _NATIVE[1:]:
            return super().backward_elemt(dy, x, channel_last, mean, a, mean_dy, b, out_dtype,
                                          relu)
        dx = POOL.empty(x.shape, out_dtype)
        vecs = (mean, a.astype(cdt, copy=False), mean_dy.astype(cdt, copy=False),
                b.astype(cdt, copy=False))
        act = _act_vectors(relu, cdt)
        tab = _table(x)
        if not channel_last:
            if _stream(x, dx):
                _elemt_cf_stream(_bits(dy), _bits(x), tab, *vecs, _bits(dx), True, act)
            else:
                _bwd_elemt_cf(_bits(dy), _bits(x), tab, *vecs, _bits(dx), act)
            return dx
        if _stream_cl(x, dx):
            ext = [_lines_ext(v, dx) for v in vecs]
            act_ext = None if act is None else tuple(_lines_ext(v, dx) for v in act)
            _elemt_cl_stream(_bits(dy), _bits(x), tab, *ext, _bits(dx), True, _tiled(dx, cdt),
                             act_ext)
            return dx
        r = _rows_per_wide(x)
        if r == 1:
            _bwd_elemt_cl(_bits(dy), _bits(x), tab, *vecs, _bits(dx), act)
            return dx
        parts = zip(_regroup(_bits(dy), r), _regroup(_bits(x), r), _regroup(_bits(dx), r), (r, 1))
        for dp, xp_, op, k in parts:
            if xp_.shape[0]:
                _bwd_elemt_cl(dp, xp_, tab, *(np.tile(v, k) for v in vecs), op, _tiles(act, k))
        return dx


# ------------------------------------------------------- steady-state passes
# A small input's steady-state pass (SteadyOps) runs its data kernel and the
# per-channel kernel of :mod:`.channel` as one compiled call: the kernels
# below call the same kernels the backend's methods call (picked by the
# input's layout at compile time), with the same arguments.
_NO_VECTOR = np.empty(0, dtype=_F64)


def _moments_any(x: Any, tab: Any, mean: Any, m2: Any) -> None:  # pragma: no cover
    """``_moments_cf`` (3-D ``x``) or ``_moments_cl`` (2-D)."""
    raise NotImplementedError


@overload(_moments_any, inline="always")
def _moments_any_impl(x, tab, mean, m2):  # noqa: ANN001, ANN202 - numba typing hook
    if x.ndim == 3:
        return lambda x, tab, mean, m2: _moments_cf(x, tab, mean, m2)
    return lambda x, tab, mean, m2: _moments_cl(x, tab, mean, m2)


def _normalize_any(x: Any, tab: Any, mean: Any, scale: Any, bias: Any, y: Any,
                   act: Any) -> None:  # pragma: no cover - replaced by the overload
    """``_normalize_cf`` (3-D ``x``) or ``_normalize_cl`` (2-D)."""
    raise NotImplementedError


@overload(_normalize_any, inline="always")
def _normalize_any_impl(x, tab, mean, scale, bias, y, act):  # noqa: ANN001, ANN202
    if x.ndim == 3:
        return lambda x, tab, mean, scale, bias, y, act: _normalize_cf(
            x, tab, mean, scale, bias, y, act)
    return lambda x, tab, mean, scale, bias, y, act: _normalize_cl(
        x, tab, mean, scale, bias, y, act)


def _reduce_any(dy: Any, x: Any, tab: Any, mean: Any, sum_dy: Any, sum_dxm: Any,
                act: Any) -> None:  # pragma: no cover - replaced by the overload
    """``_bwd_reduce_cf`` (3-D ``x``) or ``_bwd_reduce_cl`` (2-D)."""
    raise NotImplementedError


@overload(_reduce_any, inline="always")
def _reduce_any_impl(dy, x, tab, mean, sum_dy, sum_dxm, act):  # noqa: ANN001, ANN202
    if x.ndim == 3:
        return lambda dy, x, tab, mean, sum_dy, sum_dxm, act: _bwd_reduce_cf(
            dy, x, tab, mean, sum_dy, sum_dxm, act)
    return lambda dy, x, tab, mean, sum_dy, sum_dxm, act: _bwd_reduce_cl(
        dy, x, tab, mean, sum_dy, sum_dxm, act)


def _elemt_any(dy: Any, x: Any, tab: Any, mean: Any, a: Any, mean_dy: Any, b: Any, dx: Any,
               act: Any) -> None:  # pragma: no cover - replaced by the overload
    """``_bwd_elemt_cf`` (3-D ``x``) or ``_bwd_elemt_cl`` (2-D)."""
    raise NotImplementedError


@overload(_elemt_any, inline="always")
def _elemt_any_impl(dy, x, tab, mean, a, mean_dy, b, dx, act):  # noqa: ANN001, ANN202
    if x.ndim == 3:
        return lambda dy, x, tab, mean, a, mean_dy, b, dx, act: _bwd_elemt_cf(
            dy, x, tab, mean, a, mean_dy, b, dx, act)
    return lambda dy, x, tab, mean, a, mean_dy, b, dx, act: _bwd_elemt_cl(
        dy, x, tab, mean, a, mean_dy, b, dx, act)


@njit(**_JIT)
def _steady_fwd_pack(v, mean_r, m2_r, buf, tmpl, slots, count, call, shift):  # noqa: ANN001, ANN202
    # a synchronized forward's moments and what it sends (header, shifted sums)
    _moments_any(v, _NO_TABLE, mean_r, m2_r)
    _pack(buf, tmpl, slots, count, call, mean_r, m2_r, shift, float(count), _NO_VECTOR)


@njit(**_JIT)
def _steady_fwd(  # noqa: ANN001, ANN202
    local, v, buf, slots, params, mean_r, m2_r, shift, weight, rm, rv, nbt, kf, scratch, coef,
    shift_out, bias, y, act,
):
    # (a local forward's moments,) the per-channel steps, then y
    if local:
        _moments_any(v, _NO_TABLE, mean_r, m2_r)
    code, total = _fwd_steady(buf, slots, params, mean_r, m2_r, shift, weight, rm, rv, nbt, kf,
                              scratch, coef, shift_out)
    if code == STEADY_OK:
        _normalize_any(v, _NO_TABLE, coef[0], coef[2], bias, y, act)
    return code, total


@njit(**_JIT)
def _steady_bwd_pack(dy, v, mean, act, sum_dy, sum_dxm, buf, tmpl, slots, count, call,  # noqa: ANN001, ANN202
                     invstd):
    # a synchronized backward's local sums and what it sends
    _reduce_any(dy, v, _NO_TABLE, mean, sum_dy, sum_dxm, act)
    _pack(buf, tmpl, slots, count, call, sum_dy, sum_dxm, _NO_VECTOR, 0.0, invstd)


@njit(**_JIT)
def _steady_bwd(  # noqa: ANN001, ANN202
    local, dy, v, mean, act, sum_dy, sum_dxm, buf, slots, size, weight, invstd, count, coef,
    dw, db, dx,
):
    # (a local backward's sums,) the per-channel steps, then dx
    if local:
        _reduce_any(dy, v, _NO_TABLE, mean, sum_dy, sum_dxm, act)
    code = _bwd_steady(buf, slots, size, weight, invstd, sum_dy, sum_dxm, count, coef, dw, db)
    if code == STEADY_OK:
        _elemt_any(dy, v, _NO_TABLE, mean, coef[0], coef[1], coef[2], dx, act)
    return code


class SteadyOps:
    """The four data passes of a layer's steady-state pass, picked once per input layout.

    For one canonical shape and dtype (float32/float64, C-contiguous, the
    compute dtype that of the per-channel vectors): small inputs call the
    kernels directly, without the checks and choices the backend's methods
    make on every call (they are made here, once); inputs that stream or
    come from :data:`POOL`, and channel-last rows regrouped into wide rows,
    go through those methods. Same kernels, same arguments: the same bits.
    ``moments`` and ``sums`` return the raw local sums (``M2`` and
    ``sum(dy * (x - mean))`` before their final steps, which the per-channel
    kernels of :mod:`.channel` take).
    """

    __slots__ = ("backend", "cl", "direct", "nbytes", "shape", "dtype", "nf", "pack",
                 "forward_channels", "backward_channels", "fwd_pack", "fwd", "bwd_pack", "bwd")

    def __init__(self, backend: NumbaBackend, shape: tuple, dtype: np.dtype, cl: bool) -> None:
        self.backend = backend
        self.cl = cl
        self.shape = shape
        self.dtype = dtype
        self.nf = shape[-1] if cl else shape[1]
        self.nbytes = dtype.itemsize * math.prod(shape)
        self.direct = not cl or max(1, min(shape[0], WIDE // max(1, shape[1]))) == 1
        # the per-channel kernels (:mod:`.channel`), as plain attributes
        self.pack = _pack
        self.forward_channels = _fwd_steady
        self.backward_channels = _bwd_steady
        # small inputs (:meth:`small`): data and per-channel kernels in one call
        self.fwd_pack, self.fwd = _steady_fwd_pack, _steady_fwd
        self.bwd_pack, self.bwd = _steady_bwd_pack, _steady_bwd

    def small(self) -> bool:
        """Whether the data kernels run from the steady kernels: not streamed, not pooled.

        Read per call: tests and users may tune the pool and the streaming.
        """
        return self.direct and self.nbytes < STREAM_MIN_BYTES and (
            self.nbytes < POOL.min_bytes or POOL.entries <= 0)

    def moments(self, v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Local per-channel mean and M2 (float64)."""
        if not self.direct:
            return self.backend.moments(v, self.cl, None)
        mean = np.zeros(self.nf, dtype=_F64)
        m2 = np.zeros(self.nf, dtype=_F64)
        (_moments_cl if self.cl else _moments_cf)(v, _NO_TABLE, mean, m2)
        return mean, m2

    def normalize(self, v: np.ndarray, mean: np.ndarray, scale: np.ndarray, bias: np.ndarray,
                  relu: bool) -> np.ndarray:
        """``y`` (canonical shape) as :meth:`NumbaBackend.normalize` writes it."""
        if not self.small():
            return self.backend.normalize(v, self.cl, mean, scale, bias, self.dtype, relu)
        y = np.empty(self.shape, dtype=self.dtype)
        (_normalize_cl if self.cl else _normalize_cf)(
            v, _NO_TABLE, mean, scale, bias, y, (scale, bias) if relu else None)
        return y

    def sums(self, dyv: np.ndarray, v: np.ndarray, mean: np.ndarray,
             act: tuple | None) -> tuple[np.ndarray, np.ndarray]:
        """Local ``sum(dy)`` and ``sum(dy * (x - mean))`` (float64)."""
        if not self.direct:
            return self.backend._sums(dyv, v, self.cl, mean, act)
        sum_dy = np.zeros(self.nf, dtype=_F64)
        sum_dxm = np.zeros(self.nf, dtype=_F64)
        (_bwd_reduce_cl if self.cl else _bwd_reduce_cf)(
            dyv, v, _NO_TABLE, mean, sum_dy, sum_dxm, act)
        return sum_dy, sum_dxm

    def elemt(self, dyv: np.ndarray, v: np.ndarray, mean: np.ndarray, a: np.ndarray,
              mean_dy: np.ndarray, b: np.ndarray, act: tuple | None) -> np.ndarray:
        """``dx`` (canonical shape) as :meth:`NumbaBackend.backward_elemt` writes it."""
        if not self.small():
            return self.backend.backward_elemt(dyv, v, self.cl, mean, a, mean_dy, b,
                                               self.dtype, act)
        dx = np.empty(self.shape, dtype=self.dtype)
        (_bwd_elemt_cl if self.cl else _bwd_elemt_cf)(
            dyv, v, _NO_TABLE, mean, a, mean_dy, b, dx, act)
        return dx


def _act_vectors(relu: tuple | None, cdt: np.dtype) -> tuple | None:
    """The kernels' ``act``: None, or the ReLU's ``(scale, bias)`` in the compute dtype."""
    if relu is None:
        return None
    return (relu[0].astype(cdt, copy=False), relu[1].astype(cdt, copy=False))


def _tiles(act: tuple | None, k: int) -> tuple | None:
    """``act`` for regrouped wide rows (each vector tiled ``k`` times)."""
    return None if act is None else (np.tile(act[0], k), np.tile(act[1], k))


BACKEND = NumbaBackend()


def warm_up(dtypes: tuple[str, ...] = ("float16", "float32", "float64")) -> int:
    """Compile (or load from the disk cache) every kernel the layers use for ``dtypes``.

    Every input dtype with each compute dtype it can meet (float32 and float64;
    float64 inputs only float64), channel-first short and long rows and
    channel-last, all four primitives and the streamed writers, and the
    per-channel steps (:mod:`.channel`) for both compute dtypes. Run it
    once where the cache lives, for instance when building a container image
    or before a large ``mpiexec`` job, so that no rank compiles:
    ``python -m cupysyncbn.backends.numba``.

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
            for shape, cl in (((2, 3, 5), False), ((2, 3, SHORT + 3), False), ((7, 3), True)):
                x = rng.standard_normal(shape).astype(dt)
                c = shape[-1] if cl else shape[1]
                v = np.ones(c, dtype=cdt)
                b.moments(x, cl, cdt)
                for relu in (None, (v, v)):  # without and with the fused ReLU
                    b.normalize(x, cl, v, v, v, dt, relu is not None)
                    b.backward_reduce(x, x, cl, v, v, relu)
                    b.backward_elemt(x, x, cl, v, v, v, v, dt, relu)
                    if not _vector_rows(x):
                        continue
                    xb = _bits(x)  # the streamed writers (large outputs)
                    for bwd in (False, True):
                        out = np.empty_like(xb)
                        if cl:
                            p = _lines_ext(v, x)
                            act = None if relu is None else (p, p)
                            _elemt_cl_stream(xb, xb, _table(x), p, p, p, p, out, bwd, False, act)
                        else:
                            _elemt_cf_stream(xb, xb, _table(x), v, v, v, v, out, bwd, relu)
    for cdt in (np.dtype(np.float32), _F64):  # the per-channel steps (channel)
        v64, vc = np.ones(3), np.ones(3, dtype=cdt)
        b.shifted_sums(2, v64, v64, v64)
        mean, var = b.merge_sums(2, v64, v64, v64, 3)
        b.next_shift(mean)
        b.shift_too_far(mean, var, v64)
        b.stats_scale(mean, var, cdt)
        b.data_unit(mean, var, None, 2, 1e-5, cdt)
        b.forward_coefficients(mean, var, 2, 1e-5, cdt)
        b.running_update(vc, vc, mean, var, 2, 0.9, False, 0)
        for w in (None, vc):
            b.backward_coefficients(w, vc, v64, v64, 2, True, cdt)
    kernels = (_moments_cf, _moments_cl, _normalize_cf, _normalize_cl, _bwd_reduce_cf,
               _bwd_reduce_cl, _bwd_elemt_cf, _bwd_elemt_cl, _elemt_cf_stream, _elemt_cl_stream,
               _merge_groups, _add_groups, *CHANNEL_KERNELS, _steady_fwd_pack, _steady_fwd,
               _steady_bwd_pack, _steady_bwd)
    return sum(len(k.signatures) for k in kernels)

