// Token embedding forward/backward on the GPU; the reference is kernels/cpu/embedding.cpp, the contract
// kernels/cuda/embedding.hpp.
#include <cuda_runtime.h>

#include <cstdint>
#include <cub/device/device_radix_sort.cuh>
#include <string>

#include "kernels/cuda/cuda_check.hpp"
#include "kernels/cuda/embedding.hpp"
#include "kernels/cuda/ops_common.cuh"
#include "kernels/cuda/pdl.cuh"
#include "runtime/error.hpp"

namespace moerl::cuda {
namespace {

using ops_detail::load;
using ops_detail::store;

constexpr int kMaxThreads = 256;

// One block per output row: out[r] = table[ids[r]].
template <int V>
__global__ void __launch_bounds__(kMaxThreads)
    embedding_forward_kernel(const float* __restrict__ table, const int64_t* __restrict__ ids, int64_t dim,
                             float* __restrict__ out) {
  moerl::cuda::await_previous_grid();
  const int64_t r = blockIdx.x, groups = dim / V;
  const float* src = table + ids[r] * dim;
  float* dst = out + r * dim;
  for (int64_t j = threadIdx.x; j < groups; j += blockDim.x) {
    float v[V];
    load<V>(src, j, v);
    store<V>(dst, j, v);
  }
}

__global__ void iota_kernel(int32_t* __restrict__ v, int64_t n) {
  moerl::cuda::await_previous_grid();
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x)
    v[i] = static_cast<int32_t>(i);
}

// One block per position p of the sorted ids; only the block at the first position of each run of equal ids
// works: it adds the run's dout rows (ascending row numbers: the sort is stable) to dtable[id] one after the
// other, as the CPU's loop does.
template <int V>
__global__ void __launch_bounds__(kMaxThreads)
    embedding_backward_kernel(const float* __restrict__ dout, const int64_t* __restrict__ sorted_ids,
                              const int32_t* __restrict__ sorted_rows, int64_t rows, int64_t dim,
                              float* __restrict__ dtable) {
  moerl::cuda::await_previous_grid();
  const int64_t p0 = blockIdx.x, id = sorted_ids[p0];
  if (p0 > 0 && sorted_ids[p0 - 1] == id) return;  // uniform across the block
  int64_t p1 = p0 + 1;
  while (p1 < rows && sorted_ids[p1] == id) ++p1;
  float* dst = dtable + id * dim;
  for (int64_t j = threadIdx.x; j < dim / V; j += blockDim.x) {
    float acc[V];
    load<V>(dst, j, acc);
    for (int64_t p = p0; p < p1; ++p) {
      float v[V];
      load<V>(dout + static_cast<int64_t>(sorted_rows[p]) * dim, j, v);
#pragma unroll
      for (int k = 0; k < V; ++k) acc[k] = __fadd_rn(acc[k], v[k]);
    }
    store<V>(dst, j, acc);
  }
}

int threads_for(int64_t groups) {
  const int64_t warps = (groups + ops_detail::kWarp - 1) / ops_detail::kWarp;
  return static_cast<int>(warps * ops_detail::kWarp > kMaxThreads ? kMaxThreads : warps * ops_detail::kWarp);
}

void check_args(const char* fn, int64_t rows, int64_t dim, bool pointers_set) {
  const std::string where = std::string("cuda::") + fn + ": ";
  require(rows >= 0 && dim >= 0, [&] {
    return where + "rows and dim must be >= 0, got " + std::to_string(rows) + " x " + std::to_string(dim);
  });
  require(rows <= INT32_MAX, [&] { return where + std::to_string(rows) + " rows exceed one launch"; });
  require(rows == 0 || dim == 0 || pointers_set, [&] { return where + "null pointer argument"; });
}

}  // namespace

void embedding_forward(const float* table, const int64_t* ids, int64_t rows, int64_t dim, float* out,
                       cudaStream_t stream) {
  check_args("embedding_forward", rows, dim, table && ids && out);
  if (rows == 0 || dim == 0) return;
  const bool vec = dim % 4 == 0 && ops_detail::aligned(table, 16) && ops_detail::aligned(out, 16);
  const int threads = threads_for(vec ? dim / 4 : dim);
  const auto kernel = vec ? embedding_forward_kernel<4> : embedding_forward_kernel<1>;
  launch_after_previous(kernel, static_cast<unsigned>(rows), threads, 0, stream, table, ids, dim, out);
}

void embedding_backward(const float* dout, const int64_t* ids, int64_t rows, int64_t dim, float* dtable,
                        cudaStream_t stream) {
  check_args("embedding_backward", rows, dim, dout && ids && dtable);
  if (rows == 0 || dim == 0) return;
  const int n = static_cast<int>(rows);
  size_t sort_bytes = 0;
  CUDA_CHECK(cub::DeviceRadixSort::SortPairs(nullptr, sort_bytes, ids, static_cast<int64_t*>(nullptr),
                                             static_cast<const int32_t*>(nullptr), static_cast<int32_t*>(nullptr), n,
                                             0, 64, stream));
  // One scratch block: sorted ids [rows] (I64), row numbers [rows] and sorted row numbers [rows] (I32), CUB's
  // temporary storage.
  const size_t ids_bytes = ops_detail::align256(sizeof(int64_t) * rows), rows_bytes = ops_detail::align256(sizeof(int32_t) * rows);
  ops_detail::StreamScratch scratch(ids_bytes + 2 * rows_bytes + sort_bytes, stream);
  int64_t* sorted_ids = scratch.at<int64_t>();
  int32_t* row_numbers = scratch.at<int32_t>(ids_bytes);
  int32_t* sorted_rows = scratch.at<int32_t>(ids_bytes + rows_bytes);
  void* sort_temp = scratch.at<char>(ids_bytes + 2 * rows_bytes);

  launch_after_previous(iota_kernel, ops_detail::grid_stride_blocks(rows, kMaxThreads), kMaxThreads, 0, stream,
                        row_numbers, rows);
  CUDA_CHECK(cub::DeviceRadixSort::SortPairs(sort_temp, sort_bytes, ids, sorted_ids, row_numbers, sorted_rows, n, 0,
                                             64, stream));
  const bool vec = dim % 4 == 0 && ops_detail::aligned(dout, 16) && ops_detail::aligned(dtable, 16);
  const int threads = threads_for(vec ? dim / 4 : dim);
  const auto kernel = vec ? embedding_backward_kernel<4> : embedding_backward_kernel<1>;
  launch_after_previous(kernel, static_cast<unsigned>(rows), threads, 0, stream, dout, sorted_ids, sorted_rows, rows,
                        dim, dtable);
}

}  // namespace moerl::cuda
