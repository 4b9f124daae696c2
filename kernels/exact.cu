// The reproducible mode's data passes (reproducible=True): the CUDA port of
// cupysyncbn/backends/exact_sums.py, bit for bit.
//
// Every cross-element sum of this mode is exact (fixed-grid "folds", see that
// module's docstring), so the order of the additions (threads, blocks, the
// partials' merge on the host, ranks) cannot change a bit; the per-element
// operations are the module's, in its order, as explicitly rounded float64
// intrinsics (__dadd_rn, __dsub_rn, __dmul_rn are never contracted into a
// fused multiply-add, whatever --fmad says).
//
// Each kernel writes one partial per (quantity, channel, block) to a
// [Q, C, G] float64 array (index (q * C + c) * G + g); the host merges the G
// partials (a max, or an exact sum) and finalizes in NumPy.
//
//   bn_exact_absmax_{cf,cl}<T>: max|x| (NaN-propagating), Q = 1
//   bn_exact_folds_{cf,cl}<T>: folds of z = x * m1 * m2 (Q = K) and of the
//       exact parts of z*z (Q = K), K <= SBN_MAX_FOLDS
//   bn_exact_bwd_absmax_{cf,cl}<T>: max|g|, max|h| with g = dy and
//       h = g * (x - mean), Q = 2
//   bn_exact_bwd_folds_{cf,cl}<T>: folds of g * mg1 * mg2 and h * mh1 * mh2
//
// m1, m2 (mg1, ...) are the per-channel powers of two 2**-E of the module's
// `scaled` (the second is 1 unless 2**-E is not a float64); multiplying by
// 1.0 is exact, so always multiplying twice gives the module's bits.
//
// Layouts: channel-first (N, C, S): grid = (G, min(C, 65535)), block =
// (SBN_EXACT_THREADS); block g of channel c covers the flat index
// j = n * S + s from g * blockDim.x + tx in steps of G * blockDim.x.
// Channel-last (M, C): grid = (ceil(C / 32), G), block = (32, 8); thread
// (tx, ty) of block (bx, g) covers channel bx * 32 + tx, rows g * 8 + ty in
// steps of G * 8.
#include "common.cuh"

#define SBN_MAX_FOLDS 5
#define SBN_EXACT_THREADS 256
#define SBN_SPLITTER 134217729.0

namespace sbn_exact {

__device__ __forceinline__ double amax(double m, double v) {
  // NaN wins (as NumPy's max): once m is NaN, v > m is false and m stays
  const double a = v < 0.0 ? -v : v;
  return (a > m || a != a) ? a : m;
}

// Deposit r into the folds: t = (r + s_k) - s_k; r = r - t; acc[k] += t.
__device__ __forceinline__ void fold(double r, const double* sig, int K, double* acc) {
  for (int k = 0; k < K; ++k) {
    const double t = __dsub_rn(__dadd_rn(r, sig[k]), sig[k]);
    r = __dsub_rn(r, t);
    acc[k] = __dadd_rn(acc[k], t);
  }
}

// The exact parts of z*z, deposited (exact_sums.square_parts).
__device__ __forceinline__ void fold_square(double z, bool split, const double* sig, int K,
                                            double* acc) {
  if (!split) {
    fold(__dmul_rn(z, z), sig, K, acc);
    return;
  }
  const double p = __dmul_rn(z, SBN_SPLITTER);
  const double hi = __dsub_rn(p, __dsub_rn(p, z));
  const double lo = __dsub_rn(z, hi);
  const double m = __dmul_rn(hi, lo);
  fold(__dmul_rn(hi, hi), sig, K, acc);
  fold(__dadd_rn(m, m), sig, K, acc);
  fold(__dmul_rn(lo, lo), sig, K, acc);
}

// z = v * 2**-E as two exact factors (exact_sums.scale_factors), in that order.
__device__ __forceinline__ double scaled(double v, double a, double b) {
  return __dmul_rn(__dmul_rn(v, a), b);
}

// One element of the forward: z into acc[0..K), the parts of z*z into acc[K..2K).
__device__ __forceinline__ void moment_element(double v, double a, double b, bool split,
                                               const double* sig, int K, double* acc) {
  const double z = scaled(v, a, b);
  fold(z, sig, K, acc);
  fold_square(z, split, sig, K, acc + K);
}

// h = g * (x - mean) of the backward (float64, rounded twice).
__device__ __forceinline__ double product(double g, double xv, double mu) {
  return __dmul_rn(__dsub_rn(xv, mu), g);
}

// One element of the backward: g into acc[0..K), h into acc[K..2K).
__device__ __forceinline__ void bwd_element(double g, double xv, double mu, double ga,
                                            double gb, double ha, double hb,
                                            const double* sig, int K, double* acc) {
  fold(scaled(g, ga, gb), sig, K, acc);
  fold(scaled(product(g, xv, mu), ha, hb), sig, K, acc + K);
}

// Sum (or max) Q values per thread over the block; thread 0 (or row 0 of a
// channel-last block) ends with the result. Exact sums and maxima: any order.
template <bool MAX>
__device__ __forceinline__ void block_combine(double* v, int Q, double* smem, int lanes) {
  // lanes: threads that combine together (the whole block, or one column)
  const int tid = threadIdx.x + threadIdx.y * blockDim.x;
  const int n = blockDim.x * blockDim.y;
  for (int q = 0; q < Q; ++q) {
    smem[tid] = v[q];
    __syncthreads();
    for (int off = lanes / 2; off > 0; off /= 2) {
      const int step = (lanes == n) ? off : off * (int)blockDim.x;
      const bool active = (lanes == n) ? (tid < off) : ((int)threadIdx.y < off);
      if (active) {
        smem[tid] = MAX ? amax(smem[tid], smem[tid + step]) : __dadd_rn(smem[tid], smem[tid + step]);
      }
      __syncthreads();
    }
    v[q] = smem[tid];
    __syncthreads();
  }
}

}  // namespace sbn_exact

