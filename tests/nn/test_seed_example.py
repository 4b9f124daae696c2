"""SPEC §7's seed example and its backward."""

import numpy as np
from support import bn_ref

import cupysyncbn as sbn

X = np.array([[[[0.3, 0.4], [0.3, 0.07]], [[0.83, 0.37], [0.18, 0.93]]]], "float32")
EXPECTED = np.array([[[[0.26824948, 1.0936325], [0.26824948, -1.6301316]],
                      [[0.8095662, -0.665287], [-1.2744656, 1.1301866]]]])


def test_seed_example():
    bn = sbn.SyncBatchNorm(2)  # default communicator: one process under pytest
    y = bn(X)
    assert y.dtype == np.float32 and y.shape == X.shape
    np.testing.assert_allclose(y, EXPECTED, rtol=0, atol=1e-6)
    # running stats after one step (Paddle momentum 0.9, biased variance)
    mean = X.astype(np.float64).mean(axis=(0, 2, 3))
    var = X.astype(np.float64).var(axis=(0, 2, 3))
    np.testing.assert_allclose(bn._mean, 0.1 * mean, atol=1e-7)
    np.testing.assert_allclose(bn._variance, 0.9 + 0.1 * var, atol=1e-7)


def test_seed_example_float64_layer():
    bn = sbn.SyncBatchNorm(2, dtype="float64")
    y = bn(X.astype(np.float64))
    np.testing.assert_allclose(y, bn_ref.ref_forward(X, "NCHW")[0], atol=1e-14)
    np.testing.assert_allclose(y, EXPECTED, atol=1e-6)


def test_seed_backward():
    bn = sbn.SyncBatchNorm(2)
    bn(X)
    dy = np.arange(8, dtype=np.float32).reshape(X.shape) / 8
    dx = bn.backward(dy)
    dxr, dwr, dbr = bn_ref.ref_backward(X, dy, "NCHW")
    np.testing.assert_allclose(dx, dxr, atol=1e-5)
    np.testing.assert_allclose(bn.weight.grad, dwr, atol=1e-5)
    np.testing.assert_allclose(bn.bias.grad, dbr, atol=1e-6)
    # d(sum y)/dx is zero for batch norm with weight 1
    bn.clear_gradients()
    bn(X)
    assert np.abs(bn.backward(np.ones_like(X))).max() < 1e-5
