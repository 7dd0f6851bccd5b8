// The spatial pooling and apply passes over x that cuda/ham_spatial.cu and cuda/cbam_spatial.cu
// share: ops of attnkernels/cuda_reduce.cuh (cuda::OpBase, run by cuda::walk) and their host
// launchers. The math is in csrc/ham_spatial_ops.cpp and csrc/cbam_spatial_ops.cpp.
//
// Every op takes kOneGroup, a compile-time flag:
//   false  ham_spatial's two groups, G1 = F1 * mask and G2 = F1 * (1 - mask) (literal products).
//   true   cbam_spatial's one group G1 = F1 = x * gate over all C channels: no mask load, no
//          G2, no second sum, maximum, tie count or spatial gate. Not the false case with
//          mask = 1: that would still form F1 * 0 * s2, NaN where F1 is inf or NaN.
// With kOneGroup false the states, contexts and expressions are ham_spatial's as they were
// before the flag, member for member, so its kernels compile to the same code.
// The one-group ops ignore their group-2 pointers (mask, d2, grad_d2, s2, grad_s2): null.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>

#include <cmath>
#include <tuple>

#include "attnkernels/common.h"
#include "attnkernels/cuda_reduce.cuh"
#include "attnkernels/cuda_utils.cuh"
#include "attnkernels/ham_spatial.h"

namespace attnkernels {
namespace cuda {

// ---------------------------------------------------------------------------------------------
// Per-channel and per-pixel values, one or two groups. Member order is ham_spatial's (it sets
// the registers' and shared memory's layout).
// ---------------------------------------------------------------------------------------------

// gate[n,c], and mask[n,c], 1 - mask[n,c]: the weights of groups 1 and 2.
template <typename acc_t, bool kOneGroup>
struct GateMask {
  acc_t gate, keep, drop;
};
template <typename acc_t>
struct GateMask<acc_t, true> {
  acc_t gate;
};

template <bool kOneGroup, typename acc_t>
__device__ __forceinline__ GateMask<acc_t, kOneGroup> load_chan(const acc_t* gate, const acc_t* mask,
                                                                int64_t nc) {
  if constexpr (kOneGroup) {
    return {gate[nc]};
  } else {
    const acc_t m = mask[nc];
    return {gate[nc], m, acc_t(1) - m};
  }
}

// The pool's running sums and maxima over the channels of one pixel.
template <typename acc_t, bool kOneGroup>
struct PoolSums {
  acc_t sum1, max1, sum2, max2;
};
template <typename acc_t>
struct PoolSums<acc_t, true> {
  acc_t sum1, max1;
};

// Per pixel, what the pool backward's second pass needs of grad_d1 (grad_d2):
// dG_g = avg_g + [G_g == d_g[:,1]] * share_g.
template <typename acc_t, bool kOneGroup>
struct PoolGrad {
  acc_t avg1, share1, avg2, share2;  // grad_d_g[:,0] / divisor_g, grad_d_g[:,1] / cnt_g
};
template <typename acc_t>
struct PoolGrad<acc_t, true> {
  acc_t avg1, share1;
};

// The maxima d_g[n,1,p] the tie counts compare with.
template <typename acc_t, bool kOneGroup>
struct Maxima {
  acc_t max1, max2;
};
template <typename acc_t>
struct Maxima<acc_t, true> {
  acc_t max1;
};

template <bool kOneGroup>
struct TieCounts {
  int cnt1, cnt2;
};
template <>
struct TieCounts<true> {
  int cnt1;
};

// The spatial gates s_g[n,0,p] of the apply (and their gradients grad_s_g in its backward).
template <typename acc_t, bool kOneGroup>
struct Spatial {
  acc_t s1, s2;
};
template <typename acc_t>
struct Spatial<acc_t, true> {
  acc_t s1;
};

template <bool kOneGroup, typename acc_t>
__device__ __forceinline__ Spatial<acc_t, kOneGroup> load_spatial(const acc_t* s1, const acc_t* s2, int64_t i) {
  if constexpr (kOneGroup) {
    return {s1[i]};
  } else {
    return {s1[i], s2[i]};
  }
}

// The spatial gate element (n, c, p) sees: s1 (one group), else mask*s1 + (1 - mask)*s2.
template <typename acc_t, bool kOneGroup>
__device__ __forceinline__ acc_t spatial_gate(const GateMask<acc_t, kOneGroup>& k, const Spatial<acc_t, kOneGroup>& s) {
  if constexpr (kOneGroup) {
    return s.s1;
  } else {
    return k.keep * s.s1 + k.drop * s.s2;
  }
}

// map[n, g, p] of an (N, 2, H, W) map.
template <typename acc_t>
__device__ __forceinline__ acc_t pair_at(const acc_t* map, int64_t n, int64_t p, int64_t hw, int g) {
  return map[(2 * n + g) * hw + p];
}

template <bool kOneGroup, typename acc_t>
__device__ __forceinline__ Maxima<acc_t, kOneGroup> load_maxima(const acc_t* d1, const acc_t* d2, int64_t n,
                                                                int64_t p, int64_t hw) {
  if constexpr (kOneGroup) {
    return {pair_at(d1, n, p, hw, 1)};
  } else {
    return {pair_at(d1, n, p, hw, 1), pair_at(d2, n, p, hw, 1)};
  }
}

// ---------------------------------------------------------------------------------------------
// Ops over x. Every one reads GateMask as its ChanCtx; its PixState sums over channels (d1, d2,
// tie counts, grad_s) and its ChanState over pixels (grad_gate).
// ---------------------------------------------------------------------------------------------

// d1 = [sum_c G1 / div1, max_c G1], d2 = [sum_c G2 / div2, max_c G2] (ham: div1 = c_im,
// div2 = max(C_sub, 1); cbam: d = d1, div1 = C).
template <typename scalar_t, bool kOneGroup>
struct HamPool : OpBase<scalar_t> {
  using acc_t = at::opmath_type<scalar_t>;
  using ChanCtx = GateMask<acc_t, kOneGroup>;
  using PixState = PoolSums<acc_t, kOneGroup>;

