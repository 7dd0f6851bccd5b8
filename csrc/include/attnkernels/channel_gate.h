// Argument checks of the channel_gate hot path (csrc/channel_gate_ops.cpp: schemas and math):
// the gate's pooling mode, channel_gate's arguments and SE's MLP (channel_mlp_attention).
#pragma once

#include "attnkernels/common.h"

namespace attnkernels {

// channel_gate's pooling mode, the schema's `int mode` (docs/contract.md HAM:
// mix is f = 0.5*(avg + max) + alpha*avg + beta*max).
enum class GateMode : int64_t { Avg = 0, Max = 1, Mix = 2 };

// The schema's int mode as a GateMode: the one place an int becomes a mode (ValueError otherwise).
inline GateMode gate_mode(int64_t mode, const char* op) {
  AK_CHECK_VALUE(mode == static_cast<int64_t>(GateMode::Avg) || mode == static_cast<int64_t>(GateMode::Max) ||
                        mode == static_cast<int64_t>(GateMode::Mix),
                    op, ": mode must be 0 (avg), 1 (max) or 2 (mix), got ", mode);
  return static_cast<GateMode>(mode);
}

// The gate's parameters (channel_gate, channel_attention): k odd taps, and for the mix alpha and beta,
// one value each of any shape (0-d or (1,): autograd returns each gradient in its own shape); all
// floating and on `device`.
inline void check_gate_params(const at::Tensor& weight, const c10::optional<at::Tensor>& alpha,
                              const c10::optional<at::Tensor>& beta, GateMode mode, const at::Device& device,
                              const char* op) {
  check_floating(weight, op, "weight");
  AK_CHECK_VALUE(weight.numel() % 2 == 1, op, ": weight must hold an odd number of taps, got ",
              weight.numel());
  check_device(weight, device, op, "weight");
  if (mode != GateMode::Mix) return;
  AK_CHECK_VALUE(alpha.has_value() && beta.has_value(), op, ": mode 2 (mix) needs alpha and beta");
  check_floating(*alpha, op, "alpha");
  check_floating(*beta, op, "beta");
  AK_CHECK_VALUE(alpha->numel() == 1 && beta->numel() == 1, op, ": alpha and beta must hold one value each");
  check_device(*alpha, device, op, "alpha");
  check_device(*beta, device, op, "beta");
}

// channel_gate's and channel_gate_backward's gate arguments; returns the checked mode.
inline GateMode check_gate_args(const at::Tensor& avg, const at::Tensor& max, const at::Tensor& weight,
                                const c10::optional<at::Tensor>& alpha, const c10::optional<at::Tensor>& beta,
                                int64_t mode, const char* op) {
  const GateMode checked = gate_mode(mode, op);
  AK_CHECK_VALUE(avg.dim() == 2, op, ": avg must be (N, C), got ", avg.sizes());
  AK_CHECK_VALUE(max.sizes() == avg.sizes() && max.scalar_type() == avg.scalar_type(), op,
              ": max must match avg's shape ", avg.sizes(), " and dtype ", avg.scalar_type(),
              ", got ", max.sizes(), " ", max.scalar_type());
  AK_CHECK_TYPE(avg.scalar_type() == at::kFloat || avg.scalar_type() == at::kDouble, op,
              ": avg must be float32 or float64 (an accumulation dtype), got ", avg.scalar_type());
  check_device(max, avg.device(), op, "max");
  check_gate_params(weight, alpha, beta, checked, avg.device(), op);
  return checked;
}

// channel_gate_backward's grad_gate and gate: avg's shape and dtype, on avg's device.
inline void check_gate_grads(const at::Tensor& grad_gate, const at::Tensor& gate, const at::Tensor& avg,
                             const char* op) {
  AK_CHECK_VALUE(grad_gate.sizes() == avg.sizes() && gate.sizes() == avg.sizes() &&
                        grad_gate.scalar_type() == avg.scalar_type() && gate.scalar_type() == avg.scalar_type(),
                    op, ": grad_gate and gate must match avg's shape ", avg.sizes(), " and dtype ", avg.scalar_type());
  check_device(grad_gate, avg.device(), op, "grad_gate");
  check_device(gate, avg.device(), op, "gate");
}

// channel_mlp_attention's b1: rd values shared by every sample, or (N, rd), one row per sample
// (Bridge's bridge terms); floating, on x's device. Returns whether it is per sample.
inline bool check_mlp_b1(const at::Tensor& b1, const at::Tensor& x, int64_t rd, const char* op) {
  check_floating(b1, op, "b1");
  const int64_t N = x.size(0);
  const bool per_sample = b1.numel() != rd;
  AK_CHECK_VALUE(!per_sample || (b1.dim() == 2 && b1.size(0) == N && b1.size(1) == rd), op,
                    ": b1 must hold rd = ", rd, " values or be (N, rd) = (", N, ", ", rd, "), got shape ", b1.sizes());
  check_device(b1, x.device(), op, "b1");
  return per_sample;
}

// SE's MLP gate (channel_mlp_attention): w1 holds rd*C values with rd = w1.size(0), w2 C*rd,
// the optional biases rd (b1: or (N, rd)) and C values, all floating and on x's device.
inline void check_mlp_args(const at::Tensor& x, const at::Tensor& w1, const c10::optional<at::Tensor>& b1,
                           const at::Tensor& w2, const c10::optional<at::Tensor>& b2, const char* op) {
  check_feature_map(x, op, "x");
  check_floating(w1, op, "w1");
  check_floating(w2, op, "w2");
  const int64_t C = x.size(1);
  AK_CHECK_VALUE(w1.dim() >= 1 && w1.size(0) > 0 && w1.numel() == w1.size(0) * C, op,
              ": w1 must hold (rd, C) = (rd, ", C, ") values, got shape ", w1.sizes());
  const int64_t rd = w1.size(0);
  AK_CHECK_VALUE(w2.dim() >= 1 && w2.size(0) == C && w2.numel() == C * rd, op, ": w2 must hold (C, rd) = (",
              C, ", ", rd, ") values, got shape ", w2.sizes());
  if (b1.has_value()) check_mlp_b1(*b1, x, rd, op);
  if (b2.has_value()) check_vector(*b2, C, x.device(), op, "b2", "C");
  check_device(w1, x.device(), op, "w1");
  check_device(w2, x.device(), op, "w2");
}

}  // namespace attnkernels
