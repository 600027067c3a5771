// Causal attention core on tensor cores (kernels/cuda/attention.hpp: attention_forward_bf16 / _backward_bf16):
// FlashAttention-2 style with mma.sync m16n8k16, BF16 operands and FP32 accumulation. Q, K, V and dO are rounded
// to BF16 when a tile is staged in shared memory (as PyTorch's sdpa sees them in a bf16 model), P and dS are
// rounded to BF16 as the A operand of the second product; softmax statistics, row sums, lse and D = rowsum(dO∘O)
// stay FP32. No [seq, seq] matrix in device memory; no atomics (bit-identical from run to run).
//
// Blocks of 128 threads (4 warps) own a 64-row tile of one (sequence, head): warp w rows 16w .. 16w+15, so every
// score row lives in one quad of lanes (mma C layout: lane holds rows lane/4 and lane/4 + 8, columns 2·(lane%4)
// + {0, 1} of each 8-wide n-tile) and row reductions are 2 shuffles. The other side streams through in 64-row
// tiles. Launches, like the FP32 kernels (grid (heads, batch, tiles), longest tiles first):
//   forward  one query tile per block, key tiles 0 .. diagonal, online softmax in base 2, lse saved;
//   backward D_i = dO_i·O_i (attention_dot_kernel, stashed in dq); dK/dV per key tile over query tiles
//            diagonal .. end (P recomputed from lse); dQ per query tile over key tiles 0 .. diagonal.
// Shared tiles are BF16, row-major, head dim padded with zeros to a multiple of 16 (24 -> 32) and each row to an
// odd multiple of 16 bytes, so the 8 row addresses of an ldmatrix phase hit 8 distinct bank groups. Operands whose
// reduction index runs along rows of the stored tile (V in P·V, dO in Pᵀ·dO, Q in dSᵀ·Q, K in dS·K) are read with
// ldmatrix.trans. Static shared memory, < 48 KB for the supported head dims.
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>
#include <string>
#include <type_traits>

#include "kernels/cuda/attention.hpp"
#include "kernels/cuda/attention_kernels.cuh"
#include "kernels/cuda/cuda_check.hpp"
#include "runtime/error.hpp"

namespace moerl::cuda {
namespace {

constexpr int kWarps = 4;
constexpr int kThreadsTc = 32 * kWarps;
constexpr int kRowsTc = 16 * kWarps;  // rows of a block's tile (queries or keys)
constexpr int kCols = 64;             // rows of a streamed tile (keys or queries) = score columns
constexpr int kNt = kCols / 8;        // 8-wide n-tiles of a score row block
constexpr float kLog2eTc = 1.4426950408889634f;
constexpr float kLn2Tc = 0.6931471805599453f;
static_assert(kRowsTc == kCols, "the diagonal tile pairs rows with the same columns");

__host__ __device__ constexpr int pad16(int d) { return (d + 15) / 16 * 16; }
// Row stride (bf16 elements) of a shared tile of padded width dp: an odd multiple of 8 elements (16 bytes).
__host__ __device__ constexpr int row_stride(int dp) { return (dp / 8) % 2 == 1 ? dp : dp + 8; }

__device__ __forceinline__ uint32_t pack_bf16(float lo, float hi) {
  const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);  // .x (low half) = lo
  return *reinterpret_cast<const uint32_t*>(&v);
}

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

__device__ __forceinline__ void ldsm_x4(uint32_t (&r)[4], const __nv_bfloat16* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(p)));
}

__device__ __forceinline__ void ldsm_x4_trans(uint32_t (&r)[4], const __nv_bfloat16* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(p)));
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