// ---------------------------------------------------------------------------
// Forward bound and folds
// ---------------------------------------------------------------------------

template <typename T>
__global__ void bn_exact_absmax_cf(const T* __restrict__ x, sbn::i64 N, sbn::i64 C, sbn::i64 S,
                                   double* __restrict__ out) {
  __shared__ double smem[SBN_EXACT_THREADS];
  const int G = gridDim.x;
  const sbn::i64 total = N * S;
  const sbn::i64 step = (sbn::i64)G * blockDim.x;
  for (sbn::i64 c = blockIdx.y; c < C; c += gridDim.y) {
    double m = 0.0;
    for (sbn::i64 j = (sbn::i64)blockIdx.x * blockDim.x + threadIdx.x; j < total; j += step) {
      const sbn::i64 n = j / S;
      const sbn::i64 s = j - n * S;
      m = sbn_exact::amax(m, sbn::io<T>::template load<double>(x, (n * C + c) * S + s));
    }
    sbn_exact::block_combine<true>(&m, 1, smem, blockDim.x);
    if (threadIdx.x == 0) out[c * G + blockIdx.x] = m;
  }
}

template <typename T>
__global__ void bn_exact_absmax_cl(const T* __restrict__ x, sbn::i64 M, sbn::i64 C,
                                   double* __restrict__ out) {
  __shared__ double smem[SBN_EXACT_THREADS];
  const int G = gridDim.y;
  const sbn::i64 c = (sbn::i64)blockIdx.x * blockDim.x + threadIdx.x;
  const sbn::i64 step = (sbn::i64)G * blockDim.y;
  double m = 0.0;
  if (c < C) {
    for (sbn::i64 r = (sbn::i64)blockIdx.y * blockDim.y + threadIdx.y; r < M; r += step) {
      m = sbn_exact::amax(m, sbn::io<T>::template load<double>(x, r * C + c));
    }
  }
  sbn_exact::block_combine<true>(&m, 1, smem, blockDim.y);
  if (threadIdx.y == 0 && c < C) out[c * G + blockIdx.y] = m;
}

