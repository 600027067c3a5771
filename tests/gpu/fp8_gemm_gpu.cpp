// fp8::cuda::gemm_nt (cuBLASLt block-scaled FP8) against fp8::cpu::gemm_nt_reference on the same codes.
// Random data with a fresh seed each run (printed; MOERL_TEST_SEED=<n> repeats a run). Every tile or block
// gets its own magnitude 2^e, e in [-4, 4], so a scale read from the wrong place changes the result by
// factors of 2 or more instead of hiding in the noise.
//
// Tolerances. Products of E4M3 codes are exact in FP32; the GPU sums each 128-wide group on the tensor
// cores (fewer than 24 accumulator bits: DeepSeek-V3 reports about 14) and promotes to FP32 per group,
// in an order that differs from the reference's. Two checks per element set:
//   - relative L2 error ||gpu - ref|| / ||ref|| < 2e-3 for FP32 output, 4e-3 for BF16 output (unit
//     roundoff 2^-8: BF16 has 8 significand bits; its rounding alone gives 1.67e-3 on this data, as
//     DEPS.md measured 1.7e-3 on the H200).
//   - every element: |gpu - ref| <= u_out * |ref| + 2^-8 * absref, absref = the same GEMM on |codes|
//     (sum of |terms|, the scale of any summation error), u_out = 2^-8 for BF16 output, 0 for FP32.
//     Catches NaN (the output is poisoned with NaN first, so an unwritten element fails) and isolated
//     wrong elements.
// Where the limits come from: a CPU emulation of the GPU on 256x384x640 of this data (group sums in
// reverse order, truncated to 14 significand bits after every addition: pessimistic) gave rel_l2 5.1e-4
// (FP32 out) / 1.74e-3 (BF16 out) and worst element 0.14 / 0.33 of its tolerance; 13 bits 1.5e-3 /
// 2.3e-3; 12 bits would fail. One scale taken from the neighbouring K tile gave rel_l2 1.25.
#include <gtest/gtest.h>

#include <cuda_runtime.h>

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <tuple>
#include <vector>

#include "kernels/cuda/cuda_check.hpp"
#include "kernels/fp8.hpp"
#include "kernels/fp8_gemm.hpp"
#include "runtime/error.hpp"
#include "tests/gpu/gpu_test_support.hpp"

