// fp8::cuda::gemm_nt on cuBLASLt's block-scaled FP8 kernels (Hopper, CUDA 13). Layout verified on the
// H200 (shared/DEPS.md): FP8 needs "TN", so cuBLAS's A is our b (stored K-major: K x N column-major,
// transa = T, lda = K), cuBLAS's B is our a (K x M column-major, transb = N, ldb = K), and D is N x M
// column-major with ldd = N, which is y [M, N] row-major.
#include <cublasLt.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <map>
#include <mutex>
#include <string>
#include <vector>

#include "kernels/cuda/cuda_check.hpp"
#include "kernels/cuda/lt_candidates.hpp"
#include "kernels/cuda/pdl.cuh"
#include "kernels/cuda/stream_scratch.hpp"
#include "kernels/fp8_gemm.hpp"
#include "runtime/error.hpp"
#include "runtime/util/env_switch.hpp"

namespace moerl::fp8::cuda {
namespace {

constexpr int kMaxHeuristicResults = cuda_detail::kMaxLtCandidates;

int64_t round_up4(int64_t n) { return (n + 3) / 4 * 4; }

const char* granularity_name(int block_rows) { return block_rows == 1 ? "1x128" : "128x128"; }
const char* out_name(OutType out) { return out == OutType::BF16 ? "bf16" : "fp32"; }
int64_t out_bytes(OutType out) { return out == OutType::BF16 ? 2 : 4; }

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// The largest power of two <= 256 dividing the address (>= 16 once aligned16 passed): what the
// heuristic may assume (cuBLASLt assumes 256 unless told otherwise).
uint32_t alignment_of(const void* p) {
  const auto v = reinterpret_cast<uintptr_t>(p);
  uint32_t a = 256;
  while (a > 16 && v % a != 0) a /= 2;
  return a;
}

void require_device_memory(const void* p, const std::string& what) {
  cudaPointerAttributes attr{};
  const cudaError_t e = cudaPointerGetAttributes(&attr, p);
  if (e == cudaErrorInvalidValue) {
    cudaGetLastError();  // older drivers answer so for plain host memory; do not leave it pending
    attr.type = cudaMemoryTypeUnregistered;
  } else {
    CUDA_CHECK(e);
  }
  require(attr.type == cudaMemoryTypeDevice || attr.type == cudaMemoryTypeManaged,
          [&] { return "fp8::cuda::gemm_nt: " + what + " is not device memory"; });
}

std::string problem_name(int64_t M, int64_t N, int64_t K, int a_block, int b_block, OutType out) {
  return "M=" + std::to_string(M) + ", N=" + std::to_string(N) + ", K=" + std::to_string(K) + ", a " +
         granularity_name(a_block) + ", b " + granularity_name(b_block) + ", output " + out_name(out);
}

void check_operand(const Operand& o, const char* name) {
  // Messages are built only on failure: this runs twice per GEMM, hundreds of times per MoE layer.
  auto n = [name] { return std::string("fp8::cuda::gemm_nt: operand ") + name; };
  if (!(o.codes != nullptr && o.scales != nullptr)) throw Error(n() + ": null codes or scales pointer");
  if (!(o.block_rows == 1 || o.block_rows == kTile))
    throw Error(n() + ": block_rows must be 1 (1x128 tiles) or 128 (128x128 blocks), got " +
                std::to_string(o.block_rows));
  if (!(o.rows > 0 && o.rows % 4 == 0))
    throw Error(n() + ": rows must be a positive multiple of 4 (scale columns 16-byte aligned), got " +
                std::to_string(o.rows));
  if (!aligned16(o.codes)) throw Error(n() + ": codes pointer must be 16-byte aligned");
  if (!aligned16(o.scales)) throw Error(n() + ": scales pointer must be 16-byte aligned");
}

// cuBLASLt layout from the CPU layout. 1x128: a transpose [rows, T] -> [T, rows].
__global__ void vec128_scales_kernel(const float* __restrict__ src, int64_t rows, int64_t T, float* __restrict__ dst) {
  moerl::cuda::await_previous_grid();
  const int64_t total = rows * T;
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < total; i += int64_t{gridDim.x} * blockDim.x) {
    const int64_t kb = i / rows, r = i - kb * rows;
    dst[i] = src[r * T + kb];
  }
}

// 128x128: rows of T scales padded to L4 with zeros.
__global__ void blk128_scales_kernel(const float* __restrict__ src, int64_t row_blocks, int64_t T, int64_t L4,
                                     float* __restrict__ dst) {
  moerl::cuda::await_previous_grid();
  const int64_t total = row_blocks * L4;
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < total; i += int64_t{gridDim.x} * blockDim.x) {
    const int64_t rb = i / L4, kb = i - rb * L4;
    dst[i] = kb < T ? src[rb * T + kb] : 0.0f;
  }
}

