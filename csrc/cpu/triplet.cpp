// CPU kernels of the triplet hot path; the math is in csrc/triplet_ops.cpp.
//
// Every op runs one task per (sample n, block of channels) and reads its part of x once per
// pass. A task owns its channels' rows of the cw plane (reduced over h) and of the
// hc plane (reduced over w) outright; the hw plane is reduced over c, across tasks, so each
// task leaves one partial plane, (N, blocks, H*W), combined afterwards over the blocks in
// order. The block size is fixed: results are bitwise identical whatever the thread count, with
// no atomics.
//
// A task walks contiguous rows of x: NCHW rows (c, h) along w, channels_last rows (h, w) along
// its channels. Along a row two of the three maps run element by element and one is constant:
// NCHW: hw and cw run, hc is constant; channels_last: cw and hc run, hw is constant. For that,
// a channels_last op keeps the cw plane transposed, (W, C), so that it runs along c too. (The
// NCHW pool takes hw over whole H*W planes first, a few channels at a time: pool_planes.)
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <limits>
#include <tuple>

#include "attnkernels/cpu_vec.h"
#include "attnkernels/triplet.h"

namespace attnkernels {
namespace {

// NCHW: 64 channels, a partial hw plane per 64 channels (under 7% of x's traffic at fp32).
// channels_last: 256 channels, rows of up to 1 KiB (fp32) one after another in memory: with
// 64-channel rows a task read 256 B of every pixel's 1 KiB and the prefetcher lost the stream
// at each page (32x256x28x28 fp32, one thread: pool 9.0 -> 4.7 ms, apply 7.7 -> 3.1 ms).
// Whole vectors of every dtype along a channels_last row; fixed sizes, so deterministic.
constexpr int64_t kChannelBlock = 64;
constexpr int64_t kChannelBlockCL = 256;

#define AK_DISPATCH_FEATURE(x, name, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, (x).scalar_type(), name, __VA_ARGS__)

// ---------------------------------------------------------------- the walk

struct Geometry {
  int64_t N, C, H, W, block, blocks;
  bool channels_last;
  int64_t hw() const { return H * W; }
};

Geometry geometry_of(const at::Tensor& x) {
  const int64_t C = x.size(1);
  const bool cl = layout_of(x) == Layout::ChannelsLast;
  const int64_t block = cl ? kChannelBlockCL : kChannelBlock;
  return {x.size(0), C, x.size(2), x.size(3), block, (C + block - 1) / block, cl};
}

// Calls f(n, b, c0, c1) for every (sample, channel block), in parallel.
template <typename F>
void for_channel_blocks(const Geometry& g, const F& f) {
  at::parallel_for(0, g.N * g.blocks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t n = t / g.blocks, b = t % g.blocks, c0 = b * g.block;
      f(n, b, c0, std::min(g.C, c0 + g.block));
    }
  });
}

// One contiguous run of x: its offset in x, its first element's offsets in sample n's hw, cw
// and hc planes, and its length.
struct Row {
  int64_t x, hw, cw, hc, len;
};

// Calls f(row) for every row of x[n, c0:c1] in memory order.
template <typename F>
void for_rows(const Geometry& g, int64_t n, int64_t c0, int64_t c1, const F& f) {
  if (!g.channels_last) {
    for (int64_t c = c0; c < c1; ++c) {
      for (int64_t h = 0; h < g.H; ++h) {
        f(Row{((n * g.C + c) * g.H + h) * g.W, h * g.W, c * g.W, h * g.C + c, g.W});
      }
    }
    return;
  }
  for (int64_t h = 0; h < g.H; ++h) {
    for (int64_t w = 0; w < g.W; ++w) {
      f(Row{((n * g.H + h) * g.W + w) * g.C + c0, h * g.W + w, w * g.C + c0, h * g.C + c0, c1 - c0});
    }
  }
}

// Per-sample map pointers (hw, cw, hc) at a row, reordered as the reducing row kernels take
// them: the two maps that run along the row, then the one constant along it.
template <typename P>
std::array<P, 3> runs_then_constant(bool channels_last, P hw, P cw, P hc) {
  if (channels_last) return {cw, hc, hw};
  return {hw, cw, hc};
}

// The cw plane as the walk uses it: itself in NCHW, transposed to (N, k, W, C) in channels_last.
at::Tensor walked_cw(const at::Tensor& t, bool channels_last) {
  return channels_last ? t.transpose(2, 3).contiguous() : t.contiguous();
}

// ---------------------------------------------------------------- row kernels

// A map's values along one row: p[0], p[1], ... where it runs along the row (kRun), else the
// single value *p for the whole row.
template <typename scalar_t, bool kRun>
struct Along {
  using S = Step<scalar_t>;
  using acc_t = typename S::acc_t;
  using AccVec = typename S::AccVec;
  const acc_t* p;

