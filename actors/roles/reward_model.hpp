// Reward model: scores responses with a forward pass of its language model. Today the score is the mean
// log-likelihood per response token given the prompt (a trained scalar head and training on preference pairs
// come with the reward-model stage). Runs on its own thread.
#pragma once
#include <filesystem>
#include <string>

#include "actors/envelope.hpp"
#include "kernels/linear.hpp"

namespace moerl::actors {

using reward_model_actor = caf::typed_actor<
    // Rollout -> RewardScore of its response (request id and sample index echoed, the scorer named); a
    // response with no token scores 0. Reply: RewardScore.
    caf::replies_to<score_atom, Envelope>::with<Envelope>>;

reward_model_actor spawn_reward_model(caf::actor_system& system, std::filesystem::path model_dir, Precision precision,
                                      std::string name = "reward_model/0");

}  // namespace moerl::actors
