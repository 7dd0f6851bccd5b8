// CPU kernels of the ham_spatial hot path; the math is in csrc/ham_spatial_ops.cpp.
//
// The pixel-block tasks and their block kernels (pool_block, pool_backward_block,
// apply_block with kOneGroup = false: two groups and the mask) are in
// attnkernels/cpu_spatial_pool.h, which cpu/cbam_spatial.cpp shares; this file adds the
// important-channel mask, the ops' entry points and the per-sample ham_attention.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <utility>
#include <vector>

#include "attnkernels/cpu_sample.h"
#include "attnkernels/cpu_spatial_pool.h"
#include "attnkernels/cpu_vec.h"
#include "attnkernels/ham_spatial.h"

namespace attnkernels {
namespace {

using namespace cpu_spatial;

// ---------------------------------------------------------------- the important-channel mask

// mask[c] = 1 iff fewer than c_im channels j rank before c (gate[j] > gate[c], or equal and
// j < c). Sorting (value descending, index ascending) gives every non-NaN channel its rank;
// a NaN never ranks before anything and nothing ranks before a NaN (every comparison with it
// is false), so a NaN channel has rank 0 and does not shift the others.
template <typename acc_t>
void important_channels(const acc_t* gate, int64_t C, int64_t c_im, acc_t* mask, std::vector<int64_t>& order) {
  order.clear();
  for (int64_t c = 0; c < C; ++c) {
    if (std::isnan(gate[c])) {
      mask[c] = acc_t(1);
    } else {
      order.push_back(c);
    }
  }
  std::sort(order.begin(), order.end(),
            [&](int64_t i, int64_t j) { return gate[i] > gate[j] || (gate[i] == gate[j] && i < j); });
  for (int64_t r = 0; r < static_cast<int64_t>(order.size()); ++r) mask[order[r]] = r < c_im ? acc_t(1) : acc_t(0);
}

// ---------------------------------------------------------------- ham_spatial_pool

std::tuple<at::Tensor, at::Tensor, at::Tensor> ham_spatial_pool_cpu(const at::Tensor& x_in, const at::Tensor& gate_in,
                                                                    int64_t c_im) {
  const char* op = "ham_spatial_pool";
  const at::Tensor x = checked_x(x_in, op);
  check_per_channel(gate_in, x, op, "gate");
  const int64_t N = x.size(0), C = x.size(1), hw = x.size(2) * x.size(3);
  check_c_im(c_im, C, op);
  const at::Tensor gate = gate_in.contiguous();
  auto opts = acc_options(x);
  at::Tensor d1 = at::empty({N, 2, x.size(2), x.size(3)}, opts), d2 = at::empty_like(d1);
  at::Tensor mask = at::empty({N, C}, opts);
  if (N * C == 0) return {d1, d2, mask};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "ham_spatial_pool_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const acc_t* g = gate.const_data_ptr<acc_t>();
    acc_t* mk = mask.data_ptr<acc_t>();
    at::parallel_for(0, N, 1, [&](int64_t begin, int64_t end) {
      std::vector<int64_t> order;
      for (int64_t n = begin; n < end; ++n) important_channels(g + n * C, C, c_im, mk + n * C, order);
    });
    if (hw == 0) return;
    const Views<scalar_t> v = views<scalar_t>(x, gate, mask);
    const acc_t div1 = static_cast<acc_t>(c_im), div2 = static_cast<acc_t>(std::max<int64_t>(C - c_im, 1));
    acc_t *o1 = d1.data_ptr<acc_t>(), *o2 = d2.data_ptr<acc_t>();
    for_pixel_blocks(N, hw, [&](int64_t n, int64_t, int64_t p0, int64_t p1) {
      // d[n, 0, p] and d[n, 1, p] are the rows the sums and maxima land in.
      acc_t *sum1 = o1 + n * 2 * hw + p0, *max1 = sum1 + hw, *sum2 = o2 + n * 2 * hw + p0, *max2 = sum2 + hw;
      pool_block<false>(v, n, p0, p1, sum1, max1, sum2, max2);
      for (int64_t i = 0; i < p1 - p0; ++i) {
        sum1[i] = sum1[i] / div1;
        sum2[i] = sum2[i] / div2;
      }
    });
  });
  return {d1, d2, mask};
}