  const acc_t* gate;
  const acc_t* mask;
  acc_t* d1;
  acc_t* d2;
  int64_t hw;
  acc_t div1, div2;

  __device__ ChanCtx chan(int64_t nc) const { return load_chan<kOneGroup>(gate, mask, nc); }
  __device__ static PixState pix_init() {
    if constexpr (kOneGroup) {
      return {acc_t(0), static_cast<acc_t>(-INFINITY)};
    } else {
      return {acc_t(0), static_cast<acc_t>(-INFINITY), acc_t(0), static_cast<acc_t>(-INFINITY)};
    }
  }
  __device__ static PixState pix_combine(PixState a, PixState b) {
    if constexpr (kOneGroup) {
      return {a.sum1 + b.sum1, nan_max(a.max1, b.max1)};
    } else {
      return {a.sum1 + b.sum1, nan_max(a.max1, b.max1), a.sum2 + b.sum2, nan_max(a.max2, b.max2)};
    }
  }
  __device__ acc_t visit(const ChanCtx& k, NoCtx, acc_t, acc_t x, PixState& s, NoState&) const {
    const acc_t F1 = x * k.gate;
    if constexpr (kOneGroup) {
      s.sum1 += F1;
      s.max1 = nan_max(s.max1, F1);
    } else {
      const acc_t G1 = F1 * k.keep;  // literal products: 0 * NaN stays NaN
      const acc_t G2 = F1 * k.drop;
      s.sum1 += G1;
      s.max1 = nan_max(s.max1, G1);
      s.sum2 += G2;
      s.max2 = nan_max(s.max2, G2);
    }
    return acc_t(0);
  }
  __device__ void pix_finish(int64_t n, int64_t p, const PixState& s) const {
    d1[2 * n * hw + p] = s.sum1 / div1;
    d1[(2 * n + 1) * hw + p] = s.max1;
    if constexpr (!kOneGroup) {
      d2[2 * n * hw + p] = s.sum2 / div2;
      d2[(2 * n + 1) * hw + p] = s.max2;
    }
  }
};

// Pool backward, first pass: cnt_g = #{c : G_g == d_g[:,1]}, then the PoolGrad record (a NaN
// maximum matches nothing: cnt 0, share inf or NaN, and 0 * share is NaN at every channel, as
// torch.amax's backward).
template <typename scalar_t, bool kOneGroup>
struct HamPoolTies : OpBase<scalar_t> {
  using acc_t = at::opmath_type<scalar_t>;
  using ChanCtx = GateMask<acc_t, kOneGroup>;
  using PixState = TieCounts<kOneGroup>;
  using PixCtx = Maxima<acc_t, kOneGroup>;

