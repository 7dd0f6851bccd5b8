// CPU kernels of the spatial_tail hot path; the math is in csrc/spatial_tail_ops.cpp.
//
// Layouts: a sliced input is copied dense first (dense()); the other feature maps are read in
// z's layout (walked_like_x). NCHW statistics and apply run one (n, c) plane per step of a
// parallel_for over planes. Everything else runs one task per (sample, block of kBlock pixels)
// owning all C channels of its pixels, in both layouts: the per-pixel reductions over channels
// (pool, backward_reduce's grad_s) finish inside the task, and the block's pixel maps stay in
// L1 while its channels stream past (NCHW pool_backward, backward_apply). A task's per-channel
// sums over its pixels (s1, s2, t1, t2; channels_last statistics) leave one partial row per
// block, combined over the blocks in order afterwards. Blocks and sub-blocks are fixed sizes:
// results are bitwise identical whatever the thread count.
//
// x1 = fma(a, z, b) in acc everywhere (x1_of): vector and scalar fma round the same, so
// pool_backward and backward_apply find the pool's maxima again by x1 == dmax.
// Channel groups: G = 2 takes a channel's group from the mask (NCHW: per channel, a pointer
// choice; channels_last: per lane, blends with a group-0 membership vector); G = 1 is a
// compile-time flag with no mask at all.
//
// The inner loops take their pointers, sizes and coefficients as function arguments (a vector
// store may alias any memory: CONTRIBUTING.md, file 3).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <optional>
#include <tuple>
#include <vector>

#include "attnkernels/cpu_plane_stats.h"
#include "attnkernels/cpu_spatial_pool.h"
#include "attnkernels/cpu_vec.h"
#include "attnkernels/spatial_tail.h"

namespace attnkernels {
namespace {

#define AK_DISPATCH_FEATURE(x, name, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, (x).scalar_type(), name, __VA_ARGS__)

// Pixels per (sample, block) task: the spatial pools' blocks.
constexpr int64_t kBlock = cpu_spatial::kPixelBlock;
using cpu_spatial::for_pixel_blocks;
inline int64_t blocks_of(int64_t hw) { return cpu_spatial::pixel_blocks(hw); }
// Values per sub-block of the statistics: its second pass finds it in L1/L2.
constexpr int64_t kSubBlock = 16384;
// Sums over pixels in two levels, for accuracy: a plane's vector accumulators fold into its
// total every kFoldValues values; a channels_last task's per-channel rows fold into its partial
// row every kFoldRows pixels; the statistics' channels_last sub-blocks hold at most kStatsRows.
constexpr int64_t kFoldValues = 256;
constexpr int64_t kFoldRows = 16;
constexpr int64_t kStatsRows = 64;
// Independent accumulator vectors in a plane's reduction: one chain would stall on the add's
// latency once the values are in cache (the statistics' second pass).
constexpr int kLanes = 4;

using cpu_stats::chan_merge;
using cpu_stats::plane_grain;
using cpu_stats::shift_of;

// ---------------------------------------------------------------- shared pieces

// x1 = fma(a, z, b), one rounding. at::vec::fmadd is a fused instruction with AVX2 but a * b + c
// (two roundings) in the portable build, which would break x1 == dmax against the scalar tails.
template <typename acc_t>
inline acc_t x1_of(acc_t a, acc_t z, acc_t b) {
  return std::fma(a, z, b);
}
template <typename acc_t>
inline at::vec::Vectorized<acc_t> x1_of(const at::vec::Vectorized<acc_t>& a, const at::vec::Vectorized<acc_t>& z,
                                        const at::vec::Vectorized<acc_t>& b) {
#if defined(CPU_CAPABILITY_AVX2) || defined(CPU_CAPABILITY_AVX512)
  return at::vec::fmadd(a, z, b);
#else
  using V = at::vec::Vectorized<acc_t>;
  acc_t av[V::size()], zv[V::size()], bv[V::size()];
  a.store(av);
  z.store(zv);
  b.store(bv);
  for (int i = 0; i < V::size(); ++i) av[i] = std::fma(av[i], zv[i], bv[i]);
  return V::loadu(av);
#endif
}

// min that propagates NaN from either side, as torch.amin.
template <typename acc_t>
inline acc_t nan_min(acc_t m, acc_t v) {
  return (std::isnan(v) || v < m) ? v : m;
}

// min counterpart of cpu_vec.h's max_ignoring_nan (one instruction; NaN found from a sum).
template <typename V>
inline V min_ignoring_nan(const V& a, const V& b) {
#if defined(CPU_CAPABILITY_AVX2)
  if constexpr (std::is_same_v<V, at::vec::Vectorized<float>>) {
    return _mm256_min_ps(a, b);
  } else if constexpr (std::is_same_v<V, at::vec::Vectorized<double>>) {
    return _mm256_min_pd(a, b);
  } else {
    return at::vec::minimum(a, b);
  }
#else
  return at::vec::minimum(a, b);
#endif
}

// (value, count) of an extremum merged with another part's: the larger (kMax) or smaller wins
// with its count, equal ones add their counts; a NaN wins with count 0 (z == NaN holds nowhere).
template <bool kMax, typename acc_t>
inline void merge_extreme(acc_t& v, acc_t& n, acc_t bv, acc_t bn) {
  if (std::isnan(v)) return;
  if (std::isnan(bv)) {
    v = bv;
    n = 0;
  } else if (kMax ? bv > v : bv < v) {
    v = bv;
    n = bn;
  } else if (bv == v) {
    n += bn;
  }
}

// One value into a running (max, ties): a NaN makes the max NaN (its count is zeroed at the end).
template <typename acc_t>
inline void online_max(acc_t& m, acc_t& n, acc_t x) {
  if (x > m) {
    m = x;
    n = 1;
  } else if (x == m) {
    n += 1;
  } else if (std::isnan(x)) {
    m = x;
  }
}
// The running (max, ties) of a vector's lanes merged into (m, n).
template <typename acc_t>
inline void merge_lanes(acc_t& m, acc_t& n, const at::vec::Vectorized<acc_t>& vm,
                        const at::vec::Vectorized<acc_t>& vn) {
  constexpr int kSize = at::vec::Vectorized<acc_t>::size();
  acc_t lm[kSize], ln[kSize];
  vm.store(lm);
  vn.store(ln);
  for (int i = 0; i < kSize; ++i) merge_extreme<true>(m, n, lm[i], ln[i]);
}

// Group-0 membership lanes (all ones) from a row of 1 / 0 values.
template <typename V>
inline V member_bits(const V& m) {
  return m != V(0);
}
// v0 in group 0's lanes, v1 in the others.
template <typename V>
inline V pick(const V& v0, const V& v1, const V& in0) {
  return V::blendv(v1, v0, in0);
}

// The mask as pointers: bools for NCHW's per-plane choice, 1 / 0 in acc for channels_last's
// lanes. Empty when G = 1.
struct Groups {
  at::Tensor mask, member;
  Groups(const std::optional<at::Tensor>& m, const at::Tensor& z, bool channels_last) {
    if (!m.has_value()) return;
    mask = m->contiguous();
    if (channels_last) member = mask.to(acc_type(z.scalar_type()));
  }
  const bool* bools() const { return mask.defined() ? mask.const_data_ptr<bool>() : nullptr; }
  template <typename acc_t>
  const acc_t* lanes() const {
    return member.defined() ? member.const_data_ptr<acc_t>() : nullptr;
  }
};

// The group of channel c of sample n, from the (N, C) mask (nullptr: one group).
inline int64_t group_of(const bool* mask, int64_t nc) { return mask == nullptr || mask[nc] ? 0 : 1; }

// (N, k, H, W) pixel maps of z in acc, NCHW-contiguous.
at::Tensor pixel_maps(const at::Tensor& z, int64_t k) {
  return at::empty({z.size(0), k, z.size(2), z.size(3)}, acc_options(z));
}

// (N, blocks, C) per-block partial rows summed over the blocks in order into (N, C) rows.
template <typename acc_t>
void sum_partials(const acc_t* part, int64_t N, int64_t blocks, int64_t C, acc_t* out) {
  at::parallel_for(0, N, 1, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      acc_t* o = out + n * C;
      std::copy(part + n * blocks * C, part + (n * blocks + 1) * C, o);
      for (int64_t k = 1; k < blocks; ++k) {
        at::vec::map2<acc_t>([](auto u, auto v) { return u + v; }, o, o, part + (n * blocks + k) * C, C);
      }
    }
  });
}

// part[0:len] += local[0:len]; local = 0: a channels_last task's rows folded into its partials.
template <typename acc_t>
void fold_rows(acc_t* part, acc_t* local, int64_t len) {
  at::vec::map2<acc_t>([](auto u, auto v) { return u + v; }, part, part, local, len);
  std::fill(local, local + len, acc_t(0));
}

// ---------------------------------------------------------------- spatial_tail_stats

// The six statistics of a plane, or of a row of C planes: mean, m2, max, min and their ties.
enum Stat { kMean, kM2, kMax, kMin, kNMax, kNMin, kStats };

