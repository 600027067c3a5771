// Warp-level building blocks of the tensor-core attention (kernels/cuda/attention_tc.cu): mma.sync m16n8k16 BF16
// fragments loaded with ldmatrix from row-padded shared tiles, the score and product loops of a warp's 16-row
// blocks, cp.async tile copies, the MUFU exp2 and the FP32 row stores. Device code only (attention_tc.cu, attention_tc_pack.cu).
#pragma once
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "kernels/cuda/attention_tc_pack.hpp"
#include "kernels/cuda/cp_async.cuh"
#include "kernels/cuda/rope.hpp"
#include "kernels/cuda/rope_rotate.cuh"

namespace moerl::cuda::attention_tc_detail {

using bf16 = __nv_bfloat16;
constexpr int kCols = 64;       // rows of a streamed tile (keys or queries) = score columns
constexpr int kNt = kCols / 8;  // 8-wide n-tiles of a score row block

// The stored score gradients of the backward (MOERL_ATTN_TC_BWD_DQ=stored): per (sequence, head), one 64 x 64 BF16
// block of dSᵀ [keys][queries] for each pair of a 64-query tile qt and a 64-key tile kc <= qt, at pair
// qt·(qt + 1)/2 + kc: the causal triangle in tiles, zeros above the diagonal and past seq. Inside a pair, 8 x 8
// sub-blocks (key rows 8 kb.., query columns 8 qb..) of 128 contiguous bytes each, sub-block kb·8 + qb, row-major
// inside: a warp's store of one C fragment half (8 keys x 8 queries, 4 bytes a lane) is one 128-byte line, and
// ldmatrix reads a sub-block's 8 rows of 16 bytes from shared memory without bank conflicts.
__host__ __device__ constexpr int64_t ds_pairs(int64_t seq) {
  const int64_t t = (seq + kCols - 1) / kCols;
  return t * (t + 1) / 2;
}
__device__ __forceinline__ int64_t ds_pair(int qt, int kc) { return int64_t{qt} * (qt + 1) / 2 + kc; }
__host__ __device__ constexpr int ds_sub(int kb, int qb) { return (kb * 8 + qb) * 64; }  // first element of a sub-block
constexpr int64_t kDsPairElems = int64_t{kCols} * kCols;

__host__ __device__ constexpr int pad16(int d) { return (d + 15) / 16 * 16; }
// Row stride (bf16 elements) of a shared tile of padded width dp: an odd multiple of 8 elements (16 bytes).
__host__ __device__ constexpr int row_stride(int dp) { return (dp / 8) % 2 == 1 ? dp : dp + 8; }

__device__ __forceinline__ uint32_t pack_bf16(float lo, float hi) {
  const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);  // .x (low half) = lo
  return *reinterpret_cast<const uint32_t*>(&v);
}

// N-tile n (mma.sync's C layout, 4 FP32 a lane) of a warp's 16 x 64 fragment rounded to BF16 into the A fragment of
// its 16-wide K step: a[n / 2][0 .. 1] for even n, a[n / 2][2 .. 3] for odd n (rows lane / 4, then + 8).
__device__ __forceinline__ void pack_a_ntile(uint32_t (&a)[kNt / 2][4], int n, const float (&c)[4]) {
  a[n / 2][2 * (n % 2)] = pack_bf16(c[0], c[1]);
  a[n / 2][2 * (n % 2) + 1] = pack_bf16(c[2], c[3]);
}

// A warp's dSᵀ as the BF16 A fragments of its 4 query steps (da[kk]: n-tiles 2 kk and 2 kk + 1, each as the pair
// (keys w0 + lane / 4, + 8) of mma.sync's C layout, packed) into its pair's block of ds_out (the ds_pairs layout
// above, (sequence, head) bh): key rows w0 + lane / 4 (+ 8) are sub-block rows kb (kb + 1), queries n·8 + 2 (lane %
// 4) + {0, 1} of query tile qt. The bits its own product uses.
__device__ __forceinline__ void store_ds_frags(__nv_bfloat16* ds_out, int64_t bh, int seq, int qt, int w0,
                                               const uint32_t (&da)[kNt / 2][4], int lane) {
  const int kb = (w0 % kCols) / 8;
  __nv_bfloat16* t = ds_out + (bh * ds_pairs(seq) + ds_pair(qt, w0 / kCols)) * kDsPairElems + lane * 2;
#pragma unroll
  for (int n = 0; n < kNt; ++n) {
    *reinterpret_cast<uint32_t*>(t + ds_sub(kb, n)) = da[n / 2][2 * (n % 2)];
    *reinterpret_cast<uint32_t*>(t + ds_sub(kb + 1, n)) = da[n / 2][2 * (n % 2) + 1];
  }
}
// The same from the FP32 fragment ds (rounded here as its product rounds it).
__device__ __forceinline__ void store_ds(__nv_bfloat16* ds_out, int64_t bh, int seq, int qt, int w0,
                                         const float (&ds)[kNt][4], int lane) {
  uint32_t da[kNt / 2][4];
#pragma unroll
  for (int n = 0; n < kNt; ++n) pack_a_ntile(da, n, ds[n]);
  store_ds_frags(ds_out, bh, seq, qt, w0, da, lane);
}

