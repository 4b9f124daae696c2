"""A recording stand-in for CuPy: NumPy-backed arrays, our kernels emulated.

Installed as ``sys.modules['cupy']`` (see :func:`installed`), it lets the real
layer -> functional -> ``CupyBackend`` -> communicator path run on a machine
without a GPU. ``RawModule`` kernels run in the C++ emulation of
:mod:`cuda_emu` (the exact kernel text the real loader compiles), and a
:class:`Recorder` counts what a GPU would see:

* ``kernels``: launches of our RawModule kernels (name, grid, block);
* ``ops``: every other CuPy operation that launches device work (ufuncs,
  array functions, ``astype``/``copy``/``fill``, item assignment, memsets);
* ``allocs``: allocations (``empty``, ``zeros``...);
* ``d2h``: device->host copies; ``async_d2h``: copies without a host wait;
* ``syncs``: host synchronizations (stream/event/device synchronize and the
  implicit ones of blocking copies); ``queries``: event queries;
* ``on_stream``: ``(kind, what, stream handle)`` of every launch, operation
  and copy, in order: streams are first-class (``cupy.cuda.Stream`` objects
  with distinct handles, ``Stream.null`` is 0, ``with stream:``/``use()``
  make one current per thread, ``ExternalStream`` wraps a foreign handle).

Launch configuration is checked: a kernel instantiated with a 32-bit index
(``..., int>``) must not see an index past ``2**31 - 1`` (its grid-stride
loop reaches ``size + grid * block``). :func:`logical` makes an array of a
huge logical shape backed by one element: a launch that gets one is
recorded and checked but not run, so the index-type switch is tested
without allocating 2**31 elements.

Completion is asynchronous, as on a GPU whose host runs ahead: a recorded
event is not ``done`` until the host synchronizes, so a path that waits for
one shows a sync.
"""

from __future__ import annotations

import contextlib
import ctypes
import sys
import threading
import types

import numpy as np

from support import cuda_emu


class Recorder:
    """Counters of one measured region."""

    _LISTS = ("kernels", "ops", "allocs", "d2h", "async_d2h", "h2d", "syncs", "queries",
              "on_stream")

    def __init__(self):
        for name in self._LISTS:
            setattr(self, name, [])
        self.capturing = False
        # False: the null stand-in, launches recorded but not executed (the
        # host path's own time, without the emulation's; results are garbage)
        self.execute = True

    def clear(self):
        for name in self._LISTS:  # in place: launchers hold the kernels list
            getattr(self, name).clear()

    def summary(self):
        return {"kernels": len(self.kernels), "ops": len(self.ops), "d2h": len(self.d2h),
                "syncs": len(self.syncs), "allocs": len(self.allocs),
                "queries": len(self.queries)}


REC = Recorder()
_TLS = threading.local()  # each thread's stack of current streams


def _current():
    stack = getattr(_TLS, "streams", None)
    return stack[-1] if stack else Stream.null


def _on_stream(kind, what):
    """Device work on the current stream: recorded with the stream's handle."""
    REC.on_stream.append((kind, what, _current().ptr))


def _op(name):
    REC.ops.append(name)
    _on_stream("op", name)


def _plain(a):
    if isinstance(a, ndarray):
        return a.view(np.ndarray)
    if isinstance(a, (list, tuple)):
        return type(a)(_plain(v) for v in a)
    return a


def _wrap(r):
    if isinstance(r, np.ndarray) and not isinstance(r, ndarray):
        return r.view(ndarray)
    if isinstance(r, tuple):
        return tuple(_wrap(v) for v in r)
    return r


class _Ptr:
    def __init__(self, ptr):
        self.ptr = ptr


class Device:
    """``cupy.cuda.Device``: one device, id 0."""

    def __init__(self, id=0):  # noqa: A002 - CuPy's name
        self.id = 0
        self.attributes = {"MultiProcessorCount": 4}

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def synchronize(self):
        REC.syncs.append("device")
        _device_caught_up()

    def use(self):
        pass


