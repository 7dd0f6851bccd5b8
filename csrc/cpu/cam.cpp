// CPU kernels of the cam hot path (DANet's channel attention); math in csrc/cam_ops.cpp.
//
// Every product is a batched BLAS GEMM over the N samples (at::bmm / baddbmm_: MKL or OpenBLAS
// with their own threads), and the C x C softmax work between them runs in vector loops, one
// task per attention row, in parallel. X = x[n] as (C, P) is read through x's strides: for
// channels_last x it is the transposed view of a (P, C) matrix, which BLAS takes as a
// transposed operand, so neither layout is copied (half inputs are widened to fp32 once).
//
// Forward: E = X X^T (gram(): only its blocks on and above the diagonal, where that saves time);
// each row of E becomes attn = softmax(rowmin(E) - E) with the weights below acc's smallest
// normal number flushed to 0 (subnormal operands can slow the next GEMM tenfold on some CPUs);
// then y = X + gamma * attn X is one GEMM written straight into y (fp32/fp64) or an acc buffer
// rounded once into y (half), oriented so that BLAS writes it contiguously in x's layout. The
// "+ X" rides in the GEMM: as M = I + gamma * attn when C <= 2P (fold_identity), else as a copy
// of X that the GEMM accumulates into.
// Backward: G = g X^T (one GEMM); per row, dA = gamma * G, dE = -attn * (dA - rowsum(dA * attn))
// and the row's share of grad_gamma = sum(attn * G); then M2 = dE + dE^T (and M1 = I + gamma *
// attn^T when folded) in cache-sized tiles; grad_x = g + gamma * attn^T g + M2 X is two GEMMs
// into one buffer. grad_gamma sums one partial per row in row order: the same bits whatever the
// thread count. No atomics; the GEMMs are MKL's/OpenBLAS's, deterministic for a thread count.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>

#include "attnkernels/cam.h"
#include "attnkernels/cpu_spatial_pool.h"
#include "attnkernels/cpu_vec.h"

namespace attnkernels {
namespace {

using at::vec::Vectorized;
using cpu_spatial::checked_x;

// Attention rows per parallel task: at least ~16K values, so small C still amortises a task.
int64_t row_grain(int64_t C) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(C, 1)); }

// out = a @ b, or out += alpha * (a @ b) when `accumulate`, batched. out is (N, C, P) in x's
// layout: a channels_last out is contiguous as out^T, so it takes out^T = b^T a^T, and BLAS
// writes it in place instead of through a temporary.
void product(const at::Tensor& out, const at::Tensor& a, const at::Tensor& b, bool accumulate, double alpha = 1.0) {
  const bool transposed = !out.is_contiguous() && out.transpose(1, 2).is_contiguous();
  at::Tensor o = transposed ? out.transpose(1, 2) : out;
  const at::Tensor l = transposed ? b.transpose(1, 2) : a, r = transposed ? a.transpose(1, 2) : b;
  if (accumulate) {
    o.baddbmm_(l, r, 1.0, alpha);
  } else {
    at::bmm_out(o, l, r);
  }
}

// E = X X^T for each sample. E is symmetric, so where the product is compute-bound (P >= C, CAM's
// usual input) only the blocks on and above the diagonal are multiplied: row block r (kGramRows
// rows) times X's rows from r's first on, one GEMM per block, then each entry below the blocks
// is copied from its mirror. For k blocks that is (k + 1) / 2k of the multiply-adds: 62.5 % at
// C = 512. Where P < C the C*C writes and the copy cost more than the products saved (measured
// on 2 cores: 1024 x 196 at par, 2048 x 49 twice as slow), so E is one GEMM there.
constexpr int64_t kGramRows = 128;

bool gram_by_blocks(int64_t C, int64_t P) { return C > kGramRows && P >= C; }

// Below the row blocks, entry (i, j) with j < i's block start, from its mirror (j, i), which a
// block GEMM wrote; kTile x kTile tiles so that the transposed reads stay in L1.
template <typename acc_t>
void mirror_below_blocks(acc_t* E, int64_t N, int64_t C) {
  constexpr int64_t kTile = 32;
  const int64_t row_tiles = (C + kTile - 1) / kTile;
  at::parallel_for(0, N * row_tiles, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      acc_t* e = E + (t / row_tiles) * C * C;
      const int64_t i0 = (t % row_tiles) * kTile, i1 = std::min(C, i0 + kTile);
      for (int64_t j0 = 0; j0 < i1; j0 += kTile) {
        for (int64_t i = i0; i < i1; ++i) {
          const int64_t j1 = std::min(j0 + kTile, i / kGramRows * kGramRows);
          for (int64_t j = j0; j < j1; ++j) e[i * C + j] = e[j * C + i];
        }
      }
    }
  });
}

