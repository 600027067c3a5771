#include "runtime/parallel/party.hpp"

#include <algorithm>
#include <cstring>

#include "runtime/error.hpp"
#include "runtime/parallel/channel_gloo.hpp"
#include "runtime/parallel/dp_trainer.hpp"
#include "runtime/parallel/ep_shard.hpp"
#include "runtime/parallel/tp_model.hpp"
#include "runtime/safetensors.hpp"
#include "runtime/train/checkpoint.hpp"
#include "runtime/util/files.hpp"

namespace moerl {
namespace fs = std::filesystem;

namespace {

// Copies every parameter and buffer of `part` into the same name of `whole` (the reverse of copy_weights).
void store_part(const Params& part, Params& whole, const std::string& who, const std::string& skip = {}) {
  for (const auto& [name, p] : part.all()) {
    if (name == skip) continue;
    require(whole.contains(name), who + ": the whole model has no " + name);
    Param& w = whole.at(name);
    require(w.value.shape() == p.value.shape(), who + ": " + name + " is " + shape_string(p.value.shape()) +
                                                    ", the whole model's " + shape_string(w.value.shape()));
    std::memcpy(w.value.bytes(), p.value.bytes(), p.value.nbytes());
  }
}

// The tensors of a whole model's optimizer.safetensors that belong to `params` (AdamW::load_state refuses
// moments of parameters it does not hold).
SafeTensors own_moments(SafeTensors saved, const Params& params) {
  for (auto it = saved.tensors.begin(); it != saved.tensors.end();) {
    const std::string& key = it->first;
    const auto dot = key.find('.', std::string("optimizer.").size());
    const std::string name = dot == std::string::npos ? "" : key.substr(dot + 1);
    if (key == "optimizer.step" || (params.contains(name) && params.at(name).trainable))
      ++it;
    else
      it = saved.tensors.erase(it);
  }
  return saved;
}

bool pipeline_kind(const ParallelSpec& spec) { return spec.pipeline > 1 || spec.expert > 1; }

}  // namespace

// ---- pipeline x expert ----

// Pipeline stage `stage`: its layers, 1F1B over the recipe's micro-batches, its expert shards on its links.
class StageParty final : public Party {
 public:
  StageParty(PartyGroup& g, int party, int64_t stage)
      : g_(g), party_(party), stage_(g.config_, g.plan_, stage, g.stage_links_.at(static_cast<size_t>(stage))) {}

  void start_stage(const AdamWConfig& config) override {
    opt_ = std::make_unique<PartyOptimizer>(stage_.params(), config);
  }
  void load_weights(const Params& whole) override { stage_.load_weights(whole); }
  void load_optimizer_state(const fs::path& folder) override {
    require(opt_ != nullptr, g_.name(party_) + ": optimizer state before start_stage");
    opt_->adamw().load_state(own_moments(read_safetensors(folder / "optimizer.safetensors"), stage_.params()));
  }

  PartyStep train_step(const TokenBatch& batch, const ForwardOptions& options, int64_t step, float gamma) override {
    require(opt_ != nullptr, g_.name(party_) + ": train_step before start_stage");
    stage_.params().zero_grad();
    const LossSums sums =
        stage_.run_step(split_micro_batches(batch, g_.spec_.micro_batches), options, loss_denominators(batch));
    PartyStep out = exchange(grad_squares(stage_.params()), sums, stage_.step_expert_loads(), options.mtp_weight);
    out.stats = opt_->step(step, out.stats.grad_norm);
    if (stage_.has_replica() && stage_.is_first()) stage_.send_replica_weights();
    if (stage_.has_replica() && stage_.is_last()) stage_.recv_replica_weights();
    if (gamma > 0) stage_.update_router_bias(gamma);
    return out;
  }

  LossReport evaluate(const TokenBatch& batch, const ForwardOptions& options) override {
    ForwardOptions o = options;
    o.for_backward = false;
    const LossSums sums = stage_.run_step(split_micro_batches(batch, g_.spec_.micro_batches), o, loss_denominators(batch));
    return exchange({}, sums, {}, o.mtp_weight).loss;
  }

