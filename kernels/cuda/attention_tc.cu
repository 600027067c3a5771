// Causal attention core on tensor cores (kernels/cuda/attention.hpp: attention_forward_bf16 / _backward_bf16 and
// their _packed forms): FlashAttention-2 style with mma.sync m16n8k16, BF16 operands and FP32 accumulation. Q, K, V
// and dO are rounded to BF16 (as PyTorch's sdpa sees them in a bf16 model), P and dS are rounded to BF16 as the A
// operand of the second product; softmax statistics, row sums, lse and D = rowsum(dO∘O) stay FP32. No [seq, seq]
// matrix in device memory; no atomics (bit-identical from run to run).
//
// The kernels read BF16 operands packed once (attention_tc_pack.cu: [batch, heads, spad, DP], head dim padded with
// zeros to a multiple of 16, 24 -> 32; sequence padded with zero rows to spad, a multiple of 256), so their tile
// loads are plain 16-byte cp.async copies without bounds checks, double-buffered: the next streamed tile is in
// flight while the tensor cores work on the current one. The model packs q, k, v in its forward (k, v straight from
// kv_b_proj's output) and keeps them for the backward; the plain entry points pack into scratch per call. The
// backward's packing of dO also writes, per row, lse·log2e and D (FP32, zeros on padding rows).
//
// For dqk 96 / dv 64 (bench-600m) the forward runs on WGMMA by default (attention_tc_wgmma.cu; model path on the
// H200: 0.358 -> 0.255 ms, bench/results/2026-11-29-gpu-attn-h200-6f2dbec.txt) and so does the backward
// (attention_tc_wgmma_bwd.cu, the same bits as this file's kernels: 0.87 ms recomputing dQ against 1.19, 0.78 with
// the stored dS against 1.03). Tried and dropped
// (c90c775): the backward in one kernel, a block of 8 warps per (sequence, head) computing S, P, dP and dS once for
// dK, dV and dQ, dQ added into dq in global memory in key-tile order: 1.56-1.63 vs 1.52-1.58 ms, because dq's
// read-modify-write per pair (FP32, 48 KB) runs at HBM speed (~1.0 ms alone) and one 8-warp block per SM hides
// latency worse than three 4-warp ones (bench/results/2026-11-29-gpu-attn-fused-bwd-h200-c90c775.txt). Nor did dQ's
// kernel on a stream beside dK/dV's, to share their last waves: 1.428-1.430 vs 1.432-1.438 ms
// (bench/results/2026-11-30-gpu-sweep-attn-dq-beside-h200-85ca6d7.txt).
//
// Blocks of 32·W threads (W = 4 or 8 warps: MOERL_ATTN_TC_FWD_WARPS / MOERL_ATTN_TC_BWD_WARPS, default 8 / 4; the
// backward at 9065b0d: 1.04 ms with 4, 1.07 with 8, 1.16 on the first WGMMA kernel,
// bench/results/2026-11-30-gpu-attn-bwd-shapes-h200-9065b0d.txt) own a 16·W-row tile of one (sequence, head): warp w
// rows 16w .. 16w+15, so every score row lives in one quad of lanes (mma C layout: lane holds rows lane/4 and lane/4 +
// 8, columns 2·(lane%4) + {0, 1} of each 8-wide n-tile) and row reductions are 2 shuffles. In the forward a warp may
// own 32 rows (MOERL_ATTN_TC_FWD_WARP_ROWS=32: two 16-row blocks, each K and V fragment read from shared memory feeds
// two products). The other side streams through in 64-row tiles; a warp skips a streamed tile that the causal mask
// hides from all its rows, and applies the mask only on tiles that cross its diagonal (or the end of the sequence).
// exp2 is ex2.approx (MUFU). Launches (grid (heads, batch, tiles) in tile order, longest tiles first; BlockPos):
//   forward  one query tile per block, key tiles 0 .. diagonal, online softmax in base 2, lse saved;
//   backward dK/dV per key tile over query tiles diagonal .. end (P recomputed from lse), also storing dS in BF16;
//            dQ per query tile over key tiles 0 .. diagonal from the stored dS (or, MOERL_ATTN_TC_BWD_DQ=recompute,
//            computing S, P and dS again).
// Shared tiles are row-major with each row padded to an odd multiple of 16 bytes, so the 8 row addresses of an
// ldmatrix phase hit 8 distinct bank groups. Operands whose reduction index runs along rows of the stored tile
// (V in P·V, dO in Pᵀ·dO, Q in dSᵀ·Q, K in dS·K) are read with ldmatrix.trans.
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <optional>
#include <string>
#include <type_traits>

#include "kernels/cuda/attention.hpp"
#include "kernels/cuda/attention_tc_mma.cuh"
#include "kernels/cuda/attention_tc_pack.hpp"
#include "kernels/cuda/cuda_check.hpp"
#include "kernels/cuda/kernel_attributes.hpp"
#include "kernels/cuda/rope.hpp"
#include "kernels/cuda/stream_scratch.hpp"
#include "runtime/error.hpp"

