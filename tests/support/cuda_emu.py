"""CPU emulation of the CUDA kernels (shared by the emulated-kernel tests and fake_cupy).

The kernel sources the loader returns are compiled as C++ with a tiny CUDA
emulation: each block's threads are real threads with real barriers, warp
shuffles go through a shared slot array, PTX half conversions become
``_Float16`` casts. :func:`build` compiles it once per source text (cached
under the temp directory, keyed by a hash) and returns the library and the
kernel symbols; :func:`launcher` returns a callable with CuPy's
``RawKernel`` calling convention that checks every argument's type.
"""

import ctypes
import hashlib
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np

from cupysyncbn.backends.cupy import kernels as ks

EMU_H = r"""
#include <barrier>
#include <cmath>
#include <math.h>
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
// Explicitly rounded float64 operations (never contracted on a GPU; plain here:
// the emulation is compiled without FMA contraction).
inline double __dadd_rn(double a, double b) { return a + b; }
inline double __dsub_rn(double a, double b) { return a - b; }
inline double __dmul_rn(double a, double b) { return a * b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __uint_as_float(unsigned u) { float f; std::memcpy(&f, &u, 4); return f; }
inline unsigned __float_as_uint(float f) { unsigned u; std::memcpy(&u, &f, 4); return u; }
// Kernels without barriers or shuffles: every thread of every block in turn.
template <typename F>
void launch_serial(unsigned gx, unsigned gy, unsigned bx, unsigned by, F body) {
  gridDim = {gx, gy, 1};
  blockDim = {bx, by, 1};
  for (unsigned b_y = 0; b_y < gy; ++b_y)
    for (unsigned b_x = 0; b_x < gx; ++b_x)
      for (unsigned ty = 0; ty < by; ++ty)
        for (unsigned tx = 0; tx < bx; ++tx) {
          blockIdx = {b_x, b_y, 0};
          threadIdx = {tx, ty, 0};
          body();
        }
}
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

# Parameter lists of the kernels (T, A, I, P substituted), in launch order.
PARAMS = {
    "bn_stats_partial_cf": "const T* x, long long N, long long C, long long S, int gsx, int gsy,"
                           " long long* pc, A* pm, A* pq",
    "bn_stats_partial_cl": "const T* x, long long M, long long C, long long* pc, A* pm, A* pq",
    "bn_stats_finalize": "const long long* pc, const A* pm, const A* pq, long long C, int G,"
                         " double* mean, double* m2",
    "bn_bwd_partial_cf": "const T* dy, const T* x, long long N, long long C, long long S,"
                         " int gsx, int gsy, const A* mean, const A* ras, const A* rab,"
                         " A* p1, A* p2",
    "bn_bwd_partial_cl": "const T* dy, const T* x, long long M, long long C, const A* mean,"
                         " const A* ras, const A* rab, A* p1, A* p2",
    "bn_bwd_finalize": "const A* p1, const A* p2, long long C, int G, const A* invstd,"
                       " double* s1, double* s2",
    "bn_normalize": "const T* x, T* y, I total, I C, I S, const A* mean, const A* scale,"
                    " const A* bias, int relu",
    "bn_backward_elemt": "const T* dy, const T* x, T* dx, I total, I C, I S, const A* mean,"
                         " const A* a, const A* mean_dy, const A* b, const A* ras,"
                         " const A* rab",
    "bn_fwd_pack": "const long long* pc, const A* pm, const A* pq, long long C, int G, int mode,"
                   " const double* sn, double* su, const double* mb, double* buf, double* st,"
                   " double* nbt, double size, long long count, int phase, int err, long long nf,"
                   " long long layer, long long call, long long ident, long long evals",
    "bn_fwd_norm_cf": "const T* x, T* y, long long NC, long long C, long long S,"
                      " const double* buf, const double* su, double* sn, const P* w,"
                      " const P* b, const P* rm, const P* rv, P* rmo, P* rvo, double* s64,"
                      " A* sc, double* st, double* nbt, double eps, double keep, double factor,"
                      " int flags,"
                      " double size",
    "bn_fwd_norm_cl": "const T* x, T* y, long long M, long long C, int vec,"
                      " const double* buf, const double* su, double* sn, const P* w,"
                      " const P* b, const P* rm, const P* rv, P* rmo, P* rvo, double* s64,"
                      " A* sc, double* st, double* nbt, double eps, double keep, double factor,"
                      " int flags,"
                      " double size",
    "bn_bwd_pack": "const A* p1, const A* p2, long long C, int G, const A* sc, double* buf,"
                   " P* dw, P* db, int flags, long long count, int phase, int err,"
                   " long long nf, long long layer, long long call, long long ident,"
                   " long long evals",
    "bn_bwd_elemt_cf": "const T* dy, const T* x, T* dx, long long NC, long long C, long long S,"
                       " const double* buf, const double* s64, const A* sc, const P* w,"
                       " double* st, int flags, double size",
    "bn_bwd_elemt_cl": "const T* dy, const T* x, T* dx, long long M, long long C, int vec,"
                       " const double* buf, const double* s64, const A* sc, const P* w,"
                       " double* st, int flags, double size",
    "bn_exact_absmax_cf": "const T* x, long long N, long long C, long long S, double* out",
    "bn_exact_absmax_cl": "const T* x, long long M, long long C, double* out",
    "bn_exact_folds_cf": "const T* x, long long N, long long C, long long S, const double* m1,"
                         " const double* m2, const double* sig, int K, int split, double* out",
    "bn_exact_folds_cl": "const T* x, long long M, long long C, const double* m1,"
                         " const double* m2, const double* sig, int K, int split, double* out",
    "bn_exact_bwd_absmax_cf": "const T* dy, const T* x, long long N, long long C, long long S,"
                              " const double* mean, double* out",
    "bn_exact_bwd_absmax_cl": "const T* dy, const T* x, long long M, long long C,"
                              " const double* mean, double* out",
    "bn_exact_bwd_folds_cf": "const T* dy, const T* x, long long N, long long C, long long S,"
                             " const double* mean, const double* mg, const double* mh,"
                             " const double* sig, int K, double* out",
    "bn_exact_bwd_folds_cl": "const T* dy, const T* x, long long M, long long C,"
                             " const double* mean, const double* mg, const double* mh,"
                             " const double* sig, int K, double* out",
    "bn_exact_sample_cf": "const T* x, long long N, long long C, long long S, double* out",
    "bn_exact_sample_cl": "const T* x, long long N, long long S, long long C, double* out",
    "bn_exact_sample_bwd_cf": "const T* dy, const T* x, const A* mean, long long N,"
                              " long long C, long long S, double* out",
    "bn_exact_sample_bwd_cl": "const T* dy, const T* x, const A* mean, long long N,"
                              " long long S, long long C, double* out",
}
# Kernels with no __syncthreads/shuffle: emulated on one thread (fast).
SERIAL = {"bn_normalize", "bn_backward_elemt", "bn_fwd_pack", "bn_fwd_norm_cf",
          "bn_fwd_norm_cl", "bn_bwd_pack", "bn_bwd_elemt_cf", "bn_bwd_elemt_cl",
          "bn_exact_sample_cl", "bn_exact_sample_bwd_cl"}
# Template parameters of each kernel, in order.
TEMPLATE_KEYS = {"bn_stats_finalize": "A", "bn_bwd_finalize": "A", "bn_fwd_pack": "A",
                 "bn_bwd_pack": "AP"}


def source():
    """The emulation's C++ text and ``{name expression: (symbol, params)}``."""
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
            keys = TEMPLATE_KEYS.get(kind, "TAIP"[: len(targs)] if "norm_" not in kind
                                     and "elemt_" not in kind else "TAP")
            if kind in ("bn_normalize", "bn_backward_elemt"):
                keys = "TAI"
            elif kind.startswith(("bn_stats_partial", "bn_bwd_partial")):
                keys = "TA"
            elif kind.startswith("bn_exact_sample_bwd"):
                keys = "TA"
            elif kind.startswith("bn_exact_"):
                keys = "T"
            params = PARAMS[kind]
            for key, val in zip(keys, targs):
                params = re.sub(rf"\b{key}\b", val, params)
            args = ", ".join(p.split()[-1].lstrip("*") for p in params.split(","))
            sym = f"emu_{f.split('.')[0]}_{k}"
            symbols[expr] = (sym, params)
            how = "launch_serial" if kind in SERIAL else "launch"
            wrappers.append(
                f'extern "C" void {sym}(unsigned gx, unsigned gy, unsigned bx, unsigned by,'
                f" {params}) {{ {how}(gx, gy, bx, by, [=] {{ {expr}({args}); }}); }}"
            )
    return EMU_H + src + "\n" + "\n".join(wrappers) + "\n", symbols


