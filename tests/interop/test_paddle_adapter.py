"""Paddle adapter (cupysyncbn.interop.paddle), one process, against paddle.nn.BatchNorm*D.

Multi-process checks: tests/interop/test_paddle_adapter_mpi.py (mpiexec) and
tests/interop/test_paddle_adapter_launch.py (python -m paddle.distributed.launch).
"""

import copy
import subprocess
import sys

import numpy as np
import pytest
from support.bn_ref import ref_backward

paddle = pytest.importorskip("paddle")

# Paddle's own BatchNorm warns on every training forward (the reference here).
pytestmark = pytest.mark.filterwarnings("ignore:When training, we now always track")

import cupysyncbn as sbn  # noqa: E402
from cupysyncbn.comm import as_communicator  # noqa: E402
from cupysyncbn.comm import paddle as cp  # noqa: E402
from cupysyncbn.comm.base import LOCAL, NoCommunicator  # noqa: E402
from cupysyncbn.errors import CommunicatorError  # noqa: E402
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


def _rel(a, b):
    return _max(a, b) / max(float(np.abs(np.asarray(b, dtype=np.float64)).max()), 1e-300)


def _run_pair(ref, bn, shape, steps=3, seed=0):
    """Train ref (Paddle) and bn (ours) side by side; return the worst errors."""
    rng = np.random.default_rng(seed)
    dt = paddle.get_default_dtype()
    c = shape[-1 if bn._data_format in pi._CHANNEL_LAST else 1]
    w, b = rng.uniform(0.5, 1.5, c), rng.uniform(-0.5, 0.5, c)
    for layer in (ref, bn):
        layer.weight.set_value(w.astype(dt))
        layer.bias.set_value(b.astype(dt))
    err = {}

    def rec(k, v):
        err[k] = max(err.get(k, 0.0), v)

    for step in range(steps):
        x = (rng.normal(size=shape) * (1 + step) + 3 * step).astype(dt)
        dy = rng.normal(size=shape).astype(dt)
        got = []
        for layer in (ref, bn):
            xt = _t(x, grad=True)
            y = layer(xt)
            y.backward(_t(dy))
            got.append((y.numpy(), xt.grad.numpy(), layer.weight.grad.numpy(),
                        layer.bias.grad.numpy(), layer._mean.numpy(), layer._variance.numpy()))
            layer.clear_gradients()
        (yr, dxr, dwr, dbr, mr, vr), (ys, dxs, dws, dbs, ms, vs) = got
        rec("y", _max(ys, yr))
        rec("dx", _max(dxs, dxr))
        rec("dweight", _max(dws, dwr))
        rec("dbias", _max(dbs, dbr))
        rec("mean_rel", _rel(ms, mr))
        rec("variance_rel", _rel(vs, vr))
    ref.eval()
    bn.eval()
    x = _t(rng.normal(size=shape).astype(dt))
    rec("y_eval_rel", _rel(bn(x).numpy(), ref(x).numpy()))
    return err


def _assert_close(err, dtype):
    tol = 1e-9 if dtype == "float64" else 1e-5
    for k, v in err.items():
        limit = 1e-6 if k.endswith("_rel") else tol
        assert v <= limit, (k, v, err)


