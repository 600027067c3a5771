// dK and dV of the tensor-core attention on Hopper's warpgroup MMA (sm_90a) for dqk 96 / dv 64, selected by
// MOERL_ATTN_TC_BWD_KERNEL=wgmma (kernels/cuda/attention_tc.cu). The arithmetic of attention_dkdv_tc<.., true> (BF16
// operands, FP32 scores, P recomputed from lse, P and dS rounded to BF16 for their products, FP32 sums, dSᵀ stored in
// BF16 for attention_dq_stored_tc, which then makes dQ), with the four products on wgmma.mma_async
// (attention_tc_wgmma.cuh). No atomics: bit-identical from run to run.
//   A block is one warpgroup owning 64 keys (K and V resident in shared memory, 24 KB); the 64-query tiles from its
//   diagonal to the end stream through a ring of 2 stages (Q, dO and the 64 (lse·log2e, D) pairs, cp.async by all
//   threads), 74 KB a block, three blocks an SM. Sᵀ = K·Qᵀ and dPᵀ = V·dOᵀ read both operands K-major from shared
//   memory; dV += Pᵀ·dO and dK += dSᵀ·Q take Pᵀ and dSᵀ from registers (the C fragments of Sᵀ and dPᵀ) and read dO
//   and Q MN-major where they lie.
// The kernel it replaces (until 2026-11-30: blocks of 2 warpgroups over 128 keys, one block an SM, the second
// products reading transposed copies Qᵀ, dOᵀ made by extra passes, and dQ by a WGMMA kernel recomputing dS) took
// 1.16-1.77 ms for the whole backward against 1.03-1.04 for the mma.sync kernels.
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "kernels/cuda/attention_tc_pack.hpp"
#include "kernels/cuda/attention_tc_wgmma.cuh"
#include "kernels/cuda/cuda_check.hpp"
#include "kernels/cuda/kernel_attributes.hpp"
#include "runtime/util/env_switch.hpp"

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
// dp = C · Dᵀ over dv 64, waited for.
__device__ __forceinline__ void score_products(float (&s)[8][4], float (&dp)[8][4], uint32_t a, uint32_t a_hi,
                                               uint32_t b, uint32_t c, uint32_t d) {
  wgmma_fence();
#pragma unroll
  for (int ks = 0; ks < 4; ++ks) wgmma_ss(s, desc128(a) + 2 * ks, desc128(b) + 2 * ks, ks > 0);
#pragma unroll
  for (int ks = 0; ks < 2; ++ks) wgmma_ss(s, desc128(a + a_hi) + 2 * ks, desc128(b + 64 * kRowBytes) + 2 * ks, 1);
#pragma unroll
  for (int ks = 0; ks < 4; ++ks) wgmma_ss(dp, desc128(c) + 2 * ks, desc128(d) + 2 * ks, ks > 0);
  wgmma_commit();
  wgmma_wait_all();
  fence_frag(s);
  fence_frag(dp);
}

// Shared layout of a block (bytes from the 1024-aligned base): own K (2 panels of 64 rows: head dims 0-63, 64-95),
// own V, 2 stages of streamed tiles (Q's 2 panels, dO), then 2 stages of 64 (lse·log2e, D) pairs.
struct DkdvSmem {
  static constexpr int ROWS = 64;  // keys of a block
  static constexpr int PANEL = 64 * kRowBytes;
  static constexpr int K_OWN = 2 * PANEL, V_OWN = PANEL;
  static constexpr int Q = 0, DO = 2 * PANEL, STAGE = 3 * PANEL;
  static constexpr int STAGES = K_OWN + V_OWN, STATS = STAGES + 2 * STAGE;
  static constexpr size_t BYTES = 1024 + STATS + 2 * 64 * 2 * sizeof(float);
};
static_assert(DkdvSmem::STAGE % 1024 == 0 && DkdvSmem::STAGES % 1024 == 0, "swizzle atoms stay 1024-byte aligned");
static_assert(3 * (DkdvSmem::BYTES + 1024) <= 228 * 1024, "three blocks an SM");

