// Helpers shared by the CUDA kernels: wide loads, NaN-propagating max, warp/block reductions
// with a fixed combination order (docs/contract.md#determinism: bitwise deterministic run to run), and the host-side
// launch sizes and argument checks of the CUDA ops.
#pragma once

#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>

#include "attnkernels/common.h"

#include <cstdint>
#include <cstring>
#include <type_traits>

namespace attnkernels {
namespace cuda {

constexpr int kWarpSize = 32;
constexpr int64_t kMaxGrid = 1 << 30;  // grid-stride loops cover anything beyond this

// ---------------------------------------------------------------------------------------------
// Host side: launch sizes and argument checks.
// ---------------------------------------------------------------------------------------------

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

inline int64_t sm_count() { return at::cuda::getCurrentDeviceProperties()->multiProcessorCount; }

inline bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

inline int64_t next_pow2(int64_t v) {
  int64_t p = 1;
  while (p < v) p <<= 1;
  return p;
}

inline void check_cuda(const at::Tensor& t, const at::Tensor& like, const char* op, const char* name) {
  AK_CHECK_VALUE(t.is_cuda() && t.device() == like.device(), op, ": ", name, " must be on ",
              like.device(), ", got ", t.device());
}

// x, a feature map on a CUDA device (messages as the CPU kernels').
inline void check_cuda_x(const at::Tensor& x, const char* op) {
  check_feature_map(x, op, "x");
  AK_CHECK_VALUE(x.is_cuda(), op, ": x must be a CUDA tensor, got ", x.device());
}

// An (N, k, H, W) map of x in acc(x), NCHW-contiguous.
inline at::Tensor pixel_map(const at::Tensor& x, int64_t k) {
  return at::empty({x.size(0), k, x.size(2), x.size(3)}, acc_options(x));
}

// attnkernels::check_like_x (common.h), and on x's CUDA device.
inline void check_like_x(const at::Tensor& t, const at::Tensor& x, const char* op, const char* name) {
  attnkernels::check_like_x(t, x, op, name);
  check_cuda(t, x, op, name);
}

// ---------------------------------------------------------------------------------------------
// Device side.
// ---------------------------------------------------------------------------------------------

// V elements moved as one 16-byte (or narrower) load/store.
template <typename T, int V>
struct alignas(sizeof(T) * V) Vec {
  T val[V];
};

template <int V, typename T>
__device__ __forceinline__ Vec<T, V> load_vec(const T* p) {
  return *reinterpret_cast<const Vec<T, V>*>(p);
}

template <int V, typename T>
__device__ __forceinline__ void store_vec(T* p, const Vec<T, V>& v) {
  *reinterpret_cast<Vec<T, V>*>(p) = v;
}

// How many leading elements of p to take one by one before p + head is aligned for a
// V-wide vector load. p itself is aligned to sizeof(T), so the answer is exact.
template <int V, typename T>
__device__ __forceinline__ int64_t elements_to_alignment(const T* p) {
  constexpr uintptr_t kBytes = sizeof(T) * V;
  const uintptr_t misaligned = reinterpret_cast<uintptr_t>(p) % kBytes;
  return misaligned == 0 ? 0 : static_cast<int64_t>((kBytes - misaligned) / sizeof(T));
}

// max that propagates NaN, as torch.amax: NaN if either operand is NaN.
template <typename T>
__device__ __forceinline__ T nan_max(T a, T b) {
  return (a != a || a > b) ? a : b;
}

// min that propagates NaN, as torch.amin: NaN if either operand is NaN.
template <typename T>
__device__ __forceinline__ T nan_min(T a, T b) {
  return (a != a || a < b) ? a : b;
}

// __shfl_xor_sync for any trivially copyable value (a float, or a struct of running sums),
// moved 32 bits at a time. All 32 lanes must call it.
template <typename T>
__device__ __forceinline__ T shfl_xor_any(T v, int lane_mask) {
  static_assert(std::is_trivially_copyable<T>::value, "shfl_xor_any needs a trivially copyable type");
  static_assert(sizeof(T) % sizeof(unsigned) == 0, "shfl_xor_any moves whole 32-bit words");
  constexpr int kWords = sizeof(T) / sizeof(unsigned);
  unsigned words[kWords];
  memcpy(words, &v, sizeof(T));
#pragma unroll
  for (int i = 0; i < kWords; ++i) {
    words[i] = __shfl_xor_sync(0xffffffffu, words[i], lane_mask);
  }
  memcpy(&v, words, sizeof(T));
  return v;
}

// Butterfly over the 32 lanes of a warp (all lanes call it); every lane ends with the result.
// The pairing is fixed, so equal inputs give equal bits.
template <typename T, typename Combine>
__device__ __forceinline__ T warp_allreduce(T v, Combine combine) {
#pragma unroll
  for (int mask = kWarpSize / 2; mask > 0; mask >>= 1) {
    v = combine(v, shfl_xor_any(v, mask));
  }
  return v;
}

// warp_allreduce within aligned groups of `width` lanes (a power of two <= 32): every lane ends
// with its group's result. All 32 lanes must call it.
template <typename T, typename Combine>
__device__ __forceinline__ T group_allreduce(T v, int width, Combine combine) {
  for (int mask = width / 2; mask > 0; mask >>= 1) {
    v = combine(v, shfl_xor_any(v, mask));
  }
  return v;
}

// Reduction over a whole block; blockDim.x * blockDim.y * blockDim.z must be a multiple of 32
// and every thread must call it (it synchronises). The result is valid in thread 0 only.
// smem holds at least (threads / 32) values; the leading __syncthreads makes back-to-back calls
// with the same smem safe.
template <typename T, typename Combine>
__device__ __forceinline__ T block_reduce(T v, T identity, Combine combine, T* smem) {
  const int tid = threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z);
  const int nwarps = blockDim.x * blockDim.y * blockDim.z / kWarpSize;
  const int lane = tid % kWarpSize;
  const int warp = tid / kWarpSize;
  v = warp_allreduce(v, combine);
  __syncthreads();
  if (lane == 0) {
    smem[warp] = v;
  }
  __syncthreads();
  if (warp == 0) {
    v = lane < nwarps ? smem[lane] : identity;
    v = warp_allreduce(v, combine);
  }
  return v;
}

// block_reduce whose result every thread gets (same conditions as block_reduce).
template <typename T, typename Combine>
__device__ __forceinline__ T block_allreduce(T v, T identity, Combine combine, T* smem) {
  v = block_reduce(v, identity, combine, smem);
  // Warp 0 has read smem (its lanes' loads precede the shuffles), so smem[0] is free.
  if (threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z) == 0) {
    smem[0] = v;
  }
  __syncthreads();
  return smem[0];
}

