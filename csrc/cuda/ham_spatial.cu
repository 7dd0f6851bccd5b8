// ham_spatial hot path, CUDA: HAM's important-channel mask, the dual spatial pooling, the apply,
// and their backwards. The math of each op is in the header comment of csrc/ham_spatial_ops.cpp.
//
// Kernels:
//   * topk_mask_kernel, one block per sample: the contract's rank count, computed exactly in O(C)
//     instead of O(C^2): a radix select finds the c_im-th largest gate, then the channels tied
//     with it are counted in index order. Integer counts only.
//   * every x-sized pass is an op of attnkernels/cuda_reduce.cuh run by its tile walk (one
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
#include "attnkernels/cuda_utils.cuh"
#include "attnkernels/ham_spatial.h"

namespace attnkernels {
namespace {

using cuda::block_allreduce;
using cuda::check_cuda;
using cuda::check_like_x;
using cuda::kBlock;  // threads per block in every kernel here
using cuda::kMaxGrid;
using cuda::kWarpSize;
using cuda::nan_max;
using cuda::NoCtx;
using cuda::NoState;

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
// Ops over x (cuda_reduce.cuh). Every one reads GateMask, the per-channel weights of the two
// groups, as its ChanCtx; its PixState sums over channels (d1, d2, tie counts, grad_s) and its
// ChanState over pixels (grad_gate).
// ---------------------------------------------------------------------------------------------

// gate[n,c], and mask[n,c], 1 - mask[n,c]: the weights of groups 1 and 2.
template <typename acc_t>
struct GateMask {
  acc_t gate, keep, drop;
};

template <typename acc_t>
__device__ __forceinline__ GateMask<acc_t> load_chan(const acc_t* gate, const acc_t* mask, int64_t nc) {
  const acc_t m = mask[nc];
  return {gate[nc], m, acc_t(1) - m};
}

// map[n, g, p] of an (N, 2, H, W) map.
template <typename acc_t>
__device__ __forceinline__ acc_t pair_at(const acc_t* map, int64_t n, int64_t p, int64_t hw, int g) {
  return map[(2 * n + g) * hw + p];
}

// ham_spatial_pool: d1 = [sum_c G1 / c_im, max_c G1], d2 = [sum_c G2 / max(C_sub, 1), max_c G2].
template <typename scalar_t>
struct HamPool : cuda::OpBase<scalar_t> {
  using acc_t = at::opmath_type<scalar_t>;
  using ChanCtx = GateMask<acc_t>;
  struct PixState {
    acc_t sum1, max1, sum2, max2;
  };

  const acc_t* gate;
  const acc_t* mask;
  acc_t* d1;
  acc_t* d2;
  int64_t hw;
  acc_t div1, div2;  // c_im, max(C_sub, 1)

  __device__ ChanCtx chan(int64_t nc) const { return load_chan(gate, mask, nc); }
  __device__ static PixState pix_init() {
    return {acc_t(0), static_cast<acc_t>(-INFINITY), acc_t(0), static_cast<acc_t>(-INFINITY)};
  }
  __device__ static PixState pix_combine(PixState a, PixState b) {
    return {a.sum1 + b.sum1, nan_max(a.max1, b.max1), a.sum2 + b.sum2, nan_max(a.max2, b.max2)};
  }
  __device__ acc_t visit(const ChanCtx& k, NoCtx, acc_t, acc_t x, PixState& s, NoState&) const {
    const acc_t F1 = x * k.gate;
    const acc_t G1 = F1 * k.keep;  // literal products: 0 * NaN stays NaN
    const acc_t G2 = F1 * k.drop;
    s.sum1 += G1;
    s.max1 = nan_max(s.max1, G1);
    s.sum2 += G2;
    s.max2 = nan_max(s.max2, G2);
    return acc_t(0);
  }
  __device__ void pix_finish(int64_t n, int64_t p, const PixState& s) const {
    d1[2 * n * hw + p] = s.sum1 / div1;
    d1[(2 * n + 1) * hw + p] = s.max1;
    d2[2 * n * hw + p] = s.sum2 / div2;
    d2[(2 * n + 1) * hw + p] = s.max2;
  }
};

// Per pixel, what ham_spatial_pool_backward's second pass needs of grad_d1, grad_d2:
// dG_g = avg_g + [G_g == d_g[:,1]] * share_g.
template <typename acc_t>
struct PoolGrad {
  acc_t avg1, share1, avg2, share2;  // grad_d_g[:,0] / divisor_g, grad_d_g[:,1] / cnt_g
};

// ham_spatial_pool_backward, first pass: cnt_g = #{c : G_g == d_g[:,1]}, then the PoolGrad
// record (a NaN maximum matches nothing: cnt 0, share inf or NaN, and 0 * share is NaN at
// every channel, as torch.amax's backward).
template <typename scalar_t>
struct HamPoolTies : cuda::OpBase<scalar_t> {
  using acc_t = at::opmath_type<scalar_t>;
  using ChanCtx = GateMask<acc_t>;
  struct PixState {
    int cnt1, cnt2;
  };
  struct PixCtx {
    acc_t max1, max2;
  };

