// Rotary position embedding (RoPE), default frequencies, applied in place, FP32 — as HF DeepseekV3 computes it.
//   inv_freq[i] = 1 / theta^(2i / dim), i < dim/2; angle = position · inv_freq[i]; position = token index within
//   its sequence (tokens are packed sequence-major: token t has position t % seq).
//   interleave = false: rotate-half pairs (x_i, x_{i+dim/2}).
//   interleave = true:  adjacent pairs (x_{2i}, x_{2i+1}). HF de-interleaves the dims first (x0, x2, ..., x1, x3,
//     ...) and then rotates halves, keeping the de-interleaved order; its result is this one with the dims
//     permuted the same way for queries and keys, so attention scores are identical.
// Each pair (a, b) becomes (a·cos − b·sin, b·cos + a·sin).
#pragma once
#include <cstdint>
#include <vector>

namespace moerl::cpu {

// cos and sin of position · inv_freq[i] for positions 0 .. seq - 1: [seq, dim / 2] each, in the FP32 steps of HF
// (inv_freq = 1 / theta^(2i / dim) with the power in double, angle = position · inv_freq rounded to FP32, cos and
// sin in double rounded to FP32). The CPU's rope and the GPU's (kernels/cuda/rope.cu, which uploads them) use these.
void rope_tables(int64_t seq, int64_t dim, float theta, std::vector<float>& cos_t, std::vector<float>& sin_t);

// x: `tokens` rows of `heads` vectors of `dim` rope dims; element (t, h, i) at x[t*row_stride + h*head_stride + i]
// (so the rope part may sit inside a wider row, e.g. q [T, H*(nope+rope)] with x = q + nope). dim must be even,
// tokens a multiple of seq.
void rope_forward(float* x, int64_t tokens, int64_t seq, int64_t heads, int64_t row_stride, int64_t head_stride,
                  int64_t dim, float theta, bool interleave);

// The transpose: rotates the gradient dx (same layout) back by −angle, in place.
void rope_backward(float* dx, int64_t tokens, int64_t seq, int64_t heads, int64_t row_stride, int64_t head_stride,
                   int64_t dim, float theta, bool interleave);

}  // namespace moerl::cpu
