#include "kernels/rope.hpp"

#include <cmath>
#include <vector>

namespace moerl::cpu {

void rope_tables(int64_t seq, int64_t dim, float theta, std::vector<float>& cos_t, std::vector<float>& sin_t) {
  const int64_t half = dim / 2;
  cos_t.resize(static_cast<size_t>(seq * half));
  sin_t.resize(static_cast<size_t>(seq * half));
  std::vector<float> inv_freq(static_cast<size_t>(half));
  for (int64_t i = 0; i < half; ++i) {
    const float exponent = static_cast<float>(2 * i) / static_cast<float>(dim);
    inv_freq[i] = 1.0f / static_cast<float>(std::pow(static_cast<double>(theta), static_cast<double>(exponent)));
  }
  for (int64_t p = 0; p < seq; ++p)
    for (int64_t i = 0; i < half; ++i) {
      const float angle = static_cast<float>(p) * inv_freq[i];
      cos_t[p * half + i] = static_cast<float>(std::cos(static_cast<double>(angle)));
      sin_t[p * half + i] = static_cast<float>(std::sin(static_cast<double>(angle)));
    }
}

namespace {

// Rotates every pair by +angle (sign = 1) or −angle (sign = −1).
void rope_apply(float* x, int64_t tokens, int64_t seq, int64_t heads, int64_t row_stride, int64_t head_stride,
                int64_t dim, float theta, bool interleave, float sign) {
  if (tokens == 0) return;
  std::vector<float> cos_t, sin_t;
  rope_tables(seq, dim, theta, cos_t, sin_t);
  const int64_t half = dim / 2;
  // Pair i is (x[i*a_step], x[i*a_step + b_off]).
  const int64_t a_step = interleave ? 2 : 1;
  const int64_t b_off = interleave ? 1 : half;
#pragma omp parallel for schedule(static) if (tokens * heads * dim >= (1 << 15))
  for (int64_t t = 0; t < tokens; ++t) {
    const float* c = cos_t.data() + (t % seq) * half;
    const float* s = sin_t.data() + (t % seq) * half;
    for (int64_t h = 0; h < heads; ++h) {
      float* xh = x + t * row_stride + h * head_stride;
      for (int64_t i = 0; i < half; ++i) {
        float* pa = xh + i * a_step;
        float* pb = pa + b_off;
        const float a = *pa, b = *pb, si = sign * s[i];
        *pa = a * c[i] - b * si;
        *pb = b * c[i] + a * si;
      }
    }
  }
}

}  // namespace

void rope_forward(float* x, int64_t tokens, int64_t seq, int64_t heads, int64_t row_stride, int64_t head_stride,
                  int64_t dim, float theta, bool interleave) {
  rope_apply(x, tokens, seq, heads, row_stride, head_stride, dim, theta, interleave, 1.0f);
}

void rope_backward(float* dx, int64_t tokens, int64_t seq, int64_t heads, int64_t row_stride, int64_t head_stride,
                   int64_t dim, float theta, bool interleave) {
  rope_apply(dx, tokens, seq, heads, row_stride, head_stride, dim, theta, interleave, -1.0f);
}

}  // namespace moerl::cpu
