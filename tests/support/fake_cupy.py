"""A stand-in for CuPy's CUDA device queries and NCCL, for machines without a GPU.

``install(...)`` puts modules ``cupy``, ``cupy.cuda`` and ``cupy.cuda.nccl``
into ``sys.modules`` that answer what cupysyncbn asks a real CuPy: how many
GPUs are visible, each one's PCI bus id, which one is current, whether NCCL
loads, its version, a unique id, and ``NcclCommunicator`` (which can be told
to fail the way ``ncclCommInitRank`` does). "Device arrays" wrap NumPy arrays
and know their device, so layers can be placed on a fake GPU. Everything the
code under test does with them is recorded in the returned :class:`State`.

Streams are first-class: ``cupy.cuda.Stream`` objects with distinct handles
(``Stream.null`` is handle 0), ``with stream:`` / ``stream.use()`` make one
current (per thread), ``ExternalStream(ptr)`` wraps a handle made elsewhere
(PyTorch's). Work is ordered on the current stream: creating a device array
(a host->device copy), ``State.launch`` (a stand-in kernel) and the NCCL
all-reduce record ``(kind, what, stream handle)`` in ``State.calls`` and leave
that stream busy until a synchronization (stream, event or device). The
stand-in MPI communicator (:func:`mpi_comm`) checks the residency of every
buffer it is handed: a device array only with ``cuda_aware=True``, and then
only when no stream still has work queued (CUDA-aware MPI does not know
CuPy's streams).

Scenarios: ``ndev`` GPUs on the node (PCI bus ids ``0000:NN:00.0``), or
``bus_ids`` given explicitly (e.g. one GPU per rank: each rank sees one GPU
with its own bus id, as under ``CUDA_VISIBLE_DEVICES``/``--gpus-per-task=1``).
"""

from __future__ import annotations

import sys
import threading
import types

import numpy as np

NAMES = ("cupy", "cupy.cuda", "cupy.cuda.nccl", "cupy.cuda.runtime")


class NcclError(RuntimeError):
    """What ``cupy.cuda.nccl`` raises."""


class State:
    def __init__(self, ndev, bus_ids, nccl_available, nccl_version, init_error):
        self.ndev = ndev
        self.bus_ids = list(bus_ids) if bus_ids is not None else [
            f"0000:{0x10 + i:02X}:00.0" for i in range(ndev)]
        self.nccl_available = nccl_available
        self.nccl_version = nccl_version
        self.init_error = init_error
        self.current = 0
        self.uses: list[int] = []  # Device(i).use() calls, in order
        self.nccl_comms: list = []
        # CUDA's stream-capture rule for event queries: while a thread holds a
        # global-mode capture open (torch.cuda.graph's default), a query from
        # another thread not in relaxed mode invalidates it (and raises)
        self.global_capture: threading.Thread | None = None
        self.capture_invalidated: list[str] = []
        self.relaxed_threads: set[int] = set()
        self.queries = 0
        # (kind, what, stream handle) of each piece of stream-ordered work and
        # of each collective, in order; streams with work not yet waited for
        self.calls: list[tuple] = []
        self.busy: set[int] = set()
        self.arrays: dict = {}  # data.ptr -> device array (for NCCL's pointers)
        self.allocs: list[tuple] = []  # (size, device) through the current allocator
        self._tls = threading.local()

    # -- streams ---------------------------------------------------------------
    def current_stream(self):
        stack = getattr(self._tls, "streams", None)
        return stack[-1] if stack else self.null_stream

    def push_stream(self, stream) -> None:
        self._tls.__dict__.setdefault("streams", []).append(stream)

    def pop_stream(self) -> None:
        self._tls.streams.pop()

    def launch(self, what: str, kind: str = "kernel") -> int:
        """Stream-ordered work on the current stream; its stream handle."""
        ptr = self.current_stream().ptr
        self.calls.append((kind, what, ptr))
        self.busy.add(ptr)
        return ptr

    def synchronized(self, ptr: int | None = None) -> None:
        """The host waited for stream ``ptr`` (None: the whole device)."""
        if ptr is None:
            self.busy.clear()
        else:
            self.busy.discard(ptr)

    def query(self, what: str) -> None:
        cap = self.global_capture
        me = threading.current_thread()
        if cap is not None and cap is not me and me.ident not in self.relaxed_threads:
            self.capture_invalidated.append(f"{what} from {me.name}")
            raise RuntimeError(f"{what}: cudaErrorStreamCaptureUnsupported (another thread's"
                               " global-mode capture is invalidated)")
        self.queries += 1


