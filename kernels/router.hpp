// The DeepSeek-V3 router (HF transformers DeepseekV3TopkRouter + DeepseekV3MoE.route_tokens_to_experts), in FP32,
// after the gate linear (logits = x · gate.weightᵀ, [T, E]):
//   s = sigmoid(logits)                                              scores, [T, E]
//   b = s + e_score_correction_bias                                  used only to choose
//   group score = sum of the top-2 b of the group (top-1 when a group holds a single expert)
//   keep the topk_group best groups, then the top_k experts with the largest b inside them
//   w_k = s[choice_k] (unbiased); if norm_topk_prob: w_k /= (Σ_k w_k + 1e-20); w_k *= routed_scaling_factor
// Ties go to the lower index (group or expert), so the choice is deterministic. The choice lists experts by
// decreasing b.
// Masking: experts outside the kept groups are never chosen (DeepSeek's reference masks them with -inf).
// HF masks them with 0.0 instead, so HF could pick an excluded expert over a kept one whose b is negative;
// both agree whenever the chosen kept experts have b > 0 (always so when the bias is >= 0, since s > 0).
// Gradients flow through w into s and logits (sigmoid'), not through the discrete choice; the bias gets none.
#pragma once
#include <cstdint>

namespace moerl::cpu {

struct RouterSpec {
  int64_t n_experts = 0;              // E (n_routed_experts)
  int64_t top_k = 0;                  // K (num_experts_per_tok), 1 <= K <= topk_group · E / n_group
  int64_t n_group = 1;                // divides E
  int64_t topk_group = 1;             // 1 <= topk_group <= n_group
  bool norm_topk_prob = true;
  float routed_scaling_factor = 1.0f;
};

// logits [T, E], bias [E] -> scores [T, E], topk_idx [T, K], topk_weight [T, K] (all overwritten).
// scores may be logits itself (computed in place). The spec must be valid (the caller checks; see RouterSpec).
void router_forward(const RouterSpec& spec, const float* logits, const float* bias, int64_t tokens, float* scores,
                    int32_t* topk_idx, float* topk_weight);

// The gating weights of a given choice: topk_weight [T, K] from scores [T, E] and topk_idx [T, K].
void router_weights(const RouterSpec& spec, const float* scores, const int32_t* topk_idx, int64_t tokens,
                    float* topk_weight);

// dlogits [T, E] (overwritten) from the gradient of the gating weights, dweight [T, K], plus an optional
// gradient with respect to the scores themselves, dscores [T, E] (null when there is none; e.g. the balance
// loss). The choice topk_idx is held fixed.
void router_backward(const RouterSpec& spec, const float* scores, const int32_t* topk_idx, const float* dweight,
                     const float* dscores, int64_t tokens, float* dlogits);

// DeepSeek-V3's sequence-wise balance loss (eq. 17-20) over tokens = batch · seq, sequence b holding rows
// b·seq .. b·seq + seq - 1:
//   f_i = E / (K · S) · Σ_t 1[i chosen for t],  P_i = 1/S · Σ_t s_{i,t} / Σ_j s_{j,t},  L_b = alpha · Σ_i f_i · P_i
// returns mean_b L_b. When dscores [T, E] is given, adds dL/ds (f held fixed, P differentiated) to it, i.e.
// the gradient as if the loss enters the training objective with weight 1.
float router_balance_loss(const RouterSpec& spec, const float* scores, const int32_t* topk_idx, int64_t batch,
                          int64_t seq, float alpha, float* dscores);

}  // namespace moerl::cpu
