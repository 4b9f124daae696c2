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
ident, ..._sq  identity every rank computes without communication: the
               layer's order of construction among the synchronized layers
               of its communicator, and its dtype (see :func:`layer_identity`)
call, ..._sq   number of synchronized passes this layer ran before (mod 4096)
               and its square
evals, ..._sq  number of eval (running-statistics) forwards this layer ran
               (mod 4096): a rank in eval mode while the others train
               shows up at the next synchronized pass
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

import functools
from typing import Any

import numpy as np

from ..comm.mpi import MPICommunicator
from ..errors import CollectiveMismatchError, RemoteInputError

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
    "next_construction_ordinal",
    "layer_identity",
    "fill_header",
    "check_header",
    "header_template",
    "steady_slots",
    "max_header_as_sum",
]

ERROR_KINDS = ("channels", "ndim", "dtype", "device", "shape", "type", "argument", "other")

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
    # last, so the fused CUDA kernels' slot numbers (kernels/fused.cu) stay put
    "ident", "ident_sq", "evals", "evals_sq",
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
    "argument": (
        "an invalid argument (weight, bias or running statistics of the wrong"
        " shape or kind, momentum, epsilon or data_format)"
    ),
    "other": "an invalid input",
}


def next_layer_id(comm: Any) -> int:
    """Id for the next layer that synchronizes over ``comm`` on this rank.

    Ids count the layers in the order of their first synchronized pass, so
    they agree across ranks exactly when the ranks run the same layers in the
    same order (what every rank of a data-parallel job does).
    """
    # Count per process group, not per wrapper object: two Communicator
    # objects over the same group (init() called again, a raw mpi4py comm
    # wrapped per layer) share one sequence. group_key() never repeats for a
    # new group, unlike MPI handles, which MPICH reuses after Free().
    key = _group_key(comm)
    n = _LAYER_COUNTS.get(key, 0) + 1
    _LAYER_COUNTS[key] = n
    return n % CALL_MODULUS


_LAYER_COUNTS: dict = {}
#: ``ident`` values of default layers stay below this; reproducible ones above.
_IDENT_MODULUS = CALL_MODULUS * 4
_CONSTRUCTED: dict = {}
_DTYPE_CODES = {"float32": 1, "float64": 2}


def _group_key(comm: Any) -> Any:
    fn = getattr(comm, "group_key", None)
    if fn is not None:
        return fn()
    if hasattr(comm, "Set_attr"):  # a raw mpi4py communicator (adapters keep those)
        return MPICommunicator(comm).group_key()
    return ("object", id(comm))


def next_construction_ordinal(comm: Any = None) -> int:
    """Order of construction of a synchronized layer on ``comm`` (1, 2, ...).

    Computed on every rank without communication; ranks that build the same
    model build its layers in the same order, so the ordinal names the same
    layer everywhere, whatever order the layers later first synchronize in.
    ``comm=None`` (the default communicator, resolved later) has a sequence
    of its own.
    """
    key = "default" if comm is None else _group_key(comm)
    n = _CONSTRUCTED.get(key, 0) + 1
    _CONSTRUCTED[key] = n
    return n


def layer_identity(ordinal: int, dtype: Any, reproducible: bool = False) -> int:
    """The ``ident`` header value of a layer: construction ordinal, dtype and mode.

    A reproducible layer (``docs/reproducibility.md``) runs other collectives
    than a default one, so the mode is part of its identity: ranks that
    disagree on it raise at the handshake instead of mixing collectives.
    """
    code = _DTYPE_CODES.get(getattr(dtype, "name", str(dtype)), 3)
    return (int(ordinal) % CALL_MODULUS) * 4 + code + (_IDENT_MODULUS if reproducible else 0)


def _header(
    count: int, phase: int, error_kind: str | None, num_features: int, layer: int, call: int,
    ident: int = 0, evals: int = 0, out: np.ndarray | None = None,
) -> np.ndarray:
    """The rank's header, written into ``out`` (a NumPy view) or a new array."""
    tmpl = _template(phase, error_kind, num_features, layer % CALL_MODULUS,
                     ident % (_IDENT_MODULUS * 2), evals % CALL_MODULUS)
    if out is None:
        head = tmpl.copy()
    else:
        head = out
        head[...] = tmpl
    call %= CALL_MODULUS
    head[_COUNT] = count
    head[_CALL] = call
    head[_CALL + 1] = float(call) ** 2
    return head


