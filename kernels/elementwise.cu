// Elementwise steps of batch normalization (grid-stride loops over the flat
// array; the channel of flat index i is (i / S) % C, with S = 1 for the
// channel-last (M, C) layout).
//
//   bn_normalize:      y  = (x - mean_c) * scale_c + bias_c
//                      (subtract first: no cancellation for large means)
//   bn_backward_elemt: dx = a_c * (dy - mean_dy_c) - b_c * (x - mean_c)
//
// Training and eval modes use the same kernels; eval passes running
// statistics (and b = 0, mean_dy = 0 in the backward). act="relu":
// bn_normalize's `relu` writes max(y, 0); bn_backward_elemt's act_scale /
// act_bias (the forward's scale and bias; NULL: no ReLU) mask dy.
//
// Templates: T = storage type, A = compute type of the per-channel vectors,
// I = index type: int when every index (plus one grid stride) fits in 31
// bits, long long otherwise (tensors over 2^31 elements).
#include "common.cuh"

template <typename T, typename A, typename I>
__global__ void bn_normalize(const T* __restrict__ x, T* __restrict__ y, I total, I C, I S,
                             const A* __restrict__ mean, const A* __restrict__ scale,
                             const A* __restrict__ bias, int relu) {
  const I stride = (I)gridDim.x * (I)blockDim.x;
  for (I i = (I)blockIdx.x * (I)blockDim.x + (I)threadIdx.x; i < total; i += stride) {
    const I c = (i / S) % C;
    const A v = sbn::io<T>::template load<A>(x, i);
    sbn::io<T>::template store<A>(
        y, i, sbn::act_out<A>(sbn::affine<A>(v, mean[c], scale[c], bias[c]), relu != 0));
  }
}

template <typename T, typename A, typename I>
__global__ void bn_backward_elemt(const T* __restrict__ dy, const T* __restrict__ x,
                                  T* __restrict__ dx, I total, I C, I S,
                                  const A* __restrict__ mean, const A* __restrict__ a,
                                  const A* __restrict__ mean_dy, const A* __restrict__ b,
                                  const A* __restrict__ act_scale,
                                  const A* __restrict__ act_bias) {
  const I stride = (I)gridDim.x * (I)blockDim.x;
  for (I i = (I)blockIdx.x * (I)blockDim.x + (I)threadIdx.x; i < total; i += stride) {
    const I c = (i / S) % C;
    A g = sbn::io<T>::template load<A>(dy, i);
    const A v = sbn::io<T>::template load<A>(x, i);
    if (act_scale) g = sbn::relu_keep<A>(g, v, mean[c], act_scale[c], act_bias[c]);
    sbn::io<T>::template store<A>(dx, i, a[c] * (g - mean_dy[c]) - b[c] * (v - mean[c]));
  }
}
