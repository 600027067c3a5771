// The aligned-rows plan of the routed experts' FP8 path; the contract is kernels/cuda/moe_fp8.hpp (the references
// are the plain loops in tests/gpu/moe_fp8_gpu.cpp). Pure data movement: results are exact.
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <string>

#include "kernels/cuda/cuda_check.hpp"
#include "kernels/cuda/fp8_quantize_common.cuh"
#include "kernels/cuda/moe_fp8.hpp"
#include "kernels/cuda/pdl.cuh"
#include "runtime/error.hpp"

namespace moerl::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kRowThreads = 128;
constexpr int64_t kMaxBlocks = 8192;  // grid-stride loops

unsigned blocks_for(int64_t items) {
  return static_cast<unsigned>(std::clamp<int64_t>((items + kThreads - 1) / kThreads, 1, kMaxBlocks));
}

unsigned row_blocks(int64_t rows, const char* where) {
  require(rows <= std::numeric_limits<int32_t>::max(),
          [&] { return std::string(where) + ": too many rows for one launch"; });
  return static_cast<unsigned>(rows);
}

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// The expert whose block [bounds[e], bounds[e+1]) holds row r, bounds [E + 1] ascending with bounds[0] <= r <
// bounds[E]: the last e with bounds[e] <= r (empty experts, bounds[e] == bounds[e+1], are skipped that way).
__device__ __forceinline__ int64_t expert_of(const int64_t* bounds, int64_t n_experts, int64_t r) {
  int64_t lo = 0, hi = n_experts;  // invariant: bounds[lo] <= r < bounds[hi]
  while (hi - lo > 1) {
    const int64_t mid = (lo + hi) / 2;
    if (bounds[mid] <= r)
      lo = mid;
    else
      hi = mid;
  }
  return lo;
}

// Row tile rt (of expert e, its i-th of m) goes to order[rank], its rank among all tiles by place (2 i + 1) / (2 m),
// experts in order on equal places. Counted expert by expert: expert f's tiles j before it are those with
// (2 j + 1) m < A = (2 i + 1) m_f, the odd numbers up to floor((A - 1) / m), and one more where (2 j + 1) m = A and
// f < e. Within an expert the places rise with j, so the ranks are a permutation. One warp per tile, each lane
// counting every 32nd expert (a thread per tile walking all experts with 64-bit divisions took 30 us of the MoE
// layer's forward on the H200 at 64 experts and ~800 tiles, all of it in the layer's critical path).
__global__ void __launch_bounds__(kThreads)
    row_tile_order_kernel(const int64_t* __restrict__ aligned, int64_t n_experts, int64_t tiles,
                          int32_t* __restrict__ order) {
  moerl::cuda::await_previous_grid();
  constexpr int kWarps = kThreads / 32;
  const int lane = threadIdx.x % 32;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kWarps;
  for (int64_t rt = static_cast<int64_t>(blockIdx.x) * kWarps + threadIdx.x / 32; rt < tiles; rt += stride) {
    const int64_t e = fp8::cuda::quant_detail::warp_group_index(aligned, n_experts, rt * kMoeRowAlign);
    const int64_t first = aligned[e] / kMoeRowAlign, m = aligned[e + 1] / kMoeRowAlign - first, i = rt - first;
    int64_t rank = 0;
    for (int64_t f = lane; f < n_experts; f += 32) {
      const int64_t mf = (aligned[f + 1] - aligned[f]) / kMoeRowAlign;
      if (mf == 0) continue;
      const int64_t a = (2 * i + 1) * mf;
      rank += min(mf, ((a - 1) / m + 1) / 2);
      const int64_t q = a / m;  // an equal place: (2 j + 1) m = a with j < mf
      if (f < e && a % m == 0 && q % 2 == 1 && (q - 1) / 2 < mf) ++rank;
    }
    for (int offset = 16; offset > 0; offset /= 2) rank += __shfl_xor_sync(0xFFFFFFFFu, rank, offset);
    if (lane == 0) order[rank] = static_cast<int32_t>(rt);
  }
}

