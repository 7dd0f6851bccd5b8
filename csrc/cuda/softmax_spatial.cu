// softmax_spatial hot path, CUDA: SoftmaxSpatial's conv, spatial softmax and reweighting, and the
// backward. The math of both ops is in the header comment of csrc/softmax_spatial_ops.cpp.
//
// Kernels, all on the current stream, every sum in acc and in a fixed order (a thread's strided
// loop, then a fixed warp/block tree: cuda_utils.cuh's block_allreduce), no atomics: bitwise
// deterministic run to run.
//   forward:  1. logits: one thread per (n, j, p), a loop over the C channels, written into a;
//             2. softmax: one block per (n, j) row of a, in place (max, sum of exp, normalise);
//             3. y = (x * a) * s: one thread per element, in y's memory order (coalesced stores).
//   backward: 1. dA = s * sum over the group's channels of grad_y * x: one thread per (n, j, p);
//             2. dL = a * (dA - sum_p a dA): one block per (n, j) row, in place;
//             3. grad_x = grad_y * a * s + sum_j W[j, c] dL[j]: one thread per element;
//             4. grad_W[j, c] = sum_{n,p} dL x and grad_b[j] = sum_{n,p} dL: one block per
//                output value, its threads striding over the N*P terms, then the block tree.
// Feature maps are read and written through their (n, c, p) strides (cuda::FeatureMap), so NCHW
// and channels_last run without a copy; a strided view is made dense first.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <tuple>

#include "attnkernels/cuda_utils.cuh"
#include "attnkernels/softmax_spatial.h"

namespace attnkernels {
namespace {

using cuda::acc_exp;
using cuda::block_allreduce;
using cuda::ceil_div;
using cuda::feature_map;
using cuda::FeatureMap;
using cuda::kMaxGrid;
using cuda::nan_max;

constexpr int kThreads = 256;  // threads per block in every kernel here

// The shapes every kernel takes: N samples, C channels, g maps of G = C/g channels, P pixels.
struct Dims {
  int64_t N, C, g, G, P;
};

int64_t grid_for(int64_t work) { return std::max<int64_t>(1, std::min(ceil_div(work, kThreads), kMaxGrid)); }
int64_t grid_rows(int64_t rows) { return std::max<int64_t>(1, std::min(rows, kMaxGrid)); }

// (n, c, p) of flat element i of an x-shaped tensor walked in its memory order.
__device__ __forceinline__ void element_at(int64_t i, const Dims& d, bool channels_last, int64_t& n, int64_t& c,
                                           int64_t& p) {
  if (channels_last) {
    c = i % d.C;
    p = (i / d.C) % d.P;
    n = i / d.C / d.P;
  } else {
    p = i % d.P;
    c = (i / d.P) % d.C;
    n = i / d.P / d.C;
  }
}

// out[(n*g + j)*P + p] over channels c in [c0, c1): LOGITS: sum_c W[j, c] x + b[j];
// else s * sum_c gy * x (the channels of group j).
template <typename acc_t, bool kLogits>
__global__ void __launch_bounds__(kThreads)
    group_sum_kernel(FeatureMap x, FeatureMap gy, const acc_t* __restrict__ W, const acc_t* __restrict__ b,
                     acc_t* __restrict__ out, Dims d, acc_t s) {
  const int64_t total = d.N * d.g * d.P;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t p = i % d.P, j = (i / d.P) % d.g, n = i / d.P / d.g;
    acc_t sum = 0;
    if constexpr (kLogits) {
      const acc_t* w = W + j * d.C;
      for (int64_t c = 0; c < d.C; ++c) sum += w[c] * x.load<acc_t>(n, c, p);
      out[i] = sum + b[j];
    } else {
      for (int64_t c = j * d.G; c < (j + 1) * d.G; ++c) sum += gy.load<acc_t>(n, c, p) * x.load<acc_t>(n, c, p);
      out[i] = s * sum;
    }
  }
}

// Each row of v (P values) in place: softmax over the row. A NaN or +inf entry, or a row of
// -inf only, makes the row NaN (the max is NaN, or inf - inf, or -inf - -inf), as torch.softmax.
template <typename acc_t>
__global__ void __launch_bounds__(kThreads) softmax_rows_kernel(acc_t* __restrict__ v, int64_t rows, int64_t P) {
  __shared__ acc_t smem[kThreads / cuda::kWarpSize];
  for (int64_t r = blockIdx.x; r < rows; r += gridDim.x) {  // uniform per block
    acc_t* row = v + r * P;
    acc_t m = -std::numeric_limits<acc_t>::infinity();
    for (int64_t p = threadIdx.x; p < P; p += blockDim.x) m = nan_max(m, row[p]);
    m = block_allreduce(m, -std::numeric_limits<acc_t>::infinity(), [](acc_t a, acc_t b) { return nan_max(a, b); },
                        smem);
    acc_t sum = 0;
    for (int64_t p = threadIdx.x; p < P; p += blockDim.x) sum += acc_exp(row[p] - m);
    sum = block_allreduce(sum, acc_t(0), [](acc_t a, acc_t b) { return a + b; }, smem);
    for (int64_t p = threadIdx.x; p < P; p += blockDim.x) row[p] = acc_exp(row[p] - m) / sum;
    __syncthreads();  // smem is reused by the next row
  }
}

// Each row of d in place: d = a * (d - sum_p a d), the softmax's gradient.
template <typename acc_t>
__global__ void __launch_bounds__(kThreads)
    softmax_grad_rows_kernel(const acc_t* __restrict__ a, acc_t* __restrict__ d, int64_t rows, int64_t P) {
  __shared__ acc_t smem[kThreads / cuda::kWarpSize];
  for (int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
    const acc_t* ar = a + r * P;
    acc_t* dr = d + r * P;
    acc_t sum = 0;
    for (int64_t p = threadIdx.x; p < P; p += blockDim.x) sum += ar[p] * dr[p];
    sum = block_allreduce(sum, acc_t(0), [](acc_t u, acc_t w) { return u + w; }, smem);
    for (int64_t p = threadIdx.x; p < P; p += blockDim.x) dr[p] = ar[p] * (dr[p] - sum);
    __syncthreads();
  }
}

// out = in * a[n, c/G, p] * s, plus (BACKWARD) sum_j W[j, c] dL[n, j, p]; in is x (forward) or
// grad_y (backward). Flat elements in out's memory order.
template <typename acc_t, bool kBackward>
__global__ void __launch_bounds__(kThreads)
    elementwise_kernel(FeatureMap in, const acc_t* __restrict__ a, const acc_t* __restrict__ W,
                       const acc_t* __restrict__ dl, FeatureMap out, Dims d, acc_t s, bool channels_last) {
  const int64_t total = d.N * d.C * d.P;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    int64_t n, c, p;
    element_at(i, d, channels_last, n, c, p);
    acc_t v = in.load<acc_t>(n, c, p) * a[(n * d.g + c / d.G) * d.P + p] * s;
    if constexpr (kBackward) {
      for (int64_t j = 0; j < d.g; ++j) v += W[j * d.C + c] * dl[(n * d.g + j) * d.P + p];
    }
    out.store<acc_t>(n, c, p, v);
  }
}

