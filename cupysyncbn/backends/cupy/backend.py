"""CuPy backend: the batch-norm primitives as our own CUDA kernels.

Kernels come from ``kernels/*.cu`` (see :mod:`.kernels`), compiled with
``cupy.RawModule`` (C++ templates selected by name expressions) once per
process and device; CuPy's on-disk cache makes later processes cheap.
Everything is launched on the current CuPy stream and nothing here
synchronizes with the host.

Launch shapes (the reductions; elementwise kernels are grid-stride loops):

* channel-first ``(N, C, S)``: grid ``(G, C)``; each channel is split over
  ``G = gsx * gsy`` blocks (S and N directions) so small-C / large-S inputs
  still fill the GPU, then one merge block per channel;
* channel-last ``(M, C)``: grid ``(ceil(C / bdx), G)``; threads over channels
  (coalesced), ``G`` row splits merged the same way.

``G`` aims at about eight 256-thread blocks per multiprocessor while giving
every thread at least :data:`_MIN_PER_THREAD` elements.
"""

from __future__ import annotations

import functools
import threading
from functools import lru_cache
from typing import Any

import numpy as np

from .. import exact_sums
from ..base import Backend
from . import kernels as ks
from .exact_ops import CupyExactOps

__all__ = ["CupyBackend", "get_cupy_backend"]

_F64 = np.dtype(np.float64)
_I64 = np.dtype(np.int64)
_THREADS = 256
_MIN_PER_THREAD = 16
_BLOCKS_PER_SM = 8
_MAX_GRID_YZ = 65535
_INT32_LIMIT = 2**31
#: Threads of a channel-first reproducible-mode block (a power of two <= 256:
#: the blocks' tree reductions and SBN_EXACT_THREADS in kernels/exact.cu).
_EXACT_THREADS = 256
#: SBN_MAX_FOLDS in kernels/exact.cu (per-thread accumulators).
_MAX_FOLDS = 5


#: A NULL pointer argument (an absent vector: the kernels test the pointer).
_NULL = np.uint64(0)


def _last_pow2(n: int) -> int:
    return 1 << (max(int(n), 1).bit_length() - 1)


def _next_pow2(n: int) -> int:
    return 1 << (max(int(n), 1) - 1).bit_length()


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _on_input_device(fn: Any) -> Any:
    """Run a primitive with its first array's GPU current (kernels, outputs)."""

    @functools.wraps(fn)
    def wrapper(self: Any, a: Any, *args: Any, **kwargs: Any) -> Any:
        with a.device:
            return fn(self, a, *args, **kwargs)

    return wrapper


