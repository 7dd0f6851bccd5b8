// gam_channel hot path, CUDA: GAM's per-pixel channel MLP gate and its backward. The math of both
// ops is in the header comment of csrc/gam_channel_ops.cpp.
//
// The MLP runs on every pixel p, so a block takes a tile of TP pixels of one sample and treats the
// two layers as small GEMMs over the tile, with every operand staged in shared memory in acc:
//
//   h  (rd x TP) = relu(W1 (rd x C) . x (C x TP) + b1)     x staged kKC channels at a time
//   pre (R x TP) = W2[c0:c0+R] (R x rd) . h (rd x TP)        one pass per chunk of R output channels
//   x1 = x * sigmoid(pre + b2)                                 x re-read (an L2 hit: the tile was just read)
//
// The backward recomputes h, then makes two passes over the channel chunks:
//   pass A: g = grad_x1 * x * m * (1 - m);  dh += W2^T g;  grad_w2 += g h^T;  grad_b2 += sum_p g
//   (dh = relu_grad(dh, h);  grad_b1 += sum_p dh)
//   pass B: m again;  grad_x = grad_x1 * m + W1^T dh;  grad_w1 += dh x^T
// m is recomputed in pass B rather than kept, since C x TP values would not fit next to the rest.
// The weight gradients are per-block partial sums ("slots", one per block, accumulated over the
// block's tiles in tile order) that a second kernel adds slot by slot: no atomics, bitwise
// deterministic for a given device (the block count depends on shapes and the SM count only).
//
// All products are SIMT FMAs in acc (float32, or float64 for float64 inputs). Every GEMM goes
// through block_gemm: 256 threads, 4 x 4 register micro-tiles whose rows and columns are strided
// by the thread grid (so neighbouring lanes read neighbouring shared-memory words), and a split
// of the reduction across thread groups when the output is too small to occupy every thread. The
// weights are read straight from global memory (a few KB to a few MB, L1/L2 resident); tiles of
// feature maps are staged with a walk that follows the tensor's layout (along pixels for NCHW,
// along channels for channels_last) so global accesses stay coalesced in both.
//
// Tile shape: R * TP = kTileArea (4096 float / 2048 double) with R = next_pow2(rd) (at least 16):
// rd = 16 gives 256-pixel tiles and 16-channel passes. The hidden maps take rd x TP <= kTileArea
// values, so any rd fits until shared memory runs out (rd in the thousands).
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <tuple>

#include "attnkernels/gam_channel.h"
#include "attnkernels/cuda_utils.cuh"

