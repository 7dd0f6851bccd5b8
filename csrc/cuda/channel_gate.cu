// channel_gate hot path, CUDA: pooling over H*W, the 1-D conv gate over C, the rescale, and
// their backwards. The math of each op is in the header comment of csrc/attnkernels.cpp.
//
// Two kinds of kernel do the heavy work on (N, C, H, W) tensors:
//   * reductions over the H*W pixels of every (n, c): channel_pool (sum, max), the tie count of
//     channel_pool_backward, and grad_gate = sum_hw grad_y * x of channel_rescale_backward.
//     A "reducer" struct says what is accumulated; two kernels walk the layouts:
//       NCHW: a warp (small planes, many of them) or a block per (n, c) plane, 16-byte loads;
//       channels_last: threads along C (coalesced), each looping over a chunk of pixels; the
//       block combines its rows in shared memory, and a second kernel combines the chunks.
//     Every combination happens in a fixed order (no atomics): bitwise deterministic.
//   * elementwise maps out[i] = op(nc(i), in[i]): channel_rescale, grad_x of
//     channel_rescale_backward, channel_pool_backward's write.
// The gate ops work on (N, C) maps only and are tiny.
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

#include "attnkernels/common.h"
#include "attnkernels/cuda_utils.cuh"

namespace attnkernels {
namespace {

using cuda::aligned16;
using cuda::block_reduce;
using cuda::ceil_div;
using cuda::check_cuda;
using cuda::check_like_x;
using cuda::elements_to_alignment;
using cuda::kMaxGrid;
using cuda::kWarpSize;
using cuda::load_vec;
using cuda::nan_max;
using cuda::next_pow2;
using cuda::sm_count;
using cuda::store_vec;
using cuda::Vec;
using cuda::warp_allreduce;

constexpr int kBlock = 256;           // threads per block in every kernel here
constexpr int64_t kMinRowsPerThread = 16;  // channels_last: pixels each thread reduces at least

// ---------------------------------------------------------------------------------------------
// Reducers over the H*W pixels of one (n, c). Each has
//   State            the running value (combined in a fixed order),
//   Ctx              per-(n, c) constants it needs while visiting (channel_pool_backward: max),
//   kInputs          1 (first()) or 2 (first(), second()) tensors read at the same element,
//   init / visit / combine / finish(nc, ctx, state) writing the (N, C) result.
// ---------------------------------------------------------------------------------------------

struct NoCtx {};

// channel_pool: avg[n,c] = sum_hw x / hw;  max[n,c] = amax_hw x (NaN propagates).
template <typename scalar_t_>
struct PoolReducer {
  using scalar_t = scalar_t_;
  using acc_t = at::opmath_type<scalar_t>;
  struct State {
    acc_t sum;
    acc_t max;
  };
  using Ctx = NoCtx;
  static constexpr int kInputs = 1;

  const scalar_t* x;
  acc_t* avg;
  acc_t* max;
  int64_t hw;

  __host__ __device__ const scalar_t* first() const { return x; }
  __host__ __device__ const scalar_t* second() const { return nullptr; }
  __device__ Ctx context(int64_t) const { return {}; }
  __device__ static State init() { return {acc_t(0), static_cast<acc_t>(-INFINITY)}; }
  __device__ static void visit(State& s, const Ctx&, scalar_t v) {
    const acc_t a = static_cast<acc_t>(v);
    s.sum += a;
    s.max = nan_max(s.max, a);
  }
  __device__ static State combine(State a, State b) {
    return {a.sum + b.sum, nan_max(a.max, b.max)};
  }
  __device__ void finish(int64_t nc, const Ctx&, State s) const {
    avg[nc] = s.sum / static_cast<acc_t>(hw);
    max[nc] = s.max;
  }
};

// channel_pool_backward: count = #{hw : x == max}; writes the share of grad_max each tied
// maximum receives, grad_max / count (NaN where count == 0, i.e. a NaN max,
// exactly as torch.amax's backward).
template <typename scalar_t_>
struct CountReducer {
  using scalar_t = scalar_t_;
  using acc_t = at::opmath_type<scalar_t>;
  struct State {
    int64_t count;
  };
  struct Ctx {
    acc_t max;
  };
  static constexpr int kInputs = 1;

  const scalar_t* x;
  const acc_t* max;
  const acc_t* grad_max;
  acc_t* share;  // (N, C): grad_max / count

  __host__ __device__ const scalar_t* first() const { return x; }
  __host__ __device__ const scalar_t* second() const { return nullptr; }
  __device__ Ctx context(int64_t nc) const { return {max[nc]}; }
  __device__ static State init() { return {0}; }
  __device__ static void visit(State& s, const Ctx& ctx, scalar_t v) {
    s.count += static_cast<acc_t>(v) == ctx.max ? 1 : 0;
  }
  __device__ static State combine(State a, State b) { return {a.count + b.count}; }
  __device__ void finish(int64_t nc, const Ctx&, State s) const {
    share[nc] = grad_max[nc] / static_cast<acc_t>(s.count);
  }
};

// channel_rescale_backward: grad_gate[n,c] = sum_hw grad_y * x.
template <typename scalar_t_>
struct GradGateReducer {
  using scalar_t = scalar_t_;
  using acc_t = at::opmath_type<scalar_t>;
  struct State {
    acc_t sum;
  };
  using Ctx = NoCtx;
  static constexpr int kInputs = 2;

  const scalar_t* grad_y;
  const scalar_t* x;
  acc_t* grad_gate;

