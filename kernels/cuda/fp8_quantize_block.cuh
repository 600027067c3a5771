// The 128x128-block quantization of a weight (fp8::cpu::quantize_128x128's bytes) from values a thread block holds
// in registers, shared by the plain kernel (fp8_quantize.cu: the values loaded from w) and the optimizer's fused
// update (adamw_fp8.cu: the values it has just computed), so both write the same codes by construction.
//
// A thread block of 16 warps per 128x128 block: lane l holds columns 4l .. 4l + 3, warp w rows 8w .. 8w + 7
// (v[i]: row 8w + i), zeros outside the matrix. The block's amax is a warp max and one pass over the 16 warps' in
// shared memory; the codes go out from registers (4-byte stores along rows). With the transpose, the codes also go
// to codes_t [cols, t_ld] (wᵀ's 128x128 blocks are w's mirrored: the same amax, scale and codes), staged in shared
// memory so that every warp writes whole 128-byte rows of codes_t with 16-byte stores; that needs rows % 16 == 0
// and codes_t 16-byte aligned (callers check). One pass instead of a quantization and a byte transpose of the codes
// (a weight is re-quantized after every optimizer step).
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

#include "kernels/cuda/fp8_quantize_common.cuh"

namespace moerl::fp8::cuda::quant_detail {

constexpr int kBlockWarps = 16;  // 128x128: warps per block (16 warps of 8 rows: 3.9 TB/s against 1.8 with 8 of 16)
constexpr int kBlockThreads = kBlockWarps * kWarp;
constexpr int kBlockRowsPerWarp = kTile / kBlockWarps;
static_assert(kBlockRowsPerWarp == 8, "two groups of 4 rows per warp for the 4x4 byte transposes");

// The block's shared memory: codes_t staging, row c (a column of the block) holding its 128 codes as 32 words (+1:
// the column-major writes below and the row-major reads hit 32 different banks), and the warps' amaxes.
template <bool kTransposed>
struct BlockSmem {
  static constexpr int kStride = kTile / 4 + 1;
  uint32_t staged[kTransposed ? kTile * kStride : 1];
  int warp_amax[kBlockWarps];
};

// Where a block goes: the block at (r0, c0) of a [rows, cols] matrix whose codes start at `codes` (rows `cols`
// apart), its transpose's at codes_t (rows t_ld apart; null without the transpose), its scale at *scale.
struct BlockPlace {
  int64_t rows, cols, r0, c0;
  uint8_t* codes;
  uint8_t* codes_t;
  int64_t t_ld;
  float* scale;
};

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

// Quantizes the block's values v (layout above) into p. kFull: the block lies inside the matrix and `vec` (codes
// rows 4-byte aligned): no bounds checks. Every thread of the block must call it.
template <bool kFull, bool kTransposed>
__device__ __forceinline__ void quantize_block_values(const float (&v)[kBlockRowsPerWarp][4], const BlockPlace& p,
                                                      bool vec, BlockSmem<kTransposed>& smem) {
  constexpr int kStride = BlockSmem<kTransposed>::kStride;
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
  const int64_t c = p.c0 + lane * 4;
  int amax = 0;
#pragma unroll
  for (int i = 0; i < kBlockRowsPerWarp; ++i)
    amax = max(amax, max(max(abs_bits(v[i][0]), abs_bits(v[i][1])), max(abs_bits(v[i][2]), abs_bits(v[i][3]))));
  amax = warp_max(amax);
  if (lane == 0) smem.warp_amax[warp] = amax;
  __syncthreads();
  amax = smem.warp_amax[0];
#pragma unroll
  for (int i = 1; i < kBlockWarps; ++i) amax = max(amax, smem.warp_amax[i]);
  const float scale = scale_from_amax_bits(amax);
  const Divisor d = divisor(scale);
  if (threadIdx.x == 0) *p.scale = scale;
  uint32_t q[kBlockRowsPerWarp];
  encode4_n<kBlockRowsPerWarp>(v, d, q);
#pragma unroll
  for (int i = 0; i < kBlockRowsPerWarp; ++i) {
    const int64_t r = p.r0 + warp * kBlockRowsPerWarp + i;
    if (kFull)
      __stcs(reinterpret_cast<unsigned int*>(p.codes + r * p.cols + c), q[i]);
    else if (r < p.rows)
      store4(p.codes + r * p.cols, c, p.cols, vec, q[i]);
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
        smem.staged[(4 * lane + jj) * kStride + 2 * warp + g] = word;
      }
    }
    __syncthreads();
    // 128 columns x 8 chunks of 16 rows; thread t writes chunks t and t + 512 (chunk k: column k / 8, rows
    // 16 (k % 8) ..): a warp writes 4 whole 128-byte rows of codes_t.
    static_assert(kTile * 8 == 2 * kBlockThreads, "two chunks per thread");
#pragma unroll
    for (int it = 0; it < 2; ++it) {
      const int k = it * kBlockThreads + threadIdx.x;
      const int col = k / 8, part = k % 8;
      const int64_t out_col = p.c0 + col, out_row = p.r0 + 16 * part;
      if (!kFull && (out_col >= p.cols || out_row >= p.rows)) continue;  // rows % 16 == 0: whole or absent
      const uint32_t* src = smem.staged + col * kStride + 4 * part;
      __stcs(reinterpret_cast<uint4*>(p.codes_t + out_col * p.t_ld + out_row),
             make_uint4(src[0], src[1], src[2], src[3]));
    }
  }
}

}  // namespace moerl::fp8::cuda::quant_detail
