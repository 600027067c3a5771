// Pipeline parallelism: the model cut by layer ranges into stages, each a ModelPart with its own parameters
// (a subset of the published names), micro-batches scheduled one-forward-one-backward (1F1B):
//
//   stage 0: embedding, layers [0, a)  --activations-->  stage 1: layers [a, b)  -->  ...  last stage: layers
//            [.., L), final norm, head, MTP, losses;  gradients of the activations flow back the same way.
//
// Activations and their gradients travel over the data plane (data_plane.hpp), one message per micro-batch,
// [micro.batch · seq, hidden] floats each way. The routed experts of a stage's MoE layers are computed by the
// stage itself or by its expert shards (ep_shard.hpp, StageLinks::experts).
//
// Equal to the single model: every micro-batch's loss terms are scaled by the whole batch's denominators
// (LossDenominators: counted tokens, MTP tokens, sequences), so the gradients accumulated over micro-batches
// are the whole batch's. With one micro-batch every stage runs the single model's arithmetic on the same
// rows, bit for bit. With several, gradient GEMMs sum over rows micro-batch by micro-batch instead of in one
// call, so weight gradients (and what follows) differ from the single model by FP32 rounding.
//
// Shared embedding: the MTP module (and a tied head) on the last stage read model.embed_tokens.weight. The
// last stage holds a copy, not trainable there; before its last micro-batch's backward the first stage adds
// the copy's gradient (sent by the last stage after its final backward) into its own, the single model's
// order of accumulation when there is one micro-batch; after the optimizer step the first stage sends the
// updated weight back (send_replica_weights / recv_replica_weights).
//
// Activation memory: a stage keeps the inputs of its in-flight micro-batches (at most stages - index under
// 1F1B) and the full activations of its latest forward only: the blocks save one forward's activations each
// (MlaAttention keeps them inside). A backward of an older micro-batch first re-runs its forward (full
// recomputation, deterministic, so the same bits); the last stage never needs to, since 1F1B runs each of
// its backwards right after the forward.
#pragma once
#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "runtime/model/model.hpp"
#include "runtime/parallel/data_plane.hpp"
#include "runtime/parallel/ep_shard.hpp"

namespace moerl {

struct PipelinePlan {
  std::vector<PartSpec> stages;  // consecutive layer ranges; stage 0 first, the last one last
  int64_t expert_shards = 0;     // per stage; 0: each stage computes its own routed experts
  bool contiguous_experts = false;  // ExpertPlacement::contiguous

  // `stages` stages of near-equal layer counts (earlier stages take the extra layers: the last one also
  // holds the head and the MTP module).
  static PipelinePlan even(const ModelConfig& config, int64_t stages, int64_t expert_shards = 0);
  // Throws moerl::Error naming the stage or field that breaks the plan (gaps, overlaps, first/last flags).
  void validate(const ModelConfig& config) const;
  ExpertPlacement placement(const ModelConfig& config) const;  // of every stage's shards
};

// The MoE layers of a part ("model.layers.N.mlp", then the MTP layer's): what its expert shards hold, in the
// order of their layer ids (ModelPart::moe_prefixes() of that part).
std::vector<std::string> part_moe_prefixes(const ModelConfig& config, const PartSpec& spec);

// `batch` cut into `micro_batches` runs of whole sequences, near-equal (the earlier ones one longer), as
// views into batch's arrays.
std::vector<TokenBatch> split_micro_batches(const TokenBatch& batch, int64_t micro_batches);

struct PipelineOp {
  enum Kind { kForward, kBackward } kind;
  int64_t micro;
};
// Stage `stage` of `stages`, M micro-batches: min(stages - stage - 1, M) warm-up forwards, then pairs
// (forward of the next micro-batch, backward of the oldest), then the remaining backwards.
std::vector<PipelineOp> schedule_1f1b(int64_t stage, int64_t stages, int64_t micro_batches);

// A stage's channels. Null where there is no peer.
struct StageLinks {
  std::shared_ptr<Channel> act_in, grad_out;  // from / to stage - 1
  std::shared_ptr<Channel> act_out, grad_in;  // to / from stage + 1
  std::shared_ptr<Channel> replica_grad;      // last -> first: the embedding copy's gradient, once per step
  std::shared_ptr<Channel> replica_weight;    // first -> last: the embedding after each optimizer step
  std::vector<ExpertLink> experts;            // one per expert shard of this stage (plan.expert_shards)
};

class PipelineStage {
 public:
  PipelineStage(const ModelConfig& config, const PipelinePlan& plan, int64_t stage, StageLinks links);
  ~PipelineStage();
  PipelineStage(const PipelineStage&) = delete;
  PipelineStage& operator=(const PipelineStage&) = delete;

