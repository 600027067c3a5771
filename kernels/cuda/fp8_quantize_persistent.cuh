// Persistent forms of the 128-row block quantizations of fp8_quantize_tile.cuh (the same quantize_tile_values, so
// the same bytes), for the memory-bound passes of the routed experts (kernels/cuda/moe_fp8_experts.cu,
// swiglu_fp8.cu). Each thread block keeps one column block (blockIdx.x, as there) and walks down the row tiles
// rt = blockIdx.y, + gridDim.y, ...; before loading a tile it asks L2 for the tile `ahead` steps further down
// (cp.async.bulk.prefetch.L2: one instruction per source row and array, no registers held). Why: the one-shot
// kernels load a tile, then quantize it (IEEE divisions, the shared-memory transpose) with no load in flight on that
// SM; with one or two blocks per SM the memory sits idle for that phase (the MoE layer's SwiGLU backward pair kernel,
// 3 FP32 inputs per element: ~1.5 TB/s on the H200, bench/results/2026-11-29-gpu-profile-h200-aad5220.txt). With the
// next tile requested from DRAM while the current one is quantized, its loads hit L2.
//
// A source for these kernels has, besides operator() of fp8_quantize_tile.cuh, prefetch(r, c0, n): ask L2 for the
// bytes row r's values c0 .. c0 + n - 1 are made from (n a multiple of 4; 16-byte aligned rows, as the tile kernels
// already need).
//
// Grid: tiles(cols) column blocks (kTC wide) x G row walkers, G = min(ceil(row tiles / 4), resident blocks per
// column block) (at least 4 tiles per block so that the prefetch has something to run ahead of; all blocks resident
// at once). Same requirements as fp8_quantize_tile.cuh (rows % 128 == 0, cols % 4 == 0, 16-byte aligned sources,
// 4-byte aligned codes).
#pragma once
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <string>

#include "kernels/cuda/cuda_check.hpp"
#include "kernels/cuda/fp8_quantize_tile.cuh"
#include "runtime/error.hpp"

namespace moerl::fp8::cuda::quant_detail {

// Asks L2 for bytes [p, p + bytes) (p 16-byte aligned, bytes a positive multiple of 16); nothing is waited for.
__device__ __forceinline__ void prefetch_l2(const void* p, int64_t bytes) {
  asm volatile("cp.async.bulk.prefetch.L2.global [%0], %1;" ::"l"(p), "r"(static_cast<uint32_t>(bytes)) : "memory");
}

// How many row tiles ahead the persistent kernels prefetch: MOERL_QUANT_PREFETCH (0 .. 4), read once per process;
// 1 when unset. 0 means: the one-shot kernels of fp8_quantize_tile.cuh (for comparing the two on the device).
inline int prefetch_ahead() {
  static const int ahead = [] {
    const char* v = std::getenv("MOERL_QUANT_PREFETCH");
    if (v == nullptr || *v == '\0') return 1;
    const int a = std::atoi(v);
    if (a < 0 || a > 4 || (a == 0 && std::string(v) != "0"))
      throw Error(std::string("MOERL_QUANT_PREFETCH must be 0 .. 4, got ") + v);
    return a;
  }();
  return ahead;
}

// The block's rows r0 .. r0 + 127 at its column block, loaded as quantize_tile_kernel loads them.
template <int kTC, class Src>
__device__ __forceinline__ void load_tile_values(const Src& src, const TileOutputs& o, int64_t rt,
                                                 float (&v)[kTileLoads][4]) {
  using Shape = TileShape<kTC>;
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp, sub = lane >> 3, quad = lane & 7;
  const int64_t c0 = static_cast<int64_t>(blockIdx.x) * kTC;
#pragma unroll
  for (int k = 0; k < kTileLoads; ++k) {
    const int64_t r = rt * kTile + Shape::row(k, warp, sub), c = c0 + Shape::col(k, quad);
    if (c < o.cols) {
      const float4 f = src(r, c);
      v[k][0] = f.x, v[k][1] = f.y, v[k][2] = f.z, v[k][3] = f.w;
    } else {
      v[k][0] = v[k][1] = v[k][2] = v[k][3] = 0.0f;  // the CPU's zero padding of a partial tile
    }
  }
}

// Threads 0 .. 127 ask L2 for row tile rt's rows (nothing past the last tile).
template <int kTC, class Src>
__device__ __forceinline__ void prefetch_tile(const Src& src, const TileOutputs& o, int64_t rt, int64_t nrt) {
  const int64_t c0 = static_cast<int64_t>(blockIdx.x) * kTC;
  if (rt < nrt && threadIdx.x < kTile) src.prefetch(rt * kTile + threadIdx.x, c0, std::min<int64_t>(kTC, o.cols - c0));
}

template <class Src, bool kRows, bool kCols, int kTC>
__global__ void __launch_bounds__(TileShape<kTC>::kThreads, kTC == kTile ? 2 : 4)
    quantize_tile_persistent_kernel(Src src, TileOutputs o, int ahead) {
  extern __shared__ float4 tile_smem[];
  const int64_t nrt = o.rows / kTile, step = gridDim.y;
  for (int i = 1; i < ahead; ++i) prefetch_tile<kTC>(src, o, blockIdx.y + i * step, nrt);
#pragma unroll 1
  for (int64_t rt = blockIdx.y; rt < nrt; rt += step) {
    prefetch_tile<kTC>(src, o, rt + ahead * step, nrt);
    float v[kTileLoads][4];
    load_tile_values<kTC>(src, o, rt, v);
    quantize_tile_values<kRows, kCols, kTC>(v, o, tile_smem, rt, [] {});
    if constexpr (kCols) __syncthreads();  // every warp has read this tile from shared memory
  }
}

// Two activations from one source (quantize_tile_pair_kernel's src(r, c, a, b)), each quantized both ways.
template <class Src>
__global__ void __launch_bounds__(TileShape<kTile>::kThreads, 1)
    quantize_tile_pair_persistent_kernel(Src src, TileOutputs oa, TileOutputs ob, int ahead) {
  using Shape = TileShape<kTile>;
  extern __shared__ float4 tile_smem[];
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp, sub = lane >> 3, quad = lane & 7;
  const int64_t c0 = static_cast<int64_t>(blockIdx.x) * kTile, nrt = oa.rows / kTile, step = gridDim.y;
  for (int i = 1; i < ahead; ++i) prefetch_tile<kTile>(src, oa, blockIdx.y + i * step, nrt);
#pragma unroll 1
  for (int64_t rt = blockIdx.y; rt < nrt; rt += step) {
    prefetch_tile<kTile>(src, oa, rt + ahead * step, nrt);
    float va[kTileLoads][4], vb[kTileLoads][4];
#pragma unroll
    for (int k = 0; k < kTileLoads; ++k) {
      const int64_t r = rt * kTile + Shape::row(k, warp, sub), c = c0 + Shape::col(k, quad);
      float4 a = make_float4(0.0f, 0.0f, 0.0f, 0.0f), b = a;  // the CPU's zero padding of a partial tile
      if (c < oa.cols) src(r, c, a, b);
      va[k][0] = a.x, va[k][1] = a.y, va[k][2] = a.z, va[k][3] = a.w;
      vb[k][0] = b.x, vb[k][1] = b.y, vb[k][2] = b.z, vb[k][3] = b.w;
    }
    const auto none = [] {};
    quantize_tile_values<true, true, kTile>(va, oa, tile_smem, rt, none);
    __syncthreads();  // every warp has read a's block from shared memory before b's values overwrite it
    quantize_tile_values<true, true, kTile>(vb, ob, tile_smem, rt, none);
    __syncthreads();
  }
}

// Row walkers per column block for `kernel` (see the grid above).
template <class Kernel>
unsigned persistent_row_blocks(Kernel kernel, int threads, int smem, int64_t col_blocks, int64_t row_tiles) {
  int device = 0, sms = 0, per_sm = 0;
  CUDA_CHECK(cudaGetDevice(&device));
  CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, threads, smem));
  const int64_t resident = std::max<int64_t>(1, static_cast<int64_t>(sms) * std::max(per_sm, 1) / col_blocks);
  return static_cast<unsigned>(std::clamp<int64_t>((row_tiles + 3) / 4, 1, std::min<int64_t>(resident, 65535)));
}

