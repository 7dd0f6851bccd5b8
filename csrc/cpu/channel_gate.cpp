// CPU kernels of the channel_gate hot path; the math is in csrc/channel_gate_ops.cpp.
//
// Layouts: NCHW walks each (n, c) plane of H*W contiguous values, one plane per task;
// channels_last walks pixel rows of C contiguous values, one (n, channel block) per task,
// so both formats are read in place. Every reduction runs in one task in a fixed order:
// results are bitwise identical run to run, whatever the thread count.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

#include "attnkernels/channel_gate.h"
#include "attnkernels/cpu_plane_stats.h"
#include "attnkernels/cpu_sample.h"
#include "attnkernels/cpu_vec.h"

namespace attnkernels {
namespace {

using at::vec::Vectorized;

// Channels per channels_last task: a multiple of every vector width, small enough that
// the task's partial sums stay in L1.
constexpr int64_t kChannelBlock = 256;

// Calls f(n, c0, c1) for every (sample, channel block), in parallel.
template <typename F>
void for_channel_blocks(int64_t N, int64_t C, const F& f) {
  const int64_t blocks = (C + kChannelBlock - 1) / kChannelBlock;
  at::parallel_for(0, N * blocks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t n = t / blocks, c0 = (t % blocks) * kChannelBlock;
      f(n, c0, std::min(C, c0 + kChannelBlock));
    }
  });
}

// Grain for tasks over planes: about 32K elements, so tiny planes are batched.
using cpu_stats::plane_grain;

// ---------------------------------------------------------------- channel_pool

// kUnroll independent accumulators per plane: one add chain per vector register would stall
// on the add latency once x[n] sits in cache (channel_attention's second visit). The vector
// max does not propagate NaN (max_ignoring_nan: one instruction, not three); a plane or channel
// whose sum is NaN is searched for a NaN afterwards (has_nan), and its max is NaN if one is found.
// max == nullptr pools the mean alone (SE's and Bridge's gates read no max): one add per value.
constexpr int kUnroll = 4;

template <bool kWithMax, typename scalar_t>
void pool_nchw_impl(const scalar_t* x, int64_t planes, int64_t hw, at::opmath_type<scalar_t>* avg,
                    at::opmath_type<scalar_t>* max) {
  using S = Step<scalar_t>;
  using acc_t = typename S::acc_t;
  using AccVec = typename S::AccVec;
  constexpr int64_t kStride = kUnroll * S::kWidth;
  at::parallel_for(0, planes, plane_grain(hw), [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p) {
      const scalar_t* xp = x + p * hw;
      AccVec vsum[kUnroll][S::kVecs], vmax[kUnroll][S::kVecs], v[S::kVecs];
      for (int u = 0; u < kUnroll; ++u) {
        for (int k = 0; k < S::kVecs; ++k) {
          vsum[u][k] = AccVec(0);
          vmax[u][k] = AccVec(-std::numeric_limits<acc_t>::infinity());
        }
      }
      int64_t i = 0;
      for (; i + kStride <= hw; i += kStride) {
        for (int u = 0; u < kUnroll; ++u) {
          S::load(xp + i + u * S::kWidth, v);
          for (int k = 0; k < S::kVecs; ++k) {
            vsum[u][k] += v[k];
            if constexpr (kWithMax) vmax[u][k] = max_ignoring_nan(vmax[u][k], v[k]);
          }
        }
      }
      for (; i + S::kWidth <= hw; i += S::kWidth) {
        S::load(xp + i, v);
        for (int k = 0; k < S::kVecs; ++k) {
          vsum[0][k] += v[k];
          if constexpr (kWithMax) vmax[0][k] = max_ignoring_nan(vmax[0][k], v[k]);
        }
      }
      acc_t sum = 0, m = -std::numeric_limits<acc_t>::infinity();
      for (int k = 0; k < S::kVecs; ++k) {
        AccVec s = vsum[0][k], mx = vmax[0][k];
        for (int u = 1; u < kUnroll; ++u) {
          s += vsum[u][k];
          if constexpr (kWithMax) mx = at::vec::maximum(mx, vmax[u][k]);
        }
        sum += reduce_sum(s);
        if constexpr (kWithMax) m = nan_max(m, reduce_max(mx));
      }
      for (; i < hw; ++i) {
        const acc_t xv = static_cast<acc_t>(xp[i]);
        sum += xv;
        if constexpr (kWithMax) m = nan_max(m, xv);
      }
      avg[p] = sum / static_cast<acc_t>(hw);
      if constexpr (kWithMax) max[p] = std::isnan(sum) && has_nan(xp, hw) ? std::numeric_limits<acc_t>::quiet_NaN() : m;
    }
  });
}

template <typename scalar_t>
void pool_nchw(const scalar_t* x, int64_t planes, int64_t hw, at::opmath_type<scalar_t>* avg,
               at::opmath_type<scalar_t>* max) {
  with_flag(max != nullptr, [&](auto with_max) { pool_nchw_impl<decltype(with_max)::value>(x, planes, hw, avg, max); });
}

