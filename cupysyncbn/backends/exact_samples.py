"""Per-sample partial sums: the reproducible mode's fast path (NumPy reference).

:mod:`.exact_sums` makes every element's contribution exact, which costs
about 25 float64 operations per element. Samples are never split across
ranks, so a sum *within* a sample may be an ordinary floating-point sum as
long as its order is fixed by the sample alone; only the sums *across*
samples must be exact. This module computes, per sample ``i`` and channel
``c``, a few float64 partials in a canonical order (the same on every rank,
in every backend), and deposits those (``N x C`` values, not ``N x C x S``)
into :mod:`.exact_sums`' fixed-grid folds. The data pass then costs what the
default mode's does.

Forward partials (:func:`sample_moments`), per sample and channel, with
``s`` the shift (the sample's first value in the channel, widened to
float64) and ``d = float64(x) - s`` per element (one rounding):
``a = sum(d)`` and ``b = sum(d * d)`` (the product rounded, then added: no
fused multiply-add). The global statistics follow from the exact identity
(``S`` spatial size, ``N`` global count, sums over the global samples)::

    T  = S * sum(s) + sum(a)                         (the global sum of x)
    M2 = sum(b) + 2 * sum(s * a) + S * sum(s * s) - T * T / N

with ``sum(s * s)`` and ``sum(s * a)`` exact (Dekker's TwoProduct: both
halves deposited) and the last line in double-double
(:func:`finalize_sample_moments`). Backward partials
(:func:`sample_backward`): ``g = sum(float64(dy))`` and
``h = sum(float64(dy) * float64(cdt(x) - mean))`` (``x - mean`` in the
compute dtype, then widened, as the default mode's kernels).

Canonical order of a within-sample sum (what every port must do)
---------------------------------------------------------------
* Channel-first rows ``(S,)`` (:func:`lane_sums`): with ``L = 16``,
  ``F = S - S % 16`` and ``R = F + 8`` if ``S - F >= 8`` else ``F``: element
  ``t < R`` is added to lane ``t % 16`` in increasing ``t`` (lanes start at
  ``+0.0``), elements ``t >= R`` to a tail, in order, from ``+0.0``; then
  ``v[l] = lane[l] + lane[l + 8]`` (l < 8), ``w[l] = v[l] + v[l + 4]``
  (l < 4), ``u[l] = w[l] + w[l + 2]`` (l < 2), result ``(u[0] + u[1]) + tail``.
  (The numba backend's vector loops of ``simd.py`` in this order.)
* Channel-last rows (the ``S`` rows of a sample, :func:`tile_sums`): tiles of
  :data:`TILE_ROWS` rows; each tile's rows added in order from ``+0.0``, then
  the tiles' sums added in order from ``+0.0``.

Bounds: one MAX all-reduce gives, per channel, the exponents ``e_b``,
``e_a``, ``e_s`` of ``max|b|``, ``max|a|``, ``max|s|`` (:func:`local_bounds`);
the fold grids follow (:func:`grids`).

This module is also the NumPy backend's ``exact`` namespace (what
``cupysyncbn._sync.exact`` calls): it re-exports :mod:`.exact_sums`' primitives
for the per-element path. Data far from 1 in float64 (where a
square could overflow or underflow, :func:`safe`), a non-finite value, or
ranks with different spatial sizes send every rank to :mod:`.exact_sums`'
per-element path instead, a decision made from global values only.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .exact_sums import (  # noqa: F401 - the engine's namespace (NumpyBackend.exact)
    EMPTY_EXP,
    FOLD_BITS,
    MAX_COUNT,
    NONFINITE_EXP,
    absmax,
    backward_bounds,
    backward_elemt,
    backward_folds,
    bound_exponent,
    check_count,
    dd_div,
    dd_from_folds,
    fast_two_sum,
    finalize_moments,
    finalize_sum,
    fold_into,
    folds_for,
    moment_folds,
    moments_z,
    normalize,
    scale_exponent,
    scaled,
    scaled_stats,
    sigmas,
    two_prod,
    two_sum,
)

__all__ = [
    "LANES", "TILE_ROWS", "QUANTITIES", "SAFE_LOW", "SAFE_HIGH", "lane_sums", "tile_sums",
    "sample_moments", "sample_backward", "local_bounds", "grids", "safe", "backward_safe",
    "fold_moments", "fold_sums", "finalize_sample_moments",
]

_F64 = np.dtype(np.float64)

#: Lanes of a channel-first within-sample sum.
LANES = 16
#: Rows per tile of a channel-last within-sample sum.
TILE_ROWS = 4
#: Fold sets of the forward: ``b``, ``a``, ``s``, ``s*s`` (two halves), ``s*a`` (two halves).
QUANTITIES = 5
#: Forward fast path: every shift exponent within ``[SAFE_LOW, SAFE_HIGH]``
#: (no square of a difference under- or overflows; float16/32 data always are).
SAFE_LOW, SAFE_HIGH = -380.0, 470.0
#: Backward fast path: exponents of the partial sums within these bounds.
_BWD_LOW, _BWD_HIGH = -800.0, 960.0
#: Samples per block of the NumPy passes (float64 scratch of ~32K values).
_BLOCK = 1 << 15


def lane_sums(t: np.ndarray) -> np.ndarray:
    """Canonical channel-first sums of ``t`` (float64, ``(..., S)``) over the last axis.

    See the module docstring: 16 lanes, an 8-wide step, a scalar tail, a
    fixed tree. ``S >= 1``.
    """
    s = t.shape[-1]
    full = s - s % LANES
    rest = full + (8 if s - full >= 8 else 0)
    body = t[..., :rest]
    if rest % LANES:  # the 8-wide step: lanes 8..15 get +0.0 (an identity: no lane is -0.0)
        pad = np.zeros(t.shape[:-1] + (LANES - rest % LANES,), _F64)
        body = np.concatenate([body, pad], axis=-1)
    lanes = np.add.reduce(body.reshape(t.shape[:-1] + (-1, LANES)), axis=-2, initial=0.0)
    v = lanes[..., :8] + lanes[..., 8:]
    w = v[..., :4] + v[..., 4:]
    u = w[..., :2] + w[..., 2:]
    tail = np.add.reduce(t[..., rest:], axis=-1, initial=0.0) if rest < s else 0.0
    # NumPy reduces along a non-innermost axis in order: np.add.reduce over
    # the rows above adds them one after the other, as the vector loops do
    return (u[..., 0] + u[..., 1]) + tail


def tile_sums(t: np.ndarray) -> np.ndarray:
    """Canonical channel-last sums of ``t`` (float64, ``(n, S, C)``) over axis 1.

    Tiles of :data:`TILE_ROWS` rows, rows added in order within a tile, then
    tiles in order (both from ``+0.0``); a short last tile is padded with
    ``+0.0`` rows (an identity).
    """
    n, s, c = t.shape
    tiles = -(-s // TILE_ROWS)
    if tiles * TILE_ROWS != s:
        t = np.concatenate([t, np.zeros((n, tiles * TILE_ROWS - s, c), _F64)], axis=1)
    per_tile = np.add.reduce(t.reshape(n, tiles, TILE_ROWS, c), axis=2, initial=0.0)
    return np.add.reduce(per_tile, axis=1, initial=0.0)


def _sample_blocks(v: np.ndarray, channel_last: bool, samples: int) -> Any:
    """Yield ``(i0, i1, view)``: blocks of samples as ``(n, C, S)`` or ``(n, S, C)`` views."""
    c = v.shape[1]
    s = (v.shape[0] // samples) if channel_last else v.shape[2]
    step = max(1, _BLOCK // max(1, c * s))
    for i0 in range(0, samples, step):
        i1 = min(samples, i0 + step)
        if channel_last:
            yield i0, i1, v[i0 * s : i1 * s].reshape(i1 - i0, s, c)
        else:
            yield i0, i1, v[i0:i1]


def sample_moments(
    v: np.ndarray, channel_last: bool, samples: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-sample ``(s, a, b)``, each ``(samples, C)`` float64 (see the module docstring).

    ``v``: the canonical view, ``(N, C, S)`` or ``(N*S, C)``, with
    ``samples = N >= 1`` and ``S >= 1``.
    """
    c = v.shape[1]
    out = [np.empty((samples, c), _F64) for _ in range(3)]
    with np.errstate(all="ignore"):
        for i0, i1, blk in _sample_blocks(v, channel_last, samples):
            if channel_last:
                sh = blk[:, 0, :].astype(_F64)
                d = blk.astype(_F64) - sh[:, None, :]
                a, b = tile_sums(d), tile_sums(d * d)
            else:
                sh = blk[:, :, 0].astype(_F64)
                d = blk.astype(_F64) - sh[:, :, None]
                a, b = lane_sums(d), lane_sums(d * d)
            for o, r in zip(out, (sh, a, b)):
                o[i0:i1] = r
    return out[0], out[1], out[2]


