// SwiGLU on the GPU (kernels/cuda/swiglu.cu): the functions of moerl::cpu (kernels/swiglu.hpp) with the same
// arguments plus a stream. All pointers are device memory, outputs not overlapping inputs; calls are
// asynchronous on `stream`.
//
// Same FP32 formulas as the CPU, each product, sum and quotient rounded separately (no fused multiply-add);
// the only difference is expf (CUDA's: within 2 ulp; glibc's: correctly rounded in nearly all cases), so
// results agree to a few ulp. 16-byte aligned pointers take float4 loads for all but the last n % 4 elements.
// Throws moerl::Error on bad arguments (negative n, null pointers) and on a launch failure.
#pragma once
#include <cuda_runtime_api.h>

#include <cstdint>

namespace moerl::cuda {

// h[n] = silu(g[n]) * u[n] (overwritten).
void swiglu_forward(const float* g, const float* u, float* h, int64_t n, cudaStream_t stream = nullptr);

// dg[n] = dh · u · silu'(g), du[n] = dh · silu(g) (both overwritten).
void swiglu_backward(const float* dh, const float* g, const float* u, float* dg, float* du, int64_t n,
                     cudaStream_t stream = nullptr);

}  // namespace moerl::cuda
