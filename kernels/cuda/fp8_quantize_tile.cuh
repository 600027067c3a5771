// Blocks of 128 rows x kTC columns of an activation (kTC = 128, or 64 for the columns alone), one per thread
// block, read once and quantized in 1x128 tiles along its rows (quantize_1x128's codes and scales; kTC = 128 only),
// along its columns (quantize_1x128_transposed's, optionally grouped), or both. The activation comes from a source
// functor, so a producer (SwiGLU, its backward) can hand its output straight to the quantization without a pass
// over memory (kernels/cuda/swiglu_fp8.cu).
//
// Layout of a block (rt, ct): rows r0 = 128 rt .., columns c0 = kTC ct ..; 4 kTC threads (16 or 8 warps), each
// with 8 16-byte loads. A warp's load k covers 4 rows x 32 columns (4 full 128-byte lines): rows
// 4 m + lane / 8 with m = warp · (8 / H) + k / H, columns 32 (k % H) + 4 (lane % 8), H = kTC / 32. For kTC = 128
// the 8 lanes sharing a row hold all its 128 columns: the row's amax is 3 shuffles and its codes are written from
// registers. For the columns the block is stored transposed in shared memory, [kTC columns][128 rows] floats,
// with the 16-byte chunks of column c XOR-swizzled by (c / 4) % 8 (element (c, r) at
// 128 c + 4 ((r / 4) ^ ((c / 4) % 8)) + r % 4): the scalar stores of a load are conflict-free (lane % 8 picks
// the swizzle, lane / 8 the bank within the chunk). Then thread (warp w, lane = 8 k4 + p) takes column
// 32 (w / 4) + 4 p + w % 4 (swizzle p) and its rows 16 k4 .. + 15 and 64 + 16 k4 .. + 15 as 8 16-byte reads
// (each quarter warp reads 8 distinct bank groups), the column's amax over 128 rows is 2 shuffles (lanes p,
// p + 8, p + 16, p + 24), and each thread writes its 2 x 16 codes as two 16-byte stores, so a warp's store covers
// 64 contiguous bytes of each of its 8 columns (4-byte stores where the codes are not 16-byte aligned).
//
// Needs rows % 128 == 0 (the routed experts' aligned rows), cols % 4 == 0 and 16-byte aligned sources, 4-byte
// aligned codes (callers check; a partial last column tile is zero-padded as on the CPU). Bit-exact with the CPU
// by the helpers of fp8_quantize_common.cuh.
#pragma once
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

#include "kernels/cuda/cuda_check.hpp"
#include "kernels/cuda/fp8_quantize_common.cuh"
#include "kernels/cuda/kernel_attributes.hpp"
#include "kernels/cuda/pdl.cuh"
#include "kernels/fp8_quantize.hpp"
#include "runtime/error.hpp"

