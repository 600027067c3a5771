// Per-token log-probabilities of given tokens under a policy, and the backward of any loss that depends on the
// policy only through them. Every policy-gradient objective here (GRPO, PPO, DPO, the KL to a reference) is
// L = Σ_t f_t(log p_t) over scored tokens; with w_t = −∂L/∂log p_t the gradient is that of Σ_t w_t·(−log p_t),
// a per-token weighted cross-entropy:  d L / d logits_t = w_t · (softmax(logits_t) − onehot(token_t)).
//
// Usage (one optimizer step's micro-batch):
//   ScoredBatch sb = make_scored_batch(prompts, responses, kTaskPad);
//   std::vector<float> lp = token_log_probs(model, sb, precision, /*for_backward=*/true);
//   ... weights w[t] from lp (0 where sb.targets[t] == kIgnoreLabel) ...
//   backward_weighted(model, sb, w);   // gradients += into model.params()
#pragma once
#include <cstdint>
#include <span>
#include <vector>

#include "kernels/linear.hpp"
#include "runtime/model/model.hpp"

namespace moerl::rl {

// Sequences prompt + response, right-padded to one length; position t of sequence b predicts targets[b, t].
struct ScoredBatch {
  int64_t batch = 0, seq = 0;
  std::vector<int64_t> input_ids;  // [batch, seq]: prompt + response[0 .. n-1), then pad
  std::vector<int64_t> targets;    // [batch, seq]: response[j] at position prompt_len − 1 + j, else kIgnoreLabel
  std::vector<int64_t> response_begin;  // [batch]: the position whose target is response[0]
  std::vector<int64_t> response_length;  // [batch]
  // Index into [batch, seq] of response token j of sequence b.
  int64_t at(int64_t b, int64_t j) const { return b * seq + response_begin[b] + j; }
};

// prompts[i] non-empty; responses[i] may be empty (then nothing of sequence i is scored). Ids are not checked
// here (the model's forward checks them against its vocabulary).
ScoredBatch make_scored_batch(std::span<const std::vector<int32_t>> prompts,
                              std::span<const std::vector<int32_t>> responses, int32_t pad_id);

// log p(targets[t] | tokens before) for every position, natural log, temperature 1 (computed in double from
// the FP32 logits, stored as float); 0 where the target is kIgnoreLabel. [batch * seq].
// for_backward: keep what backward_weighted needs (the next call on `model` must then be backward_weighted
// or another forward).
std::vector<float> token_log_probs(Model& model, const ScoredBatch& batch, Precision precision,
                                   bool for_backward = false);

// After token_log_probs(..., for_backward = true) on the same batch: accumulates into the parameters' grad the
// gradient of Σ_t weights[t] · (−log p_t), i.e. d/d logits_t = weights[t]·(softmax − onehot(target_t)).
// weights [batch * seq]; entries at ignored positions must be 0. dfinal_hidden [batch*seq, hidden] (optional)
// is a value head's gradient at the final norm's output (Model::backward_from).
void backward_weighted(Model& model, const ScoredBatch& batch, std::span<const float> weights,
                       const float* dfinal_hidden = nullptr);

}  // namespace moerl::rl