namespace moerl::cuda {
namespace {

using namespace attention_tc_detail;
constexpr float kLog2eTc = 1.4426950408889634f;
constexpr float kLn2Tc = 0.6931471805599453f;

// This block's (tile index z, head, sequence). Grids are (heads, batch, tiles) in tile order (all sequences' longest
// tiles first: a short tail) or (tiles, heads, batch) in sequence order (MOERL_ATTN_TC_ORDER=seq: the tiles of one
// (sequence, head) run together, so the tiles they all stream (forward, dQ: K, V; dK/dV: Q, dO) share the L2).
struct BlockPos {
  int z, h, b;
};
__device__ __forceinline__ BlockPos block_pos(bool seq_order) {
  if (seq_order) return {static_cast<int>(blockIdx.x), static_cast<int>(blockIdx.y), static_cast<int>(blockIdx.z)};
  return {static_cast<int>(blockIdx.z), static_cast<int>(blockIdx.x), static_cast<int>(blockIdx.y)};
}

// The query tile of a forward or dQ block of `rows` queries (the longest first: tile tiles-1-z), its first query and
// its (sequence, head), b · heads + h.
struct QueryBlock {
  int qt, h, b, i0;
  int64_t bh;
};
__device__ __forceinline__ QueryBlock query_block(int seq, int rows, int heads, bool seq_order) {
  const BlockPos pos = block_pos(seq_order);
  const int qt = (seq + rows - 1) / rows - 1 - pos.z;
  return {qt, pos.h, pos.b, qt * rows, int64_t{pos.b} * heads + pos.h};
}

// Stages of the dK/dV kernel's ring of streamed tiles. 3 (92 KB a block, still 2 blocks an SM) measured slower in
// the training step: dK/dV 0.920 against 0.896 ms, bench-600m fp8 256.8-259.9k against 260.7-261.1k tokens/s
// (bench/results/2026-11-30-gpu-attn-stored-ds-h200-*.txt).
constexpr int kDkdvStages = 2;

// Shared memory of the attention kernels (bytes): the block's own 16·WARPS-row tiles (forward Q; dK/dV: K, V; dQ: Q,
// dO), two stages (dK/dV: kDkdvStages) of each streamed 64-row tile, and for dK/dV as many of 64 (lse·log2e, D)
// pairs. (attention_dq_stored_tc: dq_stored_smem.)
template <int DQ, int DV, int WARPS> struct Smem {
  static constexpr int ROWS = 16 * WARPS, LQ = row_stride(pad16(DQ)), LV = row_stride(pad16(DV));
  // The forward's query tile has MT·ROWS rows.
  template <int MT> static constexpr size_t forward() { return size_t{2} * (MT * ROWS * LQ + 2 * kCols * (LQ + LV)); }
  static constexpr size_t dq = size_t{2} * (ROWS * (LQ + LV) + 2 * kCols * (LQ + LV));
  static constexpr size_t dkdv = size_t{2} * (ROWS * (LQ + LV) + kDkdvStages * kCols * (LQ + LV)) +
                                  size_t{4} * kDkdvStages * 2 * kCols;
};

// Forward: block z takes query tile tiles-1-z of 16·MT·WARPS rows (keys 0 .. its diagonal); warp w owns rows
// 16·MT·w .. 16·MT·w + 16·MT − 1 of it.
template <int DQ, int DV, int WARPS, int MT>
__global__ void __launch_bounds__(32 * WARPS)
    attention_forward_tc(const bf16* __restrict__ qb, const bf16* __restrict__ kb, const bf16* __restrict__ vb,
                         float* __restrict__ out, float* __restrict__ lse, int seq, int spad, int heads,
                         float scale_log2, bool seq_order) {
  constexpr int ROWS = 16 * MT * WARPS, WROWS = 16 * MT, THREADS = 32 * WARPS, DQP = pad16(DQ), DVP = pad16(DV);
  constexpr int LQ = row_stride(DQP), LV = row_stride(DVP);
  extern __shared__ __align__(16) unsigned char smem_raw[];
  bf16* Qs = reinterpret_cast<bf16*>(smem_raw);
  bf16* Ks = Qs + ROWS * LQ;       // 2 stages of kCols·LQ
  bf16* Vs = Ks + 2 * kCols * LQ;  // 2 stages of kCols·LV
  const int lane = threadIdx.x % 32, w = threadIdx.x / 32;
  const auto [qt, h, b, i0, bh] = query_block(seq, ROWS, heads, seq_order);
  const bf16* kh = kb + bh * spad * DQP;
  const bf16* vh = vb + bh * spad * DVP;
  const int last = min(i0 + ROWS - 1, seq - 1) / kCols;  // the last key tile
  copy_tile<ROWS, DQP, THREADS>(Qs, qb + (bh * spad + i0) * DQP);
  copy_tile<kCols, DQP, THREADS>(Ks, kh);
  copy_tile<kCols, DVP, THREADS>(Vs, vh);
  cp_async_commit();

  // The warp's first row; this thread's rows w0 + 16·mt + lane/4 (+ 8).
  const int w0 = i0 + WROWS * w, r0 = w0 + lane / 4;
  float m[MT][2], l[MT][2];
  float o[MT][DVP / 8][4];
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) {
    m[mt][0] = m[mt][1] = -INFINITY;
    l[mt][0] = l[mt][1] = 0.0f;
    zero<DVP>(o[mt]);
  }
  for (int kt = 0; kt <= last; ++kt) {
    const int j0 = kt * kCols, st = kt & 1;
    if (kt < last) {  // the stage st ^ 1 was last read in iteration kt - 1, before its closing barrier
      copy_tile<kCols, DQP, THREADS>(Ks + (st ^ 1) * kCols * LQ, kh + int64_t{j0 + kCols} * DQP);
      copy_tile<kCols, DVP, THREADS>(Vs + (st ^ 1) * kCols * LV, vh + int64_t{j0 + kCols} * DVP);
    }
    cp_async_commit();   // possibly empty: keeps the count of groups in flight uniform
    cp_async_wait<1>();  // this thread's copies of tile kt have landed
    __syncthreads();     // ... and everybody's

    if (j0 <= w0 + WROWS - 1) {  // key tile 0 is never skipped, so m is finite from the first tile on
      float s[MT][kNt][4];
      scores_m<DQ, MT>(s, Qs + WROWS * w * LQ, LQ, Ks + st * kCols * LQ, LQ, lane);
      // Keys after some row of the warp (also every key >= seq, for rows < seq) only in tiles reaching past w0.
      const bool diagonal = j0 + kCols - 1 > w0;
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) {
        float mx[2] = {-INFINITY, -INFINITY};
#pragma unroll
        for (int n = 0; n < kNt; ++n)
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const int i = r0 + 16 * mt + (e / 2) * 8, j = j0 + n * 8 + (lane % 4) * 2 + e % 2;
            s[mt][n][e] = diagonal && j > i ? -INFINITY : s[mt][n][e] * scale_log2;
            mx[e / 2] = fmaxf(mx[e / 2], s[mt][n][e]);
          }
#pragma unroll
        for (int a = 0; a < 2; ++a) {
          mx[a] = fmaxf(mx[a], __shfl_xor_sync(0xFFFFFFFFu, mx[a], 1));
          mx[a] = fmaxf(mx[a], __shfl_xor_sync(0xFFFFFFFFu, mx[a], 2));
          const float m_new = fmaxf(m[mt][a], mx[a]);  // finite: the row's key 0 (tile 0) or its last maximum
          const float alpha = fast_exp2(m[mt][a] - m_new);  // 0 on the first tile (m = -inf)
          m[mt][a] = m_new;
          l[mt][a] *= alpha;
#pragma unroll
          for (int n = 0; n < DVP / 8; ++n) o[mt][n][2 * a] *= alpha, o[mt][n][2 * a + 1] *= alpha;
        }
#pragma unroll
        for (int n = 0; n < kNt; ++n)
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            s[mt][n][e] = fast_exp2(s[mt][n][e] - m[mt][e / 2]);
            l[mt][e / 2] += s[mt][n][e];
          }
      }
      product_m<DVP, MT>(o, s, Vs + st * kCols * LV, LV, lane);
    }
    __syncthreads();  // stage st is read before iteration kt + 1 refills it
  }

  const int64_t ldv = int64_t{heads} * DV, tok0 = int64_t{b} * seq;
  float* lse_h = lse + bh * seq;
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) {
    float inv[2];
#pragma unroll
    for (int a = 0; a < 2; ++a) {
      l[mt][a] += __shfl_xor_sync(0xFFFFFFFFu, l[mt][a], 1);
      l[mt][a] += __shfl_xor_sync(0xFFFFFFFFu, l[mt][a], 2);
      inv[a] = 1.0f / l[mt][a];
    }
#pragma unroll
    for (int n = 0; n < DVP / 8; ++n)
      o[mt][n][0] *= inv[0], o[mt][n][1] *= inv[0], o[mt][n][2] *= inv[1], o[mt][n][3] *= inv[1];
    store_rows<DV>(out + tok0 * ldv + h * DV, ldv, w0 + 16 * mt, seq, o[mt], 1.0f, lane);
    const int r = r0 + 16 * mt;
    if (lane % 4 == 0) {
      if (r < seq) lse_h[r] = (m[mt][0] + log2f(l[mt][0])) * kLn2Tc;
      if (r + 8 < seq) lse_h[r + 8] = (m[mt][1] + log2f(l[mt][1])) * kLn2Tc;
    }
  }
}