template <bool kWithMax, typename scalar_t>
void pool_channels_last_impl(const scalar_t* x, int64_t N, int64_t C, int64_t hw,
                             at::opmath_type<scalar_t>* avg, at::opmath_type<scalar_t>* max) {
  using S = Step<scalar_t>;
  using acc_t = typename S::acc_t;
  for_channel_blocks(N, C, [&](int64_t n, int64_t c0, int64_t c1) {
    std::vector<acc_t> sum(c1 - c0, 0), m(c1 - c0, -std::numeric_limits<acc_t>::infinity());
    const int64_t vec_end = c0 + (c1 - c0) / S::kWidth * S::kWidth;
    typename S::AccVec v[S::kVecs], s[S::kVecs], mv[S::kVecs];
    for (int64_t p = 0; p < hw; ++p) {
      const scalar_t* row = x + (n * hw + p) * C;
      int64_t c = c0;
      for (; c < vec_end; c += S::kWidth) {
        S::load(row + c, v);
        S::load_acc(sum.data() + (c - c0), s);
        for (int k = 0; k < S::kVecs; ++k) s[k] += v[k];
        S::store_acc(sum.data() + (c - c0), s);
        if constexpr (kWithMax) {
          S::load_acc(m.data() + (c - c0), mv);
          for (int k = 0; k < S::kVecs; ++k) mv[k] = max_ignoring_nan(mv[k], v[k]);
          S::store_acc(m.data() + (c - c0), mv);
        }
      }
      for (; c < c1; ++c) {
        const acc_t xv = static_cast<acc_t>(row[c]);
        sum[c - c0] += xv;
        if constexpr (kWithMax) m[c - c0] = nan_max(m[c - c0], xv);
      }
    }
    for (int64_t c = c0; c < c1; ++c) {
      avg[n * C + c] = sum[c - c0] / static_cast<acc_t>(hw);
      if constexpr (kWithMax) {
        const bool nan = std::isnan(sum[c - c0]) && has_nan(x + n * hw * C + c, hw, C);
        max[n * C + c] = nan ? std::numeric_limits<acc_t>::quiet_NaN() : m[c - c0];
      }
    }
  });
}

template <typename scalar_t>
void pool_channels_last(const scalar_t* x, int64_t N, int64_t C, int64_t hw, at::opmath_type<scalar_t>* avg,
                        at::opmath_type<scalar_t>* max) {
  with_flag(max != nullptr,
            [&](auto with_max) { pool_channels_last_impl<decltype(with_max)::value>(x, N, C, hw, avg, max); });
}

// avg and, unless with_max is false, max of x over H*W: (N, C) maps in acc(x).
std::tuple<at::Tensor, at::Tensor> pool(const at::Tensor& x_in, bool with_max) {
  check_feature_map(x_in, "channel_pool", "x");
  const at::Tensor x = dense(x_in);
  const int64_t N = x.size(0), C = x.size(1), hw = x.size(2) * x.size(3);
  AK_CHECK_VALUE(hw > 0, "channel_pool: x must have H*W > 0, got shape ", x.sizes());
  auto opts = acc_options(x);
  at::Tensor avg = at::empty({N, C}, opts), max = with_max ? at::empty({N, C}, opts) : at::Tensor();
  if (N * C == 0) return {avg, max};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "channel_pool_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    acc_t* m = with_max ? max.data_ptr<acc_t>() : nullptr;
    if (layout_of(x) == Layout::ChannelsLast) {
      pool_channels_last(x.const_data_ptr<scalar_t>(), N, C, hw, avg.data_ptr<acc_t>(), m);
    } else {
      pool_nchw(x.const_data_ptr<scalar_t>(), N * C, hw, avg.data_ptr<acc_t>(), m);
    }
  });
  return {avg, max};
}

std::tuple<at::Tensor, at::Tensor> channel_pool_cpu(const at::Tensor& x) { return pool(x, /*with_max=*/true); }

// ---------------------------------------------------------------- channel_pool_backward

// grad_x = a + [x == max] * b per (n, c), with a = grad_avg / hw and b = grad_max / count.
// A plane whose max is NaN has count 0, so b and then its whole gradient are NaN, exactly
// as torch.amax's backward (mask * grad / mask.sum()) gives.

template <typename scalar_t>
void pool_backward_nchw(const scalar_t* x, scalar_t* gx, int64_t planes, int64_t hw, const at::opmath_type<scalar_t>* grad_avg,
                        const at::opmath_type<scalar_t>* grad_max, const at::opmath_type<scalar_t>* max) {
  using S = Step<scalar_t>;
  using acc_t = typename S::acc_t;
  using AccVec = typename S::AccVec;
  at::parallel_for(0, planes, plane_grain(hw), [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p) {
      const scalar_t* xp = x + p * hw;
      scalar_t* gp = gx + p * hw;
      const acc_t a = grad_avg[p] / static_cast<acc_t>(hw);
      if (grad_max == nullptr) {  // the mean's gradient alone does not depend on x: x is not read
        std::fill(gp, gp + hw, static_cast<scalar_t>(a));
        continue;
      }
      // The tied maxima share grad_max evenly: count them (vector compares give 1 or 0).
      const AccVec vm(max[p]);
      AccVec vcount[S::kVecs], v[S::kVecs];
      for (int k = 0; k < S::kVecs; ++k) vcount[k] = AccVec(0);
      int64_t i = 0;
      for (; i + S::kWidth <= hw; i += S::kWidth) {
        S::load(xp + i, v);
        for (int k = 0; k < S::kVecs; ++k) vcount[k] += v[k].eq(vm);
      }
      acc_t count = 0;
      for (int k = 0; k < S::kVecs; ++k) count += reduce_sum(vcount[k]);
      for (; i < hw; ++i) count += static_cast<acc_t>(xp[i]) == max[p];
      const acc_t b = grad_max[p] / count;  // count 0 (a NaN max): NaN, as torch.amax
      const AccVec va(a), vb(b);
      i = 0;
      for (; i + S::kWidth <= hw; i += S::kWidth) {
        S::load(xp + i, v);
        for (int k = 0; k < S::kVecs; ++k) v[k] = va + v[k].eq(vm) * vb;
        S::store(gp + i, v);
      }
      for (; i < hw; ++i) gp[i] = static_cast<scalar_t>(a + acc_t(static_cast<acc_t>(xp[i]) == max[p]) * b);
    }
  });
}

