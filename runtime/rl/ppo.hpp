// PPO for RLHF (Ouyang et al. 2022, "InstructGPT"; Schulman et al. 2017): a critic, a value head on the policy's
// final hidden states, estimates V(s_j) at each response position; per-token rewards are the KL penalty to the
// frozen reference plus the task reward on the last token,
//   r_j = −β·(logπ_old(o_j) − logπ_ref(o_j)) + [j = last]·R
// advantages by GAE, Â_j = Σ_k (γλ)^k δ_{j+k}, δ_j = r_j + γ·V_{j+1} − V_j (V after the last token = 0), whitened
// over the batch; returns Â_j + V_j train the critic (squared error); the policy takes the clipped surrogate
// of runtime/rl/grpo.hpp (without its k3 term: the KL is in the reward).
#pragma once
#include <cstdint>
#include <span>
#include <vector>

#include "runtime/model/params.hpp"
#include "runtime/rl/grpo.hpp"

namespace moerl::rl {

struct PpoConfig {
  float clip_eps = 0.2f;
  float kl_coef = 0.05f;      // β of the per-token KL penalty in the reward
  float gamma = 1.0f;         // discount
  float lambda = 0.95f;       // GAE λ
  float value_coef = 0.5f;    // weight of the critic's squared error when it shares the trunk
  bool critic_shares_trunk = false;  // false: the value head reads the hidden states detached (its own fit only)
  bool whiten_advantages = true;
};

// GAE over one response: rewards, values [n] -> advantages [n] (returns = advantages + values).
std::vector<float> gae(std::span<const float> rewards, std::span<const float> values, float gamma, float lambda);

// The critic: V(h) = w·h + b on the final norm's output h [hidden]. Parameters "value_head.weight" [1, hidden]
// and "value_head.bias" [1] in its own Params (zero-initialised: V = 0 at first), trained by its own optimizer.
class ValueHead {
 public:
  explicit ValueHead(int64_t hidden);
  Params& params() { return params_; }
  // hidden [rows, hidden] -> values [rows].
  std::vector<float> forward(const float* hidden, int64_t rows) const;
  // Squared-error loss 0.5·Σ_t scale_t·(V_t − target_t)² at the rows with scale_t ≠ 0: accumulates its gradient
  // into the head's grads, writes d loss / d hidden into dhidden [rows, hidden] when non-null; returns the loss.
  double backward(const float* hidden, int64_t rows, std::span<const float> targets, std::span<const float> scale,
                  float* dhidden);

 private:
  Params params_;
  int64_t hidden_;
};

}  // namespace moerl::rl
