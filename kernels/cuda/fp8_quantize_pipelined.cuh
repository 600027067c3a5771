// Quantization both ways (1x128 tiles along rows and along columns) of values computed elementwise from several
// activations, in one pipelined pass: SwiGLU's two gradients dg and du from dh, g and u (kernels/cuda/swiglu_fp8.cu).
// Gives the bytes of fp8_quantize_tile.cuh's 128 x 128 block kernel, which holds a block's values in registers (for
// two outputs, one block of 512 threads per SM) and so has no load in flight while a block reduces and writes.
//
// Here one persistent block of 512 threads per SM walks the 128 x 128 tiles (tile t = blockIdx.x + k · gridDim.x,
// row-major over [rows / 128, tiles(cols)]) as half tiles of 64 rows, through a ring of S stages of shared memory
// (each: the half tile of every input, 32 KiB an FP32 input, 16 KiB a BF16 one, and with BF16 inputs the outputs'
// 32 KiB each apart, PipeShape): cp.async copies the next S - 1 halves while one is quantized. S = 3 for 2 FP32
// inputs, 2 for 3 FP32 or 3 BF16 ones (at most 227 KiB). A stage holds each input row-major, an FP32 row 32 chunks
// of 16 bytes, chunk j of row r at j ^ ((r / 4) % 8), a BF16 row 16 chunks (8 values each) at k ^ 4 (r % 4);
// columns past `cols` are zero-filled by the copy (the CPU's padding of a partial tile).
//   Rows:    lane 8 s + p of warp w takes row 4 w + s of the half, chunks p + 8 i (i < 4: a quarter warp reads one
//            row's 8 distinct swizzled chunks, no bank conflict); it computes the outputs there, writes them back
//            over the first inputs' chunks (FP32 inputs; else into the outputs' regions), takes the row amax in 3
//            shuffles and writes 4 x 4 codes (4-byte stores: a warp covers 32 bytes of each of its 4 rows).
//   Columns: lane 16 g + q of warp w takes chunk 2 w + g (4 columns) and rows 4 q .. 4 q + 3 of each half (a
//            quarter warp reads 8 rows of distinct (r / 4) % 8: no bank conflict), keeping the first half's values
//            in registers; after the second half a column's amax is 4 shuffles within the half warp and each lane
//            writes 2 x 4 codes a column (a half warp: 64 contiguous bytes of the column a half).
// Two __syncthreads per half: after the first a stage's copies are visible and the stage read in the previous half
// is free to refill; the second orders the rows' write-back before the columns' reads.
//
// Measured on the H200 (bench/results/2026-11-29-gpu-run{1,2}-h200-2e7f77e+*): SwiGLU's dg and du at the MoE
// benchmark's shape (98304 x 1408) 0.98-1.01 ms against 1.31 with the block kernel. The scheme lost wherever the
// block kernel runs two blocks per SM (one input or two): quantize_1x128_dual at 8192 x 8192 2.33-2.42 TB/s (with
// whole tiles and 1024 threads 2.38-2.46) against 2.66-2.83, h from g and u 0.63 against 0.58 ms, the routed
// experts' gathered output gradient 0.90 against 0.80 ms; those stay on the block kernel. So did h from g and u in
// BF16 (2 inputs of 16 KiB a stage, 3 stages): 0.597 against the block kernel's 0.555-0.563 ms
// (bench/results/2026-11-29-gpu-router-swiglu-fwd-h200-78383af+tried.txt).
// SwiGLU's backward from BF16 on a whole-tile schedule instead (one block of 1024 threads per SM, the tile's three
// BF16 inputs in shared memory, dg and du computed once along rows and again along columns, nothing staged: 64
// registers, 32 warps an SM): bit-exact but slower, 1.335 against 1.051 ms (MoE layer 12.37 vs 12.07 ms;
// bench/results/2026-11-29-gpu-swiglu-bwd-tile-h200-14d74c1+tile.txt).
// Nor did this schedule with the outputs not staged (2026-11-30): BF16 inputs only in a stage (48 KiB: 4 stages),
// kept in 8-byte units swizzled for both passes, and dg, du computed again by the columns (one barrier a half
// instead of two): bit-exact, but the kernel 1.55 against 1.27 ms for the MoE layer's two calls, the layer
// 12.19 / 12.29 vs 12.00 / 12.15 ms, bench-600m fp8 241.9k / 242.9k vs 246.2k / 245.1k tokens/s (rounds
// interleaved, bench/results/2026-11-30-gpu-sweep-swiglu-recompute-h200-57f8adf.txt): the kernel is bound by its
// arithmetic, not by staging. Nor did twice the warps with this staging (1024 threads, 2 rows a warp, 64 registers):
// bit-exact, GPU busy 11.87 vs 11.69 ms per MoE layer pass, train step 253.2-254.3k vs 255.0-255.9k tokens/s
// (bench/results/2026-11-30-gpu-sweep-pipelined-1024-h200-a73d8f1.txt).
#pragma once
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

