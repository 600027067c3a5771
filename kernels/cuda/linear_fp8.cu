// The FP8 recipe of the GPU linear layers (kernels/cuda/linear.hpp), the operands of kernels/cpu/linear.cpp's
// emulation byte for byte, multiplied by fp8::cuda::gemm_nt (cuBLASLt block-scaled FP8, FP32 output):
//   Fprop  y  [M, N] = x [M, K] (1x128 along K)        · w [N, K] (128x128)
//   Dgrad  dx [M, K] = dy [M, N] (1x128 along N)       · wᵀ [K, N] (128x128: w's blocks transposed)
//   Wgrad  dw [N, K] += dyᵀ [N, M] (1x128 along M)     · xᵀ [K, M] (1x128 along M)
//
// Padding. gemm_nt needs the contracted size a multiple of 16 and the row counts multiples of 4; sizes below 128
// are not among those verified on the H200 (tests/gpu/fp8_gemm_gpu.cpp), so every GEMM size is also raised to at
// least 128 (tiny problems only; the cost does not matter there). Operands are zero-padded before quantization:
// zeros never raise a tile's amax and quantize to code 0, so the codes and scales of the real elements are the
// CPU's, the padding adds nothing to any sum, and the padded rows and columns of the product are dropped.
// When the output needs no padding (and is 16-byte aligned) the GEMM writes (or, Wgrad, accumulates into) it
// directly; otherwise it goes through a stream-ordered temporary.
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <optional>
#include <string>

#include "kernels/cuda/cuda_check.hpp"
#include "kernels/cuda/fp8_quantize_tile.cuh"
#include "kernels/cuda/linear_impl.cuh"
#include "kernels/cuda/pdl.cuh"
#include "kernels/cuda/stream_scratch.hpp"
#include "kernels/fp8.hpp"
#include "kernels/fp8_gemm.hpp"
#include "kernels/fp8_quantize.hpp"
#include "runtime/error.hpp"
#include "runtime/util/env_switch.hpp"

