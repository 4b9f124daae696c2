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

from ..arrays.formats import DataFormat, canonical_view
from ..backends import Backend
from ..backends.channel_math import (
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
    RESCALE,
    STEADY_COUNT,
    STEADY_OK,
    STEADY_PARAMS,
    STEADY_RARE,
    count_one_message,
    momentum_weights,
    unbiased_ratio,
)
from ..comm.base import Communicator
from . import collective, exact, protocol
from .checks import Verdict
from .state import ForwardContext, ForwardResult, SyncState

__all__ = [
    "quiet_fp", "forward", "backward", "SteadyPlan", "steady_plan", "steady_forward",
    "steady_backward",
]

#: Most redone merges per forward (see ``_global_stats``): one on rescaled
#: data (overflow/underflow), then around the mean: the first lands within
#: rounding of it; the second covers a jump so large that the first redo's
#: shift is still off.
_MAX_REDO = 3

_F64 = np.dtype(np.float64)
_F64_MAX = float(np.finfo(np.float64).max)


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
    weight: Any, bias: Any, cdt: np.dtype, x: Any, relu: bool = False, repro: bool = False,
) -> tuple[Any, Any]:
    """``y`` and what the backward's ReLU mask needs (``(scale, bias)``, or None).

    ``repro``: the reproducible mode's canonical formula (``exact.normalize``).
    """
    scale, b = backend.affine(invstd, weight, bias, cdt)
    act = (scale, b) if relu else None
    if v.size == 0:
        return backend.xp.empty(v.shape, dtype=x.dtype), act
    if repro:
        return exact.ops_of(backend).normalize(
            v, fmt.channel_last, mean, scale, b, np.dtype(x.dtype)), act
    return backend.normalize(v, fmt.channel_last, mean, scale, b, np.dtype(x.dtype), relu), act


