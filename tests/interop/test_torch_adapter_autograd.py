"""PyTorch adapter beyond first-order eager use, against torch.nn.BatchNorm (issue #22).

channels_last outputs that in-place ops may modify, double backward (one
process and 2 MPI ranks with uneven batches), torch.compile / jit / fx /
export / func, bfloat16 modules, and inputs modified in place.
"""

import numpy as np
import pytest
from support.mpi_runner import run_mpi

torch = pytest.importorskip("torch")

from cupysyncbn.comm.base import LOCAL  # noqa: E402
from cupysyncbn.interop import torch as ti  # noqa: E402


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """Tiny tensors: PyTorch's thread pool only adds latency on a busy machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _pair(c=3, cls=torch.nn.BatchNorm2d, dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    ref = cls(c).to(dtype)
    with torch.no_grad():
        ref.weight.uniform_(0.5, 1.5)
        ref.bias.uniform_(-0.5, 0.5)
    bn = ti.SyncBatchNorm(c, comm=LOCAL).to(dtype)
    bn.load_state_dict(ref.state_dict())
    return ref, bn


def _maxdiff(a, b):
    return (a.detach().double() - b.detach().double()).abs().max().item() if a.numel() else 0.0


# ---------------------------------------------------------------- channels_last


@pytest.mark.parametrize("ndim", [4, 5])
@pytest.mark.parametrize("training", [True, False])
def test_channels_last_output_takes_in_place_ops(ndim, training):
    ref, bn = _pair(cls=torch.nn.BatchNorm2d if ndim == 4 else torch.nn.BatchNorm3d)
    ref.train(training)
    bn.train(training)
    fmt = torch.channels_last if ndim == 4 else torch.channels_last_3d
    shape = (4, 3, 5, 6) if ndim == 4 else (4, 3, 2, 3, 4)
    x = torch.randn(*shape, dtype=torch.float64).to(memory_format=fmt)
    xr, xs = x.clone().requires_grad_(), x.clone().requires_grad_()
    yr, ys = ref(xr), bn(xs)
    assert ys.is_contiguous(memory_format=fmt) and not ys._is_view()
    yr.relu_()
    ys.relu_()  # raised "a view and is being modified inplace" before
    dy = torch.randn_like(yr)
    yr.backward(dy)
    ys.backward(dy)
    assert _maxdiff(ys, yr) < 1e-9 and _maxdiff(xs.grad, xr.grad) < 1e-9
    assert xs.grad.is_contiguous(memory_format=fmt)
    assert _maxdiff(bn.weight.grad, ref.weight.grad) < 1e-9


def test_channels_last_resnet_block_with_inplace_relu():
    torch.manual_seed(1)

    def block():
        return torch.nn.Sequential(
            torch.nn.Conv2d(3, 4, 3, padding=1, bias=False), torch.nn.BatchNorm2d(4),
            torch.nn.ReLU(inplace=True), torch.nn.Conv2d(4, 4, 3, padding=1, bias=False),
            torch.nn.BatchNorm2d(4), torch.nn.ReLU(inplace=True)).double()

    ref = block().to(memory_format=torch.channels_last)
    ours = ti.convert_sync_batchnorm(block(), comm=LOCAL).to(memory_format=torch.channels_last)
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(4, 3, 6, 6, dtype=torch.float64).to(memory_format=torch.channels_last)
    yr, ys = ref(x), ours(x)
    yr.sum().backward()
    ys.sum().backward()
    assert _maxdiff(ys, yr) < 1e-9
    assert _maxdiff(ours[0].weight.grad, ref[0].weight.grad) < 1e-9


# ------------------------------------------------------------- double backward


def test_gradgradcheck_float64_training_and_eval():
    torch.manual_seed(3)
    x = torch.randn(5, 3, 2, 2, dtype=torch.float64, requires_grad=True)
    w = (torch.rand(3, dtype=torch.float64) + 0.5).requires_grad_()
    b = torch.randn(3, dtype=torch.float64, requires_grad=True)

    def f(x, w, b):
        return ti.batch_norm(x, None, None, w, b, training=True, comm=LOCAL)

    assert torch.autograd.gradgradcheck(f, (x, w, b))
    xl = x.detach().to(memory_format=torch.channels_last).requires_grad_()
    assert torch.autograd.gradgradcheck(lambda x: f(x, w, b), (xl,))
    bn = ti.SyncBatchNorm(3, comm=LOCAL).double()
    bn(x.detach() * 2 + 1)  # running statistics that are not 0/1
    bn.eval()
    assert torch.autograd.gradgradcheck(lambda x, w, b: bn(x) * w.sum() + b.sum(), (x, w, b))


def _gradient_penalty(model, x):
    x = x.clone().requires_grad_()
    out = model(x)
    (g,) = torch.autograd.grad(out.pow(3).sum(), x, create_graph=True)
    penalty = g.pow(2).sum()
    penalty.backward()
    return penalty.detach()


@pytest.mark.parametrize("kind", ["linear", "conv_channels_last"])
def test_gradient_penalty_equals_torch(kind):
    torch.manual_seed(2)
    if kind == "linear":
        ref = torch.nn.Sequential(torch.nn.Linear(5, 3), torch.nn.BatchNorm1d(3)).double()
        x = torch.randn(7, 5, dtype=torch.float64)
    else:
        ref = torch.nn.Sequential(torch.nn.Conv2d(2, 3, 1), torch.nn.BatchNorm2d(3)).double()
        x = torch.randn(4, 2, 3, 3, dtype=torch.float64).to(memory_format=torch.channels_last)
    with torch.no_grad():
        ref[1].weight.uniform_(0.5, 1.5)
    ours = ti.convert_sync_batchnorm(__import__("copy").deepcopy(ref), comm=LOCAL)
    pr, ps = _gradient_penalty(ref, x), _gradient_penalty(ours, x)
    assert abs(pr - ps) <= 1e-9 * abs(pr)
    assert ours[1].weight.grad is not None  # was silently None
    for (name, pref), pour in zip(ref.named_parameters(), ours.parameters()):
        assert _maxdiff(pour.grad, pref.grad) <= 1e-9 * (1 + pref.grad.abs().max().item()), name
    assert _maxdiff(ours[1].running_var, ref[1].running_var) < 1e-12


def test_hessian_vector_product_equals_torch():
    torch.manual_seed(4)
    lin = torch.nn.Linear(4, 3).double()
    ref, bn = _pair(cls=torch.nn.BatchNorm1d)
    x, v = torch.randn(8, 4, dtype=torch.float64), torch.randn(8, 4, dtype=torch.float64)
    hr = torch.autograd.functional.hvp(lambda t: (ref(lin(t)) ** 3).sum(), x, v)[1]
    hs = torch.autograd.functional.hvp(lambda t: (bn(lin(t)) ** 3).sum(), x, v)[1]
    assert hr.norm() > 1.0  # a real second derivative (it was all zeros)
    assert _maxdiff(hs, hr) <= 1e-10 * hr.abs().max().item()


DOUBLE_BACKWARD_MPI = r"""
import copy
import torch
from mpi4py import MPI
from cupysyncbn.interop.torch import convert_sync_batchnorm

