// DeepSeek-V3 router kernels (see kernels/cuda/router.hpp for what matches the CPU and why).
// Forward and backward: one warp per token. The forward keeps the token's scores and biased scores in shared
// memory; each lane owns the experts lane, lane + 32, ... (a bit each in a 32-bit candidate mask), ranks groups and
// then experts with K rounds of a warp arg-max (value descending, index ascending), so the choice comes out in the
// CPU's order. Balance loss: per-(sequence, 64-token chunk) partial sums in double, reduced over chunks in order.
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <limits>
#include <string>
#include <vector>

#include "kernels/cuda/cuda_check.hpp"
#include "kernels/cuda/router.hpp"
#include "kernels/cuda/stream_scratch.hpp"
#include "runtime/error.hpp"

namespace moerl::cuda {
namespace {

constexpr int kWarp = 32;
constexpr unsigned kFullMask = 0xFFFFFFFFu;
constexpr float kInf = std::numeric_limits<float>::infinity();
constexpr float kNormEps = 1e-20f;                           // kernels/cpu/router.cpp's (HF's) epsilon
constexpr int kNone = std::numeric_limits<int32_t>::max();  // "no candidate" in a ranking
constexpr int kMaxWarpsPerBlock = 8;
constexpr int64_t kSharedBudget = 48 * 1024;  // dynamic shared memory a block gets without opting in
static_assert(kRouterMaxExperts <= 32 * kWarp, "a lane's experts must fit one 32-bit mask");

constexpr int kBalanceChunk = 64;  // tokens per partial sum of the balance loss
constexpr int kBalanceThreads = 256;
constexpr int kBalanceWarps = kBalanceThreads / kWarp;

// The spec as the kernels see it (validated on the host).
struct Spec {
  int experts, groups, topk_group, top_k;
  bool norm;
  float scale;
};

__device__ __forceinline__ float sigmoid(float x) {
  const float e = static_cast<float>(exp(-static_cast<double>(x)));  // rounded once: the correctly rounded expf
  return __fdiv_rn(1.0f, __fadd_rn(1.0f, e));
}

// a ranks before b: larger value first, lower index among equals. A real entry ranks before kNone whatever the
// values, so even NaN scores (whose order the CPU leaves undefined) yield indices in [0, E).
__device__ __forceinline__ bool before(float va, int ia, float vb, int ib) {
  if (ib == kNone) return ia != kNone;
  if (ia == kNone) return false;
  return va > vb || (va == vb && ia < ib);
}

// The warp's best (value, index); lane 0's result is broadcast, so the lanes agree even without a total order.
__device__ __forceinline__ int warp_best(float v, int i) {
  for (int offset = kWarp / 2; offset > 0; offset /= 2) {
    const float ov = __shfl_xor_sync(kFullMask, v, offset);
    const int oi = __shfl_xor_sync(kFullMask, i, offset);
    if (before(ov, oi, v, i)) v = ov, i = oi;
  }
  return __shfl_sync(kFullMask, i, 0);
}

// The best of this lane's candidates: experts j·32 + lane for the bits j of `candidates`.
__device__ __forceinline__ void lane_best(const float* biased, int lane, uint32_t candidates, float& v, int& i) {
  v = -kInf;
  i = kNone;
  for (uint32_t m = candidates; m != 0; m &= m - 1) {
    const int e = (__ffs(static_cast<int>(m)) - 1) * kWarp + lane;
    if (before(biased[e], e, v, i)) v = biased[e], i = e;
  }
}

// An expert index read from topk_idx; out of range is the caller's bug, and a trap beats reading wild memory.
__device__ __forceinline__ int checked_expert(int32_t e, int experts) {
  if (e < 0 || e >= experts) {
    printf("moerl router kernel: expert index %d outside [0, %d)\n", e, experts);
    __trap();
  }
  return e;
}

__device__ __forceinline__ double warp_sum(double v) {
  for (int offset = kWarp / 2; offset > 0; offset /= 2) v += __shfl_xor_sync(kFullMask, v, offset);
  return v;
}

// Shared memory of one token's warp in the forward: scores [E], biased [E], group scores [G], kept flags [G].
int64_t forward_warp_bytes(const Spec& p) { return 4 * (2 * int64_t{p.experts} + 2 * int64_t{p.groups}); }

__global__ void router_forward_kernel(const float* logits, const float* __restrict__ bias, int64_t tokens, Spec p,
                                      float* scores, int32_t* __restrict__ topk_idx, float* __restrict__ topk_weight) {
  extern __shared__ float smem[];
  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
  const int64_t t = static_cast<int64_t>(blockIdx.x) * (blockDim.x / kWarp) + warp;
  if (t >= tokens) return;  // uniform across the warp
  const int E = p.experts, G = p.groups, per_group = E / G;
  float* s_sm = smem + static_cast<int64_t>(warp) * 2 * (E + G);
  float* b_sm = s_sm + E;
  float* group_score = b_sm + E;
  int* kept = reinterpret_cast<int*>(group_score + G);

  const float* lg = logits + t * E;  // may be scores: each element is read before the same lane writes it
  float* sc = scores + t * E;
  for (int e = lane; e < E; e += kWarp) {
    const float s = sigmoid(lg[e]);
    sc[e] = s;
    s_sm[e] = s;
    b_sm[e] = __fadd_rn(s, bias[e]);
  }
  __syncwarp();

  // Groups: when every group is kept the ranking cannot exclude anything.
  const bool all_groups = p.topk_group == G;
  if (!all_groups) {
    for (int g = lane; g < G; g += kWarp) {
      float first = -kInf, second = -kInf;  // the CPU's scan, in the same order
      for (int e = g * per_group; e < (g + 1) * per_group; ++e) {
        const float b = b_sm[e];
        if (b > first) {
          second = first;
          first = b;
        } else if (b > second) {
          second = b;
        }
      }
      group_score[g] = per_group >= 2 ? __fadd_rn(first, second) : first;
      kept[g] = 0;
    }
    __syncwarp();
    for (int r = 0; r < p.topk_group; ++r) {
      float v = -kInf;
      int i = kNone;
      for (int g = lane; g < G; g += kWarp)
        if (!kept[g] && before(group_score[g], g, v, i)) v = group_score[g], i = g;
      const int best = warp_best(v, i);
      if (lane == 0) kept[best] = 1;
      __syncwarp();
    }
  }

  // Experts: only those of kept groups are candidates (the -inf mask of DeepSeek's reference).
  uint32_t candidates = 0;
  for (int j = 0; j * kWarp + lane < E; ++j)
    if (all_groups || kept[(j * kWarp + lane) / per_group]) candidates |= 1u << j;
  float v;
  int i;
  lane_best(b_sm, lane, candidates, v, i);
  int32_t* idx_out = topk_idx + t * p.top_k;
  float* w_out = topk_weight + t * p.top_k;
  float sum = 0.0f;
  for (int k = 0; k < p.top_k; ++k) {
    const int e = warp_best(v, i);  // the spec guarantees K candidates, so e is a real expert
    if (e % kWarp == lane) {
      candidates &= ~(1u << (e / kWarp));
      lane_best(b_sm, lane, candidates, v, i);
    }
    if (lane == 0) {
      const float s = s_sm[e];
      idx_out[k] = e;
      w_out[k] = s;
      sum = __fadd_rn(sum, s);
    }
  }
  // The gating weights: cpu::router_weights' operations in its order (lane 0 reads back its own writes).
  if (lane == 0) {
    if (p.norm) {
      const float denom = __fadd_rn(sum, kNormEps);
      for (int k = 0; k < p.top_k; ++k) w_out[k] = __fdiv_rn(w_out[k], denom);
    }
    for (int k = 0; k < p.top_k; ++k) w_out[k] = __fmul_rn(w_out[k], p.scale);
  }
}

// One thread per token.
__global__ void router_weights_kernel(const float* __restrict__ scores, const int32_t* __restrict__ topk_idx,
                                      int64_t tokens, Spec p, float* __restrict__ topk_weight) {
  const int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (t >= tokens) return;
  const float* s = scores + t * p.experts;
  const int32_t* idx = topk_idx + t * p.top_k;
  float* w = topk_weight + t * p.top_k;
  float sum = 0.0f;
  for (int k = 0; k < p.top_k; ++k) {
    const float x = s[checked_expert(idx[k], p.experts)];
    w[k] = x;
    sum = __fadd_rn(sum, x);
  }
  if (p.norm) {
    const float denom = __fadd_rn(sum, kNormEps);
    for (int k = 0; k < p.top_k; ++k) w[k] = __fdiv_rn(w[k], denom);
  }
  for (int k = 0; k < p.top_k; ++k) w[k] = __fmul_rn(w[k], p.scale);
}

// Shared memory of one token's warp in the backward: chosen experts [K] and their dL/ds terms [K].
int64_t backward_warp_bytes(const Spec& p) { return 8 * int64_t{p.top_k}; }

// One warp per token: dL/ds into the chosen experts (k ascending, as the CPU adds them), then · s (1 - s).
__global__ void router_backward_kernel(const float* __restrict__ scores, const int32_t* __restrict__ topk_idx,
                                       const float* __restrict__ dweight, const float* dscores, int64_t tokens, Spec p,
                                       float* dlogits) {
  extern __shared__ int backward_smem[];
  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
  const int64_t t = static_cast<int64_t>(blockIdx.x) * (blockDim.x / kWarp) + warp;
  if (t >= tokens) return;
  const int E = p.experts, K = p.top_k;
  int* idx_sm = backward_smem + static_cast<int64_t>(warp) * 2 * K;
  float* term_sm = reinterpret_cast<float*>(idx_sm + K);
  const float* s = scores + t * E;
  const int32_t* idx = topk_idx + t * K;
  const float* dw = dweight + t * K;

  // w_k = c · s_k / S with S = Σ_j s_j + eps:  dL/ds_j = c · (dw_j / S - Σ_k dw_k · s_k / S²). Every lane
  // forms S and the dot product in k order (the same broadcast loads).
  float sum = 0.0f, dot = 0.0f;
  if (p.norm) {
    for (int k = 0; k < K; ++k) {
      const float sk = s[checked_expert(idx[k], E)];
      sum = __fadd_rn(sum, sk);
      dot = __fadd_rn(dot, __fmul_rn(dw[k], sk));
    }
    sum = __fadd_rn(sum, kNormEps);
  }
  for (int k = lane; k < K; k += kWarp) {
    idx_sm[k] = checked_expert(idx[k], E);
    term_sm[k] = p.norm ? __fmul_rn(p.scale, __fsub_rn(__fdiv_rn(dw[k], sum), __fdiv_rn(dot, __fmul_rn(sum, sum))))
                        : __fmul_rn(p.scale, dw[k]);
  }
  __syncwarp();
  for (int e = lane; e < E; e += kWarp) {
    float d = dscores ? dscores[t * E + e] : 0.0f;  // dscores may be dlogits: read before this lane writes
    for (int k = 0; k < K; ++k)
      if (idx_sm[k] == e) d = __fadd_rn(d, term_sm[k]);
    const float se = s[e];
    dlogits[t * E + e] = __fmul_rn(d, __fmul_rn(se, __fsub_rn(1.0f, se)));
  }
}

// Σ_e s[t, e] in double by one warp, in a fixed order (lane strides, then the xor tree).
__device__ __forceinline__ double row_sum(const float* s, int E, int lane) {
  double acc = 0;
  for (int e = lane; e < E; e += kWarp) acc += static_cast<double>(s[e]);
  return warp_sum(acc);
}

// Block (chunk c, sequence b): over the chunk's tokens in order, P_part[e] = Σ_t s[t, e] / Σ_j s[t, j] and
// F_part[e] = Σ_t 1[e chosen for t]. partial_p, partial_f: [batch, chunks, E].
__global__ void __launch_bounds__(kBalanceThreads)
    balance_partials_kernel(const float* __restrict__ scores, const int32_t* __restrict__ topk_idx, int64_t seq,
                            int E, int K, double* __restrict__ partial_p, int* __restrict__ partial_f) {
  __shared__ double sums[kBalanceChunk];
  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
  const int64_t b = blockIdx.y, c = blockIdx.x, chunks = gridDim.x;
  const int64_t t0 = b * seq + c * kBalanceChunk;
  const int64_t left = seq - c * kBalanceChunk;
  const int n = static_cast<int>(left < kBalanceChunk ? left : kBalanceChunk);
  for (int i = warp; i < n; i += kBalanceWarps) {
    const double sum = row_sum(scores + (t0 + i) * E, E, lane);
    if (lane == 0) sums[i] = sum;
  }
  __syncthreads();
  for (int e = threadIdx.x; e < E; e += kBalanceThreads) {
    double pe = 0;
    int fe = 0;
    for (int i = 0; i < n; ++i) {
      const int64_t t = t0 + i;
      pe += static_cast<double>(scores[t * E + e]) / sums[i];
      for (int k = 0; k < K; ++k) fe += topk_idx[t * K + k] == e;
    }
    partial_p[(b * chunks + c) * E + e] = pe;
    partial_f[(b * chunks + c) * E + e] = fe;
  }
}

// Block b: f_e, P_e of sequence b from its chunks (in order), coef[b, e] = alpha · f_e / (S · B) for the
// gradient, loss[b] = alpha · Σ_e f_e · P_e (a fixed tree over e).
__global__ void __launch_bounds__(kBalanceThreads)
    balance_finish_kernel(const double* __restrict__ partial_p, const int* __restrict__ partial_f, int chunks,
                          int64_t batch, int64_t seq, int E, int K, float alpha, double* __restrict__ coef,
                          double* __restrict__ loss) {
  __shared__ double warp_total[kBalanceWarps];
  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
  const int64_t b = blockIdx.x;
  const double f_scale = static_cast<double>(E) / static_cast<double>(K * seq);
  double local = 0;
  for (int e = threadIdx.x; e < E; e += kBalanceThreads) {
    double P = 0, F = 0;
    for (int c = 0; c < chunks; ++c) {
      P += partial_p[(b * chunks + c) * E + e];
      F += partial_f[(b * chunks + c) * E + e];
    }
    const double f = F * f_scale;
    P /= static_cast<double>(seq);
    local += f * P;
    coef[b * E + e] = static_cast<double>(alpha) * f / static_cast<double>(seq * batch);
  }
  local = warp_sum(local);
  if (lane == 0) warp_total[warp] = local;
  __syncthreads();
  if (threadIdx.x == 0) {
    double total = 0;
    for (int w = 0; w < kBalanceWarps; ++w) total += warp_total[w];
    loss[b] = static_cast<double>(alpha) * total;
  }
}

// One warp per token t of sequence b: dscores[t, e] += (coef_e - Σ_i coef_i s'_i) / Σ_j s_j, s' = s / Σ_j s_j.
__global__ void balance_grad_kernel(const float* __restrict__ scores, const double* __restrict__ coef, int64_t tokens,
                                    int64_t seq, int E, float* __restrict__ dscores) {
  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
  const int64_t t = static_cast<int64_t>(blockIdx.x) * (blockDim.x / kWarp) + warp;
  if (t >= tokens) return;
  const float* s = scores + t * E;
  const double* c = coef + (t / seq) * E;
  const double sum = row_sum(s, E, lane);
  double mean_c = 0;
  for (int e = lane; e < E; e += kWarp) mean_c += c[e] * static_cast<double>(s[e]) / sum;
  mean_c = warp_sum(mean_c);
  for (int e = lane; e < E; e += kWarp)
    dscores[t * E + e] = __fadd_rn(dscores[t * E + e], static_cast<float>((c[e] - mean_c) / sum));
}

// ---------------------------------------------------------------------------------------------------------------
// Host side

Spec checked_spec(const RouterSpec& spec, const std::string& where) {
  const int64_t E = spec.n_experts, G = spec.n_group;
  auto field = [&](const char* name, int64_t value, const std::string& expected) {
    return where + ": RouterSpec." + name + " = " + std::to_string(value) + ", expected " + expected;
  };
  require(E >= 1 && E <= kRouterMaxExperts,
          field("n_experts", E, "1 .. " + std::to_string(kRouterMaxExperts) + " on the GPU"));
  require(G >= 1 && E % G == 0, field("n_group", G, "a divisor of n_experts = " + std::to_string(E)));
  require(spec.topk_group >= 1 && spec.topk_group <= G,
          field("topk_group", spec.topk_group, "1 .. n_group = " + std::to_string(G)));
  const int64_t kept = spec.topk_group * (E / G);
  require(spec.top_k >= 1 && spec.top_k <= kept,
          field("top_k", spec.top_k, "1 .. topk_group · n_experts / n_group = " + std::to_string(kept)));
  return Spec{static_cast<int>(E), static_cast<int>(G), static_cast<int>(spec.topk_group),
              static_cast<int>(spec.top_k), spec.norm_topk_prob, spec.routed_scaling_factor};
}

void check_tokens(int64_t tokens, const std::string& where) {
  require(tokens >= 0, [&] { return where + ": tokens must be >= 0, got " + std::to_string(tokens); });
}

// Blocks of `per_block` items for `items` items, within the grid's x limit.
unsigned blocks_for(int64_t items, int64_t per_block, const std::string& where) {
  const int64_t blocks = (items + per_block - 1) / per_block;
  require(blocks <= std::numeric_limits<int32_t>::max(), [&] { return where + ": too many tokens for one launch"; });
  return static_cast<unsigned>(blocks);
}

// Warps per block of a warp-per-token kernel whose warps need `warp_bytes` of dynamic shared memory each.
int warps_per_block(int64_t warp_bytes) {
  const int64_t fit = warp_bytes > 0 ? kSharedBudget / warp_bytes : kMaxWarpsPerBlock;
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(kMaxWarpsPerBlock, fit)));
}

}  // namespace