class FakeLibcuda:
    """``ctypes.CDLL('libcuda.so.1')`` for :func:`install`'s state: the capture mode call."""

    def __init__(self, st: State):
        self.st = st

    def cuThreadExchangeStreamCaptureMode(self, mode_ref):  # noqa: N802 - the driver's name
        mode = mode_ref._obj
        me = threading.current_thread().ident
        old = 2 if me in self.st.relaxed_threads else 0
        (self.st.relaxed_threads.add if mode.value == 2 else self.st.relaxed_threads.discard)(me)
        mode.value = old
        return 0


def install(ndev=2, *, bus_ids=None, nccl_available=True, nccl_version=21805,
            init_error=None) -> State:
    """Replace ``cupy`` in ``sys.modules`` by the stand-in; return its state.

    ``init_error``: a message; ``NcclCommunicator(...)`` then raises
    ``NcclError(init_error)`` (as ``ncclCommInitRank`` failing does).
    """
    if bus_ids is not None:
        ndev = len(bus_ids)
    st = State(ndev, bus_ids, nccl_available, nccl_version, init_error)

    class Device:
        def __init__(self, i=None):
            self.id = st.current if i is None else int(i)
            if not 0 <= self.id < max(st.ndev, 1) or st.ndev == 0:
                raise RuntimeError(f"cudaErrorInvalidDevice: invalid device ordinal {self.id}")

        def use(self):
            st.current = self.id
            st.uses.append(self.id)

        def __enter__(self):
            self._prev = st.current
            st.current = self.id
            return self

        def __exit__(self, *exc):
            st.current = self._prev

        def synchronize(self):
            st.synchronized()

        attributes = {"MultiProcessorCount": 132}

    class ndarray:  # noqa: N801 - CuPy's name
        def __init__(self, a, device=None):
            self.a = np.array(a)
            self.device = Device(st.current if device is None else device)
            self.data = types.SimpleNamespace(ptr=id(self))
            st.arrays[id(self)] = self
            st.launch(f"h2d {self.a.size}", "copy")  # filled on the current stream

        dtype = property(lambda s: s.a.dtype)
        shape = property(lambda s: s.a.shape)
        ndim = property(lambda s: s.a.ndim)
        size = property(lambda s: s.a.size)
        flags = property(lambda s: s.a.flags)

        def get(self, stream=None):
            # a blocking copy: waits for the current stream first
            st.calls.append(("copy", f"d2h {self.a.size}", st.current_stream().ptr))
            st.synchronized(st.current_stream().ptr)
            return self.a.copy()

        def set(self, arr, stream=None):
            st.launch(f"h2d {self.a.size}", "copy")
            self.a[...] = arr

        def __int__(self):  # a 0-d array, as in CuPy (a device->host copy)
            return int(self.a)

        def astype(self, dtype, copy=True):
            return ndarray(self.a.astype(dtype), self.device.id)

        def copy(self):
            return ndarray(self.a.copy(), self.device.id)

    ndarray.__module__ = "cupy"

    def array(a, dtype=None, copy=True):
        host = a.a if isinstance(a, ndarray) else np.asarray(a)
        return ndarray(np.array(host, dtype=dtype), st.current)

    def get_device_count():
        return st.ndev

    def device_get_pci_bus_id(i):
        if not 0 <= i < st.ndev:
            raise RuntimeError(f"cudaErrorInvalidDevice: invalid device ordinal {i}")
        return st.bus_ids[i]

    class NcclCommunicator:
        def __init__(self, size, uid, rank):
            if st.init_error:
                raise NcclError(st.init_error)
            self.size, self.uid, self.rank = size, uid, rank
            self.device = st.current
            self.destroyed = self.aborted = False
            st.nccl_comms.append(self)

        def check_async_error(self):
            pass

        def allReduce(self, send, recv, count, dtype, op, stream):  # noqa: N802 - NCCL's name
            # ordered on the stream handle given; a sum over this one
            # process's group leaves the values as they are
            st.calls.append(("nccl", f"allReduce {count}", int(stream)))
            st.busy.add(int(stream))
            buf = st.arrays[send]
            assert send == recv and count == buf.a.size, (send, recv, count)

        def destroy(self):
            self.destroyed = True

        def abort(self):
            self.aborted = True

    class Stream:
        _next = [0x5000]

        def __init__(self, null=False, non_blocking=False, ptr=None):
            if ptr is None:
                ptr = 0 if null else Stream._next[0]
                Stream._next[0] += 0x10
            self.ptr = int(ptr)

        def __enter__(self):
            st.push_stream(self)
            return self

        def __exit__(self, *exc):
            st.pop_stream()

        def use(self):
            st._tls.streams = [self]
            return self

        def synchronize(self):
            st.synchronized(self.ptr)

        def is_capturing(self):
            return False

        def __eq__(self, other):
            return isinstance(other, Stream) and other.ptr == self.ptr

        def __hash__(self):
            return hash(self.ptr)

    class ExternalStream(Stream):
        def __init__(self, ptr, device_id=-1):
            super().__init__(ptr=ptr)
            self.device_id = device_id

    st.null_stream = Stream.null = Stream(null=True)

    class Event:
        def __init__(self, *a, **k):
            pass

        def record(self, stream=None):
            pass

        def synchronize(self):
            st.synchronized()

        @property
        def done(self):
            st.query("cudaEventQuery")
            return True

    runtime = types.ModuleType("cupy.cuda.runtime")
    runtime.getDeviceCount = get_device_count
    runtime.deviceGetPCIBusId = device_get_pci_bus_id
    runtime.setDevice = lambda i: None
    nccl = types.ModuleType("cupy.cuda.nccl")
    nccl.available = nccl_available
    nccl.NCCL_FLOAT64, nccl.NCCL_SUM = 8, 0
    nccl.NcclError = NcclError
    nccl.NcclCommunicator = NcclCommunicator
    nccl.get_version = lambda: st.nccl_version
    nccl.get_unique_id = lambda: bytes(range(128))
    cuda = types.ModuleType("cupy.cuda")
    cuda.nccl, cuda.runtime, cuda.Device, cuda.Event = nccl, runtime, Device, Event
    cuda.Stream, cuda.ExternalStream = Stream, ExternalStream
    cuda.get_current_stream = st.current_stream

    class _Allocator:
        """``using_allocator``: the current allocator, for the ``with`` block."""

        def __init__(self, malloc):
            self.malloc = malloc

        def __enter__(self):
            st._tls.__dict__.setdefault("allocators", []).append(self.malloc)

        def __exit__(self, *exc):
            st._tls.allocators.pop()

    def alloc(size):
        """An allocation through the current allocator (as CuPy makes one)."""
        stack = getattr(st._tls, "allocators", None)
        if stack:
            return stack[-1](size)
        st.allocs.append((size, st.current))
        return None

    class PythonFunctionAllocator:
        def __init__(self, malloc, free):
            self._malloc, self._free = malloc, free

        def malloc(self, size):
            st.allocs.append((size, st.current))
            return self._malloc(size, st.current)

    cuda.using_allocator = _Allocator
    cuda.memory = types.SimpleNamespace(PythonFunctionAllocator=PythonFunctionAllocator)
    st.alloc = alloc
    cupy = types.ModuleType("cupy")
    cupy.cuda, cupy.ndarray, cupy.array = cuda, ndarray, array
    cupy.asnumpy = lambda a, stream=None: a.get() if isinstance(a, ndarray) else np.asarray(a)
    cupy.fake_state = st
    sys.modules.update({"cupy": cupy, "cupy.cuda": cuda, "cupy.cuda.nccl": nccl,
                        "cupy.cuda.runtime": runtime})
    return st


