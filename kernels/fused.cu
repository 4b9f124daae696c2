// The synchronized passes' per-channel math on the device, fused into the
// launches around the one all-reduce (no host round trip, no CuPy ops):
//
//   forward:  bn_stats_partial_* (stats.cu)  ->  bn_fwd_pack  ->  all-reduce
//             ->  bn_fwd_norm_{cf,cl}   (merge, invstd/scale/bias, running
//                 statistics, next shift, header check, y)
//   backward: bn_bwd_partial_* (backward.cu) ->  bn_bwd_pack  ->  all-reduce
//             ->  bn_bwd_elemt_{cf,cl}  (coefficients, header check, dx)
//   eval:     bn_fwd_norm_* alone (running statistics); bn_bwd_elemt_* alone.
//
// All per-channel math is float64 as on the host path, then cast to the
// compute type A exactly where the unfused pass (_sync/passes.py) casts. The reduced header is
// checked on the device and a bad verdict is latched into `status` (flag,
// phase, copy of the header), which the host reads asynchronously and turns
// into the same exception protocol.check_header raises.
//
// Elementwise kernels: channel-first (N*C rows, S) runs a 2-D grid (rows in
// x with a grid-stride loop, S chunks in y): the channel is `row % C` once
// per row, never per element. Channel-last (M, C) gives each thread V
// adjacent channels and loops over rows. Rows whose pointers are 16-byte
// aligned use 16-byte vector loads/stores (V = 16 / sizeof(T)).
//
// Templates: T storage type, A compute type, P parameter/running-stat type.
#include "common.cuh"

// Header slots: the order of protocol._SLOTS (a test checks they agree).
#define SBN_H_COUNT 0
#define SBN_H_ONE 1
#define SBN_H_NF 2
#define SBN_H_NF_SQ 3
#define SBN_H_LAYER 4
#define SBN_H_LAYER_SQ 5
#define SBN_H_CALL 6
#define SBN_H_CALL_SQ 7
#define SBN_H_PHASE0 8
#define SBN_N_PHASES 4
#define SBN_H_ERR0 12
#define SBN_N_ERRORS 8
#define SBN_H_IDENT 20  // layer identity (construction order, dtype) and its square
#define SBN_H_EVALS 22  // eval forwards of the layer so far and its square
#define SBN_HEADER 24

// status: [flag, phase, header (SBN_HEADER)]; flag 0 ok, 1 header verdict, 2
// unbiased running variance with a global count of 1, 3 batch statistics over
// a global count of 1 (SPEC §2: an error in training; the host raises it).
#define SBN_STATUS_SIZE (2 + SBN_HEADER)

// Flags of bn_fwd_norm_* / bn_bwd_elemt_*.
#define SBN_F_TRAIN 1        // batch statistics from buf (else running stats)
#define SBN_F_UPDATE 2       // update the running statistics
#define SBN_F_UNBIASED 4     // unbiased running variance
#define SBN_F_CHECK 8        // check buf's header (a synchronized pass)
#define SBN_F_SHIFT 16       // store the next pass's shift
#define SBN_F_ACCUMULATE 32  // bn_bwd_pack: add the local sums to dweight/dbias
// act="relu": bn_fwd_norm_* writes max(y, 0) and saves the ReLU's scale and
// bias in statc[2C:4C]; bn_bwd_elemt_* masks dy with them (common.cuh
// relu_keep), as bn_bwd_partial_* does given the same two vectors.
#define SBN_F_RELU 64