// Pass 1 over len contiguous values: sum (z - k), max, min.
template <typename scalar_t>
void stats_pass1(const scalar_t* z, int64_t len, at::opmath_type<scalar_t> k, at::opmath_type<scalar_t>* r) {
  using S = Step<scalar_t>;
  using acc_t = typename S::acc_t;
  using V = typename S::AccVec;
  constexpr int U = kLanes / S::kVecs;
  const V vk(k);
  V sum[kLanes], mx[kLanes], mn[kLanes], v[S::kVecs];
  for (int j = 0; j < kLanes; ++j) {
    sum[j] = V(0);
    mx[j] = V(-std::numeric_limits<acc_t>::infinity());
    mn[j] = V(std::numeric_limits<acc_t>::infinity());
  }
  int64_t i = 0;
  for (; i + U * S::kWidth <= len; i += U * S::kWidth) {
    for (int u = 0; u < U; ++u) {
      S::load(z + i + u * S::kWidth, v);
      for (int j = 0; j < S::kVecs; ++j) {
        const int l = u * S::kVecs + j;
        sum[l] += v[j] - vk;
        mx[l] = at::vec::maximum(mx[l], v[j]);
        mn[l] = at::vec::minimum(mn[l], v[j]);
      }
    }
  }
  acc_t s = 0, m = -std::numeric_limits<acc_t>::infinity(), n = std::numeric_limits<acc_t>::infinity();
  for (int l = 0; l < kLanes; ++l) {
    s += reduce_sum(sum[l]);
    m = nan_max(m, reduce_max(mx[l]));
    n = nan_min(n, at::vec::vec_reduce_all<acc_t>([](V& a, V& b) { return at::vec::minimum(a, b); }, mn[l]));
  }
  for (; i < len; ++i) {
    const acc_t x = static_cast<acc_t>(z[i]);
    s += x - k;
    m = nan_max(m, x);
    n = nan_min(n, x);
  }
  r[kMean] = s / static_cast<acc_t>(len);
  r[kMax] = m;
  r[kMin] = n;
}

// Pass 2 (the values in cache): sum ((z - k) - mean)^2 and the ties of pass 1's max and min.
template <typename scalar_t>
void stats_pass2(const scalar_t* z, int64_t len, at::opmath_type<scalar_t> k, at::opmath_type<scalar_t>* r) {
  using S = Step<scalar_t>;
  using acc_t = typename S::acc_t;
  using V = typename S::AccVec;
  constexpr int U = kLanes / S::kVecs;
  const V vk(k), vm(r[kMean]), vmax(r[kMax]), vmin(r[kMin]);
  V m2[kLanes], nmax[kLanes], nmin[kLanes], v[S::kVecs];
  for (int j = 0; j < kLanes; ++j) m2[j] = nmax[j] = nmin[j] = V(0);
  int64_t i = 0;
  for (; i + U * S::kWidth <= len; i += U * S::kWidth) {
    for (int u = 0; u < U; ++u) {
      S::load(z + i + u * S::kWidth, v);
      for (int j = 0; j < S::kVecs; ++j) {
        const int l = u * S::kVecs + j;
        const V d = (v[j] - vk) - vm;
        m2[l] = at::vec::fmadd(d, d, m2[l]);
        nmax[l] += v[j].eq(vmax);
        nmin[l] += v[j].eq(vmin);
      }
    }
  }
  acc_t s = 0, a = 0, b = 0;
  for (int l = 0; l < kLanes; ++l) {
    s += reduce_sum(m2[l]);
    a += reduce_sum(nmax[l]);
    b += reduce_sum(nmin[l]);
  }
  for (; i < len; ++i) {
    const acc_t x = static_cast<acc_t>(z[i]), d = (x - k) - r[kMean];
    s += d * d;
    a += acc_t(x == r[kMax]);
    b += acc_t(x == r[kMin]);
  }
  r[kM2] = s;
  r[kNMax] = a;
  r[kNMin] = b;
}

// Rows run[kStats][stride] of `count_a` values merged with part's of count_b more, len channels.
template <typename acc_t>
void merge_stats(acc_t* run, int64_t count_a, const acc_t* part, int64_t count_b, int64_t len, int64_t stride) {
  chan_merge(run + kMean * stride, run + kM2 * stride, count_a, part + kMean * stride, part + kM2 * stride, count_b,
             len);
  for (int64_t c = 0; c < len; ++c) {
    if (count_a == 0) {
      for (int s : {kMax, kMin, kNMax, kNMin}) run[s * stride + c] = part[s * stride + c];
      continue;
    }
    merge_extreme<true>(run[kMax * stride + c], run[kNMax * stride + c], part[kMax * stride + c],
                        part[kNMax * stride + c]);
    merge_extreme<false>(run[kMin * stride + c], run[kNMin * stride + c], part[kMin * stride + c],
                         part[kNMin * stride + c]);
  }
}

// One NCHW plane of hw > 0 values: two passes per sub-block, merged across; into out[s][0].
template <typename scalar_t>
void stats_plane(const scalar_t* z, int64_t hw, at::opmath_type<scalar_t>* const* out, int64_t plane) {
  using acc_t = at::opmath_type<scalar_t>;
  const acc_t k = shift_of(static_cast<acc_t>(z[0]));
  acc_t run[kStats], part[kStats];
  for (int64_t i0 = 0; i0 < hw; i0 += kSubBlock) {
    const int64_t len = std::min(kSubBlock, hw - i0);
    stats_pass1(z + i0, len, k, part);
    stats_pass2(z + i0, len, k, part);
    merge_stats(run, i0, part, len, 1, 1);
  }
  run[kMean] += k;
  for (int s = 0; s < kStats; ++s) out[s][plane] = run[s];
}

// Row versions over the C channels of R consecutive channels_last pixels (the accumulator rows
// are loaded and stored once per R pixels): pass 1 adds z - k into r[kMean] and takes max and
// min (without NaN propagation: the caller finds a NaN from the sum); pass 2 adds the deviations
// from r[kMean] and the ties.
template <int R, typename scalar_t>
void stats_rows1(const scalar_t* z, int64_t C, const at::opmath_type<scalar_t>* k, at::opmath_type<scalar_t>* r) {
  using S = Step<scalar_t>;
  using acc_t = typename S::acc_t;
  typename S::AccVec v[S::kVecs], vk[S::kVecs], s[S::kVecs], mx[S::kVecs], mn[S::kVecs];
  acc_t *sum = r + kMean * C, *rmax = r + kMax * C, *rmin = r + kMin * C;
  int64_t c = 0;
  for (; c + S::kWidth <= C; c += S::kWidth) {
    S::load_acc(k + c, vk);
    S::load_acc(sum + c, s);
    S::load_acc(rmax + c, mx);
    S::load_acc(rmin + c, mn);
    for (int q = 0; q < R; ++q) {
      S::load(z + q * C + c, v);
      for (int j = 0; j < S::kVecs; ++j) {
        s[j] += v[j] - vk[j];
        mx[j] = max_ignoring_nan(mx[j], v[j]);
        mn[j] = min_ignoring_nan(mn[j], v[j]);
      }
    }
    S::store_acc(sum + c, s);
    S::store_acc(rmax + c, mx);
    S::store_acc(rmin + c, mn);
  }
  for (; c < C; ++c) {
    for (int q = 0; q < R; ++q) {
      const acc_t x = static_cast<acc_t>(z[q * C + c]);
      sum[c] += x - k[c];
      rmax[c] = nan_max(rmax[c], x);
      rmin[c] = nan_min(rmin[c], x);
    }
  }
}

template <int R, typename scalar_t>
void stats_rows2(const scalar_t* z, int64_t C, const at::opmath_type<scalar_t>* k, at::opmath_type<scalar_t>* r) {
  using S = Step<scalar_t>;
  using acc_t = typename S::acc_t;
  typename S::AccVec v[S::kVecs], vk[S::kVecs], vm[S::kVecs], mx[S::kVecs], mn[S::kVecs], m2[S::kVecs],
      a[S::kVecs], b[S::kVecs];
  const acc_t *mean = r + kMean * C, *rmax = r + kMax * C, *rmin = r + kMin * C;
  acc_t *rm2 = r + kM2 * C, *nmax = r + kNMax * C, *nmin = r + kNMin * C;
  int64_t c = 0;
  for (; c + S::kWidth <= C; c += S::kWidth) {
    S::load_acc(k + c, vk);
    S::load_acc(mean + c, vm);
    S::load_acc(rmax + c, mx);
    S::load_acc(rmin + c, mn);
    S::load_acc(rm2 + c, m2);
    S::load_acc(nmax + c, a);
    S::load_acc(nmin + c, b);
    for (int q = 0; q < R; ++q) {
      S::load(z + q * C + c, v);
      for (int j = 0; j < S::kVecs; ++j) {
        const auto d = (v[j] - vk[j]) - vm[j];
        m2[j] = at::vec::fmadd(d, d, m2[j]);
        a[j] += v[j].eq(mx[j]);
        b[j] += v[j].eq(mn[j]);
      }
    }
    S::store_acc(rm2 + c, m2);
    S::store_acc(nmax + c, a);
    S::store_acc(nmin + c, b);
  }
  for (; c < C; ++c) {
    for (int q = 0; q < R; ++q) {
      const acc_t x = static_cast<acc_t>(z[q * C + c]), d = (x - k[c]) - mean[c];
      rm2[c] += d * d;
      nmax[c] += acc_t(x == rmax[c]);
      nmin[c] += acc_t(x == rmin[c]);
    }
  }
}

// pass(z + p * C) over the rows [q0, q1), four at a time.
template <typename F1, typename F4>
inline void by_fours(int64_t q0, int64_t q1, const F1& one, const F4& four) {
  int64_t p = q0;
  for (; p + 4 <= q1; p += 4) four(p);
  for (; p < q1; ++p) one(p);
}

