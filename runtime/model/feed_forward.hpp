// The feed-forward blocks of DeepSeek-V3, forward and backward written out.
//   DenseFeedForward: SwiGLU, down(silu(gate(x)) * up(x)), the first first_k_dense_replace layers.
//   MoeFeedForward: shared experts (one SwiGLU of width n_shared * moe_intermediate) plus routed experts:
//     scores = sigmoid(x · gateᵀ)                                      (router in FP32)
//     choice = group-limited top-k of (scores + e_score_correction_bias): the n_group groups ranked by the
//              sum of their top-2 biased scores, the best topk_group kept, then top-k experts inside them
//     weights = scores of the chosen experts (unbiased), / their sum if norm_topk_prob, · routed_scaling_factor
//     y = shared(x) + Σ_k weight_k · expert_k(x)
//   Gradients flow through the gating weights into the router (not through the discrete choice).
//   Ties, the masking of excluded groups and the balance loss are spelled out in kernels/router.hpp.
//   forward may write y over x; backward's dx must not alias dy.
#pragma once
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "kernels/linear.hpp"
#include "runtime/model/config.hpp"
#include "runtime/model/params.hpp"

namespace moerl {

class DenseFeedForward {
 public:
  // Registers gate_proj, up_proj, down_proj under prefix (e.g. "model.layers.0.mlp"), width `intermediate`.
  DenseFeedForward(Params& params, const std::string& prefix, int64_t hidden, int64_t intermediate);
  // x, y: [tokens, hidden]. Saves what backward needs.
  void forward(const float* x, int64_t tokens, float* y, Precision precision);
  // dx overwritten; weight gradients accumulated.
  void backward(const float* dy, float* dx);

 private:
  struct Impl;
  std::shared_ptr<Impl> impl_;
};

// Expert load of the last forward pass: tokens routed to each expert.
struct ExpertLoad {
  std::vector<int64_t> tokens_per_expert;  // [n_routed_experts]
  int64_t tokens = 0;                      // tokens routed (each counted once)
};

class MoeFeedForward {
 public:
  // Registers gate.weight [E, hidden], gate.e_score_correction_bias [E] (not trainable),
  // experts.E.{gate,up,down}_proj.weight and shared_experts.{gate,up,down}_proj.weight under prefix.
  MoeFeedForward(const ModelConfig& config, Params& params, const std::string& prefix);

  // x, y: [batch * seq, hidden]. balance_alpha > 0 adds DeepSeek-V3's sequence-wise balance loss
  // alpha · Σ_i f_i · P_i per sequence (mean over sequences), returned here; its gradient is applied in backward.
  float forward(const float* x, int64_t batch, int64_t seq, float* y, Precision precision, float balance_alpha = 0);
  // dx overwritten; weight gradients (router included) accumulated.
  void backward(const float* dy, float* dx);

  const ExpertLoad& load() const;
  // Auxiliary-loss-free balancing: bias_i += gamma · sign(mean load - load_i) from the last forward's load.
  void update_bias(float gamma);

 private:
  struct Impl;
  std::shared_ptr<Impl> impl_;
};

}  // namespace moerl