namespace attnkernels {
namespace {

using cuda::ceil_div;
using cuda::feature_map;
using cuda::FeatureMap;
using cuda::relu;
using cuda::relu_grad;
using cuda::sigmoid;
using cuda::check_cuda;
using cuda::kMaxGrid;
using cuda::next_pow2;
using cuda::sm_count;

constexpr int kThreads = 256;  // threads per block in every kernel here
constexpr int kKC = 32;        // channels of x staged per step of fc1's reduction over C

// Rows x pixels of a block's GEMM output tile: 256 threads x 16 accumulators.
template <typename acc_t>
constexpr int kTileArea = 4096 * 4 / static_cast<int>(sizeof(acc_t));


// ---------------------------------------------------------------------------------------------
// Block GEMM: out(m, n) = sum_k A(k, m) * B(k, n) for m < M, n < N, handed to epi(m, n, value).
// ---------------------------------------------------------------------------------------------

// One GEMM operand: element (k, m) at p[k*sk + m*sm], in shared or global memory.
template <typename acc_t>
struct Operand {
  const acc_t* p;
  int64_t sk, sm;
};

__device__ __forceinline__ int pow2_at_least(int v) {
  int p = 1;
  while (p < v) p <<= 1;
  return p;
}

// All kThreads threads call it with the same arguments (it may synchronise). The threads form a
// grid of CT columns x RT rows x S reduction slices; a thread owns rows ty + RT*i and columns
// tx + CT*j (i, j < 4) of each (4 RT) x (4 CT) output block, so lanes read consecutive words of
// row-major operands. S > 1 when M x N is too small for 256 threads: each slice sums a range of
// k, the slices meet in `scratch` (kThreads * 16 values) and are added in slice order.
// Out-of-range rows and columns are clamped to valid ones for reading and never reach epi.
// The caller synchronises before (operands written) and after (epi's results read).
template <typename acc_t, typename Epilogue>
__device__ void block_gemm(int M, int N, int K, Operand<acc_t> A, Operand<acc_t> B, acc_t* scratch,
                           const Epilogue& epi) {
  if (M <= 0 || N <= 0) return;
  const int CT = min(64, pow2_at_least((N + 3) / 4));
  const int RT = min(kThreads / CT, pow2_at_least((M + 3) / 4));
  const int S = kThreads / (CT * RT);
  const int tid = threadIdx.x;
  const int tx = tid % CT;
  const int ty = (tid / CT) % RT;
  const int slice = tid / (CT * RT);
  const int k_len = (K + S - 1) / S;
  const int k_begin = min(K, slice * k_len);
  const int k_end = min(K, k_begin + k_len);
  for (int m0 = 0; m0 < M; m0 += 4 * RT) {
    for (int n0 = 0; n0 < N; n0 += 4 * CT) {
      int64_t a_off[4], b_off[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        a_off[i] = min(m0 + ty + RT * i, M - 1) * A.sm;
        b_off[i] = min(n0 + tx + CT * i, N - 1) * B.sm;
      }
      acc_t acc[4][4];
#pragma unroll
      for (int i = 0; i < 4; ++i) {
#pragma unroll
        for (int j = 0; j < 4; ++j) acc[i][j] = acc_t(0);
      }
      const acc_t* pa = A.p + k_begin * A.sk;
      const acc_t* pb = B.p + k_begin * B.sk;
      for (int k = k_begin; k < k_end; ++k, pa += A.sk, pb += B.sk) {
        acc_t a[4], b[4];
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          a[i] = pa[a_off[i]];
          b[i] = pb[b_off[i]];
        }
#pragma unroll
        for (int i = 0; i < 4; ++i) {
#pragma unroll
          for (int j = 0; j < 4; ++j) acc[i][j] += a[i] * b[j];
        }
      }
      if (S == 1) {
#pragma unroll
        for (int i = 0; i < 4; ++i) {
#pragma unroll
          for (int j = 0; j < 4; ++j) {
            const int m = m0 + ty + RT * i;
            const int n = n0 + tx + CT * j;
            if (m < M && n < N) epi(m, n, acc[i][j]);
          }
        }
      } else {
        const int per_slice = RT * CT * 16;
#pragma unroll
        for (int i = 0; i < 4; ++i) {
#pragma unroll
          for (int j = 0; j < 4; ++j) scratch[slice * per_slice + (i * 4 + j) * RT * CT + ty * CT + tx] = acc[i][j];
        }
        __syncthreads();
        for (int e = tid; e < per_slice; e += kThreads) {
          acc_t v = scratch[e];
          for (int s = 1; s < S; ++s) v += scratch[s * per_slice + e];
          const int ij = e / (RT * CT);
          const int t = e - ij * (RT * CT);
          const int m = m0 + t / CT + RT * (ij / 4);
          const int n = n0 + t % CT + CT * (ij % 4);
          if (m < M && n < N) epi(m, n, v);
        }
        __syncthreads();  // scratch is free again
      }
    }
  }
}

// Visits the (c, p) of a c_count x p_count tile in the order that makes consecutive threads touch
// consecutive addresses of a tensor in the walked layout: along p for NCHW, along c for
// channels_last.
template <typename F>
__device__ __forceinline__ void for_each_in_tile(int c_count, int p_count, bool channels_inner, const F& f) {
  const int count = c_count * p_count;
  for (int e = threadIdx.x; e < count; e += kThreads) {
    if (channels_inner) {
      f(e % c_count, e / c_count);
    } else {
      f(e / p_count, e % p_count);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// The kernels.
// ---------------------------------------------------------------------------------------------

template <typename acc_t>
struct GamArgs {
  FeatureMap x;
  FeatureMap grad_x1;  // backward only
  FeatureMap out;      // x1 (forward) or grad_x (backward), in x's layout and dtype
  // The weights in acc, each also transposed so that every GEMM reads its A operand k-major:
  const acc_t* w1;   // (rd, C)
  const acc_t* w1t;  // (C, rd)
  const acc_t* b1;   // rd
  const acc_t* w2;   // (C, rd)
  const acc_t* w2t;  // (rd, C)
  const acc_t* b2;   // C
  int64_t HW;
  int C, rd;
  int TP, R;  // pixels per tile, output channels per pass
  int64_t tiles_per_sample, tiles;
  bool channels_inner;  // x is channels_last: tile walks go along channels
  acc_t* slots;         // backward: per-block partial weight gradients, slot_len values each
  int64_t slot_len;     // rd*C (grad_w1) + rd (grad_b1) + C*rd (grad_w2) + C (grad_b2)
};

// Offsets (in acc values) of the shared-memory regions of a block, the same on host and device.
struct GamSmem {
  int ldp;          // row stride of pixel rows: TP rounded up to odd, so column walks spread over banks
  int64_t hs;       // h (rd x ldp)
  int64_t dhs;      // backward: dh (rd x ldp)
  int64_t tiles;    // three R x ldp tiles t0, t1, t2 (forward: one); x's staging aliases them
  int64_t tile_len;
  int64_t scratch;  // block_gemm's split-reduction space (kThreads * 16)
  int64_t one;      // a 1, the B operand of row sums (sum_p v = v . 1)
  int64_t total;
};

__host__ __device__ inline GamSmem gam_smem(int rd, int TP, int R, bool backward) {
  GamSmem s{};
  s.ldp = TP | 1;
  s.hs = 0;
  s.dhs = s.hs + static_cast<int64_t>(rd) * s.ldp;
  s.tiles = s.dhs + (backward ? static_cast<int64_t>(rd) * s.ldp : 0);
  s.tile_len = static_cast<int64_t>(R) * s.ldp;
  const int64_t tiles_len = backward ? 3 * s.tile_len : s.tile_len;
  const int64_t staging_len = static_cast<int64_t>(kKC) * s.ldp;
  s.scratch = s.tiles + (tiles_len > staging_len ? tiles_len : staging_len);
  s.one = s.scratch + kThreads * 16;
  s.total = s.one + 1;
  return s;
}

template <typename acc_t>
__device__ __forceinline__ acc_t* shared_base() {
  extern __shared__ __align__(16) unsigned char gam_smem_raw[];
  return reinterpret_cast<acc_t*>(gam_smem_raw);
}

// Tile `tile` of the pixels: sample n, pixels p0 .. p0 + np - 1.
struct PixelTile {
  int64_t n, p0;
  int np;
};

template <typename acc_t>
__device__ __forceinline__ PixelTile pixel_tile(const GamArgs<acc_t>& a, int64_t tile) {
  const int64_t n = tile / a.tiles_per_sample;
  const int64_t p0 = (tile - n * a.tiles_per_sample) * a.TP;
  return {n, p0, static_cast<int>(min(static_cast<int64_t>(a.TP), a.HW - p0))};
}

// hs = relu(W1 x + b1) for the tile's pixels, reducing over C kKC channels at a time.
// Starts with no pending reads of hs or the tile region; ends synchronised.
template <typename acc_t>
__device__ void compute_hidden(const GamArgs<acc_t>& a, const GamSmem& L, const PixelTile& t) {
  acc_t* smem = shared_base<acc_t>();
  acc_t* hs = smem + L.hs;
  acc_t* xs = smem + L.tiles;
  acc_t* scratch = smem + L.scratch;
  const int ldp = L.ldp;
  for (int e = threadIdx.x; e < a.rd * ldp; e += kThreads) hs[e] = acc_t(0);
  for (int c0 = 0; c0 < a.C; c0 += kKC) {
    const int kc = min(kKC, a.C - c0);
    __syncthreads();  // hs zeroed; the previous chunk's products have read xs
    for_each_in_tile(kc, t.np, a.channels_inner,
                     [&](int c, int p) { xs[c * ldp + p] = a.x.template load<acc_t>(t.n, c0 + c, t.p0 + p); });
    __syncthreads();
    block_gemm<acc_t>(a.rd, t.np, kc, {a.w1t + static_cast<int64_t>(c0) * a.rd, a.rd, 1}, {xs, ldp, 1}, scratch,
                      [&](int r, int p, acc_t v) { hs[r * ldp + p] += v; });
  }
  __syncthreads();
  for (int e = threadIdx.x; e < a.rd * t.np; e += kThreads) {
    const int r = e / t.np, p = e - r * t.np;
    hs[r * ldp + p] = relu(hs[r * ldp + p] + a.b1[r]);
  }
  __syncthreads();
}

// The pre-activations of fc2 for channels c0 .. c0 + rc - 1: dst[c][p] = W2 h + b2.
template <typename acc_t>
__device__ __forceinline__ void compute_fc2(const GamArgs<acc_t>& a, const GamSmem& L, const PixelTile& t, int c0,
                                            int rc, acc_t* dst) {
  acc_t* smem = shared_base<acc_t>();
  const int ldp = L.ldp;
  const acc_t* b2 = a.b2 + c0;
  block_gemm<acc_t>(rc, t.np, a.rd, {a.w2t + c0, a.C, 1}, {smem + L.hs, ldp, 1}, smem + L.scratch,
                    [&](int c, int p, acc_t v) { dst[c * ldp + p] = v + b2[c]; });
}

// x1 = x * sigmoid(fc2(relu(fc1(x)))), one pixel tile per block iteration.
template <typename acc_t>
__global__ void __launch_bounds__(kThreads) gam_channel_kernel(GamArgs<acc_t> a) {
  acc_t* smem = shared_base<acc_t>();
  const GamSmem L = gam_smem(a.rd, a.TP, a.R, /*backward=*/false);
  acc_t* pre = smem + L.tiles;
  for (int64_t tile = blockIdx.x; tile < a.tiles; tile += gridDim.x) {  // uniform per block
    const PixelTile t = pixel_tile(a, tile);
    compute_hidden(a, L, t);
    for (int c0 = 0; c0 < a.C; c0 += a.R) {
      const int rc = min(a.R, a.C - c0);
      compute_fc2(a, L, t, c0, rc, pre);
      __syncthreads();
      for_each_in_tile(rc, t.np, a.channels_inner, [&](int c, int p) {
        const acc_t m = sigmoid(pre[c * L.ldp + p]);
        a.out.store(t.n, c0 + c, t.p0 + p, a.x.template load<acc_t>(t.n, c0 + c, t.p0 + p) * m);
      });
      __syncthreads();  // pre (and the staging it aliases) is rewritten next
    }
  }
}

// grad_x for every pixel tile, and the block's slot of weight-gradient partial sums (zeroed by
// the host, accumulated tile after tile).
template <typename acc_t>
__global__ void __launch_bounds__(kThreads) gam_channel_backward_kernel(GamArgs<acc_t> a) {
  acc_t* smem = shared_base<acc_t>();
  const GamSmem L = gam_smem(a.rd, a.TP, a.R, /*backward=*/true);
  const int ldp = L.ldp, rd = a.rd, C = a.C;
  acc_t* hs = smem + L.hs;
  acc_t* dhs = smem + L.dhs;
  acc_t* t0 = smem + L.tiles;  // fc2's pre-activation, then g (pass A) / pre (pass B)
  acc_t* t1 = t0 + L.tile_len; // pass B: W1^T dh
  acc_t* t2 = t1 + L.tile_len; // pass B: x
  acc_t* scratch = smem + L.scratch;
  const Operand<acc_t> ones{smem + L.one, 0, 0};
  if (threadIdx.x == 0) smem[L.one] = acc_t(1);
  __syncthreads();

  acc_t* slot = a.slots + static_cast<int64_t>(blockIdx.x) * a.slot_len;
  acc_t* slot_w1 = slot;                                      // (rd, C)
  acc_t* slot_b1 = slot_w1 + static_cast<int64_t>(rd) * C;    // rd
  acc_t* slot_w2 = slot_b1 + rd;                              // (C, rd)
  acc_t* slot_b2 = slot_w2 + static_cast<int64_t>(C) * rd;    // C

  for (int64_t tile = blockIdx.x; tile < a.tiles; tile += gridDim.x) {  // uniform per block
    const PixelTile t = pixel_tile(a, tile);
    compute_hidden(a, L, t);
    for (int e = threadIdx.x; e < rd * ldp; e += kThreads) dhs[e] = acc_t(0);
    // (the first pass-A chunk synchronises before anything reads dhs)

    // Pass A: g, dh, grad_w2, grad_b2.
    for (int c0 = 0; c0 < C; c0 += a.R) {
      const int rc = min(a.R, C - c0);
      compute_fc2(a, L, t, c0, rc, t0);
      __syncthreads();
      for_each_in_tile(rc, t.np, a.channels_inner, [&](int c, int p) {
        const acc_t m = sigmoid(t0[c * ldp + p]);
        const acc_t x = a.x.template load<acc_t>(t.n, c0 + c, t.p0 + p);
        const acc_t go = a.grad_x1.template load<acc_t>(t.n, c0 + c, t.p0 + p);
        t0[c * ldp + p] = go * x * m * (acc_t(1) - m);
      });
      __syncthreads();
      // dh[r][p] += sum_c W2[c][r] g[c][p]
      block_gemm<acc_t>(rd, t.np, rc, {a.w2 + static_cast<int64_t>(c0) * rd, rd, 1}, {t0, ldp, 1}, scratch,
                        [&](int r, int p, acc_t v) { dhs[r * ldp + p] += v; });
      // grad_w2[c][r] += sum_p g[c][p] h[r][p]
      block_gemm<acc_t>(rc, rd, t.np, {t0, 1, ldp}, {hs, 1, ldp}, scratch,
                        [&](int c, int r, acc_t v) { slot_w2[static_cast<int64_t>(c0 + c) * rd + r] += v; });
      // grad_b2[c] += sum_p g[c][p]
      block_gemm<acc_t>(rc, 1, t.np, {t0, 1, ldp}, ones, scratch,
                        [&](int c, int, acc_t v) { slot_b2[c0 + c] += v; });
      __syncthreads();
    }

    // Through fc1's ReLU: dh = relu_grad(dh, h) (h = relu(t) is <= 0 exactly where t is).
    for (int e = threadIdx.x; e < rd * t.np; e += kThreads) {
      const int r = e / t.np, p = e - r * t.np;
      dhs[r * ldp + p] = relu_grad(dhs[r * ldp + p], hs[r * ldp + p]);
    }
    __syncthreads();
    block_gemm<acc_t>(rd, 1, t.np, {dhs, 1, ldp}, ones, scratch, [&](int r, int, acc_t v) { slot_b1[r] += v; });

    // Pass B: grad_x and grad_w1.
    for (int c0 = 0; c0 < C; c0 += a.R) {
      const int rc = min(a.R, C - c0);
      compute_fc2(a, L, t, c0, rc, t0);
      // t1[c][p] = sum_r W1[r][c] dh[r][p]
      block_gemm<acc_t>(rc, t.np, rd, {a.w1 + c0, C, 1}, {dhs, ldp, 1}, scratch,
                        [&](int c, int p, acc_t v) { t1[c * ldp + p] = v; });
      __syncthreads();
      for_each_in_tile(rc, t.np, a.channels_inner, [&](int c, int p) {
        const acc_t m = sigmoid(t0[c * ldp + p]);
        const acc_t go = a.grad_x1.template load<acc_t>(t.n, c0 + c, t.p0 + p);
        a.out.store(t.n, c0 + c, t.p0 + p, go * m + t1[c * ldp + p]);
        t2[c * ldp + p] = a.x.template load<acc_t>(t.n, c0 + c, t.p0 + p);
      });
      __syncthreads();
      // grad_w1[r][c] += sum_p dh[r][p] x[c][p]
      block_gemm<acc_t>(rd, rc, t.np, {dhs, 1, ldp}, {t2, 1, ldp}, scratch,
                        [&](int r, int c, acc_t v) { slot_w1[static_cast<int64_t>(r) * C + c0 + c] += v; });
      __syncthreads();
    }
  }
}

// total[j] = sum over slots s = 0, 1, ... of slots[s][j], in slot order.
template <typename acc_t>
__global__ void __launch_bounds__(kThreads)
    sum_slots_kernel(const acc_t* __restrict__ slots, int64_t num_slots, int64_t len, acc_t* __restrict__ total) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t j = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; j < len; j += stride) {
    acc_t v = acc_t(0);
    for (int64_t s = 0; s < num_slots; ++s) v += slots[s * len + j];
    total[j] = v;
  }
}

// ---------------------------------------------------------------------------------------------
// Host side.
// ---------------------------------------------------------------------------------------------

bool is_feature_dtype(at::ScalarType t) {
  return t == at::kDouble || t == at::kFloat || t == at::kHalf || t == at::kBFloat16;
}

void check_gam_cuda(const at::Tensor& x, const at::Tensor& w1, const at::Tensor& b1, const at::Tensor& w2,
                    const at::Tensor& b2, const char* op) {
  check_gam_channel_args(x, w1, b1, w2, b2, op);
  AK_CHECK_VALUE(x.is_cuda(), op, ": x must be a CUDA tensor, got ", x.device());
  AK_CHECK_TYPE(is_feature_dtype(x.scalar_type()), op, ": x must be float64, float32, float16 or bfloat16, got ",
                   x.scalar_type());
}

// The weights in acc, contiguous, in both orientations.
struct GamWeights {
  at::Tensor w1, w1t, b1, w2, w2t, b2;
  GamWeights(const at::Tensor& w1_, const at::Tensor& b1_, const at::Tensor& w2_, const at::Tensor& b2_,
             at::ScalarType acc)
      : w1(w1_.to(acc).contiguous()),
        w1t(w1.t().contiguous()),
        b1(b1_.reshape(-1).to(acc).contiguous()),
        w2(w2_.to(acc).contiguous()),
        w2t(w2.t().contiguous()),
        b2(b2_.reshape(-1).to(acc).contiguous()) {}
};

// Tile shape and the launch's shared memory for this rd (see the file comment).
template <typename acc_t>
GamArgs<acc_t> make_gam_args(const at::Tensor& x, const GamWeights& w, bool backward, size_t* smem_bytes,
                             const char* op) {
  GamArgs<acc_t> a{};
  a.x = feature_map(x);
  a.w1 = w.w1.data_ptr<acc_t>();
  a.w1t = w.w1t.data_ptr<acc_t>();
  a.b1 = w.b1.data_ptr<acc_t>();
  a.w2 = w.w2.data_ptr<acc_t>();
  a.w2t = w.w2t.data_ptr<acc_t>();
  a.b2 = w.b2.data_ptr<acc_t>();
  a.HW = x.size(2) * x.size(3);
  a.C = static_cast<int>(x.size(1));
  a.rd = static_cast<int>(w.w1.size(0));
  constexpr int64_t area = kTileArea<acc_t>;
  const int64_t R = std::min<int64_t>(area, std::max<int64_t>(16, next_pow2(a.rd)));
  // Pixels per tile: the area over R, but no wider than an image (H*W = 1 takes one pixel).
  a.TP = static_cast<int>(std::min<int64_t>(area / R, next_pow2(a.HW)));
  a.R = static_cast<int>(R);
  a.tiles_per_sample = ceil_div(a.HW, a.TP);
  a.tiles = x.size(0) * a.tiles_per_sample;
  a.channels_inner = layout_of(x) == Layout::ChannelsLast;
  const GamSmem L = gam_smem(a.rd, a.TP, a.R, backward);
  *smem_bytes = static_cast<size_t>(L.total) * sizeof(acc_t);
  const size_t limit = at::cuda::getCurrentDeviceProperties()->sharedMemPerBlockOptin;
  AK_CHECK_VALUE(*smem_bytes <= limit, op, ": rd = ", a.rd, " needs ", *smem_bytes,
                    " bytes of shared memory per block on CUDA, more than the device's ", limit);
  return a;
}

template <typename Kernel>
void allow_shared_memory(Kernel kernel, size_t bytes) {
  if (bytes > 48 * 1024) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes)));
  }
}

