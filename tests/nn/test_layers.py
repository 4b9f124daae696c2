"""Layers and containers on one process: options, formats, dtypes, state, conversion.

References: float64 NumPy on the batch (``bn_ref``) and torch CPU.
"""

import numpy as np
import pytest
from support import bn_ref

import cupysyncbn as sbn
from cupysyncbn.comm.base import NoCommunicator

LOCAL = NoCommunicator()
SHAPES = {"NC": (6, 3), "NCL": (4, 3, 5), "NCHW": (3, 3, 4, 5), "NCDHW": (2, 3, 2, 3, 4),
          "NLC": (4, 5, 3), "NHWC": (3, 4, 5, 3), "NDHWC": (2, 2, 3, 4, 3)}


def _x(rng, shape, dtype=np.float64):
    return (rng.standard_normal(shape) * 2 + 0.5).astype(dtype)


def _bn(c=3, **kw):
    kw.setdefault("comm", LOCAL)
    return sbn.SyncBatchNorm(c, **kw)


# --------------------------------------------------------------- formats & dtypes
@pytest.mark.parametrize("fmt", list(SHAPES))
def test_all_formats_train_backward_eval(rng, fmt):
    layer = _bn(data_format=fmt, dtype="float64", momentum=0.7)
    w, b = rng.standard_normal(3), rng.standard_normal(3)
    layer.weight.data, layer.bias.data = w.copy(), b.copy()
    x, dy = _x(rng, SHAPES[fmt]), _x(rng, SHAPES[fmt])
    rm, rv = bn_ref.check_training_step(layer, x, dy, fmt, w, b, 0.7)
    layer.eval()
    xe = _x(rng, SHAPES[fmt])
    ye = layer(xe)
    np.testing.assert_allclose(ye, bn_ref.ref_eval(xe, fmt, rm, rv, w, b), atol=1e-12)
    # eval backward is the affine map with the running statistics
    dxe = layer.backward(dy)
    scale = w / np.sqrt(rv + 1e-5)
    ca = bn_ref.channel_axis(fmt, dy.ndim)
    shape = [1] * dy.ndim
    shape[ca] = 3
    np.testing.assert_allclose(dxe, dy * scale.reshape(shape), atol=1e-12)


@pytest.mark.parametrize("in_dt,layer_dt", [
    (np.float16, "float32"), (np.float16, "float64"), (np.float32, "float32"),
    (np.float32, "float64"), (np.float64, "float32"), (np.float64, "float64"),
])
def test_dtypes(rng, in_dt, layer_dt):
    layer = _bn(dtype=layer_dt)
    x = _x(rng, (4, 3, 5, 5), in_dt)
    dy = _x(rng, (4, 3, 5, 5), in_dt)
    y = layer(x)
    dx = layer.backward(dy)
    assert y.dtype == in_dt and dx.dtype == in_dt
    for a in (layer.weight.data, layer.bias.data, layer._mean, layer._variance,
              layer.weight.grad, layer.bias.grad):
        assert a.dtype == np.dtype(layer_dt)
    yr, mean, var, n = bn_ref.ref_forward(x, "NCHW")
    dxr = bn_ref.ref_backward(x, dy, "NCHW")[0]
    # Statistics in float64 when input or layer is float64, else float32; the
    # condition number of centering is max|x| / std (about 3 for this data).
    cdt = bn_ref.compute_dtype(in_dt, layer_dt)
    x64 = x.astype(np.float64)
    cond = (np.abs(x64).max(axis=(0, 2, 3)) / np.sqrt(var)).max()
    tol = bn_ref.rounding_tol(in_dt, cdt, cond)  # float64: ~1.4e-15, float32: ~8e-7
    scale = max(1.0, np.abs(yr).max())
    assert np.abs(y.astype(np.float64) - yr).max() <= tol * scale
    assert np.abs(dx.astype(np.float64) - dxr).max() <= tol * max(1.0, np.abs(dxr).max())
    # float16 inputs still get float32 (or better) statistics: the running
    # mean (0.1 * batch mean, stored in the layer dtype) is a sum of n terms
    # in the compute dtype, rounded once more to the layer dtype
    mean_tol = 0.1 * (bn_ref.eps(cdt) * np.log2(n) * np.abs(x64).max()
                      + bn_ref.eps(layer_dt) * np.abs(mean).max())
    assert np.abs(layer._mean - 0.1 * mean).max() <= mean_tol


def test_float64_layer_on_float32_input_computes_in_float64(rng):
    x = _x(rng, (5, 3, 7), np.float32)
    y32 = _bn(data_format="NCL")(x)
    y64 = _bn(data_format="NCL", dtype="float64")(x)
    yr = bn_ref.ref_forward(x, "NCL")[0]
    # float64 math: only the final rounding to float32 remains.
    assert np.abs(y64 - yr).max() <= np.abs(yr).max() * 2 ** -24 * 1.01
    assert np.abs(y32 - yr).max() <= 1e-5


