// cuda::linear_forward / cuda::linear_backward (kernels/cuda/linear.hpp) against cpu::linear_forward /
// cpu::linear_backward (kernels/cpu/linear.cpp) in the three precisions, plus the prepared weights byte for
// byte, the weights_changed() contract and timings. Random data with a fresh seed per test (printed;
// MOERL_TEST_SEED=<n> repeats a run). Every row of x, w and dy gets its own magnitude 2^e, e in [-3, 3], so a
// scale or row taken from the wrong place is off by factors of 2 or more instead of hiding in the noise.
// Outputs are poisoned with NaN before each call (an unwritten element fails); dw starts from random values
// (accumulation, not overwrite).
//
// Tolerances. GPU and CPU multiply the same values (BF16: both round x, w and dy to nearest even; FP8: the
// same E4M3 codes and scales, checked bit for bit below), so only the summation differs. Per comparison,
// absref = the same recipe on |x|, |w|, |dy| (+ |dw0|): rounding and quantization are sign-symmetric, so that
// is Σ|a||b| over the very terms summed, the scale of any summation error.
//   fp32, bf16: each element |gpu - cpu| <= depth · 2^-22 · absref (depth = contracted size). Worst case of
//     two FP32 sums of `depth` terms: the CPU's (round to nearest) <= depth · 2^-24 · Σ|terms|, the tensor
//     cores' (which may truncate: unit 2^-23) <= depth · 2^-23 · Σ|terms|. This bound is loose (it cannot
//     see a missing BF16 rounding at large depth), so also
//     rel_l2 = ||gpu - cpu|| / ||cpu - dw0|| < 2e-5. Where it comes from: a CPU model of a truncating tensor
//     core (chunks of 8 exact products, every addition rounded toward zero) against OpenBLAS on this data gave
//     rel_l2 1.6e-6 (bf16) / 3.0e-6 (fp32) at depth 1024 and 2.6e-6 / 4.5e-6 at 1536, growing linearly;
//     worst element 0.06 of the bound. Mistakes it must catch: TF32 in the fp32 path gave 3e-4, one BF16
//     operand left unrounded 1.7e-3.
//   fp8: the GPU sums each 128-group on the tensor cores (about 14 significand bits, DeepSeek-V3) and promotes
//     to FP32 per group. Limits of tests/gpu/fp8_gemm_gpu.cpp, whose emulation derived them: each element
//     <= 2^-8 · absref, and rel_l2 < 1e-3 (gemm_nt with FP32 output measured 1.27e-4 on the H200,
//     bench/results/2026-11-28-gpu-tests-h200-all-ops.txt; a weight quantized in 1x128 tiles instead of
//     128x128 blocks gives ~3e-2, a scale from the wrong tile ~1).
#include <gtest/gtest.h>

#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "kernels/cuda/cuda_check.hpp"
#include "kernels/cuda/linear.hpp"
#include "kernels/fp8.hpp"
#include "kernels/fp8_gemm.hpp"
#include "kernels/half.hpp"
#include "kernels/linear.hpp"
#include "runtime/error.hpp"
#include "tests/gpu/moe_gpu_support.hpp"

