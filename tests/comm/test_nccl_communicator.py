"""The NCCL communicator's logic and agreement, on any machine (no GPU needed).

When some rank cannot use NCCL, every rank gets the same CommunicatorError
and ``init('auto')`` falls back to MPI together; the real ``NCCLCommunicator``
code (agreement, id broadcast, device choice, split, routing, watchdog, close)
runs over a CPU stand-in for ``cupy``/``cupy.cuda.nccl`` on 2 ranks; NCCL unique
ids of either CuPy generation; the timeout setting. NCCL and MPI over CuPy
arrays on a real GPU: ``test_nccl_on_gpu.py``. Placement and agreement with
0-8 GPUs are in ``runtime/test_placement_mpi.py`` (a stand-in for CUDA's device
queries).
"""

import json

import pytest
from support.mpi_runner import run_mpi


def _gpu_skip_reason():
    try:
        import cupy
    except Exception as e:
        return f"CuPy is not importable ({type(e).__name__}: {e})"
    try:
        n = cupy.cuda.runtime.getDeviceCount()
    except Exception as e:
        return f"no usable CUDA GPU ({type(e).__name__}: {e})"
    return None if n > 0 else "no CUDA GPU on this machine"


GPU_REASON = _gpu_skip_reason()


def _results(tmp_path):
    # one file per rank: ranks' stdout lines can interleave under mpiexec
    out = [json.loads(p.read_text()) for p in sorted(tmp_path.glob("res_*.json"))]
    return sorted(out, key=lambda r: r["rank"])


AGREE = r"""
import json
import numpy as np
from mpi4py import MPI
import cupysyncbn as sbn
from cupysyncbn.comm.nccl import NCCLCommunicator
from cupysyncbn.errors import CommunicatorError
w = MPI.COMM_WORLD
try:
    c = NCCLCommunicator(w)
    outcome, msg = "nccl", ""
    c.close()
except CommunicatorError as e:
    outcome, msg = "error", str(e)
comm = sbn.init("auto")
buf = np.full(3, w.Get_rank() + 1.0)
comm.allreduce_sum(buf)
res = {"rank": w.Get_rank(), "outcome": outcome, "msg": msg, "auto": comm.backend,
       "sum": buf.tolist()}
open(f"res_{w.Get_rank()}.json", "w").write(json.dumps(res))
"""


@pytest.mark.mpi
def test_nccl_unavailable_raises_on_every_rank_and_auto_falls_back(tmp_path):
    run_mpi(AGREE, 2, timeout=120, tmp_path=tmp_path)
    res = _results(tmp_path)
    assert len(res) == 2
    assert len({r["outcome"] for r in res}) == 1, res
    assert len({r["auto"] for r in res}) == 1, res
    for r in res:
        assert r["sum"] == [3.0, 3.0, 3.0]
        if r["outcome"] == "error":
            assert r["msg"].startswith("backend 'nccl' unavailable: rank"), r
            assert r["auto"] == "mpi"
    if GPU_REASON is not None:  # CPU machine: NCCL cannot work
        assert res[0]["outcome"] == "error" and res[0]["auto"] == "mpi"


def test_nccl_unique_id_of_either_cupy_generation():
    # CuPy 13: get_unique_id() -> tuple of 128 signed chars; CuPy 14: bytes.
    from cupysyncbn.comm.nccl import _make_nccl_comm

    raw = bytes(range(256))[::2]  # 128 bytes, half of them > 127

    class Nccl13:
        @staticmethod
        def NcclCommunicator(size, uid, rank):
            if not isinstance(uid, tuple):
                raise TypeError("commId must be a tuple")
            return ("13", size, uid, rank)

    class Nccl14:
        @staticmethod
        def NcclCommunicator(size, uid, rank):
            if not isinstance(uid, bytes):
                raise TypeError("commId must be bytes")
            return ("14", size, uid, rank)

    signed = tuple(b - 256 if b > 127 else b for b in raw)
    assert _make_nccl_comm(Nccl13, 2, signed, 1) == ("13", 2, signed, 1)
    assert _make_nccl_comm(Nccl13, 2, raw, 1) == ("13", 2, signed, 1)
    assert _make_nccl_comm(Nccl14, 3, raw, 0) == ("14", 3, raw, 0)
    assert _make_nccl_comm(Nccl14, 3, signed, 0) == ("14", 3, raw, 0)


def test_nccl_timeout_setting(monkeypatch):
    from cupysyncbn.comm.nccl import _timeout_from_env

    monkeypatch.delenv("CUPYSYNCBN_NCCL_TIMEOUT", raising=False)
    monkeypatch.delenv("CUPYSYNCBN_TIMEOUT", raising=False)
    assert _timeout_from_env() == 600
    monkeypatch.setenv("CUPYSYNCBN_TIMEOUT", "42")
    assert _timeout_from_env() == 42
    monkeypatch.setenv("CUPYSYNCBN_NCCL_TIMEOUT", "7.5")
    assert _timeout_from_env() == 7.5
    monkeypatch.setenv("CUPYSYNCBN_NCCL_TIMEOUT", "soon")
    with pytest.raises(ValueError, match="CUPYSYNCBN_NCCL_TIMEOUT"):
        _timeout_from_env()


