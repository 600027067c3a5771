// The GPU model's small kernels (declared in runtime/gpu/gpu_common.hpp): the residual add and MLA's key/value
// assembly and its transpose. Plain element-wise copies and sums in a fixed order: deterministic.
#include <cuda_runtime.h>

#include <cstdint>
#include <string>

#include "kernels/cuda/cuda_check.hpp"
#include "kernels/cuda/pdl.cuh"
#include "kernels/cuda/rope_rotate.cuh"
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
  moerl::cuda::await_previous_grid();
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x)
    y[i] = __fadd_rn(y[i], x[i]);
}

// One block per token; its threads walk the token's heads x columns of [k | v] (columns 0 .. dq-1 are k's,
// dq .. dq+dv-1 are v's). 32-bit index arithmetic inside a token.
__global__ void assemble_kv_kernel(const float* __restrict__ kv, const float* __restrict__ ckv, float* __restrict__ k,
                                   float* __restrict__ v, int heads, int dn, int dv, int dr, int kv_lora) {
  moerl::cuda::await_previous_grid();
  const int64_t t = blockIdx.x;
  const int dq = dn + dr, width = dq + dv;
  const float* k_rope = ckv + t * (kv_lora + dr) + kv_lora;
  for (int i = threadIdx.x; i < heads * width; i += blockDim.x) {
    const int h = i / width, col = i % width;
    const int64_t th = t * heads + h;
    const float* src = kv + th * (dn + dv);
    if (col < dn)
      k[th * dq + col] = src[col];
    else if (col < dq)
      k[th * dq + col] = k_rope[col - dn];
    else
      v[th * dv + (col - dq)] = src[dn + (col - dq)];
  }
}

// One block per token: d_kv of each head (dK's nope columns, then dV).
__global__ void split_dkv_kernel(const float* __restrict__ dk, const float* __restrict__ dvv, float* __restrict__ d_kv,
                                 int heads, int dn, int dv, int dr) {
  moerl::cuda::await_previous_grid();
  const int64_t t = blockIdx.x;
  const int dq = dn + dr, width = dn + dv;
  for (int i = threadIdx.x; i < heads * width; i += blockDim.x) {
    const int h = i / width, col = i % width;
    const int64_t th = t * heads + h;
    d_kv[th * width + col] = col < dn ? dk[th * dq + col] : dvv[th * dv + (col - dn)];
  }
}

// A thread per (token, rope column) (grid-stride): d_ckv's rope column c = Σ over the heads of dK's rope column c,
// (t, h, c) at src[(t · heads + h) · ld + c], in head order from zero (the CPU's order). A warp's loads: one head's
// dr contiguous floats.
__global__ void sum_rope_dk_kernel(const float* __restrict__ src, int64_t ld, float* __restrict__ d_ckv,
                                   int64_t tokens, int heads, int dr, int kv_lora) {
  moerl::cuda::await_previous_grid();
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < tokens * dr;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t t = i / dr;
    const int c = static_cast<int>(i % dr);
    float sum = 0.0f;
    for (int h = 0; h < heads; ++h) sum = __fadd_rn(sum, src[(t * heads + h) * ld + c]);
    d_ckv[t * (kv_lora + dr) + kv_lora + c] = sum;
  }
}

// With RoPE: a thread per (token, pair (2i, 2i + 1)): both columns' sums as above, then rotated back at the token's
// position (the bits of cuda::rope_backward on the sums).
__global__ void sum_rope_dk_rotated_kernel(const float* __restrict__ src, int64_t ld, float* __restrict__ d_ckv,
                                           int64_t tokens, int heads, int dr, int kv_lora, int64_t seq,
                                           const float* __restrict__ cos_t, const float* __restrict__ sin_t) {
  moerl::cuda::await_previous_grid();
  const int half = dr / 2;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < tokens * half;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t t = i / half;
    const int p = static_cast<int>(i % half), c = 2 * p;
    float a = 0.0f, b = 0.0f;
    for (int h = 0; h < heads; ++h) {
      a = __fadd_rn(a, src[(t * heads + h) * ld + c]);
      b = __fadd_rn(b, src[(t * heads + h) * ld + c + 1]);
    }
    const int64_t at = (t % seq) * half + p;
    cuda::rope_rotate(a, b, cos_t[at], -sin_t[at]);
    float* dst = d_ckv + t * (kv_lora + dr) + kv_lora + c;
    dst[0] = a, dst[1] = b;
  }
}

