// bam hot path, CUDA: BAM's apply, y = x * (1 + sigmoid(mc[n,c] + ms[n,0,p])), and its backward.
// The math of each op is in the header comment of csrc/bam_ops.cpp.
//
// Two ops of cuda_reduce.cuh's walk, the same walk as cbam_spatial's apply (cuda_spatial_pool.cuh
// HamApply / HamApplyBackward with one group): mc is the per-(n, c) context, ms the per-pixel
// one, and the backward's grad_mc and grad_ms are its per-channel sum (over pixels) and per-pixel
// sum (over channels). Each pass is one walk over x (one kernel per layout, NCHW or channels_last,
// 64-bit offsets) plus, where the launch splits a sum, a combine kernel adding the partials in a
// fixed order: no float atomics, bitwise deterministic run to run. sig is cuda_utils.cuh's
// sigmoid, 1 / (1 + exp(-z)) in acc(x) as torch.sigmoid computes it (expf for float).
//
// Passes over x: apply 1, apply_backward 1 (reads grad_y and x, writes grad_x, sums grad_mc and
// grad_ms in the same pass).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <tuple>

#include "attnkernels/bam.h"
#include "attnkernels/cuda_reduce.cuh"
#include "attnkernels/cuda_utils.cuh"

namespace attnkernels {
namespace {

using cuda::NoState;
using cuda::OpBase;

// y = x * (1 + sig), sig = sigmoid(mc[n,c] + ms[n,0,p]). ChanCtx mc[n,c], PixCtx ms[n,0,p].
template <typename scalar_t>
struct BamApply : OpBase<scalar_t> {
  using acc_t = at::opmath_type<scalar_t>;
  using ChanCtx = acc_t;
  using PixCtx = acc_t;
  static constexpr bool kWrites = true;

  const acc_t* mc;
  const acc_t* ms;
  int64_t hw;

  __device__ ChanCtx chan(int64_t nc) const { return mc[nc]; }
  __device__ PixCtx pix(int64_t n, int64_t p) const { return ms[n * hw + p]; }
  __device__ acc_t visit(acc_t mc_nc, acc_t ms_np, acc_t, acc_t x, NoState&, NoState&) const {
    return x * (acc_t(1) + cuda::sigmoid(mc_nc + ms_np));
  }
};

// grad_x = grad_y * (1 + sig); dz = (grad_y * x) * (sig * (1 - sig));
// grad_mc[n,c] = sum_p dz (ChanState), grad_ms[n,0,p] = sum_c dz (PixState).
template <typename scalar_t>
struct BamApplyBackward : OpBase<scalar_t> {
  using acc_t = at::opmath_type<scalar_t>;
  using ChanCtx = acc_t;
  using PixCtx = acc_t;
  using ChanState = acc_t;
  using PixState = acc_t;
  static constexpr bool kGradY = true;
  static constexpr bool kWrites = true;

  const acc_t* mc;
  const acc_t* ms;
  acc_t* grad_mc;
  acc_t* grad_ms;
  int64_t hw;

  __device__ ChanCtx chan(int64_t nc) const { return mc[nc]; }
  __device__ PixCtx pix(int64_t n, int64_t p) const { return ms[n * hw + p]; }
  __device__ static acc_t chan_init() { return acc_t(0); }
  __device__ static acc_t chan_combine(acc_t a, acc_t b) { return a + b; }
  __device__ static acc_t pix_init() { return acc_t(0); }
  __device__ static acc_t pix_combine(acc_t a, acc_t b) { return a + b; }
  __device__ acc_t visit(acc_t mc_nc, acc_t ms_np, acc_t grad_y, acc_t x, acc_t& sum_c, acc_t& sum_p) const {
    const acc_t sig = cuda::sigmoid(mc_nc + ms_np);
    const acc_t dz = (grad_y * x) * (sig * (acc_t(1) - sig));
    sum_c += dz;  // PixState: grad_ms, over the channels of this pixel
    sum_p += dz;  // ChanState: grad_mc, over the pixels of this (n, c)
    return grad_y * (acc_t(1) + sig);
  }
  __device__ void pix_finish(int64_t n, int64_t p, acc_t s) const { grad_ms[n * hw + p] = s; }
  __device__ void chan_finish(int64_t nc, acc_t s) const { grad_mc[nc] = s; }
};

at::Tensor bam_apply_cuda(const at::Tensor& x_in, const at::Tensor& mc_in, const at::Tensor& ms_in) {
  constexpr const char* op = "bam_apply";
  cuda::check_cuda_x(x_in, op);
  check_bam_apply_args(x_in, mc_in, ms_in, op);
  c10::cuda::CUDAGuard device_guard(x_in.device());
  const at::Tensor x = dense(x_in);
  at::Tensor y = empty_like_layout(x);
  if (x.numel() == 0) return y;
  const at::Tensor mc = mc_in.contiguous(), ms = ms_in.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "bam_apply_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const BamApply<scalar_t> apply{{}, mc.data_ptr<acc_t>(), ms.data_ptr<acc_t>(), x.size(2) * x.size(3)};
    cuda::walk(apply, x, at::Tensor(), y);
  });
  return y;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> bam_apply_backward_cuda(const at::Tensor& grad_y_in,
                                                                       const at::Tensor& x_in,
                                                                       const at::Tensor& mc_in,
                                                                       const at::Tensor& ms_in) {
  constexpr const char* op = "bam_apply_backward";
  cuda::check_cuda_x(x_in, op);
  check_bam_apply_args(x_in, mc_in, ms_in, op);
  cuda::check_like_x(grad_y_in, x_in, op, "grad_y");
  c10::cuda::CUDAGuard device_guard(x_in.device());
  const at::Tensor x = dense(x_in);
  // grad_y in x's layout (a copy only if it differs), so one offset serves both.
  const at::Tensor grad_y = grad_y_in.contiguous(memory_format_of(layout_of(x)));
  at::Tensor grad_x = empty_like_layout(x);
  at::Tensor grad_mc = at::empty({x.size(0), x.size(1)}, acc_options(x));
  at::Tensor grad_ms = cuda::pixel_map(x, 1);
  if (x.numel() == 0) {  // empty sums
    grad_mc.zero_();
    grad_ms.zero_();
    return {grad_x, grad_mc, grad_ms};
  }
  const at::Tensor mc = mc_in.contiguous(), ms = ms_in.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "bam_apply_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const BamApplyBackward<scalar_t> backward{{},
                                              mc.data_ptr<acc_t>(),
                                              ms.data_ptr<acc_t>(),
                                              grad_mc.data_ptr<acc_t>(),
                                              grad_ms.data_ptr<acc_t>(),
                                              x.size(2) * x.size(3)};
    cuda::walk(backward, x, grad_y, grad_x);
  });
  return {grad_x, grad_mc, grad_ms};
}

}  // namespace
}  // namespace attnkernels

TORCH_LIBRARY_IMPL(attnkernels, CUDA, m) {
  m.impl("bam_apply", &attnkernels::bam_apply_cuda);
  m.impl("bam_apply_backward", &attnkernels::bam_apply_backward_cuda);
}
