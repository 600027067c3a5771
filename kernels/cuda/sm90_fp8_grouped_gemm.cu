// fp8::cuda::grouped_gemm_nt_* (kernels/cuda/fp8_grouped_gemm.hpp): one launch for every expert's GEMM of a
// projection, on Hopper's warpgroup MMA. Tiles of 128 x 128 outputs; K streamed in steps of 128 bytes (one scale
// per row and step) through a 6-stage ring of shared memory, 128-byte rows with the 16-byte chunks XOR-swizzled by
// row (chunk c of row r at c ^ (r % 8)): WGMMA's and TMA's 128-byte swizzle, so each stage's 128 x 128 tiles are
// read by wgmma.mma_async m64n128k32 E4M3 straight from shared-memory descriptors. Two consumer warpgroups, 64 rows
// each; each step's four WGMMAs sum into a fresh FP32 fragment that is then promoted into the block's sums with
// sa · sb (per row, per column), as the CPU reference and DeepGEMM do per 128-group.
//
// Three pipelines (GroupedKernel), all giving the same bits:
//   Tma (default): persistent blocks (one per SM) walk the tiles; a producer warpgroup loads the rows form's code
//     tiles with TMA (cp.async.bulk.tensor, a CUtensorMap per term and operand) and the scales with cp.async, both
//     completing a `full` mbarrier per stage; the consumers free a stage through an `empty` mbarrier, so neither
//     warpgroup waits for the other and the ring runs across tiles. The tokens form (Wgrad: each group's codes have
//     their own row stride) is loaded as in Specialized.
//   Specialized: the same with cp.async for the codes too.
//   Synchronous: a block per tile, every thread copies with cp.async, one __syncthreads per step.
//
// Why not cuBLASLt. Its block-scaled FP8 GEMM has no grouped form in CUDA 13's cuBLASLt, nor a batched one: with
// VEC128 / BLK128x128 scales and a batch count of 32 or 64 (every expert padded to the same rows) its heuristic
// answers NOT_SUPPORTED for every Fprop, Dgrad and Wgrad shape of both benches, where one matrix of each finds
// algorithms (cuBLASLt 13.1 on the H200, bench/results/2026-11-30-gpu-lt-batched-h200.txt); one call per expert
// costs ~15 us of host time against a few us of device time for bench-600m's experts (2048 x 704 x 1024), so the
// layer waited on the host (issue 4).
//
// Measured on the H200, TFLOP/s tma / specialized / sync (the GPU tests' timing lines, bench/results/2026-11-30-gpu-
// tests-h200-79e3a82.txt): MoE layer bench shapes (64 experts, ~100k rows, H 2048, I 1408) gate+up 755 / 298 / 419,
// down 705 / 247 / 400, Wgrad gate+up (tokens form, cp.async in all) 273 / 273 / 225; bench-600m gate+up 550 / 195 /
// 330. Tma was 488, 425, 327 before the consumer warpgroups took turns (ping-pong below), looked the groups up in
// shared memory and arrived once per warp (612, 563, 412 after: ...-grouped-pingpong-h200-*.txt), and rose again with
// the BF16 outputs' version of the tile bookkeeping (same arithmetic; Specialized, which spills, fell). The cuBLASLt
// calls per expert (MoeFp8Gemm::Lanes) run the layer's Fprop and Dgrad at 840-1040 inside it and Wgrad at ~610.
// rel_l2 1.2e-4 vs the CPU reference (WGMMA sums FP8 products inside a 128-group with fewer bits). MoE layer fwd+bwd
// with MOERL_MOE_GEMM=grouped 18.2-18.4 ms vs 11.7-11.8 with the lanes (the Wgrad's tokens form, at less than half
// the lanes' rate, is most of the gap): Lanes stays the default.
// Where the time goes: a step (128 x 128 x 128) needs 512 tensor-core cycles but takes ~1600 on the MoE layer's
// gate+up; at that rate the TMA loads move ~5.9 TB/s from L2 (32 KB a step), about what L2 gives. Tried and removed
// (2026-11-30), twice: Tma as clusters of 2 blocks on neighbouring N tiles of one row tile, each loading its b tile
// and multicasting a 64-row half of the shared a tile into both (24 KB from L2 a step). Bit-identical, but no faster
// before ping-pong (256 remote `empty` arrivals a step), and slower after it, 447 against 712 TFLOP/s with one remote
// arrival a warp: the pair runs in lockstep (bench/results/2026-11-30-gpu-grouped-pair-h200-*.txt).
// Nor did the down projection's Fprop and Dgrad alone on this kernel, the rest on the lanes: MoE layer 12.2 vs 11.8 ms
// (the lanes' down GEMMs run at ~840 TFLOP/s inside the layer; bench/results/2026-11-30-gpu-moe-gemm-mixed-*.txt),
// nor the whole forward on it: 12.6 vs 11.9 ms, train step 248k vs 254k tokens/s (...-grouped-forward-*.txt).
// The tokens form's consumers read only tile_out (its operands computed apart had spilled 216 bytes): 297-307 TFLOP/s
// against 273 before. Tried and removed (2026-11-30): its code tiles loaded with TMA through two tensor maps per group
// and problem, made on the host from its copy of the offsets and read from device memory (fence.proxy.tensormap
// acquire). Bit-identical but not faster, 255 vs 306 TFLOP/s on bench-600m's Wgrad and 286 vs 298 on the MoE layer's:
// the tokens form is not bound by its loads. The Wgrad on it beside the lanes' Fprop and Dgrad lost too: MoE layer
// 14.43 vs 11.04 ms, bench-600m fp8 279.7k / 278.3k vs 285.2k / 282.1k tokens/s (rounds interleaved,
// bench/results/2026-11-30-gpu-wgrad-tma-tokens-h200-698eb0c+tma.txt).
// Again at 59814e2 (2026-11-30): the forward's g | u (N = 2 Ip, BF16 out) and down on this kernel, or down alone, the
// backward on the lanes: train step 296.6k / 296.5k / 295.0k (both) and 302.3k / 298.4k / 299.0k (down) vs 299.9k /
// 297.3k / 303.4k tokens/s; bench-600m's down ran 226-232 us a layer here (~415 TFLOP/s), the lanes' busy time
// (...-moe-fwd-grouped-h200-59814e2+fwd.txt).
// TODO(perf): 128 x 256 tiles (fewer bytes per FLOP without a partner block).
#include <cuda.h>
#include <cudaTypedefs.h>
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <string>

