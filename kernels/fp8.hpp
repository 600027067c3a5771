// FP8 E4M3 numerics as DeepSeek-V3 trains with them: OCP FP8 E4M3FN codes, online fine-grained scales
// (1x128 tiles for activations and their gradients, 128x128 blocks for weights) and the block-scaled
// GEMM with FP32 accumulation. The cpu:: functions are the bit-exact reference the CUDA kernels match.
//
// E4M3FN: 1 sign, 4 exponent (bias 7), 3 mantissa bits; no infinities; 0x7F/0xFF are NaN; largest
// finite 448 (0x7E), smallest normal 2^-6 (0x08), smallest subnormal 2^-9 (0x01).
// Conversion from FP32 rounds to nearest, ties to even, and otherwise behaves exactly as CUDA's
// __nv_cvt_float_to_fp8(x, __NV_SATFINITE, __NV_E4M3) (what DeepGEMM and Transformer Engine quantize
// with; in device code for sm_89+ it is the PTX instruction cvt.rn.satfinite.e4m3x2.f32) — checked against
// CUDA's host implementation on all 2^32 floats:
//   - finite |x| >= 448 and ±Inf saturate to ±448 (0x7E / 0xFE);
//   - NaN of either sign becomes 0x7F (CUDA's host code canonicalizes NaN to positive first);
//   - |x| <= 2^-10 (half the smallest subnormal; the tie goes to the even code 0) becomes ±0, keeping
//     the sign, so -0.0 -> 0x80.
// PyTorch's float8_e4m3fn cast differs only outside the range: it maps |x| >= 480 and Inf to NaN. With
// online scales (|x / scale| <= 448 up to rounding) the two never differ; the fixture is from PyTorch.
//
// Quantization: scale = max(amax, 1e-4) / 448 in FP32 per tile, code = e4m3(x / scale) with a true FP32
// division (not a multiplication by 1/scale: the last bit can differ). A NaN input is ignored by amax and
// becomes the NaN code; an Inf input makes its tile's scale Inf (all codes of that tile 0 or NaN).
#pragma once
#include <algorithm>
#include <cstdint>

namespace moerl::fp8 {

constexpr int kTile = 128;              // quantization granularity along the contracted dimension
constexpr float kE4M3Max = 448.0f;      // largest finite E4M3FN value
constexpr float kMinAmax = 1e-4f;       // floor on a tile's amax so all-zero tiles get a finite scale
constexpr uint8_t kNaN = 0x7F;          // the NaN code every conversion produces

// Number of 128-wide tiles covering n elements (the last one may be partial).
constexpr int64_t tiles(int64_t n) { return (n + kTile - 1) / kTile; }

// The scale of a tile from its absolute maximum: max(amax, 1e-4) / 448, in FP32.
inline float scale_from_amax(float amax) { return std::max(amax, kMinAmax) / kE4M3Max; }

// FP32 -> E4M3FN code, round to nearest even, saturating (see above). Branch-free bit code.
uint8_t e4m3_from_float(float x);
// E4M3FN code -> its exact FP32 value (0x7F and 0xFF decode to NaN).
float float_from_e4m3(uint8_t code);

namespace cpu {

// Partial tiles: when rows or cols is not a multiple of 128, the last tile (or block) holds only the
// elements present and behaves exactly as if padded with zeros: its scale comes from the elements
// present (zeros never raise an amax) and padding never appears in codes. All functions below accept
// any rows, cols >= 0 and run OpenMP-parallel over independent rows / blocks (results do not depend
// on the thread count).

// Activations / activation gradients, 1x128 tiles along columns.
//   x [rows, cols] row-major -> codes [rows, cols], scales [rows, tiles(cols)].
void quantize_1x128(const float* x, int64_t rows, int64_t cols, uint8_t* codes, float* scales);

// Weights, 128x128 blocks.  w [rows, cols] -> codes [rows, cols], scales [tiles(rows), tiles(cols)].
// Blocks are square, so quantizing wᵀ gives exactly the transposed codes and scale grid.
void quantize_128x128(const float* w, int64_t rows, int64_t cols, uint8_t* codes, float* scales);

// Transposed 1x128 quantization ("128x1 tiles" of x), what Wgrad needs: tiles run along rows of x.
//   x [rows, cols] -> codes_t [cols, rows] (= xᵀ quantized 1x128), scales_t [cols, tiles(rows)].
// Byte-identical to quantize_1x128 of the explicit transpose.
void quantize_1x128_transposed(const float* x, int64_t rows, int64_t cols, uint8_t* codes_t, float* scales_t);

// codes [rows, cols] with scales at granularity block_rows x 128 (block_rows = 1 or 128) -> FP32.
//   out[r, c] = float_from_e4m3(codes[r, c]) * scales[r / block_rows, c / 128]   (one FP32 rounding)
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
// Inner sums run over k in increasing order, groups in increasing order.
// a [M, K], b [N, K] -> y [M, N]. Plain loops: the reference, not the fast path.
// Throws moerl::Error when a.cols != b.cols or a block_rows is not 1 or 128.
void gemm_nt_reference(const Operand& a, const Operand& b, float* y);

}  // namespace cpu
}  // namespace moerl::fp8
