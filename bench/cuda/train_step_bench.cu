// `moerl bench gpu`: training on the GPU, on random data (issue 4; the PyTorch peers are bench/peers/).
//   train_step_fp8_tokens_per_s, train_step_bf16_tokens_per_s
//       bench-600m (recipes/pretrain-brown-gpu-*.yaml's model, bench/peers/hf_train_step.py's BENCH_600M),
//       random tokens, batch 8 x 2048: zero_grad + forward + backward + GpuAdamW step (global-norm clipping at 1.0)
//       on GpuModel's stream; median of 10 steps timed with CUDA events after 3 warm-up steps.
//   train_step_peak_mem_gib
//       the fp8 step's peak device memory: GpuModel::peak_memory_bytes (parameters, gradients, activations,
//       prepared weights, the stream-ordered pool's high-water mark) + GpuAdamW's moments; the bf16 step's in
//       "bf16_gib".
//   train_step_fp8_single_tokens_per_s, train_step_fp8_dp1_tokens_per_s, train_step_fp8_dp2_tokens_per_s
//       (`moerl bench gpu-dp`) the same fp8 step on the same global batch of 8 x 2048: on one GPU (GpuModel +
//       GpuAdamW); through GpuDataParallel with one replica (the engine's overhead: one-rank NCCL collectives);
//       over two data-parallel replicas of 4 x 2048 each when two GPUs are visible (NCCL reduce-scatter of the
//       gradients, ZeRO-1 AdamW on each half, all-gather of the weights). Wall-clock per step (every step ends
//       synchronized with the host: the optimizer reads the global norm), median of 10 after 3 warm-up steps.
//   moe_layer_fp8_ms, moe_layer_bf16_ms
//       one MoE layer, forward + backward with weight gradients, at T = 16384 tokens (8 x 2048), hidden 2048,
//       moe_intermediate 1408, 64 routed experts top-6 + 1 shared (bench/peers/torch_grouped_mm_moe.py's shapes):
//       runtime/gpu's GpuMoe block (router, permutation, routed and shared experts) alone, no attention or
//       norms; median of 10 CUDA-event-timed passes after 3 warm-up passes.
//   attention_fwd_ms, attention_bwd_ms
//       bench-600m's causal attention core alone (batch 8, seq 2048, 16 heads, dqk 96, dv 64; the model's path:
//       q and MLA's keys and values packed to BF16 once, not timed, then cuda::attention_forward_bf16_packed /
//       attention_backward_bf16_packed with FP32 outputs); TFLOP/s in "tflops" from the causal half of the
//       products (forward 2 · B · H · L² / 2 · (dqk + dv), backward the same with 3 dqk + 2 dv: S again, dP, dV,
//       dQ, dK). bench/peers/torch_attention.py runs PyTorch's sdpa on the same shapes. Median of 20 passes
//       after 5.
// MOERL_GPU_TRACE=1: after the timed train_step and moe_layer runs, 3 more under a KernelTrace (CUPTI), whose
// summary goes to stderr: the GPU's busy and idle time per step, the longest idle gaps, the kernels by total time
// (bench/cuda/kernel_trace.hpp).
#include <cuda_runtime.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdlib>
#include <cstdio>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "bench/cuda/train_step_bench.hpp"
#include "kernels/cuda/cuda_check.hpp"
#include "runtime/error.hpp"

#ifdef MOERL_HAVE_GPU_MODEL
#include "bench/cuda/kernel_trace.hpp"
#include "kernels/cuda/attention.hpp"
#include "runtime/gpu/gpu_adamw.hpp"
#include "runtime/gpu/gpu_data_parallel.hpp"
#include "runtime/gpu/gpu_layers.hpp"
#include "runtime/gpu/gpu_model.hpp"
#include "runtime/gpu/gpu_params.hpp"
#endif

