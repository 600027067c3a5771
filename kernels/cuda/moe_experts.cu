// Routed experts forward in BF16 on cuBLASLt (see kernels/cuda/moe_experts.hpp).
// Row-major Y[M, N] = X[M, K] · W[N, K]ᵀ is, in cuBLAS's column-major terms, D (N x M, ld N) = Wᵀ-op(A) · B with
// A = W seen as K x N (ld K, transposed) and B = X seen as K x M (ld K): the "TN" form, both operands K-major.
#include <cublasLt.h>
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <map>
#include <mutex>
#include <string>
#include <tuple>

#include "kernels/cuda/cuda_check.hpp"
#include "kernels/cuda/moe_experts.hpp"
#include "kernels/cuda/stream_scratch.hpp"
#include "runtime/error.hpp"

namespace moerl::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kMaxBlocks = 8192;  // grid-stride loops: enough blocks to fill the GPU several times over
constexpr int kMaxHeuristicResults = 8;
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

struct Plan {
  cublasLtMatrixLayout_t a = nullptr, b = nullptr, d = nullptr;
  cublasLtMatmulAlgo_t algo{};
};

void destroy(Plan& p) {
  if (p.d) cublasLtMatrixLayoutDestroy(p.d);
  if (p.b) cublasLtMatrixLayoutDestroy(p.b);
  if (p.a) cublasLtMatrixLayoutDestroy(p.a);
  p = Plan{};
}

std::string shape_name(int64_t m, int64_t n, int64_t k) {
  return "BF16 GEMM " + std::to_string(m) + "x" + std::to_string(n) + "x" + std::to_string(k) + " (FP32 out)";
}

}  // namespace

void to_bf16(const float* x, int64_t n, uint16_t* y, cudaStream_t stream) {
  require(n >= 0, "cuda::to_bf16: n must be >= 0, got " + std::to_string(n));
  if (n == 0) return;
  require(x && y, "cuda::to_bf16: null x or y pointer");
  const bool vec = n % 4 == 0 && reinterpret_cast<uintptr_t>(x) % 16 == 0 && reinterpret_cast<uintptr_t>(y) % 8 == 0;
  to_bf16_kernel<<<blocks_for(vec ? n / 4 : n), kThreads, 0, stream>>>(x, n, vec, y);
  CUDA_CHECK_LAUNCH();
}

struct MoeExpertsGemm::Impl {
  int device = 0;
  cublasLtHandle_t handle = nullptr;
  cublasLtMatmulDesc_t desc = nullptr;  // BF16 x BF16 -> FP32, FP32 compute, A transposed: shared by every plan
  void* workspace = nullptr;
  size_t workspace_bytes = 0;
  mutable std::mutex mutex;
  std::map<std::tuple<int64_t, int64_t, int64_t>, Plan> plans;  // (M, N, K)

  ~Impl() {
    clear();
    if (desc) cublasLtMatmulDescDestroy(desc);
    if (workspace) cudaFree(workspace);
    if (handle) cublasLtDestroy(handle);
  }
  void clear() {
    for (auto& [key, plan] : plans) destroy(plan);
    plans.clear();
  }

  const Plan& plan(int64_t m, int64_t n, int64_t k);
  // y [m, n] FP32 = x [m, k] · w [n, k]ᵀ, BF16 operands.
  void matmul(const uint16_t* x, const uint16_t* w, float* y, int64_t m, int64_t n, int64_t k, cudaStream_t stream);
};

const Plan& MoeExpertsGemm::Impl::plan(int64_t m, int64_t n, int64_t k) {
  const auto key = std::make_tuple(m, n, k);
  if (auto it = plans.find(key); it != plans.end()) return it->second;
  if (plans.size() >= kMaxPlans) clear();  // row counts vary from step to step: keep the cache bounded
  Plan p;
  cublasLtMatmulPreference_t pref = nullptr;
  try {
    CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&p.a, CUDA_R_16BF, static_cast<uint64_t>(k), static_cast<uint64_t>(n), k));
    CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&p.b, CUDA_R_16BF, static_cast<uint64_t>(k), static_cast<uint64_t>(m), k));
    CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&p.d, CUDA_R_32F, static_cast<uint64_t>(n), static_cast<uint64_t>(m), n));
    CUBLAS_CHECK(cublasLtMatmulPreferenceCreate(&pref));
    const uint64_t ws = workspace_bytes;
    CUBLAS_CHECK(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &ws, sizeof ws));
    for (auto attr : {CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES,
                      CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES})
      CUBLAS_CHECK(cublasLtMatmulPreferenceSetAttribute(pref, attr, &kAlignment, sizeof kAlignment));
    cublasLtMatmulHeuristicResult_t results[kMaxHeuristicResults] = {};
    int found = 0;
    const cublasStatus_t st = cublasLtMatmulAlgoGetHeuristic(handle, desc, p.a, p.b, p.d, p.d, pref,
                                                             kMaxHeuristicResults, results, &found);
    int chosen = -1;
    for (int i = 0; i < found && chosen < 0; ++i)
      if (results[i].state == CUBLAS_STATUS_SUCCESS) chosen = i;
    require(st == CUBLAS_STATUS_SUCCESS && chosen >= 0,
            std::string("cuda::MoeExpertsGemm: cuBLASLt has no algorithm (") + cublasLtGetStatusName(st) + ") for " +
                shape_name(m, n, k));
    p.algo = results[chosen].algo;
    CUBLAS_CHECK(cublasLtMatmulPreferenceDestroy(pref));
  } catch (...) {
    if (pref) cublasLtMatmulPreferenceDestroy(pref);
    destroy(p);
    throw;
  }
  return plans.emplace(key, p).first->second;
}

