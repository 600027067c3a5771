// Parties spread over two processes (PartyGroup with PartyProcesses), against the same group in one process
// and the single model: PP=2 x EP=2 (channels between processes over Gloo, the board by allgather) and
// DP=2 x TP=2 (a replica per process, the data groups over Gloo); the checkpoint gathered to process 0. The
// second process is this test binary again (exec), running the helper test below with the run's folder and
// scenario in its environment.
#include <gtest/gtest.h>
#include <omp.h>

#include <fcntl.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <random>
#include <thread>

#include "runtime/error.hpp"
#include "runtime/optim/adamw.hpp"
#include "runtime/parallel/party.hpp"
#include "runtime/safetensors.hpp"
#include "tests/support/scratch_dir.hpp"
#include "tests/support/reap.hpp"
#include "tests/runtime/pp_ep_model.hpp"

extern char** environ;

namespace moerl {
namespace {

namespace fs = std::filesystem;
using Clock = std::chrono::steady_clock;

constexpr char kDirVariable[] = "MOERL_PARTY_PROCESS_DIR";  // set for the helper process only
constexpr char kScenarioVariable[] = "MOERL_PARTY_PROCESS_SCENARIO";  // "pp" or "dp"
constexpr char kHelper[] = "PartyProcesses.HelperRunsProcessOneWhenStartedByTheTwoProcessTest";
constexpr uint64_t kSeed = 11;
constexpr float kBiasGamma = 0.01f;
constexpr int kSteps = 4;
constexpr auto kTimeout = std::chrono::seconds(30);  // any wait for a peer (then the run fails)


// One parallel layout and where its parties run.
struct Scenario {
  std::string name;  // "pp", "dp"
  ModelConfig config;
  ParallelSpec spec;
  std::vector<int> process_of;  // [party] -> process
  ForwardOptions options;
};

Scenario scenario(const std::string& name) {
  Scenario s{name, test::pp_ep_model_config(), {}, {}, {}};
  s.options.mtp_weight = 0.3f;
  s.options.balance_alpha = 0.01f;
  if (name == "pp") {
    s.spec.pipeline = 2;
    s.spec.expert = 2;
    s.spec.micro_batches = 2;  // 1F1B with a micro-batch in flight on stage 0
    // Parties 0, 1: stages; 2, 3: stage 0's shards; 4, 5: stage 1's. Alternating, so every kind of channel
    // (activations, gradients, embedding copy, expert requests and replies) crosses the processes and some
    // expert links stay in-process.
    s.process_of = {0, 1, 0, 1, 0, 1};
  } else {
    s.config.num_nextn_predict_layers = 0;  // tensor parallelism has no MTP module
    s.options.mtp_weight = 0;
    // A replica's balance loss is the whole batch's only with even token counts per slice, which the ignored
    // labels break (parallel_dp_tp_test.cpp runs DP without it too).
    s.options.balance_alpha = 0;
    s.spec.data = 2;
    s.spec.tensor = 2;
    s.process_of = {0, 0, 1, 1};  // party d·2 + t: a replica (its tensor group) per process
  }
  return s;
}

PartyProcesses processes(const Scenario& s, const fs::path& dir, int me) {
  PartyProcesses p;
  p.process_of = s.process_of;
  p.process = me;
  p.rendezvous = GlooRendezvous::in_folder(dir / "rendezvous");
  p.prefix = s.name;
  return p;
}

struct Tokens {
  std::vector<int64_t> ids, labels;
  TokenBatch view() const { return {ids.data(), labels.data(), 4, 8}; }
};

// Step `step`'s batch: 4 sequences of 8, about one label in six ignored.
Tokens batch(int step) {
  std::mt19937_64 rng(100 + static_cast<uint64_t>(step));
  Tokens t;
  for (int i = 0; i < 32; ++i) {
    t.ids.push_back(static_cast<int64_t>(rng() % 64));
    t.labels.push_back(rng() % 6 == 0 ? kIgnoreLabel : static_cast<int64_t>(rng() % 64));
  }
  return t;
}

AdamWConfig adamw_config() {
  AdamWConfig a;
  a.lr = 3e-3;
  a.total_steps = 10;
  a.clip_grad_norm = 1.0;  // below this init's norms: every step clips through the global norm
  return a;
}

struct RunTrace {
  std::vector<LossReport> losses;
  std::vector<double> grad_norms;
};

// Runs this process's parties of `g` on one thread each (one OpenMP thread, as LocalPipeline's parties) for
// kSteps steps, then writes a checkpoint to `checkpoint`. Every party reports the same results: party 0's (or
// this process's first party's) are returned. Party `fail` (if any) throws before its step 1; a failing party
// aborts the group, as the party trainer actors do, and the first error (in party order) is rethrown.
RunTrace run_parties(PartyGroup& g, const ForwardOptions& o, const fs::path& checkpoint, int fail = -1) {
  Model init(g.config());
  init.init_random(kSeed);
  std::vector<RunTrace> runs(static_cast<size_t>(g.size()));
  std::vector<std::string> errors(static_cast<size_t>(g.size()));
  std::vector<std::thread> threads;
  for (int p = 0; p < g.size(); ++p) {
    if (!g.local(p)) continue;
    threads.emplace_back([&, p] {
      try {
        omp_set_num_threads(1);
        std::unique_ptr<Party> party = g.make(p);
        party->start_stage(adamw_config());
        party->load_weights(init.params());
        for (int step = 0; step < kSteps; ++step) {
          if (p == fail && step == 1) throw Error("injected failure");
          const Tokens t = batch(step);
          const PartyStep r = party->train_step(t.view(), o, step, kBiasGamma);
          runs[p].losses.push_back(r.loss);
          runs[p].grad_norms.push_back(r.stats.grad_norm);
        }
        g.checkpoint(p, *party, checkpoint, nullptr, nlohmann::json{{"step", kSteps}});
      } catch (const std::exception& e) {
        errors[p] = e.what();
        g.abort(g.name(p) + " failed: " + e.what());
      }
    });
  }
  for (auto& t : threads) t.join();
  for (const std::string& e : errors)
    if (!e.empty()) throw Error(e);
  int first = 0;
  while (!g.local(first)) ++first;
  for (int p = first + 1; p < g.size(); ++p) {
    if (!g.local(p)) continue;
    for (int step = 0; step < kSteps; ++step) {
      EXPECT_EQ(runs[p].losses[step].total, runs[first].losses[step].total) << g.name(p) << " step " << step;
      EXPECT_EQ(runs[p].grad_norms[step], runs[first].grad_norms[step]) << g.name(p) << " step " << step;
    }
  }
  return runs[first];
}

// The single model on one OpenMP thread (the parties' count, so OpenBLAS picks the same kernels).
RunTrace train_single(const ModelConfig& c, const ForwardOptions& o) {
  const int threads = omp_get_max_threads();
  omp_set_num_threads(1);
  Model model(c);
  model.init_random(kSeed);
  AdamW optimizer(model.params(), adamw_config());
  RunTrace run;
  for (int step = 0; step < kSteps; ++step) {
    const Tokens t = batch(step);
    model.params().zero_grad();
    run.losses.push_back(model.forward(t.view(), o));
    model.backward();
    run.grad_norms.push_back(optimizer.step(step).grad_norm);
    model.update_router_bias(kBiasGamma);
  }
  omp_set_num_threads(threads);
  return run;
}

// Starts this binary running only kHelper, with `dir` and `scenario` in its environment and its output in dir/helper.log.
pid_t start_helper(const fs::path& dir, const std::string& scenario) {
  // Everything exec needs is built before fork: the child only calls async-signal-safe functions.
  std::vector<std::string> env;
  for (char** e = environ; *e != nullptr; ++e) env.emplace_back(*e);
  env.push_back(std::string(kDirVariable) + "=" + dir.string());
  env.push_back(std::string(kScenarioVariable) + "=" + scenario);
  std::vector<char*> envp;
  for (std::string& e : env) envp.push_back(e.data());
  envp.push_back(nullptr);
  std::string self = fs::read_symlink("/proc/self/exe").string();
  std::string filter = std::string("--gtest_filter=") + kHelper;
  char* argv[] = {self.data(), filter.data(), nullptr};
  const std::string log = (dir / "helper.log").string();
  const pid_t child = fork();
  if (child == 0) {
    const int fd = ::open(log.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
    if (fd >= 0) {
      dup2(fd, 1);
      dup2(fd, 2);
    }
    alarm(120);  // kept across exec: a last resort should the parent vanish
    execve(self.c_str(), argv, envp.data());
    _exit(127);
  }
  return child;
}

// Waits up to `limit` for the child; kills it after that. Returns its wait status, or -1 when it was killed.
int reap(pid_t child, std::chrono::seconds limit) {
  return test::reap_by(child, Clock::now() + limit).value_or(-1);
}

double rel(double a, double b) { return std::abs(a - b) / std::abs(b); }

TEST(PartyProcesses, HelperRunsProcessOneWhenStartedByTheTwoProcessTest) {
  const char* dir = std::getenv(kDirVariable);
  const char* name = std::getenv(kScenarioVariable);
  if (dir == nullptr || name == nullptr) GTEST_SKIP() << "process 1 of PartyProcesses.TwoProcesses..., started by them";
  if (std::string(name) == "pp-fail") {
    // Stage 1 fails before step 1: its process aborts, its Gloo channel ends send the reason to process 0.
    const Scenario sc = scenario("pp");
    PartyGroup g(sc.config, sc.spec, processes(sc, dir, 1), kTimeout);
    EXPECT_THROW(run_parties(g, sc.options, fs::path(dir) / "checkpoint", 1), Error);
    return;
  }
  const Scenario sc = scenario(name);
  PartyGroup g(sc.config, sc.spec, processes(sc, dir, 1), kTimeout);
  run_parties(g, sc.options, fs::path(dir) / "checkpoint");  // process 0 writes it
}

// The local test of a failing stage (Pipeline.AFailingStageReleasesItsPeersAndReportsTheCause) across
// processes: process 1's stage fails, and every party of process 0 stops within seconds — not the 30 s
// timeout — with an error carrying the cause.
TEST(PartyProcesses, AStageFailingInOneProcessReleasesTheOtherProcessWithTheCause) {
  test::ScratchDir dir("moerl-parties");
  const Scenario sc = scenario("pp");
  const pid_t helper = start_helper(dir.path, "pp-fail");
  ASSERT_GT(helper, 0) << std::strerror(errno);
  std::string error;
  PartyGroup g(sc.config, sc.spec, processes(sc, dir.path, 0), kTimeout);
  const auto start = Clock::now();
  try {
    run_parties(g, sc.options, dir.path / "checkpoint");
  } catch (const Error& e) {
    error = e.what();
  }
  const auto waited = Clock::now() - start;
  const int status = reap(helper, std::chrono::seconds(60));
  std::ifstream log(dir.path / "helper.log");
  const std::string helper_log((std::istreambuf_iterator<char>(log)), std::istreambuf_iterator<char>());
  std::printf("[ measured ] process 0 stopped %.0f ms after it started, with: %s\n",
              std::chrono::duration<double, std::milli>(waited).count(), error.c_str());
  EXPECT_NE(error.find("stage_trainer/1 failed: injected failure"), std::string::npos) << error;
  EXPECT_LT(waited, std::chrono::seconds(15)) << "waited for the timeout instead";
  ASSERT_NE(status, -1) << "the helper process did not finish within 60 s:\n" << helper_log;
  EXPECT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 0) << "helper process failed:\n" << helper_log;
}

// Runs scenario `name` three ways (single model, the group in one process, the group in two) and compares
// the per-step losses and norms and the checkpoints.
void expect_two_processes_follow_one(const std::string& name) {
  const Scenario sc = scenario(name);
  test::ScratchDir dir("moerl-parties");
  const RunTrace single = train_single(sc.config, sc.options);
  PartyGroup in_process(sc.config, sc.spec, kTimeout);
  const RunTrace local = run_parties(in_process, sc.options, dir.path / "in-process");

  const pid_t helper = start_helper(dir.path, name);
  ASSERT_GT(helper, 0) << std::strerror(errno);
  std::string error;
  RunTrace spread;
  try {
    PartyGroup g(sc.config, sc.spec, processes(sc, dir.path, 0), kTimeout);
    spread = run_parties(g, sc.options, dir.path / "two-processes");
  } catch (const Error& e) {
    error = e.what();
  }
  const int status = reap(helper, std::chrono::seconds(60));
  std::ifstream log(dir.path / "helper.log");
  const std::string helper_log((std::istreambuf_iterator<char>(log)), std::istreambuf_iterator<char>());
  ASSERT_EQ(error, "");
  ASSERT_NE(status, -1) << "the helper process did not finish within 60 s:\n" << helper_log;
  ASSERT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 0) << "helper process failed:\n" << helper_log;

