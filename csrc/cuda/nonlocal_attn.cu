// nonlocal_attn hot path, CUDA: PAM's HW x HW softmax attention, flash-style, and its backward.
// The math of both ops is in the header comment of csrc/nonlocal_attn_ops.cpp.
//
// Every kernel here is one "attention walk". A block owns a block of pixels (the own side) and
// one chunk of output channels e, loops over every block of the other side, recomputes the tile
// X = own1^T other1 of S (or S^T) in registers, turns it into Z, and accumulates
// acc[own][e] += sum_other Z[own][other] * T[e][other]:
//
//   kernel    own  other  X          Y = own2^T other2 (all D_v)   Z                        T
//   forward   i    j      S = q^T k  -                             P (online softmax)       v
//   grad_v    j    i      S^T        -                             P^T = exp(S^T - lse_i)   grad_y
//   grad_q    i    j      S          grad_y^T v = dP / gamma       dS / gamma = P (Y - R_i) k
//   grad_k    j    i      S^T        v^T grad_y = dP^T / gamma     (dS / gamma)^T           q
//
// Every backward acc is scaled by gamma once, in the epilogue: Z carries no gamma. The tensor-core
// walk rounds Z to fp16/bf16 for its mma, and PAM's gamma starts at 0, so gamma * P (Y - R) would
// fall into the subnormals early in training (dS / gamma keeps its full precision).
//
// R[n,i] = sum_c grad_y*out comes from a small row-dot kernel first, which also writes per-block
// partial sums of grad_gamma; a one-block kernel adds them in a fixed order. No tile of S leaves
// the registers (nothing HW x HW is stored, forward or backward), and there are no atomics: every
// sum has a fixed order, so results are bitwise deterministic run to run.
//
// D_v tiling: the forward and grad_v grid over (own block, chunk of kAcc output channels, n); each
// chunk recomputes S and runs its own online softmax (bitwise the same in every chunk, so chunk 0
// alone writes lse). A first pass writing lse would not save that recompute (P is needed per
// chunk either way) and would cost one more pass over S; it would only spare the rescaling of acc,
// which is cheap. grad_q and grad_k need dP over all of D_v for each tile of S, so they loop D_v in
// chunks of kDvChunk inside the other-block loop, accumulating Y in registers.
//
// Two implementations of the walk:
//   * tensor cores (float16/bfloat16 on sm_80+, D_qk <= 256): 8 warps, 128 own pixels per block
//     (16 per warp, whole rows, so softmax statistics stay within a quad of lanes), 64 other pixels
//     per step. Tiles go global -> shared by cp.async (16-byte chunks; a scalar path zero-fills
//     partial tiles and serves unaligned or strided tensors), double buffered: the loads of step
//     t+1 fly while step t computes. Fragments come from ldmatrix (.trans where the tile's inner
//     axis is the mma's M/N axis), products from mma.sync m16n8k16 with fp32 accumulators; P and
//     dS go from accumulator to A-operand registers directly. Tiles are kept in the tensors' own
//     orientation ([pixel][channel] for channels_last, [channel][pixel] for NCHW), which is one
//     template flag.
//   * SIMT (float32, float64, and the float16/bfloat16 fallback): exact fp32/fp64 energies (no
//     TF32), 256 threads, 64 own x 32 other pixels, register micro-tiles, shared-memory staging.
//
// Any H*W (partial tiles are zero-filled and masked), any D_qk >= 1 and D_v >= 0, any N; offsets
// are int64. NaN propagates as torch.softmax: running maxima use a NaN-propagating max and masked
// entries are selected, never multiplied away.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <tuple>
#include <type_traits>

#include "attnkernels/nonlocal_attn.h"
#include "attnkernels/cuda_utils.cuh"