// The statistics of z - k over the pixels [p0, p1) of one channels_last sample z_n into
// run[kStats][C]: sub-blocks of about kSubBlock values, each read twice while in cache.
template <typename scalar_t>
void stats_chunk(const scalar_t* z_n, int64_t C, int64_t p0, int64_t p1, const at::opmath_type<scalar_t>* k,
                 at::opmath_type<scalar_t>* run) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t rows = std::clamp<int64_t>(kSubBlock / std::max<int64_t>(C, 1), 1, kStatsRows);
  std::vector<acc_t> buf(kStats * C);
  acc_t* part = buf.data();
  for (int64_t q0 = p0; q0 < p1; q0 += rows) {
    const int64_t q1 = std::min(p1, q0 + rows);
    std::fill(part, part + kStats * C, acc_t(0));
    std::fill(part + kMax * C, part + (kMax + 1) * C, -std::numeric_limits<acc_t>::infinity());
    std::fill(part + kMin * C, part + (kMin + 1) * C, std::numeric_limits<acc_t>::infinity());
    by_fours(q0, q1, [&](int64_t p) { stats_rows1<1>(z_n + p * C, C, k, part); },
             [&](int64_t p) { stats_rows1<4>(z_n + p * C, C, k, part); });
    for (int64_t c = 0; c < C; ++c) {
      acc_t& mean = part[kMean * C + c];
      if (std::isnan(mean)) {  // a NaN, or +inf and -inf: the extrema must be NaN if a value is
        for (int64_t p = q0; p < q1; ++p) {
          if (std::isnan(static_cast<acc_t>(z_n[p * C + c]))) {
            part[kMax * C + c] = part[kMin * C + c] = std::numeric_limits<acc_t>::quiet_NaN();
          }
        }
      }
      mean /= static_cast<acc_t>(q1 - q0);
    }
    by_fours(q0, q1, [&](int64_t p) { stats_rows2<1>(z_n + p * C, C, k, part); },
             [&](int64_t p) { stats_rows2<4>(z_n + p * C, C, k, part); });
    merge_stats(run, q0 - p0, part, q1 - q0, C, C);
  }
}

// Every block of a sample shares its shifts (its first pixel's row), so blocks merge shifted.
template <typename scalar_t>
void stats_channels_last(const scalar_t* z, int64_t N, int64_t C, int64_t hw, at::opmath_type<scalar_t>* const* out) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t blocks = blocks_of(hw);
  std::vector<acc_t> part(N * blocks * kStats * C);  // (N, blocks, kStats, C)
  auto shifts = [&](int64_t n, acc_t* k) {
    for (int64_t c = 0; c < C; ++c) k[c] = shift_of(static_cast<acc_t>(z[n * hw * C + c]));
  };
  for_pixel_blocks(N, hw, [&](int64_t n, int64_t j, int64_t p0, int64_t p1) {
    std::vector<acc_t> k(C);
    shifts(n, k.data());
    stats_chunk(z + n * hw * C, C, p0, p1, k.data(), part.data() + (n * blocks + j) * kStats * C);
  });
  at::parallel_for(0, N, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> k(C), run(kStats * C);
    for (int64_t n = begin; n < end; ++n) {
      for (int64_t j = 0; j < blocks; ++j) {
        const int64_t p0 = j * kBlock;
        merge_stats(run.data(), p0, part.data() + (n * blocks + j) * kStats * C, std::min(hw, p0 + kBlock) - p0, C,
                    C);
      }
      shifts(n, k.data());
      for (int64_t c = 0; c < C; ++c) run[kMean * C + c] += k[c];
      for (int s = 0; s < kStats; ++s) std::copy(run.data() + s * C, run.data() + (s + 1) * C, out[s] + n * C);
    }
  });
}

using Tensor6 = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

Tensor6 spatial_tail_stats_cpu(const at::Tensor& z_in) {
  check_feature_map(z_in, "spatial_tail_stats", "z");
  const at::Tensor z = dense(z_in);
  const int64_t N = z.size(0), C = z.size(1), hw = z.size(2) * z.size(3);
  std::vector<at::Tensor> all;
  for (int s = 0; s < kStats; ++s) all.push_back(at::empty({N, C}, acc_options(z)));
  if (N * C > 0 && hw == 0) {  // P = 0: mean 0 / 0, no extrema, no ties
    const double inf = std::numeric_limits<double>::infinity();
    all[kMean].fill_(std::numeric_limits<double>::quiet_NaN());
    all[kMax].fill_(-inf);
    all[kMin].fill_(inf);
    for (int s : {kM2, kNMax, kNMin}) all[s].zero_();
  } else if (N * C > 0) {
    AK_DISPATCH_FEATURE(z, "spatial_tail_stats_cpu", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      const scalar_t* zp = z.const_data_ptr<scalar_t>();
      acc_t* out[kStats];
      for (int s = 0; s < kStats; ++s) out[s] = all[s].data_ptr<acc_t>();
      if (layout_of(z) == Layout::ChannelsLast) {
        stats_channels_last(zp, N, C, hw, out);
      } else {
        at::parallel_for(0, N * C, plane_grain(hw), [&](int64_t begin, int64_t end) {
          for (int64_t p = begin; p < end; ++p) stats_plane(zp + p * hw, hw, out, p);
        });
      }
    });
  }
  return {all[kMean], all[kM2], all[kMax], all[kMin], all[kNMax], all[kNMin]};
}

// ---------------------------------------------------------------- spatial_tail_pool

// The running (max, ties) of a vector with K more values x1[k]: max_ignoring_nan (one
// instruction) may lose a NaN, which the caller finds from the sum (NaN then too).
template <int K, typename V>
inline void online_max_fast(V& m, V& n, const V (&x1)[K]) {
  for (int k = 0; k < K; ++k) {
    const V gt = x1[k] > m, eq = x1[k] == m;
    m = max_ignoring_nan(m, x1[k]);
    n = V::blendv(n + (eq & V(1)), V(1), gt);
  }
}

// K NCHW channels' runs of len pixels (z[k], with a[k], b[k]) into one group's per-pixel sum, max
// and ties: the accumulators are loaded and stored once per K channels (one channel at a time
// measured 1.7x slower, 13.4 -> 7.7 ms at one thread for 32x256x56x56 fp32).
template <int K, typename scalar_t>
void pool_run(const scalar_t* const* z, int64_t len, const at::opmath_type<scalar_t>* a,
              const at::opmath_type<scalar_t>* b, at::opmath_type<scalar_t>* sum, at::opmath_type<scalar_t>* mx,
              at::opmath_type<scalar_t>* cnt) {
  using S = Step<scalar_t>;
  using acc_t = typename S::acc_t;
  using V = typename S::AccVec;
  V va[K], vb[K];
  for (int k = 0; k < K; ++k) va[k] = V(a[k]), vb[k] = V(b[k]);
  V v[S::kVecs], s[S::kVecs], m[S::kVecs], n[S::kVecs], x1[S::kVecs][K];
  int64_t i = 0;
  for (; i + S::kWidth <= len; i += S::kWidth) {
    for (int k = 0; k < K; ++k) {
      S::load(z[k] + i, v);
      for (int j = 0; j < S::kVecs; ++j) x1[j][k] = x1_of(va[k], v[j], vb[k]);
    }
    S::load_acc(sum + i, s);
    S::load_acc(mx + i, m);
    S::load_acc(cnt + i, n);
    for (int j = 0; j < S::kVecs; ++j) {
      for (int k = 0; k < K; ++k) s[j] += x1[j][k];
      online_max_fast<K>(m[j], n[j], x1[j]);
    }
    S::store_acc(sum + i, s);
    S::store_acc(mx + i, m);
    S::store_acc(cnt + i, n);
  }
  for (; i < len; ++i) {
    for (int k = 0; k < K; ++k) {
      const acc_t x = x1_of(a[k], static_cast<acc_t>(z[k][i]), b[k]);
      sum[i] += x;
      online_max(mx[i], cnt[i], x);
    }
  }
}

// The pixels [p0, p0 + len) of NCHW sample z_n (C planes of hw) into d_n (3G rows of hw): each
// group's channels in order, four at a time.
template <bool kTwo, typename scalar_t>
void pool_block_nchw(const scalar_t* z_n, int64_t C, int64_t hw, int64_t p0, int64_t len,
                     const at::opmath_type<scalar_t>* a, const at::opmath_type<scalar_t>* b, const bool* mask,
                     at::opmath_type<scalar_t>* d_n) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int G = kTwo ? 2 : 1;
  std::vector<int64_t> members[G];
  for (int64_t c = 0; c < C; ++c) members[kTwo ? group_of(mask, c) : 0].push_back(c);
  for (int g = 0; g < G; ++g) {
    acc_t* d = d_n + 3 * g * hw + p0;
    std::fill(d, d + len, acc_t(0));
    std::fill(d + hw, d + hw + len, -std::numeric_limits<acc_t>::infinity());
    std::fill(d + 2 * hw, d + 2 * hw + len, acc_t(0));
    const std::vector<int64_t>& cs = members[g];
    const scalar_t* zc[4];
    acc_t ac[4], bc[4];
    size_t i = 0;
    for (; i < cs.size(); i += 4) {
      const int k = static_cast<int>(std::min<size_t>(4, cs.size() - i));
      for (int j = 0; j < k; ++j) {
        zc[j] = z_n + cs[i + j] * hw + p0;
        ac[j] = a[cs[i + j]];
        bc[j] = b[cs[i + j]];
      }
      if (k == 4) {
        pool_run<4>(zc, len, ac, bc, d, d + hw, d + 2 * hw);
      } else {
        for (int j = 0; j < k; ++j) pool_run<1>(zc + j, len, ac + j, bc + j, d, d + hw, d + 2 * hw);
      }
    }
    // A NaN sum: a NaN x1 (the maximum is NaN, tying nothing: x1 == NaN is false), or +inf
    // and -inf both (the maximum is right).
    for (int64_t q = 0; q < len; ++q) {
      if (!std::isnan(d[q])) continue;
      for (int64_t c : cs) {
        if (std::isnan(x1_of(a[c], static_cast<acc_t>(z_n[c * hw + p0 + q]), b[c]))) {
          d[hw + q] = std::numeric_limits<acc_t>::quiet_NaN();
          d[2 * hw + q] = 0;
          break;
        }
      }
    }
  }
}