namespace sbn {

__device__ __forceinline__ float sqrt_(float v) { return sqrtf(v); }
__device__ __forceinline__ double sqrt_(double v) { return sqrt(v); }

// max(v, 0) that keeps NaN (NumPy's maximum), unlike fmax.
__device__ __forceinline__ double clamp0(double v) { return v < 0.0 ? 0.0 : v; }

__device__ __forceinline__ bool finite(double v) { return v - v == 0.0; }

__device__ __forceinline__ bool same_(const double* h, int slot, double size) {
  return h[slot + 1] * size == h[slot] * h[slot];
}

// protocol._mismatch or any error slot set.
__device__ __forceinline__ bool header_bad(const double* h, int phase, double size) {
  if (h[SBN_H_ONE] != size) return true;
  if (h[SBN_H_PHASE0 + phase] != size) return true;
  if (!same_(h, SBN_H_NF, size) || !same_(h, SBN_H_LAYER, size) ||
      !same_(h, SBN_H_CALL, size) || !same_(h, SBN_H_IDENT, size) ||
      !same_(h, SBN_H_EVALS, size)) {
    return true;
  }
  for (int k = 0; k < SBN_N_ERRORS; ++k) {
    if (h[SBN_H_ERR0 + k] != 0.0) return true;
  }
  return false;
}

// Keep the first verdict until the host has read it.
__device__ __forceinline__ void latch(double* status, double flag, int phase, const double* h) {
  if (status[0] != 0.0) return;
  status[1] = phase;
  for (int k = 0; k < SBN_HEADER; ++k) status[2 + k] = h ? h[k] : 0.0;
  status[0] = flag;
}

__device__ __forceinline__ void check(const double* h, int phase, double size, double* status) {
  if (header_bad(h, phase, size)) latch(status, 1.0, phase, h);
}

template <typename T, int V>
struct alignas(sizeof(T) * V) Vec {
  T v[V];
};

template <typename T>
struct VecWidth {
  static const int value = 16 / sizeof(T);
};

__device__ __forceinline__ bool aligned16(const void* p) {
  return (reinterpret_cast<unsigned long long>(p) & 15ull) == 0;
}

__device__ __forceinline__ i64 global_thread() {
  const i64 block = (i64)blockIdx.y * gridDim.x + blockIdx.x;
  return block * blockDim.x * blockDim.y + (i64)threadIdx.y * blockDim.x + threadIdx.x;
}

__device__ __forceinline__ i64 global_threads() {
  return (i64)gridDim.x * gridDim.y * blockDim.x * blockDim.y;
}

// Forward per-channel coefficients: y = (x - mean) * scale + bias.
template <typename A, typename P>
struct FwdCoef {
  A mean, scale, bias;
  double mean64, var64;
  A invstd;
};

template <typename A, typename P>
__device__ __forceinline__ FwdCoef<A, P> fwd_coef(i64 c, i64 C, int flags, const double* buf,
                                                  const double* shift_used, const P* weight,
                                                  const P* bias, const P* rmean, const P* rvar,
                                                  double eps) {
  FwdCoef<A, P> k;
  if (flags & SBN_F_TRAIN) {
    const double n = buf[SBN_H_COUNT];
    if (n > 0) {
      const double s = buf[SBN_HEADER + c];
      const double q = buf[SBN_HEADER + C + c];
      k.mean64 = shift_used[c] + s / n;
      k.var64 = clamp0((q - s * s / n) / n);
      k.mean = static_cast<A>(k.mean64);
      // var + eps == 0 (epsilon=0, constant channel): normalized value 0, so
      // y = bias and dx = 0 instead of 0 * inf = NaN (finite in, finite out)
      const double ve = k.var64 + eps;
      k.invstd = ve == 0.0 ? A(0) : static_cast<A>(1.0 / sqrt(ve));
    } else {  // empty global batch: nothing to normalize, no inf
      k.mean64 = 0.0;
      k.var64 = 0.0;
      k.mean = A(0);
      k.invstd = A(0);
    }
  } else {
    k.mean64 = static_cast<double>(rmean[c]);
    k.var64 = static_cast<double>(rvar[c]);
    k.mean = static_cast<A>(rmean[c]);
    const A ve = static_cast<A>(rvar[c]) + static_cast<A>(eps);
    k.invstd = ve == A(0) ? A(0) : A(1) / sqrt_(ve);
  }
  k.scale = weight ? k.invstd * static_cast<A>(weight[c]) : k.invstd;
  k.bias = bias ? static_cast<A>(bias[c]) : A(0);
  return k;
}

// The once-per-channel side effects of a forward.
template <typename A, typename P>
__device__ __forceinline__ void fwd_channel(i64 C, int flags, const double* buf,
                                            const double* shift_used, double* shift_next,
                                            const P* weight, const P* bias, const P* rmean,
                                            const P* rvar, P* rmean_out, P* rvar_out,
                                            double* stats64, A* statc, double* status,
                                            double* nbt, double eps, double keep, double factor,
                                            double size) {
  const i64 start = global_thread();
  const i64 step = global_threads();
  if (start == 0) {
    if (flags & SBN_F_CHECK) check(buf, 2, size, status);
    stats64[2 * C] = (flags & SBN_F_TRAIN) ? buf[SBN_H_COUNT] : 0.0;
  }
  const double n = (flags & SBN_F_TRAIN) ? buf[SBN_H_COUNT] : 0.0;
  // A global count of 1 with batch statistics is an error (every rank sees
  // the same reduced count): nothing is updated, and the verdict is latched
  // for the host to raise at the layer's next pass or check_errors().
  const bool count_one = (flags & SBN_F_TRAIN) && n == 1.0;
  if (start == 0 && count_one) {
    latch(status, ((flags & SBN_F_UPDATE) && (flags & SBN_F_UNBIASED)) ? 2.0 : 3.0, 2,
          (const double*)0);
  }
  if (nbt) {  // momentum=None: average over the batches the device counted
    factor = 1.0 / (nbt[0] + 1.0);
    keep = 1.0 - factor;
    if (start == 0) nbt[1] = nbt[0] + ((flags & SBN_F_UPDATE) && n > 0 && !count_one);
  }
  for (i64 c = start; c < C; c += step) {
    FwdCoef<A, P> k = fwd_coef<A, P>(c, C, flags, buf, shift_used, weight, bias, rmean, rvar, eps);
    stats64[c] = k.mean64;
    stats64[C + c] = k.var64;
    statc[c] = k.mean;
    statc[C + c] = k.invstd;
    if (flags & SBN_F_RELU) {
      statc[2 * C + c] = k.scale;
      statc[3 * C + c] = k.bias;
    }
    if (!(flags & SBN_F_TRAIN)) continue;
    if ((flags & SBN_F_SHIFT) && n > 0) {
      // A NaN/Inf mean must not become every later pass's shift.
      shift_next[c] = finite(k.mean64) ? k.mean64 : 0.0;
    }
    if (!(flags & SBN_F_UPDATE)) continue;
    if (n > 0 && !count_one) {
      double v = k.var64;
      if (flags & SBN_F_UNBIASED) v = v * (n / (n - 1.0));
      const P kp = static_cast<P>(keep), fp = static_cast<P>(factor);
      rmean_out[c] = rmean[c] * kp + static_cast<P>(k.mean64) * fp;
      rvar_out[c] = rvar[c] * kp + static_cast<P>(v) * fp;
    } else {  // no update: the outputs keep the old values (a no-op in place)
      rmean_out[c] = rmean[c];
      rvar_out[c] = rvar[c];
    }
  }
}

}  // namespace sbn