#include "kernels/cuda/cp_async.cuh"
#include "kernels/cuda/cuda_check.hpp"
#include "kernels/cuda/fp8_quantize_common.cuh"
#include "kernels/cuda/fp8_quantize_tile.cuh"
#include "kernels/cuda/kernel_attributes.hpp"
#include "kernels/cuda/pdl.cuh"

namespace moerl::fp8::cuda::quant_detail {

using moerl::cuda::cp_async16_zfill;
using moerl::cuda::cp_async_commit;
using moerl::cuda::cp_async_wait;

constexpr int kPipeThreads = 512;
constexpr int kHalfRows = kTile / 2;
constexpr int kHalfChunks = kHalfRows * kTile / 4;  // 16-byte chunks of one input's half tile: 2048
constexpr int kPipeSmemLimit = 227 * 1024;          // the most shared memory a block may opt in to (sm_90)

// A stage's layout for a source: input i's half tile at in_offset(i) (bytes; 32 KiB an FP32 input, 16 KiB a BF16
// one), output o's FP32 values at out_offset(o). With FP32 inputs output o is written back over input o (each
// thread over the chunks it read itself); with BF16 ones the outputs have regions of their own after the inputs (an
// output's chunk would cover other threads' inputs, and one more barrier a half measured slower).
template <class Src>
struct PipeShape {
  static constexpr bool kBf16(int i) { return (Src::kBf16Inputs >> i) & 1; }
  static constexpr int kRegion = kHalfRows * kTile * 4;  // an FP32 half tile: 32 KiB
  static constexpr int in_offset(int i) {
    int off = 0;
    for (int j = 0; j < i; ++j) off += kBf16(j) ? kRegion / 2 : kRegion;
    return off;
  }
  static constexpr bool kOutputsApart = Src::kBf16Inputs != 0;
  static constexpr int out_offset(int o) { return (kOutputsApart ? in_offset(Src::kInputs) : 0) + o * kRegion; }
  static constexpr int kStageBytes = kOutputsApart ? out_offset(Src::kOutputs) : in_offset(Src::kInputs);
  static constexpr int kStages = kPipeSmemLimit / kStageBytes < 6 ? kPipeSmemLimit / kStageBytes : 6;
  static constexpr int kSmemBytes = kStages * kStageBytes;
  static_assert(kStages >= 2, "at least double buffering");
  // Byte offset within input i's region of the 16-byte chunk holding columns 4 j .. 4 j + 3 of row r (j < 32): FP32,
  // chunk j of the row's 32, swizzled by (r / 4) % 8; BF16, the first or second half of chunk j / 2 of its 16,
  // swizzled by 4 (r % 4) (a quarter warp reads 64 contiguous bytes of one row, the four of a warp distinct
  // segments).
  static constexpr int fp32_chunk(int r, int j) { return 16 * (r * 32 + (j ^ ((r >> 2) & 7))); }
  static constexpr int bf16_chunk(int r, int k) { return 16 * (r * 16 + (k ^ ((r & 3) << 2))); }
};

// A source of the pipelined quantization:
//   kInputs (2-3), kOutputs (1-2, <= kInputs): activations read, values quantized (each into its TileOutputs);
//   kBf16Inputs: bit i set where input i is BF16 (bit patterns), else FP32;
//   row(r, i): the start of input i's row r (16-byte aligned); row_bytes(i): the bytes from one row to the next;
//   apply4(in, out): the outputs of 4 elements from their inputs (out[o][e] from in[n][e]).
template <int kOutputs>
struct PipeOutputs {
  TileOutputs o[kOutputs];  // one shape (rows, cols, bounds), each its own codes and scales
};

template <class Src, bool kLt>
__global__ void __launch_bounds__(kPipeThreads, 1)
    quantize_pipelined_kernel(Src src, PipeOutputs<Src::kOutputs> outs, int64_t col_tiles, int64_t n_tiles) {
  moerl::cuda::await_previous_grid();
  using Shape = PipeShape<Src>;
  constexpr int NI = Src::kInputs, NO = Src::kOutputs, S = Shape::kStages;
  constexpr int kStageChunks = Shape::kStageBytes / 16;
  static_assert(NO >= 1 && NO <= NI && NI >= 2 && NI <= 3, "a source's shape");
  extern __shared__ float4 pipe_smem[];
  const int tid = threadIdx.x, lane = tid % kWarp, warp = tid / kWarp;
  const int64_t cols = outs.o[0].cols;
  const int64_t my_tiles = (n_tiles - blockIdx.x + gridDim.x - 1) / gridDim.x;  // blockIdx.x < n_tiles
  const int64_t n_halves = 2 * my_tiles;

  // Copies of this block's half u (if any) into stage u % S, as one commit group. Chunk idx = tid + 512 m of a BF16
  // input is row idx / 16 = tid / 16 + 32 m, columns c0 + 8 (tid % 16) ..; of an FP32 one row tid / 32 + 16 m,
  // columns c0 + 4 (tid % 32) ..: a thread's columns and byte counts are the same for every m and input, its rows
  // one row address and a stride apart (each chunk's own 64-bit row address and bound were ~13 instructions).
  // Tile numbers fit 32 bits (rows / 128 <= 65535, tiles(cols) <= INT32_MAX: the callers' checks).
  auto issue = [&](int64_t u) {
    if (u < n_halves) {
      const auto t = static_cast<uint32_t>(blockIdx.x + (u >> 1) * gridDim.x), ct32 = static_cast<uint32_t>(col_tiles);
      const int64_t r0 = int64_t{t / ct32} * kTile + (u & 1) * kHalfRows, c0 = int64_t{t % ct32} * kTile;
      float4* stage = pipe_smem + (u % S) * kStageChunks;
      const int64_t c16 = c0 + 8 * (tid % 16), c32 = c0 + 4 * (tid % 32);
      const int bytes16 = c16 < cols ? 2 * static_cast<int>(min(cols - c16, int64_t{8})) : 0;
      const int bytes32 = c32 < cols ? 16 : 0;
#pragma unroll
      for (int i = 0; i < NI; ++i) {
        char* base = reinterpret_cast<char*>(stage) + Shape::in_offset(i);
        if (Shape::kBf16(i)) {  // 16 chunks of 8 columns a row: a warp copies two rows' 512 bytes
          const char* row = static_cast<const char*>(src.row(r0 + tid / 16, i)) + (bytes16 > 0 ? 2 * c16 : 0);
          const int64_t step = 32 * src.row_bytes(i);
#pragma unroll
          for (int m = 0; m < kHalfChunks / 2 / kPipeThreads; ++m)
            cp_async16_zfill(base + Shape::bf16_chunk(tid / 16 + 32 * m, tid % 16), row + m * step, bytes16);
        } else {  // 32 chunks of 4 columns a row: a warp copies one row's 512 bytes
          const char* row = static_cast<const char*>(src.row(r0 + tid / 32, i)) + (bytes32 > 0 ? 4 * c32 : 0);
          const int64_t step = 16 * src.row_bytes(i);
#pragma unroll
          for (int m = 0; m < kHalfChunks / kPipeThreads; ++m)
            cp_async16_zfill(base + Shape::fp32_chunk(tid / 32 + 16 * m, tid % 32), row + m * step, bytes32);
        }
      }
    }
    cp_async_commit();
  };

#pragma unroll
  for (int u = 0; u < S - 1; ++u) issue(u);
#pragma unroll 1
  for (int64_t k = 0; k < my_tiles; ++k) {
    const auto t = static_cast<uint32_t>(blockIdx.x + k * gridDim.x), ct32 = static_cast<uint32_t>(col_tiles);
    const int64_t rt = t / ct32, ct = t % ct32, c0 = ct * kTile;
    const TileGroup grp = group_of(outs.o[0], rt * kTile);   // every output's (one shape); all lanes here
    const int g = lane >> 4, q = lane & 15, jc = 2 * warp + g;  // the columns' lane layout
    float cv[NO][2][4][4];                                      // [output][half][row 4 q + i][column 4 jc + e]
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int64_t u = 2 * k + h;
      cp_async_wait<S - 2>();  // this thread's copies of half u have landed
      __syncthreads();                 // everyone's have; the stage of half u - 1 is no longer read
      issue(u + S - 1);
      float4* stage = pipe_smem + (u % S) * kStageChunks;
      const int64_t r0 = rt * kTile + h * kHalfRows;

      // Rows: one row and 16 columns a lane.
      {
        const int sub = lane >> 3, p = lane & 7, r = 4 * warp + sub;
        float v[NO][4][4];
        float a[NO];
#pragma unroll
        for (int o = 0; o < NO; ++o) a[o] = 0.0f;
        char* base = reinterpret_cast<char*>(stage);
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          const int j = p + 8 * i;  // columns 4 j .. 4 j + 3 of row r
          float in4[NI][4];
#pragma unroll
          for (int n = 0; n < NI; ++n) {
            if (Shape::kBf16(n)) {
              const uint2 b =
                  *reinterpret_cast<const uint2*>(base + Shape::in_offset(n) + Shape::bf16_chunk(r, j >> 1) + 8 * (j & 1));
              in4[n][0] = __uint_as_float(b.x << 16), in4[n][1] = __uint_as_float(b.x & 0xFFFF0000u);
              in4[n][2] = __uint_as_float(b.y << 16), in4[n][3] = __uint_as_float(b.y & 0xFFFF0000u);
            } else {
              const float4 f = *reinterpret_cast<const float4*>(base + Shape::in_offset(n) + Shape::fp32_chunk(r, j));
              in4[n][0] = f.x, in4[n][1] = f.y, in4[n][2] = f.z, in4[n][3] = f.w;
            }
          }
          float out4[NO][4];
          src.apply4(in4, out4);
#pragma unroll
          for (int o = 0; o < NO; ++o)
#pragma unroll
            for (int e = 0; e < 4; ++e) v[o][i][e] = out4[o][e];
#pragma unroll
          for (int o = 0; o < NO; ++o) {
            a[o] = abs_max4(a[o], v[o][i]);
            *reinterpret_cast<float4*>(base + Shape::out_offset(o) + Shape::fp32_chunk(r, j)) =
                make_float4(v[o][i][0], v[o][i][1], v[o][i][2], v[o][i][3]);
          }
        }
#pragma unroll
        for (int o = 0; o < NO; ++o) {
          const TileOutputs& out = outs.o[o];
          int amax = abs_bits(a[o]);
          for (int offset = 1; offset < 8; offset *= 2) amax = max(amax, __shfl_xor_sync(0xFFFFFFFFu, amax, offset));
          const float scale = scale_from_amax_bits(amax);
          const Divisor d = divisor(scale);
          const int64_t gr = r0 + r;
          if (p == 0) *row_scale<kLt>(out, gr, ct, grp) = scale;
          uint32_t row_codes[4];
          encode4_n<4>(v[o], d, row_codes);
          // Word i holds columns c0 + 4 (p + 8 i) ..: one row address for the 4 words and the bound as 32-bit
          // compares (with zero_pad every word: past cols the inputs were zero-filled, so the codes are zeros), as
          // fp8_quantize_tile.cuh's row stores (each word's own 64-bit address and bound were ~20 instructions).
          unsigned int* const row_at =
              reinterpret_cast<unsigned int*>(out.codes + gr * out.row_codes_ld() + c0 + 4 * p);
          const int left = out.zero_pad ? kTile : static_cast<int>(min(cols - c0 - 4 * p, int64_t{kTile}));
#pragma unroll
          for (int i = 0; i < 4; ++i)
            if (32 * i < left) __stcs(row_at + 8 * i, row_codes[i]);
        }
      }
      __syncthreads();  // the outputs written over the inputs are visible to the columns

      // Columns: this half's rows 4 q .. 4 q + 3 of 4 columns, kept for the amax over both halves.
#pragma unroll
      for (int i = 0; i < 4; ++i) {
#pragma unroll
        for (int o = 0; o < NO; ++o) {
          const float4 f = *reinterpret_cast<const float4*>(reinterpret_cast<const char*>(stage) + Shape::out_offset(o) +
                                                            Shape::fp32_chunk(4 * q + i, jc));
          cv[o][h][i][0] = f.x, cv[o][h][i][1] = f.y, cv[o][h][i][2] = f.z, cv[o][h][i][3] = f.w;
        }
      }
    }