class ndarray(np.ndarray):  # noqa: N801 - CuPy's name
    """A device array (host memory); operations on it are recorded."""

    def __array_ufunc__(self, ufunc, method, *inputs, **kwargs):
        _op(f"ufunc:{ufunc.__name__}")
        if "out" in kwargs:
            kwargs["out"] = _plain(kwargs["out"])
        return _wrap(getattr(ufunc, method)(*_plain(inputs), **kwargs))

    def __array_function__(self, func, types_, args, kwargs):
        _op(f"func:{func.__name__}")
        return _wrap(func(*_plain(args), **{k: _plain(v) for k, v in kwargs.items()}))

    @property
    def device(self):
        return Device()

    @property
    def data(self):  # CuPy's MemoryPointer, just the address
        return _Ptr(self.ctypes.data)

    def astype(self, dtype, *args, copy=True, **kwargs):
        if not copy and np.dtype(dtype) == self.dtype:
            return self
        _op("astype")
        return _wrap(self.view(np.ndarray).astype(dtype, *args, copy=True, **kwargs))

    def copy(self, *args, **kwargs):
        _op("copy")
        return _wrap(self.view(np.ndarray).copy(*args, **kwargs))

    def fill(self, value):
        _op("fill")
        self.view(np.ndarray).fill(value)

    def __setitem__(self, key, value):
        _op("setitem")
        self.view(np.ndarray)[key] = _plain(value)

    def get(self, stream=None, out=None, **kwargs):
        REC.d2h.append("get")
        _on_stream("copy", "d2h")
        REC.syncs.append("get")
        _device_caught_up()
        return np.array(self.view(np.ndarray), copy=True)

    def set(self, arr, stream=None):
        REC.h2d.append("set")
        _on_stream("copy", "h2d")
        self.view(np.ndarray)[...] = arr

    def __bool__(self):
        REC.d2h.append("bool")
        REC.syncs.append("bool")
        _device_caught_up()
        return bool(self.view(np.ndarray))

    def __int__(self):
        REC.d2h.append("int")
        REC.syncs.append("int")
        _device_caught_up()
        return int(self.view(np.ndarray))

    def __float__(self):
        REC.d2h.append("float")
        REC.syncs.append("float")
        _device_caught_up()
        return float(self.view(np.ndarray))


class Stream:
    """A CUDA stream with its own handle (``Stream.null``: handle 0)."""

    _next = [0x1000]

    def __init__(self, null=False, non_blocking=False, ptr=None):
        if ptr is None:
            ptr = 0 if null else Stream._next[0]
            Stream._next[0] += 0x10
        self.ptr = int(ptr)

    def __enter__(self):
        _TLS.__dict__.setdefault("streams", []).append(self)
        return self

    def __exit__(self, *exc):
        _TLS.streams.pop()

    def use(self):
        _TLS.streams = [self]
        return self

    def synchronize(self):
        REC.syncs.append("stream")
        _device_caught_up()

    def is_capturing(self):
        return REC.capturing

    def __eq__(self, other):
        return isinstance(other, Stream) and other.ptr == self.ptr

    def __hash__(self):
        return hash(self.ptr)


Stream.null = Stream(null=True)


class ExternalStream(Stream):
    """A stream made elsewhere (PyTorch's), known by its handle."""

    def __init__(self, ptr, device_id=-1):
        super().__init__(ptr=ptr)


_RECORDED = set()  # events recorded and not yet known complete to the host
_RECORDED_LOCK = threading.Lock()  # ranks as threads record and synchronize


def _device_caught_up():
    """A host synchronization: every recorded event is complete from now on."""
    with _RECORDED_LOCK:
        for ev in _RECORDED:
            ev._done = True
        _RECORDED.clear()


class Event:
    """Asynchronous completion, as on a GPU whose host runs ahead: a recorded
    event is not ``done`` until the host synchronizes (on it, its stream or
    the device)."""

    def __init__(self, block=False, disable_timing=False, interprocess=False):
        self._done = True  # never recorded: complete (CUDA's cudaEventQuery)

    def record(self, stream=None):
        with _RECORDED_LOCK:
            self._done = False
            _RECORDED.add(self)

    @property
    def done(self):
        REC.queries.append("event")
        return self._done

    def synchronize(self):
        if not self._done:
            REC.syncs.append("event")
        self._done = True




def _memcpy_async(dst, src, size, kind, stream):
    assert kind == 2, "only device->host copies are expected"
    REC.async_d2h.append(size)
    REC.on_stream.append(("copy", "d2h async", int(stream)))
    ctypes.memmove(dst, src, size)


class RawModule:
    """Our kernel files; ``get_function`` runs the emulated kernel."""

    def __init__(self, code=None, options=(), name_expressions=()):
        self.names = set(name_expressions)
        REC.compiled = getattr(REC, "compiled", 0) + 1

    def get_function(self, name):
        assert name in self.names, name
        lib, symbols = _LIB
        run = cuda_emu.launcher(lib, symbols, name, REC.kernels)
        dry = cuda_emu.launcher(lib, symbols, name, REC.kernels, execute=False)

        def call(grid, block, args):
            if not REC.execute:  # the null mode: recorded only, as cheap as can be
                REC.kernels.append((name, grid, block))
                return
            _check_index_type(name, grid, block, args)
            _on_stream("kernel", name)
            if any(isinstance(a, _Logical) for a in args):
                dry(grid, block, args)  # checked and recorded, not run
                return
            with _LAUNCH_LOCK:  # the emulation's grid state is global
                run(grid, block, args)
        return call


_LAUNCH_LOCK = threading.Lock()
_INT32_MAX = 2**31 - 1


def _check_index_type(name, grid, block, args):
    """A kernel with a 32-bit index (``<..., int>``) must not overflow it.

    Its grid-stride loop visits ``i = tid, tid + stride, ...`` while
    ``i < size``: the last increment reaches ``size + stride - 1`` with
    ``stride = grid * block`` threads, for every array it indexes.
    """
    if not name.replace(" ", "").endswith(",int>"):
        return
    threads = 1
    for v in (*grid, *block):
        threads *= int(v)
    for a in args:
        if isinstance(a, np.ndarray):
            assert a.size + threads - 1 <= _INT32_MAX, (
                f"{name}: a 32-bit index over {a.size} elements with {threads} threads"
                " overflows (int32 index past 2**31: needs the long long instantiation)")


