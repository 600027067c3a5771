// The routed experts of an MoE layer on the GPU, forward, in the BF16 recipe of kernels/linear.hpp: the permuted
// tokens of every expert through gate/up, SwiGLU and down, with BF16 operands (x, weights and h rounded to nearest
// even) and FP32 accumulation and outputs — what cpu::linear_forward(Precision::BF16, ...) and
// cpu::swiglu_forward compute per expert in runtime/model/feed_forward.cpp, up to the order of the FP32 sums.
//
// One cuBLASLt matmul per expert and projection (gate and up fused: one [2I, H] weight), on `stream`; SwiGLU and
// the BF16 conversions are one kernel each over all rows. The per-expert row counts are shapes of host calls, so
// the plan's offsets must be on the host (one copy after moe_permute_plan). The sequence is capturable in a CUDA
// graph while the offsets stay the same. (cublasGemmGroupedBatchedEx would make it one call, but it lives in
// libcublas, which the build does not link.)
#pragma once
#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>
#include <memory>

namespace moerl::cuda {

// x [n] FP32 -> y [n] BF16 bit patterns, round to nearest even, NaN kept NaN (as moerl::bf16_from_float).
void to_bf16(const float* x, int64_t n, uint16_t* y, cudaStream_t stream = nullptr);
// x [n] FP32 rounded in place to the nearest BF16 value (as moerl::round_bf16).
void round_to_bf16(float* x, int64_t n, cudaStream_t stream = nullptr);

// The weight gradients of the experts whose rows offsets_host [E + 1] (host memory) leave empty set to zero, one
// memset per weight and run of such experts: gate_grad and up_grad [E, I, H], down_grad [E, H, I]; with
// gate_up_stride (elements from expert e's gate and up gradients to e + 1's; 0: I · H) 2 · I · H and up_grad =
// gate_grad + I · H (interleaved, MoeFp8Experts::gate_up_stride), one memset per run for both. For backward passes
// that write each expert's gradients whole with its own GEMMs (no GEMM writes an expert without rows).
void zero_expert_grads(float* gate_grad, float* up_grad, float* down_grad, int64_t E, int64_t I, int64_t H,
                       const int64_t* offsets_host, cudaStream_t stream, int64_t gate_up_stride = 0);

// The routed experts' weights on the device as BF16 bit patterns, experts stacked:
//   gate_up [E, 2I, H]  expert e: rows 0 .. I-1 its gate_proj.weight [I, H], rows I .. 2I-1 its up_proj.weight
//   down    [E, H, I]   expert e: its down_proj.weight
// H and I must be multiples of 8 (BF16 rows 16-byte aligned for the tensor cores); pointers 16-byte aligned.
struct MoeExpertWeights {
  const uint16_t* gate_up = nullptr;
  const uint16_t* down = nullptr;
  int64_t experts = 0, hidden = 0, inter = 0;  // E, H, I
};

// A cuBLASLt handle, its workspace and the matmul plans (per shape: layouts and the heuristic's algorithm, made on
// first use; a cache of at most kMaxPlans, cleared when full). Bound to the device current at construction.
// Calls on one context must not overlap in time on different streams (they share the workspace).
class MoeExpertsGemm {
 public:
  static constexpr size_t kDefaultWorkspaceBytes = size_t{32} << 20;
  static constexpr size_t kMaxPlans = 4096;
  explicit MoeExpertsGemm(size_t workspace_bytes = kDefaultWorkspaceBytes);
  ~MoeExpertsGemm();
  MoeExpertsGemm(const MoeExpertsGemm&) = delete;
  MoeExpertsGemm& operator=(const MoeExpertsGemm&) = delete;

  // xp [R, H] FP32 rows in expert-major order (moe_gather's), offsets_host [E + 1] ON THE HOST (expert e owns rows
  // offsets[e] .. offsets[e+1] - 1, R = offsets[E]) -> yp [R, H] FP32 (overwritten) = down(silu(gate(x)) · up(x))
  // of each row's expert. Asynchronous on `stream`; takes R · (2H + 10I) bytes of scratch from the
  // stream-ordered pool. Throws moerl::Error on bad shapes, offsets or pointers.
  void forward(const MoeExpertWeights& w, const float* xp, const int64_t* offsets_host, float* yp,
               cudaStream_t stream = nullptr);

  size_t cached_plans() const;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace moerl::cuda
