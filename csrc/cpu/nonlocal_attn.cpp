// CPU kernels of the nonlocal_attn hot path (PAM's HW x HW attention); math in csrc/nonlocal_attn_ops.cpp.
//
// Flash-style on CPU: the (HW x HW) energies exist only as (query block x key block) tiles, at
// most 1024 x 1024 values per thread (1 MB at the default tiles). Each sample's q, k, v are
// (D, HW) matrices read through their own strides (NCHW: pixel stride 1; channels_last: d
// stride 1), so neither layout is copied; the tile products are BLAS calls (at::mm_out /
// addmm_ on strided views, single-threaded inside the parallel region) and the softmax runs in
// vector loops between them.
//
// Forward: one task per (sample, query block): stream the key blocks with a running max m and
// sum l per query row (online softmax), accumulating O = v P^T (D_v x query rows) in acc in
// place in `out`, then y = x + gamma * O for the block while it is in cache.
// Backward: one task per (sample, range of key blocks): for each key block, every query block
// recomputes S and P = exp(S - lse), then dV and dK (the task owns these key rows) and a
// partial dQ for its key range; the partials are summed in range order, so the result is
// deterministic for a given thread count.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "attnkernels/nonlocal_attn.h"
#include "attnkernels/cpu_vec.h"

namespace attnkernels {
namespace {

using at::vec::Vectorized;

int64_t blocks(int64_t n, int64_t block) { return (n + block - 1) / block; }

// Tile sizes (query rows x keys). Large tiles keep the per-tile ATen call overhead (a few us
// per GEMM call and view) small against the GEMMs (measured, 1 thread, N=2 C=64 64x64: 64x512
// forward and 128x128 backward tiles took 79 + 123 ms, 256x1024 and 256x256 took 67 + 103 ms).
// The tile the tasks split (queries in the forward, keys in the backward) is the op's cpu_tile:
// smaller tiles give every thread a task when N * H*W is small, at that overhead per tile, so
// the Python layer measures the candidates per shape and thread count (attnkernels.choose).
constexpr int64_t kForwardQueries = 256, kForwardKeys = 1024;
constexpr int64_t kBackwardQueries = 256, kBackwardKeys = 256;
struct Tiles {
  int64_t queries, keys;
};

// The split tile: cpu_tile, or `fallback` when it is 0; at most HW.
int64_t split_tile(int64_t cpu_tile, int64_t fallback, int64_t HW) {
  return std::min(cpu_tile > 0 ? cpu_tile : fallback, HW);
}

Tiles forward_tiles(int64_t HW, int64_t cpu_tile) {
  return {split_tile(cpu_tile, kForwardQueries, HW), std::min(kForwardKeys, HW)};
}

Tiles backward_tiles(int64_t HW, int64_t cpu_tile) {
  return {std::min(kBackwardQueries, HW), split_tile(cpu_tile, kBackwardKeys, HW)};
}

// Row i of the (rows x cols) tile s, stored with row stride ld: s[i, :] = exp(s[i, :] - shift),
// returning the row's sum. In the forward's online softmax (kOnline), a shift of -inf (a row
// whose energies so far are all -inf) gives zeros: such keys have no weight yet, and a row
// that stays all -inf ends as 0/0 = NaN, as torch.softmax gives. The backward's shift is the
// final lse, and there exp(-inf - (-inf)) = NaN is torch's P for such a row; an lse of +inf
// (an energy of +inf) shifts by NaN: torch.softmax's row is NaN there (its sum is inf - inf),
// not exp(S - inf) = 0 at the finite energies.
template <bool kOnline, typename acc_t>
acc_t exp_shifted(acc_t* s, int64_t cols, acc_t shift) {
  using V = Vectorized<acc_t>;
  if (kOnline && shift == -std::numeric_limits<acc_t>::infinity()) {
    std::fill_n(s, cols, acc_t(0));
    return acc_t(0);
  }
  if (!kOnline && shift == std::numeric_limits<acc_t>::infinity()) shift = std::numeric_limits<acc_t>::quiet_NaN();
  V sum(0);
  int64_t j = 0;
  for (; j + V::size() <= cols; j += V::size()) {
    V p = softmax_exp(V::loadu(s + j) - V(shift));
    p.store(s + j);
    sum = sum + p;
  }
  acc_t total = reduce_sum(sum);
  for (; j < cols; ++j) {
    s[j] = std::exp(s[j] - shift);
    total += s[j];
  }
  return total;
}

// NaN-propagating max of cols values.
template <typename acc_t>
acc_t row_max(const acc_t* s, int64_t cols) {
  using V = Vectorized<acc_t>;
  acc_t m = -std::numeric_limits<acc_t>::infinity();
  int64_t j = 0;
  if (cols >= V::size()) {
    V mv = V::loadu(s);
    for (j = V::size(); j + V::size() <= cols; j += V::size()) mv = at::vec::maximum(mv, V::loadu(s + j));
    m = reduce_max(mv);
  }
  for (; j < cols; ++j) m = nan_max(m, s[j]);
  return m;
}

template <typename acc_t>
void scale_row(acc_t* o, int64_t cols, acc_t factor) {
  using V = Vectorized<acc_t>;
  int64_t c = 0;
  for (; c + V::size() <= cols; c += V::size()) (V::loadu(o + c) * V(factor)).store(o + c);
  for (; c < cols; ++c) o[c] *= factor;
}

// dS = P * (dP - gamma * R_i), row i of a tile, in place in dP.
template <typename acc_t>
void softmax_grad_row(const acc_t* p, acc_t* dp, int64_t cols, acc_t gamma_R) {
  using V = Vectorized<acc_t>;
  int64_t j = 0;
  for (; j + V::size() <= cols; j += V::size()) {
    (V::loadu(p + j) * (V::loadu(dp + j) - V(gamma_R))).store(dp + j);
  }
  for (; j < cols; ++j) dp[j] = p[j] * (dp[j] - gamma_R);
}

// O[:, i] *= factor[i] for the bq columns of O (D_v x bq), whatever its two strides: the
// accumulator is a block of the output itself, NCHW (pixels contiguous) or channels_last.
template <typename acc_t>
void scale_columns(const at::Tensor& O, const acc_t* factor) {
  const int64_t D_v = O.size(0), bq = O.size(1), sc = O.stride(0), si = O.stride(1);
  acc_t* o = O.data_ptr<acc_t>();
  if (si == 1) {
    using V = Vectorized<acc_t>;
    for (int64_t c = 0; c < D_v; ++c) {
      acc_t* row = o + c * sc;
      int64_t i = 0;
      for (; i + V::size() <= bq; i += V::size()) (V::loadu(row + i) * V::loadu(factor + i)).store(row + i);
      for (; i < bq; ++i) row[i] *= factor[i];
    }
  } else if (sc == 1) {
    for (int64_t i = 0; i < bq; ++i) scale_row(o + i * si, D_v, factor[i]);
  } else {
    for (int64_t c = 0; c < D_v; ++c) {
      for (int64_t i = 0; i < bq; ++i) o[c * sc + i * si] *= factor[i];
    }
  }
}

// One query block of one sample: O (D_v x bq, a block of out in acc) = v P^T over all keys,
// with the online softmax's running max m and sum l per query row; lse of those rows.
template <typename acc_t>
void forward_tile(const at::Tensor& Q, const at::Tensor& K, const at::Tensor& V, int64_t i0, at::Tensor O,
                  at::Tensor& S_buf, acc_t* lse) {
  const int64_t HW = Q.size(1), bq = O.size(1), ld = S_buf.size(1);
  const acc_t neg_inf = -std::numeric_limits<acc_t>::infinity();
  std::vector<acc_t> m(bq, neg_inf), l(bq, acc_t(0)), alpha(bq);
  const at::Tensor Q_t = Q.narrow(1, i0, bq).t();  // (bq x D_qk)
  O.zero_();
  for (int64_t j0 = 0; j0 < HW; j0 += ld) {
    const int64_t bk = std::min(ld, HW - j0);
    at::Tensor S = S_buf.narrow(0, 0, bq).narrow(1, 0, bk);  // S^T: one query row per row
    at::mm_out(S, Q_t, K.narrow(1, j0, bk));
    acc_t* s = S_buf.data_ptr<acc_t>();
    for (int64_t i = 0; i < bq; ++i) {
      acc_t* s_i = s + i * ld;
      const acc_t m_new = nan_max(m[i], row_max(s_i, bk));
      // Rescale what earlier key blocks summed to the new max (nothing was summed at -inf).
      alpha[i] = (m_new == m[i] || m[i] == neg_inf) ? acc_t(1) : std::exp(m[i] - m_new);
      l[i] = l[i] * alpha[i] + exp_shifted</*kOnline=*/true>(s_i, bk, m_new);
      m[i] = m_new;
    }
    if (j0 > 0) scale_columns(O, alpha.data());
    O.addmm_(V.narrow(1, j0, bk), S.t());  // += v_blk P^T
  }
  for (int64_t i = 0; i < bq; ++i) {
    // An energy of +inf: torch.logsumexp's +inf (l is NaN here, inf - inf).
    lse[i] = m[i] == std::numeric_limits<acc_t>::infinity() ? m[i] : m[i] + std::log(l[i]);
    alpha[i] = acc_t(1) / l[i];
  }
  scale_columns(O, alpha.data());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> nonlocal_attn_cpu(const at::Tensor& q, const at::Tensor& k,
                                                                  const at::Tensor& v, const at::Tensor& x,
                                                                  const at::Tensor& gamma, int64_t cpu_tile) {
  check_nonlocal_args(q, k, v, x, gamma, "nonlocal_attn");
  check_cpu_tile(cpu_tile, "nonlocal_attn");
  const at::ScalarType acc = acc_type(x.scalar_type());
  const int64_t N = x.size(0), D_v = x.size(1), HW = x.size(2) * x.size(3);
  const at::Tensor Q = pixel_matrix(q, acc), K = pixel_matrix(k, acc), V = pixel_matrix(v, acc);
  const at::Tensor x_dense = dense(x);
  // out accumulates in place, in acc and x's layout (it is the output itself unless x is half).
  at::Tensor out = empty_like_layout(x_dense, acc);
  at::Tensor lse = at::empty({N, HW}, x.options().dtype(acc));
  at::Tensor y = empty_like_layout(x_dense);
  const at::Tensor X3 = x_dense.view({N, D_v, HW}), Y3 = y.view({N, D_v, HW}), Out3 = out.view({N, D_v, HW});
  const double gamma_value = gamma.item<double>();
  if (N * HW == 0) {  // no sample or no pixel: every output is empty (and no tile to size)
    return {y, out.to(x.scalar_type()), lse};
  }
  const Tiles tiles = forward_tiles(HW, cpu_tile);
  const int64_t num_qb = blocks(HW, tiles.queries);
  AT_DISPATCH_FLOATING_TYPES(acc, "nonlocal_attn_cpu", [&] {
    at::parallel_for(0, N * num_qb, 1, [&](int64_t begin, int64_t end) {
      BelowAutograd below;
      at::Tensor S_buf = at::empty({tiles.queries, tiles.keys}, Q.options());
      for (int64_t task = begin; task < end; ++task) {
        const int64_t n = task / num_qb, i0 = (task % num_qb) * tiles.queries;
        const int64_t bq = std::min(tiles.queries, HW - i0);
        const at::Tensor O = Out3[n].narrow(1, i0, bq);
        forward_tile<scalar_t>(Q[n], K[n], V[n], i0, O, S_buf, lse.data_ptr<scalar_t>() + n * HW + i0);
        // y = x + gamma * out while the tile is in cache: in acc, rounded once.
        at::Tensor y_blk = Y3[n].narrow(1, i0, bq);
        at::add_out(y_blk, X3[n].narrow(1, i0, bq), O, gamma_value);
      }
    });
  });
  return {y, out.to(x.scalar_type()), lse};
}

// The key blocks [kb_begin, kb_end) of sample n: their grad_k and grad_v columns (dK, dV:
// (D x HW) views in acc, owned by this task) and a partial dQ (D_qk x HW, acc) over them.
template <typename acc_t>
void backward_keys(const at::Tensor& Q, const at::Tensor& K, const at::Tensor& V, const at::Tensor& G,
                   const acc_t* lse, const acc_t* R, acc_t gamma, Tiles tiles, int64_t kb_begin, int64_t kb_end,
                   const at::Tensor& dK, const at::Tensor& dV, const at::Tensor& dQ) {
  const int64_t HW = Q.size(1), ld = tiles.keys;
  at::Tensor P_buf = at::empty({tiles.queries, ld}, Q.options());
  at::Tensor dS_buf = at::empty_like(P_buf);
  for (int64_t kb = kb_begin; kb < kb_end; ++kb) {
    const int64_t j0 = kb * ld, bk = std::min(ld, HW - j0);
    const at::Tensor K_blk = K.narrow(1, j0, bk), V_blk = V.narrow(1, j0, bk);
    at::Tensor dK_blk = dK.narrow(1, j0, bk), dV_blk = dV.narrow(1, j0, bk);
    for (int64_t i0 = 0; i0 < HW; i0 += tiles.queries) {
      const int64_t bq = std::min(tiles.queries, HW - i0);
      at::Tensor P = P_buf.narrow(0, 0, bq).narrow(1, 0, bk);    // (bq x bk), one query per row
      at::Tensor dS = dS_buf.narrow(0, 0, bq).narrow(1, 0, bk);
      const at::Tensor Q_blk = Q.narrow(1, i0, bq), G_blk = G.narrow(1, i0, bq);
      at::mm_out(P, Q_blk.t(), K_blk);    // S
      at::mm_out(dS, G_blk.t(), V_blk);   // dP / gamma
      acc_t* p = P_buf.data_ptr<acc_t>();
      acc_t* ds = dS_buf.data_ptr<acc_t>();
      for (int64_t i = 0; i < bq; ++i) {
        exp_shifted</*kOnline=*/false>(p + i * ld, bk, lse[i0 + i]);  // P = exp(S - lse)
        scale_row(ds + i * ld, bk, gamma);         // dP
        softmax_grad_row(p + i * ld, ds + i * ld, bk, gamma * R[i0 + i]);
      }
      dV_blk.addmm_(G_blk, P, 1, gamma);              // += dO P
      dK_blk.addmm_(Q_blk, dS);                       // += q dS
      dQ.narrow(1, i0, bq).addmm_(K_blk, dS.t());     // += k dS^T
    }
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> nonlocal_attn_backward_cpu(
    const at::Tensor& grad_y, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& gamma, const at::Tensor& out, const at::Tensor& lse, int64_t cpu_tile) {
  const char* op = "nonlocal_attn_backward";
  check_nonlocal_args(q, k, v, out, gamma, op);
  check_cpu_tile(cpu_tile, op);
  check_like_x(grad_y, out, op, "grad_y");
  check_row_stats(lse, out, op);
  const at::ScalarType acc = acc_type(out.scalar_type());
  const int64_t N = out.size(0), D_qk = q.size(1), D_v = out.size(1), HW = out.size(2) * out.size(3);
  const at::Tensor Q = pixel_matrix(q, acc), K = pixel_matrix(k, acc), V = pixel_matrix(v, acc);
  const at::Tensor G = pixel_matrix(grad_y, acc);
  const at::Tensor lse_c = lse.contiguous();
  // R[n, i] = sum_c grad_y * out; grad_gamma = sum R.
  const at::Tensor R = at::sum(G * pixel_matrix(out, acc), {1}).contiguous();
  at::Tensor grad_gamma = R.sum().to(gamma.scalar_type()).reshape(gamma.sizes());
  const double gamma_value = gamma.item<double>();

  // grad_k and grad_v accumulate in place, in acc and their input's layout.
  at::Tensor grad_k = empty_like_layout(dense(k), acc).zero_();
  at::Tensor grad_v = empty_like_layout(dense(v), acc).zero_();
  if (N * HW == 0) {  // no sample or no pixel: every gradient is empty, grad_gamma 0
    return {empty_like_layout(dense(q)), grad_k.to(k.scalar_type()), grad_v.to(v.scalar_type()), grad_gamma};
  }
  const at::Tensor dK3 = grad_k.view({N, D_qk, HW}), dV3 = grad_v.view({N, D_v, HW});
  // Key-block ranges per sample: enough tasks for every thread; each range keeps its own dQ.
  const Tiles tiles = backward_tiles(HW, cpu_tile);
  const int64_t num_kb = blocks(HW, tiles.keys);
  const int64_t ranges = std::min(num_kb, std::max<int64_t>(1, blocks(at::get_num_threads(), N)));
  at::Tensor dQ_parts = at::zeros({N, ranges, D_qk, HW}, Q.options());
  AT_DISPATCH_FLOATING_TYPES(acc, "nonlocal_attn_backward_cpu", [&] {
    at::parallel_for(0, N * ranges, 1, [&](int64_t begin, int64_t end) {
      BelowAutograd below;
      for (int64_t task = begin; task < end; ++task) {
        const int64_t n = task / ranges, r = task % ranges;
        backward_keys<scalar_t>(Q[n], K[n], V[n], G[n], lse_c.data_ptr<scalar_t>() + n * HW,
                                R.data_ptr<scalar_t>() + n * HW, static_cast<scalar_t>(gamma_value), tiles,
                                r * num_kb / ranges, (r + 1) * num_kb / ranges, dK3[n], dV3[n], dQ_parts[n][r]);
      }
    });
  });
  // dQ = the ranges' partials summed in range order, in q's dtype and layout.
  at::Tensor grad_q = empty_like_layout(dense(q));
  grad_q.view({N, D_qk, HW}).copy_(dQ_parts.sum(1));
  return {grad_q, grad_k.to(k.scalar_type()), grad_v.to(v.scalar_type()), grad_gamma};
}

}  // namespace

TORCH_LIBRARY_IMPL(attnkernels, CPU, m) {
  m.impl("nonlocal_attn", &nonlocal_attn_cpu);
  m.impl("nonlocal_attn_backward", &nonlocal_attn_backward_cpu);
}

}  // namespace attnkernels