@pytest.mark.parametrize("fmt", ["NCHW", "NHWC", "NC", "NCDHW"])
def test_non_contiguous_inputs(rng, fmt):
    shape = SHAPES[fmt]
    big = _x(rng, tuple(2 * s for s in shape), np.float32)
    x = big[tuple(slice(None, None, 2) for _ in shape)]  # strided view
    assert not x.flags.c_contiguous
    dyb = _x(rng, tuple(reversed(shape)), np.float32)
    dy = dyb.transpose(tuple(reversed(range(len(shape)))))  # transposed view
    assert dy.shape == x.shape and not dy.flags.c_contiguous
    a, b = _bn(data_format=fmt), _bn(data_format=fmt)
    ya, dxa = a(x), a.backward(dy)
    yb, dxb = b(np.ascontiguousarray(x)), b.backward(np.ascontiguousarray(dy))
    assert np.array_equal(ya, yb) and np.array_equal(dxa, dxb)
    assert np.array_equal(a._variance, b._variance)
    assert np.array_equal(a.weight.grad, b.weight.grad)
    # Fortran order too
    c = _bn(data_format=fmt)
    assert np.array_equal(c(np.asfortranarray(x)), yb)


def test_input_not_mutated(rng):
    x = _x(rng, (3, 3, 4, 4), np.float32)
    dy = _x(rng, (3, 3, 4, 4), np.float32)
    x0, dy0 = x.copy(), dy.copy()
    layer = _bn()
    y = layer(x)
    layer.backward(dy)
    assert np.array_equal(x, x0) and np.array_equal(dy, dy0)
    assert not np.shares_memory(y, x)


def test_empty_local_batch_single_process(rng):
    layer = _bn(data_format="NHWC")
    x = _x(rng, (2, 2, 2, 3), np.float32)
    layer(x)
    layer.backward(x)
    before = layer.state_dict()
    before = {k: v.copy() for k, v in before.items()}
    layer.clear_gradients()
    e = np.zeros((0, 2, 2, 3), np.float32)
    y = layer(e)
    dx = layer.backward(e)
    assert y.shape == e.shape and dx.shape == e.shape and y.dtype == e.dtype
    for k, v in layer.state_dict().items():
        assert np.array_equal(v, before[k]) and np.isfinite(v).all()
    assert np.array_equal(layer.weight.grad, np.zeros(3, np.float32))
    assert np.array_equal(layer.bias.grad, np.zeros(3, np.float32))
    layer.eval()
    assert layer(e).shape == e.shape


# --------------------------------------------------------------- options
def test_momentum_none_cumulative_average_matches_torch(rng):
    torch = pytest.importorskip("torch")
    layer = _bn(4, momentum=None, dtype="float64", unbiased_running_var=True)
    ref = torch.nn.BatchNorm2d(4, momentum=None).double()
    for _ in range(4):
        x = _x(rng, (3, 4, 3, 3))
        y = layer(x)
        yt = ref(torch.from_numpy(x))
        np.testing.assert_allclose(y, yt.detach().numpy(), atol=1e-12)
    np.testing.assert_allclose(layer._mean, ref.running_mean.numpy(), atol=1e-14)
    np.testing.assert_allclose(layer._variance, ref.running_var.numpy(), atol=1e-14)
    sd = layer.state_dict()
    assert int(sd["_num_batches_tracked"]) == 4
    # The counter round-trips, so a reloaded layer continues the same average.
    other = _bn(4, momentum=None, dtype="float64", unbiased_running_var=True)
    other.set_state_dict({"weight": sd["weight"], "bias": sd["bias"],
                          "running_mean": sd["_mean"], "running_var": sd["_variance"],
                          "num_batches_tracked": np.int64(4)})
    x = _x(rng, (3, 4, 3, 3))
    other(x)
    ref(torch.from_numpy(x))
    np.testing.assert_allclose(other._mean, ref.running_mean.numpy(), atol=1e-14)


def test_momentum_none_biased_is_plain_average(rng):
    layer = _bn(momentum=None, dtype="float64", data_format="NC")
    xs = [_x(rng, (5, 3)) for _ in range(3)]
    for x in xs:
        layer(x)
    np.testing.assert_allclose(layer._mean, np.mean([x.mean(0) for x in xs], axis=0),
                               atol=1e-14)
    np.testing.assert_allclose(layer._variance, np.mean([x.var(0) for x in xs], axis=0),
                               atol=1e-14)


