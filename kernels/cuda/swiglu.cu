// SwiGLU forward/backward on the GPU; the reference is kernels/cpu/swiglu.cpp, the contract
// kernels/cuda/swiglu.hpp.
#include <cuda_runtime.h>

#include <cstdint>
#include <string>

#include "kernels/cuda/cuda_check.hpp"
#include "kernels/cuda/ops_common.cuh"
#include "kernels/cuda/swiglu.hpp"
#include "kernels/cuda/swiglu_math.cuh"
#include "runtime/error.hpp"

namespace moerl::cuda {
namespace {

using ops_detail::load;
using ops_detail::store;
using swiglu_detail::silu_grads;
using swiglu_detail::silu_times;

constexpr int kThreads = 256;

// Grid-stride over `groups` groups of V elements.
template <int V>
__global__ void __launch_bounds__(kThreads)
    swiglu_forward_kernel(const float* __restrict__ g, const float* __restrict__ u, float* __restrict__ h,
                          int64_t groups) {
  for (int64_t j = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; j < groups;
       j += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    float gv[V], uv[V], hv[V];
    load<V>(g, j, gv);
    load<V>(u, j, uv);
#pragma unroll
    for (int k = 0; k < V; ++k) hv[k] = silu_times(gv[k], uv[k]);
    store<V>(h, j, hv);
  }
}

template <int V>
__global__ void __launch_bounds__(kThreads)
    swiglu_backward_kernel(const float* __restrict__ dh, const float* __restrict__ g, const float* __restrict__ u,
                           float* __restrict__ dg, float* __restrict__ du, int64_t groups) {
  for (int64_t j = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; j < groups;
       j += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    float dhv[V], gv[V], uv[V], dgv[V], duv[V];
    load<V>(dh, j, dhv);
    load<V>(g, j, gv);
    load<V>(u, j, uv);
#pragma unroll
    for (int k = 0; k < V; ++k) silu_grads(dhv[k], gv[k], uv[k], dgv[k], duv[k]);
    store<V>(dg, j, dgv);
    store<V>(du, j, duv);
  }
}

void check_args(const char* fn, int64_t n, bool pointers_set) {
  require(n >= 0, [&] { return std::string("cuda::") + fn + ": n must be >= 0, got " + std::to_string(n); });
  require(n == 0 || pointers_set, [&] { return std::string("cuda::") + fn + ": null input or output pointer"; });
}

}  // namespace

void swiglu_forward(const float* g, const float* u, float* h, int64_t n, cudaStream_t stream) {
  check_args("swiglu_forward", n, g && u && h);
  if (n == 0) return;
  // float4 over the first n - n % 4 elements when every pointer is 16-byte aligned, scalars for the rest.
  const bool vec = ops_detail::aligned(g, 16) && ops_detail::aligned(u, 16) && ops_detail::aligned(h, 16);
  const int64_t head = vec ? n / 4 * 4 : 0;
  if (head > 0) {
    swiglu_forward_kernel<4><<<ops_detail::grid_stride_blocks(head / 4, kThreads), kThreads, 0, stream>>>(g, u, h, head / 4);
    CUDA_CHECK_LAUNCH();
  }
  if (head < n) {
    swiglu_forward_kernel<1><<<ops_detail::grid_stride_blocks(n - head, kThreads), kThreads, 0, stream>>>(
        g + head, u + head, h + head, n - head);
    CUDA_CHECK_LAUNCH();
  }
}

void swiglu_backward(const float* dh, const float* g, const float* u, float* dg, float* du, int64_t n,
                     cudaStream_t stream) {
  check_args("swiglu_backward", n, dh && g && u && dg && du);
  if (n == 0) return;
  const bool vec = ops_detail::aligned(dh, 16) && ops_detail::aligned(g, 16) && ops_detail::aligned(u, 16) &&
                   ops_detail::aligned(dg, 16) && ops_detail::aligned(du, 16);
  const int64_t head = vec ? n / 4 * 4 : 0;
  if (head > 0) {
    swiglu_backward_kernel<4><<<ops_detail::grid_stride_blocks(head / 4, kThreads), kThreads, 0, stream>>>(
        dh, g, u, dg, du, head / 4);
    CUDA_CHECK_LAUNCH();
  }
  if (head < n) {
    swiglu_backward_kernel<1><<<ops_detail::grid_stride_blocks(n - head, kThreads), kThreads, 0, stream>>>(
        dh + head, g + head, u + head, dg + head, du + head, n - head);
    CUDA_CHECK_LAUNCH();
  }
}

}  // namespace moerl::cuda