void check_scale_args(int64_t rows, int64_t cols, int block_rows) {
  require(rows >= 0 && cols >= 0, "fp8::cuda::scales_to_cublaslt: negative shape");
  require(block_rows == 1 || block_rows == kTile, [&] {
    return "fp8::cuda::scales_to_cublaslt: block_rows must be 1 or 128, got " + std::to_string(block_rows);
  });
}

// y [n] += t [n]: gemm_nt_accumulate where cuBLASLt refuses beta = 1.
__global__ void add_kernel(const float* __restrict__ t, int64_t n, float* __restrict__ y) {
  moerl::cuda::await_previous_grid();
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < n; i += int64_t{gridDim.x} * blockDim.x)
    y[i] += t[i];
}

// A planned problem (see GemmContext). C is D (beta = 0, or 1 for gemm_nt_accumulate).
struct PlanKey {
  int64_t m, n, k;
  int a_block, b_block;
  OutType out;
  uint32_t align_a, align_b, align_y;
  auto operator<=>(const PlanKey&) const = default;
};

struct Plan {
  cublasLtMatmulDesc_t desc = nullptr;
  cublasLtMatrixLayout_t layout_a = nullptr, layout_b = nullptr, layout_d = nullptr;
  cublasLtMatmulAlgo_t algo{};
  size_t workspace_bytes = 0;       // what the algorithm was chosen for and is given (0: none)
  bool accumulate_refused = false;  // cuBLASLt answered beta = 1 with NOT_SUPPORTED / INVALID_VALUE
};

void destroy(Plan& p) {
  if (p.layout_d) cublasLtMatrixLayoutDestroy(p.layout_d);
  if (p.layout_b) cublasLtMatrixLayoutDestroy(p.layout_b);
  if (p.layout_a) cublasLtMatrixLayoutDestroy(p.layout_a);
  if (p.desc) cublasLtMatmulDescDestroy(p.desc);
  p = Plan{};
}

template <class T> void set_desc(cublasLtMatmulDesc_t d, cublasLtMatmulDescAttributes_t attr, const T& v) {
  CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(d, attr, &v, sizeof v));
}

int32_t scale_mode(int block_rows) {
  return block_rows == kTile ? CUBLASLT_MATMUL_MATRIX_SCALE_BLK128x128_32F : CUBLASLT_MATMUL_MATRIX_SCALE_VEC128_32F;
}

}  // namespace

int64_t cublaslt_scale_count(int64_t rows, int64_t cols, int block_rows) {
  check_scale_args(rows, cols, block_rows);
  return block_rows == 1 ? tiles(cols) * rows : tiles(rows) * round_up4(tiles(cols));
}

void scales_to_cublaslt_host(const float* src, int64_t rows, int64_t cols, int block_rows, float* dst) {
  check_scale_args(rows, cols, block_rows);
  const int64_t T = tiles(cols);
  if (block_rows == 1) {
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t kb = 0; kb < T; ++kb) dst[kb * rows + r] = src[r * T + kb];
  } else {
    const int64_t L4 = round_up4(T);
    for (int64_t rb = 0; rb < tiles(rows); ++rb)
      for (int64_t kb = 0; kb < L4; ++kb) dst[rb * L4 + kb] = kb < T ? src[rb * T + kb] : 0.0f;
  }
}