def test_unbiased_running_var_matches_torch_momentum(rng):
    torch = pytest.importorskip("torch")
    # PyTorch's momentum=t equals momentum=1-t here with unbiased_running_var.
    layer = _bn(4, momentum=0.75, dtype="float64", unbiased_running_var=True)
    ref = torch.nn.BatchNorm2d(4, momentum=0.25).double()
    x = dy = None
    for _ in range(3):
        x = _x(rng, (3, 4, 2, 3))
        dy = _x(rng, (3, 4, 2, 3))
        layer.clear_gradients()
        y = layer(x)
        dx = layer.backward(dy)
        xt = torch.from_numpy(x).requires_grad_(True)
        ref.zero_grad()
        yt = ref(xt)
        yt.backward(torch.from_numpy(dy))
        np.testing.assert_allclose(y, yt.detach().numpy(), atol=1e-12)
        np.testing.assert_allclose(dx, xt.grad.numpy(), atol=1e-12)
        np.testing.assert_allclose(layer.weight.grad, ref.weight.grad.numpy(), atol=1e-12)
        np.testing.assert_allclose(layer.bias.grad, ref.bias.grad.numpy(), atol=1e-12)
    np.testing.assert_allclose(layer._variance, ref.running_var.numpy(), atol=1e-14)
    np.testing.assert_allclose(layer._mean, ref.running_mean.numpy(), atol=1e-14)
    layer.eval()
    ref.eval()
    np.testing.assert_allclose(layer(x), ref(torch.from_numpy(x)).detach().numpy(), atol=1e-12)


def test_track_running_stats_false(rng):
    torch = pytest.importorskip("torch")
    layer = _bn(4, track_running_stats=False, dtype="float64")
    ref = torch.nn.BatchNorm2d(4, track_running_stats=False).double()
    x = _x(rng, (3, 4, 2, 2))
    before = {k: v.copy() for k, v in layer.state_dict().items()}
    np.testing.assert_allclose(layer(x), ref(torch.from_numpy(x)).detach().numpy(), atol=1e-12)
    layer.eval()
    ref.eval()
    x = _x(rng, (3, 4, 2, 2))
    ye = layer(x)  # batch statistics in eval mode too
    np.testing.assert_allclose(ye, ref(torch.from_numpy(x)).detach().numpy(), atol=1e-12)
    np.testing.assert_allclose(ye, bn_ref.ref_forward(x, "NCHW")[0], atol=1e-12)
    for k, v in layer.state_dict().items():
        assert np.array_equal(v, before[k])
    # eval backward uses the batch statistics (no running ones)
    dy = _x(rng, x.shape)
    np.testing.assert_allclose(layer.backward(dy), bn_ref.ref_backward(x, dy, "NCHW")[0],
                               atol=1e-12)


@pytest.mark.parametrize("which", ["weight", "bias"])
def test_param_attr_false_acts_alone(rng, which):
    kw = {"weight_attr": False} if which == "weight" else {"bias_attr": False}
    layer = _bn(dtype="float64", **kw)
    fixed = getattr(layer, which)
    other = layer.bias if which == "weight" else layer.weight
    assert not fixed.trainable and other.trainable
    other.data = rng.standard_normal(3)
    x, dy = _x(rng, (3, 3, 2, 2)), _x(rng, (3, 3, 2, 2))
    y = layer(x)
    layer.backward(dy)
    w = np.ones(3) if which == "weight" else layer.weight.data
    b = np.zeros(3) if which == "bias" else layer.bias.data
    np.testing.assert_allclose(y, bn_ref.ref_forward(x, "NCHW", w, b)[0], atol=1e-12)
    _, dwr, dbr = bn_ref.ref_backward(x, dy, "NCHW", w)
    assert fixed.grad is None
    np.testing.assert_allclose(other.grad, dbr if which == "weight" else dwr, atol=1e-12)
    assert np.array_equal(fixed.data, np.ones(3) if which == "weight" else np.zeros(3))
    assert which in layer.state_dict()
    assert len([p for p in layer.parameters() if p.trainable]) == 1


def test_both_attrs_false(rng):
    layer = _bn(weight_attr=False, bias_attr=False, dtype="float64")
    x = _x(rng, (3, 3, 2, 2))
    layer(x)
    layer.backward(x)
    assert layer.weight.grad is None and layer.bias.grad is None
    assert list(layer.state_dict()) == ["weight", "bias", "_mean", "_variance"]


def test_param_attr_initializer(rng):
    w0 = rng.standard_normal(3).astype(np.float32)
    layer = _bn(weight_attr=sbn.ParamAttr(name="w", initializer=w0),
                bias_attr=sbn.ParamAttr(initializer=0.25))
    assert np.array_equal(layer.weight.data, w0) and layer.weight.name == "w"
    assert np.array_equal(layer.bias.data, np.full(3, 0.25, np.float32))
    w0[:] = 7  # the parameter owns a copy
    assert not np.array_equal(layer.weight.data, w0)
    layer = _bn(weight_attr=sbn.ParamAttr(initializer=lambda shape, dtype: np.arange(
        shape[0], dtype=dtype) + 1.0), dtype="float64")
    assert np.array_equal(layer.weight.data, [1.0, 2.0, 3.0])
    assert layer.weight.dtype == np.float64
    layer = _bn(bias_attr=sbn.ParamAttr(trainable=False))
    x = _x(rng, (2, 3, 2, 2), np.float32)
    layer(x)
    layer.backward(x)
    assert layer.bias.grad is None and layer.weight.grad is not None
    with pytest.raises(ValueError, match="shape"):
        _bn(weight_attr=sbn.ParamAttr(initializer=np.ones(4)))
    assert _bn(weight_attr="named").weight.name == "named"