comm = MPI.COMM_WORLD
rank, size = comm.Get_rank(), comm.Get_size()
torch.manual_seed(0)  # same model and data on every rank: each slices its part
worst = 0.0

def allsum(t):
    return torch.from_numpy(comm.allreduce(t.detach().numpy().copy(), op=MPI.SUM))

def rel(a, b):
    return ((a - b).abs().max() / (1 + b.abs().max())).item()

for counts, kind in (([3, 6], "linear"), ([5, 0], "linear"), ([1, 3], "conv")):
    lo = sum(counts[:rank]); sl = slice(lo, lo + counts[rank]); n = sum(counts)
    if kind == "linear":
        ref = torch.nn.Sequential(torch.nn.Linear(5, 3), torch.nn.BatchNorm1d(3)).double()
        x = torch.randn(n, 5, dtype=torch.float64) * 2 + 1
    else:
        ref = torch.nn.Sequential(torch.nn.Conv2d(2, 3, 1), torch.nn.BatchNorm2d(3)).double()
        x = torch.randn(n, 2, 3, 3, dtype=torch.float64).to(memory_format=torch.channels_last)
    with torch.no_grad():
        ref[1].weight.uniform_(0.5, 1.5)
    ours = convert_sync_batchnorm(copy.deepcopy(ref), comm=comm)
    # one process, torch's BatchNorm on the whole batch
    xr = x.clone().requires_grad_()
    (gr,) = torch.autograd.grad(ref(xr).pow(3).sum(), xr, create_graph=True)
    gr.pow(2).sum().backward()
    # this rank's part; the loss of the job is the sum of the ranks' losses
    xl = x[sl].clone().requires_grad_()
    (gl,) = torch.autograd.grad(ours(xl).pow(3).sum(), xl, create_graph=True)
    gl.pow(2).sum().backward()
    worst = max(worst, rel(gl, gr[sl]) if counts[rank] else 0.0)
    for pr, pl in zip(ref.parameters(), ours.parameters()):
        assert pl.grad is not None
        worst = max(worst, rel(allsum(pl.grad), pr.grad))
    worst = max(worst, rel(ours[1].running_mean, ref[1].running_mean))