def forward(
    comm: Communicator, state: SyncState | None, x: Any, v: Any, vd: Verdict,
    vectors: tuple, training: bool, batch_stats: bool, momentum: float | None,
    epsilon: float, unbiased: bool, num_batches_tracked: int, sync: bool,
    relu: bool = False, reproducible: bool = False, first: tuple | None = None,
) -> ForwardResult:
    """A forward on the four primitives; ``v`` is ``x``'s canonical view.

    ``relu``: ``act="relu"``, applied by ``backend.normalize`` in its pass.
    ``reproducible``: the statistics by :mod:`.exact` and the canonical
    elementwise formula (identical bits for every split; not with ``relu``).
    ``first``: ``(total, s, q)`` of a statistics all-reduce this pass already
    ran (a steady-state pass that met a rare case goes on from there).
    """
    repro = reproducible
    backend, fmt, nf, cdt, pdt = vd.backend, vd.fmt, vd.nf, vd.cdt, vd.param_dtype
    weight, bias, running_mean, running_var = vectors
    n_local = v.size // nf if nf else 0
    if not batch_stats:
        mean = _vec(running_mean, cdt)
        invstd = backend.running_invstd(running_var, epsilon, cdt)
        y, act = _affine_normalize(backend, v, fmt, mean, invstd, weight, bias, cdt, x, relu,
                                   repro)
        ctx = ForwardContext(
            v, tuple(x.shape), np.dtype(x.dtype), fmt, backend, comm, mean, invstd,
            _vec(weight, cdt), 0, False, pdt, state, act=act, reproducible=repro,
        )
        return ForwardResult(y.reshape(x.shape), ctx, running_mean, running_var)

    if sync:
        collective.handshake(comm, backend, state, nf, pdt)
    cl = fmt.channel_last
    if repro:
        count, mean_s, var_s, p = exact.forward_stats(
            comm, backend, state, v, cl, nf, n_local, cdt, sync, tuple(x.shape)
        )
    else:
        count, mean_s, var_s, p = _default_stats(comm, backend, state, v, cl, nf, n_local, cdt,
                                                 first)
    if count == 1:
        # The count is all-reduced, so every rank raises here, before any
        # running statistic changes (PyTorch raises the same in training).
        raise ValueError(count_one_message(tuple(x.shape), unbiased))
    mean, var, unit = mean_s, var_s, None
    if count > 0:
        if p is not None:  # statistics of x * p (powers of two: exact)
            mean = mean_s / p
            # a variance beyond float64 (spreads over ~1e154) is clamped;
            # non-finite inputs (a non-finite mean) still show as such
            var = var_s / p / p
            var = backend.xp.where(backend.xp.isfinite(mean), _clamp(backend, var), var)
        # the safe range of the narrower of the compute and output dtypes
        # (float32 data in a float64 layer: dx is cast to float32)
        rdt = np.dtype(x.dtype) if np.dtype(x.dtype) == np.float32 else cdt
        unit = backend.data_unit(mean_s, var_s, p, count, epsilon, rdt)
    rare = p is not None or unit is not None

    new_rm, new_rv, updated = running_mean, running_var, False
    if running_mean is not None and training and count > 0:
        new_rm, new_rv = backend.running_update(
            running_mean, running_var, mean, var, count, momentum, unbiased,
            num_batches_tracked,
        )
        if rare:  # finite in, finite out: clamp to the running stats' dtype
            fin = backend.xp.isfinite(mean)
            new_rm = backend.xp.where(fin, _clamp(backend, new_rm), new_rm)
            new_rv = backend.xp.where(fin, _clamp(backend, new_rv), new_rv)
        updated = True
    if unit is not None:
        y, ctx = _forward_scaled(
            backend, x, v, fmt, comm, state, mean_s, var_s, p, unit, count, epsilon,
            weight, bias, pdt, relu, repro,
        )
        return ForwardResult(y.reshape(x.shape), ctx, new_rm, new_rv, mean, var, count, updated)
    mean_c, invstd = backend.forward_coefficients(mean, var, count, epsilon, cdt)
    y, act = _affine_normalize(backend, v, fmt, mean_c, invstd, weight, bias, cdt, x, relu,
                               repro)
    ctx = ForwardContext(
        v, tuple(x.shape), np.dtype(x.dtype), fmt, backend, comm, mean_c, invstd,
        _vec(weight, cdt), count, True, pdt, state, act=act, reproducible=repro,
    )
    return ForwardResult(y.reshape(x.shape), ctx, new_rm, new_rv, mean, var, count, updated)


def _default_stats(
    comm: Communicator, backend: Backend, state: SyncState | None, v: Any, cl: bool, nf: int,
    n_local: int, cdt: np.dtype, first: tuple | None = None,
) -> tuple[int, Any, Any, Any]:
    """The default mode's statistics: local moments, then :func:`_global_stats`."""
    if n_local:
        mean_r, m2_r = backend.moments(v, cl, cdt)
    else:
        mean_r = m2_r = None

    def rescaled(p: Any) -> tuple[Any, Any]:
        if not n_local:
            return None, None
        return backend.moments(_scaled(v, p, cl, cdt), cl, cdt)

    return _global_stats(comm, backend, state, nf, n_local, mean_r, m2_r, cdt, rescaled, first)


def _scaled(v: Any, p: Any, channel_last: bool, dt: np.dtype) -> Any:
    """``v * p`` per channel (canonical layout), in ``dt``: a new array."""
    shape = (1, -1) if channel_last else (1, -1, 1)
    return v.astype(dt) * p.astype(dt).reshape(shape)


def _clamp(backend: Backend, a: Any) -> Any:
    """``a`` with +-inf clamped to its dtype's largest finite value (NaN kept)."""
    big = float(np.finfo(a.dtype).max)
    return backend.xp.clip(a, -big, big).astype(a.dtype, copy=False)


