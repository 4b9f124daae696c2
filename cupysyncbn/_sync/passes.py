"""The synchronized passes on the backends' four primitives (NumPy, numba).

A training forward::

    backend.moments (local mean, M2) -> pack shifted sums
        -> ONE allreduce -> merge (float64) -> backend.normalize

and a training backward::

    backend.backward_reduce (local sums) -> ONE allreduce -> backend.backward_elemt

The merge (why it is exact and stable)
--------------------------------------
Rank ``r`` holds ``n_r`` elements per channel with mean ``m_r`` and centered
sum of squares ``M2_r`` (two-pass, stable). Against a shift ``K`` that every
rank knows bitwise-identically, it sends ``S_r = n_r (m_r - K)`` and
``Q_r = M2_r + n_r (m_r - K)^2``. After the sum all-reduce::

    mean = K + S / N,    M2 = Q - S^2 / N,    var = M2 / N

which is exact in exact arithmetic for any ``K``; rounding error is
``eps64 * (mean - K)^2 / var`` relative, negligible when ``K`` is near the
mean. With a :class:`~.state.SyncState` (the layers keep one) ``K`` is the
previous step's global mean, and the first step runs one extra all-reduce
that computes the global mean first. Without a state every call runs the
handshake, the mean pass and the statistics pass (three all-reduces), so the
functional API is exact by default.
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np

from ..arrays.formats import DataFormat
from ..backends import Backend
from ..backends.channel_math import count_one_message
from ..comm.base import Communicator
from . import collective, protocol
from .checks import Verdict
from .state import ForwardContext, ForwardResult, SyncState

__all__ = ["quiet_fp", "forward", "backward"]

#: Most redone merges per forward (see ``_global_stats``): the first lands
#: within rounding of the mean; the second covers a jump so large that the
#: first redo's shift is still off.
_MAX_REDO = 2


def quiet_fp(fn: Any) -> Any:
    """Run ``fn`` with NumPy's floating-point warnings off.

    NaN/Inf in the input propagate to the outputs of their own channels only;
    NumPy's ``invalid value`` warnings about them (errors under
    ``np.seterr(all='raise')`` or ``-W error``) would turn that into a crash.
    """

    @functools.wraps(fn)
    def inner(*args: Any, **kwargs: Any) -> Any:
        with np.errstate(all="ignore"):
            return fn(*args, **kwargs)

    return inner


def _vec(v: Any, cdt: np.dtype) -> Any:
    return None if v is None else v.astype(cdt, copy=False)


def _affine_normalize(
    backend: Backend, v: Any, fmt: DataFormat, mean: Any, invstd: Any,
    weight: Any, bias: Any, cdt: np.dtype, x: Any,
) -> Any:
    scale, b = backend.affine(invstd, weight, bias, cdt)
    if v.size == 0:
        return backend.xp.empty(v.shape, dtype=x.dtype)
    return backend.normalize(v, fmt.channel_last, mean, scale, b, np.dtype(x.dtype))


def forward(
    comm: Communicator, state: SyncState | None, x: Any, v: Any, vd: Verdict,
    vectors: tuple, training: bool, batch_stats: bool, momentum: float | None,
    epsilon: float, unbiased: bool, num_batches_tracked: int, sync: bool,
) -> ForwardResult:
    """A forward on the four primitives; ``v`` is ``x``'s canonical view."""
    backend, fmt, nf, cdt, pdt = vd.backend, vd.fmt, vd.nf, vd.cdt, vd.param_dtype
    weight, bias, running_mean, running_var = vectors
    n_local = v.size // nf if nf else 0
    if not batch_stats:
        mean = _vec(running_mean, cdt)
        invstd = backend.running_invstd(running_var, epsilon, cdt)
        y = _affine_normalize(backend, v, fmt, mean, invstd, weight, bias, cdt, x)
        ctx = ForwardContext(
            v, tuple(x.shape), np.dtype(x.dtype), fmt, backend, comm, mean, invstd,
            _vec(weight, cdt), 0, False, pdt, state,
        )
        return ForwardResult(y.reshape(x.shape), ctx, running_mean, running_var)

    if sync:
        collective.handshake(comm, backend, state, nf, pdt)
    if n_local:
        mean_r, m2_r = backend.moments(v, fmt.channel_last, cdt)
    else:
        mean_r = m2_r = None
    count, mean, var = _global_stats(comm, backend, state, nf, n_local, mean_r, m2_r)
    if count == 1:
        # The count is all-reduced, so every rank raises here, before any
        # running statistic changes (PyTorch raises the same in training).
        raise ValueError(count_one_message(tuple(x.shape), unbiased))

    new_rm, new_rv, updated = running_mean, running_var, False
    if running_mean is not None and training and count > 0:
        new_rm, new_rv = backend.running_update(
            running_mean, running_var, mean, var, count, momentum, unbiased,
            num_batches_tracked,
        )
        updated = True
    mean_c, invstd = backend.forward_coefficients(mean, var, count, epsilon, cdt)
    y = _affine_normalize(backend, v, fmt, mean_c, invstd, weight, bias, cdt, x)
    ctx = ForwardContext(
        v, tuple(x.shape), np.dtype(x.dtype), fmt, backend, comm, mean_c, invstd,
        _vec(weight, cdt), count, True, pdt, state,
    )
    return ForwardResult(y.reshape(x.shape), ctx, new_rm, new_rv, mean, var, count, updated)