namespace moerl::bench {

#ifdef MOERL_HAVE_GPU_MODEL
namespace {

constexpr int kWarmupSteps = 3;
constexpr int kTimedSteps = 10;
constexpr int64_t kBatch = 8, kSeq = 2048;
constexpr int kThreads = 256;

// Counter-based normal-ish values: element i of stream `seed`, a centred sum of 4 uniforms (variance 1).
__device__ __forceinline__ float normalish(uint64_t i, uint32_t seed) {
  float s = 0.0f;
  for (uint32_t j = 0; j < 4; ++j) {
    uint64_t z = (4 * i + j) * 0x9E3779B97F4A7C15ull + seed * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    s += (static_cast<uint32_t>(z ^ (z >> 31)) >> 8) * (1.0f / 16777216.0f);
  }
  return (s - 2.0f) * 1.7320508f;
}

__global__ void fill_kernel(float* out, int64_t n, uint32_t seed, float stddev, float constant) {
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < n; i += int64_t{gridDim.x} * blockDim.x)
    out[i] = stddev > 0.0f ? stddev * normalish(i, seed) : constant;
}

void fill(float* out, int64_t n, uint32_t seed, float stddev, float constant, cudaStream_t stream) {
  if (n == 0) return;
  const auto blocks = static_cast<unsigned>(std::clamp<int64_t>((n + kThreads - 1) / kThreads, 1, 65536));
  fill_kernel<<<blocks, kThreads, 0, stream>>>(out, n, seed, stddev, constant);
  CUDA_CHECK_LAUNCH();
}

// Model::init_random's distribution without the host: matrices normal(0, initializer_range), RMSNorm weights
// (the trainable 1-D tensors) one, router biases (not trainable) zero.
void init_params(const std::vector<gpu::DeviceParam>& params, double initializer_range, cudaStream_t stream) {
  uint32_t seed = 1;
  for (const gpu::DeviceParam& p : params) {
    if (p.shape.size() >= 2)
      fill(p.value, p.numel, seed++, static_cast<float>(initializer_range), 0.0f, stream);
    else
      fill(p.value, p.numel, 0, 0.0f, p.trainable ? 1.0f : 0.0f, stream);
  }
  CUDA_CHECK(cudaStreamSynchronize(stream));
}

// Milliseconds between two events around fn(), `runs` times after `warmup` untimed calls; sorted.
template <class F> std::vector<float> time_on_stream(cudaStream_t stream, int warmup, int runs, F&& fn) {
  for (int i = 0; i < warmup; ++i) fn(i);
  cudaEvent_t start, stop;
  CUDA_CHECK(cudaEventCreate(&start));
  CUDA_CHECK(cudaEventCreate(&stop));
  std::vector<float> ms(static_cast<size_t>(runs));
  try {
    for (int i = 0; i < runs; ++i) {
      CUDA_CHECK(cudaEventRecord(start, stream));
      fn(warmup + i);
      CUDA_CHECK(cudaEventRecord(stop, stream));
      CUDA_CHECK(cudaEventSynchronize(stop));
      CUDA_CHECK(cudaEventElapsedTime(&ms[static_cast<size_t>(i)], start, stop));
    }
  } catch (...) {
    cudaEventDestroy(start);
    cudaEventDestroy(stop);
    throw;
  }
  CUDA_CHECK(cudaEventDestroy(start));
  CUDA_CHECK(cudaEventDestroy(stop));
  std::sort(ms.begin(), ms.end());
  return ms;
}

// fn(0 .. steps - 1) under a KernelTrace (MOERL_GPU_TRACE=1), its summary on stderr headed by `label`; after the
// timed runs, so that the trace's own cost (CUPTI's records) stays out of the figures reported.
template <class F> void trace_if_requested(const std::string& label, int steps, F&& fn) {
  if (!KernelTrace::requested()) return;
  KernelTrace trace;
  trace.start();  // a first, unreported step: CUPTI's own start-up stalls the host for milliseconds
  fn(0);
  trace.stop();
  trace.start();
  for (int i = 1; i <= steps; ++i) fn(i);
  trace.stop();
  trace.report(stderr, label, steps);
  if (const char* prefix = std::getenv("MOERL_GPU_TRACE_DUMP"); prefix != nullptr && *prefix != '\0') {
    std::string name = label;
    std::replace(name.begin(), name.end(), ' ', '_');
    trace.dump(prefix + name + ".tsv");
  }
}

double median(const std::vector<float>& sorted) {
  const size_t n = sorted.size();
  return n % 2 ? sorted[n / 2] : 0.5 * (sorted[n / 2 - 1] + sorted[n / 2]);
}

struct StepResult {
  std::vector<float> ms;  // sorted
  double peak_bytes = 0;
  double loss = 0;
  size_t optimizer_spans = 0;
  size_t optimizer_fp8_copies = 0;  // prepared FP8 weights the update writes (GpuAdamW::fp8_copies_written)
};

StepResult time_train_step(Precision precision) {
  const ModelConfig config = ModelConfig::bench_600m();
  gpu::GpuModel model(config);
  init_params(model.params(), config.initializer_range, model.stream());
  model.linear().weights_changed();
  // DeepSeek-V3's optimizer settings; the HF peer's learning rate.
  AdamWConfig opt_config;
  opt_config.lr = 1e-4, opt_config.weight_decay = 0.1, opt_config.clip_grad_norm = 1.0, opt_config.total_steps = 1000;
  gpu::GpuAdamW optimizer(model, opt_config);

  // Random tokens, each row's labels the next tokens (the last one unlabelled), as the HF peer's labels = ids.
  std::mt19937_64 rng(0);
  std::vector<int64_t> ids(static_cast<size_t>(kBatch * kSeq)), labels(ids.size());
  for (int64_t& id : ids) id = static_cast<int64_t>(rng() % static_cast<uint64_t>(config.vocab_size));
  for (size_t i = 0; i < ids.size(); ++i)
    labels[i] = (i + 1) % static_cast<size_t>(kSeq) == 0 ? kIgnoreLabel : ids[i + 1];
  const TokenBatch batch{ids.data(), labels.data(), kBatch, kSeq};
  ForwardOptions options;
  options.precision = precision;

  StepResult out;
  auto step = [&](int i) {
    model.zero_grad();
    const LossReport r = model.forward(batch, options);
    require(std::isfinite(r.loss), "train step: the loss is " + std::to_string(r.loss));
    model.backward();
    optimizer.step(i);
    out.loss = r.loss;
  };
  for (int i = 0; i < kWarmupSteps; ++i) step(i);
  CUDA_CHECK(cudaStreamSynchronize(model.stream()));
  model.reset_peak_memory();
  out.ms = time_on_stream(model.stream(), 0, kTimedSteps, [&](int i) { step(kWarmupSteps + i); });
  trace_if_requested(std::string("train_step ") + std::string(precision_name(precision)), 3,
                     [&](int i) { step(kWarmupSteps + kTimedSteps + i); });
  out.peak_bytes = static_cast<double>(model.peak_memory_bytes() + optimizer.device_bytes());
  out.optimizer_spans = optimizer.span_count();
  out.optimizer_fp8_copies = optimizer.fp8_copies_written();
  return out;
}

void report_step(Report& report, const std::string& device, Precision precision, const StepResult& r,
                 const std::string& metric) {
  const double ms = median(r.ms);
  nlohmann::json extra = {{"device", device},
                          {"precision", std::string(precision_name(precision))},
                          {"model", "bench-600m"},
                          {"batch", kBatch},
                          {"seq", kSeq},
                          {"step_ms", ms},
                          {"min_ms", r.ms.front()},
                          {"max_ms", r.ms.back()},
                          {"runs", r.ms.size()},
                          {"warmup", kWarmupSteps},
                          {"loss", r.loss},
                          {"optimizer_spans", r.optimizer_spans},
                          {"optimizer_fp8_copies", r.optimizer_fp8_copies},
                          {"what", "zero_grad + forward + backward + GpuAdamW step (clip 1.0), random tokens"}};
  report.add("gpu", metric, static_cast<double>(kBatch * kSeq) / (ms * 1e-3), "tokens/s", "median", extra);
}

}  // namespace

