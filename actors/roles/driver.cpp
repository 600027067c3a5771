// The driver's run: an asynchronous chain of requests (describe -> per stage: open, begin, [restore], then per
// step: batch, train, [evaluate], [position, checkpoint]) mirroring run_recipe and run_stage step for step, so
// that the losses are the direct path's bit for bit. Every reply is awaited before the next command: one step
// in flight, sent to the stage trainer or to every party of a parallel group.
#include "actors/roles/driver.hpp"

#include <chrono>
#include <cstdio>
#include <map>
#include <memory>

#include "actors/roles/data_loader.hpp"
#include "runtime/train/metrics.hpp"
#include "runtime/train/report.hpp"
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

nlohmann::json parallelism_json(const ParallelSpec& p) {
  return {{"pipeline", p.pipeline}, {"expert", p.expert}, {"data", p.data}, {"tensor", p.tensor},
          {"micro_batches", p.micro_batches}};
}

struct DriverState {
  BackendChooser backend;
  DriverProcesses processes;
  bool started = false, finished = false;
  caf::typed_response_promise<std::string, std::string> promise;
  Recipe recipe;
  data_loader_actor loader;
  // One stage trainer, or every party of a parallel group (recipe parallelism): each gets every command.
  std::vector<stage_trainer_actor> trainers;
  std::vector<std::string> trainer_names;
  std::shared_ptr<PartyGroup> group;
  uint64_t generation = 0;  // bumped by each restart: replies to the previous children's requests are dropped
  int restarts = 0;
  int64_t logged_step = 0;  // of the stage being run: a step repeated after a restart is not logged again
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
  // Where this process's metrics.jsonl and summary.json go: the run folder, or <out>/process-I/ (I > 0).
  fs::path log_dir() const {
    return processes.process == 0 ? recipe.out : recipe.out / ("process-" + std::to_string(processes.process));
  }
};
using Self = driver_actor::stateful_pointer<DriverState>;

void stop_children(Self self) {
  auto& st = self->state;
  // A party blocked on a dead peer is released at once (its pending command then fails, unheard).
  if (st.group) st.group->abort("the driver stopped the group");
  for (auto& [name, child] : st.children) {
    self->demonitor(child);
    self->send_exit(child, caf::exit_reason::user_shutdown);
  }
  st.children.clear();
  st.names.clear();
  st.trainers.clear();
  st.trainer_names.clear();
  st.group.reset();
}

// Whether a reply belongs to children stopped since the request was sent (or to a run that is over).
bool stale(Self self, uint64_t generation) {
  return self->state.generation != generation || self->state.finished;
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
  return [self, who, gen = self->state.generation](caf::error& e) {
    if (stale(self, gen)) return;
    if (e == caf::sec::request_receiver_down && self->state.children.count(who)) return;
    fail(self, actor_error_of(e) ? describe(e) : who + ": " + describe(e));
  };
}

void spawn_children(Self self);

// Supervision. A dead child (a stage trainer, a party of a parallel group, the loader) stops every child;
// fresh ones are spawned and the stage resumes from its newest checkpoint (trainer: weights and optimizer;
// loader: the checkpoint's position), or from the start when the run has not checkpointed yet. The steps
// after the checkpoint are applied again to the restored state — never twice to the same state — and their
// metrics lines are not written again. At most kMaxRestarts per run; then the run fails naming the child.
constexpr int kMaxRestarts = 3;

void on_child_down(Self self, const std::string& name, const caf::error& reason) {
  auto& st = self->state;
  std::string where = st.run_id.empty() ? "before the first stage" : "in " + st.run_id + " after step " + std::to_string(st.step);
  if (st.finished) return;
  if (st.processes.processes > 1) {
    fail(self, name + " died (" + caf::to_string(reason) + ") " + where + " in process " +
                   std::to_string(st.processes.process) + " of " + std::to_string(st.processes.processes) +
                   "; a run spread over processes is not restarted, the run stops");
    return;
  }
  const bool resumable = st.stage == 0 || (st.stage < st.recipe.stages.size() &&
                                           find_stage_checkpoint(st.recipe.out / st.spec().name).has_value());
  if (st.restarts >= kMaxRestarts || !resumable) {
    std::string restart = st.last_checkpoint ? "; the newest checkpoint is " + st.last_checkpoint->folder +
                                                   " (step " + std::to_string(st.last_checkpoint->step.step) + ")"
                                             : "";
    fail(self, name + " died (" + caf::to_string(reason) + ") " + where + restart +
                   (resumable ? "; restarted " + std::to_string(st.restarts) + " times already, the run stops"
                              : "; this stage has no checkpoint to restart from, the run stops"));
    return;
  }
  ++st.restarts;
  ++st.generation;
  if (st.bar) st.bar.reset();
  std::fprintf(stderr, "%s died (%s) %s; restarting the children from the last checkpoint (restart %d of %d)\n",
               name.c_str(), caf::to_string(reason).c_str(), where.c_str(), st.restarts, kMaxRestarts);
  st.metrics->write({{"event", "restart"}, {"actor", name}, {"after_step", st.step}, {"run", st.run_id}});
  stop_children(self);
  spawn_children(self);
}

