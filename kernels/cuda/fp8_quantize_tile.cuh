// One 128 x 128 block of an activation per thread block, read once, quantized in 1x128 tiles along its rows
// (quantize_1x128's codes and scales), along its columns (quantize_1x128_transposed's, optionally grouped), or
// both. The activation comes from a source functor, so a producer (SwiGLU, its backward) can hand its output
// straight to the quantization without a pass over memory (kernels/cuda/swiglu_fp8.cu).
//
// Layout of a block (rt, ct): rows r0 = 128 rt .., columns c0 = 128 ct ... 16 warps; warp w loads rows
// 8w .. 8w + 7, 4 rows x 32 columns per 16-byte load (k = 0 .. 7: rows 8w + 4(k / 4) + lane / 8, columns
// 32(k % 4) + 4(lane % 8)), so the 8 lanes sharing a row hold all its 128 columns: the row's amax is 3 shuffles
// and its codes are written from registers. For the columns the block goes through shared memory (row stride
// 129 floats: the stores of one load and the column reads are both conflict-free); warp w quantizes columns
// 8w .. 8w + 7 (lane l holds rows l, l + 32, l + 64, l + 96), stages their codes per column over the same shared
// memory and writes each column's 128 codes as one 128-byte store.
//
// Needs rows % 128 == 0 (the routed experts' aligned rows), cols % 4 == 0 and 16-byte aligned sources, 4-byte
// aligned codes (callers check; a partial last column tile is zero-padded as on the CPU). Bit-exact with the CPU
// by the helpers of fp8_quantize_common.cuh.
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

#include "kernels/cuda/cuda_check.hpp"
#include "kernels/cuda/fp8_quantize_common.cuh"

