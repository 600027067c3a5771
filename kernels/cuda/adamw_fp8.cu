// AdamW's update of weights together with their FP8 copies (kernels/cuda/adamw.hpp, AdamWFp8Copies): one thread
// block per 128x128 block of a weight matrix updates the block's elements (adamw_update: the spans kernel's bits) and
// quantizes the new values it holds in registers (quantize_block_values: quantize_128x128_placed's bytes). The
// weight is read once a step instead of twice: once by the update, once more by the quantization of the next
// forward.
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <string>
#include <vector>

#include "kernels/cuda/adamw.hpp"
#include "kernels/cuda/adamw_update.cuh"
#include "kernels/cuda/cp_async.cuh"
#include "kernels/cuda/cuda_check.hpp"
#include "kernels/cuda/fp8_quantize_block.cuh"
#include "kernels/cuda/kernel_attributes.hpp"
#include "kernels/cuda/ops_common.cuh"
#include "runtime/error.hpp"

namespace moerl::cuda {
namespace {

using adamw_detail::adamw_update;
using adamw_detail::Scalars;
using fp8::kTile;
using fp8::tiles;
namespace qd = fp8::cuda::quant_detail;

// The last copy i with first_block[i] <= b (first_block [copies + 1] rising; first_block[0] = 0 <= b < the last).
__device__ __forceinline__ int copy_of(const int64_t* first_block, int copies, int64_t b) {
  int lo = 0, hi = copies - 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) / 2;
    if (first_block[mid] <= b) lo = mid; else hi = mid - 1;
  }
  return lo;
}

// Block `local` of copy c: its scale (CPU layout) copied to its Fp8GemmScales entries, if any.
__device__ __forceinline__ void write_gemm_scales(const fp8::cuda::Fp8WeightCodes& c, int64_t local) {
  const fp8::cuda::Fp8GemmScales& s = c.gemm_scales;
  if (s.sw == nullptr) return;
  const int64_t tr = tiles(c.rows), tc = tiles(c.cols);
  const int64_t e = local / (tr * tc), bi = local / tc % tr, bj = local % tc;
  const float scale = c.block_scales[local];
  s.sw[e * s.sw_stride + bi * s.sw_ld + bj] = scale;
  s.st[e * s.st_stride + bj * s.st_ld + bi] = scale;
}

// Block b of the launch: block (bi, bj) of matrix e of its copy. Thread (warp w, lane l) holds rows 8w .. 8w + 7
// of the block and columns 4l .. 4l + 3 (qd::quantize_block_values' layout), updated a row at a time. Elements
// outside the matrix are neither read nor written, and quantize as zeros (as the plain kernel's padding). 64
// registers, two blocks an SM: one block's loads overlap the other's arithmetic and stores.
//
// The loads go through shared memory: each thread copies its next kAhead rows' w, g, m and v (48 bytes a row) with
// cp.async into slots of its own and reads back only what it copied itself (no barrier), so that rows are in flight
// without holding registers. Loaded into registers (one row ahead at most at 64 registers) the kernel was
// latency-bound: Nsight Compute at b513d67, 3.30 ms, DRAM 74% busy, stalls mostly on each row's first use of its
// loads; all 8 rows' loads in registers, 128 of them and one block an SM, 4.7 ms. On the H200, bench-600m's 536M FP8
// weights, rounds interleaved (CUPTI trace; bench/results/2026-11-30-gpu-adamw-ahead-h200-db3c9d8+ahead.txt):
// 3.07 / 3.07 ms with 2 rows ahead against 3.38 / 3.37 loaded into registers (3.8 against 3.5 TB/s), 3.09 with 3,
// 3.17 with 4 (one block an SM); fp8 step 309.1k / 309.1k against 308.0k / 307.9k tokens/s.
constexpr int kAhead = 2;
struct RowSlot {  // one row of a warp: lane l's 4 elements at index l
  float4 w[qd::kWarp], g[qd::kWarp];
  uint2 m[qd::kWarp], v[qd::kWarp];
};