  void store_weights(Params& whole) const override {
    // The last stage's embedding is a copy of the first stage's (identical after every step).
    const bool copy = stage_.has_replica() && !stage_.is_first();
    store_part(stage_.params(), whole, g_.name(party_), copy ? "model.embed_tokens.weight" : "");
  }
  std::vector<std::string> stored_names(const Params&) const override {
    const bool copy = stage_.has_replica() && !stage_.is_first();
    std::vector<std::string> names;
    for (const auto& [name, p] : stage_.params().all())
      if (!(copy && name == "model.embed_tokens.weight")) names.push_back(name);
    return names;
  }
  void optimizer_state(OptimizerFiles& files) const override {
    for (const auto& [name, t] : opt_->adamw().state()) files["optimizer.safetensors"][name] = t;
  }

  // Posts this party's squares, loss terms and loads; returns the group's: total losses, global norm, loads.
  static PartyStep exchange_as(PartyGroup& g, int party, GradSquares squares, const LossSums& sums,
                               const std::vector<ExpertLoad>& loads, float mtp_weight) {
    PartyGroup::Board& b = g.board();
    g.sync(
        party,
        [&] {
          b.squares[static_cast<size_t>(party)] = std::move(squares);
          b.sums[static_cast<size_t>(party)] = sums;
          b.loads[static_cast<size_t>(party)] = loads;
        },
        [&] {
          if (g.processes_) g.share_board();  // the other processes' parties' entries
          b.norm = global_grad_norm(b.squares);
          b.total = LossSums{};
          b.all_loads.clear();
          for (size_t p = 0; p < b.sums.size(); ++p) {
            b.total.add(b.sums[p]);
            b.all_loads.insert(b.all_loads.end(), b.loads[p].begin(), b.loads[p].end());
          }
        });
    PartyStep out;  // read before this party's next sync: no other party can start the next `once` before it
    out.loss = b.total.report(mtp_weight);
    out.stats.grad_norm = b.norm;
    out.expert_loads = b.all_loads;
    return out;
  }

 private:
  PartyStep exchange(GradSquares squares, const LossSums& sums, const std::vector<ExpertLoad>& loads, float mtp) {
    return exchange_as(g_, party_, std::move(squares), sums, loads, mtp);
  }

  PartyGroup& g_;
  int party_;
  PipelineStage stage_;
  std::unique_ptr<PartyOptimizer> opt_;
};

// Expert shard `rank` of pipeline stage `stage`: serves the stage's expert rows until it ends each step.
class ShardParty final : public Party {
 public:
  ShardParty(PartyGroup& g, int party, int64_t stage, int64_t rank)
      : g_(g),
        party_(party),
        link_(g.stage_links_.at(static_cast<size_t>(stage)).experts.at(static_cast<size_t>(rank))),
        shard_(g.config_, part_moe_prefixes(g.config_, g.plan_.stages.at(static_cast<size_t>(stage))),
               g.plan_.placement(g.config_), rank) {}

  void start_stage(const AdamWConfig& config) override {
    opt_ = std::make_unique<PartyOptimizer>(shard_.params(), config);
  }
  void load_weights(const Params& whole) override { shard_.load_weights(whole); }
  void load_optimizer_state(const fs::path& folder) override {
    require(opt_ != nullptr, g_.name(party_) + ": optimizer state before start_stage");
    opt_->adamw().load_state(own_moments(read_safetensors(folder / "optimizer.safetensors"), shard_.params()));
  }

  PartyStep train_step(const TokenBatch&, const ForwardOptions& options, int64_t step, float) override {
    require(opt_ != nullptr, g_.name(party_) + ": train_step before start_stage");
    shard_.params().zero_grad();
    shard_.serve(link_);
    PartyStep out = StageParty::exchange_as(g_, party_, grad_squares(shard_.params()), {}, {}, options.mtp_weight);
    out.stats = opt_->step(step, out.stats.grad_norm);
    return out;
  }
  LossReport evaluate(const TokenBatch&, const ForwardOptions& options) override {
    shard_.serve(link_);
    return StageParty::exchange_as(g_, party_, {}, {}, {}, options.mtp_weight).loss;
  }
  void store_weights(Params& whole) const override { store_part(shard_.params(), whole, g_.name(party_)); }
  std::vector<std::string> stored_names(const Params&) const override {
    std::vector<std::string> names;
    for (const auto& [name, p] : shard_.params().all()) names.push_back(name);
    return names;
  }
  void optimizer_state(OptimizerFiles& files) const override {
    for (const auto& [name, t] : opt_->adamw().state()) files["optimizer.safetensors"][name] = t;
  }