at::Tensor gram(const at::Tensor& X) {
  const int64_t N = X.size(0), C = X.size(1), P = X.size(2);
  if (!gram_by_blocks(C, P)) return at::bmm(X, X.transpose(1, 2)).contiguous();
  at::Tensor E = at::empty({N, C, C}, X.options());
  for (int64_t r0 = 0; r0 < C; r0 += kGramRows) {
    const int64_t rows = std::min(kGramRows, C - r0);
    at::Tensor block = E.narrow(1, r0, rows).narrow(2, r0, C - r0);  // a view of E
    at::bmm_out(block, X.narrow(1, r0, rows), X.narrow(1, r0, C - r0).transpose(1, 2));
  }
  AT_DISPATCH_FLOATING_TYPES(E.scalar_type(), "cam_gram", [&] { mirror_below_blocks(E.data_ptr<scalar_t>(), N, C); });
  return E;
}

// y = X + gamma * attn X (and backward's g + gamma * attn^T g) is one GEMM either way:
// - folded (C <= 2P): M = I + gamma * attn, written in the pass that makes attn (C*C values),
//   and out = M X, so no copy of X (C*P values) into the output comes first; gamma = 0 gives
//   M = I exactly (otherwise 1 + gamma * attn_ii rounds once more: about one ulp of x in acc);
// - otherwise (C > 2P, late small maps): out = X copied, then out += gamma * attn X with
//   gamma as BLAS's alpha.
bool fold_identity(int64_t C, int64_t P) { return C <= 2 * P; }

// out += gamma * (a @ b). gamma goes to BLAS as alpha when it is finite and nonzero; otherwise
// gamma * a is formed, because BLAS skips the product at alpha = 0, where the contract's
// 0 * (a b) is NaN wherever a b is NaN or infinite.
void add_scaled_product(const at::Tensor& out, const at::Tensor& a, const at::Tensor& b, double gamma) {
  const bool in_blas = std::isfinite(gamma) && gamma != 0.0;
  product(out, in_blas ? a : a * gamma, b, /*accumulate=*/true, in_blas ? gamma : 1.0);
}

// One row of E (C values) in place: attn = softmax(rowmin(E) - E), written as torch.softmax
// computes it (shift by the max of its input, which is 0 unless the row holds NaN or inf), then
// every weight below the smallest normal number set to 0; NaN stays NaN.
// A row holding +inf is NaN, as the contract's rowmax(E) - E is there (inf - inf): the row
// minimum takes +inf as NaN, where exp(rowmin - inf) would give it a weight of 0.
template <typename acc_t>
void attention_row(acc_t* e, int64_t C) {
  using V = Vectorized<acc_t>;
  constexpr int64_t W = V::size();
  const int64_t body = C - C % W;
  constexpr acc_t kInf = std::numeric_limits<acc_t>::infinity();
  constexpr acc_t kNaN = std::numeric_limits<acc_t>::quiet_NaN();
  // rowmin, NaN-propagating as amin, +inf counted as NaN.
  acc_t m = kInf;
  if (body > 0) {
    V mv(kInf);
    for (int64_t j = 0; j < body; j += W) {
      const V v = V::loadu(e + j);
      mv = at::vec::minimum(mv, V::blendv(v, V(kNaN), v == V(kInf)));
    }
    m = at::vec::vec_reduce_all<acc_t>([](V& a, V& b) { return at::vec::minimum(a, b); }, mv);
  }
  for (int64_t j = body; j < C; ++j) {
    const acc_t v = e[j] == kInf ? kNaN : e[j];
    m = (std::isnan(v) || v < m) ? v : m;
  }
  // s = m - E and its max.
  acc_t shift = -std::numeric_limits<acc_t>::infinity();
  if (body > 0) {
    V sv(shift);
    for (int64_t j = 0; j < body; j += W) {
      const V s = V(m) - V::loadu(e + j);
      s.store(e + j);
      sv = at::vec::maximum(sv, s);
    }
    shift = reduce_max(sv);
  }
  for (int64_t j = body; j < C; ++j) {
    e[j] = m - e[j];
    shift = nan_max(shift, e[j]);
  }
  // exp(s - shift) and the row's sum.
  V sum_v(0);
  for (int64_t j = 0; j < body; j += W) {
    const V p = softmax_exp(V::loadu(e + j) - V(shift));
    p.store(e + j);
    sum_v = sum_v + p;
  }
  acc_t sum = reduce_sum(sum_v);
  for (int64_t j = body; j < C; ++j) {
    e[j] = std::exp(e[j] - shift);
    sum += e[j];
  }
  // Normalise and flush.
  const acc_t inv = acc_t(1) / sum, tiny = std::numeric_limits<acc_t>::min();
  for (int64_t j = 0; j < body; j += W) {
    const V p = V::loadu(e + j) * V(inv);
    V::blendv(p, V(0), p < V(tiny)).store(e + j);
  }
  for (int64_t j = body; j < C; ++j) {
    const acc_t p = e[j] * inv;
    e[j] = p < tiny ? acc_t(0) : p;
  }
}