def test_positional_order_is_paddles():
    # SyncBatchNorm(num_features, epsilon, momentum, weight_attr, bias_attr, data_format, name)
    layer = sbn.SyncBatchNorm(4, 1e-3, 0.8, None, None, "NHWC", "bn", comm=LOCAL)
    assert (layer.epsilon, layer.momentum, layer.data_format) == (1e-3, 0.8, "NHWC")
    # BatchNorm2D(num_features, momentum, epsilon, ...) as in Paddle
    local = sbn.BatchNorm2D(4, 0.8, 1e-3)
    assert (local.epsilon, local.momentum, local.data_format) == (1e-3, 0.8, "NCHW")
    assert sbn.BatchNorm1D(4).data_format == "NCL"
    assert sbn.BatchNorm3D(4).data_format == "NCDHW"


def test_initial_state():
    layer = _bn(5)
    sd = layer.state_dict()
    assert list(sd) == ["weight", "bias", "_mean", "_variance"]
    assert np.array_equal(sd["weight"], np.ones(5)) and np.array_equal(sd["bias"], np.zeros(5))
    assert np.array_equal(sd["_mean"], np.zeros(5)) and np.array_equal(sd["_variance"], np.ones(5))
    assert all(v.dtype == np.float32 for v in sd.values())
    assert layer.training and layer.weight.grad is None


# --------------------------------------------------------------- gradients
def test_gradient_accumulation_and_clear(rng):
    layer = _bn(dtype="float64")
    x1, x2 = _x(rng, (3, 3, 2, 2)), _x(rng, (4, 3, 2, 2))
    d1, d2 = _x(rng, x1.shape), _x(rng, x2.shape)
    layer(x1)
    layer.backward(d1)
    layer(x2)
    layer.backward(d2)
    _, w1, b1 = bn_ref.ref_backward(x1, d1, "NCHW")
    _, w2, b2 = bn_ref.ref_backward(x2, d2, "NCHW")
    np.testing.assert_allclose(layer.weight.grad, w1 + w2, atol=1e-12)
    np.testing.assert_allclose(layer.bias.grad, b1 + b2, atol=1e-12)
    # each forward allows one backward (as Paddle and PyTorch)
    with pytest.raises(RuntimeError, match="no forward is pending"):
        layer.backward(d2)
    np.testing.assert_allclose(layer.bias.grad, b1 + b2, atol=1e-12)
    layer.clear_gradients()
    assert layer.weight.grad is None and layer.bias.grad is None


# --------------------------------------------------------------- containers
class Scale(sbn.Layer):
    """y = a * x, recording call order."""

    def __init__(self, a, log):
        super().__init__()
        self.a = a
        self.log = log

    def forward(self, x):
        self.log.append(("f", self.a))
        return x * self.a

    def backward(self, dy):
        self.log.append(("b", self.a))
        return dy * self.a


def test_sequential_order_and_values(rng):
    log = []
    bn1, bn2 = _bn(dtype="float64"), _bn(dtype="float64")
    model = sbn.Sequential(Scale(2.0, log), bn1, Scale(3.0, log), bn2)
    x, dy = _x(rng, (3, 3, 2, 2)), _x(rng, (3, 3, 2, 2))
    y = model(x)
    dx = model.backward(dy)
    assert log == [("f", 2.0), ("f", 3.0), ("b", 3.0), ("b", 2.0)]
    # Manual composition with the float64 reference.
    h1 = bn_ref.ref_forward(2 * x, "NCHW")[0]
    yr = bn_ref.ref_forward(3 * h1, "NCHW")[0]
    np.testing.assert_allclose(y, yr, atol=1e-12)
    g = bn_ref.ref_backward(3 * h1, dy, "NCHW")[0] * 3
    dxr = bn_ref.ref_backward(2 * x, g, "NCHW")[0] * 2
    np.testing.assert_allclose(dx, dxr, atol=1e-10)
    assert len(model) == 4 and model[1] is bn1 and model["3"] is bn2
    assert isinstance(model[1:3], sbn.Sequential) and len(model[1:3]) == 2
    assert list(model) == [model[i] for i in range(4)]
    named = sbn.Sequential(("a", _bn()), ("b", _bn()))
    assert list(named.state_dict())[:2] == ["a.weight", "a.bias"]
    with pytest.raises(TypeError):
        sbn.Sequential(_bn(), "not a layer")


def test_layerlist():
    layers = sbn.LayerList([_bn(2), _bn(3)])
    layers.append(_bn(4))
    layers.extend([_bn(5)])
    assert len(layers) == 4 and [la.num_features for la in layers] == [2, 3, 4, 5]
    assert layers[-1].num_features == 5
    assert [k for k in layers.state_dict() if k.endswith("weight")] == [
        "0.weight", "1.weight", "2.weight", "3.weight"]
    layers[1] = _bn(7)
    assert layers[1].num_features == 7 and layers.state_dict()["1.weight"].shape == (7,)
    assert len(layers.parameters()) == 8
    with pytest.raises(TypeError):
        layers.append(3)


