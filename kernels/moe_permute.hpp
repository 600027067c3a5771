// Token <-> expert-major permutation for the routed experts, in the shape a grouped GEMM consumes.
// Token t routed to experts topk_idx[t, 0..K-1] makes K assignments a = t·K + k. Sorted stably by expert:
//   offsets [E + 1]  expert e owns permuted rows offsets[e] .. offsets[e+1] - 1; offsets[E] = T·K
//   token_of [T·K]   the token of each permuted row (ascending within an expert, since the sort is stable)
//   row_of [T·K]     the permuted row of assignment t·K + k (the inverse of token_of, per assignment)
// Combining reads each token's K rows in k order (a gather, no atomics), so results do not depend on threads.
#pragma once
#include <cstdint>

namespace moerl::cpu {

// topk_idx [T, K] with values in [0, E) -> offsets, token_of, row_of (overwritten).
void moe_permute_plan(const int32_t* topk_idx, int64_t tokens, int64_t k, int64_t n_experts, int64_t* offsets,
                      int64_t* token_of, int64_t* row_of);

// xp[r, :] = x[token_of[r], :] for r < rows (= T·K).   x [T, dim], xp [rows, dim].
void moe_gather(const float* x, const int64_t* token_of, int64_t rows, int64_t dim, float* xp);

// y[t, :] += Σ_k weight[t, k] · yp[row_of[t·K + k], :]   (k ascending).   yp [T·K, dim], y [T, dim].
void moe_combine(const float* yp, const float* weight, const int64_t* row_of, int64_t tokens, int64_t k,
                 int64_t dim, float* y);

// Backward of moe_combine: dyp[row_of[t·K + k], :] = weight[t, k] · dy[t, :] and
// dweight[t, k] = <dy[t, :], yp[row_of[t·K + k], :]> (both overwritten).
void moe_combine_backward(const float* dy, const float* yp, const float* weight, const int64_t* row_of,
                          int64_t tokens, int64_t k, int64_t dim, float* dyp, float* dweight);

// Backward of moe_gather: dx[t, :] += Σ_k dxp[row_of[t·K + k], :]   (k ascending).
void moe_scatter_add(const float* dxp, const int64_t* row_of, int64_t tokens, int64_t k, int64_t dim, float* dx);

}  // namespace moerl::cpu