    // Columns of the whole tile: 128 rows each over the half warp.
#pragma unroll
    for (int o = 0; o < NO; ++o) {
      const TileOutputs& out = outs.o[o];
      uint8_t* dst0;
      int64_t out_rows, first;
      transposed_destination(out, rt * kTile, grp, dst0, out_rows, first);
      // Column c_first + e's codes at col_at + e · out_rows, its scale at scale_at + e · scale_step; the columns left
      // as a 32-bit bound (addresses made once, not per column).
      const int64_t c_first = c0 + 4 * jc;
      uint8_t* const col_at = dst0 + c_first * out_rows + first + 4 * q;
      float* const scale_at = col_scale<kLt>(out, c_first, rt);
      const int64_t scale_step = kLt ? 1 : out.rows / kTile;
      const int cols_left = static_cast<int>(min(cols - c_first, int64_t{4}));
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        float m = 0.0f;
#pragma unroll
        for (int h = 0; h < 2; ++h)
#pragma unroll
          for (int i = 0; i < 4; ++i) m = fmaxf(m, fabsf(cv[o][h][i][e]));
        int amax = abs_bits(m);
        for (int offset = 1; offset < 16; offset *= 2) amax = max(amax, __shfl_xor_sync(0xFFFFFFFFu, amax, offset));
        const float scale = scale_from_amax_bits(amax);
        const Divisor d = divisor(scale);
        if (e >= cols_left) continue;  // the same for the whole half warp (after its shuffles)
        if (q == 0) scale_at[e * scale_step] = scale;
        const float x4[2][4] = {{cv[o][0][0][e], cv[o][0][1][e], cv[o][0][2][e], cv[o][0][3][e]},
                                {cv[o][1][0][e], cv[o][1][1][e], cv[o][1][2][e], cv[o][1][3][e]}};
        uint32_t codes[2];
        encode4_n<2>(x4, d, codes);
#pragma unroll
        for (int h = 0; h < 2; ++h)
          __stcs(reinterpret_cast<unsigned int*>(col_at + e * out_rows + h * kHalfRows), codes[h]);
      }
    }
  }
}