// Shared tile [kCols rows][row_stride(DP)] <- BF16 of global rows src + r·ldg, r < valid (columns < D; the rest
// and the rows from `valid` on are zeros, so padding never carries a NaN into a product).
template <int D>
__device__ __forceinline__ void stage(__nv_bfloat16* dst, const float* __restrict__ src, int64_t ldg, int valid) {
  constexpr int DP = pad16(D), LD = row_stride(DP), C4 = DP / 4;
  for (int t = threadIdx.x; t < kCols * C4; t += kThreadsTc) {
    const int r = t / C4, c = (t % C4) * 4;
    float4 x = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
    if (r < valid && c < D) x = *reinterpret_cast<const float4*>(src + r * ldg + c);
    *reinterpret_cast<uint2*>(dst + r * LD + c) = make_uint2(pack_bf16(x.x, x.y), pack_bf16(x.z, x.w));
  }
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

// acc (16 × DP of this warp) += P (16 × kCols, from score registers, rounded to BF16) · B, B stored [kCols][DP]
// (stride ldb): the score C fragments of n-tiles 2kk, 2kk+1 are the A fragment of k-block kk.
template <int DP>
__device__ __forceinline__ void product(float (&acc)[DP / 8][4], const float (&p)[kNt][4], const __nv_bfloat16* b,
                                        int ldb, int lane) {
#pragma unroll
  for (int kk = 0; kk < kCols / 16; ++kk) {
    const uint32_t af[4] = {pack_bf16(p[2 * kk][0], p[2 * kk][1]), pack_bf16(p[2 * kk][2], p[2 * kk][3]),
                            pack_bf16(p[2 * kk + 1][0], p[2 * kk + 1][1]), pack_bf16(p[2 * kk + 1][2], p[2 * kk + 1][3])};
#pragma unroll
    for (int n = 0; n < DP / 8; n += 2) {
      uint32_t bf[4];
      load_b_kn(bf, b + kk * 16 * ldb + n * 8, ldb, lane);
      mma(acc[n], af, bf[0], bf[1]);
      mma(acc[n + 1], af, bf[2], bf[3]);
    }
  }
}

template <int DP> __device__ __forceinline__ void zero(float (&acc)[DP / 8][4]) {
#pragma unroll
  for (int n = 0; n < DP / 8; ++n) acc[n][0] = acc[n][1] = acc[n][2] = acc[n][3] = 0.0f;
}

// Global rows row0 + lane/4 (+8) of a [.., D] tensor (stride ldg) <- factor · acc, columns < D, rows < seq.
template <int D>
__device__ __forceinline__ void store_rows(float* __restrict__ dst, int64_t ldg, int row0, int seq,
                                           const float (&acc)[pad16(D) / 8][4], float factor, int lane) {
  const int r = row0 + lane / 4, c = (lane % 4) * 2;
#pragma unroll
  for (int n = 0; n < pad16(D) / 8; ++n) {
    if (n * 8 >= D) continue;
    if (r < seq) *reinterpret_cast<float2*>(dst + r * ldg + n * 8 + c) = make_float2(acc[n][0] * factor, acc[n][1] * factor);
    if (r + 8 < seq)
      *reinterpret_cast<float2*>(dst + (r + 8) * ldg + n * 8 + c) = make_float2(acc[n][2] * factor, acc[n][3] * factor);
  }
}

// Forward: block z takes query tile tiles-1-z (keys 0 .. its diagonal).
template <int DQ, int DV>
__global__ void __launch_bounds__(kThreadsTc)
    attention_forward_tc(const float* __restrict__ q, const float* __restrict__ k, const float* __restrict__ v,
                         float* __restrict__ out, float* __restrict__ lse, int seq, int heads, float scale_log2) {
  constexpr int LQ = row_stride(pad16(DQ)), LV = row_stride(pad16(DV)), DVP = pad16(DV);
  __shared__ __align__(16) __nv_bfloat16 Qs[kCols * LQ], Ks[kCols * LQ], Vs[kCols * LV];
  const int lane = threadIdx.x % 32, w = threadIdx.x / 32;
  const int tiles = (seq + kCols - 1) / kCols;
  const int qt = tiles - 1 - static_cast<int>(blockIdx.z), h = blockIdx.x, b = blockIdx.y, i0 = qt * kCols;
  const int64_t ldq = int64_t{heads} * DQ, ldv = int64_t{heads} * DV, tok0 = int64_t{b} * seq;
  const float* kh = k + tok0 * ldq + h * DQ;
  const float* vh = v + tok0 * ldv + h * DV;
  stage<DQ>(Qs, q + tok0 * ldq + h * DQ + i0 * ldq, ldq, seq - i0);

  const int r0 = i0 + 16 * w + lane / 4;  // this thread's rows r0 and r0 + 8
  float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.0f, 0.0f};
  float o[DVP / 8][4];
  zero<DVP>(o);
  for (int kt = 0; kt <= qt; ++kt) {
    const int j0 = kt * kCols;
    __syncthreads();  // the previous K, V tiles are read
    stage<DQ>(Ks, kh + j0 * ldq, ldq, seq - j0);
    stage<DV>(Vs, vh + j0 * ldv, ldv, seq - j0);
    __syncthreads();

    float s[kNt][4];
    scores<DQ>(s, Qs + 16 * w * LQ, LQ, Ks, LQ, lane);
    float mx[2] = {-INFINITY, -INFINITY};
#pragma unroll
    for (int n = 0; n < kNt; ++n)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int i = r0 + (e / 2) * 8, j = j0 + n * 8 + (lane % 4) * 2 + e % 2;
        s[n][e] = (kt == qt && j > i) ? -INFINITY : s[n][e] * scale_log2;  // key j0 <= i keeps the max finite
        mx[e / 2] = fmaxf(mx[e / 2], s[n][e]);
      }
#pragma unroll
    for (int a = 0; a < 2; ++a) {
      mx[a] = fmaxf(mx[a], __shfl_xor_sync(0xFFFFFFFFu, mx[a], 1));
      mx[a] = fmaxf(mx[a], __shfl_xor_sync(0xFFFFFFFFu, mx[a], 2));
      const float m_new = fmaxf(m[a], mx[a]);
      const float alpha = exp2f(m[a] - m_new);  // 0 on the first tile (m = -inf)
      m[a] = m_new;
      l[a] *= alpha;
#pragma unroll
      for (int n = 0; n < DVP / 8; ++n) o[n][2 * a] *= alpha, o[n][2 * a + 1] *= alpha;
    }
#pragma unroll
    for (int n = 0; n < kNt; ++n)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        s[n][e] = exp2f(s[n][e] - m[e / 2]);
        l[e / 2] += s[n][e];
      }
    product<DVP>(o, s, Vs, LV, lane);
  }

  float inv[2];