#include "kernels/cuda/cp_async.cuh"
#include "kernels/cuda/cuda_check.hpp"
#include "kernels/cuda/fp8_grouped_gemm.hpp"
#include "runtime/error.hpp"

namespace moerl::fp8::cuda {
namespace {

constexpr int kTileRows = 128;  // BM = BN
constexpr int kStepBytes = 128; // BK: one 1x128 / 128x128 scale per row and step
constexpr int kStages = 6;
constexpr int kSmemGroups = 512;  // groups whose bounds a block keeps in shared memory (more: read from global)
constexpr int kConsumers = 256;  // two warpgroups, rows 0-63 and 64-127 of the tile, all 128 columns each
constexpr int kProducers = 128;  // Tma / Specialized: one producer warpgroup (a block of 384 threads: 168 registers)
constexpr int kTileBytes = kTileRows * kStepBytes;
constexpr int kStageBytes = 2 * kTileBytes + 2 * kTileRows * static_cast<int>(sizeof(float));  // a, b, their scales
constexpr int kSmemBytes = kStages * kStageBytes + 1024;  // + alignment of the first stage to 1024 bytes
static_assert(kStepBytes == 128, "one scale per 128 of K and row: the promotion reads one scale per step; a step "
                                 "is one 128-byte swizzle row");
static_assert(kStageBytes % 1024 == 0, "each stage's tiles start on a 1024-byte swizzle atom");

int64_t tiles128(int64_t n) { return (n + 127) / 128; }
__host__ __device__ inline int64_t round_up4(int64_t n) { return (n + 3) / 4 * 4; }
__device__ __forceinline__ int clamp_tile(int64_t n) { return static_cast<int>(n < kTileRows ? n : kTileRows); }

struct Term {
  const uint8_t* a;
  const float* sa;
  const uint8_t* b;
  const float* sb;
  int64_t k;
};

struct Args {
  Term terms[2][2];  // [problem][term]
  void* y[2];    // FP32, or BF16 where bf16[problem]
  bool bf16[2];
  int n_terms[2];
  const int64_t* bounds;
  int64_t groups;
  int64_t m, n;          // tokens form: rows of a and b; rows form: n only
  int64_t scale_tiles;   // tokens form: tiles(rows), columns of the scales' CPU layout
  int m_tiles;           // tokens form: tiles(m)
  int tiles_x, tiles_y, tiles_z;  // the tile grid (synchronous: the launch grid; specialized: walked by each block)
  bool overwrite;        // tokens form: y_g written instead of added to
  // Tma, rows form: [problem][term][a, b] 2-D maps (K inner) of a [max_rows, K] and the stacked b [groups · N, K],
  // boxes of 128 x 128 bytes in the 128-byte swizzle.
  CUtensorMap maps[2][2][2];
};

// A tile operand seen by one block: row r, step s at codes + r · ld + s · 128 (valid while r < rows and the byte
// is below klen); its scale at scales[r · s_row + s].
struct TileOperand {
  const uint8_t* codes;
  int64_t ld;
  int rows;
  const float* scales;
  int64_t s_row;
};

using moerl::cuda::cp_async_commit;
using moerl::cuda::cp_async_wait;
using moerl::cuda::shared_address;

// 16 or 4 bytes where ok, else zeros (moerl::cuda's zero-filling copies).
__device__ __forceinline__ void cp_async16(void* dst, const void* src, bool ok) {
  moerl::cuda::cp_async16_zfill(dst, src, ok ? 16 : 0);
}
__device__ __forceinline__ void cp_async4(void* dst, const void* src, bool ok) {
  moerl::cuda::cp_async4_zfill(dst, src, ok ? 4 : 0);
}

// The executing thread's earlier cp.async copies arrive on the mbarrier when they land (no pending-count increment:
// the barrier's count includes one arrival per producer thread).
__device__ __forceinline__ void cp_async_arrive(uint64_t* bar) {
  asm volatile("cp.async.mbarrier.arrive.noinc.shared::cta.b64 [%0];\n" ::"r"(shared_address(bar)) : "memory");
}

__device__ __forceinline__ void mbar_init(uint64_t* bar, int count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(shared_address(bar)), "r"(count) : "memory");
}

__device__ __forceinline__ void mbar_arrive(uint64_t* bar) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(shared_address(bar)) : "memory");
}

__device__ __forceinline__ void mbar_wait(uint64_t* bar, uint32_t parity) {
  uint32_t done = 0;
  while (!done) {
    asm volatile(
        "{\n.reg .pred p;\nmbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\nselp.u32 %0, 1, 0, p;\n}\n"
        : "=r"(done)
        : "r"(shared_address(bar)), "r"(parity)
        : "memory");
  }
}

// Arrives on the mbarrier and adds `bytes` to the transaction count its phase waits for (the TMA copies').
__device__ __forceinline__ void mbar_arrive_expect_tx(uint64_t* bar, uint32_t bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(shared_address(bar)), "r"(bytes)
               : "memory");
}