// ---------------------------------------------------------------------------------------------
// Feature maps: any of the four floating dtypes, read and written through (n, c, p) strides.
// ---------------------------------------------------------------------------------------------

struct FeatureMap {
  void* ptr;
  c10::ScalarType dtype;
  int64_t sn, sc, sp;  // element (n, c, p = h*W + w) at ptr[n*sn + c*sc + p*sp]

  template <typename acc_t>
  __device__ __forceinline__ acc_t load(int64_t n, int64_t c, int64_t p) const {
    const int64_t i = n * sn + c * sc + p * sp;
    switch (dtype) {
      case c10::ScalarType::Double:
        return static_cast<acc_t>(static_cast<const double*>(ptr)[i]);
      case c10::ScalarType::Float:
        return static_cast<acc_t>(static_cast<const float*>(ptr)[i]);
      case c10::ScalarType::Half:
        return static_cast<acc_t>(static_cast<float>(static_cast<const at::Half*>(ptr)[i]));
      default:  // BFloat16: the host admits these four dtypes only
        return static_cast<acc_t>(static_cast<float>(static_cast<const at::BFloat16*>(ptr)[i]));
    }
  }

  template <typename acc_t>
  __device__ __forceinline__ void store(int64_t n, int64_t c, int64_t p, acc_t v) const {
    const int64_t i = n * sn + c * sc + p * sp;
    switch (dtype) {
      case c10::ScalarType::Double:
        static_cast<double*>(ptr)[i] = static_cast<double>(v);
        break;
      case c10::ScalarType::Float:
        static_cast<float*>(ptr)[i] = static_cast<float>(v);
        break;
      case c10::ScalarType::Half:
        static_cast<at::Half*>(ptr)[i] = static_cast<at::Half>(static_cast<float>(v));
        break;
      default:
        static_cast<at::BFloat16*>(ptr)[i] = static_cast<at::BFloat16>(static_cast<float>(v));
        break;
    }
  }
};

// t must be dense (NCHW or channels_last), so its pixels flatten to one stride.
inline FeatureMap feature_map(const at::Tensor& t) {
  return {t.data_ptr(), t.scalar_type(), t.stride(0), t.stride(1), t.size(3) > 1 ? t.stride(3) : t.stride(2)};
}

__device__ __forceinline__ float acc_exp(float v) { return expf(v); }
__device__ __forceinline__ double acc_exp(double v) { return exp(v); }

template <typename acc_t>
__device__ __forceinline__ acc_t sigmoid(acc_t v) {
  return acc_t(1) / (acc_t(1) + acc_exp(-v));  // as torch.sigmoid computes it
}

// relu and its gradient by torch's rule (docs/contract.md "NaN propagation"): relu keeps a NaN
// (NaN < 0 is false), and the gradient (t <= 0) ? 0 : grad passes grad on where t is NaN.
template <typename acc_t>
__device__ __forceinline__ acc_t relu(acc_t v) {
  return v < acc_t(0) ? acc_t(0) : v;
}
template <typename acc_t>
__device__ __forceinline__ acc_t relu_grad(acc_t grad, acc_t t) {
  return t <= acc_t(0) ? acc_t(0) : grad;
}

}  // namespace cuda
}  // namespace attnkernels
