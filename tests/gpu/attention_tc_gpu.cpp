// GPU tests of the tensor-core attention core (kernels/cuda/attention_tc.cu: attention_forward_bf16 /
// attention_backward_bf16) against the CPU reference (kernels/cpu/attention.cpp) run on the same inputs rounded
// to BF16 (as the kernel reads them): O and lse of the forward, dQ, dK, dV of the backward (on the GPU forward's
// own O and lse, as in training). Random q, k, v, dO with a fresh seed each run (printed; MOERL_TEST_SEED=<n> repeats
// it), outputs poisoned with NaN before every call; causal; sequence lengths not multiples of the 64-row tile;
// every block shape of the kernels (4 and 8 warps: MOERL_ATTN_TC_FWD_WARPS / MOERL_ATTN_TC_BWD_WARPS; forward warps of
// 16 and 32 query rows: MOERL_ATTN_TC_FWD_WARP_ROWS), dQ recomputed or from stored dS (MOERL_ATTN_TC_BWD_DQ), and
// the WGMMA forward and backward (MOERL_ATTN_TC_FWD_KERNEL / _FWD_WG, MOERL_ATTN_TC_BWD_KERNEL,
// MOERL_ATTN_TC_BWD_DQ_KERNEL; 96/64 only, with the same tolerances: they round the same values to BF16 and only sum
// in another order). The packed entry points (operands kept from the forward for the backward,
// MLA's k and v packed straight from kv and ckv) and both block orders must give the plain entry points' bits.
//
// Tolerance: relative L2 error ||gpu − ref|| / ||ref|| per tensor. With the inputs rounded alike, what remains is
// the kernel's rounding of P (forward, dV) and dS (dQ, dK) to BF16 before their products: a relative error per
// element uniform in ±2^-9, rms 2^-9/√3 = 1.1e-3, independent between elements, so an output Σ_j x_j·y_j gets an
// error of rms 1.1e-3·sqrt(Σ_j x_j² y_j²), which for these random inputs is 1.1e-3 of the output's own size;
// FP32 accumulation-order differences are ~1e-6. dQ and dK come out larger: a row of dS sums to 0, so
// dQ_i = Σ_j dS_ij K_j cancels and is smaller than sqrt(Σ_j dS_ij² |K_j|²), which sets the size of its error.
// Measured on the H200 (one seed, these shapes): O 0.6–1.1e-3, dV 1.5–1.8e-3, dQ and dK 2.0–3.1e-3 (the peaky
// softmax the largest). Tolerance 8e-3. lse comes from FP32 scores of the same BF16 inputs (sums in a different
// order, exp2f): 1e-5 (measured 1.2e-7). (Very short sequences are left out: dQ and dK of 1 token are 0
// exactly and of 2 tokens nearly cancel (dS_10 = −dS_11), so a relative measure of them is rounding noise; seen
// on the H200: 1.7e-2 at 2 tokens.)
// A wrong mask, a missed tile, a stale shared tile or a wrong fragment layout gives errors of order 1. The error
// against the FP32 reference on unrounded inputs is printed for information (what BF16 costs in total).
#include <cuda_bf16.h>
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

#include <stdlib.h>  // setenv, unsetenv

#include "kernels/attention.hpp"
#include "kernels/cuda/attention.hpp"
#include "kernels/cuda/cuda_check.hpp"
#include "kernels/cuda/rope.hpp"
#include "runtime/error.hpp"
#include "runtime/gpu/gpu_common.hpp"
#include "tests/gpu/gpu_test_support.hpp"

namespace moerl {
namespace {

constexpr double kTolerance = 8e-3;     // O, dQ, dK, dV (header comment)
constexpr double kLseTolerance = 1e-5;  // lse (header comment)

// Sets the warps per block of the forward and backward kernels and the forward's query rows per warp for its
// lifetime; the previous values come back.
class WarpsEnv {
 public:
  WarpsEnv(int forward, int backward, int forward_rows = 16) {
    set("MOERL_ATTN_TC_FWD_WARPS", forward, 0);
    set("MOERL_ATTN_TC_BWD_WARPS", backward, 1);
    set("MOERL_ATTN_TC_FWD_WARP_ROWS", forward_rows, 2);
  }
  ~WarpsEnv() {
    for (int i = 0; i < 3; ++i) {
      if (had_[i]) setenv(names_[i], old_[i].c_str(), 1);
      else unsetenv(names_[i]);
    }
  }
  WarpsEnv(const WarpsEnv&) = delete;
  WarpsEnv& operator=(const WarpsEnv&) = delete;

 private:
  void set(const char* name, int warps, int i) {
    names_[i] = name;
    const char* e = std::getenv(name);
    had_[i] = e != nullptr;
    if (e) old_[i] = e;
    setenv(name, std::to_string(warps).c_str(), 1);
  }
  const char* names_[3] = {};
  bool had_[3] = {};
  std::string old_[3];
};

// Sets one environment variable for its lifetime (MOERL_ATTN_TC_ORDER); the previous value comes back.
class EnvVar {
 public:
  EnvVar(const char* name, const char* value) : name_(name) {
    const char* e = std::getenv(name);
    had_ = e != nullptr;
    if (e) old_ = e;
    setenv(name, value, 1);
  }
  ~EnvVar() {
    if (had_) setenv(name_, old_.c_str(), 1);
    else unsetenv(name_);
  }
  EnvVar(const EnvVar&) = delete;
  EnvVar& operator=(const EnvVar&) = delete;

