#include "runtime/parallel/pp_optimizer.hpp"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <map>

#include "runtime/error.hpp"

namespace moerl {
namespace {

AdamWConfig without_clip(AdamWConfig c) {
  c.clip_grad_norm = 0;
  return c;
}

}  // namespace

GradSquares grad_squares(const Params& params) {
  GradSquares out;
  for (const auto& [name, p] : params.all())
    if (p.trainable) out.emplace_back(name, sum_squares(p.grad.data<float>(), p.grad.numel()));
  return out;
}

double global_grad_norm(std::span<const GradSquares> parties) {
  std::map<std::string, double> all;
  for (const GradSquares& party : parties)
    for (const auto& [name, sq] : party)
      require(all.emplace(name, sq).second, "global gradient norm: parameter " + name +
                                                " is reported by two parties (a replica must not be trainable)");
  double total = 0;
  for (const auto& [name, sq] : all) total += sq;
  return std::sqrt(total);
}

void copy_weights(const Params& source, Params& dest, const std::string& who) {
  for (auto& [name, p] : dest.all()) {
    require(source.contains(name), who + ": the source weights have no " + name);
    const Param& s = source.at(name);
    require(s.value.shape() == p.value.shape() && s.value.dtype() == p.value.dtype(),
            who + ": " + name + " is " + shape_string(s.value.shape()) + " in the source weights, expected " +
                shape_string(p.value.shape()));
    std::memcpy(p.value.bytes(), s.value.bytes(), p.value.nbytes());
  }
}

PartyOptimizer::PartyOptimizer(Params& params, AdamWConfig config)
    : params_(params), clip_(config.clip_grad_norm), adamw_(params, without_clip(config)) {}

StepStats PartyOptimizer::step(int64_t step, double global_norm) {
  if (!std::isfinite(global_norm)) {
    StepStats stats;
    stats.lr = learning_rate(adamw_.config(), step);
    stats.grad_norm = global_norm;
    stats.skipped = true;
    return stats;
  }
  if (clip_ > 0 && global_norm > clip_) {
    const float scale = static_cast<float>(clip_ / global_norm);
    for (auto& [name, p] : params_.all()) {
      if (!p.trainable) continue;
      float* g = p.grad.data<float>();
      const int64_t n = p.grad.numel();
#pragma omp parallel for schedule(static) if (n >= (1 << 15))
      for (int64_t i = 0; i < n; ++i) g[i] *= scale;
    }
  }
  StepStats stats = adamw_.step(step);
  stats.grad_norm = global_norm;
  return stats;
}

}  // namespace moerl
