// Causal attention core on the GPU (kernels/cuda/attention.cu): moerl::cpu::attention_forward/backward
// (kernels/attention.hpp) with the same arguments, layouts and results, up to FP32 rounding.
//   q, k [batch*seq, heads, dqk]; v, out, dout [batch*seq, heads, dv]; lse [batch, heads, seq] (natural log).
// Flash-attention style (FP32 on CUDA cores, no TF32): no [seq, seq] matrix in device memory; the backward
// recomputes P from lse, FlashAttention-2 fashion, with one pass over query tiles per key tile for dK/dV and
// one over key tiles per query tile for dQ. No atomics: results are bit-identical from run to run.
//
// All pointers are device memory, 16-byte aligned (as cudaMalloc gives); outputs are fully overwritten and
// must not overlap the inputs (the backward stages D = rowsum(dO∘O) in dq before writing dQ there). Calls
// are asynchronous on `stream`. Head dims: dqk in {24, 96, 192}, dv in {16, 64, 128} (kernels are
// templates on them); heads and batch up to 65535, seq up to 65535·64. batch, seq or heads 0: nothing is
// launched.
// Throws moerl::Error on bad arguments (another head dim, negative sizes, null or misaligned pointers) and on
// a launch failure.
#pragma once
#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

#include "kernels/cuda/rope.hpp"

namespace moerl::cuda {

// q, k, v -> out (overwritten) and lse (saved for the backward).
void attention_forward(const float* q, const float* k, const float* v, float* out, float* lse, int64_t batch,
                       int64_t seq, int64_t heads, int64_t dqk, int64_t dv, float scale,
                       cudaStream_t stream = nullptr);

// dout with the forward's q, k, v, out, lse -> dq, dk [batch*seq, heads, dqk] and dv_out [batch*seq, heads, dv],
// all overwritten.
void attention_backward(const float* dout, const float* q, const float* k, const float* v, const float* out,
                        const float* lse, float* dq, float* dk, float* dv_out, int64_t batch, int64_t seq,
                        int64_t heads, int64_t dqk, int64_t dv, float scale, cudaStream_t stream = nullptr);

// The same on tensor cores (kernels/cuda/attention_tc.cu: mma.sync BF16 x BF16 -> FP32, FlashAttention-2 style):
// q, k, v and dout are rounded to BF16 as they are read, P and dS before their products (as PyTorch's sdpa in a
// bf16 model); softmax statistics, lse and accumulation in FP32. Same layouts, outputs and guarantees as above
// (no atomics, no [seq, seq] matrix). Head dims: attention_bf16_supported (24/16, 96/64); throws otherwise.
bool attention_bf16_supported(int64_t dqk, int64_t dv);
void attention_forward_bf16(const float* q, const float* k, const float* v, float* out, float* lse, int64_t batch,
                            int64_t seq, int64_t heads, int64_t dqk, int64_t dv, float scale,
                            cudaStream_t stream = nullptr);
void attention_backward_bf16(const float* dout, const float* q, const float* k, const float* v, const float* out,
                             const float* lse, float* dq, float* dk, float* dv_out, int64_t batch, int64_t seq,
                             int64_t heads, int64_t dqk, int64_t dv, float scale, cudaStream_t stream = nullptr);

// The tensor-core kernels on operands packed once (kernels/cuda/attention_tc_pack.hpp: Q, K, V rounded to BF16 in one
// buffer of attention_bf16_packed_bytes bytes, 16-byte aligned; every kernel reads the same buffer), so a caller that
// keeps the buffer from the forward to the backward saves the backward's packing pass over q, k, v. attention_forward_bf16 /
// attention_backward_bf16 above are these with a temporary buffer packed from q, k, v. Results are bit-identical
// to theirs for the same q, k, v.
size_t attention_bf16_packed_bytes(int64_t batch, int64_t seq, int64_t heads, int64_t dqk, int64_t dv);
// packed <- q [batch*seq, heads, dn + dr] and MLA's keys and values straight from their producers: kv [batch*seq,
// heads, dn + dv] (per head [k_nope | v], the kv_b_proj output) and ckv [batch*seq, kv_lora + dr] (its last dr
// columns the rotated rope key shared by the heads): k = [k_nope | k_rope] without an FP32 copy. With `rope`, q's
// and the key's rope columns are taken unrotated and rotated as they are packed (interleaved pairs, the bits of
// cuda::rope_forward), which saves the rope passes over q and ckv. Needs attention_pack_mla_bf16_supported
// (16-byte aligned rows); throws otherwise.
bool attention_pack_mla_bf16_supported(int64_t kv_lora, int64_t dn, int64_t dr, int64_t dv);
void attention_pack_mla_bf16(const float* q, const float* kv, const float* ckv, int64_t kv_lora, void* packed,
                             int64_t batch, int64_t seq, int64_t heads, int64_t dn, int64_t dr, int64_t dv,
                             cudaStream_t stream = nullptr, const RopeTables* rope = nullptr);
void attention_forward_bf16_packed(const void* packed, float* out, float* lse, int64_t batch, int64_t seq,
                                   int64_t heads, int64_t dqk, int64_t dv, float scale, cudaStream_t stream = nullptr);
void attention_backward_bf16_packed(const float* dout, const void* packed, const float* out, const float* lse,
                                    float* dq, float* dk, float* dv_out, int64_t batch, int64_t seq, int64_t heads,
                                    int64_t dqk, int64_t dv, float scale, cudaStream_t stream = nullptr);
// The same with dqk = dn + dr and dK, dV written in the layout MLA's backward goes on with, instead of dk and
// dv_out: d_kv [batch*seq, heads, dn + dv] (per head dK's first dn columns, then dV: kv_b_proj's output gradient)
// and dk_rope [batch*seq, heads, dr] (dK's last dr columns, to be summed over the heads). Bit-identical to the
// plain form's values. Needs dn a multiple of 8. With `rope`, dQ's rope columns come out rotated back as they are
// stored (the bits of cuda::rope_backward on them; dk_rope is left for the sum over the heads).
void attention_backward_bf16_packed_mla(const float* dout, const void* packed, const float* out, const float* lse,
                                        float* dq, float* d_kv, float* dk_rope, int64_t batch, int64_t seq,
                                        int64_t heads, int64_t dn, int64_t dr, int64_t dv, float scale,
                                        cudaStream_t stream = nullptr, const RopeTables* rope = nullptr);

}  // namespace moerl::cuda