// BLOCKS per SM: 2 (254 registers, no spills) or 3 (168 registers: 552 bytes spilled), MOERL_ATTN_TC_BWD_WGMMA_BLOCKS.
template <int BLOCKS>
__global__ void __launch_bounds__(128, BLOCKS) attention_dkdv_wgmma(const BackwardWgmmaArgs a) {
  using L = DkdvSmem;
  constexpr int THREADS = 128;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  uint8_t* base = smem_raw + ((1024 - smem_addr(smem_raw) % 1024) % 1024);
  float* St = reinterpret_cast<float*>(base + L::STATS);
  const int lane = threadIdx.x % 32, w = threadIdx.x / 32;
  const Pos pos = pos_of(a.seq_order);
  const int kt = pos.z, j0 = kt * L::ROWS, h = pos.h, b = pos.b, seq = a.seq, spad = a.spad;
  const int64_t bh = int64_t{b} * a.heads + h;
  const bf16* qh = a.q + bh * spad * kDq;
  const bf16* doh = a.dout + bh * spad * kDv;
  const float* sth = a.stats + bh * spad * 2;
  const int first = kt, last = (seq - 1) / 64;  // query tiles: the diagonal's to the last
  const auto load_stream = [&](int qt, int st) {
    uint8_t* s = base + L::STAGES + st * L::STAGE;
    copy_rows<64, kDq, THREADS>(s + L::Q, qh + int64_t{qt} * 64 * kDq);
    copy_rows<64, kDv, THREADS>(s + L::DO, doh + int64_t{qt} * 64 * kDv);
    if (threadIdx.x < 32) cp_async16(St + st * 128 + 4 * threadIdx.x, sth + int64_t{qt} * 128 + 4 * threadIdx.x);
  };
  copy_rows<L::ROWS, kDq, THREADS>(base, a.k + (bh * spad + j0) * kDq);
  copy_rows<L::ROWS, kDv, THREADS>(base + L::K_OWN, a.v + (bh * spad + j0) * kDv);
  load_stream(first, 0);
  cp_async_commit();

  const int w0 = j0 + 16 * w, jr = w0 + lane / 4;  // the warp's first key; this thread's jr, jr + 8
  const uint32_t k_addr = smem_addr(base), v_addr = smem_addr(base + L::K_OWN);
  float dk[12][4], dv[8][4];
  zero<96>(dk);
  zero<64>(dv);
  for (int qt = first; qt <= last; ++qt) {
    const int i0 = qt * 64, st = (qt - first) & 1;
    if (qt < last) load_stream(qt + 1, st ^ 1);  // the stage last read in iteration qt - 1, before its barrier
    cp_async_commit();
    cp_async_wait<1>();
    fence_proxy_async();
    __syncthreads();

    const uint32_t sa = smem_addr(base + L::STAGES + st * L::STAGE);
    float s[8][4], dp[8][4];
    score_products(s, dp, k_addr, L::PANEL, sa + L::Q, v_addr, sa + L::DO);  // Sᵀ = K·Qᵀ, dPᵀ = V·dOᵀ
    // Queries before some key of the warp, or past the end of the sequence, only in these tiles.
    const bool masked = i0 < w0 + 16 || i0 + 64 > seq;
    const float* Stt = St + st * 128;
    // Pᵀ and dSᵀ packed to BF16 A fragments n-tile by n-tile (a_frags' layout), so that their FP32 values die early.
    uint32_t pa[4][4], da[4][4];
#pragma unroll
    for (int n = 0; n < 8; ++n) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int c = n * 8 + (lane % 4) * 2 + e % 2, i = i0 + c, j = jr + (e / 2) * 8;
        const float ex = fast_exp2(s[n][e] * a.scale_log2 - Stt[2 * c]);  // unconditional: a select, no branch
        const float p = !masked || (j <= i && i < seq) ? ex : 0.0f;
        dp[n][e] = p * (dp[n][e] - Stt[2 * c + 1]);
        s[n][e] = p;
      }
      const int kk = n / 2, hi = 2 * (n % 2);
      pa[kk][hi] = pack_bf16(s[n][0], s[n][1]), pa[kk][hi + 1] = pack_bf16(s[n][2], s[n][3]);
      da[kk][hi] = pack_bf16(dp[n][0], dp[n][1]), da[kk][hi + 1] = pack_bf16(dp[n][2], dp[n][3]);
    }
    store_ds_frags(a.ds, bh, seq, qt, w0, da, lane);
    fence_frag(dv);
    fence_frag(dk);
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < 4; ++kk) wgmma_rs(dv, pa[kk], desc_mn(sa + L::DO + kk * kMnStep, L::PANEL));  // Pᵀ·dO
#pragma unroll
    for (int kk = 0; kk < 4; ++kk) wgmma_rs96(dk, da[kk], desc_mn(sa + L::Q + kk * kMnStep, L::PANEL));  // dSᵀ·Q
    wgmma_commit();
    wgmma_wait_all();
    fence_frag(dv);
    fence_frag(dk);
    __syncthreads();  // stage st is read before iteration qt + 1 refills it
  }
  store_kv_grads<kDq, kDv>(a.kv, b, h, seq, w0, dk, dv, a.scale, lane);
}

template <int BLOCKS> void launch(const dim3& grid, const BackwardWgmmaArgs& a, cudaStream_t stream) {
  cuda_detail::allow_dynamic_smem<attention_dkdv_wgmma<BLOCKS>>(DkdvSmem::BYTES);  // once per device
  attention_dkdv_wgmma<BLOCKS><<<grid, 128, DkdvSmem::BYTES, stream>>>(a);
  CUDA_CHECK_LAUNCH();
}

}  // namespace

void dkdv_wgmma(const BackwardWgmmaArgs& a, cudaStream_t stream) {
  static const bool three = env_switch("MOERL_ATTN_TC_BWD_WGMMA_BLOCKS", "2", "3");
  const auto tiles = static_cast<unsigned>((a.seq + DkdvSmem::ROWS - 1) / DkdvSmem::ROWS),
             h = static_cast<unsigned>(a.heads), b = static_cast<unsigned>(a.batch);
  const dim3 grid = a.seq_order ? dim3(tiles, h, b) : dim3(h, b, tiles);
  if (three) launch<3>(grid, a, stream);
  else launch<2>(grid, a, stream);
}

}  // namespace moerl::cuda::attention_tc_detail