def _forward_scaled(
    backend: Backend, x: Any, v: Any, fmt: DataFormat, comm: Communicator,
    state: SyncState | None, mean_s: Any, var_s: Any, p: Any, unit: Any, count: int,
    epsilon: float, weight: Any, bias: Any, pdt: np.dtype, relu: bool = False,
    repro: bool = False,
) -> tuple[Any, ForwardContext]:
    """Normalize ``x * unit`` in float64 (a channel whose std is outside the safe range).

    ``unit`` (powers of two, about ``1/std``) brings every such channel to
    unit scale, so ``x - mean`` cannot overflow and ``invstd`` is a normal
    float64; batch norm is scale-invariant, so ``y`` is that of ``x``. The
    backward uses the scaled copy too, with the weight times ``unit`` (the
    true ``invstd`` is ``invstd_u * unit``) and saturates ``dx`` to the
    output dtype (``saturate``): a rare, slower path.
    """
    r = unit if p is None else unit / p
    eps = float(epsilon)
    var_eff = var_s * r * r + (eps * unit * unit if eps else 0.0)
    mean_u, invstd = backend.forward_coefficients(mean_s * r, var_eff, count, 0.0, _F64)
    vu = _scaled(v, unit, fmt.channel_last, _F64)
    y, act = _affine_normalize(backend, vu, fmt, mean_u, invstd, weight, bias, _F64, x, relu,
                               repro)
    ctx = ForwardContext(
        vu, tuple(x.shape), np.dtype(x.dtype), fmt, backend, comm, mean_u, invstd,
        _vec(weight, _F64), count, True, pdt, state, act=act, reproducible=repro,
    )
    ctx.unit = unit  # read by backward()
    return y, ctx


def _global_stats(
    comm: Communicator, backend: Backend, state: SyncState | None, nf: int,
    n_local: int, mean_r: Any, m2_r: Any, cdt: np.dtype, rescaled: Any,
    first: tuple | None = None,
) -> tuple[int, Any, Any, Any]:
    """Merge per-rank (n, mean, M2) into global float64 mean and biased var.

    Returns ``(count, mean, var, p)``: the statistics of ``x * p`` per
    channel, ``p`` None (1) unless some channel's statistics had to be
    recomputed on scaled data (``backend.stats_scale``; ``rescaled(p)`` gives
    this rank's moments of ``x * p``).
    """
    if not comm.synchronizes:
        mean, var = backend.local_stats(n_local, mean_r, m2_r, nf)
        p = backend.stats_scale(mean, var, cdt) if n_local else None
        if p is not None:
            mean_p, m2_p = rescaled(p)
            mean, var = backend.local_stats(n_local, mean_p, m2_p, nf)
        return n_local, mean, var, p
    shift = state.shift if state is not None else None
    if first is None and (shift is None or shift.shape[0] != nf):
        # Two C-sized vectors like every other pass of the layer: equal
        # buffer sizes let the header detect ranks running different passes.
        total, (s, _) = collective.allreduce(
            comm, backend, state, [None if mean_r is None else mean_r * n_local, None],
            n_local, protocol.PHASE_MEAN, None, nf,
        )
        shift = s / max(total, 1)
    p = None
    for redo in range(_MAX_REDO + 1):
        if redo == 0 and first is not None:
            total, s, q = first  # reduced already, around state.shift
        else:
            payload = backend.shifted_sums(n_local, mean_r, m2_r, shift)
            total, (s, q) = collective.allreduce(
                comm, backend, state, payload, n_local, protocol.PHASE_STATS, None, nf
            )
        mean, var = backend.merge_sums(total, s, q, shift, nf)
        # Every decision below is a function of all-reduced values, so every
        # rank takes it and runs the same collectives.
        if total == 0 or redo == _MAX_REDO:
            break
        if redo == 0:
            # Shifted sums that overflowed (spreads near the dtype's largest
            # value) or squares that underflowed (tiny spreads): once more
            # on data scaled by powers of two.
            p = backend.stats_scale(mean, var, cdt)
            if p is not None:
                mean_r, m2_r = rescaled(p)
                shift = backend.next_shift(mean) * p
                continue
        # The shift was far from this batch's mean (a new domain, a layer
        # shared by inputs of different means): the merge's cancellation
        # could cost more than one process loses, so the reduction is redone
        # around the mean just found; one redo brings the shift within rounding.
        if not backend.shift_too_far(mean, var, shift):
            break
        shift = backend.next_shift(mean)
    if total == 0:
        return 0, mean, var, None
    if state is not None:
        # A NaN/Inf mean (non-finite input) must not become the next steps'
        # shift, or one bad batch would poison the channel forever. The merge
        # is exact for any shift, so such channels shift by 0 instead; done on
        # the device, without a host read. ``mean`` is identical on every rank.
        state.shift = backend.next_shift(mean if p is None else mean / p)
    return total, mean, var, p