template <typename scalar_t>
void pool_backward_channels_last(const scalar_t* x, scalar_t* gx, int64_t N, int64_t C, int64_t hw,
                                 const at::opmath_type<scalar_t>* grad_avg, const at::opmath_type<scalar_t>* grad_max,
                                 const at::opmath_type<scalar_t>* max) {
  using S = Step<scalar_t>;
  using acc_t = typename S::acc_t;
  for_channel_blocks(N, C, [&](int64_t n, int64_t c0, int64_t c1) {
    const acc_t* m = max + n * C;
    std::vector<acc_t> a(c1 - c0), b(c1 - c0, 0);
    std::vector<int64_t> count(c1 - c0, 0);
    if (grad_max != nullptr) {
      for (int64_t p = 0; p < hw; ++p) {
        const scalar_t* row = x + (n * hw + p) * C;
        for (int64_t c = c0; c < c1; ++c) count[c - c0] += static_cast<acc_t>(row[c]) == m[c];
      }
    }
    for (int64_t c = c0; c < c1; ++c) {
      a[c - c0] = grad_avg[n * C + c] / static_cast<acc_t>(hw);
      if (grad_max != nullptr) b[c - c0] = grad_max[n * C + c] / static_cast<acc_t>(count[c - c0]);
    }
    if (grad_max == nullptr) {  // the mean's gradient alone: x is not read
      for (int64_t p = 0; p < hw; ++p) {
        scalar_t* grow = gx + (n * hw + p) * C;
        for (int64_t c = c0; c < c1; ++c) grow[c] = static_cast<scalar_t>(a[c - c0]);
      }
      return;
    }
    const int64_t vec_end = c0 + (c1 - c0) / S::kWidth * S::kWidth;
    typename S::AccVec v[S::kVecs], va[S::kVecs], vb[S::kVecs], vm[S::kVecs];
    for (int64_t p = 0; p < hw; ++p) {
      const scalar_t* row = x + (n * hw + p) * C;
      scalar_t* grow = gx + (n * hw + p) * C;
      int64_t c = c0;
      for (; c < vec_end; c += S::kWidth) {
        S::load(row + c, v);
        S::load_acc(a.data() + (c - c0), va);
        S::load_acc(b.data() + (c - c0), vb);
        S::load_acc(m + c, vm);
        for (int k = 0; k < S::kVecs; ++k) v[k] = va[k] + v[k].eq(vm[k]) * vb[k];
        S::store(grow + c, v);
      }
      for (; c < c1; ++c) grow[c] = static_cast<scalar_t>(a[c - c0] + acc_t(static_cast<acc_t>(row[c]) == m[c]) * b[c - c0]);
    }
  });
}

at::Tensor channel_pool_backward_cpu(const at::Tensor& grad_avg, const c10::optional<at::Tensor>& grad_max,
                                     const at::Tensor& x_in, const at::Tensor& max) {
  const char* op = "channel_pool_backward";
  check_feature_map(x_in, op, "x");
  const at::Tensor x = dense(x_in);
  check_per_channel(grad_avg, x, op, "grad_avg");
  check_per_channel(max, x, op, "max");
  if (grad_max.has_value()) check_per_channel(*grad_max, x, op, "grad_max");
  const int64_t N = x.size(0), C = x.size(1), hw = x.size(2) * x.size(3);
  at::Tensor gx = empty_like_layout(x);
  if (x.numel() == 0) return gx;
  const at::Tensor ga = grad_avg.contiguous(), m = max.contiguous();
  const at::Tensor gm = grad_max.has_value() ? grad_max->contiguous() : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "channel_pool_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const acc_t* gm_ptr = gm.defined() ? gm.const_data_ptr<acc_t>() : nullptr;
    if (layout_of(x) == Layout::ChannelsLast) {
      pool_backward_channels_last(x.const_data_ptr<scalar_t>(), gx.data_ptr<scalar_t>(), N, C, hw,
                                  ga.const_data_ptr<acc_t>(), gm_ptr, m.const_data_ptr<acc_t>());
    } else {
      pool_backward_nchw(x.const_data_ptr<scalar_t>(), gx.data_ptr<scalar_t>(), N * C, hw,
                         ga.const_data_ptr<acc_t>(), gm_ptr, m.const_data_ptr<acc_t>());
    }
  });
  return gx;
}

// ---------------------------------------------------------------- channel_rescale (+ backward)

// y = x * gate; with `grad_gate`, also grad_gate[n,c] = sum_hw x * other (the backward:
// x is grad_y, other is the forward input, y is grad_x).
//
// The loops take everything they read as by-value arguments, and the two flags as template
// arguments: a vector store may alias any memory (the intrinsics' types are may_alias), so a
// pointer, size or flag read through a lambda's captured reference is reloaded after every
// store (that made the forward rescale 2.5x its pooling with x in cache).