  const acc_t* gate;
  const acc_t* mask;
  const acc_t* d1;
  const acc_t* d2;
  const acc_t* grad_d1;
  const acc_t* grad_d2;
  PoolGrad<acc_t>* coef;  // (N, hw)
  int64_t hw;
  acc_t div1, div2;

  __device__ ChanCtx chan(int64_t nc) const { return load_chan(gate, mask, nc); }
  __device__ PixCtx pix(int64_t n, int64_t p) const {
    return {pair_at(d1, n, p, hw, 1), pair_at(d2, n, p, hw, 1)};
  }
  __device__ static PixState pix_init() { return {0, 0}; }
  __device__ static PixState pix_combine(PixState a, PixState b) {
    return {a.cnt1 + b.cnt1, a.cnt2 + b.cnt2};
  }
  __device__ acc_t visit(const ChanCtx& k, const PixCtx& px, acc_t, acc_t x, PixState& s, NoState&) const {
    const acc_t F1 = x * k.gate;
    s.cnt1 += F1 * k.keep == px.max1;
    s.cnt2 += F1 * k.drop == px.max2;
    return acc_t(0);
  }
  __device__ void pix_finish(int64_t n, int64_t p, const PixState& s) const {
    coef[n * hw + p] = {pair_at(grad_d1, n, p, hw, 0) / div1,
                        pair_at(grad_d1, n, p, hw, 1) / static_cast<acc_t>(s.cnt1),
                        pair_at(grad_d2, n, p, hw, 0) / div2,
                        pair_at(grad_d2, n, p, hw, 1) / static_cast<acc_t>(s.cnt2)};
  }
};

// ham_spatial_pool_backward, second pass: dF1 = dG1*mask + dG2*(1 - mask); grad_x = dF1*gate;
// grad_gate = sum_p dF1*x.
template <typename scalar_t>
struct HamPoolBackward : cuda::OpBase<scalar_t> {
  using acc_t = at::opmath_type<scalar_t>;
  using ChanCtx = GateMask<acc_t>;
  struct ChanState {
    acc_t sum;
  };
  struct PixCtx {
    PoolGrad<acc_t> r;
    acc_t max1, max2;
  };
  static constexpr bool kWrites = true;

  const acc_t* gate;
  const acc_t* mask;
  const acc_t* d1;
  const acc_t* d2;
  const PoolGrad<acc_t>* coef;
  acc_t* grad_gate;
  int64_t hw;

  __device__ ChanCtx chan(int64_t nc) const { return load_chan(gate, mask, nc); }
  __device__ PixCtx pix(int64_t n, int64_t p) const {
    return {coef[n * hw + p], pair_at(d1, n, p, hw, 1), pair_at(d2, n, p, hw, 1)};
  }
  __device__ static ChanState chan_init() { return {acc_t(0)}; }
  __device__ static ChanState chan_combine(ChanState a, ChanState b) { return {a.sum + b.sum}; }
  __device__ acc_t visit(const ChanCtx& k, const PixCtx& px, acc_t, acc_t x, NoState&, ChanState& s) const {
    const acc_t F1 = x * k.gate;
    const acc_t G1 = F1 * k.keep;
    const acc_t G2 = F1 * k.drop;
    const acc_t dG1 = px.r.avg1 + static_cast<acc_t>(G1 == px.max1) * px.r.share1;
    const acc_t dG2 = px.r.avg2 + static_cast<acc_t>(G2 == px.max2) * px.r.share2;
    const acc_t dF1 = dG1 * k.keep + dG2 * k.drop;
    s.sum += dF1 * x;
    return dF1 * k.gate;
  }
  __device__ void chan_finish(int64_t nc, const ChanState& s) const { grad_gate[nc] = s.sum; }
};

// ham_spatial_apply: y = F1*mask*s1 + F1*(1 - mask)*s2.
template <typename scalar_t>
struct HamApply : cuda::OpBase<scalar_t> {
  using acc_t = at::opmath_type<scalar_t>;
  using ChanCtx = GateMask<acc_t>;
  struct PixCtx {
    acc_t s1, s2;
  };
  static constexpr bool kWrites = true;

