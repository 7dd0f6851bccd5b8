// triplet hot path, CUDA: Triplet's three poolings (over C, H and W) and its apply, and their
// backwards. The math of each op is in the header comment of csrc/triplet_ops.cpp.
//
// Kernels, all on the current stream, 64-bit offsets, every sum in acc(x):
//   * brick_kernel: the reductions (pool, its tie counts, the apply backward's gate gradients).
//     x[n] is cut into bricks of tc channels x th rows x tw columns; a block owns one brick and
//     walks its rows h, each a slab of tc x tw elements loaded once into shared memory (in
//     memory order: a contiguous axis a, w in NCHW and c in channels_last, and a strided one
//     b). From the slab it reduces every line over a (a group of lanes per line, a butterfly)
//     and over b (R threads per line, each a strided run of b, added in order), giving the hw line (h, w) over the brick's
//     channels and the hc line (h, c) over its columns; each thread keeps the running cw
//     values (c, w) of its own slab entries in registers across the rows. Each brick writes
//     its piece of every line to the map's partials, (N, parts, plane) with parts the bricks
//     along the reduced axis (hw: channel tiles, cw: row bands, hc: column tiles), and
//     combine_kernel, a thread per line, reduces them in part order and finishes the line (the
//     means' and tie shares' divisions, kept out of brick_kernel: their slow-path calls spilled).
//   * rows_kernel: the elementwise passes (y, the pool backward's grad_x): a group of threads
//     per contiguous row of x, dividing once per row.
// The brick shapes depend on the shape and the SM count only, and every combination is a fixed
// tree or a loop in index order, with no atomics: bitwise deterministic run to run.
//
// Passes over x: pool 1; pool_backward 2 (tie counts, then grad_x); apply 1; apply_backward 1
// (reads grad_y and x, writes grad_x and sums the three gate gradients in the same pass).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <tuple>

#include "attnkernels/cuda_spatial_pool.cuh"
#include "attnkernels/cuda_utils.cuh"
#include "attnkernels/triplet.h"

namespace attnkernels {
namespace {

using cuda::ceil_div;
using cuda::group_allreduce;
using cuda::kMaxGrid;
using cuda::kWarpSize;
using cuda::nan_max;
using cuda::next_pow2;
using cuda::sm_count;

constexpr int kThreads = 256;                  // threads per block in every kernel here
constexpr int kSlab = 2048;                    // elements of one brick row (tc * tw), at most
constexpr int kEntries = kSlab / kThreads;     // slab entries per thread (its running cw values)
constexpr int64_t kMinRowsPerBand = 16;        // rows per band at least, where bands cost partials

// The three maps, in the order every op sums them (Gate::HW, CW, HC).
constexpr int kHW = 0, kCW = 1, kHC = 2;

#define AK_DISPATCH_FEATURE(x, name, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, (x).scalar_type(), name, __VA_ARGS__)

struct NoCtx {};

// A product rounded on its own, never fused into the sum it feeds: the CPU kernels' rounding.
__device__ __forceinline__ float mul_rn(float a, float b) { return __fmul_rn(a, b); }
__device__ __forceinline__ double mul_rn(double a, double b) { return __dmul_rn(a, b); }

// ---------------------------------------------------------------------------------------------
// The bricks.
// ---------------------------------------------------------------------------------------------

struct Bricks {
  int64_t N, C, H, W;
  int64_t tc, th, tw;              // brick extents
  int64_t ctiles, hbands, wtiles;  // bricks per sample along c, h, w
  int group;                       // lanes per line of the reduction over a (a power of two <= 32)

