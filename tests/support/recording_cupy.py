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
  implicit ones of blocking copies); ``queries``: event queries.

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

    _LISTS = ("kernels", "ops", "allocs", "d2h", "async_d2h", "h2d", "syncs", "queries")

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
        REC.ops.append(f"ufunc:{ufunc.__name__}")
        if "out" in kwargs:
            kwargs["out"] = _plain(kwargs["out"])
        return _wrap(getattr(ufunc, method)(*_plain(inputs), **kwargs))

    def __array_function__(self, func, types_, args, kwargs):
        REC.ops.append(f"func:{func.__name__}")
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
        REC.ops.append("astype")
        return _wrap(self.view(np.ndarray).astype(dtype, *args, copy=True, **kwargs))

    def copy(self, *args, **kwargs):
        REC.ops.append("copy")
        return _wrap(self.view(np.ndarray).copy(*args, **kwargs))

    def fill(self, value):
        REC.ops.append("fill")
        self.view(np.ndarray).fill(value)

    def __setitem__(self, key, value):
        REC.ops.append("setitem")
        self.view(np.ndarray)[key] = _plain(value)

    def get(self, stream=None, out=None, **kwargs):
        REC.d2h.append("get")
        REC.syncs.append("get")
        _device_caught_up()
        return np.array(self.view(np.ndarray), copy=True)

    def set(self, arr, stream=None):
        REC.h2d.append("set")
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
    ptr = 0

    def synchronize(self):
        REC.syncs.append("stream")
        _device_caught_up()

    def is_capturing(self):
        return REC.capturing


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

        def call(grid, block, args):
            if not REC.execute:
                REC.kernels.append((name, grid, block))
                return
            with _LAUNCH_LOCK:  # the emulation's grid state is global
                run(grid, block, args)
        return call


_LAUNCH_LOCK = threading.Lock()


def _empty(shape, dtype=float, order="C"):
    REC.allocs.append("empty")
    return np.empty(shape, dtype=dtype).view(ndarray)


def _empty_like(a, dtype=None):
    REC.allocs.append("empty_like")
    return np.empty_like(_plain(a), dtype=dtype).view(ndarray)


def _filled(name, fill):
    def make(shape, dtype=float):
        REC.allocs.append(name)
        REC.ops.append(name)
        return np.full(shape, fill, dtype=dtype).view(ndarray)
    return make


def _ascontiguousarray(a, dtype=None):
    dt = a.dtype if dtype is None else np.dtype(dtype)
    if isinstance(a, ndarray) and a.flags.c_contiguous and a.dtype == dt:
        return a
    REC.ops.append("ascontiguousarray")
    return np.ascontiguousarray(_plain(a), dtype=dt).view(ndarray)


def _asarray(a, dtype=None, copy=None):
    if isinstance(a, ndarray) and copy:
        REC.ops.append("copy")
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
    cuda.get_current_stream = lambda: Stream()
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
            REC.ops.append(f"np:{name}")
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