class Unavailable(RuntimeError):
    """No compiler able to build the emulation here."""


def build():
    """``(ctypes library, symbols)``; compiled once per kernel text.

    Raises
    ------
    Unavailable
        Without g++ >= 12 (C++20 ``<barrier>`` and ``_Float16``).
    """
    cxx = shutil.which("g++")
    if cxx is None:
        raise Unavailable("no g++ to build the CPU emulation of the kernels")
    src, symbols = source()
    digest = hashlib.sha256(src.encode()).hexdigest()[:16]
    d = Path(tempfile.gettempdir()) / f"cupysyncbn-emu-{os.getuid()}-{digest}"
    lib_path = d / "libemu.so"
    if not lib_path.is_file():
        d.mkdir(parents=True, exist_ok=True)
        probe = d / "probe.cpp"
        probe.write_text(
            "#include <barrier>\nint main() { std::barrier<> b(1); _Float16 h = 1; }\n"
        )
        if subprocess.run([cxx, "-std=c++20", str(probe), "-o", str(d / "probe")],
                          capture_output=True).returncode:
            raise Unavailable("g++ lacks C++20 <barrier> or _Float16 (needs GCC >= 12)")
        (d / "emu.cpp").write_text(src)
        tmp = d / f"libemu.{os.getpid()}.so"
        res = subprocess.run([cxx, "-std=c++20", "-O1", "-shared", "-fPIC", "-pthread", "-w",
                              str(d / "emu.cpp"), "-o", str(tmp)],
                             capture_output=True, text=True)
        assert res.returncode == 0, res.stderr[-4000:]
        os.replace(tmp, lib_path)
    return ctypes.CDLL(str(lib_path)), symbols