namespace moerl::cuda::linear_detail {
namespace {

using cuda_detail::StreamScratch;
using fp8::kTile;
using fp8::tiles;
using fp8::cuda::Operand;
namespace qd = fp8::cuda::quant_detail;

constexpr int kThreads = 256;
constexpr int64_t kMaxBlocks = 8192;  // grid-stride loops
constexpr int64_t kMinGemmSize = 128; // smallest M, N and K handed to gemm_nt (see the top of the file)

int64_t round_up(int64_t n, int64_t m) { return (n + m - 1) / m * m; }
int64_t gemm_rows(int64_t n) { return std::max(round_up(n, 4), kMinGemmSize); }    // M or N of gemm_nt
int64_t gemm_depth(int64_t n) { return std::max(round_up(n, 16), kMinGemmSize); }  // K of gemm_nt

unsigned blocks_for(int64_t items) {
  return static_cast<unsigned>(std::clamp<int64_t>((items + kThreads - 1) / kThreads, 1, kMaxBlocks));
}

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// The weight's block scales s [TN, TK] (CPU layout) -> cuBLASLt's BLK128x128 layouts of w [.., K] (sw [TN, L4(TK)])
// and of wᵀ [.., N] (st [TK, L4(TN)]: block (kb, nb) of wᵀ is block (nb, kb) of w); padding entries 0.
__global__ void __launch_bounds__(kThreads)
    weight_scales_kernel(const float* __restrict__ s, int64_t TN, int64_t TK, float* __restrict__ sw,
                         float* __restrict__ st) {
  moerl::cuda::await_previous_grid();
  const int64_t L4K = (TK + 3) / 4 * 4, L4N = (TN + 3) / 4 * 4;
  s += static_cast<int64_t>(blockIdx.y) * TN * TK;  // blockIdx.y: the matrix of a stack
  sw += static_cast<int64_t>(blockIdx.y) * TN * L4K;
  st += static_cast<int64_t>(blockIdx.y) * TK * L4N;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kThreads;
  const int64_t first = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  for (int64_t i = first; i < TN * L4K; i += stride) {
    const int64_t nb = i / L4K, kb = i - nb * L4K;
    sw[i] = kb < TK ? s[nb * TK + kb] : 0.0f;
  }
  for (int64_t i = first; i < TK * L4N; i += stride) {
    const int64_t kb = i / L4N, nb = i - kb * L4N;
    st[i] = nb < TN ? s[nb * TK + kb] : 0.0f;
  }
}

// An expert's gate and up block scales g, u [TI, TH] (CPU layout) -> cuBLASLt's BLK128x128 layouts of [w_gate;
// w_up] [2 Ip, H] (sw [2 TI, L4(TH)]: gate's block rows, then up's) and of [wᵀ_gate | wᵀ_up] [H, 2 Ip] (st [TH,
// L4(2 TI)]: gate's blocks, then up's, in each block row); padding entries 0. blockIdx.y: the expert.
__global__ void __launch_bounds__(kThreads)
    gate_up_scales_kernel(const float* __restrict__ g, const float* __restrict__ u, int64_t TI, int64_t TH,
                          float* __restrict__ sw, float* __restrict__ st) {
  moerl::cuda::await_previous_grid();
  const int64_t L4H = (TH + 3) / 4 * 4, L4I = (2 * TI + 3) / 4 * 4, e = blockIdx.y;
  g += e * TI * TH;
  u += e * TI * TH;
  sw += e * 2 * TI * L4H;
  st += e * TH * L4I;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kThreads;
  const int64_t first = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  for (int64_t i = first; i < 2 * TI * L4H; i += stride) {
    const int64_t nb = i / L4H, hb = i - nb * L4H;
    sw[i] = hb >= TH ? 0.0f : nb < TI ? g[nb * TH + hb] : u[(nb - TI) * TH + hb];
  }
  for (int64_t i = first; i < TH * L4I; i += stride) {
    const int64_t hb = i / L4I, nb = i - hb * L4I;
    st[i] = nb >= 2 * TI ? 0.0f : nb < TI ? g[nb * TH + hb] : u[(nb - TI) * TH + hb];
  }
}

// y [rows, cols] += t [rows, cols] with t's rows ld apart (a padded product added to the weight gradient).
__global__ void __launch_bounds__(kThreads)
    add_strided_kernel(const float* __restrict__ t, int64_t ld, int64_t rows, int64_t cols, float* __restrict__ y) {
  moerl::cuda::await_previous_grid();
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kThreads;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; i < rows * cols; i += stride) {
    const int64_t r = i / cols, c = i - r * cols;
    y[i] += t[r * ld + c];
  }
}

// src [rows, cols] -> dst [prows, pcols] with zeros around (prows >= rows, pcols >= cols).
void pad(const float* src, int64_t rows, int64_t cols, float* dst, int64_t prows, int64_t pcols, cudaStream_t stream) {
  CUDA_CHECK(cudaMemsetAsync(dst, 0, static_cast<size_t>(prows * pcols) * sizeof(float), stream));
  CUDA_CHECK(cudaMemcpy2DAsync(dst, static_cast<size_t>(pcols) * sizeof(float), src,
                               static_cast<size_t>(cols) * sizeof(float), static_cast<size_t>(cols) * sizeof(float),
                               static_cast<size_t>(rows), cudaMemcpyDeviceToDevice, stream));
}

// An activation or gradient src [rows, cols], zero-padded to [prows, pcols] and quantized for gemm_nt into
// stream-ordered scratch (one quantization kernel, one small kernel for the scale layout):
//   along_rows = false: 1x128 tiles along cols, the operand is [prows, pcols]       (Fprop x, Dgrad dy)
//   along_rows = true:  1x128 tiles along rows (tokens), the operand is the transpose [pcols, prows]
//                       (Wgrad dyᵀ and xᵀ; fp8::cuda::quantize_1x128_transposed)
class Fp8Activation {
 public:
  Fp8Activation(const float* src, int64_t rows, int64_t cols, int64_t prows, int64_t pcols, bool along_rows,
                cudaStream_t stream)
      : at_(offsets(rows, cols, prows, pcols, along_rows)), scratch_(at_.total, stream) {
    const float* x = src;
    if (prows != rows || pcols != cols) {
      float* padded = scratch_.as<float>(at_.padded);
      pad(src, rows, cols, padded, prows, pcols, stream);
      x = padded;
    }
    uint8_t* codes = scratch_.as<uint8_t>(at_.codes);
    float* lt_scales = scratch_.as<float>(at_.lt_scales);
    const int64_t op_rows = along_rows ? pcols : prows, op_cols = along_rows ? prows : pcols;
    constexpr auto lt = fp8::cuda::ScaleLayout::Cublaslt;  // the scales as the GEMM reads them
    if (along_rows)
      fp8::cuda::quantize_1x128_transposed(x, prows, pcols, codes, lt_scales, stream, lt);
    else
      fp8::cuda::quantize_1x128(x, prows, pcols, codes, lt_scales, stream, lt);
    operand_ = Operand{codes, lt_scales, op_rows, op_cols, 1};
  }
  const Operand& operand() const { return operand_; }
  void release() { scratch_.release(); }

 private:
  struct Offsets {
    size_t padded = 0, codes = 0, lt_scales = 0, total = 0;
  };
  static Offsets offsets(int64_t rows, int64_t cols, int64_t prows, int64_t pcols, bool along_rows) {
    const int64_t op_rows = along_rows ? pcols : prows, op_cols = along_rows ? prows : pcols;
    Layout l;
    Offsets o;
    if (prows != rows || pcols != cols) o.padded = l.add(static_cast<size_t>(prows * pcols) * sizeof(float));
    o.codes = l.add(static_cast<size_t>(prows * pcols));
    o.lt_scales = l.add(static_cast<size_t>(fp8::cuda::cublaslt_scale_count(op_rows, op_cols, 1)) * sizeof(float));
    o.total = l.total;
    return o;
  }

