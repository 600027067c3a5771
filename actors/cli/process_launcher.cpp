#include "actors/cli/process_launcher.hpp"

#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <csignal>
#include <cstdio>
#include <cstring>
#include <thread>

#include <nlohmann/json.hpp>

#include "runtime/error.hpp"
#include "runtime/util/files.hpp"
#include "runtime/util/spawn.hpp"

namespace moerl::cli {
namespace fs = std::filesystem;
using Clock = std::chrono::steady_clock;

namespace {

volatile std::sig_atomic_t g_stop_signal = 0;
void on_stop_signal(int sig) { g_stop_signal = sig; }

std::string describe_status(int status) {
  if (WIFEXITED(status)) return "exit code " + std::to_string(WEXITSTATUS(status));
  if (WIFSIGNALED(status)) return std::string("killed by signal ") + std::to_string(WTERMSIG(status)) + " (" +
                                  strsignal(WTERMSIG(status)) + ")";
  return "status " + std::to_string(status);
}

// Starts `binary run ARGS --processes N --process I --rendezvous R`; process I > 0 logs to `log`.
pid_t start_process(const LaunchSpec& spec, int index, const fs::path& rendezvous, const fs::path& log) {
  std::vector<std::string> args = {spec.binary.string(), "run"};
  args.insert(args.end(), spec.run_args.begin(), spec.run_args.end());
  args.insert(args.end(), {"--processes", std::to_string(spec.processes), "--process", std::to_string(index),
                           "--rendezvous", rendezvous.string()});
  return spawn_program(args, index > 0 ? log : fs::path{});
}

// SIGTERM to every process still running, SIGKILL to those alive 10 s later; reaps them all.
void stop_all(std::vector<pid_t>& pids) {
  for (pid_t p : pids)
    if (p > 0) kill(p, SIGTERM);
  const auto deadline = Clock::now() + std::chrono::seconds(10);
  for (pid_t& p : pids) {
    if (p <= 0) continue;
    int status = 0;
    while (waitpid(p, &status, WNOHANG) == 0) {
      if (Clock::now() > deadline) {
        kill(p, SIGKILL);
        waitpid(p, &status, 0);
        break;
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(10));
    }
    p = -1;
  }
}

}  // namespace

int launch_processes(const LaunchSpec& spec) {
  require(spec.processes >= 2, "moerl run --processes: launching needs 2 or more processes");
  const fs::path dir = spec.out / "launch";
  fs::create_directories(dir);
  struct sigaction sa {};
  sa.sa_handler = on_stop_signal;
  sigemptyset(&sa.sa_mask);
  struct sigaction old_int {}, old_term {};
  sigaction(SIGINT, &sa, &old_int);
  sigaction(SIGTERM, &sa, &old_term);
  auto restore = [&] {
    sigaction(SIGINT, &old_int, nullptr);
    sigaction(SIGTERM, &old_term, nullptr);
  };

  for (int attempt = 0; attempt <= spec.restarts; ++attempt) {
    // A fresh rendezvous folder per launch: Gloo's file store must not see the keys of the last one.
    const fs::path rendezvous = dir / ("rendezvous-" + std::to_string(attempt));
    fs::remove_all(rendezvous);
    fs::create_directories(rendezvous);
    std::vector<pid_t> pids;
    nlohmann::json record = {{"attempt", attempt}, {"pids", nlohmann::json::array()}};
    for (int i = 0; i < spec.processes; ++i) {
      pids.push_back(start_process(spec, i, rendezvous, dir / ("process-" + std::to_string(i) + ".log")));
      record["pids"].push_back(pids.back());
    }
    write_file_durably(dir / "pids.json", record.dump() + "\n");
    std::fprintf(stderr, "moerl run: launch %d: %d processes started (process I > 0 logs to %s/process-I.log)\n",
                 attempt + 1, spec.processes, dir.c_str());

    // Wait until all end well, or one fails; then give the others a moment to end by themselves (a peer of a
    // dead process fails too, at once: its data-plane connections break) and blame the first that died from a
    // signal (a crash or a kill), else the first that failed.
    int running = spec.processes, failed = -1, failed_status = 0;
    Clock::time_point grace_end = Clock::time_point::max();
    std::vector<std::pair<int, int>> failures;  // (process, wait status) in the order they ended
    while (running > 0 && Clock::now() < grace_end && g_stop_signal == 0) {
      int status = 0;
      const pid_t done = waitpid(-1, &status, WNOHANG);
      if (done <= 0) {
        std::this_thread::sleep_for(std::chrono::milliseconds(20));
        continue;
      }
      for (int i = 0; i < spec.processes; ++i) {
        if (pids[i] != done) continue;
        pids[i] = -1;
        --running;
        if (WIFEXITED(status) && WEXITSTATUS(status) == 0) continue;
        failures.emplace_back(i, status);
        if (grace_end == Clock::time_point::max()) grace_end = Clock::now() + std::chrono::seconds(2);
      }
    }
    for (const auto& [i, status] : failures)
      if (failed < 0 && WIFSIGNALED(status)) failed = i, failed_status = status;
    if (failed < 0 && !failures.empty()) failed = failures.front().first, failed_status = failures.front().second;
    if (g_stop_signal != 0) {
      const int sig = g_stop_signal;
      std::fprintf(stderr, "moerl run: %s: stopping the %d processes\n", strsignal(sig), spec.processes);
      stop_all(pids);
      restore();
      return 128 + sig;
    }
    if (failed < 0) {
      restore();
      return 0;
    }
    stop_all(pids);
    const std::string log = failed == 0 ? "this output" : (dir / ("process-" + std::to_string(failed) + ".log")).string();
    if (attempt == spec.restarts) {
      std::fprintf(stderr, "moerl run: process %d failed (%s; see %s); no restarts left (--restarts %d)\n", failed,
                   describe_status(failed_status).c_str(), log.c_str(), spec.restarts);
      restore();
      return 1;
    }
    std::fprintf(stderr,
                 "moerl run: process %d failed (%s; see %s); the others were stopped; launching all %d again from "
                 "the newest checkpoint (restart %d of %d)\n",
                 failed, describe_status(failed_status).c_str(), log.c_str(), spec.processes, attempt + 1,
                 spec.restarts);
  }
  restore();
  return 1;
}

}  // namespace moerl::cli
