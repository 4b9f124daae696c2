"""Rank -> GPU placement and backend agreement on 1-4 real MPI ranks.

Each rank answers CUDA's device queries through a stand-in (``fake_cupy``):
8, 2, 1 or 0 visible GPUs, one GPU per rank (each sees one GPU with its own
PCI bus id, as under ``--gpus-per-task=1``), NCCL missing, or
``ncclCommInitRank`` failing on one rank. The real placement, agreement and
NCCL bootstrap code runs under ``mpiexec``; each scenario records, per rank,
the backend ``init`` chose (or the error it raised), the GPU the rank was put
on, and the warnings and verbose line it printed.
"""

import json

import pytest
from support.mpi_runner import run_mpi

pytestmark = pytest.mark.mpi

SCRIPT = r"""
import contextlib, io, json, os, sys, warnings
from support import fake_cupy
import numpy as np
from mpi4py import MPI
import cupysyncbn as sbn
from cupysyncbn.runtime import env as rt_env
from cupysyncbn.runtime import placement
from cupysyncbn.comm.base import LOCAL
from cupysyncbn.errors import CommunicatorError

w = MPI.COMM_WORLD
rank, size = w.Get_rank(), w.Get_size()
os.environ.pop("CUPYSYNCBN_DEVICE", None)  # the test suite's default ('cpu')
LAUNCH = {v: os.environ[v] for v in rt_env.LOCAL_RANK_VARS if v in os.environ}
out = {}


def scenario(name, ndev=8, bus_ids=None, nccl=True, init_error=None, backend="auto",
             color=None, env=None, launcher_vars=True, world_default=False):
    placement._reset_for_tests()
    sbn.set_default_comm(None)
    for v in rt_env.LOCAL_RANK_VARS:
        os.environ.pop(v, None)
    if launcher_vars:
        os.environ.update(LAUNCH)
    for k, v in (env or {}).items():
        os.environ[k] = v
    st = fake_cupy.install(ndev, bus_ids=bus_ids, nccl_available=nccl, init_error=init_error)
    group = w if color is None else w.Split(color, rank)
    rec = {}
    err = io.StringIO()
    with warnings.catch_warnings(record=True) as caught, contextlib.redirect_stderr(err):
        warnings.simplefilter("always")
        try:
            comm = sbn.init(backend) if world_default else sbn.init(backend, mpi_comm=group)
            rec["backend"], rec["size"] = comm.backend, comm.size
            rec["reason"] = getattr(comm, "fallback_reason", "")
            layer = sbn.SyncBatchNorm(2, comm=LOCAL)  # placed like every new layer
            m = layer._mean
            rec["layer_gpu"] = None if isinstance(m, np.ndarray) else m.device.id
            if comm.backend == "nccl":
                rec["nccl_gpu"] = comm.device_id
                comm.close()
        except CommunicatorError as e:
            rec["error"] = str(e)
    rec["warnings"] = [str(c.message) for c in caught]
    rec["gpu"] = st.current if st.uses else None
    rec["stderr"] = err.getvalue()
    for k in (env or {}):
        os.environ.pop(k, None)
    out[name] = rec
    w.Barrier()


def per_rank_bus(r):
    return [f"0000:{0x40 + r:02X}:00.0"]


scenario("8gpu")
scenario("8gpu-split-type", launcher_vars=False)  # node split of COMM_WORLD
scenario("8gpu-subgroups", color=rank % 2)
scenario("8gpu-verbose", env={"CUPYSYNCBN_VERBOSE": "1"})
scenario("8gpu-default", world_default=True)
scenario("2gpu", ndev=2)
scenario("2gpu-nccl", ndev=2, backend="nccl")
scenario("2gpu-pairs", ndev=2, color=rank // 2)
scenario("2gpu-mpi", ndev=2, backend="mpi")
scenario("gpu-per-rank", bus_ids=per_rank_bus(rank))
scenario("gpu-per-rank-same-bus", bus_ids=per_rank_bus(0))
scenario("0gpu", ndev=0)
scenario("0gpu-nccl", ndev=0, backend="nccl")
scenario("no-nccl", nccl=False)
scenario("no-nccl-nccl", nccl=False, backend="nccl")
last = size - 1
scenario("init-fails", init_error="unhandled system error" if rank == last else None)
scenario("init-fails-nccl", backend="nccl",
         init_error="unhandled system error" if rank == last else None)
scenario("gpu-on-some", ndev=0 if rank == last else 8)
scenario("env-device-same", env={"CUPYSYNCBN_DEVICE": "7"})
scenario("env-device-per-rank", env={"CUPYSYNCBN_DEVICE": str(7 - rank)})
scenario("env-device-missing", env={"CUPYSYNCBN_DEVICE": "gpu:9"})
scenario("env-device-missing-mpi", env={"CUPYSYNCBN_DEVICE": "9"}, backend="mpi")
scenario("env-cpu", env={"CUPYSYNCBN_DEVICE": "cpu"})
scenario("env-cpu-nccl", env={"CUPYSYNCBN_DEVICE": "cpu"}, backend="nccl")
scenario("2gpu-gpu2", ndev=2, env={"CUPYSYNCBN_DEVICE": "gpu"})
with open(f"res_{rank}.json", "w") as f:
    json.dump({"rank": rank, "out": out}, f)
"""


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    cache = {}

    def get(k):
        if k not in cache:
            tmp = tmp_path_factory.mktemp(f"placement{k}")
            run_mpi(SCRIPT, k, timeout=240, tmp_path=tmp)
            res = [json.loads(p.read_text()) for p in tmp.glob("res_*.json")]
            assert len(res) == k
            res.sort(key=lambda r: r["rank"])
            cache[k] = [r["out"] for r in res]
        return cache[k]

    return get


