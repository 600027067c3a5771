// Backward of the tensor-core attention on Hopper's warpgroup MMA (sm_90a) for dqk 96 / dv 64, selected by
// MOERL_ATTN_TC_BWD_KERNEL=wgmma (kernels/cuda/attention_tc.cu). The arithmetic of attention_dkdv_tc /
// attention_dq_tc (BF16 operands, FP32 scores, P recomputed from lse, P and dS rounded to BF16 for their products,
// FP32 sums), with the products on wgmma.mma_async (attention_tc_wgmma.cuh): S and dP (or Sᵀ and dPᵀ) from shared
// tiles, the second products with P or dS from registers and the other operand from a transposed packed copy (Qᵀ,
// Kᵀ, dOᵀ [batch, heads, D, spad]: tiles K-major along the sequence). No atomics: bit-identical from run to run.
//   dK, dV: blocks of 2 warpgroups own 128 keys (64 each); query tiles of 64 from the block's diagonal to the end
//           stream through (Q, dO, Qᵀ, dOᵀ and the (lse·log2e, D) pairs, double-buffered). The first warpgroup's
//           first tile is masked whole (P = 0 adds zeros): no WGMMA in a non-uniform branch.
//   dQ:     blocks of 1 or 2 warpgroups (MOERL_ATTN_TC_BWD_DQ_WG) own 64 queries each; key tiles of 64 (K, V, Kᵀ)
//           from 0 to the diagonal.
// Measured on the H200 (bench-600m shape, model path, bench/results/2026-11-29-gpu-attn-h200-6f2dbec.txt): 1.77 ms
// (dQ blocks of 1 or 2 warpgroups alike) against 1.59 ms for the mma.sync backward, fp8 train step 184.4k against
// 188.7k tokens/s, so it stays off. Where it loses (not measured per kernel): ~0.1 ms of transposes (Qᵀ, Kᵀ,
// dOᵀ), the dK/dV kernel at one block of 8 warps per SM (138 KB of shared memory), and every WGMMA waited for at once
// (no overlap of one tile's softmax with the next tile's products inside a warpgroup).
// TODO(perf): producer/consumer warpgroups with mbarriers and 3 stages, the transposed copies written by the packing
// passes instead of separate ones, and dK/dV tiles of 64 keys with 2 blocks per SM.
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "kernels/cuda/attention_tc_pack.hpp"
#include "kernels/cuda/attention_tc_wgmma.cuh"
#include "kernels/cuda/cuda_check.hpp"
#include "kernels/cuda/kernel_attributes.hpp"

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

// The A fragments (BF16) of the 4 key or query steps of a 64 x 64 FP32 fragment.
__device__ __forceinline__ void a_frags(uint32_t (&a)[4][4], const float (&x)[8][4]) {
#pragma unroll
  for (int kk = 0; kk < 4; ++kk) {
    a[kk][0] = pack_bf16(x[2 * kk][0], x[2 * kk][1]);
    a[kk][1] = pack_bf16(x[2 * kk][2], x[2 * kk][3]);
    a[kk][2] = pack_bf16(x[2 * kk + 1][0], x[2 * kk + 1][1]);
    a[kk][3] = pack_bf16(x[2 * kk + 1][2], x[2 * kk + 1][3]);
  }
}

// Shared layout of the dK/dV kernel (bytes from the 1024-aligned base): own K (2 panels of 128 rows), own V, two
// stages of streamed tiles, then two stages of 64 (lse·log2e, D) pairs.
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

