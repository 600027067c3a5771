// The GPU's timeline between start() and stop(), through CUPTI's activity API: every kernel, memset and memcpy
// with its device start and end, summarised as
//   - the span (first start to last end), the time the GPU ran something (the union of all intervals, every
//     stream) and the time it ran nothing: idle, i.e. waits for the host (launch overhead, synchronizations);
//   - the longest idle gaps, each with the work before and after it;
//   - the kernels by total time (calls, total, mean; concurrent kernels each count their own time);
//   - the memsets by the work that follows each on its stream (which call issued them: cuBLASLt's own small ones
//     show before its kernels).
// For `moerl bench gpu` with MOERL_GPU_TRACE=1 (bench/cuda/train_step_bench.cu: the timed steps of train_step and
// moe_layer). MOERL_GPU_TRACE_DUMP=PREFIX also writes every interval to PREFIX<label>.tsv (start and end in ns from
// the first start, stream, name; read by scripts/trace_summary.py). libcupti is loaded when a trace is made (dlopen
// of libcupti.so.13, or MOERL_CUPTI_LIB), so moerl does not depend on it otherwise. One trace at a time per process.
#pragma once
#include <cstdint>
#include <cstdio>
#include <string>
#include <vector>

namespace moerl::bench {

class KernelTrace {
 public:
  // Whether MOERL_GPU_TRACE=1 asks for traces.
  static bool requested();

  // Loads libcupti (throws moerl::Error naming the library tried if it cannot) and registers the buffers.
  KernelTrace();
  ~KernelTrace();
  KernelTrace(const KernelTrace&) = delete;
  KernelTrace& operator=(const KernelTrace&) = delete;

  void start();
  // Waits for the device, flushes CUPTI's buffers and stops recording.
  void stop();
  // The summary of the work recorded, headed by `label`; `steps` divides the totals (per step figures).
  void report(std::FILE* out, const std::string& label, int steps, int top_kernels = 30, int top_gaps = 12) const;
  // Every interval as a line "start_ns end_ns stream name" (tab-separated, times from the first start, by start).
  void dump(const std::string& path) const;

  struct Interval {
    uint64_t start = 0, end = 0;  // ns, device clock
    std::string name;  // demangled, shortened
    uint32_t stream = 0;  // CUPTI's stream id
  };

 private:
  std::vector<Interval> intervals_;
};

}  // namespace moerl::bench
