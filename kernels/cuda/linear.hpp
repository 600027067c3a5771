// Linear layers on the GPU in the three precision recipes of kernels/linear.hpp: the same arguments as
// cpu::linear_forward / cpu::linear_backward plus a LinearContext and a stream. y[M, N] = x[M, K] · w[N, K]ᵀ.
//   fp32: cuBLASLt FP32 GEMM with CUBLAS_COMPUTE_32F (no TF32): the CPU's result up to the order of the sums.
//   bf16: x, w and dy rounded to BF16 (nearest even, as moerl::bf16_from_float), BF16 tensor-core GEMM,
//         FP32 accumulation and FP32 output: the CPU's bf16 recipe up to the order of the sums.
//   fp8:  DeepSeek-V3's recipe with fp8::cuda::quantize_* and fp8::cuda::gemm_nt (kernels/fp8_gemm.hpp):
//         Fprop x 1x128 · w 128x128, Dgrad dy 1x128 · wᵀ 128x128, Wgrad dyᵀ 1x128 · xᵀ 1x128 (tiles along
//         tokens). The codes and scales are the CPU emulation's bit for bit, so the results are the CPU's up
//         to the summation (the tensor cores add each 128-wide group with about 14 significand bits before
//         promoting to FP32). Wgrad accumulates into dw inside the GEMM (cuBLASLt beta = 1).
// Weights are prepared once per weight and generation: the BF16 copy (bf16), or the E4M3 codes and scales of
// w and of wᵀ (fp8), kept in buffers owned by the context and keyed by the weight's device pointer, shape and
// precision. weights_changed() starts a new generation (call it after every optimizer step); the buffers are
// reused, so a steady-state step allocates nothing for weights. Until then a changed weight is NOT seen by
// bf16 / fp8 calls: they keep using the copy made at the first call of the generation (fp32 reads w itself).
// A copy is made on the stream of the call that needs it, so later calls on one context must be ordered after
// it (the contract below). Activation temporaries (BF16 copies, quantized activations, padding, padded
// outputs) come from the stream-ordered pool (cudaMallocAsync).
//
// Any M, N, K >= 0 the CPU accepts are accepted: shapes the cuBLASLt FP8 kernels cannot take directly
// (K or the token count not a multiple of 16, M or N not a multiple of 4; sizes below 128 are raised to 128
// too, the smallest verified on the H200) are zero-padded internally, which leaves the result unchanged (a
// zero row or column adds nothing to a sum and a zero-padded tile has the same amax and codes). Padding costs
// an extra copy of the padded operand and of the output; the model's shapes (multiples of 128, tokens a
// multiple of 16) need none; nor do 16-byte aligned y, dx, dw (fp8 writes others through a temporary).
// M = 0 is a no-op (dw unchanged); K = 0 gives y = 0; N = 0 gives dx = 0.
// All pointers are device memory; x, w, dy are read-only; y and dx are overwritten, dw is accumulated (+=).
// dx or dw may be null (that output is skipped). Calls are asynchronous on `stream`.
// Throws moerl::Error on bad arguments (negative sizes, null required pointers) and on CUDA or cuBLASLt
// failures.
#pragma once
#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>
#include <memory>
#include <vector>

#include "kernels/fp8_quantize.hpp"
#include "kernels/linear.hpp"

namespace moerl::cuda {

// How a prepared FP8 weight is made from its master: one 128x128-block quantization (two for gate and up side by
// side) of w into `out`, fp8::cuda::quantize_128x128_placed, with the block scales in the CPU layout, which the
// context then puts in cuBLASLt's layouts (out.gemm_scales says where each block's entries lie). An optimizer that
// writes these bytes as part of its update (GpuAdamW: cuda::AdamWFp8Copies) saves the quantization's read of the
// weights, and writing the GEMMs' scale entries too saves the conversion launch of each weight (weights_changed).
struct Fp8WeightCopy {
  const float* w = nullptr;
  fp8::cuda::Fp8WeightCodes out;
  bool operator==(const Fp8WeightCopy&) const = default;
};

// The cuBLASLt handle and workspace, the FP32 / BF16 matmul plans, an fp8::cuda::GemmContext, and the
// prepared weights. Bound to the device current at construction. Not thread-safe; calls on one context
// must not overlap in time on different streams (they share the workspace).
class LinearContext {
 public:
  LinearContext();
  ~LinearContext();
  LinearContext(const LinearContext&) = delete;
  LinearContext& operator=(const LinearContext&) = delete;

