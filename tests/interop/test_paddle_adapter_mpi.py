"""Paddle adapter under mpiexec (CPU tensors, MPI) against Paddle on the global batch.

One mpiexec job per rank count runs every check and then the conformance CLI
with ``:paddle_adapter`` (importing Paddle takes seconds per rank).
"""

import pytest
from support.mpi_runner import run_mpi

from cupysyncbn import conformance as C

pytest.importorskip("paddle")

# Paddle's own BatchNorm warns on every training forward (the reference here).
pytestmark = pytest.mark.filterwarnings("ignore:When training, we now always track")

MPI_SCRIPT = r"""
import copy, sys
import numpy as np, paddle
from mpi4py import MPI
from cupysyncbn.interop.paddle import SyncBatchNorm, convert_sync_batchnorm

comm = MPI.COMM_WORLD
rank, size = comm.Get_rank(), comm.Get_size()
counts = [8] if size == 1 else [3, 5, 0]          # uneven, last rank empty
assert len(counts) == size
lo = sum(counts[:rank]); sl = slice(lo, lo + counts[rank]); N = sum(counts)
worst = {}

def arr(t):
    return t.numpy().astype(np.float64)

def rec(name, a, b, rel=False):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    e = float(np.abs(a - b).max()) if b.size else 0.0
    if rel and b.size:
        e /= max(float(np.abs(b).max()), 1e-300)
    worst[name] = max(worst.get(name, 0.0), e)

def allsum(t):
    return comm.allreduce(arr(t), op=MPI.SUM)

def tensor(a, grad=False):
    return paddle.to_tensor(np.ascontiguousarray(a), stop_gradient=not grad)

passes = []
for dtype in ("float64", "float32"):
    for fmt in ("NCHW", "NHWC", "NC"):
        paddle.set_default_dtype(dtype)
        rng = np.random.default_rng(0)  # same data on every rank: each slices its part
        if fmt == "NC":
            ref, bn = paddle.nn.BatchNorm1D(4), SyncBatchNorm(4, data_format="NCL", comm=comm)
            shape = (N, 4)
        else:
            ref = paddle.nn.BatchNorm2D(4, data_format=fmt)
            bn = SyncBatchNorm(4, data_format=fmt, comm=comm)
            shape = (N, 4, 3, 5) if fmt == "NCHW" else (N, 3, 5, 4)
        w, b = rng.uniform(0.5, 1.5, 4).astype(dtype), rng.uniform(-0.5, 0.5, 4).astype(dtype)
        for layer in (ref, bn):
            layer.weight.set_value(w); layer.bias.set_value(b)
        calls = []
        inner = bn.comm.allreduce_sum
        bn.comm.allreduce_sum = lambda buf: calls.append(1) or inner(buf)
        key = f"{dtype}_{fmt}"
        for step in range(3):
            x = (rng.normal(size=shape) * (1 + step) + 3 * step).astype(dtype)
            dy = rng.normal(size=shape).astype(dtype)
            xr = tensor(x, True); yr = ref(xr); yr.backward(tensor(dy))
            xl = tensor(x[sl], True)
            before = len(calls); yl = bn(xl); fwd = len(calls) - before
            yl.backward(tensor(dy[sl])); bwd = len(calls) - before - fwd
            if step:
                passes.append((fwd, bwd))
            rec(f"{key}_y", arr(yl), arr(yr)[sl]); rec(f"{key}_dx", arr(xl.grad), arr(xr.grad)[sl])
            # float32 parameter gradients are sums of 100+ float32 terms of
            # order 10: Paddle's own rounding is ~3e-5 absolute, so relative.
            r = "_r" if dtype == "float32" else ""
            rec(f"{key}_dweight_sum{r}", allsum(bn.weight.grad), arr(ref.weight.grad), bool(r))
            rec(f"{key}_dbias_sum{r}", allsum(bn.bias.grad), arr(ref.bias.grad), bool(r))
            rec(f"{key}_mean_rel", arr(bn._mean), arr(ref._mean), rel=True)
            rec(f"{key}_variance_rel", arr(bn._variance), arr(ref._variance), rel=True)
            ref.clear_gradients(); bn.clear_gradients()
        ref.eval(); bn.eval()
        x = rng.normal(size=shape).astype(dtype)
        before = len(calls)
        with paddle.no_grad():
            rec(f"{key}_y_eval_rel", arr(bn(tensor(x[sl]))), arr(ref(tensor(x)))[sl], rel=True)
        assert len(calls) == before, "eval must not communicate"
        rs = comm.allgather(bn._variance.numpy().tobytes() + bn._mean.numpy().tobytes())
        assert all(r == rs[0] for r in rs), "running statistics differ across ranks"
# steady state: one collective per forward and one per backward (none on one rank)
assert set(passes) == ({(1, 1)} if size > 1 else {(0, 0)}), passes

# A converted Sequential(Conv2D, BatchNorm2D, ReLU) trained 5 SGD steps on the
# split batch (rank-summed gradients) equals the one-process model.
paddle.set_default_dtype("float64")
paddle.seed(1)
model = paddle.nn.Sequential(
    paddle.nn.Conv2D(3, 4, 3, padding=1), paddle.nn.BatchNorm2D(4), paddle.nn.ReLU())
sync = convert_sync_batchnorm(copy.deepcopy(model), comm=comm)
assert isinstance(sync[1], SyncBatchNorm) and not isinstance(model[1], SyncBatchNorm)
opt_r = paddle.optimizer.SGD(0.05, parameters=model.parameters())
opt_s = paddle.optimizer.SGD(0.05, parameters=sync.parameters())
rng = np.random.default_rng(2)
for step in range(5):
    x = rng.normal(size=(N, 3, 6, 6)) + step
    wl = rng.normal(size=(N, 4, 6, 6))
    (model(tensor(x)) * tensor(wl)).sum().backward()
    yl = sync(tensor(x[sl]))
    (yl * tensor(wl[sl])).sum().backward()
    for p in sync.parameters():
        if p.grad is not None:  # data-parallel sum of the local gradients
            g = np.from_dlpack(p.grad.detach())
            g[...] = comm.allreduce(g.copy(), op=MPI.SUM)
    opt_r.step(); opt_s.step(); opt_r.clear_grad(); opt_s.clear_grad()
    rec("convert_conv_weight", arr(sync[0].weight), arr(model[0].weight))
    rec("convert_bn_weight", arr(sync[1].weight), arr(model[1].weight))
    rec("convert_bn_bias", arr(sync[1].bias), arr(model[1].bias))
    rec("convert_mean_rel", arr(sync[1]._mean), arr(model[1]._mean), rel=True)
    rec("convert_variance_rel", arr(sync[1]._variance), arr(model[1]._variance), rel=True)
model.eval(); sync.eval()
x = rng.normal(size=(N, 3, 6, 6))
rec("convert_y_eval_rel", arr(sync(tensor(x[sl]))), arr(model(tensor(x)))[sl], rel=True)

worst = {k: comm.allreduce(v, op=MPI.MAX) for k, v in worst.items()}
if rank == 0:
    for k, v in sorted(worst.items()):
        print(f"MAXERR {k} {v:.3e}")
sys.stdout.flush()
comm.Barrier()

from cupysyncbn.conformance.__main__ import main
rc = main(["--impl", "cupysyncbn.conformance.impls:paddle_adapter"])
print(f"CONFORMANCE_RC {rc}")
sys.exit(rc)
"""