__global__ void __launch_bounds__(qd::kBlockThreads, 2)
    adamw_fp8_kernel(const AdamWFp8Copy* __restrict__ copies, const int64_t* __restrict__ first_block, int n_copies,
                     Scalars s, const float* __restrict__ device_grad_scale) {
  __shared__ qd::BlockSmem<true> smem;
  extern __shared__ RowSlot ring[];  // [kAhead][warps]
  if (!adamw_detail::take_device_grad_scale(device_grad_scale, s)) return;  // the whole block: a skipped step
  const int64_t b = blockIdx.x;
  const int ci = copy_of(first_block, n_copies, b);
  const AdamWFp8Copy c = copies[ci];
  const fp8::cuda::Fp8WeightCodes& o = c.out;
  const int64_t tr = tiles(o.rows), tc = tiles(o.cols), local = b - first_block[ci];
  const int64_t e = local / (tr * tc), bi = local / tc % tr, bj = local % tc;
  const int lane = threadIdx.x % qd::kWarp, warp = threadIdx.x / qd::kWarp;
  const int64_t r0 = bi * kTile, c0 = bj * kTile, col = c0 + 4 * lane, base = e * o.rows * o.cols;
  constexpr int R = qd::kBlockRowsPerWarp;
  // Row i of this thread: its index in units of 4 elements, or -1 outside the matrix (cols % 4 == 0: a lane's 4
  // columns are all in or all out). From the first row's index and a count (fewer registers than the rows').
  const int64_t first_row = r0 + warp * R, at0 = (base + first_row * o.cols + col) / 4, step = o.cols / 4;
  const int rows_in = col < o.cols ? static_cast<int>(min(int64_t{R}, max(o.rows - first_row, int64_t{0}))) : 0;
  auto at_of = [&](int i) -> int64_t { return i < rows_in ? at0 + i * step : -1; };
  auto issue = [&](int i) {  // row i's copies into slot i % kAhead, as one commit group (empty past the rows)
    const int64_t at = at_of(i);  // -1 past the rows (i >= R >= rows_in too)
    if (at >= 0) {
      RowSlot& slot = ring[(i % kAhead) * qd::kBlockWarps + warp];
      cp_async16(&slot.w[lane], reinterpret_cast<const float4*>(c.w) + at);
      cp_async16(&slot.g[lane], reinterpret_cast<const float4*>(c.g) + at);
      cp_async8(&slot.m[lane], reinterpret_cast<const uint2*>(c.m) + at);
      cp_async8(&slot.v[lane], reinterpret_cast<const uint2*>(c.v) + at);
    }
    cp_async_commit();
  };
#pragma unroll
  for (int i = 0; i < kAhead; ++i) issue(i);
  float v[R][4];
#pragma unroll
  for (int i = 0; i < R; ++i) {
    const int64_t at = at_of(i);
    cp_async_wait<kAhead - 1>();  // row i's group has landed
    if (at < 0) {
      v[i][0] = v[i][1] = v[i][2] = v[i][3] = 0.0f;
    } else {
      const RowSlot& slot = ring[(i % kAhead) * qd::kBlockWarps + warp];
      const float4 w4 = slot.w[lane], g4 = slot.g[lane];
      const uint2 m4 = slot.m[lane], v4 = slot.v[lane];
      float wv[4] = {w4.x, w4.y, w4.z, w4.w};
      const float gv[4] = {g4.x, g4.y, g4.z, g4.w};
      uint16_t mv[4] = {static_cast<uint16_t>(m4.x), static_cast<uint16_t>(m4.x >> 16), static_cast<uint16_t>(m4.y),
                        static_cast<uint16_t>(m4.y >> 16)};
      uint16_t vv[4] = {static_cast<uint16_t>(v4.x), static_cast<uint16_t>(v4.x >> 16), static_cast<uint16_t>(v4.y),
                        static_cast<uint16_t>(v4.y >> 16)};
#pragma unroll
      for (int k = 0; k < 4; ++k) adamw_update(wv[k], gv[k], mv[k], vv[k], s);
      reinterpret_cast<float4*>(c.w)[at] = make_float4(wv[0], wv[1], wv[2], wv[3]);
      reinterpret_cast<uint2*>(c.m)[at] =
          make_uint2(mv[0] | (uint32_t{mv[1]} << 16), mv[2] | (uint32_t{mv[3]} << 16));
      reinterpret_cast<uint2*>(c.v)[at] =
          make_uint2(vv[0] | (uint32_t{vv[1]} << 16), vv[2] | (uint32_t{vv[3]} << 16));
#pragma unroll
      for (int k = 0; k < 4; ++k) v[i][k] = wv[k];
    }
    // The slot was read above into registers the stores used: its refill cannot overtake those reads.
    issue(i + kAhead);
  }
  const int64_t stride = o.at.stride != 0 ? o.at.stride : o.rows * o.cols;
  const int64_t t_ld = o.at.t_ld != 0 ? o.at.t_ld : o.rows;
  const int64_t t_stride = o.at.t_stride != 0 ? o.at.t_stride : o.rows * o.cols;
  const qd::BlockPlace place{o.rows, o.cols, r0, c0, o.codes + e * stride, o.codes_t + e * t_stride, t_ld,
                             o.block_scales + local};
  qd::quantize_block_values<false, true>(v, place, true, smem);
  // The scale's entries in the GEMMs' layouts, by the thread that wrote it, from what it wrote. (ptxas: ci kept for
  // this spills 12 bytes at 64 registers, a store and a load a thread; the entries' pointers kept from above, 48.)
  if (threadIdx.x == 0) write_gemm_scales(copies[ci].out, blockIdx.x - first_block[ci]);
}

