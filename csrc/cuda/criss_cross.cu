// criss_cross hot path, CUDA: CCNet's attention of each pixel over its row and its column, and
// its backward. The math of both ops is in the header comment of csrc/criss_cross_ops.cpp.
//
// Every kernel here is one "line walk": attention restricted to one line of pixels, a row (n, h)
// (L = W pixels, line index h, position w) or a column (n, w) (L = H pixels, line index w,
// position h). A block owns a tile of kTO positions of the line (the own side) and one chunk of
// kTE output channels e, loops over the line's other positions in tiles of kTN, recomputes the
// tile X = own1^T other1 of S (or S^T) in registers, turns it into Z and accumulates
// acc[own][e] += sum_other Z[own][other] * T[e][other]:
//
//   mode      own  other  X          Y = own2^T other2 (over C)   Z                        T
//   forward   i    j      S = q^T k  -                            P (online softmax)       v
//   grad_v    j    i      S^T        -                            P^T = exp(S^T - lse_i)   grad_y
//   grad_q    i    j      S          grad_y^T v = dP / gamma      dS / gamma = P (Y - R_i) k
//   grad_k    j    i      S^T        v^T grad_y = dP^T / gamma    (dS / gamma)^T           q
//
// Each op runs the row pass, then the column pass (the column pass masks the pixel itself,
// h' == h, with a select: zero weight and zero gradient, as the reference's -inf).
//   * forward: the row pass writes the unnormalised O_r = sum_w' exp(S - m_r) v to an acc
//     (N, C, H, W) buffer with the row's running max m_r and sum s_r per pixel; the column pass
//     runs its own online softmax over h' != h and merges flash-style per pixel:
//       m = max(m_r, m_c), Z = s_r e^(m_r - m) + s_c e^(m_c - m), out = (O_r e^(m_r - m) +
//       O_c e^(m_c - m)) / Z, lse = m + log Z,
//     then writes out (x's dtype and layout), y = gamma * out + x (out rounded first, y rounded
//     once) and lse. H == 1 gives an empty column: m_c = -inf, s_c = 0, O_c = 0; exponents
//     use max(m, 0 if m == -inf) so no -inf - -inf ever forms (an all -inf row gives Z = 0 and
//     out = 0/0 = NaN, as torch's softmax).
//   * backward: R = sum_c grad_y * out per pixel and grad_gamma = sum R (per-block partials, then
//     one block adds them in order). With lse, P = exp(S - lse) of the row and of the column are
//     independent, so each pass adds its share: the row pass writes (=) acc buffers for
//     grad_q, grad_k, grad_v, the column pass reads them, adds its share and writes
//     gamma * (row + column) to the gradient in its input's dtype and layout. Every contribution
//     of a row pass stays in its row (queries and keys of row h), so every output element has
//     exactly one writer per kernel. The backward accs carry no gamma (one multiply at the end).
//
// No (N, H + W - 1, H, W) energies are written: tiles of S live in registers and shared memory.
// No atomics: every sum runs in a fixed order, results are bitwise deterministic run to run.
// Each channel chunk recomputes its S tiles and its own online softmax (bitwise the same in every
// chunk, so chunk 0 alone writes m_r, s_r and lse).
//
// Inputs are read through their strides (NCHW, channels_last or any view: no copies); shared
// tiles are loaded along whichever axis of the tensor is the denser (pixels or channels).
// Offsets are int64. Any N, H, W, C >= 0, D >= 1: partial tiles are zero-filled and masked.
//
// This is the SIMT walk (exact fp32 energies for fp32/fp16/bf16, fp64 for fp64). What would make
// it faster: an mma.sync m16n8k16 walk for fp16/bf16 as in nonlocal_attn.cu (tiles in smem via
// cp.async, double buffered); loading a column's tiles for several adjacent columns at once (a
// column's pixels are W apart in NCHW, so its loads are strided); vectorised epilogues through a
// staging tile; for grad_q/grad_k, keeping the own side of Y's operands in shared memory across
// the other-tile loop instead of re-reading them from L2.
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
#include <limits>
#include <tuple>
#include <type_traits>

