// Device code of the causal attention core (host side: kernels/cuda/attention.cu). FP32 on CUDA cores,
// flash-attention style: no [seq, seq] matrix in global memory; every sum in a fixed order, no atomics.
//
// A block of kThreads = 256 threads works on one (sequence b, head h) pair and one 64-row tile of "rows"
// (queries in the forward and dQ kernels, keys in the dK/dV kernel) against a stream of 64-row tiles of the
// other side. Thread t = 16·ty + tx owns rows ty·4 .. ty·4+3 of the tile (so the 16 lanes of a row are one
// half-warp and row reductions are 4 shuffles) and score columns tx + 16e, e < 4. Score tiles go through
// shared memory (row stride 68 floats) for the products that follow; a thread reads back only its own rows,
// which its half-warp wrote, so a warp barrier orders them.
//
// Shared tiles are row-major with kPad floats of padding: the row stride is an odd multiple of 16 bytes, so
// the 8 lanes of a 16-byte-load phase reading 8 consecutive rows at the same column hit 8 distinct bank
// groups. All widths are multiples of 4 (float4 loads along rows).
//
// Softmax in base 2: scores are scaled by scale·log2(e) and exponentiated with exp2f; lse is stored in
// natural units as the CPU reference's.
#pragma once
#include <cstdint>

