// CPU kernels of the block_tail hot path; the math is in csrc/block_tail_ops.cpp.
//
// Layouts: NCHW walks each (n, c) plane of P contiguous values, one plane per step of a
// parallel_for over planes; channels_last walks pixel rows of C contiguous values, one task per
// (sample, chunk of kChunk pixels) owning all C channels, vectorised over c. A sliced input is
// copied dense first (dense()). The reductions of a channels_last task leave one partial row
// per chunk, combined over the chunks in order afterwards; the chunks and the sub-blocks of the
// statistics are fixed sizes, so results are bitwise identical whatever the thread count.
//
// Statistics: m2 is summed from deviations, over sub-blocks of about kSubBlock values that stay
// in L1/L2 for their second pass, and the sub-blocks' (count, mean, m2) are combined by Chan's
// formula (exact; no sum-of-squares cancellation when |mean| >> std). All of it is shifted by a
// value of the plane (shift_of), so no sum grows with |mean|.
//
// The inner loops take their pointers, sizes and coefficients as function arguments, with the
// flags as template parameters: a vector store may alias any memory, so a value read through a
// lambda's captured reference is reloaded after every store (CONTRIBUTING.md, file 3).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <tuple>
#include <vector>

#include "attnkernels/block_tail.h"
#include "attnkernels/cpu_plane_stats.h"
#include "attnkernels/cpu_spatial_pool.h"
#include "attnkernels/cpu_vec.h"