  void load(int64_t i, AccVec (&v)[S::kVecs]) const {
    if constexpr (kRun) {
      S::load_acc(p + i, v);
    } else {
      for (int k = 0; k < S::kVecs; ++k) v[k] = AccVec(*p);
    }
  }
  acc_t at(int64_t i) const {
    if constexpr (kRun) {
      return p[i];
    } else {
      return *p;
    }
  }
};

// The last, partial vector of a row of len >= kWidth elements, taken as the whole vector that
// ends at the row's end: the lanes the main loop already pooled (all but the last rem) are
// replaced by an identity, -inf for the max and -0.0 for the sum (v + -0.0 == v exactly, for
// -0.0 too), so every element is pooled once and no scalar tail runs. (A scalar tail of 4 of
// W = 28 elements was most of a row's instructions: a NaN-aware max per element and map.)
template <typename scalar_t>
struct TailLanes {
  using S = Step<scalar_t>;
  using acc_t = typename S::acc_t;
  using AccVec = typename S::AccVec;
  AccVec keep[S::kVecs];  // all bits set in the lanes of the row's last rem elements

  explicit TailLanes(int64_t rem) {
    for (int k = 0; k < S::kVecs; ++k) {
      keep[k] = AccVec::arange(acc_t(k * AccVec::size()), acc_t(1)) >= AccVec(acc_t(S::kWidth - rem));
    }
  }
  // v in the row's last rem lanes, `identity` in the others.
  AccVec only_new(const AccVec& v, int k, acc_t identity) const { return AccVec::blendv(AccVec(identity), v, keep[k]); }
  void split(const AccVec (&xv)[S::kVecs], AccVec (&xm)[S::kVecs], AccVec (&xs)[S::kVecs]) const {
    for (int k = 0; k < S::kVecs; ++k) {
      xm[k] = only_new(xv[k], k, -std::numeric_limits<acc_t>::infinity());
      xs[k] = only_new(xv[k], k, acc_t(-0.0));
    }
  }
};

// Calls step(j, tail) over a row of len elements a vector at a time: tail == nullptr for each
// whole vector, then, where the row holds a vector but does not end on one, once more on the
// vector that ends at the row's end, with tail marking the lanes not yet taken. Returns where
// an element-by-element remainder starts: len, or 0 for a row shorter than a vector.
template <typename scalar_t, typename F>
int64_t vector_steps(int64_t len, const F& step) {
  constexpr int64_t kWidth = Step<scalar_t>::kWidth;
  int64_t i = 0;
  for (; i + kWidth <= len; i += kWidth) step(i, static_cast<const TailLanes<scalar_t>*>(nullptr));
  if (i < len && len >= kWidth) {
    const TailLanes<scalar_t> tail(len - i);
    step(len - kWidth, &tail);
    i = len;
  }
  return i;
}

// One vector step of pool_row at element i: xm into the maxima, xs into the sums (the same
// values, but for TailLanes' identities).
template <typename scalar_t, bool kB, bool kR, typename acc_t, typename AccVec, int kVecs>
inline void pool_step(int64_t i, const AccVec (&xm)[kVecs], const AccVec (&xs)[kVecs], std::array<acc_t*, 2> a,
                      std::array<acc_t*, 2> b, AccVec (&rmax)[kVecs], AccVec (&rsum)[kVecs]) {
  using S = Step<scalar_t>;
  AccVec am[kVecs], as[kVecs], bm[kVecs], bs[kVecs];
  S::load_acc(a[0] + i, am);
  S::load_acc(a[1] + i, as);
  if constexpr (kB) {
    S::load_acc(b[0] + i, bm);
    S::load_acc(b[1] + i, bs);
  }
  for (int k = 0; k < kVecs; ++k) {
    am[k] = at::vec::maximum(am[k], xm[k]);  // NaN-propagating, as torch.amax
    as[k] += xs[k];
    if constexpr (kB) {
      bm[k] = at::vec::maximum(bm[k], xm[k]);
      bs[k] += xs[k];
    }
    if constexpr (kR) {
      rmax[k] = at::vec::maximum(rmax[k], xm[k]);
      rsum[k] += xs[k];
    }
  }
  S::store_acc(a[0] + i, am);
  S::store_acc(a[1] + i, as);
  if constexpr (kB) {
    S::store_acc(b[0] + i, bm);
    S::store_acc(b[1] + i, bs);
  }
}

