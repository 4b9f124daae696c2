"""Issue 14 on the fused GPU path, proven without a GPU.

The layer runs on the recording CuPy stand-in (our CUDA kernels executed by
the C++ emulation, see ``test_launch_budget.py``) with two ranks as threads:
the header's layer identity and eval counter are written and checked by the
fused kernels too, so one rank in eval mode while the other trains, or layers
paired in different orders, raise ``CollectiveMismatchError`` on both ranks.
"""

import numpy as np
import test_launch_budget as tlb  # the sibling module (same folder): its harness and fixture

from cupysyncbn.errors import CollectiveMismatchError

cp = tlb.cp  # the module-scoped recording-CuPy fixture


def _pass(cp, layer, x, dy=None):
    def run():
        y = layer(cp.asarray(x))
        if dy is not None:
            layer.backward(cp.asarray(dy))
        return y
    return run


def test_eval_on_one_rank_is_caught_by_the_fused_header(cp):
    g = tlb._Group(2)
    layers = [tlb._layer(cp, "NCHW", 3, tlb.ThreadComm(g, r, strict=True)) for r in range(2)]
    data = [tlb._batch("NCHW", 2, "float32", r) for r in range(2)]
    _, errs = tlb._run_ranks([_pass(cp, layers[r], *data[r]) for r in range(2)])
    assert errs == [None, None]
    layers[1].eval()
    assert tlb._run_ranks([_pass(cp, layers[1], data[1][0])])[1] == [None]
    layers[1].train()
    _, errs = tlb._run_ranks([_pass(cp, layers[r], *data[r]) for r in range(2)])
    for e in errs:
        assert isinstance(e, CollectiveMismatchError) and "eval" in str(e), errs


def test_layers_paired_in_different_orders_are_caught(cp):
    g = tlb._Group(2)
    comms = [tlb.ThreadComm(g, r, strict=True) for r in range(2)]
    a = [tlb._layer(cp, "NCHW", 3, comms[r]) for r in range(2)]
    b = [tlb._layer(cp, "NCHW", 3, comms[r]) for r in range(2)]
    x = [tlb._batch("NCHW", 2, "float32", r)[0] for r in range(2)]

    def run(r):
        order = (a[r], b[r]) if r == 0 else (b[r], a[r])
        return lambda: [layer(cp.asarray(x[r])) for layer in order]
    _, errs = tlb._run_ranks([run(0), run(1)])
    for e in errs:
        assert isinstance(e, CollectiveMismatchError) and "different layers" in str(e), errs
    assert np.array_equal(tlb._host(a[0]._mean), np.zeros(3))


def test_fused_path_is_finite_for_epsilon_zero_and_huge_constants(cp):
    layer = tlb._layer(cp, "NC", 3, tlb._forced(), epsilon=0.0)
    x = np.full((8, 3), 2.0, "float32")
    x[:, 0] = np.arange(8)
    y = tlb._host(layer(cp.asarray(x)))
    dx = tlb._host(layer.backward(cp.asarray(np.ones_like(x))))
    bias = tlb._host(layer.bias.data)
    assert np.isfinite(y).all() and np.isfinite(dx).all()
    np.testing.assert_array_equal(y[:, 1:], np.broadcast_to(bias[1:], (8, 2)))
    np.testing.assert_array_equal(dx[:, 1:], 0.0)
    layer.eval()
    y = tlb._host(layer(cp.asarray(x)))  # running variance may be 0 as well
    assert np.isfinite(y).all()
    layer.train()
    for value in (4e35, -3e38):
        rm0 = tlb._host(layer._mean).astype(np.float64)
        rv0 = tlb._host(layer._variance).astype(np.float64)
        y = tlb._host(layer(cp.asarray(np.full((4096, 3), value, "float32"))))
        # a constant channel: x - mean is 0, so y is the bias exactly; the batch
        # variance is 0 and the mean is the value (momentum 0.9, Paddle's rule)
        np.testing.assert_array_equal(y, np.broadcast_to(bias, y.shape))
        np.testing.assert_allclose(tlb._host(layer._variance), 0.9 * rv0, rtol=1e-6)
        np.testing.assert_allclose(tlb._host(layer._mean), 0.9 * rm0 + 0.1 * value,
                                   rtol=1e-6)