// Backward, dK and dV of key tile z (16·WARPS keys), over the 64-query tiles from its diagonal to the end. Rows are
// keys j, score columns queries i: Pᵀ_ji = 2^(s_ij·scale·log2e − lse_i·log2e) for j <= i < seq, else 0;
// dSᵀ = Pᵀ∘(dPᵀ − D_i); dV += Pᵀ·dO, dK += dSᵀ·Q (times scale at the end). stats: attention_pack_dout_kernel.
// STORE_DS: dSᵀ also written, rounded to BF16 as its product rounds it, to ds_out (ds_pairs layout) for
// attention_dq_stored_tc. P's ex2 is evaluated for every element and the causal mask applied as a select: with the
// ex2 inside the mask's condition the compiler branched per element (BSSY, BSYNC, BRA, WARPSYNC: 16% of the
// instructions, ncu on the H200), 0.89 -> 0.76 ms a layer in the bench-600m step
// (bench/results/2026-11-30-gpu-attn-select-h200-fc74935+select.txt).
// The streamed tiles go through a ring of kDkdvStages stages, one barrier a tile (the stage refilled at tile t was
// read at t - 1, before that barrier).
template <int DQ, int DV, int WARPS, bool STORE_DS = false>
__global__ void __launch_bounds__(32 * WARPS)
    attention_dkdv_tc(const bf16* __restrict__ qb, const bf16* __restrict__ kb, const bf16* __restrict__ vb,
                      const bf16* __restrict__ dob, const float* __restrict__ stats, const KvGradOut out, int seq,
                      int spad, int heads, float scale, float scale_log2, bool seq_order,
                      bf16* __restrict__ ds_out = nullptr) {
  constexpr int ROWS = 16 * WARPS, THREADS = 32 * WARPS, DQP = pad16(DQ), DVP = pad16(DV), S = kDkdvStages;
  constexpr int LQ = row_stride(DQP), LV = row_stride(DVP);
  extern __shared__ __align__(16) unsigned char smem_raw[];
  bf16* Ks = reinterpret_cast<bf16*>(smem_raw);
  bf16* Vs = Ks + ROWS * LQ;
  bf16* Qs = Vs + ROWS * LV;        // S stages of kCols·LQ
  bf16* dOs = Qs + S * kCols * LQ;  // S stages of kCols·LV
  float* St = reinterpret_cast<float*>(dOs + S * kCols * LV);  // S stages of kCols (lse·log2e, D) pairs
  const int lane = threadIdx.x % 32, w = threadIdx.x / 32;
  const BlockPos pos = block_pos(seq_order);
  const int kt = pos.z, h = pos.h, b = pos.b, j0 = kt * ROWS;
  const int64_t bh = int64_t{b} * heads + h;
  const bf16* qh = qb + bh * spad * DQP;
  const bf16* doh = dob + bh * spad * DVP;
  const float* sth = stats + bh * spad * 2;
  const int first = j0 / kCols, last = (seq - 1) / kCols;  // query tiles
  // Query tile qt into stage (qt - first) % S, as one commit group (empty past the last tile).
  const auto load_stream = [&](int qt) {
    if (qt <= last) {
      const int st = (qt - first) % S;
      copy_tile<kCols, DQP, THREADS>(Qs + st * kCols * LQ, qh + int64_t{qt} * kCols * DQP);
      copy_tile<kCols, DVP, THREADS>(dOs + st * kCols * LV, doh + int64_t{qt} * kCols * DVP);
      if (threadIdx.x < 2 * kCols / 4)
        cp_async16(St + st * 2 * kCols + 4 * threadIdx.x, sth + int64_t{qt} * 2 * kCols + 4 * threadIdx.x);
    }
    cp_async_commit();
  };
  copy_tile<ROWS, DQP, THREADS>(Ks, kb + (bh * spad + j0) * DQP);
  copy_tile<ROWS, DVP, THREADS>(Vs, vb + (bh * spad + j0) * DVP);
#pragma unroll
  for (int u = 0; u < S - 1; ++u) load_stream(first + u);  // K and V in the first group

  const int w0 = j0 + 16 * w, jr = w0 + lane / 4;  // the warp's first key; this thread's keys jr and jr + 8
  float dk_acc[DQP / 8][4], dv_acc[DVP / 8][4];
  zero<DQP>(dk_acc);
  zero<DVP>(dv_acc);
  for (int qt = first; qt <= last; ++qt) {
    const int i0 = qt * kCols, st = (qt - first) % S;
    cp_async_wait<S - 2>();  // this thread's copies of tile qt have landed
    __syncthreads();         // ... and everybody's; the stage of tile qt - 1 is no longer read
    load_stream(qt + S - 1);

    if (i0 + kCols - 1 >= w0) {  // some query of the tile sees one of the warp's keys
      // Queries before some key of the warp, or past the end of the sequence, only in these tiles.
      const bool masked = i0 < w0 + 16 || i0 + kCols > seq;
      const bf16* Qt = Qs + st * kCols * LQ;
      const bf16* dOt = dOs + st * kCols * LV;
      const float* Stt = St + st * 2 * kCols;
      float p[kNt][4], ds[kNt][4];
      scores<DQ>(p, Ks + 16 * w * LQ, LQ, Qt, LQ, lane);   // Sᵀ = K·Qᵀ
      scores<DV>(ds, Vs + 16 * w * LV, LV, dOt, LV, lane);  // dPᵀ = V·dOᵀ
#pragma unroll
      for (int n = 0; n < kNt; ++n)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int c = n * 8 + (lane % 4) * 2 + e % 2, i = i0 + c, j = jr + (e / 2) * 8;
          const float pe = fast_exp2(p[n][e] * scale_log2 - Stt[2 * c]);  // unconditional: a select, no branch
          p[n][e] = !masked || (j <= i && i < seq) ? pe : 0.0f;
          ds[n][e] = p[n][e] * (ds[n][e] - Stt[2 * c + 1]);
        }
      if constexpr (STORE_DS) store_ds(ds_out, bh, seq, qt, w0, ds, lane);
      product<DVP>(dv_acc, p, dOt, LV, lane);
      product<DQP>(dk_acc, ds, Qt, LQ, lane);
    }
  }
  store_kv_grads<DQ, DV>(out, b, h, seq, w0, dk_acc, dv_acc, scale, lane);
}