namespace attnkernels {
namespace {

using cuda::acc_exp;
using cuda::block_reduce;
using cuda::check_cuda;
using cuda::group_allreduce;
using cuda::kMaxGrid;
using cuda::kWarpSize;
using cuda::load_vec;
using cuda::nan_max;
using cuda::store_vec;
using cuda::Vec;
using cuda::warp_allreduce;

constexpr int kThreads = 256;  // threads per block in every kernel here

// Tensor-core walk.
constexpr int kBM = 128;       // own pixels per block: 8 warps x 16 rows
constexpr int kBN = 64;        // other pixels per step
constexpr int kDvChunk = 64;   // grad_q / grad_k: channels of grad_y and v per step of the dP loop
constexpr int kMaxDqk = 256;   // larger D_qk takes the SIMT walk (the tiles would not fit)

// SIMT walk.
constexpr int kSBM = 64;  // own pixels per block: 16 thread rows x 4
constexpr int kSBN = 32;  // other pixels per step: 16 thread columns x 2
constexpr int kSKC = 16;  // channels per step of the X and Y products
constexpr int kSE = 64;   // output channels per block: 16 thread columns x 4

enum class Mode { kForward, kGradV, kGradQ, kGradK };

__host__ __device__ constexpr int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }
__host__ __device__ constexpr int64_t max64(int64_t a, int64_t b) { return a > b ? a : b; }

// How a kernel reads an (N, D, H, W) tensor: element (n, d, p), p = h*W + w, sits at
// ptr[n*sn + d*sd + p*sp].
template <typename T>
struct Src {
  const T* ptr;
  int64_t sn, sd, sp;
  int64_t D;       // channels
  bool vec;        // 16-byte chunks along the inner axis of the walk's tiles are aligned (sd or sp == 1)
  bool pix_inner;  // SIMT loads: consecutive threads take consecutive pixels (else channels)
};

template <typename T>
struct Dst {
  T* ptr;
  int64_t sn, sd, sp;
  bool vec;
};

// Everything one walk reads and writes. acc_t is at::opmath_type<T>.
template <typename T, typename acc_t>
struct WalkArgs {
  Src<T> own1, other1;  // X = own1^T other1 over the D_qk channels
  Src<T> own2, other2;  // forward, grad_v: other2 is T (v, grad_y); grad_q, grad_k: Y = own2^T other2
  Src<T> x;             // forward: y = gamma * out + x
  Dst<T> out;           // forward: out; backward: the gradient
  Dst<T> y;             // forward only
  bool out_cl;          // out (and y) are channels_last: epilogues write along channels
  int64_t N, HW;
  int64_t D_qk, D_v;
  int dqp;              // tensor cores: D_qk rounded up to 16, the channels of the own1/other1 tiles
  int64_t E;            // output channels: D_v (forward, grad_v) or D_qk (grad_q, grad_k)
  const acc_t* gamma;   // one value, in acc
  const acc_t* lse;     // backward: (N, HW)
  const acc_t* R;       // grad_q, grad_k: (N, HW)
  acc_t* lse_out;       // forward: (N, HW)
};

template <Mode kMode>
constexpr bool kOwnQueries = kMode == Mode::kForward || kMode == Mode::kGradQ;  // stats per own row
template <Mode kMode>
constexpr bool kHasY = kMode == Mode::kGradQ || kMode == Mode::kGradK;          // dP loop over D_v

__device__ __forceinline__ float acc_log(float v) { return logf(v); }
__device__ __forceinline__ double acc_log(double v) { return log(v); }

// The backward's shift of P = exp(S - lse): NaN for an lse of +inf (an energy of +inf), as
// torch.softmax's row is NaN there (its sum is inf - inf), not exp(S - inf) = 0.
template <typename acc_t>
__device__ __forceinline__ acc_t p_shift(acc_t lse) {
  return lse == std::numeric_limits<acc_t>::infinity() ? std::numeric_limits<acc_t>::quiet_NaN() : lse;
}

// ---------------------------------------------------------------------------------------------
// Epilogue shared by both walks: a staged (pixels x channels) tile of acc values -> out (and, in the
// forward, y = gamma * out + x, in acc from the unrounded out: out and y are each rounded once).
// Threads run along out's inner axis in chunks of V elements (V = 8: one 16-byte access of T where
// aligned and whole; the staging's inner axis must then be contiguous and 32-byte aligned).
// ---------------------------------------------------------------------------------------------
template <int V, bool kY, typename T, typename acc_t>
__device__ __forceinline__ void write_tile(const WalkArgs<T, acc_t>& a, const acc_t* st, int st_pix, int st_e,
                                           int npix, int ne, int64_t n, int64_t o0, int64_t e0, acc_t gamma) {
  const bool cl = a.out_cl;
  const int inner = cl ? ne : npix;
  const int outer = cl ? npix : ne;
  const int row_chunks = inner / V;
  for (int ci = threadIdx.x; ci < outer * row_chunks; ci += kThreads) {
    const int o = ci / row_chunks;
    const int in0 = (ci - o * row_chunks) * V;
    const int pl = cl ? o : in0;
    const int el = cl ? in0 : o;
    const int64_t pix = o0 + pl;
    const int64_t e = e0 + el;
    if (pix >= a.HW || e >= a.E) {
      continue;
    }
    const int64_t left = cl ? a.E - e : a.HW - pix;  // valid elements from this one on
    const bool whole = V > 1 && left >= V;
    acc_t v[V];
    if constexpr (V > 1) {
      static_assert(V % 4 == 0, "the staging is read 4 values (16 bytes) at a time");
#pragma unroll
      for (int k = 0; k < V; k += 4) {
        const Vec<acc_t, 4> s = load_vec<4>(st + pl * st_pix + el * st_e + k);
#pragma unroll
        for (int u = 0; u < 4; ++u) v[k + u] = s.val[u];
      }
    } else {
      v[0] = st[pl * st_pix + el * st_e];
    }
    const int64_t out_off = n * a.out.sn + e * a.out.sd + pix * a.out.sp;
    const int64_t out_step = cl ? a.out.sd : a.out.sp;
    if (whole && a.out.vec) {
      Vec<T, V> s;
#pragma unroll
      for (int k = 0; k < V; ++k) s.val[k] = static_cast<T>(v[k]);
      store_vec<V>(a.out.ptr + out_off, s);
    } else {
#pragma unroll
      for (int k = 0; k < V; ++k) {
        if (k < left) a.out.ptr[out_off + k * out_step] = static_cast<T>(v[k]);
      }
    }
    if constexpr (kY) {
      const int64_t x_off = n * a.x.sn + e * a.x.sd + pix * a.x.sp;
      const int64_t x_step = cl ? a.x.sd : a.x.sp;
      T xv[V];
      if (whole && a.x.vec) {
        const Vec<T, V> s = load_vec<V>(a.x.ptr + x_off);
#pragma unroll
        for (int k = 0; k < V; ++k) xv[k] = s.val[k];
      } else {
#pragma unroll
        for (int k = 0; k < V; ++k) xv[k] = k < left ? a.x.ptr[x_off + k * x_step] : T(0.f);
      }
      T yv[V];
#pragma unroll
      for (int k = 0; k < V; ++k) {
        yv[k] = static_cast<T>(gamma * v[k] + static_cast<acc_t>(xv[k]));
      }
      const int64_t y_off = n * a.y.sn + e * a.y.sd + pix * a.y.sp;
      const int64_t y_step = cl ? a.y.sd : a.y.sp;
      if (whole && a.y.vec) {
        Vec<T, V> s;
#pragma unroll
        for (int k = 0; k < V; ++k) s.val[k] = yv[k];
        store_vec<V>(a.y.ptr + y_off, s);
      } else {
#pragma unroll
        for (int k = 0; k < V; ++k) {
          if (k < left) a.y.ptr[y_off + k * y_step] = yv[k];
        }
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Tensor-core walk (sm_80+).
// ---------------------------------------------------------------------------------------------

// Shared-memory tiles keep the tensor's orientation: kCL: tile[pixel][channel], else
// tile[channel][pixel]; rows padded by 8 elements (16 bytes), so the 8 row addresses of every
// ldmatrix fall in distinct 16-byte bank groups and rows stay 16-byte aligned.
template <bool kCL>
__host__ __device__ constexpr int tile_pitch(int npix, int nch) {
  return kCL ? nch + 8 : npix + 8;
}
template <bool kCL>
__host__ __device__ constexpr int tile_elems(int npix, int nch) {
  return kCL ? npix * (nch + 8) : nch * (npix + 8);
}

// Where each tile lives in dynamic shared memory (offsets in 2-byte elements; every size is a
// multiple of 64 elements, so every tile starts 16-byte aligned). The epilogue's staging (fp32,
// rows padded to a multiple of 8 floats: 32-byte aligned chunks) overlays it all.
template <bool kCL>
struct TcSmem {
  int own1, other1, other1_size, other2, other2_size, own2, own2_size, stats, elems;

  __host__ __device__ TcSmem(int dqp, int acc_cols, bool has_y, bool other_stats) {
    const int c2 = has_y ? kDvChunk : acc_cols;  // channels of an other2 tile
    own1 = 0;
    other1 = own1 + tile_elems<kCL>(kBM, dqp);
    other1_size = tile_elems<kCL>(kBN, dqp);
    other2 = other1 + 2 * other1_size;
    other2_size = tile_elems<kCL>(kBN, c2);
    own2 = other2 + 2 * other2_size;
    own2_size = has_y ? tile_elems<kCL>(kBM, kDvChunk) : 0;
    stats = own2 + 2 * own2_size;  // 2 slots x (lse * log2(e), R) x kBN floats
    const int main = stats + (other_stats ? 2 * 2 * kBN * 2 : 0);  // in 2-byte elements
    const int staging_cl = kBM * (acc_cols + 8);                    // floats, [pixel][channel]
    const int staging_nchw = acc_cols * (kBM + 8);                  // floats, [channel][pixel]
    const int staging = 2 * (staging_cl > staging_nchw ? staging_cl : staging_nchw);
    elems = main > staging ? main : staging;
  }
  __host__ __device__ size_t bytes() const { return static_cast<size_t>(elems) * 2; }
};

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
#define ATTNKERNELS_NL_TC 1
#endif

template <typename T>
constexpr bool kIsBF16 = std::is_same<T, c10::BFloat16>::value;

[[maybe_unused]] __device__ __forceinline__ void cp_async16(void* smem, const void* gmem) {
#ifdef ATTNKERNELS_NL_TC
  const auto s = static_cast<uint32_t>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(s), "l"(gmem) : "memory");
#endif
}

[[maybe_unused]] __device__ __forceinline__ void cp_async_commit() {
#ifdef ATTNKERNELS_NL_TC
  asm volatile("cp.async.commit_group;\n" ::: "memory");
#endif
}

[[maybe_unused]] __device__ __forceinline__ void cp_async_wait_all() {
#ifdef ATTNKERNELS_NL_TC
  asm volatile("cp.async.wait_group 0;\n" ::: "memory");
#endif
}

// 2^x in one MUFU op (flushing denormal results to 0, which no softmax weight notices); exp2f
// would add range fix-ups around it in the hot loop.
[[maybe_unused]] __device__ __forceinline__ float exp2_ftz(float v) {
  float r;
  asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(r) : "f"(v));
  return r;
}

// Four 8x8 b16 matrices; lane l gives the address of row l % 8 of matrix l / 8.
template <bool kTrans>
__device__ __forceinline__ void ldsm_x4(uint32_t (&r)[4], const void* p) {
#ifdef ATTNKERNELS_NL_TC
  const auto s = static_cast<uint32_t>(__cvta_generic_to_shared(p));
  if constexpr (kTrans) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(s)
                 : "memory");
  } else {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(s)
                 : "memory");
  }
#endif
}

// The 16x16 block at (row0, col0) of a tile with pitch `pitch`, as four 8x8 matrices.
// kRowsFirst: matrices (rows 0-7, cols 0-7), (8-15, 0-7), (0-7, 8-15), (8-15, 8-15);
// else (0-7, 0-7), (0-7, 8-15), (8-15, 0-7), (8-15, 8-15).
template <bool kTrans, bool kRowsFirst, typename T>
__device__ __forceinline__ void ldsm_block(uint32_t (&r)[4], const T* tile, int pitch, int row0, int col0,
                                           int lane) {
  const int dr = kRowsFirst ? (lane & 7) + ((lane >> 3) & 1) * 8 : (lane & 7) + (lane >> 4) * 8;
  const int dc = kRowsFirst ? (lane >> 4) * 8 : ((lane >> 3) & 1) * 8;
  ldsm_x4<kTrans>(r, tile + (row0 + dr) * pitch + col0 + dc);
}