namespace attnkernels {
namespace {

#define AK_DISPATCH_FEATURE(x, name, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, (x).scalar_type(), name, __VA_ARGS__)

// Pixels per channels_last task (one partial row of C per chunk), and the parallel walk over
// (sample, chunk): the spatial pools' pixel blocks.
constexpr int64_t kChunk = cpu_spatial::kPixelBlock;
using cpu_spatial::for_pixel_blocks;
// Values per sub-block of the statistics: its second pass finds it in L1/L2.
constexpr int64_t kSubBlock = 16384;
// Independent vector accumulators per plane: one add chain would stall on the add's latency
// once the plane is in cache (the statistics' second pass).
constexpr int kUnroll = 4;

inline int64_t chunks_of(int64_t hw) { return cpu_spatial::pixel_blocks(hw); }

using cpu_stats::chan_merge;
using cpu_stats::plane_grain;
using cpu_stats::shift_of;

// ---------------------------------------------------------------- block_tail_stats

// s += x - k, or with kDeviations s += ((x - k) - m)^2: one value or one vector.
template <bool kDeviations, typename V>
inline void accumulate(V& s, const V& x, const V& k, const V& m) {
  const V d = x - k;
  if constexpr (kDeviations) {
    s = at::vec::fmadd(d - m, d - m, s);
  } else {
    s += d;
  }
}
template <bool kDeviations, typename acc_t>
inline void accumulate_one(acc_t& s, acc_t x, acc_t k, acc_t m) {
  const acc_t d = x - k;
  s += kDeviations ? (d - m) * (d - m) : d;
}

// sum_i (z[i] - k), or with kDeviations sum_i ((z[i] - k) - m)^2, over len contiguous values.
template <bool kDeviations, typename scalar_t>
at::opmath_type<scalar_t> plane_sum(const scalar_t* z, int64_t len, at::opmath_type<scalar_t> k,
                                    at::opmath_type<scalar_t> m) {
  using S = Step<scalar_t>;
  using acc_t = typename S::acc_t;
  using AccVec = typename S::AccVec;
  constexpr int64_t kStride = kUnroll * S::kWidth;
  const AccVec vk(k), vm(m);
  AccVec vsum[kUnroll][S::kVecs], v[S::kVecs];
  for (int u = 0; u < kUnroll; ++u) {
    for (int j = 0; j < S::kVecs; ++j) vsum[u][j] = AccVec(0);
  }
  int64_t i = 0;
  for (; i + kStride <= len; i += kStride) {
    for (int u = 0; u < kUnroll; ++u) {
      S::load(z + i + u * S::kWidth, v);
      for (int j = 0; j < S::kVecs; ++j) accumulate<kDeviations>(vsum[u][j], v[j], vk, vm);
    }
  }
  for (; i + S::kWidth <= len; i += S::kWidth) {
    S::load(z + i, v);
    for (int j = 0; j < S::kVecs; ++j) accumulate<kDeviations>(vsum[0][j], v[j], vk, vm);
  }
  acc_t sum = 0;
  for (int j = 0; j < S::kVecs; ++j) {
    AccVec s = vsum[0][j];
    for (int u = 1; u < kUnroll; ++u) s += vsum[u][j];
    sum += reduce_sum(s);
  }
  for (; i < len; ++i) accumulate_one<kDeviations>(sum, static_cast<acc_t>(z[i]), k, m);
  return sum;
}

// mean and m2 of one NCHW plane of hw > 0 values: two passes per sub-block, Chan's merge across.
template <typename scalar_t>
void stats_plane(const scalar_t* z, int64_t hw, at::opmath_type<scalar_t>* mean, at::opmath_type<scalar_t>* m2) {
  using acc_t = at::opmath_type<scalar_t>;
  const acc_t k = shift_of(z[0]);
  acc_t run_mean = 0, run_m2 = 0;  // of z - k
  for (int64_t i0 = 0; i0 < hw; i0 += kSubBlock) {
    const int64_t len = std::min(kSubBlock, hw - i0);
    const acc_t mb = plane_sum<false>(z + i0, len, k, acc_t(0)) / static_cast<acc_t>(len);
    const acc_t m2b = plane_sum<true>(z + i0, len, k, mb);
    chan_merge(&run_mean, &run_m2, i0, &mb, &m2b, len, 1);
  }
  *mean = k + run_mean;
  *m2 = run_m2;
}

template <typename scalar_t>
void stats_nchw(const scalar_t* z, int64_t planes, int64_t hw, at::opmath_type<scalar_t>* mean,
                at::opmath_type<scalar_t>* m2) {
  at::parallel_for(0, planes, plane_grain(hw), [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p) stats_plane(z + p * hw, hw, mean + p, m2 + p);
  });
}

// acc[c] += z[c] - k[c] (kDeviations: acc[c] += ((z[c] - k[c]) - m[c])^2) for the C channels of
// one pixel row.
template <bool kDeviations, typename scalar_t>
void row_accumulate(const scalar_t* z, int64_t C, const at::opmath_type<scalar_t>* k,
                    const at::opmath_type<scalar_t>* m, at::opmath_type<scalar_t>* acc) {
  using S = Step<scalar_t>;
  using acc_t = typename S::acc_t;
  typename S::AccVec v[S::kVecs], s[S::kVecs], vk[S::kVecs], vm[S::kVecs];
  for (int j = 0; j < S::kVecs; ++j) vm[j] = typename S::AccVec(0);  // unread without kDeviations
  int64_t c = 0;
  for (; c + S::kWidth <= C; c += S::kWidth) {
    S::load(z + c, v);
    S::load_acc(acc + c, s);
    S::load_acc(k + c, vk);
    if constexpr (kDeviations) S::load_acc(m + c, vm);
    for (int j = 0; j < S::kVecs; ++j) accumulate<kDeviations>(s[j], v[j], vk[j], vm[j]);
    S::store_acc(acc + c, s);
  }
  for (; c < C; ++c) accumulate_one<kDeviations>(acc[c], static_cast<acc_t>(z[c]), k[c], kDeviations ? m[c] : acc_t(0));
}

// The shifts of one channels_last sample z_n: its first pixel's row.
template <typename scalar_t>
void shifts_of(const scalar_t* z_n, int64_t C, at::opmath_type<scalar_t>* k) {
  for (int64_t c = 0; c < C; ++c) k[c] = shift_of(z_n[c]);
}

// mean and m2 of z - k over the pixels [p0, p1) of one channels_last sample z_n (hw rows of C),
// into mean[0:C], m2[0:C]: sub-blocks of about kSubBlock values, each summed twice while in
// cache (its mean, then its deviations) and merged into the running values by Chan's formula.
template <typename scalar_t>
void stats_chunk(const scalar_t* z_n, int64_t C, int64_t p0, int64_t p1, const at::opmath_type<scalar_t>* k,
                 at::opmath_type<scalar_t>* mean, at::opmath_type<scalar_t>* m2) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t rows = std::clamp<int64_t>(kSubBlock / std::max<int64_t>(C, 1), 1, kChunk);
  std::vector<acc_t> buf(2 * C);
  acc_t *mb = buf.data(), *m2b = mb + C;
  for (int64_t q0 = p0; q0 < p1; q0 += rows) {
    const int64_t q1 = std::min(p1, q0 + rows);
    std::fill(buf.begin(), buf.end(), acc_t(0));
    for (int64_t p = q0; p < q1; ++p) row_accumulate<false>(z_n + p * C, C, k, nullptr, mb);
    for (int64_t c = 0; c < C; ++c) mb[c] /= static_cast<acc_t>(q1 - q0);
    for (int64_t p = q0; p < q1; ++p) row_accumulate<true>(z_n + p * C, C, k, mb, m2b);
    chan_merge(mean, m2, q0 - p0, mb, m2b, q1 - q0, C);
  }
}