def launcher(lib, symbols, name, launches=None, execute=True):
    """A ``kernel(grid, block, args)`` callable running ``name`` in the emulation.

    Checks the argument count and types the way the CUDA ABI needs them:
    pointers are C-contiguous NumPy arrays (or ``numpy.uint64(0)`` for
    NULL), ``long long`` exactly ``numpy.int64``, ``int`` ``numpy.int32``,
    ``double`` ``numpy.float64``. Appends ``(name, grid, block)`` to
    ``launches`` when given. ``execute=False``: checked and recorded, not run.
    """
    sym, params = symbols[name]
    fn = getattr(lib, sym)
    kinds = [p.split()[-2] if "*" not in p else "ptr" for p in params.split(",")]

    def call(grid, block, args):
        assert len(args) == len(kinds), (name, args)
        grid = tuple(int(g) for g in grid) + (1,) * (2 - len(grid))
        block = tuple(int(b) for b in block) + (1,) * (2 - len(block))
        assert block[0] * block[1] % 32 == 0 and block[0] * block[1] <= 1024
        assert all(g >= 1 for g in grid) and grid[1] <= 65535, (name, grid)
        conv = []
        for kind, a in zip(kinds, args):
            if kind == "ptr":
                if isinstance(a, np.uint64):
                    assert int(a) == 0, (name, "raw pointers other than NULL")
                    conv.append(ctypes.c_void_p(None))
                    continue
                assert isinstance(a, np.ndarray) and a.flags.c_contiguous, (name, kind, type(a))
                conv.append(ctypes.c_void_p(a.ctypes.data))
            elif kind == "long":  # long long: exactly np.int64
                assert type(a) is np.int64, (name, type(a))
                conv.append(ctypes.c_longlong(int(a)))
            elif kind == "double":
                assert type(a) is np.float64, (name, type(a))
                conv.append(ctypes.c_double(float(a)))
            else:
                assert kind == "int" and type(a) is np.int32, (name, kind, type(a))
                conv.append(ctypes.c_int(int(a)))
        if launches is not None:
            launches.append((name, grid, block))
        if execute:
            fn(*(ctypes.c_uint(v) for v in (*grid, *block)), *conv)

    return call