template <typename T>
__global__ void bn_exact_folds_cf(const T* __restrict__ x, sbn::i64 N, sbn::i64 C, sbn::i64 S,
                                  const double* __restrict__ m1, const double* __restrict__ m2,
                                  const double* __restrict__ sig, int K, int split,
                                  double* __restrict__ out) {
  __shared__ double smem[SBN_EXACT_THREADS];
  const int G = gridDim.x;
  const sbn::i64 total = N * S;
  const sbn::i64 step = (sbn::i64)G * blockDim.x;
  for (sbn::i64 c = blockIdx.y; c < C; c += gridDim.y) {
    double acc[2 * SBN_MAX_FOLDS] = {0.0};
    const double a = m1[c], b = m2[c];
    for (sbn::i64 j = (sbn::i64)blockIdx.x * blockDim.x + threadIdx.x; j < total; j += step) {
      const sbn::i64 n = j / S;
      const sbn::i64 s = j - n * S;
      sbn_exact::moment_element(sbn::io<T>::template load<double>(x, (n * C + c) * S + s), a, b,
                                split != 0, sig, K, acc);
    }
    sbn_exact::block_combine<false>(acc, 2 * K, smem, blockDim.x);
    if (threadIdx.x == 0) {
      for (int q = 0; q < 2 * K; ++q) out[(q * C + c) * G + blockIdx.x] = acc[q];
    }
  }
}

template <typename T>
__global__ void bn_exact_folds_cl(const T* __restrict__ x, sbn::i64 M, sbn::i64 C,
                                  const double* __restrict__ m1, const double* __restrict__ m2,
                                  const double* __restrict__ sig, int K, int split,
                                  double* __restrict__ out) {
  __shared__ double smem[SBN_EXACT_THREADS];
  const int G = gridDim.y;
  const sbn::i64 c = (sbn::i64)blockIdx.x * blockDim.x + threadIdx.x;
  const sbn::i64 step = (sbn::i64)G * blockDim.y;
  double acc[2 * SBN_MAX_FOLDS] = {0.0};
  if (c < C) {
    const double a = m1[c], b = m2[c];
    for (sbn::i64 r = (sbn::i64)blockIdx.y * blockDim.y + threadIdx.y; r < M; r += step) {
      sbn_exact::moment_element(sbn::io<T>::template load<double>(x, r * C + c), a, b,
                                split != 0, sig, K, acc);
    }
  }
  sbn_exact::block_combine<false>(acc, 2 * K, smem, blockDim.y);
  if (threadIdx.y == 0 && c < C) {
    for (int q = 0; q < 2 * K; ++q) out[(q * C + c) * G + blockIdx.y] = acc[q];
  }
}

// ---------------------------------------------------------------------------
// Backward bounds and folds: g = dy, h = g * (x - mean) (float64, rounded)
// ---------------------------------------------------------------------------

template <typename T>
__global__ void bn_exact_bwd_absmax_cf(const T* __restrict__ dy, const T* __restrict__ x,
                                       sbn::i64 N, sbn::i64 C, sbn::i64 S,
                                       const double* __restrict__ mean,
                                       double* __restrict__ out) {
  __shared__ double smem[SBN_EXACT_THREADS];
  const int G = gridDim.x;
  const sbn::i64 total = N * S;
  const sbn::i64 step = (sbn::i64)G * blockDim.x;
  for (sbn::i64 c = blockIdx.y; c < C; c += gridDim.y) {
    double m[2] = {0.0, 0.0};
    const double mu = mean[c];
    for (sbn::i64 j = (sbn::i64)blockIdx.x * blockDim.x + threadIdx.x; j < total; j += step) {
      const sbn::i64 n = j / S;
      const sbn::i64 i = (n * C + c) * S + (j - n * S);
      const double g = sbn::io<T>::template load<double>(dy, i);
      const double h = sbn_exact::product(g, sbn::io<T>::template load<double>(x, i), mu);
      m[0] = sbn_exact::amax(m[0], g);
      m[1] = sbn_exact::amax(m[1], h);
    }
    sbn_exact::block_combine<true>(m, 2, smem, blockDim.x);
    if (threadIdx.x == 0) {
      out[c * G + blockIdx.x] = m[0];
      out[(C + c) * G + blockIdx.x] = m[1];
    }
  }
}

