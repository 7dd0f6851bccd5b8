// CPU kernels of the shuffle_conv hot path (GAM's spatial gate); math in csrc/shuffle_conv_ops.cpp.
//
// The conv runs as BLAS GEMMs per (sample, group) on (channels x H*W) matrices: the input u is a
// view of s itself when there is no prologue, shuffle or dtype change, else a copy made in one
// pass that applies the channel shuffle pi and the affine + ReLU; a raw NCHW output receives the
// GEMMs in place, any other output (the raw store in s's layout, or the gate) is written from
// the task's output matrix in one pass.
//
// Tap (i, j) multiplies weight[:, :, i, j] (Og x Cg) into u shifted by j - P columns, restricted
// to the output rows whose input row h + i - P is inside the image: that row range is a
// contiguous column range of the matrices, so the zero padding costs neither memory nor
// multiply-adds. The column shifts are copies with zeroed borders, made on the side with fewer
// channels: of u (once per j), or of the (Og x H*W) products of a tap column, added into the
// output shifted. Taps are stacked into deeper GEMMs where a side has few channels (a GEMM with
// K = 16 runs at a fraction of BLAS's speed): see Packing and choose_packing.
//
// Backward, per (chunk of samples, group): grad_weight is the pixel reduction of grad_z against
// the forward's operands (or against u, with grad_z shifted or stacked through the taps' windows
// when the output side is the smaller); grad_u is the same conv of grad_z with the weights
// transposed and flipped; the prologue's backward then gives grad_s. grad_weight, grad_bias and
// the prologue's sums are per-chunk partials, the chunks fixed by the shapes alone (not by the
// thread count) and summed in order: no atomics, the same bits run to run.
//
// The GEMMs are ATen's CPU matmuls on views (at::cpu::mm_out / addmm_: MKL, single-threaded
// inside the parallel region); the prologue, the epilogues and the two epilogue ops are at::vec
// loops.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/ops/addmm_cpu_dispatch.h>
#include <ATen/ops/mm_cpu_dispatch.h>
#include <c10/util/FunctionRef.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <functional>
#include <type_traits>
#include <vector>

#include "attnkernels/shuffle_conv.h"
#include "attnkernels/cpu_vec.h"

namespace attnkernels {
namespace {

using at::vec::Vectorized;

// ---------------------------------------------------------------- vector steps

// Loads kWidth per-channel parameters: one per lane (a channels_last row) or one broadcast
// value (an NCHW row, all of one channel).
template <typename scalar_t, bool kPerLane>
inline void load_param(const at::opmath_type<scalar_t>* p,
                       typename Step<scalar_t>::AccVec (&v)[Step<scalar_t>::kVecs]) {
  using S = Step<scalar_t>;
  if constexpr (kPerLane) {
    S::load_acc(p, v);
  } else {
    for (int i = 0; i < S::kVecs; ++i) v[i] = typename S::AccVec(*p);
  }
}

// Calls full(i) for every whole step of kWidth values in [0, n), then tail(i, r) for the r < kWidth
// values left (tail runs the step on zero-padded local copies).
template <int64_t kWidth, typename Full, typename Tail>
inline void for_steps(int64_t n, const Full& full, const Tail& tail) {
  int64_t i = 0;
  for (; i + kWidth <= n; i += kWidth) full(i);
  if (i < n) tail(i, n - i);
}

// y = gx * sigmoid(a * z + b) over n values: a row of gate_x, its z (acc) and its parameters.
template <typename scalar_t, bool kPerLane>
void gate_row(const scalar_t* gx, const at::opmath_type<scalar_t>* z, const at::opmath_type<scalar_t>* a,
              const at::opmath_type<scalar_t>* b, int64_t n, scalar_t* y) {
  using S = Step<scalar_t>;
  using acc_t = typename S::acc_t;
  constexpr int64_t V = S::kWidth;
  auto step = [](const scalar_t* gx, const acc_t* z, const acc_t* a, const acc_t* b, scalar_t* y) {
    typename S::AccVec g[S::kVecs], zv[S::kVecs], av[S::kVecs], bv[S::kVecs];
    S::load(gx, g);
    S::load_acc(z, zv);
    load_param<scalar_t, kPerLane>(a, av);
    load_param<scalar_t, kPerLane>(b, bv);
    for (int k = 0; k < S::kVecs; ++k) g[k] = g[k] * vec_sigmoid(zv[k] * av[k] + bv[k]);
    S::store(y, g);
  };
  const int64_t lane = kPerLane ? 1 : 0;
  for_steps<V>(
      n, [&](int64_t i) { step(gx + i, z + i, a + lane * i, b + lane * i, y + i); },
      [&](int64_t i, int64_t r) {
        scalar_t gx_t[V] = {}, y_t[V];
        acc_t z_t[V] = {}, a_t[V] = {}, b_t[V] = {};
        std::copy_n(gx + i, r, gx_t);
        std::copy_n(z + i, r, z_t);
        if (kPerLane) {
          std::copy_n(a + i, r, a_t);
          std::copy_n(b + i, r, b_t);
        }
        step(gx_t, z_t, kPerLane ? a_t : a, kPerLane ? b_t : b, y_t);
        std::copy_n(y_t, r, y + i);
      });
}

// Calls f(scalar_t{}) for dtype t, one of the feature-map dtypes whose accumulation type is acc_t
// (the kernels read each map in its own dtype and compute in acc_t).
template <typename acc_t, typename F>
void dispatch_family(at::ScalarType t, const F& f) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, t, "shuffle_conv_cpu", [&] {
    if constexpr (std::is_same_v<at::opmath_type<scalar_t>, acc_t>) f(scalar_t{});
  });
}

// ---------------------------------------------------------------- geometry and tap packing

struct Geometry {
  int64_t H, W, k, P, HW;
  // Tap row i reads input row h + i - P for output row h: inside the image for h in [first_row, end_row).
  int64_t first_row(int64_t i) const { return std::max<int64_t>(0, P - i); }
  int64_t end_row(int64_t i) const { return std::min<int64_t>(H, H + P - i); }
};

// How the k*k taps of a conv from Cin to Cout channels become GEMMs. The column shifts of the
// taps are copies, made on the side with fewer channels.
// Input side (K = Cin * taps per GEMM):
//   kPerTap:         k*k GEMMs; the operand of tap (i, j) is a row range of the input shifted by
//                    j - P columns (a copy per j; the centre column is the input itself);
//   kTapRow:         k GEMMs on the k shifted copies stacked (rows (c, j));
//   kAllTaps:        one GEMM on the im2col (rows (c, i, j)).
// Output side (M = Cout * taps per GEMM), the input read as it is:
//   kShiftOutput:    k*k GEMMs on row ranges of the input; the products of tap column j are added
//                    into the output shifted by j - P columns;
//   kStackOutputRow: k GEMMs, each the products of a tap row for every pixel (rows (j, o));
//   kStackOutputAll: one GEMM, the products of every tap (rows (i, j, o)); each tap's (Cout x HW)
//                    block is then added into the output through its window (a col2im).
enum class Packing { kPerTap, kTapRow, kAllTaps, kShiftOutput, kStackOutputRow, kStackOutputAll };

bool output_side(Packing p) {
  return p == Packing::kShiftOutput || p == Packing::kStackOutputRow || p == Packing::kStackOutputAll;
}

int64_t taps_per_gemm(Packing p, int64_t k) {
  switch (p) {
    case Packing::kPerTap:
    case Packing::kShiftOutput:
      return 1;
    case Packing::kTapRow:
    case Packing::kStackOutputRow:
      return k;
    case Packing::kAllTaps:
    case Packing::kStackOutputAll:
      break;
  }
  return k * k;
}

// MKL (one thread, 28x28) runs these GEMMs near its peak once K >= 96 and M >= 100 or so, with
// K = 16 at two thirds of it or less. So with few input channels the taps are stacked into the
// GEMMs' K, as many as keep the copy in L2. Per-tap GEMMs deep enough (Cin >= 128) are left per
// tap even with few outputs: stacking their products (M = Cout*taps) did not pay for the col2im
// adds of short rows (GAM's conv1, 256 -> 16, 28x28: 9.2 ms per tap, 10.7 ms stacked).
constexpr int64_t kMinDepth = 128;      // Cin from which per-tap GEMMs are deep enough
constexpr int64_t kMinRowDepth = 96;    // Cin*k from which tap rows are
constexpr int64_t kMinStackDepth = 64;  // Cin from which output-side stacks are
constexpr int64_t kColumnBudget = 3 << 20;  // bytes of stacked copy or products

// The packing of the taps of the largest stack that fits the budget on the output side, or
// kShiftOutput.
Packing output_stack(int64_t Cout, const Geometry& geo, int64_t elem) {
  const int64_t bytes = Cout * geo.HW * elem;
  if (bytes * geo.k * geo.k <= kColumnBudget) return Packing::kStackOutputAll;
  if (bytes * geo.k <= kColumnBudget) return Packing::kStackOutputRow;
  return Packing::kShiftOutput;
}

