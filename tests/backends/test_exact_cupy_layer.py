"""reproducible=True on CuPy arrays gives the CPU backends' bits (#21).

The whole layer -> functional -> synchronized pass -> ``CupyBackend`` path
runs on the recording CuPy stand-in, its kernels (``kernels/exact.cu`` and
the elementwise kernels of the ``--fmad=false`` module) in the C++ emulation,
and is compared byte for byte with the same steps on NumPy arrays: outputs,
input gradients, running statistics, parameter gradients and eval outputs,
on one process and with forced collectives (the synchronized path), for
every storage dtype and a channel-first, a channel-last and a 2-D format.
"""

import ml_dtypes
import numpy as np
import pytest
from support import cuda_emu, recording_cupy

import cupysyncbn as sbn
from cupysyncbn.comm.base import NoCommunicator

#: the options of every RawModule the backend compiled
options_seen: list = []


@pytest.fixture(scope="module")
def cp():
    import cupysyncbn.backends.cupy.backend as cb

    make = recording_cupy.RawModule.__init__

    def recording(self, code=None, options=(), name_expressions=()):
        options_seen.append(tuple(options))
        make(self, code, options, name_expressions)

    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(recording_cupy.RawModule, "__init__", recording)
            mp.setattr(cb, "_THREADS", 64)  # smaller blocks: a faster emulation
            with recording_cupy.installed() as mod:
                yield mod
    except cuda_emu.Unavailable as e:  # pragma: no cover - no g++ 12
        pytest.skip(str(e))




def _forced(force):
    comm = NoCommunicator()
    comm.force_collectives = force
    return comm


def _host(a):
    return np.asarray(a.view(np.ndarray) if isinstance(a, recording_cupy.ndarray) else a)


def _same(a, b, what):
    a, b = _host(a), _host(b)
    assert a.dtype == b.dtype and a.shape == b.shape, what
    assert a.tobytes() == b.tobytes(), (what, np.max(np.abs(a.astype("f8") - b.astype("f8"))))


def _dt(name):
    return ml_dtypes.bfloat16 if name == "bfloat16" else np.dtype(name)


def _run(layer, xs, dys, wrap):
    out = []
    for x, dy in zip(xs, dys):
        layer.clear_gradients()
        y = layer(wrap(x))
        dx = layer.backward(wrap(dy))
        out += [y, dx, layer._mean.copy(), layer._variance.copy(), layer.weight.grad.copy(),
                layer.bias.grad.copy()]
    layer.eval()
    out.append(layer(wrap(xs[0])))
    return out


@pytest.mark.parametrize("force", [False, True], ids=["local", "forced"])
@pytest.mark.parametrize("fmt,shape", [("NCHW", (4, 3, 5, 2)), ("NHWC", (4, 2, 5, 3)),
                                       ("NC", (7, 3))])
@pytest.mark.parametrize("dt", ["float16", "bfloat16", "float32", "float64"])
def test_the_cupy_path_gives_the_numpy_bits(cp, rng, dt, fmt, shape, force):
    pdt = "float64" if dt == "float64" else "float32"
    xs = [(rng.standard_normal(shape) * 3 + 10 * i).astype(_dt(dt)) for i in range(3)]
    dys = [rng.standard_normal(shape).astype(_dt(dt)) for _ in range(3)]
    c = shape[-1] if fmt == "NHWC" else shape[1]
    ref = sbn.SyncBatchNorm(c, data_format=fmt, comm=_forced(force), dtype=pdt,
                            reproducible=True)
    dev = sbn.SyncBatchNorm(c, data_format=fmt, comm=_forced(force), dtype=pdt,
                            reproducible=True)
    dev.to("cuda")
    want = _run(ref, xs, dys, lambda a: a)
    got = _run(dev, xs, dys, cp.asarray)
    assert all(isinstance(g, recording_cupy.ndarray) for g in got)  # the CuPy path ran
    names = ["y", "dx", "running_mean", "running_var", "dweight", "dbias"] * 3 + ["eval y"]
    for g, w, name in zip(got, want, names):
        _same(g, w, name)


def test_the_elementwise_kernels_come_from_the_no_fma_module(cp, rng):
    options_seen.clear()
    from cupysyncbn.backends.cupy.backend import get_cupy_backend

    backend = get_cupy_backend()
    backend._modules.clear()
    backend._funcs.clear()
    layer = sbn.SyncBatchNorm(3, reproducible=True)
    layer.to("cuda")
    layer(cp.asarray(rng.standard_normal((4, 3, 2, 2)).astype("float32")))
    assert any("--fmad=false" in o for o in options_seen), options_seen