// mma.m16n8k16 operands from a tile, three ways (r[0..3] is the A fragment; or r[0], r[1] the B
// fragment of pixels/channels 0-7 and r[2], r[3] that of 8-15 of the 16 along N):
// A with M = pixels pix0.., K = channels ch0..   (own1, own2 in X and Y)
template <bool kCL, typename T>
__device__ __forceinline__ void frag_a_pix_m(uint32_t (&r)[4], const T* tile, int pitch, int pix0, int ch0,
                                             int lane) {
  if constexpr (kCL) {
    ldsm_block<false, true>(r, tile, pitch, pix0, ch0, lane);
  } else {
    ldsm_block<true, false>(r, tile, pitch, ch0, pix0, lane);
  }
}
// B with K = channels ch0.., N = pixels pix0..   (other1, other2 in X and Y)
template <bool kCL, typename T>
__device__ __forceinline__ void frag_b_pix_n(uint32_t (&r)[4], const T* tile, int pitch, int pix0, int ch0,
                                             int lane) {
  if constexpr (kCL) {
    ldsm_block<false, false>(r, tile, pitch, pix0, ch0, lane);
  } else {
    ldsm_block<true, true>(r, tile, pitch, ch0, pix0, lane);
  }
}
// B with K = pixels pix0.., N = channels ch0..   (T in acc += Z T^T)
template <bool kCL, typename T>
__device__ __forceinline__ void frag_b_ch_n(uint32_t (&r)[4], const T* tile, int pitch, int pix0, int ch0,
                                            int lane) {
  if constexpr (kCL) {
    ldsm_block<true, true>(r, tile, pitch, pix0, ch0, lane);
  } else {
    ldsm_block<false, false>(r, tile, pitch, ch0, pix0, lane);
  }
}

// c += a * b; a 16x16 (row), b 16x8 (col), fp32 accumulators.
template <typename T>
__device__ __forceinline__ void mma16816(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
#ifdef ATTNKERNELS_NL_TC
  if constexpr (kIsBF16<T>) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  } else {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
#endif
}

// Two floats as one b16x2 register (lo in the low half), rounded to nearest even.
template <typename T>
__device__ __forceinline__ uint32_t pack2(float lo, float hi) {
  uint32_t u;
  if constexpr (kIsBF16<T>) {
    const __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
    memcpy(&u, &h, sizeof(u));
  } else {
    const __half2 h = __floats2half2_rn(lo, hi);
    memcpy(&u, &h, sizeof(u));
  }
  return u;
}

// Pixels [p0, p0 + npix) x channels [d0, d0 + nch) of sample n into a tile (orientation kCL,
// nch and npix multiples of 8); zeros outside the tensor. Each thread moves 16-byte chunks along
// the tile's inner axis: cp.async when aligned and whole, else element by element.
template <bool kCL, typename T>
__device__ __forceinline__ void load_tile(T* tile, const Src<T>& s, int64_t n, int npix, int64_t p0, int64_t HW,
                                          int nch, int64_t d0) {
  const int inner = kCL ? nch : npix;
  const int outer = kCL ? npix : nch;
  const int row_chunks = inner / 8;
  const int pitch = inner + 8;
  const int64_t step = kCL ? s.sd : s.sp;  // along the inner axis
  const T* base = s.ptr + n * s.sn;
  for (int ci = threadIdx.x; ci < outer * row_chunks; ci += kThreads) {
    const int o = ci / row_chunks;
    const int in0 = (ci - o * row_chunks) * 8;
    T* dst = tile + o * pitch + in0;
    const int64_t p = p0 + (kCL ? o : in0);
    const int64_t d = d0 + (kCL ? in0 : o);
    const bool outer_ok = kCL ? p < HW : d < s.D;
    const int64_t left = kCL ? s.D - d : HW - p;
    if (!outer_ok || left <= 0) {
      *reinterpret_cast<uint4*>(dst) = make_uint4(0u, 0u, 0u, 0u);
      continue;
    }
    const T* src = base + d * s.sd + p * s.sp;
    if (s.vec && left >= 8) {
      cp_async16(dst, src);
    } else {
      Vec<T, 8> v;
#pragma unroll
      for (int k = 0; k < 8; ++k) v.val[k] = k < left ? src[k * step] : T(0.f);
      store_vec<8>(dst, v);
    }
  }
}

// One block: own pixels [o0, o0 + kBM) of sample n, output channels [e0, e0 + kAcc). Warp w owns
// rows 16w..16w+15; lane (g = lane/4, t4 = lane%4) holds rows g and g+8 of each accumulator
// fragment, columns 2*t4 and 2*t4+1 of each 8-wide n-tile. Pipeline per step t (other block b,
// D_v chunk c; grad_q/grad_k have ceil(D_v / kDvChunk) chunks per other block, the others one):
// wait for step t's tiles, barrier (also: every warp is done with step t-1's buffers), issue the
// loads of step t+1 into the other buffers, compute step t.
// Blocks per SM the register budget must allow. The NCHW forward with 128 accumulator columns fits
// two (128 registers, no spills under sm_80/sm_90 ptxas; its channels_last twin spills on sm_80);
// every other variant needs more than 128 registers a thread (accumulators + the S tile + dP) and
// runs one block of 8 warps per SM.
template <Mode kMode, bool kCL, int kAcc>
constexpr int kTcMinBlocks = kMode == Mode::kForward && !kCL && kAcc == 128 ? 2 : 1;

