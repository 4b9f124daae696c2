"""Two nodes simulated on one machine by MPICH: ``-launcher fork -hosts A:2,B:2``.

Hydra starts ranks 0, 1 on "node" A and 2, 3 on "node" B (every process
here, but MPICH treats them as two nodes: node-local ranks 0, 1 on each,
shared memory only inside a node, the network path between them). On that
job: the node-local rank -> GPU rule (GPUs from the ``fake_cupy`` stand-in;
both simulated nodes have one hostname, so node B's GPUs get other PCI bus
ids, as two machines' GPUs have other host names), the backend agreement
across the nodes, and exact global statistics over uneven batches with the
real MPI communicator.
"""

import json
import subprocess
import sys
import textwrap

import pytest
from support.mpi_runner import MPIEXEC, mpi_env, run_job

pytestmark = pytest.mark.mpi

HOSTS = "nodeA:2,nodeB:2"

SCRIPT = r"""
import json, os
import numpy as np
from mpi4py import MPI
from support import bn_ref, fake_cupy
import cupysyncbn as sbn
from cupysyncbn.comm.base import LOCAL
from cupysyncbn.runtime import env as rt_env
from cupysyncbn.runtime import placement

w = MPI.COMM_WORLD
rank, size = w.Get_rank(), w.Get_size()
out = {"processor": MPI.Get_processor_name()}
LAUNCH = {v: os.environ[v] for v in rt_env.LOCAL_RANK_VARS if v in os.environ}
out["launcher_vars"] = LAUNCH

# exact global statistics over both nodes (NumPy over MPI), uneven and empty batches
comm = sbn.init("mpi")
counts = [3, 0, 5, 2]
rng = np.random.default_rng(7)
xg = rng.standard_normal((sum(counts), 3, 4, 5)) * 4 + 50
dyg = rng.standard_normal(xg.shape)
lo = sum(counts[:rank])
x, dy = xg[lo:lo + counts[rank]], dyg[lo:lo + counts[rank]]
layer = sbn.SyncBatchNorm(3, comm=comm, dtype="float64")
for _ in range(2):
    y = layer(x)
    dx = layer.backward(dy)
yr, mean, var, m = bn_ref.ref_forward(xg, "NCHW")
dxr = bn_ref.ref_backward(xg, dyg, "NCHW")[0]
out["y_err"] = float(np.abs(y - yr[lo:lo + counts[rank]]).max(initial=0))
out["dx_err"] = float(np.abs(dx - dxr[lo:lo + counts[rank]]).max(initial=0))
rm = np.array(layer._mean)
out["mean_err"] = float(np.abs(rm - (1 - 0.9 ** 2) * mean).max())
allm = w.allgather(rm.tobytes() + np.array(layer._variance).tobytes())
out["bitwise_equal"] = len(set(allm)) == 1
sbn.set_default_comm(None)


def scenario(name, ndev, backend="auto", launcher_vars=True):
    placement._reset_for_tests()
    sbn.set_default_comm(None)
    for v in rt_env.LOCAL_RANK_VARS:
        os.environ.pop(v, None)
    if launcher_vars:
        os.environ.update(LAUNCH)
    os.environ.pop("CUPYSYNCBN_DEVICE", None)  # the test suite's default ('cpu')
    node = rank // 2  # hydra fills nodeA, then nodeB
    bus = [f"0000:{0x10 + 0x40 * node + i:02X}:00.0" for i in range(ndev)]
    st = fake_cupy.install(ndev, bus_ids=bus)
    rec = {"local_rank": placement.node_local_rank()}
    try:
        c = sbn.init(backend)
        rec["backend"], rec["reason"] = c.backend, getattr(c, "fallback_reason", "")
        m = sbn.SyncBatchNorm(2, comm=LOCAL)._mean
        rec["layer_gpu"] = None if isinstance(m, np.ndarray) else m.device.id
        if c.backend == "nccl":
            rec["nccl_gpu"], rec["nccl_size"] = c.device_id, c.size
            c.close()
    except Exception as e:
        rec["error"] = f"{type(e).__name__}: {e}"
    rec["gpu"] = st.current if st.uses else None
    out[name] = rec
    w.Barrier()


scenario("2gpu-per-node", 2)
scenario("2gpu-per-node-split-type", 2, launcher_vars=False)  # MPI's node split
scenario("1gpu-per-node", 1)
scenario("1gpu-per-node-nccl", 1, backend="nccl")
with open(f"res_{rank}.json", "w") as f:
    json.dump(out, f)
"""


def _hydra() -> bool:
    if MPIEXEC is None:
        return False
    try:
        v = subprocess.run([MPIEXEC, "--version"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return "hydra" in (v.stdout + v.stderr).lower()


@pytest.fixture(scope="module")
def two_nodes(tmp_path_factory):
    if not _hydra():
        pytest.skip("needs MPICH's mpiexec (hydra: -launcher fork -hosts); pip install mpich")
    tmp = tmp_path_factory.mktemp("two_nodes")
    script = tmp / "two_nodes.py"
    script.write_text(textwrap.dedent(SCRIPT))
    cmd = [MPIEXEC, "-launcher", "fork", "-hosts", HOSTS, "-n", "4", sys.executable,
           str(script)]
    res = run_job(cmd, 240, f"mpiexec -hosts {HOSTS}", mpi_env(), tmp)
    assert res.returncode == 0, (res.stdout[-3000:], res.stderr[-3000:])
    out = [json.loads((tmp / f"res_{r}.json").read_text()) for r in range(4)]
    return out


def col(res, name, key):
    return [r[name].get(key) for r in res]


def test_node_local_ranks_restart_on_the_second_node(two_nodes):
    assert [r["launcher_vars"].get("MPI_LOCALRANKID") for r in two_nodes] == ["0", "1", "0", "1"]
    for name in ("2gpu-per-node", "2gpu-per-node-split-type"):
        assert col(two_nodes, name, "local_rank") == [0, 1, 0, 1], name


def test_gpus_by_node_local_rank_and_nccl_agreed_across_nodes(two_nodes):
    for name in ("2gpu-per-node", "2gpu-per-node-split-type"):
        assert col(two_nodes, name, "gpu") == [0, 1, 0, 1], name  # not 0, 1, 2, 3 % 2 by luck
        assert col(two_nodes, name, "layer_gpu") == [0, 1, 0, 1], name
        assert col(two_nodes, name, "backend") == ["nccl"] * 4, two_nodes
        assert col(two_nodes, name, "nccl_gpu") == [0, 1, 0, 1]
        assert col(two_nodes, name, "nccl_size") == [4] * 4


def test_a_gpu_shared_inside_a_node_means_mpi_on_every_rank(two_nodes):
    # one GPU per node, two ranks per node: ranks 0 and 1 share node A's GPU
    assert col(two_nodes, "1gpu-per-node", "gpu") == [0] * 4
    assert col(two_nodes, "1gpu-per-node", "backend") == ["mpi"] * 4
    reasons = set(col(two_nodes, "1gpu-per-node", "reason"))
    assert len(reasons) == 1 and "ranks 0 and 1 would share one GPU" in reasons.pop()
    errors = col(two_nodes, "1gpu-per-node-nccl", "error")
    assert len(set(errors)) == 1 and "would share one GPU" in errors[0], errors


def test_exact_global_statistics_across_the_two_nodes(two_nodes):
    for r in two_nodes:
        assert r["y_err"] < 1e-10 and r["dx_err"] < 1e-10, r
        assert r["mean_err"] < 1e-10, r
        assert r["bitwise_equal"], r

