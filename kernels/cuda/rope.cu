// RoPE forward/backward on the GPU; the reference is kernels/cpu/rope.cpp, the contract kernels/cuda/rope.hpp.
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <map>
#include <mutex>
#include <string>
#include <tuple>
#include <vector>

#include "kernels/cuda/cuda_check.hpp"
#include "kernels/cuda/rope.hpp"
#include "kernels/cuda/rope_rotate.cuh"
#include "kernels/rope.hpp"
#include "runtime/error.hpp"

namespace moerl::cuda {
namespace {

constexpr int kMaxThreads = 256;

// A block per `tpb` tokens (tpb · heads · half pairs, at most a block's threads unless one token has more): pair i of
// head h is (x[i·a_step], x[i·a_step + b_off]) within the head's vector, rotated with its position's row of the
// tables. sign = −1 rotates back (−sin: exact). (A block per token left the single rope key's 16 pairs a token to
// blocks of 32 threads: 11.5 us a call at bench-600m.)
__global__ void __launch_bounds__(kMaxThreads)
    rope_kernel(float* __restrict__ x, const float* __restrict__ cos_table, const float* __restrict__ sin_table,
                int64_t tokens, int64_t seq, uint32_t tpb, uint32_t heads, int64_t row_stride, int64_t head_stride,
                uint32_t half, int64_t a_step, int64_t b_off, float sign) {
  const uint32_t per_token = heads * half;
  const int64_t t0 = static_cast<int64_t>(blockIdx.x) * tpb;
  const uint32_t items = static_cast<uint32_t>(min(static_cast<int64_t>(tpb), tokens - t0)) * per_token;
  for (uint32_t j = threadIdx.x; j < items; j += blockDim.x) {
    const uint32_t tl = j / per_token, hi = j - tl * per_token, h = hi / half, i = hi - h * half;
    const int64_t t = t0 + tl, position = t % seq;
    float* pa = x + t * row_stride + h * head_stride + i * a_step;
    float* pb = pa + b_off;
    float a = *pa, b = *pb;
    rope_rotate(a, b, __ldg(cos_table + position * half + i), sign * __ldg(sin_table + position * half + i));
    *pa = a, *pb = b;
  }
}

// tables: null for RoPE's own (rope_tables(seq, dim, theta)).
void rope_apply(const char* fn, float* x, int64_t tokens, int64_t seq, int64_t heads, int64_t row_stride,
                int64_t head_stride, int64_t dim, float theta, bool interleave, float sign, cudaStream_t stream,
                const RopeTables* given = nullptr) {
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
  const int64_t half = dim / 2, per_token = heads * half;
  require(per_token < (int64_t{1} << 31), [&] { return where + "heads · dim / 2 must be below 2^31"; });
  const int64_t tpb = std::max<int64_t>(1, kMaxThreads / per_token), blocks = (tokens + tpb - 1) / tpb;
  require(blocks <= INT32_MAX, [&] { return where + std::to_string(tokens) + " tokens exceed one launch"; });
  const RopeTables tables = given != nullptr ? *given : rope_tables(seq, dim, theta);
  rope_kernel<<<static_cast<unsigned>(blocks), kMaxThreads, 0, stream>>>(
      x, tables.cos, tables.sin, tokens, seq, static_cast<uint32_t>(tpb), static_cast<uint32_t>(heads), row_stride,
      head_stride, static_cast<uint32_t>(half), interleave ? 2 : 1, interleave ? 1 : half, sign);
  CUDA_CHECK_LAUNCH();
}

}  // namespace

// Uploaded once per device, seq, dim and theta and kept for the process (2 · seq · dim / 2 floats: 256 KiB at seq
// 2048, dim 32). Each rope call used to build its token's row of the tables again, in double (pow, sincos): 37 us a
// call on the H200 for the bench-600m query rope (16 heads of 32 dims, 16384 tokens) at 23% of DRAM bandwidth (ncu,
// 2026-11-30).
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
  return {it->second, it->second + n, dim / 2};
}

void rope_forward(float* x, int64_t tokens, int64_t seq, int64_t heads, int64_t row_stride, int64_t head_stride,
                  int64_t dim, float theta, bool interleave, cudaStream_t stream) {
  rope_apply("rope_forward", x, tokens, seq, heads, row_stride, head_stride, dim, theta, interleave, 1.0f, stream);
}

void rope_backward(float* dx, int64_t tokens, int64_t seq, int64_t heads, int64_t row_stride, int64_t head_stride,
                   int64_t dim, float theta, bool interleave, cudaStream_t stream) {
  rope_apply("rope_backward", dx, tokens, seq, heads, row_stride, head_stride, dim, theta, interleave, -1.0f, stream);
}

void rope_backward_with(const RopeTables& t, float* dx, int64_t tokens, int64_t seq, int64_t heads,
                        int64_t row_stride, int64_t head_stride, cudaStream_t stream) {
  require(t.cos && t.sin && t.half > 0, "cuda::rope_backward_with: no tables");
  rope_apply("rope_backward_with", dx, tokens, seq, heads, row_stride, head_stride, 2 * t.half, 0.0f, true, -1.0f,
             stream, &t);
}

}  // namespace moerl::cuda
