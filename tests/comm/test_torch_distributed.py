"""The communicator over torch.distributed (cupysyncbn.comm.torch) and torchrun jobs.

* One process, a one-rank gloo group: the Communicator contract (in-place,
  zero-copy all-reduce, host all-reduce, group key, one communicator per
  group), ``init('torch')`` / ``init('auto')`` / ``comm=ProcessGroup``.
* Launcher environments without any group: ``init('auto')`` refuses to
  compute local statistics silently.
* ``torchrun --standalone --nproc-per-node 3`` (gloo): every module_db
  BatchNorm sample split unevenly over the ranks (one empty) against the torch
  module on the whole batch, through the default communicator that 'auto'
  picks; a sub-group; a converted model trained 3 SGD steps; errors agreed on
  every rank; check_consistency over the group; ``Communicator.abort`` on one
  rank ending the whole job.
"""

from __future__ import annotations

import json
import re
import sys

import numpy as np
import pytest
from support import TESTS
from support.mpi_runner import mpi_env, run_job

torch = pytest.importorskip("torch")
dist = pytest.importorskip("torch.distributed")

import cupysyncbn as sbn  # noqa: E402
from cupysyncbn import comm as cm  # noqa: E402
from cupysyncbn.errors import CommunicatorError  # noqa: E402
from cupysyncbn.runtime import env as rt_env  # noqa: E402


@pytest.fixture
def one_rank_group(tmp_path):
    """An initialized one-process gloo group; torn down (and the default comm reset) after."""
    if not dist.is_available():
        pytest.skip("torch.distributed unavailable")
    assert not dist.is_initialized()
    dist.init_process_group(
        "gloo", init_method=(tmp_path / "rdv").as_uri(), rank=0, world_size=1
    )
    try:
        yield dist.group.WORLD
    finally:
        dist.destroy_process_group()
        cm.set_default_comm(None)


def test_torch_communicator_contract(one_rank_group):
    from cupysyncbn.comm.torch import TorchCommunicator

    pg = one_rank_group
    comm = cm.as_communicator(pg)
    assert isinstance(comm, TorchCommunicator) and comm.backend == "torch"
    assert (comm.rank, comm.size, comm.synchronizes) == (0, 1, False)
    assert cm.as_communicator(pg) is comm  # one communicator (one layer count) per group
    assert TorchCommunicator(pg).group_key() == comm.group_key()
    assert comm.cpu_direct  # gloo: CPU buffers directly
    buf = np.arange(5, dtype=np.float64)
    assert comm.allreduce_sum(buf) is buf and np.array_equal(buf, np.arange(5.0))
    host = comm.allreduce_host([1.0, 2.0])
    assert isinstance(host, np.ndarray) and host.tolist() == [1.0, 2.0]
    assert comm.supports(buf)
    # 'auto' with an initialized torch group, 'torch', and a group passed to init
    assert sbn.init("auto") is comm
    assert sbn.init("torch") is comm and sbn.init("torch", pg) is comm
    assert sbn.get_default_comm() is comm
    sub = dist.new_group([0])
    sub_comm = cm.as_communicator(sub)
    assert sub_comm is not comm and sub_comm.group_key() != comm.group_key()
    with pytest.raises(ValueError, match="backend='torch'"):
        sbn.init("mpi", pg)
    with pytest.raises(TypeError, match="ProcessGroup"):
        sbn.init("torch", object())


def test_forced_collectives_over_torch_group(one_rank_group):
    """A one-rank group with forced collectives runs the header protocol through gloo."""
    from cupysyncbn.comm.torch import TorchCommunicator
    from cupysyncbn.interop import torch as ti

    class Counting(TorchCommunicator):
        calls = 0

        def allreduce_sum(self, buf):
            Counting.calls += 1
            return super().allreduce_sum(buf)

    comm = Counting(one_rank_group)
    comm.force_collectives = True
    bn = ti.SyncBatchNorm(3, comm=comm).double()
    ref = torch.nn.BatchNorm2d(3).double()
    for _ in range(3):
        x = torch.randn(4, 3, 2, 2, dtype=torch.float64)
        xs, xr = x.clone().requires_grad_(), x.clone().requires_grad_()
        ys, yr = bn(xs), ref(xr)
        ys.sum().backward()
        yr.sum().backward()
        assert (ys - yr).abs().max() < 1e-12 and (xs.grad - xr.grad).abs().max() < 1e-12
    # handshake + mean pass on the first forward, then one collective per pass
    assert Counting.calls == 2 + 1 + 1 + 2 * 2
    assert (bn.running_var - ref.running_var).abs().max() < 1e-12