KS = [1, 3, 4]  # groups of 2: the sub-group scenarios of the 4-rank job


def col(res, name, key):
    return [r[name].get(key) for r in res]


def same_everywhere(res, name, key):
    vals = col(res, name, key)
    assert len(set(map(str, vals))) == 1, (name, key, vals)
    return vals[0]


@pytest.mark.parametrize("k", KS)
def test_eight_gpus_by_node_local_rank_of_the_job(runs, k):
    res = runs(k)
    for name in ("8gpu", "8gpu-split-type", "8gpu-subgroups", "8gpu-verbose"):
        assert col(res, name, "gpu") == list(range(k)), name  # not 0,1,0,1 in sub-groups
        assert col(res, name, "layer_gpu") == list(range(k)), name
        assert col(res, name, "nccl_gpu") == list(range(k)), name
        assert same_everywhere(res, name, "backend") == "nccl", name
        assert all(r[name]["warnings"] == [] for r in res), name
    assert col(res, "8gpu-subgroups", "size") == [len(range(r % 2, k, 2)) for r in range(k)]
    # 'auto' outside a sub-group: one process is 'none', a job is NCCL
    assert same_everywhere(res, "8gpu-default", "backend") == ("none" if k == 1 else "nccl")
    assert col(res, "8gpu-default", "gpu") == list(range(k))


@pytest.mark.parametrize("k", KS)
def test_verbose_line_on_rank_zero_only(runs, k):
    res = runs(k)
    line = res[0]["8gpu-verbose"]["stderr"].strip()
    assert line == (f"cupysyncbn: backend=nccl ranks={k} gpus_per_node=8 ranks_per_gpu=1"
                    " nccl=2.18.5 rank0_device=gpu:0"), line
    assert all(r["8gpu-verbose"]["stderr"] == "" for r in res[1:])
    assert all(r["8gpu"]["stderr"] == "" for r in res)  # silent without the variable


@pytest.mark.parametrize("k", KS)
def test_two_gpus_shared_falls_back_to_mpi_everywhere(runs, k):
    res = runs(k)
    assert col(res, "2gpu", "gpu") == [r % 2 for r in range(k)]
    assert col(res, "2gpu", "layer_gpu") == [r % 2 for r in range(k)]
    if k <= 2:  # one rank per GPU: NCCL
        assert same_everywhere(res, "2gpu", "backend") == "nccl"
        assert same_everywhere(res, "2gpu-nccl", "backend") == "nccl"
        return
    assert same_everywhere(res, "2gpu", "backend") == "mpi"
    reason = same_everywhere(res, "2gpu", "reason")
    assert "ranks 0 and 2 would share one GPU" in reason and "0000:10:00.0" in reason
    warned = [r["2gpu"]["warnings"] for r in res]
    assert len(warned[0]) == 1 and reason in warned[0][0] and "using MPI" in warned[0][0]
    assert all(w == [] for w in warned[1:])  # said once, by rank 0
    # init('nccl') that cannot work: the same CommunicatorError on every rank
    msg = same_everywhere(res, "2gpu-nccl", "error")
    assert msg.startswith("backend 'nccl' unavailable: ranks 0 and 2 would share one GPU")


