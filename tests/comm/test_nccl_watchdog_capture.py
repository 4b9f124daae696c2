"""The NCCL watchdog thread and CUDA-graph capture (issue #20, item 4).

Under a global-mode stream capture (``torch.cuda.graph``'s default) CUDA
invalidates the capture when another thread queries an event, unless that
thread is in relaxed capture mode. The stand-in (``support.fake_cupy``)
models the rule and the driver call that changes the mode
(``cuThreadExchangeStreamCaptureMode``, reached through ``ctypes`` as on a
GPU machine: CuPy does not wrap it).
"""

import threading
import time
import types

import pytest
from support import fake_cupy


class _Owner:
    device_id = 0

    def __init__(self):
        self._nccl = types.SimpleNamespace(check_async_error=lambda: None)
        self.failures = []

    def _fail(self, reason):
        self.failures.append(reason)


@pytest.fixture
def fake(monkeypatch):
    saved = fake_cupy.save()
    st = fake_cupy.install(1)
    from cupysyncbn.comm import nccl

    monkeypatch.setattr(nccl.ctypes, "CDLL", lambda name: fake_cupy.FakeLibcuda(st))
    try:
        yield st, nccl
    finally:
        fake_cupy.uninstall(saved)


def _watch_during_capture(st, nccl):
    import cupy

    owner = _Owner()
    st.global_capture = threading.current_thread()  # a graph capture is open here
    wd = nccl._Watchdog(owner, timeout=30)
    try:
        for _ in range(3):
            wd.watch(cupy.cuda.get_current_stream())
            time.sleep(4 * nccl._POLL_S)
    finally:
        wd.stop()
        st.global_capture = None
    return wd, owner


def test_watchdog_queries_do_not_invalidate_a_global_capture(fake):
    st, nccl = fake
    wd, owner = _watch_during_capture(st, nccl)
    assert wd.relaxed is True
    assert st.queries >= 3  # the watchdog did query its events during the capture
    assert st.capture_invalidated == [] and owner.failures == []


def test_the_stand_in_catches_a_watchdog_without_relaxed_mode(fake, monkeypatch):
    """The guard can fail: a thread in the default mode invalidates the capture."""
    st, nccl = fake
    monkeypatch.setattr(nccl, "relax_capture_mode", lambda cupy: False)
    monkeypatch.setattr(threading, "excepthook", lambda args: None)  # the thread's raise
    _watch_during_capture(st, nccl)
    assert st.capture_invalidated and "cudaEventQuery" in st.capture_invalidated[0]


def test_relaxed_mode_without_a_driver_is_reported(monkeypatch):
    from cupysyncbn.comm import nccl

    def missing(name):
        raise OSError(f"{name}: cannot open shared object file")
    monkeypatch.setattr(nccl.ctypes, "CDLL", missing)
    fake_rt = types.SimpleNamespace(cuda=types.SimpleNamespace(runtime=types.SimpleNamespace()))
    assert nccl.relax_capture_mode(fake_rt) is False
