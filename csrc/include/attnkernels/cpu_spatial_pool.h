// The CPU templates of HAM's dual spatial pooling, which cpu/ham_spatial.cpp and
// cpu/cbam_spatial.cpp share (the math: csrc/ham_spatial_ops.cpp, csrc/cbam_spatial_ops.cpp).
//
// Every op runs one task per (sample n, block of kPixelBlock pixels), which owns all C
// channels of its pixels: the per-pixel reductions over C (the pooled maps, grad_s, the tie
// counts) finish inside the task, and the per-channel reductions over pixels (grad_gate)
// leave one partial row per task, summed over the blocks in order afterwards. The block size
// is fixed, so results are bitwise identical run to run, whatever the thread count.
// NCHW walks each channel's contiguous run of the block's pixels against per-pixel
// accumulators; channels_last walks each pixel's contiguous row of C channels.
//
// The block templates take a compile-time kOneGroup. false: HAM's two groups, G1 = F1*mask
// and G2 = F1*(1-mask). true: cbam_spatial's single group G1 = F1 (mask = 1, no G2): no mask
// loads and no second group at all, rather than products with 1 and 0 (which would also turn
// an inf F into NaN through F*0).
// Everything here is a template or inline, so the two files' copies are one definition.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <vector>

#include "attnkernels/common.h"
#include "attnkernels/cpu_vec.h"