  ASSERT_EQ(spread.losses.size(), static_cast<size_t>(kSteps));
  EXPECT_NE(helper_log.find("[       OK ] PartyProcesses.Helper"), std::string::npos) << helper_log;  // not skipped
  double worst = 0;
  for (int step = 0; step < kSteps; ++step) {
    // The same arithmetic on the same bytes as the in-process group: only the transport differs.
    EXPECT_EQ(spread.losses[step].loss, local.losses[step].loss) << "step " << step;
    EXPECT_EQ(spread.losses[step].mtp_loss, local.losses[step].mtp_loss) << "step " << step;
    EXPECT_EQ(spread.losses[step].balance_loss, local.losses[step].balance_loss) << "step " << step;
    EXPECT_EQ(spread.grad_norms[step], local.grad_norms[step]) << "step " << step;
    std::printf("[ measured ] %s step %d: loss %.9g, single model %.9g, relative %.3g; grad norm %.9g, single %.9g\n",
                name.c_str(), step, spread.losses[step].loss, single.losses[step].loss, rel(spread.losses[step].loss, single.losses[step].loss), spread.grad_norms[step], single.grad_norms[step]);
    worst = std::max(worst, rel(spread.losses[step].loss, single.losses[step].loss));
    if (single.losses[step].mtp_loss != 0)
      worst = std::max(worst, rel(spread.losses[step].mtp_loss, single.losses[step].mtp_loss));
  }
  // PP: two micro-batches add each weight gradient in two parts; DP x TP: partial attention outputs summed
  // over tensor ranks, gradients over replicas. FP32 rounding against the single model, which the steps
  // amplify; the bound is 1e-5 relative per step.
  std::printf("%s over two processes vs the single model: max relative loss difference %.3g\n",
              name == "pp" ? "PP=2 x EP=2" : "DP=2 x TP=2", worst);
  EXPECT_LE(worst, 1e-5);