namespace moerl {
namespace {

using moe_gpu_test::DeviceBuffer;
using moe_gpu_test::median_ms;

constexpr Precision kPrecisions[] = {Precision::FP32, Precision::BF16, Precision::FP8};

std::mt19937_64 seeded(const char* what) {
  uint64_t seed = 0;
  if (const char* env = std::getenv("MOERL_TEST_SEED"))
    seed = std::strtoull(env, nullptr, 10);
  else
    seed = (uint64_t{std::random_device{}()} << 32) | std::random_device{}();
  std::printf("[   seed   ] linear %s: %llu (MOERL_TEST_SEED=%llu repeats it)\n", what,
              static_cast<unsigned long long>(seed), static_cast<unsigned long long>(seed));
  return std::mt19937_64(seed);
}

// [rows, cols] normal values of `stddev`, each row times 2^e, e uniform in [-3, 3].
std::vector<float> random_rows(int64_t rows, int64_t cols, float stddev, std::mt19937_64& rng) {
  std::normal_distribution<float> normal(0.0f, stddev);
  std::uniform_int_distribution<int> exponent(-3, 3);
  std::vector<float> v(static_cast<size_t>(rows * cols));
  for (int64_t r = 0; r < rows; ++r) {
    const float m = std::ldexp(1.0f, exponent(rng));
    for (int64_t c = 0; c < cols; ++c) v[static_cast<size_t>(r * cols + c)] = normal(rng) * m;
  }
  return v;
}

std::vector<float> absolute(std::vector<float> v) {
  for (float& x : v) x = std::fabs(x);
  return v;
}

struct Shape {
  int64_t M, N, K;
};

std::string describe(Precision p, const char* pass, Shape s) {
  return std::string(precision_name(p)) + " " + pass + " M=" + std::to_string(s.M) + " N=" + std::to_string(s.N) +
         " K=" + std::to_string(s.K);
}

struct Tolerance {
  double per_term;  // each element: |gpu - cpu| <= per_term · absref
  double rel_l2;    // ||gpu - cpu|| / ||cpu - base|| < rel_l2
};

// depth: the contracted size of the GEMM (K forward, N Dgrad, M Wgrad). See the top of the file.
Tolerance tolerance(Precision p, int64_t depth) {
  if (p == Precision::FP8) return {std::ldexp(1.0, -8), 1e-3};
  return {std::ldexp(static_cast<double>(std::max<int64_t>(depth, 1)), -22), 2e-5};
}

struct Comparison {
  double max_abs = 0, max_rel = 0;  // max |gpu - cpu|, max |gpu - cpu| / absref
  double worst = 0;                 // max |gpu - cpu| / element tolerance (<= 1 passes)
  double rel_l2 = 0;
  int64_t worst_index = -1, nonfinite = 0;
};

// base: what the output held before (dw0 for Wgrad), left out of rel_l2's denominator; empty for none.
Comparison compare(const std::vector<float>& gpu, const std::vector<float>& cpu, const std::vector<float>& absref,
                   const std::vector<float>& base, Tolerance tol) {
  Comparison c;
  double err2 = 0, ref2 = 0;
  for (size_t i = 0; i < cpu.size(); ++i) {
    if (!std::isfinite(gpu[i])) {
      ++c.nonfinite;
      continue;
    }
    const double d = std::fabs(static_cast<double>(gpu[i]) - cpu[i]);
    const double r = static_cast<double>(cpu[i]) - (base.empty() ? 0.0 : base[i]);
    err2 += d * d;
    ref2 += r * r;
    c.max_abs = std::max(c.max_abs, d);
    if (absref[i] > 0) c.max_rel = std::max(c.max_rel, d / absref[i]);
    const double t = tol.per_term * absref[i];
    const double ratio = d == 0 ? 0.0 : (t > 0 ? d / t : INFINITY);
    if (ratio > c.worst || c.worst_index < 0) {
      c.worst = ratio;
      c.worst_index = static_cast<int64_t>(i);
    }
  }
  c.rel_l2 = ref2 > 0 ? std::sqrt(err2 / ref2) : (err2 > 0 ? INFINITY : 0.0);
  return c;
}

Comparison expect_close(const std::vector<float>& gpu, const std::vector<float>& cpu,
                        const std::vector<float>& absref, const std::vector<float>& base, Tolerance tol,
                        const std::string& what) {
  EXPECT_EQ(gpu.size(), cpu.size()) << what;
  if (gpu.size() != cpu.size()) return {};
  const Comparison c = compare(gpu, cpu, absref, base, tol);
  std::printf("[ linear   ] %s: max |err| %.3e, max |err|/absref %.3e (tol %.3e), rel_l2 %.3e (limit %.0e), "
              "non-finite %lld\n",
              what.c_str(), c.max_abs, c.max_rel, tol.per_term, c.rel_l2, tol.rel_l2,
              static_cast<long long>(c.nonfinite));
  EXPECT_EQ(c.nonfinite, 0) << what << ": elements left unwritten (NaN poison) or non-finite";
  EXPECT_LE(c.worst, 1.0) << what << ": worst element " << c.worst_index << " gpu "
                          << (c.worst_index >= 0 ? gpu[static_cast<size_t>(c.worst_index)] : 0.0f) << " cpu "
                          << (c.worst_index >= 0 ? cpu[static_cast<size_t>(c.worst_index)] : 0.0f);
  EXPECT_LT(c.rel_l2, tol.rel_l2) << what;
  return c;
}

// One problem's host data: x [M, K], w [N, K], dy [M, N], dw0 [N, K] (scales as in a model: weights ~0.05,
// gradients ~0.01).
struct Data {
  Shape s;
  std::vector<float> x, w, dy, dw0;
  Data(Shape shape, std::mt19937_64& rng)
      : s(shape), x(random_rows(s.M, s.K, 1.0f, rng)), w(random_rows(s.N, s.K, 0.05f, rng)),
        dy(random_rows(s.M, s.N, 0.01f, rng)), dw0(random_rows(s.N, s.K, 0.1f, rng)) {}
};

// Empty problems are not asked of the CPU: for an empty contraction (K = 0 forward, N = 0 Dgrad, M = 0 Wgrad)
// cpu::sgemm can hand OpenBLAS a leading dimension of 0, which it rejects (an error message, the output left as
// it was). The expected results are plain: an empty sum is 0, and dw stays dw0.
bool empty(Shape s) { return s.M == 0 || s.N == 0 || s.K == 0; }

std::vector<float> cpu_forward(Precision p, const std::vector<float>& x, const std::vector<float>& w, Shape s) {
  std::vector<float> y(static_cast<size_t>(s.M * s.N));
  if (!empty(s)) cpu::linear_forward(p, x.data(), w.data(), y.data(), s.M, s.N, s.K);
  return y;
}

std::vector<float> gpu_forward(cuda::LinearContext& ctx, Precision p, const DeviceBuffer<float>& x,
                               const DeviceBuffer<float>& w, Shape s, cudaStream_t stream = nullptr) {
  DeviceBuffer<float> y(static_cast<size_t>(s.M * s.N));
  y.poison();
  cuda::linear_forward(ctx, p, x.get(), w.get(), y.get(), s.M, s.N, s.K, stream);
  CUDA_CHECK(cudaDeviceSynchronize());
  return y.download();
}

void check_forward(cuda::LinearContext& ctx, Precision p, const Data& d) {
  const DeviceBuffer<float> x(d.x), w(d.w);
  const std::vector<float> gpu = gpu_forward(ctx, p, x, w, d.s);
  const std::vector<float> ref = cpu_forward(p, d.x, d.w, d.s);
  const std::vector<float> absref = cpu_forward(p, absolute(d.x), absolute(d.w), d.s);
  expect_close(gpu, ref, absref, {}, tolerance(p, d.s.K), describe(p, "forward", d.s));
}

// Backward with dx and/or dw requested; dw starts from dw0 on both sides. accumulate_dx: dx starts from dx0 (the
// CPU's dx added to it; the sum's one rounding is covered by adding |dx0| to the element's reference scale).
// overwrite_dw: dw starts NaN-filled on the GPU (never to be read) and from zeros on the CPU.
void check_backward(cuda::LinearContext& ctx, Precision p, const Data& d, bool want_dx, bool want_dw,
                    bool accumulate_dx = false, bool overwrite_dw = false) {
  const Shape s = d.s;
  const DeviceBuffer<float> x(d.x), w(d.w), dy(d.dy);
  const std::vector<float> dw0 = overwrite_dw ? std::vector<float>(d.dw0.size(), 0.0f) : d.dw0;
  DeviceBuffer<float> dx(static_cast<size_t>(s.M * s.K)), dw(dw0);
  if (overwrite_dw) dw.poison();
  std::vector<float> dx0;
  if (accumulate_dx) {
    std::mt19937_64 rng(static_cast<uint64_t>(s.M * 1000003 + s.K));
    dx0 = random_rows(s.M, s.K, 0.01f, rng);
    dx.upload(dx0);
  } else {
    dx.poison();
  }
  cuda::linear_backward(ctx, p, dy.get(), x.get(), w.get(), want_dx ? dx.get() : nullptr,
                        want_dw ? dw.get() : nullptr, s.M, s.N, s.K, nullptr, accumulate_dx, overwrite_dw);
  CUDA_CHECK(cudaDeviceSynchronize());

  // Empty problems (see cpu_forward): dx is 0 or empty, dw is dw0 or empty.
  std::vector<float> ref_dx(static_cast<size_t>(s.M * s.K)), ref_dw = dw0;
  std::vector<float> abs_dx(ref_dx.size()), abs_dw = absolute(dw0);
  if (!empty(s)) {
    cpu::linear_backward(p, d.dy.data(), d.x.data(), d.w.data(), want_dx ? ref_dx.data() : nullptr,
                         want_dw ? ref_dw.data() : nullptr, s.M, s.N, s.K);
    cpu::linear_backward(p, absolute(d.dy).data(), absolute(d.x).data(), absolute(d.w).data(),
                         want_dx ? abs_dx.data() : nullptr, want_dw ? abs_dw.data() : nullptr, s.M, s.N, s.K);
  }
  std::string which = want_dx && want_dw ? "" : (want_dx ? " (dw null)" : " (dx null)");
  if (overwrite_dw) which += " (dw overwritten)";
  if (accumulate_dx) {
    which += " (added to dx)";
    for (size_t i = 0; i < ref_dx.size(); ++i) ref_dx[i] += dx0[i], abs_dx[i] += std::fabs(dx0[i]);
  }
  if (want_dx)
    expect_close(dx.download(), ref_dx, abs_dx, dx0, tolerance(p, s.N), describe(p, "dgrad", s) + which);
  if (want_dw)
    expect_close(dw.download(), ref_dw, abs_dw, dw0, tolerance(p, s.M), describe(p, "wgrad", s) + which);
}

// The model's shape, shapes that need padding in every dimension (M % 4, N % 4, K % 16 != 0, sizes below 128),
// a partial K tile (136), no tokens, an empty contraction (K = 0: y = 0) and no outputs (N = 0: dx = 0).
const Shape kShapes[] = {{256, 1536, 1024}, {5, 12, 24}, {130, 40, 200}, {64, 256, 136},
                         {0, 12, 24},       {4, 8, 0},   {6, 0, 16}};

using LinearGpu = moe_gpu_test::GpuTest;

TEST_F(LinearGpu, ForwardMatchesTheCpuInEveryPrecision) {
  std::mt19937_64 rng = seeded("forward");
  cuda::LinearContext ctx;
  for (const Shape& s : kShapes) {
    const Data d(s, rng);
    for (Precision p : kPrecisions) check_forward(ctx, p, d);
  }
}

TEST_F(LinearGpu, BackwardMatchesTheCpuAndAccumulatesIntoDw) {
  std::mt19937_64 rng = seeded("backward");
  cuda::LinearContext ctx;
  for (const Shape& s : kShapes) {
    const Data d(s, rng);
    for (Precision p : kPrecisions) check_backward(ctx, p, d, true, true);
  }
}

TEST_F(LinearGpu, BackwardOverwritesDwWithoutReadingItWhenAsked) {
  // overwrite_dw (a gradient not yet written since zero_grad): dw's NaN-filled old contents are never read, in
  // every precision and shape, and with no tokens (M = 0) dw comes out zero.
  std::mt19937_64 rng = seeded("overwrite dw");
  cuda::LinearContext ctx;
  for (const Shape& s : kShapes) {
    const Data d(s, rng);
    for (Precision p : kPrecisions) {
      check_backward(ctx, p, d, true, true, false, true);
      check_backward(ctx, p, d, false, true, false, true);
    }
  }
}

TEST_F(LinearGpu, BackwardSkipsANullDxOrDw) {
  std::mt19937_64 rng = seeded("null outputs");
  cuda::LinearContext ctx;
  for (const Shape& s : {Shape{256, 1536, 1024}, Shape{130, 40, 200}}) {
    const Data d(s, rng);
    for (Precision p : kPrecisions) {
      check_backward(ctx, p, d, true, false);
      check_backward(ctx, p, d, false, true);
    }
  }
  // Neither output: nothing to do, even with no inputs at all.
  for (Precision p : kPrecisions)
    EXPECT_NO_THROW(cuda::linear_backward(ctx, p, nullptr, nullptr, nullptr, nullptr, nullptr, 4, 8, 16));
}

TEST_F(LinearGpu, BackwardAddsDgradToDxWhenAsked) {
  // The model's shape (FP8: dy quantized both ways in one pass), one padded in every dimension (FP8: a padded
  // product added through a temporary) and an empty contraction (N = 0: dx stays dx0).
  std::mt19937_64 rng = seeded("accumulate dx");
  cuda::LinearContext ctx;
  for (const Shape& s : {Shape{256, 1536, 1024}, Shape{130, 40, 200}, Shape{6, 0, 16}}) {
    const Data d(s, rng);
    for (Precision p : kPrecisions) {
      check_backward(ctx, p, d, true, true, true);
      check_backward(ctx, p, d, true, false, true);
    }
  }
}

TEST_F(LinearGpu, Bf16BackwardFromARoundedGradientWithARowStrideGivesTheBf16BackwardsResults) {
  // linear_backward_bf16_dy from dy's BF16 bits with row stride ld (N: packed; 2N: a cross-entropy's in-place rows,
  // the other columns garbage never read) against linear_backward(BF16) from dy: the same rounded operands, so the
  // same products; the GEMMs' FP32 sums may take another order with another stride (cuBLASLt picks its kernel by
  // layout), within the BF16 tolerance of the CPU comparison above.
  std::mt19937_64 rng = seeded("bf16 dy");
  cuda::LinearContext ctx;
  for (const Shape& s : {Shape{256, 1536, 1024}, Shape{130, 40, 200}}) {
    const Data d(s, rng);
    const DeviceBuffer<float> x(d.x), w(d.w), dy(d.dy);
    DeviceBuffer<float> want_dx(static_cast<size_t>(s.M * s.K)), want_dw(d.dw0);
    cuda::linear_backward(ctx, Precision::BF16, dy.get(), x.get(), w.get(), want_dx.get(), want_dw.get(), s.M, s.N,
                          s.K);
    std::vector<float> abs_dx(static_cast<size_t>(s.M * s.K)), abs_dw = absolute(d.dw0);  // Σ |terms| (see above)
    cpu::linear_backward(Precision::BF16, absolute(d.dy).data(), absolute(d.x).data(), absolute(d.w).data(),
                         abs_dx.data(), abs_dw.data(), s.M, s.N, s.K);
    for (const int64_t ld : {s.N, 2 * s.N}) {
      std::vector<uint16_t> dy16(static_cast<size_t>(s.M * ld), 0x7FC1);  // NaN bits in the unread columns
      for (int64_t r = 0; r < s.M; ++r)
        for (int64_t c = 0; c < s.N; ++c) dy16[r * ld + c] = bf16_from_float(d.dy[r * s.N + c]);
      const DeviceBuffer<uint16_t> d_dy16(dy16);
      DeviceBuffer<float> dx(static_cast<size_t>(s.M * s.K)), dw(d.dw0);
      dx.poison();
      cuda::linear_backward_bf16_dy(ctx, d_dy16.get(), ld, x.get(), w.get(), dx.get(), dw.get(), s.M, s.N, s.K);
      CUDA_CHECK(cudaDeviceSynchronize());
      const std::string what = describe(Precision::BF16, "bf16 dy", s) + ", ld " + std::to_string(ld);
      expect_close(dx.download(), want_dx.download(), abs_dx, {}, tolerance(Precision::BF16, s.N), what + " dgrad");
      expect_close(dw.download(), want_dw.download(), abs_dw, d.dw0, tolerance(Precision::BF16, s.M), what + " wgrad");
      if (ld == s.N) {  // the same GEMM on the same bits
        EXPECT_EQ(dx.download(), want_dx.download()) << what;
        EXPECT_EQ(dw.download(), want_dw.download()) << what;
      }
      // x given already rounded (a BF16 head's forward keeps it): the same bits, x itself never read.
      std::vector<uint16_t> x16(d.x.size());
      for (size_t i = 0; i < x16.size(); ++i) x16[i] = bf16_from_float(d.x[i]);
      const DeviceBuffer<uint16_t> d_x16(x16);
      DeviceBuffer<float> dx2(static_cast<size_t>(s.M * s.K)), dw2(d.dw0);
      dx2.poison();
      cuda::linear_backward_bf16_dy(ctx, d_dy16.get(), ld, nullptr, w.get(), dx2.get(), dw2.get(), s.M, s.N, s.K,
                                    nullptr, false, false, d_x16.get());
      EXPECT_EQ(dx2.download(), dx.download()) << what << ", x16 given";
      EXPECT_EQ(dw2.download(), dw.download()) << what << ", x16 given";
    }
  }
  EXPECT_THROW(cuda::linear_backward_bf16_dy(ctx, nullptr, 4, nullptr, nullptr, nullptr, nullptr, 4, 8, 16), Error);
}

TEST_F(LinearGpu, Bf16OutputForwardIsTheFp32OutputRoundedWithinOneBf16Unit) {
  // linear_forward_bf16_out (the BF16 head's logits) against linear_forward(BF16): the same rounded operands, the
  // FP32 sums rounded to BF16 in cuBLASLt's epilogue. Another kernel may sum in another order, so each value is the
  // FP32 output's nearest BF16 or its neighbour (within 2^-7 relative, one BF16 unit), and almost all exactly it.
  std::mt19937_64 rng = seeded("bf16 out");
  cuda::LinearContext ctx;
  for (const Shape& s : {Shape{256, 1536, 1024}, Shape{130, 40, 200}, Shape{3, 8, 0}}) {
    const Data d(s, rng);
    const DeviceBuffer<float> x(d.x), w(d.w);
    DeviceBuffer<float> y(static_cast<size_t>(s.M * s.N));
    DeviceBuffer<uint16_t> y16(static_cast<size_t>(s.M * s.N));
    y16.poison();
    cuda::linear_forward(ctx, Precision::BF16, x.get(), w.get(), y.get(), s.M, s.N, s.K);
    cuda::linear_forward_bf16_out(ctx, x.get(), w.get(), y16.get(), s.M, s.N, s.K);
    // x16_keep: the same logits, and x rounded to BF16 left there.
    DeviceBuffer<uint16_t> y16_kept(static_cast<size_t>(s.M * s.N));
    DeviceBuffer<uint16_t> x16(std::max<size_t>(1, static_cast<size_t>(s.M * s.K)));
    y16_kept.poison(), x16.poison();
    cuda::linear_forward_bf16_out(ctx, x.get(), w.get(), y16_kept.get(), s.M, s.N, s.K, nullptr, x16.get());
    CUDA_CHECK(cudaDeviceSynchronize());
    EXPECT_EQ(y16_kept.download(), y16.download()) << describe(Precision::BF16, "bf16 out, x16 kept", s);
    if (s.K > 0) {
      std::vector<uint16_t> want16(d.x.size());
      for (size_t i = 0; i < want16.size(); ++i) want16[i] = bf16_from_float(d.x[i]);
      EXPECT_EQ(x16.download(want16.size()), want16) << describe(Precision::BF16, "bf16 out, x16 kept", s);
    }
    const std::vector<float> want = y.download();
    const moe_gpu_test::Bf16Rounding cmp = moe_gpu_test::compare_bf16_rounding(y16.download(), want);
    const int64_t apart = cmp.apart, beyond = cmp.beyond;
    std::printf("[ linear   ] %s: %lld of %zu not the FP32 output rounded, %lld beyond one BF16 unit\n",
                describe(Precision::BF16, "bf16 out", s).c_str(), static_cast<long long>(apart), want.size(),
                static_cast<long long>(beyond));
    EXPECT_EQ(beyond, 0) << describe(Precision::BF16, "bf16 out", s);
    EXPECT_LE(apart * 100, static_cast<int64_t>(want.size())) << "more than 1% rounded apart";
  }
  EXPECT_THROW(cuda::linear_forward_bf16_out(ctx, nullptr, nullptr, nullptr, 4, 8, 16), Error);
}

TEST_F(LinearGpu, SharedInputProjectionsGiveTheBitsOfSeparateCalls) {
  // linear_forward_shared and linear_backward_shared (x rounded or quantized once for several weights) against
  // linear_forward and linear_backward called for each weight in turn (dx written by the first, added by the second
  // in its GEMM; the second dw overwritten), bit for bit in every precision: attention's shape (q_proj 1536 and
  // kv_a 288 wide from a 1024-wide x) and one padded in every dimension (FP8: the padded operands' paths).
  std::mt19937_64 rng = seeded("shared input");
  cuda::LinearContext ctx;
  struct Case {
    int64_t M, K, N1, N2;
  };
  auto same_bits = [](const DeviceBuffer<float>& a, const DeviceBuffer<float>& b) {
    const std::vector<float> x = a.download(), y = b.download();
    return x.size() == y.size() && std::memcmp(x.data(), y.data(), x.size() * sizeof(float)) == 0;
  };
  for (const Case& c : {Case{256, 1024, 1536, 288}, Case{130, 200, 40, 96}}) {
    const int64_t M = c.M, K = c.K, N1 = c.N1, N2 = c.N2;
    const DeviceBuffer<float> x(random_rows(M, K, 1.0f, rng)), w1(random_rows(N1, K, 0.05f, rng)),
        w2(random_rows(N2, K, 0.05f, rng)), dy1(random_rows(M, N1, 0.01f, rng)), dy2(random_rows(M, N2, 0.01f, rng));
    const std::vector<float> dw1_0 = random_rows(N1, K, 0.1f, rng), dw2_0 = random_rows(N2, K, 0.1f, rng);
    for (Precision p : kPrecisions) {
      const std::string what = std::string(precision_name(p)) + " M " + std::to_string(M) + " K " + std::to_string(K);
      DeviceBuffer<float> y1(M * N1), y2(M * N2), z1(M * N1), z2(M * N2);
      for (auto* b : {&y1, &y2, &z1, &z2}) b->poison();
      cuda::linear_forward(ctx, p, x.get(), w1.get(), y1.get(), M, N1, K);
      cuda::linear_forward(ctx, p, x.get(), w2.get(), y2.get(), M, N2, K);
      cuda::linear_forward_shared(ctx, p, x.get(), {{w1.get(), z1.get(), N1}, {w2.get(), z2.get(), N2}}, M, K);
      DeviceBuffer<float> dx_a(M * K), dx_b(M * K), dw1_a(dw1_0), dw1_b(dw1_0), dw2_a(dw2_0), dw2_b(dw2_0);
      dx_a.poison(), dx_b.poison();
      cuda::linear_backward(ctx, p, dy1.get(), x.get(), w1.get(), dx_a.get(), dw1_a.get(), M, N1, K);
      cuda::linear_backward(ctx, p, dy2.get(), x.get(), w2.get(), dx_a.get(), dw2_a.get(), M, N2, K, nullptr, true,
                            true);
      cuda::linear_backward_shared(ctx, p, x.get(),
                                   {{dy1.get(), w1.get(), dw1_b.get(), N1, false},
                                    {dy2.get(), w2.get(), dw2_b.get(), N2, true}},
                                   dx_b.get(), M, K);
      CUDA_CHECK(cudaDeviceSynchronize());
      EXPECT_TRUE(same_bits(y1, z1) && same_bits(y2, z2)) << what << ": forward";
      EXPECT_TRUE(same_bits(dx_a, dx_b)) << what << ": dx";
      EXPECT_TRUE(same_bits(dw1_a, dw1_b) && same_bits(dw2_a, dw2_b)) << what << ": dw";
    }
  }
  std::printf("[ linear ] shared-input forward and backward, 2 shapes x 3 precisions: the separate calls' bits\n");
}

TEST_F(LinearGpu, SavedInputCarriesTheWgradOperandFromForwardToBackwardWithTheSameBits) {
  // cuda::SavedInput: a forward given one quantizes x both ways in one pass (FP8, x fitting: M and K multiples of 128)
  // and keeps xᵀ's codes; a backward given it back for the same x takes them. Against the calls without it, bit for
  // bit in every precision (BF16, FP32 and the padded FP8 shape keep nothing), alone and shared, and a backward
  // given a SavedInput made for another x (quantizes x itself). Every backward releases what it was given.
  std::mt19937_64 rng = seeded("saved input");
  cuda::LinearContext ctx;
  auto same_bits = [](const DeviceBuffer<float>& a, const DeviceBuffer<float>& b) {
    const std::vector<float> x = a.download(), y = b.download();
    return x.size() == y.size() && std::memcmp(x.data(), y.data(), x.size() * sizeof(float)) == 0;
  };
  struct Case {
    int64_t M, K, N1, N2;
  };
  for (const Case& c : {Case{256, 1024, 1536, 288}, Case{130, 200, 40, 96}}) {
    const int64_t M = c.M, K = c.K, N1 = c.N1, N2 = c.N2;
    const DeviceBuffer<float> x(random_rows(M, K, 1.0f, rng)), other(random_rows(M, K, 1.0f, rng)),
        w1(random_rows(N1, K, 0.05f, rng)), w2(random_rows(N2, K, 0.05f, rng)), dy1(random_rows(M, N1, 0.01f, rng)),
        dy2(random_rows(M, N2, 0.01f, rng));
    const std::vector<float> dw1_0 = random_rows(N1, K, 0.1f, rng), dw2_0 = random_rows(N2, K, 0.1f, rng);
    for (Precision p : kPrecisions) {
      const bool kept = p == Precision::FP8 && M % 128 == 0 && K % 128 == 0;
      const std::string what = std::string(precision_name(p)) + " M " + std::to_string(M) + " K " + std::to_string(K);
      // Alone: forward, then backward.
      DeviceBuffer<float> y_a(M * N1), y_b(M * N1), dx_a(M * K), dx_b(M * K), dw_a(dw1_0), dw_b(dw1_0);
      for (auto* b : {&y_a, &y_b, &dx_a, &dx_b}) b->poison();
      cuda::SavedInput saved;
      cuda::linear_forward(ctx, p, x.get(), w1.get(), y_a.get(), M, N1, K);
      cuda::linear_forward(ctx, p, x.get(), w1.get(), y_b.get(), M, N1, K, nullptr, &saved);
      EXPECT_EQ(saved.empty(), !kept) << what;
      cuda::linear_backward(ctx, p, dy1.get(), x.get(), w1.get(), dx_a.get(), dw_a.get(), M, N1, K);
      cuda::linear_backward(ctx, p, dy1.get(), x.get(), w1.get(), dx_b.get(), dw_b.get(), M, N1, K, nullptr, false,
                            false, &saved);
      EXPECT_TRUE(saved.empty()) << what << ": the backward releases it";
      CUDA_CHECK(cudaDeviceSynchronize());
      EXPECT_TRUE(same_bits(y_a, y_b)) << what << ": forward";
      EXPECT_TRUE(same_bits(dx_a, dx_b) && same_bits(dw_a, dw_b)) << what << ": backward";
      // Made for another input: the backward quantizes x itself.
      DeviceBuffer<float> dx_c(M * K), dw_c(dw1_0), y_c(M * N1);
      cuda::linear_forward(ctx, p, other.get(), w1.get(), y_c.get(), M, N1, K, nullptr, &saved);
      cuda::linear_backward(ctx, p, dy1.get(), x.get(), w1.get(), dx_c.get(), dw_c.get(), M, N1, K, nullptr, false,
                            false, &saved);
      EXPECT_TRUE(saved.empty()) << what;
      CUDA_CHECK(cudaDeviceSynchronize());
      EXPECT_TRUE(same_bits(dx_a, dx_c) && same_bits(dw_a, dw_c)) << what << ": another x's SavedInput";
      // Shared by two projections.
      DeviceBuffer<float> z1(M * N1), z2(M * N2), u1(M * N1), u2(M * N2), dx_d(M * K), dx_e(M * K), dw1_d(dw1_0),
          dw1_e(dw1_0), dw2_d(dw2_0), dw2_e(dw2_0);
      for (auto* b : {&z1, &z2, &u1, &u2, &dx_d, &dx_e}) b->poison();
      cuda::linear_forward_shared(ctx, p, x.get(), {{w1.get(), z1.get(), N1}, {w2.get(), z2.get(), N2}}, M, K);
      cuda::linear_forward_shared(ctx, p, x.get(), {{w1.get(), u1.get(), N1}, {w2.get(), u2.get(), N2}}, M, K,
                                  nullptr, &saved);
      EXPECT_EQ(saved.empty(), !kept) << what << ", shared";
      const std::vector<cuda::LinearGradient> grads_d = {{dy2.get(), w2.get(), dw2_d.get(), N2, false},
                                                         {dy1.get(), w1.get(), dw1_d.get(), N1, false}};
      const std::vector<cuda::LinearGradient> grads_e = {{dy2.get(), w2.get(), dw2_e.get(), N2, false},
                                                         {dy1.get(), w1.get(), dw1_e.get(), N1, false}};
      cuda::linear_backward_shared(ctx, p, x.get(), grads_d, dx_d.get(), M, K);
      cuda::linear_backward_shared(ctx, p, x.get(), grads_e, dx_e.get(), M, K, nullptr, false, &saved);
      EXPECT_TRUE(saved.empty()) << what << ", shared";
      CUDA_CHECK(cudaDeviceSynchronize());
      EXPECT_TRUE(same_bits(z1, u1) && same_bits(z2, u2)) << what << ": shared forward";
      EXPECT_TRUE(same_bits(dx_d, dx_e) && same_bits(dw1_d, dw1_e) && same_bits(dw2_d, dw2_e))
          << what << ": shared backward";
    }
  }
}

TEST_F(LinearGpu, ProjectionsSideBySideInMemoryShareOnePreparedWeightInFp8) {
  // Two weights of one input lying one after the other (q_proj's 1536 rows, whole 128-row blocks, then kv_a's 288,
  // as ParamStore lays them out) with their gradients alike: FP8's linear_forward_shared and linear_backward_shared
  // prepare one copy of [w1; w2] (its 128x128 blocks each one weight's own), and the backward quantizes [dy1 | dy2]
  // both ways once for one Dgrad and one Wgrad GEMM. Against the separate calls (another context): the forward's
  // bits; dx (one K = 1824 GEMM against a K = 1536 one added to a K = 288 one: the same products, FP32 sums grouped
  // otherwise) and dw within 1e-6 relative, both gradients added to or both overwritten.
  std::mt19937_64 rng = seeded("stacked pair");
  const int64_t M = 256, K = 1024, N1 = 1536, N2 = 288;
  const DeviceBuffer<float> x(random_rows(M, K, 1.0f, rng)), dy1(random_rows(M, N1, 0.01f, rng)),
      dy2(random_rows(M, N2, 0.01f, rng));
  const DeviceBuffer<float> w(random_rows(N1 + N2, K, 0.05f, rng));  // [w1; w2]
  const std::vector<float> dw0 = random_rows(N1 + N2, K, 0.1f, rng);
  for (const bool overwrite : {false, true}) {
    cuda::LinearContext apart, paired;
    const float *w1 = w.get(), *w2 = w.get() + N1 * K;
    DeviceBuffer<float> y1(M * N1), y2(M * N2), z1(M * N1), z2(M * N2), dx_a(M * K), dx_b(M * K), dw_a(dw0),
        dw_b(dw0);
    for (auto* b : {&y1, &y2, &z1, &z2, &dx_a, &dx_b}) b->poison();
    if (overwrite) dw_a.poison(), dw_b.poison();
    cuda::linear_forward(apart, Precision::FP8, x.get(), w1, y1.get(), M, N1, K);
    cuda::linear_forward(apart, Precision::FP8, x.get(), w2, y2.get(), M, N2, K);
    cuda::linear_backward(apart, Precision::FP8, dy2.get(), x.get(), w2, dx_a.get(), dw_a.get() + N1 * K, M, N2, K,
                          nullptr, false, overwrite);
    cuda::linear_backward(apart, Precision::FP8, dy1.get(), x.get(), w1, dx_a.get(), dw_a.get(), M, N1, K, nullptr,
                          true, overwrite);
    // kv_a's gradient first, as the attention's backward lists them.
    cuda::linear_forward_shared(paired, Precision::FP8, x.get(), {{w1, z1.get(), N1}, {w2, z2.get(), N2}}, M, K);
    cuda::linear_backward_shared(paired, Precision::FP8, x.get(),
                                 {{dy2.get(), w2, dw_b.get() + N1 * K, N2, overwrite},
                                  {dy1.get(), w1, dw_b.get(), N1, overwrite}},
                                 dx_b.get(), M, K);
    CUDA_CHECK(cudaDeviceSynchronize());
    EXPECT_EQ(z1.download(), y1.download()) << "forward, w1";
    EXPECT_EQ(z2.download(), y2.download()) << "forward, w2";
    const double dx_err = moe_gpu_test::rel_l2(dx_b.download(), dx_a.download()),
                 dw_err = moe_gpu_test::rel_l2(dw_b.download(), dw_a.download());
    std::printf("[ linear   ] fp8 [w1; w2] side by side (%s): dx rel_l2 %.1e, dw rel_l2 %.1e against the separate "
                "calls (limit 1e-6)\n", overwrite ? "dw overwritten" : "dw added to", dx_err, dw_err);
    EXPECT_LT(dx_err, 1e-6);
    EXPECT_LT(dw_err, 1e-6);
    // One prepared copy, of both weights as one matrix (the separate calls' context holds two).
    const std::vector<cuda::Fp8WeightCopy> copies = paired.fp8_weight_copies();
    ASSERT_EQ(copies.size(), 1u);
    EXPECT_EQ(copies[0].w, w1);
    EXPECT_EQ(copies[0].out.rows, N1 + N2);
    EXPECT_EQ(apart.fp8_weight_copies().size(), 2u);
  }
}

TEST_F(LinearGpu, RunsOnANonDefaultStream) {
  std::mt19937_64 rng = seeded("stream");
  const Data d({130, 40, 200}, rng);
  const DeviceBuffer<float> x(d.x), w(d.w);
  CUDA_CHECK(cudaDeviceSynchronize());  // pageable uploads may still be in flight for another stream
  cudaStream_t stream = nullptr;
  CUDA_CHECK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
  cuda::LinearContext ctx;
  for (Precision p : kPrecisions) {
    std::vector<float> gpu;
    try {
      gpu = gpu_forward(ctx, p, x, w, d.s, stream);
    } catch (...) {
      cudaStreamDestroy(stream);
      throw;
    }
    const std::vector<float> ref = cpu_forward(p, d.x, d.w, d.s);
    const std::vector<float> absref = cpu_forward(p, absolute(d.x), absolute(d.w), d.s);
    expect_close(gpu, ref, absref, {}, tolerance(p, d.s.K), describe(p, "forward on a stream", d.s));
  }
  CUDA_CHECK(cudaStreamDestroy(stream));
}

// The FP8 copy of w and of wᵀ is what fp8::cpu::quantize_128x128 gives for w and for the explicit transpose,
// byte for byte, zero-padded; scales in cuBLASLt's layout (scales_to_cublaslt_host of the CPU's).
TEST_F(LinearGpu, PreparesTheCpuFp8CodesAndScalesOfTheWeightAndOfItsTranspose) {
  std::mt19937_64 rng = seeded("fp8 weights");
  cuda::LinearContext ctx;
  for (const auto& [N, K] : {std::pair<int64_t, int64_t>{1536, 1024}, {12, 24}, {40, 200}, {300, 136}, {2816, 1024}}) {
    const std::vector<float> w = random_rows(N, K, 0.05f, rng);
    std::vector<float> wt(w.size());
    for (int64_t n = 0; n < N; ++n)
      for (int64_t k = 0; k < K; ++k) wt[static_cast<size_t>(k * N + n)] = w[static_cast<size_t>(n * K + k)];
    std::vector<uint8_t> codes(w.size()), codes_t(w.size());
    std::vector<float> scales(static_cast<size_t>(fp8::tiles(N) * fp8::tiles(K))), scales_t(scales.size());
    fp8::cpu::quantize_128x128(w.data(), N, K, codes.data(), scales.data());
    fp8::cpu::quantize_128x128(wt.data(), K, N, codes_t.data(), scales_t.data());

    const DeviceBuffer<float> dw(w);
    const cuda::PreparedFp8Weight pw = cuda::prepared_fp8_weight(ctx, dw.get(), N, K);
    CUDA_CHECK(cudaDeviceSynchronize());
    const std::string what = "N=" + std::to_string(N) + " K=" + std::to_string(K);
    ASSERT_GE(pw.rows, N) << what;
    ASSERT_GE(pw.cols, K) << what;
    EXPECT_TRUE(pw.rows % 16 == 0 && pw.cols % 16 == 0) << what << ": padded to " << pw.rows << " x " << pw.cols;

    // codes [rows, cols] vs the CPU's [N, K] (zeros beyond), codes_t [cols, rows] vs the CPU's wᵀ [K, N].
    auto count_mismatches = [](const std::vector<uint8_t>& got, int64_t rows, int64_t cols,
                               const std::vector<uint8_t>& want, int64_t wrows, int64_t wcols) {
      int64_t bad = 0;
      for (int64_t r = 0; r < rows; ++r)
        for (int64_t c = 0; c < cols; ++c) {
          const uint8_t expect = r < wrows && c < wcols ? want[static_cast<size_t>(r * wcols + c)] : 0;
          bad += got[static_cast<size_t>(r * cols + c)] != expect;
        }
      return bad;
    };
    std::vector<uint8_t> got(static_cast<size_t>(pw.rows * pw.cols));
    CUDA_CHECK(cudaMemcpy(got.data(), pw.codes, got.size(), cudaMemcpyDeviceToHost));
    EXPECT_EQ(count_mismatches(got, pw.rows, pw.cols, codes, N, K), 0) << what << ": codes of w differ";
    CUDA_CHECK(cudaMemcpy(got.data(), pw.codes_t, got.size(), cudaMemcpyDeviceToHost));
    EXPECT_EQ(count_mismatches(got, pw.cols, pw.rows, codes_t, K, N), 0) << what << ": codes of wᵀ differ";

    auto expect_scales = [&](const float* device, int64_t rows, int64_t cols, const std::vector<float>& cpu_scales,
                             int64_t cpu_rows, int64_t cpu_cols, const char* name) {
      const auto count = static_cast<size_t>(fp8::cuda::cublaslt_scale_count(rows, cols, fp8::kTile));
      ASSERT_EQ(count, static_cast<size_t>(fp8::cuda::cublaslt_scale_count(cpu_rows, cpu_cols, fp8::kTile)))
          << what << ": padding changed the block grid of " << name;
      std::vector<float> want(count), have(count);
      fp8::cuda::scales_to_cublaslt_host(cpu_scales.data(), cpu_rows, cpu_cols, fp8::kTile, want.data());
      CUDA_CHECK(cudaMemcpy(have.data(), device, count * sizeof(float), cudaMemcpyDeviceToHost));
      EXPECT_EQ(0, std::memcmp(have.data(), want.data(), count * sizeof(float))) << what << ": scales of " << name;
    };
    expect_scales(pw.scales, pw.rows, pw.cols, scales, N, K, "w");
    expect_scales(pw.scales_t, pw.cols, pw.rows, scales_t, K, N, "wᵀ");
    std::printf("[ linear   ] fp8 weight %s: codes and scales of w and wᵀ compared byte for byte (padded %lld x "
                "%lld)\n",
                what.c_str(), static_cast<long long>(pw.rows), static_cast<long long>(pw.cols));
  }
}

TEST_F(LinearGpu, PreparesTheBf16WeightRoundedToNearestEven) {
  std::mt19937_64 rng = seeded("bf16 weights");
  cuda::LinearContext ctx;
  const int64_t N = 40, K = 200;
  const std::vector<float> w = random_rows(N, K, 0.05f, rng);
  const DeviceBuffer<float> dw(w);
  const uint16_t* copy = cuda::prepared_bf16_weight(ctx, dw.get(), N, K);
  CUDA_CHECK(cudaDeviceSynchronize());
  std::vector<uint16_t> got(w.size());
  CUDA_CHECK(cudaMemcpy(got.data(), copy, got.size() * sizeof(uint16_t), cudaMemcpyDeviceToHost));
  int64_t bad = 0;
  for (size_t i = 0; i < w.size(); ++i) bad += got[i] != bf16_from_float(w[i]);
  EXPECT_EQ(bad, 0) << "BF16 bits differ from moerl::bf16_from_float";
  EXPECT_EQ(ctx.prepared_bytes(), w.size() * sizeof(uint16_t));
}

// The documented contract: bf16 and fp8 calls keep using the copy made at the first call of a generation, even
// when the weight's values change; weights_changed() makes the next call see the new values, in the same
// buffers. fp32 keeps no copy and always reads w.
TEST_F(LinearGpu, UsesThePreparedCopyUntilWeightsChangedThenTheNewWeightsInTheSameBuffers) {
  std::mt19937_64 rng = seeded("weights_changed");
  const Shape s{64, 256, 384};
  const Data d(s, rng);
  const std::vector<float> w2 = random_rows(s.N, s.K, 0.05f, rng);
  for (Precision p : kPrecisions) {
    cuda::LinearContext ctx;
    const DeviceBuffer<float> x(d.x), dy(d.dy);
    DeviceBuffer<float> w(d.w);
    auto check = [&](const std::vector<float>& gpu, const std::vector<float>& weight, const std::string& what) {
      const std::vector<float> ref = cpu_forward(p, d.x, weight, s);
      const std::vector<float> absref = cpu_forward(p, absolute(d.x), absolute(weight), s);
      return expect_close(gpu, ref, absref, {}, tolerance(p, s.K), describe(p, "forward", s) + ", " + what);
    };
    check(gpu_forward(ctx, p, x, w, s), d.w, "first weights");
    const size_t bytes = ctx.prepared_bytes();
    EXPECT_EQ(bytes == 0, p == Precision::FP32) << "only bf16 and fp8 keep a prepared copy";

    w.upload(w2);  // same address, new values, no weights_changed()
    const std::vector<float> stale = gpu_forward(ctx, p, x, w, s);
    if (p == Precision::FP32) {
      check(stale, w2, "new weights (fp32 keeps no copy)");
    } else {
      check(stale, d.w, "new weights without weights_changed(): the prepared copy of the first");
      const std::vector<float> ref2 = cpu_forward(p, d.x, w2, s);
      EXPECT_GT(compare(stale, ref2, absolute(ref2), {}, tolerance(p, s.K)).rel_l2, 0.5)
          << "the stale result must not be the new weights' result";
    }

    ctx.weights_changed();
    check(gpu_forward(ctx, p, x, w, s), w2, "after weights_changed()");
    EXPECT_EQ(ctx.prepared_bytes(), bytes) << "a new generation reuses the buffers";
    // Dgrad of the same generation sees the new weights too (fp8: the transposed copy was refreshed with w's).
    DeviceBuffer<float> dx(static_cast<size_t>(s.M * s.K));
    dx.poison();
    cuda::linear_backward(ctx, p, dy.get(), x.get(), w.get(), dx.get(), nullptr, s.M, s.N, s.K);
    CUDA_CHECK(cudaDeviceSynchronize());
    std::vector<float> ref_dx(dx.download().size()), abs_dx(ref_dx.size());
    cpu::linear_backward(p, d.dy.data(), d.x.data(), w2.data(), ref_dx.data(), nullptr, s.M, s.N, s.K);
    cpu::linear_backward(p, absolute(d.dy).data(), absolute(d.x).data(), absolute(w2).data(), abs_dx.data(), nullptr,
                         s.M, s.N, s.K);
    expect_close(dx.download(), ref_dx, abs_dx, {}, tolerance(p, s.N),
                 describe(p, "dgrad", s) + ", after weights_changed()");
    EXPECT_EQ(ctx.prepared_bytes(), bytes);
    ctx.forget_weights();
    EXPECT_EQ(ctx.prepared_bytes(), 0u);
  }
}

TEST_F(LinearGpu, RejectsNegativeSizesMissingPointersAndUnknownPrecisions) {
  cuda::LinearContext ctx;
  DeviceBuffer<float> a(64), b(64), c(64), e(64);
  float *x = a.get(), *w = b.get(), *y = c.get(), *dw = e.get();
  EXPECT_THROW(cuda::linear_forward(ctx, Precision::FP32, x, w, y, -1, 4, 4), Error);
  EXPECT_THROW(cuda::linear_forward(ctx, Precision::BF16, nullptr, w, y, 4, 4, 4), Error);
  EXPECT_THROW(cuda::linear_forward(ctx, Precision::FP8, x, nullptr, y, 4, 4, 4), Error);
  EXPECT_THROW(cuda::linear_forward(ctx, Precision::FP8, x, w, nullptr, 4, 4, 4), Error);
  EXPECT_THROW(cuda::linear_forward(ctx, static_cast<Precision>(7), x, w, y, 4, 4, 4), Error);
  EXPECT_THROW(cuda::linear_backward(ctx, Precision::FP8, nullptr, x, w, y, dw, 4, 4, 4), Error);     // dy
  EXPECT_THROW(cuda::linear_backward(ctx, Precision::FP32, x, nullptr, w, nullptr, dw, 4, 4, 4), Error);  // x for dw
  EXPECT_THROW(cuda::linear_backward(ctx, Precision::BF16, x, w, nullptr, y, nullptr, 4, 4, 4), Error);   // w for dx
  EXPECT_THROW(cuda::linear_backward(ctx, Precision::FP32, x, x, w, y, dw, 4, -4, 4), Error);
  EXPECT_NO_THROW(cuda::linear_forward(ctx, Precision::FP8, nullptr, nullptr, nullptr, 0, 4, 4));  // M = 0
  CUDA_CHECK(cudaDeviceSynchronize());
}

// Training sizes (hidden 1024, FFN 2816; 16384 tokens), the whole op including conversion / quantization of the
// activations; weights prepared once (the preparation after weights_changed() is timed on its own). Information,
// not assertions.
TEST_F(LinearGpu, PrintsTimingsAtTrainingSizes) {
  std::mt19937_64 rng = seeded("timing");
  for (const Shape& s : {Shape{16384, 2816, 1024}, Shape{16384, 1024, 1408}}) {
    auto fill = [&](int64_t n, float scale) {
      std::uniform_real_distribution<float> u(-scale, scale);
      std::vector<float> v(static_cast<size_t>(n));
      for (float& f : v) f = u(rng);
      return v;
    };
    const DeviceBuffer<float> x(fill(s.M * s.K, 1.0f)), w(fill(s.N * s.K, 0.05f)), dy(fill(s.M * s.N, 0.01f));
    DeviceBuffer<float> y(static_cast<size_t>(s.M * s.N)), dx(static_cast<size_t>(s.M * s.K)),
        dw(fill(s.N * s.K, 0.1f));
    const double tflop = 2.0 * static_cast<double>(s.M) * s.N * s.K / 1e12;
    for (Precision p : kPrecisions) {
      cuda::LinearContext ctx;
      const double fwd = median_ms([&] { cuda::linear_forward(ctx, p, x.get(), w.get(), y.get(), s.M, s.N, s.K); });
      const double dgrad = median_ms([&] {
        cuda::linear_backward(ctx, p, dy.get(), x.get(), w.get(), dx.get(), nullptr, s.M, s.N, s.K);
      });
      const double wgrad = median_ms([&] {
        cuda::linear_backward(ctx, p, dy.get(), x.get(), w.get(), nullptr, dw.get(), s.M, s.N, s.K);
      });
      const double prep_fwd = median_ms([&] {
        ctx.weights_changed();
        cuda::linear_forward(ctx, p, x.get(), w.get(), y.get(), s.M, s.N, s.K);
      });
      std::printf("[ linear   ] %s M=%lld N=%lld K=%lld: forward %.3f ms (%.0f TFLOP/s), dgrad %.3f ms (%.0f), "
                  "wgrad %.3f ms (%.0f), weight preparation %.3f ms\n",
                  std::string(precision_name(p)).c_str(), static_cast<long long>(s.M), static_cast<long long>(s.N),
                  static_cast<long long>(s.K), fwd, tflop / (fwd * 1e-3), dgrad, tflop / (dgrad * 1e-3), wgrad,
                  tflop / (wgrad * 1e-3), std::max(prep_fwd - fwd, 0.0));
    }
    const std::vector<float> out = y.download();
    EXPECT_TRUE(std::all_of(out.begin(), out.end(), [](float v) { return std::isfinite(v); }));
  }
}

}  // namespace
}  // namespace moerl