void bench_train_step(Report& report, const std::string& device) {
  const StepResult fp8 = time_train_step(Precision::FP8);
  report_step(report, device, Precision::FP8, fp8, "train_step_fp8_tokens_per_s");
  const StepResult bf16 = time_train_step(Precision::BF16);
  report_step(report, device, Precision::BF16, bf16, "train_step_bf16_tokens_per_s");
  constexpr double kGiB = 1024.0 * 1024.0 * 1024.0;
  report.add("gpu", "train_step_peak_mem_gib", fp8.peak_bytes / kGiB, "GiB", "max",
             {{"device", device},
              {"precision", "fp8"},
              {"bf16_gib", bf16.peak_bytes / kGiB},
              {"what", "GpuModel::peak_memory_bytes (params, grads, activations, prepared weights, pool high-water) "
                       "+ GpuAdamW moments, over the timed bench-600m steps"}});
}

void bench_moe_layer(Report& report, const std::string& device) {
  // bench/peers/torch_grouped_mm_moe.py's layer. The block needs a whole model's ParamStore: one MoE layer,
  // a one-head attention and a 256-token vocabulary that the block never touches.
  ModelConfig c;
  c.vocab_size = 256;
  c.hidden_size = 2048;
  c.moe_intermediate_size = 1408;
  c.num_hidden_layers = 1;
  c.first_k_dense_replace = 0;
  c.num_attention_heads = 1;
  c.kv_lora_rank = 64;
  c.qk_nope_head_dim = 64;
  c.qk_rope_head_dim = 32;
  c.v_head_dim = 64;
  c.n_routed_experts = 64;
  c.num_experts_per_tok = 6;
  c.n_shared_experts = 1;
  c.n_group = 1;
  c.topk_group = 1;
  c.norm_topk_prob = true;
  c.routed_scaling_factor = 1.0;
  c.validate("moe_layer bench");
  const int64_t T = kBatch * kSeq, H = c.hidden_size;

  cudaStream_t stream = nullptr;
  CUDA_CHECK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
  try {
    // As GpuModel: the pool keeps what it reserved, so steady-state passes allocate nothing from the driver.
    int dev = 0;
    cudaMemPool_t pool = nullptr;
    CUDA_CHECK(cudaGetDevice(&dev));
    CUDA_CHECK(cudaDeviceGetDefaultMemPool(&pool, dev));
    uint64_t threshold = std::numeric_limits<uint64_t>::max();
    CUDA_CHECK(cudaMemPoolSetAttribute(pool, cudaMemPoolAttrReleaseThreshold, &threshold));
    {
      gpu::detail::ParamStore store(c);
      init_params(store.all(), c.initializer_range, stream);
      gpu::detail::GpuMoe moe(c, store, "model.layers.0.mlp");
      gpu::detail::Slab plan;
      moe.bind(plan, kBatch, kSeq);
      gpu::detail::DeviceAlloc arena(plan.used()), io(4 * static_cast<size_t>(T * H) * sizeof(float));
      gpu::detail::Slab real(arena.get());
      moe.bind(real, kBatch, kSeq);
      float* x = reinterpret_cast<float*>(io.get());
      float* y = x + T * H;
      float* dy = y + T * H;
      float* dx = dy + T * H;
      fill(x, T * H, 101, 1.0f, 0.0f, stream);    // RMSNorm outputs: unit scale
      fill(dy, T * H, 102, 1e-3f, 0.0f, stream);  // a loss gradient's scale
      for (Precision p : {Precision::FP8, Precision::BF16}) {
        cuda::LinearContext linear;
        const gpu::detail::Run run{stream, &linear, p, false};
        const auto layer = [&](int) {
          moe.forward(x, y, run, 0.0f, true);
          moe.backward(dy, dx, run);
        };
        const std::vector<float> ms = time_on_stream(stream, kWarmupSteps, kTimedSteps, layer);
        trace_if_requested(std::string("moe_layer ") + std::string(precision_name(p)), 3, layer);
        std::vector<float> probe(4096);
        CUDA_CHECK(cudaMemcpy(probe.data(), dx, probe.size() * sizeof(float), cudaMemcpyDeviceToHost));
        require(std::all_of(probe.begin(), probe.end(), [](float v) { return std::isfinite(v); }) &&
                    std::any_of(probe.begin(), probe.end(), [](float v) { return v != 0.0f; }),
                "moe_layer bench: dx is not finite or all zero");
        const std::string metric = std::string("moe_layer_") + std::string(precision_name(p)) + "_ms";
        report.add("gpu", metric, median(ms), "ms", "median",
                   {{"device", device},
                    {"precision", std::string(precision_name(p))},
                    {"tokens", T},
                    {"hidden", H},
                    {"moe_intermediate", c.moe_intermediate_size},
                    {"experts", c.n_routed_experts},
                    {"top_k", c.num_experts_per_tok},
                    {"shared_experts", c.n_shared_experts},
                    {"min_ms", ms.front()},
                    {"max_ms", ms.back()},
                    {"runs", ms.size()},
                    {"warmup", kWarmupSteps},
                    {"what", "runtime/gpu GpuMoe forward + backward (router FP32, routed and shared experts in "
                             "the precision, weight gradients included), no attention or norms"}});
      }
    }
  } catch (...) {
    cudaStreamSynchronize(stream);
    cudaStreamDestroy(stream);
    throw;
  }
  CUDA_CHECK(cudaStreamDestroy(stream));
}

