#include "kernels/fp8.hpp"

#include <gtest/gtest.h>
#include <omp.h>

#include <bit>
#include <cmath>
#include <cstring>
#include <limits>
#include <random>
#include <sstream>
#include <vector>

#include "kernels/linear.hpp"
#include "runtime/error.hpp"
#include "runtime/safetensors.hpp"

#ifdef MOERL_HAVE_CUDA_FP8_H
#include <cuda_fp8.h>
#endif

namespace moerl::fp8 {
namespace {

const SafeTensors& fixture() {
  static const SafeTensors st = read_safetensors(MOERL_TEST_FIXTURES "/fp8_quant.safetensors");
  return st;
}

std::vector<float> random_normal(int64_t n, float sigma, uint32_t seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> dist(0.0f, sigma);
  std::vector<float> v(static_cast<size_t>(n));
  for (float& x : v) x = dist(rng);
  return v;
}

float f32(uint32_t bits) { return std::bit_cast<float>(bits); }

TEST(Fp8E4M3, DecodesAll256CodesAsPyTorchDoes) {
  const float* expected = fixture().at("e4m3_all_256_decoded").data<float>();
  for (int c = 0; c < 256; ++c) {
    const float got = float_from_e4m3(static_cast<uint8_t>(c));
    if (std::isnan(expected[c])) {
      EXPECT_TRUE(std::isnan(got)) << "code " << c;
    } else {
      // Bitwise, so +0 (0x00) and -0 (0x80) are told apart.
      EXPECT_EQ(std::bit_cast<uint32_t>(got), std::bit_cast<uint32_t>(expected[c])) << "code " << c;
    }
  }
  EXPECT_TRUE(std::isnan(float_from_e4m3(0x7F)));
  EXPECT_TRUE(std::isnan(float_from_e4m3(0xFF)));
  EXPECT_EQ(float_from_e4m3(0x7E), 448.0f);
  EXPECT_EQ(float_from_e4m3(0x01), std::ldexp(1.0f, -9));
}

TEST(Fp8E4M3, EveryFiniteCodeRoundTrips) {
  for (int c = 0; c < 256; ++c) {
    if ((c & 0x7F) == 0x7F) continue;
    EXPECT_EQ(e4m3_from_float(float_from_e4m3(static_cast<uint8_t>(c))), c) << "code " << c;
  }
}

TEST(Fp8E4M3, RoundsTiesToEvenAtEveryExponent) {
  // Between neighbours v (mantissa m) and v + ulp: the midpoint goes to the even mantissa, anything
  // above the midpoint up. Checked at exponents from the smallest normal (2^-6) to the largest (2^8).
  for (int e = -6; e <= 8; ++e) {
    for (int m = 0; m < 8; ++m) {  // m = 7: the rounded-up value carries into the next exponent
      if (e == 8 && m == 6) break;  // 448 + half an ulp: saturation, tested below
      const float v = std::ldexp(1.0f + m / 8.0f, e), ulp = std::ldexp(1.0f / 8, e);
      const uint8_t code_v = e4m3_from_float(v);
      const float mid = v + ulp / 2;
      EXPECT_EQ(e4m3_from_float(mid), m % 2 == 0 ? code_v : code_v + 1) << "midpoint above " << v;
      EXPECT_EQ(e4m3_from_float(std::nextafter(mid, 0.0f)), code_v) << v;
      EXPECT_EQ(e4m3_from_float(std::nextafter(mid, 1e9f)), code_v + 1) << v;
      EXPECT_EQ(e4m3_from_float(-mid), (m % 2 == 0 ? code_v : code_v + 1) | 0x80) << "-midpoint above " << v;
    }
  }
  // Ties carrying into the next exponent: 1.9375 lies between 1.875 (odd mantissa 7) and 2.
  EXPECT_EQ(e4m3_from_float(1.9375f), 0x40);
  EXPECT_EQ(e4m3_from_float(1.0625f), 0x38);   // between 1 and 1.125: down to 1 (even)
  EXPECT_EQ(e4m3_from_float(304.0f), 0x7A);    // between 288 (odd) and 320: up to 320
}

TEST(Fp8E4M3, RoundsSubnormalsToMultiplesOfTwoToTheMinus9) {
  const float q = std::ldexp(1.0f, -10);  // half the smallest subnormal
  EXPECT_EQ(e4m3_from_float(q), 0x00);                            // tie with 0: even is 0
  EXPECT_EQ(e4m3_from_float(std::nextafter(q, 1.0f)), 0x01);
  EXPECT_EQ(e4m3_from_float(-q), 0x80);
  EXPECT_EQ(e4m3_from_float(3 * q), 0x02);                        // 1.5 steps: tie, even is 2
  EXPECT_EQ(e4m3_from_float(5 * q), 0x02);                        // 2.5 steps: tie, even is 2
  EXPECT_EQ(e4m3_from_float(7 * q), 0x04);
  EXPECT_EQ(e4m3_from_float(13 * q), 0x06);
  EXPECT_EQ(e4m3_from_float(15 * q), 0x08);                       // 7.5 steps: tie, up to 2^-6 (normal)
  EXPECT_EQ(e4m3_from_float(std::nextafter(15 * q, 0.0f)), 0x07);
  EXPECT_EQ(e4m3_from_float(-11 * q), 0x86);                      // 5.5 steps: tie, even is 6
  // FP32 subnormal inputs and the smallest floats: signed zero.
  EXPECT_EQ(e4m3_from_float(std::numeric_limits<float>::denorm_min()), 0x00);
  EXPECT_EQ(e4m3_from_float(-std::numeric_limits<float>::denorm_min()), 0x80);
  EXPECT_EQ(e4m3_from_float(-1e-30f), 0x80);
  EXPECT_EQ(e4m3_from_float(0.0f), 0x00);
  EXPECT_EQ(e4m3_from_float(-0.0f), 0x80);
}

TEST(Fp8E4M3, SaturatesOutOfRangeAndInfToMaxAndMapsNaNTo0x7F) {
  // Our documented choice, matching CUDA's __NV_SATFINITE (PyTorch would give NaN from 480 up).
  const float inf = std::numeric_limits<float>::infinity();
  for (float v : {448.0f, std::nextafter(448.0f, 1e9f), 463.99f, 464.0f, 465.0f, 480.0f, 1e30f,
                  std::numeric_limits<float>::max(), inf}) {
    EXPECT_EQ(e4m3_from_float(v), 0x7E) << v;
    EXPECT_EQ(e4m3_from_float(-v), 0xFE) << -v;
  }
  EXPECT_EQ(e4m3_from_float(std::numeric_limits<float>::quiet_NaN()), 0x7F);
  EXPECT_EQ(e4m3_from_float(-std::numeric_limits<float>::quiet_NaN()), 0x7F);
  EXPECT_EQ(e4m3_from_float(f32(0x7F800001u)), 0x7F);  // signalling NaN
  EXPECT_EQ(e4m3_from_float(f32(0xFFFFFFFFu)), 0x7F);
}

TEST(Fp8E4M3, MatchesCudasHostConversionOnAMillionFloats) {
#ifndef MOERL_HAVE_CUDA_FP8_H
  GTEST_SKIP() << "cuda_fp8.h not found at configure time: no CUDA reference to compare with";
#else
  std::mt19937 rng(20240601);
  std::uniform_int_distribution<uint32_t> bits;
  std::uniform_real_distribution<float> in_range(-480.0f, 480.0f);
  std::uniform_real_distribution<float> subnormal_range(-std::ldexp(1.0f, -5), std::ldexp(1.0f, -5));
  int mismatches = 0;
  for (int i = 0; i < 1'000'000; ++i) {
    // Half random bit patterns (every exponent, NaN and Inf included), a quarter in E4M3's range,
    // a quarter around its subnormals.
    float x;
    if (i % 4 < 2) x = f32(bits(rng));
    else if (i % 4 == 2) x = in_range(rng);
    else x = subnormal_range(rng);
    const uint8_t ours = e4m3_from_float(x);
    const uint8_t cuda = __nv_cvt_float_to_fp8(x, __NV_SATFINITE, __NV_E4M3);
    if (ours != cuda && ++mismatches <= 10)
      ADD_FAILURE() << "x = " << x << " (bits " << std::hex << std::bit_cast<uint32_t>(x) << "): ours " << int{ours}
                    << ", CUDA " << int{cuda};
  }
  EXPECT_EQ(mismatches, 0);
#endif
}

TEST(Fp8Quantize, ReproducesTheFixtureBytesAndScales) {
  const SafeTensors& st = fixture();
  const Tensor& x = st.at("x");
  const Tensor& w = st.at("w");
  const int64_t M = x.dim(0), K = x.dim(1), N = w.dim(0);
  ASSERT_EQ(w.dim(1), K);

  std::vector<uint8_t> xq(M * K), wq(N * K);
  std::vector<float> xs(M * tiles(K)), ws(tiles(N) * tiles(K));
  cpu::quantize_1x128(x.data<float>(), M, K, xq.data(), xs.data());
  cpu::quantize_128x128(w.data<float>(), N, K, wq.data(), ws.data());

  ASSERT_EQ(st.at("x_q_bits").numel(), M * K);
  ASSERT_EQ(st.at("x_scale_1x128").numel(), M * tiles(K));
  ASSERT_EQ(st.at("w_scale_128x128").numel(), tiles(N) * tiles(K));
  EXPECT_EQ(std::memcmp(xq.data(), st.at("x_q_bits").data<uint8_t>(), xq.size()), 0);
  EXPECT_EQ(std::memcmp(wq.data(), st.at("w_q_bits").data<uint8_t>(), wq.size()), 0);
  EXPECT_EQ(std::memcmp(xs.data(), st.at("x_scale_1x128").data<float>(), xs.size() * 4), 0);
  EXPECT_EQ(std::memcmp(ws.data(), st.at("w_scale_128x128").data<float>(), ws.size() * 4), 0);
  // Row 7's first tile is all zeros: the amax floor gives it the scale 1e-4 / 448 and zero codes.
  EXPECT_EQ(xs[7 * tiles(K)], kMinAmax / kE4M3Max);
  for (int64_t k = 0; k < kTile; ++k) EXPECT_EQ(xq[7 * K + k], 0);
}

TEST(Fp8Gemm, ReferenceMatchesPyTorchsDequantizedMatmul) {
  const SafeTensors& st = fixture();
  const int64_t M = st.at("x").dim(0), K = st.at("x").dim(1), N = st.at("w").dim(0);
  const uint8_t* xq = st.at("x_q_bits").data<uint8_t>();
  const uint8_t* wq = st.at("w_q_bits").data<uint8_t>();
  const float* xs = st.at("x_scale_1x128").data<float>();
  const float* ws = st.at("w_scale_128x128").data<float>();
  const float* y_ref = st.at("y_ref_dequant").data<float>();

  std::vector<float> y(M * N), xd(M * K), wd(N * K), y_blas(M * N);
  cpu::gemm_nt_reference({xq, xs, M, K, 1}, {wq, ws, N, K, kTile}, y.data());
  cpu::dequantize(xq, xs, M, K, 1, xd.data());
  cpu::dequantize(wq, ws, N, K, kTile, wd.data());
  moerl::cpu::sgemm(false, true, M, N, K, 1.0f, xd.data(), K, wd.data(), K, 0.0f, y_blas.data(), N);

  // All three compute the same 640 products per output in FP32 but group and order the sums
  // differently (and PyTorch / BLAS round each dequantized operand once more). Rounding errors of a
  // K-term FP32 sum are bounded by about K * 2^-24 * sum_k |a_k b_k| and in practice are ~sqrt(K)
  // times smaller: 1e-6 of sum_k |a_k b_k| (about 17 ulps, ~sqrt(640) = 25 half-ulps) per element.
  // The scale is the sum of magnitudes, not |y|, because y may cancel to near zero.
  double worst = 0.0;
  for (int64_t m = 0; m < M; ++m) {
    for (int64_t n = 0; n < N; ++n) {
      double mag = 0.0;
      for (int64_t k = 0; k < K; ++k) mag += std::fabs(double{xd[m * K + k]} * wd[n * K + k]);
      const double e1 = std::fabs(double{y[m * N + n]} - y_ref[m * N + n]) / std::max(mag, 1e-30);
      const double e2 = std::fabs(double{y_blas[m * N + n]} - y_ref[m * N + n]) / std::max(mag, 1e-30);
      worst = std::max({worst, e1, e2});
    }
  }
  EXPECT_LT(worst, 1e-6);
  std::ostringstream text;
  text << worst;
  RecordProperty("worst_error_over_magnitude", text.str());
}

TEST(Fp8Gemm, RefusesOperandsOfDifferentK) {
  std::vector<uint8_t> codes(256);
  std::vector<float> scales(4, 1.0f), y(4);
  EXPECT_THROW(cpu::gemm_nt_reference({codes.data(), scales.data(), 2, 128, 1}, {codes.data(), scales.data(), 2, 64, 1},
                                      y.data()),
               Error);
  EXPECT_THROW(cpu::gemm_nt_reference({codes.data(), scales.data(), 2, 128, 2}, {codes.data(), scales.data(), 2, 128, 1},
                                      y.data()),
               Error);
}

TEST(Fp8Quantize, TransposedQuantizationEqualsQuantizingTheTranspose) {
  for (auto [rows, cols] : {std::pair<int64_t, int64_t>{256, 384}, {200, 70}, {1, 129}, {300, 33}}) {
    std::vector<float> x = random_normal(rows * cols, 3.0f, static_cast<uint32_t>(rows * 1000 + cols));
    std::vector<float> xt(cols * rows);
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t c = 0; c < cols; ++c) xt[c * rows + r] = x[r * cols + c];
    std::vector<uint8_t> q1(rows * cols, 0xAA), q2(rows * cols, 0x55);
    std::vector<float> s1(cols * tiles(rows), -1.0f), s2(cols * tiles(rows), -2.0f);
    cpu::quantize_1x128_transposed(x.data(), rows, cols, q1.data(), s1.data());
    cpu::quantize_1x128(xt.data(), cols, rows, q2.data(), s2.data());
    EXPECT_EQ(q1, q2) << rows << "x" << cols;
    EXPECT_EQ(s1, s2) << rows << "x" << cols;
  }
}

// Quantizes x [rows, cols] and the same matrix zero-padded to whole 128-tiles; the codes of the
// elements present and all scales must agree.
template <class Quantize>
void expect_partial_tiles_behave_as_zero_padding(int64_t rows, int64_t cols, int block_rows, Quantize quantize) {
  const int64_t prows = block_rows == 1 ? rows : tiles(rows) * kTile, pcols = tiles(cols) * kTile;
  std::vector<float> x = random_normal(rows * cols, 1.0f, 7), padded(prows * pcols, 0.0f);
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < cols; ++c) padded[r * pcols + c] = x[r * cols + c];
  const int64_t nscales = (block_rows == 1 ? rows : tiles(rows)) * tiles(cols);
  std::vector<uint8_t> q(rows * cols), pq(prows * pcols);
  std::vector<float> s(nscales), ps(nscales);
  quantize(x.data(), rows, cols, q.data(), s.data());
  quantize(padded.data(), prows, pcols, pq.data(), ps.data());
  EXPECT_EQ(s, ps);
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < cols; ++c) ASSERT_EQ(q[r * cols + c], pq[r * pcols + c]) << r << "," << c;
}