template <class Handle>
void watch(Self self, const Handle& child, const std::string& name) {
  self->monitor(child);
  self->state.names[child.address()] = name;
  self->state.children[name] = caf::actor_cast<caf::actor>(child);
}

// Sends a command to every stage trainer and continues with party 0's reply once all have answered (every
// party of a group answers the same); the first failure fails the run. Replies from before a restart are dropped.
template <class Reply, class F, class... Ts>
void ask_trainers(Self self, F on_reply, Ts... xs) {
  auto& st = self->state;
  const size_t n = st.trainers.size();
  auto left = std::make_shared<size_t>(n);
  auto lead = std::make_shared<std::optional<Reply>>();
  const uint64_t gen = st.generation;
  for (size_t i = 0; i < n; ++i)
    self->request(st.trainers[i], caf::infinite, xs...)
        .then(
            [self, gen, i, left, lead, on_reply](Reply& r) mutable {
              if (stale(self, gen)) return;
              if (i == 0) *lead = std::move(r);
              if (--*left == 0) safely(self, [&] { on_reply(**lead); });
            },
            failed(self, st.trainer_names[i]));
}

void start_stage(Self self);
void next_step(Self self);

void finish_run(Self self) {
  auto& st = self->state;
  st.summary["wall_s"] = std::chrono::duration<double>(Clock::now() - st.run_start).count();
  write_file_durably(st.log_dir() / "summary.json", st.summary.dump(2) + "\n");
  write_html_report(st.log_dir(), st.summary);  // report.html, report.txt, the table on stderr
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
  st.logged_step = 0;
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
          [self, step, gen = st.generation](Envelope& e) {
            if (stale(self, gen)) return;
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
              ask_trainers<Envelope>(
                  self,
                  [self](Envelope& m) {
                    self->state.last_checkpoint = unwrap<msg::CheckpointManifest>(m);
                    next_step(self);
                  },
                  checkpoint_atom::value, wrap(req));
            });
          },
          failed(self, kLoaderName));
}