template <Mode kMode, bool kCL, int kAcc, typename T>
__global__ void __launch_bounds__(kThreads, (kTcMinBlocks<kMode, kCL, kAcc>))
    attn_tc_kernel(const WalkArgs<T, float> a) {
#ifdef ATTNKERNELS_NL_TC
  constexpr bool kQ = kOwnQueries<kMode>;
  constexpr bool kY = kHasY<kMode>;
  constexpr int kNT = kAcc / 8;  // 8-wide n-tiles of the accumulator
  constexpr float kLog2e = 1.4426950408889634f;
  extern __shared__ __align__(32) unsigned char smem_raw[];
  T* const smem = reinterpret_cast<T*>(smem_raw);
  const int dqp = a.dqp;
  const TcSmem<kCL> lay(dqp, kAcc, kY, !kQ);
  T* const own1 = smem + lay.own1;
  float* const stats = reinterpret_cast<float*>(smem + lay.stats);
  const int own1_pitch = tile_pitch<kCL>(kBM, dqp);
  const int other1_pitch = tile_pitch<kCL>(kBN, dqp);
  const int other2_pitch = tile_pitch<kCL>(kBN, kY ? kDvChunk : kAcc);
  const int own2_pitch = tile_pitch<kCL>(kBM, kDvChunk);

  const int tid = threadIdx.x;
  const int warp = tid / kWarpSize;
  const int lane = tid % kWarpSize;
  const int g = lane / 4;
  const int t4 = lane % 4;
  const int64_t HW = a.HW;
  const int64_t own_blocks = cdiv(HW, kBM);
  const int64_t e_chunks = max64(1, cdiv(a.E, kAcc));  // one even for E == 0: lse
  const int64_t nblk = cdiv(HW, kBN);
  const int nchunk = kY ? static_cast<int>(max64(1, cdiv(a.D_v, kDvChunk))) : 1;
  const int64_t steps = nblk * nchunk;
  const float gamma = *a.gamma;

  for (int64_t w = blockIdx.x; w < own_blocks * e_chunks * a.N; w += gridDim.x) {  // uniform per block
    const int64_t ob = w % own_blocks;
    const int64_t ec = (w / own_blocks) % e_chunks;
    const int64_t n = w / own_blocks / e_chunks;
    const int64_t o0 = ob * kBM;
    const int64_t e0 = ec * kAcc;

    load_tile<kCL>(own1, a.own1, n, kBM, o0, HW, dqp, 0);
    // grad_q: lse (in log2 units) and R of this lane's two own rows.
    float lse2_r[2] = {0.f, 0.f};
    float R_r[2] = {0.f, 0.f};
    if constexpr (kMode == Mode::kGradQ) {
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int64_t o = o0 + warp * 16 + g + h * 8;
        if (o < HW) {
          lse2_r[h] = p_shift(a.lse[n * HW + o]) * kLog2e;
          R_r[h] = a.R[n * HW + o];
        }
      }
    }

    auto issue = [&](int64_t t) {
      const int64_t b = t / nchunk;
      const int c = static_cast<int>(t - b * nchunk);
      if (c == 0) {
        load_tile<kCL>(smem + lay.other1 + (b & 1) * lay.other1_size, a.other1, n, kBN, b * kBN, HW, dqp, 0);
        if constexpr (!kQ) {
          // grad_v, grad_k: the other side is the queries; their lse (log2 units) and R.
          float* st = stats + (b & 1) * 2 * kBN;
          if (tid < kBN) {
            const int64_t i = b * kBN + tid;
            st[tid] = i < HW ? p_shift(a.lse[n * HW + i]) * kLog2e : 0.f;
            st[kBN + tid] = (kMode == Mode::kGradK && i < HW) ? a.R[n * HW + i] : 0.f;
          }
        }
      }
      if constexpr (kY) {
        load_tile<kCL>(smem + lay.own2 + (t & 1) * lay.own2_size, a.own2, n, kBM, o0, HW, kDvChunk,
                       static_cast<int64_t>(c) * kDvChunk);
        load_tile<kCL>(smem + lay.other2 + (t & 1) * lay.other2_size, a.other2, n, kBN, b * kBN, HW, kDvChunk,
                       static_cast<int64_t>(c) * kDvChunk);
      } else {
        load_tile<kCL>(smem + lay.other2 + (b & 1) * lay.other2_size, a.other2, n, kBN, b * kBN, HW, kAcc, e0);
      }
    };

    issue(0);
    cp_async_commit();

    float acc[kNT][4];
#pragma unroll
    for (int nt = 0; nt < kNT; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[nt][e] = 0.f;
    }
    float m_r[2] = {-INFINITY, -INFINITY};  // forward: running max of rows g, g+8 (natural units)
    float l_r[2] = {0.f, 0.f};              // forward: this lane's part of the running sums
    float X[8][4];                           // the 16 x 64 tile of S (or S^T), then Z
    float Y[8][4];                           // grad_q, grad_k: dP / gamma (or its transpose)

    // Columns of acc that hold channels < E, in pairs of n-tiles (uniform per block).
    const int64_t e_left = a.E - e0;
    const int ep_valid = e_left >= kAcc ? kNT / 2 : static_cast<int>(cdiv(max64(e_left, 0), 16));

    for (int64_t t = 0; t < steps; ++t) {
      const int64_t b = t / nchunk;
      const int c = static_cast<int>(t - b * nchunk);
      cp_async_wait_all();
      __syncthreads();
      if (t + 1 < steps) {
        issue(t + 1);
      }
      cp_async_commit();
      const T* o1 = smem + lay.other1 + (b & 1) * lay.other1_size;

      if (c == 0) {
#pragma unroll
        for (int nt = 0; nt < 8; ++nt) {
#pragma unroll
          for (int e = 0; e < 4; ++e) X[nt][e] = 0.f;
        }
#pragma unroll 2
        for (int ks = 0; ks < dqp / 16; ++ks) {
          uint32_t af[4];
          frag_a_pix_m<kCL>(af, own1, own1_pitch, warp * 16, ks * 16, lane);
#pragma unroll
          for (int np = 0; np < 4; ++np) {
            uint32_t bf[4];
            frag_b_pix_n<kCL>(bf, o1, other1_pitch, np * 16, ks * 16, lane);
            mma16816<T>(X[2 * np], af, bf[0], bf[1]);
            mma16816<T>(X[2 * np + 1], af, bf[2], bf[3]);
          }
        }
      }

      if constexpr (kY) {
        if (c == 0) {
#pragma unroll
          for (int nt = 0; nt < 8; ++nt) {
#pragma unroll
            for (int e = 0; e < 4; ++e) Y[nt][e] = 0.f;
          }
        }
        const T* w2 = smem + lay.own2 + (t & 1) * lay.own2_size;
        const T* o2 = smem + lay.other2 + (t & 1) * lay.other2_size;
        const int64_t left = a.D_v - static_cast<int64_t>(c) * kDvChunk;
        const int ksteps = left >= kDvChunk ? kDvChunk / 16 : static_cast<int>(cdiv(max64(left, 0), 16));
#pragma unroll
        for (int ks = 0; ks < kDvChunk / 16; ++ks) {
          if (ks < ksteps) {
            uint32_t af[4];
            frag_a_pix_m<kCL>(af, w2, own2_pitch, warp * 16, ks * 16, lane);
#pragma unroll
            for (int np = 0; np < 4; ++np) {
              uint32_t bf[4];
              frag_b_pix_n<kCL>(bf, o2, other2_pitch, np * 16, ks * 16, lane);
              mma16816<T>(Y[2 * np], af, bf[0], bf[1]);
              mma16816<T>(Y[2 * np + 1], af, bf[2], bf[3]);
            }
          }
        }
      }

      if (c == nchunk - 1) {
        const int64_t j0 = b * kBN;
        const float* st = stats + (b & 1) * 2 * kBN;
        // X -> Z. Element e of n-tile nt: row g + 8*(e>>1), column nt*8 + 2*t4 + (e&1).
        if constexpr (kMode == Mode::kForward) {
          float bm[2] = {-INFINITY, -INFINITY};
#pragma unroll
          for (int nt = 0; nt < 8; ++nt) {
#pragma unroll
            for (int e = 0; e < 4; ++e) {
              if (j0 + nt * 8 + 2 * t4 + (e & 1) >= HW) X[nt][e] = -INFINITY;  // past the last key
              bm[e >> 1] = nan_max(bm[e >> 1], X[nt][e]);
            }
          }
          float scale[2];
#pragma unroll
          for (int h = 0; h < 2; ++h) {
            bm[h] = nan_max(bm[h], __shfl_xor_sync(0xffffffffu, bm[h], 1));
            bm[h] = nan_max(bm[h], __shfl_xor_sync(0xffffffffu, bm[h], 2));
            const float m_new = nan_max(m_r[h], bm[h]);
            // A row whose keys so far are all -inf keeps m = -inf; exp(-inf - 0) = 0 then.
            scale[h] = m_new == -INFINITY ? 0.f : m_new * kLog2e;
            const float alpha = exp2_ftz(m_r[h] * kLog2e - scale[h]);
            m_r[h] = m_new;
            l_r[h] *= alpha;
#pragma unroll
            for (int nt = 0; nt < kNT; ++nt) {
              acc[nt][2 * h] *= alpha;
              acc[nt][2 * h + 1] *= alpha;
            }
          }
#pragma unroll
          for (int nt = 0; nt < 8; ++nt) {
#pragma unroll
            for (int e = 0; e < 4; ++e) {
              X[nt][e] = exp2_ftz(fmaf(X[nt][e], kLog2e, -scale[e >> 1]));
              l_r[e >> 1] += X[nt][e];
            }
          }
        } else {
#pragma unroll
          for (int nt = 0; nt < 8; ++nt) {
#pragma unroll
            for (int e = 0; e < 4; ++e) {
              const int col = nt * 8 + 2 * t4 + (e & 1);
              const bool valid = j0 + col < HW;
              const float lse2 = kQ ? lse2_r[e >> 1] : st[col];
              const float p = exp2_ftz(fmaf(X[nt][e], kLog2e, -lse2));
              float z = p;
              if constexpr (kY) {
                const float R = kQ ? R_r[e >> 1] : st[kBN + col];
                z = p * (Y[nt][e] - R);  // dS / gamma: dS = P (dP - gamma R), dP = gamma Y
              }
              X[nt][e] = valid ? z : 0.f;
            }
          }
        }

        // acc += Z T^T over the 64 other pixels of this step.
        const T* tt = kY ? o1 : smem + lay.other2 + (b & 1) * lay.other2_size;
        const int tpitch = kY ? other1_pitch : other2_pitch;
        const int tch0 = kY ? static_cast<int>(e0) : 0;  // the tile channel of acc column 0
#pragma unroll
        for (int kk = 0; kk < kBN / 16; ++kk) {
          const uint32_t af[4] = {pack2<T>(X[2 * kk][0], X[2 * kk][1]), pack2<T>(X[2 * kk][2], X[2 * kk][3]),
                                  pack2<T>(X[2 * kk + 1][0], X[2 * kk + 1][1]),
                                  pack2<T>(X[2 * kk + 1][2], X[2 * kk + 1][3])};
#pragma unroll
          for (int ep = 0; ep < kNT / 2; ++ep) {
            if (ep < ep_valid) {
              uint32_t bf[4];
              frag_b_ch_n<kCL>(bf, tt, tpitch, kk * 16, tch0 + ep * 16, lane);
              mma16816<T>(acc[2 * ep], af, bf[0], bf[1]);
              mma16816<T>(acc[2 * ep + 1], af, bf[2], bf[3]);
            }
          }
        }
      }
    }

    // Epilogue: scale the rows, stage them in shared memory (fp32), write coalesced.
    float row_scale[2] = {1.f, 1.f};
    if constexpr (kMode == Mode::kForward) {
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        float l = l_r[h];
        l += __shfl_xor_sync(0xffffffffu, l, 1);
        l += __shfl_xor_sync(0xffffffffu, l, 2);
        row_scale[h] = 1.f / l;
        const int64_t o = o0 + warp * 16 + g + h * 8;
        if (ec == 0 && t4 == 0 && o < HW) {
          // An energy of +inf: torch.logsumexp's +inf (l is NaN, inf - inf).
          a.lse_out[n * HW + o] = m_r[h] == INFINITY ? m_r[h] : m_r[h] + logf(l);
        }
      }
    } else {  // every gradient carries one factor gamma, applied here
      row_scale[0] = row_scale[1] = gamma;
    }
    cp_async_wait_all();  // nothing is in flight; kept so the staging never races a load
    __syncthreads();      // every warp is done reading the tiles the staging overlays
    float* const staging = reinterpret_cast<float*>(smem_raw);
    const int st_pix = a.out_cl ? kAcc + 8 : 1;
    const int st_e = a.out_cl ? 1 : kBM + 8;
