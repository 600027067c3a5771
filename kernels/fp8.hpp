// FP8 E4M3 numerics as DeepSeek-V3 trains with them: OCP FP8 E4M3FN codes, online fine-grained scales
// (1x128 tiles for activations and their gradients, 128x128 blocks for weights) and the block-scaled
// GEMM with FP32 accumulation. The cpu:: functions are the bit-exact reference the CUDA kernels match.
#pragma once
#include <algorithm>
#include <cstdint>

namespace moerl::fp8 {

constexpr int kTile = 128;              // quantization granularity along the contracted dimension
constexpr float kE4M3Max = 448.0f;      // largest finite E4M3FN value
constexpr float kMinAmax = 1e-4f;       // floor on a tile's amax so all-zero tiles get a finite scale

// Number of 128-wide tiles covering n elements (the last one may be partial).
constexpr int64_t tiles(int64_t n) { return (n + kTile - 1) / kTile; }

// The scale of a tile from its absolute maximum: max(amax, 1e-4) / 448, in FP32.
inline float scale_from_amax(float amax) { return std::max(amax, kMinAmax) / kE4M3Max; }

// FP32 -> E4M3FN code, round to nearest even. See fp8.cpp for what NaN, Inf and out-of-range become.
uint8_t e4m3_from_float(float x);
// E4M3FN code -> its exact FP32 value (0x7F and 0xFF decode to NaN).
float float_from_e4m3(uint8_t code);

namespace cpu {

// Activations / activation gradients, 1x128 tiles along columns.
//   x [rows, cols] row-major -> codes [rows, cols], scales [rows, tiles(cols)].
// A partial last tile behaves as if padded with zeros: its scale comes from the elements present.
void quantize_1x128(const float* x, int64_t rows, int64_t cols, uint8_t* codes, float* scales);

// Weights, 128x128 blocks.  w [rows, cols] -> codes [rows, cols], scales [tiles(rows), tiles(cols)].
void quantize_128x128(const float* w, int64_t rows, int64_t cols, uint8_t* codes, float* scales);

// Transposed 1x128 quantization ("128x1 tiles" of x), what Wgrad needs: tiles run along rows of x.
//   x [rows, cols] -> codes_t [cols, rows] (= xᵀ quantized 1x128), scales_t [cols, tiles(rows)].
void quantize_1x128_transposed(const float* x, int64_t rows, int64_t cols, uint8_t* codes_t, float* scales_t);

// codes [rows, cols] with scales at granularity block_rows x 128 (block_rows = 1 or 128) -> FP32.
void dequantize(const uint8_t* codes, const float* scales, int64_t rows, int64_t cols, int block_rows, float* out);

// One operand of the block-scaled GEMM: codes [rows, cols] row-major, cols = K (contracted),
// scales [ceil(rows / block_rows), tiles(cols)] with block_rows = 1 (1x128 tiles) or 128 (128x128).
struct Operand {
  const uint8_t* codes;
  const float* scales;
  int64_t rows, cols;
  int block_rows;
};

// The semantics every FP8 GEMM reproduces:
//   y[m, n] = sum over K groups g of (sa[m, g] * sb[n, g]) * (sum_{k in g} a[m, k] * b[n, k])
// with the inner sums and the accumulation in FP32 (the GPU promotes partial sums every 128 of K).
// a [M, K], b [N, K] -> y [M, N]. Plain loops: the reference, not the fast path.
void gemm_nt_reference(const Operand& a, const Operand& b, float* y);

}  // namespace cpu
}  // namespace moerl::fp8
