// `moerl bench gpu`: the CUDA kernels on the current GPU. Each metric is the median of CUDA-event-timed
// runs after warm-up, on random data (never zeros); the JSON line's "device" is the GPU's name.
//   gemm_fp8_8192_tflops, gemm_fp8_4096x7168x2048_tflops   fp8::cuda::gemm_nt, x 1x128 · w 128x128, BF16 out
//   gemm_fp8_[600m_]expert[s]_<gemm>_tflops                 the experts' Fprop, Dgrad and Wgrad of moe_layer
//                                                           (bench-600m's: 600m_), one or all on the lanes
//   gemm_bf16_8192_tflops                                   cuBLASLt BF16 GEMM, the same layout, for comparison
//   quant_1x128_gbps, quant_128x128_gbps,
//   quant_1x128_transposed_gbps                             fp8::cuda::quantize_*, 8192 x 8192 FP32 in
//   quant_1x128_transposed_<shape>_gbps                     each kernel shape of the transposed one (cols32,
//                                                           tiles64)
//   quant_1x128_dual_gbps                                   quantize_1x128_dual: both ways, one read
//   train_step_{fp8,bf16}_tokens_per_s, train_step_peak_mem_gib,
//   moe_layer_{fp8,bf16}_ms,
//   attention_{fwd,bwd}_ms                                  training: bench/cuda/train_step_bench.cu
// Ceilings seen on an H200 (shared/DEVICE.md): FP8 block-scaled 1337 TFLOP/s at 8192³, BF16 763-774,
// device copies 3.7-4.3 TB/s.
#include <cublasLt.h>
#include <cuda_bf16.h>
#include <cuda_fp8.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <chrono>
#include <functional>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <string>
#include <vector>

#include "bench/cuda/train_step_bench.hpp"
#include "bench/report.hpp"
#include "kernels/cuda/cuda_check.hpp"
#include "kernels/fp8_gemm.hpp"
#include "runtime/error.hpp"
#if __has_include("kernels/fp8_quantize.hpp")
#include "kernels/fp8_quantize.hpp"
#define MOERL_BENCH_HAVE_GPU_QUANTIZE 1
#endif

namespace moerl::bench {
namespace {

constexpr int kWarmup = 10;
constexpr int kRuns = 50;
constexpr int kThreads = 256;
constexpr int kMaxHeuristicResults = 8;  // a plain array: std::vector of this typedef crashes nvcc 13

class DeviceMemory {
 public:
  explicit DeviceMemory(size_t bytes) { CUDA_CHECK(cudaMalloc(&ptr_, std::max<size_t>(bytes, 16))); }
  ~DeviceMemory() { cudaFree(ptr_); }
  DeviceMemory(const DeviceMemory&) = delete;
  DeviceMemory& operator=(const DeviceMemory&) = delete;
  template <class T> T* as() const { return static_cast<T*>(ptr_); }

 private:
  void* ptr_ = nullptr;
};

// Counter-based random numbers: element i of stream `seed`.
__device__ __forceinline__ uint32_t hash32(uint64_t i, uint32_t seed) {
  uint64_t z = i * 0x9E3779B97F4A7C15ull + seed * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return static_cast<uint32_t>(z ^ (z >> 31));
}
__device__ __forceinline__ float uniform01(uint64_t i, uint32_t seed) {
  return (hash32(i, seed) >> 8) * (1.0f / 16777216.0f);
}
// Approximately standard normal: a sum of 4 uniforms, centred and scaled to variance 1.
__device__ __forceinline__ float normalish(uint64_t i, uint32_t seed) {
  float s = 0.0f;
  for (uint32_t j = 0; j < 4; ++j) s += uniform01(4 * i + j, seed);
  return (s - 2.0f) * 1.7320508f;
}

// E4M3 codes of what quantized activations look like: normal values with the tile's amax near 448.
__global__ void fill_e4m3_kernel(uint8_t* out, int64_t n, uint32_t seed) {
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < n; i += int64_t{gridDim.x} * blockDim.x)
    out[i] = __nv_cvt_float_to_fp8(130.0f * normalish(i, seed), __NV_SATFINITE, __NV_E4M3);
}
__global__ void fill_uniform_kernel(float* out, int64_t n, uint32_t seed, float lo, float hi) {
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < n; i += int64_t{gridDim.x} * blockDim.x)
    out[i] = lo + (hi - lo) * uniform01(i, seed);
}
__global__ void fill_normal_kernel(float* out, int64_t n, uint32_t seed) {
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < n; i += int64_t{gridDim.x} * blockDim.x)
    out[i] = normalish(i, seed);
}
__global__ void fill_bf16_kernel(__nv_bfloat16* out, int64_t n, uint32_t seed) {
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < n; i += int64_t{gridDim.x} * blockDim.x)
    out[i] = __float2bfloat16(normalish(i, seed));
}