#pragma unroll
  for (int a = 0; a < 2; ++a) {
    l[a] += __shfl_xor_sync(0xFFFFFFFFu, l[a], 1);
    l[a] += __shfl_xor_sync(0xFFFFFFFFu, l[a], 2);
    inv[a] = 1.0f / l[a];
  }
#pragma unroll
  for (int n = 0; n < DVP / 8; ++n) o[n][0] *= inv[0], o[n][1] *= inv[0], o[n][2] *= inv[1], o[n][3] *= inv[1];
  store_rows<DV>(out + tok0 * ldv + h * DV, ldv, i0 + 16 * w, seq, o, 1.0f, lane);
  if (lane % 4 == 0) {
    float* lse_h = lse + (int64_t{b} * heads + h) * seq;
    if (r0 < seq) lse_h[r0] = (m[0] + log2f(l[0])) * kLn2Tc;
    if (r0 + 8 < seq) lse_h[r0 + 8] = (m[1] + log2f(l[1])) * kLn2Tc;
  }
}

// Backward, dK and dV of key tile kt = z, over query tiles kt .. tiles-1. Rows are keys j, score columns queries i:
// Pᵀ_ji = 2^(s_ij·scale·log2e − lse_i·log2e) for j <= i < seq, else 0; dSᵀ = Pᵀ∘(dPᵀ − D_i);
// dV += Pᵀ·dO, dK += dSᵀ·Q (times scale at the end). D_i is read from d_stash[row·DQ] (attention_dot_kernel).
template <int DQ, int DV>
__global__ void __launch_bounds__(kThreadsTc)
    attention_dkdv_tc(const float* __restrict__ dout, const float* __restrict__ q, const float* __restrict__ k,
                      const float* __restrict__ v, const float* __restrict__ lse, const float* __restrict__ d_stash,
                      float* __restrict__ dk, float* __restrict__ dv, int seq, int heads, float scale,
                      float scale_log2) {
  constexpr int LQ = row_stride(pad16(DQ)), LV = row_stride(pad16(DV)), DQP = pad16(DQ), DVP = pad16(DV);
  __shared__ __align__(16) __nv_bfloat16 Ks[kCols * LQ], Vs[kCols * LV], Qs[kCols * LQ], dOs[kCols * LV];
  __shared__ float lse2[kCols], Dr[kCols];
  const int lane = threadIdx.x % 32, w = threadIdx.x / 32;
  const int tiles = (seq + kCols - 1) / kCols;
  const int kt = blockIdx.z, h = blockIdx.x, b = blockIdx.y, j0 = kt * kCols;
  const int64_t ldq = int64_t{heads} * DQ, ldv = int64_t{heads} * DV, tok0 = int64_t{b} * seq;
  const float* qh = q + tok0 * ldq + h * DQ;
  const float* doh = dout + tok0 * ldv + h * DV;
  const float* dh = d_stash + tok0 * ldq + h * DQ;
  const float* lse_h = lse + (int64_t{b} * heads + h) * seq;
  stage<DQ>(Ks, k + tok0 * ldq + h * DQ + j0 * ldq, ldq, seq - j0);
  stage<DV>(Vs, v + tok0 * ldv + h * DV + j0 * ldv, ldv, seq - j0);

  const int jr = j0 + 16 * w + lane / 4;  // this thread's keys jr and jr + 8
  float dk_acc[DQP / 8][4], dv_acc[DVP / 8][4];
  zero<DQP>(dk_acc);
  zero<DVP>(dv_acc);
  for (int qt = kt; qt < tiles; ++qt) {
    const int i0 = qt * kCols;
    __syncthreads();  // the previous Q, dO, lse, D are read
    stage<DQ>(Qs, qh + i0 * ldq, ldq, seq - i0);
    stage<DV>(dOs, doh + i0 * ldv, ldv, seq - i0);
    for (int t = threadIdx.x; t < kCols; t += kThreadsTc) {
      const bool in = i0 + t < seq;
      lse2[t] = in ? lse_h[i0 + t] * kLog2eTc : 0.0f;
      Dr[t] = in ? dh[(i0 + t) * ldq] : 0.0f;
    }
    __syncthreads();

    float p[kNt][4], ds[kNt][4];
    scores<DQ>(p, Ks + 16 * w * LQ, LQ, Qs, LQ, lane);    // Sᵀ = K·Qᵀ
    scores<DV>(ds, Vs + 16 * w * LV, LV, dOs, LV, lane);  // dPᵀ = V·dOᵀ
#pragma unroll
    for (int n = 0; n < kNt; ++n)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int c = n * 8 + (lane % 4) * 2 + e % 2, i = i0 + c, j = jr + (e / 2) * 8;
        p[n][e] = (j <= i && i < seq) ? exp2f(p[n][e] * scale_log2 - lse2[c]) : 0.0f;
        ds[n][e] = p[n][e] * (ds[n][e] - Dr[c]);
      }
    product<DVP>(dv_acc, p, dOs, LV, lane);
    product<DQP>(dk_acc, ds, Qs, LQ, lane);
  }
  store_rows<DQ>(dk + tok0 * ldq + h * DQ, ldq, j0 + 16 * w, seq, dk_acc, scale, lane);
  store_rows<DV>(dv + tok0 * ldv + h * DV, ldv, j0 + 16 * w, seq, dv_acc, 1.0f, lane);
}