void MoeExpertsGemm::Impl::matmul(const uint16_t* x, const uint16_t* w, float* y, int64_t m, int64_t n, int64_t k,
                                  cudaStream_t stream) {
  const Plan& p = plan(m, n, k);
  const float alpha = 1.0f, beta = 0.0f;
  const cublasStatus_t st = cublasLtMatmul(handle, desc, &alpha, w, p.a, x, p.b, &beta, y, p.d, y, p.d, &p.algo,
                                           workspace, workspace_bytes, stream);
  require(st != CUBLAS_STATUS_NOT_SUPPORTED,
          "cuda::MoeExpertsGemm: cuBLASLt refused " + shape_name(m, n, k) + " (CUBLAS_STATUS_NOT_SUPPORTED)");
  CUBLAS_CHECK(st);
}

MoeExpertsGemm::MoeExpertsGemm(size_t workspace_bytes) : impl_(std::make_unique<Impl>()) {
  Impl& m = *impl_;
  CUDA_CHECK(cudaGetDevice(&m.device));
  CUBLAS_CHECK(cublasLtCreate(&m.handle));
  CUBLAS_CHECK(cublasLtMatmulDescCreate(&m.desc, CUBLAS_COMPUTE_32F, CUDA_R_32F));
  const cublasOperation_t trans_a = CUBLAS_OP_T, trans_b = CUBLAS_OP_N;
  CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(m.desc, CUBLASLT_MATMUL_DESC_TRANSA, &trans_a, sizeof trans_a));
  CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(m.desc, CUBLASLT_MATMUL_DESC_TRANSB, &trans_b, sizeof trans_b));
  m.workspace_bytes = workspace_bytes;
  if (workspace_bytes > 0) CUDA_CHECK(cudaMalloc(&m.workspace, workspace_bytes));
}

MoeExpertsGemm::~MoeExpertsGemm() = default;

size_t MoeExpertsGemm::cached_plans() const {
  const std::lock_guard lock(impl_->mutex);
  return impl_->plans.size();
}

void MoeExpertsGemm::forward(const MoeExpertWeights& w, const float* xp, const int64_t* offsets_host, float* yp,
                             cudaStream_t stream) {
  const std::string where = "cuda::MoeExpertsGemm::forward";
  const int64_t E = w.experts, H = w.hidden, I = w.inter;
  require(E > 0 && H > 0 && I > 0, where + ": experts, hidden and inter must be > 0, got " + std::to_string(E) +
                                       ", " + std::to_string(H) + ", " + std::to_string(I));
  require(H % 8 == 0 && I % 8 == 0, where + ": hidden and inter must be multiples of 8 (BF16 rows 16-byte "
                                            "aligned), got " + std::to_string(H) + " and " + std::to_string(I));
  require(offsets_host != nullptr, where + ": null offsets_host");
  require(offsets_host[0] == 0, where + ": offsets[0] must be 0, got " + std::to_string(offsets_host[0]));
  for (int64_t e = 0; e < E; ++e)
    require(offsets_host[e + 1] >= offsets_host[e], where + ": offsets must not decrease, offsets[" +
                                                        std::to_string(e + 1) + "] < offsets[" + std::to_string(e) +
                                                        "]");
  const int64_t R = offsets_host[E];
  if (R == 0) return;
  auto aligned = [](const void* p) { return reinterpret_cast<uintptr_t>(p) % kAlignment == 0; };
  require(w.gate_up && w.down && xp && yp && aligned(w.gate_up) && aligned(w.down) && aligned(xp) && aligned(yp),
          where + ": gate_up, down, xp and yp must be non-null, 16-byte aligned device pointers");
  Impl& m = *impl_;
  int device = -1;
  CUDA_CHECK(cudaGetDevice(&device));
  require(device == m.device, where + ": the context belongs to device " + std::to_string(m.device) + " but device " +
                                  std::to_string(device) + " is current");

  const size_t xb_bytes = cuda_detail::align256(static_cast<size_t>(R * H) * 2);
  const size_t gu_bytes = cuda_detail::align256(static_cast<size_t>(R * 2 * I) * 4);
  cuda_detail::StreamScratch scratch(xb_bytes + gu_bytes + static_cast<size_t>(R * I) * 2, stream);
  uint16_t* xb = scratch.as<uint16_t>();
  float* gu = scratch.as<float>(xb_bytes);
  uint16_t* hb = scratch.as<uint16_t>(xb_bytes + gu_bytes);
  require(aligned(xb), where + ": the stream-ordered pool returned scratch that is not 16-byte aligned");

  const std::lock_guard lock(m.mutex);
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
