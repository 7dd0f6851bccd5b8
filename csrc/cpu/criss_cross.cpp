// CPU kernels of the criss_cross hot path (CCNet's row + column attention); math in
// csrc/criss_cross_ops.cpp.
//
// No (N, H + W - 1, H, W) energy tensor: a ROW pass of tasks (n, h) and then a COLUMN pass of
// tasks (n, w), each holding one (L x L) block of energies (L = W or H) in per-thread scratch;
// the products are BLAS calls on strided views (single-threaded inside at::parallel_for).
// Every (N, C, H, W) tensor t in acc is read as (C x W) row matrices t[n, :, h, :] and (C x H)
// column matrices t[n, :, :, w]. Both have a unit stride in channels_last; in NCHW a column has
// strides (H*W, W), which BLAS cannot take, so the column pass reads a copy with each H x W
// plane transposed (one L1-sized plane at a time; ATen's copy of such a view is slow).
//
// Forward: the row pass writes the unnormalised O_r = V_r P^T and each pixel's row max m_r and
// sum s_r; the column pass (diagonal h' == h excluded) its O_c, m_c, s_c; a last elementwise
// pass merges them flash-style per pixel and writes out, y and lse.
// Backward: the row pass writes (=) each row's gradient rows and R; the column pass writes its
// columns (into a transposed buffer in NCHW, summed with the rows' at the end) or adds (+=)
// them (channels_last, where a column is a view of the same buffer). Every write is task-local
// and every sum runs in a fixed order: results do not depend on the thread count.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <tuple>
#include <utility>
#include <vector>

#include "attnkernels/cpu_vec.h"
#include "attnkernels/criss_cross.h"

