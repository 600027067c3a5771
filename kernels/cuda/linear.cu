// GPU linear layers (kernels/cuda/linear.hpp): the context and its prepared weights, argument checks, and the
// FP32 and BF16 recipes, each GEMM the same call as in kernels/cpu/linear.cpp (cpu::sgemm's arguments) on
// cuda_detail::LtMatmul. The FP8 recipe is in linear_fp8.cu.
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <map>
#include <optional>
#include <string>
#include <vector>

#include "kernels/cuda/cublaslt_matmul.hpp"
#include "kernels/cuda/cuda_check.hpp"
#include "kernels/cuda/linear.hpp"
#include "kernels/cuda/linear_impl.cuh"
#include "kernels/cuda/moe_experts.hpp"
#include "kernels/cuda/stream_scratch.hpp"
#include "runtime/error.hpp"

namespace moerl::cuda {
namespace {

using cuda_detail::LtInput;
using cuda_detail::StreamScratch;
using linear_detail::PreparedWeight;

bool known(Precision p) { return p == Precision::FP32 || p == Precision::BF16 || p == Precision::FP8; }

std::string shape(int64_t M, int64_t N, int64_t K) {
  return "M=" + std::to_string(M) + ", N=" + std::to_string(N) + ", K=" + std::to_string(K);
}

void check_common(const std::string& fn, Precision p, int64_t M, int64_t N, int64_t K) {
  require(known(p), [&] { return fn + ": unknown precision " + std::to_string(static_cast<int>(p)); });
  require(M >= 0 && N >= 0 && K >= 0, [&] { return fn + ": sizes must be >= 0, got " + shape(M, N, K); });
}

size_t bytes16(int64_t n) { return static_cast<size_t>(n) * sizeof(uint16_t); }

}  // namespace

LinearContext::Impl::Impl() : lt("cuda::linear") { CUDA_CHECK(cudaGetDevice(&device)); }

void LinearContext::Impl::check_device(const char* fn) const {
  int current = -1;
  CUDA_CHECK(cudaGetDevice(&current));
  require(current == device, [&] {
    return std::string(fn) + ": the LinearContext belongs to device " + std::to_string(device) + " but device " +
           std::to_string(current) + " is current";
  });
}

PreparedWeight& LinearContext::Impl::entry(const float* w, int64_t N, int64_t K, Precision p, size_t bytes,
                                           int64_t batch, const float* second) {
  const auto [it, inserted] = weights.try_emplace(linear_detail::WeightKey{w, N, K, p, batch, second});
  if (inserted) {
    try {
      it->second.memory = linear_detail::DeviceAllocation(bytes);
    } catch (...) {
      weights.erase(it);
      throw;
    }
  }
  return it->second;
}

const uint16_t* LinearContext::Impl::bf16_weight(const float* w, int64_t N, int64_t K, cudaStream_t stream) {
  PreparedWeight& pw = entry(w, N, K, Precision::BF16, bytes16(N * K));
  if (pw.generation != generation) {
    to_bf16(w, N * K, pw.memory.as<uint16_t>(), stream);
    pw.generation = generation;
  }
  return pw.memory.as<uint16_t>();
}

LinearContext::LinearContext() : impl_(std::make_unique<Impl>()) {}
LinearContext::~LinearContext() = default;

void LinearContext::weights_changed() { ++impl_->generation; }

void LinearContext::weights_changed(const std::vector<Fp8WeightCopy>& refreshed, cudaStream_t stream) {
  Impl& c = *impl_;
  ++c.generation;
  std::map<const uint8_t*, bool> written;  // by codes: whether the writer also filled the GEMMs' scale entries
  for (const Fp8WeightCopy& r : refreshed) written[r.out.codes] = r.out.gemm_scales.sw != nullptr;
  for (auto& [key, pw] : c.weights) {
    if (pw.copies.empty() || pw.generation == 0) continue;
    const auto was_written = [&](const Fp8WeightCopy& x) { return written.count(x.out.codes) != 0; };
    if (!std::all_of(pw.copies.begin(), pw.copies.end(), was_written)) continue;
    const auto with_gemm_scales = [&](const Fp8WeightCopy& x) { return written.at(x.out.codes); };
    if (!std::all_of(pw.copies.begin(), pw.copies.end(), with_gemm_scales)) pw.finish_scales(stream);
    pw.generation = c.generation;
  }
}

std::vector<Fp8WeightCopy> LinearContext::fp8_weight_copies() const {
  std::vector<Fp8WeightCopy> out;
  for (const auto& [key, pw] : impl_->weights)
    if (pw.generation != 0) out.insert(out.end(), pw.copies.begin(), pw.copies.end());
  return out;
}

size_t LinearContext::prepared_bytes() const {
  size_t total = 0;
  for (const auto& [key, pw] : impl_->weights) total += pw.memory.bytes();
  return total;
}

void LinearContext::forget_weights() {
  // Work still queued may read the copies: cudaFree waits for the device before freeing.
  impl_->weights.clear();
}

const uint16_t* prepared_bf16_weight(LinearContext& ctx, const float* w, int64_t N, int64_t K, cudaStream_t stream) {
  require(N > 0 && K > 0 && w != nullptr, [&] {
    return "cuda::prepared_bf16_weight: needs N, K > 0 and a weight, got N=" + std::to_string(N) +
           ", K=" + std::to_string(K);
  });
  ctx.impl().check_device("cuda::prepared_bf16_weight");
  return ctx.impl().bf16_weight(w, N, K, stream);
}

PreparedFp8Weight prepared_fp8_weight(LinearContext& ctx, const float* w, int64_t N, int64_t K, cudaStream_t stream) {
  require(N > 0 && K > 0 && w != nullptr, [&] {
    return "cuda::prepared_fp8_weight: needs N, K > 0 and a weight, got N=" + std::to_string(N) +
           ", K=" + std::to_string(K);
  });
  ctx.impl().check_device("cuda::prepared_fp8_weight");
  return linear_detail::fp8_weight(ctx.impl(), w, N, K, stream);
}

PreparedFp8Stack prepared_fp8_stacked_weight(LinearContext& ctx, const float* w, int64_t experts, int64_t N,
                                             int64_t K, cudaStream_t stream) {
  require(experts > 0 && experts <= 65535 && N >= 128 && K >= 128 && N % 16 == 0 && K % 16 == 0 && w != nullptr, [&] {
    return "cuda::prepared_fp8_stacked_weight: needs 1 .. 65535 experts, N and K multiples of 16 and >= 128 and a "
           "weight, got experts=" +
           std::to_string(experts) + ", N=" + std::to_string(N) + ", K=" + std::to_string(K);
  });
  ctx.impl().check_device("cuda::prepared_fp8_stacked_weight");
  return linear_detail::fp8_stacked_weight(ctx.impl(), w, experts, N, K, stream);
}

PreparedFp8GateUp prepared_fp8_stacked_gate_up(LinearContext& ctx, const float* gate, const float* up,
                                               int64_t experts, int64_t I, int64_t H, cudaStream_t stream) {
  require(experts > 0 && experts <= 65535 && I >= 128 && H >= 128 && I % 16 == 0 && H % 16 == 0 && gate && up, [&] {
    return "cuda::prepared_fp8_stacked_gate_up: needs 1 .. 65535 experts, I and H multiples of 16 and >= 128 and both "
           "weights, got experts=" +
           std::to_string(experts) + ", I=" + std::to_string(I) + ", H=" + std::to_string(H);
  });
  ctx.impl().check_device("cuda::prepared_fp8_stacked_gate_up");
  return linear_detail::fp8_stacked_gate_up(ctx.impl(), gate, up, experts, I, H, stream);
}

namespace {

// y [M, N] = x16 · w16ᵀ: x already rounded to BF16 (bits), w rounded by the context's prepared copy.
void bf16_forward(LinearContext::Impl& c, const uint16_t* x16, const float* w, float* y, int64_t M, int64_t N,
                  int64_t K, cudaStream_t stream) {
  c.lt.gemm(false, true, M, N, K, LtInput::BF16, x16, K, c.bf16_weight(w, N, K, stream), K, 0.0f, y, N, stream);
}

// bf16_backward's two GEMMs with x already rounded (x16, needed with dw).
void bf16_backward_rounded(LinearContext::Impl& c, const uint16_t* dy16, int64_t ld_dy, const uint16_t* x16,
                           const float* w, float* dx, float* dw, int64_t M, int64_t N, int64_t K, float beta_dx,
                           float beta_dw, cudaStream_t stream) {
  if (dx != nullptr)
    c.lt.gemm(false, false, M, K, N, LtInput::BF16, dy16, ld_dy, c.bf16_weight(w, N, K, stream), K, beta_dx, dx, K,
              stream);
  if (dw != nullptr) c.lt.gemm(true, false, N, K, M, LtInput::BF16, dy16, ld_dy, x16, K, beta_dw, dw, K, stream);
}

}  // namespace

void linear_forward(LinearContext& ctx, Precision p, const float* x, const float* w, float* y, int64_t M, int64_t N,
                    int64_t K, cudaStream_t stream, SavedInput* keep) {
  const std::string fn = "cuda::linear_forward";
  if (keep != nullptr) keep->release();
  check_common(fn, p, M, N, K);
  if (M == 0 || N == 0) return;
  require(y != nullptr, [&] { return fn + ": null y (" + shape(M, N, K) + ")"; });
  LinearContext::Impl& c = ctx.impl();
  c.check_device(fn.c_str());
  if (K == 0) {  // an empty sum, as cpu::sgemm gives with beta = 0
    CUDA_CHECK(cudaMemsetAsync(y, 0, static_cast<size_t>(M * N) * sizeof(float), stream));
    return;
  }
  require(x != nullptr && w != nullptr, [&] { return fn + ": null x or w (" + shape(M, N, K) + ")"; });
  switch (p) {
    case Precision::FP32:
      c.lt.gemm(false, true, M, N, K, LtInput::FP32, x, K, w, K, 0.0f, y, N, stream);
      return;
    case Precision::BF16: {
      StreamScratch x16(bytes16(M * K), stream);
      to_bf16(x, M * K, x16.as<uint16_t>(), stream);
      bf16_forward(c, x16.as<uint16_t>(), w, y, M, N, K, stream);
      x16.release();
      return;
    }
    case Precision::FP8:
      linear_detail::fp8_forward(c, x, w, y, M, N, K, stream, keep);
      return;
  }
}

namespace {

// Releases a SavedInput when a backward returns, however it returns (it is taken once, or not at all).
struct ReleaseOnExit {
  SavedInput* saved;
  ~ReleaseOnExit() {
    if (saved != nullptr) saved->release();
  }
};

// dw [N, K] = 0: overwrite_dw with no tokens to sum over.
void zero_dw(float* dw, int64_t N, int64_t K, cudaStream_t stream) {
  if (N > 0 && K > 0) CUDA_CHECK(cudaMemsetAsync(dw, 0, static_cast<size_t>(N * K) * sizeof(float), stream));
}

// The BF16 backward from dy16 [M, N] (BF16 bits, row stride ld_dy): x (Wgrad) and w (Dgrad) rounded as well, as on
// the CPU (x16: x's rounding already made). dx or dw null: skipped.
void bf16_backward(LinearContext::Impl& c, const uint16_t* dy16, int64_t ld_dy, const float* x, const float* w,
                   float* dx, float* dw, int64_t M, int64_t N, int64_t K, float beta_dx, float beta_dw,
                   cudaStream_t stream, const uint16_t* x16 = nullptr) {
  if (dw == nullptr || x16 != nullptr)
    return bf16_backward_rounded(c, dy16, ld_dy, x16, w, dx, dw, M, N, K, beta_dx, beta_dw, stream);
  StreamScratch rounded(bytes16(M * K), stream);
  to_bf16(x, M * K, rounded.as<uint16_t>(), stream);
  bf16_backward_rounded(c, dy16, ld_dy, rounded.as<uint16_t>(), w, dx, dw, M, N, K, beta_dx, beta_dw, stream);
  rounded.release();
}

}  // namespace

void linear_backward_bf16_dy(LinearContext& ctx, const uint16_t* dy16, int64_t ld_dy, const float* x, const float* w,
                             float* dx, float* dw, int64_t M, int64_t N, int64_t K, cudaStream_t stream,
                             bool accumulate_dx, bool overwrite_dw, const uint16_t* x16) {
  const std::string fn = "cuda::linear_backward_bf16_dy";
  check_common(fn, Precision::BF16, M, N, K);
  require(ld_dy >= N,
          [&] { return fn + ": dy's row stride " + std::to_string(ld_dy) + " is below N (" + shape(M, N, K) + ")"; });
  const bool want_dx = dx != nullptr && M > 0 && K > 0, want_dw = dw != nullptr && M > 0 && N > 0 && K > 0;
  if (overwrite_dw && dw != nullptr && !want_dw) zero_dw(dw, N, K, stream);
  if (!want_dx && !want_dw) return;
  require(N > 0, [&] { return fn + ": needs N > 0 (" + shape(M, N, K) + ")"; });
  require(dy16 != nullptr, [&] { return fn + ": null dy (" + shape(M, N, K) + ")"; });
  require(!want_dx || w != nullptr, [&] { return fn + ": null w with dx requested (" + shape(M, N, K) + ")"; });
  require(!want_dw || x != nullptr || x16 != nullptr,
          [&] { return fn + ": null x and x16 with dw requested (" + shape(M, N, K) + ")"; });
  LinearContext::Impl& c = ctx.impl();
  c.check_device(fn.c_str());
  bf16_backward(c, dy16, ld_dy, x, w, want_dx ? dx : nullptr, want_dw ? dw : nullptr, M, N, K,
                accumulate_dx ? 1.0f : 0.0f, overwrite_dw ? 0.0f : 1.0f, stream, want_dw ? x16 : nullptr);
}

void linear_forward_bf16_out(LinearContext& ctx, const float* x, const float* w, uint16_t* y16, int64_t M, int64_t N,
                             int64_t K, cudaStream_t stream, uint16_t* x16_keep) {
  const std::string fn = "cuda::linear_forward_bf16_out";
  check_common(fn, Precision::BF16, M, N, K);
  if (M == 0 || N == 0) return;
  require(y16 != nullptr, [&] { return fn + ": null y16 (" + shape(M, N, K) + ")"; });
  LinearContext::Impl& c = ctx.impl();
  c.check_device(fn.c_str());
  if (K == 0) {  // an empty sum: zeros
    CUDA_CHECK(cudaMemsetAsync(y16, 0, static_cast<size_t>(M * N) * sizeof(uint16_t), stream));
    return;
  }
  require(x != nullptr && w != nullptr, [&] { return fn + ": null x or w (" + shape(M, N, K) + ")"; });
  std::optional<StreamScratch> scratch;
  if (x16_keep == nullptr) scratch.emplace(bytes16(M * K), stream);
  uint16_t* x16 = x16_keep != nullptr ? x16_keep : scratch->as<uint16_t>();
  to_bf16(x, M * K, x16, stream);
  c.lt.gemm_bf16_out(false, true, M, N, K, LtInput::BF16, x16, K, c.bf16_weight(w, N, K, stream), K, y16, N, stream);
  if (scratch) scratch->release();
}

void linear_backward(LinearContext& ctx, Precision p, const float* dy, const float* x, const float* w, float* dx,
                     float* dw, int64_t M, int64_t N, int64_t K, cudaStream_t stream, bool accumulate_dx,
                     bool overwrite_dw, SavedInput* saved) {
  const std::string fn = "cuda::linear_backward";
  const ReleaseOnExit release_saved{saved};
  check_common(fn, p, M, N, K);
  // dx [M, K] has elements when M, K > 0; dw [N, K] changes only when the token sum is not empty (M > 0).
  bool want_dx = dx != nullptr && M > 0 && K > 0;
  const bool want_dw = dw != nullptr && M > 0 && N > 0 && K > 0;
  if (overwrite_dw && dw != nullptr && !want_dw) zero_dw(dw, N, K, stream);  // no tokens: a zero gradient
  if (!want_dx && !want_dw) return;
  LinearContext::Impl& c = ctx.impl();
  c.check_device(fn.c_str());
  if (want_dx && N == 0) {  // dx = dy · w over an empty N: zero (nothing to add)
    if (!accumulate_dx) CUDA_CHECK(cudaMemsetAsync(dx, 0, static_cast<size_t>(M * K) * sizeof(float), stream));
    want_dx = false;
    if (!want_dw) return;
  }
  require(dy != nullptr, [&] { return fn + ": null dy (" + shape(M, N, K) + ")"; });
  require(!want_dx || w != nullptr, [&] { return fn + ": null w with dx requested (" + shape(M, N, K) + ")"; });
  require(!want_dw || x != nullptr, [&] { return fn + ": null x with dw requested (" + shape(M, N, K) + ")"; });
  const float beta_dx = accumulate_dx ? 1.0f : 0.0f, beta_dw = overwrite_dw ? 0.0f : 1.0f;
  switch (p) {
    case Precision::FP32:
      if (want_dx) c.lt.gemm(false, false, M, K, N, LtInput::FP32, dy, N, w, K, beta_dx, dx, K, stream);
      if (want_dw) c.lt.gemm(true, false, N, K, M, LtInput::FP32, dy, N, x, K, beta_dw, dw, K, stream);
      return;
    case Precision::BF16: {
      // dy rounded once for both GEMMs.
      StreamScratch scratch(bytes16(M * N), stream);
      uint16_t* dy16 = scratch.as<uint16_t>();
      to_bf16(dy, M * N, dy16, stream);
      bf16_backward(c, dy16, N, x, w, want_dx ? dx : nullptr, want_dw ? dw : nullptr, M, N, K, beta_dx, beta_dw,
                    stream);
      scratch.release();
      return;
    }
    case Precision::FP8:
      linear_detail::fp8_backward(c, dy, x, w, want_dx ? dx : nullptr, want_dw ? dw : nullptr, M, N, K, accumulate_dx,
                                  overwrite_dw, stream, saved);
      return;
  }
}

void linear_forward_shared(LinearContext& ctx, Precision p, const float* x, const std::vector<LinearOutput>& outs,
                           int64_t M, int64_t K, cudaStream_t stream, SavedInput* keep) {
  const std::string fn = "cuda::linear_forward_shared";
  if (keep != nullptr) keep->release();
  for (const LinearOutput& o : outs) check_common(fn, p, M, o.N, K);
  const auto edge = [](const LinearOutput& o) { return o.N == 0 || o.w == nullptr || o.y == nullptr; };
  const bool plain = p == Precision::FP32 || outs.size() < 2 || M == 0 || K == 0 || x == nullptr ||
                     std::any_of(outs.begin(), outs.end(), edge);
  if (plain) {  // nothing to share, or an edge case linear_forward handles (and names)
    for (const LinearOutput& o : outs) linear_forward(ctx, p, x, o.w, o.y, M, o.N, K, stream);
    return;
  }
  LinearContext::Impl& c = ctx.impl();
  c.check_device(fn.c_str());
  if (p == Precision::FP8) return linear_detail::fp8_forward_shared(c, x, outs, M, K, stream, keep);
  StreamScratch x16(bytes16(M * K), stream);  // BF16: x rounded once
  to_bf16(x, M * K, x16.as<uint16_t>(), stream);
  for (const LinearOutput& o : outs) bf16_forward(c, x16.as<uint16_t>(), o.w, o.y, M, o.N, K, stream);
  x16.release();
}

void linear_backward_shared(LinearContext& ctx, Precision p, const float* x, const std::vector<LinearGradient>& grads,
                            float* dx, int64_t M, int64_t K, cudaStream_t stream, bool accumulate_dx,
                            SavedInput* saved) {
  const std::string fn = "cuda::linear_backward_shared";
  const ReleaseOnExit release_saved{saved};
  for (const LinearGradient& g : grads) check_common(fn, p, M, g.N, K);
  const auto edge = [](const LinearGradient& g) {
    return g.N == 0 || g.dy == nullptr || g.w == nullptr || g.dw == nullptr;
  };
  const bool plain = p == Precision::FP32 || grads.size() < 2 || M == 0 || K == 0 || x == nullptr || dx == nullptr ||
                     std::any_of(grads.begin(), grads.end(), edge);
  if (plain) {  // nothing to share, or an edge case linear_backward handles (and names)
    for (size_t i = 0; i < grads.size(); ++i) {
      const LinearGradient& g = grads[i];
      linear_backward(ctx, p, g.dy, x, g.w, dx, g.dw, M, g.N, K, stream, accumulate_dx || i > 0, g.overwrite_dw);
    }
    return;
  }
  LinearContext::Impl& c = ctx.impl();
  c.check_device(fn.c_str());
  if (p == Precision::FP8)
    return linear_detail::fp8_backward_shared(c, x, grads, dx, M, K, accumulate_dx, stream, saved);
  // BF16: x rounded once for every Wgrad, each dy once for its two GEMMs (bf16_backward's products).
  StreamScratch x16(bytes16(M * K), stream);
  to_bf16(x, M * K, x16.as<uint16_t>(), stream);
  for (size_t i = 0; i < grads.size(); ++i) {
    const LinearGradient& g = grads[i];
    StreamScratch dy16(bytes16(M * g.N), stream);
    to_bf16(g.dy, M * g.N, dy16.as<uint16_t>(), stream);
    bf16_backward_rounded(c, dy16.as<uint16_t>(), g.N, x16.as<uint16_t>(), g.w, dx, g.dw, M, g.N, K,
                          accumulate_dx || i > 0 ? 1.0f : 0.0f, g.overwrite_dw ? 0.0f : 1.0f, stream);
    dy16.release();
  }
  x16.release();
}

}  // namespace moerl::cuda