__device__ __forceinline__ void ldsm_x4(uint32_t (&r)[4], const __nv_bfloat16* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(shared_address(p)));
}

__device__ __forceinline__ void ldsm_x4_trans(uint32_t (&r)[4], const __nv_bfloat16* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(shared_address(p)));
}

// c (16x8, FP32) += a (16x16, BF16, row) · b (16x8, BF16, col).
__device__ __forceinline__ void mma(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// A fragment of the 16x16 block at p (row-major, stride ld): matrices (rows 0-7, cols 0-7), (8-15, 0-7),
// (0-7, 8-15), (8-15, 8-15) = a0 .. a3.
__device__ __forceinline__ void load_a(uint32_t (&a)[4], const __nv_bfloat16* p, int ld, int lane) {
  ldsm_x4(a, p + ((lane % 8) + (lane / 8 % 2) * 8) * ld + (lane / 16) * 8);
}

// B fragments of two n-tiles (n 0-7 and 8-15) × k 0-15 from a tile stored [n][k] (row-major, stride ld) at p:
// B[k][n] = p[n·ld + k]. b[0], b[1] for n-tile 0; b[2], b[3] for n-tile 1.
__device__ __forceinline__ void load_b_nk(uint32_t (&b)[4], const __nv_bfloat16* p, int ld, int lane) {
  ldsm_x4(b, p + ((lane % 8) + (lane / 16) * 8) * ld + (lane / 8 % 2) * 8);
}

// The same from a tile stored [k][n] (row-major, stride ld): B[k][n] = p[k·ld + n], through ldmatrix.trans.
__device__ __forceinline__ void load_b_kn(uint32_t (&b)[4], const __nv_bfloat16* p, int ld, int lane) {
  ldsm_x4_trans(b, p + ((lane % 8) + (lane / 8 % 2) * 8) * ld + (lane / 16) * 8);
}

// s[n] (16 rows × kCols scores of this warp) = A (16 × D at a, stride lda) · Bᵀ, B stored [kCols][D] (stride ldb).
template <int D>
__device__ __forceinline__ void scores(float (&s)[kNt][4], const __nv_bfloat16* a, int lda, const __nv_bfloat16* b,
                                       int ldb, int lane) {
#pragma unroll
  for (int n = 0; n < kNt; ++n) s[n][0] = s[n][1] = s[n][2] = s[n][3] = 0.0f;
#pragma unroll
  for (int k = 0; k < pad16(D); k += 16) {
    uint32_t af[4];
    load_a(af, a + k, lda, lane);
#pragma unroll
    for (int n = 0; n < kNt; n += 2) {
      uint32_t bf[4];
      load_b_nk(bf, b + n * 8 * ldb + k, ldb, lane);
      mma(s[n], af, bf[0], bf[1]);
      mma(s[n + 1], af, bf[2], bf[3]);
    }
  }
}

// acc (16 × DP of this warp) += A (16 × kCols) · B, B stored [kCols][DP] (stride ldb), with a_frag(kk, af) giving
// the A fragment of k-block kk (keys 16 kk ..).
template <int DP, class AFrag>
__device__ __forceinline__ void product_of(float (&acc)[DP / 8][4], const AFrag& a_frag, const __nv_bfloat16* b,
                                           int ldb, int lane) {
#pragma unroll
  for (int kk = 0; kk < kCols / 16; ++kk) {
    uint32_t af[4];
    a_frag(kk, af);
#pragma unroll
    for (int n = 0; n < DP / 8; n += 2) {
      uint32_t bf[4];
      load_b_kn(bf, b + kk * 16 * ldb + n * 8, ldb, lane);
      mma(acc[n], af, bf[0], bf[1]);
      mma(acc[n + 1], af, bf[2], bf[3]);
    }
  }
}

// acc (16 × DP of this warp) += P (16 × kCols, from score registers, rounded to BF16) · B, B stored [kCols][DP]
// (stride ldb): the score C fragments of n-tiles 2kk, 2kk+1 are the A fragment of k-block kk.
template <int DP>
__device__ __forceinline__ void product(float (&acc)[DP / 8][4], const float (&p)[kNt][4], const __nv_bfloat16* b,
                                        int ldb, int lane) {
  product_of<DP>(
      acc,
      [&](int kk, uint32_t(&af)[4]) {
        af[0] = pack_bf16(p[2 * kk][0], p[2 * kk][1]), af[1] = pack_bf16(p[2 * kk][2], p[2 * kk][3]);
        af[2] = pack_bf16(p[2 * kk + 1][0], p[2 * kk + 1][1]), af[3] = pack_bf16(p[2 * kk + 1][2], p[2 * kk + 1][3]);
      },
      b, ldb, lane);
}

template <int DP> __device__ __forceinline__ void zero(float (&acc)[DP / 8][4]) {
#pragma unroll
  for (int n = 0; n < DP / 8; ++n) acc[n][0] = acc[n][1] = acc[n][2] = acc[n][3] = 0.0f;
}

// 2^x on the MUFU unit (ex2.approx.ftz: relative error ~2^-22, 2^-inf = 0), without exp2f's extra range handling.
__device__ __forceinline__ float fast_exp2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
}