namespace moerl::fp8::cuda::quant_detail {

// The block shape for kTC columns (see the layout above).
template <int kTC>
struct TileShape {
  static_assert(kTC == 64 || kTC == 128, "64 or 128 columns per block");
  static constexpr int kThreads = 4 * kTC;                          // 256 or 512
  static constexpr int kChunks = kTC / 32;                          // 32-column chunks per row (H)
  static constexpr int kLoads = 8;                                  // 16-byte loads per thread
  static constexpr int kSmemBytes = static_cast<int>(sizeof(float)) * kTC * kTile;  // 32 or 64 KiB
  static_assert(kThreads * kLoads * 4 == kTile * kTC, "the loads cover the block");
  // Row (in the block) and first column of load k of a thread of warp `warp`, lane 8 sub + quad.
  __device__ static int row(int k, int warp, int sub) { return 4 * (warp * (kLoads / kChunks) + k / kChunks) + sub; }
  __device__ static int col(int k, int quad) { return 32 * (k % kChunks) + 4 * quad; }
};
constexpr int kTileLoads = 8;

struct TileOutputs {
  int64_t rows = 0, cols = 0;                     // the activation [rows, cols]
  uint8_t* codes = nullptr;                       // rows: [rows, cols], row r at codes + r · codes_ld
  float* scales = nullptr;                        //       [rows, tiles(cols)], row r at scales + r · scales_ld
  int64_t codes_ld = 0, scales_ld = 0;            //       row strides; 0: cols and tiles(cols) (packed)
  uint8_t* codes_t = nullptr;                     // columns: [cols, rows], or per group [cols, n_g] at bounds[g]·cols
  float* scales_t = nullptr;                      //          [cols, rows / 128]
  const int64_t* bounds = nullptr;                // [n_groups + 1] on the device, or null: one group
  int64_t n_groups = 0;
  // The scales in the layout cuBLASLt's VEC128 GEMM reads (fp8::cuda::scales_to_cublaslt, moe_grouped_vec128_scales)
  // instead of the CPU's above, which saves the GEMM's caller a conversion launch per operand:
  //   rows_lt: each group's rows (n_g from bounds[g]) as [row_scales_ld, n_g] at bounds[g] · row_scales_ld, tile kb
  //            of row r at (scales_col0 + kb) · n_g + r - bounds[g];
  //   cols_lt: [rows / 128, cols], tile rt of column c at rt · cols + c.
  bool rows_lt = false, cols_lt = false;
  int64_t scales_col0 = 0;  // the rows' first scale column: a view's place in a wider operand's tiles (both layouts)
  // Rows: the codes of columns cols .. tiles(cols) · 128 (the last tile's padding, zero inputs) written too, as
  // zeros, into a view whose row stride leaves room (the pipelined kernel only; the MoE's [dg | du] halves padded to
  // 128 columns each, where a memset did it before).
  bool zero_pad = false;
  // Optional (quantize_tile_kernel only): the row tiles in the order the blocks take them, [rows / 128] on the
  // device, a permutation (block row q quantizes row tile row_tile_order[q]); null: in order. Only where a tile is
  // found matters, never what is written: the gathered sources order the routed experts' tiles by the tokens they
  // read, so that the top-k reads of a token meet in L2 (cuda::moe_row_tile_order).
  const int32_t* row_tile_order = nullptr;
  // The columns as features t_col0 .. t_col0 + cols - 1 of a wider activation of t_cols (0: cols) columns: codes_t
  // per group [t_cols, n_g] at bounds[g] · t_cols, this output's rows from t_col0; scales_t [t_cols, rows / 128]
  // (CPU) or [rows / 128, t_cols] (cols_lt). E.g. dg and du's Wgrad operands as one [dgᵀ; duᵀ] per expert.
  int64_t t_cols = 0, t_col0 = 0;
  __host__ __device__ int64_t col_features() const { return t_cols != 0 ? t_cols : cols; }
  // The row strides, the packed ones where unset (a [rows, cols] view into a wider matrix sets them, e.g. the
  // gate half of SwiGLU's [rows, 2 · cols] gradient codes).
  __host__ __device__ int64_t row_codes_ld() const { return codes_ld != 0 ? codes_ld : cols; }
  __host__ __device__ int64_t row_scales_ld() const { return scales_ld != 0 ? scales_ld : (cols + kTile - 1) / kTile; }
};

// The group holding the 128-row tile at r0: its first row and its row count (the whole when there are no bounds).
// Every lane of the warp must call it (warp_group_index); callers look it up once per tile.
struct TileGroup {
  int64_t first, n;
};
__device__ __forceinline__ TileGroup group_of(const TileOutputs& o, int64_t r0) {
  if (o.bounds == nullptr) return {0, o.rows};
  const int64_t g = warp_group_index(o.bounds, o.n_groups, r0), first = o.bounds[g];
  return {first, o.bounds[g + 1] - first};
}

// Where the transposed codes of the 128-row tile at r0 (in group g) go: its rows start at column `first` of a
// [cols, out_rows] matrix at out (o.codes_t; with bounds, the packed matrix of the group holding the tile).
__device__ __forceinline__ void transposed_destination(const TileOutputs& o, int64_t r0, const TileGroup& g,
                                                       uint8_t*& out, int64_t& out_rows, int64_t& first) {
  out = o.codes_t + g.first * o.col_features() + o.t_col0 * g.n;
  out_rows = g.n;
  first = r0 - g.first;
}

// The kernels take the layouts as a template argument (bit 0: rows_lt, bit 1: cols_lt; launch_quantize_tiles picks
// it from the flags): with them as run-time flags the both-ways kernel lost 5% at 8192 x 8192 in the CPU layout
// (2.94 against 3.10 TB/s on the H200, bench/results/2026-11-30-gpu-scale-layout-h200-31cb8bb.txt).
constexpr int kRowsLt = 1, kColsLt = 2;

// Where the scale of row r's tile kb goes; g: the group of r (group_of; the cuBLASLt layout only).
template <bool kLt>
__device__ __forceinline__ float* row_scale(const TileOutputs& o, int64_t r, int64_t kb, const TileGroup& g) {
  const int64_t ld = o.row_scales_ld(), k = o.scales_col0 + kb;
  return kLt ? o.scales + g.first * ld + k * g.n + (r - g.first) : o.scales + r * ld + k;
}

// Where the scale of column c's tile rt (rows 128 rt ..) goes.
template <bool kLt>
__device__ __forceinline__ float* col_scale(const TileOutputs& o, int64_t c, int64_t rt) {
  return kLt ? o.scales_t + rt * o.col_features() + o.t_col0 + c : o.scales_t + (o.t_col0 + c) * (o.rows / kTile) + rt;
}

// The block (rt, blockIdx.x)'s values, v[k] = x[r, c .. c + 3] at the load layout above (zeros past cols),
// quantized into o; g: the group of row tile rt (group_of). Uses the block's shared memory when kCols. kFull: the
// block's columns all lie before o.cols and codes_t is 16-byte aligned (no bound or alignment checks).
template <bool kRows, bool kCols, int kTC, int kLt, bool kFull = false>
__device__ __forceinline__ void quantize_tile_values(float (&v)[kTileLoads][4], const TileOutputs& o,
                                                     float4* tile_smem, int64_t rt, const TileGroup& g) {
  using Shape = TileShape<kTC>;
  static_assert(!kRows || kTC == kTile, "row tiles need all 128 columns in the block");
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp, sub = lane >> 3, quad = lane & 7;
  const int64_t ct = blockIdx.x, r0 = rt * kTile, c0 = ct * kTC;
  if constexpr (kRows) {
    const int64_t codes_ld = o.row_codes_ld();
    // Both halves' scale addresses, computed together before the branches that use them (in the branches each cost
    // the warp ~27 instructions: SASS of the both-ways kernel, 2026-12-01).
    float* const scale_at[2] = {row_scale<(kLt & kRowsLt) != 0>(o, r0 + Shape::row(0, warp, sub), ct, g),
                                row_scale<(kLt & kRowsLt) != 0>(o, r0 + Shape::row(4, warp, sub), ct, g)};
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      float m = 0.0f;
#pragma unroll
      for (int k = 4 * h; k < 4 * h + 4; ++k) m = abs_max4(m, v[k]);
      int amax = abs_bits(m);
      for (int offset = 1; offset < 8; offset *= 2) amax = max(amax, __shfl_xor_sync(0xFFFFFFFFu, amax, offset));
      const float scale = scale_from_amax_bits(amax);
      const Divisor d = divisor(scale);
      const int64_t r = r0 + Shape::row(4 * h, warp, sub);
      if (quad == 0) *scale_at[h] = scale;
      uint32_t q[4];
      encode4_n<4>(v + 4 * h, d, q);
      // Load k = 4 h + j holds columns 32 j + 4 quad ..: one row address for the 4 words, and the bounds (a
      // partial last tile only) as 32-bit compares (each word's address and 64-bit bound in turn were 12
      // instructions a word; dual 3.13-3.14 vs 3.11-3.12 TB/s, MoE layer 11.08-11.21 vs 11.13-11.33 ms, rounds
      // interleaved, bench/results/2026-11-30-gpu-tile-row-stores-h200-5d8aac5+stores.txt).
      static_assert(Shape::kChunks == 4, "a row's 4 loads hold its 128 columns");
      unsigned int* const row_codes = reinterpret_cast<unsigned int*>(o.codes + r * codes_ld + c0 + 4 * quad);
      const int left = kFull ? kTile : static_cast<int>(min(o.cols - c0 - 4 * quad, int64_t{kTile}));  // from the first
#pragma unroll
      for (int j = 0; j < 4; ++j)
        if (32 * j < left) __stcs(row_codes + 8 * j, q[j]);
    }
  }
  if constexpr (kCols) {
    float* tile = reinterpret_cast<float*>(tile_smem);
    // Element e of load k, (column cc + e, row rr) with cc = col(k, quad), rr = row(k, warp, sub), goes to
    // 128 (cc + e) + 4 ((rr / 4) ^ quad) + rr % 4 (the layout above: ((cc + e) / 4) % 8 = quad), one address a row
    // group rr / 4 plus constants, so the 32 stores take immediate offsets. (With the swizzle computed per element
    // ptxas computed each address: ~250 of a thread's 1057 instructions, SASS of the both-ways kernel, 2026-12-01.)
#pragma unroll
    for (int k = 0; k < kTileLoads; ++k) {
      const int rr = Shape::row(k, warp, sub);
      float* const dst = tile + kTile * Shape::col(k, quad) + 4 * ((rr >> 2) ^ quad) + (rr & 3);
#pragma unroll
      for (int e = 0; e < 4; ++e) dst[kTile * e] = v[k][e];
    }
    __syncthreads();
    // This thread's column jj (swizzle p) and rows 16 k4 + 4 i .. + 3 (i < 4), 64 + 16 k4 + 4 (i - 4) .. (i >= 4).
    const int p = lane & 7, k4 = lane >> 3;
    const int jj = 32 * (warp / 4) + 4 * p + warp % 4;
    const float4* column = reinterpret_cast<const float4*>(tile + jj * kTile);
    float q[8][4];
    float m = 0.0f;
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      const int chunk = 4 * k4 + (i < 4 ? i : 16 + i - 4);
      const float4 f = column[chunk ^ p];
      q[i][0] = f.x, q[i][1] = f.y, q[i][2] = f.z, q[i][3] = f.w;
      m = abs_max4(m, q[i]);
    }
    int amax = abs_bits(m);
    amax = max(amax, __shfl_xor_sync(0xFFFFFFFFu, amax, 8));
    amax = max(amax, __shfl_xor_sync(0xFFFFFFFFu, amax, 16));
    const float scale = scale_from_amax_bits(amax);
    const Divisor d = divisor(scale);
    const int64_t c = c0 + jj;
    if (kFull || c < o.cols) {
      if (k4 == 0) *col_scale<(kLt & kColsLt) != 0>(o, c, rt) = scale;
      uint8_t* out;
      int64_t out_rows, first;
      transposed_destination(o, r0, g, out, out_rows, first);
      uint32_t w[8];
      encode4_n<8>(q, d, w);
      uint8_t* dst = out + c * out_rows + first + 16 * k4;
      if (kFull || reinterpret_cast<uintptr_t>(dst) % 16 == 0) {
        __stcs(reinterpret_cast<uint4*>(dst), make_uint4(w[0], w[1], w[2], w[3]));
        __stcs(reinterpret_cast<uint4*>(dst + 64), make_uint4(w[4], w[5], w[6], w[7]));
      } else {  // codes 4-byte aligned only
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          __stcs(reinterpret_cast<unsigned int*>(dst) + i, w[i]);
          __stcs(reinterpret_cast<unsigned int*>(dst + 64) + i, w[4 + i]);
        }
      }
    }
  }
}