// Plan row i (of expert e) -> aligned row i - offsets[e] + aligned[e]; the same for every assignment's row.
__global__ void __launch_bounds__(kThreads)
    align_plan_kernel(const int64_t* __restrict__ offsets, const int64_t* __restrict__ aligned, int64_t n_experts,
                      const int64_t* __restrict__ token_of, const int64_t* __restrict__ row_of, int64_t rows,
                      int64_t* __restrict__ token_of_aligned, int64_t* __restrict__ row_of_aligned) {
  moerl::cuda::await_previous_grid();
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kThreads;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; i < rows; i += stride) {
    const int64_t e = expert_of(offsets, n_experts, i);
    token_of_aligned[i - offsets[e] + aligned[e]] = token_of[i];
    const int64_t r = row_of[i];
    const int64_t f = expert_of(offsets, n_experts, r);
    row_of_aligned[i] = r - offsets[f] + aligned[f];
  }
}

__global__ void __launch_bounds__(kThreads)
    row_weights_kernel(const float* __restrict__ weight, const int64_t* __restrict__ row_of_aligned,
                       int64_t assignments, float* __restrict__ row_weight) {
  moerl::cuda::await_previous_grid();
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kThreads;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; i < assignments; i += stride)
    row_weight[row_of_aligned[i]] = weight[i];
}

// Block r: xp[r, :] = x[token_of[r], :] or zeros.
__global__ void __launch_bounds__(kRowThreads)
    gather_or_zero_kernel(const float* __restrict__ x, const int64_t* __restrict__ token_of, int64_t dim, bool vec,
                          float* __restrict__ xp) {
  moerl::cuda::await_previous_grid();
  const int64_t r = blockIdx.x, t = token_of[r];
  float* dst = xp + r * dim;
  if (vec) {
    float4* d4 = reinterpret_cast<float4*>(dst);
    const float4* s4 = t >= 0 ? reinterpret_cast<const float4*>(x + t * dim) : nullptr;
    for (int64_t i = threadIdx.x; i < dim / 4; i += kRowThreads) d4[i] = s4 ? s4[i] : make_float4(0, 0, 0, 0);
  } else {
    const float* src = t >= 0 ? x + t * dim : nullptr;
    for (int64_t i = threadIdx.x; i < dim; i += kRowThreads) dst[i] = src ? src[i] : 0.0f;
  }
}

// Block r: buf[r, :] = 0 where token_of[r] < 0.
__global__ void __launch_bounds__(kRowThreads)
    zero_rows_kernel(const int64_t* __restrict__ token_of, int64_t dim, float* __restrict__ buf) {
  moerl::cuda::await_previous_grid();
  const int64_t r = blockIdx.x;
  if (token_of[r] >= 0) return;
  for (int64_t i = threadIdx.x; i < dim; i += kRowThreads) buf[r * dim + i] = 0.0f;
}

// src [rows, tiles] -> per expert e: dst[aligned[e] · tiles + kb · n_e + (r - aligned[e])].
__global__ void __launch_bounds__(kThreads)
    grouped_vec128_scales_kernel(const float* __restrict__ src, const int64_t* __restrict__ aligned,
                                 int64_t n_experts, int64_t rows, int64_t tiles, float* __restrict__ dst) {
  moerl::cuda::await_previous_grid();
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kThreads;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; i < rows * tiles; i += stride) {
    const int64_t r = i / tiles, kb = i - r * tiles;
    const int64_t e = expert_of(aligned, n_experts, r);
    const int64_t first = aligned[e], n = aligned[e + 1] - first;
    dst[first * tiles + kb * n + (r - first)] = src[i];
  }
}