// One row of G (C values) in place, with the row a of attn: dA = gamma * G, then
// dE = -attn * (dA - rowsum(dA * attn)). Returns sum(attn * G) over the row (grad_gamma's share).
template <typename acc_t>
acc_t attention_grad_row(const acc_t* a, acc_t* G, int64_t C, acc_t gamma) {
  using V = Vectorized<acc_t>;
  constexpr int64_t W = V::size();
  const int64_t body = C - C % W;
  V dot_v(0), r_v(0);
  for (int64_t j = 0; j < body; j += W) {
    const V a_j = V::loadu(a + j), G_j = V::loadu(G + j), dA = V(gamma) * G_j;
    dA.store(G + j);
    dot_v = dot_v + a_j * G_j;
    r_v = r_v + dA * a_j;
  }
  acc_t dot = reduce_sum(dot_v), r = reduce_sum(r_v);
  for (int64_t j = body; j < C; ++j) {
    const acc_t dA = gamma * G[j];
    dot += a[j] * G[j];
    r += dA * a[j];
    G[j] = dA;
  }
  for (int64_t j = 0; j < body; j += W) (V::loadu(a + j).neg() * (V::loadu(G + j) - V(r))).store(G + j);
  for (int64_t j = body; j < C; ++j) G[j] = -a[j] * (G[j] - r);
  return dot;
}

// Row i of M = I + gamma * attn (a: attn's row i), which makes y = M X one GEMM that
// adds x itself (no copy of x into the output first); gamma = 0 gives M = I exactly.
template <typename acc_t>
void identity_plus_row(const acc_t* a, acc_t* M, int64_t i, int64_t C, acc_t gamma) {
  using V = Vectorized<acc_t>;
  int64_t j = 0;
  for (; j + V::size() <= C; j += V::size()) (V(gamma) * V::loadu(a + j)).store(M + j);
  for (; j < C; ++j) M[j] = gamma * a[j];
  M[i] += acc_t(1);
}

// From attn and dE, the (C x C) matrices of grad_x = M1 g + M2 X for each of the N samples:
// M2 = dE + dE^T, and M1 = I + gamma * attn^T unless M1 is null (not folded), in kTile x kTile
// tiles (the transposed reads stay in L1); one task per (sample, block of rows).
template <typename acc_t>
void grad_matrices(const acc_t* attn, const acc_t* dE, acc_t gamma, int64_t N, int64_t C, acc_t* M1, acc_t* M2) {
  constexpr int64_t kTile = 32;
  const int64_t row_blocks = (C + kTile - 1) / kTile;
  at::parallel_for(0, N * row_blocks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t n = t / row_blocks, i0 = (t % row_blocks) * kTile, i1 = std::min(C, i0 + kTile);
      const int64_t base = n * C * C;
      const acc_t *a = attn + base, *d = dE + base;
      acc_t *m1 = M1 == nullptr ? nullptr : M1 + base, *m2 = M2 + base;
      for (int64_t j0 = 0; j0 < C; j0 += kTile) {
        const int64_t j1 = std::min(C, j0 + kTile);
        for (int64_t i = i0; i < i1; ++i) {
          for (int64_t j = j0; j < j1; ++j) m2[i * C + j] = d[i * C + j] + d[j * C + i];
          if (M1 == nullptr) continue;
          for (int64_t j = j0; j < j1; ++j) m1[i * C + j] = gamma * a[j * C + i];
        }
      }
      if (M1 == nullptr) continue;
      for (int64_t i = i0; i < i1; ++i) m1[i * C + i] += acc_t(1);
    }
  });
}

// The (N, C, P) result of the GEMMs in acc and x's layout: `out` itself when out is in acc, else
// a buffer like `like` (acc, x's layout) that finish() rounds into out.
struct AccOut {
  at::Tensor out, buf;
  AccOut(const at::Tensor& out_rows, const at::Tensor& like)
      : out(out_rows), buf(out_rows.scalar_type() == like.scalar_type() ? out_rows : at::empty_like(like)) {}
  void finish() const {
    if (!buf.is_same(out)) out.copy_(buf);
  }
};

