"""Communicators for CuPy arrays: NCCL (one rank) and MPI (several ranks).

NCCL cannot put two ranks on one GPU, so on a one-GPU machine NCCL is tested
with one rank and forced collectives (the whole synchronized path: handshake,
header, one NCCL all-reduce per pass; plus sub-group, layer, watchdog) and the
multi-rank logic with MPI over CuPy arrays (host staging) on 2 and 3 ranks
sharing the GPU. The first test runs on any machine: when some rank cannot
use NCCL, every rank gets the same CommunicatorError and ``init('auto')``
falls back to MPI together. Placement and agreement with 0-8 GPUs are in
``test_placement_mpi.py`` (a stand-in for CUDA's device queries).
"""

import json

import pytest
from mpi_runner import run_mpi


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


def _nccl_skip_reason():
    reason = _gpu_skip_reason()
    if reason:
        return reason
    from cupy.cuda import nccl

    return None if nccl.available else "NCCL library not loadable (nvidia-nccl-cu12 missing)"


GPU_REASON = _gpu_skip_reason()
gpu = [pytest.mark.gpu, pytest.mark.skipif(GPU_REASON is not None, reason=str(GPU_REASON))]


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


NCCL_ONE = r"""
import json, os
import numpy as np
import cupy as cp
from mpi4py import MPI
import cupysyncbn as sbn
from cupysyncbn.comm.base import LOCAL
from cupysyncbn.errors import CommunicatorError

comm = sbn.init("nccl", force_collectives=True)  # the synchronized path on one GPU
assert comm.backend == "nccl" and comm.size == 1 and comm.rank == 0, comm
assert comm.synchronizes
buf = cp.arange(7, dtype=cp.float64) * 0.5
out = comm.allreduce_sum(buf)
assert out is buf and cp.array_equal(buf, cp.arange(7) * 0.5)
host = np.arange(5.0)
comm.allreduce_sum(host)  # NumPy buffers go through MPI
assert np.array_equal(host, np.arange(5.0))
assert comm.supports(buf) and comm.supports(host)
sub = comm.split(0)
assert sub.backend == "nccl" and sub.size == 1
sub.allreduce_sum(buf)
try:
    comm.allreduce_sum(cp.zeros(3, dtype=cp.float32))
    raise SystemExit("float32 buffer accepted")
except TypeError:
    pass

rng = np.random.default_rng(0)
x = (rng.standard_normal((6, 4, 5, 5)) * 3 + 2).astype(np.float32)
dy = rng.standard_normal(x.shape).astype(np.float32)
ref = sbn.SyncBatchNorm(4, comm=LOCAL)
lay = sbn.SyncBatchNorm(4, comm=comm).to("cuda")
errs = []
calls = []  # pass markers and the size of every all-reduce of the NCCL communicator
inner = comm.allreduce_sum
comm.allreduce_sum = lambda buf: (calls.append(buf.size), inner(buf))[1]
for step in range(3):
    calls.append("fwd")
    y_r, y_g = ref(x), lay(cp.asarray(x))
    calls.append("bwd")
    dx_r, dx_g = ref.backward(dy), lay.backward(cp.asarray(dy))
    errs.append(float(np.abs(cp.asnumpy(y_g) - y_r).max()))
    errs.append(float(np.abs(cp.asnumpy(dx_g) - dx_r).max()))
for k, v in ref.state_dict().items():
    errs.append(float(np.abs(cp.asnumpy(lay.state_dict()[k]) - v).max()))
del comm.allreduce_sum

# Watchdog: a collective stuck behind a 4 s kernel trips a 0.5 s timeout.
spin = cp.RawKernel(r'''
extern "C" __global__ void spin(long long cycles) {
  long long t0 = clock64();
  while (clock64() - t0 < cycles) { }
}''', "spin")
from cupysyncbn.comm.nccl import NCCLCommunicator
short = NCCLCommunicator(MPI.COMM_WORLD, timeout=0.5)
rate = cp.cuda.Device().attributes.get("ClockRate", 2_000_000) * 1000  # kHz -> Hz
spin((1,), (1,), (np.int64(4 * rate),))
short.allreduce_sum(cp.ones(4))
import time
time.sleep(2.0)
tripped = False
try:
    short.allreduce_sum(cp.ones(4))
except CommunicatorError as e:
    tripped = "did not complete" in str(e)
res = {"rank": 0, "errs": errs, "tripped": tripped, "calls": calls}
with open("res_0.json", "w") as f:
    f.write(json.dumps(res))
# An aborted NCCL communicator may leave the CUDA context unusable (as after
# PyTorch's watchdog): leave without touching the GPU again.
MPI.Finalize()
os._exit(0)
"""


