"""The per-channel steps of :class:`~.channel_math.ChannelMath` as compiled loops.

On the CPU a synchronized pass spends, besides its four data-sized kernels,
a fixed cost on C-sized vectors: what a rank sends, the merge, the next
shift, the coefficients, the running update and the backward coefficients
are about 35 NumPy calls per forward and backward. Each is cheap, but after
the data passes have pushed the interpreter's code and data out of the
caches they cost 5-10 µs apiece, a tenth of a late-ResNet layer's step
(``(16, 2048, 7, 7)`` per rank). Here each primitive is one numba call.

Same operations in the same order and dtypes as ``ChannelMath``, so the
results are bitwise those of the NumPy backend: float64 math as there,
``var`` clamped like ``np.maximum(v, 0.0)`` (NaN stays NaN), products of
compute-dtype values rounded to the compute dtype before they meet float64,
and the running update in the running statistics' dtype (NumPy 2 casts the
Python-float momentum to it). Anything else (other dtypes, arrays that are
not contiguous vectors) goes to ``ChannelMath``.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from numba import njit

from ..channel_math import (
    _RESCALE,
    P_CUMULATIVE,
    P_EPS,
    P_EXPECTED,
    P_RATIO,
    P_SIZE,
    P_TINY_MEAN,
    P_TINY_VAR,
    P_UNIT_HI,
    P_UNIT_LO,
    P_UPDATE,
    SHIFT_REDO,
    STEADY_COUNT,
    STEADY_HEADER,
    STEADY_OK,
    STEADY_RARE,
    ChannelMath,
    momentum_weights,
    unbiased_ratio,
)

__all__ = ["NumbaChannelMath", "CHANNEL_KERNELS"]

_F64 = np.dtype(np.float64)
_EPS64 = float(np.finfo(np.float64).eps)
_FLOATS = (np.dtype(np.float32), _F64)
_JIT: dict[str, Any] = {"cache": True, "fastmath": False, "nogil": True}


@njit(**_JIT)
def _shifted(n, mean_r, m2_r, shift, s, q):  # noqa: ANN001, ANN202
    for c in range(mean_r.shape[0]):
        d = mean_r[c] - shift[c]
        s[c] = d * n
        q[c] = m2_r[c] + (d * d) * n


@njit(**_JIT)
def _merge(total, s, q, shift, mean, var):  # noqa: ANN001, ANN202
    for c in range(s.shape[0]):
        mean[c] = shift[c] + s[c] / total
        v = (q[c] - s[c] * s[c] / total) / total
        var[c] = v if (v >= 0.0 or v != v) else 0.0  # np.maximum(v, 0.0)


@njit(**_JIT)
def _next_shift(mean, out):  # noqa: ANN001, ANN202
    for c in range(mean.shape[0]):
        m = mean[c]
        out[c] = m if math.isfinite(m) else 0.0


@njit(**_JIT)
def _fwd_coef(mean, var, eps, empty, mean_c, invstd):  # noqa: ANN001, ANN202
    for c in range(mean.shape[0]):
        mean_c[c] = mean[c]
        if empty:
            invstd[c] = 0.0
        else:
            ve = var[c] + eps
            invstd[c] = 0.0 if ve == 0.0 else 1.0 / math.sqrt(ve)


@njit(**_JIT)
def _running(old, batch, ratio, keep, factor, out):  # noqa: ANN001, ANN202
    # ``keep``/``factor`` are scalars of ``out``'s dtype; the batch value is
    # rounded to it by the store, as ``batch.astype(old.dtype)`` does.
    for c in range(old.shape[0]):
        out[c] = batch[c] * ratio
        out[c] = old[c] * keep + out[c] * factor


@njit(**_JIT)
def _bwd_coef(weight, invstd, g_dy, g_dxh, count, live, a, mean_dy, b):  # noqa: ANN001, ANN202
    for c in range(invstd.shape[0]):
        a[c] = invstd[c] if weight.shape[0] == 0 else weight[c] * invstd[c]
        if live:
            mean_dy[c] = g_dy[c] / count
            b[c] = (a[c] * invstd[c]) * (g_dxh[c] / count)
        else:
            mean_dy[c] = 0.0
            b[c] = 0.0


@njit(**_JIT)
def _far(mean, var, shift, t, teps):  # noqa: ANN001, ANN202
    # ChannelMath.shift_too_far, the same float operations
    for c in range(mean.shape[0]):
        m = mean[c]
        d = m - shift[c]
        if math.isfinite(m) and d * d > t * var[c] + teps * (m * m):
            return True
    return False


@njit(**_JIT)
def _needs_scale(mean, var, tiny_mean, tiny_var):  # noqa: ANN001, ANN202
    # whether ChannelMath.stats_scale returns an array
    for c in range(mean.shape[0]):
        m, v = mean[c], var[c]
        if not (math.isfinite(m) and math.isfinite(v)):
            return True
        if abs(m) < tiny_mean and v < tiny_var and not (m == 0.0 and v == 0.0):
            return True
    return False


@njit(**_JIT)
def _needs_unit(var, eps, lo, hi):  # noqa: ANN001, ANN202
    # whether ChannelMath.data_unit returns an array, for unscaled statistics:
    # log2(sqrt(var + eps)) outside [lo, hi], compared as var + eps vs 4^lo, 4^hi
    for c in range(var.shape[0]):
        s2 = var[c] + eps
        if s2 > 0.0 and math.isfinite(s2) and (s2 < lo or s2 > hi):
            return True
    return False


# ------------------------------------------------ steady-state passes (one call)
# A layer's steady-state pass (``_sync.passes.SteadyPlan``) runs the per-channel
# steps of a forward or backward as ONE compiled call instead of five to
# seven, each with its Python checks in front: the same operations, in the
# same order and dtypes as the calls above (and so as ``ChannelMath``).
# Nothing is written to the running statistics before every check has passed:
# a return code other than 0 leaves them, and everything but scratch, as
# they were, and the caller takes the general path from there.

@njit(**_JIT)
def _pack(buf, tmpl, slots, count, call, a1, a2, shift, n, invstd):  # noqa: ANN001, ANN202
    # ``tmpl`` (protocol's header template) with this pass's count and call
    # (protocol.fill_header), then two C-sized vectors: the forward's
    # shifted sums of (mean, M2) = (a1, a2) around ``shift`` (shifted_sums),
    # or, ``shift`` empty, the backward's (sum_dy, sum_dxm * invstd) =
    # (a1, a2), a2 scaled in place (backward_reduce's product).
    h = tmpl.shape[0]
    nf = a1.shape[0]
    for i in range(h):
        buf[i] = tmpl[i]
    buf[slots[3]] = count
    buf[slots[4]] = call
    buf[slots[4] + 1] = float(call) * float(call)
    if shift.shape[0]:
        for c in range(nf):
            m2 = a2[c]
            m2 = m2 if (m2 >= 0.0 or m2 != m2) else 0.0  # moments' np.maximum(m2, 0.0)
            d = a1[c] - shift[c]
            buf[h + c] = d * n
            buf[h + nf + c] = m2 + (d * d) * n
    else:
        for c in range(nf):
            a2[c] = a2[c] * np.float64(invstd[c])
            buf[h + c] = a1[c]
            buf[h + nf + c] = a2[c]


@njit(**_JIT)
def _in_step(buf, slots, size):  # noqa: ANN001, ANN202
    # protocol._in_step on the reduced header in ``buf`` (slot layout:
    # protocol.steady_slots); the same verdict, no list made
    if buf[slots[1]] != size or buf[slots[2]] != size:
        return False
    ne = slots[5]
    for k in range(6, 6 + ne):
        if buf[slots[k]] != 0.0:
            return False
    npairs = slots[6 + ne]
    for k in range(npairs):
        i = slots[7 + ne + 2 * k]
        j = slots[8 + ne + 2 * k]
        s = buf[i]
        if buf[j] * size != s * s:
            return False
    return True


@njit(**_JIT)
def _fwd_steady(  # noqa: ANN001, ANN202
    buf, slots, params, mean_r, m2_r, shift, weight, rm, rv, nbt, kf, scratch, coef, shift_out,
):
    # The forward's per-channel steps after the moments, or after the
    # all-reduce of the shifted sums (``buf`` non-empty): header check, the
    # global (merge_sums) or local (local_stats) statistics, the rare-case
    # tests (stats_scale, shift_too_far, data_unit), then the coefficients
    # ``coef = (mean, invstd, scale)`` (forward_coefficients; affine's
    # ``scale = invstd * weight``), the running statistics ``rm``, ``rv``
    # updated in place (running_update then ``_store``; ``kf`` = keep, factor
    # in their dtype, then C slots for the store's rounding), the batch
    # counter ``nbt`` (0-d) counted (the layer's ``[...] += 1``) and the next shift.
    nf = scratch.shape[1]
    mean64 = scratch[0]
    var64 = scratch[1]
    expected = params[P_EXPECTED]
    if buf.shape[0]:
        if not _in_step(buf, slots, params[P_SIZE]):
            return STEADY_HEADER, 0.0
        total = buf[slots[3]]
        if total != expected:
            return STEADY_COUNT, total
        h = slots[0]
        for c in range(nf):
            s = buf[h + c]
            q = buf[h + nf + c]
            mean64[c] = shift[c] + s / total
            v = (q - s * s / total) / total
            var64[c] = v if (v >= 0.0 or v != v) else 0.0
    else:
        n = expected
        for c in range(nf):
            m2 = m2_r[c]
            m2 = m2 if (m2 >= 0.0 or m2 != m2) else 0.0
            v = m2 / n
            mean64[c] = mean_r[c]
            var64[c] = v if (v >= 0.0 or v != v) else 0.0
    if _needs_scale(mean64, var64, params[P_TINY_MEAN], params[P_TINY_VAR]):
        return STEADY_RARE, expected
    if buf.shape[0] and _far(mean64, var64, shift, SHIFT_REDO, SHIFT_REDO * _EPS64):
        return STEADY_RARE, expected
    eps = params[P_EPS]
    if _needs_unit(var64, eps, params[P_UNIT_LO], params[P_UNIT_HI]):
        return STEADY_RARE, expected
    update = params[P_UPDATE] != 0.0
    ratio = params[P_RATIO]
    if update and params[P_CUMULATIVE] != 0.0:  # momentum_weights(None, nbt)
        f = 1.0 / (nbt[()] + 1)
        kf[0] = 1.0 - f
        kf[1] = f
    keep = kf[0]
    factor = kf[1]
    mean_c = coef[0]
    invstd = coef[1]
    scale = coef[2]
    for c in range(nf):
        m = mean64[c]
        ve = var64[c] + eps
        mean_c[c] = m
        invstd[c] = 0.0 if ve == 0.0 else 1.0 / math.sqrt(ve)
        scale[c] = invstd[c] * weight[c]
        if update:
            # running_update's ``_running``: the batch value rounded to the
            # running statistics' dtype by a store, then old * keep + it * factor
            kf[2 + c] = m * 1.0
            rm[c] = rm[c] * keep + kf[2 + c] * factor
            kf[2 + c] = var64[c] * ratio
            rv[c] = rv[c] * keep + kf[2 + c] * factor
        if shift_out.shape[0]:
            shift_out[c] = m if math.isfinite(m) else 0.0
    if update:
        nbt[()] += 1
    return STEADY_OK, expected


@njit(**_JIT)
def _bwd_steady(  # noqa: ANN001, ANN202
    buf, slots, size, weight, invstd, sum_dy, sum_dxm, count, coef, dw, db,
):
    # The backward's per-channel steps after the local sums, or after their
    # all-reduce (``buf`` non-empty; ``sum_dxm`` then already scaled by
    # ``_pack``): header check, the coefficients (backward_coefficients) and
    # the local parameter gradients in ``dw``/``db`` (empty: not wanted).
    # ``coef`` = (a, mean_dy, b).
    nf = invstd.shape[0]
    a = coef[0]
    mean_dy = coef[1]
    b = coef[2]
    h = 0
    if buf.shape[0]:
        if not _in_step(buf, slots, size):
            return STEADY_HEADER
        h = slots[0]
    else:
        for c in range(nf):
            sum_dxm[c] = sum_dxm[c] * np.float64(invstd[c])
    for c in range(nf):
        if buf.shape[0]:
            g_dy = buf[h + c]
            g_dxh = buf[h + nf + c]
        else:
            g_dy = sum_dy[c]
            g_dxh = sum_dxm[c]
        a[c] = weight[c] * invstd[c]
        mean_dy[c] = g_dy / count
        b[c] = (a[c] * invstd[c]) * (g_dxh / count)
    if dw.shape[0]:
        for c in range(nf):
            dw[c] = sum_dxm[c]
            db[c] = sum_dy[c]
    return STEADY_OK


def _vectors(*arrays: Any) -> bool:
    """True if every array is a contiguous float32/float64 NumPy vector."""
    for a in arrays:
        if (type(a) is not np.ndarray or a.ndim != 1 or a.dtype not in _FLOATS
                or not a.flags.c_contiguous):
            return False
    return True


class NumbaChannelMath(ChannelMath):
    """:class:`ChannelMath` with each primitive one compiled call (see the module docstring)."""

    def shifted_sums(self, n: int, mean_r: Any, m2_r: Any, shift: Any) -> list:
        """What a rank sends: ``S = n (m - K)``, ``Q = M2 + n (m - K)^2`` (or zeros)."""
        if mean_r is None or not _vectors(mean_r, m2_r, shift) or mean_r.dtype != _F64:
            return super().shifted_sums(n, mean_r, m2_r, shift)
        s = np.empty(mean_r.shape[0], dtype=_F64)
        q = np.empty_like(s)
        _shifted(float(n), mean_r, m2_r, shift, s, q)
        return [s, q]

    def merge_sums(self, total: int, s: Any, q: Any, shift: Any, nf: int) -> tuple[Any, Any]:
        """Global ``(mean, biased var)`` from the all-reduced shifted sums (Chan)."""
        if total == 0 or not _vectors(s, q, shift) or s.dtype != _F64:
            return super().merge_sums(total, s, q, shift, nf)
        mean = np.empty(nf, dtype=_F64)
        var = np.empty(nf, dtype=_F64)
        _merge(float(total), s, q, shift, mean, var)
        return mean, var

    def shift_too_far(self, mean: Any, var: Any, shift: Any) -> bool:
        """:meth:`ChannelMath.shift_too_far` in one compiled call (the same decision)."""
        if not _vectors(mean, var, shift) or mean.dtype != _F64 or shift.dtype != _F64:
            return super().shift_too_far(mean, var, shift)
        return bool(_far(mean, var, shift, SHIFT_REDO, SHIFT_REDO * _EPS64))

    def stats_scale(self, mean: Any, var: Any, cdt: np.dtype) -> Any:
        """:meth:`ChannelMath.stats_scale`; the common answer (None) in one compiled call."""
        if _vectors(mean, var) and mean.dtype == _F64 and var.dtype == _F64:
            _, _, tiny_mean, tiny_var, _ = _RESCALE.get(np.dtype(cdt), _RESCALE[_F64])
            if not _needs_scale(mean, var, tiny_mean, tiny_var):
                return None
        return super().stats_scale(mean, var, cdt)

    def data_unit(
        self, mean_s: Any, var_s: Any, p: Any, count: int, epsilon: float, cdt: np.dtype,
    ) -> Any:
        """:meth:`ChannelMath.data_unit`; the common answer (None) in one compiled call."""
        if p is None and _vectors(var_s) and var_s.dtype == _F64:
            rng = _RESCALE.get(np.dtype(cdt), _RESCALE[_F64])[4]
            hi = rng - 0.5 * float(np.log2(max(count, 1)))
            # a margin of a factor 4 on each side: near the edges the exact
            # test decides (the same as the NumPy backend's)
            if not _needs_unit(var_s, float(epsilon), 4.0 ** (1 - rng), 4.0 ** (hi - 1)):
                return None
        return super().data_unit(mean_s, var_s, p, count, epsilon, cdt)

    def next_shift(self, mean: Any) -> Any:
        """The next pass's shift: the mean, 0 where it is not finite."""
        if not _vectors(mean) or mean.dtype != _F64:
            return super().next_shift(mean)
        out = np.empty_like(mean)
        _next_shift(mean, out)
        return out

    def forward_coefficients(
        self, mean: Any, var: Any, count: int, epsilon: float, cdt: np.dtype
    ) -> tuple[Any, Any]:
        """``(mean, invstd)`` in the compute dtype; zeros for an empty batch."""
        cdt = np.dtype(cdt)
        if cdt not in _FLOATS or not _vectors(mean, var) or mean.dtype != _F64:
            return super().forward_coefficients(mean, var, count, epsilon, cdt)
        mean_c = np.empty(mean.shape[0], dtype=cdt)
        invstd = np.empty_like(mean_c)
        _fwd_coef(mean, var, float(epsilon), count == 0, mean_c, invstd)
        return mean_c, invstd

    def running_update(
        self, running_mean: Any, running_var: Any, batch_mean: Any, batch_var: Any,
        count: int, momentum: float | None, unbiased: bool, num_batches_tracked: int,
    ) -> tuple[Any, Any]:
        """:meth:`ChannelMath.running_update` (``ValueError`` for ``unbiased`` and a count of 1)."""
        if not _vectors(running_mean, running_var, batch_mean, batch_var):
            return super().running_update(
                running_mean, running_var, batch_mean, batch_var, count, momentum,
                unbiased, num_batches_tracked,
            )
        ratio = unbiased_ratio(count) if unbiased else 1.0
        keep, factor = momentum_weights(momentum, num_batches_tracked)
        out = []
        for old, batch, r in ((running_mean, batch_mean, 1.0), (running_var, batch_var, ratio)):
            new = np.empty_like(old)
            t = old.dtype.type
            _running(old, batch, r, t(keep), t(factor), new)
            out.append(new)
        return out[0], out[1]

    def backward_coefficients(
        self, weight: Any, invstd: Any, g_dy: Any, g_dy_xhat: Any, count: int,
        batch_stats: bool, cdt: np.dtype,
    ) -> tuple[Any, Any, Any]:
        """``(a, mean_dy, b)`` of ``dx = a (dy - mean_dy) - b (x - mean)``."""
        cdt = np.dtype(cdt)
        live = bool(batch_stats and count > 0)
        w = _NO_WEIGHT[cdt] if weight is None else weight
        g = (g_dy, g_dy_xhat) if live else (_NO_SUMS, _NO_SUMS)
        if (cdt not in _FLOATS or not _vectors(w, invstd, *g) or w.dtype != cdt
                or invstd.dtype != cdt or g[0].dtype != _F64 or g[1].dtype != _F64):
            return super().backward_coefficients(
                weight, invstd, g_dy, g_dy_xhat, count, batch_stats, cdt
            )
        nf = invstd.shape[0]
        a = np.empty(nf, dtype=cdt)
        mean_dy = np.empty_like(a)
        b = np.empty_like(a)
        _bwd_coef(w, invstd, g[0], g[1], float(count), live, a, mean_dy, b)
        return a, mean_dy, b


# "no weight" (1) and "no sums" (eval or empty batch) as empty vectors: one
# kernel signature per dtype instead of one per combination of Nones.
_NO_WEIGHT = {dt: np.empty(0, dtype=dt) for dt in _FLOATS}
_NO_SUMS = np.empty(0, dtype=_F64)

#: The compiled per-channel kernels (``backend.warm_up`` counts them).
CHANNEL_KERNELS = (_shifted, _merge, _next_shift, _fwd_coef, _running, _bwd_coef, _far,
                   _needs_scale, _needs_unit, _pack, _fwd_steady, _bwd_steady)
