// channel_gate hot path, CUDA: pooling over H*W, the 1-D conv gate over C, the rescale, and
// their backwards. The math of each op is in the header comment of csrc/channel_gate_ops.cpp.
//
// The ops on (N, C, H, W) tensors are ops of attnkernels/cuda_reduce.cuh, run by its walks:
//   * reductions over the H*W pixels of every (n, c) (reduce_per_channel): channel_pool (sum,
//     max), the tie count of channel_pool_backward, and grad_gate = sum_hw grad_y * x of
//     channel_rescale_backward. NCHW: a warp or a block per plane; channels_last: tiles of
//     channels over chunks of pixels, chunks combined in order. Bitwise deterministic.
//   * elementwise maps out[i] = op(nc(i), in[i]) (map_per_channel): channel_rescale, grad_x of
//     channel_rescale_backward, channel_pool_backward's write.
// The gate ops work on (N, C) maps only and are tiny.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <tuple>

#include "attnkernels/channel_gate.h"
#include "attnkernels/cuda_reduce.cuh"
#include "attnkernels/cuda_utils.cuh"

namespace attnkernels {
namespace {

using cuda::block_reduce;
using cuda::ceil_div;
using cuda::check_cuda;
using cuda::check_like_x;
using cuda::kBlock;  // threads per block in every kernel here
using cuda::kMaxGrid;
using cuda::kWarpSize;
using cuda::nan_max;
using cuda::NoCtx;
using cuda::NoState;

// ---------------------------------------------------------------------------------------------
// The ops over x (cuda_reduce.cuh): reductions over the H*W pixels of each (n, c), whose
// ChanState's chan_finish writes the (N, C) result, and per-channel maps.
// ---------------------------------------------------------------------------------------------

// channel_pool: avg[n,c] = sum_hw x / hw;  max[n,c] = amax_hw x (NaN propagates).
template <typename scalar_t>
struct ChannelPool : cuda::OpBase<scalar_t> {
  using acc_t = at::opmath_type<scalar_t>;
  struct ChanState {
    acc_t sum;
    acc_t max;
  };

  acc_t* avg;
  acc_t* max;
  int64_t hw;

  __device__ static ChanState chan_init() { return {acc_t(0), static_cast<acc_t>(-INFINITY)}; }
  __device__ static ChanState chan_combine(ChanState a, ChanState b) {
    return {a.sum + b.sum, nan_max(a.max, b.max)};
  }
  __device__ acc_t visit(NoCtx, NoCtx, acc_t, acc_t x, NoState&, ChanState& s) const {
    s.sum += x;
    s.max = nan_max(s.max, x);
    return acc_t(0);
  }
  __device__ void chan_finish(int64_t nc, ChanState s) const {
    avg[nc] = s.sum / static_cast<acc_t>(hw);
    max[nc] = s.max;
  }
};

// channel_pool_backward, first pass: count = #{hw : x == max}; writes the share of grad_max
// each tied maximum receives, grad_max / count (NaN where count == 0, i.e. a NaN max,
// exactly as torch.amax's backward).
template <typename scalar_t>
struct ChannelPoolTies : cuda::OpBase<scalar_t> {
  using acc_t = at::opmath_type<scalar_t>;
  struct ChanState {
    int64_t count;
  };
  struct ChanCtx {
    acc_t max;
  };

  const acc_t* max;
  const acc_t* grad_max;
  acc_t* share;  // (N, C): grad_max / count

  __device__ ChanCtx chan(int64_t nc) const { return {max[nc]}; }
  __device__ static ChanState chan_init() { return {0}; }
  __device__ static ChanState chan_combine(ChanState a, ChanState b) { return {a.count + b.count}; }
  __device__ acc_t visit(const ChanCtx& k, NoCtx, acc_t, acc_t x, NoState&, ChanState& s) const {
    s.count += x == k.max ? 1 : 0;
    return acc_t(0);
  }
  __device__ void chan_finish(int64_t nc, ChanState s) const {
    share[nc] = grad_max[nc] / static_cast<acc_t>(s.count);
  }
};

// channel_pool_backward, second pass (a map): grad_x = grad_avg / hw + [x == max] * share.
// Its ChanCtx is nc itself, so max and share are read only when there is a grad_max.
template <typename scalar_t>
struct ChannelPoolBackward : cuda::OpBase<scalar_t> {
  using acc_t = at::opmath_type<scalar_t>;
  using ChanCtx = int64_t;
  static constexpr bool kWrites = true;