void scales_to_cublaslt(const float* src, int64_t rows, int64_t cols, int block_rows, float* dst,
                        cudaStream_t stream) {
  const int64_t total = cublaslt_scale_count(rows, cols, block_rows);
  if (total == 0) return;
  constexpr int kThreads = 256;
  const auto blocks = static_cast<unsigned>(std::min<int64_t>((total + kThreads - 1) / kThreads, 4096));
  const int64_t T = tiles(cols);
  if (block_rows == 1)
    moerl::cuda::launch_after_previous(vec128_scales_kernel, blocks, kThreads, 0, stream, src, rows, T, dst);
  else
    moerl::cuda::launch_after_previous(blk128_scales_kernel, blocks, kThreads, 0, stream, src, tiles(rows), T,
                                       round_up4(T), dst);
}

namespace {

// MOERL_LT_FP8_ALGO=n: every plan takes the heuristic's n-th usable candidate (0-based; the last one when fewer)
// instead of the rule of choose_algo; for comparing cuBLASLt's candidates on the device. -1 when unset.
int forced_algo_index() {
  static const int index = cuda_detail::forced_lt_candidate("MOERL_LT_FP8_ALGO");
  return index;
}

// FP8 plans get no workspace (unless cuBLASLt offers no algorithm without): it then picks statically scheduled
// kernels, which need no zeroed counter, where with workspace each call of a cooperative kernel was a 4-byte memset
// and its kernel (kernel trace: 192 memsets a pass of the MoE layer bench in the Wgrad, ~80 a bench-600m step before
// the dense layers' Fprop and Dgrad). H200, rounds interleaved: the Wgrad plans alone first, MoE layer 11.69-11.83
// vs 11.72-11.95 ms and 11.71-12.10 vs 12.10-12.23 ms (bench/results/2026-11-30-gpu-sweep-wgrad-workspace-h200-
// 58c6827.txt; those kernels sum in another order, so FP8 training's bits changed then); then every plan against the
// Wgrad plans alone, train step 254.0-255.2k vs 252.3-254.2k tokens/s and MoE layer 11.47-11.85 vs 11.79-12.00 ms
// (3 pairs, each won), the Brown fp8 curve bit for bit the same (...-sweep-fp8-workspace-h200-e3140b1.txt).
// MOERL_LT_FP8_WORKSPACE=full gives every plan the context's workspace, for comparing on the device. Read once.
bool fp8_workspace() {
  static const bool full = env_switch("MOERL_LT_FP8_WORKSPACE", "none", "full");
  return full;
}

// Which of the heuristic's `found` results a plan uses (-1: none usable). The first usable one, except for Wgrad
// (both operands 1x128) over a short K, where the first with 64x128 tiles is taken when offered. Such a GEMM reads
// and writes its FP32 output (gradients accumulate, beta = 1) for only 2·K FLOPs per element, and the heuristic's
// larger tiles (192x64, 64x192) leave fewer blocks to hide that traffic. Measured on the H200 (MoE layer bench,
// 64 experts of ~1536 rows, bench/results/2026-11-29-gpu-lt-algos-h200-*): Wgrad of gate and up 2.74 -> 1.86 ms,
// of down 1.11 -> 0.96 ms, the layer fwd+bwd 13.68 -> 12.80 ms (3 runs each); Fprop and Dgrad within noise with
// other candidates. MOERL_LT_FP8_ALGOS prints every plan's candidates. CTA swizzling on every plan: within noise (MoE
// layer 12.13 vs 12.11 ms, bench/results/2026-11-29-gpu-sweep-swizzle-h200-5bbeefb+swz.txt). At bench-600m's
// expert shapes a search over every configuration timed 64x104 and 64x112 tiles up to 15% faster than the plan's
// for one Wgrad alone (...-lt-search-600m-h200-aaa4b73.txt), but not on the lanes: step 281.3k / 282.4k (64x104)
// and 285.7k / 286.6k (64x112) vs 287.3k / 286.7k tokens/s (...-wgrad-tile-h200-aaa4b73+tile.txt).
int choose_algo(const PlanKey& k, const cublasLtMatmulHeuristicResult_t* results, int found) {
  constexpr int64_t kShortK = 4096;
  std::vector<int> usable;
  for (int i = 0; i < found; ++i)
    if (results[i].state == CUBLAS_STATUS_SUCCESS) usable.push_back(i);
  if (usable.empty()) return -1;
  if (const int forced = forced_algo_index(); forced >= 0)
    return usable[std::min<size_t>(static_cast<size_t>(forced), usable.size() - 1)];
  if (k.a_block == 1 && k.b_block == 1 && k.k <= kShortK)  // short Wgrad
    for (int i : usable)
      if (cuda_detail::lt_config_of(results[i].algo, CUBLASLT_ALGO_CONFIG_TILE_ID) == CUBLASLT_MATMUL_TILE_64x128) return i;
  return usable.front();
}

}  // namespace