Packing choose_packing(int64_t Cin, int64_t Cout, const Geometry& geo, int64_t elem) {
  const int64_t k = geo.k, bytes = geo.HW * elem;
  if (k == 1) return Packing::kPerTap;  // one tap, no shift
  if (Cout < Cin && Cin >= kMinDepth) return Packing::kShiftOutput;
  if (Cout < Cin && Cin >= kMinStackDepth) {
    const Packing p = output_stack(Cout, geo, elem);
    if (p != Packing::kShiftOutput) return p;
  }
  if (Cin >= kMinDepth) return Packing::kPerTap;
  if (Cin * k < kMinRowDepth && Cin * k * k * bytes <= kColumnBudget) return Packing::kAllTaps;
  return Packing::kTapRow;
}

// grad_weight's GEMMs (a reduction over the pixels, into Og x Cg*taps) follow the forward's
// packing, except that per-tap output shifts become stacks of grad_z's windows when they fit:
// one GEMM with M = Og*taps instead of k*k with M = Og (GAM's conv1: 20.1 -> 19.2 ms backward).
Packing weight_grad_packing(Packing forward, int64_t Og, const Geometry& geo, int64_t elem) {
  return forward == Packing::kShiftOutput ? output_stack(Og, geo, elem) : forward;
}

// w (G, Cout, Cin, k, k) -> the A operand of each GEMM: (G, gemms, Cout, Cin*taps) with K in the
// order of the stacked copy's rows on the input side, (G, gemms, taps*Cout, Cin) with rows
// (i, j, o) on the output side (and per tap).
at::Tensor pack_weight(const at::Tensor& w, Packing p) {
  const int64_t G = w.size(0), Cout = w.size(1), Cin = w.size(2), k = w.size(3);
  if (p == Packing::kTapRow) return w.permute({0, 3, 1, 2, 4}).reshape({G, k, Cout, Cin * k}).contiguous();
  if (p == Packing::kAllTaps) return w.reshape({G, 1, Cout, Cin * k * k}).contiguous();
  const int64_t T = output_side(p) ? taps_per_gemm(p, k) : 1;
  return w.permute({0, 3, 4, 1, 2}).reshape({G, k * k / T, T * Cout, Cin}).contiguous();
}

// The inverse of pack_weight: -> (G, Cout, Cin, k, k).
at::Tensor unpack_weight(const at::Tensor& packed, int64_t Cout, int64_t Cin, int64_t k, Packing p) {
  const int64_t G = packed.size(0);
  if (p == Packing::kTapRow) return packed.view({G, k, Cout, Cin, k}).permute({0, 2, 3, 1, 4});
  if (p == Packing::kAllTaps) return packed.view({G, Cout, Cin, k, k});
  return packed.reshape({G, k, k, Cout, Cin}).permute({0, 3, 4, 1, 2});
}

// dst[w] = src[w + d] where w + d is inside the row, else 0 (src null: a row outside the image).
template <typename acc_t>
void shifted_row(const acc_t* src, int64_t W, int64_t d, acc_t* dst) {
  if (src == nullptr || d >= W || -d >= W) {
    std::fill_n(dst, W, acc_t(0));
  } else if (d >= 0) {
    std::copy_n(src + d, W - d, dst);
    std::fill_n(dst + W - d, d, acc_t(0));
  } else {
    std::fill_n(dst, -d, acc_t(0));
    std::copy_n(src, W + d, dst - d);
  }
}

// The conv of one (sample, group)'s input, (Cin x HW) contiguous in acc, as GEMMs; holds the
// thread's copy buffer for the packing.
struct Correlation {
  Geometry geo;
  int64_t Cin;
  Packing packing;
  at::Tensor buf;

  Correlation(const Geometry& geo, int64_t Cin, Packing packing, const at::TensorOptions& opts)
      : geo(geo), Cin(Cin), packing(packing), buf(at::empty({Cin * copies(), geo.HW}, opts)) {}

  int64_t copies() const {
    if (output_side(packing)) return 0;
    return packing == Packing::kPerTap && geo.k == 1 ? 0 : taps_per_gemm(packing, geo.k);
  }

  // Tap rows and columns centre first: tap (P, P) covers every output row.
  int64_t centred(int64_t r) const { return (r + geo.P) % geo.k; }

  // Calls f(t, B, h0, h1) for every GEMM: packed tap group t applied to B (K x (h1-h0)*W) gives
  // output rows [h0, h1). The first call covers every output row, so it may overwrite. (Input
  // side only: the output side's GEMMs read the input as it is.)
  template <typename acc_t, typename F>
  void for_each_gemm(const at::Tensor& in, const F& f) {
    TORCH_INTERNAL_ASSERT(in.is_contiguous() && !output_side(packing));
    const int64_t k = geo.k, P = geo.P, H = geo.H, W = geo.W, HW = geo.HW;
    const acc_t* src = in.const_data_ptr<acc_t>();
    acc_t* dst = buf.data_ptr<acc_t>();
    auto rows = [&](const at::Tensor& B, int64_t i, int64_t t) {
      const int64_t h0 = geo.first_row(i), h1 = geo.end_row(i);
      if (h1 > h0) f(t, B.narrow(1, (h0 + i - P) * W, (h1 - h0) * W), h0, h1);
    };
    switch (packing) {
      case Packing::kPerTap:
        for (int64_t jj = 0; jj < k; ++jj) {
          const int64_t j = centred(jj);
          if (j != P) {
            for (int64_t r = 0; r < Cin * H; ++r) shifted_row(src + r * W, W, j - P, dst + r * W);
          }
          for (int64_t ii = 0; ii < k; ++ii) rows(j == P ? in : buf, centred(ii), centred(ii) * k + j);
        }
        return;
      case Packing::kTapRow:
        for (int64_t c = 0; c < Cin; ++c) {
          for (int64_t j = 0; j < k; ++j) {
            for (int64_t h = 0; h < H; ++h) {
              shifted_row(src + c * HW + h * W, W, j - P, dst + (c * k + j) * HW + h * W);
            }
          }
        }
        for (int64_t ii = 0; ii < k; ++ii) rows(buf, centred(ii), centred(ii));
        return;
      case Packing::kAllTaps:
        for (int64_t c = 0; c < Cin; ++c) {
          for (int64_t t = 0; t < k * k; ++t) {
            for (int64_t h = 0; h < H; ++h) {
              const int64_t hs = h + t / k - P;
              shifted_row(hs >= 0 && hs < H ? src + c * HW + hs * W : nullptr, W, t % k - P,
                          dst + (c * k * k + t) * HW + h * W);
            }
          }
        }
        f(0, buf, 0, H);
        return;
      default:
        return;
    }
  }
};

// out[o, h, w] += t[o, h + di, w + dj] where (h + di, w + dj) is inside the image: one tap's
// products (t, rows x HW) added through the tap's window.
template <typename acc_t>
void add_window(const at::Tensor& t, int64_t di, int64_t dj, const Geometry& geo, at::Tensor& out) {
  using V = Vectorized<acc_t>;
  const int64_t W = geo.W, len = W - std::abs(dj), w0 = std::max<int64_t>(0, -dj);
  const int64_t h0 = std::max<int64_t>(0, -di), h1 = std::min(geo.H, geo.H - di);
  if (len <= 0) return;
  for (int64_t o = 0; o < out.size(0); ++o) {
    for (int64_t h = h0; h < h1; ++h) {
      acc_t* dst = out.data_ptr<acc_t>() + o * out.stride(0) + h * W + w0;
      const acc_t* src = t.const_data_ptr<acc_t>() + o * t.stride(0) + (h + di) * W + w0 + dj;
      int64_t w = 0;
      for (; w + V::size() <= len; w += V::size()) (V::loadu(dst + w) + V::loadu(src + w)).store(dst + w);
      for (; w < len; ++w) dst[w] += src[w];
    }
  }
}

// (rows x HW) scratch from a thread's buffer, allocated on first use.
at::Tensor scratch(at::Tensor& buf, int64_t rows, int64_t HW, const at::TensorOptions& opts) {
  if (!buf.defined() || buf.size(0) < rows) buf = at::empty({rows, HW}, opts);
  return buf.narrow(0, 0, rows);
}

