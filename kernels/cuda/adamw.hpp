// AdamW on the GPU (kernels/cuda/adamw.cu): one update of a flat FP32 buffer with BF16 moments, and the two
// halves of global-norm clipping. The arithmetic of moerl::AdamW (runtime/optim/adamw.cpp), step for step, so
// a GPU optimizer built on these gives the CPU's bits:
//   host, in double: bias1 = 1 − beta1^t, bias2 = 1 − beta2^t, step_size = (float)(lr / bias1),
//     sqrt_bias2 = (float)sqrt(bias2), decay = (float)(1 − lr·weight_decay), beta1, 1 − beta1, beta2,
//     1 − beta2 and eps rounded to FP32 from double;
//   device, in FP32 with every product, sum, quotient and square root rounded separately (no fused
//   multiply-add, IEEE division and square root):
//     m = bf16(beta1·m + (1 − beta1)·g),  v = bf16(beta2·v + (1 − beta2)·(g·g))   (round to nearest even),
//     w = w·decay − step_size · (m / (sqrt(v) / sqrt_bias2 + eps))                 (the ROUNDED moments).
// The scalars are doubles (not floats) for that reason: the CPU derives 1 − beta1 and lr / bias1 from the
// doubles of its config, and FP32 inputs would give other constants.
//
// The caller applies DeepSeek-V3's rules around it: weight_decay = 0 for 1-D tensors (norm scales, biases);
// clipping as moerl::clip_grad_norm — norm = sqrt(Σ over trainable tensors of grad_norm_squared), and when it
// is finite and above max_norm, scale(g, n, (float)(max_norm / norm)) on every trainable gradient; a step whose
// norm is not finite is skipped.
//
// All pointers are device memory; calls are asynchronous on `stream`. Aligned buffers (w, g 16 bytes, m, v
// 8 bytes) take 4-wide loads for all but the last n % 4 elements. Throws moerl::Error on bad arguments and on a
// CUDA failure.
#pragma once
#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>
#include <vector>

#include "kernels/fp8_quantize.hpp"

namespace moerl::cuda {

// One AdamW update of w[n] from g[n] with moments m[n], v[n] (BF16 bit patterns, updated in place); t is the
// 1-based count of updates including this one (bias correction). grad_scale: the update uses RN(g[i] · grad_scale)
// (clipping's factor, the value scale() would leave in g; 1 leaves g as it is) and g itself is not written, which
// saves clipping's pass over the gradients (read and write, 8 bytes a parameter).
void adamw_step(float* w, const float* g, uint16_t* m, uint16_t* v, int64_t n, double lr, double beta1,
                double beta2, double eps, double weight_decay, int64_t t, cudaStream_t stream = nullptr,
                float grad_scale = 1.0f);

// *sum += Σ g[i]² over n elements, in double (sum is one device double). Deterministic: 32768-element chunks
// summed per block, the chunk sums then added in chunk order by one block; launches on one stream add to *sum
// in launch order. Zero *sum before the first tensor (cudaMemsetAsync).
void grad_norm_squared(const float* g, int64_t n, double* sum, cudaStream_t stream = nullptr);

// g[i] *= factor (FP32, one rounding: the CPU's clip).
void scale(float* g, int64_t n, float factor, cudaStream_t stream = nullptr);

// Clipping's factor on the device, from *norm_sq (Σ g², a device double) to *factor (a device float): (float)
// (max_norm / sqrt(Σ)) where that norm is finite and above max_norm > 0, else 1; NaN where the norm is not finite
// (the step is skipped: the update kernels reading it change nothing). IEEE double square root and division and one
// rounding to float, as the host computes it, so the same bits. Lets the update be queued right behind the norm
// instead of after the host has read it.
void clip_factor(const double* norm_sq, double max_norm, float* factor, cudaStream_t stream = nullptr);

// One update's scalars for the batched forms below: adamw_step's (weight_decay where a span has decay), and
// device_grad_scale: when set, the update reads its grad_scale there (clip_factor's, in place of grad_scale) and does
// nothing where it is NaN (a skipped step).
struct AdamWUpdate {
  double lr = 0, beta1 = 0, beta2 = 0, eps = 0, weight_decay = 0;
  int64_t t = 1;  // the 1-based update count
  float grad_scale = 1.0f;
  const float* device_grad_scale = nullptr;
};

// Buffers updated and measured together: span i is n elements of w and g (16-byte aligned) and of the moments m, v
// (8-byte aligned), with weight decay (decay) or without.
struct AdamWSpan {
  float* w = nullptr;
  const float* g = nullptr;
  uint16_t* m = nullptr;
  uint16_t* v = nullptr;
  int64_t n = 0;
  bool decay = false;
};

// grad_norm_squared and adamw_step over every span, one launch per kernel for all of them instead of one (two for
// the norm) per span: the same bits as the per-span calls in span order (the norm's chunk sums, each span's sum of
// them added to *sum in span order; the update element by element). The spans' tables live on the device, made
// once; the spans' memory must outlive this. Throws moerl::Error on a null or misaligned span. bench-600m's 42 spans
// on the H200: train step fp8 253.3-253.9k against 251.7-252.8k tokens/s with the per-span launches, the same loss
// (bench/results/2026-11-30-gpu-adamw-spans-h200-ce6f059+spans.txt).
class AdamWSpans {
 public:
  // Whether a span is aligned as the constructor requires (w, g 16 bytes, m, v 8; any when empty).
  static bool fits(const AdamWSpan& span);
  explicit AdamWSpans(const std::vector<AdamWSpan>& spans);
  ~AdamWSpans();
  AdamWSpans(const AdamWSpans&) = delete;
  AdamWSpans& operator=(const AdamWSpans&) = delete;

