// CPU kernels of the ham_spatial hot path; the math is in csrc/ham_spatial_ops.cpp.
//
// Every op runs one task per (sample n, block of kPixelBlock pixels), which owns all C
// channels of its pixels: the per-pixel reductions over C (d1, d2, grad_s1, grad_s2, the tie
// counts) finish inside the task, and the per-channel reductions over pixels (grad_gate)
// leave one partial row per task, summed over the blocks in order afterwards. The block size
// is fixed, so results are bitwise identical run to run, whatever the thread count.
// NCHW walks each channel's contiguous run of the block's pixels against per-pixel
// accumulators; channels_last walks each pixel's contiguous row of C channels.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <utility>
#include <vector>

#include "attnkernels/ham_spatial.h"
#include "attnkernels/cpu_sample.h"
#include "attnkernels/cpu_vec.h"

namespace attnkernels {
namespace {

constexpr int64_t kPixelBlock = 1024;

int64_t pixel_blocks(int64_t hw) { return (hw + kPixelBlock - 1) / kPixelBlock; }

// Calls f(n, block, p0, p1) for every (sample, pixel block), in parallel.
template <typename F>
void for_pixel_blocks(int64_t N, int64_t hw, const F& f) {
  const int64_t blocks = pixel_blocks(hw);
  at::parallel_for(0, N * blocks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t n = t / blocks, b = t % blocks, p0 = b * kPixelBlock;
      f(n, b, p0, std::min(hw, p0 + kPixelBlock));
    }
  });
}

// The tensors of one op call, as raw pointers, plus the shape. x-shaped tensors share x's
// layout; gate and mask rows are (N, C); pixel maps are (N, k, H, W) with hw pixels per map.
template <typename scalar_t>
struct Views {
  using acc_t = at::opmath_type<scalar_t>;
  int64_t N, C, hw;
  bool channels_last;
  const scalar_t* x;
  const acc_t* gate;
  const acc_t* mask;
  // x[n, c, p] in either layout.
  int64_t at(int64_t n, int64_t c, int64_t p) const {
    return channels_last ? (n * hw + p) * C + c : (n * C + c) * hw + p;
  }
};

template <typename scalar_t>
Views<scalar_t> views(const at::Tensor& x, const at::Tensor& gate, const at::Tensor& mask) {
  using acc_t = at::opmath_type<scalar_t>;
  return {x.size(0), x.size(1), x.size(2) * x.size(3), layout_of(x) == Layout::ChannelsLast,
          x.const_data_ptr<scalar_t>(), gate.const_data_ptr<acc_t>(), mask.const_data_ptr<acc_t>()};
}

// ---------------------------------------------------------------- checks

at::Tensor checked_x(const at::Tensor& x, const char* op) {
  check_feature_map(x, op, "x");
  return dense(x);
}

// ---------------------------------------------------------------- the important-channel mask

// mask[c] = 1 iff fewer than c_im channels j rank before c (gate[j] > gate[c], or equal and
// j < c). Sorting (value descending, index ascending) gives every non-NaN channel its rank;
// a NaN never ranks before anything and nothing ranks before a NaN (every comparison with it
// is false), so a NaN channel has rank 0 and does not shift the others.
template <typename acc_t>
void important_channels(const acc_t* gate, int64_t C, int64_t c_im, acc_t* mask, std::vector<int64_t>& order) {
  order.clear();
  for (int64_t c = 0; c < C; ++c) {
    if (std::isnan(gate[c])) {
      mask[c] = acc_t(1);
    } else {
      order.push_back(c);
    }
  }
  std::sort(order.begin(), order.end(),
            [&](int64_t i, int64_t j) { return gate[i] > gate[j] || (gate[i] == gate[j] && i < j); });
  for (int64_t r = 0; r < static_cast<int64_t>(order.size()); ++r) mask[order[r]] = r < c_im ? acc_t(1) : acc_t(0);
}

// ---------------------------------------------------------------- ham_spatial_pool

