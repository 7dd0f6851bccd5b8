// spatial_tail hot path, CUDA: the six passes of a residual block's tail with CBAM's or HAM's
// attention. The math of each op is in the header comment of csrc/spatial_tail_ops.cpp.
//
// Every op is one pass over z of attnkernels/cuda_reduce.cuh (one kernel per layout, NCHW or
// channels_last, 64-bit offsets; a sliced z is made dense first), plus, where a launch splits a
// sum over tiles or chunks, a combine kernel adding the partials in a fixed order: no float
// atomics, bitwise deterministic run to run on a given device.
//   * spatial_tail_stats (reduce_per_channel): per (n, c), a Welford (mean, m2) merged with
//     Chan's formula (block_tail_stats'), the plain sum for the mean, and the extrema with their
//     tie counts.
//   * spatial_tail_pool (walk, PixState): per pixel and channel group, sum, max and its ties of x1.
//   * spatial_tail_apply (walk, shortcut as its second input): relu(s_g * x1 + shortcut).
//   * spatial_tail_backward_reduce (walk, out as kAux): writes grad_u, sums grad_s per pixel and
//     group (PixState) and s1, s2 per (n, c) (ChanState) in the same pass.
//   * spatial_tail_pool_backward (walk, ChanState): t1, t2 per (n, c) of the pooling's gradient r.
//   * spatial_tail_backward_apply (walk, grad_u as its second input): grad_z per element.
// x1 = fma(a, z, b) in acc, explicitly (fma, never a * z + b left to contraction), in every op:
// the backward's x1 == dmax must find the pool's maxima bit for bit.
// G, the number of channel groups (1 without mask, 2 with), is a template argument: one group
// has no mask load and no second group's maps.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cmath>
#include <limits>
#include <optional>
#include <tuple>

#include "attnkernels/cuda_reduce.cuh"
#include "attnkernels/cuda_utils.cuh"
#include "attnkernels/spatial_tail.h"

namespace attnkernels {
namespace {

using cuda::NoCtx;
using cuda::NoState;
using cuda::OpBase;

// The ops whose states or per-pixel contexts are large load at most 4 elements per thread and
// row (16 bytes of float, 8 of half): 8 would hold twice the registers and, for the stats' and
// the pool's trees over rows, 2 * kBlock * 4 states of shared memory, past the 48 KB of static
// shared memory for the stats' state.
constexpr int kNarrowVec = 4;

// x1 = a * z + b rounded once, in acc.
__device__ __forceinline__ float x1_of(float a, float z, float b) { return __fmaf_rn(a, z, b); }
__device__ __forceinline__ double x1_of(double a, double z, double b) { return __fma_rn(a, z, b); }

// a / b for the Welford and Chan weights, b a count >= 1 (block_tail.cu's): no IEEE division,
// whose slow path costs a stack frame; float: the hardware reciprocal, double: that and two
// Newton steps.
__device__ __forceinline__ float count_div(float a, float b) { return __fdividef(a, b); }
__device__ __forceinline__ double count_div(double a, double b) {
  double r = static_cast<double>(__fdividef(1.0f, static_cast<float>(b)));
  r = fma(r, fma(-b, r, 1.0), r);
  r = fma(r, fma(-b, r, 1.0), r);
  return a * r;
}

// A running maximum m and its ties k absorb the value v with kv ties. A NaN wins and has no ties
// (NaN == NaN is false), as torch.amax and the Reference's (x == max).sum(); every NaN state has
// k == 0, so absorbing one sets k = 0. v = -inf with kv = 0 changes nothing (a channel outside
// the group). Selects, not branches: inside the walks' unrolled loops, divergent branches cost
// convergence barriers and spills.
// (Flat selects: nested conditionals compile to branches.)
template <typename acc_t>
__device__ __forceinline__ void absorb_max(acc_t& m, int& k, acc_t v, int kv) {
  const bool more = v > m, nan = v != v;
  const int kept = more || nan ? 0 : k;           // more or NaN: the old ties go
  const int added = more || v == m ? kv : 0;      // more or tie: v's come
  k = kept + added;
  m = more || nan ? v : m;
}
template <typename acc_t>
__device__ __forceinline__ void absorb_min(acc_t& m, int& k, acc_t v, int kv) {
  const bool less = v < m, nan = v != v;
  const int kept = less || nan ? 0 : k;
  const int added = less || v == m ? kv : 0;
  k = kept + added;
  m = less || nan ? v : m;
}

// ---------------------------------------------------------------------------------------------
// Per-channel and per-pixel values of G groups.
// ---------------------------------------------------------------------------------------------

// One T per channel group; a channel's is g[0] where first (mask True, or G == 1), else g[1].
// Elements are chosen by value (a select), never through a reference picked at run time, which
// would put the array in local memory instead of registers; updates go to every group, the
// other group's as an identity (sums + 0: exact, as a sum that starts at +0 is never -0).
template <typename T, int G>
struct PerGroup {
  T g[G];
  __device__ __forceinline__ T of(bool first) const { return (G == 1 || first) ? g[0] : g[G - 1]; }
};

// map[n, g, p] of an (N, G, H, W) map, for each g.
template <int G, typename acc_t>
__device__ __forceinline__ PerGroup<acc_t, G> load_groups(const acc_t* map, int64_t n, int64_t p, int64_t hw) {
  PerGroup<acc_t, G> v;
#pragma unroll
  for (int g = 0; g < G; ++g) v.g[g] = map[(n * G + g) * hw + p];
  return v;
}

// The x1 coefficients of one (n, c) and its group (first: group 0; always true when G == 1).
template <typename acc_t>
struct X1Ctx {
  acc_t a, b;
  bool first;
};

// What every x1 op holds: a, b (N, C) in acc, and the (N, C) bool mask when G == 2.
template <typename acc_t, int G>
struct X1Args {
  const acc_t* a;
  const acc_t* b;
  const bool* mask;  // null when G == 1

