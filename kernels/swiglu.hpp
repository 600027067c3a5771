// SwiGLU activation, the middle of every DeepSeek-V3 feed-forward block (dense, shared and routed experts):
//   h = silu(g) * u,  silu(g) = g · sigmoid(g) = g / (1 + exp(-g))      (as torch.nn.functional.silu, FP32)
// where g = gate_proj(x) and u = up_proj(x). Elementwise over n values; the linears live in kernels/linear.hpp.
#pragma once
#include <cstdint>

namespace moerl::cpu {

// h[n] = silu(g[n]) * u[n] (overwritten).
void swiglu_forward(const float* g, const float* u, float* h, int64_t n);

// From dh[n] and the forward's inputs: dg[n] = dh · u · silu'(g), du[n] = dh · silu(g) (both overwritten),
// silu'(g) = sigmoid(g) · (1 + g · (1 - sigmoid(g))).
void swiglu_backward(const float* dh, const float* g, const float* u, float* dg, float* du, int64_t n);

}  // namespace moerl::cpu