  // Process 0 wrote the checkpoint with every party's weights and moments: the in-process group's, byte for byte.
  std::vector<std::string> files = {"model.safetensors"};
  if (name == "pp") files.push_back("optimizer.safetensors");
  for (int d = 0; name == "dp" && d < 2; ++d)
    for (int t = 0; t < 2; ++t) files.push_back("optimizer.rank" + std::to_string(d) + "." + std::to_string(t) + ".safetensors");
  for (const std::string& file : files) {
    const SafeTensors a = read_safetensors(dir.path / "in-process" / file);
    const SafeTensors b = read_safetensors(dir.path / "two-processes" / file);
    ASSERT_EQ(a.tensors.size(), b.tensors.size()) << file;
    for (const auto& [key, t] : a.tensors) {
      ASSERT_TRUE(b.tensors.count(key)) << file << ": " << key;
      const Tensor& u = b.tensors.at(key);
      ASSERT_EQ(u.nbytes(), t.nbytes()) << key;
      EXPECT_EQ(std::memcmp(u.bytes(), t.bytes(), t.nbytes()), 0) << file << ": " << key;
    }
  }
}


TEST(PartyProcesses, PipelineTimesExpertInTwoProcessesFollowsTheInProcessGroupBitForBitAndTheSingleModel) {
  expect_two_processes_follow_one("pp");
}

TEST(PartyProcesses, DataTimesTensorInTwoProcessesFollowsTheInProcessGroupBitForBitAndTheSingleModel) {
  expect_two_processes_follow_one("dp");
}

}  // namespace
}  // namespace moerl
