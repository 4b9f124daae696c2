// Local per-channel sums of the backward pass, in two launches:
//
//   sum_dy_c       = sum(dy)
//   sum_dy_xhat_c  = sum(dy * (x - mean_c)) * invstd_c
//
// 1. bn_bwd_partial_{cf,cl}: same 2-D grids as the statistics kernels
//    (see stats.cu); Kahan-compensated sums per thread, tree merges across
//    warp and block, one partial pair per (channel, block) in a [C, G]
//    workspace.
// 2. bn_bwd_finalize: one block per channel adds its G partials in float64
//    and applies invstd (float64 outputs).
//
// Templates: T = storage type, A = compute/accumulation type (float or
// double); mean and invstd are A vectors. act="relu": act_scale / act_bias
// (the forward's scale and bias, A vectors; NULL: no ReLU) mask dy in both
// sums (common.cuh relu_keep).
#include "common.cuh"

template <typename T, typename A>
__global__ void bn_bwd_partial_cf(const T* __restrict__ dy, const T* __restrict__ x,
                                  sbn::i64 N, sbn::i64 C, sbn::i64 S, int gsx, int gsy,
                                  const A* __restrict__ mean, const A* __restrict__ act_scale,
                                  const A* __restrict__ act_bias, A* __restrict__ psum_dy,
                                  A* __restrict__ psum_dy_xmu) {
  __shared__ double smem_raw[2 * 32];
  sbn::Pair<A>* smem = reinterpret_cast<sbn::Pair<A>*>(smem_raw);
  const int G = gsx * gsy;
  const int bx = blockIdx.x % gsx;
  const int by = blockIdx.x / gsx;
  const sbn::i64 row_step = (sbn::i64)gsy * blockDim.y;
  const sbn::i64 col_step = (sbn::i64)gsx * blockDim.x;
  for (sbn::i64 c = blockIdx.y; c < C; c += gridDim.y) {
    const A mu = mean[c];
    const A rs = act_scale ? act_scale[c] : A(0), rb = act_scale ? act_bias[c] : A(0);
    sbn::Sum2<A> acc;
    for (sbn::i64 n = (sbn::i64)by * blockDim.y + threadIdx.y; n < N; n += row_step) {
      const sbn::i64 base = (n * C + c) * S;
      for (sbn::i64 s = (sbn::i64)bx * blockDim.x + threadIdx.x; s < S; s += col_step) {
        A g = sbn::io<T>::template load<A>(dy, base + s);
        const A v = sbn::io<T>::template load<A>(x, base + s);
        if (act_scale) g = sbn::relu_keep<A>(g, v, mu, rs, rb);
        acc.push(g, g * (v - mu));
      }
    }
    sbn::Pair<A> p;
    p.a = acc.sum_a();
    p.b = acc.sum_b();
    p = sbn::block_reduce_all(p, smem);
    if (threadIdx.x == 0 && threadIdx.y == 0) {
      const sbn::i64 k = c * G + blockIdx.x;
      psum_dy[k] = p.a;
      psum_dy_xmu[k] = p.b;
    }
  }
}

template <typename T, typename A>
__global__ void bn_bwd_partial_cl(const T* __restrict__ dy, const T* __restrict__ x,
                                  sbn::i64 M, sbn::i64 C, const A* __restrict__ mean,
                                  const A* __restrict__ act_scale,
                                  const A* __restrict__ act_bias, A* __restrict__ psum_dy,
                                  A* __restrict__ psum_dy_xmu) {
  __shared__ double smem_raw[2 * 512];
  sbn::Pair<A>* smem = reinterpret_cast<sbn::Pair<A>*>(smem_raw);
  const int G = gridDim.y;
  const sbn::i64 c = (sbn::i64)blockIdx.x * blockDim.x + threadIdx.x;
  const sbn::i64 row_step = (sbn::i64)G * blockDim.y;
  sbn::Sum2<A> acc;
  if (c < C) {
    const A mu = mean[c];
    const A rs = act_scale ? act_scale[c] : A(0), rb = act_scale ? act_bias[c] : A(0);
    for (sbn::i64 m = (sbn::i64)blockIdx.y * blockDim.y + threadIdx.y; m < M; m += row_step) {
      A g = sbn::io<T>::template load<A>(dy, m * C + c);
      const A v = sbn::io<T>::template load<A>(x, m * C + c);
      if (act_scale) g = sbn::relu_keep<A>(g, v, mu, rs, rb);
      acc.push(g, g * (v - mu));
    }
  }
  sbn::Pair<A> p;
  p.a = acc.sum_a();
  p.b = acc.sum_b();
  p = sbn::block_reduce_y(p, smem);
  if (threadIdx.y == 0 && c < C) {
    const sbn::i64 k = c * G + blockIdx.y;
    psum_dy[k] = p.a;
    psum_dy_xmu[k] = p.b;
  }
}

template <typename A>
__global__ void bn_bwd_finalize(const A* __restrict__ psum_dy, const A* __restrict__ psum_dy_xmu,
                                sbn::i64 C, int G, const A* __restrict__ invstd,
                                double* __restrict__ sum_dy, double* __restrict__ sum_dy_xhat) {
  __shared__ double smem_raw[2 * 32];
  sbn::Pair<double>* smem = reinterpret_cast<sbn::Pair<double>*>(smem_raw);
  for (sbn::i64 c = blockIdx.x; c < C; c += gridDim.x) {
    sbn::Pair<double> p;
    p.a = 0.0;
    p.b = 0.0;
    for (int g = threadIdx.x; g < G; g += blockDim.x) {
      p.a += static_cast<double>(psum_dy[c * G + g]);
      p.b += static_cast<double>(psum_dy_xmu[c * G + g]);
    }
    p = sbn::block_reduce_all(p, smem);
    if (threadIdx.x == 0) {
      sum_dy[c] = p.a;
      sum_dy_xhat[c] = p.b * static_cast<double>(invstd[c]);
    }
  }
}
