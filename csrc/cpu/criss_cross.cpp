// CPU kernels of the criss_cross hot path (CCNet's row + column attention); math in
// csrc/criss_cross_ops.cpp.
//
// No (N, H + W - 1, H, W) energy tensor: a ROW pass of tasks (n, h) and then a COLUMN pass of
// tasks (n, w), each holding one (L x L) block of energies (L = W or H) in per-thread scratch;
// the products are BLAS calls on strided views (single-threaded inside at::parallel_for).
// Every (N, C, H, W) tensor t in acc is read as (C x W) row matrices t[n, :, h, :] and (C x H)
// column matrices t[n, :, :, w]. Both have a unit stride in channels_last; in NCHW a column has
// strides (H*W, W), which BLAS cannot take, so the column pass reads a copy with each H x W
// plane transposed.
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
#include <climits>
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

// An NCHW-contiguous (N, C, H, W) tensor as (N, C, W, H) contiguous: each plane transposed.
at::Tensor transposed_planes(const at::Tensor& t) {
  return at::empty({t.size(0), t.size(1), t.size(3), t.size(2)}, t.options()).copy_(t.transpose(2, 3));
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

// rows + cols^T in t's dtype and dense layout (in place in rows where t's dtype is acc: one
// x-sized buffer fewer at the backward's peak).
at::Tensor finish(const TwoPass& b, const at::Tensor& t) {
  const bool in_acc = b.rows.scalar_type() == t.scalar_type();
  if (b.shared) return in_acc ? b.rows : empty_like_layout(dense(t)).copy_(b.rows);
  if (in_acc) return b.rows.add_(b.cols.transpose(2, 3));
  at::Tensor r = empty_like_layout(dense(t));
  at::add_out(r, b.rows, b.cols.transpose(2, 3));  // in acc, rounded once
  return r;
}

// ---- Strided matrices and BLAS -----------------------------------------------------------
// The tasks' products call the Fortran BLAS that libtorch_cpu carries (sgemm_ / dgemm_, weak
// references: null where it exports none) on raw strided matrices: at::mm_out on views costs
// dispatcher calls and tensor views per product, about a third of the forward's time at 64 x 64
// blocks. Where there is no such symbol, or a size exceeds BLAS's 32-bit ints, addmm_ on
// from_blob views does the product.

// Element (i, j) at p[i * rs + j * cs].
template <typename T>
struct Mat {
  T* p;
  int64_t rows, cols, rs, cs;
  Mat t() const { return {p, cols, rows, cs, rs}; }
  operator Mat<const T>() const { return {p, rows, cols, rs, cs}; }
};

// t[n, :, a, :] of a 4-D tensor: (size(1) x size(3)).
template <typename T>
Mat<T> slice(const at::Tensor& t, int64_t n, int64_t a) {
  return {t.data_ptr<T>() + n * t.stride(0) + a * t.stride(2), t.size(1), t.size(3), t.stride(1), t.stride(3)};
}

// A contiguous (rows x cols) scratch matrix.
template <typename T>
Mat<T> dense_mat(T* p, int64_t rows, int64_t cols) {
  return {p, rows, cols, cols, 1};
}

}  // namespace
}  // namespace attnkernels

extern "C" {
void sgemm_(const char*, const char*, const int*, const int*, const int*, const float*, const float*, const int*,
            const float*, const int*, const float*, float*, const int*) __attribute__((weak));
void dgemm_(const char*, const char*, const int*, const int*, const int*, const double*, const double*, const int*,
            const double*, const int*, const double*, double*, const int*) __attribute__((weak));
}