#include "attnkernels/criss_cross.h"
#include "attnkernels/cuda_utils.cuh"

namespace attnkernels {
namespace {

using cuda::acc_exp;
using cuda::block_reduce;
using cuda::group_allreduce;
using cuda::kMaxGrid;
using cuda::nan_max;

constexpr int kThreads = 256;  // 16 x 16 threads in every line kernel
constexpr int kTO = 32;        // own positions per block: thread row ty takes ty and ty + 16
constexpr int kTN = 32;        // other positions per step: thread column tx takes tx and tx + 16
constexpr int kTE = 64;        // output channels per block: tx, tx + 16, tx + 32, tx + 48
constexpr int kKC = 16;        // channels per step of the X and Y products
// Two resident blocks per SM at least: lets ptxas use up to 128 registers (without it, ptxas for
// sm_80 squeezed grad_v to 64 registers and spilled).
constexpr int kMinBlocks = 2;

enum class Mode { kForward, kGradV, kGradQ, kGradK };

__host__ __device__ constexpr int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

// How a line kernel reads or writes an (N, C, H, W) tensor: element (n, c) at position i of line
// `line` sits at ptr[n*sn + c*sc + line*sline + i*si] (a row: sline = stride(h), si = stride(w);
// a column the other way round). Per-pixel maps (lse, R, m_r, s_r) are (N, 1, H, W) views.
template <typename P>
struct Map {
  P* ptr;
  int64_t sn, sc, sline, si;
  bool pix_inner;  // tile loads: consecutive threads take consecutive positions (else channels)

