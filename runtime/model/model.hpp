// The DeepSeek-V3 model: embedding, decoder layers (MLA + dense or MoE feed-forward, pre-norm residual),
// final RMSNorm, LM head, cross-entropy; optional multi-token prediction (depth 1). Forward and backward are
// written out block by block; the model owns its Params (published DeepSeek-V3 tensor names).
#pragma once
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "kernels/linear.hpp"
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

  // Auxiliary-loss-free balancing of every MoE layer from the last forward's expert load.
  void update_router_bias(float gamma);
  // Expert load of each MoE layer (main model first, then the MTP layer) from the last forward.
  std::vector<ExpertLoad> expert_loads() const;

  const ModelConfig& config() const { return config_; }
  Params& params() { return params_; }
  const Params& params() const { return params_; }

 private:
  struct Impl;
  ModelConfig config_;
  Params params_;
  std::unique_ptr<Impl> impl_;
};

}  // namespace moerl
