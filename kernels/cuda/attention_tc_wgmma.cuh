// WGMMA building blocks of the tensor-core attention (attention_tc_wgmma.cu, attention_tc_wgmma_bwd.cu): shared
// tiles of 128-byte rows in WGMMA's 128-byte swizzle (16-byte chunk c of row r at c ^ (r % 8), 1024-byte aligned
// atoms of 8 rows, as in sm90_fp8_grouped_gemm.cu), their descriptors, wgmma.mma_async m64n64k16 / m64n96k16 BF16
// wrappers (accumulator d[n][e]: per warp of the warpgroup mma.sync's C layout of n-tile n, rows 16·warp ..), and
// cp.async tile loaders. A tile wider than 64 BF16 is stored as panels of 64 columns (ROWS x 128 bytes each, one
// after the other). The same stored tile [rows][columns] serves as a K-major operand (the reduction along its
// columns: S = Q·Kᵀ) and as an MN-major one (the reduction along its rows: O += P·V, dV += Pᵀ·dO, dK += dSᵀ·Q; the
// instruction's transpose flag), so no transposed copy of an operand is ever made. Device code only.
#pragma once
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "kernels/cuda/attention_tc_mma.cuh"

namespace moerl::cuda::attention_tc_detail {

constexpr int kKeyTile = 64;       // keys per streamed tile
constexpr int kRowBytes = 128;     // bytes per row of a swizzled panel (64 BF16)

__device__ __forceinline__ void fence_proxy_async() { asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_wait_all() { asm volatile("wgmma.wait_group.sync.aligned 0;\n" ::: "memory"); }
// Keeps the compiler from touching an accumulator register across an asynchronous WGMMA.
template <int N> __device__ __forceinline__ void fence_frag(float (&d)[N][4]) {
#pragma unroll
  for (int n = 0; n < N; ++n)
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

// Descriptor of a tile read MN-major: rows of the stored tile are the reduction (K) index, its columns the output's
// (N); panels of 64 columns `panel_bytes` apart. In the 128-byte swizzle's MN-major canonical form (CUTLASS's
// make_gmma_desc<Major::MN>: ((8,8,m),(8,k)) : ((1,8,LBO),(64,SBO)) in elements) the leading byte offset is the
// step from one 64-column panel to the next and the stride byte offset the step from 8 rows to the next 8 (1024
// bytes). K advances 16 rows = 2048 bytes (+128 in the descriptor) per instruction.
__device__ __forceinline__ uint64_t desc_mn(uint32_t addr, uint32_t panel_bytes) {
  return static_cast<uint64_t>((addr & 0x3FFFF) >> 4) | (uint64_t{(panel_bytes >> 4) & 0x3FFF} << 16) |
         (uint64_t{1024 >> 4} << 32) | (uint64_t{1} << 62);
}
constexpr int kMnStep = 16 * kRowBytes;  // bytes from one 16-row K step of an MN-major tile to the next

// The first 1024-byte aligned byte of a kernel's dynamic shared memory (swizzle atoms; the kernels ask for 1024
// bytes more than their layout).
__device__ __forceinline__ uint8_t* swizzle_base(unsigned char* smem) {
  return smem + (1024 - shared_address(smem) % 1024) % 1024;
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

// d (64 x 64) += a · b with a (64 x 16 BF16) from registers (per warp the A fragment of mma.sync m16n8k16: the C
// fragments of two n-tiles rounded to BF16) and b (16 x 64) MN-major in shared memory (desc_mn: 16 rows of a stored
// tile, its 64 columns the output's).
__device__ __forceinline__ void wgmma_rs(float (&d)[8][4], const uint32_t (&a)[4], uint64_t desc_b) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %37, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 {"
      "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "
      "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31"
      "}, {%32, %33, %34, %35}, %36, p, 1, 1, 1;\n}\n"
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

// d (64 x 96 FP32, n-tiles 0-11) += a · b with a (64 x 16 BF16) from registers and b (16 x 96) MN-major in shared
// memory (two panels: columns 0-63, then 64-95).
__device__ __forceinline__ void wgmma_rs96(float (&d)[12][4], const uint32_t (&a)[4], uint64_t desc_b) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %53, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n96k16.f32.bf16.bf16 {"
      "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "
      "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, "
      "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47"
      "}, {%48, %49, %50, %51}, %52, p, 1, 1, 1;\n}\n"
      : "+f"(d[0][0]), "+f"(d[0][1]), "+f"(d[0][2]), "+f"(d[0][3]),
        "+f"(d[1][0]), "+f"(d[1][1]), "+f"(d[1][2]), "+f"(d[1][3]),
        "+f"(d[2][0]), "+f"(d[2][1]), "+f"(d[2][2]), "+f"(d[2][3]),
        "+f"(d[3][0]), "+f"(d[3][1]), "+f"(d[3][2]), "+f"(d[3][3]),
        "+f"(d[4][0]), "+f"(d[4][1]), "+f"(d[4][2]), "+f"(d[4][3]),
        "+f"(d[5][0]), "+f"(d[5][1]), "+f"(d[5][2]), "+f"(d[5][3]),
        "+f"(d[6][0]), "+f"(d[6][1]), "+f"(d[6][2]), "+f"(d[6][3]),
        "+f"(d[7][0]), "+f"(d[7][1]), "+f"(d[7][2]), "+f"(d[7][3]),
        "+f"(d[8][0]), "+f"(d[8][1]), "+f"(d[8][2]), "+f"(d[8][3]),
        "+f"(d[9][0]), "+f"(d[9][1]), "+f"(d[9][2]), "+f"(d[9][3]),
        "+f"(d[10][0]), "+f"(d[10][1]), "+f"(d[10][2]), "+f"(d[10][3]),
        "+f"(d[11][0]), "+f"(d[11][1]), "+f"(d[11][2]), "+f"(d[11][3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b), "r"(1));
}

// Tile of ROWS packed rows of DP (64 or 96) BF16 at src (row stride DP) -> DP / 64 rounded up panels at dst, panel
// p = columns 64p .. (ROWS x 128 bytes; a 96-wide tile fills the second panel's first 64 bytes of each row).
template <int ROWS, int DP, int THREADS>
__device__ __forceinline__ void copy_rows(uint8_t* dst, const bf16* __restrict__ src) {
  constexpr int CH = DP / 8, TOTAL = ROWS * CH;
#pragma unroll
  for (int it = 0; it < (TOTAL + THREADS - 1) / THREADS; ++it) {
    const int t = static_cast<int>(threadIdx.x) + it * THREADS;
    if (TOTAL % THREADS == 0 || t < TOTAL) {
      const int r = t / CH, c = t % CH;
      cp_async16(dst + (c / 8) * ROWS * kRowBytes + swz(r, c % 8), src + r * DP + c * 8);
    }
  }
}

}  // namespace moerl::cuda::attention_tc_detail
