// The backward of the tensor-core attention on Hopper's warpgroup MMA (sm_90a) for dqk 96 / dv 64, the default
// (MOERL_ATTN_TC_BWD_KERNEL=mma / MOERL_ATTN_TC_BWD_DQ_KERNEL=mma select the mma.sync kernels; attention_tc.cu).
// dK and dV: the arithmetic of attention_dkdv_tc<.., true> (BF16 operands, FP32 scores, P recomputed from lse, P and
// dS rounded to BF16 for their products, FP32 sums, dSᵀ stored in BF16), with the four products on wgmma.mma_async
// (attention_tc_wgmma.cuh); dQ with S, P and dS computed again (attention_dq_recompute_wgmma, the default) or from
// that stored dSᵀ (attention_dq_wgmma, MOERL_ATTN_TC_BWD_DQ=stored). Each product sums its 16-wide steps in the
// mma.sync kernels' order, so dQ, dK and dV keep their bits (tests/gpu/attention_tc_gpu.cpp). No atomics.
//   dK/dV: a block is one warpgroup owning 64 keys (K and V resident in shared memory, 24 KB); the 64-query tiles
//   from its diagonal to the end stream through a ring of 3 stages (Q, dO and the 64 (lse·log2e, D) pairs, cp.async
//   by all threads), 98 KB a block, two blocks an SM. Sᵀ = K·Qᵀ and dPᵀ = V·dOᵀ read both operands K-major from
//   shared memory; dV += Pᵀ·dO and dK += dSᵀ·Q take Pᵀ and dSᵀ from registers (the C fragments of Sᵀ and dPᵀ) and
//   read dO and Q MN-major where they lie.
// H200, bench-600m's shape, training step's trace: dK/dV 0.51 ms a layer (0.53 storing dS) against 0.74 on mma.sync,
// dQ 0.34 recomputed or 0.22 stored (mma.sync 0.26 stored); the backward 0.869 ms recomputing against PyTorch sdpa
// 0.881 / cuDNN 0.891 (bench/results/2026-11-30-gpu-h200-9926944.jsonl), 0.776 storing against 0.903 / 0.819
// (...-4e07587.jsonl). The first WGMMA backward (until 2026-11-30: blocks of 2 warpgroups over 128 keys, one block
// an SM, the second products reading transposed copies Qᵀ, dOᵀ made by extra passes, dQ recomputing dS) took
// 1.16-1.77 ms.
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

#include "kernels/cuda/attention_tc_pack.hpp"
#include "kernels/cuda/attention_tc_wgmma.cuh"
#include "kernels/cuda/cuda_check.hpp"
#include "kernels/cuda/kernel_attributes.hpp"
#include "kernels/cuda/pdl.cuh"

