r"""Checkpoints: ``save``/``load`` of state dicts as NumPy ``.npz`` (never pickle).

* Only numeric arrays are written and read: :func:`load` never unpickles and
  refuses object arrays with a clear error, so loading a checkpoint can never
  run code.
* Any non-empty ``str`` key round-trips (``file``, ``allow_pickle``, dots,
  slashes, non-ASCII); a key that the zip format would change or cannot
  encode (a NUL character, a lone surrogate such as ``'\udc80'``; on Windows
  also a backslash) is refused at ``save`` with a ``ValueError`` naming it,
  before anything is written.
* Integrity: the archive holds one ``.npy`` member per key and nothing else
  (the layout of ``numpy.savez``: ``numpy.load`` reads our files and lists
  exactly the keys), and carries a manifest in the zip's comment fields,
  which ``numpy.load`` ignores: the archive comment names the format, its
  version and the number of entries; each member's comment holds its dtype,
  shape, size and SHA-256 (the key is the member's name). :func:`load`
  checks, before returning anything: the number of entries the zip's end
  record declares against the entries actually found (a damaged
  central-directory record can make ``zipfile`` stop early and silently drop
  entries), the manifest against the members, every ``.npy`` header against
  the data actually stored (a header declaring more data than the file holds
  is refused without allocating it) and the zip CRC of every member. Any
  corruption that drops, adds or changes an entry raises
  :class:`CheckpointError`; so do a ``torch.save`` file, another zip or a
  forged header. Files without comments (written before the manifest
  existed, or by ``numpy.savez``) still load (the entry count, headers and
  CRCs are checked).
* Writes are atomic and go through symlinks: ``path`` is resolved (every
  symlink followed, a dangling one included, whose target is created as
  ``numpy.save`` would) and the archive goes to a temporary file with a short
  name in the *resolved target's* folder (``.sbn-XXXXXXXX.tmp``, so any valid
  target name works; created with mode 0666 minus the umask, so the
  checkpoint gets the mode ``numpy.save`` would give it: 0644 under umask
  022), is flushed and ``fsync``-ed, renamed over the target (``os.replace``),
  and the folder is ``fsync``-ed so that the rename itself is durable. A crash
  at any point leaves either the old file or the new one, never a partial
  file (a hard crash may leave the temporary file behind; it is never read).
  A symlink stays a symlink and now points at the new file. A target that is
  not a regular file is never replaced: a FIFO, a device node or a socket
  raises ``ValueError``, a directory ``IsADirectoryError``.
* Called with ``comm``, :func:`save` is collective: every rank validates its
  state dict, only rank 0 writes (only its ``path`` is used: the others may
  pass ``None``), and every rank returns (or raises the same error) once the
  file is in place. No rank is left waiting if another fails.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import secrets
import stat
import struct
import zipfile
from collections import OrderedDict
from typing import IO, Any, BinaryIO

import numpy as np

from .arrays.devices import to_host
from .comm.select import as_communicator
from .consistency import allreduce_host
from .errors import CheckpointError, RemoteInputError

__all__ = ["save", "load", "CheckpointError"]

_ZIP_MAGIC = b"PK\x03\x04"
_NPY_MAGIC = b"\x93NUMPY"
_FORMAT = "cupysyncbn-checkpoint"
_VERSION = 1
# zip end records (APPNOTE 4.3.14-16)
_EOCD = struct.Struct("<4s4H2LH")
_EOCD_SIG = b"PK\x05\x06"
_EOCD64_LOCATOR = struct.Struct("<4sLQL")
_EOCD64_LOCATOR_SIG = b"PK\x06\x07"
_EOCD64 = struct.Struct("<4sQ2H2L4Q")
_EOCD64_SIG = b"PK\x06\x06"
_MAX_ZIP_COMMENT = 0xFFFF


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
        try:
            # zipfile encodes member names as UTF-8 only while writing, which
            # would fail halfway through the archive
            key.encode("utf-8")
        except UnicodeEncodeError as e:
            raise ValueError(
                f"state_dict key {key!r} cannot be stored in an .npz archive: it is not"
                f" valid Unicode (a lone surrogate {key[e.start:e.end]!r} at index"
                f" {e.start}, e.g. from os.fsdecode of undecodable bytes); rename it"
            ) from None
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
        folder must exist and be writable (the temporary file is made
        there). A symlink is followed (also a dangling one: its target is
        created) and its target replaced atomically; the link itself is kept.
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
    ValueError
        For a key the archive cannot hold (a NUL character, a lone surrogate),
        or a ``path`` (or symlink target) that is a FIFO, a device node or a
        socket: only regular files are replaced.
    IsADirectoryError
        If ``path`` (or its symlink target) is a directory.
    OSError
        When the file cannot be written (on every rank, collectively); the
        previous file at ``path``, if any, is left intact.
    """
    comm_ = None
    if comm is not None:
        comm_ = as_communicator(comm)
    if comm_ is None or comm_.size == 1:
        _atomic_write(_host_arrays(state_dict), _target(path))
        return
    # Collective: agree on validity first, so that no rank waits for a rank
    # that raised; then rank 0 writes and everybody learns how it went. Only
    # rank 0's path matters (the common "only rank 0 knows the path").
    own: BaseException | None = None
    target = ""
    try:
        if comm_.rank == 0:
            target = _target(path)
        arrays = _host_arrays(state_dict)
    except (TypeError, ValueError, OSError) as e:
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


