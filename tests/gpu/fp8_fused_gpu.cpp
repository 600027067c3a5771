// GPU tests of the one-pass FP8 quantizations (kernels/cuda/fp8_quantize_tile.cuh): every kernel shape of the
// transposed quantization and quantize_1x128_dual against the CPU reference (kernels/cpu/fp8.cpp), and the SwiGLU
// kernels fused with quantization (kernels/cuda/swiglu_fp8.hpp) against the unfused GPU kernels — all byte for
// byte, on random inputs (fresh seed each run, MOERL_TEST_SEED repeats), outputs poisoned first. Also prints the
// bandwidth of each on realistic sizes (information, not assertions). Skipped without a GPU.
#include <cuda_runtime_api.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <limits>
#include <random>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "kernels/cuda/swiglu.hpp"
#include "kernels/cuda/swiglu_fp8.hpp"
#include "kernels/fp8.hpp"
#include "kernels/fp8_gemm.hpp"
#include "kernels/fp8_quantize.hpp"
#include "kernels/half.hpp"
#include "tests/gpu/moe_gpu_support.hpp"

namespace moerl::moe_gpu_test {
namespace {

using fp8::cuda::TransposedKernel;
using fp8::tiles;

class Fp8FusedGpu : public GpuTest {};

// Normal values with a magnitude per row from 2^-20 to 2^20 (so tiles along rows and along columns see very
// different scales), one all-zero row and a row with a lone large value (small ones land on subnormal codes).
std::vector<float> random_activation(int64_t rows, int64_t cols, std::mt19937_64& rng) {
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::uniform_int_distribution<int> exponent(-20, 20);
  std::vector<float> x(static_cast<size_t>(rows * cols));
  for (int64_t r = 0; r < rows; ++r) {
    const float magnitude = std::ldexp(1.0f, exponent(rng));
    for (int64_t c = 0; c < cols; ++c) x[r * cols + c] = normal(rng) * magnitude;
  }
  if (rows > 3) {
    for (int64_t c = 0; c < cols; ++c) x[1 * cols + c] = 0.0f;
    for (int64_t c = 0; c < cols; ++c) x[3 * cols + c] *= 1e-4f;
    x[3 * cols] = -1000.0f;
  }
  return x;
}

// Counts differing elements (bit patterns for floats), reporting the first few.
template <class T>
void expect_same_bits(const std::vector<T>& got, const std::vector<T>& want, const std::string& what) {
  ASSERT_EQ(got.size(), want.size()) << what;
  int64_t mismatches = 0;
  for (size_t i = 0; i < got.size(); ++i) {
    bool same;
    if constexpr (sizeof(T) == 4)
      same = std::bit_cast<uint32_t>(got[i]) == std::bit_cast<uint32_t>(want[i]);
    else
      same = got[i] == want[i];
    if (!same && ++mismatches <= 5)
      ADD_FAILURE() << what << " [" << i << "]: GPU " << +got[i] << ", expected " << +want[i];
  }
  EXPECT_EQ(mismatches, 0) << what;
}

std::string shape_name(int64_t rows, int64_t cols) { return std::to_string(rows) + "x" + std::to_string(cols); }

// Codes written `pad` bytes into a poisoned buffer (got, of want.size() + 2 pad bytes): the CPU's bytes in the
// middle, the poison (0xFF) untouched on both sides.
void expect_codes_between_poison(const std::vector<uint8_t>& got, const std::vector<uint8_t>& want, int64_t pad,
                                 const std::string& what) {
  expect_same_bits(std::vector<uint8_t>(got.begin() + pad, got.end() - pad), want, what);
  const auto n = static_cast<int64_t>(want.size());
  for (int64_t i = 0; i < pad; ++i) {
    EXPECT_EQ(got[static_cast<size_t>(i)], 0xFF) << what << ": byte " << i << " before the codes written";
    EXPECT_EQ(got[static_cast<size_t>(n + pad + i)], 0xFF) << what << ": byte " << i << " after the codes written";
  }
}

// The CPU's codes of x [bounds.back(), cols]'s rows cut into groups at bounds: each group's own transpose
// [cols, n_g] (quantize_1x128_transposed of its rows alone) packed at bounds[g] · cols of codes_t.
void packed_group_transposes(const std::vector<float>& x, const std::vector<int64_t>& bounds, int64_t cols,
                             std::vector<uint8_t>& codes_t) {
  for (size_t g = 0; g + 1 < bounds.size(); ++g) {
    const int64_t first = bounds[g], n = bounds[g + 1] - first;
    if (n == 0) continue;
    std::vector<float> group_scales(static_cast<size_t>(cols * tiles(n)));
    fp8::cpu::quantize_1x128_transposed(x.data() + first * cols, n, cols, codes_t.data() + first * cols,
                                        group_scales.data());
  }
}

TEST_F(Fp8FusedGpu, EveryTransposedKernelShapeGivesTheCpuBytes) {
  std::mt19937_64 rng(run_seed() + 101);
  // 300 and 704 columns: partial column tiles and chunks; 196 and 68: a last 64-column block of 4 columns; 1000
  // rows: the 128 x 64 kernel's fallback (cols32).
  const std::pair<int64_t, int64_t> shapes[] = {{128, 128}, {256, 300}, {384, 704}, {1000, 4100},
                                                {1024, 2048}, {640, 196}, {128, 68}};
  for (auto [rows, cols] : shapes) {
    const std::vector<float> x = random_activation(rows, cols, rng);
    std::vector<uint8_t> codes(static_cast<size_t>(rows * cols));
    std::vector<float> scales(static_cast<size_t>(cols * tiles(rows)));
    fp8::cpu::quantize_1x128_transposed(x.data(), rows, cols, codes.data(), scales.data());
    DeviceBuffer<float> dx(x), ds(scales.size());
    DeviceBuffer<uint8_t> dc(codes.size());
    for (TransposedKernel k : {TransposedKernel::Cols32, TransposedKernel::Tiles64}) {
      const std::string what = std::string(fp8::cuda::transposed_kernel_name(k)) + " " + shape_name(rows, cols);
      dc.poison();
      ds.poison();
      fp8::cuda::quantize_1x128_transposed_with(k, dx.get(), rows, cols, dc.get(), ds.get());
      CUDA_CHECK(cudaDeviceSynchronize());
      expect_same_bits(dc.download(), codes, what + " codes");
      expect_same_bits(ds.download(), scales, what + " scales");
    }
  }
  std::printf("[ fp8 fused ] transposed quantization, kernels cols32/tiles64, 7 shapes: CPU bytes\n");
}

TEST_F(Fp8FusedGpu, TiledTransposedKernelWritesCodesAlignedToFourBytesOnlyAsTheCpuDoes) {
  // The 128-row blocks store 16 codes at a time where codes_t is 16-byte aligned; 4 bytes past an allocation
  // (4-byte aligned, which they also accept) they take their 4-byte stores. The bytes around must stay poisoned.
  std::mt19937_64 rng(run_seed() + 105);
  const int64_t rows = 384, cols = 196, n = rows * cols, pad = 4;
  const std::vector<float> x = random_activation(rows, cols, rng);
  std::vector<uint8_t> codes(static_cast<size_t>(n));
  std::vector<float> scales(static_cast<size_t>(cols * tiles(rows)));
  fp8::cpu::quantize_1x128_transposed(x.data(), rows, cols, codes.data(), scales.data());
  DeviceBuffer<float> dx(x), ds(scales.size());
  DeviceBuffer<uint8_t> dc(static_cast<size_t>(n + 2 * pad));
  const std::string what = "tiles64 codes at +4 bytes";
  dc.poison();
  ds.poison();
  fp8::cuda::quantize_1x128_transposed_with(TransposedKernel::Tiles64, dx.get(), rows, cols, dc.get() + pad, ds.get());
  CUDA_CHECK(cudaDeviceSynchronize());
  expect_codes_between_poison(dc.download(), codes, pad, what);
  expect_same_bits(ds.download(), scales, what + " scales");
}

TEST_F(Fp8FusedGpu, EveryTransposedKernelShapePacksEachGroupAsTheCpuDoesOnItsOwnRows) {
  // Groups of 256, 0 (empty: skipped), 384 and 128 rows; 196
  // columns: a last 64-column block of 4. Each group's codes are the CPU's transpose of its rows alone, packed
  // at bounds[g] · cols; the scales are those of the whole (every 128-row tile lies in one group).
  std::mt19937_64 rng(run_seed() + 106);
  const std::vector<int64_t> bounds = {0, 256, 256, 640, 768};
  const int64_t rows = bounds.back(), cols = 196, groups = static_cast<int64_t>(bounds.size()) - 1;
  const std::vector<float> x = random_activation(rows, cols, rng);
  std::vector<uint8_t> codes(static_cast<size_t>(rows * cols)), unused(codes.size());
  std::vector<float> scales(static_cast<size_t>(cols * tiles(rows)));
  fp8::cpu::quantize_1x128_transposed(x.data(), rows, cols, unused.data(), scales.data());
  packed_group_transposes(x, bounds, cols, codes);
  DeviceBuffer<float> dx(x), ds(scales.size());
  DeviceBuffer<int64_t> db(bounds);
  DeviceBuffer<uint8_t> dc(codes.size());
  for (TransposedKernel k : {TransposedKernel::Cols32, TransposedKernel::Tiles64}) {
    const std::string what = std::string(fp8::cuda::transposed_kernel_name(k)) + " grouped";
    dc.poison();
    ds.poison();
    fp8::cuda::quantize_1x128_transposed_grouped_with(k, dx.get(), rows, cols, db.get(), groups, dc.get(), ds.get());
    CUDA_CHECK(cudaDeviceSynchronize());
    expect_same_bits(dc.download(), codes, what + " codes");
    expect_same_bits(ds.download(), scales, what + " scales");
  }
}

TEST_F(Fp8FusedGpu, DualQuantizationGivesBothCpuResultsFromOneReadOnRaggedAndGroupedShapes) {
  std::mt19937_64 rng(run_seed() + 102);
  // 300 rows: the two-kernel fallback; 704, 2052, 196, 68 and 60 columns: partial last tiles of 64, 4, 68, 68 and
  // 60 columns (the CPU's zero padding inside the block).
  const std::pair<int64_t, int64_t> shapes[] = {{128, 128}, {384, 704}, {512, 1024}, {300, 512},
                                                {256, 2052}, {640, 196}, {128, 68}, {256, 60}};
  for (auto [rows, cols] : shapes) {
    const std::vector<float> x = random_activation(rows, cols, rng);
    std::vector<uint8_t> codes(static_cast<size_t>(rows * cols)), codes_t(codes.size());
    std::vector<float> scales(static_cast<size_t>(rows * tiles(cols))), scales_t(static_cast<size_t>(cols * tiles(rows)));
    fp8::cpu::quantize_1x128(x.data(), rows, cols, codes.data(), scales.data());
    fp8::cpu::quantize_1x128_transposed(x.data(), rows, cols, codes_t.data(), scales_t.data());
    DeviceBuffer<float> dx(x), ds(scales.size()), dst(scales_t.size());
    DeviceBuffer<uint8_t> dc(codes.size()), dct(codes.size());
    dc.poison(), ds.poison(), dct.poison(), dst.poison();
    fp8::cuda::quantize_1x128_dual(dx.get(), rows, cols, nullptr, 0, dc.get(), ds.get(), dct.get(), dst.get());
    CUDA_CHECK(cudaDeviceSynchronize());
    const std::string what = "dual " + shape_name(rows, cols);
    expect_same_bits(dc.download(), codes, what + " row codes");
    expect_same_bits(ds.download(), scales, what + " row scales");
    expect_same_bits(dct.download(), codes_t, what + " transposed codes");
    expect_same_bits(dst.download(), scales_t, what + " transposed scales");
  }

  // Grouped: rows cut at bounds (an empty group among them), each group's transposed codes packed on their own as
  // the CPU quantizes the group's rows alone; the scales those of the whole. 208 columns: a last tile of 80.
  const std::vector<int64_t> bounds = {0, 256, 256, 384, 768};
  const int64_t rows = bounds.back(), cols = 208, groups = static_cast<int64_t>(bounds.size()) - 1;
  const std::vector<float> x = random_activation(rows, cols, rng);
  std::vector<uint8_t> codes(static_cast<size_t>(rows * cols)), codes_t(codes.size()), whole_t(codes.size());
  std::vector<float> scales(static_cast<size_t>(rows * tiles(cols))), scales_t(static_cast<size_t>(cols * rows / 128));
  fp8::cpu::quantize_1x128(x.data(), rows, cols, codes.data(), scales.data());
  fp8::cpu::quantize_1x128_transposed(x.data(), rows, cols, whole_t.data(), scales_t.data());
  packed_group_transposes(x, bounds, cols, codes_t);
  DeviceBuffer<float> dx(x), ds(scales.size()), dst(scales_t.size());
  DeviceBuffer<uint8_t> dc(codes.size()), dct(codes.size());
  DeviceBuffer<int64_t> db(bounds);
  dc.poison(), ds.poison(), dct.poison(), dst.poison();
  fp8::cuda::quantize_1x128_dual(dx.get(), rows, cols, db.get(), groups, dc.get(), ds.get(), dct.get(), dst.get());
  CUDA_CHECK(cudaDeviceSynchronize());
  const std::string what = "grouped dual";
  expect_same_bits(dc.download(), codes, what + " row codes");
  expect_same_bits(ds.download(), scales, what + " row scales");
  expect_same_bits(dct.download(), codes_t, what + " transposed codes");
  expect_same_bits(dst.download(), scales_t, what + " transposed scales");
  std::printf("[ fp8 fused ] quantize_1x128_dual, 8 shapes and a grouped one: CPU bytes both ways\n");
}

TEST_F(Fp8FusedGpu, DualQuantizationWritesCodesAlignedToFourBytesOnlyAsTheCpuDoes) {
  // Both code matrices 4 bytes past an allocation (4-byte aligned, which the one-pass kernels accept): the row
  // codes' 4-byte stores and the transposed codes' 4-byte path. The bytes around each must stay poisoned.
  std::mt19937_64 rng(run_seed() + 107);
  const int64_t rows = 384, cols = 196, n = rows * cols, pad = 4;
  const std::vector<float> x = random_activation(rows, cols, rng);
  std::vector<uint8_t> codes(static_cast<size_t>(n)), codes_t(static_cast<size_t>(n));
  std::vector<float> scales(static_cast<size_t>(rows * tiles(cols))), scales_t(static_cast<size_t>(cols * tiles(rows)));
  fp8::cpu::quantize_1x128(x.data(), rows, cols, codes.data(), scales.data());
  fp8::cpu::quantize_1x128_transposed(x.data(), rows, cols, codes_t.data(), scales_t.data());
  DeviceBuffer<float> dx(x), ds(scales.size()), dst(scales_t.size());
  DeviceBuffer<uint8_t> dc(static_cast<size_t>(n + 2 * pad)), dct(static_cast<size_t>(n + 2 * pad));
  const std::string what = "dual codes at +4 bytes";
  dc.poison(), ds.poison(), dct.poison(), dst.poison();
  fp8::cuda::quantize_1x128_dual(dx.get(), rows, cols, nullptr, 0, dc.get() + pad, ds.get(), dct.get() + pad, dst.get());
  CUDA_CHECK(cudaDeviceSynchronize());
  expect_codes_between_poison(dc.download(), codes, pad, what + " row codes");
  expect_codes_between_poison(dct.download(), codes_t, pad, what + " transposed codes");
  expect_same_bits(ds.download(), scales, what + " row scales");
  expect_same_bits(dst.download(), scales_t, what + " transposed scales");
}

// The CPU's bytes both ways (quantize_1x128 and quantize_1x128_transposed) from the dual quantization and from
// the transposed tiles64 kernel, on x [rows, cols].
void expect_dual_and_transposed_as_cpu(const std::vector<float>& x, int64_t rows, int64_t cols, const std::string& what) {
  std::vector<uint8_t> codes(static_cast<size_t>(rows * cols)), codes_t(codes.size());
  std::vector<float> scales(static_cast<size_t>(rows * tiles(cols))), scales_t(static_cast<size_t>(cols * tiles(rows)));
  fp8::cpu::quantize_1x128(x.data(), rows, cols, codes.data(), scales.data());
  fp8::cpu::quantize_1x128_transposed(x.data(), rows, cols, codes_t.data(), scales_t.data());
  DeviceBuffer<float> dx(x), ds(scales.size()), dst(scales_t.size());
  DeviceBuffer<uint8_t> dc(codes.size()), dct(codes.size());
  dc.poison(), ds.poison(), dct.poison(), dst.poison();
  fp8::cuda::quantize_1x128_dual(dx.get(), rows, cols, nullptr, 0, dc.get(), ds.get(), dct.get(), dst.get());
  CUDA_CHECK(cudaDeviceSynchronize());
  const std::string which = what + ", dual";
  expect_same_bits(dc.download(), codes, which + " row codes");
  expect_same_bits(ds.download(), scales, which + " row scales");
  expect_same_bits(dct.download(), codes_t, which + " transposed codes");
  expect_same_bits(dst.download(), scales_t, which + " transposed scales");
  dct.poison(), dst.poison();
  fp8::cuda::quantize_1x128_transposed_with(TransposedKernel::Tiles64, dx.get(), rows, cols, dct.get(), dst.get());
  CUDA_CHECK(cudaDeviceSynchronize());
  expect_same_bits(dct.download(), codes_t, what + ", transposed tiles64 codes");
  expect_same_bits(dst.download(), scales_t, what + ", transposed tiles64 scales");
}

TEST_F(Fp8FusedGpu, DualQuantizationConvertsTiesSubnormalsAndSpecialValuesAsTheCpuDoes) {
  // Row 0 and the first column of each 128-column tile hold 448, so every tile both ways has amax 448 and scale
  // exactly 1: the codes are the plain conversions of the values in between — every E4M3 value, every midpoint
  // between neighbours (ties to even), the floats either side of each, signed zeros, float subnormals and NaN
  // (ignored by amax, converted to 0x7F).
  std::vector<float> values;
  for (int c = 0; c < 0x7E; ++c) {
    const float v = fp8::float_from_e4m3(static_cast<uint8_t>(c)), next = fp8::float_from_e4m3(static_cast<uint8_t>(c + 1));
    const float mid = (v + next) / 2;  // exact: one more bit than E4M3 has
    for (float f : {v, mid, std::nextafter(mid, 0.0f), std::nextafter(mid, 1e9f)}) {
      values.push_back(f);
      values.push_back(-f);
    }
  }
  for (float f : {std::numeric_limits<float>::quiet_NaN(), -std::numeric_limits<float>::quiet_NaN(), -0.0f,
                  std::numeric_limits<float>::denorm_min(), -3 * std::numeric_limits<float>::denorm_min()})
    values.push_back(f);
  const int64_t rows = 128, cols = 256;
  std::vector<float> x(static_cast<size_t>(rows * cols));
  size_t next = 0;
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < cols; ++c)
      x[r * cols + c] = r == 0 || c % fp8::kTile == 0 ? 448.0f : values[next++ % values.size()];
  expect_dual_and_transposed_as_cpu(x, rows, cols, "scale 1");

