// FP8 E4M3 quantization kernels (any CUDA arch >= sm_89 for the hardware conversion; built for sm_90a).
// Bit-exact with fp8::cpu::quantize_* (kernels/cpu/fp8.cpp): the tile amax is an integer max of |x|'s bit
// patterns with NaN ignored (exactly the CPU's), the scale and x / scale use IEEE round-to-nearest
// division (__fdiv_rn: independent of -prec-div / --use_fast_math), and the conversion is
// cvt.rn.satfinite.e4m3x2.f32, which the CPU conversion matches (checked against CUDA's host code on all
// 2^32 floats; against the device in tests/gpu/fp8_quantize_gpu.cpp).
#include <cuda_fp8.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <cstdlib>
#include <string>

#include "kernels/cuda/cuda_check.hpp"
#include "kernels/cuda/fp8_quantize_block.cuh"
#include "kernels/cuda/fp8_quantize_common.cuh"
#include "kernels/cuda/fp8_quantize_tile.cuh"
#include "kernels/cuda/pdl.cuh"
#include "kernels/fp8_quantize.hpp"
#include "runtime/error.hpp"

namespace moerl::fp8::cuda {
namespace {

using namespace quant_detail;

// Block shapes chosen by measurement on the H200 at 8192 x 8192 (bench/results/2026-11-28-quant-variants-h200.jsonl:
// every variant checked bit-exact against the previous kernels): a 1x128 warp handles 4 tiles, whose loads are all
// in flight before the first reduction (3.8 TB/s vs 3.0 with one tile per warp); 128x128 blocks with 16 warps
// of 8 rows each (3.9 TB/s vs 1.8 with 8 warps of 16 rows); transposed blocks of 128 rows x 32 columns with
// 16-byte loads (3.2 TB/s vs 2.0 with 64 columns and 4-byte loads). Loads and stores are streaming (__ldcs,
// __stcs): each element is read and written once.
constexpr int kRowWarps = 4;                // 1x128: warps per block
constexpr int kTilesPerWarp = 4;            // 1x128: tiles per warp
constexpr int kTransposeWarps = 8;          // transposed: warps per block
// transposed: TransposedKernel (kernels/fp8_quantize.hpp): fp8_quantize_tile.cuh's 128 x 64 blocks (Tiles64)
// where their conditions hold, else blocks of 128 rows x 32 columns (Cols32). On the H200 at 8192 x 8192
// (bench/results/2026-11-29-gpu-quant-h200-17b4933.jsonl, 5 runs of moerl bench gpu): tiles64 3.13-3.39 TB/s against
// shapes since removed: 4 such blocks down the rows per thread block 2.60-3.05, 128 x 128 blocks 2.58-2.83, cols32
// 2.64-2.84, 64-column cols 2.43-2.59. With x / scale
// by Divisor and the amax by fmaxf (fp8_quantize_common.cuh; bench/results/2026-11-29-gpu-dual-h200-af1791f.jsonl,
// against main 782ab8a in the same call): tiles64 3.50-3.72 (3.41-3.52 before), 128x128 3.92-3.93 (3.82-3.83),
// dual 2.77-2.80 (2.22-2.45). The 1x128 and the cols32 kernels keep __fdiv_rn: with one reciprocal per 4
// elements a lane it is no faster (1x128: 3.49-3.53 TB/s against 3.78-3.79).

// One warp per kTilesPerWarp consecutive 1x128 tiles, 4 elements per lane. Tiles numbered row-major:
// tile = r * ntiles + t, which is also the index of its scale. `vec`: x rows 16-byte aligned and codes rows
// 4-byte aligned. kFull: cols % 128 == 0 and `vec`, so tile t starts at element 128 t and no bounds are
// checked (the 64-bit divisions and branches of the general path cost a third of the bandwidth). kLt: the scales
// in cuBLASLt's layout [ntiles, rows] (ScaleLayout::Cublaslt).
template <bool kFull, bool kLt>
__global__ void __launch_bounds__(kRowWarps * kWarp)
    quantize_1x128_kernel(const float* __restrict__ x, int64_t rows, int64_t cols, int64_t ntiles, bool vec,
                          uint8_t* __restrict__ codes, float* __restrict__ scales) {
  moerl::cuda::await_previous_grid();
  const int64_t first = (static_cast<int64_t>(blockIdx.x) * kRowWarps + threadIdx.x / kWarp) * kTilesPerWarp;
  const int64_t count = rows * ntiles;
  const int lane = threadIdx.x % kWarp;
  float v[kTilesPerWarp][4];
#pragma unroll
  for (int i = 0; i < kTilesPerWarp; ++i) {
    const int64_t tile = first + i;
    if (kFull && tile < count) {
      const float4 f = __ldcs(reinterpret_cast<const float4*>(x + tile * kTile) + lane);
      v[i][0] = f.x, v[i][1] = f.y, v[i][2] = f.z, v[i][3] = f.w;
    } else if (tile < count) {
      load4(x + tile / ntiles * cols, tile % ntiles * kTile + lane * 4, cols, vec, v[i]);
    }
  }
#pragma unroll
  for (int i = 0; i < kTilesPerWarp; ++i) {
    const int64_t tile = first + i;
    if (tile >= count) break;  // uniform across the warp
    const int amax =
        warp_max(max(max(abs_bits(v[i][0]), abs_bits(v[i][1])), max(abs_bits(v[i][2]), abs_bits(v[i][3]))));
    const float scale = scale_from_amax_bits(amax);
    if (lane == 0) scales[kLt ? tile % ntiles * rows + tile / ntiles : tile] = scale;  // kLt: [ntiles, rows]
    if (kFull)
      __stcs(reinterpret_cast<unsigned int*>(codes + tile * kTile) + lane, encode4(v[i], scale));
    else
      store4(codes + tile / ntiles * cols, tile % ntiles * kTile + lane * 4, cols, vec, encode4(v[i], scale));
  }
}

// One block per 128x128 block (fp8_quantize_block.cuh) of matrix blockIdx.z of w, read with 16-byte loads where
// `vec` (kFull: rows and cols multiples of 128 and `vec`: no bounds checks).
template <bool kFull, bool kTransposed>
__global__ void __launch_bounds__(kBlockThreads)
    quantize_128x128_kernel(const float* __restrict__ w, int64_t rows, int64_t cols, bool vec,
                            uint8_t* __restrict__ codes, float* __restrict__ scales, uint8_t* __restrict__ codes_t,
                            int64_t codes_stride, int64_t t_ld, int64_t t_stride) {
  moerl::cuda::await_previous_grid();
  __shared__ BlockSmem<kTransposed> smem;
  // blockIdx.z: the matrix of a batch (quantize_128x128_batched), 0 otherwise.
  w += static_cast<int64_t>(blockIdx.z) * rows * cols;
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
  const int64_t r0 = static_cast<int64_t>(blockIdx.y) * kTile, c0 = static_cast<int64_t>(blockIdx.x) * kTile;
  const int64_t c = c0 + lane * 4;
  float v[kBlockRowsPerWarp][4];
#pragma unroll
  for (int i = 0; i < kBlockRowsPerWarp; ++i) {
    const int64_t r = r0 + warp * kBlockRowsPerWarp + i;
    if (kFull) {
      const float4 f = __ldcs(reinterpret_cast<const float4*>(w + r * cols + c));
      v[i][0] = f.x, v[i][1] = f.y, v[i][2] = f.z, v[i][3] = f.w;
    } else if (r < rows) {
      load4(w + r * cols, c, cols, vec, v[i]);
    } else {
      v[i][0] = v[i][1] = v[i][2] = v[i][3] = 0.0f;
    }
  }
  const BlockPlace at{rows, cols, r0, c0, codes + static_cast<int64_t>(blockIdx.z) * codes_stride,
                      kTransposed ? codes_t + static_cast<int64_t>(blockIdx.z) * t_stride : nullptr, t_ld,
                      scales + (static_cast<int64_t>(blockIdx.z) * gridDim.y + blockIdx.y) * gridDim.x + blockIdx.x};
  quantize_block_values<kFull, kTransposed>(v, at, vec, smem);
}

// One block per (128-row tile rt, kTC-column chunk) of x [rows, cols]. The tile is staged in shared
// memory (coalesced reads along columns, 16 bytes per load when `vec_x`), each warp then quantizes its columns
// — lane l holds rows l, l + 32, l + 64, l + 96 of a column (row stride kTC + 1 floats: conflict-free)
// — and stages their codes per column so the writes to codes_t [cols, rows] run contiguously along rows.
// `vec_x`: x rows 16-byte aligned; `vec`: codes_t rows 4-byte aligned. kFull: rows % 128 == 0,
// cols % kTC == 0, `vec_x` and `vec`: no bounds checks. kGrouped: the rows are cut into groups at
// bounds [n_groups + 1] (multiples of 128), and group g's codes are its own packed transpose [cols, n_g] at
// codes_t + bounds[g] · cols (a 128-row tile lies in one group).
constexpr int kTC = 32;  // columns per block of quantize_1x128_transposed_kernel (the Cols32 shape)

template <bool kFull, bool kGrouped>
__global__ void __launch_bounds__(kTransposeWarps * kWarp)
    quantize_1x128_transposed_kernel(const float* __restrict__ x, int64_t rows, int64_t cols, int64_t nrow_tiles,
                                     bool vec_x, bool vec, uint8_t* __restrict__ codes_t,
                                     float* __restrict__ scales_t, const int64_t* __restrict__ bounds,
                                     int64_t n_groups, bool lt) {
  moerl::cuda::await_previous_grid();
  constexpr int kThreads = kTransposeWarps * kWarp;
  constexpr int kQuads = kTC / 4;                 // 4-column groups per tile row
  constexpr int kLoads = kTile * kQuads / kThreads;          // groups per thread
  static_assert(kTile * kQuads % kThreads == 0 && kTC % kTransposeWarps == 0, "tile split");
  __shared__ float tile[kTile][kTC + 1];
  __shared__ __align__(16) uint8_t staged[kTC][kTile];
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
  const int64_t rt = blockIdx.y, r0 = rt * kTile, c0 = static_cast<int64_t>(blockIdx.x) * kTC;

  float v[kLoads][4];
#pragma unroll
  for (int k = 0; k < kLoads; ++k) {
    const int i = threadIdx.x + k * kThreads, rr = i / kQuads, cc = (i % kQuads) * 4;
    const int64_t r = r0 + rr;
    if (kFull) {
      const float4 f = __ldcs(reinterpret_cast<const float4*>(x + r * cols + c0 + cc));
      v[k][0] = f.x, v[k][1] = f.y, v[k][2] = f.z, v[k][3] = f.w;
    } else if (r < rows) {
      load4(x + r * cols, c0 + cc, cols, vec_x, v[k]);
    } else {
      v[k][0] = v[k][1] = v[k][2] = v[k][3] = 0.0f;
    }
  }
#pragma unroll
  for (int k = 0; k < kLoads; ++k) {
    const int i = threadIdx.x + k * kThreads, rr = i / kQuads, cc = (i % kQuads) * 4;
    for (int e = 0; e < 4; ++e) tile[rr][cc + e] = v[k][e];
  }
  __syncthreads();

  constexpr int kColsPerWarp = kTC / kTransposeWarps;
  for (int j = warp * kColsPerWarp; j < (warp + 1) * kColsPerWarp; ++j) {
    float q[4];
    for (int i = 0; i < 4; ++i) q[i] = tile[lane + i * kWarp][j];
    const int amax = warp_max(max(max(abs_bits(q[0]), abs_bits(q[1])), max(abs_bits(q[2]), abs_bits(q[3]))));
    const float scale = scale_from_amax_bits(amax);
    const int64_t c = c0 + j;
    if (lane == 0 && c < cols) scales_t[lt ? rt * cols + c : c * nrow_tiles + rt] = scale;  // lt: [nrow_tiles, cols]
    const uint16_t lo = encode2(q[0], q[1], scale), hi = encode2(q[2], q[3], scale);
    staged[j][lane] = static_cast<uint8_t>(lo);
    staged[j][lane + kWarp] = static_cast<uint8_t>(lo >> 8);
    staged[j][lane + 2 * kWarp] = static_cast<uint8_t>(hi);
    staged[j][lane + 3 * kWarp] = static_cast<uint8_t>(hi >> 8);
  }
  __syncwarp();  // each warp reads back only the columns it staged

  // Where this tile's codes go: rows r0 .. of a [cols, out_rows] matrix at out.
  uint8_t* out = codes_t;
  int64_t out_rows = rows, first = r0;
  if constexpr (kGrouped) {
    int64_t lo = 0, hi = n_groups;  // the last group starting at or before r0 (empty groups skipped)
    while (hi - lo > 1) {
      const int64_t mid = (lo + hi) / 2;
      if (bounds[mid] <= r0)
        lo = mid;
      else
        hi = mid;
    }
    out = codes_t + bounds[lo] * cols;
    out_rows = bounds[lo + 1] - bounds[lo];
    first = r0 - bounds[lo];
  }
  for (int j = warp * kColsPerWarp; j < (warp + 1) * kColsPerWarp; ++j) {
    const int64_t c = c0 + j;
    if (!kFull && c >= cols) break;
    const uint32_t packed = reinterpret_cast<const uint32_t*>(staged[j])[lane];
    if (kFull)
      __stcs(reinterpret_cast<unsigned int*>(out + c * out_rows + first) + lane, packed);
    else
      store4(out + c * out_rows, first + lane * 4, out_rows, vec, packed);
  }
}

bool aligned(const void* p, uintptr_t n) { return reinterpret_cast<uintptr_t>(p) % n == 0; }

void check_args(const char* fn, const float* x, int64_t rows, int64_t cols, const uint8_t* codes, const float* scales) {
  const std::string where = std::string("fp8::cuda::") + fn + ": ";
  require(rows >= 0 && cols >= 0, [&] {
    return where + "rows and cols must be >= 0, got " + std::to_string(rows) + " x " + std::to_string(cols);
  });
  if (rows == 0 || cols == 0) return;
  require(x != nullptr && codes != nullptr && scales != nullptr,
          [&] { return where + "null input, codes or scales pointer"; });
}

int64_t blocks_for(int64_t items, int64_t per_block) { return (items + per_block - 1) / per_block; }

// Whether x [rows, cols] takes the 128 x 128 block kernels of fp8_quantize_tile.cuh.
bool tile_kernel_fits(const float* x, int64_t rows, int64_t cols, const uint8_t* codes, const uint8_t* codes_t) {
  return rows % kTile == 0 && rows / kTile <= 65535 && cols % 4 == 0 && tiles(cols) <= INT32_MAX && aligned(x, 16) &&
         (codes == nullptr || aligned(codes, 4)) && (codes_t == nullptr || aligned(codes_t, 4));
}

// quantize_1x128_transposed_kernel (kTC columns per block); bounds null: ungrouped.
void launch_transposed_cols(const char* fn, const float* x, int64_t rows, int64_t cols, const int64_t* bounds,
                            int64_t n_groups, uint8_t* codes_t, float* scales_t, cudaStream_t stream, bool lt) {
  const int64_t chunks = blocks_for(cols, kTC);
  require(tiles(rows) <= 65535 && chunks <= INT32_MAX,
          [&] { return std::string("fp8::cuda::") + fn + ": matrix too large"; });
  const dim3 grid(static_cast<unsigned>(chunks), static_cast<unsigned>(tiles(rows)));
  const bool vec_x = cols % 4 == 0 && aligned(x, 16);
  const bool vec = rows % 4 == 0 && aligned(codes_t, 4);  // grouped: every group's row count is a multiple of 128
  const bool full = vec_x && vec && rows % kTile == 0 && cols % kTC == 0;
  const auto kernel = bounds != nullptr ? (full ? quantize_1x128_transposed_kernel<true, true>
                                                : quantize_1x128_transposed_kernel<false, true>)
                                        : (full ? quantize_1x128_transposed_kernel<true, false>
                                                : quantize_1x128_transposed_kernel<false, false>);
  moerl::cuda::launch_after_previous(kernel, grid, kTransposeWarps * kWarp, 0, stream, x, rows, cols, tiles(rows),
                                     vec_x,
                                     vec, codes_t, scales_t, bounds, n_groups, lt);
}

void launch_transposed(TransposedKernel kernel, const char* fn, const float* x, int64_t rows, int64_t cols,
                       const int64_t* bounds, int64_t n_groups, uint8_t* codes_t, float* scales_t,
                       cudaStream_t stream, bool lt = false) {
  if (kernel == TransposedKernel::Tiles64 && tile_kernel_fits(x, rows, cols, nullptr, codes_t)) {
    TileOutputs o;
    o.rows = rows, o.cols = cols, o.codes_t = codes_t, o.scales_t = scales_t, o.bounds = bounds,
    o.n_groups = n_groups, o.cols_lt = lt;
    launch_quantize_tiles<false, true, PlainSource, 64>(PlainSource{x, cols}, o, stream);
  } else {
    launch_transposed_cols(fn, x, rows, cols, bounds, n_groups, codes_t, scales_t, stream, lt);
  }
}

}  // namespace

void quantize_1x128(const float* x, int64_t rows, int64_t cols, uint8_t* codes, float* scales, cudaStream_t stream,
                    ScaleLayout layout) {
  check_args("quantize_1x128", x, rows, cols, codes, scales);
  if (rows == 0 || cols == 0) return;
  const int64_t ntiles = tiles(cols);
  const int64_t blocks = blocks_for(rows * ntiles, kRowWarps * kTilesPerWarp);
  require(blocks <= INT32_MAX, "fp8::cuda::quantize_1x128: matrix too large for one launch");
  const bool vec = cols % 4 == 0 && aligned(x, 16) && aligned(codes, 4);
  const bool full = vec && cols % kTile == 0, lt = layout == ScaleLayout::Cublaslt;
  const auto kernel = full ? (lt ? quantize_1x128_kernel<true, true> : quantize_1x128_kernel<true, false>)
                           : (lt ? quantize_1x128_kernel<false, true> : quantize_1x128_kernel<false, false>);
  moerl::cuda::launch_after_previous(kernel, static_cast<unsigned>(blocks), kRowWarps * kWarp, 0, stream, x, rows, cols,
                                     ntiles, vec, codes, scales);
}

void quantize_128x128(const float* w, int64_t rows, int64_t cols, uint8_t* codes, float* scales, cudaStream_t stream) {
  quantize_128x128_batched(w, 1, rows, cols, codes, scales, stream);
}

void quantize_128x128_batched(const float* w, int64_t batch, int64_t rows, int64_t cols, uint8_t* codes,
                              float* scales, cudaStream_t stream) {
  quantize_128x128_with_transpose(w, batch, rows, cols, codes, scales, nullptr, stream);
}

void quantize_128x128_with_transpose(const float* w, int64_t batch, int64_t rows, int64_t cols, uint8_t* codes,
                                     float* scales, uint8_t* codes_t, cudaStream_t stream) {
  quantize_128x128_placed(w, batch, rows, cols, codes, scales, codes_t, Fp8Placement{}, stream);
}

void quantize_128x128_placed(const float* w, int64_t batch, int64_t rows, int64_t cols, uint8_t* codes,
                             float* scales, uint8_t* codes_t, const Fp8Placement& at, cudaStream_t stream) {
  check_args("quantize_128x128", w, rows, cols, codes, scales);
  const int64_t stride = at.stride != 0 ? at.stride : rows * cols, t_ld = at.t_ld != 0 ? at.t_ld : rows;
  const int64_t t_stride = at.t_stride != 0 ? at.t_stride : rows * cols;
  require(stride >= rows * cols && (codes_t == nullptr || (t_ld >= rows && t_ld % 16 == 0 && t_stride >= cols * t_ld)),
          [&] {
            return "fp8::cuda::quantize_128x128_placed: strides smaller than a matrix, or t_ld not a multiple of 16 "
                   "(stride " +
                   std::to_string(stride) + ", t_ld " + std::to_string(t_ld) + ", t_stride " +
                   std::to_string(t_stride) + " for " + std::to_string(rows) + " x " + std::to_string(cols) + ")";
          });
  require(batch >= 0 && batch <= 65535, [&] {
    return "fp8::cuda::quantize_128x128_batched: batch must be 0 .. 65535, got " + std::to_string(batch);
  });
  if (rows == 0 || cols == 0 || batch == 0) return;
  require(tiles(rows) <= 65535 && tiles(cols) <= INT32_MAX, "fp8::cuda::quantize_128x128: matrix too large");
  require(codes_t == nullptr || (rows % 16 == 0 && aligned(codes_t, 16)), [&] {
    return "fp8::cuda::quantize_128x128_with_transpose: codes_t needs rows a multiple of 16 and 16-byte alignment, got "
           "rows " +
           std::to_string(rows);
  });
  const dim3 grid(static_cast<unsigned>(tiles(cols)), static_cast<unsigned>(tiles(rows)), static_cast<unsigned>(batch));
  const bool vec = cols % 4 == 0 && aligned(w, 16) && aligned(codes, 4);
  const bool full = vec && rows % kTile == 0 && cols % kTile == 0;
  const auto kernel = codes_t != nullptr ? (full ? quantize_128x128_kernel<true, true> : quantize_128x128_kernel<false, true>)
                                         : (full ? quantize_128x128_kernel<true, false> : quantize_128x128_kernel<false, false>);
  moerl::cuda::launch_after_previous(kernel, grid, kBlockThreads, 0, stream, w, rows, cols, vec, codes, scales, codes_t,
                                     stride, t_ld, t_stride);
}

void quantize_1x128_transposed(const float* x, int64_t rows, int64_t cols, uint8_t* codes_t, float* scales_t,
                               cudaStream_t stream, ScaleLayout layout) {
  check_args("quantize_1x128_transposed", x, rows, cols, codes_t, scales_t);
  if (rows == 0 || cols == 0) return;
  launch_transposed(TransposedKernel::Tiles64, "quantize_1x128_transposed", x, rows, cols, nullptr, 0, codes_t, scales_t,
                    stream, layout == ScaleLayout::Cublaslt);
}

void quantize_1x128_transposed_grouped(const float* x, int64_t rows, int64_t cols, const int64_t* bounds,
                                       int64_t n_groups, uint8_t* codes_t, float* scales_t, cudaStream_t stream,
                                       ScaleLayout layout) {
  quantize_1x128_transposed_grouped_with(TransposedKernel::Tiles64, x, rows, cols, bounds, n_groups, codes_t, scales_t,
                                         stream, layout);
}

void quantize_1x128_transposed_grouped_with(TransposedKernel kernel, const float* x, int64_t rows, int64_t cols,
                                            const int64_t* bounds, int64_t n_groups, uint8_t* codes_t,
                                            float* scales_t, cudaStream_t stream, ScaleLayout layout) {
  check_args("quantize_1x128_transposed_grouped", x, rows, cols, codes_t, scales_t);
  require(rows % kTile == 0 && n_groups > 0, [&] {
    return "fp8::cuda::quantize_1x128_transposed_grouped: rows must be a multiple of 128 and n_groups > 0, got rows " +
           std::to_string(rows) + ", n_groups " + std::to_string(n_groups);
  });
  if (rows == 0 || cols == 0) return;
  require(bounds != nullptr, "fp8::cuda::quantize_1x128_transposed_grouped: null bounds");
  launch_transposed(kernel, "quantize_1x128_transposed_grouped", x, rows, cols, bounds, n_groups, codes_t, scales_t,
                    stream, layout == ScaleLayout::Cublaslt);
}

void quantize_1x128_transposed_with(TransposedKernel kernel, const float* x, int64_t rows, int64_t cols,
                                    uint8_t* codes_t, float* scales_t, cudaStream_t stream) {
  check_args("quantize_1x128_transposed_with", x, rows, cols, codes_t, scales_t);
  if (rows == 0 || cols == 0) return;
  launch_transposed(kernel, "quantize_1x128_transposed_with", x, rows, cols, nullptr, 0, codes_t, scales_t, stream);
}

const char* transposed_kernel_name(TransposedKernel k) {
  switch (k) {
    case TransposedKernel::Cols32: return "cols32";
    case TransposedKernel::Tiles64: return "tiles64";
  }
  return "?";
}

void quantize_1x128_dual(const float* x, int64_t rows, int64_t cols, const int64_t* bounds, int64_t n_groups,
                         uint8_t* codes, float* scales, uint8_t* codes_t, float* scales_t, cudaStream_t stream,
                         ScaleLayout layout) {
  check_args("quantize_1x128_dual", x, rows, cols, codes, scales);
  check_args("quantize_1x128_dual", x, rows, cols, codes_t, scales_t);
  if (rows == 0 || cols == 0) return;
  require(bounds == nullptr || n_groups > 0, "fp8::cuda::quantize_1x128_dual: bounds need n_groups > 0");
  const bool lt = layout == ScaleLayout::Cublaslt;
  if (!tile_kernel_fits(x, rows, cols, codes, codes_t)) {
    require(!lt || bounds == nullptr, [&] {
      return "fp8::cuda::quantize_1x128_dual: grouped rows in cuBLASLt's scale layout need rows a multiple of 128, "
             "cols of 4, x 16-byte and the codes 4-byte aligned, got " +
             std::to_string(rows) + " x " + std::to_string(cols);
    });
    quantize_1x128(x, rows, cols, codes, scales, stream, layout);
    if (bounds != nullptr)
      quantize_1x128_transposed_grouped(x, rows, cols, bounds, n_groups, codes_t, scales_t, stream);
    else
      quantize_1x128_transposed(x, rows, cols, codes_t, scales_t, stream, layout);
    return;
  }
  TileOutputs o;
  o.rows = rows, o.cols = cols, o.codes = codes, o.scales = scales, o.codes_t = codes_t, o.scales_t = scales_t;
  o.bounds = bounds, o.n_groups = n_groups, o.rows_lt = o.cols_lt = lt;
  launch_quantize_tiles<true, true>(PlainSource{x, cols}, o, stream);
}

}  // namespace moerl::fp8::cuda