// TMA: the box at (x inner, y outer) of a 2-D tensor map into shared memory, completing `bytes` on the mbarrier.
__device__ __forceinline__ void tma_load_2d(void* dst, const CUtensorMap* map, int x, int y, uint64_t* bar) {
  asm volatile(
      "cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3}], [%4];\n" ::
          "r"(shared_address(dst)), "l"(reinterpret_cast<uint64_t>(map)), "r"(x), "r"(y), "r"(shared_address(bar))
      : "memory");
}

// Shared memory written through the generic proxy (cp.async) made visible to the async proxy (wgmma's operand reads).
__device__ __forceinline__ void fence_proxy_async() { asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory"); }

__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_wait_all() { asm volatile("wgmma.wait_group.sync.aligned 0;\n" ::: "memory"); }

// Keeps the compiler from touching an accumulator register across an asynchronous WGMMA.
__device__ __forceinline__ void fence_operand(float& r) { asm volatile("" : "+f"(r)::"memory"); }

// Shared-memory matrix descriptor of a K-major tile of 128-byte rows in the 128-byte swizzle: start address >> 4
// (bits 0-13), leading byte offset 16 >> 4 (unused by swizzled K-major layouts), stride byte offset 1024 >> 4 (eight
// rows, one swizzle atom; bits 32-45), swizzle mode 1 = 128 bytes (bits 62-63). Advancing K by 32 bytes inside the
// row adds 2 to the address field (the swizzle is applied to absolute addresses: stages are 1024-byte aligned).
__device__ __forceinline__ uint64_t smem_desc(uint32_t addr) {
  return static_cast<uint64_t>((addr & 0x3FFFF) >> 4) | (uint64_t{1} << 16) | (uint64_t{1024 >> 4} << 32) |
         (uint64_t{1} << 62);
}

// d (64 x 128 FP32, the warpgroup's fragment) = (scale_d ? d : 0) + a (64 x 32 E4M3) · bᵀ (b: 128 x 32 E4M3),
// a and b K-major in shared memory (descriptors).
__device__ __forceinline__ void wgmma_m64n128k32(float (&d)[64], uint64_t desc_a, uint64_t desc_b, int scale_d) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n128k32.f32.e4m3.e4m3 {"
      "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "
      "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, "
      "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, "
      "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63"
      "}, %64, %65, p, 1, 1;\n}\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),
        "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]),
        "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]),
        "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]),
        "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]),
        "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]),
        "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]),
        "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])
      : "l"(desc_a), "l"(desc_b), "r"(scale_d));
}

// Byte offset of 16-byte chunk c of row r in a 128-byte-row tile (WGMMA's 128-byte swizzle).
__device__ __forceinline__ int swz(int r, int c) { return r * kStepBytes + ((c ^ (r & 7)) << 4); }

// One output tile: its terms' operands, their K lengths and steps, and where the 128 x 128 sums go.
struct TileWork {
  TileOperand a[2], b[2];
  int64_t klen[2];
  int steps[2];
  void* y;  // y[r · ldy + c] for r < m_valid, c < n_valid: FP32, or BF16 where bf16
  int64_t ldy;
  bool bf16;
  int m_valid, n_valid;
  int problem;
  int a_row, b_row;  // rows form: the tile's first row of a and of the stacked b (TMA coordinates)
};

// The groups' bounds in shared memory `s` (copied by threads tid of `threads`; the caller syncs before reading),
// or in global memory past kSmemGroups groups. Each tile's group lookup (a binary search) then waits on shared
// memory instead of ~6 dependent L2 round trips (~0.5 us each under load) at every tile boundary.
__device__ __forceinline__ const int64_t* block_bounds(const Args& p, int64_t* s, int tid, int threads) {
  if (p.groups > kSmemGroups) return p.bounds;
  for (int i = tid; i <= p.groups; i += threads) s[i] = p.bounds[i];
  return s;
}

// What the consumers need of a tokens-form tile (its steps and outputs; false for an empty group), without the
// operands: computed apart, those stayed live in the consumers' registers (216 bytes spilled at 168 registers).
template <bool kTokens>
__device__ __forceinline__ bool tile_out(const Args& p, const int64_t* bounds, int x, int yy, int z, TileWork& w);