unsigned grid_for(int64_t n) {
  return static_cast<unsigned>(std::clamp<int64_t>((n + kThreads - 1) / kThreads, 1, 65536));
}

// Milliseconds of each of `runs` launches of launch(i), run back to back on `stream` after `warmup`
// launches; consecutive events bracket each run.
template <class F> std::vector<float> time_runs(cudaStream_t stream, int warmup, int runs, F&& launch) {
  for (int i = 0; i < warmup; ++i) launch(i);
  std::vector<cudaEvent_t> events(static_cast<size_t>(runs) + 1);
  for (auto& e : events) CUDA_CHECK(cudaEventCreate(&e));
  CUDA_CHECK(cudaEventRecord(events[0], stream));
  for (int i = 0; i < runs; ++i) {
    launch(warmup + i);
    CUDA_CHECK(cudaEventRecord(events[static_cast<size_t>(i) + 1], stream));
  }
  CUDA_CHECK(cudaEventSynchronize(events.back()));
  std::vector<float> ms(static_cast<size_t>(runs));
  for (int i = 0; i < runs; ++i)
    CUDA_CHECK(cudaEventElapsedTime(&ms[static_cast<size_t>(i)], events[static_cast<size_t>(i)],
                                    events[static_cast<size_t>(i) + 1]));
  for (auto& e : events) CUDA_CHECK(cudaEventDestroy(e));
  std::sort(ms.begin(), ms.end());
  return ms;
}

nlohmann::json timing_extra(const std::string& device, const std::vector<float>& sorted_ms) {
  return {{"device", device},
          {"runs", sorted_ms.size()},
          {"warmup", kWarmup},
          {"median_ms", sorted_ms[sorted_ms.size() / 2]},
          {"min_ms", sorted_ms.front()},
          {"max_ms", sorted_ms.back()}};
}

// Input sets to rotate through so that one set's operands do not sit in L2 from the previous run.
int input_sets(double bytes_per_set, const cudaDeviceProp& prop) {
  return static_cast<int>(std::clamp(std::ceil(2.0 * prop.l2CacheSize / bytes_per_set), 1.0, 8.0));
}

// Some elements of a BF16 output must be finite and not all zero, or the timing measured nothing.
void check_bf16_output(const void* y, int64_t elements, const std::string& what) {
  std::vector<__nv_bfloat16> h(static_cast<size_t>(std::min<int64_t>(elements, 4096)));
  CUDA_CHECK(cudaMemcpy(h.data(), y, h.size() * sizeof(__nv_bfloat16), cudaMemcpyDeviceToHost));
  bool nonzero = false;
  for (const auto& v : h) {
    const float f = __bfloat162float(v);
    require(std::isfinite(f), what + ": output has non-finite values");
    nonzero = nonzero || f != 0.0f;
  }
  require(nonzero, what + ": output is all zeros");
}

