// fp8::cuda::grouped_gemm_nt_* (kernels/cuda/fp8_grouped_gemm.hpp): one launch for every expert's GEMM of a
// projection. Tiles of 128 x 128 outputs, one block of 8 warps each (2 x 4 warps of 64 x 32), K streamed in steps
// of 128 bytes (one scale per row and step) through a 4-stage cp.async pipeline into 128-byte rows of shared
// memory with the 16-byte chunks XOR-swizzled by row (ldmatrix and the copies conflict-free). Each step's products
// go through mma.sync m16n8k32 E4M3 into FP32 and are promoted into the block's sums with sa · sb, as the CPU
// reference does per 128-group.
//
// Why not cuBLASLt. Its block-scaled FP8 GEMM has no grouped form in CUDA 13's cuBLASLt (13.1: strided or
// pointer-array batches of one shape only); one call per expert costs ~15 us of host time against a few us of
// device time for bench-600m's experts (2048 x 704 x 1024), so the layer waited on the host (issue 4).
//
// Measured on the H200 (bench/results/2026-11-29-gpu-*-h200-d902903.*): exact to the CPU reference (rel_l2 5e-8,
// cuBLASLt's per-expert GEMMs 3e-3 in the same test) and the routed layer's host time falls from 1.25 to 0.20 ms
// (forward), but this kernel reaches 158 TFLOP/s (gate + up at bench-600m; cuBLASLt ~1000+ on large shapes):
// mma.sync keeps Hopper's FP8 tensor cores far from their WGMMA rate, one block of 255 registers per SM hides
// little latency. So MoeFp8Gemm::Lanes stays the default. TODO(perf): the same tiles on WGMMA (64xNx32 E4M3 from
// shared-memory descriptors, TMA loads, a producer warp group; DeepGEMM's sm90 m-grouped contiguous layout is this
// one: groups of rows aligned to 128).
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <string>

#include "kernels/cuda/cuda_check.hpp"
#include "kernels/cuda/fp8_grouped_gemm.hpp"
#include "runtime/error.hpp"

namespace moerl::fp8::cuda {
namespace {

constexpr int kTileRows = 128;  // BM = BN
constexpr int kStepBytes = 128; // BK: one 1x128 / 128x128 scale per row and step
constexpr int kStages = 4;
constexpr int kThreads = 256;   // 8 warps: 2 along M x 4 along N, warp tile 64 x 32
constexpr int kTileBytes = kTileRows * kStepBytes;
constexpr int kStageBytes = 2 * kTileBytes + 2 * kTileRows * static_cast<int>(sizeof(float));  // a, b, their scales
constexpr int kSmemBytes = kStages * kStageBytes;
static_assert(kStepBytes == 128, "one scale per 128 of K and row: the promotion reads one scale per step");

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
  float* y[2];
  int n_terms[2];
  const int64_t* bounds;
  int64_t groups;
  int64_t m, n;          // tokens form: rows of a and b; rows form: n only
  int64_t scale_tiles;   // tokens form: tiles(rows), columns of the scales' CPU layout
  int m_tiles;           // tokens form: tiles(m)
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

__device__ __forceinline__ uint32_t smem_u32(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

__device__ __forceinline__ void cp_async16(void* dst, const void* src, bool ok) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_u32(dst)), "l"(src), "r"(ok ? 16 : 0));
}

__device__ __forceinline__ void cp_async4(void* dst, const void* src, bool ok) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(smem_u32(dst)), "l"(src), "r"(ok ? 4 : 0));
}

__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }

template <int N> __device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

__device__ __forceinline__ void ldsm_x4(uint32_t (&r)[4], const uint8_t* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_u32(p)));
}

