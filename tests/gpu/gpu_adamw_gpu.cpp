// gpu::GpuAdamW against moerl::AdamW: the same parameters and gradients on both, several steps through warmup and
// cosine decay, with clipped steps, unclipped steps and a skipped one (a NaN gradient): weights, gradients (left as given),
// BF16 moments and update counts bit for bit. Checkpoint state moves between the two optimizers. Random values
// from a fresh seed per run (printed; MOERL_TEST_SEED=<n> repeats it). Needs a GPU: skipped without one.
#include <cuda_runtime_api.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <map>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "kernels/cuda/adamw.hpp"
#include "kernels/cuda/cuda_check.hpp"
#include "kernels/fp8.hpp"
#include "kernels/fp8_quantize.hpp"
#include "kernels/half.hpp"
#include "runtime/error.hpp"
#include "runtime/gpu/gpu_adamw.hpp"
#include "runtime/model/params.hpp"
#include "runtime/optim/adamw.hpp"
#include "tests/gpu/gpu_test_support.hpp"

namespace moerl {
namespace {

using gpu_test::run_seed;

class GpuAdamWTest : public gpu_test::GpuTest {};

// Values and gradients of a Params set in two device arenas laid out as GpuModel lays them out: each tensor
// 256-byte aligned, so tensors whose size is a multiple of 64 floats lie back to back with the next one (merged
// into one span by the optimizer when their decay rule agrees) and the others are followed by a gap; the
// layout order is not the name order (GpuModel stacks a layer's experts). params() is in name order.
class DeviceArena {
 public:
  DeviceArena(const Params& params, const std::vector<std::string>& layout_order) {
    require(layout_order.size() == params.all().size(), "DeviceArena: the layout must name every parameter");
    std::map<std::string, size_t> offset;
    for (const std::string& name : layout_order) {
      offset[name] = total_;
      total_ += (static_cast<size_t>(params.at(name).value.numel()) + 63) / 64 * 64;
    }
    void* raw = nullptr;
    CUDA_CHECK(cudaMalloc(&raw, total_ * sizeof(float)));
    values_ = static_cast<float*>(raw);
    CUDA_CHECK(cudaMalloc(&raw, total_ * sizeof(float)));
    grads_ = static_cast<float*>(raw);
    CUDA_CHECK(cudaMemset(values_, 0xFF, total_ * sizeof(float)));  // NaN in the gaps: a span must not cover them
    CUDA_CHECK(cudaMemset(grads_, 0xFF, total_ * sizeof(float)));
    for (const auto& [name, p] : params.all())
      params_.push_back({name, p.value.shape(), values_ + offset.at(name), grads_ + offset.at(name), p.value.numel(),
                         p.trainable});
  }
  ~DeviceArena() {
    cudaFree(values_);
    cudaFree(grads_);
  }
  DeviceArena(const DeviceArena&) = delete;
  DeviceArena& operator=(const DeviceArena&) = delete;

  const std::vector<gpu::DeviceParam>& params() const { return params_; }
  void upload_values(const Params& host) { upload(host, true); }
  void upload_grads(const Params& host) { upload(host, false); }
  void download_values(Params& host) { download(host, true); }
  void download_grads(Params& host) { download(host, false); }

