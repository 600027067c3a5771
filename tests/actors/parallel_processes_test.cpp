// `moerl run --processes 2`: one recipe's parallel parties in two `moerl run` processes on loopback (tensors
// between them over Gloo), against the same group in one process: the same per-step metrics, bit for bit,
// logged by both processes, and process 0's checkpoint holding every party's weights.
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

TEST(ParallelProcesses, PipelineTimesExpertRunInTwoProcessesFollowsTheOneProcessRun) {
  expect_two_processes_follow_one("pp", {"parallelism.pipeline=2", "parallelism.expert=2", "parallelism.micro_batches=2"});
}

TEST(ParallelProcesses, DataTimesTensorRunInTwoProcessesFollowsTheOneProcessRun) {
  expect_two_processes_follow_one("dp", {"model.num_nextn_predict_layers=0", "parallelism.data=2", "parallelism.tensor=2"});
}

}  // namespace
}  // namespace moerl::actors
