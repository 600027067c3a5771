#include "kernels/linear.hpp"

#include <cblas.h>

#include <vector>

#include "kernels/fp8.hpp"
#include "kernels/half.hpp"

namespace moerl {

std::string_view precision_name(Precision p) {
  switch (p) {
    case Precision::FP32: return "fp32";
    case Precision::BF16: return "bf16";
    case Precision::FP8: return "fp8";
  }
  return "?";
}

bool parse_precision(std::string_view name, Precision* out) {
  for (Precision p : {Precision::FP32, Precision::BF16, Precision::FP8})
    if (precision_name(p) == name) { *out = p; return true; }
  return false;
}

namespace cpu {

void sgemm(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, float alpha, const float* A, int64_t lda,
           const float* B, int64_t ldb, float beta, float* C, int64_t ldc) {
  if (M == 0 || N == 0) return;
  cblas_sgemm(CblasRowMajor, trans_a ? CblasTrans : CblasNoTrans, trans_b ? CblasTrans : CblasNoTrans,
              static_cast<blasint>(M), static_cast<blasint>(N), static_cast<blasint>(K), alpha, A,
              static_cast<blasint>(lda), B, static_cast<blasint>(ldb), beta, C, static_cast<blasint>(ldc));
}

namespace {

// Scratch of the emulated precisions, one set per thread (callers may run linears from several
// threads), grown to the largest size seen and never shrunk, so steady-state calls do not allocate.
// Each slot holds one operand: its low-precision value in FP32 (`values`), and for FP8 its codes and
// scales on the way there.
struct Slot {
  std::vector<float> values;
  std::vector<uint8_t> codes;
  std::vector<float> scales;
};
thread_local Slot t_slots[2];

template <class T> T* grow(std::vector<T>& v, int64_t n) {
  if (static_cast<int64_t>(v.size()) < n) v.resize(static_cast<size_t>(n));
  return v.data();
}

// src [rows, cols] rounded to BF16, kept in FP32.
const float* to_bf16(Slot& slot, const float* src, int64_t rows, int64_t cols) {
  const int64_t n = rows * cols;
  float* dst = grow(slot.values, n);
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < n; ++i) dst[i] = round_bf16(src[i]);
  return dst;
}

// The FP8 operands of the GEMMs, quantized as DeepSeek-V3 does and dequantized back to FP32: a
// dequantized product (da * sa) * (db * sb) equals the reference's (sa * sb) * (da * db) up to one FP32
// rounding of each operand, so an sgemm on these is gemm_nt_reference up to rounding and sum order.
enum class Fp8Layout {
  Tiles1x128,            // activation / gradient, tiles along columns: src [rows, cols] -> [rows, cols]
  Blocks128x128,         // weight: src [rows, cols] -> [rows, cols]
  Tiles1x128Transposed,  // along rows (tokens): src [rows, cols] -> [cols, rows]
};

const float* to_fp8(Slot& slot, Fp8Layout layout, const float* src, int64_t rows, int64_t cols) {
  using fp8::tiles, fp8::kTile;
  const int64_t n = rows * cols;
  uint8_t* codes = grow(slot.codes, n);
  float* values = grow(slot.values, n);
  switch (layout) {
    case Fp8Layout::Tiles1x128: {
      float* scales = grow(slot.scales, rows * tiles(cols));
      fp8::cpu::quantize_1x128(src, rows, cols, codes, scales);
      fp8::cpu::dequantize(codes, scales, rows, cols, 1, values);
      break;
    }
    case Fp8Layout::Blocks128x128: {
      float* scales = grow(slot.scales, tiles(rows) * tiles(cols));
      fp8::cpu::quantize_128x128(src, rows, cols, codes, scales);
      fp8::cpu::dequantize(codes, scales, rows, cols, kTile, values);
      break;
    }
    case Fp8Layout::Tiles1x128Transposed: {
      float* scales = grow(slot.scales, cols * tiles(rows));
      fp8::cpu::quantize_1x128_transposed(src, rows, cols, codes, scales);
      fp8::cpu::dequantize(codes, scales, cols, rows, 1, values);
      break;
    }
  }
  return values;
}

}  // namespace

void linear_forward(Precision p, const float* x, const float* w, float* y, int64_t M, int64_t N, int64_t K) {
  switch (p) {
    case Precision::FP32: break;
    case Precision::BF16:
      x = to_bf16(t_slots[0], x, M, K);
      w = to_bf16(t_slots[1], w, N, K);
      break;
    case Precision::FP8:  // Fprop: x 1x128 tiles, w 128x128 blocks, both along K
      x = to_fp8(t_slots[0], Fp8Layout::Tiles1x128, x, M, K);
      w = to_fp8(t_slots[1], Fp8Layout::Blocks128x128, w, N, K);
      break;
  }
  sgemm(false, true, M, N, K, 1.0f, x, K, w, K, 0.0f, y, N);
}

void linear_backward(Precision p, const float* dy, const float* x, const float* w, float* dx, float* dw, int64_t M,
                     int64_t N, int64_t K) {
  Slot& a = t_slots[0];
  Slot& b = t_slots[1];
  switch (p) {
    case Precision::FP32:
      if (dx) sgemm(false, false, M, K, N, 1.0f, dy, N, w, K, 0.0f, dx, K);
      if (dw) sgemm(true, false, N, K, M, 1.0f, dy, N, x, K, 1.0f, dw, K);
      return;
    case Precision::BF16: {
      const float* dy16 = to_bf16(a, dy, M, N);  // shared by both GEMMs
      if (dx) sgemm(false, false, M, K, N, 1.0f, dy16, N, to_bf16(b, w, N, K), K, 0.0f, dx, K);
      if (dw) sgemm(true, false, N, K, M, 1.0f, dy16, N, to_bf16(b, x, M, K), K, 1.0f, dw, K);
      return;
    }
    case Precision::FP8:
      // Dgrad: dx[M, K] = dy[M, N] · w[N, K], contracted over N: dy in 1x128 tiles along N, w in the
      // same 128x128 blocks as Fprop (a square block of w is one of wᵀ).
      if (dx) {
        const float* dy8 = to_fp8(a, Fp8Layout::Tiles1x128, dy, M, N);
        const float* w8 = to_fp8(b, Fp8Layout::Blocks128x128, w, N, K);
        sgemm(false, false, M, K, N, 1.0f, dy8, N, w8, K, 0.0f, dx, K);
      }
      // Wgrad: dw[N, K] += dyᵀ[N, M] · x[M, K], contracted over the tokens M: dyᵀ and xᵀ both quantized
      // in 1x128 tiles along M.
      if (dw) {
        const float* dyt8 = to_fp8(a, Fp8Layout::Tiles1x128Transposed, dy, M, N);  // [N, M]
        const float* xt8 = to_fp8(b, Fp8Layout::Tiles1x128Transposed, x, M, K);    // [K, M]
        sgemm(false, true, N, K, M, 1.0f, dyt8, M, xt8, M, 1.0f, dw, K);
      }
      return;
  }
}

}  // namespace cpu
}  // namespace moerl
