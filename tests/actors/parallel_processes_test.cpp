// `moerl run --processes 2`: one recipe's parallel parties in two `moerl run` processes on loopback (tensors
// between them over Gloo), against the same group in one process: the same per-step metrics, bit for bit,
// logged by both processes, and process 0's checkpoint holding every party's weights. Launched by one
// `moerl run --processes 2` (no --process), a run survives a process killed with SIGKILL: all are launched
// again from the newest checkpoint and end where the undisturbed run ends.
#include <fcntl.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstring>
#include <fstream>
#include <thread>

#include "runtime/safetensors.hpp"
#include "tests/actors/driver_support.hpp"
#include "tests/support/reap.hpp"

namespace moerl::actors {
namespace {

using namespace moerl::actors::testing;
using Clock = std::chrono::steady_clock;

// Starts `moerl ARGS...` with its output in `log`.
pid_t start_moerl(std::vector<std::string> args, const fs::path& log) {
  args.insert(args.begin(), MOERL_BINARY);
  std::vector<char*> argv;
  for (std::string& a : args) argv.push_back(a.data());
  argv.push_back(nullptr);
  const std::string log_file = log.string();
  const pid_t child = fork();
  if (child == 0) {  // async-signal-safe calls only until exec
    const int fd = ::open(log_file.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
    if (fd >= 0) {
      dup2(fd, 1);
      dup2(fd, 2);
    }
    alarm(300);  // kept across exec: a last resort should the test vanish
    execv(argv[0], argv.data());
    _exit(127);
  }
  return child;
}

// The exit code of `child` once it ends within `limit`; -1 (after SIGKILL) when it does not.
int exit_code(pid_t child, Clock::time_point deadline) {
  const std::optional<int> reaped = test::reap_by(child, deadline);
  if (!reaped) return -1;
  const int status = *reaped;
  return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
}

std::string text_of(const fs::path& file) {
  std::ifstream in(file);
  return std::string((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
}

void expect_two_processes_follow_one(const std::string& name, const std::vector<std::string>& overrides) {
  const fs::path dir = fresh_dir("par-procs-" + name);
  const RemoveAtExit cleanup{dir};
  const fs::path file = write_recipe(dir, 8, 0, 4);
  run_recipe_with_actors(file, overrides, (dir / "one").string());

  const auto deadline = Clock::now() + std::chrono::seconds(120);
  std::vector<pid_t> children;
  for (int i = 0; i < 2; ++i) {
    std::vector<std::string> args = {"run", file.string(), "--out", (dir / "two").string(), "--processes", "2",
                                     "--process", std::to_string(i), "--rendezvous", (dir / "rendezvous").string()};
    for (const std::string& o : overrides) args.insert(args.end(), {"--set", o});
    children.push_back(start_moerl(args, dir / ("process-" + std::to_string(i) + ".log")));
    ASSERT_GT(children.back(), 0) << std::strerror(errno);
  }
  for (int i = 0; i < 2; ++i) {
    const fs::path log = dir / ("process-" + std::to_string(i) + ".log");
    EXPECT_EQ(exit_code(children[i], deadline), 0) << "process " << i << " (-1: still running after 120 s):\n"
                                                    << text_of(log);
  }

  const auto want = step_metrics(dir / "one" / "metrics.jsonl");
  ASSERT_EQ(want.size(), 8u);
  for (const fs::path& log : {dir / "two" / "metrics.jsonl", dir / "two" / "process-1" / "metrics.jsonl"}) {
    const auto got = step_metrics(log);
    ASSERT_EQ(got.size(), want.size()) << log;
    for (size_t i = 0; i < want.size(); ++i)
      for (const char* k : {"loss", "mtp_loss", "balance_loss", "grad_norm", "validation_loss"}) {
        if (!want[i].contains(k)) continue;
        // The same arithmetic on the same bytes: only the transport between the parties differs.
        EXPECT_EQ(got[i].value(k, -1.0), want[i][k].get<double>()) << log << ": " << k << " step " << i + 1;
      }
  }
  const SafeTensors a = read_safetensors(dir / "one" / "pretrain" / "model.safetensors");
  const SafeTensors b = read_safetensors(dir / "two" / "pretrain" / "model.safetensors");
  ASSERT_EQ(a.tensors.size(), b.tensors.size());
  for (const auto& [key, t] : a.tensors) {
    ASSERT_TRUE(b.tensors.count(key)) << key;
    ASSERT_EQ(b.tensors.at(key).nbytes(), t.nbytes()) << key;
    EXPECT_EQ(std::memcmp(b.tensors.at(key).bytes(), t.bytes(), t.nbytes()), 0) << key;
  }
}

const std::vector<std::string> kPipelineTimesExpert = {"parallelism.pipeline=2", "parallelism.expert=2",
                                                       "parallelism.micro_batches=2"};

struct Launched {
  int exit_code = -1;
  std::string output;       // the launcher's stdout and stderr (process 0's included), then process 1's log
  nlohmann::json pids;      // <out>/launch/pids.json at the end: the last attempt
};

// `moerl run RECIPE --out OUT --processes 2 --restarts R` with process 1 killed (SIGKILL) once process 0 has
// logged `kill_after` steps.
Launched launch_and_kill_process_1(const fs::path& dir, const fs::path& recipe, const fs::path& out, int restarts,
                                   size_t kill_after) {
  std::vector<std::string> args = {"run", recipe.string(), "--out", out.string(), "--processes", "2",
                                   "--restarts", std::to_string(restarts)};
  for (const std::string& o : kPipelineTimesExpert) args.insert(args.end(), {"--set", o});
  const fs::path log = dir / "launcher.log";
  const pid_t launcher = start_moerl(args, log);
  const auto deadline = Clock::now() + std::chrono::seconds(120);
  bool killed = false;
  auto launcher_running = [launcher] {  // WNOWAIT: an ended launcher stays reapable for exit_code()
    siginfo_t info{};
    return waitid(P_PID, static_cast<id_t>(launcher), &info, WEXITED | WNOHANG | WNOWAIT) == 0 && info.si_pid == 0;
  };
  while (!killed && Clock::now() < deadline && launcher_running()) {
    if (step_metrics(out / "metrics.jsonl").size() >= kill_after) {
      const auto pids = nlohmann::json::parse(text_of(out / "launch" / "pids.json"), nullptr, false);
      if (!pids.is_discarded()) killed = kill(pids["pids"][1].get<pid_t>(), SIGKILL) == 0;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
  EXPECT_TRUE(killed) << "process 1 was never killed:\n" << text_of(log);
  Launched r;
  r.exit_code = exit_code(launcher, deadline);
  r.output = text_of(log) + "\n--- " + (out / "launch" / "process-1.log").string() + " ---\n" +
             text_of(out / "launch" / "process-1.log");
  r.pids = nlohmann::json::parse(text_of(out / "launch" / "pids.json"), nullptr, false);
  return r;
}

TEST(ParallelProcesses, ALaunchedRunRelaunchesAfterAKilledProcessAndEndsAsTheUndisturbedRun) {
  const fs::path dir = fresh_dir("par-procs-launch");
  const RemoveAtExit cleanup{dir};
  const fs::path file = write_recipe(dir, 40, 0, 4);
  run_recipe_with_actors(file, kPipelineTimesExpert, (dir / "one").string());

  const Launched r = launch_and_kill_process_1(dir, file, dir / "two", 3, 10);
  ASSERT_EQ(r.exit_code, 0) << r.output;
  EXPECT_NE(r.output.find("process 1 failed (killed by signal 9"), std::string::npos) << r.output;
  EXPECT_EQ(r.pids.value("attempt", -1), 1) << "one relaunch after the kill:\n" << r.output;
  EXPECT_NE(r.output.find("resuming from"), std::string::npos) << "the relaunch resumes from a checkpoint:\n"
                                                                << r.output;
  // Resuming is exact (weights, optimizer and loader position from the checkpoint): the last step and the
  // final weights equal the undisturbed run's bit for bit.
  const auto want = step_metrics(dir / "one" / "metrics.jsonl");
  const auto got = step_metrics(dir / "two" / "metrics.jsonl");
  ASSERT_EQ(want.size(), 40u);
  ASSERT_FALSE(got.empty());
  EXPECT_EQ(got.back().value("step", -1), 40);
  EXPECT_EQ(got.back().value("loss", -1.0), want.back()["loss"].get<double>());
  const SafeTensors a = read_safetensors(dir / "one" / "pretrain" / "model.safetensors");
  const SafeTensors b = read_safetensors(dir / "two" / "pretrain" / "model.safetensors");
  ASSERT_EQ(a.tensors.size(), b.tensors.size());
  for (const auto& [key, t] : a.tensors) {
    ASSERT_TRUE(b.tensors.count(key)) << key;
    EXPECT_EQ(std::memcmp(b.tensors.at(key).bytes(), t.bytes(), t.nbytes()), 0) << key;
  }
}

TEST(ParallelProcesses, ALaunchedRunWithNoRestartsLeftFailsNamingTheDeadProcess) {
  const fs::path dir = fresh_dir("par-procs-launch-fail");
  const RemoveAtExit cleanup{dir};
  const fs::path file = write_recipe(dir, 40, 0, 4);
  const Launched r = launch_and_kill_process_1(dir, file, dir / "two", 0, 6);
  EXPECT_EQ(r.exit_code, 1) << r.output;
  EXPECT_NE(r.output.find("process 1 failed (killed by signal 9"), std::string::npos) << r.output;
  EXPECT_NE(r.output.find("no restarts left"), std::string::npos) << r.output;
  EXPECT_EQ(r.pids.value("attempt", -1), 0);
}

TEST(ParallelProcesses, PipelineTimesExpertRunInTwoProcessesFollowsTheOneProcessRun) {
  expect_two_processes_follow_one("pp", kPipelineTimesExpert);
}

TEST(ParallelProcesses, DataTimesTensorRunInTwoProcessesFollowsTheOneProcessRun) {
  expect_two_processes_follow_one("dp", {"model.num_nextn_predict_layers=0", "parallelism.data=2", "parallelism.tensor=2"});
}

}  // namespace
}  // namespace moerl::actors