struct DkdvSmem {
  static constexpr int ROWS = 128;
  static constexpr int K_OWN = 2 * ROWS * kRowBytes, V_OWN = ROWS * kRowBytes;
  static constexpr int Q = 0, DO = Q + 2 * 64 * kRowBytes, QT = DO + 64 * kRowBytes, DOT = QT + kDq * kRowBytes;
  static constexpr int STAGE = DOT + kDv * kRowBytes;
  static constexpr int STAGES = K_OWN + V_OWN, STATS = STAGES + 2 * STAGE;
  static constexpr size_t BYTES = 1024 + STATS + 2 * 64 * 2 * sizeof(float);
};
static_assert(DkdvSmem::STAGE % 1024 == 0 && DkdvSmem::STAGES % 1024 == 0, "swizzle atoms stay 1024-byte aligned");

__global__ void __launch_bounds__(256, 1) attention_dkdv_wgmma(const BackwardWgmmaArgs a) {
  using L = DkdvSmem;
  constexpr int THREADS = 256;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  uint8_t* base = smem_raw + ((1024 - smem_addr(smem_raw) % 1024) % 1024);
  float* St = reinterpret_cast<float*>(base + L::STATS);
  const int lane = threadIdx.x % 32, wg = threadIdx.x / 128, wl = threadIdx.x / 32 % 4;
  const Pos pos = pos_of(a.seq_order);
  const int j0 = pos.z * L::ROWS, h = pos.h, b = pos.b, seq = a.seq, spad = a.spad;
  const int64_t bh = int64_t{b} * a.heads + h;
  const bf16* qh = a.q + bh * spad * kDq;
  const bf16* doh = a.dout + bh * spad * kDv;
  const bf16* qth = a.qt + bh * kDq * spad;
  const bf16* doth = a.dout_t + bh * kDv * spad;
  const float* sth = a.stats + bh * spad * 2;
  const int first = j0 / 64, last = (seq - 1) / 64;  // query tiles
  const auto load_stream = [&](int qt, int st) {
    uint8_t* s = base + L::STAGES + st * L::STAGE;
    copy_rows<64, kDq, THREADS>(s + L::Q, qh + int64_t{qt} * 64 * kDq);
    copy_rows<64, kDv, THREADS>(s + L::DO, doh + int64_t{qt} * 64 * kDv);
    copy_t<kDq, THREADS>(s + L::QT, qth + qt * 64, spad);
    copy_t<kDv, THREADS>(s + L::DOT, doth + qt * 64, spad);
    if (threadIdx.x < 32) cp_async16(St + st * 128 + 4 * threadIdx.x, sth + int64_t{qt} * 128 + 4 * threadIdx.x);
  };
  copy_rows<L::ROWS, kDq, THREADS>(base, a.k + (bh * spad + j0) * kDq);
  copy_rows<L::ROWS, kDv, THREADS>(base + L::K_OWN, a.v + (bh * spad + j0) * kDv);
  load_stream(first, 0);
  cp_async_commit();

  const int w0 = j0 + 64 * wg + 16 * wl, jr = w0 + lane / 4;  // the warp's first key; this thread's jr, jr + 8
  const uint32_t k_addr = smem_addr(base) + wg * 64 * kRowBytes;
  const uint32_t v_addr = smem_addr(base + L::K_OWN) + wg * 64 * kRowBytes;
  float dk[12][4], dv[8][4];
  zero<96>(dk);
  zero<64>(dv);
  for (int qt = first; qt <= last; ++qt) {
    const int i0 = qt * 64, st = (qt - first) & 1;
    if (qt < last) load_stream(qt + 1, st ^ 1);
    cp_async_commit();
    cp_async_wait<1>();
    fence_proxy_async();
    __syncthreads();

    const uint32_t sa = smem_addr(base + L::STAGES + st * L::STAGE);
    float s[8][4], dp[8][4];
    score_products(s, dp, k_addr, L::ROWS * kRowBytes, sa + L::Q, v_addr, sa + L::DO);
    // Queries before some key of the warp, or past the end of the sequence, only in these tiles.
    const bool masked = i0 < w0 + 16 || i0 + 64 > seq;
    const float* Stt = St + st * 128;
#pragma unroll
    for (int n = 0; n < 8; ++n)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int c = n * 8 + (lane % 4) * 2 + e % 2, i = i0 + c, j = jr + (e / 2) * 8;
        const float ex = fast_exp2(s[n][e] * a.scale_log2 - Stt[2 * c]);  // unconditional: a select, no branch
        const float p = !masked || (j <= i && i < seq) ? ex : 0.0f;
        dp[n][e] = p * (dp[n][e] - Stt[2 * c + 1]);
        s[n][e] = p;
      }
    uint32_t pa[4][4], da[4][4];
    a_frags(pa, s);
    a_frags(da, dp);
    fence_frag(dv);
    fence_frag(dk);
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < 4; ++kk) wgmma_rs(dv, pa[kk], desc128(sa + L::DOT) + 2 * kk);  // dV += Pᵀ·dO
#pragma unroll
    for (int kk = 0; kk < 4; ++kk) wgmma_rs96(dk, da[kk], desc128(sa + L::QT) + 2 * kk);  // dK += dSᵀ·Q
    wgmma_commit();
    wgmma_wait_all();
    fence_frag(dv);
    fence_frag(dk);
    __syncthreads();  // stage st is read before iteration qt + 1 refills it
  }
  store_kv_grads<kDq, kDv>(a.kv, b, h, seq, w0, dk, dv, a.scale, lane);
}

