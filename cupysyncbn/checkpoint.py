"""Checkpoints: ``save``/``load`` of state dicts as NumPy ``.npz`` (never pickle).

* Only numeric arrays are written and read: :func:`load` opens the archive
  with ``allow_pickle=False`` and refuses object arrays with a clear error, so
  loading a checkpoint can never run code.
* Any non-empty ``str`` key round-trips (``file``, ``allow_pickle``, dots,
  slashes, non-ASCII); a key that the zip format would change (a NUL
  character; on Windows also a backslash) is refused at ``save`` with a
  ``ValueError`` naming it. :func:`load` reads only archives whose members
  are all ``.npy`` arrays and checks every header against the data actually
  stored before reading (a header declaring more data than the file holds is
  refused without allocating it), so a ``torch.save`` file, another zip or a
  forged header raises :class:`CheckpointError`.
* Writes are atomic: the archive goes to a temporary file with a short name
  in the target's folder (``.sbn-XXXXXXXX.tmp``, so any valid target name
  works; created with mode 0666 minus the umask, so the checkpoint gets the
  mode ``numpy.save`` would give it: 0644 under umask 022), is flushed and
  ``fsync``-ed, then renamed
  over the target (``os.replace``). A crash at any point leaves either the old
  file or the new one, never a partial file (a hard crash may leave the
  temporary file behind; it is never read).
* Called with ``comm``, :func:`save` is collective: every rank validates its
  state dict, only rank 0 writes (only its ``path`` is used: the others may
  pass ``None``), and every rank returns (or raises the same error) once the
  file is in place. No rank is left waiting if another fails.
"""

from __future__ import annotations

import os
import secrets
import zipfile
from collections import OrderedDict
from typing import Any

import numpy as np

from .arrays.devices import to_host
from .comm.select import as_communicator
from .consistency import allreduce_host
from .errors import CheckpointError, RemoteInputError

__all__ = ["save", "load", "CheckpointError"]

_ZIP_MAGIC = b"PK\x03\x04"
_NPY_MAGIC = b"\x93NUMPY"


def _host_arrays(state_dict: Any) -> OrderedDict:
    """Validate ``state_dict`` and return host copies of its arrays."""
    if not hasattr(state_dict, "items"):
        hint = " (pass layer.state_dict())" if hasattr(state_dict, "state_dict") else ""
        raise TypeError(
            f"state_dict must be a mapping of str to arrays; got {type(state_dict).__name__}{hint}"
        )
    arrays: OrderedDict = OrderedDict()
    for key, value in state_dict.items():
        if not isinstance(key, str) or not key:
            raise TypeError(f"state_dict keys must be non-empty str; got {key!r}")
        if zipfile.ZipInfo(_member(key)).filename != _member(key):
            raise ValueError(
                f"state_dict key {key!r} cannot be stored in an .npz archive (zip member"
                " names cannot hold it as it is: a NUL character?); rename it"
            )
        try:
            host = np.asarray(to_host(value))
        except Exception as e:  # noqa: BLE001 - anything array-like that fails
            raise TypeError(
                f"state_dict[{key!r}] is not an array ({type(e).__name__}: {e})"
            ) from None
        if host.dtype.kind not in "biuf":
            raise TypeError(
                f"state_dict[{key!r}] has dtype {host.dtype}; only numeric (bool, int,"
                " float) arrays are saved: object arrays would need pickle"
            )
        if not host.dtype.isnative:
            host = host.astype(host.dtype.newbyteorder("="))
        arrays[key] = host if host.flags.c_contiguous else host.copy(order="C")
    return arrays


def _member(key: str) -> str:
    return key + ".npy"