namespace moerl::cuda::attention_tc_detail {
namespace {

constexpr int kDq = 96, kDv = 64;

struct Pos {
  int z, h, b;
};
__device__ __forceinline__ Pos pos_of(bool seq_order) {
  if (seq_order) return {static_cast<int>(blockIdx.x), static_cast<int>(blockIdx.y), static_cast<int>(blockIdx.z)};
  return {static_cast<int>(blockIdx.z), static_cast<int>(blockIdx.x), static_cast<int>(blockIdx.y)};
}

// The two score-side products of a 64-row block against a streamed 64-row tile, both K-major in shared memory:
// s = A · Bᵀ over dqk 96 (A's columns 64 .. 95 `a_hi` bytes after its first 64, B's 64 rows of 128 bytes later) and
// dp = C · Dᵀ over dv 64, waited for; `meanwhile` runs while the tensor cores work (the next tiles' copies: their ~100
// instructions of addresses a thread went before the WGMMAs were issued).
template <class Meanwhile>
__device__ __forceinline__ void score_products(float (&s)[8][4], float (&dp)[8][4], uint32_t a, uint32_t a_hi,
                                               uint32_t b, uint32_t c, uint32_t d, const Meanwhile& meanwhile) {
  wgmma_fence();
#pragma unroll
  for (int ks = 0; ks < 4; ++ks) wgmma_ss(s, desc128(a) + 2 * ks, desc128(b) + 2 * ks, ks > 0);
#pragma unroll
  for (int ks = 0; ks < 2; ++ks) wgmma_ss(s, desc128(a + a_hi) + 2 * ks, desc128(b + 64 * kRowBytes) + 2 * ks, 1);
#pragma unroll
  for (int ks = 0; ks < 4; ++ks) wgmma_ss(dp, desc128(c) + 2 * ks, desc128(d) + 2 * ks, ks > 0);
  wgmma_commit();
  meanwhile();
  wgmma_wait_all();
  fence_frag(s);
  fence_frag(dp);
}

// Shared layout of the dK/dV and the recomputing dQ kernels (bytes from the 1024-aligned base): the block's own
// 64-row tiles of a 96-wide operand (2 panels: columns 0-63, 64-95; dK/dV: K, dQ: Q) and a 64-wide one (V; dO), then S
// stages of the streamed 64-row tiles alike (Q, dO; K, V), then S stages of 64 (lse·log2e, D) pairs (dK/dV only).
struct PairSmem {
  static constexpr int S = 3;  // stages (see attention_dkdv_wgmma)
  static constexpr int PANEL = 64 * kRowBytes;
  static constexpr int W96 = 0, W64 = 2 * PANEL, PAIR = 3 * PANEL;  // in a pair: its two tiles; a pair's bytes
  static constexpr int RING = PAIR, STATS = RING + S * PAIR;         // offsets: stage 0, the (lse·log2e, D) pairs
  static constexpr size_t BYTES = 1024 + STATS + S * 64 * 2 * sizeof(float);
  static_assert(PAIR % 1024 == 0, "swizzle atoms stay 1024-byte aligned");
  static_assert(2 * (BYTES + 1024) <= 228 * 1024, "two blocks an SM");
};

// Two blocks an SM: 254 registers. (Three, at 168 registers, spilled 552 bytes and took 1.21-1.22 ms for the
// backward against 0.84-0.85: bench/results/2026-11-30-gpu-attn-wgmma-dq-h200-43a031f+dq.txt.) S stages of the ring,
// one barrier a tile: the stage refilled at tile qt was read at qt - 1, before it. 3 stages (98 KB a block): backward
// 0.767 and 0.767 ms against 0.790 and 0.791 with 2, rounds interleaved (same file).
__global__ void __launch_bounds__(128, 2) attention_dkdv_wgmma(const BackwardWgmmaArgs a) {
  moerl::cuda::await_previous_grid();
  using L = PairSmem;
  constexpr int THREADS = 128, S = L::S;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  uint8_t* base = swizzle_base(smem_raw);
  float* St = reinterpret_cast<float*>(base + L::STATS);
  const int lane = threadIdx.x % 32, w = threadIdx.x / 32;
  const Pos pos = pos_of(a.seq_order);
  const int kt = pos.z, j0 = kt * 64, h = pos.h, b = pos.b, seq = a.seq, spad = a.spad;
  const int64_t bh = int64_t{b} * a.heads + h;
  const bf16* qh = a.q + bh * spad * kDq;
  const bf16* doh = a.dout + bh * spad * kDv;
  const float* sth = a.stats + bh * spad * 2;
  const int first = kt, last = (seq - 1) / 64;  // query tiles: the diagonal's to the last
  // Query tile qt into stage (qt - first) % S, as one commit group (empty past the last tile).
  const auto load_stream = [&](int qt) {
    if (qt <= last) {
      const int st = (qt - first) % S;
      uint8_t* s = base + L::RING + st * L::PAIR;
      copy_rows<64, kDq, THREADS>(s + L::W96, qh + int64_t{qt} * 64 * kDq);
      copy_rows<64, kDv, THREADS>(s + L::W64, doh + int64_t{qt} * 64 * kDv);
      if (threadIdx.x < 32) cp_async16(St + st * 128 + 4 * threadIdx.x, sth + int64_t{qt} * 128 + 4 * threadIdx.x);
    }
    cp_async_commit();
  };
  copy_rows<64, kDq, THREADS>(base + L::W96, a.k + (bh * spad + j0) * kDq);
  copy_rows<64, kDv, THREADS>(base + L::W64, a.v + (bh * spad + j0) * kDv);
#pragma unroll
  for (int u = 0; u < S - 1; ++u) load_stream(first + u);  // K and V in the first group

  const int w0 = j0 + 16 * w, jr = w0 + lane / 4;  // the warp's first key; this thread's jr, jr + 8
  const uint32_t k_addr = shared_address(base + L::W96), v_addr = shared_address(base + L::W64);
  float dk[12][4], dv[8][4];
  zero<96>(dk);
  zero<64>(dv);
  for (int qt = first; qt <= last; ++qt) {
    const int i0 = qt * 64, st = (qt - first) % S;
    cp_async_wait<S - 2>();  // this thread's copies of tile qt have landed
    fence_proxy_async();
    __syncthreads();  // ... and everybody's; the stage of tile qt - 1 is no longer read

    const uint32_t sa = shared_address(base + L::RING + st * L::PAIR);
    float s[8][4], dp[8][4];
    score_products(s, dp, k_addr, L::PANEL, sa + L::W96, v_addr, sa + L::W64,  // Sᵀ = K·Qᵀ, dPᵀ = V·dOᵀ
                   [&] { load_stream(qt + S - 1); });
    // Queries before some key of the warp, or past the end of the sequence, only in these tiles.
    const bool masked = i0 < w0 + 16 || i0 + 64 > seq;
    const float4* Stt = reinterpret_cast<const float4*>(St + st * 128);
    // Pᵀ and dSᵀ packed to BF16 A fragments n-tile by n-tile (pack_a_ntile), so that their FP32 values die early.
    // Masked tiles apart: with the mask a run-time select in every tile ptxas built each tile's 32 conditions into
    // a bit mask (~5 instructions an element; SASS, 2026-12-01).
    uint32_t pa[4][4], da[4][4];
    const auto grads = [&](auto masked_tile) {
#pragma unroll
      for (int n = 0; n < 8; ++n) {
        // (lse·log2e, D) of this thread's queries c and c + 1 (c = 8 n + 2 (lane % 4)) in one 16-byte read.
        const float4 pair = Stt[4 * n + lane % 4];
        const float lse2[2] = {pair.x, pair.z}, d[2] = {pair.y, pair.w};
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int i = i0 + n * 8 + (lane % 4) * 2 + e % 2, j = jr + (e / 2) * 8;
          const float ex = fast_exp2(s[n][e] * a.scale_log2 - lse2[e % 2]);  // unconditional: a select, no branch
          const float p = !decltype(masked_tile)::value || (j <= i && i < seq) ? ex : 0.0f;
          dp[n][e] = p * (dp[n][e] - d[e % 2]);
          s[n][e] = p;
        }
        pack_a_ntile(pa, n, s[n]);
        pack_a_ntile(da, n, dp[n]);
      }
    };
    if (masked) grads(std::true_type{});
    else grads(std::false_type{});
    if (a.ds != nullptr) store_ds_frags(a.ds, bh, seq, qt, w0, da, lane);
    fence_frag(dv);
    fence_frag(dk);
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < 4; ++kk) wgmma_rs(dv, pa[kk], desc_mn(sa + L::W64 + kk * kMnStep, L::PANEL));  // Pᵀ·dO
#pragma unroll
    for (int kk = 0; kk < 4; ++kk) wgmma_rs96(dk, da[kk], desc_mn(sa + L::W96 + kk * kMnStep, L::PANEL));  // dSᵀ·Q
    wgmma_commit();
    wgmma_wait_all();
    fence_frag(dv);
    fence_frag(dk);
  }
  store_kv_grads<kDq, kDv>(a.kv, b, h, seq, w0, dk, dv, a.scale, lane);
}

