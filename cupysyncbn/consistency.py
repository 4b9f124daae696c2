"""Cheap checks that every rank holds the same model state.

Synchronized batch norm keeps running statistics bitwise identical on every
rank; a bug elsewhere (a rank that skipped an update, a checkpoint loaded on
one rank only, non-averaged gradients) silently breaks that.
:func:`check_consistency` finds it with one small all-reduce of hashes (a
second one, only on a mismatch, names the entries that differ).
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from typing import Any

import numpy as np

from .arrays.devices import to_host
from .arrays.dlpack import is_native, to_native
from .comm.select import as_communicator
from .errors import StateMismatchError
from .nn.layer import Layer

__all__ = ["state_digest", "check_consistency", "StateMismatchError", "allreduce_host"]

_CHUNKS = 4  # 16-bit chunks of a 64-bit hash: squares stay exact in float64


def allreduce_host(comm: Any, host: np.ndarray) -> np.ndarray:
    """Sum a small host float64 vector over ``comm`` (:meth:`Communicator.allreduce_host`)."""
    return comm.allreduce_host(host)


def _host(value: Any) -> np.ndarray:
    """A host NumPy copy or view of a NumPy, CuPy or DLPack (PyTorch, ...) array."""
    if not is_native(value) and hasattr(value, "__dlpack__"):
        value = to_native(value, "state entry")
    return to_host(value)


def _entries(obj: Any, buffers_only: bool) -> OrderedDict:
    if isinstance(obj, Layer):
        out = OrderedDict()
        for key, layer, attr, is_param in obj._named_state():
            if buffers_only and is_param:
                continue
            value = getattr(layer, attr)
            out[key] = _host(value.data if is_param else value)
        return out
    if not hasattr(obj, "items") and callable(getattr(obj, "state_dict", None)):
        # A framework module (torch.nn.Module, paddle.nn.Layer): its own state dict.
        named_buffers = getattr(obj, "named_buffers", None)
        obj = dict(named_buffers()) if buffers_only and callable(named_buffers) else (
            obj.state_dict()
        )
    if not hasattr(obj, "items"):
        raise TypeError(f"expected a Layer, a module or a state dict; got {type(obj).__name__}")
    return OrderedDict((str(k), _host(v)) for k, v in obj.items())


def _hash(*parts: bytes) -> bytes:
    h = hashlib.sha256()
    for p in parts:
        h.update(len(p).to_bytes(8, "little"))
        h.update(p)
    return h.digest()


def _entry_hashes(entries: OrderedDict) -> tuple[bytes, bytes, list[bytes]]:
    struct, content, per = [], [], []
    for key, value in entries.items():
        a = np.asarray(value)
        a = a if a.flags.c_contiguous else a.copy(order="C")
        meta = f"{key}|{a.dtype.str}|{a.shape}".encode()
        struct.append(meta)
        h = _hash(meta, a.tobytes())
        per.append(h)
        content.append(h)
    return _hash(*struct), _hash(*content), per


def state_digest(obj: Any, buffers_only: bool = False) -> str:
    """SHA-256 (hex) of a layer's or state dict's names, dtypes, shapes and bytes.

    Equal digests mean bitwise-equal state. Local (no communication).

    Parameters
    ----------
    obj : Layer, framework module or dict of str to array
        What to hash: a cupysyncbn layer, a ``torch.nn.Module`` (its
        ``state_dict()``), or a state dict of NumPy, CuPy or DLPack arrays
        (PyTorch tensors, CPU or CUDA).
    buffers_only : bool
        For a layer or module: hash only the buffers (running statistics),
        not the parameters.
    """
    return _hash(*_entry_hashes(_entries(obj, buffers_only))[2]).hex()


def _slots(h: bytes) -> list[float]:
    vals = [int.from_bytes(h[2 * i : 2 * i + 2], "little") for i in range(_CHUNKS)]
    return [float(v) for v in vals] + [float(v) ** 2 for v in vals]


def _differs(sums: np.ndarray, size: int) -> bool:
    s, sq = sums[:_CHUNKS], sums[_CHUNKS:]
    return bool(np.any(sq * size != s * s))  # equal iff every rank sent the same


def check_consistency(
    obj: Any, comm: Any = None, *, buffers_only: bool = False, raise_on_mismatch: bool = True
) -> list[str]:
    """Check that every rank of ``comm`` holds bitwise-identical state.

    Collective: every rank must call it. Costs one all-reduce of 19 floats
    (plus one of ``8 * entries`` floats when something differs, to name it).

    Parameters
    ----------
    obj : Layer, framework module or dict of str to array
        A model (parameters and buffers) or a state dict, as for
        :func:`state_digest`.
    comm : Communicator, mpi4py.MPI.Comm, torch.distributed.ProcessGroup or None
        Group (None: the default communicator). Only its
        :meth:`~cupysyncbn.comm.base.Communicator.allreduce_host` is used.
    buffers_only : bool
        For a layer or module: compare only the buffers (running
        statistics); use it when parameters are legitimately rank-local.
    raise_on_mismatch : bool
        Raise :class:`StateMismatchError` (on every rank) instead of
        returning the differing names.

    Returns
    -------
    list of str
        Names of the entries that differ across ranks (empty: consistent).

    Raises
    ------
    StateMismatchError
        With ``raise_on_mismatch``, when the state differs, naming the
        entries (or saying that the names/shapes/dtypes themselves differ).
    """
    comm_ = as_communicator(comm)
    entries = _entries(obj, buffers_only)
    struct, content, per = _entry_hashes(entries)
    n = float(len(entries))
    head = np.array([1.0, n, n * n, *_slots(struct), *_slots(content)])
    s = allreduce_host(comm_, head)
    size = comm_.size
    w = 2 * _CHUNKS
    if s[1] * s[1] != size * s[2] or _differs(s[3 : 3 + w], size):
        names = ["<structure: entry names, shapes or dtypes differ across ranks>"]
    elif _differs(s[3 + w :], size):
        per_slots = np.array([v for h in per for v in _slots(h)])
        sums = allreduce_host(comm_, per_slots)
        names = [k for i, k in enumerate(entries) if _differs(sums[i * w : (i + 1) * w], size)]
    else:
        names = []
    if names and raise_on_mismatch:
        raise StateMismatchError(
            f"state differs across the {size} ranks: {', '.join(names)}"
        )
    return names
