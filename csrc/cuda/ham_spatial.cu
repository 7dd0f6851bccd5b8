// ham_spatial hot path, CUDA: HAM's important-channel mask, the dual spatial pooling, the apply,
// and their backwards. The math of each op is in the header comment of csrc/ham_spatial_ops.cpp.
//
// Kernels:
//   * topk_mask_kernel, one block per sample: the contract's rank count, computed exactly in O(C)
//     instead of O(C^2): a radix select finds the c_im-th largest gate, then the channels tied
//     with it are counted in index order. Integer counts only.
//   * every x-sized pass is an op of attnkernels/cuda_spatial_pool.cuh (shared with
//     cuda/cbam_spatial.cu, here with kOneGroup = false), run by cuda_reduce.cuh's tile walk (one
//     kernel per layout): the op writes an output, adds to a per-pixel sum (over channels: d1,
//     d2, tie counts, grad_s) and/or a per-channel sum (over pixels: grad_gate), combined in a
//     fixed order. No floating atomics anywhere: bitwise deterministic run to run.
//
// Passes over x: pool 1 (the mask reads gate only), pool_backward 2 (tie counts, then grad_x and
// grad_gate), apply 1, apply_backward 1 (reads grad_y and x, writes grad_x, sums grad_gate and
// grad_s1, grad_s2 in the same pass).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <tuple>

#include "attnkernels/cuda_reduce.cuh"
#include "attnkernels/cuda_spatial_pool.cuh"
#include "attnkernels/cuda_utils.cuh"
#include "attnkernels/ham_spatial.h"

