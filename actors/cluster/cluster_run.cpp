#include "actors/cluster/cluster_run.hpp"

#include <cmath>
#include <map>
#include <memory>

#include "actors/cluster/spawner.hpp"
#include "actors/cluster/train_roles.hpp"
#include "runtime/data/loader.hpp"
#include "runtime/data/tokenizer.hpp"
#include "runtime/error.hpp"
#include "runtime/recipe/recipe.hpp"
#include "runtime/train/metrics.hpp"
#include "runtime/train/report.hpp"
#include "runtime/train/run_recipe.hpp"
#include "runtime/util/files.hpp"
#include "runtime/util/progress.hpp"

namespace moerl::cluster {
namespace fs = std::filesystem;
using Json = nlohmann::json;

namespace {

using run_atom = caf::atom_constant<caf::atom("run")>;

struct StageSetup {
  supervisor_actor supervisor;
  RoleSpec loader, trainer;
  std::string stage, precision;
  uint64_t steps = 0;
  std::chrono::milliseconds timeout{120000};
  MetricsLog* metrics = nullptr;
};

enum class Op { Waiting, Position, Fetch, Train, Outcome, Done };

struct Role {
  caf::actor handle;
  uint32_t incarnation = 0;
  bool up = false;
};

// The stage driver: one stage of a run as a state machine over the loader's and the trainer's answers.
// `attempt` numbers every request; an answer to an older attempt (lost to a restart, or already retried) is
// dropped, so each step moves forward once.
struct StageDriverState {
  StageDriverState() = default;  // not an aggregate: CAF would construct it from the actor pointer
  StageSetup setup;
  Role loader, trainer;
  Op op = Op::Waiting;
  uint64_t attempt = 0;
  uint64_t next_step = 1;
  ServedBatch pending;
  std::map<uint64_t, StepResult> results;
  uint64_t written = 0;       // metrics lines written up to this step
  uint32_t recomputed = 0;    // steps trained again after a restart (from the last checkpoint)
  uint32_t restarts = 0;
  int64_t tokens = 0;
  std::unique_ptr<ProgressBar> bar;
  std::chrono::steady_clock::time_point start = std::chrono::steady_clock::now();
  caf::response_promise promise;
};

using driver_pointer = caf::stateful_actor<StageDriverState>*;

void issue(driver_pointer self);

void finish_with(driver_pointer self, caf::error error) {
  auto& st = self->state;
  if (st.op == Op::Done) return;
  st.op = Op::Done;
  st.promise.deliver(std::move(error));
  self->quit();
}

// An answer that is an error: a role that refuses (a cluster error) ends the stage; anything else (timeout,
// a receiver that went down) is retried shortly, unless the role is reported down first.
void on_error(driver_pointer self, uint64_t attempt, const std::string& role, caf::error& e) {
  auto& st = self->state;
  if (attempt != st.attempt || st.op == Op::Done || st.op == Op::Waiting) return;
  if (e.category() == caf::atom("system") && e.code() == static_cast<uint8_t>(caf::sec::runtime_error)) {
    finish_with(self, make_cluster_error(role + ": " + describe(e)));
    return;
  }
  log_line("moerl head: " + role + " did not answer (" + describe(e) + "); asking again");
  self->delayed_send(self, std::chrono::milliseconds(200), retry_atom::value, attempt);
}

void record(driver_pointer self, const StepResult& r) {
  auto& st = self->state;
  if (const auto it = st.results.find(r.step); it != st.results.end()) {
    if (!r.replayed) ++st.recomputed;
    if (it->second.loss != r.loss)
      log_line("moerl head: warning: step " + std::to_string(r.step) + " trained again after a restart gave loss " +
               std::to_string(r.loss) + ", first " + std::to_string(it->second.loss) + " (not deterministic)");
  } else {
    st.results[r.step] = r;
  }
  if (r.step <= st.written) return;
  st.written = r.step;
  st.tokens += r.tokens;
  const double elapsed = std::chrono::duration<double>(std::chrono::steady_clock::now() - st.start).count();
  Json m = {{"stage", st.setup.stage}, {"step", r.step}, {"loss", r.loss}, {"lr", r.lr}, {"grad_norm", r.grad_norm},
            {"tokens", r.tokens}, {"tokens_per_s", static_cast<double>(st.tokens) / std::max(elapsed, 1e-9)},
            {"precision", st.setup.precision}, {"trainer_incarnation", st.trainer.incarnation}};
  if (r.skipped) m["skipped"] = true;
  if (r.mtp_loss != 0) m["mtp_loss"] = r.mtp_loss;
  if (r.balance_loss != 0) m["balance_loss"] = r.balance_loss;
  if (r.load_ratio > 0) m["expert_max_load_ratio"] = r.load_ratio;
  if (r.has_validation) m["validation_loss"] = r.validation_loss;
  st.setup.metrics->write(m);
  char fields[64];
  std::snprintf(fields, sizeof fields, "loss %.3f", r.loss);
  st.bar->update(static_cast<int64_t>(r.step), st.tokens, fields);
}

// Sends the request of the current operation (again).
void issue(driver_pointer self) {
  auto& st = self->state;
  const uint64_t a = ++st.attempt;
  const auto timeout = st.setup.timeout;
  switch (st.op) {
    case Op::Position:
      self->request(st.trainer.handle, timeout, position_atom::value)
          .then(
              [self, a](uint64_t applied) {
                auto& st = self->state;
                if (a != st.attempt || st.op != Op::Position) return;
                st.next_step = applied + 1;
                st.op = applied >= st.setup.steps ? Op::Outcome : Op::Fetch;
                if (applied > 0 && applied < st.setup.steps)
                  log_line("moerl head: stage " + st.setup.stage + " continues at step " +
                           std::to_string(st.next_step) + " (the trainer's checkpoint)");
                issue(self);
              },
              [self, a](caf::error& e) { on_error(self, a, "trainer", e); });
      break;
    case Op::Fetch:
      self->request(st.loader.handle, timeout, batch_atom::value, st.next_step)
          .then(
              [self, a](const ServedBatch& b) {
                auto& st = self->state;
                if (a != st.attempt || st.op != Op::Fetch) return;
                st.pending = b;
                st.op = Op::Train;
                issue(self);
              },
              [self, a](caf::error& e) { on_error(self, a, "loader", e); });
      break;
    case Op::Train:
      self->request(st.trainer.handle, timeout, train_atom::value, st.pending)
          .then(
              [self, a](const StepResult& r) {
                auto& st = self->state;
                if (a != st.attempt || st.op != Op::Train) return;
                record(self, r);
                st.next_step = r.step + 1;
                st.op = r.step >= st.setup.steps ? Op::Outcome : Op::Fetch;
                issue(self);
              },
              [self, a](caf::error& e) { on_error(self, a, "trainer", e); });
      break;
    case Op::Outcome:
      self->request(st.trainer.handle, timeout, outcome_atom::value)
          .then(
              [self, a](const std::string& outcome) {
                auto& st = self->state;
                if (a != st.attempt || st.op != Op::Outcome) return;
                Json o = Json::parse(outcome);
                o["restarts"] = st.restarts;
                o["recomputed_steps"] = st.recomputed;
                st.bar->finish("loss " + std::to_string(o.value("train_loss", 0.0)));
                st.op = Op::Done;
                st.promise.deliver(o.dump());
                self->quit();
              },
              [self, a](caf::error& e) { on_error(self, a, "trainer", e); });
      break;
    case Op::Waiting:
    case Op::Done:
      break;
  }
}

// Both roles up after a start or a restart: ask the trainer where it stands.
void resume_if_ready(driver_pointer self) {
  auto& st = self->state;
  if (st.op != Op::Waiting || !st.loader.up || !st.trainer.up) return;
  st.op = Op::Position;
  issue(self);
}

Role* role_named(driver_pointer self, const std::string& name) {
  auto& st = self->state;
  if (name == st.setup.loader.name) return &st.loader;
  if (name == st.setup.trainer.name) return &st.trainer;
  return nullptr;
}

void role_is_up(driver_pointer self, const std::string& name, const caf::actor& handle, uint32_t incarnation) {
  Role* role = role_named(self, name);
  if (!role || incarnation < role->incarnation || (incarnation == role->incarnation && role->up)) return;
  role->handle = handle;
  role->incarnation = incarnation;
  role->up = true;
  resume_if_ready(self);
}

caf::behavior stage_driver(driver_pointer self, StageSetup setup) {
  self->state.setup = std::move(setup);
  self->state.bar = std::make_unique<ProgressBar>(self->state.setup.stage, static_cast<int64_t>(self->state.setup.steps));
  return {
      [self](run_atom) -> caf::response_promise {
        auto& st = self->state;
        st.promise = self->make_response_promise();
        self->send(st.setup.supervisor, subscribe_atom::value, caf::actor_cast<caf::actor>(self));
        for (const RoleSpec* spec : {&st.setup.loader, &st.setup.trainer}) {
          const std::string name = spec->name;
          self->request(st.setup.supervisor, caf::infinite, place_atom::value, *spec)
              .then([self, name](const caf::actor& h, uint32_t inc) { role_is_up(self, name, h, inc); },
                    [self](caf::error& e) { finish_with(self, e); });
        }
        return st.promise;
      },
      [self](role_up_atom, const std::string& name, const caf::actor& handle, uint32_t inc, const std::string&) {
        role_is_up(self, name, handle, inc);
      },
      [self](role_down_atom, const std::string& name, uint32_t inc, const std::string&) {
        auto& st = self->state;
        Role* role = role_named(self, name);
        if (!role || inc != role->incarnation || !role->up || st.op == Op::Done) return;
        role->up = false;
        ++st.restarts;
        st.op = Op::Waiting;
        ++st.attempt;  // whatever is in flight is lost
      },
      [self](role_fail_atom, const std::string& name, const std::string& reason) {
        if (role_named(self, name)) finish_with(self, make_cluster_error("role " + name + " failed: " + reason));
      },
      [self](retry_atom, uint64_t attempt) {
        if (attempt == self->state.attempt && self->state.op != Op::Waiting) issue(self);
      },
  };
}

// The run folder's tokenizer, trained on the train split as run_recipe does (or the one already there).
void prepare_tokenizer(const Recipe& recipe) {
  const fs::path file = recipe.out / Tokenizer::kFileName;
  if (fs::exists(file)) return;
  const std::vector<std::string> texts = load_corpus(recipe.data);
  const DocumentSplit split = split_documents(texts.size(), static_cast<size_t>(recipe.data.validation_every));
  require(!split.train.empty() && !split.validation.empty(),
          "the corpus has " + std::to_string(texts.size()) + " documents: too few for a train/validation split");
  std::vector<std::string> train;
  for (size_t i : split.train) train.push_back(texts[i]);
  Tokenizer::train(train, static_cast<int>(recipe.data.vocab_size)).save(recipe.out);
}

}  // namespace

Json run_on_cluster(caf::actor_system& system, const supervisor_actor& supervisor, const ClusterRunOptions& options) {
  const auto t0 = std::chrono::steady_clock::now();
  const fs::path recipe_file = fs::absolute(options.recipe);
  std::vector<std::string> overrides = options.overrides;
  Recipe recipe = load_recipe(recipe_file, overrides);
  // Roles read the recipe on their own nodes, maybe from another working folder: pin relative data paths.
  if (recipe.data.dir.is_relative()) overrides.push_back("data.dir=" + fs::absolute(recipe.data.dir).string());
  if (recipe.data.corpus != "brown" && fs::path(recipe.data.corpus).is_relative())
    overrides.push_back("data.corpus=" + fs::absolute(recipe.data.corpus).string());
  recipe = load_recipe(recipe_file, overrides);
  recipe.out = fs::absolute(options.out.empty() ? recipe.out : options.out);
  for (const StageSpec& s : recipe.stages)
    require(s.kind == "pretrain", recipe_file.string() + ": stage " + s.name + " is " + s.kind +
                                      "; cluster runs train pretraining stages only (for now)");
  fs::create_directories(recipe.out);
  prepare_tokenizer(recipe);
  MetricsLog metrics(recipe.out / "metrics.jsonl");

  Json summary = {{"recipe", recipe_file.string()}, {"name", recipe.name},
                  {"precision", std::string(precision_name(recipe.precision))}, {"seed", recipe.seed},
                  {"cluster", true}, {"stages", Json::array()}};
  caf::scoped_actor self{system};
  for (size_t i = 0; i < recipe.stages.size(); ++i) {
    const StageSpec& stage = recipe.stages[i];
    const Json config = {{"recipe", recipe_file.string()}, {"overrides", overrides}, {"stage", i},
                         {"out", recipe.out.string()}};
    StageSetup setup;
    setup.supervisor = supervisor;
    setup.loader = RoleSpec{"loader." + stage.name, "cluster.loader", options.placement.node_for("loader"),
                            config.dump()};
    setup.trainer = RoleSpec{"trainer." + stage.name, "cluster.trainer", options.placement.node_for("trainer"),
                             config.dump()};
    setup.stage = stage.name;
    setup.precision = std::string(precision_name(recipe.precision));
    setup.steps = static_cast<uint64_t>(stage.steps);
    setup.timeout = options.request_timeout;
    setup.metrics = &metrics;
    const caf::actor driver = system.spawn(stage_driver, setup);
    std::string outcome, failure;
    self->request(driver, caf::infinite, run_atom::value)
        .receive([&](const std::string& o) { outcome = o; }, [&](caf::error& e) { failure = describe(e); });
    for (const RoleSpec* spec : {&setup.loader, &setup.trainer})
      self->request(supervisor, std::chrono::seconds(10), retire_atom::value, spec->name)
          .receive([](bool) {}, [](caf::error&) {});
    require(failure.empty(), "stage " + stage.name + ": " + failure);
    Json s = Json::parse(outcome);
    s["kind"] = stage.kind;
    s["checkpoint"] = (recipe.out / stage.name).string();
    s.erase("validation_curve");
    summary["stages"].push_back(s);
    metrics.write({{"event", "stage_done"}, {"summary", s}});
  }
  summary["wall_s"] = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  write_file_durably(recipe.out / "summary.json", summary.dump(2) + "\n");
  write_html_report(recipe.out, summary);  // report.html, report.txt, the table on stderr
  return summary;
}

}  // namespace moerl::cluster
