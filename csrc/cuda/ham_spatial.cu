// ham_spatial hot path, CUDA: HAM's important-channel mask, the dual spatial pooling, the apply,
// and their backwards. The math of each op is in the header comment of csrc/attnkernels.cpp.
//
// Kernels:
//   * topk_mask_kernel, one block per sample: the contract's rank count, computed exactly in O(C)
//     instead of O(C^2): a radix select finds the c_im-th largest gate, then the channels tied
//     with it are counted in index order. Integer counts only.
//   * walk kernels over x (one per layout), for every x-sized pass. A block owns a tile: one
//     sample, TX*V positions along x's contiguous axis (NCHW: pixels, channels_last: channels;
//     one V-wide load per thread and row) and a chunk of rows along the strided axis, which
//     its TY thread rows share out. An "op" struct says what each element does: write an
//     output, add to a per-pixel sum (over channels: d1, d2, tie counts, grad_s) and/or a
//     per-channel sum (over pixels: grad_gate). The sum along the contiguous axis is a warp
//     shuffle per row; the sum along the strided axis stays in registers, then a fixed tree
//     over the thread rows in shared memory. Tiles write partials; combine kernels add them in
//     a fixed order. No floating atomics anywhere: bitwise deterministic run to run.
//
// Passes over x: pool 1 (the mask reads gate only), pool_backward 2 (tie counts, then grad_x and
// grad_gate), apply 1, apply_backward 1 (reads grad_y and x, writes grad_x, sums grad_gate and
// grad_s1, grad_s2 in the same pass).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <tuple>
#include <type_traits>

#include "attnkernels/common.h"
#include "attnkernels/cuda_utils.cuh"

