// One framework for the CUDA kernels that walk a dense (N, C, H, W) feature map x element by
// element, summing and/or writing as they go (cuda/channel_gate.cu, cuda/ham_spatial.cu). An op
// says what one element does; a walk says which threads visit which elements, how the launch is
// shaped and how the sums combine. Every combination happens in a fixed order that depends on
// shapes and the SM count only, never atomics: bitwise deterministic run to run.
//
// An op derives from OpBase<scalar_t>, which says "none" for every part below (so an op names
// only what it has, and is brace-initialised as Op{{}, members...}):
//   scalar_t, acc_t        x's dtype and its accumulation dtype (at::opmath_type)
//   ChanCtx chan(nc)       per-(n, c) values it reads, nc = n*C + c                    (NoCtx)
//   PixCtx pix(n, p)       per-pixel values it reads, p = h*W + w                      (NoCtx)
//   ChanState              a running value over the pixels of one (n, c): chan_init(),
//                          chan_combine(a, b), chan_finish(nc, s) writes the result    (NoState)
//   PixState               a running value over the channels of one pixel: pix_init(),
//                          pix_combine(a, b), pix_finish(n, p, s)                       (NoState)
//   kGradY                 it also reads grad_y, x-shaped and in x's layout, at the same element
//   kWrites                it writes an x-shaped output, in x's layout
//   kAux                   it also reads a third x-shaped input in x's layout, op.aux (a
//                          `const scalar_t* aux` member), at the same element (walk only)
//   kMaxVec                the most elements V one thread loads per row in a walk (default 16:
//                          no cap below the 16-byte vector): an op with large states or
//                          contexts caps it, as V of them sit in registers and, for the tree
//                          over the rows, in shared memory (kBlock * V states)
//   acc_t visit(chan, pix, grad_y, x, PixState&, ChanState&) const
//                          one element, read in acc (grad_y is 0 without kGradY): adds to the
//                          states and returns the output value (ignored without kWrites).
//                          With kAux: visit(chan, pix, grad_y, x, aux, PixState&, ChanState&).
//
// Walks:
//   walk(op, x, grad_y, out)             any op. A block owns a tile: one sample, TX*V positions
//       along x's contiguous axis (NCHW: pixels, channels_last: channels; one V-wide load per
//       thread and row) and a chunk of rows along the strided axis, which its TY thread rows
//       share out. The sum along the contiguous axis is a shuffle per row; the sum along the
//       strided axis stays in registers, then a fixed tree over the thread rows in shared
//       memory. Tiles write partials when there are several; combine kernels add them in order.
//   reduce_per_channel(op, x, grad_y)    ChanState only (a sum over the H*W pixels of each
//       (n, c)). NCHW: a warp (small or many planes) or a block per plane, 16-byte loads from
//       any alignment (head, vectors, tail), then a warp/block reduction. channels_last: walk.
//   map_per_channel(op, in, out, layout) ChanCtx and kWrites only: out = visit(chan(nc), in),
//       a flat grid-stride loop of V-wide loads and stores, a cursor tracking nc.
#pragma once

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "attnkernels/common.h"
#include "attnkernels/cuda_utils.cuh"