  __device__ __forceinline__ int64_t off(int64_t n, int64_t c, int64_t line, int64_t i) const {
    return n * sn + c * sc + line * sline + i * si;
  }
};

template <typename T, typename acc_t>
struct LineArgs {
  Map<const T> own1, other1;  // X = own1^T other1 over the D channels of q and k
  Map<const T> own2, other2;  // grad_q, grad_k: Y = own2^T other2 over the C channels of grad_y, v
  Map<const T> t;             // T, the accumulated side (E channels)
  Map<const T> x;             // forward column pass: y = gamma * out + x
  Map<T> out, y;              // column pass: out (forward) or the gradient (backward); y (forward)
  Map<acc_t> buf;             // row pass writes, column pass reads: O_r, or a gradient's row share
  Map<acc_t> m_r, s_r;        // forward: the row pass's max and sum per pixel
  Map<acc_t> lse;             // forward column pass writes it; backward reads it
  Map<const acc_t> R;         // grad_q, grad_k: sum_c grad_y * out per pixel
  int64_t N, lines, L;        // samples, lines of the pass, positions per line
  int64_t D, C, E;            // channels of q/k, of v/x, of the output
  const acc_t* gamma;         // one value, in acc
};

__device__ __forceinline__ float acc_log(float v) { return logf(v); }
__device__ __forceinline__ double acc_log(double v) { return log(v); }

// s[k][p] = M(n, c0 + k, line, p0 + p) in acc, zero outside the K channels and the L positions.
template <int kP, typename T, typename acc_t>
__device__ __forceinline__ void load_tile(const Map<const T>& M, acc_t (*s)[kP], int64_t n, int64_t line,
                                          int64_t c0, int64_t K, int kC, int64_t p0, int64_t L) {
  for (int idx = threadIdx.x; idx < kC * kP; idx += kThreads) {
    const int p = M.pix_inner ? idx % kP : idx / kC;
    const int k = M.pix_inner ? idx / kP : idx % kC;
    const int64_t c = c0 + k, pp = p0 + p;
    s[k][p] = (c < K && pp < L) ? static_cast<acc_t>(M.ptr[M.off(n, c, line, pp)]) : acc_t(0);
  }
}

// s[j][e] = T(n, e0 + e, line, j0 + j) in acc, zero outside the E channels and the L positions.
template <typename T, typename acc_t>
__device__ __forceinline__ void load_t(const Map<const T>& M, acc_t (*s)[kTE + 1], int64_t n, int64_t line,
                                       int64_t e0, int64_t E, int64_t j0, int64_t L) {
  for (int idx = threadIdx.x; idx < kTN * kTE; idx += kThreads) {
    const int j = M.pix_inner ? idx % kTN : idx / kTE;
    const int e = M.pix_inner ? idx / kTN : idx % kTE;
    const int64_t c = e0 + e, pp = j0 + j;
    s[j][e] = (c < E && pp < L) ? static_cast<acc_t>(M.ptr[M.off(n, c, line, pp)]) : acc_t(0);
  }
}

// x[r][c] = sum_k A(k, own ty + 16 r) B(k, other tx + 16 c) over K channels, KC at a time.
// Starts and ends with the shared tiles free (a __syncthreads after the last read).
template <typename T, typename acc_t>
__device__ __forceinline__ void tile_product(const Map<const T>& A, const Map<const T>& B, int64_t K, int64_t n,
                                             int64_t line, int64_t i0, int64_t j0, int64_t L,
                                             acc_t (*own_s)[kTO], acc_t (*oth_s)[kTN], acc_t (&x)[2][2], int tx,
                                             int ty) {
#pragma unroll
  for (int r = 0; r < 2; ++r) {
#pragma unroll
    for (int c = 0; c < 2; ++c) x[r][c] = acc_t(0);
  }
  for (int64_t k0 = 0; k0 < K; k0 += kKC) {
    load_tile<kTO>(A, own_s, n, line, k0, K, kKC, i0, L);
    load_tile<kTN>(B, oth_s, n, line, k0, K, kKC, j0, L);
    __syncthreads();
#pragma unroll
    for (int k = 0; k < kKC; ++k) {
      const acc_t a0 = own_s[k][ty], a1 = own_s[k][ty + 16];
      const acc_t b0 = oth_s[k][tx], b1 = oth_s[k][tx + 16];
      x[0][0] += a0 * b0;
      x[0][1] += a0 * b1;
      x[1][0] += a1 * b0;
      x[1][1] += a1 * b1;
    }
    __syncthreads();
  }
}

// One pass (row: kCol = false, column: kCol = true) of one mode. Grid-stride over work items
// (n, line, own tile, channel chunk), channel chunk fastest.
template <Mode kMode, bool kCol, typename T>
__global__ void __launch_bounds__(kThreads, kMinBlocks) line_kernel(const LineArgs<T, at::opmath_type<T>> a) {
  using acc_t = at::opmath_type<T>;
  constexpr bool kHasY = kMode == Mode::kGradQ || kMode == Mode::kGradK;
  constexpr bool kOtherStats = kMode == Mode::kGradV || kMode == Mode::kGradK;  // lse (and R) of queries j
  constexpr acc_t kNegInf = -std::numeric_limits<acc_t>::infinity();
  __shared__ acc_t own_s[kKC][kTO];
  __shared__ acc_t oth_s[kKC][kTN];
  __shared__ acc_t t_s[kTN][kTE + 1];  // T[e][other] as [other][e]; +1: the pixel-inner stores spread over banks
  __shared__ acc_t z_s[kTO][kTN + 1];
  __shared__ acc_t lse_s[kTN], r_s[kTN];  // stats of the other side's queries

  const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
  const int64_t L = a.L;
  const int64_t otiles = cdiv(L, kTO);
  const int64_t chunks = std::max<int64_t>(1, cdiv(a.E, kTE));  // E == 0: one chunk still writes lse
  const int64_t work = a.N * a.lines * otiles * chunks;
  const acc_t gamma = *a.gamma;

  for (int64_t wi = blockIdx.x; wi < work; wi += gridDim.x) {
    int64_t rest = wi;
    const int64_t chunk = rest % chunks;
    rest /= chunks;
    const int64_t ot = rest % otiles;
    rest /= otiles;
    const int64_t line = rest % a.lines;
    const int64_t n = rest / a.lines;
    const int64_t i0 = ot * kTO, e0 = chunk * kTE;

    acc_t acc[2][4];
    acc_t m[2], s[2];                 // forward: running max and sum of each own row
    acc_t own_lse[2], own_r[2];       // grad_q: lse and R of the own queries
#pragma unroll
    for (int r = 0; r < 2; ++r) {
#pragma unroll
      for (int u = 0; u < 4; ++u) acc[r][u] = acc_t(0);
      m[r] = kNegInf;
      s[r] = acc_t(0);
      own_lse[r] = acc_t(0);
      own_r[r] = acc_t(0);
      if constexpr (kMode == Mode::kGradQ) {
        const int64_t o = i0 + ty + 16 * r;
        if (o < L) {
          own_lse[r] = a.lse.ptr[a.lse.off(n, 0, line, o)];
          own_r[r] = a.R.ptr[a.R.off(n, 0, line, o)];
        }
      }
    }

    for (int64_t j0 = 0; j0 < L; j0 += kTN) {
      // The shared tiles are free here (the previous step ended with a __syncthreads).
      if constexpr (kOtherStats) {
        if (threadIdx.x < kTN) {
          const int64_t j = j0 + threadIdx.x;
          lse_s[threadIdx.x] = j < L ? a.lse.ptr[a.lse.off(n, 0, line, j)] : acc_t(0);
          if constexpr (kMode == Mode::kGradK) {
            r_s[threadIdx.x] = j < L ? a.R.ptr[a.R.off(n, 0, line, j)] : acc_t(0);
          }
        }
      }
      load_t(a.t, t_s, n, line, e0, a.E, j0, L);
      __syncthreads();  // lse_s, r_s, t_s visible (tile_product may run no step: D == 0)

      acc_t xs[2][2];
      tile_product(a.own1, a.other1, a.D, n, line, i0, j0, L, own_s, oth_s, xs, tx, ty);
      acc_t ys[2][2];
      if constexpr (kHasY) {
        tile_product(a.own2, a.other2, a.C, n, line, i0, j0, L, own_s, oth_s, ys, tx, ty);
      }

      acc_t z[2][2];
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        const int64_t o = i0 + ty + 16 * r;
        bool valid[2];
#pragma unroll
        for (int c = 0; c < 2; ++c) {
          const int64_t q = j0 + tx + 16 * c;
          valid[c] = q < L && !(kCol && q == o);  // the column pass skips the pixel itself
        }
        if constexpr (kMode == Mode::kForward) {
          // Online softmax of own row r; the 16 threads of a row are one aligned half warp.
          acc_t mt = kNegInf;
#pragma unroll
          for (int c = 0; c < 2; ++c) mt = valid[c] ? nan_max(mt, xs[r][c]) : mt;
          mt = group_allreduce(mt, 16, [](acc_t u, acc_t v) { return nan_max(u, v); });
          const acc_t m_new = nan_max(m[r], mt);
          const acc_t m_safe = m_new == kNegInf ? acc_t(0) : m_new;
          const acc_t alpha = acc_exp(m[r] - m_safe);  // 0 while m is -inf
          acc_t ps = acc_t(0);
#pragma unroll
          for (int c = 0; c < 2; ++c) {
            z[r][c] = valid[c] ? acc_exp(xs[r][c] - m_safe) : acc_t(0);
            ps += z[r][c];
          }
          ps = group_allreduce(ps, 16, [](acc_t u, acc_t v) { return u + v; });
          s[r] = s[r] * alpha + ps;
          m[r] = m_new;
#pragma unroll
          for (int u = 0; u < 4; ++u) acc[r][u] *= alpha;
        } else if constexpr (kMode == Mode::kGradV) {
#pragma unroll
          for (int c = 0; c < 2; ++c) z[r][c] = valid[c] ? acc_exp(xs[r][c] - lse_s[tx + 16 * c]) : acc_t(0);
        } else if constexpr (kMode == Mode::kGradQ) {
#pragma unroll
          for (int c = 0; c < 2; ++c) {
            z[r][c] = valid[c] ? acc_exp(xs[r][c] - own_lse[r]) * (ys[r][c] - own_r[r]) : acc_t(0);
          }
        } else {  // kGradK
#pragma unroll
          for (int c = 0; c < 2; ++c) {
            const int q = tx + 16 * c;
            z[r][c] = valid[c] ? acc_exp(xs[r][c] - lse_s[q]) * (ys[r][c] - r_s[q]) : acc_t(0);
          }
        }
#pragma unroll
        for (int c = 0; c < 2; ++c) z_s[ty + 16 * r][tx + 16 * c] = z[r][c];
      }
      __syncthreads();
#pragma unroll 4
      for (int j = 0; j < kTN; ++j) {
        const acc_t z0 = z_s[ty][j], z1 = z_s[ty + 16][j];
#pragma unroll
        for (int u = 0; u < 4; ++u) {
          const acc_t tv = t_s[j][tx + 16 * u];
          acc[0][u] += z0 * tv;
          acc[1][u] += z1 * tv;
        }
      }
      __syncthreads();
    }

    // Epilogue: straight from registers (consecutive tx, consecutive channels e).
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int64_t o = i0 + ty + 16 * r;
      if (o >= L) continue;
      if constexpr (kMode == Mode::kForward) {
        if constexpr (!kCol) {
          if (chunk == 0 && tx == 0) {
            a.m_r.ptr[a.m_r.off(n, 0, line, o)] = m[r];
            a.s_r.ptr[a.s_r.off(n, 0, line, o)] = s[r];
          }
#pragma unroll
          for (int u = 0; u < 4; ++u) {
            const int64_t e = e0 + tx + 16 * u;
            if (e < a.E) a.buf.ptr[a.buf.off(n, e, line, o)] = acc[r][u];
          }
        } else {
          // Merge the row's (m_r, s_r, O_r) with this column's (m[r], s[r], acc).
          const acc_t mr = a.m_r.ptr[a.m_r.off(n, 0, line, o)];
          const acc_t sr = a.s_r.ptr[a.s_r.off(n, 0, line, o)];
          const acc_t mm = nan_max(mr, m[r]);
          const acc_t m_safe = mm == kNegInf ? acc_t(0) : mm;
          const acc_t fr = acc_exp(mr - m_safe), fc = acc_exp(m[r] - m_safe);
          const acc_t zsum = sr * fr + s[r] * fc;
          // An energy of +inf: torch.logsumexp's +inf (zsum is NaN, inf - inf).
          if (chunk == 0 && tx == 0) a.lse.ptr[a.lse.off(n, 0, line, o)] = mm == -kNegInf ? mm : mm + acc_log(zsum);
#pragma unroll
          for (int u = 0; u < 4; ++u) {
            const int64_t e = e0 + tx + 16 * u;
            if (e < a.E) {
              const acc_t ov = (a.buf.ptr[a.buf.off(n, e, line, o)] * fr + acc[r][u] * fc) / zsum;
              const T out_t = static_cast<T>(ov);
              a.out.ptr[a.out.off(n, e, line, o)] = out_t;
              const acc_t xv = static_cast<acc_t>(a.x.ptr[a.x.off(n, e, line, o)]);
              a.y.ptr[a.y.off(n, e, line, o)] = static_cast<T>(gamma * static_cast<acc_t>(out_t) + xv);
            }
          }
        }
      } else {
#pragma unroll
        for (int u = 0; u < 4; ++u) {
          const int64_t e = e0 + tx + 16 * u;
          if (e >= a.E) continue;
          acc_t* b = a.buf.ptr + a.buf.off(n, e, line, o);
          if constexpr (!kCol) {
            *b = acc[r][u];
          } else {
            a.out.ptr[a.out.off(n, e, line, o)] = static_cast<T>(gamma * (*b + acc[r][u]));
          }
        }
      }
    }
  }
}