 private:
  const char* name_;
  bool had_ = false;
  std::string old_;
};


using gpu_test::run_seed;
using DeviceFloats = gpu_test::DeviceBuffer<float>;

struct Shape {
  int64_t batch, seq, heads, dqk, dv;
  float q_magnitude;
  float scale() const { return 1.0f / std::sqrt(static_cast<float>(dqk)); }
  int64_t tokens() const { return batch * seq; }
  std::string name() const {
    std::ostringstream s;
    s << "b" << batch << " s" << seq << " h" << heads << " dqk" << dqk << " dv" << dv << " |q| " << q_magnitude;
    return s.str();
  }
};

struct Tensors {
  std::vector<float> q, k, v, dout;
};
struct Results {
  std::vector<float> out, lse, dq, dk, dv;
};

std::vector<float> bf16_rounded(std::vector<float> x) {
  for (float& y : x) y = __bfloat162float(__float2bfloat16_rn(y));
  return x;
}

Results run_cpu(const Shape& sh, const Tensors& in) {
  const size_t nq = sh.tokens() * sh.heads * sh.dqk, nv = sh.tokens() * sh.heads * sh.dv;
  Results r{std::vector<float>(nv), std::vector<float>(sh.batch * sh.heads * sh.seq), std::vector<float>(nq),
            std::vector<float>(nq), std::vector<float>(nv)};
  cpu::attention_forward(in.q.data(), in.k.data(), in.v.data(), r.out.data(), r.lse.data(), sh.batch, sh.seq,
                         sh.heads, sh.dqk, sh.dv, sh.scale());
  cpu::attention_backward(in.dout.data(), in.q.data(), in.k.data(), in.v.data(), r.out.data(), r.lse.data(),
                          r.dq.data(), r.dk.data(), r.dv.data(), sh.batch, sh.seq, sh.heads, sh.dqk, sh.dv,
                          sh.scale());
  return r;
}

struct Gpu {
  Gpu(const Shape& shape, const Tensors& in)
      : sh(shape), q(in.q), k(in.k), v(in.v), dout(in.dout), out(in.dout.size()),
        lse(static_cast<size_t>(sh.batch * sh.heads * sh.seq)), dq(in.q.size()), dk(in.q.size()), dv(in.v.size()) {}
  void forward(bool bf16, bool poison = true) {
    if (poison) out.poison(), lse.poison();
    (bf16 ? cuda::attention_forward_bf16 : cuda::attention_forward)(q.get(), k.get(), v.get(), out.get(), lse.get(),
                                                                     sh.batch, sh.seq, sh.heads, sh.dqk, sh.dv,
                                                                     sh.scale(), nullptr);
  }
  void backward(bool bf16, bool poison = true) {
    if (poison) dq.poison(), dk.poison(), dv.poison();
    (bf16 ? cuda::attention_backward_bf16 : cuda::attention_backward)(
        dout.get(), q.get(), k.get(), v.get(), out.get(), lse.get(), dq.get(), dk.get(), dv.get(), sh.batch, sh.seq,
        sh.heads, sh.dqk, sh.dv, sh.scale(), nullptr);
  }
  Results results() const {
    CUDA_CHECK(cudaDeviceSynchronize());
    return {out.download(), lse.download(), dq.download(), dk.download(), dv.download()};
  }
  Shape sh;
  DeviceFloats q, k, v, dout, out, lse, dq, dk, dv;
};

// ||a − b|| / ||b||; non-finite values in a are counted (and make the error infinite).
double relative_l2(const std::vector<float>& a, const std::vector<float>& b, size_t* non_finite) {
  double num = 0, den = 0;
  *non_finite = 0;
  for (size_t i = 0; i < b.size(); ++i) {
    if (!std::isfinite(a[i])) ++*non_finite;
    const double d = static_cast<double>(a[i]) - b[i];
    num += d * d;
    den += static_cast<double>(b[i]) * b[i];
  }
  return *non_finite ? INFINITY : std::sqrt(num / std::max(den, 1e-300));
}

void expect_close(const char* what, const Shape& sh, const std::vector<float>& gpu, const std::vector<float>& ref,
                  const std::vector<float>& ref_fp32, double tolerance) {
  ASSERT_EQ(gpu.size(), ref.size());
  size_t bad = 0, bad32 = 0;
  const double err = relative_l2(gpu, ref, &bad), err32 = relative_l2(gpu, ref_fp32, &bad32);
  std::printf("attention bf16 %-4s %-34s rel L2 err %.3e vs CPU on BF16 inputs (tolerance %.0e), %.3e vs FP32 inputs\n",
              what, sh.name().c_str(), err, tolerance, err32);
  EXPECT_EQ(bad, 0u) << what << " " << sh.name() << ": non-finite GPU values";
  EXPECT_LE(err, tolerance) << what << " " << sh.name() << "; seed " << run_seed();
}

class AttentionBf16Gpu : public gpu_test::GpuTest {};

Tensors random_tensors(const Shape& sh, std::mt19937_64& rng) {
  std::normal_distribution<float> normal(0.0f, 1.0f);
  const auto draw = [&](int64_t n, float magnitude) {
    std::vector<float> x(static_cast<size_t>(n));
    for (float& y : x) y = normal(rng) * magnitude;
    return x;
  };
  const int64_t nq = sh.tokens() * sh.heads * sh.dqk, nv = sh.tokens() * sh.heads * sh.dv;
  return {draw(nq, sh.q_magnitude), draw(nq, 1.0f), draw(nv, 1.0f), draw(nv, 1.0f)};
}

TEST_F(AttentionBf16Gpu, ForwardAndBackwardMatchTheCpuReferenceOnBf16Inputs) {
  std::mt19937_64 rng(run_seed());
  // The supported head dims (tiny fixture 24/16: padded to 32 inside; bench-600m 96/64), 17 tokens, partial last
  // tiles, several sequences and heads, a peaky softmax (|q| 3), 5 tiles.
  const Shape shapes[] = {{3, 17, 2, 24, 16, 1.0f},  {2, 100, 3, 24, 16, 1.0f}, {3, 130, 2, 96, 64, 1.0f},
                          {1, 64, 4, 96, 64, 3.0f}, {2, 300, 2, 96, 64, 1.0f}, {1, 257, 1, 24, 16, 2.0f}};
  for (const Shape& sh : shapes) {
    SCOPED_TRACE(sh.name() + ", seed " + std::to_string(run_seed()));
    const Tensors in = random_tensors(sh, rng);
    const Tensors rounded{bf16_rounded(in.q), bf16_rounded(in.k), bf16_rounded(in.v), bf16_rounded(in.dout)};
    const Results ref = run_cpu(sh, rounded), ref32 = run_cpu(sh, in);
    Gpu gpu(sh, in);
    const auto check = [&] {
      gpu.forward(true);
      gpu.backward(true);
      const Results got = gpu.results();
      expect_close("O", sh, got.out, ref.out, ref32.out, kTolerance);
      expect_close("lse", sh, got.lse, ref.lse, ref32.lse, kLseTolerance);
      expect_close("dQ", sh, got.dq, ref.dq, ref32.dq, kTolerance);
      expect_close("dK", sh, got.dk, ref.dk, ref32.dk, kTolerance);
      expect_close("dV", sh, got.dv, ref.dv, ref32.dv, kTolerance);
    };
    {
      const EnvVar kernel("MOERL_ATTN_TC_FWD_KERNEL", "mma"), bwd("MOERL_ATTN_TC_BWD_KERNEL", "mma");
      for (auto [warps, rows] : {std::pair{4, 16}, {8, 16}, {4, 32}, {8, 32}}) {
        SCOPED_TRACE(std::to_string(warps) + " warps per block, forward " + std::to_string(rows) + " rows per warp");
        std::printf("attention bf16 kernels of %d warps per block, forward %d rows per warp:\n", warps, rows);
        const WarpsEnv env(warps, warps, rows);
        check();
      }
    }
    // dQ read back from the dK/dV kernel's stores (MOERL_ATTN_TC_BWD_DQ=stored; computing S, P and dS again is the
    // default), backward blocks of 4 and 8 warps.
    for (int warps : {4, 8}) {
      SCOPED_TRACE("dQ from the stored dS, " + std::to_string(warps) + " warps per block");
      std::printf("attention bf16 kernels, dQ from the stored dS, backward %d warps per block:\n", warps);
      const EnvVar kernel("MOERL_ATTN_TC_FWD_KERNEL", "mma"), bwd("MOERL_ATTN_TC_BWD_KERNEL", "mma"),
          dq("MOERL_ATTN_TC_BWD_DQ", "stored");
      const WarpsEnv env(8, warps);
      check();
    }
    // The WGMMA forward (96/64 only; the 24/16 shapes run the mma.sync one again) in blocks of 1 and 2 warpgroups.
    for (const char* groups : {"1", "2"}) {
      SCOPED_TRACE(std::string("WGMMA forward, warpgroups ") + groups);
      std::printf("attention bf16 WGMMA forward, %s warpgroups per block (backward 4 warps):\n", groups);
      const EnvVar kernel("MOERL_ATTN_TC_FWD_KERNEL", "wgmma"), wg("MOERL_ATTN_TC_FWD_WG", groups),
          bwd("MOERL_ATTN_TC_BWD_KERNEL", "mma");
      const WarpsEnv env(8, 4);
      check();
    }
    // The WGMMA dK/dV kernel and the WGMMA dQ kernel (96/64 only; dQ from the dS stored), each beside the mma.sync
    // other half and together.
    for (auto [dkdv, dq_kernel] : {std::pair{"wgmma", "mma"}, {"mma", "wgmma"}, {"wgmma", "wgmma"}}) {
      SCOPED_TRACE(std::string("WGMMA forward, dK/dV ") + dkdv + ", dQ " + dq_kernel);
      std::printf("attention bf16 WGMMA forward, dK/dV %s, dQ %s:\n", dkdv, dq_kernel);
      const EnvVar kernel("MOERL_ATTN_TC_FWD_KERNEL", "wgmma"), bwd("MOERL_ATTN_TC_BWD_KERNEL", dkdv),
          dq("MOERL_ATTN_TC_BWD_DQ", "stored"), dqk("MOERL_ATTN_TC_BWD_DQ_KERNEL", dq_kernel);
      check();
    }
  }
}

TEST_F(AttentionBf16Gpu, RepeatsBitForBitAndRefusesOtherHeadDims) {
  const Shape sh{2, 200, 3, 96, 64, 1.0f};
  std::mt19937_64 rng(run_seed() + 3);
  Gpu gpu(sh, random_tensors(sh, rng));
  for (const char* kernel : {"mma", "wgmma"}) {  // both kernel families, forward and backward
    SCOPED_TRACE(std::string("kernels ") + kernel);
    const EnvVar env("MOERL_ATTN_TC_FWD_KERNEL", kernel), bwd("MOERL_ATTN_TC_BWD_KERNEL", kernel),
        dq("MOERL_ATTN_TC_BWD_DQ_KERNEL", kernel);
    gpu.forward(true);
    gpu.backward(true);
    const Results a = gpu.results();
    gpu.forward(true);
    gpu.backward(true);
    const Results b = gpu.results();
    for (auto [x, y] : {std::pair{&a.out, &b.out}, {&a.lse, &b.lse}, {&a.dq, &b.dq}, {&a.dk, &b.dk}, {&a.dv, &b.dv}})
      EXPECT_EQ(std::memcmp(x->data(), y->data(), x->size() * sizeof(float)), 0);
  }
  EXPECT_TRUE(cuda::attention_bf16_supported(96, 64));
  EXPECT_FALSE(cuda::attention_bf16_supported(192, 128));
  float* p = gpu.q.get();
  EXPECT_THROW(cuda::attention_forward_bf16(p, p, p, p, p, 1, 8, 1, 192, 128, 0.1f), Error);
  EXPECT_THROW(cuda::attention_forward_bf16(p + 1, p, p, p, p, 1, 8, 1, 96, 64, 0.1f), Error);  // misaligned q
}

bool same_bits(const std::vector<float>& a, const std::vector<float>& b) {
  return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(float)) == 0;
}

// Count of elements whose bits differ, and the largest |a - b| among them.
std::string bit_differences(const std::vector<float>& a, const std::vector<float>& b) {
  int64_t n = 0;
  double worst = 0;
  for (size_t i = 0; i < a.size() && i < b.size(); ++i)
    if (std::memcmp(&a[i], &b[i], sizeof(float)) != 0) ++n, worst = std::max(worst, std::fabs(double{a[i]} - b[i]));
  return std::to_string(n) + " of " + std::to_string(a.size()) + " differ, largest by " + std::to_string(worst);
}

TEST_F(AttentionBf16Gpu, WgmmaBackwardGivesTheMmaSyncBits) {
  // The WGMMA dK/dV and dQ kernels (attention_tc_wgmma_bwd.cu) make the mma.sync kernels' products on the same BF16
  // values, each 16-wide step of a dot product on the tensor cores and the steps summed in the same order (head dims
  // 0 .. 95 for Sᵀ, queries in tile order for dK and dV, keys for dQ), so dQ, dK and dV keep the mma.sync bits (seen
  // on the H200: the Brown training curves bit for bit unchanged). Either WGMMA kernel beside the other's mma.sync
  // one, both block orders, dQ from the stored dS and recomputed; shapes with one and several tiles, partial last
  // tiles.
  std::mt19937_64 rng(run_seed() + 8);
  for (const Shape& sh :
       {Shape{2, 300, 3, 96, 64, 1.0f}, Shape{1, 64, 2, 96, 64, 3.0f}, Shape{1, 1000, 2, 96, 64, 1.0f}}) {
    Gpu gpu(sh, random_tensors(sh, rng));
    gpu.forward(true);
    Results want;
    {
      const EnvVar bwd("MOERL_ATTN_TC_BWD_KERNEL", "mma"), dq("MOERL_ATTN_TC_BWD_DQ_KERNEL", "mma");
      gpu.backward(true);
      want = gpu.results();
    }
    for (auto [dkdv, dq_kernel] : {std::pair{"wgmma", "mma"}, {"mma", "wgmma"}, {"wgmma", "wgmma"}})
      for (auto [order, dq_mode] : {std::pair{"seq", "stored"}, {"tile", "stored"}, {"seq", "recompute"}}) {
        SCOPED_TRACE(sh.name() + ", dK/dV " + dkdv + ", dQ " + dq_kernel + " " + dq_mode + ", " + order +
                     " order, seed " + std::to_string(run_seed()));
        const EnvVar bwd("MOERL_ATTN_TC_BWD_KERNEL", dkdv), dq("MOERL_ATTN_TC_BWD_DQ_KERNEL", dq_kernel),
            o("MOERL_ATTN_TC_BWD_ORDER", order), mode("MOERL_ATTN_TC_BWD_DQ", dq_mode);
        gpu.backward(true);
        const Results got = gpu.results();
        EXPECT_TRUE(same_bits(got.dq, want.dq)) << "dQ: " << bit_differences(got.dq, want.dq);
        EXPECT_TRUE(same_bits(got.dk, want.dk)) << "dK: " << bit_differences(got.dk, want.dk);
        EXPECT_TRUE(same_bits(got.dv, want.dv)) << "dV: " << bit_differences(got.dv, want.dv);
      }
  }
}

TEST_F(AttentionBf16Gpu, StoredScoreGradientsGiveTheRecomputedBits) {
  // MOERL_ATTN_TC_BWD_DQ=stored: the dK/dV kernel writes dSᵀ (BF16) and dQ's kernel reads it instead of computing
  // S, P and dS again (=recompute, the default). Same products in the same order on the same BF16 values (the FP32
  // scores Sᵀ = K·Qᵀ and S = Q·Kᵀ are the tensor cores' dot products of the same pairs), so dQ, dK and dV keep the
  // recomputing path's bits, in both block shapes and block orders, with dQ blocks of 4, 8 and 16 warps
  // (MOERL_ATTN_TC_BWD_DQ_WARPS). Shapes: both head dims, one and several tiles, partial last tiles (130 and 300 rows:
  // a 16-warp block past the sequence's end).
  std::mt19937_64 rng(run_seed() + 7);
  for (const Shape& sh : {Shape{2, 300, 3, 96, 64, 1.0f}, Shape{1, 64, 2, 96, 64, 3.0f}, Shape{3, 130, 2, 24, 16, 1.0f},
                          Shape{1, 1000, 2, 96, 64, 1.0f}}) {
    Gpu gpu(sh, random_tensors(sh, rng));
    const EnvVar kernel("MOERL_ATTN_TC_FWD_KERNEL", "mma"), bwd("MOERL_ATTN_TC_BWD_KERNEL", "mma"),
        dq_kernel("MOERL_ATTN_TC_BWD_DQ_KERNEL", "mma");
    gpu.forward(true);
    for (auto [warps, dq_warps] : {std::pair{4, "4"}, {8, "4"}, {4, "8"}, {4, "16"}})
      for (const char* order : {"tile", "seq"}) {
        SCOPED_TRACE(sh.name() + ", " + std::to_string(warps) + " warps, dQ " + dq_warps + " warps, " + order +
                     " order, seed " + std::to_string(run_seed()));
        const WarpsEnv env(8, warps);
        const EnvVar o("MOERL_ATTN_TC_ORDER", order), dqo("MOERL_ATTN_TC_BWD_ORDER", order),
            dqw("MOERL_ATTN_TC_BWD_DQ_WARPS", dq_warps);
        Results want, got;
        {
          const EnvVar dq("MOERL_ATTN_TC_BWD_DQ", "recompute");
          gpu.backward(true);
          want = gpu.results();
        }
        {
          const EnvVar dq("MOERL_ATTN_TC_BWD_DQ", "stored");
          gpu.backward(true);
          got = gpu.results();
        }
        EXPECT_TRUE(same_bits(got.dq, want.dq)) << "dQ: " << bit_differences(got.dq, want.dq);
        EXPECT_TRUE(same_bits(got.dk, want.dk)) << "dK: " << bit_differences(got.dk, want.dk);
        EXPECT_TRUE(same_bits(got.dv, want.dv)) << "dV: " << bit_differences(got.dv, want.dv);
      }
  }
  const Shape sh{1, 64, 1, 96, 64, 1.0f};
  Gpu gpu(sh, random_tensors(sh, rng));
  gpu.forward(true);
  const EnvVar kernel("MOERL_ATTN_TC_BWD_KERNEL", "mma"), dq("MOERL_ATTN_TC_BWD_DQ", "kept");
  EXPECT_THROW(gpu.backward(true), Error);  // names the variable and its two values
}

// MLA's inputs of the packed entry points: q [T, H, dn + dr], kv [T, H, dn + dv] (per head [k_nope | v]), ckv
// [T, kv_lora + dr] (rope key in the last dr columns), and k, v assembled from them on the host as
// runtime/gpu/gpu_kernels.cu's mla_assemble_kv does.
struct MlaInputs {
  int64_t dn, dr, kv_lora;
  std::vector<float> q, kv, ckv, k, v, dout;
};

MlaInputs mla_inputs(const Shape& sh, int64_t dn, int64_t kv_lora, std::mt19937_64& rng) {
  std::normal_distribution<float> normal(0.0f, 1.0f);
  const auto draw = [&](int64_t n) {
    std::vector<float> x(static_cast<size_t>(n));
    for (float& y : x) y = normal(rng);
    return x;
  };
  const int64_t T = sh.tokens(), H = sh.heads, dr = sh.dqk - dn, dv = sh.dv;
  MlaInputs m{dn, dr, kv_lora, draw(T * H * sh.dqk), draw(T * H * (dn + dv)), draw(T * (kv_lora + dr)),
              std::vector<float>(T * H * sh.dqk), std::vector<float>(T * H * dv), draw(T * H * dv)};
  for (int64_t t = 0; t < T; ++t)
    for (int64_t h = 0; h < H; ++h) {
      const float* src = &m.kv[(t * H + h) * (dn + dv)];
      for (int64_t c = 0; c < dn; ++c) m.k[(t * H + h) * sh.dqk + c] = src[c];
      for (int64_t c = 0; c < dr; ++c) m.k[(t * H + h) * sh.dqk + dn + c] = m.ckv[t * (kv_lora + dr) + kv_lora + c];
      for (int64_t c = 0; c < dv; ++c) m.v[(t * H + h) * dv + c] = src[dn + c];
    }
  return m;
}

TEST_F(AttentionBf16Gpu, PackedEntryPointsAndBothBlockOrdersGiveTheSameBitsAsThePlainOnes) {
  // The model packs q, k, v once (k, v straight from kv_b_proj's output and the rope key) and keeps them for the
  // backward; that must change no bit against attention_forward_bf16 / _backward_bf16 on the assembled k, v. The
  // block order (MOERL_ATTN_TC_ORDER, MOERL_ATTN_TC_BWD_ORDER) only moves blocks between SMs: no bit changes either.
  // Shapes: both head dims (dn 16 / 64 of the tiny fixture and bench-600m), partial tiles, an odd kv_lora multiple of
  // 4. The MLA entry point (dK and dV in kv_b_proj's gradient layout) gives the same values.
  std::mt19937_64 rng(run_seed() + 5);
  struct Case {
    Shape sh;
    int64_t dn, kv_lora;
  };
  for (const Case& c : {Case{{2, 150, 3, 24, 16, 1.0f}, 16, 20}, Case{{2, 300, 2, 96, 64, 1.0f}, 64, 36}}) {
    const Shape& sh = c.sh;
    SCOPED_TRACE(sh.name() + ", seed " + std::to_string(run_seed()));
    ASSERT_TRUE(cuda::attention_pack_mla_bf16_supported(c.kv_lora, c.dn, sh.dqk - c.dn, sh.dv));
    const MlaInputs m = mla_inputs(sh, c.dn, c.kv_lora, rng);
    Gpu plain(sh, Tensors{m.q, m.k, m.v, m.dout});
    Results ref;
    {
      const EnvVar order("MOERL_ATTN_TC_ORDER", "tile"), dq_order("MOERL_ATTN_TC_BWD_ORDER", "tile");
      plain.forward(true);
      plain.backward(true);
      ref = plain.results();
    }
    DeviceFloats q(m.q), kv(m.kv), ckv(m.ckv), dout(m.dout);
    DeviceFloats packed((cuda::attention_bf16_packed_bytes(sh.batch, sh.seq, sh.heads, sh.dqk, sh.dv) + 3) / 4);
    for (const char* o : {"tile", "seq"}) {
      SCOPED_TRACE(std::string("order ") + o);
      const EnvVar order("MOERL_ATTN_TC_ORDER", o), dq_order("MOERL_ATTN_TC_BWD_ORDER", o);
      plain.forward(true);
      plain.backward(true);
      const Results again = plain.results();
      EXPECT_TRUE(same_bits(again.out, ref.out) && same_bits(again.lse, ref.lse) && same_bits(again.dq, ref.dq) &&
                  same_bits(again.dk, ref.dk) && same_bits(again.dv, ref.dv));
      packed.poison();
      plain.out.poison(), plain.lse.poison(), plain.dq.poison(), plain.dk.poison(), plain.dv.poison();
      cuda::attention_pack_mla_bf16(q.get(), kv.get(), ckv.get(), c.kv_lora, packed.get(), sh.batch, sh.seq, sh.heads,
                                    c.dn, sh.dqk - c.dn, sh.dv);
      cuda::attention_forward_bf16_packed(packed.get(), plain.out.get(), plain.lse.get(), sh.batch, sh.seq, sh.heads,
                                          sh.dqk, sh.dv, sh.scale());
      cuda::attention_backward_bf16_packed(dout.get(), packed.get(), plain.out.get(), plain.lse.get(), plain.dq.get(),
                                           plain.dk.get(), plain.dv.get(), sh.batch, sh.seq, sh.heads, sh.dqk, sh.dv,
                                           sh.scale());
      const Results got = plain.results();
      EXPECT_TRUE(same_bits(got.out, ref.out)) << "O";
      EXPECT_TRUE(same_bits(got.lse, ref.lse)) << "lse";
      EXPECT_TRUE(same_bits(got.dq, ref.dq)) << "dQ";
      EXPECT_TRUE(same_bits(got.dk, ref.dk)) << "dK";
      EXPECT_TRUE(same_bits(got.dv, ref.dv)) << "dV";

      // MLA's layout: dK's nope columns and dV side by side per head, dK's rope columns apart; the same bits.
      const int64_t T = sh.tokens(), H = sh.heads, dn = c.dn, dr = sh.dqk - dn, dv = sh.dv;
      DeviceFloats d_kv(static_cast<size_t>(T * H * (dn + dv))), dk_rope(static_cast<size_t>(T * H * dr));
      d_kv.poison(), dk_rope.poison(), plain.dq.poison();
      cuda::attention_backward_bf16_packed_mla(dout.get(), packed.get(), plain.out.get(), plain.lse.get(),
                                               plain.dq.get(), d_kv.get(), dk_rope.get(), sh.batch, sh.seq, sh.heads,
                                               dn, dr, dv, sh.scale());
      EXPECT_TRUE(same_bits(plain.dq.download(), ref.dq)) << "dQ (MLA layout)";
      std::vector<float> want_kv(static_cast<size_t>(T * H * (dn + dv))), want_rope(static_cast<size_t>(T * H * dr));
      for (int64_t row = 0; row < T * H; ++row) {
        for (int64_t col = 0; col < dn; ++col) want_kv[row * (dn + dv) + col] = ref.dk[row * sh.dqk + col];
        for (int64_t col = 0; col < dv; ++col) want_kv[row * (dn + dv) + dn + col] = ref.dv[row * dv + col];
        for (int64_t col = 0; col < dr; ++col) want_rope[row * dr + col] = ref.dk[row * sh.dqk + dn + col];
      }
      EXPECT_TRUE(same_bits(d_kv.download(), want_kv)) << "d_kv (dK nope | dV)";
      EXPECT_TRUE(same_bits(dk_rope.download(), want_rope)) << "dK rope";
    }
  }
  EXPECT_FALSE(cuda::attention_pack_mla_bf16_supported(18, 64, 32, 64));  // rope key rows not 16-byte aligned
}

TEST_F(AttentionBf16Gpu, RopeAppliedByThePackingAndTheBackwardStoresGivesTheSeparatePassesBits) {
  // The model lets attention_pack_mla_bf16 rotate q's and the rope key's columns (interleaved pairs) and the backward
  // rotate dQ's rope columns back as it stores them, and mla_sum_rope_dk the summed rope-key gradient, instead of
  // cuda::rope_forward / rope_backward passes over q, ckv, dQ and d_ckv: the same bits, for every dQ kernel.
  std::mt19937_64 rng(run_seed() + 6);
  struct Case {
    Shape sh;
    int64_t dn, kv_lora;
  };
  const float theta = 10000.0f;
  for (const Case& c : {Case{{2, 150, 3, 24, 16, 1.0f}, 16, 20}, Case{{2, 300, 2, 96, 64, 1.0f}, 64, 36}}) {
    const Shape& sh = c.sh;
    SCOPED_TRACE(sh.name() + ", seed " + std::to_string(run_seed()));
    const int64_t T = sh.tokens(), H = sh.heads, dn = c.dn, dr = sh.dqk - dn, dv = sh.dv, ckv_dim = c.kv_lora + dr;
    const MlaInputs m = mla_inputs(sh, dn, c.kv_lora, rng);
    const cuda::RopeTables rope = cuda::rope_tables(sh.seq, dr, theta);
    const size_t packed_floats = (cuda::attention_bf16_packed_bytes(sh.batch, sh.seq, H, sh.dqk, dv) + 3) / 4;
    // Separate passes: q and ckv rotated in place, packed; the gradients rotated back after.
    DeviceFloats q(m.q), kv(m.kv), ckv(m.ckv), dout(m.dout), packed(packed_floats);
    packed.poison();
    cuda::rope_forward(q.get() + dn, T, sh.seq, H, H * sh.dqk, sh.dqk, dr, theta, true);
    cuda::rope_forward(ckv.get() + c.kv_lora, T, sh.seq, 1, ckv_dim, dr, dr, theta, true);
    cuda::attention_pack_mla_bf16(q.get(), kv.get(), ckv.get(), c.kv_lora, packed.get(), sh.batch, sh.seq, H, dn, dr,
                                  dv);
    // Fused: the packing rotates.
    DeviceFloats q0(m.q), ckv0(m.ckv), packed_f(packed_floats);
    packed_f.poison();
    cuda::attention_pack_mla_bf16(q0.get(), kv.get(), ckv0.get(), c.kv_lora, packed_f.get(), sh.batch, sh.seq, H, dn,
                                  dr, dv, nullptr, &rope);
    ASSERT_TRUE(same_bits(packed_f.download(), packed.download())) << "packed q, k, v";
    DeviceFloats out(static_cast<size_t>(T * H * dv)), lse(static_cast<size_t>(sh.batch * H * sh.seq));
    cuda::attention_forward_bf16_packed(packed.get(), out.get(), lse.get(), sh.batch, sh.seq, H, sh.dqk, dv,
                                        sh.scale());
    for (const auto& [name, value] : {std::pair{"MOERL_ATTN_TC_BWD_DQ", "stored"},
                                      std::pair{"MOERL_ATTN_TC_BWD_DQ", "recompute"},
                                      std::pair{"MOERL_ATTN_TC_BWD_KERNEL", "wgmma"},
                                      std::pair{"MOERL_ATTN_TC_BWD_DQ_KERNEL", "wgmma"}}) {
      SCOPED_TRACE(std::string(name) + "=" + value);
      const EnvVar variant(name, value);
      DeviceFloats dq(static_cast<size_t>(T * H * sh.dqk)), d_kv(static_cast<size_t>(T * H * (dn + dv)));
      DeviceFloats dk_rope(static_cast<size_t>(T * H * dr)), d_ckv(static_cast<size_t>(T * ckv_dim));
      dq.poison(), d_kv.poison(), dk_rope.poison(), d_ckv.poison();
      cuda::attention_backward_bf16_packed_mla(dout.get(), packed.get(), out.get(), lse.get(), dq.get(), d_kv.get(),
                                               dk_rope.get(), sh.batch, sh.seq, H, dn, dr, dv, sh.scale());
      gpu::detail::mla_sum_rope_dk(dk_rope.get(), d_ckv.get(), T, H, dr, c.kv_lora, nullptr);
      cuda::rope_backward(dq.get() + dn, T, sh.seq, H, H * sh.dqk, sh.dqk, dr, theta, true);
      cuda::rope_backward(d_ckv.get() + c.kv_lora, T, sh.seq, 1, ckv_dim, dr, dr, theta, true);
      DeviceFloats dq_f(dq.size()), d_kv_f(d_kv.size()), dk_rope_f(dk_rope.size()), d_ckv_f(d_ckv.size());
      dq_f.poison(), d_kv_f.poison(), dk_rope_f.poison(), d_ckv_f.poison();
      cuda::attention_backward_bf16_packed_mla(dout.get(), packed.get(), out.get(), lse.get(), dq_f.get(),
                                               d_kv_f.get(), dk_rope_f.get(), sh.batch, sh.seq, H, dn, dr, dv,
                                               sh.scale(), nullptr, &rope);
      gpu::detail::mla_sum_rope_dk(dk_rope_f.get(), d_ckv_f.get(), T, H, dr, c.kv_lora, nullptr, &rope, sh.seq);
      EXPECT_TRUE(same_bits(dq_f.download(), dq.download())) << "dQ";
      EXPECT_TRUE(same_bits(d_kv_f.download(), d_kv.download())) << "d_kv";
      // d_ckv's rope columns only (the latent columns are the caller's, never written here).
      const std::vector<float> got = d_ckv_f.download(), want = d_ckv.download();
      std::vector<float> got_rope, want_rope;
      for (int64_t t = 0; t < T; ++t)
        for (int64_t col = c.kv_lora; col < ckv_dim; ++col)
          got_rope.push_back(got[t * ckv_dim + col]), want_rope.push_back(want[t * ckv_dim + col]);
      EXPECT_TRUE(same_bits(got_rope, want_rope)) << "d_ckv's rope key gradient";
    }
  }
}

using gpu_test::median_ms;

TEST_F(AttentionBf16Gpu, ReportsThroughputAgainstTheFp32Kernels) {
  // bench-600m's attention: 8 x 2048 tokens, 16 heads, dqk 96, dv 64. FLOPs as in attention_gpu.cpp (causal
  // pairs; backward 2·pairs·(3·dqk + 2·dv)).
  const Shape sh{8, 2048, 16, 96, 64, 1.0f};
  std::mt19937_64 rng(run_seed() + 4);
  // The device's memory pool keeps what the calls' temporaries free (as the model sets its pool: the stored dS is
  // 553 MB here, mapped again per call otherwise); restored at the end.
  cudaMemPool_t pool;
  uint64_t threshold = UINT64_MAX, old_threshold = 0;
  int device = 0;
  CUDA_CHECK(cudaGetDevice(&device));
  CUDA_CHECK(cudaDeviceGetDefaultMemPool(&pool, device));
  CUDA_CHECK(cudaMemPoolGetAttribute(pool, cudaMemPoolAttrReleaseThreshold, &old_threshold));
  CUDA_CHECK(cudaMemPoolSetAttribute(pool, cudaMemPoolAttrReleaseThreshold, &threshold));
  const int64_t nq = sh.tokens() * sh.heads * sh.dqk, nv = sh.tokens() * sh.heads * sh.dv;
  std::uniform_real_distribution<float> uniform(-1.0f, 1.0f);
  const auto draw = [&](int64_t n) {
    std::vector<float> x(static_cast<size_t>(n));
    for (float& y : x) y = uniform(rng);
    return x;
  };
  Gpu gpu(sh, Tensors{draw(nq), draw(nq), draw(nv), draw(nv)});
  const double pairs = static_cast<double>(sh.batch) * sh.heads * sh.seq * (sh.seq + 1) / 2;
  const double fwd_flops = 2 * pairs * static_cast<double>(sh.dqk + sh.dv);
  const double bwd_flops = 2 * pairs * static_cast<double>(3 * sh.dqk + 2 * sh.dv);
  // The mma.sync kernels in every block shape (MOERL_ATTN_TC_FWD_WARPS, MOERL_ATTN_TC_FWD_WARP_ROWS,
  // MOERL_ATTN_TC_BWD_WARPS), tile order, through the plain entry points (times include the packing of q, k, v and
  // of dO, and the scratch allocation).
  {
    const EnvVar kernel("MOERL_ATTN_TC_FWD_KERNEL", "mma"), bwd("MOERL_ATTN_TC_BWD_KERNEL", "mma");
    for (auto [warps, rows] : {std::pair{4, 16}, {8, 16}, {8, 32}}) {
      const WarpsEnv env(warps, 4, rows);
      const double ms = median_ms([&] { gpu.forward(true, false); });
      std::printf("attention bf16 tensor cores forward  (%d warps x %d rows) %s: %.3f ms, %.1f TFLOP/s (causal)\n",
                  warps, rows, sh.name().c_str(), ms, fwd_flops / ms / 1e9);
    }
    gpu.forward(true, false);
    struct Bwd {
      int warps;
      const char *dq, *dq_warps;
    };
    for (const Bwd& v : {Bwd{4, "recompute", "4"}, Bwd{4, "stored", "4"}, Bwd{4, "stored", "8"},
                         Bwd{4, "stored", "16"}, Bwd{8, "recompute", "4"}, Bwd{8, "stored", "4"}}) {
      const WarpsEnv env(8, v.warps);
      const EnvVar dq_env("MOERL_ATTN_TC_BWD_DQ", v.dq), dqw("MOERL_ATTN_TC_BWD_DQ_WARPS", v.dq_warps);
      const double ms = median_ms([&] { gpu.backward(true, false); });
      std::printf("attention bf16 tensor cores backward (%d warps, dQ %s, %s warps) %s: %.3f ms, %.1f TFLOP/s "
                  "(causal)\n",
                  v.warps, v.dq, v.dq_warps, sh.name().c_str(), ms, bwd_flops / ms / 1e9);
    }
  }
  {
    // As the model runs them: q, k, v packed once (that pass timed alone), then the forward and the backward on the
    // packed operands, for each kernel choice (MOERL_ATTN_TC_FWD_KERNEL / _FWD_WG, MOERL_ATTN_TC_BWD_KERNEL,
    // MOERL_ATTN_TC_BWD_DQ) in both block orders (MOERL_ATTN_TC_ORDER).
    const size_t bytes = cuda::attention_bf16_packed_bytes(sh.batch, sh.seq, sh.heads, sh.dqk, sh.dv);
    DeviceFloats packed((bytes + 3) / 4), kv(static_cast<size_t>(sh.tokens() * sh.heads * (64 + sh.dv))),
        ckv(static_cast<size_t>(sh.tokens() * (256 + 32)));
    CUDA_CHECK(cudaMemset(kv.get(), 0, sh.tokens() * sh.heads * (64 + sh.dv) * sizeof(float)));
    CUDA_CHECK(cudaMemset(ckv.get(), 0, sh.tokens() * (256 + 32) * sizeof(float)));
    struct Variant {
      const char *fwd, *fwd_wg, *bwd, *dq_kernel, *order, *dq = "stored";
    };
    for (const Variant& v :
         {Variant{"mma", "2", "mma", "mma", "tile"}, Variant{"wgmma", "1", "mma", "mma", "tile"},
          Variant{"wgmma", "2", "mma", "mma", "tile"}, Variant{"wgmma", "2", "mma", "mma", "tile", "recompute"},
          Variant{"wgmma", "2", "wgmma", "mma", "tile"}, Variant{"wgmma", "2", "wgmma", "wgmma", "tile"},
          Variant{"wgmma", "2", "wgmma", "wgmma", "seq"},
          Variant{"wgmma", "2", "wgmma", "wgmma", "tile", "recompute"}}) {
      const EnvVar e1("MOERL_ATTN_TC_FWD_KERNEL", v.fwd), e2("MOERL_ATTN_TC_FWD_WG", v.fwd_wg),
          e3("MOERL_ATTN_TC_BWD_KERNEL", v.bwd), e4("MOERL_ATTN_TC_BWD_DQ_KERNEL", v.dq_kernel),
          e5("MOERL_ATTN_TC_ORDER", v.order), e6("MOERL_ATTN_TC_BWD_DQ", v.dq);
      const double pack_ms = median_ms([&] {
        cuda::attention_pack_mla_bf16(gpu.q.get(), kv.get(), ckv.get(), 256, packed.get(), sh.batch, sh.seq,
                                      sh.heads, 64, 32, sh.dv);
      });
      const double fwd_ms = median_ms([&] {
        cuda::attention_forward_bf16_packed(packed.get(), gpu.out.get(), gpu.lse.get(), sh.batch, sh.seq, sh.heads,
                                            sh.dqk, sh.dv, sh.scale());
      });
      const double bwd_ms = median_ms([&] {
        cuda::attention_backward_bf16_packed(gpu.dout.get(), packed.get(), gpu.out.get(), gpu.lse.get(),
                                             gpu.dq.get(), gpu.dk.get(), gpu.dv.get(), sh.batch, sh.seq, sh.heads,
                                             sh.dqk, sh.dv, sh.scale());
      });
      std::printf("attention bf16 packed (model path; forward %s wg %s, dK/dV %s, dQ %s %s, %s order) %s: MLA "
                  "pack %.3f ms; forward %.3f ms, %.1f TFLOP/s; backward %.3f ms, %.1f TFLOP/s (causal)\n",
                  v.fwd, v.fwd_wg, v.bwd, v.dq_kernel, v.dq, v.order, sh.name().c_str(), pack_ms, fwd_ms,
                  fwd_flops / fwd_ms / 1e9, bwd_ms, bwd_flops / bwd_ms / 1e9);
    }
    gpu.forward(true, false);
  }
  const double fwd_ms = median_ms([&] { gpu.forward(false, false); });
  const double bwd_ms = median_ms([&] { gpu.backward(false, false); });
  std::printf("attention fp32 CUDA cores forward  %s: %.3f ms, %.1f TFLOP/s; backward %.3f ms, %.1f TFLOP/s (causal)\n",
              sh.name().c_str(), fwd_ms, fwd_flops / fwd_ms / 1e9, bwd_ms, bwd_flops / bwd_ms / 1e9);
  const Results r = gpu.results();
  EXPECT_TRUE(std::all_of(r.dq.begin(), r.dq.end(), [](float x) { return std::isfinite(x); }));
  CUDA_CHECK(cudaMemPoolSetAttribute(pool, cudaMemPoolAttrReleaseThreshold, &old_threshold));
  CUDA_CHECK(cudaMemPoolTrimTo(pool, 0));
}

}  // namespace
}  // namespace moerl
