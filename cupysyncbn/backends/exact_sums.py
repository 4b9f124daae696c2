"""Exact, order-independent per-channel sums: the reference primitives of the reproducible mode.

Floating-point addition is not associative, so a sum over a batch split
across ranks depends on the split. The reproducible mode
(``reproducible=True``, see ``docs/reproducibility.md``) makes every
cross-element sum *exact*: then no order, split or reduction tree can change
a bit. This module is the NumPy reference of the per-element and per-channel
steps; the numba backend and the CUDA kernels must reproduce it bit for bit,
so every docstring states the exact IEEE float64 operations and their order.
All operations are float64, round-to-nearest-even, with no fused
multiply-add and no reassociation.

The scheme (per channel ``c``; "extraction" as in Rump-Ogita-Oishi AccSum and
ReproBLAS's binned sums, with grids fixed once and for all)
----------------------------------------------------------------------------
1. **Bound** (:func:`absmax`, :func:`bound_exponent`): every rank computes its
   local ``a = max|v|`` and the exponent ``e`` with ``a < 2**e``; a MAX
   all-reduce gives the global ``E = max(e)``, which depends on the global
   batch only. Sentinels: :data:`EMPTY_EXP` (``a == 0`` or no element) and
   :data:`NONFINITE_EXP` (a NaN/Inf in the channel; wins the MAX).
2. **Deposit** (:func:`fold_into`): each element is scaled to
   ``z = v * 2**-E`` (exact unless it underflows: then rounded, still a
   function of ``v`` and ``E`` only) so ``|z| <= 1``. With
   ``B = FOLD_BITS``, the fixed grids ``u_k = 2**(-k*B)`` and
   ``sigma_k = 1.5 * 2**52 * u_k`` (k = 1..K)::

       r = z
       for k in 1..K:
           t = (r + sigma_k) - sigma_k     # r rounded to a multiple of u_k
           r = r - t                       # exact; |r| <= u_k / 2
           P[k] += t

   ``t`` is exact and depends on ``z`` only; what is left in ``r`` after fold
   ``K`` is dropped (a deterministic per-element truncation below
   ``2**(E - K*B - 1)``). Every ``t`` of fold ``k`` is a multiple of ``u_k``
   with ``|t| <= 2**B * u_k`` (fold 1: ``|t| <= 1``), so any partial sum of at
   most :data:`MAX_COUNT` of them is a multiple of ``u_k`` below
   ``2**53 * u_k``: exactly representable. Hence ``P[k]`` is the same float64
   number whatever the order of the additions (BLAS, SIMD lanes, chunks,
   ranks, the all-reduce tree). The grids do not depend on the world size or
   the split, so neither does any ``P[k]``.
3. **All-reduce**: a float64 SUM of the ``P`` vectors, exact for the same
   reason (the global count per channel is at most :data:`MAX_COUNT`).
4. **Finalize** (:func:`finalize_moments`, :func:`finalize_sum`): fixed
   sequences of TwoSum / Dekker TwoProduct / double-double operations on the
   ``P`` vectors: identical inputs, identical outputs.

Squares (:func:`square_parts`): for data narrower than float64 ``z*z`` is
exact in float64 and deposited as one value. For float64 data ``z`` is split
(Veltkamp, no FMA) into ``hi + lo`` with 26-bit halves, and the three exact
products ``hi*hi``, ``2*hi*lo``, ``lo*lo`` are deposited separately (for
narrower data the split gives ``lo == 0``, so both routes give the same
bits: a port may always split).

Precision: ``K * B`` bits below ``2**E`` (:func:`folds_for`): 78 for float32
compute, 130 for float64. The finalize works in double-double (~106 bits).

Porting checklist (CUDA; the engine is ``cupysyncbn/_sync/exact.py``)
--------------------------------------------------------------------
* Constants: ``B = 26``, ``K = 3`` (float32 compute) or ``5`` (float64),
  ``sigma_k = 1.5 * 2**(52 - 26 k)``, ``SPLITTER = 2**27 + 1``, sentinels
  ``-4096`` / ``+4096``, at most ``2**26`` values per channel globally.
* Per element, no FMA contraction anywhere (``__dadd_rn``, ``__dsub_rn``,
  ``__dmul_rn`` or ``-fmad=false``): the scaling ``(v * f1) * f2`` with the
  two factors of :func:`scaled` (``f2 = 1`` unless ``E < -1023``), the fold
  ``t = (r + s) - s; r = r - t``, the square split, ``h = (x - mean) * g``
  (``mean`` widened from the compute dtype), and the elementwise formulas of
  :func:`normalize` / :func:`backward_elemt` in the compute dtype with one
  final rounding to the output dtype.
* The fold sums (``P``) and the maxima (:func:`absmax`, :func:`backward_bounds`)
  are exact: any order, any atomics, any tree.
* The C-sized steps (:func:`bound_exponent`, :func:`scale_exponent`,
  :func:`finalize_moments`, :func:`finalize_sum`, :func:`scaled_stats`) may
  stay on the host or be ported operation for operation; NaN for a NaN/Inf
  channel, 0 for an empty one.
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = [
    "FOLD_BITS", "MAX_COUNT", "EMPTY_EXP", "NONFINITE_EXP", "SPLITTER", "folds_for",
    "sigmas", "absmax", "bound_exponent", "scale_exponent", "pow2", "scaled", "scale_factors",
    "fold_into", "square_parts", "moment_folds", "backward_bounds", "backward_folds",
    "two_sum", "fast_two_sum", "two_prod", "dd_from_folds", "dd_div", "finalize_sum",
    "finalize_moments", "check_count", "normalize", "backward_elemt", "moments_z",
    "scaled_stats",
]

_F64 = np.dtype(np.float64)

#: ``B``: bits per fold (the grids are ``u_k = 2**(-k*B)``).
FOLD_BITS = 26
#: Most elements per channel in the global batch: every partial sum of a fold
#: stays below ``2**53 * u_k`` (with margin for the three square parts).
MAX_COUNT = 2 ** (52 - FOLD_BITS)
#: Exponent sent for a channel with no element or only zeros (loses every MAX).
EMPTY_EXP = -4096.0
#: Exponent sent for a channel with a NaN or Inf (wins every MAX).
NONFINITE_EXP = 4096.0
#: Veltkamp's splitter for float64: ``2**27 + 1``.
SPLITTER = 134217729.0

#: Folds per compute dtype: ``K * B`` bits of the scaled values are kept.
_FOLDS = {np.dtype(np.float32): 3, np.dtype(np.float64): 5}

#: Elements per chunk of the data passes (float64 scratch stays in cache).
_CHUNK = 1 << 15


def folds_for(cdt: Any) -> int:
    """``K`` for a compute dtype: 3 (78 bits) for float32, 5 (130 bits) for float64."""
    return _FOLDS.get(np.dtype(cdt), 5)


def sigmas(k_folds: int) -> list[float]:
    """``sigma_k = 1.5 * 2**52 * 2**(-k*B)`` for k = 1..K (exact powers-of-two multiples)."""
    return [float(np.ldexp(1.5, 52 - k * FOLD_BITS)) for k in range(1, k_folds + 1)]


def check_count(total: int) -> None:
    """Raise if a global per-channel count exceeds :data:`MAX_COUNT` (called on every rank).

    Raises
    ------
    ValueError
        ``total > MAX_COUNT``: the fold sums might not be exact any more.
    """
    if total > MAX_COUNT:
        raise ValueError(
            f"reproducible=True supports at most {MAX_COUNT} values per channel in the"
            f" global batch (batch x spatial size summed over ranks); got {total}."
            " Use reproducible=False for this layer, or a smaller global batch"
        )


# ---------------------------------------------------------------------------
# Layout helpers: canonical views (N, C, S) channel-first or (M, C) channel-last
# ---------------------------------------------------------------------------


def _chunks(v: np.ndarray, channel_last: bool) -> Any:
    """Yield ``(block, rows)``: 2-D float views of ``v`` and the channel of each row.

    Channel-first: rows of ``(N*C, S)``, channel ``r % C``; channel-last:
    blocks of rows of ``(M, C)`` (``rows`` is None: the channel is the column).
    """
    if channel_last:
        m, c = v.shape
        step = max(1, _CHUNK // max(c, 1))
        for r0 in range(0, m, step):
            yield v[r0 : r0 + step], None
        return
    n, c, s = v.shape
    v2 = v.reshape(n * c, s)
    step = max(1, _CHUNK // max(s, 1))
    for r0 in range(0, n * c, step):
        rows = np.arange(r0, min(n * c, r0 + step)) % c
        yield v2[r0 : r0 + step], rows


def _per_row(vec: np.ndarray, rows: Any) -> np.ndarray:
    """A per-channel vector laid along a block: a row column or a column row."""
    return vec[None, :] if rows is None else vec[rows][:, None]


def _channel_sum(t: np.ndarray, rows: Any, c: int, out: np.ndarray) -> None:
    """``out[c] += sum of t over the elements of channel c`` (exact: any order)."""
    if rows is None:
        out += t.sum(axis=0)
    else:
        out += np.bincount(rows, weights=t.sum(axis=1), minlength=c)


# ---------------------------------------------------------------------------
# 1. Bounds
# ---------------------------------------------------------------------------


def absmax(v: np.ndarray, channel_last: bool) -> np.ndarray:
    """Local ``max|v|`` per channel (float64); NaN where the channel has a NaN.

    ``v`` is a canonical view with at least one element per channel.
    """
    axes = (0,) if channel_last else (0, 2)
    with np.errstate(invalid="ignore"):
        hi = np.max(v, axis=axes).astype(_F64)
        lo = np.min(v, axis=axes).astype(_F64)
    return np.maximum(np.abs(hi), np.abs(lo))  # NaN propagates


def bound_exponent(a: np.ndarray | None, nf: int) -> np.ndarray:
    """The exponent each rank sends: ``e`` with ``a < 2**e`` (``frexp(a)[1]``), per channel.

    ``a``: local ``max|v|`` (None: this rank has no element). :data:`EMPTY_EXP`
    where ``a == 0`` or no element; :data:`NONFINITE_EXP` where ``a`` is NaN
    or Inf. The global bound is the MAX over ranks.
    """
    if a is None:
        return np.full(nf, EMPTY_EXP)
    e = np.frexp(np.where(np.isfinite(a), a, 1.0))[1].astype(_F64)
    e = np.where(a == 0, EMPTY_EXP, e)
    return np.where(np.isfinite(a), e, NONFINITE_EXP)


def scale_exponent(e_global: np.ndarray) -> np.ndarray:
    """The exponent ``E`` the data are scaled by: the global bound, 0 at a sentinel."""
    ok = (e_global != EMPTY_EXP) & (e_global != NONFINITE_EXP)
    return np.where(ok, e_global, 0.0)


def pow2(n: np.ndarray) -> np.ndarray:
    """``2**n`` per channel (``n`` integral float64 in [-1074, 1023]): exact."""
    return np.ldexp(1.0, n.astype(np.int64))


def scaled(block: np.ndarray, e: np.ndarray, rows: Any) -> np.ndarray:
    """``z = float64(block) * 2**-E`` per channel, correctly rounded (a new float64 array).

    The multiplication by an exact power of two equals ``ldexp(v, -E)``
    (exact, or correctly rounded on underflow). When ``2**-E`` itself is not
    a float64 (``E < -1022``: data below ``2**-1022``) the scaling is done in
    two exact steps, ``2**(-E-600) * 2**600``, on an already exact value.
    """
    z = block.astype(_F64)
    f1, f2 = scale_factors(e)
    z *= _per_row(f1, rows)
    if (f2 != 1.0).any():  # times 1.0 is exact: skipping it changes no bit
        z *= _per_row(f2, rows)
    return z


def scale_factors(e: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``2**-E`` per channel as two exact factors ``(f1, f2)`` (``f2`` is 1 unless ``E < -1023``).

    ``f1 = 2**(-E-600)``, ``f2 = 2**600`` where ``2**-E`` is not a float64,
    else ``f1 = 2**-E``, ``f2 = 1``: :func:`scaled` multiplies by ``f1``,
    then by ``f2`` (the numba loops and the CUDA kernels by both, always).
    """
    neg = -e
    big = neg > 1023
    return pow2(np.where(big, neg - 600.0, neg)), np.where(big, 2.0**600, 1.0)