def backward(
    dyv: Any, ctx: ForwardContext, nf: int, sync: bool, need_param_grads: bool,
) -> tuple[Any, Any, Any]:
    """A backward on the four primitives; ``dyv`` is ``dy``'s canonical view."""
    backend = ctx.backend
    cl = ctx.fmt.channel_last
    n_local = ctx.x.size // nf if nf else 0
    xp = backend.xp
    unit = ctx.unit  # see _forward_scaled
    if unit is not None:
        dyv = dyv.astype(_F64)
    repro = ctx.reproducible
    if repro:
        sum_dy, sum_dy_xhat, g_dy, g_dy_xhat = exact.backward_sums(dyv, ctx, nf, sync)
    elif n_local:
        sum_dy, sum_dy_xhat = backend.backward_reduce(
            dyv, ctx.x, cl, ctx.mean, ctx.invstd, ctx.act
        )
    else:
        sum_dy = sum_dy_xhat = None
    if not repro:
        g_dy, g_dy_xhat = sum_dy, sum_dy_xhat
    if sync and not repro:
        _, (g_dy, g_dy_xhat) = collective.allreduce(
            ctx.comm, backend, ctx.sync_state, [sum_dy, sum_dy_xhat], n_local,
            protocol.PHASE_BACKWARD, None, nf,
        )
    a, mean_dy, b = backend.backward_coefficients(
        ctx.weight, ctx.invstd, g_dy, g_dy_xhat, ctx.count, ctx.batch_stats, ctx.mean.dtype
    )
    elemt = (exact.ops_of(backend).backward_elemt if repro
             else functools.partial(backend.backward_elemt, relu=ctx.act))
    if n_local and unit is not None:
        # dx / unit at unit scale; times unit it may pass the output dtype's
        # largest value (a tiny spread with epsilon=0): saturated there
        dxu = elemt(dyv, ctx.x, cl, ctx.mean, a, mean_dy, b, _F64)
        big = float(np.finfo(ctx.dtype).max)
        dx = xp.clip(_scaled(dxu.reshape(ctx.x.shape), unit, cl, _F64), -big, big)
        dx = dx.astype(ctx.dtype).reshape(ctx.shape)
    elif n_local:
        dx = elemt(dyv, ctx.x, cl, ctx.mean, a, mean_dy, b, ctx.dtype)
        dx = dx.reshape(ctx.shape)
    else:
        dx = xp.empty(ctx.shape, dtype=ctx.dtype)
    if not need_param_grads:
        return dx, None, None
    pdt = ctx.param_dtype
    if repro and sync:
        # the global parameter gradients, identical for every split: what
        # allreduce_gradients(average=False) hands out for this layer
        ctx.global_grads = (g_dy_xhat.astype(pdt), g_dy.astype(pdt))
    if sum_dy is None:
        dweight = xp.zeros(nf, dtype=pdt)
        dbias = xp.zeros(nf, dtype=pdt)
    else:
        dweight = sum_dy_xhat.astype(pdt)
        dbias = sum_dy.astype(pdt)
    return dx, dweight, dbias


