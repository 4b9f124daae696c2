"""The CUDA kernels and their launch code, executed on the CPU (no GPU needed).

The kernel sources the loader returns are compiled as C++ with a tiny CUDA
emulation (each block's threads are real threads with real barriers; warp
shuffles go through a shared slot array), and the *actual*
``CupyBackend`` methods run on NumPy arrays with their kernel launches routed
to that library. This checks, on any machine with g++ >= 11, what NVRTC
cannot: the reductions' results, the grid decomposition chosen by the
backend (several blocks per channel in both directions, grid-stride loops
over channels), the order and types of the launch arguments, and the
float16/bfloat16 conversions. Results are compared with float64 truth
(reductions) and the NumPy backend. Real-GPU behaviour (warp timing, memory
model) is left to ``test_cupy_on_gpu.py``.
"""

import ctypes

import numpy as np
import pytest
from support import cuda_emu

from cupysyncbn.backends import NUMPY_BACKEND
from cupysyncbn.backends.cupy import kernels as ks
from cupysyncbn.backends.cupy.backend import CupyBackend


@pytest.fixture(scope="module")
def emu():
    try:
        return cuda_emu.build()
    except cuda_emu.Unavailable as e:
        pytest.skip(str(e))


class EmulatedBackend(CupyBackend):
    """The real CupyBackend code with NumPy as ``xp`` and emulated kernels.

    The primitives run their undecorated bodies (``__wrapped__``): NumPy
    arrays have no CUDA device to make current.
    """

    def __init__(self, lib, symbols, sms=2):
        self.xp = np
        self._lib, self._symbols, self._sms_n = lib, symbols, sms
        self.launches = []

    def device_of(self, a):
        return "cuda:0"

    def moments(self, *args):
        return CupyBackend.moments.__wrapped__(self, *args)

    def normalize(self, *args):
        return CupyBackend.normalize.__wrapped__(self, *args)

    def backward_reduce(self, *args):
        return CupyBackend.backward_reduce.__wrapped__(self, *args)

    def backward_elemt(self, *args):
        return CupyBackend.backward_elemt.__wrapped__(self, *args)

    def _sm_count(self):
        return self._sms_n

    def _kernel(self, file, name, exact=False):
        # exact: the --fmad=false module; the emulation never contracts anyway
        assert name in ks.name_expressions(file), name
        return cuda_emu.launcher(self._lib, self._symbols, name, self.launches)


@pytest.fixture(scope="module")
def backend(emu):
    # 64-thread blocks (two warps) keep the emulation fast; the production
    # 256-thread blocks run in test_emulated_grid_splits_and_channel_loops.
    import cupysyncbn.backends.cupy.backend as cb

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(cb, "_THREADS", 64)
        yield EmulatedBackend(*emu)


SHAPES = [(2, 1, 3000), (40, 2, 33), (3, 7, 5), (7, 3, 1), (3000, 2), (300, 37), (1, 1)]


def _truth(x, dy, cl):
    x64, dy64 = x.astype(np.float64), dy.astype(np.float64)
    axes = (0,) if cl else (0, 2)
    bs = (1, -1) if cl else (1, -1, 1)
    mean = x64.mean(axis=axes)
    m2 = ((x64 - mean.reshape(bs)) ** 2).sum(axis=axes)
    return x64, dy64, axes, bs, mean, m2


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("idt,cdt", [("float32", "float32"), ("float64", "float64"),
                                     ("float16", "float32"), ("float32", "float64")])