namespace attnkernels {
namespace {

using cuda::block_allreduce;
using cuda::ceil_div;
using cuda::check_cuda;
using cuda::check_like_x;
using cuda::group_allreduce;
using cuda::kMaxGrid;
using cuda::kWarpSize;
using cuda::load_vec;
using cuda::nan_max;
using cuda::next_pow2;
using cuda::sm_count;
using cuda::store_vec;
using cuda::Vec;
using cuda::warp_allreduce;

constexpr int kBlock = 256;                // threads per block in every kernel here
constexpr int kRows = kBlock / kWarpSize;  // NCHW walk: a warp per channel row
constexpr int64_t kMinRowsPerThread = 16;  // strided-axis rows each thread sums at least

// ---------------------------------------------------------------------------------------------
// The important-channel mask.
// ---------------------------------------------------------------------------------------------

// Order-preserving keys of non-NaN values: a > b iff key(a) > key(b) and a == b iff
// key(a) == key(b) (-0 takes the key of +0).
__device__ __forceinline__ uint32_t order_key(float v) {
  const uint32_t b = v == 0.f ? 0u : __float_as_uint(v);
  return (b & 0x80000000u) ? ~b : (b | 0x80000000u);
}

__device__ __forceinline__ uint64_t order_key(double v) {
  const uint64_t b = v == 0.0 ? 0ull : static_cast<uint64_t>(__double_as_longlong(v));
  return (b >> 63) ? ~b : (b | (1ull << 63));
}

constexpr int kRadixBits = 4;
constexpr int kRadix = 1 << kRadixBits;

// mask[n,c] = 1 iff #{j : gate[j] > gate[c] or (gate[j] == gate[c] and j < c)} < c_im.
// Every comparison with a NaN is false, so a NaN gate has rank 0 (important) and ranks before
// no other channel: the non-NaN channels are ranked among themselves, by key descending, index
// ascending. With T the c_im-th largest key of them, channel c is important iff key > T, or
// key == T and fewer than need = c_im - #{key > T} channels tied with T precede it.
template <typename acc_t>
__global__ void __launch_bounds__(kBlock)
    topk_mask_kernel(const acc_t* __restrict__ gate, acc_t* __restrict__ mask, int64_t N,
                     int64_t C, int64_t c_im) {
  using key_t = decltype(order_key(acc_t(0)));
  constexpr int kKeyBits = 8 * sizeof(key_t);
  __shared__ int64_t smem[kBlock / kWarpSize];
  __shared__ int hist[kRadix];
  __shared__ int warp_ties[kBlock / kWarpSize];
  const int tid = threadIdx.x;
  const int lane = tid % kWarpSize;
  const int warp = tid / kWarpSize;
  auto plus = [](int64_t a, int64_t b) { return a + b; };
  for (int64_t n = blockIdx.x; n < N; n += gridDim.x) {  // uniform per block
    const acc_t* g = gate + n * C;
    acc_t* m = mask + n * C;
    int64_t local = 0;
    for (int64_t c = tid; c < C; c += kBlock) local += g[c] == g[c];
    const int64_t valid = block_allreduce(local, int64_t(0), plus, smem);  // non-NaN channels
    if (valid <= c_im) {  // every rank is below c_im
      for (int64_t c = tid; c < C; c += kBlock) m[c] = acc_t(1);
      continue;
    }

    // Radix select from the top digit down: T collects the digits of the c_im-th largest key,
    // `need` counts down the keys still to take from those that match T so far.
    key_t T = 0;
    int64_t need = c_im;
    for (int shift = kKeyBits - kRadixBits; shift >= 0; shift -= kRadixBits) {
      if (tid < kRadix) hist[tid] = 0;
      __syncthreads();
      const int high = shift + kRadixBits;  // the bits above this digit, fixed by earlier steps
      for (int64_t c = tid; c < C; c += kBlock) {
        const acc_t v = g[c];
        if (v == v) {
          const key_t key = order_key(v);
          if (high == kKeyBits || (key >> high) == (T >> high)) {
            atomicAdd(&hist[(key >> shift) & (kRadix - 1)], 1);  // integer: exact in any order
          }
        }
      }
      __syncthreads();
      // Every thread picks the same digit: the highest d whose bins d..15 hold >= need keys.
      int64_t above = 0;
      int d = kRadix - 1;
      for (; d > 0 && above + hist[d] < need; --d) above += hist[d];
      T |= static_cast<key_t>(d) << shift;
      need -= above;
      __syncthreads();  // hist is cleared by the next step
    }

    // The first `need` channels tied with T, in index order, are important.
    int64_t ties_before = 0;  // ties in the earlier rounds
    for (int64_t c0 = 0; c0 < C; c0 += kBlock) {
      const int64_t c = c0 + tid;
      const acc_t v = c < C ? g[c] : acc_t(0);
      const bool is_valid = c < C && v == v;
      const key_t key = is_valid ? order_key(v) : key_t(0);
      const bool tie = is_valid && key == T;
      const unsigned ballot = __ballot_sync(0xffffffffu, tie);
      if (lane == 0) warp_ties[warp] = __popc(ballot);
      __syncthreads();
      int64_t rank = ties_before + __popc(ballot & ((1u << lane) - 1u));  // ties before c
      for (int w = 0; w < kBlock / kWarpSize; ++w) {
        rank += w < warp ? warp_ties[w] : 0;
        ties_before += warp_ties[w];
      }
      if (c < C) {
        m[c] = (!is_valid || key > T || (tie && rank < need)) ? acc_t(1) : acc_t(0);
      }
      __syncthreads();  // warp_ties is rewritten by the next round
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Ops: what one element (n, c, p) of a walk over x does. Each op has
//   ChanCtx / PixCtx     per-channel and per-pixel values it reads (chan, pix),
//   PixState, ChanState  running sums over channels (per pixel) and over pixels (per channel),
//                        NoState when it has none; *_init, *_combine, *_finish(index, state),
//   kGradY, kWrites      whether it reads grad_y as well as x, and writes an x-shaped output;
//   visit(chan, pix, grad_y, x, pix_state, chan_state) -> the output value (acc).
// chan(nc) and chan_finish(nc, .) take nc = n*C + c; pix(n, p) and pix_finish(n, p, .) take
// the pixel p of sample n (np = n*hw + p indexes the (N, 1, H, W) maps).
// ---------------------------------------------------------------------------------------------

struct NoState {};
struct NoCtx {};

template <typename T>
constexpr bool kHas = !std::is_same<T, NoState>::value;

// gate[n,c], and mask[n,c], 1 - mask[n,c]: the weights of groups 1 and 2.
template <typename acc_t>
struct ChanCtx {
  acc_t gate, keep, drop;
};

template <typename acc_t>
__device__ __forceinline__ ChanCtx<acc_t> load_chan(const acc_t* gate, const acc_t* mask,
                                                    int64_t nc) {
  const acc_t m = mask[nc];
  return {gate[nc], m, acc_t(1) - m};
}

// map[n, g, p] of an (N, 2, H, W) map.
template <typename acc_t>
__device__ __forceinline__ acc_t pair_at(const acc_t* map, int64_t n, int64_t p, int64_t hw, int g) {
  return map[(2 * n + g) * hw + p];
}

// ham_spatial_pool: d1 = [sum_c G1 / c_im, max_c G1], d2 = [sum_c G2 / max(C_sub, 1), max_c G2].
template <typename scalar_t_>
struct PoolOp {
  using scalar_t = scalar_t_;
  using acc_t = at::opmath_type<scalar_t>;
  struct PixState {
    acc_t sum1, max1, sum2, max2;
  };
  using ChanState = NoState;
  using PixCtx = NoCtx;
  static constexpr bool kGradY = false;
  static constexpr bool kWrites = false;

  const acc_t* gate;
  const acc_t* mask;
  acc_t* d1;
  acc_t* d2;
  int64_t hw;
  acc_t div1, div2;  // c_im, max(C_sub, 1)

  __device__ ChanCtx<acc_t> chan(int64_t nc) const { return load_chan(gate, mask, nc); }
  __device__ PixCtx pix(int64_t, int64_t) const { return {}; }
  __device__ static PixState pix_init() {
    return {acc_t(0), static_cast<acc_t>(-INFINITY), acc_t(0), static_cast<acc_t>(-INFINITY)};
  }
  __device__ static PixState pix_combine(PixState a, PixState b) {
    return {a.sum1 + b.sum1, nan_max(a.max1, b.max1), a.sum2 + b.sum2, nan_max(a.max2, b.max2)};
  }
  __device__ acc_t visit(const ChanCtx<acc_t>& k, const PixCtx&, acc_t, acc_t x, PixState& s,
                         ChanState&) const {
    const acc_t F1 = x * k.gate;
    const acc_t G1 = F1 * k.keep;  // literal products: 0 * NaN stays NaN
    const acc_t G2 = F1 * k.drop;
    s.sum1 += G1;
    s.max1 = nan_max(s.max1, G1);
    s.sum2 += G2;
    s.max2 = nan_max(s.max2, G2);
    return acc_t(0);
  }
  __device__ void pix_finish(int64_t n, int64_t p, const PixState& s) const {
    d1[2 * n * hw + p] = s.sum1 / div1;
    d1[(2 * n + 1) * hw + p] = s.max1;
    d2[2 * n * hw + p] = s.sum2 / div2;
    d2[(2 * n + 1) * hw + p] = s.max2;
  }
};

// Per pixel, what ham_spatial_pool_backward's second pass needs of grad_d1, grad_d2:
// dG_g = avg_g + [G_g == d_g[:,1]] * share_g.
template <typename acc_t>
struct PoolGrad {
  acc_t avg1, share1, avg2, share2;  // grad_d_g[:,0] / divisor_g, grad_d_g[:,1] / cnt_g
};

// ham_spatial_pool_backward, first pass: cnt_g = #{c : G_g == d_g[:,1]}, then the PoolGrad
// record (a NaN maximum matches nothing: cnt 0, share inf or NaN, and 0 * share is NaN at
// every channel, as torch.amax's backward).
template <typename scalar_t_>
struct PoolCountOp {
  using scalar_t = scalar_t_;
  using acc_t = at::opmath_type<scalar_t>;
  struct PixState {
    int cnt1, cnt2;
  };
  using ChanState = NoState;
  struct PixCtx {
    acc_t max1, max2;
  };
  static constexpr bool kGradY = false;
  static constexpr bool kWrites = false;

  const acc_t* gate;
  const acc_t* mask;
  const acc_t* d1;
  const acc_t* d2;
  const acc_t* grad_d1;
  const acc_t* grad_d2;
  PoolGrad<acc_t>* coef;  // (N, hw)
  int64_t hw;
  acc_t div1, div2;

  __device__ ChanCtx<acc_t> chan(int64_t nc) const { return load_chan(gate, mask, nc); }
  __device__ PixCtx pix(int64_t n, int64_t p) const {
    return {pair_at(d1, n, p, hw, 1), pair_at(d2, n, p, hw, 1)};
  }
  __device__ static PixState pix_init() { return {0, 0}; }
  __device__ static PixState pix_combine(PixState a, PixState b) {
    return {a.cnt1 + b.cnt1, a.cnt2 + b.cnt2};
  }
  __device__ acc_t visit(const ChanCtx<acc_t>& k, const PixCtx& px, acc_t, acc_t x, PixState& s,
                         ChanState&) const {
    const acc_t F1 = x * k.gate;
    s.cnt1 += F1 * k.keep == px.max1;
    s.cnt2 += F1 * k.drop == px.max2;
    return acc_t(0);
  }
  __device__ void pix_finish(int64_t n, int64_t p, const PixState& s) const {
    coef[n * hw + p] = {pair_at(grad_d1, n, p, hw, 0) / div1,
                        pair_at(grad_d1, n, p, hw, 1) / static_cast<acc_t>(s.cnt1),
                        pair_at(grad_d2, n, p, hw, 0) / div2,
                        pair_at(grad_d2, n, p, hw, 1) / static_cast<acc_t>(s.cnt2)};
  }
};

// ham_spatial_pool_backward, second pass: dF1 = dG1*mask + dG2*(1 - mask); grad_x = dF1*gate;
// grad_gate = sum_p dF1*x.
template <typename scalar_t_>
struct PoolBackwardOp {
  using scalar_t = scalar_t_;
  using acc_t = at::opmath_type<scalar_t>;
  using PixState = NoState;
  struct ChanState {
    acc_t sum;
  };
  struct PixCtx {
    PoolGrad<acc_t> r;
    acc_t max1, max2;
  };
  static constexpr bool kGradY = false;
  static constexpr bool kWrites = true;

  const acc_t* gate;
  const acc_t* mask;
  const acc_t* d1;
  const acc_t* d2;
  const PoolGrad<acc_t>* coef;
  acc_t* grad_gate;
  int64_t hw;

  __device__ ChanCtx<acc_t> chan(int64_t nc) const { return load_chan(gate, mask, nc); }
  __device__ PixCtx pix(int64_t n, int64_t p) const {
    return {coef[n * hw + p], pair_at(d1, n, p, hw, 1), pair_at(d2, n, p, hw, 1)};
  }
  __device__ static ChanState chan_init() { return {acc_t(0)}; }
  __device__ static ChanState chan_combine(ChanState a, ChanState b) { return {a.sum + b.sum}; }
  __device__ acc_t visit(const ChanCtx<acc_t>& k, const PixCtx& px, acc_t, acc_t x, PixState&,
                         ChanState& s) const {
    const acc_t F1 = x * k.gate;
    const acc_t G1 = F1 * k.keep;
    const acc_t G2 = F1 * k.drop;
    const acc_t dG1 = px.r.avg1 + static_cast<acc_t>(G1 == px.max1) * px.r.share1;
    const acc_t dG2 = px.r.avg2 + static_cast<acc_t>(G2 == px.max2) * px.r.share2;
    const acc_t dF1 = dG1 * k.keep + dG2 * k.drop;
    s.sum += dF1 * x;
    return dF1 * k.gate;
  }
  __device__ void chan_finish(int64_t nc, const ChanState& s) const { grad_gate[nc] = s.sum; }
};

// ham_spatial_apply: y = F1*mask*s1 + F1*(1 - mask)*s2.
template <typename scalar_t_>
struct ApplyOp {
  using scalar_t = scalar_t_;
  using acc_t = at::opmath_type<scalar_t>;
  using PixState = NoState;
  using ChanState = NoState;
  struct PixCtx {
    acc_t s1, s2;
  };
  static constexpr bool kGradY = false;
  static constexpr bool kWrites = true;

  const acc_t* gate;
  const acc_t* mask;
  const acc_t* s1;
  const acc_t* s2;
  int64_t hw;

  __device__ ChanCtx<acc_t> chan(int64_t nc) const { return load_chan(gate, mask, nc); }
  __device__ PixCtx pix(int64_t n, int64_t p) const { return {s1[n * hw + p], s2[n * hw + p]}; }
  __device__ acc_t visit(const ChanCtx<acc_t>& k, const PixCtx& px, acc_t, acc_t x, PixState&,
                         ChanState&) const {
    const acc_t F1 = x * k.gate;
    return F1 * k.keep * px.s1 + F1 * k.drop * px.s2;
  }
};

// ham_spatial_apply_backward: dF1 = grad_y*(mask*s1 + (1 - mask)*s2); grad_x = dF1*gate;
// grad_gate = sum_p dF1*x; grad_s1 = sum_c grad_y*F1*mask; grad_s2 = sum_c grad_y*F1*(1 - mask).
template <typename scalar_t_>
struct ApplyBackwardOp {
  using scalar_t = scalar_t_;
  using acc_t = at::opmath_type<scalar_t>;
  struct PixState {
    acc_t gs1, gs2;
  };
  struct ChanState {
    acc_t sum;
  };
  struct PixCtx {
    acc_t s1, s2;
  };
  static constexpr bool kGradY = true;
  static constexpr bool kWrites = true;

  const acc_t* gate;
  const acc_t* mask;
  const acc_t* s1;
  const acc_t* s2;
  acc_t* grad_gate;
  acc_t* grad_s1;
  acc_t* grad_s2;
  int64_t hw;

  __device__ ChanCtx<acc_t> chan(int64_t nc) const { return load_chan(gate, mask, nc); }
  __device__ PixCtx pix(int64_t n, int64_t p) const { return {s1[n * hw + p], s2[n * hw + p]}; }
  __device__ static PixState pix_init() { return {acc_t(0), acc_t(0)}; }
  __device__ static PixState pix_combine(PixState a, PixState b) {
    return {a.gs1 + b.gs1, a.gs2 + b.gs2};
  }
  __device__ static ChanState chan_init() { return {acc_t(0)}; }
  __device__ static ChanState chan_combine(ChanState a, ChanState b) { return {a.sum + b.sum}; }
  __device__ acc_t visit(const ChanCtx<acc_t>& k, const PixCtx& px, acc_t grad_y, acc_t x,
                         PixState& ps, ChanState& cs) const {
    const acc_t F1 = x * k.gate;
    const acc_t dF1 = grad_y * (k.keep * px.s1 + k.drop * px.s2);
    const acc_t gF1 = grad_y * F1;
    ps.gs1 += gF1 * k.keep;
    ps.gs2 += gF1 * k.drop;
    cs.sum += dF1 * x;
    return dF1 * k.gate;
  }
  __device__ void pix_finish(int64_t n, int64_t p, const PixState& s) const {
    grad_s1[n * hw + p] = s.gs1;
    grad_s2[n * hw + p] = s.gs2;
  }
  __device__ void chan_finish(int64_t nc, const ChanState& s) const { grad_gate[nc] = s.sum; }
};

// ---------------------------------------------------------------------------------------------
// Walks over x. Element (n, c, p) sits at (n*rows + row)*width + col, where NCHW has
// col = p (width hw) and row = c; channels_last col = c (width C) and row = p.
// ---------------------------------------------------------------------------------------------

struct Tiling {
  int64_t N, C, hw;
  int64_t tiles;      // tiles along the contiguous axis, TX*V wide
  int64_t chunks;     // chunks along the strided axis, chunk_len rows each
  int64_t chunk_len;
};

// Fixed tree over the TY thread rows of a block: row ty absorbs row ty + step, step = TY/2,
// ..., 1; row 0 ends with the block's sum. smem holds TX*TY*V states, thread (tx, ty)'s v-th at
// (v*TY + ty)*TX + tx (consecutive threads, consecutive states). Returns &smem[v = 0] of this
// thread; valid in row 0 after the call.
template <int V, typename State, typename Combine>
__device__ __forceinline__ State* tree_over_rows(State (&s)[V], State* smem, int TX, int TY,
                                                 Combine combine) {
  const int tx = threadIdx.x, ty = threadIdx.y;
  State* mine = smem + static_cast<int64_t>(ty) * TX + tx;
  const int64_t v_stride = static_cast<int64_t>(TY) * TX;
#pragma unroll
  for (int v = 0; v < V; ++v) mine[v * v_stride] = s[v];
  __syncthreads();
  for (int step = TY / 2; step > 0; step >>= 1) {
    if (ty < step) {
#pragma unroll
      for (int v = 0; v < V; ++v) {
        mine[v * v_stride] = combine(mine[v * v_stride], mine[v * v_stride + step * TX]);
      }
    }
    __syncthreads();
  }
  return mine;
}

// NCHW: block (32, kRows). A warp walks channel rows c of the tile, lane tx owning pixels
// p0..p0+V-1 (hw % V == 0 when V > 1): per-pixel sums stay in registers until the tree over
// the rows; per-channel sums are one warp butterfly per row.
template <int V, typename Op>
__global__ void __launch_bounds__(kBlock)
    ham_walk_nchw_kernel(Op op, const typename Op::scalar_t* __restrict__ x,
                         const typename Op::scalar_t* __restrict__ grad_y,
                         typename Op::scalar_t* __restrict__ out, Tiling t,
                         typename Op::PixState* __restrict__ pix_partial,
                         typename Op::ChanState* __restrict__ chan_partial) {
  using scalar_t = typename Op::scalar_t;
  using acc_t = typename Op::acc_t;
  using PixState = typename Op::PixState;
  using ChanState = typename Op::ChanState;
  using PixCtx = typename Op::PixCtx;
  const int tx = threadIdx.x;
  const int ty = threadIdx.y;
  const int64_t C = t.C, hw = t.hw;
  const int64_t num_tiles = t.N * t.chunks * t.tiles;
  for (int64_t tile = blockIdx.x; tile < num_tiles; tile += gridDim.x) {  // uniform per block
    const int64_t p_tile = tile % t.tiles;
    const int64_t chunk = (tile / t.tiles) % t.chunks;
    const int64_t n = tile / t.tiles / t.chunks;
    const int64_t p0 = (p_tile * kWarpSize + tx) * V;
    const bool active = p0 < hw;

    PixCtx px[V];
    PixState ps[V];
#pragma unroll
    for (int v = 0; v < V; ++v) {
      px[v] = active ? op.pix(n, p0 + v) : PixCtx{};
      if constexpr (kHas<PixState>) ps[v] = Op::pix_init();
    }
    const int64_t c_end = (chunk + 1) * t.chunk_len < C ? (chunk + 1) * t.chunk_len : C;
    for (int64_t c_row = chunk * t.chunk_len; c_row < c_end; c_row += kRows) {  // uniform
      const int64_t c = c_row + ty;  // the same for the whole warp
      ChanState cs{};
      if constexpr (kHas<ChanState>) cs = Op::chan_init();
      if (c < c_end && active) {
        const auto k = op.chan(n * C + c);
        const int64_t off = (n * C + c) * hw + p0;
        const Vec<scalar_t, V> xv = load_vec<V>(x + off);
        Vec<scalar_t, V> gv{};
        if constexpr (Op::kGradY) gv = load_vec<V>(grad_y + off);
        Vec<scalar_t, V> yv;
#pragma unroll
        for (int v = 0; v < V; ++v) {
          const acc_t g = Op::kGradY ? static_cast<acc_t>(gv.val[v]) : acc_t(0);
          const acc_t y = op.visit(k, px[v], g, static_cast<acc_t>(xv.val[v]), ps[v], cs);
          if constexpr (Op::kWrites) yv.val[v] = static_cast<scalar_t>(y);
        }
        if constexpr (Op::kWrites) store_vec<V>(out + off, yv);
      }
      if constexpr (kHas<ChanState>) {
        cs = warp_allreduce(cs, [](ChanState a, ChanState b) { return Op::chan_combine(a, b); });
        if (tx == 0 && c < c_end) {
          if (t.tiles == 1) {
            op.chan_finish(n * C + c, cs);
          } else {
            chan_partial[(n * t.tiles + p_tile) * C + c] = cs;
          }
        }
      }
    }
    if constexpr (kHas<PixState>) {
      __shared__ PixState smem[kBlock * V];
      const PixState* sum = tree_over_rows<V>(
          ps, smem, kWarpSize, kRows, [](PixState a, PixState b) { return Op::pix_combine(a, b); });
      if (ty == 0 && active) {
#pragma unroll
        for (int v = 0; v < V; ++v) {
          const PixState s = sum[v * kBlock];
          if (t.chunks == 1) {
            op.pix_finish(n, p0 + v, s);
          } else {
            pix_partial[(n * t.chunks + chunk) * hw + p0 + v] = s;
          }
        }
      }
      __syncthreads();  // smem is rewritten by the next tile
    }
  }
}

// channels_last: block (TX, TY), TX*TY = kBlock, TX a power of two <= 32. Thread (tx, ty) owns
// channels c0..c0+V-1 (C % V == 0 when V > 1) and walks pixel rows p: per-channel sums stay in
// registers until the tree over the rows; per-pixel sums are a butterfly over the TX lanes of
// the row.
template <int V, typename Op>
__global__ void __launch_bounds__(kBlock)
    ham_walk_channels_last_kernel(Op op, const typename Op::scalar_t* __restrict__ x,
                                  const typename Op::scalar_t* __restrict__ grad_y,
                                  typename Op::scalar_t* __restrict__ out, Tiling t,
                                  typename Op::PixState* __restrict__ pix_partial,
                                  typename Op::ChanState* __restrict__ chan_partial) {
  using scalar_t = typename Op::scalar_t;
  using acc_t = typename Op::acc_t;
  using PixState = typename Op::PixState;
  using ChanState = typename Op::ChanState;
  using Ctx = ChanCtx<acc_t>;
  const int tx = threadIdx.x;
  const int ty = threadIdx.y;
  const int TX = blockDim.x;
  const int TY = blockDim.y;
  const int64_t C = t.C, hw = t.hw;
  const int64_t num_tiles = t.N * t.chunks * t.tiles;
  for (int64_t tile = blockIdx.x; tile < num_tiles; tile += gridDim.x) {  // uniform per block
    const int64_t c_tile = tile % t.tiles;
    const int64_t chunk = (tile / t.tiles) % t.chunks;
    const int64_t n = tile / t.tiles / t.chunks;
    const int64_t c0 = (c_tile * TX + tx) * V;
    const bool active = c0 < C;

    Ctx k[V];
    ChanState cs[V];
#pragma unroll
    for (int v = 0; v < V; ++v) {
      k[v] = active ? op.chan(n * C + c0 + v) : Ctx{};
      if constexpr (kHas<ChanState>) cs[v] = Op::chan_init();
    }
    const int64_t p_end = (chunk + 1) * t.chunk_len < hw ? (chunk + 1) * t.chunk_len : hw;
    for (int64_t p_row = chunk * t.chunk_len; p_row < p_end; p_row += TY) {  // uniform
      const int64_t p = p_row + ty;
      PixState ps{};
      if constexpr (kHas<PixState>) ps = Op::pix_init();
      if (p < p_end && active) {
        const auto px = op.pix(n, p);
        const int64_t off = (n * hw + p) * C + c0;
        const Vec<scalar_t, V> xv = load_vec<V>(x + off);
        Vec<scalar_t, V> gv{};
        if constexpr (Op::kGradY) gv = load_vec<V>(grad_y + off);
        Vec<scalar_t, V> yv;
#pragma unroll
        for (int v = 0; v < V; ++v) {
          const acc_t g = Op::kGradY ? static_cast<acc_t>(gv.val[v]) : acc_t(0);
          const acc_t y = op.visit(k[v], px, g, static_cast<acc_t>(xv.val[v]), ps, cs[v]);
          if constexpr (Op::kWrites) yv.val[v] = static_cast<scalar_t>(y);
        }
        if constexpr (Op::kWrites) store_vec<V>(out + off, yv);
      }
      if constexpr (kHas<PixState>) {
        ps = group_allreduce(ps, TX, [](PixState a, PixState b) { return Op::pix_combine(a, b); });
        if (tx == 0 && p < p_end) {
          if (t.tiles == 1) {
            op.pix_finish(n, p, ps);
          } else {
            pix_partial[(n * t.tiles + c_tile) * hw + p] = ps;
          }
        }
      }
    }
    if constexpr (kHas<ChanState>) {
      __shared__ ChanState smem[kBlock * V];
      const ChanState* sum = tree_over_rows<V>(
          cs, smem, TX, TY, [](ChanState a, ChanState b) { return Op::chan_combine(a, b); });
      if (ty == 0 && active) {
#pragma unroll
        for (int v = 0; v < V; ++v) {
          const ChanState s = sum[v * kBlock];
          if (t.chunks == 1) {
            op.chan_finish(n * C + c0 + v, s);
          } else {
            chan_partial[(n * t.chunks + chunk) * C + c0 + v] = s;
          }
        }
      }
      __syncthreads();  // smem is rewritten by the next tile
    }
  }
}

// Second stage: one thread per pixel (per channel) adds its `parts` partials, (N, parts, hw)
// ((N, parts, C)), in part order.
template <typename Op>
__global__ void __launch_bounds__(kBlock)
    combine_pix_kernel(Op op, int64_t N, int64_t hw, int64_t parts,
                       const typename Op::PixState* __restrict__ partial) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t np = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; np < N * hw;
       np += stride) {
    const int64_t n = np / hw, p = np - n * hw;
    const auto* q = partial + n * parts * hw + p;
    auto s = q[0];
    for (int64_t k = 1; k < parts; ++k) s = Op::pix_combine(s, q[k * hw]);
    op.pix_finish(n, p, s);
  }
}

template <typename Op>
__global__ void __launch_bounds__(kBlock)
    combine_chan_kernel(Op op, int64_t N, int64_t C, int64_t parts,
                        const typename Op::ChanState* __restrict__ partial) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t nc = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; nc < N * C;
       nc += stride) {
    const int64_t n = nc / C;
    const auto* q = partial + n * parts * C + (nc - n * C);
    auto s = q[0];
    for (int64_t k = 1; k < parts; ++k) s = Op::chan_combine(s, q[k * C]);
    op.chan_finish(nc, s);
  }
}

// ---------------------------------------------------------------------------------------------
// Host side.
// ---------------------------------------------------------------------------------------------

// (N, parts, len) States for the second stage, or nullptr when one part writes the result.
template <typename State>
State* partials(at::Tensor& workspace, int64_t N, int64_t parts, int64_t len, const at::Tensor& like) {
  if constexpr (!kHas<State>) {
    return nullptr;
  } else {
    if (parts == 1) return nullptr;
    workspace = at::empty({N * parts * len * static_cast<int64_t>(sizeof(State))},
                          like.options().dtype(at::kByte));
    return reinterpret_cast<State*>(workspace.data_ptr());
  }
}

template <int V, typename Op>
void launch_walk(const Op& op, Layout layout, const at::Tensor& x, const typename Op::scalar_t* x_ptr,
                 const typename Op::scalar_t* grad_y_ptr, typename Op::scalar_t* out_ptr) {
  using PixState = typename Op::PixState;
  using ChanState = typename Op::ChanState;
  const bool nchw = layout == Layout::NCHW;
  Tiling t{x.size(0), x.size(1), x.size(2) * x.size(3), 0, 0, 0};
  const int64_t width = nchw ? t.hw : t.C;  // the contiguous axis
  const int64_t rows = nchw ? t.C : t.hw;   // the strided one
  const int64_t tx = nchw ? kWarpSize : std::min<int64_t>(kWarpSize, next_pow2(width / V));
  const int64_t ty = kBlock / tx;
  t.tiles = ceil_div(width / V, tx);
  // Chunk the strided axis only as far as needed for about two waves of blocks, and, where
  // chunks cost partial sums, never below kMinRowsPerThread rows per thread. The split depends
  // on shapes and the SM count only, so the summation order is fixed on a given device.
  const int64_t target_tiles = sm_count() * (2048 / kBlock) * 2;
  const bool strided_sums = nchw ? kHas<PixState> : kHas<ChanState>;
  const int64_t min_rows = strided_sums ? kMinRowsPerThread : 1;
  const int64_t max_chunks = std::max<int64_t>(1, rows / (ty * min_rows));
  t.chunks = std::min(max_chunks, std::max<int64_t>(1, ceil_div(target_tiles, t.N * t.tiles)));
  t.chunk_len = ceil_div(rows, t.chunks);
  t.chunks = ceil_div(rows, t.chunk_len);

  // Per-pixel sums are split by the chunks (NCHW) or the tiles (channels_last); per-channel
  // sums the other way round.
  const int64_t pix_parts = nchw ? t.chunks : t.tiles;
  const int64_t chan_parts = nchw ? t.tiles : t.chunks;
  at::Tensor pix_workspace, chan_workspace;
  PixState* pix_partial = partials<PixState>(pix_workspace, t.N, pix_parts, t.hw, x);
  ChanState* chan_partial = partials<ChanState>(chan_workspace, t.N, chan_parts, t.C, x);

  auto stream = at::cuda::getCurrentCUDAStream();
  const auto blocks = static_cast<unsigned>(std::min(t.N * t.chunks * t.tiles, kMaxGrid));
  const dim3 block(static_cast<unsigned>(tx), static_cast<unsigned>(ty));
  if (nchw) {
    ham_walk_nchw_kernel<V, Op><<<blocks, block, 0, stream>>>(op, x_ptr, grad_y_ptr, out_ptr, t,
                                                              pix_partial, chan_partial);
  } else {
    ham_walk_channels_last_kernel<V, Op><<<blocks, block, 0, stream>>>(
        op, x_ptr, grad_y_ptr, out_ptr, t, pix_partial, chan_partial);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if constexpr (kHas<PixState>) {
    if (pix_partial != nullptr) {
      const auto blocks2 = static_cast<unsigned>(std::min(ceil_div(t.N * t.hw, kBlock), kMaxGrid));
      combine_pix_kernel<Op><<<blocks2, kBlock, 0, stream>>>(op, t.N, t.hw, pix_parts, pix_partial);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  }
  if constexpr (kHas<ChanState>) {
    if (chan_partial != nullptr) {
      const auto blocks2 = static_cast<unsigned>(std::min(ceil_div(t.N * t.C, kBlock), kMaxGrid));
      combine_chan_kernel<Op><<<blocks2, kBlock, 0, stream>>>(op, t.N, t.C, chan_parts, chan_partial);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  }
}

// Runs op over every element of the dense x (x.numel() > 0) in its layout; grad_y (in x's
// layout) and out are defined only when the op reads or writes them. V-wide loads along the
// contiguous axis need that axis divisible by V and every pointer aligned to V elements.
template <typename Op>
void walk(const Op& op, const at::Tensor& x, const at::Tensor& grad_y, const at::Tensor& out) {
  using scalar_t = typename Op::scalar_t;
  constexpr int kVec = 16 / sizeof(scalar_t);
  constexpr int kHalfVec = kVec / 2 > 1 ? kVec / 2 : 1;
  const Layout layout = layout_of(x);
  const scalar_t* x_ptr = x.data_ptr<scalar_t>();
  const scalar_t* grad_y_ptr = Op::kGradY ? grad_y.data_ptr<scalar_t>() : nullptr;
  scalar_t* out_ptr = Op::kWrites ? out.data_ptr<scalar_t>() : nullptr;
  const int64_t width = layout == Layout::NCHW ? x.size(2) * x.size(3) : x.size(1);
  auto fits = [&](int64_t V) {
    const auto bytes = static_cast<uintptr_t>(V * sizeof(scalar_t));
    auto ok = [&](const void* p) { return p == nullptr || reinterpret_cast<uintptr_t>(p) % bytes == 0; };
    return width % V == 0 && ok(x_ptr) && ok(grad_y_ptr) && ok(out_ptr);
  };
  if (fits(kVec)) {
    launch_walk<kVec>(op, layout, x, x_ptr, grad_y_ptr, out_ptr);
  } else if (kHalfVec > 1 && fits(kHalfVec)) {
    launch_walk<kHalfVec>(op, layout, x, x_ptr, grad_y_ptr, out_ptr);
  } else {
    launch_walk<1>(op, layout, x, x_ptr, grad_y_ptr, out_ptr);
  }
}

template <typename acc_t>
void launch_topk_mask(const at::Tensor& gate, const at::Tensor& mask, int64_t c_im) {
  const int64_t N = gate.size(0), C = gate.size(1);
  const auto blocks = static_cast<unsigned>(std::min(N, kMaxGrid));
  topk_mask_kernel<acc_t><<<blocks, kBlock, 0, at::cuda::getCurrentCUDAStream()>>>(
      gate.data_ptr<acc_t>(), mask.data_ptr<acc_t>(), N, C, c_im);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// ---- argument checks (messages as the CPU kernels') ----

void check_x(const at::Tensor& x, const char* op) {
  check_feature_map(x, op, "x");
  TORCH_CHECK_VALUE(x.is_cuda(), op, ": x must be a CUDA tensor, got ", x.device());
}

// check_pixel_map (common.h), and on a CUDA device.
void check_cuda_pixel_map(const at::Tensor& t, const at::Tensor& x, int64_t k, const char* op, const char* name) {
  check_pixel_map(t, x, k, op, name);
  check_cuda(t, x, op, name);
}

at::Tensor pixel_map(const at::Tensor& x, int64_t k) {
  return at::empty({x.size(0), k, x.size(2), x.size(3)}, x.options().dtype(acc_type(x.scalar_type())));
}

// ---- the ops ----

std::tuple<at::Tensor, at::Tensor, at::Tensor> ham_spatial_pool_cuda(const at::Tensor& x_in,
                                                                     const at::Tensor& gate_in,
                                                                     int64_t c_im) {
  constexpr const char* op = "ham_spatial_pool";
  check_x(x_in, op);
  check_per_channel(gate_in, x_in, op, "gate");
  check_c_im(c_im, x_in.size(1), op);
  c10::cuda::CUDAGuard device_guard(x_in.device());
  const at::Tensor x = dense(x_in);
  const at::Tensor gate = gate_in.contiguous();
  const int64_t N = x.size(0), C = x.size(1);
  at::Tensor d1 = pixel_map(x, 2);
  at::Tensor d2 = pixel_map(x, 2);
  at::Tensor mask = at::empty_like(gate);
  if (N == 0) {
    return {d1, d2, mask};
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "ham_spatial_pool_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    launch_topk_mask<acc_t>(gate, mask, c_im);
    if (x.numel() > 0) {
      const PoolOp<scalar_t> pool{gate.data_ptr<acc_t>(), mask.data_ptr<acc_t>(),
                                  d1.data_ptr<acc_t>(),   d2.data_ptr<acc_t>(),
                                  x.size(2) * x.size(3),  static_cast<acc_t>(c_im),
                                  static_cast<acc_t>(std::max<int64_t>(C - c_im, 1))};
      walk(pool, x, at::Tensor(), at::Tensor());
    }
  });
  return {d1, d2, mask};
}

std::tuple<at::Tensor, at::Tensor> ham_spatial_pool_backward_cuda(
    const at::Tensor& grad_d1_in, const at::Tensor& grad_d2_in, const at::Tensor& x_in,
    const at::Tensor& gate_in, const at::Tensor& mask_in, const at::Tensor& d1_in,
    const at::Tensor& d2_in, int64_t c_im) {
  constexpr const char* op = "ham_spatial_pool_backward";
  check_x(x_in, op);
  check_cuda_pixel_map(grad_d1_in, x_in, 2, op, "grad_d1");
  check_cuda_pixel_map(grad_d2_in, x_in, 2, op, "grad_d2");
  check_per_channel(gate_in, x_in, op, "gate");
  check_per_channel(mask_in, x_in, op, "mask");
  check_cuda_pixel_map(d1_in, x_in, 2, op, "d1");
  check_cuda_pixel_map(d2_in, x_in, 2, op, "d2");
  check_c_im(c_im, x_in.size(1), op);
  c10::cuda::CUDAGuard device_guard(x_in.device());
  const at::Tensor x = dense(x_in);
  const at::Tensor grad_d1 = grad_d1_in.contiguous(), grad_d2 = grad_d2_in.contiguous();
  const at::Tensor gate = gate_in.contiguous(), mask = mask_in.contiguous();
  const at::Tensor d1 = d1_in.contiguous(), d2 = d2_in.contiguous();
  const int64_t N = x.size(0), C = x.size(1), hw = x.size(2) * x.size(3);
  at::Tensor grad_x = empty_like_layout(x);
  at::Tensor grad_gate = at::empty_like(gate);
  if (x.numel() == 0) {
    grad_gate.zero_();  // an empty sum over the pixels
    return {grad_x, grad_gate};
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, x.scalar_type(), "ham_spatial_pool_backward_cuda", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        const acc_t div1 = static_cast<acc_t>(c_im);
        const acc_t div2 = static_cast<acc_t>(std::max<int64_t>(C - c_im, 1));
        // First pass: the tie counts of the two maxima -> per-pixel coefficients.
        at::Tensor coef = at::empty({N, hw, 4}, gate.options());
        auto* coef_ptr = reinterpret_cast<PoolGrad<acc_t>*>(coef.data_ptr<acc_t>());
        const PoolCountOp<scalar_t> count{gate.data_ptr<acc_t>(),    mask.data_ptr<acc_t>(),
                                          d1.data_ptr<acc_t>(),      d2.data_ptr<acc_t>(),
                                          grad_d1.data_ptr<acc_t>(), grad_d2.data_ptr<acc_t>(),
                                          coef_ptr,                  hw,
                                          div1,                      div2};
        walk(count, x, at::Tensor(), at::Tensor());
        // Second pass: grad_x and grad_gate.
        const PoolBackwardOp<scalar_t> write{gate.data_ptr<acc_t>(), mask.data_ptr<acc_t>(),
                                             d1.data_ptr<acc_t>(),   d2.data_ptr<acc_t>(),
                                             coef_ptr,               grad_gate.data_ptr<acc_t>(),
                                             hw};
        walk(write, x, at::Tensor(), grad_x);
      });
  return {grad_x, grad_gate};
}

at::Tensor ham_spatial_apply_cuda(const at::Tensor& x_in, const at::Tensor& gate_in,
                                  const at::Tensor& mask_in, const at::Tensor& s1_in,
                                  const at::Tensor& s2_in) {
  constexpr const char* op = "ham_spatial_apply";
  check_x(x_in, op);
  check_per_channel(gate_in, x_in, op, "gate");
  check_per_channel(mask_in, x_in, op, "mask");
  check_cuda_pixel_map(s1_in, x_in, 1, op, "s1");
  check_cuda_pixel_map(s2_in, x_in, 1, op, "s2");
  c10::cuda::CUDAGuard device_guard(x_in.device());
  const at::Tensor x = dense(x_in);
  const at::Tensor gate = gate_in.contiguous(), mask = mask_in.contiguous();
  const at::Tensor s1 = s1_in.contiguous(), s2 = s2_in.contiguous();
  at::Tensor y = empty_like_layout(x);
  if (x.numel() == 0) {
    return y;
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "ham_spatial_apply_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const ApplyOp<scalar_t> apply{gate.data_ptr<acc_t>(), mask.data_ptr<acc_t>(),
                                  s1.data_ptr<acc_t>(), s2.data_ptr<acc_t>(),
                                  x.size(2) * x.size(3)};
    walk(apply, x, at::Tensor(), y);
  });
  return y;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> ham_spatial_apply_backward_cuda(
    const at::Tensor& grad_y_in, const at::Tensor& x_in, const at::Tensor& gate_in,
    const at::Tensor& mask_in, const at::Tensor& s1_in, const at::Tensor& s2_in) {
  constexpr const char* op = "ham_spatial_apply_backward";
  check_x(x_in, op);
  check_like_x(grad_y_in, x_in, op, "grad_y");
  check_per_channel(gate_in, x_in, op, "gate");
  check_per_channel(mask_in, x_in, op, "mask");
  check_cuda_pixel_map(s1_in, x_in, 1, op, "s1");
  check_cuda_pixel_map(s2_in, x_in, 1, op, "s2");
  c10::cuda::CUDAGuard device_guard(x_in.device());
  const at::Tensor x = dense(x_in);
  // grad_y in x's layout (a copy only if it differs), so one offset serves both.
  const at::Tensor grad_y = grad_y_in.contiguous(memory_format_of(layout_of(x)));
  const at::Tensor gate = gate_in.contiguous(), mask = mask_in.contiguous();
  const at::Tensor s1 = s1_in.contiguous(), s2 = s2_in.contiguous();
  at::Tensor grad_x = empty_like_layout(x);
  at::Tensor grad_gate = at::empty_like(gate);
  at::Tensor grad_s1 = pixel_map(x, 1);
  at::Tensor grad_s2 = pixel_map(x, 1);
  if (x.numel() == 0) {  // empty sums
    grad_gate.zero_();
    grad_s1.zero_();
    grad_s2.zero_();
    return {grad_x, grad_gate, grad_s1, grad_s2};
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, x.scalar_type(), "ham_spatial_apply_backward_cuda", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        const ApplyBackwardOp<scalar_t> backward{
            gate.data_ptr<acc_t>(),      mask.data_ptr<acc_t>(),    s1.data_ptr<acc_t>(),
            s2.data_ptr<acc_t>(),        grad_gate.data_ptr<acc_t>(), grad_s1.data_ptr<acc_t>(),
            grad_s2.data_ptr<acc_t>(),   x.size(2) * x.size(3)};
        walk(backward, x, grad_y, grad_x);
      });
  return {grad_x, grad_gate, grad_s1, grad_s2};
}

}  // namespace
}  // namespace attnkernels

TORCH_LIBRARY_IMPL(attnkernels, CUDA, m) {
  m.impl("ham_spatial_pool", &attnkernels::ham_spatial_pool_cuda);
  m.impl("ham_spatial_pool_backward", &attnkernels::ham_spatial_pool_backward_cuda);
  m.impl("ham_spatial_apply", &attnkernels::ham_spatial_apply_cuda);
  m.impl("ham_spatial_apply_backward", &attnkernels::ham_spatial_apply_backward_cuda);
}