// Backward, dQ of query tile tiles-1-z over key tiles 0 .. diagonal: dS = P∘(dP − D_i), dQ += dS·K (times scale).
// D_i of the block's rows is read from dq (attention_dot_kernel's stash) before the block overwrites them at the
// end; no other block touches these rows.
template <int DQ, int DV>
__global__ void __launch_bounds__(kThreadsTc)
    attention_dq_tc(const float* __restrict__ dout, const float* __restrict__ q, const float* __restrict__ k,
                    const float* __restrict__ v, const float* __restrict__ lse, float* dq, int seq, int heads,
                    float scale, float scale_log2) {
  constexpr int LQ = row_stride(pad16(DQ)), LV = row_stride(pad16(DV)), DQP = pad16(DQ);
  __shared__ __align__(16) __nv_bfloat16 Qs[kCols * LQ], dOs[kCols * LV], Ks[kCols * LQ], Vs[kCols * LV];
  const int lane = threadIdx.x % 32, w = threadIdx.x / 32;
  const int tiles = (seq + kCols - 1) / kCols;
  const int qt = tiles - 1 - static_cast<int>(blockIdx.z), h = blockIdx.x, b = blockIdx.y, i0 = qt * kCols;
  const int64_t ldq = int64_t{heads} * DQ, ldv = int64_t{heads} * DV, tok0 = int64_t{b} * seq;
  const float* kh = k + tok0 * ldq + h * DQ;
  const float* vh = v + tok0 * ldv + h * DV;
  float* dqh = dq + tok0 * ldq + h * DQ;
  const float* lse_h = lse + (int64_t{b} * heads + h) * seq;
  stage<DQ>(Qs, q + tok0 * ldq + h * DQ + i0 * ldq, ldq, seq - i0);
  stage<DV>(dOs, dout + tok0 * ldv + h * DV + i0 * ldv, ldv, seq - i0);

  const int r0 = i0 + 16 * w + lane / 4;  // this thread's rows r0 and r0 + 8
  float row_lse2[2], row_d[2];
#pragma unroll
  for (int a = 0; a < 2; ++a) {
    const int i = r0 + 8 * a;
    row_lse2[a] = i < seq ? lse_h[i] * kLog2eTc : 0.0f;
    row_d[a] = i < seq ? dqh[i * ldq] : 0.0f;
  }
  float dq_acc[DQP / 8][4];
  zero<DQP>(dq_acc);
  for (int kt = 0; kt <= qt; ++kt) {
    const int j0 = kt * kCols;
    __syncthreads();  // the previous K, V are read
    stage<DQ>(Ks, kh + j0 * ldq, ldq, seq - j0);
    stage<DV>(Vs, vh + j0 * ldv, ldv, seq - j0);
    __syncthreads();

    float p[kNt][4], ds[kNt][4];
    scores<DQ>(p, Qs + 16 * w * LQ, LQ, Ks, LQ, lane);    // S = Q·Kᵀ
    scores<DV>(ds, dOs + 16 * w * LV, LV, Vs, LV, lane);  // dP = dO·Vᵀ
#pragma unroll
    for (int n = 0; n < kNt; ++n)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int a = e / 2, i = r0 + 8 * a, j = j0 + n * 8 + (lane % 4) * 2 + e % 2;
        const float pe = j <= i ? exp2f(p[n][e] * scale_log2 - row_lse2[a]) : 0.0f;
        ds[n][e] = pe * (ds[n][e] - row_d[a]);
      }
    product<DQP>(dq_acc, ds, Ks, LQ, lane);
  }
  store_rows<DQ>(dqh, ldq, i0 + 16 * w, seq, dq_acc, scale, lane);
}