// Launches quantize_pipelined_kernel over outs (one shape: rows % 128 == 0, cols % 4 == 0, every input row 16-byte
// and the codes 4-byte aligned; callers check), one block per SM (fewer for fewer tiles). Every output's scales in
// one layout, the CPU's or cuBLASLt's for both ways (TileOutputs::rows_lt and cols_lt all equal).
template <class Src>
void launch_quantize_pipelined(const Src& src, const PipeOutputs<Src::kOutputs>& outs, cudaStream_t stream) {
  const TileOutputs& o = outs.o[0];
  if (o.rows == 0 || o.cols == 0) return;
  for (const TileOutputs& each : outs.o)
    require(each.rows_lt == o.rows_lt && each.cols_lt == o.rows_lt && each.rows == o.rows && each.cols == o.cols &&
                each.bounds == o.bounds && each.n_groups == o.n_groups,
            "fp8::cuda::launch_quantize_pipelined: every output of one shape and groups, its scales in one layout");
  constexpr int smem = PipeShape<Src>::kSmemBytes;
  int device = 0, sms = 0;
  CUDA_CHECK(cudaGetDevice(&device));
  CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  const int64_t col_tiles = tiles(o.cols), n_tiles = o.rows / kTile * col_tiles;
  const auto blocks = static_cast<unsigned>(n_tiles < sms ? n_tiles : int64_t{sms});
  const auto launch = [&](auto lt) {
    constexpr bool kLt = decltype(lt)::value;
    moerl::cuda_detail::allow_dynamic_smem<quantize_pipelined_kernel<Src, kLt>>(smem);
    moerl::cuda::launch_after_previous(quantize_pipelined_kernel<Src, kLt>, blocks, kPipeThreads, smem, stream, src,
                                       outs, col_tiles, n_tiles);
  };
  if (o.rows_lt)
    launch(std::true_type{});
  else
    launch(std::false_type{});
}

}  // namespace moerl::fp8::cuda::quant_detail
