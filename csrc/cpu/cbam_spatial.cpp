// CPU kernels of the cbam_spatial hot path; the math is in csrc/cbam_spatial_ops.cpp.
//
// HAM's dual spatial pooling with one group and no mask: the block kernels of
// attnkernels/cpu_spatial_pool.h with kOneGroup = true (one task per sample and block of
// pixels, grad_gate from per-block partials summed in order: deterministic, no atomics).
#include <ATen/ATen.h>
#include <torch/library.h>

#include <cstdint>
#include <tuple>

#include "attnkernels/cbam_spatial.h"
#include "attnkernels/cpu_spatial_pool.h"

namespace attnkernels {
namespace {

using namespace cpu_spatial;

#define AK_DISPATCH_FEATURE(x, name, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, (x).scalar_type(), name, __VA_ARGS__)

// An (N, k, H, W) map of x in acc(x), NCHW-contiguous.
at::Tensor pixel_maps(const at::Tensor& x, int64_t k) {
  return at::empty({x.size(0), k, x.size(2), x.size(3)}, acc_options(x));
}

// ---------------------------------------------------------------- cbam_spatial_pool

// d[n, 0] = sum_c F / C, d[n, 1] = max_c F (NaN-propagating, as torch.amax).
at::Tensor cbam_spatial_pool_cpu(const at::Tensor& x_in, const at::Tensor& gate_in) {
  const char* op = "cbam_spatial_pool";
  const at::Tensor x = checked_x(x_in, op);
  check_cbam_spatial_pool_args(x, gate_in, op);
  at::Tensor d = pixel_maps(x, 2);
  const int64_t N = x.size(0), C = x.size(1), hw = x.size(2) * x.size(3);
  if (N * hw == 0) return d;
  const at::Tensor gate = gate_in.contiguous();
  AK_DISPATCH_FEATURE(x, "cbam_spatial_pool_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const Views<scalar_t> v = views<scalar_t>(x, gate);
    const acc_t div = static_cast<acc_t>(C);
    acc_t* out = d.data_ptr<acc_t>();
    for_pixel_blocks(N, hw, [&](int64_t n, int64_t, int64_t p0, int64_t p1) {
      acc_t *sum = out + n * 2 * hw + p0, *max = sum + hw;  // d[n, 0, p0:] and d[n, 1, p0:]
      pool_block<true>(v, n, p0, p1, sum, max, nullptr, nullptr);
      for (int64_t i = 0; i < p1 - p0; ++i) sum[i] = sum[i] / div;
    });
  });
  return d;
}

// ---------------------------------------------------------------- cbam_spatial_pool_backward

// dF = grad_d[n,0] / C + [F == d[n,1]] * (grad_d[n,1] / cnt); grad_x = dF * gate,
// grad_gate = sum_p dF * x.
std::tuple<at::Tensor, at::Tensor> cbam_spatial_pool_backward_cpu(const at::Tensor& grad_d_in, const at::Tensor& x_in,
                                                                  const at::Tensor& gate_in, const at::Tensor& d_in) {
  const char* op = "cbam_spatial_pool_backward";
  const at::Tensor x = checked_x(x_in, op);
  check_cbam_spatial_pool_backward_args(grad_d_in, x, gate_in, d_in, op);
  const int64_t N = x.size(0), C = x.size(1), hw = x.size(2) * x.size(3);
  at::Tensor gx = empty_like_layout(x);
  at::Tensor partial = gate_partials(x, gate_in);
  if (x.numel() == 0) return {gx, at::zeros_like(gate_in, at::MemoryFormat::Contiguous)};
  const at::Tensor gate = gate_in.contiguous(), grad_d = grad_d_in.contiguous(), d = d_in.contiguous();
  AK_DISPATCH_FEATURE(x, "cbam_spatial_pool_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const Views<scalar_t> v = views<scalar_t>(x, gate);
    const acc_t div = static_cast<acc_t>(C);
    scalar_t* gxp = gx.data_ptr<scalar_t>();
    acc_t* part = partial.data_ptr<acc_t>();
    const acc_t *gd = grad_d.const_data_ptr<acc_t>(), *dp = d.const_data_ptr<acc_t>();
    const int64_t blocks = pixel_blocks(hw);
    for_pixel_blocks(N, hw, [&](int64_t n, int64_t b, int64_t p0, int64_t p1) {
      pool_backward_block<true>(v, n, p0, p1, div, div, gd, nullptr, dp, nullptr, gxp, part + (n * blocks + b) * C);
    });
  });
  return {gx, sum_block_partials(partial)};
}