def test_check_consistency_of_a_torch_module(one_rank_group):
    model = torch.nn.Sequential(torch.nn.Conv2d(2, 3, 1), torch.nn.BatchNorm2d(3))
    assert sbn.check_consistency(model, comm=one_rank_group) == []
    assert sbn.check_consistency(model.state_dict(), comm=one_rank_group) == []
    assert sbn.check_consistency(model, comm=one_rank_group, buffers_only=True) == []
    digest = sbn.state_digest(model)
    model[1].running_mean.add_(1.0)
    assert sbn.state_digest(model) != digest


def test_torch_backend_without_a_group_says_how_to_start_one():
    assert not dist.is_initialized()
    with pytest.raises(CommunicatorError, match="init_process_group"):
        cm.select._create("torch", None)


@pytest.mark.parametrize("env", [
    {"WORLD_SIZE": "3", "RANK": "0", "LOCAL_RANK": "0"},  # torchrun
    {"RANK": "2"},
    {"PADDLE_TRAINERS_NUM": "2", "PADDLE_TRAINER_ID": "1"},  # paddle.distributed.launch
])
def test_auto_refuses_local_statistics_under_a_launcher_without_group(monkeypatch, env):
    for var in (*rt_env.SIZE_VARS, *rt_env.RANK_VARS, *rt_env.LAUNCHER_SIZE_VARS,
                *rt_env.LAUNCHER_RANK_VARS):
        monkeypatch.delenv(var, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(CommunicatorError) as info:
        cm.select._create("auto", None)
    msg = str(info.value)
    for words in ("torchrun", "init_process_group", "mpiexec", "init('none')",
                  "init_parallel_env", next(iter(env))):
        assert words in msg, words
    assert cm.select._create("none", None).size == 1  # deliberately local still works


def test_auto_stays_local_for_a_single_process(monkeypatch):
    for var in (*rt_env.SIZE_VARS, *rt_env.RANK_VARS, *rt_env.LAUNCHER_SIZE_VARS,
                *rt_env.LAUNCHER_RANK_VARS):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("RANK", "0")
    assert cm.select._create("auto", None).backend == "none"


TORCHRUN_SCRIPT = r"""
import copy, json, sys
import torch, torch.distributed as dist

dist.init_process_group("gloo")  # env:// as set by torchrun
rank, size = dist.get_rank(), dist.get_world_size()
sys.path.insert(0, sys.argv[2])
import cupysyncbn as sbn
from cupysyncbn.errors import RemoteInputError
from cupysyncbn.interop import torch as ti
from support import torch_module_db as mdb

checks = {}

def le(name, v):
    checks[name] = max(checks.get(name, 0.0), float(v))

def allsum(t):
    t = t.detach().clone()
    dist.all_reduce(t)
    return t

comm = sbn.get_default_comm()  # 'auto': the torch.distributed group
le("auto_is_torch", 0.0 if (comm.backend, comm.size, comm.rank) == ("torch", size, rank) else 1)
le("pg_same_comm", 0.0 if sbn.comm.as_communicator(dist.group.WORLD) is comm else 1.0)
mx = comm.allreduce_max(torch.tensor([float(rank), -float(rank)], dtype=torch.float64).numpy())
le("allreduce_max", 0.0 if mx.tolist() == [size - 1.0, 0.0] else 1.0)

# reproducible=True over gloo: the one-process bits (issue 21)
from cupysyncbn.comm.base import LOCAL
gr = torch.Generator().manual_seed(11)
xr = torch.randn(7, 3, 4, generator=gr) * 3 + 100
dyr = torch.randn(7, 3, 4, generator=gr)
c7 = mdb.split_counts(7, size)
s7 = slice(sum(c7[:rank]), sum(c7[:rank + 1]))
xs_ = xr[s7].clone().requires_grad_(True)
ys_ = ti.SyncBatchNorm(3, reproducible=True)(xs_)
ys_.backward(dyr[s7])
xo = xr.clone().requires_grad_(True)
yo = ti.SyncBatchNorm(3, comm=LOCAL, reproducible=True)(xo)
yo.backward(dyr)
same = (ys_.detach().numpy().tobytes() == yo.detach()[s7].numpy().tobytes()
        and xs_.grad.numpy().tobytes() == xo.grad[s7].numpy().tobytes())
le("reproducible_bits", 0.0 if same else 1.0)

# every module_db sample, comm=None (the default communicator)
walked = mdb.walk(mdb.load_samples(sys.argv[1]), None, rank, size, allsum)

F64 = torch.float64
g = torch.Generator().manual_seed(7)

# a converted model (bias=False BN) trained 3 SGD steps, process_group= a ProcessGroup
torch.manual_seed(0)  # the same initial model on every rank
ref = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.BatchNorm2d(4, bias=False),
                          torch.nn.ReLU(), torch.nn.Conv2d(4, 2, 1)).to(F64)
model = ti.convert_sync_batchnorm(copy.deepcopy(ref), process_group=dist.group.WORLD)
le("convert_kept_no_bias", 0.0 if model[1].bias is None and isinstance(model[1], ti.SyncBatchNorm)
   else 1.0)
counts = mdb.split_counts(8, size)
lo = sum(counts[:rank]); sl = slice(lo, lo + counts[rank])
opt_r = torch.optim.SGD(ref.parameters(), lr=0.1)
opt_m = torch.optim.SGD(model.parameters(), lr=0.1)
for step in range(3):
    x = torch.randn(8, 3, 5, 5, generator=g, dtype=F64) + step
    dy = torch.randn(8, 2, 5, 5, generator=g, dtype=F64)
    yr = ref(x); (yr * dy).sum().backward()
    ym = model(x[sl]); (ym * dy[sl]).sum().backward()
    for p in model.parameters():
        p.grad = allsum(p.grad)  # what DDP does (sum instead of mean)
    opt_r.step(); opt_m.step(); opt_r.zero_grad(); opt_m.zero_grad()
    le("convert_y", mdb._diff(ym, yr[sl]))
    for (n, pr), pm in zip(ref.named_parameters(), model.parameters()):
        le("convert_params", mdb._diff(pm, pr))
    le("convert_running_var", mdb._diff(model[1].running_var, ref[1].running_var))
    le("convert_nbt", abs(int(model[1].num_batches_tracked) - int(ref[1].num_batches_tracked)))

# a sub-group: ranks 0 and 1 synchronize, rank 2 is not a member
sub = dist.new_group([0, 1])
if rank < 2:
    bn = ti.SyncBatchNorm(3, comm=sub).to(F64)
    r = torch.nn.BatchNorm1d(3).to(F64)
    for step in range(2):
        x = torch.randn(7, 3, generator=g, dtype=F64) * 2
        part = x[:5] if rank == 0 else x[5:]
        le("subgroup_y", mdb._diff(bn(part), r(x)[:5] if rank == 0 else r(x)[5:]))
        le("subgroup_running_var", mdb._diff(bn.running_var, r.running_var))

# one rank's bad input: a clear error on every rank, no hang
bn = ti.SyncBatchNorm(4).to(F64)
x = torch.randn(2, 5 if rank == 1 else 4, 3, dtype=F64)
try:
    bn(x)
    le("error_agreed", 1.0)
except RemoteInputError:
    le("error_agreed", 0.0 if rank != 1 else 1.0)
except ValueError:
    le("error_agreed", 0.0 if rank == 1 else 1.0)

# every rank holds the same model state; a perturbed buffer is named on every rank
le("consistent", 0.0 if sbn.check_consistency(model, buffers_only=True) == [] else 1.0)
if rank == 2:
    model[1].running_mean[0] += 1e-12
names = sbn.check_consistency(model, comm=dist.group.WORLD, raise_on_mismatch=False)
le("inconsistency_named", 0.0 if names == ["1.running_mean"] else 1.0)

out = [None] * size
dist.all_gather_object(out, {"walk": walked, "checks": checks})
if rank == 0:
    mdb.emit(mdb.merge([o["walk"] for o in out]))
    merged = {}
    for o in out:
        for k, v in o["checks"].items():
            merged[k] = max(merged.get(k, 0.0), v)
    print("CHECKS " + json.dumps(merged), flush=True)
# Communicator.abort on one rank ends the whole job: the others are blocked in
# a barrier that only rank 2 could complete, until torchrun stops them.
dist.barrier()
if rank == 2:
    print("rank 2 aborts", flush=False)  # abort flushes what is pending
    comm.abort(7)
dist.barrier()
print("not reached", flush=True)
"""


@pytest.mark.mpi
def test_torchrun_three_gloo_ranks_equal_torch_on_the_global_batch(tmp_path):
    from support import torch_module_db as mdb

    samples = mdb.module_db_samples()
    script = tmp_path / "torchrun_case.py"
    script.write_text(TORCHRUN_SCRIPT)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
           "3", str(script), str(mdb.save_samples(tmp_path / "samples.pt")), str(TESTS)]
    env = mpi_env()
    for var in rt_env.SIZE_VARS + rt_env.RANK_VARS:  # not an MPI job
        env.pop(var, None)
    proc = run_job(cmd, 300, "torchrun", env, tmp_path)
    out, err = proc.stdout, proc.stderr
    # rank 2 aborted with code 7 after the results; torchrun stopped the others
    assert proc.returncode != 0 and re.search(r"exitcode\s*:\s*7", err), (
        f"returncode {proc.returncode}\nstdout:\n{out}\nstderr:\n{err[-5000:]}")
    assert "rank 2 aborts" in out and "not reached" not in out
    worst = mdb.check_walk(mdb.parse(out), samples)
    print(f"torchrun: {len(samples)} module_db samples on 3 gloo ranks, worst:", worst)
    (line,) = [ln for ln in out.splitlines() if ln.startswith("CHECKS ")]
    checks = json.loads(line[7:])
    print("torchrun checks:", checks)
    assert set(checks) >= {"auto_is_torch", "pg_same_comm", "allreduce_max", "reproducible_bits",
                           "convert_y", "convert_params",
                           "subgroup_y", "error_agreed", "consistent", "inconsistency_named"}
    bad = {k: v for k, v in checks.items() if not v <= mdb.TOL}
    assert not bad, bad