// ---------------------------------------------------------------- ham_spatial_pool_backward

std::tuple<at::Tensor, at::Tensor> ham_spatial_pool_backward_cpu(const at::Tensor& grad_d1, const at::Tensor& grad_d2,
                                                                 const at::Tensor& x_in, const at::Tensor& gate_in,
                                                                 const at::Tensor& mask_in, const at::Tensor& d1_in,
                                                                 const at::Tensor& d2_in, int64_t c_im) {
  const char* op = "ham_spatial_pool_backward";
  const at::Tensor x = checked_x(x_in, op);
  check_per_channel(gate_in, x, op, "gate");
  check_per_channel(mask_in, x, op, "mask");
  check_pixel_map(grad_d1, x, 2, op, "grad_d1");
  check_pixel_map(grad_d2, x, 2, op, "grad_d2");
  check_pixel_map(d1_in, x, 2, op, "d1");
  check_pixel_map(d2_in, x, 2, op, "d2");
  const int64_t N = x.size(0), C = x.size(1), hw = x.size(2) * x.size(3);
  check_c_im(c_im, C, op);
  at::Tensor gx = empty_like_layout(x);
  at::Tensor partial = gate_partials(x, gate_in);
  if (x.numel() == 0) return {gx, at::zeros_like(gate_in, at::MemoryFormat::Contiguous)};
  const at::Tensor gate = gate_in.contiguous(), mask = mask_in.contiguous();
  const at::Tensor gd1 = grad_d1.contiguous(), gd2 = grad_d2.contiguous(), d1 = d1_in.contiguous(), d2 = d2_in.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "ham_spatial_pool_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const acc_t div1 = static_cast<acc_t>(c_im), div2 = static_cast<acc_t>(std::max<int64_t>(C - c_im, 1));
    const Views<scalar_t> v = views<scalar_t>(x, gate, mask);
    scalar_t* gxp = gx.data_ptr<scalar_t>();
    acc_t* part = partial.data_ptr<acc_t>();
    const int64_t blocks = pixel_blocks(hw);
    for_pixel_blocks(N, hw, [&](int64_t n, int64_t b, int64_t p0, int64_t p1) {
      pool_backward_block<false>(v, n, p0, p1, div1, div2, gd1.const_data_ptr<acc_t>(), gd2.const_data_ptr<acc_t>(),
                                 d1.const_data_ptr<acc_t>(), d2.const_data_ptr<acc_t>(), gxp,
                                 part + (n * blocks + b) * C);
    });
  });
  return {gx, sum_block_partials(partial)};
}

// ---------------------------------------------------------------- ham_spatial_apply (+ backward)

void check_apply_args(const at::Tensor& x, const at::Tensor& gate, const at::Tensor& mask, const at::Tensor& s1,
                      const at::Tensor& s2, const char* op) {
  check_per_channel(gate, x, op, "gate");
  check_per_channel(mask, x, op, "mask");
  check_pixel_map(s1, x, 1, op, "s1");
  check_pixel_map(s2, x, 1, op, "s2");
}

