// shuffle_conv hot path, CUDA: GAM's grouped k x k conv read through the channel shuffle and an
// optional affine + ReLU prologue, with its raw or gated epilogue, the epilogue alone, and the
// backwards. The math of every op is in the header comment of csrc/shuffle_conv_ops.cpp.
//
// Kernels:
//   * conv_kernel, a direct conv used twice:
//       forward: u -> z, u = relu(in_scale * s[pi(c)] + in_shift) gathered on load, then z + bias
//                written raw (acc, s's layout) or as y = gate_x * sigmoid(out_scale * z + out_shift);
//       grad_s:  grad_z -> grad_u, the transposed conv: the same conv with the weights flipped in
//                (i, j) and transposed within each group (W'[g*Cg + c][o][i][j] = W[g*Og + o][c][k-1-i][k-1-j]),
//                then du = relu_grad(grad_u, t) and grad_s[pi(c)] = du * in_scale, plus per-block partial
//                sums of du * s and du for grad_in_scale and grad_in_shift.
//     A block takes one sample, one group, a chunk of the group's output channels and a TY x 32 pixel
//     tile. Input channels are staged a few at a time: their (TY + k - 1) x (32 + k - 1) halo tile (the
//     prologue applied once per element, zeros outside the image) and the block's weights. A thread
//     owns 4 neighbouring pixels of one row and kOC output channels; it slides a 4-wide window along
//     each tile row, so one shared load feeds 4 * kOC FMAs.
//   * weight_grad_kernel: grad_weight[o][c][i][j] = sum_pixels grad_z[o] * u[c] shifted by (i, j), an
//     implicit GEMM (rows o, columns (c, i, j) of the group, reduction over pixels) on 8 x 8 pixel
//     tiles staged with their u halo; grad_bias = sum_pixels grad_z rides along. Each block sums a
//     fixed slice of the (sample, pixel tile) pairs and writes one partial per slice.
//   * epilogue kernels: y = gate_x * sigmoid(out_scale * z + out_shift) elementwise; its backward as a
//     per-channel reduction (sum dpre, sum dpre * z, sum dpre * (z - mean): the BatchNorm form needs
//     them before grad_z) and then an elementwise apply.
// Every partial sum is combined by sum_slices_kernel in slice order: no atomics, bitwise
// deterministic for a given device (slice counts depend on shapes and the SM count only).
// All arithmetic in acc = float64 for float64 s (z for the epilogue ops), float32 otherwise; SIMT FMAs.
// Feature maps (s, z, grad_z, gate_x, grad_y) may each have any of the four floating dtypes and any
// dense layout; they are read and written through their own strides.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <tuple>
#include <vector>

#include "attnkernels/shuffle_conv.h"
#include "attnkernels/cuda_utils.cuh"

namespace attnkernels {
namespace {

using cuda::ceil_div;
using cuda::feature_map;
using cuda::FeatureMap;
using cuda::relu;
using cuda::relu_grad;
using cuda::sigmoid;
using cuda::check_cuda;
using cuda::kMaxGrid;
using cuda::load_vec;
using cuda::next_pow2;
using cuda::sm_count;
using cuda::Vec;

constexpr int kThreads = 256;  // threads per block in every kernel here

// conv_kernel: a thread computes kPx neighbouring pixels of a row; kConvTX threads span a tile row.
constexpr int kPx = 4;
constexpr int kConvTX = 8;
constexpr int kTileW = kConvTX * kPx;  // 32 pixels

// weight_grad_kernel: kWT x kWT pixel tiles.
constexpr int kWT = 8;
constexpr int kWP = kWT * kWT;
constexpr int kGzLd = kWP + 1;  // odd row stride of the grad_z tile

constexpr size_t kSmemBudget = 40 * 1024;  // staging per block below the 48 KB default


// The conv's input as the kernels see it: channel c of the conv reads channel pi(c) of `map`
// through the optional affine + ReLU, and the image is padded with zeros (after the prologue).
template <typename acc_t>
struct ConvInput {
  FeatureMap map;
  int64_t C;           // channels of map
  int shuffle_groups;  // 1: pi is the identity
  const acc_t* scale;  // nullptr: no affine, no ReLU
  const acc_t* shift;
  int64_t H, W;

  // pi(c) = (c % shuffle_groups) * (C / shuffle_groups) + c / shuffle_groups (docs/contract.md's channel_shuffle).
  __device__ __forceinline__ int64_t source(int64_t c) const {
    return (c % shuffle_groups) * (C / shuffle_groups) + c / shuffle_groups;
  }