// Merge the statistics partials of each channel (float64, Chan) and pack this
// rank's header and shifted sums into `buf`. One thread per channel.
//   mode 0: shift K = shift_next (steady state), copied to shift_used;
//   mode 1: the first pass's mean pass: S = n * mean, Q = 0;
//   mode 2: K = the mean pass's global mean (meanbuf, whose header is checked);
//   mode 3: K = the local mean (unsynchronized: S = 0, Q = M2).
// This rank's protocol header (cupysyncbn/_sync/protocol.py's slots), written by
// one thread of the pack kernels so the header needs no separate launch.
__device__ inline void write_header(double* __restrict__ buf, sbn::i64 count, int phase,
                                    int err, sbn::i64 nf, sbn::i64 layer, sbn::i64 call,
                                    sbn::i64 ident, sbn::i64 evals) {
  for (int k = 0; k < SBN_HEADER; ++k) buf[k] = 0.0;
  buf[SBN_H_COUNT] = (double)count;
  buf[SBN_H_ONE] = 1.0;
  const sbn::i64 eq[5] = {nf, layer, call, ident, evals};
  const int slot[5] = {SBN_H_NF, SBN_H_LAYER, SBN_H_CALL, SBN_H_IDENT, SBN_H_EVALS};
  for (int k = 0; k < 5; ++k) {  // value and its square: equality checks (protocol)
    buf[slot[k]] = (double)eq[k];
    buf[slot[k] + 1] = (double)eq[k] * (double)eq[k];
  }
  buf[SBN_H_PHASE0 + phase] = 1.0;
  if (err >= 0) buf[SBN_H_ERR0 + err] = 1.0;
}