// Pooling of one row: max and sum accumulated in place into the maps that run along it (max
// a[0] / sum a[1]; b likewise, unless !kB), and the row's own max and sum stored to the
// constant one (r, unless !kR). Rows of at least a vector end on a TailLanes vector; shorter
// ones run element by element.
template <typename scalar_t, bool kB = true, bool kR = true, typename acc_t = at::opmath_type<scalar_t>>
void pool_row(const scalar_t* x, int64_t len, std::array<acc_t*, 2> a, std::array<acc_t*, 2> b,
              std::array<acc_t*, 2> r) {
  using S = Step<scalar_t>;
  using AccVec = typename S::AccVec;
  const acc_t lowest = -std::numeric_limits<acc_t>::infinity();
  AccVec rmax[S::kVecs], rsum[S::kVecs];
  for (int k = 0; k < S::kVecs; ++k) {
    rmax[k] = AccVec(lowest);
    rsum[k] = AccVec(0);
  }
  int64_t i = vector_steps<scalar_t>(len, [=, &rmax, &rsum](int64_t j, const TailLanes<scalar_t>* tail) {
    AccVec xv[S::kVecs];
    S::load(x + j, xv);
    if (tail == nullptr) {
      pool_step<scalar_t, kB, kR>(j, xv, xv, a, b, rmax, rsum);
      return;
    }
    AccVec xm[S::kVecs], xs[S::kVecs];
    tail->split(xv, xm, xs);
    pool_step<scalar_t, kB, kR>(j, xm, xs, a, b, rmax, rsum);
  });
  acc_t mx = lowest, sum = 0;
  if constexpr (kR) {
    for (int k = 0; k < S::kVecs; ++k) {
      mx = nan_max(mx, reduce_max(rmax[k]));
      sum += reduce_sum(rsum[k]);
    }
  }
  for (; i < len; ++i) {
    const acc_t v = static_cast<acc_t>(x[i]);
    a[0][i] = nan_max(a[0][i], v);
    a[1][i] += v;
    if constexpr (kB) {
      b[0][i] = nan_max(b[0][i], v);
      b[1][i] += v;
    }
    mx = nan_max(mx, v);
    sum += v;
  }
  if constexpr (kR) {
    *r[0] = mx;
    *r[1] = sum;
  }
}

// NCHW pooling of channels c .. c + cn - 1 (cn <= kPlaneGroup, planes H*W apart): hw over
// their whole H*W planes (no row tails), the partial plane loaded and stored once per group
// rather than once per channel (the sums still added channel by channel, in order), then cw
// and hc of each channel row by row from L1. (Rows of W = 28 did all three at 7 instructions
// per element.)
constexpr int kPlaneGroup = 4;

template <typename scalar_t, typename acc_t = at::opmath_type<scalar_t>>
void pool_planes(const scalar_t* x, int cn, int64_t H, int64_t W, int64_t C, std::array<acc_t*, 2> hw,
                 std::array<acc_t*, 2> cw, std::array<acc_t*, 2> hc) {
  using S = Step<scalar_t>;
  using AccVec = typename S::AccVec;
  const int64_t HW = H * W;
  int64_t i = 0;
  for (; i + S::kWidth <= HW; i += S::kWidth) {
    AccVec m[S::kVecs], s[S::kVecs];
    S::load_acc(hw[0] + i, m);
    S::load_acc(hw[1] + i, s);
    for (int j = 0; j < cn; ++j) {
      AccVec xv[S::kVecs];
      S::load(x + j * HW + i, xv);
      for (int k = 0; k < S::kVecs; ++k) {
        m[k] = at::vec::maximum(m[k], xv[k]);  // NaN-propagating, as torch.amax
        s[k] += xv[k];
      }
    }
    S::store_acc(hw[0] + i, m);
    S::store_acc(hw[1] + i, s);
  }
  for (; i < HW; ++i) {
    acc_t m = hw[0][i], s = hw[1][i];
    for (int j = 0; j < cn; ++j) {
      const acc_t v = static_cast<acc_t>(x[j * HW + i]);
      m = nan_max(m, v);
      s += v;
    }
    hw[0][i] = m;
    hw[1][i] = s;
  }
  for (int j = 0; j < cn; ++j) {
    for (int64_t h = 0; h < H; ++h) {
      pool_row<scalar_t, false, true>(x + j * HW + h * W, W, {cw[0] + j * W, cw[1] + j * W}, {},
                                      {hc[0] + h * C + j, hc[1] + h * C + j});
    }
  }
}

// Tie counts of one row: where x equals a map's max, 1 is added to the map's count (a NaN
// ties nothing). a, b: the maxima and counts of the maps running along the row, counted in
// place; r: the constant map's, its count for this row stored.
template <typename scalar_t, typename acc_t = at::opmath_type<scalar_t>>
void count_row(const scalar_t* x, int64_t len, const acc_t* a_max, acc_t* a_cnt, const acc_t* b_max, acc_t* b_cnt,
               const acc_t* r_max, acc_t* r_cnt) {
  using S = Step<scalar_t>;
  using AccVec = typename S::AccVec;
  const AccVec rm(*r_max);
  AccVec rc[S::kVecs];
  for (int k = 0; k < S::kVecs; ++k) rc[k] = AccVec(0);
  // The counts of x[j .. j + kWidth); with a tail, only the lanes it has not counted yet.
  const auto step = [=, &rc](int64_t j, const TailLanes<scalar_t>* tail) {
    AccVec xv[S::kVecs], am[S::kVecs], ac[S::kVecs], bm[S::kVecs], bc[S::kVecs];
    S::load(x + j, xv);
    S::load_acc(a_max + j, am);
    S::load_acc(a_cnt + j, ac);
    S::load_acc(b_max + j, bm);
    S::load_acc(b_cnt + j, bc);
    for (int k = 0; k < S::kVecs; ++k) {
      AccVec ta = xv[k].eq(am[k]), tb = xv[k].eq(bm[k]), tr = xv[k].eq(rm);
      if (tail != nullptr) {
        ta = tail->only_new(ta, k, 0);
        tb = tail->only_new(tb, k, 0);
        tr = tail->only_new(tr, k, 0);
      }
      ac[k] += ta;
      bc[k] += tb;
      rc[k] += tr;
    }
    S::store_acc(a_cnt + j, ac);
    S::store_acc(b_cnt + j, bc);
  };
  int64_t i = vector_steps<scalar_t>(len, step);
  acc_t cnt = 0;
  for (int k = 0; k < S::kVecs; ++k) cnt += reduce_sum(rc[k]);
  for (; i < len; ++i) {
    const acc_t v = static_cast<acc_t>(x[i]);
    a_cnt[i] += acc_t(v == a_max[i]);
    b_cnt[i] += acc_t(v == b_max[i]);
    cnt += acc_t(v == *r_max);
  }
  *r_cnt = cnt;
}

