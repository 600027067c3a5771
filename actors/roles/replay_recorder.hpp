// An rlhf stage's rollouts into a replay buffer actor: the function for RlhfActorOptions::record
// (rlhf_actors.hpp), called with each step's rollouts and rewards before the update. Each rollout becomes a
// ReplayRecord — prompt, response tokens, log-probs and policy version as generated; score = its reward;
// rewards = the reward on the last response token, 0 on the others; advantages = GRPO's group-normalized
// advantage of the response (rl::group_advantages over the request's samples, divided by the group's std) on
// every token (a PPO stage's GAE advantages come from its critic inside the update, not these); group id = the
// request id; step = (stage, step + 1). It returns once every record is durable, so the update runs only on
// rollouts the buffer has acknowledged. Wiring: options.record = replay_recorder(system, buffer, "rlhf").
#pragma once
#include <cstdint>
#include <functional>
#include <span>
#include <string>
#include <vector>

#include "actors/roles/replay_buffer.hpp"
#include "runtime/train/rlhf_stage.hpp"

namespace moerl::actors {

using RolloutRecorder = std::function<void(int64_t step, const std::vector<msg::Rollout>& rollouts,
                                           std::span<const float> rewards)>;

// Throws moerl::Error when the buffer refuses a record or does not answer (naming the request and sample).
RolloutRecorder replay_recorder(caf::actor_system& system, replay_buffer_actor buffer, std::string stage);

// `moerl run`'s rlhf services: actor_rlhf_services (supervised rollout and reward-model actors) with every step's
// rollouts recorded, durable before the update, in a replay buffer actor on the store RlhfSetup::replay_dir (fresh
// for each run of the stage; at most `capacity` rollouts, oldest dropped). The buffer ends with the services.
RlhfServicesFactory recorded_rlhf_services_factory(caf::actor_system& system, size_t capacity = 1u << 20);

// The ReplayRecords replay_recorder writes for one step (request-major rollouts, groups of equal size).
std::vector<msg::ReplayRecord> replay_records(const std::string& stage, int64_t step,
                                              const std::vector<msg::Rollout>& rollouts, std::span<const float> rewards);

}  // namespace moerl::actors