  const acc_t* grad_avg;
  const acc_t* max;
  const acc_t* share;  // nullptr without grad_max
  acc_t hw;

  __device__ ChanCtx chan(int64_t nc) const { return nc; }
  __device__ acc_t visit(int64_t nc, NoCtx, acc_t, acc_t x, NoState&, NoState&) const {
    acc_t g = grad_avg[nc] / hw;
    if (share != nullptr) {  // [x == max] * share, so a NaN share (NaN max) reaches every pixel
      g += acc_t(x == max[nc]) * share[nc];
    }
    return g;
  }
};

// channel_rescale (a map): y = x * gate[n, c] in acc; also grad_x = grad_y * gate of
// channel_rescale_backward.
template <typename scalar_t>
struct ChannelRescale : cuda::OpBase<scalar_t> {
  using acc_t = at::opmath_type<scalar_t>;
  struct ChanCtx {
    acc_t gate;
  };
  static constexpr bool kWrites = true;

  const acc_t* gate;

  __device__ ChanCtx chan(int64_t nc) const { return {gate[nc]}; }
  __device__ acc_t visit(const ChanCtx& k, NoCtx, acc_t, acc_t x, NoState&, NoState&) const {
    return x * k.gate;
  }
};

// channel_rescale_backward: grad_gate[n,c] = sum_hw grad_y * x.
template <typename scalar_t>
struct ChannelRescaleGradGate : cuda::OpBase<scalar_t> {
  using acc_t = at::opmath_type<scalar_t>;
  struct ChanState {
    acc_t sum;
  };
  static constexpr bool kGradY = true;

  acc_t* grad_gate;

  __device__ static ChanState chan_init() { return {acc_t(0)}; }
  __device__ static ChanState chan_combine(ChanState a, ChanState b) { return {a.sum + b.sum}; }
  __device__ acc_t visit(NoCtx, NoCtx, acc_t grad_y, acc_t x, NoState&, ChanState& s) const {
    s.sum += grad_y * x;
    return acc_t(0);
  }
  __device__ void chan_finish(int64_t nc, ChanState s) const { grad_gate[nc] = s.sum; }
};

// ---------------------------------------------------------------------------------------------
// The gate over (N, C): f from (avg, max), z = conv1d_over_C(f, weight), gate = sigmoid(z).
// weight, alpha and beta keep their own dtype and are cast to acc on load.
// ---------------------------------------------------------------------------------------------

template <typename acc_t>
__device__ __forceinline__ acc_t load_as(const void* p, c10::ScalarType t, int64_t i) {
  switch (t) {
    case c10::ScalarType::Double:
      return static_cast<acc_t>(static_cast<const double*>(p)[i]);
    case c10::ScalarType::Float:
      return static_cast<acc_t>(static_cast<const float*>(p)[i]);
    case c10::ScalarType::Half:
      return static_cast<acc_t>(static_cast<float>(static_cast<const at::Half*>(p)[i]));
    case c10::ScalarType::BFloat16:
      return static_cast<acc_t>(static_cast<float>(static_cast<const at::BFloat16*>(p)[i]));
    default:
      return acc_t(0);  // the host allows only the four dtypes above
  }
}

template <typename acc_t>
__device__ __forceinline__ void store_as(void* p, c10::ScalarType t, int64_t i, acc_t v) {
  switch (t) {
    case c10::ScalarType::Double:
      static_cast<double*>(p)[i] = static_cast<double>(v);
      break;
    case c10::ScalarType::Float:
      static_cast<float*>(p)[i] = static_cast<float>(v);
      break;
    case c10::ScalarType::Half:
      static_cast<at::Half*>(p)[i] = static_cast<at::Half>(static_cast<float>(v));
      break;
    case c10::ScalarType::BFloat16:
      static_cast<at::BFloat16*>(p)[i] = static_cast<at::BFloat16>(static_cast<float>(v));
      break;
    default:
      break;
  }
}

template <typename acc_t>
struct GateArgs {
  const acc_t* avg;
  const acc_t* max;
  const void* weight;
  c10::ScalarType weight_dtype;
  const void* alpha;  // nullptr unless mode == GateMode::Mix
  c10::ScalarType alpha_dtype;
  const void* beta;
  c10::ScalarType beta_dtype;
  int64_t k;  // taps, odd; pad = (k - 1) / 2
  int64_t N, C;
  GateMode mode;

