// Rollout generation with the model's compressed MLA KV cache (Model::decode): prompts of the same length are
// prefilled together and then decoded one token per step as one batch, each sequence with its own seeded
// random stream. Sampling: temperature 0 = argmax (lowest id on ties); otherwise softmax(logits / temperature),
// cut to the top_k most likely ids, then to the smallest top_p nucleus, renormalized (the rules of
// runtime/train/step_policy.hpp, which now calls this). A sequence ends at its first stop id (kept in the
// output, finish Stop) or after max_new_tokens (finish Length) or when the context is full.
#pragma once
#include <cstdint>
#include <span>
#include <vector>

#include "kernels/linear.hpp"
#include "runtime/messages/types.hpp"
#include "runtime/model/model.hpp"

namespace moerl::rl {

struct GeneratedSequence {
  std::vector<int32_t> ids;
  // log of each id's probability under softmax(logits / temperature) (temperature 1 when greedy), before the
  // top-k / top-p cut: the behaviour policy's log-prob at temperature 1.
  std::vector<float> log_probs;
  msg::FinishReason finish = msg::FinishReason::Length;
};

// One generation per prompt, in order. streams[i] (one per prompt) seeds sequence i's generator together
// with sampling.seed (std::mt19937_64 from splitmix(seed ^ splitmix(stream))): the same arguments give the
// same ids, whatever the batching. Prompts non-empty; prompt + generation at most max_position_embeddings.
std::vector<GeneratedSequence> generate(Model& model, std::span<const std::vector<int32_t>> prompts,
                                        const msg::SamplingParams& sampling, std::span<const uint64_t> streams,
                                        Precision precision);

// The reference path: the same sampling with a full forward over the whole sequence per new token (no cache),
// one prompt. For tests and the tokens/s comparison.
GeneratedSequence generate_uncached(Model& model, std::span<const int32_t> prompt, const msg::SamplingParams& sampling,
                                    uint64_t stream, Precision precision);

// Draws one id from a row of logits [vocab] per the rules above; `u` is uniform in [0, 1).
int32_t sample_id(const float* logits, int64_t vocab, const msg::SamplingParams& sampling, double u);

}  // namespace moerl::rl