// out (rows o0.. of group g's outputs, (rows x HW)) = the conv of `in` with packed weights A
// (pack_weight's layout); t_buf is the thread's scratch for the output side's products. The
// stacked output sides take every output row of the group (o0 = 0).
template <typename acc_t>
void correlate(Correlation& corr, const at::Tensor& A, int64_t g, int64_t o0, const at::Tensor& in, at::Tensor& out,
               at::Tensor& t_buf) {
  const Geometry& geo = corr.geo;
  const int64_t W = geo.W, P = geo.P, k = geo.k, rows = out.size(0);
  auto gemm = [&](at::Tensor& target, int64_t t, const at::Tensor& B, int64_t h0, int64_t h1, bool first) {
    const at::Tensor a = A[g][t].narrow(0, o0, rows);
    at::Tensor part = target.narrow(1, h0 * W, (h1 - h0) * W);
    if (first) {
      at::cpu::mm_out(part, a, B);
    } else {
      at::cpu::addmm_(part, a, B);
    }
  };
  if (corr.packing == Packing::kStackOutputRow || corr.packing == Packing::kStackOutputAll) {
    const int64_t T = taps_per_gemm(corr.packing, k);
    out.zero_();
    for (int64_t grp = 0; grp < k * k / T; ++grp) {
      at::Tensor prod = scratch(t_buf, T * rows, geo.HW, out.options());
      at::cpu::mm_out(prod, A[g][grp], in);
      for (int64_t tl = 0; tl < T; ++tl) {
        const int64_t t = grp * T + tl;
        add_window<acc_t>(prod.narrow(0, tl * rows, rows), t / k - P, t % k - P, geo, out);
      }
    }
    return;
  }
  if (corr.packing != Packing::kShiftOutput) {
    bool first = true;
    corr.for_each_gemm<acc_t>(in, [&](int64_t t, const at::Tensor& B, int64_t h0, int64_t h1) {
      gemm(out, t, B, h0, h1, first);
      first = false;
    });
    return;
  }
  for (int64_t jj = 0; jj < k; ++jj) {
    const int64_t j = corr.centred(jj);
    at::Tensor target = j == P ? out : scratch(t_buf, rows, geo.HW, out.options());
    for (int64_t ii = 0; ii < k; ++ii) {
      const int64_t i = corr.centred(ii), h0 = geo.first_row(i), h1 = geo.end_row(i);
      if (h1 > h0) gemm(target, i * k + j, in.narrow(1, (h0 + i - P) * W, (h1 - h0) * W), h0, h1, ii == 0);
    }
    if (j != P) add_window<acc_t>(target, 0, j - P, geo, out);
  }
}

// ---------------------------------------------------------------- prologue: s -> the conv's input

// dst[i] = relu(a * x[i] + b) (kAffine) or x[i] over n contiguous values; *sum += the values
// when sum is given.
template <typename scalar_t, bool kAffine>
void fill_row(const scalar_t* x, int64_t n, at::opmath_type<scalar_t> a, at::opmath_type<scalar_t> b,
              at::opmath_type<scalar_t>* dst, at::opmath_type<scalar_t>* sum) {
  using S = Step<scalar_t>;
  using acc_t = typename S::acc_t;
  using AccVec = typename S::AccVec;
  AccVec total[S::kVecs];
  for (int k = 0; k < S::kVecs; ++k) total[k] = AccVec(0);
  int64_t i = 0;
  for (; i + S::kWidth <= n; i += S::kWidth) {
    AccVec v[S::kVecs];
    S::load(x + i, v);
    for (int k = 0; k < S::kVecs; ++k) {
      if constexpr (kAffine) v[k] = at::vec::maximum(v[k] * AccVec(a) + AccVec(b), AccVec(0));
      total[k] = total[k] + v[k];
    }
    S::store_acc(dst + i, v);
  }
  acc_t rest = 0;
  for (; i < n; ++i) {
    acc_t v = static_cast<acc_t>(x[i]);
    if constexpr (kAffine) v = relu(v * a + b);
    dst[i] = v;
    rest += v;
  }
  if (sum != nullptr) {
    for (int k = 0; k < S::kVecs; ++k) rest += reduce_sum(total[k]);
    *sum += rest;
  }
}

// A feature map's sample as the kernel reads it: base pointer and (c, h, w) strides.
template <typename scalar_t>
struct SampleView {
  const scalar_t* data;
  int64_t sC, sH, sW;
  // Whether each channel's H*W pixels are contiguous (NCHW), whatever the strides of size-1 dims.
  bool planar(const Geometry& geo) const { return (sW == 1 || geo.W == 1) && (sH == geo.W || geo.H == 1); }
};

template <typename scalar_t>
SampleView<scalar_t> sample_view(const at::Tensor& t, int64_t n) {
  return {t.const_data_ptr<scalar_t>() + n * t.stride(0), t.stride(1), t.stride(2), t.stride(3)};
}

// u[c] (count x HW, acc) = x's channel chans[c], through relu(scale*x + shift) when scale is given
// (both indexed by x's channel); sums[c] += the channel's sum when sums is given.
template <typename scalar_t>
void fill_input(const SampleView<scalar_t>& x, const int64_t* chans, int64_t count,
                const at::opmath_type<scalar_t>* scale, const at::opmath_type<scalar_t>* shift, const Geometry& geo,
                at::opmath_type<scalar_t>* u, at::opmath_type<scalar_t>* sums) {
  using acc_t = at::opmath_type<scalar_t>;
  if (x.planar(geo)) {
    for (int64_t c = 0; c < count; ++c) {
      const int64_t sc = chans[c];
      acc_t* sum = sums == nullptr ? nullptr : sums + c;
      if (scale != nullptr) {
        fill_row<scalar_t, true>(x.data + sc * x.sC, geo.HW, scale[sc], shift[sc], u + c * geo.HW, sum);
      } else {
        fill_row<scalar_t, false>(x.data + sc * x.sC, geo.HW, 0, 0, u + c * geo.HW, sum);
      }
    }
    return;
  }
  // channels_last: pixel by pixel, reading the (nearly) contiguous channels of each.
  for (int64_t h = 0; h < geo.H; ++h) {
    for (int64_t w = 0; w < geo.W; ++w) {
      const scalar_t* src = x.data + h * x.sH + w * x.sW;
      acc_t* dst = u + h * geo.W + w;
      for (int64_t c = 0; c < count; ++c) {
        const int64_t sc = chans[c];
        acc_t v = static_cast<acc_t>(src[sc * x.sC]);
        if (scale != nullptr) v = relu(v * scale[sc] + shift[sc]);
        dst[c * geo.HW] = v;
        if (sums != nullptr) sums[c] += v;
      }
    }
  }
}

// Shuffled channel c of the conv's input is s's channel pi(c).
int64_t shuffled(int64_t c, int64_t C, int64_t shuffle_groups) {
  return (c % shuffle_groups) * (C / shuffle_groups) + c / shuffle_groups;
}

// s's channel of each input channel of the conv, group after group.
std::vector<int64_t> input_channels(int64_t C_in, int64_t shuffle_groups) {
  std::vector<int64_t> chans(C_in);
  for (int64_t c = 0; c < C_in; ++c) chans[c] = shuffled(c, C_in, shuffle_groups);
  return chans;
}

// A small parameter vector in acc, contiguous (an undefined tensor when absent).
at::Tensor acc_vector(const c10::optional<at::Tensor>& t, at::ScalarType acc) {
  return t.has_value() ? t->reshape(-1).to(acc).contiguous() : at::Tensor();
}

template <typename acc_t>
const acc_t* ptr_or_null(const at::Tensor& t) {
  return t.defined() ? t.const_data_ptr<acc_t>() : nullptr;
}

// Group g's channels [c0, c0 + count) of sample n of an NCHW-contiguous map, as a (count x HW)
// matrix: the conv reads its input and writes its output there when no copy is needed.
at::Tensor channel_rows(const at::Tensor& t, int64_t n, int64_t c0, int64_t count) {
  return t[n].narrow(0, c0, count).view({count, t.size(2) * t.size(3)});
}

// Whether t can serve as the conv's (count x HW) matrices in place: NCHW-contiguous, in acc.
bool in_place(const at::Tensor& t, at::ScalarType acc) { return t.scalar_type() == acc && t.is_contiguous(); }

// The feature-map dtypes fall in two families by accumulation type; a map of the other family
// than s (gate_x, grad_z) is read through a copy in acc(s).
at::Tensor in_acc_family(const at::Tensor& t, at::ScalarType acc) {
  return acc_type(t.scalar_type()) == acc ? t : t.to(acc);
}

// ---------------------------------------------------------------- shuffle_conv (forward)

struct ConvShape {
  int64_t N, C_in, C_out, G, Cg, Og;
};

// The forward's tasks: (sample, group, block of output channels), blocks only when samples x
// groups leave a thread idle. input(n, g, buf) gives the conv's input (a view of s, or buf
// filled); target(n, c0, count, buf) the (count x HW) matrix the GEMMs write (a view of the
// output, or buf); finish(n, c0, z) adds the bias or runs the epilogue from it.
template <typename acc_t>
void conv_forward(const ConvShape& cs, const Geometry& geo, const at::Tensor& A, Packing packing,
                  c10::function_ref<at::Tensor(int64_t, int64_t, at::Tensor&)> input,
                  c10::function_ref<at::Tensor(int64_t, int64_t, int64_t, at::Tensor&)> target,
                  c10::function_ref<void(int64_t, int64_t, const at::Tensor&)> finish) {
  const int64_t threads = at::get_num_threads(), tasks = cs.N * cs.G;
  const bool stacked = packing == Packing::kStackOutputRow || packing == Packing::kStackOutputAll;
  const int64_t blocks = stacked ? 1 : std::max<int64_t>(1, std::min((threads + tasks - 1) / tasks, cs.Og / 16));
  const int64_t block = (cs.Og + blocks - 1) / blocks;
  at::parallel_for(0, tasks * blocks, 1, [&](int64_t begin, int64_t end) {
    BelowAutograd below;
    Correlation corr(geo, cs.Cg, packing, A.options());
    at::Tensor u_buf, z_buf, t_buf;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t n = task / (cs.G * blocks), g = task / blocks % cs.G, o0 = task % blocks * block;
      const int64_t count = std::min(block, cs.Og - o0);
      if (count <= 0) continue;
      const at::Tensor u = input(n, g, u_buf);
      at::Tensor z = target(n, g * cs.Og + o0, count, z_buf);
      correlate<acc_t>(corr, A, g, o0, u, z, t_buf);
      finish(n, g * cs.Og + o0, z);
    }
  });
}

