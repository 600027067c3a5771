// RoPE forward/backward on the GPU; the reference is kernels/cpu/rope.cpp, the contract kernels/cuda/rope.hpp.
#include <cuda_runtime.h>

#include <cstdint>
#include <string>

#include "kernels/cuda/cuda_check.hpp"
#include "kernels/cuda/ops_common.cuh"
#include "kernels/cuda/rope.hpp"
#include "runtime/error.hpp"

namespace moerl::cuda {
namespace {

constexpr int kMaxThreads = 256;
constexpr int64_t kMaxHalf = 4096;  // cos and sin of one position in shared memory: 2 · 4096 floats

// One block per token. The block first builds cos and sin of the token's position for the dim/2 frequencies
// (as kernels/cpu/rope.cpp's rope_tables, in the same FP32/double steps), then rotates every (head, pair):
// pair i of head h is (x[i·a_step], x[i·a_step + b_off]) within the head's vector. sign = −1 rotates back.
__global__ void __launch_bounds__(kMaxThreads)
    rope_kernel(float* __restrict__ x, int64_t seq, int64_t heads, int64_t row_stride, int64_t head_stride,
                int64_t dim, float theta, int64_t a_step, int64_t b_off, float sign) {
  extern __shared__ float table[];  // cos [half], then sign · sin [half]
  const int64_t half = dim / 2, t = blockIdx.x, position = t % seq;
  float* cos_t = table;
  float* sin_t = table + half;
  for (int64_t i = threadIdx.x; i < half; i += blockDim.x) {
    const float exponent = __fdiv_rn(static_cast<float>(2 * i), static_cast<float>(dim));
    const float inv_freq =
        __fdiv_rn(1.0f, __double2float_rn(pow(static_cast<double>(theta), static_cast<double>(exponent))));
    const float angle = __fmul_rn(static_cast<float>(position), inv_freq);
    double s, c;
    sincos(static_cast<double>(angle), &s, &c);
    cos_t[i] = __double2float_rn(c);
    sin_t[i] = sign * __double2float_rn(s);  // exact: sign is ±1
  }
  __syncthreads();
  float* xt = x + t * row_stride;
  for (int64_t idx = threadIdx.x; idx < heads * half; idx += blockDim.x) {
    const int64_t h = idx / half, i = idx % half;
    float* pa = xt + h * head_stride + i * a_step;
    float* pb = pa + b_off;
    const float a = *pa, b = *pb, c = cos_t[i], s = sin_t[i];
    *pa = __fsub_rn(__fmul_rn(a, c), __fmul_rn(b, s));
    *pb = __fadd_rn(__fmul_rn(b, c), __fmul_rn(a, s));
  }
}

void rope_apply(const char* fn, float* x, int64_t tokens, int64_t seq, int64_t heads, int64_t row_stride,
                int64_t head_stride, int64_t dim, float theta, bool interleave, float sign, cudaStream_t stream) {
  const std::string where = std::string("cuda::") + fn + ": ";
  require(tokens >= 0 && heads >= 0, [&] {
    return where + "tokens and heads must be >= 0, got " + std::to_string(tokens) + " and " + std::to_string(heads);
  });
  require(dim > 0 && dim % 2 == 0 && dim / 2 <= kMaxHalf, [&] {
    return where + "dim must be even, in [2, " + std::to_string(2 * kMaxHalf) + "], got " + std::to_string(dim);
  });
  require(seq > 0 && tokens % seq == 0, [&] {
    return where + "tokens (" + std::to_string(tokens) + ") must be a multiple of seq (" + std::to_string(seq) + ")";
  });
  if (tokens == 0 || heads == 0) return;
  require(x != nullptr, [&] { return where + "null x"; });
  require(tokens <= INT32_MAX, [&] { return where + std::to_string(tokens) + " tokens exceed one launch"; });
  const int64_t half = dim / 2, pairs = heads * half;
  const int64_t warps = (pairs + ops_detail::kWarp - 1) / ops_detail::kWarp;
  const int threads = static_cast<int>(warps * ops_detail::kWarp > kMaxThreads ? kMaxThreads : warps * ops_detail::kWarp);
  const size_t smem = 2 * static_cast<size_t>(half) * sizeof(float);
  rope_kernel<<<static_cast<unsigned>(tokens), threads, smem, stream>>>(
      x, seq, heads, row_stride, head_stride, dim, theta, interleave ? 2 : 1, interleave ? 1 : half, sign);
  CUDA_CHECK_LAUNCH();
}

}  // namespace

void rope_forward(float* x, int64_t tokens, int64_t seq, int64_t heads, int64_t row_stride, int64_t head_stride,
                  int64_t dim, float theta, bool interleave, cudaStream_t stream) {
  rope_apply("rope_forward", x, tokens, seq, heads, row_stride, head_stride, dim, theta, interleave, 1.0f, stream);
}

void rope_backward(float* dx, int64_t tokens, int64_t seq, int64_t heads, int64_t row_stride, int64_t head_stride,
                   int64_t dim, float theta, bool interleave, cudaStream_t stream) {
  rope_apply("rope_backward", dx, tokens, seq, heads, row_stride, head_stride, dim, theta, interleave, -1.0f, stream);
}

}  // namespace moerl::cuda