template <typename acc_t>
void launch_gam_channel(const at::Tensor& x, const GamWeights& w, const at::Tensor& x1) {
  size_t smem = 0;
  GamArgs<acc_t> a = make_gam_args<acc_t>(x, w, /*backward=*/false, &smem, "gam_channel");
  a.out = feature_map(x1);
  auto kernel = gam_channel_kernel<acc_t>;
  allow_shared_memory(kernel, smem);
  const int64_t blocks = std::min(a.tiles, kMaxGrid);
  kernel<<<blocks, kThreads, smem, at::cuda::getCurrentCUDAStream()>>>(a);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Returns the weight gradients' sums in acc: [grad_w1 (rd*C) | grad_b1 (rd) | grad_w2 (C*rd) | grad_b2 (C)].
template <typename acc_t>
at::Tensor launch_gam_channel_backward(const at::Tensor& x, const at::Tensor& grad_x1, const GamWeights& w,
                                       const at::Tensor& grad_x) {
  size_t smem = 0;
  GamArgs<acc_t> a = make_gam_args<acc_t>(x, w, /*backward=*/true, &smem, "gam_channel_backward");
  a.grad_x1 = feature_map(grad_x1);
  a.out = feature_map(grad_x);
  a.slot_len = 2 * static_cast<int64_t>(a.rd) * a.C + a.rd + a.C;
  auto kernel = gam_channel_backward_kernel<acc_t>;
  allow_shared_memory(kernel, smem);
  // One slot per block: as many blocks as fit on the GPU at once, fewer when the slots
  // (C*rd values each) would take more than 256 MiB.
  int per_sm = 0;
  C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kThreads, smem));
  const int64_t slot_bytes = a.slot_len * static_cast<int64_t>(sizeof(acc_t));
  const int64_t max_slots = std::max<int64_t>(1, (int64_t{256} << 20) / slot_bytes);
  const int64_t blocks = std::min({a.tiles, std::max<int64_t>(1, per_sm) * sm_count(), max_slots});
  at::Tensor slots = at::zeros({blocks, a.slot_len}, x.options().dtype(c10::CppTypeToScalarType<acc_t>::value));
  a.slots = slots.data_ptr<acc_t>();
  auto stream = at::cuda::getCurrentCUDAStream();
  kernel<<<blocks, kThreads, smem, stream>>>(a);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  at::Tensor total = at::empty({a.slot_len}, slots.options());
  const int64_t blocks2 = std::min(ceil_div(a.slot_len, kThreads), kMaxGrid);
  sum_slots_kernel<acc_t><<<blocks2, kThreads, 0, stream>>>(a.slots, blocks, a.slot_len, total.data_ptr<acc_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return total;
}

