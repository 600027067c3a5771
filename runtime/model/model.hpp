// The DeepSeek-V3 model: embedding, decoder layers (MLA + dense or MoE feed-forward, pre-norm residual),
// final RMSNorm, LM head, cross-entropy; optional multi-token prediction (depth 1). Forward and backward are
// written out block by block; the model owns its Params (published DeepSeek-V3 tensor names).
// ModelPart is the same computation cut by layer ranges, for pipeline stages (runtime/parallel/pp_stage.hpp):
// Model is one part holding everything, so a pipeline's parts run the single model's arithmetic.
#pragma once
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "kernels/linear.hpp"
#include "runtime/model/attention.hpp"
#include "runtime/model/config.hpp"
#include "runtime/model/feed_forward.hpp"
#include "runtime/model/params.hpp"

namespace moerl {

struct SafeTensors;

// Token ids and next-token labels, both [batch, seq] row-major. A label of kIgnoreLabel contributes no loss
// (prompt tokens in SFT, padding).
constexpr int64_t kIgnoreLabel = -100;
struct TokenBatch {
  const int64_t* input_ids = nullptr;
  const int64_t* labels = nullptr;
  int64_t batch = 0, seq = 0;
};

struct ForwardOptions {
  Precision precision = Precision::FP32;
  float mtp_weight = 0.0f;      // λ of the MTP loss (DeepSeek-V3: 0.3 early, 0.1 later); 0 = MTP not run
  float balance_alpha = 0.0f;   // sequence-wise balance loss weight α (0 = off)
  bool keep_logits = false;     // keep [batch*seq, vocab] logits readable through logits()
  bool for_backward = true;     // compute d loss / d logits for backward(); false for evaluation only
};

struct LossReport {
  double loss = 0;          // main next-token cross-entropy, mean over counted tokens (nats)
  double mtp_loss = 0;      // the MTP module's cross-entropy (predicting token i+2), mean
  double balance_loss = 0;  // sum over MoE layers of the sequence-wise balance loss
  double total = 0;         // loss + mtp_weight·mtp_loss + balance_loss: what backward differentiates
  int64_t tokens = 0;       // positions with a label (the denominator of loss)
};

// The denominators of a whole batch's loss terms. A micro-batch (or data-parallel slice) scales its terms by
// them, so gradients accumulated over the micro-batches equal the gradient of the whole batch's loss.
struct LossDenominators {
  int64_t tokens = 0;      // positions with a label: the main cross-entropy is a mean over these
  int64_t mtp_tokens = 0;  // positions whose next position (same sequence) has a label: the MTP mean's
  int64_t sequences = 0;   // sequences: the balance loss is a mean over sequences
};
LossDenominators loss_denominators(const TokenBatch& batch);

// The loss terms of a micro-batch, or of a part of the model, as sums: micro-batches and pipeline stages add.
struct LossSums {
  double loss_sum = 0;      // Σ cross-entropy over the counted tokens (nats)
  int64_t tokens = 0;       // counted tokens
  double mtp_sum = 0;       // Σ MTP cross-entropy
  int64_t mtp_tokens = 0;
  double balance_loss = 0;  // Σ over MoE layers, already a share of the whole batch's mean over sequences
  void add(const LossSums& other);
  // loss = loss_sum / tokens, mtp_loss likewise, total = loss + mtp_weight · mtp_loss + balance_loss.
  LossReport report(float mtp_weight) const;
};

// The inference cache of a whole model for `batch` sequences decoded in step: each decoder layer's compressed MLA
// cache (runtime/model/attention.hpp), main layers in order. The MTP module is not run when decoding.
struct KvCache {
  int64_t batch = 0, capacity = 0;
  int64_t length = 0;  // positions held, the same for every sequence
  std::vector<MlaCache> layers;
};

// Which part of the model a ModelPart holds. Pipeline stages hold consecutive parts; Model holds all of it.
struct PartSpec {
  int64_t layer_begin = 0;
  int64_t layer_end = -1;  // one past the last decoder layer; -1: num_hidden_layers
  bool first = true;       // the embedding: the part's input is the token ids
  bool last = true;        // final norm, head, MTP module and the losses: the part's output is the loss
};

// A contiguous part of the model: the embedding (first part), decoder layers [layer_begin, layer_end), the
// final norm, head, MTP module and cross-entropy (last part). It registers exactly its own parameters in
// `params` under the published names; a last part that is not also first registers its own copy of
// model.embed_tokens.weight when the MTP module or a tied head needs it (a pipeline keeps it equal to the
// first stage's). MoE layers compute their routed experts in place unless `routed` makes them elsewhere.
// forward saves one micro-batch's activations; backward consumes them.
class ModelPart {
 public:
  ModelPart(const ModelConfig& config, Params& params, PartSpec spec, const RoutedExpertsFactory& routed = {});
  ~ModelPart();
  ModelPart(const ModelPart&) = delete;
  ModelPart& operator=(const ModelPart&) = delete;