  __device__ __forceinline__ acc_t at(int64_t n, int64_t c, int64_t y, int64_t x) const {
    if (y < 0 || y >= H || x < 0 || x >= W) return acc_t(0);
    const int64_t sc = source(c);
    const acc_t v = map.load<acc_t>(n, sc, y * W + x);
    return scale == nullptr ? v : relu(scale[sc] * v + shift[sc]);
  }
};

template <typename acc_t>
__device__ __forceinline__ acc_t* shared_base() {
  extern __shared__ __align__(16) unsigned char shuffle_conv_smem_raw[];
  return reinterpret_cast<acc_t*>(shuffle_conv_smem_raw);
}

// ---------------------------------------------------------------------------------------------
// The direct conv (forward, and grad_s as the transposed conv).
// ---------------------------------------------------------------------------------------------

enum class ConvEpilogue : int {
  kRaw,    // out = z (+ bias)
  kGated,  // out = gate_x * sigmoid(out_scale * z + out_shift)
  kGradS,  // out[pi(c)] = du * in_scale (or grad_u), du = relu_grad(grad_u, t); partial sums
};

template <typename acc_t>
struct ConvArgs {
  ConvInput<acc_t> in;   // forward: s (shuffled, prologue); grad_s: grad_z (plain)
  const acc_t* weight;   // (C_out, Gin, k, k) in acc: C_out conv output channels, Gin inputs per group
  int64_t N, H, W;
  int C_out, groups, Gin, Gout, k;  // Gout = C_out / groups
  // Launch shape (plan_conv): blockDim = (kConvTX, TY, TZ), TZ * kOC output channels per block.
  int TY, TZ, oc_per_thread, ochunks, tiles_h, tiles_w, cc;
  bool channels_inner;  // `in` is channels_last: staging walks along channels
  ConvEpilogue epilogue;
  FeatureMap out;
  const acc_t* bias;  // forward, or nullptr
  FeatureMap gate_x;  // kGated
  const acc_t* out_scale;
  const acc_t* out_shift;
  ConvInput<acc_t> s;  // kGradS: s read through pi and its affine (for relu_grad and the sums)
  bool channel_sums;   // kGradS with the affine: per-block sums for grad_in_scale / grad_in_shift
  acc_t* part_scale;   // (N * tiles, C_in) partial sums of du * s ...
  acc_t* part_shift;   // ... and of du, at s's channel pi(c)
};

// Shared memory of conv_kernel, in acc values: the halo tiles, then (16-byte aligned) the weights;
// with the kGradS sums, the block reduction reuses the space.
struct ConvSmem {
  int hh, wv, ld;  // halo rows, halo columns, row stride (odd: the rows of a warp fall on distinct banks)
  int64_t weights, total;
};

__host__ __device__ inline ConvSmem conv_smem(int TY, int k, int cc, int OB, int oc_per_thread, bool sums) {
  ConvSmem s{};
  s.hh = TY + k - 1;
  s.wv = kTileW + k - 1;
  s.ld = s.wv | 1;
  s.weights = (static_cast<int64_t>(cc) * s.hh * s.ld + 3) / 4 * 4;
  s.total = s.weights + static_cast<int64_t>(cc) * k * k * OB;
  const int64_t red = static_cast<int64_t>(oc_per_thread) * 2 * kThreads;
  if (sums && red > s.total) s.total = red;
  return s;
}

template <typename acc_t, int kOC>
__global__ void __launch_bounds__(kThreads) conv_kernel(ConvArgs<acc_t> a) {
  constexpr int V = 16 / sizeof(acc_t);  // weights per 16-byte shared load
  static_assert(kOC % V == 0, "kOC weights are loaded 16 bytes at a time");
  acc_t* smem = shared_base<acc_t>();
  const int TY = a.TY;
  const int OB = a.TZ * kOC;
  const int tx = threadIdx.x, ty = threadIdx.y, tz = threadIdx.z;
  const int tid = tx + kConvTX * (ty + TY * tz);
  const int k = a.k, kk = k * k, P = (k - 1) / 2;
  const bool sums = a.channel_sums;
  const ConvSmem L = conv_smem(TY, k, a.cc, OB, kOC, sums);
  acc_t* tile = smem;               // [cc][hh][ld]
  acc_t* ws = smem + L.weights;     // [cc][k][k][OB]

  // Block -> (n, group, output-channel chunk, spatial tile).
  const int tiles = a.tiles_h * a.tiles_w;
  int64_t b = blockIdx.x;
  const int st = static_cast<int>(b % tiles);
  b /= tiles;
  const int oc = static_cast<int>(b % a.ochunks);
  b /= a.ochunks;
  const int g = static_cast<int>(b % a.groups);
  const int64_t n = b / a.groups;
  const int64_t y0 = static_cast<int64_t>(st / a.tiles_w) * TY;
  const int64_t x0 = static_cast<int64_t>(st % a.tiles_w) * kTileW;
  const int o_first = g * a.Gout + oc * OB;         // the block's first output channel
  const int o_valid = min(OB, a.Gout - oc * OB);    // how many of its OB channels exist
  const int c_first = g * a.Gin;                    // the group's first input channel

  acc_t acc[kOC][kPx];
#pragma unroll
  for (int q = 0; q < kOC; ++q) {
#pragma unroll
    for (int px = 0; px < kPx; ++px) acc[q][px] = acc_t(0);
  }

  for (int c0 = 0; c0 < a.Gin; c0 += a.cc) {
    const int ccv = min(a.cc, a.Gin - c0);
    __syncthreads();  // the previous chunk has been read
    const int plane = L.hh * L.wv;
    for (int e = tid; e < ccv * plane; e += kThreads) {
      int c, r, q;
      if (a.channels_inner) {
        c = e % ccv;
        const int rq = e / ccv;
        r = rq / L.wv;
        q = rq - r * L.wv;
      } else {
        q = e % L.wv;
        const int rc = e / L.wv;
        r = rc % L.hh;
        c = rc / L.hh;
      }
      tile[(c * L.hh + r) * L.ld + q] = a.in.at(n, c_first + c0 + c, y0 - P + r, x0 - P + q);
    }
    for (int e = tid; e < OB * ccv * kk; e += kThreads) {  // global reads along (c, i, j), contiguous
      const int ij = e % kk;
      const int rest = e / kk;
      const int c = rest % ccv;
      const int ob = rest / ccv;
      ws[(c * kk + ij) * OB + ob] =
          ob < o_valid ? a.weight[(static_cast<int64_t>(o_first + ob) * a.Gin + c0 + c) * kk + ij] : acc_t(0);
    }
    __syncthreads();

    for (int c = 0; c < ccv; ++c) {
      for (int i = 0; i < k; ++i) {
        const acc_t* row = tile + (c * L.hh + ty + i) * L.ld + tx * kPx;
        const acc_t* wrow = ws + (c * kk + i * k) * OB + tz * kOC;
        acc_t v[kPx];  // the window row[j .. j + kPx - 1], slid one pixel per tap j
#pragma unroll
        for (int px = 0; px < kPx; ++px) v[px] = row[px];
        for (int j = 0; j < k; ++j) {
          acc_t w[kOC];
#pragma unroll
          for (int q0 = 0; q0 < kOC; q0 += V) {
            const Vec<acc_t, V> wv = load_vec<V>(wrow + j * OB + q0);
#pragma unroll
            for (int t = 0; t < V; ++t) w[q0 + t] = wv.val[t];
          }
#pragma unroll
          for (int q = 0; q < kOC; ++q) {
#pragma unroll
            for (int px = 0; px < kPx; ++px) acc[q][px] += w[q] * v[px];
          }
          if (j + 1 < k) {
#pragma unroll
            for (int px = 0; px + 1 < kPx; ++px) v[px] = v[px + 1];
            v[kPx - 1] = row[kPx + j];
          }
        }
      }
    }
  }

  // Epilogue, straight from the registers.
  const int64_t y = y0 + ty;
  acc_t sum_ds[kOC], sum_d[kOC];  // kGradS: this thread's du * s and du per channel
#pragma unroll
  for (int q = 0; q < kOC; ++q) {
    sum_ds[q] = acc_t(0);
    sum_d[q] = acc_t(0);
    const int ob = tz * kOC + q;
    if (ob >= o_valid || y >= a.H) continue;
    const int64_t o = o_first + ob;
#pragma unroll
    for (int px = 0; px < kPx; ++px) {
      const int64_t x = x0 + tx * kPx + px;
      if (x >= a.W) continue;
      const int64_t p = y * a.W + x;
      const acc_t v = acc[q][px];
      switch (a.epilogue) {
        case ConvEpilogue::kRaw:
          a.out.store(n, o, p, v + (a.bias != nullptr ? a.bias[o] : acc_t(0)));
          break;
        case ConvEpilogue::kGated: {
          const acc_t z = v + (a.bias != nullptr ? a.bias[o] : acc_t(0));
          const acc_t sg = sigmoid(a.out_scale[o] * z + a.out_shift[o]);
          a.out.store(n, o, p, a.gate_x.template load<acc_t>(n, o, p) * sg);
          break;
        }
        case ConvEpilogue::kGradS: {  // o is a channel of u: s's channel pi(o)
          const int64_t sc = a.s.source(o);
          if (a.s.scale == nullptr) {
            a.out.store(n, sc, p, v);
          } else {
            const acc_t s_val = a.s.map.template load<acc_t>(n, sc, p);
            const acc_t t = a.s.scale[sc] * s_val + a.s.shift[sc];
            const acc_t du = relu_grad(v, t);
            a.out.store(n, sc, p, du * a.s.scale[sc]);
            sum_ds[q] += du * s_val;
            sum_d[q] += du;
          }
          break;
        }
      }
    }
  }

  if (sums) {  // uniform: per-block sums over the tile's pixels, one per channel, fixed order
    const int plane_threads = kConvTX * TY;
    const int pt = tx + kConvTX * ty;
    acc_t* red = smem;  // [OB][2][plane_threads]
    __syncthreads();    // the last chunk's reads are done
#pragma unroll
    for (int q = 0; q < kOC; ++q) {
      red[((tz * kOC + q) * 2 + 0) * plane_threads + pt] = sum_ds[q];
      red[((tz * kOC + q) * 2 + 1) * plane_threads + pt] = sum_d[q];
    }
    __syncthreads();
    for (int e = tid; e < OB * 2; e += kThreads) {
      const int ob = e / 2;
      acc_t v = acc_t(0);
      for (int t = 0; t < plane_threads; ++t) v += red[e * plane_threads + t];
      if (ob < o_valid) {
        const int64_t row = n * tiles + st;
        acc_t* part = e % 2 == 0 ? a.part_scale : a.part_shift;
        part[row * a.s.C + a.s.source(o_first + ob)] = v;
      }
    }
  }
}

// Launch shape of conv_kernel for a, filled into a: kOC = 8 (4 for groups of fewer than 8 output
// channels); TZ channel sets of kOC (up to 4, as many as the group has), TY = 32 / TZ rows of 32
// pixels; cc input channels staged per step within kSmemBudget. Returns the shared memory bytes.
template <typename acc_t>
size_t plan_conv(ConvArgs<acc_t>& a) {
  a.oc_per_thread = a.Gout >= 8 ? 8 : 4;
  a.TZ = static_cast<int>(std::min<int64_t>(4, next_pow2(ceil_div(a.Gout, a.oc_per_thread))));
  a.TY = kThreads / (kConvTX * a.TZ);
  const int OB = a.TZ * a.oc_per_thread;
  a.ochunks = static_cast<int>(ceil_div(a.Gout, OB));
  a.tiles_h = static_cast<int>(ceil_div(a.H, a.TY));
  a.tiles_w = static_cast<int>(ceil_div(a.W, kTileW));
  const ConvSmem one = conv_smem(a.TY, a.k, 1, OB, a.oc_per_thread, false);
  const int64_t per_channel = (one.total + 4) * static_cast<int64_t>(sizeof(acc_t));
  a.cc = static_cast<int>(std::clamp<int64_t>(static_cast<int64_t>(kSmemBudget) / per_channel, 1, 8));
  a.cc = std::max(1, std::min(a.cc, a.Gin));
  return static_cast<size_t>(conv_smem(a.TY, a.k, a.cc, OB, a.oc_per_thread, a.channel_sums).total) * sizeof(acc_t);
}

template <typename Kernel>
void allow_shared_memory(Kernel kernel, size_t bytes, const char* op) {
  const size_t limit = at::cuda::getCurrentDeviceProperties()->sharedMemPerBlockOptin;
  AK_CHECK_VALUE(bytes <= limit, op, ": the kernel size needs ", bytes,
                    " bytes of shared memory per block on CUDA, more than the device's ", limit);
  if (bytes > 48 * 1024) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes)));
  }
}

