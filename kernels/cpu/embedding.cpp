#include "kernels/embedding.hpp"

#include <cstring>

namespace moerl::cpu {

void embedding_forward(const float* table, const int64_t* ids, int64_t rows, int64_t dim, float* out) {
#pragma omp parallel for schedule(static)
  for (int64_t r = 0; r < rows; ++r)
    std::memcpy(out + r * dim, table + ids[r] * dim, sizeof(float) * static_cast<size_t>(dim));
}

void embedding_backward(const float* dout, const int64_t* ids, int64_t rows, int64_t dim, float* dtable) {
  // Parallel over columns, not rows: two rows may share an id, and the sum order must not depend on threads.
#pragma omp parallel for schedule(static)
  for (int64_t c0 = 0; c0 < dim; c0 += 16) {
    const int64_t c1 = c0 + 16 < dim ? c0 + 16 : dim;
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t c = c0; c < c1; ++c) dtable[ids[r] * dim + c] += dout[r * dim + c];
  }
}

}  // namespace moerl::cpu
