#include "runtime/train/step_policy.hpp"

#include <algorithm>
#include <cmath>
#include <numeric>
#include <random>

#include "runtime/error.hpp"

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

uint64_t splitmix(uint64_t x) {
  x += 0x9E3779B97F4A7C15ull;
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
  return x ^ (x >> 31);
}

int32_t draw(const float* row, int64_t vocab, const msg::SamplingParams& s, std::mt19937_64& rng) {
  if (s.temperature == 0) return static_cast<int32_t>(std::max_element(row, row + vocab) - row);
  std::vector<int32_t> order(static_cast<size_t>(vocab));
  std::iota(order.begin(), order.end(), 0);
  // Most likely first, lower id first on ties: a total order, so the cut below is deterministic.
  std::stable_sort(order.begin(), order.end(), [&](int32_t a, int32_t b) { return row[a] > row[b]; });
  size_t keep = order.size();
  if (s.top_k > 0) keep = std::min<size_t>(keep, s.top_k);
  std::vector<double> p(keep);
  const double max = row[order[0]] / static_cast<double>(s.temperature);
  double sum = 0;
  for (size_t i = 0; i < keep; ++i) sum += p[i] = std::exp(row[order[i]] / static_cast<double>(s.temperature) - max);
  if (s.top_p < 1) {
    double cum = 0;
    size_t n = 0;
    while (n < keep && cum < s.top_p * sum) cum += p[n++];
    keep = std::max<size_t>(n, 1);
    sum = std::accumulate(p.begin(), p.begin() + static_cast<long>(keep), 0.0);
  }
  const double u = static_cast<double>(rng() >> 11) * 0x1.0p-53 * sum;  // uniform in [0, sum)
  double cum = 0;
  for (size_t i = 0; i < keep; ++i) {
    cum += p[i];
    if (u < cum) return order[i];
  }
  return order[keep - 1];
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
  require(std::isfinite(sampling.temperature) && sampling.temperature >= 0, "generate: temperature must be >= 0");
  const int64_t vocab = model.config().vocab_size;
  const int64_t context = model.config().max_position_embeddings;
  std::mt19937_64 rng(splitmix(sampling.seed ^ splitmix(stream)));
  std::vector<int64_t> ids(prompt.begin(), prompt.end());
  Generation g;
  while (g.ids.size() < sampling.max_new_tokens) {
    if (static_cast<int64_t>(ids.size()) >= context) break;
    const float* logits = forward_logits(model, ids, precision);
    const float* row = logits + (ids.size() - 1) * static_cast<size_t>(vocab);
    const int32_t id = draw(row, vocab, sampling, rng);
    const double t = sampling.temperature == 0 ? 1.0 : sampling.temperature;
    g.ids.push_back(id);
    g.log_probs.push_back(static_cast<float>(std::min(0.0, log_prob_at(row, vocab, id, t))));
    ids.push_back(id);
    if (std::find(sampling.stop_ids.begin(), sampling.stop_ids.end(), id) != sampling.stop_ids.end()) {
      g.finish = msg::FinishReason::Stop;
      break;
    }
  }
  return g;
}

}  // namespace moerl