// Backward, dQ of query tile tiles-1-z (16·WARPS queries) over key tiles 0 .. diagonal: dS = P∘(dP − D_i),
// dQ += dS·K (times scale).
template <int DQ, int DV, int WARPS>
__global__ void __launch_bounds__(32 * WARPS)
    attention_dq_tc(const bf16* __restrict__ qb, const bf16* __restrict__ kb, const bf16* __restrict__ vb,
                    const bf16* __restrict__ dob, const float* __restrict__ stats, float* __restrict__ dq, int seq,
                    int spad, int heads, float scale, float scale_log2, bool seq_order, DqRope rope) {
  constexpr int ROWS = 16 * WARPS, THREADS = 32 * WARPS, DQP = pad16(DQ), DVP = pad16(DV);
  constexpr int LQ = row_stride(DQP), LV = row_stride(DVP);
  extern __shared__ __align__(16) unsigned char smem_raw[];
  bf16* Qs = reinterpret_cast<bf16*>(smem_raw);
  bf16* dOs = Qs + ROWS * LQ;
  bf16* Ks = dOs + ROWS * LV;      // 2 stages of kCols·LQ
  bf16* Vs = Ks + 2 * kCols * LQ;  // 2 stages of kCols·LV
  const int lane = threadIdx.x % 32, w = threadIdx.x / 32;
  const auto [qt, h, b, i0, bh] = query_block(seq, ROWS, heads, seq_order);
  const bf16* kh = kb + bh * spad * DQP;
  const bf16* vh = vb + bh * spad * DVP;
  const int last = min(i0 + ROWS - 1, seq - 1) / kCols;
  copy_tile<ROWS, DQP, THREADS>(Qs, qb + (bh * spad + i0) * DQP);
  copy_tile<ROWS, DVP, THREADS>(dOs, dob + (bh * spad + i0) * DVP);
  copy_tile<kCols, DQP, THREADS>(Ks, kh);
  copy_tile<kCols, DVP, THREADS>(Vs, vh);
  cp_async_commit();

  const int w0 = i0 + 16 * w, r0 = w0 + lane / 4;  // the warp's first row; this thread's rows r0 and r0 + 8
  float row_lse2[2], row_d[2];
#pragma unroll
  for (int a = 0; a < 2; ++a) {  // rows < spad; zeros on padding rows
    row_lse2[a] = stats[2 * (bh * spad + r0 + 8 * a)];
    row_d[a] = stats[2 * (bh * spad + r0 + 8 * a) + 1];
  }
  float dq_acc[DQP / 8][4];
  zero<DQP>(dq_acc);
  for (int kt = 0; kt <= last; ++kt) {
    const int j0 = kt * kCols, st = kt & 1;
    if (kt < last) {
      copy_tile<kCols, DQP, THREADS>(Ks + (st ^ 1) * kCols * LQ, kh + int64_t{j0 + kCols} * DQP);
      copy_tile<kCols, DVP, THREADS>(Vs + (st ^ 1) * kCols * LV, vh + int64_t{j0 + kCols} * DVP);
    }
    cp_async_commit();
    cp_async_wait<1>();
    __syncthreads();

    if (j0 <= w0 + 15) {
      const bool diagonal = j0 + kCols - 1 > w0;  // keys after some row of the warp (and keys >= seq) only here
      const bf16* Kt = Ks + st * kCols * LQ;
      float p[kNt][4], ds[kNt][4];
      scores<DQ>(p, Qs + 16 * w * LQ, LQ, Kt, LQ, lane);                    // S = Q·Kᵀ
      scores<DV>(ds, dOs + 16 * w * LV, LV, Vs + st * kCols * LV, LV, lane);  // dP = dO·Vᵀ
#pragma unroll
      for (int n = 0; n < kNt; ++n)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int a = e / 2, i = r0 + 8 * a, j = j0 + n * 8 + (lane % 4) * 2 + e % 2;
          const float ex = fast_exp2(p[n][e] * scale_log2 - row_lse2[a]);  // unconditional: a select, no branch
          const float pe = !diagonal || j <= i ? ex : 0.0f;
          ds[n][e] = pe * (ds[n][e] - row_d[a]);
        }
      product<DQP>(dq_acc, ds, Kt, LQ, lane);
    }
    __syncthreads();
  }
  const int64_t ldq = int64_t{heads} * DQ, tok0 = int64_t{b} * seq;
  store_rows_rope<DQ>(dq + tok0 * ldq + h * DQ, ldq, w0, seq, dq_acc, scale, rope, lane);
}