// One channels_last pixel row of C channels: its groups' sum, max and ties into d[k * hw]. With
// two groups each lane's x1 enters its own group's max and -inf the other's; a group's maximum
// of -inf (no channel, or every x1 -inf) then has its ties counted again without the stand-ins,
// and a NaN sum (a NaN x1, which max_ignoring_nan may lose, or +inf and -inf) is checked.
template <bool kTwo, typename scalar_t>
void pool_row(const scalar_t* z, int64_t C, const at::opmath_type<scalar_t>* a, const at::opmath_type<scalar_t>* b,
              const at::opmath_type<scalar_t>* member, at::opmath_type<scalar_t>* d, int64_t hw) {
  using S = Step<scalar_t>;
  using acc_t = typename S::acc_t;
  using V = typename S::AccVec;
  constexpr int G = kTwo ? 2 : 1;
  const acc_t lowest = -std::numeric_limits<acc_t>::infinity();
  V v[S::kVecs], va[S::kVecs], vb[S::kVecs], in[S::kVecs];
  V s[G][S::kVecs], m[G][S::kVecs], n[G][S::kVecs];
  for (int g = 0; g < G; ++g) {
    for (int j = 0; j < S::kVecs; ++j) {
      s[g][j] = n[g][j] = V(0);
      m[g][j] = V(lowest);
    }
  }
  int64_t c = 0;
  for (; c + S::kWidth <= C; c += S::kWidth) {
    S::load(z + c, v);
    S::load_acc(a + c, va);
    S::load_acc(b + c, vb);
    if constexpr (kTwo) S::load_acc(member + c, in);
    for (int j = 0; j < S::kVecs; ++j) {
      const V x1 = x1_of(va[j], v[j], vb[j]);
      if constexpr (kTwo) {
        const V in0 = member_bits(in[j]), zero(0), low(lowest);
        s[0][j] += pick(x1, zero, in0);
        s[1][j] += pick(zero, x1, in0);
        const V x0[1] = {pick(x1, low, in0)}, xo[1] = {pick(low, x1, in0)};
        online_max_fast<1>(m[0][j], n[0][j], x0);
        online_max_fast<1>(m[1][j], n[1][j], xo);
      } else {
        const V x[1] = {x1};
        s[0][j] += x1;
        online_max_fast<1>(m[0][j], n[0][j], x);
      }
    }
  }
  acc_t sum[G], mx[G], cnt[G];
  for (int g = 0; g < G; ++g) {
    sum[g] = 0;
    mx[g] = lowest;
    cnt[g] = 0;
    for (int j = 0; j < S::kVecs; ++j) {
      sum[g] += reduce_sum(s[g][j]);
      merge_lanes(mx[g], cnt[g], m[g][j], n[g][j]);
    }
  }
  for (; c < C; ++c) {
    const acc_t x1 = x1_of(a[c], static_cast<acc_t>(z[c]), b[c]);
    const int g = kTwo && member[c] == acc_t(0) ? 1 : 0;
    sum[g] += x1;
    online_max(mx[g], cnt[g], x1);
  }
  for (int g = 0; g < G; ++g) {
    const bool nan_sum = std::isnan(sum[g]);
    if (nan_sum || (kTwo && mx[g] == lowest)) {
      acc_t ties = 0;
      for (int64_t q = 0; q < C; ++q) {
        if (kTwo && (member[q] != acc_t(0)) != (g == 0)) continue;
        const acc_t x1 = x1_of(a[q], static_cast<acc_t>(z[q]), b[q]);
        if (std::isnan(x1)) {
          mx[g] = x1;
          break;
        }
        ties += acc_t(x1 == lowest);
      }
      if (!nan_sum) cnt[g] = ties;
    }
    d[3 * g * hw] = sum[g];
    d[(3 * g + 1) * hw] = mx[g];
    d[(3 * g + 2) * hw] = std::isnan(mx[g]) ? acc_t(0) : cnt[g];
  }
}

at::Tensor spatial_tail_pool_cpu(const at::Tensor& z_in, const at::Tensor& a_in, const at::Tensor& b_in,
                                 const std::optional<at::Tensor>& mask) {
  const char* op = "spatial_tail_pool";
  const int64_t G = check_spatial_tail_x1_args(z_in, a_in, b_in, mask, op);
  const at::Tensor z = dense(z_in);
  const int64_t N = z.size(0), C = z.size(1), hw = z.size(2) * z.size(3);
  at::Tensor d = pixel_maps(z, 3 * G);
  if (d.numel() == 0) return d;
  if (C == 0) {  // no channel in any group: sums 0, maxima -inf, no ties
    for (int64_t g = 0; g < G; ++g) {
      d.select(1, 3 * g).zero_();
      d.select(1, 3 * g + 1).fill_(-std::numeric_limits<double>::infinity());
      d.select(1, 3 * g + 2).zero_();
    }
    return d;
  }
  const at::Tensor a = a_in.contiguous(), b = b_in.contiguous();
  const bool channels_last = layout_of(z) == Layout::ChannelsLast;
  const Groups groups(mask, z, channels_last);
  AK_DISPATCH_FEATURE(z, "spatial_tail_pool_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* zp = z.const_data_ptr<scalar_t>();
    const acc_t *ap = a.const_data_ptr<acc_t>(), *bp = b.const_data_ptr<acc_t>();
    const bool* mk = groups.bools();
    const acc_t* member = groups.lanes<acc_t>();
    acc_t* dp = d.data_ptr<acc_t>();
    with_flag(G == 2, [&](auto two) {
      constexpr bool kTwo = decltype(two)::value;
      for_pixel_blocks(N, hw, [&](int64_t n, int64_t, int64_t p0, int64_t p1) {
        const int64_t nc = n * C;
        acc_t* d_n = dp + n * 3 * G * hw;
        if (!channels_last) {
          pool_block_nchw<kTwo>(zp + nc * hw, C, hw, p0, p1 - p0, ap + nc, bp + nc, kTwo ? mk + nc : nullptr, d_n);
          return;
        }
        for (int64_t p = p0; p < p1; ++p) {
          pool_row<kTwo>(zp + (n * hw + p) * C, C, ap + nc, bp + nc, kTwo ? member + nc : nullptr, d_n + p, hw);
        }
      });
    });
  });
  return d;
}

// ---------------------------------------------------------------- spatial_tail_apply

// relu(s * x1 + shortcut) by torch's rule (a NaN stays NaN).
template <typename V>
inline V tail(const V& x1, const V& s, const V& y) {
  const V t = at::vec::fmadd(s, x1, y);
  return V::blendv(t, V(0), t < V(0));
}
template <typename acc_t>
inline acc_t tail_one(acc_t x1, acc_t s, acc_t y) {
  return relu(std::fma(s, x1, y));
}

// One NCHW plane of len values with its (n, c)'s a, b and its group's gate row s.
template <bool kStream, typename scalar_t>
void apply_plane(const scalar_t* z, const scalar_t* y, scalar_t* out, int64_t len, at::opmath_type<scalar_t> a,
                 at::opmath_type<scalar_t> b, const at::opmath_type<scalar_t>* s) {
  using S = Step<scalar_t>;
  using V = typename S::AccVec;
  using acc_t = typename S::acc_t;
  const V va(a), vb(b);
  V zv[S::kVecs], yv[S::kVecs], sv[S::kVecs];
  int64_t i = 0;
  for (; i + S::kWidth <= len; i += S::kWidth) {
    S::load(z + i, zv);
    S::load(y + i, yv);
    S::load_acc(s + i, sv);
    for (int j = 0; j < S::kVecs; ++j) zv[j] = tail(x1_of(va, zv[j], vb), sv[j], yv[j]);
    S::store(out + i, zv, kStream);
  }
  for (; i < len; ++i) {
    out[i] = static_cast<scalar_t>(tail_one(x1_of(a, acc_t(z[i]), b), s[i], acc_t(y[i])));
  }
}