class Block(sbn.Layer):
    def __init__(self):
        super().__init__()
        self.norm = _bn(3, momentum=None)
        self.stack = sbn.LayerList([_bn(2), sbn.Sequential(_bn(4))])


def test_nested_state_dict_names_and_torch_names(rng, tmp_path):
    model = sbn.Sequential(("block", Block()), ("head", _bn(5)))
    keys = list(model.state_dict())
    assert keys == [
        "block.norm.weight", "block.norm.bias", "block.norm._mean", "block.norm._variance",
        "block.norm._num_batches_tracked",
        "block.stack.0.weight", "block.stack.0.bias", "block.stack.0._mean",
        "block.stack.0._variance",
        "block.stack.1.0.weight", "block.stack.1.0.bias", "block.stack.1.0._mean",
        "block.stack.1.0._variance",
        "head.weight", "head.bias", "head._mean", "head._variance",
    ]
    # PyTorch names load into the Paddle entries.
    torch_sd = {}
    for k, v in model.state_dict().items():
        k = k.replace("._mean", ".running_mean").replace("._variance", ".running_var")
        k = k.replace("._num_batches_tracked", ".num_batches_tracked")
        torch_sd[k] = rng.random(v.shape).astype(v.dtype) if v.dtype.kind == "f" else v + 3
    model.set_state_dict(torch_sd)
    assert np.array_equal(model.state_dict()["block.stack.1.0._variance"],
                          torch_sd["block.stack.1.0.running_var"])
    assert int(model.state_dict()["block.norm._num_batches_tracked"]) == 3
    # save / load round trip (npz, no pickle)
    path = tmp_path / "ckpt.npz"
    sbn.save(model.state_dict(), path)
    loaded = sbn.load(path)
    assert list(loaded) == keys
    fresh = sbn.Sequential(("block", Block()), ("head", _bn(5)))
    fresh.set_state_dict(loaded)
    for k, v in model.state_dict().items():
        assert np.array_equal(fresh.state_dict()[k], v) and fresh.state_dict()[k].dtype == v.dtype
    with np.load(path, allow_pickle=False) as z:
        assert sorted(z.files) == sorted(keys)
    # the loaded arrays are copies: changing them does not touch the layer
    loaded["head.weight"][:] = 42
    assert not np.any(fresh.state_dict()["head.weight"] == 42)


def test_torch_batchnorm_state_dict_loads_and_evaluates_the_same(rng):
    torch = pytest.importorskip("torch")
    ref = torch.nn.BatchNorm2d(3).double()
    for _ in range(2):
        ref(torch.from_numpy(_x(rng, (4, 3, 2, 2))))
    with torch.no_grad():
        ref.weight.copy_(torch.tensor([1.5, 0.5, 2.0]))
        ref.bias.copy_(torch.tensor([0.1, -0.2, 0.3]))
    ref.eval()
    layer = _bn(dtype="float64")
    layer.set_state_dict({k: v.numpy() for k, v in ref.state_dict().items()})
    layer.eval()
    x = _x(rng, (2, 3, 2, 2))
    np.testing.assert_allclose(layer(x), ref(torch.from_numpy(x)).detach().numpy(), atol=1e-12)


def test_train_eval_and_clear_gradients_recurse(rng):
    model = sbn.Sequential(("block", Block()), ("head", _bn(5)))
    assert all(la.training for la in model.sublayers(include_self=True))
    assert model.eval() is model
    assert not any(la.training for la in model.sublayers(include_self=True))
    model.train()
    assert all(la.training for la in model.sublayers(include_self=True))
    for p in model.parameters():
        p.grad = np.ones_like(p.data)
    model.clear_gradients()
    assert all(p.grad is None for p in model.parameters())
    assert len(model.parameters()) == 8


def test_to_dtype(rng):
    model = sbn.Sequential(_bn(3), _bn(3, momentum=None))
    x = _x(rng, (4, 3, 2, 2), np.float32)
    model(x)
    model.backward(x)
    assert model.to(dtype="float64") is model
    for k, v in model.state_dict().items():
        expect = np.int64 if k.endswith("_num_batches_tracked") else np.float64
        assert v.dtype == expect, k
    assert all(p.grad is None for p in model.parameters())
    # computes in float64 now: a float64 input gives the float64 reference
    x64 = _x(rng, (4, 3, 2, 2))
    y = model[0](x64)
    np.testing.assert_allclose(y, bn_ref.ref_forward(x64, "NCHW")[0], atol=1e-12)
    model.to(device="cpu", dtype=np.float32)
    assert model[0].weight.dtype == np.float32 and model[0]._mean.dtype == np.float32
    with pytest.raises(ValueError):
        model.to(dtype="float16")
    with pytest.raises(ValueError):
        model.to(device="tpu")