def mpi_comm(st: State, size: int = 2, cuda_aware: bool = False):
    """An ``mpi4py`` communicator (over ``COMM_SELF``) whose ``Allreduce`` checks residency.

    The group has ``size`` ranks that all hold the same values, so a sum
    multiplies the buffer by ``size``. A device array (the stand-in's
    ``cupy.ndarray``) is accepted only from a CUDA-aware MPI (``cuda_aware``)
    and only when no stream has work queued that MPI would race with (it does
    not know CuPy's streams). Each call is recorded in ``st.calls`` as
    ``("mpi", "device"|"host", current stream handle)``.
    """
    from mpi4py import MPI

    class RecordingComm(MPI.Intracomm):
        def Get_size(self):  # noqa: N802 - MPI's name
            return size

        def Allreduce(self, sendbuf, recvbuf, op=None):  # noqa: N802 - MPI's name
            assert sendbuf is MPI.IN_PLACE and op == MPI.SUM
            cp = sys.modules["cupy"]
            device = isinstance(recvbuf, cp.ndarray)
            st.calls.append(("mpi", "device" if device else "host", st.current_stream().ptr))
            if device:
                assert cuda_aware, "a device buffer handed to an MPI that is not CUDA-aware"
                assert not st.busy, (
                    f"CUDA-aware MPI reads a device buffer while streams {sorted(st.busy)} still"
                    " have work queued (no stream synchronization before the MPI call)")
                recvbuf.a *= size
            else:
                assert isinstance(recvbuf, np.ndarray) and not isinstance(recvbuf, cp.ndarray)
                recvbuf *= size

    return RecordingComm(MPI.COMM_SELF)


def uninstall(saved: dict) -> None:
    """Restore the ``sys.modules`` entries saved by :func:`save`."""
    for name in NAMES:
        if saved.get(name) is None:
            sys.modules.pop(name, None)
        else:
            sys.modules[name] = saved[name]


def save() -> dict:
    """The current ``sys.modules`` entries that :func:`install` replaces."""
    return {name: sys.modules.get(name) for name in NAMES}
