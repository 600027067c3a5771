// The GPU model's small kernels (declared in runtime/gpu/gpu_common.hpp): the residual add and MLA's key/value
// assembly and its transpose. Plain element-wise copies and sums in a fixed order: deterministic.
#include <cuda_runtime.h>

#include <cstdint>
#include <string>

#include "kernels/cuda/cuda_check.hpp"
#include "runtime/error.hpp"
#include "runtime/gpu/gpu_common.hpp"

namespace moerl::gpu::detail {
namespace {

constexpr int kThreads = 256;

unsigned blocks_for(int64_t items) {
  constexpr int64_t kMaxBlocks = int64_t{1} << 16;  // grid-stride loops cover the rest
  const int64_t b = (items + kThreads - 1) / kThreads;
  return static_cast<unsigned>(b < 1 ? 1 : b > kMaxBlocks ? kMaxBlocks : b);
}

__global__ void add_kernel(float* __restrict__ y, const float* __restrict__ x, int64_t n) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x)
    y[i] = __fadd_rn(y[i], x[i]);
}

// One thread per (token, head, column of [k | v]): columns 0 .. dq-1 are k's, dq .. dq+dv-1 are v's.
__global__ void assemble_kv_kernel(const float* __restrict__ kv, const float* __restrict__ ckv, float* __restrict__ k,
                                   float* __restrict__ v, int64_t tokens, int64_t heads, int64_t dn, int64_t dv,
                                   int64_t dr, int64_t kv_lora) {
  const int64_t dq = dn + dr, width = dq + dv, total = tokens * heads * width;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t col = i % width, th = i / width, t = th / heads;
    const float* src = kv + th * (dn + dv);
    if (col < dn)
      k[th * dq + col] = src[col];
    else if (col < dq)
      k[th * dq + col] = ckv[t * (kv_lora + dr) + kv_lora + (col - dn)];
    else
      v[th * dv + (col - dq)] = src[dn + (col - dq)];
  }
}

// One thread per (token, head, column of [k_nope | v]) for d_kv, plus one per (token, rope column) for the
// head sum into d_ckv.
__global__ void split_dkv_kernel(const float* __restrict__ dk, const float* __restrict__ dvv, float* __restrict__ d_kv,
                                 float* __restrict__ d_ckv, int64_t tokens, int64_t heads, int64_t dn, int64_t dv,
                                 int64_t dr, int64_t kv_lora) {
  const int64_t dq = dn + dr, width = dn + dv, kv_items = tokens * heads * width, total = kv_items + tokens * dr;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    if (i < kv_items) {
      const int64_t col = i % width, th = i / width;
      d_kv[i] = col < dn ? dk[th * dq + col] : dvv[th * dv + (col - dn)];
    } else {
      const int64_t j = i - kv_items, t = j / dr, c = j % dr;
      float sum = 0.0f;  // the CPU's order: heads ascending, starting from zero
      for (int64_t h = 0; h < heads; ++h) sum = __fadd_rn(sum, dk[(t * heads + h) * dq + dn + c]);
      d_ckv[t * (kv_lora + dr) + kv_lora + c] = sum;
    }
  }
}

}  // namespace

void add_inplace(float* y, const float* x, int64_t n, cudaStream_t stream) {
  require(n >= 0, "gpu add_inplace: negative size " + std::to_string(n));
  if (n == 0) return;
  require(y && x, "gpu add_inplace: null pointer");
  add_kernel<<<blocks_for(n), kThreads, 0, stream>>>(y, x, n);
  CUDA_CHECK_LAUNCH();
}

void mla_assemble_kv(const float* kv, const float* ckv, float* k, float* v, int64_t tokens, int64_t heads, int64_t dn,
                     int64_t dv, int64_t dr, int64_t kv_lora, cudaStream_t stream) {
  require(tokens >= 0 && heads > 0 && dn >= 0 && dv > 0 && dr >= 0 && kv_lora >= 0,
          "gpu mla_assemble_kv: bad sizes");
  if (tokens == 0) return;
  require(kv && k && v && (dr == 0 || ckv), "gpu mla_assemble_kv: null pointer");
  assemble_kv_kernel<<<blocks_for(tokens * heads * (dn + dr + dv)), kThreads, 0, stream>>>(kv, ckv, k, v, tokens,
                                                                                           heads, dn, dv, dr, kv_lora);
  CUDA_CHECK_LAUNCH();
}

void mla_split_dkv(const float* dk, const float* dv, float* d_kv, float* d_ckv, int64_t tokens, int64_t heads,
                   int64_t dn, int64_t dv_dim, int64_t dr, int64_t kv_lora, cudaStream_t stream) {
  require(tokens >= 0 && heads > 0 && dn >= 0 && dv_dim > 0 && dr >= 0 && kv_lora >= 0,
          "gpu mla_split_dkv: bad sizes");
  if (tokens == 0) return;
  require(dk && dv && d_kv && (dr == 0 || d_ckv), "gpu mla_split_dkv: null pointer");
  split_dkv_kernel<<<blocks_for(tokens * heads * (dn + dv_dim) + tokens * dr), kThreads, 0, stream>>>(
      dk, dv, d_kv, d_ckv, tokens, heads, dn, dv_dim, dr, kv_lora);
  CUDA_CHECK_LAUNCH();
}

}  // namespace moerl::gpu::detail
