// cam hot path, CUDA: DANet's channel attention over each sample's C x C Gram matrix, and its
// backward. The math of both ops is in the header comment of csrc/cam_ops.cpp.
//
// X = x[n] viewed (C, P) is a view of the dense x: (N, C, P) with strides (C*P, P, 1) for NCHW,
// (P*C, 1, C) for channels_last, which cuBLAS reads as a transposed operand (no copy).
//
// The five GEMMs run in cuBLAS through ATen, on the current stream:
//   forward:  E = X X^T;                     y   = x + (gamma attn) X      (baddbmm, beta = 1)
//   backward: G = g X^T;  grad_x = g + (gamma attn)^T g  then  += (dE + dE^T) X  (two baddbmm)
// gamma stays on the device (reading it into an ATen Scalar for alpha would sync the host), so the
// softmax kernels also write gamma * attn, a C x C scratch, and the GEMMs take it with alpha = 1.
// float32 and float64 inputs: every GEMM reads x (and grad_y) in place and writes y (grad_x) in
// x's layout directly, the GEMM carrying the epilogue. float16 / bfloat16 inputs: E and G come from
// at::bmm(a, b, at::kFloat) (aten::bmm.dtype, in torch since 2.8: half operands on tensor cores,
// fp32 accumulation and fp32 output, so the energies are never rounded to x's dtype); attn X,
// attn^T g and dE X take fp32 operands (attn and dE are fp32 by the contract), so X (and g) are
// converted to fp32 once, in x's layout; the fp32 result is rounded once to x's dtype by a copy
// into y (grad_x). Whether fp32 GEMMs use TF32 is torch.backends.cuda.matmul.allow_tf32's (off by
// default).
//
// Own kernels, 256 threads, every sum in acc and in a fixed order (a thread's strided loop, then a
// fixed warp or block tree; no atomics), so results are bitwise deterministic run to run:
//   softmax_rows_kernel           E -> attn in place (row min, sum of exp, weights below acc's
//                                 smallest normal number flushed to 0) and gamma * attn.
//   softmax_rows_backward_kernel  G -> dE in place, gamma * attn, and sum_j attn*G per row.
//   symmetrize_kernel             dE -> dE + dE^T in place, 32 x 32 tile pairs through shared memory.
//   sum_rows_kernel               grad_gamma = the rows' sums, added by one block in a fixed order.
// A row is a warp's (C <= 512, or rows enough to fill the GPU with warps) or a block's.
// Offsets are int64. NaN propagates as in the reference: the row minimum keeps a NaN.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <tuple>

#include "attnkernels/cam.h"
#include "attnkernels/cuda_utils.cuh"