at::Tensor ham_spatial_apply_cpu(const at::Tensor& x_in, const at::Tensor& gate_in, const at::Tensor& mask_in,
                                 const at::Tensor& s1_in, const at::Tensor& s2_in) {
  const char* op = "ham_spatial_apply";
  const at::Tensor x = checked_x(x_in, op);
  check_apply_args(x, gate_in, mask_in, s1_in, s2_in, op);
  at::Tensor y = empty_like_layout(x);
  if (x.numel() == 0) return y;
  const at::Tensor gate = gate_in.contiguous(), mask = mask_in.contiguous(), s1 = s1_in.contiguous(),
                   s2 = s2_in.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "ham_spatial_apply_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const Views<scalar_t> v = views<scalar_t>(x, gate, mask);
    scalar_t* yp = y.data_ptr<scalar_t>();
    for_pixel_blocks(x.size(0), v.hw, [&](int64_t n, int64_t, int64_t p0, int64_t p1) {
      apply_block<false, scalar_t>(v, n, p0, p1, nullptr, s1.const_data_ptr<acc_t>() + n * v.hw,
                            s2.const_data_ptr<acc_t>() + n * v.hw, yp, nullptr, nullptr, nullptr);
    });
  });
  return y;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> ham_spatial_apply_backward_cpu(
    const at::Tensor& grad_y_in, const at::Tensor& x_in, const at::Tensor& gate_in, const at::Tensor& mask_in,
    const at::Tensor& s1_in, const at::Tensor& s2_in) {
  const char* op = "ham_spatial_apply_backward";
  const at::Tensor x = checked_x(x_in, op);
  check_apply_args(x, gate_in, mask_in, s1_in, s2_in, op);
  const at::Tensor gy = walked_like_x(grad_y_in, x, op, "grad_y");
  const int64_t N = x.size(0), C = x.size(1), hw = x.size(2) * x.size(3);
  at::Tensor gx = empty_like_layout(x);
  at::Tensor gs1 = at::zeros_like(s1_in, at::MemoryFormat::Contiguous), gs2 = at::zeros_like(gs1);
  at::Tensor partial = gate_partials(x, gate_in);
  if (x.numel() == 0) return {gx, at::zeros_like(gate_in, at::MemoryFormat::Contiguous), gs1, gs2};
  const at::Tensor gate = gate_in.contiguous(), mask = mask_in.contiguous(), s1 = s1_in.contiguous(),
                   s2 = s2_in.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "ham_spatial_apply_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const Views<scalar_t> v = views<scalar_t>(x, gate, mask);
    acc_t* part = partial.data_ptr<acc_t>();
    const int64_t blocks = pixel_blocks(hw);
    for_pixel_blocks(N, hw, [&](int64_t n, int64_t b, int64_t p0, int64_t p1) {
      apply_block<false, scalar_t>(v, n, p0, p1, gy.const_data_ptr<scalar_t>(), s1.const_data_ptr<acc_t>() + n * hw,
                            s2.const_data_ptr<acc_t>() + n * hw, gx.data_ptr<scalar_t>(), part + (n * blocks + b) * C,
                            gs1.data_ptr<acc_t>() + n * hw, gs2.data_ptr<acc_t>() + n * hw);
    });
  });
  return {gx, sum_block_partials(partial), gs1, gs2};
}

// ---------------------------------------------------------------- ham_attention (inference)