  Offsets at_;
  StreamScratch scratch_;
  Operand operand_{};
};

// out [M, N] (row-major, ld N) = a · bᵀ, or += when accumulate; a.rows >= M and b.rows >= N (padded sizes).
void gemm_into(fp8::cuda::GemmContext& ctx, const Operand& a, const Operand& b, float* out, int64_t M, int64_t N,
               bool accumulate, cudaStream_t stream) {
  if (a.rows == M && b.rows == N && aligned16(out)) {
    if (accumulate)
      fp8::cuda::gemm_nt_accumulate(ctx, a, b, out, stream);
    else
      fp8::cuda::gemm_nt(ctx, a, b, out, fp8::cuda::OutType::FP32, stream);
    return;
  }
  StreamScratch t(static_cast<size_t>(a.rows * b.rows) * sizeof(float), stream);
  float* product = t.as<float>();
  fp8::cuda::gemm_nt(ctx, a, b, product, fp8::cuda::OutType::FP32, stream);
  if (accumulate) {
    launch_after_previous(add_strided_kernel, blocks_for(M * N), kThreads, 0, stream, product, b.rows, M, N, out);
  } else {
    CUDA_CHECK(cudaMemcpy2DAsync(out, static_cast<size_t>(N) * sizeof(float), product,
                                 static_cast<size_t>(b.rows) * sizeof(float), static_cast<size_t>(N) * sizeof(float),
                                 static_cast<size_t>(M), cudaMemcpyDeviceToDevice, stream));
  }
  t.release();
}

// A prepared weight's bytes from its masters: each copy quantized in 128x128 blocks straight into the codes (the
// CPU's bytes) and, in the same pass, their transpose into codes_t (a block of wᵀ holds the same elements as the
// block of w it mirrors, so the same amax, scale and codes), then the block scales put in the GEMMs' layouts.
void fill_from_copies(const PreparedWeight& pw, cudaStream_t stream) {
  for (const Fp8WeightCopy& c : pw.copies) {
    const fp8::cuda::Fp8WeightCodes& o = c.out;
    fp8::cuda::quantize_128x128_placed(c.w, o.batch, o.rows, o.cols, o.codes, o.block_scales, o.codes_t, o.at, stream);
  }
  pw.finish_scales(stream);
}

// The block scales s [TN, TK] of `experts` stacked matrices (CPU layout) -> cuBLASLt's BLK128x128 layouts of each
// matrix and of its transpose, sw_stride and st_stride apart.
void weight_scales(const float* s, int64_t experts, int64_t TN, int64_t TK, float* sw, float* st, cudaStream_t stream) {
  const int64_t scale_items = std::max(TN * round_up(TK, 4), TK * round_up(TN, 4));
  const dim3 grid(std::min<unsigned>(blocks_for(scale_items), 64), static_cast<unsigned>(experts));
  launch_after_previous(weight_scales_kernel, grid, kThreads, 0, stream, s, TN, TK, sw, st);
}

// The weight copies of `experts` matrices [rows, cols] read from w at w_stride apart into `out`'s places: one
// batched copy where they lie packed (w_stride = rows · cols, or 0), else one copy per matrix (each lying whole in
// memory, so that the optimizer can fuse each with its update: GpuAdamW takes only copies whose elements are one
// range).
std::vector<Fp8WeightCopy> stacked_copies(const float* w, int64_t w_stride, const fp8::cuda::Fp8WeightCodes& out) {
  if (w_stride == 0 || w_stride == out.rows * out.cols || out.batch == 1) return {Fp8WeightCopy{w, out}};
  const int64_t stride = out.at.stride != 0 ? out.at.stride : out.rows * out.cols;
  const int64_t t_stride = out.at.t_stride != 0 ? out.at.t_stride : out.rows * out.cols;
  const int64_t blocks = tiles(out.rows) * tiles(out.cols);
  std::vector<Fp8WeightCopy> copies;
  for (int64_t e = 0; e < out.batch; ++e) {
    fp8::cuda::Fp8WeightCodes one = out;
    one.batch = 1, one.codes = out.codes + e * stride, one.codes_t = out.codes_t + e * t_stride;
    one.block_scales = out.block_scales + e * blocks;
    one.gemm_scales.sw = out.gemm_scales.sw + e * out.gemm_scales.sw_stride;
    one.gemm_scales.st = out.gemm_scales.st + e * out.gemm_scales.st_stride;
    copies.push_back(Fp8WeightCopy{w + e * w_stride, one});
  }
  return copies;
}

}  // namespace

