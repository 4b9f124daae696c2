"""The synchronized passes on a fused backend (CuPy): launches, no host syncs.

:mod:`cupysyncbn.functional` validates (:mod:`._sync.checks`), then hands a
pass to this module when the backend has the fused primitives (``backend.fused``). A steady-state
training forward is::

    stats_partials -> fwd_pack -> ONE comm.allreduce_sum -> fwd_norm

(merge, running statistics, invstd/scale/bias, next shift, header check and
``y`` all in ``fwd_norm``), a training backward::

    bwd_partials -> bwd_pack -> ONE comm.allreduce_sum -> bwd_elemt

and an eval forward one ``fwd_norm``. Per-layer workspaces (partials, the
wire buffers, the shift, the status) live in the layer's :class:`SyncState`
and are reused, so a steady-state pass allocates only its outputs and can be
captured in a CUDA graph; what a captured pass used stays allocated for the
layer's lifetime (``DeviceWorkspace.keep``), so no replay writes to memory the
pool has handed out again. The header verdict is read asynchronously
(:mod:`.device_status`).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..arrays.formats import canonical_view
from ..backends.channel_math import momentum_weights
from . import collective, protocol
from .checks import Verdict
from .device_status import capturing_stream, strict_sync
from .state import (
    DeviceWorkspace,
    ForwardContext,
    ForwardResult,
    SyncState,
    workspace,
    workspace_key,
)

__all__ = [
    "applies", "run_forward", "run_backward", "forward", "backward", "poll", "FusedPlan",
    "steady_plan",
]

_F64 = np.dtype(np.float64)
_F32 = np.dtype(np.float32)
_F_TRAIN, _F_UPDATE, _F_UNBIASED, _F_CHECK, _F_SHIFT = 1, 2, 4, 8, 16
#: act="relu" (kernels/fused.cu SBN_F_RELU): the forward writes max(y, 0) and
#: saves the ReLU's scale and bias after mean and invstd in ``statc``; the
#: backward's three kernels mask dy with them (no launch of its own).
_F_RELU = 64


def _ids(state: Any, sync: bool) -> tuple[int, int, int, int]:
    """``(layer, call, ident, evals)`` header values of the next pass (protocol)."""
    if state is None or not sync:
        return 0, 0, 0, 0
    layer, call, ident, evals = state.next_ids()
    m = protocol.CALL_MODULUS
    return layer % m, call % m, ident % (4 * m), evals % m


def _finish(ws: DeviceWorkspace, state: Any, comm: Any) -> None:
    if state is None or strict_sync(comm):
        ws.status.check_now(comm.size)
    else:
        ws.status.after_pass(comm.size)


def poll(state: SyncState | None, backend: Any, nf: int) -> None:
    """Raise a bad verdict of the layer's previous pass (start of a pass)."""
    if state is not None:
        ws = state.workspace(workspace_key(backend, nf))
        if ws is not None:
            ws.status.poll()