void sum_rope_dk(const float* src, int64_t ld, float* d_ckv, int64_t tokens, int64_t heads, int64_t dr,
                 int64_t kv_lora, cudaStream_t stream) {
  if (tokens == 0 || dr == 0) return;
  moerl::cuda::launch_after_previous(sum_rope_dk_kernel, blocks_for(tokens * dr), kThreads, 0, stream, src, ld, d_ckv,
                                     tokens, static_cast<int>(heads), static_cast<int>(dr), static_cast<int>(kv_lora));
}

void check_mla_sizes(const char* fn, int64_t tokens, int64_t heads, int64_t dn, int64_t dv, int64_t dr,
                     int64_t kv_lora) {
  require(tokens >= 0 && heads > 0 && dn >= 0 && dv > 0 && dr >= 0 && kv_lora >= 0,
          [&] { return std::string("gpu ") + fn + ": bad sizes"; });
  require(tokens < (int64_t{1} << 31) && heads * (dn + dr + dv) < (int64_t{1} << 30) && kv_lora < (int64_t{1} << 30),
          [&] { return std::string("gpu ") + fn + ": sizes beyond the kernel's 32-bit per-token indexing"; });
}

}  // namespace

void add_inplace(float* y, const float* x, int64_t n, cudaStream_t stream) {
  require(n >= 0, [&] { return "gpu add_inplace: negative size " + std::to_string(n); });
  if (n == 0) return;
  require(y && x, "gpu add_inplace: null pointer");
  moerl::cuda::launch_after_previous(add_kernel, blocks_for(n), kThreads, 0, stream, y, x, n);
}

void mla_assemble_kv(const float* kv, const float* ckv, float* k, float* v, int64_t tokens, int64_t heads, int64_t dn,
                     int64_t dv, int64_t dr, int64_t kv_lora, cudaStream_t stream) {
  check_mla_sizes("mla_assemble_kv", tokens, heads, dn, dv, dr, kv_lora);
  if (tokens == 0) return;
  require(kv && k && v && (dr == 0 || ckv), "gpu mla_assemble_kv: null pointer");
  moerl::cuda::launch_after_previous(assemble_kv_kernel, static_cast<unsigned>(tokens), kThreads, 0, stream, kv, ckv, k,
                                     v, static_cast<int>(heads), static_cast<int>(dn), static_cast<int>(dv),
                                     static_cast<int>(dr), static_cast<int>(kv_lora));
}

void mla_split_dkv(const float* dk, const float* dv, float* d_kv, float* d_ckv, int64_t tokens, int64_t heads,
                   int64_t dn, int64_t dv_dim, int64_t dr, int64_t kv_lora, cudaStream_t stream) {
  check_mla_sizes("mla_split_dkv", tokens, heads, dn, dv_dim, dr, kv_lora);
  if (tokens == 0) return;
  require(dk && dv && d_kv && (dr == 0 || d_ckv), "gpu mla_split_dkv: null pointer");
  moerl::cuda::launch_after_previous(split_dkv_kernel, static_cast<unsigned>(tokens), kThreads, 0, stream, dk, dv, d_kv,
                                     static_cast<int>(heads), static_cast<int>(dn), static_cast<int>(dv_dim),
                                     static_cast<int>(dr));
  sum_rope_dk(dk + dn, dn + dr, d_ckv, tokens, heads, dr, kv_lora, stream);
}

void mla_sum_rope_dk(const float* dk_rope, float* d_ckv, int64_t tokens, int64_t heads, int64_t dr, int64_t kv_lora,
                     cudaStream_t stream, const cuda::RopeTables* rope, int64_t seq) {
  check_mla_sizes("mla_sum_rope_dk", tokens, heads, 0, 1, dr, kv_lora);
  if (tokens == 0 || dr == 0) return;
  require(dk_rope && d_ckv, "gpu mla_sum_rope_dk: null pointer");
  if (rope == nullptr) return sum_rope_dk(dk_rope, dr, d_ckv, tokens, heads, dr, kv_lora, stream);
  require(rope->fits(dr) && seq > 0 && tokens % seq == 0,
          "gpu mla_sum_rope_dk: RoPE tables of dr / 2 pairs and tokens a multiple of seq needed");
  moerl::cuda::launch_after_previous(sum_rope_dk_rotated_kernel, blocks_for(tokens * (dr / 2)), kThreads, 0, stream,
                                     dk_rope, dr, d_ckv, tokens, static_cast<int>(heads), static_cast<int>(dr),
                                     static_cast<int>(kv_lora), seq, rope->cos, rope->sin);
}

}  // namespace moerl::gpu::detail