// One map's share of grad_x along a row: [x == M] * a + b, with a = grad_d[.., 0] / cnt and
// b = grad_d[.., 1] / L. The indicator is a literal product, so a NaN max (cnt = 0, a = inf or
// NaN) makes its whole line NaN (csrc/triplet_ops.cpp).
template <typename scalar_t, bool kRun>
struct MaxGrad {
  using S = Step<scalar_t>;
  using acc_t = typename S::acc_t;
  using AccVec = typename S::AccVec;
  Along<scalar_t, kRun> M, a, b;

  void term(int64_t i, const AccVec (&xv)[S::kVecs], AccVec (&t)[S::kVecs]) const {
    AccVec m[S::kVecs], av[S::kVecs], bv[S::kVecs];
    M.load(i, m);
    a.load(i, av);
    b.load(i, bv);
    for (int k = 0; k < S::kVecs; ++k) t[k] = xv[k].eq(m[k]) * av[k] + bv[k];
  }
  acc_t term(int64_t i, acc_t v) const { return acc_t(v == M.at(i)) * a.at(i) + b.at(i); }
};

// grad_x of one row of the pool's backward: the three maps' shares summed in the order hw,
// cw, hc. Of the maps, hc is constant along an NCHW row and hw along a channels_last one.
template <typename scalar_t, bool kCL>
void pool_grad_row(const scalar_t* x, scalar_t* gx, int64_t len, MaxGrad<scalar_t, !kCL> hw,
                   MaxGrad<scalar_t, true> cw, MaxGrad<scalar_t, kCL> hc) {
  using S = Step<scalar_t>;
  using acc_t = typename S::acc_t;
  using AccVec = typename S::AccVec;
  // grad_x of x[j .. j + kWidth): elementwise, so a tail vector writes its taken lanes again
  // with the same values.
  const auto step = [=](int64_t j, const TailLanes<scalar_t>*) {
    AccVec xv[S::kVecs], t_hw[S::kVecs], t_cw[S::kVecs], t_hc[S::kVecs], out[S::kVecs];
    S::load(x + j, xv);
    hw.term(j, xv, t_hw);
    cw.term(j, xv, t_cw);
    hc.term(j, xv, t_hc);
    for (int k = 0; k < S::kVecs; ++k) out[k] = t_hw[k] + t_cw[k] + t_hc[k];
    S::store(gx + j, out);
  };
  int64_t i = vector_steps<scalar_t>(len, step);
  for (; i < len; ++i) {
    const acc_t v = static_cast<acc_t>(x[i]);
    gx[i] = static_cast<scalar_t>(hw.term(i, v) + cw.term(i, v) + hc.term(i, v));
  }
}

// y of one row: (x * s_hw + x * s_cw + x * s_hc) / 3, in that order.
template <typename scalar_t, bool kCL>
void apply_row(const scalar_t* x, scalar_t* y, int64_t len, Along<scalar_t, !kCL> s_hw,
               Along<scalar_t, true> s_cw, Along<scalar_t, kCL> s_hc, bool stream) {
  using S = Step<scalar_t>;
  using acc_t = typename S::acc_t;
  using AccVec = typename S::AccVec;
  const AccVec three(3);
  int64_t i = 0;
  for (; i + S::kWidth <= len; i += S::kWidth) {
    AccVec xv[S::kVecs], a[S::kVecs], b[S::kVecs], c[S::kVecs], out[S::kVecs];
    S::load(x + i, xv);
    s_hw.load(i, a);
    s_cw.load(i, b);
    s_hc.load(i, c);
    for (int k = 0; k < S::kVecs; ++k) out[k] = (xv[k] * a[k] + xv[k] * b[k] + xv[k] * c[k]) / three;
    S::store(y + i, out, stream);
  }
  // A scalar tail here, not the last vector again: that would store into a line the streaming
  // stores have just written past the cache (the apply measured 5% slower).
  for (; i < len; ++i) {
    const acc_t v = static_cast<acc_t>(x[i]);
    y[i] = static_cast<scalar_t>((v * s_hw.at(i) + v * s_cw.at(i) + v * s_hc.at(i)) / acc_t(3));
  }
}