namespace attnkernels {
namespace {

template <typename T>
using FortranGemm = void (*)(const char*, const char*, const int*, const int*, const int*, const T*, const T*,
                             const int*, const T*, const int*, const T*, T*, const int*);

template <typename T>
FortranGemm<T> fortran_gemm() {
  if constexpr (std::is_same_v<T, double>) {
    return &dgemm_;
  } else {
    return &sgemm_;
  }
}

// X as a column-major BLAS operand: 'N' where its row stride is 1, else 'T' (row-major); a
// dimension of size 1 takes whichever stride fits. Returns the leading dimension.
template <typename T>
int64_t blas_operand(const Mat<T>& X, char& op) {
  if (X.rs == 1 || X.rows == 1) {
    op = 'N';
    return X.cols == 1 ? std::max<int64_t>(1, X.rows) : X.cs;
  }
  TORCH_INTERNAL_ASSERT(X.cs == 1 || X.cols == 1, "criss_cross: a matrix without a unit stride");
  op = 'T';
  return X.rows == 1 ? std::max<int64_t>(1, X.cols) : X.rs;
}

template <typename T>
at::Tensor as_tensor(const Mat<T>& X) {
  return at::from_blob(const_cast<std::remove_const_t<T>*>(X.p), {X.rows, X.cols}, {X.rs, X.cs},
                       at::TensorOptions().dtype(c10::CppTypeToScalarType<std::remove_const_t<T>>::value));
}

// C = alpha * A B + beta * C (beta 0: C's old values are ignored, NaN included).
template <typename T>
void gemm(const Mat<const T>& A, const Mat<const T>& B, const Mat<T>& C, T alpha, T beta) {
  const int64_t m = C.rows, n = C.cols, k = A.cols;
  if (m == 0 || n == 0) return;
  if (k == 0) {  // an empty sum: C = beta * C
    for (int64_t i = 0; i < m; ++i) {
      for (int64_t j = 0; j < n; ++j) {
        T& c = C.p[i * C.rs + j * C.cs];
        c = beta == T(0) ? T(0) : beta * c;
      }
    }
    return;
  }
  if (!(C.rs == 1 || C.rows == 1)) {  // row-major C: C^T = B^T A^T is column-major
    gemm<T>(B.t(), A.t(), C.t(), alpha, beta);
    return;
  }
  char op_a, op_b, op_c;
  const int64_t lda = blas_operand(A, op_a), ldb = blas_operand(B, op_b);
  const int64_t ldc = blas_operand(Mat<const T>(C), op_c);
  const FortranGemm<T> f = fortran_gemm<T>();
  if (f != nullptr && std::max({m, n, k, lda, ldb, ldc}) <= INT_MAX) {
    const int mi = m, ni = n, ki = k, la = lda, lb = ldb, lc = ldc;
    f(&op_a, &op_b, &mi, &ni, &ki, &alpha, A.p, &la, B.p, &lb, &beta, C.p, &lc);
    return;
  }
  at::Tensor c = as_tensor(C);
  c.addmm_(as_tensor(A), as_tensor(B), beta, alpha);
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
    const V p = softmax_exp(V::loadu(s + j) - V(shift));
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
    const V p = softmax_exp(V::loadu(s + j) - vlse) * vg;
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
void channel_dots(const Mat<const acc_t>& G, const Mat<const acc_t>& O, acc_t* R) {
  const int64_t C = G.rows, n = G.cols, gc = G.rs, gi = G.cs, oc = O.rs, oi = O.cs;
  const acc_t* g = G.p;
  const acc_t* o = O.p;
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
void forward_block(const Mat<const acc_t>& Q, const Mat<const acc_t>& K, const Mat<const acc_t>& V,
                   const Mat<acc_t>& O, acc_t* e, bool own, acc_t* m, acc_t* s) {
  const int64_t L = Q.cols;
  const Mat<acc_t> S = dense_mat(e, L, L);
  gemm<acc_t>(Q.t(), K, S, 1, 0);
  for (int64_t i = 0; i < L; ++i) {
    if (own) e[i * L + i] = -std::numeric_limits<acc_t>::infinity();
    std::tie(m[i], s[i]) = softmax_part(e + i * L, L);
  }
  gemm<acc_t>(V, S.t(), O, 1, 0);
}

// The merge of one pixel's two parts: lse, and the weights a / Z, b / Z of O_r and O_c.
template <typename acc_t>
void merge_pixel(acc_t m_r, acc_t s_r, acc_t m_c, acc_t s_c, acc_t& lse, acc_t& wr, acc_t& wc) {
  const acc_t m = nan_max(m_r, m_c);
  const acc_t a = rescale(m_r, m), b = rescale(m_c, m);
  const acc_t Z = s_r * a + s_c * b;  // 0 with no live key at all: out = 0 * inf = NaN, as torch
  // An energy of +inf: torch.logsumexp's +inf (Z is NaN here, inf - inf), whose P = exp(S - lse)
  // is 0 for the finite energies in the backward.
  lse = m == std::numeric_limits<acc_t>::infinity() ? m : m + std::log(Z);
  wr = a / Z;
  wc = b / Z;
}

// out = O_r wr + O_c wc rounded to x's dtype, y = gamma * out + x in acc, rounded once, for
// `count` contiguous elements; the weights per element (kPerElement) or one for all.
template <bool kPerElement, typename scalar_t, typename acc_t>
void write_outputs(const acc_t* o_r, const acc_t* o_c, const acc_t* wr, const acc_t* wc, const scalar_t* x,
                   scalar_t* out, scalar_t* y, acc_t gamma, int64_t count) {
  for (int64_t j = 0; j < count; ++j) {
    const int64_t i = kPerElement ? j : 0;
    const scalar_t o = static_cast<scalar_t>(o_r[j] * wr[i] + o_c[j] * wc[i]);
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
  // channels_last (so the merge reads both along c), NCHW-contiguous planes otherwise. Where x
  // is in acc they live in out and y: the merge reads each element (O_c: each plane, into
  // scratch) before it writes the same element (plane) of out and y.
  const bool in_acc = x.scalar_type() == acc;
  const at::Tensor O_r = in_acc ? out : empty_like_layout(x_dense, acc);
  const bool cl = is_channels_last(O_r);
  const at::Tensor O_c = cl ? (in_acc ? y : empty_like_layout(x_dense, acc)).transpose(2, 3)
                            : (in_acc ? y.view({N, C, W, H}) : at::empty({N, C, W, H}, O_r.options()));
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
      std::vector<acc_t> S(W * W);
      for (int64_t task = begin; task < end; ++task) {
        const int64_t n = task / H, h = task % H;
        forward_block<acc_t>(slice<acc_t>(Q.rows, n, h), slice<acc_t>(K.rows, n, h), slice<acc_t>(V.rows, n, h),
                             slice<acc_t>(O_r, n, h), S.data(), false, m_r + task * W, s_r + task * W);
      }
    });
    at::parallel_for(0, N * W, 1, [&](int64_t begin, int64_t end) {
      std::vector<acc_t> S(H * H);
      for (int64_t task = begin; task < end; ++task) {
        const int64_t n = task / W, w = task % W;
        forward_block<acc_t>(slice<acc_t>(Q.cols, n, w), slice<acc_t>(K.cols, n, w), slice<acc_t>(V.cols, n, w),
                             slice<acc_t>(O_c, n, w), S.data(), true, m_c + task * H, s_c + task * H);
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
            write_outputs<false>(orp + p * C, ocp + p * C, wr + p, wc + p, xp + p * C, outp + p * C, yp + p * C, g, C);
          }
        });
      } else {  // plane by plane, O_c's (W x H) plane transposed into scratch first
        at::parallel_for(0, N * C, 1, [&](int64_t begin, int64_t end) {
          std::vector<acc_t> plane_c(HW);
          for (int64_t plane = begin; plane < end; ++plane) {
            const int64_t n = plane / C, at_ = plane * HW;
            const acc_t* src = ocp + at_;
            for (int64_t w = 0; w < W; ++w) {
              for (int64_t h = 0; h < H; ++h) plane_c[h * W + w] = src[w * H + h];
            }
            write_outputs<true>(orp + at_, plane_c.data(), wr + n * HW, wc + n * HW, xp + at_, outp + at_, yp + at_,
                                g, HW);
          }
        });
      }
    });
  });
  return {y, out, lse};
}

