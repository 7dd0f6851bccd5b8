// CPU kernels of the bam hot path; the math is in csrc/bam_ops.cpp.
//
// The tasks of attnkernels/cpu_spatial_pool.h: one per sample and block of pixels, owning all C
// channels of its pixels, so grad_ms (a sum over C) finishes inside the task and grad_mc (a sum
// over pixels) leaves one partial row per task, summed over the blocks in order afterwards:
// deterministic, no atomics. NCHW walks each channel's run of the block's pixels, channels_last
// each pixel's row of C channels, both in place.
// exp(-z) = exp(-mc) * exp(-ms): a task takes C + (its pixels) exps and each element one product,
// where an exp per element would make the pass compute-bound. A task whose mc or ms could
// overflow that product (or holds NaN or inf) takes an exp per element instead.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <tuple>
#include <type_traits>
#include <vector>

#include "attnkernels/bam.h"
#include "attnkernels/cpu_spatial_pool.h"

namespace attnkernels {
namespace {

using namespace cpu_spatial;

#define AK_DISPATCH_FEATURE(x, name, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, (x).scalar_type(), name, __VA_ARGS__)

// |mc| and |ms| up to this bound keep exp(-mc) and exp(-ms) finite and normal: their product is
// never 0 * inf and loses nothing to subnormals (it overflows only where exp(-z) itself would).
template <typename acc_t>
constexpr acc_t kFactorBound = std::is_same_v<acc_t, double> ? acc_t(700) : acc_t(80);

// Whether the task's values may be factored (false on NaN too: the comparison fails).
template <typename acc_t>
bool within_factor_bound(const acc_t* v, int64_t count) {
  for (int64_t i = 0; i < count; ++i) {
    if (!(std::abs(v[i]) <= kFactorBound<acc_t>)) return false;
  }
  return true;
}

// v[i] = exp(-v[i]), every value by the vector exp (tails too: one formula per position).
template <typename acc_t>
void exp_neg_in_place(acc_t* v, int64_t count) {
  using V = at::vec::Vectorized<acc_t>;
  for (int64_t i = 0; i < count; i += V::size()) {
    const int64_t k = std::min<int64_t>(V::size(), count - i);
    V::loadu(v + i, k).neg().exp().store(v + i, k);
  }
}

// exp(-z) from a channel's a and a pixel's b: mc and ms themselves, or (kFactored) exp(-mc)
// and exp(-ms). For one value or an at::vec vector of them.
template <bool kFactored, typename V>
inline V exp_neg_z(const V& a, const V& b) {
  if constexpr (kFactored) {
    return a * b;
  } else if constexpr (std::is_floating_point_v<V>) {
    return std::exp(-(a + b));
  } else {
    return (a + b).neg().exp();
  }
}

// y = x * (1 + sig).
template <bool kFactored, typename V>
inline V bam_y(const V& x, const V& a, const V& b) {
  const V sig = V(1) / (V(1) + exp_neg_z<kFactored>(a, b));
  return x * (V(1) + sig);
}

// grad_x = grad_y * (1 + sig), returned; dz = (grad_y * x) * (sig * (1 - sig)).
template <bool kFactored, typename V>
inline V bam_grad(const V& gy, const V& x, const V& a, const V& b, V& dz) {
  const V sig = V(1) / (V(1) + exp_neg_z<kFactored>(a, b));
  dz = (gy * x) * (sig * (V(1) - sig));
  return gy * (V(1) + sig);
}

// y for the pixels [p0, p1) of sample n into out; with grad_y set (the backward), grad_x into
// out, the block's grad_mc partial row into grad_mc and grad_ms[p0:p1] into gms (the sample's
// row of hw) instead. a: the C channel values, b: the block's pixel values (see exp_neg_z).
// `stream`: out's vectors go out with streaming stores, fenced before the block returns.
template <bool kFactored, typename scalar_t>
void bam_block(const Views<scalar_t>& v, int64_t n, int64_t p0, int64_t p1, const at::opmath_type<scalar_t>* a,
               const at::opmath_type<scalar_t>* b, const scalar_t* grad_y, scalar_t* out,
               at::opmath_type<scalar_t>* grad_mc, at::opmath_type<scalar_t>* gms, bool stream) {
  using S = Step<scalar_t>;
  using acc_t = typename S::acc_t;
  using AccVec = typename S::AccVec;
  const bool backward = grad_y != nullptr;
  const int64_t len = p1 - p0, C = v.C;
  if (!v.channels_last) {
    if (backward) std::fill(gms + p0, gms + p1, acc_t(0));
    for (int64_t c = 0; c < C; ++c) {
      const int64_t off = v.at(n, c, p0);
      const scalar_t* xc = v.x + off;
      const AccVec va(a[c]);
      AccVec xv[S::kVecs], gy[S::kVecs], vb[S::kVecs], o[S::kVecs], u[S::kVecs], vsum[S::kVecs];
      for (int k = 0; k < S::kVecs; ++k) vsum[k] = AccVec(0);
      int64_t i = 0;
      for (; i + S::kWidth <= len; i += S::kWidth) {
        S::load(xc + i, xv);
        S::load_acc(b + i, vb);
        if (!backward) {
          for (int k = 0; k < S::kVecs; ++k) o[k] = bam_y<kFactored>(xv[k], va, vb[k]);
          S::store(out + off + i, o, stream);
          continue;
        }
        S::load(grad_y + off + i, gy);
        S::load_acc(gms + p0 + i, u);
        for (int k = 0; k < S::kVecs; ++k) {
          AccVec dz;
          o[k] = bam_grad<kFactored>(gy[k], xv[k], va, vb[k], dz);
          vsum[k] += dz;
          u[k] += dz;
        }
        S::store_acc(gms + p0 + i, u);
        S::store(out + off + i, o, stream);
      }
      acc_t sum = 0;
      for (int k = 0; k < S::kVecs; ++k) sum += reduce_sum(vsum[k]);
      for (; i < len; ++i) {
        const acc_t xi = static_cast<acc_t>(xc[i]);
        if (!backward) {
          out[off + i] = static_cast<scalar_t>(bam_y<kFactored>(xi, a[c], b[i]));
          continue;
        }
        acc_t dz;
        const acc_t gyi = static_cast<acc_t>(grad_y[off + i]);
        out[off + i] = static_cast<scalar_t>(bam_grad<kFactored>(gyi, xi, a[c], b[i], dz));
        sum += dz;
        gms[p0 + i] += dz;
      }
      if (backward) grad_mc[c] = sum;
    }
    if (stream) stream_fence();
    return;
  }
  if (backward) std::fill(grad_mc, grad_mc + C, acc_t(0));
  for (int64_t p = p0; p < p1; ++p) {
    const int64_t off = v.at(n, 0, p);
    const scalar_t* row = v.x + off;
    const acc_t bp = b[p - p0];
    const AccVec vb(bp);
    AccVec xv[S::kVecs], gy[S::kVecs], va[S::kVecs], o[S::kVecs], gg[S::kVecs], u[S::kVecs];
    for (int k = 0; k < S::kVecs; ++k) u[k] = AccVec(0);
    int64_t c = 0;
    for (; c + S::kWidth <= C; c += S::kWidth) {
      S::load(row + c, xv);
      S::load_acc(a + c, va);
      if (!backward) {
        for (int k = 0; k < S::kVecs; ++k) o[k] = bam_y<kFactored>(xv[k], va[k], vb);
        S::store(out + off + c, o, stream);
        continue;
      }
      S::load(grad_y + off + c, gy);
      S::load_acc(grad_mc + c, gg);
      for (int k = 0; k < S::kVecs; ++k) {
        AccVec dz;
        o[k] = bam_grad<kFactored>(gy[k], xv[k], va[k], vb, dz);
        gg[k] += dz;
        u[k] += dz;
      }
      S::store_acc(grad_mc + c, gg);
      S::store(out + off + c, o, stream);
    }
    acc_t sum = 0;
    for (int k = 0; k < S::kVecs; ++k) sum += reduce_sum(u[k]);
    for (; c < C; ++c) {
      const acc_t xi = static_cast<acc_t>(row[c]);
      if (!backward) {
        out[off + c] = static_cast<scalar_t>(bam_y<kFactored>(xi, a[c], bp));
        continue;
      }
      acc_t dz;
      const acc_t gyi = static_cast<acc_t>(grad_y[off + c]);
      out[off + c] = static_cast<scalar_t>(bam_grad<kFactored>(gyi, xi, a[c], bp, dz));
      grad_mc[c] += dz;
      sum += dz;
    }
    if (backward) gms[p] = sum;
  }
  if (stream) stream_fence();
}

// One task: its channel values a = mc[n, :] and pixel values b = ms[n, 0, p0:p1], factored
// into exps where within_factor_bound allows, then bam_block (arguments as there; ms_n and gms
// are the sample's rows of hw).
template <typename scalar_t>
void bam_task(const Views<scalar_t>& v, int64_t n, int64_t p0, int64_t p1, const at::opmath_type<scalar_t>* ms_n,
              const scalar_t* grad_y, scalar_t* out, at::opmath_type<scalar_t>* grad_mc,
              at::opmath_type<scalar_t>* gms, bool stream) {
  using acc_t = at::opmath_type<scalar_t>;
  std::vector<acc_t> buf(v.C + (p1 - p0));
  acc_t *a = buf.data(), *b = a + v.C;
  std::copy(v.gate + n * v.C, v.gate + (n + 1) * v.C, a);
  std::copy(ms_n + p0, ms_n + p1, b);
  const int64_t count = static_cast<int64_t>(buf.size());
  const bool factored = within_factor_bound(a, count);
  if (factored) exp_neg_in_place(a, count);
  with_flag(factored, [&](auto flag) {
    bam_block<decltype(flag)::value>(v, n, p0, p1, a, b, grad_y, out, grad_mc, gms, stream);
  });
}

// ---------------------------------------------------------------- bam_apply

// y = x * (1 + sigmoid(mc + ms)), in x's dtype and layout; y streamed past the caches when x
// and y exceed them.
at::Tensor bam_apply_cpu(const at::Tensor& x_in, const at::Tensor& mc_in, const at::Tensor& ms_in) {
  const char* op = "bam_apply";
  const at::Tensor x = checked_x(x_in, op);
  check_bam_apply_args(x, mc_in, ms_in, op);
  at::Tensor y = empty_like_layout(x);
  if (x.numel() == 0) return y;
  const at::Tensor mc = mc_in.contiguous(), ms = ms_in.contiguous();
  const bool stream = should_stream(2 * x.nbytes());  // reads x, writes y
  AK_DISPATCH_FEATURE(x, "bam_apply_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const Views<scalar_t> v = views<scalar_t>(x, mc);
    scalar_t* yp = y.data_ptr<scalar_t>();
    const acc_t* msp = ms.const_data_ptr<acc_t>();
    for_pixel_blocks(v.N, v.hw, [&](int64_t n, int64_t, int64_t p0, int64_t p1) {
      bam_task<scalar_t>(v, n, p0, p1, msp + n * v.hw, nullptr, yp, nullptr, nullptr, stream);
    });
  });
  return y;
}

// ---------------------------------------------------------------- bam_apply_backward

// grad_x = grad_y * (1 + sig); dz = (grad_y * x) * (sig * (1 - sig)); grad_mc = sum_p dz
// (per-block partials summed in order), grad_ms = sum_c dz.
std::tuple<at::Tensor, at::Tensor, at::Tensor> bam_apply_backward_cpu(const at::Tensor& grad_y_in,
                                                                      const at::Tensor& x_in, const at::Tensor& mc_in,
                                                                      const at::Tensor& ms_in) {
  const char* op = "bam_apply_backward";
  const at::Tensor x = checked_x(x_in, op);
  check_bam_apply_args(x, mc_in, ms_in, op);
  const at::Tensor gy = walked_like_x(grad_y_in, x, op, "grad_y");
  at::Tensor gx = empty_like_layout(x);
  at::Tensor gms = at::zeros_like(ms_in, at::MemoryFormat::Contiguous);
  at::Tensor partial = gate_partials(x, mc_in);
  if (x.numel() == 0) return {gx, at::zeros_like(mc_in, at::MemoryFormat::Contiguous), gms};
  const at::Tensor mc = mc_in.contiguous(), ms = ms_in.contiguous();
  const bool stream = should_stream(3 * x.nbytes());  // reads x and grad_y, writes grad_x
  AK_DISPATCH_FEATURE(x, "bam_apply_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const Views<scalar_t> v = views<scalar_t>(x, mc);
    const scalar_t* gyp = gy.const_data_ptr<scalar_t>();
    scalar_t* gxp = gx.data_ptr<scalar_t>();
    const acc_t* msp = ms.const_data_ptr<acc_t>();
    acc_t *part = partial.data_ptr<acc_t>(), *gmsp = gms.data_ptr<acc_t>();
    const int64_t blocks = pixel_blocks(v.hw);
    for_pixel_blocks(v.N, v.hw, [&](int64_t n, int64_t blk, int64_t p0, int64_t p1) {
      acc_t* grad_mc = part + (n * blocks + blk) * v.C;
      bam_task<scalar_t>(v, n, p0, p1, msp + n * v.hw, gyp, gxp, grad_mc, gmsp + n * v.hw, stream);
    });
  });
  return {gx, sum_block_partials(partial), gms};
}

#undef AK_DISPATCH_FEATURE

}  // namespace

TORCH_LIBRARY_IMPL(attnkernels, CPU, m) {
  m.impl("bam_apply", &bam_apply_cpu);
  m.impl("bam_apply_backward", &bam_apply_backward_cpu);
}

}  // namespace attnkernels
