// Benchmark results as JSON lines (DESIGN.md "Benchmarks"):
//   {"bench": "cpu", "metric": "quant_1x128_gbps", "value": 3.1, "unit": "GB/s", "stat": "median",
//    "rev": "<git revision>", "device": "<cpu or gpu name>", "date": "2026-11-28"}
#pragma once
#include <cstdio>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

namespace moerl::bench {

class Report {
 public:
  Report(std::string device, std::FILE* json_file) : device_(std::move(device)), file_(json_file) {}
  void add(const std::string& bench, const std::string& metric, double value, const std::string& unit,
           const std::string& stat = "median", nlohmann::json extra = nlohmann::json::object());

 private:
  std::string device_;
  std::FILE* file_;
};

std::string cpu_name();   // from /proc/cpuinfo
std::string today();      // YYYY-MM-DD (UTC)
// Median of `runs` timings of fn() in seconds, after one warm-up call.
template <class F> double median_seconds(int runs, F&& fn);

// One group each; all write into the report.
void run_cpu_benchmarks(Report& report);
#ifdef MOERL_HAVE_CUDA
// bench/cuda/: needs a GPU. `only`: the benchmarks to run by name (gpu_benchmark_names()); empty: all.
void run_gpu_benchmarks(Report& report, const std::vector<std::string>& only = {});
const std::vector<std::string>& gpu_benchmark_names();
void run_gpu_dp_benchmarks(Report& report);  // bench/cuda/: the data-parallel training step (DP=2 with 2 GPUs)
#endif

}  // namespace moerl::bench

#include <algorithm>
#include <chrono>

template <class F> double moerl::bench::median_seconds(int runs, F&& fn) {
  fn();
  std::vector<double> t;
  for (int i = 0; i < runs; ++i) {
    const auto a = std::chrono::steady_clock::now();
    fn();
    t.push_back(std::chrono::duration<double>(std::chrono::steady_clock::now() - a).count());
  }
  std::sort(t.begin(), t.end());
  return t[t.size() / 2];
}