// ---- Backward ----------------------------------------------------------------------------

// One row or column block: S, P = exp(S - lse), dP / gamma = G^T V, dS; then dQ = K dS^T,
// dK = Q dS, dV = dO P, each (x L), written or, where `add` says so, added into dQ, dK, dV.
template <typename acc_t>
void backward_block(const Mat<const acc_t>& Q, const Mat<const acc_t>& K, const Mat<const acc_t>& V,
                    const Mat<const acc_t>& G, const acc_t* lse, int64_t lse_step, const acc_t* R, int64_t R_step,
                    acc_t gamma, bool own, acc_t* p, acc_t* ds, const Mat<acc_t>& dQ, const Mat<acc_t>& dK,
                    const Mat<acc_t>& dV, const bool (&add)[3]) {
  const int64_t L = Q.cols;
  const Mat<acc_t> P = dense_mat(p, L, L), dS = dense_mat(ds, L, L);
  gemm<acc_t>(Q.t(), K, P, 1, 0);
  gemm<acc_t>(G.t(), V, dS, 1, 0);
  for (int64_t i = 0; i < L; ++i) {
    // The masked energy is -inf, as the Reference's: P = exp(-inf - lse) = 0 (NaN where lse is).
    if (own) p[i * L + i] = -std::numeric_limits<acc_t>::infinity();
    softmax_backward_row(p + i * L, ds + i * L, L, lse[i * lse_step], R[i * R_step], gamma);
  }
  // beta 0: the buffer's old (uninitialised) values are ignored, not multiplied
  gemm<acc_t>(K, dS.t(), dQ, 1, add[0] ? 1 : 0);
  gemm<acc_t>(Q, dS, dK, 1, add[1] ? 1 : 0);
  gemm<acc_t>(G, P, dV, 1, add[2] ? 1 : 0);  // P holds gamma * P
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
      std::vector<acc_t> P(W * W), dS(W * W);
      for (int64_t task = begin; task < end; ++task) {
        const int64_t n = task / H, h = task % H;
        acc_t* R_row = R_p + task * W;
        const Mat<const acc_t> G_r = slice<acc_t>(G.rows, n, h);
        channel_dots(G_r, Mat<const acc_t>(slice<acc_t>(Out, n, h)), R_row);
        backward_block<acc_t>(slice<acc_t>(Q.rows, n, h), slice<acc_t>(K.rows, n, h), slice<acc_t>(V.rows, n, h),
                              G_r, lse_p + task * W, 1, R_row, 1, g, false, P.data(), dS.data(),
                              slice<acc_t>(dQ.rows, n, h), slice<acc_t>(dK.rows, n, h), slice<acc_t>(dV.rows, n, h),
                              kWrite);
        acc_t sum = 0;
        for (int64_t i = 0; i < W; ++i) sum += R_row[i];
        row_R[task] = sum;
      }
    });
    at::parallel_for(0, N * W, 1, [&](int64_t begin, int64_t end) {
      std::vector<acc_t> P(H * H), dS(H * H);
      for (int64_t task = begin; task < end; ++task) {
        const int64_t n = task / W, w = task % W;
        backward_block<acc_t>(slice<acc_t>(Q.cols, n, w), slice<acc_t>(K.cols, n, w), slice<acc_t>(V.cols, n, w),
                              slice<acc_t>(G.cols, n, w), lse_p + n * HW + w, W, R_p + n * HW + w, W, g, true,
                              P.data(), dS.data(), slice<acc_t>(dQ.cols, n, w), slice<acc_t>(dK.cols, n, w),
                              slice<acc_t>(dV.cols, n, w), col_add);
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