def forward(
    *, backend: Any, comm: Any, state: Any, v: Any, channel_last: bool, nf: int,
    n_local: int, cdt: np.dtype, pdt: np.dtype, vectors: tuple, training: bool,
    batch_stats: bool, momentum: float | None, epsilon: float, unbiased: bool,
    num_batches_tracked: int, sync: bool, inplace: bool, relu: bool = False,
) -> tuple:
    """Run a forward; return ``(y_canonical, stats64, statc, new_rm, new_rv, updated)``.

    ``relu``: ``statc`` is ``(mean, invstd, scale, bias)`` (else the first two).
    """
    xp = backend.xp
    weight, bias, rm, rv = vectors
    y = xp.empty(v.shape, dtype=v.dtype)
    stats64 = xp.empty(2 * nf + 1, dtype=_F64)
    statc = xp.empty((4 if relu else 2) * nf, dtype=cdt)
    act = _F_RELU if relu else 0
    if not batch_stats:  # eval: one launch, nothing else
        poll(state, backend, nf)
        backend.fwd_norm(v, y, channel_last, nf, None, None, None, vectors, (None, None),
                         stats64, statc, None, epsilon, 0.0, 0.0, act, comm.size, pdt)
        if capturing_stream(xp.cuda.get_current_stream()):
            workspace(state, backend, nf).keep(stats64, statc)
        return y, stats64, statc, rm, rv, False
    ws = workspace(state, backend, nf)
    if state is not None:
        ws.status.poll()
    if sync:
        collective.handshake(comm, backend, state, nf, pdt)
    update = rm is not None and training
    nbt = None
    if update and momentum is None and state is not None:
        if ws.nbt_host != num_batches_tracked:  # first pass, or state loaded
            ws.nbt[1:].fill(float(num_batches_tracked))
        nbt = ws.nbt
        ws.nbt_host = num_batches_tracked + 1  # the layer counts this pass
    parts, g = (backend.stats_partials(v, channel_last, cdt, ws) if n_local else (None, 0))
    size = comm.size
    wire = protocol.HEADER + 2 * nf
    buf = ws("buf", wire, _F64)
    st = ws.status.device
    if sync and not (state is not None and ws.has_shift):
        # First pass (or no state): one extra all-reduce finds the global mean.
        bufm = ws("bufm", wire, _F64)
        ids = _ids(state, sync)
        backend.fwd_pack(parts, g, nf, cdt, 1, None, None, None, bufm, st, size,
                         (n_local, protocol.PHASE_MEAN, -1, nf, *ids), nbt)
        comm.allreduce_sum(bufm)
        ids = _ids(state, sync)
        backend.fwd_pack(parts, g, nf, cdt, 2, None, ws.shift_used, bufm, buf, st, size,
                         (n_local, protocol.PHASE_STATS, -1, nf, *ids), nbt)
        comm.allreduce_sum(buf)
    elif sync:
        ids = _ids(state, sync)
        backend.fwd_pack(parts, g, nf, cdt, 0, ws.shift_next, ws.shift_used, None, buf, st,
                         size, (n_local, protocol.PHASE_STATS, -1, nf, *ids), nbt)
        comm.allreduce_sum(buf)
    else:
        backend.fwd_pack(parts, g, nf, cdt, 3, None, ws.shift_used, None, buf, st, size,
                         (n_local, protocol.PHASE_STATS, -1, nf, 0, 0, 0, 0), nbt)
    if sync and state is not None:
        ws.has_shift = True
        state.shift = ws.shift_next  # the error path's "is there a shift" test
    outs = (None, None)
    if update:
        outs = (rm, rv) if inplace else (xp.empty_like(rm), xp.empty_like(rv))
    keep, factor = momentum_weights(momentum, num_batches_tracked)
    flags = _F_TRAIN | act
    flags |= (_F_CHECK | (_F_SHIFT if state is not None else 0)) if sync else 0
    flags |= (_F_UPDATE | (_F_UNBIASED if unbiased else 0)) if update else 0
    backend.fwd_norm(v, y, channel_last, nf, buf, ws.shift_used, ws.shift_next, vectors, outs,
                     stats64, statc, st, epsilon, keep, factor, flags, size, pdt, nbt)
    _finish(ws, state, comm)
    if ws.capturing:  # the backward's graph reads them; a replay writes them
        ws.keep(stats64, statc, *([] if inplace else outs))
    new_rm, new_rv = outs if update else (rm, rv)
    return y, stats64, statc, new_rm, new_rv, update