  // The weights changed (an optimizer step ran): prepared copies are rebuilt on their next use.
  void weights_changed();
  // weights_changed() after an update that also wrote `refreshed` (copies listed by fp8_weight_copies(), matched by
  // their codes) on `stream`: each prepared weight whose copies are all among them stays current, its block scales
  // put in the GEMMs' layouts on `stream` unless every refreshed copy wrote them itself (gemm_scales.sw set); every
  // other copy is rebuilt on its next use.
  void weights_changed(const std::vector<Fp8WeightCopy>& refreshed, cudaStream_t stream);
  // The copies of every prepared FP8 weight made so far that weights_changed(refreshed, ..) can keep current (all
  // but those of weights padded to the GEMMs' sizes, which are quantized from a padded temporary).
  std::vector<Fp8WeightCopy> fp8_weight_copies() const;
  // Device bytes held by prepared weights (BF16 copies, FP8 codes and scales).
  size_t prepared_bytes() const;
  // Frees every prepared copy. Copies are keyed by the weight's address: call this when weight buffers were
  // freed or reallocated (a new weight at a freed weight's address and shape would otherwise find its copy).
  void forget_weights();

  struct Impl;
  Impl& impl() { return *impl_; }

 private:
  std::unique_ptr<Impl> impl_;
};

// The FP8 Wgrad operand of a linear's input x [M, K] (xᵀ quantized along the tokens), carried from the forward to
// the backward. linear_forward / linear_forward_shared given one (FP8, x needing no padding: M and K multiples of
// 128) quantize x both ways in one pass (fp8::cuda::quantize_1x128_dual) and keep this half; linear_backward /
// linear_backward_shared given it back for the same x pointer and shape take it instead of quantizing x again (a
// second read of x [M, K]), and release it. Its M·K bytes of codes stay allocated in between, so x must not change
// in between either. Empty otherwise (the backward then quantizes x itself). The same bits either way.
class SavedInput {
 public:
  SavedInput();
  ~SavedInput();
  SavedInput(const SavedInput&) = delete;
  SavedInput& operator=(const SavedInput&) = delete;
  bool empty() const { return impl_ == nullptr; }
  void release();  // the codes back to the pool, ordered on the stream that made them
  struct Impl;     // kernels/cuda/linear_impl.cuh
  std::unique_ptr<Impl> impl_;
};

// y[M, N] = x[M, K] · w[N, K]ᵀ (overwritten). keep: see SavedInput (released first in any case).
void linear_forward(LinearContext& ctx, Precision p, const float* x, const float* w, float* y, int64_t M,
                    int64_t N, int64_t K, cudaStream_t stream = nullptr, SavedInput* keep = nullptr);

// linear_forward in Precision::BF16 with y16 [M, N] in BF16 (bit patterns): the FP32 sums rounded to nearest even in
// cuBLASLt's epilogue (a BF16 output head's logits: half the bytes written, and read by the cross-entropy).
// x16_keep [M, K], when given: x rounded to BF16 is written there, for linear_backward_bf16_dy's x16, instead of
// into a temporary.
void linear_forward_bf16_out(LinearContext& ctx, const float* x, const float* w, uint16_t* y16, int64_t M, int64_t N,
                             int64_t K, cudaStream_t stream = nullptr, uint16_t* x16_keep = nullptr);

// dx[M, K] = dy[M, N] · w[N, K]   (overwritten, or with accumulate_dx added to dx; skipped when dx is null)
// dw[N, K] += dy[M, N]ᵀ · x[M, K] (accumulated, or with overwrite_dw written whole; skipped when dw is null)
// accumulate_dx: dx + dy · w rounded once (the GEMM's beta = 1), for layers whose input feeds several projections.
// overwrite_dw: dw's old contents are not read (the GEMM's beta = 0; zeros when M = 0), for a gradient not yet
// written since it was last consumed (runtime/gpu's GpuModel::zero_grad marks them instead of clearing them).
// saved: the forward's SavedInput of x, taken when it matches and released in any case.
void linear_backward(LinearContext& ctx, Precision p, const float* dy, const float* x, const float* w, float* dx,
                     float* dw, int64_t M, int64_t N, int64_t K, cudaStream_t stream = nullptr,
                     bool accumulate_dx = false, bool overwrite_dw = false, SavedInput* saved = nullptr);

// Several projections of one input x [M, K] (attention's queries and latent from the same hidden state): y_i [M, N_i]
// = x · w_iᵀ, each the bits linear_forward gives, with x rounded (BF16) or quantized (FP8) once for all of them.
struct LinearOutput {
  const float* w = nullptr;
  float* y = nullptr;
  int64_t N = 0;
};
void linear_forward_shared(LinearContext& ctx, Precision p, const float* x, const std::vector<LinearOutput>& outs,
                           int64_t M, int64_t K, cudaStream_t stream = nullptr, SavedInput* keep = nullptr);

// Their backward, the bits of linear_backward called for each in turn: dx = Σ_i dy_i · w_i (the first written, or
// added with accumulate_dx; each next added in its GEMM) and dw_i += dy_iᵀ · x (written with overwrite_dw), with x's
// rounded (BF16) or transposed quantized (FP8) operand made once for all the weight gradients.
struct LinearGradient {
  const float* dy = nullptr;
  const float* w = nullptr;
  float* dw = nullptr;
  int64_t N = 0;
  bool overwrite_dw = false;
};
void linear_backward_shared(LinearContext& ctx, Precision p, const float* x, const std::vector<LinearGradient>& grads,
                            float* dx, int64_t M, int64_t K, cudaStream_t stream = nullptr, bool accumulate_dx = false,
                            SavedInput* saved = nullptr);

// linear_backward in Precision::BF16 from an output gradient already rounded to BF16: dy16 [M, N] as BF16 bit
// patterns with row stride ld_dy >= N (e.g. cuda::cross_entropy_bf16_grad's rows, in place over the logits). What
// linear_backward(BF16) gives from the FP32 dy these bits were rounded from, without its rounding pass over dy.
// x16, when given: x already rounded to BF16 (linear_forward_bf16_out's x16_keep), which the Wgrad reads instead of
// rounding x again (x may then be null).
void linear_backward_bf16_dy(LinearContext& ctx, const uint16_t* dy16, int64_t ld_dy, const float* x, const float* w,
                             float* dx, float* dw, int64_t M, int64_t N, int64_t K, cudaStream_t stream = nullptr,
                             bool accumulate_dx = false, bool overwrite_dw = false, const uint16_t* x16 = nullptr);

// The prepared copies, for tests and diagnostics: made (or refreshed, when stale) on `stream` exactly as a
// linear call would. N, K > 0. Without weights_changed() a copy is NOT refreshed when the weight's values change:
// a linear call reuses its copy of the values it saw first in the current generation.
//   BF16: w [N, K] rounded to nearest even, as BF16 bit patterns [N, K].
const uint16_t* prepared_bf16_weight(LinearContext& ctx, const float* w, int64_t N, int64_t K,
                                     cudaStream_t stream = nullptr);
//   FP8: w in 128x128 blocks, padded with zeros to [rows, cols] (rows = N, cols = K rounded up to multiples of 16
//   and at least 128), the codes of w and of wᵀ and their scales in cuBLASLt's BLK128x128 layout
//   (kernels/fp8_gemm.hpp). The blocks of wᵀ are those of w transposed, with the same scales: codes_t and
//   scales_t are what fp8::cpu::quantize_128x128 gives for wᵀ.
struct PreparedFp8Weight {
  const uint8_t* codes = nullptr;    // [rows, cols]
  const float* scales = nullptr;     // fp8::cuda::cublaslt_scale_count(rows, cols, 128) floats
  const uint8_t* codes_t = nullptr;  // [cols, rows]
  const float* scales_t = nullptr;   // fp8::cuda::cublaslt_scale_count(cols, rows, 128) floats
  int64_t rows = 0, cols = 0;
};
PreparedFp8Weight prepared_fp8_weight(LinearContext& ctx, const float* w, int64_t N, int64_t K,
                                      cudaStream_t stream = nullptr);

// FP8 copies of `experts` stacked weights w [experts, N, K] (ParamStore's expert layout), N and K multiples of 16
// and at least 128 (no padding), made in one set of launches for all experts. Expert e's codes at codes + e · N · K
// (codes_t likewise), its scales at scales + e · scales_stride and scales_t + e · scales_t_stride: each expert's
// bytes are exactly prepared_fp8_weight's of w + e · N · K (tests/gpu/moe_fp8_gpu.cpp).
struct PreparedFp8Stack {
  const uint8_t* codes = nullptr;    // [experts, N, K]
  const float* scales = nullptr;     // [experts, scales_stride]: BLK128x128 layout of [N, K]
  const uint8_t* codes_t = nullptr;  // [experts, K, N]
  const float* scales_t = nullptr;   // [experts, scales_t_stride]: BLK128x128 layout of [K, N]
  int64_t experts = 0, rows = 0, cols = 0;  // rows = N, cols = K
  int64_t scales_stride = 0, scales_t_stride = 0;
};
// Every expert's gate and up weights side by side (linear_detail::fp8_stacked_gate_up), each half padded with zeros
// to Ip = I rounded up to 128 so that its 128-blocks are its own.
struct PreparedFp8GateUp {
  const uint8_t* codes = nullptr;    // [experts, 2 Ip, H]: [w_gate; w_up], up's rows from Ip (Fprop's operand)
  const float* scales = nullptr;     // [experts, scales_stride]: BLK128x128 layout of [2 Ip, H]
  const uint8_t* codes_t = nullptr;  // [experts, H, 2 Ip]: [wᵀ_gate | wᵀ_up], up's columns from Ip (Dgrad's)
  const float* scales_t = nullptr;   // [experts, scales_t_stride]: BLK128x128 layout of [H, 2 Ip]
  int64_t experts = 0, inter = 0, padded = 0, hidden = 0;  // E, I, Ip, H
  int64_t scales_stride = 0, scales_t_stride = 0;
};
PreparedFp8Stack prepared_fp8_stacked_weight(LinearContext& ctx, const float* w, int64_t experts, int64_t N,
                                             int64_t K, cudaStream_t stream = nullptr);
// gate and up [experts, I, H] side by side (I, H as prepared_fp8_stacked_weight's N and K).
PreparedFp8GateUp prepared_fp8_stacked_gate_up(LinearContext& ctx, const float* gate, const float* up,
                                               int64_t experts, int64_t I, int64_t H, cudaStream_t stream = nullptr);

}  // namespace moerl::cuda
