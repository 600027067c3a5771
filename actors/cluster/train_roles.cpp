#include "actors/cluster/train_roles.hpp"


#include <chrono>
#include <cmath>
#include <filesystem>
#include <map>
#include <memory>

#include <nlohmann/json.hpp>

#include "runtime/data/loader.hpp"
#include "runtime/data/tokenizer.hpp"
#include "runtime/error.hpp"
#include "runtime/messages/codec.hpp"
#include "runtime/model/model.hpp"
#include "runtime/optim/adamw.hpp"
#include "runtime/recipe/recipe.hpp"
#include "runtime/safetensors.hpp"
#include "runtime/train/checkpoint.hpp"
#include "runtime/train/run_recipe.hpp"
#include "runtime/train/trainer.hpp"
#include "runtime/util/threads.hpp"


namespace moerl::cluster {
namespace fs = std::filesystem;
using Json = nlohmann::json;

void register_train_role_types(caf::actor_system_config& cfg) {
  cfg.add_message_type<ServedBatch>("moerl.ServedBatch");
  cfg.add_message_type<StepResult>("moerl.StepResult");
}

namespace {

struct RoleConfig {
  Recipe recipe;
  size_t stage = 0;
  fs::path out;
  const StageSpec& stage_spec() const { return recipe.stages[stage]; }
};

RoleConfig read_role_config(const RoleSpec& spec) {
  const std::string where = "role " + spec.name + " config";
  const Json j = role_config_json(spec);
  RoleConfig c;
  try {
    c.recipe = load_recipe(j.at("recipe").get<std::string>(), j.value("overrides", std::vector<std::string>{}));
    c.stage = j.at("stage").get<size_t>();
    c.out = j.at("out").get<std::string>();
  } catch (const Json::exception& e) {
    throw Error(where + ": " + e.what() + " (expected recipe, stage, out)");
  }
  c.recipe.out = c.out;
  require(c.stage < c.recipe.stages.size(), where + ": stage " + std::to_string(c.stage) + " is beyond the recipe's " +
                                                std::to_string(c.recipe.stages.size()) + " stages");
  require(c.stage_spec().kind == "pretrain", where + ": stage " + c.stage_spec().name + " is " + c.stage_spec().kind +
                                                 "; the cluster roles train pretraining stages only");
  return c;
}

void use_threads(const Recipe& recipe) { moerl::use_threads(recipe.threads); }

// The tokenizer the head prepared and the token stream of one split, as run_recipe builds them.
struct Streams {
  Tokenizer tokenizer;
  TokenStream stream;
};
std::unique_ptr<Streams> load_stream(const RoleConfig& c, bool validation) {
  const fs::path tok = c.out / Tokenizer::kFileName;
  require(fs::exists(tok), tok.string() + ": missing (the head writes the tokenizer before it places roles; is the "
                                          "run folder shared by every node?)");
  auto s = std::unique_ptr<Streams>(new Streams{Tokenizer::load(tok), {}});
  const std::vector<std::string> texts = load_corpus(c.recipe.data);
  const DocumentSplit split = split_documents(texts.size(), static_cast<size_t>(c.recipe.data.validation_every));
  s->stream = TokenStream::from_texts(s->tokenizer, texts, validation ? split.validation : split.train);
  return s;
}

// ---- the loader ----

struct LoaderCore {
  RoleConfig config;
  std::unique_ptr<Streams> data;
  std::unique_ptr<BatchLoader> loader;
  std::map<uint64_t, LoaderState> before;  // the loader's state before serving each step seen so far
  uint64_t served = 0;                     // highest step served
  LoaderState after_served;
};

struct LoaderActorState {
  std::unique_ptr<LoaderCore> core;
};

ServedBatch serve(LoaderCore& c, uint64_t step) {
  require(step >= 1, "loader: steps count from 1");
  if (!c.before.count(step)) {  // beyond what was served: walk forward from there
    c.loader->restore(c.after_served);
    while (c.served + 1 < step) {
      c.before[++c.served] = c.loader->state();
      c.loader->next();
    }
    c.before[step] = c.loader->state();
  }
  c.loader->restore(c.before.at(step));
  const Batch b = c.loader->next();
  const LoaderState after = c.loader->state();
  if (step > c.served) c.served = step, c.after_served = after;
  msg::TokenBatch t;
  t.step = {c.config.recipe.name, step};
  t.batch = static_cast<uint32_t>(b.batch);
  t.seq = static_cast<uint32_t>(b.seq);
  t.ids.assign(b.input_ids.begin(), b.input_ids.end());
  t.labels.assign(b.labels.begin(), b.labels.end());
  return ServedBatch{step, msg::encode(t), after.to_json().dump()};
}

loader_actor::behavior_type loader_role(loader_actor::stateful_pointer<LoaderActorState> self, RoleConfig config) {
  auto core = std::make_unique<LoaderCore>();
  core->config = std::move(config);
  use_threads(core->config.recipe);
  core->data = load_stream(core->config, false);
  const StageSpec& st = core->config.stage_spec();
  const uint64_t seed = core->config.recipe.seed + 1000 * (core->config.stage + 1);  // as run_recipe seeds it
  core->loader = std::make_unique<BatchLoader>(core->data->stream, st.batch, st.seq, seed);
  core->after_served = core->loader->state();
  self->state.core = std::move(core);
  return {
      [self](batch_atom, uint64_t step) -> caf::result<ServedBatch> {
        try {
          return serve(*self->state.core, step);
        } catch (const std::exception& e) {
          return make_cluster_error(std::string("loader: ") + e.what());
        }
      },
  };
}

// ---- the trainer ----

double mean_max_load_ratio(const std::vector<ExpertLoad>& loads) {
  double sum = 0;
  int n = 0;
  for (const ExpertLoad& l : loads) {
    int64_t total = 0, max = 0;
    for (int64_t t : l.tokens_per_expert) total += t, max = std::max(max, t);
    if (total == 0) continue;
    sum += static_cast<double>(max) * static_cast<double>(l.tokens_per_expert.size()) / static_cast<double>(total);
    ++n;
  }
  return n ? sum / n : 0.0;
}

struct TrainerCore {
  RoleConfig config;
  std::unique_ptr<Tokenizer> tokenizer;
  std::vector<Batch> validation;
  std::unique_ptr<Model> model;
  std::unique_ptr<AdamW> optimizer;
  ForwardOptions options;
  uint64_t applied = 0;                   // last step whose update is in the weights
  std::map<uint64_t, StepResult> results;  // steps applied by this incarnation
  std::vector<double> losses;             // every step's training loss (kept in checkpoints)
  std::vector<std::pair<int64_t, double>> curve;
  double last_validation = 0, wall_before = 0;
  int64_t tokens_done = 0;                // by this incarnation, for tokens_per_s
  std::string loader_state = "{}";
  std::chrono::steady_clock::time_point start = std::chrono::steady_clock::now();