// The work of tile (x, y, z) (x: N tile; rows form: y row tile, z problem; tokens form: y problem · m_tiles + M
// tile, z group) with the groups' bounds at `bounds` (block_bounds). False for tiles with nothing to do (rows form:
// at or past bounds[groups]; tokens form: an empty group), the same answer for every thread.
template <bool kTokens>
__device__ __forceinline__ bool tile_work(const Args& p, const int64_t* bounds, int x, int yy, int z, TileWork& w) {
  const int64_t n0 = static_cast<int64_t>(x) * kTileRows;
  if constexpr (!kTokens) {
    const int problem = z;
    const int64_t row0 = static_cast<int64_t>(yy) * kTileRows;
    if (row0 >= bounds[p.groups]) return false;
    int lo = 0, hi = static_cast<int>(p.groups) - 1;  // the last group starting at or before row0
    while (lo < hi) {
      const int mid = (lo + hi + 1) / 2;
      if (bounds[mid] <= row0) lo = mid; else hi = mid - 1;
    }
    const int64_t g = lo, n = p.n;
    w.n_valid = clamp_tile(n - n0);
    w.m_valid = kTileRows;
#pragma unroll
    for (int t = 0; t < 2; ++t) {
      const Term& tm = p.terms[problem][t];
      const int64_t k = tm.k, tk = (k + 127) / 128, l4 = round_up4(tk);
      w.a[t] = TileOperand{tm.a + row0 * k, k, kTileRows, tm.sa + row0 * tk, tk};
      w.b[t] = TileOperand{tm.b + g * n * k + n0 * k, k, w.n_valid,
                           tm.sb + g * ((n + 127) / 128) * l4 + (n0 / 128) * l4, 0};
      w.klen[t] = k;
      w.steps[t] = t < p.n_terms[problem] ? static_cast<int>(tk) : 0;
    }
    w.bf16 = p.bf16[problem];
    w.y = static_cast<char*>(p.y[problem]) + (row0 * n + n0) * (w.bf16 ? 2 : 4);
    w.ldy = n;
    w.problem = problem;
    w.a_row = static_cast<int>(row0);
    w.b_row = static_cast<int>(g * n + n0);
  } else {
    if (!tile_out<true>(p, bounds, x, yy, z, w)) return false;
    const int64_t g = z, first = bounds[g], ng = bounds[g + 1] - first;
    const int64_t m0 = static_cast<int64_t>(yy % p.m_tiles) * kTileRows, m = p.m, n = p.n;
#pragma unroll
    for (int t = 0; t < 2; ++t) {
      const Term& tm = p.terms[yy / p.m_tiles][t];
      w.a[t] = TileOperand{tm.a + first * m + m0 * ng, ng, w.m_valid, tm.sa + m0 * p.scale_tiles + first / 128,
                           p.scale_tiles};
      w.b[t] = TileOperand{tm.b + first * n + n0 * ng, ng, w.n_valid, tm.sb + n0 * p.scale_tiles + first / 128,
                           p.scale_tiles};
      w.klen[t] = ng;
    }
  }
  return true;
}

template <bool kTokens>
__device__ __forceinline__ bool tile_out(const Args& p, const int64_t* bounds, int x, int yy, int z, TileWork& w) {
  if constexpr (!kTokens) {
    return tile_work<false>(p, bounds, x, yy, z, w);
  } else {
    const int64_t g = z, ng = bounds[g + 1] - bounds[g];
    if (ng <= 0) return false;
    const int problem = yy / p.m_tiles;
    const int64_t m0 = static_cast<int64_t>(yy % p.m_tiles) * kTileRows, n0 = static_cast<int64_t>(x) * kTileRows;
    w.m_valid = clamp_tile(p.m - m0);
    w.n_valid = clamp_tile(p.n - n0);
    w.steps[0] = static_cast<int>(ng / 128);  // one term
    w.steps[1] = 0;
    w.y = static_cast<float*>(p.y[problem]) + g * p.m * p.n + m0 * p.n + n0;
    w.ldy = p.n;
    w.bf16 = false;
    return true;
  }
}

// Step kb of a term (operands a, b of K length klen) into stage memory `base`, by loader thread lt of kLoaders: codes
// of a and b (zero past the operand's rows or K) and the step's 128 + 128 scales.
template <int kLoaders>
__device__ __forceinline__ void load_scales(uint8_t* base, int lt, const TileOperand& a, const TileOperand& b,
                                            int kb);

template <int kLoaders>
__device__ __forceinline__ void load_step(uint8_t* base, int lt, const TileOperand& a, const TileOperand& b,
                                          int64_t klen, int kb) {
  const int64_t k0 = static_cast<int64_t>(kb) * kStepBytes;
#pragma unroll
  for (int i = 0; i < kTileRows * kStepBytes / 16 / kLoaders; ++i) {
    const int idx = lt + i * kLoaders, r = idx / 8, c = idx % 8;
    const bool kin = k0 + c * 16 < klen;
    const bool oka = kin && r < a.rows, okb = kin && r < b.rows;
    cp_async16(base + swz(r, c), oka ? a.codes + r * a.ld + k0 + c * 16 : a.codes, oka);
    cp_async16(base + kTileBytes + swz(r, c), okb ? b.codes + r * b.ld + k0 + c * 16 : b.codes, okb);
  }
  load_scales<kLoaders>(base, lt, a, b, kb);
}

// The step's 128 + 128 scales (zero past the operands' rows).
template <int kLoaders>
__device__ __forceinline__ void load_scales(uint8_t* base, int lt, const TileOperand& a, const TileOperand& b,
                                            int kb) {
  float* scales = reinterpret_cast<float*>(base + 2 * kTileBytes);
#pragma unroll
  for (int i = lt; i < 2 * kTileRows; i += kLoaders) {
    if (i < kTileRows) {
      const bool ok = i < a.rows;
      cp_async4(scales + i, ok ? a.scales + i * a.s_row + kb : a.scales, ok);
    } else {
      const int r = i - kTileRows;
      const bool ok = r < b.rows;
      cp_async4(scales + i, ok ? b.scales + r * b.s_row + kb : b.scales, ok);
    }
  }
}

// Step s of the tile (the first term's steps, then the second's).
template <int kLoaders>
__device__ __forceinline__ void load_step_of(uint8_t* base, int lt, int s, const TileWork& w) {
  const int t = s < w.steps[0] ? 0 : 1;
  load_step<kLoaders>(base, lt, w.a[t], w.b[t], w.klen[t], t == 0 ? s : s - w.steps[0]);
}

// One step on the tensor cores for warpgroup wg: part = a[wg's 64 rows] · bᵀ over the step's 128 bytes of K.
__device__ __forceinline__ void mma_step(float (&part)[64], uint32_t stage_addr, int wg) {
  const uint64_t da = smem_desc(stage_addr + wg * 64 * kStepBytes), db = smem_desc(stage_addr + kTileBytes);
#pragma unroll
  for (int i = 0; i < 64; ++i) fence_operand(part[i]);
  wgmma_fence();
#pragma unroll
  for (int ks = 0; ks < kStepBytes / 32; ++ks) wgmma_m64n128k32(part, da + 2 * ks, db + 2 * ks, ks > 0);
  wgmma_commit();
}

