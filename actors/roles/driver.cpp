// The driver's run: an asynchronous chain of requests (describe -> per stage: open, begin, [restore], then per
// step: batch, train, [evaluate], [position, checkpoint]) mirroring run_recipe and run_stage step for step, so
// that the losses are the direct path's bit for bit. Every reply is awaited before the next command: one
// stage trainer, one step in flight.
#include "actors/roles/driver.hpp"

#include <chrono>
#include <cstdio>
#include <map>
#include <memory>

#include "actors/roles/data_loader.hpp"
#include "runtime/train/metrics.hpp"
#include "runtime/train/step_apply.hpp"
#include "runtime/util/files.hpp"
#include "runtime/util/progress.hpp"

namespace moerl::actors {
namespace fs = std::filesystem;

namespace {

constexpr const char* kDriver = "driver";
constexpr const char* kLoaderName = "data_loader/0";
constexpr const char* kTrainerName = "stage_trainer/0";

using Clock = std::chrono::steady_clock;

struct DriverState {
  BackendChooser backend;
  bool started = false, finished = false;
  caf::typed_response_promise<std::string, std::string> promise;
  Recipe recipe;
  data_loader_actor loader;
  stage_trainer_actor trainer;
  std::map<caf::actor_addr, std::string> names;  // monitored children
  std::map<std::string, caf::actor> children;
  std::unique_ptr<MetricsLog> metrics;
  nlohmann::json summary;
  Clock::time_point run_start;
  ModelConfig config;
  std::string device = "cpu";

  // The stage being run (run_stage's locals).
  size_t stage = 0;
  std::string run_id;
  msg::StageData data;
  StageOutcome outcome;
  int64_t step = 0;  // last step applied
  double wall_before = 0;
  Clock::time_point t0;
  int64_t tokens_done = 0;
  std::vector<double> recent;
  double last_val = 0;
  std::unique_ptr<ProgressBar> bar;
  nlohmann::json pending;  // the metrics line of the step in progress
  std::optional<msg::CheckpointManifest> last_checkpoint;  // the newest: where a restart begins

