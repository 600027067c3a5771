// GPU tests of the FP8 quantization kernels (kernels/cuda/fp8_quantize.cu): every kernel must give the
// bytes of the CPU reference (kernels/cpu/fp8.cpp) exactly, on random inputs drawn with a fresh seed each
// run (printed; MOERL_TEST_SEED=<n> repeats a run), outputs poisoned before each launch. Also prints the
// kernels' bandwidth. Needs a GPU: skipped without one.
#include <cuda_runtime_api.h>
#include <gtest/gtest.h>

#include <bit>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <random>
#include <sstream>
#include <string>
#include <utility>
#include <vector>

#include "kernels/cuda/cuda_check.hpp"
#include "kernels/fp8.hpp"
#include "kernels/fp8_gemm.hpp"
#include "kernels/fp8_quantize.hpp"
#include "tests/gpu/gpu_test_support.hpp"

namespace moerl::fp8 {
namespace {

using gpu_test::DeviceBuffer;
using gpu_test::run_seed;

// Poison of the outputs, as these tests have always used: codes 0xA5 and scales a negative float (every scale the
// kernels write is positive).
constexpr int kPoison = 0xA5;

enum class Kind { Tiles1x128, Blocks128x128, Transposed };
const char* kind_name(Kind k) {
  return k == Kind::Tiles1x128 ? "quantize_1x128" : k == Kind::Blocks128x128 ? "quantize_128x128" : "quantize_1x128_transposed";
}
int64_t scale_count(Kind k, int64_t rows, int64_t cols) {
  switch (k) {
    case Kind::Tiles1x128: return rows * tiles(cols);
    case Kind::Blocks128x128: return tiles(rows) * tiles(cols);
    case Kind::Transposed: return cols * tiles(rows);
  }
  return 0;
}
void run_cpu(Kind k, const float* x, int64_t rows, int64_t cols, uint8_t* codes, float* scales) {
  switch (k) {
    case Kind::Tiles1x128: return cpu::quantize_1x128(x, rows, cols, codes, scales);
    case Kind::Blocks128x128: return cpu::quantize_128x128(x, rows, cols, codes, scales);
    case Kind::Transposed: return cpu::quantize_1x128_transposed(x, rows, cols, codes, scales);
  }
}
void run_gpu(Kind k, const float* x, int64_t rows, int64_t cols, uint8_t* codes, float* scales) {
  switch (k) {
    case Kind::Tiles1x128: return cuda::quantize_1x128(x, rows, cols, codes, scales);
    case Kind::Blocks128x128: return cuda::quantize_128x128(x, rows, cols, codes, scales);
    case Kind::Transposed: return cuda::quantize_1x128_transposed(x, rows, cols, codes, scales);
  }
}

// Runs kernel `k` on x [rows, cols] (uploaded `offset` floats past a cudaMalloc'd, 256-byte aligned start,
// to reach the unaligned scalar path) and expects the CPU's bytes.
void expect_same_bytes_as_cpu(Kind k, const std::vector<float>& x, int64_t rows, int64_t cols, int offset = 0) {
  SCOPED_TRACE(std::string(kind_name(k)) + " " + std::to_string(rows) + "x" + std::to_string(cols) + " offset " +
               std::to_string(offset) + ", seed " + std::to_string(run_seed()));
  const int64_t n = rows * cols, ns = scale_count(k, rows, cols);
  std::vector<uint8_t> codes(n);
  std::vector<float> scales(ns);
  run_cpu(k, x.data(), rows, cols, codes.data(), scales.data());

  std::vector<float> shifted(offset, 0.0f);
  shifted.insert(shifted.end(), x.begin(), x.end());
  DeviceBuffer<float> dx(shifted.size());
  DeviceBuffer<uint8_t> dcodes(n + 1);
  DeviceBuffer<float> dscales(ns);
  dx.upload(shifted);
  dcodes.fill_bytes(kPoison);
  dscales.fill_bytes(kPoison);
  uint8_t* codes_ptr = dcodes.get() + (offset % 2);  // odd offsets also misalign the codes
  run_gpu(k, dx.get() + offset, rows, cols, codes_ptr, dscales.get());
  CUDA_CHECK(cudaDeviceSynchronize());
  const std::vector<uint8_t> got_all = dcodes.download(n + 1);
  const std::vector<uint8_t> got(got_all.begin() + (offset % 2), got_all.begin() + (offset % 2) + n);
  const std::vector<float> got_scales = dscales.download(ns);

  for (int64_t i = 0; i < ns; ++i)
    if (std::bit_cast<uint32_t>(got_scales[i]) != std::bit_cast<uint32_t>(scales[i]))
      FAIL() << "scale " << i << ": GPU " << got_scales[i] << ", CPU " << scales[i];
  int64_t mismatches = 0;
  for (int64_t i = 0; i < n; ++i)
    if (got[i] != codes[i] && ++mismatches <= 5)
      ADD_FAILURE() << "code " << i << " (row-major in the output): GPU 0x" << std::hex << int{got[i]} << ", CPU 0x"
                    << int{codes[i]};
  EXPECT_EQ(mismatches, 0);
}

// Rows of very different magnitudes (2^-40 .. 2^40), normal within a row, with an all-zero tile, a row
// whose tile is dominated by one value (small ones land on subnormal codes) and a negative row maximum.
std::vector<float> random_input(int64_t rows, int64_t cols, std::mt19937_64& rng) {
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::uniform_int_distribution<int> exponent(-40, 40);
  std::vector<float> x(rows * cols);
  for (int64_t r = 0; r < rows; ++r) {
    const float magnitude = std::ldexp(1.0f, exponent(rng));
    for (int64_t c = 0; c < cols; ++c) x[r * cols + c] = normal(rng) * magnitude;
  }
  if (rows > 1)
    for (int64_t c = 0; c < std::min<int64_t>(cols, kTile); ++c) x[1 * cols + c] = 0.0f;
  if (rows > 2) {
    for (int64_t c = 0; c < cols; ++c) x[2 * cols + c] *= 1e-4f;
    x[2 * cols] = -1000.0f;
  }
  return x;
}

class Fp8QuantizeGpu : public gpu_test::GpuTest {};

TEST_F(Fp8QuantizeGpu, EveryKernelGivesTheCpuBytesOnRandomInputs) {
  std::mt19937_64 rng(run_seed());
  const std::pair<int64_t, int64_t> shapes[] = {{1, 1},   {3, 200},   {130, 7},    {257, 300},
                                                {128, 128}, {512, 1024}, {1000, 4100}, {4096, 7168}};
  for (auto [rows, cols] : shapes) {
    const std::vector<float> x = random_input(rows, cols, rng);
    for (Kind k : {Kind::Tiles1x128, Kind::Blocks128x128, Kind::Transposed}) expect_same_bytes_as_cpu(k, x, rows, cols);
  }
}

TEST_F(Fp8QuantizeGpu, UnalignedPointersTakeTheScalarPathWithTheSameBytes) {
  std::mt19937_64 rng(run_seed() + 1);
  const std::vector<float> x = random_input(300, 512, rng);
  for (int offset : {1, 2, 3})
    for (Kind k : {Kind::Tiles1x128, Kind::Blocks128x128, Kind::Transposed}) expect_same_bytes_as_cpu(k, x, 300, 512, offset);
}

TEST_F(Fp8QuantizeGpu, ConvertsTiesSubnormalsAndSpecialValuesAsTheCpuDoes) {
  // A tile whose amax is 448 has scale exactly 1, so its codes are the plain conversion of its values:
  // every E4M3 value, every midpoint between neighbours (ties to even), the floats either side of each
  // midpoint, signed zeros and NaN (ignored by amax, converted to 0x7F).
  std::vector<float> values;
  for (int c = 0; c < 0x7E; ++c) {
    const float v = float_from_e4m3(static_cast<uint8_t>(c)), next = float_from_e4m3(static_cast<uint8_t>(c + 1));
    const float mid = (v + next) / 2;  // exact: one more bit than E4M3 has
    for (float f : {v, mid, std::nextafter(mid, 0.0f), std::nextafter(mid, 1e9f)}) {
      values.push_back(f);
      values.push_back(-f);
    }
  }
  values.push_back(std::numeric_limits<float>::quiet_NaN());
  values.push_back(-std::numeric_limits<float>::quiet_NaN());
  values.push_back(-0.0f);
  std::vector<float> x;
  for (size_t i = 0; i < values.size(); i += kTile - 1) {
    x.push_back(448.0f);
    for (size_t j = i; j < std::min(values.size(), i + kTile - 1); ++j) x.push_back(values[j]);
    while (x.size() % kTile != 0) x.push_back(0.0f);
  }
  const int64_t rows = static_cast<int64_t>(x.size()) / kTile;
  expect_same_bytes_as_cpu(Kind::Tiles1x128, x, rows, kTile);
  // A tile holding Inf: scale Inf, every code x / Inf (0, or NaN for the Inf itself), as on the CPU.
  std::vector<float> inf_tile(kTile, 1.0f);
  inf_tile[5] = std::numeric_limits<float>::infinity();
  expect_same_bytes_as_cpu(Kind::Tiles1x128, inf_tile, 1, kTile);
}

// The weight quantization that also writes the codes transposed (quantize_128x128_with_transpose): per matrix of a
// batch, the CPU's codes and scales and codes_t = the CPU codes' byte transpose, exactly. Shapes: whole blocks,
// partial row and column blocks (the bench-600m experts' 704 rows or columns), a batch of three with each matrix
// its own magnitude (a block read from the wrong matrix shows), and rows that are a multiple of 16 only.
TEST_F(Fp8QuantizeGpu, WeightCodesAndTheirTransposeComeFromOnePass) {
  std::mt19937_64 rng(run_seed() + 3);
  struct Shape {
    int64_t batch, rows, cols;
  };
  for (const Shape sh : {Shape{1, 128, 128}, Shape{1, 704, 1024}, Shape{2, 1024, 704}, Shape{3, 208, 384},
                         Shape{1, 16, 200}, Shape{1, 2048, 256}}) {
    const int64_t n = sh.rows * sh.cols, ns = tiles(sh.rows) * tiles(sh.cols);
    SCOPED_TRACE(std::to_string(sh.batch) + " x " + std::to_string(sh.rows) + "x" + std::to_string(sh.cols) +
                 ", seed " + std::to_string(run_seed()));
    std::vector<float> w;
    for (int64_t b = 0; b < sh.batch; ++b) {
      std::vector<float> one = random_input(sh.rows, sh.cols, rng);
      for (float& v : one) v = std::ldexp(v, static_cast<int>(b) * 5);
      w.insert(w.end(), one.begin(), one.end());
    }
    std::vector<uint8_t> codes(sh.batch * n), codes_t(sh.batch * n);
    std::vector<float> scales(sh.batch * ns);
    for (int64_t b = 0; b < sh.batch; ++b) {
      cpu::quantize_128x128(w.data() + b * n, sh.rows, sh.cols, codes.data() + b * n, scales.data() + b * ns);
      for (int64_t r = 0; r < sh.rows; ++r)
        for (int64_t c = 0; c < sh.cols; ++c) codes_t[b * n + c * sh.rows + r] = codes[b * n + r * sh.cols + c];
    }
    DeviceBuffer<float> dw(w.size()), dscales(scales.size());
    DeviceBuffer<uint8_t> dcodes(codes.size()), dcodes_t(codes.size());
    dw.upload(w);
    dcodes.fill_bytes(kPoison), dcodes_t.fill_bytes(kPoison), dscales.fill_bytes(kPoison);
    cuda::quantize_128x128_with_transpose(dw.get(), sh.batch, sh.rows, sh.cols, dcodes.get(), dscales.get(),
                                          dcodes_t.get());
    CUDA_CHECK(cudaDeviceSynchronize());
    EXPECT_EQ(dcodes.download(codes.size()), codes) << "codes";
    EXPECT_EQ(dcodes_t.download(codes.size()), codes_t) << "transposed codes";
    const std::vector<float> got_scales = dscales.download(scales.size());
    for (size_t i = 0; i < scales.size(); ++i)
      ASSERT_EQ(std::bit_cast<uint32_t>(got_scales[i]), std::bit_cast<uint32_t>(scales[i])) << "scale " << i;
  }
  // Rows not a multiple of 16: the transposed codes' 16-byte rows would split; refused, naming the requirement.
  DeviceBuffer<float> dw(130 * 128);
  DeviceBuffer<uint8_t> dc(130 * 128), dct(130 * 128);
  DeviceBuffer<float> ds(4);
  try {
    cuda::quantize_128x128_with_transpose(dw.get(), 1, 130, 128, dc.get(), ds.get(), dct.get());
    ADD_FAILURE() << "130 rows were accepted";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("multiple of 16"), std::string::npos) << e.what();
  }
}

// ScaleLayout::Cublaslt: the same codes, and the CPU layout's scales rearranged as the GEMM reads them
// (scales_to_cublaslt_host; the rows of quantize_1x128_dual per group of bounds, moe_grouped_vec128_scales's
// layout), for shapes the one-pass tile kernels take (256 x 384) and shapes left to the others (200 x 300).
TEST_F(Fp8QuantizeGpu, CublasLtScaleLayoutIsTheCpuScalesRearranged) {
  std::mt19937_64 rng(run_seed() + 5);
  const cuda::ScaleLayout cpu = cuda::ScaleLayout::Cpu, lt = cuda::ScaleLayout::Cublaslt;
  auto vec128 = [](const std::vector<float>& s, int64_t rows, int64_t cols) {  // [rows, tiles(cols)] -> [tiles, rows]
    std::vector<float> out(s.size());
    cuda::scales_to_cublaslt_host(s.data(), rows, cols, 1, out.data());
    return out;
  };
  auto same_bits = [](const std::vector<float>& a, const std::vector<float>& b) {
    return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(float)) == 0;
  };
  for (auto [rows, cols] : {std::pair<int64_t, int64_t>{256, 384}, {200, 300}}) {
    SCOPED_TRACE(std::to_string(rows) + "x" + std::to_string(cols) + ", seed " + std::to_string(run_seed()));
    const int64_t n = rows * cols, ns = rows * tiles(cols), nt = cols * tiles(rows);
    DeviceBuffer<float> x(n), s(ns), s2(ns), st(nt), st2(nt);
    DeviceBuffer<uint8_t> c(n), c2(n), ct(n), ct2(n);
    x.upload(random_input(rows, cols, rng));
    for (auto* b : {&s2, &st2}) b->fill_bytes(kPoison);
    for (auto* b : {&c2, &ct2}) b->fill_bytes(kPoison);
    cuda::quantize_1x128(x.get(), rows, cols, c.get(), s.get(), nullptr, cpu);
    cuda::quantize_1x128(x.get(), rows, cols, c2.get(), s2.get(), nullptr, lt);
    cuda::quantize_1x128_transposed(x.get(), rows, cols, ct.get(), st.get(), nullptr, cpu);
    cuda::quantize_1x128_transposed(x.get(), rows, cols, ct2.get(), st2.get(), nullptr, lt);
    CUDA_CHECK(cudaDeviceSynchronize());
    EXPECT_EQ(c2.download(), c.download()) << "quantize_1x128 codes";
    EXPECT_TRUE(same_bits(s2.download(), vec128(s.download(), rows, cols))) << "quantize_1x128 scales";
    EXPECT_EQ(ct2.download(), ct.download()) << "quantize_1x128_transposed codes";
    EXPECT_TRUE(same_bits(st2.download(), vec128(st.download(), cols, rows))) << "quantize_1x128_transposed scales";

    for (auto* b : {&s2, &st2}) b->fill_bytes(kPoison);
    for (auto* b : {&c2, &ct2}) b->fill_bytes(kPoison);
    cuda::quantize_1x128_dual(x.get(), rows, cols, nullptr, 0, c2.get(), s2.get(), ct2.get(), st2.get(), nullptr, lt);
    CUDA_CHECK(cudaDeviceSynchronize());
    EXPECT_EQ(c2.download(), c.download()) << "quantize_1x128_dual row codes";
    EXPECT_EQ(ct2.download(), ct.download()) << "quantize_1x128_dual token codes";
    EXPECT_TRUE(same_bits(s2.download(), vec128(s.download(), rows, cols))) << "quantize_1x128_dual row scales";
    EXPECT_TRUE(same_bits(st2.download(), vec128(st.download(), cols, rows))) << "quantize_1x128_dual token scales";
    if (rows % kTile != 0) continue;

    // Grouped rows (an empty group between): each group's rows [tiles, n_g] at bounds[g] · tiles.
    const std::vector<int64_t> bounds = {0, 128, 128, rows};
    const int64_t groups = static_cast<int64_t>(bounds.size()) - 1, t = tiles(cols);
    DeviceBuffer<int64_t> db(bounds);
    for (auto* b : {&s, &st, &s2, &st2}) b->fill_bytes(kPoison);
    cuda::quantize_1x128_dual(x.get(), rows, cols, db.get(), groups, c.get(), s.get(), ct.get(), st.get(), nullptr, cpu);
    cuda::quantize_1x128_dual(x.get(), rows, cols, db.get(), groups, c2.get(), s2.get(), ct2.get(), st2.get(), nullptr,
                              lt);
    CUDA_CHECK(cudaDeviceSynchronize());
    const std::vector<float> rows_cpu = s.download();
    std::vector<float> grouped(rows_cpu.size());
    for (int64_t g = 0; g < groups; ++g)
      for (int64_t first = bounds[g], m = bounds[g + 1] - first, r = 0; r < m; ++r)
        for (int64_t kb = 0; kb < t; ++kb) grouped[first * t + kb * m + r] = rows_cpu[(first + r) * t + kb];
    EXPECT_EQ(c2.download(), c.download()) << "grouped quantize_1x128_dual row codes";
    EXPECT_EQ(ct2.download(), ct.download()) << "grouped quantize_1x128_dual token codes";
    EXPECT_TRUE(same_bits(s2.download(), grouped)) << "grouped quantize_1x128_dual row scales";
    EXPECT_TRUE(same_bits(st2.download(), vec128(st.download(), cols, rows))) << "grouped quantize_1x128_dual token scales";
    st2.fill_bytes(kPoison);
    cuda::quantize_1x128_transposed_grouped(x.get(), rows, cols, db.get(), groups, ct2.get(), st2.get(), nullptr, lt);
    CUDA_CHECK(cudaDeviceSynchronize());
    EXPECT_EQ(ct2.download(), ct.download()) << "quantize_1x128_transposed_grouped codes";
    EXPECT_TRUE(same_bits(st2.download(), vec128(st.download(), cols, rows))) << "quantize_1x128_transposed_grouped scales";
  }
}

