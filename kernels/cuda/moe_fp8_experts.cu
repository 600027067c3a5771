// The routed experts' FP8 GEMMs on aligned rows (kernels/cuda/moe_fp8.hpp). Per layer, each activation is quantized
// once for all experts: along features (Fprop x and h, Dgrad dy, dg and du; 1x128 tiles per row, so an expert's
// codes are a block of rows and its scales one small layout kernel away) and along tokens (Wgrad dyᵀ, hᵀ, dgᵀ, duᵀ,
// xᵀ; one kernel writes every expert's packed transposed codes, and an expert's scales are a contiguous slice of
// the whole's VEC128 layout, because its tiles start at a multiple of 128). Then one cuBLASLt call per expert and GEMM
// (fp8::cuda::gemm_nt; MoeFp8Gemm::Lanes, the default) or one grouped launch per projection for all experts
// (fp8::cuda::grouped_gemm_nt_*, MoeFp8Gemm::Grouped, which reads the CPU scale layouts directly). The weights come
// from the LinearContext's stacked FP8 copies (cuda::prepared_fp8_stacked_weight): one set of launches re-quantizes
// every expert's weight after an optimizer step, where one per expert and weight cost ~1.7 ms of host time per
// bench-600m layer (routed forward 3.22 -> 1.54 ms per layer on the H200).
//
// Fused passes (same bytes as unfused): SwiGLU forward writes h and its row codes in one kernel; dy is quantized
// both ways in one read (quantize_1x128_dual); dg and du are never stored in FP32: both are computed from one read
// of dh, g, u inside the kernel that quantizes them both ways (swiglu_backward_quantize_dual_both;
// MOERL_MOE_SWIGLU_BWD=separate: one kernel each). moe_fp8_experts_backward_combined makes the output gradient's
// rows (gating weight · dy of the token) inside that quantization, so dyp is never stored. With
// MoeFp8Experts::x_codes_t / h_codes_t the forward's passes also quantize x and h along tokens and keep the codes for
// the backward's Wgrad: x is not gathered and quantized again, h is not stored in FP32.
// Measured on the H200 (bench/results/2026-11-29-gpu-*-ca53817*): moerl bench gpu's MoE layer fwd+bwd 15.6 -> 14.9 ms
// with these and the shared expert beside the routed ones (runtime/gpu/gpu_feed_forward.cpp); switching one off:
// kept codes +0.4 ms, combined dy +0.17 ms, the pair kernel within noise.
//
// gate and up's Dgrad as one GEMM: the SwiGLU backward writes dg's and du's row codes side by side, [dg | du]
// [rows, 2 Ip] (row strides; Ip = I rounded up to 128 with zero codes between, so each half's 1x128 tiles and bytes
// are those of apart), and each expert's dx = [dg | du] · [w_gate; w_up] is one K = 2 Ip GEMM against wᵀ_gate and
// wᵀ_up's codes laid out alike (linear_detail::fp8_stacked_gate_up, remade after each weight change) instead of a
// second GEMM reading and rewriting dx in FP32. On the H200 against MOERL_MOE_DGRAD=separate, rounds interleaved:
// MoE layer fwd+bwd 12.50 vs 13.01 ms (I = 1408, bench/results/2026-11-29-gpu-sweep-dgrad-pair-*) and 12.79 vs
// 13.15 ms; bench-600m fp8 step (I = 704, padded) 212.9k vs 208.9k tokens/s (...-dgrad-padded-*; the pair was then
// copied from the stacks, since quantized in place, below).
//
// Fprop likewise (MoeFp8Experts::gate_up_side_by_side, the runtime's default with the lanes): g | u = x · [w_gate;
// w_up]ᵀ is one GEMM with N = 2 Ip into g and u side by side, [rows, 2 Ip], which the SwiGLU kernels read with that
// row stride. Both pair layouts are quantized straight into place, so gate and up are held once (no per-weight
// stacks): bench-600m fp8 step 209.5k vs 203.2k tokens/s and peak 23.97 vs 24.57 GiB against MOERL_MOE_FPROP=separate
// (which also keeps the stacks), MoE layer 12.57 vs 12.64 ms (...-sweep-fprop-pair-h200-*).
//
// gate and up's Wgrad as one GEMM (moe_fp8_wgrad_pair; ParamStore interleaves each expert's gate and up,
// MoeFp8Experts::gate_up_stride): the SwiGLU backward writes dg's and du's token codes as one [dgᵀ; duᵀ] [2 I, n] per
// expert (TileOutputs::t_cols), so [dw_gate; dw_up] = [dgᵀ; duᵀ] · xᵀᵀ is one GEMM with M = 2 I instead of two.
// bench-600m's 32 experts on the lanes: 0.350 vs 2 x 0.241 ms (540 vs 392 TFLOP/s); on the H200 against the layout
// stacked apart (53f0cb6), rounds interleaved: fp8 step 292.9k / 292.1k / 292.1k vs 285.2k / 290.3k / 290.0k
// tokens/s, MoE layer 10.70-10.92 vs 11.14-11.21 ms, the same gradient bits (cuBLASLt's sums alike here;
// bench/results/2026-11-30-gpu-wgrad-pair-h200-53f0cb6+pair.txt).
//
// g | u and dh in BF16 (MoeFp8Experts::gate_up_bf16, the runtime's default with the pair): gate and up's Fprop and
// down's Dgrad write BF16 through cuBLASLt's epilogue, the SwiGLU passes read them widened (kernels/cuda/swiglu_fp8.hpp).
// On the H200 against MOERL_MOE_GU=fp32, rounds interleaved: MoE layer 12.13 / 12.15 vs 12.48 / 12.43 ms,
// bench-600m fp8 step 218.4k / 219.4k vs 215.0k / 215.9k tokens/s, peak 23.70 vs 23.82 GiB
// (bench/results/2026-11-29-gpu-gu-bf16-*). The SwiGLU backward barely gains (1.05 ms, reading a quarter fewer bytes):
// it is not bandwidth-bound; the GEMM epilogues and the forward pass take the rest.
//
// Tried and dropped (...-sweep-dy-rows-*): the output gradient's row codes made token by token (dy read once, then
// top_k rows quantized from registers) beside a gathered pass for its token codes, instead of one gathered pass
// both ways: MoE layer 12.75 vs 12.79 ms, within noise, for a second kernel.
//
// Gathered forward: x [tokens, H]'s rows are quantized once per token and their codes copied to the expert rows
// (moe_gather_rows_fp8: the same bytes, x read once instead of top-k times); only xᵀ's codes read the gathered rows
// (fp8_quantize_tile.cuh's 128 x 64 column blocks). MoE layer fwd+bwd on the H200: quant_x 0.73 -> 0.57 ms
// (rows 0.16 + tokens 0.41), with the router's dx added in the scatter-add's pass (runtime/gpu) 14.76 -> 14.49 ms
// (bench/results/2026-11-29-gpu-moe2-run2-h200-86e0efd.*, variant beside_none).
//
// Tried and dropped (bench/results/2026-11-29-gpu-profile-h200-a033fe5-bf16-inputs.txt, code in a033fe5): the routed
// experts' x and dy rounded to BF16 (a recipe change, CPU alike), xᵀ's and dy's gathered quantizations reading BF16
// copies of x and dy written by the passes before them (half the bytes read top-k times): MoE layer 12.04-12.09 ms
// against 11.86 before, torch 17.44-17.53 in the same call. These gathered passes are bound by latency, not bytes:
// xᵀ's took 0.44 ms from BF16 against 0.37 from FP32 (8-byte loads halve the bytes in flight), dy's 0.77 against 0.79,
// and the copies cost 0.05 ms to write. Loads with a 256-byte L2 prefetch (ld.global.nc.L1::no_allocate.L2::256B,
// in 2de2a71): dy's gathered pass 0.746 against 0.785 ms, xᵀ's unchanged, the layer within noise (11.95 vs 11.91
// ms), the plain transposed quantization 1% slower (...-sweep-l2-prefetch-h200-2de2a71.txt).
//
// Tried and dropped (same files and ...-run1-h200-abb3661.*): (1) persistent forms of the quantization kernels (each
// block walking down the row tiles, prefetching the next into L2 with cp.async.bulk.prefetch.L2) for the SwiGLU, x
// and dy passes: slower (SwiGLU backward 1.47 -> 1.79 ms, forward 0.65 -> 0.85, layer 14.8 -> 15.3-15.5); (2) work
// on a stream beside the critical path while GEMMs run: xᵀ's quantization beside the rows' and the gate/up GEMMs,
// dyᵀ's beside the down Dgrad (dy then read twice), the down Wgrad beside the SwiGLU backward (lanes not joined), the
// gating weights' gradient beside with the router's backward: each alone or together 0.1-0.35 ms slower than in
// order (a kernel queued first takes the SMs, so the one meant to run beside it mostly waits, and the GEMMs slow
// down beside memory-bound passes); also with the lanes at the highest stream priority.
//
// Lanes. One expert's GEMM is small (about 1600 rows at 64 experts: 13 x 11 tiles of 128 x 128 on 132 SMs, a second
// wave nearly empty; at bench-600m's 32 experts, 16 x 6 tiles, a quarter of the SMs idle), so the experts' GEMMs run
// on 4 side streams (MOERL_MOE_LANES) forked from and joined to the caller's stream (expert e on lane e % lanes, each lane
// with its own cuBLASLt context and workspace; all calls issued from the caller's thread): the GPU overlaps one
// expert's tail with the next's. Each GEMM writes its own expert's rows or gradient, so the results do not depend on
// the overlap; an expert's dependent GEMMs (Dgrad of gate, then up accumulated into the same rows) stay on one lane,
// in order. 3, 4 and 6 lanes within noise with the Wgrad paired (bench-600m 291.1-292.5k tokens/s,
// bench/results/2026-11-30-gpu-lanes-h200-9320a16.txt).
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <vector>