// One channels_last pixel row of C values; s0, s1: the pixel's gates of groups 0 and 1.
template <bool kTwo, bool kStream, typename scalar_t>
void apply_row(const scalar_t* z, const scalar_t* y, scalar_t* out, int64_t C, const at::opmath_type<scalar_t>* a,
               const at::opmath_type<scalar_t>* b, const at::opmath_type<scalar_t>* member,
               at::opmath_type<scalar_t> s0, at::opmath_type<scalar_t> s1) {
  using S = Step<scalar_t>;
  using V = typename S::AccVec;
  using acc_t = typename S::acc_t;
  const V vs0(s0), vs1(s1);
  V zv[S::kVecs], yv[S::kVecs], va[S::kVecs], vb[S::kVecs], in[S::kVecs];
  int64_t c = 0;
  for (; c + S::kWidth <= C; c += S::kWidth) {
    S::load(z + c, zv);
    S::load(y + c, yv);
    S::load_acc(a + c, va);
    S::load_acc(b + c, vb);
    if constexpr (kTwo) S::load_acc(member + c, in);
    for (int j = 0; j < S::kVecs; ++j) {
      const V s = kTwo ? pick(vs0, vs1, member_bits(in[j])) : vs0;
      zv[j] = tail(x1_of(va[j], zv[j], vb[j]), s, yv[j]);
    }
    S::store(out + c, zv, kStream);
  }
  for (; c < C; ++c) {
    const acc_t s = kTwo && member[c] == acc_t(0) ? s1 : s0;
    out[c] = static_cast<scalar_t>(tail_one(x1_of(a[c], acc_t(z[c]), b[c]), s, acc_t(y[c])));
  }
}

at::Tensor spatial_tail_apply_cpu(const at::Tensor& z_in, const at::Tensor& shortcut_in, const at::Tensor& a_in,
                                  const at::Tensor& b_in, const at::Tensor& s_in,
                                  const std::optional<at::Tensor>& mask) {
  const char* op = "spatial_tail_apply";
  const int64_t G = check_spatial_tail_apply_args(z_in, shortcut_in, a_in, b_in, s_in, mask, op);
  const at::Tensor z = dense(z_in);
  const at::Tensor y = walked_like_x(shortcut_in, z, op, "shortcut");
  at::Tensor out = empty_like_layout(z);
  if (z.numel() == 0) return out;
  const at::Tensor a = a_in.contiguous(), b = b_in.contiguous(), s = s_in.contiguous();
  const int64_t N = z.size(0), C = z.size(1), hw = z.size(2) * z.size(3);
  const bool channels_last = layout_of(z) == Layout::ChannelsLast;
  const Groups groups(mask, z, channels_last);
  const bool stream = should_stream(3 * z.nbytes());  // reads z and shortcut, writes out
  AK_DISPATCH_FEATURE(z, "spatial_tail_apply_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t *zp = z.const_data_ptr<scalar_t>(), *yp = y.const_data_ptr<scalar_t>();
    scalar_t* op_ = out.data_ptr<scalar_t>();
    const acc_t *ap = a.const_data_ptr<acc_t>(), *bp = b.const_data_ptr<acc_t>(), *sp = s.const_data_ptr<acc_t>();
    const bool* mk = groups.bools();
    const acc_t* member = groups.lanes<acc_t>();
    with_flag(G == 2, [&](auto two) {
      with_flag(stream, [&](auto streamed) {
        constexpr bool kTwo = decltype(two)::value, kStream = decltype(streamed)::value;
        if (channels_last) {
          for_pixel_blocks(N, hw, [&](int64_t n, int64_t, int64_t p0, int64_t p1) {
            const int64_t nc = n * C;
            const acc_t* s_n = sp + n * G * hw;
            for (int64_t p = p0; p < p1; ++p) {
              const int64_t off = (n * hw + p) * C;
              apply_row<kTwo, kStream>(zp + off, yp + off, op_ + off, C, ap + nc, bp + nc,
                                       kTwo ? member + nc : nullptr, s_n[p], kTwo ? s_n[hw + p] : acc_t(0));
            }
            if constexpr (kStream) stream_fence();
          });
          return;
        }
        at::parallel_for(0, N * C, plane_grain(hw), [&](int64_t begin, int64_t end) {
          for (int64_t q = begin; q < end; ++q) {
            const int64_t off = q * hw, n = q / C;
            const acc_t* s_g = sp + (n * G + (kTwo ? group_of(mk, q) : 0)) * hw;
            apply_plane<kStream>(zp + off, yp + off, op_ + off, hw, ap[q], bp[q], s_g);
          }
          if constexpr (kStream) stream_fence();
        });
      });
    });
  });
  return out;
}

// ---------------------------------------------------------------- spatial_tail_backward_reduce

// One NCHW channel's run of len pixels: grad_u, its group's grad_s += grad_u * x1, and the
// channel's sums s1 += grad_u * s_g, s2 += grad_u * s_g * z (returned in *s1, *s2).
template <bool kStream, typename scalar_t>
void reduce_run(const scalar_t* grad_out, const scalar_t* out, const scalar_t* z, scalar_t* grad_u, int64_t len,
                at::opmath_type<scalar_t> a, at::opmath_type<scalar_t> b, const at::opmath_type<scalar_t>* s,
                at::opmath_type<scalar_t>* gs, at::opmath_type<scalar_t>* s1, at::opmath_type<scalar_t>* s2) {
  using S = Step<scalar_t>;
  using V = typename S::AccVec;
  using acc_t = typename S::acc_t;
  const V va(a), vb(b);
  // Two accumulator sets (one add chain would wait on the add's latency), folded into f1, f2.
  V a1[2][S::kVecs], a2[2][S::kVecs], f1[S::kVecs], f2[S::kVecs];
  for (int j = 0; j < S::kVecs; ++j) a1[0][j] = a2[0][j] = a1[1][j] = a2[1][j] = f1[j] = f2[j] = V(0);
  auto step = [va, vb](const scalar_t* go, const scalar_t* ou, const scalar_t* zi, scalar_t* gu, const acc_t* si,
                       acc_t* gsi, V(&u1)[S::kVecs], V(&u2)[S::kVecs]) {
    V g[S::kVecs], o[S::kVecs], zv[S::kVecs], sv[S::kVecs], gv[S::kVecs];
    S::load(go, g);
    S::load(ou, o);
    S::load(zi, zv);
    S::load_acc(si, sv);
    S::load_acc(gsi, gv);
    for (int j = 0; j < S::kVecs; ++j) {
      g[j] = vec_relu_grad(g[j], o[j]);
      gv[j] = at::vec::fmadd(g[j], x1_of(va, zv[j], vb), gv[j]);
      const V t = g[j] * sv[j];
      u1[j] += t;
      u2[j] = at::vec::fmadd(t, zv[j], u2[j]);
    }
    S::store_acc(gsi, gv);
    S::store(gu, g, kStream);
  };
  int64_t i = 0;
  for (; i + 2 * S::kWidth <= len; i += 2 * S::kWidth) {
    if (i % kFoldValues == 0) {
      for (int j = 0; j < S::kVecs; ++j) {
        f1[j] += a1[0][j] + a1[1][j];
        f2[j] += a2[0][j] + a2[1][j];
        a1[0][j] = a2[0][j] = a1[1][j] = a2[1][j] = V(0);
      }
    }
    step(grad_out + i, out + i, z + i, grad_u + i, s + i, gs + i, a1[0], a2[0]);
    const int64_t k = i + S::kWidth;
    step(grad_out + k, out + k, z + k, grad_u + k, s + k, gs + k, a1[1], a2[1]);
  }
  for (; i + S::kWidth <= len; i += S::kWidth) {
    step(grad_out + i, out + i, z + i, grad_u + i, s + i, gs + i, a1[0], a2[0]);
  }
  acc_t sum1 = 0, sum2 = 0;
  for (int j = 0; j < S::kVecs; ++j) {
    sum1 += reduce_sum(f1[j] + (a1[0][j] + a1[1][j]));
    sum2 += reduce_sum(f2[j] + (a2[0][j] + a2[1][j]));
  }
  for (; i < len; ++i) {
    const acc_t gi = relu_grad(acc_t(grad_out[i]), acc_t(out[i])), zi = acc_t(z[i]);
    grad_u[i] = static_cast<scalar_t>(gi);
    gs[i] += gi * x1_of(a, zi, b);
    const acc_t t = gi * s[i];
    sum1 += t;
    sum2 += t * zi;
  }
  *s1 = sum1;
  *s2 = sum2;
}