  __device__ __forceinline__ X1Ctx<acc_t> load(int64_t nc) const { return {a[nc], b[nc], G == 1 || mask[nc]}; }
};

// ---------------------------------------------------------------------------------------------
// The ops.
// ---------------------------------------------------------------------------------------------

// spatial_tail_stats: mean, m2 (block_tail_stats'), the extrema of z and their tie counts.
template <typename scalar_t>
struct SpatialTailStats : OpBase<scalar_t> {
  using acc_t = at::opmath_type<scalar_t>;
  // Counts in 32 bits (a plane of 2^31 pixels is far past any feature map): 64-bit ones hold
  // more registers, and the bf16 plane walk spilled with them (sm_90, CUDA 13).
  struct ChanState {
    int n;
    acc_t mean, m2, sum, zmax, zmin;
    int nmax, nmin;
  };
  static constexpr int kMaxVec = kNarrowVec;  // channels_last: kBlock * 4 states of smem

  acc_t* mean;
  acc_t* m2;
  acc_t* zmax;
  acc_t* zmin;
  acc_t* nmax;
  acc_t* nmin;
  acc_t inv_pixels;  // 1 / P: mean = sum * (1 / P), as block_tail_stats

  __device__ static ChanState chan_init() {
    return {0, acc_t(0), acc_t(0), acc_t(0), static_cast<acc_t>(-INFINITY), static_cast<acc_t>(INFINITY), 0, 0};
  }
  // Chan et al.'s combination of two disjoint sets (an empty one leaves the other untouched:
  // its extrema are the identities), then the extrema.
  __device__ static ChanState chan_combine(ChanState a, ChanState b) {
    if (b.n == 0) return a;
    if (a.n == 0) return b;
    const int n = a.n + b.n;
    const acc_t d = b.mean - a.mean;
    const acc_t wb = count_div(static_cast<acc_t>(b.n), static_cast<acc_t>(n));
    ChanState s{n, a.mean + d * wb, a.m2 + b.m2 + d * d * static_cast<acc_t>(a.n) * wb, a.sum + b.sum,
                a.zmax, a.zmin, a.nmax, a.nmin};
    absorb_max(s.zmax, s.nmax, b.zmax, b.nmax);
    absorb_min(s.zmin, s.nmin, b.zmin, b.nmin);
    return s;
  }
  __device__ acc_t visit(NoCtx, NoCtx, acc_t, acc_t z, NoState&, ChanState& s) const {
    s.n += 1;
    const acc_t d = z - s.mean;
    s.mean += count_div(d, static_cast<acc_t>(s.n));
    s.m2 += d * (z - s.mean);
    s.sum += z;
    absorb_max(s.zmax, s.nmax, z, 1);
    absorb_min(s.zmin, s.nmin, z, 1);
    return acc_t(0);
  }
  __device__ void chan_finish(int64_t nc, ChanState s) const {
    mean[nc] = s.sum * inv_pixels;
    m2[nc] = s.m2;
    zmax[nc] = s.zmax;
    zmin[nc] = s.zmin;
    nmax[nc] = static_cast<acc_t>(s.nmax);
    nmin[nc] = static_cast<acc_t>(s.nmin);
  }
};

// spatial_tail_pool: d[n, 3g + (0, 1, 2), p] = sum, max and ties of x1 over the channels of g.
template <typename scalar_t, int G>
struct SpatialTailPool : OpBase<scalar_t> {
  using acc_t = at::opmath_type<scalar_t>;
  using ChanCtx = X1Ctx<acc_t>;
  struct Pooled {
    acc_t sum, max;
    int ties;
  };
  using PixState = PerGroup<Pooled, G>;
  static constexpr int kMaxVec = kNarrowVec;  // NCHW: kBlock * 4 states of smem

