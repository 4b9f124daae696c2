"""NCCL communicator for CuPy arrays, bootstrapped over MPI.

* Each process's GPU comes from the placement rule
  (:mod:`cupysyncbn.placement`: node-local rank of the whole job, a single
  visible GPU, or ``CUPYSYNCBN_DEVICE``), chosen once per process; sub-group
  communicators reuse it.
* Before any NCCL call the ranks agree (:mod:`cupysyncbn.comm.agreement`, one
  MPI all-gather) that every one of them can use NCCL on its own GPU; if not,
  :class:`CommunicatorError` is raised on every rank.
* Rank 0 creates the NCCL unique id and broadcasts it over a duplicate of the
  MPI communicator (the bootstrap never mixes with the caller's messages).
  CuPy 13 returns the id as a tuple of ints and CuPy 14 as ``bytes``; either
  is accepted.
* ``ncclCommInitRank`` errors (``NcclError``) are agreed on too (one more
  all-gather): every rank raises the same :class:`CommunicatorError`, and
  ``init('auto')`` falls back to MPI together. The initialization is timed by
  the collective watchdog, so a rank stuck in it aborts the job instead of
  hanging.
* ``allreduce_sum`` enqueues ``ncclAllReduce`` on the current CuPy stream and
  returns without waiting. A watchdog thread checks each collective's
  completion and NCCL's asynchronous errors; past the timeout
  (``CUPYSYNCBN_NCCL_TIMEOUT`` seconds, default ``CUPYSYNCBN_TIMEOUT`` or 600;
  0 disables) or on an NCCL error it aborts the NCCL communicator and then the
  MPI job (``CUPYSYNCBN_NCCL_ABORT=0`` keeps the process alive and raises on
  the next call instead). The thread runs in CUDA's relaxed stream-capture
  mode: under a global-mode capture (``torch.cuda.graph``'s default) an event
  query from any other thread would invalidate the capture (PyTorch's own
  NCCL watchdog does the same).
* NumPy buffers go through MPI on the same group, so one communicator serves
  both array kinds.
* The NCCL communicator is destroyed at interpreter exit (after the device is
  idle), or aborted by :meth:`NCCLCommunicator.abort`.
"""

from __future__ import annotations

import atexit
import collections
import ctypes
import sys
import threading
import time
import weakref
from typing import Any

import numpy as np

from ..errors import CommunicatorError
from ..runtime import env
from ..runtime.env import parse_timeout
from ..runtime.watchdog import abort_job, shared_watchdog
from . import agreement
from .base import Communicator
from .mpi import MPICommunicator

__all__ = ["NCCLCommunicator", "nccl_version"]

_POLL_S = 0.05
_CAPTURE_MODE_RELAXED = 2  # cudaStreamCaptureModeRelaxed = CU_STREAM_CAPTURE_MODE_RELAXED


def relax_capture_mode(cupy: Any) -> bool:
    """Put the calling thread in relaxed stream-capture mode; whether that worked.

    A thread in relaxed mode may query events while another thread captures
    a CUDA graph in global mode. CuPy does not wrap
    ``cudaThreadExchangeStreamCaptureMode``; the driver's equivalent
    (``cuThreadExchangeStreamCaptureMode``, same per-thread setting) is in
    every libcuda since CUDA 10.1.
    """
    exchange = getattr(cupy.cuda.runtime, "threadExchangeStreamCaptureMode", None)
    if exchange is not None:
        exchange(_CAPTURE_MODE_RELAXED)
        return True
    names = ("nvcuda.dll",) if sys.platform == "win32" else ("libcuda.so.1", "libcuda.so")
    for name in names:
        try:
            fn = ctypes.CDLL(name).cuThreadExchangeStreamCaptureMode
        except (OSError, AttributeError):
            continue
        mode = ctypes.c_int(_CAPTURE_MODE_RELAXED)
        return fn(ctypes.byref(mode)) == 0
    return False


