"""The collectives of a pass: the packed all-reduce, the handshake, and failing together.

Every collective a synchronized pass runs goes through here:

* :func:`allreduce`: header + payload vectors packed into one float64 buffer,
  one ``comm.allreduce_sum``, the reduced header checked;
* :func:`handshake`: a layer's first synchronized pass (``num_features``,
  layer id and identity agreed);
* :func:`forward_invalid`, :func:`backward_invalid`, :func:`fail_collectively`:
  a rank whose arguments failed still joins the collective its peers are in,
  with an error slot set, then raises; so every rank raises and none waits.
"""

from __future__ import annotations

import contextlib
from typing import Any

import numpy as np

from ..backends import NUMPY_BACKEND, Backend
from ..comm.base import Communicator
from ..errors import CollectiveMismatchError
from . import protocol
from .device_status import strict_sync
from .state import SyncState, workspace

__all__ = [
    "allreduce", "handshake", "forward_invalid", "backward_invalid", "fail_collectively",
    "fallback_backend", "remember_own_error", "allreduce_max",
]

_F64 = np.dtype(np.float64)


def allreduce(
    comm: Communicator,
    backend: Backend,
    state: SyncState | None,
    payload: list,
    count: int,
    phase: int,
    error: tuple | None,
    num_features: int,
) -> tuple[int, list]:
    """Pack header + payload vectors, all-reduce once, check; the reduced vectors (views)."""
    c = num_features
    size = protocol.HEADER + c * len(payload)
    buf = state.buffer(backend, size) if state is not None else backend.xp.empty(size, _F64)
    kind, exc = error if error is not None else (None, None)
    layer, call, ident, evals = (0, 0, 0, 0) if state is None else state.next_ids()
    protocol.fill_header(buf, count, phase, kind, c, layer, call, ident, evals)
    for i, vec in enumerate(payload):
        seg = buf[protocol.HEADER + i * c : protocol.HEADER + (i + 1) * c]
        if vec is None:
            seg[...] = 0
        else:
            seg[...] = vec
    buf = comm.allreduce_sum(buf)
    head = backend.to_host(buf[: protocol.HEADER])
    total = protocol.check_header(head, phase, comm.size, exc)
    # Views of the reduced buffer: every caller consumes them before the
    # layer's next pass reuses it.
    h = protocol.HEADER
    out = [buf[h + i * c : h + (i + 1) * c] for i in range(len(payload))]
    return total, out


#: C-sized vectors of every bound pass (the forward's per-sample path sends three).
MAX_VECTORS = 3


def allreduce_max(
    comm: Communicator,
    backend: Backend,
    state: SyncState | None,
    payload: list,
    tag: int,
    phase: int,
    error: tuple | None,
    num_features: int,
    spatial: int = 0,
) -> tuple[list, bool]:
    """The reproducible mode's bound pass: header and C-sized vectors, one MAX all-reduce.

    The buffer is ``[h | -h | v1 | v2 | v3 | tag | -tag | S | -S]``
    (``2 * HEADER + 3 * C + 4`` slots for every such pass, whatever the
    payload: a failing rank joins with the same size): after the MAX,
    ``max(h)`` and ``-max(-h)`` differ in a slot exactly when the ranks sent
    different values there, so ranks in different passes, layers or modes
    are told apart as by the SUM passes (:func:`protocol.max_header_as_sum`).
    ``tag`` (the number of folds, from the compute dtype) must agree too: it
    fixes the size of the SUM pass that follows. ``spatial`` (the sample
    size ``S``) may differ: the second value returned says whether it
    agreed. Missing or ``None`` payload vectors lose every MAX. Returns the
    reduced vectors (views) and that flag.
    """
    c, h = num_features, protocol.HEADER
    size = 2 * h + MAX_VECTORS * c + 4
    buf = state.buffer(backend, size) if state is not None else backend.xp.empty(size, _F64)
    kind, exc = error if error is not None else (None, None)
    layer, call, ident, evals = (0, 0, 0, 0) if state is None else state.next_ids()
    protocol.fill_header(buf, 0, phase, kind, c, layer, call, ident, evals)
    buf[h : 2 * h] = -buf[:h]
    for i in range(MAX_VECTORS):
        vec = payload[i] if i < len(payload) else None
        seg = buf[2 * h + i * c : 2 * h + (i + 1) * c]
        seg[...] = -np.inf if vec is None else vec
    buf[-4] = tag
    buf[-3] = -tag
    buf[-2] = spatial
    buf[-1] = -spatial
    buf = comm.allreduce_max(buf)
    head = backend.to_host(buf[: 2 * h])
    protocol.check_header(
        protocol.max_header_as_sum(head[:h], -head[h:], comm.size), phase, comm.size, exc
    )
    tags = backend.to_host(buf[-4:])
    if tags[0] != -tags[1]:
        raise CollectiveMismatchError(
            "SyncBatchNorm(reproducible=True): the ranks computed in different precisions"
            " (a float64 input or layer on some ranks, float32 on others); every rank"
            " must pass inputs of the same dtype to a reproducible layer"
        )
    vecs = [buf[2 * h + i * c : 2 * h + (i + 1) * c] for i in range(len(payload))]
    return vecs, bool(tags[2] == -tags[3])