  const acc_t* gate;
  const acc_t* mask;
  const acc_t* s1;
  const acc_t* s2;
  int64_t hw;

  __device__ ChanCtx chan(int64_t nc) const { return load_chan(gate, mask, nc); }
  __device__ PixCtx pix(int64_t n, int64_t p) const { return {s1[n * hw + p], s2[n * hw + p]}; }
  __device__ acc_t visit(const ChanCtx& k, const PixCtx& px, acc_t, acc_t x, NoState&, NoState&) const {
    const acc_t F1 = x * k.gate;
    return F1 * k.keep * px.s1 + F1 * k.drop * px.s2;
  }
};

// ham_spatial_apply_backward: dF1 = grad_y*(mask*s1 + (1 - mask)*s2); grad_x = dF1*gate;
// grad_gate = sum_p dF1*x; grad_s1 = sum_c grad_y*F1*mask; grad_s2 = sum_c grad_y*F1*(1 - mask).
template <typename scalar_t>
struct HamApplyBackward : cuda::OpBase<scalar_t> {
  using acc_t = at::opmath_type<scalar_t>;
  using ChanCtx = GateMask<acc_t>;
  struct PixState {
    acc_t gs1, gs2;
  };
  struct ChanState {
    acc_t sum;
  };
  struct PixCtx {
    acc_t s1, s2;
  };
  static constexpr bool kGradY = true;
  static constexpr bool kWrites = true;

  const acc_t* gate;
  const acc_t* mask;
  const acc_t* s1;
  const acc_t* s2;
  acc_t* grad_gate;
  acc_t* grad_s1;
  acc_t* grad_s2;
  int64_t hw;

  __device__ ChanCtx chan(int64_t nc) const { return load_chan(gate, mask, nc); }
  __device__ PixCtx pix(int64_t n, int64_t p) const { return {s1[n * hw + p], s2[n * hw + p]}; }
  __device__ static PixState pix_init() { return {acc_t(0), acc_t(0)}; }
  __device__ static PixState pix_combine(PixState a, PixState b) {
    return {a.gs1 + b.gs1, a.gs2 + b.gs2};
  }
  __device__ static ChanState chan_init() { return {acc_t(0)}; }
  __device__ static ChanState chan_combine(ChanState a, ChanState b) { return {a.sum + b.sum}; }
  __device__ acc_t visit(const ChanCtx& k, const PixCtx& px, acc_t grad_y, acc_t x, PixState& ps,
                         ChanState& cs) const {
    const acc_t F1 = x * k.gate;
    const acc_t dF1 = grad_y * (k.keep * px.s1 + k.drop * px.s2);
    const acc_t gF1 = grad_y * F1;
    ps.gs1 += gF1 * k.keep;
    ps.gs2 += gF1 * k.drop;
    cs.sum += dF1 * x;
    return dF1 * k.gate;
  }
  __device__ void pix_finish(int64_t n, int64_t p, const PixState& s) const {
    grad_s1[n * hw + p] = s.gs1;
    grad_s2[n * hw + p] = s.gs2;
  }
  __device__ void chan_finish(int64_t nc, const ChanState& s) const { grad_gate[nc] = s.sum; }
};

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

// ---- argument checks (messages as the CPU kernels') ----

void check_x(const at::Tensor& x, const char* op) {
  check_feature_map(x, op, "x");
  AK_CHECK_VALUE(x.is_cuda(), op, ": x must be a CUDA tensor, got ", x.device());
}

// check_pixel_map (ham_spatial.h), and on a CUDA device.
void check_cuda_pixel_map(const at::Tensor& t, const at::Tensor& x, int64_t k, const char* op, const char* name) {
  check_pixel_map(t, x, k, op, name);
  check_cuda(t, x, op, name);
}

at::Tensor pixel_map(const at::Tensor& x, int64_t k) {
  return at::empty({x.size(0), k, x.size(2), x.size(3)}, x.options().dtype(acc_type(x.scalar_type())));
}

// ---- the ops ----

std::tuple<at::Tensor, at::Tensor, at::Tensor> ham_spatial_pool_cuda(const at::Tensor& x_in,
                                                                     const at::Tensor& gate_in,
                                                                     int64_t c_im) {
  constexpr const char* op = "ham_spatial_pool";
  check_x(x_in, op);
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
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "ham_spatial_pool_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    launch_topk_mask<acc_t>(gate, mask, c_im);
    if (x.numel() > 0) {
      const HamPool<scalar_t> pool{{},
                                   gate.data_ptr<acc_t>(),
                                   mask.data_ptr<acc_t>(),
                                   d1.data_ptr<acc_t>(),
                                   d2.data_ptr<acc_t>(),
                                   x.size(2) * x.size(3),
                                   static_cast<acc_t>(c_im),
                                   static_cast<acc_t>(std::max<int64_t>(C - c_im, 1))};
      cuda::walk(pool, x, at::Tensor(), at::Tensor());
    }
  });
  return {d1, d2, mask};
}

