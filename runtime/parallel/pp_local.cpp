#include "runtime/parallel/pp_local.hpp"

#include <omp.h>

#include <exception>
#include <mutex>
#include <thread>

#include "runtime/error.hpp"

namespace moerl {

LocalPipeline::LocalPipeline(const ModelConfig& config, PipelinePlan plan, int threads_per_party)
    : config_(config), plan_(std::move(plan)), threads_per_party_(threads_per_party) {
  plan_.validate(config_);
  require(threads_per_party >= 1, "pipeline: threads_per_party = " + std::to_string(threads_per_party) +
                                      ", expected >= 1");
  const int64_t S = static_cast<int64_t>(plan_.stages.size()), R = plan_.expert_shards;
  auto channel = [&](const std::string& name) {
    channels_.push_back(make_local_channel(name));
    return channels_.back();
  };
  std::vector<StageLinks> links(static_cast<size_t>(S));
  for (int64_t s = 0; s + 1 < S; ++s) {
    const std::string a = std::to_string(s), b = std::to_string(s + 1);
    links[s].act_out = links[s + 1].act_in = channel("stage " + a + " -> " + b + " activations");
    links[s + 1].grad_out = links[s].grad_in = channel("stage " + b + " -> " + a + " activation gradients");
  }
  if (S > 1) {
    links.back().replica_grad = links.front().replica_grad = channel("embedding copy gradient, last -> first");
    links.back().replica_weight = links.front().replica_weight = channel("embedding weights, first -> last");
  }
  links_.resize(static_cast<size_t>(S));
  for (int64_t s = 0; s < S; ++s)
    for (int64_t r = 0; r < R; ++r) {
      const std::string who = "stage " + std::to_string(s) + " expert shard " + std::to_string(r);
      links_[s].push_back(ExpertLink{channel(who + " requests"), channel(who + " replies")});
    }
  for (int64_t s = 0; s < S; ++s) {
    links[s].experts = links_[s];
    stages_.push_back(std::make_unique<PipelineStage>(config_, plan_, s, links[s]));
    shards_.emplace_back();
    for (int64_t r = 0; r < R; ++r)
      shards_.back().push_back(
          std::make_unique<ExpertShard>(config_, stages_.back()->moe_prefixes(), plan_.placement(config_), r));
  }
}

LocalPipeline::~LocalPipeline() = default;

ExpertShard& LocalPipeline::shard(int64_t s, int64_t rank) {
  return *shards_.at(static_cast<size_t>(s)).at(static_cast<size_t>(rank));
}

void LocalPipeline::load_weights(const Params& source) {
  for (auto& stage : stages_) stage->load_weights(source);
  for (auto& row : shards_)
    for (auto& shard : row) shard->load_weights(source);
}

void LocalPipeline::start_optimizer(const AdamWConfig& config) {
  optimizers_.clear();
  for (auto& stage : stages_) optimizers_.push_back(std::make_unique<PartyOptimizer>(stage->params(), config));
  for (auto& row : shards_)
    for (auto& shard : row) optimizers_.push_back(std::make_unique<PartyOptimizer>(shard->params(), config));
}

const Param& LocalPipeline::param(const std::string& name) const {
  for (const auto& stage : stages_) {
    const bool copy = stage->has_replica() && !stage->is_first() && name == "model.embed_tokens.weight";
    if (!copy && stage->params().contains(name)) return stage->params().at(name);
  }
  for (const auto& row : shards_)
    for (const auto& shard : row)
      if (shard->params().contains(name)) return shard->params().at(name);
  throw Error("pipeline: no party holds a parameter named " + name);
}

LossSums LocalPipeline::run(const TokenBatch& batch, int64_t micro_batches, const ForwardOptions& options) {
  const std::vector<TokenBatch> micro = split_micro_batches(batch, micro_batches);
  const LossDenominators whole = loss_denominators(batch);
  std::vector<LossSums> sums(stages_.size());
  std::mutex failed;
  std::exception_ptr first_error;
  // A failed party closes every channel so that its peers stop waiting; the first error is the cause.
  auto fail = [&](std::exception_ptr e) {
    {
      std::lock_guard<std::mutex> lock(failed);
      if (!first_error) first_error = e;
    }
    for (auto& c : channels_) c->close("another party of the pipeline failed");
  };
  std::vector<std::thread> threads;
  for (size_t s = 0; s < stages_.size(); ++s)
    threads.emplace_back([&, s] {
      try {
        omp_set_num_threads(threads_per_party_);
        sums[s] = stages_[s]->run_step(micro, options, whole);
      } catch (...) {
        fail(std::current_exception());
      }
    });
  for (size_t s = 0; s < shards_.size(); ++s)
    for (size_t r = 0; r < shards_[s].size(); ++r)
      threads.emplace_back([&, s, r] {
        try {
          omp_set_num_threads(threads_per_party_);
          shards_[s][r]->serve(links_[s][r]);
        } catch (...) {
          fail(std::current_exception());
        }
      });
  for (auto& t : threads) t.join();
  if (first_error) std::rethrow_exception(first_error);
  LossSums total;
  for (const LossSums& s : sums) total.add(s);
  return total;
}

LocalPipeline::StepReport LocalPipeline::train_step(const TokenBatch& batch, int64_t micro_batches,
                                                    const ForwardOptions& options, int64_t step, float bias_gamma) {
  require(!optimizers_.empty(), "pipeline: train_step before start_optimizer");
  require(options.for_backward, "pipeline: train_step needs options.for_backward");
  for (auto& stage : stages_) stage->params().zero_grad();
  for (auto& row : shards_)
    for (auto& shard : row) shard->params().zero_grad();

  StepReport report;
  report.loss = run(batch, micro_batches, options).report(options.mtp_weight);

  std::vector<GradSquares> squares;
  for (auto& stage : stages_) squares.push_back(grad_squares(stage->params()));
  for (auto& row : shards_)
    for (auto& shard : row) squares.push_back(grad_squares(shard->params()));
  const double norm = global_grad_norm(squares);
  for (size_t i = 0; i < optimizers_.size(); ++i) {
    const StepStats stats = optimizers_[i]->step(step, norm);
    if (i == 0) report.optimizer = stats;
  }
  if (stages_.front()->has_replica()) {
    stages_.front()->send_replica_weights();
    stages_.back()->recv_replica_weights();
  }
  if (bias_gamma > 0)
    for (auto& stage : stages_) stage->update_router_bias(bias_gamma);
  return report;
}

LossReport LocalPipeline::evaluate(const TokenBatch& batch, int64_t micro_batches, ForwardOptions options) {
  options.for_backward = false;
  return run(batch, micro_batches, options).report(options.mtp_weight);
}

}  // namespace moerl
