// A libtorch program calling attnkernels' operators through the dispatcher (ctest "dispatch").
//
// It never names a symbol of libattnkernels_ops: the library is linked with --no-as-needed
// (CMakeLists.txt, attnkernels_link_ops), and its static TORCH_LIBRARY initialisers register
// the operators as it loads, as they do for torch.ops.load_library in Python. Each op is
// looked up by name, called on random tensors and compared with plain ATen:
//   channel_pool(x)          == (mean_hw x, amax_hw x)  in acc(x)
//   channel_rescale(x, gate) == x * gate[:, :, None, None], rounded to x's dtype
// Exit status 0 when every check passes, 1 otherwise.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <cstdio>
#include <exception>
#include <string>
#include <tuple>
#include <vector>

namespace {

int failures = 0;

void check(bool ok, const std::string& what) {
  std::printf("%s %s\n", ok ? "ok  " : "FAIL", what.c_str());
  if (!ok) ++failures;
}

const char* const kOps[] = {
    "attnkernels::channel_pool",          "attnkernels::channel_pool_backward",
    "attnkernels::channel_gate",          "attnkernels::channel_gate_backward",
    "attnkernels::channel_rescale",       "attnkernels::channel_rescale_backward",
};

at::ScalarType acc_type(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

struct Tolerance {
  double rtol, atol;
};

Tolerance tolerance(at::ScalarType t) {
  switch (t) {
    case at::kDouble: return {1e-12, 1e-12};
    case at::kFloat: return {1e-5, 1e-6};
    default: return {1e-2, 1e-3};  // half / bfloat16 outputs: one rounding of the result
  }
}

struct Case {
  std::string name;
  at::Tensor x;
};

std::vector<Case> cases(const at::Device& device) {
  auto opts = [&](at::ScalarType t) { return at::TensorOptions().dtype(t).device(device); };
  std::vector<Case> out;
  out.push_back({"float32 NCHW (2,24,7,5)", at::randn({2, 24, 7, 5}, opts(at::kFloat))});
  out.push_back({"float32 channels_last (3,16,5,6)",
                 at::randn({3, 16, 5, 6}, opts(at::kFloat)).contiguous(at::MemoryFormat::ChannelsLast)});
  out.push_back({"float64 NCHW (2,8,6,6)", at::randn({2, 8, 6, 6}, opts(at::kDouble))});
  out.push_back({"float16 NCHW (1,40,3,4)", at::randn({1, 40, 3, 4}, opts(at::kHalf))});
  out.push_back({"bfloat16 channels_last (2,33,4,4)",
                 at::randn({2, 33, 4, 4}, opts(at::kBFloat16)).contiguous(at::MemoryFormat::ChannelsLast)});
  out.push_back({"float32 sliced view (2,12,5,8)[..., 1:, ::2]",
                 at::randn({2, 12, 5, 8}, opts(at::kFloat)).slice(2, 1).slice(3, 0, 8, 2)});
  out.push_back({"float32 HW=1 (3,16,1,1)", at::randn({3, 16, 1, 1}, opts(at::kFloat))});
  return out;
}

void run_device(const at::Device& device) {
  auto& dispatcher = c10::Dispatcher::singleton();
  auto pool = dispatcher.findSchemaOrThrow("attnkernels::channel_pool", "")
                  .typed<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&)>();
  auto rescale = dispatcher.findSchemaOrThrow("attnkernels::channel_rescale", "")
                     .typed<at::Tensor(const at::Tensor&, const at::Tensor&)>();

  for (const Case& c : cases(device)) {
    const at::Tensor& x = c.x;
    const std::string where = device.str() + " " + c.name;
    const at::ScalarType acc = acc_type(x.scalar_type());
    const Tolerance tol = tolerance(acc);

    at::Tensor avg, max;
    std::tie(avg, max) = pool.call(x);
    const at::Tensor want_avg = at::mean(x.to(acc), {2, 3});
    const at::Tensor want_max = at::amax(x, {2, 3}).to(acc);
    check(avg.scalar_type() == acc && max.scalar_type() == acc &&
              avg.sizes() == want_avg.sizes() && max.sizes() == want_max.sizes(),
          "channel_pool shapes/dtypes: " + where);
    check(at::allclose(avg, want_avg, tol.rtol, tol.atol), "channel_pool avg == at::mean: " + where);
    check(at::equal(max, want_max), "channel_pool max == at::amax: " + where);

    const at::Tensor gate = at::rand({x.size(0), x.size(1)}, x.options().dtype(acc));
    const at::Tensor y = rescale.call(x, gate);
    const at::Tensor want_y = (x.to(acc) * gate.view({x.size(0), x.size(1), 1, 1})).to(x.scalar_type());
    const Tolerance ytol = tolerance(x.scalar_type());
    check(y.scalar_type() == x.scalar_type() && y.sizes() == x.sizes(),
          "channel_rescale shape/dtype: " + where);
    check(at::allclose(y.to(acc), want_y.to(acc), ytol.rtol, ytol.atol),
          "channel_rescale == x * gate: " + where);
    if (x.is_contiguous(at::MemoryFormat::ChannelsLast) && !x.is_contiguous()) {
      check(y.is_contiguous(at::MemoryFormat::ChannelsLast), "channel_rescale keeps channels_last: " + where);
    }
  }
}

}  // namespace

int main() {
  try {
    at::manual_seed(0);
    auto& dispatcher = c10::Dispatcher::singleton();
    bool cuda_kernels = true;
    for (const char* op : kOps) {
      auto handle = dispatcher.findSchema({op, ""});
      check(handle.has_value(), std::string("schema registered: ") + op);
      if (!handle) continue;
      check(handle->hasKernelForDispatchKey(c10::DispatchKey::CPU), std::string("CPU kernel: ") + op);
      cuda_kernels = cuda_kernels && handle->hasKernelForDispatchKey(c10::DispatchKey::CUDA);
    }
    if (failures == 0) {
      run_device(at::Device(at::kCPU));
      if (cuda_kernels && at::hasCUDA()) {
        run_device(at::Device(at::kCUDA));
      } else {
        std::printf("skip CUDA checks (%s)\n",
                    cuda_kernels ? "no CUDA device" : "library built without CUDA kernels");
      }
    }
  } catch (const std::exception& e) {
    std::printf("FAIL exception: %s\n", e.what());
    ++failures;
  }
  std::printf("%s: %d failure(s)\n", failures ? "FAILED" : "PASSED", failures);
  return failures ? 1 : 0;
}
