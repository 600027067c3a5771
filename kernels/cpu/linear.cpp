#include "kernels/linear.hpp"

#include <cblas.h>

namespace moerl {

std::string_view precision_name(Precision p) {
  switch (p) {
    case Precision::FP32: return "fp32";
    case Precision::BF16: return "bf16";
    case Precision::FP8: return "fp8";
  }
  return "?";
}

bool parse_precision(std::string_view name, Precision* out) {
  for (Precision p : {Precision::FP32, Precision::BF16, Precision::FP8})
    if (precision_name(p) == name) { *out = p; return true; }
  return false;
}

namespace cpu {

void sgemm(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, float alpha, const float* A, int64_t lda,
           const float* B, int64_t ldb, float beta, float* C, int64_t ldc) {
  if (M == 0 || N == 0) return;
  cblas_sgemm(CblasRowMajor, trans_a ? CblasTrans : CblasNoTrans, trans_b ? CblasTrans : CblasNoTrans,
              static_cast<blasint>(M), static_cast<blasint>(N), static_cast<blasint>(K), alpha, A,
              static_cast<blasint>(lda), B, static_cast<blasint>(ldb), beta, C, static_cast<blasint>(ldc));
}

// TODO(h1): bf16 and fp8 paths; this FP32 path is the reference for both.
void linear_forward(Precision, const float* x, const float* w, float* y, int64_t M, int64_t N, int64_t K) {
  sgemm(false, true, M, N, K, 1.0f, x, K, w, K, 0.0f, y, N);
}

void linear_backward(Precision, const float* dy, const float* x, const float* w, float* dx, float* dw, int64_t M,
                     int64_t N, int64_t K) {
  if (dx) sgemm(false, false, M, K, N, 1.0f, dy, N, w, K, 0.0f, dx, K);
  if (dw) sgemm(true, false, N, K, M, 1.0f, dy, N, x, K, 1.0f, dw, K);
}

}  // namespace cpu
}  // namespace moerl