  X1Args<acc_t, G> x1;
  acc_t* d;
  int64_t hw;

  __device__ ChanCtx chan(int64_t nc) const { return x1.load(nc); }
  __device__ static PixState pix_init() {
    PixState s;
#pragma unroll
    for (int g = 0; g < G; ++g) s.g[g] = {acc_t(0), static_cast<acc_t>(-INFINITY), 0};
    return s;
  }
  __device__ static PixState pix_combine(PixState a, PixState b) {
#pragma unroll
    for (int g = 0; g < G; ++g) {
      a.g[g].sum += b.g[g].sum;
      absorb_max(a.g[g].max, a.g[g].ties, b.g[g].max, b.g[g].ties);
    }
    return a;
  }
  __device__ acc_t visit(const ChanCtx& k, NoCtx, acc_t, acc_t z, PixState& s, NoState&) const {
    const acc_t v = x1_of(k.a, z, k.b);
#pragma unroll
    for (int g = 0; g < G; ++g) {
      const bool in = G == 1 || (g == 0) == k.first;
      s.g[g].sum += in ? v : acc_t(0);
      absorb_max(s.g[g].max, s.g[g].ties, in ? v : static_cast<acc_t>(-INFINITY), in ? 1 : 0);
    }
    return acc_t(0);
  }
  // One pointer stepped by hw: with the 3G offsets k * hw written out, the compiler keeps each
  // product in registers across combine_pix_kernel's 64-bit division, which then spilled.
  __device__ void pix_finish(int64_t n, int64_t p, const PixState& s) const {
    acc_t* at = d + n * 3 * G * hw + p;
#pragma unroll
    for (int g = 0; g < G; ++g) {
      *at = s.g[g].sum;
      at += hw;
      *at = s.g[g].max;
      at += hw;
      *at = static_cast<acc_t>(s.g[g].ties);
      at += hw;
    }
  }
};

// spatial_tail_apply: out = relu(s_g * x1 + shortcut); the walk's grad_y is shortcut.
template <typename scalar_t, int G>
struct SpatialTailApply : OpBase<scalar_t> {
  using acc_t = at::opmath_type<scalar_t>;
  using ChanCtx = X1Ctx<acc_t>;
  using PixCtx = PerGroup<acc_t, G>;  // s
  static constexpr bool kGradY = true;  // shortcut
  static constexpr bool kWrites = true;

  X1Args<acc_t, G> x1;
  const acc_t* s;
  int64_t hw;

  __device__ ChanCtx chan(int64_t nc) const { return x1.load(nc); }
  __device__ PixCtx pix(int64_t n, int64_t p) const { return load_groups<G>(s, n, p, hw); }
  __device__ acc_t visit(const ChanCtx& k, const PixCtx& px, acc_t shortcut, acc_t z, NoState&, NoState&) const {
    return cuda::relu(px.of(k.first) * x1_of(k.a, z, k.b) + shortcut);
  }
};

// spatial_tail_backward_reduce: grad_u = out <= 0 ? 0 : grad_out (written), grad_s[n,g,p] =
// sum_{c in g} grad_u * x1, s1 = sum_p grad_u * s_g, s2 = sum_p grad_u * s_g * z. The walk's x is
// z, its grad_y grad_out, its aux out.
template <typename scalar_t, int G>
struct SpatialTailBackwardReduce : OpBase<scalar_t> {
  using acc_t = at::opmath_type<scalar_t>;
  using ChanCtx = X1Ctx<acc_t>;
  using PixCtx = PerGroup<acc_t, G>;    // s
  using PixState = PerGroup<acc_t, G>;  // grad_s
  struct ChanState {
    acc_t s1, s2;
  };
  static constexpr bool kGradY = true;   // grad_out
  static constexpr bool kWrites = true;  // grad_u
  static constexpr bool kAux = true;     // out

