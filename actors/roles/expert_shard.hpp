// Expert shard: holds some routed experts of one MoE layer (expert parallelism) and runs their SwiGLU
// blocks on the token rows a stage trainer dispatches to them; the router, the permutation and the weighted
// combine stay with the trainer. Here the rows ride inline in the message (small tensors on one machine);
// at scale they move on the data plane (runtime/parallel/). Forward only for now. Runs on its own thread.
#pragma once
#include <cstdint>
#include <filesystem>
#include <string>
#include <vector>

#include "actors/envelope.hpp"
#include "kernels/linear.hpp"

namespace moerl::actors {

using expert_shard_actor = caf::typed_actor<
    // Reply: the experts held, ascending.
    caf::replies_to<describe_atom>::with<std::vector<int64_t>>,
    // counts: TensorRef I64 [experts held], inline — rows per expert, in the order describe lists them;
    // rows: TensorRef F32 [Σ counts, hidden], inline — the tokens, expert after expert. Reply: TensorRef F32
    // [Σ counts, hidden], inline — each row through its expert (down(silu(gate x) * up x)), not yet weighted.
    caf::replies_to<forward_atom, Envelope, Envelope>::with<Envelope>>;

struct ExpertShardSetup {
  std::filesystem::path model_dir;  // config.json + model.safetensors
  std::string layer;                // the MoE layer's prefix, e.g. "model.layers.1.mlp"
  std::vector<int64_t> experts;     // ids held, ascending, each in [0, n_routed_experts)
  Precision precision = Precision::FP32;
};

// Loads <layer>.experts.<e>.{gate,up,down}_proj.weight for each expert held.
expert_shard_actor spawn_expert_shard(caf::actor_system& system, ExpertShardSetup setup,
                                      std::string name = "expert_shard/0");

}  // namespace moerl::actors