// Per pixel: sum and max of G1 = F1*mask and G2 = F1*(1-mask) over all C channels.
// NCHW walks the channel rows in order against per-pixel accumulators in L1: sequential reads
// the prefetcher follows. (Walking one vector of pixels down all C rows, accumulators in
// registers, measured 1.8x slower from memory and no faster with x[n] in cache.)
template <typename scalar_t>
void pool_block(const Views<scalar_t>& v, int64_t n, int64_t p0, int64_t p1, at::opmath_type<scalar_t>* sum1,
                at::opmath_type<scalar_t>* max1, at::opmath_type<scalar_t>* sum2,
                at::opmath_type<scalar_t>* max2) {
  using S = Step<scalar_t>;
  using acc_t = typename S::acc_t;
  using AccVec = typename S::AccVec;
  const int64_t len = p1 - p0;
  const acc_t lowest = -std::numeric_limits<acc_t>::infinity();
  const acc_t* g = v.gate + n * v.C;
  const acc_t* m = v.mask + n * v.C;
  if (!v.channels_last) {
    std::fill(sum1, sum1 + len, acc_t(0));
    std::fill(sum2, sum2 + len, acc_t(0));
    std::fill(max1, max1 + len, lowest);
    std::fill(max2, max2 + len, lowest);
    for (int64_t c = 0; c < v.C; ++c) {
      const scalar_t* xc = v.x + v.at(n, c, p0);
      const AccVec vg(g[c]), vm(m[c]), vm2(acc_t(1) - m[c]);
      AccVec xv[S::kVecs], a[S::kVecs], b[S::kVecs], d[S::kVecs], e[S::kVecs];
      int64_t i = 0;
      for (; i + S::kWidth <= len; i += S::kWidth) {
        S::load(xc + i, xv);
        S::load_acc(sum1 + i, a);
        S::load_acc(max1 + i, b);
        S::load_acc(sum2 + i, d);
        S::load_acc(max2 + i, e);
        for (int k = 0; k < S::kVecs; ++k) {
          const AccVec f1 = xv[k] * vg, g1 = f1 * vm, g2 = f1 * vm2;
          a[k] += g1;
          b[k] = at::vec::maximum(b[k], g1);
          d[k] += g2;
          e[k] = at::vec::maximum(e[k], g2);
        }
        S::store_acc(sum1 + i, a);
        S::store_acc(max1 + i, b);
        S::store_acc(sum2 + i, d);
        S::store_acc(max2 + i, e);
      }
      for (; i < len; ++i) {
        const acc_t f1 = static_cast<acc_t>(xc[i]) * g[c], g1 = f1 * m[c], g2 = f1 * (acc_t(1) - m[c]);
        sum1[i] += g1;
        max1[i] = nan_max(max1[i], g1);
        sum2[i] += g2;
        max2[i] = nan_max(max2[i], g2);
      }
    }
    return;
  }
  for (int64_t p = p0; p < p1; ++p) {
    const scalar_t* row = v.x + v.at(n, 0, p);
    AccVec a[S::kVecs], b[S::kVecs], d[S::kVecs], e[S::kVecs], xv[S::kVecs], vg[S::kVecs], vm[S::kVecs];
    for (int k = 0; k < S::kVecs; ++k) {
      a[k] = d[k] = AccVec(0);
      b[k] = e[k] = AccVec(lowest);
    }
    int64_t c = 0;
    for (; c + S::kWidth <= v.C; c += S::kWidth) {
      S::load(row + c, xv);
      S::load_acc(g + c, vg);
      S::load_acc(m + c, vm);
      for (int k = 0; k < S::kVecs; ++k) {
        const AccVec f1 = xv[k] * vg[k], g1 = f1 * vm[k], g2 = f1 * (AccVec(1) - vm[k]);
        a[k] += g1;
        b[k] = at::vec::maximum(b[k], g1);
        d[k] += g2;
        e[k] = at::vec::maximum(e[k], g2);
      }
    }
    acc_t s1 = 0, s2 = 0, mx1 = lowest, mx2 = lowest;
    for (int k = 0; k < S::kVecs; ++k) {
      s1 += reduce_sum(a[k]);
      s2 += reduce_sum(d[k]);
      mx1 = nan_max(mx1, reduce_max(b[k]));
      mx2 = nan_max(mx2, reduce_max(e[k]));
    }
    for (; c < v.C; ++c) {
      const acc_t f1 = static_cast<acc_t>(row[c]) * g[c], g1 = f1 * m[c], g2 = f1 * (acc_t(1) - m[c]);
      s1 += g1;
      s2 += g2;
      mx1 = nan_max(mx1, g1);
      mx2 = nan_max(mx2, g2);
    }
    sum1[p - p0] = s1;
    max1[p - p0] = mx1;
    sum2[p - p0] = s2;
    max2[p - p0] = mx2;
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> ham_spatial_pool_cpu(const at::Tensor& x_in, const at::Tensor& gate_in,
                                                                    int64_t c_im) {
  const char* op = "ham_spatial_pool";
  const at::Tensor x = checked_x(x_in, op);
  check_per_channel(gate_in, x, op, "gate");
  const int64_t N = x.size(0), C = x.size(1), hw = x.size(2) * x.size(3);
  check_c_im(c_im, C, op);
  const at::Tensor gate = gate_in.contiguous();
  auto opts = x.options().dtype(acc_type(x.scalar_type()));
  at::Tensor d1 = at::empty({N, 2, x.size(2), x.size(3)}, opts), d2 = at::empty_like(d1);
  at::Tensor mask = at::empty({N, C}, opts);
  if (N * C == 0) return {d1, d2, mask};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "ham_spatial_pool_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const acc_t* g = gate.const_data_ptr<acc_t>();
    acc_t* mk = mask.data_ptr<acc_t>();
    at::parallel_for(0, N, 1, [&](int64_t begin, int64_t end) {
      std::vector<int64_t> order;
      for (int64_t n = begin; n < end; ++n) important_channels(g + n * C, C, c_im, mk + n * C, order);
    });
    if (hw == 0) return;
    const Views<scalar_t> v = views<scalar_t>(x, gate, mask);
    const acc_t div1 = static_cast<acc_t>(c_im), div2 = static_cast<acc_t>(std::max<int64_t>(C - c_im, 1));
    acc_t *o1 = d1.data_ptr<acc_t>(), *o2 = d2.data_ptr<acc_t>();
    for_pixel_blocks(N, hw, [&](int64_t n, int64_t, int64_t p0, int64_t p1) {
      // d[n, 0, p] and d[n, 1, p] are the rows the sums and maxima land in.
      acc_t *sum1 = o1 + n * 2 * hw + p0, *max1 = sum1 + hw, *sum2 = o2 + n * 2 * hw + p0, *max2 = sum2 + hw;
      pool_block(v, n, p0, p1, sum1, max1, sum2, max2);
      for (int64_t i = 0; i < p1 - p0; ++i) {
        sum1[i] = sum1[i] / div1;
        sum2[i] = sum2[i] / div2;
      }
    });
  });
  return {d1, d2, mask};
}