  const scalar_t* aux;  // out, in z's layout
  X1Args<acc_t, G> x1;
  const acc_t* s;
  acc_t* grad_s;
  acc_t* s1;
  acc_t* s2;
  int64_t hw;

  __device__ ChanCtx chan(int64_t nc) const { return x1.load(nc); }
  __device__ PixCtx pix(int64_t n, int64_t p) const { return load_groups<G>(s, n, p, hw); }
  __device__ static PixState pix_init() {
    PixState v;
#pragma unroll
    for (int g = 0; g < G; ++g) v.g[g] = acc_t(0);
    return v;
  }
  __device__ static PixState pix_combine(PixState a, PixState b) {
#pragma unroll
    for (int g = 0; g < G; ++g) a.g[g] += b.g[g];
    return a;
  }
  __device__ static ChanState chan_init() { return {acc_t(0), acc_t(0)}; }
  __device__ static ChanState chan_combine(ChanState u, ChanState v) { return {u.s1 + v.s1, u.s2 + v.s2}; }
  __device__ acc_t visit(const ChanCtx& k, const PixCtx& px, acc_t grad_out, acc_t z, acc_t out, PixState& ps,
                         ChanState& cs) const {
    const acc_t g = cuda::relu_grad(grad_out, out);  // a select: exact, +0 where out <= 0
    const acc_t gx1 = g * x1_of(k.a, z, k.b);
#pragma unroll
    for (int j = 0; j < G; ++j) ps.g[j] += (G == 1 || (j == 0) == k.first) ? gx1 : acc_t(0);
    const acc_t gs = g * px.of(k.first);
    cs.s1 += gs;
    cs.s2 += gs * z;
    return g;
  }
  __device__ void pix_finish(int64_t n, int64_t p, const PixState& v) const {
    acc_t* at = grad_s + n * G * hw + p;  // stepped by hw, as SpatialTailPool's
#pragma unroll
    for (int g = 0; g < G; ++g) {
      *at = v.g[g];
      at += hw;
    }
  }
  __device__ void chan_finish(int64_t nc, ChanState v) const {
    s1[nc] = v.s1;
    s2[nc] = v.s2;
  }
};

// The pooling's gradient maps of one pixel and group: dmax (the pool's maximum), gsum, gmax.
template <typename acc_t>
struct PoolGradient {
  acc_t dmax, gsum, gmax;
};

template <int G, typename acc_t>
__device__ __forceinline__ PerGroup<PoolGradient<acc_t>, G> load_pool_gradient(const acc_t* dmax, const acc_t* gsum,
                                                                               const acc_t* gmax, int64_t n,
                                                                               int64_t p, int64_t hw) {
  PerGroup<PoolGradient<acc_t>, G> v;
#pragma unroll
  for (int g = 0; g < G; ++g) {
    const int64_t i = (n * G + g) * hw + p;
    v.g[g] = {dmax[i], gsum[i], gmax[i]};
  }
  return v;
}

// r = gsum + (x1 == dmax ? gmax : 0): a select, so a NaN gmax of an untied pixel stays out.
template <typename acc_t>
__device__ __forceinline__ acc_t pool_gradient(const PoolGradient<acc_t>& q, acc_t x1) {
  return q.gsum + (x1 == q.dmax ? q.gmax : acc_t(0));
}

// spatial_tail_pool_backward: t1 = sum_p r, t2 = sum_p r * z.
template <typename scalar_t, int G>
struct SpatialTailPoolBackward : OpBase<scalar_t> {
  using acc_t = at::opmath_type<scalar_t>;
  using ChanCtx = X1Ctx<acc_t>;
  using PixCtx = PerGroup<PoolGradient<acc_t>, G>;
  struct ChanState {
    acc_t t1, t2;
  };
  static constexpr int kMaxVec = kNarrowVec;  // NCHW: 4 pixels' 3G maps in registers

  X1Args<acc_t, G> x1;
  const acc_t* dmax;
  const acc_t* gsum;
  const acc_t* gmax;
  acc_t* t1;
  acc_t* t2;
  int64_t hw;