namespace moerl::fp8::cuda::quant_detail {

constexpr int kTileWarps = 16;
constexpr int kTileThreads = kTileWarps * kWarp;
constexpr int kTileStride = kTile + 1;                                 // floats per shared row
constexpr int kTileSmemBytes = static_cast<int>(sizeof(float)) * kTile * kTileStride;  // 66,048 bytes
constexpr int kTileLoads = kTile * kTile / 4 / kTileThreads;           // 16-byte loads per thread
static_assert(kTileLoads == 8 && kTile / kTileWarps == 8, "the layout above");
static_assert(kTile * kTile <= kTileSmemBytes, "staged codes fit in the tile's shared memory");

struct TileOutputs {
  int64_t rows = 0, cols = 0;                     // the activation [rows, cols]
  uint8_t* codes = nullptr;                       // rows: [rows, cols]
  float* scales = nullptr;                        //       [rows, tiles(cols)]
  uint8_t* codes_t = nullptr;                     // columns: [cols, rows], or per group [cols, n_g] at bounds[g]·cols
  float* scales_t = nullptr;                      //          [cols, rows / 128]
  const int64_t* bounds = nullptr;                // [n_groups + 1] on the device, or null: one group
  int64_t n_groups = 0;
};

// The block (blockIdx.y, blockIdx.x)'s values, v[k] = x[r, c .. c + 3] at the load layout above (zeros past
// cols), quantized into o. Uses the tile's shared memory when kCols; the caller syncs before reusing it.
template <bool kRows, bool kCols>
__device__ __forceinline__ void quantize_tile_values(float (&v)[kTileLoads][4], const TileOutputs& o,
                                                     float4* tile_smem) {
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp, sub = lane >> 3, quad = lane & 7;
  const int64_t rt = blockIdx.y, ct = blockIdx.x, r0 = rt * kTile, c0 = ct * kTile;
  if constexpr (kRows) {
    const int64_t ntiles = (o.cols + kTile - 1) / kTile;
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      int amax = 0;
#pragma unroll
      for (int k = 4 * h; k < 4 * h + 4; ++k) amax = max(amax, abs_bits4(v[k]));
      for (int offset = 1; offset < 8; offset *= 2) amax = max(amax, __shfl_xor_sync(0xFFFFFFFFu, amax, offset));
      const float scale = scale_from_amax_bits(amax);
      const int64_t r = r0 + 8 * warp + 4 * h + sub;
      if (quad == 0) o.scales[r * ntiles + ct] = scale;
#pragma unroll
      for (int k = 4 * h; k < 4 * h + 4; ++k) {
        const int64_t c = c0 + 32 * (k & 3) + 4 * quad;
        if (c < o.cols) __stcs(reinterpret_cast<unsigned int*>(o.codes + r * o.cols + c), encode4(v[k], scale));
      }
    }
  }
  if constexpr (kCols) {
    float* tile = reinterpret_cast<float*>(tile_smem);
#pragma unroll
    for (int k = 0; k < kTileLoads; ++k) {
      const int rr = 8 * warp + 4 * (k >> 2) + sub, cc = 32 * (k & 3) + 4 * quad;
#pragma unroll
      for (int e = 0; e < 4; ++e) tile[rr * kTileStride + cc + e] = v[k][e];
    }
    __syncthreads();
    constexpr int kCols8 = kTile / kTileWarps;
    float q[kCols8][4];
#pragma unroll
    for (int j = 0; j < kCols8; ++j)
#pragma unroll
      for (int i = 0; i < 4; ++i) q[j][i] = tile[(lane + i * kWarp) * kTileStride + warp * kCols8 + j];
    __syncthreads();  // the staged codes below overwrite the tile
    uint8_t* staged = reinterpret_cast<uint8_t*>(tile_smem);  // [128 columns][128 rows]
    const int64_t nrow_tiles = o.rows / kTile;
#pragma unroll
    for (int j = 0; j < kCols8; ++j) {
      const int jj = warp * kCols8 + j;
      const float scale = scale_from_amax_bits(warp_max(abs_bits4(q[j])));
      const int64_t c = c0 + jj;
      if (lane == 0 && c < o.cols) o.scales_t[c * nrow_tiles + rt] = scale;
      const uint16_t lo = encode2(q[j][0], q[j][1], scale), hi = encode2(q[j][2], q[j][3], scale);
      staged[jj * kTile + lane] = static_cast<uint8_t>(lo);
      staged[jj * kTile + lane + kWarp] = static_cast<uint8_t>(lo >> 8);
      staged[jj * kTile + lane + 2 * kWarp] = static_cast<uint8_t>(hi);
      staged[jj * kTile + lane + 3 * kWarp] = static_cast<uint8_t>(hi >> 8);
    }
    __syncwarp();  // each warp reads back only the columns it staged

    // Where this block's codes go: rows r0 .. of a [cols, out_rows] matrix at out.
    uint8_t* out = o.codes_t;
    int64_t out_rows = o.rows, first = r0;
    if (o.bounds != nullptr) {
      int64_t lo = 0, hi = o.n_groups;  // the last group starting at or before r0 (empty groups skipped)
      while (hi - lo > 1) {
        const int64_t mid = (lo + hi) / 2;
        if (o.bounds[mid] <= r0)
          lo = mid;
        else
          hi = mid;
      }
      out = o.codes_t + o.bounds[lo] * o.cols;
      out_rows = o.bounds[lo + 1] - o.bounds[lo];
      first = r0 - o.bounds[lo];
    }
#pragma unroll
    for (int j = 0; j < kCols8; ++j) {
      const int jj = warp * kCols8 + j;
      const int64_t c = c0 + jj;
      if (c >= o.cols) break;
      const uint32_t packed = reinterpret_cast<const uint32_t*>(staged + jj * kTile)[lane];
      __stcs(reinterpret_cast<unsigned int*>(out + c * out_rows + first) + lane, packed);
    }
  }
}

// The source at (r, c) (c + 3 < cols) returns x[r, c .. c + 3]; it is called once per such group.
template <class Src, bool kRows, bool kCols>
__global__ void __launch_bounds__(kTileThreads, 2) quantize_tile_kernel(Src src, TileOutputs o) {
  extern __shared__ float4 tile_smem[];
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp, sub = lane >> 3, quad = lane & 7;
  const int64_t r0 = static_cast<int64_t>(blockIdx.y) * kTile, c0 = static_cast<int64_t>(blockIdx.x) * kTile;
  float v[kTileLoads][4];
#pragma unroll
  for (int k = 0; k < kTileLoads; ++k) {
    const int64_t r = r0 + 8 * warp + 4 * (k >> 2) + sub, c = c0 + 32 * (k & 3) + 4 * quad;
    if (c < o.cols) {
      const float4 f = src(r, c);
      v[k][0] = f.x, v[k][1] = f.y, v[k][2] = f.z, v[k][3] = f.w;
    } else {
      v[k][0] = v[k][1] = v[k][2] = v[k][3] = 0.0f;  // the CPU's zero padding of a partial tile
    }
  }
  quantize_tile_values<kRows, kCols>(v, o, tile_smem);
}