@functools.lru_cache(maxsize=1024)
def _template(
    phase: int, error_kind: str | None, num_features: int, layer: int, ident: int, evals: int
) -> np.ndarray:
    """The slots of a header that stay fixed over a layer's passes of one phase."""
    head = np.zeros(HEADER, dtype=np.float64)
    head[_I["one"]] = 1.0
    for name, value in (("nf", num_features), ("layer", layer), ("ident", ident),
                        ("evals", evals)):
        head[_I[name]] = value
        head[_I[name + "_sq"]] = float(value) ** 2
    head[_I[f"phase_{phase}"]] = 1.0
    if error_kind is not None:
        head[_I[f"err_{error_kind}"]] = 1.0
    head.flags.writeable = False
    return head


def fill_header(
    buf: Any,
    count: int,
    phase: int,
    error_kind: str | None,
    num_features: int = 0,
    layer: int = 0,
    call: int = 0,
    ident: int = 0,
    evals: int = 0,
) -> None:
    """Write this rank's header into the first :data:`HEADER` slots of ``buf``."""
    if isinstance(buf, np.ndarray):
        _header(count, phase, error_kind, num_features, layer, call, ident, evals, buf[:HEADER])
    else:
        buf[:HEADER].set(_header(count, phase, error_kind, num_features, layer, call, ident,
                                 evals))


_COUNT, _ONE, _CALL = _I["count"], _I["one"], _I["call"]
_PHASE_SLOTS = tuple(_I[f"phase_{i}"] for i in range(len(_PHASE_NAMES)))
_ERR_SLOTS = tuple(_I[f"err_{k}"] for k in ERROR_KINDS)
_SAME_PAIRS = tuple((_I[n], _I[n + "_sq"]) for n in ("nf", "ident", "layer", "evals", "call"))


def header_template(phase: int, num_features: int, layer: int, ident: int,
                    evals: int) -> np.ndarray:
    """The fixed slots of an error-free header (read-only; see :func:`fill_header`).

    A steady-state pass writes it, then its count and call (:func:`steady_slots`).
    """
    return _template(phase, None, num_features, layer % CALL_MODULUS,
                     ident % (_IDENT_MODULUS * 2), evals % CALL_MODULUS)


@functools.lru_cache(maxsize=8)
def steady_slots(phase: int) -> np.ndarray:
    """Slot numbers for the compiled header fill and check of a steady-state pass.

    ``[HEADER, one, phase, count, call, n_err, err..., n_pairs, (s, s_sq)...]``
    (int64): what :func:`fill_header` writes per pass and what
    :func:`_in_step` tests, for the numba backend's ``_pack``/``_in_step``.
    """
    out = [HEADER, _ONE, _PHASE_SLOTS[phase], _COUNT, _CALL, len(_ERR_SLOTS), *_ERR_SLOTS,
           len(_SAME_PAIRS)]
    for i, j in _SAME_PAIRS:
        out += [i, j]
    a = np.array(out, dtype=np.int64)
    a.flags.writeable = False
    return a


def _in_step(h: list, phase: int, size: int) -> bool:
    """True for the reduced header of a pass every rank ran alike, without errors.

    The same verdict as :func:`check_header`'s tests, on a list of floats:
    what a steady-state pass pays for its check.
    """
    if h[_ONE] != size or h[_PHASE_SLOTS[phase]] != size:
        return False
    for i in _ERR_SLOTS:
        if h[i]:
            return False
    for i, j in _SAME_PAIRS:
        if h[j] * size != h[i] * h[i]:
            return False
    return True


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
    return None