void bench_attention(Report& report, const std::string& device) {
  constexpr int64_t H = 16, Dn = 64, Dr = 32, Dqk = Dn + Dr, Dv = 64, kKvLora = 256, kAttnWarmup = 5, kAttnRuns = 20;
  const int64_t T = kBatch * kSeq, rows = T * H;
  const float scale = 1.0f / std::sqrt(static_cast<float>(Dqk));
  cudaStream_t stream = nullptr;
  CUDA_CHECK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
  try {
    // MLA's producers as the model packs them: q [T, H, 96], kv [T, H, 64 + 64] (k_nope | v), ckv [T, 256 + 32]
    // (the rope key last); then out, dout, dv [rows, 64], dq, dk [rows, 96], lse [B, H, L].
    const size_t floats = static_cast<size_t>(rows) * (3 * Dqk + (Dn + Dv) + 3 * Dv) +
                          static_cast<size_t>(T * (kKvLora + Dr) + kBatch * H * kSeq);
    gpu::detail::DeviceAlloc buffers(floats * sizeof(float)),
        packed(cuda::attention_bf16_packed_bytes(kBatch, kSeq, H, Dqk, Dv));
    float* q = reinterpret_cast<float*>(buffers.get());
    float* kv = q + rows * Dqk;
    float* ckv = kv + rows * (Dn + Dv);
    float* out = ckv + T * (kKvLora + Dr);
    float* dout = out + rows * Dv;
    float* dq = dout + rows * Dv;
    float* dk = dq + rows * Dqk;
    float* dv = dk + rows * Dqk;
    float* lse = dv + rows * Dv;
    fill(q, rows * Dqk, 201, 1.0f, 0.0f, stream);
    fill(kv, rows * (Dn + Dv), 202, 1.0f, 0.0f, stream);
    fill(ckv, T * (kKvLora + Dr), 203, 1.0f, 0.0f, stream);
    fill(dout, rows * Dv, 204, 1e-3f, 0.0f, stream);
    require(cuda::attention_pack_mla_bf16_supported(kKvLora, Dn, Dr, Dv), "attention bench: MLA packing unsupported");
    cuda::attention_pack_mla_bf16(q, kv, ckv, kKvLora, packed.get(), kBatch, kSeq, H, Dn, Dr, Dv, stream);
    const std::vector<float> fwd = time_on_stream(stream, kAttnWarmup, kAttnRuns, [&](int) {
      cuda::attention_forward_bf16_packed(packed.get(), out, lse, kBatch, kSeq, H, Dqk, Dv, scale, stream);
    });
    const std::vector<float> bwd = time_on_stream(stream, kAttnWarmup, kAttnRuns, [&](int) {
      cuda::attention_backward_bf16_packed(dout, packed.get(), out, lse, dq, dk, dv, kBatch, kSeq, H, Dqk, Dv, scale,
                                           stream);
    });
    const double pairs = static_cast<double>(kBatch * H) * static_cast<double>(kSeq) * static_cast<double>(kSeq) / 2;
    auto add = [&](const char* metric, const std::vector<float>& ms, double flops) {
      const double m = median(ms);
      report.add("gpu", metric, m, "ms", "median",
                 {{"device", device},
                  {"batch", kBatch},
                  {"seq", kSeq},
                  {"heads", H},
                  {"dqk", Dqk},
                  {"dv", Dv},
                  {"tflops", flops / (m * 1e-3) / 1e12},
                  {"min_ms", ms.front()},
                  {"max_ms", ms.back()},
                  {"runs", ms.size()},
                  {"what", "cuda::attention_*_bf16_packed, causal, BF16 operands, FP32 statistics and outputs"}});
    };
    add("attention_fwd_ms", fwd, 2 * pairs * (Dqk + Dv));
    add("attention_bwd_ms", bwd, 2 * pairs * (3 * Dqk + 2 * Dv));
  } catch (...) {
    cudaStreamSynchronize(stream);
    cudaStreamDestroy(stream);
    throw;
  }
  CUDA_CHECK(cudaStreamDestroy(stream));
}