# ------------------------------------------------------------ steady state
_EMPTY64 = np.empty(0, dtype=_F64)
_EMPTY_SLOTS = np.empty(0, dtype=np.int64)
_NATIVE_X = (np.dtype(np.float32), _F64)
_NO_GRADS = {dt: np.empty(0, dtype=dt) for dt in _NATIVE_X}  # need_param_grads=False


class SteadyPlan:
    """A layer's checked steady-state pass: what every repeat of the same call reuses.

    Built by :func:`steady_plan` after a training forward took the general
    path (so its checks passed), for a backend with steady-state primitives
    (``backend.steady_ops``: the numba backend). The caller (a layer) keeps
    it and calls :func:`steady_forward` only while everything the checks
    read is unchanged: the input's library, dtype, shape and strides, the
    vectors (the same arrays, with the same shape and dtype), the layer's
    options and mode, the communicator and the CPU backend choice.
    :func:`steady_forward` itself checks the state (handshake, shift).

    A steady forward is ``moments -> [pack -> allreduce] -> one per-channel
    kernel -> normalize``, a backward ``sums -> [pack -> allreduce] -> one
    per-channel kernel -> elemt``: the same operations as
    :func:`forward`/:func:`backward`, with the checks done and the
    per-channel steps in one compiled call each.
    """

    __slots__ = (
        "backend", "ops", "verdict", "comm", "state", "sync", "nf", "shape", "strides",
        "vshape", "dtype", "cdt", "pdt", "relu", "momentum", "epsilon", "unbiased", "update",
        "vectors", "n_local", "unit_rng", "count", "params", "kf", "rtype", "scratch", "buf",
        "slots", "templates", "owner", "array_type", "running",
    )

    backend: Any
    ops: Any  # backend.steady_ops(...): the data passes and per-channel kernels
    verdict: Verdict
    comm: Communicator
    state: Any  # SyncState (None only for an unsynchronized pass)
    sync: bool
    nf: int
    shape: tuple
    strides: tuple
    vshape: tuple
    dtype: np.dtype
    cdt: np.dtype
    pdt: np.dtype
    relu: bool
    momentum: float | None
    epsilon: float
    unbiased: bool
    update: bool
    vectors: tuple
    n_local: int
    unit_rng: float
    count: int
    params: Any  # float64, channel_math.P_* slots
    kf: Any  # keep, factor, then C slots (the running statistics' dtype)
    rtype: Any
    scratch: Any  # (2, C) float64: the global mean and variance
    buf: Any
    slots: tuple
    templates: dict
    owner: Any  # what the caller checked the plan with (the layer's options)
    array_type: type  # numpy.ndarray
    running: tuple  # the running statistics the kernel updates (empty vectors: none)

    def forward(self, x: Any, num_batches_tracked: int) -> tuple | None:
        """:func:`steady_forward` by this plan."""
        return steady_forward(self, x, num_batches_tracked)

    def backward(self, ctx: ForwardContext, dy: Any, need_param_grads: bool,
                 accumulate_into: tuple | None) -> tuple | None:
        """:func:`steady_backward` (``accumulate_into`` is for the fused path: ignored)."""
        return steady_backward(ctx, dy, need_param_grads)

    def set_count(self, count: int) -> None:
        """Prepare what depends on the global count: data_unit's bound, the unbiased ratio."""
        self.count = count
        hi = self.unit_rng - 0.5 * float(np.log2(max(count, 1)))
        self.params[P_EXPECTED] = float(count)
        self.params[P_UNIT_HI] = 4.0 ** (hi - 1)
        self.params[P_RATIO] = unbiased_ratio(count) if self.unbiased and count > 1 else 1.0

    def template(self, phase: int, evals: int) -> Any:
        """The header template of ``phase`` for the layer's current eval count."""
        key = (phase, evals)
        tmpl = self.templates.get(key)
        if tmpl is None:
            state = self.state
            tmpl = protocol.header_template(phase, self.nf, state.layer_id, state.ident, evals)
            if len(self.templates) > 8:
                self.templates.clear()
            self.templates[key] = tmpl
        return tmpl


