// cbam_spatial hot path, CUDA: CBAM's spatial pooling and apply given the channel gate, and their
// backwards. The math of each op is in the header comment of csrc/cbam_spatial_ops.cpp.
//
// The kernels are ham_spatial's (attnkernels/cuda_spatial_pool.cuh) with kOneGroup = true:
// G1 = F = x * gate over all C channels, no mask, no second group. Each pass is one walk of
// cuda_reduce.cuh over x (one kernel per layout, NCHW or channels_last, 64-bit offsets) plus, where
// the launch splits a sum, a combine kernel adding the partials in a fixed order: no float
// atomics, bitwise deterministic run to run.
//
// Passes over x: pool 1, pool_backward 2 (tie counts, then grad_x and grad_gate), apply 1,
// apply_backward 1 (reads grad_y and x, writes grad_x, sums grad_gate and grad_s in the same pass).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cmath>
#include <tuple>

#include "attnkernels/cbam_spatial.h"
#include "attnkernels/cuda_spatial_pool.cuh"
#include "attnkernels/cuda_utils.cuh"

namespace attnkernels {
namespace {

// cuda_spatial_pool.cuh's one-group passes; they take undefined tensors (at::Tensor()) for the
// group-2 maps (mask, d2, grad_d2, s2), which they never touch, and return undefined ones.
constexpr bool kOneGroup = true;

at::Tensor cbam_spatial_pool_cuda(const at::Tensor& x_in, const at::Tensor& gate_in) {
  constexpr const char* op = "cbam_spatial_pool";
  cuda::check_cuda_x(x_in, op);
  check_cbam_spatial_pool_args(x_in, gate_in, op);
  c10::cuda::CUDAGuard device_guard(x_in.device());
  const at::Tensor x = dense(x_in);
  at::Tensor d = cuda::pixel_map(x, 2);
  if (x.numel() == 0) {
    // C == 0 (else d is empty too): an empty sum over C divided by C = 0, and the max's identity.
    d.select(1, 0).fill_(NAN);
    d.select(1, 1).fill_(-INFINITY);
    return d;
  }
  cuda::spatial_pool<kOneGroup>(x, gate_in.contiguous(), at::Tensor(), d, at::Tensor(), x.size(1), 1);
  return d;
}

std::tuple<at::Tensor, at::Tensor> cbam_spatial_pool_backward_cuda(const at::Tensor& grad_d_in,
                                                                   const at::Tensor& x_in,
                                                                   const at::Tensor& gate_in,
                                                                   const at::Tensor& d_in) {
  constexpr const char* op = "cbam_spatial_pool_backward";
  cuda::check_cuda_x(x_in, op);
  check_cbam_spatial_pool_backward_args(grad_d_in, x_in, gate_in, d_in, op);
  c10::cuda::CUDAGuard device_guard(x_in.device());
  const at::Tensor x = dense(x_in);
  return cuda::spatial_pool_backward<kOneGroup>(grad_d_in.contiguous(), at::Tensor(), x, gate_in.contiguous(),
                                                at::Tensor(), d_in.contiguous(), at::Tensor(), x.size(1), 1);
}

at::Tensor cbam_spatial_apply_cuda(const at::Tensor& x_in, const at::Tensor& gate_in, const at::Tensor& s_in) {
  constexpr const char* op = "cbam_spatial_apply";
  cuda::check_cuda_x(x_in, op);
  check_cbam_spatial_apply_args(x_in, gate_in, s_in, op);
  c10::cuda::CUDAGuard device_guard(x_in.device());
  return cuda::spatial_apply<kOneGroup>(dense(x_in), gate_in.contiguous(), at::Tensor(), s_in.contiguous(),
                                        at::Tensor());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> cbam_spatial_apply_backward_cuda(const at::Tensor& grad_y_in,
                                                                                const at::Tensor& x_in,
                                                                                const at::Tensor& gate_in,
                                                                                const at::Tensor& s_in) {
  constexpr const char* op = "cbam_spatial_apply_backward";
  cuda::check_cuda_x(x_in, op);
  check_cbam_spatial_apply_args(x_in, gate_in, s_in, op);
  cuda::check_like_x(grad_y_in, x_in, op, "grad_y");
  c10::cuda::CUDAGuard device_guard(x_in.device());
  const at::Tensor x = dense(x_in);
  // grad_y in x's layout (a copy only if it differs).
  const at::Tensor grad_y = grad_y_in.contiguous(memory_format_of(layout_of(x)));
  auto [grad_x, grad_gate, grad_s, unused] =
      cuda::spatial_apply_backward<kOneGroup>(grad_y, x, gate_in.contiguous(), at::Tensor(), s_in.contiguous(),
                                              at::Tensor());
  return {grad_x, grad_gate, grad_s};
}

}  // namespace
}  // namespace attnkernels

TORCH_LIBRARY_IMPL(attnkernels, CUDA, m) {
  m.impl("cbam_spatial_pool", &attnkernels::cbam_spatial_pool_cuda);
  m.impl("cbam_spatial_pool_backward", &attnkernels::cbam_spatial_pool_backward_cuda);
  m.impl("cbam_spatial_apply", &attnkernels::cbam_spatial_apply_cuda);
  m.impl("cbam_spatial_apply_backward", &attnkernels::cbam_spatial_apply_backward_cuda);
}