// R[n, p] = sum_c grad_y * out (c in order), and each block's sum of its R values (its pixels in
// grid-stride order, then block_reduce's fixed tree) in partial[blockIdx.x]. The grid depends on
// the shape only, so the partials do too.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    row_dot_kernel(const Map<const T> g, const Map<const T> out, int64_t N, int64_t H, int64_t W, int64_t C,
                   at::opmath_type<T>* __restrict__ R, at::opmath_type<T>* __restrict__ partial) {
  using acc_t = at::opmath_type<T>;
  __shared__ acc_t red[kThreads / cuda::kWarpSize];
  const int64_t HW = H * W;
  acc_t local = acc_t(0);
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; idx < N * HW;
       idx += static_cast<int64_t>(gridDim.x) * kThreads) {
    const int64_t n = idx / HW, p = idx - n * HW;
    const int64_t h = p / W, w = p - h * W;  // row maps: line h, position w
    acc_t sum = acc_t(0);
    for (int64_t c = 0; c < C; ++c) {
      sum += static_cast<acc_t>(g.ptr[g.off(n, c, h, w)]) * static_cast<acc_t>(out.ptr[out.off(n, c, h, w)]);
    }
    R[idx] = sum;
    local += sum;
  }
  local = block_reduce(local, acc_t(0), [](acc_t u, acc_t v) { return u + v; }, red);
  if (threadIdx.x == 0) partial[blockIdx.x] = local;
}

