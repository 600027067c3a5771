// What the policy-side roles compute with a model, forward only: per-token log-probabilities of a response
// (reference policy, reward scoring) and sampled generation (rollout) with the compressed MLA KV cache
// (runtime/rl/generate.hpp).
#pragma once
#include <cstdint>
#include <span>
#include <vector>

#include "runtime/messages/types.hpp"
#include "runtime/model/model.hpp"

namespace moerl {

// log p(response[j] | prompt, response[0..j)) for each j, natural log, from the softmax of the model's logits
// (temperature 1). `prompt` must be non-empty; prompt + response at most max_position_embeddings tokens.
std::vector<float> response_log_probs(Model& model, std::span<const int32_t> prompt, std::span<const int32_t> response,
                                      Precision precision);

struct Generation {
  std::vector<int32_t> ids;
  std::vector<float> log_probs;  // of each id under the distribution it was drawn from (before top-k/top-p)
  msg::FinishReason finish = msg::FinishReason::Length;
};

// Samples up to sampling.max_new_tokens ids after `prompt` (fewer when a stop id is drawn, or the context
// reaches max_position_embeddings). temperature 0: argmax (lowest id on ties), log-probs at temperature 1;
// otherwise softmax(logits / temperature), cut to top_k and then to the top_p nucleus, renormalized, drawn
// with a std::mt19937_64 seeded from (sampling.seed, stream): the same arguments give the same ids.
Generation generate(Model& model, std::span<const int32_t> prompt, const msg::SamplingParams& sampling, uint64_t stream,
                    Precision precision);
// streams.size() samples of one prompt decoded together as one batch; sample i is what generate() gives with
// streams[i].
std::vector<Generation> generate_samples(Model& model, std::span<const int32_t> prompt,
                                         const msg::SamplingParams& sampling, std::span<const uint64_t> streams,
                                         Precision precision);

}  // namespace moerl