def test_emulated_kernels_equal_numpy_backend(backend, shape, idt, cdt):
    cl = len(shape) == 2
    rng = np.random.default_rng(sum(shape))
    x = (rng.standard_normal(shape) * 2 + 50).astype(idt)
    dy = rng.standard_normal(shape).astype(idt)
    cdt = np.dtype(cdt)
    x64, dy64, axes, bs, mean64, m2_64 = _truth(x, dy, cl)
    n = x.size // x.shape[1]
    tol = 1e-5 if cdt == np.float32 else 1e-12
    backend.launches.clear()
    mean, m2 = backend.moments(x, cl, cdt)
    assert mean.dtype == m2.dtype == np.float64
    np.testing.assert_allclose(mean, mean64, rtol=tol, atol=tol)
    np.testing.assert_allclose(m2 / n, m2_64 / n, rtol=20 * tol, atol=20 * tol)
    nm, nm2 = NUMPY_BACKEND.moments(np.asarray(x), cl, cdt)
    np.testing.assert_allclose(mean, nm, rtol=2 * tol, atol=2 * tol)
    np.testing.assert_allclose(m2 / n, nm2 / n, rtol=40 * tol, atol=40 * tol)

    mc = mean64.astype(cdt)
    inv = (1 / np.sqrt(m2_64 / n + 1e-5)).astype(cdt)
    s1, s2 = backend.backward_reduce(dy, x, cl, mc, inv)
    r1 = dy64.sum(axis=axes)
    r2 = (dy64 * (x64 - mc.astype("f8").reshape(bs))).sum(axis=axes) * inv.astype("f8")
    scale = np.sqrt(n)
    np.testing.assert_allclose(s1 / scale, r1 / scale, rtol=10 * tol, atol=10 * tol)
    np.testing.assert_allclose(s2 / scale, r2 / scale, rtol=10 * tol, atol=10 * tol)

    c = x.shape[1]
    sc, b, a, mdy = (rng.uniform(-2, 2, c).astype(cdt) for _ in range(4))
    y = backend.normalize(x, cl, mc, sc, b, np.dtype(idt))
    yr = NUMPY_BACKEND.normalize(np.asarray(x), cl, mc, sc, b, np.dtype(idt))
    otol = {"float16": 4e-3, "float32": 2e-5, "float64": 1e-12}[idt]
    assert y.dtype == np.dtype(idt) and y.shape == x.shape
    np.testing.assert_allclose(y.astype("f8"), yr.astype("f8"), rtol=otol, atol=otol)
    dx = backend.backward_elemt(dy, x, cl, mc, a, mdy, b, np.dtype(idt))
    dxr = NUMPY_BACKEND.backward_elemt(np.asarray(dy), np.asarray(x), cl, mc, a, mdy, b,
                                       np.dtype(idt))
    np.testing.assert_allclose(dx.astype("f8"), dxr.astype("f8"), rtol=otol, atol=otol)
    assert [ln[0].split("<")[0] for ln in backend.launches] == [
        f"bn_stats_partial_{'cl' if cl else 'cf'}", "bn_stats_finalize",
        f"bn_bwd_partial_{'cl' if cl else 'cf'}", "bn_bwd_finalize",
        "bn_normalize", "bn_backward_elemt"]


def test_emulated_grid_splits_and_channel_loops(emu, monkeypatch):
    # Several blocks per channel along S and N (channel-first) and along rows
    # (channel-last); more channels than grid rows (grid-stride channel loops).
    import cupysyncbn.backends.cupy.backend as cb

    monkeypatch.setattr(cb, "_MAX_GRID_YZ", 3)
    monkeypatch.setattr(cb, "_THREADS", 256)  # the production block size
    be = EmulatedBackend(*emu, sms=8)
    rng = np.random.default_rng(5)
    for shape in [(2, 1, 20000), (3, 10, 7), (20000, 3), (64, 9)]:
        cl = len(shape) == 2
        x = (rng.standard_normal(shape) + 1e3).astype("float32")
        be.launches.clear()
        mean, m2 = be.moments(x, cl, np.dtype("float32"))
        _, _, _, _, mean64, m2_64 = _truth(x, x, cl)
        np.testing.assert_allclose(mean, mean64, rtol=1e-6)
        np.testing.assert_allclose(m2, m2_64, rtol=1e-4)
        (_, grid, block), (_, fgrid, _) = be.launches
        if shape == (2, 1, 20000):
            bdx, bdy, gsx, gsy = be._cf_grid(2, 1, 20000)
            assert gsx > 1 and gsy > 1 and grid == (gsx * gsy, 1)
        if shape == (3, 10, 7):
            assert grid[1] == 3 and fgrid[0] == 3  # channels loop over the grid
        if shape == (20000, 3):
            assert grid[1] > 1


