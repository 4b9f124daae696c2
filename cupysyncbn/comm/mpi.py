"""MPI communicator over any mpi4py communicator (world or sub-group).

NumPy buffers are reduced directly. CuPy buffers are staged through host
memory, unless CUDA-aware MPI is opted into (``cuda_aware=True`` or the
environment variable ``CUPYSYNCBN_CUDA_AWARE_MPI=1``), in which case the device
buffer is passed to MPI after synchronizing the current stream.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..errors import CommunicatorError
from ..runtime import env
from ..runtime.watchdog import shared_watchdog
from .base import Communicator

__all__ = ["MPICommunicator"]

_KEYVAL: list = []


class _GroupKey:
    """A hashable token that identifies one MPI communicator in this process."""

    __slots__ = ("__weakref__",)


def _group_keyval(MPI: Any) -> Any:
    if not _KEYVAL:
        _KEYVAL.append(MPI.Comm.Create_keyval())
    return _KEYVAL[0]


def _comm_name(mpi_comm: Any, MPI: Any) -> str:
    """``MPI.COMM_WORLD``, the name given with ``Set_name``, or the MPI handle."""
    if mpi_comm == MPI.COMM_WORLD:
        return "MPI.COMM_WORLD"
    try:
        name = mpi_comm.Get_name()
    except Exception:  # pragma: no cover - best effort
        name = ""
    if name:
        return repr(name)
    try:
        return f"<unnamed, MPI handle {mpi_comm.py2f() & 0xFFFFFFFF:#x}>"
    except Exception:  # pragma: no cover - best effort
        return "<unnamed>"


class MPICommunicator(Communicator):
    """Sum all-reduce over an ``mpi4py.MPI.Comm``.

    Parameters
    ----------
    mpi_comm : mpi4py.MPI.Comm
        The group to synchronize over: ``MPI.COMM_WORLD`` or any
        sub-communicator (``comm.Split(color)``). It is used as given, not
        duplicated, so collectives stay ordered with the caller's own.
    cuda_aware : bool, optional
        Pass CuPy device buffers straight to MPI (needs a CUDA-aware MPI).
        Defaults to the environment variable ``CUPYSYNCBN_CUDA_AWARE_MPI``.
    """

    backend = "mpi"

    def __init__(self, mpi_comm: Any, cuda_aware: bool | None = None) -> None:
        try:
            from mpi4py import MPI
        except ImportError as e:  # pragma: no cover - depends on the machine
            raise CommunicatorError(
                "backend 'mpi' needs mpi4py: pip install mpi4py (and mpich if the"
                " machine has no MPI library)"
            ) from e
        if not isinstance(mpi_comm, MPI.Comm):
            raise TypeError(
                f"mpi_comm must be an mpi4py.MPI.Comm; got {type(mpi_comm).__name__}"
            )
        if mpi_comm == MPI.COMM_NULL:
            raise CommunicatorError(
                "mpi_comm is MPI.COMM_NULL (a freed communicator, or a Split color this"
                " rank is not part of): pass a live communicator"
            )
        self._MPI = MPI
        self.mpi_comm = mpi_comm
        self.rank = mpi_comm.Get_rank()
        self.size = mpi_comm.Get_size()
        # Kept for error messages: a freed communicator has no name any more.
        self.name = _comm_name(mpi_comm, MPI)
        if cuda_aware is None:
            cuda_aware = env.flag(env.CUDA_AWARE_ENV)
        self.cuda_aware = bool(cuda_aware)

    def allreduce_sum(self, buf: Any) -> Any:
        """Sum ``buf`` over the group in place (host-staged for CuPy).

        A call that does not complete within ``CUPYSYNCBN_TIMEOUT`` seconds
        (default 600) aborts the job (:mod:`cupysyncbn.runtime.watchdog`).

        Raises
        ------
        CommunicatorError
            When the MPI communicator was freed, or MPI reports an error.
        """
        return self._reduce(buf, self._MPI.SUM)

    def allreduce_max(self, buf: Any) -> Any:
        """Element-wise maximum of ``buf`` over the group in place (as :meth:`allreduce_sum`)."""
        return self._reduce(buf, self._MPI.MAX)

    def _reduce(self, buf: Any, op: Any) -> Any:
        MPI = self._MPI
        if self.mpi_comm == MPI.COMM_NULL:  # one handle comparison per pass
            raise self._freed_error()
        dog = shared_watchdog()
        token = dog.begin(buf.size, self)
        try:
            return self._allreduce_sum(buf, op)
        except MPI.Exception as e:
            # Freed through another Python object of the same handle (this
            # one still holds the stale handle), or another MPI failure: a
            # clear error instead of MPI's error stack.
            if e.Get_error_class() == MPI.ERR_COMM:
                raise self._freed_error() from e
            text = e.Get_error_string().splitlines()[0].removesuffix(", error stack:")
            raise CommunicatorError(
                f"the all-reduce over the MPI communicator {self.name} (rank {self.rank} of"
                f" {self.size}) failed: {text}"
            ) from e
        finally:
            dog.end(token)

    def _freed_error(self) -> CommunicatorError:
        return CommunicatorError(
            f"the MPI communicator {self.name} (rank {self.rank} of {self.size}) has been"
            " freed (comm.Free() / MPI_Comm_free; MPI: invalid communicator): nothing can"
            " synchronize over it any more, a layer built with it included. Free a"
            " communicator only after the last use of the layers built with it"
        )

    def _allreduce_sum(self, buf: Any, op: Any = None) -> Any:
        MPI = self._MPI
        op = MPI.SUM if op is None else op
        if isinstance(buf, np.ndarray):
            self.mpi_comm.Allreduce(MPI.IN_PLACE, buf, op=op)
            return buf
        import cupy

        if self.cuda_aware:
            # MPI does not know CuPy's stream: finish pending kernels first.
            cupy.cuda.get_current_stream().synchronize()
            self.mpi_comm.Allreduce(MPI.IN_PLACE, buf, op=op)
            return buf
        host = cupy.asnumpy(buf)
        self.mpi_comm.Allreduce(MPI.IN_PLACE, host, op=op)
        buf.set(host)
        return buf

    def group_key(self) -> Any:
        """Identity of the MPI group, stored as an attribute on the MPI communicator.

        MPICH reuses the handles (``py2f()``) of freed communicators, so a
        handle cannot tell a new group from a freed one. The key is a fresh
        object kept in an MPI attribute (``Create_keyval``/``Set_attr``) of
        the communicator itself: every wrapper of the same communicator sees
        the same key, a communicator created later (``Dup``, ``Split``) never
        inherits it (the keyval has no copy function), and ``Free`` drops it.
        """
        mpi_comm = self.mpi_comm
        try:
            keyval = _group_keyval(self._MPI)
            key = mpi_comm.Get_attr(keyval)
            if key is None:
                key = _GroupKey()
                mpi_comm.Set_attr(keyval, key)
            return key
        except Exception:  # pragma: no cover - MPI without attribute caching
            return super().group_key()

    def split(self, color: int, key: int | None = None) -> MPICommunicator:
        """A communicator over the ranks that pass the same ``color``."""
        if self.mpi_comm == self._MPI.COMM_NULL:
            raise self._freed_error()
        with shared_watchdog().watching(
            f"MPICommunicator.split over the {self.size} ranks of {self.name}"
        ):
            sub = self.mpi_comm.Split(color, self.rank if key is None else key)
        return MPICommunicator(sub, cuda_aware=self.cuda_aware)

    def abort(self, errorcode: int = 1) -> None:
        """``MPI_Abort`` on the world communicator: ends every rank of the job."""
        self._MPI.COMM_WORLD.Abort(errorcode)
