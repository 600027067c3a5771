// KernelTrace (bench/cuda/kernel_trace.hpp): CUPTI's activity records of kernels, memsets and memcpys, collected
// from the buffers CUPTI completes, then summarised. libcupti is opened with dlopen, its six entry points looked up
// by name, so nothing links against it.
#include "bench/cuda/kernel_trace.hpp"

#include <cupti.h>
#include <cuda_runtime_api.h>
#include <cxxabi.h>
#include <dlfcn.h>

#include <algorithm>
#include <cstdlib>
#include <map>
#include <memory>
#include <mutex>
#include <type_traits>

#include "kernels/cuda/cuda_check.hpp"
#include "runtime/error.hpp"

namespace moerl::bench {
namespace {

struct Cupti {
  void* lib = nullptr;
  CUptiResult (*register_callbacks)(CUpti_BuffersCallbackRequestFunc, CUpti_BuffersCallbackCompleteFunc) = nullptr;
  CUptiResult (*enable)(CUpti_ActivityKind) = nullptr;
  CUptiResult (*disable)(CUpti_ActivityKind) = nullptr;
  CUptiResult (*flush_all)(uint32_t) = nullptr;
  CUptiResult (*next_record)(uint8_t*, size_t, CUpti_Activity**) = nullptr;
  CUptiResult (*result_string)(CUptiResult, const char**) = nullptr;
};

// The library, opened once per process.
const Cupti& cupti() {
  static const Cupti c = [] {
    const char* env = std::getenv("MOERL_CUPTI_LIB");
    const std::string name = env != nullptr && *env != '\0' ? env : "libcupti.so.13";
    Cupti k;
    k.lib = dlopen(name.c_str(), RTLD_NOW | RTLD_LOCAL);
    const char* why = k.lib == nullptr ? dlerror() : nullptr;
    require(k.lib != nullptr, "kernel trace (MOERL_GPU_TRACE): cannot open " + name + " (" + (why ? why : "?") +
                                  "); set MOERL_CUPTI_LIB to CUDA's libcupti");
    const auto get = [&](auto& fn, const char* symbol) {
      fn = reinterpret_cast<std::remove_reference_t<decltype(fn)>>(dlsym(k.lib, symbol));
      require(fn != nullptr, "kernel trace: " + name + " has no " + symbol);
    };
    get(k.register_callbacks, "cuptiActivityRegisterCallbacks");
    get(k.enable, "cuptiActivityEnable");
    get(k.disable, "cuptiActivityDisable");
    get(k.flush_all, "cuptiActivityFlushAll");
    get(k.next_record, "cuptiActivityGetNextRecord");
    get(k.result_string, "cuptiGetResultString");
    return k;
  }();
  return c;
}

void check(CUptiResult r, const char* what) {
  if (r == CUPTI_SUCCESS) return;
  const char* s = nullptr;
  cupti().result_string(r, &s);
  throw Error(std::string("kernel trace: ") + what + ": " + (s ? s : "CUPTI error " + std::to_string(r)));
}

constexpr CUpti_ActivityKind kKinds[] = {CUPTI_ACTIVITY_KIND_CONCURRENT_KERNEL, CUPTI_ACTIVITY_KIND_MEMSET,
                                         CUPTI_ACTIVITY_KIND_MEMCPY};
constexpr size_t kBufferBytes = 8 << 20;

// The trace being recorded (one per process) and its lock: CUPTI completes buffers on its own thread.
std::mutex g_mutex;
std::vector<KernelTrace::Interval>* g_sink = nullptr;

// "void moerl::ns::kernel<A, B>(int, float*)" -> "ns::kernel<A, B>", at most 120 characters.
std::string short_name(const char* mangled) {
  int status = 0;
  std::unique_ptr<char, void (*)(void*)> demangled(abi::__cxa_demangle(mangled, nullptr, nullptr, &status), std::free);
  std::string s = status == 0 && demangled ? demangled.get() : mangled;
  if (s.rfind("void ", 0) == 0) s.erase(0, 5);
  for (const std::string prefix : {"moerl::", "(anonymous namespace)::"})
    for (size_t at; (at = s.find(prefix)) != std::string::npos;) s.erase(at, prefix.size());
  // The parameter list: the first '(' at template depth 0.
  int depth = 0;
  for (size_t i = 0; i < s.size(); ++i) {
    if (s[i] == '<') ++depth;
    if (s[i] == '>') --depth;
    if (s[i] == '(' && depth == 0 && i > 0) {
      s.erase(i);
      break;
    }
  }
  if (s.size() > 120) s = s.substr(0, 117) + "...";
  return s;
}

void CUPTIAPI buffer_requested(uint8_t** buffer, size_t* size, size_t* max_records) {
  *buffer = static_cast<uint8_t*>(std::aligned_alloc(8, kBufferBytes));
  *size = *buffer != nullptr ? kBufferBytes : 0;
  *max_records = 0;
}

void CUPTIAPI buffer_completed(CUcontext, uint32_t, uint8_t* buffer, size_t, size_t valid) {
  std::vector<KernelTrace::Interval> got;
  CUpti_Activity* record = nullptr;
  while (cupti().next_record(buffer, valid, &record) == CUPTI_SUCCESS) {
    KernelTrace::Interval iv;
    if (record->kind == CUPTI_ACTIVITY_KIND_CONCURRENT_KERNEL || record->kind == CUPTI_ACTIVITY_KIND_KERNEL) {
      const auto* k = reinterpret_cast<const CUpti_ActivityKernel10*>(record);
      iv = {k->start, k->end, short_name(k->name), k->streamId};
    } else if (record->kind == CUPTI_ACTIVITY_KIND_MEMSET) {
      const auto* m = reinterpret_cast<const CUpti_ActivityMemset4*>(record);
      // Named by size (bytes, rounded down to a power of two), which tells cuBLASLt's small ones from moerl's.
      uint64_t bucket = 1;
      while (bucket * 2 <= m->bytes) bucket *= 2;
      iv = {m->start, m->end, "[memset " + std::to_string(m->bytes == 0 ? 0 : bucket) + "+ bytes]", m->streamId};
    } else if (record->kind == CUPTI_ACTIVITY_KIND_MEMCPY) {
      const auto* m = reinterpret_cast<const CUpti_ActivityMemcpy6*>(record);
      static const char* const kinds[] = {"?", "HtoD", "DtoH", "HtoA", "AtoH", "AtoA", "AtoD", "DtoA", "DtoD", "HtoH"};
      const unsigned kind = m->copyKind < 10 ? m->copyKind : 0;
      iv = {m->start, m->end, std::string("[memcpy ") + kinds[kind] + "]", m->streamId};
    } else {
      continue;
    }
    got.push_back(std::move(iv));
  }
  std::free(buffer);
  const std::lock_guard lock(g_mutex);
  if (g_sink != nullptr) g_sink->insert(g_sink->end(), got.begin(), got.end());
}

}  // namespace

bool KernelTrace::requested() {
  const char* v = std::getenv("MOERL_GPU_TRACE");
  return v != nullptr && *v == '1';
}

KernelTrace::KernelTrace() {
  const Cupti& c = cupti();
  static std::once_flag registered;
  std::call_once(registered, [&] { check(c.register_callbacks(buffer_requested, buffer_completed), "register"); });
}

KernelTrace::~KernelTrace() {
  const std::lock_guard lock(g_mutex);
  if (g_sink == &intervals_) g_sink = nullptr;
}

void KernelTrace::start() {
  {
    const std::lock_guard lock(g_mutex);
    require(g_sink == nullptr, "kernel trace: another trace is recording");
    intervals_.clear();
    g_sink = &intervals_;
  }
  for (CUpti_ActivityKind k : kKinds) check(cupti().enable(k), "enable");
}

void KernelTrace::stop() {
  CUDA_CHECK(cudaDeviceSynchronize());
  for (CUpti_ActivityKind k : kKinds) check(cupti().disable(k), "disable");
  check(cupti().flush_all(1), "flush");  // 1: CUPTI_ACTIVITY_FLAG_FLUSH_FORCED
  const std::lock_guard lock(g_mutex);
  g_sink = nullptr;
}

void KernelTrace::report(std::FILE* out, const std::string& label, int steps, int top_kernels, int top_gaps) const {
  std::vector<Interval> v = intervals_;
  std::sort(v.begin(), v.end(), [](const Interval& a, const Interval& b) { return a.start < b.start; });
  const double per = 1e6 * std::max(steps, 1);  // ns -> ms per step
  // Idle gaps: the times no interval covers between the first start and the last end, each with the work that ended
  // last before it and the first after it. Busy is the span less the gaps (the union of the intervals).
  struct Gap {
    uint64_t ns;
    std::string before, after;
  };
  std::vector<Gap> gaps;
  size_t count20 = 0, count2 = 0;
  uint64_t idle = 0, busy_until = 0;
  std::string last_name;
  for (const Interval& iv : v) {
    if (busy_until != 0 && iv.start > busy_until) {
      const uint64_t g = iv.start - busy_until;
      count2 += g >= 2000, count20 += g >= 20000, idle += g;
      gaps.push_back({g, last_name, iv.name});
    }
    if (iv.end > busy_until) busy_until = iv.end, last_name = iv.name;
  }
  const uint64_t span = v.empty() ? 0 : busy_until - v.front().start, busy = span - idle;
  std::fprintf(out,
               "kernel trace (MOERL_GPU_TRACE) %s, %d steps: span %.3f ms/step, GPU busy %.3f ms/step (%.1f%%), "
               "idle %.3f ms/step in %zu gaps (%.1f per step of >= 2 us, %.1f of >= 20 us); %zu intervals\n",
               label.c_str(), steps, span / per, busy / per, span ? 100.0 * busy / span : 0.0, idle / per,
               gaps.size(), static_cast<double>(count2) / std::max(steps, 1),
               static_cast<double>(count20) / std::max(steps, 1), v.size());
  {
    // Idle by gap size, and by the work that starts after the gap (the launches the GPU waited for).
    uint64_t small = 0, mid = 0, large = 0;
    std::map<std::string, std::pair<uint64_t, size_t>> by_next;
    for (const Gap& g : gaps) {
      (g.ns < 2000 ? small : g.ns < 20000 ? mid : large) += g.ns;
      auto& [ns, n] = by_next[g.after];
      ns += g.ns, ++n;
    }
    std::fprintf(out, "  idle in gaps < 2 us %.3f ms/step, 2-20 us %.3f, >= 20 us %.3f\n", small / per, mid / per,
                 large / per);
    std::vector<std::pair<std::string, std::pair<uint64_t, size_t>>> next(by_next.begin(), by_next.end());
    std::sort(next.begin(), next.end(), [](const auto& a, const auto& b) { return a.second.first > b.second.first; });
    std::fprintf(out, "  idle before (ms/step, gaps/step): the work that waited\n");
    for (size_t i = 0; i < next.size() && i < static_cast<size_t>(top_gaps); ++i)
      std::fprintf(out, "    %8.3f %7.1f  %s\n", next[i].second.first / per,
                   static_cast<double>(next[i].second.second) / std::max(steps, 1), next[i].first.c_str());
  }
  std::sort(gaps.begin(), gaps.end(), [](const Gap& a, const Gap& b) { return a.ns > b.ns; });
  std::fprintf(out, "  longest idle gaps (us): after -> before\n");
  for (size_t i = 0; i < gaps.size() && i < static_cast<size_t>(top_gaps); ++i)
    std::fprintf(out, "    %9.1f  %s -> %s\n", gaps[i].ns / 1e3, gaps[i].before.c_str(), gaps[i].after.c_str());
  struct Total {
    uint64_t ns = 0;
    size_t calls = 0;
  };
  std::map<std::string, Total> by_name;
  for (const Interval& iv : v) {
    Total& s = by_name[iv.name];
    s.ns += iv.end - iv.start, ++s.calls;
  }
  std::vector<std::pair<std::string, Total>> rows(by_name.begin(), by_name.end());
  std::sort(rows.begin(), rows.end(), [](const auto& a, const auto& b) { return a.second.ns > b.second.ns; });
  std::fprintf(out, "  by total time: ms/step, calls/step, mean us, %% of busy (concurrent work counts twice)\n");
  for (size_t i = 0; i < rows.size() && i < static_cast<size_t>(top_kernels); ++i) {
    const Total& s = rows[i].second;
    std::fprintf(out, "    %8.3f %7.1f %9.1f %5.1f%%  %s\n", s.ns / per, static_cast<double>(s.calls) / std::max(steps, 1),
                 s.ns / 1e3 / static_cast<double>(s.calls), busy ? 100.0 * s.ns / busy : 0.0,
                 rows[i].first.c_str());
  }
  // Memsets by what follows each on its stream (v is sorted by start).
  std::map<std::string, size_t> followed;
  for (size_t i = 0; i < v.size(); ++i) {
    if (v[i].name.rfind("[memset", 0) != 0) continue;
    std::string next = "(nothing)";
    for (size_t j = i + 1; j < v.size(); ++j)
      if (v[j].stream == v[i].stream) {
        next = v[j].name;
        break;
      }
    ++followed[v[i].name + " -> " + next];
  }
  std::vector<std::pair<std::string, size_t>> fr(followed.begin(), followed.end());
  std::sort(fr.begin(), fr.end(), [](const auto& a, const auto& b) { return a.second > b.second; });
  std::fprintf(out, "  memsets by the work after them on their stream (per step)\n");
  for (size_t i = 0; i < fr.size() && i < static_cast<size_t>(top_gaps); ++i)
    std::fprintf(out, "    %7.1f  %s\n", static_cast<double>(fr[i].second) / std::max(steps, 1), fr[i].first.c_str());
}

void KernelTrace::dump(const std::string& path) const {
  std::vector<Interval> v = intervals_;
  std::sort(v.begin(), v.end(), [](const Interval& a, const Interval& b) { return a.start < b.start; });
  std::FILE* f = std::fopen(path.c_str(), "w");
  require(f != nullptr, "kernel trace: cannot write " + path);
  const uint64_t t0 = v.empty() ? 0 : v.front().start;
  for (const Interval& iv : v)
    std::fprintf(f, "%llu\t%llu\t%u\t%s\n", static_cast<unsigned long long>(iv.start - t0),
                 static_cast<unsigned long long>(iv.end - t0), iv.stream, iv.name.c_str());
  require(std::fclose(f) == 0, "kernel trace: cannot write " + path);
}

}  // namespace moerl::bench