  const acc_t* gate;
  const acc_t* mask;
  const acc_t* d1;
  const acc_t* d2;
  const acc_t* grad_d1;
  const acc_t* grad_d2;
  PoolGrad<acc_t, kOneGroup>* coef;  // (N, hw)
  int64_t hw;
  acc_t div1, div2;

  __device__ ChanCtx chan(int64_t nc) const { return load_chan<kOneGroup>(gate, mask, nc); }
  __device__ PixCtx pix(int64_t n, int64_t p) const { return load_maxima<kOneGroup>(d1, d2, n, p, hw); }
  __device__ static PixState pix_init() {
    if constexpr (kOneGroup) {
      return {0};
    } else {
      return {0, 0};
    }
  }
  __device__ static PixState pix_combine(PixState a, PixState b) {
    if constexpr (kOneGroup) {
      return {a.cnt1 + b.cnt1};
    } else {
      return {a.cnt1 + b.cnt1, a.cnt2 + b.cnt2};
    }
  }
  __device__ acc_t visit(const ChanCtx& k, const PixCtx& px, acc_t, acc_t x, PixState& s, NoState&) const {
    const acc_t F1 = x * k.gate;
    if constexpr (kOneGroup) {
      s.cnt1 += F1 == px.max1;
    } else {
      s.cnt1 += F1 * k.keep == px.max1;
      s.cnt2 += F1 * k.drop == px.max2;
    }
    return acc_t(0);
  }
  __device__ void pix_finish(int64_t n, int64_t p, const PixState& s) const {
    if constexpr (kOneGroup) {
      // share first: in the other order ptxas (CUDA 13, sm_90) spills a loop invariant of
      // walk_nchw_kernel<2, double> around the division's slow-path calls.
      const acc_t share1 = pair_at(grad_d1, n, p, hw, 1) / static_cast<acc_t>(s.cnt1);
      coef[n * hw + p] = {pair_at(grad_d1, n, p, hw, 0) / div1, share1};
    } else {
      coef[n * hw + p] = {pair_at(grad_d1, n, p, hw, 0) / div1,
                          pair_at(grad_d1, n, p, hw, 1) / static_cast<acc_t>(s.cnt1),
                          pair_at(grad_d2, n, p, hw, 0) / div2,
                          pair_at(grad_d2, n, p, hw, 1) / static_cast<acc_t>(s.cnt2)};
    }
  }
};

// Pool backward, second pass: dF1 = dG1*mask + dG2*(1 - mask) (one group: dF1 = dG1);
// grad_x = dF1*gate; grad_gate = sum_p dF1*x.
template <typename scalar_t, bool kOneGroup>
struct HamPoolBackward : OpBase<scalar_t> {
  using acc_t = at::opmath_type<scalar_t>;
  using ChanCtx = GateMask<acc_t, kOneGroup>;
  struct ChanState {
    acc_t sum;
  };
  struct PixCtx {
    PoolGrad<acc_t, kOneGroup> r;
    Maxima<acc_t, kOneGroup> m;
  };
  static constexpr bool kWrites = true;

