// MoE permutation kernels (see kernels/cuda/moe_permute.hpp for the contract and what matches the CPU).
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <limits>
#include <string>

#include "kernels/cuda/cuda_check.hpp"
#include "kernels/cuda/moe_fp8.hpp"
#include "kernels/cuda/moe_permute.hpp"
#include "kernels/cuda/pdl.cuh"
#include "kernels/cuda/stream_scratch.hpp"
#include "runtime/error.hpp"

namespace moerl::cuda {
namespace {

constexpr int kWarp = 32;
constexpr unsigned kFullMask = 0xFFFFFFFFu;
constexpr int kMaxWarpsPerBlock = 8;
constexpr int64_t kSharedBudget = 48 * 1024;  // dynamic shared memory a block gets without opting in

// The plan splits the T·K assignments into chunks, one warp each: at least kMinChunk assignments (a warp's
// sequential work), at most about kTargetChunks chunks (the scan's length is E · chunks).
constexpr int64_t kMinChunk = 256;
constexpr int64_t kTargetChunks = 512;

constexpr int kScanThreads = 1024;
constexpr int kScanItems = 8;  // consecutive counts per thread and tile
constexpr int kScanTile = kScanThreads * kScanItems;

constexpr int kRowThreads = 256;  // gather: one block per row
constexpr int kRowsInFlight = 4;  // rows of a token loaded before the first is added (memory-level parallelism)

// The expert of assignment a; out of range is the caller's bug, and a trap beats writing wild memory.
__device__ __forceinline__ int expert_at(const int32_t* topk_idx, int64_t a, int experts) {
  const int32_t e = topk_idx[a];
  if (e < 0 || e >= experts) {
    printf("moerl moe_permute_plan: topk_idx[%lld] = %d outside [0, %d)\n", static_cast<long long>(a), e, experts);
    __trap();
  }
  return e;
}

// Warp c counts chunk c's assignments per expert: counts[e · chunks + c] (expert-major, the scan's order).
// Lanes holding the same expert are one __match_any_sync group; its lowest lane adds the group's size.
__global__ void plan_count_kernel(const int32_t* __restrict__ topk_idx, int64_t n, int64_t chunk, int64_t chunks,
                                  int experts, int* __restrict__ counts) {
  moerl::cuda::await_previous_grid();
  extern __shared__ int count_smem[];
  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
  const int64_t c = static_cast<int64_t>(blockIdx.x) * (blockDim.x / kWarp) + warp;
  if (c >= chunks) return;  // uniform across the warp
  int* count = count_smem + static_cast<int64_t>(warp) * experts;
  for (int e = lane; e < experts; e += kWarp) count[e] = 0;
  __syncwarp();
  const int64_t end = (c + 1) * chunk < n ? (c + 1) * chunk : n;
  for (int64_t a0 = c * chunk; a0 < end; a0 += kWarp) {
    const int64_t a = a0 + lane;
    const int e = a < end ? expert_at(topk_idx, a, experts) : -1;
    const unsigned peers = __match_any_sync(kFullMask, e);
    if (e >= 0 && lane == __ffs(static_cast<int>(peers)) - 1) count[e] += __popc(peers);
    __syncwarp();  // the next group leader of e may be another lane
  }
  for (int e = lane; e < experts; e += kWarp) counts[e * chunks + c] = count[e];
}

// One block: bases = exclusive scan of counts [total] (tiles staged in shared memory, each thread scanning
// kScanItems consecutive counts), then offsets[e] = bases[e · chunks] (the first row of expert e), offsets[E] = n.
__global__ void __launch_bounds__(kScanThreads)
    plan_scan_kernel(const int* __restrict__ counts, int64_t total, int64_t chunks, int experts, int64_t n,
                     int64_t* __restrict__ bases, int64_t* __restrict__ offsets) {
  moerl::cuda::await_previous_grid();
  __shared__ int tile[kScanTile];
  __shared__ int64_t warp_incl[kScanThreads / kWarp];
  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
  int64_t carry = 0;
  for (int64_t t0 = 0; t0 < total; t0 += kScanTile) {
    for (int i = threadIdx.x; i < kScanTile; i += kScanThreads) tile[i] = t0 + i < total ? counts[t0 + i] : 0;
    __syncthreads();
    const int* mine = tile + threadIdx.x * kScanItems;
    int64_t own = 0;
#pragma unroll
    for (int j = 0; j < kScanItems; ++j) own += mine[j];
    int64_t incl = own;  // inclusive scan over the warp's threads
    for (int offset = 1; offset < kWarp; offset *= 2) {
      const int64_t v = __shfl_up_sync(kFullMask, incl, offset);
      if (lane >= offset) incl += v;
    }
    if (lane == kWarp - 1) warp_incl[warp] = incl;
    __syncthreads();
    if (warp == 0) {
      int64_t w = warp_incl[lane];
      for (int offset = 1; offset < kWarp; offset *= 2) {
        const int64_t v = __shfl_up_sync(kFullMask, w, offset);
        if (lane >= offset) w += v;
      }
      warp_incl[lane] = w;
    }
    __syncthreads();
    int64_t run = carry + (warp > 0 ? warp_incl[warp - 1] : 0) + incl - own;
#pragma unroll
    for (int j = 0; j < kScanItems; ++j) {
      const int64_t i = t0 + threadIdx.x * kScanItems + j;
      if (i < total) bases[i] = run;
      run += mine[j];
    }
    carry += warp_incl[kWarp - 1];
    __syncthreads();  // the tile and warp_incl are refilled next
  }
  for (int e = threadIdx.x; e < experts; e += kScanThreads) offsets[e] = bases[e * chunks];
  if (threadIdx.x == 0) offsets[experts] = n;
}

// Warp c places chunk c's assignments: row = (expert's cursor) + (lower lanes of the same expert); the group's
// lowest lane then advances the cursor by the group's size. Assignments of an expert thus get rows in order.
__global__ void plan_place_kernel(const int32_t* __restrict__ topk_idx, int64_t n, int64_t k, int64_t chunk,
                                  int64_t chunks, int experts, const int64_t* __restrict__ bases,
                                  int64_t* __restrict__ token_of, int64_t* __restrict__ row_of) {
  moerl::cuda::await_previous_grid();
  extern __shared__ int64_t cursor_smem[];
  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
  const int64_t c = static_cast<int64_t>(blockIdx.x) * (blockDim.x / kWarp) + warp;
  if (c >= chunks) return;
  int64_t* cursor = cursor_smem + static_cast<int64_t>(warp) * experts;
  for (int e = lane; e < experts; e += kWarp) cursor[e] = bases[e * chunks + c];
  __syncwarp();
  const unsigned lower = (1u << lane) - 1;
  const int64_t end = (c + 1) * chunk < n ? (c + 1) * chunk : n;
  for (int64_t a0 = c * chunk; a0 < end; a0 += kWarp) {
    const int64_t a = a0 + lane;
    const int e = a < end ? expert_at(topk_idx, a, experts) : -1;
    const unsigned peers = __match_any_sync(kFullMask, e);
    if (e >= 0) {
      const int64_t r = cursor[e] + __popc(peers & lower);
      token_of[r] = a / k;
      row_of[a] = r;
    }
    __syncwarp();  // every lane has read its cursor before the leader moves it
    if (e >= 0 && lane == __ffs(static_cast<int>(peers)) - 1) cursor[e] += __popc(peers);
    __syncwarp();
  }
}

__global__ void __launch_bounds__(kRowThreads)
    gather_kernel(const float* __restrict__ x, const int64_t* __restrict__ token_of, int64_t dim, bool vec,
                  float* __restrict__ xp) {
  moerl::cuda::await_previous_grid();
  const int64_t r = blockIdx.x;
  const float* src = x + token_of[r] * dim;
  float* dst = xp + r * dim;
  if (vec) {
    const float4* s4 = reinterpret_cast<const float4*>(src);
    float4* d4 = reinterpret_cast<float4*>(dst);
    for (int64_t i = threadIdx.x; i < dim / 4; i += kRowThreads) d4[i] = s4[i];
  } else {
    for (int64_t i = threadIdx.x; i < dim; i += kRowThreads) dst[i] = src[i];
  }
}

constexpr int kTokenWarps = 8;  // combine, scatter-add and the combine's backward: one token a warp, 8 a block

// row_of[a]; a row outside [0, row_limit) (T·K, or the aligned rows of kernels/cuda/moe_fp8.hpp) is the caller's
// bug, and a trap beats writing wild memory.
__device__ __forceinline__ int64_t checked_row(const int64_t* row_of, int64_t a, int64_t row_limit) {
  const int64_t r = row_of[a];
  if (r < 0 || r >= row_limit) {
    printf("moerl moe combine: row_of[%lld] = %lld outside [0, %lld)\n", static_cast<long long>(a),
           static_cast<long long>(r), static_cast<long long>(row_limit));
    __trap();
  }
  return r;
}

// Token t's rows j0 .. j0 + n - 1 (n <= N) and their weights (1 where weight is null) in every lane of the warp:
// lane u < n loads assignment t·k + j0 + u, shuffles share them.
template <int N>
__device__ __forceinline__ void warp_rows(const int64_t* row_of, const float* weight, int64_t t, int64_t k, int64_t j0,
                                          int n, int64_t row_limit, int64_t (&rows)[N], float (&w)[N]) {
  const int lane = threadIdx.x % kWarp;
  int64_t mine = 0;
  float mine_w = 1.0f;
  if (lane < n) {
    const int64_t a = t * k + j0 + lane;
    mine = checked_row(row_of, a, row_limit);
    if (weight != nullptr) mine_w = weight[a];
  }
#pragma unroll
  for (int u = 0; u < N; ++u) {
    rows[u] = __shfl_sync(kFullMask, mine, u);
    w[u] = __shfl_sync(kFullMask, mine_w, u);
  }
}

__device__ __forceinline__ float4 load4(const float* p, int64_t i) { return reinterpret_cast<const float4*>(p)[i]; }
// Rows in BF16 (bit patterns: the FP8 experts' output rows): elements 4 i .. 4 i + 3 widened exactly.
__device__ __forceinline__ float4 load4(const uint16_t* p, int64_t i) {
  const uint2 b = reinterpret_cast<const uint2*>(p)[i];
  return make_float4(__uint_as_float(b.x << 16), __uint_as_float(b.x & 0xFFFF0000u), __uint_as_float(b.y << 16),
                     __uint_as_float(b.y & 0xFFFF0000u));
}
__device__ __forceinline__ float value(const float* p, int64_t i) { return p[i]; }
__device__ __forceinline__ float value(const uint16_t* p, int64_t i) { return __uint_as_float(uint32_t{p[i]} << 16); }

// acc + w · v, rounded after the product and after the sum (the CPU's y += w * v), or acc + v unweighted.
template <bool kWeighted> __device__ __forceinline__ float add_row(float acc, float w, float v) {
  return kWeighted ? __fadd_rn(acc, __fmul_rn(w, v)) : __fadd_rn(acc, v);
}

// Warp w of block b, token t = 8 b + w: y[t, :] += Σ_k w_k · src[row_k, :] in k order (each element rounded after
// each product and sum, as the CPU), kRowsInFlight rows loaded before they are added, then (non-null `also` [tokens,
// dim]) + also[t, :], rounded once more. The rows' places and weights go through the warp's slots of shared memory,
// kRowGroup at a time (k <= 8: one pass over y[t]). bench-600m's step, a layer alone on the GPU: combine 96.6 us and
// scatter-add 90.6 against 102 and 88 with a block of 256 threads a token (rows staged in shared memory, a barrier);
// with the rows in registers (80 a thread, 3 blocks an SM) the combine took 140 us, and capped at 48 they spilled
// (bench/results/2026-12-01-gpu-combine-bwd-warp-h200-*).
// Combine (kWeighted) and scatter-add (not); src FP32 or BF16 (Src uint16_t).
constexpr int kRowGroup = 8;
template <bool kWeighted, class Src = float>
__global__ void __launch_bounds__(kTokenWarps * kWarp)
    combine_kernel(const Src* __restrict__ src, const float* __restrict__ weight, const int64_t* __restrict__ row_of,
                   int64_t row_limit, int64_t tokens, int64_t k, int64_t dim, bool vec, float* __restrict__ y,
                   const float* __restrict__ also = nullptr) {
  moerl::cuda::await_previous_grid();
  __shared__ int64_t slot_rows[kTokenWarps][kRowGroup];
  __shared__ float slot_weights[kTokenWarps][kRowGroup];
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
  const int64_t t = static_cast<int64_t>(blockIdx.x) * kTokenWarps + warp;
  if (t >= tokens) return;
  const int64_t* rows = slot_rows[warp];
  const float* w = slot_weights[warp];
  float* out = y + t * dim;
  for (int64_t g0 = 0; g0 < k; g0 += kRowGroup) {
    const int n = static_cast<int>(k - g0 < kRowGroup ? k - g0 : kRowGroup);
    const bool last = g0 + kRowGroup >= k;
    __syncwarp();  // the previous group's slots are read
    if (lane < n) {
      slot_rows[warp][lane] = checked_row(row_of, t * k + g0 + lane, row_limit);
      slot_weights[warp][lane] = kWeighted ? weight[t * k + g0 + lane] : 1.0f;
    }
    __syncwarp();
    if (vec) {
      float4* out4 = reinterpret_cast<float4*>(out);
      for (int64_t i = lane; i < dim / 4; i += kWarp) {
        float4 acc = out4[i];
        for (int j0 = 0; j0 < n; j0 += kRowsInFlight) {
          float4 v[kRowsInFlight];
#pragma unroll
          for (int u = 0; u < kRowsInFlight; ++u)
            if (j0 + u < n) v[u] = load4(src + rows[j0 + u] * dim, i);
#pragma unroll
          for (int u = 0; u < kRowsInFlight; ++u) {
            if (j0 + u >= n) break;
            const float wj = w[j0 + u];
            acc.x = add_row<kWeighted>(acc.x, wj, v[u].x);
            acc.y = add_row<kWeighted>(acc.y, wj, v[u].y);
            acc.z = add_row<kWeighted>(acc.z, wj, v[u].z);
            acc.w = add_row<kWeighted>(acc.w, wj, v[u].w);
          }
        }
        if (last && also != nullptr) {
          const float4 a = load4(also + t * dim, i);
          acc.x = __fadd_rn(acc.x, a.x), acc.y = __fadd_rn(acc.y, a.y), acc.z = __fadd_rn(acc.z, a.z);
          acc.w = __fadd_rn(acc.w, a.w);
        }
        out4[i] = acc;
      }
    } else {
      for (int64_t i = lane; i < dim; i += kWarp) {
        float acc = out[i];
        for (int j = 0; j < n; ++j) acc = add_row<kWeighted>(acc, w[j], value(src, rows[j] * dim + i));
        if (last && also != nullptr) acc = __fadd_rn(acc, also[t * dim + i]);
        out[i] = acc;
      }
    }
  }
}

constexpr int kDots = 4;        // combine backward: a token's rows whose loads are in flight together

// Warp w of block b takes token t = 8 b + w, its k rows kDots at a time (warp_rows): dyp[row_j, :] = w_j · dy[t, :]
// (non-null dyp) and dweight[t, j] = <dy[t, :], yp[row_j, :]> (yp FP32 or BF16), each lane summing its columns in
// order (4 at a time, 128 apart), then the lanes' sums by an xor tree. A block of 256 threads a token (one float4 a
// thread at H 1024, its rows staged and its dot products summed through shared memory, 76 registers: 3 blocks an SM)
// ran bench-600m's dweight-only pass at ~1.6 TB/s, 124 us a layer with nothing beside it on the GPU; this kernel 53
// us (bench/results/2026-12-01-gpu-combine-bwd-warp-h200-*).
template <class Src>
__global__ void __launch_bounds__(kTokenWarps * kWarp)
    combine_backward_kernel(const float* __restrict__ dy, const Src* __restrict__ yp,
                            const float* __restrict__ weight, const int64_t* __restrict__ row_of, int64_t row_limit,
                            int64_t tokens, int64_t k, int64_t dim, bool vec, float* __restrict__ dyp,
                            float* __restrict__ dweight) {
  moerl::cuda::await_previous_grid();
  const int lane = threadIdx.x % kWarp;
  const int64_t t = static_cast<int64_t>(blockIdx.x) * kTokenWarps + threadIdx.x / kWarp;
  if (t >= tokens) return;
  const float* g = dy + t * dim;
  for (int64_t j0 = 0; j0 < k; j0 += kDots) {
    const int n = static_cast<int>(k - j0 < kDots ? k - j0 : kDots);
    int64_t rows[kDots];
    float w[kDots], dot[kDots] = {};
    warp_rows(row_of, weight, t, k, j0, n, row_limit, rows, w);
    if (vec) {
      for (int64_t i = lane; i < dim / 4; i += kWarp) {
        const float4 gi = load4(g, i);
        float4 v[kDots];
#pragma unroll
        for (int u = 0; u < kDots; ++u)
          if (u < n) v[u] = load4(yp + rows[u] * dim, i);
#pragma unroll
        for (int u = 0; u < kDots; ++u) {
          if (u >= n) break;
          if (dyp != nullptr)  // null dyp: dweight only
            reinterpret_cast<float4*>(dyp + rows[u] * dim)[i] =
                make_float4(__fmul_rn(w[u], gi.x), __fmul_rn(w[u], gi.y), __fmul_rn(w[u], gi.z), __fmul_rn(w[u], gi.w));
          dot[u] = fmaf(gi.x, v[u].x, dot[u]);
          dot[u] = fmaf(gi.y, v[u].y, dot[u]);
          dot[u] = fmaf(gi.z, v[u].z, dot[u]);
          dot[u] = fmaf(gi.w, v[u].w, dot[u]);
        }
      }
    } else {
      for (int64_t i = lane; i < dim; i += kWarp) {
#pragma unroll
        for (int u = 0; u < kDots; ++u) {
          if (u >= n) break;
          if (dyp != nullptr) dyp[rows[u] * dim + i] = __fmul_rn(w[u], g[i]);
          dot[u] = fmaf(g[i], value(yp, rows[u] * dim + i), dot[u]);
        }
      }
    }
#pragma unroll
    for (int u = 0; u < kDots; ++u) {
      if (u >= n) break;
      float total = dot[u];
      for (int offset = kWarp / 2; offset > 0; offset /= 2) total += __shfl_xor_sync(kFullMask, total, offset);
      if (lane == 0) dweight[t * k + j0 + u] = total;
    }
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Host side

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

int warps_for(int64_t warp_bytes) {
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(kMaxWarpsPerBlock, kSharedBudget / warp_bytes)));
}

unsigned grid_for(int64_t blocks, const std::string& where) {
  require(blocks <= std::numeric_limits<int32_t>::max(),
          [&] { return where + ": too many rows or tokens for one launch"; });
  return static_cast<unsigned>(blocks);
}

// Checks the arguments of the per-token kernels (combine, its backward, scatter-add); false: nothing to do.
bool check_token_args(const std::string& where, int64_t tokens, int64_t k, int64_t dim) {
  require(tokens >= 0 && k >= 0 && dim >= 0, [&] {
    return where + ": tokens, k and dim must be >= 0, got " + std::to_string(tokens) + ", " + std::to_string(k) + ", " +
           std::to_string(dim);
  });
  return tokens != 0 && k != 0 && dim != 0;
}

}  // namespace

void moe_permute_plan(const int32_t* topk_idx, int64_t tokens, int64_t k, int64_t n_experts, int64_t* offsets,
                      int64_t* token_of, int64_t* row_of, cudaStream_t stream) {
  const std::string where = "cuda::moe_permute_plan";
  require(tokens >= 0 && k >= 0, [&] {
    return where + ": tokens and k must be >= 0, got " + std::to_string(tokens) + " and " + std::to_string(k);
  });
  require(n_experts >= 1 && n_experts <= kPermuteMaxExperts, [&] {
    return where + ": n_experts = " + std::to_string(n_experts) + ", expected 1 .. " +
           std::to_string(kPermuteMaxExperts) + " on the GPU";
  });
  require(offsets != nullptr, [&] { return where + ": null offsets pointer"; });
  const int64_t n = tokens * k, E = n_experts;
  if (n == 0) {
    CUDA_CHECK(cudaMemsetAsync(offsets, 0, static_cast<size_t>(E + 1) * sizeof(int64_t), stream));
    return;
  }
  require(topk_idx && token_of && row_of, [&] { return where + ": null topk_idx, token_of or row_of pointer"; });
  const int64_t chunk = std::max(kMinChunk, ((n + kTargetChunks - 1) / kTargetChunks + kWarp - 1) / kWarp * kWarp);
  const int64_t chunks = (n + chunk - 1) / chunk, total = E * chunks;

  const size_t counts_bytes = cuda_detail::align256(static_cast<size_t>(total) * sizeof(int));
  cuda_detail::StreamScratch scratch(counts_bytes + static_cast<size_t>(total) * sizeof(int64_t), stream);
  int* counts = scratch.as<int>();
  int64_t* bases = scratch.as<int64_t>(counts_bytes);

  const int count_warps = warps_for(E * static_cast<int64_t>(sizeof(int)));
  launch_after_previous(plan_count_kernel, grid_for((chunks + count_warps - 1) / count_warps, where),
                        count_warps * kWarp, count_warps * E * sizeof(int), stream, topk_idx, n, chunk, chunks,
                        static_cast<int>(E), counts);
  launch_after_previous(plan_scan_kernel, 1, kScanThreads, 0, stream, counts, total, chunks, static_cast<int>(E), n,
                        bases, offsets);
  const int place_warps = warps_for(E * static_cast<int64_t>(sizeof(int64_t)));
  launch_after_previous(plan_place_kernel, grid_for((chunks + place_warps - 1) / place_warps, where),
                        place_warps * kWarp, place_warps * E * sizeof(int64_t), stream, topk_idx, n, k, chunk, chunks,
                        static_cast<int>(E), bases, token_of, row_of);
  scratch.release();
}

void moe_gather(const float* x, const int64_t* token_of, int64_t rows, int64_t dim, float* xp, cudaStream_t stream) {
  const std::string where = "cuda::moe_gather";
  require(rows >= 0 && dim >= 0, [&] {
    return where + ": rows and dim must be >= 0, got " + std::to_string(rows) + " and " + std::to_string(dim);
  });
  if (rows == 0 || dim == 0) return;
  require(x && token_of && xp, [&] { return where + ": null x, token_of or xp pointer"; });
  const bool vec = dim % 4 == 0 && aligned16(x) && aligned16(xp);
  launch_after_previous(gather_kernel, grid_for(rows, where), kRowThreads, 0, stream, x, token_of, dim, vec, xp);
}

void moe_combine(const float* yp, const float* weight, const int64_t* row_of, int64_t tokens, int64_t k,
                 int64_t dim, float* y, cudaStream_t stream) {
  moe_combine_aligned(yp, weight, row_of, tokens, k, dim, tokens * k, y, stream);
}

namespace {

// Whether rows of dim elements of T from p can be read 4 elements at a time.
template <class T>
bool rows_vec(const T* p, int64_t dim) {
  return dim % 4 == 0 && reinterpret_cast<uintptr_t>(p) % (4 * sizeof(T)) == 0;
}

template <class Src>
void combine_aligned(const Src* yp, const float* weight, const int64_t* row_of, int64_t tokens, int64_t k,
                     int64_t dim, int64_t rows, float* y, cudaStream_t stream, const float* also = nullptr) {
  const std::string where = "cuda::moe_combine";
  if (!check_token_args(where, tokens, k, dim)) return;
  require(yp && weight && row_of && y, [&] { return where + ": null yp, weight, row_of or y pointer"; });
  const bool vec = rows_vec(yp, dim) && aligned16(y) && (also == nullptr || aligned16(also));
  launch_after_previous(combine_kernel<true, Src>, grid_for((tokens + kTokenWarps - 1) / kTokenWarps, where),
                        kTokenWarps * kWarp, 0, stream, yp, weight, row_of, rows, tokens, k, dim, vec, y, also);
}

template <class Src>
void combine_backward_aligned(const float* dy, const Src* yp, const float* weight, const int64_t* row_of,
                              int64_t tokens, int64_t k, int64_t dim, int64_t rows, float* dyp, float* dweight,
                              cudaStream_t stream) {
  const std::string where = "cuda::moe_combine_backward";
  require(tokens >= 0 && k >= 0 && dim >= 0, [&] { return where + ": tokens, k and dim must be >= 0"; });
  if (tokens == 0 || k == 0) return;
  if (dim == 0) {  // every dot product is empty
    require(dweight != nullptr, [&] { return where + ": null dweight pointer"; });
    CUDA_CHECK(cudaMemsetAsync(dweight, 0, static_cast<size_t>(tokens * k) * sizeof(float), stream));
    return;
  }
  check_token_args(where, tokens, k, dim);
  require(dy && yp && weight && row_of && dweight,
          [&] { return where + ": null dy, yp, weight, row_of or dweight pointer"; });
  const bool vec = dim % 4 == 0 && aligned16(dy) && rows_vec(yp, dim) && (dyp == nullptr || aligned16(dyp));
  launch_after_previous(combine_backward_kernel<Src>, grid_for((tokens + kTokenWarps - 1) / kTokenWarps, where),
                        kTokenWarps * kWarp, 0, stream, dy, yp, weight, row_of, rows, tokens, k, dim, vec, dyp,
                        dweight);
}

}  // namespace

void moe_combine_aligned(const float* yp, const float* weight, const int64_t* row_of, int64_t tokens, int64_t k,
                         int64_t dim, int64_t rows, float* y, cudaStream_t stream, const float* also) {
  combine_aligned(yp, weight, row_of, tokens, k, dim, rows, y, stream, also);
}

void moe_combine_aligned(const uint16_t* yp, const float* weight, const int64_t* row_of, int64_t tokens, int64_t k,
                         int64_t dim, int64_t rows, float* y, cudaStream_t stream, const float* also) {
  combine_aligned(yp, weight, row_of, tokens, k, dim, rows, y, stream, also);
}

void moe_combine_backward(const float* dy, const float* yp, const float* weight, const int64_t* row_of,
                          int64_t tokens, int64_t k, int64_t dim, float* dyp, float* dweight, cudaStream_t stream) {
  moe_combine_backward_aligned(dy, yp, weight, row_of, tokens, k, dim, tokens * k, dyp, dweight, stream);
}

void moe_combine_backward_aligned(const float* dy, const float* yp, const float* weight, const int64_t* row_of,
                                  int64_t tokens, int64_t k, int64_t dim, int64_t rows, float* dyp, float* dweight,
                                  cudaStream_t stream) {
  combine_backward_aligned(dy, yp, weight, row_of, tokens, k, dim, rows, dyp, dweight, stream);
}

void moe_combine_backward_aligned(const float* dy, const uint16_t* yp, const float* weight, const int64_t* row_of,
                                  int64_t tokens, int64_t k, int64_t dim, int64_t rows, float* dyp, float* dweight,
                                  cudaStream_t stream) {
  combine_backward_aligned(dy, yp, weight, row_of, tokens, k, dim, rows, dyp, dweight, stream);
}

void moe_scatter_add(const float* dxp, const int64_t* row_of, int64_t tokens, int64_t k, int64_t dim, float* dx,
                     cudaStream_t stream) {
  moe_scatter_add_aligned(dxp, row_of, tokens, k, dim, tokens * k, dx, stream);
}

void moe_scatter_add_aligned(const float* dxp, const int64_t* row_of, int64_t tokens, int64_t k, int64_t dim,
                             int64_t rows, float* dx, cudaStream_t stream) {
  moe_scatter_add_aligned_then(dxp, row_of, tokens, k, dim, rows, nullptr, dx, stream);
}

void moe_scatter_add_aligned(const uint16_t* dxp, const int64_t* row_of, int64_t tokens, int64_t k, int64_t dim,
                             int64_t rows, float* dx, cudaStream_t stream) {
  moe_scatter_add_aligned_then(dxp, row_of, tokens, k, dim, rows, nullptr, dx, stream);
}

namespace {

template <class Src>
void scatter_add_aligned_then(const Src* dxp, const int64_t* row_of, int64_t tokens, int64_t k, int64_t dim,
                              int64_t rows, const float* also, float* dx, cudaStream_t stream) {
  const std::string where = "cuda::moe_scatter_add";
  if (!check_token_args(where, tokens, k, dim)) return;
  require(dxp && row_of && dx, [&] { return where + ": null dxp, row_of or dx pointer"; });
  const bool vec = rows_vec(dxp, dim) && aligned16(dx) && (also == nullptr || aligned16(also));
  launch_after_previous(combine_kernel<false, Src>, grid_for((tokens + kTokenWarps - 1) / kTokenWarps, where),
                        kTokenWarps * kWarp, 0, stream, dxp, nullptr, row_of, rows, tokens, k, dim, vec, dx, also);
}

}  // namespace

void moe_scatter_add_aligned_then(const float* dxp, const int64_t* row_of, int64_t tokens, int64_t k, int64_t dim,
                                  int64_t rows, const float* also, float* dx, cudaStream_t stream) {
  scatter_add_aligned_then(dxp, row_of, tokens, k, dim, rows, also, dx, stream);
}

void moe_scatter_add_aligned_then(const uint16_t* dxp, const int64_t* row_of, int64_t tokens, int64_t k, int64_t dim,
                                  int64_t rows, const float* also, float* dx, cudaStream_t stream) {
  scatter_add_aligned_then(dxp, row_of, tokens, k, dim, rows, also, dx, stream);
}

}  // namespace moerl::cuda