  __device__ ChanCtx chan(int64_t nc) const { return x1.load(nc); }
  __device__ PixCtx pix(int64_t n, int64_t p) const { return load_pool_gradient<G>(dmax, gsum, gmax, n, p, hw); }
  __device__ static ChanState chan_init() { return {acc_t(0), acc_t(0)}; }
  __device__ static ChanState chan_combine(ChanState u, ChanState v) { return {u.t1 + v.t1, u.t2 + v.t2}; }
  __device__ acc_t visit(const ChanCtx& k, const PixCtx& px, acc_t, acc_t z, NoState&, ChanState& cs) const {
    const acc_t r = pool_gradient(px.of(k.first), x1_of(k.a, z, k.b));
    cs.t1 += r;
    cs.t2 += r * z;
    return acc_t(0);
  }
  __device__ void chan_finish(int64_t nc, ChanState v) const {
    t1[nc] = v.t1;
    t2[nc] = v.t2;
  }
};

// spatial_tail_backward_apply: grad_z = a * (grad_u * s_g + r) + beta * z + gamma
// + (z == zmax ? kmax : 0) + (z == zmin ? kmin : 0); the walk's grad_y is grad_u.
template <typename scalar_t, int G>
struct SpatialTailBackwardApply : OpBase<scalar_t> {
  using acc_t = at::opmath_type<scalar_t>;
  struct ChanCtx {
    X1Ctx<acc_t> x1;
    acc_t beta, gamma, zmax, kmax, zmin, kmin;
  };
  struct Pixel {
    acc_t s;
    PoolGradient<acc_t> q;
  };
  using PixCtx = PerGroup<Pixel, G>;
  static constexpr bool kGradY = true;  // grad_u
  static constexpr bool kWrites = true;
  static constexpr int kMaxVec = kNarrowVec;  // NCHW: 4 pixels' 4G maps in registers

  X1Args<acc_t, G> x1;
  const acc_t* s;
  const acc_t* dmax;
  const acc_t* gsum;
  const acc_t* gmax;
  const acc_t* beta;
  const acc_t* gamma;
  const acc_t* zmax;
  const acc_t* kmax;
  const acc_t* zmin;
  const acc_t* kmin;
  int64_t hw;

  __device__ ChanCtx chan(int64_t nc) const {
    return {x1.load(nc), beta[nc], gamma[nc], zmax[nc], kmax[nc], zmin[nc], kmin[nc]};
  }
  __device__ PixCtx pix(int64_t n, int64_t p) const {
    const PerGroup<acc_t, G> sv = load_groups<G>(s, n, p, hw);
    const PerGroup<PoolGradient<acc_t>, G> qv = load_pool_gradient<G>(dmax, gsum, gmax, n, p, hw);
    PixCtx v;
#pragma unroll
    for (int g = 0; g < G; ++g) v.g[g] = {sv.g[g], qv.g[g]};
    return v;
  }
  __device__ acc_t visit(const ChanCtx& k, const PixCtx& px, acc_t grad_u, acc_t z, NoState&, NoState&) const {
    const Pixel q = px.of(k.x1.first);
    const acc_t grad_x1 = grad_u * q.s + pool_gradient(q.q, x1_of(k.x1.a, z, k.x1.b));
    return k.x1.a * grad_x1 + k.beta * z + k.gamma + (z == k.zmax ? k.kmax : acc_t(0)) +
           (z == k.zmin ? k.kmin : acc_t(0));
  }
};

// ---------------------------------------------------------------------------------------------
// Host side.
// ---------------------------------------------------------------------------------------------

void check_cuda_z(const at::Tensor& z, const char* op) {
  AK_CHECK_VALUE(z.is_cuda(), op, ": z must be a CUDA tensor, got ", z.device());
}

// fn(std::integral_constant<int, G>) for the mask's G.
template <typename Fn>
void with_groups(const std::optional<at::Tensor>& mask, Fn fn) {
  if (mask.has_value()) {
    fn(std::integral_constant<int, 2>());
  } else {
    fn(std::integral_constant<int, 1>());
  }
}

// The x1 arguments of an op, read contiguously (mask as bool, null when G == 1).
struct X1Tensors {
  at::Tensor a, b, mask;
  X1Tensors(const at::Tensor& a_in, const at::Tensor& b_in, const std::optional<at::Tensor>& mask_in)
      : a(a_in.contiguous()), b(b_in.contiguous()), mask(mask_in.has_value() ? mask_in->contiguous() : at::Tensor()) {}

