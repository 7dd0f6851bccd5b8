// block_tail hot path, CUDA: the statistics, apply and backward-reduce passes of a residual
// block's tail. The math of each op is in the header comment of csrc/block_tail_ops.cpp.
//
// Three ops of attnkernels/cuda_reduce.cuh, one pass over the feature maps each:
//   * block_tail_stats (reduce_per_channel): per (n, c), the sum and a Welford (mean, m2) of
//     each thread's pixels, merged with Chan's formula in the walks' fixed trees (NCHW: a warp
//     or a block per plane; channels_last: tiles of channels over chunks of pixels, chunks
//     combined in order). m2 is summed from deviations, never as sum z^2 - P mean^2; the mean
//     written is the plain sum over P (inf for a plane holding +inf, as BatchNorm's).
//   * block_tail_apply (walk, y as its second input): act(a*x + b + c*y) per element.
//   * block_tail_backward_reduce (walk, out as its third input, kAux): writes grad_u and sums
//     s1, s2 per (n, c) in the same pass; partials of split planes combined in order.
// No float atomics: bitwise deterministic run to run on a given device.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cmath>
#include <limits>
#include <tuple>

#include "attnkernels/block_tail.h"
#include "attnkernels/cuda_reduce.cuh"
#include "attnkernels/cuda_utils.cuh"

namespace attnkernels {
namespace {

using cuda::NoCtx;
using cuda::NoState;
using cuda::OpBase;

// a / b for the Welford and Chan weights, b a count >= 1, without IEEE division: its slow-path
// call costs a stack frame (spills) and time per element, and these weights need no last ulp
// (the mean written is sum / P; m2 grows by products of deviations from the running mean).
// float: the hardware reciprocal (2 ulp); double: that reciprocal and two Newton steps.
__device__ __forceinline__ float count_div(float a, float b) { return __fdividef(a, b); }
__device__ __forceinline__ double count_div(double a, double b) {
  double r = static_cast<double>(__fdividef(1.0f, static_cast<float>(b)));
  r = fma(r, fma(-b, r, 1.0), r);  // each step squares the relative error: 1e-7, 1e-14, 1e-28
  r = fma(r, fma(-b, r, 1.0), r);
  return a * r;
}

// block_tail_stats: mean[n,c] = sum_p z / P, m2[n,c] = sum_p (z - mean)^2.
// ChanState: the count, a running (Welford) mean and m2 of the pixels seen, and their plain sum.
template <typename scalar_t>
struct BlockTailStats : OpBase<scalar_t> {
  using acc_t = at::opmath_type<scalar_t>;
  struct ChanState {
    int64_t n;  // exact for any plane; the Welford weights are taken from it in acc
    acc_t mean, m2, sum;
  };

  acc_t* mean;
  acc_t* m2;
  acc_t inv_pixels;  // 1 / P, P = H*W: mean = sum * (1 / P), as torch.mean's CUDA kernel

  __device__ static ChanState chan_init() { return {0, acc_t(0), acc_t(0), acc_t(0)}; }
  // Chan et al.'s combination of two disjoint sets; an empty one (padding lanes, idle rows)
  // leaves the other untouched.
  __device__ static ChanState chan_combine(ChanState a, ChanState b) {
    if (b.n == 0) return a;
    if (a.n == 0) return b;
    const int64_t n = a.n + b.n;
    const acc_t d = b.mean - a.mean;
    const acc_t wb = count_div(static_cast<acc_t>(b.n), static_cast<acc_t>(n));
    return {n, a.mean + d * wb, a.m2 + b.m2 + d * d * static_cast<acc_t>(a.n) * wb, a.sum + b.sum};
  }
  // Welford: m2 grows by (z - old mean) * (z - new mean), a product of deviations.
  __device__ acc_t visit(NoCtx, NoCtx, acc_t, acc_t z, NoState&, ChanState& s) const {
    s.n += 1;
    const acc_t d = z - s.mean;
    s.mean += count_div(d, static_cast<acc_t>(s.n));
    s.m2 += d * (z - s.mean);
    s.sum += z;
    return acc_t(0);
  }
  __device__ void chan_finish(int64_t nc, ChanState s) const {
    mean[nc] = s.sum * inv_pixels;
    m2[nc] = s.m2;
  }
};

// block_tail_apply: out = act(a[n,c] * x + b[n,c] + c[n,c] * y), y read as the walk's grad_y.
template <typename scalar_t>
struct BlockTailApply : OpBase<scalar_t> {
  using acc_t = at::opmath_type<scalar_t>;
  struct ChanCtx {
    acc_t a, b, c;
  };
  static constexpr bool kGradY = true;  // y
  static constexpr bool kWrites = true;

  const acc_t* a;
  const acc_t* b;
  const acc_t* c;
  bool relu;

  __device__ ChanCtx chan(int64_t nc) const { return {a[nc], b[nc], c[nc]}; }
  __device__ acc_t visit(const ChanCtx& k, NoCtx, acc_t y, acc_t x, NoState&, NoState&) const {
    const acc_t v = k.a * x + k.b + k.c * y;
    return relu ? cuda::relu(v) : v;
  }
};

// block_tail_backward_reduce: grad_u = out <= 0 ? 0 : grad_out (written), s1[n,c] = sum_p grad_u,
// s2[n,c] = sum_p grad_u * z. The walk's x is z, its grad_y grad_out, its aux out.
template <typename scalar_t>
struct BlockTailBackwardReduce : OpBase<scalar_t> {
  using acc_t = at::opmath_type<scalar_t>;
  struct ChanState {
    acc_t s1, s2;
  };
  static constexpr bool kGradY = true;  // grad_out
  static constexpr bool kWrites = true;  // grad_u
  static constexpr bool kAux = true;     // out