// A dQ block's 64-query tile (the longest first: tiles - 1 - z) and its (sequence, head), bh = b · heads + h.
struct QueryTile {
  int qt, h, b;
  int64_t bh;
};
__device__ __forceinline__ QueryTile query_tile(const DqWgmmaArgs& a) {
  const Pos pos = pos_of(a.seq_order);
  return {(a.seq + 63) / 64 - 1 - pos.z, pos.h, pos.b, int64_t{pos.b} * a.heads + pos.h};
}

// dQ from the stored dSᵀ pair blocks (attention_tc_mma.cuh, ds_pairs): a block is one warpgroup owning a 64-query
// tile (the longest first); the key tiles 0 .. its diagonal stream through a ring of 3 stages (K's 2 panels, 16 KB,
// and the pair block, 8 KB, cp.async by all threads), 73 KB a block, three blocks an SM. dQ += dS·K takes dS's A
// fragments from the pair block by ldmatrix.trans (as attention_dq_stored_tc) and reads K MN-major (desc_mn); dQ
// stored times scale, its rope columns rotated back (store_rows_rope). Tried and not kept: blocks of 2 warpgroups over
// 2 query tiles sharing each K tile (a third of the bytes read): backward 0.785 ms against 0.780-0.784, the same bits
// (bench/results/2026-11-30-gpu-attn-wgmma-dq-h200-43a031f+dq.txt).
struct DqSmem {
  static constexpr int PANEL = 64 * kRowBytes;
  static constexpr int K = 0, DS = 2 * PANEL, STAGE = DS + static_cast<int>(kDsPairElems * sizeof(bf16));
  static constexpr int STAGES = 3;
  static constexpr size_t BYTES = 1024 + STAGES * STAGE;
};
static_assert(DqSmem::STAGE % 1024 == 0, "swizzle atoms stay 1024-byte aligned");
static_assert(3 * (DqSmem::BYTES + 1024) <= 228 * 1024, "three blocks an SM");

