// Forward of the tensor-core attention on Hopper's warpgroup MMA (sm_90a) for bench-600m's head dims (dqk 96,
// dv 64), the default (MOERL_ATTN_TC_FWD_KERNEL=mma selects the mma.sync one; kernels/cuda/attention_tc.cu). Same
// arithmetic as attention_forward_tc (BF16 operands, FP32 scores and sums, online softmax in base 2 with ex2.approx,
// P rounded to BF16 for the product, lse saved), with each warpgroup (4 warps, 64 query rows) computing S = Q·Kᵀ by
// wgmma.mma_async m64n64k16 from shared memory (Q and K tiles K-major) and O += P·V with P from registers and V's
// tile read MN-major where it lies (desc_mn; until 2026-11-30 from a transposed packed copy Vᵀ, one more packing
// pass over V per layer). Shared tiles: 128-byte rows in WGMMA's 128-byte swizzle (16-byte chunk c of row r at
// c ^ (r % 8), as in sm90_fp8_grouped_gemm.cu); Q and K (96 columns = 192 bytes a row) in two 128-byte panels (the
// second half used). Key tiles of 64 rows, double-buffered with cp.async (the next tile's copies issued behind the
// score WGMMAs); the mask is applied on the tiles crossing a warp's diagonal. Blocks of 1 or 2 warpgroups
// (MOERL_ATTN_TC_FWD_WG), one query tile of 64 per warpgroup.
// Measured on the H200 (bench-600m shape, bench/results/2026-11-29-gpu-attn-h200-6f2dbec.txt): 0.255 ms, 337 TFLOP/s
// causal (mma.sync forward: 0.358 ms); attn.fwd per layer in the fp8 train step 1.24 -> 1.04 ms.
// TODO(perf): overlap a tile's softmax with the next tile's S = Q·Kᵀ (two S fragments, wait_group 1), key tiles of
// 128, and a producer warpgroup with TMA (FlashAttention-3's schedule).
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>

#include "kernels/cuda/attention_tc_pack.hpp"
#include "kernels/cuda/attention_tc_wgmma.cuh"
#include "kernels/cuda/cuda_check.hpp"
#include "kernels/cuda/kernel_attributes.hpp"
#include "kernels/cuda/pdl.cuh"