// One block-scaled FP8 GEMM at M x N x K, over several input sets (L2 not warm). With MOERL_LT_FP8_SEARCH=1 also every
// cuBLASLt configuration of it on one input set (fp8::cuda::search_gemm_configs), the fastest 10 and the plan's on
// stderr: at 8192^3 none beat the heuristic's plan (the best 1263 TFLOP/s in the search's own timing, the plan 1338 in
// the bench's; bench/results/2026-11-30-gpu-head-ce-chunks-h200-bba286b+chunks.txt).
void bench_fp8_gemm(Report& report, const std::string& device, const cudaDeviceProp& prop, cudaStream_t stream,
                    int64_t M, int64_t N, int64_t K, const std::string& metric) {
  namespace fc = fp8::cuda;
  const int64_t sx = fc::cublaslt_scale_count(M, K, 1), sw = fc::cublaslt_scale_count(N, K, fp8::kTile);
  const int sets = input_sets(static_cast<double>(M * K + N * K + 4 * (sx + sw)), prop);
  std::vector<std::unique_ptr<DeviceMemory>> mem;
  std::vector<fc::Operand> xs, ws;
  for (int s = 0; s < sets; ++s) {
    // Raw pointers, not references into `mem`: the next emplace_back may reallocate the vector.
    DeviceMemory* xc = mem.emplace_back(std::make_unique<DeviceMemory>(M * K)).get();
    DeviceMemory* xsc = mem.emplace_back(std::make_unique<DeviceMemory>(4 * sx)).get();
    DeviceMemory* wc = mem.emplace_back(std::make_unique<DeviceMemory>(N * K)).get();
    DeviceMemory* wsc = mem.emplace_back(std::make_unique<DeviceMemory>(4 * sw)).get();
    const auto seed = static_cast<uint32_t>(4 * s);
    fill_e4m3_kernel<<<grid_for(M * K), kThreads, 0, stream>>>(xc->as<uint8_t>(), M * K, seed);
    CUDA_CHECK_LAUNCH();
    fill_e4m3_kernel<<<grid_for(N * K), kThreads, 0, stream>>>(wc->as<uint8_t>(), N * K, seed + 1);
    CUDA_CHECK_LAUNCH();
    // Scales of quantized normal data: amax / 448 with amax about 2.5 .. 4.5 (x), 4 .. 6 (w).
    fill_uniform_kernel<<<grid_for(sx), kThreads, 0, stream>>>(xsc->as<float>(), sx, seed + 2, 2.5f / 448, 4.5f / 448);
    CUDA_CHECK_LAUNCH();
    fill_uniform_kernel<<<grid_for(sw), kThreads, 0, stream>>>(wsc->as<float>(), sw, seed + 3, 4.0f / 448, 6.0f / 448);
    CUDA_CHECK_LAUNCH();
    xs.push_back({xc->as<uint8_t>(), xsc->as<float>(), M, K, 1});
    ws.push_back({wc->as<uint8_t>(), wsc->as<float>(), N, K, fp8::kTile});
  }
  DeviceMemory y(static_cast<size_t>(M * N) * 2);
  fc::GemmContext ctx;
  const std::vector<float> ms = time_runs(stream, kWarmup, kRuns, [&](int i) {
    fc::gemm_nt(ctx, xs[static_cast<size_t>(i % sets)], ws[static_cast<size_t>(i % sets)], y.as<void>(),
                fc::OutType::BF16, stream);
  });
  check_bf16_output(y.as<void>(), M * N, metric);
  if (std::getenv("MOERL_LT_FP8_SEARCH") != nullptr) {  // every cuBLASLt configuration, as bench_fp8_expert_gemms
    const std::vector<fc::GemmConfigTiming> all =
        fc::search_gemm_configs(ctx, xs[0], ws[0], y.as<void>(), fc::OutType::BF16, false, stream, 9);
    const double flop = 2.0 * static_cast<double>(M) * N * K;
    std::fprintf(stderr, "lt-fp8-search %s: %zu configurations\n", metric.c_str(), all.size());
    for (size_t i = 0; i < all.size(); ++i)
      if (i < 10 || all[i].planned)
        std::fprintf(stderr, "  #%zu %s%s: %.4f ms, %.0f TFLOP/s\n", i, all[i].config.c_str(),
                     all[i].planned ? " (plan)" : "", all[i].ms, flop / (all[i].ms * 1e-3) / 1e12);
  }
  nlohmann::json extra = timing_extra(device, ms);
  extra["shape"] = {M, N, K};
  extra["input_sets"] = sets;
  extra["layout"] = "y[M,N] bf16 = x[M,K] e4m3 (1x128 scales) . w[N,K]^T e4m3 (128x128 scales), cuBLASLt";
  const double seconds = ms[ms.size() / 2] * 1e-3;
  report.add("gpu", metric, 2.0 * static_cast<double>(M) * N * K / seconds / 1e12, "TFLOP/s", "median", extra);
}

// One expert's GEMMs of an MoE layer (gate | up side by side), Fprop, Dgrad and Wgrad (accumulated into FP32) as
// kernels/cuda/moe_fp8_experts.cu calls them, at the shapes of moe_layer's layer (64 experts of ~1536 rows, hidden
// 2048, moe_intermediate 1408; metrics gemm_fp8_expert*) and of bench-600m's (32 experts of ~2048 rows, hidden 1024,
// moe_intermediate 704; gemm_fp8_600m_expert*). gemm_fp8_expert_<gemm>_tflops: one GEMM at a time on one stream
// (also at 256 rows fewer and more for Fprop and Dgrad, `rows` in the line); gemm_fp8_experts_<gemm>_lanes_tflops:
// every expert's GEMM (distinct operands) issued round robin on 4 streams, as the layer's lanes, timed from fork to
// join (host issue time in the line). wgrad_gate_up: gate's and up's Wgrad as one GEMM (M = 2 I) against wgrad_gate
// twice. With MOERL_LT_FP8_SEARCH=1 also every cuBLASLt configuration of each single GEMM
// (fp8::cuda::search_gemm_configs), the fastest 8 and the plan's printed on stderr.
struct ExpertGemmShapes {
  const char* infix;  // metric names: gemm_fp8_<infix>expert_...
  int64_t rows, hidden, inter, experts;
};