template <typename T>
__global__ void bn_exact_bwd_absmax_cl(const T* __restrict__ dy, const T* __restrict__ x,
                                       sbn::i64 M, sbn::i64 C, const double* __restrict__ mean,
                                       double* __restrict__ out) {
  __shared__ double smem[SBN_EXACT_THREADS];
  const int G = gridDim.y;
  const sbn::i64 c = (sbn::i64)blockIdx.x * blockDim.x + threadIdx.x;
  const sbn::i64 step = (sbn::i64)G * blockDim.y;
  double m[2] = {0.0, 0.0};
  if (c < C) {
    const double mu = mean[c];
    for (sbn::i64 r = (sbn::i64)blockIdx.y * blockDim.y + threadIdx.y; r < M; r += step) {
      const double g = sbn::io<T>::template load<double>(dy, r * C + c);
      const double h = sbn_exact::product(g, sbn::io<T>::template load<double>(x, r * C + c), mu);
      m[0] = sbn_exact::amax(m[0], g);
      m[1] = sbn_exact::amax(m[1], h);
    }
  }
  sbn_exact::block_combine<true>(m, 2, smem, blockDim.y);
  if (threadIdx.y == 0 && c < C) {
    out[c * G + blockIdx.y] = m[0];
    out[(C + c) * G + blockIdx.y] = m[1];
  }
}

template <typename T>
__global__ void bn_exact_bwd_folds_cf(const T* __restrict__ dy, const T* __restrict__ x,
                                      sbn::i64 N, sbn::i64 C, sbn::i64 S,
                                      const double* __restrict__ mean,
                                      const double* __restrict__ mg, const double* __restrict__ mh,
                                      const double* __restrict__ sig, int K,
                                      double* __restrict__ out) {
  // mg, mh: [2, C] (the two multipliers of g's and of h's scaling)
  __shared__ double smem[SBN_EXACT_THREADS];
  const int G = gridDim.x;
  const sbn::i64 total = N * S;
  const sbn::i64 step = (sbn::i64)G * blockDim.x;
  for (sbn::i64 c = blockIdx.y; c < C; c += gridDim.y) {
    double acc[2 * SBN_MAX_FOLDS] = {0.0};
    const double mu = mean[c], ga = mg[c], gb = mg[C + c], ha = mh[c], hb = mh[C + c];
    for (sbn::i64 j = (sbn::i64)blockIdx.x * blockDim.x + threadIdx.x; j < total; j += step) {
      const sbn::i64 n = j / S;
      const sbn::i64 i = (n * C + c) * S + (j - n * S);
      const double g = sbn::io<T>::template load<double>(dy, i);
      sbn_exact::bwd_element(g, sbn::io<T>::template load<double>(x, i), mu, ga, gb, ha, hb, sig,
                             K, acc);
    }
    sbn_exact::block_combine<false>(acc, 2 * K, smem, blockDim.x);
    if (threadIdx.x == 0) {
      for (int q = 0; q < 2 * K; ++q) out[(q * C + c) * G + blockIdx.x] = acc[q];
    }
  }
}

template <typename T>
__global__ void bn_exact_bwd_folds_cl(const T* __restrict__ dy, const T* __restrict__ x,
                                      sbn::i64 M, sbn::i64 C, const double* __restrict__ mean,
                                      const double* __restrict__ mg, const double* __restrict__ mh,
                                      const double* __restrict__ sig, int K,
                                      double* __restrict__ out) {
  __shared__ double smem[SBN_EXACT_THREADS];
  const int G = gridDim.y;
  const sbn::i64 c = (sbn::i64)blockIdx.x * blockDim.x + threadIdx.x;
  const sbn::i64 step = (sbn::i64)G * blockDim.y;
  double acc[2 * SBN_MAX_FOLDS] = {0.0};
  if (c < C) {
    const double mu = mean[c], ga = mg[c], gb = mg[C + c], ha = mh[c], hb = mh[C + c];
    for (sbn::i64 r = (sbn::i64)blockIdx.y * blockDim.y + threadIdx.y; r < M; r += step) {
      const double g = sbn::io<T>::template load<double>(dy, r * C + c);
      sbn_exact::bwd_element(g, sbn::io<T>::template load<double>(x, r * C + c), mu, ga, gb, ha,
                             hb, sig, K, acc);
    }
  }
  sbn_exact::block_combine<false>(acc, 2 * K, smem, blockDim.y);
  if (threadIdx.y == 0 && c < C) {
    for (int q = 0; q < 2 * K; ++q) out[(q * C + c) * G + blockIdx.y] = acc[q];
  }
}