  // Scales whose reciprocal pair would underflow or does not exist (Divisor's prescaled path): an Inf (scale
  // Inf: codes x / Inf, NaN for the Inf itself) and values near FLT_MAX (scale above 2^100); and tiny ones (the
  // scale floor 1e-4 / 448, float subnormals).
  std::mt19937_64 rng(run_seed() + 108);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::vector<float> y(static_cast<size_t>(rows * cols));
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < cols; ++c) {
      const float magnitude = r % 3 == 0 ? 1e37f : r % 3 == 1 ? 1e-40f : 1.0f;
      y[r * cols + c] = normal(rng) * magnitude;
    }
  y[5 * cols + 7] = std::numeric_limits<float>::infinity();
  y[9 * cols + 200] = -std::numeric_limits<float>::infinity();
  expect_dual_and_transposed_as_cpu(y, rows, cols, "huge, tiny and Inf");
}

TEST_F(Fp8FusedGpu, SwigluFusedWithQuantizationGivesTheUnfusedBytes) {
  std::mt19937_64 rng(run_seed() + 103);
  const std::vector<int64_t> bounds = {0, 128, 128, 384};  // aligned expert rows, one expert empty
  const int64_t groups = static_cast<int64_t>(bounds.size()) - 1;
  DeviceBuffer<int64_t> db(bounds);
  for (int64_t cols : {208, 704}) {
    const int64_t rows = bounds.back(), n = rows * cols;
    const std::string what = shape_name(rows, cols);
    DeviceBuffer<float> g(normal_values(static_cast<size_t>(n), 3.0f, rng)), u(normal_values(static_cast<size_t>(n), 1.0f, rng));
    DeviceBuffer<float> dh(random_activation(rows, cols, rng));
    ASSERT_TRUE(cuda::swiglu_fp8_supported(rows, cols, g.get(), u.get(), dh.get()));

    // Forward: h and its row codes.
    DeviceBuffer<float> h_ref(n), h(n), s_ref(rows * tiles(cols)), s(rows * tiles(cols));
    DeviceBuffer<uint8_t> c_ref(n), c(n);
    h.poison(), s.poison(), c.poison();
    cuda::swiglu_forward(g.get(), u.get(), h_ref.get(), n);
    fp8::cuda::quantize_1x128(h_ref.get(), rows, cols, c_ref.get(), s_ref.get());
    cuda::swiglu_forward_quantize_1x128(g.get(), u.get(), rows, cols, 0, h.get(), c.get(), s.get());
    CUDA_CHECK(cudaDeviceSynchronize());
    expect_same_bits(h.download(), h_ref.download(), what + " forward h");
    expect_same_bits(c.download(), c_ref.download(), what + " forward codes");
    expect_same_bits(s.download(), s_ref.download(), what + " forward scales");

    // Backward: dg and du, each quantized both ways (tokens grouped).
    DeviceBuffer<float> dg(n), du(n);
    cuda::swiglu_backward(dh.get(), g.get(), u.get(), dg.get(), du.get(), n);
    for (bool gate : {true, false}) {
      const float* grad = gate ? dg.get() : du.get();
      DeviceBuffer<float> st_ref(cols * rows / 128), st(cols * rows / 128);
      DeviceBuffer<uint8_t> ct_ref(n), ct(n);
      s.poison(), c.poison(), st.poison(), ct.poison();
      fp8::cuda::quantize_1x128(grad, rows, cols, c_ref.get(), s_ref.get());
      fp8::cuda::quantize_1x128_transposed_grouped(grad, rows, cols, db.get(), groups, ct_ref.get(), st_ref.get());
      cuda::swiglu_backward_quantize_dual(dh.get(), g.get(), gate ? u.get() : nullptr, rows, cols, 0, gate, db.get(),
                                          groups, c.get(), s.get(), ct.get(), st.get());
      CUDA_CHECK(cudaDeviceSynchronize());
      const std::string which = what + (gate ? " dg" : " du");
      expect_same_bits(c.download(), c_ref.download(), which + " row codes");
      expect_same_bits(s.download(), s_ref.download(), which + " row scales");
      expect_same_bits(ct.download(), ct_ref.download(), which + " token codes");
      expect_same_bits(st.download(), st_ref.download(), which + " token scales");
    }

    // Both gradients in one kernel: each the bytes of its unfused quantization.
    struct Out {
      DeviceBuffer<uint8_t> c, ct;
      DeviceBuffer<float> s, st;
    };
    auto make = [&] { return Out{DeviceBuffer<uint8_t>(n), DeviceBuffer<uint8_t>(n), DeviceBuffer<float>(rows * tiles(cols)),
                                 DeviceBuffer<float>(cols * rows / 128)}; };
    Out og = make(), ou = make();
    for (Out* o : {&og, &ou}) o->c.poison(), o->ct.poison(), o->s.poison(), o->st.poison();
    cuda::swiglu_backward_quantize_dual_both(dh.get(), g.get(), u.get(), rows, cols, 0, db.get(), groups,
                                             cuda::Fp8Dual{og.c.get(), og.s.get(), og.ct.get(), og.st.get()},
                                             cuda::Fp8Dual{ou.c.get(), ou.s.get(), ou.ct.get(), ou.st.get()});
    CUDA_CHECK(cudaDeviceSynchronize());
    for (bool gate : {true, false}) {
      const float* grad = gate ? dg.get() : du.get();
      const Out& o = gate ? og : ou;
      DeviceBuffer<float> st_ref(cols * rows / 128);
      DeviceBuffer<uint8_t> ct_ref(n);
      fp8::cuda::quantize_1x128(grad, rows, cols, c_ref.get(), s_ref.get());
      fp8::cuda::quantize_1x128_transposed_grouped(grad, rows, cols, db.get(), groups, ct_ref.get(), st_ref.get());
      CUDA_CHECK(cudaDeviceSynchronize());
      const std::string which = what + (gate ? " dg" : " du") + " (both in one kernel)";
      expect_same_bits(o.c.download(), c_ref.download(), which + " row codes");
      expect_same_bits(o.s.download(), s_ref.download(), which + " row scales");
      expect_same_bits(o.ct.download(), ct_ref.download(), which + " token codes");
      expect_same_bits(o.st.download(), st_ref.download(), which + " token scales");
    }
  }
  std::printf("[ fp8 fused ] SwiGLU forward + 1x128, backward dg / du + both ways (grouped, one kernel each and both "
              "in one): the unfused bytes\n");
}

