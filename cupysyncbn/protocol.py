"""What travels in the one all-reduce of each pass, and how ranks agree on errors.

Every synchronized pass of a layer packs one float64 buffer of the SAME size,
``HEADER + 2 * C`` slots (the mean pass of the first forward, the statistics
pass and the backward all send two C-sized vectors), so two ranks that run
different passes of a layer still reduce buffers of one size and the header
tells them apart instead of MPI/NCCL summing mismatched buffers::

    [ HEADER | payload vector 1 (C) | payload vector 2 (C) ]

HEADER slots (summed over ranks):

=============  ==============================================================
count          local number of elements per channel (batch x spatial)
one            1 from every rank: the number of ranks that took part
nf, nf_sq      ``num_features`` and its square
layer, ..._sq  id of the layer (its order of first synchronization on this
               communicator) and its square
call, ..._sq   number of synchronized passes this layer ran before (mod 4096)
               and its square
phase_*        1 in the slot of the pass this rank runs (handshake, forward
               mean pass, forward statistics, backward), 0 elsewhere
err_*          1 where this rank's input was invalid, by kind of fault
=============  ==============================================================

Equality of a per-rank integer ``v`` over ``size`` ranks is tested exactly as
``size * sum(v^2) == sum(v)^2`` (Cauchy-Schwarz: equal iff every ``v`` is the
same); all values stay far below 2**53, so the float64 sums are exact.

A rank whose input is invalid still takes part in the collective (with a zero
payload and its error slot set) and only then raises, so the other ranks raise
:class:`~cupysyncbn.errors.RemoteInputError` instead of hanging.

Buffers of different sizes cannot be reduced together, so a layer's first
synchronized pass is preceded by a fixed-size *handshake* (a header-only
buffer) that checks every rank has the same ``num_features`` and assigns the
layer its id.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .errors import CollectiveMismatchError, RemoteInputError

__all__ = [
    "HEADER",
    "PHASE_HANDSHAKE",
    "PHASE_MEAN",
    "PHASE_STATS",
    "PHASE_BACKWARD",
    "ERROR_KINDS",
    "CALL_MODULUS",
    "handshake",
    "next_layer_id",
    "fill_header",
    "check_header",
]

ERROR_KINDS = ("channels", "ndim", "dtype", "device", "shape", "type", "other")

PHASE_HANDSHAKE = 0  # a layer's first synchronized pass: num_features check
PHASE_MEAN = 1  # first pass of the two-pass (shift-finding) forward
PHASE_STATS = 2  # forward statistics (shifted sums)
PHASE_BACKWARD = 3  # backward sums

_PHASE_NAMES = ("handshake", "forward (mean pass)", "forward", "backward")

#: Pass counters and layer ids are sent modulo this (keeps squares exact).
CALL_MODULUS = 4096

_SLOTS = (
    "count", "one", "nf", "nf_sq", "layer", "layer_sq", "call", "call_sq",
    *(f"phase_{i}" for i in range(len(_PHASE_NAMES))),
    *(f"err_{k}" for k in ERROR_KINDS),
)
_I = {name: i for i, name in enumerate(_SLOTS)}
HEADER = len(_SLOTS)

_ERROR_TEXT = {
    "channels": "an input whose channel count differs from num_features",
    "ndim": "an input whose number of dimensions does not match data_format",
    "dtype": "an input with a non-floating dtype",
    "device": "an input on another device than the layer's parameters",
    "shape": "a dy whose shape or dtype differs from the forward input",
    "type": "an input that is not an array of the layer's array library",
    "other": "an invalid input",
}


def next_layer_id(comm: Any) -> int:
    """Id for the next layer that synchronizes over ``comm`` on this rank.

    Ids count the layers in the order of their first synchronized pass, so
    they agree across ranks exactly when the ranks run the same layers in the
    same order (what every rank of a data-parallel job does).
    """
    # Count per process group, not per wrapper object: two Communicator
    # objects over the same MPI communicator (init() called again, a raw
    # mpi4py comm wrapped per layer) must share one sequence. Other
    # communicators keep their count on themselves (an id() key could be
    # reused by a later object).
    mpi_comm = getattr(comm, "mpi_comm", None)
    key = None
    if mpi_comm is not None:
        try:
            key = mpi_comm.py2f()
        except Exception:  # pragma: no cover - MPI without Fortran handles
            key = None
    if key is not None:
        n = _MPI_LAYER_COUNTS.get(key, 0) + 1
        _MPI_LAYER_COUNTS[key] = n
    else:
        n = getattr(comm, "_cupysyncbn_layers", 0) + 1
        try:
            comm._cupysyncbn_layers = n
        except AttributeError:  # pragma: no cover - communicators with __slots__
            pass
    return n % CALL_MODULUS


_MPI_LAYER_COUNTS: dict = {}


def _header(
    count: int, phase: int, error_kind: str | None, num_features: int, layer: int, call: int
) -> np.ndarray:
    head = np.zeros(HEADER, dtype=np.float64)
    head[_I["count"]] = count
    head[_I["one"]] = 1.0
    head[_I["nf"]] = num_features
    head[_I["nf_sq"]] = float(num_features) ** 2
    layer %= CALL_MODULUS
    call %= CALL_MODULUS
    head[_I["layer"]] = layer
    head[_I["layer_sq"]] = float(layer) ** 2
    head[_I["call"]] = call
    head[_I["call_sq"]] = float(call) ** 2
    head[_I[f"phase_{phase}"]] = 1.0
    if error_kind is not None:
        head[_I[f"err_{error_kind}"]] = 1.0
    return head


def fill_header(
    buf: Any,
    count: int,
    phase: int,
    error_kind: str | None,
    num_features: int = 0,
    layer: int = 0,
    call: int = 0,
) -> None:
    """Write this rank's header into the first :data:`HEADER` slots of ``buf``."""
    head = _header(count, phase, error_kind, num_features, layer, call)
    if isinstance(buf, np.ndarray):
        buf[:HEADER] = head
    else:
        buf[:HEADER].set(head)