def steady_plan(
    comm: Communicator, state: SyncState | None, x: Any, vd: Verdict, vectors: tuple,
    momentum: float | None, epsilon: float, unbiased: bool, relu: bool, sync: bool,
) -> SteadyPlan | None:
    """A :class:`SteadyPlan` for a training forward that just passed its checks, or None.

    None where the steady path does not apply: another backend, input dtype
    or layout, compute dtype other than the parameters', vectors of other
    dtypes, an input with fewer than 2 values per channel (or none on this
    rank), or a synchronized layer whose handshake and shift are not there yet.
    """
    backend = vd.backend
    make = getattr(backend, "steady_ops", None)
    pdt, cdt, nf = vd.param_dtype, vd.cdt, vd.nf
    if (make is None or type(x) is not np.ndarray or x.dtype not in _NATIVE_X
            or not x.dtype.isnative or not x.flags.c_contiguous or cdt != pdt or not nf):
        return None
    weight, bias, rm, rv = vectors
    update = rm is not None
    for vec in vectors if update else vectors[:2]:
        if type(vec) is not np.ndarray or vec.shape != (nf,) or vec.dtype != pdt:
            return None
    if not update and rv is not None:
        return None
    n_local = x.size // nf
    if sync:
        shift = state.shift if state is not None else None
        if (state is None or not state.handshake_done or shift is None
                or type(shift) is not np.ndarray or shift.shape != (nf,) or not n_local):
            return None
    elif n_local < 2:
        return None
    fmt = vd.fmt
    v = canonical_view(x, fmt)
    ops = make(v.shape, x.dtype, fmt.channel_last)
    if ops is None:
        return None
    p = SteadyPlan()
    p.backend, p.ops, p.verdict, p.comm, p.state, p.sync = backend, ops, vd, comm, state, sync
    p.nf, p.shape, p.strides, p.vshape, p.dtype = nf, x.shape, x.strides, v.shape, x.dtype
    p.cdt, p.pdt, p.relu, p.momentum, p.epsilon = cdt, pdt, relu, momentum, float(epsilon)
    p.unbiased, p.update, p.vectors, p.n_local = unbiased, update, vectors, n_local
    p.params = np.zeros(STEADY_PARAMS, dtype=_F64)
    rescale = RESCALE.get(cdt, RESCALE[_F64])
    p.params[P_TINY_MEAN], p.params[P_TINY_VAR] = rescale[2], rescale[3]
    rdt = x.dtype if x.dtype == np.float32 else cdt  # as forward() picks it
    p.unit_rng = RESCALE.get(rdt, RESCALE[_F64])[4]
    p.params[P_UNIT_LO] = 4.0 ** (1 - p.unit_rng)
    p.params[P_EPS] = p.epsilon
    p.params[P_UPDATE] = 1.0 if update else 0.0
    p.params[P_CUMULATIVE] = 1.0 if momentum is None else 0.0
    p.params[P_SIZE] = float(comm.size)
    p.set_count(n_local)
    if sync:
        p.params[P_EXPECTED] = -1.0  # the global count is known after the first all-reduce
    p.rtype = pdt.type
    p.kf = np.zeros(nf + 2, dtype=pdt)
    if momentum is not None:
        p.kf[:2] = momentum_weights(momentum, 0)  # (keep, factor) rounded to the dtype
    p.running = (rm, rv) if update else (np.empty(0, dtype=pdt),) * 2
    p.scratch = np.empty((2, nf), dtype=_F64)
    if sync:
        assert state is not None
        p.buf = state.buffer(backend, protocol.HEADER + 2 * nf)
        p.slots = (protocol.steady_slots(protocol.PHASE_STATS),
                   protocol.steady_slots(protocol.PHASE_BACKWARD))
    else:
        p.buf, p.slots = _EMPTY64, (_EMPTY_SLOTS, _EMPTY_SLOTS)
    p.templates = {}
    p.owner = None
    p.array_type = np.ndarray
    return p