def sample_backward(
    dy: np.ndarray, x: np.ndarray, channel_last: bool, mean: np.ndarray, samples: int
) -> tuple[np.ndarray, np.ndarray]:
    """Per-sample ``(g, h)``, each ``(samples, C)`` float64 (see the module docstring).

    ``mean``: the forward's mean in the compute dtype (``x - mean`` is
    computed in that dtype, then widened).
    """
    c = x.shape[1]
    cdt = mean.dtype
    g_out, h_out = np.empty((samples, c), _F64), np.empty((samples, c), _F64)
    with np.errstate(all="ignore"):
        blocks = zip(_sample_blocks(dy, channel_last, samples),
                     _sample_blocks(x, channel_last, samples))
        for (i0, i1, db), (_, _, xb) in blocks:
            g = db.astype(_F64)
            m = mean[None, None, :] if channel_last else mean[None, :, None]
            h = (xb.astype(cdt) - m).astype(_F64)
            h *= g
            red = tile_sums if channel_last else lane_sums
            g_out[i0:i1], h_out[i0:i1] = red(g), red(h)
    return g_out, h_out


def _exponent(q: np.ndarray | None, nf: int) -> np.ndarray:
    """:func:`.exact_sums.bound_exponent` of ``max|q|`` over the samples (NaN-propagating)."""
    if q is None or q.shape[0] == 0:
        return bound_exponent(None, nf)
    with np.errstate(invalid="ignore"):
        a = np.abs(q).max(axis=0)
    return bound_exponent(a, nf)