// acc += (sa · sb) · part, the fragment's rows r0 and r0 + 8, columns c · 8 + 2 · (lane % 4) + {0, 1}. The rows
// form's b is a weight with one 128x128 block scale per step (all 128 column scales are that one): its products
// sa · sb are then the row's two, the same values with 2 multiplies and 2 shared loads instead of 64 and 18.
template <bool kTokens>
__device__ __forceinline__ void promote(float (&acc)[64], float (&part)[64], const float* ss, int r0, int lane) {
#pragma unroll
  for (int i = 0; i < 64; ++i) fence_operand(part[i]);
  const float sa0 = ss[r0], sa1 = ss[r0 + 8];
  if constexpr (!kTokens) {
    const float sb = ss[kTileRows], s0 = sa0 * sb, s1 = sa1 * sb;
#pragma unroll
    for (int c = 0; c < 16; ++c) {
      acc[4 * c + 0] = fmaf(s0, part[4 * c + 0], acc[4 * c + 0]);
      acc[4 * c + 1] = fmaf(s0, part[4 * c + 1], acc[4 * c + 1]);
      acc[4 * c + 2] = fmaf(s1, part[4 * c + 2], acc[4 * c + 2]);
      acc[4 * c + 3] = fmaf(s1, part[4 * c + 3], acc[4 * c + 3]);
    }
  } else {
#pragma unroll
    for (int c = 0; c < 16; ++c) {
      const float2 sb = *reinterpret_cast<const float2*>(ss + kTileRows + c * 8 + 2 * (lane % 4));
      acc[4 * c + 0] = fmaf(sa0 * sb.x, part[4 * c + 0], acc[4 * c + 0]);
      acc[4 * c + 1] = fmaf(sa0 * sb.y, part[4 * c + 1], acc[4 * c + 1]);
      acc[4 * c + 2] = fmaf(sa1 * sb.x, part[4 * c + 2], acc[4 * c + 2]);
      acc[4 * c + 3] = fmaf(sa1 * sb.y, part[4 * c + 3], acc[4 * c + 3]);
    }
  }
}

// Named barriers 1 and 2 (0 is __syncthreads) between the two consumer warpgroups (256 threads): one warpgroup waits
// (sync) until the other has arrived.
__device__ __forceinline__ void named_sync(int id) { asm volatile("bar.sync %0, %1;\n" ::"r"(id), "n"(kConsumers)); }
__device__ __forceinline__ void named_arrive(int id) {
  asm volatile("bar.arrive %0, %1;\n" ::"r"(id), "n"(kConsumers));
}

// The fragment's sums into the tile's outputs (tokens form: added to them).
template <bool kTokens>
__device__ __forceinline__ void store_tile(const float (&acc)[64], void* y, int64_t ldy, bool bf16, bool overwrite,
                                           int m_valid, int n_valid, int r0, int lane) {
#pragma unroll
  for (int c = 0; c < 16; ++c) {
    const int col = c * 8 + 2 * (lane % 4);
    if (col >= n_valid) continue;
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int r = r0 + h * 8;
      if (r >= m_valid) continue;
      if (!kTokens && bf16) {  // rounded to nearest even, as cuBLASLt's BF16 outputs
        *reinterpret_cast<__nv_bfloat162*>(static_cast<uint16_t*>(y) + r * ldy + col) =
            __floats2bfloat162_rn(acc[4 * c + 2 * h], acc[4 * c + 2 * h + 1]);
        continue;
      }
      float2* out = reinterpret_cast<float2*>(static_cast<float*>(y) + r * ldy + col);
      float2 v = make_float2(acc[4 * c + 2 * h], acc[4 * c + 2 * h + 1]);
      if (kTokens && !overwrite) {
        const float2 old = *out;
        v.x += old.x;
        v.y += old.y;
      }
      *out = v;
    }
  }
}

// Stages start on a 1024-byte boundary (the swizzle pattern repeats every 8 rows of 128 bytes).
__device__ __forceinline__ uint8_t* aligned_stages(uint8_t* raw) {
  const uint32_t a = shared_address(raw);
  return raw + (((a + 1023) & ~1023u) - a);
}

// Synchronous pipeline: one block per tile (grid = tiles), every thread copies, a block barrier per step.
template <bool kTokens>
__global__ void __launch_bounds__(kConsumers, 1) grouped_gemm_sync_kernel(const __grid_constant__ Args p) {
  extern __shared__ uint8_t smem_raw[];
  uint8_t* smem = aligned_stages(smem_raw);
  const uint32_t smem_addr = shared_address(smem);
  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  // The tile's operands in shared memory (every thread computes them, thread 0 stores them): kept out of the
  // registers, which the sums need.
  __shared__ TileWork tw;
  __shared__ int64_t bounds_smem[kSmemGroups + 1];
  const int64_t* bounds = block_bounds(p, bounds_smem, tid, kConsumers);
  __syncthreads();
  {
    TileWork w;
    if (!tile_work<kTokens>(p, bounds, blockIdx.x, blockIdx.y, blockIdx.z, w)) return;
    if (tid == 0) tw = w;
  }
  __syncthreads();
  const int total_steps = tw.steps[0] + tw.steps[1];
  const int wg = warp / 4;
  const int r0 = wg * 64 + (warp % 4) * 16 + lane / 4;  // the fragment's first row in the tile
  float acc[64], part[64];
#pragma unroll
  for (int i = 0; i < 64; ++i) acc[i] = 0.0f, part[i] = 0.0f;
#pragma unroll
  for (int s = 0; s < kStages - 1; ++s) {
    if (s < total_steps) load_step_of<kConsumers>(smem + s * kStageBytes, tid, s, tw);
    cp_async_commit();
  }
  for (int s = 0; s < total_steps; ++s) {
    const int stage = s % kStages;
    cp_async_wait<kStages - 2>();
    fence_proxy_async();
    __syncthreads();  // step s landed for every thread; step s - 1's stage is free (read by both warpgroups)
    mma_step(part, smem_addr + stage * kStageBytes, wg);
    const int nx = s + kStages - 1;  // copies of a later step overlap this step's WGMMAs
    if (nx < total_steps) load_step_of<kConsumers>(smem + (nx % kStages) * kStageBytes, tid, nx, tw);
    cp_async_commit();
    wgmma_wait_all();
    promote<kTokens>(acc, part, reinterpret_cast<const float*>(smem + stage * kStageBytes + 2 * kTileBytes), r0, lane);
  }
  cp_async_wait<0>();
  store_tile<kTokens>(acc, tw.y, tw.ldy, tw.bf16, p.overwrite, tw.m_valid, tw.n_valid, r0, lane);
}

