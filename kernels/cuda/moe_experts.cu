// Routed experts forward in BF16 on cuBLASLt (see kernels/cuda/moe_experts.hpp). The GEMMs are row-major
// Y[M, N] = X[M, K] · W[N, K]ᵀ through cuda_detail::LtMatmul (kernels/cuda/cublaslt_matmul.hpp).
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <string>

#include "kernels/cuda/cublaslt_matmul.hpp"
#include "kernels/cuda/cuda_check.hpp"
#include "kernels/cuda/moe_experts.hpp"
#include "kernels/cuda/stream_scratch.hpp"
#include "runtime/error.hpp"

namespace moerl::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kMaxBlocks = 8192;  // grid-stride loops: enough blocks to fill the GPU several times over
constexpr uint32_t kAlignment = 16;  // bytes every operand start is guaranteed (H, I multiples of 8)

__device__ __forceinline__ uint16_t bf16_bits(float v) { return __bfloat16_as_ushort(__float2bfloat16_rn(v)); }

__global__ void __launch_bounds__(kThreads) to_bf16_kernel(const float* __restrict__ x, int64_t n, bool vec,
                                                           uint16_t* __restrict__ y) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kThreads;
  const int64_t first = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (vec) {  // 4 values: one 16-byte load, one 8-byte store
    for (int64_t i = first; i < n / 4; i += stride) {
      const float4 v = reinterpret_cast<const float4*>(x)[i];
      const uint2 packed = make_uint2(bf16_bits(v.x) | (uint32_t{bf16_bits(v.y)} << 16),
                                      bf16_bits(v.z) | (uint32_t{bf16_bits(v.w)} << 16));
      reinterpret_cast<uint2*>(y)[i] = packed;
    }
  } else {
    for (int64_t i = first; i < n; i += stride) y[i] = bf16_bits(x[i]);
  }
}

__global__ void __launch_bounds__(kThreads) round_bf16_kernel(float* __restrict__ x, int64_t n) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kThreads;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; i < n; i += stride)
    x[i] = __bfloat162float(__float2bfloat16_rn(x[i]));
}

// gu [rows, 2I] (gate then up, FP32) -> h [rows, I] BF16 = silu(g) · u, silu(g) = g / (1 + exp(-g)) as the CPU.
__global__ void __launch_bounds__(kThreads) swiglu_bf16_kernel(const float* __restrict__ gu, int64_t rows, int64_t inter,
                                                               uint16_t* __restrict__ h) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kThreads;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; i < rows * inter; i += stride) {
    const int64_t r = i / inter, c = i % inter;
    const float g = gu[r * 2 * inter + c], u = gu[r * 2 * inter + inter + c];
    h[i] = bf16_bits(g / (1.0f + expf(-g)) * u);
  }
}

unsigned blocks_for(int64_t items) {
  return static_cast<unsigned>(std::max<int64_t>(1, std::min<int64_t>((items + kThreads - 1) / kThreads, kMaxBlocks)));
}

}  // namespace

void to_bf16(const float* x, int64_t n, uint16_t* y, cudaStream_t stream) {
  require(n >= 0, [&] { return "cuda::to_bf16: n must be >= 0, got " + std::to_string(n); });
  if (n == 0) return;
  require(x && y, "cuda::to_bf16: null x or y pointer");
  const bool vec = n % 4 == 0 && reinterpret_cast<uintptr_t>(x) % 16 == 0 && reinterpret_cast<uintptr_t>(y) % 8 == 0;
  to_bf16_kernel<<<blocks_for(vec ? n / 4 : n), kThreads, 0, stream>>>(x, n, vec, y);
  CUDA_CHECK_LAUNCH();
}

void round_to_bf16(float* x, int64_t n, cudaStream_t stream) {
  require(n >= 0 && (n == 0 || x != nullptr), "cuda::round_to_bf16: needs n >= 0 and x set");
  if (n == 0) return;
  round_bf16_kernel<<<blocks_for(n), kThreads, 0, stream>>>(x, n);
  CUDA_CHECK_LAUNCH();
}

void zero_expert_grads(float* gate_grad, float* up_grad, float* down_grad, int64_t E, int64_t I, int64_t H,
                       const int64_t* offsets_host, cudaStream_t stream, int64_t gate_up_stride) {
  require(gate_grad && up_grad && down_grad && offsets_host, "cuda::zero_expert_grads: null pointer");
  const int64_t each = I * H, gs = gate_up_stride != 0 ? gate_up_stride : each;
  require(gs == each || (gs == 2 * each && up_grad == gate_grad + each), [&] {
    return "cuda::zero_expert_grads: gate_up_stride must be I * H (stacked apart) or 2 * I * H with up_grad = "
           "gate_grad + I * H (interleaved), got " + std::to_string(gate_up_stride);
  });
  auto empty = [&](int64_t e) { return offsets_host[e + 1] == offsets_host[e]; };
  for (int64_t e = 0; e < E;) {
    if (!empty(e)) {
      ++e;
      continue;
    }
    int64_t end = e + 1;
    while (end < E && empty(end)) ++end;
    const size_t bytes = static_cast<size_t>((end - e) * each) * sizeof(float);
    if (gs == each) {
      for (float* g : {gate_grad, up_grad}) CUDA_CHECK(cudaMemsetAsync(g + e * each, 0, bytes, stream));
    } else {  // interleaved: the run's gate and up gradients are one range
      CUDA_CHECK(cudaMemsetAsync(gate_grad + e * gs, 0, 2 * bytes, stream));
    }
    CUDA_CHECK(cudaMemsetAsync(down_grad + e * each, 0, bytes, stream));
    e = end;
  }
}