// Every chunk of a sample shares the sample's shifts, so the chunks' means merge shifted too.
template <typename scalar_t>
void stats_channels_last(const scalar_t* z, int64_t N, int64_t C, int64_t hw, at::opmath_type<scalar_t>* mean,
                         at::opmath_type<scalar_t>* m2) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t chunks = chunks_of(hw);
  // Per-chunk (mean, m2) rows, (N, chunks, C); a sample of one chunk writes its result directly.
  std::vector<acc_t> part(chunks > 1 ? 2 * N * chunks * C : 0);
  acc_t *pm = part.data(), *pm2 = pm + N * chunks * C;
  for_pixel_blocks(N, hw, [&](int64_t n, int64_t j, int64_t p0, int64_t p1) {
    const scalar_t* z_n = z + n * hw * C;
    std::vector<acc_t> k(C);
    shifts_of(z_n, C, k.data());
    if (chunks > 1) {
      const int64_t row = (n * chunks + j) * C;
      stats_chunk(z_n, C, p0, p1, k.data(), pm + row, pm2 + row);
      return;
    }
    stats_chunk(z_n, C, p0, p1, k.data(), mean + n * C, m2 + n * C);
    for (int64_t c = 0; c < C; ++c) mean[n * C + c] += k[c];
  });
  if (chunks == 1) return;
  at::parallel_for(0, N, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> k(C);
    for (int64_t n = begin; n < end; ++n) {
      for (int64_t j = 0; j < chunks; ++j) {
        const int64_t row = (n * chunks + j) * C, p0 = j * kChunk;
        chan_merge(mean + n * C, m2 + n * C, p0, pm + row, pm2 + row, std::min(hw, p0 + kChunk) - p0, C);
      }
      shifts_of(z + n * hw * C, C, k.data());
      for (int64_t c = 0; c < C; ++c) mean[n * C + c] += k[c];
    }
  });
}

std::tuple<at::Tensor, at::Tensor> block_tail_stats_cpu(const at::Tensor& z_in) {
  check_feature_map(z_in, "block_tail_stats", "z");
  const at::Tensor z = dense(z_in);
  const int64_t N = z.size(0), C = z.size(1), hw = z.size(2) * z.size(3);
  at::Tensor mean = at::empty({N, C}, acc_options(z)), m2 = at::empty({N, C}, acc_options(z));
  if (N * C == 0) return {mean, m2};
  if (hw == 0) return {mean.fill_(std::numeric_limits<double>::quiet_NaN()), m2.zero_()};  // 0 / 0, as torch.mean
  AK_DISPATCH_FEATURE(z, "block_tail_stats_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* zp = z.const_data_ptr<scalar_t>();
    if (layout_of(z) == Layout::ChannelsLast) {
      stats_channels_last(zp, N, C, hw, mean.data_ptr<acc_t>(), m2.data_ptr<acc_t>());
    } else {
      stats_nchw(zp, N * C, hw, mean.data_ptr<acc_t>(), m2.data_ptr<acc_t>());
    }
  });
  return {mean, m2};
}

// ---------------------------------------------------------------- block_tail_apply