const PreparedFp8Weight& fp8_weight(LinearContext::Impl& ctx, const float* w, int64_t N, int64_t K,
                                    cudaStream_t stream) {
  // Padded like every GEMM operand of the recipe: rows = N is Dgrad's contracted size, cols = K Fprop's.
  const int64_t rows = gemm_depth(N), cols = gemm_depth(K), TN = tiles(rows), TK = tiles(cols);
  const bool padded = rows != N || cols != K;
  Layout l;
  const size_t codes_at = l.add(static_cast<size_t>(rows * cols));
  const size_t codes_t_at = l.add(static_cast<size_t>(rows * cols));
  auto scale_bytes = [](int64_t r, int64_t c) {
    return static_cast<size_t>(fp8::cuda::cublaslt_scale_count(r, c, kTile)) * sizeof(float);
  };
  const size_t scales_at = l.add(scale_bytes(rows, cols));
  const size_t scales_t_at = l.add(scale_bytes(cols, rows));
  const size_t blocks_at = l.add(static_cast<size_t>(TN * TK) * sizeof(float));
  PreparedWeight& pw = ctx.entry(w, N, K, Precision::FP8, l.total);
  uint8_t* codes = pw.memory.as<uint8_t>(codes_at);
  uint8_t* codes_t = pw.memory.as<uint8_t>(codes_t_at);
  float* scales = pw.memory.as<float>(scales_at);
  float* scales_t = pw.memory.as<float>(scales_t_at);
  float* block_scales = pw.memory.as<float>(blocks_at);
  pw.fp8 = PreparedFp8Weight{codes, scales, codes_t, scales_t, rows, cols};
  if (pw.generation == 0) {
    if (!padded) {
      const fp8::cuda::Fp8GemmScales gs{scales, scales_t, round_up(TK, 4), 0, round_up(TN, 4), 0};
      pw.copies = {Fp8WeightCopy{w, {1, rows, cols, codes, block_scales, codes_t, {}, gs}}};
    }
    pw.finish_scales = [=](cudaStream_t s) { weight_scales(block_scales, 1, TN, TK, scales, scales_t, s); };
  }
  if (pw.generation != ctx.generation) {
    if (padded) {  // w [N, K] zero-padded to [rows, cols] in a temporary, quantized from there
      StreamScratch scratch(static_cast<size_t>(rows * cols) * sizeof(float), stream);
      pad(w, N, K, scratch.as<float>(), rows, cols, stream);
      fp8::cuda::quantize_128x128_with_transpose(scratch.as<float>(), 1, rows, cols, codes, block_scales, codes_t,
                                                 stream);
      pw.finish_scales(stream);
      scratch.release();
    } else {
      fill_from_copies(pw, stream);
    }
    pw.generation = ctx.generation;
  }
  return pw.fp8;
}

const PreparedFp8Stack& fp8_stacked_weight(LinearContext::Impl& ctx, const float* w, int64_t experts, int64_t N,
                                           int64_t K, cudaStream_t stream, int64_t w_stride) {
  // fp8_weight's per expert (no padding: N and K are multiples of 16 and >= 128), each step one launch for all.
  const int64_t TN = tiles(N), TK = tiles(K);
  const int64_t sw_stride = TN * round_up(TK, 4), st_stride = TK * round_up(TN, 4);
  Layout l;
  const size_t codes_at = l.add(static_cast<size_t>(experts * N * K));
  const size_t codes_t_at = l.add(static_cast<size_t>(experts * N * K));
  const size_t scales_at = l.add(static_cast<size_t>(experts * sw_stride) * sizeof(float));
  const size_t scales_t_at = l.add(static_cast<size_t>(experts * st_stride) * sizeof(float));
  const size_t blocks_at = l.add(static_cast<size_t>(experts * TN * TK) * sizeof(float));
  PreparedWeight& pw = ctx.entry(w, N, K, Precision::FP8, l.total, experts);
  uint8_t* codes = pw.memory.as<uint8_t>(codes_at);
  uint8_t* codes_t = pw.memory.as<uint8_t>(codes_t_at);
  float* scales = pw.memory.as<float>(scales_at);
  float* scales_t = pw.memory.as<float>(scales_t_at);
  float* block_scales = pw.memory.as<float>(blocks_at);
  pw.stack = PreparedFp8Stack{codes, scales, codes_t, scales_t, experts, N, K, sw_stride, st_stride};
  if (pw.generation == 0) {
    const fp8::cuda::Fp8GemmScales gs{scales, scales_t, round_up(TK, 4), sw_stride, round_up(TN, 4), st_stride};
    pw.copies = stacked_copies(w, w_stride, {experts, N, K, codes, block_scales, codes_t, {}, gs});
    pw.finish_scales = [=](cudaStream_t s) { weight_scales(block_scales, experts, TN, TK, scales, scales_t, s); };
  }
  if (pw.generation != ctx.generation) {
    fill_from_copies(pw, stream);
    pw.generation = ctx.generation;
  }
  return pw.stack;
}