// out[r] for r < g*C: grad_W[j, c] = sum_{n,p} dL[n, j, p] x[n, c, p] (r = j*C + c); for
// r = g*C + j: grad_b[j] = sum_{n,p} dL[n, j, p]. One block per value.
template <typename acc_t>
__global__ void __launch_bounds__(kThreads)
    grad_weights_kernel(FeatureMap x, const acc_t* __restrict__ dl, acc_t* __restrict__ out, Dims d) {
  __shared__ acc_t smem[kThreads / cuda::kWarpSize];
  const int64_t rows = d.g * d.C + d.g, terms = d.N * d.P;
  for (int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
    const bool is_bias = r >= d.g * d.C;
    const int64_t j = is_bias ? r - d.g * d.C : r / d.C, c = is_bias ? 0 : r % d.C;
    acc_t sum = 0;
    for (int64_t t = threadIdx.x; t < terms; t += blockDim.x) {
      const int64_t n = t / d.P, p = t % d.P;
      const acc_t v = dl[(n * d.g + j) * d.P + p];
      sum += is_bias ? v : v * x.load<acc_t>(n, c, p);
    }
    sum = block_allreduce(sum, acc_t(0), [](acc_t u, acc_t w) { return u + w; }, smem);
    if (threadIdx.x == 0) out[r] = sum;
    __syncthreads();
  }
}