def local_bounds(parts: tuple | None, nf: int) -> list[np.ndarray]:
    """Exponents of a rank's partials: ``(s, a, b)`` -> ``[e_b, e_a, e_s]``; ``(g, h)`` in order.

    ``parts`` None: no sample here (every exponent :data:`EMPTY_EXP`).
    """
    if parts is None:
        return [bound_exponent(None, nf)] * 3
    if len(parts) == 3:
        s, a, b = parts
        return [_exponent(b, nf), _exponent(a, nf), _exponent(s, nf)]
    return [_exponent(q, nf) for q in parts]


def _add(e1: np.ndarray, e2: np.ndarray) -> np.ndarray:
    """The exponent of a product's bound: ``e1 + e2``, :data:`EMPTY_EXP` if either is."""
    return np.where((e1 == EMPTY_EXP) | (e2 == EMPTY_EXP), EMPTY_EXP, e1 + e2)


def grids(e_b: np.ndarray, e_a: np.ndarray, e_s: np.ndarray) -> np.ndarray:
    """The five fold grids' exponents ``(5, C)``: ``b``, ``a``, ``s``, ``s*s``, ``s*a``.

    ``|s*s| < 2**(2 e_s)`` and ``|s*a| < 2**(e_s + e_a)``; both halves of a
    TwoProduct are deposited on its grid. :data:`EMPTY_EXP` where a factor is.
    """
    return np.stack([e_b, e_a, e_s, _add(e_s, e_s), _add(e_s, e_a)])


def safe(e_b: np.ndarray, e_a: np.ndarray, e_s: np.ndarray) -> bool:
    """Whether the global partials allow the per-sample path (else the per-element one).

    Per channel: no exponent is :data:`NONFINITE_EXP`; ``|s| < 2**SAFE_HIGH``
    and ``b < 2**966`` (no square or partial sum overflowed); and no square
    that matters underflowed: ``|s| >= 2**SAFE_LOW`` somewhere (then every
    nonzero difference is at least ``2**(SAFE_LOW - 53)``), or every shift is
    0 and either the differences are all 0 or ``b >= 2**-700`` (then the
    differences within 78 bits of the largest have normal squares).
    """
    e = np.stack([e_b, e_a, e_s])
    if (e == NONFINITE_EXP).any():
        return False
    high = (e_s <= SAFE_HIGH) & (e_b <= 966.0)
    zero = (e_a == EMPTY_EXP) & (e_b == EMPTY_EXP)
    low = (e_s >= SAFE_LOW) | ((e_s == EMPTY_EXP) & (zero | (e_b >= -700.0)))
    return bool((high & low).all())


def backward_safe(e_g: np.ndarray, e_h: np.ndarray) -> bool:
    """Whether the global backward partials allow the per-sample path (finite, not extreme)."""
    e = np.stack([e_g, e_h])
    ok = (e == EMPTY_EXP) | ((e >= _BWD_LOW) & (e <= _BWD_HIGH))
    return bool(ok.all())


def _deposit(q: np.ndarray, e: np.ndarray, sig: list[float], p: np.ndarray) -> None:
    """Deposit the ``(n, C)`` values ``q`` on the grid ``2**e`` into the folds ``p`` (K x C)."""
    fold_into(scaled(q, e, None), None, sig, p)


