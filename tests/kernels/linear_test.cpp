#include "kernels/linear.hpp"

#include <gtest/gtest.h>

#include <cmath>
#include <random>
#include <vector>

#include "kernels/fp8.hpp"
#include "kernels/half.hpp"

namespace moerl {
namespace {

using Vec = std::vector<float>;

Vec random_normal(int64_t n, uint32_t seed, float sigma = 1.0f) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> dist(0.0f, sigma);
  Vec v(static_cast<size_t>(n));
  for (float& x : v) x = dist(rng);
  return v;
}

Vec transpose(const Vec& a, int64_t rows, int64_t cols) {
  Vec t(a.size());
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < cols; ++c) t[c * rows + r] = a[r * cols + c];
  return t;
}

Vec rounded_bf16(Vec v) {
  for (float& x : v) x = round_bf16(x);
  return v;
}

// Exact-ish y[M, N] = a[M, K] · b[N, K]ᵀ in double, with mag[m, n] = sum_k |a[m, k] b[n, k]|, the scale
// of the FP32 rounding errors of any summation order (used instead of |y|, which may cancel to ~0).
struct Naive {
  std::vector<double> y, mag;
};
Naive naive_nt(const Vec& a, const Vec& b, int64_t M, int64_t N, int64_t K) {
  Naive r{std::vector<double>(M * N), std::vector<double>(M * N)};
  for (int64_t m = 0; m < M; ++m)
    for (int64_t n = 0; n < N; ++n) {
      double s = 0, mag = 0;
      for (int64_t k = 0; k < K; ++k) {
        const double p = double{a[m * K + k]} * b[n * K + k];
        s += p;
        mag += std::fabs(p);
      }
      r.y[m * N + n] = s;
      r.mag[m * N + n] = mag;
    }
  return r;
}

// Largest |got - want| / (mag + |offset|) over all elements.
double worst_error(const Vec& got, const std::vector<double>& want, const std::vector<double>& mag,
                   const Vec* offset = nullptr) {
  double worst = 0;
  for (size_t i = 0; i < got.size(); ++i) {
    const double scale = mag[i] + (offset ? std::fabs((*offset)[i]) : 0.0);
    worst = std::max(worst, std::fabs(got[i] - want[i]) / std::max(scale, 1e-30));
  }
  return worst;
}

double relative_norm_error(const Vec& got, const Vec& want) {
  double num = 0, den = 0;
  for (size_t i = 0; i < got.size(); ++i) {
    num += (double{got[i]} - want[i]) * (double{got[i]} - want[i]);
    den += double{want[i]} * want[i];
  }
  return std::sqrt(num / den);
}

std::vector<double> plus(std::vector<double> v, const Vec& offset) {
  for (size_t i = 0; i < v.size(); ++i) v[i] += offset[i];
  return v;
}

// FP32 GEMMs against double loops: a K-term FP32 sum in any order errs by a few 2^-24 of sum |terms|
// in practice (the worst case, K * 2^-24, is not reached by random data): 1e-6 is ~17 ulps.
constexpr double kSummationTol = 1e-6;

// Shapes with no dimension a multiple of 128 and more than one tile in each, so partial tiles and
// several scales along every dimension are exercised.
constexpr int64_t M = 130, N = 200, K = 300;

struct Problem {
  Vec x = random_normal(M * K, 1), w = random_normal(N * K, 2, 0.05f), dy = random_normal(M * N, 3, 1e-3f);
  Vec dw0 = random_normal(N * K, 4, 1e-2f);  // dw accumulates into what is there
};

struct Results {
  Vec y, dx, dw;
};
Results run(Precision p, const Problem& pr) {
  Results r{Vec(M * N), Vec(M * K), pr.dw0};
  cpu::linear_forward(p, pr.x.data(), pr.w.data(), r.y.data(), M, N, K);
  cpu::linear_backward(p, pr.dy.data(), pr.x.data(), pr.w.data(), r.dx.data(), r.dw.data(), M, N, K);
  return r;
}