// One NCHW plane of hw values: y = x * g; with kGrad, returns sum x * other.
template <bool kGrad, bool kStream, typename scalar_t>
at::opmath_type<scalar_t> rescale_plane(const scalar_t* x, const scalar_t* other, scalar_t* y, int64_t hw,
                                        at::opmath_type<scalar_t> g) {
  using S = Step<scalar_t>;
  using acc_t = typename S::acc_t;
  using AccVec = typename S::AccVec;
  const AccVec vg(g);
  AccVec v[S::kVecs], o[S::kVecs], vsum[S::kVecs];
  for (int k = 0; k < S::kVecs; ++k) vsum[k] = AccVec(0);
  int64_t i = 0;
  for (; i + S::kWidth <= hw; i += S::kWidth) {
    S::load(x + i, v);
    if constexpr (kGrad) {
      S::load(other + i, o);
      for (int k = 0; k < S::kVecs; ++k) vsum[k] += v[k] * o[k];
    }
    for (int k = 0; k < S::kVecs; ++k) v[k] = v[k] * vg;
    S::store(y + i, v, kStream);
  }
  acc_t sum = 0;
  if constexpr (kGrad) {
    for (int k = 0; k < S::kVecs; ++k) sum += reduce_sum(vsum[k]);
  }
  for (; i < hw; ++i) {
    const acc_t xv = static_cast<acc_t>(x[i]);
    if constexpr (kGrad) sum += xv * static_cast<acc_t>(other[i]);
    y[i] = static_cast<scalar_t>(xv * g);
  }
  return sum;
}

// One channels_last pixel row's channels [c0, c1): y = x * g[c]; with kGrad, sum[c - c0] += x * other.
template <bool kGrad, bool kStream, typename scalar_t>
void rescale_row(const scalar_t* x, const scalar_t* other, scalar_t* y, int64_t c0, int64_t c1,
                 const at::opmath_type<scalar_t>* g, at::opmath_type<scalar_t>* sum) {
  using S = Step<scalar_t>;
  using acc_t = typename S::acc_t;
  typename S::AccVec v[S::kVecs], o[S::kVecs], vg[S::kVecs], s[S::kVecs];
  const int64_t vec_end = c0 + (c1 - c0) / S::kWidth * S::kWidth;
  int64_t c = c0;
  for (; c < vec_end; c += S::kWidth) {
    S::load(x + c, v);
    if constexpr (kGrad) {
      S::load(other + c, o);
      S::load_acc(sum + (c - c0), s);
      for (int k = 0; k < S::kVecs; ++k) s[k] += v[k] * o[k];
      S::store_acc(sum + (c - c0), s);
    }
    S::load_acc(g + c, vg);
    for (int k = 0; k < S::kVecs; ++k) v[k] = v[k] * vg[k];
    S::store(y + c, v, kStream);
  }
  for (; c < c1; ++c) {
    const acc_t xv = static_cast<acc_t>(x[c]);
    if constexpr (kGrad) sum[c - c0] += xv * static_cast<acc_t>(other[c]);
    y[c] = static_cast<scalar_t>(xv * g[c]);
  }
}

// f(kGrad, kStream) with the two runtime flags as std::bool_constant arguments (with_flag).
template <typename F>
void with_rescale_flags(bool grad, bool stream, const F& f) {
  with_flag(grad, [&](auto kGrad) { with_flag(stream, [&](auto kStream) { f(kGrad, kStream); }); });
}

template <typename scalar_t>
void rescale_nchw(const scalar_t* x, const scalar_t* other, scalar_t* y, int64_t planes, int64_t hw,
                  const at::opmath_type<scalar_t>* gate, at::opmath_type<scalar_t>* grad_gate, bool stream) {
  with_rescale_flags(grad_gate != nullptr, stream, [&](auto grad, auto streamed) {
    constexpr bool kGrad = decltype(grad)::value, kStream = decltype(streamed)::value;
    at::parallel_for(0, planes, plane_grain(hw), [&](int64_t begin, int64_t end) {
      for (int64_t p = begin; p < end; ++p) {
        const auto sum = rescale_plane<kGrad, kStream>(x + p * hw, kGrad ? other + p * hw : nullptr, y + p * hw, hw, gate[p]);
        if constexpr (kGrad) grad_gate[p] = sum;
      }
      if constexpr (kStream) stream_fence();
    });
  });
}

template <typename scalar_t>
void rescale_channels_last(const scalar_t* x, const scalar_t* other, scalar_t* y, int64_t N, int64_t C, int64_t hw,
                           const at::opmath_type<scalar_t>* gate, at::opmath_type<scalar_t>* grad_gate, bool stream) {
  using acc_t = at::opmath_type<scalar_t>;
  with_rescale_flags(grad_gate != nullptr, stream, [&](auto grad, auto streamed) {
    constexpr bool kGrad = decltype(grad)::value, kStream = decltype(streamed)::value;
    for_channel_blocks(N, C, [&](int64_t n, int64_t c0, int64_t c1) {
      std::vector<acc_t> sum(kGrad ? c1 - c0 : 0, 0);
      for (int64_t p = 0; p < hw; ++p) {
        const int64_t row = (n * hw + p) * C;
        rescale_row<kGrad, kStream>(x + row, kGrad ? other + row : nullptr, y + row, c0, c1, gate + n * C, sum.data());
      }
      if constexpr (kGrad) {
        for (int64_t c = c0; c < c1; ++c) grad_gate[n * C + c] = sum[c - c0];
      }
      if constexpr (kStream) stream_fence();
    });
  });
}

