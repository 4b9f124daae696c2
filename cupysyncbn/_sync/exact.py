"""The reproducible mode's synchronized statistics and backward sums (``reproducible=True``).

Same results, bit for bit, for every world size and split of the global batch
(docs/reproducibility.md). A training forward::

    local max|x| -> bound exponents -> ONE MAX all-reduce (the bound pass)
        -> exact fold sums of x and x^2 -> ONE SUM all-reduce -> finalize

and a training backward the same on ``dy`` and ``dy * (x - mean)``. The
numerics are the backend's ``exact`` primitives (the NumPy reference is
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


def _stack(backend: Backend, vecs: list, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The all-reduced folds as two K x C host arrays (the finalize runs on the host)."""
    host = [np.asarray(backend.to_host(v), dtype=np.float64) for v in vecs]
    return np.stack(host[:k]), np.stack(host[k:])


def _bounds(
    comm: Communicator, backend: Backend, state: SyncState | None, sync: bool,
    local: list, k: int, phase: int, nf: int,
) -> list:
    """Global bound exponents: the MAX over ranks of each rank's (or the local ones)."""
    if not sync:
        return local
    # on the backend's device (a CuPy buffer does not take NumPy vectors)
    local = [backend.asarray(v) for v in local]
    red = collective.allreduce_max(comm, backend, state, local, k, phase, None, nf)
    return [np.array(backend.to_host(r), dtype=np.float64) for r in red]


def forward_stats(
    comm: Communicator, backend: Backend, state: SyncState | None, v: Any,
    channel_last: bool, nf: int, n_local: int, cdt: np.dtype, sync: bool,
) -> tuple[int, Any, Any, Any]:
    """Global ``(count, mean, biased var, p)`` (float64), identical for every split.

    The statistics of ``x * p`` per channel; ``p`` is None (1) unless some
    channel's would leave float64 (:func:`..backends.exact_sums.scaled_stats`).
    """
    ops = ops_of(backend)
    k = ops.folds_for(cdt)
    a = ops.absmax(v, channel_last) if n_local else None
    (e,) = _bounds(comm, backend, state, sync, [ops.bound_exponent(a, nf)], k,
                   protocol.PHASE_STATS, nf)
    if n_local:
        p1, p2 = ops.moment_folds(v, channel_last, ops.scale_exponent(e), k)
    else:
        p1 = p2 = backend.xp.zeros((k, nf))
    total = n_local
    if sync:
        total, red = collective.allreduce(
            comm, backend, state, [*p1, *p2], n_local, protocol.PHASE_STATS, None, nf
        )
        p1, p2 = _stack(backend, red, k)
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
    """
    backend, cl = ctx.backend, ctx.fmt.channel_last
    ops = ops_of(backend)
    k = ops.folds_for(ctx.mean.dtype)
    n_local = ctx.x.size // nf if nf else 0
    if n_local:
        ag, ah = ops.backward_bounds(dyv, ctx.x, cl, ctx.mean)
    else:
        ag = ah = None
    eg, eh = _bounds(
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
    invstd = ctx.invstd.astype(np.float64)
    local_dy, local_dxm = ops.finalize_sum(pg, eg), ops.finalize_sum(ph, eh)
    if sync:
        _, red = collective.allreduce(
            ctx.comm, backend, ctx.sync_state, [*pg, *ph], n_local, protocol.PHASE_BACKWARD,
            None, nf,
        )
        pg, ph = _stack(backend, red, k)
        g_dy, g_dxm = ops.finalize_sum(pg, eg), ops.finalize_sum(ph, eh)
    else:
        g_dy, g_dxm = local_dy, local_dxm
    return local_dy, local_dxm * invstd, g_dy, g_dxm * invstd
