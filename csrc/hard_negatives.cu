// CUDA kernel of hard-negative sampling: one thread block per row of sim [B, N].
// Same algorithm as the reference (kernels/hard_negatives.py: sample_hard_negatives_ref), in fp32:
//   w = softmax(sim[i]) + 1e-4, w[i] = 0, cdf = inclusive cumsum(w),
//   pick = first j with cdf[j] > u[i] * cdf[N-1], else the last column with nonzero weight.
// The row is walked in tiles of BLOCK columns (one column per thread): a block-wide max and sum
// give the softmax statistics; a block-wide inclusive scan plus a running carry gives the cdf.
// Inputs are validated by blip_fast_ext.cpp.

#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAException.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cub/block/block_reduce.cuh>
#include <cub/block/block_scan.cuh>

#include <climits>
#include <cmath>

namespace blip_fast {
namespace {

constexpr float kWeightFloor = 1e-4f;

// Own functors: cub::Max/cub::Min moved between CCCL releases (CUDA 12 vs 13).
struct MaxOp {
  __device__ float operator()(float a, float b) const { return fmaxf(a, b); }
};
struct MinOp {
  __device__ int operator()(int a, int b) const { return a < b ? a : b; }
};

template <typename scalar_t, int BLOCK>
__global__ void __launch_bounds__(BLOCK)
    hard_negatives_kernel(const scalar_t* __restrict__ sim, int64_t stride_row,
                          const float* __restrict__ uniforms, int64_t* __restrict__ out, int n) {
  using FloatReduce = cub::BlockReduce<float, BLOCK>;
  using IntReduce = cub::BlockReduce<int, BLOCK>;
  using Scan = cub::BlockScan<float, BLOCK>;
  __shared__ union {
    typename FloatReduce::TempStorage float_reduce;
    typename IntReduce::TempStorage int_reduce;
    typename Scan::TempStorage scan;
  } temp;
  __shared__ float broadcast_float;
  __shared__ int broadcast_int;

  const int row = blockIdx.x;
  const scalar_t* x = sim + static_cast<int64_t>(row) * stride_row;

  // Softmax statistics. cub's reductions leave the result in thread 0; broadcast via shared memory.
  float local = -INFINITY;
  for (int j = threadIdx.x; j < n; j += BLOCK) local = fmaxf(local, static_cast<float>(x[j]));
  float reduced = FloatReduce(temp.float_reduce).Reduce(local, MaxOp());
  if (threadIdx.x == 0) broadcast_float = reduced;
  __syncthreads();
  const float row_max = broadcast_float;
  __syncthreads();

  local = 0.f;
  for (int j = threadIdx.x; j < n; j += BLOCK) local += expf(static_cast<float>(x[j]) - row_max);
  reduced = FloatReduce(temp.float_reduce).Sum(local);
  if (threadIdx.x == 0) broadcast_float = reduced;
  __syncthreads();
  const float row_sum = broadcast_float;
  __syncthreads();

  auto weight = [&](int j) -> float {
    return (j < n && j != row) ? expf(static_cast<float>(x[j]) - row_max) / row_sum + kWeightFloor : 0.f;
  };

  // Total weight, accumulated tile by tile exactly like the carry below, so that the target is
  // u * (the cdf's own last value). Every thread runs every tile: the block-wide scan needs them all.
  float total = 0.f;
  for (int base = 0; base < n; base += BLOCK) {
    float cdf, tile_sum;
    Scan(temp.scan).InclusiveSum(weight(base + threadIdx.x), cdf, tile_sum);
    __syncthreads();
    total += tile_sum;
  }
  const float target = uniforms[row] * total;

  // Search: the first column whose cdf passes the target; stop at the first tile that has one.
  int pick = INT_MAX;
  float carry = 0.f;
  for (int base = 0; base < n; base += BLOCK) {
    const int j = base + threadIdx.x;
    float cdf, tile_sum;
    Scan(temp.scan).InclusiveSum(weight(j), cdf, tile_sum);
    __syncthreads();
    // the diagonal's weight is 0, but the parallel scan can round its cdf above its neighbour's
    const int candidate = (j < n && j != row && carry + cdf > target) ? j : INT_MAX;
    const int first = IntReduce(temp.int_reduce).Reduce(candidate, MinOp());
    if (threadIdx.x == 0) broadcast_int = first;
    __syncthreads();
    pick = broadcast_int;
    __syncthreads();
    if (pick != INT_MAX) break;
    carry += tile_sum;
  }

  if (threadIdx.x == 0) {
    // Rounding may leave no cdf value past the target: fall back to the last nonzero weight.
    if (pick == INT_MAX) pick = (row == n - 1) ? n - 2 : n - 1;
    out[row] = pick;
  }
}

template <typename scalar_t, int BLOCK>
void launch(const at::Tensor& sim, const at::Tensor& uniforms, at::Tensor& out) {
  const int rows = static_cast<int>(sim.size(0));
  hard_negatives_kernel<scalar_t, BLOCK><<<rows, BLOCK, 0, c10::cuda::getCurrentCUDAStream()>>>(
      sim.data_ptr<scalar_t>(), sim.stride(0), uniforms.data_ptr<float>(), out.data_ptr<int64_t>(),
      static_cast<int>(sim.size(1)));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename scalar_t>
void dispatch_block(const at::Tensor& sim, const at::Tensor& uniforms, at::Tensor& out) {
  // One column per thread per tile: the smallest block that covers BLIP's in-batch rows (N = B) in
  // a single tile, 1024 threads and several tiles beyond that.
  const int64_t n = sim.size(1);
  if (n <= 128) {
    launch<scalar_t, 128>(sim, uniforms, out);
  } else if (n <= 256) {
    launch<scalar_t, 256>(sim, uniforms, out);
  } else if (n <= 512) {
    launch<scalar_t, 512>(sim, uniforms, out);
  } else {
    launch<scalar_t, 1024>(sim, uniforms, out);
  }
}

}  // namespace

// sim [B, N] on the current CUDA device with unit column stride, uniforms [B] fp32 contiguous,
// out [B] int64. The caller holds the device guard.
void sample_hard_negatives_cuda(const at::Tensor& sim, const at::Tensor& uniforms, at::Tensor& out) {
  TORCH_CHECK(sim.size(0) <= INT_MAX && sim.size(1) <= INT_MAX,
              "sample_hard_negatives: B and N must fit in int32 on CUDA");
  switch (sim.scalar_type()) {
    case at::kFloat:
      dispatch_block<float>(sim, uniforms, out);
      break;
    case at::kHalf:
      dispatch_block<c10::Half>(sim, uniforms, out);
      break;
    case at::kBFloat16:
      dispatch_block<c10::BFloat16>(sim, uniforms, out);
      break;
    default:
      TORCH_CHECK(false, "sample_hard_negatives: unsupported dtype ", sim.scalar_type());
  }
}

}  // namespace blip_fast