// Specialized pipeline, persistent: gridDim.x blocks walk the tiles t = blockIdx.x, + gridDim.x, ... (x fastest,
// then y, then z: the order of the synchronous grid). A producer warpgroup copies every step of the block's tiles into
// the ring of stages (full[stage] completes when the producers' copies of the step have landed: the 128 threads' in
// Specialized; in Tma one warp issues the TMA copies and the scales' cp.async, the other three exit); the two consumer
// warpgroups wait on it, multiply, promote, and free the stage (empty[stage], one arrival per warp). The ring runs
// across tiles, so the next tile's first steps load while the current one's last steps and stores run.
template <bool kTokens, bool kTma>
__global__ void __launch_bounds__(kConsumers + kProducers, 1)
    grouped_gemm_specialized_kernel(const __grid_constant__ Args p) {
  static_assert(!(kTokens && kTma), "TMA loads: rows form only");
  extern __shared__ uint8_t smem_raw[];
  uint8_t* smem = aligned_stages(smem_raw);
  const uint32_t smem_addr = shared_address(smem);
  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  constexpr int kLoaders = kTma ? 32 : kProducers;  // producer threads that copy
  __shared__ __align__(8) uint64_t full[kStages], empty[kStages];
  __shared__ int64_t bounds_smem[kSmemGroups + 1];
  if (tid == 0) {
    for (int s = 0; s < kStages; ++s) {
      mbar_init(&full[s], kTma ? kLoaders + 1 : kLoaders);  // Tma: + the expect_tx arrival
      mbar_init(&empty[s], kConsumers / 32);
    }
  }
  const int64_t* bounds = block_bounds(p, bounds_smem, tid, kConsumers + kProducers);
  __syncthreads();
  const int tiles = p.tiles_x * p.tiles_y * p.tiles_z;  // < 2^31 (checked on the host)

  if (tid >= kConsumers) {  // producer warpgroup
    const int lt = tid - kConsumers;
    if (lt >= kLoaders) return;
    int it = 0;  // steps issued by this block so far: stage it % kStages, round it / kStages
    for (int t = blockIdx.x; t < tiles; t += gridDim.x) {
      TileWork w;
      if (!tile_work<kTokens>(p, bounds, t % p.tiles_x, t / p.tiles_x % p.tiles_y, t / p.tiles_x / p.tiles_y, w))
        continue;
#pragma unroll 1
      for (int term = 0; term < 2; ++term) {
        const TileOperand a = term == 0 ? w.a[0] : w.a[1], b = term == 0 ? w.b[0] : w.b[1];
        const int64_t klen = term == 0 ? w.klen[0] : w.klen[1];
        const int steps = term == 0 ? w.steps[0] : w.steps[1];
        for (int kb = 0; kb < steps; ++kb, ++it) {
          const int stage = it % kStages;
          if (it >= kStages) mbar_wait(&empty[stage], static_cast<uint32_t>((it / kStages - 1) & 1));
          uint8_t* base = smem + stage * kStageBytes;
          if constexpr (kTma) {
            if (lt == 0) {
              mbar_arrive_expect_tx(&full[stage], 2 * kTileBytes);
              tma_load_2d(base, &p.maps[w.problem][term][0], kb * kStepBytes, w.a_row, &full[stage]);
              tma_load_2d(base + kTileBytes, &p.maps[w.problem][term][1], kb * kStepBytes, w.b_row, &full[stage]);
            }
            load_scales<kLoaders>(base, lt, a, b, kb);
          } else {
            load_step<kLoaders>(base, lt, a, b, klen, kb);
          }
          cp_async_arrive(&full[stage]);
        }
      }
    }
    cp_async_wait<0>();
    return;
  }

  const int wg = warp / 4;
  const int r0 = wg * 64 + (warp % 4) * 16 + lane / 4;  // the fragment's first row in the tile
  float acc[64], part[64];
#pragma unroll
  for (int i = 0; i < 64; ++i) part[i] = 0.0f;
  // Ping-pong: the warpgroups issue their WGMMAs in turn (barrier 1 + wg: my turn; the other's after mine), so one
  // promotes while the other's products run instead of both promoting at once with the tensor cores idle. The first
  // turn is warpgroup 0's.
  if (wg == 1) named_arrive(1);
  int it = 0;
  for (int t = blockIdx.x; t < tiles; t += gridDim.x) {
    TileWork w;
    if (!tile_out<kTokens>(p, bounds, t % p.tiles_x, t / p.tiles_x % p.tiles_y, t / p.tiles_x / p.tiles_y, w))
      continue;
#pragma unroll
    for (int i = 0; i < 64; ++i) acc[i] = 0.0f;
    const int total_steps = w.steps[0] + w.steps[1];
    for (int s = 0; s < total_steps; ++s, ++it) {
      const int stage = it % kStages;
      mbar_wait(&full[stage], static_cast<uint32_t>((it / kStages) & 1));
      __syncwarp();  // converged for the warpgroup-wide (.aligned) WGMMA instructions
      if constexpr (!kTma) fence_proxy_async();  // cp.async codes (generic proxy) read by WGMMA; TMA's need none
      named_sync(1 + wg);
      mma_step(part, smem_addr + stage * kStageBytes, wg);
      named_arrive(2 - wg);
      wgmma_wait_all();
      promote<kTokens>(acc, part, reinterpret_cast<const float*>(smem + stage * kStageBytes + 2 * kTileBytes), r0,
                       lane);
      __syncwarp();  // every lane's reads of the stage (WGMMA, scales) done
      if (lane == 0) mbar_arrive(&empty[stage]);
    }
    store_tile<kTokens>(acc, w.y, w.ldy, w.bf16, p.overwrite, w.m_valid, w.n_valid, r0, lane);
  }
  if (wg == 0) named_sync(1);  // warpgroup 1's last arrival (its turn handed back after its last step)
}