def save(state_dict: dict, path: str | os.PathLike, comm: Any = None) -> None:
    """Write ``state_dict`` to ``path`` as an ``.npz`` archive, atomically.

    Parameters
    ----------
    state_dict : dict of str to array
        NumPy or CuPy arrays (copied to the host), e.g. ``layer.state_dict()``.
    path : str or path-like
        Target file; written as given (no ``.npz`` suffix is appended). Its
        folder must exist.
    comm : Communicator, mpi4py.MPI.Comm, optional
        Makes the call collective over the group: only rank 0 writes (its own
        ``state_dict``), and every rank returns after the file is in place.
        Every rank must call it.

    Raises
    ------
    TypeError
        For keys that are not str or values that are not numeric arrays
        (object arrays are refused). Collectively: on the faulty rank, and a
        :class:`~cupysyncbn.errors.RemoteInputError` on the others.
    OSError
        When the file cannot be written (on every rank, collectively); the
        previous file at ``path``, if any, is left intact.
    """
    comm_ = None
    if comm is not None:
        comm_ = as_communicator(comm)
    if comm_ is None or comm_.size == 1:
        _atomic_write(_host_arrays(state_dict), _check_path(path))
        return
    # Collective: agree on validity first, so that no rank waits for a rank
    # that raised; then rank 0 writes and everybody learns how it went. Only
    # rank 0's path matters (the common "only rank 0 knows the path").
    own: BaseException | None = None
    target = ""
    try:
        if comm_.rank == 0:
            target = _check_path(path)
        arrays = _host_arrays(state_dict)
    except (TypeError, ValueError) as e:
        own = e
    bad = allreduce_host(comm_, np.array([1.0 if own else 0.0]))[0]
    if own is not None:
        raise own
    if bad:
        raise RemoteInputError(
            f"save: {int(bad)} rank(s) passed an invalid state_dict or path; nothing was"
            " written"
        )
    failure: BaseException | None = None
    if comm_.rank == 0:
        try:
            _atomic_write(arrays, target)
        except Exception as e:  # noqa: BLE001 - reported to every rank below
            failure = e
    failed = allreduce_host(comm_, np.array([1.0 if failure else 0.0]))[0]
    if failure is not None:
        raise failure
    if failed:
        raise OSError("save: rank 0 could not write the checkpoint (see its error)")


def _check_path(path: Any) -> str:
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a str or os.PathLike; got {type(path).__name__}")
    return os.fspath(path)


def _create_temp(folder: str, base: str) -> tuple[int, str]:
    """Create ``.sbn-XXXXXXXX.tmp`` exclusively, with mode 0666 minus the umask.

    ``tempfile.mkstemp`` would create it 0600 whatever the umask, and the
    rename would give the checkpoint that mode; ``numpy.save`` and ``open``
    honour the umask (0644 under 022), so this does too, without changing the
    process umask (which other threads share). The name is short, not
    ``.<base>.tmp-...``: that would exceed NAME_MAX (255) for valid target
    names longer than about 240 characters.
    """
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
    flags |= getattr(os, "O_BINARY", 0)
    for _ in range(100):
        tmp = os.path.join(folder, f".sbn-{secrets.token_hex(4)}.tmp")
        try:
            return os.open(tmp, flags, 0o666), tmp
        except FileExistsError:  # pragma: no cover - 32 random bits collided
            continue
    raise FileExistsError(f"could not create a temporary file next to {base!r} in {folder!r}")


def _atomic_write(arrays: dict, path: str) -> None:
    folder = os.path.dirname(os.path.abspath(path))
    base = os.path.basename(path)
    fd, tmp = _create_temp(folder, base)
    try:
        with os.fdopen(fd, "wb") as f:
            _write_archive(f, arrays)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    _fsync_dir(folder)


def _write_archive(f: Any, arrays: dict) -> None:
    # Our own writer, not np.savez(f, **arrays): keys such as "file" or
    # "allow_pickle" are savez's keyword arguments. The layout is savez's
    # (one stored .npy member per key), so np.load reads it too.
    with zipfile.ZipFile(f, "w", zipfile.ZIP_STORED, allowZip64=True) as z:
        for key, arr in arrays.items():
            with z.open(_member(key), "w", force_zip64=True) as m:
                np.lib.format.write_array(m, arr, allow_pickle=False)


