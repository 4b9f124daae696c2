// Shared device helpers for the cupysyncbn kernels.
//
// Self-contained on purpose: no CUDA headers are included, so the same text
// compiles with CuPy's RawModule and with bare NVRTC (CPU-only CI) alike.
// float16/bfloat16 are stored as 16-bit words and converted with PTX
// (`cvt`) / integer rounding, which works on every architecture from sm_50.
//
// Contents:
//   * storage types and load/store with conversion to the compute type;
//   * Welford accumulators with Chan's merge (statistics);
//   * Kahan-compensated pair sums (backward reduction);
//   * warp (shuffle) and block (shared memory) reductions of both;
//   * the fused ReLU (act="relu"): the pre-activation, the ReLU and its mask.
// All element offsets are 64-bit (`sbn::i64`): tensors over 2^31 elements
// are indexed correctly.
#pragma once

namespace sbn {

typedef long long i64;

// 16-bit storage types (bit patterns of IEEE half and bfloat16).
struct half_t {
  unsigned short bits;
};
struct bfloat16_t {
  unsigned short bits;
};

__device__ __forceinline__ float half_to_float(unsigned short h) {
  float f;
  asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
  return f;
}

__device__ __forceinline__ unsigned short float_to_half(float f) {
  unsigned short h;
  asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
  return h;
}

__device__ __forceinline__ float bf16_to_float(unsigned short b) {
  return __uint_as_float(((unsigned int)b) << 16);
}

// Round to nearest even (the `cvt.rn.bf16.f32` of sm_80+, portable).
__device__ __forceinline__ unsigned short float_to_bf16(float f) {
  unsigned int u = __float_as_uint(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) {
    return (unsigned short)((u >> 16) | 0x0040u);  // quiet NaN, sign kept
  }
  u += 0x7fffu + ((u >> 16) & 1u);
  return (unsigned short)(u >> 16);
}

// Load element i of a T array as CT; store a CT value as T.
template <typename T>
struct io {
  template <typename CT>
  __device__ __forceinline__ static CT load(const T* p, i64 i) {
    return static_cast<CT>(p[i]);
  }
  template <typename CT>
  __device__ __forceinline__ static void store(T* p, i64 i, CT v) {
    p[i] = static_cast<T>(v);
  }
};

template <>
struct io<half_t> {
  template <typename CT>
  __device__ __forceinline__ static CT load(const half_t* p, i64 i) {
    return static_cast<CT>(half_to_float(p[i].bits));
  }
  template <typename CT>
  __device__ __forceinline__ static void store(half_t* p, i64 i, CT v) {
    half_t h;
    h.bits = float_to_half(static_cast<float>(v));
    p[i] = h;
  }
};

template <>
struct io<bfloat16_t> {
  template <typename CT>
  __device__ __forceinline__ static CT load(const bfloat16_t* p, i64 i) {
    return static_cast<CT>(bf16_to_float(p[i].bits));
  }
  template <typename CT>
  __device__ __forceinline__ static void store(bfloat16_t* p, i64 i, CT v) {
    bfloat16_t h;
    h.bits = float_to_bf16(static_cast<float>(v));
    p[i] = h;
  }
};

// ---------------------------------------------------------------------------
// Welford / Chan
// ---------------------------------------------------------------------------

// Count, mean and M2 (sum of squared deviations from the mean) of a set.
// The count is an integer so that merged counts stay exact beyond 2^24.
template <typename A>
struct Welford {
  A mean;
  A m2;
  i64 n;

  __device__ __forceinline__ Welford() : mean(0), m2(0), n(0) {}

  // Welford's update: stable for any offset of the data.
  __device__ __forceinline__ void push(A v) {
    n += 1;
    A d = v - mean;
    mean += d / static_cast<A>(n);
    m2 += d * (v - mean);
  }
};

// Chan et al.'s pairwise merge of two Welford states.
template <typename A>
__device__ __forceinline__ Welford<A> chan_merge(const Welford<A>& a, const Welford<A>& b) {
  if (b.n == 0) return a;
  if (a.n == 0) return b;
  Welford<A> r;
  r.n = a.n + b.n;
  const A nb = static_cast<A>(b.n) / static_cast<A>(r.n);
  const A d = b.mean - a.mean;
  r.mean = a.mean + d * nb;
  r.m2 = a.m2 + b.m2 + d * d * static_cast<A>(a.n) * nb;
  return r;
}

template <typename A>
__device__ __forceinline__ Welford<A> shfl_xor(const Welford<A>& w, int offset) {
  Welford<A> o;
  o.mean = __shfl_xor_sync(0xffffffffu, w.mean, offset);
  o.m2 = __shfl_xor_sync(0xffffffffu, w.m2, offset);
  o.n = __shfl_xor_sync(0xffffffffu, w.n, offset);
  return o;
}

// ---------------------------------------------------------------------------
// Compensated sums (backward reduction)
// ---------------------------------------------------------------------------

// Two running sums with Kahan compensation per thread; the compensation is
// folded in when threads are merged.
template <typename A>
struct Sum2 {
  A a, ca, b, cb;

