// `moerl bench gpu`'s training metrics (bench/cuda/train_step_bench.cu), called by run_gpu_benchmarks.
#pragma once
#include <cuda_runtime_api.h>

#include <string>

#include "bench/report.hpp"

namespace moerl::bench {

// train_step_fp8_tokens_per_s, train_step_bf16_tokens_per_s, train_step_peak_mem_gib: bench-600m, batch 8 x 2048.
void bench_train_step(Report& report, const std::string& device);
// moe_layer_fp8_ms, moe_layer_bf16_ms: one MoE layer forward + backward at T = 16384.
void bench_moe_layer(Report& report, const std::string& device);
// attention_fwd_ms, attention_bwd_ms: bench-600m's causal attention core (8 x 2048, 16 heads, dqk 96, dv 64).
void bench_attention(Report& report, const std::string& device);
// train_step_fp8_{single,dp1,dp2}_tokens_per_s (`moerl bench gpu-dp`): the bench-600m fp8 step on the global
// batch 8 x 2048, on one GPU, and through runtime/gpu/gpu_data_parallel.hpp with one and (two GPUs) two replicas.
void bench_train_step_data_parallel(Report& report, const std::string& device);

}  // namespace moerl::bench
