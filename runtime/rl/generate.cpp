#include "runtime/rl/generate.hpp"

#include <algorithm>
#include <cmath>
#include <map>
#include <numeric>
#include <random>

#include "runtime/error.hpp"
#include "runtime/util/splitmix.hpp"

namespace moerl::rl {
namespace {

double uniform(std::mt19937_64& rng) { return static_cast<double>(rng() >> 11) * 0x1.0p-53; }

// log-softmax of row / temperature at id, in double.
double log_prob_at(const float* row, int64_t vocab, int64_t id, double temperature) {
  double mx = -INFINITY;
  for (int64_t v = 0; v < vocab; ++v) mx = std::max(mx, row[v] / temperature);
  double sum = 0;
  for (int64_t v = 0; v < vocab; ++v) sum += std::exp(row[v] / temperature - mx);
  return row[id] / temperature - mx - std::log(sum);
}

void check_sampling(const msg::SamplingParams& s) {
  require(std::isfinite(s.temperature) && s.temperature >= 0, "generate: temperature must be >= 0");
  require(s.top_p > 0 && s.top_p <= 1, "generate: top_p must be in (0, 1]");
}

// Appends a drawn id to a sequence; true when the sequence is finished.
bool append(GeneratedSequence& g, const float* row, int64_t vocab, int32_t id, const msg::SamplingParams& s) {
  const double t = s.temperature == 0 ? 1.0 : s.temperature;
  g.ids.push_back(id);
  g.log_probs.push_back(static_cast<float>(std::min(0.0, log_prob_at(row, vocab, id, t))));
  if (std::find(s.stop_ids.begin(), s.stop_ids.end(), id) != s.stop_ids.end()) {
    g.finish = msg::FinishReason::Stop;
    return true;
  }
  return g.ids.size() >= s.max_new_tokens;
}

// Prompts of one length, decoded in step. out[i] for prompts[i].
void generate_same_length(Model& model, const std::vector<const std::vector<int32_t>*>& prompts,
                          const msg::SamplingParams& s, const std::vector<uint64_t>& streams, Precision precision,
                          std::vector<GeneratedSequence*>& out) {
  const int64_t B = static_cast<int64_t>(prompts.size()), P = static_cast<int64_t>(prompts[0]->size());
  const int64_t V = model.config().vocab_size, context = model.config().max_position_embeddings;
  const int64_t steps = std::min<int64_t>(s.max_new_tokens, context - P);
  if (steps <= 0) return;
  std::vector<std::mt19937_64> rngs;
  for (uint64_t stream : streams) rngs.emplace_back(splitmix64(s.seed ^ splitmix64(stream)));
  KvCache cache = model.new_cache(B, P + steps - 1);  // the last drawn token is never fed back
  std::vector<int64_t> ids(static_cast<size_t>(B * P));
  for (int64_t b = 0; b < B; ++b) std::copy(prompts[b]->begin(), prompts[b]->end(), ids.begin() + b * P);
  std::vector<float> logits(static_cast<size_t>(B * P * V));
  model.decode(ids.data(), P, cache, logits.data(), precision);
  std::vector<const float*> rows(static_cast<size_t>(B));
  for (int64_t b = 0; b < B; ++b) rows[b] = logits.data() + (b * P + P - 1) * V;
  std::vector<char> done(static_cast<size_t>(B), 0);
  std::vector<float> step_logits(static_cast<size_t>(B * V));
  for (int64_t step = 0; step < steps; ++step) {
    std::vector<int64_t> next(static_cast<size_t>(B));
    bool all_done = true;
    for (int64_t b = 0; b < B; ++b) {
      // Finished sequences keep decoding (their tokens are discarded) so the batch stays in step.
      const int32_t id = sample_id(rows[b], V, s, uniform(rngs[b]));
      next[b] = id;
      if (!done[b]) done[b] = append(*out[b], rows[b], V, id, s);
      all_done = all_done && done[b];
    }
    if (all_done || step + 1 == steps) break;
    model.decode(next.data(), 1, cache, step_logits.data(), precision);
    for (int64_t b = 0; b < B; ++b) rows[b] = step_logits.data() + b * V;
  }
}

}  // namespace

int32_t sample_id(const float* row, int64_t vocab, const msg::SamplingParams& s, double u) {
  if (s.temperature == 0) return static_cast<int32_t>(std::max_element(row, row + vocab) - row);
  std::vector<int32_t> order(static_cast<size_t>(vocab));
  std::iota(order.begin(), order.end(), 0);
  // Most likely first, lower id first on ties: a total order, so the cuts are deterministic.
  std::stable_sort(order.begin(), order.end(), [&](int32_t a, int32_t b) { return row[a] > row[b]; });
  size_t keep = order.size();
  if (s.top_k > 0) keep = std::min<size_t>(keep, s.top_k);
  std::vector<double> p(keep);
  const double t = s.temperature, mx = row[order[0]] / t;
  double sum = 0;
  for (size_t i = 0; i < keep; ++i) sum += p[i] = std::exp(row[order[i]] / t - mx);
  if (s.top_p < 1) {
    double cum = 0;
    size_t n = 0;
    while (n < keep && cum < s.top_p * sum) cum += p[n++];
    keep = std::max<size_t>(n, 1);
    sum = std::accumulate(p.begin(), p.begin() + static_cast<long>(keep), 0.0);
  }
  const double target = u * sum;
  double cum = 0;
  for (size_t i = 0; i < keep; ++i) {
    cum += p[i];
    if (target < cum) return order[i];
  }
  return order[keep - 1];
}

std::vector<GeneratedSequence> generate(Model& model, std::span<const std::vector<int32_t>> prompts,
                                        const msg::SamplingParams& sampling, std::span<const uint64_t> streams,
                                        Precision precision) {
  check_sampling(sampling);
  require(streams.size() == prompts.size(), "generate: " + std::to_string(streams.size()) + " streams for " +
                                                std::to_string(prompts.size()) + " prompts");
  std::vector<GeneratedSequence> out(prompts.size());
  std::map<size_t, std::vector<size_t>> by_length;  // prompt length -> prompt indices, ascending
  for (size_t i = 0; i < prompts.size(); ++i) {
    require(!prompts[i].empty(), "generate: prompt " + std::to_string(i) + " is empty");
    require(static_cast<int64_t>(prompts[i].size()) <= model.config().max_position_embeddings,
            "generate: prompt " + std::to_string(i) + " has " + std::to_string(prompts[i].size()) +
                " tokens, more than max_position_embeddings = " +
                std::to_string(model.config().max_position_embeddings));
    by_length[prompts[i].size()].push_back(i);
  }
  for (auto& [length, indices] : by_length) {
    std::vector<const std::vector<int32_t>*> group;
    std::vector<uint64_t> group_streams;
    std::vector<GeneratedSequence*> group_out;
    for (size_t i : indices) {
      group.push_back(&prompts[i]);
      group_streams.push_back(streams[i]);
      group_out.push_back(&out[i]);
    }
    generate_same_length(model, group, sampling, group_streams, precision, group_out);
  }
  return out;
}

GeneratedSequence generate_uncached(Model& model, std::span<const int32_t> prompt, const msg::SamplingParams& s,
                                    uint64_t stream, Precision precision) {
  check_sampling(s);
  require(!prompt.empty(), "generate: the prompt is empty");
  const int64_t V = model.config().vocab_size, context = model.config().max_position_embeddings;
  std::mt19937_64 rng(splitmix64(s.seed ^ splitmix64(stream)));
  std::vector<int64_t> ids(prompt.begin(), prompt.end());
  GeneratedSequence g;
  ForwardOptions o;
  o.precision = precision;
  o.keep_logits = true;
  o.for_backward = false;
  while (g.ids.size() < s.max_new_tokens && static_cast<int64_t>(ids.size()) < context) {
    const std::vector<int64_t> labels(ids.size(), kIgnoreLabel);
    model.forward(TokenBatch{ids.data(), labels.data(), 1, static_cast<int64_t>(ids.size())}, o);
    const float* row = model.logits() + (static_cast<int64_t>(ids.size()) - 1) * V;
    const int32_t id = sample_id(row, V, s, uniform(rng));
    ids.push_back(id);
    if (append(g, row, V, id, s)) break;
  }
  return g;
}

}  // namespace moerl::rl