// ---------------------------------------------------------------- cbam_spatial_apply (+ backward)

// y = F * s, in x's dtype and layout; y streamed past the caches when x and y exceed them.
at::Tensor cbam_spatial_apply_cpu(const at::Tensor& x_in, const at::Tensor& gate_in, const at::Tensor& s_in) {
  const char* op = "cbam_spatial_apply";
  const at::Tensor x = checked_x(x_in, op);
  check_cbam_spatial_apply_args(x, gate_in, s_in, op);
  at::Tensor y = empty_like_layout(x);
  if (x.numel() == 0) return y;
  const at::Tensor gate = gate_in.contiguous(), s = s_in.contiguous();
  const bool stream = should_stream(2 * x.nbytes());  // reads x, writes y
  AK_DISPATCH_FEATURE(x, "cbam_spatial_apply_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const Views<scalar_t> v = views<scalar_t>(x, gate);
    scalar_t* yp = y.data_ptr<scalar_t>();
    const acc_t* sp = s.const_data_ptr<acc_t>();
    for_pixel_blocks(x.size(0), v.hw, [&](int64_t n, int64_t, int64_t p0, int64_t p1) {
      apply_block<true, scalar_t>(v, n, p0, p1, nullptr, sp + n * v.hw, nullptr, yp, nullptr, nullptr, nullptr,
                                  stream);
    });
  });
  return y;
}

// dF = grad_y * s; grad_x = dF * gate; grad_gate = sum_p dF * x; grad_s = sum_c grad_y * F.
std::tuple<at::Tensor, at::Tensor, at::Tensor> cbam_spatial_apply_backward_cpu(const at::Tensor& grad_y_in,
                                                                               const at::Tensor& x_in,
                                                                               const at::Tensor& gate_in,
                                                                               const at::Tensor& s_in) {
  const char* op = "cbam_spatial_apply_backward";
  const at::Tensor x = checked_x(x_in, op);
  check_cbam_spatial_apply_args(x, gate_in, s_in, op);
  const at::Tensor gy = walked_like_x(grad_y_in, x, op, "grad_y");
  const int64_t N = x.size(0), C = x.size(1), hw = x.size(2) * x.size(3);
  at::Tensor gx = empty_like_layout(x);
  at::Tensor gs = at::zeros_like(s_in, at::MemoryFormat::Contiguous);
  at::Tensor partial = gate_partials(x, gate_in);
  if (x.numel() == 0) return {gx, at::zeros_like(gate_in, at::MemoryFormat::Contiguous), gs};
  const at::Tensor gate = gate_in.contiguous(), s = s_in.contiguous();
  AK_DISPATCH_FEATURE(x, "cbam_spatial_apply_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const Views<scalar_t> v = views<scalar_t>(x, gate);
    acc_t* part = partial.data_ptr<acc_t>();
    const int64_t blocks = pixel_blocks(hw);
    for_pixel_blocks(N, hw, [&](int64_t n, int64_t b, int64_t p0, int64_t p1) {
      apply_block<true, scalar_t>(v, n, p0, p1, gy.const_data_ptr<scalar_t>(), s.const_data_ptr<acc_t>() + n * hw,
                                  nullptr, gx.data_ptr<scalar_t>(), part + (n * blocks + b) * C,
                                  gs.data_ptr<acc_t>() + n * hw, nullptr);
    });
  });
  return {gx, sum_block_partials(partial), gs};
}

#undef AK_DISPATCH_FEATURE

}  // namespace

TORCH_LIBRARY_IMPL(attnkernels, CPU, m) {
  m.impl("cbam_spatial_pool", &cbam_spatial_pool_cpu);
  m.impl("cbam_spatial_pool_backward", &cbam_spatial_pool_backward_cpu);
  m.impl("cbam_spatial_apply", &cbam_spatial_apply_cpu);
  m.impl("cbam_spatial_apply_backward", &cbam_spatial_apply_backward_cpu);
}

}  // namespace attnkernels