def _global_stats(
    comm: Communicator, backend: Backend, state: SyncState | None, nf: int,
    n_local: int, mean_r: Any, m2_r: Any,
) -> tuple[int, Any, Any]:
    """Merge per-rank (n, mean, M2) into global float64 mean and biased var."""
    if not comm.synchronizes:
        return (n_local, *backend.local_stats(n_local, mean_r, m2_r, nf))
    shift = state.shift if state is not None else None
    if shift is None or shift.shape[0] != nf:
        # Two C-sized vectors like every other pass of the layer: equal
        # buffer sizes let the header detect ranks running different passes.
        total, (s, _) = collective.allreduce(
            comm, backend, state, [None if mean_r is None else mean_r * n_local, None],
            n_local, protocol.PHASE_MEAN, None, nf,
        )
        shift = s / max(total, 1)
    for redo in range(_MAX_REDO + 1):
        payload = backend.shifted_sums(n_local, mean_r, m2_r, shift)
        total, (s, q) = collective.allreduce(
            comm, backend, state, payload, n_local, protocol.PHASE_STATS, None, nf
        )
        mean, var = backend.merge_sums(total, s, q, shift, nf)
        # The shift was far from this batch's mean (a new domain, a layer
        # shared by inputs of different means): the merge's cancellation
        # could cost more than one process loses, so the reduction is redone
        # around the mean just found. Decided from all-reduced values, so
        # every rank redoes it; one redo brings the shift within rounding.
        if total == 0 or redo == _MAX_REDO or not backend.shift_too_far(mean, var, shift):
            break
        shift = backend.next_shift(mean)
    if total == 0:
        return 0, mean, var
    if state is not None:
        # A NaN/Inf mean (non-finite input) must not become the next steps'
        # shift, or one bad batch would poison the channel forever. The merge
        # is exact for any shift, so such channels shift by 0 instead; done on
        # the device, without a host read. ``mean`` is identical on every rank.
        state.shift = backend.next_shift(mean)
    return total, mean, var


def backward(
    dyv: Any, ctx: ForwardContext, nf: int, sync: bool, need_param_grads: bool,
) -> tuple[Any, Any, Any]:
    """A backward on the four primitives; ``dyv`` is ``dy``'s canonical view."""
    backend = ctx.backend
    cl = ctx.fmt.channel_last
    n_local = ctx.x.size // nf if nf else 0
    xp = backend.xp
    if n_local:
        sum_dy, sum_dy_xhat = backend.backward_reduce(dyv, ctx.x, cl, ctx.mean, ctx.invstd)
    else:
        sum_dy = sum_dy_xhat = None
    g_dy, g_dy_xhat = sum_dy, sum_dy_xhat
    if sync:
        _, (g_dy, g_dy_xhat) = collective.allreduce(
            ctx.comm, backend, ctx.sync_state, [sum_dy, sum_dy_xhat], n_local,
            protocol.PHASE_BACKWARD, None, nf,
        )
    a, mean_dy, b = backend.backward_coefficients(
        ctx.weight, ctx.invstd, g_dy, g_dy_xhat, ctx.count, ctx.batch_stats, ctx.mean.dtype
    )
    if n_local:
        dx = backend.backward_elemt(dyv, ctx.x, cl, ctx.mean, a, mean_dy, b, ctx.dtype)
        dx = dx.reshape(ctx.shape)
    else:
        dx = xp.empty(ctx.shape, dtype=ctx.dtype)
    if not need_param_grads:
        return dx, None, None
    pdt = ctx.param_dtype
    if sum_dy is None:
        dweight = xp.zeros(nf, dtype=pdt)
        dbias = xp.zeros(nf, dtype=pdt)
    else:
        dweight = sum_dy_xhat.astype(pdt)
        dbias = sum_dy.astype(pdt)
    return dx, dweight, dbias
