// Data parallelism: R replicas, each with the whole model (or one tensor-parallel rank of it, see
// tp_model.hpp), each on its own slice of the global batch, stepping together so that every step equals the
// single model's step on the whole batch:
//   forward on the slice; the token counts summed over replicas;
//   backward, the gradient weighted by n_r / N (n_r counted tokens here, N in the global batch), so the sum
//   over replicas is the gradient of the mean over ALL counted tokens;
//   ZeRO-1 AdamW (dp_zero.hpp): reduce-scatter, one global norm, sharded moments, all-gather;
//   auxiliary-loss-free router balancing from the expert load summed over replicas.
// The weighting is exact for the cross-entropy. The sequence-wise balance loss (a mean over sequences) gets the
// same weight n_r / N, exact when every replica's slice has the same number of counted tokens per sequence
// (e.g. no ignored labels and equal slices). One group per tensor-parallel rank: replicas holding the same
// TP slice form a data group.
//
// One replica's thread (or process), e.g. replica `d` of 2:
//   auto dp = connect_gloo(GlooRendezvous::in_folder(dir), d, 2);   // or InProcessGroup(2).member(d)
//   Model model(config); model.init_random(seed);                  // the same weights on every replica
//   ModelReplica replica(model);                                   // or a TensorParallelModel
//   DataParallelTrainer trainer(replica, *dp, adamw);
//   for (int64_t s = 0; s < steps; ++s) trainer.step(slice_batch(batch, d, 2), options, s, bias_gamma);
#pragma once
#include <cstdint>

#include "runtime/model/model.hpp"
#include "runtime/optim/adamw.hpp"
#include "runtime/parallel/collectives.hpp"
#include "runtime/parallel/dp_replica.hpp"
#include "runtime/parallel/dp_zero.hpp"

namespace moerl {

// Sequences [begin, end) of `batch` for replica `rank` of `ranks`: even_counts over the batch's sequences.
// A replica may get no sequence (then batch == 0) only if batch < ranks; forward needs at least one.
TokenBatch slice_batch(const TokenBatch& batch, int rank, int ranks);

struct DpStepReport {
  // Over the global batch: loss is the mean over all counted tokens, tokens their number; balance_loss and
  // total are weighted over replicas like the gradient. Identical on every replica.
  LossReport loss;
  StepStats optimizer;
};

class DataParallelTrainer {
 public:
  // The replica, its data group and (through the replica) its tensor group must outlive the trainer; all
  // replicas start from the same parameters.
  DataParallelTrainer(Replica& replica, Collectives& data_group, AdamWConfig config);

  // One training step (0-based `step`, the learning-rate schedule's) on this replica's slice; collective over
  // the data group. bias_gamma > 0 moves every router bias by ±bias_gamma from the global expert load, as
  // Model::update_router_bias does from the local one.
  DpStepReport step(const TokenBatch& slice, const ForwardOptions& options, int64_t step, float bias_gamma = 0);

  ZeroAdamW& optimizer() { return optimizer_; }
  Replica& replica() { return replica_; }

 private:
  Replica& replica_;
  Collectives& dp_;
  ZeroAdamW optimizer_;
};

}  // namespace moerl
