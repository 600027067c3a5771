// Backward of the tensor-core attention in one kernel (MOERL_ATTN_TC_BWD_KERNEL=fused, kernels/cuda/attention_tc.cu):
// the arithmetic of attention_dkdv_tc and attention_dq_tc (BF16 operands, FP32 scores, P recomputed from lse, P and
// dS rounded to BF16 for their products, FP32 sums on mma.sync m16n8k16) with S, P, dP and dS computed once per
// (key, query) pair instead of once for dK/dV and again for dQ: a quarter fewer tensor-core products.
//
// One block of 8 warps per (sequence, head) walks its key tiles of 128 (warp w: keys 16w .. 16w + 15) in order and,
// for each, the 64-query tiles from the tile's diagonal to the end, as attention_dkdv_tc does: dK and dV of the key
// tile sum in registers and are stored when its last query tile is done. Each pair's dS [128 keys, 64 queries] goes
// to shared memory (BF16, as the dK product rounds it) and the block computes dQ of the query tile, dSᵀ·K [64, DQ]
// (warp w: queries 16 (w % 4) .., half w / 4 of the columns), which it adds to dq in global memory: stored at key
// tile 0 (every query sees key 0), added with atomicAdd after. Every element of dq belongs to one thread of one
// block, which adds its terms in key-tile order: the same bits from run to run, no memset.
//
// One block per (sequence, head), all with the same work, so bench-600m's 8 x 16 = 128 blocks fill 128 of the
// H200's 132 SMs in one wave with nothing left over; with fewer (sequence, head) pairs than SMs, or a partial last
// wave, SMs idle (attention_backward_fused_fits decides the default).
//
// Shared memory (DQ 96 / DV 64: 151 KiB, one block per SM): two sets of the key tile's K and V (the next tile's
// copied while the current one's first query tile runs), two stages of Q, dO and the (lse·log2e, D) pairs, and dS.
// Per pair two barriers: the first after the stage's copies land (which also frees the stage and K, V read in the
// previous pair, so the next copies start there), the second between the dS writes and the dQ product.
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <cstdlib>
#include <string>

#include "kernels/cuda/attention_tc_mma.cuh"
#include "kernels/cuda/attention_tc_pack.hpp"
#include "kernels/cuda/cuda_check.hpp"
#include "kernels/cuda/kernel_attributes.hpp"
#include "runtime/error.hpp"

