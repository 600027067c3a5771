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
#include "kernels/cuda/fp8_quantize_common.cuh"
#include "kernels/cuda/fp8_quantize_tile.cuh"
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
constexpr int kBlockWarps = 16;             // 128x128: warps per block
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

// 4 consecutive elements from column c of a row with `cols` elements; zero beyond the row's end.
__device__ __forceinline__ void load4(const float* row, int64_t c, int64_t cols, bool vec, float (&v)[4]) {
  if (vec && c + 3 < cols) {
    const float4 f = __ldcs(reinterpret_cast<const float4*>(row + c));
    v[0] = f.x, v[1] = f.y, v[2] = f.z, v[3] = f.w;
  } else {
    for (int i = 0; i < 4; ++i) v[i] = c + i < cols ? row[c + i] : 0.0f;
  }
}

// The 4 codes of elements c .. c + 3 of a row (only those < cols are written).
__device__ __forceinline__ void store4(uint8_t* row, int64_t c, int64_t cols, bool vec, uint32_t codes) {
  if (vec && c + 3 < cols) {
    __stcs(reinterpret_cast<unsigned int*>(row + c), codes);
  } else {
    for (int i = 0; i < 4; ++i)
      if (c + i < cols) row[c + i] = static_cast<uint8_t>(codes >> (8 * i));
  }
}

