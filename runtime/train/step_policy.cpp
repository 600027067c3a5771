#include "runtime/train/step_policy.hpp"

#include <algorithm>
#include <cmath>

#include "runtime/error.hpp"
#include "runtime/rl/generate.hpp"

namespace moerl {
namespace {

// Logits [ids.size(), vocab] of one sequence, forward only.
const float* forward_logits(Model& model, const std::vector<int64_t>& ids, Precision precision) {
  require(!ids.empty(), "a policy forward needs at least one token");
  require(static_cast<int64_t>(ids.size()) <= model.config().max_position_embeddings,
          std::to_string(ids.size()) + " tokens, more than max_position_embeddings = " +
              std::to_string(model.config().max_position_embeddings));
  const std::vector<int64_t> labels(ids.size(), kIgnoreLabel);
  ForwardOptions options;
  options.precision = precision;
  options.keep_logits = true;
  options.for_backward = false;
  model.forward(TokenBatch{ids.data(), labels.data(), 1, static_cast<int64_t>(ids.size())}, options);
  return model.logits();
}

// log-softmax of `row` / temperature at `id`, in double.
double log_prob_at(const float* row, int64_t vocab, int64_t id, double temperature) {
  double max = -INFINITY;
  for (int64_t v = 0; v < vocab; ++v) max = std::max(max, row[v] / temperature);
  double sum = 0;
  for (int64_t v = 0; v < vocab; ++v) sum += std::exp(row[v] / temperature - max);
  return row[id] / temperature - max - std::log(sum);
}

}  // namespace

std::vector<float> response_log_probs(Model& model, std::span<const int32_t> prompt, std::span<const int32_t> response,
                                      Precision precision) {
  require(!prompt.empty(), "response_log_probs: the prompt is empty");
  if (response.empty()) return {};
  std::vector<int64_t> ids(prompt.begin(), prompt.end());
  ids.insert(ids.end(), response.begin(), response.end() - 1);  // the last token predicts nothing we score
  const int64_t vocab = model.config().vocab_size;
  const float* logits = forward_logits(model, ids, precision);
  std::vector<float> out(response.size());
  for (size_t j = 0; j < response.size(); ++j) {
    require(response[j] >= 0 && response[j] < vocab, "response token " + std::to_string(response[j]) +
                                                         " is not in [0, " + std::to_string(vocab) + ")");
    const size_t row = prompt.size() - 1 + j;  // the position whose next token is response[j]
    out[j] = static_cast<float>(log_prob_at(logits + row * static_cast<size_t>(vocab), vocab, response[j], 1.0));
  }
  return out;
}

Generation generate(Model& model, std::span<const int32_t> prompt, const msg::SamplingParams& sampling, uint64_t stream,
                    Precision precision) {
  require(!prompt.empty(), "generate: the prompt is empty");
  const std::vector<std::vector<int32_t>> prompts{std::vector<int32_t>(prompt.begin(), prompt.end())};
  const uint64_t streams[1] = {stream};
  rl::GeneratedSequence g = rl::generate(model, prompts, sampling, streams, precision)[0];
  return Generation{std::move(g.ids), std::move(g.log_probs), g.finish};
}

std::vector<Generation> generate_samples(Model& model, std::span<const int32_t> prompt,
                                         const msg::SamplingParams& sampling, std::span<const uint64_t> streams,
                                         Precision precision) {
  require(!prompt.empty(), "generate: the prompt is empty");
  const std::vector<std::vector<int32_t>> prompts(streams.size(), std::vector<int32_t>(prompt.begin(), prompt.end()));
  std::vector<Generation> out;
  for (rl::GeneratedSequence& g : rl::generate(model, prompts, sampling, streams, precision))
    out.push_back(Generation{std::move(g.ids), std::move(g.log_probs), g.finish});
  return out;
}

}  // namespace moerl