// Shared layout of the dQ kernel: own Q (2 panels of 64·WG rows), own dO, two stages of K (2 panels), V, Kᵀ.
template <int WG> struct DqSmem {
  static constexpr int ROWS = 64 * WG;
  static constexpr int Q_OWN = 2 * ROWS * kRowBytes, DO_OWN = ROWS * kRowBytes;
  static constexpr int K = 0, V = K + 2 * 64 * kRowBytes, KT = V + 64 * kRowBytes;
  static constexpr int STAGE = KT + kDq * kRowBytes, STAGES = Q_OWN + DO_OWN;
  static constexpr size_t BYTES = 1024 + STAGES + 2 * STAGE;
};

template <int WG>
__global__ void __launch_bounds__(128 * WG, WG == 1 ? 2 : 1) attention_dq_wgmma(const BackwardWgmmaArgs a) {
  using L = DqSmem<WG>;
  constexpr int THREADS = 128 * WG;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  uint8_t* base = smem_raw + ((1024 - smem_addr(smem_raw) % 1024) % 1024);
  const int lane = threadIdx.x % 32, wg = threadIdx.x / 128, wl = threadIdx.x / 32 % 4;
  const Pos pos = pos_of(a.seq_order);
  const int seq = a.seq, spad = a.spad, tiles = (seq + L::ROWS - 1) / L::ROWS;
  const int qt = tiles - 1 - pos.z, h = pos.h, b = pos.b, i0 = qt * L::ROWS;
  const int64_t bh = int64_t{b} * a.heads + h;
  const bf16* kh = a.k + bh * spad * kDq;
  const bf16* vh = a.v + bh * spad * kDv;
  const bf16* kth = a.kt + bh * kDq * spad;
  const int last = min(i0 + L::ROWS - 1, seq - 1) / 64;
  const auto load_stream = [&](int kt, int st) {
    uint8_t* s = base + L::STAGES + st * L::STAGE;
    copy_rows<64, kDq, THREADS>(s + L::K, kh + int64_t{kt} * 64 * kDq);
    copy_rows<64, kDv, THREADS>(s + L::V, vh + int64_t{kt} * 64 * kDv);
    copy_t<kDq, THREADS>(s + L::KT, kth + kt * 64, spad);
  };
  copy_rows<L::ROWS, kDq, THREADS>(base, a.q + (bh * spad + i0) * kDq);
  copy_rows<L::ROWS, kDv, THREADS>(base + L::Q_OWN, a.dout + (bh * spad + i0) * kDv);
  load_stream(0, 0);
  cp_async_commit();

  const int w0 = i0 + 64 * wg + 16 * wl, r0 = w0 + lane / 4;
  float row_lse2[2], row_d[2];
#pragma unroll
  for (int e = 0; e < 2; ++e) {  // rows < spad; zeros on padding rows
    row_lse2[e] = a.stats[2 * (bh * spad + r0 + 8 * e)];
    row_d[e] = a.stats[2 * (bh * spad + r0 + 8 * e) + 1];
  }
  const uint32_t q_addr = smem_addr(base) + wg * 64 * kRowBytes;
  const uint32_t do_addr = smem_addr(base + L::Q_OWN) + wg * 64 * kRowBytes;
  float dq[12][4];
  zero<96>(dq);
  for (int kt = 0; kt <= last; ++kt) {
    const int j0 = kt * 64, st = kt & 1;
    if (kt < last) load_stream(kt + 1, st ^ 1);
    cp_async_commit();
    cp_async_wait<1>();
    fence_proxy_async();
    __syncthreads();

    const uint32_t sa = smem_addr(base + L::STAGES + st * L::STAGE);
    float s[8][4], dp[8][4];
    score_products(s, dp, q_addr, L::ROWS * kRowBytes, sa + L::K, do_addr, sa + L::V);
    const bool diagonal = j0 + 63 > w0;  // keys after some row of the warp (and keys >= seq) only here
#pragma unroll
    for (int n = 0; n < 8; ++n)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int r = e / 2, i = r0 + 8 * r, j = j0 + n * 8 + (lane % 4) * 2 + e % 2;
        const float ex = fast_exp2(s[n][e] * a.scale_log2 - row_lse2[r]);  // unconditional: a select, no branch
        const float p = !diagonal || j <= i ? ex : 0.0f;
        dp[n][e] = p * (dp[n][e] - row_d[r]);
      }
    uint32_t da[4][4];
    a_frags(da, dp);
    fence_frag(dq);
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < 4; ++kk) wgmma_rs96(dq, da[kk], desc128(sa + L::KT) + 2 * kk);  // dQ += dS·K
    wgmma_commit();
    wgmma_wait_all();
    fence_frag(dq);
    __syncthreads();
  }
  const int64_t ldq = int64_t{a.heads} * kDq, tok0 = int64_t{b} * seq;
  store_rows<kDq>(a.dq + tok0 * ldq + h * kDq, ldq, w0, seq, dq, a.scale, lane);
}

