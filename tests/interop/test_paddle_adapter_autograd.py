"""Paddle adapter: paddle.grad, in-place checks, trainable_statistics/act, to_static (issue #22).

Against Paddle's own layers (``paddle.nn.BatchNorm2D``, the older
``paddle.nn.BatchNorm``) on one process and on 2 MPI ranks.
"""

import copy

import numpy as np
import pytest
from support.mpi_runner import run_mpi

paddle = pytest.importorskip("paddle")

# Paddle's own BatchNorm warns on every training forward (the reference here).
pytestmark = pytest.mark.filterwarnings("ignore:When training, we now always track")

from cupysyncbn.comm.base import LOCAL  # noqa: E402
from cupysyncbn.interop import paddle as pi  # noqa: E402


@pytest.fixture
def dtype64():
    prev = paddle.get_default_dtype()
    paddle.set_default_dtype("float64")
    yield
    paddle.set_default_dtype(prev)


def _t(a, grad=False):
    return paddle.to_tensor(np.ascontiguousarray(a), stop_gradient=not grad)


def _max(a, b):
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.abs(a - b).max()) if a.size else 0.0


def _pair(seed=0):
    rng = np.random.default_rng(seed)
    ref, bn = paddle.nn.BatchNorm2D(3), pi.SyncBatchNorm(3, comm=LOCAL)
    w, b = rng.uniform(0.5, 1.5, 3), rng.uniform(-0.5, 0.5, 3)
    for layer in (ref, bn):
        layer.weight.set_value(w)
        layer.bias.set_value(b)
    return ref, bn


WRT = {
    "x": ("x",), "weight": ("weight",), "bias": ("bias",), "weight_bias": ("weight", "bias"),
    "x_bias": ("x", "bias"), "all": ("x", "weight", "bias"),
}


@pytest.mark.parametrize("wrt, x_needs_grad", [
    (w, g) for w in sorted(WRT) for g in (True, False) if g or "x" not in WRT[w]])
def test_paddle_grad_with_respect_to_any_subset(wrt, x_needs_grad, dtype64):
    ref, bn = _pair()
    xa = np.random.default_rng(1).normal(size=(4, 3, 2, 3))
    dya = np.random.default_rng(2).normal(size=xa.shape)
    # Paddle's own batch norm returns None from paddle.grad for a parameter
    # alone; its full backward gives the reference gradients.
    xr = _t(xa, grad=True)
    (ref(xr) * _t(dya)).sum().backward()
    want = {"x": xr.grad, "weight": ref.weight.grad, "bias": ref.bias.grad}
    x = _t(xa, grad=x_needs_grad)
    targets = {"x": x, "weight": bn.weight, "bias": bn.bias}
    got = paddle.grad((bn(x) * _t(dya)).sum(), [targets[n] for n in WRT[wrt]])
    assert bn.weight.grad is None  # paddle.grad does not accumulate
    for name, g in zip(WRT[wrt], got):
        assert _max(g.numpy(), want[name].numpy()) < 1e-9, name


def test_backward_with_frozen_parameters_and_input(dtype64):
    ref, bn = _pair()
    bn.weight.stop_gradient = True  # (Paddle's own layer then gives no bias gradient)
    xa = np.random.default_rng(3).normal(size=(5, 3, 2, 2))
    xr = _t(xa, grad=True)
    (ref(xr) ** 2).sum().backward()
    for x_grad in (True, False):
        x = _t(xa, grad=x_grad)
        (bn(x) ** 2).sum().backward()
        assert bn.weight.grad is None
        assert _max(bn.bias.grad.numpy(), ref.bias.grad.numpy()) < 1e-9
        if x_grad:
            assert _max(x.grad.numpy(), xr.grad.numpy()) < 1e-9
        bn.clear_gradients()
    bn.bias.stop_gradient = True
    y = bn(_t(xa))  # nothing needs a gradient: no graph
    assert y.stop_gradient


def test_create_graph_raises_naming_cupysyncbn():
    bn = pi.SyncBatchNorm(3, comm=LOCAL)
    x = _t(np.random.default_rng(4).normal(size=(4, 3)).astype("float32"), grad=True)
    with pytest.raises(Exception, match="cupysyncbn.*no double backward"):
        paddle.grad((bn(x) ** 3).sum(), [x], create_graph=True)