void router_forward(const RouterSpec& spec, const float* logits, const float* bias, int64_t tokens, float* scores,
                    int32_t* topk_idx, float* topk_weight, cudaStream_t stream) {
  const std::string where = "cuda::router_forward";
  const Spec p = checked_spec(spec, where);
  check_tokens(tokens, where);
  if (tokens == 0) return;
  require(logits && bias && scores && topk_idx && topk_weight,
          [&] { return where + ": null logits, bias, scores, topk_idx or topk_weight pointer"; });
  const int64_t warp_bytes = forward_warp_bytes(p);
  require(warp_bytes <= kSharedBudget, [&] { return where + ": shared memory of one token exceeds 48 KiB"; });
  const int warps = warps_per_block(warp_bytes);
  router_forward_kernel<<<blocks_for(tokens, warps, where), warps * kWarp, warps * warp_bytes, stream>>>(
      logits, bias, tokens, p, scores, topk_idx, topk_weight);
  CUDA_CHECK_LAUNCH();
}

void router_weights(const RouterSpec& spec, const float* scores, const int32_t* topk_idx, int64_t tokens,
                    float* topk_weight, cudaStream_t stream) {
  const std::string where = "cuda::router_weights";
  const Spec p = checked_spec(spec, where);
  check_tokens(tokens, where);
  if (tokens == 0) return;
  require(scores && topk_idx && topk_weight, [&] { return where + ": null scores, topk_idx or topk_weight pointer"; });
  constexpr int kThreads = 256;
  router_weights_kernel<<<blocks_for(tokens, kThreads, where), kThreads, 0, stream>>>(scores, topk_idx, tokens, p,
                                                                                      topk_weight);
  CUDA_CHECK_LAUNCH();
}