# --------------------------------------------------------------- conversion
def test_convert_sync_batchnorm(rng):
    bn_a = sbn.BatchNorm2D(3, momentum=0.7, epsilon=1e-3, data_format="NHWC")
    bn_b = sbn.BatchNorm1D(4, weight_attr=False, data_format="NLC")
    bn_c = sbn.BatchNorm3D(2, bias_attr=False, momentum=None)
    model = sbn.Sequential(bn_a, sbn.Sequential(bn_b), sbn.LayerList([bn_c]))
    bn_a(_x(rng, (2, 2, 2, 3), np.float32))
    bn_b(_x(rng, (2, 5, 4), np.float32))
    bn_c(_x(rng, (2, 2, 2, 2, 2), np.float32))
    bn_a.weight.data = rng.standard_normal(3).astype(np.float32)
    bn_b.bias.data = rng.standard_normal(4).astype(np.float32)
    bn_c.weight.data = rng.standard_normal(2).astype(np.float32)  # trained weight kept
    bn_b.eval()
    before = {k: v.copy() for k, v in model.state_dict().items()}
    comm = NoCommunicator()
    out = sbn.SyncBatchNorm.convert_sync_batchnorm(model, comm=comm)
    assert out is model
    a, b, c = model[0], model[1][0], model[2][0]
    assert all(type(la) is sbn.SyncBatchNorm for la in (a, b, c))
    assert (a.data_format, a.epsilon, a.momentum) == ("NHWC", 1e-3, 0.7)
    assert (b.data_format, c.data_format, c.momentum) == ("NLC", "NCDHW", None)
    assert a.training and not b.training and c.training
    assert not b.weight.trainable and b.bias.trainable
    assert c.weight.trainable and not c.bias.trainable
    assert a.comm is comm
    after = model.state_dict()
    assert list(after) == list(before)
    for k, v in before.items():
        assert np.array_equal(after[k], v), k
    # copies, not shared arrays
    bn_a.weight.data[:] = 100
    bn_a._mean[:] = 100
    assert not np.any(a.weight.data == 100) and not np.any(a._mean == 100)
    assert not np.shares_memory(a._variance, bn_a._variance)
    # a converted layer computes what the local one did (one process)
    x = _x(rng, (2, 2, 2, 3), np.float32)
    ref = sbn.BatchNorm2D(3, momentum=0.7, epsilon=1e-3, data_format="NHWC")
    ref.set_state_dict(a.state_dict())
    assert np.array_equal(a(x), ref(x))


def test_convert_single_layer_returns_new_layer(rng):
    local = sbn.BatchNorm1D(3, data_format="NC")
    local(_x(rng, (4, 3), np.float32))
    local.eval()
    new = sbn.SyncBatchNorm.convert_sync_batchnorm(local, comm=LOCAL)
    assert isinstance(new, sbn.SyncBatchNorm) and new is not local
    assert not new.training and new.data_format == "NC"
    assert np.array_equal(new._mean, local._mean)
    # SyncBatchNorm layers already in a model are left as they are
    keep = _bn()
    assert sbn.SyncBatchNorm.convert_sync_batchnorm(sbn.Sequential(keep), comm=LOCAL)[0] is keep


def test_bfloat16_input_where_available(rng):
    ml_dtypes = pytest.importorskip("ml_dtypes", reason="NumPy has bfloat16 only via ml_dtypes")
    x = _x(rng, (4, 3, 2, 2)).astype(ml_dtypes.bfloat16)
    layer = _bn()
    y = layer(x)
    assert y.dtype == x.dtype and layer._mean.dtype == np.float32
    yr = bn_ref.ref_forward(x.astype(np.float64), "NCHW")[0]
    assert np.abs(y.astype(np.float64) - yr).max() <= 2e-2 * max(1.0, np.abs(yr).max())


# --------------------------------------------------------------- in-place state
def _array_libs():
    libs = [pytest.param(np, id="numpy")]
    try:
        import cupy

        cupy.cuda.runtime.getDeviceCount()
        libs.append(pytest.param(cupy, id="cupy", marks=pytest.mark.gpu))
    except Exception:  # noqa: BLE001 - no CuPy or no GPU
        libs.append(pytest.param(None, id="cupy", marks=[pytest.mark.gpu,
                                                         pytest.mark.skip(reason="no GPU")]))
    return libs