// c (16x8 FP32) += a (16x32 E4M3, row) · b (32x8 E4M3, col).
__device__ __forceinline__ void mma_e4m3(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k32.row.col.f32.e4m3.e4m3.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// Byte offset of 16-byte chunk c of row r in a 128-byte-row tile.
__device__ __forceinline__ int swz(int r, int c) { return r * kStepBytes + ((c ^ (r & 7)) << 4); }

template <bool kTokens>
__global__ void __launch_bounds__(kThreads, 1) grouped_gemm_kernel(const __grid_constant__ Args p) {
  extern __shared__ __align__(128) uint8_t smem[];
  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  const int wm = warp / 4, wn = warp % 4;

  // The terms' operands in shared memory (every thread computes the same values, thread 0 stores them): kept out
  // of the registers, which the sums need.
  __shared__ TileOperand A[2], B[2];
  __shared__ int64_t klen[2];
  __shared__ int steps[2];
  int problem;
  int64_t n0 = static_cast<int64_t>(blockIdx.x) * kTileRows;
  float* y;
  int64_t ldy;
  int m_valid, n_valid;
  if constexpr (!kTokens) {
    problem = static_cast<int>(blockIdx.z);
    const int64_t row0 = static_cast<int64_t>(blockIdx.y) * kTileRows;
    if (row0 >= p.bounds[p.groups]) return;
    int lo = 0, hi = static_cast<int>(p.groups) - 1;  // the last group starting at or before row0
    while (lo < hi) {
      const int mid = (lo + hi + 1) / 2;
      if (p.bounds[mid] <= row0) lo = mid; else hi = mid - 1;
    }
    const int64_t g = lo, n = p.n;
    n_valid = clamp_tile(n - n0);
    m_valid = kTileRows;
    for (int t = 0; t < 2; ++t) {
      const Term& tm = p.terms[problem][t];
      const int64_t k = tm.k, tk = (k + 127) / 128, l4 = round_up4(tk);
      if (tid != 0) continue;
      A[t] = TileOperand{tm.a + row0 * k, k, kTileRows, tm.sa + row0 * tk, tk};
      B[t] = TileOperand{tm.b + g * n * k + n0 * k, k, n_valid, tm.sb + g * ((n + 127) / 128) * l4 + (n0 / 128) * l4,
                         0};
      klen[t] = k;
      steps[t] = t < p.n_terms[problem] ? static_cast<int>(tk) : 0;
    }
    y = p.y[problem] + row0 * n + n0;
    ldy = n;
  } else {
    const int64_t g = blockIdx.z;
    const int64_t first = p.bounds[g], ng = p.bounds[g + 1] - first;
    if (ng <= 0) return;
    problem = static_cast<int>(blockIdx.y) / p.m_tiles;
    const int64_t m0 = static_cast<int64_t>(blockIdx.y % p.m_tiles) * kTileRows, m = p.m, n = p.n;
    m_valid = clamp_tile(m - m0);
    n_valid = clamp_tile(n - n0);
    for (int t = 0; t < 2; ++t) {
      const Term& tm = p.terms[problem][t];
      if (tid != 0) continue;
      A[t] = TileOperand{tm.a + first * m + m0 * ng, ng, m_valid, tm.sa + m0 * p.scale_tiles + first / 128,
                         p.scale_tiles};
      B[t] = TileOperand{tm.b + first * n + n0 * ng, ng, n_valid, tm.sb + n0 * p.scale_tiles + first / 128,
                         p.scale_tiles};
      klen[t] = ng;
      steps[t] = t < p.n_terms[problem] ? static_cast<int>(ng / 128) : 0;
    }
    y = p.y[problem] + g * m * n + m0 * n + n0;
    ldy = n;
  }
  __syncthreads();
  const int total_steps = steps[0] + steps[1];

  auto load = [&](int s, int stage) {
    const int t = s < steps[0] ? 0 : 1;
    const int kb = t == 0 ? s : s - steps[0];
    const TileOperand& a = A[t];
    const TileOperand& b = B[t];
    uint8_t* base = smem + stage * kStageBytes;
    const int64_t k0 = static_cast<int64_t>(kb) * kStepBytes;
#pragma unroll
    for (int i = 0; i < kTileRows * kStepBytes / 16 / kThreads; ++i) {
      const int idx = tid + i * kThreads, r = idx / 8, c = idx % 8;
      const bool kin = k0 + c * 16 < klen[t];
      const bool oka = kin && r < a.rows, okb = kin && r < b.rows;
      cp_async16(base + swz(r, c), oka ? a.codes + r * a.ld + k0 + c * 16 : a.codes, oka);
      cp_async16(base + kTileBytes + swz(r, c), okb ? b.codes + r * b.ld + k0 + c * 16 : b.codes, okb);
    }
    float* scales = reinterpret_cast<float*>(base + 2 * kTileBytes);
    if (tid < kTileRows) {
      const bool ok = tid < a.rows;
      cp_async4(scales + tid, ok ? a.scales + tid * a.s_row + kb : a.scales, ok);
    } else {
      const int r = tid - kTileRows;
      const bool ok = r < b.rows;
      cp_async4(scales + kTileRows + r, ok ? b.scales + r * b.s_row + kb : b.scales, ok);
    }
  };

  float acc[4][4][4];
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j)
#pragma unroll
      for (int v = 0; v < 4; ++v) acc[i][j][v] = 0.0f;

#pragma unroll
  for (int s = 0; s < kStages - 1; ++s) {
    if (s < total_steps) load(s, s);
    cp_async_commit();
  }
  const int gid = lane / 4, tig = lane % 4;
  for (int s = 0; s < total_steps; ++s) {
    cp_async_wait<kStages - 2>();
    __syncthreads();
    {
      const int nx = s + kStages - 1;
      if (nx < total_steps) load(nx, nx % kStages);
      cp_async_commit();
    }
    const uint8_t* as = smem + (s % kStages) * kStageBytes;
    const uint8_t* bs = as + kTileBytes;
    const float* ss = reinterpret_cast<const float*>(as + 2 * kTileBytes);
    float part[4][4][4];
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
      for (int j = 0; j < 4; ++j)
#pragma unroll
        for (int v = 0; v < 4; ++v) part[i][j][v] = 0.0f;
#pragma unroll
    for (int ks = 0; ks < kStepBytes / 32; ++ks) {
      uint32_t af[4][4], bf[2][4];
#pragma unroll
      for (int mt = 0; mt < 4; ++mt) {
        const int r = wm * 64 + mt * 16 + (lane % 8) + (lane / 8 % 2) * 8;
        ldsm_x4(af[mt], as + swz(r, 2 * ks + lane / 16));
      }
#pragma unroll
      for (int np = 0; np < 2; ++np) {
        const int r = wn * 32 + np * 16 + (lane % 8) + (lane / 16) * 8;
        ldsm_x4(bf[np], bs + swz(r, 2 * ks + lane / 8 % 2));
      }
#pragma unroll
      for (int mt = 0; mt < 4; ++mt)
#pragma unroll
        for (int nt = 0; nt < 4; ++nt)
          mma_e4m3(part[mt][nt], af[mt], bf[nt / 2][(nt % 2) * 2], bf[nt / 2][(nt % 2) * 2 + 1]);
    }
#pragma unroll
    for (int mt = 0; mt < 4; ++mt) {
      const int r = wm * 64 + mt * 16 + gid;
      const float sa0 = ss[r], sa1 = ss[r + 8];
#pragma unroll
      for (int nt = 0; nt < 4; ++nt) {
        const int c = wn * 32 + nt * 8 + tig * 2;
        const float sb0 = ss[kTileRows + c], sb1 = ss[kTileRows + c + 1];
        acc[mt][nt][0] = fmaf(sa0 * sb0, part[mt][nt][0], acc[mt][nt][0]);
        acc[mt][nt][1] = fmaf(sa0 * sb1, part[mt][nt][1], acc[mt][nt][1]);
        acc[mt][nt][2] = fmaf(sa1 * sb0, part[mt][nt][2], acc[mt][nt][2]);
        acc[mt][nt][3] = fmaf(sa1 * sb1, part[mt][nt][3], acc[mt][nt][3]);
      }
    }
  }
  cp_async_wait<0>();

#pragma unroll
  for (int mt = 0; mt < 4; ++mt) {
#pragma unroll
    for (int nt = 0; nt < 4; ++nt) {
      const int c = wn * 32 + nt * 8 + tig * 2;
      if (c >= n_valid) continue;
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int r = wm * 64 + mt * 16 + gid + h * 8;
        if (r >= m_valid) continue;
        float2* out = reinterpret_cast<float2*>(y + r * ldy + c);
        float2 v = make_float2(acc[mt][nt][2 * h], acc[mt][nt][2 * h + 1]);
        if constexpr (kTokens) {
          const float2 old = *out;
          v.x += old.x;
          v.y += old.y;
        }
        *out = v;
      }
    }
  }
}

