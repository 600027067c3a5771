// cuda_detail::LtMatmul (kernels/cuda/cublaslt_matmul.hpp): FP32 / BF16 cuBLASLt GEMMs with a plan cache.
#include <cublasLt.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <map>
#include <mutex>
#include <string>

#include "kernels/cuda/cublaslt_matmul.hpp"
#include "kernels/cuda/cuda_check.hpp"
#include "kernels/cuda/lt_candidates.hpp"
#include "runtime/error.hpp"

namespace moerl::cuda_detail {
namespace {

constexpr int kMaxHeuristicResults = cuda_detail::kMaxLtCandidates;

struct PlanKey {
  bool trans_a, trans_b;
  int64_t m, n, k, lda, ldb, ldc;
  LtInput input;
  bool out_bf16;  // C (= D) in BF16 instead of FP32 (beta 0 only)
  uint32_t align_a, align_b, align_c;
  bool exact_m;  // false: m is a bucket (m_bucket) shared by nearby row counts
  auto operator<=>(const PlanKey&) const = default;
};

struct Plan {
  cublasLtMatmulDesc_t desc = nullptr;
  cublasLtMatrixLayout_t a = nullptr, b = nullptr, c = nullptr;  // cuBLAS's A (our B), B (our A), C = D
  cublasLtMatmulAlgo_t algo{};
  int64_t m = 0, k = 0;  // the M and K the layouts describe now (set per call within the plan's bucket)
};

// The bucket of a token count (M, or K of a weight gradient): rounded up within its octave to a quarter of its
// power of two (at least 128), so that counts varying from step to step (the routed experts' rows per expert)
// share a few plans instead of asking the heuristic for every new count (~0.1 ms of host time each: the BF16 routed
// experts made plans on every call, 11.2 -> 3.9 ms per bench-600m layer forward on the H200). A plan is
// run on each call's own dimensions (the layouts' dimensions are
// set per call); cuBLASLt checks the algorithm against them, and a refusal falls back to a plan of the exact sizes.
// Only dimensions that are a layout's column count (never bounded by a leading dimension) are bucketed, and the
// plan is made for the bucket's sizes, so the algorithm does not depend on which count came first.
// MOERL_LT_TRACE=N: the first N GEMMs of the process print their owner, problem, whether the plan was cached, and
// the host microseconds of the plan lookup and of cublasLtMatmul (a diagnostic of host-side stalls).
long trace_budget() {
  static const long n = [] {
    const char* v = std::getenv("MOERL_LT_TRACE");
    return v ? std::atol(v) : 0L;
  }();
  return n;
}
std::atomic<long> traced{0};

int64_t bucket(int64_t m) {
  if (m <= 128) return m;
  int64_t p = 1;
  while (p * 2 <= m) p *= 2;
  const int64_t step = std::max<int64_t>(128, p / 4);
  return (m + step - 1) / step * step;
}

void set_dim(cublasLtMatrixLayout_t l, cublasLtMatrixLayoutAttribute_t what, int64_t v) {
  const auto u = static_cast<uint64_t>(v);
  CUBLAS_CHECK(cublasLtMatrixLayoutSetAttribute(l, what, &u, sizeof u));
}

// The layouts of p set to M and K (as make_plan would create them; N never changes within a plan).
void set_mk(Plan& p, bool trans_a, bool trans_b, int64_t m, int64_t k) {
  if (p.m == m && p.k == k) return;
  // cuBLAS's A is our B: (trans_b ? K x N : N x K); its B is our A: (trans_a ? M x K : K x M); C is N x M.
  set_dim(p.a, trans_b ? CUBLASLT_MATRIX_LAYOUT_ROWS : CUBLASLT_MATRIX_LAYOUT_COLS, k);
  set_dim(p.b, trans_a ? CUBLASLT_MATRIX_LAYOUT_ROWS : CUBLASLT_MATRIX_LAYOUT_COLS, m);
  set_dim(p.b, trans_a ? CUBLASLT_MATRIX_LAYOUT_COLS : CUBLASLT_MATRIX_LAYOUT_ROWS, k);
  set_dim(p.c, CUBLASLT_MATRIX_LAYOUT_COLS, m);
  p.m = m, p.k = k;
}

void destroy(Plan& p) {
  if (p.c) cublasLtMatrixLayoutDestroy(p.c);
  if (p.b) cublasLtMatrixLayoutDestroy(p.b);
  if (p.a) cublasLtMatrixLayoutDestroy(p.a);
  if (p.desc) cublasLtMatmulDescDestroy(p.desc);
  p = Plan{};
}

std::string problem_name(const PlanKey& k) {
  return std::string(k.input == LtInput::BF16 ? "BF16" : "FP32") + " GEMM M=" + std::to_string(k.m) +
         ", N=" + std::to_string(k.n) + ", K=" + std::to_string(k.k) + (k.trans_a ? ", A transposed" : "") +
         (k.trans_b ? ", B transposed" : "") + " (lda " + std::to_string(k.lda) + ", ldb " + std::to_string(k.ldb) +
         ", ldc " + std::to_string(k.ldc) + (k.out_bf16 ? ", BF16 out)" : ", FP32 out)");
}

}  // namespace

uint32_t alignment_of(const void* p, uint32_t cap) {
  const auto v = reinterpret_cast<uintptr_t>(p);
  uint32_t a = cap;
  while (a > 1 && v % a != 0) a /= 2;
  return a;
}

void require_device_memory(const void* p, const std::string& what) {
  cudaPointerAttributes attr{};
  const cudaError_t e = cudaPointerGetAttributes(&attr, p);
  if (e == cudaErrorInvalidValue) {
    (void)cudaGetLastError();  // older drivers answer so for plain host memory; do not leave it pending
    attr.type = cudaMemoryTypeUnregistered;
  } else {
    CUDA_CHECK(e);
  }
  require(attr.type == cudaMemoryTypeDevice || attr.type == cudaMemoryTypeManaged,
          [&] { return what + " is not device memory"; });
}

struct LtMatmul::Impl {
  std::string owner;
  int device = 0;
  cublasLtHandle_t handle = nullptr;
  void* workspace = nullptr;
  size_t workspace_bytes = 0;
  size_t max_plans = 0;
  uint32_t max_alignment = 256;
  mutable std::mutex mutex;
  std::map<PlanKey, Plan> plans;

