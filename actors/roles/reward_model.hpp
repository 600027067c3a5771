// Reward model: scores responses. A folder written by RewardModel::save (runtime/rl/reward_model.hpp, a recipe's
// reward_model stage) scores with its trained scalar head on bos + prompt + response + eos (eos appended to a
// response cut by the length limit). A policy folder (no reward-model stage yet) falls back to the placeholder:
// the mean log-likelihood per response token given the prompt. Runs on its own thread.
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

// threads: as spawn_rollout's (rollout.hpp).
reward_model_actor spawn_reward_model(caf::actor_system& system, std::filesystem::path model_dir, Precision precision,
                                      std::string name = "reward_model/0", int threads = 0);

}  // namespace moerl::actors