template <typename A>
__global__ void bn_fwd_pack(const sbn::i64* __restrict__ pcount, const A* __restrict__ pmean,
                            const A* __restrict__ pm2, sbn::i64 C, int G, int mode,
                            const double* __restrict__ shift_next, double* __restrict__ shift_used,
                            const double* __restrict__ meanbuf, double* __restrict__ buf,
                            double* __restrict__ status, double* __restrict__ nbt, double size,
                            sbn::i64 count, int phase, int err, sbn::i64 nf, sbn::i64 layer,
                            sbn::i64 call, sbn::i64 ident, sbn::i64 evals) {
  const sbn::i64 start = sbn::global_thread();
  if (start == 0) {
    if (nbt) nbt[0] = nbt[1];  // batches tracked before this pass (momentum=None)
    write_header(buf, count, phase, err, nf, layer, call, ident, evals);
    if (mode == 2) sbn::check(meanbuf, 1, size, status);
  }
  for (sbn::i64 c = start; c < C; c += sbn::global_threads()) {
    sbn::Welford<double> w;
    for (int g = 0; g < G; ++g) {
      sbn::Welford<double> p;
      p.n = pcount[c * G + g];
      p.mean = static_cast<double>(pmean[c * G + g]);
      p.m2 = static_cast<double>(pm2[c * G + g]);
      w = sbn::chan_merge(w, p);
    }
    const double n = static_cast<double>(w.n);
    double s = 0.0, q = 0.0;
    if (mode == 1) {
      s = w.n ? w.mean * n : 0.0;
    } else {
      double k = 0.0;
      if (mode == 0) {
        k = shift_next[c];
      } else if (mode == 2) {
        const double total = meanbuf[SBN_H_COUNT];
        k = meanbuf[SBN_HEADER + c] / (total > 1.0 ? total : 1.0);
      } else if (w.n) {
        k = w.mean;
      }
      shift_used[c] = k;
      if (w.n) {
        const double d = w.mean - k;
        s = d * n;
        q = w.m2 + (d * d) * n;
      }
    }
    buf[SBN_HEADER + c] = s;
    buf[SBN_HEADER + C + c] = q;
  }
}

// Forward elementwise pass with the finalize fused in, channel-first
// (rows = N*C, each S long). grid = (row blocks, S chunks); block = (bx, by):
// bx threads along a row (at most 256), by rows per block, so short rows
// (late layers: S = 7 x 7) still keep every thread busy.
template <typename T, typename A, typename P>
__global__ void bn_fwd_norm_cf(const T* __restrict__ x, T* __restrict__ y, sbn::i64 NC,
                               sbn::i64 C, sbn::i64 S, const double* __restrict__ buf,
                               const double* __restrict__ shift_used,
                               double* __restrict__ shift_next, const P* __restrict__ weight,
                               const P* __restrict__ bias, const P* rmean, const P* rvar,
                               P* rmean_out, P* rvar_out, double* __restrict__ stats64,
                               A* __restrict__ statc, double* __restrict__ status, double* nbt,
                               double eps, double keep, double factor, int flags, double size) {
  sbn::fwd_channel<A, P>(C, flags, buf, shift_used, shift_next, weight, bias, rmean, rvar,
                         rmean_out, rvar_out, stats64, statc, status, nbt, eps, keep, factor,
                         size);
  const int V = sbn::VecWidth<T>::value;
  typedef sbn::Vec<T, V> VT;
  const bool relu = (flags & SBN_F_RELU) != 0;
  const sbn::i64 first = (sbn::i64)blockIdx.y * blockDim.x + threadIdx.x;
  const sbn::i64 step = (sbn::i64)gridDim.y * blockDim.x;
  const sbn::i64 row_step = (sbn::i64)gridDim.x * blockDim.y;
  for (sbn::i64 row = (sbn::i64)blockIdx.x * blockDim.y + threadIdx.y; row < NC;
       row += row_step) {
    const sbn::i64 c = row % C;  // once per row
    const sbn::FwdCoef<A, P> k =
        sbn::fwd_coef<A, P>(c, C, flags, buf, shift_used, weight, bias, rmean, rvar, eps);
    const T* xr = x + row * S;
    T* yr = y + row * S;
    sbn::i64 done = 0;
    if (sbn::aligned16(xr) && sbn::aligned16(yr)) {
      const sbn::i64 nv = S / V;
      for (sbn::i64 j = first; j < nv; j += step) {
        VT in = reinterpret_cast<const VT*>(xr)[j];
        VT out;
#pragma unroll
        for (int e = 0; e < V; ++e) {
          const A v = sbn::io<T>::template load<A>(in.v, e);
          sbn::io<T>::template store<A>(
              out.v, e, sbn::act_out<A>(sbn::affine<A>(v, k.mean, k.scale, k.bias), relu));
        }
        reinterpret_cast<VT*>(yr)[j] = out;
      }
      done = nv * V;
    }
    for (sbn::i64 s = done + first; s < S; s += step) {
      const A v = sbn::io<T>::template load<A>(xr, s);
      sbn::io<T>::template store<A>(
          yr, s, sbn::act_out<A>(sbn::affine<A>(v, k.mean, k.scale, k.bias), relu));
    }
  }
}