// The step's metrics line is complete: write it, draw the bar, checkpoint when due, go on.
void step_done(Self self, int64_t step, double loss) {
  auto& st = self->state;
  if (step > st.logged_step) {
    st.metrics->write(st.pending);
    st.logged_step = step;
  }
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
    ask_trainers<Envelope>(
        self,
        [self, step, loss](Envelope& e) {
          auto& st = self->state;
          st.last_val = unwrap<msg::EvalResult>(e).loss;
          st.pending["validation_loss"] = st.last_val;
          st.outcome.validation_curve.emplace_back(step, st.last_val);
          step_done(self, step, loss);
        },
        evaluate_atom::value, wrap(req));
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
          [self, step, gen = st.generation](Envelope& e) {
            if (stale(self, gen)) return;
            safely(self, [&] {
              auto& st = self->state;
              msg::TokenBatch batch = unwrap<msg::TokenBatch>(e);
              const int64_t batch_tokens = int64_t{batch.batch} * batch.seq;
              const msg::StepId id{st.run_id, static_cast<uint64_t>(step)};
              const msg::TrainStep cmd{id, {std::move(batch)}, learning_rate(st.spec().optimizer, step - 1)};
              ask_trainers<Envelope>(
                  self,
                  [self, step, batch_tokens](Envelope& r) {
                    after_train(self, step, batch_tokens, unwrap<msg::TrainStepResult>(r));
                  },
                  train_atom::value, wrap(cmd));
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
    ask_trainers<uint64_t>(
        self, [self](uint64_t) { begin_steps(self, 0); }, begin_atom::value, static_cast<uint32_t>(st.stage),
        std::string(), false);
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
    ask_trainers<uint64_t>(
        self, [self](uint64_t) { finish_stage(self); }, begin_atom::value, static_cast<uint32_t>(st.stage),
        ckpt->folder.string(), false);
    return;
  }
  const LoaderState loader = LoaderState::from_json(ckpt->state.at("loader"), where);
  const msg::LoaderPosition pos{loader.seed, loader.epoch, loader.cursor,
                                msg::StepId{st.run_id, static_cast<uint64_t>(start)}};
  const std::string folder = ckpt->folder.string();
  ask_trainers<uint64_t>(
      self,
      [self, pos, folder, start](uint64_t) {
        self->request(self->state.loader, caf::infinite, restore_atom::value, wrap(pos))
            .then(
                [self, folder, start, gen = self->state.generation](Envelope&) {
                  if (stale(self, gen)) return;
                  safely(self, [&] {
                        std::fprintf(stderr, "%-10s resuming from %s at step %lld\n", self->state.spec().name.c_str(),
                                     folder.c_str(), static_cast<long long>(start));
                    begin_steps(self, start);
                  });
                },
                failed(self, kLoaderName));
      },
      begin_atom::value, static_cast<uint32_t>(st.stage), folder, true);
}

void start_stage(Self self) {
  auto& st = self->state;
  if (st.stage >= st.recipe.stages.size()) return finish_run(self);
  st.run_id = stage_run_id(st.recipe, st.stage);
  st.step = 0;
  self->request(st.loader, caf::infinite, open_atom::value, static_cast<uint32_t>(st.stage))
      .then(
          [self, gen = st.generation](Envelope& e) {
            if (stale(self, gen)) return;
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

// The children: the loader (the data), then the stage trainer (the whole model) or the parties of a parallel
// group, then the current stage (from its checkpoint when there is one). At the start and after a restart.
void spawn_children(Self self) {
  auto& st = self->state;
  st.loader = spawn_data_loader(self->system(), st.recipe, kLoaderName);
  watch(self, st.loader, kLoaderName);
  self->request(st.loader, caf::infinite, describe_atom::value)
      .then(
          [self, gen = st.generation](Envelope& e) {
            if (stale(self, gen)) return;
            safely(self, [&] {
              auto& st = self->state;
              const auto info = unwrap<msg::DatasetInfo>(e);
              st.config = st.recipe.model;
              st.config.vocab_size = info.vocab_size;
              st.config.bos_token_id = info.bos_id;
              st.config.eos_token_id = info.eos_id;
              // A parallel CPU recipe trains in a group of parties; on GPUs the one stage trainer's backend holds
              // the data-parallel replicas (gpu::backend_for_recipe).
              if (st.recipe.parallelism.any() && st.recipe.device == Device::CPU) {
                if (st.processes.processes > 1) {
                  // Blocks until every process has joined (the group's timeout, then fails the run).
                  PartyProcesses where;
                  where.process_of = spread_parties(st.recipe.parallelism, st.processes.processes);
                  where.process = st.processes.process;
                  where.rendezvous = GlooRendezvous::in_folder(st.processes.rendezvous);
                  where.prefix = "moerl.run";
                  st.group = std::make_shared<PartyGroup>(st.config, st.recipe.parallelism, where);
                } else {
                  st.group = std::make_shared<PartyGroup>(st.config, st.recipe.parallelism);
                }
                for (int p = 0; p < st.group->size(); ++p) {
                  if (!st.group->local(p)) continue;  // another process runs it
                  st.trainers.push_back(spawn_party_trainer(
                      self->system(), PartyTrainerSetup{st.recipe, st.config, info.tokenizer_file, st.group, p}));
                  st.trainer_names.push_back(st.group->name(p));
                }
              } else {
                st.trainers.push_back(spawn_stage_trainer(
                    self->system(), StageTrainerSetup{st.recipe, st.config, info.tokenizer_file, st.backend},
                    kTrainerName));
                st.trainer_names.push_back(kTrainerName);
              }
              for (size_t i = 0; i < st.trainers.size(); ++i) watch(self, st.trainers[i], st.trainer_names[i]);
              ask_trainers<std::string>(
                  self,
                  [self](std::string& device) {
                    self->state.device = device;
                    if (device != "cpu") self->state.summary["device"] = device;
                    start_stage(self);
                  },
                  describe_atom::value);
            });
          },
          failed(self, kLoaderName));
}

// run_recipe's start: the run folder, metrics, then the children.
void start_run(Self self) {
  auto& st = self->state;
  st.run_start = Clock::now();
  fs::create_directories(st.log_dir());
  st.metrics = std::make_unique<MetricsLog>(st.log_dir() / "metrics.jsonl");
  st.summary = {{"recipe", st.recipe.file.string()}, {"name", st.recipe.name},
                {"precision", precision_name(st.recipe.precision)}, {"seed", st.recipe.seed},
                {"stages", nlohmann::json::array()}};
  if (st.recipe.parallelism.any()) st.summary["parallelism"] = parallelism_json(st.recipe.parallelism);
  spawn_children(self);
}

driver_actor::behavior_type driver(Self self, BackendChooser backend, DriverProcesses processes) {
  self->state.backend = std::move(backend);
  self->state.processes = std::move(processes);
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
          require(st.processes.processes == 1 || st.recipe.parallelism.any(),
                  st.recipe.file.string() + ": a run over " + std::to_string(st.processes.processes) +
                      " processes needs parallelism (pipeline, expert, data or tensor > 1) to spread");
          require(st.processes.processes == 1 || st.recipe.device == Device::CPU,
                  st.recipe.file.string() + ": --processes " + std::to_string(st.processes.processes) +
                      ": device: cuda trains its data-parallel replicas as threads of one process (one GPU each); "
                      "run it without --processes");
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

driver_actor spawn_driver(caf::actor_system& system, BackendChooser backend, DriverProcesses processes) {
  return system.spawn(driver, std::move(backend), std::move(processes));
}

ActorRunResult run_recipe_with_actors(const fs::path& recipe_file, const std::vector<std::string>& overrides,
                                      const std::string& out, BackendChooser backend, DriverProcesses processes) {
  caf::actor_system_config config;
  add_message_types(config);
  caf::actor_system system{config};
  const driver_actor d = spawn_driver(system, std::move(backend), std::move(processes));
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
