"""Finite-difference gradient checks in float64 (x, weight, bias; train and eval).

The loss is ``L = sum(y * g)`` for a fixed random ``g``; central differences
with ``h = 1e-6`` have truncation + rounding error ~1e-9, so a relative
tolerance of 1e-6 separates right from wrong gradients by orders of magnitude.
"""

import numpy as np
import pytest
from support import bn_ref

import cupysyncbn as sbn
from cupysyncbn import functional as F
from cupysyncbn.comm.base import NoCommunicator

LOCAL = NoCommunicator()
H = 1e-6
SHAPES = {"NCHW": (3, 2, 2, 2), "NHWC": (3, 2, 2, 2), "NC": (5, 2), "NCL": (2, 2, 3),
          "NDHWC": (2, 1, 2, 2, 2)}


def _fd(f, arr):
    """Central-difference gradient of scalar ``f()`` w.r.t. every entry of ``arr``."""
    g = np.zeros_like(arr)
    for i in np.ndindex(arr.shape):
        old = arr[i]
        arr[i] = old + H
        fp = f()
        arr[i] = old - H
        fm = f()
        arr[i] = old
        g[i] = (fp - fm) / (2 * H)
    return g


def _close(a, b):
    scale = max(1.0, np.abs(b).max())
    assert np.abs(a - b).max() <= 1e-6 * scale, (a, b)


@pytest.mark.parametrize("fmt", list(SHAPES))
def test_train_mode(rng, fmt):
    x = rng.standard_normal(SHAPES[fmt]) * 1.5 + 0.3
    g = rng.standard_normal(SHAPES[fmt])
    w = rng.standard_normal(2)
    b = rng.standard_normal(2)

    def loss():
        return float((F.batch_norm_forward(x, w, b, data_format=fmt, comm=LOCAL).y * g).sum())

    layer = sbn.SyncBatchNorm(2, data_format=fmt, dtype="float64", comm=LOCAL)
    layer.weight.data, layer.bias.data = w.copy(), b.copy()
    layer(x)
    dx = layer.backward(g)
    _close(dx, _fd(loss, x))
    _close(layer.weight.grad, _fd(loss, w))
    _close(layer.bias.grad, _fd(loss, b))


@pytest.mark.parametrize("fmt", ["NCHW", "NHWC", "NC"])
def test_eval_mode(rng, fmt):
    x = rng.standard_normal(SHAPES[fmt])
    g = rng.standard_normal(SHAPES[fmt])
    layer = sbn.SyncBatchNorm(2, data_format=fmt, dtype="float64", comm=LOCAL)
    layer.set_state_dict({"weight": rng.standard_normal(2), "bias": rng.standard_normal(2),
                          "_mean": rng.standard_normal(2), "_variance": rng.random(2) + 0.2})
    layer.eval()
    w, b = layer.weight.data, layer.bias.data  # perturbed in place by _fd

    def loss():
        return float((layer(x) * g).sum())

    layer(x)
    dx = layer.backward(g)
    _close(dx, _fd(loss, x))
    _close(layer.weight.grad, _fd(loss, w))
    _close(layer.bias.grad, _fd(loss, b))


def test_fixed_weight_train_mode(rng):
    x = rng.standard_normal((4, 3))
    g = rng.standard_normal((4, 3))
    b = rng.standard_normal(3)

    def loss():
        return float((F.batch_norm_forward(x, None, b, data_format="NC", comm=LOCAL).y
                      * g).sum())

    layer = sbn.SyncBatchNorm(3, data_format="NC", weight_attr=False, dtype="float64",
                              comm=LOCAL)
    layer.bias.data = b.copy()
    layer(x)
    _close(layer.backward(g), _fd(loss, x))
    _close(layer.bias.grad, _fd(loss, b))
    assert layer.weight.grad is None


def test_synchronized_backward_is_the_gradient_of_the_global_forward(rng):
    # Two ranks (threads) with an uneven split: dx on each rank must be the
    # derivative of the loss summed over ranks w.r.t. that rank's inputs.
    k, counts = 2, [1, 3]
    x = rng.standard_normal((4, 2, 3))
    g = rng.standard_normal((4, 2, 3))
    w = rng.standard_normal(2)

    def global_loss():
        def fn(r, comm):
            sl = bn_ref.local_slice(counts, r)
            return float((F.batch_norm_forward(x[sl], w, None, data_format="NCL",
                                               comm=comm).y * g[sl]).sum())
        return sum(bn_ref.ThreadGroup(k).run(fn))

    def grads(r, comm):
        sl = bn_ref.local_slice(counts, r)
        res = F.batch_norm_forward(x[sl], w, None, data_format="NCL", comm=comm)
        dx, dw, _ = F.batch_norm_backward(g[sl], res.ctx)
        return dx, dw

    out = bn_ref.ThreadGroup(k).run(grads)
    _close(np.concatenate([o[0] for o in out]), _fd(global_loss, x))
    _close(out[0][1] + out[1][1], _fd(global_loss, w))
