// Grouped block-scaled FP8 GEMMs for the routed experts (kernels/cuda/sm90_fp8_grouped_gemm.cu): every expert's
// product of one projection in ONE launch, the experts' row ranges read on the device (no per-expert host call,
// no host copy of the offsets needed by the kernel). Same function as fp8::cpu::gemm_nt_reference per group:
//   y[m, n] = sum over 128-groups kb of (sa[m, kb] · sb[n, kb]) · (sum_{k in kb} a[m, k] · b[n, k])
// with the inner sums on the tensor cores (WGMMA m64n128k32 E4M3, FP32) and promoted every 128 of K, as
// cuBLASLt's block-scaled kernels do; results equal cuBLASLt's up to the order of FP32 sums.
//
// Groups: bounds [groups + 1] on the device, non-decreasing multiples of 128 (moe_aligned_offsets); group g owns
// rows bounds[g] .. bounds[g+1] - 1 (empty groups allowed).
//
// Two forms:
//   rows   (Fprop, Dgrad): a [rows, K] (all groups' rows, row-major), group g's b [N, K] at b + g · N · K with
//          128x128 block scales in cuBLASLt's BLK128x128 layout at b_scales + g · tiles(N) · L4(tiles(K))
//          (a LinearContext stacked weight: moe_fp8_stacked_weight); a's scales in the CPU layout of
//          quantize_1x128, [rows, tiles(K)]. y [rows, N] overwritten on every row of every group (zero rows
//          give 0); rows at or past bounds[groups] untouched. Up to two terms summed into the same y (Dgrad of
//          gate and up: dx = dg · w_gate + du · w_up), each with its own K.
//   tokens (Wgrad): group g's a [M, n_g] and b [N, n_g] packed at a + bounds[g] · M and b + bounds[g] · N
//          (quantize_1x128_transposed_grouped's codes), scales in its CPU layout [M, tiles(rows)] and
//          [N, tiles(rows)] (group g's tiles start at column bounds[g] / 128); y_g [M, N] at y + g · M · N,
//          accumulated (+=). Empty groups leave y_g untouched.
// Up to two problems (outputs) per launch: the gate and up projections share a launch.
//
// Requirements (moerl::Error otherwise): K, M, N multiples of 16 (rows of codes 16-byte aligned) and > 0; codes
// 16-byte aligned, scales 4-byte aligned, y 8-byte aligned, y_bf16 4-byte aligned, all device memory. Asynchronous
// on `stream`.
#pragma once
#include <cuda_runtime_api.h>

#include <cstdint>

namespace moerl::fp8::cuda {

// The pipeline of the kernel (sm90_fp8_grouped_gemm.cu): Tma (persistent, a producer warpgroup loading the rows
// form's tiles with TMA; the tokens form as Specialized), Specialized (persistent, the producers copy with cp.async;
// mbarriers between them and the consumers) or Synchronous (a block per tile, every thread copies, a block barrier
// per step). Default: MOERL_GROUPED_WGMMA=tma|specialized|sync, read once; unset means Tma. All give the same sums
// in the same order (bit-identical results).
enum class GroupedKernel { Default, Tma, Specialized, Synchronous };

// One product a · bᵀ (see above for the layouts of each form). k: the contracted length of the rows form
// (unused by the tokens form, whose k is each group's row count).
struct GroupedTerm {
  const uint8_t* a = nullptr;
  const float* a_scales = nullptr;
  const uint8_t* b = nullptr;
  const float* b_scales = nullptr;
  int64_t k = 0;
};

// One output and the terms summed into it (1 or 2): y in FP32, or (rows form only) y_bf16 in BF16 (bit patterns,
// rounded to nearest even from the FP32 sums, as cuBLASLt's BF16 outputs); exactly one of them.
struct GroupedProblem {
  GroupedTerm terms[2];
  int n_terms = 1;
  float* y = nullptr;
  uint16_t* y_bf16 = nullptr;
};

// Rows form. max_rows: a multiple of 128 >= bounds[groups] known on the host (the launch covers max_rows / 128
// row tiles; tiles at or past bounds[groups] exit at once). n: output columns (rows of each b). All problems share
// n and their terms' k.
void grouped_gemm_nt_rows(const GroupedProblem* problems, int n_problems, const int64_t* bounds, int64_t groups,
                          int64_t max_rows, int64_t n, cudaStream_t stream,
                          GroupedKernel kernel = GroupedKernel::Default);

// Tokens form. rows: the row count the scales were quantized over (their layout has tiles(rows) columns; every
// bounds[g] <= rows). m, n: rows of each a and b (the output is [m, n] per group). All problems share m and n.
// overwrite: y_g = the product instead of y_g += it (non-empty groups only; empty ones stay untouched).
void grouped_gemm_nt_tokens_accumulate(const GroupedProblem* problems, int n_problems, const int64_t* bounds,
                                       int64_t groups, int64_t rows, int64_t m, int64_t n, cudaStream_t stream,
                                       GroupedKernel kernel = GroupedKernel::Default, bool overwrite = false);

}  // namespace moerl::fp8::cuda