struct GemmContext::Impl {
  int device = 0;
  cublasLtHandle_t handle = nullptr;
  void* workspace = nullptr;
  size_t workspace_bytes = 0;
  mutable std::mutex mutex;
  std::map<PlanKey, Plan> plans;

  ~Impl() {
    for (auto& [key, plan] : plans) destroy(plan);
    if (workspace) cudaFree(workspace);
    if (handle) cublasLtDestroy(handle);
  }

  // The scale pointers of the first call are set before the heuristic runs: cuBLASLt's block-scaled modes
  // answer the heuristic query with CUBLAS_STATUS_INVALID_VALUE while they are unset (seen on the H200).
  Plan make_plan(const PlanKey& k, const void* a_scales, const void* b_scales) const;
  // gemm_nt (accumulate false) and gemm_nt_accumulate (true, y FP32).
  void run(const Operand& a, const Operand& b, void* y, OutType out, bool accumulate, cudaStream_t stream);
};

Plan GemmContext::Impl::make_plan(const PlanKey& k, const void* a_scales, const void* b_scales) const {
  Plan p;
  cublasLtMatmulPreference_t pref = nullptr;
  try {
    CUBLAS_CHECK(cublasLtMatmulDescCreate(&p.desc, CUBLAS_COMPUTE_32F, CUDA_R_32F));
    set_desc(p.desc, CUBLASLT_MATMUL_DESC_TRANSA, CUBLAS_OP_T);
    set_desc(p.desc, CUBLASLT_MATMUL_DESC_TRANSB, CUBLAS_OP_N);
    set_desc(p.desc, CUBLASLT_MATMUL_DESC_A_SCALE_MODE, scale_mode(k.b_block));  // cuBLAS A = our b
    set_desc(p.desc, CUBLASLT_MATMUL_DESC_B_SCALE_MODE, scale_mode(k.a_block));  // cuBLAS B = our a
    set_desc(p.desc, CUBLASLT_MATMUL_DESC_A_SCALE_POINTER, b_scales);
    set_desc(p.desc, CUBLASLT_MATMUL_DESC_B_SCALE_POINTER, a_scales);
    const auto K = static_cast<uint64_t>(k.k), M = static_cast<uint64_t>(k.m), N = static_cast<uint64_t>(k.n);
    CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&p.layout_a, CUDA_R_8F_E4M3, K, N, k.k));
    CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&p.layout_b, CUDA_R_8F_E4M3, K, M, k.k));
    CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&p.layout_d, k.out == OutType::BF16 ? CUDA_R_16BF : CUDA_R_32F, N, M,
                                            k.n));

    cublasLtMatmulHeuristicResult_t results[kMaxHeuristicResults] = {};
    int found = 0;
    // The heuristic's candidates with at most `ws` bytes of workspace, with our alignments or (aligned false) the
    // preference's defaults, 256 bytes.
    auto heuristic = [&](uint64_t ws, bool aligned) {
      CUBLAS_CHECK(cublasLtMatmulPreferenceCreate(&pref));
      if (aligned)
        cuda_detail::set_lt_preference(pref, ws, k.align_b, k.align_a, k.align_y);  // cuBLAS's A is our B
      else
        CUBLAS_CHECK(
            cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &ws, sizeof ws));
      found = 0;
      const cublasStatus_t st = cublasLtMatmulAlgoGetHeuristic(handle, p.desc, p.layout_a, p.layout_b, p.layout_d,
                                                               p.layout_d, pref, kMaxHeuristicResults, results, &found);
      CUBLAS_CHECK(cublasLtMatmulPreferenceDestroy(pref));
      pref = nullptr;
      return st;
    };
    // Retried with the default alignments where cuBLASLt refuses ours.
    auto query = [&](uint64_t ws) {
      p.workspace_bytes = ws;
      const cublasStatus_t st = heuristic(ws, true);
      return st == CUBLAS_STATUS_INVALID_VALUE ? heuristic(ws, false) : st;
    };
    cublasStatus_t st = query(fp8_workspace() ? workspace_bytes : 0);
    const bool none_usable = st != CUBLAS_STATUS_SUCCESS || choose_algo(k, results, found) < 0;
    if (p.workspace_bytes == 0 && workspace_bytes > 0 && none_usable) st = query(workspace_bytes);  // take it then
    const std::string problem = problem_name(k.m, k.n, k.k, k.a_block, k.b_block, k.out);
    require(st == CUBLAS_STATUS_SUCCESS || st == CUBLAS_STATUS_NOT_SUPPORTED, [&] {
      return std::string("fp8::cuda::gemm_nt: cuBLASLt heuristic failed (") + cublasLtGetStatusName(st) + ") for " +
             problem;
    });
    const int chosen = choose_algo(k, results, found);
    require(st == CUBLAS_STATUS_SUCCESS && chosen >= 0,
            [&] { return "fp8::cuda::gemm_nt: cuBLASLt has no block-scaled FP8 algorithm for " + problem; });
    if (std::getenv("MOERL_LT_FP8_ALGOS") != nullptr) cuda_detail::print_lt_candidates("lt-fp8", problem, results, found, chosen);
    p.algo = results[chosen].algo;
    return p;
  } catch (...) {
    if (pref) cublasLtMatmulPreferenceDestroy(pref);
    destroy(p);
    throw;
  }
}