// Backward, dQ of query tile tiles-1-z (16·WARPS queries) from the dSᵀ blocks attention_dkdv_tc<.., true> stored:
// dQ += dS·K over key tiles 0 .. diagonal (times scale), the products of attention_dq_tc in its order on the same
// BF16 dS (same bits where the two kernels' FP32 scores agree: the mma.sync dot products of the same pairs), with
// S and dP not computed again (2 of its 3 products). It streams 8 KB of dS from HBM a query tile and 12 KB of K from
// L2 a key tile through kDqStages stages (2 stages read dS at ~1.8 TB/s, 3 at ~2.2: 0.249 ms for bench-600m's
// 553 MB in the training step).
constexpr int kDqStages = 3;
template <int DQ, int WARPS>
constexpr size_t dq_stored_smem() {
  return size_t{kDqStages} * sizeof(bf16) * (kCols * row_stride(pad16(DQ)) + 16 * WARPS * kCols);
}
template <int DQ, int WARPS>
__global__ void __launch_bounds__(32 * WARPS)
    attention_dq_stored_tc(const bf16* __restrict__ kb, const bf16* __restrict__ ds, float* __restrict__ dq, int seq,
                           int spad, int heads, float scale, bool seq_order, DqRope rope) {
  constexpr int ROWS = 16 * WARPS, THREADS = 32 * WARPS, DQP = pad16(DQ), LQ = row_stride(DQP);
  constexpr int SUB = ROWS / kCols, S = kDqStages;  // the block's 64-query tiles
  constexpr int STAGE = kCols * LQ + SUB * kCols * kCols;  // K [kCols][LQ], then SUB pair blocks (bf16 elements)
  extern __shared__ __align__(16) unsigned char smem_raw[];
  bf16* const sm = reinterpret_cast<bf16*>(smem_raw);
  const int lane = threadIdx.x % 32, w = threadIdx.x / 32;
  const auto [qt, h, b, i0, bh] = query_block(seq, ROWS, heads, seq_order);
  const bf16* kh = kb + bh * spad * DQP;
  const bf16* dsh = ds + bh * ds_pairs(seq) * kDsPairElems;
  const int last = min(i0 + ROWS - 1, seq - 1) / kCols, q0 = i0 / kCols, qlast = (seq - 1) / kCols;
  const auto load = [&](int kt) {  // key tile kt into stage kt % S, as one commit group (empty past the last)
    if (kt <= last) {
      bf16* st = sm + (kt % S) * STAGE;
      copy_tile<kCols, DQP, THREADS>(st, kh + int64_t{kt} * kCols * DQP);
#pragma unroll
      for (int s = 0; s < SUB; ++s)  // the pairs that exist (key tile <= query tile < the tiles of seq): 8 KB each
        if (q0 + s >= kt && q0 + s <= qlast) {
          const bf16* src = dsh + ds_pair(q0 + s, kt) * kDsPairElems;
          bf16* dst = st + kCols * LQ + s * kDsPairElems;
#pragma unroll
          for (int c = threadIdx.x; c < kDsPairElems / 8; c += THREADS) cp_async16(dst + 8 * c, src + 8 * c);
        }
    }
    cp_async_commit();
  };
#pragma unroll
  for (int kt = 0; kt < S - 1; ++kt) load(kt);

  const int w0 = i0 + 16 * w, qb = (w0 % kCols) / 8;  // the warp's first row; its sub-block column
  float dq_acc[DQP / 8][4];
  zero<DQP>(dq_acc);
  for (int kt = 0; kt <= last; ++kt) {
    cp_async_wait<S - 2>();  // this thread's copies of tile kt have landed
    __syncthreads();         // ... and everybody's; stage (kt - 1) % S is no longer read
    load(kt + S - 1);
    if (kt * kCols <= w0 + 15) {  // as attention_dq_tc: the key tiles some row of the warp sees
      const bf16* st = sm + (kt % S) * STAGE;
      const bf16* D = st + kCols * LQ + ((w0 - i0) / kCols) * kDsPairElems;
      // dS's A fragment of keys 16 kk.. through ldmatrix.trans of dSᵀ sub-blocks (key block, query block) (2 kk, qb),
      // (2 kk, qb + 1), (2 kk + 1, qb), (2 kk + 1, qb + 1) = a0 .. a3 (queries 0-7 / 8-15 by keys 0-7, then keys
      // 8-15); lane l gives the address of row l % 8 of matrix l / 8.
      const int m = lane / 8, row = lane % 8;
      product_of<DQP>(
          dq_acc,
          [&](int kk, uint32_t(&af)[4]) { ldsm_x4_trans(af, D + ds_sub(2 * kk + m / 2, qb + m % 2) + row * 8); }, st,
          LQ, lane);
    }
  }
  const int64_t ldq = int64_t{heads} * DQ, tok0 = int64_t{b} * seq;
  store_rows_rope<DQ>(dq + tok0 * ldq + h * DQ, ldq, w0, seq, dq_acc, scale, rope, lane);
}

template <int N> using Dim = std::integral_constant<int, N>;

// f(Dim<DQ>, Dim<DV>) for the head dims with tensor-core kernels; false for any other pair.
template <class F> bool dispatch_tc(int64_t dqk, int64_t dv, F&& f) {
  if (dqk == 24 && dv == 16) return f(Dim<24>{}, Dim<16>{}), true;  // tests/fixtures/deepseek-v3-tiny
  if (dqk == 96 && dv == 64) return f(Dim<96>{}, Dim<64>{}), true;  // bench-600m
  return false;
}

// f(Dim<W>) for the warps per block named by environment variable `name` (4 or 8; `fallback` when unset).
// With kUpTo16, 16 warps too.
template <bool kUpTo16 = false, class F> void dispatch_warps(const char* name, int fallback, F&& f) {
  int warps = fallback;
  if (const char* e = std::getenv(name); e != nullptr && *e != '\0') warps = std::atoi(e);
  require(warps == 4 || warps == 8 || (kUpTo16 && warps == 16), [&] {
    return std::string("moerl::cuda attention: ") + name + (kUpTo16 ? " must be 4, 8 or 16" : " must be 4 or 8");
  });
  if constexpr (kUpTo16) {
    if (warps == 16) return f(Dim<16>{});
  }
  if (warps == 8) f(Dim<8>{});
  else f(Dim<4>{});
}

// Query rows per warp of the forward (MOERL_ATTN_TC_FWD_WARP_ROWS: 16 or 32, default 16).
int forward_warp_rows() {
  int rows = 16;
  if (const char* e = std::getenv("MOERL_ATTN_TC_FWD_WARP_ROWS"); e != nullptr && *e != '\0') rows = std::atoi(e);
  require(rows == 16 || rows == 32, "moerl::cuda attention: MOERL_ATTN_TC_FWD_WARP_ROWS must be 16 or 32");
  return rows;
}

// Block order of the grids (MOERL_ATTN_TC_ORDER: "tile" or "seq", default tile; see BlockPos). Measured on the H200
// (bench-600m shape, bench/results/2026-11-29-gpu-attn-h200-765171c.*): seq order is slower, forward 0.71 -> 0.77
// ms, backward 1.84 -> 1.94 ms (the L2 held the streamed tiles in tile order too); again with the stored dS (in the
// training step, af27922): dK/dV 0.890 -> 0.914, dQ 0.249 -> 0.266, forward 0.252 -> 0.273 ms
// (bench/results/2026-11-30-gpu-attn-stored-ds-h200-*.txt).
bool seq_order(const char* name = "MOERL_ATTN_TC_ORDER", bool unset = false) {
  const char* e = std::getenv(name);
  if (e == nullptr || *e == '\0') return unset;
  const std::string v(e);
  require(v == "seq" || v == "tile",
          [&] { return std::string("moerl::cuda attention: ") + name + " must be seq or tile, got " + v; });
  return v == "seq";
}