@pytest.mark.parametrize("training", [True, False])
def test_input_modified_in_place_after_forward_raises(training):
    bn = pi.SyncBatchNorm(3, comm=LOCAL)
    bn.train() if training else bn.eval()
    x = _t(np.random.default_rng(5).normal(size=(4, 3, 2)).astype("float32"), grad=True)
    xx = x * 1.0
    y = bn(xx)
    xx.scale_(2.0)  # the backward would read the new values
    with pytest.raises(Exception, match="cupysyncbn.*modified by an inplace operation"):
        y.sum().backward()
    y = bn(x * 1.0)
    y.sum().backward()  # untouched: fine
    assert np.isfinite(x.grad.numpy()).all()


def test_trainable_statistics_and_act_of_the_old_batchnorm_are_kept(dtype64):
    rng = np.random.default_rng(6)
    ref = paddle.nn.BatchNorm(3, act="relu", trainable_statistics=True, momentum=0.8,
                              dtype="float64")
    ref._mean.set_value(rng.normal(size=3))
    ours = pi.convert_sync_batchnorm(copy.deepcopy(ref), comm=LOCAL)
    assert ours._trainable_statistics and ours._act == "relu"
    for training in (True, False, False):
        ref.train() if training else ref.eval()
        ours.train() if training else ours.eval()
        xa = rng.normal(size=(6, 3, 2, 2)) * 2 + 1
        # Paddle's eval backward drops the batch statistics' dependence on x
        # (it is the affine map); ours is the gradient of the forward it ran,
        # which is Paddle's training-mode gradient on the same batch.
        grad_ref = copy.deepcopy(ref)
        grad_ref.train()
        xr, xs, xg = _t(xa, grad=True), _t(xa, grad=True), _t(xa, grad=True)
        yr, ys = ref(xr), ours(xs)
        assert _max(ys.numpy(), yr.numpy()) < 1e-6  # eval was 2.7 off (running stats)
        grad_ref(xg).sum().backward()
        ys.sum().backward()
        assert _max(xs.grad.numpy(), xg.grad.numpy()) < 1e-6
        # Paddle updates the running statistics in eval mode too (float32 momentum)
        assert _max(ours._mean.numpy(), ref._mean.numpy()) < 1e-6
        assert _max(ours._variance.numpy(), ref._variance.numpy()) < 1e-6
    plain = pi.convert_sync_batchnorm(paddle.nn.BatchNorm(3, dtype="float64"), comm=LOCAL)
    assert not plain._trainable_statistics and plain._act is None


def test_convert_refuses_an_unknown_activation():
    old = paddle.nn.BatchNorm(3)
    old._act = "no_such_activation"
    with pytest.raises(ValueError, match="cupysyncbn.*no_such_activation"):
        pi.convert_sync_batchnorm(old, comm=LOCAL)


def _model():
    paddle.seed(7)
    return paddle.nn.Sequential(
        paddle.nn.Conv2D(3, 4, 1), paddle.nn.BatchNorm2D(4), paddle.nn.ReLU())


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_to_static_sot_runs_and_full_graph_names_cupysyncbn():
    ref = _model()
    ours = pi.convert_sync_batchnorm(_model(), comm=LOCAL)
    static = paddle.jit.to_static(ours, full_graph=False)
    rng = np.random.default_rng(8)
    for step in range(2):
        x = _t(rng.normal(size=(5, 3, 4, 4)).astype("float32") + step)
        yr, ys = ref(x), static(x)
        assert _max(ys.numpy(), yr.numpy()) < 1e-5
        (yr**2).sum().backward()
        (ys**2).sum().backward()
    assert _max(ours[0].weight.grad.numpy(), ref[0].weight.grad.numpy()) < 1e-3
    assert _max(ours[1]._variance.numpy(), ref[1]._variance.numpy()) < 1e-5
    with pytest.raises(Exception, match="cupysyncbn.*full_graph"):
        paddle.jit.to_static(pi.convert_sync_batchnorm(_model(), comm=LOCAL),
                             full_graph=True)(x)


