// GPU tests of the routed experts' FP8 path on aligned rows (kernels/cuda/moe_fp8.hpp): the plan moved to aligned
// rows, gather, the zero rows, the grouped scale layout and the aligned combine against plain loops (exact), the
// grouped transposed quantization against fp8::cpu::quantize_1x128_transposed per expert (bit for bit), and
// the experts' forward and backward against kernels/cpu's FP8 recipe per expert (cpu::linear_forward /
// linear_backward with Precision::FP8, cpu::swiglu_*). Fresh seed per run (printed; MOERL_TEST_SEED=<n> repeats
// it), outputs poisoned with NaN (or -1) first, one line per comparison.
//
// Tolerance of the experts (relative L2 error, ||gpu - cpu|| / ||cpu||; NaN fails): both sides quantize the same
// values into the same E4M3 codes and scales, so a single GEMM differs by its sums only (rel_l2 < 1e-3,
// tests/gpu/linear_gpu.cpp, measured 1.3e-4). Chained GEMMs also re-quantize an intermediate (h, dh's dg and du)
// whose sums differ by about 2^-14 relative (the tensor cores' 128-groups), which moves a fraction ~2^-14 / 2^-4 of
// its elements by one E4M3 step (2^-4 relative): sqrt(6e-4) · 2^-4 = 1.5e-3 per re-quantized intermediate, at
// most three on any path. Limit 1e-2. A wrong expert's rows, weights or scales gives errors of order 1; a lost
// zero row or a tile straddling two experts changes whole tiles (> 3e-2 here, every expert has a partial tile).
#include <cuda_runtime_api.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <limits>
#include <random>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "kernels/cuda/cuda_check.hpp"
#include "kernels/cuda/linear.hpp"
#include "kernels/cuda/moe_fp8.hpp"
#include "kernels/fp8.hpp"
#include "kernels/fp8_gemm.hpp"
#include "kernels/fp8_quantize.hpp"
#include "kernels/half.hpp"
#include "kernels/linear.hpp"
#include "kernels/swiglu.hpp"
#include "tests/gpu/moe_gpu_support.hpp"

