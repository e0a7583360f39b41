// Python bindings of the optional native extension blip_fast._C: input validation, device guard and
// dispatch to the CPU twin (hard_negatives_cpu.cpp) or the CUDA kernel (hard_negatives.cu, compiled
// only when BLIP_FAST_WITH_CUDA is defined). The package works without this module; see
// blip_fast/ops/native.py.

#include <torch/extension.h>

#include <ATen/DeviceGuard.h>

namespace blip_fast {

void sample_hard_negatives_cpu(const at::Tensor& sim, const at::Tensor& uniforms, at::Tensor& out);
#ifdef BLIP_FAST_WITH_CUDA
void sample_hard_negatives_cuda(const at::Tensor& sim, const at::Tensor& uniforms, at::Tensor& out);
#endif

namespace {

// TORCH_CHECK_VALUE raises ValueError in Python, like the reference's checks (same messages).
#define CHECK_HN(cond, ...) TORCH_CHECK_VALUE(cond, "sample_hard_negatives: ", __VA_ARGS__)

void check_inputs(const at::Tensor& sim, const at::Tensor& uniforms) {
  CHECK_HN(sim.dim() == 2, "sim must be 2-D [B, N], got shape ", sim.sizes());
  const auto dtype = sim.scalar_type();
  CHECK_HN(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16,
           "sim must be float32, float16 or bfloat16, got ", dtype);
  const int64_t rows = sim.size(0);
  const int64_t cols = sim.size(1);
  TORCH_CHECK_VALUE(cols >= 2, "sample_hard_negatives needs at least 2 candidates per row (N >= 2), got N=",
                    cols);
  TORCH_CHECK_VALUE(rows >= 1, "sample_hard_negatives needs at least one row (B >= 1), got B=0");
  CHECK_HN(cols >= rows, "sim must have N >= B (row i's positive is column i), got B=", rows, ", N=", cols);
  CHECK_HN(uniforms.dim() == 1 && uniforms.size(0) == rows, "uniforms must be 1-D of length B=", rows,
           ", got shape ", uniforms.sizes());
  CHECK_HN(uniforms.scalar_type() == at::kFloat, "uniforms must be float32, got ", uniforms.scalar_type());
  CHECK_HN(uniforms.device() == sim.device(), "sim and uniforms must be on the same device, got ",
           sim.device(), " and ", uniforms.device());
}

}  // namespace

at::Tensor sample_hard_negatives(const at::Tensor& sim, const at::Tensor& uniforms) {
  check_inputs(sim, uniforms);
  const at::OptionalDeviceGuard device_guard(at::device_of(sim));
  // The kernels address rows through stride(0) and need unit column stride only, so BLIP's
  // sim[:, :bs] slices of the [bs, bs + queue] similarity are read in place.
  const at::Tensor sim_rows = sim.stride(1) == 1 ? sim : sim.contiguous();
  const at::Tensor u = uniforms.contiguous();
  at::Tensor out = at::empty({sim.size(0)}, sim.options().dtype(at::kLong));
  if (sim.is_cuda()) {
#ifdef BLIP_FAST_WITH_CUDA
    sample_hard_negatives_cuda(sim_rows, u, out);
#else
    TORCH_CHECK(false, "sample_hard_negatives: blip_fast._C was built without CUDA");
#endif
  } else {
    TORCH_CHECK(sim.is_cpu(), "sample_hard_negatives: unsupported device ", sim.device());
    sample_hard_negatives_cpu(sim_rows, u, out);
  }
  return out;
}

bool built_with_cuda() {
#ifdef BLIP_FAST_WITH_CUDA
  return true;
#else
  return false;
#endif
}

}  // namespace blip_fast

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "blip_fast native kernels (csrc/); optional, see blip_fast.ops.native";
  m.def("sample_hard_negatives", &blip_fast::sample_hard_negatives, pybind11::arg("sim"),
        pybind11::arg("uniforms"),
        "Hard-negative index per row of sim [B, N] by inverse-CDF sampling with the given uniforms [B].");
  m.def("built_with_cuda", &blip_fast::built_with_cuda, "Whether the CUDA kernels were compiled in.");
}