// act(a * x + b + c * y) of one vector, relu by torch's rule (a NaN stays NaN).
template <bool kRelu, typename V>
inline V tail(const V& x, const V& y, const V& a, const V& b, const V& c) {
  const V t = at::vec::fmadd(a, x, at::vec::fmadd(c, y, b));
  if constexpr (kRelu) {
    return V::blendv(t, V(0), t < V(0));
  } else {
    return t;
  }
}
template <bool kRelu, typename acc_t>
inline acc_t tail_one(acc_t x, acc_t y, acc_t a, acc_t b, acc_t c) {
  const acc_t t = a * x + (c * y + b);
  return kRelu ? relu(t) : t;
}

// One NCHW plane of len values, with its (n, c)'s coefficients.
template <bool kRelu, bool kStream, typename scalar_t>
void apply_plane(const scalar_t* x, const scalar_t* y, scalar_t* out, int64_t len, at::opmath_type<scalar_t> a,
                 at::opmath_type<scalar_t> b, at::opmath_type<scalar_t> c) {
  using S = Step<scalar_t>;
  using AccVec = typename S::AccVec;
  const AccVec va(a), vb(b), vc(c);
  AccVec xv[S::kVecs], yv[S::kVecs];
  int64_t i = 0;
  for (; i + S::kWidth <= len; i += S::kWidth) {
    S::load(x + i, xv);
    S::load(y + i, yv);
    for (int k = 0; k < S::kVecs; ++k) xv[k] = tail<kRelu>(xv[k], yv[k], va, vb, vc);
    S::store(out + i, xv, kStream);
  }
  for (; i < len; ++i) {
    out[i] = static_cast<scalar_t>(tail_one<kRelu>(at::opmath_type<scalar_t>(x[i]), at::opmath_type<scalar_t>(y[i]),
                                                   a, b, c));
  }
}

// One channels_last pixel row of C values, with the sample's coefficient rows.
template <bool kRelu, bool kStream, typename scalar_t>
void apply_row(const scalar_t* x, const scalar_t* y, scalar_t* out, int64_t C, const at::opmath_type<scalar_t>* a,
               const at::opmath_type<scalar_t>* b, const at::opmath_type<scalar_t>* c) {
  using S = Step<scalar_t>;
  using acc_t = typename S::acc_t;
  typename S::AccVec xv[S::kVecs], yv[S::kVecs], va[S::kVecs], vb[S::kVecs], vc[S::kVecs];
  int64_t i = 0;
  for (; i + S::kWidth <= C; i += S::kWidth) {
    S::load(x + i, xv);
    S::load(y + i, yv);
    S::load_acc(a + i, va);
    S::load_acc(b + i, vb);
    S::load_acc(c + i, vc);
    for (int k = 0; k < S::kVecs; ++k) xv[k] = tail<kRelu>(xv[k], yv[k], va[k], vb[k], vc[k]);
    S::store(out + i, xv, kStream);
  }
  for (; i < C; ++i) out[i] = static_cast<scalar_t>(tail_one<kRelu>(acc_t(x[i]), acc_t(y[i]), a[i], b[i], c[i]));
}

template <bool kRelu, bool kStream, typename scalar_t>
void apply_all(const scalar_t* x, const scalar_t* y, scalar_t* out, int64_t N, int64_t C, int64_t hw,
               bool channels_last, const at::opmath_type<scalar_t>* a, const at::opmath_type<scalar_t>* b,
               const at::opmath_type<scalar_t>* c) {
  if (channels_last) {
    for_pixel_blocks(N, hw, [&](int64_t n, int64_t, int64_t p0, int64_t p1) {
      const int64_t nc = n * C;
      for (int64_t p = p0; p < p1; ++p) {
        const int64_t off = (n * hw + p) * C;
        apply_row<kRelu, kStream>(x + off, y + off, out + off, C, a + nc, b + nc, c + nc);
      }
      if constexpr (kStream) stream_fence();
    });
    return;
  }
  at::parallel_for(0, N * C, plane_grain(hw), [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p) {
      apply_plane<kRelu, kStream>(x + p * hw, y + p * hw, out + p * hw, hw, a[p], b[p], c[p]);
    }
    if constexpr (kStream) stream_fence();
  });
}

