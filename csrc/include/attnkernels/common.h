// Host-side helpers two or more hot paths share: layouts, accumulation types, the argument checks of
// feature maps, per-channel maps and parameter vectors. A hot path's own checks live in
// attnkernels/<hot_path>.h, which includes this file.
// Checks raise c10::ValueError / c10::TypeError, which Python sees as ValueError / TypeError.
#pragma once

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <c10/core/impl/LocalDispatchKeySet.h>

#include <string>
#include <type_traits>

namespace attnkernels {

// An error message as one std::string, built without std::ostream. On the GPU machine (torch
// 2.11, CUDA 13.0 image) the first number that c10::str streamed inside this library crashed the
// process (benchmarks/NOTES.md, session 17); c10 hands a single string to the error untouched,
// and c10's own formatting (Device::str) runs inside libc10. Texts read as c10::str's would.
namespace detail {
inline void append(std::string& s, const char* v) { s += v; }
inline void append(std::string& s, const std::string& v) { s += v; }
template <typename T, std::enable_if_t<std::is_integral_v<T>, int> = 0>
void append(std::string& s, T v) {
  s += std::to_string(v);
}
inline void append(std::string& s, at::ScalarType v) { s += c10::toString(v); }
inline void append(std::string& s, const at::Device& v) { s += v.str(); }
inline void append(std::string& s, at::IntArrayRef v) {  // "[2, 3, 4]", as c10 prints sizes
  s += '[';
  for (size_t i = 0; i < v.size(); ++i) {
    if (i > 0) s += ", ";
    s += std::to_string(v[i]);
  }
  s += ']';
}
}  // namespace detail

template <typename... Args>
std::string text(const Args&... args) {
  std::string s;
  (detail::append(s, args), ...);
  return s;
}

}  // namespace attnkernels

// TORCH_CHECK_VALUE / TORCH_CHECK_TYPE with the message made by attnkernels::text (only when the
// check fails). Every argument check of the library uses these.
#define AK_CHECK_VALUE(cond, ...) TORCH_CHECK_VALUE(cond, ::attnkernels::text(__VA_ARGS__))
#define AK_CHECK_TYPE(cond, ...) TORCH_CHECK_TYPE(cond, ::attnkernels::text(__VA_ARGS__))

namespace attnkernels {

// acc(x) of docs/contract.md: float64 for float64 inputs, float32 for every other floating dtype.
// Device code uses at::opmath_type<scalar_t>, which is the same mapping.
inline at::ScalarType acc_type(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

// x's options (device, layout) with acc(x) as the dtype: the small maps and partials of a kernel.
inline at::TensorOptions acc_options(const at::Tensor& x) { return x.options().dtype(acc_type(x.scalar_type())); }

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

// t is on `device`, the op's feature map's device. Every tensor argument of every op is checked:
// a kernel handed another device's tensor would read memory that is not there.
inline void check_device(const at::Tensor& t, const at::Device& device, const char* op, const char* name) {
  AK_CHECK_VALUE(t.device() == device, op, ": ", name, " must be on ", device, ", got ", t.device());
}

// t holds floating-point values (small parameters: any floating dtype, used in acc(x)).
inline void check_floating(const at::Tensor& t, const char* op, const char* name) {
  AK_CHECK_TYPE(at::isFloatingType(t.scalar_type()), op, ": ", name, " must be a floating-point tensor, got ",
                   t.scalar_type());
}

// A feature map's dtype: one the kernels run (float8 and other storage-only floating types are not).
inline void check_feature_dtype(const at::Tensor& t, const char* op, const char* name) {
  check_floating(t, op, name);
  const at::ScalarType s = t.scalar_type();
  AK_CHECK_TYPE(s == at::kDouble || s == at::kFloat || s == at::kHalf || s == at::kBFloat16, op, ": ", name,
                   " must be float64, float32, float16 or bfloat16, got ", s);
}

inline void check_feature_map(const at::Tensor& x, const char* op, const char* name) {
  AK_CHECK_VALUE(x.dim() == 4, op, ": ", name, " must be 4-D (N, C, H, W), got ", x.dim(), "-D");
  check_feature_dtype(x, op, name);
}

// A per-(n, c) map such as avg, max, gate or their gradients: (N, C), acc(x), on x's device.
inline void check_per_channel(const at::Tensor& t, const at::Tensor& x, const char* op,
                              const char* name) {
  AK_CHECK_VALUE(t.dim() == 2 && t.size(0) == x.size(0) && t.size(1) == x.size(1), op, ": ", name,
              " must have shape (N, C) = (", x.size(0), ", ", x.size(1), "), got ", t.sizes());
  AK_CHECK_TYPE(t.scalar_type() == acc_type(x.scalar_type()), op, ": ", name, " must be ",
              acc_type(x.scalar_type()), " (the accumulation dtype of x, ", x.scalar_type(),
              "), got ", t.scalar_type());
  check_device(t, x.device(), op, name);
}

// A tensor shaped like x (grad_y of a backward op): x's shape and dtype, on x's device.
inline void check_like_x(const at::Tensor& t, const at::Tensor& x, const char* op, const char* name) {
  AK_CHECK_VALUE(t.sizes() == x.sizes() && t.scalar_type() == x.scalar_type(), op, ": ", name,
                    " must match x's shape ", x.sizes(), " and dtype ", x.scalar_type(), ", got ", t.sizes(), " ",
                    t.scalar_type());
  check_device(t, x.device(), op, name);
}

// check_like_x, then t in dense x's layout, so one index walks both.
inline at::Tensor walked_like_x(const at::Tensor& t, const at::Tensor& x, const char* op, const char* name) {
  check_like_x(t, x, op, name);
  return t.contiguous(memory_format_of(layout_of(x)));
}

// (N, C, H, W) -> (N, C, H*W): a view when the pixels flatten to one stride (NCHW and
// channels_last both do), else a dense copy. For the CPU kernels' batched GEMMs over pixels.
inline at::Tensor pixel_matrix(const at::Tensor& t) { return t.reshape({t.size(0), t.size(1), t.size(2) * t.size(3)}); }

// pixel_matrix(t) in `dtype` (a copy where t's dtype differs: half inputs read in acc).
inline at::Tensor pixel_matrix(const at::Tensor& t, at::ScalarType dtype) { return pixel_matrix(t).to(dtype); }

// A one-value parameter (PAM's and CAM's gamma): one floating value on `device`, any shape.
inline void check_one_value(const at::Tensor& t, const at::Device& device, const char* op, const char* name) {
  AK_CHECK_VALUE(t.numel() == 1, op, ": ", name, " must hold one value, got shape ", t.sizes());
  check_floating(t, op, name);
  check_device(t, device, op, name);
}

// A small parameter vector (bias, BN scale/shift, statistics): `count` floating values on `device`.
inline void check_vector(const at::Tensor& t, int64_t count, const at::Device& device, const char* op,
                         const char* name, const char* what) {
  AK_CHECK_VALUE(t.numel() == count, op, ": ", name, " must hold ", what, " = ", count, " values, got shape ",
                    t.sizes());
  check_floating(t, op, name);
  check_device(t, device, op, name);
}

}  // namespace attnkernels