const PreparedFp8GateUp& fp8_stacked_gate_up(LinearContext::Impl& ctx, const float* gate, const float* up,
                                             int64_t experts, int64_t I, int64_t H, cudaStream_t stream,
                                             int64_t w_stride) {
  // Per expert, Ip = I rounded up to 128: codes [2 Ip, H] (gate's rows at 0, up's at Ip) and [H, 2 Ip] (columns
  // alike), zeros between; their scales in the BLK128x128 layouts (gate_up_scales_kernel).
  const int64_t Ip = round_up(I, kTile), TH = tiles(H), TI = tiles(I);
  const int64_t fprop_stride = 2 * TI * round_up(TH, 4), dgrad_stride = TH * round_up(2 * TI, 4);
  Layout l;
  const size_t codes_at = l.add(static_cast<size_t>(experts * 2 * Ip * H));
  const size_t codes_t_at = l.add(static_cast<size_t>(experts * 2 * Ip * H));
  const size_t scales_at = l.add(static_cast<size_t>(experts * fprop_stride) * sizeof(float));
  const size_t scales_t_at = l.add(static_cast<size_t>(experts * dgrad_stride) * sizeof(float));
  const size_t blocks_at = l.add(2 * static_cast<size_t>(experts * TI * TH) * sizeof(float));
  PreparedWeight& pw = ctx.entry(gate, 2 * Ip, H, Precision::FP8, l.total, experts, up);
  uint8_t* codes = pw.memory.as<uint8_t>(codes_at);
  uint8_t* codes_t = pw.memory.as<uint8_t>(codes_t_at);
  float* scales = pw.memory.as<float>(scales_at);
  float* scales_t = pw.memory.as<float>(scales_t_at);
  float* gate_blocks = pw.memory.as<float>(blocks_at);
  float* up_blocks = gate_blocks + experts * TI * TH;
  pw.gate_up = PreparedFp8GateUp{codes, scales, codes_t, scales_t, experts, I, Ip, H, fprop_stride, dgrad_stride};
  if (pw.generation == 0) {
    // Both codes' zero pads, once: the quantizations write gate's and up's own rows and columns only, so the pads
    // stay zero through every later generation (bench-600m: 100 MB of memset a MoE layer and step fewer).
    if (Ip != I) CUDA_CHECK(cudaMemsetAsync(codes, 0, scales_at - codes_at, stream));
    const fp8::cuda::Fp8Placement at{2 * Ip * H, 2 * Ip, H * 2 * Ip};
    // gate_up_scales_kernel's layouts: gate's block rows, then up's (sw); gate's blocks, then up's, in each block row
    // of the transpose (st).
    const int64_t L4H = round_up(TH, 4), L4I = round_up(2 * TI, 4);
    const fp8::cuda::Fp8GemmScales gate_s{scales, scales_t, L4H, fprop_stride, L4I, dgrad_stride};
    const fp8::cuda::Fp8GemmScales up_s{scales + TI * L4H, scales_t + TI, L4H, fprop_stride, L4I, dgrad_stride};
    pw.copies = stacked_copies(gate, w_stride, {experts, I, H, codes, gate_blocks, codes_t, at, gate_s});
    const fp8::cuda::Fp8WeightCodes up_out{experts, I, H, codes + Ip * H, up_blocks, codes_t + Ip, at, up_s};
    for (const Fp8WeightCopy& c : stacked_copies(up, w_stride, up_out)) pw.copies.push_back(c);
    pw.finish_scales = [=](cudaStream_t s) {
      const dim3 grid(std::min<unsigned>(blocks_for(std::max(fprop_stride, dgrad_stride)), 64),
                      static_cast<unsigned>(experts));
      launch_after_previous(gate_up_scales_kernel, grid, kThreads, 0, s, gate_blocks, up_blocks, TI, TH, scales,
                            scales_t);
    };
  }
  if (pw.generation != ctx.generation) {
    fill_from_copies(pw, stream);
    pw.generation = ctx.generation;
  }
  return pw.gate_up;
}

namespace {

// a [M, N] quantized both ways in one pass (fp8::cuda::quantize_1x128_dual), a read once instead of twice: its rows
// operand [M, N] (1x128 along N: Fprop's x, Dgrad's dy) and its tokens operand aᵀ [N, M] (1x128 along M: Wgrad's
// xᵀ, dyᵀ), the bytes Fp8Activation gives each, where neither needs padding (both_ways_fit).
void quantize_both_ways(const float* a, int64_t M, int64_t N, const Fp8OperandMemory& rows,
                        const Fp8OperandMemory& tokens, cudaStream_t stream) {
  fp8::cuda::quantize_1x128_dual(a, M, N, nullptr, 0, rows.codes(), rows.scales(), tokens.codes(), tokens.scales(),
                                 stream, fp8::cuda::ScaleLayout::Cublaslt);
}

// Whether a [M, N] needs no padding as either operand (gemm_rows and gemm_depth leave M and N as they are).
bool both_ways_fit(int64_t M, int64_t N) {
  return gemm_rows(M) == M && gemm_depth(M) == M && gemm_rows(N) == N && gemm_depth(N) == N;
}

// x's operand for the Fprop [gemm_rows(M), depth], in `both` (x quantized both ways, the tokens half kept in *keep:
// keep given and x fitting) or else in `rows_only`; the caller releases whichever holds it.
Operand forward_rows(const float* x, int64_t M, int64_t K, int64_t depth, SavedInput* keep,
                     std::optional<Fp8OperandMemory>& both, std::optional<Fp8Activation>& rows_only,
                     cudaStream_t stream) {
  if (keep != nullptr && both_ways_fit(M, K) && depth == K) {
    both.emplace(M, K, stream);
    keep->impl_ = std::make_unique<SavedInput::Impl>(x, M, K, stream);
    quantize_both_ways(x, M, K, *both, keep->impl_->tokens, stream);
    return both->operand();
  }
  return rows_only.emplace(x, M, K, gemm_rows(M), depth, false, stream).operand();
}

}  // namespace

