// The cuBLASLt plumbing of the FP32 and BF16 GEMMs (kernels/cuda/linear.cu, kernels/cuda/moe_experts.cu): a
// handle, a workspace and a cache of plans, behind one row-major call with cpu::sgemm's arguments.
//
// Row-major C[M, N] = op(A) · op(B) is, in cuBLAS's column-major terms, Cᵀ (N x M, ld ldc) = op(B)ᵀ · op(A)ᵀ:
// cuBLAS's A is our B (stored (trans_b ? K x N : N x K) column-major, ld ldb, transposed when trans_b), its B
// is our A (stored (trans_a ? M x K : K x M), ld lda, transposed when trans_a). FP32 compute
// (CUBLAS_COMPUTE_32F: never TF32), FP32 scale factors and FP32 C.
//
// Host-only header (no cuBLASLt types), for .cu and .cpp files.
#pragma once
#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>

namespace moerl::cuda_detail {

// Element type of A and B: FP32, or BF16 bit patterns (uint16_t, as cuda::to_bf16 writes them).
enum class LtInput : uint8_t { FP32, BF16 };

// The largest power of two <= cap dividing the address (cap a power of two): the alignment a plan may assume.
uint32_t alignment_of(const void* p, uint32_t cap = 256);

// Throws moerl::Error "<what> is not device memory" unless p is device or managed memory.
void require_device_memory(const void* p, const std::string& what);

// A cuBLASLt handle, its workspace and the plans: per problem (transposes, M, N, K, leading dimensions, input
// type, pointer alignments) the matmul descriptor, the layouts and the heuristic's algorithm, made on first use
// and kept (the cache is cleared when it holds max_plans). Bound to the device current at construction.
// Thread-safe, but calls share one workspace: calls on different streams must not overlap in time.
class LtMatmul {
 public:
  static constexpr size_t kDefaultWorkspaceBytes = size_t{32} << 20;  // what cuBLAS suggests for Hopper
  static constexpr size_t kDefaultMaxPlans = 4096;

  // owner names the caller in error messages. Plans are keyed on each pointer's alignment_of(p, max_alignment):
  // a smaller cap (e.g. 16 when every pointer is known to be 16-byte aligned) means fewer plans.
  explicit LtMatmul(std::string owner, size_t workspace_bytes = kDefaultWorkspaceBytes,
                    size_t max_plans = kDefaultMaxPlans, uint32_t max_alignment = 256);
  ~LtMatmul();
  LtMatmul(const LtMatmul&) = delete;
  LtMatmul& operator=(const LtMatmul&) = delete;

  // C[M, N] = op(A) · op(B) + beta · C, row-major as cpu::sgemm (A [M, K] or, transposed, [K, M]; B [K, N] or
  // [N, K]); beta 0 (C overwritten, never read) or 1 (accumulated). C is FP32. K = 0 zeroes C (beta 0) or leaves
  // it (beta 1); M = 0 or N = 0 does nothing. Asynchronous on `stream`. Throws moerl::Error on bad arguments
  // (sizes, leading dimensions, null pointers, not device memory on a problem's first call, another device
  // current), when cuBLASLt has no algorithm, and on cuBLASLt or CUDA failures.
  void gemm(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, LtInput input, const void* A, int64_t lda,
            const void* B, int64_t ldb, float beta, float* C, int64_t ldc, cudaStream_t stream);
  // The same with C in BF16 (bit patterns, ld ldc elements): the FP32 sums rounded to nearest even in cuBLASLt's
  // epilogue; beta 0.
  void gemm_bf16_out(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, LtInput input, const void* A,
                     int64_t lda, const void* B, int64_t ldb, uint16_t* C, int64_t ldc, cudaStream_t stream);

  size_t cached_plans() const;
  int device() const;

 private:
  void run(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, LtInput input, const void* A, int64_t lda,
           const void* B, int64_t ldb, float beta, void* C, bool out_bf16, int64_t ldc, cudaStream_t stream);
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace moerl::cuda_detail