GemmContext::GemmContext(size_t workspace_bytes) : impl_(std::make_unique<Impl>()) {
  CUDA_CHECK(cudaGetDevice(&impl_->device));
  CUBLAS_CHECK(cublasLtCreate(&impl_->handle));
  impl_->workspace_bytes = workspace_bytes;
  if (workspace_bytes > 0) CUDA_CHECK(cudaMalloc(&impl_->workspace, workspace_bytes));
}

GemmContext::~GemmContext() = default;

size_t GemmContext::cached_plans() const {
  const std::lock_guard lock(impl_->mutex);
  return impl_->plans.size();
}

size_t GemmContext::accumulate_fallbacks() const {
  const std::lock_guard lock(impl_->mutex);
  return static_cast<size_t>(std::count_if(impl_->plans.begin(), impl_->plans.end(),
                                           [](const auto& kv) { return kv.second.accumulate_refused; }));
}

void GemmContext::Impl::run(const Operand& a, const Operand& b, void* y, OutType out, bool accumulate,
                            cudaStream_t stream) {
  check_operand(a, "a");
  check_operand(b, "b");
  if (a.cols != b.cols)
    throw Error("fp8::cuda::gemm_nt: K differs: a has " + std::to_string(a.cols) + " columns, b has " +
                std::to_string(b.cols));
  const int64_t M = a.rows, N = b.rows, K = a.cols;
  if (!(K >= 16 && K % 16 == 0))
    throw Error("fp8::cuda::gemm_nt: K must be a positive multiple of 16 (FP8 rows 16-byte aligned), got " +
                std::to_string(K));
  if (a.block_rows == kTile && b.block_rows == kTile)
    throw Error(
        "fp8::cuda::gemm_nt: both operands have 128x128 blocks; cuBLASLt supports 1x128 x 1x128, 1x128 x 128x128 "
        "and 128x128 x 1x128 only");
  if (!(y != nullptr && aligned16(y)))
    throw Error("fp8::cuda::gemm_nt: output y must be a 16-byte aligned device pointer");
  if (!(N * out_bytes(out) % 16 == 0))
    throw Error("fp8::cuda::gemm_nt: rows of y must be a multiple of 16 bytes: N=" + std::to_string(N) + " with " +
                out_name(out) + " output (N % " + std::to_string(16 / out_bytes(out)) + " != 0)");
  auto& impl = *this;
  int device = -1;
  CUDA_CHECK(cudaGetDevice(&device));
  if (device != impl.device)
    throw Error("fp8::cuda::gemm_nt: the context belongs to device " + std::to_string(impl.device) + " but device " +
                std::to_string(device) + " is current");

  const PlanKey key{
      M, N, K, a.block_rows, b.block_rows, out, alignment_of(a.codes), alignment_of(b.codes), alignment_of(y)};
  const std::lock_guard lock(impl.mutex);
  auto it = impl.plans.find(key);
  if (it == impl.plans.end()) {
    // First call of this problem: also make sure the pointers are device memory (a host pointer would
    // give an illegal-address error that poisons the CUDA context).
    require_device_memory(a.codes, "a.codes");
    require_device_memory(a.scales, "a.scales");
    require_device_memory(b.codes, "b.codes");
    require_device_memory(b.scales, "b.scales");
    require_device_memory(y, "y");
    Plan plan = impl.make_plan(key, a.scales, b.scales);
    if (impl.plans.size() >= GemmContext::kMaxPlans) {
      for (auto& [k, old] : impl.plans) destroy(old);
      impl.plans.clear();
    }
    it = impl.plans.emplace(key, plan).first;
  }
  Plan& p = it->second;
  set_desc(p.desc, CUBLASLT_MATMUL_DESC_A_SCALE_POINTER, static_cast<const void*>(b.scales));
  set_desc(p.desc, CUBLASLT_MATMUL_DESC_B_SCALE_POINTER, static_cast<const void*>(a.scales));
  const float alpha = 1.0f, zero = 0.0f, one = 1.0f;
  auto matmul = [&](void* d, float beta) {
    return cublasLtMatmul(impl.handle, p.desc, &alpha, b.codes, p.layout_a, a.codes, p.layout_b, &beta, d, p.layout_d,
                          d, p.layout_d, &p.algo, p.workspace_bytes > 0 ? impl.workspace : nullptr, p.workspace_bytes,
                          stream);
  };
  auto check = [&](cublasStatus_t st) {
    require(st != CUBLAS_STATUS_NOT_SUPPORTED, [&] {
      return "fp8::cuda::gemm_nt: cuBLASLt refused " + problem_name(M, N, K, a.block_rows, b.block_rows, out) +
             " (CUBLAS_STATUS_NOT_SUPPORTED)";
    });
    CUBLAS_CHECK(st);
  };
  if (!accumulate) {
    check(matmul(y, zero));
    return;
  }
  if (!p.accumulate_refused) {
    const cublasStatus_t st = matmul(y, one);
    if (st != CUBLAS_STATUS_NOT_SUPPORTED && st != CUBLAS_STATUS_INVALID_VALUE) {
      check(st);
      return;
    }
    p.accumulate_refused = true;
  }
  // The product into a temporary (256-byte aligned: at least what the plan assumes of y), then y += it.
  const int64_t n = M * N;
  cuda_detail::StreamScratch t(static_cast<size_t>(n) * sizeof(float), stream);
  check(matmul(t.as<float>(), zero));
  constexpr int kThreads = 256;
  const auto blocks = static_cast<unsigned>(std::min<int64_t>((n + kThreads - 1) / kThreads, 4096));
  moerl::cuda::launch_after_previous(add_kernel, blocks, kThreads, 0, stream, t.as<float>(), n, static_cast<float*>(y));
  t.release();
}