// The routed experts' gate and up side by side (kernels/cuda/moe_fp8_experts.cu): with row strides, SwiGLU reads g
// and u as the halves of one wider matrix (its other columns NaN: never read), and the backward pair kernel writes
// each gradient's row codes and scales into its half of a [rows, 2 cols] matrix; the same bytes as packed.
TEST_F(Fp8FusedGpu, SwigluReadsAndWritesHalvesOfWiderMatrices) {
  std::mt19937_64 rng(run_seed() + 105);
  const std::vector<int64_t> bounds = {0, 256, 384};
  const int64_t groups = static_cast<int64_t>(bounds.size()) - 1;
  DeviceBuffer<int64_t> db(bounds);
  for (int64_t cols : {256, 208}) {  // whole tiles (the MoE's case), and a partial last tile
    const int64_t rows = bounds.back(), n = rows * cols, t = tiles(cols);
    const std::string what = shape_name(rows, cols);
    const std::vector<float> gh = normal_values(static_cast<size_t>(n), 3.0f, rng);
    const std::vector<float> uh = normal_values(static_cast<size_t>(n), 1.0f, rng);
    DeviceBuffer<float> g(gh), u(uh), dh(random_activation(rows, cols, rng));
    // g and u side by side: [rows, 2 P], u from column P = cols rounded up to 128.
    const int64_t P = (cols + 127) / 128 * 128, ld = 2 * P;
    std::vector<float> guh(static_cast<size_t>(rows * ld), std::numeric_limits<float>::quiet_NaN());
    for (int64_t r = 0; r < rows; ++r) {
      std::copy_n(gh.begin() + r * cols, cols, guh.begin() + r * ld);
      std::copy_n(uh.begin() + r * cols, cols, guh.begin() + r * ld + P);
    }
    DeviceBuffer<float> gu(guh);
    const float* gw = gu.get();
    const float* uw = gu.get() + P;

    // Forward from the halves: h, its codes both ways.
    {
      DeviceBuffer<float> h(n), h2(n), s(rows * t), s2(rows * t), st(cols * rows / 128), st2(cols * rows / 128);
      DeviceBuffer<uint8_t> c(n), c2(n), ct(n), ct2(n);
      cuda::swiglu_forward_quantize_dual(g.get(), u.get(), rows, cols, 0, h.get(), db.get(), groups,
                                         cuda::Fp8Dual{c.get(), s.get(), ct.get(), st.get()});
      cuda::swiglu_forward_quantize_dual(gw, uw, rows, cols, ld, h2.get(), db.get(), groups,
                                         cuda::Fp8Dual{c2.get(), s2.get(), ct2.get(), st2.get()});
      DeviceBuffer<float> h3(n), s3(rows * t);
      DeviceBuffer<uint8_t> c3(n);
      cuda::swiglu_forward_quantize_1x128(gw, uw, rows, cols, ld, h3.get(), c3.get(), s3.get());
      CUDA_CHECK(cudaDeviceSynchronize());
      expect_same_bits(h2.download(), h.download(), what + " forward h from the halves");
      expect_same_bits(c2.download(), c.download(), what + " forward row codes from the halves");
      expect_same_bits(s2.download(), s.download(), what + " forward row scales from the halves");
      expect_same_bits(ct2.download(), ct.download(), what + " forward token codes from the halves");
      expect_same_bits(st2.download(), st.download(), what + " forward token scales from the halves");
      expect_same_bits(h3.download(), h.download(), what + " forward (rows only) h from the halves");
      expect_same_bits(c3.download(), c.download(), what + " forward (rows only) codes from the halves");
      expect_same_bits(s3.download(), s.download(), what + " forward (rows only) scales from the halves");
    }

    // Packed: each gradient its own [rows, cols].
    DeviceBuffer<uint8_t> cg(n), cu(n), ctg(n), ctu(n);
    DeviceBuffer<float> sg(rows * t), su(rows * t), stg(cols * rows / 128), stu(cols * rows / 128);
    cuda::swiglu_backward_quantize_dual_both(dh.get(), g.get(), u.get(), rows, cols, 0, db.get(), groups,
                                             cuda::Fp8Dual{cg.get(), sg.get(), ctg.get(), stg.get()},
                                             cuda::Fp8Dual{cu.get(), su.get(), ctu.get(), stu.get()});
    // Side by side: [dg | du] codes [rows, 2 cols], scales [rows, 2 t]; poisoned first, so a stray or missing
    // write shows.
    DeviceBuffer<uint8_t> c2(2 * n), ctg2(n), ctu2(n);
    DeviceBuffer<float> s2(rows * 2 * t), stg2(cols * rows / 128), stu2(cols * rows / 128);
    c2.poison(), s2.poison();
    cuda::swiglu_backward_quantize_dual_both(
        dh.get(), gw, uw, rows, cols, ld, db.get(), groups,
        cuda::Fp8Dual{c2.get(), s2.get(), ctg2.get(), stg2.get(), 2 * cols, 2 * t},
        cuda::Fp8Dual{c2.get() + cols, s2.get() + t, ctu2.get(), stu2.get(), 2 * cols, 2 * t});
    // One gradient a kernel, from the halves.
    DeviceBuffer<uint8_t> c1(n), ct1(n);
    DeviceBuffer<float> s1(rows * t), st1(cols * rows / 128);
    cuda::swiglu_backward_quantize_dual(dh.get(), gw, uw, rows, cols, ld, true, db.get(), groups, c1.get(), s1.get(),
                                        ct1.get(), st1.get());
    CUDA_CHECK(cudaDeviceSynchronize());
    expect_same_bits(c1.download(), cg.download(), what + " dg alone from the halves: row codes");
    expect_same_bits(ct1.download(), ctg.download(), what + " dg alone from the halves: token codes");
    const std::vector<uint8_t> packed_g = cg.download(), packed_u = cu.download(), wide = c2.download();
    const std::vector<float> scales_g = sg.download(), scales_u = su.download(), wide_scales = s2.download();
    std::vector<uint8_t> wide_ref(wide.size());
    std::vector<float> wide_scales_ref(wide_scales.size());
    for (int64_t r = 0; r < rows; ++r) {
      std::copy_n(packed_g.begin() + r * cols, cols, wide_ref.begin() + r * 2 * cols);
      std::copy_n(packed_u.begin() + r * cols, cols, wide_ref.begin() + r * 2 * cols + cols);
      std::copy_n(scales_g.begin() + r * t, t, wide_scales_ref.begin() + r * 2 * t);
      std::copy_n(scales_u.begin() + r * t, t, wide_scales_ref.begin() + r * 2 * t + t);
    }
    expect_same_bits(wide, wide_ref, what + " [dg | du] row codes");
    expect_same_bits(wide_scales, wide_scales_ref, what + " [dg | du] row scales");
    expect_same_bits(ctg2.download(), ctg.download(), what + " dg token codes (the strides are the rows' only)");
    expect_same_bits(stg2.download(), stg.download(), what + " dg token scales");
    expect_same_bits(ctu2.download(), ctu.download(), what + " du token codes");
    expect_same_bits(stu2.download(), stu.download(), what + " du token scales");

    // Halves padded to whole tiles, [dg | 0 | du | 0] [rows, 2 P], the padding written as zeros by the kernel
    // (Fp8Dual::zero_pad; poisoned first).
    DeviceBuffer<uint8_t> cp(rows * 2 * P);
    cp.poison();
    cuda::swiglu_backward_quantize_dual_both(
        dh.get(), gw, uw, rows, cols, ld, db.get(), groups,
        cuda::Fp8Dual{cp.get(), s2.get(), ctg2.get(), stg2.get(), 2 * P, 2 * t, false, false, 0, true},
        cuda::Fp8Dual{cp.get() + P, s2.get() + t, ctu2.get(), stu2.get(), 2 * P, 2 * t, false, false, 0, true});
    CUDA_CHECK(cudaDeviceSynchronize());
    std::vector<uint8_t> padded_ref(static_cast<size_t>(rows * 2 * P), 0);
    for (int64_t r = 0; r < rows; ++r) {
      std::copy_n(packed_g.begin() + r * cols, cols, padded_ref.begin() + r * 2 * P);
      std::copy_n(packed_u.begin() + r * cols, cols, padded_ref.begin() + r * 2 * P + P);
    }
    expect_same_bits(cp.download(), padded_ref, what + " [dg | 0 | du | 0] row codes, halves padded to 128");
  }
  std::printf("[ fp8 fused ] SwiGLU with g and u side by side, dg and du written side by side: the packed bytes\n");
}