#include "kernels/cuda/cuda_check.hpp"
#include "kernels/cuda/fp8_grouped_gemm.hpp"
#include "kernels/cuda/fp8_quantize_tile.cuh"
#include "kernels/cuda/linear_impl.cuh"
#include "kernels/cuda/moe_experts.hpp"
#include "kernels/cuda/moe_fp8.hpp"
#include "kernels/cuda/phase_timer.hpp"
#include "kernels/cuda/stream_scratch.hpp"
#include "kernels/cuda/swiglu.hpp"
#include "kernels/cuda/swiglu_fp8.hpp"
#include "kernels/fp8.hpp"
#include "kernels/fp8_gemm.hpp"
#include "kernels/fp8_quantize.hpp"
#include "runtime/error.hpp"
#include "runtime/util/env_switch.hpp"

namespace moerl::cuda {
namespace {

using cuda_detail::align256;
using cuda_detail::StreamScratch;
using fp8::kTile;
using fp8::tiles;
using fp8::cuda::Operand;
using fp8::cuda::OutType;

size_t bytes_of(int64_t n, size_t each) { return align256(static_cast<size_t>(n) * each); }

// An activation [rows, d] quantized in 1x128 tiles along d: codes [rows, d] and every expert's VEC128 scales.
// Made from src by quantize_1x128, or (null src) left for a fused kernel to fill codes() and cpu_scales(), then
// finish().
class RowsFp8 {
 public:
  // lt: also build every expert's cuBLASLt scale layout in finish() (the Lanes path; the grouped GEMM reads the
  // CPU layout).
  RowsFp8(const float* src, int64_t rows, int64_t d, const int64_t* aligned, int64_t experts, bool lt,
          cudaStream_t stream)
      : rows_(rows), d_(d), t_(tiles(d)), experts_(experts), aligned_(aligned), lt_layout_(lt), stream_(stream),
        scratch_(bytes_of(rows * d, 1) + 2 * bytes_of(rows * tiles(d), sizeof(float)), stream) {
    codes_ = scratch_.as<uint8_t>();
    cpu_scales_ = scratch_.as<float>(bytes_of(rows * d, 1));
    lt_ = scratch_.as<float>(bytes_of(rows * d, 1) + bytes_of(rows * t_, sizeof(float)));
    if (src != nullptr) {
      fp8::cuda::quantize_1x128(src, rows, d, codes_, cpu_scales_, stream);
      finish();
    }
  }
  uint8_t* codes() const { return codes_; }
  float* cpu_scales() const { return cpu_scales_; }  // [rows, tiles(d)], quantize_1x128's layout
  void finish() {
    if (lt_layout_) moe_grouped_vec128_scales(cpu_scales_, aligned_, experts_, rows_, t_, lt_, stream_);
  }
  // Where a kernel writing the GEMM's own layout puts the scales instead (TileOutputs::rows_lt = lt(), groups by
  // the aligned offsets): cuBLASLt's when lt, else the CPU's; then no finish().
  float* gemm_scales() const { return lt_layout_ ? lt_ : cpu_scales_; }
  bool lt() const { return lt_layout_; }
  // Rows first .. first + n - 1 (one expert's): [n, d].
  Operand expert(int64_t first, int64_t n) const { return Operand{codes_ + first * d_, lt_ + first * t_, n, d_, 1}; }
  void release() { scratch_.release(); }

 private:
  int64_t rows_, d_, t_, experts_;
  const int64_t* aligned_;
  bool lt_layout_;
  cudaStream_t stream_;
  StreamScratch scratch_;
  uint8_t* codes_ = nullptr;
  float *cpu_scales_ = nullptr, *lt_ = nullptr;
};

// An activation [rows, d] quantized in 1x128 tiles along rows (tokens): every expert's codes [d, n] packed at
// first · d (quantize_1x128_transposed_grouped) and the VEC128 scales of the whole, [tiles(rows), d], in which
// every expert's tiles are a contiguous slice. Made from src, or (null src) filled by a fused kernel, then finish().
class TokensFp8 {
 public:
  TokensFp8(const float* src, int64_t rows, int64_t d, const int64_t* aligned, int64_t experts, bool lt,
            cudaStream_t stream)
      : rows_(rows), d_(d), lt_layout_(lt), stream_(stream),
        scratch_(bytes_of(rows * d, 1) + 2 * bytes_of(d * tiles(rows), sizeof(float)), stream) {
    codes_ = scratch_.as<uint8_t>();
    cpu_scales_ = scratch_.as<float>(bytes_of(rows * d, 1));
    lt_ = scratch_.as<float>(bytes_of(rows * d, 1) + bytes_of(d * tiles(rows), sizeof(float)));
    if (src != nullptr)
      fp8::cuda::quantize_1x128_transposed_grouped(src, rows, d, aligned, experts, codes_, gemm_scales(), stream,
                                                   lt ? fp8::cuda::ScaleLayout::Cublaslt : fp8::cuda::ScaleLayout::Cpu);
  }
  // Over codes and scales made earlier (MoeFp8Experts::x_codes_t / x_scales_t): only the cuBLASLt layout is made.
  TokensFp8(uint8_t* codes, float* cpu_scales, int64_t rows, int64_t d, bool lt, cudaStream_t stream)
      : rows_(rows), d_(d), lt_layout_(lt), stream_(stream), scratch_(bytes_of(d * tiles(rows), sizeof(float)), stream) {
    codes_ = codes;
    cpu_scales_ = cpu_scales;
    lt_ = scratch_.as<float>();
    finish();
  }
  uint8_t* codes() const { return codes_; }
  float* cpu_scales() const { return cpu_scales_; }  // [d, tiles(rows)], quantize_1x128_transposed's layout
  void finish() {
    if (lt_layout_) fp8::cuda::scales_to_cublaslt(cpu_scales_, d_, rows_, 1, lt_, stream_);
  }
  // As RowsFp8::gemm_scales (TileOutputs::cols_lt = lt()).
  float* gemm_scales() const { return lt_layout_ ? lt_ : cpu_scales_; }
  bool lt() const { return lt_layout_; }
  // Tokens first .. first + n - 1 (first a multiple of 128): [d, n].
  Operand expert(int64_t first, int64_t n) const {
    return Operand{codes_ + first * d_, lt_ + first / kTile * d_, d_, n, 1};
  }
  void release() { scratch_.release(); }