@pytest.mark.parametrize("xp", _array_libs())
def test_state_keeps_identity_and_state_dict_is_live(rng, xp):
    layer = _bn(dtype="float64", momentum=None)
    if xp is not np:
        layer.to("cuda")
    arrays = [layer._mean, layer._variance, layer.weight.data, layer.bias.data,
              layer._num_batches_tracked]
    sd = layer.state_dict()
    snapshot = {k: np.array(bn_ref.to_numpy(v)) for k, v in sd.items()}
    xs = [_x(rng, (4, 3, 2, 2)) for _ in range(3)]
    for x in xs:
        layer(xp.asarray(x))
        layer.backward(xp.asarray(x))
    after = [layer._mean, layer._variance, layer.weight.data, layer.bias.data,
             layer._num_batches_tracked]
    assert all(a is b for a, b in zip(arrays, after))
    # the state dict taken before the steps shows the update (Paddle: live arrays)
    assert sd["_mean"] is layer._mean and sd["_variance"] is layer._variance
    means = [bn_ref.ref_forward(x, "NCHW")[1] for x in xs]
    np.testing.assert_allclose(bn_ref.to_numpy(sd["_mean"]), np.mean(means, axis=0), atol=1e-14)
    assert int(sd["_num_batches_tracked"]) == 3
    assert not np.array_equal(bn_ref.to_numpy(sd["_mean"]), snapshot["_mean"])
    # set_state_dict copies into the existing arrays
    layer.set_state_dict({k: xp.asarray(v) for k, v in snapshot.items()})
    assert all(a is b for a, b in zip(arrays, [layer._mean, layer._variance, layer.weight.data,
                                               layer.bias.data, layer._num_batches_tracked]))
    for k, v in snapshot.items():
        assert np.array_equal(bn_ref.to_numpy(sd[k]), v), k


def test_rejected_state_dict_changes_nothing_in_place(rng):
    layer = _bn()
    layer(_x(rng, (4, 3, 2, 2), np.float32))
    before = {k: v.copy() for k, v in layer.state_dict().items()}
    bad = {k: np.full_like(v, 7) for k, v in before.items()}
    bad["_variance"] = np.ones(4, np.float32)  # last entry invalid
    with pytest.raises(ValueError, match="_variance"):
        layer.set_state_dict(bad)
    for k, v in layer.state_dict().items():
        assert np.array_equal(v, before[k]), k


# --------------------------------------------------------------- a layer used k times
@pytest.mark.parametrize("k", [2, 3])
def test_layer_used_k_times_equals_separate_layers(rng, k):
    shared = _bn(dtype="float64")
    separate = [_bn(dtype="float64") for _ in range(k)]
    w, b = rng.standard_normal(3), rng.standard_normal(3)
    for la in [shared, *separate]:
        la.weight.data[...] = w
        la.bias.data[...] = b
    xs = [_x(rng, (2 + i, 3, 2, 3)) for i in range(k)]
    dys = [_x(rng, x.shape) for x in xs]
    ys = [shared(x) for x in xs]
    assert shared.num_pending == k
    dxs = [None] * k
    for i in reversed(range(k)):  # LIFO, as autograd runs them
        dxs[i] = shared.backward(dys[i])
    assert shared.num_pending == 0
    dw, db = np.zeros(3), np.zeros(3)
    for i, la in enumerate(separate):
        assert np.array_equal(la(xs[i]), ys[i])
        np.testing.assert_allclose(la.backward(dys[i]), dxs[i], rtol=0, atol=1e-13)
        dxr, dwr, dbr = bn_ref.ref_backward(xs[i], dys[i], "NCHW", w)
        np.testing.assert_allclose(dxs[i], dxr, rtol=0, atol=1e-12)
        dw, db = dw + la.weight.grad, db + la.bias.grad
    np.testing.assert_allclose(shared.weight.grad, dw, rtol=1e-13, atol=1e-13)
    np.testing.assert_allclose(shared.bias.grad, db, rtol=1e-13, atol=1e-13)
    with pytest.raises(RuntimeError, match="no forward is pending"):
        shared.backward(dys[0])


def test_sequential_with_a_shared_layer(rng):
    bn = _bn(dtype="float64")
    model = sbn.Sequential(bn, Scale(2.0, []), bn)
    x, dy = _x(rng, (3, 3, 2, 2)), _x(rng, (3, 3, 2, 2))
    y = model(x)
    dx = model.backward(dy)
    h = bn_ref.ref_forward(x, "NCHW")[0]
    np.testing.assert_allclose(y, bn_ref.ref_forward(2 * h, "NCHW")[0], atol=1e-12)
    g = bn_ref.ref_backward(2 * h, dy, "NCHW")[0] * 2
    np.testing.assert_allclose(dx, bn_ref.ref_backward(x, g, "NCHW")[0], atol=1e-10)


def test_backward_without_forward_raises_runtime_error():
    layer = _bn()
    with pytest.raises(RuntimeError, match="before forward"):
        layer.backward(np.ones((2, 3, 2, 2), np.float32))
    assert issubclass(sbn.NoPendingForwardError, RuntimeError)