// *total = sum of count partials, in a fixed order (one block).
template <typename acc_t>
__global__ void __launch_bounds__(kThreads) sum_in_order_kernel(const acc_t* __restrict__ partial, int64_t count,
                                                                acc_t* __restrict__ total) {
  __shared__ acc_t red[kThreads / cuda::kWarpSize];
  acc_t s = acc_t(0);
  for (int64_t i = threadIdx.x; i < count; i += kThreads) s += partial[i];
  s = block_reduce(s, acc_t(0), [](acc_t u, acc_t v) { return u + v; }, red);
  if (threadIdx.x == 0) *total = s;
}

// ---------------------------------------------------------------------------------------------
// Host side.
// ---------------------------------------------------------------------------------------------

// t (N, C, H, W, any strides) as a Map of the row pass (line h, position w) or the column pass
// (line w, position h).
template <typename P>
Map<P> make_map(const at::Tensor& t, bool col) {
  Map<P> m;
  m.ptr = static_cast<P*>(t.data_ptr());
  m.sn = t.stride(0);
  m.sc = t.stride(1);
  m.sline = col ? t.stride(3) : t.stride(2);
  m.si = col ? t.stride(2) : t.stride(3);
  m.pix_inner = m.si <= m.sc;
  return m;
}

// An (N, H*W) per-pixel map viewed as (N, 1, H, W).
at::Tensor pixel_view(const at::Tensor& t, int64_t H, int64_t W) { return t.view({t.size(0), 1, H, W}); }