  ~Impl() {
    clear();
    if (workspace) cudaFree(workspace);
    if (handle) cublasLtDestroy(handle);
  }
  void clear() {
    for (auto& [key, plan] : plans) destroy(plan);
    plans.clear();
  }
  Plan make_plan(const PlanKey& k) const;
};

Plan LtMatmul::Impl::make_plan(const PlanKey& k) const {
  Plan p;
  cublasLtMatmulPreference_t pref = nullptr;
  try {
    const cudaDataType_t in = k.input == LtInput::BF16 ? CUDA_R_16BF : CUDA_R_32F;
    CUBLAS_CHECK(cublasLtMatmulDescCreate(&p.desc, CUBLAS_COMPUTE_32F, CUDA_R_32F));
    const cublasOperation_t op_a = k.trans_b ? CUBLAS_OP_T : CUBLAS_OP_N;  // cuBLAS's A is our B
    const cublasOperation_t op_b = k.trans_a ? CUBLAS_OP_T : CUBLAS_OP_N;
    CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(p.desc, CUBLASLT_MATMUL_DESC_TRANSA, &op_a, sizeof op_a));
    CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(p.desc, CUBLASLT_MATMUL_DESC_TRANSB, &op_b, sizeof op_b));
    const auto u = [](int64_t v) { return static_cast<uint64_t>(v); };
    CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&p.a, in, u(k.trans_b ? k.k : k.n), u(k.trans_b ? k.n : k.k), k.ldb));
    CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&p.b, in, u(k.trans_a ? k.m : k.k), u(k.trans_a ? k.k : k.m), k.lda));
    CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&p.c, k.out_bf16 ? CUDA_R_16BF : CUDA_R_32F, u(k.n), u(k.m), k.ldc));

    CUBLAS_CHECK(cublasLtMatmulPreferenceCreate(&pref));
    cuda_detail::set_lt_preference(pref, workspace_bytes, k.align_b, k.align_a, k.align_c);  // cuBLAS's A is our B

    cublasLtMatmulHeuristicResult_t results[kMaxHeuristicResults] = {};
    int found = 0;
    const cublasStatus_t st = cublasLtMatmulAlgoGetHeuristic(handle, p.desc, p.a, p.b, p.c, p.c, pref,
                                                             kMaxHeuristicResults, results, &found);
    // The first usable candidate, or with MOERL_LT_ALGO=n the n-th (the last when fewer; for comparing them on
    // the device). MOERL_LT_ALGOS set: every new plan's candidates printed.
    static const int forced = cuda_detail::forced_lt_candidate("MOERL_LT_ALGO");
    int chosen = -1;
    for (int i = 0, usable = 0; i < found; ++i) {
      if (results[i].state != CUBLAS_STATUS_SUCCESS) continue;
      if (chosen < 0 || usable <= forced) chosen = i;
      ++usable;
    }
    require(st == CUBLAS_STATUS_SUCCESS && chosen >= 0, [&] {
      return owner + ": cuBLASLt has no algorithm (" + cublasLtGetStatusName(st) + ") for " + problem_name(k);
    });
    if (std::getenv("MOERL_LT_ALGOS") != nullptr)
      cuda_detail::print_lt_candidates("lt", problem_name(k), results, found, chosen);
    p.algo = results[chosen].algo;
    p.m = k.m, p.k = k.k;
    CUBLAS_CHECK(cublasLtMatmulPreferenceDestroy(pref));
    return p;
  } catch (...) {
    if (pref) cublasLtMatmulPreferenceDestroy(pref);
    destroy(p);
    throw;
  }
}

