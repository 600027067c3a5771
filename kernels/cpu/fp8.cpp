#include "kernels/fp8.hpp"

#include <array>
#include <bit>
#include <cmath>
#include <limits>
#include <string>

#include "runtime/error.hpp"

namespace moerl::fp8 {
namespace {

// FP32 bit patterns of the thresholds of the conversion.
constexpr uint32_t kF32Inf = 0x7F800000u;
constexpr uint32_t kF32Max448 = 0x43E00000u;  // 448.0f: here and above (and Inf) saturate

// Round |x| to E4M3 precision with one FPU addition: adding M = 2^(e + 20), whose ulp 2^(e - 3) is the
// E4M3 step at x's binary exponent e (clamped to [-6, 8]: subnormals share the step 2^-9 of e = -6),
// makes the FPU round |x| to a multiple of that step, ties to even. The ulps of M added, sum - M, are
// then 8 + mantissa for a normal (a carry gives 16: the next exponent, mantissa 0) and the code itself
// for a subnormal, so code = ((e + 6) << 3) + (sum - M) in both cases.
// Branch-free (integer masks instead of ?:, so GCC does not sink the FP addition into a branch) and
// vectorizable. Checked against CUDA's host conversion on all 2^32 floats once (no mismatch) and on
// 10^6 random ones in fp8_test.cpp.
inline uint8_t encode(float x) {
  const uint32_t u = std::bit_cast<uint32_t>(x);
  const uint32_t sign = (u >> 24) & 0x80u;
  const uint32_t a = u & 0x7FFFFFFFu;
  const uint32_t biased_exp = std::min(std::max(a >> 23, 127u - 6u), 127u + 8u);
  const uint32_t magic = (biased_exp + 20u) << 23;
  const uint32_t sum = std::bit_cast<uint32_t>(std::bit_cast<float>(a) + std::bit_cast<float>(magic));
  uint32_t code = ((biased_exp - (127u - 6u)) << 3) + (sum - magic);
  const uint32_t saturate = 0u - static_cast<uint32_t>(a >= kF32Max448);  // all ones or zero
  code = (code & ~saturate) | (0x7Eu & saturate);
  code |= sign;
  const uint32_t nan = 0u - static_cast<uint32_t>(a > kF32Inf);
  code = (code & ~nan) | (uint32_t{kNaN} & nan);
  return static_cast<uint8_t>(code);
}

constexpr float decode(uint8_t code) {
  const uint32_t sign = static_cast<uint32_t>(code & 0x80u) << 24;
  const uint32_t exp = (code >> 3) & 0xFu, man = code & 0x7u;
  if (exp == 0xF && man == 0x7) return std::numeric_limits<float>::quiet_NaN();
  if (exp == 0) return std::bit_cast<float>(sign | std::bit_cast<uint32_t>(static_cast<float>(man) * 0x1p-9f));
  return std::bit_cast<float>(sign | ((exp + 120u) << 23) | (man << 20));
}

constexpr std::array<float, 256> kDecoded = [] {
  std::array<float, 256> t{};
  for (int c = 0; c < 256; ++c) t[c] = decode(static_cast<uint8_t>(c));
  return t;
}();

// max(amax, max_i |x_i|), NaN ignored. Non-negative floats order as their bit patterns, so the maximum is
// taken on integers: exact, associative (GCC vectorizes it) and equal to a float max of fabs. Signed
// int32 (all values are >= 0) because SSE2 has a signed compare but no unsigned one.
inline int32_t abs_bits(float v) {
  const int32_t a = std::bit_cast<int32_t>(v) & 0x7FFFFFFF;
  return a > static_cast<int32_t>(kF32Inf) ? 0 : a;
}
inline float abs_max(const float* x, int64_t n, float amax) {
  int32_t m = std::bit_cast<int32_t>(amax);
  for (int64_t i = 0; i < n; ++i) m = std::max(m, abs_bits(x[i]));
  return std::bit_cast<float>(m);
}

inline void encode_scaled(const float* x, int64_t n, float scale, uint8_t* codes) {
  for (int64_t i = 0; i < n; ++i) codes[i] = encode(x[i] / scale);
}

}  // namespace

uint8_t e4m3_from_float(float x) { return encode(x); }
float float_from_e4m3(uint8_t code) { return kDecoded[code]; }

namespace cpu {

void quantize_1x128(const float* x, int64_t rows, int64_t cols, uint8_t* codes, float* scales) {
  const int64_t nt = tiles(cols);
#pragma omp parallel for schedule(static)
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t t = 0; t < nt; ++t) {
      const int64_t c0 = t * kTile, n = std::min<int64_t>(kTile, cols - c0);
      const float* src = x + r * cols + c0;
      const float s = scale_from_amax(abs_max(src, n, 0.0f));
      scales[r * nt + t] = s;
      encode_scaled(src, n, s, codes + r * cols + c0);
    }
  }
}