void gemm_nt(GemmContext& ctx, const Operand& a, const Operand& b, void* y, OutType out, cudaStream_t stream) {
  ctx.impl_->run(a, b, y, out, false, stream);
}

void gemm_nt_accumulate(GemmContext& ctx, const Operand& a, const Operand& b, float* y, cudaStream_t stream) {
  ctx.impl_->run(a, b, y, OutType::FP32, true, stream);
}

namespace {

std::string config_name(const cublasLtMatmulAlgo_t& algo) {
  using cuda_detail::lt_config_of;
  return "id " + std::to_string(lt_config_of(algo, CUBLASLT_ALGO_CONFIG_ID)) + " tile " +
         std::to_string(lt_config_of(algo, CUBLASLT_ALGO_CONFIG_TILE_ID)) + " stages " +
         std::to_string(lt_config_of(algo, CUBLASLT_ALGO_CONFIG_STAGES_ID)) + " opt " +
         std::to_string(lt_config_of(algo, CUBLASLT_ALGO_CONFIG_CUSTOM_OPTION)) + " cluster " +
         std::to_string(lt_config_of(algo, CUBLASLT_ALGO_CONFIG_CLUSTER_SHAPE_ID)) + " swz " +
         std::to_string(lt_config_of(algo, CUBLASLT_ALGO_CONFIG_CTA_SWIZZLING));
}

template <class T> std::vector<T> cap_array(const cublasLtMatmulAlgo_t& algo, cublasLtMatmulAlgoCapAttributes_t cap) {
  size_t bytes = 0;
  if (cublasLtMatmulAlgoCapGetAttribute(&algo, cap, nullptr, 0, &bytes) != CUBLAS_STATUS_SUCCESS) return {};
  std::vector<T> v(bytes / sizeof(T));
  if (!v.empty()) cublasLtMatmulAlgoCapGetAttribute(&algo, cap, v.data(), v.size() * sizeof(T), &bytes);
  return v;
}

}  // namespace