// g, u and dh in BF16 (the FP8 experts' MoeFp8Experts::gate_up_bf16): the BF16 kernels give the bytes of the FP32
// ones on the same values widened (every BF16 value is exact in FP32), for whole and partial tiles, g and u side by
// side, [dg | du] side by side.
TEST_F(Fp8FusedGpu, SwigluFromBf16InputsGivesTheBytesOfTheWidenedFp32Inputs) {
  std::mt19937_64 rng(run_seed() + 106);
  const std::vector<int64_t> bounds = {0, 256, 384};
  const int64_t groups = static_cast<int64_t>(bounds.size()) - 1;
  DeviceBuffer<int64_t> db(bounds);
  for (int64_t cols : {256, 208}) {
    const int64_t rows = bounds.back(), n = rows * cols, t = tiles(cols);
    const int64_t P = (cols + 127) / 128 * 128, ld = 2 * P;
    const std::string what = shape_name(rows, cols) + " BF16";
    auto bf16_of = [](std::vector<float>& x) {  // x rounded to BF16 in place; its bit patterns
      std::vector<uint16_t> b(x.size());
      for (size_t i = 0; i < x.size(); ++i) b[i] = bf16_from_float(x[i]), x[i] = float_from_bf16(b[i]);
      return b;
    };
    std::vector<float> gh = normal_values(static_cast<size_t>(n), 3.0f, rng), uh = normal_values(static_cast<size_t>(n), 1.0f, rng);
    std::vector<float> dhh = random_activation(rows, cols, rng);
    const std::vector<uint16_t> g16 = bf16_of(gh), u16 = bf16_of(uh), dh16 = bf16_of(dhh);
    std::vector<uint16_t> gu16(static_cast<size_t>(rows * ld), 0x7FC0);  // NaN between the halves
    for (int64_t r = 0; r < rows; ++r) {
      std::copy_n(g16.begin() + r * cols, cols, gu16.begin() + r * ld);
      std::copy_n(u16.begin() + r * cols, cols, gu16.begin() + r * ld + P);
    }
    DeviceBuffer<float> g(gh), u(uh), dh(dhh);
    DeviceBuffer<uint16_t> gu(gu16), dhb(dh16);
    const uint16_t* gw = gu.get();
    const uint16_t* uw = gu.get() + P;
    {  // forward, both ways and rows only
      DeviceBuffer<float> h(n), h2(n), h3(n), s(rows * t), s2(rows * t), s3(rows * t), st(cols * rows / 128),
          st2(cols * rows / 128);
      DeviceBuffer<uint8_t> c(n), c2(n), c3(n), ct(n), ct2(n);
      for (auto* b : {&h2, &h3, &s2, &s3, &st2}) b->poison();
      for (auto* b : {&c2, &c3, &ct2}) b->poison();
      cuda::swiglu_forward_quantize_dual(g.get(), u.get(), rows, cols, 0, h.get(), db.get(), groups,
                                         cuda::Fp8Dual{c.get(), s.get(), ct.get(), st.get()});
      cuda::swiglu_forward_quantize_dual(gw, uw, rows, cols, ld, h2.get(), db.get(), groups,
                                         cuda::Fp8Dual{c2.get(), s2.get(), ct2.get(), st2.get()});
      cuda::swiglu_forward_quantize_1x128(gw, uw, rows, cols, ld, h3.get(), c3.get(), s3.get());
      // Without h (the pipelined kernel).
      DeviceBuffer<float> s4(rows * t), st4(cols * rows / 128);
      DeviceBuffer<uint8_t> c4(n), ct4(n);
      s4.poison(), st4.poison(), c4.poison(), ct4.poison();
      cuda::swiglu_forward_quantize_dual(gw, uw, rows, cols, ld, nullptr, db.get(), groups,
                                         cuda::Fp8Dual{c4.get(), s4.get(), ct4.get(), st4.get()});
      CUDA_CHECK(cudaDeviceSynchronize());
      expect_same_bits(c4.download(), c.download(), what + " forward (no h) row codes");
      expect_same_bits(s4.download(), s.download(), what + " forward (no h) row scales");
      expect_same_bits(ct4.download(), ct.download(), what + " forward (no h) token codes");
      expect_same_bits(st4.download(), st.download(), what + " forward (no h) token scales");
      expect_same_bits(h2.download(), h.download(), what + " forward h");
      expect_same_bits(c2.download(), c.download(), what + " forward row codes");
      expect_same_bits(s2.download(), s.download(), what + " forward row scales");
      expect_same_bits(ct2.download(), ct.download(), what + " forward token codes");
      expect_same_bits(st2.download(), st.download(), what + " forward token scales");
      expect_same_bits(h3.download(), h.download(), what + " forward (rows only) h");
      expect_same_bits(c3.download(), c.download(), what + " forward (rows only) codes");
      expect_same_bits(s3.download(), s.download(), what + " forward (rows only) scales");
    }
    // Backward: [dg | du] row codes side by side, each gradient's token codes apart, FP32 and BF16 inputs.
    auto backward = [&](bool bf16, std::vector<uint8_t>& codes, std::vector<float>& scales,
                        std::vector<uint8_t>& codes_t, std::vector<float>& scales_t) {
      DeviceBuffer<uint8_t> c(2 * n), ctg(n), ctu(n);
      DeviceBuffer<float> s(rows * 2 * t), stg(cols * rows / 128), stu(cols * rows / 128);
      c.poison(), s.poison(), ctg.poison(), ctu.poison(), stg.poison(), stu.poison();
      const cuda::Fp8Dual dg{c.get(), s.get(), ctg.get(), stg.get(), 2 * cols, 2 * t};
      const cuda::Fp8Dual du{c.get() + cols, s.get() + t, ctu.get(), stu.get(), 2 * cols, 2 * t};
      if (bf16)
        cuda::swiglu_backward_quantize_dual_both(dhb.get(), gw, uw, rows, cols, ld, db.get(), groups, dg, du);
      else
        cuda::swiglu_backward_quantize_dual_both(dh.get(), g.get(), u.get(), rows, cols, 0, db.get(), groups, dg, du);
      CUDA_CHECK(cudaDeviceSynchronize());
      codes = c.download(), scales = s.download();
      codes_t = ctg.download(), scales_t = stg.download();
      const std::vector<uint8_t> cu = ctu.download();
      const std::vector<float> su = stu.download();
      codes_t.insert(codes_t.end(), cu.begin(), cu.end());
      scales_t.insert(scales_t.end(), su.begin(), su.end());
    };
    std::vector<uint8_t> c32, c16, ct32, ct16;
    std::vector<float> s32, s16, st32, st16;
    backward(false, c32, s32, ct32, st32);
    backward(true, c16, s16, ct16, st16);
    expect_same_bits(c16, c32, what + " [dg | du] row codes");
    expect_same_bits(s16, s32, what + " [dg | du] row scales");
    expect_same_bits(ct16, ct32, what + " dg, du token codes");
    expect_same_bits(st16, st32, what + " dg, du token scales");
  }
  std::printf("[ fp8 fused ] SwiGLU from BF16 g | u and dh: the bytes of the FP32 kernels on the widened values\n");
}