  template <typename acc_t, int G>
  X1Args<acc_t, G> args() const {
    return {a.data_ptr<acc_t>(), b.data_ptr<acc_t>(), G == 2 ? mask.data_ptr<bool>() : nullptr};
  }
};

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> spatial_tail_stats_cuda(
    const at::Tensor& z_in) {
  constexpr const char* op = "spatial_tail_stats";
  check_feature_map(z_in, op, "z");
  check_cuda_z(z_in, op);
  c10::cuda::CUDAGuard device_guard(z_in.device());
  const at::Tensor z = dense(z_in);
  const int64_t N = z.size(0), C = z.size(1), P = z.size(2) * z.size(3);
  auto map = [&] { return at::empty({N, C}, acc_options(z)); };
  at::Tensor mean = map(), m2 = map(), zmax = map(), zmin = map(), nmax = map(), nmin = map();
  // The kernel counts pixels (and ties) in 32 bits.
  AK_CHECK_VALUE(P <= std::numeric_limits<int>::max(), op, ": the CUDA kernel takes planes of at most 2^31 - 1 pixels, got H*W = ", P);
  if (N * C == 0) return {mean, m2, zmax, zmin, nmax, nmin};
  if (P == 0) {  // 0 / 0, as torch.mean; empty sums, the extrema's identities, no ties
    mean.fill_(std::numeric_limits<double>::quiet_NaN());
    m2.zero_();
    zmax.fill_(-std::numeric_limits<double>::infinity());
    zmin.fill_(std::numeric_limits<double>::infinity());
    nmax.zero_();
    nmin.zero_();
    return {mean, m2, zmax, zmin, nmax, nmin};
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, z.scalar_type(), "spatial_tail_stats_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const SpatialTailStats<scalar_t> stats{{},
                                           mean.data_ptr<acc_t>(),
                                           m2.data_ptr<acc_t>(),
                                           zmax.data_ptr<acc_t>(),
                                           zmin.data_ptr<acc_t>(),
                                           nmax.data_ptr<acc_t>(),
                                           nmin.data_ptr<acc_t>(),
                                           static_cast<acc_t>(1.0 / static_cast<double>(P))};
    cuda::reduce_per_channel(stats, z, at::Tensor());
  });
  return {mean, m2, zmax, zmin, nmax, nmin};
}

at::Tensor spatial_tail_pool_cuda(const at::Tensor& z_in, const at::Tensor& a_in, const at::Tensor& b_in,
                                  const std::optional<at::Tensor>& mask_in) {
  constexpr const char* op = "spatial_tail_pool";
  const int64_t G = check_spatial_tail_x1_args(z_in, a_in, b_in, mask_in, op);
  check_cuda_z(z_in, op);
  c10::cuda::CUDAGuard device_guard(z_in.device());
  const at::Tensor z = dense(z_in);
  at::Tensor d = cuda::pixel_map(z, 3 * G);
  if (z.numel() == 0) {  // C == 0 (else d is empty too): empty sums, the max's identity, no ties
    const at::Tensor per_group = d.view({z.size(0), G, 3, z.size(2), z.size(3)});
    per_group.select(2, 0).zero_();
    per_group.select(2, 1).fill_(-std::numeric_limits<double>::infinity());
    per_group.select(2, 2).zero_();
    return d;
  }
  const X1Tensors x1(a_in, b_in, mask_in);
  const int64_t hw = z.size(2) * z.size(3);
  with_groups(mask_in, [&](auto groups) {
    constexpr int kG = decltype(groups)::value;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, z.scalar_type(), "spatial_tail_pool_cuda", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      const SpatialTailPool<scalar_t, kG> pool{{}, x1.args<acc_t, kG>(), d.data_ptr<acc_t>(), hw};
      cuda::walk(pool, z, at::Tensor(), at::Tensor());
    });
  });
  return d;
}