def _identity_mismatch(head: np.ndarray, size: int) -> str | None:
    """Why the ranks' layers, counts or modes differ, or None."""
    if not _same(head, "nf", size):
        return (
            f"num_features differs across ranks (mean over ranks {head[_I['nf']] / size:g});"
            " every rank must build the layer with the same num_features"
        )
    if not _same(head, "ident", size):
        return (
            "the ranks ran passes of different layers (a layer is identified by its"
            " order of construction among the synchronized layers of its"
            " communicator, and its dtype: every rank must build the same layers in"
            " the same order, and run them in the same order)"
        )
    if not _same(head, "layer", size):
        return "the ranks ran passes of different layers"
    if not _same(head, "evals", size):
        return (
            "the ranks ran a different number of eval-mode forwards of this layer"
            " (one rank in eval mode while the others train?). If only some ranks"
            " evaluate on purpose (e.g. rank 0 validates), run that evaluation"
            " inside `with cupysyncbn.local_eval():`"
        )
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
    if own_error is None and _in_step(head.tolist(), phase, size):
        return int(head[_COUNT])
    why = _mismatch(head, phase, size)
    bad = [
        (k, int(head[_I[f"err_{k}"]])) for k in ERROR_KINDS if head[_I[f"err_{k}"]]
    ]
    if why is None and not bad:
        # A faulty rank may not know its layer's num_features or identity; its
        # error, not the resulting disagreement, is what every rank reports.
        why = _identity_mismatch(head, size)
    if why is not None:
        raise CollectiveMismatchError(
            f"SyncBatchNorm: ranks are out of step: {why}. Every rank must call"
            " forward/backward of the same layers, in the same order, the same"
            " number of times, in the same mode (train/eval)."
        ) from own_error
    if own_error is not None:
        raise own_error
    if bad:
        what = "; ".join(f"{n} rank(s) passed {_ERROR_TEXT[k]}" for k, n in bad)
        raise RemoteInputError(
            f"SyncBatchNorm: {what}. This rank's input was valid; see the error"
            " raised on the faulty rank(s)."
        )
    return int(head[_I["count"]])


def max_header_as_sum(hi: np.ndarray, lo: np.ndarray, size: int) -> np.ndarray:
    """The header a SUM would have given, from a MAX all-reduce of ``[h, -h]``.

    ``hi = max(h)`` and ``lo = -max(-h) = min(h)`` over the ranks, per slot.
    A slot every rank sent alike has ``hi == lo`` and becomes ``size * hi``
    (its square slot ``size * hi**2``); one that differs gets the sums of a
    group with half the ranks at ``hi`` and half at ``lo``, which fails the
    ``size * sum(v^2) == sum(v)^2`` test exactly when ``hi != lo``. Error
    slots keep ``hi`` (some rank failed; how many is not known). The result
    goes to :func:`check_header`, so a MAX pass raises the same errors.
    """
    head = (hi + lo) * (size / 2.0)
    for i, j in _SAME_PAIRS:
        head[j] = (hi[i] * hi[i] + lo[i] * lo[i]) * (size / 2.0)
    for i in _ERR_SLOTS:
        head[i] = hi[i]
    head[_COUNT] = hi[_COUNT]
    return head


def handshake(
    comm: Any, num_features: int, make_buffer: Any, to_host: Any, layer: int = 0,
    ident: int = 0, evals: int = 0, error: tuple | None = None,
) -> None:
    """Check that every rank of ``comm`` has the same ``num_features`` and layer.

    Uses one fixed-size (header-only) all-reduce, so ranks that disagree on
    ``num_features`` cannot deadlock: they all see ``size * sum(C^2) != sum(C)^2``
    and raise the same error. A rank with invalid input passes
    ``error=(kind, exception)``: it takes part, then raises its exception, and
    the others raise :class:`RemoteInputError`.

    Raises
    ------
    CollectiveMismatchError
        On every rank, when the ranks' ``num_features``, layer identity or
        layer order differ.
    """
    kind, exc = error if error is not None else (None, None)
    head = _header(0, PHASE_HANDSHAKE, kind, num_features, layer, 0, ident, evals)
    buf = comm.allreduce_sum(make_buffer(head))
    check_header(to_host(buf), PHASE_HANDSHAKE, comm.size, exc)
