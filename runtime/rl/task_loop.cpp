#include "runtime/util/clock.hpp"
#include "runtime/rl/task_loop.hpp"

#include <chrono>
#include <cmath>

#include "runtime/error.hpp"
#include "runtime/rl/generate.hpp"
#include "runtime/rl/logprob.hpp"

namespace moerl::rl {
namespace {

using Clock = std::chrono::steady_clock;


// Samples `per_problem` responses to each problem (problem-major), rewarded by codec.reward (else the checker).
using Sampled = RlBatch;

Sampled sample(Model& policy, std::span<const Problem> problems, int64_t per_problem,
               const msg::SamplingParams& sampling, int64_t step, Precision precision, const TaskCodec& codec) {
  Sampled s;
  std::vector<uint64_t> streams;
  for (size_t i = 0; i < problems.size(); ++i)
    for (int64_t k = 0; k < per_problem; ++k) {
      s.prompts.push_back(codec.prompt_ids(problems[i]));
      streams.push_back(static_cast<uint64_t>(step) * 1000003ull + i * 1009ull + static_cast<uint64_t>(k));
    }
  const std::vector<GeneratedSequence> gen = generate(policy, s.prompts, sampling, streams, precision);
  std::vector<const Problem*> of;
  for (size_t n = 0; n < gen.size(); ++n) {
    of.push_back(&problems[n / static_cast<size_t>(per_problem)]);
    s.responses.push_back(gen[n].ids);
    s.correct.push_back(codec.check(*of.back(), gen[n].ids) ? 1.0f : 0.0f);
    s.tokens += static_cast<int64_t>(gen[n].ids.size());
  }
  if (codec.reward) {
    s.rewards = codec.reward(of, s.responses);
    require(s.rewards.size() == s.responses.size(), "task loop: the reward function returned " +
                                                        std::to_string(s.rewards.size()) + " rewards for " +
                                                        std::to_string(s.responses.size()) + " responses");
  } else {
    s.rewards = s.correct;
  }
  return s;
}

double mean(const std::vector<float>& x) {
  double sum = 0;
  for (float v : x) sum += v;
  return x.empty() ? 0.0 : sum / static_cast<double>(x.size());
}

// Prompt and answer + eos of each problem as a scored batch (prompt tokens not scored).
ScoredBatch sft_batch(std::span<const Problem> problems, const TaskCodec& codec) {
  std::vector<std::vector<int32_t>> prompts, answers;
  for (const Problem& p : problems) {
    prompts.push_back(codec.prompt_ids(p));
    answers.push_back(codec.answer_ids(p));
    answers.back().push_back(codec.eos_id);
  }
  return make_scored_batch(prompts, answers, codec.pad_id);
}

}  // namespace

TaskCodec char_codec() {
  TaskCodec c;
  c.prompt_ids = [](const Problem& p) { return prompt_ids(p); };
  c.answer_ids = [](const Problem& p) { return task_encode(p.answer); };
  c.check = [](const Problem& p, std::span<const int32_t> r) { return check_answer(p, r); };
  return c;
}

TaskEval evaluate_task(Model& model, const AdditionTask& task, std::span<const Problem> problems,
                       Precision precision, const TaskCodec& codec) {
  TaskEval ev;
  if (problems.empty()) return ev;
  msg::SamplingParams s;
  s.temperature = 0;
  s.max_new_tokens = static_cast<uint32_t>(task.digits + 2);
  s.stop_ids = {codec.eos_id};
  std::vector<std::vector<int32_t>> prompts;
  for (const Problem& p : problems) prompts.push_back(codec.prompt_ids(p));
  const std::vector<uint64_t> streams(prompts.size(), 0);
  const auto gen = generate(model, prompts, s, streams, precision);
  for (size_t i = 0; i < gen.size(); ++i) ev.correct += codec.check(problems[i], gen[i].ids);
  ev.total = static_cast<int64_t>(problems.size());
  return ev;
}

double sampled_accuracy(Model& model, std::span<const Problem> problems, int64_t samples,
                        const msg::SamplingParams& sampling, Precision precision, const TaskCodec& codec) {
  if (problems.empty()) return 0.0;
  const Sampled s = sample(model, problems, samples, sampling, /*step=*/-1, precision, codec);
  return mean(s.correct);
}

double sft_loss(Model& model, std::span<const Problem> problems, Precision precision, const TaskCodec& codec) {
  require(!problems.empty(), "sft_loss: no problems");
  const ScoredBatch sb = sft_batch(problems, codec);
  ForwardOptions o;
  o.precision = precision;
  return model.forward(TokenBatch{sb.input_ids.data(), sb.targets.data(), sb.batch, sb.seq}, o).loss;
}

double sft_step(Model& model, AdamW& optimizer, std::span<const Problem> problems, int64_t step,
                Precision precision, const TaskCodec& codec) {
  require(!problems.empty(), "sft_step: no problems");
  const ScoredBatch sb = sft_batch(problems, codec);
  model.params().zero_grad();
  ForwardOptions o;
  o.precision = precision;
  const LossReport r = model.forward(TokenBatch{sb.input_ids.data(), sb.targets.data(), sb.batch, sb.seq}, o);
  model.backward();
  optimizer.step(step);
  return r.loss;
}

msg::SamplingParams task_sampling(const AdditionTask& task, uint64_t seed, int32_t eos_id) {
  msg::SamplingParams s;
  s.temperature = 1.0f;
  s.max_new_tokens = static_cast<uint32_t>(task.digits + 2);
  s.stop_ids = {eos_id};
  s.seed = seed;
  return s;
}

RlStepStats grpo_step(Model& policy, Model& reference, AdamW& optimizer, const AdditionTask& /*task*/,
                      std::span<const Problem> problems, const GrpoConfig& config, const msg::SamplingParams& sampling,
                      int64_t step, int64_t epochs, Precision precision, const TaskCodec& codec) {
  const auto t0 = Clock::now();
  const Sampled s = sample(policy, problems, config.group_size, sampling, step, precision, codec);
  const double generate_seconds = seconds_since(t0);
  RlStepStats st = grpo_learn(policy, reference, optimizer, s, config, step, epochs, precision, codec.pad_id);
  st.generate_seconds = generate_seconds;
  return st;
}

RlStepStats grpo_learn(Model& policy, Model& reference, AdamW& optimizer, const RlBatch& s, const GrpoConfig& config,
                       int64_t step, int64_t epochs, Precision precision, int32_t pad_id) {
  require(s.prompts.size() == s.responses.size() && s.rewards.size() == s.responses.size() &&
              s.correct.size() == s.responses.size() &&
              s.responses.size() % static_cast<size_t>(config.group_size) == 0,
          "grpo_learn: prompts, responses, rewards and correct must have one entry per response, in whole groups of " +
              std::to_string(config.group_size));
  RlStepStats st;
  st.generated_tokens = s.tokens;
  st.reward_mean = mean(s.rewards);
  st.checker_accuracy = mean(s.correct);
  const auto t0 = Clock::now();
  const std::vector<float> adv = group_advantages(s.rewards, config.group_size, config.scale_by_std);
  const ScoredBatch sb = make_scored_batch(s.prompts, s.responses, pad_id);
  std::vector<float> token_adv, token_scale, weights;
  grpo_token_terms(sb, adv, token_adv, token_scale);
  const std::vector<float> ref_logp = token_log_probs(reference, sb, precision);
  const std::vector<float> old_logp = token_log_probs(policy, sb, precision);
  for (int64_t e = 0; e < epochs; ++e) {
    policy.params().zero_grad();
    const std::vector<float> logp = token_log_probs(policy, sb, precision, true);
    const PolicyLossStats ls = clipped_policy_loss(sb, logp, old_logp, ref_logp, token_adv, token_scale,
                                                   config.clip_eps, config.kl_coef, config.is_cap, weights);
    if (e == 0) st.policy = ls;
    backward_weighted(policy, sb, weights);
    optimizer.step(step * epochs + e);
  }
  st.update_seconds = seconds_since(t0);
  return st;
}

RlStepStats grpo_update(Model& policy, Model& reference, AdamW& optimizer, const RolloutGroups& r,
                        const GrpoConfig& config, uint64_t current_version, uint64_t max_staleness, int64_t step,
                        int64_t* dropped, Precision precision, int32_t pad_id) {
  const size_t n = r.responses.size(), G = static_cast<size_t>(config.group_size);
  require(r.prompts.size() == n && r.behaviour_log_probs.size() == n && r.rewards.size() == n &&
              r.versions.size() == n && n % G == 0,
          "grpo_update: prompts, responses, behaviour_log_probs, rewards and versions must have one entry per "
          "response, in whole groups of " + std::to_string(G));
  RlStepStats st;
  const auto t0 = Clock::now();
  std::vector<std::vector<int32_t>> prompts, responses;
  std::vector<float> rewards;
  std::vector<const std::vector<float>*> behaviour;
  int64_t stale = 0;
  for (size_t g = 0; g < n; g += G) {
    bool fresh = true;
    for (size_t i = g; i < g + G; ++i) {
      require(r.versions[i] <= current_version, "grpo_update: a rollout of policy version " +
                                                    std::to_string(r.versions[i]) + " is newer than the policy (" +
                                                    std::to_string(current_version) + ")");
      require(r.behaviour_log_probs[i].size() == r.responses[i].size(),
              "grpo_update: response " + std::to_string(i) + " needs one behaviour log-prob per token");
      fresh = fresh && current_version - r.versions[i] <= max_staleness;
    }
    if (!fresh) {
      ++stale;
      continue;
    }
    for (size_t i = g; i < g + G; ++i) {
      prompts.push_back(r.prompts[i]);
      responses.push_back(r.responses[i]);
      rewards.push_back(r.rewards[i]);
      behaviour.push_back(&r.behaviour_log_probs[i]);
    }
  }
  if (dropped) *dropped = stale;
  if (rewards.empty()) return st;
  for (float x : rewards) st.reward_mean += x / static_cast<double>(rewards.size());
  const std::vector<float> adv = group_advantages(rewards, config.group_size, config.scale_by_std);
  const ScoredBatch sb = make_scored_batch(prompts, responses, pad_id);
  std::vector<float> token_adv, token_scale, weights, old_logp(sb.targets.size(), 0.0f);
  grpo_token_terms(sb, adv, token_adv, token_scale);
  for (int64_t b = 0; b < sb.batch; ++b)
    for (int64_t j = 0; j < sb.response_length[b]; ++j) old_logp[sb.at(b, j)] = (*behaviour[b])[j];
  const std::vector<float> ref_logp = token_log_probs(reference, sb, precision);
  policy.params().zero_grad();
  const std::vector<float> logp = token_log_probs(policy, sb, precision, true);
  st.policy = clipped_policy_loss(sb, logp, old_logp, ref_logp, token_adv, token_scale, config.clip_eps,
                                  config.kl_coef, config.is_cap, weights);
  backward_weighted(policy, sb, weights);
  optimizer.step(step);
  st.update_seconds = seconds_since(t0);
  return st;
}

RlStepStats ppo_step(Model& policy, Model& reference, ValueHead& critic, AdamW& optimizer, AdamW& critic_optimizer,
                     const AdditionTask& /*task*/, std::span<const Problem> problems, int64_t samples,
                     const PpoConfig& config, const msg::SamplingParams& sampling, int64_t step, int64_t epochs,
                     Precision precision, const TaskCodec& codec) {
  const auto t0 = Clock::now();
  const Sampled s = sample(policy, problems, samples, sampling, step, precision, codec);
  const double generate_seconds = seconds_since(t0);
  RlStepStats st = ppo_learn(policy, reference, critic, optimizer, critic_optimizer, s, config, step, epochs,
                             precision, codec.pad_id);
  st.generate_seconds = generate_seconds;
  return st;
}

RlStepStats ppo_learn(Model& policy, Model& reference, ValueHead& critic, AdamW& optimizer, AdamW& critic_optimizer,
                      const RlBatch& s, const PpoConfig& config, int64_t step, int64_t epochs, Precision precision,
                      int32_t pad_id) {
  require(s.prompts.size() == s.responses.size() && s.rewards.size() == s.responses.size() &&
              s.correct.size() == s.responses.size(),
          "ppo_learn: prompts, responses, rewards and correct must have one entry per response");
  RlStepStats st;
  st.generated_tokens = s.tokens;
  st.reward_mean = mean(s.rewards);
  st.checker_accuracy = mean(s.correct);
  const auto t0 = Clock::now();
  const ScoredBatch sb = make_scored_batch(s.prompts, s.responses, pad_id);
  const int64_t T = sb.batch * sb.seq, D = policy.config().hidden_size;
  const std::vector<float> ref_logp = token_log_probs(reference, sb, precision);
  const std::vector<float> old_logp = token_log_probs(policy, sb, precision);
  const std::vector<float> values = critic.forward(policy.final_hidden(), T);

  // Per-token rewards (KL penalty + the checker's reward on the last token), GAE, returns.
  std::vector<float> token_adv(static_cast<size_t>(T), 0.0f), returns(static_cast<size_t>(T), 0.0f);
  std::vector<float> token_scale(static_cast<size_t>(T), 0.0f);
  int64_t scored = 0;
  for (int64_t b = 0; b < sb.batch; ++b) scored += sb.response_length[b];
  for (int64_t b = 0; b < sb.batch; ++b) {
    const int64_t n = sb.response_length[b];
    std::vector<float> r(static_cast<size_t>(n)), v(static_cast<size_t>(n));
    for (int64_t j = 0; j < n; ++j) {
      const int64_t t = sb.at(b, j);
      r[j] = -config.kl_coef * (old_logp[t] - ref_logp[t]);
      v[j] = values[t];
    }
    if (n > 0) r[n - 1] += s.rewards[b];
    const std::vector<float> a = gae(r, v, config.gamma, config.lambda);
    for (int64_t j = 0; j < n; ++j) {
      const int64_t t = sb.at(b, j);
      token_adv[t] = a[j];
      returns[t] = a[j] + v[j];
      token_scale[t] = 1.0f / static_cast<float>(scored);
    }
  }
  if (config.whiten_advantages && scored > 1) {
    double mean = 0, var = 0;
    for (int64_t t = 0; t < T; ++t) mean += sb.targets[t] >= 0 ? token_adv[t] : 0.0;
    mean /= static_cast<double>(scored);
    for (int64_t t = 0; t < T; ++t)
      if (sb.targets[t] >= 0) var += (token_adv[t] - mean) * (token_adv[t] - mean);
    const double inv = 1.0 / (std::sqrt(var / static_cast<double>(scored)) + 1e-6);
    for (int64_t t = 0; t < T; ++t)
      if (sb.targets[t] >= 0) token_adv[t] = static_cast<float>((token_adv[t] - mean) * inv);
  }

  std::vector<float> weights, dhidden(config.critic_shares_trunk ? static_cast<size_t>(T * D) : 0);
  for (int64_t e = 0; e < epochs; ++e) {
    policy.params().zero_grad();
    critic.params().zero_grad();
    const std::vector<float> logp = token_log_probs(policy, sb, precision, true);
    const PolicyLossStats ls = clipped_policy_loss(sb, logp, old_logp, ref_logp, token_adv, token_scale,
                                                   config.clip_eps, 0.0f, 0.0f, weights);
    std::vector<float> value_scale(token_scale);
    if (config.critic_shares_trunk)
      for (float& x : value_scale) x *= config.value_coef;
    const double vl = critic.backward(policy.final_hidden(), T, returns, value_scale,
                                      config.critic_shares_trunk ? dhidden.data() : nullptr);
    if (e == 0) {
      st.policy = ls;
      st.value_loss = vl;
      // The KL to the reference as GRPO reports it (k3 mean), for comparison.
      double kl = 0;
      for (int64_t t = 0; t < T; ++t)
        if (sb.targets[t] >= 0) {
          const double d = ref_logp[t] - logp[t];
          kl += std::exp(d) - d - 1.0;
        }
      st.policy.kl = kl / static_cast<double>(std::max<int64_t>(scored, 1));
    }
    backward_weighted(policy, sb, weights, config.critic_shares_trunk ? dhidden.data() : nullptr);
    optimizer.step(step * epochs + e);
    critic_optimizer.step(step * epochs + e);
  }
  st.update_seconds = seconds_since(t0);
  return st;
}

}  // namespace moerl::rl