at::Tensor block_tail_apply_cpu(const at::Tensor& x_in, const at::Tensor& y_in, const at::Tensor& a_in,
                                const at::Tensor& b_in, const at::Tensor& c_in, bool relu) {
  const char* op = "block_tail_apply";
  check_block_tail_apply_args(x_in, y_in, a_in, b_in, c_in, op);
  const at::Tensor x = dense(x_in);
  const at::Tensor y = walked_like_x(y_in, x, op, "y");
  at::Tensor out = empty_like_layout(x);
  if (x.numel() == 0) return out;
  const at::Tensor a = a_in.contiguous(), b = b_in.contiguous(), c = c_in.contiguous();
  const int64_t N = x.size(0), C = x.size(1), hw = x.size(2) * x.size(3);
  const bool channels_last = layout_of(x) == Layout::ChannelsLast;
  const bool stream = should_stream(3 * x.nbytes());  // reads x and y, writes out
  AK_DISPATCH_FEATURE(x, "block_tail_apply_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t *xp = x.const_data_ptr<scalar_t>(), *yp = y.const_data_ptr<scalar_t>();
    scalar_t* op_ = out.data_ptr<scalar_t>();
    const acc_t *ap = a.const_data_ptr<acc_t>(), *bp = b.const_data_ptr<acc_t>(), *cp = c.const_data_ptr<acc_t>();
    with_flag(relu, [&](auto kRelu) {
      with_flag(stream, [&](auto kStream) {
        apply_all<decltype(kRelu)::value, decltype(kStream)::value>(xp, yp, op_, N, C, hw, channels_last, ap, bp, cp);
      });
    });
  });
  return out;
}

// ---------------------------------------------------------------- block_tail_backward_reduce

// grad_u = out <= 0 ? 0 : grad_out over len values (one NCHW plane, or one channels_last row
// against per-channel accumulators when kRow); s1 += sum grad_u, s2 += sum grad_u * z.
// A plane returns its sums in s1[0], s2[0]; a row adds into s1[0:len], s2[0:len].
template <bool kRow, typename scalar_t>
void reduce_run(const scalar_t* grad_out, const scalar_t* out, const scalar_t* z, scalar_t* grad_u, int64_t len,
                at::opmath_type<scalar_t>* s1, at::opmath_type<scalar_t>* s2) {
  using S = Step<scalar_t>;
  using acc_t = typename S::acc_t;
  using AccVec = typename S::AccVec;
  AccVec g[S::kVecs], o[S::kVecs], zv[S::kVecs], a1[S::kVecs], a2[S::kVecs];
  for (int k = 0; k < S::kVecs; ++k) a1[k] = a2[k] = AccVec(0);
  int64_t i = 0;
  for (; i + S::kWidth <= len; i += S::kWidth) {
    S::load(grad_out + i, g);
    S::load(out + i, o);
    S::load(z + i, zv);
    if constexpr (kRow) {
      S::load_acc(s1 + i, a1);
      S::load_acc(s2 + i, a2);
    }
    for (int k = 0; k < S::kVecs; ++k) {
      g[k] = vec_relu_grad(g[k], o[k]);
      a1[k] += g[k];
      a2[k] = at::vec::fmadd(g[k], zv[k], a2[k]);
    }
    if constexpr (kRow) {
      S::store_acc(s1 + i, a1);
      S::store_acc(s2 + i, a2);
    }
    S::store(grad_u + i, g);
  }
  acc_t sum1 = 0, sum2 = 0;
  if constexpr (!kRow) {
    for (int k = 0; k < S::kVecs; ++k) {
      sum1 += reduce_sum(a1[k]);
      sum2 += reduce_sum(a2[k]);
    }
  }
  for (; i < len; ++i) {
    const acc_t gi = relu_grad(acc_t(grad_out[i]), acc_t(out[i]));
    grad_u[i] = static_cast<scalar_t>(gi);
    if constexpr (kRow) {
      s1[i] += gi;
      s2[i] += gi * acc_t(z[i]);
    } else {
      sum1 += gi;
      sum2 += gi * acc_t(z[i]);
    }
  }
  if constexpr (!kRow) {
    *s1 = sum1;
    *s2 = sum2;
  }
}