// a planned by plan_conv, with part_scale / part_shift set when it has channel sums.
template <typename acc_t>
void launch_conv(const ConvArgs<acc_t>& a, size_t smem, const char* op) {
  const int64_t blocks = a.N * a.groups * a.ochunks * static_cast<int64_t>(a.tiles_h) * a.tiles_w;
  if (blocks == 0 || a.Gout == 0) return;
  AK_CHECK_VALUE(blocks <= std::numeric_limits<int32_t>::max(), op, ": the input is too large (", blocks,
                    " conv blocks)");
  const dim3 block(kConvTX, a.TY, a.TZ);
  auto stream = at::cuda::getCurrentCUDAStream();
  if (a.oc_per_thread == 8) {
    auto kernel = conv_kernel<acc_t, 8>;
    allow_shared_memory(kernel, smem, op);
    kernel<<<static_cast<unsigned>(blocks), block, smem, stream>>>(a);
  } else {
    auto kernel = conv_kernel<acc_t, 4>;
    allow_shared_memory(kernel, smem, op);
    kernel<<<static_cast<unsigned>(blocks), block, smem, stream>>>(a);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// ---------------------------------------------------------------------------------------------
// grad_weight and grad_bias.
// ---------------------------------------------------------------------------------------------

template <typename acc_t>
struct WeightGradArgs {
  ConvInput<acc_t> u;   // s through pi and the prologue
  ConvInput<acc_t> gz;  // grad_z, plain
  int64_t C_out;
  int groups, Cg, Og, k;
  int RT, CT;            // thread grid over the block's (4 RT) o x (4 CT) (c, i, j) outputs
  int mblocks, nblocks;  // blocks per group along o and along (c, i, j)
  int nch;               // u channels staged at most (a block's columns span them)
  int64_t ptiles_w, ptiles, pairs;  // kWT x kWT pixel tiles per row / per image; pairs = N * ptiles
  int64_t slices;
  bool u_inner, gz_inner;  // channels_last: staging walks along channels
  acc_t* part_w;           // (slices, C_out * Cg * k * k)
  acc_t* part_b;           // (slices, C_out)
};

__host__ __device__ inline int64_t weight_grad_smem(int RT, int nch, int k) {
  const int uw = kWT + k - 1;
  return static_cast<int64_t>(4 * RT) * kGzLd + static_cast<int64_t>(nch) * uw * (uw | 1);
}

template <typename acc_t>
__global__ void __launch_bounds__(kThreads) weight_grad_kernel(WeightGradArgs<acc_t> a) {
  acc_t* smem = shared_base<acc_t>();
  const int k = a.k, kk = k * k, P = (k - 1) / 2;
  const int uw = kWT + k - 1, ldu = uw | 1;
  const int RT = a.RT, CT = a.CT;
  const int M_blk = 4 * RT, N_blk = 4 * CT;
  acc_t* gzt = smem;                  // [M_blk][kGzLd]: grad_z of the block's o over the pixel tile
  acc_t* ut = smem + M_blk * kGzLd;   // [nch][uw][ldu]: u of the block's channels with the halo

  // Block -> (slice, group, o block, (c, i, j) block).
  int64_t b = blockIdx.x;
  const int nb = static_cast<int>(b % a.nblocks);
  b /= a.nblocks;
  const int mb = static_cast<int>(b % a.mblocks);
  b /= a.mblocks;
  const int g = static_cast<int>(b % a.groups);
  const int64_t slice = b / a.groups;
  const int m0 = mb * M_blk, n0 = nb * N_blk;
  const int Ncol = a.Cg * kk;
  const int rows = min(M_blk, a.Og - m0);
  const int c_lo = n0 / kk;
  const int nchv = Ncol > n0 ? min(a.Cg, (min(n0 + N_blk, Ncol) - 1) / kk + 1) - c_lo : 0;

  const int tid = threadIdx.x;
  const int tx = tid % CT, ty = tid / CT;
  // Offsets of the thread's rows (o) and columns (c, i, j), clamped into the staged tiles.
  int a_row[4], b_off[4];
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    a_row[i] = min(ty + RT * i, rows - 1) * kGzLd;
    const int col = min(n0 + tx + CT * i, max(Ncol - 1, 0));
    const int ij = col % kk;
    b_off[i] = ((col / kk - c_lo) * uw + ij / k) * ldu + ij % k;
  }

  acc_t acc[4][4];
#pragma unroll
  for (int i = 0; i < 4; ++i) {
#pragma unroll
    for (int j = 0; j < 4; ++j) acc[i][j] = acc_t(0);
  }
  acc_t bias_acc = acc_t(0);
  const int64_t pr_begin = slice * a.pairs / a.slices;
  const int64_t pr_end = (slice + 1) * a.pairs / a.slices;
  for (int64_t pr = pr_begin; pr < pr_end; ++pr) {
    const int64_t n = pr / a.ptiles;
    const int64_t t = pr - n * a.ptiles;
    const int64_t y0 = (t / a.ptiles_w) * kWT, x0 = (t % a.ptiles_w) * kWT;
    __syncthreads();  // the previous tile has been read
    for (int e = tid; e < rows * kWP; e += kThreads) {
      int m, q;
      if (a.gz_inner) {
        m = e % rows;
        q = e / rows;
      } else {
        q = e % kWP;
        m = e / kWP;
      }
      gzt[m * kGzLd + q] = a.gz.at(n, static_cast<int64_t>(g) * a.Og + m0 + m, y0 + q / kWT, x0 + q % kWT);
    }
    const int plane = uw * uw;
    for (int e = tid; e < nchv * plane; e += kThreads) {
      int c, r, q;
      if (a.u_inner) {
        c = e % nchv;
        const int rq = e / nchv;
        r = rq / uw;
        q = rq - r * uw;
      } else {
        q = e % uw;
        const int rc = e / uw;
        r = rc % uw;
        c = rc / uw;
      }
      ut[(c * uw + r) * ldu + q] = a.u.at(n, static_cast<int64_t>(g) * a.Cg + c_lo + c, y0 - P + r, x0 - P + q);
    }
    __syncthreads();
    if (nchv > 0) {
      // Only the tile's pixels inside the image: past its edge grad_z is 0, but the u it would
      // meet may be inside the image and infinite, and 0 * inf is a NaN no sum of the conv has.
      const int vy = a.gz.H - y0 < kWT ? static_cast<int>(a.gz.H - y0) : kWT;
      const int vx = a.gz.W - x0 < kWT ? static_cast<int>(a.gz.W - x0) : kWT;
      auto pixel = [&](int py, int px) {  // acc += grad_z[o] * u[c, i, j] at one pixel
        acc_t av[4], bv[4];
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          av[i] = gzt[a_row[i] + py * kWT + px];
          bv[i] = ut[b_off[i] + py * ldu + px];
        }
#pragma unroll
        for (int i = 0; i < 4; ++i) {
#pragma unroll
          for (int j = 0; j < 4; ++j) acc[i][j] += av[i] * bv[j];
        }
      };
      if (vx == kWT) {  // a whole row of the tile: unrolled
        for (int py = 0; py < vy; ++py) {
#pragma unroll
          for (int px = 0; px < kWT; ++px) pixel(py, px);
        }
      } else {  // the image's right edge
        for (int py = 0; py < vy; ++py) {
#pragma unroll 1
          for (int px = 0; px < vx; ++px) pixel(py, px);
        }
      }
    }
    if (nb == 0 && tid < rows) {  // grad_bias rides along in the first column block
      for (int q = 0; q < kWP; ++q) bias_acc += gzt[tid * kGzLd + q];
    }
  }

  acc_t* part_w = a.part_w + slice * a.C_out * Ncol;
#pragma unroll
  for (int i = 0; i < 4; ++i) {
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int m = ty + RT * i;
      const int col = n0 + tx + CT * j;
      if (m < rows && col < Ncol) part_w[(static_cast<int64_t>(g) * a.Og + m0 + m) * Ncol + col] = acc[i][j];
    }
  }
  if (nb == 0 && tid < rows) a.part_b[slice * a.C_out + static_cast<int64_t>(g) * a.Og + m0 + tid] = bias_acc;
}