  __device__ acc_t w(int64_t j) const { return load_as<acc_t>(weight, weight_dtype, j); }
  __device__ acc_t alpha_value() const {
    return mode == GateMode::Mix ? load_as<acc_t>(alpha, alpha_dtype, 0) : acc_t(0);
  }
  __device__ acc_t beta_value() const {
    return mode == GateMode::Mix ? load_as<acc_t>(beta, beta_dtype, 0) : acc_t(0);
  }
  // f[n, c], zero outside 0 <= c < C (the conv's zero padding).
  __device__ acc_t f(int64_t n, int64_t c, acc_t alpha_v, acc_t beta_v) const {
    if (c < 0 || c >= C) return acc_t(0);
    const acc_t a = avg[n * C + c];
    const acc_t m = max[n * C + c];
    switch (mode) {
      case GateMode::Avg:
        return a;
      case GateMode::Max:
        return m;
      default:
        return acc_t(0.5) * (a + m) + alpha_v * a + beta_v * m;
    }
  }
};

template <typename acc_t>
__global__ void __launch_bounds__(kBlock)
    channel_gate_kernel(GateArgs<acc_t> g, acc_t* __restrict__ gate) {
  const acc_t alpha = g.alpha_value();
  const acc_t beta = g.beta_value();
  const int64_t pad = (g.k - 1) / 2;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t nc = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; nc < g.N * g.C;
       nc += stride) {
    const int64_t n = nc / g.C;
    const int64_t c = nc - n * g.C;
    acc_t z = 0;
    for (int64_t j = 0; j < g.k; ++j) {
      z += g.w(j) * g.f(n, c + j - pad, alpha, beta);
    }
    gate[nc] = acc_t(1) / (acc_t(1) + ::exp(-z));  // sigmoid, as torch computes it
  }
}

// dz[n, c] = grad_gate * gate * (1 - gate), zero outside 0 <= c < C.
template <typename acc_t>
__device__ __forceinline__ acc_t gate_dz(const acc_t* grad_gate, const acc_t* gate, int64_t n,
                                         int64_t c, int64_t C) {
  if (c < 0 || c >= C) return acc_t(0);
  const acc_t s = gate[n * C + c];
  return grad_gate[n * C + c] * s * (acc_t(1) - s);
}

// df[n, c] = sum_j weight[j] * dz[n, c - j + pad].
template <typename acc_t>
__device__ __forceinline__ acc_t gate_df(const GateArgs<acc_t>& g, const acc_t* grad_gate,
                                         const acc_t* gate, int64_t n, int64_t c) {
  const int64_t pad = (g.k - 1) / 2;
  acc_t df = 0;
  for (int64_t j = 0; j < g.k; ++j) {
    df += g.w(j) * gate_dz(grad_gate, gate, n, c - j + pad, g.C);
  }
  return df;
}

// grad_avg and grad_max, one thread per (n, c).
template <typename acc_t>
__global__ void __launch_bounds__(kBlock)
    channel_gate_backward_kernel(GateArgs<acc_t> g, const acc_t* __restrict__ grad_gate,
                                 const acc_t* __restrict__ gate, acc_t* __restrict__ grad_avg,
                                 acc_t* __restrict__ grad_max) {
  const acc_t alpha = g.alpha_value();
  const acc_t beta = g.beta_value();
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t nc = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; nc < g.N * g.C;
       nc += stride) {
    const int64_t n = nc / g.C;
    const int64_t c = nc - n * g.C;
    const acc_t df = gate_df(g, grad_gate, gate, n, c);
    switch (g.mode) {
      case GateMode::Avg:
        grad_avg[nc] = df;
        grad_max[nc] = acc_t(0);
        break;
      case GateMode::Max:
        grad_avg[nc] = acc_t(0);
        grad_max[nc] = df;
        break;
      default:
        grad_avg[nc] = df * (acc_t(0.5) + alpha);
        grad_max[nc] = df * (acc_t(0.5) + beta);
        break;
    }
  }
}

