"""Stream order and buffer residency of the GPU collectives, on a machine without a GPU.

The stand-in for CuPy (``support.fake_cupy``) has first-class streams: work
is recorded with the stream it is ordered on, and a stream stays busy until
the host waits for it. Its MPI communicator checks where each buffer lives:
a device buffer only for a CUDA-aware MPI and only with no stream work
pending. These tests fail for the bugs a GPU run would show only by chance:
the host-staged MPI result never copied back to the device, no stream
synchronization before a CUDA-aware MPI call, NCCL on the null stream
instead of the current one, PyTorch's current stream (and caching
allocator) ignored by the PyTorch adapter, and ``comm/torch.py`` putting a
CuPy buffer's all-reduce on PyTorch's default stream instead of CuPy's.
"""

import types

import numpy as np
import pytest
from support import fake_cupy

from cupysyncbn.comm.mpi import MPICommunicator
from cupysyncbn.runtime import env, placement


@pytest.fixture
def cupy_standin(monkeypatch):
    """The stand-in installed as ``cupy`` with one GPU; yields ``(cupy, state)``."""
    saved = fake_cupy.save()
    for var in (*env.LOCAL_RANK_VARS, env.DEVICE_ENV, env.CUDA_AWARE_ENV):
        monkeypatch.delenv(var, raising=False)
    placement._reset_for_tests()
    st = fake_cupy.install(1)
    import cupy

    yield cupy, st
    fake_cupy.uninstall(saved)
    placement._reset_for_tests()


def _kinds(st, kind):
    return [c for c in st.calls if c[0] == kind]


def test_mpi_host_staged_result_is_copied_back_to_the_device(cupy_standin):
    cupy, st = cupy_standin
    comm = MPICommunicator(fake_cupy.mpi_comm(st, size=3), cuda_aware=False)
    values = np.arange(5.0) - 1.5
    with cupy.cuda.Stream() as s:
        buf = cupy.array(values)
        assert comm.allreduce_sum(buf) is buf
    np.testing.assert_array_equal(buf.a, 3 * values)  # the sum is on the device
    # MPI saw a host buffer; the copies around it are on the current stream
    assert _kinds(st, "mpi") == [("mpi", "host", s.ptr)]
    kinds = [(k, w.split()[0]) for k, w, _ in st.calls]
    assert kinds == [("copy", "h2d"), ("copy", "d2h"), ("mpi", "host"), ("copy", "h2d")]
    assert {p for _, _, p in st.calls} == {s.ptr}


def test_cuda_aware_mpi_waits_for_the_current_stream(cupy_standin):
    cupy, st = cupy_standin
    comm = MPICommunicator(fake_cupy.mpi_comm(st, size=2, cuda_aware=True), cuda_aware=True)
    values = np.linspace(-1.0, 2.0, 7)
    with cupy.cuda.Stream() as s:
        buf = cupy.array(values)  # device work still queued on s
        assert s.ptr in st.busy
        comm.allreduce_sum(buf)  # the stand-in MPI refuses a busy stream
    np.testing.assert_array_equal(buf.a, 2 * values)
    assert _kinds(st, "mpi") == [("mpi", "device", s.ptr)]
    assert not _kinds(st, "copy")[1:], "CUDA-aware MPI must not stage through the host"


def test_cuda_aware_from_the_environment(cupy_standin, monkeypatch):
    cupy, st = cupy_standin
    monkeypatch.setenv(env.CUDA_AWARE_ENV, "1")
    comm = MPICommunicator(fake_cupy.mpi_comm(st, size=2, cuda_aware=True))
    buf = cupy.array(np.ones(3))
    comm.allreduce_sum(buf)
    np.testing.assert_array_equal(buf.a, 2.0)
    assert _kinds(st, "mpi") == [("mpi", "device", 0)]


