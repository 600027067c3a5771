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
// The routed experts sit behind RoutedExperts: router, permutation and combine stay in MoeFeedForward, the
// expert blocks run wherever the experts live. The single model computes all of them in place (one
// ExpertGroup); expert parallelism (runtime/parallel/ep_shard.hpp) sends each expert's rows to the shard that
// owns it. Every expert sees the same rows in the same order either way, so the results are the same bits.
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

// The routed experts of one MoE layer, on token rows permuted into one block per expert
// (kernels/moe_permute.hpp): the rows of expert e are offsets[e] .. offsets[e+1] - 1 of an [offsets[E], hidden]
// matrix. One forward, then at most one backward, per call of input().
class RoutedExperts {
 public:
  virtual ~RoutedExperts() = default;
  // Where the caller writes the permuted input rows, [offsets[E], hidden]; valid until forward() returns.
  virtual float* input(const int64_t* offsets) = 0;
  // Each expert's SwiGLU on its rows of input(): yp [offsets[E], hidden] overwritten.
  virtual void forward(float* yp, Precision precision) = 0;
  // dyp [offsets[E], hidden] -> dxp (overwritten, same shape) for the rows of the last forward; the experts'
  // weight gradients accumulated where the experts live.
  virtual void backward(const float* dyp, float* dxp) = 0;
};

// Makes the routed experts of the MoE layer registered under `prefix` ("model.layers.3.mlp") when they live
// elsewhere (expert parallelism). An empty function: every MoE layer computes its own experts.
using RoutedExpertsFactory = std::function<std::unique_ptr<RoutedExperts>(const std::string& prefix)>;

// A set of routed experts of one MoE layer and their saved activations: what an expert shard holds of a
// layer, or every expert of it in the single model.
class ExpertGroup {
 public:
  // Registers experts.{e}.{gate,up,down}_proj.weight under prefix for each e of `experts` (ascending, distinct).
  ExpertGroup(Params& params, const std::string& prefix, std::vector<int64_t> experts, int64_t hidden,
              int64_t intermediate);
  const std::vector<int64_t>& experts() const;
  int64_t hidden() const;
  // counts[i] rows for experts()[i], back to back in that order: returns the [Σ counts, hidden] buffer the
  // caller fills with the rows (kept for backward).
  float* prepare(const int64_t* counts);
  // yp [rows, hidden] overwritten: each expert's SwiGLU on its rows. Saves what backward needs.
  void forward(float* yp, Precision precision);
  // dyp [rows, hidden] -> dxp overwritten; weight gradients accumulated.
  void backward(const float* dyp, float* dxp);
  int64_t rows() const;  // of the last prepare()

 private:
  struct Impl;
  std::shared_ptr<Impl> impl_;
};

class MoeFeedForward {
 public:
  // Registers gate.weight [E, hidden], gate.e_score_correction_bias [E] (not trainable) and
  // shared_experts.{gate,up,down}_proj.weight under prefix, and experts.E.{gate,up,down}_proj.weight unless
  // `routed` computes the routed experts elsewhere (then they are not in `params`).
  MoeFeedForward(const ModelConfig& config, Params& params, const std::string& prefix,
                 std::unique_ptr<RoutedExperts> routed = nullptr);

  // x, y: [batch * seq, hidden]. balance_alpha > 0 adds DeepSeek-V3's sequence-wise balance loss
  // alpha · Σ_i f_i · P_i per sequence (mean over sequences), returned here; its gradient is applied in backward.
  float forward(const float* x, int64_t batch, int64_t seq, float* y, Precision precision, float balance_alpha = 0);
  // dx overwritten; weight gradients (router included) accumulated.
  void backward(const float* dy, float* dx);

  const ExpertLoad& load() const;
  // Auxiliary-loss-free balancing: bias_i += gamma · sign(mean load - load_i) from the last forward's load.
  void update_bias(float gamma);
  // The same from a given load (e.g. summed over the micro-batches of a step).
  void update_bias(float gamma, const ExpertLoad& load);

 private:
  struct Impl;
  std::shared_ptr<Impl> impl_;
};

}  // namespace moerl
