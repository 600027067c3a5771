#include "runtime/rl/dpo.hpp"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <numeric>
#include <random>

#include "runtime/error.hpp"
#include "runtime/rl/logprob.hpp"

namespace moerl::rl {
namespace {

double softplus(double x) { return x > 0 ? x + std::log1p(std::exp(-x)) : std::log1p(std::exp(x)); }
double sigmoid(double x) { return 1.0 / (1.0 + std::exp(-x)); }

// One scored batch of 2P sequences: chosen responses in rows [0, P), rejected in [P, 2P).
ScoredBatch pair_batch(std::span<const DpoPair> pairs) {
  std::vector<std::vector<int32_t>> prompts, responses;
  for (const auto& p : pairs) {
    require(!p.prompt.empty() && !p.chosen.empty() && !p.rejected.empty(),
            "dpo: a pair needs a prompt and two non-empty responses");
    prompts.push_back(p.prompt);
    responses.push_back(p.chosen);
  }
  for (const auto& p : pairs) {
    prompts.push_back(p.prompt);
    responses.push_back(p.rejected);
  }
  return make_scored_batch(prompts, responses, 2);
}

// Σ over each sequence's response tokens of lp.
std::vector<double> sequence_sums(const ScoredBatch& b, std::span<const float> lp) {
  std::vector<double> s(static_cast<size_t>(b.batch), 0.0);
  for (int64_t i = 0; i < b.batch; ++i)
    for (int64_t j = 0; j < b.response_length[static_cast<size_t>(i)]; ++j) s[static_cast<size_t>(i)] += lp[static_cast<size_t>(b.at(i, j))];
  return s;
}

// Metrics of pairs [begin, begin + n) from the sequences' log-prob sums; `g` gets ∂L/∂(β·Δ) per pair.
void accumulate(DpoMetrics& m, std::span<const double> seq, size_t n, const ReferenceLogProbs& ref, size_t begin,
                double beta, std::vector<double>* g) {
  for (size_t i = 0; i < n; ++i) {
    const double c = seq[i], r = seq[n + i];
    const double delta = (c - ref.chosen[begin + i]) - (r - ref.rejected[begin + i]);
    m.loss += softplus(-beta * delta);
    m.accuracy += delta > 0;
    m.log_ratio_margin += delta;
    m.policy_margin += c - r;
    if (g) g->push_back(-sigmoid(-beta * delta));
  }
}

void finish(DpoMetrics& m) {
  const double n = static_cast<double>(m.pairs);
  if (n == 0) return;
  m.loss /= n;
  m.accuracy /= n;
  m.log_ratio_margin /= n;
  m.policy_margin /= n;
}

}  // namespace

ReferenceLogProbs reference_log_probs(Model& reference, std::span<const DpoPair> pairs, Precision precision,
                                      int64_t batch) {
  ReferenceLogProbs ref;
  for (size_t start = 0; start < pairs.size(); start += static_cast<size_t>(batch)) {
    const size_t n = std::min(pairs.size() - start, static_cast<size_t>(batch));
    const ScoredBatch b = pair_batch(pairs.subspan(start, n));
    const auto lp = token_log_probs(reference, b, precision, false);
    const auto s = sequence_sums(b, lp);
    ref.chosen.insert(ref.chosen.end(), s.begin(), s.begin() + static_cast<long>(n));
    ref.rejected.insert(ref.rejected.end(), s.begin() + static_cast<long>(n), s.end());
  }
  return ref;
}

DpoMetrics dpo_forward_backward(Model& policy, std::span<const DpoPair> pairs, const ReferenceLogProbs& ref,
                                double beta, Precision precision) {
  require(!pairs.empty(), "dpo: no pairs in the batch");
  require(ref.chosen.size() == pairs.size() && ref.rejected.size() == pairs.size(),
          "dpo: the reference log-probs do not match the pairs");
  const size_t P = pairs.size();
  const ScoredBatch b = pair_batch(pairs);
  const auto lp = token_log_probs(policy, b, precision, true);
  const auto seq = sequence_sums(b, lp);
  DpoMetrics m;
  m.pairs = static_cast<int64_t>(P);
  std::vector<double> g;
  accumulate(m, seq, P, ref, 0, beta, &g);
  // ∂L/∂log π(c) = β·g/P for every token of c, −β·g/P for r; backward_weighted takes w = −∂L/∂log p.
  std::vector<float> w(static_cast<size_t>(b.batch * b.seq), 0.0f);
  for (size_t i = 0; i < P; ++i) {
    const double wc = -beta * g[i] / static_cast<double>(P);
    for (int64_t j = 0; j < b.response_length[i]; ++j) w[static_cast<size_t>(b.at(static_cast<int64_t>(i), j))] = static_cast<float>(wc);
    const int64_t r = static_cast<int64_t>(P + i);
    for (int64_t j = 0; j < b.response_length[static_cast<size_t>(r)]; ++j) w[static_cast<size_t>(b.at(r, j))] = static_cast<float>(-wc);
  }
  backward_weighted(policy, b, w);
  finish(m);
  return m;
}

DpoMetrics dpo_evaluate(Model& policy, std::span<const DpoPair> pairs, const ReferenceLogProbs& ref, double beta,
                        Precision precision, int64_t batch) {
  DpoMetrics m;
  m.pairs = static_cast<int64_t>(pairs.size());
  for (size_t start = 0; start < pairs.size(); start += static_cast<size_t>(batch)) {
    const size_t n = std::min(pairs.size() - start, static_cast<size_t>(batch));
    const ScoredBatch b = pair_batch(pairs.subspan(start, n));
    const auto lp = token_log_probs(policy, b, precision, false);
    accumulate(m, sequence_sums(b, lp), n, ref, start, beta, nullptr);
  }
  finish(m);
  return m;
}

DpoResult train_dpo(Model& policy, Model& reference, std::span<const DpoPair> train, std::span<const DpoPair> heldout,
                    const DpoConfig& config, const std::function<void(int64_t, const DpoMetrics&)>& on_step) {
  require(!train.empty(), "dpo: no training pairs");
  require(config.steps > 0 && config.batch > 0 && config.beta > 0, "dpo: steps, batch and beta must be positive");
  const auto t0 = std::chrono::steady_clock::now();
  const ReferenceLogProbs ref_train = reference_log_probs(reference, train, config.precision);
  const ReferenceLogProbs ref_held = reference_log_probs(reference, heldout, config.precision);
  DpoResult result;
  result.train_before = dpo_evaluate(policy, train, ref_train, config.beta, config.precision);
  result.heldout_before = dpo_evaluate(policy, heldout, ref_held, config.beta, config.precision);
  AdamWConfig oc = config.optimizer;
  oc.total_steps = config.steps;
  AdamW opt(policy.params(), oc);
  std::mt19937_64 rng(config.seed);
  std::vector<size_t> order(train.size());
  std::iota(order.begin(), order.end(), size_t{0});
  std::shuffle(order.begin(), order.end(), rng);
  size_t cursor = 0;
  std::vector<DpoPair> batch;
  ReferenceLogProbs ref_batch;
  for (int64_t step = 0; step < config.steps; ++step) {
    batch.clear();
    ref_batch = {};
    for (int64_t i = 0; i < config.batch; ++i) {
      if (cursor == order.size()) {
        std::shuffle(order.begin(), order.end(), rng);
        cursor = 0;
      }
      const size_t k = order[cursor++];
      batch.push_back(train[k]);
      ref_batch.chosen.push_back(ref_train.chosen[k]);
      ref_batch.rejected.push_back(ref_train.rejected[k]);
    }
    policy.params().zero_grad();
    const DpoMetrics m = dpo_forward_backward(policy, batch, ref_batch, config.beta, config.precision);
    opt.step(step);
    if (config.bias_gamma > 0) policy.update_router_bias(config.bias_gamma);
    result.steps.push_back(m);
    if (on_step) on_step(step, m);
  }
  result.train_after = dpo_evaluate(policy, train, ref_train, config.beta, config.precision);
  result.heldout_after = dpo_evaluate(policy, heldout, ref_held, config.beta, config.precision);
  result.wall_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  return result;
}

}  // namespace moerl::rl
