"""The reproducible mode's synchronized statistics and backward sums (``reproducible=True``).

Same results, bit for bit, for every world size and split of the global batch
(docs/reproducibility.md). A training forward::

    per-sample partials (one data pass) -> their bound exponents
        -> ONE MAX all-reduce (the bound pass) -> exact folds of the partials
        -> ONE SUM all-reduce -> finalize

and a training backward the same on ``dy`` and ``dy * (x - mean)``. The
numerics are the backend's ``exact`` primitives (the NumPy reference is
:mod:`cupysyncbn.backends.exact_samples`, over
:mod:`cupysyncbn.backends.exact_sums`); this module only moves their
C-sized vectors through the collectives of :mod:`.collective`, which check
every pass's header as the default mode does. With one process (or a
non-synchronizing communicator) the same primitives run without the
collectives, so one process gives the bits of every multi-rank run.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..backends import Backend
from ..comm.base import Communicator
from . import collective, protocol
from .state import ForwardContext, SyncState

__all__ = ["ops_of", "forward_stats", "backward_sums"]


def ops_of(backend: Backend) -> Any:
    """The backend's reproducible primitives.

    Raises
    ------
    NotImplementedError
        For a backend without them (NumPy, numba and CuPy have them).
    """
    ops = getattr(backend, "exact", None)
    if ops is None:
        raise NotImplementedError(
            f"reproducible=True is not available on the {backend.name} backend (NumPy,"
            " numba and CuPy arrays have it): use reproducible=False with these arrays"
        )
    return ops


def _bounds(
    comm: Communicator, backend: Backend, state: SyncState | None, sync: bool,
    local: list, k: int, phase: int, nf: int, spatial: int = 0,
) -> tuple[list, bool]:
    """Global bound exponents (the MAX over ranks) and whether ``spatial`` agreed."""
    if not sync:
        return local, True
    # on the backend's device (a CuPy buffer does not take NumPy vectors)
    local = [backend.asarray(v) for v in local]
    red, same = collective.allreduce_max(comm, backend, state, local, k, phase, None, nf,
                                         spatial)
    return [np.array(backend.to_host(r), dtype=np.float64) for r in red], same


def _sum(
    comm: Communicator, backend: Backend, state: SyncState | None, sync: bool, folds: Any,
    n_local: int, phase: int, nf: int,
) -> tuple[int, np.ndarray]:
    """The SUM all-reduce of local folds ``(Q, K, C)`` (host result) and the global count."""
    if not sync:
        return n_local, np.asarray(backend.to_host(folds), dtype=np.float64)
    folds = backend.asarray(folds)  # the collective's buffer lives on the backend's device
    q, k = folds.shape[0], folds.shape[1]
    total, red = collective.allreduce(
        comm, backend, state, [folds[i, j] for i in range(q) for j in range(k)], n_local,
        phase, None, nf,
    )
    host = np.stack([np.asarray(backend.to_host(v), dtype=np.float64) for v in red])
    return total, host.reshape(q, k, nf)


def _spatial(shape: tuple, channel_last: bool) -> int:
    """Values per sample and channel (``S``) of an input of this shape."""
    inner = shape[1:-1] if channel_last else shape[2:]
    return int(np.prod(inner, dtype=np.int64)) if len(shape) > 2 else 1


def forward_stats(
    comm: Communicator, backend: Backend, state: SyncState | None, v: Any,
    channel_last: bool, nf: int, n_local: int, cdt: np.dtype, sync: bool, shape: tuple,
) -> tuple[int, Any, Any, Any]:
    """Global ``(count, mean, biased var, p)`` (float64), identical for every split.

    The statistics of ``x * p`` per channel; ``p`` is None (1) unless some
    channel's would leave float64 (:func:`..backends.exact_sums.scaled_stats`).
    ``shape``: the input's (its first axis holds the samples).

    The per-sample path (:mod:`..backends.exact_samples`): one data pass for
    per-sample partials, a MAX all-reduce of their bounds, their exact folds,
    a SUM all-reduce. Where the global bounds say the data are too extreme
    for it, or the ranks' sample sizes differ, every rank takes the
    per-element path instead (one more MAX all-reduce, for the data's bound).
    """
    ops = ops_of(backend)
    k = ops.folds_for(cdt)
    samples = int(shape[0]) if n_local else 0
    spatial = _spatial(shape, channel_last)
    parts = ops.sample_moments(v, channel_last, samples) if n_local else None
    (e_b, e_a, e_s), same = _bounds(comm, backend, state, sync, ops.local_bounds(parts, nf),
                                    k, protocol.PHASE_STATS, nf, spatial)
    if same and ops.safe(e_b, e_a, e_s):
        g = ops.grids(e_b, e_a, e_s)
        folds = (ops.fold_moments(*parts, g, k) if parts is not None
                 else backend.xp.zeros((ops.QUANTITIES, k, nf)))
        total, p = _sum(comm, backend, state, sync, folds, n_local, protocol.PHASE_STATS, nf)
        ops.check_count(total)  # a global value: every rank raises alike
        if total == 0:
            return 0, backend.xp.zeros(nf), backend.xp.zeros(nf), None
        mean, var = ops.finalize_sample_moments(p, g, spatial, total)
        return total, backend.asarray(mean), backend.asarray(var), None
    return _forward_per_element(comm, backend, state, v, channel_last, nf, n_local, k, sync)


def _forward_per_element(
    comm: Communicator, backend: Backend, state: SyncState | None, v: Any,
    channel_last: bool, nf: int, n_local: int, k: int, sync: bool,
) -> tuple[int, Any, Any, Any]:
    """:func:`forward_stats` by :mod:`..backends.exact_sums`' per-element folds."""
    ops = ops_of(backend)
    a = ops.absmax(v, channel_last) if n_local else None
    (e,), _ = _bounds(comm, backend, state, sync, [ops.bound_exponent(a, nf)], k,
                      protocol.PHASE_STATS, nf)
    xp = backend.xp
    if n_local:
        folds = xp.stack([xp.asarray(f) for f in
                          ops.moment_folds(v, channel_last, ops.scale_exponent(e), k)])
    else:
        folds = xp.zeros((2, k, nf))
    total, (p1, p2) = _sum(comm, backend, state, sync, folds, n_local, protocol.PHASE_STATS, nf)
    ops.check_count(total)  # a global value: every rank raises alike
    if total == 0:
        return 0, backend.xp.zeros(nf), backend.xp.zeros(nf), None
    mean, var = ops.finalize_moments(p1, p2, total, e)
    rescaled = ops.scaled_stats(p1, p2, total, e, mean, var)
    if rescaled is None:
        return total, mean, var, None
    return total, *rescaled  # statistics of x * p (data near float64's limits)


def backward_sums(
    dyv: Any, ctx: ForwardContext, nf: int, sync: bool,
) -> tuple[Any, Any, Any, Any]:
    """``(local sum(dy), local sum(dy*xhat), global sum(dy), global sum(dy*xhat))``, float64.

    The sums are exact before their final rounding, so the global ones are
    identical for every split and the local ones are each rank's exact share.
    Per-sample partials (:mod:`..backends.exact_samples`) unless the global
    bounds say they may have overflowed: then the per-element folds.
    """
    backend, cl = ctx.backend, ctx.fmt.channel_last
    ops = ops_of(backend)
    k = ops.folds_for(ctx.mean.dtype)
    n_local = ctx.x.size // nf if nf else 0
    samples = int(ctx.shape[0]) if n_local else 0
    parts = ops.sample_backward(dyv, ctx.x, cl, ctx.mean, samples) if n_local else None
    local = ops.local_bounds(parts, nf)[:2] if parts is not None else [
        ops.bound_exponent(None, nf)] * 2
    (eg, eh), _ = _bounds(ctx.comm, backend, ctx.sync_state, sync, local, k,
                          protocol.PHASE_BACKWARD, nf)
    if ops.backward_safe(eg, eh):
        folds = (ops.fold_sums(parts, [eg, eh], k) if parts is not None
                 else backend.xp.zeros((2, k, nf)))
    else:
        eg, eh, folds = _backward_per_element(dyv, ctx, nf, n_local, k, sync)
    invstd = ctx.invstd.astype(np.float64)
    local_dy = ops.finalize_sum(folds[0], eg)
    local_dxm = ops.finalize_sum(folds[1], eh)
    if sync:
        _, red = _sum(ctx.comm, backend, ctx.sync_state, sync, folds, n_local,
                      protocol.PHASE_BACKWARD, nf)
        g_dy, g_dxm = ops.finalize_sum(red[0], eg), ops.finalize_sum(red[1], eh)
    else:
        g_dy, g_dxm = local_dy, local_dxm
    return local_dy, local_dxm * invstd, g_dy, g_dxm * invstd


def _backward_per_element(
    dyv: Any, ctx: ForwardContext, nf: int, n_local: int, k: int, sync: bool,
) -> tuple[Any, Any, Any]:
    """The global bounds and local folds ``(2, K, C)`` of the per-element backward path."""
    backend, cl = ctx.backend, ctx.fmt.channel_last
    ops = ops_of(backend)
    if n_local:
        ag, ah = ops.backward_bounds(dyv, ctx.x, cl, ctx.mean)
    else:
        ag = ah = None
    (eg, eh), _ = _bounds(
        ctx.comm, backend, ctx.sync_state, sync,
        [ops.bound_exponent(ag, nf), ops.bound_exponent(ah, nf)], k,
        protocol.PHASE_BACKWARD, nf,
    )
    if n_local:
        pg, ph = ops.backward_folds(
            dyv, ctx.x, cl, ctx.mean, ops.scale_exponent(eg), ops.scale_exponent(eh), k
        )
    else:
        pg = ph = backend.xp.zeros((k, nf))
    return eg, eh, backend.xp.stack([backend.xp.asarray(pg), backend.xp.asarray(ph)])