namespace {

// Random tokens of the global batch (as time_train_step's).
struct BenchTokens {
  std::vector<int64_t> ids, labels;
  TokenBatch batch;
  explicit BenchTokens(int64_t vocab) : ids(static_cast<size_t>(kBatch * kSeq)), labels(ids.size()) {
    std::mt19937_64 rng(0);
    for (int64_t& id : ids) id = static_cast<int64_t>(rng() % static_cast<uint64_t>(vocab));
    for (size_t i = 0; i < ids.size(); ++i)
      labels[i] = (i + 1) % static_cast<size_t>(kSeq) == 0 ? kIgnoreLabel : ids[i + 1];
    batch = {ids.data(), labels.data(), kBatch, kSeq};
  }
};

// Milliseconds of fn(step) by the host clock, `runs` times after `warmup` calls; sorted.
template <class F> std::vector<float> time_host(int warmup, int runs, F&& fn) {
  for (int i = 0; i < warmup; ++i) fn(i);
  std::vector<float> ms;
  for (int i = 0; i < runs; ++i) {
    const auto t0 = std::chrono::steady_clock::now();
    fn(warmup + i);
    ms.push_back(static_cast<float>(std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count()));
  }
  std::sort(ms.begin(), ms.end());
  return ms;
}

AdamWConfig bench_adamw() {
  AdamWConfig o;  // time_train_step's
  o.lr = 1e-4, o.weight_decay = 0.1, o.clip_grad_norm = 1.0, o.total_steps = 1000;
  return o;
}

// `engine`: through GpuDataParallel (metric ..._dpN_...), else the plain single-GPU step (..._single_...).
void report_dp(Report& report, const std::string& device, int replicas, const std::vector<float>& ms, double loss,
               bool engine) {
  const double median_ms = median(ms);
  report.add("gpu", engine ? "train_step_fp8_dp" + std::to_string(replicas) + "_tokens_per_s"
                           : std::string("train_step_fp8_single_tokens_per_s"),
             static_cast<double>(kBatch * kSeq) / (median_ms * 1e-3), "tokens/s", "median",
             {{"device", device},
              {"replicas", replicas},
              {"precision", "fp8"},
              {"model", "bench-600m"},
              {"global_batch", kBatch},
              {"batch_per_replica", kBatch / replicas},
              {"seq", kSeq},
              {"step_ms", median_ms},
              {"min_ms", ms.front()},
              {"max_ms", ms.back()},
              {"runs", ms.size()},
              {"warmup", kWarmupSteps},
              {"loss", loss},
              {"what", !engine ? "GpuModel + GpuAdamW on one GPU, host clock per step"
                               : "GpuDataParallel: forward/backward per replica, NCCL reduce-scatter, ZeRO-1 "
                                 "GpuAdamW on each shard, NCCL all-gather; host clock per step"}});
}

}  // namespace