TEST_F(Fp8QuantizeGpu, RefusesNegativeSizes) {
  EXPECT_THROW(cuda::quantize_1x128(nullptr, -1, 128, nullptr, nullptr), Error);
  EXPECT_NO_THROW(cuda::quantize_1x128(nullptr, 0, 128, nullptr, nullptr));  // empty: nothing launched
}

TEST_F(Fp8QuantizeGpu, ReportsBandwidth) {
  // Bytes moved per call: FP32 input read once, one code byte and the scales written.
  const int64_t rows = 8192, cols = 7168, n = rows * cols;
  std::mt19937_64 rng(run_seed() + 2);
  const std::vector<float> x = random_input(rows, cols, rng);
  DeviceBuffer<float> dx(n);
  DeviceBuffer<uint8_t> dcodes(n);
  DeviceBuffer<float> dscales(cols * tiles(rows) + rows * tiles(cols));
  dx.upload(x);
  for (Kind k : {Kind::Tiles1x128, Kind::Blocks128x128, Kind::Transposed}) {
    const double seconds =
        gpu_test::median_ms([&] { run_gpu(k, dx.get(), rows, cols, dcodes.get(), dscales.get()); }, 20) / 1e3;
    const double bytes = static_cast<double>(n) * (4 + 1) + 4.0 * scale_count(k, rows, cols);
    std::ostringstream line;
    line << kind_name(k) << " " << rows << "x" << cols << ": " << seconds * 1e6 << " us, " << bytes / seconds / 1e9
         << " GB/s";
    std::printf("%s\n", line.str().c_str());
    RecordProperty(kind_name(k), line.str());
  }
}

}  // namespace
}  // namespace moerl::fp8