at::Tensor spatial_tail_apply_cuda(const at::Tensor& z_in, const at::Tensor& shortcut_in, const at::Tensor& a_in,
                                   const at::Tensor& b_in, const at::Tensor& s_in,
                                   const std::optional<at::Tensor>& mask_in) {
  constexpr const char* op = "spatial_tail_apply";
  check_spatial_tail_apply_args(z_in, shortcut_in, a_in, b_in, s_in, mask_in, op);
  check_cuda_z(z_in, op);
  c10::cuda::CUDAGuard device_guard(z_in.device());
  const at::Tensor z = dense(z_in);
  at::Tensor out = empty_like_layout(z);
  if (z.numel() == 0) return out;
  // shortcut in z's layout (a copy only if it differs), so one offset serves both.
  const at::Tensor shortcut = shortcut_in.contiguous(memory_format_of(layout_of(z)));
  const X1Tensors x1(a_in, b_in, mask_in);
  const at::Tensor s = s_in.contiguous();
  const int64_t hw = z.size(2) * z.size(3);
  with_groups(mask_in, [&](auto groups) {
    constexpr int kG = decltype(groups)::value;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, z.scalar_type(), "spatial_tail_apply_cuda", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      const SpatialTailApply<scalar_t, kG> apply{{}, x1.args<acc_t, kG>(), s.data_ptr<acc_t>(), hw};
      cuda::walk(apply, z, shortcut, out);
    });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> spatial_tail_backward_reduce_cuda(
    const at::Tensor& grad_out_in, const at::Tensor& out_in, const at::Tensor& z_in, const at::Tensor& a_in,
    const at::Tensor& b_in, const at::Tensor& s_in, const std::optional<at::Tensor>& mask_in) {
  constexpr const char* op = "spatial_tail_backward_reduce";
  const int64_t G = check_spatial_tail_backward_reduce_args(grad_out_in, out_in, z_in, a_in, b_in, s_in, mask_in, op);
  check_cuda_z(z_in, op);
  c10::cuda::CUDAGuard device_guard(z_in.device());
  const at::Tensor z = dense(z_in);
  const int64_t N = z.size(0), C = z.size(1);
  at::Tensor grad_u = empty_like_layout(z);  // out's dtype is z's (checked)
  at::Tensor grad_s = cuda::pixel_map(z, G);
  at::Tensor s1 = at::empty({N, C}, acc_options(z));
  at::Tensor s2 = at::empty({N, C}, acc_options(z));
  if (z.numel() == 0) {  // empty sums (over C == 0 channels or P == 0 pixels)
    grad_s.zero_();
    s1.zero_();
    s2.zero_();
    return {grad_u, grad_s, s1, s2};
  }
  // grad_out and out in z's layout (copies only if they differ): one offset serves all four.
  const auto format = memory_format_of(layout_of(z));
  const at::Tensor grad_out = grad_out_in.contiguous(format);
  const at::Tensor out = out_in.contiguous(format);
  const X1Tensors x1(a_in, b_in, mask_in);
  const at::Tensor s = s_in.contiguous();
  const int64_t hw = z.size(2) * z.size(3);
  with_groups(mask_in, [&](auto groups) {
    constexpr int kG = decltype(groups)::value;
    AT_DISPATCH_FLOATING_TYPES_AND2(
        at::kHalf, at::kBFloat16, z.scalar_type(), "spatial_tail_backward_reduce_cuda", [&] {
          using acc_t = at::opmath_type<scalar_t>;
          const SpatialTailBackwardReduce<scalar_t, kG> reduce{{},
                                                               out.data_ptr<scalar_t>(),
                                                               x1.args<acc_t, kG>(),
                                                               s.data_ptr<acc_t>(),
                                                               grad_s.data_ptr<acc_t>(),
                                                               s1.data_ptr<acc_t>(),
                                                               s2.data_ptr<acc_t>(),
                                                               hw};
          cuda::walk(reduce, z, grad_out, grad_u);
        });
  });
  return {grad_u, grad_s, s1, s2};
}

std::tuple<at::Tensor, at::Tensor> spatial_tail_pool_backward_cuda(const at::Tensor& z_in, const at::Tensor& a_in,
                                                                   const at::Tensor& b_in,
                                                                   const std::optional<at::Tensor>& mask_in,
                                                                   const at::Tensor& dmax_in,
                                                                   const at::Tensor& gsum_in,
                                                                   const at::Tensor& gmax_in) {
  constexpr const char* op = "spatial_tail_pool_backward";
  check_spatial_tail_pool_backward_args(z_in, a_in, b_in, mask_in, dmax_in, gsum_in, gmax_in, op);
  check_cuda_z(z_in, op);
  c10::cuda::CUDAGuard device_guard(z_in.device());
  const at::Tensor z = dense(z_in);
  const int64_t N = z.size(0), C = z.size(1);
  at::Tensor t1 = at::empty({N, C}, acc_options(z));
  at::Tensor t2 = at::empty({N, C}, acc_options(z));
  if (z.numel() == 0) {  // empty sums over P == 0 pixels (or no (n, c) at all)
    t1.zero_();
    t2.zero_();
    return {t1, t2};
  }
  const X1Tensors x1(a_in, b_in, mask_in);
  const at::Tensor dmax = dmax_in.contiguous(), gsum = gsum_in.contiguous(), gmax = gmax_in.contiguous();
  const int64_t hw = z.size(2) * z.size(3);
  with_groups(mask_in, [&](auto groups) {
    constexpr int kG = decltype(groups)::value;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, z.scalar_type(), "spatial_tail_pool_backward_cuda", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      const SpatialTailPoolBackward<scalar_t, kG> reduce{{},
                                                         x1.args<acc_t, kG>(),
                                                         dmax.data_ptr<acc_t>(),
                                                         gsum.data_ptr<acc_t>(),
                                                         gmax.data_ptr<acc_t>(),
                                                         t1.data_ptr<acc_t>(),
                                                         t2.data_ptr<acc_t>(),
                                                         hw};
      cuda::walk(reduce, z, at::Tensor(), at::Tensor());
    });
  });
  return {t1, t2};
}

