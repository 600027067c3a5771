#include "kernels/router.hpp"

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>
#include <vector>

namespace moerl::cpu {

namespace {

// HF adds this to the sum of the chosen scores before dividing (norm_topk_prob).
constexpr float kNormEps = 1e-20f;

// Score entries (tokens · E) below which an OpenMP fork costs more than the routing it would split.
constexpr int64_t kParallelMin = 1 << 12;

// Index order of a ranking: larger value first, lower index first among equals.
struct Before {
  const float* value;
  bool operator()(int32_t a, int32_t b) const { return value[a] > value[b] || (value[a] == value[b] && a < b); }
};

// One token's choice. scratch: biased [E], group_score [n_group], groups [n_group], candidates [E].
void choose(const RouterSpec& spec, const float* s, const float* bias, int32_t* idx, std::vector<float>& biased,
            std::vector<float>& group_score, std::vector<int32_t>& groups, std::vector<int32_t>& candidates) {
  const int64_t E = spec.n_experts, G = spec.n_group, per_group = E / G;
  for (int64_t e = 0; e < E; ++e) biased[e] = s[e] + bias[e];
  for (int64_t g = 0; g < G; ++g) {
    float first = -std::numeric_limits<float>::infinity(), second = first;
    for (int64_t e = g * per_group; e < (g + 1) * per_group; ++e) {
      if (biased[e] > first) { second = first; first = biased[e]; }
      else if (biased[e] > second) second = biased[e];
    }
    group_score[g] = per_group >= 2 ? first + second : first;
  }
  std::iota(groups.begin(), groups.end(), 0);
  std::partial_sort(groups.begin(), groups.begin() + spec.topk_group, groups.end(), Before{group_score.data()});
  // Only experts of the kept groups are candidates: the -inf mask of DeepSeek's reference.
  std::sort(groups.begin(), groups.begin() + spec.topk_group);
  candidates.clear();
  for (int64_t i = 0; i < spec.topk_group; ++i)
    for (int64_t e = groups[i] * per_group; e < (groups[i] + 1) * per_group; ++e)
      candidates.push_back(static_cast<int32_t>(e));
  std::partial_sort(candidates.begin(), candidates.begin() + spec.top_k, candidates.end(), Before{biased.data()});
  std::copy_n(candidates.begin(), spec.top_k, idx);
}

}  // namespace

void router_weights(const RouterSpec& spec, const float* scores, const int32_t* topk_idx, int64_t tokens,
                    float* topk_weight) {
  const int64_t E = spec.n_experts, K = spec.top_k;
  for (int64_t t = 0; t < tokens; ++t) {
    const float* s = scores + t * E;
    float* w = topk_weight + t * K;
    float sum = 0;
    for (int64_t k = 0; k < K; ++k) sum += w[k] = s[topk_idx[t * K + k]];
    if (spec.norm_topk_prob)
      for (int64_t k = 0; k < K; ++k) w[k] /= sum + kNormEps;
    for (int64_t k = 0; k < K; ++k) w[k] *= spec.routed_scaling_factor;
  }
}

void router_forward(const RouterSpec& spec, const float* logits, const float* bias, int64_t tokens, float* scores,
                    int32_t* topk_idx, float* topk_weight) {
  const int64_t E = spec.n_experts, K = spec.top_k;
#pragma omp parallel if (tokens * E >= kParallelMin)
  {
    std::vector<float> biased(E), group_score(spec.n_group);
    std::vector<int32_t> groups(spec.n_group), candidates;
    candidates.reserve(E);
#pragma omp for schedule(static)
    for (int64_t t = 0; t < tokens; ++t) {
      float* s = scores + t * E;
      for (int64_t e = 0; e < E; ++e) s[e] = 1.0f / (1.0f + std::exp(-logits[t * E + e]));
      choose(spec, s, bias, topk_idx + t * K, biased, group_score, groups, candidates);
    }
  }
  router_weights(spec, scores, topk_idx, tokens, topk_weight);
}

void router_backward(const RouterSpec& spec, const float* scores, const int32_t* topk_idx, const float* dweight,
                     const float* dscores, int64_t tokens, float* dlogits) {
  const int64_t E = spec.n_experts, K = spec.top_k;
  const float c = spec.routed_scaling_factor;
#pragma omp parallel for schedule(static) if (tokens * E >= kParallelMin)
  for (int64_t t = 0; t < tokens; ++t) {
    const float* s = scores + t * E;
    const int32_t* idx = topk_idx + t * K;
    const float* dw = dweight + t * K;
    float* dl = dlogits + t * E;  // holds dL/ds until the last loop turns it into dL/dlogits
    for (int64_t e = 0; e < E; ++e) dl[e] = dscores ? dscores[t * E + e] : 0.0f;
    if (spec.norm_topk_prob) {
      // w_k = c · s_k / S with S = Σ_j s_j + eps:  dL/ds_j = c · (dw_j / S - Σ_k dw_k · s_k / S²).
      float sum = 0, dot = 0;
      for (int64_t k = 0; k < K; ++k) {
        sum += s[idx[k]];
        dot += dw[k] * s[idx[k]];
      }
      sum += kNormEps;
      for (int64_t k = 0; k < K; ++k) dl[idx[k]] += c * (dw[k] / sum - dot / (sum * sum));
    } else {
      for (int64_t k = 0; k < K; ++k) dl[idx[k]] += c * dw[k];
    }
    for (int64_t e = 0; e < E; ++e) dl[e] *= s[e] * (1.0f - s[e]);
  }
}

float router_balance_loss(const RouterSpec& spec, const float* scores, const int32_t* topk_idx, int64_t batch,
                          int64_t seq, float alpha, float* dscores) {
  const int64_t E = spec.n_experts, K = spec.top_k;
  std::vector<double> f(E), P(E), c(E);
  double total = 0;
  for (int64_t b = 0; b < batch; ++b) {
    std::fill(f.begin(), f.end(), 0.0);
    std::fill(P.begin(), P.end(), 0.0);
    for (int64_t t = b * seq; t < (b + 1) * seq; ++t) {
      for (int64_t k = 0; k < K; ++k) f[topk_idx[t * K + k]] += 1.0;
      const float* s = scores + t * E;
      double sum = 0;
      for (int64_t e = 0; e < E; ++e) sum += s[e];
      for (int64_t e = 0; e < E; ++e) P[e] += s[e] / sum;
    }
    double loss = 0;
    for (int64_t e = 0; e < E; ++e) {
      f[e] *= static_cast<double>(E) / static_cast<double>(K * seq);
      P[e] /= static_cast<double>(seq);
      loss += f[e] * P[e];
    }
    total += alpha * loss;
    if (!dscores) continue;
    // dL/ds'_{i,t} = c_i = alpha · f_i / (S · B); s' = s / Σ_j s_j gives dL/ds_{j,t} = (c_j - Σ_i c_i s'_{i,t}) / Σ_j s_j.
    for (int64_t e = 0; e < E; ++e) c[e] = alpha * f[e] / static_cast<double>(seq * batch);
    for (int64_t t = b * seq; t < (b + 1) * seq; ++t) {
      const float* s = scores + t * E;
      double sum = 0, mean_c = 0;
      for (int64_t e = 0; e < E; ++e) sum += s[e];
      for (int64_t e = 0; e < E; ++e) mean_c += c[e] * s[e] / sum;
      for (int64_t e = 0; e < E; ++e) dscores[t * E + e] += static_cast<float>((c[e] - mean_c) / sum);
    }
  }
  return batch > 0 ? static_cast<float>(total / static_cast<double>(batch)) : 0.0f;
}

}  // namespace moerl::cpu