// A source of the tile kernel, in two steps: load(r, c) issues the loads behind x[r, c .. c + 3] (c + 3 < cols;
// past cols the kernel asks for column 0 of the row instead and drops the result) and returns what they bring
// (Src::Raw); value(raw, r, c, in) makes the four values from it, zeros where !in (the CPU's zero padding of a
// partial tile; a source with side effects, the SwiGLU forward's h, skips them there). Every load of the block is
// issued before any value is made: computed right after each load, a value that waits for its load (SwiGLU's
// arithmetic, the gathered sources' dependent loads, each in a branch) held the thread's next load back, so its 8
// loads went one at a time (ncu on the H200, 2026-11-30: the SwiGLU forward's top stall sites were its loads' first
// uses, 40% of the samples). Src::kLoadAhead false keeps a load and its value together (sources whose raw loads,
// 8 of 2 or 3 float4s, would not fit the registers beside the values: FP32 SwiGLU inputs).
// Registers (ptxas, sm_90a): 64 a thread (2 blocks of 512 or 4 of 256 per SM).
template <class Src, bool kRows, bool kCols, int kTC, int kLt, bool kFull>
__global__ void __launch_bounds__(TileShape<kTC>::kThreads, kTC == kTile ? 2 : 4)
    quantize_tile_kernel(Src src, TileOutputs o) {
  moerl::cuda::await_previous_grid();
  using Shape = TileShape<kTC>;
  extern __shared__ float4 tile_smem[];
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp, sub = lane >> 3, quad = lane & 7;
  const int64_t c0 = static_cast<int64_t>(blockIdx.x) * kTC;
  const int64_t rt = o.row_tile_order != nullptr ? o.row_tile_order[blockIdx.y] : blockIdx.y;
  // Load k's row and column: this thread's first ones plus constants (so that its loads may share addresses).
  const int64_t r_lane = rt * kTile + Shape::row(0, warp, sub), c_lane = c0 + Shape::col(0, quad);
  const auto row_of = [&](int k) { return r_lane + (Shape::row(k, 0, 0) - Shape::row(0, 0, 0)); };
  const auto col_of = [&](int k) { return c_lane + (Shape::col(k, 0) - Shape::col(0, 0)); };
  typename Src::Raw raw[Src::kLoadAhead ? kTileLoads : 1];
  if constexpr (Src::kLoadAhead) {
#pragma unroll
    for (int k = 0; k < kTileLoads; ++k) {
      const int64_t r = row_of(k), c = col_of(k);
      raw[k] = src.load(r, kFull || c < o.cols ? c : 0);
    }
  }
  float v[kTileLoads][4];
#pragma unroll
  for (int k = 0; k < kTileLoads; ++k) {
    const int64_t r = row_of(k), c = col_of(k);
    if constexpr (!Src::kLoadAhead) raw[0] = src.load(r, kFull || c < o.cols ? c : 0);
    const float4 f = src.value(raw[Src::kLoadAhead ? k : 0], r, c, kFull || c < o.cols);
    v[k][0] = f.x, v[k][1] = f.y, v[k][2] = f.z, v[k][3] = f.w;
  }
  // Looked up once the loads are in flight, by every lane (the rows' cuBLASLt scales and the columns' codes need it).
  const TileGroup g = (kCols || (kLt & kRowsLt) != 0) ? group_of(o, rt * kTile) : TileGroup{0, o.rows};
  quantize_tile_values<kRows, kCols, kTC, kLt, kFull>(v, o, tile_smem, rt, g);
}