_KINDS = (
    (stat.S_ISFIFO, "a FIFO (named pipe)"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
)


def _target(path: Any) -> str:
    """The file :func:`save` replaces: ``path`` with every symlink followed.

    Refuses anything at that place that is not a regular file, so that a
    rename can never replace a device node, a FIFO or a directory.
    """
    given = _check_path(path)
    if not given:
        raise ValueError("path must not be empty")
    if given.endswith(os.sep) or (os.altsep and given.endswith(os.altsep)):
        raise IsADirectoryError(
            errno.EISDIR, "save: path names a directory (trailing separator); pass a file",
            given,
        )
    # realpath also resolves a dangling link (to the file it names, which the
    # rename then creates, as numpy.save writing through the link would)
    real = os.path.realpath(given)
    shown = repr(given) if real == os.path.abspath(given) else f"{given!r} (-> {real!r})"
    try:
        mode = os.lstat(real).st_mode
    except FileNotFoundError:
        return real  # a new file; a missing folder fails when the temporary is made
    if stat.S_ISLNK(mode):  # realpath stops at a symlink loop
        raise OSError(errno.ELOOP, f"save: {shown} is a symlink loop", given)
    if stat.S_ISDIR(mode):
        raise IsADirectoryError(
            errno.EISDIR, f"save: {shown} is a directory; pass a file path", given
        )
    if not stat.S_ISREG(mode):
        kind = next((name for test, name in _KINDS if test(mode)), "not a regular file")
        raise ValueError(
            f"save: path {shown} is {kind}; checkpoints only ever replace regular files"
        )
    return real


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
    # Resolved again here (idempotent for an already resolved path): the
    # temporary must live in the real target's folder, or the rename would
    # cross file systems or replace the symlink instead of its target.
    real = _target(path)
    folder = os.path.dirname(real)
    fd, tmp = _create_temp(folder, os.path.basename(real))
    try:
        with os.fdopen(fd, "wb") as f:
            _write_archive(f, arrays)
            f.flush()
            os.fsync(f.fileno())
        # narrows the window in which something else appeared at the target
        # (the rename would replace a FIFO or device node as readily as a file)
        _target(real)
        os.replace(tmp, real)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    _fsync_dir(folder)


class _HashingWriter:
    """Passes writes through, recording their SHA-256 and size for the manifest."""

    def __init__(self, f: IO[bytes]) -> None:
        self._f = f
        self.sha256 = hashlib.sha256()
        self.size = 0

    def write(self, data: Any) -> int:
        self.sha256.update(data)
        self.size += memoryview(data).nbytes
        return self._f.write(data)


def _write_archive(f: Any, arrays: dict) -> None:
    # Our own writer, not np.savez(f, **arrays): keys such as "file" or
    # "allow_pickle" are savez's keyword arguments. The layout is savez's
    # (one stored .npy member per key), so np.load reads it too. The manifest
    # lives in comments, not in a member of its own: np.load would list such
    # a member, and dict(np.load(path)) would no longer be the state dict. A
    # member's comment goes into the central directory, written at close, so
    # it can be set once the member's checksum is known.
    with zipfile.ZipFile(f, "w", zipfile.ZIP_STORED, allowZip64=True) as z:
        for key, arr in arrays.items():
            with z.open(_member(key), "w", force_zip64=True) as m:
                h = _HashingWriter(m)
                np.lib.format.write_array(h, arr, allow_pickle=False)
            z.getinfo(_member(key)).comment = _json({
                "dtype": arr.dtype.str, "shape": list(arr.shape), "size": h.size,
                "sha256": h.sha256.hexdigest()})
        z.comment = _json({"format": _FORMAT, "version": _VERSION, "entries": len(arrays)})


def _json(obj: dict) -> bytes:
    # compact ASCII: no encoding question when read back
    return json.dumps(obj, separators=(",", ":")).encode("ascii")


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


class _HashingReader:
    """Reads a zip member, recording SHA-256 and position (``tell``) of what was read."""

    def __init__(self, f: IO[bytes]) -> None:
        self._f = f
        self.sha256 = hashlib.sha256()
        self.pos = 0

    def read(self, n: int = -1) -> bytes:
        data = self._f.read(n)
        self.sha256.update(data)
        self.pos += len(data)
        return data

    def tell(self) -> int:
        return self.pos


def _read_member(p: str, key: str, f: _HashingReader, size: int) -> np.ndarray:
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
    if len(data) != need or f.read(1):
        raise CheckpointError(f"{p}: entry {key!r} does not hold the {need} bytes it declares")
    arr = np.frombuffer(data, dtype=dtype)
    arr = arr.reshape(shape[::-1]).T if fortran else arr.reshape(shape)
    # a C-ordered, writable, native-byte-order copy
    return arr.astype(dtype.newbyteorder("="), order="C", copy=True)


def _end_record_counts(fh: BinaryIO) -> tuple[int, int]:
    """(entries on this disk, entries in total) that the zip's end record declares.

    Finds the end record the way ``zipfile`` does (at the very end, else the
    last signature within the longest possible comment), so both read the
    same record; ``zipfile`` itself never compares these counts with the
    central-directory records it parsed.
    """
    fh.seek(0, os.SEEK_END)
    size = fh.tell()
    pos = -1
    if size >= _EOCD.size:
        fh.seek(size - _EOCD.size)
        last = fh.read(_EOCD.size)
        if last[:4] == _EOCD_SIG and last[-2:] == b"\0\0":
            pos = size - _EOCD.size
    if pos < 0:
        start = max(size - _MAX_ZIP_COMMENT - _EOCD.size, 0)
        fh.seek(start)
        found = fh.read().rfind(_EOCD_SIG)
        if found < 0:
            raise CheckpointError("no zip end record: truncated or not an .npz archive")
        pos = start + found
    fh.seek(pos)
    rec = fh.read(_EOCD.size)
    if len(rec) != _EOCD.size:
        raise CheckpointError("truncated zip end record")
    _, _, _, n_disk, n_total, _, _, comment_size = _EOCD.unpack(rec)
    # zipfile accepts a shorter comment than declared: a truncation that
    # removed the manifest would leave a valid-looking archive without one
    follows = size - pos - _EOCD.size
    if follows != comment_size:
        raise CheckpointError(
            f"the zip end record declares a {comment_size}-byte comment but {follows} bytes"
            " follow it: truncated or corrupt checkpoint"
        )
    # Zip64: the real counts live in the zip64 end record, just before the
    # locator that precedes the end record (where zipfile looks for it too)
    loc_pos = pos - _EOCD64_LOCATOR.size
    if loc_pos >= 0:
        fh.seek(loc_pos)
        loc = fh.read(_EOCD64_LOCATOR.size)
        if loc[:4] == _EOCD64_LOCATOR_SIG and loc_pos - _EOCD64.size >= 0:
            fh.seek(loc_pos - _EOCD64.size)
            rec64 = fh.read(_EOCD64.size)
            if rec64[:4] == _EOCD64_SIG:
                fields = _EOCD64.unpack(rec64)
                n_disk, n_total = fields[6], fields[7]
    return n_disk, n_total


def _manifest_entries(p: str, z: zipfile.ZipFile, members: list) -> list | None:
    """Each member's manifest entry, in order; ``None`` for an archive without manifest.

    Written by an earlier cupysyncbn or by ``numpy.savez``: such archives
    carry no comment.
    """
    if not z.comment:
        return None
    head = _parse_comment(p, z.comment, "the archive comment")
    if set(head) != {"format", "version", "entries"} or head["format"] != _FORMAT:
        raise CheckpointError(f"{p}: corrupt checkpoint manifest (archive comment)")
    if head["version"] != _VERSION:
        raise CheckpointError(
            f"{p}: checkpoint manifest version {head['version']!r}; this cupysyncbn reads"
            f" version {_VERSION} (written by a newer cupysyncbn?)"
        )
    if head["entries"] != len(members):
        raise CheckpointError(
            f"{p}: corrupt checkpoint: its manifest lists {head['entries']!r} entries, the"
            f" archive holds {len(members)}"
        )
    fields = {"dtype": str, "shape": list, "size": int, "sha256": str}
    entries = []
    for info in members:
        what = f"entry {info.filename[: -len('.npy')]!r}"
        e = _parse_comment(p, info.comment, what)
        if not (set(e) == set(fields) and all(type(e[k]) is t for k, t in fields.items())
                and all(type(n) is int and n >= 0 for n in e["shape"])):
            raise CheckpointError(f"{p}: corrupt checkpoint manifest ({what})")
        entries.append(e)
    return entries


def _parse_comment(p: str, comment: bytes, what: str) -> dict:
    try:
        obj = json.loads(comment.decode("ascii"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{p}: corrupt checkpoint manifest ({what}: {e})") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{p}: corrupt checkpoint manifest ({what})")
    return obj


def load(path: str | os.PathLike) -> OrderedDict:
    """Read a state dict written by :func:`save` (NumPy arrays, in saved order).

    Never unpickles. Nothing is returned unless every check passes: the entry
    count against the zip's end record, the manifest (entry count; dtype,
    shape, size and SHA-256 of every member) against the members, every
    ``.npy`` header against its data, and every member's CRC. Pass the result to
    ``layer.set_state_dict``, which validates names, shapes and dtypes before
    changing anything.

    Parameters
    ----------
    path : str or path-like
        A file written by :func:`save` (files written before checkpoints
        carried a manifest load too, and so do ``numpy.savez`` archives of
        numeric arrays).

    Returns
    -------
    OrderedDict of str to numpy.ndarray

    Raises
    ------
    FileNotFoundError
        If ``path`` does not exist.
    CheckpointError (a ValueError)
        If the file is truncated or corrupt (any damage that would drop, add
        or change an entry), not an ``.npz`` archive, or holds object or other
        non-numeric arrays (object arrays need pickle; they are refused,
        naming the entry).
    """
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a str or os.PathLike; got {type(path).__name__}")
    p = os.fspath(path)
    with open(p, "rb") as fh:
        magic = fh.read(6)
        if not magic.startswith(_ZIP_MAGIC):
            if magic.startswith(_NPY_MAGIC):
                what = "a single .npy array, not a state-dict archive"
            elif not magic:
                what = "an empty file"
            else:
                what = "not an .npz archive"
            raise CheckpointError(f"{p}: {what}; write checkpoints with cupysyncbn.save")
        try:
            return _load_archive(p, fh)
        except CheckpointError as e:
            if str(e).startswith(p):
                raise
            raise CheckpointError(f"{p}: {e}") from None
        except MemoryError:
            raise  # a large valid checkpoint on a full machine is not corrupt
        except Exception as e:  # noqa: BLE001 - zipfile, zlib, numpy: all mean corrupt
            # zipfile alone raises BadZipFile, NotImplementedError (a damaged
            # method or flag), RuntimeError ("encrypted"), zlib.error, EOFError...
            raise CheckpointError(
                f"{p}: truncated or corrupt checkpoint ({type(e).__name__}: {e})"
            ) from None


def _load_archive(p: str, fh: BinaryIO) -> OrderedDict:
    n_disk, n_total = _end_record_counts(fh)
    fh.seek(0)
    with zipfile.ZipFile(fh) as z:
        members = z.infolist()
        if not len(members) == n_disk == n_total:
            raise CheckpointError(
                f"{p}: the zip end record declares {n_total} entries but the central"
                f" directory yields {len(members)}: truncated or corrupt checkpoint"
            )
        for info in members:  # refuse before reading anything
            if not info.filename.endswith(".npy") or info.is_dir():
                raise CheckpointError(
                    f"{p}: not a cupysyncbn checkpoint: the archive holds"
                    f" {info.filename!r}, which is not a .npy array (a torch.save file"
                    " or another zip?); write checkpoints with cupysyncbn.save"
                )
        keys = [info.filename[: -len(".npy")] for info in members]
        if len(set(keys)) != len(keys):
            raise CheckpointError(f"{p}: corrupt checkpoint: an entry appears twice")
        expected = _manifest_entries(p, z, members)
        out: OrderedDict = OrderedDict()
        for i, (info, key) in enumerate(zip(members, keys)):
            with z.open(info) as raw:
                f = _HashingReader(raw)
                arr = _read_member(p, key, f, info.file_size)
            if expected is not None:
                e = expected[i]
                got = (arr.dtype.str, list(arr.shape), f.pos, f.sha256.hexdigest())
                if got != (e["dtype"], e["shape"], e["size"], e["sha256"]):
                    raise CheckpointError(
                        f"{p}: entry {key!r} does not match the checkpoint's manifest"
                        f" (dtype, shape, size or SHA-256 differ): corrupt checkpoint"
                    )
            out[key] = arr
    return out