 private:
  PartyGroup& g_;
  int party_;
  ExpertLink link_;
  ExpertShard shard_;
  std::unique_ptr<PartyOptimizer> opt_;
};

// ---- data x tensor ----

// Tensor rank `t` of data-parallel replica `d`: a whole Model (T = 1) or a TensorParallelModel rank, trained
// by a DataParallelTrainer (ZeRO-1) on the replica's slice of every batch.
class RankParty final : public Party {
 public:
  RankParty(PartyGroup& g, int party, int d, int t)
      : g_(g),
        party_(party),
        d_(d),
        t_(t),
        dp_gloo_(g.connect_data_member(d, t)),
        dp_(dp_gloo_ ? *dp_gloo_ : g.data_groups_.at(static_cast<size_t>(t))->member(d)),
        tp_(g.tensor_groups_.at(static_cast<size_t>(d))->member(t)) {
    if (g.spec_.tensor > 1) {
      tp_model_ = std::make_unique<TensorParallelModel>(g.config_, tp_);
      replica_ = tp_model_.get();
    } else {
      model_ = std::make_unique<Model>(g.config_);
      model_replica_ = std::make_unique<ModelReplica>(*model_);
      replica_ = model_replica_.get();
    }
  }

  void start_stage(const AdamWConfig& config) override {
    trainer_.reset();
    trainer_ = std::make_unique<DataParallelTrainer>(*replica_, dp_, config);
  }
  void load_weights(const Params& whole) override {
    if (tp_model_)
      tp_model_->load_from(whole);
    else
      copy_weights(whole, model_->params(), g_.name(party_));
  }
  void load_optimizer_state(const fs::path& folder) override {
    require(trainer_ != nullptr, g_.name(party_) + ": optimizer state before start_stage");
    trainer_->optimizer().load_state(read_safetensors(folder / file()));
  }

  PartyStep train_step(const TokenBatch& batch, const ForwardOptions& options, int64_t step, float gamma) override {
    require(trainer_ != nullptr, g_.name(party_) + ": train_step before start_stage");
    const DpStepReport r = trainer_->step(slice_batch(batch, d_, static_cast<int>(g_.spec_.data)), options, step, gamma);
    PartyStep out{r.loss, r.optimizer, replica_->expert_loads()};
    // The metrics' expert loads are the whole batch's: summed over the data group (exact in float below 2^24).
    std::vector<float> counts;
    for (const ExpertLoad& l : out.expert_loads) {
      counts.push_back(static_cast<float>(l.tokens));
      for (int64_t n : l.tokens_per_expert) counts.push_back(static_cast<float>(n));
    }
    if (!counts.empty()) dp_.allreduce_sum(counts.data(), counts.size());
    size_t i = 0;
    for (ExpertLoad& l : out.expert_loads) {
      l.tokens = static_cast<int64_t>(counts[i++]);
      for (int64_t& n : l.tokens_per_expert) n = static_cast<int64_t>(counts[i++]);
    }
    return out;
  }
  // Every replica scores the whole batch (tensor ranks together): the same loss everywhere, no exchange.
  LossReport evaluate(const TokenBatch& batch, const ForwardOptions& options) override {
    ForwardOptions o = options;
    o.for_backward = false;
    return replica_->forward(batch, o);
  }

  void store_weights(Params& whole) const override {
    if (d_ != 0) return;  // replicas are identical
    if (tp_model_)
      tp_model_->store_into(whole);
    else
      store_part(model_->params(), whole, g_.name(party_));
  }
  // Replica 0's tensor ranks together write every weight (one process holds them all, build() checks).
  std::vector<std::string> stored_names(const Params& whole) const override {
    std::vector<std::string> names;
    if (d_ == 0 && t_ == 0)
      for (const auto& [name, p] : whole.all()) names.push_back(name);
    return names;
  }
  void optimizer_state(OptimizerFiles& files) const override {
    require(trainer_ != nullptr, g_.name(party_) + ": optimizer state before start_stage");
    files[file()] = trainer_->optimizer().state();
  }