@pytest.mark.parametrize("k", KS)
def test_sub_groups_of_distinct_gpus_use_nccl(runs, k):
    res = runs(k)
    # groups {0,1} and {2,3} on GPUs 0,1 each: no GPU is shared inside a group
    assert col(res, "2gpu-pairs", "gpu") == [r % 2 for r in range(k)]
    assert same_everywhere(res, "2gpu-pairs", "backend") == "nccl"


@pytest.mark.parametrize("k", KS)
def test_mpi_fallback_uses_the_same_placement(runs, k):
    res = runs(k)
    assert same_everywhere(res, "2gpu-mpi", "backend") == "mpi"
    assert col(res, "2gpu-mpi", "gpu") == [r % 2 for r in range(k)]
    assert all(r["2gpu-mpi"]["warnings"] == [] for r in res)
    assert col(res, "2gpu-gpu2", "gpu") == [r % 2 for r in range(k)]  # 'gpu': the rule


@pytest.mark.parametrize("k", KS)
def test_one_gpu_per_rank(runs, k):
    res = runs(k)
    assert col(res, "gpu-per-rank", "gpu") == [0] * k
    assert same_everywhere(res, "gpu-per-rank", "backend") == "nccl"
    # every rank sees one GPU, but it is the same one: not NCCL
    if k > 1:
        assert same_everywhere(res, "gpu-per-rank-same-bus", "backend") == "mpi"
        assert "would share one GPU" in res[0]["gpu-per-rank-same-bus"]["reason"]


@pytest.mark.parametrize("k", KS)
def test_no_gpu(runs, k):
    res = runs(k)
    assert same_everywhere(res, "0gpu", "backend") == "mpi"
    assert all(r["0gpu"]["warnings"] == [] for r in res)  # nothing wanted a GPU
    assert col(res, "0gpu", "gpu") == [None] * k and col(res, "0gpu", "layer_gpu") == [None] * k
    msg = same_everywhere(res, "0gpu-nccl", "error")
    assert msg.startswith("backend 'nccl' unavailable: rank 0: no GPU visible")


@pytest.mark.parametrize("k", KS)
def test_nccl_missing(runs, k):
    res = runs(k)
    assert same_everywhere(res, "no-nccl", "backend") == "mpi"
    assert "NCCL library is not loadable" in res[0]["no-nccl"]["warnings"][0]
    assert col(res, "no-nccl", "gpu") == list(range(k))  # still on their GPUs
    msg = same_everywhere(res, "no-nccl-nccl", "error")
    assert "rank 0: the NCCL library is not loadable" in msg


@pytest.mark.parametrize("k", KS)
def test_nccl_init_error_is_agreed(runs, k):
    res = runs(k)
    msg = same_everywhere(res, "init-fails-nccl", "error")
    assert msg == (f"NCCL initialization failed on rank {k - 1}: NcclError: unhandled"
                   " system error")
    assert same_everywhere(res, "init-fails", "backend") == "mpi"
    assert msg in res[0]["init-fails"]["warnings"][0]


@pytest.mark.parametrize("k", KS)
def test_gpu_on_some_ranks_only(runs, k):
    res = runs(k)
    if k == 1:  # the only rank sees none
        assert same_everywhere(res, "gpu-on-some", "backend") == "mpi"
        return
    assert same_everywhere(res, "gpu-on-some", "backend") == "mpi"
    assert f"rank {k - 1}: no GPU visible" in res[0]["gpu-on-some"]["warnings"][0]


@pytest.mark.parametrize("k", KS)
def test_device_from_environment(runs, k):
    res = runs(k)
    assert col(res, "env-device-same", "gpu") == [7] * k
    assert same_everywhere(res, "env-device-same", "backend") == ("nccl" if k == 1 else "mpi")
    assert col(res, "env-device-per-rank", "gpu") == [7 - r for r in range(k)]
    assert same_everywhere(res, "env-device-per-rank", "backend") == "nccl"
    for name in ("env-device-missing", "env-device-missing-mpi"):
        msg = same_everywhere(res, name, "error")
        assert msg.startswith("cannot place the ranks on GPUs: rank 0: GPU 9 was requested")
    assert col(res, "env-cpu", "gpu") == [None] * k
    assert col(res, "env-cpu", "layer_gpu") == [None] * k
    assert same_everywhere(res, "env-cpu", "backend") == "mpi"
    assert all(r["env-cpu"]["warnings"] == [] for r in res)
    # an explicit init('nccl') still puts the rank on its GPU; layers stay NumPy
    assert same_everywhere(res, "env-cpu-nccl", "backend") == "nccl"
    assert col(res, "env-cpu-nccl", "gpu") == list(range(k))
    assert col(res, "env-cpu-nccl", "layer_gpu") == [None] * k