TEST(Fp8Quantize, PartialTilesBehaveAsZeroPadding) {
  expect_partial_tiles_behave_as_zero_padding(5, 200, 1, cpu::quantize_1x128);
  expect_partial_tiles_behave_as_zero_padding(200, 200, kTile, cpu::quantize_128x128);
  expect_partial_tiles_behave_as_zero_padding(130, 7, kTile, cpu::quantize_128x128);
}

TEST(Fp8Quantize, ScalesComeFromTheTileAmaxAndCodesFromATrueDivision) {
  // One row of 200: the first tile has amax 3 (at a negative entry), the partial second tile amax 0.5.
  std::vector<float> x = random_normal(200, 0.1f, 11);
  for (float& v : x) v = std::clamp(v, -0.4f, 0.4f);
  x[17] = -3.0f;
  x[150] = 0.5f;
  std::vector<uint8_t> q(200);
  std::vector<float> s(2);
  cpu::quantize_1x128(x.data(), 1, 200, q.data(), s.data());
  EXPECT_EQ(s[0], 3.0f / 448.0f);
  EXPECT_EQ(s[1], 0.5f / 448.0f);
  EXPECT_EQ(q[17], 0xFE);  // -amax maps to -448
  for (int i = 0; i < 200; ++i) EXPECT_EQ(q[i], e4m3_from_float(x[i] / s[i / kTile])) << i;

  std::vector<float> d(200);
  cpu::dequantize(q.data(), s.data(), 1, 200, 1, d.data());
  for (int i = 0; i < 200; ++i) {
    EXPECT_EQ(d[i], float_from_e4m3(q[i]) * s[i / kTile]) << i;
    // E4M3 keeps 3 mantissa bits: relative error <= 2^-4 for normals; subnormals err by <= 2^-10 * scale.
    EXPECT_LE(std::fabs(d[i] - x[i]), std::max(std::fabs(x[i]) / 16, s[i / kTile] * std::ldexp(1.0f, -10))) << i;
  }
}

TEST(Fp8Quantize, GivesTheSameBytesWithOneThreadOrMany) {
  const int64_t rows = 300, cols = 260;
  std::vector<float> x = random_normal(rows * cols, 2.0f, 3);
  auto run = [&](int threads) {
    omp_set_num_threads(threads);
    std::vector<uint8_t> a(rows * cols), b(rows * cols), c(rows * cols);
    std::vector<float> sa(rows * tiles(cols)), sb(tiles(rows) * tiles(cols)), sc(cols * tiles(rows));
    cpu::quantize_1x128(x.data(), rows, cols, a.data(), sa.data());
    cpu::quantize_128x128(x.data(), rows, cols, b.data(), sb.data());
    cpu::quantize_1x128_transposed(x.data(), rows, cols, c.data(), sc.data());
    return std::tuple{a, b, c, sa, sb, sc};
  };
  const int saved = omp_get_max_threads();
  const auto one = run(1);
  const auto many = run(4);
  omp_set_num_threads(saved);
  EXPECT_TRUE(one == many);
}

}  // namespace
}  // namespace moerl::fp8