// Channel-last (M, C): thread (tx, ty) of block (bx, by) owns channels
// (bx * blockDim.x + tx) * V ... + V - 1 and rows by * blockDim.y + ty + k * step.
template <typename T, typename A, typename P>
__global__ void bn_fwd_norm_cl(const T* __restrict__ x, T* __restrict__ y, sbn::i64 M,
                               sbn::i64 C, int vec, const double* __restrict__ buf,
                               const double* __restrict__ shift_used,
                               double* __restrict__ shift_next, const P* __restrict__ weight,
                               const P* __restrict__ bias, const P* rmean, const P* rvar,
                               P* rmean_out, P* rvar_out, double* __restrict__ stats64,
                               A* __restrict__ statc, double* __restrict__ status, double* nbt,
                               double eps, double keep, double factor, int flags, double size) {
  sbn::fwd_channel<A, P>(C, flags, buf, shift_used, shift_next, weight, bias, rmean, rvar,
                         rmean_out, rvar_out, stats64, statc, status, nbt, eps, keep, factor,
                         size);
  const int V = sbn::VecWidth<T>::value;
  typedef sbn::Vec<T, V> VT;
  const bool relu = (flags & SBN_F_RELU) != 0;
  const sbn::i64 c0 = ((sbn::i64)blockIdx.x * blockDim.x + threadIdx.x) * V;
  if (c0 >= C) return;
  A mean[V], scale[V], bias_[V];
#pragma unroll
  for (int e = 0; e < V; ++e) {
    const sbn::i64 c = c0 + e < C ? c0 + e : C - 1;
    const sbn::FwdCoef<A, P> k =
        sbn::fwd_coef<A, P>(c, C, flags, buf, shift_used, weight, bias, rmean, rvar, eps);
    mean[e] = k.mean;
    scale[e] = k.scale;
    bias_[e] = k.bias;
  }
  const sbn::i64 step = (sbn::i64)gridDim.y * blockDim.y;
  for (sbn::i64 m = (sbn::i64)blockIdx.y * blockDim.y + threadIdx.y; m < M; m += step) {
    const sbn::i64 base = m * C + c0;
    if (vec) {  // C % V == 0 and 16-byte aligned x, y
      VT in = *reinterpret_cast<const VT*>(x + base);
      VT out;
#pragma unroll
      for (int e = 0; e < V; ++e) {
        const A v = sbn::io<T>::template load<A>(in.v, e);
        sbn::io<T>::template store<A>(
            out.v, e, sbn::act_out<A>(sbn::affine<A>(v, mean[e], scale[e], bias_[e]), relu));
      }
      *reinterpret_cast<VT*>(y + base) = out;
    } else {
      for (int e = 0; e < V && c0 + e < C; ++e) {
        const A v = sbn::io<T>::template load<A>(x, base + e);
        sbn::io<T>::template store<A>(
            y, base + e, sbn::act_out<A>(sbn::affine<A>(v, mean[e], scale[e], bias_[e]), relu));
      }
    }
  }
}