// The block order of the WGMMA backward's kernels (MOERL_ATTN_TC_BWD_ORDER, default seq: a (sequence, head)'s tiles
// run together and read its streamed tiles while the L2 holds them). H200, model path: with the WGMMA dQ kernel the
// backward took 0.770-0.796 ms in seq order against 0.843-0.874 in tile order; both WGMMA kernels in seq order
// 0.767-0.777 against 0.790-0.791 (bench/results/2026-11-30-gpu-attn-wgmma-dq-h200-43a031f+dq.txt).
bool wgmma_bwd_seq_order() { return seq_order("MOERL_ATTN_TC_BWD_ORDER", true); }

// How the backward gets dQ (MOERL_ATTN_TC_BWD_DQ): "recompute" (the default: S, dP and dS again per query tile,
// attention_dq_tc or the WGMMA dq_wgmma; no L x L matrix in memory, as issue 4 asks) or "stored" (the dK/dV kernel
// also writes dS, attention_dq_stored_tc or dq_wgmma reads it back), same bits. On WGMMA, H200, rounds interleaved:
// backward 0.869-0.873 ms recomputing against 0.774-0.776 stored, bench-600m fp8 302.7k / 301.7k against 302.9k /
// 308.7k tokens/s, peak 22.72 against 22.99 GiB (bench/results/2026-11-30-gpu-attn-wgmma-dq-h200-43a031f+dq.txt);
// stored was the default until then. The mma.sync kernels' history: Stored needs a temporary of ds_bytes (BF16 blocks of the causal triangle: 553 MB at bench-600m's
// 8 x 2048 tokens, 16 heads; peak 23.96 against 23.70 GiB); above kStoredDsLimit it recomputes. Measured on the
// H200 in the training step (bench/results/2026-11-30-gpu-attn-stored-ds-h200-*.txt): dK/dV 0.901 ms with the
// stores against 0.861 without, dQ 0.278 against 0.533 ms, bench-600m fp8 261.1-262.5k against 254.6-256.2k
// tokens/s, bf16 183.5-185.1k against 180.2-181.5k (rounds interleaved). A first layout (dSᵀ rows of 128 bytes,
// 4-byte stores 16 bytes a row, the dQ kernel double-buffered) gained only 0.05 ms a layer: dK/dV 1.036, dQ 0.309.
// Again at 02897b5 (BF16 logits): backward 1.03-1.04 ms stored against 1.19-1.20 recomputing, bench-600m fp8 287.9-
// 291.1k against 281.5-283.0k tokens/s, peak 22.99 against 22.72 GiB; the recomputing dQ kernel in blocks of 8 warps
// (171 registers: one block an SM) 1.27 ms (bench/results/2026-11-30-gpu-attn-dq-stored-vs-recompute-h200-02897b5.txt).
// The stored dS is half of an L x L matrix per (sequence, head) in device memory (capped at kStoredDsLimit).
// Tried and removed (2026-12-01): dQ fused into the WGMMA dK/dV kernel, FlashAttention-2's way (dS stored transposed
// to shared memory by stmatrix, dS·K one more m64n96 product, each tile pair's 64 x 96 share scaled, rope-rotated and
// added into a zeroed dQ): correct (rel L2 <= 4e-7 from the ordered sums) but the backward took 1.56 ms with
// red.global.add.v2.f32 and 1.48 ms with bulk reductions from a staged tile (2-stage ring), against 0.87 recomputing;
// bench-600m fp8 282k vs 320k tokens/s. Its 1.66 GB of FP32 adds a layer (24 KB per 64 x 64 tile pair, 2.3x
// FlashAttention-3's per FLOP at hdim 128) ran at ~1.6 TB/s in L2 (bench/results/2026-12-01-gpu-attn-fused-dq-h200-*).
constexpr double kStoredDsLimit = 4.0 * (1 << 30);
bool stored_dq(double ds_bytes) {
  const char* e = std::getenv("MOERL_ATTN_TC_BWD_DQ");
  const std::string v = e == nullptr ? "" : e;
  require(v.empty() || v == "stored" || v == "recompute",
          [&] { return "moerl::cuda attention: MOERL_ATTN_TC_BWD_DQ must be recompute or stored, got " + v; });
  return v == "stored" && ds_bytes <= kStoredDsLimit;
}

// Checks the arguments common to all entry points; false when there is nothing to do.
bool check_tc(const std::string& where, int64_t batch, int64_t seq, int64_t heads, int64_t dqk, int64_t dv,
              float scale, std::initializer_list<const void*> tensors, const void* lse) {
  require(batch >= 0 && seq >= 0 && heads >= 0, [&] { return where + ": batch, seq and heads must be >= 0"; });
  require(attention_bf16_supported(dqk, dv), [&] {
    return where + ": head dims dqk " + std::to_string(dqk) + ", dv " + std::to_string(dv) +
           " not supported (24/16 or 96/64)";
  });
  require(std::isfinite(scale), [&] { return where + ": scale must be finite"; });
  if (batch == 0 || seq == 0 || heads == 0) return false;
  require(heads <= 65535 && batch <= 65535 && seq <= int64_t{65535} * kCols,
          [&] { return where + ": heads, batch must be <= 65535 and seq <= 65535·64"; });
  require(batch * heads * (seq + kSeqPad) * 16 / 256 <= INT32_MAX,
          [&] { return where + ": too many (token, head) rows"; });
  for (const void* p : tensors) {
    require(p != nullptr, [&] { return where + ": null tensor pointer"; });
    require(reinterpret_cast<uintptr_t>(p) % 16 == 0,
            [&] { return where + ": tensor pointers must be 16-byte aligned"; });
  }
  require(lse != nullptr, [&] { return where + ": null lse pointer"; });
  return true;
}

dim3 grid_of(int64_t batch, int64_t seq, int64_t heads, int rows, bool seq_major) {
  const auto tiles = static_cast<unsigned>((seq + rows - 1) / rows), h = static_cast<unsigned>(heads),
             b = static_cast<unsigned>(batch);
  return seq_major ? dim3(tiles, h, b) : dim3(h, b, tiles);
}

// Raises a kernel's dynamic shared memory limit to `bytes`, once per kernel and device.
template <auto K> void allow_smem(size_t bytes) { cuda_detail::allow_dynamic_smem<K>(bytes); }