void bench_fp8_expert_gemms(Report& report, const std::string& device, cudaStream_t stream,
                            const ExpertGemmShapes& layer) {
  namespace fc = fp8::cuda;
  struct Shape {
    const char* name;
    int64_t m, n, k;
    int b_block;
    fc::OutType out;
    bool accumulate;
  };
  const int64_t R = layer.rows, H = layer.hidden, I = layer.inter, kExperts = layer.experts;
  const std::string metric = std::string("gemm_fp8_") + layer.infix;
  constexpr int kLanes = 4;
  const Shape shapes[] = {{"fprop_gate_up", R, 2 * I, H, fp8::kTile, fc::OutType::FP32, false},
                          {"fprop_down", R, H, I, fp8::kTile, fc::OutType::BF16, false},
                          {"dgrad_down", R, I, H, fp8::kTile, fc::OutType::FP32, false},
                          {"dgrad_gate_up", R, H, 2 * I, fp8::kTile, fc::OutType::BF16, false},
                          {"wgrad_down", H, I, R, 1, fc::OutType::FP32, true},
                          {"wgrad_gate", I, H, R, 1, fc::OutType::FP32, true},
                          {"wgrad_gate_up", 2 * I, H, R, 1, fc::OutType::FP32, true}};
  const bool search = std::getenv("MOERL_LT_FP8_SEARCH") != nullptr;
  fc::GemmContext contexts[kLanes];
  cudaStream_t lanes[kLanes] = {};
  cudaEvent_t fork = nullptr, done[kLanes] = {};
  CUDA_CHECK(cudaEventCreateWithFlags(&fork, cudaEventDisableTiming));
  for (int i = 0; i < kLanes; ++i) {
    CUDA_CHECK(cudaStreamCreateWithFlags(&lanes[i], cudaStreamNonBlocking));
    CUDA_CHECK(cudaEventCreateWithFlags(&done[i], cudaEventDisableTiming));
  }
  for (const Shape& sh : shapes) {
    const bool weight_b = sh.b_block == fp8::kTile;  // Fprop and Dgrad: rows vary, b is the expert's weight
    const int64_t m_max = weight_b ? R + 256 : sh.m;  // room for the largest of the rows timed
    const int64_t sa = fc::cublaslt_scale_count(m_max, sh.k, 1), sb = fc::cublaslt_scale_count(sh.n, sh.k, sh.b_block);
    // Every expert's operands and output, so that the lanes read and write what the layer would.
    DeviceMemory ac(static_cast<size_t>(kExperts * m_max * sh.k)), as(4 * static_cast<size_t>(kExperts * sa));
    DeviceMemory bc(static_cast<size_t>(kExperts * sh.n * sh.k)), bs(4 * static_cast<size_t>(kExperts * sb));
    DeviceMemory y(static_cast<size_t>(kExperts * m_max * sh.n) * 4);
    fill_e4m3_kernel<<<grid_for(kExperts * m_max * sh.k), kThreads, 0, stream>>>(ac.as<uint8_t>(),
                                                                                  kExperts * m_max * sh.k, 1);
    CUDA_CHECK_LAUNCH();
    fill_e4m3_kernel<<<grid_for(kExperts * sh.n * sh.k), kThreads, 0, stream>>>(bc.as<uint8_t>(),
                                                                                kExperts * sh.n * sh.k, 2);
    CUDA_CHECK_LAUNCH();
    fill_uniform_kernel<<<grid_for(kExperts * sa), kThreads, 0, stream>>>(as.as<float>(), kExperts * sa, 3,
                                                                          2.5f / 448, 4.5f / 448);
    CUDA_CHECK_LAUNCH();
    fill_uniform_kernel<<<grid_for(kExperts * sb), kThreads, 0, stream>>>(bs.as<float>(), kExperts * sb, 4,
                                                                          4.0f / 448, 6.0f / 448);
    CUDA_CHECK_LAUNCH();
    CUDA_CHECK(cudaMemsetAsync(y.as<void>(), 0, static_cast<size_t>(kExperts * m_max * sh.n) * 4, stream));
    auto a_of = [&](int64_t e, int64_t m) {
      return fc::Operand{ac.as<uint8_t>() + e * m_max * sh.k, as.as<float>() + e * sa, m, sh.k, 1};
    };
    auto b_of = [&](int64_t e) {
      return fc::Operand{bc.as<uint8_t>() + e * sh.n * sh.k, bs.as<float>() + e * sb, sh.n, sh.k, sh.b_block};
    };
    auto y_of = [&](int64_t e) { return y.as<float>() + e * m_max * sh.n; };
    auto gemm = [&](fc::GemmContext& ctx, int64_t e, int64_t m, cudaStream_t s) {
      if (sh.accumulate)
        fc::gemm_nt_accumulate(ctx, a_of(e, m), b_of(e), y_of(e), s);
      else
        fc::gemm_nt(ctx, a_of(e, m), b_of(e), y_of(e), sh.out, s);
    };
    const double flops = 2.0 * static_cast<double>(sh.m) * sh.n * sh.k;
    auto add = [&](const std::string& metric, double f, const std::vector<float>& ms, nlohmann::json extra) {
      extra.update(timing_extra(device, ms));
      extra["shape"] = {sh.m, sh.n, sh.k};
      extra["b"] = sh.b_block == 1 ? "1x128" : "128x128";
      extra["output"] = sh.accumulate ? "fp32 +=" : sh.out == fc::OutType::BF16 ? "bf16" : "fp32";
      report.add("gpu", metric, f / (ms[ms.size() / 2] * 1e-3) / 1e12, "TFLOP/s", "median", extra);
    };
    for (const int64_t m : weight_b ? std::vector<int64_t>{R - 256, R, R + 256} : std::vector<int64_t>{sh.m}) {
      const std::vector<float> ms =
          time_runs(stream, kWarmup, kRuns, [&](int i) { gemm(contexts[0], i % kExperts, m, stream); });
      add(metric + "expert_" + sh.name + "_tflops", flops / static_cast<double>(sh.m) * m, ms,
          {{"rows", m}});
    }
    double host_us = 0;
    const std::vector<float> ms = time_runs(stream, 2, 10, [&](int) {
      const auto t0 = std::chrono::steady_clock::now();
      CUDA_CHECK(cudaEventRecord(fork, stream));
      for (int i = 0; i < kLanes; ++i) CUDA_CHECK(cudaStreamWaitEvent(lanes[i], fork, 0));
      for (int64_t e = 0; e < kExperts; ++e) gemm(contexts[e % kLanes], e, sh.m, lanes[e % kLanes]);
      for (int i = 0; i < kLanes; ++i) {
        CUDA_CHECK(cudaEventRecord(done[i], lanes[i]));
        CUDA_CHECK(cudaStreamWaitEvent(stream, done[i], 0));
      }
      host_us = std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - t0).count();
    });
    add(metric + "experts_" + sh.name + "_lanes_tflops", flops * kExperts, ms,
        {{"experts", kExperts}, {"lanes", kLanes}, {"host_issue_us", host_us}});
    if (!search) continue;
    const std::vector<fc::GemmConfigTiming> all =
        fc::search_gemm_configs(contexts[0], a_of(0, sh.m), b_of(0), y_of(0), sh.out, sh.accumulate, stream, 5);
    std::fprintf(stderr, "lt-fp8-search %s M=%ld N=%ld K=%ld: %zu configurations\n", sh.name, static_cast<long>(sh.m),
                 static_cast<long>(sh.n), static_cast<long>(sh.k), all.size());
    for (size_t i = 0; i < all.size(); ++i)
      if (i < 8 || all[i].planned)
        std::fprintf(stderr, "  #%zu %s%s: %.4f ms, %.0f TFLOP/s\n", i, all[i].config.c_str(),
                     all[i].planned ? " (plan)" : "", all[i].ms, flops / (all[i].ms * 1e-3) / 1e12);
  }
  CUDA_CHECK(cudaStreamSynchronize(stream));
  for (int i = 0; i < kLanes; ++i) {
    CUDA_CHECK(cudaStreamDestroy(lanes[i]));
    CUDA_CHECK(cudaEventDestroy(done[i]));
  }
  CUDA_CHECK(cudaEventDestroy(fork));
}

