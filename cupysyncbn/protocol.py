"""What travels in the one all-reduce of each pass, and how ranks agree on errors.

Every synchronized pass packs one float64 buffer::

    [ HEADER (8 slots) | payload (C or 2C slots) ]

HEADER slots (summed over ranks):

==========  ===============================================================
COUNT       local number of elements per channel (batch x spatial)
PHASE       code of the pass (forward statistics, backward...), to detect
            ranks that are not running the same pass
ONE         1 from every rank: the number of ranks that took part
E_*         1 where this rank's input was invalid, by kind of fault
==========  ===============================================================

A rank whose input is invalid still takes part in the collective (with a zero
payload and its error slot set) and only then raises, so the other ranks raise
:class:`~cupysyncbn.errors.RemoteInputError` instead of hanging.

Buffers of different sizes cannot be reduced together, so a layer's first
synchronized pass is preceded by a fixed-size *handshake* that checks every
rank has the same ``num_features`` (``sum(C) * size == ...`` tests).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .errors import CollectiveMismatchError, RemoteInputError

__all__ = [
    "HEADER",
    "PHASE_MEAN",
    "PHASE_STATS",
    "PHASE_BACKWARD",
    "ERROR_KINDS",
    "handshake",
    "fill_header",
    "check_header",
]

COUNT, PHASE, ONE = 0, 1, 2
ERROR_KINDS = ("channels", "ndim", "dtype", "device", "shape", "other")
_E0 = 3
HEADER = _E0 + len(ERROR_KINDS)

PHASE_MEAN = 1  # first pass of the two-pass (shift-finding) forward
PHASE_STATS = 2  # forward statistics (shifted sums)
PHASE_BACKWARD = 3  # backward sums
PHASE_HANDSHAKE = 4

_PHASE_NAMES = {
    PHASE_MEAN: "forward (mean pass)",
    PHASE_STATS: "forward",
    PHASE_BACKWARD: "backward",
    PHASE_HANDSHAKE: "handshake",
}

_ERROR_TEXT = {
    "channels": "an input whose channel count differs from num_features",
    "ndim": "an input whose number of dimensions does not match data_format",
    "dtype": "an input with a non-floating dtype",
    "device": "an input on another device than the layer's parameters",
    "shape": "a dy whose shape or dtype differs from the forward input",
    "other": "an invalid input",
}


def fill_header(buf: Any, count: int, phase: int, error_kind: str | None) -> None:
    """Write this rank's header into the first :data:`HEADER` slots of ``buf``."""
    head = np.zeros(HEADER, dtype=np.float64)
    head[COUNT] = count
    head[PHASE] = phase
    head[ONE] = 1.0
    if error_kind is not None:
        head[_E0 + ERROR_KINDS.index(error_kind)] = 1.0
    if isinstance(buf, np.ndarray):
        buf[:HEADER] = head
    else:
        buf[:HEADER].set(head)


def check_header(head: np.ndarray, phase: int, size: int, own_error: BaseException | None) -> int:
    """Validate a reduced header (host copy); return the global count.

    Raises
    ------
    BaseException
        ``own_error`` when this rank's input was the invalid one.
    RemoteInputError
        When another rank's input was invalid.
    CollectiveMismatchError
        When ranks ran different passes.
    """
    if head[ONE] != size or head[PHASE] != phase * size:
        raise CollectiveMismatchError(
            f"ranks are out of step: this rank ran the {_PHASE_NAMES.get(phase)} pass"
            f" but the group's header sums to phase={head[PHASE]:g} over"
            f" {head[ONE]:g} ranks (expected {phase * size} over {size}); every rank"
            " must call forward/backward of the same layers in the same order"
        )
    if own_error is not None:
        raise own_error
    bad = [(k, int(head[_E0 + i])) for i, k in enumerate(ERROR_KINDS) if head[_E0 + i]]
    if bad:
        what = "; ".join(f"{n} rank(s) passed {_ERROR_TEXT[k]}" for k, n in bad)
        raise RemoteInputError(
            f"SyncBatchNorm: {what}. This rank's input was valid; see the error"
            " raised on the faulty rank(s)."
        )
    return int(head[COUNT])


def handshake(comm: Any, num_features: int, make_buffer: Any, to_host: Any) -> None:
    """Check that every rank of ``comm`` has the same ``num_features``.

    Uses one fixed-size all-reduce, so ranks that disagree cannot deadlock:
    they all see ``size * sum(C^2) != sum(C)^2`` and raise the same error.

    Raises
    ------
    CollectiveMismatchError
        On every rank, when the ranks' ``num_features`` differ.
    """
    host = np.array([1.0, num_features, float(num_features) ** 2, PHASE_HANDSHAKE])
    buf = make_buffer(host)
    buf = comm.allreduce_sum(buf)
    s = to_host(buf)
    size = comm.size
    if s[0] != size or s[3] != PHASE_HANDSHAKE * size:
        raise CollectiveMismatchError(
            "ranks are out of step at a layer's first synchronized pass: every rank"
            " must call the same layers in the same order"
        )
    if s[2] * size != s[1] * s[1]:
        raise CollectiveMismatchError(
            "SyncBatchNorm: num_features differs across ranks (mean over ranks"
            f" {s[1] / size:g}, this rank {num_features}); every rank must build the"
            " layer with the same num_features"
        )