void fp8_forward(LinearContext::Impl& ctx, const float* x, const float* w, float* y, int64_t M, int64_t N, int64_t K,
                 cudaStream_t stream, SavedInput* keep) {
  const PreparedFp8Weight& pw = fp8_weight(ctx, w, N, K, stream);
  std::optional<Fp8OperandMemory> both;
  std::optional<Fp8Activation> rows_only;
  const Operand xq = forward_rows(x, M, K, pw.cols, keep, both, rows_only, stream);
  // The first gemm_rows(N) rows of the padded weight: same block rows (both round N up within its 128-block).
  const Operand wq{pw.codes, pw.scales, gemm_rows(N), pw.cols, kTile};
  gemm_into(ctx.fp8, xq, wq, y, M, N, false, stream);
  both ? both->release() : rows_only->release();
}

namespace {

// dx [M, K] = dy · w (or += with accumulate) from dy's operand [gemm_rows(M), pw.rows].
void dgrad(LinearContext::Impl& ctx, const Operand& dyq, const PreparedFp8Weight& pw, float* dx, int64_t M, int64_t K,
           bool accumulate, cudaStream_t stream) {
  const Operand wtq{pw.codes_t, pw.scales_t, gemm_rows(K), pw.rows, kTile};
  gemm_into(ctx.fp8, dyq, wtq, dx, M, K, accumulate, stream);
}

// x [M, K]'s Wgrad operand xᵀ [gemm_rows(K), gemm_depth(M)] quantized along tokens: saved's when it holds x's, else
// made into `made` (the caller releases it).
const Operand& wgrad_input(const float* x, int64_t M, int64_t K, const SavedInput* saved,
                           std::optional<Fp8Activation>& made, cudaStream_t stream) {
  if (saved != nullptr && !saved->empty()) {
    const SavedInput::Impl& s = *saved->impl_;
    if (s.x == x && s.M == M && s.K == K) return s.tokens.operand();
  }
  return made.emplace(x, M, K, gemm_depth(M), gemm_rows(K), true, stream).operand();
}

// dw [N, K] += dyᵀ · x (or = with overwrite) from dyᵀ's operand [gemm_rows(N), gemm_depth(M)] and xᵀ's.
void wgrad(LinearContext::Impl& ctx, const Operand& dytq, const Operand& xtq, float* dw, int64_t N, int64_t K,
           bool overwrite, cudaStream_t stream) {
  gemm_into(ctx.fp8, dytq, xtq, dw, N, K, !overwrite, stream);
}

// Dgrad into dx (unless null) and Wgrad into dw (unless null) from dy, with xᵀ's operand (needed with dw). Tried
// and dropped (2026-11-30): the Wgrad on a stream of its own beside the Dgrad (with its own GEMM context, joined
// before the operands' release), for the projections' Wgrads with few output tiles for their depth (kv_b 2048 x 256,
// o 1024 x 1024 over 16384 tokens): bench-600m fp8 280.4k / 275.5k / 279.4k vs 277.4k / 280.3k / 282.8k tokens/s
// in order, rounds interleaved (bench/results/2026-11-30-gpu-wgrad-beside-h200-35ecf33+beside.txt).
void backward_with(LinearContext::Impl& ctx, const float* dy, const Operand* xtq, const float* w, float* dx, float* dw,
                   int64_t M, int64_t N, int64_t K, bool accumulate_dx, bool overwrite_dw, cudaStream_t stream) {
  if (dx != nullptr && dw != nullptr && both_ways_fit(M, N)) {
    const PreparedFp8Weight& pw = fp8_weight(ctx, w, N, K, stream);
    Fp8OperandMemory rows(M, N, stream), tokens(N, M, stream);
    quantize_both_ways(dy, M, N, rows, tokens, stream);
    dgrad(ctx, rows.operand(), pw, dx, M, K, accumulate_dx, stream);
    wgrad(ctx, tokens.operand(), *xtq, dw, N, K, overwrite_dw, stream);
    tokens.release();
    rows.release();
    return;
  }
  if (dx != nullptr) {
    const PreparedFp8Weight& pw = fp8_weight(ctx, w, N, K, stream);
    Fp8Activation dyq(dy, M, N, gemm_rows(M), pw.rows, false, stream);
    dgrad(ctx, dyq.operand(), pw, dx, M, K, accumulate_dx, stream);
    dyq.release();
  }
  if (dw != nullptr) {
    Fp8Activation dytq(dy, M, N, gemm_depth(M), gemm_rows(N), true, stream);  // dyᵀ [N', tokens]
    wgrad(ctx, dytq.operand(), *xtq, dw, N, K, overwrite_dw, stream);
    dytq.release();
  }
}

}  // namespace