namespace moerl::fp8 {
namespace {

using cuda::OutType;

uint64_t fresh_seed(const char* what) {
  uint64_t seed = 0;
  if (const char* env = std::getenv("MOERL_TEST_SEED"))
    seed = std::strtoull(env, nullptr, 10);
  else
    seed = (uint64_t{std::random_device{}()} << 32) | std::random_device{}();
  std::printf("[   seed   ] %s: %llu (MOERL_TEST_SEED=%llu repeats it)\n", what, static_cast<unsigned long long>(seed),
              static_cast<unsigned long long>(seed));
  return seed;
}

using gpu_test::DeviceBuffer;

// A quantized operand on the host, scales in the CPU layout [ceil(rows / block_rows), tiles(cols)].
struct HostOperand {
  int64_t rows = 0, cols = 0;
  int block_rows = 1;
  std::vector<uint8_t> codes;
  std::vector<float> scales;
  cpu::Operand view() const { return {codes.data(), scales.data(), rows, cols, block_rows}; }
};

// Normal values times 2^e per tile (block_rows x 128), e uniform in [-4, 4]; quantized on the CPU.
HostOperand random_operand(int64_t rows, int64_t cols, int block_rows, std::mt19937_64& rng) {
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::uniform_int_distribution<int> exponent(-4, 4);
  const int64_t row_tiles = (rows + block_rows - 1) / block_rows, T = tiles(cols);
  std::vector<float> magnitude(static_cast<size_t>(row_tiles * T));
  for (float& m : magnitude) m = std::ldexp(1.0f, exponent(rng));
  std::vector<float> x(static_cast<size_t>(rows * cols));
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < cols; ++c)
      x[static_cast<size_t>(r * cols + c)] = normal(rng) * magnitude[static_cast<size_t>((r / block_rows) * T + c / kTile)];
  HostOperand o{rows, cols, block_rows, std::vector<uint8_t>(x.size()),
                std::vector<float>(static_cast<size_t>(row_tiles * T))};
  if (block_rows == 1)
    cpu::quantize_1x128(x.data(), rows, cols, o.codes.data(), o.scales.data());
  else
    cpu::quantize_128x128(x.data(), rows, cols, o.codes.data(), o.scales.data());
  return o;
}

// Same operand with |codes| (sign bit cleared): its GEMM is the sum of |terms| of each output.
HostOperand absolute(const HostOperand& o) {
  HostOperand a = o;
  for (uint8_t& c : a.codes) c &= 0x7F;
  return a;
}

// Rows `rows` of a 1x128-tiled operand (tiles are per row, so the scales come along row by row).
HostOperand select_rows(const HostOperand& o, const std::vector<int64_t>& rows) {
  EXPECT_EQ(o.block_rows, 1);
  const int64_t T = tiles(o.cols);
  HostOperand s{static_cast<int64_t>(rows.size()), o.cols, 1, {}, {}};
  for (int64_t r : rows) {
    s.codes.insert(s.codes.end(), o.codes.begin() + r * o.cols, o.codes.begin() + (r + 1) * o.cols);
    s.scales.insert(s.scales.end(), o.scales.begin() + r * T, o.scales.begin() + (r + 1) * T);
  }
  return s;
}

// The operand on the device, scales converted to cuBLASLt's layout on the host.
struct DeviceOperand {
  explicit DeviceOperand(const HostOperand& h)
      : rows(h.rows), cols(h.cols), block_rows(h.block_rows), codes(h.codes.size()),
        scales(static_cast<size_t>(cuda::cublaslt_scale_count(h.rows, h.cols, h.block_rows))) {
    std::vector<float> s(static_cast<size_t>(cuda::cublaslt_scale_count(rows, cols, block_rows)));
    cuda::scales_to_cublaslt_host(h.scales.data(), rows, cols, block_rows, s.data());
    codes.upload(h.codes);
    scales.upload(s);
    // A pageable upload may return before its DMA lands; kernels on other streams must see the data.
    CUDA_CHECK(cudaDeviceSynchronize());
  }
  cuda::Operand view() const { return {codes.get(), scales.get(), rows, cols, block_rows}; }
  int64_t rows, cols;
  int block_rows;
  DeviceBuffer<uint8_t> codes;
  DeviceBuffer<float> scales;
};

size_t out_bytes(OutType out) { return out == OutType::BF16 ? 2 : 4; }

std::vector<float> to_float(const std::vector<uint8_t>& raw, OutType out) {
  std::vector<float> y(raw.size() / out_bytes(out));
  for (size_t i = 0; i < y.size(); ++i) {
    if (out == OutType::BF16) {
      uint16_t h;
      std::memcpy(&h, raw.data() + 2 * i, 2);
      y[i] = std::bit_cast<float>(uint32_t{h} << 16);
    } else {
      std::memcpy(&y[i], raw.data() + 4 * i, 4);
    }
  }
  return y;
}

// Runs the GEMM into a NaN-poisoned output (0xFF bytes are NaN in BF16 and FP32) and returns it as FP32.
std::vector<float> run_gpu(cuda::GemmContext& ctx, const cuda::Operand& a, const cuda::Operand& b, OutType out,
                           cudaStream_t stream = nullptr, size_t y_offset_bytes = 0) {
  const size_t bytes = static_cast<size_t>(a.rows * b.rows) * out_bytes(out);
  DeviceBuffer<uint8_t> y(bytes + y_offset_bytes);
  CUDA_CHECK(cudaMemsetAsync(y.get(), 0xFF, bytes + y_offset_bytes, stream));
  cuda::gemm_nt(ctx, a, b, y.get() + y_offset_bytes, out, stream);
  CUDA_CHECK(cudaStreamSynchronize(stream));
  std::vector<uint8_t> raw = y.download();
  raw.erase(raw.begin(), raw.begin() + static_cast<std::ptrdiff_t>(y_offset_bytes));
  return to_float(raw, out);
}

struct Comparison {
  double rel_l2 = 0;       // ||gpu - ref|| / ||ref||
  double worst = 0;        // max |gpu - ref| / element tolerance (<= 1 passes)
  int64_t worst_index = -1;
  int64_t nonfinite = 0;   // GPU elements that are NaN or Inf (unwritten: still the poison)
};

// gpu and ref hold the same rows x N elements; absref is the reference GEMM on |codes|.
Comparison compare(const std::vector<float>& gpu, const std::vector<float>& ref, const std::vector<float>& absref,
                   OutType out) {
  const double u_out = out == OutType::BF16 ? std::ldexp(1.0, -8) : 0.0;
  const double c_acc = std::ldexp(1.0, -8);
  Comparison c;
  double err2 = 0, ref2 = 0;
  for (size_t i = 0; i < ref.size(); ++i) {
    if (!std::isfinite(gpu[i])) {
      ++c.nonfinite;
      continue;
    }
    const double d = static_cast<double>(gpu[i]) - ref[i];
    err2 += d * d;
    ref2 += static_cast<double>(ref[i]) * ref[i];
    const double tol = u_out * std::fabs(ref[i]) + c_acc * absref[i] + 1e-30;
    if (std::fabs(d) / tol > c.worst) {
      c.worst = std::fabs(d) / tol;
      c.worst_index = static_cast<int64_t>(i);
    }
  }
  c.rel_l2 = std::sqrt(err2 / std::max(ref2, 1e-300));
  return c;
}

double rel_l2_limit(OutType out) { return out == OutType::BF16 ? 4e-3 : 2e-3; }

std::string describe(int64_t M, int64_t N, int64_t K, int a_block, int b_block, OutType out) {
  auto g = [](int b) { return b == 1 ? "1x128" : "128x128"; };
  return "M=" + std::to_string(M) + " N=" + std::to_string(N) + " K=" + std::to_string(K) + " a " + g(a_block) +
         " b " + g(b_block) + (out == OutType::BF16 ? " bf16" : " fp32");
}

void expect_close(const std::vector<float>& gpu, const std::vector<float>& ref, const std::vector<float>& absref,
                  OutType out, const std::string& what) {
  const Comparison c = compare(gpu, ref, absref, out);
  std::printf("[ fp8 gemm ] %s: rel_l2 %.3e (limit %.0e), worst |err|/tol %.3f, non-finite %lld\n", what.c_str(),
              c.rel_l2, rel_l2_limit(out), c.worst, static_cast<long long>(c.nonfinite));
  EXPECT_EQ(c.nonfinite, 0) << what << ": elements left unwritten (NaN poison) or non-finite";
  EXPECT_LT(c.rel_l2, rel_l2_limit(out)) << what;
  EXPECT_LE(c.worst, 1.0) << what << ": worst element " << c.worst_index << " gpu "
                          << (c.worst_index >= 0 ? gpu[static_cast<size_t>(c.worst_index)] : 0.0f) << " ref "
                          << (c.worst_index >= 0 ? ref[static_cast<size_t>(c.worst_index)] : 0.0f);
}

// Quantizes random a [M, K] and b [N, K], runs both GEMMs, compares every element.
void check_problem(cuda::GemmContext& ctx, int64_t M, int64_t N, int64_t K, int a_block, int b_block, OutType out,
                   std::mt19937_64& rng) {
  const std::string what = describe(M, N, K, a_block, b_block, out);
  const HostOperand a = random_operand(M, K, a_block, rng), b = random_operand(N, K, b_block, rng);
  const DeviceOperand da(a), db(b);
  const std::vector<float> gpu = run_gpu(ctx, da.view(), db.view(), out);
  std::vector<float> ref(static_cast<size_t>(M * N)), absref(ref.size());
  cpu::gemm_nt_reference(a.view(), b.view(), ref.data());
  const HostOperand aa = absolute(a), ab = absolute(b);
  cpu::gemm_nt_reference(aa.view(), ab.view(), absref.data());
  expect_close(gpu, ref, absref, out, what);
}

using Fp8GemmGpu = gpu_test::GpuTest;

TEST_F(Fp8GemmGpu, ConvertsScalesToTheCublasLtLayoutOnTheDeviceAsOnTheHost) {
  std::mt19937_64 rng(fresh_seed("scales"));
  std::uniform_real_distribution<float> dist(0.001f, 1.0f);
  for (const auto& [rows, cols, block_rows] : {std::tuple<int64_t, int64_t, int>{200, 320, 1}, {256, 1024, 1},
                                                {200, 320, kTile}, {384, 640, kTile}, {128, 128, kTile}}) {
    const int64_t row_tiles = (rows + block_rows - 1) / block_rows, T = tiles(cols);
    std::vector<float> src(static_cast<size_t>(row_tiles * T));
    for (float& s : src) s = dist(rng);
    const auto count = static_cast<size_t>(cuda::cublaslt_scale_count(rows, cols, block_rows));
    std::vector<float> host(count, -1.0f);
    cuda::scales_to_cublaslt_host(src.data(), rows, cols, block_rows, host.data());
    // The index formulas of DEPS.md, spelled out: VEC128 s[kb * rows + r], BLK128x128 s[rb * L4 + kb].
    const int64_t L4 = (T + 3) / 4 * 4;
    if (block_rows == 1) {
      ASSERT_EQ(count, static_cast<size_t>(T * rows));
      EXPECT_EQ(host[static_cast<size_t>((T - 1) * rows + 3)], src[static_cast<size_t>(3 * T + T - 1)]);
    } else {
      ASSERT_EQ(count, static_cast<size_t>(row_tiles * L4));
      EXPECT_EQ(host[static_cast<size_t>((row_tiles - 1) * L4 + T - 1)], src.back());
      for (int64_t kb = T; kb < L4; ++kb) EXPECT_EQ(host[static_cast<size_t>(kb)], 0.0f) << "padding";
    }
    DeviceBuffer<float> d_src(src.size()), d_dst(count);
    d_src.upload(src);
    CUDA_CHECK(cudaMemset(d_dst.get(), 0xFF, count * sizeof(float)));
    cuda::scales_to_cublaslt(d_src.get(), rows, cols, block_rows, d_dst.get(), nullptr);
    CUDA_CHECK(cudaDeviceSynchronize());
    const std::vector<float> dev = d_dst.download();
    EXPECT_EQ(0, std::memcmp(dev.data(), host.data(), count * sizeof(float)))
        << rows << "x" << cols << " block_rows " << block_rows << ": device and host conversions differ";
  }
}

TEST_F(Fp8GemmGpu, MatchesTheCpuReferenceForActivationsTimesWeights) {
  std::mt19937_64 rng(fresh_seed("fprop"));
  cuda::GemmContext ctx;
  check_problem(ctx, 128, 128, 128, 1, kTile, OutType::BF16, rng);
  check_problem(ctx, 256, 384, 640, 1, kTile, OutType::BF16, rng);
  check_problem(ctx, 196, 200, 384, 1, kTile, OutType::BF16, rng);  // partial 128-blocks of M and N
  check_problem(ctx, 512, 1024, 2048, 1, kTile, OutType::BF16, rng);
}

TEST_F(Fp8GemmGpu, WritesFp32OutputThatMatchesTheReference) {
  std::mt19937_64 rng(fresh_seed("fp32 out"));
  cuda::GemmContext ctx;
  check_problem(ctx, 128, 128, 128, 1, kTile, OutType::FP32, rng);
  check_problem(ctx, 256, 384, 640, 1, kTile, OutType::FP32, rng);
  check_problem(ctx, 256, 260, 512, 1, kTile, OutType::FP32, rng);  // N % 8 != 0 is fine for FP32
}

TEST_F(Fp8GemmGpu, MatchesTheReferenceWithBothOperandsIn1x128TilesAsWgradNeeds) {
  std::mt19937_64 rng(fresh_seed("vec x vec"));
  cuda::GemmContext ctx;
  check_problem(ctx, 128, 128, 128, 1, 1, OutType::BF16, rng);
  check_problem(ctx, 256, 384, 640, 1, 1, OutType::BF16, rng);
  check_problem(ctx, 384, 256, 1024, 1, 1, OutType::FP32, rng);
}

TEST_F(Fp8GemmGpu, MatchesTheReferenceWithWeightsAsTheLeftOperand) {
  std::mt19937_64 rng(fresh_seed("blk x vec"));
  cuda::GemmContext ctx;
  check_problem(ctx, 384, 256, 512, kTile, 1, OutType::BF16, rng);
  check_problem(ctx, 200, 128, 256, kTile, 1, OutType::BF16, rng);
}

// cuBLASLt may or may not take a partial last K tile; either it matches the reference (whose partial
// tile acts as zero-padded) or gemm_nt refuses it with moerl::Error. Anything else fails.
TEST_F(Fp8GemmGpu, ComputesOrCleanlyRefusesKNotAMultipleOf128) {
  std::mt19937_64 rng(fresh_seed("partial K"));
  cuda::GemmContext ctx;
  for (const auto& [K, a_block, b_block] : {std::tuple<int64_t, int, int>{320, 1, kTile}, {208, 1, kTile},
                                            {336, 1, 1}}) {
    try {
      check_problem(ctx, 256, 256, K, a_block, b_block, OutType::BF16, rng);
      std::printf("[ fp8 gemm ] K=%lld (a %s, b %s): computed by cuBLASLt\n", static_cast<long long>(K),
                  a_block == 1 ? "1x128" : "128x128", b_block == 1 ? "1x128" : "128x128");
    } catch (const Error& e) {
      std::printf("[ fp8 gemm ] K=%lld: refused: %s\n", static_cast<long long>(K), e.what());
      EXPECT_NE(std::string(e.what()).find("fp8::cuda::gemm_nt"), std::string::npos) << e.what();
    }
  }
  // The refusal must not have poisoned the context: a regular problem still runs.
  check_problem(ctx, 128, 128, 256, 1, kTile, OutType::BF16, rng);
}

// DeepSeek-V3's routed-expert shapes (hidden 7168, expert width 2048): the full output is checked for
// finiteness (poison), a sample of rows against the CPU reference. Runs on a non-default stream.
TEST_F(Fp8GemmGpu, MatchesTheReferenceOnADeepSeekSizedProblem) {
  const uint64_t seed = fresh_seed("4096x7168x2048");
  std::mt19937_64 rng(seed);
  const int64_t M = 4096, N = 7168, K = 2048;
  const HostOperand a = random_operand(M, K, 1, rng), b = random_operand(N, K, kTile, rng);
  const DeviceOperand da(a), db(b);
  cudaStream_t stream = nullptr;
  CUDA_CHECK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
  cuda::GemmContext ctx;
  std::vector<float> gpu;
  try {
    gpu = run_gpu(ctx, da.view(), db.view(), OutType::BF16, stream);
  } catch (...) {
    cudaStreamDestroy(stream);
    throw;
  }
  CUDA_CHECK(cudaStreamDestroy(stream));
  const auto nonfinite = std::count_if(gpu.begin(), gpu.end(), [](float v) { return !std::isfinite(v); });
  EXPECT_EQ(nonfinite, 0) << "elements left unwritten (NaN poison) or non-finite";

  std::vector<int64_t> rows = {0, 127, 128, M - 1};
  std::uniform_int_distribution<int64_t> pick(0, M - 1);
  while (rows.size() < 48) rows.push_back(pick(rng));
  const HostOperand sa = select_rows(a, rows);
  std::vector<float> ref(rows.size() * static_cast<size_t>(N)), absref(ref.size()), got(ref.size());
  cpu::gemm_nt_reference(sa.view(), b.view(), ref.data());
  const HostOperand asa = absolute(sa), ab = absolute(b);
  cpu::gemm_nt_reference(asa.view(), ab.view(), absref.data());
  for (size_t i = 0; i < rows.size(); ++i)
    std::copy_n(gpu.begin() + rows[i] * N, N, got.begin() + static_cast<std::ptrdiff_t>(i * N));
  expect_close(got, ref, absref, OutType::BF16, describe(M, N, K, 1, kTile, OutType::BF16) + " (48 rows)");
}

TEST_F(Fp8GemmGpu, RefusesProblemsCublasLtCannotTake) {
  std::mt19937_64 rng(fresh_seed("refusals"));
  cuda::GemmContext ctx;
  const HostOperand x = random_operand(128, 256, 1, rng), w = random_operand(128, 256, kTile, rng);
  const DeviceOperand dx(x), dw(w);
  DeviceBuffer<uint8_t> y(128 * 128 * 4 + 256);
  auto refused = [&](cuda::Operand a, cuda::Operand b, void* out, OutType type, const char* expect) {
    try {
      cuda::gemm_nt(ctx, a, b, out, type);
      ADD_FAILURE() << "not refused: expected an error mentioning '" << expect << "'";
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find(expect), std::string::npos) << e.what();
    }
  };
  const cuda::Operand X = dx.view(), W = dw.view();
  refused(W, W, y.get(), OutType::BF16, "both operands have 128x128 blocks");
  cuda::Operand bad = X;
  bad.rows = 6;
  refused(bad, W, y.get(), OutType::BF16, "multiple of 4");
  bad = W;
  bad.rows = 100;  // N % 8 != 0 with BF16 output
  refused(X, bad, y.get(), OutType::BF16, "multiple of 16 bytes");
  cuda::Operand short_k = X;
  short_k.cols = 128;
  refused(short_k, W, y.get(), OutType::BF16, "K differs");
  cuda::Operand odd_k_a = X, odd_k_b = W;
  odd_k_a.cols = odd_k_b.cols = 200;
  refused(odd_k_a, odd_k_b, y.get(), OutType::BF16, "multiple of 16");
  bad = X;
  bad.codes += 8;
  refused(bad, W, y.get(), OutType::BF16, "16-byte aligned");
  bad = X;
  bad.block_rows = 64;
  refused(bad, W, y.get(), OutType::BF16, "block_rows");
  refused(X, W, y.get() + 4, OutType::BF16, "16-byte aligned");
  const std::vector<uint8_t> host_codes(x.codes);
  bad = X;
  bad.codes = host_codes.data();
  refused(bad, W, y.get(), OutType::FP32, "not device memory");
  EXPECT_EQ(ctx.cached_plans(), 0u) << "a refused problem must not leave a plan behind";
  // Nothing above touched the GPU's state: a valid call still works.
  check_problem(ctx, 128, 128, 256, 1, kTile, OutType::BF16, rng);
}