// z += bias[c0 + o] row by row (a view of the raw output, NCHW).
template <typename acc_t>
void add_bias(const at::Tensor& z, const acc_t* bias, int64_t c0) {
  using V = Vectorized<acc_t>;
  const int64_t HW = z.size(1);
  for (int64_t o = 0; o < z.size(0); ++o) {
    acc_t* row = z.data_ptr<acc_t>() + o * z.stride(0);
    const acc_t b = bias[c0 + o];
    int64_t p = 0;
    for (; p + V::size() <= HW; p += V::size()) (V::loadu(row + p) + V(b)).store(row + p);
    for (; p < HW; ++p) row[p] += b;
  }
}

// out[n, c0 + o] = z[o] + bias for a raw output in any layout (z a scratch matrix).
template <typename acc_t>
void store_raw(const at::Tensor& z, const Geometry& geo, const acc_t* bias, int64_t n, int64_t c0, at::Tensor& out) {
  const acc_t* zp = z.const_data_ptr<acc_t>();
  acc_t* op = out.data_ptr<acc_t>() + n * out.stride(0);
  const int64_t sC = out.stride(1), sH = out.stride(2), sW = out.stride(3);
  for (int64_t h = 0; h < geo.H; ++h) {
    for (int64_t w = 0; w < geo.W; ++w) {
      acc_t* dst = op + h * sH + w * sW;
      for (int64_t o = 0; o < z.size(0); ++o) {
        dst[(c0 + o) * sC] = zp[o * geo.HW + h * geo.W + w] + (bias == nullptr ? acc_t(0) : bias[c0 + o]);
      }
    }
  }
}

// y[n, c0 + o] = gx * sigmoid(a * z[o] + b) (the bias folded into b), y with gx's strides.
template <typename scalar_t>
void store_gated(const at::Tensor& z, const Geometry& geo, const at::opmath_type<scalar_t>* a,
                 const at::opmath_type<scalar_t>* b, const at::Tensor& gx, int64_t n, int64_t c0, at::Tensor& y) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t rows = z.size(0), W = geo.W, HW = geo.HW;
  const acc_t* zp = z.const_data_ptr<acc_t>();
  const SampleView<scalar_t> x = sample_view<scalar_t>(gx, n);
  scalar_t* yp = y.data_ptr<scalar_t>() + n * y.stride(0);
  if (x.planar(geo)) {
    for (int64_t o = 0; o < rows; ++o) {
      const int64_t off = (c0 + o) * x.sC;
      gate_row<scalar_t, false>(x.data + off, zp + o * HW, a + c0 + o, b + c0 + o, HW, yp + off);
    }
    return;
  }
  // channels_last: transpose one image row of z to (W x rows), then gate pixel rows of channels.
  std::vector<acc_t> zt(W * rows);
  for (int64_t h = 0; h < geo.H; ++h) {
    for (int64_t o = 0; o < rows; ++o) {
      for (int64_t w = 0; w < W; ++w) zt[w * rows + o] = zp[o * HW + h * W + w];
    }
    for (int64_t w = 0; w < W; ++w) {
      const int64_t off = c0 * x.sC + h * x.sH + w * x.sW;
      gate_row<scalar_t, true>(x.data + off, zt.data() + w * rows, a + c0, b + c0, rows, yp + off);
    }
  }
}

at::Tensor shuffle_conv_cpu(const at::Tensor& s, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                            int64_t groups, int64_t shuffle_groups, const c10::optional<at::Tensor>& in_scale,
                            const c10::optional<at::Tensor>& in_shift, const c10::optional<at::Tensor>& gate_x,
                            const c10::optional<at::Tensor>& out_scale, const c10::optional<at::Tensor>& out_shift) {
  const char* op = "shuffle_conv";
  check_shuffle_conv_args(s, weight, groups, shuffle_groups, in_scale, in_shift, op);
  const int64_t N = s.size(0), C_in = s.size(1), H = s.size(2), W = s.size(3);
  const int64_t C_out = weight.size(0), k = weight.size(2);
  if (bias.has_value()) check_vector(*bias, C_out, s.device(), op, "bias", "C_out");
  const bool gated = gate_x.has_value();
  AK_CHECK_VALUE(out_scale.has_value() == gated && out_shift.has_value() == gated, op,
                    ": gate_x, out_scale and out_shift must be given together");
  if (gated) check_epilogue_args(*gate_x, *out_scale, *out_shift, {N, C_out, H, W}, s.device(), op);

  const at::ScalarType acc = acc_type(s.scalar_type());
  const at::Tensor s_d = dense(s);
  const ConvShape cs{N, C_in, C_out, groups, C_in / groups, C_out / groups};
  const Geometry geo{H, W, k, (k - 1) / 2, H * W};
  const Packing packing = choose_packing(cs.Cg, cs.Og, geo, acc == at::kDouble ? 8 : 4);
  const at::Tensor A = pack_weight(weight.to(acc).reshape({groups, cs.Og, cs.Cg, k, k}), packing);
  const at::Tensor scale = acc_vector(in_scale, acc), shift = acc_vector(in_shift, acc);
  const at::Tensor b = acc_vector(bias, acc);
  const std::vector<int64_t> chans = input_channels(C_in, shuffle_groups);
  const at::TensorOptions opts = s.options().dtype(acc);

  at::Tensor out, gx, a_out, b_out;
  if (gated) {
    gx = in_acc_family(dense(*gate_x), acc);
    out = empty_like_layout(gx);
    a_out = acc_vector(out_scale, acc);
    b_out = acc_vector(out_shift, acc);
    if (b.defined()) b_out = b_out + a_out * b;  // a * (z + bias) + shift
  } else {
    out = at::empty({N, C_out, H, W}, opts.memory_format(memory_format_of(layout_of(s_d))));
  }
  if (out.numel() == 0) return gated ? out.to(gate_x->scalar_type()) : out;

  // Without prologue and shuffle, an NCHW s in acc is the conv's input as it is; a raw NCHW
  // output receives the GEMMs directly.
  const bool read_s = in_place(s_d, acc) && !scale.defined() && shuffle_groups == 1;
  const bool write_out = !gated && out.is_contiguous();
  AT_DISPATCH_FLOATING_TYPES(acc, "shuffle_conv_cpu", [&] {
    using acc_t = scalar_t;
    std::function<at::Tensor(int64_t, int64_t, at::Tensor&)> input;
    dispatch_family<acc_t>(s_d.scalar_type(), [&](auto tag) {
      using scalar_t = decltype(tag);
      input = [&](int64_t n, int64_t g, at::Tensor& buf) {
        if (read_s) return channel_rows(s_d, n, g * cs.Cg, cs.Cg);
        at::Tensor u = scratch(buf, cs.Cg, geo.HW, opts);
        fill_input<scalar_t>(sample_view<scalar_t>(s_d, n), chans.data() + g * cs.Cg, cs.Cg, ptr_or_null<acc_t>(scale),
                             ptr_or_null<acc_t>(shift), geo, u.data_ptr<acc_t>(), nullptr);
        return u;
      };
    });
    auto target = [&](int64_t n, int64_t c0, int64_t count, at::Tensor& buf) {
      return write_out ? channel_rows(out, n, c0, count) : scratch(buf, count, geo.HW, opts);
    };
    std::function<void(int64_t, int64_t, const at::Tensor&)> finish;
    if (write_out) {
      finish = [&](int64_t, int64_t c0, const at::Tensor& z) {
        if (b.defined()) add_bias<acc_t>(z, b.const_data_ptr<acc_t>(), c0);
      };
    } else if (!gated) {
      finish = [&](int64_t n, int64_t c0, const at::Tensor& z) {
        store_raw<acc_t>(z, geo, ptr_or_null<acc_t>(b), n, c0, out);
      };
    } else {
      dispatch_family<acc_t>(gx.scalar_type(), [&](auto tag) {
        using scalar_t = decltype(tag);
        finish = [&](int64_t n, int64_t c0, const at::Tensor& z) {
          store_gated<scalar_t>(z, geo, a_out.const_data_ptr<acc_t>(), b_out.const_data_ptr<acc_t>(), gx, n, c0, out);
        };
      });
    }
    conv_forward<acc_t>(cs, geo, A, packing, input, target, finish);
  });
  return gated && out.scalar_type() != gate_x->scalar_type() ? out.to(gate_x->scalar_type()) : out;
}

