// Reference policy: the frozen initial policy whose per-token log-probabilities give the KL term of RLHF.
// (The critic — a value head for PPO — joins this role with PPO; not built yet.) Runs on its own thread.
#pragma once
#include <filesystem>
#include <string>

#include "actors/envelope.hpp"
#include "kernels/linear.hpp"

namespace moerl::actors {

using reference_actor = caf::typed_actor<
    // Rollout -> the same Rollout with logProbs recomputed under the reference weights (one per response
    // token). Reply: Rollout.
    caf::replies_to<logprobs_atom, Envelope>::with<Envelope>>;

reference_actor spawn_reference(caf::actor_system& system, std::filesystem::path model_dir, Precision precision,
                                std::string name = "reference/0");

}  // namespace moerl::actors
