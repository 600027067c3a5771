// Forward of the tensor-core attention on Hopper's warpgroup MMA (sm_90a) for bench-600m's head dims (dqk 96,
// dv 64), the default (MOERL_ATTN_TC_FWD_KERNEL=mma selects the mma.sync one; kernels/cuda/attention_tc.cu). Same
// arithmetic as attention_forward_tc (BF16 operands, FP32 scores and sums, online softmax in base 2 with ex2.approx, P rounded
// to BF16 for the product, lse saved), with each warpgroup (4 warps, 64 query rows) computing S = Q·Kᵀ by
// wgmma.mma_async m64n64k16 from shared memory (Q and K tiles K-major) and O += P·V with P from registers and V
// from a transposed packed copy Vᵀ [batch, heads, DVP, spad] (attention_tc_pack.hpp), so that V's tile is K-major
// too. Shared tiles: 128-byte rows in WGMMA's 128-byte swizzle (16-byte chunk c of row r at c ^ (r % 8), as in
// sm90_fp8_grouped_gemm.cu); Q and K (96 columns = 192 bytes a row) in two 128-byte panels (the second half used).
// Key tiles of 64 rows, double-buffered with cp.async; the mask is applied on the tiles crossing a warp's
// diagonal. Blocks of 1 or 2 warpgroups (MOERL_ATTN_TC_FWD_WG), one query tile of 64 per warpgroup.
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>

#include "kernels/cuda/attention_tc_mma.cuh"
#include "kernels/cuda/attention_tc_pack.hpp"
#include "kernels/cuda/cuda_check.hpp"