at::Tensor spatial_tail_backward_apply_cuda(const at::Tensor& grad_u_in, const at::Tensor& z_in,
                                            const at::Tensor& a_in, const at::Tensor& b_in,
                                            const std::optional<at::Tensor>& mask_in, const at::Tensor& s_in,
                                            const at::Tensor& dmax_in, const at::Tensor& gsum_in,
                                            const at::Tensor& gmax_in, const at::Tensor& beta_in,
                                            const at::Tensor& gamma_in, const at::Tensor& zmax_in,
                                            const at::Tensor& kmax_in, const at::Tensor& zmin_in,
                                            const at::Tensor& kmin_in) {
  constexpr const char* op = "spatial_tail_backward_apply";
  check_spatial_tail_backward_apply_args(grad_u_in, z_in, a_in, b_in, mask_in, s_in, dmax_in, gsum_in, gmax_in,
                                         beta_in, gamma_in, zmax_in, kmax_in, zmin_in, kmin_in, op);
  check_cuda_z(z_in, op);
  c10::cuda::CUDAGuard device_guard(z_in.device());
  const at::Tensor z = dense(z_in);
  at::Tensor grad_z = empty_like_layout(z);
  if (z.numel() == 0) return grad_z;
  // grad_u in z's layout (a copy only if it differs), so one offset serves both.
  const at::Tensor grad_u = grad_u_in.contiguous(memory_format_of(layout_of(z)));
  const X1Tensors x1(a_in, b_in, mask_in);
  const at::Tensor s = s_in.contiguous(), dmax = dmax_in.contiguous(), gsum = gsum_in.contiguous(),
                   gmax = gmax_in.contiguous(), beta = beta_in.contiguous(), gamma = gamma_in.contiguous(),
                   zmax = zmax_in.contiguous(), kmax = kmax_in.contiguous(), zmin = zmin_in.contiguous(),
                   kmin = kmin_in.contiguous();
  const int64_t hw = z.size(2) * z.size(3);
  with_groups(mask_in, [&](auto groups) {
    constexpr int kG = decltype(groups)::value;
    AT_DISPATCH_FLOATING_TYPES_AND2(
        at::kHalf, at::kBFloat16, z.scalar_type(), "spatial_tail_backward_apply_cuda", [&] {
          using acc_t = at::opmath_type<scalar_t>;
          const SpatialTailBackwardApply<scalar_t, kG> apply{{},
                                                             x1.args<acc_t, kG>(),
                                                             s.data_ptr<acc_t>(),
                                                             dmax.data_ptr<acc_t>(),
                                                             gsum.data_ptr<acc_t>(),
                                                             gmax.data_ptr<acc_t>(),
                                                             beta.data_ptr<acc_t>(),
                                                             gamma.data_ptr<acc_t>(),
                                                             zmax.data_ptr<acc_t>(),
                                                             kmax.data_ptr<acc_t>(),
                                                             zmin.data_ptr<acc_t>(),
                                                             kmin.data_ptr<acc_t>(),
                                                             hw};
          cuda::walk(apply, z, grad_u, grad_z);
        });
  });
  return grad_z;
}

}  // namespace
}  // namespace attnkernels

TORCH_LIBRARY_IMPL(attnkernels, CUDA, m) {
  m.impl("spatial_tail_stats", &attnkernels::spatial_tail_stats_cuda);
  m.impl("spatial_tail_pool", &attnkernels::spatial_tail_pool_cuda);
  m.impl("spatial_tail_apply", &attnkernels::spatial_tail_apply_cuda);
  m.impl("spatial_tail_backward_reduce", &attnkernels::spatial_tail_backward_reduce_cuda);
  m.impl("spatial_tail_pool_backward", &attnkernels::spatial_tail_pool_backward_cuda);
  m.impl("spatial_tail_backward_apply", &attnkernels::spatial_tail_backward_apply_cuda);
}