// ---------------------------------------------------------------- ham_spatial_pool_backward

// Per pixel, what every channel's gradient needs: r = grad_mean / divisor and
// t = grad_max / (number of channels tied at the max), for each group.
template <typename acc_t>
struct PixelGrad {
  acc_t r1, t1, r2, t2, max1, max2;
};

// dF1 of one element from its G1, G2 and mask value (docs/contract.md: no gradient through the mask).
template <typename V>
inline V pool_dF1(const V& g1, const V& g2, const V& m, const V& max1, const V& max2, const V& r1, const V& t1,
                  const V& r2, const V& t2) {
  const V one(1);
  return (r1 + g1.eq(max1) * t1) * m + (r2 + g2.eq(max2) * t2) * (one - m);
}
template <typename acc_t>
inline acc_t pool_dF1(acc_t g1, acc_t g2, acc_t m, const PixelGrad<acc_t>& q) {
  return (q.r1 + acc_t(g1 == q.max1) * q.t1) * m + (q.r2 + acc_t(g2 == q.max2) * q.t2) * (acc_t(1) - m);
}

template <typename scalar_t>
void pool_backward_block(const Views<scalar_t>& v, int64_t n, int64_t p0, int64_t p1, int64_t c_im,
                         const at::opmath_type<scalar_t>* gd1, const at::opmath_type<scalar_t>* gd2,
                         const at::opmath_type<scalar_t>* d1, const at::opmath_type<scalar_t>* d2, scalar_t* gx,
                         at::opmath_type<scalar_t>* grad_gate) {
  using S = Step<scalar_t>;
  using acc_t = typename S::acc_t;
  using AccVec = typename S::AccVec;
  const int64_t len = p1 - p0, hw = v.hw, C = v.C;
  const acc_t div1 = static_cast<acc_t>(c_im), div2 = static_cast<acc_t>(std::max<int64_t>(C - c_im, 1));
  const acc_t* g = v.gate + n * C;
  const acc_t* m = v.mask + n * C;
  // (N, 2, H, W): row 0 holds the means, row 1 the maxima.
  const acc_t *gmean1 = gd1 + n * 2 * hw, *gmax1 = gmean1 + hw, *max1 = d1 + n * 2 * hw + hw;
  const acc_t *gmean2 = gd2 + n * 2 * hw, *gmax2 = gmean2 + hw, *max2 = d2 + n * 2 * hw + hw;
  std::fill(grad_gate, grad_gate + C, acc_t(0));
  if (!v.channels_last) {
    // Pass 1: tie counts per pixel; then the per-pixel coefficients; pass 2: the gradients.
    std::vector<acc_t> buf(6 * len, acc_t(0));
    acc_t *cnt1 = buf.data(), *cnt2 = cnt1 + len, *t1 = cnt2 + len, *t2 = t1 + len, *r1 = t2 + len, *r2 = r1 + len;
    // Channel rows in order, streaming x (the forward's products, recomputed bit for bit).
    for (int64_t c = 0; c < C; ++c) {
      const scalar_t* xc = v.x + v.at(n, c, p0);
      const AccVec vg(g[c]), vm(m[c]), vm2(acc_t(1) - m[c]);
      AccVec xv[S::kVecs], a[S::kVecs], b[S::kVecs], n1[S::kVecs], n2[S::kVecs];
      int64_t i = 0;
      for (; i + S::kWidth <= len; i += S::kWidth) {
        S::load(xc + i, xv);
        S::load_acc(max1 + p0 + i, a);
        S::load_acc(max2 + p0 + i, b);
        S::load_acc(cnt1 + i, n1);
        S::load_acc(cnt2 + i, n2);
        for (int k = 0; k < S::kVecs; ++k) {
          const AccVec f1 = xv[k] * vg;
          n1[k] += (f1 * vm).eq(a[k]);
          n2[k] += (f1 * vm2).eq(b[k]);
        }
        S::store_acc(cnt1 + i, n1);
        S::store_acc(cnt2 + i, n2);
      }
      for (; i < len; ++i) {
        const acc_t f1 = static_cast<acc_t>(xc[i]) * g[c];
        cnt1[i] += acc_t(f1 * m[c] == max1[p0 + i]);
        cnt2[i] += acc_t(f1 * (acc_t(1) - m[c]) == max2[p0 + i]);
      }
    }
    for (int64_t i = 0; i < len; ++i) {
      t1[i] = gmax1[p0 + i] / cnt1[i];  // a NaN max ties nothing: count 0 gives NaN, as torch.amax
      t2[i] = gmax2[p0 + i] / cnt2[i];
      r1[i] = gmean1[p0 + i] / div1;
      r2[i] = gmean2[p0 + i] / div2;
    }
    for (int64_t c = 0; c < C; ++c) {
      const int64_t off = v.at(n, c, p0);
      const scalar_t* xc = v.x + off;
      scalar_t* gxc = gx + off;
      const AccVec vg(g[c]), vm(m[c]), vm2(acc_t(1) - m[c]);
      AccVec xv[S::kVecs], vsum[S::kVecs], a[S::kVecs], b[S::kVecs], q1[S::kVecs], q2[S::kVecs], w1[S::kVecs],
          w2[S::kVecs], out[S::kVecs];
      for (int k = 0; k < S::kVecs; ++k) vsum[k] = AccVec(0);
      int64_t i = 0;
      for (; i + S::kWidth <= len; i += S::kWidth) {
        S::load(xc + i, xv);
        S::load_acc(max1 + p0 + i, a);
        S::load_acc(max2 + p0 + i, b);
        S::load_acc(r1 + i, q1);
        S::load_acc(t1 + i, w1);
        S::load_acc(r2 + i, q2);
        S::load_acc(t2 + i, w2);
        for (int k = 0; k < S::kVecs; ++k) {
          const AccVec f1 = xv[k] * vg;
          const AccVec df1 = pool_dF1(f1 * vm, f1 * vm2, vm, a[k], b[k], q1[k], w1[k], q2[k], w2[k]);
          vsum[k] += df1 * xv[k];
          out[k] = df1 * vg;
        }
        S::store(gxc + i, out);
      }
      acc_t sum = 0;
      for (int k = 0; k < S::kVecs; ++k) sum += reduce_sum(vsum[k]);
      for (; i < len; ++i) {
        const acc_t xi = static_cast<acc_t>(xc[i]), f1 = xi * g[c];
        const PixelGrad<acc_t> q{r1[i], t1[i], r2[i], t2[i], max1[p0 + i], max2[p0 + i]};
        const acc_t df1 = pool_dF1(f1 * m[c], f1 * (acc_t(1) - m[c]), m[c], q);
        sum += df1 * xi;
        gxc[i] = static_cast<scalar_t>(df1 * g[c]);
      }
      grad_gate[c] = sum;
    }
    return;
  }
  for (int64_t p = p0; p < p1; ++p) {
    const int64_t off = v.at(n, 0, p);
    const scalar_t* row = v.x + off;
    scalar_t* grow = gx + off;
    // Pass 1 over the row: tie counts (the row stays in L1 for pass 2).
    acc_t cnt1 = 0, cnt2 = 0;
    for (int64_t c = 0; c < C; ++c) {
      const acc_t f1 = static_cast<acc_t>(row[c]) * g[c];
      cnt1 += acc_t(f1 * m[c] == max1[p]);
      cnt2 += acc_t(f1 * (acc_t(1) - m[c]) == max2[p]);
    }
    const PixelGrad<acc_t> q{gmean1[p] / div1, gmax1[p] / cnt1, gmean2[p] / div2, gmax2[p] / cnt2, max1[p], max2[p]};
    const AccVec a(q.max1), b(q.max2), q1(q.r1), w1(q.t1), q2(q.r2), w2(q.t2);
    AccVec xv[S::kVecs], vg[S::kVecs], vm[S::kVecs], gg[S::kVecs], out[S::kVecs];
    int64_t c = 0;
    for (; c + S::kWidth <= C; c += S::kWidth) {
      S::load(row + c, xv);
      S::load_acc(g + c, vg);
      S::load_acc(m + c, vm);
      S::load_acc(grad_gate + c, gg);
      for (int k = 0; k < S::kVecs; ++k) {
        const AccVec f1 = xv[k] * vg[k];
        const AccVec df1 = pool_dF1(f1 * vm[k], f1 * (AccVec(1) - vm[k]), vm[k], a, b, q1, w1, q2, w2);
        gg[k] += df1 * xv[k];
        out[k] = df1 * vg[k];
      }
      S::store_acc(grad_gate + c, gg);
      S::store(grow + c, out);
    }
    for (; c < C; ++c) {
      const acc_t xi = static_cast<acc_t>(row[c]), f1 = xi * g[c];
      const acc_t df1 = pool_dF1(f1 * m[c], f1 * (acc_t(1) - m[c]), m[c], q);
      grad_gate[c] += df1 * xi;
      grow[c] = static_cast<scalar_t>(df1 * g[c]);
    }
  }
}