// Per-sample partial sums, one block per n: partial[n, j] = sum_c dz[n,c] * f[n, c + j - pad]
// for j < k; with GateMode::Mix also partial[n, k] = sum_c df*avg and partial[n, k+1] =
// sum_c df*max. Summed over n in order by gate_param_grads_kernel.
template <typename acc_t>
__global__ void __launch_bounds__(kBlock)
    gate_partials_kernel(GateArgs<acc_t> g, const acc_t* __restrict__ grad_gate,
                         const acc_t* __restrict__ gate, int64_t cols,
                         acc_t* __restrict__ partial) {
  __shared__ acc_t smem[kBlock / kWarpSize];
  const acc_t alpha = g.alpha_value();
  const acc_t beta = g.beta_value();
  const int64_t pad = (g.k - 1) / 2;
  auto plus = [](acc_t a, acc_t b) { return a + b; };
  for (int64_t n = blockIdx.x; n < g.N; n += gridDim.x) {  // uniform per block
    for (int64_t col = 0; col < cols; ++col) {
      acc_t s = 0;
      for (int64_t c = threadIdx.x; c < g.C; c += blockDim.x) {
        if (col < g.k) {
          s += gate_dz(grad_gate, gate, n, c, g.C) * g.f(n, c + col - pad, alpha, beta);
        } else {
          const acc_t df = gate_df(g, grad_gate, gate, n, c);
          s += df * (col == g.k ? g.avg[n * g.C + c] : g.max[n * g.C + c]);
        }
      }
      s = block_reduce(s, acc_t(0), plus, smem);
      if (threadIdx.x == 0) {
        partial[n * cols + col] = s;
      }
    }
  }
}