// scores / product for a warp that owns MT 16-row blocks (rows 16·mt .. of a, of p, of acc): every B fragment read
// from shared memory feeds MT products, which halves the shared-memory traffic per product at MT = 2.
template <int D, int MT>
__device__ __forceinline__ void scores_m(float (&s)[MT][kNt][4], const __nv_bfloat16* a, int lda,
                                         const __nv_bfloat16* b, int ldb, int lane) {
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int n = 0; n < kNt; ++n) s[mt][n][0] = s[mt][n][1] = s[mt][n][2] = s[mt][n][3] = 0.0f;
#pragma unroll
  for (int k = 0; k < pad16(D); k += 16) {
    uint32_t af[MT][4];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) load_a(af[mt], a + mt * 16 * lda + k, lda, lane);
#pragma unroll
    for (int n = 0; n < kNt; n += 2) {
      uint32_t bf[4];
      load_b_nk(bf, b + n * 8 * ldb + k, ldb, lane);
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) {
        mma(s[mt][n], af[mt], bf[0], bf[1]);
        mma(s[mt][n + 1], af[mt], bf[2], bf[3]);
      }
    }
  }
}

template <int DP, int MT>
__device__ __forceinline__ void product_m(float (&acc)[MT][DP / 8][4], const float (&p)[MT][kNt][4],
                                          const __nv_bfloat16* b, int ldb, int lane) {
#pragma unroll
  for (int kk = 0; kk < kCols / 16; ++kk) {
    uint32_t af[MT][4];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
      af[mt][0] = pack_bf16(p[mt][2 * kk][0], p[mt][2 * kk][1]);
      af[mt][1] = pack_bf16(p[mt][2 * kk][2], p[mt][2 * kk][3]);
      af[mt][2] = pack_bf16(p[mt][2 * kk + 1][0], p[mt][2 * kk + 1][1]);
      af[mt][3] = pack_bf16(p[mt][2 * kk + 1][2], p[mt][2 * kk + 1][3]);
    }
#pragma unroll
    for (int n = 0; n < DP / 8; n += 2) {
      uint32_t bf[4];
      load_b_kn(bf, b + kk * 16 * ldb + n * 8, ldb, lane);
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) {
        mma(acc[mt][n], af[mt], bf[0], bf[1]);
        mma(acc[mt][n + 1], af[mt], bf[2], bf[3]);
      }
    }
  }
}