 private:
  int64_t rows_, d_;
  bool lt_layout_;
  cudaStream_t stream_;
  StreamScratch scratch_;
  uint8_t* codes_ = nullptr;
  float *cpu_scales_ = nullptr, *lt_ = nullptr;
};

// src [rows, d] quantized both ways in one pass (quantize_1x128_dual): rows.codes / tokens.codes.
void quantize_both(const float* src, int64_t rows, int64_t d, const int64_t* aligned, int64_t experts,
                   RowsFp8& by_rows, TokensFp8& by_tokens, cudaStream_t stream) {
  fp8::cuda::quantize_1x128_dual(src, rows, d, aligned, experts, by_rows.codes(), by_rows.cpu_scales(),
                                 by_tokens.codes(), by_tokens.cpu_scales(), stream);
  by_rows.finish();
  by_tokens.finish();
}

// The experts' input row r: x[token_of[r], :], or zeros where token_of[r] < 0 (moe_gather_or_zero's xp, never
// written). Plain loads: each token is read by its top-k rows, which L2 may still hold.
struct GatherSource {
  const float* x;
  const int64_t* token_of;
  int64_t cols;
  static constexpr bool kLoadAhead = true;
  struct Raw {
    float4 v;
    bool ok;
  };
  __device__ __forceinline__ Raw load(int64_t r, int64_t c) const {  // x's row 0 where there is no token (unused)
    const int64_t t = token_of[r];
    return {__ldg(reinterpret_cast<const float4*>(x + (t < 0 ? 0 : t) * cols + c)), t >= 0};
  }
  __device__ __forceinline__ float4 value(const Raw& raw, int64_t, int64_t, bool in) const {
    return in && raw.ok ? raw.v : fp8::cuda::quant_detail::zero4();
  }
};

// The routed experts' output gradient row r: w_r · dy[token_of[r], :] (moe_combine_backward's product, rounded
// once), or zeros where token_of[r] < 0 (moe_fp8_experts_backward_combined's dyp, never written).
struct ScaledGatherSource {
  const float* dy;
  const int64_t* token_of;
  const float* row_weight;
  int64_t cols;
  static constexpr bool kLoadAhead = true;
  struct Raw {
    float4 v;
    float w;
    bool ok;
  };
  __device__ __forceinline__ Raw load(int64_t r, int64_t c) const {  // dy's row 0 where there is no token (unused)
    const int64_t t = token_of[r];
    return {__ldg(reinterpret_cast<const float4*>(dy + (t < 0 ? 0 : t) * cols + c)), row_weight[r], t >= 0};
  }
  __device__ __forceinline__ float4 value(const Raw& raw, int64_t, int64_t, bool in) const {
    if (!(in && raw.ok)) return fp8::cuda::quant_detail::zero4();
    const float w = raw.w;
    return make_float4(__fmul_rn(w, raw.v.x), __fmul_rn(w, raw.v.y), __fmul_rn(w, raw.v.z), __fmul_rn(w, raw.v.w));
  }
};

void check_gather(const char* fn, const float* x, const int64_t* token_of, int64_t rows, int64_t H) {
  require(x != nullptr && token_of != nullptr && reinterpret_cast<uintptr_t>(x) % 16 == 0 && H % 4 == 0 &&
              rows / kTile <= 65535,
          [&] {
            return std::string("cuda::") + fn +
                   ": needs x and token_of set, x 16-byte aligned, H a multiple of 4 and at most " + "128 x 65535 rows";
          });
}

// The experts' input rows quantized along features (Fprop): from xp (with w.x_codes_t set, along tokens too, kept
// for the backward's Wgrad, in the same pass), or from x [tokens, H]: every token's row once, then each aligned
// row's codes and scales copied from its token's (a row's 1x128 tiles depend on that row alone, so these are the
// gathered rows' bytes; x is read once instead of top-k times).
void quantize_input_rows(const MoeFp8Experts& w, const float* xp, const float* x, int64_t tokens,
                         const int64_t* token_of, int64_t rows, int64_t H, const int64_t* aligned, RowsFp8& q,
                         cudaStream_t stream) {
  if (xp != nullptr && w.x_codes_t != nullptr) {
    fp8::cuda::quantize_1x128_dual(xp, rows, H, aligned, w.experts, q.codes(), q.cpu_scales(), w.x_codes_t,
                                   w.x_scales_t, stream);
  } else if (xp != nullptr) {
    fp8::cuda::quantize_1x128(xp, rows, H, q.codes(), q.cpu_scales(), stream);
  } else {
    StreamScratch tq(bytes_of(tokens * H, 1) + bytes_of(tokens * tiles(H), sizeof(float)), stream);
    uint8_t* token_codes = tq.as<uint8_t>();
    float* token_scales = tq.as<float>(bytes_of(tokens * H, 1));
    fp8::cuda::quantize_1x128(x, tokens, H, token_codes, token_scales, stream);
    moe_gather_rows_fp8(token_codes, token_scales, token_of, rows, H, q.codes(), q.gemm_scales(), stream,
                        q.lt() ? aligned : nullptr, w.experts);
    tq.release();
    return;  // the scales are in the GEMM's layout already
  }
  q.finish();
}

// The gathered input rows x[token_of[r], :] quantized along tokens (Wgrad's xᵀ, every expert's codes packed) into
// codes_t / scales_t, the row tiles in the order of tile_order (MoeFp8Experts::row_tile_order; null: in order).
void quantize_gathered_tokens(const float* x, const int64_t* token_of, int64_t rows, int64_t H,
                              const int64_t* aligned, int64_t experts, const int32_t* tile_order, uint8_t* codes_t,
                              float* scales_t, cudaStream_t stream, bool lt_scales = false) {
  fp8::cuda::quant_detail::TileOutputs o;
  o.rows = rows, o.cols = H, o.codes_t = codes_t, o.scales_t = scales_t, o.bounds = aligned, o.n_groups = experts;
  o.cols_lt = lt_scales, o.row_tile_order = tile_order;
  fp8::cuda::quant_detail::launch_quantize_tiles<false, true, GatherSource, 64>(GatherSource{x, token_of, H}, o,
                                                                                stream);
}

// The experts' input rows quantized along tokens (Wgrad), every expert's codes packed (as TokensFp8).
void quantize_input_tokens(const float* xp, const float* x, const int64_t* token_of, int64_t rows, int64_t H,
                           const int64_t* aligned, int64_t experts, const int32_t* tile_order, TokensFp8& q,
                           cudaStream_t stream) {
  if (xp != nullptr)
    fp8::cuda::quantize_1x128_transposed_grouped(xp, rows, H, aligned, experts, q.codes(), q.gemm_scales(), stream,
                                                 q.lt() ? fp8::cuda::ScaleLayout::Cublaslt : fp8::cuda::ScaleLayout::Cpu);
  else
    quantize_gathered_tokens(x, token_of, rows, H, aligned, experts, tile_order, q.codes(), q.gemm_scales(), stream,
                             q.lt());
}

// Expert weight w [n, k] (n, k multiples of 16, >= 128: no padding): Fprop's operand w and Dgrad's wᵀ.
struct ExpertWeight {
  Operand w, wt;
};

ExpertWeight expert_weight(const PreparedFp8Stack& s, int64_t e) {
  const int64_t n = s.rows, k = s.cols;
  return {Operand{s.codes + e * n * k, s.scales + e * s.scales_stride, n, k, kTile},
          Operand{s.codes_t + e * n * k, s.scales_t + e * s.scales_t_stride, k, n, kTile}};
}

// MOERL_MOE_SWIGLU_BWD=separate: dg and du quantized by two kernels (each reading dh and g) instead of one; for
// comparing the two on the device. Read once per process.
bool separate_swiglu_backward() {
  static const bool separate = env_switch("MOERL_MOE_SWIGLU_BWD", "fused", "separate");
  return separate;
}

// MOERL_MOE_DGRAD=separate: gate and up's Dgrad as two GEMMs per expert (the second accumulating into dx) instead of
// one over [dg | du] (the default, "pair"); for comparing the two on the device. Read once.
bool separate_gate_up_dgrad() {
  static const bool separate = env_switch("MOERL_MOE_DGRAD", "pair", "separate");
  return separate;
}

// MOERL_MOE_WGRAD=separate: gate's and up's Wgrad as two GEMMs per expert even where they are interleaved (one
// GEMM over [dg | du]ᵀ, "pair", the default there); for comparing the two on the device. Read once.
bool separate_gate_up_wgrad() {
  static const bool separate = env_switch("MOERL_MOE_WGRAD", "pair", "separate");
  return separate;
}

constexpr int kMaxLanes = 8;

// How many lanes: MOERL_MOE_LANES (1 .. 8), read once per process; 4 when unset.
int lane_count() {
  static const int n = [] {
    const char* v = std::getenv("MOERL_MOE_LANES");
    if (v == nullptr || *v == '\0') return 4;
    const int k = std::atoi(v);
    if (k < 1 || k > kMaxLanes) throw Error(std::string("MOERL_MOE_LANES must be 1 .. 8, got ") + v);
    return k;
  }();
  return n;
}

class Lanes {
 public:
  Lanes() : n_(lane_count()) {
    CUDA_CHECK(cudaEventCreateWithFlags(&fork_, cudaEventDisableTiming));
    for (int i = 0; i < n_; ++i) {
      CUDA_CHECK(cudaStreamCreateWithFlags(&streams_[i], cudaStreamNonBlocking));
      CUDA_CHECK(cudaEventCreateWithFlags(&done_[i], cudaEventDisableTiming));
      contexts_[i] = std::make_unique<fp8::cuda::GemmContext>();
    }
  }
  // Calls gemm(e, first_row, rows, lane_stream, lane_context) for every non-empty expert on its lane, after all
  // work queued on `stream` so far; `stream` then waits for every lane. Every call is issued from the caller's
  // thread: per-lane host threads were measured to gain nothing (16.77 vs 16.5 ms per MoE layer; again at f7e7773,
  // 11.94 vs 11.89 ms and bench-600m 217.0k vs 216.7k tokens/s, bench/results/2026-11-29-gpu-sweep-lane-threads-*),
  // although one cuBLASLt call takes ~12 us of host time. Serialized between callers.
  template <class F>
  void run(const int64_t* aligned_host, int64_t experts, cudaStream_t stream, F&& gemm) {
    const std::lock_guard caller(run_mutex_);
    // Only the lanes that get experts are forked and joined: a one-expert call (an FP8 dense block or shared expert,
    // which may run on a stream beside the routed experts') holds up no other lane.
    const int used = static_cast<int>(std::min<int64_t>(n_, experts));
    CUDA_CHECK(cudaEventRecord(fork_, stream));
    for (int i = 0; i < used; ++i) CUDA_CHECK(cudaStreamWaitEvent(streams_[i], fork_, 0));
    // Issued expert by expert, round robin over the lanes, so that every lane has work queued early (issuing one
    // lane's experts after another's left the last lanes idle while the host queued the first's). Issuing the
    // largest experts first, each to the lane with the fewest rows so far, measured within noise and was not kept
    // (MoE layer 11.88-11.96 vs 11.86-11.92 ms, bench/results/2026-11-30-gpu-sweep-lane-order-h200-d1a4666.txt).
    for (int64_t e = 0; e < experts; ++e) {
      const int64_t r0 = aligned_host[e], n = aligned_host[e + 1] - r0;
      const int lane = static_cast<int>(e % n_);
      if (n > 0) gemm(e, r0, n, streams_[lane], *contexts_[lane]);
    }
    for (int i = 0; i < used; ++i) {
      CUDA_CHECK(cudaEventRecord(done_[i], streams_[i]));
      CUDA_CHECK(cudaStreamWaitEvent(stream, done_[i], 0));
    }
  }

