#include "runtime/optim/adamw_shard.hpp"

#include <cmath>

#include "kernels/half.hpp"

namespace moerl {

namespace {
// As adamw.cpp: below this many elements a parallel region costs more than it saves.
constexpr int64_t kParallelUpdate = 1 << 15;
}  // namespace

AdamWStepScalars adamw_step_scalars(const AdamWConfig& config, int64_t step, int64_t t) {
  AdamWStepScalars s;
  s.lr = learning_rate(config, step);
  // Scalars in double, then FP32, exactly as AdamW::step derives them.
  const double bias1 = 1.0 - std::pow(config.beta1, static_cast<double>(t));
  const double bias2 = 1.0 - std::pow(config.beta2, static_cast<double>(t));
  s.beta1 = static_cast<float>(config.beta1);
  s.beta2 = static_cast<float>(config.beta2);
  s.one_minus_beta1 = static_cast<float>(1.0 - config.beta1);
  s.one_minus_beta2 = static_cast<float>(1.0 - config.beta2);
  s.step_size = static_cast<float>(s.lr / bias1);
  s.sqrt_bias2 = static_cast<float>(std::sqrt(bias2));
  s.eps = static_cast<float>(config.eps);
  s.matrix_decay = static_cast<float>(1.0 - s.lr * config.weight_decay);
  return s;
}

void adamw_update_span(const AdamWStepScalars& s, float decay, float* p, const float* g, uint16_t* m, uint16_t* v,
                       int64_t n) {
  const float beta1 = s.beta1, beta2 = s.beta2, one_minus_beta1 = s.one_minus_beta1,
              one_minus_beta2 = s.one_minus_beta2, step_size = s.step_size, sqrt_bias2 = s.sqrt_bias2, eps = s.eps;
#pragma omp parallel for schedule(static) if (n >= kParallelUpdate)
  for (int64_t i = 0; i < n; ++i) {
    const uint16_t m_new = bf16_from_float(beta1 * float_from_bf16(m[i]) + one_minus_beta1 * g[i]);
    const uint16_t v_new = bf16_from_float(beta2 * float_from_bf16(v[i]) + one_minus_beta2 * (g[i] * g[i]));
    m[i] = m_new;
    v[i] = v_new;
    const float denom = std::sqrt(float_from_bf16(v_new)) / sqrt_bias2 + eps;
    p[i] = p[i] * decay - step_size * (float_from_bf16(m_new) / denom);
  }
}

}  // namespace moerl
