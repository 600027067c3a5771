// Host side of the tensor-core attention's packed BF16 operands (kernels/cuda/attention_tc_pack.cu), shared by
// attention_tc.cu. Layout of one packed buffer (attention_bf16_packed_bytes): Q [batch, heads, spad, DQP], then K
// [batch, heads, spad, DQP], then V [batch, heads, spad, DVP], BF16, each part 256-byte aligned; DQP, DVP = the head
// dims padded with zero columns to multiples of 16; spad = seq rounded up to kSeqPad with zero rows.
#pragma once
#include <cuda_bf16.h>
#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

#include "kernels/cuda/rope.hpp"

namespace moerl::cuda::attention_tc_detail {

constexpr int kSeqPad = 256;  // scratch rows per (sequence, head): seq rounded up to this (the largest block tile)

constexpr int pad16_host(int64_t d) { return static_cast<int>((d + 15) / 16 * 16); }

struct PackedLayout {
  int64_t spad, rows;  // padded sequence; packed rows batch·heads·spad
  size_t bytes_q, bytes_v;
  PackedLayout(int64_t batch, int64_t seq, int64_t heads, int64_t dqk, int64_t dv);
  size_t bytes() const { return 2 * bytes_q + bytes_v; }
  // The parts of a packed buffer at base.
  __nv_bfloat16* q(void* base) const { return static_cast<__nv_bfloat16*>(base); }
  __nv_bfloat16* k(void* base) const { return reinterpret_cast<__nv_bfloat16*>(static_cast<char*>(base) + bytes_q); }
  __nv_bfloat16* v(void* base) const {
    return reinterpret_cast<__nv_bfloat16*>(static_cast<char*>(base) + 2 * bytes_q);
  }
};

// Where packed row (token t = b·seq + s, head h) comes from: columns [0, d1) at a[t·a_tok + h·a_head + c], columns
// [d1, D) at b[t·b_tok + c − d1] (one row per token, shared by the heads: MLA's rope key). FP32; every row start
// 16-byte aligned, d1 a multiple of 8 (check_pack_src). With rope_c0 >= 0 (a multiple of 8), columns [rope_c0, D)
// are rotated on the way, interleaved pairs at position s with RoPE's tables (rope_rotate.cuh: the bits of
// cuda::rope_forward), D − rope_c0 = 2 · rope.half.
struct PackSrc {
  const float* a = nullptr;
  int64_t a_tok = 0, a_head = 0;
  int d1 = 0;
  const float* b = nullptr;
  int64_t b_tok = 0;
  int rope_c0 = -1;
  RopeTables rope;
};

// Throws moerl::Error (naming `where`) unless src can be read with 16-byte loads for head dim d.
void check_pack_src(const char* where, const PackSrc& src, int64_t d);

// dst [batch, heads, spad, pad16(d)] <- src, zeros in columns >= d and rows >= seq; d in {16, 24, 64, 96}.
void pack_operand(const PackSrc& src, int64_t d, __nv_bfloat16* dst, int64_t batch, int64_t seq, int64_t heads,
                  int64_t spad, cudaStream_t stream);

// Warpgroups per block of the WGMMA forward (attention_tc_wgmma.cu) for these head dims, or 0 for the mma.sync
// forward: MOERL_ATTN_TC_FWD_KERNEL = mma | wgmma (default wgmma), MOERL_ATTN_TC_FWD_WG = 1 | 2 (default 2); WGMMA
// only for dqk 96, dv 64. Throws moerl::Error on other values. Measured on the H200, bench-600m shape, model path
// (bench/results/2026-11-29-gpu-attn-h200-6f2dbec.txt): forward 0.358 ms (mma, 8 warps) / 0.267 (wgmma, 1) / 0.255
// (wgmma, 2 warpgroups: 337 TFLOP/s causal); it then read V from a transposed copy whose packing pass added 0.06 ms
// (0.103 -> 0.162 ms); V is read MN-major where it lies since 2026-11-30 (attention_tc_wgmma.cuh).
int forward_wgmma_warpgroups(int64_t dqk, int64_t dv);

struct ForwardWgmmaArgs {
  const __nv_bfloat16 *q, *k, *v;  // packed Q, K, V
  float *out, *lse;
  int batch, seq, spad, heads;
  float scale_log2;
  bool seq_order;
};
void forward_wgmma(const ForwardWgmmaArgs& args, int warpgroups, cudaStream_t stream);

// Where the backward kernels write dK and dV: row (token t, head h) of dK has its columns below k_split at dk + t ·
// dk_ld + h · dk_head and the rest (column c at c - k_split, k_split a multiple of 8) at dk_rest + t · rest_ld + h ·
// rest_head; dV's row at dv + t · dv_ld + h · dv_head. The plain layout ([tokens, heads, D] each): k_split = DQ;
// MLA's (attention_backward_bf16_packed_mla): dK's nope columns and dV side by side in d_kv [tokens, heads, dn + dv],
// dK's rope columns in [tokens, heads, dr].
struct KvGradOut {
  float* dk;
  int64_t dk_ld, dk_head;
  float* dk_rest;
  int64_t rest_ld, rest_head;
  int k_split;
  float* dv;
  int64_t dv_ld, dv_head;
};

// dK and dV on WGMMA (attention_tc_wgmma_bwd.cu), dqk 96 / dv 64: packed Q, K, V, dO and the stats of pack_dout in,
// dK and dV to `kv`, dSᵀ to ds (attention_tc_mma.cuh's ds_pairs layout, for the dQ kernels) unless ds is null.
struct BackwardWgmmaArgs {
  const __nv_bfloat16 *q, *k, *v, *dout;
  const float* stats;
  KvGradOut kv;  // where dK and dV go (attention_tc_mma.cuh)
  __nv_bfloat16* ds;
  int batch, seq, spad, heads;
  float scale, scale_log2;
  bool seq_order;
};
void dkdv_wgmma(const BackwardWgmmaArgs& args, cudaStream_t stream);

// RoPE rotated back on dQ's columns [c0, D) as dQ is stored (interleaved pairs, RoPE's tables at the row's
// position): the bits of cuda::rope_backward on the stored rows. c0 < 0: none.
struct DqRope {
  RopeTables t;
  int c0 = -1;
};

// dQ on WGMMA: from the dSᵀ blocks dkdv_wgmma (or attention_dkdv_tc<.., true>) stored (ds set; q, v, dout and stats
// unused), or with S, P and dS computed again from packed Q, K, V, dO and the stats of pack_dout (ds null). dQ times
// scale out ([tokens, heads, 96] FP32), its rope columns rotated back as `rope` says.
struct DqWgmmaArgs {
  const __nv_bfloat16 *q, *k, *v, *dout, *ds;
  const float* stats;
  float* dq;
  DqRope rope;
  int batch, seq, spad, heads;
  float scale, scale_log2;
  bool seq_order;
};
void dq_wgmma(const DqWgmmaArgs& args, cudaStream_t stream);

// Whether the backward's dK/dV kernel is the WGMMA one (attention_tc_wgmma_bwd.cu) for these head dims:
// MOERL_ATTN_TC_BWD_KERNEL = mma | wgmma (default wgmma), WGMMA only for dqk 96, dv 64. Throws moerl::Error on other
// values. H200, bench-600m's shape, model path: backward 0.827-0.833 ms against 1.029-1.041 with the mma.sync dK/dV
// kernel, sdpa 0.848 (bench/results/2026-11-30-gpu-attn-wgmma-dkdv-h200-aabd216+wgmma.txt).
bool dkdv_wgmma_selected(int64_t dqk, int64_t dv);
// Whether dQ runs on WGMMA (dq_wgmma) for these head dims: MOERL_ATTN_TC_BWD_DQ_KERNEL = mma | wgmma (default wgmma),
// dqk 96, dv 64 only.
bool dq_wgmma_selected(int64_t dqk, int64_t dv);

// The backward's packing of dout [batch·seq, heads, dv] into dst (as pack_operand) and stats [batch, heads, spad, 2]
// = (lse·log2e, D = Σ_c dout·out) per packed row (zeros on padding rows); dv in {16, 64}.
void pack_dout(const float* dout, const float* out, const float* lse, __nv_bfloat16* dst, float* stats, int64_t dv,
               int64_t batch, int64_t seq, int64_t heads, int64_t spad, cudaStream_t stream);

}  // namespace moerl::cuda::attention_tc_detail