// One row of the apply's backward: g = grad_y / 3; grad_x = g * s_hw + g * s_cw + g * s_hc;
// g * x summed in place into the two gates' gradients that run along the row (a, b) and, for
// the constant one, the row's sum stored to r.
template <typename scalar_t, bool kCL>
void apply_grad_row(const scalar_t* gy, const scalar_t* x, scalar_t* gx, int64_t len, Along<scalar_t, !kCL> s_hw,
                    Along<scalar_t, true> s_cw, Along<scalar_t, kCL> s_hc, at::opmath_type<scalar_t>* a,
                    at::opmath_type<scalar_t>* b, at::opmath_type<scalar_t>* r) {
  using S = Step<scalar_t>;
  using acc_t = typename S::acc_t;
  using AccVec = typename S::AccVec;
  const AccVec three(3);
  AccVec rs[S::kVecs];
  for (int k = 0; k < S::kVecs; ++k) rs[k] = AccVec(0);
  // grad_x of x[j .. j + kWidth), and its g * x sums; with a tail, only the lanes it has not
  // summed yet (grad_x's other lanes are written again with the same values).
  const auto step = [=, &rs](int64_t j, const TailLanes<scalar_t>* tail) {
    AccVec gv[S::kVecs], xv[S::kVecs], u[S::kVecs], v[S::kVecs], w[S::kVecs], as[S::kVecs], bs[S::kVecs],
        out[S::kVecs];
    S::load(gy + j, gv);
    S::load(x + j, xv);
    s_hw.load(j, u);
    s_cw.load(j, v);
    s_hc.load(j, w);
    S::load_acc(a + j, as);
    S::load_acc(b + j, bs);
    for (int k = 0; k < S::kVecs; ++k) {
      const AccVec g = gv[k] / three;
      AccVec gxk = g * xv[k];
      if (tail != nullptr) gxk = tail->only_new(gxk, k, acc_t(-0.0));
      out[k] = g * u[k] + g * v[k] + g * w[k];
      as[k] += gxk;
      bs[k] += gxk;
      rs[k] += gxk;
    }
    S::store(gx + j, out);
    S::store_acc(a + j, as);
    S::store_acc(b + j, bs);
  };
  int64_t i = vector_steps<scalar_t>(len, step);
  acc_t sum = 0;
  for (int k = 0; k < S::kVecs; ++k) sum += reduce_sum(rs[k]);
  for (; i < len; ++i) {
    const acc_t g = static_cast<acc_t>(gy[i]) / acc_t(3), gxi = g * static_cast<acc_t>(x[i]);
    gx[i] = static_cast<scalar_t>(g * s_hw.at(i) + g * s_cw.at(i) + g * s_hc.at(i));
    a[i] += gxi;
    b[i] += gxi;
    sum += gxi;
  }
  *r = sum;
}

// ---------------------------------------------------------------- combining the blocks

// out[n * out_stride + p] = f over b = 0, 1, ... of part[n, b, p] (an (N, B, P) buffer),
// starting from init: a fixed order, so the result does not depend on the threads.
template <typename acc_t, typename F>
void combine_blocks(const acc_t* part, int64_t N, int64_t B, int64_t P, acc_t init, acc_t* out,
                    int64_t out_stride, const F& f) {
  at::parallel_for(0, N * P, 2048, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t n = t / P, p = t % P;
      const acc_t* src = part + n * B * P + p;
      acc_t v = init;
      for (int64_t b = 0; b < B; ++b) v = f(v, src[b * P]);
      out[n * out_stride + p] = v;
    }
  });
}

template <typename acc_t>
void sum_blocks(const at::Tensor& part, at::Tensor& out, int64_t out_stride) {
  combine_blocks<acc_t>(part.const_data_ptr<acc_t>(), part.size(0), part.size(1), part.size(2), acc_t(0),
                        out.data_ptr<acc_t>(), out_stride, [](acc_t s, acc_t v) { return s + v; });
}

// ---------------------------------------------------------------- helpers of the ops

// (N, k, rows, cols) in acc(x); rows and cols of the cw plane swapped in channels_last.
at::Tensor plane_maps(const Geometry& g, const at::Tensor& x, Gate gate, int64_t k) {
  const at::TensorOptions o = acc_options(x);
  switch (gate) {
    case Gate::HW:
      return at::empty({g.N, k, g.H, g.W}, o);
    case Gate::CW:
      return g.channels_last ? at::empty({g.N, k, g.W, g.C}, o) : at::empty({g.N, k, g.C, g.W}, o);
    default:
      return at::empty({g.N, k, g.H, g.C}, o);
  }
}

// A pooled map ready to accumulate: max plane -inf, sum plane 0.
at::Tensor pool_accumulator(at::Tensor t) {
  t.select(1, 0).fill_(-std::numeric_limits<double>::infinity());
  t.select(1, 1).zero_();
  return t;
}