def _fsync_dir(folder: str) -> None:
    # Makes the rename itself durable (POSIX); not possible everywhere.
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # pragma: no cover - e.g. Windows
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def _read_member(p: str, key: str, f: Any, size: int) -> np.ndarray:
    """One ``.npy`` member, its header checked against ``size`` before any allocation."""
    fmt = np.lib.format
    version = fmt.read_magic(f)
    if version == (1, 0):
        shape, fortran, dtype = fmt.read_array_header_1_0(f)
    elif version in ((2, 0), (3, 0)):
        shape, fortran, dtype = fmt.read_array_header_2_0(f)
    else:  # pragma: no cover - read_magic refuses unknown versions itself
        raise CheckpointError(f"{p}: entry {key!r} has an unknown .npy version {version}")
    if dtype.hasobject:
        raise CheckpointError(
            f"{p}: entry {key!r} is an object array, which needs pickle to load;"
            " cupysyncbn checkpoints hold numeric arrays only and never unpickle"
        )
    if dtype.kind not in "biuf":
        raise CheckpointError(
            f"{p}: entry {key!r} has dtype {dtype}; cupysyncbn checkpoints hold numeric"
            " arrays only and never unpickle (object arrays need pickle)"
        )
    count = 1
    for n in shape:
        count *= int(n)
    need = count * dtype.itemsize
    have = size - f.tell()
    if need != have:
        raise CheckpointError(
            f"{p}: entry {key!r} declares shape {tuple(shape)} of {dtype} ({need} bytes)"
            f" but the archive holds {have} bytes for it: truncated or forged header"
        )
    data = f.read(need)
    if len(data) != need:
        raise CheckpointError(f"{p}: entry {key!r} is truncated")
    arr = np.frombuffer(data, dtype=dtype)
    arr = arr.reshape(shape[::-1]).T if fortran else arr.reshape(shape)
    # a C-ordered, writable, native-byte-order copy
    return arr.astype(dtype.newbyteorder("="), order="C", copy=True)


def load(path: str | os.PathLike) -> OrderedDict:
    """Read a state dict written by :func:`save` (NumPy arrays, in saved order).

    Never unpickles: the archive is opened with ``allow_pickle=False``. Pass
    the result to ``layer.set_state_dict``, which validates names, shapes and
    dtypes before changing anything.

    Parameters
    ----------
    path : str or path-like
        A file written by :func:`save`.

    Returns
    -------
    OrderedDict of str to numpy.ndarray

    Raises
    ------
    FileNotFoundError
        If ``path`` does not exist.
    CheckpointError (a ValueError)
        If the file is truncated, corrupt, not an ``.npz`` archive, or holds
        object or other non-numeric arrays (object arrays need pickle; they are
        refused, naming the entry).
    """
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a str or os.PathLike; got {type(path).__name__}")
    p = os.fspath(path)
    with open(p, "rb") as f:
        magic = f.read(6)
    if not magic.startswith(_ZIP_MAGIC):
        if magic.startswith(_NPY_MAGIC):
            what = "a single .npy array, not a state-dict archive"
        elif not magic:
            what = "an empty file"
        else:
            what = "not an .npz archive"
        raise CheckpointError(f"{p}: {what}; write checkpoints with cupysyncbn.save")
    out: OrderedDict = OrderedDict()
    try:
        with zipfile.ZipFile(p) as z:
            infos = z.infolist()
            for info in infos:  # refuse before reading anything
                if not info.filename.endswith(".npy") or info.is_dir():
                    raise CheckpointError(
                        f"{p}: not a cupysyncbn checkpoint: the archive holds"
                        f" {info.filename!r}, which is not a .npy array (a torch.save file"
                        " or another zip?); write checkpoints with cupysyncbn.save"
                    )
            for info in infos:
                key = info.filename[: -len(".npy")]
                with z.open(info) as f:
                    out[key] = _read_member(p, key, f, info.file_size)
    except CheckpointError:
        raise
    except (zipfile.BadZipFile, ValueError, OSError, EOFError, KeyError, RuntimeError,
            zipfile.LargeZipFile) as e:
        raise CheckpointError(
            f"{p}: truncated or corrupt checkpoint ({type(e).__name__}: {e})"
        ) from None
    return out