template <Mode kMode, bool kCol, typename T>
void launch_line(const LineArgs<T, at::opmath_type<T>>& a) {
  const int64_t work = a.N * a.lines * cdiv(a.L, kTO) * std::max<int64_t>(1, cdiv(a.E, kTE));
  const int64_t blocks = std::max<int64_t>(1, std::min(work, kMaxGrid));
  line_kernel<kMode, kCol, T><<<blocks, kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(a);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// gamma's one value in acc, on the device (no host sync to read it).
at::Tensor gamma_acc(const at::Tensor& gamma, at::ScalarType acc) { return gamma.reshape({1}).to(acc).contiguous(); }

std::tuple<at::Tensor, at::Tensor, at::Tensor> criss_cross_cuda(const at::Tensor& q, const at::Tensor& k,
                                                                const at::Tensor& v, const at::Tensor& x,
                                                                const at::Tensor& gamma_in) {
  constexpr const char* op = "criss_cross";
  check_criss_cross_args(q, k, v, x, gamma_in, op);
  AK_CHECK_VALUE(x.is_cuda(), op, ": x must be a CUDA tensor, got ", x.device());
  c10::cuda::CUDAGuard device_guard(x.device());
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3), D = q.size(1);
  const at::ScalarType acc = acc_type(x.scalar_type());
  at::Tensor y = empty_like_layout(x);
  at::Tensor out = empty_like_layout(x);
  at::Tensor lse = at::empty({N, H * W}, x.options().dtype(acc));
  if (N == 0 || H * W == 0) {
    return {y, out, lse};
  }
  const at::Tensor gamma = gamma_acc(gamma_in, acc);
  // The row pass's partial results: O_r (N, C, H, W) and m_r, s_r per pixel, all in acc.
  const at::Tensor o_r = at::empty({N, C, H, W}, x.options().dtype(acc));
  const at::Tensor m_r = at::empty({N, 1, H, W}, x.options().dtype(acc));
  const at::Tensor s_r = at::empty({N, 1, H, W}, x.options().dtype(acc));
  const at::Tensor lse4 = pixel_view(lse, H, W);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "criss_cross_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    for (const bool col : {false, true}) {
      LineArgs<scalar_t, acc_t> a{};
      a.own1 = make_map<const scalar_t>(q, col);
      a.other1 = make_map<const scalar_t>(k, col);
      a.own2 = a.own1;  // unused
      a.other2 = a.other1;
      a.t = make_map<const scalar_t>(v, col);
      a.x = make_map<const scalar_t>(x, col);
      a.out = make_map<scalar_t>(out, col);
      a.y = make_map<scalar_t>(y, col);
      a.buf = make_map<acc_t>(o_r, col);
      a.m_r = make_map<acc_t>(m_r, col);
      a.s_r = make_map<acc_t>(s_r, col);
      a.lse = make_map<acc_t>(lse4, col);
      a.R = make_map<const acc_t>(lse4, col);  // unused
      a.N = N;
      a.D = D;
      a.C = C;
      a.E = C;
      a.gamma = gamma.data_ptr<acc_t>();
      if (!col) {
        a.lines = H;
        a.L = W;
        launch_line<Mode::kForward, false, scalar_t>(a);
      } else {
        a.lines = W;
        a.L = H;
        launch_line<Mode::kForward, true, scalar_t>(a);
      }
    }
  });
  return {y, out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> criss_cross_backward_cuda(
    const at::Tensor& grad_y, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& gamma_in, const at::Tensor& out, const at::Tensor& lse_in) {
  constexpr const char* op = "criss_cross_backward";
  check_criss_cross_backward_args(grad_y, q, k, v, gamma_in, out, lse_in, op);
  AK_CHECK_VALUE(out.is_cuda(), op, ": out must be a CUDA tensor, got ", out.device());
  c10::cuda::CUDAGuard device_guard(out.device());
  const int64_t N = v.size(0), C = v.size(1), H = v.size(2), W = v.size(3), D = q.size(1);
  const at::ScalarType acc = acc_type(v.scalar_type());
  at::Tensor grad_q = empty_like_layout(q);
  at::Tensor grad_k = empty_like_layout(k);
  at::Tensor grad_v = empty_like_layout(v);
  if (N == 0 || H * W == 0) {
    return {grad_q, grad_k, grad_v, at::zeros_like(gamma_in)};  // empty sums
  }
  const at::Tensor gamma = gamma_acc(gamma_in, acc);
  const at::Tensor lse = pixel_view(lse_in.contiguous(), H, W);
  const at::TensorOptions acc_opts = v.options().dtype(acc);
  const at::Tensor R = at::empty({N, 1, H, W}, acc_opts);
  const at::Tensor total = at::empty({1}, acc_opts);
  // The row pass's share of each gradient, in acc (the column pass adds its own and converts).
  const at::Tensor bq = at::empty({N, D, H, W}, acc_opts);
  const at::Tensor bk = at::empty({N, D, H, W}, acc_opts);
  const at::Tensor bv = at::empty({N, C, H, W}, acc_opts);
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, v.scalar_type(), "criss_cross_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    {  // R and grad_gamma = sum R
      const int64_t blocks = std::max<int64_t>(1, std::min<int64_t>(cdiv(N * H * W, kThreads), 4096));
      const at::Tensor partial = at::empty({blocks}, acc_opts);
      row_dot_kernel<scalar_t><<<blocks, kThreads, 0, stream>>>(
          make_map<const scalar_t>(grad_y, false), make_map<const scalar_t>(out, false), N, H, W, C,
          R.data_ptr<acc_t>(), partial.data_ptr<acc_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      sum_in_order_kernel<acc_t><<<1, kThreads, 0, stream>>>(partial.data_ptr<acc_t>(), blocks,
                                                             total.data_ptr<acc_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    for (const bool col : {false, true}) {
      LineArgs<scalar_t, acc_t> base{};
      base.N = N;
      base.D = D;
      base.C = C;
      base.lines = col ? W : H;
      base.L = col ? H : W;
      base.gamma = gamma.data_ptr<acc_t>();
      base.lse = make_map<acc_t>(lse, col);
      base.R = make_map<const acc_t>(R, col);
      base.x = make_map<const scalar_t>(grad_y, col);  // unused
      base.m_r = base.lse;                             // unused
      base.s_r = base.lse;                             // unused
      const Map<const scalar_t> qs = make_map<const scalar_t>(q, col), ks = make_map<const scalar_t>(k, col);
      const Map<const scalar_t> vs = make_map<const scalar_t>(v, col), gs = make_map<const scalar_t>(grad_y, col);
      auto run = [&](auto mode_tag, LineArgs<scalar_t, acc_t> a, const at::Tensor& grad, const at::Tensor& buf) {
        constexpr Mode kMode = decltype(mode_tag)::value;
        a.out = make_map<scalar_t>(grad, col);
        a.y = a.out;  // unused
        a.buf = make_map<acc_t>(buf, col);
        if (col) {
          launch_line<kMode, true, scalar_t>(a);
        } else {
          launch_line<kMode, false, scalar_t>(a);
        }
      };
      if (C > 0) {  // grad_v[c, j] = gamma * sum_i P[i, j] grad_y[c, i]
        LineArgs<scalar_t, acc_t> a = base;
        a.own1 = ks;
        a.other1 = qs;
        a.own2 = gs;  // unused
        a.other2 = gs;
        a.t = gs;
        a.E = C;
        run(std::integral_constant<Mode, Mode::kGradV>{}, a, grad_v, bv);
      }
      if (D > 0) {
        LineArgs<scalar_t, acc_t> a = base;  // grad_q[d, i] = gamma * sum_j P (Y - R_i) k[d, j]
        a.own1 = qs;
        a.other1 = ks;
        a.own2 = gs;
        a.other2 = vs;
        a.t = ks;
        a.E = D;
        run(std::integral_constant<Mode, Mode::kGradQ>{}, a, grad_q, bq);

        a = base;  // grad_k[d, j] = gamma * sum_i P (Y - R_i) q[d, i]
        a.own1 = ks;
        a.other1 = qs;
        a.own2 = vs;
        a.other2 = gs;
        a.t = qs;
        a.E = D;
        run(std::integral_constant<Mode, Mode::kGradK>{}, a, grad_k, bk);
      }
    }
  });
  at::Tensor grad_gamma = total.reshape(gamma_in.sizes()).to(gamma_in.scalar_type());
  return {grad_q, grad_k, grad_v, grad_gamma};
}

}  // namespace
}  // namespace attnkernels

TORCH_LIBRARY_IMPL(attnkernels, CUDA, m) {
  m.impl("criss_cross", &attnkernels::criss_cross_cuda);
  m.impl("criss_cross_backward", &attnkernels::criss_cross_backward_cuda);
}