 private:
  int n_;
  std::mutex run_mutex_;
  cudaEvent_t fork_ = nullptr;
  cudaEvent_t done_[kMaxLanes] = {};
  cudaStream_t streams_[kMaxLanes] = {};
  std::unique_ptr<fp8::cuda::GemmContext> contexts_[kMaxLanes];
};

// The current device's lanes, made on first use and kept for the life of the process (never destroyed: their
// streams must not outlive the CUDA runtime's teardown at exit).
Lanes& lanes() {
  static std::mutex mutex;
  static std::map<int, Lanes*> per_device;
  int device = 0;
  CUDA_CHECK(cudaGetDevice(&device));
  const std::lock_guard lock(mutex);
  Lanes*& l = per_device[device];
  if (l == nullptr) l = new Lanes();
  return *l;
}

// Every expert's operands in the stacked FP8 copies.
std::vector<ExpertWeight> expert_weights(const PreparedFp8Stack& s) {
  std::vector<ExpertWeight> out;
  out.reserve(static_cast<size_t>(s.experts));
  for (int64_t e = 0; e < s.experts; ++e) out.push_back(expert_weight(s, e));
  return out;
}

using fp8::cuda::GroupedProblem;
using fp8::cuda::GroupedTerm;

GroupedTerm rows_term(const RowsFp8& a, const uint8_t* b, const float* b_scales, int64_t k) {
  return GroupedTerm{a.codes(), a.cpu_scales(), b, b_scales, k};
}

GroupedTerm tokens_term(const TokensFp8& a, const TokensFp8& b) {
  return GroupedTerm{a.codes(), a.cpu_scales(), b.codes(), b.cpu_scales(), 0};
}

// pr's output: y as FP32, or (bf16) as BF16 bit patterns.
void set_output(GroupedProblem& pr, void* y, bool bf16) {
  if (bf16)
    pr.y_bf16 = static_cast<uint16_t*>(y);
  else
    pr.y = static_cast<float*>(y);
}

void check(const char* fn, const MoeFp8Experts& w, const int64_t* aligned_host, const int64_t* aligned) {
  require(w.experts > 0 && moe_fp8_experts_supported(w.hidden, w.inter), [&] {
    return std::string("cuda::") + fn +
           ": needs experts > 0 and hidden, inter multiples of 16 and >= 128, got E=" + std::to_string(w.experts) +
           ", H=" + std::to_string(w.hidden) + ", I=" + std::to_string(w.inter);
  });
  require(w.gate && w.up && w.down && aligned_host && aligned,
          [&] { return std::string("cuda::") + fn + ": null pointer"; });
  require(
      (w.x_codes_t == nullptr) == (w.x_scales_t == nullptr) && (w.h_codes_t == nullptr) == (w.h_scales_t == nullptr),
      [&] {
        return std::string("cuda::") + fn +
               ": x_codes_t and x_scales_t (h_codes_t and h_scales_t) must be set together";
      });
  for (int64_t e = 0; e < w.experts; ++e)
    if (aligned_host[e] % kMoeRowAlign != 0 || aligned_host[e + 1] < aligned_host[e])
      throw Error(std::string("cuda::") + fn + ": aligned offsets must rise in multiples of 128 (expert " +
                  std::to_string(e) + ")");
}

// g and u side by side (MoeFp8Experts::gate_up_side_by_side) need the Lanes form, u = g + Ip and the fused SwiGLU
// kernels (the unfused ones take packed rows).
void check_side_by_side(const char* fn, const MoeFp8Experts& w, bool grouped, const float* g, const float* u,
                        int64_t rows) {
  if (w.gate_up_bf16 != nullptr) {
    require(moe_fp8_gate_up_bf16_supported(w) && reinterpret_cast<uintptr_t>(w.gate_up_bf16) % 16 == 0, [&] {
      return std::string("cuda::") + fn +
             ": gate_up_bf16 needs gate_up_side_by_side, the lanes GEMM form, the fused "
             "SwiGLU backward and the pair Dgrad (MOERL_MOE_GEMM, MOERL_MOE_SWIGLU_BWD, MOERL_MOE_DGRAD unset) and a "
             "16-byte aligned buffer";
    });
    return;
  }
  if (!w.gate_up_side_by_side) return;
  const int64_t ld = moe_fp8_gate_up_ld(w);
  require(!grouped && u == g + ld / 2 && swiglu_fp8_supported(rows, w.inter, g, u, nullptr), [&] {
    return std::string("cuda::") + fn + ": gate_up_side_by_side needs the lanes GEMM form (MOERL_MOE_GEMM), u = g + " +
           std::to_string(ld / 2) + " and g 16-byte aligned";
  });
}

// The stages of one call for MOERL_GPU_PROFILE (kernels/cuda/phase_timer.hpp): next("x") ends the current stage
// and starts "moe_fp8.e<E>.<pass>.x"; nothing is built unless profiling.
cuda_detail::PhaseSequence stages(int64_t experts, const char* pass, cudaStream_t stream) {
  return cuda_detail::PhaseSequence(
      cuda_detail::profiling() ? "moe_fp8.e" + std::to_string(experts) + "." + pass : std::string(), stream);
}

// One expert's Dgrad, then its Wgrad, on the lanes; when profiling, every Dgrad first and then, as stage
// `wgrad_stage`, every Wgrad, so that each GEMM kind is timed on its own (one more join).
template <class Dgrad, class Wgrad>
void run_dgrad_wgrad(cuda_detail::PhaseSequence& st, const char* wgrad_stage, const int64_t* aligned_host, int64_t experts,
                     cudaStream_t stream, const Dgrad& dgrad, const Wgrad& wgrad) {
  if (cuda_detail::profiling()) {
    lanes().run(aligned_host, experts, stream, dgrad);
    st.next(wgrad_stage);
    lanes().run(aligned_host, experts, stream, wgrad);
    return;
  }
  lanes().run(aligned_host, experts, stream,
              [&](int64_t e, int64_t r0, int64_t n, cudaStream_t s, fp8::cuda::GemmContext& gc) {
                dgrad(e, r0, n, s, gc);
                wgrad(e, r0, n, s, gc);
              });
}

}  // namespace

MoeFp8Gemm moe_fp8_gemm(MoeFp8Gemm requested) {
  if (requested != MoeFp8Gemm::Default) return requested;
  static const MoeFp8Gemm from_env =
      env_switch("MOERL_MOE_GEMM", "lanes", "grouped") ? MoeFp8Gemm::Grouped : MoeFp8Gemm::Lanes;
  return from_env;
}

bool moe_fp8_experts_supported(int64_t hidden, int64_t inter) {
  return hidden >= 128 && inter >= 128 && hidden % 16 == 0 && inter % 16 == 0;
}

int64_t moe_fp8_gate_up_padded(int64_t inter) { return (inter + kTile - 1) / kTile * kTile; }

bool moe_fp8_gate_up_bf16_supported(const MoeFp8Experts& w) {
  return w.gate_up_side_by_side && moe_fp8_gemm(w.gemm) == MoeFp8Gemm::Lanes && !separate_gate_up_dgrad() &&
         !separate_swiglu_backward() && w.inter % 8 == 0;
}

int64_t moe_fp8_gate_up_stride(const MoeFp8Experts& w) {
  return w.gate_up_stride != 0 ? w.gate_up_stride : w.inter * w.hidden;
}

bool moe_fp8_wgrad_pair(const MoeFp8Experts& w) {
  const int64_t each = w.inter * w.hidden;
  // One expert (a dense layer): gate and up adjacent is enough, there is no next expert to stride to.
  const bool interleaved = w.experts == 1 || w.gate_up_stride == 2 * each;
  return interleaved && w.up == w.gate + each && w.up_grad == w.gate_grad + each &&
         moe_fp8_gemm(w.gemm) == MoeFp8Gemm::Lanes && !separate_gate_up_dgrad() && !separate_swiglu_backward() &&
         !separate_gate_up_wgrad();
}

int64_t moe_fp8_gate_up_ld(const MoeFp8Experts& w) {
  return w.gate_up_side_by_side ? 2 * moe_fp8_gate_up_padded(w.inter) : w.inter;
}

namespace {

// An expert's Wgrad into its FP32 gradient: added (beta = 1), or written (w.overwrite_grads).
void wgrad_into(fp8::cuda::GemmContext& gc, const MoeFp8Experts& w, const Operand& a, const Operand& b, float* grad,
                cudaStream_t stream) {
  if (w.overwrite_grads)
    fp8::cuda::gemm_nt(gc, a, b, grad, OutType::FP32, stream);
  else
    fp8::cuda::gemm_nt_accumulate(gc, a, b, grad, stream);
}

// With w.overwrite_grads, the gradients of the experts that get no rows (no Wgrad writes them) set to zero.
void zero_grads_without_rows(const MoeFp8Experts& w, const int64_t* aligned_host, cudaStream_t stream) {
  zero_expert_grads(w.gate_grad, w.up_grad, w.down_grad, w.experts, w.inter, w.hidden, aligned_host, stream,
                    moe_fp8_gate_up_stride(w));
}

// moe_fp8_experts_forward from xp, or (xp null) gathered from x [tokens, H] by token_of.
void experts_forward(LinearContext& ctx, const MoeFp8Experts& w, const float* xp, const float* x, int64_t tokens,
                     const int64_t* token_of, const int64_t* aligned_host, const int64_t* aligned, float* g, float* u,
                     float* h, void* yp, OutType yp_type, cudaStream_t stream) {
  check("moe_fp8_experts_forward", w, aligned_host, aligned);
  const int64_t E = w.experts, H = w.hidden, I = w.inter, rows = aligned_host[E];
  if (rows == 0) return;
  const bool gu16 = w.gate_up_bf16 != nullptr;  // g | u in BF16 (then g and u unused)
  require((gu16 || (g && u)) && (h || w.h_codes_t) && yp, "cuda::moe_fp8_experts_forward: null activation pointer");
  if (xp == nullptr) {
    check_gather("moe_fp8_experts_forward(_gathered): xp or x", x, token_of, rows, H);
    require(tokens > 0, "cuda::moe_fp8_experts_forward_gathered: needs tokens > 0");
  }
  LinearContext::Impl& c = ctx.impl();
  c.check_device("cuda::moe_fp8_experts_forward");
  const bool grouped = moe_fp8_gemm(w.gemm) == MoeFp8Gemm::Grouped;
  const bool side = w.gate_up_side_by_side;
  const int64_t gld = moe_fp8_gate_up_ld(w);  // g and u's row stride
  check_side_by_side("moe_fp8_experts_forward", w, grouped, g, u, rows);

  cuda_detail::PhaseSequence st = stages(E, "fwd", stream);
  st.next("weights");
  // Side by side: gate and up from the pair's copy (the backward's too); else each weight's own.
  const int64_t gs = moe_fp8_gate_up_stride(w);
  const PreparedFp8GateUp* gu =
      side ? &linear_detail::fp8_stacked_gate_up(c, w.gate, w.up, E, I, H, stream, gs) : nullptr;
  PreparedFp8Stack sg{}, su{};
  if (!side) {
    sg = linear_detail::fp8_stacked_weight(c, w.gate, E, I, H, stream, gs);
    su = linear_detail::fp8_stacked_weight(c, w.up, E, I, H, stream, gs);
  }
  const PreparedFp8Stack sd = linear_detail::fp8_stacked_weight(c, w.down, E, H, I, stream);
  st.next("quant_x");
  // Gathered with xᵀ kept: xᵀ's codes from the gathered rows, the rows' codes from each token's.
  if (xp == nullptr && w.x_codes_t != nullptr) {
    const cuda_detail::PhaseTimer t(cuda_detail::profiling() ? "moe_fp8.e" + std::to_string(E) + ".fwd.quant_x_tokens"
                                                             : std::string(),
                                    stream);
    quantize_gathered_tokens(x, token_of, rows, H, aligned, E, w.row_tile_order, w.x_codes_t, w.x_scales_t, stream);
  }
  RowsFp8 xq(nullptr, rows, H, aligned, E, !grouped, stream);
  quantize_input_rows(w, xp, x, tokens, token_of, rows, H, aligned, xq, stream);
  st.next("gemm_gate_up");
  if (grouped) {
    GroupedProblem pr[2];
    pr[0].terms[0] = rows_term(xq, sg.codes, sg.scales, H), pr[0].y = g;
    pr[1].terms[0] = rows_term(xq, su.codes, su.scales, H), pr[1].y = u;
    fp8::cuda::grouped_gemm_nt_rows(pr, 2, aligned, E, rows, I, stream);
  } else if (side) {  // g | u = x · [w_gate; w_up]ᵀ, one GEMM (N = 2 Ip) per expert
    lanes().run(aligned_host, E, stream,
                [&](int64_t e, int64_t r0, int64_t n, cudaStream_t s, fp8::cuda::GemmContext& gc) {
                  const int64_t n2 = 2 * gu->padded;  // [w_gate; w_up]'s rows
                  const Operand wgu{gu->codes + e * n2 * H, gu->scales + e * gu->scales_stride, n2, H, kTile};
                  if (gu16)
                    fp8::cuda::gemm_nt(gc, xq.expert(r0, n), wgu, w.gate_up_bf16 + r0 * gld, OutType::BF16, s);
                  else
                    fp8::cuda::gemm_nt(gc, xq.expert(r0, n), wgu, g + r0 * gld, OutType::FP32, s);
                });
  } else {
    const std::vector<ExpertWeight> wg = expert_weights(sg), wu = expert_weights(su);
    lanes().run(aligned_host, E, stream,
                [&](int64_t e, int64_t r0, int64_t n, cudaStream_t s, fp8::cuda::GemmContext& gc) {
                  const Operand x = xq.expert(r0, n);
                  fp8::cuda::gemm_nt(gc, x, wg[e].w, g + r0 * I, OutType::FP32, s);
                  fp8::cuda::gemm_nt(gc, x, wu[e].w, u + r0 * I, OutType::FP32, s);
                });
  }
  xq.release();
  st.next("swiglu_quant_h");
  RowsFp8 hq(nullptr, rows, I, aligned, E, !grouped, stream);
  const bool keep_h = w.h_codes_t != nullptr;
  // The fused kernels that quantize h both ways write its rows' scales in the GEMM's layout (hᵀ's stay the CPU's:
  // MoeFp8Experts::h_scales_t); the others leave hq.finish() to do it.
  const Fp8Dual h_both{hq.codes(), hq.gemm_scales(), w.h_codes_t, w.h_scales_t, 0, 0, hq.lt()};
  bool h_in_gemm_layout = false;
  if (gu16) {
    const uint16_t* g16 = w.gate_up_bf16;
    if (keep_h)
      swiglu_forward_quantize_dual(g16, g16 + gld / 2, rows, I, gld, h, aligned, E, h_both, stream);
    else
      swiglu_forward_quantize_1x128(g16, g16 + gld / 2, rows, I, gld, h, hq.codes(), hq.cpu_scales(), stream);
    h_in_gemm_layout = keep_h;
  } else if (keep_h && swiglu_fp8_supported(rows, I, g, u, h)) {
    swiglu_forward_quantize_dual(g, u, rows, I, gld, h, aligned, E, h_both, stream);
    h_in_gemm_layout = true;
  } else if (keep_h) {  // h through a temporary
    require(!side, "cuda::moe_fp8_experts_forward: g and u side by side need the fused SwiGLU kernels");
    StreamScratch ht(bytes_of(rows * I, sizeof(float)), stream);
    float* hh = h != nullptr ? h : ht.as<float>();
    swiglu_forward(g, u, hh, rows * I, stream);
    fp8::cuda::quantize_1x128_dual(hh, rows, I, aligned, E, hq.codes(), hq.cpu_scales(), w.h_codes_t, w.h_scales_t,
                                   stream);
    ht.release();
  } else if (swiglu_fp8_supported(rows, I, g, u, h)) {
    swiglu_forward_quantize_1x128(g, u, rows, I, gld, h, hq.codes(), hq.cpu_scales(), stream);
  } else {
    require(!side, "cuda::moe_fp8_experts_forward: g and u side by side need the fused SwiGLU kernels");
    swiglu_forward(g, u, h, rows * I, stream);
    fp8::cuda::quantize_1x128(h, rows, I, hq.codes(), hq.cpu_scales(), stream);
  }
  if (!h_in_gemm_layout) hq.finish();
  st.next("gemm_down");
  const bool yp_bf16 = yp_type == OutType::BF16;
  if (grouped) {
    GroupedProblem pr;
    pr.terms[0] = rows_term(hq, sd.codes, sd.scales, I);
    set_output(pr, yp, yp_bf16);
    fp8::cuda::grouped_gemm_nt_rows(&pr, 1, aligned, E, rows, H, stream);
  } else {
    const std::vector<ExpertWeight> wd = expert_weights(sd);
    const int64_t yp_bytes = yp_bf16 ? 2 : 4;
    lanes().run(aligned_host, E, stream,
                [&](int64_t e, int64_t r0, int64_t n, cudaStream_t s, fp8::cuda::GemmContext& gc) {
                  fp8::cuda::gemm_nt(gc, hq.expert(r0, n), wd[e].w, static_cast<uint8_t*>(yp) + r0 * H * yp_bytes,
                                     yp_type, s);
                });
  }
  hq.release();
}

// The output gradient of the experts' rows: dyp [rows, H], or (dyp null) row_weight[r] · dy[token_of[r], :].
struct DySource {
  const float* dyp = nullptr;
  const float* dy = nullptr;
  const float* row_weight = nullptr;
};

// moe_fp8_experts_backward from xp, or (xp null) gathered from x by token_of; dy as DySource.
void experts_backward(LinearContext& ctx, const MoeFp8Experts& w, const DySource& dys, const float* xp, const float* x,
                      const int64_t* token_of, const float* g, const float* u, const float* h,
                      const int64_t* aligned_host, const int64_t* aligned, void* dxp_out, OutType dxp_type,
                      cudaStream_t stream) {
  check("moe_fp8_experts_backward", w, aligned_host, aligned);
  const int64_t E = w.experts, H = w.hidden, I = w.inter, rows = aligned_host[E];
  if (w.overwrite_grads) {
    require(w.gate_grad && w.up_grad && w.down_grad, "cuda::moe_fp8_experts_backward: null gradient pointer");
    zero_grads_without_rows(w, aligned_host, stream);
  }
  if (rows == 0) return;
  const bool gu16 = w.gate_up_bf16 != nullptr;  // g | u and dh in BF16 (then g and u unused)
  require((dys.dyp || (dys.dy && dys.row_weight)) && (gu16 || (g && u)) && (h || w.h_codes_t) && dxp_out &&
              w.gate_grad &&
              w.up_grad && w.down_grad,
          "cuda::moe_fp8_experts_backward: null activation or gradient pointer");
  if (xp == nullptr) check_gather("moe_fp8_experts_backward(_gathered): xp or x", x, token_of, rows, H);
  if (dys.dyp == nullptr) check_gather("moe_fp8_experts_backward_combined: dy", dys.dy, token_of, rows, H);
  LinearContext::Impl& c = ctx.impl();
  c.check_device("cuda::moe_fp8_experts_backward");
  const bool grouped = moe_fp8_gemm(w.gemm) == MoeFp8Gemm::Grouped;
  const bool lt = !grouped;

  cuda_detail::PhaseSequence st = stages(E, "bwd", stream);
  st.next("weights");
  const int64_t gld = moe_fp8_gate_up_ld(w);  // g and u's row stride
  check_side_by_side("moe_fp8_experts_backward", w, grouped, g, u, rows);
  // Gate and up's Dgrad as one GEMM over [dg | du] (below; needs the fused SwiGLU backward) against the pair's copy,
  // else two GEMMs against each weight's own.
  const bool pair = gu16 || (!grouped && !separate_gate_up_dgrad() && !separate_swiglu_backward() &&
                             swiglu_fp8_supported(rows, I, g, u, nullptr));
  const int64_t gs = moe_fp8_gate_up_stride(w);
  require(!grouped || gs == I * H, "cuda::moe_fp8_experts_backward: the grouped GEMM form writes gate's and up's "
                                   "gradients stacked apart (gate_up_stride unset)");
  const PreparedFp8GateUp* gu =
      pair ? &linear_detail::fp8_stacked_gate_up(c, w.gate, w.up, E, I, H, stream, gs) : nullptr;
  PreparedFp8Stack sg{}, su{};
  if (!pair) {
    sg = linear_detail::fp8_stacked_weight(c, w.gate, E, I, H, stream, gs);
    su = linear_detail::fp8_stacked_weight(c, w.up, E, I, H, stream, gs);
  }
  const PreparedFp8Stack sd = linear_detail::fp8_stacked_weight(c, w.down, E, H, I, stream);
  st.next("quant_dy_both_h_tokens");
  // down: dh = dy · w_down (Dgrad), dw_down += dyᵀ · hᵀ (Wgrad); dy quantized both ways in one pass.
  StreamScratch grads(bytes_of(rows * I, gu16 ? sizeof(uint16_t) : sizeof(float)), stream);
  float* const dh = gu16 ? nullptr : grads.as<float>();
  uint16_t* const dh16 = gu16 ? grads.as<uint16_t>() : nullptr;  // BF16 bit patterns
  {
    RowsFp8 dyq(nullptr, rows, H, aligned, E, lt, stream);
    TokensFp8 dyt(nullptr, rows, H, aligned, E, lt, stream);
    if (dys.dyp != nullptr) {
      quantize_both(dys.dyp, rows, H, aligned, E, dyq, dyt, stream);
    } else {
      fp8::cuda::quant_detail::TileOutputs o;
      o.rows = rows, o.cols = H, o.codes = dyq.codes(), o.scales = dyq.gemm_scales(), o.codes_t = dyt.codes(),
      o.scales_t = dyt.gemm_scales(), o.bounds = aligned, o.n_groups = E, o.rows_lt = o.cols_lt = lt;
      o.row_tile_order = w.row_tile_order;
      fp8::cuda::quant_detail::launch_quantize_tiles<true, true>(
          ScaledGatherSource{dys.dy, token_of, dys.row_weight, H}, o, stream);
    }
    std::optional<TokensFp8> ht_kept;
    if (w.h_codes_t != nullptr) ht_kept.emplace(w.h_codes_t, w.h_scales_t, rows, I, lt, stream);
    TokensFp8 ht_new(ht_kept ? nullptr : h, ht_kept ? 0 : rows, I, aligned, E, lt, stream);
    TokensFp8& ht = ht_kept ? *ht_kept : ht_new;
    st.next("gemm_down_dgrad");
    if (grouped) {
      GroupedProblem pr;
      pr.terms[0] = rows_term(dyq, sd.codes_t, sd.scales_t, H), pr.y = dh;
      fp8::cuda::grouped_gemm_nt_rows(&pr, 1, aligned, E, rows, I, stream);
      GroupedProblem pw;
      pw.terms[0] = tokens_term(dyt, ht), pw.y = w.down_grad;
      fp8::cuda::grouped_gemm_nt_tokens_accumulate(&pw, 1, aligned, E, rows, H, I, stream,
                                                   fp8::cuda::GroupedKernel::Default, w.overwrite_grads);
    } else {
      const std::vector<ExpertWeight> wd = expert_weights(sd);
      auto dgrad = [&](int64_t e, int64_t r0, int64_t n, cudaStream_t s, fp8::cuda::GemmContext& gc) {
        if (gu16)
          fp8::cuda::gemm_nt(gc, dyq.expert(r0, n), wd[e].wt, dh16 + r0 * I, OutType::BF16, s);
        else
          fp8::cuda::gemm_nt(gc, dyq.expert(r0, n), wd[e].wt, dh + r0 * I, OutType::FP32, s);
      };
      auto wgrad = [&](int64_t e, int64_t r0, int64_t n, cudaStream_t s, fp8::cuda::GemmContext& gc) {
        wgrad_into(gc, w, dyt.expert(r0, n), ht.expert(r0, n), w.down_grad + e * H * I, s);
      };
      run_dgrad_wgrad(st, "gemm_down_wgrad", aligned_host, E, stream, dgrad, wgrad);
    }
    ht.release();
    dyt.release();
    dyq.release();
  }

  // dg and du (swiglu_backward) quantized both ways, fused with their computation where the shapes allow. With
  // `pair` their rows' codes sit side by side, [dg | du] [rows, 2 Ip] (du at column Ip = I rounded up to 128, zero
  // codes between: each half's 1x128 tiles are its own, so the same codes and scales as apart), for one Dgrad GEMM
  // with K = 2 Ip against [wᵀ_gate | wᵀ_up].
  st.next("swiglu_bwd_quant_dg_du");
  const bool fused = gu16 || swiglu_fp8_supported(rows, I, dh, g, u);
  require(fused || !pair, "cuda::moe_fp8_experts_backward: dh not 16-byte aligned");
  const int64_t Ip = pair ? gu->padded : I;
  RowsFp8 dgq(nullptr, rows, pair ? 2 * Ip : I, aligned, E, lt, stream);  // pair: [dg | du]
  std::optional<RowsFp8> duq_apart;
  if (!pair) duq_apart.emplace(nullptr, rows, I, aligned, E, lt, stream);
  // With wgrad_pair the tokens' codes of dg and du as those of one [rows, 2 I] activation [dg | du]: each expert's
  // [dgᵀ; duᵀ] [2 I, n] (du's features from I), for one Wgrad GEMM into [dw_gate; dw_up]. The same codes and scales
  // as apart (a column's 1x128 tiles run along tokens).
  const bool wgrad_pair = pair && moe_fp8_wgrad_pair(w);
  TokensFp8 dgt(nullptr, rows, wgrad_pair ? 2 * I : I, aligned, E, lt, stream);  // wgrad_pair: [dg | du]
  std::optional<TokensFp8> dut_apart;
  if (!wgrad_pair) dut_apart.emplace(nullptr, rows, I, aligned, E, lt, stream);
  TokensFp8& dut = wgrad_pair ? dgt : *dut_apart;
  if (pair) {
    const int64_t ld = 2 * Ip, scales_ld = 2 * tiles(I);
    // Scales straight in the GEMM's layout (du's tiles after dg's: scales_col0); the zero columns after each half's
    // I written by the kernel (zero_pad: two memsets of [rows, Ip - I] fewer a call where Ip != I; bench-600m's
    // fp8 step 249.2-252.6k against 247.2-247.8k tokens/s on the H200,
    // bench/results/2026-11-30-gpu-zero-pad-h200-8370360.txt).
    Fp8Dual dg_out{dgq.codes(), dgq.gemm_scales(), dgt.codes(), dgt.gemm_scales(), ld, scales_ld, lt, lt, 0, true};
    Fp8Dual du_out{dgq.codes() + Ip, dgq.gemm_scales(), dut.codes(), dut.gemm_scales(), ld, scales_ld, lt, lt,
                   tiles(I), true};
    if (wgrad_pair) dg_out.t_cols = du_out.t_cols = 2 * I, du_out.t_col0 = I;
    if (gu16)
      swiglu_backward_quantize_dual_both(dh16, w.gate_up_bf16, w.gate_up_bf16 + gld / 2, rows, I, gld, aligned, E,
                                         dg_out, du_out, stream);
    else
      swiglu_backward_quantize_dual_both(dh, g, u, rows, I, gld, aligned, E, dg_out, du_out, stream);
  } else if (fused) {
    RowsFp8& duq = *duq_apart;
    if (separate_swiglu_backward()) {
      swiglu_backward_quantize_dual(dh, g, u, rows, I, gld, true, aligned, E, dgq.codes(), dgq.cpu_scales(),
                                    dgt.codes(), dgt.cpu_scales(), stream);
      swiglu_backward_quantize_dual(dh, g, nullptr, rows, I, gld, false, aligned, E, duq.codes(), duq.cpu_scales(),
                                    dut.codes(), dut.cpu_scales(), stream);
    } else {
      swiglu_backward_quantize_dual_both(dh, g, u, rows, I, gld, aligned, E,
                                         Fp8Dual{dgq.codes(), dgq.cpu_scales(), dgt.codes(), dgt.cpu_scales()},
                                         Fp8Dual{duq.codes(), duq.cpu_scales(), dut.codes(), dut.cpu_scales()}, stream);
    }
    dgq.finish(), dgt.finish(), duq.finish(), dut.finish();
  } else {
    StreamScratch dgu(2 * bytes_of(rows * I, sizeof(float)), stream);
    float* dg = dgu.as<float>();
    float* du = dgu.as<float>(bytes_of(rows * I, sizeof(float)));
    require(gld == I, "cuda::moe_fp8_experts_backward: g and u side by side need the fused SwiGLU kernels");
    swiglu_backward(dh, g, u, dg, du, rows * I, stream);
    quantize_both(dg, rows, I, aligned, E, dgq, dgt, stream);
    quantize_both(du, rows, I, aligned, E, *duq_apart, dut, stream);
    dgu.release();
  }
  grads.release();
  st.next("quant_x_tokens");
  std::optional<TokensFp8> xt_kept;
  if (w.x_codes_t != nullptr) xt_kept.emplace(w.x_codes_t, w.x_scales_t, rows, H, lt, stream);
  TokensFp8 xt_new(nullptr, xt_kept ? 0 : rows, H, aligned, E, lt, stream);
  if (!xt_kept) quantize_input_tokens(xp, x, token_of, rows, H, aligned, E, w.row_tile_order, xt_new, stream);
  TokensFp8& xt = xt_kept ? *xt_kept : xt_new;
  st.next("gemm_gate_up_dgrad");

  // gate and up: dx = dg · w_gate + du · w_up (pair: one GEMM over [dg | du]; else the second accumulated in the
  // GEMM), dw += dgᵀ · xᵀ, duᵀ · xᵀ. dxp in BF16: the pair's GEMM and the grouped one (both terms in one sum) round
  // their sums once; the lanes without the pair sum in FP32 (a temporary) and round that.
  const bool dxp_bf16 = dxp_type == OutType::BF16, direct = !dxp_bf16 || pair || grouped;
  std::optional<StreamScratch> dx32;  // only where the FP32 sum is rounded afterwards (no allocation otherwise)
  if (!direct) dx32.emplace(bytes_of(rows * H, sizeof(float)), stream);
  float* const dxp = direct ? static_cast<float*>(dxp_out) : dx32->as<float>();
  if (grouped) {
    GroupedProblem pr;
    pr.terms[0] = rows_term(dgq, sg.codes_t, sg.scales_t, I);
    pr.terms[1] = rows_term(*duq_apart, su.codes_t, su.scales_t, I);
    pr.n_terms = 2;
    set_output(pr, dxp_bf16 ? dxp_out : dxp, dxp_bf16);
    fp8::cuda::grouped_gemm_nt_rows(&pr, 1, aligned, E, rows, H, stream);
    GroupedProblem pw[2];
    pw[0].terms[0] = tokens_term(dgt, xt), pw[0].y = w.gate_grad;
    pw[1].terms[0] = tokens_term(dut, xt), pw[1].y = w.up_grad;
    fp8::cuda::grouped_gemm_nt_tokens_accumulate(pw, 2, aligned, E, rows, I, H, stream,
                                                 fp8::cuda::GroupedKernel::Default, w.overwrite_grads);
  } else {
    const std::vector<ExpertWeight> wg = expert_weights(sg), wu = expert_weights(su);
    auto dgrad = [&](int64_t e, int64_t r0, int64_t n, cudaStream_t s, fp8::cuda::GemmContext& gc) {
      if (pair) {
        const Operand wt{gu->codes_t + e * H * 2 * Ip, gu->scales_t + e * gu->scales_t_stride, H, 2 * Ip, kTile};
        fp8::cuda::gemm_nt(gc, dgq.expert(r0, n), wt, static_cast<uint8_t*>(dxp_out) + r0 * H * (dxp_bf16 ? 2 : 4),
                           dxp_type, s);
        return;
      }
      fp8::cuda::gemm_nt(gc, dgq.expert(r0, n), wg[e].wt, dxp + r0 * H, OutType::FP32, s);
      fp8::cuda::gemm_nt_accumulate(gc, duq_apart->expert(r0, n), wu[e].wt, dxp + r0 * H, s);
    };
    auto wgrad = [&](int64_t e, int64_t r0, int64_t n, cudaStream_t s, fp8::cuda::GemmContext& gc) {
      const Operand x = xt.expert(r0, n);
      wgrad_into(gc, w, dgt.expert(r0, n), x, w.gate_grad + e * gs, s);  // wgrad_pair: [dw_gate; dw_up] [2 I, H]
      if (!wgrad_pair) wgrad_into(gc, w, dut.expert(r0, n), x, w.up_grad + e * gs, s);
    };
    run_dgrad_wgrad(st, "gemm_gate_up_wgrad", aligned_host, E, stream, dgrad, wgrad);
  }
  if (dx32) {
    to_bf16(dxp, rows * H, static_cast<uint16_t*>(dxp_out), stream);
    dx32->release();
  }
  xt.release();
  if (dut_apart) dut_apart->release();
  dgt.release();
  if (duq_apart) duq_apart->release();
  dgq.release();
}

}  // namespace

void moe_fp8_experts_forward(LinearContext& ctx, const MoeFp8Experts& w, const float* xp, const int64_t* aligned_host,
                             const int64_t* aligned, float* g, float* u, float* h, float* yp, cudaStream_t stream) {
  experts_forward(ctx, w, xp, nullptr, 0, nullptr, aligned_host, aligned, g, u, h, yp, OutType::FP32, stream);
}

void moe_fp8_experts_forward(LinearContext& ctx, const MoeFp8Experts& w, const float* xp, const int64_t* aligned_host,
                             const int64_t* aligned, float* g, float* u, float* h, uint16_t* yp, cudaStream_t stream) {
  experts_forward(ctx, w, xp, nullptr, 0, nullptr, aligned_host, aligned, g, u, h, yp, OutType::BF16, stream);
}

void moe_fp8_experts_forward_gathered(LinearContext& ctx, const MoeFp8Experts& w, const float* x, int64_t tokens,
                                      const int64_t* token_of, const int64_t* aligned_host, const int64_t* aligned,
                                      float* g, float* u, float* h, float* yp, cudaStream_t stream) {
  experts_forward(ctx, w, nullptr, x, tokens, token_of, aligned_host, aligned, g, u, h, yp, OutType::FP32, stream);
}

void moe_fp8_experts_forward_gathered(LinearContext& ctx, const MoeFp8Experts& w, const float* x, int64_t tokens,
                                      const int64_t* token_of, const int64_t* aligned_host, const int64_t* aligned,
                                      float* g, float* u, float* h, uint16_t* yp, cudaStream_t stream) {
  experts_forward(ctx, w, nullptr, x, tokens, token_of, aligned_host, aligned, g, u, h, yp, OutType::BF16, stream);
}

void moe_fp8_experts_backward(LinearContext& ctx, const MoeFp8Experts& w, const float* dyp, const float* xp,
                              const float* g, const float* u, const float* h, const int64_t* aligned_host,
                              const int64_t* aligned, float* dxp, cudaStream_t stream) {
  experts_backward(ctx, w, DySource{dyp}, xp, nullptr, nullptr, g, u, h, aligned_host, aligned, dxp, OutType::FP32,
                   stream);
}

void moe_fp8_experts_backward_gathered(LinearContext& ctx, const MoeFp8Experts& w, const float* dyp, const float* x,
                                       const int64_t* token_of, const float* g, const float* u, const float* h,
                                       const int64_t* aligned_host, const int64_t* aligned, float* dxp,
                                       cudaStream_t stream) {
  experts_backward(ctx, w, DySource{dyp}, nullptr, x, token_of, g, u, h, aligned_host, aligned, dxp, OutType::FP32,
                   stream);
}

void moe_fp8_experts_backward_gathered(LinearContext& ctx, const MoeFp8Experts& w, const float* dyp, const float* x,
                                       const int64_t* token_of, const float* g, const float* u, const float* h,
                                       const int64_t* aligned_host, const int64_t* aligned, uint16_t* dxp,
                                       cudaStream_t stream) {
  experts_backward(ctx, w, DySource{dyp}, nullptr, x, token_of, g, u, h, aligned_host, aligned, dxp, OutType::BF16,
                   stream);
}

namespace {

void backward_combined(LinearContext& ctx, const MoeFp8Experts& w, const float* dy, const float* row_weight,
                       const float* x, const int64_t* token_of, const float* g, const float* u, const float* h,
                       const int64_t* aligned_host, const int64_t* aligned, void* dxp, OutType dxp_type,
                       cudaStream_t stream) {
  require(dy != nullptr && row_weight != nullptr, "cuda::moe_fp8_experts_backward_combined: null dy or row_weight");
  experts_backward(ctx, w, DySource{nullptr, dy, row_weight}, nullptr, x, token_of, g, u, h, aligned_host, aligned,
                   dxp, dxp_type, stream);
}

}  // namespace

void moe_fp8_experts_backward_combined(LinearContext& ctx, const MoeFp8Experts& w, const float* dy,
                                       const float* row_weight, const float* x, const int64_t* token_of,
                                       const float* g, const float* u, const float* h, const int64_t* aligned_host,
                                       const int64_t* aligned, float* dxp, cudaStream_t stream) {
  backward_combined(ctx, w, dy, row_weight, x, token_of, g, u, h, aligned_host, aligned, dxp, OutType::FP32, stream);
}

void moe_fp8_experts_backward_combined(LinearContext& ctx, const MoeFp8Experts& w, const float* dy,
                                       const float* row_weight, const float* x, const int64_t* token_of,
                                       const float* g, const float* u, const float* h, const int64_t* aligned_host,
                                       const int64_t* aligned, uint16_t* dxp, cudaStream_t stream) {
  backward_combined(ctx, w, dy, row_weight, x, token_of, g, u, h, aligned_host, aligned, dxp, OutType::BF16, stream);
}

}  // namespace moerl::cuda
