// moerl bench GROUP [--json FILE]
#include <CLI/CLI.hpp>
#include <cstdio>

#include "actors/cli/commands.hpp"
#include "bench/report.hpp"
#include "runtime/error.hpp"

namespace moerl::cli {

void add_bench_command(CLI::App& app, std::function<int()>& action) {
  auto* cmd = app.add_subcommand("bench", "Run a benchmark group and print one JSON object per metric "
                                          "(bench, metric, value, unit, stat, rev, device, date).");
  struct Args {
    std::string group, json;
  };
  auto args = std::make_shared<Args>();
#ifdef MOERL_HAVE_CUDA
  cmd->add_option("group", args->group,
                  "Benchmark group: cpu (reference kernels and a training step on the CPU), gpu (CUDA kernels)")
      ->required()
      ->check(CLI::IsMember({"cpu", "gpu"}));
#else
  cmd->add_option("group", args->group,
                  "Benchmark group: cpu (reference kernels and a training step on the CPU); this build has no "
                  "CUDA backend, so no gpu group")
      ->required()
      ->check(CLI::IsMember({"cpu"}));
#endif
  cmd->add_option("--json", args->json, "Also append the JSON lines to this file");
  cmd->callback([args, &action] {
    action = [args] {
      std::FILE* file = nullptr;
      if (!args->json.empty()) {
        file = std::fopen(args->json.c_str(), "a");
        require(file != nullptr, args->json + ": cannot open for appending");
      }
      bench::Report report(bench::cpu_name(), file);
      if (args->group == "cpu") bench::run_cpu_benchmarks(report);
#ifdef MOERL_HAVE_CUDA
      if (args->group == "gpu") bench::run_gpu_benchmarks(report);
#endif
      if (file) std::fclose(file);
      return 0;
    };
  });
}

}  // namespace moerl::cli