__global__ void __launch_bounds__(128, 3) attention_dq_wgmma(const DqWgmmaArgs a) {
  moerl::cuda::await_previous_grid();
  using L = DqSmem;
  constexpr int THREADS = 128, S = L::STAGES;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  uint8_t* base = swizzle_base(smem_raw);
  const int lane = threadIdx.x % 32, w = threadIdx.x / 32, seq = a.seq;
  const auto [qt, h, b, bh] = query_tile(a);
  const bf16* kh = a.k + bh * a.spad * kDq;
  const bf16* dsh = a.ds + bh * ds_pairs(seq) * kDsPairElems;
  const auto load = [&](int kt) {  // key tile kt into stage kt % S, as one commit group (empty past the diagonal)
    if (kt <= qt) {
      uint8_t* st = base + (kt % S) * L::STAGE;
      copy_rows<64, kDq, THREADS>(st + L::K, kh + int64_t{kt} * 64 * kDq);
      const bf16* src = dsh + ds_pair(qt, kt) * kDsPairElems;
#pragma unroll
      for (int c = threadIdx.x; c < kDsPairElems / 8; c += THREADS) cp_async16(st + L::DS + 16 * c, src + 8 * c);
    }
    cp_async_commit();
  };
#pragma unroll
  for (int kt = 0; kt < S - 1; ++kt) load(kt);
  const int qb = 2 * w;  // the warp's queries 16 w .. as sub-block columns
  float dq[12][4];
  zero<96>(dq);
  for (int kt = 0; kt <= qt; ++kt) {
    cp_async_wait<S - 2>();  // this thread's copies of tile kt have landed
    fence_proxy_async();
    __syncthreads();  // ... and everybody's; stage (kt - 1) % S, read by the waited WGMMAs of kt - 1, is free
    load(kt + S - 1);
    uint8_t* const st = base + (kt % S) * L::STAGE;
    // dS's A fragment of keys 16 kk..: ldmatrix.trans of the dSᵀ sub-blocks (key block, query block) (2 kk, qb),
    // (2 kk, qb + 1), (2 kk + 1, qb), (2 kk + 1, qb + 1); lane l gives the address of row l % 8 of matrix l / 8.
    const bf16* D = reinterpret_cast<const bf16*>(st + L::DS);
    uint32_t da[4][4];
#pragma unroll
    for (int kk = 0; kk < 4; ++kk)
      ldsm_x4_trans(da[kk], D + ds_sub(2 * kk + lane / 16, qb + lane / 8 % 2) + lane % 8 * 8);
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < 4; ++kk) wgmma_rs96(dq, da[kk], desc_mn(shared_address(st + L::K) + kk * kMnStep, L::PANEL));
    wgmma_commit();
    wgmma_wait_all();
    fence_frag(dq);
  }
  const int64_t ldq = int64_t{a.heads} * kDq, tok0 = int64_t{b} * seq;
  store_rows_rope<kDq>(a.dq + tok0 * ldq + h * kDq, ldq, qt * 64 + 16 * w, seq, dq, a.scale, a.rope, lane);
}