void quantize_128x128(const float* w, int64_t rows, int64_t cols, uint8_t* codes, float* scales) {
  const int64_t nbr = tiles(rows), nbc = tiles(cols);
#pragma omp parallel for collapse(2) schedule(static)
  for (int64_t br = 0; br < nbr; ++br) {
    for (int64_t bc = 0; bc < nbc; ++bc) {
      const int64_t r0 = br * kTile, r1 = std::min<int64_t>(rows, r0 + kTile);
      const int64_t c0 = bc * kTile, n = std::min<int64_t>(kTile, cols - c0);
      float amax = 0.0f;
      for (int64_t r = r0; r < r1; ++r) amax = abs_max(w + r * cols + c0, n, amax);
      const float s = scale_from_amax(amax);
      scales[br * nbc + bc] = s;
      for (int64_t r = r0; r < r1; ++r) encode_scaled(w + r * cols + c0, n, s, codes + r * cols + c0);
    }
  }
}

void quantize_1x128_transposed(const float* x, int64_t rows, int64_t cols, uint8_t* codes_t, float* scales_t) {
  // Work unit: one 128-row tile times a chunk of columns, so the strided reads of x stay in cache
  // (kChunk floats of a row = 2 cache lines) while the writes to codes_t run contiguously along rows.
  constexpr int64_t kChunk = 32;
  const int64_t nrt = tiles(rows), nchunks = (cols + kChunk - 1) / kChunk;
#pragma omp parallel for collapse(2) schedule(static)
  for (int64_t rt = 0; rt < nrt; ++rt) {
    for (int64_t ch = 0; ch < nchunks; ++ch) {
      const int64_t r0 = rt * kTile, r1 = std::min<int64_t>(rows, r0 + kTile);
      const int64_t c0 = ch * kChunk, nc = std::min<int64_t>(kChunk, cols - c0);
      int32_t amax[kChunk] = {};  // bit patterns of |x|, as in abs_max
      for (int64_t r = r0; r < r1; ++r) {
        const float* row = x + r * cols + c0;
        for (int64_t j = 0; j < nc; ++j) amax[j] = std::max(amax[j], abs_bits(row[j]));
      }
      for (int64_t j = 0; j < nc; ++j) {
        const int64_t c = c0 + j;
        const float s = scale_from_amax(std::bit_cast<float>(amax[j]));
        scales_t[c * nrt + rt] = s;
        uint8_t* dst = codes_t + c * rows;
        for (int64_t r = r0; r < r1; ++r) dst[r] = encode(x[r * cols + c] / s);
      }
    }
  }
}

void dequantize(const uint8_t* codes, const float* scales, int64_t rows, int64_t cols, int block_rows, float* out) {
  require(block_rows == 1 || block_rows == kTile,
          "fp8::dequantize: block_rows must be 1 or 128, got " + std::to_string(block_rows));
  const int64_t nt = tiles(cols);
#pragma omp parallel for schedule(static)
  for (int64_t r = 0; r < rows; ++r) {
    const float* srow = scales + (r / block_rows) * nt;
    const uint8_t* src = codes + r * cols;
    float* dst = out + r * cols;
    for (int64_t c = 0; c < cols; ++c) dst[c] = kDecoded[src[c]] * srow[c / kTile];
  }
}

void gemm_nt_reference(const Operand& a, const Operand& b, float* y) {
  require(a.cols == b.cols, "fp8::gemm_nt_reference: K differs: a has " + std::to_string(a.cols) +
                                " columns, b has " + std::to_string(b.cols));
  for (const Operand* o : {&a, &b})
    require(o->block_rows == 1 || o->block_rows == kTile,
            "fp8::gemm_nt_reference: block_rows must be 1 or 128, got " + std::to_string(o->block_rows));
  const int64_t M = a.rows, N = b.rows, K = a.cols, nt = tiles(K);
#pragma omp parallel for schedule(static)
  for (int64_t m = 0; m < M; ++m) {
    const uint8_t* am = a.codes + m * K;
    const float* sa = a.scales + (m / a.block_rows) * nt;
    for (int64_t n = 0; n < N; ++n) {
      const uint8_t* bn = b.codes + n * K;
      const float* sb = b.scales + (n / b.block_rows) * nt;
      float acc = 0.0f;
      for (int64_t g = 0; g < nt; ++g) {
        const int64_t k1 = std::min(K, (g + 1) * kTile);
        float partial = 0.0f;
        for (int64_t k = g * kTile; k < k1; ++k) partial += kDecoded[am[k]] * kDecoded[bn[k]];
        acc += (sa[g] * sb[g]) * partial;
      }
      y[m * N + n] = acc;
    }
  }
}

}  // namespace cpu
}  // namespace moerl::fp8