struct MoeExpertsGemm::Impl {
  // Every operand start is 16-byte aligned (checked in forward): plans assume no more, so one plan per shape.
  explicit Impl(size_t workspace_bytes)
      : lt("cuda::MoeExpertsGemm", workspace_bytes, kMaxPlans, kAlignment) {}
  cuda_detail::LtMatmul lt;

  // y [m, n] FP32 = x [m, k] · w [n, k]ᵀ, BF16 operands.
  void matmul(const uint16_t* x, const uint16_t* w, float* y, int64_t m, int64_t n, int64_t k, cudaStream_t stream) {
    lt.gemm(false, true, m, n, k, cuda_detail::LtInput::BF16, x, k, w, k, 0.0f, y, n, stream);
  }
};

MoeExpertsGemm::MoeExpertsGemm(size_t workspace_bytes) : impl_(std::make_unique<Impl>(workspace_bytes)) {}

MoeExpertsGemm::~MoeExpertsGemm() = default;

size_t MoeExpertsGemm::cached_plans() const { return impl_->lt.cached_plans(); }

void MoeExpertsGemm::forward(const MoeExpertWeights& w, const float* xp, const int64_t* offsets_host, float* yp,
                             cudaStream_t stream) {
  const std::string where = "cuda::MoeExpertsGemm::forward";
  const int64_t E = w.experts, H = w.hidden, I = w.inter;
  require(E > 0 && H > 0 && I > 0, [&] {
    return where + ": experts, hidden and inter must be > 0, got " + std::to_string(E) + ", " + std::to_string(H) +
           ", " + std::to_string(I);
  });
  require(H % 8 == 0 && I % 8 == 0, [&] {
    return where +
           ": hidden and inter must be multiples of 8 (BF16 rows 16-byte "
           "aligned), got " +
           std::to_string(H) + " and " + std::to_string(I);
  });
  require(offsets_host != nullptr, [&] { return where + ": null offsets_host"; });
  require(offsets_host[0] == 0,
          [&] { return where + ": offsets[0] must be 0, got " + std::to_string(offsets_host[0]); });
  for (int64_t e = 0; e < E; ++e)
    require(offsets_host[e + 1] >= offsets_host[e], [&] {
      return where + ": offsets must not decrease, offsets[" + std::to_string(e + 1) + "] < offsets[" +
             std::to_string(e) + "]";
    });
  const int64_t R = offsets_host[E];
  if (R == 0) return;
  auto aligned = [](const void* p) { return reinterpret_cast<uintptr_t>(p) % kAlignment == 0; };
  require(w.gate_up && w.down && xp && yp && aligned(w.gate_up) && aligned(w.down) && aligned(xp) && aligned(yp),
          [&] { return where + ": gate_up, down, xp and yp must be non-null, 16-byte aligned device pointers"; });
  Impl& m = *impl_;
  int device = -1;
  CUDA_CHECK(cudaGetDevice(&device));
  require(device == m.lt.device(), [&] {
    return where + ": the context belongs to device " + std::to_string(m.lt.device()) + " but device " +
           std::to_string(device) + " is current";
  });

  const size_t xb_bytes = cuda_detail::align256(static_cast<size_t>(R * H) * 2);
  const size_t gu_bytes = cuda_detail::align256(static_cast<size_t>(R * 2 * I) * 4);
  cuda_detail::StreamScratch scratch(xb_bytes + gu_bytes + static_cast<size_t>(R * I) * 2, stream);
  uint16_t* xb = scratch.as<uint16_t>();
  float* gu = scratch.as<float>(xb_bytes);
  uint16_t* hb = scratch.as<uint16_t>(xb_bytes + gu_bytes);
  require(aligned(xb), where + ": the stream-ordered pool returned scratch that is not 16-byte aligned");

  to_bf16(xp, R * H, xb, stream);
  for (int64_t e = 0; e < E; ++e) {
    const int64_t r0 = offsets_host[e], n = offsets_host[e + 1] - r0;
    if (n > 0) m.matmul(xb + r0 * H, w.gate_up + e * 2 * I * H, gu + r0 * 2 * I, n, 2 * I, H, stream);
  }
  swiglu_bf16_kernel<<<blocks_for(R * I), kThreads, 0, stream>>>(gu, R, I, hb);
  CUDA_CHECK_LAUNCH();
  for (int64_t e = 0; e < E; ++e) {
    const int64_t r0 = offsets_host[e], n = offsets_host[e + 1] - r0;
    if (n > 0) m.matmul(hb + r0 * I, w.down + e * H * I, yp + r0 * H, n, H, I, stream);
  }
  scratch.release();
}

}  // namespace moerl::cuda