def test_standin_mpi_refuses_device_buffers_it_cannot_read(cupy_standin):
    # the checks themselves: a test relying on them must be able to fail
    cupy, st = cupy_standin
    plain = fake_cupy.mpi_comm(st, size=2, cuda_aware=False)
    aware = fake_cupy.mpi_comm(st, size=2, cuda_aware=True)
    from mpi4py import MPI

    buf = cupy.array(np.ones(2))
    with pytest.raises(AssertionError, match="not CUDA-aware"):
        plain.Allreduce(MPI.IN_PLACE, buf, op=MPI.SUM)
    with pytest.raises(AssertionError, match="no stream synchronization"):
        aware.Allreduce(MPI.IN_PLACE, buf, op=MPI.SUM)
    cupy.cuda.get_current_stream().synchronize()
    aware.Allreduce(MPI.IN_PLACE, buf, op=MPI.SUM)
    np.testing.assert_array_equal(buf.a, 2.0)


@pytest.fixture
def nccl_comm(cupy_standin):
    from mpi4py import MPI

    from cupysyncbn.comm.nccl import NCCLCommunicator

    cupy, st = cupy_standin
    comm = NCCLCommunicator(MPI.COMM_SELF, timeout=0)
    yield cupy, st, comm
    comm.close()


def test_nccl_all_reduce_is_ordered_on_the_current_stream(nccl_comm):
    cupy, st, comm = nccl_comm
    for stream in (cupy.cuda.Stream(), cupy.cuda.ExternalStream(0xABC0, 0)):
        assert stream.ptr != 0
        with stream:
            buf = cupy.array(np.arange(3.0))
            comm.allreduce_sum(buf)
        # after the fill, on the same stream, and the stream is not waited for
        assert st.calls[-2:] == [("copy", "h2d 3", stream.ptr), ("nccl", "allReduce 3",
                                                                 stream.ptr)]
        assert stream.ptr in st.busy
    # the default stream is the null stream: handle 0 is then right
    buf = cupy.array(np.ones(2))
    comm.allreduce_sum(buf)
    assert st.calls[-1] == ("nccl", "allReduce 2", 0)


# -- the PyTorch adapter's CUDA path ------------------------------------------------

class _FakeCudaTensor:
    """What ``_on_torch_stream`` reads of a CUDA tensor."""

    is_cuda = True

    def __init__(self, index):
        self.device = types.SimpleNamespace(index=index, type="cuda")


@pytest.fixture
def torch_cuda(monkeypatch, cupy_standin):
    """PyTorch's current stream and caching allocator, faked; yields a dict to set."""
    torch = pytest.importorskip("torch", reason="needs PyTorch (the GPU tests need it too)")
    cupy, st = cupy_standin
    now = {"stream": 0x7E50, "allocs": []}

    def current_stream(device=None):
        return types.SimpleNamespace(cuda_stream=now["stream"], device=device)

    def caching_allocator_alloc(size, device, stream):
        now["allocs"].append((size, device, stream))
        return 0xA000 + len(now["allocs"])

    monkeypatch.setattr(torch.cuda, "current_stream", current_stream)
    monkeypatch.setattr(torch.cuda, "caching_allocator_alloc", caching_allocator_alloc)
    monkeypatch.setattr(torch.cuda, "caching_allocator_delete", lambda ptr: None)
    yield cupy, st, now


def test_torch_adapter_runs_cupy_on_torchs_current_stream(torch_cuda):
    from cupysyncbn.interop.torch import _on_torch_stream

    cupy, st, now = torch_cuda
    before = cupy.cuda.get_current_stream()
    for side in (0x7E50, 0x7F00):  # the default-stream handle and a side stream
        now["stream"] = side
        with _on_torch_stream(_FakeCudaTensor(0)):
            assert cupy.cuda.get_current_stream().ptr == side
            st.launch("normalize")
            ptr = st.alloc(64)  # CuPy's allocations come from PyTorch's allocator
        assert st.calls[-1] == ("kernel", "normalize", side)
        assert now["allocs"][-1] == (64, 0, side) and ptr == 0xA000 + len(now["allocs"])
        assert cupy.cuda.get_current_stream() is before  # restored on exit
    # PyTorch's legacy default stream (handle 0) is CuPy's null stream
    now["stream"] = 0
    with _on_torch_stream(_FakeCudaTensor(0)):
        assert cupy.cuda.get_current_stream() is cupy.cuda.Stream.null