  __device__ __forceinline__ Sum2() : a(0), ca(0), b(0), cb(0) {}

  __device__ __forceinline__ void push(A va, A vb) {
    A y = va - ca;
    A t = a + y;
    ca = (t - a) - y;
    a = t;
    y = vb - cb;
    t = b + y;
    cb = (t - b) - y;
    b = t;
  }

  __device__ __forceinline__ A sum_a() const { return a - ca; }
  __device__ __forceinline__ A sum_b() const { return b - cb; }
};

// A merged (uncompensated) pair of sums.
template <typename A>
struct Pair {
  A a, b;
};

template <typename A>
__device__ __forceinline__ Pair<A> pair_merge(const Pair<A>& x, const Pair<A>& y) {
  Pair<A> r;
  r.a = x.a + y.a;
  r.b = x.b + y.b;
  return r;
}

template <typename A>
__device__ __forceinline__ Pair<A> shfl_xor(const Pair<A>& p, int offset) {
  Pair<A> o;
  o.a = __shfl_xor_sync(0xffffffffu, p.a, offset);
  o.b = __shfl_xor_sync(0xffffffffu, p.b, offset);
  return o;
}

__device__ __forceinline__ Welford<float> merge(const Welford<float>& a, const Welford<float>& b) {
  return chan_merge(a, b);
}
__device__ __forceinline__ Welford<double> merge(const Welford<double>& a,
                                                 const Welford<double>& b) {
  return chan_merge(a, b);
}
__device__ __forceinline__ Pair<float> merge(const Pair<float>& a, const Pair<float>& b) {
  return pair_merge(a, b);
}
__device__ __forceinline__ Pair<double> merge(const Pair<double>& a, const Pair<double>& b) {
  return pair_merge(a, b);
}

// ---------------------------------------------------------------------------
// Reductions. Block sizes are multiples of 32 and at most 512.
// ---------------------------------------------------------------------------

// Merge over the whole warp (every lane ends with the result).
template <typename R>
__device__ __forceinline__ R warp_reduce_all(R v) {
  for (int offset = 16; offset > 0; offset >>= 1) {
    v = merge(v, shfl_xor(v, offset));
  }
  return v;
}

// Merge over every thread of the block; the result is valid in thread 0.
// `shared` holds at least 32 R. Ends with a barrier, so it can be reused.
template <typename R>
__device__ __forceinline__ R block_reduce_all(R v, R* shared) {
  const int tid = threadIdx.x + threadIdx.y * blockDim.x;
  const int nthreads = blockDim.x * blockDim.y;
  const int lane = tid & 31;
  const int warp = tid >> 5;
  v = warp_reduce_all(v);
  if (lane == 0) shared[warp] = v;
  __syncthreads();
  if (warp == 0) {
    R w = R();
    if (lane < (nthreads >> 5)) w = shared[lane];
    v = warp_reduce_all(w);
  }
  __syncthreads();
  return v;
}

// Merge over threadIdx.y for each threadIdx.x (blockDim.x and blockDim.y are
// powers of two). The result is valid in the threads with threadIdx.y == 0.
// `shared` holds blockDim.x * blockDim.y R. Ends with a barrier.
template <typename R>
__device__ __forceinline__ R block_reduce_y(R v, R* shared) {
  const int bdx = blockDim.x, bdy = blockDim.y;
  const int tx = threadIdx.x, ty = threadIdx.y;
  int rows_per_warp = 1;
  if (bdx < 32) {
    // Lanes that share threadIdx.x differ by multiples of bdx: butterfly them.
    for (int offset = 16; offset >= bdx; offset >>= 1) {
      v = merge(v, shfl_xor(v, offset));
    }
    rows_per_warp = 32 / bdx;
  }
  shared[ty * bdx + tx] = v;
  for (int stride = rows_per_warp; stride < bdy; stride <<= 1) {
    __syncthreads();
    if ((ty % (2 * stride)) == 0 && ty + stride < bdy) {
      shared[ty * bdx + tx] = merge(shared[ty * bdx + tx], shared[(ty + stride) * bdx + tx]);
    }
  }
  __syncthreads();
  R r = shared[tx];
  __syncthreads();
  return r;
}

// The fused ReLU (act="relu"). The forward writes relu(affine(x)); the
// backward recomputes affine(x) from the x it reads anyway, with the same
// vectors and this same function (the same rounding, so the same sign), and
// counts dy as 0 where it is <= 0: the mask costs no memory traffic.
template <typename A>
__device__ __forceinline__ A affine(A v, A mean, A scale, A bias) {
  return (v - mean) * scale + bias;
}

// 0 where y <= 0 when `relu` (NaN kept, as PyTorch's relu), else y.
template <typename A>
__device__ __forceinline__ A act_out(A y, bool relu) {
  return (relu && y <= A(0)) ? A(0) : y;
}

// dy masked by the forward's ReLU: 0 where affine(x) <= 0.
template <typename A>
__device__ __forceinline__ A relu_keep(A g, A v, A mean, A scale, A bias) {
  return affine(v, mean, scale, bias) <= A(0) ? A(0) : g;
}

}  // namespace sbn