  __host__ __device__ int64_t count() const { return N * hbands * ctiles * wtiles; }
  // P of map m: hw (H, W), cw (C, W), hc (H, C).
  __host__ __device__ int64_t plane(int m) const { return m == kHW ? H * W : (m == kCW ? C * W : H * C); }
  // Bricks that share one line of map m: hw over the channel tiles, cw over the bands, hc over
  // the column tiles.
  __host__ __device__ int64_t parts(int m) const { return m == kHW ? ctiles : (m == kCW ? hbands : wtiles); }
};

// Channel tiles and column tiles fill a slab of at most kSlab elements, the contiguous axis first
// (up to one block of threads); row bands are cut only as far as needed for about two waves of
// blocks, and no thinner than kMinRowsPerBand rows.
Bricks bricks_for(const at::Tensor& x, bool channels_last) {
  Bricks g{x.size(0), x.size(1), x.size(2), x.size(3), 0, 0, 0, 0, 0, 0, 1};
  const int64_t A = channels_last ? g.C : g.W, B = channels_last ? g.W : g.C;
  const int64_t a_tiles = ceil_div(A, kThreads);
  const int64_t ta = ceil_div(A, a_tiles);  // <= kThreads, balanced
  const int64_t b_tiles = ceil_div(B, kSlab / ta);
  const int64_t tb = ceil_div(B, b_tiles);  // ta * tb <= kSlab
  g.tc = channels_last ? ta : tb;
  g.tw = channels_last ? tb : ta;
  g.ctiles = ceil_div(g.C, g.tc);
  g.wtiles = ceil_div(g.W, g.tw);
  const int64_t target = sm_count() * (2048 / kThreads) * 2;
  const int64_t max_bands = std::max<int64_t>(1, g.H / kMinRowsPerBand);
  const int64_t bands = std::min(max_bands, std::max<int64_t>(1, ceil_div(target, g.N * g.ctiles * g.wtiles)));
  g.th = ceil_div(g.H, bands);
  g.hbands = ceil_div(g.H, g.th);
  g.group = static_cast<int>(std::min<int64_t>(kWarpSize, next_pow2(ta)));
  return g;
}

// a[m] for a map index m known only at run time: a select, so that an op's pointer arrays stay
// in registers (indexing a kernel parameter's array copies it to the stack).
template <typename T>
__host__ __device__ __forceinline__ T pick(const T (&a)[3], int m) {
  return m == kHW ? a[0] : (m == kCW ? a[1] : a[2]);
}

// The (N, parts, P) states of each map: one per brick that holds a piece of the line.
template <typename State>
struct Partials {
  State* part[3];
};

// Line i of map m in sample n, from part p of its parts. Every map goes through its partials,
// even in one part: the divisions of the finish (slow-path calls) stay out of brick_kernel,
// where their calling convention spilled registers.
template <typename State>
__device__ __forceinline__ void emit(const Bricks& g, const Partials<State>& pt, int m, int64_t n, int64_t p,
                                     int64_t i, const State& s) {
  pick(pt.part, m)[(n * g.parts(m) + p) * g.plane(m) + i] = s;
}

// An op says what an element contributes and where a finished line goes:
//   State, init(), add(State&, v, Ctx), combine(a, b)   the running value of a line
//   Ctx line(m, n, i)                                    what a line of map m compares with
//   acc_t element(off, n, c, h, w)                       the element's value (may write grad_x)
//   finish(m, n, i, State)                               line i of map m, finished
//                                                        (combine_kernel)
template <bool kCL, typename Op>
__global__ void __launch_bounds__(kThreads)
    brick_kernel(Op op, Bricks g, Partials<typename Op::State> pt) {
  using acc_t = typename Op::acc_t;
  using State = typename Op::State;
  using Ctx = typename Op::Ctx;
  __shared__ acc_t slab[kSlab];
  __shared__ State sums[kThreads];  // the partial sums over b, R per line
  const int tid = threadIdx.x;
  const int G = g.group;
  const int lane = tid % G;
  const int lines_per_step = kThreads / G;
  auto combine = [](State a, State b) { return Op::combine(a, b); };
  for (int64_t brick = blockIdx.x; brick < g.count(); brick += gridDim.x) {  // uniform per block
    const int64_t wt = brick % g.wtiles;
    const int64_t ct = (brick / g.wtiles) % g.ctiles;
    const int64_t hb = (brick / g.wtiles / g.ctiles) % g.hbands;
    const int64_t n = brick / g.wtiles / g.ctiles / g.hbands;
    const int64_t c0 = ct * g.tc, w0 = wt * g.tw, h0 = hb * g.th;
    const int64_t h1 = h0 + g.th < g.H ? h0 + g.th : g.H;
    const int len_c = static_cast<int>(c0 + g.tc < g.C ? g.tc : g.C - c0);
    const int len_w = static_cast<int>(w0 + g.tw < g.W ? g.tw : g.W - w0);
    const int A = kCL ? len_c : len_w, B = kCL ? len_w : len_c, AB = A * B;  // slab entry b * A + a

    // This thread's slab entries tid + j * kThreads: their running cw values over the rows.
    // (Their lines' Ctx is read again each row, from L1: kept in registers it spilled Ties.)
    State cw[kEntries];
#pragma unroll
    for (int j = 0; j < kEntries; ++j) cw[j] = Op::init();

    for (int64_t h = h0; h < h1; ++h) {
#pragma unroll
      for (int j = 0; j < kEntries; ++j) {
        const int e = tid + j * kThreads;
        if (e < AB) {
          const int a = e % A, b = e / A;
          const int64_t c = c0 + (kCL ? a : b), w = w0 + (kCL ? b : a);
          const int64_t off = kCL ? ((n * g.H + h) * g.W + w) * g.C + c : ((n * g.C + c) * g.H + h) * g.W + w;
          const acc_t v = op.element(off, n, c, h, w);
          slab[e] = v;
          Op::add(cw[j], v, op.line(kCW, n, c * g.W + w));
        }
      }
      __syncthreads();

      // Over a, a group of G lanes per line b: NCHW the hc line (h, c), channels_last the hw
      // line (h, w).
      for (int b_row = 0; b_row < B; b_row += lines_per_step) {  // uniform: every lane shuffles
        const int b = b_row + tid / G;
        State s = Op::init();
        int64_t i = 0;
        if (b < B) {
          i = kCL ? h * g.W + w0 + b : h * g.C + c0 + b;
          const Ctx ctx = op.line(kCL ? kHW : kHC, n, i);
          for (int a = lane; a < A; a += G) Op::add(s, slab[b * A + a], ctx);
        }
        s = group_allreduce(s, G, combine);
        if (b < B && lane == 0) emit(g, pt, kCL ? kHW : kHC, n, kCL ? ct : wt, i, s);
      }

      // Over b, R = kThreads / A threads per line a (A <= kThreads), thread r taking b = r,
      // r + R, ..., then thread 0 of the line adding the R sums in order: NCHW the hw line
      // (h, w), channels_last the hc line (h, c). (A thread per line left most threads idle
      // where W is small: W = 7 ran 7 threads over 292 channels.)
      {
        const int R = kThreads / A, a = tid % A, r = tid / A;
        const int64_t i = kCL ? h * g.C + c0 + a : h * g.W + w0 + a;
        State s = Op::init();
        if (r < R) {
          const Ctx ctx = op.line(kCL ? kHC : kHW, n, i);
          for (int b = r; b < B; b += R) Op::add(s, slab[b * A + a], ctx);
          sums[tid] = s;
        }
        __syncthreads();
        if (r == 0) {
          for (int k = 1; k < R; ++k) s = Op::combine(s, sums[k * A + a]);
          emit(g, pt, kCL ? kHC : kHW, n, kCL ? wt : ct, i, s);
        }
      }
      __syncthreads();  // the slab and sums are rewritten by the next row
    }

#pragma unroll
    for (int j = 0; j < kEntries; ++j) {
      const int e = tid + j * kThreads;
      if (e < AB) {
        const int64_t c = c0 + (kCL ? e % A : e / A), w = w0 + (kCL ? e / A : e % A);
        emit(g, pt, kCW, n, hb, c * g.W + w, cw[j]);
      }
    }
  }
}

// One thread per line (n, i) of map m: its parts combined in part order, then finished.
template <typename Op>
__global__ void __launch_bounds__(kThreads)
    combine_kernel(Op op, int m, const typename Op::State* __restrict__ part, int64_t N, int64_t parts,
                   int64_t P) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t ni = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; ni < N * P; ni += stride) {
    const int64_t n = ni / P, i = ni - n * P;
    const auto* q = part + n * parts * P + i;
    auto s = q[0];
    for (int64_t k = 1; k < parts; ++k) s = Op::combine(s, q[k * P]);
    op.finish(m, n, i, s);
  }
}