// cuBLASLt BF16 GEMM, y[M,N] = x[M,K] · w[N,K]ᵀ, same TN arrangement as the FP8 GEMM.
void bench_bf16_gemm(Report& report, const std::string& device, const cudaDeviceProp& prop, cudaStream_t stream,
                     int64_t M, int64_t N, int64_t K, const std::string& metric) {
  const int sets = input_sets(2.0 * static_cast<double>(M * K + N * K), prop);
  std::vector<std::unique_ptr<DeviceMemory>> xs, ws;
  for (int s = 0; s < sets; ++s) {
    xs.push_back(std::make_unique<DeviceMemory>(static_cast<size_t>(M * K) * 2));
    ws.push_back(std::make_unique<DeviceMemory>(static_cast<size_t>(N * K) * 2));
    fill_bf16_kernel<<<grid_for(M * K), kThreads, 0, stream>>>(xs.back()->as<__nv_bfloat16>(), M * K, 100 + 2 * s);
    CUDA_CHECK_LAUNCH();
    fill_bf16_kernel<<<grid_for(N * K), kThreads, 0, stream>>>(ws.back()->as<__nv_bfloat16>(), N * K, 101 + 2 * s);
    CUDA_CHECK_LAUNCH();
  }
  DeviceMemory y(static_cast<size_t>(M * N) * 2);
  const size_t workspace_bytes = fp8::cuda::GemmContext::kDefaultWorkspaceBytes;
  DeviceMemory workspace(workspace_bytes);

  cublasLtHandle_t handle = nullptr;
  cublasLtMatmulDesc_t desc = nullptr;
  cublasLtMatrixLayout_t la = nullptr, lb = nullptr, ld = nullptr;
  cublasLtMatmulPreference_t pref = nullptr;
  auto release = [&] {
    if (pref) cublasLtMatmulPreferenceDestroy(pref);
    if (ld) cublasLtMatrixLayoutDestroy(ld);
    if (lb) cublasLtMatrixLayoutDestroy(lb);
    if (la) cublasLtMatrixLayoutDestroy(la);
    if (desc) cublasLtMatmulDescDestroy(desc);
    if (handle) cublasLtDestroy(handle);
  };
  try {
    CUBLAS_CHECK(cublasLtCreate(&handle));
    CUBLAS_CHECK(cublasLtMatmulDescCreate(&desc, CUBLAS_COMPUTE_32F, CUDA_R_32F));
    const cublasOperation_t ta = CUBLAS_OP_T, tb = CUBLAS_OP_N;
    CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(desc, CUBLASLT_MATMUL_DESC_TRANSA, &ta, sizeof ta));
    CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(desc, CUBLASLT_MATMUL_DESC_TRANSB, &tb, sizeof tb));
    const auto uM = static_cast<uint64_t>(M), uN = static_cast<uint64_t>(N), uK = static_cast<uint64_t>(K);
    CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&la, CUDA_R_16BF, uK, uN, K));
    CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&lb, CUDA_R_16BF, uK, uM, K));
    CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&ld, CUDA_R_16BF, uN, uM, N));
    CUBLAS_CHECK(cublasLtMatmulPreferenceCreate(&pref));
    const uint64_t ws_bytes = workspace_bytes;
    CUBLAS_CHECK(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &ws_bytes,
                                                      sizeof ws_bytes));
    cublasLtMatmulHeuristicResult_t results[kMaxHeuristicResults] = {};
    int found = 0;
    CUBLAS_CHECK(cublasLtMatmulAlgoGetHeuristic(handle, desc, la, lb, ld, ld, pref, kMaxHeuristicResults, results,
                                                &found));
    require(found > 0, metric + ": cuBLASLt has no BF16 algorithm");
    const float alpha = 1.0f, beta = 0.0f;
    const std::vector<float> ms = time_runs(stream, kWarmup, kRuns, [&](int i) {
      const size_t s = static_cast<size_t>(i % sets);
      CUBLAS_CHECK(cublasLtMatmul(handle, desc, &alpha, ws[s]->as<void>(), la, xs[s]->as<void>(), lb, &beta,
                                  y.as<void>(), ld, y.as<void>(), ld, &results[0].algo, workspace.as<void>(),
                                  workspace_bytes, stream));
    });
    check_bf16_output(y.as<void>(), M * N, metric);
    nlohmann::json extra = timing_extra(device, ms);
    extra["shape"] = {M, N, K};
    extra["input_sets"] = sets;
    extra["layout"] = "y[M,N] bf16 = x[M,K] bf16 . w[N,K]^T bf16, FP32 accumulation, cuBLASLt";
    const double seconds = ms[ms.size() / 2] * 1e-3;
    report.add("gpu", metric, 2.0 * static_cast<double>(M) * N * K / seconds / 1e12, "TFLOP/s", "median", extra);
  } catch (...) {
    release();
    throw;
  }
  release();
}

