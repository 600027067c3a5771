// RoPE on the GPU (kernels/cuda/rope.cu): the functions of moerl::cpu (kernels/rope.hpp) with the same arguments
// plus a stream — in place, any row and head strides, rotate-half or interleaved pairs. x is device memory;
// calls are asynchronous on `stream`.
//
// The CPU's tables (cpu::rope_tables, uploaded once per device, seq, dim and theta and kept for the process), then
// (a·cos − b·sin, b·cos + a·sin) with each product and sum rounded separately (no fused multiply-add), as the CPU
// does: the outputs equal the CPU's bit for bit.
//
// Throws moerl::Error on bad arguments (negative sizes, odd dim, tokens not a multiple of seq, null x) and on a
// launch failure.
#pragma once
#include <cuda_runtime_api.h>

#include <cstdint>

namespace moerl::cuda {

// x: `tokens` rows of `heads` vectors of `dim` rope dims; element (t, h, i) at x[t*row_stride + h*head_stride + i].
void rope_forward(float* x, int64_t tokens, int64_t seq, int64_t heads, int64_t row_stride, int64_t head_stride,
                  int64_t dim, float theta, bool interleave, cudaStream_t stream = nullptr);

// The transpose: rotates the gradient dx (same layout) back by −angle, in place.
void rope_backward(float* dx, int64_t tokens, int64_t seq, int64_t heads, int64_t row_stride, int64_t head_stride,
                   int64_t dim, float theta, bool interleave, cudaStream_t stream = nullptr);

// The device tables the functions above rotate with (cpu::rope_tables: cos and sin [seq, dim / 2] each, FP32),
// for kernels that apply RoPE on the way (kernels/cuda/rope_rotate.cuh); kept for the process. Interleaved pairs:
// pair i of a position is columns (2i, 2i + 1) of its rope dims.
struct RopeTables {
  const float* cos = nullptr;
  const float* sin = nullptr;
  int64_t half = 0;  // dim / 2
  // Whether these are tables for rope dims `dim` (cos and sin set, dim / 2 pairs).
  bool fits(int64_t dim) const { return cos != nullptr && sin != nullptr && dim > 0 && 2 * half == dim; }
};
RopeTables rope_tables(int64_t seq, int64_t dim, float theta);

// rope_backward with interleaved pairs from given tables (dim = 2 · t.half).
void rope_backward_with(const RopeTables& t, float* dx, int64_t tokens, int64_t seq, int64_t heads,
                        int64_t row_stride, int64_t head_stride, cudaStream_t stream = nullptr);

}  // namespace moerl::cuda