// packed <- q, k, v (plain [batch*seq, heads, d] FP32 tensors).
void pack_plain(const float* q, const float* k, const float* v, void* packed, int64_t batch, int64_t seq,
                int64_t heads, int64_t dqk, int64_t dv, cudaStream_t stream) {
  const PackedLayout pl(batch, seq, heads, dqk, dv);
  const auto src = [&](const float* x, int64_t d) { return PackSrc{x, heads * d, d, static_cast<int>(d), nullptr, 0}; };
  pack_operand(src(q, dqk), dqk, pl.q(packed), batch, seq, heads, pl.spad, stream);
  pack_operand(src(k, dqk), dqk, pl.k(packed), batch, seq, heads, pl.spad, stream);
  pack_operand(src(v, dv), dv, pl.v(packed), batch, seq, heads, pl.spad, stream);
}

}  // namespace

bool attention_bf16_supported(int64_t dqk, int64_t dv) {
  return dispatch_tc(dqk, dv, [](auto, auto) {});
}

void attention_forward_bf16_packed(const void* packed, float* out, float* lse, int64_t batch, int64_t seq,
                                   int64_t heads, int64_t dqk, int64_t dv, float scale, cudaStream_t stream) {
  if (!check_tc("moerl::cuda::attention_forward_bf16_packed", batch, seq, heads, dqk, dv, scale, {packed, out}, lse))
    return;
  const bool order = seq_order();
  dispatch_tc(dqk, dv, [&](auto dq_dim, auto dv_dim) {
    constexpr int DQ = decltype(dq_dim)::value, DV = decltype(dv_dim)::value;
    const PackedLayout pl(batch, seq, heads, DQ, DV);
    void* base = const_cast<void*>(packed);  // read only below
    const int s = static_cast<int>(seq), sp = static_cast<int>(pl.spad), h = static_cast<int>(heads);
    if (const int wg = forward_wgmma_warpgroups(DQ, DV); wg > 0) {
      forward_wgmma({pl.q(base), pl.k(base), pl.v(base), out, lse, static_cast<int>(batch), s, sp, h,
                     scale * kLog2eTc, order},
                    wg, stream);
      return;
    }
    dispatch_warps("MOERL_ATTN_TC_FWD_WARPS", 8, [&](auto w_dim) {
      constexpr int W = decltype(w_dim)::value;
      const auto launch = [&](auto mt_dim) {
        constexpr int MT = decltype(mt_dim)::value;
        constexpr size_t smem = Smem<DQ, DV, W>::template forward<MT>();
        allow_smem<attention_forward_tc<DQ, DV, W, MT>>(smem);
        attention_forward_tc<DQ, DV, W, MT><<<grid_of(batch, seq, heads, 16 * MT * W, order), 32 * W, smem, stream>>>(
            pl.q(base), pl.k(base), pl.v(base), out, lse, s, sp, h, scale * kLog2eTc, order);
        CUDA_CHECK_LAUNCH();
      };
      if (forward_warp_rows() == 32) launch(Dim<2>{});
      else launch(Dim<1>{});
    });
  });
}

namespace {

// attention_backward_bf16_packed's body, dK and dV written as `kv` says (checked by the callers).
void backward_packed(const float* dout, const void* packed, const float* out, const float* lse, float* dq,
                     const KvGradOut& kv, int64_t batch, int64_t seq, int64_t heads, int64_t dqk, int64_t dv,
                     float scale, cudaStream_t stream, const RopeTables* rope = nullptr) {
  // dQ's rope columns (the last 2 · rope->half) rotated back as dQ is stored.
  DqRope dq_rope;
  if (rope != nullptr)
    dq_rope = DqRope{*rope, static_cast<int>(dqk - 2 * rope->half)};
  const bool order = seq_order();
  dispatch_tc(dqk, dv, [&](auto dq_dim, auto dv_dim) {
    constexpr int DQ = decltype(dq_dim)::value, DV = decltype(dv_dim)::value;
    const PackedLayout pl(batch, seq, heads, DQ, DV);
    void* base = const_cast<void*>(packed);  // read only below
    const int s = static_cast<int>(seq), sp = static_cast<int>(pl.spad), h = static_cast<int>(heads);
    // dO packed and the per-row stats: [rows, DVP] BF16, then [rows, 2] FP32.
    const size_t bytes_stats = cuda_detail::align256(static_cast<size_t>(pl.rows) * 2 * sizeof(float));
    cuda_detail::StreamScratch scratch(pl.bytes_v + bytes_stats, stream);
    bf16* dob = scratch.as<bf16>();
    float* stats = scratch.as<float>(pl.bytes_v);
    pack_dout(dout, out, lse, dob, stats, DV, batch, seq, heads, pl.spad, stream);
    dispatch_warps("MOERL_ATTN_TC_BWD_WARPS", 4, [&](auto w_dim) {
      constexpr int W = decltype(w_dim)::value;
      constexpr size_t smem_dkdv = Smem<DQ, DV, W>::dkdv, smem_dq = Smem<DQ, DV, W>::dq;
      const dim3 grid = grid_of(batch, seq, heads, 16 * W, order);
      // In double: at the largest shapes check_tc allows, the product passes 2^63.
      const double ds_bytes = static_cast<double>(batch * heads) * static_cast<double>(ds_pairs(seq)) *
                              static_cast<double>(kDsPairElems * sizeof(bf16));
      // The stored dSᵀ (MOERL_ATTN_TC_BWD_DQ=stored), written by the dK/dV kernel and read by dQ's.
      const bool stored = stored_dq(ds_bytes);
      std::optional<cuda_detail::StreamScratch> ds;
      if (stored) ds.emplace(static_cast<size_t>(ds_bytes), stream);
      bf16* const ds_out = stored ? ds->as<bf16>() : nullptr;
      if (dkdv_wgmma_selected(DQ, DV)) {
        dkdv_wgmma({pl.q(base), pl.k(base), pl.v(base), dob, stats, kv, ds_out, static_cast<int>(batch), s, sp, h,
                    scale, scale * kLog2eTc, wgmma_bwd_seq_order()},
                   stream);
      } else if (stored) {
        allow_smem<attention_dkdv_tc<DQ, DV, W, true>>(smem_dkdv);
        attention_dkdv_tc<DQ, DV, W, true><<<grid, 32 * W, smem_dkdv, stream>>>(
            pl.q(base), pl.k(base), pl.v(base), dob, stats, kv, s, sp, h, scale, scale * kLog2eTc, order, ds_out);
        CUDA_CHECK_LAUNCH();
      } else {
        allow_smem<attention_dkdv_tc<DQ, DV, W>>(smem_dkdv);
        attention_dkdv_tc<DQ, DV, W><<<grid, 32 * W, smem_dkdv, stream>>>(
            pl.q(base), pl.k(base), pl.v(base), dob, stats, kv, s, sp, h, scale, scale * kLog2eTc, order);
        CUDA_CHECK_LAUNCH();
      }
      if (dq_wgmma_selected(DQ, DV)) {
        dq_wgmma({pl.q(base), pl.k(base), pl.v(base), dob, ds_out, stats, dq, dq_rope, static_cast<int>(batch), s, sp,
                  h, scale, scale * kLog2eTc, wgmma_bwd_seq_order()},
                 stream);
      } else if (stored) {
        // The dQ kernel's warps (MOERL_ATTN_TC_BWD_DQ_WARPS: 4, 8 or 16; 16 query rows a warp, so 1, 2 or 4 query
        // tiles share each K tile read; default 8). In the training step on the H200: bench-600m fp8 261.9-262.5k
        // tokens/s at 8 against 260.7-261.1k at 4 and 260.6-260.7k at 16, the kernel 0.276 ms at 16 against 0.278
        // at 4: it is not bound by the K tiles' reads (bench/results/2026-11-30-gpu-attn-stored-ds-h200-*.txt). Nor
        // did warps of 32 query rows (each K fragment read once for two row blocks) pay: the kernel 0.240 ms at
        // 4 x 32 against 0.253 at 8 x 16, the step within noise (8 x 16 262.1-262.8k, 4 x 32 261.3-262.9k, 8 x 32
        // 262.3-263.0k tokens/s), so that variant was removed.
        dispatch_warps<true>("MOERL_ATTN_TC_BWD_DQ_WARPS", 8, [&](auto dw_dim) {
          constexpr int DW = decltype(dw_dim)::value;
          constexpr size_t smem_dqs = dq_stored_smem<DQ, DW>();
          allow_smem<attention_dq_stored_tc<DQ, DW>>(smem_dqs);
          attention_dq_stored_tc<DQ, DW><<<grid_of(batch, seq, heads, 16 * DW, order), 32 * DW, smem_dqs, stream>>>(
              pl.k(base), ds_out, dq, s, sp, h, scale, order, dq_rope);
          CUDA_CHECK_LAUNCH();
        });
      } else {
        allow_smem<attention_dq_tc<DQ, DV, W>>(smem_dq);
        attention_dq_tc<DQ, DV, W><<<grid, 32 * W, smem_dq, stream>>>(pl.q(base), pl.k(base), pl.v(base), dob, stats,
                                                                      dq, s, sp, h, scale, scale * kLog2eTc, order,
                                                                      dq_rope);
        CUDA_CHECK_LAUNCH();
      }
      if (ds) ds->release();
    });
    scratch.release();
  });
}

}  // namespace