#ifdef MOERL_BENCH_HAVE_GPU_QUANTIZE
// Quantization of an 8192 x 8192 FP32 matrix; bytes = FP32 read + codes and scales written.
void bench_quantize(Report& report, const std::string& device, cudaStream_t stream) {
  namespace fc = fp8::cuda;
  const int64_t rows = 8192, cols = 8192, n = rows * cols;
  DeviceMemory x(static_cast<size_t>(n) * 4), codes(static_cast<size_t>(n));
  DeviceMemory scales(static_cast<size_t>(std::max(rows, cols) * fp8::tiles(std::max(rows, cols))) * 4);
  fill_normal_kernel<<<grid_for(n), kThreads, 0, stream>>>(x.as<float>(), n, 7);
  CUDA_CHECK_LAUNCH();
  struct Variant {
    const char* metric;
    int64_t scale_count;
    void (*run)(const float*, int64_t, int64_t, uint8_t*, float*, cudaStream_t);
  };
  const Variant variants[] = {
      {"quant_1x128_gbps", rows * fp8::tiles(cols),
       [](const float* x, int64_t r, int64_t c, uint8_t* q, float* s, cudaStream_t st) {
         fc::quantize_1x128(x, r, c, q, s, st);
       }},
      {"quant_128x128_gbps", fp8::tiles(rows) * fp8::tiles(cols), fc::quantize_128x128},
      {"quant_1x128_transposed_gbps", cols * fp8::tiles(rows),
       [](const float* x, int64_t r, int64_t c, uint8_t* q, float* s, cudaStream_t st) {
         fc::quantize_1x128_transposed(x, r, c, q, s, st);
       }},
  };
  auto add = [&](const std::string& metric, double bytes, const std::vector<float>& ms, const std::string& kernel) {
    nlohmann::json extra = timing_extra(device, ms);
    extra["shape"] = {rows, cols};
    extra["bytes"] = bytes;
    if (!kernel.empty()) extra["kernel"] = kernel;
    report.add("gpu", metric, bytes / (ms[ms.size() / 2] * 1e-3) / 1e9, "GB/s", "median", extra);
  };
  for (const Variant& v : variants) {
    const std::vector<float> ms = time_runs(stream, kWarmup, kRuns, [&](int) {
      v.run(x.as<float>(), rows, cols, codes.as<uint8_t>(), scales.as<float>(), stream);
    });
    const bool transposed = std::string(v.metric) == "quant_1x128_transposed_gbps";
    add(v.metric, 5.0 * static_cast<double>(n) + 4.0 * static_cast<double>(v.scale_count), ms,
        transposed ? fc::transposed_kernel_name(fc::TransposedKernel::Tiles64) : "");
  }
  // Both shapes of the transposed kernel (the same bytes; tiles64 is the one in use).
  for (fc::TransposedKernel k : {fc::TransposedKernel::Cols32, fc::TransposedKernel::Tiles64}) {
    const std::vector<float> ms = time_runs(stream, kWarmup, kRuns, [&](int) {
      fc::quantize_1x128_transposed_with(k, x.as<float>(), rows, cols, codes.as<uint8_t>(), scales.as<float>(), stream);
    });
    add(std::string("quant_1x128_transposed_") + fc::transposed_kernel_name(k) + "_gbps",
        5.0 * static_cast<double>(n) + 4.0 * static_cast<double>(cols * fp8::tiles(rows)), ms, "");
  }
  // Both ways from one read (quantize_1x128_dual): x read once, two sets of codes and scales written.
  DeviceMemory codes_t(static_cast<size_t>(n)), scales_t(static_cast<size_t>(cols * fp8::tiles(rows)) * 4);
  const std::vector<float> ms = time_runs(stream, kWarmup, kRuns, [&](int) {
    fc::quantize_1x128_dual(x.as<float>(), rows, cols, nullptr, 0, codes.as<uint8_t>(), scales.as<float>(),
                            codes_t.as<uint8_t>(), scales_t.as<float>(), stream);
  });
  add("quant_1x128_dual_gbps",
      6.0 * static_cast<double>(n) + 4.0 * static_cast<double>(rows * fp8::tiles(cols) + cols * fp8::tiles(rows)), ms,
      "");
}
#endif

}  // namespace