def test_pending_contexts_are_bounded(rng):
    layer = _bn(dtype="float64")
    assert layer.max_pending_contexts == 8
    xs = [_x(rng, (2, 3, 2, 2)) for _ in range(20)]
    for x in xs:  # a forward-only loop: memory stays bounded
        layer(x)
    assert layer.num_pending == 8
    for x in reversed(xs[-8:]):  # the 8 most recent are still exact
        np.testing.assert_allclose(layer.backward(x), bn_ref.ref_backward(x, x, "NCHW")[0],
                                   atol=1e-12)
    with pytest.raises(RuntimeError, match="was dropped.*max_pending_contexts=8"):
        layer.backward(xs[11])
    layer.max_pending_contexts = 2
    for x in xs[:3]:
        layer(x)
    assert layer.num_pending == 2
    layer.clear_pending()
    assert layer.num_pending == 0


def test_no_grad_keeps_no_context_but_updates_running_stats(rng):
    layer = _bn(dtype="float64")
    x = _x(rng, (4, 3, 2, 2))
    with sbn.no_grad():
        y = layer(x)
        with sbn.no_grad():
            pass
        layer(x)  # still off after a nested block
    assert layer.num_pending == 0
    np.testing.assert_allclose(y, bn_ref.ref_forward(x, "NCHW")[0], atol=1e-12)
    np.testing.assert_allclose(layer._mean, 0.19 * bn_ref.ref_forward(x, "NCHW")[1], atol=1e-14)
    with pytest.raises(RuntimeError, match="no_grad"):
        layer.backward(x)

    @sbn.no_grad()
    def evaluate(v):
        return layer(v)

    evaluate(x)
    assert layer.num_pending == 0
    layer(x)  # grad mode is back
    assert layer.num_pending == 1


# --------------------------------------------------------------- conveniences
def test_forward_hooks(rng):
    layer = _bn(dtype="float64")
    calls = []

    def pre(la, inputs):
        calls.append(("pre", la, len(inputs)))
        return inputs[0] * 2  # replaces the input

    def post(la, inputs, out):
        calls.append(("post", la))
        return out + 1  # replaces the output

    h1 = layer.register_forward_pre_hook(pre)
    h2 = layer.register_forward_post_hook(post)
    x = _x(rng, (3, 3, 2, 2))
    y = layer(x)
    np.testing.assert_allclose(y, bn_ref.ref_forward(2 * x, "NCHW")[0] + 1, atol=1e-12)
    assert calls == [("pre", layer, 1), ("post", layer)]
    h1.remove()
    h1.remove()  # idempotent
    np.testing.assert_allclose(layer(x), bn_ref.ref_forward(x, "NCHW")[0] + 1, atol=1e-12)
    h2.remove()
    np.testing.assert_allclose(layer(x), bn_ref.ref_forward(x, "NCHW")[0], atol=1e-12)
    # hooks returning None observe only; sub-layers of a Sequential run theirs
    seen = []
    inner = _bn()
    inner.register_forward_post_hook(lambda la, i, o: seen.append(o.shape))
    sbn.Sequential(inner)(_x(rng, (2, 3, 2, 2), np.float32))
    assert seen == [(2, 3, 2, 2)]


def test_apply_and_buffers():
    model = sbn.Sequential(("block", Block()), ("head", _bn(5)))
    order = []
    assert model.apply(lambda la: order.append(type(la).__name__)) is model
    assert order[-1] == "Sequential" and order.count("SyncBatchNorm") == 4
    model.apply(lambda la: la.weight.data.fill(3) if isinstance(la, sbn.SyncBatchNorm) else None)
    assert all(np.all(v == 3) for k, v in model.state_dict().items() if k.endswith("weight"))
    named = dict(model.named_buffers())
    assert list(named)[:3] == ["block.norm._mean", "block.norm._variance",
                               "block.norm._num_batches_tracked"]
    assert "head._num_batches_tracked" in named  # non-persistable buffers too
    assert named["head._mean"] is model["head"]._mean
    assert len(model.buffers()) == 12
    assert [k for k, _ in model["head"].named_buffers(prefix="h")] == [
        "h._mean", "h._variance", "h._num_batches_tracked"]


def test_backward_without_pending_forward_raises_on_every_rank(rng):
    # Once a layer has synchronized, a backward with nothing pending still
    # joins the layer's collective, so no peer is left waiting in it.
    from cupysyncbn.errors import CollectiveMismatchError

    group = bn_ref.ThreadGroup(2, timeout=10)
    x = _x(rng, (2, 3, 2, 2))

    def fn(r, comm):
        layer = sbn.SyncBatchNorm(3, comm=comm, dtype="float64")
        layer(x)
        layer.backward(x)
        errs = []
        for rank_doing_backward in ((0, 1), (0,)):  # both ranks, then rank 0 only
            try:
                if r in rank_doing_backward:
                    layer.backward(x)
                else:
                    layer(x)
            except (RuntimeError, ValueError) as e:
                errs.append(e)
        return errs

    (a1, a2), (b1, b2) = group.run(fn)
    assert isinstance(a1, sbn.NoPendingForwardError) and isinstance(b1, sbn.NoPendingForwardError)
    assert isinstance(a2, CollectiveMismatchError) and isinstance(b2, CollectiveMismatchError)
    assert "backward on 1" in str(a2)