// ---------------------------------------------------------------- shuffle_conv_backward

// Per-chunk partial sums of the backward, summed over the chunks in order at the end.
struct Partials {
  at::Tensor weight;        // (chunks, G, gemms, M, K) in pack_weight's layout, or (.., K, M) transposed
  bool transposed;
  at::Tensor bias;          // (chunks, C_out)
  at::Tensor scale, shift;  // (chunks, C_in), undefined without the prologue

  static at::Tensor total(const at::Tensor& parts) {
    at::Tensor sum = parts[0].clone();
    for (int64_t i = 1; i < parts.size(0); ++i) sum.add_(parts[i]);
    return sum;
  }
};

// Chunks of samples: one per sample while the per-chunk grad_weight partials fit a budget; a
// function of the shapes only, so the order of the sums is too.
int64_t backward_chunks(int64_t N, int64_t weight_numel) {
  constexpr int64_t kPartialBudget = int64_t(1) << 24;  // values
  return std::max<int64_t>(1, std::min({N, int64_t(64), kPartialBudget / std::max<int64_t>(weight_numel, 1)}));
}

// sums[o] += the sum of row o of m (count x HW, acc).
template <typename acc_t>
void add_row_sums(const at::Tensor& m, acc_t* sums) {
  using V = Vectorized<acc_t>;
  const int64_t HW = m.size(1);
  for (int64_t o = 0; o < m.size(0); ++o) {
    const acc_t* row = m.const_data_ptr<acc_t>() + o * m.stride(0);
    V total(0);
    int64_t p = 0;
    for (; p + V::size() <= HW; p += V::size()) total = total + V::loadu(row + p);
    acc_t rest = 0;
    for (; p < HW; ++p) rest += row[p];
    sums[o] += reduce_sum(total) + rest;
  }
}

// The prologue's backward over n contiguous values: du = relu_grad(grad_u, t), t = a*s + b;
// grad_s = du * a; sum_scale += du * s, sum_shift += du. Without the prologue grad_s = grad_u.
template <typename scalar_t, bool kAffine>
void prologue_grad_row(const at::opmath_type<scalar_t>* gu, const scalar_t* s, int64_t n, at::opmath_type<scalar_t> a,
                       at::opmath_type<scalar_t> b, scalar_t* gs, at::opmath_type<scalar_t>& sum_scale,
                       at::opmath_type<scalar_t>& sum_shift) {
  using S = Step<scalar_t>;
  using acc_t = typename S::acc_t;
  using AccVec = typename S::AccVec;
  AccVec ts[S::kVecs], th[S::kVecs];
  for (int k = 0; k < S::kVecs; ++k) ts[k] = th[k] = AccVec(0);
  int64_t i = 0;
  for (; i + S::kWidth <= n; i += S::kWidth) {
    AccVec g[S::kVecs];
    S::load_acc(gu + i, g);
    if constexpr (kAffine) {
      AccVec x[S::kVecs];
      S::load(s + i, x);
      for (int k = 0; k < S::kVecs; ++k) {
        const AccVec du = vec_relu_grad(g[k], x[k] * AccVec(a) + AccVec(b));
        ts[k] = ts[k] + du * x[k];
        th[k] = th[k] + du;
        g[k] = du * AccVec(a);
      }
    }
    S::store(gs + i, g);
  }
  acc_t rs = 0, rh = 0;
  for (; i < n; ++i) {
    acc_t g = gu[i];
    if constexpr (kAffine) {
      const acc_t x = static_cast<acc_t>(s[i]);
      const acc_t du = relu_grad(g, x * a + b);
      rs += du * x;
      rh += du;
      g = du * a;
    }
    gs[i] = static_cast<scalar_t>(g);
  }
  if constexpr (kAffine) {
    for (int k = 0; k < S::kVecs; ++k) {
      rs += reduce_sum(ts[k]);
      rh += reduce_sum(th[k]);
    }
    sum_scale += rs;
    sum_shift += rh;
  }
}

// grad_s of one (sample, group) from grad_u (count x HW, acc); the prologue's sums into
// sum_scale / sum_shift, indexed by s's channel (null without the prologue). gs has x's strides.
template <typename scalar_t>
void prologue_grad(const at::opmath_type<scalar_t>* gu, const SampleView<scalar_t>& x, const int64_t* chans,
                   int64_t count, const at::opmath_type<scalar_t>* scale, const at::opmath_type<scalar_t>* shift,
                   const Geometry& geo, scalar_t* gs, at::opmath_type<scalar_t>* sum_scale,
                   at::opmath_type<scalar_t>* sum_shift) {
  using acc_t = at::opmath_type<scalar_t>;
  if (x.planar(geo)) {
    for (int64_t c = 0; c < count; ++c) {
      const int64_t sc = chans[c], off = sc * x.sC;
      acc_t rs = 0, rh = 0;
      if (scale != nullptr) {
        prologue_grad_row<scalar_t, true>(gu + c * geo.HW, x.data + off, geo.HW, scale[sc], shift[sc], gs + off, rs,
                                          rh);
        sum_scale[sc] += rs;
        sum_shift[sc] += rh;
      } else {
        prologue_grad_row<scalar_t, false>(gu + c * geo.HW, x.data + off, geo.HW, 0, 0, gs + off, rs, rh);
      }
    }
    return;
  }
  for (int64_t h = 0; h < geo.H; ++h) {
    for (int64_t w = 0; w < geo.W; ++w) {
      const int64_t pix = h * x.sH + w * x.sW;
      for (int64_t c = 0; c < count; ++c) {
        const int64_t sc = chans[c], off = pix + sc * x.sC;
        acc_t g = gu[c * geo.HW + h * geo.W + w];
        if (scale != nullptr) {
          const acc_t v = static_cast<acc_t>(x.data[off]);
          const acc_t du = relu_grad(g, v * scale[sc] + shift[sc]);
          sum_scale[sc] += du * v;
          sum_shift[sc] += du;
          g = du * scale[sc];
        }
        gs[off] = static_cast<scalar_t>(g);
      }
    }
  }
}

// The backward's callbacks, in the forward's style: the conv's input u and grad_z as (Cg or Og
// x HW) matrices (views or filled buffers; grad_output also adds grad_z's row sums to bias_sums),
// the matrix grad_u is written to, and finish(n, g, grad_u, chunk) for grad_s and its sums.
template <typename acc_t>
struct BackwardIO {
  std::function<at::Tensor(int64_t, int64_t, at::Tensor&)> input;
  std::function<at::Tensor(int64_t, int64_t, at::Tensor&, acc_t*)> grad_output;
  std::function<at::Tensor(int64_t, int64_t, at::Tensor&)> grad_input_target;
  std::function<void(int64_t, int64_t, const at::Tensor&, int64_t)> finish;
};

// Whether grad_weight's GEMMs run transposed, dW^T (K x M) += operand @ grad_z^T: MKL runs the
// reduction over pixels faster with the larger of K and M as the output's rows (1.25x at
// M = 16, K = 256), except for very few rows of grad_z (M = 4: 3x slower).
bool transposed_weight_grad(int64_t M, int64_t K) { return K > M && M >= 16; }

// dW (M x K, or K x M transposed) += gz_rows (M x pixels) @ B (K x pixels)^T.
void accumulate_weight_grad(at::Tensor dW, const at::Tensor& gz_rows, const at::Tensor& B, bool transposed) {
  if (transposed) {
    at::cpu::addmm_(dW, B, gz_rows.t());
  } else {
    at::cpu::addmm_(dW, gz_rows, B.t());
  }
}