namespace moerl::cuda::attention_tc_detail {
namespace {

constexpr int kKeyTile = 64;       // keys per streamed tile
constexpr int kRowBytes = 128;     // bytes per row of a swizzled panel (64 BF16)
constexpr float kLn2Wg = 0.6931471805599453f;

__device__ __forceinline__ void fence_proxy_async() { asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_wait_all() { asm volatile("wgmma.wait_group.sync.aligned 0;\n" ::: "memory"); }
// Keeps the compiler from touching an accumulator register across an asynchronous WGMMA.
__device__ __forceinline__ void fence_frag(float (&d)[8][4]) {
#pragma unroll
  for (int n = 0; n < 8; ++n)
#pragma unroll
    for (int e = 0; e < 4; ++e) asm volatile("" : "+f"(d[n][e])::"memory");
}

// Descriptor of a K-major tile of 128-byte rows in the 128-byte swizzle at shared address addr (1024-byte aligned
// atoms): address >> 4, leading byte offset 16 >> 4 (unused), stride byte offset 1024 >> 4 (8 rows), swizzle mode 1.
// K advances 16 BF16 = 32 bytes by adding 2.
__device__ __forceinline__ uint64_t desc128(uint32_t addr) {
  return static_cast<uint64_t>((addr & 0x3FFFF) >> 4) | (uint64_t{1} << 16) | (uint64_t{1024 >> 4} << 32) |
         (uint64_t{1} << 62);
}

// Byte offset of 16-byte chunk c of row r in a swizzled panel.
__device__ __forceinline__ int swz(int r, int c) { return r * kRowBytes + ((c ^ (r & 7)) << 4); }

// d (64 x 64 FP32, the warpgroup's fragment: d[n][e] as mma.sync's C layout per warp, n-tile n) = (scale_d ? d : 0)
// + a (64 x 16 BF16) · bᵀ (b: 64 x 16 BF16), both K-major in shared memory (descriptors).
__device__ __forceinline__ void wgmma_ss(float (&d)[8][4], uint64_t desc_a, uint64_t desc_b, int scale_d) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %34, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 {"
      "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "
      "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31"
      "}, %32, %33, p, 1, 1, 0, 0;\n}\n"
      : "+f"(d[0][0]), "+f"(d[0][1]), "+f"(d[0][2]), "+f"(d[0][3]),
        "+f"(d[1][0]), "+f"(d[1][1]), "+f"(d[1][2]), "+f"(d[1][3]),
        "+f"(d[2][0]), "+f"(d[2][1]), "+f"(d[2][2]), "+f"(d[2][3]),
        "+f"(d[3][0]), "+f"(d[3][1]), "+f"(d[3][2]), "+f"(d[3][3]),
        "+f"(d[4][0]), "+f"(d[4][1]), "+f"(d[4][2]), "+f"(d[4][3]),
        "+f"(d[5][0]), "+f"(d[5][1]), "+f"(d[5][2]), "+f"(d[5][3]),
        "+f"(d[6][0]), "+f"(d[6][1]), "+f"(d[6][2]), "+f"(d[6][3]),
        "+f"(d[7][0]), "+f"(d[7][1]), "+f"(d[7][2]), "+f"(d[7][3])
      : "l"(desc_a), "l"(desc_b), "r"(scale_d));
}

// d += a · bᵀ with a (64 x 16 BF16) from registers (per warp the A fragment of mma.sync m16n8k16: the C fragments
// of two n-tiles rounded to BF16) and b (64 x 16) K-major in shared memory.
__device__ __forceinline__ void wgmma_rs(float (&d)[8][4], const uint32_t (&a)[4], uint64_t desc_b) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %37, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 {"
      "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "
      "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31"
      "}, {%32, %33, %34, %35}, %36, p, 1, 1, 0;\n}\n"
      : "+f"(d[0][0]), "+f"(d[0][1]), "+f"(d[0][2]), "+f"(d[0][3]),
        "+f"(d[1][0]), "+f"(d[1][1]), "+f"(d[1][2]), "+f"(d[1][3]),
        "+f"(d[2][0]), "+f"(d[2][1]), "+f"(d[2][2]), "+f"(d[2][3]),
        "+f"(d[3][0]), "+f"(d[3][1]), "+f"(d[3][2]), "+f"(d[3][3]),
        "+f"(d[4][0]), "+f"(d[4][1]), "+f"(d[4][2]), "+f"(d[4][3]),
        "+f"(d[5][0]), "+f"(d[5][1]), "+f"(d[5][2]), "+f"(d[5][3]),
        "+f"(d[6][0]), "+f"(d[6][1]), "+f"(d[6][2]), "+f"(d[6][3]),
        "+f"(d[7][0]), "+f"(d[7][1]), "+f"(d[7][2]), "+f"(d[7][3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b), "r"(1));
}

// Tile of ROWS packed rows of 96 BF16 (192 bytes, 12 chunks) at src -> two panels of ROWS x 128 bytes at dst
// (chunks 0-7 in the first, 8-11 in the second's chunks 0-3).
template <int ROWS, int THREADS> __device__ __forceinline__ void copy_qk(uint8_t* dst, const bf16* __restrict__ src) {
  constexpr int CH = 12;
#pragma unroll
  for (int it = 0; it < (ROWS * CH + THREADS - 1) / THREADS; ++it) {
    const int t = static_cast<int>(threadIdx.x) + it * THREADS;
    if ((ROWS * CH) % THREADS == 0 || t < ROWS * CH) {
      const int r = t / CH, c = t % CH;
      cp_async16(dst + (c / 8) * ROWS * kRowBytes + swz(r, c % 8), src + r * 96 + c * 8);
    }
  }
}

// Vᵀ tile: 64 rows (value columns) of 64 keys (128 bytes) at src (row stride spad) -> one panel at dst.
template <int THREADS> __device__ __forceinline__ void copy_vt(uint8_t* dst, const bf16* __restrict__ src, int spad) {
#pragma unroll
  for (int it = 0; it < (64 * 8 + THREADS - 1) / THREADS; ++it) {
    const int t = static_cast<int>(threadIdx.x) + it * THREADS;
    if ((64 * 8) % THREADS == 0 || t < 64 * 8) {
      const int r = t / 8, c = t % 8;
      cp_async16(dst + swz(r, c), src + int64_t{r} * spad + c * 8);
    }
  }
}

template <int WG>
__global__ void __launch_bounds__(128 * WG, WG == 2 ? 2 : 3)  // 2 or 3 blocks per SM (registers, shared memory)
    attention_forward_wgmma(const bf16* __restrict__ qb, const bf16* __restrict__ kb, const bf16* __restrict__ vtb,
                            float* __restrict__ out, float* __restrict__ lse, int seq, int spad, int heads,
                            float scale_log2, bool seq_order) {
  constexpr int DQ = 96, DV = 64, ROWS = 64 * WG, THREADS = 128 * WG;
  constexpr int Q_PANEL = ROWS * kRowBytes, K_PANEL = kKeyTile * kRowBytes;
  constexpr int Q_BYTES = 2 * Q_PANEL, K_BYTES = 2 * K_PANEL, VT_BYTES = DV * kRowBytes;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  uint8_t* base = smem_raw + ((1024 - smem_addr(smem_raw) % 1024) % 1024);  // swizzle atoms are 1024-byte aligned
  uint8_t* Qs = base;
  uint8_t* Ks = Qs + Q_BYTES;       // 2 stages
  uint8_t* Vts = Ks + 2 * K_BYTES;  // 2 stages
  const int lane = threadIdx.x % 32, wg = threadIdx.x / 128, wl = threadIdx.x / 32 % 4;
  int z, h, b;
  if (seq_order) z = blockIdx.x, h = blockIdx.y, b = blockIdx.z;
  else z = blockIdx.z, h = blockIdx.x, b = blockIdx.y;
  const int tiles = (seq + ROWS - 1) / ROWS, qt = tiles - 1 - z, i0 = qt * ROWS;
  const int64_t bh = int64_t{b} * heads + h;
  const bf16* kh = kb + bh * spad * DQ;
  const bf16* vth = vtb + bh * DV * spad;
  const int last = min(i0 + ROWS - 1, seq - 1) / kKeyTile;  // the block's last key tile
  copy_qk<ROWS, THREADS>(Qs, qb + (bh * spad + i0) * DQ);
  copy_qk<kKeyTile, THREADS>(Ks, kh);
  copy_vt<THREADS>(Vts, vth, spad);
  cp_async_commit();

  // The warpgroup's first row g0 (a multiple of 64: key tile 0 .. g0 / 64 are its tiles, the last one its
  // diagonal); the warp's w0; this thread's rows r0, r0 + 8.
  const int g0 = i0 + 64 * wg, w0 = g0 + 16 * wl, r0 = w0 + lane / 4;
  const uint32_t q_addr = smem_addr(Qs) + wg * 64 * kRowBytes;
  float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.0f, 0.0f};
  float o[8][4];
  zero<64>(o);
  for (int kt = 0; kt <= last; ++kt) {
    const int j0 = kt * kKeyTile, st = kt & 1;
    if (kt < last) {  // the stage st ^ 1 was last read in iteration kt - 1, before its closing barrier
      copy_qk<kKeyTile, THREADS>(Ks + (st ^ 1) * K_BYTES, kh + int64_t{j0 + kKeyTile} * DQ);
      copy_vt<THREADS>(Vts + (st ^ 1) * VT_BYTES, vth + j0 + kKeyTile, spad);
    }
    cp_async_commit();
    cp_async_wait<1>();
    fence_proxy_async();  // this thread's copies visible to the tensor cores' (async proxy) reads
    __syncthreads();

    {  // No skipping: a WGMMA in a branch the compiler cannot prove uniform is serialized. With 2 warpgroups, the
       // first one's last tile is masked whole: its scores are -inf, so alpha = 1 and P = 0 leave m, l, O unchanged.
      float s[8][4];
      const uint32_t k_addr = smem_addr(Ks + st * K_BYTES);
      wgmma_fence();
#pragma unroll
      for (int ks = 0; ks < 4; ++ks) wgmma_ss(s, desc128(q_addr) + 2 * ks, desc128(k_addr) + 2 * ks, ks > 0);
#pragma unroll
      for (int ks = 0; ks < 2; ++ks)
        wgmma_ss(s, desc128(q_addr + Q_PANEL) + 2 * ks, desc128(k_addr + K_PANEL) + 2 * ks, 1);
      wgmma_commit();
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
      const uint32_t v_addr = smem_addr(Vts + st * VT_BYTES);
      fence_frag(o);
      wgmma_fence();
#pragma unroll
      for (int kk = 0; kk < 4; ++kk) wgmma_rs(o, pa[kk], desc128(v_addr) + 2 * kk);
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
  constexpr size_t smem = 1024 + 2 * ROWS * kRowBytes + 2 * 2 * kKeyTile * kRowBytes + 2 * 64 * kRowBytes;
  static const bool once = [] {
    CUDA_CHECK(cudaFuncSetAttribute(attention_forward_wgmma<WG>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                    static_cast<int>(smem)));
    return true;
  }();
  (void)once;
  const auto tiles = static_cast<unsigned>((a.seq + ROWS - 1) / ROWS), h = static_cast<unsigned>(a.heads),
             b = static_cast<unsigned>(a.batch);
  const dim3 grid = a.seq_order ? dim3(tiles, h, b) : dim3(h, b, tiles);
  attention_forward_wgmma<WG><<<grid, 128 * WG, smem, stream>>>(a.q, a.k, a.vt, a.out, a.lse, a.seq, a.spad, a.heads,
                                                                a.scale_log2, a.seq_order);
  CUDA_CHECK_LAUNCH();
}

}  // namespace

void forward_wgmma(const ForwardWgmmaArgs& a, int warpgroups, cudaStream_t stream) {
  if (warpgroups == 2) launch<2>(a, stream);
  else launch<1>(a, stream);
}

}  // namespace moerl::cuda::attention_tc_detail