// Global rows row0 + lane/4 (+8) of a [.., D] tensor (stride ldg) <- factor · acc, columns < D, rows < seq; the
// columns from `split` on (a multiple of 8) to `rest` (stride ld_rest) at column - split instead (dK in MLA's layout).
template <int D>
__device__ __forceinline__ void store_rows_split(float* dst, int64_t ldg, float* rest, int64_t ld_rest, int split,
                                                 int row0, int seq,
                                                 const float (&acc)[pad16(D) / 8][4], float factor, int lane) {
  const int r = row0 + lane / 4, c = (lane % 4) * 2;
#pragma unroll
  for (int n = 0; n < pad16(D) / 8; ++n) {
    if (n * 8 >= D) continue;
    const bool lo = n * 8 < split;
    float* base = lo ? dst + n * 8 + c : rest + (n * 8 - split) + c;
    const int64_t ld = lo ? ldg : ld_rest;
    if (r < seq) *reinterpret_cast<float2*>(base + r * ld) = make_float2(acc[n][0] * factor, acc[n][1] * factor);
    if (r + 8 < seq)
      *reinterpret_cast<float2*>(base + (r + 8) * ld) = make_float2(acc[n][2] * factor, acc[n][3] * factor);
  }
}

template <int D>
__device__ __forceinline__ void store_rows(float* __restrict__ dst, int64_t ldg, int row0, int seq,
                                           const float (&acc)[pad16(D) / 8][4], float factor, int lane) {
  store_rows_split<D>(dst, ldg, dst, ldg, D, row0, seq, acc, factor, lane);
}

// store_rows (rows are positions in their sequence), dQ's rope columns rotated back.
template <int D>
__device__ __forceinline__ void store_rows_rope(float* __restrict__ dst, int64_t ldg, int row0, int seq,
                                                const float (&acc)[pad16(D) / 8][4], float factor, const DqRope& rope,
                                                int lane) {
  if (rope.c0 < 0) return store_rows<D>(dst, ldg, row0, seq, acc, factor, lane);
  const int r = row0 + lane / 4, c = (lane % 4) * 2;
#pragma unroll
  for (int n = 0; n < pad16(D) / 8; ++n) {
    if (n * 8 >= D) continue;
    const int col = n * 8 + c;
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const int row = r + 8 * half;
      if (row >= seq) continue;
      float a = acc[n][2 * half] * factor, b = acc[n][2 * half + 1] * factor;
      if (col >= rope.c0) {
        const int64_t at = int64_t{row} * rope.t.half + (col - rope.c0) / 2;
        rope_rotate(a, b, __ldg(rope.t.cos + at), -__ldg(rope.t.sin + at));
      }
      *reinterpret_cast<float2*>(dst + row * ldg + col) = make_float2(a, b);
    }
  }
}

// The dK and dV rows of key tile rows row0.. of head h in sequence b (tokens b · seq + ..), into `out`.
template <int DQ, int DV>
__device__ __forceinline__ void store_kv_grads(const KvGradOut& out, int b, int h, int seq, int row0,
                                               const float (&dk)[pad16(DQ) / 8][4],
                                               const float (&dv)[pad16(DV) / 8][4], float scale, int lane) {
  const int64_t tok0 = int64_t{b} * seq;
  store_rows_split<DQ>(out.dk + tok0 * out.dk_ld + h * out.dk_head, out.dk_ld,
                       out.dk_rest + tok0 * out.rest_ld + h * out.rest_head, out.rest_ld, out.k_split, row0, seq, dk,
                       scale, lane);
  store_rows<DV>(out.dv + tok0 * out.dv_ld + h * out.dv_head, out.dv_ld, row0, seq, dv, 1.0f, lane);
}



// Shared tile [ROWS][row_stride(DP)] <- ROWS consecutive packed rows of DP BF16 at src (16-byte chunks spread over
// the block's THREADS threads; asynchronous until the group is waited for).
template <int ROWS, int DP, int THREADS>
__device__ __forceinline__ void copy_tile(bf16* dst, const bf16* __restrict__ src) {
  constexpr int LD = row_stride(DP), CH = DP / 8, TOTAL = ROWS * CH;
#pragma unroll
  for (int it = 0; it < (TOTAL + THREADS - 1) / THREADS; ++it) {
    const int t = static_cast<int>(threadIdx.x) + it * THREADS;
    if (TOTAL % THREADS == 0 || t < TOTAL) cp_async16(dst + (t / CH) * LD + (t % CH) * 8, src + (t / CH) * DP + (t % CH) * 8);
  }
}

}  // namespace moerl::cuda::attention_tc_detail
