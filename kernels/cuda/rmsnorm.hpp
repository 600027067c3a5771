// RMSNorm on the GPU (kernels/cuda/rmsnorm.cu): the functions of moerl::cpu (kernels/rmsnorm.hpp) with the same
// arguments plus a stream (and optional row strides). All pointers are device memory, outputs not overlapping
// inputs; calls are asynchronous on `stream`.
//
// Precision: sums run in FP32 on the GPU (in double on the CPU), in an order fixed by rows and dim alone:
//   forward: per row, each thread sums its columns, then a fixed-order block sum;
//   backward dweight: two passes — each block sums dy·x·rstd over a fixed chunk of rows into its own slice of a
//   scratch buffer, then for each column 32 threads sum every 32nd chunk and their sums are added in order. No
//   float atomics: the same bits on every run.
// Rows whose pointers are 16-byte aligned with dim and the row strides multiples of 4 take float4 loads, others a
// scalar path.
// Throws moerl::Error on bad arguments (negative sizes, null pointers, dim > 49152 with dweight) and on a
// launch failure.
#pragma once
#include <cuda_runtime_api.h>

#include <cstdint>

namespace moerl::cuda {

// x [rows, dim], weight [dim] -> y [rows, dim] (overwritten), rstd [rows] = 1 / sqrt(mean(x²) + eps).
// x_ld, y_ld: x's and y's row strides in elements (0: dim), for a norm over dim columns of a wider matrix (MLA's
// latent c, the first kv_lora columns of kv_a_proj's output [c | k_rope]; MTP's normed halves of [en | hn]); the
// same bits as the packed rows.
void rmsnorm_forward(const float* x, const float* weight, float* y, float* rstd, int64_t rows, int64_t dim, float eps,
                     cudaStream_t stream = nullptr, int64_t x_ld = 0, int64_t y_ld = 0);

// A residual connection and the norm after it in one pass: sum = x + residual (FP32, [rows, dim]; sum may be x),
// then rmsnorm_forward of sum. The bits of the two done apart, with one write and one read of sum fewer.
void rmsnorm_forward_residual(const float* x, const float* residual, float* sum, const float* weight, float* y,
                              float* rstd, int64_t rows, int64_t dim, float eps, cudaStream_t stream = nullptr);

// dx [rows, dim] overwritten (with residual [rows, dim], non-null: dx = the norm's input gradient + residual, the
// bits of adding them apart); dweight [dim] accumulated (+=), or with overwrite_dweight overwritten (a gradient
// that zero_grad left unset, with no memset before), skipped when null. x_ld, dx_ld, dy_ld: x's, dx's and dy's row
// strides (0: dim; dx's must be dim with a residual), e.g. dx straight into the c columns of [dc | dk_rope], dy read
// from a half of MTP's [den | dhn].
void rmsnorm_backward(const float* dy, const float* x, const float* weight, const float* rstd, float* dx,
                      float* dweight, int64_t rows, int64_t dim, cudaStream_t stream = nullptr,
                      const float* residual = nullptr, int64_t x_ld = 0, int64_t dx_ld = 0, int64_t dy_ld = 0,
                      bool overwrite_dweight = false);

}  // namespace moerl::cuda