class CupyBackend(Backend):
    """Batch-norm primitives on CuPy arrays (see :mod:`.base`)."""

    name = "cupy"

    def __init__(self) -> None:
        import cupy

        self.xp = cupy
        self._lock = threading.Lock()
        self._modules: dict = {}
        self._funcs: dict = {}
        self._sms: dict = {}
        self._launches: dict = {}  # see _launch
        #: the reproducible mode's primitives (``reproducible=True``)
        self.exact = CupyExactOps(self)

    # -- array plumbing ----------------------------------------------------
    def owns(self, a: Any) -> bool:
        """True for CuPy arrays."""
        return isinstance(a, self.xp.ndarray)

    def device_of(self, a: Any) -> str:
        """``"cuda:N"``."""
        return f"cuda:{a.device.id}"

    def ascontiguous(self, a: Any) -> Any:
        """``a`` or a C-contiguous copy of it (on ``a``'s device)."""
        return self.xp.ascontiguousarray(a)

    def asarray(self, a: Any, dtype: Any = None) -> Any:
        """``cupy.asarray`` on the current device."""
        return self.xp.asarray(a, dtype=dtype)

    def to_host(self, a: Any) -> np.ndarray:
        """A NumPy copy (synchronizes with the current stream)."""
        return self.xp.asnumpy(a)

    # -- kernels -----------------------------------------------------------
    def _kernel(self, file: str, name: str, exact: bool = False) -> Any:
        """The compiled kernel ``name`` of ``file`` on the current device.

        ``exact``: from the module compiled with ``--fmad=false`` (no
        multiply-add contraction), whose elementwise kernels give the
        reproducible mode's canonical bits (``exact_sums.normalize``).
        """
        dev = self.xp.cuda.Device().id
        f = self._funcs.get((name, dev, exact))
        if f is not None:
            return f
        with self._lock:
            mod = self._modules.get((file, dev, exact))
            if mod is None:
                mod = self.xp.RawModule(
                    code=ks.read_source(file),
                    options=ks.COMPILE_OPTIONS + (ks.NO_FMAD if exact else ()),
                    name_expressions=ks.name_expressions(file),
                )
                self._modules[(file, dev, exact)] = mod
            f = mod.get_function(name)
            self._funcs[(name, dev, exact)] = f
        return f

    def _sm_count(self) -> int:
        dev = self.xp.cuda.Device()
        n = self._sms.get(dev.id)
        if n is None:
            n = int(dev.attributes["MultiProcessorCount"])
            self._sms[dev.id] = n
        return n

    def _cf_grid(self, n: int, c: int, s: int) -> tuple[int, int, int, int]:
        """``(bdx, bdy, gsx, gsy)`` for a channel-first reduction."""
        bdx = min(_THREADS, _last_pow2(s))
        bdy = _THREADS // bdx
        per_channel = _cdiv(self._sm_count() * _BLOCKS_PER_SM, c)
        by_work = _cdiv(n * s, _THREADS * _MIN_PER_THREAD)
        g = max(1, min(per_channel, by_work, _MAX_GRID_YZ))
        gsy = max(1, min(g, _cdiv(n, bdy)))
        gsx = max(1, min(_cdiv(g, gsy), _cdiv(s, bdx)))
        return bdx, bdy, gsx, gsy

    def _cl_grid(self, m: int, c: int) -> tuple[int, int, int, int]:
        """``(bdx, bdy, gx, G)`` for a channel-last reduction."""
        bdx = min(32, _next_pow2(c))
        bdy = _THREADS // bdx
        gx = _cdiv(c, bdx)
        per_tile = _cdiv(self._sm_count() * _BLOCKS_PER_SM, gx)
        by_work = _cdiv(m, bdy * _MIN_PER_THREAD)
        return bdx, bdy, gx, max(1, min(per_tile, by_work, _MAX_GRID_YZ))

    def _elemt_launch(self, total: int) -> tuple[int, str, Any]:
        """Grid size, C++ index type and NumPy scalar type of a flat kernel."""
        blocks = max(1, min(_cdiv(total, _THREADS), self._sm_count() * 32))
        if total + blocks * _THREADS < _INT32_LIMIT:
            return blocks, "int", np.int32
        return blocks, "long long", np.int64

    @staticmethod
    def _finalize_threads(g: int) -> int:
        return min(_THREADS, 32 * _cdiv(g, 32))

    def _vec(self, v: Any, dtype: np.dtype) -> Any:
        return self.xp.ascontiguousarray(v, dtype=dtype)

    @staticmethod
    def _cdt(*dtypes: Any) -> np.dtype:
        # float64 storage always computes in float64 (no float kernels for it).
        return _F64 if any(np.dtype(d) == _F64 for d in dtypes) else np.dtype(np.float32)

    # -- primitives --------------------------------------------------------
    @_on_input_device
    def moments(self, x: Any, channel_last: bool, cdt: Any) -> tuple[Any, Any]:
        """Local per-channel mean and M2 (float64), Welford + Chan merges."""
        cp = self.xp
        x = cp.ascontiguousarray(x)
        adt = self._cdt(cdt, x.dtype)
        t, a = ks.storage_type(x.dtype), ks.accum_type(adt)
        c = int(x.shape[-1] if channel_last else x.shape[1])
        mean = cp.empty(c, dtype=_F64)
        m2 = cp.empty(c, dtype=_F64)
        if x.size == 0:
            mean.fill(0)
            m2.fill(0)
            return mean, m2
        if channel_last:
            m = int(x.shape[0])
            bdx, bdy, gx, g = self._cl_grid(m, c)
            pc, pm, pq = cp.empty(c * g, _I64), cp.empty(c * g, adt), cp.empty(c * g, adt)
            self._kernel("stats.cu", ks.stats_partial(t, a, True))(
                (gx, g), (bdx, bdy), (x, np.int64(m), np.int64(c), pc, pm, pq)
            )
        else:
            n, s = int(x.shape[0]), int(x.shape[2])
            bdx, bdy, gsx, gsy = self._cf_grid(n, c, s)
            g = gsx * gsy
            pc, pm, pq = cp.empty(c * g, _I64), cp.empty(c * g, adt), cp.empty(c * g, adt)
            self._kernel("stats.cu", ks.stats_partial(t, a, False))(
                (g, min(c, _MAX_GRID_YZ)), (bdx, bdy),
                (x, np.int64(n), np.int64(c), np.int64(s), np.int32(gsx), np.int32(gsy),
                 pc, pm, pq),
            )
        self._kernel("stats.cu", ks.stats_finalize(a))(
            (min(c, _MAX_GRID_YZ),), (self._finalize_threads(g),),
            (pc, pm, pq, np.int64(c), np.int32(g), mean, m2),
        )
        return mean, m2

    @_on_input_device
    def normalize(
        self, x: Any, channel_last: bool, mean: Any, scale: Any, bias: Any, out_dtype: Any,
        relu: bool = False,
        exact: bool = False,
    ) -> Any:
        """``(x - mean) * scale + bias`` (subtract first), cast to ``out_dtype``.

        ``relu``: values ``<= 0`` written as 0 (NaN kept), in the same kernel.
        ``exact``: without multiply-add contraction (the reproducible mode's bits).
        """
        cp = self.xp
        x = cp.ascontiguousarray(x)
        adt = self._cdt(mean.dtype, x.dtype)
        t, a = ks.storage_type(x.dtype), ks.accum_type(adt)
        y = cp.empty(x.shape, dtype=x.dtype)
        if x.size:
            c, s = self._cs(x, channel_last)
            blocks, it, ity = self._elemt_launch(x.size)
            self._kernel("elementwise.cu", ks.normalize(t, a, it), exact)(
                (blocks,), (_THREADS,),
                (x, y, ity(x.size), ity(c), ity(s),
                 self._vec(mean, adt), self._vec(scale, adt), self._vec(bias, adt),
                 np.int32(bool(relu))),
            )
        return y if y.dtype == np.dtype(out_dtype) else y.astype(out_dtype)

    @_on_input_device
    def backward_reduce(
        self, dy: Any, x: Any, channel_last: bool, mean: Any, invstd: Any,
        relu: tuple | None = None,
    ) -> tuple[Any, Any]:
        """Local ``sum(dy)`` and ``sum(dy * (x - mean)) * invstd`` (float64)."""
        cp = self.xp
        x = cp.ascontiguousarray(x)
        dy = cp.ascontiguousarray(dy, dtype=x.dtype)
        adt = self._cdt(mean.dtype, x.dtype)
        t, a = ks.storage_type(x.dtype), ks.accum_type(adt)
        c, _ = self._cs(x, channel_last)
        sum_dy = cp.empty(c, dtype=_F64)
        sum_dy_xhat = cp.empty(c, dtype=_F64)
        if x.size == 0:
            sum_dy.fill(0)
            sum_dy_xhat.fill(0)
            return sum_dy, sum_dy_xhat
        mean_v = self._vec(mean, adt)
        act = self._act(relu, adt)
        if channel_last:
            m = int(x.shape[0])
            bdx, bdy, gx, g = self._cl_grid(m, c)
            p1, p2 = cp.empty(c * g, adt), cp.empty(c * g, adt)
            self._kernel("backward.cu", ks.bwd_partial(t, a, True))(
                (gx, g), (bdx, bdy), (dy, x, np.int64(m), np.int64(c), mean_v, *act, p1, p2)
            )
        else:
            n, s = int(x.shape[0]), int(x.shape[2])
            bdx, bdy, gsx, gsy = self._cf_grid(n, c, s)
            g = gsx * gsy
            p1, p2 = cp.empty(c * g, adt), cp.empty(c * g, adt)
            self._kernel("backward.cu", ks.bwd_partial(t, a, False))(
                (g, min(c, _MAX_GRID_YZ)), (bdx, bdy),
                (dy, x, np.int64(n), np.int64(c), np.int64(s), np.int32(gsx), np.int32(gsy),
                 mean_v, *act, p1, p2),
            )
        self._kernel("backward.cu", ks.bwd_finalize(a))(
            (min(c, _MAX_GRID_YZ),), (self._finalize_threads(g),),
            (p1, p2, np.int64(c), np.int32(g), self._vec(invstd, adt), sum_dy, sum_dy_xhat),
        )
        return sum_dy, sum_dy_xhat

    @_on_input_device
    def backward_elemt(
        self,
        dy: Any,
        x: Any,
        channel_last: bool,
        mean: Any,
        a: Any,
        mean_dy: Any,
        b: Any,
        out_dtype: Any,
        relu: tuple | None = None,
        exact: bool = False,
    ) -> Any:
        """``a * (dy - mean_dy) - b * (x - mean)``, cast to ``out_dtype``.

        ``relu=(scale, bias)``: ``dy`` masked where the forward's output was
        ``<= 0``. ``exact``: without multiply-add contraction (the
        reproducible mode's bits).
        """
        cp = self.xp
        x = cp.ascontiguousarray(x)
        dy = cp.ascontiguousarray(dy, dtype=x.dtype)
        adt = self._cdt(mean.dtype, x.dtype)
        t, acc = ks.storage_type(x.dtype), ks.accum_type(adt)
        dx = cp.empty(x.shape, dtype=x.dtype)
        if x.size:
            c, s = self._cs(x, channel_last)
            blocks, it, ity = self._elemt_launch(x.size)
            self._kernel("elementwise.cu", ks.backward_elemt(t, acc, it), exact)(
                (blocks,), (_THREADS,),
                (dy, x, dx, ity(x.size), ity(c), ity(s), self._vec(mean, adt),
                 self._vec(a, adt), self._vec(mean_dy, adt), self._vec(b, adt),
                 *self._act(relu, adt)),
            )
        return dx if dx.dtype == np.dtype(out_dtype) else dx.astype(out_dtype)

    # -- the reproducible mode's data passes (kernels/exact.cu) ---------------
    # CUDA ports of cupysyncbn.backends.exact_sums (absmax, moment_folds,
    # backward_bounds, backward_folds), bit for bit: per-block partials
    # merged here by a max or an exact sum (any order gives the same bits).

    def _exact_launch(self, kind: str, x: Any, channel_last: bool, q: int,
                      args: tuple) -> Any:
        """Launch ``kind`` over ``x``; the ``[q, C]`` partials merged over blocks."""
        cp = self.xp
        t = ks.storage_type(x.dtype)
        c = int(x.shape[-1] if channel_last else x.shape[1])
        threads = min(_THREADS, _EXACT_THREADS)
        if channel_last:
            m = int(x.shape[0])
            gx = _cdiv(c, 32)
            g = max(1, min(_cdiv(self._sm_count() * _BLOCKS_PER_SM, gx), _cdiv(m, 8 * 16),
                           _MAX_GRID_YZ))
            out = cp.empty(q * c * g, dtype=_F64)
            self._kernel("exact.cu", ks.exact(kind, t, True))(
                (gx, g), (32, 8), (*args[:-1], np.int64(m), np.int64(c), *args[-1], out))
        else:
            n, s = int(x.shape[0]), int(x.shape[2])
            per_channel = _cdiv(self._sm_count() * _BLOCKS_PER_SM, c)
            g = max(1, min(per_channel, _cdiv(n * s, threads * _MIN_PER_THREAD), _MAX_GRID_YZ))
            out = cp.empty(q * c * g, dtype=_F64)
            self._kernel("exact.cu", ks.exact(kind, t, False))(
                (g, min(c, _MAX_GRID_YZ)), (threads,),
                (*args[:-1], np.int64(n), np.int64(c), np.int64(s), *args[-1], out))
        return out.reshape(q, c, g)

    def _exact_scales(self, e: Any) -> Any:
        """``[2, C]``: ``exact_sums.scale_factors`` per channel (computed on the host)."""
        host = self.xp.asnumpy(e) if isinstance(e, self.xp.ndarray) else np.asarray(e)
        return self.xp.asarray(np.stack(exact_sums.scale_factors(host.astype(_F64))))

    def _sigmas(self, k_folds: int) -> Any:
        return self.xp.asarray(np.array(exact_sums.sigmas(k_folds), dtype=_F64))

    @_on_input_device
    def exact_absmax(self, v: Any, channel_last: bool) -> Any:
        """Local ``max|v|`` per channel (float64, NaN-propagating); ``exact_sums.absmax``."""
        v = self.xp.ascontiguousarray(v)
        return self._exact_launch("bn_exact_absmax", v, channel_last, 1, (v, ())).max(
            axis=2)[0]

    @_on_input_device
    def exact_moment_folds(
        self, v: Any, channel_last: bool, e: Any, k_folds: int
    ) -> tuple[Any, Any]:
        """Local folds ``(P1, P2)`` (K x C each); ``exact_sums.moment_folds``."""
        if not 1 <= k_folds <= _MAX_FOLDS:
            raise ValueError(f"k_folds must be in [1, {_MAX_FOLDS}]; got {k_folds}")
        v = self.xp.ascontiguousarray(v)
        sc = self._exact_scales(e)
        split = np.int32(np.dtype(v.dtype).itemsize >= 8)
        p = self._exact_launch("bn_exact_folds", v, channel_last, 2 * k_folds, (
            v, (sc[0], sc[1], self._sigmas(k_folds), np.int32(k_folds), split))).sum(axis=2)
        return p[:k_folds], p[k_folds:]

    @_on_input_device
    def exact_backward_bounds(
        self, dy: Any, x: Any, channel_last: bool, mean: Any
    ) -> tuple[Any, Any]:
        """Local ``max|g|``, ``max|h|`` per channel; ``exact_sums.backward_bounds``."""
        cp = self.xp
        x = cp.ascontiguousarray(x)
        dy = cp.ascontiguousarray(dy, dtype=x.dtype)
        mu = cp.ascontiguousarray(mean, dtype=_F64)
        m = self._exact_launch("bn_exact_bwd_absmax", x, channel_last, 2,
                               (dy, x, (mu,))).max(axis=2)
        return m[0], m[1]

    @_on_input_device
    def exact_backward_folds(
        self, dy: Any, x: Any, channel_last: bool, mean: Any, e_g: Any, e_h: Any,
        k_folds: int,
    ) -> tuple[Any, Any]:
        """Local folds ``(Pg, Ph)`` (K x C each); ``exact_sums.backward_folds``."""
        if not 1 <= k_folds <= _MAX_FOLDS:
            raise ValueError(f"k_folds must be in [1, {_MAX_FOLDS}]; got {k_folds}")
        cp = self.xp
        x = cp.ascontiguousarray(x)
        dy = cp.ascontiguousarray(dy, dtype=x.dtype)
        mu = cp.ascontiguousarray(mean, dtype=_F64)
        p = self._exact_launch("bn_exact_bwd_folds", x, channel_last, 2 * k_folds, (
            dy, x, (mu, self._exact_scales(e_g), self._exact_scales(e_h),
                    self._sigmas(k_folds), np.int32(k_folds)))).sum(axis=2)
        return p[:k_folds], p[k_folds:]

    @staticmethod
    def _sample_rows_grid(rows: int) -> int:
        """Blocks of a channel-first per-sample kernel: 8 rows of 16 lanes per block."""
        return max(1, min(_cdiv(rows, 8), 1 << 20))

    @_on_input_device
    def exact_sample_moments(self, v: Any, channel_last: bool, samples: int) -> Any:
        """Per-sample ``[3, N, C]`` (shift, a, b); ``exact_samples.sample_moments``."""
        cp = self.xp
        v = cp.ascontiguousarray(v)
        t = ks.storage_type(v.dtype)
        c = int(v.shape[1])
        out = cp.empty(3 * samples * c, dtype=_F64)
        if channel_last:
            s = int(v.shape[0]) // samples
            self._kernel("exact.cu", ks.exact_sample(t, True))(
                (_cdiv(c, 128), min(samples, _MAX_GRID_YZ)), (128,),
                (v, np.int64(samples), np.int64(s), np.int64(c), out))
        else:
            s = int(v.shape[2])
            self._kernel("exact.cu", ks.exact_sample(t, False))(
                (self._sample_rows_grid(samples * c),), (128,),
                (v, np.int64(samples), np.int64(c), np.int64(s), out))
        return out.reshape(3, samples, c)

    @_on_input_device
    def exact_sample_backward(
        self, dy: Any, x: Any, channel_last: bool, mean: Any, samples: int
    ) -> Any:
        """Per-sample ``[2, N, C]`` (g, h); ``exact_samples.sample_backward``."""
        cp = self.xp
        x = cp.ascontiguousarray(x)
        dy = cp.ascontiguousarray(dy, dtype=x.dtype)
        mu = cp.ascontiguousarray(mean)
        t = ks.storage_type(x.dtype)
        a = "double" if np.dtype(mu.dtype) == np.float64 else "float"
        c = int(x.shape[1])
        out = cp.empty(2 * samples * c, dtype=_F64)
        if channel_last:
            s = int(x.shape[0]) // samples
            self._kernel("exact.cu", ks.exact_sample(t, True, a))(
                (_cdiv(c, 128), min(samples, _MAX_GRID_YZ)), (128,),
                (dy, x, mu, np.int64(samples), np.int64(s), np.int64(c), out))
        else:
            s = int(x.shape[2])
            self._kernel("exact.cu", ks.exact_sample(t, False, a))(
                (self._sample_rows_grid(samples * c),), (128,),
                (dy, x, mu, np.int64(samples), np.int64(c), np.int64(s), out))
        return out.reshape(2, samples, c)

    # -- fused synchronized passes (see kernels/fused.cu) ---------------------
    #: Has the fused primitives below: functional runs a training pass as
    #: 3 launches + 1 all-reduce with no host synchronization.
    fused = True

    def _act(self, relu: tuple | None, adt: np.dtype) -> tuple:
        """The kernels' ``act_scale, act_bias``: the ReLU's vectors, or two NULLs."""
        if relu is None:
            return self._ptr(None), self._ptr(None)
        return self._vec(relu[0], adt), self._vec(relu[1], adt)

    @staticmethod
    def _ptr(a: Any) -> Any:
        # NULL for an absent vector (the kernels test the pointer).
        return _NULL if a is None else a

    @staticmethod
    def _address(a: Any) -> int:
        return int(a.data.ptr)

    def _aligned16(self, *arrays: Any) -> bool:
        return all(self._address(a) % 16 == 0 for a in arrays)

    @staticmethod
    def _channel_threads(c: int) -> tuple[tuple, tuple]:
        return (max(1, _cdiv(c, _THREADS)),), (min(_THREADS, 32 * _cdiv(max(c, 1), 32)),)

    def _launch(self, key: tuple, make: Any) -> Any:
        """What ``make()`` computes for a launch (kernel, grid, block, layout), once per key.

        The fused primitives run once per pass with the same shapes and
        dtypes: the kernel handle, its C++ type names and the launch shape
        are looked up once per current device and ``key``, not per pass.
        """
        dev = self.xp.cuda.Device().id
        k = (dev, *key)
        hit = self._launches.get(k)
        if hit is None:
            if len(self._launches) >= 4096:  # inputs of ever new shapes: stay bounded
                self._launches.clear()
            hit = self._launches[k] = make()
        return hit

    def stats_partials(
        self, x: Any, channel_last: bool, cdt: Any, workspace: Any
    ) -> tuple[tuple, int]:
        """Launch the statistics partial kernel into ``workspace``; ``(partials, G)``.

        ``workspace(key, size, dtype)`` returns a reusable array (a layer's).
        """
        kernel, grid, block, layout, c, g, adt = self._launch(
            ("stats", x.shape, x.dtype, channel_last, cdt),
            lambda: self._reduce_launch(x, channel_last, cdt, "stats.cu", ks.stats_partial))
        parts = (workspace("pc", c * g, _I64), workspace("pm", c * g, adt),
                 workspace("pq", c * g, adt))
        kernel(grid, block, (x, *layout, *parts))
        return parts, g

    def _reduce_launch(self, x: Any, channel_last: bool, cdt: Any, file: str,
                       name: Any) -> tuple:
        """``(kernel, grid, block, layout, C, G, compute dtype)`` of a partial reduction."""
        adt = self._cdt(cdt, x.dtype)
        t, a = ks.storage_type(x.dtype), ks.accum_type(adt)
        c = int(x.shape[-1] if channel_last else x.shape[1])
        if channel_last:
            m = int(x.shape[0])
            bdx, bdy, gx, g = self._cl_grid(m, c)
            grid, layout = (gx, g), (np.int64(m), np.int64(c))  # type: tuple, tuple
        else:
            n, s = int(x.shape[0]), int(x.shape[2])
            bdx, bdy, gsx, gsy = self._cf_grid(n, c, s)
            g = gsx * gsy
            grid = (g, min(c, _MAX_GRID_YZ))
            layout = (np.int64(n), np.int64(c), np.int64(s), np.int32(gsx), np.int32(gsy))
        return self._kernel(file, name(t, a, channel_last)), grid, (bdx, bdy), layout, c, g, adt

    def fwd_pack(
        self, parts: tuple | None, g: int, c: int, adt: Any, mode: int, shift_next: Any,
        shift_used: Any, meanbuf: Any, buf: Any, status: Any, size: int, header: tuple,
        nbt: Any = None,
    ) -> None:
        """Merge partials, write header + shifted sums into ``buf`` (kernels/fused.cu).

        ``header`` is ``(count, phase, error_index, num_features, layer, call,
        ident, evals)`` (:mod:`cupysyncbn.protocol`).
        """
        count, phase, err, nf, layer, call, ident, evals = header
        if parts is None:
            parts, g = (None, None, None), 0
        kernel, grid, block = self._launch(
            ("fwd_pack", c, adt),
            lambda: (self._kernel("fused.cu", ks.fwd_pack(ks.accum_type(adt))),
                     *self._channel_threads(c)))
        p0, p1, p2 = parts
        n = _NULL  # absent vectors (inline: this runs once per pass)
        kernel(
            grid, block,
            (n if p0 is None else p0, n if p1 is None else p1, n if p2 is None else p2,
             np.int64(c), np.int32(g), np.int32(mode),
             n if shift_next is None else shift_next, n if shift_used is None else shift_used,
             n if meanbuf is None else meanbuf, buf, status, n if nbt is None else nbt,
             np.float64(size), np.int64(count), np.int32(phase), np.int32(err), np.int64(nf),
             np.int64(layer), np.int64(call), np.int64(ident), np.int64(evals)),
        )

    def _elemt_grid(self, x: Any, channel_last: bool, *arrays: Any) -> tuple:
        """Grid, block and layout arguments of a fused elementwise kernel."""
        grid, block, layout = self._launch(
            ("elemt", x.shape, x.dtype.itemsize, channel_last),
            lambda: self._elemt_shape(x, channel_last))
        if channel_last:  # vector loads: a property of the addresses, per pass
            v = 16 // x.dtype.itemsize
            vec = int(x.shape[1]) % v == 0 and self._aligned16(x, *arrays)
            layout = (*layout, np.int32(vec))
        return grid, block, layout

    def _elemt_shape(self, x: Any, channel_last: bool) -> tuple:
        """:meth:`_elemt_grid` but the channel-last vector flag (addresses)."""
        v = 16 // x.dtype.itemsize
        target = self._sm_count() * 32
        if channel_last:
            m, c = int(x.shape[0]), int(x.shape[1])
            gx = max(1, _cdiv(_cdiv(c, v), 32))
            gy = max(1, min(_cdiv(m, 8), _MAX_GRID_YZ, _cdiv(target, gx)))
            return (gx, gy), (32, 8), (np.int64(m), np.int64(c))
        n, c, s = (int(d) for d in x.shape)
        bx = min(_THREADS, max(32, _next_pow2(_cdiv(s, v))))
        by = _THREADS // bx  # rows per block: short rows share a block
        gy = max(1, min(_cdiv(_cdiv(s, v), bx), _MAX_GRID_YZ))
        gx = max(1, min(_cdiv(n * c, by), max(1, _cdiv(target, gy)), 2**31 - 1))
        return (gx, gy), (bx, by), (np.int64(n * c), np.int64(c), np.int64(s))

    def fwd_norm(
        self, x: Any, y: Any, channel_last: bool, c: int, buf: Any, shift_used: Any,
        shift_next: Any, vectors: tuple, out_vectors: tuple, stats64: Any, statc: Any,
        status: Any, eps: float, keep: float, factor: float, flags: int, size: int,
        pdt: Any, nbt: Any = None,
    ) -> None:
        """Fused finalize + normalize: ``y`` from ``x`` and the reduced ``buf``.

        ``vectors`` = ``(weight, bias, running_mean, running_var)`` (None for
        absent ones), ``out_vectors`` = new running mean/var (may be the
        inputs: updated in place). Writes the saved statistics ``stats64``
        (mean, var, count; float64) and ``statc`` (mean, invstd; compute dtype).
        ``nbt`` (``[before, after]``, float64): momentum=None's batch count on
        the device; the kernel takes the averaging factor from it.
        """
        kernel = self._launch(
            ("fwd_norm", x.dtype, statc.dtype, pdt, channel_last),
            lambda: self._kernel("fused.cu", ks.fwd_norm(
                ks.storage_type(x.dtype), ks.accum_type(statc.dtype), ks.accum_type(pdt),
                channel_last)))
        if x.size:
            grid, block, layout = self._elemt_grid(x, channel_last, y)
        else:
            grid, block = self._channel_threads(c)
            layout = (np.int64(0), np.int64(c), np.int32(0) if channel_last else np.int64(1))
        w, b, rm, rv = vectors
        orm, orv = out_vectors
        n = _NULL  # absent vectors (inline: this runs once per pass)
        kernel(
            grid, block,
            (x, y, *layout, n if buf is None else buf, n if shift_used is None else shift_used,
             n if shift_next is None else shift_next, n if w is None else w,
             n if b is None else b, n if rm is None else rm, n if rv is None else rv,
             n if orm is None else orm, n if orv is None else orv, stats64, statc,
             n if status is None else status, n if nbt is None else nbt, np.float64(eps),
             np.float64(keep), np.float64(factor), np.int32(flags), np.float64(size)),
        )

    def bwd_partials(
        self, dy: Any, x: Any, channel_last: bool, mean: Any, workspace: Any,
        act: tuple | None = None,
    ) -> tuple[tuple, int]:
        """Launch the backward partial kernel into ``workspace``; ``(partials, G)``.

        ``act``: the fused ReLU's ``(scale, bias)`` (compute dtype, as the
        forward saved them) to mask ``dy`` with, or None.
        """
        kernel, grid, block, layout, c, g, adt = self._launch(
            ("bwd", x.shape, x.dtype, channel_last, mean.dtype),
            lambda: self._reduce_launch(x, channel_last, mean.dtype, "backward.cu",
                                        ks.bwd_partial))
        parts = (workspace("p1", c * g, adt), workspace("p2", c * g, adt))
        acts = (_NULL,) * 2 if act is None else act
        kernel(grid, block, (dy, x, *layout, mean, *acts, *parts))
        return parts, g

    def bwd_pack(
        self, parts: tuple | None, g: int, c: int, statc: Any, buf: Any, dweight: Any,
        dbias: Any, accumulate: bool, header: tuple, pdt: Any,
    ) -> None:
        """Merge backward partials, pack header + global-sum payload, local grads."""
        count, phase, err, nf, layer, call, ident, evals = header
        if parts is None:
            parts, g = (None, None), 0
        kernel, grid, block = self._launch(
            ("bwd_pack", c, statc.dtype, pdt),
            lambda: (self._kernel("fused.cu", ks.bwd_pack(ks.accum_type(statc.dtype),
                                                          ks.accum_type(pdt))),
                     *self._channel_threads(c)))
        q0, q1 = parts
        n = _NULL  # absent vectors (inline: this runs once per pass)
        kernel(
            grid, block,
            (n if q0 is None else q0, n if q1 is None else q1, np.int64(c), np.int32(g), statc,
             buf, n if dweight is None else dweight, n if dbias is None else dbias,
             np.int32(32 if accumulate else 0), np.int64(count), np.int32(phase),
             np.int32(err), np.int64(nf), np.int64(layer), np.int64(call), np.int64(ident),
             np.int64(evals)),
        )

    def bwd_elemt(
        self, dy: Any, x: Any, dx: Any, channel_last: bool, buf: Any, stats64: Any,
        statc: Any, weight: Any, status: Any, flags: int, size: int, pdt: Any,
    ) -> None:
        """Fused backward coefficients + ``dx`` (kernels/fused.cu)."""
        kernel = self._launch(
            ("bwd_elemt", x.dtype, statc.dtype, pdt, channel_last),
            lambda: self._kernel("fused.cu", ks.bwd_elemt(
                ks.storage_type(x.dtype), ks.accum_type(statc.dtype), ks.accum_type(pdt),
                channel_last)))
        grid, block, layout = self._elemt_grid(x, channel_last, dy, dx)
        n = _NULL
        kernel(
            grid, block,
            (dy, x, dx, *layout, n if buf is None else buf, stats64, statc,
             n if weight is None else weight, n if status is None else status, np.int32(flags),
             np.float64(size)),
        )

    @staticmethod
    def _cs(x: Any, channel_last: bool) -> tuple[int, int]:
        # (C, S) of a canonical array; S = 1 makes (i / S) % C the channel-last rule.
        if channel_last:
            return int(x.shape[1]), 1
        return int(x.shape[1]), int(x.shape[2])


@lru_cache(maxsize=1)
def get_cupy_backend() -> CupyBackend:
    """The process-wide CuPy backend (kernels are compiled once and cached)."""
    return CupyBackend()