  // batch: the micro-batch (the first part reads input_ids, the last part input_ids and labels, every part the
  // shape). in: [batch·seq, hidden] from the previous part (ignored by the first part). out: [batch·seq,
  // hidden] for the next part (ignored by the last part). The loss terms are scaled by `whole`, the
  // denominators of the whole batch this micro-batch belongs to; a part without the head returns only its
  // balance loss.
  LossSums forward(const TokenBatch& batch, const float* in, float* out, const ForwardOptions& options,
                   const LossDenominators& whole);
  // dout: [batch·seq, hidden], d loss / d out (ignored by the last part). din: d loss / d in, overwritten
  // (ignored by the first part). Gradients accumulated into the parameters' grad.
  void backward(const float* dout, float* din);
  const float* logits() const;  // [batch·seq, vocab] of the last forward (last part, keep_logits)
  const float* final_hidden() const;  // [batch·seq, hidden] final norm output of the last forward (last part)
  // backward() of the last part from given d loss / d logits (and optionally d loss / d final_hidden) in place
  // of the cross-entropy's; see Model::backward_from.
  void backward_from(const float* dlogits, const float* dfinal_hidden, float* din);
  // Inference with a KV cache over the whole model (a part that is first and last); see Model::decode.
  KvCache new_cache(int64_t batch, int64_t capacity) const;
  void decode(const int64_t* ids, int64_t n_new, KvCache& cache, float* logits, Precision precision);

  const PartSpec& spec() const { return spec_; }  // layer_end resolved
  // The MoE layers' prefixes ("model.layers.3.mlp"), main layers ascending then the MTP layer: the order of
  // expert_loads() and of the layer ids expert shards use.
  std::vector<std::string> moe_prefixes() const;
  std::vector<ExpertLoad> expert_loads() const;  // of the last forward, in moe_prefixes() order
  // Auxiliary-loss-free balancing from the last forward's load, or from given loads (moe_prefixes() order).
  void update_router_bias(float gamma);
  void update_router_bias(float gamma, const std::vector<ExpertLoad>& loads);

 private:
  struct Impl;
  PartSpec spec_;
  std::unique_ptr<Impl> impl_;
};

class Model {
 public:
  explicit Model(ModelConfig config);
  ~Model();

  // Random initialisation as HF DeepseekV3PreTrainedModel does it: normal(0, initializer_range) for
  // linear and embedding weights, ones for RMSNorm weights, zero router bias. Deterministic in `seed`.
  void init_random(uint64_t seed);
  // Copies weights from a checkpoint. Every parameter must be present with its exact shape; any tensor the
  // model does not know is an error unless it belongs to an MTP layer the config disables. Errors name the
  // tensor and `st.source`.
  void load_weights(const SafeTensors& st);

  // Forward pass over a batch; activations are kept for one backward().
  LossReport forward(const TokenBatch& batch, const ForwardOptions& options);
  // Gradients of LossReport::total accumulated (+=) into params().*.grad.
  void backward();
  // [batch*seq, vocab] logits of the last forward (needs keep_logits).
  const float* logits() const;
  // [batch*seq, hidden] output of the final RMSNorm of the last forward (what the LM head reads): the features
  // of a value head.
  const float* final_hidden() const;
  // Backward from externally supplied gradients in place of the cross-entropy's: dlogits [batch*seq, vocab] =
  // d loss / d logits of the last forward (e.g. w_t·(softmax − onehot) for policy gradients, runtime/rl/
  // logprob.hpp); dfinal_hidden [batch*seq, hidden] (may be null) is added at the final norm's output (a value
  // head's gradient). The forward must have had for_backward and must not have run the MTP module.
  // Gradients accumulated (+=) into params().*.grad, as backward().
  void backward_from(const float* dlogits, const float* dfinal_hidden = nullptr);

  // Inference with a KV cache. new_cache: empty, for `batch` sequences of up to `capacity` positions
  // (<= max_position_embeddings). decode: ids [batch, n_new] are each sequence's next n_new tokens (prompt
  // prefill, then one token per step); logits [batch * n_new, vocab] receives their next-token logits, the
  // same as forward's for those positions up to FP32 summation order. Decoding overwrites the activations a
  // forward saved (a pending backward() is refused afterwards) and the expert loads (expert_loads(),
  // update_router_bias() see the decoded tokens' routing).
  KvCache new_cache(int64_t batch, int64_t capacity) const;
  void decode(const int64_t* ids, int64_t n_new, KvCache& cache, float* logits, Precision precision);

  // Auxiliary-loss-free balancing of every MoE layer from the last forward's expert load.
  void update_router_bias(float gamma);
  // Expert load of each MoE layer (main model first, then the MTP layer) from the last forward.
  std::vector<ExpertLoad> expert_loads() const;

  const ModelConfig& config() const { return config_; }
  Params& params() { return params_; }
  const Params& params() const { return params_; }

 private:
  ModelConfig config_;
  Params params_;
  std::unique_ptr<ModelPart> part_;  // the whole model as one part
};

}  // namespace moerl
