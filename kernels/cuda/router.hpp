// The DeepSeek-V3 router on the GPU (kernels/cuda/router.cu): the functions of kernels/router.hpp with the same
// arguments plus a stream; every pointer is device memory, calls are asynchronous on `stream` (except
// router_balance_loss, which returns the loss and so waits for it).
//
// Same choice as cpu::router_forward, bit for bit on the same scores: the biased scores, the group scores
// (sum of the top-2 biased scores) and the gating weights are the same IEEE single operations in the same order
// (__f*_rn intrinsics, so nothing is fused into an FMA), groups and experts are ranked by (value descending,
// index ascending), and experts of excluded groups are never candidates.
// The sigmoid is 1 / (1 + exp(-x)) with exp evaluated in double and rounded once to float: the correctly rounded
// expf (but for about 2^-29 of the inputs). The CPU calls the C library's expf, which glibc documents at 0.502
// ulp: on the rare logits where glibc misrounds, the scores differ by an ulp, and the choice can differ only if
// that ulp decides a near-tie. tests/gpu/moe_routing_gpu.cpp measures how often that happens.
//
// Limits of the GPU path (checked; the model has E <= 256): n_experts <= 1024, one warp per token.
// Throws moerl::Error on an invalid spec, negative sizes, null pointers, or a failed launch.
#pragma once
#include <cuda_runtime_api.h>

#include <cstdint>

#include "kernels/router.hpp"

namespace moerl::cuda {

using cpu::RouterSpec;

// The largest n_experts the GPU router takes: each lane of a token's warp holds a 32-bit mask of its experts.
constexpr int64_t kRouterMaxExperts = 1024;

// logits [T, E], bias [E] -> scores [T, E], topk_idx [T, K], topk_weight [T, K]. scores may be logits.
void router_forward(const RouterSpec& spec, const float* logits, const float* bias, int64_t tokens, float* scores,
                    int32_t* topk_idx, float* topk_weight, cudaStream_t stream = nullptr);

// topk_weight [T, K] from scores [T, E] and topk_idx [T, K] (values in [0, E)).
void router_weights(const RouterSpec& spec, const float* scores, const int32_t* topk_idx, int64_t tokens,
                    float* topk_weight, cudaStream_t stream = nullptr);

// dlogits [T, E] (overwritten) from dweight [T, K] and optional dscores [T, E] (null: none). dscores may be
// dlogits itself.
void router_backward(const RouterSpec& spec, const float* scores, const int32_t* topk_idx, const float* dweight,
                     const float* dscores, int64_t tokens, float* dlogits, cudaStream_t stream = nullptr);

// The sequence-wise balance loss, as cpu::router_balance_loss (sums in double; per-expert sums over a
// sequence's tokens and the sum over experts in a fixed order, so the result is the same every run, and equal
// to the CPU's up to the order of double additions). Adds its gradient to dscores [T, E] when not null.
// Synchronizes `stream` to return the loss. seq must be > 0 when batch > 0.
float router_balance_loss(const RouterSpec& spec, const float* scores, const int32_t* topk_idx, int64_t batch,
                          int64_t seq, float alpha, float* dscores, cudaStream_t stream = nullptr);

}  // namespace moerl::cuda
