// GPU tests of the model's non-GEMM ops (kernels/cuda/{rmsnorm,rope,swiglu,embedding,cross_entropy,adamw}.cu)
// against their CPU references, on random inputs drawn with a fresh seed each run (printed; MOERL_TEST_SEED=<n>
// repeats a run), outputs poisoned with NaN before each launch. Each comparison prints one line: the max
// absolute error, the max relative error (error / the element's error scale) and the tolerance. A last test
// prints the bandwidth of each op on a model-sized problem (information, not an assertion). Needs a GPU:
// skipped without one.
#include <cuda_runtime_api.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <random>
#include <span>
#include <string>
#include <vector>

#include "kernels/cross_entropy.hpp"
#include "kernels/cuda/adamw.hpp"
#include "kernels/cuda/cross_entropy.hpp"
#include "kernels/cuda/cuda_check.hpp"
#include "kernels/cuda/embedding.hpp"
#include "kernels/cuda/rmsnorm.hpp"
#include "kernels/cuda/rope.hpp"
#include "kernels/cuda/swiglu.hpp"
#include "kernels/embedding.hpp"
#include "kernels/half.hpp"
#include "kernels/rmsnorm.hpp"
#include "kernels/rope.hpp"
#include "kernels/swiglu.hpp"
#include "runtime/error.hpp"
#include "runtime/model/params.hpp"
#include "runtime/optim/adamw.hpp"
#include "tests/gpu/gpu_test_support.hpp"