namespace moerl::cuda::attention_detail {

constexpr int kThreads = 256;
constexpr int kLanes = 16;   // threads per row: tx = threadIdx.x % kLanes, ty = threadIdx.x / kLanes
constexpr int kTile = 64;    // rows per tile on both sides (queries per query tile = keys per key tile)
constexpr int kRows = 4;     // tile rows per thread: kThreads / kLanes * kRows = kTile
constexpr int kScoreCols = 4;  // score columns per thread: kLanes * kScoreCols = kTile
constexpr int kPad = 4;
static_assert(kThreads / kLanes * kRows == kTile && kLanes * kScoreCols == kTile, "thread layout covers the tile");
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

// Row stride in floats of a shared tile with `width` columns.
__host__ __device__ constexpr int ld(int width) { return width + kPad; }
__host__ __device__ constexpr bool conflict_free_stride(int width) { return width % 4 == 0 && (ld(width) / 4) % 2 == 1; }

// Blocks per SM whose shared memory (`floats` each) fits an H100/H200 SM (228 KB, 1 KB reserved per block).
// Sets the register cap through __launch_bounds__: 2 blocks of 256 threads leave 128 registers per thread.
__host__ __device__ constexpr int blocks_per_sm(int floats) { return 2 * (floats * 4 + 1024) <= 228 * 1024 ? 2 : 1; }

// Shared memory (floats) of each kernel for head dims DQ (queries, keys) and DV (values).
template <int DQ, int DV> struct Smem {
  static constexpr int q = kTile * ld(DQ), v = kTile * ld(DV), s = kTile * ld(kTile);
  static constexpr int forward = 2 * q + v + s;                  // Q, K, V, P
  static constexpr int dkdv = 2 * q + 2 * v + 2 * s + 2 * kTile;  // K, V, Q, dO, Pᵀ, dSᵀ, lse·log2(e), D
  static constexpr int dq = 2 * q + 2 * v + s + 2 * kTile;       // Q, dO, K, V, dS, lse·log2(e), D
  static constexpr int forward_blocks = blocks_per_sm(forward), dkdv_blocks = blocks_per_sm(dkdv),
                       dq_blocks = blocks_per_sm(dq);
};

// Output columns of a thread in a [kTile, W] product: kGroups runs of kVec consecutive columns, run g
// starting at (16·g + tx)·kVec. W = 24 leaves the second run to lanes tx < 8 (kGuard).
template <int W> struct Cols {
  static constexpr int kVec = W % 64 == 0 ? 4 : W % 32 == 0 ? 2 : 1;
  static constexpr int kGroups = (W + kLanes * kVec - 1) / (kLanes * kVec);
  static constexpr int kPerThread = kGroups * kVec;
  static constexpr bool kGuard = W % (kLanes * kVec) != 0;
  __device__ static int col(int g, int tx) { return (g * kLanes + tx) * kVec; }
  __device__ static bool owned(int g, int tx) { return !kGuard || col(g, tx) < W; }
};

// The block's dynamic shared memory (16-byte aligned).
__device__ __forceinline__ float* dynamic_smem() {
  extern __shared__ float4 smem[];
  return reinterpret_cast<float*>(smem);
}

template <int N> __device__ __forceinline__ void load_vec(const float* p, float (&out)[N]) {
  if constexpr (N == 4) {
    const float4 t = *reinterpret_cast<const float4*>(p);
    out[0] = t.x, out[1] = t.y, out[2] = t.z, out[3] = t.w;
  } else if constexpr (N == 2) {
    const float2 t = *reinterpret_cast<const float2*>(p);
    out[0] = t.x, out[1] = t.y;
  } else {
    static_assert(N == 1, "vector width 1, 2 or 4");
    out[0] = *p;
  }
}

template <int N> __device__ __forceinline__ void store_vec(float* p, const float (&in)[N]) {
  if constexpr (N == 4) {
    *reinterpret_cast<float4*>(p) = make_float4(in[0], in[1], in[2], in[3]);
  } else if constexpr (N == 2) {
    *reinterpret_cast<float2*>(p) = make_float2(in[0], in[1]);
  } else {
    static_assert(N == 1, "vector width 1, 2 or 4");
    *p = in[0];
  }
}

// Reductions over the 16 lanes of a row (a half-warp); every lane gets the same value.
__device__ __forceinline__ float row_max(float x) {
  for (int offset = kLanes / 2; offset > 0; offset /= 2) x = fmaxf(x, __shfl_xor_sync(0xFFFFFFFFu, x, offset));
  return x;
}
__device__ __forceinline__ float row_sum(float x) {
  for (int offset = kLanes / 2; offset > 0; offset /= 2) x += __shfl_xor_sync(0xFFFFFFFFu, x, offset);
  return x;
}

// dst [kTile, W] (stride ld(W)) <- rows 0 .. kTile-1 of src (global, row stride ldg floats, 16-byte aligned
// rows); rows >= valid are zero-filled.
template <int W>
__device__ __forceinline__ void load_tile(float* __restrict__ dst, const float* __restrict__ src, int64_t ldg,
                                          int valid) {
  static_assert(W % 4 == 0, "rows are copied in float4 chunks");
  constexpr int kChunks = W / 4;
  for (int i = threadIdx.x; i < kTile * kChunks; i += kThreads) {
    const int r = i / kChunks, c = (i % kChunks) * 4;
    float4 x = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
    if (r < valid) x = *reinterpret_cast<const float4*>(src + r * ldg + c);
    *reinterpret_cast<float4*>(dst + r * ld(W) + c) = x;
  }
}

// s[a][e] = Σ_d A[4ty + a][d] · B[tx + 16e][d]: A and B shared [kTile, D] tiles.
template <int D>
__device__ __forceinline__ void tile_scores(const float* __restrict__ A, const float* __restrict__ B, int ty, int tx,
                                            float (&s)[kRows][kScoreCols]) {
  static_assert(conflict_free_stride(D), "row stride must be an odd multiple of 16 bytes");
#pragma unroll
  for (int a = 0; a < kRows; ++a)
#pragma unroll
    for (int e = 0; e < kScoreCols; ++e) s[a][e] = 0.0f;
#pragma unroll 2
  for (int d = 0; d < D; d += 4) {
    float x[kRows][4];
#pragma unroll
    for (int a = 0; a < kRows; ++a) load_vec<4>(A + (ty * kRows + a) * ld(D) + d, x[a]);
#pragma unroll
    for (int e = 0; e < kScoreCols; ++e) {
      float y[4];
      load_vec<4>(B + (tx + kLanes * e) * ld(D) + d, y);
#pragma unroll
      for (int a = 0; a < kRows; ++a)
#pragma unroll
        for (int dd = 0; dd < 4; ++dd) s[a][e] = fmaf(x[a][dd], y[dd], s[a][e]);
    }
  }
}

// c[a][n] += Σ_k A[4ty + a][k] · B[k][column n of this thread (Cols<W>)]: A a shared [kTile, kTile] score
// tile, B a shared [kTile, W] tile.
template <int W>
__device__ __forceinline__ void tile_product(const float* __restrict__ A, const float* __restrict__ B, int ty, int tx,
                                             float (&c)[kRows][Cols<W>::kPerThread]) {
  using C = Cols<W>;
#pragma unroll 2
  for (int k = 0; k < kTile; k += 4) {
    float x[kRows][4];
#pragma unroll
    for (int a = 0; a < kRows; ++a) load_vec<4>(A + (ty * kRows + a) * ld(kTile) + k, x[a]);
#pragma unroll
    for (int kk = 0; kk < 4; ++kk)
#pragma unroll
      for (int g = 0; g < C::kGroups; ++g) {
        if (!C::owned(g, tx)) continue;
        float y[C::kVec];
        load_vec<C::kVec>(B + (k + kk) * ld(W) + C::col(g, tx), y);
#pragma unroll
        for (int a = 0; a < kRows; ++a)
#pragma unroll
          for (int n = 0; n < C::kVec; ++n) c[a][g * C::kVec + n] = fmaf(x[a][kk], y[n], c[a][g * C::kVec + n]);
      }
  }
}

// Global row `row` (stride ldg) of a [.., W] tensor <- factor · c[a] at this thread's columns.
template <int W>
__device__ __forceinline__ void store_row(float* __restrict__ dst_row, const float (&c)[Cols<W>::kPerThread],
                                          float factor, int tx) {
  using C = Cols<W>;
#pragma unroll
  for (int g = 0; g < C::kGroups; ++g) {
    if (!C::owned(g, tx)) continue;
    float y[C::kVec];
#pragma unroll
    for (int n = 0; n < C::kVec; ++n) y[n] = c[g * C::kVec + n] * factor;
    store_vec<C::kVec>(dst_row + C::col(g, tx), y);
  }
}

// Grids are (heads, batch, tiles) with the longest tiles at z = 0: blocks start in x, y, z order, so the long
// ones run first and the short ones fill the tail.
//
// Forward. Block z takes query tile tiles-1-z (keys 0 .. its diagonal). Streams
// the key tiles 0 .. qt with an online softmax: running row max m (base 2), per-thread partial row sums l,
// O rescaled by 2^(m_old - m_new) whenever the max grows.
template <int DQ, int DV>
__global__ void __launch_bounds__(kThreads, Smem<DQ, DV>::forward_blocks)
    attention_forward_kernel(const float* __restrict__ q, const float* __restrict__ k, const float* __restrict__ v,
                             float* __restrict__ out, float* __restrict__ lse, int seq, int heads, float scale_log2) {
  float* Qs = dynamic_smem();
  float* Ks = Qs + Smem<DQ, DV>::q;
  float* Vs = Ks + Smem<DQ, DV>::q;
  float* Ps = Vs + Smem<DQ, DV>::v;
  const int tx = threadIdx.x % kLanes, ty = threadIdx.x / kLanes;
  const int tiles = (seq + kTile - 1) / kTile;
  const int qt = tiles - 1 - static_cast<int>(blockIdx.z), h = blockIdx.x, b = blockIdx.y, i0 = qt * kTile;
  const int64_t ldq = int64_t{heads} * DQ, ldv = int64_t{heads} * DV, tok0 = int64_t{b} * seq;
  const float* qh = q + tok0 * ldq + h * DQ;
  const float* kh = k + tok0 * ldq + h * DQ;
  const float* vh = v + tok0 * ldv + h * DV;

  load_tile<DQ>(Qs, qh + i0 * ldq, ldq, seq - i0);
  float m[kRows], l[kRows], o[kRows][Cols<DV>::kPerThread];
#pragma unroll
  for (int a = 0; a < kRows; ++a) {
    m[a] = -INFINITY, l[a] = 0.0f;
#pragma unroll
    for (int n = 0; n < Cols<DV>::kPerThread; ++n) o[a][n] = 0.0f;
  }

  for (int kt = 0; kt <= qt; ++kt) {
    const int j0 = kt * kTile;
    load_tile<DQ>(Ks, kh + j0 * ldq, ldq, seq - j0);
    load_tile<DV>(Vs, vh + j0 * ldv, ldv, seq - j0);
    __syncthreads();  // Q, K, V tiles written

    float s[kRows][kScoreCols];
    tile_scores<DQ>(Qs, Ks, ty, tx, s);
#pragma unroll
    for (int a = 0; a < kRows; ++a) {
      const int i = i0 + ty * kRows + a;
      float mx = -INFINITY;
#pragma unroll
      for (int e = 0; e < kScoreCols; ++e) {
        s[a][e] *= scale_log2;
        if (kt == qt && j0 + tx + kLanes * e > i) s[a][e] = -INFINITY;  // causal; key j0 <= i keeps mx finite
        mx = fmaxf(mx, s[a][e]);
      }
      const float m_new = fmaxf(m[a], row_max(mx));
      const float alpha = exp2f(m[a] - m_new);  // 0 on the first tile (m = -inf)
      m[a] = m_new;
      l[a] *= alpha;
#pragma unroll
      for (int n = 0; n < Cols<DV>::kPerThread; ++n) o[a][n] *= alpha;
#pragma unroll
      for (int e = 0; e < kScoreCols; ++e) {
        const float p = exp2f(s[a][e] - m_new);
        l[a] += p;
        Ps[(ty * kRows + a) * ld(kTile) + tx + kLanes * e] = p;
      }
    }
    __syncwarp();  // P rows 4ty .. 4ty+3 are written and read by the same half-warp
    tile_product<DV>(Ps, Vs, ty, tx, o);
    __syncthreads();  // K, V, P read before the next tile overwrites them
  }

  float* oh = out + tok0 * ldv + h * DV;
  float* lse_h = lse + (int64_t{b} * heads + h) * seq;
#pragma unroll
  for (int a = 0; a < kRows; ++a) {
    const float sum = row_sum(l[a]);  // every lane takes part in the shuffles before any returns
    const int i = i0 + ty * kRows + a;
    if (i >= seq) continue;
    store_row<DV>(oh + i * ldv, o[a], 1.0f / sum, tx);
    if (tx == 0) lse_h[i] = (m[a] + log2f(sum)) * kLn2;
  }
}

// Backward, step 1: D_i = Σ_c dO_ic · O_ic for every (token, head) row r = token·heads + h, one warp per row.
// Written to dq[r·DQ] (the first element of the row's dQ, overwritten by the dQ kernel later): the backward
// needs no workspace.
template <int DV>
__global__ void __launch_bounds__(kThreads)
    attention_dot_kernel(const float* __restrict__ dout, const float* __restrict__ out, float* __restrict__ d_stash,
                         int64_t rows, int dqk) {
  const int lane = threadIdx.x % 32;
  const int64_t r = int64_t{blockIdx.x} * (kThreads / 32) + threadIdx.x / 32;
  if (r >= rows) return;  // a whole warp; no block barrier in this kernel
  float acc = 0.0f;
  for (int c = lane; c < DV; c += 32) acc = fmaf(dout[r * DV + c], out[r * DV + c], acc);
  for (int offset = 16; offset > 0; offset /= 2) acc += __shfl_xor_sync(0xFFFFFFFFu, acc, offset);
  if (lane == 0) d_stash[r * dqk] = acc;
}

// Backward, step 2: dK and dV of one key tile kt (block z), streaming query tiles kt .. tiles-1. Rows are keys
// j, score columns queries i: Pᵀ_ji = 2^(s_ij·scale·log2e − lse_i·log2e) for j <= i < seq, else 0;
// dSᵀ_ji = Pᵀ_ji (dP_ij − D_i); dV += Pᵀ·dO, dK += dSᵀ·Q (times scale at the end).
template <int DQ, int DV>
__global__ void __launch_bounds__(kThreads, Smem<DQ, DV>::dkdv_blocks)
    attention_backward_dkdv_kernel(const float* __restrict__ dout, const float* __restrict__ q,
                                   const float* __restrict__ k, const float* __restrict__ v,
                                   const float* __restrict__ lse, const float* __restrict__ d_stash,
                                   float* __restrict__ dk, float* __restrict__ dv, int seq, int heads, float scale,
                                   float scale_log2) {
  float* Ks = dynamic_smem();
  float* Vs = Ks + Smem<DQ, DV>::q;
  float* Qs = Vs + Smem<DQ, DV>::v;
  float* dOs = Qs + Smem<DQ, DV>::q;
  float* Pt = dOs + Smem<DQ, DV>::v;
  float* dSt = Pt + Smem<DQ, DV>::s;
  float* lse2 = dSt + Smem<DQ, DV>::s;
  float* Dr = lse2 + kTile;
  const int tx = threadIdx.x % kLanes, ty = threadIdx.x / kLanes;
  const int tiles = (seq + kTile - 1) / kTile;
  const int kt = blockIdx.z, h = blockIdx.x, b = blockIdx.y, j0 = kt * kTile;
  const int64_t ldq = int64_t{heads} * DQ, ldv = int64_t{heads} * DV, tok0 = int64_t{b} * seq;
  const float* qh = q + tok0 * ldq + h * DQ;
  const float* doh = dout + tok0 * ldv + h * DV;
  const float* dh = d_stash + tok0 * ldq + h * DQ;
  const float* lse_h = lse + (int64_t{b} * heads + h) * seq;

  load_tile<DQ>(Ks, k + tok0 * ldq + h * DQ + j0 * ldq, ldq, seq - j0);
  load_tile<DV>(Vs, v + tok0 * ldv + h * DV + j0 * ldv, ldv, seq - j0);
  float dk_acc[kRows][Cols<DQ>::kPerThread], dv_acc[kRows][Cols<DV>::kPerThread];
#pragma unroll
  for (int a = 0; a < kRows; ++a) {
#pragma unroll
    for (int n = 0; n < Cols<DQ>::kPerThread; ++n) dk_acc[a][n] = 0.0f;
#pragma unroll
    for (int n = 0; n < Cols<DV>::kPerThread; ++n) dv_acc[a][n] = 0.0f;
  }

  for (int qt = kt; qt < tiles; ++qt) {
    const int i0 = qt * kTile;
    load_tile<DQ>(Qs, qh + i0 * ldq, ldq, seq - i0);
    load_tile<DV>(dOs, doh + i0 * ldv, ldv, seq - i0);
    for (int t = threadIdx.x; t < kTile; t += kThreads) {
      const bool in = i0 + t < seq;
      lse2[t] = in ? lse_h[i0 + t] * kLog2e : 0.0f;
      Dr[t] = in ? dh[(i0 + t) * ldq] : 0.0f;
    }
    __syncthreads();  // Q, dO, lse, D (and K, V on the first pass) written

    float s[kRows][kScoreCols], dp[kRows][kScoreCols];
    tile_scores<DQ>(Ks, Qs, ty, tx, s);
    tile_scores<DV>(Vs, dOs, ty, tx, dp);
#pragma unroll
    for (int a = 0; a < kRows; ++a) {
      const int j = j0 + ty * kRows + a;
#pragma unroll
      for (int e = 0; e < kScoreCols; ++e) {
        const int c = tx + kLanes * e, i = i0 + c;
        const float p = (j <= i && i < seq) ? exp2f(s[a][e] * scale_log2 - lse2[c]) : 0.0f;
        Pt[(ty * kRows + a) * ld(kTile) + c] = p;
        dSt[(ty * kRows + a) * ld(kTile) + c] = p * (dp[a][e] - Dr[c]);
      }
    }
    __syncwarp();  // Pᵀ, dSᵀ rows 4ty .. 4ty+3 are written and read by the same half-warp
    tile_product<DV>(Pt, dOs, ty, tx, dv_acc);
    tile_product<DQ>(dSt, Qs, ty, tx, dk_acc);
    __syncthreads();  // Q, dO, Pᵀ, dSᵀ read before the next query tile overwrites them
  }

  float* dkh = dk + tok0 * ldq + h * DQ;
  float* dvh = dv + tok0 * ldv + h * DV;
#pragma unroll
  for (int a = 0; a < kRows; ++a) {
    const int j = j0 + ty * kRows + a;
    if (j >= seq) continue;
    store_row<DQ>(dkh + j * ldq, dk_acc[a], scale, tx);
    store_row<DV>(dvh + j * ldv, dv_acc[a], 1.0f, tx);
  }
}

// Backward, step 3: dQ of one query tile (block z takes tiles-1-z), streaming key tiles 0 .. qt:
// dS_ij = P_ij (dP_ij − D_i), dQ += dS·K (times scale at the end). D_i is read from dq (step 1) into shared
// memory first; the same block overwrites those rows only at the end, after the loop's barriers.
template <int DQ, int DV>
__global__ void __launch_bounds__(kThreads, Smem<DQ, DV>::dq_blocks)
    attention_backward_dq_kernel(const float* __restrict__ dout, const float* __restrict__ q,
                                 const float* __restrict__ k, const float* __restrict__ v,
                                 const float* __restrict__ lse, float* dq, int seq, int heads, float scale,
                                 float scale_log2) {
  float* Qs = dynamic_smem();
  float* dOs = Qs + Smem<DQ, DV>::q;
  float* Ks = dOs + Smem<DQ, DV>::v;
  float* Vs = Ks + Smem<DQ, DV>::q;
  float* dSs = Vs + Smem<DQ, DV>::v;
  float* lse2 = dSs + Smem<DQ, DV>::s;
  float* Dr = lse2 + kTile;
  const int tx = threadIdx.x % kLanes, ty = threadIdx.x / kLanes;
  const int tiles = (seq + kTile - 1) / kTile;
  const int qt = tiles - 1 - static_cast<int>(blockIdx.z), h = blockIdx.x, b = blockIdx.y, i0 = qt * kTile;
  const int64_t ldq = int64_t{heads} * DQ, ldv = int64_t{heads} * DV, tok0 = int64_t{b} * seq;
  const float* kh = k + tok0 * ldq + h * DQ;
  const float* vh = v + tok0 * ldv + h * DV;
  float* dqh = dq + tok0 * ldq + h * DQ;
  const float* lse_h = lse + (int64_t{b} * heads + h) * seq;

  load_tile<DQ>(Qs, q + tok0 * ldq + h * DQ + i0 * ldq, ldq, seq - i0);
  load_tile<DV>(dOs, dout + tok0 * ldv + h * DV + i0 * ldv, ldv, seq - i0);
  for (int t = threadIdx.x; t < kTile; t += kThreads) {
    const bool in = i0 + t < seq;
    lse2[t] = in ? lse_h[i0 + t] * kLog2e : 0.0f;
    Dr[t] = in ? dqh[(i0 + t) * ldq] : 0.0f;
  }
  float dq_acc[kRows][Cols<DQ>::kPerThread];
#pragma unroll
  for (int a = 0; a < kRows; ++a)
#pragma unroll
    for (int n = 0; n < Cols<DQ>::kPerThread; ++n) dq_acc[a][n] = 0.0f;

  for (int kt = 0; kt <= qt; ++kt) {
    const int j0 = kt * kTile;
    load_tile<DQ>(Ks, kh + j0 * ldq, ldq, seq - j0);
    load_tile<DV>(Vs, vh + j0 * ldv, ldv, seq - j0);
    __syncthreads();  // K, V (and Q, dO, lse, D on the first pass) written

    float s[kRows][kScoreCols], dp[kRows][kScoreCols];
    tile_scores<DQ>(Qs, Ks, ty, tx, s);
    tile_scores<DV>(dOs, Vs, ty, tx, dp);
#pragma unroll
    for (int a = 0; a < kRows; ++a) {
      const int r = ty * kRows + a, i = i0 + r;
      const float row_lse2 = lse2[r], row_d = Dr[r];
#pragma unroll
      for (int e = 0; e < kScoreCols; ++e) {
        const int c = tx + kLanes * e;
        const float p = j0 + c <= i ? exp2f(s[a][e] * scale_log2 - row_lse2) : 0.0f;
        dSs[r * ld(kTile) + c] = p * (dp[a][e] - row_d);
      }
    }
    __syncwarp();  // dS rows 4ty .. 4ty+3 are written and read by the same half-warp
    tile_product<DQ>(dSs, Ks, ty, tx, dq_acc);
    __syncthreads();  // K, V, dS read before the next key tile overwrites them
  }

#pragma unroll
  for (int a = 0; a < kRows; ++a) {
    const int i = i0 + ty * kRows + a;
    if (i < seq) store_row<DQ>(dqh + i * ldq, dq_acc[a], scale, tx);
  }
}

}  // namespace moerl::cuda::attention_detail