// grad_weight's GEMMs for one sample: over the forward's operands of u, or, for kShiftOutput,
// over u's row ranges as they are with grad_z shifted by P - j columns instead (the same sum:
// dW[o, c, i, j] = sum_{h, w} gz[o, h, w - (j - P)] * u[c, h + i - P, w]).
template <typename acc_t>
void weight_grad(Correlation& fwd, const at::Tensor& u, const at::Tensor& gz, const at::Tensor& dW, bool transposed,
                 at::Tensor& shift_buf) {
  const Geometry& geo = fwd.geo;
  const int64_t W = geo.W, P = geo.P, k = geo.k, Og = gz.size(0);
  if (fwd.packing == Packing::kStackOutputRow || fwd.packing == Packing::kStackOutputAll) {
    // dW[group] (taps*Og x Cg) += G @ u^T, G's rows (tap, o) = grad_z through the tap's window:
    // G[(i, j, o), h, w] = gz[o, h - (i - P), w - (j - P)] (a col2im's transpose, an im2col).
    const int64_t T = taps_per_gemm(fwd.packing, k);
    const acc_t* src = gz.const_data_ptr<acc_t>();
    for (int64_t grp = 0; grp < k * k / T; ++grp) {
      at::Tensor stack = scratch(shift_buf, T * Og, geo.HW, gz.options());
      acc_t* dst = stack.data_ptr<acc_t>();
      for (int64_t tl = 0; tl < T; ++tl) {
        const int64_t t = grp * T + tl, di = t / k - P, dj = t % k - P;
        for (int64_t o = 0; o < Og; ++o) {
          for (int64_t h = 0; h < geo.H; ++h) {
            const int64_t hs = h - di;
            shifted_row(hs >= 0 && hs < geo.H ? src + (o * geo.H + hs) * W : nullptr, W, -dj,
                        dst + ((tl * Og + o) * geo.H + h) * W);
          }
        }
      }
      accumulate_weight_grad(dW[grp], stack, u, transposed);
    }
    return;
  }
  if (fwd.packing != Packing::kShiftOutput) {
    fwd.for_each_gemm<acc_t>(u, [&](int64_t t, const at::Tensor& B, int64_t h0, int64_t h1) {
      accumulate_weight_grad(dW[t], gz.narrow(1, h0 * W, (h1 - h0) * W), B, transposed);
    });
    return;
  }
  for (int64_t j = 0; j < k; ++j) {
    at::Tensor g = gz;
    if (j != P) {
      g = scratch(shift_buf, gz.size(0), geo.HW, gz.options());
      const acc_t* src = gz.const_data_ptr<acc_t>();
      acc_t* dst = g.data_ptr<acc_t>();
      for (int64_t r = 0; r < gz.size(0) * geo.H; ++r) shifted_row(src + r * W, W, P - j, dst + r * W);
    }
    for (int64_t i = 0; i < k; ++i) {
      const int64_t h0 = geo.first_row(i), h1 = geo.end_row(i);
      if (h1 <= h0) continue;
      accumulate_weight_grad(dW[i * k + j], g.narrow(1, h0 * W, (h1 - h0) * W),
                             u.narrow(1, (h0 + i - P) * W, (h1 - h0) * W), transposed);
    }
  }
}

// Tasks (chunk of samples, group). Per sample: grad_weight over the forward's GEMMs, grad_u =
// the conv of grad_z with the weights transposed and flipped, then grad_s.
template <typename acc_t>
void conv_backward(const ConvShape& cs, const Geometry& geo, Packing pack_u, const at::Tensor& A_gz, Packing pack_gz,
                   int64_t chunks, Partials& parts, const BackwardIO<acc_t>& io) {
  at::parallel_for(0, chunks * cs.G, 1, [&](int64_t begin, int64_t end) {
    BelowAutograd below;
    Correlation fwd(geo, cs.Cg, pack_u, A_gz.options());   // u's operands, for grad_weight
    Correlation bwd(geo, cs.Og, pack_gz, A_gz.options());  // grad_z's, for grad_u
    at::Tensor u_buf, gz_buf, gu_buf, shift_buf, t_buf;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t chunk = task / cs.G, g = task % cs.G;
      const at::Tensor dW = parts.weight[chunk][g];
      acc_t* bias_sums = parts.bias[chunk].data_ptr<acc_t>() + g * cs.Og;
      for (int64_t n = chunk * cs.N / chunks; n < (chunk + 1) * cs.N / chunks; ++n) {
        const at::Tensor u = io.input(n, g, u_buf);
        const at::Tensor gz = io.grad_output(n, g, gz_buf, bias_sums);
        weight_grad<acc_t>(fwd, u, gz, dW, parts.transposed, shift_buf);
        at::Tensor gu = io.grad_input_target(n, g, gu_buf);
        correlate<acc_t>(bwd, A_gz, g, 0, gz, gu, t_buf);
        io.finish(n, g, gu, chunk);
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> shuffle_conv_backward_cpu(
    const at::Tensor& grad_z, const at::Tensor& s, const at::Tensor& weight, int64_t groups, int64_t shuffle_groups,
    const c10::optional<at::Tensor>& in_scale, const c10::optional<at::Tensor>& in_shift) {
  const char* op = "shuffle_conv_backward";
  check_shuffle_conv_args(s, weight, groups, shuffle_groups, in_scale, in_shift, op);
  const int64_t N = s.size(0), C_in = s.size(1), H = s.size(2), W = s.size(3);
  const int64_t C_out = weight.size(0), k = weight.size(2);
  check_feature_map(grad_z, op, "grad_z");
  AK_CHECK_VALUE(grad_z.sizes() == at::IntArrayRef({N, C_out, H, W}), op,
                    ": grad_z must have the output's shape (N, C_out, H, W) = (", N, ", ", C_out, ", ", H, ", ", W,
                    "), got ", grad_z.sizes());
  AK_CHECK_VALUE(grad_z.device() == s.device(), op, ": grad_z must be on ", s.device(), ", got ", grad_z.device());

  const at::ScalarType acc = acc_type(s.scalar_type());
  const at::Tensor s_d = dense(s);
  const at::Tensor gz_d = in_acc_family(dense(grad_z), acc);  // read in its own dtype when it shares acc(s)
  const ConvShape cs{N, C_in, C_out, groups, C_in / groups, C_out / groups};
  const Geometry geo{H, W, k, (k - 1) / 2, H * W};
  const int64_t elem = acc == at::kDouble ? 8 : 4;
  const Packing pack_u = weight_grad_packing(choose_packing(cs.Cg, cs.Og, geo, elem), cs.Og, geo, elem);
  const Packing pack_gz = choose_packing(cs.Og, cs.Cg, geo, elem);
  const at::Tensor w5 = weight.to(acc).reshape({groups, cs.Og, cs.Cg, k, k});
  // grad_u is the conv of grad_z with the weights transposed (Og <-> Cg) and flipped (i, j -> k-1-i, k-1-j).
  const at::Tensor A_gz = pack_weight(w5.flip({3, 4}).transpose(1, 2), pack_gz);
  const at::Tensor scale = acc_vector(in_scale, acc), shift = acc_vector(in_shift, acc);
  const std::vector<int64_t> chans = input_channels(C_in, shuffle_groups);
  std::vector<int64_t> out_chans(C_out);
  for (int64_t o = 0; o < C_out; ++o) out_chans[o] = o;
  const bool affine = scale.defined();
  const at::TensorOptions opts = s.options().dtype(acc);

  const int64_t chunks = backward_chunks(N, weight.numel());
  // grad_weight accumulates in pack_u's packing (gemms, M, K), or transposed.
  const at::Tensor packed = pack_weight(w5, pack_u);
  const int64_t gemms = packed.size(1), M = packed.size(2), K = packed.size(3);
  const bool transposed = transposed_weight_grad(M, K);
  const std::vector<int64_t> weight_parts = transposed ? std::vector<int64_t>{chunks, groups, gemms, K, M}
                                                      : std::vector<int64_t>{chunks, groups, gemms, M, K};
  Partials parts{at::zeros(weight_parts, opts),
                 transposed, at::zeros({chunks, C_out}, opts), affine ? at::zeros({chunks, C_in}, opts) : at::Tensor(),
                 affine ? at::zeros({chunks, C_in}, opts) : at::Tensor()};
  at::Tensor grad_s = empty_like_layout(s_d);
  // Without prologue and shuffle, an NCHW s in acc is u itself, and grad_s receives grad_u.
  const bool direct_s = in_place(s_d, acc) && !affine && shuffle_groups == 1;
  const bool read_gz = in_place(gz_d, acc);
  if (s.numel() == 0 || grad_z.numel() == 0) {
    grad_s.zero_();
  } else {
    AT_DISPATCH_FLOATING_TYPES(acc, "shuffle_conv_backward_cpu", [&] {
      using acc_t = scalar_t;
      BackwardIO<acc_t> io;
      dispatch_family<acc_t>(s_d.scalar_type(), [&](auto tag) {
        using scalar_t = decltype(tag);
        io.input = [&](int64_t n, int64_t g, at::Tensor& buf) {
          if (direct_s) return channel_rows(s_d, n, g * cs.Cg, cs.Cg);
          at::Tensor u = scratch(buf, cs.Cg, geo.HW, opts);
          fill_input<scalar_t>(sample_view<scalar_t>(s_d, n), chans.data() + g * cs.Cg, cs.Cg,
                               ptr_or_null<acc_t>(scale), ptr_or_null<acc_t>(shift), geo, u.data_ptr<acc_t>(), nullptr);
          return u;
        };
        io.grad_input_target = [&](int64_t n, int64_t g, at::Tensor& buf) {
          return direct_s ? channel_rows(grad_s, n, g * cs.Cg, cs.Cg) : scratch(buf, cs.Cg, geo.HW, opts);
        };
        io.finish = [&](int64_t n, int64_t g, const at::Tensor& gu, int64_t chunk) {
          if (direct_s) return;
          prologue_grad<scalar_t>(gu.const_data_ptr<acc_t>(), sample_view<scalar_t>(s_d, n), chans.data() + g * cs.Cg,
                                  cs.Cg, ptr_or_null<acc_t>(scale), ptr_or_null<acc_t>(shift), geo,
                                  grad_s.data_ptr<scalar_t>() + n * grad_s.stride(0),
                                  affine ? parts.scale[chunk].data_ptr<acc_t>() : nullptr,
                                  affine ? parts.shift[chunk].data_ptr<acc_t>() : nullptr);
        };
      });
      dispatch_family<acc_t>(gz_d.scalar_type(), [&](auto tag) {
        using scalar_t = decltype(tag);
        io.grad_output = [&](int64_t n, int64_t g, at::Tensor& buf, acc_t* bias_sums) {
          if (read_gz) {
            at::Tensor gz = channel_rows(gz_d, n, g * cs.Og, cs.Og);
            add_row_sums<acc_t>(gz, bias_sums);
            return gz;
          }
          at::Tensor gz = scratch(buf, cs.Og, geo.HW, opts);
          fill_input<scalar_t>(sample_view<scalar_t>(gz_d, n), out_chans.data() + g * cs.Og, cs.Og, nullptr, nullptr,
                               geo, gz.data_ptr<acc_t>(), bias_sums);
          return gz;
        };
      });
      conv_backward<acc_t>(cs, geo, pack_u, A_gz, pack_gz, chunks, parts, io);
    });
  }
  at::Tensor dW = Partials::total(parts.weight);
  if (transposed) dW = dW.transpose(-1, -2).contiguous();
  const at::Tensor grad_weight = unpack_weight(dW, cs.Og, cs.Cg, k, pack_u)
                                     .reshape({C_out, cs.Cg, k, k})
                                     .to(weight.scalar_type())
                                     .contiguous();
  const at::Tensor grad_bias = Partials::total(parts.bias).to(weight.scalar_type());
  at::Tensor grad_in_scale = at::empty({0}, opts), grad_in_shift = at::empty({0}, opts);
  if (affine) {
    grad_in_scale = Partials::total(parts.scale).to(in_scale->scalar_type());
    grad_in_shift = Partials::total(parts.shift).to(in_shift->scalar_type());
  }
  return {grad_s, grad_weight, grad_bias, grad_in_scale, grad_in_shift};
}

// ---------------------------------------------------------------- the epilogue ops

// The walk of an (N, C, H, W) map in NCHW (planes of HW) or channels_last (pixel rows of C).
struct Walk {
  bool channels_last;
  int64_t N, C, HW;
};

// Channels_last pixel rows per reduction task: fixed by the shapes (about 256 tasks at most),
// so the partial sums and their order are too.
int64_t pixel_block(int64_t pixels) { return std::max<int64_t>(64, (pixels + 255) / 256); }

// NCHW: f(plane p = n*C + c, c, offset, count); channels_last: f(block, first pixel, pixel count).
template <typename Planes, typename Rows>
void walk_tasks(const Walk& wk, const Planes& planes, const Rows& rows) {
  if (!wk.channels_last) {
    const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(wk.HW, 1));
    at::parallel_for(0, wk.N * wk.C, grain, [&](int64_t begin, int64_t end) {
      for (int64_t p = begin; p < end; ++p) planes(p, p % wk.C);
    });
    return;
  }
  const int64_t pixels = wk.N * wk.HW, block = pixel_block(pixels);
  const int64_t tasks = (pixels + block - 1) / block;
  at::parallel_for(0, tasks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) rows(t, t * block, std::min(block, pixels - t * block));
  });
}

// Rows of partial sums the walk writes (at least one, so that an empty map sums to zeros).
int64_t partial_rows(const Walk& wk) {
  if (!wk.channels_last) return std::max<int64_t>(wk.N, 1);
  const int64_t pixels = wk.N * wk.HW, block = pixel_block(pixels);
  return std::max<int64_t>((pixels + block - 1) / block, 1);
}

at::Tensor epilogue_cpu(const at::Tensor& z, const at::Tensor& gate_x, const at::Tensor& out_scale,
                        const at::Tensor& out_shift) {
  const char* op = "shuffle_conv_epilogue";
  check_feature_map(z, op, "z");
  check_epilogue_args(gate_x, out_scale, out_shift, z.sizes(), z.device(), op);
  const at::ScalarType acc = acc_type(z.scalar_type());
  const at::Tensor gx = in_acc_family(dense(gate_x), acc);
  const Walk wk{layout_of(gx) == Layout::ChannelsLast, z.size(0), z.size(1), z.size(2) * z.size(3)};
  const at::Tensor zw = z.to(acc).contiguous(memory_format_of(layout_of(gx)));
  const at::Tensor a = out_scale.reshape(-1).to(acc).contiguous(), b = out_shift.reshape(-1).to(acc).contiguous();
  at::Tensor y = empty_like_layout(gx);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, gx.scalar_type(), "shuffle_conv_epilogue_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* gp = gx.const_data_ptr<scalar_t>();
    const acc_t *zp = zw.const_data_ptr<acc_t>(), *ap = a.const_data_ptr<acc_t>(), *bp = b.const_data_ptr<acc_t>();
    scalar_t* yp = y.data_ptr<scalar_t>();
    walk_tasks(
        wk,
        [&](int64_t p, int64_t c) {
          gate_row<scalar_t, false>(gp + p * wk.HW, zp + p * wk.HW, ap + c, bp + c, wk.HW, yp + p * wk.HW);
        },
        [&](int64_t, int64_t first, int64_t count) {
          for (int64_t r = first; r < first + count; ++r) {
            gate_row<scalar_t, true>(gp + r * wk.C, zp + r * wk.C, ap, bp, wk.C, yp + r * wk.C);
          }
        });
  });
  return y.scalar_type() == gate_x.scalar_type() ? y : y.to(gate_x.scalar_type());
}

