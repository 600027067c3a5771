// moerl bench GROUP [--json FILE]
#include <CLI/CLI.hpp>
#include <cstdio>
#include <filesystem>
#include <thread>

#include "actors/bench.hpp"
#include "actors/cli/commands.hpp"
#include "actors/cli/feedback.hpp"
#include "actors/cluster/remote_bench.hpp"
#include "actors/cluster/system.hpp"
#include "bench/report.hpp"
#include "runtime/error.hpp"
#include "runtime/messages/bench.hpp"

namespace moerl::cli {
namespace {

// The actor runtime in one process (DESIGN.md "Benchmarks"; issue 5's targets: round trip <= 5 us, >= 1M msgs/s).
void run_actor_benchmarks(bench::Report& report, std::chrono::microseconds idle_spin) {
  constexpr int kTrips = 20000, kPayload = 64;
  report.add("actors", "roundtrip_local_us", actors::roundtrip_local_us(kTrips, 2000, kPayload), "us", "median",
             {{"trips", kTrips}, {"payload_bytes", kPayload}});
  constexpr int64_t kMessages = 2000000;
  report.add("actors", "throughput_local_msgs_per_s", actors::throughput_local_msgs_per_s(kMessages, 3), "msgs/s",
             "median", {{"messages", kMessages}, {"runs", 3}});
  report.add("actors", "capnp_batch_4096_us", msg::capnp_batch_roundtrip_us(4096), "us", "median",
             {{"tokens", 4096}, {"what", "encode + validating decode of one TokenBatch"}});
  // Between two processes on loopback: a head here and a `moerl node` child (issue 5's target: <= 50 us).
  const auto remote = cluster::measure_remote_roundtrip(std::filesystem::read_symlink("/proc/self/exe"), kTrips, 2000,
                                                        "sharing", idle_spin);
  report.add("actors", "roundtrip_remote_us", remote.median_us, "us", "median",
             {{"trips", remote.samples},
              {"p10_us", remote.p10_us},
              {"p90_us", remote.p90_us},
              {"scheduler", "sharing"},
              {"idle_spin_us", static_cast<int64_t>(idle_spin.count())},
              {"hardware_threads", static_cast<int64_t>(std::thread::hardware_concurrency())}});
}

}  // namespace

void add_bench_command(CLI::App& app, std::function<int()>& action) {
  auto* cmd = app.add_subcommand("bench", "Run a benchmark group and print one JSON object per metric "
                                          "(bench, metric, value, unit, stat, rev, device, date).");
  struct Args {
    std::string group, json, url, tokens;
    std::vector<std::string> only;
    int64_t idle_spin_us = cluster::default_idle_spin().count();
  };
  auto args = std::make_shared<Args>();
#ifdef MOERL_HAVE_CUDA
  cmd->add_option("group", args->group,
                  "Benchmark group: cpu (reference kernels and a training step on the CPU), gpu (CUDA kernels), "
                  "gpu-dp (the bench-600m fp8 training step on one GPU and data-parallel over one and two), actors (message "
                  "round trip and throughput in one process, Cap'n Proto batch codec), feedback (durable submissions/s and "
                  "latency against moerl feedback serve)")
      ->required()
      ->check(CLI::IsMember({"cpu", "gpu", "gpu-dp", "actors", "feedback"}));
#else
  cmd->add_option("group", args->group,
                  "Benchmark group: cpu (reference kernels and a training step on the CPU), actors (message round "
                  "trip and throughput in one process, Cap'n Proto batch codec), feedback (durable submissions/s and "
                  "latency against moerl feedback serve); this build has no CUDA backend, so no gpu group")
      ->required()
      ->check(CLI::IsMember({"cpu", "actors", "feedback"}));
#endif
  cmd->add_option("--json", args->json, "Also append the JSON lines to this file");
#ifdef MOERL_HAVE_CUDA
  std::string names;
  for (const std::string& name : bench::gpu_benchmark_names()) names += (names.empty() ? "" : ", ") + name;
  cmd->add_option("--only", args->only, "gpu: run only these benchmarks (comma-separated): " + names)
      ->delimiter(',');
#endif
  cmd->add_option("--idle-spin-us", args->idle_spin_us,
                  "actors: the busy-polling window of both processes of the remote round trip (as moerl head/node "
                  "--idle-spin-us)")
      ->check(CLI::Range(0, 100000))
      ->capture_default_str();
  cmd->add_option("--url", args->url, "feedback: measure the server at http://HOST:PORT instead of starting one");
  cmd->add_option("--tokens", args->tokens, "feedback with --url: the server's tokens file (admin and annotators)");
  cmd->callback([args, &action] {
    action = [args] {
      std::FILE* file = nullptr;
      if (!args->json.empty()) {
        file = std::fopen(args->json.c_str(), "a");
        require(file != nullptr, args->json + ": cannot open for appending");
      }
      bench::Report report(bench::cpu_name(), file);
      if (args->group == "cpu") bench::run_cpu_benchmarks(report);
      if (args->group == "actors") run_actor_benchmarks(report, std::chrono::microseconds{args->idle_spin_us});
      if (args->group == "feedback") run_feedback_benchmark(report, args->url, args->tokens);
#ifdef MOERL_HAVE_CUDA
      if (args->group == "gpu") bench::run_gpu_benchmarks(report, args->only);
      if (args->group == "gpu-dp") bench::run_gpu_dp_benchmarks(report);
#endif
      if (file) std::fclose(file);
      return 0;
    };
  });
}

}  // namespace moerl::cli
