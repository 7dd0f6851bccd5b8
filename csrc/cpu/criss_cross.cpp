// CPU kernels of the criss_cross hot path (CCNet's row + column attention); math in
// csrc/criss_cross_ops.cpp.
//
// No (N, H + W - 1, H, W) energy tensor: a ROW pass of tasks (n, h) and then a COLUMN pass of
// tasks (n, w), each holding one (L x L) block of energies (L = W or H) in per-thread scratch.
// q, k, v (and grad_y, out) are first read into acc as (N, H, W, C) "pixels-last" tensors:
// a row is then a (W x C) matrix of row stride C and a column an (H x C) one of row stride
// W*C, both BLAS-ready views whatever layout or dtype came in (an NCHW column would have no
// unit stride). That copy is O(N C H W), like every buffer here.
//
// Forward: the row pass writes the unnormalised O_r = P V_r and each pixel's row max m_r and
// sum s_r; the column pass (diagonal h' == h excluded) merges its own m_c, s_c, O_c into them
// flash-style and leaves the normalised out and lse.
// Backward: the row pass writes (=) each row's grad_q, grad_k, grad_v rows and R; the column
// pass adds (+=) its column. Every write is task-local and every sum runs in a fixed order, so
// results do not depend on the thread count.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

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

// t (N, C, H, W), any layout and dtype, as (N, H, W, C) contiguous in acc: t itself (a view)
// when it already is channels_last in acc, else one copy.
at::Tensor pixels_last(const at::Tensor& t, at::ScalarType acc) {
  const at::Tensor p = t.permute({0, 2, 3, 1});
  if (p.scalar_type() == acc && p.is_contiguous()) return p;
  return at::empty(p.sizes(), t.options().dtype(acc)).copy_(p);
}

// Back from (N, H, W, C) acc to t's dtype and (dense) layout.
at::Tensor like_input(const at::Tensor& buf, const at::Tensor& t) {
  at::Tensor r = empty_like_layout(dense(t));
  r.copy_(buf.permute({0, 3, 1, 2}));
  return r;
}

template <typename acc_t>
acc_t dot(const acc_t* a, const acc_t* b, int64_t n) {
  using V = Vectorized<acc_t>;
  V sum(0);
  int64_t j = 0;
  for (; j + V::size() <= n; j += V::size()) sum = at::vec::fmadd(V::loadu(a + j), V::loadu(b + j), sum);
  acc_t total = reduce_sum(sum);
  for (; j < n; ++j) total += a[j] * b[j];
  return total;
}

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

// Forward softmax of one row of energies in place: P = exp(S - m), returns (m, sum). A row
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

// Backward, one query row of L keys: P = exp(S - lse) (in s), dS = gamma * P * (dP - R) in
// place of dP (in ds; dP = G V^T is dP / gamma of the contract), then s = gamma * P, the
// weights grad_v needs (dV = P^T dO, dO = gamma * grad_y).
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

// o = (o * a + oc * b) * inv_Z over n channels: the merged, normalised out of one pixel.
template <typename acc_t>
void merge_pixel(acc_t* o, const acc_t* oc, int64_t n, acc_t a, acc_t b, acc_t inv_Z) {
  using V = Vectorized<acc_t>;
  int64_t c = 0;
  const V va(a), vb(b), vz(inv_Z);
  for (; c + V::size() <= n; c += V::size()) {
    ((V::loadu(o + c) * va + V::loadu(oc + c) * vb) * vz).store(o + c);
  }
  for (; c < n; ++c) o[c] = (o[c] * a + oc[c] * b) * inv_Z;
}

// Forward row pass, task (n, h): S = Q_r K_r^T (W x W), P = exp(S - m_r) row by row, O_r = P V_r
// (unnormalised) into out's row; m_r and s_r per pixel.
template <typename acc_t>
void forward_row(const at::Tensor& Q_r, const at::Tensor& K_r, const at::Tensor& V_r, at::Tensor O_r,
                 at::Tensor& S, acc_t* m_r, acc_t* s_r) {
  const int64_t W = Q_r.size(0);
  at::mm_out(S, Q_r, K_r.t());
  acc_t* s = S.data_ptr<acc_t>();
  for (int64_t i = 0; i < W; ++i) std::tie(m_r[i], s_r[i]) = softmax_part(s + i * W, W);
  at::mm_out(O_r, S, V_r);
}