TEST_F(Fp8GemmGpu, ReusesOnePlanPerProblemAndRepeatsResultsBitForBit) {
  std::mt19937_64 rng(fresh_seed("plan cache"));
  cuda::GemmContext ctx;
  const HostOperand x = random_operand(256, 512, 1, rng), w = random_operand(384, 512, kTile, rng);
  const DeviceOperand dx(x), dw(w);
  const std::vector<float> first = run_gpu(ctx, dx.view(), dw.view(), OutType::BF16);
  const std::vector<float> second = run_gpu(ctx, dx.view(), dw.view(), OutType::BF16);
  EXPECT_EQ(ctx.cached_plans(), 1u);
  EXPECT_EQ(0, std::memcmp(first.data(), second.data(), first.size() * sizeof(float))) << "same inputs, same plan";
  run_gpu(ctx, dx.view(), dw.view(), OutType::FP32);
  EXPECT_EQ(ctx.cached_plans(), 2u) << "another output type is another problem";
  // y only 16-byte aligned: a plan of its own (cuBLASLt assumes 256 otherwise), still correct.
  const std::vector<float> offset = run_gpu(ctx, dx.view(), dw.view(), OutType::BF16, nullptr, 16);
  EXPECT_EQ(ctx.cached_plans(), 3u);
  std::vector<float> ref(first.size()), absref(first.size());
  cpu::gemm_nt_reference(x.view(), w.view(), ref.data());
  const HostOperand ax = absolute(x), aw = absolute(w);
  cpu::gemm_nt_reference(ax.view(), aw.view(), absref.data());
  expect_close(offset, ref, absref, OutType::BF16, describe(256, 384, 512, 1, kTile, OutType::BF16) + " y+16 bytes");
}