// The three GEMMs of a linear layer in "nt" form (both operands contracted along their rows):
//   y = x · wᵀ,  dx = dy · (wᵀ)ᵀ,  dw = dyᵀ · (xᵀ)ᵀ,
// checked against double loops over the given operands (possibly rounded copies).
void expect_matches_naive(const Results& got, const Vec& x, const Vec& w, const Vec& dy, const Vec& dw0) {
  const Naive y = naive_nt(x, w, M, N, K);
  const Naive dx = naive_nt(dy, transpose(w, N, K), M, K, N);
  const Naive dw = naive_nt(transpose(dy, M, N), transpose(x, M, K), N, K, M);
  EXPECT_LT(worst_error(got.y, y.y, y.mag), kSummationTol);
  EXPECT_LT(worst_error(got.dx, dx.y, dx.mag), kSummationTol);
  EXPECT_LT(worst_error(got.dw, plus(dw.y, dw0), dw.mag, &dw0), kSummationTol);
}

TEST(Linear, Fp32MatchesNaiveLoopsForwardAndBackward) {
  const Problem pr;
  expect_matches_naive(run(Precision::FP32, pr), pr.x, pr.w, pr.dy, pr.dw0);
}

TEST(Linear, Bf16MatchesNaiveLoopsOnBf16RoundedInputs) {
  const Problem pr;
  const Results bf16 = run(Precision::BF16, pr);
  expect_matches_naive(bf16, rounded_bf16(pr.x), rounded_bf16(pr.w), rounded_bf16(pr.dy), pr.dw0);
  // And the rounding did happen: BF16 keeps 8 significant bits (relative error ~2^-9 per input), far
  // above the FP32 summation tolerance.
  const Results fp32 = run(Precision::FP32, pr);
  EXPECT_GT(relative_norm_error(bf16.y, fp32.y), 1e-4);
  EXPECT_LT(relative_norm_error(bf16.y, fp32.y), 1e-2);
}

// An FP8 GEMM operand quantized by the reference functions, with its dequantized values.
struct Quantized {
  std::vector<uint8_t> codes;
  Vec scales, values;
  int64_t rows, cols;
  int block_rows;
  fp8::cpu::Operand operand() const { return {codes.data(), scales.data(), rows, cols, block_rows}; }
};
Quantized quantize(const Vec& a, int64_t rows, int64_t cols, int block_rows) {
  using fp8::tiles;
  Quantized q{std::vector<uint8_t>(rows * cols), Vec((block_rows == 1 ? rows : tiles(rows)) * tiles(cols)),
              Vec(rows * cols), rows, cols, block_rows};
  if (block_rows == 1) fp8::cpu::quantize_1x128(a.data(), rows, cols, q.codes.data(), q.scales.data());
  else fp8::cpu::quantize_128x128(a.data(), rows, cols, q.codes.data(), q.scales.data());
  fp8::cpu::dequantize(q.codes.data(), q.scales.data(), rows, cols, block_rows, q.values.data());
  return q;
}

// gemm_nt_reference(a, b) and the scale of its rounding errors, sum_k |deq a * deq b|.
struct Reference {
  Vec y;
  std::vector<double> y_double, mag;
};
Reference reference(const Quantized& a, const Quantized& b) {
  Reference r{Vec(a.rows * b.rows), {}, {}};
  fp8::cpu::gemm_nt_reference(a.operand(), b.operand(), r.y.data());
  r.y_double.assign(r.y.begin(), r.y.end());
  r.mag = naive_nt(a.values, b.values, a.rows, b.rows, a.cols).mag;
  return r;
}

// The fast FP8 path (dequantize, then sgemm) against the block-scaled GEMM reference on the same codes.
// Both form the same exact products of E4M3 values (4 significant bits each) times scales; they differ by
// one FP32 rounding of each dequantized operand (2^-24 relative) and the summation order, each a few
// 2^-24 of sum |terms|: the FP32 summation tolerance applies.
TEST(Linear, Fp8ForwardEqualsTheBlockScaledGemmReference) {
  const Problem pr;
  const Results got = run(Precision::FP8, pr);
  const Reference ref = reference(quantize(pr.x, M, K, 1), quantize(pr.w, N, K, fp8::kTile));
  EXPECT_LT(worst_error(got.y, ref.y_double, ref.mag), kSummationTol);
}

TEST(Linear, Fp8DgradEqualsTheBlockScaledGemmReference) {
  // dx = dy · w: dy in 1x128 tiles along N, and wᵀ [K, N] in 128x128 blocks — the blocks of w, transposed.
  const Problem pr;
  const Results got = run(Precision::FP8, pr);
  const Quantized w = quantize(pr.w, N, K, fp8::kTile);
  const Quantized wt = quantize(transpose(pr.w, N, K), K, N, fp8::kTile);
  for (int64_t n = 0; n < N; ++n)
    for (int64_t k = 0; k < K; ++k) ASSERT_EQ(w.codes[n * K + k], wt.codes[k * N + n]);
  const Reference ref = reference(quantize(pr.dy, M, N, 1), wt);
  EXPECT_LT(worst_error(got.dx, ref.y_double, ref.mag), kSummationTol);
}