// total[j] = sum over slices s = 0, 1, ... of part[s][j], in slice order.
template <typename acc_t>
__global__ void __launch_bounds__(kThreads)
    sum_slices_kernel(const acc_t* __restrict__ part, int64_t slices, int64_t len, acc_t* __restrict__ total) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t j = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; j < len; j += stride) {
    acc_t v = acc_t(0);
    for (int64_t s = 0; s < slices; ++s) v += part[s * len + j];
    total[j] = v;
  }
}

// (len) acc values: the slice-ordered sum of part (slices, len); zeros when slices == 0.
template <typename acc_t>
at::Tensor sum_slices(const at::Tensor& part, int64_t slices, int64_t len) {
  at::Tensor total = at::empty({len}, part.options());
  if (len == 0) return total;
  const int64_t blocks = std::min(ceil_div(len, kThreads), kMaxGrid);
  sum_slices_kernel<acc_t><<<blocks, kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
      part.data_ptr<acc_t>(), slices, len, total.data_ptr<acc_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return total;
}

// Launches weight_grad_kernel; returns (grad_weight as (C_out * Cg * k * k), grad_bias (C_out)) in acc.
template <typename acc_t>
std::tuple<at::Tensor, at::Tensor> weight_grads(WeightGradArgs<acc_t> a, int64_t N, int64_t H, int64_t W,
                                                const at::TensorOptions& acc_options, const char* op) {
  const int kk = a.k * a.k;
  const int64_t Ncol = static_cast<int64_t>(a.Cg) * kk;
  // A block's thread grid: RT rows of o (up to 16, as the group has) x CT columns; fewer columns
  // (more rows) when the columns' u channels would not fit the staging budget (small k).
  a.RT = static_cast<int>(std::min<int64_t>(16, next_pow2(ceil_div(a.Og, 4))));
  a.CT = kThreads / a.RT;
  auto nch_for = [&](int CT) { return static_cast<int>(std::min<int64_t>(a.Cg, (4 * CT - 1) / kk + 2)); };
  while (weight_grad_smem(a.RT, nch_for(a.CT), a.k) * static_cast<int64_t>(sizeof(acc_t)) >
             static_cast<int64_t>(kSmemBudget) &&
         a.CT > 4) {
    a.CT /= 2;
    a.RT *= 2;
  }
  a.nch = nch_for(a.CT);
  a.mblocks = static_cast<int>(ceil_div(a.Og, 4 * a.RT));
  a.nblocks = static_cast<int>(std::max<int64_t>(1, ceil_div(Ncol, 4 * a.CT)));
  a.ptiles_w = ceil_div(W, kWT);
  a.ptiles = ceil_div(H, kWT) * a.ptiles_w;
  a.pairs = N * a.ptiles;
  const size_t smem = static_cast<size_t>(weight_grad_smem(a.RT, a.nch, a.k)) * sizeof(acc_t);
  auto kernel = weight_grad_kernel<acc_t>;
  allow_shared_memory(kernel, smem, op);

  // Slices of the (sample, pixel tile) pairs: enough blocks to fill the GPU once, within 256 MiB of
  // partial sums.
  const int64_t base_blocks = static_cast<int64_t>(a.groups) * a.mblocks * a.nblocks;
  int per_sm = 0;
  C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kThreads, smem));
  const int64_t slice_bytes = (a.C_out * Ncol + a.C_out) * static_cast<int64_t>(sizeof(acc_t));
  const int64_t max_slices = std::max<int64_t>(1, (int64_t{256} << 20) / std::max<int64_t>(1, slice_bytes));
  a.slices = std::min({ceil_div(std::max<int64_t>(1, per_sm) * sm_count(), base_blocks), a.pairs, max_slices,
                       kMaxGrid / base_blocks});
  a.slices = std::max<int64_t>(1, a.slices);
  at::Tensor part_w = at::empty({a.slices, a.C_out * Ncol}, acc_options);
  at::Tensor part_b = at::empty({a.slices, a.C_out}, acc_options);
  a.part_w = part_w.data_ptr<acc_t>();
  a.part_b = part_b.data_ptr<acc_t>();
  kernel<<<base_blocks * a.slices, kThreads, smem, at::cuda::getCurrentCUDAStream()>>>(a);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {sum_slices<acc_t>(part_w, a.slices, a.C_out * Ncol), sum_slices<acc_t>(part_b, a.slices, a.C_out)};
}