void fp8_backward(LinearContext::Impl& ctx, const float* dy, const float* x, const float* w, float* dx, float* dw,
                  int64_t M, int64_t N, int64_t K, bool accumulate_dx, bool overwrite_dw, cudaStream_t stream,
                  const SavedInput* saved) {
  if (dw == nullptr) return backward_with(ctx, dy, nullptr, w, dx, nullptr, M, N, K, accumulate_dx, false, stream);
  std::optional<Fp8Activation> made;
  const Operand& xt = wgrad_input(x, M, K, saved, made, stream);
  backward_with(ctx, dy, &xt, w, dx, dw, M, N, K, accumulate_dx, overwrite_dw, stream);
  if (made) made->release();
}

namespace {

// Two weights of one input lying one after the other in memory, the first's rows whole 128-row blocks (attention's
// q_proj and kv_a_proj_with_mqa as ParamStore lays them out), none of [N0 + N1, K] padded: as one matrix each of
// its 128x128 blocks is one weight's own, so one prepared copy holds both weights' codes and scales as apart. The
// indices of the first and second in memory, or none. bench-600m (q 1536, kv_a 288 rows) on the H200 against
// MOERL_LINEAR_PAIR=apart, rounds interleaved: fp8 step 291.4k / 291.1k / 294.1k vs 290.5k / 288.5k / 290.1k
// tokens/s (bench/results/2026-11-30-gpu-linear-pair-h200-9d3e319+pair.txt).
struct StackedPair {
  size_t first, second;
};
std::optional<StackedPair> stacked_pair(const float* w0, int64_t n0, const float* w1, int64_t n1, int64_t K) {
  // MOERL_LINEAR_PAIR=apart: each weight on its own (for comparing the two on the device). Read once.
  static const bool apart = env_switch("MOERL_LINEAR_PAIR", "stacked", "apart");
  if (apart) return std::nullopt;
  auto fits = [&](const float* lo, int64_t n_lo, const float* hi, int64_t n_hi) {
    return hi == lo + n_lo * K && n_lo % kTile == 0 && gemm_rows(n_lo) == n_lo && gemm_rows(n_hi) == n_hi &&
           gemm_depth(n_lo + n_hi) == n_lo + n_hi && gemm_depth(K) == K;
  };
  if (fits(w0, n0, w1, n1)) return StackedPair{0, 1};
  if (fits(w1, n1, w0, n0)) return StackedPair{1, 0};
  return std::nullopt;
}

// The stacked pair's weight [N, K] (N = N_first + N_second): rows `first` .. first + n - 1 as a Fprop operand.
Operand stacked_rows(const PreparedFp8Weight& pw, int64_t first, int64_t n) {
  const int64_t l4 = round_up(tiles(pw.cols), 4);  // the BLK128x128 layout's row of block scales (DEPS.md)
  return Operand{pw.codes + first * pw.cols, pw.scales + first / kTile * l4, n, pw.cols, kTile};
}

// Both gradients of a stacked pair as one: dy_first and dy_second quantized both ways side by side, [dy_first |
// dy_second] [M, N] (rows; each one's 1x128 tiles its own, the first's columns being whole tiles) and its transpose
// [N, M] (tokens), then dx (+)= [dy_first | dy_second] · [w_first; w_second] and [dw_first; dw_second] (+)=
// [dy_first | dy_second]ᵀ · x: one Dgrad and one Wgrad GEMM instead of two each (the second Dgrad reading and
// rewriting dx in FP32). Needs M % 128 == 0, dy 16-byte aligned rows and the gradients side by side too, written
// alike (both overwritten or both added to).
void backward_stacked(LinearContext::Impl& ctx, const LinearGradient& a, const LinearGradient& b, const Operand& xtq,
                      float* dx, int64_t M, int64_t K, bool accumulate_dx, cudaStream_t stream) {
  const int64_t N = a.N + b.N;
  const PreparedFp8Weight& pw = fp8_weight(ctx, a.w, N, K, stream);
  Layout l;
  const size_t codes_at = l.add(static_cast<size_t>(M * N)), codes_t_at = l.add(static_cast<size_t>(M * N));
  const size_t lt_at = l.add(static_cast<size_t>(fp8::cuda::cublaslt_scale_count(M, N, 1)) * sizeof(float));
  const size_t lt_t_at = l.add(static_cast<size_t>(fp8::cuda::cublaslt_scale_count(N, M, 1)) * sizeof(float));
  StreamScratch scratch(l.total, stream);
  uint8_t* codes = scratch.as<uint8_t>(codes_at);
  uint8_t* codes_t = scratch.as<uint8_t>(codes_t_at);
  float* lt = scratch.as<float>(lt_at);
  float* lt_t = scratch.as<float>(lt_t_at);
  for (const LinearGradient* g : {&a, &b}) {
    const int64_t col0 = g == &a ? 0 : a.N;
    qd::TileOutputs o;
    o.rows = M, o.cols = g->N, o.codes = codes + col0, o.codes_ld = N, o.scales = lt, o.scales_ld = tiles(N);
    o.scales_col0 = col0 / kTile, o.codes_t = codes_t, o.scales_t = lt_t, o.t_cols = N, o.t_col0 = col0;
    o.rows_lt = o.cols_lt = true;
    qd::launch_quantize_tiles<true, true>(qd::PlainSource{g->dy, g->N}, o, stream);
  }
  dgrad(ctx, Operand{codes, lt, M, N, 1}, pw, dx, M, K, accumulate_dx, stream);
  wgrad(ctx, Operand{codes_t, lt_t, N, M, 1}, xtq, a.dw, N, K, a.overwrite_dw, stream);
  scratch.release();
}

}  // namespace