  // *sum += Σ over spans of Σ g² (zero *sum first for the norm of these spans alone).
  void grad_norm_squared(double* sum, cudaStream_t stream = nullptr) const;
  // adamw_step on every span, u.weight_decay on the spans with decay and 0 on the others.
  void adamw_step(const AdamWUpdate& u, cudaStream_t stream = nullptr) const;

 private:
  size_t spans_ = 0;
  int64_t chunks_ = 0;
  void* device_ = nullptr;  // the spans, the chunk table, each span's first chunk, the chunks' partial sums
};

// A weight whose FP8 copy the update rewrites as it goes (the linear layers' prepared 128x128-block codes, which
// would otherwise be made by reading w again: bench-600m's 536M FP8 weights, 2.1 GB a step): `batch` matrices
// [out.rows, out.cols] from w on, their gradients and moments at the same offsets (a piece of a span with weight
// decay). After the update each matrix is quantized into `out` as fp8::cuda::quantize_128x128_placed quantizes the
// updated w: the same codes, block scales and transposed codes, bit for bit; with out.gemm_scales.sw set, each
// block's scale also into its entries of the GEMMs' layouts (Fp8GemmScales).
struct AdamWFp8Copy {
  float* w = nullptr;
  const float* g = nullptr;
  uint16_t* m = nullptr;
  uint16_t* v = nullptr;
  fp8::cuda::Fp8WeightCodes out;
};

// AdamWSpans' update (with weight decay) of several such weights and their quantization, one launch of one thread
// block per 128x128 block of every matrix (adamw_fp8.cu). The copies' tables live on the device, made once.
class AdamWFp8Copies {
 public:
  // Whether a copy can be updated so: non-empty, no pointer null, cols % 4 == 0, rows % 16 == 0 and a placement
  // quantize_128x128_placed accepts, w and g 16-byte, m and v 8-byte, codes 4-byte and codes_t 16-byte aligned.
  static bool fits(const AdamWFp8Copy& copy);
  explicit AdamWFp8Copies(const std::vector<AdamWFp8Copy>& copies);  // moerl::Error where one does not fit
  ~AdamWFp8Copies();
  AdamWFp8Copies(const AdamWFp8Copies&) = delete;
  AdamWFp8Copies& operator=(const AdamWFp8Copies&) = delete;

  // The update of every copy's elements (with u.weight_decay), then their FP8 copies.
  void update(const AdamWUpdate& u, cudaStream_t stream = nullptr) const;

 private:
  size_t copies_ = 0;
  int64_t blocks_ = 0;
  void* device_ = nullptr;  // the copies, then each copy's first block (copies + 1 entries)
};

}  // namespace moerl::cuda