// dQ with S, P and dS computed again (MOERL_ATTN_TC_BWD_DQ=recompute: no dS in memory), as attention_dq_tc: a block is
// one warpgroup owning a 64-query tile (the longest first) with its Q and dO resident (24 KB); the key tiles 0 .. its
// diagonal stream through a ring of 3 stages (K's 2 panels and V, 24 KB, cp.async by all threads; PairSmem), two
// blocks an SM. S = Q·Kᵀ and dP = dO·Vᵀ read both operands K-major; dQ += dS·K takes dS from registers and reads
// K MN-major.
__global__ void __launch_bounds__(128, 2) attention_dq_recompute_wgmma(const DqWgmmaArgs a) {
  moerl::cuda::await_previous_grid();
  using L = PairSmem;
  constexpr int THREADS = 128, S = L::S;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  uint8_t* base = swizzle_base(smem_raw);
  const int lane = threadIdx.x % 32, w = threadIdx.x / 32, seq = a.seq, spad = a.spad;
  const auto [qt, h, b, bh] = query_tile(a);
  const int i0 = qt * 64;
  const bf16* kh = a.k + bh * spad * kDq;
  const bf16* vh = a.v + bh * spad * kDv;
  const auto load = [&](int kt) {  // key tile kt into stage kt % S, as one commit group (empty past the diagonal)
    if (kt <= qt) {
      uint8_t* st = base + L::RING + (kt % S) * L::PAIR;
      copy_rows<64, kDq, THREADS>(st + L::W96, kh + int64_t{kt} * 64 * kDq);
      copy_rows<64, kDv, THREADS>(st + L::W64, vh + int64_t{kt} * 64 * kDv);
    }
    cp_async_commit();
  };
  copy_rows<64, kDq, THREADS>(base + L::W96, a.q + (bh * spad + i0) * kDq);
  copy_rows<64, kDv, THREADS>(base + L::W64, a.dout + (bh * spad + i0) * kDv);
#pragma unroll
  for (int kt = 0; kt < S - 1; ++kt) load(kt);  // Q and dO in the first group

  const int w0 = i0 + 16 * w, r0 = w0 + lane / 4;  // the warp's first query; this thread's r0, r0 + 8
  float row_lse2[2], row_d[2];
#pragma unroll
  for (int e = 0; e < 2; ++e) {  // rows < spad; zeros on padding rows
    row_lse2[e] = a.stats[2 * (bh * spad + r0 + 8 * e)];
    row_d[e] = a.stats[2 * (bh * spad + r0 + 8 * e) + 1];
  }
  const uint32_t q_addr = shared_address(base + L::W96), do_addr = shared_address(base + L::W64);
  float dq[12][4];
  zero<96>(dq);
  for (int kt = 0; kt <= qt; ++kt) {
    const int j0 = kt * 64;
    cp_async_wait<S - 2>();  // this thread's copies of tile kt have landed
    fence_proxy_async();
    __syncthreads();  // ... and everybody's; stage (kt - 1) % S, read by the waited WGMMAs of kt - 1, is free
    const uint32_t st = shared_address(base + L::RING + (kt % S) * L::PAIR);
    float s[8][4], dp[8][4];
    score_products(s, dp, q_addr, L::PANEL, st + L::W96, do_addr, st + L::W64,  // S = Q·Kᵀ, dP = dO·Vᵀ
                   [&] { load(kt + S - 1); });
    const bool diagonal = j0 + 63 > w0;  // keys after some row of the warp (and keys >= seq) only here
    uint32_t da[4][4];  // dS as the A fragments of the 4 key steps, packed n-tile by n-tile
#pragma unroll
    for (int n = 0; n < 8; ++n) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int r = e / 2, i = r0 + 8 * r, j = j0 + n * 8 + (lane % 4) * 2 + e % 2;
        const float ex = fast_exp2(s[n][e] * a.scale_log2 - row_lse2[r]);  // unconditional: a select, no branch
        const float p = !diagonal || j <= i ? ex : 0.0f;
        dp[n][e] = p * (dp[n][e] - row_d[r]);
      }
      pack_a_ntile(da, n, dp[n]);
    }
    fence_frag(dq);
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < 4; ++kk) wgmma_rs96(dq, da[kk], desc_mn(st + L::W96 + kk * kMnStep, L::PANEL));  // dS·K
    wgmma_commit();
    wgmma_wait_all();
    fence_frag(dq);
  }
  const int64_t ldq = int64_t{a.heads} * kDq, tok0 = int64_t{b} * seq;
  store_rows_rope<kDq>(a.dq + tok0 * ldq + h * kDq, ldq, w0, seq, dq, a.scale, a.rope, lane);
}

}  // namespace