void fp8_forward_shared(LinearContext::Impl& ctx, const float* x, const std::vector<LinearOutput>& outs, int64_t M,
                        int64_t K, cudaStream_t stream, SavedInput* keep) {
  std::optional<Fp8OperandMemory> both;
  std::optional<Fp8Activation> rows_only;
  const Operand xq = forward_rows(x, M, K, gemm_depth(K), keep, both, rows_only, stream);
  const std::optional<StackedPair> pair =
      outs.size() == 2 ? stacked_pair(outs[0].w, outs[0].N, outs[1].w, outs[1].N, K) : std::nullopt;
  if (pair) {  // each output from its rows of the pair's one prepared copy
    const LinearOutput &a = outs[pair->first], &b = outs[pair->second];
    const PreparedFp8Weight& pw = fp8_weight(ctx, a.w, a.N + b.N, K, stream);
    gemm_into(ctx.fp8, xq, stacked_rows(pw, 0, a.N), a.y, M, a.N, false, stream);
    gemm_into(ctx.fp8, xq, stacked_rows(pw, a.N, b.N), b.y, M, b.N, false, stream);
  } else {
    for (const LinearOutput& o : outs) {
      const PreparedFp8Weight& pw = fp8_weight(ctx, o.w, o.N, K, stream);  // pw.cols = gemm_depth(K), as x's
      const Operand wq{pw.codes, pw.scales, gemm_rows(o.N), pw.cols, kTile};
      gemm_into(ctx.fp8, xq, wq, o.y, M, o.N, false, stream);
    }
  }
  both ? both->release() : rows_only->release();
}

void fp8_backward_shared(LinearContext::Impl& ctx, const float* x, const std::vector<LinearGradient>& grads, float* dx,
                         int64_t M, int64_t K, bool accumulate_dx, cudaStream_t stream, const SavedInput* saved) {
  std::optional<Fp8Activation> made;
  const Operand* xt = &wgrad_input(x, M, K, saved, made, stream);
  std::optional<StackedPair> pair;
  if (grads.size() == 2 && M % kTile == 0 && gemm_depth(M) == M)
    pair = stacked_pair(grads[0].w, grads[0].N, grads[1].w, grads[1].N, K);
  if (pair) {
    const LinearGradient &a = grads[pair->first], &b = grads[pair->second];
    const bool fits = a.dw && b.dw && b.dw == a.dw + a.N * K && a.overwrite_dw == b.overwrite_dw && aligned16(a.dy) &&
                      aligned16(b.dy) && a.N % 4 == 0 && b.N % 4 == 0;
    if (!fits) pair.reset();
  }
  if (pair) {
    backward_stacked(ctx, grads[pair->first], grads[pair->second], *xt, dx, M, K, accumulate_dx, stream);
  } else {
    for (size_t i = 0; i < grads.size(); ++i) {
      const LinearGradient& g = grads[i];
      backward_with(ctx, g.dy, xt, g.w, dx, g.dw, M, g.N, K, accumulate_dx || i > 0, g.overwrite_dw, stream);
    }
  }
  if (made) made->release();
}

}  // namespace moerl::cuda::linear_detail

namespace moerl::cuda {

SavedInput::SavedInput() = default;
SavedInput::~SavedInput() = default;
void SavedInput::release() { impl_.reset(); }

}  // namespace moerl::cuda