  const scalar_t* aux;  // out, in z's layout
  acc_t* s1;
  acc_t* s2;

  __device__ static ChanState chan_init() { return {acc_t(0), acc_t(0)}; }
  __device__ static ChanState chan_combine(ChanState u, ChanState v) { return {u.s1 + v.s1, u.s2 + v.s2}; }
  __device__ acc_t visit(NoCtx, NoCtx, acc_t grad_out, acc_t z, acc_t out, NoState&, ChanState& s) const {
    const acc_t g = cuda::relu_grad(grad_out, out);  // a select: exact, +0 where out <= 0
    s.s1 += g;
    s.s2 += g * z;
    return g;
  }
  __device__ void chan_finish(int64_t nc, ChanState s) const {
    s1[nc] = s.s1;
    s2[nc] = s.s2;
  }
};

std::tuple<at::Tensor, at::Tensor> block_tail_stats_cuda(const at::Tensor& z_in) {
  constexpr const char* op = "block_tail_stats";
  check_feature_map(z_in, op, "z");
  AK_CHECK_VALUE(z_in.is_cuda(), op, ": z must be a CUDA tensor, got ", z_in.device());
  c10::cuda::CUDAGuard device_guard(z_in.device());
  const at::Tensor z = dense(z_in);
  const int64_t N = z.size(0), C = z.size(1), P = z.size(2) * z.size(3);
  at::Tensor mean = at::empty({N, C}, acc_options(z));
  at::Tensor m2 = at::empty({N, C}, acc_options(z));
  if (N * C == 0) return {mean, m2};
  if (P == 0) {  // 0 / 0, as torch.mean; an empty sum of squares
    mean.fill_(std::numeric_limits<double>::quiet_NaN());
    m2.zero_();
    return {mean, m2};
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, z.scalar_type(), "block_tail_stats_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const BlockTailStats<scalar_t> stats{{}, mean.data_ptr<acc_t>(), m2.data_ptr<acc_t>(), static_cast<acc_t>(1.0 / static_cast<double>(P))};
    cuda::reduce_per_channel(stats, z, at::Tensor());
  });
  return {mean, m2};
}

at::Tensor block_tail_apply_cuda(const at::Tensor& x_in, const at::Tensor& y_in, const at::Tensor& a_in,
                                 const at::Tensor& b_in, const at::Tensor& c_in, bool relu) {
  constexpr const char* op = "block_tail_apply";
  check_block_tail_apply_args(x_in, y_in, a_in, b_in, c_in, op);
  AK_CHECK_VALUE(x_in.is_cuda(), op, ": x must be a CUDA tensor, got ", x_in.device());
  c10::cuda::CUDAGuard device_guard(x_in.device());
  const at::Tensor x = dense(x_in);
  at::Tensor out = empty_like_layout(x);
  if (x.numel() == 0) return out;
  // y in x's layout (a copy only if it differs), so one offset serves both.
  const at::Tensor y = y_in.contiguous(memory_format_of(layout_of(x)));
  const at::Tensor a = a_in.contiguous(), b = b_in.contiguous(), c = c_in.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "block_tail_apply_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const BlockTailApply<scalar_t> apply{
        {}, a.data_ptr<acc_t>(), b.data_ptr<acc_t>(), c.data_ptr<acc_t>(), relu};
    cuda::walk(apply, x, y, out);
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> block_tail_backward_reduce_cuda(const at::Tensor& grad_out_in,
                                                                               const at::Tensor& out_in,
                                                                               const at::Tensor& z_in) {
  constexpr const char* op = "block_tail_backward_reduce";
  check_block_tail_backward_reduce_args(grad_out_in, out_in, z_in, op);
  AK_CHECK_VALUE(z_in.is_cuda(), op, ": z must be a CUDA tensor, got ", z_in.device());
  c10::cuda::CUDAGuard device_guard(z_in.device());
  const at::Tensor z = dense(z_in);
  const int64_t N = z.size(0), C = z.size(1), P = z.size(2) * z.size(3);
  at::Tensor grad_u = empty_like_layout(z);  // out's dtype is z's (checked)
  at::Tensor s1 = at::empty({N, C}, acc_options(z));
  at::Tensor s2 = at::empty({N, C}, acc_options(z));
  if (N * C == 0) return {grad_u, s1, s2};
  if (P == 0) {  // empty sums
    s1.zero_();
    s2.zero_();
    return {grad_u, s1, s2};
  }
  // grad_out and out in z's layout (copies only if they differ): one offset serves all four.
  const auto format = memory_format_of(layout_of(z));
  const at::Tensor grad_out = grad_out_in.contiguous(format);
  const at::Tensor out = out_in.contiguous(format);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, z.scalar_type(), "block_tail_backward_reduce_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const BlockTailBackwardReduce<scalar_t> reduce{
        {}, out.data_ptr<scalar_t>(), s1.data_ptr<acc_t>(), s2.data_ptr<acc_t>()};
    cuda::walk(reduce, z, grad_out, grad_u);
  });
  return {grad_u, s1, s2};
}

}  // namespace
}  // namespace attnkernels

TORCH_LIBRARY_IMPL(attnkernels, CUDA, m) {
  m.impl("block_tail_stats", &attnkernels::block_tail_stats_cuda);
  m.impl("block_tail_apply", &attnkernels::block_tail_apply_cuda);
  m.impl("block_tail_backward_reduce", &attnkernels::block_tail_backward_reduce_cuda);
}