bool aligned(const void* p, uintptr_t n) { return reinterpret_cast<uintptr_t>(p) % n == 0; }

void check(const char* fn, const GroupedProblem* problems, int n_problems, const int64_t* bounds, int64_t groups,
           bool rows_form) {
  const std::string who = std::string("fp8::cuda::") + fn;
  require(problems != nullptr && (n_problems == 1 || n_problems == 2), who + ": needs 1 or 2 problems");
  require(bounds != nullptr && groups > 0 && groups <= 65535, who + ": needs bounds and 1 .. 65535 groups, got " +
                                                                 std::to_string(groups));
  for (int i = 0; i < n_problems; ++i) {
    const GroupedProblem& pr = problems[i];
    require(pr.n_terms == 1 || (pr.n_terms == 2 && rows_form), who + ": a problem has 1 term (2 in the rows form)");
    require(pr.y != nullptr && aligned(pr.y, 8), who + ": y must be an 8-byte aligned device pointer");
    for (int t = 0; t < pr.n_terms; ++t) {
      const GroupedTerm& tm = pr.terms[t];
      require(tm.a && tm.b && tm.a_scales && tm.b_scales && aligned(tm.a, 16) && aligned(tm.b, 16) &&
                  aligned(tm.a_scales, 4) && aligned(tm.b_scales, 4),
              who + ": codes must be 16-byte aligned and scales 4-byte aligned device pointers");
      if (rows_form)
        require(tm.k > 0 && tm.k % 16 == 0, who + ": K must be a positive multiple of 16, got " + std::to_string(tm.k));
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
    a.y[i] = pr.y;
    a.n_terms[i] = pr.n_terms;
  }
  a.bounds = bounds;
  a.groups = groups;
  return a;
}

template <bool kTokens> void launch(const Args& a, dim3 grid, cudaStream_t stream) {
  CUDA_CHECK(cudaFuncSetAttribute(grouped_gemm_kernel<kTokens>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                  kSmemBytes));
  grouped_gemm_kernel<kTokens><<<grid, kThreads, kSmemBytes, stream>>>(a);
  CUDA_CHECK_LAUNCH();
}

}  // namespace

