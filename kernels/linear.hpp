// Linear layers in the three precision recipes. y[M, N] = x[M, K] · w[N, K]ᵀ (PyTorch's nn.Linear
// layout, no bias: DeepSeek-V3 has none).
//   fp32: FP32 GEMM (OpenBLAS).
//   bf16: inputs rounded to BF16, products accumulated in FP32 (as a BF16 tensor-core GEMM does).
//   fp8:  DeepSeek-V3 recipe, emulated bit-exactly: Fprop x 1x128 · w 128x128; Dgrad dy 1x128 · wᵀ 128x128;
//         Wgrad dyᵀ and xᵀ both quantized along tokens (1x128 tiles of the transposes); FP32 accumulation.
#pragma once
#include <cstdint>
#include <string_view>

namespace moerl {

enum class Precision : uint8_t { FP32, BF16, FP8 };
std::string_view precision_name(Precision p);           // "fp32", "bf16", "fp8"
bool parse_precision(std::string_view name, Precision* out);

namespace cpu {

// y[M, N] = x[M, K] · w[N, K]ᵀ (y overwritten).
void linear_forward(Precision p, const float* x, const float* w, float* y, int64_t M, int64_t N, int64_t K);

// dx[M, K] = dy[M, N] · w[N, K]   (overwritten; skipped when dx is null)
// dw[N, K] += dy[M, N]ᵀ · x[M, K] (accumulated; skipped when dw is null)
void linear_backward(Precision p, const float* dy, const float* x, const float* w, float* dx, float* dw,
                     int64_t M, int64_t N, int64_t K);

// Plain FP32 GEMMs on OpenBLAS, row-major, used by the ops above and by attention:
//   C[M, N] = alpha · op(A) · op(B) + beta · C, op = transpose when the flag is set.
void sgemm(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, float alpha, const float* A, int64_t lda,
           const float* B, int64_t ldb, float beta, float* C, int64_t ldc);

}  // namespace cpu
}  // namespace moerl
