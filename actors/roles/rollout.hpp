// Rollout: generates responses with a policy model (sampling per the request, seeded, so a replayed request
// gets the same responses) and receives new weights after each policy update. A request's samples decode
// together with the compressed MLA KV cache (runtime/rl/generate.hpp). Runs on its own thread.
#pragma once
#include <filesystem>
#include <memory>
#include <string>

#include "actors/envelope.hpp"
#include "kernels/linear.hpp"

namespace moerl {
class Model;
}  // namespace moerl

// In-process weights travel as a pointer to the trainer's model (never serialized: local messages only).
CAF_ALLOW_UNSAFE_MESSAGE_TYPE(std::shared_ptr<moerl::Model>)

namespace moerl::actors {

using rollout_actor = caf::typed_actor<
    // GenerationRequest -> its `samples` Rollouts, in sample order, stamped with the weights' PolicyVersion.
    // A request for a newer policy version than the weights held is refused (StaleVersion). Reply: Rollouts.
    caf::replies_to<generate_atom, Envelope>::with<std::vector<Envelope>>,
    // New weights: a model folder (config.json + model.safetensors, e.g. a training checkpoint) and the
    // PolicyVersion they are (version, step); an older version than the one held is refused. Reply: the
    // version now held.
    caf::replies_to<weights_atom, std::string, uint64_t, uint64_t>::with<uint64_t>,
    // New weights in the same process, zero-copy: the trainer's own model (shared, not copied) and its
    // PolicyVersion; the rollout generates with it until the next weights message. The trainer must not update
    // the model while a generate request is in flight (the driver alternates rollout and update). Reply: the
    // version now held.
    caf::replies_to<weights_atom, std::shared_ptr<Model>, uint64_t, uint64_t>::with<uint64_t>>;

// Loads the policy from `model_dir` as PolicyVersion {0, 0}. threads > 0: the OpenMP/OpenBLAS thread count its
// requests run with (runtime/util/threads.hpp: a recipe's `threads`, resolved); 0: its thread's default.
rollout_actor spawn_rollout(caf::actor_system& system, std::filesystem::path model_dir, Precision precision,
                            std::string name = "rollout/0", int threads = 0);

}  // namespace moerl::actors