// ---------------------------------------------------------------------------
// The per-sample path (cupysyncbn/backends/exact_samples.py): within-sample
// sums in that module's canonical order; the host deposits the [Q, N, C]
// partials into the folds. Every operation
// is an explicitly rounded intrinsic (no fused multiply-add).
//
//   bn_exact_sample_{cf,cl}<T>: shift s (the sample's first value), a =
//       sum(d), b = sum(d * d), d = double(x) - s; Q = 3
//   bn_exact_sample_bwd_{cf,cl}<T, CT>: g = sum(double(dy)), h = sum(g *
//       double(CT(x) - mean)) (the difference in the compute type CT); Q = 2
//
// Channel-first (N, C, S): 16 threads per row (sample n, channel c: row
// n * C + c), block = 128 threads (8 rows), a 1-D grid. Channel-last
// (N * S, C): one thread per (sample, channel): grid = (ceil(C / 128),
// min(N, 65535)), block = 128 threads over the channels; samples in steps of
// gridDim.y.
// ---------------------------------------------------------------------------

#define SBN_SAMPLE_LANES 16
#define SBN_SAMPLE_TILE 4

namespace sbn_exact {

__device__ __forceinline__ float sub_rn(float a, float b) { return __fsub_rn(a, b); }
__device__ __forceinline__ double sub_rn(double a, double b) { return __dsub_rn(a, b); }

// One step of a sum pair: a += p; b += p * q (rounded, then added).
__device__ __forceinline__ void pair_step(double& a, double& b, double p, double q) {
  a = __dadd_rn(a, p);
  b = __dadd_rn(b, __dmul_rn(p, q));
}

// The two terms of element i: (d, d) forward, (g, double(CT(x) - m)) backward.
template <typename T, typename CT, bool BWD>
__device__ __forceinline__ void terms(const T* x, const T* dy, sbn::i64 i, double sh, CT m,
                                      double& p, double& q) {
  if (BWD) {
    p = sbn::io<T>::template load<double>(dy, i);
    q = (double)sub_rn(sbn::io<T>::template load<CT>(x, i), m);
  } else {
    p = __dsub_rn(sbn::io<T>::template load<double>(x, i), sh);
    q = p;
  }
}

// The S rows of sample n, channel c (channel-last): tiles of rows in order.
template <typename T, typename CT, bool BWD>
__device__ void column_sums(const T* x, const T* dy, sbn::i64 n, sbn::i64 S, sbn::i64 C,
                            sbn::i64 c, double sh, CT m, double& a_out, double& b_out) {
  double a = 0.0, b = 0.0;
  for (sbn::i64 t0 = 0; t0 < S; t0 += SBN_SAMPLE_TILE) {
    const sbn::i64 t1 = t0 + SBN_SAMPLE_TILE < S ? t0 + SBN_SAMPLE_TILE : S;
    double ta = 0.0, tb = 0.0;
    for (sbn::i64 t = t0; t < t1; ++t) {
      double p, q;
      terms<T, CT, BWD>(x, dy, (n * S + t) * C + c, sh, m, p, q);
      pair_step(ta, tb, p, q);
    }
    a = __dadd_rn(a, ta);
    b = __dadd_rn(b, tb);
  }
  a_out = a;
  b_out = b;
}

}  // namespace sbn_exact