  fs::path dir() const { return config.out / config.stage_spec().name; }
  double elapsed() const { return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count(); }
};

struct TrainerActorState {
  std::unique_ptr<TrainerCore> core;
};

Json outcome_json(const TrainerCore& c) {
  Json curve = Json::array();
  for (auto [step, loss] : c.curve) curve.push_back({step, loss});
  const size_t tail = std::max<size_t>(1, c.losses.size() / 10);
  double sum = 0;
  for (size_t i = c.losses.size() >= tail ? c.losses.size() - tail : 0; i < c.losses.size(); ++i) sum += c.losses[i];
  const double wall = c.wall_before + c.elapsed();
  return {{"stage", c.config.stage_spec().name}, {"steps", c.applied},
          {"train_loss", c.losses.empty() ? 0.0 : sum / static_cast<double>(std::min(tail, c.losses.size()))},
          {"validation_loss", c.last_validation}, {"wall_s", wall},
          {"tokens_per_s", static_cast<double>(c.tokens_done) / std::max(c.elapsed(), 1e-9)},
          {"validation_curve", curve}};
}

std::unique_ptr<TrainerCore> make_trainer(RoleConfig config) {
  auto c = std::make_unique<TrainerCore>();
  c->config = std::move(config);
  const Recipe& recipe = c->config.recipe;
  const StageSpec& stage = c->config.stage_spec();
  use_threads(recipe);
  auto valid = load_stream(c->config, true);
  c->tokenizer = std::make_unique<Tokenizer>(std::move(valid->tokenizer));
  c->validation = validation_batches(valid->stream, stage.batch, stage.seq);
  if (static_cast<int64_t>(c->validation.size()) > stage.eval_batches)
    c->validation.resize(static_cast<size_t>(stage.eval_batches));
  ModelConfig mc = recipe.model;
  mc.vocab_size = c->tokenizer->vocab_size();
  mc.bos_token_id = c->tokenizer->bos_id();
  mc.eos_token_id = c->tokenizer->eos_id();
  c->model = std::make_unique<Model>(mc);
  c->model->init_random(recipe.seed);
  c->options.precision = recipe.precision;
  c->options.mtp_weight = mc.num_nextn_predict_layers > 0 ? stage.mtp_weight : 0.0f;
  c->options.balance_alpha = stage.balance_alpha;

  fs::path ckpt = c->dir();
  if (!fs::exists(ckpt / "trainer_state.json") && fs::exists(ckpt.string() + ".old/trainer_state.json"))
    ckpt = ckpt.string() + ".old";
  const auto state = read_trainer_state(ckpt);
  if (!state && c->config.stage > 0) {  // the stage starts from the previous stage's final weights
    const fs::path prev = c->config.out / recipe.stages[c->config.stage - 1].name / "model.safetensors";
    require(fs::exists(prev), prev.string() + ": missing; the previous stage has not finished");
    c->model->load_weights(read_safetensors(prev));
  }
  if (state) c->model->load_weights(read_safetensors(ckpt / "model.safetensors"));
  c->optimizer = std::make_unique<AdamW>(c->model->params(), stage.optimizer);
  if (state) {
    const std::string where = (ckpt / "trainer_state.json").string();
    require(state->value("stage", "") == stage.name, where + ": belongs to stage \"" + state->value("stage", "") +
                                                         "\", expected \"" + stage.name + "\"");
    c->applied = state->at("step").get<uint64_t>();
    if (c->applied < static_cast<uint64_t>(stage.steps))
      c->optimizer->load_state(read_safetensors(ckpt / "optimizer.safetensors"));
    c->losses = state->value("step_losses", std::vector<double>{});
    const Json& o = state->at("outcome");
    c->last_validation = o.at("validation_loss").get<double>();
    c->wall_before = o.at("wall_s").get<double>();
    for (const auto& p : o.at("validation_curve")) c->curve.emplace_back(p[0].get<int64_t>(), p[1].get<double>());
    c->loader_state = state->at("loader").dump();
  }
  return c;
}

StepResult train_step(TrainerCore& c, const ServedBatch& served) {
  const StageSpec& stage = c.config.stage_spec();
  const uint64_t step = served.step;
  if (step <= c.applied) {
    const auto it = c.results.find(step);
    require(it != c.results.end(), "trainer: step " + std::to_string(step) + " was applied before this trainer "
                                   "started (its checkpoint is at step " + std::to_string(c.applied) +
                                   "); ask position and continue from there");
    StepResult again = it->second;
    again.replayed = true;
    return again;
  }
  require(step == c.applied + 1, "trainer: step " + std::to_string(step) + " arrived, expected step " +
                                     std::to_string(c.applied + 1));
  require(step <= static_cast<uint64_t>(stage.steps),
          "trainer: step " + std::to_string(step) + " is beyond the stage's " + std::to_string(stage.steps));
  msg::DecodeLimits limits;
  limits.vocab = c.model->config().vocab_size;
  const msg::TokenBatch t = msg::decode_token_batch(served.tokens, limits);
  require(t.step.step == step && t.batch == stage.batch && t.seq == stage.seq,
          "trainer: the batch of step " + std::to_string(t.step.step) + " (" + std::to_string(t.batch) + "x" +
              std::to_string(t.seq) + ") does not fit step " + std::to_string(step) + " of stage " + stage.name);
  const std::vector<int64_t> ids(t.ids.begin(), t.ids.end()), labels(t.labels.begin(), t.labels.end());
  use_threads(c.config.recipe);

  Model& model = *c.model;
  model.params().zero_grad();
  const LossReport r = model.forward(TokenBatch{ids.data(), labels.data(), t.batch, t.seq}, c.options);
  require(std::isfinite(r.total), "stage " + stage.name + ": the loss became " + std::to_string(r.total) +
                                      " at step " + std::to_string(step) + " (try a lower learning rate)");
  model.backward();
  const StepStats stats = c.optimizer->step(static_cast<int64_t>(step) - 1);
  StepResult out;
  out.step = step;
  out.loss = r.loss, out.mtp_loss = r.mtp_loss, out.balance_loss = r.balance_loss;
  out.grad_norm = stats.grad_norm, out.lr = stats.lr, out.skipped = stats.skipped;
  out.tokens = r.tokens;
  out.load_ratio = mean_max_load_ratio(model.expert_loads());
  if (stage.bias_gamma > 0) model.update_router_bias(stage.bias_gamma);
  c.applied = step;
  c.losses.push_back(r.loss);
  c.tokens_done += static_cast<int64_t>(t.batch) * t.seq;
  c.loader_state = served.loader_state;
  const bool last = step == static_cast<uint64_t>(stage.steps);
  if (step % static_cast<uint64_t>(stage.eval_every) == 0 || last) {
    c.last_validation = validation_loss(model, c.validation, c.config.recipe.precision);
    c.curve.emplace_back(static_cast<int64_t>(step), c.last_validation);
    out.has_validation = true;
    out.validation_loss = c.last_validation;
  }
  if (step % static_cast<uint64_t>(stage.checkpoint_every) == 0 || last) {
    const Json state = {{"stage", stage.name}, {"step", step}, {"loader", Json::parse(c.loader_state)},
                        {"outcome", outcome_json(c)}, {"recipe", c.config.recipe.file.string()},
                        {"precision", precision_name(c.config.recipe.precision)}, {"step_losses", c.losses}};
    save_checkpoint(c.dir(), model, c.tokenizer.get(), c.optimizer.get(), &state);
    out.checkpointed = true;
  }
  c.results[step] = out;
  return out;
}

trainer_actor::behavior_type trainer_role(trainer_actor::stateful_pointer<TrainerActorState> self, RoleConfig config) {
  self->state.core = make_trainer(std::move(config));
  return {
      [self](position_atom) -> uint64_t { return self->state.core->applied; },
      [self](train_atom, const ServedBatch& batch) -> caf::result<StepResult> {
        try {
          return train_step(*self->state.core, batch);
        } catch (const std::exception& e) {
          return make_cluster_error(e.what());
        }
      },
      [self](outcome_atom) -> std::string { return outcome_json(*self->state.core).dump(); },
  };
}

}  // namespace

void add_train_roles(RoleCatalog& catalog) {
  catalog.add("cluster.loader", [](caf::actor_system& system, const RoleSpec& spec) {
    return caf::actor_cast<caf::actor>(system.spawn<caf::detached>(loader_role, read_role_config(spec)));
  });
  catalog.add("cluster.trainer", [](caf::actor_system& system, const RoleSpec& spec) {
    return caf::actor_cast<caf::actor>(system.spawn<caf::detached>(trainer_role, read_role_config(spec)));
  });
}

}  // namespace moerl::cluster