  int64_t index() const { return index_; }
  bool is_first() const { return index_ == 0; }
  bool is_last() const { return index_ + 1 == stages_; }
  // The last stage holds a copy of the first stage's embedding (MTP module or tied head, more than one stage).
  bool has_replica() const { return replica_; }
  Params& params() { return params_; }  // own parameters; the copy of the embedding is not trainable
  const Params& params() const { return params_; }
  const std::vector<std::string>& moe_prefixes() const { return moe_prefixes_; }
  void load_weights(const Params& source);  // by name, from any Params holding them (a whole model's)

  // One training step, op by op (a stage-trainer actor runs schedule_1f1b's ops as their inputs arrive):
  // begin_step, then forward and backward of every micro-batch, then end_step. `whole`: the denominators of
  // the whole batch (loss_denominators). Gradients accumulate into params().*.grad (zero them before).
  void begin_step(const ForwardOptions& options, const LossDenominators& whole, int64_t micro_batches);
  // Receives the input activations (after the first stage), computes, sends the output (before the last).
  void forward(int64_t micro, const TokenBatch& batch);
  // Receives d output (before the last stage), computes, sends d input (after the first).
  void backward(int64_t micro);
  // Ends the step (tells the expert shards); returns this stage's loss terms over the step: the losses on the
  // last stage, the balance loss of its MoE layers on every stage. Forward-only steps (for_backward = false)
  // end after their forwards.
  LossSums end_step();
  // begin_step, schedule_1f1b's ops (forward only when !options.for_backward), end_step.
  LossSums run_step(std::span<const TokenBatch> micro_batches, const ForwardOptions& options,
                    const LossDenominators& whole);

  // [batch·seq, vocab] logits of the latest forward (last stage, options.keep_logits).
  const float* logits() const { return part_->logits(); }
  // Expert load of each MoE layer summed over the step's micro-batches (moe_prefixes() order).
  const std::vector<ExpertLoad>& step_expert_loads() const { return loads_; }
  void update_router_bias(float gamma);  // from step_expert_loads()

  void send_replica_weights();  // first stage, after its optimizer step
  void recv_replica_weights();  // last stage

 private:
  struct InFlight {
    TokenBatch batch;
    std::vector<float> input;  // [T, hidden] received activations (not on the first stage)
    bool forwarded = false, backwarded = false;
  };
  InFlight& micro(int64_t m, const char* op);

  int64_t index_, stages_, hidden_;
  StageLinks links_;
  Params params_;
  std::vector<std::string> moe_prefixes_;
  std::unique_ptr<ModelPart> part_;
  bool replica_ = false;
  Param* embed_ = nullptr;

  // The current step.
  bool in_step_ = false;
  ForwardOptions options_;
  LossDenominators whole_;
  std::vector<InFlight> micro_;
  int64_t latest_forward_ = -1;  // the micro-batch whose activations the part holds
  int64_t backwards_done_ = 0;
  LossSums sums_;
  std::vector<ExpertLoad> loads_;
  std::vector<float> out_, dout_, din_;
};

}  // namespace moerl
