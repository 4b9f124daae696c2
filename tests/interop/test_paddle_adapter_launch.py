"""Paddle adapter under ``python -m paddle.distributed.launch`` (CPU, Gloo collectives).

Two processes, no mpiexec: the statistics travel through
``paddle.distributed.all_reduce`` (cupysyncbn.comm.paddle), with the same
header protocol as MPI.
"""

import json
import sys
from pathlib import Path

import pytest
from support.mpi_runner import mpi_env, run_job

pytest.importorskip("paddle")

# Paddle's own BatchNorm warns on every training forward (the reference here).
pytestmark = pytest.mark.filterwarnings("ignore:When training, we now always track")

SCRIPT = r"""
import json, os, sys
import numpy as np, paddle, paddle.distributed as dist

out_dir = sys.argv[1]
dist.init_parallel_env()
import cupysyncbn as sbn
from cupysyncbn.comm import as_communicator
from cupysyncbn.comm.paddle import PaddleCommunicator
from cupysyncbn.errors import RemoteInputError
from cupysyncbn.interop.paddle import SyncBatchNorm

rank, size = dist.get_rank(), dist.get_world_size()
res = {"rank": rank, "size": size}
auto = sbn.init("auto")  # Paddle's global group, found without being asked
group = dist.new_group(list(range(size)))
gcomm = as_communicator(group)
res["auto_backend"], res["auto_size"] = auto.backend, auto.size
res["cached"] = as_communicator(group) is gcomm and sbn.init("paddle") is auto
res["keys_differ"] = gcomm.group_key() != auto.group_key()
res["host_sum"] = auto.allreduce_host(np.array([rank + 1.0, 10.0])).tolist()
res["max"] = auto.allreduce_max(np.array([rank + 1.0, -rank - 1.0])).tolist()

calls = []
for c in (auto, gcomm):
    c._reduce_tensor = (lambda inner: lambda *a: calls.append(1) or inner(*a))(c._reduce_tensor)

def tensor(a, grad=False):
    return paddle.to_tensor(np.ascontiguousarray(a), stop_gradient=not grad)

def err(a, b, rel=False):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    e = float(np.abs(a - b).max()) if b.size else 0.0
    return e / max(float(np.abs(b).max()), 1e-300) if rel and b.size else e

worst, passes = {}, []
configs = [("float64", "NCHW", None, [3, 5]), ("float32", "NHWC", group, [5, 0])]
for dtype, fmt, comm, counts in configs:
    paddle.set_default_dtype(dtype)
    lo = sum(counts[:rank]); sl = slice(lo, lo + counts[rank]); N = sum(counts)
    shape = (N, 4, 3, 5) if fmt == "NCHW" else (N, 3, 5, 4)
    ref = paddle.nn.BatchNorm2D(4, data_format=fmt)
    bn = SyncBatchNorm(4, data_format=fmt, comm=comm)
    rng = np.random.default_rng(0)
    w, b = rng.uniform(0.5, 1.5, 4).astype(dtype), rng.uniform(-0.5, 0.5, 4).astype(dtype)
    for layer in (ref, bn):
        layer.weight.set_value(w); layer.bias.set_value(b)
    key = f"{dtype}_{fmt}"
    def rec(k, v):
        worst[f"{key}_{k}"] = max(worst.get(f"{key}_{k}", 0.0), v)
    for step in range(3):
        x = (rng.normal(size=shape) * (1 + step) + 3 * step).astype(dtype)
        dy = rng.normal(size=shape).astype(dtype)
        xr = tensor(x, True); yr = ref(xr); yr.backward(tensor(dy))
        xl = tensor(x[sl], True)
        n0 = len(calls); yl = bn(xl); n1 = len(calls); yl.backward(tensor(dy[sl]))
        if step:
            passes.append([n1 - n0, len(calls) - n1])
        gw = bn.weight.grad.clone(); gb = bn.bias.grad.clone()
        dist.all_reduce(gw); dist.all_reduce(gb)  # rank-summed parameter gradients
        rec("y", err(yl.numpy(), yr.numpy()[sl]))
        rec("dx", err(xl.grad.numpy(), xr.grad.numpy()[sl]))
        r = dtype == "float32"  # float32 sums: relative (see test_paddle_adapter_mpi)
        rec("dweight_sum" + "_r" * r, err(gw.numpy(), ref.weight.grad.numpy(), rel=r))
        rec("dbias_sum" + "_r" * r, err(gb.numpy(), ref.bias.grad.numpy(), rel=r))
        rec("mean_rel", err(bn._mean.numpy(), ref._mean.numpy(), rel=True))
        rec("variance_rel", err(bn._variance.numpy(), ref._variance.numpy(), rel=True))
        ref.clear_gradients(); bn.clear_gradients()
    ref.eval(); bn.eval()
    x = rng.normal(size=shape).astype(dtype)
    n0 = len(calls)
    rec("y_eval_rel", err(bn(tensor(x[sl])).numpy(), ref(tensor(x)).numpy()[sl], rel=True))
    res[f"{key}_eval_calls"] = len(calls) - n0
res["worst"], res["passes"] = worst, passes

# A wrong channel count on rank 1: every rank raises instead of hanging.
paddle.set_default_dtype("float32")
bn = SyncBatchNorm(4)
try:
    bn(paddle.zeros([2, 3 if rank == 1 else 4, 2, 2]))
    res["error"] = None
except RemoteInputError as e:
    res["error"] = "RemoteInputError"
except ValueError as e:
    res["error"] = "ValueError: " + str(e)
with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
    json.dump(res, f)
"""


@pytest.mark.mpi
def test_adapter_under_paddle_launch_two_cpu_processes(tmp_path):
    script = tmp_path / "launch_case.py"
    script.write_text(SCRIPT)
    env = mpi_env()
    for var in [k for k in env if k.startswith(("PMI_", "OMPI_", "PMIX_", "PADDLE_"))]:
        del env[var]  # a clean, non-MPI job
    cmd = [sys.executable, "-m", "paddle.distributed.launch", "--nproc_per_node", "2",
           "--log_dir", str(tmp_path / "log"), str(script), str(tmp_path)]
    proc = run_job(cmd, 240, "paddle.distributed.launch", env, tmp_path, merge_stderr=True)
    out = proc.stdout
    logs = "".join(p.read_text() for p in sorted(Path(tmp_path / "log").glob("workerlog.*")))
    assert proc.returncode == 0, out + logs
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for r, res in enumerate(ranks):
        assert res["rank"] == r and res["size"] == 2
        assert res["auto_backend"] == "paddle" and res["auto_size"] == 2
        assert res["cached"] and res["keys_differ"]
        assert res["host_sum"] == [3.0, 20.0]
        assert res["max"] == [2.0, -1.0]  # the reproducible mode's bound pass
        # steady state: one all-reduce per forward, one per backward; none in eval
        assert res["passes"] and all(p == [1, 1] for p in res["passes"]), res["passes"]
        assert res["float64_NCHW_eval_calls"] == 0 and res["float32_NHWC_eval_calls"] == 0
        worst = res["worst"]
        print(f"rank {r}", worst)
        assert len(worst) == 14
        for k, v in worst.items():
            if k.endswith("_rel"):
                limit = 1e-6
            elif k.endswith("_r") or k.startswith("float32"):
                limit = 1e-5
            else:
                limit = 1e-9
            assert v <= limit, (k, v)
    assert ranks[1]["error"].startswith("ValueError") and "channels" in ranks[1]["error"]
    assert ranks[0]["error"] == "RemoteInputError"
