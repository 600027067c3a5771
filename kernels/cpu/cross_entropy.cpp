#include "kernels/cross_entropy.hpp"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

namespace moerl::cpu {

double cross_entropy(const float* logits, const int64_t* labels, int64_t rows, int64_t vocab, float grad_scale,
                     float* dlogits, int64_t* counted) {
  std::vector<double> row_loss(static_cast<size_t>(rows), 0.0);
  for (int64_t r = 0; r < rows; ++r)
    if (labels[r] >= vocab) throw std::out_of_range("label " + std::to_string(labels[r]) + " >= vocab " + std::to_string(vocab));
#pragma omp parallel for schedule(static)
  for (int64_t r = 0; r < rows; ++r) {
    const float* z = logits + r * vocab;
    float* dz = dlogits ? dlogits + r * vocab : nullptr;
    const int64_t label = labels[r];
    if (label < 0) {
      if (dz) std::memset(dz, 0, sizeof(float) * static_cast<size_t>(vocab));
      continue;
    }
    const float m = *std::max_element(z, z + vocab);
    double sum = 0;
    for (int64_t v = 0; v < vocab; ++v) sum += std::exp(static_cast<double>(z[v] - m));
    const double lse = static_cast<double>(m) + std::log(sum);
    row_loss[static_cast<size_t>(r)] = lse - static_cast<double>(z[label]);
    if (dz) {
      for (int64_t v = 0; v < vocab; ++v) dz[v] = grad_scale * static_cast<float>(std::exp(static_cast<double>(z[v]) - lse));
      dz[label] -= grad_scale;
    }
  }
  double total = 0;  // summed in row order: the same on any thread count
  int64_t n = 0;
  for (int64_t r = 0; r < rows; ++r)
    if (labels[r] >= 0) { total += row_loss[static_cast<size_t>(r)]; ++n; }
  if (counted) *counted = n;
  return total;
}

}  // namespace moerl::cpu
