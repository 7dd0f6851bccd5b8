// Per-plane statistics on CPU shared by the block tails' kernels (cpu/block_tail.cpp,
// cpu/spatial_tail.cpp): the shift that keeps a plane's sums small, Chan's combination of
// partial (mean, m2) pairs, and the grain of a parallel loop over planes.
#pragma once

#include <ATen/OpMathType.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cmath>
#include <cstdint>

namespace attnkernels {
namespace cpu_stats {

// Grain for parallel loops over planes: about 32K elements a task, so tiny planes are batched.
inline int64_t plane_grain(int64_t hw) { return std::max<int64_t>(1, 32768 / std::max<int64_t>(hw, 1)); }

// The statistics are accumulated shifted by k, a value of the plane itself (its first, at
// pixel 0; 0 where that is not finite): sums of z - k stay near P * std where z's own sums
// grow to P * |mean|, so a fp32 mean of z = 1000 + noise is not lost to the sum's rounding.
template <typename scalar_t>
inline at::opmath_type<scalar_t> shift_of(scalar_t first) {
  const auto k = static_cast<at::opmath_type<scalar_t>>(first);
  return std::isfinite(k) ? k : decltype(k)(0);
}

// Chan's combination, len values at a time: (mean, m2) of count_a values and (mean_b, m2_b) of
// count_b more become those of all count_a + count_b. count_a = 0 takes b as it is (a
// delta * 0 would turn an infinite mean into NaN).
template <typename acc_t>
void chan_merge(acc_t* mean, acc_t* m2, int64_t count_a, const acc_t* mean_b, const acc_t* m2_b, int64_t count_b,
                int64_t len) {
  if (count_a == 0) {
    std::copy(mean_b, mean_b + len, mean);
    std::copy(m2_b, m2_b + len, m2);
    return;
  }
  using V = at::vec::Vectorized<acc_t>;
  const acc_t total = static_cast<acc_t>(count_a + count_b);
  const acc_t wb = static_cast<acc_t>(count_b) / total;
  const acc_t wab = static_cast<acc_t>(count_a) * static_cast<acc_t>(count_b) / total;
  int64_t i = 0;
  for (; i + V::size() <= len; i += V::size()) {
    const V ma = V::loadu(mean + i), delta = V::loadu(mean_b + i) - ma;
    (ma + delta * V(wb)).store(mean + i);
    (V::loadu(m2 + i) + V::loadu(m2_b + i) + delta * delta * V(wab)).store(m2 + i);
  }
  for (; i < len; ++i) {
    const acc_t delta = mean_b[i] - mean[i];
    mean[i] += delta * wb;
    m2[i] += m2_b[i] + delta * delta * wab;
  }
}

}  // namespace cpu_stats
}  // namespace attnkernels