void grouped_gemm_nt_rows(const GroupedProblem* problems, int n_problems, const int64_t* bounds, int64_t groups,
                          int64_t max_rows, int64_t n, cudaStream_t stream) {
  check("grouped_gemm_nt_rows", problems, n_problems, bounds, groups, true);
  require(n > 0 && n % 16 == 0 && max_rows >= 0 && max_rows % 128 == 0 && max_rows / 128 <= 65535,
          "fp8::cuda::grouped_gemm_nt_rows: needs N a positive multiple of 16 and max_rows a multiple of 128 "
          "(at most 128 x 65535), got N=" + std::to_string(n) + ", max_rows=" + std::to_string(max_rows));
  if (max_rows == 0) return;
  Args a = make_args(problems, n_problems, bounds, groups);
  a.n = n;
  launch<false>(a, dim3(static_cast<unsigned>(tiles128(n)), static_cast<unsigned>(max_rows / 128),
                        static_cast<unsigned>(n_problems)),
                stream);
}

void grouped_gemm_nt_tokens_accumulate(const GroupedProblem* problems, int n_problems, const int64_t* bounds,
                                       int64_t groups, int64_t rows, int64_t m, int64_t n, cudaStream_t stream) {
  check("grouped_gemm_nt_tokens_accumulate", problems, n_problems, bounds, groups, false);
  require(m > 0 && n > 0 && m % 16 == 0 && n % 16 == 0 && rows >= 0 && tiles128(m) * n_problems <= 65535,
          "fp8::cuda::grouped_gemm_nt_tokens_accumulate: needs M and N positive multiples of 16, got M=" +
              std::to_string(m) + ", N=" + std::to_string(n));
  if (rows == 0) return;
  Args a = make_args(problems, n_problems, bounds, groups);
  a.m = m;
  a.n = n;
  a.scale_tiles = tiles128(rows);
  a.m_tiles = static_cast<int>(tiles128(m));
  launch<true>(a, dim3(static_cast<unsigned>(tiles128(n)), static_cast<unsigned>(a.m_tiles * n_problems),
                       static_cast<unsigned>(groups)),
               stream);
}

}  // namespace moerl::fp8::cuda