// Launches quantize_tile_kernel for kRows, kCols over o: rows / 128 x ceil(cols / kTC) blocks (the caller has
// checked the layout's needs, above); both ways in 128 x 128 blocks. (Clusters of 2 or 4 thread blocks per 128 x
// 128 block exchanging their row amaxes through distributed shared memory, 4 or 8 blocks per SM, were measured
// slower on the H200: 2.50-2.63 TB/s against 2.64-2.80 at 8192 x 8192,
// bench/results/2026-11-29-gpu-dual-h200-af1791f.jsonl; removed. So was a block of 16 warps of 8 whole rows each,
// lanes 4 columns, exchanging only the column amaxes (shared atomicMax) and the transposed codes (a 16 KiB byte
// tile), three barriers: bit-exact, but 2.63 TB/s against this kernel's 3.10 in the same call at 8192 x 8192,
// bench/results/2026-11-29-gpu-sweep-dual-warps-h200-108492e+warps.txt. And persistent blocks, as many as fit at
// once, walking the tiles and asking L2 for their next tile's lines (prefetch.global.L2) once their own loads were
// in flight: dual 2.66 TB/s against 2.83 with a block a tile, transposed 3.43 against 3.84, 2.63 and 3.65 without
// the prefetch; bench/results/2026-11-30-gpu-sweep-quant-tiles-h200-82ea109.txt. Nor the blocks walked in panels of
// 2 .. 32 row tiles down each column, so that the blocks in flight write both outputs in longer runs: dual 2.97-2.98
// against 3.10 TB/s, transposed 3.68-3.80 against 3.86;
// bench/results/2026-11-30-gpu-quant-panels-h200-5542390+panel.txt.)
// kFull where every block's columns lie before o.cols and codes_t (if any) is 16-byte aligned: no bound checks, no
// selects of zeros past cols, no per-load column selects (which kept the compiler from addressing a thread's 8 loads
// from one base). Both ways at 8192 x 8192 on the H200: 1057 instructions a warp against 1110 (ncu), 3.204-3.211
// against 3.169-3.176 TB/s, rounds interleaved (bench/results/2026-12-01-gpu-quant-full-tiles-h200-*).
template <bool kRows, bool kCols, int kTC, int kLt, class Src>
void launch_quantize_tiles_as(const Src& src, const TileOutputs& o, cudaStream_t stream) {
  const int smem = kCols ? TileShape<kTC>::kSmemBytes : 0;
  const dim3 grid(static_cast<unsigned>((o.cols + kTC - 1) / kTC), static_cast<unsigned>(o.rows / kTile));
  const auto launch = [&](auto full) {
    constexpr bool kFull = decltype(full)::value;
    if (kCols) moerl::cuda_detail::allow_dynamic_smem<quantize_tile_kernel<Src, kRows, kCols, kTC, kLt, kFull>>(smem);
    moerl::cuda::launch_after_previous(quantize_tile_kernel<Src, kRows, kCols, kTC, kLt, kFull>, grid,
                                       TileShape<kTC>::kThreads, smem, stream, src, o);
  };
  if (o.cols % kTC == 0 && (!kCols || reinterpret_cast<uintptr_t>(o.codes_t) % 16 == 0))
    launch(std::true_type{});
  else
    launch(std::false_type{});
}

