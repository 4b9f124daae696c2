"""The per-channel steps of a pass (C-sized vectors), shared by every backend.

These are the primitives between the data-sized ones (``moments``,
``normalize``, ``backward_reduce``, ``backward_elemt``): what a rank sends,
how the all-reduced sums become the global statistics, the running-statistics
update, and the affine and backward coefficients. The NumPy and numba
backends (and CuPy's unfused fallback) inherit them from :class:`ChannelMath`
and run them with ``self.xp``; the fused CUDA path does the same float64 math
inside its kernels (``kernels/fused.cu``: ``bn_fwd_pack``, ``bn_fwd_norm_*``,
``bn_bwd_pack``, ``bn_bwd_elemt_*``), with the same casts.
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = [
    "ChannelMath", "UNBIASED_COUNT_1", "COUNT_1", "SHIFT_REDO", "count_one_message",
    "momentum_weights", "unbiased_ratio", "STEADY_OK", "STEADY_HEADER", "STEADY_COUNT",
    "STEADY_RARE", "RESCALE", "STEADY_PARAMS", "P_SIZE", "P_EXPECTED", "P_TINY_MEAN",
    "P_TINY_VAR", "P_UNIT_LO", "P_UNIT_HI", "P_EPS", "P_RATIO", "P_UPDATE",
    "P_CUMULATIVE",
]

#: Return codes of a steady-state pass's per-channel kernel (the numba
#: backend's ``channel._fwd_steady``/``_bwd_steady``): done; the reduced
#: header shows ranks out of step or an error; the global count is not the
#: one the call was prepared for; a rare case (rescaled statistics, a shift
#: too far, data outside the safe range) that the general path handles.
#: Every code but ``STEADY_OK`` leaves the running statistics untouched.
STEADY_OK, STEADY_HEADER, STEADY_COUNT, STEADY_RARE = 0, 1, 2, 3

#: Slots of a steady forward's ``params`` (float64): the all-reduce's group
#: size, the count the count-dependent ones hold for, stats_scale's tiny
#: mean and variance, data_unit's bounds on ``var + eps``, ``eps``, the
#: unbiased ratio, whether the running statistics are updated (1 or 0), and
#: whether ``momentum`` is None (1: the cumulative average, from the count).
(P_SIZE, P_EXPECTED, P_TINY_MEAN, P_TINY_VAR, P_UNIT_LO, P_UNIT_HI, P_EPS, P_RATIO, P_UPDATE,
 P_CUMULATIVE) = range(10)
STEADY_PARAMS = 10

_F64 = np.dtype(np.float64)
_EPS64 = float(np.finfo(np.float64).eps)

#: A merge is redone around its own mean when the shift was farther than
#: ``sqrt(SHIFT_REDO)`` standard deviations from it: the merge's relative
#: error in the variance is about ``2 eps64 (mean - K)^2 / var``, so beyond
#: that it could be less accurate than one process's two-pass statistics.
#: Batch means move by ``std/sqrt(n)`` between steps, so steady training
#: almost never pays the extra all-reduce.
SHIFT_REDO = 16.0

#: Per compute dtype: ``(down, up, tiny_mean, tiny_var, range)``. A channel
#: whose merged statistics are not finite (the shifted sums of huge values
#: overflowed) has its statistics recomputed on ``x * down``; one whose mean
#: and variance are both tiny (squares of its deviations underflow in the
#: compute dtype; an all-zero channel excluded) on ``x * up``. Powers of two:
#: the scaled data are exact. ``range``: the data passes run on ``x * u``
#: (``u`` a power of two near ``1/std``) when ``std`` is outside
#: ``[2^-range, 2^range / sqrt(count)]``, so ``x - mean``, ``invstd`` and the
#: backward coefficients stay finite and normal in the compute dtype.
_RESCALE = {
    np.dtype(np.float32): (2.0**-80, 2.0**100, 2.0**-50, 2.0**-100, 60.0),
    np.dtype(np.float64): (2.0**-560, 2.0**600, 2.0**-450, 2.0**-900, 500.0),
}
RESCALE = _RESCALE

UNBIASED_COUNT_1 = (
    "unbiased_running_var=True needs more than 1 value per channel in the"
    " global batch (got 1): the unbiased variance m/(m-1) is undefined"
)

COUNT_1 = (
    "Expected more than 1 value per channel when training, got a global count"
    " of 1 per channel: the batch variance of one value is 0, so y would be the"
    " bias and dx 0"
)


def count_one_message(shape: tuple | None, unbiased: bool) -> str:
    """The error for a global count of 1 in training (``shape``: this rank's input)."""
    msg = COUNT_1 if shape is None else f"{COUNT_1} (input shape {shape} on this rank)"
    return f"{msg}; {UNBIASED_COUNT_1}" if unbiased else msg


def momentum_weights(momentum: float | None, num_batches_tracked: int) -> tuple[float, float]:
    """``(keep, factor)`` of ``new = old * keep + batch * factor`` (Paddle convention).

    ``momentum=None`` is the cumulative average over ``num_batches_tracked + 1``
    batches (PyTorch's ``momentum=None``).
    """
    if momentum is None:
        factor = 1.0 / (num_batches_tracked + 1)
        return 1.0 - factor, factor
    keep = float(momentum)
    return keep, 1.0 - keep


def unbiased_ratio(count: int) -> float:
    """``m / (m - 1)``, the unbiased variance over the biased one, for ``m = count``.

    Raises
    ------
    ValueError
        For a count of 1.
    """
    if count == 1:
        raise ValueError(UNBIASED_COUNT_1)
    return count / (count - 1)


class ChannelMath:
    """Per-channel primitives on ``self.xp`` arrays (see the module docstring)."""

    xp: Any

    def local_stats(self, n: int, mean_r: Any, m2_r: Any, nf: int) -> tuple[Any, Any]:
        """Unsynchronized ``(mean, biased var)`` of ``n`` local elements per channel."""
        if n == 0:
            z = self.xp.zeros(nf, dtype=_F64)
            return z, z.copy()
        return mean_r, self.xp.maximum(m2_r / n, 0.0)

    def shifted_sums(self, n: int, mean_r: Any, m2_r: Any, shift: Any) -> list:
        """What a rank sends: ``S = n (m - K)``, ``Q = M2 + n (m - K)^2`` (or zeros)."""
        if mean_r is None:
            return [None, None]
        d = mean_r - shift
        return [d * n, m2_r + (d * d) * n]

    def merge_sums(self, total: int, s: Any, q: Any, shift: Any, nf: int) -> tuple[Any, Any]:
        """Global ``(mean, biased var)`` from the all-reduced shifted sums (Chan)."""
        if total == 0:
            z = self.xp.zeros(nf, dtype=_F64)
            return z, z.copy()
        mean = shift + s / total
        return mean, self.xp.maximum((q - s * s / total) / total, 0.0)

    def shift_too_far(self, mean: Any, var: Any, shift: Any) -> bool:
        """Whether a merge around ``shift`` may be less accurate than one process.

        True when some channel's mean is more than ``sqrt(SHIFT_REDO)``
        standard deviations from the shift (beyond the rounding of the mean
        itself, ``eps64 |mean|``, which one process cannot avoid either), or
        when the shifted sums overflowed (finite mean, variance not finite).
        A function of all-reduced values only: every rank decides the same.
        """
        xp = self.xp
        with np.errstate(all="ignore"):  # huge or non-finite channels: decided below
            d = mean - shift
            far = d * d > SHIFT_REDO * var + (SHIFT_REDO * _EPS64) * (mean * mean)
            return bool(xp.any(far & xp.isfinite(mean)))

    def stats_scale(self, mean: Any, var: Any, cdt: np.dtype) -> Any:
        """Per-channel powers of two to recompute the statistics on, or None.

        See :data:`_RESCALE`. A function of the merged (all-reduced) values
        only, so every rank decides the same.
        """
        xp = self.xp
        down, up, tiny_mean, tiny_var, _ = _RESCALE.get(np.dtype(cdt), _RESCALE[_F64])
        with np.errstate(all="ignore"):
            # the common answer from three reductions (max propagates NaN)
            if (bool(xp.isfinite(var.max() + xp.abs(mean).max()))
                    and float(var.min()) >= tiny_var):
                return None
            bad = ~(xp.isfinite(mean) & xp.isfinite(var))
            small = (xp.abs(mean) < tiny_mean) & (var < tiny_var) & ~((mean == 0) & (var == 0))
        if not bool(xp.any(bad | small)):
            return None
        return xp.where(bad, down, xp.where(small, up, 1.0))

    def data_unit(
        self, mean_s: Any, var_s: Any, p: Any, count: int, epsilon: float, cdt: np.dtype,
    ) -> Any:
        """Per-channel powers of two ``u`` the data passes run on ``x * u``, or None.

        ``mean_s``, ``var_s``: the statistics of ``x * p`` (``p`` None: of
        ``x``). ``u`` is near ``1/sqrt(var + epsilon)`` for the channels
        outside the compute dtype's safe range (:data:`_RESCALE`), 1 elsewhere.
        """
        xp = self.xp
        rng = _RESCALE.get(np.dtype(cdt), _RESCALE[_F64])[4]
        with np.errstate(all="ignore"):  # over/underflow is expected and handled here
            return self._data_unit(xp, var_s, p, count, float(epsilon), rng)

    @staticmethod
    def _data_unit(xp: Any, var_s: Any, p: Any, count: int, eps: float, rng: float) -> Any:
        hi = rng - 0.5 * float(np.log2(max(count, 1)))
        if p is None:
            # the common answer: every var + eps well inside the range
            s2 = var_s + eps
            lo_s2, hi_s2 = float(s2.min()), float(s2.max())
            if lo_s2 >= 4.0 ** (1 - rng) and hi_s2 <= 4.0 ** (hi - 1):
                return None
        pp = xp.ones_like(var_s) if p is None else p
        # log2(std) without forming var + eps in unscaled units (it may
        # overflow or underflow float64); eps * p^2 overflows only for
        # scaled-up channels with eps > 0, where eps dominates the variance.
        epp = eps * (pp * pp) if eps else xp.zeros_like(var_s)  # never 0 * inf
        fin = xp.isfinite(epp)
        s2 = xp.where(fin, var_s + epp, var_s / pp / pp + eps)
        l2 = 0.5 * xp.log2(s2) - xp.where(fin, xp.log2(pp), 0.0)
        out = ((l2 < -rng) | (l2 > hi)) & (s2 > 0) & xp.isfinite(l2)
        if not bool(xp.any(out)):
            return None
        # 1/std itself may be beyond float64 (a subnormal spread with
        # epsilon=0): the unit stops at 2^1000, still far from both ends.
        e = xp.clip(-xp.rint(xp.where(out, l2, 0.0)), -1000.0, 1000.0)
        return xp.where(out, xp.exp2(e), 1.0)

    def next_shift(self, mean: Any) -> Any:
        """The next pass's shift: the mean, 0 where it is not finite."""
        return self.xp.where(self.xp.isfinite(mean), mean, 0.0)

    def forward_coefficients(
        self, mean: Any, var: Any, count: int, epsilon: float, cdt: np.dtype
    ) -> tuple[Any, Any]:
        """``(mean, invstd)`` in the compute dtype; zeros for an empty batch."""
        mean_c = mean.astype(cdt)
        invstd = self._invstd(var + float(epsilon)).astype(cdt)
        if count == 0:
            invstd = self.xp.zeros(mean.shape[0], dtype=cdt)  # nothing to normalize; no inf
        return mean_c, invstd

    def running_invstd(self, running_var: Any, epsilon: float, cdt: np.dtype) -> Any:
        """``1 / sqrt(running_var + epsilon)`` in the compute dtype (eval mode)."""
        return self._invstd(running_var.astype(cdt, copy=False) + cdt.type(epsilon))

    def _invstd(self, var_eps: Any) -> Any:
        """``1/sqrt(var + eps)``, and 0 where ``var + eps`` is exactly 0.

        Finite in, finite out: with ``epsilon=0`` a constant channel has
        variance 0, and ``(x - mean) * inf`` would be ``0 * inf = NaN``. Its
        normalized value is taken as 0 instead, so ``y = bias`` and ``dx = 0``
        there. NaN/Inf variances propagate.
        """
        xp = self.xp
        return xp.where(var_eps == 0, 0.0, 1.0 / xp.sqrt(var_eps)).astype(
            var_eps.dtype, copy=False
        )

    def affine(self, invstd: Any, weight: Any, bias: Any, cdt: np.dtype) -> tuple[Any, Any]:
        """``(scale, bias)`` of ``y = (x - mean) * scale + bias``."""
        scale = invstd if weight is None else invstd * weight.astype(cdt, copy=False)
        b = self.xp.zeros_like(invstd) if bias is None else bias.astype(cdt, copy=False)
        return scale, b

    def running_update(
        self, running_mean: Any, running_var: Any, batch_mean: Any, batch_var: Any,
        count: int, momentum: float | None, unbiased: bool, num_batches_tracked: int,
    ) -> tuple[Any, Any]:
        """New running statistics (Paddle convention), as new arrays.

        Raises
        ------
        ValueError
            ``unbiased`` with a global ``count`` of 1.
        """
        if unbiased:
            batch_var = batch_var * unbiased_ratio(count)
        keep, factor = momentum_weights(momentum, num_batches_tracked)
        new_mean = running_mean * keep + batch_mean.astype(running_mean.dtype) * factor
        new_var = running_var * keep + batch_var.astype(running_var.dtype) * factor
        return new_mean.astype(running_mean.dtype, copy=False), new_var.astype(
            running_var.dtype, copy=False
        )

    def backward_coefficients(
        self, weight: Any, invstd: Any, g_dy: Any, g_dy_xhat: Any, count: int,
        batch_stats: bool, cdt: np.dtype,
    ) -> tuple[Any, Any, Any]:
        """``(a, mean_dy, b)`` of ``dx = a (dy - mean_dy) - b (x - mean)``.

        ``weight`` is in the compute dtype or None (1); ``g_*`` are the global
        sums (float64).
        """
        nf = invstd.shape[0]
        w = weight if weight is not None else self.xp.ones(nf, dtype=cdt)
        a = (w * invstd).astype(cdt)
        if batch_stats and count > 0:
            mean_dy = (g_dy / count).astype(cdt)
            b = (a * invstd * (g_dy_xhat / count)).astype(cdt)
        else:
            mean_dy = self.xp.zeros(nf, dtype=cdt)
            b = self.xp.zeros(nf, dtype=cdt)
        return a, mean_dy, b