def handshake(
    comm: Communicator, backend: Backend, state: SyncState | None, nf: int | None,
    param_dtype: Any = None, error: tuple | None = None,
) -> None:
    """The layer's first synchronized pass (every pass without a state)."""
    if state is not None and state.handshake_done:
        return
    layer = protocol.next_layer_id(comm) if state is not None else 0
    ident = evals = 0
    if state is not None:
        ident = protocol.layer_identity(state.ordinal, param_dtype, bool(state.reproducible))
        evals = state.evals
    protocol.handshake(
        comm, nf or 0, lambda h: backend.asarray(h), backend.to_host, layer,
        ident, evals, error,
    )
    if state is not None:
        state.layer_id = layer
        state.ident = ident
        state.num_features = nf
        state.handshake_done = True


def fallback_backend(comm: Any, state: SyncState | None) -> Backend:
    """Backend to join a collective with when no argument is an array.

    The layer's previous buffers tell where its collectives run; otherwise
    an NCCL communicator reduces CuPy buffers and every other one NumPy's.
    """
    names = state.buffer_libraries() if state is not None else set()
    if "cupy" in names or (not names and getattr(comm, "backend", "") == "nccl"):
        return _cupy_backend()
    return NUMPY_BACKEND


def _cupy_backend() -> Backend:
    from ..backends.cupy.backend import get_cupy_backend  # imports CuPy: GPU jobs only

    return get_cupy_backend()


def remember_own_error(
    state: SyncState | None, backend: Any, comm: Any, nf: int, exc: BaseException
) -> None:
    """Make the faulty rank raise its own input error again at its next pass.

    On the fused path its peers learn of the error only at their next pass of
    the layer (the deferred verdict) and leave that pass without a
    collective; so must it.
    """
    if state is None or not getattr(backend, "fused", False) or strict_sync(comm):
        return
    workspace(state, backend, nf).status.reraise = exc


def forward_invalid(
    comm: Communicator, backend: Backend, state: SyncState | None, nf: int | None,
    error: tuple,
) -> None:
    """Take part in the peers' forward collectives with a zero payload, then raise.

    The peers run the handshake first unless the layer's state has done it,
    so a rank that does not know the channel count (``x`` not an array, no
    parameters) still joins the right collective.
    """
    if state is None or not state.handshake_done:
        handshake(comm, backend, state, nf, None, error)
    else:
        nf = state.num_features
        assert nf is not None  # fixed by the handshake
        remember_own_error(state, backend, comm, nf, error[1])
        if state.reproducible:  # the peers' first collective: the bound pass
            allreduce_max(comm, backend, state, [], 0, protocol.PHASE_STATS, error, nf)
        if state.shift is None or state.shift.shape[0] != nf:
            # the peers run the two-pass path: a mean pass first
            allreduce(comm, backend, state, [None, None], 0, protocol.PHASE_MEAN, error, nf)
        allreduce(comm, backend, state, [None, None], 0, protocol.PHASE_STATS, error, nf)
    raise error[1]  # pragma: no cover - the collective raised already


def backward_invalid(
    comm: Communicator, backend: Backend, state: SyncState | None, nf: int, error: tuple,
    device: Any = None, remember: bool = True,
) -> None:
    """Take part in the peers' backward collective with a zero payload, then raise.

    ``device``: a CuPy device to allocate the buffer on (a layer whose
    backward has no input array to take it from). ``remember``: raise the
    error again at the layer's next fused pass (see :func:`remember_own_error`).
    """
    if remember:
        remember_own_error(state, backend, comm, nf, error[1])
    with device if hasattr(device, "__enter__") else contextlib.nullcontext():
        if state is not None and state.reproducible:  # the peers' bound pass
            allreduce_max(comm, backend, state, [], 0, protocol.PHASE_BACKWARD, error, nf)
        allreduce(comm, backend, state, [None, None], 0, protocol.PHASE_BACKWARD, error, nf)
    raise error[1]  # pragma: no cover - the collective raised already


def fail_collectively(
    error: BaseException, kind: str, comm: Communicator, sync_state: SyncState | None,
    num_features: int | None, backend: str | None,
) -> None:
    """Join the training forward the other ranks are in, then raise ``error``.

    See :func:`cupysyncbn.functional.fail_collectively` (the public entry).
    """
    if comm.synchronizes:
        if backend == "cupy":
            be = _cupy_backend()
        elif backend == "numpy":
            be = NUMPY_BACKEND
        else:
            be = fallback_backend(comm, sync_state)
        forward_invalid(comm, be, sync_state, num_features, (kind, error))
    raise error
