// GPU tests of the causal attention core (kernels/cuda/attention.cu) against the CPU reference
// (kernels/cpu/attention.cpp): O and lse of the forward, dQ, dK, dV of the backward (run on the GPU forward's
// own O and lse, as in training), on random q, k, v, dO drawn with a fresh seed each run (printed;
// MOERL_TEST_SEED=<n> repeats a run), outputs poisoned with NaN before every call. Also causality and run-to-run
// bit-exactness, refusal of bad arguments, and a timing line. Needs a GPU: skipped without one.
//
// Tolerance. Every element must satisfy |gpu − ref| <= tol · (|ref| + rms(ref)): relative for large
// elements, relative to the tensor's typical size for elements near 0 (an output row can average to ~0, and
// dQ of a sequence's first token is 0 up to rounding). Both sides compute in FP32 with different orders: the
// CPU sums with OpenBLAS sgemm and softmax row sums in double, the GPU with sequential FMA chains per
// 64-wide tile, an online softmax (rescaled per key tile) and exp2f (2 ulp). The differences are a few
// hundred FP32 roundoffs (u = 6e-8) at most, largest where scores are large (exp turns an absolute score
// error into a relative one) and sums long. A CPU emulation of these kernels (the same operations in the same
// order, host exp2f, one host thread per CUDA thread) on these shapes and inputs gave at most 1.0e-5 for O,
// dQ, dK, dV and 3.3e-7 for lse over 6 seeds; the tolerances are 5e-5 and 2e-6. A wrong mask, a missed tile
// or a stale shared tile gives errors of order 1.
#include <cuda_runtime_api.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include "kernels/attention.hpp"
#include "kernels/cuda/attention.hpp"
#include "kernels/cuda/cuda_check.hpp"
#include "runtime/error.hpp"
#include "tests/gpu/gpu_test_support.hpp"

namespace moerl {
namespace {

constexpr double kTolerance = 5e-5;     // O, dQ, dK, dV (header comment)
constexpr double kLseTolerance = 2e-6;  // lse (header comment): a log, compared against |lse| + rms of a few units


using gpu_test::run_seed;
using DeviceFloats = gpu_test::DeviceBuffer<float>;

struct Shape {
  int64_t batch, seq, heads, dqk, dv;
  float scale;
  float q_magnitude;  // q ~ N(0, q_magnitude²): larger scores, a peakier softmax
  int64_t tokens() const { return batch * seq; }
  std::string name() const {
    std::ostringstream s;
    s << "b" << batch << " s" << seq << " h" << heads << " dqk" << dqk << " dv" << dv << " scale " << scale;
    return s.str();
  }
};

struct Inputs {
  std::vector<float> q, k, v, dout;
};

Inputs random_inputs(const Shape& sh, std::mt19937_64& rng) {
  std::normal_distribution<float> normal(0.0f, 1.0f);
  const auto draw = [&](int64_t n, float magnitude) {
    std::vector<float> x(static_cast<size_t>(n));
    for (float& y : x) y = normal(rng) * magnitude;
    return x;
  };
  const int64_t nq = sh.tokens() * sh.heads * sh.dqk, nv = sh.tokens() * sh.heads * sh.dv;
  return {draw(nq, sh.q_magnitude), draw(nq, 1.0f), draw(nv, 1.0f), draw(nv, 1.0f)};
}

struct Results {
  std::vector<float> out, lse, dq, dk, dv;
};

Results run_cpu(const Shape& sh, const Inputs& in) {
  const int64_t nq = sh.tokens() * sh.heads * sh.dqk, nv = sh.tokens() * sh.heads * sh.dv;
  Results r{std::vector<float>(nv), std::vector<float>(sh.batch * sh.heads * sh.seq), std::vector<float>(nq),
            std::vector<float>(nq), std::vector<float>(nv)};
  cpu::attention_forward(in.q.data(), in.k.data(), in.v.data(), r.out.data(), r.lse.data(), sh.batch, sh.seq,
                         sh.heads, sh.dqk, sh.dv, sh.scale);
  cpu::attention_backward(in.dout.data(), in.q.data(), in.k.data(), in.v.data(), r.out.data(), r.lse.data(),
                          r.dq.data(), r.dk.data(), r.dv.data(), sh.batch, sh.seq, sh.heads, sh.dqk, sh.dv, sh.scale);
  return r;
}

// Device copies of the inputs and outputs of one shape.
struct GpuAttention {
  GpuAttention(const Shape& shape, const Inputs& in)
      : sh(shape), q(in.q), k(in.k), v(in.v), dout(in.dout), out(in.dout.size()),
        lse(static_cast<size_t>(sh.batch * sh.heads * sh.seq)), dq(in.q.size()), dk(in.q.size()), dv(in.v.size()) {}