// The (N, blocks, C) per-block partials of grad_gate, summed over the blocks in order.
at::Tensor sum_block_partials(const at::Tensor& partial) { return partial.sum(1); }

std::tuple<at::Tensor, at::Tensor> ham_spatial_pool_backward_cpu(const at::Tensor& grad_d1, const at::Tensor& grad_d2,
                                                                 const at::Tensor& x_in, const at::Tensor& gate_in,
                                                                 const at::Tensor& mask_in, const at::Tensor& d1_in,
                                                                 const at::Tensor& d2_in, int64_t c_im) {
  const char* op = "ham_spatial_pool_backward";
  const at::Tensor x = checked_x(x_in, op);
  check_per_channel(gate_in, x, op, "gate");
  check_per_channel(mask_in, x, op, "mask");
  check_pixel_map(grad_d1, x, 2, op, "grad_d1");
  check_pixel_map(grad_d2, x, 2, op, "grad_d2");
  check_pixel_map(d1_in, x, 2, op, "d1");
  check_pixel_map(d2_in, x, 2, op, "d2");
  const int64_t N = x.size(0), C = x.size(1), hw = x.size(2) * x.size(3);
  check_c_im(c_im, C, op);
  at::Tensor gx = empty_like_layout(x);
  at::Tensor partial = at::zeros({N, pixel_blocks(hw), C}, gate_in.options());
  if (x.numel() == 0) return {gx, at::zeros_like(gate_in, at::MemoryFormat::Contiguous)};
  const at::Tensor gate = gate_in.contiguous(), mask = mask_in.contiguous();
  const at::Tensor gd1 = grad_d1.contiguous(), gd2 = grad_d2.contiguous(), d1 = d1_in.contiguous(), d2 = d2_in.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "ham_spatial_pool_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const Views<scalar_t> v = views<scalar_t>(x, gate, mask);
    scalar_t* gxp = gx.data_ptr<scalar_t>();
    acc_t* part = partial.data_ptr<acc_t>();
    const int64_t blocks = pixel_blocks(hw);
    for_pixel_blocks(N, hw, [&](int64_t n, int64_t b, int64_t p0, int64_t p1) {
      pool_backward_block(v, n, p0, p1, c_im, gd1.const_data_ptr<acc_t>(), gd2.const_data_ptr<acc_t>(),
                          d1.const_data_ptr<acc_t>(), d2.const_data_ptr<acc_t>(), gxp, part + (n * blocks + b) * C);
    });
  });
  return {gx, sum_block_partials(partial)};
}

