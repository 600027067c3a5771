// GPU tests of the grouped FP8 GEMMs (kernels/cuda/fp8_grouped_gemm.hpp) against fp8::cpu::gemm_nt_reference per
// group: the rows form (Fprop / Dgrad: groups of rows, a stacked weight per group, one or two terms, one or two
// problems per launch) and the tokens form (Wgrad: each group's packed transposed codes, accumulated). Groups with
// no rows, partial tiles along N, M and K, even and odd numbers of N tiles, tiles of more steps than the ring has
// stages. Fresh seed per run (printed; MOERL_TEST_SEED=<n> repeats it), outputs poisoned with NaN first. Every
// pipeline of the kernel (GroupedKernel::Tma, ::Specialized, ::Synchronous) is checked and they must agree bit for
// bit (same sums in the same order). Timing lines at bench-600m's expert shapes and at the MoE layer bench's
// (T=16384, hidden 2048, moe_intermediate 1408, 64 experts top-6).
//
// Tolerance (relative L2 error, NaN fails): both sides multiply the same codes and scales; they differ by the order
// of the FP32 sums and the tensor cores' accumulation inside a 128-group (about 2^-14 relative on H100-class
// parts, DeepSeek-V3 §3.3.2), so rel_l2 < 1e-3 (as tests/gpu/linear_gpu.cpp's single GEMMs; measured there 1.3e-4).
// Measured on the H200: the mma.sync kernel 5e-8 (d902903), the WGMMA kernel 1.2e-4 in both forms (WGMMA's FP8
// products are summed inside a 128-group with fewer mantissa bits than FP32: the 2^-14 above; the limit stands).
// A wrong group's rows, weight or scales gives errors of order 1.
#include <cuda_runtime_api.h>
#include <gtest/gtest.h>

#include <cmath>
#include <cstdio>
#include <random>
#include <vector>

#include "kernels/cuda/cuda_check.hpp"
#include "kernels/cuda/fp8_grouped_gemm.hpp"
#include "kernels/fp8.hpp"
#include "kernels/fp8_gemm.hpp"
#include "tests/gpu/moe_gpu_support.hpp"

