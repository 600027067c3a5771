// Two small roles that train a recipe's pretraining stages across the cluster, step by step, so that
// supervision has real work to protect: a data loader and a stage trainer. (The full roles of the actor
// runtime live in actors/roles/; these are the cluster's own, used by `moerl head --run` and its tests.)
//
//   cluster.loader   batch(step) -> the step's batch. A pure function of the step: asking twice gives the
//                    same batch (at-least-once delivery is safe), and a restarted loader serves any step.
//   cluster.trainer  train(batch of step s) -> the step's losses. Step ids make it exactly-once: s must be
//                    the next step; a step already applied in this incarnation returns its recorded result
//                    again (replayed = true) without touching the weights. Checkpoints every
//                    stage.checkpoint_every steps into <out>/<stage>/ (the format `moerl run` resumes from);
//                    a restarted trainer loads the latest and reports it through position.
//
// Both take the same JSON config: {"recipe": file, "overrides": ["k=v", ...], "stage": index, "out": dir}.
// Files are read and written at those paths on whichever node runs the role: the run folder must be shared
// by the nodes (one machine, or a network file system mounted at the same path).
#pragma once
#include <cstdint>
#include <string>

#include <caf/all.hpp>

#include "actors/cluster/auth.hpp"
#include "actors/cluster/catalog.hpp"

namespace moerl::cluster {

using batch_atom = caf::atom_constant<caf::atom("batch")>;
using train_atom = caf::atom_constant<caf::atom("train")>;
using position_atom = caf::atom_constant<caf::atom("position")>;
using outcome_atom = caf::atom_constant<caf::atom("outcome")>;

// One training batch as served by the loader.
struct ServedBatch {
  uint64_t step = 0;         // 1-based training step it is for
  Bytes tokens;              // a msg::TokenBatch (runtime/messages/codec.hpp), step id = (run, step)
  std::string loader_state;  // JSON LoaderState after this batch: what a checkpoint at this step records
};

// What one training step did.
struct StepResult {
  uint64_t step = 0;
  double loss = 0, mtp_loss = 0, balance_loss = 0;  // nats
  double grad_norm = 0, lr = 0;
  int64_t tokens = 0;
  bool skipped = false;             // non-finite gradient: no update
  double load_ratio = 0;            // mean max/mean expert load (1 = balanced; 0 without MoE)
  bool has_validation = false;
  double validation_loss = 0;       // after this step, when has_validation
  bool checkpointed = false;        // a checkpoint of this step was written
  bool replayed = false;            // the step had been applied already: this is the recorded result
};

template <class Inspector>
typename Inspector::result_type inspect(Inspector& f, ServedBatch& x) {
  return f(caf::meta::type_name("moerl.ServedBatch"), x.step, x.tokens, x.loader_state);
}
template <class Inspector>
typename Inspector::result_type inspect(Inspector& f, StepResult& x) {
  return f(caf::meta::type_name("moerl.StepResult"), x.step, x.loss, x.mtp_loss, x.balance_loss, x.grad_norm, x.lr,
           x.tokens, x.skipped, x.load_ratio, x.has_validation, x.validation_loss, x.checkpointed, x.replayed);
}

using loader_actor = caf::typed_actor<caf::replies_to<batch_atom, uint64_t>::with<ServedBatch>>;

using trainer_actor =
    caf::typed_actor<caf::replies_to<position_atom>::with<uint64_t>,      // last step applied (0: none)
                     caf::replies_to<train_atom, ServedBatch>::with<StepResult>,
                     caf::replies_to<outcome_atom>::with<std::string>>;  // the stage outcome so far, JSON

void register_train_role_types(caf::actor_system_config& cfg);

// Adds "cluster.loader" and "cluster.trainer" (both detached: their steps hold their own thread).
void add_train_roles(RoleCatalog& catalog);

}  // namespace moerl::cluster