# ---------------------------------------------------------------------------
# 2. Deposit
# ---------------------------------------------------------------------------


def fold_into(r: np.ndarray, rows: Any, sig: list[float], p: np.ndarray) -> None:
    """Deposit the elements of ``r`` (|r| <= 1, float64) into the folds ``p`` (K x C).

    Per element, in this order, for k = 1..K: ``t = (r + sigma_k) - sigma_k``;
    ``r = r - t``; ``p[k, c] += t`` (``r`` is overwritten). The per-channel
    sums of ``t`` are exact, so their order is free.
    """
    t = np.empty_like(r)
    c = p.shape[1]
    last = len(sig) - 1
    for k, s in enumerate(sig):
        np.add(r, s, out=t)
        np.subtract(t, s, out=t)
        if k < last:
            np.subtract(r, t, out=r)
        _channel_sum(t, rows, c, p[k])


def square_parts(z: np.ndarray, split: bool) -> list[np.ndarray]:
    """The exact parts of ``z*z`` (float64, ``|z| <= 1``): ``[z*z]`` or the split's three.

    ``split`` (float64 data): ``p = z * SPLITTER``; ``hi = p - (p - z)``;
    ``lo = z - hi``; parts ``hi*hi``, ``m + m`` with ``m = hi*lo``, and
    ``lo*lo`` (each exact: 26-bit halves). Without ``split`` (data of at most
    24 significant bits) ``z*z`` is exact already; splitting such data gives
    ``lo == 0`` and the same deposits.
    """
    if not split:
        return [z * z]
    p = z * SPLITTER
    hi = p - (p - z)
    lo = z - hi
    m = hi * lo
    return [hi * hi, m + m, lo * lo]