namespace moerl::cuda::attention_tc_detail {
namespace {

constexpr float kLn2Wg = 0.6931471805599453f;

template <int WG>
__global__ void __launch_bounds__(128 * WG, WG == 2 ? 2 : 3)  // 2 or 3 blocks per SM (registers, shared memory)
    attention_forward_wgmma(const bf16* __restrict__ qb, const bf16* __restrict__ kb, const bf16* __restrict__ vb,
                            float* __restrict__ out, float* __restrict__ lse, int seq, int spad, int heads,
                            float scale_log2, bool seq_order) {
  moerl::cuda::await_previous_grid();
  constexpr int DQ = 96, DV = 64, ROWS = 64 * WG, THREADS = 128 * WG;
  constexpr int Q_PANEL = ROWS * kRowBytes, K_PANEL = kKeyTile * kRowBytes;
  constexpr int Q_BYTES = 2 * Q_PANEL, K_BYTES = 2 * K_PANEL, V_BYTES = kKeyTile * kRowBytes;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  uint8_t* base = swizzle_base(smem_raw);
  uint8_t* Qs = base;
  uint8_t* Ks = Qs + Q_BYTES;       // 2 stages
  uint8_t* Vs = Ks + 2 * K_BYTES;  // 2 stages
  const int lane = threadIdx.x % 32, wg = threadIdx.x / 128, wl = threadIdx.x / 32 % 4;
  int z, h, b;
  if (seq_order) z = blockIdx.x, h = blockIdx.y, b = blockIdx.z;
  else z = blockIdx.z, h = blockIdx.x, b = blockIdx.y;
  const int tiles = (seq + ROWS - 1) / ROWS, qt = tiles - 1 - z, i0 = qt * ROWS;
  const int64_t bh = int64_t{b} * heads + h;
  const bf16* kh = kb + bh * spad * DQ;
  const bf16* vh = vb + bh * spad * DV;
  const int last = min(i0 + ROWS - 1, seq - 1) / kKeyTile;  // the block's last key tile
  copy_rows<ROWS, DQ, THREADS>(Qs, qb + (bh * spad + i0) * DQ);
  copy_rows<kKeyTile, DQ, THREADS>(Ks, kh);
  copy_rows<kKeyTile, DV, THREADS>(Vs, vh);
  cp_async_commit();

  // The warpgroup's first row g0 (a multiple of 64: key tile 0 .. g0 / 64 are its tiles, the last one its
  // diagonal); the warp's w0; this thread's rows r0, r0 + 8.
  const int g0 = i0 + 64 * wg, w0 = g0 + 16 * wl, r0 = w0 + lane / 4;
  const uint32_t q_addr = shared_address(Qs) + wg * 64 * kRowBytes;
  float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.0f, 0.0f};
  float o[8][4];
  zero<64>(o);
  for (int kt = 0; kt <= last; ++kt) {
    const int j0 = kt * kKeyTile, st = kt & 1;
    cp_async_wait<0>();   // this thread's copies of tile kt (the group committed in iteration kt - 1, or Q's and K's)
    fence_proxy_async();  // visible to the tensor cores' (async proxy) reads
    __syncthreads();

    {  // No skipping: a WGMMA in a branch the compiler cannot prove uniform is serialized. With 2 warpgroups, the
       // first one's last tile is masked whole: its scores are -inf, so alpha = 1 and P = 0 leave m, l, O unchanged.
      float s[8][4];
      const uint32_t k_addr = shared_address(Ks + st * K_BYTES);
      wgmma_fence();
#pragma unroll
      for (int ks = 0; ks < 4; ++ks) wgmma_ss(s, desc128(q_addr) + 2 * ks, desc128(k_addr) + 2 * ks, ks > 0);
#pragma unroll
      for (int ks = 0; ks < 2; ++ks)
        wgmma_ss(s, desc128(q_addr + Q_PANEL) + 2 * ks, desc128(k_addr + K_PANEL) + 2 * ks, 1);
      wgmma_commit();
      // Tile kt + 1's copies while the tensor cores work (their ~60 instructions of addresses went before the WGMMAs
      // were issued). Stage st ^ 1 was last read in iteration kt - 1, before its closing barrier.
      if (kt < last) {
        copy_rows<kKeyTile, DQ, THREADS>(Ks + (st ^ 1) * K_BYTES, kh + int64_t{j0 + kKeyTile} * DQ);
        copy_rows<kKeyTile, DV, THREADS>(Vs + (st ^ 1) * V_BYTES, vh + int64_t{j0 + kKeyTile} * DV);
      }
      cp_async_commit();
      wgmma_wait_all();
      fence_frag(s);
      const bool diagonal = j0 + kKeyTile - 1 > w0;  // keys after some row (and keys >= seq for rows < seq) only here
      float mx[2] = {-INFINITY, -INFINITY};
#pragma unroll
      for (int n = 0; n < 8; ++n)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int i = r0 + (e / 2) * 8, j = j0 + n * 8 + (lane % 4) * 2 + e % 2;
          s[n][e] = diagonal && j > i ? -INFINITY : s[n][e] * scale_log2;
          mx[e / 2] = fmaxf(mx[e / 2], s[n][e]);
        }
#pragma unroll
      for (int a = 0; a < 2; ++a) {
        mx[a] = fmaxf(mx[a], __shfl_xor_sync(0xFFFFFFFFu, mx[a], 1));
        mx[a] = fmaxf(mx[a], __shfl_xor_sync(0xFFFFFFFFu, mx[a], 2));
        const float m_new = fmaxf(m[a], mx[a]);
        const float alpha = fast_exp2(m[a] - m_new);
        m[a] = m_new;
        l[a] *= alpha;
#pragma unroll
        for (int n = 0; n < 8; ++n) o[n][2 * a] *= alpha, o[n][2 * a + 1] *= alpha;
      }
#pragma unroll
      for (int n = 0; n < 8; ++n)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          s[n][e] = fast_exp2(s[n][e] - m[e / 2]);
          l[e / 2] += s[n][e];
        }
      // P as the A fragments of the 4 key steps, all formed before the WGMMAs (registers fixed while they run).
      uint32_t pa[4][4];
#pragma unroll
      for (int kk = 0; kk < 4; ++kk) {
        pa[kk][0] = pack_bf16(s[2 * kk][0], s[2 * kk][1]);
        pa[kk][1] = pack_bf16(s[2 * kk][2], s[2 * kk][3]);
        pa[kk][2] = pack_bf16(s[2 * kk + 1][0], s[2 * kk + 1][1]);
        pa[kk][3] = pack_bf16(s[2 * kk + 1][2], s[2 * kk + 1][3]);
      }
      const uint32_t v_addr = shared_address(Vs + st * V_BYTES);
      fence_frag(o);
      wgmma_fence();
#pragma unroll
      for (int kk = 0; kk < 4; ++kk) wgmma_rs(o, pa[kk], desc_mn(v_addr + kk * kMnStep, V_BYTES));  // keys 16 kk ..
      wgmma_commit();
      wgmma_wait_all();
      fence_frag(o);
    }
    __syncthreads();  // stage st is read before iteration kt + 1 refills it
  }

  const int64_t ldv = int64_t{heads} * DV, tok0 = int64_t{b} * seq;
  float* lse_h = lse + bh * seq;
  float inv[2];