  // `poison`: fill the outputs with NaN first (off when timing).
  void forward(bool poison = true) {
    if (poison) out.poison(), lse.poison();
    cuda::attention_forward(q.get(), k.get(), v.get(), out.get(), lse.get(), sh.batch, sh.seq, sh.heads, sh.dqk,
                            sh.dv, sh.scale);
  }
  void backward(bool poison = true) {
    if (poison) dq.poison(), dk.poison(), dv.poison();
    cuda::attention_backward(dout.get(), q.get(), k.get(), v.get(), out.get(), lse.get(), dq.get(), dk.get(),
                             dv.get(), sh.batch, sh.seq, sh.heads, sh.dqk, sh.dv, sh.scale);
  }
  Results results() const {
    CUDA_CHECK(cudaDeviceSynchronize());
    return {out.download(), lse.download(), dq.download(), dk.download(), dv.download()};
  }

  Shape sh;
  DeviceFloats q, k, v, dout, out, lse, dq, dk, dv;
};

// Prints max |gpu − ref|, max |gpu − ref| / (|ref| + rms(ref)) and the tolerance; expects the latter within it.
// A non-finite GPU value (an unwritten, still poisoned element) fails.
void expect_close(const char* what, const Shape& sh, const std::vector<float>& gpu, const std::vector<float>& ref,
                  double tolerance) {
  ASSERT_EQ(gpu.size(), ref.size());
  double sum_sq = 0;
  for (float r : ref) sum_sq += static_cast<double>(r) * r;
  const double rms = std::sqrt(sum_sq / std::max<size_t>(ref.size(), 1));
  double max_abs = 0, max_rel = 0;
  size_t worst = 0, non_finite = 0;
  for (size_t i = 0; i < ref.size(); ++i) {
    if (!std::isfinite(gpu[i])) {
      if (non_finite++ == 0) worst = i;
      continue;
    }
    const double err = std::fabs(static_cast<double>(gpu[i]) - ref[i]);
    const double rel = err / (std::fabs(static_cast<double>(ref[i])) + rms);
    max_abs = std::max(max_abs, err);
    if (rel > max_rel && non_finite == 0) worst = i;
    max_rel = std::max(max_rel, rel);
  }
  std::printf("attention %-4s %-42s max abs err %.3e, max rel err %.3e (|err| / (|ref| + rms %.3g)), tolerance %.0e\n",
              what, sh.name().c_str(), max_abs, max_rel, rms, tolerance);
  EXPECT_EQ(non_finite, 0u) << what << " " << sh.name() << ": non-finite GPU values, first at flat index " << worst;
  EXPECT_LE(max_rel, tolerance) << what << " " << sh.name() << ": worst at flat index " << worst << ": GPU "
                                << gpu[worst] << ", CPU " << ref[worst] << "; seed " << run_seed();
}

bool same_bits(const float* a, const float* b, size_t n) { return std::memcmp(a, b, n * sizeof(float)) == 0; }

class AttentionGpu : public gpu_test::GpuTest {};

TEST_F(AttentionGpu, ForwardAndBackwardMatchTheCpuReference) {
  std::mt19937_64 rng(run_seed());
  const auto inv_sqrt = [](int64_t d) { return 1.0f / std::sqrt(static_cast<float>(d)); };
  // seq not a multiple of the 64-row tile, several sequences per batch, dqk != dv, every supported dqk and dv,
  // larger scales / q magnitudes for a peaky softmax, a sequence spanning 16 tiles.
  const Shape shapes[] = {
      {3, 2, 1, 24, 16, 0.2f, 1.0f},          {2, 100, 3, 24, 16, inv_sqrt(24), 1.0f},
      {3, 130, 2, 96, 64, inv_sqrt(96), 1.0f}, {1, 64, 4, 96, 64, inv_sqrt(96), 3.0f},
      {2, 200, 2, 192, 128, inv_sqrt(192), 1.0f}, {1, 129, 2, 192, 16, 0.3f, 1.0f},
      {2, 65, 2, 24, 128, 0.5f, 2.0f},         {4, 300, 2, 96, 128, inv_sqrt(96), 1.0f},
      {1, 1000, 2, 192, 64, inv_sqrt(192), 1.0f},
  };
  for (const Shape& sh : shapes) {
    SCOPED_TRACE(sh.name() + ", seed " + std::to_string(run_seed()));
    const Inputs in = random_inputs(sh, rng);
    const Results ref = run_cpu(sh, in);
    GpuAttention gpu(sh, in);
    gpu.forward();
    gpu.backward();
    const Results got = gpu.results();
    expect_close("O", sh, got.out, ref.out, kTolerance);
    expect_close("lse", sh, got.lse, ref.lse, kLseTolerance);
    expect_close("dQ", sh, got.dq, ref.dq, kTolerance);
    expect_close("dK", sh, got.dk, ref.dk, kTolerance);
    expect_close("dV", sh, got.dv, ref.dv, kTolerance);
  }
}

TEST_F(AttentionGpu, EarlierTokensDoNotSeeALaterKey) {
  // Key and value of token p of sequence 0 change (every head): O, lse and dQ of tokens < p of sequence 0 and
  // of all of sequence 1 must keep their bits; token p's output must change.
  const Shape sh{2, 150, 2, 96, 64, 1.0f / std::sqrt(96.0f), 1.0f};
  const int64_t p = 77;  // in the second 64-row tile, the first tile's rows unaffected too
  std::mt19937_64 rng(run_seed() + 1);
  Inputs in = random_inputs(sh, rng);
  GpuAttention before(sh, in);
  before.forward();
  before.backward();
  const Results a = before.results();
  for (int64_t h = 0; h < sh.heads; ++h) {
    for (int64_t d = 0; d < sh.dqk; ++d) in.k[(p * sh.heads + h) * sh.dqk + d] += 0.5f;
    for (int64_t d = 0; d < sh.dv; ++d) in.v[(p * sh.heads + h) * sh.dv + d] -= 0.5f;
  }
  GpuAttention after(sh, in);
  after.forward();
  after.backward();
  const Results b = after.results();

  const int64_t vrow = sh.heads * sh.dv, qrow = sh.heads * sh.dqk;
  EXPECT_TRUE(same_bits(a.out.data(), b.out.data(), p * vrow)) << "O of tokens before " << p;
  EXPECT_TRUE(same_bits(a.dq.data(), b.dq.data(), p * qrow)) << "dQ of tokens before " << p;
  const int64_t seq1 = sh.seq;  // first token of sequence 1
  EXPECT_TRUE(same_bits(a.out.data() + seq1 * vrow, b.out.data() + seq1 * vrow, sh.seq * vrow)) << "O of sequence 1";
  EXPECT_TRUE(same_bits(a.dq.data() + seq1 * qrow, b.dq.data() + seq1 * qrow, sh.seq * qrow)) << "dQ of sequence 1";
  for (int64_t h = 0; h < sh.heads; ++h) {
    const int64_t l0 = h * sh.seq;  // lse [batch, heads, seq], sequence 0
    EXPECT_TRUE(same_bits(a.lse.data() + l0, b.lse.data() + l0, p)) << "lse of tokens before " << p << ", head " << h;
    const int64_t l1 = (sh.heads + h) * sh.seq;
    EXPECT_TRUE(same_bits(a.lse.data() + l1, b.lse.data() + l1, sh.seq)) << "lse of sequence 1, head " << h;
  }
  EXPECT_FALSE(same_bits(a.out.data() + p * vrow, b.out.data() + p * vrow, vrow)) << "token " << p << " sees its key";
}

TEST_F(AttentionGpu, RepeatsBitForBit) {
  // No atomics, fixed summation orders: a second run gives the same bits.
  const Shape sh{2, 300, 3, 192, 128, 1.0f / std::sqrt(192.0f), 1.0f};
  std::mt19937_64 rng(run_seed() + 2);
  const Inputs in = random_inputs(sh, rng);
  GpuAttention gpu(sh, in);
  gpu.forward();
  gpu.backward();
  const Results a = gpu.results();
  gpu.forward();
  gpu.backward();
  const Results b = gpu.results();
  EXPECT_TRUE(same_bits(a.out.data(), b.out.data(), a.out.size()));
  EXPECT_TRUE(same_bits(a.lse.data(), b.lse.data(), a.lse.size()));
  EXPECT_TRUE(same_bits(a.dq.data(), b.dq.data(), a.dq.size()));
  EXPECT_TRUE(same_bits(a.dk.data(), b.dk.data(), a.dk.size()));
  EXPECT_TRUE(same_bits(a.dv.data(), b.dv.data(), a.dv.size()));
}

TEST_F(AttentionGpu, RefusesUnsupportedHeadDimsAndBadPointers) {
  DeviceFloats buf(1 << 16);
  float* p = buf.get();
  try {
    cuda::attention_forward(p, p, p, p, p, 1, 8, 1, 64, 64, 0.125f);
    ADD_FAILURE() << "dqk 64 accepted";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("dqk 64"), std::string::npos) << e.what();
  }
  EXPECT_THROW(cuda::attention_backward(p, p, p, p, p, p, p, p, p, 1, 8, 1, 96, 32, 0.1f), Error);
  EXPECT_THROW(cuda::attention_forward(p + 1, p, p, p, p, 1, 8, 1, 96, 64, 0.1f), Error);  // misaligned q
  EXPECT_THROW(cuda::attention_forward(nullptr, p, p, p, p, 1, 8, 1, 96, 64, 0.1f), Error);
  EXPECT_THROW(cuda::attention_forward(p, p, p, p, p, -1, 8, 1, 96, 64, 0.1f), Error);
  EXPECT_NO_THROW(cuda::attention_forward(nullptr, nullptr, nullptr, nullptr, nullptr, 0, 8, 1, 96, 64, 0.1f));
  CUDA_CHECK(cudaDeviceSynchronize());
}

using gpu_test::median_ms;

TEST_F(AttentionGpu, ReportsThroughput) {
  // Causal FLOPs: pairs = B·H·s(s+1)/2 (query, key) pairs; forward 2·pairs·(dqk + dv) (Q·Kᵀ, P·V); backward
  // 2·pairs·(3·dqk + 2·dv) (Q·Kᵀ again, dO·Vᵀ, Pᵀ·dO, dS·K, dSᵀ·Q; the dQ pass's second Q·Kᵀ and dO·Vᵀ not
  // counted).
  const Shape sh{8, 2048, 16, 96, 64, 1.0f / std::sqrt(96.0f), 1.0f};
  uint64_t state = run_seed() | 1;
  const auto draw = [&](int64_t n) {  // uniform in [-1, 1): xorshift, fast enough for 25M values
    std::vector<float> x(static_cast<size_t>(n));
    for (float& y : x) {
      state ^= state << 13, state ^= state >> 7, state ^= state << 17;
      y = static_cast<float>(static_cast<int64_t>(state >> 40) - (int64_t{1} << 23)) * 0x1p-23f;
    }
    return x;
  };
  const int64_t nq = sh.tokens() * sh.heads * sh.dqk, nv = sh.tokens() * sh.heads * sh.dv;
  GpuAttention gpu(sh, Inputs{draw(nq), draw(nq), draw(nv), draw(nv)});
  const double pairs = static_cast<double>(sh.batch) * sh.heads * sh.seq * (sh.seq + 1) / 2;
  const double fwd_ms = median_ms([&] { gpu.forward(false); });
  const double bwd_ms = median_ms([&] { gpu.backward(false); });
  const double fwd_flops = 2 * pairs * static_cast<double>(sh.dqk + sh.dv);
  const double bwd_flops = 2 * pairs * static_cast<double>(3 * sh.dqk + 2 * sh.dv);
  char line[256];
  std::snprintf(line, sizeof line, "attention forward  %s: %.3f ms, %.1f TFLOP/s (causal)", sh.name().c_str(), fwd_ms,
                fwd_flops / fwd_ms / 1e9);
  std::printf("%s\n", line);
  RecordProperty("forward", line);
  std::snprintf(line, sizeof line, "attention backward %s: %.3f ms, %.1f TFLOP/s (causal)", sh.name().c_str(), bwd_ms,
                bwd_flops / bwd_ms / 1e9);
  std::printf("%s\n", line);
  RecordProperty("backward", line);
  const Results r = gpu.results();
  EXPECT_TRUE(std::all_of(r.dq.begin(), r.dq.end(), [](float x) { return std::isfinite(x); }));
}

}  // namespace
}  // namespace moerl