namespace moerl {
namespace {

using moe_gpu_test::DeviceBuffer;
using moe_gpu_test::normal_values;
using moe_gpu_test::rel_l2;
using moe_gpu_test::run_seed;
using MoeFp8Gpu = moe_gpu_test::GpuTest;


// Expert sizes with an empty expert, partial tiles, an exact multiple of 128 and one above.
const std::vector<int64_t> kCounts = {130, 0, 77, 256, 5, 300};

std::vector<int64_t> aligned_of(const std::vector<int64_t>& counts) {
  std::vector<int64_t> offsets(counts.size() + 1, 0), aligned(counts.size() + 1, 0);
  for (size_t e = 0; e < counts.size(); ++e) offsets[e + 1] = offsets[e] + counts[e];
  cuda::moe_aligned_offsets(offsets.data(), static_cast<int64_t>(counts.size()), aligned.data());
  return aligned;
}

// The gathered quantizations' tile order (cuda::moe_row_tile_order, on the device): every row tile once, ordered by
// its place in its expert ((i + 1/2) / m), experts in order on ties; experts without rows have no tiles. Against the
// hand-made order of kCounts and a stable sort on the host for random sizes (ties included: equal tile counts).
std::vector<int32_t> tile_order_on_host(const std::vector<int64_t>& aligned) {
  struct Tile {
    int64_t i, m;
    int32_t rt;
  };
  std::vector<Tile> tiles;
  for (size_t e = 0; e + 1 < aligned.size(); ++e) {
    const int64_t first = aligned[e] / 128, m = aligned[e + 1] / 128 - first;
    for (int64_t i = 0; i < m; ++i) tiles.push_back({i, m, static_cast<int32_t>(first + i)});
  }
  std::stable_sort(tiles.begin(), tiles.end(),
                   [](const Tile& a, const Tile& b) { return (2 * a.i + 1) * b.m < (2 * b.i + 1) * a.m; });
  std::vector<int32_t> order;
  for (const Tile& t : tiles) order.push_back(t.rt);
  return order;
}

std::vector<int32_t> tile_order_on_device(const std::vector<int64_t>& aligned) {
  DeviceBuffer<int64_t> d_aligned(aligned);
  DeviceBuffer<int32_t> d_order(aligned.back() / 128);
  d_order.poison();
  cuda::moe_row_tile_order(d_aligned.get(), static_cast<int64_t>(aligned.size()) - 1, aligned.back(), d_order.get());
  CUDA_CHECK(cudaDeviceSynchronize());
  return d_order.download();
}

TEST_F(MoeFp8Gpu, RowTileOrderTakesEveryTileOnceByItsPlaceInItsExpert) {
  // Tiles per expert 2, 0, 1, 2, 1, 3 (row tiles 0-1, -, 2, 3-4, 5, 6-8): places 1/4 3/4, 1/2, 1/4 3/4, 1/2,
  // 1/6 1/2 5/6.
  EXPECT_EQ(tile_order_on_device(aligned_of(kCounts)), (std::vector<int32_t>{6, 0, 3, 2, 5, 7, 1, 4, 8}));
  std::mt19937_64 rng(run_seed() + 43);
  std::uniform_int_distribution<int64_t> count(0, 40 * 128);
  for (int round = 0; round < 4; ++round) {
    std::vector<int64_t> counts(static_cast<size_t>(round == 0 ? 64 : 8 + 40 * round));
    for (int64_t& c : counts) c = round == 1 ? 1536 : count(rng);  // round 1: every expert alike, all ties
    const std::vector<int64_t> aligned = aligned_of(counts);
    EXPECT_EQ(tile_order_on_device(aligned), tile_order_on_host(aligned)) << "round " << round;
  }
  std::printf("[ moe fp8  ] row tile order: the hand-made order and a host sort's for 4 random expert sizes\n");
}

TEST_F(MoeFp8Gpu, AlignedPlanGatherScalesAndCombineMatchPlainLoops) {
  std::mt19937_64 rng(run_seed() + 31);
  const int64_t E = static_cast<int64_t>(kCounts.size()), dim = 132, tiles = 3;
  // A plan: rows in expert order, each assigned to a random token (T tokens, K = 1 so row_of is a permutation).
  std::vector<int64_t> offsets(E + 1, 0);
  for (int64_t e = 0; e < E; ++e) offsets[e + 1] = offsets[e] + kCounts[e];
  const int64_t R = offsets[E], T = R;
  std::vector<int64_t> token_of(R), row_of(T);
  for (int64_t r = 0; r < R; ++r) token_of[r] = r;
  std::shuffle(token_of.begin(), token_of.end(), rng);
  for (int64_t r = 0; r < R; ++r) row_of[token_of[r]] = r;
  const std::vector<int64_t> aligned = aligned_of(kCounts);
  const int64_t RA = aligned[E];
  ASSERT_EQ(RA, 256 + 0 + 128 + 256 + 128 + 384);

  DeviceBuffer<int64_t> d_off(offsets), d_aligned(aligned), d_token(token_of), d_row(row_of);
  DeviceBuffer<int64_t> d_token_a(RA), d_row_a(T);
  d_row_a.poison();
  cuda::moe_align_plan(d_off.get(), d_aligned.get(), E, d_token.get(), d_row.get(), R, RA, d_token_a.get(),
                       d_row_a.get());
  std::vector<int64_t> ref_token_a(RA, -1), ref_row_a(T);
  for (int64_t e = 0; e < E; ++e)
    for (int64_t i = 0; i < kCounts[e]; ++i) ref_token_a[aligned[e] + i] = token_of[offsets[e] + i];
  for (int64_t t = 0; t < T; ++t) ref_row_a[t] = -2;
  for (int64_t a = 0; a < RA; ++a)
    if (ref_token_a[a] >= 0) ref_row_a[ref_token_a[a]] = a;
  EXPECT_EQ(d_token_a.download(), ref_token_a);
  EXPECT_EQ(d_row_a.download(), ref_row_a);

  // Gather (zero rows zero) and zero_rows.
  const std::vector<float> x = normal_values(static_cast<size_t>(T * dim), 1.0f, rng);
  DeviceBuffer<float> d_x(x), d_xp(RA * dim);
  d_xp.poison();
  cuda::moe_gather_or_zero(d_x.get(), d_token_a.get(), RA, dim, d_xp.get());
  std::vector<float> ref_xp(static_cast<size_t>(RA * dim), 0.0f);
  for (int64_t a = 0; a < RA; ++a)
    if (ref_token_a[a] >= 0)
      for (int64_t j = 0; j < dim; ++j) ref_xp[a * dim + j] = x[ref_token_a[a] * dim + j];
  EXPECT_EQ(d_xp.download(), ref_xp);
  d_xp.poison();
  cuda::moe_zero_rows(d_token_a.get(), RA, dim, d_xp.get());
  const std::vector<float> zeroed = d_xp.download();
  int64_t zero_rows_ok = 0, zero_rows = 0;
  for (int64_t a = 0; a < RA; ++a) {
    bool zero = true, nan = true;
    for (int64_t j = 0; j < dim; ++j) zero &= zeroed[a * dim + j] == 0.0f, nan &= std::isnan(zeroed[a * dim + j]);
    if (ref_token_a[a] < 0) ++zero_rows, zero_rows_ok += zero;
    else EXPECT_TRUE(nan) << "moe_zero_rows wrote the plan's row " << a;
  }
  EXPECT_EQ(zero_rows_ok, zero_rows);

  // Grouped VEC128 scales.
  const std::vector<float> src = normal_values(static_cast<size_t>(RA * tiles), 1.0f, rng);
  DeviceBuffer<float> d_src(src), d_dst(RA * tiles);
  d_dst.poison();
  cuda::moe_grouped_vec128_scales(d_src.get(), d_aligned.get(), E, RA, tiles, d_dst.get());
  std::vector<float> ref_dst(src.size());
  for (int64_t e = 0; e < E; ++e) {
    const int64_t first = aligned[e], n = aligned[e + 1] - first;
    for (int64_t r = 0; r < n; ++r)
      for (int64_t kb = 0; kb < tiles; ++kb) ref_dst[first * tiles + kb * n + r] = src[(first + r) * tiles + kb];
  }
  EXPECT_EQ(d_dst.download(), ref_dst);

  // Combine and scatter-add through aligned rows equal the plain sums (K = 1, weight w_t).
  const std::vector<float> w = normal_values(static_cast<size_t>(T), 1.0f, rng);
  DeviceBuffer<float> d_w(w), d_y(T * dim), d_dx(T * dim);
  CUDA_CHECK(cudaMemset(d_y.get(), 0, static_cast<size_t>(T * dim) * sizeof(float)));
  CUDA_CHECK(cudaMemset(d_dx.get(), 0, static_cast<size_t>(T * dim) * sizeof(float)));
  cuda::moe_gather_or_zero(d_x.get(), d_token_a.get(), RA, dim, d_xp.get());
  cuda::moe_combine_aligned(d_xp.get(), d_w.get(), d_row_a.get(), T, 1, dim, RA, d_y.get());
  cuda::moe_scatter_add_aligned(d_xp.get(), d_row_a.get(), T, 1, dim, RA, d_dx.get());
  std::vector<float> ref_y(static_cast<size_t>(T * dim));
  for (int64_t t = 0; t < T; ++t)
    for (int64_t j = 0; j < dim; ++j) ref_y[t * dim + j] = 0.0f + w[t] * x[t * dim + j];
  EXPECT_EQ(d_y.download(), ref_y);
  EXPECT_EQ(d_dx.download(), x);
  // The scatter-add with a tensor added in the same pass: (0 + x) + a, each sum rounded once.
  {
    const std::vector<float> a = normal_values(static_cast<size_t>(T * dim), 1.0f, rng);
    DeviceBuffer<float> d_a(a), d_dx2(T * dim);
    CUDA_CHECK(cudaMemset(d_dx2.get(), 0, static_cast<size_t>(T * dim) * sizeof(float)));
    cuda::moe_scatter_add_aligned_then(d_xp.get(), d_row_a.get(), T, 1, dim, RA, d_a.get(), d_dx2.get());
    std::vector<float> ref(static_cast<size_t>(T * dim));
    for (size_t i = 0; i < ref.size(); ++i) ref[i] = (0.0f + x[i]) + a[i];
    EXPECT_EQ(d_dx2.download(), ref) << "scatter-add then add";
    // The combine with the residual added last: y = (y + w x) + a.
    DeviceBuffer<float> d_y2(ref_y);
    cuda::moe_combine_aligned(d_xp.get(), d_w.get(), d_row_a.get(), T, 1, dim, RA, d_y2.get(), nullptr, d_a.get());
    for (size_t i = 0; i < ref.size(); ++i) ref[i] = (ref_y[i] + w[i / dim] * x[i]) + a[i];
    EXPECT_EQ(d_y2.download(), ref) << "combine then add";
  }
  // Row weights: each aligned row gets its assignment's gating weight (zero rows untouched); the combine's backward
  // without dyp gives the dweight it gives with dyp.
  DeviceBuffer<float> d_rw(RA), d_dyp(RA * dim), d_dw(T), d_dw2(T);
  d_rw.poison(), d_dw.poison(), d_dw2.poison();
  cuda::moe_aligned_row_weights(d_w.get(), d_row_a.get(), T, RA, d_rw.get());
  const std::vector<float> rw = d_rw.download();
  for (int64_t a = 0; a < RA; ++a) {
    if (ref_token_a[a] >= 0)
      EXPECT_EQ(rw[a], w[ref_token_a[a]]) << "row weight of aligned row " << a;
    else
      EXPECT_TRUE(std::isnan(rw[a])) << "moe_aligned_row_weights wrote zero row " << a;
  }
  const std::vector<float> dy = normal_values(static_cast<size_t>(T * dim), 1.0f, rng);
  DeviceBuffer<float> d_dy(dy);
  cuda::moe_combine_backward_aligned(d_dy.get(), d_xp.get(), d_w.get(), d_row_a.get(), T, 1, dim, RA, d_dyp.get(),
                                     d_dw.get());
  cuda::moe_combine_backward_aligned(d_dy.get(), d_xp.get(), d_w.get(), d_row_a.get(), T, 1, dim, RA, nullptr,
                                     d_dw2.get());
  EXPECT_EQ(d_dw2.download(), d_dw.download()) << "dweight without dyp";
  // The combine and its backward from BF16 rows (the FP8 experts' yp) give the FP32 versions' bits on the rows
  // widened, 4 at a time (dim 132) and one at a time (dim 131, the rows' first 131 values).
  for (const int64_t d2 : {dim, dim - 1}) {
    const std::vector<float> xp_h = d_xp.download();  // [RA, dim], zero rows zero
    std::vector<uint16_t> xp16(static_cast<size_t>(RA * d2));
    std::vector<float> widened(xp16.size());
    for (int64_t a = 0; a < RA; ++a)
      for (int64_t j = 0; j < d2; ++j) {
        xp16[a * d2 + j] = bf16_from_float(xp_h[a * dim + j]);
        widened[a * d2 + j] = float_from_bf16(xp16[a * d2 + j]);
      }
    const std::vector<float> dy2 = normal_values(static_cast<size_t>(T * d2), 1.0f, rng);
    DeviceBuffer<uint16_t> d_xp16(xp16);
    DeviceBuffer<float> d_wide(widened), d_dy2(dy2), d_ya(T * d2), d_yb(T * d2), d_dypa(RA * d2), d_dypb(RA * d2),
        d_dwa(T), d_dwb(T);
    for (DeviceBuffer<float>* b : {&d_ya, &d_yb}) b->upload(normal_values(static_cast<size_t>(T * d2), 1.0f, rng));
    CUDA_CHECK(cudaMemcpy(d_yb.get(), d_ya.get(), static_cast<size_t>(T * d2) * sizeof(float), cudaMemcpyDefault));
    for (DeviceBuffer<float>* b : {&d_dypa, &d_dypb, &d_dwa, &d_dwb}) b->poison();
    cuda::moe_combine_aligned(d_xp16.get(), d_w.get(), d_row_a.get(), T, 1, d2, RA, d_ya.get());
    cuda::moe_combine_aligned(d_wide.get(), d_w.get(), d_row_a.get(), T, 1, d2, RA, d_yb.get());
    cuda::moe_combine_backward_aligned(d_dy2.get(), d_xp16.get(), d_w.get(), d_row_a.get(), T, 1, d2, RA,
                                       d_dypa.get(), d_dwa.get());
    cuda::moe_combine_backward_aligned(d_dy2.get(), d_wide.get(), d_w.get(), d_row_a.get(), T, 1, d2, RA,
                                       d_dypb.get(), d_dwb.get());
    EXPECT_EQ(d_ya.download(), d_yb.download()) << "combine of BF16 rows, dim " << d2;
    // The scatter-add of BF16 rows, with a tensor added in the same pass.
    DeviceBuffer<float> d_sa(T * d2), d_sb(T * d2), d_also(normal_values(static_cast<size_t>(T * d2), 1.0f, rng));
    CUDA_CHECK(cudaMemset(d_sa.get(), 0, static_cast<size_t>(T * d2) * sizeof(float)));
    CUDA_CHECK(cudaMemset(d_sb.get(), 0, static_cast<size_t>(T * d2) * sizeof(float)));
    cuda::moe_scatter_add_aligned_then(d_xp16.get(), d_row_a.get(), T, 1, d2, RA, d_also.get(), d_sa.get());
    cuda::moe_scatter_add_aligned_then(d_wide.get(), d_row_a.get(), T, 1, d2, RA, d_also.get(), d_sb.get());
    EXPECT_EQ(d_sa.download(), d_sb.download()) << "scatter-add of BF16 rows, dim " << d2;
    EXPECT_EQ(d_dwa.download(), d_dwb.download()) << "dweight of BF16 rows, dim " << d2;
    const std::vector<float> dypa = d_dypa.download(), dypb = d_dypb.download();  // zero rows: NaN poison in both
    EXPECT_EQ(std::memcmp(dypa.data(), dypb.data(), dypa.size() * sizeof(float)), 0) << "dyp, dim " << d2;
  }
  // Grouped transposed quantization: each expert's rows quantized on their own by the CPU (its zero rows too:
  // they are part of its tiles), codes packed per expert; the scales those of the whole.
  const int64_t cols = 100;  // not a multiple of the kernel's 32-column chunks: its bounds-checked path
  const std::vector<float> q = normal_values(static_cast<size_t>(RA * cols), 3.0f, rng);
  std::vector<float> qz = q;
  for (int64_t a = 0; a < RA; ++a)
    if (ref_token_a[a] < 0)
      for (int64_t j = 0; j < cols; ++j) qz[a * cols + j] = 0.0f;
  DeviceBuffer<float> d_q(qz), d_qs(cols * (RA / 128));
  DeviceBuffer<uint8_t> d_qc(RA * cols);
  d_qs.poison();
  d_qc.poison();
  fp8::cuda::quantize_1x128_transposed_grouped(d_q.get(), RA, cols, d_aligned.get(), E, d_qc.get(), d_qs.get());
  std::vector<uint8_t> ref_codes(static_cast<size_t>(RA * cols));
  std::vector<float> whole_scales(static_cast<size_t>(cols * (RA / 128)));
  std::vector<uint8_t> whole_codes(static_cast<size_t>(RA * cols));
  fp8::cpu::quantize_1x128_transposed(qz.data(), RA, cols, whole_codes.data(), whole_scales.data());
  for (int64_t e = 0; e < E; ++e) {
    const int64_t first = aligned[e], n = aligned[e + 1] - first;
    if (n == 0) continue;
    std::vector<float> s_e(static_cast<size_t>(cols * (n / 128)));
    fp8::cpu::quantize_1x128_transposed(qz.data() + first * cols, n, cols, ref_codes.data() + first * cols,
                                        s_e.data());
  }
  EXPECT_EQ(d_qc.download(), ref_codes);
  EXPECT_EQ(d_qs.download(), whole_scales);

  // Row codes gathered from each token's (moe_gather_rows_fp8): the CPU's 1x128 quantization of the gathered rows,
  // zero rows included (codes 0 and the all-zero tile's scale). 272 columns: a partial last tile of 16.
  {
    const int64_t qcols = 272, qt = fp8::tiles(qcols);
    const std::vector<float> xt = normal_values(static_cast<size_t>(T * qcols), 2.0f, rng);
    std::vector<uint8_t> tok_codes(static_cast<size_t>(T * qcols));
    std::vector<float> tok_scales(static_cast<size_t>(T * qt));
    fp8::cpu::quantize_1x128(xt.data(), T, qcols, tok_codes.data(), tok_scales.data());
    std::vector<float> gathered(static_cast<size_t>(RA * qcols), 0.0f);
    for (int64_t a = 0; a < RA; ++a)
      if (ref_token_a[a] >= 0)
        std::copy(xt.begin() + ref_token_a[a] * qcols, xt.begin() + (ref_token_a[a] + 1) * qcols,
                  gathered.begin() + a * qcols);
    std::vector<uint8_t> ref_rc(static_cast<size_t>(RA * qcols));
    std::vector<float> ref_rs(static_cast<size_t>(RA * qt));
    fp8::cpu::quantize_1x128(gathered.data(), RA, qcols, ref_rc.data(), ref_rs.data());
    DeviceBuffer<uint8_t> d_tc(tok_codes), d_rc(RA * qcols);
    DeviceBuffer<float> d_ts(tok_scales), d_rs(RA * qt);
    d_rc.poison(), d_rs.poison();
    cuda::moe_gather_rows_fp8(d_tc.get(), d_ts.get(), d_token_a.get(), RA, qcols, d_rc.get(), d_rs.get());
    EXPECT_EQ(d_rc.download(), ref_rc) << "gathered row codes";
    const std::vector<float> rs = d_rs.download();
    int64_t scale_mismatches = 0;
    for (size_t i = 0; i < rs.size(); ++i)
      scale_mismatches += std::memcmp(&rs[i], &ref_rs[i], sizeof(float)) != 0;
    EXPECT_EQ(scale_mismatches, 0) << "gathered row scales";
    // Asked for each expert's cuBLASLt layout (lt_aligned): the same scales where moe_grouped_vec128_scales puts them.
    d_rc.poison(), d_rs.poison();
    cuda::moe_gather_rows_fp8(d_tc.get(), d_ts.get(), d_token_a.get(), RA, qcols, d_rc.get(), d_rs.get(), nullptr,
                              d_aligned.get(), E);
    EXPECT_EQ(d_rc.download(), ref_rc) << "gathered row codes (cuBLASLt scale layout)";
    std::vector<float> ref_lt(ref_rs.size());
    for (int64_t e = 0; e < E; ++e)
      for (int64_t first = aligned[e], n = aligned[e + 1] - first, r = 0; r < n; ++r)
        for (int64_t kb = 0; kb < qt; ++kb) ref_lt[first * qt + kb * n + r] = ref_rs[(first + r) * qt + kb];
    EXPECT_EQ(d_rs.download(), ref_lt) << "gathered row scales in each expert's cuBLASLt layout";
  }

  std::printf("[ moe fp8  ] aligned plan (%lld rows -> %lld), gather, zero rows, grouped scales, combine, grouped "
              "transposed quantization, row codes gathered from each token's, scatter-add then add: exact\n",
              static_cast<long long>(R), static_cast<long long>(RA));
}

// The stacked FP8 copies (one set of launches for all experts) hold, per expert, exactly the bytes of the expert's
// own prepared copy (prepared_fp8_weight, itself held to fp8::cpu::quantize_128x128 by linear_gpu.cpp) and its codes
// are the CPU's.
TEST_F(MoeFp8Gpu, StackedExpertWeightsAreEachExpertsPreparedBytes) {
  std::mt19937_64 rng(run_seed() + 41);
  const int64_t E = 3, N = 208, K = 384;  // N: a partial 80-row block
  std::vector<float> w = normal_values(static_cast<size_t>(E * N * K), 0.05f, rng);
  for (int64_t e = 0; e < E; ++e)  // each expert its own magnitude: a block taken from another expert shows
    for (int64_t i = 0; i < N * K; ++i) w[e * N * K + i] *= std::ldexp(1.0f, static_cast<int>(e) * 3);
  DeviceBuffer<float> d_w(w);
  cuda::LinearContext stacked_ctx, single_ctx;
  const cuda::PreparedFp8Stack s = cuda::prepared_fp8_stacked_weight(stacked_ctx, d_w.get(), E, N, K);
  CUDA_CHECK(cudaDeviceSynchronize());
  auto bytes = [](const void* p, size_t n) {
    std::vector<uint8_t> v(n);
    CUDA_CHECK(cudaMemcpy(v.data(), p, n, cudaMemcpyDeviceToHost));
    return v;
  };
  const size_t sw = static_cast<size_t>(fp8::cuda::cublaslt_scale_count(N, K, 128)) * sizeof(float);
  const size_t st = static_cast<size_t>(fp8::cuda::cublaslt_scale_count(K, N, 128)) * sizeof(float);
  ASSERT_EQ(s.scales_stride * sizeof(float), sw);
  ASSERT_EQ(s.scales_t_stride * sizeof(float), st);
  for (int64_t e = 0; e < E; ++e) {
    const cuda::PreparedFp8Weight one = cuda::prepared_fp8_weight(single_ctx, d_w.get() + e * N * K, N, K);
    CUDA_CHECK(cudaDeviceSynchronize());
    ASSERT_EQ(one.rows, N);
    ASSERT_EQ(one.cols, K);
    const size_t nk = static_cast<size_t>(N * K);
    EXPECT_EQ(bytes(s.codes + e * N * K, nk), bytes(one.codes, nk)) << "codes of expert " << e;
    EXPECT_EQ(bytes(s.codes_t + e * N * K, nk), bytes(one.codes_t, nk)) << "codes_t of expert " << e;
    EXPECT_EQ(bytes(s.scales + e * s.scales_stride, sw), bytes(one.scales, sw)) << "scales of expert " << e;
    EXPECT_EQ(bytes(s.scales_t + e * s.scales_t_stride, st), bytes(one.scales_t, st)) << "scales_t of expert " << e;
    std::vector<uint8_t> codes(nk);
    std::vector<float> scales(static_cast<size_t>(fp8::tiles(N) * fp8::tiles(K)));
    fp8::cpu::quantize_128x128(w.data() + e * N * K, N, K, codes.data(), scales.data());
    EXPECT_EQ(bytes(s.codes + e * N * K, nk), codes) << "codes of expert " << e << " vs the CPU";
  }
  std::printf("[ moe fp8  ] stacked weights: %lld experts, each its own prepared bytes\n", static_cast<long long>(E));
}

// The gate and up pair (cuda::prepared_fp8_stacked_gate_up) is each weight's stacked bytes placed: [w_gate; w_up]'s
// rows and [wᵀ_gate | wᵀ_up]'s columns from 0 and Ip (I rounded up to 128) with zeros between, their scales the
// stacks' block rows and blocks side by side. Bit for bit, with I a partial block (208) and whole blocks (256).
TEST_F(MoeFp8Gpu, GateUpPairIsEachStacksBytesSideBySide) {
  std::mt19937_64 rng(run_seed() + 43);
  auto bytes = [](const void* p, size_t n) {
    std::vector<uint8_t> v(n);
    CUDA_CHECK(cudaMemcpy(v.data(), p, n, cudaMemcpyDeviceToHost));
    return v;
  };
  auto floats = [](const float* p, size_t n) {
    std::vector<float> v(n);
    CUDA_CHECK(cudaMemcpy(v.data(), p, n * sizeof(float), cudaMemcpyDeviceToHost));
    return v;
  };
  for (const int64_t I : {int64_t{208}, int64_t{256}}) {
    SCOPED_TRACE("I = " + std::to_string(I));
    const int64_t E = 3, H = 384, Ip = (I + 127) / 128 * 128, TI = fp8::tiles(I), TH = fp8::tiles(H);
    std::vector<float> wg = normal_values(static_cast<size_t>(E * I * H), 0.05f, rng);
    std::vector<float> wu = normal_values(static_cast<size_t>(E * I * H), 0.5f, rng);
    DeviceBuffer<float> d_wg(wg), d_wu(wu);
    cuda::LinearContext ctx;
    // Twice: the second time after new weights (another generation, whose quantizations leave the pads as the
    // first zeroed them).
    for (int generation = 1; generation <= 2; ++generation) {
      SCOPED_TRACE("generation " + std::to_string(generation));
      if (generation == 2) {
        wg = normal_values(static_cast<size_t>(E * I * H), 0.05f, rng);
        wu = normal_values(static_cast<size_t>(E * I * H), 0.5f, rng);
        d_wg.upload(wg), d_wu.upload(wu);
        ctx.weights_changed();
      }
      const cuda::PreparedFp8GateUp p = cuda::prepared_fp8_stacked_gate_up(ctx, d_wg.get(), d_wu.get(), E, I, H);
      const cuda::PreparedFp8Stack sg = cuda::prepared_fp8_stacked_weight(ctx, d_wg.get(), E, I, H);
      const cuda::PreparedFp8Stack su = cuda::prepared_fp8_stacked_weight(ctx, d_wu.get(), E, I, H);
      CUDA_CHECK(cudaDeviceSynchronize());
      ASSERT_EQ(p.padded, Ip);
      const int64_t L4H = (TH + 3) / 4 * 4, L4I = (TI + 3) / 4 * 4, L4P = (2 * TI + 3) / 4 * 4;
      ASSERT_EQ(p.scales_stride, 2 * TI * L4H);
      ASSERT_EQ(p.scales_t_stride, TH * L4P);
      const std::vector<uint8_t> codes = bytes(p.codes, E * 2 * Ip * H), codes_t = bytes(p.codes_t, E * 2 * Ip * H);
      const std::vector<uint8_t> g_codes = bytes(sg.codes, E * I * H), u_codes = bytes(su.codes, E * I * H);
      const std::vector<uint8_t> g_codes_t = bytes(sg.codes_t, E * I * H), u_codes_t = bytes(su.codes_t, E * I * H);
      const std::vector<float> scales = floats(p.scales, E * p.scales_stride);
      const std::vector<float> scales_t = floats(p.scales_t, E * p.scales_t_stride);
      const std::vector<float> g_scales = floats(sg.scales, E * sg.scales_stride);
      const std::vector<float> u_scales = floats(su.scales, E * su.scales_stride);
      const std::vector<float> g_scales_t = floats(sg.scales_t, E * sg.scales_t_stride);
      const std::vector<float> u_scales_t = floats(su.scales_t, E * su.scales_t_stride);
      ASSERT_EQ(sg.scales_stride, TI * L4H);
      ASSERT_EQ(sg.scales_t_stride, TH * L4I);
      std::vector<uint8_t> want(codes.size(), 0), want_t(codes_t.size(), 0);
      std::vector<float> want_s(scales.size(), 0.0f), want_st(scales_t.size(), 0.0f);
      for (int64_t e = 0; e < E; ++e) {
        for (int64_t i = 0; i < I * H; ++i) {  // Fprop: rows
          want[e * 2 * Ip * H + i] = g_codes[e * I * H + i];
          want[e * 2 * Ip * H + Ip * H + i] = u_codes[e * I * H + i];
        }
        for (int64_t h = 0; h < H; ++h)  // Dgrad: columns of each row of wᵀ
          for (int64_t i = 0; i < I; ++i) {
            want_t[e * 2 * Ip * H + h * 2 * Ip + i] = g_codes_t[e * I * H + h * I + i];
            want_t[e * 2 * Ip * H + h * 2 * Ip + Ip + i] = u_codes_t[e * I * H + h * I + i];
          }
        for (int64_t i = 0; i < TI * L4H; ++i) {
          want_s[e * p.scales_stride + i] = g_scales[e * sg.scales_stride + i];
          want_s[e * p.scales_stride + TI * L4H + i] = u_scales[e * su.scales_stride + i];
        }
        for (int64_t hb = 0; hb < TH; ++hb)
          for (int64_t ib = 0; ib < TI; ++ib) {
            want_st[e * p.scales_t_stride + hb * L4P + ib] = g_scales_t[e * sg.scales_t_stride + hb * L4I + ib];
            want_st[e * p.scales_t_stride + hb * L4P + TI + ib] = u_scales_t[e * su.scales_t_stride + hb * L4I + ib];
          }
      }
      EXPECT_EQ(codes, want) << "[w_gate; w_up] codes";
      EXPECT_EQ(codes_t, want_t) << "[wT_gate | wT_up] codes";
      EXPECT_EQ(0, std::memcmp(scales.data(), want_s.data(), scales.size() * sizeof(float))) << "Fprop scales";
      EXPECT_EQ(0, std::memcmp(scales_t.data(), want_st.data(), scales_t.size() * sizeof(float))) << "Dgrad scales";
    }
  }
  std::printf("[ moe fp8  ] gate and up side by side: each stack's codes and scales placed, zeros between, two "
              "generations\n");
}

// The experts' forward and backward at intermediate size I against the CPU recipe, both GEMM forms, and the gathered
// and combined entry points against the plain ones.
void check_experts_against_the_cpu(int64_t I, std::mt19937_64& rng) {
  const int64_t E = static_cast<int64_t>(kCounts.size()), H = 256;
  const std::vector<int64_t> aligned = aligned_of(kCounts);
  const int64_t RA = aligned[E];
  // Each expert's rows get their own magnitude, so rows or scales taken from another expert show.
  std::vector<float> xp(static_cast<size_t>(RA * H), 0.0f), dyp(static_cast<size_t>(RA * H), 0.0f);
  for (int64_t e = 0; e < E; ++e) {
    const float mag = std::ldexp(1.0f, static_cast<int>(e % 4) - 1);
    const std::vector<float> xe = normal_values(static_cast<size_t>(kCounts[e] * H), mag, rng);
    const std::vector<float> de = normal_values(static_cast<size_t>(kCounts[e] * H), 1e-2f * mag, rng);
    std::copy(xe.begin(), xe.end(), xp.begin() + aligned[e] * H);
    std::copy(de.begin(), de.end(), dyp.begin() + aligned[e] * H);
  }
  const std::vector<float> wg = normal_values(static_cast<size_t>(E * I * H), 0.05f, rng);
  const std::vector<float> wu = normal_values(static_cast<size_t>(E * I * H), 0.05f, rng);
  const std::vector<float> wd = normal_values(static_cast<size_t>(E * H * I), 0.05f, rng);
  const std::vector<float> g0 = normal_values(static_cast<size_t>(E * I * H), 1e-3f, rng);  // grads accumulate
  const std::vector<float> d0 = normal_values(static_cast<size_t>(E * H * I), 1e-3f, rng);

  // CPU: the FP8 recipe per expert on its own rows, as runtime/model/feed_forward.cpp runs it: g, u and dh rounded to
  // BF16 (round_bf16s; the GPU form with gate_up_bf16), or left in FP32 (the forms that keep them so).
  struct Reference {
    std::vector<float> yp, dxp, gg, ug, dg;
  };
  auto reference = [&](bool round_bf16s) {
    Reference ref{std::vector<float>(xp.size(), 0.0f), std::vector<float>(xp.size(), 0.0f), g0, g0, d0};
    auto round = [&](std::vector<float>& v) {
      if (round_bf16s)
        for (float& x : v) x = round_bf16(x);
    };
    for (int64_t e = 0; e < E; ++e) {
      const int64_t n = kCounts[e];
      if (n == 0) continue;
      const float* x = xp.data() + aligned[e] * H;
      const float* dy = dyp.data() + aligned[e] * H;
      std::vector<float> g(n * I), u(n * I), h(n * I), dh(n * I), dg(n * I), du(n * I), dxu(n * H);
      cpu::linear_forward(Precision::FP8, x, wg.data() + e * I * H, g.data(), n, I, H);
      cpu::linear_forward(Precision::FP8, x, wu.data() + e * I * H, u.data(), n, I, H);
      round(g), round(u);
      cpu::swiglu_forward(g.data(), u.data(), h.data(), n * I);
      cpu::linear_forward(Precision::FP8, h.data(), wd.data() + e * H * I, ref.yp.data() + aligned[e] * H, n, H, I);
      cpu::linear_backward(Precision::FP8, dy, h.data(), wd.data() + e * H * I, dh.data(), ref.dg.data() + e * H * I,
                           n, H, I);
      round(dh);
      cpu::swiglu_backward(dh.data(), g.data(), u.data(), dg.data(), du.data(), n * I);
      float* dx = ref.dxp.data() + aligned[e] * H;
      cpu::linear_backward(Precision::FP8, dg.data(), x, wg.data() + e * I * H, dx, ref.gg.data() + e * I * H, n, I,
                           H);
      cpu::linear_backward(Precision::FP8, du.data(), x, wu.data() + e * I * H, dxu.data(), ref.ug.data() + e * I * H,
                           n, I, H);
      for (int64_t i = 0; i < n * H; ++i) dx[i] += dxu[i];
    }
    return ref;
  };
  const Reference ref32 = reference(false), ref16 = reference(true);

  // Both forms of the experts' GEMMs: grouped (one launch per projection) and lanes (cuBLASLt per expert), the lanes
  // also with g and u side by side in one [rows, 2 Ip] matrix (gate and up's Fprop one GEMM), in FP32 and in BF16
  // (gate_up_bf16, with dh in BF16).
  struct Variant {
    cuda::MoeFp8Gemm form;
    bool side, bf16;
  };
  for (const Variant v : {Variant{cuda::MoeFp8Gemm::Grouped, false, false},
                          Variant{cuda::MoeFp8Gemm::Lanes, false, false}, Variant{cuda::MoeFp8Gemm::Lanes, true, false},
                          Variant{cuda::MoeFp8Gemm::Lanes, true, true}}) {
    const cuda::MoeFp8Gemm form = v.form;
    const bool side = v.side;
    const char* form_name =
        form == cuda::MoeFp8Gemm::Grouped ? "grouped" : side ? (v.bf16 ? "lanes, g | u bf16" : "lanes, g | u") : "lanes";
    SCOPED_TRACE(form_name);
    const Reference& ref = v.bf16 ? ref16 : ref32;
    const int64_t gld = side ? 2 * ((I + 127) / 128 * 128) : I;  // g and u's row stride; u = g + gld / 2 side by side
    DeviceBuffer<float> d_xp(xp), d_dyp(dyp), d_wg(wg), d_wu(wu), d_wd(wd), d_gg(g0), d_ug(g0), d_dg(d0);
    DeviceBuffer<float> d_gu(2 * RA * gld), d_h(RA * I), d_yp(RA * H), d_dxp(RA * H);
    DeviceBuffer<uint16_t> d_gu16(RA * gld), d_gu16_2(RA * gld);  // g | u in BF16 (the bf16 variant's)
    d_gu16.poison(), d_gu16_2.poison();
    float* const d_g = v.bf16 ? nullptr : d_gu.get();
    float* const d_u = v.bf16 ? nullptr : side ? d_g + gld / 2 : d_g + RA * I;
    DeviceBuffer<int64_t> d_aligned(aligned);
    for (DeviceBuffer<float>* b : {&d_gu, &d_h, &d_yp, &d_dxp}) b->poison();
    cuda::LinearContext ctx;
    cuda::MoeFp8Experts w{d_wg.get(), d_wu.get(), d_wd.get(), d_gg.get(), d_ug.get(), d_dg.get(), E, H, I, form};
    w.gate_up_side_by_side = side;
    if (v.bf16) {
      ASSERT_TRUE(cuda::moe_fp8_gate_up_bf16_supported(w));
      w.gate_up_bf16 = d_gu16.get();
    }
    ASSERT_EQ(cuda::moe_fp8_gate_up_ld(w), gld);
    cuda::moe_fp8_experts_forward(ctx, w, d_xp.get(), aligned.data(), d_aligned.get(), d_g, d_u, d_h.get(),
                                  d_yp.get());
    cuda::moe_fp8_experts_backward(ctx, w, d_dyp.get(), d_xp.get(), d_g, d_u, d_h.get(), aligned.data(),
                                   d_aligned.get(), d_dxp.get());
    CUDA_CHECK(cudaDeviceSynchronize());

    auto expect = [&](const char* what, const std::vector<float>& got, const std::vector<float>& ref) {
      const double err = rel_l2(got, ref);
      std::printf("[ moe fp8  ] %-7s %-10s rel_l2 %.3e (limit 1e-2)\n", form_name, what, err);
      EXPECT_LT(err, 1e-2) << what;
    };
    expect("yp", d_yp.download(), ref.yp);
    expect("dxp", d_dxp.download(), ref.dxp);
    expect("gate grad", d_gg.download(), ref.gg);
    expect("up grad", d_ug.download(), ref.ug);
    expect("down grad", d_dg.download(), ref.dg);
    // Zero rows stay exactly zero (combine never reads them, but they feed the next quantization).
    const std::vector<float> yp = d_yp.download();
    for (int64_t e = 0; e < E; ++e)
      for (int64_t r = aligned[e] + kCounts[e]; r < aligned[e + 1]; ++r)
        for (int64_t j = 0; j < H; ++j) ASSERT_EQ(yp[r * H + j], 0.0f) << "zero row " << r;

    // overwrite_grads (gradients not yet written since zero_grad): their NaN-filled old contents are never read, the
    // experts without rows (kCounts[1] = 0) get zeros and the others what accumulating onto zeros gives (the same
    // products; an accumulating GEMM may be another cuBLASLt kernel: 1e-6).
    {
      const std::vector<float> zeros_i(g0.size(), 0.0f), zeros_d(d0.size(), 0.0f);
      DeviceBuffer<float> o_gg(g0.size()), o_ug(g0.size()), o_dg(d0.size()), z_gg(zeros_i), z_ug(zeros_i),
          z_dg(zeros_d), o_dxp(RA * H), z_dxp(RA * H);
      for (DeviceBuffer<float>* b : {&o_gg, &o_ug, &o_dg}) b->poison();
      cuda::MoeFp8Experts wo = w, wz = w;
      wo.gate_grad = o_gg.get(), wo.up_grad = o_ug.get(), wo.down_grad = o_dg.get(), wo.overwrite_grads = true;
      wz.gate_grad = z_gg.get(), wz.up_grad = z_ug.get(), wz.down_grad = z_dg.get();
      for (const auto& [ww, dxp_out] : {std::pair{&wo, &o_dxp}, {&wz, &z_dxp}})
        cuda::moe_fp8_experts_backward(ctx, *ww, d_dyp.get(), d_xp.get(), d_g, d_u, d_h.get(), aligned.data(),
                                       d_aligned.get(), dxp_out->get());
      CUDA_CHECK(cudaDeviceSynchronize());
      for (const auto& [what, o, z, each] : {std::tuple{"gate grad", &o_gg, &z_gg, I * H},
                                             {"up grad", &o_ug, &z_ug, I * H}, {"down grad", &o_dg, &z_dg, H * I}}) {
        const std::vector<float> got = o->download(), want = z->download();
        const double err = rel_l2(got, want);
        EXPECT_LT(err, 1e-6) << what << " overwritten vs accumulated onto zeros";
        EXPECT_TRUE(std::all_of(got.begin() + 1 * each, got.begin() + 2 * each, [](float v) { return v == 0.0f; }))
            << what << " of the expert without rows";
        std::printf("[ moe fp8  ] %s: %s overwritten (NaN-filled before) vs accumulated onto zeros: rel_l2 %.1e\n",
                    form_name, what, err);
      }
    }

    // The gathered versions (input rows read from x through token_of inside the quantization kernels) give the same
    // bytes: x holds the real rows at shuffled token positions and garbage where no row points, zero rows have -1.
    const int64_t tokens = RA + 7;
    std::vector<int64_t> perm(static_cast<size_t>(tokens));
    for (int64_t t = 0; t < tokens; ++t) perm[t] = t;
    std::shuffle(perm.begin(), perm.end(), rng);
    std::vector<float> x(static_cast<size_t>(tokens * H), 7.0f);
    std::vector<int64_t> token_of(static_cast<size_t>(RA), -1);
    for (int64_t e = 0; e < E; ++e)
      for (int64_t r = aligned[e]; r < aligned[e] + kCounts[e]; ++r) {
        token_of[r] = perm[r];
        std::copy(xp.begin() + r * H, xp.begin() + (r + 1) * H, x.begin() + perm[r] * H);
      }
    DeviceBuffer<float> d_x(x), d_gg2(g0), d_ug2(g0), d_dg2(d0);
    DeviceBuffer<float> d_gu2(2 * RA * gld), d_h2(RA * I), d_dxp2(RA * H);
    DeviceBuffer<uint16_t> d_yp2(RA * H);  // BF16
    float* const d_g2 = v.bf16 ? nullptr : d_gu2.get();
    float* const d_u2 = v.bf16 ? nullptr : side ? d_g2 + gld / 2 : d_g2 + RA * I;
    DeviceBuffer<int64_t> d_token_of(token_of);
    // The gathered passes of w2 (forward: x along tokens) and w4 (below: w · dy both ways) take the row tiles in
    // moe_row_tile_order's order, w3's (backward: x along tokens) in order: the same bytes.
    DeviceBuffer<int32_t> d_tile_order(RA / 128);
    cuda::moe_row_tile_order(d_aligned.get(), E, RA, d_tile_order.get());
    for (DeviceBuffer<float>* b : {&d_gu2, &d_h2, &d_dxp2}) b->poison();
    d_yp2.poison();
    // With x's and h's token quantizations kept from the forward for the backward (x_codes_t, h_codes_t, ...).
    DeviceBuffer<uint8_t> d_xct(RA * H), d_hct(RA * I);
    DeviceBuffer<float> d_xst(H * (RA / 128)), d_hst(I * (RA / 128));
    d_xct.poison(), d_xst.poison(), d_hct.poison(), d_hst.poison();
    cuda::MoeFp8Experts w2{d_wg.get(), d_wu.get(), d_wd.get(), d_gg2.get(), d_ug2.get(), d_dg2.get(), E, H, I, form};
    w2.gate_up_side_by_side = side;
    if (v.bf16) w2.gate_up_bf16 = d_gu16_2.get();
    w2.x_codes_t = d_xct.get(), w2.x_scales_t = d_xst.get(), w2.h_codes_t = d_hct.get(), w2.h_scales_t = d_hst.get();
    w2.row_tile_order = d_tile_order.get();
    cuda::moe_fp8_experts_forward_gathered(ctx, w2, d_x.get(), tokens, d_token_of.get(), aligned.data(),
                                           d_aligned.get(),
                                           d_g2, d_u2, d_h2.get(), d_yp2.get());
    cuda::moe_fp8_experts_backward_gathered(ctx, w2, d_dyp.get(), d_x.get(), d_token_of.get(), d_g2, d_u2,
                                            d_h2.get(), aligned.data(), d_aligned.get(), d_dxp2.get());
    CUDA_CHECK(cudaDeviceSynchronize());
    // yp in BF16: the FP32 sums rounded once (the grouped form rounds the FP32 output itself; cuBLASLt's BF16
    // epilogue may sum in another order, so within one BF16 unit, 2^-7 relative); zero rows exactly zero.
    {
      const moe_gpu_test::Bf16Rounding cmp = moe_gpu_test::compare_bf16_rounding(d_yp2.download(), yp);
      const int64_t off = cmp.beyond, rounded_apart = cmp.apart;
      std::printf("[ moe fp8  ] %s: gathered forward's BF16 yp: %lld of %zu not the FP32 yp rounded (%lld beyond "
                  "one BF16 unit)\n", form_name, static_cast<long long>(rounded_apart), yp.size(),
                  static_cast<long long>(off));
      EXPECT_EQ(off, 0) << "gathered forward yp (BF16)";
      if (form == cuda::MoeFp8Gemm::Grouped) {
        EXPECT_EQ(rounded_apart, 0) << "grouped: its BF16 output is its FP32 output rounded";
      }
    }
    EXPECT_EQ(d_h2.download(), d_h.download()) << "gathered forward h";
    EXPECT_EQ(d_dxp2.download(), d_dxp.download()) << "gathered backward dxp";
    EXPECT_EQ(d_gg2.download(), d_gg.download()) << "gathered gate grad";
    EXPECT_EQ(d_ug2.download(), d_ug.download()) << "gathered up grad";
    EXPECT_EQ(d_dg2.download(), d_dg.download()) << "gathered down grad";
    std::printf("[ moe fp8  ] %s: gathered forward and backward (x's and h's token codes kept from the forward): "
                "the bytes of the xp versions\n", form_name);

    // The combined backward (dyp row r = w_r · dy[token_of[r]] made inside its quantization) gives the bytes of the
    // gathered backward on that dyp, computed here with the same single rounding. Zero rows' weights are NaN: never
    // read.
    std::vector<float> dy_tok = normal_values(static_cast<size_t>(tokens * H), 1e-2f, rng);
    std::vector<float> row_w(static_cast<size_t>(RA), std::numeric_limits<float>::quiet_NaN());
    std::vector<float> dyp3(static_cast<size_t>(RA * H), 0.0f);
    std::uniform_real_distribution<float> wdist(0.05f, 1.0f);
    for (int64_t r = 0; r < RA; ++r) {
      if (token_of[r] < 0) continue;
      row_w[r] = wdist(rng);
      for (int64_t j = 0; j < H; ++j) dyp3[r * H + j] = row_w[r] * dy_tok[token_of[r] * H + j];
    }
    DeviceBuffer<float> d_dy_tok(dy_tok), d_row_w(row_w), d_dyp3(dyp3);
    DeviceBuffer<float> d_gg3(g0), d_ug3(g0), d_dg3(d0), d_gg4(g0), d_ug4(g0), d_dg4(d0), d_dxp3(RA * H), d_dxp4(RA * H);
    d_dxp3.poison(), d_dxp4.poison();
    cuda::MoeFp8Experts w3{d_wg.get(), d_wu.get(), d_wd.get(), d_gg3.get(), d_ug3.get(), d_dg3.get(), E, H, I, form};
    cuda::MoeFp8Experts w4{d_wg.get(), d_wu.get(), d_wd.get(), d_gg4.get(), d_ug4.get(), d_dg4.get(), E, H, I, form};
    w3.gate_up_side_by_side = w4.gate_up_side_by_side = side;
    w3.gate_up_bf16 = w4.gate_up_bf16 = w2.gate_up_bf16;  // read what w2's forward wrote
    // x's and h's token codes kept by w2's forward of the same rows (h itself not passed); w3 quantizes both.
    w4.x_codes_t = d_xct.get(), w4.x_scales_t = d_xst.get(), w4.h_codes_t = d_hct.get(), w4.h_scales_t = d_hst.get();
    w4.row_tile_order = d_tile_order.get();
    cuda::moe_fp8_experts_backward_gathered(ctx, w3, d_dyp3.get(), d_x.get(), d_token_of.get(), d_g2, d_u2,
                                            d_h2.get(), aligned.data(), d_aligned.get(), d_dxp3.get());
    cuda::moe_fp8_experts_backward_combined(ctx, w4, d_dy_tok.get(), d_row_w.get(), d_x.get(), d_token_of.get(),
                                            d_g2, d_u2, nullptr, aligned.data(), d_aligned.get(),
                                            d_dxp4.get());
    CUDA_CHECK(cudaDeviceSynchronize());
    EXPECT_EQ(d_dxp4.download(), d_dxp3.download()) << "combined backward dxp";
    EXPECT_EQ(d_gg4.download(), d_gg3.download()) << "combined gate grad";
    EXPECT_EQ(d_ug4.download(), d_ug3.download()) << "combined up grad";
    EXPECT_EQ(d_dg4.download(), d_dg3.download()) << "combined down grad";
    std::printf("[ moe fp8  ] %s: combined backward (dyp made in its quantization, x's and h's token codes kept): "
                "the bytes of the dyp version\n", form_name);

    // dxp in BF16 (the routed experts' form): the FP32 dxp rounded once. Forms that sum in FP32 round that result
    // (the same bits as rounding dxp4); the pair's GEMM rounds in its epilogue, whose sums may take another order:
    // within one BF16 unit (2^-7 relative). Gradients accumulate as before (fresh copies of the initial ones).
    DeviceBuffer<float> d_gg5(g0), d_ug5(g0), d_dg5(d0);
    DeviceBuffer<uint16_t> d_dxp5(RA * H);
    d_dxp5.poison();
    cuda::MoeFp8Experts w5 = w4;
    w5.gate_grad = d_gg5.get(), w5.up_grad = d_ug5.get(), w5.down_grad = d_dg5.get();
    cuda::moe_fp8_experts_backward_combined(ctx, w5, d_dy_tok.get(), d_row_w.get(), d_x.get(), d_token_of.get(),
                                            d_g2, d_u2, nullptr, aligned.data(), d_aligned.get(), d_dxp5.get());
    CUDA_CHECK(cudaDeviceSynchronize());
    {
      const std::vector<float> want = d_dxp4.download();
      const moe_gpu_test::Bf16Rounding cmp = moe_gpu_test::compare_bf16_rounding(d_dxp5.download(), want);
      const int64_t off = cmp.beyond, rounded_apart = cmp.apart;
      std::printf("[ moe fp8  ] %s: combined backward's BF16 dxp: %lld of %zu not the FP32 dxp rounded (%lld beyond "
                  "one BF16 unit)\n", form_name, static_cast<long long>(rounded_apart), want.size(),
                  static_cast<long long>(off));
      EXPECT_EQ(off, 0) << "combined backward dxp (BF16)";
      if (!side) {
        EXPECT_EQ(rounded_apart, 0) << "the FP32 dxp rounded";
      }
      EXPECT_EQ(d_gg5.download(), d_gg4.download()) << "gate grad with BF16 dxp";
      EXPECT_EQ(d_dg5.download(), d_dg4.download()) << "down grad with BF16 dxp";
    }
  }
}

TEST_F(MoeFp8Gpu, ExpertsForwardAndBackwardMatchTheCpuRecipePerExpert) {
  std::mt19937_64 rng(run_seed() + 37);
  // The lanes' Dgrad is one GEMM over [dg | du] against [wᵀ_gate | wᵀ_up] (MOERL_MOE_DGRAD's default): I = 208 has a
  // partial 80-wide tile, so each half is padded with zero columns to 256; I = 256 has whole tiles, no padding.
  for (const int64_t I : {int64_t{208}, int64_t{256}}) {
    SCOPED_TRACE("I = " + std::to_string(I));
    std::printf("[ moe fp8  ] I = %lld\n", static_cast<long long>(I));
    check_experts_against_the_cpu(I, rng);
  }
}

// gate and up interleaved per expert (MoeFp8Experts::gate_up_stride = 2 I H, ParamStore's layout), as the runtime
// runs them (lanes, g | u in BF16): the forward's bytes, dxp and the down gradient as with the weights stacked apart,
// and gate's and up's gradients from one Wgrad GEMM per expert ([dgᵀ; duᵀ] · xᵀᵀ, M = 2 I) within 1e-6 of the two
// GEMMs' (the same products; cuBLASLt may pick another kernel for M = 2 I, so another order of the FP32 sums), both
// accumulated and written whole (overwrite_grads: NaN-filled before, zeros for the expert without rows).
TEST_F(MoeFp8Gpu, InterleavedGateAndUpGiveTheStackedResults) {
  std::mt19937_64 rng(run_seed() + 41);
  const int64_t E = static_cast<int64_t>(kCounts.size()), H = 256, I = 208, each = I * H;
  const int64_t Ip = (I + 127) / 128 * 128;
  const std::vector<int64_t> aligned = aligned_of(kCounts);
  const int64_t RA = aligned[E];
  std::vector<float> xp(static_cast<size_t>(RA * H), 0.0f), dyp(static_cast<size_t>(RA * H), 0.0f);
  for (int64_t e = 0; e < E; ++e) {
    const std::vector<float> xe = normal_values(static_cast<size_t>(kCounts[e] * H), 1.0f, rng);
    const std::vector<float> de = normal_values(static_cast<size_t>(kCounts[e] * H), 1e-2f, rng);
    std::copy(xe.begin(), xe.end(), xp.begin() + aligned[e] * H);
    std::copy(de.begin(), de.end(), dyp.begin() + aligned[e] * H);
  }
  const std::vector<float> wg = normal_values(static_cast<size_t>(E * each), 0.05f, rng);
  const std::vector<float> wu = normal_values(static_cast<size_t>(E * each), 0.05f, rng);
  const std::vector<float> wd = normal_values(static_cast<size_t>(E * each), 0.05f, rng);
  const std::vector<float> gg0 = normal_values(static_cast<size_t>(E * each), 1e-3f, rng);
  const std::vector<float> ug0 = normal_values(static_cast<size_t>(E * each), 1e-3f, rng);
  const std::vector<float> dg0 = normal_values(static_cast<size_t>(E * each), 1e-3f, rng);
  // [E, 2, I, H]: expert e's gate, then its up.
  auto interleave = [&](const std::vector<float>& gate, const std::vector<float>& up) {
    std::vector<float> out(static_cast<size_t>(2 * E * each));
    for (int64_t e = 0; e < E; ++e) {
      std::copy(gate.begin() + e * each, gate.begin() + (e + 1) * each, out.begin() + 2 * e * each);
      std::copy(up.begin() + e * each, up.begin() + (e + 1) * each, out.begin() + (2 * e + 1) * each);
    }
    return out;
  };
  for (const bool overwrite : {false, true}) {
    SCOPED_TRACE(overwrite ? "overwrite_grads" : "accumulated");
    DeviceBuffer<float> d_xp(xp), d_dyp(dyp), d_wg(wg), d_wu(wu), d_wd(wd), d_wgu(interleave(wg, wu));
    DeviceBuffer<float> d_gg(gg0), d_ug(ug0), d_dg(dg0), d_ggu(interleave(gg0, ug0)), d_dg2(dg0);
    if (overwrite)
      for (DeviceBuffer<float>* b : {&d_gg, &d_ug, &d_dg, &d_ggu, &d_dg2}) b->poison();
    DeviceBuffer<uint16_t> d_gu16(RA * 2 * Ip), d_gu16_2(RA * 2 * Ip);
    DeviceBuffer<float> d_h(RA * I), d_h2(RA * I), d_yp(RA * H), d_yp2(RA * H), d_dxp(RA * H), d_dxp2(RA * H);
    for (DeviceBuffer<float>* b : {&d_h, &d_h2, &d_yp, &d_yp2, &d_dxp, &d_dxp2}) b->poison();
    DeviceBuffer<int64_t> d_aligned(aligned);
    cuda::LinearContext ctx;
    cuda::MoeFp8Experts apart{d_wg.get(), d_wu.get(), d_wd.get(), d_gg.get(), d_ug.get(), d_dg.get(),
                              E,          H,          I,          cuda::MoeFp8Gemm::Lanes};
    cuda::MoeFp8Experts inter{d_wgu.get(), d_wgu.get() + each, d_wd.get(), d_ggu.get(), d_ggu.get() + each,
                              d_dg2.get(), E,                  H,          I,           cuda::MoeFp8Gemm::Lanes};
    inter.gate_up_stride = 2 * each;
    for (cuda::MoeFp8Experts* w : {&apart, &inter}) {
      w->gate_up_side_by_side = true;
      w->overwrite_grads = overwrite;
      ASSERT_TRUE(cuda::moe_fp8_gate_up_bf16_supported(*w));
    }
    apart.gate_up_bf16 = d_gu16.get(), inter.gate_up_bf16 = d_gu16_2.get();
    ASSERT_FALSE(cuda::moe_fp8_wgrad_pair(apart));
    ASSERT_TRUE(cuda::moe_fp8_wgrad_pair(inter));
    for (const auto& [w, h, yp, dxp] : {std::tuple{&apart, &d_h, &d_yp, &d_dxp}, {&inter, &d_h2, &d_yp2, &d_dxp2}}) {
      cuda::moe_fp8_experts_forward(ctx, *w, d_xp.get(), aligned.data(), d_aligned.get(), nullptr, nullptr, h->get(),
                                    yp->get());
      cuda::moe_fp8_experts_backward(ctx, *w, d_dyp.get(), d_xp.get(), nullptr, nullptr, h->get(), aligned.data(),
                                     d_aligned.get(), dxp->get());
    }
    CUDA_CHECK(cudaDeviceSynchronize());
    EXPECT_EQ(d_yp2.download(), d_yp.download()) << "yp";
    EXPECT_EQ(d_h2.download(), d_h.download()) << "h";
    EXPECT_EQ(d_dxp2.download(), d_dxp.download()) << "dxp";
    EXPECT_EQ(d_dg2.download(), d_dg.download()) << "down grad";
    const std::vector<float> ggu = d_ggu.download(), gg = d_gg.download(), ug = d_ug.download();
    std::vector<float> gate(gg.size()), up(ug.size());
    for (int64_t e = 0; e < E; ++e) {
      std::copy(ggu.begin() + 2 * e * each, ggu.begin() + (2 * e + 1) * each, gate.begin() + e * each);
      std::copy(ggu.begin() + (2 * e + 1) * each, ggu.begin() + (2 * e + 2) * each, up.begin() + e * each);
    }
    for (const auto& [what, got, want] : {std::tuple{"gate grad", &gate, &gg}, {"up grad", &up, &ug}}) {
      const double err = rel_l2(*got, *want);
      std::printf("[ moe fp8  ] interleaved gate and up (%s): %s rel_l2 %.1e against stacked apart (limit 1e-6)\n",
                  overwrite ? "overwritten" : "accumulated", what, err);
      EXPECT_LT(err, 1e-6) << what;
      if (overwrite) {  // kCounts[1] = 0: the expert without rows
        EXPECT_TRUE(std::all_of(got->begin() + each, got->begin() + 2 * each, [](float v) { return v == 0.0f; }))
            << what << " of the expert without rows";
      }
    }
  }
}

}  // namespace
}  // namespace moerl