namespace sbn_exact {

// Channel-first: 16 threads per row, thread l holding lane l; the tree by
// shuffles (lane l < 8 adds lane l + 8's value to its own, and so on), the
// tail by lane 0. `base` advances by whole blocks, so every warp takes part
// in every shuffle (rows past the end compute zeros).
template <typename T, typename CT, bool BWD>
__device__ void lane_rows(const T* x, const T* dy, const CT* mean, sbn::i64 N, sbn::i64 C,
                          sbn::i64 S, double* out) {
  const sbn::i64 NC = N * C;
  const int lane = threadIdx.x % SBN_SAMPLE_LANES;
  const sbn::i64 rows_per_block = blockDim.x / SBN_SAMPLE_LANES;
  const sbn::i64 full = S - S % SBN_SAMPLE_LANES;
  const sbn::i64 rest = full + ((S - full >= 8) ? 8 : 0);
  for (sbn::i64 base = (sbn::i64)blockIdx.x * rows_per_block; base < NC;
       base += (sbn::i64)gridDim.x * rows_per_block) {
    const sbn::i64 r = base + threadIdx.x / SBN_SAMPLE_LANES;
    const bool ok = r < NC;
    const double sh = (!BWD && ok) ? sbn::io<T>::template load<double>(x, r * S) : 0.0;
    const CT m = (BWD && ok) ? mean[r % C] : CT(0);
    double a = 0.0, b = 0.0, ta = 0.0, tb = 0.0;
    if (ok) {
      for (sbn::i64 t = lane; t < rest; t += SBN_SAMPLE_LANES) {
        double p, q;
        sbn_exact::terms<T, CT, BWD>(x, dy, r * S + t, sh, m, p, q);
        sbn_exact::pair_step(a, b, p, q);
      }
      if (lane == 0) {
        for (sbn::i64 t = rest; t < S; ++t) {
          double p, q;
          sbn_exact::terms<T, CT, BWD>(x, dy, r * S + t, sh, m, p, q);
          sbn_exact::pair_step(ta, tb, p, q);
        }
      }
    }
#pragma unroll
    for (int w = 8; w >= 1; w /= 2) {
      a = __dadd_rn(a, __shfl_xor_sync(0xffffffffu, a, w));
      b = __dadd_rn(b, __shfl_xor_sync(0xffffffffu, b, w));
    }
    if (ok && lane == 0) {
      if (BWD) {
        out[r] = __dadd_rn(a, ta);
        out[NC + r] = __dadd_rn(b, tb);
      } else {
        out[r] = sh;
        out[NC + r] = __dadd_rn(a, ta);
        out[2 * NC + r] = __dadd_rn(b, tb);
      }
    }
  }
}

}  // namespace sbn_exact

template <typename T>
__global__ void bn_exact_sample_cf(const T* __restrict__ x, sbn::i64 N, sbn::i64 C, sbn::i64 S,
                                   double* __restrict__ out) {
  sbn_exact::lane_rows<T, double, false>(x, x, nullptr, N, C, S, out);
}

template <typename T>
__global__ void bn_exact_sample_cl(const T* __restrict__ x, sbn::i64 N, sbn::i64 S, sbn::i64 C,
                                   double* __restrict__ out) {
  const sbn::i64 c = (sbn::i64)blockIdx.x * blockDim.x + threadIdx.x;
  if (c >= C) return;
  const sbn::i64 NC = N * C;
  for (sbn::i64 n = blockIdx.y; n < N; n += gridDim.y) {
    const double sh = sbn::io<T>::template load<double>(x, n * S * C + c);
    double a, b;
    sbn_exact::column_sums<T, double, false>(x, x, n, S, C, c, sh, 0.0, a, b);
    out[n * C + c] = sh;
    out[NC + n * C + c] = a;
    out[2 * NC + n * C + c] = b;
  }
}

template <typename T, typename CT>
__global__ void bn_exact_sample_bwd_cf(const T* __restrict__ dy, const T* __restrict__ x,
                                       const CT* __restrict__ mean, sbn::i64 N, sbn::i64 C,
                                       sbn::i64 S, double* __restrict__ out) {
  sbn_exact::lane_rows<T, CT, true>(x, dy, mean, N, C, S, out);
}

template <typename T, typename CT>
__global__ void bn_exact_sample_bwd_cl(const T* __restrict__ dy, const T* __restrict__ x,
                                       const CT* __restrict__ mean, sbn::i64 N, sbn::i64 S,
                                       sbn::i64 C, double* __restrict__ out) {
  const sbn::i64 c = (sbn::i64)blockIdx.x * blockDim.x + threadIdx.x;
  if (c >= C) return;
  const sbn::i64 NC = N * C;
  for (sbn::i64 n = blockIdx.y; n < N; n += gridDim.y) {
    double g, h;
    sbn_exact::column_sums<T, CT, true>(x, dy, n, S, C, c, 0.0, mean[c], g, h);
    out[n * C + c] = g;
    out[NC + n * C + c] = h;
  }
}
