// Host-side helpers every kernel file shares: argument checks, layouts, accumulation types.
// Checks raise c10::ValueError / c10::TypeError, which Python sees as ValueError / TypeError.
#pragma once

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <c10/core/impl/LocalDispatchKeySet.h>

#include <utility>

namespace attnkernels {

// acc(x) of SPEC.md: float64 for float64 inputs, float32 for every other floating dtype.
// Device code uses at::opmath_type<scalar_t>, which is the same mapping.
inline at::ScalarType acc_type(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

// Inside a CPU kernel's parallel region, ATen calls on tiles (BLAS products on views) run below
// autograd: the kernel's inputs may require grad, and no graph may be recorded from worker threads.
struct BelowAutograd {
  at::AutoDispatchBelowADInplaceOrView guard;
};

// How a kernel walks an (N, C, H, W) tensor: NCHW planes of H*W, or channels_last rows of C.
enum class Layout { NCHW, ChannelsLast };

// channels_last when x is channels_last-dense and not also NCHW-dense (C == 1 or H*W == 1
// make both true, and NCHW is then the natural walk).
inline Layout layout_of(const at::Tensor& x) {
  if (!x.is_contiguous() && x.is_contiguous(at::MemoryFormat::ChannelsLast)) {
    return Layout::ChannelsLast;
  }
  return Layout::NCHW;
}

inline at::MemoryFormat memory_format_of(Layout layout) {
  return layout == Layout::ChannelsLast ? at::MemoryFormat::ChannelsLast
                                        : at::MemoryFormat::Contiguous;
}

// x itself when it is NCHW- or channels_last-dense; otherwise (a sliced view) a dense copy,
// the one case where a kernel copies its input.
inline at::Tensor dense(const at::Tensor& x) {
  if (x.is_contiguous() || x.is_contiguous(at::MemoryFormat::ChannelsLast)) {
    return x;
  }
  return x.contiguous();
}

// An empty tensor shaped like dense x, in x's layout (and x's dtype unless one is given).
inline at::Tensor empty_like_layout(const at::Tensor& x) {
  return at::empty_like(x, x.options(), memory_format_of(layout_of(x)));
}
inline at::Tensor empty_like_layout(const at::Tensor& x, at::ScalarType dtype) {
  return at::empty_like(x, x.options().dtype(dtype), memory_format_of(layout_of(x)));
}

inline void check_feature_map(const at::Tensor& x, const char* op, const char* name) {
  TORCH_CHECK_VALUE(x.dim() == 4, op, ": ", name, " must be 4-D (N, C, H, W), got ", x.dim(), "-D");
  TORCH_CHECK_TYPE(at::isFloatingType(x.scalar_type()), op, ": ", name,
              " must be a floating-point tensor, got ", x.scalar_type());
}

// A per-(n, c) map such as avg, max, gate or their gradients: (N, C), acc(x), on x's device.
inline void check_per_channel(const at::Tensor& t, const at::Tensor& x, const char* op,
                              const char* name) {
  TORCH_CHECK_VALUE(t.dim() == 2 && t.size(0) == x.size(0) && t.size(1) == x.size(1), op, ": ", name,
              " must have shape (N, C) = (", x.size(0), ", ", x.size(1), "), got ", t.sizes());
  TORCH_CHECK_TYPE(t.scalar_type() == acc_type(x.scalar_type()), op, ": ", name, " must be ",
              acc_type(x.scalar_type()), " (the accumulation dtype of x, ", x.scalar_type(),
              "), got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.device() == x.device(), op, ": ", name, " must be on ", x.device(), ", got ",
              t.device());
}

// A tensor shaped like x (grad_y of a backward op): x's shape and dtype.
inline void check_like_x(const at::Tensor& t, const at::Tensor& x, const char* op, const char* name) {
  TORCH_CHECK_VALUE(t.sizes() == x.sizes() && t.scalar_type() == x.scalar_type(), op, ": ", name,
                    " must match x's shape ", x.sizes(), " and dtype ", x.scalar_type(), ", got ", t.sizes(), " ",
                    t.scalar_type());
}

// check_like_x, then t in dense x's layout, so one index walks both.
inline at::Tensor walked_like_x(const at::Tensor& t, const at::Tensor& x, const char* op, const char* name) {
  check_like_x(t, x, op, name);
  return t.contiguous(memory_format_of(layout_of(x)));
}

// An (N, k, H, W) per-pixel map in acc(x) on x's device: d1, d2 (k = 2) or s1, s2 (k = 1).
inline void check_pixel_map(const at::Tensor& t, const at::Tensor& x, int64_t k, const char* op,
                            const char* name) {
  TORCH_CHECK_VALUE(t.dim() == 4 && t.size(0) == x.size(0) && t.size(1) == k && t.size(2) == x.size(2) &&
                        t.size(3) == x.size(3),
                    op, ": ", name, " must have shape (N, ", k, ", H, W) = (", x.size(0), ", ", k, ", ",
                    x.size(2), ", ", x.size(3), "), got ", t.sizes());
  TORCH_CHECK_TYPE(t.scalar_type() == acc_type(x.scalar_type()), op, ": ", name, " must be ",
                   acc_type(x.scalar_type()), " (the accumulation dtype of x, ", x.scalar_type(), "), got ",
                   t.scalar_type());
  TORCH_CHECK_VALUE(t.device() == x.device(), op, ": ", name, " must be on ", x.device(), ", got ", t.device());
}

// HAM's important-channel count C_im, 1 <= c_im <= C.
inline void check_c_im(int64_t c_im, int64_t C, const char* op) {
  TORCH_CHECK_VALUE(c_im >= 1 && c_im <= C, op, ": c_im must be in [1, C] = [1, ", C, "], got ", c_im);
}

// channel_gate's pooling mix (SPEC HAM: f = 0.5*(a + m) + alpha*a + beta*m).
enum GateMode : int64_t { kAvg = 0, kMax = 1, kMix = 2 };

inline void check_gate_args(const at::Tensor& avg, const at::Tensor& max, const at::Tensor& weight,
                            const c10::optional<at::Tensor>& alpha,
                            const c10::optional<at::Tensor>& beta, int64_t mode, const char* op) {
  TORCH_CHECK_VALUE(mode == kAvg || mode == kMax || mode == kMix, op,
              ": mode must be 0 (avg), 1 (max) or 2 (avg+max mix), got ", mode);
  TORCH_CHECK_VALUE(avg.dim() == 2, op, ": avg must be (N, C), got ", avg.sizes());
  TORCH_CHECK_VALUE(max.sizes() == avg.sizes() && max.scalar_type() == avg.scalar_type(), op,
              ": max must match avg's shape ", avg.sizes(), " and dtype ", avg.scalar_type(),
              ", got ", max.sizes(), " ", max.scalar_type());
  TORCH_CHECK_TYPE(avg.scalar_type() == at::kFloat || avg.scalar_type() == at::kDouble, op,
              ": avg must be float32 or float64 (an accumulation dtype), got ", avg.scalar_type());
  TORCH_CHECK_VALUE(weight.numel() % 2 == 1, op, ": weight must hold an odd number of taps, got ",
              weight.numel());
  TORCH_CHECK_VALUE(weight.device() == avg.device(), op, ": weight must be on ", avg.device());
  if (mode == kMix) {
    TORCH_CHECK_VALUE(alpha.has_value() && beta.has_value(), op, ": mode 2 needs alpha and beta");
    TORCH_CHECK_VALUE(alpha->numel() == 1 && beta->numel() == 1, op,
                ": alpha and beta must hold one value each");
  }
}

// SE's MLP gate (channel_mlp_attention): w1 holds rd*C values with rd = w1.size(0), w2 C*rd,
// the optional biases rd and C values, all floating and on x's device.
inline void check_mlp_args(const at::Tensor& x, const at::Tensor& w1, const c10::optional<at::Tensor>& b1,
                           const at::Tensor& w2, const c10::optional<at::Tensor>& b2, const char* op) {
  check_feature_map(x, op, "x");
  const int64_t C = x.size(1);
  TORCH_CHECK_VALUE(w1.dim() >= 1 && w1.size(0) > 0 && w1.numel() == w1.size(0) * C, op,
              ": w1 must hold (rd, C) = (rd, ", C, ") values, got shape ", w1.sizes());
  const int64_t rd = w1.size(0);
  TORCH_CHECK_VALUE(w2.dim() >= 1 && w2.size(0) == C && w2.numel() == C * rd, op, ": w2 must hold (C, rd) = (",
              C, ", ", rd, ") values, got shape ", w2.sizes());
  TORCH_CHECK_VALUE(!b1.has_value() || b1->numel() == rd, op, ": b1 must hold rd = ", rd, " values");
  TORCH_CHECK_VALUE(!b2.has_value() || b2->numel() == C, op, ": b2 must hold C = ", C, " values");
  for (const at::Tensor* t : {&w1, &w2, b1.has_value() ? &*b1 : &w1, b2.has_value() ? &*b2 : &w2}) {
    TORCH_CHECK_TYPE(at::isFloatingType(t->scalar_type()), op, ": the MLP weights must be floating, got ",
                t->scalar_type());
    TORCH_CHECK_VALUE(t->device() == x.device(), op, ": the MLP weights must be on ", x.device(), ", got ",
                t->device());
  }
}

// nonlocal_attn's inputs: q, k (N, D_qk, H, W) and v, x (N, D_v, H, W), one floating dtype on
// one device, gamma one floating value on that device.
inline void check_nonlocal_args(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                const at::Tensor& x, const at::Tensor& gamma, const char* op) {
  check_feature_map(x, op, "x");
  const int64_t N = x.size(0), D_v = x.size(1), H = x.size(2), W = x.size(3);
  TORCH_CHECK_VALUE(q.dim() == 4 && q.size(0) == N && q.size(1) >= 1 && q.size(2) == H && q.size(3) == W, op,
                    ": q must have shape (N, D_qk, H, W) = (", N, ", D_qk, ", H, ", ", W, "), got ", q.sizes());
  TORCH_CHECK_VALUE(k.sizes() == q.sizes(), op, ": k must have q's shape (N, D_qk, H, W) = ", q.sizes(), ", got ",
                    k.sizes());
  TORCH_CHECK_VALUE(v.sizes() == x.sizes(), op, ": v must have x's shape (N, D_v, H, W) = ", x.sizes(), ", got ",
                    v.sizes());
  for (const auto& [name, t] : {std::pair<const char*, const at::Tensor*>{"q", &q}, {"k", &k}, {"v", &v}}) {
    TORCH_CHECK_TYPE(t->scalar_type() == x.scalar_type(), op, ": ", name, " must have x's dtype ",
                     x.scalar_type(), ", got ", t->scalar_type());
    TORCH_CHECK_VALUE(t->device() == x.device(), op, ": ", name, " must be on ", x.device(), ", got ", t->device());
  }
  TORCH_CHECK_VALUE(gamma.numel() == 1, op, ": gamma must hold one value, got shape ", gamma.sizes());
  TORCH_CHECK_TYPE(at::isFloatingType(gamma.scalar_type()), op, ": gamma must be floating, got ",
                   gamma.scalar_type());
  TORCH_CHECK_VALUE(gamma.device() == x.device(), op, ": gamma must be on ", x.device(), ", got ", gamma.device());
}

// nonlocal_attn's lse: (N, H*W) in acc(x), on x's device.
inline void check_row_stats(const at::Tensor& lse, const at::Tensor& x, const char* op) {
  const int64_t HW = x.size(2) * x.size(3);
  TORCH_CHECK_VALUE(lse.dim() == 2 && lse.size(0) == x.size(0) && lse.size(1) == HW, op,
                    ": lse must have shape (N, H*W) = (", x.size(0), ", ", HW, "), got ", lse.sizes());
  TORCH_CHECK_TYPE(lse.scalar_type() == acc_type(x.scalar_type()), op, ": lse must be ", acc_type(x.scalar_type()),
                   " (the accumulation dtype of x, ", x.scalar_type(), "), got ", lse.scalar_type());
  TORCH_CHECK_VALUE(lse.device() == x.device(), op, ": lse must be on ", x.device(), ", got ", lse.device());
}

// A small parameter vector (bias, BN scale/shift, statistics): `count` floating values on `device`.
inline void check_vector(const at::Tensor& t, int64_t count, const at::Device& device, const char* op,
                         const char* name, const char* what) {
  TORCH_CHECK_VALUE(t.numel() == count, op, ": ", name, " must hold ", what, " = ", count, " values, got shape ",
                    t.sizes());
  TORCH_CHECK_TYPE(at::isFloatingType(t.scalar_type()), op, ": ", name, " must be floating, got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.device() == device, op, ": ", name, " must be on ", device, ", got ", t.device());
}

// gam_channel's inputs: x (N, C, H, W); w1 (rd, C), b1 rd, w2 (C, rd), b2 C values (nn.Linear weights).
inline void check_gam_channel_args(const at::Tensor& x, const at::Tensor& w1, const at::Tensor& b1,
                                   const at::Tensor& w2, const at::Tensor& b2, const char* op) {
  check_feature_map(x, op, "x");
  const int64_t C = x.size(1);
  TORCH_CHECK_VALUE(w1.dim() == 2 && w1.size(0) >= 1 && w1.size(1) == C, op, ": w1 must have shape (rd, C) = (rd, ",
                    C, "), got ", w1.sizes());
  const int64_t rd = w1.size(0);
  TORCH_CHECK_VALUE(w2.dim() == 2 && w2.size(0) == C && w2.size(1) == rd, op, ": w2 must have shape (C, rd) = (", C,
                    ", ", rd, "), got ", w2.sizes());
  check_vector(w1, rd * C, x.device(), op, "w1", "rd * C");
  check_vector(w2, C * rd, x.device(), op, "w2", "C * rd");
  check_vector(b1, rd, x.device(), op, "b1", "rd");
  check_vector(b2, C, x.device(), op, "b2", "C");
}

// shuffle_conv's input and conv: s (N, C_in, H, W); weight (C_out, C_in/groups, k, k), k odd; groups divides
// C_in and C_out; shuffle_groups divides C_in; bias C_out values; in_scale/in_shift both or neither, C_in values.
inline void check_shuffle_conv_args(const at::Tensor& s, const at::Tensor& weight, int64_t groups,
                                    int64_t shuffle_groups, const c10::optional<at::Tensor>& in_scale,
                                    const c10::optional<at::Tensor>& in_shift, const char* op) {
  check_feature_map(s, op, "s");
  const int64_t C_in = s.size(1);
  TORCH_CHECK_VALUE(groups >= 1 && C_in % groups == 0, op, ": groups must be a positive divisor of s's ", C_in,
                    " channels, got ", groups);
  TORCH_CHECK_VALUE(shuffle_groups >= 1 && C_in % shuffle_groups == 0, op,
                    ": shuffle_groups must be a positive divisor of s's ", C_in, " channels, got ", shuffle_groups);
  TORCH_CHECK_VALUE(weight.dim() == 4 && weight.size(0) >= 1 && weight.size(0) % groups == 0 &&
                        weight.size(1) == C_in / groups && weight.size(2) == weight.size(3) && weight.size(2) % 2 == 1,
                    op, ": weight must have shape (C_out, C_in / groups, k, k) = (C_out, ", C_in / groups,
                    ", k, k) with k odd and groups = ", groups, " dividing C_out, got ", weight.sizes());
  TORCH_CHECK_TYPE(at::isFloatingType(weight.scalar_type()), op, ": weight must be floating, got ",
                   weight.scalar_type());
  TORCH_CHECK_VALUE(weight.device() == s.device(), op, ": weight must be on ", s.device(), ", got ", weight.device());
  TORCH_CHECK_VALUE(in_scale.has_value() == in_shift.has_value(), op,
                    ": in_scale and in_shift must be given together (the folded BatchNorm before the ReLU)");
  if (in_scale.has_value()) {
    check_vector(*in_scale, C_in, s.device(), op, "in_scale", "C_in");
    check_vector(*in_shift, C_in, s.device(), op, "in_shift", "C_in");
  }
}

// shuffle_conv's epilogue inputs: gate_x (N, C_out, H, W) floating on the device; out_scale, out_shift C_out values.
inline void check_epilogue_args(const at::Tensor& gate_x, const at::Tensor& out_scale, const at::Tensor& out_shift,
                                at::IntArrayRef out_sizes, const at::Device& device, const char* op) {
  TORCH_CHECK_VALUE(gate_x.sizes() == out_sizes, op, ": gate_x must have the output's shape (N, C_out, H, W) = ",
                    out_sizes, ", got ", gate_x.sizes());
  TORCH_CHECK_TYPE(at::isFloatingType(gate_x.scalar_type()), op, ": gate_x must be floating, got ",
                   gate_x.scalar_type());
  TORCH_CHECK_VALUE(gate_x.device() == device, op, ": gate_x must be on ", device, ", got ", gate_x.device());
  check_vector(out_scale, out_sizes[1], device, op, "out_scale", "C_out");
  check_vector(out_shift, out_sizes[1], device, op, "out_shift", "C_out");
}

}  // namespace attnkernels