#pragma unroll
    for (int nt = 0; nt < kNT; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int r = warp * 16 + g + (e >> 1) * 8;
        const int col = nt * 8 + 2 * t4 + (e & 1);
        staging[r * st_pix + col * st_e] = acc[nt][e] * row_scale[e >> 1];
      }
    }
    __syncthreads();
    write_tile<8, kMode == Mode::kForward>(a, staging, st_pix, st_e, kBM, kAcc, n, o0, e0, gamma);
    __syncthreads();  // the next block's loads overwrite the staging
  }
#else
  __trap();  // the host launches this kernel only where it was compiled for sm_80+
#endif
}

// ---------------------------------------------------------------------------------------------
// SIMT walk: float32, float64 (exact energies in acc), and float16/bfloat16 where tensor cores
// cannot serve (before sm_80, or D_qk > kMaxDqk). Thread (tr, tc) = (tid / 16, tid % 16) owns own
// rows 4*tr..4*tr+3, other columns 2*tc, 2*tc+1 of X and Y, and output channels 4*tc..4*tc+3 of acc.
// The 16 threads of a row group are 16 consecutive lanes of one warp: row statistics reduce by
// shuffles in a fixed pattern.
// ---------------------------------------------------------------------------------------------

// Pixels [p0, p0 + npix) x channels [c0, c0 + nch) of sample n into tile[pix * pix_step +
// ch * ch_step] in acc, zeros outside the tensor; consecutive threads along the tensor's
// contiguous axis.
template <int npix, int nch, typename T, typename acc_t>
__device__ __forceinline__ void load_simt(acc_t* tile, int pix_step, int ch_step, const Src<T>& s, int64_t n,
                                          int64_t p0, int64_t HW, int64_t c0) {
  for (int idx = threadIdx.x; idx < npix * nch; idx += kThreads) {
    const int pi = s.pix_inner ? idx % npix : idx / nch;
    const int ci = s.pix_inner ? idx / npix : idx % nch;
    const int64_t p = p0 + pi;
    const int64_t c = c0 + ci;
    acc_t v = acc_t(0);
    if (p < HW && c < s.D) {
      v = static_cast<acc_t>(s.ptr[n * s.sn + c * s.sd + p * s.sp]);
    }
    tile[pi * pix_step + ci * ch_step] = v;
  }
}

template <typename acc_t>
struct SimtSmem {
  acc_t own[kSKC][kSBM];       // [channel][own pixel]
  acc_t other[kSKC][kSBN];     // [channel][other pixel]
  acc_t z[kSBN][kSBM + 1];     // Z^T: [other pixel][own pixel]; odd pitch: conflict-free stores
  acc_t t[kSBN][kSE];          // T^T: [other pixel][output channel]
  acc_t stats[2][kSBN];        // grad_v, grad_k: the other block's lse and R
};

// Z[r][u] += sum_c own[c, o0 + 4 tr + r] * other[c, j0 + 2 tc + u] over the `depth` channels:
// this thread's 4 x 2 part of an (own pixels x other pixels) product, through shared memory
// in chunks of kSKC channels (S = q^T k, or dP = grad_y^T v).
template <typename acc_t, typename Smem, typename SrcT>
__device__ __forceinline__ void simt_product(acc_t (&Z)[4][2], Smem& sm, const SrcT& own, const SrcT& other,
                                             int64_t depth, int64_t n, int64_t o0, int64_t j0, int64_t HW, int tr,
                                             int tc) {
  for (int64_t c0 = 0; c0 < depth; c0 += kSKC) {
    load_simt<kSBM, kSKC>(&sm.own[0][0], 1, kSBM, own, n, o0, HW, c0);
    load_simt<kSBN, kSKC>(&sm.other[0][0], 1, kSBN, other, n, j0, HW, c0);
    __syncthreads();
#pragma unroll
    for (int k = 0; k < kSKC; ++k) {
      acc_t u[4], v[2];
#pragma unroll
      for (int r = 0; r < 4; ++r) u[r] = sm.own[k][tr * 4 + r];
      v[0] = sm.other[k][tc * 2];
      v[1] = sm.other[k][tc * 2 + 1];
#pragma unroll
      for (int r = 0; r < 4; ++r) {
        Z[r][0] += u[r] * v[0];
        Z[r][1] += u[r] * v[1];
      }
    }
    __syncthreads();
  }
}