bool aligned(const void* p, uintptr_t n) { return reinterpret_cast<uintptr_t>(p) % n == 0; }

void check(const char* fn, const GroupedProblem* problems, int n_problems, const int64_t* bounds, int64_t groups,
           bool rows_form) {
  const std::string who = std::string("fp8::cuda::") + fn;
  require(problems != nullptr && (n_problems == 1 || n_problems == 2), [&] { return who + ": needs 1 or 2 problems"; });
  require(bounds != nullptr && groups > 0 && groups <= 65535,
          [&] { return who + ": needs bounds and 1 .. 65535 groups, got " + std::to_string(groups); });
  for (int i = 0; i < n_problems; ++i) {
    const GroupedProblem& pr = problems[i];
    require(pr.n_terms == 1 || (pr.n_terms == 2 && rows_form),
            [&] { return who + ": a problem has 1 term (2 in the rows form)"; });
    require((pr.y != nullptr) != (pr.y_bf16 != nullptr) && (rows_form || pr.y_bf16 == nullptr),
            [&] { return who + ": a problem needs one output, y or (rows form only) y_bf16"; });
    require(pr.y != nullptr ? aligned(pr.y, 8) : aligned(pr.y_bf16, 4), [&] {
      return who + ": y must be an 8-byte aligned device pointer, y_bf16 a 4-byte aligned one";
    });
    for (int t = 0; t < pr.n_terms; ++t) {
      const GroupedTerm& tm = pr.terms[t];
      require(tm.a && tm.b && tm.a_scales && tm.b_scales && aligned(tm.a, 16) && aligned(tm.b, 16) &&
                  aligned(tm.a_scales, 4) && aligned(tm.b_scales, 4),
              [&] { return who + ": codes must be 16-byte aligned and scales 4-byte aligned device pointers"; });
      if (rows_form)
        require(tm.k > 0 && tm.k % 16 == 0,
                [&] { return who + ": K must be a positive multiple of 16, got " + std::to_string(tm.k); });
    }
  }
}

Args make_args(const GroupedProblem* problems, int n_problems, const int64_t* bounds, int64_t groups) {
  Args a{};
  for (int i = 0; i < 2; ++i) {
    const GroupedProblem& pr = problems[std::min(i, n_problems - 1)];
    for (int t = 0; t < 2; ++t) {
      const GroupedTerm& tm = pr.terms[std::min(t, pr.n_terms - 1)];
      a.terms[i][t] = Term{tm.a, tm.a_scales, tm.b, tm.b_scales, tm.k};
    }
    a.y[i] = pr.y != nullptr ? static_cast<void*>(pr.y) : static_cast<void*>(pr.y_bf16);
    a.bf16[i] = pr.y == nullptr;
    a.n_terms[i] = pr.n_terms;
  }
  a.bounds = bounds;
  a.groups = groups;
  return a;
}

int sm_count() {
  int device = 0, sms = 0;
  CUDA_CHECK(cudaGetDevice(&device));
  CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  return sms;
}

GroupedKernel resolve(GroupedKernel k) {
  if (k != GroupedKernel::Default) return k;
  static const GroupedKernel from_env = [] {
    const char* v = std::getenv("MOERL_GROUPED_WGMMA");
    if (v == nullptr || *v == '\0' || std::string(v) == "tma") return GroupedKernel::Tma;
    if (std::string(v) == "specialized") return GroupedKernel::Specialized;
    if (std::string(v) == "sync") return GroupedKernel::Synchronous;
    throw Error(std::string("MOERL_GROUPED_WGMMA must be tma, specialized or sync, got ") + v);
  }();
  return from_env;
}

// cuTensorMapEncodeTiled from the driver, through the runtime (no link against libcuda).
PFN_cuTensorMapEncodeTiled_v12000 encode_tiled() {
  static const PFN_cuTensorMapEncodeTiled_v12000 fn = [] {
    void* f = nullptr;
    cudaDriverEntryPointQueryResult q{};
    CUDA_CHECK(cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &f, 12000, cudaEnableDefault, &q));
    require(q == cudaDriverEntryPointSuccess && f != nullptr, "fp8::cuda::grouped_gemm: no cuTensorMapEncodeTiled");
    return reinterpret_cast<PFN_cuTensorMapEncodeTiled_v12000>(f);
  }();
  return fn;
}