int64_t blocks_of(const AdamWFp8Copy& c) { return c.out.batch * tiles(c.out.rows) * tiles(c.out.cols); }

// None, or both layouts with room for the blocks [TN, TK] of each of `batch` matrices.
bool gemm_scales_fit(const fp8::cuda::Fp8GemmScales& s, int64_t batch, int64_t TN, int64_t TK) {
  if (s.sw == nullptr) return s.st == nullptr;
  return s.st != nullptr && s.sw_ld >= TK && s.st_ld >= TN && (batch == 1 || (s.sw_stride >= TN * s.sw_ld &&
                                                                              s.st_stride >= TK * s.st_ld));
}

}  // namespace

bool AdamWFp8Copies::fits(const AdamWFp8Copy& copy) {
  using ops_detail::aligned;
  const fp8::cuda::Fp8WeightCodes& c = copy.out;
  const int64_t t_ld = c.at.t_ld != 0 ? c.at.t_ld : c.rows;
  const int64_t stride = c.at.stride != 0 ? c.at.stride : c.rows * c.cols;
  const int64_t t_stride = c.at.t_stride != 0 ? c.at.t_stride : c.rows * c.cols;
  return copy.w && copy.g && copy.m && copy.v && c.codes && c.block_scales && c.codes_t && c.batch > 0 && c.rows > 0 &&
         c.cols > 0 && c.cols % 4 == 0 && c.rows % 16 == 0 && t_ld >= c.rows && t_ld % 16 == 0 &&
         stride >= c.rows * c.cols && t_stride >= c.cols * t_ld && aligned(copy.w, 16) && aligned(copy.g, 16) &&
         aligned(copy.m, 8) && aligned(copy.v, 8) && aligned(c.codes, 4) && aligned(c.codes_t, 16) &&
         gemm_scales_fit(c.gemm_scales, c.batch, tiles(c.rows), tiles(c.cols));
}

AdamWFp8Copies::AdamWFp8Copies(const std::vector<AdamWFp8Copy>& copies) : copies_(copies.size()) {
  std::vector<int64_t> first_block{0};
  for (size_t i = 0; i < copies.size(); ++i) {
    require(fits(copies[i]), [&] {
      const fp8::cuda::Fp8WeightCodes& c = copies[i].out;
      return "cuda::AdamWFp8Copies: copy " + std::to_string(i) + " (" + std::to_string(c.batch) + " x " +
             std::to_string(c.rows) + " x " + std::to_string(c.cols) +
             ") needs every pointer set, cols % 4 == 0, rows % 16 == 0, valid placements and aligned buffers";
    });
    first_block.push_back(first_block.back() + blocks_of(copies[i]));
  }
  blocks_ = first_block.back();
  require(copies_ <= INT32_MAX && blocks_ <= INT32_MAX, "cuda::AdamWFp8Copies: too many blocks for one launch");
  const size_t table = ops_detail::align256(copies_ * sizeof(AdamWFp8Copy));
  CUDA_CHECK(cudaMalloc(&device_, table + first_block.size() * sizeof(int64_t)));
  CUDA_CHECK(cudaMemcpy(device_, copies.data(), copies_ * sizeof(AdamWFp8Copy), cudaMemcpyHostToDevice));
  CUDA_CHECK(cudaMemcpy(static_cast<char*>(device_) + table, first_block.data(), first_block.size() * sizeof(int64_t),
                        cudaMemcpyHostToDevice));
}

AdamWFp8Copies::~AdamWFp8Copies() { cudaFree(device_); }

void AdamWFp8Copies::update(const AdamWUpdate& u, cudaStream_t stream) const {
  const Scalars s = adamw_detail::scalars_of(u.lr, u.beta1, u.beta2, u.eps, u.weight_decay, u.t, u.grad_scale);
  if (blocks_ == 0) return;
  const size_t table = ops_detail::align256(copies_ * sizeof(AdamWFp8Copy));
  constexpr int smem = static_cast<int>(sizeof(RowSlot)) * qd::kBlockWarps * kAhead;  // 48 KiB (+ 17 static)
  cuda_detail::allow_dynamic_smem<adamw_fp8_kernel>(smem);
  adamw_fp8_kernel<<<static_cast<unsigned>(blocks_), qd::kBlockThreads, smem, stream>>>(
      static_cast<const AdamWFp8Copy*>(device_),
      reinterpret_cast<const int64_t*>(static_cast<const char*>(device_) + table), static_cast<int>(copies_), s,
      u.device_grad_scale);
  CUDA_CHECK_LAUNCH();
}

}  // namespace moerl::cuda