// ---------------------------------------------------------------- ham_spatial_apply (+ backward)

// y = G1*s1 + G2*s2 for the pixels [p0, p1) of sample n; s1, s2 (and gs1, gs2) are the
// sample's rows of hw values. With grad_y set (the backward), writes grad_x = dF1*gate into
// out and accumulates grad_gate, grad_s1 and grad_s2 instead.
template <typename scalar_t>
void apply_block(const Views<scalar_t>& v, int64_t n, int64_t p0, int64_t p1, const scalar_t* grad_y,
                 const at::opmath_type<scalar_t>* s1, const at::opmath_type<scalar_t>* s2, scalar_t* out,
                 at::opmath_type<scalar_t>* grad_gate, at::opmath_type<scalar_t>* gs1,
                 at::opmath_type<scalar_t>* gs2) {
  using S = Step<scalar_t>;
  using acc_t = typename S::acc_t;
  using AccVec = typename S::AccVec;
  const bool backward = grad_y != nullptr;
  const int64_t len = p1 - p0, C = v.C;
  const acc_t* g = v.gate + n * C;
  const acc_t* m = v.mask + n * C;
  const acc_t *s1n = s1, *s2n = s2;
  if (backward) std::fill(grad_gate, grad_gate + C, acc_t(0));
  if (!v.channels_last) {
    if (backward) {
      std::fill(gs1 + p0, gs1 + p1, acc_t(0));
      std::fill(gs2 + p0, gs2 + p1, acc_t(0));
    }
    for (int64_t c = 0; c < C; ++c) {
      const int64_t off = v.at(n, c, p0);
      const scalar_t* xc = v.x + off;
      const AccVec vg(g[c]), vm(m[c]), vm2(acc_t(1) - m[c]);
      AccVec xv[S::kVecs], gy[S::kVecs], a[S::kVecs], b[S::kVecs], o[S::kVecs], u[S::kVecs], w[S::kVecs],
          vsum[S::kVecs];
      for (int k = 0; k < S::kVecs; ++k) vsum[k] = AccVec(0);
      int64_t i = 0;
      for (; i + S::kWidth <= len; i += S::kWidth) {
        S::load(xc + i, xv);
        S::load_acc(s1n + p0 + i, a);
        S::load_acc(s2n + p0 + i, b);
        if (!backward) {
          for (int k = 0; k < S::kVecs; ++k) {
            const AccVec f1 = xv[k] * vg;
            o[k] = f1 * vm * a[k] + f1 * vm2 * b[k];
          }
          S::store(out + off + i, o);
          continue;
        }
        S::load(grad_y + off + i, gy);
        S::load_acc(gs1 + p0 + i, u);
        S::load_acc(gs2 + p0 + i, w);
        for (int k = 0; k < S::kVecs; ++k) {
          const AccVec f1 = xv[k] * vg;
          u[k] += gy[k] * (f1 * vm);
          w[k] += gy[k] * (f1 * vm2);
          const AccVec df1 = gy[k] * a[k] * vm + gy[k] * b[k] * vm2;
          vsum[k] += df1 * xv[k];
          o[k] = df1 * vg;
        }
        S::store_acc(gs1 + p0 + i, u);
        S::store_acc(gs2 + p0 + i, w);
        S::store(out + off + i, o);
      }
      acc_t sum = 0;
      for (int k = 0; k < S::kVecs; ++k) sum += reduce_sum(vsum[k]);
      for (; i < len; ++i) {
        const int64_t p = p0 + i;
        const acc_t xi = static_cast<acc_t>(xc[i]), f1 = xi * g[c];
        if (!backward) {
          out[off + i] = static_cast<scalar_t>(f1 * m[c] * s1n[p] + f1 * (acc_t(1) - m[c]) * s2n[p]);
          continue;
        }
        const acc_t gyi = static_cast<acc_t>(grad_y[off + i]);
        gs1[p] += gyi * (f1 * m[c]);
        gs2[p] += gyi * (f1 * (acc_t(1) - m[c]));
        const acc_t df1 = gyi * s1n[p] * m[c] + gyi * s2n[p] * (acc_t(1) - m[c]);
        sum += df1 * xi;
        out[off + i] = static_cast<scalar_t>(df1 * g[c]);
      }
      if (backward) grad_gate[c] = sum;
    }
    return;
  }
  for (int64_t p = p0; p < p1; ++p) {
    const int64_t off = v.at(n, 0, p);
    const scalar_t* row = v.x + off;
    const AccVec a(s1n[p]), b(s2n[p]);
    AccVec xv[S::kVecs], gy[S::kVecs], vg[S::kVecs], vm[S::kVecs], o[S::kVecs], gg[S::kVecs], u[S::kVecs],
        w[S::kVecs];
    for (int k = 0; k < S::kVecs; ++k) u[k] = w[k] = AccVec(0);
    int64_t c = 0;
    for (; c + S::kWidth <= C; c += S::kWidth) {
      S::load(row + c, xv);
      S::load_acc(g + c, vg);
      S::load_acc(m + c, vm);
      if (!backward) {
        for (int k = 0; k < S::kVecs; ++k) {
          const AccVec f1 = xv[k] * vg[k];
          o[k] = f1 * vm[k] * a + f1 * (AccVec(1) - vm[k]) * b;
        }
        S::store(out + off + c, o);
        continue;
      }
      S::load(grad_y + off + c, gy);
      S::load_acc(grad_gate + c, gg);
      for (int k = 0; k < S::kVecs; ++k) {
        const AccVec f1 = xv[k] * vg[k], vm2 = AccVec(1) - vm[k];
        u[k] += gy[k] * (f1 * vm[k]);
        w[k] += gy[k] * (f1 * vm2);
        const AccVec df1 = gy[k] * a * vm[k] + gy[k] * b * vm2;
        gg[k] += df1 * xv[k];
        o[k] = df1 * vg[k];
      }
      S::store_acc(grad_gate + c, gg);
      S::store(out + off + c, o);
    }
    acc_t sum1 = 0, sum2 = 0;
    if (backward) {
      for (int k = 0; k < S::kVecs; ++k) {
        sum1 += reduce_sum(u[k]);
        sum2 += reduce_sum(w[k]);
      }
    }
    for (; c < C; ++c) {
      const acc_t xi = static_cast<acc_t>(row[c]), f1 = xi * g[c], m2 = acc_t(1) - m[c];
      if (!backward) {
        out[off + c] = static_cast<scalar_t>(f1 * m[c] * s1n[p] + f1 * m2 * s2n[p]);
        continue;
      }
      const acc_t gyi = static_cast<acc_t>(grad_y[off + c]);
      sum1 += gyi * (f1 * m[c]);
      sum2 += gyi * (f1 * m2);
      const acc_t df1 = gyi * s1n[p] * m[c] + gyi * s2n[p] * m2;
      grad_gate[c] += df1 * xi;
      out[off + c] = static_cast<scalar_t>(df1 * g[c]);
    }
    if (backward) {
      gs1[p] = sum1;
      gs2[p] = sum2;
    }
  }
}

