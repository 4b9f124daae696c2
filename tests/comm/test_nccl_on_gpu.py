"""Communicators for CuPy arrays on a real GPU: NCCL (one rank) and MPI (several ranks).

NCCL cannot put two ranks on one GPU, so on a one-GPU machine NCCL is tested
with one rank and forced collectives (the whole synchronized path: handshake,
header, one NCCL all-reduce per pass; plus sub-group, layer, watchdog) and the
multi-rank logic with MPI over CuPy arrays (host staging) on 2 and 3 ranks
sharing the GPU. Needs a CUDA GPU (skipped with the reason otherwise). The
communicator's logic without a GPU: ``test_nccl_communicator.py``.
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


def _nccl_skip_reason():
    reason = _gpu_skip_reason()
    if reason:
        return reason
    from cupy.cuda import nccl

    return None if nccl.available else "NCCL library not loadable (nvidia-nccl-cu12 missing)"


GPU_REASON = _gpu_skip_reason()


def _results(tmp_path):
    # one file per rank: ranks' stdout lines can interleave under mpiexec
    out = [json.loads(p.read_text()) for p in sorted(tmp_path.glob("res_*.json"))]
    return sorted(out, key=lambda r: r["rank"])


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
    from cupysyncbn._sync import protocol

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
