// RMSNorm forward/backward on the GPU; the reference is kernels/cpu/rmsnorm.cpp, the contract
// kernels/cuda/rmsnorm.hpp.
#include <cuda_runtime.h>

#include <cstdint>
#include <string>
#include <type_traits>

#include "kernels/cuda/cuda_check.hpp"
#include "kernels/cuda/kernel_attributes.hpp"
#include "kernels/cuda/ops_common.cuh"
#include "kernels/cuda/pdl.cuh"
#include "kernels/cuda/rmsnorm.hpp"
#include "runtime/error.hpp"

namespace moerl::cuda {
namespace {

using ops_detail::block_sum;
using ops_detail::kMaxWarps;
using ops_detail::kWarp;
using ops_detail::load;
using ops_detail::store;

constexpr int kMaxThreads = 256;
// Rows per block of the backward kernel: each block writes one [dim] slice of dweight partial sums, so this
// sets the scratch size (rows / 16 · dim floats) and the length of the second pass. On the H200, bench-600m's step
// (CUPTI trace, 25 calls of 16384 x 1024; bench/results/2026-11-30-gpu-rmsnorm-chunk-h200-9fccf43+chunk.txt):
// 32 rows a block (512 blocks, 3-4 an SM, one row's loads in flight a thread) 67.7-68.0 us a call, 16 52.7, 8 50.2,
// 4 50.6 with the second pass grown to 28 us.
constexpr int64_t kChunkRows = 16;
// dweight's per-block accumulators live in shared memory: dim floats, at most 192 KiB (an H200 block may
// have 227 KiB).
constexpr int64_t kMaxDweightDim = 49152;
// The second dweight pass: a block covers 32 columns; 32 threads per column sum every 32nd chunk, then their
// sums are added in a fixed order (8 threads a column, 32 blocks for dim 1024, took 28 us over 4096 chunks).
// Its ~31 us a call in bench-600m's step trace is mostly its programmatic-launch wait for the backward's tail: each
// thread's 32 loads issued 16 at a time changed nothing (31.0 us; bench/results/2026-12-01-gpu-attn-fused-dq-h200-*).
constexpr int kFinishCols = 32;
constexpr int kFinishSplit = 32;

// Tried and dropped (2026-11-30): warp-per-row kernels holding a row in registers (one read, shuffle reductions, no
// block barrier a row) for dim <= 1024: bench-600m's 16384 x 1024 forward 45.4 vs 43.6 us, backward with dweight 78.8
// vs 79.7 us (GPU test bandwidth lines), in the train step 52.5 / 92.3 us a call: these passes of ~50-90 us are
// bound by HBM ramp-up and tails, not by the block's barriers (bench/results/2026-11-30-gpu-ce-norm-h200-041b8bc.txt).
//
// One block per row: y = weight · (x · rstd), HF's order; x's rows x_ld apart, y's y_ld. With `residual`
// (rmsnorm_forward_residual; x_ld = dim): x is first replaced by x + residual, written to `sum` (which may be x
// itself: each element is read and written by one thread), and the row normalised is that sum.
template <int V>
__global__ void __launch_bounds__(kMaxThreads)
    rmsnorm_forward_kernel(const float* x, const float* __restrict__ residual, float* sum,
                           const float* __restrict__ weight, float* __restrict__ y, float* __restrict__ rstd,
                           int64_t dim, int64_t x_ld, int64_t y_ld, float eps) {
  moerl::cuda::await_previous_grid();
  __shared__ float scratch[kMaxWarps];
  const int64_t r = blockIdx.x, groups = dim / V;
  if (residual != nullptr) {
    x += r * dim, residual += r * dim, sum += r * dim;
    for (int64_t j = threadIdx.x; j < groups; j += blockDim.x) {
      float v[V], res[V];
      load<V>(x, j, v);
      load<V>(residual, j, res);
#pragma unroll
      for (int k = 0; k < V; ++k) v[k] = v[k] + res[k];
      store<V>(sum, j, v);
    }
    x = sum - r * dim;  // the row below reads the sums back (this thread's own elements)
  }
  const float* xr = x + r * x_ld;
  float* yr = y + r * y_ld;
  float ss = 0;
  for (int64_t j = threadIdx.x; j < groups; j += blockDim.x) {
    float v[V];
    load<V>(xr, j, v);
#pragma unroll
    for (int k = 0; k < V; ++k) ss += v[k] * v[k];
  }
  ss = block_sum(ss, scratch);
  const float s = 1.0f / sqrtf(ss / static_cast<float>(dim) + eps);
  if (threadIdx.x == 0) rstd[r] = s;
  for (int64_t j = threadIdx.x; j < groups; j += blockDim.x) {
    float v[V], w[V];
    load<V>(xr, j, v);
    load<V>(weight, j, w);
#pragma unroll
    for (int k = 0; k < V; ++k) v[k] = w[k] * (v[k] * s);
    store<V>(yr, j, v);
  }
}

// One block per chunk of kChunkRows rows. Per row: dot = Σ w·dy·x (block sum), dx = s·w·dy − s³·dot/dim · x, plus
// residual (the same element) when non-null; x's rows x_ld apart, dx's dx_ld (dim with a residual), dy's dy_ld.
// With `partial` non-null, each thread also accumulates dy·x·s of its own columns over the chunk's rows in
// shared memory (no other thread touches those entries) and writes them to partial[chunk, dim].
template <int V>
__global__ void __launch_bounds__(kMaxThreads)
    rmsnorm_backward_kernel(const float* __restrict__ dy, const float* __restrict__ x, const float* __restrict__ weight,
                            const float* __restrict__ rstd, float* __restrict__ dx, float* __restrict__ partial,
                            const float* __restrict__ residual, int64_t rows, int64_t dim, int64_t x_ld,
                            int64_t dx_ld, int64_t dy_ld) {
  moerl::cuda::await_previous_grid();
  extern __shared__ __align__(16) float acc[];  // [dim] when partial is non-null
  __shared__ float scratch[kMaxWarps];
  const int64_t groups = dim / V;
  const int64_t r0 = static_cast<int64_t>(blockIdx.x) * kChunkRows;
  const int64_t r1 = r0 + kChunkRows < rows ? r0 + kChunkRows : rows;
  if (partial) {
    const float zero[V] = {};
    for (int64_t j = threadIdx.x; j < groups; j += blockDim.x) store<V>(acc, j, zero);
  }
  for (int64_t r = r0; r < r1; ++r) {
    const float* xr = x + r * x_ld;
    const float* dyr = dy + r * dy_ld;
    float* dxr = dx + r * dx_ld;
    const float s = rstd[r];
    float dot = 0;
    for (int64_t j = threadIdx.x; j < groups; j += blockDim.x) {
      float xv[V], dv[V], wv[V];
      load<V>(xr, j, xv);
      load<V>(dyr, j, dv);
      load<V>(weight, j, wv);
#pragma unroll
      for (int k = 0; k < V; ++k) dot += wv[k] * dv[k] * xv[k];
    }
    dot = block_sum(dot, scratch);
    const float c = s * s * s * dot / static_cast<float>(dim);
    for (int64_t j = threadIdx.x; j < groups; j += blockDim.x) {
      float xv[V], dv[V], wv[V], out[V];
      load<V>(xr, j, xv);
      load<V>(dyr, j, dv);
      load<V>(weight, j, wv);
#pragma unroll
      for (int k = 0; k < V; ++k) out[k] = s * wv[k] * dv[k] - c * xv[k];
      if (residual != nullptr) {  // added after the rounding of out, as a separate add of the two would
        float res[V];
        load<V>(residual + r * dim, j, res);
#pragma unroll
        for (int k = 0; k < V; ++k) out[k] = out[k] + res[k];
      }
      store<V>(dxr, j, out);
      if (partial) {
        float a[V];
        load<V>(acc, j, a);
#pragma unroll
        for (int k = 0; k < V; ++k) a[k] += dv[k] * xv[k] * s;
        store<V>(acc, j, a);
      }
    }
  }
  if (partial) {
    float* slice = partial + static_cast<int64_t>(blockIdx.x) * dim;
    for (int64_t j = threadIdx.x; j < groups; j += blockDim.x) {
      float a[V];
      load<V>(acc, j, a);
      store<V>(slice, j, a);
    }
  }
}

// dweight[j] += Σ_chunks partial[chunk, j] (= with overwrite), in a fixed order: thread `split` of column j sums
// chunks split, split + kFinishSplit, ... in turn, then the kFinishSplit sums are added in split order.
__global__ void __launch_bounds__(kFinishCols * kFinishSplit)
    rmsnorm_dweight_finish_kernel(const float* __restrict__ partial, int64_t chunks, int64_t dim,
                                  float* __restrict__ dweight, bool overwrite) {
  moerl::cuda::await_previous_grid();
  __shared__ float sums[kFinishSplit][kFinishCols];
  const int col = threadIdx.x % kFinishCols, split = threadIdx.x / kFinishCols;
  const int64_t j = static_cast<int64_t>(blockIdx.x) * kFinishCols + col;
  float s = 0;
  if (j < dim)
    for (int64_t c = split; c < chunks; c += kFinishSplit) s += partial[c * dim + j];
  sums[split][col] = s;
  __syncthreads();
  if (split == 0 && j < dim) {
    float total = sums[0][col];
    for (int k = 1; k < kFinishSplit; ++k) total += sums[k][col];
    dweight[j] = overwrite ? total : dweight[j] + total;
  }
}

// Threads per row: one per group of V columns, in whole warps, at most kMaxThreads.
int threads_for(int64_t groups) {
  const int64_t warps = (groups + kWarp - 1) / kWarp;
  return static_cast<int>(warps < 1 ? kWarp : warps * kWarp > kMaxThreads ? kMaxThreads : warps * kWarp);
}

void check_sizes(const char* fn, int64_t rows, int64_t dim) {
  require(rows >= 0 && dim >= 0, [&] {
    return std::string("cuda::") + fn + ": rows and dim must be >= 0, got " + std::to_string(rows) + " x " +
           std::to_string(dim);
  });
  require(rows == 0 || dim > 0,
          [&] { return std::string("cuda::") + fn + ": dim must be > 0 for " + std::to_string(rows) + " rows"; });
}

// A row stride: 0 means dim (packed rows); else at least dim.
int64_t row_stride(const char* fn, const char* what, int64_t ld, int64_t dim) {
  require(ld == 0 || ld >= dim, [&] {
    return std::string("cuda::") + fn + ": " + what + "'s row stride " + std::to_string(ld) + " is below dim " +
           std::to_string(dim);
  });
  return ld == 0 ? dim : ld;
}

// rmsnorm_forward, or with residual rmsnorm_forward_residual (sum = x + residual normalised).
void forward(const char* fn, const float* x, const float* residual, float* sum, const float* weight, float* y,
             float* rstd, int64_t rows, int64_t dim, float eps, cudaStream_t stream, int64_t x_ld = 0,
             int64_t y_ld = 0) {
  check_sizes(fn, rows, dim);
  x_ld = row_stride(fn, "x", x_ld, dim);
  y_ld = row_stride(fn, "y", y_ld, dim);
  if (rows == 0) return;
  require(x && weight && y && rstd && (!residual || sum),
          [&] { return std::string("cuda::") + fn + ": null input, weight, output or rstd pointer"; });
  require(rows <= INT32_MAX,
          [&] { return std::string("cuda::") + fn + ": " + std::to_string(rows) + " rows exceed one launch"; });
  using ops_detail::aligned;
  const bool vec = dim % 4 == 0 && x_ld % 4 == 0 && y_ld % 4 == 0 && aligned(x, 16) && aligned(weight, 16) &&
                   aligned(y, 16) && (!residual || (aligned(residual, 16) && aligned(sum, 16)));
  const int threads = threads_for(vec ? dim / 4 : dim);
  const auto kernel = vec ? rmsnorm_forward_kernel<4> : rmsnorm_forward_kernel<1>;
  launch_after_previous(kernel, static_cast<unsigned>(rows), threads, 0, stream, x, residual, sum, weight, y, rstd, dim,
                        x_ld, y_ld, eps);
}

}  // namespace

void rmsnorm_forward(const float* x, const float* weight, float* y, float* rstd, int64_t rows, int64_t dim, float eps,
                     cudaStream_t stream, int64_t x_ld, int64_t y_ld) {
  forward("rmsnorm_forward", x, nullptr, nullptr, weight, y, rstd, rows, dim, eps, stream, x_ld, y_ld);
}

void rmsnorm_forward_residual(const float* x, const float* residual, float* sum, const float* weight, float* y,
                              float* rstd, int64_t rows, int64_t dim, float eps, cudaStream_t stream) {
  require(residual != nullptr, "cuda::rmsnorm_forward_residual: null residual");
  forward("rmsnorm_forward_residual", x, residual, sum, weight, y, rstd, rows, dim, eps, stream);
}

void rmsnorm_backward(const float* dy, const float* x, const float* weight, const float* rstd, float* dx,
                      float* dweight, int64_t rows, int64_t dim, cudaStream_t stream, const float* residual,
                      int64_t x_ld, int64_t dx_ld, int64_t dy_ld, bool overwrite_dweight) {
  check_sizes("rmsnorm_backward", rows, dim);
  x_ld = row_stride("rmsnorm_backward", "x", x_ld, dim);
  dx_ld = row_stride("rmsnorm_backward", "dx", dx_ld, dim);
  dy_ld = row_stride("rmsnorm_backward", "dy", dy_ld, dim);
  require(!residual || dx_ld == dim, "cuda::rmsnorm_backward: a residual needs packed dx rows");
  if (rows == 0) {  // no rows: dweight's sum is empty
    if (dweight && overwrite_dweight)
      CUDA_CHECK(cudaMemsetAsync(dweight, 0, static_cast<size_t>(dim) * sizeof(float), stream));
    return;
  }
  require(dy && x && weight && rstd && dx, "cuda::rmsnorm_backward: null dy, x, weight, rstd or dx");
  require(!dweight || dim <= kMaxDweightDim, [&] {
    return "cuda::rmsnorm_backward: dim " + std::to_string(dim) + " exceeds the " + std::to_string(kMaxDweightDim) +
           " columns whose dweight sums fit in shared memory";
  });
  const int64_t chunks = (rows + kChunkRows - 1) / kChunkRows;
  require(chunks <= INT32_MAX,
          [&] { return "cuda::rmsnorm_backward: " + std::to_string(rows) + " rows exceed one launch"; });
  const bool vec = dim % 4 == 0 && x_ld % 4 == 0 && dx_ld % 4 == 0 && dy_ld % 4 == 0 && ops_detail::aligned(dy, 16) &&
                   ops_detail::aligned(x, 16) && ops_detail::aligned(weight, 16) && ops_detail::aligned(dx, 16) &&
                   (!residual || ops_detail::aligned(residual, 16));
  const int threads = threads_for(vec ? dim / 4 : dim);
  const size_t smem = dweight ? static_cast<size_t>(dim) * sizeof(float) : 0;
  ops_detail::StreamScratch scratch(dweight ? static_cast<size_t>(chunks * dim) * sizeof(float) : 0, stream);
  float* partial = dweight ? scratch.at<float>() : nullptr;

  // Above the default 48 KiB a kernel must opt in to more dynamic shared memory: to the most any dim needs, once.
  constexpr size_t kMaxSmem = kMaxDweightDim * sizeof(float);
  const auto launch = [&](auto vec4) {
    constexpr int V = decltype(vec4)::value ? 4 : 1;
    if (smem > 48 * 1024) cuda_detail::allow_dynamic_smem<rmsnorm_backward_kernel<V>>(kMaxSmem);
    launch_after_previous(rmsnorm_backward_kernel<V>, static_cast<unsigned>(chunks), threads, smem, stream, dy, x,
                          weight, rstd, dx, partial, residual, rows, dim, x_ld, dx_ld, dy_ld);
  };
  if (vec)
    launch(std::true_type{});
  else
    launch(std::false_type{});
  if (!dweight) return;
  const int64_t col_blocks = (dim + kFinishCols - 1) / kFinishCols;
  launch_after_previous(rmsnorm_dweight_finish_kernel, static_cast<unsigned>(col_blocks), kFinishCols * kFinishSplit, 0,
                        stream, partial, chunks, dim, dweight, overwrite_dweight);
}

}  // namespace moerl::cuda
