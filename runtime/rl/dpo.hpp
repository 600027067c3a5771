// Direct Preference Optimisation (Rafailov et al. 2023): the policy trained offline on preference pairs, with
// the frozen starting policy as the reference, by the loss per pair
//   L = −log σ(β · [(log π(c) − log π_ref(c)) − (log π(r) − log π_ref(r))])
// where log π(y) is the sum of the response's token log-probabilities given the prompt (logprob.hpp). β sets
// how far the policy may move from the reference (the implicit KL strength). No reward model, no sampling.
#pragma once
#include <cstdint>
#include <functional>
#include <span>
#include <vector>

#include "kernels/linear.hpp"
#include "runtime/model/model.hpp"
#include "runtime/optim/adamw.hpp"

namespace moerl::rl {

// Token ids: the prompt (bos first) and the two responses (each ending in eos).
struct DpoPair {
  std::vector<int32_t> prompt, chosen, rejected;
};

struct DpoMetrics {
  double loss = 0;            // mean DPO loss (nats)
  double accuracy = 0;        // fraction of pairs whose implicit reward prefers the chosen response
  double log_ratio_margin = 0;  // mean (log π(c) − log π_ref(c)) − (log π(r) − log π_ref(r)) (nats)
  double policy_margin = 0;   // mean log π(c) − log π(r): the policy's own preference (nats)
  int64_t pairs = 0;
};

// Reference log-probabilities log π_ref(chosen), log π_ref(rejected) per pair, computed once (the reference
// never changes).
struct ReferenceLogProbs {
  std::vector<double> chosen, rejected;
};
ReferenceLogProbs reference_log_probs(Model& reference, std::span<const DpoPair> pairs, Precision precision,
                                      int64_t batch = 64);

// Forward and backward of the mean DPO loss over `pairs` (gradients += into policy.params()). `ref` holds the
// reference log-probs of exactly these pairs.
DpoMetrics dpo_forward_backward(Model& policy, std::span<const DpoPair> pairs, const ReferenceLogProbs& ref,
                                double beta, Precision precision);
// The same metrics without gradients.
DpoMetrics dpo_evaluate(Model& policy, std::span<const DpoPair> pairs, const ReferenceLogProbs& ref, double beta,
                        Precision precision, int64_t batch = 64);

struct DpoConfig {
  int64_t steps = 100;
  int64_t batch = 16;          // pairs per step
  double beta = 0.1;
  AdamWConfig optimizer;       // total_steps is set to steps
  Precision precision = Precision::FP32;
  float bias_gamma = 0.0f;     // router bias update speed (0 = off)
  uint64_t seed = 1;           // order of the pairs
};

struct DpoResult {
  std::vector<DpoMetrics> steps;  // per step (that step's batch, before its update)
  DpoMetrics train_before, train_after, heldout_before, heldout_after;
  double wall_s = 0;
};

// Trains `policy` in place against `reference` (the policy's starting weights, frozen).
DpoResult train_dpo(Model& policy, Model& reference, std::span<const DpoPair> train, std::span<const DpoPair> heldout,
                    const DpoConfig& config,
                    const std::function<void(int64_t step, const DpoMetrics&)>& on_step = {});

}  // namespace moerl::rl