template <typename scalar_t>
void backward_reduce_nchw(const scalar_t* grad_out, const scalar_t* out, const scalar_t* z, scalar_t* grad_u,
                          int64_t planes, int64_t hw, at::opmath_type<scalar_t>* s1, at::opmath_type<scalar_t>* s2) {
  at::parallel_for(0, planes, plane_grain(hw), [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p) {
      const int64_t off = p * hw;
      reduce_run<false>(grad_out + off, out + off, z + off, grad_u + off, hw, s1 + p, s2 + p);
    }
  });
}

template <typename scalar_t>
void backward_reduce_channels_last(const scalar_t* grad_out, const scalar_t* out, const scalar_t* z,
                                   scalar_t* grad_u, int64_t N, int64_t C, int64_t hw, at::opmath_type<scalar_t>* s1,
                                   at::opmath_type<scalar_t>* s2) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t chunks = chunks_of(hw);
  // Per-chunk partial rows (N, chunks, C) of s1 and s2, summed over the chunks in order.
  std::vector<acc_t> part(2 * N * chunks * C, acc_t(0));
  acc_t *p1s = part.data(), *p2s = p1s + N * chunks * C;
  for_pixel_blocks(N, hw, [&](int64_t n, int64_t k, int64_t p0, int64_t p1) {
    const int64_t row = (n * chunks + k) * C;
    for (int64_t p = p0; p < p1; ++p) {
      const int64_t off = (n * hw + p) * C;
      reduce_run<true>(grad_out + off, out + off, z + off, grad_u + off, C, p1s + row, p2s + row);
    }
  });
  at::parallel_for(0, N, 1, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      std::copy(p1s + n * chunks * C, p1s + (n * chunks + 1) * C, s1 + n * C);
      std::copy(p2s + n * chunks * C, p2s + (n * chunks + 1) * C, s2 + n * C);
      for (int64_t k = 1; k < chunks; ++k) {
        const int64_t row = (n * chunks + k) * C;
        at::vec::map2<acc_t>([](auto u, auto v) { return u + v; }, s1 + n * C, s1 + n * C, p1s + row, C);
        at::vec::map2<acc_t>([](auto u, auto v) { return u + v; }, s2 + n * C, s2 + n * C, p2s + row, C);
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> block_tail_backward_reduce_cpu(const at::Tensor& grad_out_in,
                                                                              const at::Tensor& out_in,
                                                                              const at::Tensor& z_in) {
  const char* op = "block_tail_backward_reduce";
  check_block_tail_backward_reduce_args(grad_out_in, out_in, z_in, op);
  const at::Tensor z = dense(z_in);
  const at::Tensor grad_out = walked_like_x(grad_out_in, z, op, "grad_out");
  const at::Tensor out = walked_like_x(out_in, z, op, "out");
  at::Tensor grad_u = empty_like_layout(z);
  const int64_t N = z.size(0), C = z.size(1), hw = z.size(2) * z.size(3);
  at::Tensor s1 = at::empty({N, C}, acc_options(z)), s2 = at::empty({N, C}, acc_options(z));
  if (z.numel() == 0) return {grad_u, s1.zero_(), s2.zero_()};
  AK_DISPATCH_FEATURE(z, "block_tail_backward_reduce_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t *gp = grad_out.const_data_ptr<scalar_t>(), *op_ = out.const_data_ptr<scalar_t>(),
                   *zp = z.const_data_ptr<scalar_t>();
    scalar_t* gu = grad_u.data_ptr<scalar_t>();
    acc_t *s1p = s1.data_ptr<acc_t>(), *s2p = s2.data_ptr<acc_t>();
    if (layout_of(z) == Layout::ChannelsLast) {
      backward_reduce_channels_last(gp, op_, zp, gu, N, C, hw, s1p, s2p);
    } else {
      backward_reduce_nchw(gp, op_, zp, gu, N * C, hw, s1p, s2p);
    }
  });
  return {grad_u, s1, s2};
}

#undef AK_DISPATCH_FEATURE

}  // namespace

TORCH_LIBRARY_IMPL(attnkernels, CPU, m) {
  m.impl("block_tail_stats", &block_tail_stats_cpu);
  m.impl("block_tail_apply", &block_tail_apply_cpu);
  m.impl("block_tail_backward_reduce", &block_tail_backward_reduce_cpu);
}

}  // namespace attnkernels