def backward(
    *, backend: Any, comm: Any, state: Any, dyv: Any, x: Any, channel_last: bool, nf: int,
    n_local: int, stats64: Any, statc: Any, weight: Any, pdt: np.dtype, batch_stats: bool,
    need_param_grads: bool, sync: bool, accumulate_into: tuple | None = None,
    relu: bool = False,
) -> tuple:
    """Run a backward; return ``(dx_canonical, dweight, dbias)``.

    With ``accumulate_into=(grad_w, grad_b)`` the local gradients are added
    to those arrays in place by the pack kernel and they are returned.
    ``relu``: the forward had ``act="relu"`` (its ``statc`` holds the mask's vectors).
    """
    xp = backend.xp
    ws = workspace(state, backend, nf) if (batch_stats or state is not None) else None
    if state is not None:
        assert ws is not None  # made above whenever there is a state
        ws.status.poll()
    dweight = dbias = None
    accumulate = accumulate_into is not None
    if accumulate_into is not None:
        dweight, dbias = accumulate_into
    elif need_param_grads:
        dweight = xp.empty(nf, dtype=pdt)
        dbias = xp.empty(nf, dtype=pdt)
    buf = None
    if batch_stats or need_param_grads or accumulate:
        if ws is None:
            ws = workspace(None, backend, nf)
        act = (statc[2 * nf:3 * nf], statc[3 * nf:]) if relu else None
        parts, g = (backend.bwd_partials(dyv, x, channel_last, statc[:nf], ws, act)
                    if n_local else (None, 0))
        buf = ws("bufb", protocol.HEADER + 2 * nf, _F64)
        ids = _ids(state, sync)
        backend.bwd_pack(parts, g, nf, statc, buf, dweight, dbias, accumulate,
                         (n_local, protocol.PHASE_BACKWARD, -1, nf, *ids), pdt)
        if sync:
            comm.allreduce_sum(buf)
    dx = xp.empty(x.shape, dtype=x.dtype)
    if n_local or sync:
        flags = (_F_TRAIN if batch_stats else 0) | (_F_CHECK if sync else 0)
        flags |= _F_RELU if relu else 0
        backend.bwd_elemt(dyv, x, dx, channel_last, buf, stats64, statc, weight,
                          ws.status.device if ws is not None else None, flags, comm.size, pdt)
    if ws is not None and (sync or state is None):
        _finish(ws, state, comm)
    if ws is not None and ws.capturing and not accumulate:
        ws.keep(dweight, dbias)
    return dx, dweight, dbias


def applies(backend: Any, param_dtype: np.dtype, *vectors: Any) -> bool:
    """Whether a pass can run on the backend's fused kernels."""
    if not getattr(backend, "fused", False) or param_dtype not in (_F32, _F64):
        return False
    return all(v is None or np.dtype(v.dtype) == param_dtype for v in vectors)


def run_forward(
    comm: Any, state: SyncState | None, x: Any, v: Any, vd: Verdict, vectors: tuple,
    training: bool, batch_stats: bool, momentum: float | None, epsilon: float,
    unbiased: bool, num_batches_tracked: int, sync: bool, inplace: bool,
    relu: bool = False,
) -> ForwardResult:
    """A forward on the fused kernels, as the functional API returns it."""
    nf, pdt = vd.nf, vd.param_dtype
    with x.device:
        y, stats64, statc, new_rm, new_rv, updated = forward(
            backend=vd.backend, comm=comm, state=state, v=v,
            channel_last=vd.fmt.channel_last, nf=nf, n_local=v.size // nf if nf else 0,
            cdt=vd.cdt, pdt=pdt, vectors=vectors, training=training,
            batch_stats=batch_stats, momentum=momentum, epsilon=float(epsilon),
            unbiased=unbiased, num_batches_tracked=num_batches_tracked, sync=sync,
            inplace=inplace, relu=relu,
        )
    weight = vectors[0]
    count = stats64[2 * nf] if batch_stats else 0
    ctx = ForwardContext(
        v, tuple(x.shape), np.dtype(x.dtype), vd.fmt, vd.backend, comm, statc[:nf],
        statc[nf:2 * nf], weight, count, batch_stats, pdt, state,
        fused=(stats64, statc, weight),
        act=(statc[2 * nf:3 * nf], statc[3 * nf:]) if relu else None,
    )
    if not batch_stats:
        return ForwardResult(y.reshape(x.shape), ctx, new_rm, new_rv)
    return ForwardResult(
        y.reshape(x.shape), ctx, new_rm, new_rv, stats64[:nf], stats64[nf : 2 * nf], count,
        updated,
    )