// The shared driver of channel_rescale (other undefined) and its backward.
template <typename scalar_t>
void rescale(const at::Tensor& x, const at::Tensor& other, const at::Tensor& y, const at::Tensor& gate,
             const at::Tensor& grad_gate) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t N = x.size(0), C = x.size(1), hw = x.size(2) * x.size(3);
  const scalar_t* other_ptr = other.defined() ? other.const_data_ptr<scalar_t>() : nullptr;
  acc_t* gg_ptr = grad_gate.defined() ? grad_gate.data_ptr<acc_t>() : nullptr;
  const bool stream = should_stream((other.defined() ? 3 : 2) * x.nbytes());
  if (layout_of(x) == Layout::ChannelsLast) {
    rescale_channels_last(x.const_data_ptr<scalar_t>(), other_ptr, y.data_ptr<scalar_t>(), N, C, hw,
                          gate.const_data_ptr<acc_t>(), gg_ptr, stream);
  } else {
    rescale_nchw(x.const_data_ptr<scalar_t>(), other_ptr, y.data_ptr<scalar_t>(), N * C, hw,
                 gate.const_data_ptr<acc_t>(), gg_ptr, stream);
  }
}

at::Tensor channel_rescale_cpu(const at::Tensor& x_in, const at::Tensor& gate) {
  check_feature_map(x_in, "channel_rescale", "x");
  const at::Tensor x = dense(x_in);
  check_per_channel(gate, x, "channel_rescale", "gate");
  at::Tensor y = empty_like_layout(x);
  if (x.numel() == 0) return y;
  const at::Tensor g = gate.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "channel_rescale_cpu",
                                  [&] { rescale<scalar_t>(x, at::Tensor(), y, g, at::Tensor()); });
  return y;
}

std::tuple<at::Tensor, at::Tensor> channel_rescale_backward_cpu(const at::Tensor& grad_y, const at::Tensor& x_in,
                                                                const at::Tensor& gate) {
  const char* op = "channel_rescale_backward";
  check_feature_map(x_in, op, "x");
  const at::Tensor x = dense(x_in);
  check_per_channel(gate, x, op, "gate");
  const at::Tensor gy = walked_like_x(grad_y, x, op, "grad_y");
  at::Tensor gx = empty_like_layout(x);
  at::Tensor grad_gate = at::empty_like(gate, at::MemoryFormat::Contiguous);
  if (x.numel() == 0) return {gx, grad_gate.zero_()};
  const at::Tensor g = gate.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "channel_rescale_backward_cpu",
                                  [&] { rescale<scalar_t>(gy, x, gx, g, grad_gate); });
  return {gx, grad_gate};
}

// ---------------------------------------------------------------- channel_gate (+ backward)

// f[n, c] of the gate's pooling mode, in acc_t.
template <typename acc_t>
struct Mix {
  const acc_t* avg;
  const acc_t* max;
  GateMode mode;
  acc_t alpha, beta;
  acc_t operator()(int64_t i) const {
    switch (mode) {
      case GateMode::Avg: return avg[i];
      case GateMode::Max: return max[i];
      case GateMode::Mix: break;
    }
    return acc_t(0.5) * (avg[i] + max[i]) + alpha * avg[i] + beta * max[i];
  }
};

template <typename acc_t>
Mix<acc_t> make_mix(const at::Tensor& avg, const at::Tensor& max, const c10::optional<at::Tensor>& alpha,
                    const c10::optional<at::Tensor>& beta, GateMode mode) {
  const bool mix = mode == GateMode::Mix;
  return {avg.const_data_ptr<acc_t>(), max.const_data_ptr<acc_t>(), mode,
          mix ? alpha->item().to<acc_t>() : acc_t(0), mix ? beta->item().to<acc_t>() : acc_t(0)};
}

// gate[n, :] = sigmoid(conv1d_over_C(f[n, :])) for one sample n.
template <typename acc_t>
void gate_sample(const Mix<acc_t>& f, const acc_t* w, int64_t k, int64_t C, int64_t n, acc_t* gate) {
  const int64_t pad = (k - 1) / 2;
  for (int64_t c = 0; c < C; ++c) {
    acc_t z = 0;  // zero padding: taps outside [0, C) contribute nothing
    for (int64_t j = std::max<int64_t>(0, pad - c); j < std::min(k, C + pad - c); ++j) {
      z += w[j] * f(n * C + c + j - pad);
    }
    gate[n * C + c] = z;
  }
  sigmoid_in_place(gate + n * C, C);
}