  const StageSpec& spec() const { return recipe.stages[stage]; }
  double elapsed() const { return std::chrono::duration<double>(Clock::now() - t0).count(); }
};
using Self = driver_actor::stateful_pointer<DriverState>;

void stop_children(Self self) {
  auto& st = self->state;
  for (auto& [name, child] : st.children) {
    self->demonitor(child);
    self->send_exit(child, caf::exit_reason::user_shutdown);
  }
  st.children.clear();
  st.names.clear();
}

// Ends the run with an error (once): children stopped, the caller answered.
void fail(Self self, const std::string& message) {
  auto& st = self->state;
  if (st.finished) return;
  st.finished = true;
  stop_children(self);
  st.promise.deliver(actor_error(msg::ErrorCode::Internal, message, kDriver, msg::StepId{st.run_id, static_cast<uint64_t>(st.step)}));
}

// Runs a continuation; an exception (a malformed reply, a file that cannot be written) fails the run.
template <class F>
void safely(Self self, F&& f) {
  try {
    f();
  } catch (const std::exception& e) {
    fail(self, std::string("driver: ") + e.what());
  }
}

// The error handler of a request to `who`: our actors' errors name themselves; CAF's get the name added. A
// request bounced because its receiver died is left to the down handler, which knows why it died.
auto failed(Self self, std::string who) {
  return [self, who](caf::error& e) {
    if (e == caf::sec::request_receiver_down && self->state.children.count(who)) return;
    fail(self, actor_error_of(e) ? describe(e) : who + ": " + describe(e));
  };
}

// Supervision hook. A dead child fails the run today. The cluster's supervision restarts it here instead:
// spawn a replacement, begin the stage from st.last_checkpoint (trainer: weights and optimizer; loader: the
// checkpoint's position) and continue at the checkpoint's step + 1 — steps carry ids, so the trainer never
// applies one twice and the losses stay those of an undisturbed run.
void on_child_down(Self self, const std::string& name, const caf::error& reason) {
  auto& st = self->state;
  std::string where = st.run_id.empty() ? "before the first stage" : "in " + st.run_id + " after step " + std::to_string(st.step);
  std::string restart = st.last_checkpoint ? "; the newest checkpoint is " + st.last_checkpoint->folder +
                                                 " (step " + std::to_string(st.last_checkpoint->step.step) + ")"
                                           : "";
  fail(self, name + " died (" + caf::to_string(reason) + ") " + where + restart +
                 "; restarting a dead actor is not implemented yet, the run stops");
}

template <class Handle>
void watch(Self self, const Handle& child, const std::string& name) {
  self->monitor(child);
  self->state.names[child.address()] = name;
  self->state.children[name] = caf::actor_cast<caf::actor>(child);
}

void start_stage(Self self);
void next_step(Self self);

void finish_run(Self self) {
  auto& st = self->state;
  st.summary["wall_s"] = std::chrono::duration<double>(Clock::now() - st.run_start).count();
  write_file_durably(st.recipe.out / "summary.json", st.summary.dump(2) + "\n");
  st.finished = true;
  stop_children(self);
  st.promise.deliver(st.summary.dump(), st.recipe.out.string());
}

// run_recipe's bookkeeping after run_stage returned.
void finish_stage(Self self) {
  auto& st = self->state;
  const StageSpec& stage = st.spec();
  const StageOutcome& o = st.outcome;
  nlohmann::json s = {{"stage", stage.name},         {"kind", stage.kind},
                      {"steps", o.steps},            {"train_loss", o.train_loss},
                      {"validation_loss", o.validation_loss}, {"wall_s", o.wall_s},
                      {"tokens_per_s", o.tokens_per_s}, {"checkpoint", (st.recipe.out / stage.name).string()}};
  if (st.data.has_bigram) s["bigram_validation_loss"] = st.data.bigram_validation_loss;
  st.summary["stages"].push_back(s);
  st.metrics->write({{"event", "stage_done"}, {"summary", s}});
  ++st.stage;
  start_stage(self);
}

void end_stage(Self self) {
  auto& st = self->state;
  char fields[96];
  std::snprintf(fields, sizeof fields, "loss %.3f  val %.3f", st.outcome.train_loss, st.outcome.validation_loss);
  st.bar->finish(fields);
  st.bar.reset();
  finish_stage(self);
}

// run_stage's checkpoint: the outcome so far and the loader's position go into trainer_state.json.
void checkpoint(Self self, int64_t step) {
  auto& st = self->state;
  self->request(st.loader, caf::infinite, position_atom::value)
      .then(
          [self, step](Envelope& e) {
            safely(self, [&] {
              auto& st = self->state;
              const auto pos = unwrap<msg::LoaderPosition>(e);
              st.outcome.steps = step;
              st.outcome.train_loss = tail_mean(st.recent);
              st.outcome.validation_loss = st.last_val;
              st.outcome.wall_s = st.wall_before + st.elapsed();
              st.outcome.tokens_per_s = static_cast<double>(st.tokens_done) / std::max(st.elapsed(), 1e-9);
              nlohmann::json state = {{"stage", st.spec().name},
                                      {"step", step},
                                      {"loader", LoaderState{pos.seed, pos.epoch, pos.cursor}.to_json()},
                                      {"outcome", stage_outcome_json(st.outcome)},
                                      {"recipe", st.recipe.file.string()},
                                      {"precision", precision_name(st.recipe.precision)}};
              if (st.device != "cpu") state["device"] = st.device;
              const msg::CheckpointRequest req{(st.recipe.out / st.spec().name).string(),
                                               msg::StepId{st.run_id, static_cast<uint64_t>(step)}, state.dump()};
              self->request(st.trainer, caf::infinite, checkpoint_atom::value, wrap(req))
                  .then(
                      [self](Envelope& m) {
                        safely(self, [&] {
                          self->state.last_checkpoint = unwrap<msg::CheckpointManifest>(m);
                          next_step(self);
                        });
                      },
                      failed(self, kTrainerName));
            });
          },
          failed(self, kLoaderName));
}

// The step's metrics line is complete: write it, draw the bar, checkpoint when due, go on.
void step_done(Self self, int64_t step, double loss) {
  auto& st = self->state;
  st.metrics->write(st.pending);
  char fields[96];
  if (st.outcome.validation_curve.empty())
    std::snprintf(fields, sizeof fields, "loss %.3f  val -", loss);
  else
    std::snprintf(fields, sizeof fields, "loss %.3f  val %.3f", loss, st.last_val);
  st.bar->update(step, st.tokens_done, fields);
  if (step % st.spec().checkpoint_every == 0 || step == st.spec().steps)
    checkpoint(self, step);
  else
    next_step(self);
}

void after_train(Self self, int64_t step, int64_t batch_tokens, const msg::TrainStepResult& r) {
  auto& st = self->state;
  const StageSpec& stage = st.spec();
  std::vector<ExpertLoad> loads;
  for (const msg::ExpertLoad& l : r.expert_load)
    loads.push_back(ExpertLoad{std::vector<int64_t>(l.tokens_per_expert.begin(), l.tokens_per_expert.end()), 0});
  const double load_ratio = mean_max_load_ratio(loads);
  st.step = step;
  st.tokens_done += batch_tokens;
  st.recent.push_back(r.loss);
  nlohmann::json m = {{"stage", stage.name}, {"step", step}, {"loss", r.loss}, {"lr", r.learning_rate},
                      {"grad_norm", r.grad_norm}, {"tokens", r.tokens},
                      {"tokens_per_s", static_cast<double>(st.tokens_done) / std::max(st.elapsed(), 1e-9)},
                      {"precision", precision_name(st.recipe.precision)}};
  if (st.device != "cpu") m["device"] = st.device;
  if (r.skipped) m["skipped"] = true;
  if (st.config.num_nextn_predict_layers > 0 && stage.mtp_weight > 0) m["mtp_loss"] = r.mtp_loss;
  if (stage.balance_alpha > 0) m["balance_loss"] = r.balance_loss;
  if (load_ratio > 0) m["expert_max_load_ratio"] = load_ratio;
  st.pending = std::move(m);
  const double loss = r.loss;
  if (step % stage.eval_every == 0 || step == stage.steps) {
    msg::EvalRequest req;
    req.step = msg::StepId{st.run_id, static_cast<uint64_t>(step)};
    req.batches = st.data.validation;
    self->request(st.trainer, caf::infinite, evaluate_atom::value, wrap(req))
        .then(
            [self, step, loss](Envelope& e) {
              safely(self, [&] {
                auto& st = self->state;
                st.last_val = unwrap<msg::EvalResult>(e).loss;
                st.pending["validation_loss"] = st.last_val;
                st.outcome.validation_curve.emplace_back(step, st.last_val);
                step_done(self, step, loss);
              });
            },
            failed(self, kTrainerName));
  } else {
    step_done(self, step, loss);
  }
}

void next_step(Self self) {
  auto& st = self->state;
  const int64_t step = st.step + 1;
  if (step > st.spec().steps) return end_stage(self);
  self->request(st.loader, caf::infinite, batch_atom::value, static_cast<uint64_t>(step))
      .then(
          [self, step](Envelope& e) {
            safely(self, [&] {
              auto& st = self->state;
              msg::TokenBatch batch = unwrap<msg::TokenBatch>(e);
              const int64_t batch_tokens = int64_t{batch.batch} * batch.seq;
              const msg::StepId id{st.run_id, static_cast<uint64_t>(step)};
              const msg::TrainStep cmd{id, {std::move(batch)}, learning_rate(st.spec().optimizer, step - 1)};
              self->request(st.trainer, caf::infinite, train_atom::value, wrap(cmd))
                  .then(
                      [self, step, batch_tokens](Envelope& r) {
                        safely(self, [&] { after_train(self, step, batch_tokens, unwrap<msg::TrainStepResult>(r)); });
                      },
                      failed(self, kTrainerName));
            });
          },
          failed(self, kLoaderName));
}

void begin_steps(Self self, int64_t start) {
  auto& st = self->state;
  st.step = start;
  st.bar = std::make_unique<ProgressBar>(st.spec().name, st.spec().steps);
  st.t0 = Clock::now();
  st.tokens_done = 0;
  st.recent.clear();
  st.last_val = st.outcome.validation_loss;
  next_step(self);
}

// run_stage's start: resume from the stage's checkpoint when there is one, else begin fresh.
void begin_stage(Self self) {
  auto& st = self->state;
  const StageSpec& stage = st.spec();
  const fs::path dir = st.recipe.out / stage.name;
  st.outcome = StageOutcome{};
  st.outcome.stage = stage.name;
  st.wall_before = 0;
  const auto ckpt = find_stage_checkpoint(dir);
  if (!ckpt) {
    self->request(st.trainer, caf::infinite, begin_atom::value, static_cast<uint32_t>(st.stage), std::string(), false)
        .then([self](uint64_t) { safely(self, [&] { begin_steps(self, 0); }); }, failed(self, kTrainerName));
    return;
  }
  const std::string where = (ckpt->folder / "trainer_state.json").string();
  require(ckpt->state.value("stage", "") == stage.name,
          where + ": belongs to stage \"" + ckpt->state.value("stage", "") + "\", expected \"" + stage.name + "\"");
  const auto start = ckpt->state.at("step").get<int64_t>();
  st.outcome = stage_outcome_from_json(ckpt->state.at("outcome"), where);
  st.wall_before = st.outcome.wall_s;
  if (start >= stage.steps) {
    std::fprintf(stderr, "%-10s already complete in %s (%lld steps), skipped\n", stage.name.c_str(), dir.c_str(),
                 static_cast<long long>(start));
    self->request(st.trainer, caf::infinite, begin_atom::value, static_cast<uint32_t>(st.stage), ckpt->folder.string(),
                  false)
        .then([self](uint64_t) { safely(self, [&] { finish_stage(self); }); }, failed(self, kTrainerName));
    return;
  }
  const LoaderState loader = LoaderState::from_json(ckpt->state.at("loader"), where);
  const msg::LoaderPosition pos{loader.seed, loader.epoch, loader.cursor,
                                msg::StepId{st.run_id, static_cast<uint64_t>(start)}};
  const std::string folder = ckpt->folder.string();
  self->request(st.trainer, caf::infinite, begin_atom::value, static_cast<uint32_t>(st.stage), folder, true)
      .then(
          [self, pos, folder, start](uint64_t) {
            self->request(self->state.loader, caf::infinite, restore_atom::value, wrap(pos))
                .then(
                    [self, folder, start](Envelope&) {
                      safely(self, [&] {
                        std::fprintf(stderr, "%-10s resuming from %s at step %lld\n", self->state.spec().name.c_str(),
                                     folder.c_str(), static_cast<long long>(start));
                        begin_steps(self, start);
                      });
                    },
                    failed(self, kLoaderName));
          },
          failed(self, kTrainerName));
}

void start_stage(Self self) {
  auto& st = self->state;
  if (st.stage >= st.recipe.stages.size()) return finish_run(self);
  st.run_id = stage_run_id(st.recipe, st.stage);
  st.step = 0;
  self->request(st.loader, caf::infinite, open_atom::value, static_cast<uint32_t>(st.stage))
      .then(
          [self](Envelope& e) {
            safely(self, [&] {
              msg::DecodeLimits limits;
              limits.max_micro_batches = std::max<uint32_t>(limits.max_micro_batches,
                                                            static_cast<uint32_t>(self->state.spec().eval_batches));
              self->state.data = unwrap<msg::StageData>(e, limits);
              begin_stage(self);
            });
          },
          failed(self, kLoaderName));
}

// run_recipe's start: the run folder, metrics, the data (through the loader), the model (in the trainer).
void start_run(Self self) {
  auto& st = self->state;
  st.run_start = Clock::now();
  fs::create_directories(st.recipe.out);
  st.metrics = std::make_unique<MetricsLog>(st.recipe.out / "metrics.jsonl");
  st.summary = {{"recipe", st.recipe.file.string()}, {"name", st.recipe.name},
                {"precision", precision_name(st.recipe.precision)}, {"seed", st.recipe.seed},
                {"stages", nlohmann::json::array()}};
  st.loader = spawn_data_loader(self->system(), st.recipe, kLoaderName);
  watch(self, st.loader, kLoaderName);
  self->request(st.loader, caf::infinite, describe_atom::value)
      .then(
          [self](Envelope& e) {
            safely(self, [&] {
              auto& st = self->state;
              const auto info = unwrap<msg::DatasetInfo>(e);
              st.config = st.recipe.model;
              st.config.vocab_size = info.vocab_size;
              st.config.bos_token_id = info.bos_id;
              st.config.eos_token_id = info.eos_id;
              st.trainer = spawn_stage_trainer(self->system(),
                                               StageTrainerSetup{st.recipe, st.config, info.tokenizer_file, st.backend},
                                               kTrainerName);
              watch(self, st.trainer, kTrainerName);
              self->request(st.trainer, caf::infinite, describe_atom::value)
                  .then(
                      [self](std::string& device) {
                        safely(self, [&] {
                          self->state.device = device;
                          if (device != "cpu") self->state.summary["device"] = device;
                          start_stage(self);
                        });
                      },
                      failed(self, kTrainerName));
            });
          },
          failed(self, kLoaderName));
}

driver_actor::behavior_type driver(Self self, BackendChooser backend) {
  self->state.backend = std::move(backend);
  self->set_down_handler([self](caf::down_msg& down) {
    auto& st = self->state;
    const auto it = st.names.find(down.source);
    if (it == st.names.end()) return;
    const std::string name = it->second;
    st.names.erase(it);
    st.children.erase(name);
    on_child_down(self, name, down.reason);
  });
  return {
      [self](run_atom, const std::string& file, const std::vector<std::string>& overrides, const std::string& out) {
        auto& st = self->state;
        auto promise = self->make_response_promise<std::string, std::string>();
        if (st.started) {
          promise.deliver(actor_error(msg::ErrorCode::InvalidRequest, "run: this driver has run a recipe already", kDriver));
          return promise;
        }
        st.started = true;
        st.promise = promise;
        try {
          st.recipe = load_recipe(file, overrides);
          if (!out.empty()) st.recipe.out = out;
          require(st.recipe.device == Device::CPU || st.backend,
                  st.recipe.file.string() + ": device: cuda: this driver was given no CUDA backend (a build without "
                                            "nvcc or without runtime/gpu); use device: cpu or a CUDA build");
        } catch (const std::exception& e) {
          st.finished = true;
          promise.deliver(actor_error(msg::ErrorCode::InvalidRequest, e.what(), kDriver));
          return promise;
        }
        safely(self, [&] { start_run(self); });
        return promise;
      },
      [self](lookup_atom, const std::string& name) {
        const auto it = self->state.children.find(name);
        return it == self->state.children.end() ? caf::actor() : it->second;
      },
  };
}

}  // namespace

driver_actor spawn_driver(caf::actor_system& system, BackendChooser backend) {
  return system.spawn(driver, std::move(backend));
}

ActorRunResult run_recipe_with_actors(const fs::path& recipe_file, const std::vector<std::string>& overrides,
                                      const std::string& out, BackendChooser backend) {
  caf::actor_system_config config;
  add_message_types(config);
  caf::actor_system system{config};
  const driver_actor d = spawn_driver(system, std::move(backend));
  ActorRunResult result;
  std::string failure;
  {
    caf::scoped_actor self{system};
    self->request(d, caf::infinite, run_atom::value, recipe_file.string(), overrides, out)
        .receive(
            [&](std::string& summary, std::string& folder) {
              result.summary = nlohmann::json::parse(summary);
              result.out = folder;
            },
            [&](caf::error& e) {
              const auto err = actor_error_of(e);
              failure = err && err->actor == kDriver ? err->message : describe(e);
            });
    self->send_exit(d, caf::exit_reason::user_shutdown);
  }
  require(failure.empty(), failure);
  return result;
}

}  // namespace moerl::actors
