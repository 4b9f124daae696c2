"""PyTorch adapter (cupysyncbn.interop.torch) against torch.nn.BatchNorm on the global batch."""

import subprocess
import sys

import numpy as np
import pytest
from support.mpi_runner import run_mpi

torch = pytest.importorskip("torch")

from cupysyncbn.comm.base import LOCAL  # noqa: E402
from cupysyncbn.interop import torch as ti  # noqa: E402

TOL = 1e-9


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """Tiny tensors: PyTorch's thread pool only adds latency on a busy machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _pair(momentum=0.1, affine=True, track=True, c=4, seed=0):
    torch.manual_seed(seed)
    ref = torch.nn.BatchNorm2d(c, momentum=momentum, affine=affine,
                               track_running_stats=track).double()
    if affine:
        with torch.no_grad():
            ref.weight.uniform_(0.5, 1.5)
            ref.bias.uniform_(-0.5, 0.5)
    bn = ti.SyncBatchNorm(c, momentum=momentum, affine=affine, track_running_stats=track,
                          comm=LOCAL).double()
    bn.load_state_dict(ref.state_dict())
    return ref, bn


def _maxdiff(a, b):
    return (a.detach() - b.detach()).abs().max().item() if a.numel() else 0.0


def test_import_cupysyncbn_does_not_import_torch():
    code = "import sys, cupysyncbn, cupysyncbn.interop, cupysyncbn.conformance; " \
           "assert cupysyncbn.init('auto').backend == 'none'; " \
           "print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("affine", [True, False])
def test_matches_batchnorm2d_one_process(momentum, affine):
    ref, bn = _pair(momentum, affine)
    for step in range(3):
        x = torch.randn(6, 4, 3, 5, dtype=torch.float64) * (1 + step) + step
        dy = torch.randn_like(x)
        xr, xs = x.clone().requires_grad_(), x.clone().requires_grad_()
        yr, ys = ref(xr), bn(xs)
        yr.backward(dy)
        ys.backward(dy)
        assert _maxdiff(ys, yr) < TOL
        assert _maxdiff(xs.grad, xr.grad) < TOL
        if affine:
            assert _maxdiff(bn.weight.grad, ref.weight.grad) < TOL
            assert _maxdiff(bn.bias.grad, ref.bias.grad) < TOL
        assert _maxdiff(bn.running_mean, ref.running_mean) < TOL
        assert _maxdiff(bn.running_var, ref.running_var) < TOL
        assert int(bn.num_batches_tracked) == int(ref.num_batches_tracked) == step + 1
    ref.eval()
    bn.eval()
    x = torch.randn(5, 4, 3, 5, dtype=torch.float64)
    assert _maxdiff(bn(x), ref(x)) < TOL


def test_no_running_stats_and_buffers_are_kept_in_place():
    ref, bn = _pair(track=False)
    assert bn.running_mean is None and bn.num_batches_tracked is None
    x = torch.randn(6, 4, 2, 2, dtype=torch.float64)
    bn.eval()
    ref.eval()  # no running stats: batch statistics in eval mode too
    assert _maxdiff(bn(x), ref(x)) < TOL
    ref, bn = _pair()
    rm = bn.running_mean
    bn(x)
    assert bn.running_mean is rm  # updated in place, like torch
    assert not torch.equal(rm, torch.zeros(4, dtype=torch.float64))


@pytest.mark.parametrize("momentum", [0.1, None])
def test_module_runs_the_array_passes_the_launch_budget_tests_count(monkeypatch, momentum):
    """SyncBatchNorm's autograd Function is forward_arrays/backward_arrays on views of its
    tensors (what _sync/test_launch_budget.py runs on the recording CuPy stand-in)."""
    calls = []
    fwd, bwd = ti.forward_arrays, ti.backward_arrays

    def spy_fwd(x, w, b, rm, rv, nbt, **kw):
        calls.append(("fwd", kw["data_format"], kw["update"], kw["momentum"], nbt))
        assert np.shares_memory(rm, np.from_dlpack(bn.running_mean))  # views, no copies
        assert np.shares_memory(w, np.from_dlpack(bn.weight.detach()))
        return fwd(x, w, b, rm, rv, nbt, **kw)

    def spy_bwd(dy, ctx, need):
        calls.append(("bwd", need))
        return bwd(dy, ctx, need)

    monkeypatch.setattr(ti, "forward_arrays", spy_fwd)
    monkeypatch.setattr(ti, "backward_arrays", spy_bwd)
    ref, bn = _pair(momentum)
    x = torch.randn(6, 4, 3, 5, dtype=torch.float64).to(memory_format=torch.channels_last)
    bn(x).sum().backward()
    ref(x).sum().backward()
    (kind, fmt, update, m, nbt), back = calls
    assert (kind, fmt, update, back) == ("fwd", "NHWC", True, ("bwd", True))
    if momentum is None:  # PyTorch's count before the pass, as a view
        assert m is None and nbt.shape == () and int(nbt) == 1  # incremented after
    else:
        assert m == pytest.approx(0.9) and nbt is None
    assert _maxdiff(bn.running_var, ref.running_var) < TOL
    assert _maxdiff(bn.weight.grad, ref.weight.grad) < TOL


def test_cupy_allocates_from_torch_on_the_current_stream(monkeypatch):
    """CUDA tensors: CuPy's memory comes from PyTorch's caching allocator (what
    torch.cuda.graph puts in the graph's pool); checked here with a stand-in CuPy."""
    from types import ModuleType, SimpleNamespace

    made, calls = [], []

    class Allocator:
        def __init__(self, malloc, free):
            made.append((malloc, free))
            self.malloc = lambda size: malloc(size, 0)

    stream = SimpleNamespace(ptr=0xABC)
    fake = ModuleType("cupy")
    fake.cuda = SimpleNamespace(memory=SimpleNamespace(PythonFunctionAllocator=Allocator),
                                get_current_stream=lambda: stream)
    monkeypatch.setattr(torch.cuda, "caching_allocator_alloc",
                        lambda size, dev, s: calls.append(("alloc", size, dev, s)) or 0x1000)
    monkeypatch.setattr(torch.cuda, "caching_allocator_delete",
                        lambda p: calls.append(("free", p)))
    ti._torch_allocator.cache_clear()
    try:
        alloc = ti._torch_allocator(fake)
        assert ti._torch_allocator(fake) is alloc  # one allocator per process
        assert alloc(256) == 0x1000
        _, free = made[0]
        free(0, 0)  # CuPy's empty allocations: nothing to give back
        free(0x1000, 0)
    finally:
        ti._torch_allocator.cache_clear()
    assert calls == [("alloc", 256, 0, 0xABC), ("free", 0x1000)]


def test_momentum_none_counts_an_empty_batch_like_torch():
    ref, bn = _pair(None)
    for step, n in enumerate((3, 0, 2, 4)):
        x = torch.randn(n, 4, 2, 3, dtype=torch.float64) + step
        assert _maxdiff(bn(x), ref(x)) < TOL
        assert int(bn.num_batches_tracked) == int(ref.num_batches_tracked) == step + 1
        assert _maxdiff(bn.running_mean, ref.running_mean) < TOL
        assert _maxdiff(bn.running_var, ref.running_var) < TOL


def test_channels_last_and_other_ranks_of_input():
    ref, bn = _pair()
    x = torch.randn(6, 4, 3, 5, dtype=torch.float64).to(memory_format=torch.channels_last)
    xr, xs = x.clone().requires_grad_(), x.clone().requires_grad_()
    ys = bn(xs)
    yr = ref(xr)
    assert ys.is_contiguous(memory_format=torch.channels_last)
    dy = torch.randn_like(yr)
    ys.backward(dy)
    yr.backward(dy)
    assert _maxdiff(ys, yr) < TOL and _maxdiff(xs.grad, xr.grad) < TOL
    for shape, cls in (((7, 4), torch.nn.BatchNorm1d), ((5, 4, 6), torch.nn.BatchNorm1d),
                       ((3, 4, 2, 3, 2), torch.nn.BatchNorm3d)):
        r = cls(4).double()
        s = ti.convert_sync_batchnorm(cls(4).double(), comm=LOCAL)
        x = torch.randn(*shape, dtype=torch.float64)
        assert _maxdiff(s(x), r(x)) < TOL


def test_gradcheck_float64():
    torch.manual_seed(3)
    x = torch.randn(5, 3, 2, 2, dtype=torch.float64, requires_grad=True)
    w = (torch.rand(3, dtype=torch.float64) + 0.5).requires_grad_()
    b = torch.randn(3, dtype=torch.float64, requires_grad=True)

    def f(x, w, b):
        return ti.batch_norm(x, None, None, w, b, training=True, comm=LOCAL)

    assert torch.autograd.gradcheck(f, (x, w, b))
    bn = ti.SyncBatchNorm(3, comm=LOCAL).double()
    assert torch.autograd.gradcheck(lambda x: bn(x), (x,))
    bn.eval()  # eval mode: the affine map with running statistics
    assert torch.autograd.gradcheck(lambda x: bn(x), (x,))


def test_float32_and_bfloat16_inputs():
    torch.manual_seed(4)
    x = torch.randn(8, 3, 4, 4)
    ref = torch.nn.BatchNorm2d(3)
    bn = ti.SyncBatchNorm(3, comm=LOCAL)
    assert _maxdiff(bn(x), ref(x)) < 1e-5
    xb = x.to(torch.bfloat16).requires_grad_()
    yb = bn(xb)
    yb.float().sum().backward()
    assert yb.dtype == torch.bfloat16 and xb.grad.dtype == torch.bfloat16
    assert _maxdiff(yb.float(), ref(xb.detach().float())) < 2e-2


def test_errors_and_in_place_modification_detected():
    bn = ti.SyncBatchNorm(4, comm=LOCAL)
    with pytest.raises(ValueError, match="2D to 5D"):
        bn(torch.randn(4))
    with pytest.raises(ValueError, match="channels"):
        bn(torch.randn(3, 5, 2))
    x = torch.randn(3, 4, 2, requires_grad=True)
    xx = x * 1.0
    y = bn(xx)
    xx.add_(1.0)  # modifies the saved input in place
    with pytest.raises(RuntimeError, match="inplace"):
        y.sum().backward()


def test_deepcopy_shares_the_communicator_and_pickling_drops_it():
    import copy
    import io

    bn = ti.SyncBatchNorm(3, comm=LOCAL)
    bn(torch.randn(4, 3))
    twin = copy.deepcopy(bn)
    assert twin.comm is LOCAL and twin._sync_state is not bn._sync_state
    buf = io.BytesIO()
    torch.save(bn, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    assert loaded.comm is None and torch.equal(loaded.running_mean, bn.running_mean)


def test_convert_sync_batchnorm_one_process():
    torch.manual_seed(5)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.BatchNorm2d(4), torch.nn.ReLU()
    ).double()
    model[1].running_mean.fill_(0.25)
    model[1].num_batches_tracked.fill_(7)
    bn_weight = model[1].weight
    conv = ti.convert_sync_batchnorm(model, comm=LOCAL)
    assert isinstance(conv[1], ti.SyncBatchNorm) and conv[1].weight is bn_weight
    assert int(conv[1].num_batches_tracked) == 7
    assert torch.equal(conv[1].running_mean, torch.full((4,), 0.25, dtype=torch.float64))
    assert ti.SyncBatchNorm.convert_sync_batchnorm(conv) is conv  # nothing left to convert


MPI_SCRIPT = r"""
import copy, sys
import numpy as np, torch
from mpi4py import MPI
from cupysyncbn.interop.torch import SyncBatchNorm, convert_sync_batchnorm

comm = MPI.COMM_WORLD
rank, size = comm.Get_rank(), comm.Get_size()
counts = [8] if size == 1 else [3, 5, 0]          # uneven, last rank empty
assert len(counts) == size
lo = sum(counts[:rank]); sl = slice(lo, lo + counts[rank]); N = sum(counts)
worst = {}

def rec(name, a, b):
    a, b = a.detach(), b.detach()
    e = (a - b).abs().max().item() if b.numel() else 0.0
    worst[name] = max(worst.get(name, 0.0), e)

def allsum(t):
    return torch.from_numpy(comm.allreduce(t.detach().numpy().copy(), op=MPI.SUM))

torch.manual_seed(0)  # same data on every rank: each slices its part
for momentum in (0.1, None):
    ref = torch.nn.BatchNorm2d(4, momentum=momentum).double()
    with torch.no_grad():
        ref.weight.uniform_(0.5, 1.5); ref.bias.uniform_(-0.5, 0.5)
    bn = SyncBatchNorm(4, momentum=momentum, comm=comm).double()
    bn.load_state_dict(ref.state_dict())
    for step in range(4):
        x = torch.randn(N, 4, 3, 5, dtype=torch.float64) * (1 + step) + 3 * step
        dy = torch.randn_like(x)
        xr = x.clone().requires_grad_(); yr = ref(xr); yr.backward(dy)
        xl = x[sl].clone().requires_grad_(); yl = bn(xl); yl.backward(dy[sl])
        rec("y", yl, yr[sl]); rec("dx", xl.grad, xr.grad[sl])
        rec("dweight_sum", allsum(bn.weight.grad), ref.weight.grad)
        rec("dbias_sum", allsum(bn.bias.grad), ref.bias.grad)
        rec("running_mean", bn.running_mean, ref.running_mean)
        rec("running_var", bn.running_var, ref.running_var)
        assert int(bn.num_batches_tracked) == int(ref.num_batches_tracked) == step + 1
        for m in (ref, bn):
            m.weight.grad = m.bias.grad = None
    ref.eval(); bn.eval()
    x = torch.randn(N, 4, 3, 5, dtype=torch.float64)
    with torch.no_grad():
        rec("y_eval", bn(x[sl]), ref(x)[sl])
    # every rank holds bitwise-identical running statistics
    rs = comm.allgather(bn.running_var.numpy().tobytes())
    assert all(r == rs[0] for r in rs)

torch.manual_seed(1)
model = torch.nn.Sequential(
    torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.BatchNorm2d(4), torch.nn.ReLU()).double()
sync = convert_sync_batchnorm(copy.deepcopy(model), comm=comm)
assert isinstance(sync[1], SyncBatchNorm) and not isinstance(model[1], SyncBatchNorm)
for step in range(3):
    x = torch.randn(N, 3, 6, 6, dtype=torch.float64) + step
    dy = torch.randn(N, 4, 6, 6, dtype=torch.float64)
    yr = model(x); yr.backward(dy)
    xl = x[sl].clone().requires_grad_(); yl = sync(xl); yl.backward(dy[sl])
    rec("convert_y", yl, yr[sl])
    rec("convert_conv_wgrad_sum", allsum(sync[0].weight.grad), model[0].weight.grad)
    rec("convert_bn_wgrad_sum", allsum(sync[1].weight.grad), model[1].weight.grad)
    rec("convert_running_var", sync[1].running_var, model[1].running_var)
    model.zero_grad(); sync.zero_grad()

if len(sys.argv) > 2:  # PyTorch's module_db BatchNorm samples, split over the ranks
    sys.path.insert(0, sys.argv[2])
    from support import torch_module_db as mdb
    walked = mdb.walk(mdb.load_samples(sys.argv[1]), comm, rank, size, allsum)
    walked = comm.gather(walked, root=0)
    if rank == 0:
        mdb.emit(mdb.merge(walked))

worst = {k: comm.allreduce(v, op=MPI.MAX) for k, v in worst.items()}
if rank == 0:
    for k, v in sorted(worst.items()):
        print(f"MAXERR {k} {v:.3e}")
assert all(v <= 1e-9 for v in worst.values()), worst
"""


@pytest.mark.mpi
@pytest.mark.parametrize("n", [1, 3])
def test_adapter_under_mpiexec_equals_torch_global_batch(n, tmp_path):
    """One launch per size: the checks above and every module_db BatchNorm sample.

    With 3 ranks each sample's batch is split unevenly with the last rank
    empty (support.torch_module_db.split_counts); the reference is the
    torch module on the whole batch.
    """
    from support import TESTS
    from support import torch_module_db as mdb

    try:
        samples = mdb.module_db_samples()
    except pytest.skip.Exception:  # no expecttest: the checks above only
        samples, args = None, ()
    else:
        args = (mdb.save_samples(tmp_path / "samples.pt"), TESTS)
    res = run_mpi(MPI_SCRIPT, n, timeout=300, tmp_path=tmp_path, args=args)
    errs = {line.split()[1]: float(line.split()[2]) for line in res.stdout.splitlines()
            if line.startswith("MAXERR")}
    print(f"ranks={n}", errs)
    assert set(errs) >= {"y", "dx", "dweight_sum", "dbias_sum", "running_mean", "running_var",
                         "y_eval", "convert_y", "convert_conv_wgrad_sum"}
    assert max(errs.values()) <= 1e-9
    if samples is not None:
        worst = mdb.check_walk(mdb.parse(res.stdout), samples)
        print(f"module_db: {len(samples)} samples on {n} rank(s), worst:", worst)


def test_state_dict_helpers_with_torch():
    import cupysyncbn as sbn

    layer = sbn.SyncBatchNorm(3, momentum=0.9, unbiased_running_var=True, dtype="float64",
                              comm=LOCAL)
    x = np.random.default_rng(0).normal(size=(6, 3, 2, 2))
    layer(x)
    bn = ti.SyncBatchNorm(3, comm=LOCAL).double()
    bn.load_state_dict(ti.from_paddle_state_dict(layer.state_dict()))
    assert np.allclose(bn.running_var.numpy(), layer.state_dict()["_variance"], rtol=0, atol=0)
    back = ti.to_paddle_state_dict(bn)
    assert set(back) == {"weight", "bias", "_mean", "_variance"}
    layer2 = sbn.SyncBatchNorm(3, dtype="float64", comm=LOCAL)
    layer2.set_state_dict(back)
    assert np.array_equal(layer2.state_dict()["_mean"], layer.state_dict()["_mean"])