// The epilogue's backward over n values (one step of kWidth at a time): grad_gate_x = gy * sg,
// dpre = gy * gx * sg * (1 - sg), gz_out = dpre * a (kStats: dpre itself, for the second pass);
// the sums of dpre, dpre * z and (kStats) dpre * (z - mean) per lane into s1, sz, sc (kWidth
// lanes per step: channel arrays when kPerLane, the same lane accumulators otherwise).
template <typename scalar_t, bool kPerLane, bool kStats>
void epilogue_grad_row(const scalar_t* gy, const scalar_t* gx, const at::opmath_type<scalar_t>* z,
                       const at::opmath_type<scalar_t>* a, const at::opmath_type<scalar_t>* b,
                       const at::opmath_type<scalar_t>* mean, int64_t n, scalar_t* ggx,
                       at::opmath_type<scalar_t>* gz_out, at::opmath_type<scalar_t>* s1,
                       at::opmath_type<scalar_t>* sz, at::opmath_type<scalar_t>* sc) {
  using S = Step<scalar_t>;
  using acc_t = typename S::acc_t;
  using AccVec = typename S::AccVec;
  constexpr int64_t V = S::kWidth;
  constexpr int kV = S::kVecs;
  auto step = [](const scalar_t* gy, const scalar_t* gx, const acc_t* z, const acc_t* a, const acc_t* b,
                 const acc_t* mean, scalar_t* ggx, acc_t* gz_out, acc_t* s1, acc_t* sz, acc_t* sc) {
    AccVec g[kV], x[kV], zv[kV], av[kV], bv[kV], mv[kV], t1[kV], tz[kV], tc[kV];
    S::load(gy, g);
    S::load(gx, x);
    S::load_acc(z, zv);
    load_param<scalar_t, kPerLane>(a, av);
    load_param<scalar_t, kPerLane>(b, bv);
    S::load_acc(s1, t1);
    S::load_acc(sz, tz);
    if constexpr (kStats) {
      load_param<scalar_t, kPerLane>(mean, mv);
      S::load_acc(sc, tc);
    }
    for (int k = 0; k < kV; ++k) {
      const AccVec sg = vec_sigmoid(zv[k] * av[k] + bv[k]);
      const AccVec dpre = g[k] * x[k] * sg * (AccVec(1) - sg);
      g[k] = g[k] * sg;
      t1[k] = t1[k] + dpre;
      tz[k] = tz[k] + dpre * zv[k];
      if constexpr (kStats) tc[k] = tc[k] + dpre * (zv[k] - mv[k]);
      x[k] = kStats ? dpre : dpre * av[k];
    }
    S::store(ggx, g);
    S::store_acc(gz_out, x);
    S::store_acc(s1, t1);
    S::store_acc(sz, tz);
    if constexpr (kStats) S::store_acc(sc, tc);
  };
  const int64_t lane = kPerLane ? 1 : 0;
  for_steps<V>(
      n,
      [&](int64_t i) {
        step(gy + i, gx + i, z + i, a + lane * i, b + lane * i, mean + lane * i, ggx + i, gz_out + i, s1 + lane * i,
             sz + lane * i, sc + lane * i);
      },
      [&](int64_t i, int64_t r) {
        // Zero grad_y in the spare lanes: their dpre is 0 and adds nothing to the sums.
        scalar_t gy_t[V] = {}, gx_t[V] = {}, ggx_t[V];
        acc_t z_t[V] = {}, a_t[V] = {}, b_t[V] = {}, m_t[V] = {}, gz_t[V], s1_t[V], sz_t[V], sc_t[V];
        std::copy_n(gy + i, r, gy_t);
        std::copy_n(gx + i, r, gx_t);
        std::copy_n(z + i, r, z_t);
        const acc_t *ap = a, *bp = b, *mp = mean;
        acc_t *p1 = s1, *pz = sz, *pc = sc;
        if (kPerLane) {
          std::copy_n(a + i, r, a_t);
          std::copy_n(b + i, r, b_t);
          if (kStats) std::copy_n(mean + i, r, m_t);
          std::fill_n(s1_t, V, acc_t(0));
          std::fill_n(sz_t, V, acc_t(0));
          std::fill_n(sc_t, V, acc_t(0));
          ap = a_t, bp = b_t, mp = m_t, p1 = s1_t, pz = sz_t, pc = sc_t;
        }
        step(gy_t, gx_t, z_t, ap, bp, mp, ggx_t, gz_t, p1, pz, pc);
        std::copy_n(ggx_t, r, ggx + i);
        std::copy_n(gz_t, r, gz_out + i);
        if (kPerLane) {
          for (int64_t l = 0; l < r; ++l) {
            s1[i + l] += s1_t[l];
            sz[i + l] += sz_t[l];
            if (kStats) sc[i + l] += sc_t[l];
          }
        }
      });
}