def moment_folds(
    v: np.ndarray, channel_last: bool, e: np.ndarray, k_folds: int
) -> tuple[np.ndarray, np.ndarray]:
    """Local folds ``(P1, P2)`` (each K x C, float64) of ``z`` and ``z*z``, ``z = v * 2**-E``.

    ``e``: :func:`scale_exponent` of the global bound. Every element of ``v``
    is deposited (:func:`fold_into`): ``z`` itself into ``P1`` and the parts
    of ``z*z`` (:func:`square_parts`, split for float64 data) into ``P2``.
    """
    c = v.shape[1]
    sig = sigmas(k_folds)
    p1 = np.zeros((k_folds, c), _F64)
    p2 = np.zeros((k_folds, c), _F64)
    split = np.dtype(v.dtype).itemsize >= 8
    with np.errstate(all="ignore"):
        for block, rows in _chunks(v, channel_last):
            z = scaled(block, e, rows)
            parts = square_parts(z, split)
            fold_into(z, rows, sig, p1)
            for q in parts:
                fold_into(q, rows, sig, p2)
    return p1, p2


def _products(dyb: np.ndarray, xb: np.ndarray, mean: np.ndarray, rows: Any) -> tuple:
    """``g = float64(dy)`` and ``h = g * (float64(x) - mean)`` (mean: float64 per channel)."""
    g = dyb.astype(_F64)
    h = xb.astype(_F64)
    h -= _per_row(mean, rows)
    h *= g
    return g, h