// Runs op's reductions over the dense x (x.numel() > 0), in x's layout.
template <typename Op>
void run_bricks(const Op& op, const at::Tensor& x) {
  using State = typename Op::State;
  const bool cl = layout_of(x) == Layout::ChannelsLast;
  const Bricks g = bricks_for(x, cl);
  Partials<State> pt{};
  at::Tensor workspace[3];
  for (int m = 0; m < 3; ++m) {
    workspace[m] = at::empty({g.N * g.parts(m) * g.plane(m) * static_cast<int64_t>(sizeof(State))},
                             x.options().dtype(at::kByte));
    pt.part[m] = reinterpret_cast<State*>(workspace[m].data_ptr());
  }
  auto stream = at::cuda::getCurrentCUDAStream();
  const auto blocks = static_cast<unsigned>(std::min(g.count(), kMaxGrid));
  if (cl) {
    brick_kernel<true, Op><<<blocks, kThreads, 0, stream>>>(op, g, pt);
  } else {
    brick_kernel<false, Op><<<blocks, kThreads, 0, stream>>>(op, g, pt);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  for (int m = 0; m < 3; ++m) {
    const int64_t lines = g.N * g.plane(m);
    const auto blocks2 = static_cast<unsigned>(std::min(ceil_div(lines, kThreads), kMaxGrid));
    combine_kernel<Op><<<blocks2, kThreads, 0, stream>>>(op, m, pt.part[m], g.N, g.parts(m), g.plane(m));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

// ---------------------------------------------------------------------------------------------
// The elementwise rows.
// ---------------------------------------------------------------------------------------------

// f(off, n, c, h, w) for every element of the dense x, walked in x's layout as rows of its
// contiguous axis (NCHW rows (n, c, h) along w, channels_last rows (n, h, w) along c), a group
// of G threads per row.
template <bool kCL, typename F>
__global__ void __launch_bounds__(kThreads)
    rows_kernel(F f, int64_t N, int64_t C, int64_t H, int64_t W, int G) {
  const int64_t A = kCL ? C : W;
  const int64_t rows = N * (kCL ? H * W : C * H);
  const int rows_per_block = kThreads / G;
  const int lane = threadIdx.x % G;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * rows_per_block;
  for (int64_t r = static_cast<int64_t>(blockIdx.x) * rows_per_block + threadIdx.x / G; r < rows; r += stride) {
    if constexpr (kCL) {  // r = (n * H + h) * W + w
      const int64_t w = r % W, h = (r / W) % H, n = r / W / H;
      for (int64_t a = lane; a < A; a += G) f(r * A + a, n, a, h, w);
    } else {  // r = (n * C + c) * H + h
      const int64_t h = r % H, c = (r / H) % C, n = r / H / C;
      for (int64_t a = lane; a < A; a += G) f(r * A + a, n, c, h, a);
    }
  }
}

template <typename F>
void run_rows(const F& f, const at::Tensor& x) {
  const bool cl = layout_of(x) == Layout::ChannelsLast;
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  const int64_t A = cl ? C : W, rows = x.numel() / A;
  const int G = static_cast<int>(std::min<int64_t>(kThreads, next_pow2(A)));
  // About four resident waves of blocks; the grid-stride loop covers the rest.
  const int64_t blocks = std::min(ceil_div(rows, kThreads / G), sm_count() * (2048 / kThreads) * 4);
  auto stream = at::cuda::getCurrentCUDAStream();
  if (cl) {
    rows_kernel<true><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(f, N, C, H, W, G);
  } else {
    rows_kernel<false><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(f, N, C, H, W, G);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// ---------------------------------------------------------------------------------------------
// Ops.
// ---------------------------------------------------------------------------------------------

// The sizes the ops index their maps with: line i of hw (h, w) is h*W + w, of cw (c, w)
// c*W + w, of hc (h, c) h*C + c.
struct Planes {
  int64_t C, H, W;
  __host__ __device__ int64_t size(int m) const { return m == kHW ? H * W : (m == kCW ? C * W : H * C); }
  // The length L of map m's lines: C, H, W.
  __host__ __device__ int64_t length(int m) const { return m == kHW ? C : (m == kCW ? H : W); }
};

Planes planes_of(const at::Tensor& x) { return {x.size(1), x.size(2), x.size(3)}; }

// triplet_pool: d_m[n,0,i] = max over the line, d_m[n,1,i] = sum / L.
template <typename scalar_t>
struct Pool {
  using acc_t = at::opmath_type<scalar_t>;
  struct State {
    acc_t max, sum;
  };
  using Ctx = NoCtx;

  const scalar_t* x;
  acc_t* d[3];  // (N, 2, P)
  Planes p;

  __device__ static State init() { return {static_cast<acc_t>(-INFINITY), acc_t(0)}; }
  __device__ static void add(State& s, acc_t v, Ctx) {
    s.max = nan_max(s.max, v);  // NaN-propagating, as torch.amax
    s.sum += v;
  }
  __device__ static State combine(State a, State b) { return {nan_max(a.max, b.max), a.sum + b.sum}; }
  __device__ Ctx line(int, int64_t, int64_t) const { return {}; }
  __device__ acc_t element(int64_t off, int64_t, int64_t, int64_t, int64_t) const {
    return static_cast<acc_t>(x[off]);
  }
  __device__ void finish(int m, int64_t n, int64_t i, const State& s) const {
    const int64_t P = p.size(m);
    acc_t* out = pick(d, m);
    out[2 * n * P + i] = s.max;
    out[(2 * n + 1) * P + i] = s.sum / static_cast<acc_t>(p.length(m));
  }
};

// What grad_x needs of line i of a map: its max M, a = grad_d[n,0,i] / cnt, b = grad_d[n,1,i] / L.
template <typename acc_t>
struct Coef {
  acc_t M, a, b;
};

// triplet_pool_backward, first pass: cnt = #{x == M} along every line (a NaN M ties nothing:
// cnt 0, a = inf or NaN), finished into the line's Coef.
template <typename scalar_t>
struct Ties {
  using acc_t = at::opmath_type<scalar_t>;
  struct State {
    acc_t cnt;
  };
  using Ctx = acc_t;  // the line's M

  const scalar_t* x;
  const acc_t* d[3];       // (N, 2, P): M = d[n,0,i]
  const acc_t* grad_d[3];  // (N, 2, P)
  Coef<acc_t>* coef[3];    // (N, P)
  Planes p;

  __device__ static State init() { return {acc_t(0)}; }
  __device__ static void add(State& s, acc_t v, Ctx M) { s.cnt += static_cast<acc_t>(v == M); }
  __device__ static State combine(State a, State b) { return {a.cnt + b.cnt}; }
  __device__ Ctx line(int m, int64_t n, int64_t i) const { return pick(d, m)[2 * n * p.size(m) + i]; }
  __device__ acc_t element(int64_t off, int64_t, int64_t, int64_t, int64_t) const {
    return static_cast<acc_t>(x[off]);
  }
  __device__ void finish(int m, int64_t n, int64_t i, const State& s) const {
    const int64_t P = p.size(m);
    const acc_t* gd = pick(grad_d, m);
    pick(coef, m)[n * P + i] = {pick(d, m)[2 * n * P + i], gd[2 * n * P + i] / s.cnt,
                                gd[(2 * n + 1) * P + i] / static_cast<acc_t>(p.length(m))};
  }
};

// triplet_pool_backward, second pass: grad_x = sum over hw, cw, hc of [x == M] * a + b, the
// indicator a literal product (a NaN M makes its whole line NaN).
template <typename scalar_t>
struct PoolGrad {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* x;
  scalar_t* grad_x;
  const Coef<acc_t>* coef[3];  // (N, P)
  Planes p;

  __device__ static acc_t term(const Coef<acc_t>& k, acc_t v) { return static_cast<acc_t>(v == k.M) * k.a + k.b; }
  __device__ void operator()(int64_t off, int64_t n, int64_t c, int64_t h, int64_t w) const {
    const acc_t v = static_cast<acc_t>(x[off]);
    const acc_t t_hw = term(coef[kHW][n * p.H * p.W + h * p.W + w], v);
    const acc_t t_cw = term(coef[kCW][n * p.C * p.W + c * p.W + w], v);
    const acc_t t_hc = term(coef[kHC][n * p.H * p.C + h * p.C + c], v);
    grad_x[off] = static_cast<scalar_t>(t_hw + t_cw + t_hc);
  }
};

// triplet_apply: y = (x * s_hw + x * s_cw + x * s_hc) / 3, in that order.
template <typename scalar_t>
struct Apply {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* x;
  scalar_t* y;
  const acc_t* s_hw;  // (N, 1, H, W)
  const acc_t* s_cw;  // (N, 1, C, W)
  const acc_t* s_hc;  // (N, 1, H, C)
  Planes p;

  __device__ void operator()(int64_t off, int64_t n, int64_t c, int64_t h, int64_t w) const {
    const acc_t v = static_cast<acc_t>(x[off]);
    const acc_t sum = mul_rn(v, s_hw[(n * p.H + h) * p.W + w]) + mul_rn(v, s_cw[(n * p.C + c) * p.W + w]) +
                      mul_rn(v, s_hc[(n * p.H + h) * p.C + c]);
    y[off] = static_cast<scalar_t>(sum / acc_t(3));
  }
};

// triplet_apply_backward: g = grad_y / 3; grad_x = g * s_hw + g * s_cw + g * s_hc, written as the
// slab is loaded; the three gate gradients are the sums of g * x along the lines.
template <typename scalar_t>
struct ApplyBackward {
  using acc_t = at::opmath_type<scalar_t>;
  struct State {
    acc_t sum;
  };
  using Ctx = NoCtx;

  const scalar_t* x;
  const scalar_t* grad_y;  // in x's layout
  scalar_t* grad_x;
  const acc_t* s_hw;
  const acc_t* s_cw;
  const acc_t* s_hc;
  acc_t* grad_s[3];  // (N, 1, P)
  Planes p;

  __device__ static State init() { return {acc_t(0)}; }
  __device__ static void add(State& s, acc_t v, Ctx) { s.sum += v; }
  __device__ static State combine(State a, State b) { return {a.sum + b.sum}; }
  __device__ Ctx line(int, int64_t, int64_t) const { return {}; }
  __device__ acc_t element(int64_t off, int64_t n, int64_t c, int64_t h, int64_t w) const {
    const acc_t g = static_cast<acc_t>(grad_y[off]) / acc_t(3);
    grad_x[off] = static_cast<scalar_t>(mul_rn(g, s_hw[(n * p.H + h) * p.W + w]) +
                                        mul_rn(g, s_cw[(n * p.C + c) * p.W + w]) +
                                        mul_rn(g, s_hc[(n * p.H + h) * p.C + c]));
    return mul_rn(g, static_cast<acc_t>(x[off]));
  }
  __device__ void finish(int m, int64_t n, int64_t i, const State& s) const { pick(grad_s, m)[n * p.size(m) + i] = s.sum; }
};

// ---------------------------------------------------------------------------------------------
// Host side. Checks as the CPU kernels', in the same order; then x dense, every small map
// contiguous in acc(x).
// ---------------------------------------------------------------------------------------------

// (N, k, rows, cols) of gate `gate`'s plane, in acc(x), NCHW-contiguous.
at::Tensor plane_map(const at::Tensor& x, Gate gate, int64_t k) {
  const PlaneDims d = plane_dims(gate);
  return at::empty({x.size(0), k, x.size(d.rows), x.size(d.cols)}, acc_options(x));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> triplet_pool_cuda(const at::Tensor& x_in) {
  constexpr const char* op = "triplet_pool";
  cuda::check_cuda_x(x_in, op);
  c10::cuda::CUDAGuard device_guard(x_in.device());
  const at::Tensor x = dense(x_in);
  at::Tensor d_hw = plane_map(x, Gate::HW, 2), d_cw = plane_map(x, Gate::CW, 2), d_hc = plane_map(x, Gate::HC, 2);
  if (x.numel() == 0) {  // a line of no values: max -inf, mean 0 / 0 = NaN
    for (const at::Tensor& d : {d_hw, d_cw, d_hc}) {
      d.select(1, 0).fill_(-INFINITY);
      d.select(1, 1).fill_(NAN);
    }
    return {d_hw, d_cw, d_hc};
  }
  AK_DISPATCH_FEATURE(x, "triplet_pool_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const Pool<scalar_t> pool{x.const_data_ptr<scalar_t>(),
                              {d_hw.data_ptr<acc_t>(), d_cw.data_ptr<acc_t>(), d_hc.data_ptr<acc_t>()},
                              planes_of(x)};
    run_bricks(pool, x);
  });
  return {d_hw, d_cw, d_hc};
}

at::Tensor triplet_pool_backward_cuda(const at::Tensor& grad_d_hw, const at::Tensor& grad_d_cw,
                                      const at::Tensor& grad_d_hc, const at::Tensor& x_in, const at::Tensor& d_hw,
                                      const at::Tensor& d_cw, const at::Tensor& d_hc) {
  constexpr const char* op = "triplet_pool_backward";
  cuda::check_cuda_x(x_in, op);
  check_triplet_pool_backward_args(grad_d_hw, grad_d_cw, grad_d_hc, x_in, d_hw, d_cw, d_hc, op);
  c10::cuda::CUDAGuard device_guard(x_in.device());
  const at::Tensor x = dense(x_in);
  at::Tensor grad_x = empty_like_layout(x);
  if (x.numel() == 0) return grad_x;
  const at::Tensor d[3] = {d_hw.contiguous(), d_cw.contiguous(), d_hc.contiguous()};
  const at::Tensor grad_d[3] = {grad_d_hw.contiguous(), grad_d_cw.contiguous(), grad_d_hc.contiguous()};
  const Planes p = planes_of(x);
  AK_DISPATCH_FEATURE(x, "triplet_pool_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    constexpr int64_t kPerLine = sizeof(Coef<acc_t>) / sizeof(acc_t);
    at::Tensor coef[3];
    Ties<scalar_t> ties{x.const_data_ptr<scalar_t>(), {}, {}, {}, p};
    for (int m = 0; m < 3; ++m) {
      coef[m] = at::empty({x.size(0), p.size(m), kPerLine}, acc_options(x));
      ties.d[m] = d[m].const_data_ptr<acc_t>();
      ties.grad_d[m] = grad_d[m].const_data_ptr<acc_t>();
      ties.coef[m] = reinterpret_cast<Coef<acc_t>*>(coef[m].data_ptr<acc_t>());
    }
    run_bricks(ties, x);
    const PoolGrad<scalar_t> write{
        x.const_data_ptr<scalar_t>(), grad_x.data_ptr<scalar_t>(), {ties.coef[0], ties.coef[1], ties.coef[2]}, p};
    run_rows(write, x);
  });
  return grad_x;
}

at::Tensor triplet_apply_cuda(const at::Tensor& x_in, const at::Tensor& s_hw_in, const at::Tensor& s_cw_in,
                              const at::Tensor& s_hc_in) {
  constexpr const char* op = "triplet_apply";
  cuda::check_cuda_x(x_in, op);
  check_triplet_apply_args(x_in, s_hw_in, s_cw_in, s_hc_in, op);
  c10::cuda::CUDAGuard device_guard(x_in.device());
  const at::Tensor x = dense(x_in);
  at::Tensor y = empty_like_layout(x);
  if (x.numel() == 0) return y;
  const at::Tensor s_hw = s_hw_in.contiguous(), s_cw = s_cw_in.contiguous(), s_hc = s_hc_in.contiguous();
  AK_DISPATCH_FEATURE(x, "triplet_apply_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const Apply<scalar_t> apply{x.const_data_ptr<scalar_t>(), y.data_ptr<scalar_t>(), s_hw.const_data_ptr<acc_t>(),
                                s_cw.const_data_ptr<acc_t>(), s_hc.const_data_ptr<acc_t>(), planes_of(x)};
    run_rows(apply, x);
  });
  return y;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> triplet_apply_backward_cuda(
    const at::Tensor& grad_y_in, const at::Tensor& x_in, const at::Tensor& s_hw_in, const at::Tensor& s_cw_in,
    const at::Tensor& s_hc_in) {
  constexpr const char* op = "triplet_apply_backward";
  cuda::check_cuda_x(x_in, op);
  check_triplet_apply_args(x_in, s_hw_in, s_cw_in, s_hc_in, op);
  c10::cuda::CUDAGuard device_guard(x_in.device());
  const at::Tensor x = dense(x_in);
  const at::Tensor grad_y = walked_like_x(grad_y_in, x, op, "grad_y");
  at::Tensor grad_x = empty_like_layout(x);
  at::Tensor grad_s_hw = plane_map(x, Gate::HW, 1), grad_s_cw = plane_map(x, Gate::CW, 1),
             grad_s_hc = plane_map(x, Gate::HC, 1);
  if (x.numel() == 0) {  // empty sums
    grad_s_hw.zero_();
    grad_s_cw.zero_();
    grad_s_hc.zero_();
    return {grad_x, grad_s_hw, grad_s_cw, grad_s_hc};
  }
  const at::Tensor s_hw = s_hw_in.contiguous(), s_cw = s_cw_in.contiguous(), s_hc = s_hc_in.contiguous();
  AK_DISPATCH_FEATURE(x, "triplet_apply_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const ApplyBackward<scalar_t> backward{
        x.const_data_ptr<scalar_t>(),
        grad_y.const_data_ptr<scalar_t>(),
        grad_x.data_ptr<scalar_t>(),
        s_hw.const_data_ptr<acc_t>(),
        s_cw.const_data_ptr<acc_t>(),
        s_hc.const_data_ptr<acc_t>(),
        {grad_s_hw.data_ptr<acc_t>(), grad_s_cw.data_ptr<acc_t>(), grad_s_hc.data_ptr<acc_t>()},
        planes_of(x)};
    run_bricks(backward, x);
  });
  return {grad_x, grad_s_hw, grad_s_cw, grad_s_hc};
}

#undef AK_DISPATCH_FEATURE

}  // namespace
}  // namespace attnkernels

TORCH_LIBRARY_IMPL(attnkernels, CUDA, m) {
  m.impl("triplet_pool", &attnkernels::triplet_pool_cuda);
  m.impl("triplet_pool_backward", &attnkernels::triplet_pool_backward_cuda);
  m.impl("triplet_apply", &attnkernels::triplet_apply_cuda);
  m.impl("triplet_apply_backward", &attnkernels::triplet_apply_backward_cuda);
}