template <typename acc_t>
void launch_forward(const at::Tensor& x, const at::Tensor& W, const at::Tensor& b, const at::Tensor& y, at::Tensor& a,
                    const Dims& d, bool rescale, bool channels_last) {
  auto stream = at::cuda::getCurrentCUDAStream();
  const FeatureMap xm = feature_map(x);
  acc_t* ap = a.data_ptr<acc_t>();
  group_sum_kernel<acc_t, true><<<grid_for(d.N * d.g * d.P), kThreads, 0, stream>>>(
      xm, xm, W.data_ptr<acc_t>(), b.data_ptr<acc_t>(), ap, d, acc_t(1));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  softmax_rows_kernel<acc_t><<<grid_rows(d.N * d.g), kThreads, 0, stream>>>(ap, d.N * d.g, d.P);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  const acc_t s = rescale ? static_cast<acc_t>(d.P) : acc_t(1);
  elementwise_kernel<acc_t, false><<<grid_for(d.N * d.C * d.P), kThreads, 0, stream>>>(
      xm, ap, nullptr, nullptr, feature_map(y), d, s, channels_last);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Returns [grad_W (g*C) | grad_b (g)] in acc.
template <typename acc_t>
at::Tensor launch_backward(const at::Tensor& gy, const at::Tensor& x, const at::Tensor& W, const at::Tensor& a,
                           const at::Tensor& gx, const Dims& d, bool rescale, bool channels_last) {
  auto stream = at::cuda::getCurrentCUDAStream();
  const FeatureMap xm = feature_map(x), gym = feature_map(gy);
  const acc_t s = rescale ? static_cast<acc_t>(d.P) : acc_t(1);
  at::Tensor dl = at::empty({d.N * d.g * d.P}, a.options());
  acc_t* dlp = dl.data_ptr<acc_t>();
  const acc_t* ap = a.data_ptr<acc_t>();
  group_sum_kernel<acc_t, false><<<grid_for(d.N * d.g * d.P), kThreads, 0, stream>>>(xm, gym, nullptr, nullptr, dlp,
                                                                                     d, s);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  softmax_grad_rows_kernel<acc_t><<<grid_rows(d.N * d.g), kThreads, 0, stream>>>(ap, dlp, d.N * d.g, d.P);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  elementwise_kernel<acc_t, true><<<grid_for(d.N * d.C * d.P), kThreads, 0, stream>>>(
      gym, ap, W.data_ptr<acc_t>(), dlp, feature_map(gx), d, s, channels_last);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  at::Tensor total = at::empty({d.g * d.C + d.g}, a.options());
  grad_weights_kernel<acc_t><<<grid_rows(d.g * d.C + d.g), kThreads, 0, stream>>>(xm, dlp, total.data_ptr<acc_t>(),
                                                                                  d);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return total;
}

Dims dims_of(const at::Tensor& x, const at::Tensor& weight) {
  const int64_t C = x.size(1), g = weight.size(0);
  return {x.size(0), C, g, C / g, x.size(2) * x.size(3)};
}

std::tuple<at::Tensor, at::Tensor> softmax_spatial_cuda(const at::Tensor& x_in, const at::Tensor& weight,
                                                        const at::Tensor& bias, bool rescale) {
  check_softmax_spatial_args(x_in, weight, bias, "softmax_spatial");
  c10::cuda::CUDAGuard device_guard(x_in.device());
  const at::Tensor x = dense(x_in);
  const bool channels_last = layout_of(x) == Layout::ChannelsLast;
  const at::ScalarType acc = acc_type(x.scalar_type());
  const Dims d = dims_of(x, weight);
  at::Tensor y = empty_like_layout(x);
  at::Tensor a = at::empty({d.N, d.g, x.size(2), x.size(3)}, x.options().dtype(acc));
  if (d.N * d.P == 0) return {y, a};
  const at::Tensor W = weight.to(acc).contiguous(), b = bias.reshape({-1}).to(acc).contiguous();
  if (acc == at::kDouble) {
    launch_forward<double>(x, W, b, y, a, d, rescale, channels_last);
  } else {
    launch_forward<float>(x, W, b, y, a, d, rescale, channels_last);
  }
  return {y, a};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> softmax_spatial_backward_cuda(const at::Tensor& grad_y_in,
                                                                              const at::Tensor& x_in,
                                                                              const at::Tensor& weight,
                                                                              const at::Tensor& a_in, bool rescale) {
  check_softmax_spatial_backward_args(grad_y_in, x_in, weight, a_in, "softmax_spatial_backward");
  c10::cuda::CUDAGuard device_guard(x_in.device());
  const at::Tensor x = dense(x_in);
  const at::Tensor gy = dense(grad_y_in);  // read through its own strides: any dense layout
  const at::Tensor a = a_in.contiguous();
  const bool channels_last = layout_of(x) == Layout::ChannelsLast;
  const at::ScalarType acc = acc_type(x.scalar_type());
  const Dims d = dims_of(x, weight);
  at::Tensor grad_x = empty_like_layout(x);
  at::Tensor total;
  if (d.N * d.P == 0) {
    total = at::zeros({d.g * d.C + d.g}, x.options().dtype(acc));  // empty sums
  } else {
    const at::Tensor W = weight.to(acc).contiguous();
    total = acc == at::kDouble ? launch_backward<double>(gy, x, W, a, grad_x, d, rescale, channels_last)
                               : launch_backward<float>(gy, x, W, a, grad_x, d, rescale, channels_last);
  }
  at::Tensor grad_weight = total.narrow(0, 0, d.g * d.C).view({d.g, d.C}).to(weight.scalar_type(), false, true);
  at::Tensor grad_bias = total.narrow(0, d.g * d.C, d.g).to(weight.scalar_type(), false, true);
  return {grad_x, grad_weight, grad_bias};
}

}  // namespace
}  // namespace attnkernels

TORCH_LIBRARY_IMPL(attnkernels, CUDA, m) {
  m.impl("softmax_spatial", &attnkernels::softmax_spatial_cuda);
  m.impl("softmax_spatial_backward", &attnkernels::softmax_spatial_backward_cuda);
}