MPI_SCRIPT = r"""
import copy
import numpy as np, paddle
from mpi4py import MPI
from cupysyncbn.interop.paddle import convert_sync_batchnorm

comm = MPI.COMM_WORLD
rank, size = comm.Get_rank(), comm.Get_size()
paddle.set_default_dtype("float64")
rng = np.random.default_rng(0)  # same data on every rank: each slices its part
worst = 0.0

def t(a, grad=False):
    return paddle.to_tensor(np.ascontiguousarray(a), stop_gradient=not grad)

def err(a, b):
    return float(np.abs(np.asarray(a) - np.asarray(b)).max()) if np.size(b) else 0.0

def allsum(a):
    return comm.allreduce(np.asarray(a), op=MPI.SUM)

for counts in ([3, 5], [4, 0]):
    lo = sum(counts[:rank]); sl = slice(lo, lo + counts[rank]); n = sum(counts)
    # paddle.grad with respect to the input only, then the weight only
    ref = paddle.nn.BatchNorm2D(3)
    ours = convert_sync_batchnorm(copy.deepcopy(ref), comm=comm)
    xa = rng.normal(size=(n, 3, 2, 2)) * 2 + 1
    dya = rng.normal(size=xa.shape)
    xr, xl = t(xa, True), t(xa[sl], True)
    gr = paddle.grad((ref(xr) * t(dya)).sum(), [xr])[0].numpy()
    gl = paddle.grad((ours(xl) * t(dya[sl])).sum(), [xl])[0].numpy()
    worst = max(worst, err(gl, gr[sl]))
    xr, xl = t(xa, True), t(xa[sl])
    (ref(xr) * t(dya)).sum().backward()  # Paddle's paddle.grad of its weight alone is None
    gl = paddle.grad((ours(xl) * t(dya[sl])).sum(), [ours.weight])[0].numpy()
    worst = max(worst, err(allsum(gl), ref.weight.grad.numpy()))
    # trainable_statistics: eval with synchronized batch statistics and update
    old = paddle.nn.BatchNorm(3, act="relu", trainable_statistics=True, dtype="float64")
    conv = convert_sync_batchnorm(copy.deepcopy(old), comm=comm)
    old.eval(); conv.eval()
    xa = rng.normal(size=(n, 3, 2, 2)) * 3 - 1
    worst = max(worst, err(conv(t(xa[sl])).numpy(), old(t(xa)).numpy()[sl]))
    worst = max(worst, err(conv._mean.numpy(), old._mean.numpy()) / 10)  # float32 momentum
# paddle.jit.to_static (SOT): the layer runs eagerly and synchronizes
paddle.seed(3)
ref = paddle.nn.Sequential(paddle.nn.Conv2D(2, 3, 1), paddle.nn.BatchNorm2D(3))
ours = convert_sync_batchnorm(copy.deepcopy(ref), comm=comm)
static = paddle.jit.to_static(ours, full_graph=False)
counts = [3, 5]
lo = sum(counts[:rank]); sl = slice(lo, lo + counts[rank]); n = sum(counts)
for step in range(2):
    xa = rng.normal(size=(n, 2, 3, 3)) + step
    dya = rng.normal(size=(n, 3, 3, 3))
    yr = ref(t(xa))
    (yr * t(dya)).sum().backward()
    ys = static(t(xa[sl]))
    (ys * t(dya[sl])).sum().backward()
    worst = max(worst, err(ys.numpy(), yr.numpy()[sl]))
worst = max(worst, err(allsum(ours[0].weight.grad.numpy()), ref[0].weight.grad.numpy()))
worst = max(worst, err(ours[1]._variance.numpy(), ref[1]._variance.numpy()) / 10)
worst = comm.allreduce(worst, op=MPI.MAX)
if rank == 0:
    print(f"MAXERR {worst:.3e}")
assert worst <= 1e-6, worst
"""


@pytest.mark.mpi
def test_paddle_grad_trainable_statistics_to_static_on_two_ranks(tmp_path):
    """Batches 3/5 and 4/0: paddle.grad (input only, weight only), the converted
    trainable_statistics layer and a to_static (SOT) model equal Paddle on the
    whole batch."""
    res = run_mpi(MPI_SCRIPT, 2, timeout=300, tmp_path=tmp_path)
    assert "MAXERR" in res.stdout
