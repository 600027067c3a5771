// The rlhf stage's generation and reward through actors (runtime/train/rlhf_stage.hpp's RlhfServices): a
// rollout actor (rollout.hpp) that gets the trainer's own model zero-copy after every update, tagged with the
// policy version (updates applied), and with `reward: reward_model` a reward-model actor (reward_model.hpp)
// loaded from the reward_model stage's folder. One GenerationRequest per prompt, one Rollout per score request,
// each awaited before the next: the update in between never races the rollout.
//
// Supervision: both actors are monitored. When one dies (its down message, or a request bounced because it
// exited) it is respawned under the same name — the rollout from the stage's starting policy (written to
// RlhfSetup::work_dir at the first weights) and then given the current weights again, the reward model from
// its folder — one line is logged (stderr, and an {"event": "restart"} record in metrics.jsonl), and the same
// request is sent again: requests are deterministic (the sampling streams come from the request id), so the
// run's results do not change. After max_restarts restarts of one actor in a stage the stage fails with a
// moerl::Error naming it. An error the actor answers (a bad request) fails the stage at once.
#pragma once
#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "actors/envelope.hpp"
#include "runtime/train/rlhf_stage.hpp"

namespace moerl::actors {

inline constexpr const char* kRlhfRolloutName = "rollout/0";
inline constexpr const char* kRlhfRewardModelName = "reward_model/0";

struct RlhfActorOptions {
  int max_restarts = 3;  // per actor and stage
  // How long one request may take before the stage fails naming the actor (a hung actor, not a dead one).
  std::chrono::seconds reply_timeout{std::chrono::minutes(30)};
  // Called with each step's rollouts and rewards before the update (RlhfServices::record): where a replay
  // buffer actor would be fed. Empty: nothing.
  std::function<void(int64_t step, const std::vector<msg::Rollout>& rollouts, std::span<const float> rewards)> record;
  // Called before every request with the actor's name, its handle and how many requests it was sent before
  // in this stage (restarts included): tests kill the actor here.
  std::function<void(const std::string& name, const caf::actor& actor, uint64_t sent)> before_request;
};

// The services of one stage; the actors are stopped (and awaited) when it is destroyed.
std::unique_ptr<RlhfServices> actor_rlhf_services(caf::actor_system& system, const RlhfSetup& setup,
                                                  RlhfActorOptions options = {});

// For ScopedRlhfServices: every rlhf stage of the run through actors of `system` (which must outlive the run).
RlhfServicesFactory actor_rlhf_services_factory(caf::actor_system& system, RlhfActorOptions options = {});

}  // namespace moerl::actors