template <Mode kMode, typename T>
__global__ void __launch_bounds__(kThreads) attn_simt_kernel(const WalkArgs<T, at::opmath_type<T>> a) {
  using acc_t = at::opmath_type<T>;
  constexpr bool kQ = kOwnQueries<kMode>;
  constexpr bool kY = kHasY<kMode>;
  __shared__ __align__(16) unsigned char smem_raw[sizeof(SimtSmem<acc_t>)];
  auto& sm = *reinterpret_cast<SimtSmem<acc_t>*>(smem_raw);
  // The epilogue stages a kSBM x kSE tile of acc over the whole buffer ([pixel][channel], odd pitch).
  static_assert(sizeof(acc_t) * kSBM * (kSE + 1) <= sizeof(SimtSmem<acc_t>), "staging must fit");
  acc_t* const staging = reinterpret_cast<acc_t*>(smem_raw);

  const int tid = threadIdx.x;
  const int tr = tid / 16;
  const int tc = tid % 16;
  const int64_t HW = a.HW;
  const int64_t own_blocks = cdiv(HW, kSBM);
  const int64_t e_chunks = max64(1, cdiv(a.E, kSE));
  const int64_t nblk = cdiv(HW, kSBN);
  const acc_t gamma = *a.gamma;
  auto plus = [](acc_t u, acc_t v) { return u + v; };
  auto nmax = [](acc_t u, acc_t v) { return nan_max(u, v); };
  const acc_t kNegInf = -std::numeric_limits<acc_t>::infinity();

  for (int64_t w = blockIdx.x; w < own_blocks * e_chunks * a.N; w += gridDim.x) {  // uniform per block
    const int64_t ob = w % own_blocks;
    const int64_t ec = (w / own_blocks) % e_chunks;
    const int64_t n = w / own_blocks / e_chunks;
    const int64_t o0 = ob * kSBM;
    const int64_t e0 = ec * kSE;

    acc_t lse_r[4], R_r[4];  // grad_q: lse and R of the own rows
#pragma unroll
    for (int r = 0; r < 4; ++r) {
      const int64_t o = o0 + tr * 4 + r;
      const bool ok = kMode == Mode::kGradQ && o < HW;
      lse_r[r] = ok ? p_shift(a.lse[n * HW + o]) : acc_t(0);
      R_r[r] = ok ? a.R[n * HW + o] : acc_t(0);
    }
    acc_t acc[4][4];
    acc_t m_r[4], l_r[4];  // forward: running max and this thread's part of the running sum
#pragma unroll
    for (int r = 0; r < 4; ++r) {
      m_r[r] = kNegInf;
      l_r[r] = acc_t(0);
#pragma unroll
      for (int u = 0; u < 4; ++u) acc[r][u] = acc_t(0);
    }

    for (int64_t b = 0; b < nblk; ++b) {
      const int64_t j0 = b * kSBN;
      __syncthreads();  // the previous step's readers of z, t and stats are done
      if (!kQ && tid < kSBN) {
        const int64_t i = j0 + tid;
        sm.stats[0][tid] = i < HW ? p_shift(a.lse[n * HW + i]) : acc_t(0);
        sm.stats[1][tid] = (kMode == Mode::kGradK && i < HW) ? a.R[n * HW + i] : acc_t(0);
      }
      // T^T: channels e0.. of v (forward), grad_y (grad_v), k (grad_q) or q (grad_k).
      load_simt<kSBN, kSE>(&sm.t[0][0], kSE, 1, kY ? a.other1 : a.other2, n, j0, HW, e0);

      acc_t X[4][2], Y[4][2];
#pragma unroll
      for (int r = 0; r < 4; ++r) {
        X[r][0] = X[r][1] = acc_t(0);
        Y[r][0] = Y[r][1] = acc_t(0);
      }
      simt_product(X, sm, a.own1, a.other1, a.D_qk, n, o0, j0, HW, tr, tc);  // S tile
      if constexpr (kY) simt_product(Y, sm, a.own2, a.other2, a.D_v, n, o0, j0, HW, tr, tc);  // dP tile
      __syncthreads();  // stats visible even when both channel loops were empty

      // X -> Z, stored transposed for the acc product.
#pragma unroll
      for (int r = 0; r < 4; ++r) {
        if constexpr (kMode == Mode::kForward) {
          acc_t bm = kNegInf;
#pragma unroll
          for (int q = 0; q < 2; ++q) {
            if (j0 + tc * 2 + q >= HW) X[r][q] = kNegInf;  // past the last key
            bm = nan_max(bm, X[r][q]);
          }
          bm = group_allreduce(bm, 16, nmax);
          const acc_t m_new = nan_max(m_r[r], bm);
          const acc_t m_use = m_new == kNegInf ? acc_t(0) : m_new;  // all -inf so far: P = 0
          const acc_t alpha = acc_exp(m_r[r] - m_use);
          m_r[r] = m_new;
          l_r[r] *= alpha;
#pragma unroll
          for (int u = 0; u < 4; ++u) acc[r][u] *= alpha;
#pragma unroll
          for (int q = 0; q < 2; ++q) {
            X[r][q] = acc_exp(X[r][q] - m_use);
            l_r[r] += X[r][q];
          }
        } else {
#pragma unroll
          for (int q = 0; q < 2; ++q) {
            const int col = tc * 2 + q;
            const acc_t lse = kQ ? lse_r[r] : sm.stats[0][col];
            acc_t z = acc_exp(X[r][q] - lse);
            if constexpr (kY) {
              const acc_t R = kQ ? R_r[r] : sm.stats[1][col];
              z = z * (Y[r][q] - R);  // dS / gamma
            }
            X[r][q] = j0 + col < HW ? z : acc_t(0);
          }
        }
#pragma unroll
        for (int q = 0; q < 2; ++q) sm.z[tc * 2 + q][tr * 4 + r] = X[r][q];
      }
      __syncthreads();
#pragma unroll 4
      for (int j = 0; j < kSBN; ++j) {
        acc_t z[4], v[4];
#pragma unroll
        for (int r = 0; r < 4; ++r) z[r] = sm.z[j][tr * 4 + r];
#pragma unroll
        for (int u = 0; u < 4; ++u) v[u] = sm.t[j][tc * 4 + u];
#pragma unroll
        for (int r = 0; r < 4; ++r) {
#pragma unroll
          for (int u = 0; u < 4; ++u) acc[r][u] += z[r] * v[u];
        }
      }
    }

    // Epilogue.
    acc_t row_scale[4] = {acc_t(1), acc_t(1), acc_t(1), acc_t(1)};
#pragma unroll
    for (int r = 0; r < 4; ++r) {
      if constexpr (kMode == Mode::kForward) {
        const acc_t l = group_allreduce(l_r[r], 16, plus);
        row_scale[r] = acc_t(1) / l;
        const int64_t o = o0 + tr * 4 + r;
        if (ec == 0 && tc == 0 && o < HW) {
          // An energy of +inf: torch.logsumexp's +inf (l is NaN, inf - inf).
          a.lse_out[n * HW + o] = m_r[r] == -kNegInf ? m_r[r] : m_r[r] + acc_log(l);
        }
      } else {  // every gradient carries one factor gamma, applied here
        row_scale[r] = gamma;
      }
    }
    __syncthreads();  // the staging overlays z and t
#pragma unroll
    for (int r = 0; r < 4; ++r) {
#pragma unroll
      for (int u = 0; u < 4; ++u) {
        staging[(tr * 4 + r) * (kSE + 1) + tc * 4 + u] = acc[r][u] * row_scale[r];
      }
    }
    __syncthreads();
    write_tile<1, kMode == Mode::kForward>(a, staging, kSE + 1, 1, kSBM, kSE, n, o0, e0, gamma);
  }
}

// ---------------------------------------------------------------------------------------------
// R[n,p] = sum_c grad_y * out, and per-block partial sums of R for grad_gamma.
// A tile is 32 pixels x 8 channel lanes (pixels contiguous: coalesced along pixels, then a fixed
// tree over the lanes) or 8 pixels x 32 channel lanes (channels contiguous: a warp per pixel).
// ---------------------------------------------------------------------------------------------
template <typename T>
__global__ void __launch_bounds__(kThreads)
    row_dot_kernel(const Src<T> gy, const Src<T> out, int64_t N, int64_t HW, at::opmath_type<T>* __restrict__ R,
                   at::opmath_type<T>* __restrict__ partial) {
  using acc_t = at::opmath_type<T>;
  __shared__ acc_t red[8][33];
  const int tx = threadIdx.x % kWarpSize;
  const int ty = threadIdx.x / kWarpSize;
  const int64_t rows = N * HW;
  const int64_t D = gy.D;
  const bool pix_inner = gy.pix_inner;
  const int per_tile = pix_inner ? 32 : 8;
  auto plus = [](acc_t u, acc_t v) { return u + v; };
  acc_t block_sum = acc_t(0);  // thread 0's, in tile order
  for (int64_t tile = blockIdx.x; tile * per_tile < rows; tile += gridDim.x) {  // uniform per block
    const int64_t r = tile * per_tile + (pix_inner ? tx : ty);
    acc_t s = acc_t(0);
    if (r < rows) {
      const int64_t n = r / HW;
      const int64_t p = r - n * HW;
      const T* g = gy.ptr + n * gy.sn + p * gy.sp;
      const T* o = out.ptr + n * out.sn + p * out.sp;
      for (int64_t c = pix_inner ? ty : tx; c < D; c += pix_inner ? 8 : kWarpSize) {
        s += static_cast<acc_t>(g[c * gy.sd]) * static_cast<acc_t>(o[c * out.sd]);
      }
    }
    if (pix_inner) {
      red[ty][tx] = s;
      __syncthreads();
      if (ty == 0) {
        acc_t total = red[0][tx];
        for (int k = 1; k < 8; ++k) total += red[k][tx];
        if (r < rows) R[r] = total;
        red[0][tx] = r < rows ? total : acc_t(0);
      }
      __syncthreads();
      if (threadIdx.x == 0) {
        for (int k = 0; k < 32; ++k) block_sum += red[0][k];
      }
    } else {
      s = warp_allreduce(s, plus);
      if (tx == 0) {
        if (r < rows) R[r] = s;
        red[0][ty] = r < rows ? s : acc_t(0);
      }
      __syncthreads();
      if (threadIdx.x == 0) {
        for (int k = 0; k < 8; ++k) block_sum += red[0][k];
      }
    }
    __syncthreads();  // red is rewritten by the next tile
  }
  if (threadIdx.x == 0) {
    partial[blockIdx.x] = block_sum;
  }
}