def nccl_version() -> str:
    """The loaded NCCL's version as ``'2.21.5'`` ('none' when NCCL is not loadable)."""
    try:
        from cupy.cuda import nccl

        return agreement.nccl_version_text(nccl.get_version() if nccl.available else None)
    except Exception:
        return "none"


def _timeout_from_env() -> float:
    # One parser for every timeout (runtime.env): CUPYSYNCBN_NCCL_TIMEOUT, else
    # CUPYSYNCBN_TIMEOUT, else 600; a negative value is refused, not clamped.
    return env.collective_timeout(env.NCCL_TIMEOUT_ENV)


def _make_nccl_comm(nccl: Any, size: int, uid: Any, rank: int) -> Any:
    """``nccl.NcclCommunicator`` from an id of either CuPy generation."""
    try:
        return nccl.NcclCommunicator(size, uid, rank)
    except TypeError:
        pass
    if isinstance(uid, (bytes, bytearray)):  # CuPy 13 wants a tuple of signed chars
        alt: Any = tuple(b - 256 if b > 127 else b for b in bytes(uid))
    else:  # CuPy 14 wants bytes
        alt = bytes(int(v) & 0xFF for v in uid)
    return nccl.NcclCommunicator(size, alt, rank)


def _init_agreed(boot: Any, nccl: Any, cupy: Any, size: int, rank: int, device: int) -> Any:
    """``ncclCommInitRank`` on every rank of ``boot``, with its failures agreed on.

    Raises
    ------
    CommunicatorError
        On every rank, when getting the id or initializing failed on any rank.
    """
    msg: Any = None
    if rank == 0:
        try:
            msg = ("id", nccl.get_unique_id())
        except Exception as e:  # tell the peers instead of leaving them waiting
            msg = ("error", f"ncclGetUniqueId failed on rank 0: {e}")
    kind, uid = boot.bcast(msg, root=0)
    if kind == "error":
        raise CommunicatorError(f"backend 'nccl' unavailable: {uid}")
    comm, err = None, ""
    dog = shared_watchdog()  # a peer that never joins aborts the job, never a hang
    started = dog.begin("NCCL initialization (ncclCommInitRank)")
    try:
        with cupy.cuda.Device(device):
            comm = _make_nccl_comm(nccl, size, uid, rank)
    except Exception as e:  # NcclError, CUDA errors
        err = f"{type(e).__name__}: {e}"
    finally:
        dog.end(started)
    errors = boot.allgather(err)
    bad = [(r, e) for r, e in enumerate(errors) if e]
    if bad:
        if comm is not None:
            try:
                comm.abort()
            except Exception:
                pass
        r, why = bad[0]
        raise CommunicatorError(f"NCCL initialization failed on rank {r}: {why}")
    return comm


class _Watchdog:
    """Background checker of pending NCCL collectives (see the module docstring)."""

    def __init__(self, owner: NCCLCommunicator, timeout: float) -> None:
        self._owner = weakref.ref(owner)
        self.timeout = timeout
        self.pending: collections.deque = collections.deque()
        self._stop = threading.Event()
        self.relaxed: bool | None = None  # set by the thread before its first query
        self._thread = threading.Thread(
            target=self._run, args=(owner.device_id,), name="cupysyncbn-nccl-watchdog",
            daemon=True,
        )
        self._thread.start()

    def watch(self, stream: Any) -> None:
        import cupy

        ev = cupy.cuda.Event(block=False, disable_timing=True, interprocess=False)
        ev.record(stream)
        self.pending.append((ev, time.monotonic()))

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not threading.current_thread():
            self._thread.join(timeout=1.0)

    def _run(self, device_id: int) -> None:
        import cupy

        cupy.cuda.runtime.setDevice(device_id)
        # Before any query: a graph captured in global mode on another thread
        # must not see this thread's event queries (nor be invalidated by them).
        self.relaxed = relax_capture_mode(cupy)
        while not self._stop.wait(_POLL_S):
            owner = self._owner()
            if owner is None:
                return
            reason = None
            while self.pending:
                ev, t0 = self.pending[0]
                if ev.done:
                    self.pending.popleft()
                    continue
                if time.monotonic() - t0 > self.timeout:
                    reason = (
                        f"an NCCL all-reduce did not complete within {self.timeout:g} s"
                        " (CUPYSYNCBN_NCCL_TIMEOUT); a rank is probably stuck or dead"
                    )
                break
            if reason is None:
                try:
                    owner._nccl.check_async_error()
                except AttributeError:  # CuPy/NCCL without ncclCommGetAsyncError
                    pass
                except Exception as e:  # NcclError
                    reason = f"NCCL reported an asynchronous error: {e}"
            if reason is not None:
                owner._fail(reason)
                return
            del owner