def _gpu_reason():
    if not torch.cuda.is_available():
        return "no CUDA GPU for PyTorch"
    try:
        import cupy

        cupy.cuda.runtime.getDeviceCount()
    except Exception as e:  # noqa: BLE001
        return f"CuPy unusable: {e}"
    if not dist.is_nccl_available():
        return "PyTorch without NCCL"
    return None


@pytest.mark.gpu
@pytest.mark.skipif(_gpu_reason() is not None, reason=str(_gpu_reason()))
def test_cuda_tensors_through_the_nccl_group_on_a_side_stream(tmp_path):
    """One rank, forced collectives: CUDA tensors through NCCL, CPU ones through gloo."""
    import cupy

    from cupysyncbn.comm.torch import TorchCommunicator
    from cupysyncbn.interop import torch as ti

    dist.init_process_group("cpu:gloo,cuda:nccl", init_method=(tmp_path / "rdv").as_uri(),
                            rank=0, world_size=1)
    try:
        comm = TorchCommunicator(dist.group.WORLD)
        comm.force_collectives = True
        assert comm.cpu_direct and comm.cuda_direct
        buf = cupy.arange(4, dtype=cupy.float64)
        assert comm.allreduce_sum(buf) is buf and buf.get().tolist() == [0.0, 1.0, 2.0, 3.0]
        host = np.ones(3)
        assert comm.allreduce_sum(host) is host
        dev = torch.device("cuda")
        bn = ti.SyncBatchNorm(3, comm=comm).to(dev, torch.float64)
        ref = torch.nn.BatchNorm2d(3).to(dev, torch.float64)
        side = torch.cuda.Stream()
        with torch.cuda.stream(side):
            for step in range(3):
                x = torch.randn(5, 3, 8, 8, device=dev, dtype=torch.float64) * 3 + step
                x = x.contiguous(memory_format=torch.channels_last)
                xs, xr = x.clone().requires_grad_(), x.clone().requires_grad_()
                ys, yr = bn(xs), ref(xr)
                dy = torch.randn_like(yr)
                ys.backward(dy)
                yr.backward(dy)
                assert (ys - yr).abs().max().item() < 1e-9
                assert (xs.grad - xr.grad).abs().max().item() < 1e-9
            assert (bn.running_var - ref.running_var).abs().max().item() < 1e-9
        side.synchronize()
        assert int(bn.num_batches_tracked) == 3
    finally:
        dist.destroy_process_group()
        cm.set_default_comm(None)