std::tuple<at::Tensor, at::Tensor> cam_cpu(const at::Tensor& x_in, const at::Tensor& gamma) {
  const char* op = "cam";
  const at::Tensor x = checked_x(x_in, op);
  check_cam_args(x, gamma, op);
  const at::ScalarType acc = acc_type(x.scalar_type());
  const int64_t N = x.size(0), C = x.size(1), P = x.size(2) * x.size(3);
  const at::Tensor X = pixel_matrix(x, acc);
  const double gamma_value = gamma.item<double>();
  const bool fold = fold_identity(C, P);
  at::Tensor attn = gram(X);  // E, then attn in place
  at::Tensor M = fold ? at::empty_like(attn) : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES(acc, "cam_cpu", [&] {
    scalar_t* e = attn.data_ptr<scalar_t>();
    scalar_t* m = fold ? M.data_ptr<scalar_t>() : nullptr;
    const auto gam = static_cast<scalar_t>(gamma_value);
    at::parallel_for(0, N * C, row_grain(C), [&](int64_t begin, int64_t end) {
      for (int64_t row = begin; row < end; ++row) {
        attention_row(e + row * C, C);
        if (fold) identity_plus_row(e + row * C, m + row * C, row % C, C, gam);
      }
    });
  });
  at::Tensor y = empty_like_layout(x);
  const AccOut Y(y.view(X.sizes()), X);  // y's (N, C, P) view has X's strides
  if (fold) {
    product(Y.buf, M, X, /*accumulate=*/false);  // y = X + gamma * attn X
  } else {
    Y.buf.copy_(X);
    add_scaled_product(Y.buf, attn, X, gamma_value);
  }
  Y.finish();
  return {y, attn};
}

std::tuple<at::Tensor, at::Tensor> cam_backward_cpu(const at::Tensor& grad_y, const at::Tensor& x_in,
                                                    const at::Tensor& gamma, const at::Tensor& attn_in) {
  const char* op = "cam_backward";
  const at::Tensor x = checked_x(x_in, op);
  check_cam_backward_args(x, gamma, attn_in, op);
  const at::Tensor gy = walked_like_x(grad_y, x, op, "grad_y");
  const at::ScalarType acc = acc_type(x.scalar_type());
  const int64_t N = x.size(0), C = x.size(1), P = x.size(2) * x.size(3);
  const at::Tensor X = pixel_matrix(x, acc), g = pixel_matrix(gy, acc), attn = attn_in.contiguous();
  const double gamma_value = gamma.item<double>();
  const bool fold = fold_identity(C, P);
  at::Tensor dE = at::bmm(g, X.transpose(1, 2)).contiguous();  // G, then dE in place
  at::Tensor M1 = fold ? at::empty_like(dE) : at::Tensor(), M2 = at::empty_like(dE);
  at::Tensor row_dots = at::empty({N * C}, attn.options());
  double total = 0;
  AT_DISPATCH_FLOATING_TYPES(acc, "cam_backward_cpu", [&] {
    const scalar_t* a = attn.const_data_ptr<scalar_t>();
    scalar_t* d = dE.data_ptr<scalar_t>();
    scalar_t* dots = row_dots.data_ptr<scalar_t>();
    const auto gam = static_cast<scalar_t>(gamma_value);
    at::parallel_for(0, N * C, row_grain(C), [&](int64_t begin, int64_t end) {
      for (int64_t row = begin; row < end; ++row) dots[row] = attention_grad_row(a + row * C, d + row * C, C, gam);
    });
    scalar_t sum = 0;  // grad_gamma: the rows' partials in row order, in acc
    for (int64_t row = 0; row < N * C; ++row) sum += dots[row];
    total = sum;
    grad_matrices(a, d, gam, N, C, fold ? M1.data_ptr<scalar_t>() : nullptr, M2.data_ptr<scalar_t>());
  });
  at::Tensor grad_x = empty_like_layout(x);
  const AccOut GX(grad_x.view(X.sizes()), g);
  if (fold) {
    product(GX.buf, M1, g, /*accumulate=*/false);  // g + gamma * attn^T g
  } else {
    GX.buf.copy_(g);
    add_scaled_product(GX.buf, attn.transpose(1, 2), g, gamma_value);
  }
  product(GX.buf, M2, X, /*accumulate=*/true);
  GX.finish();
  return {grad_x, at::full(gamma.sizes(), total, gamma.options())};
}

}  // namespace

TORCH_LIBRARY_IMPL(attnkernels, CPU, m) {
  m.impl("cam", &cam_cpu);
  m.impl("cam_backward", &cam_backward_cpu);
}

}  // namespace attnkernels