  __host__ __device__ const scalar_t* first() const { return grad_y; }
  __host__ __device__ const scalar_t* second() const { return x; }
  __device__ Ctx context(int64_t) const { return {}; }
  __device__ static State init() { return {acc_t(0)}; }
  __device__ static void visit(State& s, const Ctx&, scalar_t g, scalar_t v) {
    s.sum += static_cast<acc_t>(g) * static_cast<acc_t>(v);
  }
  __device__ static State combine(State a, State b) { return {a.sum + b.sum}; }
  __device__ void finish(int64_t nc, const Ctx&, State s) const { grad_gate[nc] = s.sum; }
};

// Visit element i of the reducer's input(s).
template <typename R>
__device__ __forceinline__ void visit_at(typename R::State& s, const typename R::Ctx& ctx,
                                         const typename R::scalar_t* a,
                                         const typename R::scalar_t* b, int64_t i) {
  if constexpr (R::kInputs == 1) {
    R::visit(s, ctx, a[i]);
  } else {
    R::visit(s, ctx, a[i], b[i]);
  }
}

// NCHW: a group of kGroup threads (one warp, or the whole block) reduces each H*W plane.
// Planes start wherever nc * hw puts them, so each plane is walked as: `head` elements one by
// one up to a 16-byte boundary, whole V-wide vectors, then the tail. With two inputs the host
// only picks V > 1 when both base pointers share their alignment, so one head fits both.
template <int kGroup, int V, typename R>
__global__ void __launch_bounds__(kBlock) reduce_nchw_kernel(R r, int64_t planes, int64_t hw) {
  using scalar_t = typename R::scalar_t;
  using State = typename R::State;
  constexpr int kGroupsPerBlock = kBlock / kGroup;
  const int t = threadIdx.x % kGroup;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kGroupsPerBlock;
  // With kGroup == kBlock, nc is the same for the whole block, so the loop (and the
  // __syncthreads inside block_reduce) is uniform.
  for (int64_t nc = static_cast<int64_t>(blockIdx.x) * kGroupsPerBlock + threadIdx.x / kGroup;
       nc < planes; nc += stride) {
    const typename R::Ctx ctx = r.context(nc);
    const scalar_t* a = r.first() + nc * hw;
    const scalar_t* b = R::kInputs == 2 ? r.second() + nc * hw : nullptr;
    State s = R::init();
    int64_t head = hw;
    if (V > 1) {
      const int64_t to_aligned = elements_to_alignment<V>(a);
      head = to_aligned < hw ? to_aligned : hw;
    }
    const int64_t body_end = head + (hw - head) / V * V;
    for (int64_t i = t; i < head; i += kGroup) {
      visit_at<R>(s, ctx, a, b, i);
    }
#pragma unroll 4
    for (int64_t i = head + static_cast<int64_t>(t) * V; i < body_end;
         i += static_cast<int64_t>(kGroup) * V) {
      const Vec<scalar_t, V> va = load_vec<V>(a + i);
      if constexpr (R::kInputs == 1) {
#pragma unroll
        for (int j = 0; j < V; ++j) R::visit(s, ctx, va.val[j]);
      } else {
        const Vec<scalar_t, V> vb = load_vec<V>(b + i);
#pragma unroll
        for (int j = 0; j < V; ++j) R::visit(s, ctx, va.val[j], vb.val[j]);
      }
    }
    for (int64_t i = body_end + t; i < hw; i += kGroup) {
      visit_at<R>(s, ctx, a, b, i);
    }

    auto combine = [](State x, State y) { return R::combine(x, y); };
    if constexpr (kGroup == kWarpSize) {
      s = warp_allreduce(s, combine);
    } else {
      static_assert(kGroup == kBlock, "a plane is reduced by a warp or by the whole block");
      __shared__ State smem[kBlock / kWarpSize];
      s = block_reduce(s, R::init(), combine, smem);
    }
    if (t == 0) {
      r.finish(nc, ctx, s);
    }
  }
}

// channels_last: element (n, c, p) of pixel p = h*W + w sits at (n*hw + p)*C + c.
// A block is (TX, TY) threads, TX*TY = kBlock, TX and TY powers of two. A "tile" is
// (n, chunk of pixels, TX*V channels): thread (tx, ty) owns channels c0..c0+V-1 (one V-wide load
// per pixel, C % V == 0 when V > 1) and pixels chunk_start + ty, + TY, ... of the chunk.
// The TY rows are combined by a fixed tree in shared memory. With one chunk per sample the
// block writes the result; otherwise it writes the chunk's State to partial (N, chunks, C) and
// combine_chunks_kernel adds the chunks in order.
template <int V, typename R>
__global__ void __launch_bounds__(kBlock)
    reduce_channels_last_kernel(R r, int64_t N, int64_t C, int64_t hw, int64_t chunks,
                                int64_t chunk_rows, int64_t c_tiles,
                                typename R::State* __restrict__ partial) {
  using scalar_t = typename R::scalar_t;
  using State = typename R::State;
  using Ctx = typename R::Ctx;
  __shared__ State smem[kBlock * V];
  const int tx = threadIdx.x;
  const int ty = threadIdx.y;
  const int TX = blockDim.x;
  const int TY = blockDim.y;
  const int64_t tiles = N * chunks * c_tiles;
  for (int64_t tile = blockIdx.x; tile < tiles; tile += gridDim.x) {  // uniform per block
    const int64_t c_tile = tile % c_tiles;
    const int64_t chunk = (tile / c_tiles) % chunks;
    const int64_t n = tile / c_tiles / chunks;
    const int64_t c0 = (c_tile * TX + tx) * V;
    const bool active = c0 < C;

    State s[V];
    Ctx ctx[V];
#pragma unroll
    for (int v = 0; v < V; ++v) {
      s[v] = R::init();
      ctx[v] = active ? r.context(n * C + c0 + v) : Ctx{};
    }
    if (active) {
      const int64_t p_end = (chunk + 1) * chunk_rows < hw ? (chunk + 1) * chunk_rows : hw;
      for (int64_t p = chunk * chunk_rows + ty; p < p_end; p += TY) {
        const int64_t off = (n * hw + p) * C + c0;
        const Vec<scalar_t, V> va = load_vec<V>(r.first() + off);
        if constexpr (R::kInputs == 1) {
#pragma unroll
          for (int v = 0; v < V; ++v) R::visit(s[v], ctx[v], va.val[v]);
        } else {
          const Vec<scalar_t, V> vb = load_vec<V>(r.second() + off);
#pragma unroll
          for (int v = 0; v < V; ++v) R::visit(s[v], ctx[v], va.val[v], vb.val[v]);
        }
      }
    }

    // Fixed tree over ty: row ty absorbs row ty + step, step = TY/2, TY/4, ..., 1.
    State* mine = smem + (static_cast<int64_t>(ty) * TX + tx) * V;
#pragma unroll
    for (int v = 0; v < V; ++v) mine[v] = s[v];
    __syncthreads();
    for (int step = TY / 2; step > 0; step >>= 1) {
      if (ty < step) {
        const State* other = mine + static_cast<int64_t>(step) * TX * V;
#pragma unroll
        for (int v = 0; v < V; ++v) mine[v] = R::combine(mine[v], other[v]);
      }
      __syncthreads();
    }
    if (ty == 0 && active) {
#pragma unroll
      for (int v = 0; v < V; ++v) {
        const int64_t c = c0 + v;
        if (chunks == 1) {
          r.finish(n * C + c, ctx[v], mine[v]);
        } else {
          partial[(n * chunks + chunk) * C + c] = mine[v];
        }
      }
    }
    __syncthreads();  // smem is rewritten by the next tile
  }
}

// Second stage of the channels_last reduction: one thread per (n, c) combines its chunks in
// chunk order.
template <typename R>
__global__ void __launch_bounds__(kBlock)
    combine_chunks_kernel(R r, int64_t N, int64_t C, int64_t chunks,
                          const typename R::State* __restrict__ partial) {
  using State = typename R::State;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t nc = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; nc < N * C;
       nc += stride) {
    const int64_t n = nc / C;
    const int64_t c = nc - n * C;
    const State* p = partial + n * chunks * C + c;
    State s = p[0];
    for (int64_t k = 1; k < chunks; ++k) {
      s = R::combine(s, p[k * C]);
    }
    r.finish(nc, r.context(nc), s);
  }
}

template <int V, typename R>
void launch_reduce_nchw(const R& r, int64_t planes, int64_t hw) {
  auto stream = at::cuda::getCurrentCUDAStream();
  // A warp per plane when planes are small or numerous enough to fill the GPU with warps;
  // otherwise a whole block per plane so that a few large planes still use every SM.
  const bool warp_per_plane = hw <= 512 || planes >= sm_count() * (2048 / kWarpSize);
  if (warp_per_plane) {
    const int64_t blocks = std::min(ceil_div(planes, kBlock / kWarpSize), kMaxGrid);
    reduce_nchw_kernel<kWarpSize, V, R><<<blocks, kBlock, 0, stream>>>(r, planes, hw);
  } else {
    const int64_t blocks = std::min(planes, kMaxGrid);
    reduce_nchw_kernel<kBlock, V, R><<<blocks, kBlock, 0, stream>>>(r, planes, hw);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <int V, typename R>
void launch_reduce_channels_last(const R& r, int64_t N, int64_t C, int64_t hw,
                                 const at::Tensor& like) {
  using State = typename R::State;
  auto stream = at::cuda::getCurrentCUDAStream();
  const int64_t c_vecs = C / V;
  const int64_t tx = std::min<int64_t>(kWarpSize, next_pow2(c_vecs));
  const int64_t ty = kBlock / tx;
  const int64_t c_tiles = ceil_div(c_vecs, tx);
  // Split the pixels of a sample into chunks only as far as needed for about two waves of
  // blocks, and never below kMinRowsPerThread pixels per thread. The split depends on shapes
  // and the SM count only, so the summation order is fixed on a given device.
  const int64_t target_tiles = sm_count() * (2048 / kBlock) * 2;
  const int64_t max_chunks = std::max<int64_t>(1, hw / (ty * kMinRowsPerThread));
  int64_t chunks = std::min(max_chunks, std::max<int64_t>(1, ceil_div(target_tiles, N * c_tiles)));
  const int64_t chunk_rows = ceil_div(hw, chunks);
  chunks = ceil_div(hw, chunk_rows);

  at::Tensor workspace;
  State* partial = nullptr;
  if (chunks > 1) {
    workspace = at::empty({N * chunks * C * static_cast<int64_t>(sizeof(State))},
                          like.options().dtype(at::kByte));
    partial = reinterpret_cast<State*>(workspace.data_ptr());
  }
  const int64_t blocks = std::min(N * chunks * c_tiles, kMaxGrid);
  const dim3 block(static_cast<unsigned>(tx), static_cast<unsigned>(ty));
  reduce_channels_last_kernel<V, R>
      <<<blocks, block, 0, stream>>>(r, N, C, hw, chunks, chunk_rows, c_tiles, partial);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (chunks > 1) {
    const int64_t blocks2 = std::min(ceil_div(N * C, kBlock), kMaxGrid);
    combine_chunks_kernel<R><<<blocks2, kBlock, 0, stream>>>(r, N, C, chunks, partial);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

// Runs reducer r over every (n, c) of a dense (N, C, H, W) input in `layout`; N*C > 0, hw > 0.
template <typename R>
void launch_reduction(const R& r, Layout layout, int64_t N, int64_t C, int64_t hw,
                      const at::Tensor& like) {
  using scalar_t = typename R::scalar_t;
  constexpr int kVec = 16 / sizeof(scalar_t);
  const bool two = R::kInputs == 2;
  if (layout == Layout::NCHW) {
    // One input: any alignment works (head/tail). Two: they must be misaligned alike.
    const bool vec = !two || (reinterpret_cast<uintptr_t>(r.first()) % 16 ==
                              reinterpret_cast<uintptr_t>(r.second()) % 16);
    if (vec) {
      launch_reduce_nchw<kVec>(r, N * C, hw);
    } else {
      launch_reduce_nchw<1>(r, N * C, hw);
    }
  } else {
    // Rows of C channels: V-wide loads need C % V == 0 and 16-byte aligned bases.
    const bool vec = C % kVec == 0 && aligned16(r.first()) && (!two || aligned16(r.second()));
    if (vec) {
      launch_reduce_channels_last<kVec>(r, N, C, hw, like);
    } else {
      launch_reduce_channels_last<1>(r, N, C, hw, like);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Elementwise maps out[i] = op(nc(i), in[i]) over a dense (N, C, H, W) tensor.
// A cursor gives the (n, c) index nc of element i and steps to element i + 1 without dividing.
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

template <typename scalar_t, int V, typename Cursor, typename Op>
__global__ void __launch_bounds__(kBlock)
    per_channel_map_kernel(const scalar_t* __restrict__ in, scalar_t* __restrict__ out,
                           int64_t numel, int64_t C, int64_t hw, Op op) {
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
      y.val[j] = static_cast<scalar_t>(op(cursor.index(), a.val[j]));
      cursor.next();
    }
    store_vec<V>(out + i, y);
  }
  for (int64_t i = nvec * V + first; i < numel; i += stride) {  // the last numel % V
    const Cursor cursor(i, C, hw);
    out[i] = static_cast<scalar_t>(op(cursor.index(), in[i]));
  }
}

template <typename T>
struct TypeTag {
  using type = T;
};

template <typename scalar_t, typename Op>
void launch_per_channel_map(const at::Tensor& in, const at::Tensor& out, Layout layout,
                            int64_t C, int64_t hw, const Op& op) {
  constexpr int kVec = 16 / sizeof(scalar_t);
  auto stream = at::cuda::getCurrentCUDAStream();
  const scalar_t* in_ptr = in.data_ptr<scalar_t>();
  scalar_t* out_ptr = out.data_ptr<scalar_t>();
  const int64_t numel = in.numel();
  const bool vec = aligned16(in_ptr) && aligned16(out_ptr);
  const int64_t work = vec ? std::max<int64_t>(1, numel / kVec) : numel;
  // About four resident waves of blocks; a grid-stride loop covers the rest.
  const int64_t blocks = std::min(ceil_div(work, kBlock), sm_count() * (2048 / kBlock) * 4);
  auto launch = [&](auto vec_tag, auto cursor_tag) {
    constexpr int V = decltype(vec_tag)::value;
    using Cursor = typename decltype(cursor_tag)::type;
    per_channel_map_kernel<scalar_t, V, Cursor, Op>
        <<<blocks, kBlock, 0, stream>>>(in_ptr, out_ptr, numel, C, hw, op);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  };
  using VecOn = std::integral_constant<int, kVec>;
  using VecOff = std::integral_constant<int, 1>;
  if (layout == Layout::NCHW) {
    if (vec) {
      launch(VecOn{}, TypeTag<NchwCursor>{});
    } else {
      launch(VecOff{}, TypeTag<NchwCursor>{});
    }
  } else {
    if (vec) {
      launch(VecOn{}, TypeTag<ChannelsLastCursor>{});
    } else {
      launch(VecOff{}, TypeTag<ChannelsLastCursor>{});
    }
  }
}

// y = x * gate[n, c] in acc; also grad_x = grad_y * gate of channel_rescale_backward.
template <typename scalar_t>
struct RescaleOp {
  using acc_t = at::opmath_type<scalar_t>;
  const acc_t* gate;
  __device__ acc_t operator()(int64_t nc, scalar_t x) const {
    return static_cast<acc_t>(x) * gate[nc];
  }
};

// grad_x = grad_avg / hw + [x == max] * share,  share = grad_max / count (CountReducer).
template <typename scalar_t>
struct PoolBackwardOp {
  using acc_t = at::opmath_type<scalar_t>;
  const acc_t* grad_avg;
  const acc_t* max;
  const acc_t* share;  // nullptr without grad_max
  acc_t hw;
  __device__ acc_t operator()(int64_t nc, scalar_t x) const {
    acc_t g = grad_avg[nc] / hw;
    if (share != nullptr) {  // [x == max] * share, so a NaN share (NaN max) reaches every pixel
      g += acc_t(static_cast<acc_t>(x) == max[nc]) * share[nc];
    }
    return g;
  }
};

// ---------------------------------------------------------------------------------------------
// The gate over (N, C): f from (avg, max), z = conv1d_over_C(f, weight), gate = sigmoid(z).
// weight, alpha and beta keep their own dtype and are cast to acc on load.
// ---------------------------------------------------------------------------------------------

template <typename acc_t>
__device__ __forceinline__ acc_t load_as(const void* p, c10::ScalarType t, int64_t i) {
  switch (t) {
    case c10::ScalarType::Double:
      return static_cast<acc_t>(static_cast<const double*>(p)[i]);
    case c10::ScalarType::Float:
      return static_cast<acc_t>(static_cast<const float*>(p)[i]);
    case c10::ScalarType::Half:
      return static_cast<acc_t>(static_cast<float>(static_cast<const at::Half*>(p)[i]));
    case c10::ScalarType::BFloat16:
      return static_cast<acc_t>(static_cast<float>(static_cast<const at::BFloat16*>(p)[i]));
    default:
      return acc_t(0);  // the host allows only the four dtypes above
  }
}

template <typename acc_t>
__device__ __forceinline__ void store_as(void* p, c10::ScalarType t, int64_t i, acc_t v) {
  switch (t) {
    case c10::ScalarType::Double:
      static_cast<double*>(p)[i] = static_cast<double>(v);
      break;
    case c10::ScalarType::Float:
      static_cast<float*>(p)[i] = static_cast<float>(v);
      break;
    case c10::ScalarType::Half:
      static_cast<at::Half*>(p)[i] = static_cast<at::Half>(static_cast<float>(v));
      break;
    case c10::ScalarType::BFloat16:
      static_cast<at::BFloat16*>(p)[i] = static_cast<at::BFloat16>(static_cast<float>(v));
      break;
    default:
      break;
  }
}

template <typename acc_t>
struct GateArgs {
  const acc_t* avg;
  const acc_t* max;
  const void* weight;
  c10::ScalarType weight_dtype;
  const void* alpha;  // nullptr unless mode == kMix
  c10::ScalarType alpha_dtype;
  const void* beta;
  c10::ScalarType beta_dtype;
  int64_t k;  // taps, odd; pad = (k - 1) / 2
  int64_t N, C;
  int64_t mode;

  __device__ acc_t w(int64_t j) const { return load_as<acc_t>(weight, weight_dtype, j); }
  __device__ acc_t alpha_value() const {
    return mode == kMix ? load_as<acc_t>(alpha, alpha_dtype, 0) : acc_t(0);
  }
  __device__ acc_t beta_value() const {
    return mode == kMix ? load_as<acc_t>(beta, beta_dtype, 0) : acc_t(0);
  }
  // f[n, c], zero outside 0 <= c < C (the conv's zero padding).
  __device__ acc_t f(int64_t n, int64_t c, acc_t alpha_v, acc_t beta_v) const {
    if (c < 0 || c >= C) return acc_t(0);
    const acc_t a = avg[n * C + c];
    const acc_t m = max[n * C + c];
    switch (mode) {
      case kAvg:
        return a;
      case kMax:
        return m;
      default:
        return acc_t(0.5) * (a + m) + alpha_v * a + beta_v * m;
    }
  }
};

template <typename acc_t>
__global__ void __launch_bounds__(kBlock)
    channel_gate_kernel(GateArgs<acc_t> g, acc_t* __restrict__ gate) {
  const acc_t alpha = g.alpha_value();
  const acc_t beta = g.beta_value();
  const int64_t pad = (g.k - 1) / 2;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t nc = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; nc < g.N * g.C;
       nc += stride) {
    const int64_t n = nc / g.C;
    const int64_t c = nc - n * g.C;
    acc_t z = 0;
    for (int64_t j = 0; j < g.k; ++j) {
      z += g.w(j) * g.f(n, c + j - pad, alpha, beta);
    }
    gate[nc] = acc_t(1) / (acc_t(1) + ::exp(-z));  // sigmoid, as torch computes it
  }
}

// dz[n, c] = grad_gate * gate * (1 - gate), zero outside 0 <= c < C.
template <typename acc_t>
__device__ __forceinline__ acc_t gate_dz(const acc_t* grad_gate, const acc_t* gate, int64_t n,
                                         int64_t c, int64_t C) {
  if (c < 0 || c >= C) return acc_t(0);
  const acc_t s = gate[n * C + c];
  return grad_gate[n * C + c] * s * (acc_t(1) - s);
}

// df[n, c] = sum_j weight[j] * dz[n, c - j + pad].
template <typename acc_t>
__device__ __forceinline__ acc_t gate_df(const GateArgs<acc_t>& g, const acc_t* grad_gate,
                                         const acc_t* gate, int64_t n, int64_t c) {
  const int64_t pad = (g.k - 1) / 2;
  acc_t df = 0;
  for (int64_t j = 0; j < g.k; ++j) {
    df += g.w(j) * gate_dz(grad_gate, gate, n, c - j + pad, g.C);
  }
  return df;
}

// grad_avg and grad_max, one thread per (n, c).
template <typename acc_t>
__global__ void __launch_bounds__(kBlock)
    channel_gate_backward_kernel(GateArgs<acc_t> g, const acc_t* __restrict__ grad_gate,
                                 const acc_t* __restrict__ gate, acc_t* __restrict__ grad_avg,
                                 acc_t* __restrict__ grad_max) {
  const acc_t alpha = g.alpha_value();
  const acc_t beta = g.beta_value();
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t nc = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; nc < g.N * g.C;
       nc += stride) {
    const int64_t n = nc / g.C;
    const int64_t c = nc - n * g.C;
    const acc_t df = gate_df(g, grad_gate, gate, n, c);
    switch (g.mode) {
      case kAvg:
        grad_avg[nc] = df;
        grad_max[nc] = acc_t(0);
        break;
      case kMax:
        grad_avg[nc] = acc_t(0);
        grad_max[nc] = df;
        break;
      default:
        grad_avg[nc] = df * (acc_t(0.5) + alpha);
        grad_max[nc] = df * (acc_t(0.5) + beta);
        break;
    }
  }
}

// Per-sample partial sums, one block per n: partial[n, j] = sum_c dz[n,c] * f[n, c + j - pad]
// for j < k; with mode == kMix also partial[n, k] = sum_c df*avg and partial[n, k+1] =
// sum_c df*max. Summed over n in order by gate_param_grads_kernel.
template <typename acc_t>
__global__ void __launch_bounds__(kBlock)
    gate_partials_kernel(GateArgs<acc_t> g, const acc_t* __restrict__ grad_gate,
                         const acc_t* __restrict__ gate, int64_t cols,
                         acc_t* __restrict__ partial) {
  __shared__ acc_t smem[kBlock / kWarpSize];
  const acc_t alpha = g.alpha_value();
  const acc_t beta = g.beta_value();
  const int64_t pad = (g.k - 1) / 2;
  auto plus = [](acc_t a, acc_t b) { return a + b; };
  for (int64_t n = blockIdx.x; n < g.N; n += gridDim.x) {  // uniform per block
    for (int64_t col = 0; col < cols; ++col) {
      acc_t s = 0;
      for (int64_t c = threadIdx.x; c < g.C; c += blockDim.x) {
        if (col < g.k) {
          s += gate_dz(grad_gate, gate, n, c, g.C) * g.f(n, c + col - pad, alpha, beta);
        } else {
          const acc_t df = gate_df(g, grad_gate, gate, n, c);
          s += df * (col == g.k ? g.avg[n * g.C + c] : g.max[n * g.C + c]);
        }
      }
      s = block_reduce(s, acc_t(0), plus, smem);
      if (threadIdx.x == 0) {
        partial[n * cols + col] = s;
      }
    }
  }
}

// grad_weight[j] (and grad_alpha, grad_beta) = sum over n of partial[n, col], n in order.
template <typename acc_t>
__global__ void __launch_bounds__(kBlock)
    gate_param_grads_kernel(const acc_t* __restrict__ partial, int64_t N, int64_t k, int64_t cols,
                            void* grad_weight, c10::ScalarType weight_dtype, void* grad_alpha,
                            c10::ScalarType alpha_dtype, void* grad_beta,
                            c10::ScalarType beta_dtype) {
  for (int64_t col = threadIdx.x; col < cols; col += blockDim.x) {
    acc_t total = 0;
    for (int64_t n = 0; n < N; ++n) {
      total += partial[n * cols + col];
    }
    if (col < k) {
      store_as(grad_weight, weight_dtype, col, total);
    } else if (col == k) {
      store_as(grad_alpha, alpha_dtype, 0, total);
    } else {
      store_as(grad_beta, beta_dtype, 0, total);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Host side.
// ---------------------------------------------------------------------------------------------

bool is_param_dtype(at::ScalarType t) {
  return t == at::kDouble || t == at::kFloat || t == at::kHalf || t == at::kBFloat16;
}

void check_gate_cuda(const at::Tensor& avg, const at::Tensor& max, const at::Tensor& weight,
                     const c10::optional<at::Tensor>& alpha,
                     const c10::optional<at::Tensor>& beta, int64_t mode, const char* op) {
  check_gate_args(avg, max, weight, alpha, beta, mode, op);
  TORCH_CHECK_VALUE(avg.is_cuda(), op, ": avg must be a CUDA tensor, got ", avg.device());
  check_cuda(max, avg, op, "max");
  TORCH_CHECK_TYPE(is_param_dtype(weight.scalar_type()), op,
              ": weight must be float64, float32, float16 or bfloat16, got ", weight.scalar_type());
  if (mode == kMix) {
    check_cuda(*alpha, avg, op, "alpha");
    check_cuda(*beta, avg, op, "beta");
    TORCH_CHECK_TYPE(is_param_dtype(alpha->scalar_type()) && is_param_dtype(beta->scalar_type()), op,
                ": alpha and beta must be float64, float32, float16 or bfloat16, got ",
                alpha->scalar_type(), " and ", beta->scalar_type());
  }
}

template <typename acc_t>
GateArgs<acc_t> make_gate_args(const at::Tensor& avg, const at::Tensor& max,
                               const at::Tensor& weight, const c10::optional<at::Tensor>& alpha,
                               const c10::optional<at::Tensor>& beta, int64_t mode) {
  GateArgs<acc_t> g{};
  g.avg = avg.data_ptr<acc_t>();
  g.max = max.data_ptr<acc_t>();
  g.weight = weight.data_ptr();
  g.weight_dtype = weight.scalar_type();
  g.alpha = nullptr;
  g.beta = nullptr;
  g.alpha_dtype = g.beta_dtype = avg.scalar_type();
  if (mode == kMix) {
    g.alpha = alpha->data_ptr();
    g.alpha_dtype = alpha->scalar_type();
    g.beta = beta->data_ptr();
    g.beta_dtype = beta->scalar_type();
  }
  g.k = weight.numel();
  g.N = avg.size(0);
  g.C = avg.size(1);
  g.mode = mode;
  return g;
}

std::tuple<at::Tensor, at::Tensor> channel_pool_cuda(const at::Tensor& x_in) {
  constexpr const char* op = "channel_pool";
  check_feature_map(x_in, op, "x");
  TORCH_CHECK_VALUE(x_in.is_cuda(), op, ": x must be a CUDA tensor, got ", x_in.device());
  c10::cuda::CUDAGuard device_guard(x_in.device());
  const at::Tensor x = dense(x_in);
  const int64_t N = x.size(0), C = x.size(1), hw = x.size(2) * x.size(3);
  const auto acc_options = x.options().dtype(acc_type(x.scalar_type()));
  at::Tensor avg = at::empty({N, C}, acc_options);
  at::Tensor max = at::empty({N, C}, acc_options);
  if (N * C == 0) {
    return {avg, max};
  }
  TORCH_CHECK_VALUE(hw > 0, op, ": H*W must be positive (the max of an empty plane is undefined), got ",
              x.sizes());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "channel_pool_cuda",
                                  [&] {
                                    using acc_t = at::opmath_type<scalar_t>;
                                    const PoolReducer<scalar_t> r{x.data_ptr<scalar_t>(),
                                                                  avg.data_ptr<acc_t>(),
                                                                  max.data_ptr<acc_t>(), hw};
                                    launch_reduction(r, layout_of(x), N, C, hw, x);
                                  });
  return {avg, max};
}

at::Tensor channel_pool_backward_cuda(const at::Tensor& grad_avg_in,
                                      const c10::optional<at::Tensor>& grad_max_in,
                                      const at::Tensor& x_in, const at::Tensor& max_in) {
  constexpr const char* op = "channel_pool_backward";
  check_feature_map(x_in, op, "x");
  TORCH_CHECK_VALUE(x_in.is_cuda(), op, ": x must be a CUDA tensor, got ", x_in.device());
  check_per_channel(grad_avg_in, x_in, op, "grad_avg");
  check_per_channel(max_in, x_in, op, "max");
  const bool has_grad_max = grad_max_in.has_value() && grad_max_in->defined();
  if (has_grad_max) {
    check_per_channel(*grad_max_in, x_in, op, "grad_max");
  }
  c10::cuda::CUDAGuard device_guard(x_in.device());
  const at::Tensor x = dense(x_in);
  const at::Tensor grad_avg = grad_avg_in.contiguous();
  const at::Tensor max = max_in.contiguous();
  const int64_t N = x.size(0), C = x.size(1), hw = x.size(2) * x.size(3);
  const Layout layout = layout_of(x);
  at::Tensor grad_x = empty_like_layout(x);
  if (x.numel() == 0) {
    return grad_x;
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, x.scalar_type(), "channel_pool_backward_cuda", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        // First pass: count the tied maxima of each plane -> share = grad_max / count.
        at::Tensor share;
        if (has_grad_max) {
          const at::Tensor grad_max = grad_max_in->contiguous();
          share = at::empty({N, C}, grad_avg.options());
          const CountReducer<scalar_t> r{x.data_ptr<scalar_t>(), max.data_ptr<acc_t>(),
                                         grad_max.data_ptr<acc_t>(), share.data_ptr<acc_t>()};
          launch_reduction(r, layout, N, C, hw, x);
        }
        // Second pass: grad_x = grad_avg / hw + [x == max] * share.
        const PoolBackwardOp<scalar_t> write{grad_avg.data_ptr<acc_t>(), max.data_ptr<acc_t>(),
                                             has_grad_max ? share.data_ptr<acc_t>() : nullptr,
                                             static_cast<acc_t>(hw)};
        launch_per_channel_map<scalar_t>(x, grad_x, layout, C, hw, write);
      });
  return grad_x;
}

at::Tensor channel_gate_cuda(const at::Tensor& avg_in, const at::Tensor& max_in,
                             const at::Tensor& weight_in, const c10::optional<at::Tensor>& alpha,
                             const c10::optional<at::Tensor>& beta, int64_t mode) {
  constexpr const char* op = "channel_gate";
  check_gate_cuda(avg_in, max_in, weight_in, alpha, beta, mode, op);
  c10::cuda::CUDAGuard device_guard(avg_in.device());
  const at::Tensor avg = avg_in.contiguous();
  const at::Tensor max = max_in.contiguous();
  const at::Tensor weight = weight_in.contiguous();
  at::Tensor gate = at::empty_like(avg);
  const int64_t NC = avg.numel();
  if (NC == 0) {
    return gate;
  }
  AT_DISPATCH_FLOATING_TYPES(avg.scalar_type(), "channel_gate_cuda", [&] {
    using acc_t = scalar_t;  // avg is already in the accumulation dtype
    const GateArgs<acc_t> g = make_gate_args<acc_t>(avg, max, weight, alpha, beta, mode);
    const int64_t blocks = std::min(ceil_div(NC, kBlock), kMaxGrid);
    channel_gate_kernel<acc_t><<<blocks, kBlock, 0, at::cuda::getCurrentCUDAStream()>>>(
        g, gate.data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return gate;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> channel_gate_backward_cuda(
    const at::Tensor& grad_gate_in, const at::Tensor& gate_in, const at::Tensor& avg_in,
    const at::Tensor& max_in, const at::Tensor& weight_in, const c10::optional<at::Tensor>& alpha,
    const c10::optional<at::Tensor>& beta, int64_t mode) {
  constexpr const char* op = "channel_gate_backward";
  check_gate_cuda(avg_in, max_in, weight_in, alpha, beta, mode, op);
  auto check_like_avg = [&](const at::Tensor& t, const char* name) {
    TORCH_CHECK_VALUE(t.sizes() == avg_in.sizes() && t.scalar_type() == avg_in.scalar_type(), op, ": ",
                name, " must match avg's shape ", avg_in.sizes(), " and dtype ",
                avg_in.scalar_type(), ", got ", t.sizes(), " ", t.scalar_type());
    check_cuda(t, avg_in, op, name);
  };
  check_like_avg(grad_gate_in, "grad_gate");
  check_like_avg(gate_in, "gate");
  c10::cuda::CUDAGuard device_guard(avg_in.device());
  const at::Tensor grad_gate = grad_gate_in.contiguous();
  const at::Tensor gate = gate_in.contiguous();
  const at::Tensor avg = avg_in.contiguous();
  const at::Tensor max = max_in.contiguous();
  const at::Tensor weight = weight_in.contiguous();
  const int64_t N = avg.size(0), C = avg.size(1), k = weight.numel();
  const bool mix = mode == kMix;

  at::Tensor grad_avg = at::empty_like(avg);
  at::Tensor grad_max = at::empty_like(avg);
  at::Tensor grad_weight = at::empty(weight_in.sizes(), weight.options());
  // grad_alpha/grad_beta: 0-dim, in alpha's dtype for mode 2 (as the CPU kernel); zeros in acc
  // otherwise.
  at::Tensor grad_alpha = mix ? at::empty({}, alpha->options()) : at::zeros({}, avg.options());
  at::Tensor grad_beta = mix ? at::empty({}, alpha->options()) : at::zeros({}, avg.options());
  if (N * C == 0) {
    grad_weight.zero_();
    grad_alpha.zero_();
    grad_beta.zero_();
    return {grad_avg, grad_max, grad_weight, grad_alpha, grad_beta};
  }
  const int64_t cols = k + (mix ? 2 : 0);  // partial sums per sample: taps, then alpha, beta
  at::Tensor partial = at::empty({N, cols}, avg.options());
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(avg.scalar_type(), "channel_gate_backward_cuda", [&] {
    using acc_t = scalar_t;  // avg is already in the accumulation dtype
    const GateArgs<acc_t> g = make_gate_args<acc_t>(avg, max, weight, alpha, beta, mode);
    const acc_t* grad_gate_ptr = grad_gate.data_ptr<acc_t>();
    const acc_t* gate_ptr = gate.data_ptr<acc_t>();

    const int64_t blocks = std::min(ceil_div(N * C, kBlock), kMaxGrid);
    channel_gate_backward_kernel<acc_t><<<blocks, kBlock, 0, stream>>>(
        g, grad_gate_ptr, gate_ptr, grad_avg.data_ptr<acc_t>(), grad_max.data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();

    gate_partials_kernel<acc_t><<<std::min(N, kMaxGrid), kBlock, 0, stream>>>(
        g, grad_gate_ptr, gate_ptr, cols, partial.data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();

    gate_param_grads_kernel<acc_t><<<1, kBlock, 0, stream>>>(
        partial.data_ptr<acc_t>(), N, k, cols, grad_weight.data_ptr(), grad_weight.scalar_type(),
        mix ? grad_alpha.data_ptr() : nullptr, grad_alpha.scalar_type(),
        mix ? grad_beta.data_ptr() : nullptr, grad_beta.scalar_type());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {grad_avg, grad_max, grad_weight, grad_alpha, grad_beta};
}

at::Tensor channel_rescale_cuda(const at::Tensor& x_in, const at::Tensor& gate_in) {
  constexpr const char* op = "channel_rescale";
  check_feature_map(x_in, op, "x");
  TORCH_CHECK_VALUE(x_in.is_cuda(), op, ": x must be a CUDA tensor, got ", x_in.device());
  check_per_channel(gate_in, x_in, op, "gate");
  c10::cuda::CUDAGuard device_guard(x_in.device());
  const at::Tensor x = dense(x_in);
  const at::Tensor gate = gate_in.contiguous();
  const int64_t C = x.size(1), hw = x.size(2) * x.size(3);
  at::Tensor y = empty_like_layout(x);
  if (x.numel() == 0) {
    return y;
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "channel_rescale_cuda",
                                  [&] {
                                    using acc_t = at::opmath_type<scalar_t>;
                                    const RescaleOp<scalar_t> rescale{gate.data_ptr<acc_t>()};
                                    launch_per_channel_map<scalar_t>(x, y, layout_of(x), C, hw,
                                                                     rescale);
                                  });
  return y;
}

std::tuple<at::Tensor, at::Tensor> channel_rescale_backward_cuda(const at::Tensor& grad_y_in,
                                                                 const at::Tensor& x_in,
                                                                 const at::Tensor& gate_in) {
  constexpr const char* op = "channel_rescale_backward";
  check_feature_map(x_in, op, "x");
  TORCH_CHECK_VALUE(x_in.is_cuda(), op, ": x must be a CUDA tensor, got ", x_in.device());
  check_like_x(grad_y_in, x_in, op, "grad_y");
  check_per_channel(gate_in, x_in, op, "gate");
  c10::cuda::CUDAGuard device_guard(x_in.device());
  const at::Tensor x = dense(x_in);
  const Layout layout = layout_of(x);
  // Both walked with the same index math: grad_y in x's layout (a copy only if it differs).
  const at::Tensor grad_y = grad_y_in.contiguous(memory_format_of(layout));
  const at::Tensor gate = gate_in.contiguous();
  const int64_t N = x.size(0), C = x.size(1), hw = x.size(2) * x.size(3);
  at::Tensor grad_x = empty_like_layout(x);
  at::Tensor grad_gate = at::empty({N, C}, gate.options());
  if (N * C == 0) {
    return {grad_x, grad_gate};
  }
  if (hw == 0) {
    grad_gate.zero_();  // an empty sum
    return {grad_x, grad_gate};
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, x.scalar_type(), "channel_rescale_backward_cuda", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        const RescaleOp<scalar_t> scale{gate.data_ptr<acc_t>()};  // grad_x = grad_y * gate
        launch_per_channel_map<scalar_t>(grad_y, grad_x, layout, C, hw, scale);
        const GradGateReducer<scalar_t> r{grad_y.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(),
                                          grad_gate.data_ptr<acc_t>()};
        launch_reduction(r, layout, N, C, hw, x);
      });
  return {grad_x, grad_gate};
}

}  // namespace
}  // namespace attnkernels

TORCH_LIBRARY_IMPL(attnkernels, CUDA, m) {
  m.impl("channel_pool", &attnkernels::channel_pool_cuda);
  m.impl("channel_pool_backward", &attnkernels::channel_pool_backward_cuda);
  m.impl("channel_gate", &attnkernels::channel_gate_cuda);
  m.impl("channel_gate_backward", &attnkernels::channel_gate_backward_cuda);
  m.impl("channel_rescale", &attnkernels::channel_rescale_cuda);
  m.impl("channel_rescale_backward", &attnkernels::channel_rescale_backward_cuda);
}