template <int N> using Dim = std::integral_constant<int, N>;

// f(Dim<DQ>, Dim<DV>) for the head dims with tensor-core kernels; false for any other pair.
template <class F> bool dispatch_tc(int64_t dqk, int64_t dv, F&& f) {
  if (dqk == 24 && dv == 16) return f(Dim<24>{}, Dim<16>{}), true;  // tests/fixtures/deepseek-v3-tiny
  if (dqk == 96 && dv == 64) return f(Dim<96>{}, Dim<64>{}), true;  // bench-600m
  return false;
}

bool check_tc(const std::string& where, int64_t batch, int64_t seq, int64_t heads, int64_t dqk, int64_t dv,
              float scale, std::initializer_list<const void*> tensors, const void* lse) {
  require(batch >= 0 && seq >= 0 && heads >= 0, where + ": batch, seq and heads must be >= 0");
  require(attention_bf16_supported(dqk, dv), where + ": head dims dqk " + std::to_string(dqk) + ", dv " +
                                                 std::to_string(dv) + " not supported (24/16 or 96/64)");
  require(std::isfinite(scale), where + ": scale must be finite");
  if (batch == 0 || seq == 0 || heads == 0) return false;
  require(heads <= 65535 && batch <= 65535 && seq <= int64_t{65535} * kCols,
          where + ": heads, batch must be <= 65535 and seq <= 65535·64");
  for (const void* p : tensors) {
    require(p != nullptr, where + ": null tensor pointer");
    require(reinterpret_cast<uintptr_t>(p) % 16 == 0, where + ": tensor pointers must be 16-byte aligned");
  }
  require(lse != nullptr, where + ": null lse pointer");
  return true;
}

