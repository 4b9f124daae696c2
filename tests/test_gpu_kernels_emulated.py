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
model) is left to ``test_gpu_cupy.py``.
"""

import ctypes
import re
import shutil
import subprocess

import numpy as np
import pytest

from cupysyncbn.backends import NUMPY_BACKEND
from cupysyncbn.backends import kernel_source as ks
from cupysyncbn.backends.cupy_backend import CupyBackend

EMU_H = r"""
#include <barrier>
#include <cstdint>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>
struct uint3_ { unsigned x = 0, y = 0, z = 0; };
inline thread_local uint3_ threadIdx, blockIdx;
inline uint3_ blockDim, gridDim;
#define __global__
#define __device__
#define __forceinline__ inline
#define __restrict__
#define __shared__ static
inline std::unique_ptr<std::barrier<>> g_block;
inline std::vector<std::unique_ptr<std::barrier<>>> g_warps;
inline std::vector<std::uint64_t> g_slots;
inline void __syncthreads() { g_block->arrive_and_wait(); }
template <typename V>
inline V __shfl_xor_sync(unsigned, V v, int offset) {
  const int tid = threadIdx.x + threadIdx.y * blockDim.x;
  std::barrier<>& bar = *g_warps[tid >> 5];
  std::uint64_t bits = 0;
  std::memcpy(&bits, &v, sizeof(V));
  bar.arrive_and_wait();
  g_slots[tid] = bits;
  bar.arrive_and_wait();
  std::uint64_t o = g_slots[tid ^ offset];
  bar.arrive_and_wait();
  V r;
  std::memcpy(&r, &o, sizeof(V));
  return r;
}
inline float __uint_as_float(unsigned u) { float f; std::memcpy(&f, &u, 4); return f; }
inline unsigned __float_as_uint(float f) { unsigned u; std::memcpy(&u, &f, 4); return u; }
template <typename F>
void launch(unsigned gx, unsigned gy, unsigned bx, unsigned by, F body) {
  gridDim = {gx, gy, 1};
  blockDim = {bx, by, 1};
  const int n = bx * by;
  g_block = std::make_unique<std::barrier<>>(n);
  g_warps.clear();
  for (int w = 0; w < (n + 31) / 32; ++w) g_warps.push_back(std::make_unique<std::barrier<>>(32));
  g_slots.assign(n, 0);
  std::vector<std::thread> pool;
  for (unsigned ty = 0; ty < by; ++ty)
    for (unsigned tx = 0; tx < bx; ++tx)
      pool.emplace_back([=] {
        threadIdx = {tx, ty, 0};
        for (unsigned b_y = 0; b_y < gy; ++b_y)
          for (unsigned b_x = 0; b_x < gx; ++b_x) {
            blockIdx = {b_x, b_y, 0};
            body();
            g_block->arrive_and_wait();  // the block ends before the next starts
          }
      });
  for (auto& t : pool) t.join();
}
"""
# Host replacements for the two PTX conversions (GCC's _Float16 rounds to nearest even).
HALF_IN = '  asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));'
HALF_IN_EMU = "  { _Float16 t; std::memcpy(&t, &h, 2); f = (float)t; }"
HALF_OUT = '  asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));'
HALF_OUT_EMU = "  { _Float16 t = (_Float16)f; std::memcpy(&h, &t, 2); }"

# Parameter lists of the kernels (T, A, I substituted), in launch order.
PARAMS = {
    "bn_stats_partial_cf": "const T* x, long long N, long long C, long long S, int gsx, int gsy,"
                           " long long* pc, A* pm, A* pq",
    "bn_stats_partial_cl": "const T* x, long long M, long long C, long long* pc, A* pm, A* pq",
    "bn_stats_finalize": "const long long* pc, const A* pm, const A* pq, long long C, int G,"
                         " double* mean, double* m2",
    "bn_bwd_partial_cf": "const T* dy, const T* x, long long N, long long C, long long S,"
                         " int gsx, int gsy, const A* mean, A* p1, A* p2",
    "bn_bwd_partial_cl": "const T* dy, const T* x, long long M, long long C, const A* mean,"
                         " A* p1, A* p2",
    "bn_bwd_finalize": "const A* p1, const A* p2, long long C, int G, const A* invstd,"
                       " double* s1, double* s2",
    "bn_normalize": "const T* x, T* y, I total, I C, I S, const A* mean, const A* scale,"
                    " const A* bias",
    "bn_backward_elemt": "const T* dy, const T* x, T* dx, I total, I C, I S, const A* mean,"
                         " const A* a, const A* mean_dy, const A* b",
}


def _source():
    parts = []
    for i, f in enumerate(ks.KERNEL_FILES):
        src = ks.read_source(f)
        if i:  # common.cuh once
            src = re.sub(r"// begin common\.cuh.*?// end common\.cuh", "", src, flags=re.S)
        parts.append(src)
    src = "\n".join(parts)
    assert HALF_IN in src and HALF_OUT in src, "update the emulated half conversions"
    src = src.replace(HALF_IN, HALF_IN_EMU).replace(HALF_OUT, HALF_OUT_EMU)
    wrappers, symbols = [], {}
    for f in ks.KERNEL_FILES:
        for k, expr in enumerate(ks.name_expressions(f)):
            kind, targs = re.fullmatch(r"(\w+)<(.*)>", expr).groups()
            targs = [t.strip() for t in targs.split(",")]
            names = {"T": None, "A": None, "I": None}
            keys = ["A"] if kind.endswith("finalize") else ["T", "A", "I"][: len(targs)]
            names.update(zip(keys, targs))
            params = PARAMS[kind]
            for key, val in names.items():
                if val is not None:
                    params = re.sub(rf"\b{key}\b", val, params)
            args = ", ".join(p.split()[-1].lstrip("*") for p in params.split(","))
            sym = f"emu_{f.split('.')[0]}_{k}"
            symbols[expr] = (sym, params)
            wrappers.append(
                f'extern "C" void {sym}(unsigned gx, unsigned gy, unsigned bx, unsigned by,'
                f" {params}) {{ launch(gx, gy, bx, by, [=] {{ {expr}({args}); }}); }}"
            )
    return EMU_H + src + "\n" + "\n".join(wrappers) + "\n", symbols


@pytest.fixture(scope="module")
def emu(tmp_path_factory):
    cxx = shutil.which("g++")
    if cxx is None:
        pytest.skip("no g++ to build the CPU emulation of the kernels")
    d = tmp_path_factory.mktemp("emu")
    probe = d / "probe.cpp"
    probe.write_text("#include <barrier>\nint main() { std::barrier<> b(1); _Float16 h = 1; }\n")
    if subprocess.run([cxx, "-std=c++20", str(probe), "-o", str(d / "probe")],
                      capture_output=True).returncode:
        pytest.skip("g++ lacks C++20 <barrier> or _Float16 (needs GCC >= 12 on x86-64)")
    src, symbols = _source()
    (d / "emu.cpp").write_text(src)
    res = subprocess.run([cxx, "-std=c++20", "-O0", "-shared", "-fPIC", "-pthread", "-w",
                          str(d / "emu.cpp"), "-o", str(d / "libemu.so")],
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-4000:]
    lib = ctypes.CDLL(str(d / "libemu.so"))
    return lib, symbols


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

    def _kernel(self, file, name):
        assert name in ks.name_expressions(file), name
        sym, params = self._symbols[name]
        fn = getattr(self._lib, sym)
        kinds = [p.split()[-2] if "*" not in p else "ptr" for p in params.split(",")]

        def call(grid, block, args):
            assert len(args) == len(kinds), (name, args)
            grid = tuple(grid) + (1,) * (2 - len(grid))
            block = tuple(block) + (1,) * (2 - len(block))
            assert block[0] * block[1] % 32 == 0 and block[0] * block[1] <= 512
            conv = []
            for kind, a in zip(kinds, args):
                if kind == "ptr":
                    assert isinstance(a, np.ndarray) and a.flags.c_contiguous, (name, kind)
                    conv.append(ctypes.c_void_p(a.ctypes.data))
                elif kind == "long":  # long long: exactly np.int64
                    assert type(a) is np.int64, (name, type(a))
                    conv.append(ctypes.c_longlong(int(a)))
                else:
                    assert kind == "int" and type(a) is np.int32, (name, kind, type(a))
                    conv.append(ctypes.c_int(int(a)))
            self.launches.append((name, grid, block))
            fn(*(ctypes.c_uint(v) for v in (*grid, *block)), *conv)

        return call


@pytest.fixture(scope="module")
def backend(emu):
    # 64-thread blocks (two warps) keep the emulation fast; the production
    # 256-thread blocks run in test_emulated_grid_splits_and_channel_loops.
    import cupysyncbn.backends.cupy_backend as cb

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
    import cupysyncbn.backends.cupy_backend as cb

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
       ctypes.c_int(1), *(ctypes.c_void_p(a.ctypes.data) for a in (zero, one, zero)))
    assert np.array_equal(out[:6], bits[:6]) and out[7] == bits[7]
    assert (out[6] & 0x7F80) == 0x7F80 and (out[6] & 0x7F) != 0  # NaN stays NaN
    # and a scale of 1 + 2^-9 exercises rounding: 1 * (1 + 2^-9) ties to even -> 1.0
    sc = np.array([1.0 + 2.0**-9], np.float32)
    fn(*(ctypes.c_uint(v) for v in (1, 1, 32, 1)), ctypes.c_void_p(bits.ctypes.data),
       ctypes.c_void_p(out.ctypes.data), ctypes.c_int(1), ctypes.c_int(1),
       ctypes.c_int(1), *(ctypes.c_void_p(a.ctypes.data) for a in (zero, sc, zero)))
    assert out[0] == 0x3F80