// total = sum of the partials, in a fixed order.
template <typename acc_t>
__global__ void __launch_bounds__(kThreads) sum_partials_kernel(const acc_t* __restrict__ partial, int64_t count,
                                                                acc_t* __restrict__ total) {
  __shared__ acc_t smem[kThreads / kWarpSize];
  acc_t s = acc_t(0);
  for (int64_t i = threadIdx.x; i < count; i += kThreads) s += partial[i];
  s = block_reduce(s, acc_t(0), [](acc_t u, acc_t v) { return u + v; }, smem);
  if (threadIdx.x == 0) {
    *total = s;
  }
}

// ---------------------------------------------------------------------------------------------
// Host side.
// ---------------------------------------------------------------------------------------------

// The one stride that walks the H*W pixels of t (p = h*W + w), or -1 when (h, w) do not flatten.
int64_t pixel_stride(const at::Tensor& t) {
  const int64_t H = t.size(2), W = t.size(3);
  if (H * W <= 1) return 1;
  if (W == 1) return t.stride(2);
  if (H == 1 || t.stride(2) == W * t.stride(3)) return t.stride(3);
  return -1;
}

// t with its pixels on one stride (a dense copy only when they are not).
at::Tensor flat(const at::Tensor& t) { return pixel_stride(t) < 0 ? t.contiguous() : t; }

// Channels contiguous and pixels not: a channels_last walk serves t best.
bool channels_inner(const at::Tensor& t) {
  const int64_t hw = t.size(2) * t.size(3);
  return t.size(1) > 1 && hw > 1 && t.stride(1) == 1 && pixel_stride(t) != 1;
}

// flat(t), and for the tensor-core walk also with the tiles' inner axis (channels when cl,
// pixels otherwise) contiguous, so tiles load in 16-byte chunks; a copy only when it is not.
at::Tensor operand(const at::Tensor& t, bool tc, bool cl) {
  at::Tensor u = flat(t);
  if (!tc) return u;
  const int64_t hw = u.size(2) * u.size(3);
  const int64_t inner_size = cl ? u.size(1) : hw;
  const int64_t outer_size = cl ? hw : u.size(1);
  const int64_t inner_stride = cl ? u.stride(1) : pixel_stride(u);
  if (inner_size > 1 && outer_size > 1 && inner_stride != 1) {
    u = u.contiguous(cl ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous);
  }
  return u;
}

// 16-byte chunks of 8 elements along the inner axis (channels when cl) are aligned: inner stride
// 1, every other stride a multiple of 8 elements, base 16-byte aligned. Only 2-byte types use it.
bool chunks_aligned(const void* ptr, int64_t elem_size, int64_t sn, int64_t sd, int64_t sp, int64_t N, int64_t D,
                    int64_t hw, bool cl) {
  if (elem_size != 2) return false;
  const int64_t inner = cl ? sd : sp;
  const int64_t outer = cl ? sp : sd;
  const int64_t outer_size = cl ? hw : D;
  return inner == 1 && (outer_size <= 1 || outer % 8 == 0) && (N <= 1 || sn % 8 == 0) &&
         reinterpret_cast<uintptr_t>(ptr) % 16 == 0;
}

template <typename T>
Src<T> make_src(const at::Tensor& t, bool cl) {
  const int64_t sp = pixel_stride(t);
  const int64_t hw = t.size(2) * t.size(3);
  Src<T> s;
  s.ptr = t.data_ptr<T>();
  s.sn = t.stride(0);
  s.sd = t.stride(1);
  s.sp = sp;
  s.D = t.size(1);
  s.vec = chunks_aligned(s.ptr, sizeof(T), s.sn, s.sd, s.sp, t.size(0), s.D, hw, cl);
  s.pix_inner = hw > 1 && sp == 1;
  return s;
}

template <typename T>
Dst<T> make_dst(const at::Tensor& t, bool cl) {
  const Src<T> s = make_src<T>(t, cl);
  return {t.data_ptr<T>(), s.sn, s.sd, s.sp, s.vec};
}

template <typename T>
constexpr bool kTensorCoreType = std::is_same<T, at::Half>::value || std::is_same<T, at::BFloat16>::value;

// ptxVersion >= 80: the kernel was compiled with its tensor-core body (not the __trap stub).
template <typename Kernel>
bool compiled_for_sm80(Kernel kernel) {
  cudaFuncAttributes attr;
  C10_CUDA_CHECK(cudaFuncGetAttributes(&attr, kernel));
  return attr.ptxVersion >= 80;
}

int64_t grid_for(int64_t work) { return std::max<int64_t>(1, std::min(work, kMaxGrid)); }

// Output channels per block of the tensor-core walk: forward and grad_v tile D_v by 128 or 256
// (256 halves the recompute of S per channel when D_v > 128); grad_q and grad_k tile D_qk by 64
// or 128 (D_qk <= 64 needs only 64 accumulator columns).
int tc_acc_cols(Mode mode, int64_t E) {
  if (mode == Mode::kForward || mode == Mode::kGradV) return E > 128 ? 256 : 128;
  return E > 64 ? 128 : 64;
}

template <Mode kMode, bool kCL, int kAcc, typename T>
bool try_launch_tc(const WalkArgs<T, float>& a) {
  auto kernel = attn_tc_kernel<kMode, kCL, kAcc, T>;
  const TcSmem<kCL> lay(a.dqp, kAcc, kHasY<kMode>, !kOwnQueries<kMode>);
  const size_t smem = lay.bytes();
  const auto* prop = at::cuda::getCurrentDeviceProperties();
  if (prop->major < 8 || smem > prop->sharedMemPerBlockOptin || !compiled_for_sm80(kernel)) {
    return false;
  }
  if (smem > 48 * 1024) {
    C10_CUDA_CHECK(
        cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));
  }
  const int64_t work = cdiv(a.HW, kBM) * std::max<int64_t>(1, cdiv(a.E, kAcc)) * a.N;
  kernel<<<grid_for(work), kThreads, smem, at::cuda::getCurrentCUDAStream()>>>(a);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return true;
}

template <Mode kMode, bool kCL, typename T>
bool try_launch_tc_cols(const WalkArgs<T, float>& a) {
  constexpr bool kFwdLike = kMode == Mode::kForward || kMode == Mode::kGradV;
  if (tc_acc_cols(kMode, a.E) == (kFwdLike ? 128 : 64)) {
    return try_launch_tc<kMode, kCL, kFwdLike ? 128 : 64, T>(a);
  }
  return try_launch_tc<kMode, kCL, kFwdLike ? 256 : 128, T>(a);
}