// One channels_last pixel row: grad_u, the pixel's grad_s per group (returned in gs[0], gs[1])
// and the channels' sums added into the block's partial rows p1, p2.
template <bool kTwo, bool kStream, typename scalar_t>
void reduce_row(const scalar_t* grad_out, const scalar_t* out, const scalar_t* z, scalar_t* grad_u, int64_t C,
                const at::opmath_type<scalar_t>* a, const at::opmath_type<scalar_t>* b,
                const at::opmath_type<scalar_t>* member, at::opmath_type<scalar_t> s0, at::opmath_type<scalar_t> s1,
                at::opmath_type<scalar_t>* gs, at::opmath_type<scalar_t>* p1, at::opmath_type<scalar_t>* p2) {
  using S = Step<scalar_t>;
  using V = typename S::AccVec;
  using acc_t = typename S::acc_t;
  const V vs0(s0), vs1(s1);
  V g[S::kVecs], o[S::kVecs], zv[S::kVecs], va[S::kVecs], vb[S::kVecs], in[S::kVecs], q1[S::kVecs], q2[S::kVecs],
      u0[S::kVecs], u1[S::kVecs];
  for (int j = 0; j < S::kVecs; ++j) u0[j] = u1[j] = V(0);
  int64_t c = 0;
  for (; c + S::kWidth <= C; c += S::kWidth) {
    S::load(grad_out + c, g);
    S::load(out + c, o);
    S::load(z + c, zv);
    S::load_acc(a + c, va);
    S::load_acc(b + c, vb);
    S::load_acc(p1 + c, q1);
    S::load_acc(p2 + c, q2);
    if constexpr (kTwo) S::load_acc(member + c, in);
    for (int j = 0; j < S::kVecs; ++j) {
      g[j] = vec_relu_grad(g[j], o[j]);
      const V gx = g[j] * x1_of(va[j], zv[j], vb[j]);
      V s = vs0;
      if constexpr (kTwo) {
        const V in0 = member_bits(in[j]), zero(0);
        s = pick(vs0, vs1, in0);
        u0[j] += pick(gx, zero, in0);
        u1[j] += pick(zero, gx, in0);
      } else {
        u0[j] += gx;
      }
      const V t = g[j] * s;
      q1[j] += t;
      q2[j] = at::vec::fmadd(t, zv[j], q2[j]);
    }
    S::store_acc(p1 + c, q1);
    S::store_acc(p2 + c, q2);
    S::store(grad_u + c, g, kStream);
  }
  acc_t sum0 = 0, sum1 = 0;
  for (int j = 0; j < S::kVecs; ++j) {
    sum0 += reduce_sum(u0[j]);
    if constexpr (kTwo) sum1 += reduce_sum(u1[j]);
  }
  for (; c < C; ++c) {
    const acc_t gi = relu_grad(acc_t(grad_out[c]), acc_t(out[c])), zi = acc_t(z[c]);
    grad_u[c] = static_cast<scalar_t>(gi);
    const bool first = !kTwo || member[c] != acc_t(0);
    (first ? sum0 : sum1) += gi * x1_of(a[c], zi, b[c]);
    const acc_t t = gi * (first ? s0 : s1);
    p1[c] += t;
    p2[c] += t * zi;
  }
  gs[0] = sum0;
  gs[1] = sum1;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> spatial_tail_backward_reduce_cpu(
    const at::Tensor& grad_out_in, const at::Tensor& out_in, const at::Tensor& z_in, const at::Tensor& a_in,
    const at::Tensor& b_in, const at::Tensor& s_in, const std::optional<at::Tensor>& mask) {
  const char* op = "spatial_tail_backward_reduce";
  const int64_t G = check_spatial_tail_backward_reduce_args(grad_out_in, out_in, z_in, a_in, b_in, s_in, mask, op);
  const at::Tensor z = dense(z_in);
  const at::Tensor grad_out = walked_like_x(grad_out_in, z, op, "grad_out");
  const at::Tensor out = walked_like_x(out_in, z, op, "out");
  const int64_t N = z.size(0), C = z.size(1), hw = z.size(2) * z.size(3);
  at::Tensor grad_u = empty_like_layout(z);
  at::Tensor grad_s = pixel_maps(z, G);
  at::Tensor s1 = at::empty({N, C}, acc_options(z)), s2 = at::empty({N, C}, acc_options(z));
  if (z.numel() == 0) return {grad_u, grad_s.zero_(), s1.zero_(), s2.zero_()};
  const at::Tensor a = a_in.contiguous(), b = b_in.contiguous(), s = s_in.contiguous();
  const bool channels_last = layout_of(z) == Layout::ChannelsLast;
  const Groups groups(mask, z, channels_last);
  const bool stream = should_stream(4 * z.nbytes());  // reads grad_out, out, z; writes grad_u
  const int64_t blocks = blocks_of(hw);
  // Per-block partial rows (N, blocks, C) of s1 and s2; channels_last adds into them.
  at::Tensor part = at::zeros({2, N, blocks, C}, acc_options(z));
  AK_DISPATCH_FEATURE(z, "spatial_tail_backward_reduce_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t *gp = grad_out.const_data_ptr<scalar_t>(), *op_ = out.const_data_ptr<scalar_t>(),
                   *zp = z.const_data_ptr<scalar_t>();
    scalar_t* gu = grad_u.data_ptr<scalar_t>();
    const acc_t *ap = a.const_data_ptr<acc_t>(), *bp = b.const_data_ptr<acc_t>(), *sp = s.const_data_ptr<acc_t>();
    const bool* mk = groups.bools();
    const acc_t* member = groups.lanes<acc_t>();
    acc_t *gsp = grad_s.data_ptr<acc_t>(), *part1 = part.data_ptr<acc_t>(), *part2 = part1 + N * blocks * C;
    with_flag(G == 2, [&](auto two) {
      with_flag(stream, [&](auto streamed) {
        constexpr bool kTwo = decltype(two)::value, kStream = decltype(streamed)::value;
        for_pixel_blocks(N, hw, [&](int64_t n, int64_t j, int64_t p0, int64_t p1) {
          const int64_t nc = n * C, row = (n * blocks + j) * C, len = p1 - p0;
          const acc_t* s_n = sp + n * G * hw;
          acc_t* gs_n = gsp + n * G * hw;
          if (channels_last) {
            acc_t gs[2];
            std::vector<acc_t> local(2 * C, acc_t(0));
            for (int64_t p = p0; p < p1; ++p) {
              if (p > p0 && (p - p0) % kFoldRows == 0) {
                fold_rows(part1 + row, local.data(), C);
                fold_rows(part2 + row, local.data() + C, C);
              }
              const int64_t off = (n * hw + p) * C;
              reduce_row<kTwo, kStream>(gp + off, op_ + off, zp + off, gu + off, C, ap + nc, bp + nc,
                                        kTwo ? member + nc : nullptr, s_n[p], kTwo ? s_n[hw + p] : acc_t(0), gs,
                                        local.data(), local.data() + C);
              gs_n[p] = gs[0];
              if constexpr (kTwo) gs_n[hw + p] = gs[1];
            }
            fold_rows(part1 + row, local.data(), C);
            fold_rows(part2 + row, local.data() + C, C);
          } else {
            for (int64_t g = 0; g < G; ++g) std::fill(gs_n + g * hw + p0, gs_n + g * hw + p1, acc_t(0));
            for (int64_t c = 0; c < C; ++c) {
              const int64_t off = (nc + c) * hw + p0, g = kTwo ? group_of(mk, nc + c) : 0;
              reduce_run<kStream>(gp + off, op_ + off, zp + off, gu + off, len, ap[nc + c], bp[nc + c],
                                  s_n + g * hw + p0, gs_n + g * hw + p0, part1 + row + c, part2 + row + c);
            }
          }
          if constexpr (kStream) stream_fence();
        });
      });
    });
    sum_partials(part1, N, blocks, C, s1.data_ptr<acc_t>());
    sum_partials(part2, N, blocks, C, s2.data_ptr<acc_t>());
  });
  return {grad_u, grad_s, s1, s2};
}

// ---------------------------------------------------------------- spatial_tail_pool_backward

// r = gsum + (x1 == dmax ? gmax : 0) of one value or vector (a where, not a product: an
// infinite gmax adds nothing where x1 misses the maximum).
template <typename V>
inline V pool_grad(const V& x1, const V& dmax, const V& gsum, const V& gmax) {
  return gsum + V::blendv(V(0), gmax, x1 == dmax);
}
template <typename acc_t>
inline acc_t pool_grad_one(acc_t x1, acc_t dmax, acc_t gsum, acc_t gmax) {
  return gsum + (x1 == dmax ? gmax : acc_t(0));
}

// K NCHW channels of one group over len pixels of a block: t1[k] = sum r, t2[k] = sum r * z, the
// maps loaded once per K channels (K accumulator chains also hide the add's latency).
template <int K, typename scalar_t>
void pool_backward_run(const scalar_t* const* z, int64_t len, const at::opmath_type<scalar_t>* a,
                       const at::opmath_type<scalar_t>* b, const at::opmath_type<scalar_t>* dmax,
                       const at::opmath_type<scalar_t>* gsum, const at::opmath_type<scalar_t>* gmax,
                       at::opmath_type<scalar_t>* const* t1, at::opmath_type<scalar_t>* const* t2) {
  using S = Step<scalar_t>;
  using V = typename S::AccVec;
  using acc_t = typename S::acc_t;
  V va[K], vb[K], a1[K][S::kVecs], a2[K][S::kVecs];
  for (int k = 0; k < K; ++k) {
    va[k] = V(a[k]);
    vb[k] = V(b[k]);
    for (int j = 0; j < S::kVecs; ++j) a1[k][j] = a2[k][j] = V(0);
  }
  int64_t i = 0;
  for (; i + S::kWidth <= len; i += S::kWidth) {
    V dv[S::kVecs], sv[S::kVecs], mv[S::kVecs], zv[S::kVecs];
    S::load_acc(dmax + i, dv);
    S::load_acc(gsum + i, sv);
    S::load_acc(gmax + i, mv);
    for (int k = 0; k < K; ++k) {
      S::load(z[k] + i, zv);
      for (int j = 0; j < S::kVecs; ++j) {
        const V r = pool_grad(x1_of(va[k], zv[j], vb[k]), dv[j], sv[j], mv[j]);
        a1[k][j] += r;
        a2[k][j] = at::vec::fmadd(r, zv[j], a2[k][j]);
      }
    }
  }
  for (int k = 0; k < K; ++k) {
    acc_t sum1 = 0, sum2 = 0;
    for (int j = 0; j < S::kVecs; ++j) {
      sum1 += reduce_sum(a1[k][j]);
      sum2 += reduce_sum(a2[k][j]);
    }
    for (int64_t q = i; q < len; ++q) {
      const acc_t zi = acc_t(z[k][q]), r = pool_grad_one(x1_of(a[k], zi, b[k]), dmax[q], gsum[q], gmax[q]);
      sum1 += r;
      sum2 += r * zi;
    }
    *t1[k] = sum1;
    *t2[k] = sum2;
  }
}