namespace moerl {
namespace {

using moe_gpu_test::DeviceBuffer;
using moe_gpu_test::normal_values;
using moe_gpu_test::rel_l2;
using moe_gpu_test::run_seed;
using Fp8GroupedGemmGpu = moe_gpu_test::GpuTest;


int64_t round128(int64_t n) { return (n + 127) / 128 * 128; }

constexpr fp8::cuda::GroupedKernel kKernels[] = {
    fp8::cuda::GroupedKernel::Tma, fp8::cuda::GroupedKernel::Specialized, fp8::cuda::GroupedKernel::Synchronous};
const char* kernel_name(fp8::cuda::GroupedKernel k) {
  if (k == fp8::cuda::GroupedKernel::Tma) return "tma";
  return k == fp8::cuda::GroupedKernel::Specialized ? "specialized" : "sync";
}

std::vector<int64_t> bounds_of(const std::vector<int64_t>& counts) {
  std::vector<int64_t> b(counts.size() + 1, 0);
  for (size_t g = 0; g < counts.size(); ++g) b[g + 1] = b[g] + round128(counts[g]);
  return b;
}

// Rows [rows, k] quantized 1x128 along k (the CPU layout), group g's real rows with magnitude 2^(g % 3), the rest 0.
struct RowsOperand {
  std::vector<uint8_t> codes;
  std::vector<float> scales;  // [rows, tiles(k)]
};

RowsOperand make_rows(const std::vector<int64_t>& counts, const std::vector<int64_t>& bounds, int64_t k,
                      std::mt19937_64& rng) {
  const int64_t rows = bounds.back();
  std::vector<float> x(static_cast<size_t>(rows * k), 0.0f);
  for (size_t g = 0; g < counts.size(); ++g) {
    const std::vector<float> v = normal_values(static_cast<size_t>(counts[g] * k), std::ldexp(1.0f, static_cast<int>(g % 3)), rng);
    std::copy(v.begin(), v.end(), x.begin() + bounds[g] * k);
  }
  RowsOperand o{std::vector<uint8_t>(x.size()), std::vector<float>(static_cast<size_t>(rows * fp8::tiles(k)))};
  fp8::cpu::quantize_1x128(x.data(), rows, k, o.codes.data(), o.scales.data());
  return o;
}

// groups weights [n, k] in 128x128 blocks: codes stacked, CPU scales per group and cuBLASLt BLK scales stacked.
struct StackedWeight {
  std::vector<uint8_t> codes;
  std::vector<std::vector<float>> cpu_scales;
  std::vector<float> lt_scales;
};

StackedWeight make_weight(int64_t groups, int64_t n, int64_t k, std::mt19937_64& rng) {
  StackedWeight w;
  w.codes.resize(static_cast<size_t>(groups * n * k));
  const int64_t lt = fp8::cuda::cublaslt_scale_count(n, k, 128);
  w.lt_scales.resize(static_cast<size_t>(groups * lt));
  for (int64_t g = 0; g < groups; ++g) {
    const std::vector<float> v = normal_values(static_cast<size_t>(n * k), 0.05f * (1 + g % 4), rng);
    std::vector<float> s(static_cast<size_t>(fp8::tiles(n) * fp8::tiles(k)));
    fp8::cpu::quantize_128x128(v.data(), n, k, w.codes.data() + g * n * k, s.data());
    fp8::cuda::scales_to_cublaslt_host(s.data(), n, k, 128, w.lt_scales.data() + g * lt);
    w.cpu_scales.push_back(s);
  }
  return w;
}

// Rows form with N output columns, terms of K0 and K1: every pipeline against the CPU reference and bit for bit
// against each other.
void check_rows_form(int64_t N, int64_t K0, int64_t K1, std::mt19937_64& rng) {
  const std::vector<int64_t> counts = {130, 0, 77, 256, 5, 300};
  const int64_t G = static_cast<int64_t>(counts.size());
  const std::vector<int64_t> bounds = bounds_of(counts);
  const int64_t rows = bounds.back();
  const RowsOperand a0 = make_rows(counts, bounds, K0, rng), a1 = make_rows(counts, bounds, K1, rng);
  const StackedWeight w0 = make_weight(G, N, K0, rng), w1 = make_weight(G, N, K1, rng);

  // CPU: per group, y = a0 · w0ᵀ (problem 0) and y = a0 · w0ᵀ + a1 · w1ᵀ (problem 1, two terms).
  std::vector<float> ref0(static_cast<size_t>(rows * N), 0.0f), ref1 = ref0;
  for (int64_t g = 0; g < G; ++g) {
    const int64_t n = bounds[g + 1] - bounds[g];
    if (n == 0) continue;
    std::vector<float> t0(static_cast<size_t>(n * N)), t1(t0.size());
    fp8::cpu::gemm_nt_reference(
        {a0.codes.data() + bounds[g] * K0, a0.scales.data() + bounds[g] * fp8::tiles(K0), n, K0, 1},
        {w0.codes.data() + g * N * K0, w0.cpu_scales[g].data(), N, K0, 128}, t0.data());
    fp8::cpu::gemm_nt_reference(
        {a1.codes.data() + bounds[g] * K1, a1.scales.data() + bounds[g] * fp8::tiles(K1), n, K1, 1},
        {w1.codes.data() + g * N * K1, w1.cpu_scales[g].data(), N, K1, 128}, t1.data());
    for (int64_t i = 0; i < n * N; ++i) {
      ref0[bounds[g] * N + i] = t0[i];
      ref1[bounds[g] * N + i] = t0[i] + t1[i];
    }
  }

  DeviceBuffer<uint8_t> da0(a0.codes), da1(a1.codes), dw0(w0.codes), dw1(w1.codes);
  DeviceBuffer<float> ds0(a0.scales), ds1(a1.scales), dws0(w0.lt_scales), dws1(w1.lt_scales);
  DeviceBuffer<int64_t> db(bounds);
  // Rows past bounds[G] (max_rows larger than the groups) stay untouched: the poison there must survive.
  const int64_t max_rows = rows + 256;
  DeviceBuffer<float> y0(max_rows * N), y1(max_rows * N);
  fp8::cuda::GroupedProblem pr[2];
  const fp8::cuda::GroupedTerm t0{da0.get(), ds0.get(), dw0.get(), dws0.get(), K0};
  const fp8::cuda::GroupedTerm t1{da1.get(), ds1.get(), dw1.get(), dws1.get(), K1};
  pr[0].terms[0] = t0, pr[0].y = y0.get();
  pr[1].terms[0] = t0, pr[1].terms[1] = t1, pr[1].n_terms = 2, pr[1].y = y1.get();
  std::vector<float> first0, first1;
  for (const fp8::cuda::GroupedKernel kernel : kKernels) {
    y0.poison(), y1.poison();
    fp8::cuda::grouped_gemm_nt_rows(pr, 2, db.get(), G, max_rows, N, nullptr, kernel);
    CUDA_CHECK(cudaDeviceSynchronize());
    std::vector<float> got0 = y0.download(), got1 = y1.download();
    for (int64_t i = rows * N; i < max_rows * N; ++i) ASSERT_TRUE(std::isnan(got0[i])) << "row past the groups written";
    got0.resize(static_cast<size_t>(rows * N)), got1.resize(static_cast<size_t>(rows * N));
    const double e0 = rel_l2(got0, ref0), e1 = rel_l2(got1, ref1);
    std::printf("[ grouped  ] %s rows form N=%lld K=%lld: rel_l2 %.3e; two terms (+K=%lld): %.3e (limit 1e-3)\n",
                kernel_name(kernel), static_cast<long long>(N), static_cast<long long>(K0), e0,
                static_cast<long long>(K1), e1);
    EXPECT_LT(e0, 1e-3);
    EXPECT_LT(e1, 1e-3);
    // Zero rows (padding of each group) give exact zeros.
    for (int64_t g = 0; g < G; ++g)
      for (int64_t r = bounds[g] + counts[g]; r < bounds[g + 1]; ++r)
        for (int64_t j = 0; j < N; ++j) ASSERT_EQ(got1[r * N + j], 0.0f) << "zero row " << r;
    if (first0.empty()) {
      first0 = got0, first1 = got1;
    } else {
      EXPECT_TRUE(got0 == first0 && got1 == first1)
          << kernel_name(kernel) << " differs bit for bit from " << kernel_name(kKernels[0]) << ", N=" << N;
    }
  }
}

TEST_F(Fp8GroupedGemmGpu, RowsFormMatchesTheCpuReferencePerGroup) {
  std::mt19937_64 rng(run_seed() + 71);
  // 2 N tiles, the second partial; 3 + 2 steps a tile (K0's last step partial: 64 of 128 bytes).
  check_rows_form(208, 320, 256, rng);
  // 3 N tiles, the third partial; 8 + 2 steps a tile: the 6-stage ring wraps inside a tile (the producers wait on
  // its empty barriers).
  check_rows_form(336, 960, 256, rng);
}

TEST_F(Fp8GroupedGemmGpu, TokensFormAccumulatesTheCpuReferencePerGroup) {
  std::mt19937_64 rng(run_seed() + 73);
  const std::vector<int64_t> counts = {130, 0, 77, 256, 5, 300};
  const int64_t G = static_cast<int64_t>(counts.size()), M = 208, N = 144;  // partial M and N tiles
  const std::vector<int64_t> bounds = bounds_of(counts);
  const int64_t rows = bounds.back(), TR = fp8::tiles(rows);
  // Per group: dy [n_g, M] and x [n_g, N] (zero rows to the group's aligned end), quantized along tokens.
  std::vector<uint8_t> a_codes(static_cast<size_t>(rows * M)), b_codes(static_cast<size_t>(rows * N));
  std::vector<float> a_scales(static_cast<size_t>(M * TR), 0.0f), b_scales(static_cast<size_t>(N * TR), 0.0f);
  const std::vector<float> y0 = normal_values(static_cast<size_t>(G * M * N), 1.0f, rng);
  std::vector<float> ref = y0;
  for (int64_t g = 0; g < G; ++g) {
    const int64_t n = bounds[g + 1] - bounds[g];
    if (n == 0) continue;
    auto quantize = [&](int64_t d, float mag, std::vector<uint8_t>& codes, std::vector<float>& scales) {
      std::vector<float> v(static_cast<size_t>(n * d), 0.0f);
      const std::vector<float> real = normal_values(static_cast<size_t>(counts[g] * d), mag, rng);
      std::copy(real.begin(), real.end(), v.begin());
      std::vector<float> s(static_cast<size_t>(d * (n / 128)));
      fp8::cpu::quantize_1x128_transposed(v.data(), n, d, codes.data() + bounds[g] * d, s.data());
      for (int64_t c = 0; c < d; ++c)
        for (int64_t kb = 0; kb < n / 128; ++kb) scales[c * TR + bounds[g] / 128 + kb] = s[c * (n / 128) + kb];
      return s;
    };
    const std::vector<float> sa = quantize(M, std::ldexp(1.0f, static_cast<int>(g % 3)), a_codes, a_scales);
    const std::vector<float> sb = quantize(N, 0.5f, b_codes, b_scales);
    std::vector<float> t(static_cast<size_t>(M * N));
    fp8::cpu::gemm_nt_reference({a_codes.data() + bounds[g] * M, sa.data(), M, n, 1},
                                {b_codes.data() + bounds[g] * N, sb.data(), N, n, 1}, t.data());
    for (int64_t i = 0; i < M * N; ++i) ref[g * M * N + i] += t[i];
  }
  DeviceBuffer<uint8_t> da(a_codes), dbc(b_codes);
  DeviceBuffer<float> dsa(a_scales), dsb(b_scales), dy(y0);
  DeviceBuffer<int64_t> dbounds(bounds);
  fp8::cuda::GroupedProblem pr;
  pr.terms[0] = fp8::cuda::GroupedTerm{da.get(), dsa.get(), dbc.get(), dsb.get(), 0}, pr.y = dy.get();
  std::vector<float> first;
  for (const fp8::cuda::GroupedKernel kernel : kKernels) {
    dy.upload(y0);
    fp8::cuda::grouped_gemm_nt_tokens_accumulate(&pr, 1, dbounds.get(), G, rows, M, N, nullptr, kernel);
    CUDA_CHECK(cudaDeviceSynchronize());
    const std::vector<float> got = dy.download();
    // The empty group's output is untouched, bit for bit.
    for (int64_t i = 0; i < M * N; ++i) ASSERT_EQ(got[1 * M * N + i], y0[1 * M * N + i]) << "empty group written";
    const double err = rel_l2(got, ref);
    std::printf("[ grouped  ] %s tokens form M=%lld N=%lld: rel_l2 %.3e (limit 1e-3)\n", kernel_name(kernel),
                static_cast<long long>(M), static_cast<long long>(N), err);
    EXPECT_LT(err, 1e-3);
    if (first.empty()) first = got; else EXPECT_TRUE(got == first) << "the pipelines differ bit for bit";
  }
  // overwrite: the non-empty groups' outputs are the products alone (the same bits as added to zero), the empty
  // group's untouched.
  std::vector<float> y_zero = y0;
  for (int64_t g = 0; g < G; ++g)
    if (bounds[g + 1] > bounds[g]) std::fill_n(y_zero.begin() + g * M * N, M * N, 0.0f);
  dy.upload(y_zero);
  fp8::cuda::grouped_gemm_nt_tokens_accumulate(&pr, 1, dbounds.get(), G, rows, M, N, nullptr);
  const std::vector<float> added = dy.download();
  dy.upload(y0);
  fp8::cuda::grouped_gemm_nt_tokens_accumulate(&pr, 1, dbounds.get(), G, rows, M, N, nullptr,
                                               fp8::cuda::GroupedKernel::Default, true);
  EXPECT_TRUE(dy.download() == added) << "overwrite differs from adding to zeroed outputs";
}

// Random codes (finite E4M3 of either sign; the weights' smaller) and scales 1e-3: timing inputs.
std::vector<uint8_t> random_codes(int64_t n, int mask, std::mt19937_64& rng) {
  std::vector<uint8_t> codes(static_cast<size_t>(n));
  std::uniform_int_distribution<int> byte(0, 0x7E);
  for (uint8_t& c : codes) c = static_cast<uint8_t>((byte(rng) & mask) | (rng() & 1 ? 0x80 : 0));
  return codes;
}

std::vector<int64_t> random_counts(int64_t groups, int64_t lo, int64_t hi, std::mt19937_64& rng) {
  std::vector<int64_t> counts(static_cast<size_t>(groups));
  std::uniform_int_distribution<int64_t> spread(lo, hi);
  for (int64_t& c : counts) c = spread(rng);
  return counts;
}

// Rows form: problems x (rows x n x k) with the given groups, one line per pipeline. Diagnostic, no threshold.
void time_rows(const char* what, const std::vector<int64_t>& counts, int problems, int64_t n, int64_t k,
               std::mt19937_64& rng) {
  const int64_t G = static_cast<int64_t>(counts.size());
  const std::vector<int64_t> bounds = bounds_of(counts);
  const int64_t rows = bounds.back();
  DeviceBuffer<uint8_t> da(random_codes(rows * k, 0x7F, rng)), dw(random_codes(G * n * k, 0x3F, rng));
  DeviceBuffer<float> ds(std::vector<float>(static_cast<size_t>(rows * fp8::tiles(k)), 1e-3f));
  DeviceBuffer<float> dws(std::vector<float>(static_cast<size_t>(G * fp8::cuda::cublaslt_scale_count(n, k, 128)),
                                             1e-3f));
  DeviceBuffer<int64_t> db(bounds);
  DeviceBuffer<float> y0(rows * n), y1(rows * n);
  fp8::cuda::GroupedProblem pr[2];
  pr[0].terms[0] = fp8::cuda::GroupedTerm{da.get(), ds.get(), dw.get(), dws.get(), k}, pr[0].y = y0.get();
  pr[1] = pr[0], pr[1].y = y1.get();
  for (const fp8::cuda::GroupedKernel kernel : kKernels) {
    const double ms = moe_gpu_test::median_ms(
        [&] { fp8::cuda::grouped_gemm_nt_rows(pr, problems, db.get(), G, rows, n, nullptr, kernel); });
    const double flop = 2.0 * problems * static_cast<double>(rows) * n * k;
    std::printf("[ grouped  ] %s %s: rows %lld x N %lld x K %lld x %d, %.3f ms, %.0f TFLOP/s\n", kernel_name(kernel),
                what, static_cast<long long>(rows), static_cast<long long>(n), static_cast<long long>(k), problems, ms,
                flop / ms * 1e-9);
    for (const float v : y0.download()) ASSERT_TRUE(std::isfinite(v));
  }
}

// Tokens form (Wgrad, dW [m, n] per group, K = each group's rows), gate and up in one launch, one line per pipeline.
// Diagnostic, no threshold.
void time_tokens(const char* what, const std::vector<int64_t>& counts, int64_t m, int64_t n, std::mt19937_64& rng) {
  const int64_t G = static_cast<int64_t>(counts.size());
  const std::vector<int64_t> bounds = bounds_of(counts);
  const int64_t rows = bounds.back(), TR = fp8::tiles(rows);
  DeviceBuffer<uint8_t> da(random_codes(rows * m, 0x7F, rng)), dbc(random_codes(rows * n, 0x3F, rng));
  DeviceBuffer<float> dsa(std::vector<float>(static_cast<size_t>(m * TR), 1e-3f)),
      dsb(std::vector<float>(static_cast<size_t>(n * TR), 1e-3f));
  DeviceBuffer<int64_t> db(bounds);
  DeviceBuffer<float> w0(std::vector<float>(static_cast<size_t>(G * m * n), 0.0f)),
      w1(std::vector<float>(static_cast<size_t>(G * m * n), 0.0f));
  fp8::cuda::GroupedProblem pr[2];
  pr[0].terms[0] = fp8::cuda::GroupedTerm{da.get(), dsa.get(), dbc.get(), dsb.get(), 0}, pr[0].y = w0.get();
  pr[1] = pr[0], pr[1].y = w1.get();
  for (const fp8::cuda::GroupedKernel kernel : kKernels) {
    const double ms = moe_gpu_test::median_ms(
        [&] { fp8::cuda::grouped_gemm_nt_tokens_accumulate(pr, 2, db.get(), G, rows, m, n, nullptr, kernel); });
    const double flop = 2.0 * 2 * static_cast<double>(rows) * m * n;
    std::printf("[ grouped  ] %s %s wgrad gate+up: M %lld x N %lld x rows %lld x 2, %.3f ms, %.0f TFLOP/s\n",
                kernel_name(kernel), what, static_cast<long long>(m), static_cast<long long>(n),
                static_cast<long long>(rows), ms, flop / ms * 1e-9);
  }
  for (const float v : w0.download()) ASSERT_TRUE(std::isfinite(v));
}

// bench-600m's routed experts (32 experts, T·k = 65536 rows, H = 1024, I = 704), gate and up in one launch: Fprop
// and Wgrad.
TEST_F(Fp8GroupedGemmGpu, TimesTheBench600mProjections) {
  std::mt19937_64 rng(run_seed() + 79);
  const std::vector<int64_t> counts = random_counts(32, 1700, 2400, rng);
  time_rows("bench-600m gate+up", counts, 2, 704, 1024, rng);
  time_tokens("bench-600m", counts, 704, 1024, rng);
}

// The MoE layer bench's routed experts (64 experts, T·k = 98304 rows, H = 2048, I = 1408): Fprop of gate+up and of
// down, and the Wgrad of gate+up (tokens form, dW [I, H] per expert, K = each expert's rows).
TEST_F(Fp8GroupedGemmGpu, TimesTheMoeLayerBenchProjections) {
  std::mt19937_64 rng(run_seed() + 83);
  const std::vector<int64_t> counts = random_counts(64, 1200, 1872, rng);
  time_rows("moe-layer gate+up", counts, 2, 1408, 2048, rng);
  time_rows("moe-layer down", counts, 1, 2048, 1408, rng);
  time_tokens("moe-layer", counts, 1408, 2048, rng);
}

}  // namespace
}  // namespace moerl