// The rows' scales [rows, tiles] (the CPU's layout) as cuBLASLt's grouped VEC128 layout: each group's
// [tiles, n_g] at bounds[g] · tiles (moe_grouped_vec128_scales's).
std::vector<float> grouped_lt_scales(const std::vector<float>& cpu, const std::vector<int64_t>& bounds, int64_t t) {
  std::vector<float> lt(cpu.size());
  for (size_t g = 0; g + 1 < bounds.size(); ++g)
    for (int64_t first = bounds[g], n = bounds[g + 1] - first, r = 0; r < n; ++r)
      for (int64_t kb = 0; kb < t; ++kb) lt[first * t + kb * n + r] = cpu[(first + r) * t + kb];
  return lt;
}

// The fused SwiGLU kernels asked for the GEMM's scale layout (Fp8Dual::rows_lt / cols_lt, as the FP8 experts ask
// on the cuBLASLt path) write the CPU layout's scales rearranged as cuBLASLt reads them, and the same codes: the
// forward (tile kernel) and both backward forms (pipelined: [dg | du] side by side, du's tiles after dg's by
// scales_col0), FP32 and BF16 inputs.
TEST_F(Fp8FusedGpu, SwigluFusedKernelsWriteTheGemmScaleLayoutWhenAsked) {
  std::mt19937_64 rng(run_seed() + 107);
  const std::vector<int64_t> bounds = {0, 256, 256, 384};  // an empty group in the middle
  const int64_t groups = static_cast<int64_t>(bounds.size()) - 1, rows = bounds.back();
  DeviceBuffer<int64_t> db(bounds);
  for (int64_t cols : {256, 208}) {
    const int64_t n = rows * cols, t = tiles(cols), rt = rows / 128;
    const std::string what = shape_name(rows, cols);
    DeviceBuffer<float> g(normal_values(static_cast<size_t>(n), 3.0f, rng)),
        u(normal_values(static_cast<size_t>(n), 1.0f, rng)), dh(random_activation(rows, cols, rng));
    std::vector<uint16_t> g16(static_cast<size_t>(n)), u16(g16.size()), dh16(g16.size());
    for (auto [d, b] : {std::pair{&g, &g16}, std::pair{&u, &u16}, std::pair{&dh, &dh16}}) {
      const std::vector<float> v = d->download();
      for (size_t i = 0; i < v.size(); ++i) (*b)[i] = bf16_from_float(v[i]);
    }
    DeviceBuffer<uint16_t> gb(g16), ub(u16), dhb(dh16);
    auto token_lt = [&](const std::vector<float>& cpu) {  // [cols, rt] -> [rt, cols]
      std::vector<float> lt(cpu.size());
      fp8::cuda::scales_to_cublaslt_host(cpu.data(), cols, rows, 1, lt.data());
      return lt;
    };
    {  // forward: h both ways
      DeviceBuffer<float> s(rows * t), st(cols * rt), s2(rows * t), st2(cols * rt);
      DeviceBuffer<uint8_t> c(n), ct(n), c2(n), ct2(n);
      for (auto* b : {&s2, &st2}) b->poison();
      for (auto* b : {&c2, &ct2}) b->poison();
      cuda::swiglu_forward_quantize_dual(g.get(), u.get(), rows, cols, 0, nullptr, db.get(), groups,
                                         cuda::Fp8Dual{c.get(), s.get(), ct.get(), st.get()});
      cuda::swiglu_forward_quantize_dual(g.get(), u.get(), rows, cols, 0, nullptr, db.get(), groups,
                                         cuda::Fp8Dual{c2.get(), s2.get(), ct2.get(), st2.get(), 0, 0, true, true});
      CUDA_CHECK(cudaDeviceSynchronize());
      expect_same_bits(c2.download(), c.download(), what + " forward row codes");
      expect_same_bits(ct2.download(), ct.download(), what + " forward token codes");
      expect_same_bits(s2.download(), grouped_lt_scales(s.download(), bounds, t), what + " forward row scales");
      expect_same_bits(st2.download(), token_lt(st.download()), what + " forward token scales");
    }
    for (bool bf16 : {false, true}) {  // backward: [dg | du] row codes side by side
      const std::string form = what + (bf16 ? " BF16" : " FP32") + " backward";
      auto run = [&](bool lt, DeviceBuffer<uint8_t>& c, DeviceBuffer<float>& sc, DeviceBuffer<uint8_t>& ctg,
                     DeviceBuffer<float>& stg, DeviceBuffer<uint8_t>& ctu, DeviceBuffer<float>& stu) {
        for (auto* b : {&sc, &stg, &stu}) b->poison();
        for (auto* b : {&c, &ctg, &ctu}) b->poison();
        const cuda::Fp8Dual dg{c.get(), sc.get(), ctg.get(), stg.get(), 2 * cols, 2 * t, lt, lt, 0};
        const cuda::Fp8Dual du{c.get() + cols, sc.get(), ctu.get(), stu.get(), 2 * cols, 2 * t, lt, lt, t};
        if (bf16)
          cuda::swiglu_backward_quantize_dual_both(dhb.get(), gb.get(), ub.get(), rows, cols, 0, db.get(), groups, dg,
                                                   du);
        else
          cuda::swiglu_backward_quantize_dual_both(dh.get(), g.get(), u.get(), rows, cols, 0, db.get(), groups, dg,
                                                   du);
        CUDA_CHECK(cudaDeviceSynchronize());
      };
      DeviceBuffer<uint8_t> c(2 * n), ctg(n), ctu(n), c2(2 * n), ctg2(n), ctu2(n);
      DeviceBuffer<float> sc(rows * 2 * t), stg(cols * rt), stu(cols * rt), sc2(rows * 2 * t), stg2(cols * rt),
          stu2(cols * rt);
      run(false, c, sc, ctg, stg, ctu, stu);
      run(true, c2, sc2, ctg2, stg2, ctu2, stu2);
      expect_same_bits(c2.download(), c.download(), form + " [dg | du] row codes");
      expect_same_bits(ctg2.download(), ctg.download(), form + " dg token codes");
      expect_same_bits(ctu2.download(), ctu.download(), form + " du token codes");
      expect_same_bits(sc2.download(), grouped_lt_scales(sc.download(), bounds, 2 * t), form + " [dg | du] row scales");
      expect_same_bits(stg2.download(), token_lt(stg.download()), form + " dg token scales");
      expect_same_bits(stu2.download(), token_lt(stu.download()), form + " du token scales");
    }
  }
  std::printf("[ fp8 fused ] SwiGLU's fused quantizations in cuBLASLt's scale layout: the CPU layout's scales "
              "rearranged, the same codes\n");
}