// Merge the backward partials (float64), apply invstd, pack header + sums,
// and write (or add to) the local parameter gradients. One thread per channel.
template <typename A, typename P>
__global__ void bn_bwd_pack(const A* __restrict__ p1, const A* __restrict__ p2, sbn::i64 C, int G,
                            const A* __restrict__ statc, double* __restrict__ buf,
                            P* __restrict__ dweight, P* __restrict__ dbias, int flags,
                            sbn::i64 count, int phase, int err, sbn::i64 nf, sbn::i64 layer,
                            sbn::i64 call, sbn::i64 ident, sbn::i64 evals) {
  const sbn::i64 start = sbn::global_thread();
  if (start == 0) {
    write_header(buf, count, phase, err, nf, layer, call, ident, evals);
  }
  for (sbn::i64 c = start; c < C; c += sbn::global_threads()) {
    double a = 0.0, b = 0.0;
    for (int g = 0; g < G; ++g) {
      a += static_cast<double>(p1[c * G + g]);
      b += static_cast<double>(p2[c * G + g]);
    }
    b = b * static_cast<double>(statc[C + c]);
    buf[SBN_HEADER + c] = a;
    buf[SBN_HEADER + C + c] = b;
    if (dweight) {
      const P w = static_cast<P>(b), d = static_cast<P>(a);
      if (flags & SBN_F_ACCUMULATE) {
        dweight[c] += w;
        dbias[c] += d;
      } else {
        dweight[c] = w;
        dbias[c] = d;
      }
    }
  }
}

namespace sbn {

// dx = a * (dy' - mean_dy) - b * (x - mean), dy' = dy masked by the fused
// ReLU (its forward scale rs and bias rb, SBN_F_RELU) or dy.
template <typename A>
struct BwdCoef {
  A mean, a, mdy, b, rs, rb;
};

template <typename A, typename P>
__device__ __forceinline__ BwdCoef<A> bwd_coef(i64 c, i64 C, int flags, const double* buf,
                                               const double* stats64, const A* statc,
                                               const P* weight) {
  BwdCoef<A> k;
  const A inv = statc[C + c];
  k.mean = statc[c];
  k.a = weight ? static_cast<A>(weight[c]) * inv : inv;
  const double n = stats64[2 * C];
  if ((flags & SBN_F_TRAIN) && n > 0) {
    k.mdy = static_cast<A>(buf[SBN_HEADER + c] / n);
    k.b = static_cast<A>(static_cast<double>(k.a * inv) * (buf[SBN_HEADER + C + c] / n));
  } else {
    k.mdy = A(0);
    k.b = A(0);
  }
  k.rs = (flags & SBN_F_RELU) ? statc[2 * C + c] : A(0);
  k.rb = (flags & SBN_F_RELU) ? statc[3 * C + c] : A(0);
  return k;
}

// dy, masked by the fused ReLU when `relu`.
template <typename A>
__device__ __forceinline__ A bwd_dy(A g, A v, const BwdCoef<A>& k, bool relu) {
  return relu ? relu_keep<A>(g, v, k.mean, k.rs, k.rb) : g;
}

}  // namespace sbn

