// One sample's steps of the CPU kernels, for the ops that run a whole module per sample while
// x[n] stays in cache (ham_attention). Defined, and instantiated for every dtype, next to the
// kernels they come from.
#pragma once

#include <ATen/OpMathType.h>

#include <cstdint>

namespace attnkernels::cpu_sample {

// channel_gate.cpp: avg and max over H*W of x[n] ((C, H, W) in NCHW, or (H, W, C) channels_last).
template <typename scalar_t>
void channel_pool(const scalar_t* x_n, int64_t C, int64_t hw, bool channels_last, at::opmath_type<scalar_t>* avg,
                  at::opmath_type<scalar_t>* max);

// channel_gate.cpp: gate = sigmoid(conv1d_over_C(0.5*(avg + max) + alpha*avg + beta*max)), k taps.
template <typename acc_t>
void mix_gate(const acc_t* avg, const acc_t* max, acc_t alpha, acc_t beta, const acc_t* w, int64_t k, int64_t C,
              acc_t* gate);

// ham_spatial_conv.cpp: z (H, W) = the "same" k x k conv of d (Cd, H, W) with taps w (Cd, k, k).
template <typename T>
void spatial_conv(const T* d, int64_t Cd, int64_t H, int64_t W, const T* w, int64_t k, T* z);

}  // namespace attnkernels::cpu_sample