const std::vector<std::string>& gpu_benchmark_names() {
  static const std::vector<std::string> names = {"gemm_fp8_8192", "gemm_fp8_4096x7168x2048", "gemm_fp8_experts",
                                                 "gemm_bf16_8192",
                                                 "quantize", "train_step", "moe_layer", "attention"};
  return names;
}

void run_gpu_benchmarks(Report& report, const std::vector<std::string>& only) {
  for (const std::string& name : only)
    require(std::find(gpu_benchmark_names().begin(), gpu_benchmark_names().end(), name) != gpu_benchmark_names().end(),
            "moerl bench gpu --only: no benchmark named '" + name + "'");
  int count = 0;
  const cudaError_t e = cudaGetDeviceCount(&count);
  require(e == cudaSuccess && count > 0, std::string("moerl bench gpu: no CUDA device (") + cudaGetErrorString(e) + ")");
  int dev = 0;
  CUDA_CHECK(cudaGetDevice(&dev));
  cudaDeviceProp prop{};
  CUDA_CHECK(cudaGetDeviceProperties(&prop, dev));
  int sm_clock_khz = 0, mem_clock_khz = 0;  // CUDA 13 dropped cudaDeviceProp::clockRate / memoryClockRate
  CUDA_CHECK(cudaDeviceGetAttribute(&sm_clock_khz, cudaDevAttrClockRate, dev));
  CUDA_CHECK(cudaDeviceGetAttribute(&mem_clock_khz, cudaDevAttrMemoryClockRate, dev));
  const std::string device = prop.name;
  std::fprintf(stderr, "moerl bench gpu: %s, sm_%d%d, %d SMs, %.0f GiB, L2 %d MiB, SM clock %d MHz, memory clock %d MHz\n",
               prop.name, prop.major, prop.minor, prop.multiProcessorCount,
               static_cast<double>(prop.totalGlobalMem) / (1u << 30), prop.l2CacheSize >> 20, sm_clock_khz / 1000,
               mem_clock_khz / 1000);

  cudaStream_t stream = nullptr;
  CUDA_CHECK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
  // Each benchmark on its own: one that fails is reported and the others still run.
  std::string failed;
  auto attempt = [&](const char* name, const std::function<void()>& fn) {
    if (!only.empty() && std::find(only.begin(), only.end(), name) == only.end()) return;
    try {
      fn();
    } catch (const std::exception& e) {
      CUDA_CHECK(cudaStreamSynchronize(stream));
      std::fprintf(stderr, "moerl bench gpu: %s failed: %s\n", name, e.what());
      failed += failed.empty() ? name : std::string(", ") + name;
    }
  };
  attempt("gemm_fp8_8192", [&] { bench_fp8_gemm(report, device, prop, stream, 8192, 8192, 8192, "gemm_fp8_8192_tflops"); });
  attempt("gemm_fp8_4096x7168x2048",
          [&] { bench_fp8_gemm(report, device, prop, stream, 4096, 7168, 2048, "gemm_fp8_4096x7168x2048_tflops"); });
  attempt("gemm_fp8_experts", [&] {
    bench_fp8_expert_gemms(report, device, stream, {"", 1536, 2048, 1408, 64});
    bench_fp8_expert_gemms(report, device, stream, {"600m_", 2048, 1024, 704, 32});
  });
  attempt("gemm_bf16_8192", [&] { bench_bf16_gemm(report, device, prop, stream, 8192, 8192, 8192, "gemm_bf16_8192_tflops"); });
#ifdef MOERL_BENCH_HAVE_GPU_QUANTIZE
  attempt("quantize", [&] { bench_quantize(report, device, stream); });
#else
  std::fprintf(stderr, "moerl bench gpu: no GPU quantization kernels in this build: quant_* skipped\n");
#endif
  // Training (bench/cuda/train_step_bench.cu): the bench-600m step and one MoE layer, fp8 and bf16.
  attempt("train_step", [&] { bench_train_step(report, device); });
  attempt("moe_layer", [&] { bench_moe_layer(report, device); });
  attempt("attention", [&] { bench_attention(report, device); });
  CUDA_CHECK(cudaStreamDestroy(stream));
  require(failed.empty(), "moerl bench gpu: failed: " + failed);
}

void run_gpu_dp_benchmarks(Report& report) {
  int devices = 0;
  CUDA_CHECK(cudaGetDeviceCount(&devices));
  require(devices >= 1, "moerl bench gpu-dp: no CUDA device");
  cudaDeviceProp prop{};
  CUDA_CHECK(cudaGetDeviceProperties(&prop, 0));
  std::fprintf(stderr, "moerl bench gpu-dp: %d x %s\n", devices, prop.name);
  bench_train_step_data_parallel(report, prop.name);
}

}  // namespace moerl::bench
