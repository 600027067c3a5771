#include "kernels/rmsnorm.hpp"

#include <cmath>

namespace moerl::cpu {

namespace {
// Below this many elements the OpenMP fork costs more than the work.
constexpr int64_t kParallelMin = 1 << 14;
// Columns per task of the dweight reduction: each task sums its columns over all rows in row order, so the
// result does not depend on the thread count.
constexpr int64_t kColumnBlock = 64;
}  // namespace

void rmsnorm_forward(const float* x, const float* weight, float* y, float* rstd, int64_t rows, int64_t dim,
                     float eps) {
#pragma omp parallel for schedule(static) if (rows * dim >= kParallelMin)
  for (int64_t r = 0; r < rows; ++r) {
    const float* xr = x + r * dim;
    float* yr = y + r * dim;
    double ss = 0;  // sum of squares in double: the FP32 result is then exact to rounding
    for (int64_t j = 0; j < dim; ++j) ss += static_cast<double>(xr[j]) * xr[j];
    const float s = static_cast<float>(1.0 / std::sqrt(ss / static_cast<double>(dim) + eps));
    rstd[r] = s;
    // HF order: weight * (x * rstd).
    for (int64_t j = 0; j < dim; ++j) yr[j] = weight[j] * (xr[j] * s);
  }
}

// y_j = w_j · x_j · s, s = (mean(x²) + eps)^-1/2, ∂s/∂x_k = −s³ x_k / dim, so
//   dx_j = s · w_j · dy_j − s³ · x_j · (Σ_k w_k dy_k x_k) / dim,   dw_j = Σ_rows dy_j · x_j · s.
void rmsnorm_backward(const float* dy, const float* x, const float* weight, const float* rstd, float* dx,
                      float* dweight, int64_t rows, int64_t dim) {
  const bool parallel = rows * dim >= kParallelMin;
#pragma omp parallel for schedule(static) if (parallel)
  for (int64_t r = 0; r < rows; ++r) {
    const float* xr = x + r * dim;
    const float* dyr = dy + r * dim;
    float* dxr = dx + r * dim;
    const double s = rstd[r];
    double dot = 0;
    for (int64_t j = 0; j < dim; ++j) dot += static_cast<double>(weight[j]) * dyr[j] * xr[j];
    const double c = s * s * s * dot / static_cast<double>(dim);
    for (int64_t j = 0; j < dim; ++j)
      dxr[j] = static_cast<float>(s * weight[j] * dyr[j] - c * xr[j]);
  }
  if (!dweight) return;
  const int64_t blocks = (dim + kColumnBlock - 1) / kColumnBlock;
#pragma omp parallel for schedule(static) if (parallel)
  for (int64_t blk = 0; blk < blocks; ++blk) {
    const int64_t j0 = blk * kColumnBlock;
    const int64_t j1 = j0 + kColumnBlock < dim ? j0 + kColumnBlock : dim;
    double acc[kColumnBlock] = {};
    for (int64_t r = 0; r < rows; ++r) {
      const float* xr = x + r * dim;
      const float* dyr = dy + r * dim;
      const double s = rstd[r];
      for (int64_t j = j0; j < j1; ++j) acc[j - j0] += static_cast<double>(dyr[j]) * xr[j] * s;
    }
    for (int64_t j = j0; j < j1; ++j) dweight[j] += static_cast<float>(acc[j - j0]);
  }
}

}  // namespace moerl::cpu