# torch.compile(fullgraph=True) on the ranks: the custom operators synchronize
for counts in ([2, 5], [4, 0]):
    lo = sum(counts[:rank]); sl = slice(lo, lo + counts[rank]); n = sum(counts)
    torch.manual_seed(1)
    ref = torch.nn.Sequential(torch.nn.Conv2d(2, 3, 1), torch.nn.BatchNorm2d(3)).double()
    ours = convert_sync_batchnorm(copy.deepcopy(ref), comm=comm)
    compiled = torch.compile(ours, backend="aot_eager", fullgraph=True)
    for step in range(2):
        x = torch.randn(n, 2, 3, 3, dtype=torch.float64) + step
        dy = torch.randn(n, 3, 3, 3, dtype=torch.float64)
        yr = ref(x); (yr * dy).sum().backward()
        yl = compiled(x[sl]); (yl * dy[sl]).sum().backward()
        worst = max(worst, rel(yl, yr[sl]) if counts[rank] else 0.0)
    for pr, pl in zip(ref.parameters(), ours.parameters()):
        worst = max(worst, rel(allsum(pl.grad), pr.grad))
    worst = max(worst, rel(ours[1].running_var, ref[1].running_var))
worst = comm.allreduce(worst, op=MPI.MAX)
if rank == 0:
    print(f"MAXERR {worst:.3e}")
assert worst <= 1e-9, worst
"""


@pytest.mark.mpi
def test_gradient_penalty_and_compile_on_two_ranks_equal_torch_global_batch(tmp_path):
    """Uneven (3/6, 5/0, 1/3) batches: the penalty's parameter gradients summed over the
    ranks equal one process with torch's BatchNorm on the whole batch; so do a
    torch.compile(fullgraph=True) model's outputs, gradients and statistics (2/5, 4/0)."""
    res = run_mpi(DOUBLE_BACKWARD_MPI, 2, timeout=300, tmp_path=tmp_path)
    assert "MAXERR" in res.stdout


# ------------------------------------------------------- compile, jit, fx, export


def _model(dtype=torch.float32):
    torch.manual_seed(6)
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 1), torch.nn.BatchNorm2d(4), torch.nn.ReLU(inplace=True)).to(dtype)


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
@pytest.mark.parametrize("momentum", [0.1, None])
def test_torch_compile_fullgraph_equals_eager_torch(backend, momentum):
    torch._dynamo.reset()
    ref, ours = _model(torch.float64), ti.convert_sync_batchnorm(_model(torch.float64), comm=LOCAL)
    ref[1].momentum = ours[1].momentum = momentum
    compiled = torch.compile(ours, backend=backend, fullgraph=True)
    for step in range(3):
        x = torch.randn(5, 3, 4, 4, dtype=torch.float64) + step
        if step == 1:
            x = x.to(memory_format=torch.channels_last)
        if step == 2:  # dense but neither contiguous nor channels-last
            x = x.transpose(2, 3).contiguous().transpose(2, 3)
        yr, ys = ref(x), compiled(x)
        assert ys.stride() == yr.stride()
        yr.square().sum().backward()
        ys.square().sum().backward()
        assert _maxdiff(ys, yr) < 1e-9
    for pr, ps in zip(ref.parameters(), ours.parameters()):
        assert _maxdiff(ps.grad, pr.grad) < 1e-9
    assert _maxdiff(ours[1].running_var, ref[1].running_var) < 1e-12
    assert _maxdiff(ours[1].running_mean, ref[1].running_mean) < 1e-12
    assert int(ours[1].num_batches_tracked) == 3
    ref.eval()
    ours.eval()
    x = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    assert _maxdiff(compiled(x), ref(x)) < 1e-9


def test_torch_compile_bfloat16_and_functional_take_a_graph_break():
    torch._dynamo.reset()
    ref, ours = _model().bfloat16(), ti.convert_sync_batchnorm(_model(), comm=LOCAL).bfloat16()
    x = torch.randn(4, 3, 2, 2).bfloat16()
    assert _maxdiff(torch.compile(ours, backend="aot_eager")(x), ref(x)) < 5e-2

    def fn(x):
        return ti.batch_norm(x, None, None, training=True, comm=LOCAL) * 2

    x = torch.randn(4, 3)
    assert _maxdiff(torch.compile(fn, backend="eager")(x),
                    torch.nn.functional.batch_norm(x, None, None, training=True) * 2) < 1e-5
    torch._dynamo.reset()  # else the graph-broken compilation of fn is reused
    with pytest.raises(Exception, match="cupysyncbn"):
        torch.compile(fn, backend="eager", fullgraph=True)(x)