def run_backward(
    dy: Any, dyv: Any, ctx: ForwardContext, nf: int, sync: bool, need_param_grads: bool,
    accumulate_into: tuple | None,
) -> tuple[Any, Any, Any]:
    """A backward on the fused kernels, as the functional API returns it."""
    backend = ctx.backend
    stats64, statc, weight = ctx.fused
    acc = accumulate_into
    if acc is not None and not (
        need_param_grads and all(
            g is not None and backend.owns(g) and g.shape == (nf,)
            and np.dtype(g.dtype) == ctx.param_dtype and g.flags.c_contiguous
            for g in acc)
    ):
        acc = None
    with dy.device:
        dx, dweight, dbias = backward(
            backend=backend, comm=ctx.comm, state=ctx.sync_state, dyv=dyv, x=ctx.x,
            channel_last=ctx.fmt.channel_last, nf=nf, n_local=ctx.x.size // nf if nf else 0,
            stats64=stats64, statc=statc, weight=weight, pdt=ctx.param_dtype,
            batch_stats=ctx.batch_stats, need_param_grads=need_param_grads, sync=sync,
            accumulate_into=acc, relu=ctx.act is not None,
        )
    return dx.reshape(ctx.shape), dweight, dbias


class FusedPlan:
    """A layer's checked steady-state pass on the fused kernels (see ``passes.SteadyPlan``).

    Made after a training forward passed its checks; the layer checks that a
    call is the same (input dtype, shape and strides, the same vectors with
    the same shape and dtype, its options, mode and communicator) and this
    plan that the input is on the same device, then the pass goes straight
    to :func:`run_forward` (and its backward to :func:`run_backward`),
    without the functional API's dispatch and checks.
    """

    __slots__ = (
        "backend", "verdict", "comm", "state", "sync", "nf", "shape", "strides", "vshape",
        "dtype", "pdt", "relu", "momentum", "epsilon", "unbiased", "update", "vectors",
        "device", "owner", "array_type",
    )

    backend: Any
    verdict: Verdict
    comm: Any
    state: Any
    sync: bool
    nf: int
    shape: tuple
    strides: tuple
    vshape: tuple
    dtype: np.dtype
    pdt: np.dtype
    relu: bool
    momentum: float | None
    epsilon: float
    unbiased: bool
    update: bool
    vectors: tuple
    device: int
    owner: Any
    array_type: type

    def forward(self, x: Any, num_batches_tracked: Any) -> tuple | None:
        """``(y, ctx, result)`` of a training forward of ``x``; None: another device.

        ``num_batches_tracked``: the layer's counter (0-d array, read here).
        """
        if x.device.id != self.device:
            return None
        res = run_forward(
            self.comm, self.state, x, x.reshape(self.vshape), self.verdict, self.vectors,
            True, True, self.momentum, self.epsilon, self.unbiased, int(num_batches_tracked),
            self.sync, True, self.relu,
        )
        res.ctx.plan = self
        return res.y, res.ctx, res

    def backward(self, ctx: ForwardContext, dy: Any, need_param_grads: bool,
                 accumulate_into: tuple | None) -> tuple | None:
        """The backward of a :meth:`forward` pass; None: take the functional API."""
        if dy.device.id != self.device or ctx.comm.synchronizes is not self.sync:
            return None
        return run_backward(dy, dy.reshape(self.vshape), ctx, self.nf, self.sync,
                            need_param_grads, accumulate_into)


def steady_plan(
    comm: Any, state: SyncState | None, x: Any, vd: Verdict, vectors: tuple,
    momentum: float | None, epsilon: float, unbiased: bool, relu: bool, sync: bool,
) -> FusedPlan | None:
    """A :class:`FusedPlan` for a training forward that just passed its checks, or None."""
    backend, nf = vd.backend, vd.nf
    if (not applies(backend, vd.param_dtype, *vectors) or not nf or not x.size
            or not x.flags.c_contiguous or state is None):
        return None
    p = FusedPlan()
    p.backend, p.verdict, p.comm, p.state, p.sync, p.nf = backend, vd, comm, state, sync, nf
    p.shape, p.strides, p.dtype, p.pdt = x.shape, x.strides, x.dtype, vd.param_dtype
    p.vshape = canonical_view(x, vd.fmt).shape
    p.relu, p.momentum, p.epsilon, p.unbiased = relu, momentum, float(epsilon), unbiased
    p.update, p.vectors, p.device, p.owner = vectors[2] is not None, vectors, x.device.id, None
    p.array_type = type(x)
    return p