// ---------------------------------------------------------------------------------------------
// The epilogue alone and its backward.
// ---------------------------------------------------------------------------------------------

template <typename acc_t>
struct EpilogueArgs {
  FeatureMap z, gate_x, grad_y;
  FeatureMap y;       // forward: y;  backward: grad_gate_x (both in gate_x's dtype and layout)
  FeatureMap grad_z;  // backward, in z's dtype and layout
  const acc_t* out_scale;
  const acc_t* out_shift;
  const acc_t* mean;  // backward with BatchNorm statistics, else nullptr
  const acc_t* rstd;
  const acc_t* sums;  // backward: (3, C): sum dpre, sum dpre * z, sum dpre * (z - mean)
  int64_t N, C, HW;
  bool channels_inner;  // walk gate_x's layout: along channels for channels_last
};

// Element e of the walk (gate_x's layout) as (n, c, p).
template <typename acc_t>
__device__ __forceinline__ void walk_index(const EpilogueArgs<acc_t>& a, int64_t e, int64_t& n, int64_t& c,
                                           int64_t& p) {
  if (a.channels_inner) {
    c = e % a.C;
    const int64_t rest = e / a.C;
    p = rest % a.HW;
    n = rest / a.HW;
  } else {
    p = e % a.HW;
    const int64_t rest = e / a.HW;
    c = rest % a.C;
    n = rest / a.C;
  }
}

template <typename acc_t>
__global__ void __launch_bounds__(kThreads) epilogue_kernel(EpilogueArgs<acc_t> a) {
  const int64_t numel = a.N * a.C * a.HW;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < numel; e += stride) {
    int64_t n, c, p;
    walk_index(a, e, n, c, p);
    const acc_t z = a.z.template load<acc_t>(n, c, p);
    const acc_t sg = sigmoid(a.out_scale[c] * z + a.out_shift[c]);
    a.y.store(n, c, p, a.gate_x.template load<acc_t>(n, c, p) * sg);
  }
}

// The epilogue's backward at one element: z, sg and dpre = grad_y * gate_x * sg * (1 - sg).
template <typename acc_t>
struct EpilogueGrad {
  acc_t z, sg, grad_y, dpre;
};

template <typename acc_t>
__device__ __forceinline__ EpilogueGrad<acc_t> epilogue_grad(const EpilogueArgs<acc_t>& a, int64_t n, int64_t c,
                                                             int64_t p) {
  EpilogueGrad<acc_t> r;
  r.z = a.z.template load<acc_t>(n, c, p);
  r.sg = sigmoid(a.out_scale[c] * r.z + a.out_shift[c]);
  r.grad_y = a.grad_y.template load<acc_t>(n, c, p);
  r.dpre = r.grad_y * a.gate_x.template load<acc_t>(n, c, p) * r.sg * (acc_t(1) - r.sg);
  return r;
}

// Per-channel partial sums over a slice of the N*HW rows: part[slice][q][c], q = 0: dpre,
// 1: dpre * z, 2: dpre * (z - mean). A block is 8 warps x 32 lanes over (channels, rows): for
// channels_last the lanes take 32 channels and the warps rows; for NCHW each warp takes a channel
// and its lanes consecutive rows (pixels). The block combines its threads in a fixed order.
template <typename acc_t>
__global__ void __launch_bounds__(kThreads)
    epilogue_sums_kernel(EpilogueArgs<acc_t> a, int64_t rows_per_slice, acc_t* __restrict__ part) {
  __shared__ acc_t red[3][kThreads];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int per_block = a.channels_inner ? 32 : kThreads / 32;  // channels per block
  const int64_t c = static_cast<int64_t>(blockIdx.x) * per_block + (a.channels_inner ? lane : warp);
  const int row_first = a.channels_inner ? warp : lane;
  const int row_step = a.channels_inner ? kThreads / 32 : 32;
  const int64_t slice = blockIdx.y;
  const int64_t rows = a.N * a.HW;
  const int64_t r_begin = slice * rows_per_slice;
  const int64_t r_end = min(rows, r_begin + rows_per_slice);
  acc_t s0 = acc_t(0), s1 = acc_t(0), s2 = acc_t(0);
  if (c < a.C) {
    const acc_t mu = a.mean != nullptr ? a.mean[c] : acc_t(0);
    for (int64_t r = r_begin + row_first; r < r_end; r += row_step) {
      const int64_t n = r / a.HW;
      const EpilogueGrad<acc_t> d = epilogue_grad(a, n, c, r - n * a.HW);
      s0 += d.dpre;
      s1 += d.dpre * d.z;
      s2 += d.dpre * (d.z - mu);
    }
  }
  red[0][threadIdx.x] = s0;
  red[1][threadIdx.x] = s1;
  red[2][threadIdx.x] = s2;
  __syncthreads();
  if (threadIdx.x < per_block) {
    const int64_t ch = static_cast<int64_t>(blockIdx.x) * per_block + threadIdx.x;
    const int count = kThreads / per_block;  // threads of this channel
    acc_t t[3] = {acc_t(0), acc_t(0), acc_t(0)};
    for (int i = 0; i < count; ++i) {
      const int idx = a.channels_inner ? i * 32 + threadIdx.x : threadIdx.x * 32 + i;
#pragma unroll
      for (int q = 0; q < 3; ++q) t[q] += red[q][idx];
    }
    if (ch < a.C) {
#pragma unroll
      for (int q = 0; q < 3; ++q) part[(slice * 3 + q) * a.C + ch] = t[q];
    }
  }
}