std::vector<GemmConfigTiming> search_gemm_configs(GemmContext& ctx, const Operand& a, const Operand& b, void* y,
                                                  OutType out, bool accumulate, cudaStream_t stream, int runs) {
  require(!accumulate || out == OutType::FP32, "fp8::cuda::search_gemm_configs: accumulate needs FP32 output");
  GemmContext::Impl& impl = *ctx.impl_;
  impl.run(a, b, y, out, accumulate, stream);  // plans the problem (and checks the operands)
  const PlanKey key{a.rows, b.rows, a.cols, a.block_rows, b.block_rows, out,
                    alignment_of(a.codes), alignment_of(b.codes), alignment_of(y)};
  const std::lock_guard lock(impl.mutex);
  Plan& p = impl.plans.at(key);
  const float alpha = 1.0f, beta = accumulate ? 1.0f : 0.0f;
  cudaEvent_t start = nullptr, stop = nullptr;
  CUDA_CHECK(cudaEventCreate(&start));
  CUDA_CHECK(cudaEventCreate(&stop));
  // The median of `runs` timed calls (one untimed first), or < 0 when cuBLASLt refuses to run it.
  auto time = [&](const cublasLtMatmulAlgo_t& algo) {
    auto call = [&] {
      return cublasLtMatmul(impl.handle, p.desc, &alpha, b.codes, p.layout_a, a.codes, p.layout_b, &beta, y,
                            p.layout_d, y, p.layout_d, &algo, impl.workspace, impl.workspace_bytes, stream);
    };
    if (call() != CUBLAS_STATUS_SUCCESS) return -1.0f;
    std::vector<float> ms;
    for (int r = 0; r < runs; ++r) {
      CUDA_CHECK(cudaEventRecord(start, stream));
      if (call() != CUBLAS_STATUS_SUCCESS) return -1.0f;
      CUDA_CHECK(cudaEventRecord(stop, stream));
      CUDA_CHECK(cudaEventSynchronize(stop));
      float t = 0;
      CUDA_CHECK(cudaEventElapsedTime(&t, start, stop));
      ms.push_back(t);
    }
    std::sort(ms.begin(), ms.end());
    return ms[ms.size() / 2];
  };
  std::vector<GemmConfigTiming> found;
  time(p.algo);  // warm-up: the plan is not timed first on a cold GPU
  found.push_back({config_name(p.algo), time(p.algo), true});
  // Variations of the plan's algorithm (an algorithm from cublasLtMatmulAlgoInit is refused by the block-scaled
  // modes' check): each tile and stages id it offers, each custom option, four cluster shapes, both swizzles.
  std::vector<uint32_t> tile_ids = cap_array<uint32_t>(p.algo, CUBLASLT_ALGO_CAP_TILE_IDS);
  std::vector<uint32_t> stage_ids = cap_array<uint32_t>(p.algo, CUBLASLT_ALGO_CAP_STAGES_IDS);
  if (tile_ids.empty()) tile_ids.push_back(cuda_detail::lt_config_of(p.algo, CUBLASLT_ALGO_CONFIG_TILE_ID));
  if (stage_ids.empty()) stage_ids.push_back(cuda_detail::lt_config_of(p.algo, CUBLASLT_ALGO_CONFIG_STAGES_ID));
  int32_t options = 0;
  size_t written = 0;
  cublasLtMatmulAlgoCapGetAttribute(&p.algo, CUBLASLT_ALGO_CAP_CUSTOM_OPTION_MAX, &options, sizeof options, &written);
  const int32_t clusters[] = {CUBLASLT_CLUSTER_SHAPE_AUTO, CUBLASLT_CLUSTER_SHAPE_1x1x1, CUBLASLT_CLUSTER_SHAPE_2x1x1,
                              CUBLASLT_CLUSTER_SHAPE_1x2x1};
  int checked = 0, accepted = 0;
  for (uint32_t tile : tile_ids)
    for (uint32_t stages : stage_ids)
      for (int32_t opt = 0; opt <= options; ++opt)
        for (int32_t cluster : clusters)
          for (int32_t swizzle : {0, 1}) {
            cublasLtMatmulAlgo_t algo = p.algo;
            cublasLtMatmulAlgoConfigSetAttribute(&algo, CUBLASLT_ALGO_CONFIG_TILE_ID, &tile, sizeof tile);
            cublasLtMatmulAlgoConfigSetAttribute(&algo, CUBLASLT_ALGO_CONFIG_STAGES_ID, &stages, sizeof stages);
            cublasLtMatmulAlgoConfigSetAttribute(&algo, CUBLASLT_ALGO_CONFIG_CUSTOM_OPTION, &opt, sizeof opt);
            cublasLtMatmulAlgoConfigSetAttribute(&algo, CUBLASLT_ALGO_CONFIG_CLUSTER_SHAPE_ID, &cluster, sizeof cluster);
            cublasLtMatmulAlgoConfigSetAttribute(&algo, CUBLASLT_ALGO_CONFIG_CTA_SWIZZLING, &swizzle, sizeof swizzle);
            cublasLtMatmulHeuristicResult_t r{};
            ++checked;
            if (cublasLtMatmulAlgoCheck(impl.handle, p.desc, p.layout_a, p.layout_b, p.layout_d, p.layout_d, &algo,
                                        &r) != CUBLAS_STATUS_SUCCESS ||
                r.workspaceSize > impl.workspace_bytes)
              continue;
            ++accepted;
            const float ms = time(algo);
            if (ms >= 0) found.push_back({config_name(algo), ms, false});
          }
  std::fprintf(stderr, "search_gemm_configs: %zu tiles, %zu stages, options 0..%d: %d checked, %d accepted\n",
               tile_ids.size(), stage_ids.size(), options, checked, accepted);
  cudaGetLastError();
  CUDA_CHECK(cudaEventDestroy(start));
  CUDA_CHECK(cudaEventDestroy(stop));
  std::stable_sort(found.begin(), found.end(), [](const auto& x, const auto& y) { return x.ms < y.ms; });
  return found;
}

}  // namespace moerl::fp8::cuda