class _Logical(ndarray):
    """A device array of a huge logical shape, backed by one element."""

    _lshape = ()

    @property
    def shape(self):
        return self._lshape

    @property
    def size(self):
        n = 1
        for d in self._lshape:
            n *= int(d)
        return n

    @property
    def ndim(self):
        return len(self._lshape)


def logical(shape, dtype):
    """A device array of shape ``shape`` whose elements are never allocated.

    Kernel launches that receive one are recorded and checked (launch
    configuration, argument types, index type) but not run; outputs the
    backend allocates for it with ``empty`` are logical too.
    """
    a = np.zeros(1, dtype=dtype).view(_Logical)
    a._lshape = tuple(int(d) for d in shape)
    return a


def _empty(shape, dtype=float, order="C"):
    REC.allocs.append("empty")
    n = 1
    for d in (shape if isinstance(shape, tuple) else (shape,)):
        n *= int(d)
    if n > _INT32_MAX // 4:  # only logical arrays get this large here
        return logical(shape if isinstance(shape, tuple) else (shape,), dtype)
    return np.empty(shape, dtype=dtype).view(ndarray)


def _empty_like(a, dtype=None):
    REC.allocs.append("empty_like")
    return np.empty_like(_plain(a), dtype=dtype).view(ndarray)


def _filled(name, fill):
    def make(shape, dtype=float):
        REC.allocs.append(name)
        _op(name)
        return np.full(shape, fill, dtype=dtype).view(ndarray)
    return make


def _ascontiguousarray(a, dtype=None):
    dt = a.dtype if dtype is None else np.dtype(dtype)
    if isinstance(a, ndarray) and a.flags.c_contiguous and a.dtype == dt:
        return a
    _op("ascontiguousarray")
    return np.ascontiguousarray(_plain(a), dtype=dt).view(ndarray)


def _asarray(a, dtype=None, copy=None):
    if isinstance(a, ndarray) and copy:
        _op("copy")
        return _wrap(np.array(_plain(a), dtype=dtype, copy=True))
    if isinstance(a, ndarray):
        return _ascontiguousarray(a, dtype) if dtype is not None else a
    REC.h2d.append("asarray")
    REC.allocs.append("asarray")
    return np.array(a, dtype=dtype).view(ndarray)


def _asnumpy(a, stream=None):
    if isinstance(a, ndarray):
        REC.d2h.append("asnumpy")
        REC.syncs.append("asnumpy")
        _device_caught_up()
        return np.array(a.view(np.ndarray), copy=True)
    return np.asarray(a)


def _make_module():
    cp = types.ModuleType("cupy")
    cp.__fake__ = True
    cp.ndarray = ndarray
    cp.empty = _empty
    cp.empty_like = _empty_like
    cp.zeros = _filled("zeros", 0)
    cp.ones = _filled("ones", 1)
    cp.ascontiguousarray = _ascontiguousarray
    cp.asarray = _asarray
    cp.array = _asarray
    cp.asnumpy = _asnumpy
    cp.RawModule = RawModule
    cuda = types.ModuleType("cupy.cuda")
    cuda.Device = Device
    cuda.Event = Event
    cuda.Stream = Stream
    cuda.ExternalStream = ExternalStream
    cuda.get_current_stream = _current
    cuda.alloc_pinned_memory = lambda n: bytearray(n)
    rt = types.ModuleType("cupy.cuda.runtime")
    rt.memcpyDeviceToHost = 2
    rt.memcpyAsync = _memcpy_async
    rt.getDeviceCount = lambda: 1
    cuda.runtime = rt
    cp.cuda = cuda

    def __getattr__(name):  # any other NumPy function: a recorded op
        fn = getattr(np, name)
        if not callable(fn) or isinstance(fn, type):
            return fn

        def op(*args, **kwargs):
            _op(f"np:{name}")
            return _wrap(fn(*_plain(args), **{k: _plain(v) for k, v in kwargs.items()}))
        return op

    cp.__getattr__ = __getattr__
    return cp


_LIB = None


@contextlib.contextmanager
def installed():
    """Make ``import cupy`` give the stand-in; yield it (and its recorder)."""
    global _LIB
    if _LIB is None:
        _LIB = cuda_emu.build()
    from cupysyncbn.backends import NUMPY_BACKEND
    from cupysyncbn.backends.cupy import backend as cb

    cp = _make_module()
    saved = sys.modules.get("cupy")
    np_cls = type(NUMPY_BACKEND)
    owns = np_cls.owns
    sys.modules["cupy"] = cp
    np_cls.owns = lambda self, a: isinstance(a, np.ndarray) and not isinstance(a, ndarray)
    cb.get_cupy_backend.cache_clear()
    try:
        yield cp
    finally:
        np_cls.owns = owns
        cb.get_cupy_backend.cache_clear()
        if saved is None:
            sys.modules.pop("cupy", None)
        else:
            sys.modules["cupy"] = saved