void check_apply_args(const at::Tensor& x, const at::Tensor& gate, const at::Tensor& mask, const at::Tensor& s1,
                      const at::Tensor& s2, const char* op) {
  check_per_channel(gate, x, op, "gate");
  check_per_channel(mask, x, op, "mask");
  check_pixel_map(s1, x, 1, op, "s1");
  check_pixel_map(s2, x, 1, op, "s2");
}

at::Tensor ham_spatial_apply_cpu(const at::Tensor& x_in, const at::Tensor& gate_in, const at::Tensor& mask_in,
                                 const at::Tensor& s1_in, const at::Tensor& s2_in) {
  const char* op = "ham_spatial_apply";
  const at::Tensor x = checked_x(x_in, op);
  check_apply_args(x, gate_in, mask_in, s1_in, s2_in, op);
  at::Tensor y = empty_like_layout(x);
  if (x.numel() == 0) return y;
  const at::Tensor gate = gate_in.contiguous(), mask = mask_in.contiguous(), s1 = s1_in.contiguous(),
                   s2 = s2_in.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "ham_spatial_apply_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const Views<scalar_t> v = views<scalar_t>(x, gate, mask);
    scalar_t* yp = y.data_ptr<scalar_t>();
    for_pixel_blocks(x.size(0), v.hw, [&](int64_t n, int64_t, int64_t p0, int64_t p1) {
      apply_block<scalar_t>(v, n, p0, p1, nullptr, s1.const_data_ptr<acc_t>() + n * v.hw,
                            s2.const_data_ptr<acc_t>() + n * v.hw, yp, nullptr, nullptr, nullptr);
    });
  });
  return y;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> ham_spatial_apply_backward_cpu(
    const at::Tensor& grad_y_in, const at::Tensor& x_in, const at::Tensor& gate_in, const at::Tensor& mask_in,
    const at::Tensor& s1_in, const at::Tensor& s2_in) {
  const char* op = "ham_spatial_apply_backward";
  const at::Tensor x = checked_x(x_in, op);
  check_apply_args(x, gate_in, mask_in, s1_in, s2_in, op);
  const at::Tensor gy = walked_like_x(grad_y_in, x, op, "grad_y");
  const int64_t N = x.size(0), C = x.size(1), hw = x.size(2) * x.size(3);
  at::Tensor gx = empty_like_layout(x);
  at::Tensor gs1 = at::zeros_like(s1_in, at::MemoryFormat::Contiguous), gs2 = at::zeros_like(gs1);
  at::Tensor partial = at::zeros({N, pixel_blocks(hw), C}, gate_in.options());
  if (x.numel() == 0) return {gx, at::zeros_like(gate_in, at::MemoryFormat::Contiguous), gs1, gs2};
  const at::Tensor gate = gate_in.contiguous(), mask = mask_in.contiguous(), s1 = s1_in.contiguous(),
                   s2 = s2_in.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "ham_spatial_apply_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const Views<scalar_t> v = views<scalar_t>(x, gate, mask);
    acc_t* part = partial.data_ptr<acc_t>();
    const int64_t blocks = pixel_blocks(hw);
    for_pixel_blocks(N, hw, [&](int64_t n, int64_t b, int64_t p0, int64_t p1) {
      apply_block<scalar_t>(v, n, p0, p1, gy.const_data_ptr<scalar_t>(), s1.const_data_ptr<acc_t>() + n * hw,
                            s2.const_data_ptr<acc_t>() + n * hw, gx.data_ptr<scalar_t>(), part + (n * blocks + b) * C,
                            gs1.data_ptr<acc_t>() + n * hw, gs2.data_ptr<acc_t>() + n * hw);
    });
  });
  return {gx, sum_block_partials(partial), gs1, gs2};
}