// A [rows, k] byte matrix (row stride k) as a 2-D tensor map with 128 x 128-byte boxes in the 128-byte swizzle
// (the layout swz() gives the cp.async copies); reads past the matrix are zeros.
CUtensorMap codes_map(const uint8_t* codes, int64_t rows, int64_t k) {
  CUtensorMap m;
  const cuuint64_t dims[2] = {static_cast<cuuint64_t>(k), static_cast<cuuint64_t>(rows)};
  const cuuint64_t strides[1] = {static_cast<cuuint64_t>(k)};
  const cuuint32_t box[2] = {kStepBytes, kTileRows};
  const cuuint32_t elem[2] = {1, 1};
  const CUresult r = encode_tiled()(&m, CU_TENSOR_MAP_DATA_TYPE_UINT8, 2, const_cast<uint8_t*>(codes), dims, strides,
                                    box, elem, CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B,
                                    CU_TENSOR_MAP_L2_PROMOTION_L2_256B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  require(r == CUDA_SUCCESS,
          [&] { return "fp8::cuda::grouped_gemm: cuTensorMapEncodeTiled failed (" + std::to_string(r) + ")"; });
  return m;
}

// One block per tile (synchronous) or one persistent block per SM at most (specialized).
template <bool kTokens> void launch(Args a, dim3 grid, GroupedKernel kernel, cudaStream_t stream) {
  a.tiles_x = static_cast<int>(grid.x), a.tiles_y = static_cast<int>(grid.y), a.tiles_z = static_cast<int>(grid.z);
  const GroupedKernel k = resolve(kernel);
  if (k == GroupedKernel::Specialized || k == GroupedKernel::Tma) {
    const int64_t tiles = static_cast<int64_t>(grid.x) * grid.y * grid.z;
    require(tiles < (int64_t{1} << 31), "fp8::cuda::grouped_gemm: more than 2^31 tiles");
    const unsigned blocks = static_cast<unsigned>(std::min<int64_t>(tiles, sm_count()));
    if (!kTokens && k == GroupedKernel::Tma) {
      CUDA_CHECK(cudaFuncSetAttribute(grouped_gemm_specialized_kernel<false, true>,
                                      cudaFuncAttributeMaxDynamicSharedMemorySize, kSmemBytes));
      grouped_gemm_specialized_kernel<false, true><<<blocks, kConsumers + kProducers, kSmemBytes, stream>>>(a);
    } else {
      CUDA_CHECK(cudaFuncSetAttribute(grouped_gemm_specialized_kernel<kTokens, false>,
                                      cudaFuncAttributeMaxDynamicSharedMemorySize, kSmemBytes));
      grouped_gemm_specialized_kernel<kTokens, false><<<blocks, kConsumers + kProducers, kSmemBytes, stream>>>(a);
    }
  } else {
    CUDA_CHECK(cudaFuncSetAttribute(grouped_gemm_sync_kernel<kTokens>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                    kSmemBytes));
    grouped_gemm_sync_kernel<kTokens><<<grid, kConsumers, kSmemBytes, stream>>>(a);
  }
  CUDA_CHECK_LAUNCH();
}

}  // namespace

void grouped_gemm_nt_rows(const GroupedProblem* problems, int n_problems, const int64_t* bounds, int64_t groups,
                          int64_t max_rows, int64_t n, cudaStream_t stream, GroupedKernel kernel) {
  check("grouped_gemm_nt_rows", problems, n_problems, bounds, groups, true);
  require(n > 0 && n % 16 == 0 && max_rows >= 0 && max_rows % 128 == 0 && max_rows / 128 <= 65535, [&] {
    return "fp8::cuda::grouped_gemm_nt_rows: needs N a positive multiple of 16 and max_rows a multiple of 128 "
           "(at most 128 x 65535), got N=" +
           std::to_string(n) + ", max_rows=" + std::to_string(max_rows);
  });
  if (max_rows == 0) return;
  Args a = make_args(problems, n_problems, bounds, groups);
  a.n = n;
  if (resolve(kernel) == GroupedKernel::Tma)
    for (int i = 0; i < 2; ++i)
      for (int t = 0; t < 2; ++t) {
        const Term& tm = a.terms[i][t];
        a.maps[i][t][0] = codes_map(tm.a, max_rows, tm.k);
        a.maps[i][t][1] = codes_map(tm.b, groups * n, tm.k);
      }
  launch<false>(a, dim3(static_cast<unsigned>(tiles128(n)), static_cast<unsigned>(max_rows / 128),
                        static_cast<unsigned>(n_problems)),
                kernel, stream);
}

void grouped_gemm_nt_tokens_accumulate(const GroupedProblem* problems, int n_problems, const int64_t* bounds,
                                       int64_t groups, int64_t rows, int64_t m, int64_t n, cudaStream_t stream,
                                       GroupedKernel kernel, bool overwrite) {
  check("grouped_gemm_nt_tokens_accumulate", problems, n_problems, bounds, groups, false);
  require(m > 0 && n > 0 && m % 16 == 0 && n % 16 == 0 && rows >= 0 && tiles128(m) * n_problems <= 65535, [&] {
    return "fp8::cuda::grouped_gemm_nt_tokens_accumulate: needs M and N positive multiples of 16, got M=" +
           std::to_string(m) + ", N=" + std::to_string(n);
  });
  if (rows == 0) return;
  Args a = make_args(problems, n_problems, bounds, groups);
  a.m = m;
  a.n = n;
  a.scale_tiles = tiles128(rows);
  a.m_tiles = static_cast<int>(tiles128(m));
  a.overwrite = overwrite;
  launch<true>(a, dim3(static_cast<unsigned>(tiles128(n)), static_cast<unsigned>(a.m_tiles * n_problems),
                       static_cast<unsigned>(groups)),
               kernel, stream);
}

}  // namespace moerl::fp8::cuda
