// AdamW on the GPU (kernels/cuda/adamw.cu): one update of a flat FP32 buffer with BF16 moments, and the two
// halves of global-norm clipping. The arithmetic of moerl::AdamW (runtime/optim/adamw.cpp), step for step, so
// a GPU optimizer built on these gives the CPU's bits:
//   host, in double: bias1 = 1 − beta1^t, bias2 = 1 − beta2^t, step_size = (float)(lr / bias1),
//     sqrt_bias2 = (float)sqrt(bias2), decay = (float)(1 − lr·weight_decay), beta1, 1 − beta1, beta2,
//     1 − beta2 and eps rounded to FP32 from double;
//   device, in FP32 with every product, sum, quotient and square root rounded separately (no fused
//   multiply-add, IEEE division and square root):
//     m = bf16(beta1·m + (1 − beta1)·g),  v = bf16(beta2·v + (1 − beta2)·(g·g))   (round to nearest even),
//     w = w·decay − step_size · (m / (sqrt(v) / sqrt_bias2 + eps))                 (the ROUNDED moments).
// The scalars are doubles (not floats) for that reason: the CPU derives 1 − beta1 and lr / bias1 from the
// doubles of its config, and FP32 inputs would give other constants.
//
// The caller applies DeepSeek-V3's rules around it: weight_decay = 0 for 1-D tensors (norm scales, biases);
// clipping as moerl::clip_grad_norm — norm = sqrt(Σ over trainable tensors of grad_norm_squared), and when it
// is finite and above max_norm, scale(g, n, (float)(max_norm / norm)) on every trainable gradient; a step whose
// norm is not finite is skipped.
//
// All pointers are device memory; calls are asynchronous on `stream`. Aligned buffers (w, g 16 bytes, m, v
// 8 bytes) take 4-wide loads for all but the last n % 4 elements. Throws moerl::Error on bad arguments and on a
// CUDA failure.
#pragma once
#include <cuda_runtime_api.h>

#include <cstdint>

namespace moerl::cuda {

// One AdamW update of w[n] from g[n] with moments m[n], v[n] (BF16 bit patterns, updated in place); t is the
// 1-based count of updates including this one (bias correction). grad_scale: the update uses RN(g[i] · grad_scale)
// (clipping's factor, the value scale() would leave in g; 1 leaves g as it is) and g itself is not written, which
// saves clipping's pass over the gradients (read and write, 8 bytes a parameter).
void adamw_step(float* w, const float* g, uint16_t* m, uint16_t* v, int64_t n, double lr, double beta1,
                double beta2, double eps, double weight_decay, int64_t t, cudaStream_t stream = nullptr,
                float grad_scale = 1.0f);

// *sum += Σ g[i]² over n elements, in double (sum is one device double). Deterministic: 32768-element chunks
// summed per block, the chunk sums then added in chunk order by one block; launches on one stream add to *sum
// in launch order. Zero *sum before the first tensor (cudaMemsetAsync).
void grad_norm_squared(const float* g, int64_t n, double* sum, cudaStream_t stream = nullptr);

// g[i] *= factor (FP32, one rounding: the CPU's clip).
void scale(float* g, int64_t n, float factor, cudaStream_t stream = nullptr);

}  // namespace moerl::cuda