template <auto K> void allow(size_t bytes) { cuda_detail::allow_dynamic_smem<K>(bytes); }  // per device

dim3 grid(const BackwardWgmmaArgs& a, int rows) {
  const auto tiles = static_cast<unsigned>((a.seq + rows - 1) / rows), h = static_cast<unsigned>(a.heads),
             b = static_cast<unsigned>(a.batch);
  return a.seq_order ? dim3(tiles, h, b) : dim3(h, b, tiles);
}

template <int WG> void launch_dq(const BackwardWgmmaArgs& a, cudaStream_t stream) {
  allow<attention_dq_wgmma<WG>>(DqSmem<WG>::BYTES);
  attention_dq_wgmma<WG><<<grid(a, 64 * WG), 128 * WG, DqSmem<WG>::BYTES, stream>>>(a);
  CUDA_CHECK_LAUNCH();
}

}  // namespace

void backward_wgmma(const BackwardWgmmaArgs& a, int dq_warpgroups, cudaStream_t stream) {
  allow<attention_dkdv_wgmma>(DkdvSmem::BYTES);
  attention_dkdv_wgmma<<<grid(a, DkdvSmem::ROWS), 256, DkdvSmem::BYTES, stream>>>(a);
  CUDA_CHECK_LAUNCH();
  if (dq_warpgroups == 2) launch_dq<2>(a, stream);
  else launch_dq<1>(a, stream);
}

}  // namespace moerl::cuda::attention_tc_detail