void bench_train_step_data_parallel(Report& report, const std::string& device) {
  const ModelConfig config = ModelConfig::bench_600m();
  const BenchTokens tokens(config.vocab_size);
  ForwardOptions options;
  options.precision = Precision::FP8;
  {
    gpu::GpuModel model(config);
    init_params(model.params(), config.initializer_range, model.stream());
    model.linear().weights_changed();
    gpu::GpuAdamW optimizer(model, bench_adamw());
    double loss = 0;
    const auto ms = time_host(kWarmupSteps, kTimedSteps, [&](int i) {
      model.zero_grad();
      loss = model.forward(tokens.batch, options).loss;
      model.backward();
      optimizer.step(i);
      CUDA_CHECK(cudaStreamSynchronize(model.stream()));
    });
    report_dp(report, device, 1, ms, loss, false);
  }
  // The data-parallel engine with one replica (its thread hop and one-rank NCCL collectives: the overhead next
  // to the plain step), then with two replicas when two GPUs are visible.
  int devices = 0;
  CUDA_CHECK(cudaGetDeviceCount(&devices));
  for (int replicas : {1, 2}) {
    if (replicas > devices) {
      std::fprintf(stderr, "moerl bench gpu-dp: %d replicas need %d GPUs, %d visible: skipped\n", replicas, replicas,
                   devices);
      continue;
    }
    gpu::GpuDataParallel dp(config, replicas);
    dp.each_model([&](int, gpu::GpuModel& model) {
      init_params(model.params(), config.initializer_range, model.stream());  // the same seeds: equal replicas
      model.linear().weights_changed();
    });
    dp.start_stage(bench_adamw());
    double loss = 0;
    const auto ms = time_host(kWarmupSteps, kTimedSteps, [&](int i) {
      dp.zero_grad();
      loss = dp.forward(tokens.batch, options).loss;
      dp.backward();
      dp.optimizer_step(i);
    });
    require(std::isfinite(loss), "train step (data-parallel): the loss is " + std::to_string(loss));
    report_dp(report, device, replicas, ms, loss, true);
  }
}

#else  // a CUDA build without runtime/gpu

void bench_train_step(Report&, const std::string&) {
  throw Error("moerl bench gpu: train_step_*: this build has no GPU model (runtime/gpu)");
}
void bench_moe_layer(Report&, const std::string&) {
  throw Error("moerl bench gpu: moe_layer_*: this build has no GPU model (runtime/gpu)");
}
void bench_attention(Report&, const std::string&) {
  throw Error("moerl bench gpu: attention_*: this build has no GPU model (runtime/gpu)");
}
void bench_train_step_data_parallel(Report&, const std::string&) {
  throw Error("moerl bench gpu-dp: this build has no GPU model (runtime/gpu)");
}

#endif

}  // namespace moerl::bench