// quantize_tile_persistent_kernel over o (the caller has checked the layout's needs); ahead >= 1.
template <bool kRows, bool kCols, class Src, int kTC = kTile>
void launch_quantize_tiles_persistent(const Src& src, const TileOutputs& o, int ahead, cudaStream_t stream) {
  static_assert(kRows || kCols, "nothing to write");
  if (o.rows == 0 || o.cols == 0) return;
  const auto kernel = quantize_tile_persistent_kernel<Src, kRows, kCols, kTC>;
  const int smem = kCols ? TileShape<kTC>::kSmemBytes : 0;
  if (kCols) CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
  const int64_t col_blocks = (o.cols + kTC - 1) / kTC;
  const dim3 grid(static_cast<unsigned>(col_blocks),
                  persistent_row_blocks(kernel, TileShape<kTC>::kThreads, smem, col_blocks, o.rows / kTile));
  kernel<<<grid, TileShape<kTC>::kThreads, smem, stream>>>(src, o, ahead);
  CUDA_CHECK_LAUNCH();
}

// quantize_tile_pair_persistent_kernel over oa and ob (of one shape); ahead >= 1.
template <class Src>
void launch_quantize_tile_pairs_persistent(const Src& src, const TileOutputs& oa, const TileOutputs& ob, int ahead,
                                           cudaStream_t stream) {
  if (oa.rows == 0 || oa.cols == 0) return;
  const auto kernel = quantize_tile_pair_persistent_kernel<Src>;
  constexpr int smem = TileShape<kTile>::kSmemBytes;
  CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
  const int64_t col_blocks = tiles(oa.cols);
  const dim3 grid(static_cast<unsigned>(col_blocks),
                  persistent_row_blocks(kernel, TileShape<kTile>::kThreads, smem, col_blocks, oa.rows / kTile));
  kernel<<<grid, TileShape<kTile>::kThreads, smem, stream>>>(src, oa, ob, ahead);
  CUDA_CHECK_LAUNCH();
}

}  // namespace moerl::fp8::cuda::quant_detail