namespace moerl::cuda::attention_tc_detail {
namespace {

constexpr int kFusedWarps = 8;
constexpr int kKeyRows = 16 * kFusedWarps;  // keys of a block's tile: 128
constexpr int kFusedThreads = 32 * kFusedWarps;

template <int DQ, int DV>
struct FusedSmem {
  static constexpr int LQ = row_stride(pad16(DQ)), LV = row_stride(pad16(DV)), LS = row_stride(kCols);
  static constexpr int kv_set = kKeyRows * (LQ + LV);  // elements: K [128][LQ], then V [128][LV]
  static constexpr int stage = kCols * (LQ + LV);      // elements: Q [64][LQ], then dO [64][LV]
  static constexpr size_t bytes = size_t{2} * (2 * kv_set + 2 * stage + kKeyRows * LS) + size_t{4} * 2 * 2 * kCols;
};

template <int DQ, int DV>
__global__ void __launch_bounds__(kFusedThreads, 1)
    attention_bwd_fused_tc(const bf16* __restrict__ qb, const bf16* __restrict__ kb, const bf16* __restrict__ vb,
                           const bf16* __restrict__ dob, const float* __restrict__ stats, float* __restrict__ dq,
                           float* __restrict__ dk, float* __restrict__ dv, int seq, int spad, int heads, float scale,
                           float scale_log2) {
  using S = FusedSmem<DQ, DV>;
  constexpr int DQP = pad16(DQ), DVP = pad16(DV), LQ = S::LQ, LV = S::LV, LS = S::LS;
  constexpr int NH = DQP / 2;  // dQ columns of a warp
  static_assert(NH % 16 == 0, "a warp's dQ columns are pairs of 8-wide n-tiles");
  extern __shared__ __align__(16) unsigned char smem_raw[];
  bf16* const kv_sets = reinterpret_cast<bf16*>(smem_raw);  // 2 sets of S::kv_set
  bf16* const stages = kv_sets + 2 * S::kv_set;                // 2 stages of S::stage
  bf16* const dSs = stages + 2 * S::stage;                     // [128 keys][LS]: dS of the pair, BF16
  float* const St = reinterpret_cast<float*>(dSs + kKeyRows * LS);  // 2 stages of 64 (lse·log2e, D) pairs
  const int lane = threadIdx.x % 32, w = threadIdx.x / 32;
  const int h = static_cast<int>(blockIdx.x), b = static_cast<int>(blockIdx.y);
  const int64_t bh = int64_t{b} * heads + h;
  const bf16* qh = qb + bh * spad * DQP;
  const bf16* kh = kb + bh * spad * DQP;
  const bf16* vh = vb + bh * spad * DVP;
  const bf16* doh = dob + bh * spad * DVP;
  const float* sth = stats + bh * spad * 2;
  const int key_tiles = (seq + kKeyRows - 1) / kKeyRows, last = (seq - 1) / kCols;
  const int64_t ldq = int64_t{heads} * DQ, ldv = int64_t{heads} * DV, tok0 = int64_t{b} * seq;
  float* const dq_h = dq + tok0 * ldq + h * DQ;

  const auto load_keys = [&](int kt, int set) {
    bf16* Ks = kv_sets + set * S::kv_set;
    copy_tile<kKeyRows, DQP, kFusedThreads>(Ks, kh + int64_t{kt} * kKeyRows * DQP);
    copy_tile<kKeyRows, DVP, kFusedThreads>(Ks + kKeyRows * LQ, vh + int64_t{kt} * kKeyRows * DVP);
  };
  const auto load_queries = [&](int qt, int st) {
    bf16* Qs = stages + st * S::stage;
    copy_tile<kCols, DQP, kFusedThreads>(Qs, qh + int64_t{qt} * kCols * DQP);
    copy_tile<kCols, DVP, kFusedThreads>(Qs + kCols * LQ, doh + int64_t{qt} * kCols * DVP);
    if (threadIdx.x < 2 * kCols / 4)
      cp_async16(St + st * 2 * kCols + 4 * threadIdx.x, sth + int64_t{qt} * 2 * kCols + 4 * threadIdx.x);
  };
  load_keys(0, 0);
  load_queries(0, 0);
  cp_async_commit();

  int st = 0;  // the stage of the current pair
  for (int kt = 0; kt < key_tiles; ++kt) {
    const int set = kt & 1, j0 = kt * kKeyRows, w0 = j0 + 16 * w, jr = w0 + lane / 4;
    const bf16* Ks = kv_sets + set * S::kv_set;
    const bf16* Vs = Ks + kKeyRows * LQ;
    const int first = j0 / kCols;  // the query tile of the key tile's diagonal
    float dk_acc[DQP / 8][4], dv_acc[DVP / 8][4];
    zero<DQP>(dk_acc);
    zero<DVP>(dv_acc);
    for (int qt = first; qt <= last; ++qt, st ^= 1) {
      cp_async_wait<0>();  // this thread's copies of the pair's stage (and of this key tile) have landed
      __syncthreads();     // ... and everybody's; the previous pair's stage, K and V and dS are no longer read
      if (qt < last) load_queries(qt + 1, st ^ 1);
      else if (kt + 1 < key_tiles) load_queries((kt + 1) * kKeyRows / kCols, st ^ 1);
      if (qt == first && kt + 1 < key_tiles) load_keys(kt + 1, set ^ 1);
      cp_async_commit();

      const int i0 = qt * kCols;
      const bf16* Qt = stages + st * S::stage;
      const bf16* dOt = Qt + kCols * LQ;
      const float* Stt = St + st * 2 * kCols;
      if (i0 + kCols - 1 >= w0) {  // some query of the tile sees one of the warp's keys
        const bool masked = i0 < w0 + 16 || i0 + kCols > seq;
        float p[kNt][4], ds[kNt][4];
        scores<DQ>(p, Ks + 16 * w * LQ, LQ, Qt, LQ, lane);   // Sᵀ = K·Qᵀ
        scores<DV>(ds, Vs + 16 * w * LV, LV, dOt, LV, lane);  // dPᵀ = V·dOᵀ
#pragma unroll
        for (int n = 0; n < kNt; ++n)
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const int c = n * 8 + (lane % 4) * 2 + e % 2, i = i0 + c, j = jr + (e / 2) * 8;
            p[n][e] = !masked || (j <= i && i < seq) ? fast_exp2(p[n][e] * scale_log2 - Stt[2 * c]) : 0.0f;
            ds[n][e] = p[n][e] * (ds[n][e] - Stt[2 * c + 1]);
          }
        product<DVP>(dv_acc, p, dOt, LV, lane);
        product<DQP>(dk_acc, ds, Qt, LQ, lane);
        // dS to shared memory, [key][query], rounded as product() rounds it for dK.
        bf16* row = dSs + (16 * w + lane / 4) * LS + 2 * (lane % 4);
#pragma unroll
        for (int n = 0; n < kNt; ++n) {
          *reinterpret_cast<uint32_t*>(row + n * 8) = pack_bf16(ds[n][0], ds[n][1]);
          *reinterpret_cast<uint32_t*>(row + 8 * LS + n * 8) = pack_bf16(ds[n][2], ds[n][3]);
        }
      }
      __syncthreads();  // dS of every warp is in shared memory

      // dQ of the query tile += dSᵀ·K over the keys some query sees (the warps after them wrote no dS): warp w
      // takes queries 16 (w % 4) .. + 15 and columns NH (w / 4) .. + NH - 1. A = dSᵀ read transposed from [key][query].
      {
        const int mq = w % 4, c0 = (w / 4) * NH;
        const int keys = min(kKeyRows, i0 + kCols - j0);  // a multiple of 64
        float acc[NH / 8][4];
        zero<NH>(acc);
        for (int k = 0; k < keys; k += 16) {
          uint32_t af[4];
          ldsm_x4_trans(af, dSs + (k + lane % 8 + (lane / 16) * 8) * LS + 16 * mq + (lane / 8 % 2) * 8);
#pragma unroll
          for (int n = 0; n < NH / 8; n += 2) {
            uint32_t bf[4];
            load_b_kn(bf, Ks + k * LQ + c0 + n * 8, LQ, lane);
            mma(acc[n], af, bf[0], bf[1]);
            mma(acc[n + 1], af, bf[2], bf[3]);
          }
        }
        const int r = i0 + 16 * mq + lane / 4, c = (lane % 4) * 2;
#pragma unroll
        for (int n = 0; n < NH / 8; ++n) {
          const int col = c0 + n * 8;
          if (col >= DQ) continue;  // head dim padding (DQ 24 in 32)
#pragma unroll
          for (int a = 0; a < 2; ++a) {
            if (r + 8 * a >= seq) continue;
            float2* dst = reinterpret_cast<float2*>(dq_h + (r + 8 * a) * ldq + col + c);
            const float2 v = make_float2(acc[n][2 * a] * scale, acc[n][2 * a + 1] * scale);
            if (kt == 0) *dst = v;
            else atomicAdd(dst, v);
          }
        }
      }
    }
    store_rows<DQ>(dk + tok0 * ldq + h * DQ, ldq, w0, seq, dk_acc, scale, lane);
    store_rows<DV>(dv + tok0 * ldv + h * DV, ldv, w0, seq, dv_acc, 1.0f, lane);
  }
}

template <int DQ, int DV>
void launch(const BackwardFusedArgs& a, cudaStream_t stream) {
  constexpr size_t smem = FusedSmem<DQ, DV>::bytes;
  cuda_detail::allow_dynamic_smem<attention_bwd_fused_tc<DQ, DV>>(smem);
  const dim3 grid(static_cast<unsigned>(a.heads), static_cast<unsigned>(a.batch));
  attention_bwd_fused_tc<DQ, DV><<<grid, kFusedThreads, smem, stream>>>(a.q, a.k, a.v, a.dout, a.stats, a.dq, a.dk,
                                                                         a.dv, a.seq, a.spad, a.heads, a.scale,
                                                                         a.scale_log2);
  CUDA_CHECK_LAUNCH();
}

}  // namespace

void backward_fused(const BackwardFusedArgs& args, int64_t dqk, int64_t dv, cudaStream_t stream) {
  if (dqk == 96 && dv == 64) return launch<96, 64>(args, stream);
  if (dqk == 24 && dv == 16) return launch<24, 16>(args, stream);
  throw Error("moerl::cuda attention: no fused backward for head dims " + std::to_string(dqk) + " / " +
              std::to_string(dv));
}

}  // namespace moerl::cuda::attention_tc_detail