def backward_bounds(
    dy: np.ndarray, x: np.ndarray, channel_last: bool, mean: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Local ``max|g|`` and ``max|h|`` per channel (see :func:`backward_folds`)."""
    c = x.shape[1]
    ag, ah = np.zeros(c, _F64), np.zeros(c, _F64)
    mean = mean.astype(_F64)
    with np.errstate(all="ignore"):
        for (db, rows), (xb, _) in zip(_chunks(dy, channel_last), _chunks(x, channel_last)):
            g, h = _products(db, xb, mean, rows)
            for a, w in ((ag, g), (ah, h)):
                w = np.abs(w)
                if rows is None:
                    np.fmax(a, w.max(axis=0), out=a)
                    bad = np.isnan(w).any(axis=0)
                else:
                    m = w.max(axis=1)
                    bad = np.zeros(c, bool)
                    np.logical_or.at(bad, rows, np.isnan(m))
                    np.fmax.at(a, rows, m)
                a[bad] = np.nan
    return ag, ah


def backward_folds(
    dy: np.ndarray, x: np.ndarray, channel_last: bool, mean: np.ndarray,
    e_g: np.ndarray, e_h: np.ndarray, k_folds: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Local folds ``(Pg, Ph)`` (each K x C) of ``g * 2**-Eg`` and ``h * 2**-Eh``.

    Per element: ``g = float64(dy)``; ``h = g * (float64(x) - mean)`` with
    ``mean`` the forward's mean in the compute dtype, widened to float64
    (one subtraction and one multiplication, both rounded); then each is
    scaled (:func:`scaled`) and deposited (:func:`fold_into`).
    """
    c = x.shape[1]
    sig = sigmas(k_folds)
    pg = np.zeros((k_folds, c), _F64)
    ph = np.zeros((k_folds, c), _F64)
    mean = mean.astype(_F64)
    with np.errstate(all="ignore"):
        for (db, rows), (xb, _) in zip(_chunks(dy, channel_last), _chunks(x, channel_last)):
            g, h = _products(db, xb, mean, rows)
            fold_into(scaled(g, e_g, rows), rows, sig, pg)
            fold_into(scaled(h, e_h, rows), rows, sig, ph)
    return pg, ph


# ---------------------------------------------------------------------------
# 4. Finalize (C-sized, error-free transformations; float64, no FMA)
# ---------------------------------------------------------------------------


def two_sum(a: Any, b: Any) -> tuple[Any, Any]:
    """Knuth's TwoSum: ``s = a + b``; ``bb = s - a``; ``err = (a - (s - bb)) + (b - bb)``."""
    s = a + b
    bb = s - a
    return s, (a - (s - bb)) + (b - bb)


def fast_two_sum(a: Any, b: Any) -> tuple[Any, Any]:
    """Dekker's FastTwoSum (``|a| >= |b|`` or a == 0): ``s = a + b``; ``err = b - (s - a)``."""
    s = a + b
    return s, b - (s - a)


def _split(a: Any) -> tuple[Any, Any]:
    p = a * SPLITTER
    hi = p - (p - a)
    return hi, a - hi


def two_prod(a: Any, b: Any) -> tuple[Any, Any]:
    """Dekker's TwoProduct without FMA: ``p = a*b`` and the exact error.

    ``(ah, al) = split(a)``, ``(bh, bl) = split(b)`` (Veltkamp, SPLITTER);
    ``err = ((ah*bh - p) + ah*bl + al*bh) + al*bl`` evaluated left to right.
    """
    p = a * b
    ah, al = _split(a)
    bh, bl = _split(b)
    return p, (((ah * bh - p) + ah * bl) + al * bh) + al * bl


def dd_from_folds(p: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The double-double ``(hi, lo)`` of ``sum_k P[k]`` (K x C), from the smallest fold up.

    ``hi = P[K]``, ``lo = 0``; for k = K-1 down to 1:
    ``(s, e) = two_sum(hi, P[k])``; ``e = e + lo``; ``(hi, lo) = fast_two_sum(s, e)``.
    """
    hi = p[-1].copy()
    lo = np.zeros_like(hi)
    for k in range(p.shape[0] - 2, -1, -1):
        s, e = two_sum(hi, p[k])
        hi, lo = fast_two_sum(s, e + lo)
    return hi, lo


def dd_div(hi: Any, lo: Any, d: float) -> tuple[Any, Any]:
    """Double-double ``(hi, lo) / d`` for a float64 ``d > 0``.

    ``q = hi / d``; ``(p, e) = two_prod(q, d)``; ``r = (((hi - p) - e) + lo) / d``;
    ``fast_two_sum(q, r)``.
    """
    q = hi / d
    p, e = two_prod(q, d)
    r = (((hi - p) - e) + lo) / d
    return fast_two_sum(q, r)


def _dd_sq(hi: Any, lo: Any) -> tuple[Any, Any]:
    """``(hi + lo)**2`` in double-double.

    ``(p, e) = two_prod(hi, hi)``; ``m = hi*lo``; ``fast_two_sum(p, e + (m + m))``.
    """
    p, e = two_prod(hi, hi)
    m = hi * lo
    return fast_two_sum(p, e + (m + m))


def _dd_sub(ah: Any, al: Any, bh: Any, bl: Any) -> Any:
    """``(ah + al) - (bh + bl)`` rounded to float64.

    ``(s, e) = two_sum(ah, -bh)``; ``s + (e + (al - bl))``.
    """
    s, e = two_sum(ah, -bh)
    return s + (e + (al - bl))


def _unscale(v: np.ndarray, e: np.ndarray) -> np.ndarray:
    """``v * 2**e`` per channel, correctly rounded (``ldexp``)."""
    return np.ldexp(v, e.astype(np.int64))


def finalize_sum(p: np.ndarray, e_global: np.ndarray) -> np.ndarray:
    """The global sum per channel (float64) from all-reduced folds ``P`` (K x C).

    ``hi`` of :func:`dd_from_folds`, times ``2**E`` (``ldexp``). NaN at
    :data:`NONFINITE_EXP`, 0 at :data:`EMPTY_EXP`.
    """
    with np.errstate(all="ignore"):
        hi, _ = dd_from_folds(p)
        out = _unscale(hi, scale_exponent(e_global))
    out = np.where(e_global == EMPTY_EXP, 0.0, out)
    return np.where(e_global == NONFINITE_EXP, np.nan, out)


def moments_z(p1: np.ndarray, p2: np.ndarray, count: int) -> tuple[np.ndarray, np.ndarray]:
    """``(mean, biased var)`` of the scaled values ``z`` (float64, before ``2**E``).

    The first steps of :func:`finalize_moments`: ``n = float64(count)``;
    ``(s1h, s1l) = dd_from_folds(P1)``, ``(s2h, s2l) = dd_from_folds(P2)``;
    ``(mh, ml) = dd_div(s1h, s1l, n)``; ``(qh, ql) = dd_div(s2h, s2l, n)``;
    ``(sh, sl) = _dd_sq(mh, ml)``; returns ``mh`` and
    ``max(_dd_sub(qh, ql, sh, sl), 0)``.
    """
    n = float(count)
    with np.errstate(all="ignore"):
        s1h, s1l = dd_from_folds(p1)
        s2h, s2l = dd_from_folds(p2)
        mh, ml = dd_div(s1h, s1l, n)
        qh, ql = dd_div(s2h, s2l, n)
        sh, sl = _dd_sq(mh, ml)
        return mh, np.maximum(_dd_sub(qh, ql, sh, sl), 0.0)


def finalize_moments(
    p1: np.ndarray, p2: np.ndarray, count: int, e_global: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Global ``(mean, biased var)`` per channel (float64) from all-reduced folds.

    With ``n = float64(count)`` and ``E`` = :func:`scale_exponent`:
    ``(s1h, s1l) = dd_from_folds(P1)``, ``(s2h, s2l) = dd_from_folds(P2)``;
    ``(mh, ml) = dd_div(s1h, s1l, n)``; ``(qh, ql) = dd_div(s2h, s2l, n)``;
    ``(sh, sl) = _dd_sq(mh, ml)``; ``var = max(_dd_sub(qh, ql, sh, sl), 0)``;
    ``mean = ldexp(mh, E)``, ``var = ldexp(var, 2E)``. Zeros at
    :data:`EMPTY_EXP`, NaN at :data:`NONFINITE_EXP`; ``count`` > 0.
    """
    e = scale_exponent(e_global)
    mh, var = moments_z(p1, p2, count)
    with np.errstate(all="ignore"):
        mean = _unscale(mh, e)
        var = _unscale(var, e + e)
    empty = e_global == EMPTY_EXP
    bad = e_global == NONFINITE_EXP
    mean = np.where(bad, np.nan, np.where(empty, 0.0, mean))
    var = np.where(bad, np.nan, np.where(empty, 0.0, var))
    return mean, var


def scaled_stats(
    p1: np.ndarray, p2: np.ndarray, count: int, e_global: np.ndarray,
    mean: np.ndarray, var: np.ndarray,
) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """Statistics of ``x * p`` where those of ``x`` leave float64, or None.

    ``mean``/``var``: :func:`finalize_moments`. A channel with finite data
    whose mean or variance overflowed, or whose variance fell below
    ``2**-1000`` while the scaled one is not 0 (data near float64's limits),
    gets ``p = 2**q``, ``q = clip(-E, -1000, 1000)``, and the statistics of
    ``x * p``: ``ldexp(mean_z, E + q)``, ``ldexp(var_z, 2 (E + q))``
    (:func:`moments_z`); ``p = 1`` and the given values elsewhere. The
    engine then treats them as the default mode treats its rescaled
    statistics. Returns ``(mean_s, var_s, p)``.
    """
    e = scale_exponent(e_global)
    mz, vz = moments_z(p1, p2, count)
    with np.errstate(all="ignore"):
        bad = (e_global != NONFINITE_EXP) & (e_global != EMPTY_EXP) & (
            ~np.isfinite(mean) | ~np.isfinite(var) | ((var < 2.0**-1000) & (vz > 0)))
    if not bad.any():
        return None
    q = np.where(bad, np.clip(-e, -1000.0, 1000.0), 0.0)
    with np.errstate(all="ignore"):
        mean_s = np.where(bad, _unscale(mz, e + q), mean)
        var_s = np.where(bad, _unscale(vz, 2.0 * (e + q)), var)
    return mean_s, var_s, pow2(q)


# ---------------------------------------------------------------------------
# 5. Elementwise passes in the reproducible mode (one canonical formula)
# ---------------------------------------------------------------------------


def normalize(
    v: np.ndarray, channel_last: bool, mean: np.ndarray, scale: np.ndarray, bias: np.ndarray,
    out_dtype: Any,
) -> np.ndarray:
    """``y = ((x - mean) * scale) + bias`` in the compute dtype ``mean.dtype``, then cast.

    Per element, in the compute dtype ``cdt`` (float32 or float64; float16
    and bfloat16 inputs widened exactly): ``t = cdt(x) - mean``;
    ``t = t * scale``; ``t = t + bias``; ``y = out_dtype(t)`` (one rounding,
    to nearest even). The default mode's NumPy channel-first pass folds the
    bias into the center (fewer passes, other bits); this formula is the
    one every backend uses in the reproducible mode.
    """
    cdt = mean.dtype
    y = np.empty(v.shape, dtype=np.dtype(out_dtype))
    for (block, rows), (out, _) in zip(_chunks(v, channel_last), _chunks(y, channel_last)):
        t = block.astype(cdt)
        t -= _per_row(mean, rows)
        t *= _per_row(scale.astype(cdt, copy=False), rows)
        t += _per_row(bias.astype(cdt, copy=False), rows)
        out[...] = t
    return y


def backward_elemt(
    dy: np.ndarray, x: np.ndarray, channel_last: bool, mean: np.ndarray, a: np.ndarray,
    mean_dy: np.ndarray, b: np.ndarray, out_dtype: Any,
) -> np.ndarray:
    """``dx = ((dy - mean_dy) * a) - ((x - mean) * b)`` in the compute dtype, then cast.

    Per element, in ``cdt = mean.dtype``: ``t = cdt(dy) - mean_dy``;
    ``t = t * a``; ``u = cdt(x) - mean``; ``u = u * b``; ``t = t - u``;
    ``dx = out_dtype(t)``.
    """
    cdt = mean.dtype
    dx = np.empty(x.shape, dtype=np.dtype(out_dtype))
    it = zip(_chunks(dy, channel_last), _chunks(x, channel_last), _chunks(dx, channel_last))
    for (db, rows), (xb, _), (out, _) in it:
        t = db.astype(cdt)
        t -= _per_row(mean_dy.astype(cdt, copy=False), rows)
        t *= _per_row(a.astype(cdt, copy=False), rows)
        u = xb.astype(cdt)
        u -= _per_row(mean, rows)
        u *= _per_row(b.astype(cdt, copy=False), rows)
        t -= u
        out[...] = t
    return dx
