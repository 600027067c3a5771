// The FP8 block-scaled GEMM on the GPU (cuBLASLt, sm_90a): y[M, N] = a[M, K] · b[N, K]ᵀ with E4M3 codes,
// FP32 scales per 1x128 tile or 128x128 block, FP32 accumulation, BF16 or FP32 output. Same function as
// fp8::cpu::gemm_nt_reference (kernels/fp8.hpp) up to accumulation order and the output rounding.
//
// The three GEMMs of a linear layer, all in NT form (both operands K-major):
//   Fprop  y  = x · wᵀ      a = x  [tokens, in]   1x128,  b = w  [out, in]    128x128
//   Dgrad  dx = dy · w      a = dy [tokens, out]  1x128,  b = wᵀ [in, out]    128x128
//   Wgrad  dw = dyᵀ · x     a = dyᵀ [out, tokens] 1x128,  b = xᵀ [in, tokens] 1x128   (VEC x VEC)
// Any pair of granularities except 128x128 x 128x128 (cuBLASLt has no BLK x BLK kernel).
//
// Scales on the GPU are in cuBLASLt's layouts, NOT in the CPU layout [ceil(rows / block_rows), tiles(K)]
// that fp8::cpu::quantize_* write. For an operand [rows, K] with T = tiles(K):
//   1x128   (VEC128):     scale of tile (r, kb)  at s[kb * rows + r]                 T * rows floats
//   128x128 (BLK128x128): scale of block (rb, kb) at s[rb * L4 + kb], L4 = T rounded up to a multiple
//                         of 4                                                       tiles(rows) * L4
// scales_to_cublaslt / scales_to_cublaslt_host convert from the CPU layout (padding entries set to 0).
//
// Requirements, checked on every call (moerl::Error names the operand and what was expected):
//   - K = a.cols = b.cols, K >= 16 and a multiple of 16 (FP8 rows must start 16-byte aligned). K need not
//     be a multiple of 128: the last tile is partial, as in the CPU reference, if cuBLASLt accepts it.
//   - M = a.rows and N = b.rows multiples of 4 (a VEC128 scale column of `rows` floats must start 16-byte
//     aligned), and N * sizeof(output) a multiple of 16 bytes (rows of y 16-byte aligned): N % 8 == 0 for
//     BF16 output, N % 4 == 0 for FP32.
//   - codes, scales and y: device memory, 16-byte aligned (checked for alignment on every call, for being
//     device memory on the first call of each shape). Better alignment (256 bytes, as cudaMalloc gives)
//     lets cuBLASLt pick faster kernels: the plan is keyed on the alignment too.
//   - block_rows 1 or 128, not both 128.
#pragma once
#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "kernels/fp8.hpp"

namespace moerl::fp8::cuda {

enum class OutType { BF16, FP32 };

// One operand on the device: codes [rows, cols] row-major (cols = K), scales in cuBLASLt's layout for
// block_rows (1 -> VEC128, 128 -> BLK128x128), see above.
struct Operand {
  const uint8_t* codes;
  const float* scales;
  int64_t rows, cols;
  int block_rows;
};

// Number of floats of an operand's scales in cuBLASLt's layout.
int64_t cublaslt_scale_count(int64_t rows, int64_t cols, int block_rows);

// CPU layout [ceil(rows / block_rows), tiles(cols)] -> cuBLASLt layout (cublaslt_scale_count floats).
// Host version: plain loops. Device version: one kernel on `stream`, src and dst device memory, distinct.
void scales_to_cublaslt_host(const float* src, int64_t rows, int64_t cols, int block_rows, float* dst);
void scales_to_cublaslt(const float* src, int64_t rows, int64_t cols, int block_rows, float* dst,
                        cudaStream_t stream);

// The cuBLASLt handle, a workspace and the plans: per problem (M, N, K, granularities, output type,
// pointer alignments) the matmul descriptor, the matrix layouts and the algorithm the heuristic chose,
// made on the first call and reused (at most kMaxPlans: the cache is cleared when full, as token counts
// that vary from step to step would otherwise grow it without bound). Bound to the device current at
// construction.
// Thread-safe, but all calls share one workspace: calls on different streams must not overlap in time
// (use one context per concurrently running stream).
class GemmContext {
 public:
  static constexpr size_t kDefaultWorkspaceBytes = size_t{32} << 20;  // what cuBLAS suggests for Hopper
  static constexpr size_t kMaxPlans = 4096;
  explicit GemmContext(size_t workspace_bytes = kDefaultWorkspaceBytes);
  ~GemmContext();
  GemmContext(const GemmContext&) = delete;
  GemmContext& operator=(const GemmContext&) = delete;

  size_t cached_plans() const;  // how many distinct problems have been planned
  // How many planned problems gemm_nt_accumulate ran through its fallback (cuBLASLt refused beta = 1).
  size_t accumulate_fallbacks() const;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
  friend void gemm_nt(GemmContext&, const Operand&, const Operand&, void*, OutType, cudaStream_t);
  friend void gemm_nt_accumulate(GemmContext&, const Operand&, const Operand&, float*, cudaStream_t);
  friend std::vector<struct GemmConfigTiming> search_gemm_configs(GemmContext&, const Operand&, const Operand&, void*,
                                                                  OutType, bool, cudaStream_t, int);
};

// y [a.rows, b.rows] row-major (BF16 or FP32 per `out`) = a · bᵀ, asynchronous on `stream`.
// Throws moerl::Error on bad input, on a cuBLASLt refusal (no algorithm for this problem) and on a CUDA
// or cuBLASLt failure.
void gemm_nt(GemmContext& ctx, const Operand& a, const Operand& b, void* y, OutType out,
             cudaStream_t stream = nullptr);

// y [a.rows, b.rows] FP32 += a · bᵀ (what Wgrad into an FP32 weight gradient needs): cuBLASLt with beta = 1 and
// C = D = y, so y + (a · bᵀ) is rounded once. Same requirements and plans as gemm_nt with FP32 output. Should
// cuBLASLt refuse beta = 1 for a problem (remembered per plan), the product goes to a stream-ordered temporary
// and one kernel adds it to y: the same single rounding, one more pass over y.
void gemm_nt_accumulate(GemmContext& ctx, const Operand& a, const Operand& b, float* y, cudaStream_t stream = nullptr);

// One cuBLASLt configuration of a problem and its median time (search_gemm_configs).
struct GemmConfigTiming {
  std::string config;  // "id 66 tile 20 stages 36 opt 6 cluster 0 swz 0" (cublasLtMatmulAlgoConfigAttributes_t)
  float ms = 0;
  bool planned = false;  // the configuration gemm_nt's plan uses
};

// Every configuration of cuBLASLt's FP8 algorithms (id x tile x stages x custom option x cluster shape x swizzle)
// that cublasLtMatmulAlgoCheck accepts for gemm_nt (accumulate false) or gemm_nt_accumulate (true, out FP32) of these
// operands, each run `runs` times on `stream` (median), fastest first; y is overwritten. For choosing the plans'
// rules on the device: moerl bench gpu --only gemm_fp8_experts with MOERL_LT_FP8_SEARCH=1.
std::vector<GemmConfigTiming> search_gemm_configs(GemmContext& ctx, const Operand& a, const Operand& b, void* y,
                                                  OutType out, bool accumulate, cudaStream_t stream, int runs);

}  // namespace moerl::fp8::cuda
