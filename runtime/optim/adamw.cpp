#include "runtime/optim/adamw.hpp"

#include <cmath>
#include <cstring>
#include <numbers>
#include <set>

#include "kernels/half.hpp"
#include "runtime/error.hpp"
#include "runtime/optim/adamw_state.hpp"

namespace moerl {

namespace {

using adamw_state::kExpAvg;
using adamw_state::kExpAvgSq;
using adamw_state::kStep;

// Elements per partial sum of the gradient norm. Fixed, so the summation order does not depend on the
// number of threads; large enough that a block is worth a thread's start-up.
constexpr int64_t kNormBlock = 1 << 14;
// Below this many elements the update runs on one thread: a parallel region costs more than it saves.
constexpr int64_t kParallelUpdate = 1 << 15;


void require_range(bool ok, const char* field, double value, const char* expected) {
  if (!ok) throw Error("optimizer: " + std::string(field) + " = " + std::to_string(value) + ", expected " + expected);
}

}  // namespace

// Sum of squares of n floats in double: per-block partials (8 interleaved accumulators, a fixed order
// the compiler may not reassociate), then the partials in block order.
double sum_squares(const float* g, int64_t n) {
  const int64_t blocks = (n + kNormBlock - 1) / kNormBlock;
  std::vector<double> partial(static_cast<size_t>(blocks));
#pragma omp parallel for schedule(static) if (blocks > 1)
  for (int64_t b = 0; b < blocks; ++b) {
    const int64_t begin = b * kNormBlock, end = std::min(n, begin + kNormBlock);
    double acc[8] = {};
    int64_t i = begin;
    for (; i + 8 <= end; i += 8)
      for (int k = 0; k < 8; ++k) acc[k] += static_cast<double>(g[i + k]) * g[i + k];
    for (; i < end; ++i) acc[0] += static_cast<double>(g[i]) * g[i];
    partial[static_cast<size_t>(b)] = ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
  }
  double total = 0;
  for (double p : partial) total += p;
  return total;
}

void validate(const AdamWConfig& c) {
  require_range(std::isfinite(c.lr) && c.lr >= 0, "lr", c.lr, ">= 0");
  require_range(c.beta1 >= 0 && c.beta1 < 1, "beta1", c.beta1, "in [0, 1)");
  require_range(c.beta2 >= 0 && c.beta2 < 1, "beta2", c.beta2, "in [0, 1)");
  require_range(c.eps > 0 && std::isfinite(c.eps), "eps", c.eps, "> 0");
  require_range(c.weight_decay >= 0 && std::isfinite(c.weight_decay), "weight_decay", c.weight_decay, ">= 0");
  require_range(c.clip_grad_norm >= 0 && std::isfinite(c.clip_grad_norm), "clip_grad_norm", c.clip_grad_norm,
                ">= 0 (0 = off)");
  require_range(c.warmup_steps >= 0, "warmup_steps", static_cast<double>(c.warmup_steps), ">= 0");
  require_range(c.total_steps >= 1, "total_steps", static_cast<double>(c.total_steps), ">= 1");
  require_range(c.min_lr_ratio >= 0 && c.min_lr_ratio <= 1, "min_lr_ratio", c.min_lr_ratio, "in [0, 1]");
}

double learning_rate(const AdamWConfig& c, int64_t step) {
  require(step >= 0, "learning_rate: step " + std::to_string(step) + " is negative");
  if (step < c.warmup_steps) return c.lr * static_cast<double>(step + 1) / static_cast<double>(c.warmup_steps);
  const double min_lr = c.lr * c.min_lr_ratio;
  const int64_t decay_steps = c.total_steps - c.warmup_steps;
  if (decay_steps <= 0 || step >= c.total_steps) return min_lr;
  const double progress = static_cast<double>(step - c.warmup_steps) / static_cast<double>(decay_steps);
  return min_lr + (c.lr - min_lr) * 0.5 * (1.0 + std::cos(std::numbers::pi * progress));
}

double grad_norm(const Params& params) {
  double total = 0;
  for (const auto& [name, p] : params.all())
    if (p.trainable) total += sum_squares(p.grad.data<float>(), p.grad.numel());
  return std::sqrt(total);
}

double clip_grad_norm(Params& params, double max_norm) {
  require(max_norm > 0, "clip_grad_norm: max_norm " + std::to_string(max_norm) + " must be > 0");
  const double norm = grad_norm(params);
  if (!std::isfinite(norm) || norm <= max_norm) return norm;
  const float scale = static_cast<float>(max_norm / norm);
  for (auto& [name, p] : params.all()) {
    if (!p.trainable) continue;
    float* g = p.grad.data<float>();
    const int64_t n = p.grad.numel();
#pragma omp parallel for schedule(static) if (n >= kParallelUpdate)
    for (int64_t i = 0; i < n; ++i) g[i] *= scale;
  }
  return norm;
}

AdamW::AdamW(Params& params, AdamWConfig config) : params_(params), config_(config), step_tensor_({1}, DType::I64) {
  validate(config_);
  for (auto& [name, p] : params_.all()) {
    if (!p.trainable) continue;
    require(p.value.dtype() == DType::F32 && p.grad.dtype() == DType::F32 && p.grad.shape() == p.value.shape(),
            "optimizer: parameter " + name + " needs an F32 value and an F32 gradient of the same shape");
    slots_.push_back({&name, &p, Tensor(p.value.shape(), DType::BF16), Tensor(p.value.shape(), DType::BF16)});
  }
}

StepStats AdamW::step(int64_t step) {
  StepStats stats;
  stats.lr = learning_rate(config_, step);
  stats.grad_norm = config_.clip_grad_norm > 0 ? clip_grad_norm(params_, config_.clip_grad_norm) : grad_norm(params_);
  if (!std::isfinite(stats.grad_norm)) {
    stats.skipped = true;
    return stats;
  }
  const int64_t t = t_ + 1;
  // Scalars in double, then the per-element arithmetic in FP32 as a GPU kernel would do it.
  const double bias1 = 1.0 - std::pow(config_.beta1, static_cast<double>(t));
  const double bias2 = 1.0 - std::pow(config_.beta2, static_cast<double>(t));
  const float beta1 = static_cast<float>(config_.beta1), beta2 = static_cast<float>(config_.beta2);
  const float one_minus_beta1 = static_cast<float>(1.0 - config_.beta1);
  const float one_minus_beta2 = static_cast<float>(1.0 - config_.beta2);
  const float step_size = static_cast<float>(stats.lr / bias1);
  const float sqrt_bias2 = static_cast<float>(std::sqrt(bias2));
  const float eps = static_cast<float>(config_.eps);

  for (Slot& s : slots_) {
    if (!s.param->trainable) continue;  // frozen after the optimizer was built
    // Decoupled weight decay shrinks matrices only; norms' scales and biases keep their values.
    const float decay = s.param->value.rank() >= 2 ? static_cast<float>(1.0 - stats.lr * config_.weight_decay) : 1.0f;
    float* p = s.param->value.data<float>();
    const float* g = s.param->grad.data<float>();
    uint16_t* m = s.exp_avg.u16();
    uint16_t* v = s.exp_avg_sq.u16();
    const int64_t n = s.param->value.numel();
#pragma omp parallel for schedule(static) if (n >= kParallelUpdate)
    for (int64_t i = 0; i < n; ++i) {
      // The moments are BF16: the update uses the rounded values it stores, so a restored state continues
      // exactly as the uninterrupted run.
      const uint16_t m_new = bf16_from_float(beta1 * float_from_bf16(m[i]) + one_minus_beta1 * g[i]);
      const uint16_t v_new = bf16_from_float(beta2 * float_from_bf16(v[i]) + one_minus_beta2 * (g[i] * g[i]));
      m[i] = m_new;
      v[i] = v_new;
      const float denom = std::sqrt(float_from_bf16(v_new)) / sqrt_bias2 + eps;
      p[i] = p[i] * decay - step_size * (float_from_bf16(m_new) / denom);
    }
  }
  t_ = t;
  step_tensor_.data<int64_t>()[0] = t_;
  return stats;
}

std::map<std::string, const Tensor*> AdamW::state() const {
  std::map<std::string, const Tensor*> out;
  for (const Slot& s : slots_) {
    out[kExpAvg + *s.name] = &s.exp_avg;
    out[kExpAvgSq + *s.name] = &s.exp_avg_sq;
  }
  out[kStep] = &step_tensor_;
  return out;
}

void AdamW::load_state(const SafeTensors& saved) {
  // Everything is checked before anything is copied: a bad file leaves the optimizer as it was.
  std::vector<adamw_state::Moments> sources;
  std::set<std::string> known{kStep};
  for (const Slot& s : slots_) sources.push_back(adamw_state::moments(saved, *s.name, s.param->value.shape(), known));
  adamw_state::refuse_unknown(saved, known);
  const int64_t step = adamw_state::step(saved);

  for (size_t i = 0; i < slots_.size(); ++i) {
    std::memcpy(slots_[i].exp_avg.bytes(), sources[i].exp_avg->bytes(), slots_[i].exp_avg.nbytes());
    std::memcpy(slots_[i].exp_avg_sq.bytes(), sources[i].exp_avg_sq->bytes(), slots_[i].exp_avg_sq.nbytes());
  }
  t_ = step;
  step_tensor_.data<int64_t>()[0] = t_;
}

}  // namespace moerl