// BatchNorm's second pass over n values, in place: g = a * (dpre - k1 - (z - mean) * k2).
template <typename acc_t, bool kPerLane>
void batch_norm_grad_row(acc_t* g, const acc_t* z, const acc_t* a, const acc_t* mean, const acc_t* k1,
                         const acc_t* k2, int64_t n) {
  using V = Vectorized<acc_t>;
  auto param = [](const acc_t* p, int64_t i) { return kPerLane ? V::loadu(p + i) : V(*p); };
  int64_t i = 0;
  for (; i + V::size() <= n; i += V::size()) {
    const V r = param(a, i) * (V::loadu(g + i) - param(k1, i) - (V::loadu(z + i) - param(mean, i)) * param(k2, i));
    r.store(g + i);
  }
  for (; i < n; ++i) {
    const int64_t l = kPerLane ? i : 0;
    g[i] = a[l] * (g[i] - k1[l] - (z[i] - mean[l]) * k2[l]);
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> epilogue_backward_cpu(
    const at::Tensor& grad_y, const at::Tensor& z, const at::Tensor& gate_x, const at::Tensor& out_scale,
    const at::Tensor& out_shift, const c10::optional<at::Tensor>& mean, const c10::optional<at::Tensor>& rstd) {
  const char* op = "shuffle_conv_epilogue_backward";
  check_feature_map(z, op, "z");
  check_epilogue_args(gate_x, out_scale, out_shift, z.sizes(), z.device(), op);
  check_feature_map(grad_y, op, "grad_y");
  AK_CHECK_VALUE(grad_y.sizes() == z.sizes(), op, ": grad_y must have z's shape ", z.sizes(), ", got ",
                    grad_y.sizes());
  AK_CHECK_VALUE(grad_y.device() == z.device(), op, ": grad_y must be on ", z.device(), ", got ", grad_y.device());
  AK_CHECK_VALUE(mean.has_value() == rstd.has_value(), op, ": mean and rstd must be given together");
  const int64_t N = z.size(0), C = z.size(1), HW = z.size(2) * z.size(3);
  const bool stats = mean.has_value();
  if (stats) {
    check_vector(*mean, C, z.device(), op, "mean", "C");
    check_vector(*rstd, C, z.device(), op, "rstd", "C");
  }
  const at::ScalarType acc = acc_type(z.scalar_type());
  const at::Tensor gx = in_acc_family(dense(gate_x), acc);
  const at::MemoryFormat fmt = memory_format_of(layout_of(gx));
  const Walk wk{layout_of(gx) == Layout::ChannelsLast, N, C, HW};
  // Everything walks in gate_x's layout; grad_y in gate_x's (working) dtype, z in acc.
  const at::Tensor gy = grad_y.to(gx.scalar_type()).contiguous(fmt);
  const at::Tensor zw = z.to(acc).contiguous(fmt);
  const at::Tensor a = out_scale.reshape(-1).to(acc).contiguous(), b = out_shift.reshape(-1).to(acc).contiguous();
  const at::Tensor m = stats ? mean->reshape(-1).to(acc).contiguous() : at::zeros({C}, a.options());
  at::Tensor grad_gx = empty_like_layout(gx);
  at::Tensor grad_zw = at::empty_like(zw);  // grad_z in acc, in gate_x's layout
  const int64_t rows = partial_rows(wk);
  at::Tensor partial = at::zeros({3, rows, C}, a.options());  // sums of dpre, dpre * z, dpre * (z - mean)

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, gx.scalar_type(), "shuffle_conv_epilogue_bwd_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t *gyp = gy.const_data_ptr<scalar_t>(), *gxp = gx.const_data_ptr<scalar_t>();
    const acc_t *zp = zw.const_data_ptr<acc_t>(), *ap = a.const_data_ptr<acc_t>(), *bp = b.const_data_ptr<acc_t>();
    const acc_t* mp = m.const_data_ptr<acc_t>();
    scalar_t* ggp = grad_gx.data_ptr<scalar_t>();
    acc_t *gzp = grad_zw.data_ptr<acc_t>(), *pp = partial.data_ptr<acc_t>();
    const int64_t part = rows * C;  // between the three sums
    auto first_pass = [&](auto stats_tag) {
      constexpr bool kStats = decltype(stats_tag)::value;
      walk_tasks(
          wk,
          [&](int64_t p, int64_t c) {
            constexpr int64_t V = Step<scalar_t>::kWidth;
            acc_t lanes[3][V] = {};
            const int64_t off = p * HW;
            epilogue_grad_row<scalar_t, false, kStats>(gyp + off, gxp + off, zp + off, ap + c, bp + c, mp + c, HW,
                                                       ggp + off, gzp + off, lanes[0], lanes[1], lanes[2]);
            for (int s = 0; s < 3; ++s) {
              acc_t total = 0;
              for (int64_t l = 0; l < V; ++l) total += lanes[s][l];
              pp[s * part + p] = total;  // row n = p / C, channel c: index n * C + c = p
            }
          },
          [&](int64_t t, int64_t first, int64_t count) {
            acc_t* sums = pp + t * C;
            for (int64_t r = first; r < first + count; ++r) {
              const int64_t off = r * C;
              epilogue_grad_row<scalar_t, true, kStats>(gyp + off, gxp + off, zp + off, ap, bp, mp, C, ggp + off,
                                                        gzp + off, sums, sums + part, sums + 2 * part);
            }
          });
    };
    with_flag(stats, first_pass);
  });
  // Per-channel totals, the partial rows summed in order.
  const at::Tensor s1 = Partials::total(partial[0]), sz = Partials::total(partial[1]);
  if (stats) {
    // grad_z = a * (dpre - sum dpre / M - (z - mean) * rstd^2 * sum(dpre * (z - mean)) / M)
    const double M = static_cast<double>(N * HW);
    const at::Tensor r = rstd->reshape(-1).to(acc);
    const at::Tensor k1 = (s1 / M).contiguous();
    const at::Tensor k2 = (r * r * Partials::total(partial[2]) / M).contiguous();
    AT_DISPATCH_FLOATING_TYPES(acc, "shuffle_conv_batch_norm_grad", [&] {
      scalar_t* g = grad_zw.data_ptr<scalar_t>();
      const scalar_t *zp = zw.const_data_ptr<scalar_t>(), *ap = a.const_data_ptr<scalar_t>();
      const scalar_t *mp = m.const_data_ptr<scalar_t>(), *k1p = k1.const_data_ptr<scalar_t>(),
                     *k2p = k2.const_data_ptr<scalar_t>();
      walk_tasks(
          wk,
          [&](int64_t p, int64_t c) {
            batch_norm_grad_row<scalar_t, false>(g + p * HW, zp + p * HW, ap + c, mp + c, k1p + c, k2p + c, HW);
          },
          [&](int64_t, int64_t first, int64_t count) {
            for (int64_t r = first; r < first + count; ++r) {
              batch_norm_grad_row<scalar_t, true>(g + r * C, zp + r * C, ap, mp, k1p, k2p, C);
            }
          });
    });
  }
  at::Tensor grad_z = grad_zw;
  const at::Tensor z_d = dense(z);
  if (grad_z.scalar_type() != z.scalar_type() || layout_of(z_d) != layout_of(gx)) {
    grad_z = empty_like_layout(z_d);
    grad_z.copy_(grad_zw);
  }
  at::Tensor grad_gate_x = grad_gx.scalar_type() == gate_x.scalar_type() ? grad_gx : grad_gx.to(gate_x.scalar_type());
  return {grad_z, grad_gate_x, sz.to(out_scale.scalar_type()), s1.to(out_shift.scalar_type())};
}

}  // namespace

TORCH_LIBRARY_IMPL(attnkernels, CPU, m) {
  m.impl("shuffle_conv", &shuffle_conv_cpu);
  m.impl("shuffle_conv_backward", &shuffle_conv_backward_cpu);
  m.impl("shuffle_conv_epilogue", &epilogue_cpu);
  m.impl("shuffle_conv_epilogue_backward", &epilogue_backward_cpu);
}

}  // namespace attnkernels