dim3 grid_of(int64_t batch, int64_t seq, int64_t heads) {
  return dim3(static_cast<unsigned>(heads), static_cast<unsigned>(batch), static_cast<unsigned>((seq + kCols - 1) / kCols));
}

}  // namespace

bool attention_bf16_supported(int64_t dqk, int64_t dv) {
  return dispatch_tc(dqk, dv, [](auto, auto) {});
}

void attention_forward_bf16(const float* q, const float* k, const float* v, float* out, float* lse, int64_t batch,
                            int64_t seq, int64_t heads, int64_t dqk, int64_t dv, float scale, cudaStream_t stream) {
  if (!check_tc("moerl::cuda::attention_forward_bf16", batch, seq, heads, dqk, dv, scale, {q, k, v, out}, lse)) return;
  dispatch_tc(dqk, dv, [&](auto dq_dim, auto dv_dim) {
    constexpr int DQ = decltype(dq_dim)::value, DV = decltype(dv_dim)::value;
    attention_forward_tc<DQ, DV><<<grid_of(batch, seq, heads), kThreadsTc, 0, stream>>>(
        q, k, v, out, lse, static_cast<int>(seq), static_cast<int>(heads), scale * kLog2eTc);
    CUDA_CHECK_LAUNCH();
  });
}

void attention_backward_bf16(const float* dout, const float* q, const float* k, const float* v, const float* out,
                             const float* lse, float* dq, float* dk, float* dv_out, int64_t batch, int64_t seq,
                             int64_t heads, int64_t dqk, int64_t dv, float scale, cudaStream_t stream) {
  const std::string where = "moerl::cuda::attention_backward_bf16";
  if (!check_tc(where, batch, seq, heads, dqk, dv, scale, {dout, q, k, v, out, dq, dk, dv_out}, lse)) return;
  dispatch_tc(dqk, dv, [&](auto dq_dim, auto dv_dim) {
    constexpr int DQ = decltype(dq_dim)::value, DV = decltype(dv_dim)::value;
    const int s = static_cast<int>(seq), h = static_cast<int>(heads);
    const int64_t rows = batch * seq * heads, warps = attention_detail::kThreads / 32;
    const int64_t dot_blocks = (rows + warps - 1) / warps;
    require(dot_blocks <= INT32_MAX, where + ": too many (token, head) rows for one launch");
    attention_detail::attention_dot_kernel<DV>
        <<<static_cast<unsigned>(dot_blocks), attention_detail::kThreads, 0, stream>>>(dout, out, dq, rows, DQ);
    CUDA_CHECK_LAUNCH();
    const dim3 grid = grid_of(batch, seq, heads);
    attention_dkdv_tc<DQ, DV><<<grid, kThreadsTc, 0, stream>>>(dout, q, k, v, lse, dq, dk, dv_out, s, h, scale,
                                                               scale * kLog2eTc);
    CUDA_CHECK_LAUNCH();
    attention_dq_tc<DQ, DV><<<grid, kThreadsTc, 0, stream>>>(dout, q, k, v, lse, dq, s, h, scale, scale * kLog2eTc);
    CUDA_CHECK_LAUNCH();
  });
}

}  // namespace moerl::cuda
