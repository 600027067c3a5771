#include "kernels/moe_permute.hpp"

#include <algorithm>
#include <cstring>

namespace moerl::cpu {

namespace {
// Elements below which an OpenMP fork costs more than the copy it would split (64 KiB of floats).
constexpr int64_t kParallelMinElements = 1 << 14;
}  // namespace

void moe_permute_plan(const int32_t* topk_idx, int64_t tokens, int64_t k, int64_t n_experts, int64_t* offsets,
                      int64_t* token_of, int64_t* row_of) {
  // Counting sort; the scan over assignments in order makes it stable.
  std::fill(offsets, offsets + n_experts + 1, 0);
  const int64_t n = tokens * k;
  for (int64_t a = 0; a < n; ++a) ++offsets[topk_idx[a] + 1];
  for (int64_t e = 0; e < n_experts; ++e) offsets[e + 1] += offsets[e];
  // offsets[e] serves as expert e's write cursor, then is moved back by one expert.
  for (int64_t a = 0; a < n; ++a) {
    const int64_t r = offsets[topk_idx[a]]++;
    token_of[r] = a / k;
    row_of[a] = r;
  }
  for (int64_t e = n_experts; e > 0; --e) offsets[e] = offsets[e - 1];
  offsets[0] = 0;
}

void moe_gather(const float* x, const int64_t* token_of, int64_t rows, int64_t dim, float* xp) {
#pragma omp parallel for schedule(static) if (rows * dim >= kParallelMinElements)
  for (int64_t r = 0; r < rows; ++r)
    std::memcpy(xp + r * dim, x + token_of[r] * dim, static_cast<size_t>(dim) * sizeof(float));
}

void moe_combine(const float* yp, const float* weight, const int64_t* row_of, int64_t tokens, int64_t k,
                 int64_t dim, float* y) {
#pragma omp parallel for schedule(static) if (tokens * k * dim >= kParallelMinElements)
  for (int64_t t = 0; t < tokens; ++t) {
    float* yt = y + t * dim;
    for (int64_t j = 0; j < k; ++j) {
      const float w = weight[t * k + j];
      const float* src = yp + row_of[t * k + j] * dim;
      for (int64_t d = 0; d < dim; ++d) yt[d] += w * src[d];
    }
  }
}

void moe_combine_backward(const float* dy, const float* yp, const float* weight, const int64_t* row_of,
                          int64_t tokens, int64_t k, int64_t dim, float* dyp, float* dweight) {
#pragma omp parallel for schedule(static) if (tokens * k * dim >= kParallelMinElements)
  for (int64_t t = 0; t < tokens; ++t) {
    const float* dyt = dy + t * dim;
    for (int64_t j = 0; j < k; ++j) {
      const float w = weight[t * k + j];
      const int64_t r = row_of[t * k + j];
      float* out = dyp + r * dim;
      const float* src = yp + r * dim;
      float dot = 0;
      for (int64_t d = 0; d < dim; ++d) {
        out[d] = w * dyt[d];
        dot += dyt[d] * src[d];
      }
      dweight[t * k + j] = dot;
    }
  }
}

void moe_scatter_add(const float* dxp, const int64_t* row_of, int64_t tokens, int64_t k, int64_t dim, float* dx) {
#pragma omp parallel for schedule(static) if (tokens * k * dim >= kParallelMinElements)
  for (int64_t t = 0; t < tokens; ++t) {
    float* out = dx + t * dim;
    for (int64_t j = 0; j < k; ++j) {
      const float* src = dxp + row_of[t * k + j] * dim;
      for (int64_t d = 0; d < dim; ++d) out[d] += src[d];
    }
  }
}

}  // namespace moerl::cpu