// The whole HAM forward for one sample while x[n] stays in cache: channel pooling, the mixed
// 1-D conv gate, the mask, the dual pooling, the two small-map convs with the folded BN,
// ReLU and sigmoid, and the apply. x crosses memory once instead of three times.
at::Tensor ham_attention_cpu(const at::Tensor& x_in, const at::Tensor& weight, const at::Tensor& alpha,
                             const at::Tensor& beta, int64_t c_im, const at::Tensor& spatial_weight,
                             const at::Tensor& bn_scale, const at::Tensor& bn_shift) {
  const char* op = "ham_attention";
  const at::Tensor x = checked_x(x_in, op);
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3), hw = H * W;
  check_c_im(c_im, C, op);
  AK_CHECK_VALUE(weight.numel() % 2 == 1, op, ": weight must hold an odd number of taps, got ", weight.numel());
  AK_CHECK_VALUE(alpha.numel() == 1 && beta.numel() == 1 && bn_scale.numel() == 1 && bn_shift.numel() == 1, op,
                    ": alpha, beta, bn_scale and bn_shift must hold one value each");
  AK_CHECK_VALUE(spatial_weight.dim() == 4 && spatial_weight.size(0) == 1 && spatial_weight.size(1) == 2 &&
                        spatial_weight.size(2) == spatial_weight.size(3) && spatial_weight.size(2) % 2 == 1,
                    op, ": spatial_weight must have shape (1, 2, k, k) with k odd, got ", spatial_weight.sizes());
  for (const auto& [name, t] : {std::pair<const char*, const at::Tensor*>{"weight", &weight}, {"alpha", &alpha},
                                {"beta", &beta}, {"spatial_weight", &spatial_weight}, {"bn_scale", &bn_scale},
                                {"bn_shift", &bn_shift}}) {
    check_floating(*t, op, name);
    check_device(*t, x.device(), op, name);
  }
  const at::ScalarType acc = acc_type(x.scalar_type());
  auto as_acc = [&](const at::Tensor& t) { return t.reshape(-1).to(acc).contiguous(); };
  const at::Tensor w = as_acc(weight), sw = as_acc(spatial_weight);
  at::Tensor gate = at::empty({N, C}, x.options().dtype(acc)), mask = at::empty_like(gate);
  at::Tensor y = empty_like_layout(x);
  if (x.numel() == 0) return y;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "ham_attention_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const acc_t a = alpha.item().to<acc_t>(), b = beta.item().to<acc_t>();
    const acc_t scale = bn_scale.item().to<acc_t>(), shift = bn_shift.item().to<acc_t>();
    const acc_t div1 = static_cast<acc_t>(c_im), div2 = static_cast<acc_t>(std::max<int64_t>(C - c_im, 1));
    const int64_t k = w.numel(), ks = spatial_weight.size(2);
    const Views<scalar_t> v = views<scalar_t>(x, gate, mask);
    acc_t *g = gate.data_ptr<acc_t>(), *mk = mask.data_ptr<acc_t>();
    scalar_t* yp = y.data_ptr<scalar_t>();
    at::parallel_for(0, N, 1, [&](int64_t begin, int64_t end) {
      std::vector<acc_t> avg(C), max(C), d(4 * hw), z(2 * hw);
      std::vector<int64_t> order;
      for (int64_t n = begin; n < end; ++n) {
        cpu_sample::channel_pool(v.x + n * C * hw, C, hw, v.channels_last, avg.data(), max.data());
        cpu_sample::mix_gate(avg.data(), max.data(), a, b, w.const_data_ptr<acc_t>(), k, C, g + n * C);
        important_channels(g + n * C, C, c_im, mk + n * C, order);
        // d holds [sum1, max1, sum2, max2]: d1 = (sum1 / c_im, max1), d2 = (sum2 / C_sub, max2).
        acc_t *sum1 = d.data(), *max1 = sum1 + hw, *sum2 = max1 + hw, *max2 = sum2 + hw;
        pool_block<false>(v, n, 0, hw, sum1, max1, sum2, max2);
        for (int64_t p = 0; p < hw; ++p) {
          sum1[p] /= div1;
          sum2[p] /= div2;
        }
        cpu_sample::spatial_conv(sum1, 2, H, W, sw.const_data_ptr<acc_t>(), ks, z.data());
        cpu_sample::spatial_conv(sum2, 2, H, W, sw.const_data_ptr<acc_t>(), ks, z.data() + hw);
        for (int64_t p = 0; p < 2 * hw; ++p) {  // s = sigmoid(relu(bn(z))), BN folded to an affine
          z[p] = sigmoid(relu(z[p] * scale + shift));
        }
        apply_block<false, scalar_t>(v, n, 0, hw, nullptr, z.data(), z.data() + hw, yp, nullptr, nullptr, nullptr);
      }
    });
  });
  return y;
}

}  // namespace

TORCH_LIBRARY_IMPL(attnkernels, CPU, m) {
  m.impl("ham_spatial_pool", &ham_spatial_pool_cpu);
  m.impl("ham_spatial_pool_backward", &ham_spatial_pool_backward_cpu);
  m.impl("ham_spatial_apply", &ham_spatial_apply_cpu);
  m.impl("ham_spatial_apply_backward", &ham_spatial_apply_backward_cpu);
  m.impl("ham_attention", &ham_attention_cpu);
}

}  // namespace attnkernels
