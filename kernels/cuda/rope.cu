// RoPE forward/backward on the GPU; the reference is kernels/cpu/rope.cpp, the contract kernels/cuda/rope.hpp.
#include <cuda_runtime.h>

#include <cstdint>
#include <cstring>
#include <map>
#include <mutex>
#include <string>
#include <tuple>
#include <vector>

#include "kernels/cuda/cuda_check.hpp"
#include "kernels/cuda/ops_common.cuh"
#include "kernels/cuda/rope.hpp"
#include "kernels/rope.hpp"
#include "runtime/error.hpp"

namespace moerl::cuda {
namespace {

constexpr int kMaxThreads = 256;

// The CPU's cos and sin tables (cpu::rope_tables, [seq, dim / 2] each) on the device, uploaded once per device,
// seq, dim and theta and kept for the process (2 · seq · dim / 2 floats: 256 KiB at seq 2048, dim 32). Each call
// used to build its token's row of the tables again, in double (pow, sincos): 37 us per call on the H200 for the
// bench-600m query rope (16 heads of 32 dims, 16384 tokens) at 23% of DRAM bandwidth (ncu, 2026-11-30).
struct RopeTables {
  const float* cos;
  const float* sin;
};

RopeTables rope_tables(int64_t seq, int64_t dim, float theta) {
  using Key = std::tuple<int, int64_t, int64_t, uint32_t>;
  static std::mutex mutex;
  static std::map<Key, float*> tables;  // cos [seq, half] then sin [seq, half]; never freed
  int device = 0;
  CUDA_CHECK(cudaGetDevice(&device));
  uint32_t theta_bits = 0;
  std::memcpy(&theta_bits, &theta, sizeof theta_bits);
  const Key key{device, seq, dim, theta_bits};
  const int64_t n = seq * (dim / 2);
  const std::lock_guard lock(mutex);
  auto it = tables.find(key);
  if (it == tables.end()) {
    std::vector<float> cos_t, sin_t;
    cpu::rope_tables(seq, dim, theta, cos_t, sin_t);
    float* d = nullptr;
    CUDA_CHECK(cudaMalloc(&d, 2 * static_cast<size_t>(n) * sizeof(float)));
    // Synchronous copies: the tables are complete before any stream can read them.
    CUDA_CHECK(cudaMemcpy(d, cos_t.data(), static_cast<size_t>(n) * sizeof(float), cudaMemcpyHostToDevice));
    CUDA_CHECK(cudaMemcpy(d + n, sin_t.data(), static_cast<size_t>(n) * sizeof(float), cudaMemcpyHostToDevice));
    it = tables.emplace(key, d).first;
  }
  return {it->second, it->second + n};
}

// One block per token: rotates every (head, pair) of the token with its position's row of the tables; pair i of
// head h is (x[i·a_step], x[i·a_step + b_off]) within the head's vector. sign = −1 rotates back (−sin: exact).
__global__ void __launch_bounds__(kMaxThreads)
    rope_kernel(float* __restrict__ x, const float* __restrict__ cos_table, const float* __restrict__ sin_table,
                int64_t seq, int64_t heads, int64_t row_stride, int64_t head_stride, int64_t half, int64_t a_step,
                int64_t b_off, float sign) {
  const int64_t t = blockIdx.x, position = t % seq;
  const float* cos_t = cos_table + position * half;
  const float* sin_t = sin_table + position * half;
  float* xt = x + t * row_stride;
  for (int64_t idx = threadIdx.x; idx < heads * half; idx += blockDim.x) {
    const int64_t h = idx / half, i = idx % half;
    float* pa = xt + h * head_stride + i * a_step;
    float* pb = pa + b_off;
    const float a = *pa, b = *pb, c = __ldg(cos_t + i), s = sign * __ldg(sin_t + i);
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
  require(dim > 0 && dim % 2 == 0, [&] {
    return where + "dim must be even and positive, got " + std::to_string(dim);
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
  const RopeTables tables = rope_tables(seq, dim, theta);
  rope_kernel<<<static_cast<unsigned>(tokens), threads, 0, stream>>>(
      x, tables.cos, tables.sin, seq, heads, row_stride, head_stride, half, interleave ? 2 : 1, interleave ? 1 : half,
      sign);
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