 private:
  void upload(const Params& host, bool values) {
    size_t i = 0;
    for (const auto& [name, p] : host.all()) {
      const gpu::DeviceParam& d = params_[i++];
      const Tensor& t = values ? p.value : p.grad;
      CUDA_CHECK(cudaMemcpy(values ? d.value : d.grad, t.bytes(), t.nbytes(), cudaMemcpyHostToDevice));
    }
  }
  void download(Params& host, bool values) {
    size_t i = 0;
    for (auto& [name, p] : host.all()) {
      const gpu::DeviceParam& d = params_[i++];
      Tensor& t = values ? p.value : p.grad;
      CUDA_CHECK(cudaMemcpy(t.bytes(), values ? d.value : d.grad, t.nbytes(), cudaMemcpyDeviceToHost));
    }
  }
  std::vector<size_t> offsets_;
  size_t total_ = 0;
  float* values_ = nullptr;
  float* grads_ = nullptr;
  std::vector<gpu::DeviceParam> params_;
};

void fill_normal(Tensor& t, std::mt19937_64& rng, float stddev) {
  std::normal_distribution<float> normal(0.0f, stddev);
  for (float& x : t.span<float>()) x = normal(rng);
}

// Number of elements whose bits differ; prints the first one.
template <class T> int64_t count_differing(const std::string& what, const T* got, const T* want, int64_t n) {
  int64_t bad = 0;
  for (int64_t i = 0; i < n; ++i) {
    if (std::memcmp(&got[i], &want[i], sizeof(T)) == 0) continue;
    if (bad++ == 0)
      std::printf("  %s: first difference at %lld: GPU %.9g, CPU %.9g\n", what.c_str(), static_cast<long long>(i),
                  static_cast<double>(got[i]), static_cast<double>(want[i]));
  }
  return bad;
}

SafeTensors as_file(std::map<std::string, Tensor> tensors, const std::string& source) {
  SafeTensors st;
  st.tensors = std::move(tensors);
  st.source = source;
  return st;
}

SafeTensors as_file(const std::map<std::string, const Tensor*>& tensors, const std::string& source) {
  std::map<std::string, Tensor> copies;
  for (const auto& [name, t] : tensors) copies.emplace(name, t->clone());
  return as_file(std::move(copies), source);
}

// A copy of params' gradients (values left zero).
Params gradients_of(const Params& params) {
  Params out;
  for (const auto& [name, p] : params.all()) {
    out.add(name, p.value.shape(), p.trainable);
    std::memcpy(out.at(name).grad.bytes(), p.grad.bytes(), p.grad.nbytes());
  }
  return out;
}

// Every weight and moment of the GPU optimizer's parameters equals the CPU's, bit for bit, and every gradient is
// the one the step was given (`grads`: the GPU applies the clip factor inside the update, the CPU clips in place).
void expect_same_state(const std::string& when, Params& cpu, const AdamW& cpu_opt, DeviceArena& arena,
                       const gpu::GpuAdamW& gpu_opt, const Params& grads) {
  Params got;
  for (const auto& [name, p] : cpu.all()) got.add(name, p.value.shape(), p.trainable);
  arena.download_values(got);
  arena.download_grads(got);
  const auto want_state = cpu_opt.state();
  const auto got_state = gpu_opt.state();
  ASSERT_EQ(got_state.size(), want_state.size()) << when;
  for (const auto& [name, p] : cpu.all()) {
    const Param& g = got.at(name);
    EXPECT_EQ(count_differing(when + " " + name + " weight", g.value.data<float>(), p.value.data<float>(), p.value.numel()), 0)
        << when << " " << name;
    const Param& given = grads.at(name);
    EXPECT_EQ(count_differing(when + " " + name + " grad", g.grad.data<float>(), given.grad.data<float>(),
                              given.grad.numel()), 0)
        << when << " " << name << ": the gradient was written";
  }
  for (const auto& [key, want] : want_state) {
    ASSERT_TRUE(got_state.count(key)) << when << ": the GPU state has no " << key;
    const Tensor& t = got_state.at(key);
    ASSERT_EQ(t.dtype(), want->dtype()) << key;
    ASSERT_EQ(t.shape(), want->shape()) << key;
    EXPECT_EQ(std::memcmp(t.bytes(), want->bytes(), t.nbytes()), 0) << when << ": " << key << " differs";
  }
}

Params test_params(std::mt19937_64& rng) {
  Params params;
  params.add("a.matrix", {64, 300});       // rank 2: decayed
  params.add("b.expert", {4, 33, 7});      // rank 3: decayed; 924 floats, a gap after it
  params.add("c.norm", {1001});            // rank 1: no decay; 1001 % 4 != 0, the scalar tail
  params.add("d.bias", {16}, false);       // frozen: no moments, never updated, not in the norm
  params.add("e.matrix", {128, 64});
  params.add("f.matrix", {96, 40});
  params.add("g.norm", {64});
  for (auto& [name, p] : params.all()) fill_normal(p.value, rng, 0.1f);
  return params;
}

// Spans by address: [f e a b] (decayed, back to back), [g c] (not decayed), then the frozen d.
const std::vector<std::string> kLayout{"f.matrix", "e.matrix", "a.matrix", "b.expert", "g.norm", "c.norm", "d.bias"};

TEST_F(GpuAdamWTest, StepsGiveTheCpuOptimizersBitsThroughClippingAndASkippedStep) {
  std::mt19937_64 rng(run_seed() + 11);
  Params cpu = test_params(rng);
  DeviceArena arena(cpu, kLayout);
  arena.upload_values(cpu);
  AdamWConfig config;
  config.lr = 1e-2, config.weight_decay = 0.1, config.clip_grad_norm = 1.0, config.warmup_steps = 2,
  config.total_steps = 7, config.min_lr_ratio = 0.1;
  AdamW cpu_opt(cpu, config);
  int updates_seen = 0;
  gpu::GpuAdamW gpu_opt(arena.params(), config, nullptr, [&] { ++updates_seen; });
  EXPECT_EQ(gpu_opt.span_count(), 2u) << "kLayout's two groups of back-to-back tensors";
  for (int64_t step = 0; step < 7; ++step) {
    const std::string when = "step " + std::to_string(step);
    SCOPED_TRACE(when + ", seed " + std::to_string(run_seed()));
    // ~34k gradient values: σ = 0.02 gives a norm near 3.7 (clipped to 1), σ = 0.002 near 0.37 (not clipped);
    // step 3 holds a NaN (skipped: weights, moments and the update count stay).
    const float sigma = step % 2 == 0 ? 0.02f : 0.002f;
    for (auto& [name, p] : cpu.all()) fill_normal(p.grad, rng, sigma);
    if (step == 3) cpu.at("c.norm").grad.data<float>()[7] = NAN;
    arena.upload_grads(cpu);
    const Params given = gradients_of(cpu);  // before the CPU clips them in place

    const StepStats want = cpu_opt.step(step);
    const StepStats got = gpu_opt.step(step);
    std::printf("  %s: lr %.6g, grad norm CPU %.17g GPU %.17g%s\n", when.c_str(), got.lr, want.grad_norm,
                got.grad_norm, got.skipped ? " (skipped)" : want.grad_norm > 1 ? " (clipped)" : "");
    EXPECT_EQ(got.lr, want.lr);
    ASSERT_EQ(got.skipped, want.skipped);
    EXPECT_EQ(got.skipped, step == 3);
    if (want.skipped) {
      EXPECT_FALSE(std::isfinite(got.grad_norm));
    } else {
      // Both sum the same exact double squares of ~34k values in other orders: ~34k · 2^-53 ≈ 4e-12 apart at most.
      EXPECT_NEAR(got.grad_norm, want.grad_norm, 1e-11 * want.grad_norm);
    }
    ASSERT_EQ(gpu_opt.steps_taken(), cpu_opt.steps_taken());
    ASSERT_EQ(updates_seen, cpu_opt.steps_taken()) << "after_update runs once per applied update";
    // The same FP32 operations in the same order and the same BF16 rounding (kernels/cuda/adamw.hpp): every bit.
    expect_same_state(when, cpu, cpu_opt, arena, gpu_opt, given);
    if (HasFatalFailure()) return;
  }
}

TEST_F(GpuAdamWTest, CheckpointStateMovesBetweenCpuAndGpuOptimizers) {
  std::mt19937_64 rng(run_seed() + 12);
  Params cpu = test_params(rng);
  DeviceArena arena(cpu, kLayout);
  arena.upload_values(cpu);
  AdamWConfig config;
  config.lr = 3e-3, config.warmup_steps = 0, config.total_steps = 10;
  AdamW cpu_opt(cpu, config);
  Params given;  // the last step's gradients as given
  auto step_both = [&](AdamW& c, gpu::GpuAdamW& g, int64_t step) {
    for (auto& [name, p] : cpu.all()) fill_normal(p.grad, rng, 0.01f);
    arena.upload_grads(cpu);
    given = gradients_of(cpu);
    c.step(step);
    g.step(step);
  };
  {
    gpu::GpuAdamW gpu_opt(arena.params(), config, nullptr);
    step_both(cpu_opt, gpu_opt, 0);
    step_both(cpu_opt, gpu_opt, 1);
    // GPU -> CPU: a fresh CPU optimizer takes the GPU's state (names, dtypes, shapes) and holds the same bits.
    AdamW from_gpu(cpu, config);
    from_gpu.load_state(as_file(gpu_opt.state(), "gpu state"));
    EXPECT_EQ(from_gpu.steps_taken(), 2);
    expect_same_state("gpu -> cpu", cpu, from_gpu, arena, gpu_opt, given);
  }
  // CPU -> GPU: a fresh GPU optimizer restored from the CPU's state continues exactly as the CPU does.
  gpu::GpuAdamW restored(arena.params(), config, nullptr);
  restored.load_state(as_file(cpu_opt.state(), "cpu state"));
  EXPECT_EQ(restored.steps_taken(), 2);
  step_both(cpu_opt, restored, 2);
  expect_same_state("cpu -> gpu, one more step", cpu, cpu_opt, arena, restored, given);
}

TEST_F(GpuAdamWTest, BadStateIsRefusedWithTheCpusMessageAndChangesNothing) {
  std::mt19937_64 rng(run_seed() + 13);
  Params cpu = test_params(rng);
  DeviceArena arena(cpu, kLayout);
  AdamWConfig config;
  AdamW cpu_opt(cpu, config);
  gpu::GpuAdamW gpu_opt(arena.params(), config, nullptr);
  auto message = [](auto& opt, const SafeTensors& st) -> std::string {
    try {
      opt.load_state(st);
    } catch (const Error& e) {
      return e.what();
    }
    return "";
  };
  auto bad_shape = as_file(cpu_opt.state(), "bad.safetensors");
  bad_shape.tensors.at("optimizer.exp_avg.e.matrix") = Tensor({64, 128}, DType::BF16);
  auto extra = as_file(cpu_opt.state(), "extra.safetensors");
  extra.tensors.emplace("optimizer.exp_avg.d.bias", Tensor({16}, DType::BF16));  // a frozen parameter
  auto no_step = as_file(cpu_opt.state(), "nostep.safetensors");
  no_step.tensors.erase("optimizer.step");
  for (const SafeTensors* st : {&bad_shape, &extra, &no_step}) {
    const std::string want = message(cpu_opt, *st), got = message(gpu_opt, *st);
    EXPECT_FALSE(want.empty()) << st->source;
    EXPECT_EQ(got, want) << st->source;
  }
  EXPECT_EQ(gpu_opt.steps_taken(), 0);
  EXPECT_THROW((void)gpu::GpuAdamW(arena.params(), AdamWConfig{.lr = -1}, nullptr), Error);
}

// cuda::clip_factor on the device gives the host's factor bit for bit: 1 at or below the limit or with clipping off,
// (float)(max_norm / norm) above it, NaN (a skipped step) for an infinite or NaN norm.
TEST_F(GpuAdamWTest, DeviceClipFactorIsTheHostsFloatAndNanForANonFiniteNorm) {
  using gpu_test::DeviceBuffer;
  std::mt19937_64 rng(run_seed() + 73);
  std::uniform_real_distribution<double> sq(1e-6, 1e6);
  std::vector<double> sums{1.0, 0.25, 4.0, 0.0, std::numeric_limits<double>::infinity(),
                           std::numeric_limits<double>::quiet_NaN()};
  for (int i = 0; i < 200; ++i) sums.push_back(sq(rng));
  DeviceBuffer<double> d_sum(1);
  DeviceBuffer<float> d_factor(1);
  for (const double max_norm : {1.0, 0.3, 0.0}) {
    for (const double sum : sums) {
      d_sum.upload({sum});
      cuda::clip_factor(d_sum.get(), max_norm, d_factor.get());
      const float got = d_factor.download()[0];
      const double norm = std::sqrt(sum);
      if (!std::isfinite(norm)) {
        EXPECT_TRUE(std::isnan(got)) << "sum " << sum;
        continue;
      }
      const float want = max_norm > 0 && norm > max_norm ? static_cast<float>(max_norm / norm) : 1.0f;
      EXPECT_EQ(std::memcmp(&got, &want, sizeof(float)), 0) << "sum " << sum << ", max_norm " << max_norm;
    }
  }
  EXPECT_THROW(cuda::clip_factor(nullptr, 1.0, d_factor.get()), Error);
}

// cuda::AdamWFp8Copies (the update of weights and their FP8 copies in one pass) against the two passes it replaces:
// the weights and moments of cuda::adamw_step and the codes, block scales and transposed codes of
// fp8::cuda::quantize_128x128_placed on the updated weights, bit for bit. Shapes: a stack of 3 matrices with partial
// 128x128 blocks both ways (208 x 200), and two stacks placed into one wider matrix's codes and transposed codes
// (the routed experts' gate and up, 176 rows each padded to 256): the bytes between them, which neither writes,
// keep their poison.
TEST_F(GpuAdamWTest, FusedFp8UpdateGivesTheUpdateThenTheQuantizationOfItsResult) {
  using gpu_test::DeviceBuffer;
  std::mt19937_64 rng(run_seed() + 71);
  struct Shape {
    int64_t batch, rows, cols;
  };
  const Shape stack{3, 208, 200}, half{2, 176, 256};
  const int64_t Ip = 256, n_stack = stack.batch * stack.rows * stack.cols, n_half = half.batch * half.rows * half.cols;
  const int64_t n = n_stack + 2 * n_half;
  std::vector<float> w(static_cast<size_t>(n)), g(w.size());
  std::vector<uint16_t> m(w.size()), v(w.size());
  std::normal_distribution<float> normal(0.0f, 1.0f);
  for (size_t i = 0; i < w.size(); ++i) {
    w[i] = 0.05f * normal(rng);
    g[i] = normal(rng);
    m[i] = bf16_from_float(0.1f * normal(rng));
    v[i] = bf16_from_float(0.01f * std::abs(normal(rng)));
  }
  const double lr = 1e-3, beta1 = 0.9, beta2 = 0.95, eps = 1e-8, decay = 0.1;
  const int64_t t = 3;
  const float clip = 0.5f;
  // Codes: the stack's [3, 208, 200] and [3, 200, 208]; the pair's [2, 2 Ip, 256] and [2, 256, 2 Ip].
  const int64_t codes_bytes = n_stack + half.batch * 2 * Ip * half.cols;
  const int64_t scale_count = stack.batch * fp8::tiles(stack.rows) * fp8::tiles(stack.cols) +
                              2 * half.batch * fp8::tiles(half.rows) * fp8::tiles(half.cols);
  struct Outputs {  // the inputs uploaded, the codes poisoned with 0x5A and the scales with NaN
    Outputs(const std::vector<float>& w0, const std::vector<float>& g0, const std::vector<uint16_t>& m0,
            const std::vector<uint16_t>& v0, int64_t codes_bytes, int64_t scale_count)
        : w(w0), g(g0), m(m0), v(v0), codes(codes_bytes), codes_t(codes_bytes), scales(scale_count) {
      codes.fill_bytes(0x5A), codes_t.fill_bytes(0x5A), scales.poison();
    }
    DeviceBuffer<float> w, g;
    DeviceBuffer<uint16_t> m, v;
    DeviceBuffer<uint8_t> codes, codes_t;
    DeviceBuffer<float> scales;
  };
  auto make = [&] { return std::make_unique<Outputs>(w, g, m, v, codes_bytes, scale_count); };
  const auto want = make(), got = make();
  // The copies over one set of buffers: the stack, then gate and up placed side by side.
  auto copies = [&](Outputs& o) {
    const fp8::cuda::Fp8Placement pair{2 * Ip * half.cols, 2 * Ip, half.cols * 2 * Ip};
    const int64_t s1 = stack.batch * fp8::tiles(stack.rows) * fp8::tiles(stack.cols);
    const int64_t s2 = half.batch * fp8::tiles(half.rows) * fp8::tiles(half.cols);
    auto at = [&](int64_t off, const Shape& sh, uint8_t* codes, float* scales, uint8_t* codes_t,
                  fp8::cuda::Fp8Placement p) {
      return cuda::AdamWFp8Copy{o.w.get(off), o.g.get(off), o.m.get(off), o.v.get(off),
                                {sh.batch, sh.rows, sh.cols, codes, scales, codes_t, p, {}}};
    };
    uint8_t* pc = o.codes.get(n_stack);
    uint8_t* pt = o.codes_t.get(n_stack);
    return std::vector<cuda::AdamWFp8Copy>{
        at(0, stack, o.codes.get(), o.scales.get(), o.codes_t.get(), {}),
        at(n_stack, half, pc, o.scales.get(s1), pt, pair),
        at(n_stack + n_half, half, pc + Ip * half.cols, o.scales.get(s1 + s2), pt + Ip, pair)};
  };
  cuda::adamw_step(want->w.get(), want->g.get(), want->m.get(), want->v.get(), n, lr, beta1, beta2, eps, decay, t,
                   nullptr, clip);
  for (const cuda::AdamWFp8Copy& c : copies(*want)) {
    const fp8::cuda::Fp8WeightCodes& o = c.out;
    fp8::cuda::quantize_128x128_placed(c.w, o.batch, o.rows, o.cols, o.codes, o.block_scales, o.codes_t, o.at);
  }
  std::vector<cuda::AdamWFp8Copy> fused = copies(*got);
  // The fused update also fills the GEMMs' scale layouts (NaN-poisoned): the stack's [2, 4] and [2, 4] a matrix
  // (2 x 2 blocks, rows padded to 4 entries), the pair's gate_up_scales_kernel layouts [4, 4] (gate's block rows,
  // then up's) and [2, 4] (gate's blocks, then up's, in each row).
  DeviceBuffer<float> gemm_sw(3 * 8 + 2 * 16), gemm_st(3 * 8 + 2 * 8);
  gemm_sw.poison(), gemm_st.poison();
  fused[0].out.gemm_scales = {gemm_sw.get(), gemm_st.get(), 4, 8, 4, 8};
  fused[1].out.gemm_scales = {gemm_sw.get(24), gemm_st.get(24), 4, 16, 4, 8};
  fused[2].out.gemm_scales = {gemm_sw.get(24 + 8), gemm_st.get(24 + 2), 4, 16, 4, 8};
  for (const cuda::AdamWFp8Copy& c : fused) EXPECT_TRUE(cuda::AdamWFp8Copies::fits(c));
  cuda::AdamWFp8Copies(fused).update(cuda::AdamWUpdate{lr, beta1, beta2, eps, decay, t, clip});
  CUDA_CHECK(cudaDeviceSynchronize());
  auto same = [](const auto& a, const auto& b) {
    return a.size() == b.size() && std::equal(a.begin(), a.end(), b.begin());
  };
  const std::vector<float> w_want = want->w.download(), w_got = got->w.download();
  EXPECT_EQ(std::memcmp(w_want.data(), w_got.data(), w_want.size() * sizeof(float)), 0) << "weights";
  EXPECT_NE(std::memcmp(w_want.data(), w.data(), w.size() * sizeof(float)), 0) << "the update moved nothing";
  EXPECT_TRUE(same(want->m.download(), got->m.download())) << "first moments";
  EXPECT_TRUE(same(want->v.download(), got->v.download())) << "second moments";
  EXPECT_TRUE(same(want->codes.download(), got->codes.download())) << "codes";
  EXPECT_TRUE(same(want->codes_t.download(), got->codes_t.download())) << "transposed codes";
  const std::vector<float> s_want = want->scales.download(), s_got = got->scales.download();
  EXPECT_EQ(std::memcmp(s_want.data(), s_got.data(), s_want.size() * sizeof(float)), 0) << "block scales";
  // Each block's scale at its two GEMM entries; the padding entries (the preparer's) untouched.
  std::vector<float> sw_want(gemm_sw.size(), std::numeric_limits<float>::quiet_NaN()), st_want = sw_want;
  st_want.resize(gemm_st.size());
  int64_t block = 0;  // the blocks in s_want's order: the stack's, then gate's, then up's
  for (const cuda::AdamWFp8Copy& f : fused) {
    const fp8::cuda::Fp8WeightCodes& c = f.out;
    const fp8::cuda::Fp8GemmScales& s = c.gemm_scales;
    for (int64_t e = 0; e < c.batch; ++e)
      for (int64_t bi = 0; bi < fp8::tiles(c.rows); ++bi)
        for (int64_t bj = 0; bj < fp8::tiles(c.cols); ++bj, ++block) {
          sw_want[static_cast<size_t>(s.sw - gemm_sw.get() + e * s.sw_stride + bi * s.sw_ld + bj)] = s_want[block];
          st_want[static_cast<size_t>(s.st - gemm_st.get() + e * s.st_stride + bj * s.st_ld + bi)] = s_want[block];
        }
  }
  auto same_or_both_nan = [](const std::vector<float>& a, const std::vector<float>& b) {
    for (size_t i = 0; i < a.size(); ++i)
      if (!(a[i] == b[i] || (std::isnan(a[i]) && std::isnan(b[i])))) return false;
    return a.size() == b.size();
  };
  EXPECT_TRUE(same_or_both_nan(gemm_sw.download(), sw_want)) << "the GEMMs' block scales";
  EXPECT_TRUE(same_or_both_nan(gemm_st.download(), st_want)) << "the GEMMs' transposed block scales";
  // A copy that does not fit is refused with its shape named.
  cuda::AdamWFp8Copy bad = fused[0];
  bad.out.cols = 202;
  EXPECT_FALSE(cuda::AdamWFp8Copies::fits(bad));
  EXPECT_THROW(cuda::AdamWFp8Copies({bad}), Error);
}

// Information, not an assertion: one step (norm, clip, update) over 128 tensors of 1M parameters lying back to
// back, as a model's do.
TEST_F(GpuAdamWTest, PrintsTheStepTimeOnA128MParameterModel) {
  const int64_t tensors = 128, per = int64_t{1} << 20, n = tensors * per;
  void* raw = nullptr;
  CUDA_CHECK(cudaMalloc(&raw, 2 * static_cast<size_t>(n) * sizeof(float)));
  float* w = static_cast<float*>(raw);
  float* g = w + n;
  CUDA_CHECK(cudaMemset(w, 0x3C, static_cast<size_t>(n) * sizeof(float)));  // 0.0115 each
  CUDA_CHECK(cudaMemset(g, 0x3A, static_cast<size_t>(n) * sizeof(float)));  // 7.1e-4 each: norm 8, clipped
  std::vector<gpu::DeviceParam> params;
  for (int64_t i = 0; i < tensors; ++i) {
    char name[32];
    std::snprintf(name, sizeof name, "w%03lld", static_cast<long long>(i));
    params.push_back({name, {1024, 1024}, w + i * per, g + i * per, per, true});
  }
  {
    gpu::GpuAdamW opt(params, AdamWConfig{}, nullptr);
    for (int i = 0; i < 3; ++i) opt.step(i);
    std::vector<double> ms;
    for (int i = 0; i < 10; ++i) {
      const auto t0 = std::chrono::steady_clock::now();
      opt.step(3 + i);
      CUDA_CHECK(cudaDeviceSynchronize());
      ms.push_back(std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count());
    }
    std::sort(ms.begin(), ms.end());
    // Bytes: norm reads g (4), clip reads and writes g (8), the update reads w, g, m, v and writes w, m, v (20).
    std::printf("  timing: GpuAdamW step, 128 x 1M params: %.3f ms median (%.0f GB/s)\n", ms[5],
                32.0 * static_cast<double>(n) / (ms[5] * 1e-3) / 1e9);
  }
  CUDA_CHECK(cudaFree(raw));
}

}  // namespace
}  // namespace moerl
