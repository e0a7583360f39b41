// CPU twin of the hard-negative sampling kernel (hard_negatives.cu), so that the native path is
// built and tested by CI machines without a GPU. Same algorithm as the reference
// (kernels/hard_negatives.py: sample_hard_negatives_ref), row by row in fp32:
//   w = softmax(sim[i]) + 1e-4, w[i] = 0, cdf = inclusive cumsum(w),
//   pick = first j with cdf[j] > u[i] * cdf[N-1], else the last column with nonzero weight.
// Inputs are validated by blip_fast_ext.cpp.

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

namespace blip_fast {
namespace {

constexpr float kWeightFloor = 1e-4f;

template <typename scalar_t>
void hard_negatives_rows(const scalar_t* sim, int64_t stride_row, const float* uniforms, int64_t* out,
                         int64_t begin, int64_t end, int64_t n) {
  std::vector<float> cdf(n);  // per-thread scratch, reused across the thread's rows
  for (int64_t i = begin; i < end; ++i) {
    const scalar_t* x = sim + i * stride_row;
    float row_max = -std::numeric_limits<float>::infinity();
    for (int64_t j = 0; j < n; ++j) row_max = std::max(row_max, static_cast<float>(x[j]));
    float row_sum = 0.f;
    for (int64_t j = 0; j < n; ++j) {
      cdf[j] = std::exp(static_cast<float>(x[j]) - row_max);
      row_sum += cdf[j];
    }
    float running = 0.f;
    for (int64_t j = 0; j < n; ++j) {
      running += (j == i) ? 0.f : cdf[j] / row_sum + kWeightFloor;
      cdf[j] = running;
    }
    const float target = uniforms[i] * running;
    // Fallback when rounding leaves no cdf value past the target: never the diagonal.
    int64_t pick = (i == n - 1) ? n - 2 : n - 1;
    for (int64_t j = 0; j < n; ++j) {
      if (cdf[j] > target) {
        pick = j;
        break;
      }
    }
    out[i] = pick;
  }
}

}  // namespace

// sim [B, N] with unit column stride, uniforms [B] fp32 contiguous, out [B] int64.
void sample_hard_negatives_cpu(const at::Tensor& sim, const at::Tensor& uniforms, at::Tensor& out) {
  const int64_t rows = sim.size(0);
  const int64_t n = sim.size(1);
  const int64_t stride_row = sim.stride(0);
  const float* u = uniforms.data_ptr<float>();
  int64_t* o = out.data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, sim.scalar_type(), "sample_hard_negatives_cpu", [&] {
    const scalar_t* s = sim.data_ptr<scalar_t>();
    // A row costs O(N); grain of 16 rows keeps BLIP's batches (96..288 rows) on a few threads.
    at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
      hard_negatives_rows<scalar_t>(s, stride_row, u, o, begin, end, n);
    });
  });
}

}  // namespace blip_fast