at::Tensor gam_channel_cuda(const at::Tensor& x_in, const at::Tensor& w1, const at::Tensor& b1,
                            const at::Tensor& w2, const at::Tensor& b2) {
  constexpr const char* op = "gam_channel";
  check_gam_cuda(x_in, w1, b1, w2, b2, op);
  c10::cuda::CUDAGuard device_guard(x_in.device());
  const at::Tensor x = dense(x_in);
  at::Tensor x1 = empty_like_layout(x);
  if (x.numel() == 0) {
    return x1;
  }
  const at::ScalarType acc = acc_type(x.scalar_type());
  const GamWeights w(w1, b1, w2, b2, acc);
  if (acc == at::kDouble) {
    launch_gam_channel<double>(x, w, x1);
  } else {
    launch_gam_channel<float>(x, w, x1);
  }
  return x1;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> gam_channel_backward_cuda(
    const at::Tensor& grad_x1_in, const at::Tensor& x_in, const at::Tensor& w1, const at::Tensor& b1,
    const at::Tensor& w2, const at::Tensor& b2) {
  constexpr const char* op = "gam_channel_backward";
  check_gam_cuda(x_in, w1, b1, w2, b2, op);
  cuda::check_like_x(grad_x1_in, x_in, op, "grad_x1");
  c10::cuda::CUDAGuard device_guard(x_in.device());
  const at::Tensor x = dense(x_in);
  const at::Tensor grad_x1 = dense(grad_x1_in);  // read through its own strides: any dense layout
  at::Tensor grad_x = empty_like_layout(x);
  const int64_t C = x.size(1), rd = w1.size(0);
  // The weight gradients in each weight's shape and dtype, from [gw1 | gb1 | gw2 | gb2] in acc.
  auto split = [&](const at::Tensor& total) {
    auto part = [&](int64_t offset, const at::Tensor& like) {
      // copy=true: five separate tensors, none a view of `total`
      return total.narrow(0, offset, like.numel()).view(like.sizes()).to(like.scalar_type(), false, true);
    };
    return std::make_tuple(grad_x, part(0, w1), part(rd * C, b1), part(rd * C + rd, w2), part(2 * rd * C + rd, b2));
  };
  const at::ScalarType acc = acc_type(x.scalar_type());
  if (x.numel() == 0) {
    return split(at::zeros({2 * rd * C + rd + C}, x.options().dtype(acc)));  // empty sums
  }
  const GamWeights w(w1, b1, w2, b2, acc);
  at::Tensor total = acc == at::kDouble ? launch_gam_channel_backward<double>(x, grad_x1, w, grad_x)
                                        : launch_gam_channel_backward<float>(x, grad_x1, w, grad_x);
  return split(total);
}

}  // namespace
}  // namespace attnkernels

TORCH_LIBRARY_IMPL(attnkernels, CUDA, m) {
  m.impl("gam_channel", &attnkernels::gam_channel_cuda);
  m.impl("gam_channel_backward", &attnkernels::gam_channel_backward_cuda);
}