FAKE_CUPY = r"""
# A stand-in for cupy/cupy.cuda.nccl (CPU only): "device" arrays wrap NumPy
# arrays and the fake NCCL all-reduce sums them over MPI, so the real
# NCCLCommunicator code (agreement, id broadcast, device choice, split,
# routing, watchdog, close) runs without a GPU.
import json, sys, types
import numpy as np
from mpi4py import MPI

REG = {}
class ndarray:
    def __init__(self, a):
        self.a = np.ascontiguousarray(a)
        REG[id(self)] = self
        self.data = types.SimpleNamespace(ptr=id(self))
        self.device = types.SimpleNamespace(id=DEV["cur"])
    dtype = property(lambda s: s.a.dtype)
    ndim = property(lambda s: s.a.ndim)
    size = property(lambda s: s.a.size)
    flags = property(lambda s: s.a.flags)

DEV = {"cur": 0, "count": 2, "events": 0}
class Device:
    def __init__(self, i=None): self.id = DEV["cur"] if i is None else i
    def use(self): DEV["cur"] = self.id
    def __enter__(self): self.prev = DEV["cur"]; DEV["cur"] = self.id; return self
    def __exit__(self, *a): DEV["cur"] = self.prev
    def synchronize(self): pass
class Event:
    def __init__(self, block=False, disable_timing=False, interprocess=False): pass
    def record(self, stream): DEV["events"] += 1
    done = True
WORLD = MPI.COMM_WORLD
class NcclCommunicator:
    def __init__(self, size, uid, rank):
        assert isinstance(uid, bytes) and len(uid) == 128
        ids = WORLD.allgather(uid)
        assert all(i == ids[0] for i in ids), "ranks got different NCCL ids"
        self.size, self.rank, self.uid = size, rank, uid
        self.destroyed = self.aborted = False
    def allReduce(self, send, recv, count, dtype, op, stream):
        # on CuPy's current stream (a side stream here), not the null stream 0
        assert send == recv and dtype == 8 and op == 0 and stream == CURRENT.ptr != 0
        arr = REG[send].a
        assert arr.size == count
        self.group.Allreduce(MPI.IN_PLACE, arr, op=MPI.SUM)
    def check_async_error(self): pass
    def destroy(self): self.destroyed = True
    def abort(self): self.aborted = True
nccl = types.ModuleType("cupy.cuda.nccl")
nccl.available, nccl.NCCL_FLOAT64, nccl.NCCL_SUM = True, 8, 0
nccl.NcclCommunicator = NcclCommunicator
nccl.get_unique_id = lambda: bytes(range(128))
runtime = types.SimpleNamespace(getDeviceCount=lambda: DEV["count"], setDevice=lambda i: None)
cuda = types.ModuleType("cupy.cuda")
cuda.nccl, cuda.runtime, cuda.Device, cuda.Event = nccl, runtime, Device, Event
CURRENT = types.SimpleNamespace(ptr=0x5E00)
cuda.get_current_stream = lambda: CURRENT
cupy = types.ModuleType("cupy")
cupy.cuda, cupy.ndarray = cuda, ndarray
sys.modules.update({"cupy": cupy, "cupy.cuda": cuda, "cupy.cuda.nccl": nccl})

from cupysyncbn.comm.nccl import NCCLCommunicator
rank = WORLD.Get_rank()
comm = NCCLCommunicator(WORLD, timeout=5)
comm._nccl.group = WORLD
out = {"rank": rank, "device": comm.device_id, "cur": DEV["cur"], "backend": comm.backend}
buf = ndarray(np.arange(4.0) + rank)
comm.allreduce_sum(buf)
out["sum"] = buf.a.tolist()
host = np.full(2, rank + 1.0)
comm.allreduce_sum(host)
out["host"] = host.tolist()
sub = comm.split(rank % 2)
sub._nccl.group = WORLD.Split(rank % 2, rank)
b2 = ndarray(np.ones(3))
sub.allreduce_sum(b2)
out["sub"] = [sub.size, b2.a.tolist()]
errs = []
for bad in (ndarray(np.ones(3, np.float32)), ndarray(np.ones((2, 2)))):
    try:
        comm.allreduce_sum(bad)
    except TypeError:
        errs.append("type")
out["errs"] = errs
out["events"] = DEV["events"]
comm.close()
out["destroyed"] = comm._nccl.destroyed
with open(f"res_{rank}.json", "w") as f:
    f.write(json.dumps(out))
"""


@pytest.mark.mpi
def test_nccl_communicator_logic_with_fake_cupy(tmp_path):
    # 2 ranks, 2 "GPUs": device by node-local rank, one id for all, sums right.
    run_mpi(FAKE_CUPY, 2, timeout=120, tmp_path=tmp_path)
    res = _results(tmp_path)
    assert [r["device"] for r in res] == [0, 1] and [r["cur"] for r in res] == [0, 1]
    for r in res:
        assert r["backend"] == "nccl"
        assert r["sum"] == [1.0, 3.0, 5.0, 7.0] and r["host"] == [3.0, 3.0]
        assert r["sub"] == [1, [1.0, 1.0, 1.0]]
        assert r["errs"] == ["type", "type"]
        assert r["events"] == 2  # one watchdog event per device all-reduce
        assert r["destroyed"]