  const acc_t* gate;
  const acc_t* mask;
  const acc_t* d1;
  const acc_t* d2;
  const PoolGrad<acc_t, kOneGroup>* coef;
  acc_t* grad_gate;
  int64_t hw;

  __device__ ChanCtx chan(int64_t nc) const { return load_chan<kOneGroup>(gate, mask, nc); }
  __device__ PixCtx pix(int64_t n, int64_t p) const {
    return {coef[n * hw + p], load_maxima<kOneGroup>(d1, d2, n, p, hw)};
  }
  __device__ static ChanState chan_init() { return {acc_t(0)}; }
  __device__ static ChanState chan_combine(ChanState a, ChanState b) { return {a.sum + b.sum}; }
  __device__ acc_t visit(const ChanCtx& k, const PixCtx& px, acc_t, acc_t x, NoState&, ChanState& s) const {
    const acc_t F1 = x * k.gate;
    acc_t dF1;
    if constexpr (kOneGroup) {
      // The tie indicator is a literal product (csrc/cbam_spatial_ops.cpp's NaN rule).
      dF1 = px.r.avg1 + static_cast<acc_t>(F1 == px.m.max1) * px.r.share1;
    } else {
      const acc_t G1 = F1 * k.keep;
      const acc_t G2 = F1 * k.drop;
      const acc_t dG1 = px.r.avg1 + static_cast<acc_t>(G1 == px.m.max1) * px.r.share1;
      const acc_t dG2 = px.r.avg2 + static_cast<acc_t>(G2 == px.m.max2) * px.r.share2;
      dF1 = dG1 * k.keep + dG2 * k.drop;
    }
    s.sum += dF1 * x;
    return dF1 * k.gate;
  }
  __device__ void chan_finish(int64_t nc, const ChanState& s) const { grad_gate[nc] = s.sum; }
};

// y = F1*mask*s1 + F1*(1 - mask)*s2 (one group: y = F1*s1).
template <typename scalar_t, bool kOneGroup>
struct HamApply : OpBase<scalar_t> {
  using acc_t = at::opmath_type<scalar_t>;
  using ChanCtx = GateMask<acc_t, kOneGroup>;
  using PixCtx = Spatial<acc_t, kOneGroup>;
  static constexpr bool kWrites = true;

  const acc_t* gate;
  const acc_t* mask;
  const acc_t* s1;
  const acc_t* s2;
  int64_t hw;

  __device__ ChanCtx chan(int64_t nc) const { return load_chan<kOneGroup>(gate, mask, nc); }
  __device__ PixCtx pix(int64_t n, int64_t p) const { return load_spatial<kOneGroup>(s1, s2, n * hw + p); }
  __device__ acc_t visit(const ChanCtx& k, const PixCtx& px, acc_t, acc_t x, NoState&, NoState&) const {
    const acc_t F1 = x * k.gate;
    if constexpr (kOneGroup) {
      return F1 * px.s1;
    } else {
      return F1 * k.keep * px.s1 + F1 * k.drop * px.s2;
    }
  }
};

// dF1 = grad_y*(mask*s1 + (1 - mask)*s2) (one group: grad_y*s1); grad_x = dF1*gate;
// grad_gate = sum_p dF1*x; grad_s1 = sum_c grad_y*F1*mask; grad_s2 = sum_c grad_y*F1*(1 - mask)
// (one group: grad_s1 = sum_c grad_y*F1).
template <typename scalar_t, bool kOneGroup>
struct HamApplyBackward : OpBase<scalar_t> {
  using acc_t = at::opmath_type<scalar_t>;
  using ChanCtx = GateMask<acc_t, kOneGroup>;
  using PixState = Spatial<acc_t, kOneGroup>;  // grad_s1, grad_s2
  struct ChanState {
    acc_t sum;
  };
  using PixCtx = Spatial<acc_t, kOneGroup>;
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