class NCCLCommunicator(Communicator):
    """Sum all-reduce over NCCL for CuPy buffers (MPI for NumPy buffers).

    Parameters
    ----------
    mpi_comm : mpi4py.MPI.Comm
        The group: ``MPI.COMM_WORLD`` or a sub-communicator. Creating the
        communicator is collective over it.
    device : int, optional
        GPU to use; default: this rank's GPU by the placement rule
        (:func:`cupysyncbn.placement.this_rank_gpu`).
    timeout : float, optional
        Watchdog timeout in seconds (default ``CUPYSYNCBN_NCCL_TIMEOUT``, else
        ``CUPYSYNCBN_TIMEOUT``, else 600; 0 disables the watchdog).

    Raises
    ------
    CommunicatorError
        On every rank, when some rank cannot use NCCL (no CuPy, no NCCL
        library, no GPU, two ranks of the group on one GPU), or when NCCL's
        initialization fails on some rank.
    """

    backend = "nccl"

    def __init__(self, mpi_comm: Any, device: int | None = None,
                 timeout: float | None = None, *, _agreed_infos: list | None = None) -> None:
        try:
            from mpi4py import MPI
        except ImportError as e:  # pragma: no cover - depends on the machine
            raise CommunicatorError("backend 'nccl' needs mpi4py for its bootstrap") from e
        if not isinstance(mpi_comm, MPI.Comm):
            raise TypeError(f"mpi_comm must be an mpi4py.MPI.Comm; got {type(mpi_comm).__name__}")
        self._MPI = MPI
        self.mpi_comm = mpi_comm
        self.rank = mpi_comm.Get_rank()
        self.size = mpi_comm.Get_size()
        self.timeout = _timeout_from_env() if timeout is None else parse_timeout(timeout, "timeout")
        self._abort_job = env.flag(env.NCCL_ABORT_ENV, default=True)
        self._host = MPICommunicator(mpi_comm)
        self._error: str | None = None
        self._closed = False
        self._nccl: Any = None
        self.device_id = -1
        self._watchdog: _Watchdog | None = None

        boot = mpi_comm.Dup()  # bootstrap traffic stays off the caller's communicator
        try:
            infos = _agreed_infos
            if infos is None:  # constructed directly: agree here (init() already did)
                infos = agreement.gather(boot, "nccl", device)
                agreement.decide("nccl", infos)  # raises on every rank alike
            self.device_id = int(infos[self.rank]["gpu"])
            self._init_infos = infos
            import cupy
            from cupy.cuda import nccl

            self._cupy = cupy
            self._nccl_mod = nccl
            self._nccl = _init_agreed(boot, nccl, cupy, self.size, self.rank, self.device_id)
        finally:
            boot.Free()
        if self.timeout > 0:
            self._watchdog = _Watchdog(self, self.timeout)
        atexit.register(_close_at_exit, weakref.ref(self))

    # -- the collective --------------------------------------------------------
    def supports(self, array: Any) -> bool:
        """NumPy arrays (via MPI) and CuPy arrays on this communicator's GPU."""
        if isinstance(array, np.ndarray):
            return True
        cp = sys.modules.get("cupy")
        return (
            cp is not None and isinstance(array, cp.ndarray)
            and array.device.id == self.device_id
        )

    def allreduce_sum(self, buf: Any) -> Any:
        """Sum ``buf`` over the group in place; CuPy buffers by NCCL on the current stream.

        Does not wait for the result (stream order guarantees it to later
        kernels on the same stream).

        Raises
        ------
        CommunicatorError
            When the communicator was aborted or closed, or a previous NCCL
            collective failed.
        TypeError, ValueError
            For a buffer that is not a contiguous float64 array on this GPU.
        """
        return self._reduce(buf, False)

    def allreduce_max(self, buf: Any) -> Any:
        """Element-wise maximum of ``buf`` over the group in place (as :meth:`allreduce_sum`)."""
        return self._reduce(buf, True)

    def _reduce(self, buf: Any, maximum: bool) -> Any:
        if isinstance(buf, np.ndarray):
            host = self._host
            return host.allreduce_max(buf) if maximum else host.allreduce_sum(buf)
        if self._error is not None:
            raise CommunicatorError(self._error)
        if self._closed:
            raise CommunicatorError("the NCCL communicator was closed")
        cp = self._cupy
        if not isinstance(buf, cp.ndarray):
            raise TypeError(f"buf must be a numpy or cupy array; got {type(buf).__name__}")
        if buf.dtype != np.float64 or buf.ndim != 1 or not buf.flags.c_contiguous:
            raise TypeError("buf must be a contiguous 1-D float64 array")
        if buf.device.id != self.device_id:
            raise ValueError(
                f"buf is on cuda:{buf.device.id} but this NCCL communicator uses"
                f" cuda:{self.device_id}"
            )
        nccl = self._nccl_mod
        stream = cp.cuda.get_current_stream()
        self._nccl.allReduce(
            buf.data.ptr, buf.data.ptr, buf.size, nccl.NCCL_FLOAT64,
            nccl.NCCL_MAX if maximum else nccl.NCCL_SUM, stream.ptr
        )
        # Not inside a CUDA-graph capture: an event recorded there cannot be
        # queried by the watchdog thread (the graph's replays are not watched).
        if self._watchdog is not None and not getattr(stream, "is_capturing", bool)():
            self._watchdog.watch(stream)
        return buf

    def split(self, color: int, key: int | None = None) -> NCCLCommunicator:
        """An NCCL communicator over the ranks that pass the same ``color``."""
        sub = self.mpi_comm.Split(color, self.rank if key is None else key)
        return NCCLCommunicator(sub, device=self.device_id, timeout=self.timeout)

    # -- teardown --------------------------------------------------------------
    def _fail(self, reason: str) -> None:
        """Watchdog path: abort NCCL, then the job (unless disabled)."""
        self._error = f"NCCL communicator aborted: {reason}"
        try:
            if self._nccl is not None:
                self._nccl.abort()
        except Exception:
            pass
        self._closed = True
        if self._abort_job:
            abort_job(None, 1, self._error)  # MPI_Abort, never returns
        print(f"cupysyncbn (rank {self.rank}): {self._error}", file=sys.stderr, flush=True)

    def close(self) -> None:
        """Destroy the NCCL communicator after the GPU has finished its work."""
        if self._watchdog is not None:
            self._watchdog.stop()
        if self._closed or self._nccl is None:
            self._closed = True
            return
        self._closed = True
        try:
            self._cupy.cuda.Device(self.device_id).synchronize()
            self._nccl.destroy()
        except Exception:
            pass

    def abort(self, errorcode: int = 1) -> None:
        """Abort the NCCL communicator, then ``MPI_Abort`` the whole job."""
        if self._watchdog is not None:
            self._watchdog.stop()
        if not self._closed and self._nccl is not None:
            try:
                self._nccl.abort()
            except Exception:
                pass
        self._closed = True
        self._MPI.COMM_WORLD.Abort(errorcode)


def _close_at_exit(ref: Any) -> None:
    comm = ref()
    if comm is not None:
        comm.close()
