"""On a real GPU, reproducible=True gives the CPU backends' bits (#21).

The same comparison as ``test_exact_cupy_layer.py`` (which runs the kernels in
the C++ emulation), on the hardware: the kernels' explicitly rounded float64
intrinsics and the ``--fmad=false`` elementwise module must give NumPy's bits
(y, dx, running statistics, parameter gradients, eval outputs), also on a
shape large enough to spread every channel over many blocks.
"""

import numpy as np
import pytest

import cupysyncbn as sbn

pytestmark = pytest.mark.gpu


def _run(layer, xs, dys, wrap, host):
    out = []
    for x, dy in zip(xs, dys):
        layer.clear_gradients()
        y = layer(wrap(x))
        dx = layer.backward(wrap(dy))
        out += [host(a) for a in (y, dx, layer._mean, layer._variance, layer.weight.grad,
                                  layer.bias.grad)]
    layer.eval()
    out.append(host(layer(wrap(xs[0]))))
    return out


@pytest.mark.parametrize("fmt,shape", [("NCHW", (8, 6, 33, 31)), ("NHWC", (8, 31, 33, 40)),
                                       ("NC", (4000, 3))])
@pytest.mark.parametrize("dt", ["float16", "float32", "float64"])
def test_the_gpu_gives_the_numpy_bits(dt, fmt, shape):
    import cupy as cp

    rng = np.random.default_rng(7)
    pdt = "float64" if dt == "float64" else "float32"
    xs = [(rng.standard_normal(shape) * 3 + 50 * i).astype(dt) for i in range(3)]
    dys = [rng.standard_normal(shape).astype(dt) for _ in range(3)]
    c = shape[-1] if fmt == "NHWC" else shape[1]
    ref = sbn.SyncBatchNorm(c, data_format=fmt, dtype=pdt, reproducible=True)
    dev = sbn.SyncBatchNorm(c, data_format=fmt, dtype=pdt, reproducible=True)
    dev.to("cuda")
    want = _run(ref, xs, dys, lambda a: a, np.asarray)
    got = _run(dev, xs, dys, cp.asarray, cp.asnumpy)
    for i, (g, w) in enumerate(zip(got, want)):
        assert g.dtype == w.dtype and g.tobytes() == w.tobytes(), i