// The per-pixel maps of one pixel for both groups: [dmax, gsum, gmax][group].
template <typename acc_t>
struct PixelMaps {
  acc_t v[3][2];
};
template <typename acc_t>
inline PixelMaps<acc_t> pixel_maps_at(const acc_t* dmax, const acc_t* gsum, const acc_t* gmax, int64_t p, int64_t hw,
                                      bool two) {
  PixelMaps<acc_t> q{};
  const acc_t* maps[3] = {dmax, gsum, gmax};
  for (int k = 0; k < 3; ++k) {
    q.v[k][0] = maps[k][p];
    q.v[k][1] = two ? maps[k][hw + p] : acc_t(0);
  }
  return q;
}

// One channels_last pixel row: the channels' r and r * z added into the partial rows p1, p2.
template <bool kTwo, typename scalar_t>
void pool_backward_row(const scalar_t* z, int64_t C, const at::opmath_type<scalar_t>* a,
                       const at::opmath_type<scalar_t>* b, const at::opmath_type<scalar_t>* member,
                       PixelMaps<at::opmath_type<scalar_t>> q, at::opmath_type<scalar_t>* p1,
                       at::opmath_type<scalar_t>* p2) {
  using S = Step<scalar_t>;
  using V = typename S::AccVec;
  using acc_t = typename S::acc_t;
  const V d0(q.v[0][0]), d1(q.v[0][1]), s0(q.v[1][0]), s1(q.v[1][1]), m0(q.v[2][0]), m1(q.v[2][1]);
  V zv[S::kVecs], va[S::kVecs], vb[S::kVecs], in[S::kVecs], a1[S::kVecs], a2[S::kVecs];
  int64_t c = 0;
  for (; c + S::kWidth <= C; c += S::kWidth) {
    S::load(z + c, zv);
    S::load_acc(a + c, va);
    S::load_acc(b + c, vb);
    S::load_acc(p1 + c, a1);
    S::load_acc(p2 + c, a2);
    if constexpr (kTwo) S::load_acc(member + c, in);
    for (int j = 0; j < S::kVecs; ++j) {
      const V x1 = x1_of(va[j], zv[j], vb[j]);
      V r;
      if constexpr (kTwo) {
        const V in0 = member_bits(in[j]);
        r = pool_grad(x1, pick(d0, d1, in0), pick(s0, s1, in0), pick(m0, m1, in0));
      } else {
        r = pool_grad(x1, d0, s0, m0);
      }
      a1[j] += r;
      a2[j] = at::vec::fmadd(r, zv[j], a2[j]);
    }
    S::store_acc(p1 + c, a1);
    S::store_acc(p2 + c, a2);
  }
  for (; c < C; ++c) {
    const int g = kTwo && member[c] == acc_t(0) ? 1 : 0;
    const acc_t zi = acc_t(z[c]), r = pool_grad_one(x1_of(a[c], zi, b[c]), q.v[0][g], q.v[1][g], q.v[2][g]);
    p1[c] += r;
    p2[c] += r * zi;
  }
}

std::tuple<at::Tensor, at::Tensor> spatial_tail_pool_backward_cpu(const at::Tensor& z_in, const at::Tensor& a_in,
                                                                  const at::Tensor& b_in,
                                                                  const std::optional<at::Tensor>& mask,
                                                                  const at::Tensor& dmax_in, const at::Tensor& gsum_in,
                                                                  const at::Tensor& gmax_in) {
  const char* op = "spatial_tail_pool_backward";
  const int64_t G = check_spatial_tail_pool_backward_args(z_in, a_in, b_in, mask, dmax_in, gsum_in, gmax_in, op);
  const at::Tensor z = dense(z_in);
  const int64_t N = z.size(0), C = z.size(1), hw = z.size(2) * z.size(3);
  at::Tensor t1 = at::empty({N, C}, acc_options(z)), t2 = at::empty({N, C}, acc_options(z));
  if (z.numel() == 0) return {t1.zero_(), t2.zero_()};
  const at::Tensor a = a_in.contiguous(), b = b_in.contiguous();
  const at::Tensor dmax = dmax_in.contiguous(), gsum = gsum_in.contiguous(), gmax = gmax_in.contiguous();
  const bool channels_last = layout_of(z) == Layout::ChannelsLast;
  const Groups groups(mask, z, channels_last);
  AK_DISPATCH_FEATURE(z, "spatial_tail_pool_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* zp = z.const_data_ptr<scalar_t>();
    const acc_t *ap = a.const_data_ptr<acc_t>(), *bp = b.const_data_ptr<acc_t>();
    const acc_t *dp = dmax.const_data_ptr<acc_t>(), *sp = gsum.const_data_ptr<acc_t>(),
                *mp = gmax.const_data_ptr<acc_t>();
    const bool* mk = groups.bools();
    const acc_t* member = groups.lanes<acc_t>();
    acc_t *t1p = t1.data_ptr<acc_t>(), *t2p = t2.data_ptr<acc_t>();
    with_flag(G == 2, [&](auto two) {
      constexpr bool kTwo = decltype(two)::value;
      const int64_t blocks = blocks_of(hw);
      std::vector<acc_t> part(2 * N * blocks * C, acc_t(0));
      acc_t *part1 = part.data(), *part2 = part1 + N * blocks * C;
      if (!channels_last) {
        // (sample, pixel block) tasks over all channels: the block's maps stay in L1.
        for_pixel_blocks(N, hw, [&](int64_t n, int64_t j, int64_t p0, int64_t p1) {
          const int64_t nc = n * C, row = (n * blocks + j) * C;
          std::vector<int64_t> members[2];
          for (int64_t c = 0; c < C; ++c) members[kTwo ? group_of(mk, nc + c) : 0].push_back(c);
          for (int g = 0; g < (kTwo ? 2 : 1); ++g) {
            const int64_t maps = (n * G + g) * hw + p0;
            const std::vector<int64_t>& cs = members[g];
            const scalar_t* zc[4];
            acc_t ac[4], bc[4], *r1[4], *r2[4];
            for (size_t i = 0; i < cs.size(); i += 4) {
              const int k = static_cast<int>(std::min<size_t>(4, cs.size() - i));
              for (int q = 0; q < k; ++q) {
                const int64_t c = cs[i + q];
                zc[q] = zp + (nc + c) * hw + p0;
                ac[q] = ap[nc + c];
                bc[q] = bp[nc + c];
                r1[q] = part1 + row + c;
                r2[q] = part2 + row + c;
              }
              if (k == 4) {
                pool_backward_run<4>(zc, p1 - p0, ac, bc, dp + maps, sp + maps, mp + maps, r1, r2);
              } else {
                for (int q = 0; q < k; ++q) {
                  pool_backward_run<1>(zc + q, p1 - p0, ac + q, bc + q, dp + maps, sp + maps, mp + maps, r1 + q,
                                       r2 + q);
                }
              }
            }
          }
        });
        sum_partials(part1, N, blocks, C, t1p);
        sum_partials(part2, N, blocks, C, t2p);
        return;
      }
      for_pixel_blocks(N, hw, [&](int64_t n, int64_t j, int64_t p0, int64_t p1) {
        const int64_t nc = n * C, row = (n * blocks + j) * C, maps = n * G * hw;
        std::vector<acc_t> local(2 * C, acc_t(0));
        for (int64_t p = p0; p < p1; ++p) {
          if (p > p0 && (p - p0) % kFoldRows == 0) {
            fold_rows(part1 + row, local.data(), C);
            fold_rows(part2 + row, local.data() + C, C);
          }
          pool_backward_row<kTwo>(zp + (n * hw + p) * C, C, ap + nc, bp + nc, kTwo ? member + nc : nullptr,
                                  pixel_maps_at(dp + maps, sp + maps, mp + maps, p, hw, kTwo), local.data(),
                                  local.data() + C);
        }
        fold_rows(part1 + row, local.data(), C);
        fold_rows(part2 + row, local.data() + C, C);
      });
      sum_partials(part1, N, blocks, C, t1p);
      sum_partials(part2, N, blocks, C, t2p);
    });
  });
  return {t1, t2};
}

// ---------------------------------------------------------------- spatial_tail_backward_apply

// The (N, C) coefficients of backward_apply, at one sample's row (or one plane's value).
enum Coef { kA, kB, kBeta, kGamma, kZmax, kKmax, kZmin, kKmin, kCoefs };

// grad_z = a * (grad_u * s + r) + beta * z + gamma + (z == zmax ? kmax : 0) + (z == zmin ? kmin : 0).
template <typename V>
inline V grad_z_of(const V& gu, const V& z, const V (&k)[kCoefs], const V& s, const V& dmax, const V& gsum,
                   const V& gmax) {
  const V r = pool_grad(x1_of(k[kA], z, k[kB]), dmax, gsum, gmax);
  const V zero(0);
  V t = at::vec::fmadd(k[kA], at::vec::fmadd(gu, s, r), at::vec::fmadd(k[kBeta], z, k[kGamma]));
  t += V::blendv(zero, k[kKmax], z == k[kZmax]);
  return t + V::blendv(zero, k[kKmin], z == k[kZmin]);
}
template <typename acc_t>
inline acc_t grad_z_one(acc_t gu, acc_t z, const acc_t* k, acc_t s, acc_t dmax, acc_t gsum, acc_t gmax) {
  const acc_t r = pool_grad_one(x1_of(k[kA], z, k[kB]), dmax, gsum, gmax);
  acc_t t = std::fma(k[kA], std::fma(gu, s, r), std::fma(k[kBeta], z, k[kGamma]));
  t += z == k[kZmax] ? k[kKmax] : acc_t(0);
  return t + (z == k[kZmin] ? k[kKmin] : acc_t(0));
}

