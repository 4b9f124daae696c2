"""Checkpoints: ``save``/``load`` of state dicts as NumPy ``.npz`` (never pickle).

Writes are atomic: the archive is written to a temporary file in the target
folder, flushed to disk, then renamed over the target, so a crash mid-write
leaves the previous checkpoint intact.
"""

from __future__ import annotations

import os
import tempfile
import zipfile
from collections import OrderedDict
from typing import Any

import numpy as np

from .layer import _to_host

__all__ = ["save", "load"]


def save(state_dict: dict, path: str | os.PathLike, comm: Any = None) -> None:
    """Write ``state_dict`` to ``path`` as an ``.npz`` archive, atomically.

    Parameters
    ----------
    state_dict : dict of str to array
        NumPy or CuPy arrays (copied to the host), e.g. ``layer.state_dict()``.
    path : str or path-like
        Target file; written as given (no ``.npz`` suffix is appended).
    comm : Communicator, mpi4py.MPI.Comm, optional
        When given, only rank 0 of the group writes, and every rank returns
        after the file is in place (the call is collective).

    Raises
    ------
    TypeError
        For values that are not numeric arrays (object arrays are refused).
    """
    arrays = OrderedDict()
    for key, value in state_dict.items():
        if not isinstance(key, str):
            raise TypeError(f"state_dict keys must be str; got {key!r}")
        host = np.asarray(_to_host(value))
        if host.dtype.kind not in "biuf":
            raise TypeError(
                f"state_dict[{key!r}] has dtype {host.dtype}; only numeric arrays are saved"
            )
        arrays[key] = host
    comm_ = None
    if comm is not None:
        from .comm import as_communicator

        comm_ = as_communicator(comm)
    if comm_ is None or comm_.rank == 0:
        _atomic_write(arrays, os.fspath(path))
    if comm_ is not None and comm_.size > 1:
        _barrier(comm_)


def _barrier(comm: Any) -> None:
    # The communicator contract is an all-reduce; one tiny sum is a barrier.
    comm.allreduce_sum(np.zeros(1, dtype=np.float64))


def _atomic_write(arrays: dict, path: str) -> None:
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".npz", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def load(path: str | os.PathLike) -> OrderedDict:
    """Read a state dict written by :func:`save` (NumPy arrays).

    Raises
    ------
    FileNotFoundError
        If ``path`` does not exist.
    ValueError
        If the file is truncated, corrupt, not an ``.npz`` archive, or holds
        object arrays (which would need pickle; they are refused).
    """
    p = os.fspath(path)
    try:
        with np.load(p, allow_pickle=False) as z:
            out = OrderedDict()
            for key in z.files:
                out[key] = z[key]
            return out
    except FileNotFoundError:
        raise
    except ValueError as e:
        if "allow_pickle" in str(e) or "Object arrays" in str(e):
            raise ValueError(
                f"{p}: holds an object array, which needs pickle to load; cupysyncbn"
                " checkpoints hold numeric arrays only and never unpickle"
            ) from None
        raise ValueError(f"{p}: not a valid cupysyncbn checkpoint ({e})") from None
    except (zipfile.BadZipFile, OSError, EOFError, KeyError) as e:
        raise ValueError(f"{p}: truncated or corrupt checkpoint ({type(e).__name__}: {e})") from None