// The map as the op returns it: NCHW-contiguous (N, k, C, W) for cw.
at::Tensor returned_cw(const at::Tensor& t, bool channels_last) {
  return channels_last ? t.transpose(2, 3).contiguous() : t;
}

// ---------------------------------------------------------------- triplet_pool

std::tuple<at::Tensor, at::Tensor, at::Tensor> triplet_pool_cpu(const at::Tensor& x_in) {
  check_feature_map(x_in, "triplet_pool", "x");
  const at::Tensor x = dense(x_in);
  const Geometry g = geometry_of(x);
  at::Tensor d_hw = plane_maps(g, x, Gate::HW, 2);
  at::Tensor d_cw = pool_accumulator(plane_maps(g, x, Gate::CW, 2));
  at::Tensor d_hc = pool_accumulator(plane_maps(g, x, Gate::HC, 2));
  if (x.numel() == 0) {  // a line of no values: max -inf, mean 0 / 0 = NaN
    for (const at::Tensor& d : {pool_accumulator(d_hw), d_cw, d_hc}) {
      d.select(1, 1).fill_(std::numeric_limits<double>::quiet_NaN());
    }
    return {d_hw, returned_cw(d_cw, g.channels_last), d_hc};
  }
  at::Tensor part = pool_accumulator(at::empty({g.N, 2, g.blocks, g.hw()}, acc_options(x)));
  AK_DISPATCH_FEATURE(x, "triplet_pool_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    acc_t *pp = part.data_ptr<acc_t>(), *cw = d_cw.data_ptr<acc_t>(), *hc = d_hc.data_ptr<acc_t>();
    const int64_t HW = g.hw(), CW = g.C * g.W, HC = g.H * g.C;
    for_channel_blocks(g, [&](int64_t n, int64_t b, int64_t c0, int64_t c1) {
      acc_t* p_max = pp + (n * 2 * g.blocks + b) * HW;  // part[n, 0, b], part[n, 1, b]
      acc_t* p_sum = p_max + g.blocks * HW;
      acc_t *cw_max = cw + n * 2 * CW, *hc_max = hc + n * 2 * HC;
      if (!g.channels_last) {
        for (int64_t c = c0; c < c1; c += kPlaneGroup) {
          const int cn = static_cast<int>(std::min<int64_t>(kPlaneGroup, c1 - c));
          pool_planes<scalar_t>(xp + (n * g.C + c) * HW, cn, g.H, g.W, g.C, {p_max, p_sum},
                                {cw_max + c * g.W, cw_max + CW + c * g.W}, {hc_max + c, hc_max + HC + c});
        }
        return;
      }
      for_rows(g, n, c0, c1, [&](const Row& r) {  // channels_last: cw and hc run, hw is constant
        pool_row<scalar_t>(xp + r.x, r.len, {cw_max + r.cw, cw_max + CW + r.cw}, {hc_max + r.hc, hc_max + HC + r.hc},
                           {p_max + r.hw, p_sum + r.hw});
      });
    });
    // d_hw from the blocks in order: max first, then the sum, divided by C below.
    const int64_t B = g.blocks, HW2 = 2 * HW;
    acc_t* out = d_hw.data_ptr<acc_t>();
    for (int64_t k = 0; k < 2; ++k) {
      const at::Tensor plane = part.select(1, k).contiguous();
      if (k == 0) {
        combine_blocks<acc_t>(plane.const_data_ptr<acc_t>(), g.N, B, HW, -std::numeric_limits<acc_t>::infinity(),
                              out, HW2, [](acc_t m, acc_t v) { return nan_max(m, v); });
      } else {
        combine_blocks<acc_t>(plane.const_data_ptr<acc_t>(), g.N, B, HW, acc_t(0), out + HW, HW2,
                              [](acc_t s, acc_t v) { return s + v; });
      }
    }
  });
  d_hw.select(1, 1).div_(g.C);
  d_cw.select(1, 1).div_(g.H);
  d_hc.select(1, 1).div_(g.W);
  return {d_hw, returned_cw(d_cw, g.channels_last), d_hc};
}

// ---------------------------------------------------------------- triplet_pool_backward

