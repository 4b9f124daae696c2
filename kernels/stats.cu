// Per-channel statistics (count, mean, M2) of a batch, in two launches:
//
// 1. bn_stats_partial_{cf,cl}: a 2-D grid; each block folds its share of one
//    channel (channel-first) or of a tile of channels (channel-last) with a
//    Welford accumulator per thread, merges threads with Chan's formula
//    (warp shuffles, then shared memory) and writes one partial per
//    (channel, block) to a [C, G] workspace.
// 2. bn_stats_finalize: one block per channel merges its G partials in
//    float64 and writes the channel's mean and M2 (float64).
//
// Splitting each channel over G blocks gives enough parallelism when C is
// small and the spatial size large (PyTorch's channels-last pattern); with
// large C the grid is wide in channels and G is 1 or small.
//
// Templates: T = storage type (sbn::half_t, sbn::bfloat16_t, float, double),
// A = accumulation type (float for 16/32-bit inputs, double for float64).
#include "common.cuh"

// Channel-first (N, C, S). grid = (gsx * gsy, min(C, 65535)); block = (bdx, bdy)
// with bdx over S (contiguous) and bdy over N. Block b of channel c covers
// rows n = by*bdy + ty (+ k*gsy*bdy) and columns s = bx*bdx + tx (+ k*gsx*bdx)
// where bx = b % gsx, by = b / gsx.
template <typename T, typename A>
__global__ void bn_stats_partial_cf(const T* __restrict__ x, sbn::i64 N, sbn::i64 C, sbn::i64 S,
                                    int gsx, int gsy, sbn::i64* __restrict__ pcount,
                                    A* __restrict__ pmean, A* __restrict__ pm2) {
  __shared__ double smem_raw[3 * 32];
  sbn::Welford<A>* smem = reinterpret_cast<sbn::Welford<A>*>(smem_raw);
  const int G = gsx * gsy;
  const int bx = blockIdx.x % gsx;
  const int by = blockIdx.x / gsx;
  const sbn::i64 row_step = (sbn::i64)gsy * blockDim.y;
  const sbn::i64 col_step = (sbn::i64)gsx * blockDim.x;
  for (sbn::i64 c = blockIdx.y; c < C; c += gridDim.y) {
    sbn::Welford<A> w;
    for (sbn::i64 n = (sbn::i64)by * blockDim.y + threadIdx.y; n < N; n += row_step) {
      const T* row = x + (n * C + c) * S;
      for (sbn::i64 s = (sbn::i64)bx * blockDim.x + threadIdx.x; s < S; s += col_step) {
        w.push(sbn::io<T>::template load<A>(row, s));
      }
    }
    w = sbn::block_reduce_all(w, smem);
    if (threadIdx.x == 0 && threadIdx.y == 0) {
      const sbn::i64 k = c * G + blockIdx.x;
      pcount[k] = w.n;
      pmean[k] = w.mean;
      pm2[k] = w.m2;
    }
  }
}

// Channel-last (M, C). grid = (ceil(C / bdx), G); block = (bdx, bdy) with bdx
// over channels (contiguous) and bdy over rows. Block (bx, g) covers channels
// bx*bdx + tx and rows m = g*bdy + ty (+ k*G*bdy).
template <typename T, typename A>
__global__ void bn_stats_partial_cl(const T* __restrict__ x, sbn::i64 M, sbn::i64 C,
                                    sbn::i64* __restrict__ pcount, A* __restrict__ pmean,
                                    A* __restrict__ pm2) {
  __shared__ double smem_raw[3 * 512];
  sbn::Welford<A>* smem = reinterpret_cast<sbn::Welford<A>*>(smem_raw);
  const int G = gridDim.y;
  const sbn::i64 c = (sbn::i64)blockIdx.x * blockDim.x + threadIdx.x;
  const sbn::i64 row_step = (sbn::i64)G * blockDim.y;
  sbn::Welford<A> w;
  if (c < C) {
    for (sbn::i64 m = (sbn::i64)blockIdx.y * blockDim.y + threadIdx.y; m < M; m += row_step) {
      w.push(sbn::io<T>::template load<A>(x, m * C + c));
    }
  }
  w = sbn::block_reduce_y(w, smem);
  if (threadIdx.y == 0 && c < C) {
    const sbn::i64 k = c * G + blockIdx.y;
    pcount[k] = w.n;
    pmean[k] = w.mean;
    pm2[k] = w.m2;
  }
}

// Merge the G partials of each channel in float64. grid = (min(C, 65535)),
// block = 32 * k threads.
template <typename A>
__global__ void bn_stats_finalize(const sbn::i64* __restrict__ pcount,
                                  const A* __restrict__ pmean, const A* __restrict__ pm2,
                                  sbn::i64 C, int G, double* __restrict__ mean,
                                  double* __restrict__ m2) {
  __shared__ double smem_raw[3 * 32];
  sbn::Welford<double>* smem = reinterpret_cast<sbn::Welford<double>*>(smem_raw);
  for (sbn::i64 c = blockIdx.x; c < C; c += gridDim.x) {
    sbn::Welford<double> w;
    for (int g = threadIdx.x; g < G; g += blockDim.x) {
      const sbn::i64 k = c * G + g;
      sbn::Welford<double> p;
      p.n = pcount[k];
      p.mean = static_cast<double>(pmean[k]);
      p.m2 = static_cast<double>(pm2[k]);
      w = sbn::chan_merge(w, p);
    }
    w = sbn::block_reduce_all(w, smem);
    if (threadIdx.x == 0) {
      mean[c] = w.mean;
      m2[c] = w.m2;
    }
  }
}