// Two activations of the same shape from one source, each quantized both ways (rows and columns): src(r, c, a, b)
// sets a = x[r, c .. c + 3] and b = y[r, c .. c + 3], so inputs they share are read once. One block per SM (both
// value sets live in registers: 64 of the 128 a thread may hold); oa and ob differ only in their outputs.
template <class Src>
__global__ void __launch_bounds__(kTileThreads, 1) quantize_tile_pair_kernel(Src src, TileOutputs oa, TileOutputs ob) {
  extern __shared__ float4 tile_smem[];
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp, sub = lane >> 3, quad = lane & 7;
  const int64_t r0 = static_cast<int64_t>(blockIdx.y) * kTile, c0 = static_cast<int64_t>(blockIdx.x) * kTile;
  float va[kTileLoads][4], vb[kTileLoads][4];
#pragma unroll
  for (int k = 0; k < kTileLoads; ++k) {
    const int64_t r = r0 + 8 * warp + 4 * (k >> 2) + sub, c = c0 + 32 * (k & 3) + 4 * quad;
    float4 a = make_float4(0.0f, 0.0f, 0.0f, 0.0f), b = a;  // the CPU's zero padding of a partial tile
    if (c < oa.cols) src(r, c, a, b);
    va[k][0] = a.x, va[k][1] = a.y, va[k][2] = a.z, va[k][3] = a.w;
    vb[k][0] = b.x, vb[k][1] = b.y, vb[k][2] = b.z, vb[k][3] = b.w;
  }
  quantize_tile_values<true, true>(va, oa, tile_smem);
  __syncthreads();  // every warp has written out a's staged codes before b's values overwrite the tile
  quantize_tile_values<true, true>(vb, ob, tile_smem);
}

// Launches quantize_tile_kernel over o.rows / 128 x tiles(o.cols) blocks (the caller has checked the layout's
// needs, above).
template <bool kRows, bool kCols, class Src>
void launch_quantize_tiles(const Src& src, const TileOutputs& o, cudaStream_t stream) {
  static_assert(kRows || kCols, "nothing to write");
  if (o.rows == 0 || o.cols == 0) return;
  const auto kernel = quantize_tile_kernel<Src, kRows, kCols>;
  const int smem = kCols ? kTileSmemBytes : 0;
  if (kCols) CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
  const dim3 grid(static_cast<unsigned>(tiles(o.cols)), static_cast<unsigned>(o.rows / kTile));
  kernel<<<grid, kTileThreads, smem, stream>>>(src, o);
  CUDA_CHECK_LAUNCH();
}

// Launches quantize_tile_pair_kernel over oa.rows / 128 x tiles(oa.cols) blocks (oa and ob of one shape).
template <class Src>
void launch_quantize_tile_pairs(const Src& src, const TileOutputs& oa, const TileOutputs& ob, cudaStream_t stream) {
  if (oa.rows == 0 || oa.cols == 0) return;
  const auto kernel = quantize_tile_pair_kernel<Src>;
  CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kTileSmemBytes));
  const dim3 grid(static_cast<unsigned>(tiles(oa.cols)), static_cast<unsigned>(oa.rows / kTile));
  kernel<<<grid, kTileThreads, kTileSmemBytes, stream>>>(src, oa, ob);
  CUDA_CHECK_LAUNCH();
}

// The plain source: x [rows, cols] in memory, read once (streaming).
struct PlainSource {
  const float* x;
  int64_t cols;
  __device__ __forceinline__ float4 operator()(int64_t r, int64_t c) const {
    return __ldcs(reinterpret_cast<const float4*>(x + r * cols + c));
  }
};

}  // namespace moerl::fp8::cuda::quant_detail