std::tuple<at::Tensor, at::Tensor> ham_spatial_pool_backward_cuda(
    const at::Tensor& grad_d1_in, const at::Tensor& grad_d2_in, const at::Tensor& x_in,
    const at::Tensor& gate_in, const at::Tensor& mask_in, const at::Tensor& d1_in,
    const at::Tensor& d2_in, int64_t c_im) {
  constexpr const char* op = "ham_spatial_pool_backward";
  check_x(x_in, op);
  check_cuda_pixel_map(grad_d1_in, x_in, 2, op, "grad_d1");
  check_cuda_pixel_map(grad_d2_in, x_in, 2, op, "grad_d2");
  check_per_channel(gate_in, x_in, op, "gate");
  check_per_channel(mask_in, x_in, op, "mask");
  check_cuda_pixel_map(d1_in, x_in, 2, op, "d1");
  check_cuda_pixel_map(d2_in, x_in, 2, op, "d2");
  check_c_im(c_im, x_in.size(1), op);
  c10::cuda::CUDAGuard device_guard(x_in.device());
  const at::Tensor x = dense(x_in);
  const at::Tensor grad_d1 = grad_d1_in.contiguous(), grad_d2 = grad_d2_in.contiguous();
  const at::Tensor gate = gate_in.contiguous(), mask = mask_in.contiguous();
  const at::Tensor d1 = d1_in.contiguous(), d2 = d2_in.contiguous();
  const int64_t N = x.size(0), C = x.size(1), hw = x.size(2) * x.size(3);
  at::Tensor grad_x = empty_like_layout(x);
  at::Tensor grad_gate = at::empty_like(gate);
  if (x.numel() == 0) {
    grad_gate.zero_();  // an empty sum over the pixels
    return {grad_x, grad_gate};
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, x.scalar_type(), "ham_spatial_pool_backward_cuda", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        const acc_t div1 = static_cast<acc_t>(c_im);
        const acc_t div2 = static_cast<acc_t>(std::max<int64_t>(C - c_im, 1));
        // First pass: the tie counts of the two maxima -> per-pixel coefficients.
        at::Tensor coef = at::empty({N, hw, 4}, gate.options());
        auto* coef_ptr = reinterpret_cast<PoolGrad<acc_t>*>(coef.data_ptr<acc_t>());
        const HamPoolTies<scalar_t> count{{},
                                          gate.data_ptr<acc_t>(),    mask.data_ptr<acc_t>(),
                                          d1.data_ptr<acc_t>(),      d2.data_ptr<acc_t>(),
                                          grad_d1.data_ptr<acc_t>(), grad_d2.data_ptr<acc_t>(),
                                          coef_ptr,                  hw,
                                          div1,                      div2};
        cuda::walk(count, x, at::Tensor(), at::Tensor());
        // Second pass: grad_x and grad_gate.
        const HamPoolBackward<scalar_t> write{{},
                                              gate.data_ptr<acc_t>(), mask.data_ptr<acc_t>(),
                                              d1.data_ptr<acc_t>(),   d2.data_ptr<acc_t>(),
                                              coef_ptr,               grad_gate.data_ptr<acc_t>(),
                                              hw};
        cuda::walk(write, x, at::Tensor(), grad_x);
      });
  return {grad_x, grad_gate};
}