void router_backward(const RouterSpec& spec, const float* scores, const int32_t* topk_idx, const float* dweight,
                     const float* dscores, int64_t tokens, float* dlogits, cudaStream_t stream) {
  const std::string where = "cuda::router_backward";
  const Spec p = checked_spec(spec, where);
  check_tokens(tokens, where);
  if (tokens == 0) return;
  require(scores && topk_idx && dweight && dlogits,
          [&] { return where + ": null scores, topk_idx, dweight or dlogits pointer"; });
  const int64_t warp_bytes = backward_warp_bytes(p);
  const int warps = warps_per_block(warp_bytes);
  router_backward_kernel<<<blocks_for(tokens, warps, where), warps * kWarp, warps * warp_bytes, stream>>>(
      scores, topk_idx, dweight, dscores, tokens, p, dlogits);
  CUDA_CHECK_LAUNCH();
}

float router_balance_loss(const RouterSpec& spec, const float* scores, const int32_t* topk_idx, int64_t batch,
                          int64_t seq, float alpha, float* dscores, cudaStream_t stream) {
  const std::string where = "cuda::router_balance_loss";
  const Spec p = checked_spec(spec, where);
  require(batch >= 0 && seq >= 0, [&] {
    return where + ": batch and seq must be >= 0, got " + std::to_string(batch) + " and " + std::to_string(seq);
  });
  if (batch == 0) return 0.0f;
  require(seq > 0, [&] { return where + ": seq must be > 0 when batch > 0 (the load fractions divide by it)"; });
  require(scores && topk_idx, [&] { return where + ": null scores or topk_idx pointer"; });
  const int64_t chunks = (seq + kBalanceChunk - 1) / kBalanceChunk, E = p.experts;
  require(chunks <= std::numeric_limits<int32_t>::max() && batch <= 65535,
          [&] { return where + ": batch must be <= 65535 and seq < 2^37 on the GPU"; });
  const size_t partial_count = static_cast<size_t>(batch * chunks * E);
  const size_t p_bytes = cuda_detail::align256(partial_count * sizeof(double));
  const size_t f_bytes = cuda_detail::align256(partial_count * sizeof(int));
  const size_t coef_bytes = cuda_detail::align256(static_cast<size_t>(batch * E) * sizeof(double));
  const size_t loss_bytes = static_cast<size_t>(batch) * sizeof(double);
  cuda_detail::StreamScratch scratch(p_bytes + f_bytes + coef_bytes + loss_bytes, stream);
  double* partial_p = scratch.as<double>();
  int* partial_f = scratch.as<int>(p_bytes);
  double* coef = scratch.as<double>(p_bytes + f_bytes);
  double* loss = scratch.as<double>(p_bytes + f_bytes + coef_bytes);

  balance_partials_kernel<<<dim3(static_cast<unsigned>(chunks), static_cast<unsigned>(batch)), kBalanceThreads, 0,
                            stream>>>(scores, topk_idx, seq, p.experts, p.top_k, partial_p, partial_f);
  CUDA_CHECK_LAUNCH();
  balance_finish_kernel<<<static_cast<unsigned>(batch), kBalanceThreads, 0, stream>>>(
      partial_p, partial_f, static_cast<int>(chunks), batch, seq, p.experts, p.top_k, alpha, coef, loss);
  CUDA_CHECK_LAUNCH();
  if (dscores) {
    const int64_t tokens = batch * seq;
    balance_grad_kernel<<<blocks_for(tokens, kMaxWarpsPerBlock, where), kMaxWarpsPerBlock * kWarp, 0, stream>>>(
        scores, coef, tokens, seq, p.experts, dscores);
    CUDA_CHECK_LAUNCH();
  }
  std::vector<double> per_sequence(static_cast<size_t>(batch));
  CUDA_CHECK(cudaMemcpyAsync(per_sequence.data(), loss, loss_bytes, cudaMemcpyDeviceToHost, stream));
  scratch.release();
  CUDA_CHECK(cudaStreamSynchronize(stream));
  double total = 0;  // in sequence order, as the CPU
  for (double l : per_sequence) total += l;
  return static_cast<float>(total / static_cast<double>(batch));
}

}  // namespace moerl::cuda