// One warp per kTilesPerWarp consecutive 1x128 tiles, 4 elements per lane. Tiles numbered row-major:
// tile = r * ntiles + t, which is also the index of its scale. `vec`: x rows 16-byte aligned and codes rows
// 4-byte aligned. kFull: cols % 128 == 0 and `vec`, so tile t starts at element 128 t and no bounds are
// checked (the 64-bit divisions and branches of the general path cost a third of the bandwidth). kLt: the scales
// in cuBLASLt's layout [ntiles, rows] (ScaleLayout::Cublaslt).
template <bool kFull, bool kLt>
__global__ void __launch_bounds__(kRowWarps * kWarp)
    quantize_1x128_kernel(const float* __restrict__ x, int64_t rows, int64_t cols, int64_t ntiles, bool vec,
                          uint8_t* __restrict__ codes, float* __restrict__ scales) {
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

// The four codes words of rows 4k .. 4k + 3 (word i: row i's codes of columns 4l .. 4l + 3, byte j = column j)
// transposed: word j holds column j's codes of those rows (byte i = row i).
struct Transposed4x4 {
  uint32_t w[4];
};
__device__ __forceinline__ Transposed4x4 transpose4x4(uint32_t r0, uint32_t r1, uint32_t r2, uint32_t r3) {
  const uint32_t a = __byte_perm(r0, r1, 0x5140), b = __byte_perm(r2, r3, 0x5140);  // bytes 0, 1 interleaved
  const uint32_t c = __byte_perm(r0, r1, 0x7362), d = __byte_perm(r2, r3, 0x7362);  // bytes 2, 3 interleaved
  return {{__byte_perm(a, b, 0x5410), __byte_perm(a, b, 0x7632), __byte_perm(c, d, 0x5410), __byte_perm(c, d, 0x7632)}};
}

// One block per 128x128 block: lane l covers columns 4l .. 4l + 3, warp w rows 8w .. 8w + 7. The block's values
// stay in registers between the amax and the encoding. kFull: rows and cols multiples of 128 and `vec`: no bounds
// checks. kTransposed: the codes also go to codes_t [cols, rows], the block's byte transpose (wᵀ's 128x128 blocks
// are w's mirrored: the same amax, scale and codes), staged in shared memory so that every warp writes whole
// 128-byte rows of codes_t with 16-byte stores; needs rows % 16 == 0 and codes_t 16-byte aligned (checked on the
// host). One pass instead of a quantization and a byte transpose of the codes (a weight is re-quantized after every
// optimizer step).
template <bool kFull, bool kTransposed>
__global__ void __launch_bounds__(kBlockWarps * kWarp)
    quantize_128x128_kernel(const float* __restrict__ w, int64_t rows, int64_t cols, bool vec,
                            uint8_t* __restrict__ codes, float* __restrict__ scales, uint8_t* __restrict__ codes_t,
                            int64_t codes_stride, int64_t t_ld, int64_t t_stride) {
  constexpr int kWarps = kBlockWarps;
  constexpr int kRowsPerWarp = kTile / kWarps;
  static_assert(kRowsPerWarp == 8, "two groups of 4 rows per warp for the 4x4 byte transposes");
  // codes_t staging: row c (a column of the block) holds its 128 codes as 32 words (+1: the column-major writes
  // below and the row-major reads hit 32 different banks).
  constexpr int kStride = kTile / 4 + 1;
  __shared__ uint32_t staged[kTransposed ? kTile * kStride : 1];
  __shared__ int warp_amax[kWarps];
  // blockIdx.z: the matrix of a batch (quantize_128x128_batched), 0 otherwise.
  w += static_cast<int64_t>(blockIdx.z) * rows * cols;
  codes += static_cast<int64_t>(blockIdx.z) * codes_stride;
  if (kTransposed) codes_t += static_cast<int64_t>(blockIdx.z) * t_stride;
  scales += static_cast<int64_t>(blockIdx.z) * gridDim.x * gridDim.y;
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
  const int64_t r0 = static_cast<int64_t>(blockIdx.y) * kTile, c0 = static_cast<int64_t>(blockIdx.x) * kTile;
  const int64_t c = c0 + lane * 4;
  float v[kRowsPerWarp][4];
  int amax = 0;
#pragma unroll
  for (int i = 0; i < kRowsPerWarp; ++i) {
    const int64_t r = r0 + warp * kRowsPerWarp + i;
    if (kFull) {
      const float4 f = __ldcs(reinterpret_cast<const float4*>(w + r * cols + c));
      v[i][0] = f.x, v[i][1] = f.y, v[i][2] = f.z, v[i][3] = f.w;
    } else if (r < rows) {
      load4(w + r * cols, c, cols, vec, v[i]);
    } else {
      v[i][0] = v[i][1] = v[i][2] = v[i][3] = 0.0f;
    }
    amax = max(amax, max(max(abs_bits(v[i][0]), abs_bits(v[i][1])), max(abs_bits(v[i][2]), abs_bits(v[i][3]))));
  }
  amax = warp_max(amax);
  if (lane == 0) warp_amax[warp] = amax;
  __syncthreads();
  amax = warp_amax[0];
#pragma unroll
  for (int i = 1; i < kWarps; ++i) amax = max(amax, warp_amax[i]);
  const float scale = scale_from_amax_bits(amax);
  const Divisor d = divisor(scale);
  if (threadIdx.x == 0) scales[blockIdx.y * gridDim.x + blockIdx.x] = scale;
  uint32_t q[kRowsPerWarp];
#pragma unroll
  for (int i = 0; i < kRowsPerWarp; ++i) {
    q[i] = encode4(v[i], d);
    const int64_t r = r0 + warp * kRowsPerWarp + i;
    if (kFull)
      __stcs(reinterpret_cast<unsigned int*>(codes + r * cols + c), q[i]);
    else if (r < rows)
      store4(codes + r * cols, c, cols, vec, q[i]);
  }
  if constexpr (kTransposed) {
    // Column 4 lane + j of rows 8 warp + 4 g .. + 3 is word (4 lane + j) · kStride + 2 warp + g. Lane groups of 8
    // take the columns j in a rotated order, so one store instruction covers all 32 banks.
#pragma unroll
    for (int g = 0; g < 2; ++g) {
      const Transposed4x4 t = transpose4x4(q[4 * g], q[4 * g + 1], q[4 * g + 2], q[4 * g + 3]);
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const int jj = (j + lane / 8) % 4;
        const uint32_t word = jj == 0 ? t.w[0] : jj == 1 ? t.w[1] : jj == 2 ? t.w[2] : t.w[3];
        staged[(4 * lane + jj) * kStride + 2 * warp + g] = word;
      }
    }
    __syncthreads();
    // 128 columns x 8 chunks of 16 rows; thread t writes chunks t and t + 512 (chunk k: column k / 8, rows
    // 16 (k % 8) ..): a warp writes 4 whole 128-byte rows of codes_t.
    static_assert(kTile * 8 == 2 * kWarps * kWarp, "two chunks per thread");
#pragma unroll
    for (int it = 0; it < 2; ++it) {
      const int k = it * kWarps * kWarp + threadIdx.x;
      const int col = k / 8, part = k % 8;
      const int64_t out_col = c0 + col, out_row = r0 + 16 * part;
      if (!kFull && (out_col >= cols || out_row >= rows)) continue;  // rows % 16 == 0: a chunk is whole or absent
      const uint32_t* src = staged + col * kStride + 4 * part;
      __stcs(reinterpret_cast<uint4*>(codes_t + out_col * t_ld + out_row), make_uint4(src[0], src[1], src[2], src[3]));
    }
  }
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
  kernel<<<grid, kTransposeWarps * kWarp, 0, stream>>>(x, rows, cols, tiles(rows), vec_x, vec, codes_t, scales_t,
                                                        bounds, n_groups, lt);
  CUDA_CHECK_LAUNCH();
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
  kernel<<<static_cast<unsigned>(blocks), kRowWarps * kWarp, 0, stream>>>(x, rows, cols, ntiles, vec, codes, scales);
  CUDA_CHECK_LAUNCH();
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
  kernel<<<grid, kBlockWarps * kWarp, 0, stream>>>(w, rows, cols, vec, codes, scales, codes_t, stride, t_ld, t_stride);
  CUDA_CHECK_LAUNCH();
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