at::Tensor ham_spatial_apply_cuda(const at::Tensor& x_in, const at::Tensor& gate_in,
                                  const at::Tensor& mask_in, const at::Tensor& s1_in,
                                  const at::Tensor& s2_in) {
  constexpr const char* op = "ham_spatial_apply";
  check_x(x_in, op);
  check_per_channel(gate_in, x_in, op, "gate");
  check_per_channel(mask_in, x_in, op, "mask");
  check_cuda_pixel_map(s1_in, x_in, 1, op, "s1");
  check_cuda_pixel_map(s2_in, x_in, 1, op, "s2");
  c10::cuda::CUDAGuard device_guard(x_in.device());
  const at::Tensor x = dense(x_in);
  const at::Tensor gate = gate_in.contiguous(), mask = mask_in.contiguous();
  const at::Tensor s1 = s1_in.contiguous(), s2 = s2_in.contiguous();
  at::Tensor y = empty_like_layout(x);
  if (x.numel() == 0) {
    return y;
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "ham_spatial_apply_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const HamApply<scalar_t> apply{{}, gate.data_ptr<acc_t>(), mask.data_ptr<acc_t>(),
                                   s1.data_ptr<acc_t>(), s2.data_ptr<acc_t>(),
                                   x.size(2) * x.size(3)};
    cuda::walk(apply, x, at::Tensor(), y);
  });
  return y;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> ham_spatial_apply_backward_cuda(
    const at::Tensor& grad_y_in, const at::Tensor& x_in, const at::Tensor& gate_in,
    const at::Tensor& mask_in, const at::Tensor& s1_in, const at::Tensor& s2_in) {
  constexpr const char* op = "ham_spatial_apply_backward";
  check_x(x_in, op);
  check_like_x(grad_y_in, x_in, op, "grad_y");
  check_per_channel(gate_in, x_in, op, "gate");
  check_per_channel(mask_in, x_in, op, "mask");
  check_cuda_pixel_map(s1_in, x_in, 1, op, "s1");
  check_cuda_pixel_map(s2_in, x_in, 1, op, "s2");
  c10::cuda::CUDAGuard device_guard(x_in.device());
  const at::Tensor x = dense(x_in);
  // grad_y in x's layout (a copy only if it differs), so one offset serves both.
  const at::Tensor grad_y = grad_y_in.contiguous(memory_format_of(layout_of(x)));
  const at::Tensor gate = gate_in.contiguous(), mask = mask_in.contiguous();
  const at::Tensor s1 = s1_in.contiguous(), s2 = s2_in.contiguous();
  at::Tensor grad_x = empty_like_layout(x);
  at::Tensor grad_gate = at::empty_like(gate);
  at::Tensor grad_s1 = pixel_map(x, 1);
  at::Tensor grad_s2 = pixel_map(x, 1);
  if (x.numel() == 0) {  // empty sums
    grad_gate.zero_();
    grad_s1.zero_();
    grad_s2.zero_();
    return {grad_x, grad_gate, grad_s1, grad_s2};
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, x.scalar_type(), "ham_spatial_apply_backward_cuda", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        const HamApplyBackward<scalar_t> backward{
            {},
            gate.data_ptr<acc_t>(),    mask.data_ptr<acc_t>(),      s1.data_ptr<acc_t>(),
            s2.data_ptr<acc_t>(),      grad_gate.data_ptr<acc_t>(), grad_s1.data_ptr<acc_t>(),
            grad_s2.data_ptr<acc_t>(), x.size(2) * x.size(3)};
        cuda::walk(backward, x, grad_y, grad_x);
      });
  return {grad_x, grad_gate, grad_s1, grad_s2};
}

}  // namespace
}  // namespace attnkernels

TORCH_LIBRARY_IMPL(attnkernels, CUDA, m) {
  m.impl("ham_spatial_pool", &attnkernels::ham_spatial_pool_cuda);
  m.impl("ham_spatial_pool_backward", &attnkernels::ham_spatial_pool_backward_cuda);
  m.impl("ham_spatial_apply", &attnkernels::ham_spatial_apply_cuda);
  m.impl("ham_spatial_apply_backward", &attnkernels::ham_spatial_apply_backward_cuda);
}