// Forward column pass, task (n, w): the column's softmax with the pixel itself (h' == h)
// excluded, merged into the row pass's partials of each pixel (h, w). O (H x C, row stride
// W*C) holds O_r and receives out; m holds m_r and receives lse; l holds s_r (both strided W).
template <typename acc_t>
void forward_column(const at::Tensor& Q_c, const at::Tensor& K_c, const at::Tensor& V_c, at::Tensor O,
                    at::Tensor& S, at::Tensor& O_c, acc_t* m, const acc_t* l, int64_t stride) {
  const int64_t H = Q_c.size(0), C = V_c.size(1), ldo = O.stride(0);
  const acc_t neg_inf = -std::numeric_limits<acc_t>::infinity();
  std::vector<acc_t> m_c(H), s_c(H);
  at::mm_out(S, Q_c, K_c.t());
  acc_t* s = S.data_ptr<acc_t>();
  for (int64_t i = 0; i < H; ++i) {
    s[i * H + i] = neg_inf;  // the pixel's own key counts once, in the row pass
    std::tie(m_c[i], s_c[i]) = softmax_part(s + i * H, H);
  }
  at::mm_out(O_c, S, V_c);
  acc_t* o = O.data_ptr<acc_t>();
  const acc_t* oc = O_c.data_ptr<acc_t>();
  for (int64_t i = 0; i < H; ++i) {
    const acc_t m_r = m[i * stride], s_r = l[i * stride];
    const acc_t mx = nan_max(m_r, m_c[i]);
    const acc_t a = rescale(m_r, mx), b = rescale(m_c[i], mx);
    const acc_t Z = s_r * a + s_c[i] * b;  // 0 with no live key at all: out = 0/0 = NaN, as torch
    merge_pixel(o + i * ldo, oc + i * C, C, a, b, acc_t(1) / Z);
    m[i * stride] = mx + std::log(Z);
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
  if (N * HW == 0) return {empty_like_layout(x_dense), empty_like_layout(x_dense), lse};
  const at::Tensor Q = pixels_last(q, acc), K = pixels_last(k, acc), V = pixels_last(v, acc);
  at::Tensor O = at::empty({N, H, W, C}, Q.options());  // out in acc, pixels last
  at::Tensor row_sum = at::empty({N, HW}, Q.options());  // s_r; lse holds m_r until merged
  AT_DISPATCH_FLOATING_TYPES(acc, "criss_cross_cpu", [&] {
    scalar_t* m = lse.data_ptr<scalar_t>();
    scalar_t* l = row_sum.data_ptr<scalar_t>();
    at::parallel_for(0, N * H, 1, [&](int64_t begin, int64_t end) {
      BelowAutograd below;
      at::Tensor S = at::empty({W, W}, Q.options());
      for (int64_t task = begin; task < end; ++task) {
        const int64_t n = task / H, h = task % H;
        forward_row<scalar_t>(Q[n][h], K[n][h], V[n][h], O[n][h], S, m + task * W, l + task * W);
      }
    });
    at::parallel_for(0, N * W, 1, [&](int64_t begin, int64_t end) {
      BelowAutograd below;
      at::Tensor S = at::empty({H, H}, Q.options());
      at::Tensor O_c = at::empty({H, C}, Q.options());
      for (int64_t task = begin; task < end; ++task) {
        const int64_t n = task / W, w = task % W;
        forward_column<scalar_t>(Q[n].select(1, w), K[n].select(1, w), V[n].select(1, w), O[n].select(1, w), S,
                                 O_c, m + n * HW + w, l + n * HW + w, W);
      }
    });
  });
  const at::Tensor out = like_input(O, x_dense);
  // y = gamma * out + x with out rounded to x's dtype first, in acc, rounded once (the Reference).
  at::Tensor y = empty_like_layout(x_dense);
  const double gamma_value = gamma.item<double>();
  if (x.scalar_type() == acc) {
    at::add_out(y, x_dense, out, gamma_value);
  } else {
    y.copy_(at::add(x_dense.to(acc), out.to(acc), gamma_value));
  }
  return {y, out, lse};
}

// Backward row pass, task (n, h): R of the row's pixels, then S, P, dP, dS of the row's W x W
// block and the row's gradients, written (=).
template <typename acc_t>
void backward_row(const at::Tensor& Q_r, const at::Tensor& K_r, const at::Tensor& V_r, const at::Tensor& G_r,
                  const at::Tensor& O_r, const acc_t* lse, acc_t* R, acc_t gamma, at::Tensor& P, at::Tensor& dS,
                  at::Tensor dQ, at::Tensor dK, at::Tensor dV) {
  const int64_t W = Q_r.size(0), C = G_r.size(1);
  const acc_t* g = G_r.data_ptr<acc_t>();
  const acc_t* o = O_r.data_ptr<acc_t>();
  for (int64_t i = 0; i < W; ++i) R[i] = dot(g + i * C, o + i * C, C);
  at::mm_out(P, Q_r, K_r.t());   // S
  at::mm_out(dS, G_r, V_r.t());  // dP / gamma
  acc_t* p = P.data_ptr<acc_t>();
  acc_t* ds = dS.data_ptr<acc_t>();
  for (int64_t i = 0; i < W; ++i) softmax_backward_row(p + i * W, ds + i * W, W, lse[i], R[i], gamma);
  at::mm_out(dQ, dS, K_r);
  at::mm_out(dK, dS.t(), Q_r);
  at::mm_out(dV, P.t(), G_r);  // P holds gamma * P: dV = P^T dO
}

// Backward column pass, task (n, w): the column's block with the diagonal excluded; its
// gradients added (+=) into column w. lse and R are strided W.
template <typename acc_t>
void backward_column(const at::Tensor& Q_c, const at::Tensor& K_c, const at::Tensor& V_c, const at::Tensor& G_c,
                     const acc_t* lse, const acc_t* R, int64_t stride, acc_t gamma, at::Tensor& P, at::Tensor& dS,
                     at::Tensor dQ, at::Tensor dK, at::Tensor dV) {
  const int64_t H = Q_c.size(0);
  at::mm_out(P, Q_c, K_c.t());
  at::mm_out(dS, G_c, V_c.t());
  acc_t* p = P.data_ptr<acc_t>();
  acc_t* ds = dS.data_ptr<acc_t>();
  for (int64_t i = 0; i < H; ++i) {
    // -inf, as the Reference's masked energy: P = exp(-inf - lse) is 0 (NaN where lse is).
    p[i * H + i] = -std::numeric_limits<acc_t>::infinity();
    softmax_backward_row(p + i * H, ds + i * H, H, lse[i * stride], R[i * stride], gamma);
  }
  dQ.addmm_(dS, K_c);
  dK.addmm_(dS.t(), Q_c);
  dV.addmm_(P.t(), G_c);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> criss_cross_backward_cpu(
    const at::Tensor& grad_y, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& gamma, const at::Tensor& out, const at::Tensor& lse) {
  check_criss_cross_backward_args(grad_y, q, k, v, gamma, out, lse, "criss_cross_backward");
  const at::ScalarType acc = acc_type(out.scalar_type());
  const int64_t N = out.size(0), C = out.size(1), H = out.size(2), W = out.size(3), HW = H * W;
  const int64_t D = q.size(1);
  if (N * HW == 0) {  // no pixel: empty gradients, grad_gamma = an empty sum
    return {empty_like_layout(dense(q)), empty_like_layout(dense(k)), empty_like_layout(dense(v)),
            at::zeros_like(gamma)};
  }
  const at::Tensor Q = pixels_last(q, acc), K = pixels_last(k, acc), V = pixels_last(v, acc);
  const at::Tensor G = pixels_last(grad_y, acc), Out = pixels_last(out, acc);
  const at::Tensor lse_c = lse.contiguous();
  at::Tensor R = at::empty({N, HW}, Q.options());
  std::vector<double> row_R(N * H);  // sum of R per row task, summed in order below
  at::Tensor dQ = at::empty({N, H, W, D}, Q.options()), dK = at::empty_like(dQ);
  at::Tensor dV = at::empty({N, H, W, C}, Q.options());
  double grad_gamma_value = 0;
  AT_DISPATCH_FLOATING_TYPES(acc, "criss_cross_backward_cpu", [&] {
    const scalar_t g = static_cast<scalar_t>(gamma.item<double>());
    const scalar_t* lse_p = lse_c.data_ptr<scalar_t>();
    scalar_t* R_p = R.data_ptr<scalar_t>();
    at::parallel_for(0, N * H, 1, [&](int64_t begin, int64_t end) {
      BelowAutograd below;
      at::Tensor P = at::empty({W, W}, Q.options()), dS = at::empty_like(P);
      for (int64_t task = begin; task < end; ++task) {
        const int64_t n = task / H, h = task % H;
        scalar_t* R_row = R_p + task * W;
        backward_row<scalar_t>(Q[n][h], K[n][h], V[n][h], G[n][h], Out[n][h], lse_p + task * W, R_row, g, P, dS,
                               dQ[n][h], dK[n][h], dV[n][h]);
        scalar_t sum = 0;
        for (int64_t i = 0; i < W; ++i) sum += R_row[i];
        row_R[task] = sum;
      }
    });
    at::parallel_for(0, N * W, 1, [&](int64_t begin, int64_t end) {
      BelowAutograd below;
      at::Tensor P = at::empty({H, H}, Q.options()), dS = at::empty_like(P);
      for (int64_t task = begin; task < end; ++task) {
        const int64_t n = task / W, w = task % W;
        backward_column<scalar_t>(Q[n].select(1, w), K[n].select(1, w), V[n].select(1, w), G[n].select(1, w),
                                  lse_p + n * HW + w, R_p + n * HW + w, W, g, P, dS, dQ[n].select(1, w),
                                  dK[n].select(1, w), dV[n].select(1, w));
      }
    });
    scalar_t total = 0;  // grad_gamma = sum R, the rows' partials in row order: thread-count independent
    for (const double part : row_R) total += static_cast<scalar_t>(part);
    grad_gamma_value = total;
  });
  at::Tensor grad_gamma =
      at::full(gamma.sizes(), grad_gamma_value, gamma.options().dtype(acc)).to(gamma.scalar_type());
  return {like_input(dQ, q), like_input(dK, k), like_input(dV, v), grad_gamma};
}

}  // namespace

TORCH_LIBRARY_IMPL(attnkernels, CPU, m) {
  m.impl("criss_cross", &criss_cross_cpu);
  m.impl("criss_cross_backward", &criss_cross_backward_cpu);
}

}  // namespace attnkernels