// One warp per row, grid-stride: row r's codes (cols / 16 16-byte chunks) and ntiles scales copied from token
// token_of[r]'s, or a zero row's quantization (codes 0; the scale of an all-zero tile, computed by the quantization
// kernels' own helper).
constexpr int kGatherWarps = 8;
__global__ void __launch_bounds__(kGatherWarps * 32)
    gather_rows_fp8_kernel(const uint8_t* __restrict__ token_codes, const float* __restrict__ token_scales,
                           const int64_t* __restrict__ token_of, int64_t rows, int64_t cols, int64_t ntiles,
                           const int64_t* __restrict__ lt_aligned, int64_t n_experts, uint8_t* __restrict__ codes,
                           float* __restrict__ scales) {
  moerl::cuda::await_previous_grid();
  const int lane = threadIdx.x % 32;
  const int64_t chunks = cols / 16, warps = static_cast<int64_t>(gridDim.x) * kGatherWarps;
  const float zero_scale = fp8::cuda::quant_detail::scale_from_amax_bits(0);
  for (int64_t r = static_cast<int64_t>(blockIdx.x) * kGatherWarps + threadIdx.x / 32; r < rows; r += warps) {
    const int64_t t = token_of[r];
    uint4* dst = reinterpret_cast<uint4*>(codes + r * cols);
    // Scale kb of the row at dst_scales[kb · step]: the CPU's layout, or the cuBLASLt one of the row's expert.
    float* dst_scales = scales + r * ntiles;
    int64_t step = 1;
    if (lt_aligned != nullptr) {
      const int64_t e = fp8::cuda::quant_detail::warp_group_index(lt_aligned, n_experts, r), first = lt_aligned[e];
      step = lt_aligned[e + 1] - first;
      dst_scales = scales + first * ntiles + (r - first);
    }
    if (t >= 0) {
      const uint4* src = reinterpret_cast<const uint4*>(token_codes + t * cols);
      for (int64_t i = lane; i < chunks; i += 32) dst[i] = __ldg(src + i);
      for (int64_t i = lane; i < ntiles; i += 32) dst_scales[i * step] = __ldg(token_scales + t * ntiles + i);
    } else {
      for (int64_t i = lane; i < chunks; i += 32) dst[i] = make_uint4(0, 0, 0, 0);
      for (int64_t i = lane; i < ntiles; i += 32) dst_scales[i * step] = zero_scale;
    }
  }
}

}  // namespace

int64_t moe_aligned_offsets(const int64_t* offsets_host, int64_t n_experts, int64_t* aligned_host) {
  require(offsets_host && aligned_host && n_experts > 0, "cuda::moe_aligned_offsets: null pointer or no experts");
  aligned_host[0] = 0;
  for (int64_t e = 0; e < n_experts; ++e) {
    const int64_t n = offsets_host[e + 1] - offsets_host[e];
    require(n >= 0, [&] { return "cuda::moe_aligned_offsets: offsets decrease at expert " + std::to_string(e); });
    aligned_host[e + 1] = aligned_host[e] + (n + kMoeRowAlign - 1) / kMoeRowAlign * kMoeRowAlign;
  }
  return aligned_host[n_experts];
}

void moe_row_tile_order(const int64_t* aligned, int64_t n_experts, int64_t aligned_rows, int32_t* order,
                        cudaStream_t stream) {
  require(n_experts > 0 && aligned_rows >= 0 && aligned_rows % kMoeRowAlign == 0, [&] {
    return "cuda::moe_row_tile_order: need n_experts > 0 and aligned_rows a multiple of 128, got " +
           std::to_string(n_experts) + ", " + std::to_string(aligned_rows);
  });
  const int64_t tiles = aligned_rows / kMoeRowAlign;
  if (tiles == 0) return;
  require(aligned && order, "cuda::moe_row_tile_order: null pointer");
  launch_after_previous(row_tile_order_kernel, blocks_for(tiles * 32), kThreads, 0, stream, aligned, n_experts, tiles,
                        order);
}

void moe_align_plan(const int64_t* offsets, const int64_t* aligned, int64_t n_experts, const int64_t* token_of,
                    const int64_t* row_of, int64_t rows, int64_t aligned_rows, int64_t* token_of_aligned,
                    int64_t* row_of_aligned, cudaStream_t stream) {
  require(n_experts > 0 && rows >= 0 && aligned_rows >= rows, [&] {
    return "cuda::moe_align_plan: need n_experts > 0 and 0 <= rows <= aligned_rows, got " + std::to_string(n_experts) +
           ", " + std::to_string(rows) + ", " + std::to_string(aligned_rows);
  });
  if (aligned_rows == 0) return;
  require(offsets && aligned && token_of && row_of && token_of_aligned && row_of_aligned,
          "cuda::moe_align_plan: null pointer");
  // All ones = -1 in two's complement: every row a zero row until the plan's rows are placed.
  CUDA_CHECK(cudaMemsetAsync(token_of_aligned, 0xFF, static_cast<size_t>(aligned_rows) * sizeof(int64_t), stream));
  if (rows == 0) return;
  launch_after_previous(align_plan_kernel, blocks_for(rows), kThreads, 0, stream, offsets, aligned, n_experts, token_of,
                        row_of, rows, token_of_aligned, row_of_aligned);
}