namespace attnkernels {
namespace {

using cuda::acc_exp;
using cuda::block_allreduce;
using cuda::ceil_div;
using cuda::kMaxGrid;
using cuda::kWarpSize;
using cuda::nan_min;
using cuda::warp_allreduce;

constexpr int kThreads = 256;  // threads per block of the row kernels and the sum
constexpr int kTile = 32;      // symmetrize_kernel: tiles of kTile x kTile, blocks of kTile x kTileRows
constexpr int kTileRows = 8;

// The two running sums of a backward row: sum attn*G (grad_gamma) and sum attn*dA.
template <typename acc_t>
struct RowSums {
  acc_t attn_g, attn_da;
};

// v combined over the kGroup threads of a row (a warp, or the whole block); every thread of the
// group gets the result. All threads of the group call it.
template <int kGroup, typename T, typename Combine>
__device__ __forceinline__ T row_allreduce(T v, T identity, Combine combine, T* smem) {
  if constexpr (kGroup == kWarpSize) {
    return warp_allreduce(v, combine);
  } else {
    static_assert(kGroup == kThreads, "a row is a warp's or a block's");
    return block_allreduce(v, identity, combine, smem);
  }
}

// Each row of e (C energies) becomes its attention weights in place; scaled gets gamma * attn.
// With kGroup == kThreads the row index is uniform per block, with kWarpSize per warp, so the
// reductions' conditions hold.
template <int kGroup, typename acc_t>
__global__ void __launch_bounds__(kThreads)
    softmax_rows_kernel(acc_t* __restrict__ e, acc_t* __restrict__ scaled, const acc_t* __restrict__ gamma,
                        int64_t rows, int64_t C) {
  __shared__ acc_t smem[kThreads / kWarpSize];
  constexpr int kRowsPerBlock = kThreads / kGroup;
  const int t = threadIdx.x % kGroup;
  const acc_t gam = *gamma;
  const acc_t tiny = std::numeric_limits<acc_t>::min();
  for (int64_t r = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock + threadIdx.x / kGroup; r < rows;
       r += static_cast<int64_t>(gridDim.x) * kRowsPerBlock) {
    acc_t* row = e + r * C;
    acc_t* srow = scaled + r * C;
    // The row minimum, an infinity taken as NaN (v + (v - v): v where finite, NaN where not):
    // a row holding +inf is NaN, as the contract's rowmax(E) - E is there (inf - inf), where
    // exp(rowmin - inf) would weigh it 0 (a row holding -inf is NaN either way).
    acc_t m = std::numeric_limits<acc_t>::infinity();
    for (int64_t j = t; j < C; j += kGroup) {
      const acc_t v = row[j];
      m = nan_min(m, v + (v - v));
    }
    m = row_allreduce<kGroup>(m, std::numeric_limits<acc_t>::infinity(),
                              [](acc_t a, acc_t b) { return nan_min(a, b); }, smem);
    acc_t z = 0;
    for (int64_t j = t; j < C; j += kGroup) z += acc_exp(m - row[j]);
    z = row_allreduce<kGroup>(z, acc_t(0), [](acc_t a, acc_t b) { return a + b; }, smem);
    for (int64_t j = t; j < C; j += kGroup) {
      acc_t a = acc_exp(m - row[j]) / z;
      a = a < tiny ? acc_t(0) : a;  // NaN < tiny is false: NaN stays
      row[j] = a;
      srow[j] = gam * a;
    }
  }
}

// Each row of d (G on entry) becomes dE = -attn * (dA - sum_j dA*attn), dA = gamma * G, in place;
// scaled gets gamma * attn and row_dot[r] = sum_j attn*G (grad_gamma's term of the row).
template <int kGroup, typename acc_t>
__global__ void __launch_bounds__(kThreads)
    softmax_rows_backward_kernel(const acc_t* __restrict__ attn, acc_t* __restrict__ d, acc_t* __restrict__ scaled,
                                 const acc_t* __restrict__ gamma, acc_t* __restrict__ row_dot, int64_t rows,
                                 int64_t C) {
  using Sums = RowSums<acc_t>;
  __shared__ Sums smem[kThreads / kWarpSize];
  constexpr int kRowsPerBlock = kThreads / kGroup;
  const int t = threadIdx.x % kGroup;
  const acc_t gam = *gamma;
  for (int64_t r = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock + threadIdx.x / kGroup; r < rows;
       r += static_cast<int64_t>(gridDim.x) * kRowsPerBlock) {
    const acc_t* arow = attn + r * C;
    acc_t* drow = d + r * C;
    acc_t* srow = scaled + r * C;
    Sums s{acc_t(0), acc_t(0)};
    for (int64_t j = t; j < C; j += kGroup) {
      const acc_t a = arow[j], g = drow[j];
      s.attn_g += a * g;
      s.attn_da += (gam * g) * a;
    }
    s = row_allreduce<kGroup>(s, Sums{acc_t(0), acc_t(0)},
                              [](Sums u, Sums v) { return Sums{u.attn_g + v.attn_g, u.attn_da + v.attn_da}; },
                              smem);
    for (int64_t j = t; j < C; j += kGroup) {
      const acc_t a = arow[j];
      drow[j] = -a * (gam * drow[j] - s.attn_da);
      srow[j] = gam * a;
    }
    if (t == 0) {
      row_dot[r] = s.attn_g;
    }
  }
}

// *total = sum of v[0..count), by one block: each thread's strided sum, then the block tree.
template <typename acc_t>
__global__ void __launch_bounds__(kThreads)
    sum_rows_kernel(const acc_t* __restrict__ v, int64_t count, acc_t* __restrict__ total) {
  __shared__ acc_t smem[kThreads / kWarpSize];
  acc_t s = 0;
  for (int64_t i = threadIdx.x; i < count; i += kThreads) s += v[i];
  s = cuda::block_reduce(s, acc_t(0), [](acc_t a, acc_t b) { return a + b; }, smem);
  if (threadIdx.x == 0) *total = s;
}

// Each C x C matrix of d in place: d + d^T. A block takes the tile pair (bi, bj), (bj, bi) with
// bi <= bj (blockIdx.y, blockIdx.x; blocks below the diagonal return): both tiles are read into
// shared memory before either is written, so no other block touches them.
template <typename acc_t>
__global__ void __launch_bounds__(kTile * kTileRows) symmetrize_kernel(acc_t* __restrict__ d, int64_t N, int64_t C) {
  const int64_t bi = blockIdx.y, bj = blockIdx.x;
  if (bj < bi) return;
  __shared__ acc_t upper[kTile][kTile + 1];  // d[bi*kTile + r][bj*kTile + c]
  __shared__ acc_t lower[kTile][kTile + 1];  // d[bj*kTile + r][bi*kTile + c]
  const int c = threadIdx.x;
  const int64_t ui = bi * kTile, uj = bj * kTile;  // upper tile's first row and column
  for (int64_t n = blockIdx.z; n < N; n += gridDim.z) {
    acc_t* m = d + n * C * C;
    for (int r = threadIdx.y; r < kTile; r += kTileRows) {
      const bool u_in = ui + r < C && uj + c < C;
      const bool l_in = uj + r < C && ui + c < C;
      upper[r][c] = u_in ? m[(ui + r) * C + uj + c] : acc_t(0);
      lower[r][c] = l_in ? m[(uj + r) * C + ui + c] : acc_t(0);
    }
    __syncthreads();
    for (int r = threadIdx.y; r < kTile; r += kTileRows) {
      if (ui + r < C && uj + c < C) m[(ui + r) * C + uj + c] = upper[r][c] + lower[c][r];
      if (bi != bj && uj + r < C && ui + c < C) m[(uj + r) * C + ui + c] = lower[r][c] + upper[c][r];
    }
    __syncthreads();  // the tiles are reloaded for the next sample
  }
}

// ---------------------------------------------------------------------------------------------
// Host side.
// ---------------------------------------------------------------------------------------------

// Launches a row kernel over `rows` rows of C values: a warp per row when rows are short or
// numerous enough to fill the GPU with warps, else a block per row.
template <typename WarpKernel, typename BlockKernel, typename... Args>
void launch_rows(WarpKernel warp_kernel, BlockKernel block_kernel, int64_t rows, int64_t C, Args... args) {
  auto stream = at::cuda::getCurrentCUDAStream();
  const bool warp_rows = C <= 512 || rows >= cuda::sm_count() * (2048 / kWarpSize);
  if (warp_rows) {
    const auto blocks = static_cast<unsigned>(std::min(ceil_div(rows, kThreads / kWarpSize), kMaxGrid));
    warp_kernel<<<blocks, kThreads, 0, stream>>>(args..., rows, C);
  } else {
    block_kernel<<<static_cast<unsigned>(std::min(rows, kMaxGrid)), kThreads, 0, stream>>>(args..., rows, C);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// E = X X^T in acc: for half inputs aten::bmm.dtype (tensor cores, fp32 output).
at::Tensor gram(const at::Tensor& a, const at::Tensor& b, at::ScalarType acc) {
  if (a.scalar_type() != acc) {
    return at::bmm(a, b.transpose(1, 2), acc);
  }
  return at::bmm(a, b.transpose(1, 2));
}

// An (N, C, H, W) tensor's (N, C, P) view (t is dense).
at::Tensor rows_view(const at::Tensor& t) { return t.view({t.size(0), t.size(1), t.size(2) * t.size(3)}); }

std::tuple<at::Tensor, at::Tensor> cam_cuda(const at::Tensor& x_in, const at::Tensor& gamma_in) {
  constexpr const char* op = "cam";
  cuda::check_cuda_x(x_in, op);
  check_cam_args(x_in, gamma_in, op);
  c10::cuda::CUDAGuard device_guard(x_in.device());
  const int64_t N = x_in.size(0), C = x_in.size(1), P = x_in.size(2) * x_in.size(3);
  const at::ScalarType acc = acc_type(x_in.scalar_type());
  at::Tensor y = empty_like_layout(x_in);
  if (N == 0 || C == 0) {
    return {y, at::empty({N, C, C}, acc_options(x_in))};
  }
  const at::Tensor x = dense(x_in);
  const at::Tensor x3 = rows_view(x);
  const at::Tensor gamma = gamma_in.reshape({1}).to(acc).contiguous();
  // No pixels: E = 0, and every row of attn is uniform.
  at::Tensor attn = P == 0 ? at::zeros({N, C, C}, acc_options(x_in)) : gram(x3, x3, acc).contiguous();
  at::Tensor scaled = at::empty_like(attn);
  AT_DISPATCH_FLOATING_TYPES(acc, "cam_cuda", [&] {
    launch_rows(softmax_rows_kernel<kWarpSize, scalar_t>, softmax_rows_kernel<kThreads, scalar_t>, N * C, C,
                attn.data_ptr<scalar_t>(), scaled.data_ptr<scalar_t>(), gamma.data_ptr<scalar_t>());
  });
  if (P == 0) {
    return {y, attn};
  }
  at::Tensor y3 = rows_view(y);  // in x's layout, as x3
  if (x.scalar_type() == acc) {
    at::baddbmm_out(y3, x3, scaled, x3);  // y = x + (gamma attn) X, rounded once
  } else {
    const at::Tensor xa = x3.to(acc);  // fp32, x's strides
    at::Tensor ya = at::empty_like(xa);
    at::baddbmm_out(ya, xa, scaled, xa);
    y3.copy_(ya);  // rounded once to x's dtype
  }
  return {y, attn};
}

std::tuple<at::Tensor, at::Tensor> cam_backward_cuda(const at::Tensor& grad_y_in, const at::Tensor& x_in,
                                                     const at::Tensor& gamma_in, const at::Tensor& attn_in) {
  constexpr const char* op = "cam_backward";
  cuda::check_cuda_x(x_in, op);
  check_cam_backward_args(x_in, gamma_in, attn_in, op);
  c10::cuda::CUDAGuard device_guard(x_in.device());
  const at::Tensor x = dense(x_in);
  const at::Tensor g = walked_like_x(grad_y_in, x, op, "grad_y");
  const int64_t N = x.size(0), C = x.size(1);
  const at::ScalarType acc = acc_type(x.scalar_type());
  at::Tensor grad_x = empty_like_layout(x_in);
  if (x.numel() == 0) {
    return {grad_x, at::zeros_like(gamma_in)};  // empty sums
  }
  const at::Tensor attn = attn_in.contiguous();
  const at::Tensor x3 = rows_view(x), g3 = rows_view(g);
  const at::Tensor gamma = gamma_in.reshape({1}).to(acc).contiguous();
  at::Tensor d = gram(g3, x3, acc).contiguous();  // G, then dE, then dE + dE^T
  at::Tensor scaled = at::empty_like(attn);
  at::Tensor row_dot = at::empty({N * C}, attn.options());
  at::Tensor total = at::empty({1}, attn.options());
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(acc, "cam_backward_cuda", [&] {
    launch_rows(softmax_rows_backward_kernel<kWarpSize, scalar_t>, softmax_rows_backward_kernel<kThreads, scalar_t>,
                N * C, C, attn.data_ptr<scalar_t>(), d.data_ptr<scalar_t>(), scaled.data_ptr<scalar_t>(),
                gamma.data_ptr<scalar_t>(), row_dot.data_ptr<scalar_t>());
    sum_rows_kernel<scalar_t><<<1, kThreads, 0, stream>>>(row_dot.data_ptr<scalar_t>(), N * C,
                                                          total.data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    const auto tiles = static_cast<unsigned>(ceil_div(C, kTile));
    const dim3 grid(tiles, tiles, static_cast<unsigned>(std::min<int64_t>(N, 65535)));
    symmetrize_kernel<scalar_t><<<grid, dim3(kTile, kTileRows), 0, stream>>>(d.data_ptr<scalar_t>(), N, C);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  at::Tensor gx3 = rows_view(grad_x);  // in x's layout, as x3 and g3
  const at::Tensor scaled_t = scaled.transpose(1, 2);
  if (x.scalar_type() == acc) {
    at::baddbmm_out(gx3, g3, scaled_t, g3);  // g + gamma attn^T g
    gx3.baddbmm_(d, x3);                     // + (dE + dE^T) X
  } else {
    const at::Tensor xa = x3.to(acc), ga = g3.to(acc);  // fp32, x's strides
    at::Tensor gxa = at::empty_like(ga);
    at::baddbmm_out(gxa, ga, scaled_t, ga);
    gxa.baddbmm_(d, xa);
    gx3.copy_(gxa);  // rounded once to x's dtype
  }
  at::Tensor grad_gamma = total.reshape(gamma_in.sizes()).to(gamma_in.scalar_type());
  return {grad_x, grad_gamma};
}

}  // namespace
}  // namespace attnkernels

TORCH_LIBRARY_IMPL(attnkernels, CUDA, m) {
  m.impl("cam", &attnkernels::cam_cuda);
  m.impl("cam_backward", &attnkernels::cam_backward_cuda);
}