  __device__ ChanCtx chan(int64_t nc) const { return load_chan<kOneGroup>(gate, mask, nc); }
  __device__ PixCtx pix(int64_t n, int64_t p) const { return load_spatial<kOneGroup>(s1, s2, n * hw + p); }
  __device__ static PixState pix_init() {
    if constexpr (kOneGroup) {
      return {acc_t(0)};
    } else {
      return {acc_t(0), acc_t(0)};
    }
  }
  __device__ static PixState pix_combine(PixState a, PixState b) {
    if constexpr (kOneGroup) {
      return {a.s1 + b.s1};
    } else {
      return {a.s1 + b.s1, a.s2 + b.s2};
    }
  }
  __device__ static ChanState chan_init() { return {acc_t(0)}; }
  __device__ static ChanState chan_combine(ChanState a, ChanState b) { return {a.sum + b.sum}; }
  __device__ acc_t visit(const ChanCtx& k, const PixCtx& px, acc_t grad_y, acc_t x, PixState& ps,
                         ChanState& cs) const {
    const acc_t F1 = x * k.gate;
    const acc_t dF1 = grad_y * spatial_gate(k, px);
    const acc_t gF1 = grad_y * F1;
    if constexpr (kOneGroup) {
      ps.s1 += gF1;
    } else {
      ps.s1 += gF1 * k.keep;
      ps.s2 += gF1 * k.drop;
    }
    cs.sum += dF1 * x;
    return dF1 * k.gate;
  }
  __device__ void pix_finish(int64_t n, int64_t p, const PixState& s) const {
    grad_s1[n * hw + p] = s.s1;
    if constexpr (!kOneGroup) grad_s2[n * hw + p] = s.s2;
  }
  __device__ void chan_finish(int64_t nc, const ChanState& s) const { grad_gate[nc] = s.sum; }
};

// ---------------------------------------------------------------------------------------------
// Host side: argument checks, and the passes of each op from its outputs' allocation on. The
// callers have checked the arguments, set the device and made x dense and every small map
// contiguous in acc(x); a one-group call passes undefined tensors (at::Tensor()) for the
// group-2 maps, and gets undefined ones back. Divisors are counts, divided by in acc(x).
// ---------------------------------------------------------------------------------------------

// check_pixel_map (ham_spatial.h), and on a CUDA device.
inline void check_cuda_pixel_map(const at::Tensor& t, const at::Tensor& x, int64_t k, const char* op,
                                 const char* name) {
  check_pixel_map(t, x, k, op, name);
  check_cuda(t, x, op, name);
}

// t's data, or null for an undefined t (a map the one-group ops do not have).
template <typename T>
T* data_or_null(const at::Tensor& t) {
  return t.defined() ? t.data_ptr<T>() : nullptr;
}

// d1 (and d2), allocated by the caller; x.numel() > 0.
template <bool kOneGroup>
void spatial_pool(const at::Tensor& x, const at::Tensor& gate, const at::Tensor& mask, const at::Tensor& d1,
                  const at::Tensor& d2, int64_t div1, int64_t div2) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "spatial_pool_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const HamPool<scalar_t, kOneGroup> pool{{},
                                            gate.data_ptr<acc_t>(),
                                            data_or_null<acc_t>(mask),
                                            d1.data_ptr<acc_t>(),
                                            data_or_null<acc_t>(d2),
                                            x.size(2) * x.size(3),
                                            static_cast<acc_t>(div1),
                                            static_cast<acc_t>(div2)};
    walk(pool, x, at::Tensor(), at::Tensor());
  });
}