@pytest.mark.mpi
@pytest.mark.gpu
@pytest.mark.skipif(_nccl_skip_reason() is not None, reason=str(_nccl_skip_reason()))
def test_nccl_one_rank(tmp_path):
    proc = run_mpi(NCCL_ONE, 1, timeout=300, tmp_path=tmp_path,
                   env={"CUPYSYNCBN_NCCL_ABORT": "0"})
    (res,) = _results(tmp_path)
    assert max(res["errs"]) < 2e-5, res
    assert res["tripped"], proc.stderr
    # Forced collectives over NCCL: after the first forward, exactly one
    # all-reduce per pass (header + 2C floats).
    calls = res["calls"]
    from cupysyncbn import protocol

    first = calls[:calls.index("bwd")]
    assert first[0] == "fwd" and 2 <= len(first) <= 4, calls  # handshake + first pass
    steady = calls[calls.index("bwd"):]
    h = protocol.HEADER + 8  # C = 4
    assert steady == ["bwd", h] + ["fwd", h, "bwd", h] * 2, calls


MPI_CUPY = r"""
import json
import numpy as np
import cupy as cp
from mpi4py import MPI
import cupysyncbn as sbn
from cupysyncbn.comm.base import LOCAL

w = MPI.COMM_WORLD
rank, size = w.Get_rank(), w.Get_size()
counts = [5, 0, 9][:size] if size == 3 else [14 // size] * size
counts[-1] += 14 - sum(counts)
lo = sum(counts[:rank]); hi = lo + counts[rank]
comm = sbn.init("mpi")
auto = sbn.init("auto")
results = {}
for fmt, shape in (("NCHW", (14, 3, 6, 5)), ("NHWC", (14, 6, 5, 3)), ("NC", (14, 3))):
    for idt, pdt in (("float32", "float32"), ("float64", "float64"), ("float16", "float32")):
        for name, cm in (("mpi", comm), ("auto", auto)):
            rng = np.random.default_rng(1)
            xs = [(rng.standard_normal(shape) * 2 + 5).astype(idt) for _ in range(2)]
            dys = [rng.standard_normal(shape).astype(idt) for _ in range(2)]
            ref = sbn.SyncBatchNorm(3, data_format=fmt, comm=LOCAL, dtype=pdt)
            lay = sbn.SyncBatchNorm(3, data_format=fmt, comm=cm, dtype=pdt).to("cuda")
            err = 0.0
            for x, dy in zip(xs, dys):
                y_r, y_g = ref(x), lay(cp.asarray(x[lo:hi]))
                dx_r, dx_g = ref.backward(dy), lay.backward(cp.asarray(dy[lo:hi]))
                assert isinstance(y_g, cp.ndarray) and y_g.dtype == x.dtype
                for g, r in ((y_g, y_r), (dx_g, dx_r)):  # initial=0: rank 1 is empty
                    d = np.abs(cp.asnumpy(g).astype("f8") - r[lo:hi])
                    err = max(err, float(d.max(initial=0.0)))
            for k, v in ref.state_dict().items():
                err = max(err, float(np.abs(cp.asnumpy(lay.state_dict()[k]) - v).max()))
            g = cp.asnumpy(lay.weight.grad).astype("f8")
            w.Allreduce(MPI.IN_PLACE, g)  # local grads sum to the global one
            err = max(err, float(np.abs(g - ref.weight.grad).max()))
            results[f"{fmt}/{idt}/{name}"] = err
res = {"rank": rank, "errs": results, "auto": auto.backend}
open(f"res_{rank}.json", "w").write(json.dumps(res))
"""


@pytest.mark.mpi
@pytest.mark.gpu
@pytest.mark.parametrize("k", [2, 3])
def test_mpi_over_cupy_arrays_several_ranks(tmp_path, k):
    if GPU_REASON is not None:
        pytest.skip(GPU_REASON)
    run_mpi(MPI_CUPY, k, timeout=300, tmp_path=tmp_path)
    res = _results(tmp_path)
    assert len(res) == k
    tol = {"float32": 2e-5, "float64": 1e-11, "float16": 8e-3}
    for r in res:
        assert r["auto"] in ("mpi", "nccl")
        for case, err in r["errs"].items():
            assert err <= tol[case.split("/")[1]] * 10, (r["rank"], case, err)
    assert len({r["auto"] for r in res}) == 1


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
        assert send == recv and dtype == 8 and op == 0 and stream == 0
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
cuda.get_current_stream = lambda: types.SimpleNamespace(ptr=0)
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