def _grid_exponent(e: np.ndarray) -> np.ndarray:
    """The scale exponent of a grid: ``e``, 0 at a sentinel (nothing is deposited there)."""
    return np.where((e == EMPTY_EXP) | (e == NONFINITE_EXP), 0.0, e)


def fold_moments(
    s: np.ndarray, a: np.ndarray, b: np.ndarray, g: np.ndarray, k: int
) -> np.ndarray:
    """Local folds ``(5, K, C)`` of the forward partials on the grids ``g`` (:func:`grids`).

    Deposited (:func:`.exact_sums.fold_into`, each value scaled by
    ``2**-grid``): ``b``, ``a``, ``s``, then both halves of
    ``two_prod(s, s)`` and of ``two_prod(s, a)`` (Dekker, no FMA).
    """
    sig = sigmas(k)
    out = np.zeros((QUANTITIES, k, s.shape[1]), _F64)
    e = _grid_exponent(g)
    with np.errstate(all="ignore"):
        for q, (val, i) in enumerate(((b, 0), (a, 1), (s, 2))):
            _deposit(val, e[i], sig, out[q])
        for q, other in ((3, s), (4, a)):
            hi, lo = two_prod(s, other)
            _deposit(hi, e[q], sig, out[q])
            _deposit(lo, e[q], sig, out[q])
    return out


def fold_sums(parts: tuple, e: list, k: int) -> np.ndarray:
    """Local folds ``(len(parts), K, C)`` of per-sample partials on the grids ``e``."""
    sig = sigmas(k)
    out = np.zeros((len(parts), k, parts[0].shape[1]), _F64)
    with np.errstate(all="ignore"):
        for q, (val, eq) in enumerate(zip(parts, e)):
            _deposit(val, _grid_exponent(eq), sig, out[q])
    return out


# ----------------------------------------------------------- double-double
def _dd(p: np.ndarray, e: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The double-double value of folds ``p`` (K x C) on the grid ``2**e``."""
    hi, lo = dd_from_folds(p)
    n = _grid_exponent(e).astype(np.int64)
    return np.ldexp(hi, n), np.ldexp(lo, n)


def _dd_add(ah: Any, al: Any, bh: Any, bl: Any) -> tuple[Any, Any]:
    """``(ah + al) + (bh + bl)``.

    ``(s, t) = two_sum(ah, bh)``; ``fast_two_sum(s, t + (al + bl))``.
    """
    s, t = two_sum(ah, bh)
    return fast_two_sum(s, t + (al + bl))


def _dd_mul(ah: Any, al: Any, bh: Any, bl: Any) -> tuple[Any, Any]:
    """``(ah + al) * (bh + bl)``.

    ``(p, t) = two_prod(ah, bh)``; ``fast_two_sum(p, t + (ah*bl + al*bh))``.
    """
    p, t = two_prod(ah, bh)
    return fast_two_sum(p, t + (ah * bl + al * bh))


def finalize_sample_moments(
    p: np.ndarray, g: np.ndarray, spatial: int, count: int
) -> tuple[np.ndarray, np.ndarray]:
    """Global ``(mean, biased var)`` (float64) from the all-reduced folds ``p`` (5, K, C).

    In double-double, in this order (``S = spatial``, ``N = count``):
    ``T = S * sum(s) + sum(a)``; ``mean = T / N``;
    ``M2 = ((sum(b) + 2 sum(s*a)) + S * sum(s*s)) - T * mean``;
    ``var = max(M2 / N, 0)`` (each rounded to float64 at the end).
    """
    sz = float(spatial)
    n = float(count)
    with np.errstate(all="ignore"):
        bh, bl = _dd(p[0], g[0])
        ah, al = _dd(p[1], g[1])
        sh, sl = _dd(p[2], g[2])
        qh, ql = _dd(p[3], g[3])
        rh, rl = _dd(p[4], g[4])
        th, tl = _dd_add(*_dd_mul(sh, sl, sz, 0.0), ah, al)
        mh, ml = dd_div(th, tl, n)
        m2 = _dd_add(bh, bl, rh + rh, rl + rl)
        m2 = _dd_add(*m2, *_dd_mul(qh, ql, sz, 0.0))
        tm = _dd_mul(th, tl, mh, ml)
        m2 = _dd_add(*m2, -tm[0], -tm[1])
        vh, _ = dd_div(m2[0], m2[1], n)
    return mh + 0.0, np.maximum(vh, 0.0)