TEST_F(Fp8GemmGpu, AccumulatesTheProductIntoAnFp32OutputAsWgradNeeds) {
  // Wgrad's shape in the routed experts (dW [I, H] += dgᵀ · xᵀ over one expert's tokens: bench-600m's I 704, H 1024,
  // ~2048 tokens), both operands 1x128 along the tokens. y starts at random values; the result must be y + a · bᵀ
  // within the GEMM's tolerance (the sum is rounded once more, at most 2^-24 relative). Prints whether cuBLASLt
  // took beta = 1 or the fallback (temporary + add kernel) ran.
  std::mt19937_64 rng(fresh_seed("accumulate"));
  cuda::GemmContext ctx;
  const int64_t M = 704, N = 1024, K = 2048;
  const HostOperand a = random_operand(M, K, 1, rng), b = random_operand(N, K, 1, rng);
  const DeviceOperand da(a), db(b);
  std::vector<float> y0(static_cast<size_t>(M * N));
  std::normal_distribution<float> normal(0.0f, 64.0f);
  for (float& v : y0) v = normal(rng);
  DeviceBuffer<float> y(y0.size());
  y.upload(y0);
  cuda::gemm_nt_accumulate(ctx, da.view(), db.view(), y.get());
  CUDA_CHECK(cudaDeviceSynchronize());
  const std::vector<float> got = y.download();
  std::vector<float> ref(y0.size()), absref(y0.size());
  cpu::gemm_nt_reference(a.view(), b.view(), ref.data());
  const HostOperand aa = absolute(a), ab = absolute(b);
  cpu::gemm_nt_reference(aa.view(), ab.view(), absref.data());
  std::vector<float> product(got.size());  // what the GEMM added, against the reference product
  for (size_t i = 0; i < got.size(); ++i) {
    product[i] = got[i] - y0[i];
    absref[i] += std::ldexp(std::fabs(got[i]), -16);  // the one rounding of y0 + product, well inside 2^-8 of it
  }
  expect_close(product, ref, absref, OutType::FP32, describe(M, N, K, 1, 1, OutType::FP32) + " accumulated");
  std::printf("[ fp8 gemm ] accumulate: %s\n",
              ctx.accumulate_fallbacks() == 0 ? "cuBLASLt beta = 1" : "fallback (temporary + add kernel)");
}

}  // namespace
}  // namespace moerl::fp8
