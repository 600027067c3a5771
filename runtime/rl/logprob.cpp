#include "runtime/rl/logprob.hpp"

#include <algorithm>
#include <cmath>

#include "runtime/error.hpp"

namespace moerl::rl {

ScoredBatch make_scored_batch(std::span<const std::vector<int32_t>> prompts,
                              std::span<const std::vector<int32_t>> responses, int32_t pad_id) {
  require(prompts.size() == responses.size() && !prompts.empty(),
          "scored batch: " + std::to_string(prompts.size()) + " prompts and " + std::to_string(responses.size()) +
              " responses (need the same number, at least one)");
  ScoredBatch sb;
  sb.batch = static_cast<int64_t>(prompts.size());
  for (size_t i = 0; i < prompts.size(); ++i) {
    require(!prompts[i].empty(), "scored batch: prompt " + std::to_string(i) + " is empty");
    const int64_t n = static_cast<int64_t>(prompts[i].size() + std::max<size_t>(responses[i].size(), 1) - 1);
    sb.seq = std::max(sb.seq, n);
  }
  sb.input_ids.assign(static_cast<size_t>(sb.batch * sb.seq), pad_id);
  sb.targets.assign(sb.input_ids.size(), kIgnoreLabel);
  for (int64_t b = 0; b < sb.batch; ++b) {
    const auto& p = prompts[static_cast<size_t>(b)];
    const auto& r = responses[static_cast<size_t>(b)];
    int64_t* row = sb.input_ids.data() + b * sb.seq;
    std::copy(p.begin(), p.end(), row);
    if (!r.empty()) std::copy(r.begin(), r.end() - 1, row + p.size());
    sb.response_begin.push_back(static_cast<int64_t>(p.size()) - 1);
    sb.response_length.push_back(static_cast<int64_t>(r.size()));
    for (size_t j = 0; j < r.size(); ++j) sb.targets[static_cast<size_t>(sb.at(b, static_cast<int64_t>(j)))] = r[j];
  }
  return sb;
}

std::vector<float> token_log_probs(Model& model, const ScoredBatch& sb, Precision precision, bool for_backward) {
  ForwardOptions o;
  o.precision = precision;
  o.keep_logits = true;
  o.for_backward = for_backward;
  model.forward(TokenBatch{sb.input_ids.data(), sb.targets.data(), sb.batch, sb.seq}, o);
  const float* logits = model.logits();
  const int64_t V = model.config().vocab_size, T = sb.batch * sb.seq;
  std::vector<float> out(static_cast<size_t>(T), 0.0f);
#pragma omp parallel for schedule(static) if (T * V >= (1 << 16))
  for (int64_t t = 0; t < T; ++t) {
    if (sb.targets[t] < 0) continue;
    const float* row = logits + t * V;
    double mx = row[0];
    for (int64_t v = 1; v < V; ++v) mx = std::max(mx, static_cast<double>(row[v]));
    double sum = 0;
    for (int64_t v = 0; v < V; ++v) sum += std::exp(row[v] - mx);
    out[t] = static_cast<float>(row[sb.targets[t]] - mx - std::log(sum));
  }
  return out;
}

void backward_weighted(Model& model, const ScoredBatch& sb, std::span<const float> weights,
                       const float* dfinal_hidden) {
  const int64_t V = model.config().vocab_size, T = sb.batch * sb.seq;
  require(static_cast<int64_t>(weights.size()) == T, "backward_weighted: " + std::to_string(weights.size()) +
                                                         " weights for " + std::to_string(T) + " positions");
  const float* logits = model.logits();
  std::vector<float> dlogits(static_cast<size_t>(T * V), 0.0f);
#pragma omp parallel for schedule(static) if (T * V >= (1 << 16))
  for (int64_t t = 0; t < T; ++t) {
    if (sb.targets[t] < 0 || weights[t] == 0.0f) continue;
    const float* row = logits + t * V;
    float* d = dlogits.data() + t * V;
    double mx = row[0];
    for (int64_t v = 1; v < V; ++v) mx = std::max(mx, static_cast<double>(row[v]));
    double sum = 0;
    for (int64_t v = 0; v < V; ++v) sum += std::exp(row[v] - mx);
    for (int64_t v = 0; v < V; ++v) d[v] = static_cast<float>(weights[t] * (std::exp(row[v] - mx) / sum));
    d[sb.targets[t]] -= weights[t];
  }
  for (int64_t t = 0; t < T; ++t)
    require(sb.targets[t] >= 0 || weights[t] == 0.0f,
            "backward_weighted: weight at position " + std::to_string(t) + " has no target (must be 0)");
  model.backward_from(dlogits.data(), dfinal_hidden);
}

}  // namespace moerl::rl