LtMatmul::LtMatmul(std::string owner, size_t workspace_bytes, size_t max_plans, uint32_t max_alignment)
    : impl_(std::make_unique<Impl>()) {
  Impl& m = *impl_;
  m.owner = std::move(owner);
  require(max_alignment > 0 && (max_alignment & (max_alignment - 1)) == 0,
          [&] { return m.owner + ": max_alignment must be a power of two, got " + std::to_string(max_alignment); });
  m.max_plans = max_plans > 0 ? max_plans : 1;
  m.max_alignment = max_alignment;
  CUDA_CHECK(cudaGetDevice(&m.device));
  CUBLAS_CHECK(cublasLtCreate(&m.handle));
  m.workspace_bytes = workspace_bytes;
  if (workspace_bytes > 0) CUDA_CHECK(cudaMalloc(&m.workspace, workspace_bytes));
}

LtMatmul::~LtMatmul() = default;

size_t LtMatmul::cached_plans() const {
  const std::lock_guard lock(impl_->mutex);
  return impl_->plans.size();
}

int LtMatmul::device() const { return impl_->device; }

void LtMatmul::gemm(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, LtInput input, const void* A,
                    int64_t lda, const void* B, int64_t ldb, float beta, float* C, int64_t ldc, cudaStream_t stream) {
  run(trans_a, trans_b, M, N, K, input, A, lda, B, ldb, beta, C, false, ldc, stream);
}

void LtMatmul::gemm_bf16_out(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, LtInput input,
                             const void* A, int64_t lda, const void* B, int64_t ldb, uint16_t* C, int64_t ldc,
                             cudaStream_t stream) {
  run(trans_a, trans_b, M, N, K, input, A, lda, B, ldb, 0.0f, C, true, ldc, stream);
}