def steady_forward(
    plan: SteadyPlan, x: Any, num_batches_tracked: Any,
) -> tuple[Any, ForwardContext, ForwardResult | None] | None:
    """A training forward by ``plan``: ``(y, ctx, None)``, running statistics updated in place.

    ``num_batches_tracked``: the layer's counter (a 0-d int64 array), read
    for ``momentum=None`` and counted in place with the running statistics.
    The caller has checked that ``plan`` fits the call (see
    :class:`SteadyPlan`). None (nothing changed, no collective run): the
    state is not ready; take the general path. On a synchronized layer a
    rare case met after the all-reduce goes on in :func:`forward` from it,
    and its result comes third, for the caller to store and count as usual.
    """
    state = plan.state
    sync = plan.sync
    if sync and (not state.handshake_done or state.shift is None):
        return None
    ops, nf = plan.ops, plan.nf
    weight, bias = plan.vectors[:2]
    v = x.reshape(plan.vshape)
    small = ops.small()
    coef = np.empty((3, nf), dtype=plan.cdt)  # mean, invstd, scale
    if sync:
        _, call, _, evals = state.next_ids()
        shift = state.shift
        tmpl = plan.template(protocol.PHASE_STATS, evals)
        call %= protocol.CALL_MODULUS
        if small:
            mean_r = np.zeros(nf, dtype=_F64)
            m2_r = np.zeros(nf, dtype=_F64)
            ops.fwd_pack(v, mean_r, m2_r, plan.buf, tmpl, plan.slots[0], plan.n_local, call,
                         shift)
        else:
            mean_r, m2_r = ops.moments(v)
            ops.pack(plan.buf, tmpl, plan.slots[0], plan.n_local, call, mean_r, m2_r, shift,
                     float(plan.n_local), _EMPTY64)
        buf = plan.comm.allreduce_sum(plan.buf)
        shift_out = np.empty(nf, dtype=_F64)
    else:
        buf = shift = shift_out = _EMPTY64
        if small:
            mean_r = np.zeros(nf, dtype=_F64)
            m2_r = np.zeros(nf, dtype=_F64)
        else:
            mean_r, m2_r = ops.moments(v)
    rm, rv = plan.running
    y = None
    if small:
        y = np.empty(plan.vshape, dtype=plan.dtype)
        act = (coef[2], bias) if plan.relu else None
    while True:
        if small:
            code, total = ops.fwd(not sync, v, buf, plan.slots[0], plan.params, mean_r, m2_r,
                                  shift, weight, rm, rv, num_batches_tracked, plan.kf,
                                  plan.scratch, coef, shift_out, bias, y, act)
        else:
            code, total = ops.forward_channels(buf, plan.slots[0], plan.params, mean_r, m2_r,
                                               shift, weight, rm, rv, num_batches_tracked,
                                               plan.kf, plan.scratch, coef, shift_out)
        if code != STEADY_COUNT:
            break
        if total <= 1.0:  # an empty or one-value global batch: the general path's errors
            code = STEADY_RARE
            break
        plan.set_count(int(total))
    if code != STEADY_OK:
        if not sync:
            return None  # nothing written: the general path from the start
        return _steady_rare(plan, x, v, buf, int(num_batches_tracked))
    if sync:
        state.shift = shift_out
    mean_c, invstd, scale = coef
    if y is None:
        y = ops.normalize(v, mean_c, scale, bias, plan.relu)
    ctx = ForwardContext(
        v, plan.shape, plan.dtype, plan.verdict.fmt, plan.backend, plan.comm, mean_c, invstd,
        weight, plan.count, True, plan.pdt, state, act=(scale, bias) if plan.relu else None,
        plan=plan,
    )
    return y.reshape(plan.shape), ctx, None