def _limit(name):
    if name.endswith("_r"):
        return 1e-5  # relative to the largest |reference| value
    if name.endswith("_rel"):
        return 1e-6  # Paddle keeps momentum in float32 (conformance data README)
    return 1e-5 if name.startswith("float32") else 1e-9


@pytest.mark.mpi
@pytest.mark.parametrize("n", [1, 3])
def test_paddle_adapter_under_mpiexec_equals_paddle_global_batch(n, tmp_path):
    res = run_mpi(MPI_SCRIPT, n, timeout=300, tmp_path=tmp_path)
    out = res.stdout
    errs = {ln.split()[1]: float(ln.split()[2]) for ln in out.splitlines()
            if ln.startswith("MAXERR")}
    print(f"ranks={n}", errs)
    for dtype in ("float64", "float32"):
        for fmt in ("NCHW", "NHWC", "NC"):
            r = "_r" if dtype == "float32" else ""
            for q in ("y", "dx", f"dweight_sum{r}", f"dbias_sum{r}", "mean_rel",
                      "variance_rel", "y_eval_rel"):
                assert f"{dtype}_{fmt}_{q}" in errs
    assert {"convert_conv_weight", "convert_bn_weight", "convert_mean_rel",
            "convert_y_eval_rel"} <= set(errs)
    bad = {k: v for k, v in errs.items() if not v <= _limit(k)}
    assert not bad, bad
    # the conformance CLI with the built-in paddle_adapter, on the same ranks
    assert out.count("CONFORMANCE_RC 0") == n, out
    k = len(C.case_files())
    assert f"ranks: {n}" in out and f"{k}/{k} cases pass" in out and "conformance: PASS" in out