at::Tensor channel_gate_cpu(const at::Tensor& avg_in, const at::Tensor& max_in, const at::Tensor& weight,
                            const c10::optional<at::Tensor>& alpha, const c10::optional<at::Tensor>& beta,
                            int64_t mode) {
  const GateMode pooling = check_gate_args(avg_in, max_in, weight, alpha, beta, mode, "channel_gate");
  const at::Tensor avg = avg_in.contiguous(), max = max_in.contiguous();
  const int64_t N = avg.size(0), C = avg.size(1), k = weight.numel();
  at::Tensor gate = at::empty_like(avg);
  AT_DISPATCH_FLOATING_TYPES(avg.scalar_type(), "channel_gate_cpu", [&] {
    using acc_t = scalar_t;
    const at::Tensor w_acc = weight.reshape(-1).to(avg.scalar_type()).contiguous();
    const acc_t* w = w_acc.const_data_ptr<acc_t>();
    const Mix<acc_t> f = make_mix<acc_t>(avg, max, alpha, beta, pooling);
    acc_t* g = gate.data_ptr<acc_t>();
    at::parallel_for(0, N, 1, [&](int64_t begin, int64_t end) {
      for (int64_t n = begin; n < end; ++n) gate_sample(f, w, k, C, n, g);
    });
  });
  return gate;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> channel_gate_backward_cpu(
    const at::Tensor& grad_gate_in, const at::Tensor& gate_in, const at::Tensor& avg_in, const at::Tensor& max_in,
    const at::Tensor& weight, const c10::optional<at::Tensor>& alpha, const c10::optional<at::Tensor>& beta,
    int64_t mode) {
  const char* op = "channel_gate_backward";
  const GateMode pooling = check_gate_args(avg_in, max_in, weight, alpha, beta, mode, op);
  check_gate_grads(grad_gate_in, gate_in, avg_in, op);
  const at::Tensor avg = avg_in.contiguous(), max = max_in.contiguous();
  const at::Tensor grad_gate = grad_gate_in.contiguous(), gate = gate_in.contiguous();
  const int64_t N = avg.size(0), C = avg.size(1), k = weight.numel(), pad = (k - 1) / 2;
  at::Tensor grad_avg = at::zeros_like(avg), grad_max = at::zeros_like(avg);
  // Per-sample partial sums of the shared parameters, summed over n in order afterwards.
  at::Tensor grad_w_partial = at::zeros({N, k}, avg.options());
  at::Tensor grad_ab_partial = at::zeros({N, 2}, avg.options());
  AT_DISPATCH_FLOATING_TYPES(avg.scalar_type(), "channel_gate_backward_cpu", [&] {
    using acc_t = scalar_t;
    const at::Tensor w_acc = weight.reshape(-1).to(avg.scalar_type()).contiguous();
    const acc_t* w = w_acc.const_data_ptr<acc_t>();
    const Mix<acc_t> f = make_mix<acc_t>(avg, max, alpha, beta, pooling);
    const acc_t *gg = grad_gate.const_data_ptr<acc_t>(), *g = gate.const_data_ptr<acc_t>();
    const acc_t *a = avg.const_data_ptr<acc_t>(), *m = max.const_data_ptr<acc_t>();
    acc_t *ga = grad_avg.data_ptr<acc_t>(), *gm = grad_max.data_ptr<acc_t>();
    acc_t *gw = grad_w_partial.data_ptr<acc_t>(), *gab = grad_ab_partial.data_ptr<acc_t>();
    at::parallel_for(0, N, 1, [&](int64_t begin, int64_t end) {
      std::vector<acc_t> dz(C);
      for (int64_t n = begin; n < end; ++n) {
        const int64_t row = n * C;
        for (int64_t c = 0; c < C; ++c) dz[c] = gg[row + c] * g[row + c] * (acc_t(1) - g[row + c]);
        for (int64_t j = 0; j < k; ++j) {  // grad_weight[j] += sum_c dz[c] * f[c + j - pad]
          acc_t s = 0;
          for (int64_t c = std::max<int64_t>(0, pad - j); c < std::min(C, C + pad - j); ++c) s += dz[c] * f(row + c + j - pad);
          gw[n * k + j] = s;
        }
        acc_t dalpha = 0, dbeta = 0;
        for (int64_t c = 0; c < C; ++c) {
          acc_t df = 0;  // df[c] = sum_j weight[j] * dz[c - j + pad]
          for (int64_t j = std::max<int64_t>(0, c + pad - (C - 1)); j < std::min(k, c + pad + 1); ++j) {
            df += w[j] * dz[c - j + pad];
          }
          switch (pooling) {
            case GateMode::Avg: ga[row + c] = df; break;
            case GateMode::Max: gm[row + c] = df; break;
            case GateMode::Mix:
              ga[row + c] = df * (acc_t(0.5) + f.alpha);
              gm[row + c] = df * (acc_t(0.5) + f.beta);
              dalpha += df * a[row + c];
              dbeta += df * m[row + c];
          }
        }
        gab[n * 2] = dalpha;
        gab[n * 2 + 1] = dbeta;
      }
    });
  });
  // Fixed-order sums over samples keep the parameter gradients deterministic.
  at::Tensor grad_weight = grad_w_partial.sum(0).to(weight.scalar_type()).view(weight.sizes());
  at::Tensor grad_ab = grad_ab_partial.sum(0);
  const at::ScalarType ab_type = pooling == GateMode::Mix ? alpha->scalar_type() : avg.scalar_type();
  // Copies, so the two 0-dim results never alias one buffer (opcheck's schema check).
  return {grad_avg, grad_max, grad_weight, grad_ab[0].to(ab_type, false, true), grad_ab[1].to(ab_type, false, true)};
}

// ---------------------------------------------------------------- channel_attention

// Pool, gate and rescale one sample at a time, one sample per task: the rescale re-reads x[n]
// from the cache the pooling just filled, so x crosses memory once, not twice.
// gate_fn(n, gate) fills the sample's gate row from avg/max rows already written; max may be
// nullptr (a gate that reads the mean alone).
template <typename scalar_t, typename GateFn>
void attention_per_sample(const at::Tensor& x, const at::Tensor& y, at::opmath_type<scalar_t>* avg,
                          at::opmath_type<scalar_t>* max, at::opmath_type<scalar_t>* gate, const GateFn& gate_fn) {
  const int64_t N = x.size(0), C = x.size(1), hw = x.size(2) * x.size(3);
  const bool channels_last = layout_of(x) == Layout::ChannelsLast;
  const scalar_t* xp = x.const_data_ptr<scalar_t>();
  scalar_t* yp = y.data_ptr<scalar_t>();
  // y streams past the caches when x and y cannot stay there: then x[n], not y, keeps the
  // cache for the rescale's second read.
  const bool stream = should_stream(2 * x.nbytes());
  // Inside this region the helpers' own parallel_for runs inline, on this task's thread.
  at::parallel_for(0, N, 1, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      const int64_t offset = n * C * hw;  // x[n] in either layout
      at::opmath_type<scalar_t>* max_n = max != nullptr ? max + n * C : nullptr;
      if (channels_last) {
        pool_channels_last(xp + offset, 1, C, hw, avg + n * C, max_n);
      } else {
        pool_nchw(xp + offset, C, hw, avg + n * C, max_n);
      }
      gate_fn(n, gate + n * C);
      if (channels_last) {
        rescale_channels_last<scalar_t>(xp + offset, nullptr, yp + offset, 1, C, hw, gate + n * C, nullptr, stream);
      } else {
        rescale_nchw<scalar_t>(xp + offset, nullptr, yp + offset, C, hw, gate + n * C, nullptr, stream);
      }
    }
  });
}