TEST(Linear, Fp8WgradEqualsTheBlockScaledGemmReference) {
  // dw += dyᵀ · x: dyᵀ [N, M] and xᵀ [K, M] each in 1x128 tiles along the tokens M (M = 130: a partial tile).
  const Problem pr;
  const Results got = run(Precision::FP8, pr);
  const Reference ref = reference(quantize(transpose(pr.dy, M, N), N, M, 1), quantize(transpose(pr.x, M, K), K, M, 1));
  EXPECT_LT(worst_error(got.dw, plus(ref.y_double, pr.dw0), ref.mag, &pr.dw0), kSummationTol);
}

TEST(Linear, Fp8StaysWithinAFewPercentOfFp32OnRandomNormalData) {
  // E4M3 keeps 4 significant bits: a value's relative rounding error is uniform within +-2^-4 of its
  // binade start, RMS ~2.6% of the value; a product of two independently rounded operands ~3.7%, and
  // so is a sum of many such products. Below 1% would mean no quantization happened, above 6% a bug.
  const Problem pr;
  const Results fp8 = run(Precision::FP8, pr), fp32 = run(Precision::FP32, pr);
  Vec dw8 = fp8.dw, dw32 = fp32.dw;  // the accumulated part only
  for (size_t i = 0; i < dw8.size(); ++i) { dw8[i] -= pr.dw0[i]; dw32[i] -= pr.dw0[i]; }
  for (const auto& [name, e] : {std::pair{"y", relative_norm_error(fp8.y, fp32.y)},
                                {"dx", relative_norm_error(fp8.dx, fp32.dx)},
                                {"dw", relative_norm_error(dw8, dw32)}}) {
    EXPECT_GT(e, 0.01) << name;
    EXPECT_LT(e, 0.06) << name;
  }
}

TEST(Linear, GivesIdenticalResultsWhenCalledAgainAfterOtherShapes) {
  // Scratch buffers are reused across calls: a call of another shape in between must leave no trace.
  const Problem pr;
  for (Precision p : {Precision::BF16, Precision::FP8}) {
    const Results first = run(p, pr);
    Vec small_y(3 * 5);
    const Vec sx = random_normal(3 * 7, 9), sw = random_normal(5 * 7, 10);
    cpu::linear_forward(p, sx.data(), sw.data(), small_y.data(), 3, 5, 7);
    const Results again = run(p, pr);
    EXPECT_EQ(first.y, again.y) << precision_name(p);
    EXPECT_EQ(first.dx, again.dx) << precision_name(p);
    EXPECT_EQ(first.dw, again.dw) << precision_name(p);
  }
}

TEST(Linear, SkipsTheGradientsItIsNotAskedFor) {
  const Problem pr;
  for (Precision p : {Precision::FP32, Precision::BF16, Precision::FP8}) {
    const Results both = run(p, pr);
    Vec dx(M * K), dw = pr.dw0;
    cpu::linear_backward(p, pr.dy.data(), pr.x.data(), pr.w.data(), dx.data(), nullptr, M, N, K);
    cpu::linear_backward(p, pr.dy.data(), pr.x.data(), pr.w.data(), nullptr, dw.data(), M, N, K);
    EXPECT_EQ(dx, both.dx) << precision_name(p);
    EXPECT_EQ(dw, both.dw) << precision_name(p);
  }
}

TEST(Precision, NamesRoundTripAndUnknownNamesAreRefused) {
  for (Precision p : {Precision::FP32, Precision::BF16, Precision::FP8}) {
    Precision parsed{};
    ASSERT_TRUE(parse_precision(precision_name(p), &parsed));
    EXPECT_EQ(parsed, p);
  }
  Precision parsed = Precision::FP32;
  EXPECT_FALSE(parse_precision("fp16", &parsed));
  EXPECT_FALSE(parse_precision("FP8", &parsed));
  EXPECT_EQ(parsed, Precision::FP32);
}

}  // namespace
}  // namespace moerl