template <Mode kMode, typename T>
void launch_simt(const WalkArgs<T, at::opmath_type<T>>& a) {
  const int64_t work = cdiv(a.HW, kSBM) * std::max<int64_t>(1, cdiv(a.E, kSE)) * a.N;
  attn_simt_kernel<kMode, T><<<grid_for(work), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(a);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// One walk: tensor cores where they serve (tc, decided once per op), the SIMT kernel otherwise.
template <Mode kMode, typename T>
void launch_walk(const WalkArgs<T, at::opmath_type<T>>& a, bool tc, bool cl) {
  if constexpr (kTensorCoreType<T>) {
    if (tc) {
      const bool done = cl ? try_launch_tc_cols<kMode, true, T>(a) : try_launch_tc_cols<kMode, false, T>(a);
      if (done) return;
    }
  }
  launch_simt<kMode, T>(a);
}

// Whether the tensor-core walk serves this op: 2-byte floats, sm_80+, D_qk <= kMaxDqk.
template <typename T>
bool want_tensor_cores(int64_t D_qk) {
  if constexpr (!kTensorCoreType<T>) {
    return false;
  } else {
    return at::cuda::getCurrentDeviceProperties()->major >= 8 && D_qk <= kMaxDqk;
  }
}

// ---- argument checks ----

// gamma's one value in acc, on the device (no host sync to read it).
at::Tensor gamma_acc(const at::Tensor& gamma, at::ScalarType acc) {
  return gamma.reshape({1}).to(acc).contiguous();
}

// ---- the ops ----

std::tuple<at::Tensor, at::Tensor, at::Tensor> nonlocal_attn_cuda(const at::Tensor& q_in, const at::Tensor& k_in,
                                                                  const at::Tensor& v_in, const at::Tensor& x_in,
                                                                  const at::Tensor& gamma_in, int64_t cpu_tile) {
  constexpr const char* op = "nonlocal_attn";
  check_nonlocal_args(q_in, k_in, v_in, x_in, gamma_in, op);  // shapes, one dtype, one device (common.h)
  check_cpu_tile(cpu_tile, op);  // the CPU kernels' tile: checked, not used (the tiles here are fixed)
  AK_CHECK_VALUE(x_in.is_cuda(), op, ": x must be a CUDA tensor, got ", x_in.device());
  c10::cuda::CUDAGuard device_guard(x_in.device());
  const int64_t N = x_in.size(0), D_v = x_in.size(1), HW = x_in.size(2) * x_in.size(3), D_qk = q_in.size(1);
  const at::ScalarType acc = acc_type(x_in.scalar_type());
  at::Tensor y = empty_like_layout(x_in);
  at::Tensor out = empty_like_layout(x_in);
  at::Tensor lse = at::empty({N, HW}, x_in.options().dtype(acc));
  if (N == 0 || HW == 0) {
    return {y, out, lse};
  }
  const at::Tensor gamma = gamma_acc(gamma_in, acc);
  const bool out_cl = layout_of(x_in) == Layout::ChannelsLast;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x_in.scalar_type(), "nonlocal_attn_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const bool tc = want_tensor_cores<scalar_t>(D_qk);
    const bool cl = tc && channels_inner(v_in);
    const at::Tensor q = operand(q_in, tc, cl), k = operand(k_in, tc, cl), v = operand(v_in, tc, cl);
    const at::Tensor x = flat(x_in);
    WalkArgs<scalar_t, acc_t> a{};
    a.own1 = make_src<scalar_t>(q, cl);
    a.other1 = make_src<scalar_t>(k, cl);
    a.own2 = a.other1;  // unused
    a.other2 = make_src<scalar_t>(v, cl);
    a.x = make_src<scalar_t>(x, out_cl);
    a.out = make_dst<scalar_t>(out, out_cl);
    a.y = make_dst<scalar_t>(y, out_cl);
    a.out_cl = out_cl;
    a.N = N;
    a.HW = HW;
    a.D_qk = D_qk;
    a.D_v = D_v;
    a.dqp = static_cast<int>(cdiv(D_qk, 16) * 16);
    a.E = D_v;
    a.gamma = gamma.data_ptr<acc_t>();
    a.lse = nullptr;
    a.R = nullptr;
    a.lse_out = lse.data_ptr<acc_t>();
    launch_walk<Mode::kForward>(a, tc, cl);
  });
  return {y, out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> nonlocal_attn_backward_cuda(
    const at::Tensor& grad_y_in, const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
    const at::Tensor& gamma_in, const at::Tensor& out_in, const at::Tensor& lse_in, int64_t cpu_tile) {
  constexpr const char* op = "nonlocal_attn_backward";
  // out has x's shape, dtype and layout: it stands for x in the checks, as in the CPU op.
  check_nonlocal_args(q_in, k_in, v_in, out_in, gamma_in, op);
  check_cpu_tile(cpu_tile, op);
  AK_CHECK_VALUE(out_in.is_cuda(), op, ": out must be a CUDA tensor, got ", out_in.device());
  cuda::check_like_x(grad_y_in, out_in, op, "grad_y");
  check_row_stats(lse_in, out_in, op);
  const int64_t N = v_in.size(0), D_v = v_in.size(1), HW = v_in.size(2) * v_in.size(3), D_qk = q_in.size(1);
  const at::ScalarType acc = acc_type(v_in.scalar_type());
  c10::cuda::CUDAGuard device_guard(v_in.device());
  at::Tensor grad_q = empty_like_layout(q_in);
  at::Tensor grad_k = empty_like_layout(k_in);
  at::Tensor grad_v = empty_like_layout(v_in);
  if (N == 0 || HW == 0) {
    return {grad_q, grad_k, grad_v, at::zeros_like(gamma_in)};  // empty sums
  }
  const at::Tensor gamma = gamma_acc(gamma_in, acc);
  const at::Tensor lse = lse_in.contiguous();
  at::Tensor R = at::empty({N, HW}, lse.options());
  at::Tensor total = at::empty({1}, lse.options());
  auto stream = at::cuda::getCurrentCUDAStream();
  const auto dtype = v_in.scalar_type();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "nonlocal_attn_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const bool tc = want_tensor_cores<scalar_t>(D_qk);
    const bool cl = tc && channels_inner(v_in);
    const at::Tensor q = operand(q_in, tc, cl), k = operand(k_in, tc, cl), v = operand(v_in, tc, cl);
    const at::Tensor g = operand(grad_y_in, tc, cl);
    const at::Tensor out = flat(out_in);

    // R and grad_gamma: per-block partials, then one block adds them in order.
    {
      const Src<scalar_t> gs = make_src<scalar_t>(g, false);
      const int64_t per_tile = gs.pix_inner ? 32 : 8;
      const int64_t blocks = grid_for(cdiv(N * HW, per_tile));
      at::Tensor partial = at::empty({blocks}, lse.options());
      row_dot_kernel<scalar_t><<<blocks, kThreads, 0, stream>>>(gs, make_src<scalar_t>(out, false), N, HW,
                                                                R.data_ptr<acc_t>(), partial.data_ptr<acc_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      sum_partials_kernel<acc_t><<<1, kThreads, 0, stream>>>(partial.data_ptr<acc_t>(), blocks,
                                                             total.data_ptr<acc_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }

    WalkArgs<scalar_t, acc_t> base{};
    base.N = N;
    base.HW = HW;
    base.D_qk = D_qk;
    base.D_v = D_v;
    base.dqp = static_cast<int>(cdiv(D_qk, 16) * 16);
    base.gamma = gamma.data_ptr<acc_t>();
    base.lse = lse.data_ptr<acc_t>();
    base.R = R.data_ptr<acc_t>();
    base.lse_out = nullptr;
    const Src<scalar_t> qs = make_src<scalar_t>(q, cl), ks = make_src<scalar_t>(k, cl);
    const Src<scalar_t> vs = make_src<scalar_t>(v, cl), gs = make_src<scalar_t>(g, cl);
    auto set_out = [&](WalkArgs<scalar_t, acc_t>& a, const at::Tensor& grad, const at::Tensor& like) {
      a.out_cl = layout_of(like) == Layout::ChannelsLast;
      a.out = make_dst<scalar_t>(grad, a.out_cl);
      a.y = a.out;  // unused
      a.x = qs;     // unused
    };
    if (D_v > 0) {  // grad_v[c,j] = gamma * sum_i P[i,j] grad_y[c,i]
      WalkArgs<scalar_t, acc_t> a = base;
      a.own1 = ks;
      a.other1 = qs;
      a.own2 = gs;  // unused
      a.other2 = gs;
      a.E = D_v;
      set_out(a, grad_v, v_in);
      launch_walk<Mode::kGradV>(a, tc, cl);
    }
    if (D_qk > 0) {
      WalkArgs<scalar_t, acc_t> a = base;  // grad_q[d,i] = sum_j dS[i,j] k[d,j]
      a.own1 = qs;
      a.other1 = ks;
      a.own2 = gs;
      a.other2 = vs;
      a.E = D_qk;
      set_out(a, grad_q, q_in);
      launch_walk<Mode::kGradQ>(a, tc, cl);

      a = base;  // grad_k[d,j] = sum_i dS[i,j] q[d,i]
      a.own1 = ks;
      a.other1 = qs;
      a.own2 = vs;
      a.other2 = gs;
      a.E = D_qk;
      set_out(a, grad_k, k_in);
      launch_walk<Mode::kGradK>(a, tc, cl);
    }
  });
  at::Tensor grad_gamma = total.reshape(gamma_in.sizes()).to(gamma_in.scalar_type());
  return {grad_q, grad_k, grad_v, grad_gamma};
}

}  // namespace
}  // namespace attnkernels

TORCH_LIBRARY_IMPL(attnkernels, CUDA, m) {
  m.impl("nonlocal_attn", &attnkernels::nonlocal_attn_cuda);
  m.impl("nonlocal_attn_backward", &attnkernels::nonlocal_attn_backward_cuda);
}