namespace attnkernels::cpu_spatial {

constexpr int64_t kPixelBlock = 1024;

inline int64_t pixel_blocks(int64_t hw) { return (hw + kPixelBlock - 1) / kPixelBlock; }

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
// layout; gate and mask rows are (N, C) (no mask in the one-group case: nullptr); pixel maps
// are (N, k, H, W) with hw pixels per map.
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

// mask undefined: the one-group case.
template <typename scalar_t>
Views<scalar_t> views(const at::Tensor& x, const at::Tensor& gate, const at::Tensor& mask = at::Tensor()) {
  using acc_t = at::opmath_type<scalar_t>;
  return {x.size(0), x.size(1), x.size(2) * x.size(3), layout_of(x) == Layout::ChannelsLast,
          x.const_data_ptr<scalar_t>(), gate.const_data_ptr<acc_t>(),
          mask.defined() ? mask.const_data_ptr<acc_t>() : nullptr};
}

// x checked as a feature map, and dense in NCHW or channels_last (a sliced view is copied).
inline at::Tensor checked_x(const at::Tensor& x, const char* op) {
  check_feature_map(x, op, "x");
  return dense(x);
}

// The per-block partial rows of grad_gate, (N, blocks, C) in gate's dtype (acc(x)), zeroed.
inline at::Tensor gate_partials(const at::Tensor& x, const at::Tensor& gate) {
  return at::zeros({x.size(0), pixel_blocks(x.size(2) * x.size(3)), x.size(1)}, gate.options());
}

// The (N, blocks, C) per-block partials of grad_gate, summed over the blocks in order.
inline at::Tensor sum_block_partials(const at::Tensor& partial) { return partial.sum(1); }

// ---------------------------------------------------------------- pooling

// Per pixel: sum and max of G1 (and of G2 unless kOneGroup) over all C channels; sum2 and
// max2 are unused (may be nullptr) when kOneGroup.
// NCHW walks the channel rows in order against per-pixel accumulators in L1: sequential reads
// the prefetcher follows. (Walking one vector of pixels down all C rows, accumulators in
// registers, measured 1.8x slower from memory and no faster with x[n] in cache.)
template <bool kOneGroup, typename scalar_t>
void pool_block(const Views<scalar_t>& v, int64_t n, int64_t p0, int64_t p1, at::opmath_type<scalar_t>* sum1,
                at::opmath_type<scalar_t>* max1, at::opmath_type<scalar_t>* sum2,
                at::opmath_type<scalar_t>* max2) {
  using S = Step<scalar_t>;
  using acc_t = typename S::acc_t;
  using AccVec = typename S::AccVec;
  const int64_t len = p1 - p0;
  const acc_t lowest = -std::numeric_limits<acc_t>::infinity();
  const acc_t* g = v.gate + n * v.C;
  const acc_t* m = kOneGroup ? nullptr : v.mask + n * v.C;
  if (!v.channels_last) {
    std::fill(sum1, sum1 + len, acc_t(0));
    std::fill(max1, max1 + len, lowest);
    if constexpr (!kOneGroup) {
      std::fill(sum2, sum2 + len, acc_t(0));
      std::fill(max2, max2 + len, lowest);
    }
    for (int64_t c = 0; c < v.C; ++c) {
      const scalar_t* xc = v.x + v.at(n, c, p0);
      const AccVec vg(g[c]);
      AccVec xv[S::kVecs], a[S::kVecs], b[S::kVecs];
      int64_t i = 0;
      for (; i + S::kWidth <= len; i += S::kWidth) {
        S::load(xc + i, xv);
        S::load_acc(sum1 + i, a);
        S::load_acc(max1 + i, b);
        if constexpr (kOneGroup) {
          for (int k = 0; k < S::kVecs; ++k) {
            const AccVec f1 = xv[k] * vg;
            a[k] += f1;
            b[k] = at::vec::maximum(b[k], f1);
          }
        } else {
          const AccVec vm(m[c]), vm2(acc_t(1) - m[c]);
          AccVec d[S::kVecs], e[S::kVecs];
          S::load_acc(sum2 + i, d);
          S::load_acc(max2 + i, e);
          for (int k = 0; k < S::kVecs; ++k) {
            const AccVec f1 = xv[k] * vg, g1 = f1 * vm, g2 = f1 * vm2;
            a[k] += g1;
            b[k] = at::vec::maximum(b[k], g1);
            d[k] += g2;
            e[k] = at::vec::maximum(e[k], g2);
          }
          S::store_acc(sum2 + i, d);
          S::store_acc(max2 + i, e);
        }
        S::store_acc(sum1 + i, a);
        S::store_acc(max1 + i, b);
      }
      for (; i < len; ++i) {
        const acc_t f1 = static_cast<acc_t>(xc[i]) * g[c];
        if constexpr (kOneGroup) {
          sum1[i] += f1;
          max1[i] = nan_max(max1[i], f1);
        } else {
          const acc_t g1 = f1 * m[c], g2 = f1 * (acc_t(1) - m[c]);
          sum1[i] += g1;
          max1[i] = nan_max(max1[i], g1);
          sum2[i] += g2;
          max2[i] = nan_max(max2[i], g2);
        }
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
      if constexpr (kOneGroup) {
        for (int k = 0; k < S::kVecs; ++k) {
          const AccVec f1 = xv[k] * vg[k];
          a[k] += f1;
          b[k] = at::vec::maximum(b[k], f1);
        }
      } else {
        S::load_acc(m + c, vm);
        for (int k = 0; k < S::kVecs; ++k) {
          const AccVec f1 = xv[k] * vg[k], g1 = f1 * vm[k], g2 = f1 * (AccVec(1) - vm[k]);
          a[k] += g1;
          b[k] = at::vec::maximum(b[k], g1);
          d[k] += g2;
          e[k] = at::vec::maximum(e[k], g2);
        }
      }
    }
    acc_t s1 = 0, s2 = 0, mx1 = lowest, mx2 = lowest;
    for (int k = 0; k < S::kVecs; ++k) {
      s1 += reduce_sum(a[k]);
      mx1 = nan_max(mx1, reduce_max(b[k]));
      if constexpr (!kOneGroup) {
        s2 += reduce_sum(d[k]);
        mx2 = nan_max(mx2, reduce_max(e[k]));
      }
    }
    for (; c < v.C; ++c) {
      const acc_t f1 = static_cast<acc_t>(row[c]) * g[c];
      if constexpr (kOneGroup) {
        s1 += f1;
        mx1 = nan_max(mx1, f1);
      } else {
        const acc_t g1 = f1 * m[c], g2 = f1 * (acc_t(1) - m[c]);
        s1 += g1;
        s2 += g2;
        mx1 = nan_max(mx1, g1);
        mx2 = nan_max(mx2, g2);
      }
    }
    sum1[p - p0] = s1;
    max1[p - p0] = mx1;
    if constexpr (!kOneGroup) {
      sum2[p - p0] = s2;
      max2[p - p0] = mx2;
    }
  }
}

// ---------------------------------------------------------------- pooling's backward

// Per pixel, what every channel's gradient needs: r = grad_mean / divisor and
// t = grad_max / (number of channels tied at the max), for each group (r2, t2, max2 unused
// in the one-group case).
template <typename acc_t>
struct PixelGrad {
  acc_t r1, t1, r2, t2, max1, max2;
};

// dF1 of one element from its G1, G2 and mask value (docs/contract.md: no gradient through the mask).
// The indicator is a literal product: where the max is NaN, t is inf or NaN and 0 * t is NaN.
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
// The one-group dF = r + [F == max] * t.
template <typename V>
inline V pool_dF(const V& f, const V& max, const V& r, const V& t) {
  return r + f.eq(max) * t;
}
template <typename acc_t>
inline acc_t pool_dF(acc_t f, const PixelGrad<acc_t>& q) {
  return q.r1 + acc_t(f == q.max1) * q.t1;
}

// grad_x (into gx, x's layout) and the block's grad_gate row of the pooling over [p0, p1) of
// sample n. gd1, d1 (and gd2, d2 unless kOneGroup) are (N, 2, H, W): row 0 holds the means
// (and their gradients), row 1 the maxima. div1, div2: the groups' channel counts.
template <bool kOneGroup, typename scalar_t>
void pool_backward_block(const Views<scalar_t>& v, int64_t n, int64_t p0, int64_t p1,
                         at::opmath_type<scalar_t> div1, at::opmath_type<scalar_t> div2,
                         const at::opmath_type<scalar_t>* gd1, const at::opmath_type<scalar_t>* gd2,
                         const at::opmath_type<scalar_t>* d1, const at::opmath_type<scalar_t>* d2, scalar_t* gx,
                         at::opmath_type<scalar_t>* grad_gate) {
  using S = Step<scalar_t>;
  using acc_t = typename S::acc_t;
  using AccVec = typename S::AccVec;
  const int64_t len = p1 - p0, hw = v.hw, C = v.C;
  const acc_t* g = v.gate + n * C;
  const acc_t* m = kOneGroup ? nullptr : v.mask + n * C;
  const acc_t *gmean1 = gd1 + n * 2 * hw, *gmax1 = gmean1 + hw, *max1 = d1 + n * 2 * hw + hw;
  const acc_t *gmean2 = nullptr, *gmax2 = nullptr, *max2 = nullptr;
  if constexpr (!kOneGroup) {
    gmean2 = gd2 + n * 2 * hw;
    gmax2 = gmean2 + hw;
    max2 = d2 + n * 2 * hw + hw;
  }
  std::fill(grad_gate, grad_gate + C, acc_t(0));
  if (!v.channels_last) {
    // Pass 1: tie counts per pixel; then the per-pixel coefficients; pass 2: the gradients.
    std::vector<acc_t> buf(6 * len, acc_t(0));
    acc_t *cnt1 = buf.data(), *cnt2 = cnt1 + len, *t1 = cnt2 + len, *t2 = t1 + len, *r1 = t2 + len, *r2 = r1 + len;
    // Channel rows in order, streaming x (the forward's products, recomputed bit for bit).
    for (int64_t c = 0; c < C; ++c) {
      const scalar_t* xc = v.x + v.at(n, c, p0);
      const AccVec vg(g[c]);
      AccVec xv[S::kVecs], a[S::kVecs], n1[S::kVecs];
      int64_t i = 0;
      for (; i + S::kWidth <= len; i += S::kWidth) {
        S::load(xc + i, xv);
        S::load_acc(max1 + p0 + i, a);
        S::load_acc(cnt1 + i, n1);
        if constexpr (kOneGroup) {
          for (int k = 0; k < S::kVecs; ++k) n1[k] += (xv[k] * vg).eq(a[k]);
        } else {
          const AccVec vm(m[c]), vm2(acc_t(1) - m[c]);
          AccVec b[S::kVecs], n2[S::kVecs];
          S::load_acc(max2 + p0 + i, b);
          S::load_acc(cnt2 + i, n2);
          for (int k = 0; k < S::kVecs; ++k) {
            const AccVec f1 = xv[k] * vg;
            n1[k] += (f1 * vm).eq(a[k]);
            n2[k] += (f1 * vm2).eq(b[k]);
          }
          S::store_acc(cnt2 + i, n2);
        }
        S::store_acc(cnt1 + i, n1);
      }
      for (; i < len; ++i) {
        const acc_t f1 = static_cast<acc_t>(xc[i]) * g[c];
        if constexpr (kOneGroup) {
          cnt1[i] += acc_t(f1 == max1[p0 + i]);
        } else {
          cnt1[i] += acc_t(f1 * m[c] == max1[p0 + i]);
          cnt2[i] += acc_t(f1 * (acc_t(1) - m[c]) == max2[p0 + i]);
        }
      }
    }
    for (int64_t i = 0; i < len; ++i) {
      t1[i] = gmax1[p0 + i] / cnt1[i];  // a NaN max ties nothing: count 0 gives NaN, as torch.amax
      r1[i] = gmean1[p0 + i] / div1;
      if constexpr (!kOneGroup) {
        t2[i] = gmax2[p0 + i] / cnt2[i];
        r2[i] = gmean2[p0 + i] / div2;
      }
    }
    for (int64_t c = 0; c < C; ++c) {
      const int64_t off = v.at(n, c, p0);
      const scalar_t* xc = v.x + off;
      scalar_t* gxc = gx + off;
      const AccVec vg(g[c]);
      AccVec xv[S::kVecs], vsum[S::kVecs], a[S::kVecs], q1[S::kVecs], w1[S::kVecs], out[S::kVecs];
      for (int k = 0; k < S::kVecs; ++k) vsum[k] = AccVec(0);
      int64_t i = 0;
      for (; i + S::kWidth <= len; i += S::kWidth) {
        S::load(xc + i, xv);
        S::load_acc(max1 + p0 + i, a);
        if constexpr (kOneGroup) {
          S::load_acc(r1 + i, q1);
          S::load_acc(t1 + i, w1);
          for (int k = 0; k < S::kVecs; ++k) {
            const AccVec df = pool_dF(xv[k] * vg, a[k], q1[k], w1[k]);
            vsum[k] += df * xv[k];
            out[k] = df * vg;
          }
        } else {
          const AccVec vm(m[c]), vm2(acc_t(1) - m[c]);
          AccVec b[S::kVecs], q2[S::kVecs], w2[S::kVecs];
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
        }
        S::store(gxc + i, out);
      }
      acc_t sum = 0;
      for (int k = 0; k < S::kVecs; ++k) sum += reduce_sum(vsum[k]);
      for (; i < len; ++i) {
        const acc_t xi = static_cast<acc_t>(xc[i]), f1 = xi * g[c];
        acc_t df1;
        if constexpr (kOneGroup) {
          df1 = pool_dF(f1, PixelGrad<acc_t>{r1[i], t1[i], 0, 0, max1[p0 + i], 0});
        } else {
          const PixelGrad<acc_t> q{r1[i], t1[i], r2[i], t2[i], max1[p0 + i], max2[p0 + i]};
          df1 = pool_dF1(f1 * m[c], f1 * (acc_t(1) - m[c]), m[c], q);
        }
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
      if constexpr (kOneGroup) {
        cnt1 += acc_t(f1 == max1[p]);
      } else {
        cnt1 += acc_t(f1 * m[c] == max1[p]);
        cnt2 += acc_t(f1 * (acc_t(1) - m[c]) == max2[p]);
      }
    }
    PixelGrad<acc_t> q{gmean1[p] / div1, gmax1[p] / cnt1, 0, 0, max1[p], 0};
    if constexpr (!kOneGroup) {
      q.r2 = gmean2[p] / div2;
      q.t2 = gmax2[p] / cnt2;
      q.max2 = max2[p];
    }
    const AccVec a(q.max1), b(q.max2), q1(q.r1), w1(q.t1), q2(q.r2), w2(q.t2);
    AccVec xv[S::kVecs], vg[S::kVecs], vm[S::kVecs], gg[S::kVecs], out[S::kVecs];
    int64_t c = 0;
    for (; c + S::kWidth <= C; c += S::kWidth) {
      S::load(row + c, xv);
      S::load_acc(g + c, vg);
      if constexpr (!kOneGroup) S::load_acc(m + c, vm);
      S::load_acc(grad_gate + c, gg);
      for (int k = 0; k < S::kVecs; ++k) {
        const AccVec f1 = xv[k] * vg[k];
        AccVec df1;
        if constexpr (kOneGroup) {
          df1 = pool_dF(f1, a, q1, w1);
        } else {
          df1 = pool_dF1(f1 * vm[k], f1 * (AccVec(1) - vm[k]), vm[k], a, b, q1, w1, q2, w2);
        }
        gg[k] += df1 * xv[k];
        out[k] = df1 * vg[k];
      }
      S::store_acc(grad_gate + c, gg);
      S::store(grow + c, out);
    }
    for (; c < C; ++c) {
      const acc_t xi = static_cast<acc_t>(row[c]), f1 = xi * g[c];
      acc_t df1;
      if constexpr (kOneGroup) {
        df1 = pool_dF(f1, q);
      } else {
        df1 = pool_dF1(f1 * m[c], f1 * (acc_t(1) - m[c]), m[c], q);
      }
      grad_gate[c] += df1 * xi;
      grow[c] = static_cast<scalar_t>(df1 * g[c]);
    }
  }
}

// ---------------------------------------------------------------- apply (+ backward)

// The spatial gates of one element: y = G1*s1 + G2*s2 (one group: y = F1*s1).
template <bool kOneGroup, typename V>
inline V applied(const V& f1, const V& m, const V& s1, const V& s2) {
  if constexpr (kOneGroup) {
    return f1 * s1;
  } else {
    return f1 * m * s1 + f1 * (V(1) - m) * s2;
  }
}

// The backward of one element of y (a value or a vector of them): adds grad_y*G1 to u and
// grad_y*G2 to w (one group: grad_y*F1 to u, w untouched), returns dF1.
template <bool kOneGroup, typename V>
inline V applied_backward(const V& gy, const V& f1, const V& m, const V& s1, const V& s2, V& u, V& w) {
  if constexpr (kOneGroup) {
    u += gy * f1;
    return gy * s1;
  } else {
    const V m2 = V(1) - m;
    u += gy * (f1 * m);
    w += gy * (f1 * m2);
    return gy * s1 * m + gy * s2 * m2;
  }
}

// y = G1*s1 + G2*s2 (one group: F1*s1) for the pixels [p0, p1) of sample n; s1, s2 (and gs1,
// gs2) are the sample's rows of hw values (s2, gs2 unused when kOneGroup). With grad_y set
// (the backward), writes grad_x = dF1*gate into out and accumulates grad_gate, grad_s1 and
// grad_s2 instead. `stream`: y's vectors go out with streaming stores (cpu_vec.h's
// should_stream: y larger than the last-level cache), fenced before the block returns.
template <bool kOneGroup, typename scalar_t>
void apply_block(const Views<scalar_t>& v, int64_t n, int64_t p0, int64_t p1, const scalar_t* grad_y,
                 const at::opmath_type<scalar_t>* s1, const at::opmath_type<scalar_t>* s2, scalar_t* out,
                 at::opmath_type<scalar_t>* grad_gate, at::opmath_type<scalar_t>* gs1,
                 at::opmath_type<scalar_t>* gs2, bool stream = false) {
  using S = Step<scalar_t>;
  using acc_t = typename S::acc_t;
  using AccVec = typename S::AccVec;
  const bool backward = grad_y != nullptr;
  const int64_t len = p1 - p0, C = v.C;
  const acc_t* g = v.gate + n * C;
  const acc_t* m = kOneGroup ? nullptr : v.mask + n * C;
  const acc_t *s1n = s1, *s2n = s2;
  if (backward) std::fill(grad_gate, grad_gate + C, acc_t(0));
  if (!v.channels_last) {
    if (backward) {
      std::fill(gs1 + p0, gs1 + p1, acc_t(0));
      if constexpr (!kOneGroup) std::fill(gs2 + p0, gs2 + p1, acc_t(0));
    }
    for (int64_t c = 0; c < C; ++c) {
      const int64_t off = v.at(n, c, p0);
      const scalar_t* xc = v.x + off;
      const acc_t mc = kOneGroup ? acc_t(1) : m[c];
      const AccVec vg(g[c]), vm(mc);
      AccVec xv[S::kVecs], gy[S::kVecs], a[S::kVecs], b[S::kVecs], o[S::kVecs], u[S::kVecs], w[S::kVecs],
          vsum[S::kVecs];
      for (int k = 0; k < S::kVecs; ++k) vsum[k] = AccVec(0);
      int64_t i = 0;
      for (; i + S::kWidth <= len; i += S::kWidth) {
        S::load(xc + i, xv);
        S::load_acc(s1n + p0 + i, a);
        if constexpr (!kOneGroup) S::load_acc(s2n + p0 + i, b);
        if (!backward) {
          for (int k = 0; k < S::kVecs; ++k) o[k] = applied<kOneGroup>(xv[k] * vg, vm, a[k], b[k]);
          S::store(out + off + i, o, stream);
          continue;
        }
        S::load(grad_y + off + i, gy);
        S::load_acc(gs1 + p0 + i, u);
        if constexpr (!kOneGroup) S::load_acc(gs2 + p0 + i, w);
        for (int k = 0; k < S::kVecs; ++k) {
          const AccVec df1 = applied_backward<kOneGroup>(gy[k], xv[k] * vg, vm, a[k], b[k], u[k], w[k]);
          vsum[k] += df1 * xv[k];
          o[k] = df1 * vg;
        }
        if constexpr (!kOneGroup) S::store_acc(gs2 + p0 + i, w);
        S::store_acc(gs1 + p0 + i, u);
        S::store(out + off + i, o);
      }
      acc_t sum = 0;
      for (int k = 0; k < S::kVecs; ++k) sum += reduce_sum(vsum[k]);
      for (; i < len; ++i) {
        const int64_t p = p0 + i;
        const acc_t xi = static_cast<acc_t>(xc[i]), f1 = xi * g[c];
        const acc_t s2p = kOneGroup ? acc_t(0) : s2n[p];
        if (!backward) {
          out[off + i] = static_cast<scalar_t>(applied<kOneGroup>(f1, mc, s1n[p], s2p));
          continue;
        }
        const acc_t gyi = static_cast<acc_t>(grad_y[off + i]);
        acc_t unused = 0;
        const acc_t df1 =
            applied_backward<kOneGroup>(gyi, f1, mc, s1n[p], s2p, gs1[p], kOneGroup ? unused : gs2[p]);
        sum += df1 * xi;
        out[off + i] = static_cast<scalar_t>(df1 * g[c]);
      }
      if (backward) grad_gate[c] = sum;
    }
    if (stream) stream_fence();
    return;
  }
  for (int64_t p = p0; p < p1; ++p) {
    const int64_t off = v.at(n, 0, p);
    const scalar_t* row = v.x + off;
    const acc_t s2p = kOneGroup ? acc_t(0) : s2n[p];
    const AccVec a(s1n[p]), b(s2p);
    AccVec xv[S::kVecs], gy[S::kVecs], vg[S::kVecs], vm[S::kVecs], o[S::kVecs], gg[S::kVecs], u[S::kVecs],
        w[S::kVecs];
    for (int k = 0; k < S::kVecs; ++k) u[k] = w[k] = AccVec(0);
    int64_t c = 0;
    for (; c + S::kWidth <= C; c += S::kWidth) {
      S::load(row + c, xv);
      S::load_acc(g + c, vg);
      if constexpr (!kOneGroup) S::load_acc(m + c, vm);
      if (!backward) {
        for (int k = 0; k < S::kVecs; ++k) o[k] = applied<kOneGroup>(xv[k] * vg[k], vm[k], a, b);
        S::store(out + off + c, o, stream);
        continue;
      }
      S::load(grad_y + off + c, gy);
      S::load_acc(grad_gate + c, gg);
      for (int k = 0; k < S::kVecs; ++k) {
        const AccVec df1 = applied_backward<kOneGroup>(gy[k], xv[k] * vg[k], vm[k], a, b, u[k], w[k]);
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
        if constexpr (!kOneGroup) sum2 += reduce_sum(w[k]);
      }
    }
    for (; c < C; ++c) {
      const acc_t xi = static_cast<acc_t>(row[c]), f1 = xi * g[c];
      const acc_t mc = kOneGroup ? acc_t(1) : m[c];
      if (!backward) {
        out[off + c] = static_cast<scalar_t>(applied<kOneGroup>(f1, mc, s1n[p], s2p));
        continue;
      }
      const acc_t gyi = static_cast<acc_t>(grad_y[off + c]);
      const acc_t df1 = applied_backward<kOneGroup>(gyi, f1, mc, s1n[p], s2p, sum1, sum2);
      grad_gate[c] += df1 * xi;
      out[off + c] = static_cast<scalar_t>(df1 * g[c]);
    }
    if (backward) {
      gs1[p] = sum1;
      if constexpr (!kOneGroup) gs2[p] = sum2;
    }
  }
  if (stream) stream_fence();
}

}  // namespace attnkernels::cpu_spatial