// grad_weight[j] (and grad_alpha, grad_beta) = sum over n of partial[n, col], n in order.
template <typename acc_t>
__global__ void __launch_bounds__(kBlock)
    gate_param_grads_kernel(const acc_t* __restrict__ partial, int64_t N, int64_t k, int64_t cols,
                            void* grad_weight, c10::ScalarType weight_dtype, void* grad_alpha,
                            c10::ScalarType alpha_dtype, void* grad_beta,
                            c10::ScalarType beta_dtype) {
  for (int64_t col = threadIdx.x; col < cols; col += blockDim.x) {
    acc_t total = 0;
    for (int64_t n = 0; n < N; ++n) {
      total += partial[n * cols + col];
    }
    if (col < k) {
      store_as(grad_weight, weight_dtype, col, total);
    } else if (col == k) {
      store_as(grad_alpha, alpha_dtype, 0, total);
    } else {
      store_as(grad_beta, beta_dtype, 0, total);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Host side.
// ---------------------------------------------------------------------------------------------

bool is_param_dtype(at::ScalarType t) {
  return t == at::kDouble || t == at::kFloat || t == at::kHalf || t == at::kBFloat16;
}

// check_gate_args (channel_gate.h), and CUDA placement and parameter dtypes; returns the mode.
GateMode check_gate_cuda(const at::Tensor& avg, const at::Tensor& max, const at::Tensor& weight,
                         const c10::optional<at::Tensor>& alpha,
                         const c10::optional<at::Tensor>& beta, int64_t mode_in, const char* op) {
  const GateMode mode = check_gate_args(avg, max, weight, alpha, beta, mode_in, op);
  AK_CHECK_VALUE(avg.is_cuda(), op, ": avg must be a CUDA tensor, got ", avg.device());
  check_cuda(max, avg, op, "max");
  AK_CHECK_TYPE(is_param_dtype(weight.scalar_type()), op,
              ": weight must be float64, float32, float16 or bfloat16, got ", weight.scalar_type());
  if (mode == GateMode::Mix) {
    check_cuda(*alpha, avg, op, "alpha");
    check_cuda(*beta, avg, op, "beta");
    AK_CHECK_TYPE(is_param_dtype(alpha->scalar_type()) && is_param_dtype(beta->scalar_type()), op,
                ": alpha and beta must be float64, float32, float16 or bfloat16, got ",
                alpha->scalar_type(), " and ", beta->scalar_type());
  }
  return mode;
}

template <typename acc_t>
GateArgs<acc_t> make_gate_args(const at::Tensor& avg, const at::Tensor& max,
                               const at::Tensor& weight, const c10::optional<at::Tensor>& alpha,
                               const c10::optional<at::Tensor>& beta, GateMode mode) {
  GateArgs<acc_t> g{};
  g.avg = avg.data_ptr<acc_t>();
  g.max = max.data_ptr<acc_t>();
  g.weight = weight.data_ptr();
  g.weight_dtype = weight.scalar_type();
  g.alpha = nullptr;
  g.beta = nullptr;
  g.alpha_dtype = g.beta_dtype = avg.scalar_type();
  if (mode == GateMode::Mix) {
    g.alpha = alpha->data_ptr();
    g.alpha_dtype = alpha->scalar_type();
    g.beta = beta->data_ptr();
    g.beta_dtype = beta->scalar_type();
  }
  g.k = weight.numel();
  g.N = avg.size(0);
  g.C = avg.size(1);
  g.mode = mode;
  return g;
}

std::tuple<at::Tensor, at::Tensor> channel_pool_cuda(const at::Tensor& x_in) {
  constexpr const char* op = "channel_pool";
  check_feature_map(x_in, op, "x");
  AK_CHECK_VALUE(x_in.is_cuda(), op, ": x must be a CUDA tensor, got ", x_in.device());
  c10::cuda::CUDAGuard device_guard(x_in.device());
  const at::Tensor x = dense(x_in);
  const int64_t N = x.size(0), C = x.size(1), hw = x.size(2) * x.size(3);
  const auto acc_options = x.options().dtype(acc_type(x.scalar_type()));
  at::Tensor avg = at::empty({N, C}, acc_options);
  at::Tensor max = at::empty({N, C}, acc_options);
  if (N * C == 0) {
    return {avg, max};
  }
  AK_CHECK_VALUE(hw > 0, op, ": H*W must be positive (the max of an empty plane is undefined), got ",
              x.sizes());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "channel_pool_cuda",
                                  [&] {
                                    using acc_t = at::opmath_type<scalar_t>;
                                    const ChannelPool<scalar_t> pool{
                                        {}, avg.data_ptr<acc_t>(), max.data_ptr<acc_t>(), hw};
                                    cuda::reduce_per_channel(pool, x, at::Tensor());
                                  });
  return {avg, max};
}

at::Tensor channel_pool_backward_cuda(const at::Tensor& grad_avg_in,
                                      const c10::optional<at::Tensor>& grad_max_in,
                                      const at::Tensor& x_in, const at::Tensor& max_in) {
  constexpr const char* op = "channel_pool_backward";
  check_feature_map(x_in, op, "x");
  AK_CHECK_VALUE(x_in.is_cuda(), op, ": x must be a CUDA tensor, got ", x_in.device());
  check_per_channel(grad_avg_in, x_in, op, "grad_avg");
  check_per_channel(max_in, x_in, op, "max");
  const bool has_grad_max = grad_max_in.has_value() && grad_max_in->defined();
  if (has_grad_max) {
    check_per_channel(*grad_max_in, x_in, op, "grad_max");
  }
  c10::cuda::CUDAGuard device_guard(x_in.device());
  const at::Tensor x = dense(x_in);
  const at::Tensor grad_avg = grad_avg_in.contiguous();
  const at::Tensor max = max_in.contiguous();
  const int64_t N = x.size(0), C = x.size(1), hw = x.size(2) * x.size(3);
  const Layout layout = layout_of(x);
  at::Tensor grad_x = empty_like_layout(x);
  if (x.numel() == 0) {
    return grad_x;
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, x.scalar_type(), "channel_pool_backward_cuda", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        // First pass: count the tied maxima of each plane -> share = grad_max / count.
        at::Tensor share;
        if (has_grad_max) {
          const at::Tensor grad_max = grad_max_in->contiguous();
          share = at::empty({N, C}, grad_avg.options());
          const ChannelPoolTies<scalar_t> ties{
              {}, max.data_ptr<acc_t>(), grad_max.data_ptr<acc_t>(), share.data_ptr<acc_t>()};
          cuda::reduce_per_channel(ties, x, at::Tensor());
        }
        // Second pass: grad_x = grad_avg / hw + [x == max] * share.
        const ChannelPoolBackward<scalar_t> write{{},
                                                  grad_avg.data_ptr<acc_t>(),
                                                  max.data_ptr<acc_t>(),
                                                  has_grad_max ? share.data_ptr<acc_t>() : nullptr,
                                                  static_cast<acc_t>(hw)};
        cuda::map_per_channel(write, x, grad_x, layout);
      });
  return grad_x;
}

at::Tensor channel_gate_cuda(const at::Tensor& avg_in, const at::Tensor& max_in,
                             const at::Tensor& weight_in, const c10::optional<at::Tensor>& alpha,
                             const c10::optional<at::Tensor>& beta, int64_t mode_in) {
  constexpr const char* op = "channel_gate";
  const GateMode mode = check_gate_cuda(avg_in, max_in, weight_in, alpha, beta, mode_in, op);
  c10::cuda::CUDAGuard device_guard(avg_in.device());
  const at::Tensor avg = avg_in.contiguous();
  const at::Tensor max = max_in.contiguous();
  const at::Tensor weight = weight_in.contiguous();
  at::Tensor gate = at::empty_like(avg);
  const int64_t NC = avg.numel();
  if (NC == 0) {
    return gate;
  }
  AT_DISPATCH_FLOATING_TYPES(avg.scalar_type(), "channel_gate_cuda", [&] {
    using acc_t = scalar_t;  // avg is already in the accumulation dtype
    const GateArgs<acc_t> g = make_gate_args<acc_t>(avg, max, weight, alpha, beta, mode);
    const int64_t blocks = std::min(ceil_div(NC, kBlock), kMaxGrid);
    channel_gate_kernel<acc_t><<<blocks, kBlock, 0, at::cuda::getCurrentCUDAStream()>>>(
        g, gate.data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return gate;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> channel_gate_backward_cuda(
    const at::Tensor& grad_gate_in, const at::Tensor& gate_in, const at::Tensor& avg_in,
    const at::Tensor& max_in, const at::Tensor& weight_in, const c10::optional<at::Tensor>& alpha,
    const c10::optional<at::Tensor>& beta, int64_t mode_in) {
  constexpr const char* op = "channel_gate_backward";
  const GateMode mode = check_gate_cuda(avg_in, max_in, weight_in, alpha, beta, mode_in, op);
  auto check_like_avg = [&](const at::Tensor& t, const char* name) {
    AK_CHECK_VALUE(t.sizes() == avg_in.sizes() && t.scalar_type() == avg_in.scalar_type(), op, ": ",
                name, " must match avg's shape ", avg_in.sizes(), " and dtype ",
                avg_in.scalar_type(), ", got ", t.sizes(), " ", t.scalar_type());
    check_cuda(t, avg_in, op, name);
  };
  check_like_avg(grad_gate_in, "grad_gate");
  check_like_avg(gate_in, "gate");
  c10::cuda::CUDAGuard device_guard(avg_in.device());
  const at::Tensor grad_gate = grad_gate_in.contiguous();
  const at::Tensor gate = gate_in.contiguous();
  const at::Tensor avg = avg_in.contiguous();
  const at::Tensor max = max_in.contiguous();
  const at::Tensor weight = weight_in.contiguous();
  const int64_t N = avg.size(0), C = avg.size(1), k = weight.numel();
  const bool mix = mode == GateMode::Mix;

  at::Tensor grad_avg = at::empty_like(avg);
  at::Tensor grad_max = at::empty_like(avg);
  at::Tensor grad_weight = at::empty(weight_in.sizes(), weight.options());
  // grad_alpha/grad_beta: 0-dim, in alpha's dtype for GateMode::Mix (as the CPU kernel); zeros in acc
  // otherwise.
  at::Tensor grad_alpha = mix ? at::empty({}, alpha->options()) : at::zeros({}, avg.options());
  at::Tensor grad_beta = mix ? at::empty({}, alpha->options()) : at::zeros({}, avg.options());
  if (N * C == 0) {
    grad_weight.zero_();
    grad_alpha.zero_();
    grad_beta.zero_();
    return {grad_avg, grad_max, grad_weight, grad_alpha, grad_beta};
  }
  const int64_t cols = k + (mix ? 2 : 0);  // partial sums per sample: taps, then alpha, beta
  at::Tensor partial = at::empty({N, cols}, avg.options());
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(avg.scalar_type(), "channel_gate_backward_cuda", [&] {
    using acc_t = scalar_t;  // avg is already in the accumulation dtype
    const GateArgs<acc_t> g = make_gate_args<acc_t>(avg, max, weight, alpha, beta, mode);
    const acc_t* grad_gate_ptr = grad_gate.data_ptr<acc_t>();
    const acc_t* gate_ptr = gate.data_ptr<acc_t>();

    const int64_t blocks = std::min(ceil_div(N * C, kBlock), kMaxGrid);
    channel_gate_backward_kernel<acc_t><<<blocks, kBlock, 0, stream>>>(
        g, grad_gate_ptr, gate_ptr, grad_avg.data_ptr<acc_t>(), grad_max.data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();

    gate_partials_kernel<acc_t><<<std::min(N, kMaxGrid), kBlock, 0, stream>>>(
        g, grad_gate_ptr, gate_ptr, cols, partial.data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();

    gate_param_grads_kernel<acc_t><<<1, kBlock, 0, stream>>>(
        partial.data_ptr<acc_t>(), N, k, cols, grad_weight.data_ptr(), grad_weight.scalar_type(),
        mix ? grad_alpha.data_ptr() : nullptr, grad_alpha.scalar_type(),
        mix ? grad_beta.data_ptr() : nullptr, grad_beta.scalar_type());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {grad_avg, grad_max, grad_weight, grad_alpha, grad_beta};
}

at::Tensor channel_rescale_cuda(const at::Tensor& x_in, const at::Tensor& gate_in) {
  constexpr const char* op = "channel_rescale";
  check_feature_map(x_in, op, "x");
  AK_CHECK_VALUE(x_in.is_cuda(), op, ": x must be a CUDA tensor, got ", x_in.device());
  check_per_channel(gate_in, x_in, op, "gate");
  c10::cuda::CUDAGuard device_guard(x_in.device());
  const at::Tensor x = dense(x_in);
  const at::Tensor gate = gate_in.contiguous();
  at::Tensor y = empty_like_layout(x);
  if (x.numel() == 0) {
    return y;
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "channel_rescale_cuda",
                                  [&] {
                                    using acc_t = at::opmath_type<scalar_t>;
                                    const ChannelRescale<scalar_t> rescale{{}, gate.data_ptr<acc_t>()};
                                    cuda::map_per_channel(rescale, x, y, layout_of(x));
                                  });
  return y;
}

std::tuple<at::Tensor, at::Tensor> channel_rescale_backward_cuda(const at::Tensor& grad_y_in,
                                                                 const at::Tensor& x_in,
                                                                 const at::Tensor& gate_in) {
  constexpr const char* op = "channel_rescale_backward";
  check_feature_map(x_in, op, "x");
  AK_CHECK_VALUE(x_in.is_cuda(), op, ": x must be a CUDA tensor, got ", x_in.device());
  check_like_x(grad_y_in, x_in, op, "grad_y");
  check_per_channel(gate_in, x_in, op, "gate");
  c10::cuda::CUDAGuard device_guard(x_in.device());
  const at::Tensor x = dense(x_in);
  const Layout layout = layout_of(x);
  // Both walked with the same index math: grad_y in x's layout (a copy only if it differs).
  const at::Tensor grad_y = grad_y_in.contiguous(memory_format_of(layout));
  const at::Tensor gate = gate_in.contiguous();
  const int64_t N = x.size(0), C = x.size(1), hw = x.size(2) * x.size(3);
  at::Tensor grad_x = empty_like_layout(x);
  at::Tensor grad_gate = at::empty({N, C}, gate.options());
  if (N * C == 0) {
    return {grad_x, grad_gate};
  }
  if (hw == 0) {
    grad_gate.zero_();  // an empty sum
    return {grad_x, grad_gate};
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, x.scalar_type(), "channel_rescale_backward_cuda", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        const ChannelRescale<scalar_t> scale{{}, gate.data_ptr<acc_t>()};  // grad_x = grad_y * gate
        cuda::map_per_channel(scale, grad_y, grad_x, layout);
        const ChannelRescaleGradGate<scalar_t> sum{{}, grad_gate.data_ptr<acc_t>()};
        cuda::reduce_per_channel(sum, x, grad_y);
      });
  return {grad_x, grad_gate};
}

}  // namespace
}  // namespace attnkernels

TORCH_LIBRARY_IMPL(attnkernels, CUDA, m) {
  m.impl("channel_pool", &attnkernels::channel_pool_cuda);
  m.impl("channel_pool_backward", &attnkernels::channel_pool_backward_cuda);
  m.impl("channel_gate", &attnkernels::channel_gate_cuda);
  m.impl("channel_gate_backward", &attnkernels::channel_gate_backward_cuda);
  m.impl("channel_rescale", &attnkernels::channel_rescale_cuda);
  m.impl("channel_rescale_backward", &attnkernels::channel_rescale_backward_cuda);
}