def _same(head: np.ndarray, name: str, size: int) -> bool:
    s, sq = head[_I[name]], head[_I[name + "_sq"]]
    return bool(sq * size == s * s)


def _mismatch(head: np.ndarray, phase: int, size: int) -> str | None:
    """Why the reduced header shows ranks out of step, or None."""
    if head[_I["one"]] != size:
        return (
            f"the header sums to {head[_I['one']]:g} ranks instead of {size}: ranks"
            " exchanged buffers of different sizes (different layers, or a"
            " layer's first pass on some ranks only)"
        )
    if head[_I[f"phase_{phase}"]] != size:
        ran = ", ".join(
            f"{_PHASE_NAMES[i]} on {int(head[_I[f'phase_{i}']])}"
            for i in range(len(_PHASE_NAMES))
            if head[_I[f"phase_{i}"]]
        )
        return (
            f"this rank ran the {_PHASE_NAMES[phase]} pass but the group ran: {ran}"
            " rank(s)"
        )
    if not _same(head, "nf", size):
        return (
            f"num_features differs across ranks (mean over ranks {head[_I['nf']] / size:g});"
            " every rank must build the layer with the same num_features"
        )
    if not _same(head, "layer", size):
        return "the ranks ran passes of different layers"
    if not _same(head, "call", size):
        return (
            "the ranks called this layer a different number of times (e.g. an extra"
            " forward on some ranks)"
        )
    return None


def check_header(
    head: np.ndarray,
    phase: int,
    size: int,
    own_error: BaseException | None,
) -> int:
    """Validate a reduced header (host copy); return the global count.

    Raises
    ------
    CollectiveMismatchError
        On every rank, when ranks ran different passes or layers, disagree on
        ``num_features`` or on how often they called the layer (raised from
        this rank's own input error, if it had one).
    BaseException
        ``own_error`` when this rank's input was the invalid one.
    RemoteInputError
        When another rank's input was invalid.
    """
    why = _mismatch(head, phase, size)
    if why is not None:
        raise CollectiveMismatchError(
            f"SyncBatchNorm: ranks are out of step: {why}. Every rank must call"
            " forward/backward of the same layers, in the same order, the same"
            " number of times, in the same mode (train/eval)."
        ) from own_error
    if own_error is not None:
        raise own_error
    bad = [
        (k, int(head[_I[f"err_{k}"]])) for k in ERROR_KINDS if head[_I[f"err_{k}"]]
    ]
    if bad:
        what = "; ".join(f"{n} rank(s) passed {_ERROR_TEXT[k]}" for k, n in bad)
        raise RemoteInputError(
            f"SyncBatchNorm: {what}. This rank's input was valid; see the error"
            " raised on the faulty rank(s)."
        )
    return int(head[_I["count"]])


def handshake(
    comm: Any, num_features: int, make_buffer: Any, to_host: Any, layer: int = 0
) -> None:
    """Check that every rank of ``comm`` has the same ``num_features`` and layer id.

    Uses one fixed-size (header-only) all-reduce, so ranks that disagree on
    ``num_features`` cannot deadlock: they all see ``size * sum(C^2) != sum(C)^2``
    and raise the same error.

    Raises
    ------
    CollectiveMismatchError
        On every rank, when the ranks' ``num_features`` or layer order differ.
    """
    buf = make_buffer(_header(0, PHASE_HANDSHAKE, None, num_features, layer, 0))
    buf = comm.allreduce_sum(buf)
    check_header(to_host(buf), PHASE_HANDSHAKE, comm.size, None)