// The per-sample kernel pays off only with a sample for every thread; otherwise the three
// parallel passes run (as they do for an empty x).
bool per_sample_pays(const at::Tensor& x) { return x.size(0) >= at::get_num_threads() && x.numel() > 0; }

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> channel_attention_cpu(
    const at::Tensor& x_in, const at::Tensor& weight, const c10::optional<at::Tensor>& alpha,
    const c10::optional<at::Tensor>& beta, int64_t mode) {
  const char* op = "channel_attention";
  check_feature_map(x_in, op, "x");
  // Before any pass over x: every argument on x's device.
  check_gate_params(weight, alpha, beta, gate_mode(mode, op), x_in.device(), op);
  const at::Tensor x = dense(x_in);
  if (!per_sample_pays(x)) {
    auto [avg, max] = channel_pool_cpu(x);
    at::Tensor gate = channel_gate_cpu(avg, max, weight, alpha, beta, mode);
    return {channel_rescale_cpu(x, gate), avg, max, gate};
  }
  const int64_t N = x.size(0), C = x.size(1);
  auto opts = acc_options(x);
  at::Tensor avg = at::empty({N, C}, opts), max = at::empty({N, C}, opts), gate = at::empty({N, C}, opts);
  const GateMode pooling = check_gate_args(avg, max, weight, alpha, beta, mode, op);
  at::Tensor y = empty_like_layout(x);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "channel_attention_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const at::Tensor w_acc = weight.reshape(-1).to(opts.dtype()).contiguous();
    const acc_t* w = w_acc.const_data_ptr<acc_t>();
    const Mix<acc_t> f = make_mix<acc_t>(avg, max, alpha, beta, pooling);
    acc_t* g = gate.data_ptr<acc_t>();
    attention_per_sample<scalar_t>(x, y, avg.data_ptr<acc_t>(), max.data_ptr<acc_t>(), g,
                                   [&](int64_t n, acc_t*) { gate_sample(f, w, weight.numel(), C, n, g); });
  });
  return {y, avg, max, gate};
}

// ---------------------------------------------------------------- channel_mlp_attention

// sum_i a[i] * b[i] with two vector accumulators, in a fixed order: a scalar loop would be
// one chain of n dependent adds, latency-bound (a third of the per-sample op's time at C = 256).
template <typename acc_t>
acc_t dot(const acc_t* a, const acc_t* b, int64_t n) {
  using V = Vectorized<acc_t>;
  constexpr int64_t kW = V::size();
  V s0(0), s1(0);
  int64_t i = 0;
  for (; i + 2 * kW <= n; i += 2 * kW) {
    s0 = at::vec::fmadd(V::loadu(a + i), V::loadu(b + i), s0);
    s1 = at::vec::fmadd(V::loadu(a + i + kW), V::loadu(b + i + kW), s1);
  }
  if (i + kW <= n) {
    s0 = at::vec::fmadd(V::loadu(a + i), V::loadu(b + i), s0);
    i += kW;
  }
  acc_t s = reduce_sum(s0 + s1);
  for (; i < n; ++i) s += a[i] * b[i];
  return s;
}