TEST_F(Fp8FusedGpu, ReportsBandwidth) {
  // Bytes per call: FP32 inputs read once, codes and scales (and h) written.
  std::mt19937_64 rng(run_seed() + 104);
  {
    const int64_t rows = 8192, cols = 8192, n = rows * cols;
    DeviceBuffer<float> x(normal_values(static_cast<size_t>(n), 1.0f, rng)), s(n / 64), st(n / 64);
    DeviceBuffer<uint8_t> c(n), ct(n);
    const double one_way = 5.0 * n + 4.0 * n / 128;
    for (TransposedKernel k : {TransposedKernel::Cols32, TransposedKernel::Tiles64}) {
      const double ms = median_ms([&] { fp8::cuda::quantize_1x128_transposed_with(k, x.get(), rows, cols, ct.get(), st.get()); });
      std::printf("[ fp8 fused ] quantize_1x128_transposed %s 8192x8192: %.1f us, %.0f GB/s\n",
                  fp8::cuda::transposed_kernel_name(k), ms * 1e3, one_way / ms / 1e6);
    }
    const double separate = median_ms([&] {
      fp8::cuda::quantize_1x128(x.get(), rows, cols, c.get(), s.get());
      fp8::cuda::quantize_1x128_transposed(x.get(), rows, cols, ct.get(), st.get());
    });
    const double dual = median_ms([&] {
      fp8::cuda::quantize_1x128_dual(x.get(), rows, cols, nullptr, 0, c.get(), s.get(), ct.get(), st.get());
    });
    std::printf("[ fp8 fused ] quantize_1x128_dual 8192x8192: %.1f us, %.0f GB/s (quantize_1x128 + transposed: "
                "%.1f us)\n",
                dual * 1e3, (4.0 * n + 2 * (n + 4.0 * n / 128)) / dual / 1e6, separate * 1e3);
  }
  {
    // The routed experts' [rows, I] at the MoE benchmark's shape (16384 tokens x top-6, I = 1408).
    const int64_t rows = 98304, cols = 1408, n = rows * cols;
    std::vector<int64_t> bounds = {0, rows};
    DeviceBuffer<int64_t> db(bounds);
    DeviceBuffer<float> g(normal_values(static_cast<size_t>(n), 1.0f, rng)), u(n), dh(n), h(n), dg(n), du(n);
    CUDA_CHECK(cudaMemcpy(u.get(), g.get(), n * sizeof(float), cudaMemcpyDeviceToDevice));
    CUDA_CHECK(cudaMemcpy(dh.get(), g.get(), n * sizeof(float), cudaMemcpyDeviceToDevice));
    DeviceBuffer<float> s(rows * tiles(cols)), st(cols * rows / 128);
    DeviceBuffer<uint8_t> c(n), ct(n);
    const double fwd = median_ms([&] { cuda::swiglu_forward_quantize_1x128(g.get(), u.get(), rows, cols, 0, h.get(), c.get(), s.get()); });
    const double fwd_separate = median_ms([&] {
      cuda::swiglu_forward(g.get(), u.get(), h.get(), n);
      fp8::cuda::quantize_1x128(h.get(), rows, cols, c.get(), s.get());
    });
    const double bwd = median_ms([&] {
      for (bool gate : {true, false})
        cuda::swiglu_backward_quantize_dual(dh.get(), g.get(), u.get(), rows, cols, 0, gate, db.get(), 1, c.get(), s.get(),
                                            ct.get(), st.get());
    });
    const double bwd_separate = median_ms([&] {
      cuda::swiglu_backward(dh.get(), g.get(), u.get(), dg.get(), du.get(), n);
      for (const float* grad : {dg.get(), du.get()}) {
        fp8::cuda::quantize_1x128(grad, rows, cols, c.get(), s.get());
        fp8::cuda::quantize_1x128_transposed_grouped(grad, rows, cols, db.get(), 1, ct.get(), st.get());
      }
    });
    std::printf("[ fp8 fused ] SwiGLU + quantization %lldx%lld: forward fused %.3f ms (unfused %.3f), backward fused "
                "%.3f ms (unfused %.3f)\n",
                static_cast<long long>(rows), static_cast<long long>(cols), fwd, fwd_separate, bwd, bwd_separate);
  }
}

}  // namespace
}  // namespace moerl::moe_gpu_test
