// Multi-head latent attention (DeepSeek-V2/V3), forward and backward written out, as HF
// DeepseekV3Attention computes it (eager, causal, FP32 softmax):
//   q = q_b_proj(q_a_layernorm(q_a_proj(x)))        (or q_proj(x) when q_lora_rank == 0)   [T, H*(nope+rope)]
//   [c_kv, k_rope] = kv_a_proj_with_mqa(x)                                                   [T, kv_lora + rope]
//   [k_nope, v] = kv_b_proj(kv_a_layernorm(c_kv))                                            [T, H*(nope+v)]
//   RoPE on q's rope part (per head) and on k_rope (shared by all heads); rope_interleave as HF.
//   softmax(q·kᵀ / sqrt(nope+rope), causal) · v  ->  o_proj                                 [T, hidden]
// Linear layers run in the chosen Precision; norms, RoPE, softmax and the attention core in FP32.
#pragma once
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "kernels/linear.hpp"
#include "runtime/model/config.hpp"
#include "runtime/model/params.hpp"

namespace moerl {

// Tensor parallelism (Megatron-style): this rank's part of a block split over `ranks` ranks that all see the
// same input. The block's width (attention heads, FFN columns) is cut into `ranks` equal contiguous parts;
// rank r computes part r, and all_reduce_sum (the sum over the ranks, in place, called in the same order
// with the same sizes on every rank) turns partial results into the full ones. ranks == 1: the whole block.
struct TensorSlice {
  int rank = 0, ranks = 1;
  std::function<void(float* data, int64_t n)> all_reduce_sum;  // required when ranks > 1
};

// The inference cache of one MLA block for `batch` sequences decoded in step (all at the same position): per
// position only the compressed latent c_kv (before kv_a_layernorm) and the roped shared key k_rope, H·(dn+dv) /
// (kv_lora + dr) times smaller than caching K and V. decode() expands them through kv_a_layernorm and kv_b_proj
// at every step.
struct MlaCache {
  int64_t batch = 0, capacity = 0;  // sequences; positions each can hold
  int64_t length = 0;               // positions held (the same for every sequence)
  std::vector<float> latent;        // [batch, capacity, kv_lora]
  std::vector<float> k_rope;        // [batch, capacity, qk_rope_head_dim], RoPE applied at its position
};

class MlaAttention {
 public:
  // Registers (Params::add) this block's weights under `prefix` (e.g. "model.layers.0.self_attn"):
  // q_a_proj, q_a_layernorm, q_b_proj (or q_proj), kv_a_proj_with_mqa, kv_a_layernorm, kv_b_proj, o_proj.
  // With a TensorSlice over T ranks this rank owns heads [r·H/T, (r+1)·H/T) (H % T == 0): q_b_proj (q_proj)
  // and kv_b_proj hold only those heads' rows ([H/T·dq, ·], [H/T·(dn+dv), kv_lora], column-parallel), o_proj
  // only their columns ([hidden, H/T·dv], row-parallel); q_a_proj, kv_a_proj_with_mqa and the norms are whole
  // copies. forward all-reduces the partial o_proj outputs, so y is the full output on every rank; backward
  // all-reduces the gradients flowing into the copied part ([T, kv_lora + dr] and [T, q_lora] or [T, hidden]),
  // so dx and the copies' weight gradients are the full ones, identical on every rank.
  MlaAttention(const ModelConfig& config, Params& params, const std::string& prefix, TensorSlice slice = {});

  // x, y: [batch * seq, hidden], token-major; sequence b occupies rows b*seq .. b*seq+seq-1, positions 0..seq-1.
  // Saves what backward needs inside this object (one forward, then at most one backward).
  void forward(const float* x, int64_t batch, int64_t seq, float* y, Precision precision);
  // dy: [batch * seq, hidden] -> dx overwritten; weight gradients accumulated (+=) in Params.
  void backward(const float* dy, float* dx);

  // An empty cache for `batch` sequences of up to `capacity` positions.
  MlaCache new_cache(int64_t batch, int64_t capacity) const;
  // Inference with the cache: x [batch * n_new, hidden] holds each sequence's next n_new tokens (positions
  // cache.length .. cache.length + n_new - 1), y the same shape; appends them to the cache. Prefill is n_new =
  // prompt length, then n_new = 1 per generated token. Computes what forward computes for those rows (causal
  // attention over everything cached), up to FP32 summation order. Saves nothing for backward.
  void decode(const float* x, int64_t n_new, MlaCache& cache, float* y, Precision precision) const;

 private:
  struct Impl;
  std::shared_ptr<Impl> impl_;
};

}  // namespace moerl