void LtMatmul::run(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, LtInput input, const void* A,
                   int64_t lda, const void* B, int64_t ldb, float beta, void* C, bool out_bf16, int64_t ldc,
                   cudaStream_t stream) {
  Impl& m = *impl_;
  const std::string& who = m.owner;
  require(M >= 0 && N >= 0 && K >= 0, [&] {
    return who + ": GEMM sizes must be >= 0, got M=" + std::to_string(M) + ", N=" + std::to_string(N) +
           ", K=" + std::to_string(K);
  });
  require(beta == 0.0f || beta == 1.0f, [&] { return who + ": beta must be 0 or 1, got " + std::to_string(beta); });
  if (M == 0 || N == 0) return;
  const int64_t a_cols = trans_a ? M : K, b_cols = trans_b ? K : N;
  require(lda >= std::max<int64_t>(a_cols, 1) && ldb >= std::max<int64_t>(b_cols, 1) && ldc >= N, [&] {
    return who + ": leading dimensions too small: lda " + std::to_string(lda) + " (needs " + std::to_string(a_cols) +
           "), ldb " + std::to_string(ldb) + " (needs " + std::to_string(b_cols) + "), ldc " + std::to_string(ldc) +
           " (needs " + std::to_string(N) + ")";
  });
  require(C != nullptr, [&] { return who + ": null output pointer"; });
  int device = -1;
  CUDA_CHECK(cudaGetDevice(&device));
  require(device == m.device, [&] {
    return who + ": the cuBLASLt context belongs to device " + std::to_string(m.device) + " but device " +
           std::to_string(device) + " is current";
  });
  if (K == 0) {  // an empty sum: cuBLASLt is not asked
    const size_t each = out_bf16 ? sizeof(uint16_t) : sizeof(float);
    if (beta == 0.0f)
      CUDA_CHECK(cudaMemset2DAsync(C, static_cast<size_t>(ldc) * each, 0, static_cast<size_t>(N) * each,
                                   static_cast<size_t>(M), stream));
    return;
  }
  require(A != nullptr && B != nullptr, [&] { return who + ": null input pointer"; });

  const std::lock_guard lock(m.mutex);
  // The bucket's plan first (exact = false), then, should cuBLASLt refuse its algorithm at this M, the exact M's.
  cublasStatus_t st = CUBLAS_STATUS_SUCCESS;
  PlanKey key{};
  const PlanKey actual{trans_a, trans_b, M, N, K, lda, ldb, ldc, input, out_bf16, alignment_of(A, m.max_alignment),
                       alignment_of(B, m.max_alignment), alignment_of(C, m.max_alignment), true};
  const bool trace = trace_budget() > 0 && traced.fetch_add(1) < trace_budget();
  using TraceClock = std::chrono::steady_clock;
  const auto us_since = [](TraceClock::time_point t) {
    return std::chrono::duration<double, std::micro>(TraceClock::now() - t).count();
  };
  for (const bool exact : {false, true}) {
    const TraceClock::time_point t_plan = TraceClock::now();
    bool made = false;
    key = actual;
    // M is a column count unless A is transposed (cuBLAS's B = our A is K x M); K only when A is transposed and
    // B is not (weight gradients: K counts tokens).
    if (!exact) key.m = trans_a ? M : bucket(M), key.k = trans_a && !trans_b ? bucket(K) : K, key.exact_m = false;
    auto it = m.plans.find(key);
    if (it == m.plans.end()) {
      // First call of this problem: make sure the pointers are device memory (a host pointer would give an
      // illegal-address error that poisons the CUDA context).
      require_device_memory(A, who + ": input A");
      require_device_memory(B, who + ": input B");
      require_device_memory(C, who + ": output C");
      if (m.plans.size() >= m.max_plans) m.clear();  // shapes that vary from step to step: keep the cache bounded
      Plan p = m.make_plan(key);
      it = m.plans.emplace(key, p).first;
      made = true;
    }
    Plan& p = it->second;
    set_mk(p, trans_a, trans_b, M, K);
    const float alpha = 1.0f;
    const double plan_us = trace ? us_since(t_plan) : 0.0;
    const TraceClock::time_point t_run = TraceClock::now();
    st = cublasLtMatmul(m.handle, p.desc, &alpha, B, p.a, A, p.b, &beta, C, p.c, C, p.c, &p.algo, m.workspace,
                        m.workspace_bytes, stream);
    if (trace)
      std::fprintf(stderr, "lt-trace %s %s plan %s %.1f us, matmul %.1f us\n", who.c_str(),
                   problem_name(actual).c_str(), made ? "made" : "cached", plan_us, us_since(t_run));
    if (st != CUBLAS_STATUS_NOT_SUPPORTED && st != CUBLAS_STATUS_INVALID_VALUE) break;
  }
  require(st != CUBLAS_STATUS_NOT_SUPPORTED,
          [&] { return who + ": cuBLASLt refused " + problem_name(actual) + " (CUBLAS_STATUS_NOT_SUPPORTED)"; });
  CUBLAS_CHECK(st);
}

}  // namespace moerl::cuda_detail