void attention_backward_bf16_packed(const float* dout, const void* packed, const float* out, const float* lse,
                                    float* dq, float* dk, float* dv_out, int64_t batch, int64_t seq, int64_t heads,
                                    int64_t dqk, int64_t dv, float scale, cudaStream_t stream) {
  const std::string where = "moerl::cuda::attention_backward_bf16_packed";
  if (!check_tc(where, batch, seq, heads, dqk, dv, scale, {dout, packed, out, dq, dk, dv_out}, lse)) return;
  const KvGradOut kv{dk, heads * dqk, dqk, dk, heads * dqk, dqk, static_cast<int>(dqk), dv_out, heads * dv, dv};
  backward_packed(dout, packed, out, lse, dq, kv, batch, seq, heads, dqk, dv, scale, stream);
}

void attention_backward_bf16_packed_mla(const float* dout, const void* packed, const float* out, const float* lse,
                                        float* dq, float* d_kv, float* dk_rope, int64_t batch, int64_t seq,
                                        int64_t heads, int64_t dn, int64_t dr, int64_t dv, float scale,
                                        cudaStream_t stream, const RopeTables* rope) {
  const std::string where = "moerl::cuda::attention_backward_bf16_packed_mla";
  require(rope == nullptr || rope->fits(dr), [&] { return where + ": RoPE tables of dr / 2 pairs needed"; });
  require(dn > 0 && dr > 0 && dn % 8 == 0, [&] {
    return where + ": needs dn a positive multiple of 8 and dr > 0, got dn " + std::to_string(dn) + ", dr " +
           std::to_string(dr);
  });
  const int64_t dqk = dn + dr, width = dn + dv;
  if (!check_tc(where, batch, seq, heads, dqk, dv, scale, {dout, packed, out, dq, d_kv, dk_rope}, lse)) return;
  const KvGradOut kv{d_kv, heads * width, width, dk_rope, heads * dr, dr, static_cast<int>(dn),
                     d_kv + dn, heads * width, width};
  backward_packed(dout, packed, out, lse, dq, kv, batch, seq, heads, dqk, dv, scale, stream, rope);
}

void attention_forward_bf16(const float* q, const float* k, const float* v, float* out, float* lse, int64_t batch,
                            int64_t seq, int64_t heads, int64_t dqk, int64_t dv, float scale, cudaStream_t stream) {
  if (!check_tc("moerl::cuda::attention_forward_bf16", batch, seq, heads, dqk, dv, scale, {q, k, v, out}, lse)) return;
  cuda_detail::StreamScratch scratch(attention_bf16_packed_bytes(batch, seq, heads, dqk, dv), stream);
  pack_plain(q, k, v, scratch.as<void>(), batch, seq, heads, dqk, dv, stream);
  attention_forward_bf16_packed(scratch.as<void>(), out, lse, batch, seq, heads, dqk, dv, scale, stream);
  scratch.release();
}

void attention_backward_bf16(const float* dout, const float* q, const float* k, const float* v, const float* out,
                             const float* lse, float* dq, float* dk, float* dv_out, int64_t batch, int64_t seq,
                             int64_t heads, int64_t dqk, int64_t dv, float scale, cudaStream_t stream) {
  const std::string where = "moerl::cuda::attention_backward_bf16";
  if (!check_tc(where, batch, seq, heads, dqk, dv, scale, {dout, q, k, v, out, dq, dk, dv_out}, lse)) return;
  cuda_detail::StreamScratch scratch(attention_bf16_packed_bytes(batch, seq, heads, dqk, dv), stream);
  pack_plain(q, k, v, scratch.as<void>(), batch, seq, heads, dqk, dv, stream);
  attention_backward_bf16_packed(dout, scratch.as<void>(), out, lse, dq, dk, dv_out, batch, seq, heads, dqk, dv, scale,
                                 stream);
  scratch.release();
}

}  // namespace moerl::cuda