namespace attnkernels {
namespace {

using at::vec::Vectorized;

// ---- Layout plumbing -------------------------------------------------------------------

// dst[p][j][i] = src[p][i][j] + (add ? add[p][i][j] : 0) for `planes` (rows x cols) planes,
// all contiguous, converting the dtype.
template <typename src_t, typename dst_t>
void transpose_planes(const src_t* src, const src_t* add, dst_t* dst, int64_t planes, int64_t rows, int64_t cols) {
  const int64_t size = rows * cols;
  at::parallel_for(0, planes, 1, [&](int64_t begin, int64_t end) {
    constexpr int64_t kTile = 16;
    for (int64_t p = begin; p < end; ++p) {
      const src_t* s = src + p * size;
      dst_t* d = dst + p * size;
      for (int64_t i0 = 0; i0 < rows; i0 += kTile) {
        const int64_t i1 = std::min(rows, i0 + kTile);
        for (int64_t j0 = 0; j0 < cols; j0 += kTile) {
          const int64_t j1 = std::min(cols, j0 + kTile);
          for (int64_t j = j0; j < j1; ++j) {
            for (int64_t i = i0; i < i1; ++i) {
              src_t value = s[i * cols + j];
              if (add != nullptr) value += add[p * size + j * rows + i];
              d[j * rows + i] = static_cast<dst_t>(value);
            }
          }
        }
      }
    }
  });
}

// An NCHW-contiguous (N, C, H, W) tensor in acc as (N, C, W, H) contiguous.
at::Tensor transposed_planes(const at::Tensor& t) {
  at::Tensor r = at::empty({t.size(0), t.size(1), t.size(3), t.size(2)}, t.options());
  AT_DISPATCH_FLOATING_TYPES(t.scalar_type(), "criss_cross_transpose", [&] {
    transpose_planes<scalar_t, scalar_t>(t.const_data_ptr<scalar_t>(), nullptr, r.data_ptr<scalar_t>(),
                                         t.size(0) * t.size(1), t.size(2), t.size(3));
  });
  return r;
}

bool is_channels_last(const at::Tensor& t) { return layout_of(t) == Layout::ChannelsLast; }

// The two passes' views of one input in acc: `rows` (N, C, H, W) and `cols` (N, C, W, H), both
// with a unit stride in their last two dims' matrices. channels_last: one tensor; else a copy.
struct PassViews {
  at::Tensor rows, cols;
};

PassViews pass_views(const at::Tensor& t, at::ScalarType acc) {
  at::Tensor r = dense(t);
  if (r.scalar_type() != acc) r = r.to(acc);  // half read in acc; keeps the dense layout
  if (is_channels_last(r)) return {r, r.transpose(2, 3)};
  return {r, transposed_planes(r)};
}

// A buffer both passes write, in acc and t's layout: `rows` (N, C, H, W) and `cols`
// (N, C, W, H). channels_last: cols is a view of rows (`shared`; the column pass adds); NCHW:
// a separate transposed buffer (the column pass writes, `finish` sums).
struct TwoPass {
  at::Tensor rows, cols;
  bool shared;
};

TwoPass two_pass_buffer(const at::Tensor& t, at::ScalarType acc) {
  at::Tensor rows = empty_like_layout(t, acc);
  if (is_channels_last(rows)) return {rows, rows.transpose(2, 3), true};
  return {rows, at::empty({t.size(0), t.size(1), t.size(3), t.size(2)}, rows.options()), false};
}

// rows + cols^T in t's dtype and dense layout.
at::Tensor finish(const TwoPass& b, const at::Tensor& t) {
  at::Tensor r = empty_like_layout(dense(t));
  if (b.shared) return b.rows.scalar_type() == r.scalar_type() ? b.rows : r.copy_(b.rows);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, r.scalar_type(), "criss_cross_finish", [&] {
    using dst_t = scalar_t;
    AT_DISPATCH_FLOATING_TYPES(b.rows.scalar_type(), "criss_cross_finish", [&] {
      // cols (N, C, W, H) transposed onto rows (N, C, H, W)
      transpose_planes<scalar_t, dst_t>(b.cols.const_data_ptr<scalar_t>(), b.rows.const_data_ptr<scalar_t>(),
                                        r.data_ptr<dst_t>(), r.size(0) * r.size(1), r.size(3), r.size(2));
    });
  });
  return r;
}

// ---- Row vector loops --------------------------------------------------------------------

// Max of n values; a NaN among them makes it NaN (at::vec::maximum and nan_max propagate it),
// so a NaN energy poisons its pixel as torch's logsumexp does.
template <typename acc_t>
acc_t max_of(const acc_t* s, int64_t n) {
  using V = Vectorized<acc_t>;
  acc_t m = -std::numeric_limits<acc_t>::infinity();
  int64_t j = 0;
  if (n >= V::size()) {
    V mv = V::loadu(s);
    for (j = V::size(); j + V::size() <= n; j += V::size()) mv = at::vec::maximum(mv, V::loadu(s + j));
    m = reduce_max(mv);
  }
  for (; j < n; ++j) m = nan_max(m, s[j]);
  return m;
}

// s[:n] = exp(s - shift) in place, returning the sum.
template <typename acc_t>
acc_t exp_sum(acc_t* s, int64_t n, acc_t shift) {
  using V = Vectorized<acc_t>;
  V sum(0);
  int64_t j = 0;
  for (; j + V::size() <= n; j += V::size()) {
    const V p = (V::loadu(s + j) - V(shift)).exp();
    p.store(s + j);
    sum = sum + p;
  }
  acc_t total = reduce_sum(sum);
  for (; j < n; ++j) {
    s[j] = std::exp(s[j] - shift);
    total += s[j];
  }
  return total;
}

// Forward softmax part of one row of energies in place: P = exp(S - m); returns (m, sum). A row
// with no live entry (all -inf: a column of H == 1, or -inf energies) is P = 0, sum 0, m = -inf,
// not exp(-inf - -inf) = NaN: the other pass may still hold live keys for the pixel.
template <typename acc_t>
std::pair<acc_t, acc_t> softmax_part(acc_t* s, int64_t n) {
  const acc_t m = max_of(s, n);
  if (m == -std::numeric_limits<acc_t>::infinity()) {
    std::fill_n(s, n, acc_t(0));
    return {m, acc_t(0)};
  }
  return {m, exp_sum(s, n, m)};
}

// Weight exp(part_max - m) of one pass's partial sums in the merged softmax; 0 for a pass with
// no live key (its sums are 0; exp(-inf - -inf) would be NaN).
template <typename acc_t>
acc_t rescale(acc_t part_max, acc_t m) {
  return part_max == -std::numeric_limits<acc_t>::infinity() ? acc_t(0) : std::exp(part_max - m);
}

// Backward, one query row of n keys: P = exp(S - lse) (from s), dS = gamma * P * (dP - R) in
// place of dP (ds holds G^T V, the contract's dP / gamma), then s = gamma * P, the weights of
// grad_v (dV = dO P, dO = gamma * grad_y).
template <typename acc_t>
void softmax_backward_row(acc_t* s, acc_t* ds, int64_t n, acc_t lse, acc_t R, acc_t gamma) {
  using V = Vectorized<acc_t>;
  int64_t j = 0;
  const V vlse(lse), vR(R), vg(gamma);
  for (; j + V::size() <= n; j += V::size()) {
    const V p = (V::loadu(s + j) - vlse).exp() * vg;
    (p * (V::loadu(ds + j) - vR)).store(ds + j);
    p.store(s + j);
  }
  for (; j < n; ++j) {
    const acc_t p = std::exp(s[j] - lse) * gamma;
    ds[j] = p * (ds[j] - R);
    s[j] = p;
  }
}

// R[i] = sum_c G[c, i] * O[c, i] over a (C x n) pair of strided matrices, c in order.
template <typename acc_t>
void channel_dots(const at::Tensor& G, const at::Tensor& O, acc_t* R) {
  const int64_t C = G.size(0), n = G.size(1);
  const int64_t gc = G.stride(0), gi = G.stride(1), oc = O.stride(0), oi = O.stride(1);
  const acc_t* g = G.const_data_ptr<acc_t>();
  const acc_t* o = O.const_data_ptr<acc_t>();
  if (gc == 1 && oc == 1) {  // channels_last: one contiguous dot per pixel
    using V = Vectorized<acc_t>;
    for (int64_t i = 0; i < n; ++i) {
      const acc_t* gp = g + i * gi;
      const acc_t* op = o + i * oi;
      V sum(0);
      int64_t c = 0;
      for (; c + V::size() <= C; c += V::size()) sum = at::vec::fmadd(V::loadu(gp + c), V::loadu(op + c), sum);
      acc_t total = reduce_sum(sum);
      for (; c < C; ++c) total += gp[c] * op[c];
      R[i] = total;
    }
    return;
  }
  std::fill_n(R, n, acc_t(0));
  if (gi == 1 && oi == 1) {  // NCHW: channel by channel, along the row
    for (int64_t c = 0; c < C; ++c) {
      const acc_t* gp = g + c * gc;
      const acc_t* op = o + c * oc;
      for (int64_t i = 0; i < n; ++i) R[i] += gp[i] * op[i];
    }
    return;
  }
  for (int64_t c = 0; c < C; ++c) {
    for (int64_t i = 0; i < n; ++i) R[i] += g[c * gc + i * gi] * o[c * oc + i * oi];
  }
}

// ---- Forward -----------------------------------------------------------------------------

// One row (n, h) or column (n, w) block of L queries and keys: S = Q^T K (L x L), the softmax
// parts (m, s) per query, O = V P^T (C x L) unnormalised. `own` excludes the diagonal (the
// column pass: the pixel itself counts once, in the row pass).
template <typename acc_t>
void forward_block(const at::Tensor& Q, const at::Tensor& K, const at::Tensor& V, at::Tensor O, at::Tensor& S,
                   bool own, acc_t* m, acc_t* s) {
  const int64_t L = Q.size(1);
  at::mm_out(S, Q.t(), K);
  acc_t* e = S.data_ptr<acc_t>();
  for (int64_t i = 0; i < L; ++i) {
    if (own) e[i * L + i] = -std::numeric_limits<acc_t>::infinity();
    std::tie(m[i], s[i]) = softmax_part(e + i * L, L);
  }
  at::mm_out(O, V, S.t());
}

// The merge of one pixel's two parts: lse, and the weights a / Z, b / Z of O_r and O_c.
template <typename acc_t>
void merge_pixel(acc_t m_r, acc_t s_r, acc_t m_c, acc_t s_c, acc_t& lse, acc_t& wr, acc_t& wc) {
  const acc_t m = nan_max(m_r, m_c);
  const acc_t a = rescale(m_r, m), b = rescale(m_c, m);
  const acc_t Z = s_r * a + s_c * b;  // 0 with no live key at all: out = 0 * inf = NaN, as torch
  lse = m + std::log(Z);
  wr = a / Z;
  wc = b / Z;
}

// out = O_r wr + O_c wc rounded to x's dtype, y = gamma * out + x in acc, rounded once, for
// `count` elements along out's unit stride; O_c, wr and wc advance by their own steps.
template <typename scalar_t, typename acc_t>
void write_outputs(const acc_t* o_r, const acc_t* o_c, int64_t c_step, const acc_t* wr, const acc_t* wc,
                   int64_t w_step, const scalar_t* x, scalar_t* out, scalar_t* y, acc_t gamma, int64_t count) {
  for (int64_t j = 0; j < count; ++j) {
    const scalar_t o = static_cast<scalar_t>(o_r[j] * wr[j * w_step] + o_c[j * c_step] * wc[j * w_step]);
    out[j] = o;
    y[j] = static_cast<scalar_t>(gamma * static_cast<acc_t>(o) + static_cast<acc_t>(x[j]));
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> criss_cross_cpu(const at::Tensor& q, const at::Tensor& k,
                                                                const at::Tensor& v, const at::Tensor& x,
                                                                const at::Tensor& gamma) {
  check_criss_cross_args(q, k, v, x, gamma, "criss_cross");
  const at::ScalarType acc = acc_type(x.scalar_type());
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3), HW = H * W;
  const at::Tensor x_dense = dense(x);
  at::Tensor lse = at::empty({N, HW}, x.options().dtype(acc));
  at::Tensor out = empty_like_layout(x_dense), y = empty_like_layout(x_dense);
  if (N * HW == 0) return {y, out, lse};
  const PassViews Q = pass_views(q, acc), K = pass_views(k, acc), V = pass_views(v, acc);
  // O_r in x's layout; O_c (N, C, W, H) a transposed view of x's layout where that is
  // channels_last (so the merge reads both along c), NCHW-contiguous planes otherwise.
  const at::Tensor O_r = empty_like_layout(x_dense, acc);
  const bool cl = is_channels_last(O_r);
  const at::Tensor O_c = cl ? empty_like_layout(x_dense, acc).transpose(2, 3) : at::empty({N, C, W, H}, O_r.options());
  // m_r, s_r per pixel (n, h, w); m_c, s_c per pixel as (n, w, h); then wr, wc the merged weights.
  at::Tensor stats = at::empty({6, N, HW}, O_r.options());
  const double gamma_value = gamma.item<double>();
  AT_DISPATCH_FLOATING_TYPES(acc, "criss_cross_cpu", [&] {
    using acc_t = scalar_t;
    acc_t* m_r = stats[0].data_ptr<acc_t>();
    acc_t* s_r = stats[1].data_ptr<acc_t>();
    acc_t* m_c = stats[2].data_ptr<acc_t>();
    acc_t* s_c = stats[3].data_ptr<acc_t>();
    acc_t* wr = stats[4].data_ptr<acc_t>();
    acc_t* wc = stats[5].data_ptr<acc_t>();
    at::parallel_for(0, N * H, 1, [&](int64_t begin, int64_t end) {
      BelowAutograd below;
      at::Tensor S = at::empty({W, W}, O_r.options());
      for (int64_t task = begin; task < end; ++task) {
        const int64_t n = task / H, h = task % H;
        forward_block<acc_t>(Q.rows[n].select(1, h), K.rows[n].select(1, h), V.rows[n].select(1, h),
                             O_r[n].select(1, h), S, false, m_r + task * W, s_r + task * W);
      }
    });
    at::parallel_for(0, N * W, 1, [&](int64_t begin, int64_t end) {
      BelowAutograd below;
      at::Tensor S = at::empty({H, H}, O_r.options());
      for (int64_t task = begin; task < end; ++task) {
        const int64_t n = task / W, w = task % W;
        forward_block<acc_t>(Q.cols[n].select(1, w), K.cols[n].select(1, w), V.cols[n].select(1, w),
                             O_c[n].select(1, w), S, true, m_c + task * H, s_c + task * H);
      }
    });
    acc_t* lse_p = lse.data_ptr<acc_t>();
    at::parallel_for(0, N * H, 64, [&](int64_t begin, int64_t end) {
      for (int64_t task = begin; task < end; ++task) {
        const int64_t n = task / H, h = task % H;
        for (int64_t w = 0; w < W; ++w) {
          const int64_t p = task * W + w, pc = (n * W + w) * H + h;
          merge_pixel(m_r[p], s_r[p], m_c[pc], s_c[pc], lse_p[p], wr[p], wc[p]);
        }
      }
    });
    const acc_t g = static_cast<acc_t>(gamma_value);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "criss_cross_out", [&] {
      const scalar_t* xp = x_dense.const_data_ptr<scalar_t>();
      scalar_t* outp = out.data_ptr<scalar_t>();
      scalar_t* yp = y.data_ptr<scalar_t>();
      const acc_t* orp = O_r.const_data_ptr<acc_t>();
      const acc_t* ocp = O_c.const_data_ptr<acc_t>();
      if (cl) {  // pixel by pixel, channels contiguous in every tensor
        at::parallel_for(0, N * HW, 16, [&](int64_t begin, int64_t end) {
          for (int64_t p = begin; p < end; ++p) {
            write_outputs(orp + p * C, ocp + p * C, 1, wr + p, wc + p, 0, xp + p * C, outp + p * C, yp + p * C, g, C);
          }
        });
      } else {  // plane (n, c) by row h: O_c read across its transposed plane
        at::parallel_for(0, N * C, 1, [&](int64_t begin, int64_t end) {
          for (int64_t plane = begin; plane < end; ++plane) {
            const int64_t n = plane / C;
            for (int64_t h = 0; h < H; ++h) {
              const int64_t at_ = plane * HW + h * W;
              write_outputs(orp + at_, ocp + plane * HW + h, H, wr + n * HW + h * W, wc + n * HW + h * W, 1,
                            xp + at_, outp + at_, yp + at_, g, W);
            }
          }
        });
      }
    });
  });
  return {y, out, lse};
}

// ---- Backward ----------------------------------------------------------------------------

// One row or column block: S, P = exp(S - lse), dP / gamma = G^T V, dS; then dQ = K dS^T,
// dK = Q dS, dV = dO P, each (x L), written or, where `add` says so, added into the given views.
template <typename acc_t>
void backward_block(const at::Tensor& Q, const at::Tensor& K, const at::Tensor& V, const at::Tensor& G,
                    const acc_t* lse, int64_t lse_step, const acc_t* R, int64_t R_step, acc_t gamma, bool own,
                    at::Tensor& P, at::Tensor& dS, at::Tensor dQ, at::Tensor dK, at::Tensor dV, const bool (&add)[3]) {
  const int64_t L = Q.size(1);
  at::mm_out(P, Q.t(), K);
  at::mm_out(dS, G.t(), V);
  acc_t* p = P.data_ptr<acc_t>();
  acc_t* ds = dS.data_ptr<acc_t>();
  for (int64_t i = 0; i < L; ++i) {
    // The masked energy is -inf, as the Reference's: P = exp(-inf - lse) = 0 (NaN where lse is).
    if (own) p[i * L + i] = -std::numeric_limits<acc_t>::infinity();
    softmax_backward_row(p + i * L, ds + i * L, L, lse[i * lse_step], R[i * R_step], gamma);
  }
  // beta 0: the buffer's old (uninitialised) values are ignored, not multiplied
  dQ.addmm_(K, dS.t(), add[0] ? 1.0 : 0.0);
  dK.addmm_(Q, dS, add[1] ? 1.0 : 0.0);
  dV.addmm_(G, P, add[2] ? 1.0 : 0.0);  // P holds gamma * P
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> criss_cross_backward_cpu(
    const at::Tensor& grad_y, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& gamma, const at::Tensor& out, const at::Tensor& lse) {
  check_criss_cross_backward_args(grad_y, q, k, v, gamma, out, lse, "criss_cross_backward");
  const at::ScalarType acc = acc_type(out.scalar_type());
  const int64_t N = out.size(0), H = out.size(2), W = out.size(3), HW = H * W;
  if (N * HW == 0) {  // no pixel: empty gradients, grad_gamma an empty sum
    return {empty_like_layout(dense(q)), empty_like_layout(dense(k)), empty_like_layout(dense(v)),
            at::zeros_like(gamma)};
  }
  const PassViews Q = pass_views(q, acc), K = pass_views(k, acc), V = pass_views(v, acc);
  const PassViews G = pass_views(grad_y, acc);
  at::Tensor Out = dense(out);
  if (Out.scalar_type() != acc) Out = Out.to(acc);
  const at::Tensor lse_c = lse.contiguous();
  const TwoPass dQ = two_pass_buffer(dense(q), acc), dK = two_pass_buffer(dense(k), acc),
                dV = two_pass_buffer(dense(v), acc);
  at::Tensor R = at::empty({N, HW}, lse_c.options());
  std::vector<double> row_R(N * H);  // sum of R per row task, summed in task order below
  double grad_gamma_value = 0;
  // The row pass writes; the column pass adds where its column is a view of the rows' buffer.
  const bool kWrite[3] = {false, false, false};
  const bool col_add[3] = {dQ.shared, dK.shared, dV.shared};
  AT_DISPATCH_FLOATING_TYPES(acc, "criss_cross_backward_cpu", [&] {
    using acc_t = scalar_t;
    const acc_t g = static_cast<acc_t>(gamma.item<double>());
    const acc_t* lse_p = lse_c.const_data_ptr<acc_t>();
    acc_t* R_p = R.data_ptr<acc_t>();
    at::parallel_for(0, N * H, 1, [&](int64_t begin, int64_t end) {
      BelowAutograd below;
      at::Tensor P = at::empty({W, W}, R.options()), dS = at::empty_like(P);
      for (int64_t task = begin; task < end; ++task) {
        const int64_t n = task / H, h = task % H;
        acc_t* R_row = R_p + task * W;
        const at::Tensor G_r = G.rows[n].select(1, h);
        channel_dots(G_r, Out[n].select(1, h), R_row);
        backward_block<acc_t>(Q.rows[n].select(1, h), K.rows[n].select(1, h), V.rows[n].select(1, h), G_r,
                              lse_p + task * W, 1, R_row, 1, g, false, P, dS, dQ.rows[n].select(1, h),
                              dK.rows[n].select(1, h), dV.rows[n].select(1, h), kWrite);
        acc_t sum = 0;
        for (int64_t i = 0; i < W; ++i) sum += R_row[i];
        row_R[task] = sum;
      }
    });
    at::parallel_for(0, N * W, 1, [&](int64_t begin, int64_t end) {
      BelowAutograd below;
      at::Tensor P = at::empty({H, H}, R.options()), dS = at::empty_like(P);
      for (int64_t task = begin; task < end; ++task) {
        const int64_t n = task / W, w = task % W;
        backward_block<acc_t>(Q.cols[n].select(1, w), K.cols[n].select(1, w), V.cols[n].select(1, w),
                              G.cols[n].select(1, w), lse_p + n * HW + w, W, R_p + n * HW + w, W, g, true, P, dS,
                              dQ.cols[n].select(1, w), dK.cols[n].select(1, w), dV.cols[n].select(1, w), col_add);
      }
    });
    acc_t total = 0;  // grad_gamma = sum R: the rows' partials in row order, for any thread count
    for (const double part : row_R) total += static_cast<acc_t>(part);
    grad_gamma_value = total;
  });
  at::Tensor grad_gamma =
      at::full(gamma.sizes(), grad_gamma_value, gamma.options().dtype(acc)).to(gamma.scalar_type());
  return {finish(dQ, q), finish(dK, k), finish(dV, v), grad_gamma};
}

}  // namespace

TORCH_LIBRARY_IMPL(attnkernels, CPU, m) {
  m.impl("criss_cross", &criss_cross_cpu);
  m.impl("criss_cross_backward", &criss_cross_backward_cpu);
}

}  // namespace attnkernels