def test_torch_compile_inductor_small():
    pytest.importorskip("torch._inductor")
    torch._dynamo.reset()
    ref, ours = _model(), ti.convert_sync_batchnorm(_model(), comm=LOCAL)
    x = torch.randn(4, 3, 2, 2)
    assert _maxdiff(torch.compile(ours, fullgraph=True)(x), ref(x)) < 1e-5
    assert _maxdiff(ours[1].running_var, ref[1].running_var) < 1e-6


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch.jit is deprecated
def test_jit_fx_export_func_work_or_name_cupysyncbn():
    model = ti.convert_sync_batchnorm(_model(), comm=LOCAL)
    x = torch.randn(4, 3, 2, 2)
    with pytest.raises(NotImplementedError, match="cupysyncbn.*torch.jit.script"):
        torch.jit.script(model)
    with pytest.raises(NotImplementedError, match="cupysyncbn.*torch.jit.trace"):
        torch.jit.trace(model, (x,))
    gm = torch.fx.symbolic_trace(model)  # the layer is a leaf module
    assert [n.target for n in gm.graph.nodes if n.op == "call_module"] == ["0", "1", "2"]
    ref = _model()
    assert _maxdiff(gm(x), ref(x)) < 1e-5
    ep = torch.export.export(model, (x,))  # our operator in the exported graph
    assert "cupysyncbn.sync_batch_norm" in ep.graph_module.code
    assert _maxdiff(ep.module()(x), ref(x)) < 1e-5
    from torch.func import functional_call, grad, vmap

    params = dict(model.named_parameters())
    with pytest.raises(NotImplementedError, match="cupysyncbn.*torch.func"):
        grad(lambda p: functional_call(model, p, (x,)).sum())(params)
    with pytest.raises(NotImplementedError, match="cupysyncbn.*torch.func"):
        vmap(model)(x[None])


# ------------------------------------------------------------------- bfloat16


@pytest.mark.parametrize("input_dtype", [torch.bfloat16, torch.float32])
def test_bfloat16_module_like_torch(input_dtype):
    ref, bn = _pair(dtype=torch.float32)
    bn = bn.bfloat16()
    # torch's CPU kernel refuses float32 inputs to a bfloat16 module ("mixed
    # dtype"); ours computes them: compare with the float32 module of the
    # same (rounded) parameters then.
    ref = ref.bfloat16() if input_dtype == torch.bfloat16 else ref.bfloat16().float()
    for step in range(3):
        x = (torch.randn(6, 3, 4, 4) * 2 + step).to(input_dtype)
        xr, xs = x.clone().requires_grad_(), x.clone().requires_grad_()
        yr, ys = ref(xr), bn(xs)
        assert ys.dtype == yr.dtype == input_dtype
        dy = torch.randn_like(yr)
        yr.backward(dy)
        ys.backward(dy)
        assert _maxdiff(ys, yr) < 5e-2 and _maxdiff(xs.grad, xr.grad) < 5e-2
    for name in ("weight", "bias"):
        p, q = getattr(bn, name), getattr(ref, name)
        assert p.dtype == p.grad.dtype == torch.bfloat16, name
        assert _maxdiff(p.grad, q.grad) <= 2e-2 * (1 + q.grad.abs().max().item())
    for name in ("running_mean", "running_var"):
        assert getattr(bn, name).dtype == torch.bfloat16
        assert _maxdiff(getattr(bn, name), getattr(ref, name)) < 5e-2
    assert int(bn.num_batches_tracked) == 3
    bn.eval()
    ref.eval()
    x = torch.randn(4, 3, 2, 2).to(input_dtype)
    assert _maxdiff(bn(x), ref(x)) < 5e-2


def test_bfloat16_running_stats_are_float32_ones_rounded():
    bn = ti.SyncBatchNorm(3, comm=LOCAL).bfloat16()
    ref = torch.nn.BatchNorm2d(3)  # float32, on the same (bfloat16-valued) data
    x = (torch.randn(6, 3, 4, 4) * 3 + 1).bfloat16()
    bn(x)
    ref(x.float())
    for name in ("running_mean", "running_var"):
        ours, exact = getattr(bn, name).float(), getattr(ref, name)
        assert (ours - exact).abs().max() <= 2.0**-8 * exact.abs().max()  # one bf16 rounding


# ------------------------------------------------------- in-place modification


@pytest.mark.parametrize("training", [True, False])
def test_input_modified_in_place_after_forward_raises(training):
    bn = ti.SyncBatchNorm(4, comm=LOCAL).train(training)
    x = torch.randn(3, 4, 2, requires_grad=True)
    xx = x * 1.0
    y = bn(xx)
    xx.mul_(2.0)  # the backward would read the new values
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()
    xx = x * 1.0
    y = bn(xx)
    y.sum().backward()  # untouched: fine
    assert np.isfinite(x.grad.numpy()).all()
