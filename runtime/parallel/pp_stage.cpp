#include "runtime/parallel/pp_stage.hpp"

#include <algorithm>

#include "runtime/error.hpp"
#include "runtime/parallel/pp_optimizer.hpp"

namespace moerl {
namespace {

constexpr const char* kEmbedding = "model.embed_tokens.weight";

std::string stage_name(int64_t s) { return "pipeline stage " + std::to_string(s); }

void add_loads(std::vector<ExpertLoad>& total, const std::vector<ExpertLoad>& loads) {
  if (total.empty()) {
    total = loads;
    return;
  }
  for (size_t l = 0; l < loads.size(); ++l) {
    total[l].tokens += loads[l].tokens;
    for (size_t e = 0; e < loads[l].tokens_per_expert.size(); ++e)
      total[l].tokens_per_expert[e] += loads[l].tokens_per_expert[e];
  }
}

}  // namespace

PipelinePlan PipelinePlan::even(const ModelConfig& config, int64_t stages, int64_t expert_shards) {
  const int64_t L = config.num_hidden_layers;
  require(stages >= 1 && stages <= L, "pipeline: " + std::to_string(stages) + " stages for " + std::to_string(L) +
                                          " layers, expected 1 .. num_hidden_layers");
  PipelinePlan plan;
  plan.expert_shards = expert_shards;
  int64_t begin = 0;
  for (int64_t s = 0; s < stages; ++s) {
    const int64_t n = L / stages + (s < L % stages ? 1 : 0);
    plan.stages.push_back(PartSpec{begin, begin + n, s == 0, s + 1 == stages});
    begin += n;
  }
  return plan;
}

void PipelinePlan::validate(const ModelConfig& config) const {
  require(!stages.empty(), "pipeline plan: no stages");
  int64_t next = 0;
  for (size_t s = 0; s < stages.size(); ++s) {
    const PartSpec& p = stages[s];
    const int64_t end = p.layer_end < 0 ? config.num_hidden_layers : p.layer_end;
    require(p.layer_begin == next, "pipeline plan: stage " + std::to_string(s) + " starts at layer " +
                                       std::to_string(p.layer_begin) + ", expected " + std::to_string(next) +
                                       " (stages hold consecutive layer ranges)");
    require(end >= p.layer_begin, "pipeline plan: stage " + std::to_string(s) + " ends before it begins");
    require(p.first == (s == 0), "pipeline plan: stage " + std::to_string(s) + (p.first ? " is" : " is not") +
                                     " marked first");
    require(p.last == (s + 1 == stages.size()), "pipeline plan: stage " + std::to_string(s) +
                                                    (p.last ? " is" : " is not") + " marked last");
    next = end;
  }
  require(next == config.num_hidden_layers, "pipeline plan: the stages end at layer " + std::to_string(next) +
                                                ", the model has " + std::to_string(config.num_hidden_layers));
  require(expert_shards >= 0, "pipeline plan: expert_shards = " + std::to_string(expert_shards) + ", expected >= 0");
  if (expert_shards > 0) placement(config).validate("pipeline plan");
}

ExpertPlacement PipelinePlan::placement(const ModelConfig& config) const {
  return ExpertPlacement{config.n_routed_experts, expert_shards, contiguous_experts};
}

std::vector<std::string> part_moe_prefixes(const ModelConfig& config, const PartSpec& spec) {
  std::vector<std::string> out;
  const int64_t L = config.num_hidden_layers, end = spec.layer_end < 0 ? L : spec.layer_end;
  for (int64_t l = spec.layer_begin; l < end; ++l)
    if (config.is_moe_layer(l)) out.push_back("model.layers." + std::to_string(l) + ".mlp");
  if (spec.last && config.num_nextn_predict_layers > 0 && config.is_moe_layer(L))
    out.push_back("model.layers." + std::to_string(L) + ".mlp");
  return out;
}

std::vector<TokenBatch> split_micro_batches(const TokenBatch& batch, int64_t micro_batches) {
  require(micro_batches >= 1 && micro_batches <= batch.batch,
          "pipeline: " + std::to_string(micro_batches) + " micro-batches for a batch of " +
              std::to_string(batch.batch) + " sequences, expected 1 .. batch");
  std::vector<TokenBatch> out;
  int64_t begin = 0;
  for (int64_t m = 0; m < micro_batches; ++m) {
    const int64_t n = batch.batch / micro_batches + (m < batch.batch % micro_batches ? 1 : 0);
    out.push_back({batch.input_ids + begin * batch.seq, batch.labels + begin * batch.seq, n, batch.seq});
    begin += n;
  }
  return out;
}

std::vector<PipelineOp> schedule_1f1b(int64_t stage, int64_t stages, int64_t micro_batches) {
  require(stages >= 1 && stage >= 0 && stage < stages && micro_batches >= 1,
          "schedule_1f1b: stage " + std::to_string(stage) + " of " + std::to_string(stages) + ", " +
              std::to_string(micro_batches) + " micro-batches");
  const int64_t warmup = std::min(stages - stage - 1, micro_batches);
  std::vector<PipelineOp> ops;
  for (int64_t m = 0; m < warmup; ++m) ops.push_back({PipelineOp::kForward, m});
  for (int64_t m = warmup; m < micro_batches; ++m) {
    ops.push_back({PipelineOp::kForward, m});
    ops.push_back({PipelineOp::kBackward, m - warmup});
  }
  for (int64_t m = micro_batches - warmup; m < micro_batches; ++m) ops.push_back({PipelineOp::kBackward, m});
  return ops;
}

PipelineStage::PipelineStage(const ModelConfig& config, const PipelinePlan& plan, int64_t stage, StageLinks links)
    : index_(stage), stages_(static_cast<int64_t>(plan.stages.size())), hidden_(config.hidden_size),
      links_(std::move(links)) {
  config.validate("model config");
  plan.validate(config);
  const std::string who = stage_name(stage);
  require(stage >= 0 && stage < stages_, who + ": outside the plan's " + std::to_string(stages_) + " stages");
  const PartSpec& spec = plan.stages[static_cast<size_t>(stage)];
  require(is_first() || (links_.act_in && links_.grad_out), who + ": needs act_in and grad_out channels");
  require(is_last() || (links_.act_out && links_.grad_in), who + ": needs act_out and grad_in channels");
  replica_ = stages_ > 1 && (is_first() || is_last()) &&
             (config.tie_word_embeddings || config.num_nextn_predict_layers > 0);
  require(!replica_ || (links_.replica_grad && links_.replica_weight),
          who + ": the embedding is shared with the " + (is_first() ? "last" : "first") +
              " stage: needs replica_grad and replica_weight channels");
  moe_prefixes_ = part_moe_prefixes(config, spec);

  RoutedExpertsFactory routed;
  if (plan.expert_shards > 0) {
    require(static_cast<int64_t>(links_.experts.size()) == plan.expert_shards,
            who + ": " + std::to_string(links_.experts.size()) + " expert links for " +
                std::to_string(plan.expert_shards) + " expert shards");
    const ExpertPlacement placement = plan.placement(config);
    routed = [this, placement](const std::string& prefix) {
      const auto it = std::find(moe_prefixes_.begin(), moe_prefixes_.end(), prefix);
      require(it != moe_prefixes_.end(), stage_name(index_) + ": unexpected MoE layer " + prefix);
      return make_expert_dispatcher(it - moe_prefixes_.begin(), hidden_, placement, links_.experts);
    };
  }
  part_ = std::make_unique<ModelPart>(config, params_, spec, routed);
  require(part_->moe_prefixes() == moe_prefixes_, who + ": MoE layers out of step with part_moe_prefixes");
  if (replica_) embed_ = &params_.at(kEmbedding);
  if (replica_ && !is_first()) embed_->trainable = false;  // the first stage's optimizer updates the original
}

PipelineStage::~PipelineStage() = default;

void PipelineStage::load_weights(const Params& source) { copy_weights(source, params_, stage_name(index_)); }

void PipelineStage::begin_step(const ForwardOptions& options, const LossDenominators& whole, int64_t micro_batches) {
  require(!in_step_, stage_name(index_) + ": begin_step inside a step");
  require(micro_batches >= 1, stage_name(index_) + ": a step needs at least one micro-batch");
  in_step_ = true;
  options_ = options;
  whole_ = whole;
  micro_.assign(static_cast<size_t>(micro_batches), InFlight{});
  latest_forward_ = -1;
  backwards_done_ = 0;
  sums_ = LossSums{};
  loads_.clear();
}

PipelineStage::InFlight& PipelineStage::micro(int64_t m, const char* op) {
  require(in_step_, stage_name(index_) + ": " + op + " outside a step (begin_step first)");
  require(m >= 0 && m < static_cast<int64_t>(micro_.size()),
          stage_name(index_) + ": " + op + " of micro-batch " + std::to_string(m) + ", the step has " +
              std::to_string(micro_.size()));
  return micro_[static_cast<size_t>(m)];
}

void PipelineStage::forward(int64_t m, const TokenBatch& batch) {
  InFlight& f = micro(m, "forward");
  require(!f.forwarded, stage_name(index_) + ": micro-batch " + std::to_string(m) + " forwarded twice");
  const int64_t n = batch.batch * batch.seq * hidden_;
  f.batch = batch;
  if (!is_first()) {
    f.input.resize(static_cast<size_t>(n));
    links_.act_in->recv(std::span<float>(f.input));
  }
  out_.resize(is_last() ? 0 : static_cast<size_t>(n));
  sums_.add(part_->forward(batch, f.input.data(), out_.data(), options_, whole_));
  add_loads(loads_, part_->expert_loads());
  f.forwarded = true;
  latest_forward_ = m;
  if (!is_last()) links_.act_out->send(std::span<const float>(out_));
}

void PipelineStage::backward(int64_t m) {
  InFlight& f = micro(m, "backward");
  const std::string who = stage_name(index_);
  require(options_.for_backward, who + ": backward in a step begun with for_backward = false");
  require(f.forwarded && !f.backwarded, who + ": backward of micro-batch " + std::to_string(m) +
                                            (f.backwarded ? " twice" : " before its forward"));
  const int64_t n = f.batch.batch * f.batch.seq * hidden_;
  if (latest_forward_ != m) {  // the part holds another micro-batch's activations: recompute this one's
    out_.resize(is_last() ? 0 : static_cast<size_t>(n));
    part_->forward(f.batch, f.input.data(), out_.data(), options_, whole_);
    latest_forward_ = m;
  }
  if (!is_last()) {
    dout_.resize(static_cast<size_t>(n));
    links_.grad_in->recv(std::span<float>(dout_));
  }
  const bool final_backward = backwards_done_ + 1 == static_cast<int64_t>(micro_.size());
  if (replica_ && is_first() && final_backward) {
    // The copy's gradient joins before the last embedding backward: the single model's order (MTP first).
    std::vector<float> g(static_cast<size_t>(embed_->grad.numel()));
    links_.replica_grad->recv(std::span<float>(g));
    float* mine = embed_->grad.data<float>();
    for (size_t i = 0; i < g.size(); ++i) mine[i] += g[i];
  }
  din_.resize(is_first() ? 0 : static_cast<size_t>(n));
  part_->backward(dout_.data(), din_.data());
  f.backwarded = true;
  std::vector<float>().swap(f.input);
  latest_forward_ = -1;
  ++backwards_done_;
  if (replica_ && is_last() && final_backward) links_.replica_grad->send(embed_->grad.span<float>());
  if (!is_first()) links_.grad_out->send(std::span<const float>(din_));
}

LossSums PipelineStage::end_step() {
  const std::string who = stage_name(index_);
  require(in_step_, who + ": end_step outside a step");
  for (size_t m = 0; m < micro_.size(); ++m)
    require(micro_[m].forwarded && (micro_[m].backwarded || !options_.for_backward),
            who + ": end_step before micro-batch " + std::to_string(m) + " finished");
  end_expert_step(links_.experts);
  in_step_ = false;
  micro_.clear();
  return sums_;
}

LossSums PipelineStage::run_step(std::span<const TokenBatch> micro_batches, const ForwardOptions& options,
                                 const LossDenominators& whole) {
  const int64_t M = static_cast<int64_t>(micro_batches.size());
  begin_step(options, whole, M);
  if (!options.for_backward) {
    for (int64_t m = 0; m < M; ++m) forward(m, micro_batches[static_cast<size_t>(m)]);
    return end_step();
  }
  for (const PipelineOp& op : schedule_1f1b(index_, stages_, M)) {
    if (op.kind == PipelineOp::kForward)
      forward(op.micro, micro_batches[static_cast<size_t>(op.micro)]);
    else
      backward(op.micro);
  }
  return end_step();
}

void PipelineStage::update_router_bias(float gamma) {
  if (!loads_.empty()) part_->update_router_bias(gamma, loads_);
}

void PipelineStage::send_replica_weights() {
  require(replica_ && is_first(), stage_name(index_) + ": send_replica_weights is the first stage's, when the "
                                                      "last stage holds a copy of the embedding");
  links_.replica_weight->send(embed_->value.span<float>());
}

void PipelineStage::recv_replica_weights() {
  require(replica_ && is_last(), stage_name(index_) + ": recv_replica_weights is the last stage's, when it holds "
                                                     "a copy of the embedding");
  links_.replica_weight->recv(embed_->value.span<float>());
}

}  // namespace moerl