template <typename T, typename A, typename P>
__global__ void bn_bwd_elemt_cf(const T* __restrict__ dy, const T* __restrict__ x,
                                T* __restrict__ dx, sbn::i64 NC, sbn::i64 C, sbn::i64 S,
                                const double* __restrict__ buf, const double* __restrict__ stats64,
                                const A* __restrict__ statc, const P* __restrict__ weight,
                                double* __restrict__ status, int flags, double size) {
  if ((flags & SBN_F_CHECK) && sbn::global_thread() == 0) sbn::check(buf, 3, size, status);
  const int V = sbn::VecWidth<T>::value;
  typedef sbn::Vec<T, V> VT;
  const bool relu = (flags & SBN_F_RELU) != 0;
  const sbn::i64 first = (sbn::i64)blockIdx.y * blockDim.x + threadIdx.x;
  const sbn::i64 step = (sbn::i64)gridDim.y * blockDim.x;
  const sbn::i64 row_step = (sbn::i64)gridDim.x * blockDim.y;
  for (sbn::i64 row = (sbn::i64)blockIdx.x * blockDim.y + threadIdx.y; row < NC;
       row += row_step) {
    const sbn::i64 c = row % C;  // once per row
    const sbn::BwdCoef<A> k = sbn::bwd_coef<A, P>(c, C, flags, buf, stats64, statc, weight);
    const T* gr = dy + row * S;
    const T* xr = x + row * S;
    T* dr = dx + row * S;
    sbn::i64 done = 0;
    if (sbn::aligned16(gr) && sbn::aligned16(xr) && sbn::aligned16(dr)) {
      const sbn::i64 nv = S / V;
      for (sbn::i64 j = first; j < nv; j += step) {
        VT gi = reinterpret_cast<const VT*>(gr)[j];
        VT xi = reinterpret_cast<const VT*>(xr)[j];
        VT out;
#pragma unroll
        for (int e = 0; e < V; ++e) {
          const A v = sbn::io<T>::template load<A>(xi.v, e);
          const A g = sbn::bwd_dy<A>(sbn::io<T>::template load<A>(gi.v, e), v, k, relu);
          sbn::io<T>::template store<A>(out.v, e, k.a * (g - k.mdy) - k.b * (v - k.mean));
        }
        reinterpret_cast<VT*>(dr)[j] = out;
      }
      done = nv * V;
    }
    for (sbn::i64 s = done + first; s < S; s += step) {
      const A v = sbn::io<T>::template load<A>(xr, s);
      const A g = sbn::bwd_dy<A>(sbn::io<T>::template load<A>(gr, s), v, k, relu);
      sbn::io<T>::template store<A>(dr, s, k.a * (g - k.mdy) - k.b * (v - k.mean));
    }
  }
}

template <typename T, typename A, typename P>
__global__ void bn_bwd_elemt_cl(const T* __restrict__ dy, const T* __restrict__ x,
                                T* __restrict__ dx, sbn::i64 M, sbn::i64 C, int vec,
                                const double* __restrict__ buf, const double* __restrict__ stats64,
                                const A* __restrict__ statc, const P* __restrict__ weight,
                                double* __restrict__ status, int flags, double size) {
  if ((flags & SBN_F_CHECK) && sbn::global_thread() == 0) sbn::check(buf, 3, size, status);
  const int V = sbn::VecWidth<T>::value;
  typedef sbn::Vec<T, V> VT;
  const bool relu = (flags & SBN_F_RELU) != 0;
  const sbn::i64 c0 = ((sbn::i64)blockIdx.x * blockDim.x + threadIdx.x) * V;
  if (c0 >= C) return;
  sbn::BwdCoef<A> k[V];
#pragma unroll
  for (int e = 0; e < V; ++e) {
    const sbn::i64 c = c0 + e < C ? c0 + e : C - 1;
    k[e] = sbn::bwd_coef<A, P>(c, C, flags, buf, stats64, statc, weight);
  }
  const sbn::i64 step = (sbn::i64)gridDim.y * blockDim.y;
  for (sbn::i64 m = (sbn::i64)blockIdx.y * blockDim.y + threadIdx.y; m < M; m += step) {
    const sbn::i64 base = m * C + c0;
    if (vec) {
      VT gi = *reinterpret_cast<const VT*>(dy + base);
      VT xi = *reinterpret_cast<const VT*>(x + base);
      VT out;
#pragma unroll
      for (int e = 0; e < V; ++e) {
        const A v = sbn::io<T>::template load<A>(xi.v, e);
        const A g = sbn::bwd_dy<A>(sbn::io<T>::template load<A>(gi.v, e), v, k[e], relu);
        sbn::io<T>::template store<A>(out.v, e,
                                      k[e].a * (g - k[e].mdy) - k[e].b * (v - k[e].mean));
      }
      *reinterpret_cast<VT*>(dx + base) = out;
    } else {
      for (int e = 0; e < V && c0 + e < C; ++e) {
        const A v = sbn::io<T>::template load<A>(x, base + e);
        const A g = sbn::bwd_dy<A>(sbn::io<T>::template load<A>(dy, base + e), v, k[e], relu);
        sbn::io<T>::template store<A>(dx, base + e,
                                      k[e].a * (g - k[e].mdy) - k[e].b * (v - k[e].mean));
      }
    }
  }
}