// launch_quantize_tiles_as for the instantiation of o's scale layouts.
template <bool kRows, bool kCols, class Src, int kTC = kTile>
void launch_quantize_tiles(const Src& src, const TileOutputs& o, cudaStream_t stream) {
  static_assert(kRows || kCols, "nothing to write");
  static_assert(!(kRows && kCols) || kTC == kTile, "both ways: 128 x 128 blocks");
  if (o.rows == 0 || o.cols == 0) return;
  const bool rows_lt = kRows && o.rows_lt, cols_lt = kCols && o.cols_lt;
  if constexpr (kRows && kCols)
    if (rows_lt && cols_lt) return launch_quantize_tiles_as<kRows, kCols, kTC, kRowsLt | kColsLt>(src, o, stream);
  if constexpr (kRows)
    if (rows_lt) return launch_quantize_tiles_as<kRows, kCols, kTC, kRowsLt>(src, o, stream);
  if constexpr (kCols)
    if (cols_lt) return launch_quantize_tiles_as<kRows, kCols, kTC, kColsLt>(src, o, stream);
  launch_quantize_tiles_as<kRows, kCols, kTC, 0>(src, o, stream);
}

__device__ __forceinline__ float4 zero4() { return make_float4(0.0f, 0.0f, 0.0f, 0.0f); }

// The plain source: x [rows, cols] in memory, read once (streaming).
struct PlainSource {
  const float* x;
  int64_t cols;
  static constexpr bool kLoadAhead = true;
  using Raw = float4;
  __device__ __forceinline__ Raw load(int64_t r, int64_t c) const {
    return __ldcs(reinterpret_cast<const float4*>(x + r * cols + c));
  }
  __device__ __forceinline__ float4 value(const Raw& v, int64_t, int64_t, bool in) const { return in ? v : zero4(); }
};

}  // namespace moerl::fp8::cuda::quant_detail