at::Tensor triplet_pool_backward_cpu(const at::Tensor& grad_d_hw, const at::Tensor& grad_d_cw,
                                     const at::Tensor& grad_d_hc, const at::Tensor& x_in, const at::Tensor& d_hw,
                                     const at::Tensor& d_cw, const at::Tensor& d_hc) {
  const char* op = "triplet_pool_backward";
  check_feature_map(x_in, op, "x");
  check_triplet_pool_backward_args(grad_d_hw, grad_d_cw, grad_d_hc, x_in, d_hw, d_cw, d_hc, op);
  const at::Tensor x = dense(x_in);
  const Geometry g = geometry_of(x);
  at::Tensor gx = empty_like_layout(x);
  if (x.numel() == 0) return gx;
  const bool cl = g.channels_last;
  const at::Tensor M_hw = d_hw.select(1, 0).contiguous(), M_cw = walked_cw(d_cw, cl).select(1, 0).contiguous(),
                   M_hc = d_hc.select(1, 0).contiguous();
  // Pass 1: tie counts; hw's per block, cw's and hc's whole inside each task.
  at::Tensor part = at::zeros({g.N, g.blocks, g.hw()}, acc_options(x));
  at::Tensor cnt_cw = plane_maps(g, x, Gate::CW, 1).zero_(), cnt_hc = plane_maps(g, x, Gate::HC, 1).zero_();
  at::Tensor cnt_hw = at::empty({g.N, 1, g.H, g.W}, acc_options(x));
  AK_DISPATCH_FEATURE(x, "triplet_pool_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const acc_t *m_hw = M_hw.const_data_ptr<acc_t>(), *m_cw = M_cw.const_data_ptr<acc_t>(),
                *m_hc = M_hc.const_data_ptr<acc_t>();
    acc_t *pp = part.data_ptr<acc_t>(), *c_cw = cnt_cw.data_ptr<acc_t>(), *c_hc = cnt_hc.data_ptr<acc_t>();
    const int64_t HW = g.hw(), CW = g.C * g.W, HC = g.H * g.C;
    for_channel_blocks(g, [&](int64_t n, int64_t b, int64_t c0, int64_t c1) {
      acc_t* p = pp + (n * g.blocks + b) * HW;
      for_rows(g, n, c0, c1, [&](const Row& r) {
        const auto M = runs_then_constant<const acc_t*>(cl, m_hw + n * HW + r.hw, m_cw + n * CW + r.cw,
                                                        m_hc + n * HC + r.hc);
        const auto cnt = runs_then_constant<acc_t*>(cl, p + r.hw, c_cw + n * CW + r.cw, c_hc + n * HC + r.hc);
        count_row<scalar_t>(xp + r.x, r.len, M[0], cnt[0], M[1], cnt[1], M[2], cnt[2]);
      });
    });
    sum_blocks<acc_t>(part, cnt_hw, HW);  // whole counts: exact, in any order
  });
  // a = grad_d[.., 0] / cnt and b = grad_d[.., 1] / L of each map (small planes).
  const at::Tensor gd_cw = walked_cw(grad_d_cw, cl);
  const at::Tensor a_hw = (grad_d_hw.select(1, 0) / cnt_hw.select(1, 0)).contiguous(),
                   a_cw = (gd_cw.select(1, 0) / cnt_cw.select(1, 0)).contiguous(),
                   a_hc = (grad_d_hc.select(1, 0) / cnt_hc.select(1, 0)).contiguous();
  const at::Tensor b_hw = (grad_d_hw.select(1, 1) / g.C).contiguous(), b_cw = (gd_cw.select(1, 1) / g.H).contiguous(),
                   b_hc = (grad_d_hc.select(1, 1) / g.W).contiguous();
  // Pass 2: grad_x.
  AK_DISPATCH_FEATURE(x, "triplet_pool_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    scalar_t* gxp = gx.data_ptr<scalar_t>();
    const int64_t HW = g.hw(), CW = g.C * g.W, HC = g.H * g.C;
    const acc_t *mh = M_hw.const_data_ptr<acc_t>(), *mc = M_cw.const_data_ptr<acc_t>(),
                *mx = M_hc.const_data_ptr<acc_t>(), *ah = a_hw.const_data_ptr<acc_t>(),
                *ac = a_cw.const_data_ptr<acc_t>(), *ax = a_hc.const_data_ptr<acc_t>(),
                *bh = b_hw.const_data_ptr<acc_t>(), *bc = b_cw.const_data_ptr<acc_t>(),
                *bx = b_hc.const_data_ptr<acc_t>();
    with_flag(cl, [&](auto kCL) {
      constexpr bool CL = decltype(kCL)::value;
      for_channel_blocks(g, [&](int64_t n, int64_t, int64_t c0, int64_t c1) {
        for_rows(g, n, c0, c1, [&](const Row& r) {
          const int64_t h = n * HW + r.hw, c = n * CW + r.cw, w = n * HC + r.hc;
          pool_grad_row<scalar_t, CL>(xp + r.x, gxp + r.x, r.len, {{mh + h}, {ah + h}, {bh + h}},
                                      {{mc + c}, {ac + c}, {bc + c}}, {{mx + w}, {ax + w}, {bx + w}});
        });
      });
    });
  });
  return gx;
}

// ---------------------------------------------------------------- triplet_apply (+ backward)

// The gates as the walk reads them: acc(x), contiguous, s_cw transposed in channels_last.
std::array<at::Tensor, 3> walked_gates(const at::Tensor& s_hw, const at::Tensor& s_cw, const at::Tensor& s_hc,
                                       bool channels_last) {
  return {s_hw.contiguous(), walked_cw(s_cw, channels_last), s_hc.contiguous()};
}