void dq_wgmma(const DqWgmmaArgs& a, cudaStream_t stream) {
  const auto tiles = static_cast<unsigned>((a.seq + 63) / 64), h = static_cast<unsigned>(a.heads),
             b = static_cast<unsigned>(a.batch);
  const dim3 grid = a.seq_order ? dim3(tiles, h, b) : dim3(h, b, tiles);
  if (a.ds != nullptr) {
    cuda_detail::allow_dynamic_smem<attention_dq_wgmma>(DqSmem::BYTES);  // once per device
    launch_after_previous(attention_dq_wgmma, grid, 128, DqSmem::BYTES, stream, a);
  } else {
    cuda_detail::allow_dynamic_smem<attention_dq_recompute_wgmma>(PairSmem::BYTES);
    launch_after_previous(attention_dq_recompute_wgmma, grid, 128, PairSmem::BYTES, stream, a);
  }
}

void dkdv_wgmma(const BackwardWgmmaArgs& a, cudaStream_t stream) {
  const auto tiles = static_cast<unsigned>((a.seq + 63) / 64), h = static_cast<unsigned>(a.heads),
             b = static_cast<unsigned>(a.batch);
  const dim3 grid = a.seq_order ? dim3(tiles, h, b) : dim3(h, b, tiles);
  cuda_detail::allow_dynamic_smem<attention_dkdv_wgmma>(PairSmem::BYTES);  // once per device
  launch_after_previous(attention_dkdv_wgmma, grid, 128, PairSmem::BYTES, stream, a);
}

}  // namespace moerl::cuda::attention_tc_detail