def _steady_rare(
    plan: SteadyPlan, x: Any, v: Any, buf: Any, num_batches_tracked: int,
) -> tuple[Any, ForwardContext, ForwardResult]:
    """After the statistics all-reduce: a header to raise on, or :func:`forward` from it."""
    h, nf = protocol.HEADER, plan.nf
    # a header the compiled test refused raises here (the two tests agree)
    total = protocol.check_header(buf[:h], protocol.PHASE_STATS, plan.comm.size, None)
    first = (total, buf[h : h + nf], buf[h + nf : h + 2 * nf])
    with np.errstate(all="ignore"):  # as the functional API runs it (quiet_fp)
        res = forward(
            plan.comm, plan.state, x, v, plan.verdict, plan.vectors, True, True, plan.momentum,
            plan.epsilon, plan.unbiased, num_batches_tracked, True, plan.relu, first=first,
        )
    return res.y, res.ctx, res


def steady_backward(ctx: ForwardContext, dy: Any, need_param_grads: bool) -> tuple | None:
    """The backward of a :func:`steady_forward` pass; None: take :func:`backward`.

    The caller has checked ``dy`` (a NumPy array of the forward input's dtype,
    shape and strides). None when the forward's vectors changed shape or
    dtype in place since, or the communicator stopped (or started)
    synchronizing: nothing done, no collective run.
    """
    plan: SteadyPlan = ctx.plan
    weight = ctx.weight
    sync = plan.sync
    pdt = plan.pdt
    act = ctx.act
    if (weight.shape != plan.vectors[0].shape or weight.dtype is not pdt
            or ctx.comm.synchronizes is not sync
            or (act is not None and act[1].dtype is not pdt)):
        return None
    ops, nf, invstd, v = plan.ops, plan.nf, ctx.invstd, ctx.x
    dyv = dy.reshape(plan.vshape)
    small = ops.small()
    coef = np.empty((3, nf), dtype=plan.cdt)  # a, mean_dy, b
    if need_param_grads:
        dw = np.empty(nf, dtype=pdt)
        db = np.empty(nf, dtype=pdt)
    else:
        dw = db = _NO_GRADS[pdt]
    if small:
        sum_dy = np.zeros(nf, dtype=_F64)
        sum_dxm = np.zeros(nf, dtype=_F64)
    else:
        sum_dy, sum_dxm = ops.sums(dyv, v, ctx.mean, act)
    dx = None
    if sync:
        comm = ctx.comm
        _, call, _, evals = plan.state.next_ids()
        tmpl = plan.template(protocol.PHASE_BACKWARD, evals)
        call %= protocol.CALL_MODULUS
        if small:
            ops.bwd_pack(dyv, v, ctx.mean, act, sum_dy, sum_dxm, plan.buf, tmpl, plan.slots[1],
                         plan.n_local, call, invstd)
        else:
            ops.pack(plan.buf, tmpl, plan.slots[1], plan.n_local, call, sum_dy, sum_dxm,
                     _EMPTY64, 0.0, invstd)
        buf, slots, size = comm.allreduce_sum(plan.buf), plan.slots[1], float(comm.size)
    else:
        buf, slots, size = _EMPTY64, _EMPTY_SLOTS, 0.0
    if small:
        dx = np.empty(plan.vshape, dtype=plan.dtype)
        code = ops.bwd(not sync, dyv, v, ctx.mean, act, sum_dy, sum_dxm, buf, slots, size,
                       weight, invstd, float(ctx.count), coef, dw, db, dx)
    else:
        code = ops.backward_channels(buf, slots, size, weight, invstd, sum_dy, sum_dxm,
                                     float(ctx.count), coef, dw, db)
    if code:  # the header (the two tests agree: check_header raises)
        protocol.check_header(buf[: protocol.HEADER], protocol.PHASE_BACKWARD, ctx.comm.size,
                              None)
        raise AssertionError("unreachable: the header check raised")  # pragma: no cover
    if dx is None:
        a, mean_dy, b = coef
        dx = ops.elemt(dyv, v, ctx.mean, a, mean_dy, b, act)
    dx = dx.reshape(plan.shape)
    if not need_param_grads:
        return dx, None, None
    return dx, dw, db
