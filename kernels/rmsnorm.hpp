// RMSNorm: y = x / sqrt(mean(x²) + eps) · weight, over the last dimension (as HF DeepseekV3RMSNorm, in FP32).
#pragma once
#include <cstdint>

namespace moerl::cpu {

// x [rows, dim], weight [dim] -> y [rows, dim]; rstd [rows] saved for backward (1 / sqrt(mean(x²) + eps)).
void rmsnorm_forward(const float* x, const float* weight, float* y, float* rstd, int64_t rows, int64_t dim, float eps);

// dx [rows, dim] overwritten; dweight [dim] accumulated (+=), skipped when null. Sums run in double.
void rmsnorm_backward(const float* dy, const float* x, const float* weight, const float* rstd, float* dx,
                      float* dweight, int64_t rows, int64_t dim);

}  // namespace moerl::cpu