// One NCHW plane with its (n, c)'s coefficients k and its group's maps (s, dmax, gsum, gmax).
template <bool kStream, typename scalar_t>
void backward_apply_plane(const scalar_t* grad_u, const scalar_t* z, scalar_t* grad_z, int64_t len,
                          const at::opmath_type<scalar_t>* k, const at::opmath_type<scalar_t>* s,
                          const at::opmath_type<scalar_t>* dmax, const at::opmath_type<scalar_t>* gsum,
                          const at::opmath_type<scalar_t>* gmax) {
  using S = Step<scalar_t>;
  using V = typename S::AccVec;
  using acc_t = typename S::acc_t;
  V vk[kCoefs];
  for (int i = 0; i < kCoefs; ++i) vk[i] = V(k[i]);
  V g[S::kVecs], zv[S::kVecs], sv[S::kVecs], dv[S::kVecs], qv[S::kVecs], mv[S::kVecs];
  int64_t i = 0;
  for (; i + S::kWidth <= len; i += S::kWidth) {
    S::load(grad_u + i, g);
    S::load(z + i, zv);
    S::load_acc(s + i, sv);
    S::load_acc(dmax + i, dv);
    S::load_acc(gsum + i, qv);
    S::load_acc(gmax + i, mv);
    for (int j = 0; j < S::kVecs; ++j) g[j] = grad_z_of(g[j], zv[j], vk, sv[j], dv[j], qv[j], mv[j]);
    S::store(grad_z + i, g, kStream);
  }
  for (; i < len; ++i) {
    grad_z[i] = static_cast<scalar_t>(grad_z_one(acc_t(grad_u[i]), acc_t(z[i]), k, s[i], dmax[i], gsum[i], gmax[i]));
  }
}

// One channels_last pixel row: k[i] the sample's coefficient rows; q the pixel's maps
// [s, dmax, gsum, gmax][group].
template <bool kTwo, bool kStream, typename scalar_t>
void backward_apply_row(const scalar_t* grad_u, const scalar_t* z, scalar_t* grad_z, int64_t C,
                        const at::opmath_type<scalar_t>* const* k, const at::opmath_type<scalar_t>* member,
                        const at::opmath_type<scalar_t> (&q)[4][2]) {
  using S = Step<scalar_t>;
  using V = typename S::AccVec;
  using acc_t = typename S::acc_t;
  V vq[4][2];
  for (int m = 0; m < 4; ++m) vq[m][0] = V(q[m][0]), vq[m][1] = V(q[m][1]);
  V g[S::kVecs], zv[S::kVecs], in[S::kVecs], kv[kCoefs][S::kVecs];
  int64_t c = 0;
  for (; c + S::kWidth <= C; c += S::kWidth) {
    S::load(grad_u + c, g);
    S::load(z + c, zv);
    for (int i = 0; i < kCoefs; ++i) S::load_acc(k[i] + c, kv[i]);
    if constexpr (kTwo) S::load_acc(member + c, in);
    for (int j = 0; j < S::kVecs; ++j) {
      V kj[kCoefs], m[4];
      for (int i = 0; i < kCoefs; ++i) kj[i] = kv[i][j];
      if constexpr (kTwo) {
        const V in0 = member_bits(in[j]);
        for (int i = 0; i < 4; ++i) m[i] = pick(vq[i][0], vq[i][1], in0);
      } else {
        for (int i = 0; i < 4; ++i) m[i] = vq[i][0];
      }
      g[j] = grad_z_of(g[j], zv[j], kj, m[0], m[1], m[2], m[3]);
    }
    S::store(grad_z + c, g, kStream);
  }
  for (; c < C; ++c) {
    const int gr = kTwo && member[c] == acc_t(0) ? 1 : 0;
    acc_t kc[kCoefs];
    for (int i = 0; i < kCoefs; ++i) kc[i] = k[i][c];
    grad_z[c] = static_cast<scalar_t>(
        grad_z_one(acc_t(grad_u[c]), acc_t(z[c]), kc, q[0][gr], q[1][gr], q[2][gr], q[3][gr]));
  }
}

at::Tensor spatial_tail_backward_apply_cpu(const at::Tensor& grad_u_in, const at::Tensor& z_in, const at::Tensor& a_in,
                                           const at::Tensor& b_in, const std::optional<at::Tensor>& mask,
                                           const at::Tensor& s_in, const at::Tensor& dmax_in,
                                           const at::Tensor& gsum_in, const at::Tensor& gmax_in,
                                           const at::Tensor& beta_in, const at::Tensor& gamma_in,
                                           const at::Tensor& zmax_in, const at::Tensor& kmax_in,
                                           const at::Tensor& zmin_in, const at::Tensor& kmin_in) {
  const char* op = "spatial_tail_backward_apply";
  const int64_t G = check_spatial_tail_backward_apply_args(grad_u_in, z_in, a_in, b_in, mask, s_in, dmax_in, gsum_in,
                                                           gmax_in, beta_in, gamma_in, zmax_in, kmax_in, zmin_in,
                                                           kmin_in, op);
  const at::Tensor z = dense(z_in);
  const at::Tensor grad_u = walked_like_x(grad_u_in, z, op, "grad_u");
  at::Tensor grad_z = empty_like_layout(z);
  if (z.numel() == 0) return grad_z;
  const int64_t N = z.size(0), C = z.size(1), hw = z.size(2) * z.size(3);
  // The (N, C) coefficients side by side, (kCoefs, N, C): one pointer per coefficient.
  const at::Tensor coefs = at::stack({a_in, b_in, beta_in, gamma_in, zmax_in, kmax_in, zmin_in, kmin_in});
  // The pixel maps, (4, N, G, H, W).
  const at::Tensor maps = at::stack({s_in, dmax_in, gsum_in, gmax_in});
  const bool channels_last = layout_of(z) == Layout::ChannelsLast;
  const Groups groups(mask, z, channels_last);
  const bool stream = should_stream(3 * z.nbytes());  // reads grad_u and z, writes grad_z
  AK_DISPATCH_FEATURE(z, "spatial_tail_backward_apply_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t *gp = grad_u.const_data_ptr<scalar_t>(), *zp = z.const_data_ptr<scalar_t>();
    scalar_t* out = grad_z.data_ptr<scalar_t>();
    const acc_t *kp = coefs.const_data_ptr<acc_t>(), *mp = maps.const_data_ptr<acc_t>();
    const int64_t planes = N * C, map_size = N * G * hw;
    const bool* mk = groups.bools();
    const acc_t* member = groups.lanes<acc_t>();
    with_flag(G == 2, [&](auto two) {
      with_flag(stream, [&](auto streamed) {
        constexpr bool kTwo = decltype(two)::value, kStream = decltype(streamed)::value;
        if (channels_last) {
          for_pixel_blocks(N, hw, [&](int64_t n, int64_t, int64_t p0, int64_t p1) {
            const int64_t nc = n * C;
            const acc_t* k[kCoefs];
            for (int i = 0; i < kCoefs; ++i) k[i] = kp + i * planes + nc;
            for (int64_t p = p0; p < p1; ++p) {
              acc_t q[4][2];
              for (int m = 0; m < 4; ++m) {
                const acc_t* row = mp + m * map_size + n * G * hw + p;
                q[m][0] = row[0];
                q[m][1] = kTwo ? row[hw] : acc_t(0);
              }
              const int64_t off = (n * hw + p) * C;
              backward_apply_row<kTwo, kStream>(gp + off, zp + off, out + off, C, k, kTwo ? member + nc : nullptr,
                                                q);
            }
            if constexpr (kStream) stream_fence();
          });
          return;
        }
        // (sample, pixel block) tasks over all channels: the block's four maps stay in L1.
        for_pixel_blocks(N, hw, [&](int64_t n, int64_t, int64_t p0, int64_t p1) {
          acc_t k[kCoefs];
          for (int64_t q = n * C; q < (n + 1) * C; ++q) {
            for (int i = 0; i < kCoefs; ++i) k[i] = kp[i * planes + q];
            const acc_t* m = mp + (n * G + (kTwo ? group_of(mk, q) : 0)) * hw + p0;
            const int64_t off = q * hw + p0;
            backward_apply_plane<kStream>(gp + off, zp + off, out + off, p1 - p0, k, m, m + map_size,
                                          m + 2 * map_size, m + 3 * map_size);
          }
          if constexpr (kStream) stream_fence();
        });
      });
    });
  });
  return grad_z;
}

#undef AK_DISPATCH_FEATURE

}  // namespace

TORCH_LIBRARY_IMPL(attnkernels, CPU, m) {
  m.impl("spatial_tail_stats", &spatial_tail_stats_cpu);
  m.impl("spatial_tail_pool", &spatial_tail_pool_cpu);
  m.impl("spatial_tail_apply", &spatial_tail_apply_cpu);
  m.impl("spatial_tail_backward_reduce", &spatial_tail_backward_reduce_cpu);
  m.impl("spatial_tail_pool_backward", &spatial_tail_pool_backward_cpu);
  m.impl("spatial_tail_backward_apply", &spatial_tail_backward_apply_cpu);
}

}  // namespace attnkernels
