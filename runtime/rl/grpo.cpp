#include "runtime/rl/grpo.hpp"

#include <algorithm>
#include <cmath>

#include "runtime/error.hpp"

namespace moerl::rl {

std::vector<float> group_advantages(std::span<const float> rewards, int64_t group_size, bool scale_by_std) {
  require(group_size > 0 && static_cast<int64_t>(rewards.size()) % group_size == 0,
          "group_advantages: " + std::to_string(rewards.size()) + " rewards do not form groups of " +
              std::to_string(group_size));
  std::vector<float> out(rewards.size());
  for (size_t g = 0; g < rewards.size(); g += static_cast<size_t>(group_size)) {
    double mean = 0, var = 0;
    for (int64_t i = 0; i < group_size; ++i) mean += rewards[g + i];
    mean /= static_cast<double>(group_size);
    for (int64_t i = 0; i < group_size; ++i) var += (rewards[g + i] - mean) * (rewards[g + i] - mean);
    const double sd = std::sqrt(var / static_cast<double>(group_size));
    for (int64_t i = 0; i < group_size; ++i) {
      const double centred = rewards[g + i] - mean;
      out[g + i] = static_cast<float>(sd == 0 ? 0.0 : scale_by_std ? centred / (sd + 1e-4) : centred);
    }
  }
  return out;
}

void grpo_token_terms(const ScoredBatch& sb, std::span<const float> adv, std::vector<float>& token_advantages,
                      std::vector<float>& token_scale) {
  require(static_cast<int64_t>(adv.size()) == sb.batch, "grpo: " + std::to_string(adv.size()) +
                                                            " advantages for " + std::to_string(sb.batch) +
                                                            " responses");
  token_advantages.assign(static_cast<size_t>(sb.batch * sb.seq), 0.0f);
  token_scale.assign(token_advantages.size(), 0.0f);
  for (int64_t b = 0; b < sb.batch; ++b) {
    const int64_t n = sb.response_length[b];
    for (int64_t j = 0; j < n; ++j) {
      token_advantages[static_cast<size_t>(sb.at(b, j))] = adv[b];
      token_scale[static_cast<size_t>(sb.at(b, j))] = 1.0f / static_cast<float>(sb.batch * n);
    }
  }
}

PolicyLossStats clipped_policy_loss(const ScoredBatch& sb, std::span<const float> logp,
                                    std::span<const float> old_logp, std::span<const float> ref_logp,
                                    std::span<const float> adv, std::span<const float> scale, float clip_eps,
                                    float kl_coef, float is_cap, std::vector<float>& weights) {
  const size_t T = static_cast<size_t>(sb.batch * sb.seq);
  require(logp.size() == T && old_logp.size() == T && ref_logp.size() == T && adv.size() == T && scale.size() == T,
          "clipped_policy_loss: every per-token input must have batch·seq = " + std::to_string(T) + " entries");
  weights.assign(T, 0.0f);
  PolicyLossStats st;
  double ratio_sum = 0;
  int64_t clipped = 0;
  for (size_t t = 0; t < T; ++t) {
    if (sb.targets[t] < 0) continue;
    const double lp = logp[t], a = adv[t], c = scale[t];
    const double ratio = std::exp(lp - old_logp[t]);
    const double clipped_ratio = std::clamp(ratio, 1.0 - clip_eps, 1.0 + clip_eps);
    const double unclipped_ratio = is_cap > 0 ? std::min(ratio, static_cast<double>(is_cap)) : ratio;
    double surrogate, d_surrogate;  // value and derivative in logπ
    if (unclipped_ratio * a <= clipped_ratio * a) {
      surrogate = unclipped_ratio * a;
      d_surrogate = ratio == unclipped_ratio ? ratio * a : 0.0;  // a capped ratio is a constant
    } else {
      surrogate = clipped_ratio * a;
      d_surrogate = 0.0;
      ++clipped;
    }
    const double diff = ref_logp[t] - lp;
    const double k3 = std::exp(diff) - diff - 1.0;
    const double d_k3 = 1.0 - std::exp(diff);  // ∂k3/∂logπ
    st.loss += -c * (surrogate - kl_coef * k3);
    weights[t] = static_cast<float>(c * (d_surrogate - kl_coef * d_k3));
    st.kl += k3;
    ratio_sum += ratio;
    ++st.tokens;
  }
  if (st.tokens > 0) {
    st.kl /= static_cast<double>(st.tokens);
    st.clip_fraction = static_cast<double>(clipped) / static_cast<double>(st.tokens);
    st.ratio_mean = ratio_sum / static_cast<double>(st.tokens);
  }
  return st;
}

}  // namespace moerl::rl