namespace moerl {
namespace {

using gpu_test::DeviceBuffer;
using gpu_test::run_seed;

std::vector<float> normal_vector(size_t n, std::mt19937_64& rng, float mean = 0.0f, float stddev = 1.0f) {
  std::normal_distribution<float> normal(mean, stddev);
  std::vector<float> v(n);
  for (float& x : v) x = normal(rng);
  return v;
}

std::vector<double> magnitudes(std::span<const float> v) {
  std::vector<double> m(v.size());
  for (size_t i = 0; i < v.size(); ++i) m[i] = std::fabs(static_cast<double>(v[i]));
  return m;
}

// Every |got_i − want_i| must be <= tol · scale_i, where scale_i is what the element's rounding errors are
// relative to: |want_i| for a plain value, the sum of its terms' magnitudes where terms cancel. NaN fails.
void expect_close(const std::string& what, std::span<const float> got, std::span<const float> want,
                  std::span<const double> scale, double tol) {
  ASSERT_EQ(got.size(), want.size());
  double max_abs = 0, max_rel = 0;
  int64_t bad = 0, first = -1;
  for (size_t i = 0; i < got.size(); ++i) {
    const double err = std::fabs(static_cast<double>(got[i]) - static_cast<double>(want[i]));
    const double rel = err == 0 ? 0 : scale[i] > 0 ? err / scale[i] : HUGE_VAL;
    if (!(err <= tol * scale[i])) {
      if (first < 0) first = static_cast<int64_t>(i);
      ++bad;
    }
    max_abs = std::isnan(err) ? HUGE_VAL : std::max(max_abs, err);
    max_rel = std::isnan(rel) ? HUGE_VAL : std::max(max_rel, rel);
  }
  std::printf("  %-44s max abs err %.3g, max rel err %.3g, tolerance %.3g\n", what.c_str(), max_abs, max_rel, tol);
  EXPECT_EQ(bad, 0) << what << ": " << bad << " of " << got.size() << " outside tolerance; first at " << first
                    << ": GPU " << (first >= 0 ? got[first] : 0.0f) << ", CPU " << (first >= 0 ? want[first] : 0.0f);
}

template <class T> void expect_same_bits(const std::string& what, const std::vector<T>& got, const std::vector<T>& want) {
  ASSERT_EQ(got.size(), want.size());
  int64_t differ = 0, first = -1;
  for (size_t i = 0; i < got.size(); ++i)
    if (std::memcmp(&got[i], &want[i], sizeof(T)) != 0 && differ++ == 0) first = static_cast<int64_t>(i);
  std::printf("  %-44s %lld of %zu differ (bit-exact required)\n", what.c_str(), static_cast<long long>(differ),
              got.size());
  EXPECT_EQ(differ, 0) << what << ": first difference at " << first;
}

// Median over 15 timed runs after 3 warm-ups, in microseconds.
template <class F> double median_us(F&& run) { return gpu_test::median_ms(run, 15) * 1e3; }

void print_bandwidth(const std::string& what, double us, double bytes) {
  std::printf("  %-44s %9.1f us, %6.0f GB/s\n", what.c_str(), us, bytes / us / 1e3);
}

class OpsGpu : public gpu_test::GpuTest {};

TEST_F(OpsGpu, RmsNormForwardAndBackwardMatchTheCpuReference) {
  std::mt19937_64 rng(run_seed());
  struct Case { int64_t rows, dim; size_t offset; };  // offset 1: unaligned rows, the scalar path
  for (const Case c : {Case{1, 1, 0}, Case{3, 7, 0}, Case{257, 1024, 0}, Case{70, 7168, 0}, Case{33, 1030, 0},
                       Case{40, 512, 1}}) {
    const std::string name = "rmsnorm " + std::to_string(c.rows) + "x" + std::to_string(c.dim) +
                             (c.offset ? " unaligned" : "");
    SCOPED_TRACE(name + ", seed " + std::to_string(run_seed()));
    const size_t n = static_cast<size_t>(c.rows * c.dim);
    std::vector<float> x = normal_vector(n, rng), dy = normal_vector(n, rng);
    const std::vector<float> w = normal_vector(c.dim, rng, 1.0f, 0.5f), dw0 = normal_vector(c.dim, rng);
    std::uniform_int_distribution<int> exponent(-6, 6);  // rows of different magnitudes
    for (int64_t r = 0; r < c.rows; ++r) {
      const float m = std::ldexp(1.0f, exponent(rng));
      for (int64_t j = 0; j < c.dim; ++j) x[r * c.dim + j] *= m;
    }
    const float eps = 1e-6f;
    std::vector<float> y(n), rstd(c.rows), dx(n), dw = dw0;
    cpu::rmsnorm_forward(x.data(), w.data(), y.data(), rstd.data(), c.rows, c.dim, eps);
    cpu::rmsnorm_backward(dy.data(), x.data(), w.data(), rstd.data(), dx.data(), dw.data(), c.rows, c.dim);

    const size_t o = c.offset;
    DeviceBuffer<float> d_x(x, o), d_w(w, o), d_dy(dy, o), d_rstd_cpu(rstd), d_y(n + o), d_rstd(c.rows),
        d_dx(n + o), d_dw(dw0);
    d_y.poison(), d_rstd.poison(), d_dx.poison();
    cuda::rmsnorm_forward(d_x.get(o), d_w.get(o), d_y.get(o), d_rstd.get(), c.rows, c.dim, eps);
    // Backward from the CPU's rstd, so its comparison measures backward alone.
    cuda::rmsnorm_backward(d_dy.get(o), d_x.get(o), d_w.get(o), d_rstd_cpu.get(), d_dx.get(o), d_dw.get(), c.rows,
                           c.dim);
    const std::vector<float> g_y = d_y.download(n, o), g_rstd = d_rstd.download(c.rows), g_dx = d_dx.download(n, o),
                             g_dw = d_dw.download(c.dim);

    // Error scales (see the tolerance below): dx_j = s·w_j·dy_j − s³·x_j·dot/dim with dot = Σ w·dy·x an FP32 sum;
    // dweight_j = dw0_j + Σ_rows dy·x·s.
    std::vector<double> dx_scale(n), dw_scale = magnitudes(dw0);
    for (int64_t r = 0; r < c.rows; ++r) {
      const double s = rstd[r];
      double abs_dot = 0;
      for (int64_t j = 0; j < c.dim; ++j) abs_dot += std::fabs(static_cast<double>(w[j]) * dy[r * c.dim + j] * x[r * c.dim + j]);
      for (int64_t j = 0; j < c.dim; ++j) {
        const size_t i = static_cast<size_t>(r * c.dim + j);
        dx_scale[i] = s * std::fabs(static_cast<double>(w[j]) * dy[i]) + s * s * s * std::fabs(x[i]) * abs_dot / c.dim;
        dw_scale[j] += std::fabs(static_cast<double>(dy[i]) * x[i] * s);
      }
    }
    // FP32 sums (the CPU's are double): a sum of k terms in our order is off by at most about
    // (terms per thread + 5 warp levels + 8 warps)·2^-24 of Σ|terms| — under 50 · 6e-8 = 3e-6 for every dim here
    // (dweight: 32 rows per chunk, then <= 9 chunks per split and 8 splits) — plus a few roundings of products.
    constexpr double kTol = 1e-5;
    expect_close(name + " y", g_y, y, magnitudes(y), kTol);
    expect_close(name + " rstd", g_rstd, rstd, magnitudes(rstd), kTol);
    expect_close(name + " dx", g_dx, dx, dx_scale, kTol);
    expect_close(name + " dweight", g_dw, dw, dw_scale, kTol);

    // Reproducible: a second backward from the same dweight gives the same bits.
    d_dw.upload(dw0);
    d_dx.poison();
    cuda::rmsnorm_backward(d_dy.get(o), d_x.get(o), d_w.get(o), d_rstd_cpu.get(), d_dx.get(o), d_dw.get(), c.rows,
                           c.dim);
    expect_same_bits(name + " dx, second run", d_dx.download(n, o), g_dx);
    expect_same_bits(name + " dweight, second run", d_dw.download(c.dim), g_dw);

    // overwrite_dweight (an unset gradient): the bits of accumulating into zeros, whatever dweight held.
    d_dw.upload(std::vector<float>(static_cast<size_t>(c.dim), 0.0f));
    cuda::rmsnorm_backward(d_dy.get(o), d_x.get(o), d_w.get(o), d_rstd_cpu.get(), d_dx.get(o), d_dw.get(), c.rows,
                           c.dim);
    const std::vector<float> from_zero = d_dw.download(c.dim);
    d_dw.poison();
    cuda::rmsnorm_backward(d_dy.get(o), d_x.get(o), d_w.get(o), d_rstd_cpu.get(), d_dx.get(o), d_dw.get(), c.rows,
                           c.dim, nullptr, nullptr, 0, 0, 0, true);
    expect_same_bits(name + " dweight overwritten", d_dw.download(c.dim), from_zero);
  }
  // No rows: an overwritten dweight holds zeros (an empty sum), an accumulated one is left as it was.
  DeviceBuffer<float> d_dw(std::vector<float>(8, 1.0f));
  cuda::rmsnorm_backward(nullptr, nullptr, nullptr, nullptr, nullptr, d_dw.get(), 0, 8);
  EXPECT_EQ(d_dw.download(8), std::vector<float>(8, 1.0f));
  cuda::rmsnorm_backward(nullptr, nullptr, nullptr, nullptr, nullptr, d_dw.get(), 0, 8, nullptr, nullptr, 0, 0, 0,
                         true);
  EXPECT_EQ(d_dw.download(8), std::vector<float>(8, 0.0f));
}

TEST_F(OpsGpu, RmsNormWithAResidualGivesTheBitsOfTheAddDoneApart) {
  // The decoder layer's residual connections fused into its norms: forward, sum = x + residual then norm(sum), in
  // place over x as the layer runs it and into another buffer; backward, dx = the norm's input gradient + residual.
  // Each must give the bits of rmsnorm_forward / rmsnorm_backward with the add as its own pass (add_inplace), on the
  // vector and the scalar path.
  std::mt19937_64 rng(run_seed() + 17);
  struct Case { int64_t rows, dim; size_t offset; };
  for (const Case c : {Case{257, 1024, 0}, Case{33, 1030, 0}, Case{40, 512, 1}}) {
    const std::string name = "rmsnorm+residual " + std::to_string(c.rows) + "x" + std::to_string(c.dim) +
                             (c.offset ? " unaligned" : "");
    SCOPED_TRACE(name + ", seed " + std::to_string(run_seed()));
    const size_t n = static_cast<size_t>(c.rows * c.dim), o = c.offset;
    const std::vector<float> x = normal_vector(n, rng), res = normal_vector(n, rng), dy = normal_vector(n, rng),
                             w = normal_vector(c.dim, rng, 1.0f, 0.5f);
    std::vector<float> sum(n);
    for (size_t i = 0; i < n; ++i) sum[i] = x[i] + res[i];  // FP32, as add_inplace
    const float eps = 1e-6f;
    // Apart: norm of the sum, backward then + residual.
    DeviceBuffer<float> d_sum(sum, o), d_w(w, o), d_dy(dy, o), d_res(res, o), d_y(n + o), d_rstd(c.rows),
        d_dx(n + o), d_dw(std::vector<float>(c.dim, 0.0f));
    cuda::rmsnorm_forward(d_sum.get(o), d_w.get(o), d_y.get(o), d_rstd.get(), c.rows, c.dim, eps);
    cuda::rmsnorm_backward(d_dy.get(o), d_sum.get(o), d_w.get(o), d_rstd.get(), d_dx.get(o), d_dw.get(), c.rows,
                           c.dim);
    CUDA_CHECK(cudaDeviceSynchronize());
    std::vector<float> want_dx = d_dx.download(n, o);
    for (size_t i = 0; i < n; ++i) want_dx[i] = want_dx[i] + res[i];
    const std::vector<float> want_y = d_y.download(n, o), want_rstd = d_rstd.download(c.rows),
                             want_dw = d_dw.download(c.dim);
    // Fused, in place (sum over x) and into a separate buffer.
    for (const bool in_place : {true, false}) {
      DeviceBuffer<float> f_x(x, o), f_sum(n + o), f_y(n + o), f_rstd(c.rows), f_dx(n + o),
          f_dw(std::vector<float>(c.dim, 0.0f));
      f_sum.poison(), f_y.poison(), f_rstd.poison(), f_dx.poison();
      float* const s = in_place ? f_x.get(o) : f_sum.get(o);
      cuda::rmsnorm_forward_residual(f_x.get(o), d_res.get(o), s, d_w.get(o), f_y.get(o), f_rstd.get(), c.rows, c.dim,
                                     eps);
      cuda::rmsnorm_backward(d_dy.get(o), s, d_w.get(o), f_rstd.get(), f_dx.get(o), f_dw.get(), c.rows, c.dim, nullptr,
                             d_res.get(o));
      CUDA_CHECK(cudaDeviceSynchronize());
      const std::string how = in_place ? " (in place)" : " (into another buffer)";
      expect_same_bits(name + " sum" + how, (in_place ? f_x : f_sum).download(n, o), sum);
      expect_same_bits(name + " y" + how, f_y.download(n, o), want_y);
      expect_same_bits(name + " rstd" + how, f_rstd.download(c.rows), want_rstd);
      expect_same_bits(name + " dx" + how, f_dx.download(n, o), want_dx);
      expect_same_bits(name + " dweight" + how, f_dw.download(c.dim), want_dw);
    }
  }
}

TEST_F(OpsGpu, RmsNormOverColumnsOfWiderMatricesGivesThePackedBits) {
  // MLA's kv_a_layernorm runs over c, the first kv_lora columns of [c | k_rope], reading x and writing dx there
  // (x_ld, dx_ld); MTP's norms write y into a half of [en | hn] and read dy from a half of its gradient (y_ld,
  // dy_ld): no contiguous copies. Each output must have the packed call's bits, and the other columns of y and dx
  // must stay as they were (the backward writes dc beside dk_rope). Vector path (ld a multiple of 4) and scalar
  // path.
  std::mt19937_64 rng(run_seed() + 23);
  struct Case { int64_t rows, dim, ld; };
  for (const Case c : {Case{257, 256, 288}, Case{33, 30, 37}}) {
    const std::string name = "rmsnorm " + std::to_string(c.rows) + "x" + std::to_string(c.dim) + " in rows of " +
                             std::to_string(c.ld);
    SCOPED_TRACE(name + ", seed " + std::to_string(run_seed()));
    const size_t n = static_cast<size_t>(c.rows * c.dim), wide = static_cast<size_t>(c.rows * c.ld);
    const std::vector<float> x = normal_vector(n, rng), dy = normal_vector(n, rng),
                             w = normal_vector(c.dim, rng, 1.0f, 0.5f), dw0 = normal_vector(c.dim, rng);
    // The wide matrices: x and dy in their first dim columns, noise in the others.
    std::vector<float> xw = normal_vector(wide, rng), dyw = normal_vector(wide, rng), yw = normal_vector(wide, rng),
                       dxw = normal_vector(wide, rng);
    for (int64_t r = 0; r < c.rows; ++r)
      for (int64_t j = 0; j < c.dim; ++j) xw[r * c.ld + j] = x[r * c.dim + j], dyw[r * c.ld + j] = dy[r * c.dim + j];
    const float eps = 1e-6f;
    DeviceBuffer<float> d_x(x), d_xw(xw), d_w(w), d_dy(dy), d_dyw(dyw), d_y(n), d_rstd(c.rows), d_dx(n), d_dw(dw0),
        s_y(yw), s_rstd(c.rows), s_dx(dxw), s_dw(dw0);
    cuda::rmsnorm_forward(d_x.get(), d_w.get(), d_y.get(), d_rstd.get(), c.rows, c.dim, eps);
    cuda::rmsnorm_backward(d_dy.get(), d_x.get(), d_w.get(), d_rstd.get(), d_dx.get(), d_dw.get(), c.rows, c.dim);
    s_rstd.poison();
    cuda::rmsnorm_forward(d_xw.get(), d_w.get(), s_y.get(), s_rstd.get(), c.rows, c.dim, eps, nullptr, c.ld, c.ld);
    cuda::rmsnorm_backward(d_dyw.get(), d_xw.get(), d_w.get(), s_rstd.get(), s_dx.get(), s_dw.get(), c.rows, c.dim,
                           nullptr, nullptr, c.ld, c.ld, c.ld);
    CUDA_CHECK(cudaDeviceSynchronize());
    // Packed results placed in the wide matrices' first columns, the rest as it was.
    auto widened = [&](std::vector<float> wide_before, const std::vector<float>& packed) {
      for (int64_t r = 0; r < c.rows; ++r)
        for (int64_t j = 0; j < c.dim; ++j) wide_before[r * c.ld + j] = packed[r * c.dim + j];
      return wide_before;
    };
    expect_same_bits(name + " y and the columns beside it", s_y.download(wide), widened(yw, d_y.download(n)));
    expect_same_bits(name + " rstd", s_rstd.download(c.rows), d_rstd.download(c.rows));
    expect_same_bits(name + " dweight", s_dw.download(c.dim), d_dw.download(c.dim));
    expect_same_bits(name + " dx and the columns beside it", s_dx.download(wide), widened(dxw, d_dx.download(n)));
  }
  EXPECT_THROW(cuda::rmsnorm_forward(nullptr, nullptr, nullptr, nullptr, 4, 8, 1e-6f, nullptr, 7), Error);
}

TEST_F(OpsGpu, RopeRotatesLikeTheCpuInBothLayoutsInsideWiderRows) {
  std::mt19937_64 rng(run_seed() + 1);
  // x = q [tokens, heads·(nope + rope)], the rope dims at offset nope of each head (nope = 0: k_pe).
  struct Case { int64_t seq, batch, heads, nope, rope; };
  for (const Case c : {Case{16, 3, 4, 16, 8}, Case{128, 2, 16, 128, 64}, Case{64, 2, 1, 0, 64}, Case{4096, 1, 2, 0, 64},
                       Case{5, 2, 3, 1, 2}}) {
    for (const bool interleave : {false, true}) {
      const std::string name = "rope seq " + std::to_string(c.seq) + " heads " + std::to_string(c.heads) + " " +
                               std::to_string(c.nope) + "+" + std::to_string(c.rope) +
                               (interleave ? " interleaved" : " halves");
      SCOPED_TRACE(name + ", seed " + std::to_string(run_seed()));
      const int64_t tokens = c.seq * c.batch, head_stride = c.nope + c.rope, row_stride = c.heads * head_stride;
      const std::vector<float> x0 = normal_vector(static_cast<size_t>(tokens * row_stride), rng);
      const float theta = 10000.0f;
      std::vector<float> x = x0;
      DeviceBuffer<float> d_x(x0);
      cpu::rope_forward(x.data() + c.nope, tokens, c.seq, c.heads, row_stride, head_stride, c.rope, theta, interleave);
      cuda::rope_forward(d_x.get(c.nope), tokens, c.seq, c.heads, row_stride, head_stride, c.rope, theta, interleave);
      // The GPU rotates with the CPU's tables (uploaded) and rounds each product and sum as the CPU does: the same
      // bits, the nope dims untouched.
      expect_same_bits(name + " forward", d_x.download(x.size()), x);
      cpu::rope_backward(x.data() + c.nope, tokens, c.seq, c.heads, row_stride, head_stride, c.rope, theta, interleave);
      cuda::rope_backward(d_x.get(c.nope), tokens, c.seq, c.heads, row_stride, head_stride, c.rope, theta, interleave);
      expect_same_bits(name + " backward", d_x.download(x.size()), x);
    }
  }
}

TEST_F(OpsGpu, SwigluForwardAndBackwardMatchTheCpuReference) {
  std::mt19937_64 rng(run_seed() + 2);
  struct Case { int64_t n; size_t offset; };  // offset 1: unaligned, the scalar path
  for (const Case c : {Case{1, 0}, Case{3, 0}, Case{1003, 0}, Case{1003, 1}, Case{1 << 20, 0}}) {
    const std::string name = "swiglu n " + std::to_string(c.n) + (c.offset ? " unaligned" : "");
    SCOPED_TRACE(name + ", seed " + std::to_string(run_seed()));
    const size_t n = static_cast<size_t>(c.n), o = c.offset;
    // g spans the saturated ends of silu (|g| up to ~20), u and dh are plain.
    const std::vector<float> g = normal_vector(n, rng, 0.0f, 4.0f), u = normal_vector(n, rng),
                             dh = normal_vector(n, rng);
    std::vector<float> h(n), dg(n), du(n);
    cpu::swiglu_forward(g.data(), u.data(), h.data(), c.n);
    cpu::swiglu_backward(dh.data(), g.data(), u.data(), dg.data(), du.data(), c.n);
    DeviceBuffer<float> d_g(g, o), d_u(u, o), d_dh(dh, o), d_h(n + o), d_dg(n + o), d_du(n + o);
    d_h.poison(), d_dg.poison(), d_du.poison();
    cuda::swiglu_forward(d_g.get(o), d_u.get(o), d_h.get(o), c.n);
    cuda::swiglu_backward(d_dh.get(o), d_g.get(o), d_u.get(o), d_dg.get(o), d_du.get(o), c.n);
    // dg = dh·u·s·(1 + g·(1 − s)): 1 − s cancels, so an error in s counts |g| times — the scale is
    // |dh·u·s|·(|1 + g(1 − s)| + |g|).
    std::vector<double> dg_scale(n);
    for (size_t i = 0; i < n; ++i) {
      const double s = 1.0 / (1.0 + std::exp(-static_cast<double>(g[i])));
      dg_scale[i] = std::fabs(dh[i] * u[i] * s) * (std::fabs(1.0 + g[i] * (1.0 - s)) + std::fabs(g[i]));
    }
    // Same formulas, each operation rounded alike; only expf differs (CUDA's within 2 ulp, glibc's within 0.5):
    // through 1 + exp, the division and the products, at most ~15·2^-24 ≈ 9e-7 of the scale in the worst case.
    constexpr double kTol = 2e-6;
    expect_close(name + " h", d_h.download(n, o), h, magnitudes(h), kTol);
    expect_close(name + " du", d_du.download(n, o), du, magnitudes(du), kTol);
    expect_close(name + " dg", d_dg.download(n, o), dg, dg_scale, kTol);
  }
}

TEST_F(OpsGpu, EmbeddingCopiesRowsAndAddsGradientsInTheCpuOrderBitForBit) {
  std::mt19937_64 rng(run_seed() + 3);
  const int64_t vocab = 1000, rows = 4096;
  struct Case { int64_t dim; size_t offset; };
  for (const Case c : {Case{96, 0}, Case{7, 0}, Case{1024, 0}, Case{96, 1}}) {
    const std::string name = "embedding dim " + std::to_string(c.dim) + (c.offset ? " unaligned" : "");
    SCOPED_TRACE(name + ", seed " + std::to_string(run_seed()));
    // Most ids from a small range, so many rows share an id (one id about 100 times); the table's ends too.
    std::vector<int64_t> ids(rows);
    std::uniform_int_distribution<int64_t> common(0, 40), any(0, vocab - 1);
    std::bernoulli_distribution pick_common(0.7);
    for (int64_t& id : ids) id = pick_common(rng) ? common(rng) : any(rng);
    ids[0] = 0, ids[rows - 1] = vocab - 1;
    const size_t n = static_cast<size_t>(rows * c.dim), o = c.offset;
    const std::vector<float> table = normal_vector(static_cast<size_t>(vocab * c.dim), rng),
                             dout = normal_vector(n, rng);
    std::vector<float> out(n), dtable = normal_vector(table.size(), rng);
    const std::vector<float> dtable0 = dtable;
    cpu::embedding_forward(table.data(), ids.data(), rows, c.dim, out.data());
    cpu::embedding_backward(dout.data(), ids.data(), rows, c.dim, dtable.data());

    DeviceBuffer<float> d_table(table, o), d_out(n + o), d_dout(dout, o), d_dtable(dtable0, o);
    DeviceBuffer<int64_t> d_ids(ids);
    d_out.poison();
    cuda::embedding_forward(d_table.get(o), d_ids.get(), rows, c.dim, d_out.get(o));
    cuda::embedding_backward(d_dout.get(o), d_ids.get(), rows, c.dim, d_dtable.get(o));
    // A copy, and the CPU's additions in the CPU's order: nothing may differ.
    expect_same_bits(name + " forward", d_out.download(n, o), out);
    expect_same_bits(name + " backward", d_dtable.download(dtable.size(), o), dtable);
  }
}

TEST_F(OpsGpu, CrossEntropyMatchesTheCpuLossAndGradientAndRefusesBadLabels) {
  std::mt19937_64 rng(run_seed() + 4);
  struct Case { int64_t rows, vocab; };
  for (const Case c : {Case{300, 1000}, Case{64, 32000}, Case{17, 1001}, Case{5, 3}}) {
    const std::string name = "cross_entropy " + std::to_string(c.rows) + "x" + std::to_string(c.vocab);
    SCOPED_TRACE(name + ", seed " + std::to_string(run_seed()));
    const size_t n = static_cast<size_t>(c.rows * c.vocab);
    // Logits N(0, 2²), every 7th row with one logit raised by 20 (a confident row); 10% of labels ignored (−100).
    std::vector<float> logits = normal_vector(n, rng, 0.0f, 2.0f);
    std::vector<int64_t> labels(c.rows);
    std::uniform_int_distribution<int64_t> label(0, c.vocab - 1);
    std::bernoulli_distribution ignore(0.1);
    for (int64_t r = 0; r < c.rows; ++r) {
      labels[r] = ignore(rng) ? -100 : label(rng);
      if (r % 7 == 0) logits[r * c.vocab + label(rng)] += 20.0f;
    }
    labels[0] = c.vocab - 1;
    int64_t counted = 0;
    std::vector<float> dlogits(n);
    const double loss0 = cpu::cross_entropy(logits.data(), labels.data(), c.rows, c.vocab, 1.0f, nullptr, &counted);
    const float grad_scale = 1.0f / static_cast<float>(std::max<int64_t>(counted, 1));
    const double loss = cpu::cross_entropy(logits.data(), labels.data(), c.rows, c.vocab, grad_scale, dlogits.data(),
                                           &counted);
    ASSERT_EQ(loss, loss0);

    DeviceBuffer<float> d_logits(logits), d_dlogits(n);
    DeviceBuffer<int64_t> d_labels(labels);
    d_dlogits.poison();
    int64_t g_counted = -1;
    const double g_loss =
        cuda::cross_entropy(d_logits.get(), d_labels.get(), c.rows, c.vocab, grad_scale, d_dlogits.get(), &g_counted);
    EXPECT_EQ(g_counted, counted);
    // Per row lse = max + log(sum) from an FP32 sum of exp (the CPU's is double): a relative error of the sum
    // below ~100·2^-24 = 6e-6 (see dlogits), so below 6e-6 nats in each row's loss — a few nats per counted row.
    const double loss_err = std::fabs(g_loss - loss);
    std::printf("  %-44s abs err %.3g, rel err %.3g, tolerance %.3g\n", (name + " loss sum").c_str(), loss_err,
                loss_err / std::fabs(loss), 1e-5);
    EXPECT_LE(loss_err, 1e-5 * std::fabs(loss)) << "GPU " << g_loss << ", CPU " << loss;
    // dlogits = grad_scale·exp(z − max)/sum (− grad_scale at the label). The FP32 sum: per thread vocab/1024
    // float4 groups (pairwise inside a group), a few rescalings as its max grows, 13 merge levels each rounding a
    // product with an exp — at worst ~100·2^-24 ≈ 6e-6 relative, typically far less; the rounding of z − max
    // (|z − max| < 64 here: at most 2^-19 absolute, 2e-6 relative after exp); the exponential's own (its argument
    // times log2 e rounded, below 2^7: 2^-18 absolute, 2.6e-6 relative; ex2.approx 2^-22). At the label
    // grad_scale·(p − 1) cancels: the scale adds grad_scale there.
    std::vector<double> dz_scale = magnitudes(dlogits);
    for (int64_t r = 0; r < c.rows; ++r)
      if (labels[r] >= 0) dz_scale[r * c.vocab + labels[r]] += grad_scale;
    const std::vector<float> g_dz = d_dlogits.download(n);
    expect_close(name + " dlogits", g_dz, dlogits, dz_scale, 1e-5);

    // Deterministic, and the same loss without the gradient.
    EXPECT_EQ(cuda::cross_entropy(d_logits.get(), d_labels.get(), c.rows, c.vocab, grad_scale, d_dlogits.get(),
                                  nullptr),
              g_loss);
    EXPECT_EQ(cuda::cross_entropy(d_logits.get(), d_labels.get(), c.rows, c.vocab, grad_scale, nullptr, nullptr),
              g_loss);
    expect_same_bits(name + " dlogits, second run", d_dlogits.download(n), g_dz);
    // In place (dlogits = logits): the same loss and gradient.
    d_dlogits.upload(logits);
    EXPECT_EQ(cuda::cross_entropy(d_dlogits.get(), d_labels.get(), c.rows, c.vocab, grad_scale, d_dlogits.get(),
                                  nullptr),
              g_loss);
    expect_same_bits(name + " dlogits, in place", d_dlogits.download(n), g_dz);

    // The gradient rounded to BF16 (for a BF16 head): cuda::to_bf16's bits of the FP32 gradient, the same loss, into
    // a separate [rows, ld16] buffer (ld16 > vocab: the padding left alone) and in place over the logits, each row
    // in the first half of its own FP32 storage (ld16 = 2 vocab: each step of a row's pass writes over logits that
    // step or an earlier one has read; writing before the step's barrier would corrupt the gradient).
    if (c.vocab % 4 == 0) {
      std::vector<uint16_t> want16(n);
      for (size_t i = 0; i < n; ++i) want16[i] = bf16_from_float(g_dz[i]);
      const int64_t ld16 = c.vocab + 8;
      DeviceBuffer<uint16_t> d_g16(static_cast<size_t>(c.rows * ld16));
      std::vector<uint16_t> marked(static_cast<size_t>(c.rows * ld16), 0xABCD);
      d_g16.upload(marked);
      EXPECT_EQ(cuda::cross_entropy_bf16_grad(d_logits.get(), d_labels.get(), c.rows, c.vocab, grad_scale,
                                              d_g16.get(), ld16, nullptr),
                g_loss);
      const std::vector<uint16_t> got16 = d_g16.download(marked.size());
      std::vector<uint16_t> rows16(n), pad;
      for (int64_t r = 0; r < c.rows; ++r) {
        std::copy_n(got16.begin() + r * ld16, c.vocab, rows16.begin() + r * c.vocab);
        pad.insert(pad.end(), got16.begin() + r * ld16 + c.vocab, got16.begin() + (r + 1) * ld16);
      }
      expect_same_bits(name + " dlogits bf16", rows16, want16);
      EXPECT_TRUE(std::all_of(pad.begin(), pad.end(), [](uint16_t v) { return v == 0xABCD; })) << "padding written";

      d_dlogits.upload(logits);
      auto* in_place = reinterpret_cast<uint16_t*>(d_dlogits.get());
      EXPECT_EQ(cuda::cross_entropy_bf16_grad(d_dlogits.get(), d_labels.get(), c.rows, c.vocab, grad_scale, in_place,
                                              2 * c.vocab, nullptr),
                g_loss);
      const std::vector<float> raw = d_dlogits.download(n);  // row r's bits in its first vocab / 2 floats
      std::vector<uint16_t> in_rows(n);
      for (int64_t r = 0; r < c.rows; ++r)
        std::memcpy(in_rows.data() + r * c.vocab, raw.data() + r * c.vocab, static_cast<size_t>(c.vocab) * 2);
      expect_same_bits(name + " dlogits bf16, in place", in_rows, want16);
      EXPECT_THROW(cuda::cross_entropy_bf16_grad(d_dlogits.get(), d_labels.get(), c.rows, c.vocab, grad_scale,
                                                 in_place, c.vocab, nullptr),
                   Error);  // in place with rows overlapping the next rows' logits

      // BF16 logits (a BF16 head's output): the loss and BF16 gradient of their widened values, bit for bit what
      // the FP32 form gives from those widened values, into a separate buffer and in place over the logits (row
      // stride vocab); without a gradient the same loss.
      std::vector<uint16_t> logits16(n);
      std::vector<float> widened(n);
      for (size_t i = 0; i < n; ++i) {
        logits16[i] = bf16_from_float(logits[i]);
        widened[i] = float_from_bf16(logits16[i]);
      }
      DeviceBuffer<float> d_widened(widened);
      DeviceBuffer<uint16_t> d_l16(logits16), d_want(n), d_sep(n);
      d_sep.poison();
      const double w_loss = cuda::cross_entropy_bf16_grad(d_widened.get(), d_labels.get(), c.rows, c.vocab,
                                                          grad_scale, d_want.get(), c.vocab, nullptr);
      const std::vector<uint16_t> want_w = d_want.download(n);
      int64_t c16 = -1;
      EXPECT_EQ(cuda::cross_entropy_bf16_logits(d_l16.get(), d_labels.get(), c.rows, c.vocab, grad_scale,
                                                d_sep.get(), &c16),
                w_loss);
      EXPECT_EQ(c16, counted);
      expect_same_bits(name + " bf16 logits, dlogits", d_sep.download(n), want_w);
      EXPECT_EQ(cuda::cross_entropy_bf16_logits(d_l16.get(), d_labels.get(), c.rows, c.vocab, grad_scale, nullptr,
                                                nullptr),
                w_loss);
      EXPECT_EQ(cuda::cross_entropy_bf16_logits(d_l16.get(), d_labels.get(), c.rows, c.vocab, grad_scale,
                                                d_l16.get(), nullptr),
                w_loss);
      expect_same_bits(name + " bf16 logits, dlogits in place", d_l16.download(n), want_w);
      // Against the CPU on the widened logits: the FP32 path's tolerance (above) plus BF16's rounding of dlogits.
      const double w_cpu = cpu::cross_entropy(widened.data(), labels.data(), c.rows, c.vocab, grad_scale, nullptr,
                                              nullptr);
      EXPECT_LE(std::fabs(w_loss - w_cpu), 1e-5 * std::fabs(w_cpu)) << "bf16 logits loss vs the CPU's";
    } else {
      DeviceBuffer<uint16_t> d_g16(n);
      EXPECT_THROW(cuda::cross_entropy_bf16_grad(d_logits.get(), d_labels.get(), c.rows, c.vocab, grad_scale,
                                                 d_g16.get(), c.vocab, nullptr),
                   Error);  // vocab not a multiple of 4
    }

    // A label >= vocab is the caller's error: refused with the row named, as the CPU refuses it.
    labels[c.rows / 2] = c.vocab;
    d_labels.upload(labels);
    try {
      cuda::cross_entropy(d_logits.get(), d_labels.get(), c.rows, c.vocab, grad_scale, d_dlogits.get(), nullptr);
      ADD_FAILURE() << "a label >= vocab was accepted";
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find("row " + std::to_string(c.rows / 2)), std::string::npos) << e.what();
    }
  }
}

TEST_F(OpsGpu, AdamWStepsWithClippingGiveTheCpuOptimizersBits) {
  std::mt19937_64 rng(run_seed() + 5);
  Params params;
  params.add("expert.w", {4, 33, 7});       // rank 3: decayed
  params.add("layer.weight", {64, 300});    // rank 2: decayed
  params.add("norm.weight", {1001});        // rank 1: not decayed; 1001 % 4 != 0, the scalar tail
  params.add("router.bias", {16}, false);   // frozen: no moments, never updated
  AdamWConfig config;
  config.lr = 1e-2, config.weight_decay = 0.1, config.clip_grad_norm = 1.0, config.warmup_steps = 2,
  config.total_steps = 6;
  struct Slot {
    Param* p;
    std::string name;
    std::unique_ptr<DeviceBuffer<float>> w, g;
    std::unique_ptr<DeviceBuffer<uint16_t>> m, v;
  };
  std::vector<Slot> slots;  // trainable parameters in name order, as the CPU optimizer holds them
  for (auto& [name, p] : params.all()) {
    const std::vector<float> init = normal_vector(static_cast<size_t>(p.value.numel()), rng, 0.0f, 0.1f);
    std::copy(init.begin(), init.end(), p.value.data<float>());
    if (!p.trainable) continue;
    Slot s{&p, name, std::make_unique<DeviceBuffer<float>>(init), std::make_unique<DeviceBuffer<float>>(init.size()),
           std::make_unique<DeviceBuffer<uint16_t>>(init.size()), std::make_unique<DeviceBuffer<uint16_t>>(init.size())};
    s.m->fill_bytes(0), s.v->fill_bytes(0);
    slots.push_back(std::move(s));
  }
  AdamW cpu_opt(params, config);
  DeviceBuffer<double> d_sum(1);
  int64_t gpu_updates = 0;
  for (int64_t step = 0; step < 6; ++step) {
    SCOPED_TRACE("step " + std::to_string(step) + ", seed " + std::to_string(run_seed()));
    // ~22k gradient values: σ = 0.02 gives a norm near 3 (clipped to 1), σ = 0.002 near 0.3 (not clipped); step 3
    // holds an Inf (skipped: weights, moments and the update count stay).
    const float sigma = step % 2 == 0 ? 0.02f : 0.002f;
    for (Slot& s : slots) {
      std::vector<float> g = normal_vector(static_cast<size_t>(s.p->grad.numel()), rng, 0.0f, sigma);
      if (step == 3 && s.name == "norm.weight") g[5] = INFINITY;
      std::copy(g.begin(), g.end(), s.p->grad.data<float>());
      s.g->upload(g);
    }
    const StepStats stats = cpu_opt.step(step);

    CUDA_CHECK(cudaMemset(d_sum.get(), 0, sizeof(double)));
    for (Slot& s : slots) cuda::grad_norm_squared(s.g->get(), s.p->grad.numel(), d_sum.get());
    const double norm = std::sqrt(d_sum.download(1)[0]);
    if (std::isfinite(stats.grad_norm)) {
      // Both sum the same exact double squares of ~22k values, in other orders: at most ~22k·2^-53 ≈ 2.5e-12
      // apart, relatively.
      EXPECT_NEAR(norm, stats.grad_norm, 1e-11 * stats.grad_norm);
    } else {
      EXPECT_FALSE(std::isfinite(norm));
    }
    std::printf("  adamw step %lld: grad norm CPU %.17g, GPU %.17g%s\n", static_cast<long long>(step),
                stats.grad_norm, norm, stats.skipped ? " (skipped)" : "");
    ASSERT_EQ(stats.skipped, !std::isfinite(norm));
    if (std::isfinite(norm)) {
      // moerl::clip_grad_norm's rule. The factor rounds to the same float unless max_norm / norm lies within the
      // norms' difference (typically ~1e-15 relative) of an FP32 rounding boundary: about one chance in 10^7.
      if (norm > config.clip_grad_norm)
        for (Slot& s : slots) cuda::scale(s.g->get(), s.p->grad.numel(), static_cast<float>(config.clip_grad_norm / norm));
      ++gpu_updates;
      const double lr = learning_rate(config, step);
      for (Slot& s : slots)
        cuda::adamw_step(s.w->get(), s.g->get(), s.m->get(), s.v->get(), s.p->value.numel(), lr, config.beta1,
                         config.beta2, config.eps, s.p->value.rank() >= 2 ? config.weight_decay : 0.0, gpu_updates);
    }
    ASSERT_EQ(cpu_opt.steps_taken(), gpu_updates);
    // The same FP32 operations in the same order, each rounded to nearest (no FMA on either side: the CPU build
    // has none, the kernel uses _rn intrinsics), and the same BF16 rounding: every bit must agree.
    const auto state = cpu_opt.state();
    for (Slot& s : slots) {
      const size_t n = static_cast<size_t>(s.p->value.numel());
      const std::vector<float> g_cpu(s.p->grad.data<float>(), s.p->grad.data<float>() + n);
      const std::vector<float> w_cpu(s.p->value.data<float>(), s.p->value.data<float>() + n);
      const Tensor& m = *state.at("optimizer.exp_avg." + s.name);
      const Tensor& v = *state.at("optimizer.exp_avg_sq." + s.name);
      expect_same_bits(s.name + " clipped grad", s.g->download(n), g_cpu);
      expect_same_bits(s.name + " exp_avg (BF16)", s.m->download(n), std::vector<uint16_t>(m.u16(), m.u16() + n));
      expect_same_bits(s.name + " exp_avg_sq (BF16)", s.v->download(n), std::vector<uint16_t>(v.u16(), v.u16() + n));
      expect_same_bits(s.name + " weight", s.w->download(n), w_cpu);
    }
  }
}

// cuda::AdamWSpans (one launch per kernel for all spans) gives the per-span calls' bits: the norm's double (each
// span's chunk sums added in span order) and every weight and moment, with spans smaller than, straddling and
// exactly filling the 32768-element chunks, an empty one, odd tails, with and without decay, and a clip factor.
TEST_F(OpsGpu, AdamWSpansGiveThePerSpanCallsBits) {
  std::mt19937_64 rng(run_seed() + 77);
  const std::vector<int64_t> sizes = {5, 32768 + 7, 3 * 32768, 100003, 0, 1, 4096};
  struct Buffers {
    std::unique_ptr<DeviceBuffer<float>> w, g;
    std::unique_ptr<DeviceBuffer<uint16_t>> m, v;
  };
  auto make = [&](std::vector<Buffers>& out) {
    std::mt19937_64 r(rng);  // the same values for both sets
    for (int64_t n : sizes) {
      std::vector<uint16_t> m(static_cast<size_t>(n)), v(static_cast<size_t>(n));
      for (size_t i = 0; i < m.size(); ++i) {
        m[i] = bf16_from_float(std::normal_distribution<float>(0.0f, 1e-3f)(r));
        v[i] = bf16_from_float(std::fabs(std::normal_distribution<float>(0.0f, 1e-5f)(r)));
      }
      out.push_back({std::make_unique<DeviceBuffer<float>>(normal_vector(static_cast<size_t>(n), r, 0.0f, 0.02f)),
                     std::make_unique<DeviceBuffer<float>>(normal_vector(static_cast<size_t>(n), r, 0.0f, 0.01f)),
                     std::make_unique<DeviceBuffer<uint16_t>>(m), std::make_unique<DeviceBuffer<uint16_t>>(v)});
    }
  };
  std::vector<Buffers> apart, together;
  make(apart);
  make(together);
  DeviceBuffer<double> sums(2);
  CUDA_CHECK(cudaMemset(sums.get(), 0, 2 * sizeof(double)));
  std::vector<cuda::AdamWSpan> spans;
  for (size_t i = 0; i < sizes.size(); ++i) {
    const bool decay = i % 2 == 0;
    const Buffers& a = apart[i];
    cuda::grad_norm_squared(a.g->get(), sizes[i], sums.get());
    cuda::adamw_step(a.w->get(), a.g->get(), a.m->get(), a.v->get(), sizes[i], 1e-3, 0.9, 0.95, 1e-8,
                     decay ? 0.1 : 0.0, 3, nullptr, 0.75f);
    const Buffers& b = together[i];
    spans.push_back({b.w->get(), b.g->get(), b.m->get(), b.v->get(), sizes[i], decay});
  }
  const cuda::AdamWSpans batched(spans);
  batched.grad_norm_squared(sums.get() + 1);
  batched.adamw_step(cuda::AdamWUpdate{1e-3, 0.9, 0.95, 1e-8, 0.1, 3, 0.75f});
  CUDA_CHECK(cudaDeviceSynchronize());
  const std::vector<double> got = sums.download(2);
  EXPECT_EQ(std::bit_cast<uint64_t>(got[1]), std::bit_cast<uint64_t>(got[0])) << got[1] << " vs " << got[0];
  for (size_t i = 0; i < sizes.size(); ++i) {
    const size_t n = static_cast<size_t>(sizes[i]);
    const std::string what = "span " + std::to_string(i) + " (" + std::to_string(n) + ")";
    expect_same_bits(what + " weight", together[i].w->download(n), apart[i].w->download(n));
    expect_same_bits(what + " exp_avg", together[i].m->download(n), apart[i].m->download(n));
    expect_same_bits(what + " exp_avg_sq", together[i].v->download(n), apart[i].v->download(n));
  }
  std::printf("  adamw spans: %zu spans in one launch per kernel, norm^2 %.17g, the per-span bits\n", sizes.size(),
              got[1]);
  std::vector<cuda::AdamWSpan> bad = spans;
  bad[1].w += 1;  // 4-byte aligned only
  EXPECT_THROW(cuda::AdamWSpans{bad}, Error);
}

TEST_F(OpsGpu, RefusesBadArgumentsWithAnError) {
  EXPECT_THROW(cuda::rmsnorm_forward(nullptr, nullptr, nullptr, nullptr, -1, 8, 1e-6f), Error);
  EXPECT_THROW(cuda::rope_forward(nullptr, 4, 4, 1, 8, 8, 7, 1e4f, false), Error);   // odd dim
  EXPECT_THROW(cuda::rope_forward(nullptr, 6, 4, 1, 8, 8, 8, 1e4f, false), Error);   // tokens % seq != 0
  EXPECT_THROW(cuda::swiglu_forward(nullptr, nullptr, nullptr, 5), Error);           // null pointers
  EXPECT_THROW(cuda::embedding_backward(nullptr, nullptr, -2, 4, nullptr), Error);
  EXPECT_THROW(cuda::cross_entropy(nullptr, nullptr, 4, 0, 1.0f, nullptr, nullptr), Error);  // vocab 0
  DeviceBuffer<float> w(4), g(4);
  DeviceBuffer<uint16_t> m(4), v(4);
  EXPECT_THROW(cuda::adamw_step(w.get(), g.get(), m.get(), v.get(), 4, 1e-3, 1.0, 0.95, 1e-8, 0.1, 1), Error);
  EXPECT_THROW(cuda::adamw_step(w.get(), g.get(), m.get(), v.get(), 4, 1e-3, 0.9, 0.95, 1e-8, 0.1, 0), Error);
  // Empty problems launch nothing.
  EXPECT_NO_THROW(cuda::swiglu_forward(nullptr, nullptr, nullptr, 0));
  EXPECT_EQ(cuda::cross_entropy(nullptr, nullptr, 0, 10, 1.0f, nullptr, nullptr), 0.0);
}

TEST_F(OpsGpu, ReportsBandwidthOnModelSizes) {
  // Contents do not change the work (no data-dependent paths): constant fills instead of random uploads.
  // Bytes count each tensor once per direction (the kernels' second reads of a row hit the caches).
  constexpr int64_t kRows = 16384;
  {
    const int64_t dim = 1024, n = kRows * dim;
    DeviceBuffer<float> x(n), w(dim), y(n), rstd(kRows), dy(n), dx(n), dw(dim);
    for (auto* b : {&x, &w, &dy}) b->fill_bytes(0x3C);  // 0.0115 in every float
    dw.fill_bytes(0);
    const double fwd = median_us([&] { cuda::rmsnorm_forward(x.get(), w.get(), y.get(), rstd.get(), kRows, dim, 1e-6f); });
    print_bandwidth("rmsnorm forward 16384x1024", fwd, 8.0 * n);
    const double bwd = median_us([&] {
      cuda::rmsnorm_backward(dy.get(), x.get(), w.get(), rstd.get(), dx.get(), dw.get(), kRows, dim);
    });
    print_bandwidth("rmsnorm backward 16384x1024 (with dweight)", bwd, 12.0 * n);
  }
  {
    const int64_t n = kRows * 2816;
    DeviceBuffer<float> g(n), u(n), h(n), dh(n), dg(n), du(n);
    for (auto* b : {&g, &u, &dh}) b->fill_bytes(0x3C);
    print_bandwidth("swiglu forward 16384x2816", median_us([&] { cuda::swiglu_forward(g.get(), u.get(), h.get(), n); }),
                    12.0 * n);
    print_bandwidth("swiglu backward 16384x2816",
                    median_us([&] { cuda::swiglu_backward(dh.get(), g.get(), u.get(), dg.get(), du.get(), n); }),
                    20.0 * n);
  }
  {
    const int64_t vocab = 32000, n = kRows * vocab;
    DeviceBuffer<float> logits(n), dlogits(n);
    DeviceBuffer<int64_t> labels(kRows);
    logits.fill_bytes(0x3C), labels.fill_bytes(0);
    const double us = median_us([&] {
      cuda::cross_entropy(logits.get(), labels.get(), kRows, vocab, 1.0f, dlogits.get(), nullptr);
    });
    print_bandwidth("cross_entropy 16384x32000 (incl. the sync)", us, 8.0 * n);
    // The model's form: the BF16 gradient over the logits' own bytes (read 4 bytes, written 2 an element).
    uint16_t* in_place = reinterpret_cast<uint16_t*>(logits.get());
    const double us16 = median_us([&] {
      cuda::cross_entropy_bf16_grad(logits.get(), labels.get(), kRows, vocab, 1.0f, in_place, 2 * vocab, nullptr);
    });
    print_bandwidth("cross_entropy 16384x32000 BF16 gradient in place (incl. the sync)", us16, 6.0 * n);
    // The model's form with a BF16 head: BF16 logits read, their BF16 gradient written over them.
    auto* logits16 = reinterpret_cast<uint16_t*>(logits.get());
    const double us_l16 = median_us([&] {
      cuda::cross_entropy_bf16_logits(logits16, labels.get(), kRows, vocab, 1.0f, logits16, nullptr);
    });
    print_bandwidth("cross_entropy 16384x32000 BF16 logits, BF16 gradient in place (incl. the sync)", us_l16, 4.0 * n);
  }
  {
    const int64_t n = 100'000'000;
    DeviceBuffer<float> w(n), g(n);
    DeviceBuffer<uint16_t> m(n), v(n);
    DeviceBuffer<double> sum(1);
    w.fill_bytes(0x3C), g.fill_bytes(0x3C), m.fill_bytes(0), v.fill_bytes(0), sum.fill_bytes(0);
    int64_t t = 0;
    const double us = median_us([&] {
      cuda::adamw_step(w.get(), g.get(), m.get(), v.get(), n, 1e-4, 0.9, 0.95, 1e-8, 0.1, ++t);
    });
    print_bandwidth("adamw_step 100M params", us, 20.0 * n);  // w, g, m, v read; w, m, v written
    print_bandwidth("grad_norm_squared 100M", median_us([&] { cuda::grad_norm_squared(g.get(), n, sum.get()); }),
                    4.0 * n);
    print_bandwidth("scale 100M", median_us([&] { cuda::scale(g.get(), n, 1.0f); }), 8.0 * n);
  }
}

}  // namespace
}  // namespace moerl
