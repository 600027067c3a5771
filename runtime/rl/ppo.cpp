#include "runtime/rl/ppo.hpp"

#include "runtime/error.hpp"

namespace moerl::rl {

std::vector<float> gae(std::span<const float> rewards, std::span<const float> values, float gamma, float lambda) {
  require(rewards.size() == values.size(), "gae: " + std::to_string(rewards.size()) + " rewards and " +
                                               std::to_string(values.size()) + " values");
  std::vector<float> adv(rewards.size());
  double running = 0;
  for (size_t k = rewards.size(); k-- > 0;) {
    const double next_value = k + 1 < values.size() ? values[k + 1] : 0.0;
    const double delta = rewards[k] + gamma * next_value - values[k];
    running = delta + static_cast<double>(gamma) * lambda * running;
    adv[k] = static_cast<float>(running);
  }
  return adv;
}

ValueHead::ValueHead(int64_t hidden) : hidden_(hidden) {
  require(hidden > 0, "value head: hidden size must be positive");
  params_.add("value_head.weight", {1, hidden});
  params_.add("value_head.bias", {1});
}

std::vector<float> ValueHead::forward(const float* h, int64_t rows) const {
  const float* w = params_.at("value_head.weight").value.data<float>();
  const float b = params_.at("value_head.bias").value.data<float>()[0];
  std::vector<float> v(static_cast<size_t>(rows));
  for (int64_t r = 0; r < rows; ++r) {
    double s = b;
    for (int64_t d = 0; d < hidden_; ++d) s += static_cast<double>(w[d]) * h[r * hidden_ + d];
    v[r] = static_cast<float>(s);
  }
  return v;
}

double ValueHead::backward(const float* h, int64_t rows, std::span<const float> targets, std::span<const float> scale,
                           float* dhidden) {
  require(static_cast<int64_t>(targets.size()) == rows && static_cast<int64_t>(scale.size()) == rows,
          "value head: targets and scales need one entry per row");
  const std::vector<float> v = forward(h, rows);
  Param& w = params_.at("value_head.weight");
  Param& b = params_.at("value_head.bias");
  const float* wv = w.value.data<float>();
  float* gw = w.grad.data<float>();
  double gb = 0, loss = 0;
  std::vector<double> acc(static_cast<size_t>(hidden_), 0.0);
  if (dhidden) std::fill_n(dhidden, rows * hidden_, 0.0f);
  for (int64_t r = 0; r < rows; ++r) {
    if (scale[r] == 0) continue;
    const double err = static_cast<double>(v[r]) - targets[r];
    loss += 0.5 * scale[r] * err * err;
    const double g = scale[r] * err;  // d loss / d V_r
    gb += g;
    for (int64_t d = 0; d < hidden_; ++d) {
      acc[d] += g * h[r * hidden_ + d];
      if (dhidden) dhidden[r * hidden_ + d] = static_cast<float>(g * wv[d]);
    }
  }
  for (int64_t d = 0; d < hidden_; ++d) gw[d] += static_cast<float>(acc[d]);
  b.grad.data<float>()[0] += static_cast<float>(gb);
  return loss;
}

}  // namespace moerl::rl