def test_import_cupysyncbn_does_not_import_paddle():
    code = ("import sys, cupysyncbn, cupysyncbn.interop, cupysyncbn.conformance, "
            "cupysyncbn.comm; cupysyncbn.init('auto'); print('paddle' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("fmt", ["NCHW", "NHWC", "NC"])
def test_matches_paddle_batchnorm_one_process(dtype, fmt):
    prev = paddle.get_default_dtype()
    paddle.set_default_dtype(dtype)
    try:
        if fmt == "NC":
            ref = paddle.nn.BatchNorm1D(4, data_format="NCL")
            bn = pi.SyncBatchNorm(4, data_format="NCL", comm=LOCAL)
            shape = (7, 4)
        else:
            ref = paddle.nn.BatchNorm2D(4, data_format=fmt)
            bn = pi.SyncBatchNorm(4, data_format=fmt, comm=LOCAL)
            shape = (6, 4, 3, 5) if fmt == "NCHW" else (6, 3, 5, 4)
        err = _run_pair(ref, bn, shape)
    finally:
        paddle.set_default_dtype(prev)
    print(dtype, fmt, err)
    _assert_close(err, dtype)


def test_paddle_names_state_dict_and_in_place_buffers(dtype64):
    ref = paddle.nn.SyncBatchNorm(3)
    bn = pi.SyncBatchNorm(3, comm=LOCAL)
    assert isinstance(bn, paddle.nn.SyncBatchNorm) and isinstance(bn, paddle.nn.Layer)
    assert list(bn.state_dict()) == list(ref.state_dict()) == ["weight", "bias", "_mean",
                                                               "_variance"]
    assert [p.name is not None for p in bn.parameters()] == [True] * 4
    mean, var, ptr = bn._mean, bn._variance, bn._mean.data_ptr()
    x = _t(np.random.default_rng(0).normal(size=(5, 3, 2, 2)) + 2.0)
    bn(x)
    assert bn._mean is mean and bn._variance is var and bn._mean.data_ptr() == ptr
    assert np.allclose(mean.numpy(), 0.1 * x.numpy().mean(axis=(0, 2, 3)), atol=1e-12)
    # set_state_dict / train / eval as any Paddle layer
    bn2 = pi.SyncBatchNorm(3, comm=LOCAL)
    bn2.set_state_dict(bn.state_dict())
    assert np.array_equal(bn2._variance.numpy(), var.numpy())
    bn2.eval()
    before = bn2._mean.numpy().copy()
    y = bn2(x)
    assert np.array_equal(bn2._mean.numpy(), before)  # eval: no update
    expect = (x.numpy() - before[None, :, None, None]) / np.sqrt(
        bn2._variance.numpy()[None, :, None, None] + 1e-5)
    assert _max(y.numpy(), expect) < 1e-9
    assert bn.training and not bn2.training


def test_named_statistics_and_param_attr(dtype64):
    attr = paddle.ParamAttr(initializer=paddle.nn.initializer.Constant(2.0), learning_rate=0.5)
    bn = pi.SyncBatchNorm(3, weight_attr=attr, name="bn_x", comm=LOCAL)
    ref = paddle.nn.SyncBatchNorm(3, weight_attr=copy.deepcopy(attr), name="bn_y")
    assert np.array_equal(bn.weight.numpy(), ref.weight.numpy())
    assert bn.weight.optimize_attr["learning_rate"] == 0.5
    assert bn._mean.name == "bn_x_mean" and bn._variance.name == "bn_x_variance"


@pytest.mark.parametrize("which", ["weight", "bias", "both"])
def test_weight_attr_false_and_bias_attr_false_as_in_paddle(which, dtype64):
    kw = {"weight_attr": False} if which == "weight" else {"bias_attr": False}
    if which == "both":
        kw = {"weight_attr": False, "bias_attr": False}
    ref_sync = paddle.nn.SyncBatchNorm(3, **kw)  # Paddle: fixed 1 / 0, stop_gradient
    bn = pi.SyncBatchNorm(3, comm=LOCAL, **kw)
    assert list(bn.state_dict()) == list(ref_sync.state_dict())
    for name in ("weight", "bias"):
        mine, theirs = getattr(bn, name), getattr(ref_sync, name)
        assert mine.stop_gradient == theirs.stop_gradient
        assert np.array_equal(mine.numpy(), theirs.numpy())
    # Numerically a BatchNorm2D whose weight stays 1 / bias 0. (Paddle's own
    # BatchNorm2D(weight_attr=False) drops the bias gradient too: a Paddle bug.)
    ref = paddle.nn.BatchNorm2D(3)
    rng = np.random.default_rng(3)
    x = rng.normal(size=(4, 3, 2, 3))
    dy = rng.normal(size=x.shape)
    outs = []
    for layer in (ref, bn):
        xt = _t(x, grad=True)
        y = layer(xt)
        y.backward(_t(dy))
        outs.append((y.numpy(), xt.grad.numpy()))
    assert _max(outs[1][0], outs[0][0]) < 1e-9 and _max(outs[1][1], outs[0][1]) < 1e-9
    fixed_w, fixed_b = which in ("weight", "both"), which in ("bias", "both")
    assert (bn.weight.grad is None) == fixed_w and (bn.bias.grad is None) == fixed_b
    if not fixed_w:
        assert _max(bn.weight.grad.numpy(), ref.weight.grad.numpy()) < 1e-9
    if not fixed_b:
        assert _max(bn.bias.grad.numpy(), ref.bias.grad.numpy()) < 1e-9
    assert np.array_equal(bn.weight.numpy(), np.ones(3)) or not fixed_w
    assert np.array_equal(bn.bias.numpy(), np.zeros(3)) or not fixed_b


def test_any_rank_of_input_and_float16_bfloat16():
    rng = np.random.default_rng(4)
    bn = pi.SyncBatchNorm(3, data_format="NCHW", comm=LOCAL)
    for shape in [(5, 3), (5, 3, 4), (5, 3, 2, 2), (5, 3, 2, 2, 2)]:
        x = rng.normal(size=shape).astype("float32")
        y = bn(_t(x)).numpy()
        axes = tuple(i for i in range(len(shape)) if i != 1)
        expect = (x - x.mean(axes, keepdims=True)) / np.sqrt(x.var(axes, keepdims=True) + 1e-5)
        assert _max(y, expect) < 1e-5, shape
    last = pi.SyncBatchNorm(3, data_format="NHWC", comm=LOCAL)
    x = rng.normal(size=(4, 2, 3)).astype("float32")
    expect = (x - x.mean((0, 1))) / np.sqrt(x.var((0, 1)) + 1e-5)
    assert _max(last(_t(x)).numpy(), expect) < 1e-5
    for dt, tol in (("float16", 0.01), ("bfloat16", 0.06)):
        xt = _t(x.transpose(0, 2, 1)).astype(dt)
        xt.stop_gradient = False
        y = bn(xt)
        assert y.dtype == xt.dtype
        dy = _t(rng.uniform(-1, 1, size=xt.shape).astype("float32")).astype(dt)
        y.backward(dy)
        assert xt.grad is not None and xt.grad.dtype == xt.dtype
        assert _max(y.astype("float32").numpy(), expect.transpose(0, 2, 1)) < 0.05
        # the gradient's values, against float64 on the rounded x and dy
        x64, dy64 = (np.asarray(t.astype("float32").numpy(), np.float64) for t in (xt, dy))
        ref_dx, _, _ = ref_backward(x64, dy64, "NCL")
        assert _max(xt.grad.astype("float32").numpy(), ref_dx) < tol, dt


def test_empty_batch_and_errors():
    bn = pi.SyncBatchNorm(3, comm=LOCAL)
    x = paddle.zeros([0, 3, 2, 2])
    x.stop_gradient = False
    y = bn(x)
    y.backward(paddle.zeros([0, 3, 2, 2]))
    assert y.shape == [0, 3, 2, 2] and x.grad.shape == [0, 3, 2, 2]
    assert np.array_equal(bn._mean.numpy(), np.zeros(3))  # unchanged
    assert np.array_equal(bn.weight.grad.numpy(), np.zeros(3))
    with pytest.raises(ValueError, match="data_format"):
        pi.SyncBatchNorm(3, data_format="NCWH")
    with pytest.raises(ValueError, match="momentum"):
        pi.SyncBatchNorm(3, momentum=1.5)
    with pytest.raises(ValueError, match="num_features"):
        pi.SyncBatchNorm(0)
    with pytest.raises(ValueError, match="2D to 5D"):
        bn(paddle.zeros([3]))
    with pytest.raises(ValueError, match="channels"):
        bn(paddle.zeros([2, 4, 2, 2]))
    with pytest.raises(TypeError, match="paddle.Tensor"):
        bn(np.zeros((2, 3, 2, 2), dtype=np.float32))
    with pytest.raises(TypeError, match="comm"):
        pi.SyncBatchNorm(3, comm="world")


def test_deepcopy_shares_the_communicator():
    c = NoCommunicator()
    bn = pi.SyncBatchNorm(3, comm=c)
    twin = copy.deepcopy(bn)
    assert twin.comm is c and twin._mean is not bn._mean


def test_convert_sync_batchnorm_one_process(dtype64):
    paddle.seed(5)
    model = paddle.nn.Sequential(
        paddle.nn.Conv2D(3, 4, 3, padding=1), paddle.nn.BatchNorm2D(4), paddle.nn.ReLU(),
        paddle.nn.Sequential(paddle.nn.BatchNorm1D(4, data_format="NLC", bias_attr=False)),
        paddle.nn.BatchNorm(4, act="relu", param_attr=False),
        paddle.nn.SyncBatchNorm(4, epsilon=1e-3, momentum=0.8),
        paddle.nn.BatchNorm3D(4, data_format="NDHWC"),
    )
    model[1]._mean.set_value(np.full(4, 0.25))
    model[5].eval()
    bn_weight, bn_mean = model[1].weight, model[1]._mean
    opt = paddle.optimizer.SGD(0.1, parameters=model.parameters())
    conv = pi.convert_sync_batchnorm(model, comm=LOCAL)
    assert conv is model
    assert [type(m).__name__ for m in conv.sublayers()].count("SyncBatchNorm") == 5
    assert all(isinstance(m, pi.SyncBatchNorm) for m in
               (conv[1], conv[3][0], conv[4], conv[5], conv[6]))
    assert conv[1].weight is bn_weight and conv[1]._mean is bn_mean
    assert conv[3][0]._data_format == "NLC" and conv[3][0].bias.stop_gradient
    assert not conv[3][0].weight.stop_gradient
    assert conv[4].weight.stop_gradient and conv[4]._act == "relu"
    assert conv[5]._epsilon == 1e-3 and conv[5]._momentum == 0.8 and not conv[5].training
    assert conv[6]._data_format == "NDHWC"
    assert np.array_equal(conv[1]._mean.numpy(), np.full(4, 0.25))
    # an optimizer built before the conversion still trains the converted layer
    x = _t(np.random.default_rng(0).normal(size=(2, 3, 4, 4)))
    conv[0:3](x).sum().backward()
    before = bn_weight.numpy().copy()
    opt.step()
    assert not np.array_equal(conv[1].weight.numpy(), before)
    # act='relu' of paddle.nn.BatchNorm is kept
    assert conv[4](_t(np.random.default_rng(1).normal(size=(5, 4)))).numpy().min() >= 0
    single = pi.SyncBatchNorm.convert_sync_batchnorm(paddle.nn.BatchNorm2D(2))
    assert isinstance(single, pi.SyncBatchNorm)
    assert pi.convert_sync_batchnorm(conv) is conv  # nothing left to convert


def test_paddle_communicator_without_launcher():
    # Paddle imported but init_parallel_env() not run: auto stays one process.
    assert not cp.paddle_initialized()
    assert isinstance(sbn.comm.select._create("auto", None), NoCommunicator)
    with pytest.raises(CommunicatorError, match="init_parallel_env"):
        cp.PaddleCommunicator()
    with pytest.raises(CommunicatorError, match="init_parallel_env"):
        sbn.init("paddle")
    with pytest.raises(TypeError, match="comm"):
        as_communicator(paddle.zeros([1]))  # a paddle object, but not a group
    assert not cp.is_paddle_group(paddle.zeros([1])) and not cp.is_paddle_group(LOCAL)


class _FakeGroup:
    """Stands in for paddle.distributed's Group (checked by module name and attributes)."""

    __module__ = "paddle.distributed.communication.group"

    def __init__(self, gid, rank=0, nranks=1):
        self.id, self.rank, self.nranks, self.ranks = gid, rank, nranks, list(range(nranks))
        self.backend = "GLOO"


def test_communicator_per_group_is_cached_and_single_rank_is_identity(monkeypatch):
    monkeypatch.setattr(paddle.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(cp, "_BY_GROUP", {})
    g = _FakeGroup(77)
    c = as_communicator(g)
    assert isinstance(c, cp.PaddleCommunicator) and c.backend == "paddle"
    assert as_communicator(g) is c and c.group_key() == ("paddle", 77)
    assert as_communicator(_FakeGroup(78)).group_key() != c.group_key()
    buf = np.arange(3.0)
    assert c.allreduce_sum(buf) is buf and np.array_equal(buf, [0.0, 1.0, 2.0])
    assert np.array_equal(c.allreduce_host([1.0, 2.0]), [1.0, 2.0])
    with pytest.raises(ValueError, match="not a member"):
        cp.PaddleCommunicator(_FakeGroup(79, rank=-1, nranks=2))
    # the in-place sum goes through paddle.distributed.all_reduce on a shared tensor
    seen = []

    def fake_all_reduce(t, op=None, group=None, sync_op=True):
        seen.append(group)
        np.from_dlpack(t)[...] *= 2  # what a 2-rank sum of equal buffers gives

    monkeypatch.setattr(paddle.distributed, "all_reduce", fake_all_reduce)
    two = cp.PaddleCommunicator(_FakeGroup(80, rank=1, nranks=2))
    buf = np.arange(4.0)
    assert two.allreduce_sum(buf) is buf and np.array_equal(buf, [0.0, 2.0, 4.0, 6.0])
    assert seen == [two.group] and two.rank == 1 and two.size == 2
    # abort ends this process at once (Paddle's launcher then stops the others)
    exits = []
    monkeypatch.setattr(cp.os, "_exit", exits.append)
    two.abort(7)
    assert exits == [7]


def test_float64_matches_numpy_two_pass_reference(dtype64):
    # Paddle's own CPU kernel differs from this reference by ~5e-13 here.
    rng = np.random.default_rng(0)
    bn = pi.SyncBatchNorm(4, comm=LOCAL)
    for step in range(3):
        x = rng.normal(size=(8, 4, 3, 5)) * (1 + step) + 3 * step
        m, v = x.mean((0, 2, 3), keepdims=True), x.var((0, 2, 3), keepdims=True)
        with paddle.no_grad():
            y = bn(_t(x)).numpy()
        assert _max(y, (x - m) / np.sqrt(v + 1e-5)) < 1e-14


@pytest.mark.skipif(paddle.is_compiled_with_cuda(), reason="CPU wheel only")
def test_paddle_own_syncbatchnorm_has_no_cpu_kernel():
    # Why this adapter exists on CPU (Paddle 3.3.1 CPU wheel); if Paddle adds
    # the kernel this test tells us to revisit docs/paddle.md.
    with pytest.raises(RuntimeError, match="sync_batch_norm"):
        paddle.nn.SyncBatchNorm(3)(paddle.randn([2, 3, 2, 2]))


def test_packaging_has_the_paddle_extra():
    import configparser

    from support import ROOT

    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    extras = cfg["options.extras_require"]
    assert "paddlepaddle" in extras["paddle"] and "paddlepaddle" in extras["test"]