#pragma unroll
  for (int a = 0; a < 2; ++a) {
    l[a] += __shfl_xor_sync(0xFFFFFFFFu, l[a], 1);
    l[a] += __shfl_xor_sync(0xFFFFFFFFu, l[a], 2);
    inv[a] = 1.0f / l[a];
  }
#pragma unroll
  for (int n = 0; n < 8; ++n) o[n][0] *= inv[0], o[n][1] *= inv[0], o[n][2] *= inv[1], o[n][3] *= inv[1];
  store_rows<DV>(out + tok0 * ldv + h * DV, ldv, w0, seq, o, 1.0f, lane);
  if (lane % 4 == 0) {
    if (r0 < seq) lse_h[r0] = (m[0] + log2f(l[0])) * kLn2Wg;
    if (r0 + 8 < seq) lse_h[r0 + 8] = (m[1] + log2f(l[1])) * kLn2Wg;
  }
}

template <int WG> void launch(const ForwardWgmmaArgs& a, cudaStream_t stream) {
  constexpr int ROWS = 64 * WG;
  constexpr size_t smem = 1024 + 2 * ROWS * kRowBytes + 2 * 2 * kKeyTile * kRowBytes + 2 * kKeyTile * kRowBytes;
  cuda_detail::allow_dynamic_smem<attention_forward_wgmma<WG>>(smem);  // once per device
  const auto tiles = static_cast<unsigned>((a.seq + ROWS - 1) / ROWS), h = static_cast<unsigned>(a.heads),
             b = static_cast<unsigned>(a.batch);
  const dim3 grid = a.seq_order ? dim3(tiles, h, b) : dim3(h, b, tiles);
  launch_after_previous(attention_forward_wgmma<WG>, grid, 128 * WG, smem, stream, a.q, a.k, a.v, a.out, a.lse, a.seq,
                        a.spad, a.heads, a.scale_log2, a.seq_order);
}

}  // namespace

void forward_wgmma(const ForwardWgmmaArgs& a, int warpgroups, cudaStream_t stream) {
  if (warpgroups == 2) launch<2>(a, stream);
  else launch<1>(a, stream);
}

}  // namespace moerl::cuda::attention_tc_detail
