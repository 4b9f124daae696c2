"""``act="relu"`` on the layers: values, the setting's life (copies, pickles, state), checks."""

import copy
import pickle

import numpy as np
import pytest
from support import bn_ref

import cupysyncbn as sbn

LAYERS = [
    (sbn.SyncBatchNorm, "NCHW", (4, 3, 5, 6)),
    (sbn.SyncBatchNorm, "NHWC", (4, 5, 6, 3)),
    (sbn.BatchNorm1D, "NCL", (4, 3, 7)),
    (sbn.BatchNorm1D, "NC", (9, 3)),
    (sbn.BatchNorm2D, "NHWC", (3, 4, 5, 3)),
    (sbn.BatchNorm3D, "NCDHW", (2, 3, 2, 3, 4)),
]


def _layer(cls, fmt, w, b, dtype, **kw):
    layer = cls(len(w), data_format=fmt, dtype=dtype, **kw)
    layer.weight.data[...] = w
    layer.bias.data[...] = b
    return layer


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("cls,fmt,shape", LAYERS, ids=lambda v: getattr(v, "__name__", str(v)))
def test_layer_relu_training_and_eval_equal_truth(cls, fmt, shape, dtype):
    x, dy, w, b = bn_ref.relu_batch(shape, fmt, dtype, 1)
    layer = _layer(cls, fmt, w, b, dtype, act="relu")
    tol = 2e-4 if dtype == "float32" else 1e-9
    y = layer(x)
    dx = layer.backward(dy)
    want = bn_ref.ref_relu(x, dy, fmt, w, b)
    for got, ref in zip((y, dx, layer.weight.grad, layer.bias.grad), want):
        np.testing.assert_allclose(got, ref, rtol=tol, atol=tol)
    # eval: running statistics, the ReLU and its mask too
    layer.eval()
    stats = (layer._mean.astype("f8"), layer._variance.astype("f8"))
    x, dy, _, _ = bn_ref.relu_batch(shape, fmt, dtype, 2, eval_stats=stats)
    layer.clear_gradients()
    y = layer(x)
    dx = layer.backward(dy)
    want = bn_ref.ref_relu(x, dy, fmt, w, b, stats)
    for got, ref in zip((y, dx, layer.weight.grad, layer.bias.grad), want):
        np.testing.assert_allclose(got, ref, rtol=tol, atol=tol)


def test_relu_survives_copies_pickles_state_and_shows_in_repr():
    layer = sbn.SyncBatchNorm(3, act="relu")
    assert layer.act == "relu" and "act='relu'" in repr(layer)
    assert "act" not in repr(sbn.SyncBatchNorm(3)) and sbn.SyncBatchNorm(3).act is None
    x = np.random.default_rng(0).standard_normal((4, 3, 2, 2)).astype("float32")
    want = layer(x)
    for other in (copy.deepcopy(layer), pickle.loads(pickle.dumps(layer))):
        assert other.act == "relu"
        other.clear_pending()
        np.testing.assert_array_equal(other(x), layer(x))
    fresh = sbn.SyncBatchNorm(3, act="relu")
    fresh.set_state_dict(layer.state_dict())
    assert fresh.act == "relu" and (want >= 0).all() and (want == 0).any()


def test_convert_sync_batchnorm_keeps_act():
    model = sbn.Sequential(sbn.BatchNorm2D(3, act="relu"), sbn.BatchNorm2D(3))
    sbn.SyncBatchNorm.convert_sync_batchnorm(model)
    first, second = (model[i] for i in range(2))
    assert isinstance(first, sbn.SyncBatchNorm) and first.act == "relu"
    assert isinstance(second, sbn.SyncBatchNorm) and second.act is None


@pytest.mark.parametrize("cls", [sbn.SyncBatchNorm, sbn.BatchNorm1D, sbn.BatchNorm2D,
                                 sbn.BatchNorm3D])
@pytest.mark.parametrize("act", ["Relu", "relu6", "", 0, True, ["relu"]])
def test_bad_act_is_refused_at_construction(cls, act):
    with pytest.raises(ValueError, match=r"act must be None or 'relu'"):
        cls(3, act=act)


def test_relu_with_reproducible_is_refused_by_the_layer_and_the_functional_api(monkeypatch):
    with pytest.raises(ValueError, match="act='relu' cannot be combined with reproducible"):
        sbn.SyncBatchNorm(3, act="relu", reproducible=True)
    monkeypatch.setenv("CUPYSYNCBN_REPRODUCIBLE", "1")  # the default turned on
    with pytest.raises(ValueError, match="act='relu' cannot be combined with reproducible"):
        sbn.BatchNorm2D(3, act="relu")
    monkeypatch.delenv("CUPYSYNCBN_REPRODUCIBLE")
    x = np.ones((2, 3, 2, 2), "float32")
    with pytest.raises(ValueError, match="act='relu' cannot be combined with reproducible"):
        sbn.functional.batch_norm_forward(x, None, None, None, None, training=True,
                                          act="relu", reproducible=True)