def test_torch_adapter_cpu_tensor_leaves_cupy_alone(torch_cuda):
    import torch

    from cupysyncbn.interop.torch import _on_torch_stream

    cupy, st, now = torch_cuda
    with _on_torch_stream(torch.zeros(2)):
        assert cupy.cuda.get_current_stream().ptr == 0
    assert not now["allocs"]


# -- comm/torch.py: CuPy buffers over torch.distributed ---------------------------

class _TorchStream:
    def __init__(self, ptr, device=None):
        self.cuda_stream = ptr


class _DlpackTensor:
    """``torch.from_dlpack`` of a stand-in CuPy array: shares its memory."""

    def __init__(self, buf, now):
        self.buf, self.now = buf, now

    def cpu(self):
        import torch

        # a device->host copy: waits for the stream it is issued on
        self.now["calls"].append(("d2h", self.now["stream"].cuda_stream))
        return torch.from_numpy(self.buf.a.copy())

    def copy_(self, src):
        self.now["calls"].append(("h2d", self.now["stream"].cuda_stream))
        self.buf.a[...] = src.numpy()
        return self


@pytest.fixture
def torch_comm(monkeypatch, cupy_standin):
    """A ``TorchCommunicator`` of 2 ranks holding the same values, torch.cuda faked."""
    import contextlib

    import torch

    from cupysyncbn.comm.torch import TorchCommunicator

    cupy, st = cupy_standin
    now = {"stream": _TorchStream(0), "calls": []}

    @contextlib.contextmanager
    def stream(s):
        old, now["stream"] = now["stream"], s
        try:
            yield
        finally:
            now["stream"] = old

    monkeypatch.setattr(torch.cuda, "default_stream", lambda dev=None: _TorchStream(0))
    monkeypatch.setattr(torch.cuda, "ExternalStream", _TorchStream)
    monkeypatch.setattr(torch.cuda, "stream", stream)
    monkeypatch.setattr(torch.cuda, "device", lambda i: contextlib.nullcontext())
    monkeypatch.setattr(torch, "from_dlpack", lambda buf: _DlpackTensor(buf, now))

    class Dist:
        class ReduceOp:
            SUM, MAX = "sum", "max"

        @staticmethod
        def all_reduce(t, op="sum", group=None):
            assert op == "sum"
            on_device = isinstance(t, _DlpackTensor)
            now["calls"].append(("all_reduce " + ("cuda" if on_device else "cpu"),
                                 now["stream"].cuda_stream))
            if on_device:
                t.buf.a *= 2
            else:
                t.mul_(2)

    comm = object.__new__(TorchCommunicator)  # the group itself is not needed here
    comm.group, comm.rank, comm.size = object(), 0, 2
    comm._dist, comm._torch = Dist, torch
    comm.cpu_direct = True
    yield cupy, st, comm, now


@pytest.mark.parametrize("cuda_direct", [True, False], ids=["nccl-group", "gloo-group"])
def test_torch_communicator_runs_on_cupys_current_stream(torch_comm, cuda_direct):
    cupy, st, comm, now = torch_comm
    comm.cuda_direct = cuda_direct
    values = np.arange(4.0) - 1.0
    side = cupy.cuda.Stream()
    for s in (side, cupy.cuda.Stream.null):
        now["calls"].clear()
        with s:
            buf = cupy.array(values)
            assert comm.allreduce_sum(buf) is buf
        np.testing.assert_array_equal(buf.a, 2 * values)
        if cuda_direct:  # on the device, ordered on CuPy's stream
            assert now["calls"] == [("all_reduce cuda", s.ptr)]
        else:  # staged: both copies on CuPy's stream (the first one waits for it)
            assert now["calls"] == [("d2h", s.ptr), ("all_reduce cpu", s.ptr),
                                    ("h2d", s.ptr)]