namespace attnkernels {
namespace {

using cuda::block_allreduce;
using cuda::check_cuda_pixel_map;
using cuda::check_like_x;
using cuda::kBlock;  // threads per block in every kernel here
using cuda::kMaxGrid;
using cuda::kWarpSize;
using cuda::pixel_map;

// ---------------------------------------------------------------------------------------------
// The important-channel mask.
// ---------------------------------------------------------------------------------------------

// Order-preserving keys of non-NaN values: a > b iff key(a) > key(b) and a == b iff
// key(a) == key(b) (-0 takes the key of +0).
__device__ __forceinline__ uint32_t order_key(float v) {
  const uint32_t b = v == 0.f ? 0u : __float_as_uint(v);
  return (b & 0x80000000u) ? ~b : (b | 0x80000000u);
}

__device__ __forceinline__ uint64_t order_key(double v) {
  const uint64_t b = v == 0.0 ? 0ull : static_cast<uint64_t>(__double_as_longlong(v));
  return (b >> 63) ? ~b : (b | (1ull << 63));
}

constexpr int kRadixBits = 4;
constexpr int kRadix = 1 << kRadixBits;

// mask[n,c] = 1 iff #{j : gate[j] > gate[c] or (gate[j] == gate[c] and j < c)} < c_im.
// Every comparison with a NaN is false, so a NaN gate has rank 0 (important) and ranks before
// no other channel: the non-NaN channels are ranked among themselves, by key descending, index
// ascending. With T the c_im-th largest key of them, channel c is important iff key > T, or
// key == T and fewer than need = c_im - #{key > T} channels tied with T precede it.
template <typename acc_t>
__global__ void __launch_bounds__(kBlock)
    topk_mask_kernel(const acc_t* __restrict__ gate, acc_t* __restrict__ mask, int64_t N,
                     int64_t C, int64_t c_im) {
  using key_t = decltype(order_key(acc_t(0)));
  constexpr int kKeyBits = 8 * sizeof(key_t);
  __shared__ int64_t smem[kBlock / kWarpSize];
  __shared__ int hist[kRadix];
  __shared__ int warp_ties[kBlock / kWarpSize];
  const int tid = threadIdx.x;
  const int lane = tid % kWarpSize;
  const int warp = tid / kWarpSize;
  auto plus = [](int64_t a, int64_t b) { return a + b; };
  for (int64_t n = blockIdx.x; n < N; n += gridDim.x) {  // uniform per block
    const acc_t* g = gate + n * C;
    acc_t* m = mask + n * C;
    int64_t local = 0;
    for (int64_t c = tid; c < C; c += kBlock) local += g[c] == g[c];
    const int64_t valid = block_allreduce(local, int64_t(0), plus, smem);  // non-NaN channels
    if (valid <= c_im) {  // every rank is below c_im
      for (int64_t c = tid; c < C; c += kBlock) m[c] = acc_t(1);
      continue;
    }

    // Radix select from the top digit down: T collects the digits of the c_im-th largest key,
    // `need` counts down the keys still to take from those that match T so far.
    key_t T = 0;
    int64_t need = c_im;
    for (int shift = kKeyBits - kRadixBits; shift >= 0; shift -= kRadixBits) {
      if (tid < kRadix) hist[tid] = 0;
      __syncthreads();
      const int high = shift + kRadixBits;  // the bits above this digit, fixed by earlier steps
      for (int64_t c = tid; c < C; c += kBlock) {
        const acc_t v = g[c];
        if (v == v) {
          const key_t key = order_key(v);
          if (high == kKeyBits || (key >> high) == (T >> high)) {
            atomicAdd(&hist[(key >> shift) & (kRadix - 1)], 1);  // integer: exact in any order
          }
        }
      }
      __syncthreads();
      // Every thread picks the same digit: the highest d whose bins d..15 hold >= need keys.
      int64_t above = 0;
      int d = kRadix - 1;
      for (; d > 0 && above + hist[d] < need; --d) above += hist[d];
      T |= static_cast<key_t>(d) << shift;
      need -= above;
      __syncthreads();  // hist is cleared by the next step
    }

    // The first `need` channels tied with T, in index order, are important.
    int64_t ties_before = 0;  // ties in the earlier rounds
    for (int64_t c0 = 0; c0 < C; c0 += kBlock) {
      const int64_t c = c0 + tid;
      const acc_t v = c < C ? g[c] : acc_t(0);
      const bool is_valid = c < C && v == v;
      const key_t key = is_valid ? order_key(v) : key_t(0);
      const bool tie = is_valid && key == T;
      const unsigned ballot = __ballot_sync(0xffffffffu, tie);
      if (lane == 0) warp_ties[warp] = __popc(ballot);
      __syncthreads();
      int64_t rank = ties_before + __popc(ballot & ((1u << lane) - 1u));  // ties before c
      for (int w = 0; w < kBlock / kWarpSize; ++w) {
        rank += w < warp ? warp_ties[w] : 0;
        ties_before += warp_ties[w];
      }
      if (c < C) {
        m[c] = (!is_valid || key > T || (tie && rank < need)) ? acc_t(1) : acc_t(0);
      }
      __syncthreads();  // warp_ties is rewritten by the next round
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Host side.
// ---------------------------------------------------------------------------------------------

template <typename acc_t>
void launch_topk_mask(const at::Tensor& gate, const at::Tensor& mask, int64_t c_im) {
  const int64_t N = gate.size(0), C = gate.size(1);
  const auto blocks = static_cast<unsigned>(std::min(N, kMaxGrid));
  topk_mask_kernel<acc_t><<<blocks, kBlock, 0, at::cuda::getCurrentCUDAStream()>>>(
      gate.data_ptr<acc_t>(), mask.data_ptr<acc_t>(), N, C, c_im);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// ---- the ops ----

std::tuple<at::Tensor, at::Tensor, at::Tensor> ham_spatial_pool_cuda(const at::Tensor& x_in,
                                                                     const at::Tensor& gate_in,
                                                                     int64_t c_im) {
  constexpr const char* op = "ham_spatial_pool";
  cuda::check_cuda_x(x_in, op);
  check_per_channel(gate_in, x_in, op, "gate");
  check_c_im(c_im, x_in.size(1), op);
  c10::cuda::CUDAGuard device_guard(x_in.device());
  const at::Tensor x = dense(x_in);
  const at::Tensor gate = gate_in.contiguous();
  const int64_t N = x.size(0), C = x.size(1);
  at::Tensor d1 = pixel_map(x, 2);
  at::Tensor d2 = pixel_map(x, 2);
  at::Tensor mask = at::empty_like(gate);
  if (N == 0) {
    return {d1, d2, mask};
  }
  AT_DISPATCH_FLOATING_TYPES(gate.scalar_type(), "ham_spatial_pool_cuda", [&] {
    launch_topk_mask<scalar_t>(gate, mask, c_im);  // scalar_t is acc(x), gate's dtype
  });
  if (x.numel() > 0) {
    cuda::spatial_pool<false>(x, gate, mask, d1, d2, c_im, std::max<int64_t>(C - c_im, 1));
  }
  return {d1, d2, mask};
}

std::tuple<at::Tensor, at::Tensor> ham_spatial_pool_backward_cuda(
    const at::Tensor& grad_d1_in, const at::Tensor& grad_d2_in, const at::Tensor& x_in,
    const at::Tensor& gate_in, const at::Tensor& mask_in, const at::Tensor& d1_in,
    const at::Tensor& d2_in, int64_t c_im) {
  constexpr const char* op = "ham_spatial_pool_backward";
  cuda::check_cuda_x(x_in, op);
  check_cuda_pixel_map(grad_d1_in, x_in, 2, op, "grad_d1");
  check_cuda_pixel_map(grad_d2_in, x_in, 2, op, "grad_d2");
  check_per_channel(gate_in, x_in, op, "gate");
  check_per_channel(mask_in, x_in, op, "mask");
  check_cuda_pixel_map(d1_in, x_in, 2, op, "d1");
  check_cuda_pixel_map(d2_in, x_in, 2, op, "d2");
  check_c_im(c_im, x_in.size(1), op);
  c10::cuda::CUDAGuard device_guard(x_in.device());
  const at::Tensor x = dense(x_in);
  return cuda::spatial_pool_backward<false>(grad_d1_in.contiguous(), grad_d2_in.contiguous(), x,
                                            gate_in.contiguous(), mask_in.contiguous(), d1_in.contiguous(),
                                            d2_in.contiguous(), c_im, std::max<int64_t>(x.size(1) - c_im, 1));
}

at::Tensor ham_spatial_apply_cuda(const at::Tensor& x_in, const at::Tensor& gate_in,
                                  const at::Tensor& mask_in, const at::Tensor& s1_in,
                                  const at::Tensor& s2_in) {
  constexpr const char* op = "ham_spatial_apply";
  cuda::check_cuda_x(x_in, op);
  check_per_channel(gate_in, x_in, op, "gate");
  check_per_channel(mask_in, x_in, op, "mask");
  check_cuda_pixel_map(s1_in, x_in, 1, op, "s1");
  check_cuda_pixel_map(s2_in, x_in, 1, op, "s2");
  c10::cuda::CUDAGuard device_guard(x_in.device());
  return cuda::spatial_apply<false>(dense(x_in), gate_in.contiguous(), mask_in.contiguous(), s1_in.contiguous(),
                                    s2_in.contiguous());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> ham_spatial_apply_backward_cuda(
    const at::Tensor& grad_y_in, const at::Tensor& x_in, const at::Tensor& gate_in,
    const at::Tensor& mask_in, const at::Tensor& s1_in, const at::Tensor& s2_in) {
  constexpr const char* op = "ham_spatial_apply_backward";
  cuda::check_cuda_x(x_in, op);
  check_like_x(grad_y_in, x_in, op, "grad_y");
  check_per_channel(gate_in, x_in, op, "gate");
  check_per_channel(mask_in, x_in, op, "mask");
  check_cuda_pixel_map(s1_in, x_in, 1, op, "s1");
  check_cuda_pixel_map(s2_in, x_in, 1, op, "s2");
  c10::cuda::CUDAGuard device_guard(x_in.device());
  const at::Tensor x = dense(x_in);
  // grad_y in x's layout (a copy only if it differs).
  const at::Tensor grad_y = grad_y_in.contiguous(memory_format_of(layout_of(x)));
  return cuda::spatial_apply_backward<false>(grad_y, x, gate_in.contiguous(), mask_in.contiguous(),
                                             s1_in.contiguous(), s2_in.contiguous());
}

}  // namespace
}  // namespace attnkernels

TORCH_LIBRARY_IMPL(attnkernels, CUDA, m) {
  m.impl("ham_spatial_pool", &attnkernels::ham_spatial_pool_cuda);
  m.impl("ham_spatial_pool_backward", &attnkernels::ham_spatial_pool_backward_cuda);
  m.impl("ham_spatial_apply", &attnkernels::ham_spatial_apply_cuda);
  m.impl("ham_spatial_apply_backward", &attnkernels::ham_spatial_apply_backward_cuda);
}