def test_emulated_bfloat16_rounding(emu):
    # bfloat16 storage (no NumPy dtype here): round to nearest even, NaN kept.
    lib, symbols = emu
    sym, _ = symbols["bn_normalize<sbn::bfloat16_t, float, int>"]
    fn = getattr(lib, sym)
    vals = np.array([1.0, 1.00390625, 1.01171875, -3.5, np.inf, 3.0e38, np.nan, 1e-40],
                    dtype=np.float32)
    bits = (vals.view(np.uint32) >> 16).astype(np.uint16)  # exact bf16 inputs (truncated)
    out = np.zeros_like(bits)
    one = np.ones(1, np.float32)
    zero = np.zeros(1, np.float32)
    # y = (x - 0) * 1 + 0 round-trips exactly representable values
    fn(*(ctypes.c_uint(v) for v in (1, 1, 32, 1)), ctypes.c_void_p(bits.ctypes.data),
       ctypes.c_void_p(out.ctypes.data), ctypes.c_int(bits.size), ctypes.c_int(1),
       ctypes.c_int(1), *(ctypes.c_void_p(a.ctypes.data) for a in (zero, one, zero)),
       ctypes.c_int(0))
    assert np.array_equal(out[:6], bits[:6]) and out[7] == bits[7]
    assert (out[6] & 0x7F80) == 0x7F80 and (out[6] & 0x7F) != 0  # NaN stays NaN
    # and a scale of 1 + 2^-9 exercises rounding: 1 * (1 + 2^-9) ties to even -> 1.0
    sc = np.array([1.0 + 2.0**-9], np.float32)
    fn(*(ctypes.c_uint(v) for v in (1, 1, 32, 1)), ctypes.c_void_p(bits.ctypes.data),
       ctypes.c_void_p(out.ctypes.data), ctypes.c_int(1), ctypes.c_int(1),
       ctypes.c_int(1), *(ctypes.c_void_p(a.ctypes.data) for a in (zero, sc, zero)),
       ctypes.c_int(0))
    assert out[0] == 0x3F80


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("idt,cdt", [("float32", "float32"), ("float64", "float64"),
                                     ("float16", "float32"), ("float32", "float64")])
def test_emulated_relu_primitives_equal_numpy_backend(backend, shape, idt, cdt):
    # act="relu" on the unfused CuPy primitives: bn_normalize's relu, the mask
    # (act_scale/act_bias) in bn_bwd_partial_* and bn_backward_elemt.
    cl = len(shape) == 2
    rng = np.random.default_rng(sum(shape) + 1)
    cdt = np.dtype(cdt)
    c = shape[1]
    mc, sc, b, a, mdy, bb = (rng.uniform(-2, 2, c).astype(cdt) for _ in range(6))
    inv = np.abs(sc) + 0.5
    bs = (1, -1) if cl else (1, -1, 1)
    x = rng.standard_normal(shape)
    # keep every pre-activation off the kink (rounding may not decide its side)
    pre = (x - mc.reshape(bs)) * sc.reshape(bs) + b.reshape(bs)
    x = np.where(np.abs(pre) < 0.05, x + 0.2 / sc.reshape(bs).astype("f8"), x).astype(idt)
    dy = rng.standard_normal(shape).astype(idt)
    relu = (sc, b)
    y = backend.normalize(x, cl, mc, sc, b, np.dtype(idt), True)
    yr = NUMPY_BACKEND.normalize(x, cl, mc, sc, b, np.dtype(idt), True)
    otol = {"float16": 4e-3, "float32": 2e-5, "float64": 1e-12}[idt]
    np.testing.assert_allclose(y.astype("f8"), yr.astype("f8"), rtol=otol, atol=otol)
    assert (y >= 0).all() and (x.size == 1 or ((y == 0).any() and (y > 0).any()))
    keep = (y > 0).astype(idt)
    s1, s2 = backend.backward_reduce(dy, x, cl, mc, inv, relu)
    r1, r2 = NUMPY_BACKEND.backward_reduce(dy * keep, x, cl, mc, inv)
    tol = 1e-4 if cdt == np.float32 else 1e-11
    np.testing.assert_allclose(s1, r1, rtol=tol, atol=tol * np.sqrt(x.size))
    np.testing.assert_allclose(s2, r2, rtol=tol, atol=tol * np.sqrt(x.size))
    dx = backend.backward_elemt(dy, x, cl, mc, a, mdy, bb, np.dtype(idt), relu)
    dxr = NUMPY_BACKEND.backward_elemt(dy * keep, x, cl, mc, a, mdy, bb, np.dtype(idt))
    np.testing.assert_allclose(dx.astype("f8"), dxr.astype("f8"), rtol=otol, atol=otol)