// (grad_x, grad_gate): the tie counts of the maxima -> per-pixel coefficients, then a second
// pass for grad_x and grad_gate.
template <bool kOneGroup>
std::tuple<at::Tensor, at::Tensor> spatial_pool_backward(const at::Tensor& grad_d1, const at::Tensor& grad_d2,
                                                         const at::Tensor& x, const at::Tensor& gate,
                                                         const at::Tensor& mask, const at::Tensor& d1,
                                                         const at::Tensor& d2, int64_t div1, int64_t div2) {
  at::Tensor grad_x = empty_like_layout(x);
  at::Tensor grad_gate = at::empty_like(gate);
  if (x.numel() == 0) {
    grad_gate.zero_();  // an empty sum over the pixels
    return {grad_x, grad_gate};
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "spatial_pool_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    using Coef = PoolGrad<acc_t, kOneGroup>;
    const int64_t hw = x.size(2) * x.size(3);
    constexpr int64_t kPerPixel = sizeof(Coef) / sizeof(acc_t);
    at::Tensor coef = at::empty({x.size(0), hw, kPerPixel}, gate.options());
    auto* coef_ptr = reinterpret_cast<Coef*>(coef.data_ptr<acc_t>());
    const acc_t* mask_ptr = data_or_null<acc_t>(mask);
    const acc_t* d2_ptr = data_or_null<acc_t>(d2);
    const HamPoolTies<scalar_t, kOneGroup> count{{},
                                                 gate.data_ptr<acc_t>(),
                                                 mask_ptr,
                                                 d1.data_ptr<acc_t>(),
                                                 d2_ptr,
                                                 grad_d1.data_ptr<acc_t>(),
                                                 data_or_null<acc_t>(grad_d2),
                                                 coef_ptr,
                                                 hw,
                                                 static_cast<acc_t>(div1),
                                                 static_cast<acc_t>(div2)};
    walk(count, x, at::Tensor(), at::Tensor());
    const HamPoolBackward<scalar_t, kOneGroup> write{
        {}, gate.data_ptr<acc_t>(), mask_ptr, d1.data_ptr<acc_t>(), d2_ptr, coef_ptr, grad_gate.data_ptr<acc_t>(), hw};
    walk(write, x, at::Tensor(), grad_x);
  });
  return {grad_x, grad_gate};
}

// y, in x's layout.
template <bool kOneGroup>
at::Tensor spatial_apply(const at::Tensor& x, const at::Tensor& gate, const at::Tensor& mask, const at::Tensor& s1,
                         const at::Tensor& s2) {
  at::Tensor y = empty_like_layout(x);
  if (x.numel() == 0) {
    return y;
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "spatial_apply_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const HamApply<scalar_t, kOneGroup> apply{{},
                                              gate.data_ptr<acc_t>(),
                                              data_or_null<acc_t>(mask),
                                              s1.data_ptr<acc_t>(),
                                              data_or_null<acc_t>(s2),
                                              x.size(2) * x.size(3)};
    walk(apply, x, at::Tensor(), y);
  });
  return y;
}

// (grad_x, grad_gate, grad_s1, grad_s2) in one pass; grad_y is in x's layout, so one offset
// serves both.
template <bool kOneGroup>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> spatial_apply_backward(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& gate, const at::Tensor& mask,
    const at::Tensor& s1, const at::Tensor& s2) {
  at::Tensor grad_x = empty_like_layout(x);
  at::Tensor grad_gate = at::empty_like(gate);
  at::Tensor grad_s1 = pixel_map(x, 1);
  at::Tensor grad_s2 = kOneGroup ? at::Tensor() : pixel_map(x, 1);
  if (x.numel() == 0) {  // empty sums
    grad_gate.zero_();
    grad_s1.zero_();
    if (grad_s2.defined()) grad_s2.zero_();
    return {grad_x, grad_gate, grad_s1, grad_s2};
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "spatial_apply_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const HamApplyBackward<scalar_t, kOneGroup> backward{{},
                                                         gate.data_ptr<acc_t>(),
                                                         data_or_null<acc_t>(mask),
                                                         s1.data_ptr<acc_t>(),
                                                         data_or_null<acc_t>(s2),
                                                         grad_gate.data_ptr<acc_t>(),
                                                         grad_s1.data_ptr<acc_t>(),
                                                         data_or_null<acc_t>(grad_s2),
                                                         x.size(2) * x.size(3)};
    walk(backward, x, grad_y, grad_x);
  });
  return {grad_x, grad_gate, grad_s1, grad_s2};
}

}  // namespace cuda
}  // namespace attnkernels
