// The optimizer step of a model split over parties — pipeline stages (pp_stage.hpp) and expert shards
// (ep_shard.hpp) — each holding some of the parameters: one AdamW per party on its own parameters, clipped
// with the gradient norm of ALL parties, so the step equals the single model's AdamW::step.
//
// The global norm is exact: each party reports the sum of squares of each of its trainable gradients
// (computed as runtime/optim/adamw.cpp's grad_norm computes it, block for block), and the sums are added in
// parameter-name order, the order of grad_norm over the whole model. So the norm, the clip factor and every
// update have the single model's bits (the test compares the norm to grad_norm of the whole model).
#pragma once
#include <span>
#include <string>
#include <utility>
#include <vector>

#include "runtime/model/params.hpp"
#include "runtime/optim/adamw.hpp"

namespace moerl {

// (parameter name, Σ grad²) of every trainable parameter of one party, by name.
using GradSquares = std::vector<std::pair<std::string, double>>;
GradSquares grad_squares(const Params& params);
// sqrt of the sum over all parties, in name order. Throws moerl::Error if two parties report the same name.
double global_grad_norm(std::span<const GradSquares> parties);

// Copies every parameter (and buffer) of `dest` from `source` by name: the same names and shapes as the
// whole model's. Errors name `who` and the missing or mis-shaped tensor.
void copy_weights(const Params& source, Params& dest, const std::string& who);

class PartyOptimizer {
 public:
  // AdamW on this party's trainable parameters with config's schedule and moments; the clip uses
  // config.clip_grad_norm with the global norm given to step().
  PartyOptimizer(Params& params, AdamWConfig config);
  // Scales the gradients by clip_grad_norm / global_norm when the norm exceeds the limit (as
  // clip_grad_norm does), then one AdamW update. A non-finite norm skips the update on every party, as
  // AdamW::step skips it. stats.grad_norm is the global norm.
  StepStats step(int64_t step, double global_norm);
  AdamW& adamw() { return adamw_; }

 private:
  Params& params_;
  double clip_;
  AdamW adamw_;  // clip off: the clip above uses the global norm
};

}  // namespace moerl