// grad_gate_x = grad_y * sg;  grad_z = dpre * out_scale, or with the batch statistics
// out_scale * (dpre - sum dpre / M - (z - mean) * rstd^2 * sum(dpre * (z - mean)) / M).
template <typename acc_t>
__global__ void __launch_bounds__(kThreads) epilogue_backward_kernel(EpilogueArgs<acc_t> a) {
  const int64_t numel = a.N * a.C * a.HW;
  const acc_t M = static_cast<acc_t>(a.N * a.HW);
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < numel; e += stride) {
    int64_t n, c, p;
    walk_index(a, e, n, c, p);
    const EpilogueGrad<acc_t> d = epilogue_grad(a, n, c, p);
    a.y.store(n, c, p, d.grad_y * d.sg);
    acc_t gz;
    if (a.mean == nullptr) {
      gz = d.dpre * a.out_scale[c];
    } else {
      const acc_t rstd = a.rstd[c];
      gz = a.out_scale[c] *
           (d.dpre - a.sums[c] / M - (d.z - a.mean[c]) * rstd * rstd * a.sums[2 * a.C + c] / M);
    }
    a.grad_z.store(n, c, p, gz);
  }
}

template <typename Kernel, typename Args>
void launch_elementwise(Kernel kernel, const Args& a, int64_t numel) {
  const int64_t blocks = std::min(ceil_div(numel, kThreads), sm_count() * (2048 / kThreads) * 4);
  kernel<<<blocks, kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(a);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// ---------------------------------------------------------------------------------------------
// Host side.
// ---------------------------------------------------------------------------------------------

// Feature maps' dtypes: common.h's check_feature_dtype, as the CPU kernels check them.

// A small parameter as a contiguous vector in acc (nullptr-able through ptr_or_null).
at::Tensor acc_vector(const at::Tensor& t, at::ScalarType acc) { return t.reshape(-1).to(acc).contiguous(); }

template <typename acc_t>
const acc_t* ptr_or_null(const at::Tensor& t) {
  return t.defined() ? t.data_ptr<acc_t>() : nullptr;
}

template <typename acc_t>
ConvInput<acc_t> conv_input(const at::Tensor& t, int64_t shuffle_groups, const at::Tensor& scale,
                            const at::Tensor& shift) {
  return {feature_map(t), t.size(1), static_cast<int>(shuffle_groups), ptr_or_null<acc_t>(scale),
          ptr_or_null<acc_t>(shift), t.size(2), t.size(3)};
}

struct ConvParams {  // the small parameters in acc (undefined where absent)
  at::Tensor weight, bias, in_scale, in_shift, out_scale, out_shift;
};

template <typename acc_t>
void run_conv_forward(const at::Tensor& s, const ConvParams& p, int64_t groups, int64_t shuffle_groups,
                      const at::Tensor& gate_x, const at::Tensor& out) {
  ConvArgs<acc_t> a{};
  a.in = conv_input<acc_t>(s, shuffle_groups, p.in_scale, p.in_shift);
  a.weight = p.weight.data_ptr<acc_t>();
  a.N = s.size(0);
  a.H = s.size(2);
  a.W = s.size(3);
  a.C_out = static_cast<int>(p.weight.size(0));
  a.groups = static_cast<int>(groups);
  a.Gin = static_cast<int>(s.size(1) / groups);
  a.Gout = static_cast<int>(a.C_out / groups);
  a.k = static_cast<int>(p.weight.size(2));
  a.channels_inner = layout_of(s) == Layout::ChannelsLast;
  a.epilogue = gate_x.defined() ? ConvEpilogue::kGated : ConvEpilogue::kRaw;
  a.out = feature_map(out);
  a.bias = ptr_or_null<acc_t>(p.bias);
  if (gate_x.defined()) {
    a.gate_x = feature_map(gate_x);
    a.out_scale = p.out_scale.data_ptr<acc_t>();
    a.out_shift = p.out_shift.data_ptr<acc_t>();
  }
  const size_t smem = plan_conv(a);
  launch_conv(a, smem, "shuffle_conv");
}

at::Tensor shuffle_conv_cuda(const at::Tensor& s_in, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                             int64_t groups, int64_t shuffle_groups, const c10::optional<at::Tensor>& in_scale,
                             const c10::optional<at::Tensor>& in_shift, const c10::optional<at::Tensor>& gate_x_in,
                             const c10::optional<at::Tensor>& out_scale, const c10::optional<at::Tensor>& out_shift) {
  constexpr const char* op = "shuffle_conv";
  check_shuffle_conv_args(s_in, weight, groups, shuffle_groups, in_scale, in_shift, op);
  AK_CHECK_VALUE(s_in.is_cuda(), op, ": s must be a CUDA tensor, got ", s_in.device());
  check_feature_dtype(s_in, op, "s");
  const int64_t N = s_in.size(0), H = s_in.size(2), W = s_in.size(3), C_out = weight.size(0);
  if (bias.has_value()) check_vector(*bias, C_out, s_in.device(), op, "bias", "C_out");
  const bool gated = gate_x_in.has_value();
  AK_CHECK_VALUE(out_scale.has_value() == gated && out_shift.has_value() == gated, op,
                    ": gate_x, out_scale and out_shift must be given together");
  const std::vector<int64_t> out_sizes{N, C_out, H, W};
  if (gated) {
    check_epilogue_args(*gate_x_in, *out_scale, *out_shift, out_sizes, s_in.device(), op);
    check_feature_dtype(*gate_x_in, op, "gate_x");
  }
  c10::cuda::CUDAGuard device_guard(s_in.device());
  const at::Tensor s = dense(s_in);
  const at::ScalarType acc = acc_type(s.scalar_type());
  const at::Tensor gate_x = gated ? dense(*gate_x_in) : at::Tensor();
  at::Tensor out = gated ? empty_like_layout(gate_x)
                         : at::empty(out_sizes, s.options().dtype(acc).memory_format(memory_format_of(layout_of(s))));
  if (out.numel() == 0) {
    return out;
  }
  ConvParams p;
  p.weight = weight.to(acc).contiguous();
  if (bias.has_value()) p.bias = acc_vector(*bias, acc);
  if (in_scale.has_value()) {
    p.in_scale = acc_vector(*in_scale, acc);
    p.in_shift = acc_vector(*in_shift, acc);
  }
  if (gated) {
    p.out_scale = acc_vector(*out_scale, acc);
    p.out_shift = acc_vector(*out_shift, acc);
  }
  if (acc == at::kDouble) {
    run_conv_forward<double>(s, p, groups, shuffle_groups, gate_x, out);
  } else {
    run_conv_forward<float>(s, p, groups, shuffle_groups, gate_x, out);
  }
  return out;
}

// grad_s (with the in_scale / in_shift sums) and grad_weight / grad_bias, all in acc where summed.
template <typename acc_t>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> run_conv_backward(
    const at::Tensor& grad_z, const at::Tensor& s, const ConvParams& p, int64_t groups, int64_t shuffle_groups,
    const at::Tensor& grad_s) {
  constexpr const char* op = "shuffle_conv_backward";
  const int64_t N = s.size(0), C_in = s.size(1), H = s.size(2), W = s.size(3);
  const int64_t C_out = p.weight.size(0), k = p.weight.size(2);
  const int64_t Cg = C_in / groups, Og = C_out / groups;
  const auto acc_options = s.options().dtype(c10::CppTypeToScalarType<acc_t>::value);
  const bool affine = p.in_scale.defined();

  // grad_s: the transposed conv, weights W'[g*Cg + c][o][i][j] = W[g*Og + o][c][k-1-i][k-1-j].
  const at::Tensor w_t =
      p.weight.reshape({groups, Og, Cg, k, k}).transpose(1, 2).flip({3, 4}).reshape({C_in, Og, k, k}).contiguous();
  ConvArgs<acc_t> a{};
  a.in = conv_input<acc_t>(grad_z, 1, at::Tensor(), at::Tensor());
  a.weight = w_t.data_ptr<acc_t>();
  a.N = N;
  a.H = H;
  a.W = W;
  a.C_out = static_cast<int>(C_in);
  a.groups = static_cast<int>(groups);
  a.Gin = static_cast<int>(Og);
  a.Gout = static_cast<int>(Cg);
  a.k = static_cast<int>(k);
  a.channels_inner = layout_of(grad_z) == Layout::ChannelsLast;
  a.epilogue = ConvEpilogue::kGradS;
  a.out = feature_map(grad_s);
  a.s = conv_input<acc_t>(s, shuffle_groups, p.in_scale, p.in_shift);
  a.channel_sums = affine;
  size_t smem = plan_conv(a);
  at::Tensor part_scale, part_shift;
  const int64_t rows = N * static_cast<int64_t>(a.tiles_h) * a.tiles_w;
  if (affine) {
    part_scale = at::zeros({rows, C_in}, acc_options);  // every entry is written; zeros for Cg = 0
    part_shift = at::zeros({rows, C_in}, acc_options);
    a.part_scale = part_scale.data_ptr<acc_t>();
    a.part_shift = part_shift.data_ptr<acc_t>();
  }
  launch_conv(a, smem, op);
  at::Tensor grad_in_scale, grad_in_shift;
  if (affine) {
    grad_in_scale = sum_slices<acc_t>(part_scale, rows, C_in);
    grad_in_shift = sum_slices<acc_t>(part_shift, rows, C_in);
  }

  WeightGradArgs<acc_t> wg{};
  wg.u = conv_input<acc_t>(s, shuffle_groups, p.in_scale, p.in_shift);
  wg.gz = conv_input<acc_t>(grad_z, 1, at::Tensor(), at::Tensor());
  wg.C_out = C_out;
  wg.groups = static_cast<int>(groups);
  wg.Cg = static_cast<int>(Cg);
  wg.Og = static_cast<int>(Og);
  wg.k = static_cast<int>(k);
  wg.u_inner = layout_of(s) == Layout::ChannelsLast;
  wg.gz_inner = layout_of(grad_z) == Layout::ChannelsLast;
  auto [grad_weight, grad_bias] = weight_grads<acc_t>(wg, N, H, W, acc_options, op);
  return {grad_weight, grad_bias, grad_in_scale, grad_in_shift};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> shuffle_conv_backward_cuda(
    const at::Tensor& grad_z_in, const at::Tensor& s_in, const at::Tensor& weight, int64_t groups,
    int64_t shuffle_groups, const c10::optional<at::Tensor>& in_scale, const c10::optional<at::Tensor>& in_shift) {
  constexpr const char* op = "shuffle_conv_backward";
  check_shuffle_conv_args(s_in, weight, groups, shuffle_groups, in_scale, in_shift, op);
  AK_CHECK_VALUE(s_in.is_cuda(), op, ": s must be a CUDA tensor, got ", s_in.device());
  check_feature_dtype(s_in, op, "s");
  const int64_t N = s_in.size(0), C_in = s_in.size(1), H = s_in.size(2), W = s_in.size(3), C_out = weight.size(0);
  const std::vector<int64_t> z_sizes{N, C_out, H, W};
  AK_CHECK_VALUE(grad_z_in.sizes() == at::IntArrayRef(z_sizes), op,
                    ": grad_z must have the output's shape (N, C_out, H, W) = ", at::IntArrayRef(z_sizes), ", got ",
                    grad_z_in.sizes());
  check_feature_dtype(grad_z_in, op, "grad_z");
  check_cuda(grad_z_in, s_in, op, "grad_z");
  c10::cuda::CUDAGuard device_guard(s_in.device());
  const at::Tensor s = dense(s_in);
  const at::Tensor grad_z = dense(grad_z_in);
  const at::ScalarType acc = acc_type(s.scalar_type());
  const auto acc_options = s.options().dtype(acc);
  const bool affine = in_scale.has_value();
  at::Tensor grad_s = empty_like_layout(s);

  at::Tensor gw, gb, gscale, gshift;  // sums in acc
  if (N * H * W == 0) {
    gw = at::zeros({weight.numel()}, acc_options);
    gb = at::zeros({C_out}, acc_options);
    gscale = at::zeros({C_in}, acc_options);
    gshift = at::zeros({C_in}, acc_options);
  } else {
    ConvParams p;
    p.weight = weight.to(acc).contiguous();
    if (affine) {
      p.in_scale = acc_vector(*in_scale, acc);
      p.in_shift = acc_vector(*in_shift, acc);
    }
    std::tie(gw, gb, gscale, gshift) =
        acc == at::kDouble ? run_conv_backward<double>(grad_z, s, p, groups, shuffle_groups, grad_s)
                           : run_conv_backward<float>(grad_z, s, p, groups, shuffle_groups, grad_s);
  }
  // Each in its parameter's dtype (copy=true: separate tensors); without the affine, (0,) in acc.
  at::Tensor grad_weight = gw.view(weight.sizes()).to(weight.scalar_type(), false, true);
  at::Tensor grad_bias = gb.to(weight.scalar_type(), false, true);
  at::Tensor grad_in_scale = affine ? gscale.to(in_scale->scalar_type(), false, true) : at::empty({0}, acc_options);
  at::Tensor grad_in_shift = affine ? gshift.to(in_shift->scalar_type(), false, true) : at::empty({0}, acc_options);
  return {grad_s, grad_weight, grad_bias, grad_in_scale, grad_in_shift};
}

void check_epilogue_cuda(const at::Tensor& z, const at::Tensor& gate_x, const at::Tensor& out_scale,
                         const at::Tensor& out_shift, const char* op) {
  check_feature_map(z, op, "z");
  AK_CHECK_VALUE(z.is_cuda(), op, ": z must be a CUDA tensor, got ", z.device());
  check_feature_dtype(z, op, "z");
  check_epilogue_args(gate_x, out_scale, out_shift, z.sizes(), z.device(), op);
  check_feature_dtype(gate_x, op, "gate_x");
}

template <typename acc_t>
EpilogueArgs<acc_t> make_epilogue_args(const at::Tensor& z, const at::Tensor& gate_x, const at::Tensor& out_scale,
                                       const at::Tensor& out_shift) {
  EpilogueArgs<acc_t> a{};
  a.z = feature_map(z);
  a.gate_x = feature_map(gate_x);
  a.out_scale = out_scale.data_ptr<acc_t>();
  a.out_shift = out_shift.data_ptr<acc_t>();
  a.N = z.size(0);
  a.C = z.size(1);
  a.HW = z.size(2) * z.size(3);
  a.channels_inner = layout_of(gate_x) == Layout::ChannelsLast;
  return a;
}

at::Tensor shuffle_conv_epilogue_cuda(const at::Tensor& z_in, const at::Tensor& gate_x_in,
                                      const at::Tensor& out_scale, const at::Tensor& out_shift) {
  constexpr const char* op = "shuffle_conv_epilogue";
  check_epilogue_cuda(z_in, gate_x_in, out_scale, out_shift, op);
  c10::cuda::CUDAGuard device_guard(z_in.device());
  const at::Tensor z = dense(z_in);
  const at::Tensor gate_x = dense(gate_x_in);
  at::Tensor y = empty_like_layout(gate_x);
  if (y.numel() == 0) {
    return y;
  }
  const at::ScalarType acc = acc_type(z.scalar_type());
  const at::Tensor scale = acc_vector(out_scale, acc), shift = acc_vector(out_shift, acc);
  auto run = [&](auto tag) {
    using acc_t = decltype(tag);
    EpilogueArgs<acc_t> a = make_epilogue_args<acc_t>(z, gate_x, scale, shift);
    a.y = feature_map(y);
    launch_elementwise(epilogue_kernel<acc_t>, a, y.numel());
  };
  if (acc == at::kDouble) {
    run(double{});
  } else {
    run(float{});
  }
  return y;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> shuffle_conv_epilogue_backward_cuda(
    const at::Tensor& grad_y_in, const at::Tensor& z_in, const at::Tensor& gate_x_in, const at::Tensor& out_scale,
    const at::Tensor& out_shift, const c10::optional<at::Tensor>& mean_in, const c10::optional<at::Tensor>& rstd_in) {
  constexpr const char* op = "shuffle_conv_epilogue_backward";
  check_epilogue_cuda(z_in, gate_x_in, out_scale, out_shift, op);
  AK_CHECK_VALUE(grad_y_in.sizes() == z_in.sizes(), op, ": grad_y must have z's shape ", z_in.sizes(), ", got ",
                    grad_y_in.sizes());
  check_feature_dtype(grad_y_in, op, "grad_y");
  check_cuda(grad_y_in, z_in, op, "grad_y");
  AK_CHECK_VALUE(mean_in.has_value() == rstd_in.has_value(), op,
                    ": mean and rstd must be given together (the batch statistics of z)");
  const int64_t C = z_in.size(1);
  const bool stats = mean_in.has_value();
  if (stats) {
    check_vector(*mean_in, C, z_in.device(), op, "mean", "C");
    check_vector(*rstd_in, C, z_in.device(), op, "rstd", "C");
  }
  c10::cuda::CUDAGuard device_guard(z_in.device());
  const at::Tensor z = dense(z_in);
  const at::Tensor gate_x = dense(gate_x_in);
  const at::Tensor grad_y = dense(grad_y_in);
  const at::ScalarType acc = acc_type(z.scalar_type());
  at::Tensor grad_z = empty_like_layout(z);
  at::Tensor grad_gate_x = empty_like_layout(gate_x);
  at::Tensor sums = at::zeros({3, C}, z.options().dtype(acc));  // sum dpre, sum dpre*z, sum dpre*(z-mean)
  if (z.numel() > 0) {
    const at::Tensor scale = acc_vector(out_scale, acc), shift = acc_vector(out_shift, acc);
    const at::Tensor mean = stats ? acc_vector(*mean_in, acc) : at::Tensor();
    const at::Tensor rstd = stats ? acc_vector(*rstd_in, acc) : at::Tensor();
    auto run = [&](auto tag) {
      using acc_t = decltype(tag);
      EpilogueArgs<acc_t> a = make_epilogue_args<acc_t>(z, gate_x, scale, shift);
      a.grad_y = feature_map(grad_y);
      a.mean = ptr_or_null<acc_t>(mean);
      a.rstd = ptr_or_null<acc_t>(rstd);
      // First the per-channel sums (the BatchNorm form of grad_z needs them), in slices of rows
      // sized for about four blocks per SM.
      const int64_t rows = a.N * a.HW;
      const int64_t per_block = a.channels_inner ? 32 : kThreads / 32;
      const int64_t c_blocks = ceil_div(C, per_block);
      int64_t slices = std::clamp<int64_t>(ceil_div(sm_count() * 4, c_blocks), 1, ceil_div(rows, kThreads));
      slices = std::min<int64_t>(slices, 65535);
      const int64_t rows_per_slice = ceil_div(rows, slices);
      slices = ceil_div(rows, rows_per_slice);
      at::Tensor part = at::empty({slices, 3, C}, sums.options());
      epilogue_sums_kernel<acc_t>
          <<<dim3(static_cast<unsigned>(c_blocks), static_cast<unsigned>(slices)), kThreads, 0,
             at::cuda::getCurrentCUDAStream()>>>(a, rows_per_slice, part.data_ptr<acc_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      sums = sum_slices<acc_t>(part, slices, 3 * C).view({3, C});
      // Then the elementwise pass.
      a.sums = sums.data_ptr<acc_t>();
      a.y = feature_map(grad_gate_x);
      a.grad_z = feature_map(grad_z);
      launch_elementwise(epilogue_backward_kernel<acc_t>, a, z.numel());
    };
    if (acc == at::kDouble) {
      run(double{});
    } else {
      run(float{});
    }
  }
  at::Tensor grad_out_scale = sums[1].to(out_scale.scalar_type(), false, true);
  at::Tensor grad_out_shift = sums[0].to(out_shift.scalar_type(), false, true);
  return {grad_z, grad_gate_x, grad_out_scale, grad_out_shift};
}

}  // namespace
}  // namespace attnkernels

TORCH_LIBRARY_IMPL(attnkernels, CUDA, m) {
  m.impl("shuffle_conv", &attnkernels::shuffle_conv_cuda);
  m.impl("shuffle_conv_backward", &attnkernels::shuffle_conv_backward_cuda);
  m.impl("shuffle_conv_epilogue", &attnkernels::shuffle_conv_epilogue_cuda);
  m.impl("shuffle_conv_epilogue_backward", &attnkernels::shuffle_conv_epilogue_backward_cuda);
}
