// Rollout: generates responses with a policy model (sampling per the request, seeded, so a replayed request
// gets the same responses) and receives new weights after each policy update. A request's samples decode
// together with the compressed MLA KV cache (runtime/rl/generate.hpp). Runs on its own thread.
#pragma once
#include <filesystem>
#include <string>

#include "actors/envelope.hpp"
#include "kernels/linear.hpp"

namespace moerl::actors {

using rollout_actor = caf::typed_actor<
    // GenerationRequest -> its `samples` Rollouts, in sample order, stamped with the weights' PolicyVersion.
    // A request for a newer policy version than the weights held is refused (StaleVersion). Reply: Rollouts.
    caf::replies_to<generate_atom, Envelope>::with<std::vector<Envelope>>,
    // New weights: a model folder (config.json + model.safetensors, e.g. a training checkpoint) and the
    // PolicyVersion they are (version, step); an older version than the one held is refused. Reply: the
    // version now held.
    caf::replies_to<weights_atom, std::string, uint64_t, uint64_t>::with<uint64_t>>;

// Loads the policy from `model_dir` as PolicyVersion {0, 0}.
rollout_actor spawn_rollout(caf::actor_system& system, std::filesystem::path model_dir, Precision precision,
                            std::string name = "rollout/0");

}  // namespace moerl::actors