// ---------------------------------------------------------------- ham_attention (inference)

// The whole HAM forward for one sample while x[n] stays in cache: channel pooling, the mixed
// 1-D conv gate, the mask, the dual pooling, the two small-map convs with the folded BN,
// ReLU and sigmoid, and the apply. x crosses memory once instead of three times.
at::Tensor ham_attention_cpu(const at::Tensor& x_in, const at::Tensor& weight, const at::Tensor& alpha,
                             const at::Tensor& beta, int64_t c_im, const at::Tensor& spatial_weight,
                             const at::Tensor& bn_scale, const at::Tensor& bn_shift) {
  const char* op = "ham_attention";
  const at::Tensor x = checked_x(x_in, op);
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3), hw = H * W;
  check_c_im(c_im, C, op);
  AK_CHECK_VALUE(weight.numel() % 2 == 1, op, ": weight must hold an odd number of taps, got ", weight.numel());
  AK_CHECK_VALUE(alpha.numel() == 1 && beta.numel() == 1 && bn_scale.numel() == 1 && bn_shift.numel() == 1, op,
                    ": alpha, beta, bn_scale and bn_shift must hold one value each");
  AK_CHECK_VALUE(spatial_weight.dim() == 4 && spatial_weight.size(0) == 1 && spatial_weight.size(1) == 2 &&
                        spatial_weight.size(2) == spatial_weight.size(3) && spatial_weight.size(2) % 2 == 1,
                    op, ": spatial_weight must have shape (1, 2, k, k) with k odd, got ", spatial_weight.sizes());
  for (const auto& [name, t] : {std::pair<const char*, const at::Tensor*>{"weight", &weight}, {"alpha", &alpha},
                                {"beta", &beta}, {"spatial_weight", &spatial_weight}, {"bn_scale", &bn_scale},
                                {"bn_shift", &bn_shift}}) {
    check_floating(*t, op, name);
    check_device(*t, x.device(), op, name);
  }
  const at::ScalarType acc = acc_type(x.scalar_type());
  auto as_acc = [&](const at::Tensor& t) { return t.reshape(-1).to(acc).contiguous(); };
  const at::Tensor w = as_acc(weight), sw = as_acc(spatial_weight);
  at::Tensor gate = at::empty({N, C}, x.options().dtype(acc)), mask = at::empty_like(gate);
  at::Tensor y = empty_like_layout(x);
  if (x.numel() == 0) return y;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "ham_attention_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const acc_t a = alpha.item().to<acc_t>(), b = beta.item().to<acc_t>();
    const acc_t scale = bn_scale.item().to<acc_t>(), shift = bn_shift.item().to<acc_t>();
    const acc_t div1 = static_cast<acc_t>(c_im), div2 = static_cast<acc_t>(std::max<int64_t>(C - c_im, 1));
    const int64_t k = w.numel(), ks = spatial_weight.size(2);
    const Views<scalar_t> v = views<scalar_t>(x, gate, mask);
    acc_t *g = gate.data_ptr<acc_t>(), *mk = mask.data_ptr<acc_t>();
    scalar_t* yp = y.data_ptr<scalar_t>();
    at::parallel_for(0, N, 1, [&](int64_t begin, int64_t end) {
      std::vector<acc_t> avg(C), max(C), d(4 * hw), z(2 * hw);
      std::vector<int64_t> order;
      for (int64_t n = begin; n < end; ++n) {
        cpu_sample::channel_pool(v.x + n * C * hw, C, hw, v.channels_last, avg.data(), max.data());
        cpu_sample::mix_gate(avg.data(), max.data(), a, b, w.const_data_ptr<acc_t>(), k, C, g + n * C);
        important_channels(g + n * C, C, c_im, mk + n * C, order);
        // d holds [sum1, max1, sum2, max2]: d1 = (sum1 / c_im, max1), d2 = (sum2 / C_sub, max2).
        acc_t *sum1 = d.data(), *max1 = sum1 + hw, *sum2 = max1 + hw, *max2 = sum2 + hw;
        pool_block(v, n, 0, hw, sum1, max1, sum2, max2);
        for (int64_t p = 0; p < hw; ++p) {
          sum1[p] /= div1;
          sum2[p] /= div2;
        }
        cpu_sample::spatial_conv(sum1, 2, H, W, sw.const_data_ptr<acc_t>(), ks, z.data());
        cpu_sample::spatial_conv(sum2, 2, H, W, sw.const_data_ptr<acc_t>(), ks, z.data() + hw);
        for (int64_t p = 0; p < 2 * hw; ++p) {  // s = sigmoid(relu(bn(z))), BN folded to an affine
          z[p] = sigmoid(relu(z[p] * scale + shift));
        }
        apply_block<scalar_t>(v, n, 0, hw, nullptr, z.data(), z.data() + hw, yp, nullptr, nullptr, nullptr);
      }
    });
  });
  return y;
}

}  // namespace

TORCH_LIBRARY_IMPL(attnkernels, CPU, m) {
  m.impl("ham_spatial_pool", &ham_spatial_pool_cpu);
  m.impl("ham_spatial_pool_backward", &ham_spatial_pool_backward_cpu);
  m.impl("ham_spatial_apply", &ham_spatial_apply_cpu);
  m.impl("ham_spatial_apply_backward", &ham_spatial_apply_backward_cpu);
  m.impl("ham_attention", &ham_attention_cpu);
}

}  // namespace attnkernels
