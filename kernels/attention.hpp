// Causal softmax attention core in FP32 (HF eager attention): per sequence b and head h,
//   S = scale · Q·Kᵀ [seq, seq], S_ij = −inf for j > i, P = softmax(S) by rows, O = P·V.
// Queries and keys have the same head dim dqk, values dv (MLA: dqk = nope + rope, dv = v_head_dim).
// Memory: one [seq, seq] score block per thread at a time; parallel over (batch, head).
#pragma once
#include <cstdint>

namespace moerl::cpu {

// q, k [batch*seq, heads, dqk]; v [batch*seq, heads, dv] (token-major, contiguous)
//   -> out [batch*seq, heads, dv] (overwritten); lse [batch, heads, seq] = log Σ_j exp(S_ij), saved for backward.
void attention_forward(const float* q, const float* k, const float* v, float* out, float* lse, int64_t batch,
                       int64_t seq, int64_t heads, int64_t dqk, int64_t dv, float scale);

// dout [batch*seq, heads, dv] with the forward's q, k, v, out, lse -> dq, dk [batch*seq, heads, dqk] and
// dv_out [batch*seq, heads, dv], all overwritten. P is recomputed from q, k and lse.
void attention_backward(const float* dout, const float* q, const float* k, const float* v, const float* out,
                        const float* lse, float* dq, float* dk, float* dv_out, int64_t batch, int64_t seq,
                        int64_t heads, int64_t dqk, int64_t dv, float scale);

}  // namespace moerl::cpu
