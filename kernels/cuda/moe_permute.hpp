// Token <-> expert-major permutation on the GPU (kernels/cuda/moe_permute.cu): the functions of
// kernels/moe_permute.hpp with the same arguments plus a stream. All pointers are device memory; calls are
// asynchronous on `stream`.
//
// moe_permute_plan gives the CPU's plan exactly (a stable counting sort: each warp counts a chunk of assignments,
// an exclusive scan in (expert, chunk) order gives every chunk's first row per expert, and each warp then places
// its assignments in order, ranking equal experts within 32 lanes by __match_any_sync). No atomics: the same plan
// every run. It takes a temporary buffer of about 12 · E · min(T·K / 256, 512) bytes from the stream-ordered pool
// (cudaMallocAsync). Expert indices outside [0, E) stop the kernel with a trap (the CPU does not check).
//
// Gather, combine, combine backward and scatter-add: one block per row or token. Combine and scatter-add read each
// token's K rows in k order and use the CPU's operations in the CPU's order (a multiply then an add, never fused),
// so they give the CPU's result bit for bit; combine backward's dyp too, while dweight is a dot product summed in
// a fixed tree (deterministic, not in the CPU's order). Rows of 16-byte aligned pointers with dim % 4 == 0 move as
// float4; others take a scalar path.
// Throws moerl::Error on negative sizes, null pointers, sizes a launch cannot hold, or a failed launch.
#pragma once
#include <cuda_runtime_api.h>

#include <cstdint>

namespace moerl::cuda {

// The largest n_experts of moe_permute_plan (a warp keeps one 64-bit cursor per expert in shared memory).
constexpr int64_t kPermuteMaxExperts = 4096;

// topk_idx [T, K] with values in [0, E) -> offsets [E + 1], token_of [T·K], row_of [T·K] (overwritten).
void moe_permute_plan(const int32_t* topk_idx, int64_t tokens, int64_t k, int64_t n_experts, int64_t* offsets,
                      int64_t* token_of, int64_t* row_of, cudaStream_t stream = nullptr);

// xp[r, :] = x[token_of[r], :] for r < rows.   x [T, dim], xp [rows, dim].
void moe_gather(const float* x, const int64_t* token_of, int64_t rows, int64_t dim, float* xp,
                cudaStream_t stream = nullptr);

// y[t, :] += Σ_k weight[t, k] · yp[row_of[t·K + k], :]   (k ascending).   yp [T·K, dim], y [T, dim].
void moe_combine(const float* yp, const float* weight, const int64_t* row_of, int64_t tokens, int64_t k,
                 int64_t dim, float* y, cudaStream_t stream = nullptr);

// dyp[row_of[t·K + k], :] = weight[t, k] · dy[t, :],  dweight[t, k] = <dy[t, :], yp[row_of[t·K + k], :]>.
// dyp may be null: dweight alone (a consumer computes the dyp rows itself, moe_fp8_experts_backward_combined).
void moe_combine_backward(const float* dy, const float* yp, const float* weight, const int64_t* row_of,
                          int64_t tokens, int64_t k, int64_t dim, float* dyp, float* dweight,
                          cudaStream_t stream = nullptr);

// dx[t, :] += Σ_k dxp[row_of[t·K + k], :]   (k ascending).
void moe_scatter_add(const float* dxp, const int64_t* row_of, int64_t tokens, int64_t k, int64_t dim, float* dx,
                     cudaStream_t stream = nullptr);

}  // namespace moerl::cuda