 private:
  // One file per rank: its ZeRO-1 shard of the moments (dp_zero.hpp's state()).
  std::string file() const {
    return "optimizer.rank" + std::to_string(d_) + "." + std::to_string(t_) + ".safetensors";
  }

  PartyGroup& g_;
  int party_, d_, t_;
  std::unique_ptr<Collectives> dp_gloo_;  // this rank of a data group spanning processes
  Collectives& dp_;
  Collectives& tp_;
  std::unique_ptr<Model> model_;
  std::unique_ptr<ModelReplica> model_replica_;
  std::unique_ptr<TensorParallelModel> tp_model_;
  Replica* replica_ = nullptr;
  std::unique_ptr<DataParallelTrainer> trainer_;
};

// ---- the group ----

std::vector<int> spread_parties(const ParallelSpec& spec, int processes) {
  require(processes >= 1, "parallel group: " + std::to_string(processes) + " processes");
  std::vector<int> out;
  if (pipeline_kind(spec)) {
    require(spec.pipeline >= processes, "parallelism.pipeline: " + std::to_string(spec.pipeline) +
                                            " stages cannot fill " + std::to_string(processes) +
                                            " processes (each runs a stage with its expert shards)");
    const int64_t R = spec.expert > 1 ? spec.expert : 0;
    for (int64_t s = 0; s < spec.pipeline; ++s) out.push_back(static_cast<int>(s % processes));
    for (int64_t s = 0; s < spec.pipeline; ++s)
      for (int64_t r = 0; r < R; ++r) out.push_back(static_cast<int>(s % processes));
  } else {
    require(spec.data >= processes, "parallelism.data: " + std::to_string(spec.data) + " replicas cannot fill " +
                                        std::to_string(processes) + " processes (each runs whole replicas)");
    for (int64_t d = 0; d < spec.data; ++d)
      for (int64_t t = 0; t < spec.tensor; ++t) out.push_back(static_cast<int>(d % processes));
  }
  return out;
}

PartyGroup::PartyGroup(const ModelConfig& config, const ParallelSpec& spec, std::chrono::milliseconds timeout)
    : config_(config), spec_(spec), timeout_(timeout) {
  build(nullptr);
}

PartyGroup::PartyGroup(const ModelConfig& config, const ParallelSpec& spec, const PartyProcesses& processes,
                       std::chrono::milliseconds timeout)
    : config_(config), spec_(spec), timeout_(timeout) {
  build(&processes);
}

void PartyGroup::build(const PartyProcesses* processes) {
  const ParallelSpec& spec = spec_;
  require(spec.any(), "parallel group: the recipe asks for no parallelism");
  const int64_t parties = pipeline_kind(spec) ? spec.pipeline * (1 + (spec.expert > 1 ? spec.expert : 0))
                                              : spec.data * spec.tensor;
  GlooOptions gloo;
  if (processes != nullptr) {
    const std::string where = "parallel group across processes (process " + std::to_string(processes->process) + ")";
    require(static_cast<int64_t>(processes->process_of.size()) == parties,
            where + ": process_of names " + std::to_string(processes->process_of.size()) + " parties, the group has " +
                std::to_string(parties));
    const int P = *std::max_element(processes->process_of.begin(), processes->process_of.end()) + 1;
    for (int p = 0; p < P; ++p)
      require(std::count(processes->process_of.begin(), processes->process_of.end(), p) > 0,
              where + ": process " + std::to_string(p) + " runs no party");
    require(*std::min_element(processes->process_of.begin(), processes->process_of.end()) >= 0 &&
                processes->process >= 0 && processes->process < P,
            where + ": processes are numbered 0 .. " + std::to_string(P - 1));
    if (!pipeline_kind(spec))
      for (int64_t p = 0; p < parties; ++p)
        require(processes->process_of[p] == processes->process_of[p - p % spec.tensor],
                where + ": replica " + std::to_string(p / spec.tensor) + "'s tensor ranks run in different processes");
    process_of_ = processes->process_of;
    process_ = processes->process;
    gloo.prefix = processes->prefix;
    gloo.hostname = processes->hostname;
    gloo.timeout = timeout_;
    rendezvous_ = processes->rendezvous;
    gloo_ = gloo;
    // The board's collectives first: every process joins them before any channel.
    GlooOptions board = gloo;
    board.prefix += ".board";
    processes_ = connect_gloo(processes->rendezvous, process_, P, board);
  }
  for (int64_t p = 0; p < parties; ++p) local_size_ += local(static_cast<int>(p)) ? 1 : 0;
  if (pipeline_kind(spec)) {
    require(spec.data == 1 && spec.tensor == 1, "parallel group: pipeline/expert with data/tensor parallelism");
    plan_ = PipelinePlan::even(config_, spec.pipeline, spec.expert > 1 ? spec.expert : 0);
    plan_.validate(config_);
    const int64_t S = spec.pipeline, R = spec.expert > 1 ? spec.expert : 0;
    auto shard = [&](int64_t s, int64_t r) { return static_cast<int>(S + s * R + r); };
    // Channel `name` from party `from` to party `to`: in-process when both run here, a Gloo channel's end when
    // one does (connected in this order, the same in every process), none when neither does.
    auto channel = [&](const std::string& name, int64_t from, int64_t to) -> std::shared_ptr<Channel> {
      const bool sends = local(static_cast<int>(from)), receives = local(static_cast<int>(to));
      if (!sends && !receives) return nullptr;
      if (sends && receives)
        channels_.push_back(make_local_channel(name, timeout_));
      else
        channels_.push_back(connect_gloo_channel(processes->rendezvous, name,
                                                 sends ? ChannelEnd::kSender : ChannelEnd::kReceiver, gloo));
      return channels_.back();
    };
    stage_links_.resize(static_cast<size_t>(S));
    for (int64_t s = 0; s + 1 < S; ++s) {
      const std::string a = std::to_string(s), b = std::to_string(s + 1);
      stage_links_[s].act_out = stage_links_[s + 1].act_in = channel("stage " + a + " -> " + b + " activations", s, s + 1);
      stage_links_[s + 1].grad_out = stage_links_[s].grad_in =
          channel("stage " + b + " -> " + a + " activation gradients", s + 1, s);
    }
    if (S > 1) {
      stage_links_.back().replica_grad = stage_links_.front().replica_grad = channel("embedding copy gradient", S - 1, 0);
      stage_links_.back().replica_weight = stage_links_.front().replica_weight = channel("embedding weights", 0, S - 1);
    }
    for (int64_t s = 0; s < S; ++s) {
      names_.push_back("stage_trainer/" + std::to_string(s));
      for (int64_t r = 0; r < R; ++r) {
        const std::string who = "stage " + std::to_string(s) + " expert shard " + std::to_string(r);
        auto requests = channel(who + " requests", s, shard(s, r));
        stage_links_[s].experts.push_back(ExpertLink{requests, channel(who + " replies", shard(s, r), s)});
      }
    }
    for (int64_t s = 0; s < S; ++s)
      for (int64_t r = 0; r < R; ++r) names_.push_back("expert_shard/" + std::to_string(s) + "." + std::to_string(r));
  } else {
    const int D = static_cast<int>(spec.data), T = static_cast<int>(spec.tensor);
    for (int d = 0; d < D; ++d) tensor_groups_.push_back(std::make_unique<InProcessGroup>(T, timeout_));
    for (int t = 0; t < T; ++t) {
      bool here = true;  // every replica's rank t in this process
      for (int d = 0; d < D; ++d) here = here && local(d * T + t);
      data_groups_.push_back(here ? std::make_unique<InProcessGroup>(D, timeout_) : nullptr);
    }
    for (int d = 0; d < D; ++d)
      for (int t = 0; t < T; ++t) names_.push_back("stage_trainer/" + std::to_string(d) + "." + std::to_string(t));
  }
  board_.squares.resize(names_.size());
  board_.sums.resize(names_.size());
  board_.loads.resize(names_.size());
}

PartyGroup::~PartyGroup() = default;

std::unique_ptr<Collectives> PartyGroup::connect_data_member(int d, int t) {
  if (data_groups_.at(static_cast<size_t>(t)) != nullptr) return nullptr;
  GlooOptions o = gloo_;
  o.prefix += ".data" + std::to_string(t);
  return connect_gloo(rendezvous_, d, static_cast<int>(spec_.data), o);
}

bool PartyGroup::local(int party) const {
  return process_of_.empty() || process_of_.at(static_cast<size_t>(party)) == process_;
}

std::unique_ptr<Party> PartyGroup::make(int party) {
  require(party >= 0 && party < size(), "parallel group: no party " + std::to_string(party));
  if (!local(party))
    throw Error("parallel group: party " + name(party) + " runs in process " +
                std::to_string(process_of_.at(static_cast<size_t>(party))) + ", not this one (" +
                std::to_string(process_) + ")");
  if (!pipeline_kind(spec_)) {
    const int T = static_cast<int>(spec_.tensor);
    return std::make_unique<RankParty>(*this, party, party / T, party % T);
  }
  if (party < spec_.pipeline) return std::make_unique<StageParty>(*this, party, party);
  const int64_t k = party - spec_.pipeline;
  return std::make_unique<ShardParty>(*this, party, k / spec_.expert, k % spec_.expert);
}

void PartyGroup::sync(int party, const std::function<void()>& mine, const std::function<void()>& once) {
  std::unique_lock lock(mu_);
  if (!aborted_.empty()) throw Error(name(party) + ": the parallel group stopped: " + aborted_);
  mine();
  const uint64_t gen = generation_;
  if (++arrived_ == local_size_) {
    arrived_ = 0;
    once_error_ = nullptr;
    try {
      once();
    } catch (...) {
      once_error_ = std::current_exception();
    }
    ++generation_;
    cv_.notify_all();
  } else if (!cv_.wait_for(lock, timeout_, [&] { return generation_ != gen || !aborted_.empty(); })) {
    aborted_ = name(party) + " waited " + std::to_string(timeout_.count()) + " ms for its peers";
    cv_.notify_all();
    throw Error(name(party) + ": the parallel group stopped: " + aborted_);
  } else if (generation_ == gen) {
    throw Error(name(party) + ": the parallel group stopped: " + aborted_);
  }
  if (once_error_) std::rethrow_exception(once_error_);
}

void PartyGroup::checkpoint(int party, const Party& p, const fs::path& dir, const Tokenizer* tokenizer,
                            const nlohmann::json& trainer_state) {
  sync(
      party,
      [&] {
        if (!checkpoint_model_) checkpoint_model_ = std::make_unique<Model>(config_);
        p.store_weights(checkpoint_model_->params());
        p.optimizer_state(checkpoint_files_);
        if (processes_) {
          const std::vector<std::string> names = p.stored_names(checkpoint_model_->params());
          checkpoint_names_.insert(checkpoint_names_.end(), names.begin(), names.end());
        }
      },
      [&] {
        std::string failure;
        try {
          if (processes_) gather_checkpoint();
          if (process_ == 0) {
            // Written beside `dir`, then swapped in whole: a crash leaves the previous checkpoint (or dir.old).
            const fs::path staging = dir.string() + ".parts";
            fs::remove_all(staging);
            save_checkpoint(staging, *checkpoint_model_, tokenizer, nullptr, &trainer_state);
            for (const auto& [file, tensors] : checkpoint_files_) write_safetensors(staging / file, tensors);
            replace_directory(staging, dir);
          }
        } catch (const std::exception& e) {
          failure = e.what();
        }
        checkpoint_model_.reset();
        checkpoint_files_.clear();
        checkpoint_names_.clear();
        received_.clear();
        if (processes_) {
          // Every process returns once process 0 wrote the folder, and fails when it could not.
          double failed = failure.empty() ? 0 : 1;
          processes_->allreduce_sum(&failed, 1);
          if (failed > 0 && failure.empty()) failure = "another process failed to write the checkpoint " + dir.string();
        }
        if (!failure.empty()) throw Error(failure);
      });
}

void PartyGroup::abort(const std::string& why) {
  {
    std::lock_guard lock(mu_);
    if (aborted_.empty()) aborted_ = why;
    cv_.notify_all();
  }
  for (auto& c : channels_) c->close(why);
  for (auto& g : tensor_groups_) g->abort();
  for (auto& g : data_groups_)
    if (g) g->abort();
}

}  // namespace moerl