// SE's gate for one sample: gate = sigmoid(w2 @ relu(w1 @ avg + b1) + b2), all in acc_t.
template <typename acc_t>
void mlp_gate_sample(const acc_t* avg, const acc_t* w1, const acc_t* b1, const acc_t* w2, const acc_t* b2, int64_t C,
                     int64_t rd, acc_t* h, acc_t* gate) {
  for (int64_t r = 0; r < rd; ++r) {
    h[r] = relu((b1 != nullptr ? b1[r] : acc_t(0)) + dot(w1 + r * C, avg, C));
  }
  for (int64_t c = 0; c < C; ++c) gate[c] = (b2 != nullptr ? b2[c] : acc_t(0)) + dot(w2 + c * rd, h, rd);
  sigmoid_in_place(gate, C);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> channel_mlp_attention_cpu(const at::Tensor& x_in, const at::Tensor& w1,
                                                                         const c10::optional<at::Tensor>& b1,
                                                                         const at::Tensor& w2,
                                                                         const c10::optional<at::Tensor>& b2) {
  const char* op = "channel_mlp_attention";
  check_mlp_args(x_in, w1, b1, w2, b2, op);
  const at::Tensor x = dense(x_in);
  const int64_t N = x.size(0), C = x.size(1), rd = w1.size(0);
  const at::ScalarType acc = acc_type(x.scalar_type());
  auto as_acc = [&](const at::Tensor& t) { return t.reshape(-1).to(acc).contiguous(); };
  const at::Tensor w1a = as_acc(w1), w2a = as_acc(w2);
  const at::Tensor b1a = b1.has_value() ? as_acc(*b1) : at::Tensor(), b2a = b2.has_value() ? as_acc(*b2) : at::Tensor();
  // A per-sample b1 (N, rd) steps one row per sample; a shared one stays put.
  const int64_t b1_step = b1.has_value() && check_mlp_b1(*b1, x, rd, op) ? rd : 0;
  auto opts = x.options().dtype(acc);
  at::Tensor avg, gate = at::empty({N, C}, opts), y;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "channel_mlp_attention_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const acc_t *pw1 = w1a.const_data_ptr<acc_t>(), *pw2 = w2a.const_data_ptr<acc_t>();
    const acc_t* pb1 = b1a.defined() ? b1a.const_data_ptr<acc_t>() : nullptr;
    const acc_t* pb2 = b2a.defined() ? b2a.const_data_ptr<acc_t>() : nullptr;
    auto gate_fn = [&](int64_t n, const acc_t* a, acc_t* g) {
      std::vector<acc_t> h(rd);
      mlp_gate_sample(a, pw1, pb1 != nullptr ? pb1 + n * b1_step : nullptr, pw2, pb2, C, rd, h.data(), g);
    };
    if (!per_sample_pays(x)) {
      avg = std::get<0>(pool(x, /*with_max=*/false));
      const acc_t* a = avg.const_data_ptr<acc_t>();
      acc_t* g = gate.data_ptr<acc_t>();
      for (int64_t n = 0; n < N; ++n) gate_fn(n, a + n * C, g + n * C);
      y = channel_rescale_cpu(x, gate);
      return;
    }
    avg = at::empty({N, C}, opts);
    y = empty_like_layout(x);
    acc_t* a = avg.data_ptr<acc_t>();
    attention_per_sample<scalar_t>(x, y, a, /*max=*/nullptr, gate.data_ptr<acc_t>(),
                                   [&](int64_t n, acc_t* g) { gate_fn(n, a + n * C, g); });
  });
  return {y, avg, gate};
}

}  // namespace

// ---------------------------------------------------------------- per-sample steps (cpu_sample.h)

namespace cpu_sample {

template <typename scalar_t>
void channel_pool(const scalar_t* x_n, int64_t C, int64_t hw, bool channels_last, at::opmath_type<scalar_t>* avg,
                  at::opmath_type<scalar_t>* max) {
  if (channels_last) {
    pool_channels_last(x_n, 1, C, hw, avg, max);
  } else {
    pool_nchw(x_n, C, hw, avg, max);
  }
}

template <typename acc_t>
void mix_gate(const acc_t* avg, const acc_t* max, acc_t alpha, acc_t beta, const acc_t* w, int64_t k, int64_t C,
              acc_t* gate) {
  gate_sample(Mix<acc_t>{avg, max, GateMode::Mix, alpha, beta}, w, k, C, 0, gate);
}

#define ATTNKERNELS_INSTANTIATE_POOL(T)                                                              \
  template void channel_pool<T>(const T*, int64_t, int64_t, bool, at::opmath_type<T>*, at::opmath_type<T>*);
ATTNKERNELS_INSTANTIATE_POOL(double)
ATTNKERNELS_INSTANTIATE_POOL(float)
ATTNKERNELS_INSTANTIATE_POOL(at::Half)
ATTNKERNELS_INSTANTIATE_POOL(at::BFloat16)
#undef ATTNKERNELS_INSTANTIATE_POOL
template void mix_gate<double>(const double*, const double*, double, double, const double*, int64_t, int64_t, double*);
template void mix_gate<float>(const float*, const float*, float, float, const float*, int64_t, int64_t, float*);

}  // namespace cpu_sample

TORCH_LIBRARY_IMPL(attnkernels, CPU, m) {
  m.impl("channel_attention", &channel_attention_cpu);
  m.impl("channel_mlp_attention", &channel_mlp_attention_cpu);
  m.impl("channel_pool", &channel_pool_cpu);
  m.impl("channel_pool_backward", &channel_pool_backward_cpu);
  m.impl("channel_gate", &channel_gate_cpu);
  m.impl("channel_gate_backward", &channel_gate_backward_cpu);
  m.impl("channel_rescale", &channel_rescale_cpu);
  m.impl("channel_rescale_backward", &channel_rescale_backward_cpu);
}

}  // namespace attnkernels