void moe_aligned_row_weights(const float* weight, const int64_t* row_of_aligned, int64_t assignments,
                             int64_t aligned_rows, float* row_weight, cudaStream_t stream) {
  require(assignments >= 0 && aligned_rows >= assignments, [&] {
    return "cuda::moe_aligned_row_weights: need 0 <= assignments <= aligned_rows, got " + std::to_string(assignments) +
           ", " + std::to_string(aligned_rows);
  });
  if (assignments == 0) return;
  require(weight && row_of_aligned && row_weight, "cuda::moe_aligned_row_weights: null pointer");
  launch_after_previous(row_weights_kernel, blocks_for(assignments), kThreads, 0, stream, weight, row_of_aligned,
                        assignments, row_weight);
}

void moe_gather_or_zero(const float* x, const int64_t* token_of, int64_t rows, int64_t dim, float* xp,
                        cudaStream_t stream) {
  require(rows >= 0 && dim >= 0, "cuda::moe_gather_or_zero: rows and dim must be >= 0");
  if (rows == 0 || dim == 0) return;
  require(x && token_of && xp, "cuda::moe_gather_or_zero: null x, token_of or xp pointer");
  const bool vec = dim % 4 == 0 && aligned16(x) && aligned16(xp);
  launch_after_previous(gather_or_zero_kernel, row_blocks(rows, "cuda::moe_gather_or_zero"), kRowThreads, 0, stream, x,
                        token_of, dim, vec, xp);
}

void moe_zero_rows(const int64_t* token_of, int64_t rows, int64_t dim, float* buf, cudaStream_t stream) {
  require(rows >= 0 && dim >= 0, "cuda::moe_zero_rows: rows and dim must be >= 0");
  if (rows == 0 || dim == 0) return;
  require(token_of && buf, "cuda::moe_zero_rows: null token_of or buf pointer");
  launch_after_previous(zero_rows_kernel, row_blocks(rows, "cuda::moe_zero_rows"), kRowThreads, 0, stream, token_of,
                        dim,
                        buf);
}

void moe_grouped_vec128_scales(const float* src, const int64_t* aligned, int64_t n_experts, int64_t rows,
                               int64_t tiles, float* dst, cudaStream_t stream) {
  require(n_experts > 0 && rows >= 0 && tiles >= 0, "cuda::moe_grouped_vec128_scales: bad sizes");
  if (rows == 0 || tiles == 0) return;
  require(src && aligned && dst, "cuda::moe_grouped_vec128_scales: null pointer");
  launch_after_previous(grouped_vec128_scales_kernel, blocks_for(rows * tiles), kThreads, 0, stream, src, aligned,
                        n_experts, rows, tiles, dst);
}

void moe_gather_rows_fp8(const uint8_t* token_codes, const float* token_scales, const int64_t* token_of,
                         int64_t rows, int64_t cols, uint8_t* codes, float* scales, cudaStream_t stream,
                         const int64_t* lt_aligned, int64_t n_experts) {
  require(rows >= 0 && cols >= 0 && cols % 16 == 0, [&] {
    return "cuda::moe_gather_rows_fp8: need rows >= 0 and cols a multiple of 16, got " + std::to_string(rows) + " x " +
           std::to_string(cols);
  });
  if (rows == 0 || cols == 0) return;
  require(token_codes && token_scales && token_of && codes && scales && aligned16(token_codes) && aligned16(codes),
          "cuda::moe_gather_rows_fp8: null pointer, or codes not 16-byte aligned");
  require(lt_aligned == nullptr || n_experts > 0, "cuda::moe_gather_rows_fp8: the cuBLASLt layout needs n_experts > 0");
  const unsigned blocks =
      static_cast<unsigned>(std::clamp<int64_t>((rows + kGatherWarps - 1) / kGatherWarps, 1, kMaxBlocks));
  launch_after_previous(gather_rows_fp8_kernel, blocks, kGatherWarps * 32, 0, stream, token_codes, token_scales,
                        token_of, rows, cols, (cols + 127) / 128, lt_aligned, n_experts, codes, scales);
}

}  // namespace moerl::cuda