namespace attnkernels {
namespace cuda {

constexpr int kBlock = 256;                // threads per block of every walk kernel
constexpr int64_t kMinRowsPerThread = 16;  // strided-axis rows each thread sums at least

// ---------------------------------------------------------------------------------------------
// Ops.
// ---------------------------------------------------------------------------------------------

struct NoCtx {};
struct NoState {};

template <typename T>
constexpr bool kHas = !std::is_same<T, NoState>::value;

template <typename scalar_t_>
struct OpBase {
  using scalar_t = scalar_t_;
  using acc_t = at::opmath_type<scalar_t>;
  using ChanCtx = NoCtx;
  using PixCtx = NoCtx;
  using ChanState = NoState;
  using PixState = NoState;
  static constexpr bool kGradY = false;
  static constexpr bool kWrites = false;
  static constexpr bool kAux = false;
  static constexpr int kMaxVec = 16;
  __device__ NoCtx chan(int64_t) const { return {}; }
  __device__ NoCtx pix(int64_t, int64_t) const { return {}; }
};

// op.visit of one element given in scalar_t (g is ignored without kGradY, aux without kAux).
template <typename Op>
__device__ __forceinline__ typename Op::acc_t visit_elem(const Op& op, const typename Op::ChanCtx& k,
                                                         const typename Op::PixCtx& px,
                                                         typename Op::scalar_t g, typename Op::scalar_t x,
                                                         typename Op::PixState& ps,
                                                         typename Op::ChanState& cs,
                                                         typename Op::scalar_t aux = {}) {
  using acc_t = typename Op::acc_t;
  const acc_t gv = Op::kGradY ? static_cast<acc_t>(g) : acc_t(0);
  if constexpr (Op::kAux) {
    return op.visit(k, px, gv, static_cast<acc_t>(x), static_cast<acc_t>(aux), ps, cs);
  } else {
    return op.visit(k, px, gv, static_cast<acc_t>(x), ps, cs);
  }
}

// ---------------------------------------------------------------------------------------------
// The tile walk. Element (n, c, p) sits at (n*rows + row)*width + col, where NCHW has
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
// (v*TY + ty)*TX + tx (consecutive threads, consecutive states). TX*TY == kBlock in every walk,
// so the v-th states sit at constant offsets v*kBlock (fewer registers than v*TY*TX). Returns
// &smem[v = 0] of this thread; valid in row 0 after the call.
template <int V, typename State, typename Combine>
__device__ __forceinline__ State* tree_over_rows(State (&s)[V], State* smem, int TX, int TY,
                                                 Combine combine) {
  const int tx = threadIdx.x, ty = threadIdx.y;
  State* mine = smem + static_cast<int64_t>(ty) * TX + tx;
  constexpr int64_t v_stride = kBlock;
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
    walk_nchw_kernel(Op op, const typename Op::scalar_t* __restrict__ x,
                     const typename Op::scalar_t* __restrict__ grad_y,
                     typename Op::scalar_t* __restrict__ out, Tiling t,
                     typename Op::PixState* __restrict__ pix_partial,
                     typename Op::ChanState* __restrict__ chan_partial) {
  using scalar_t = typename Op::scalar_t;
  using PixState = typename Op::PixState;
  using ChanState = typename Op::ChanState;
  using PixCtx = typename Op::PixCtx;
  constexpr int kRows = kBlock / kWarpSize;
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
        Vec<scalar_t, V> av{};
        if constexpr (Op::kAux) av = load_vec<V>(op.aux + off);
        Vec<scalar_t, V> yv;
#pragma unroll
        for (int v = 0; v < V; ++v) {
          const auto y = visit_elem(op, k, px[v], gv.val[v], xv.val[v], ps[v], cs, av.val[v]);
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
    walk_channels_last_kernel(Op op, const typename Op::scalar_t* __restrict__ x,
                              const typename Op::scalar_t* __restrict__ grad_y,
                              typename Op::scalar_t* __restrict__ out, Tiling t,
                              typename Op::PixState* __restrict__ pix_partial,
                              typename Op::ChanState* __restrict__ chan_partial) {
  using scalar_t = typename Op::scalar_t;
  using PixState = typename Op::PixState;
  using ChanState = typename Op::ChanState;
  using ChanCtx = typename Op::ChanCtx;
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

    ChanCtx k[V];
    ChanState cs[V];
#pragma unroll
    for (int v = 0; v < V; ++v) {
      k[v] = active ? op.chan(n * C + c0 + v) : ChanCtx{};
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
        Vec<scalar_t, V> av{};
        if constexpr (Op::kAux) av = load_vec<V>(op.aux + off);
        Vec<scalar_t, V> yv;
#pragma unroll
        for (int v = 0; v < V; ++v) {
          const auto y = visit_elem(op, k[v], px, gv.val[v], xv.val[v], ps, cs[v], av.val[v]);
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

template <Layout L, int V, typename Op>
void launch_walk(const Op& op, const at::Tensor& x, const typename Op::scalar_t* x_ptr,
                 const typename Op::scalar_t* grad_y_ptr, typename Op::scalar_t* out_ptr) {
  using PixState = typename Op::PixState;
  using ChanState = typename Op::ChanState;
  constexpr bool nchw = L == Layout::NCHW;
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
  if constexpr (nchw) {
    walk_nchw_kernel<V, Op><<<blocks, block, 0, stream>>>(op, x_ptr, grad_y_ptr, out_ptr, t,
                                                          pix_partial, chan_partial);
  } else {
    walk_channels_last_kernel<V, Op><<<blocks, block, 0, stream>>>(op, x_ptr, grad_y_ptr, out_ptr, t,
                                                                   pix_partial, chan_partial);
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

// Runs op over every element of the dense x (x.numel() > 0) in layout L = layout_of(x); grad_y
// (in x's layout) and out are defined only when the op reads or writes them, op.aux (in x's
// layout) only with kAux. V-wide loads along the contiguous axis need that axis divisible by V
// and every pointer aligned to V elements: 16 bytes (at most Op::kMaxVec elements), else
// (kTryHalfVec) half that, else one element.
template <Layout L, bool kTryHalfVec = true, typename Op>
void walk_in(const Op& op, const at::Tensor& x, const at::Tensor& grad_y, const at::Tensor& out) {
  using scalar_t = typename Op::scalar_t;
  constexpr int kVec = std::min<int>(16 / sizeof(scalar_t), Op::kMaxVec);
  constexpr int kHalfVec = kTryHalfVec && kVec / 2 > 1 ? kVec / 2 : 1;
  const scalar_t* x_ptr = x.data_ptr<scalar_t>();
  const scalar_t* grad_y_ptr = Op::kGradY ? grad_y.data_ptr<scalar_t>() : nullptr;
  scalar_t* out_ptr = Op::kWrites ? out.data_ptr<scalar_t>() : nullptr;
  const scalar_t* aux_ptr = nullptr;
  if constexpr (Op::kAux) aux_ptr = op.aux;
  const int64_t width = L == Layout::NCHW ? x.size(2) * x.size(3) : x.size(1);
  auto fits = [&](int64_t V) {
    const auto bytes = static_cast<uintptr_t>(V * sizeof(scalar_t));
    auto ok = [&](const void* p) { return p == nullptr || reinterpret_cast<uintptr_t>(p) % bytes == 0; };
    return width % V == 0 && ok(x_ptr) && ok(grad_y_ptr) && ok(out_ptr) && ok(aux_ptr);
  };
  if (fits(kVec)) {
    launch_walk<L, kVec>(op, x, x_ptr, grad_y_ptr, out_ptr);
  } else if (kHalfVec > 1 && fits(kHalfVec)) {
    launch_walk<L, kHalfVec>(op, x, x_ptr, grad_y_ptr, out_ptr);
  } else {
    launch_walk<L, 1>(op, x, x_ptr, grad_y_ptr, out_ptr);
  }
}

template <typename Op>
void walk(const Op& op, const at::Tensor& x, const at::Tensor& grad_y, const at::Tensor& out) {
  if (layout_of(x) == Layout::NCHW) {
    walk_in<Layout::NCHW>(op, x, grad_y, out);
  } else {
    walk_in<Layout::ChannelsLast>(op, x, grad_y, out);
  }
}

// ---------------------------------------------------------------------------------------------
// Per-(n, c) reductions over the H*W pixels.
// ---------------------------------------------------------------------------------------------

// Element i of x (and grad_y) into s.
template <typename Op>
__device__ __forceinline__ void visit_at(const Op& op, const typename Op::ChanCtx& k,
                                         const typename Op::scalar_t* x,
                                         const typename Op::scalar_t* g, int64_t i,
                                         typename Op::ChanState& s) {
  NoState none;
  if constexpr (Op::kGradY) {
    visit_elem(op, k, NoCtx{}, g[i], x[i], none, s);
  } else {
    visit_elem(op, k, NoCtx{}, x[i], x[i], none, s);  // g ignored
  }
}

// x and grad_y of reduce_planes_kernel, in one struct: as two pointer parameters, ptxas gives
// some instantiations up to 8 more registers (sm_90, CUDA 13).
template <typename scalar_t>
struct PlaneInputs {
  const scalar_t* x;
  const scalar_t* grad_y;  // nullptr without kGradY
};

// NCHW: a group of kGroup threads (one warp, or the whole block) reduces each H*W plane.
// Planes start wherever nc * hw puts them, so each plane is walked as: `head` elements one by
// one up to a 16-byte boundary, whole V-wide vectors, then the tail. With grad_y the host only
// picks V > 1 when both base pointers share their alignment, so one head fits both.
template <int kGroup, int V, typename Op>
__global__ void __launch_bounds__(kBlock)
    reduce_planes_kernel(Op op, PlaneInputs<typename Op::scalar_t> in, int64_t planes, int64_t hw) {
  using scalar_t = typename Op::scalar_t;
  using State = typename Op::ChanState;
  constexpr int kGroupsPerBlock = kBlock / kGroup;
  const int t = threadIdx.x % kGroup;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kGroupsPerBlock;
  NoState none;
  // With kGroup == kBlock, nc is the same for the whole block, so the loop (and the
  // __syncthreads inside block_reduce) is uniform.
  for (int64_t nc = static_cast<int64_t>(blockIdx.x) * kGroupsPerBlock + threadIdx.x / kGroup;
       nc < planes; nc += stride) {
    const auto k = op.chan(nc);
    const scalar_t* a = in.x + nc * hw;
    const scalar_t* g = Op::kGradY ? in.grad_y + nc * hw : nullptr;
    State s = Op::chan_init();
    int64_t head = hw;
    if (V > 1) {
      const int64_t to_aligned = elements_to_alignment<V>(a);
      head = to_aligned < hw ? to_aligned : hw;
    }
    const int64_t body_end = head + (hw - head) / V * V;
    for (int64_t i = t; i < head; i += kGroup) {
      visit_at(op, k, a, g, i, s);
    }
#pragma unroll 4
    for (int64_t i = head + static_cast<int64_t>(t) * V; i < body_end;
         i += static_cast<int64_t>(kGroup) * V) {
      Vec<scalar_t, V> vg{};
      if constexpr (Op::kGradY) vg = load_vec<V>(g + i);
      const Vec<scalar_t, V> va = load_vec<V>(a + i);
#pragma unroll
      for (int j = 0; j < V; ++j) visit_elem(op, k, NoCtx{}, vg.val[j], va.val[j], none, s);
    }
    for (int64_t i = body_end + t; i < hw; i += kGroup) {
      visit_at(op, k, a, g, i, s);
    }

    auto combine = [](State u, State v) { return Op::chan_combine(u, v); };
    if constexpr (kGroup == kWarpSize) {
      s = warp_allreduce(s, combine);
    } else {
      static_assert(kGroup == kBlock, "a plane is reduced by a warp or by the whole block");
      __shared__ State smem[kBlock / kWarpSize];
      s = block_reduce(s, Op::chan_init(), combine, smem);
    }
    if (t == 0) {
      op.chan_finish(nc, s);
    }
  }
}

template <int V, typename Op>
void launch_reduce_planes(const Op& op, PlaneInputs<typename Op::scalar_t> in, int64_t planes, int64_t hw) {
  auto stream = at::cuda::getCurrentCUDAStream();
  // A warp per plane when planes are small or numerous enough to fill the GPU with warps;
  // otherwise a whole block per plane so that a few large planes still use every SM.
  const bool warp_per_plane = hw <= 512 || planes >= sm_count() * (2048 / kWarpSize);
  if (warp_per_plane) {
    const int64_t blocks = std::min(ceil_div(planes, kBlock / kWarpSize), kMaxGrid);
    reduce_planes_kernel<kWarpSize, V, Op><<<blocks, kBlock, 0, stream>>>(op, in, planes, hw);
  } else {
    const int64_t blocks = std::min(planes, kMaxGrid);
    reduce_planes_kernel<kBlock, V, Op><<<blocks, kBlock, 0, stream>>>(op, in, planes, hw);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Reduces op (ChanState only) over the pixels of every (n, c) of the dense x, N*C > 0 and
// hw > 0; grad_y (in x's layout) is defined when the op reads it.
template <typename Op>
void reduce_per_channel(const Op& op, const at::Tensor& x, const at::Tensor& grad_y) {
  static_assert(kHas<typename Op::ChanState> && !kHas<typename Op::PixState> && !Op::kWrites &&
                    !Op::kAux && std::is_same<typename Op::PixCtx, NoCtx>::value,
                "reduce_per_channel runs ops that only sum over the pixels of each (n, c)");
  using scalar_t = typename Op::scalar_t;
  constexpr int kVec = 16 / sizeof(scalar_t);
  if (layout_of(x) == Layout::NCHW) {
    const PlaneInputs<scalar_t> in{x.data_ptr<scalar_t>(), Op::kGradY ? grad_y.data_ptr<scalar_t>() : nullptr};
    // x alone: any alignment works (head/tail). With grad_y they must be misaligned alike.
    const bool vec = !Op::kGradY || (reinterpret_cast<uintptr_t>(in.x) % 16 ==
                                     reinterpret_cast<uintptr_t>(in.grad_y) % 16);
    const int64_t planes = x.size(0) * x.size(1), hw = x.size(2) * x.size(3);
    if (vec) {
      launch_reduce_planes<kVec>(op, in, planes, hw);
    } else {
      launch_reduce_planes<1>(op, in, planes, hw);
    }
  } else {
    walk_in<Layout::ChannelsLast, /*kTryHalfVec=*/false>(op, x, grad_y, at::Tensor());
  }
}

// ---------------------------------------------------------------------------------------------
// Elementwise per-channel maps out[i] = visit(chan(nc(i)), in[i]) over a dense (N, C, H, W)
// tensor. A cursor gives the (n, c) index nc of element i and steps to element i + 1 without
// dividing.
// ---------------------------------------------------------------------------------------------

struct NchwCursor {
  int64_t nc, p, hw;  // plane, pixel within it
  __device__ NchwCursor(int64_t i, int64_t /*C*/, int64_t hw_) : nc(i / hw_), p(0), hw(hw_) {
    p = i - nc * hw;
  }
  __device__ int64_t index() const { return nc; }
  __device__ void next() {
    if (++p == hw) {
      p = 0;
      ++nc;
    }
  }
};

struct ChannelsLastCursor {
  int64_t n, q, c, C, hwc;  // sample, offset within the sample, channel
  __device__ ChannelsLastCursor(int64_t i, int64_t C_, int64_t hw)
      : n(0), q(0), c(0), C(C_), hwc(hw * C_) {
    n = i / hwc;
    q = i - n * hwc;
    c = q % C;
  }
  __device__ int64_t index() const { return n * C + c; }
  __device__ void next() {
    if (++c == C) c = 0;
    if (++q == hwc) {  // c wrapped to 0 on the same step
      q = 0;
      ++n;
    }
  }
};

// out[i] for in[i] = v of (n, c) index nc (no grad_y: v stands in for it).
template <typename Op>
__device__ __forceinline__ typename Op::scalar_t map_elem(const Op& op, int64_t nc, typename Op::scalar_t v) {
  NoState ps, cs;
  return static_cast<typename Op::scalar_t>(visit_elem(op, op.chan(nc), NoCtx{}, v, v, ps, cs));
}

template <int V, typename Cursor, typename Op>
__global__ void __launch_bounds__(kBlock)
    map_per_channel_kernel(const typename Op::scalar_t* __restrict__ in,
                           typename Op::scalar_t* __restrict__ out, int64_t numel, int64_t C,
                           int64_t hw, Op op) {
  using scalar_t = typename Op::scalar_t;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t first = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t nvec = numel / V;
  for (int64_t k = first; k < nvec; k += stride) {
    const int64_t i = k * V;
    const Vec<scalar_t, V> a = load_vec<V>(in + i);
    Vec<scalar_t, V> y;
    Cursor cursor(i, C, hw);
#pragma unroll
    for (int j = 0; j < V; ++j) {
      y.val[j] = map_elem(op, cursor.index(), a.val[j]);
      cursor.next();
    }
    store_vec<V>(out + i, y);
  }
  for (int64_t i = nvec * V + first; i < numel; i += stride) {  // the last numel % V
    const Cursor cursor(i, C, hw);
    out[i] = map_elem(op, cursor.index(), in[i]);
  }
}

// out = op over the dense in (in.numel() > 0), both walked in `layout`.
template <typename Op>
void map_per_channel(const Op& op, const at::Tensor& in, const at::Tensor& out, Layout layout) {
  static_assert(Op::kWrites && !Op::kGradY && !Op::kAux && !kHas<typename Op::ChanState> &&
                    !kHas<typename Op::PixState> && std::is_same<typename Op::PixCtx, NoCtx>::value,
                "map_per_channel runs per-channel elementwise maps");
  using scalar_t = typename Op::scalar_t;
  constexpr int kVec = 16 / sizeof(scalar_t);
  auto stream = at::cuda::getCurrentCUDAStream();
  const scalar_t* in_ptr = in.data_ptr<scalar_t>();
  scalar_t* out_ptr = out.data_ptr<scalar_t>();
  const int64_t numel = in.numel(), C = in.size(1), hw = in.size(2) * in.size(3);
  const bool vec = aligned16(in_ptr) && aligned16(out_ptr);
  const int64_t work = vec ? std::max<int64_t>(1, numel / kVec) : numel;
  // About four resident waves of blocks; a grid-stride loop covers the rest.
  const int64_t blocks = std::min(ceil_div(work, kBlock), sm_count() * (2048 / kBlock) * 4);
  auto launch = [&](auto kernel) {
    kernel<<<blocks, kBlock, 0, stream>>>(in_ptr, out_ptr, numel, C, hw, op);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  };
  if (layout == Layout::NCHW) {
    if (vec) {
      launch(map_per_channel_kernel<kVec, NchwCursor, Op>);
    } else {
      launch(map_per_channel_kernel<1, NchwCursor, Op>);
    }
  } else {
    if (vec) {
      launch(map_per_channel_kernel<kVec, ChannelsLastCursor, Op>);
    } else {
      launch(map_per_channel_kernel<1, ChannelsLastCursor, Op>);
    }
  }
}

}  // namespace cuda
}  // namespace attnkernels