at::Tensor triplet_apply_cpu(const at::Tensor& x_in, const at::Tensor& s_hw_in, const at::Tensor& s_cw_in,
                             const at::Tensor& s_hc_in) {
  const char* op = "triplet_apply";
  check_feature_map(x_in, op, "x");
  check_triplet_apply_args(x_in, s_hw_in, s_cw_in, s_hc_in, op);
  const at::Tensor x = dense(x_in);
  const Geometry g = geometry_of(x);
  at::Tensor y = empty_like_layout(x);
  if (x.numel() == 0) return y;
  const auto s = walked_gates(s_hw_in, s_cw_in, s_hc_in, g.channels_last);
  const bool stream = should_stream(2 * x.nbytes());  // reads x, writes y
  AK_DISPATCH_FEATURE(x, "triplet_apply_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    scalar_t* yp = y.data_ptr<scalar_t>();
    const acc_t *sh = s[0].const_data_ptr<acc_t>(), *sc = s[1].const_data_ptr<acc_t>(),
                *sx = s[2].const_data_ptr<acc_t>();
    const int64_t HW = g.hw(), CW = g.C * g.W, HC = g.H * g.C;
    with_flag(g.channels_last, [&](auto kCL) {
      constexpr bool CL = decltype(kCL)::value;
      for_channel_blocks(g, [&](int64_t n, int64_t, int64_t c0, int64_t c1) {
        for_rows(g, n, c0, c1, [&](const Row& r) {
          apply_row<scalar_t, CL>(xp + r.x, yp + r.x, r.len, {sh + n * HW + r.hw}, {sc + n * CW + r.cw},
                                  {sx + n * HC + r.hc}, stream);
        });
        stream_fence();
      });
    });
  });
  return y;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> triplet_apply_backward_cpu(
    const at::Tensor& grad_y_in, const at::Tensor& x_in, const at::Tensor& s_hw_in, const at::Tensor& s_cw_in,
    const at::Tensor& s_hc_in) {
  const char* op = "triplet_apply_backward";
  check_feature_map(x_in, op, "x");
  check_triplet_apply_args(x_in, s_hw_in, s_cw_in, s_hc_in, op);
  const at::Tensor x = dense(x_in);
  const at::Tensor gy = walked_like_x(grad_y_in, x, op, "grad_y");
  const Geometry g = geometry_of(x);
  const bool cl = g.channels_last;
  at::Tensor gx = empty_like_layout(x);
  at::Tensor gs_hw = plane_maps(g, x, Gate::HW, 1).zero_(), gs_cw = plane_maps(g, x, Gate::CW, 1).zero_(),
             gs_hc = plane_maps(g, x, Gate::HC, 1).zero_();
  if (x.numel() == 0) return {gx, gs_hw, returned_cw(gs_cw, cl), gs_hc};
  const auto s = walked_gates(s_hw_in, s_cw_in, s_hc_in, cl);
  at::Tensor part = at::zeros({g.N, g.blocks, g.hw()}, acc_options(x));
  AK_DISPATCH_FEATURE(x, "triplet_apply_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t *xp = x.const_data_ptr<scalar_t>(), *gyp = gy.const_data_ptr<scalar_t>();
    scalar_t* gxp = gx.data_ptr<scalar_t>();
    const acc_t *sh = s[0].const_data_ptr<acc_t>(), *sc = s[1].const_data_ptr<acc_t>(),
                *sx = s[2].const_data_ptr<acc_t>();
    acc_t *pp = part.data_ptr<acc_t>(), *gc = gs_cw.data_ptr<acc_t>(), *gh = gs_hc.data_ptr<acc_t>();
    const int64_t HW = g.hw(), CW = g.C * g.W, HC = g.H * g.C;
    with_flag(cl, [&](auto kCL) {
      constexpr bool CL = decltype(kCL)::value;
      for_channel_blocks(g, [&](int64_t n, int64_t b, int64_t c0, int64_t c1) {
        acc_t* p = pp + (n * g.blocks + b) * HW;
        for_rows(g, n, c0, c1, [&](const Row& r) {
          const auto sums = runs_then_constant<acc_t*>(CL, p + r.hw, gc + n * CW + r.cw, gh + n * HC + r.hc);
          apply_grad_row<scalar_t, CL>(gyp + r.x, xp + r.x, gxp + r.x, r.len, {sh + n * HW + r.hw},
                                       {sc + n * CW + r.cw}, {sx + n * HC + r.hc}, sums[0], sums[1], sums[2]);
        });
      });
    });
    sum_blocks<acc_t>(part, gs_hw, HW);
  });
  return {gx, gs_hw, returned_cw(gs_cw, cl), gs_hc};
}

#undef AK_DISPATCH_FEATURE

}  // namespace

TORCH_LIBRARY_IMPL(attnkernels, CPU, m) {
  m.impl("triplet_pool", &triplet_pool_cpu);
  m.impl("triplet_pool_backward", &triplet_pool_backward_cpu);
  m.impl("triplet_apply", &triplet_apply_cpu);
  m.impl("triplet_apply_backward", &triplet_apply_backward_cpu);
}

}  // namespace attnkernels
